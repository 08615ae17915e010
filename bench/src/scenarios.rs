//! The scenarios: what load, which fault at which moment, and which figures each reports.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::load::{now_ns, LoadSpec, Publishers, Subscriber};
use crate::procs::{own_usage, rss};
use crate::stats::{Delivery, Fmt, Rows};
use crate::systems::{Deployment, Kind, Programs};

/// One scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    /// N publishers, QoS 1, unpaced with an in-flight window.
    Throughput(u32),
    /// One publisher at 1,000 msg/s.
    Latency,
    /// 2,000 msg/s while the cloud side is stopped and started again.
    Outage,
    /// The edge SIGKILLed while it holds a backlog for a cloud that is down.
    Crash,
    /// 100 publishers × 10 msg/s on distinct topics.
    FanIn,
    /// One publisher at 1,000 msg/s, with a persistent subscriber on the edge broker besides the cloud
    /// one: what the edge pays to keep a local session's deliveries (issue 12).
    LocalSession,
}

impl Scenario {
    /// Every scenario, in report order.
    pub(crate) fn all() -> Vec<Self> {
        vec![
            Self::Throughput(1),
            Self::Throughput(10),
            Self::Latency,
            Self::LocalSession,
            Self::FanIn,
            Self::Outage,
            Self::Crash,
        ]
    }

    /// Table title.
    pub(crate) fn title(self) -> String {
        match self {
            Self::Throughput(1) => "throughput, 1 publisher".to_owned(),
            Self::Throughput(n) => format!("throughput, {n} publishers"),
            Self::Latency => "latency".to_owned(),
            Self::Outage => "outage".to_owned(),
            Self::Crash => "crash".to_owned(),
            Self::FanIn => "fan-in".to_owned(),
            Self::LocalSession => "latency, persistent local subscriber".to_owned(),
        }
    }

    /// One line saying what was run.
    pub(crate) fn describe(self, s: &Settings) -> String {
        match self {
            Self::Throughput(n) => format!(
                "{n} publisher(s), QoS 1, {} B payloads, unpaced, {} in flight per publisher, {:?}",
                crate::load::PAYLOAD_LEN,
                THROUGHPUT_INFLIGHT,
                s.throughput
            ),
            Self::Latency => format!("1 publisher, QoS 1, 1,000 msg/s for {:?}", s.latency),
            Self::Outage => format!(
                "1 publisher, QoS 1, 2,000 msg/s for {:?}; cloud side stopped (SIGTERM) at {:?}, started again at {:?}",
                s.outage, s.outage_down, s.outage_up
            ),
            Self::Crash => format!(
                "cloud side stopped; 1 publisher at 2,000 msg/s for {:?} builds a backlog; edge SIGKILLed while publishing, \
                 restarted, then the cloud side started"
                , s.crash_backlog
            ),
            Self::FanIn => format!(
                "100 publishers × 10 msg/s, each its own topic, QoS 1, for {:?}",
                s.fanin
            ),
            Self::LocalSession => format!(
                "1 publisher, QoS 1, 1,000 msg/s for {:?}; a persistent (cleansession=0) QoS 1 subscriber on \
                 the edge broker as well as the cloud subscriber; `local` rows are the edge subscriber's",
                s.latency
            ),
        }
    }

    /// The ceiling has no cloud side to stop or edge holding a backlog for it.
    pub(crate) fn applies_to(self, kind: Kind) -> bool {
        !(kind == Kind::Ceiling && matches!(self, Self::Outage | Self::Crash | Self::LocalSession))
    }
}

/// In-flight window per publisher in the throughput scenario.
const THROUGHPUT_INFLIGHT: u16 = 100;

/// Durations, full or `--quick`.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    throughput: Duration,
    latency: Duration,
    fanin: Duration,
    outage: Duration,
    outage_down: Duration,
    outage_up: Duration,
    crash_backlog: Duration,
}

impl Settings {
    /// The durations, or short ones.
    pub(crate) fn new(quick: bool) -> Self {
        if quick {
            Self {
                throughput: Duration::from_secs(3),
                latency: Duration::from_secs(4),
                fanin: Duration::from_secs(4),
                outage: Duration::from_secs(10),
                outage_down: Duration::from_secs(2),
                outage_up: Duration::from_secs(5),
                crash_backlog: Duration::from_secs(3),
            }
        } else {
            Self {
                throughput: Duration::from_secs(10),
                latency: Duration::from_secs(20),
                fanin: Duration::from_secs(20),
                outage: Duration::from_secs(60),
                outage_down: Duration::from_secs(10),
                outage_up: Duration::from_secs(30),
                crash_backlog: Duration::from_secs(10),
            }
        }
    }
}

/// A started system with its subscriber connected and the path checked end to end.
struct Session {
    dep: Deployment,
    sub: Subscriber,
    /// Edge RSS before any load.
    idle_rss: Option<u64>,
    bench_cpu: f64,
}

impl Session {
    async fn open(kind: Kind, programs: &Programs) -> Result<Self> {
        let dep = Deployment::start(kind, programs).await?;
        let sub = Subscriber::start(dep.cloud_mqtt, &dep.cloud_filter()).await?;
        sub.probe(dep.edge_mqtt, "telemetry/probe").await?;
        // Let the probe's connection go and the programs settle before measuring the idle edge.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let idle_rss = rss(dep.edge.pid());
        let mut session = Self {
            dep,
            sub,
            idle_rss,
            bench_cpu: 0.0,
        };
        session.dep.mark();
        session.bench_cpu = own_usage().cpu_s;
        Ok(session)
    }

    /// Waits until `target` messages were received, or nothing arrived for `quiet`, or `max` passed.
    async fn wait_delivered(&self, target: u64, quiet: Duration, max: Duration) {
        let end = Instant::now() + max;
        let mut last = self.sub.received();
        let mut last_change = Instant::now();
        while self.sub.received() < target && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.sub.received();
            if now != last {
                last = now;
                last_change = Instant::now();
            } else if last_change.elapsed() > quiet {
                break;
            }
        }
    }

    /// Stops everything and computes the common rows.
    async fn close(self, published: &[crate::load::Published]) -> Result<(Rows, Delivery)> {
        let (edge, cloud) = self.dep.usage();
        let bench_cpu = own_usage().cpu_s - self.bench_cpu;
        let receipts = self.sub.finish().await;
        let spans = self.dep.shutdown().await?;
        let delivery = Delivery::compute(published, &receipts);
        let mut rows = Rows::default();
        delivery.rows(&mut rows);
        let system_cpu = edge.cpu_s + cloud.map_or(0.0, |c| c.cpu_s);
        let per_msg =
            (delivery.delivered > 0).then(|| system_cpu / delivery.delivered as f64 * 1e6);
        rows.push("CPU per message (all processes)", per_msg, Fmt::Micros);
        rows.push("edge CPU", Some(edge.cpu_s), Fmt::Secs);
        rows.push("cloud CPU", cloud.map(|c| c.cpu_s), Fmt::Secs);
        rows.push("load generator CPU", Some(bench_cpu), Fmt::Secs);
        rows.push("edge RSS idle", self.idle_rss.map(|v| v as f64), Fmt::Mib);
        rows.push("edge peak RSS", Some(edge.peak_rss as f64), Fmt::Mib);
        rows.push("cloud peak RSS", cloud.map(|c| c.peak_rss as f64), Fmt::Mib);
        rows.push("spans exported", spans.map(|n| n as f64), Fmt::Count);
        Ok((rows, delivery))
    }
}

/// Runs one scenario once on one system and returns its figures.
pub(crate) async fn run(
    scenario: Scenario,
    kind: Kind,
    programs: &Programs,
    s: &Settings,
) -> Result<Rows> {
    match scenario {
        Scenario::Throughput(n) => {
            steady(
                kind,
                programs,
                LoadSpec {
                    publishers: n,
                    rate: None,
                    duration: s.throughput,
                    inflight: THROUGHPUT_INFLIGHT,
                },
            )
            .await
        }
        Scenario::Latency => {
            steady(
                kind,
                programs,
                LoadSpec {
                    publishers: 1,
                    rate: Some(1000.0),
                    duration: s.latency,
                    inflight: 100,
                },
            )
            .await
        }
        Scenario::FanIn => {
            steady(
                kind,
                programs,
                LoadSpec {
                    publishers: 100,
                    rate: Some(10.0),
                    duration: s.fanin,
                    inflight: 10,
                },
            )
            .await
        }
        Scenario::Outage => outage(kind, programs, s).await,
        Scenario::Crash => crash(kind, programs, s).await,
        Scenario::LocalSession => local_session(kind, programs, s).await,
    }
}

/// The latency load with a persistent subscriber at the edge too.
async fn local_session(kind: Kind, programs: &Programs, s: &Settings) -> Result<Rows> {
    let session = Session::open(kind, programs).await?;
    let local = Subscriber::start(session.dep.edge_mqtt, "telemetry/#").await?;
    let spec = LoadSpec {
        publishers: 1,
        rate: Some(1000.0),
        duration: s.latency,
        inflight: 100,
    };
    let publishers = Publishers::start(session.dep.edge_mqtt, &spec).await?;
    let published = publishers.finish().await?;
    let acked = count_acked(&published);
    session
        .wait_delivered(acked, Duration::from_secs(3), Duration::from_secs(60))
        .await;
    let end = Instant::now() + Duration::from_secs(10);
    while local.received() < acked && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let local_receipts = local.finish().await;
    let (mut rows, _) = session.close(&published).await?;
    Delivery::compute(&published, &local_receipts).local_rows(&mut rows);
    fault_rows(&mut rows, None, None);
    Ok(rows)
}

/// Load with no fault: publish for the duration, wait for delivery.
async fn steady(kind: Kind, programs: &Programs, spec: LoadSpec) -> Result<Rows> {
    let session = Session::open(kind, programs).await?;
    let publishers = Publishers::start(session.dep.edge_mqtt, &spec).await?;
    let published = publishers.finish().await?;
    let acked: u64 = count_acked(&published);
    session
        .wait_delivered(acked, Duration::from_secs(3), Duration::from_secs(60))
        .await;
    let (mut rows, _) = session.close(&published).await?;
    fault_rows(&mut rows, None, None);
    Ok(rows)
}

/// Cloud side stopped and started again while the publisher keeps sending.
async fn outage(kind: Kind, programs: &Programs, s: &Settings) -> Result<Rows> {
    let mut session = Session::open(kind, programs).await?;
    let spec = LoadSpec {
        publishers: 1,
        rate: Some(2000.0),
        duration: s.outage,
        inflight: 100,
    };
    let start = Instant::now();
    let publishers = Publishers::start(session.dep.edge_mqtt, &spec).await?;
    tokio::time::sleep_until((start + s.outage_down).into()).await;
    session.dep.stop_cloud().await?;
    tokio::time::sleep_until((start + s.outage_up).into()).await;
    session.dep.start_cloud().await?;
    let back = now_ns();
    let published = publishers.finish().await?;
    session
        .wait_delivered(
            count_acked(&published),
            Duration::from_secs(5),
            Duration::from_secs(60),
        )
        .await;
    let (mut rows, delivery) = session.close(&published).await?;
    fault_rows(
        &mut rows,
        delivery.resume_after(back),
        delivery.drained_after(back),
    );
    Ok(rows)
}

/// Cloud side down, the edge builds a backlog, is SIGKILLed while publishing, restarted; then the cloud
/// side comes back and whatever survived drains.
async fn crash(kind: Kind, programs: &Programs, s: &Settings) -> Result<Rows> {
    let mut session = Session::open(kind, programs).await?;
    session.dep.stop_cloud().await?;
    let spec = LoadSpec {
        publishers: 1,
        rate: Some(2000.0),
        // Still publishing when the kill comes.
        duration: s.crash_backlog + Duration::from_secs(10),
        inflight: 100,
    };
    let publishers = Publishers::start(session.dep.edge_mqtt, &spec).await?;
    tokio::time::sleep(s.crash_backlog).await;
    session.dep.kill_edge().await?;
    let published = publishers.finish().await?;
    session.dep.start_edge().await?;
    session.dep.start_cloud().await?;
    let back = now_ns();
    session
        .wait_delivered(
            count_acked(&published),
            Duration::from_secs(5),
            Duration::from_secs(60),
        )
        .await;
    let (mut rows, delivery) = session.close(&published).await?;
    fault_rows(
        &mut rows,
        delivery.resume_after(back),
        delivery.drained_after(back),
    );
    Ok(rows)
}

fn count_acked(published: &[crate::load::Published]) -> u64 {
    published
        .iter()
        .map(|p| p.acked.iter().filter(|&&a| a).count() as u64)
        .sum()
}

fn fault_rows(rows: &mut Rows, resume: Option<f64>, drained: Option<f64>) {
    rows.push("first delivery after cloud return", resume, Fmt::Secs);
    rows.push("backlog drained after cloud return", drained, Fmt::Secs);
}
