//! Fault scenario 11 of issue 7: a slow uplink (a `tbf` token bucket on a veth pair) for one site, and a
//! stalled consumer on the cloud broker, at the same time.
//!
//! What must hold:
//! - back-pressure lands in the slow site's **disk queue**: its publisher keeps being acknowledged at the
//!   offered rate while the cloud falls behind, and nothing piles up at the hub;
//! - the hub's memory stays bounded: the stalled consumer's backlog and the slow site cost the hub (which
//!   runs the embedded cloud broker in its own process) a bounded amount;
//! - the other site keeps flowing, with one stall no longer than the time the hub holds publishers for a
//!   subscriber that stopped reading (5 s, then it counts as stalled and misses what its log drops);
//! - once the link is fast again everything drains: lost 0, unexpected 0, duplicates 0, order kept.
//!
//! Needs root (network namespace, veth, `tc`): CI runs as root; elsewhere the test says it did not run.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshbridge_tests::bins::{bin, EDGE_AGENT};
use meshbridge_tests::faults::{self, distinct_from, longest_stall, scaled, ScenarioLine};
use meshbridge_tests::mesh::{wait_ready, Mesh};
use meshbridge_tests::mqtt::{Collector, MsgId, PublishPlan, Publisher, Report};
use meshbridge_tests::netns::Netns;
use meshbridge_tests::prereq;
use meshbridge_tests::process::Proc;
use meshbridge_tests::spec::BrokerSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Offered rate of the slow site's publisher.
const RATE: u32 = 400;
/// Offered rate of the fast site's publisher: it carries most of the volume through the hub's broker.
const FAST_RATE: u32 = 1500;
/// Payload filler: 1 KiB messages, so the slow site offers ~3.3 Mbit/s against a 1 Mbit/s link.
const PAD: usize = 1024;
/// The slow link.
const SLOW_RATE: &str = "1mbit";
const MIB: u64 = 1024 * 1024;
/// How long the hub's embedded broker holds publishers for a subscriber that reads nothing while close
/// to the end of its log (`PRESSURE_STALLED` in vendor/rumqttd/src/router/routing.rs).
const STALLED_AFTER: Duration = Duration::from_secs(5);

/// The hub's `broker.max_log_per_filter` (MiB): the run publishes several times that per filter (CI:
/// ~15 MiB, soak: ~110 MiB), so the bound is what is tested, not the run's volume. It must still hold
/// the slow site's backlog as it drains in a burst (CI: ~2.5 MiB, soak: ~17 MiB), or the test's own
/// collector, falling that far behind, would lose messages to the log's trimming.
fn hub_log_per_filter_mib() -> u64 {
    scaled(4, 32)
}

/// How much the hub's resident memory may grow over the run: two filters' logs (the collector's `acme/#`
/// and the stalled consumer's `acme/plant1/#`) plus 8 MiB for connections and allocator slack. Without
/// the bound the hub's broker kept everything published per filter: growth was the volume times the
/// filters (91 MiB for 48 MB published in a soak run).
fn hub_rss_growth_bound() -> u64 {
    (2 * hub_log_per_filter_mib() + 8) * MIB
}

/// Resident memory of `pid`, from `/proc`.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Samples the resident memory of `pid` every 100 ms until `stop`; returns the peak.
fn watch_rss(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let peak = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            if let Some(rss) = rss_bytes(pid) {
                peak.fetch_max(rss, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak.load(Ordering::Relaxed)
    })
}

/// An MQTT 3.1.1 subscriber that subscribes to `filter` at QoS 1 and then never reads again: the broker's
/// writes to it block once the socket buffers are full. Kept open by holding the returned stream.
async fn stalled_consumer(addr: SocketAddr, filter: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut s = socket
        .connect(addr)
        .await
        .expect("connect stalled consumer");
    let id = b"stalled-consumer";
    let mut connect = vec![0x10, (10 + 2 + id.len()) as u8];
    connect.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60]);
    connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
    connect.extend_from_slice(id);
    s.write_all(&connect).await.expect("CONNECT");
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "stalled consumer refused");
    let f = filter.as_bytes();
    let mut subscribe = vec![0x82, (2 + 2 + f.len() + 1) as u8, 0, 1];
    subscribe.extend_from_slice(&(f.len() as u16).to_be_bytes());
    subscribe.extend_from_slice(f);
    subscribe.push(1);
    s.write_all(&subscribe).await.expect("SUBSCRIBE");
    let mut suback = [0u8; 5];
    s.read_exact(&mut suback).await.expect("SUBACK");
    assert_eq!(suback[0], 0x90, "no SUBACK for the stalled consumer");
    s
}

/// (11) One site behind a 1 Mbit/s link offering ~3 Mbit/s, a cloud consumer that stopped reading, and a
/// second site on a fast link carrying ~12 Mbit/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_link_and_stalled_consumer() {
    const NAME: &str = "slow_link_stalled_consumer";
    if prereq::needs_root(
        NAME,
        "create a network namespace and shape its link with tc",
    ) {
        return;
    }
    let started = Instant::now();
    let ns = Netns::create().unwrap_or_else(|e| panic!("{NAME}: {e}"));
    let mesh = Mesh::new(&["line1", "line2"]);
    let cloud_listen = meshbridge_tests::net::free_tcp();
    let mut hub_spec = mesh.hub_spec(
        BrokerSpec::Embedded {
            listen: cloud_listen,
        },
        &["line1", "line2"],
    );
    // A small log per filter, so that the run publishes several times what the hub's broker may keep, and
    // the memory bound is tested, not just the run's volume.
    hub_spec.broker_extra.push(format!(
        "max_log_per_filter = \"{}MiB\"",
        hub_log_per_filter_mib()
    ));
    // Reachable from the namespace (line1) and from loopback (line2).
    hub_spec.quic = SocketAddr::new([0, 0, 0, 0].into(), hub_spec.quic.port());
    let hub = mesh.start_hub(&hub_spec).await;
    let hub_pid = hub.pid().expect("hub pid");

    // line1: inside the namespace, its broker on the namespace's address, its uplink over the veth pair.
    let slow_broker = BrokerSpec::Embedded {
        listen: ns.inner_addr(1884),
    };
    let mut slow_spec = mesh.agent_spec("line1", slow_broker.clone(), &hub_spec);
    slow_spec.hub = SocketAddr::new(ns.host_ip(), hub_spec.quic.port());
    let config = slow_spec.write(&mesh.path().join("line1.toml"));
    let (prefix, mut args) = ns.command_prefix();
    args.push(bin(EDGE_AGENT).to_string_lossy().into_owned());
    args.extend(["--config".to_owned(), config.to_string_lossy().into_owned()]);
    let mut slow_agent = Proc::start_args("line1", &prefix, &args, mesh.path());
    wait_ready(&mut slow_agent, &slow_broker).await;

    let fast_spec = mesh.agent_spec("line2", BrokerSpec::embedded(), &{
        let mut local = hub_spec.clone();
        local.quic = SocketAddr::new([127, 0, 0, 1].into(), hub_spec.quic.port());
        local
    });
    let fast_agent = mesh.start_agent("line2", &fast_spec).await;

    let cloud = Collector::start(cloud_listen, "cloud-sub", &["acme/#"], false).await;
    let stalled = stalled_consumer(cloud_listen, "acme/plant1/#").await;

    // Both paths proven before the fault, so the numbers below measure the fault and not start-up.
    let secs = scaled(8.0, 60.0);
    let count = (f64::from(RATE) * secs) as u64;
    let plan_for = |name: &str, rate: u32| {
        let count = (f64::from(rate) * secs) as u64;
        let mut plan = PublishPlan::new(name, "telemetry/robot5/temp", count).rate(rate);
        plan.pad = PAD;
        plan.deadline = Duration::from_secs_f64(secs) + Duration::from_secs(60);
        plan
    };
    let rss_before = rss_bytes(hub_pid).expect("hub RSS");
    let stop_rss = Arc::new(AtomicBool::new(false));
    let rss_watch = watch_rss(hub_pid, stop_rss.clone());

    ns.limit_uplink(SLOW_RATE)
        .unwrap_or_else(|e| panic!("{NAME}: {e}"));
    let publish_start = Instant::now();
    let slow_pub = Publisher::start(slow_broker.client_addr(), plan_for("slow", RATE));
    let fast_pub = Publisher::start(fast_spec.broker.client_addr(), plan_for("fast", FAST_RATE));

    // The fast site must keep flowing while the slow one is shaped and the consumer is stalled: watch
    // the stall of the whole cloud stream while both publishers run (the fast site alone delivers RATE/s).
    let ((slow_outcome, fast_outcome), stall) = longest_stall(&cloud, async {
        let fast = fast_pub.finish().await;
        let slow = slow_pub.finish().await;
        (slow, fast)
    })
    .await;
    let publish_secs = publish_start.elapsed().as_secs_f64();
    let received = cloud.received();
    let slow_delivered_while_shaped = distinct_from("slow", &received);
    let fast_delivered = distinct_from("fast", &received);
    let slow_acked = slow_outcome.acked.len();
    let fast_acked = fast_outcome.acked.len();
    eprintln!(
        "{NAME}: after {publish_secs:.1}s of publishing: slow acked {slow_acked}, delivered \
         {slow_delivered_while_shaped}; fast acked {fast_acked}, delivered {fast_delivered}; longest \
         stall {stall:?}; link: {}",
        ns.uplink_stats()
    );

    // The edge acknowledged the slow site at the offered rate: back-pressure did not reach its
    // publishers, so what the link could not carry is held in line1's disk queue, not at the hub.
    assert!(
        slow_acked as u64 >= count * 9 / 10,
        "{NAME}: the slow site's publisher was held back: {slow_acked} of {count} acknowledged"
    );
    assert!(
        slow_delivered_while_shaped * 10 < slow_acked * 8,
        "{NAME}: the link was not the bottleneck ({slow_delivered_while_shaped} of {slow_acked} \
         delivered while shaped): the scenario did not build a backlog"
    );
    // The fast site kept flowing: nearly all of it is already delivered, with no long gap.
    let fast_ids: BTreeSet<MsgId> = fast_outcome.acked_ids().collect();
    assert!(
        cloud
            .wait_for_all(&fast_ids, Duration::from_secs(5))
            .await,
        "{NAME}: the fast site did not keep flowing: {} of {fast_acked} delivered within 5 s of its end",
        distinct_from("fast", &cloud.received())
    );
    // One stall is expected: while the stalled consumer is close to the end of its log, the hub holds
    // every publisher for it (issue 10: a slow subscriber must not lose messages), until it has read
    // nothing for 5 s (`PRESSURE_STALLED`, vendor/rumqttd/src/router/routing.rs) and counts as stalled.
    assert!(
        stall < STALLED_AFTER + Duration::from_secs(2),
        "{NAME}: the cloud stream stalled for {stall:?} while the fast site was publishing"
    );

    // Lift the shaping: the slow site's backlog drains from its disk queue.
    ns.unlimit_uplink()
        .unwrap_or_else(|e| panic!("{NAME}: {e}"));
    let lifted = Instant::now();
    let slow_ids: BTreeSet<MsgId> = slow_outcome.acked_ids().collect();
    assert!(
        cloud.wait_for_all(&slow_ids, Duration::from_secs(60)).await,
        "{NAME}: the slow site's backlog did not drain within 60 s of the link being lifted"
    );
    let recovery = lifted.elapsed();
    cloud
        .settle(Duration::from_secs(1), Duration::from_secs(5))
        .await;
    stop_rss.store(true, Ordering::Relaxed);
    let rss_peak = rss_watch.await.expect("RSS watcher");
    drop(stalled);

    let received = cloud.received();
    let report = Report::new(&[&slow_outcome, &fast_outcome], &received);
    let mut line = ScenarioLine::new(NAME, &slow_outcome, &report, &received, PAD, recovery);
    line.sent += fast_outcome.acked.len() + fast_outcome.unconfirmed.len();
    line.unexpected = faults::unexpected(&[&slow_outcome, &fast_outcome], &received, PAD);
    line.push("slow_delivered_while_shaped", slow_delivered_while_shaped);
    line.push("longest_stall", format!("{:.2}s", stall.as_secs_f64()));
    line.push("hub_rss_before_mib", rss_before / MIB);
    line.push("hub_rss_peak_mib", rss_peak / MIB);
    line.push("secs", format!("{:.1}", started.elapsed().as_secs_f64()));
    line.print();
    report.assert_no_loss();
    assert_eq!(line.unexpected, 0, "delivered but never sent: {line}");
    assert_eq!(report.duplicates_by_id, 0, "duplicates: {line}");
    assert_eq!(report.reordered, 0, "reordered: {line}");
    assert!(
        rss_peak.saturating_sub(rss_before) <= hub_rss_growth_bound(),
        "{NAME}: the hub's memory grew by {} MiB (bound {} MiB): {line}",
        rss_peak.saturating_sub(rss_before) / MIB,
        hub_rss_growth_bound() / MIB
    );
    drop(fast_agent);
    drop(slow_agent);
    drop(hub);
}
