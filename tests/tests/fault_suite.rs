//! The fault-injection suite of issue 7: "nothing acknowledged is ever dropped or stuck".
//!
//! Every scenario runs the real hub and agent, a paced publisher at the edge and a subscriber on a cloud
//! broker that outlives the hub ([`FaultMesh`]). Link faults go through a loopback [`UdpProxy`] between
//! agent and hub; process faults are SIGKILL/SIGTERM of the real programs. After each run:
//!
//! - `lost` (acknowledged to the publisher, never delivered) is 0,
//! - `unexpected` (delivered, never sent, or altered) is 0,
//! - `duplicates` (deliveries whose `meshbridge-id` was delivered before) is 0 for graceful scenarios and
//!   at most one uplink window (`batch_max_messages × window`) where the hub is killed,
//! - no message of a publisher arrives after a later one of the same publisher.
//!
//! Each scenario prints one line, `scenario=<name> sent=.. delivered=.. lost=.. unexpected=..
//! duplicates=.. recovery=<seconds>` (then extra fields), where recovery is the time from the end of the
//! fault until the cloud held as many distinct messages as had been acknowledged when it ended.
//!
//! Durations are scaled for CI (faults of a few seconds); `FAULT_SUITE_SOAK=1` runs the long ones.

use std::time::{Duration, Instant};

use meshbridge_tests::faults::{self, caught_up, longest_stall, scaled, FaultMesh, ScenarioLine};
use meshbridge_tests::mesh::{restart, STOP_TIMEOUT};
use meshbridge_tests::mqtt::{Collector, PublishOutcome, PublishPlan, Publisher, Report};
use meshbridge_tests::process::Proc;
use meshbridge_tests::proxy::{seed_for, Dir, Faults, UdpProxy};
use meshbridge_tests::spec::{AgentSpec, BrokerSpec};

/// Messages per second of every publisher.
const RATE: u32 = 300;
/// Acknowledged messages before a fault is injected.
const BEFORE_FAULT: u64 = 300;
/// How long the cloud may take to receive every acknowledged message once the publisher is done.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const TOPIC: &str = "telemetry/robot5/temp";
const SITE: &str = "line1";

/// How long a timed fault lasts: 3 s in CI, 30 s in the soak.
fn fault_duration() -> Duration {
    scaled(Duration::from_secs(3), Duration::from_secs(30))
}

/// A plan of `secs` seconds at [`RATE`], with room for the faults in its deadline.
fn plan(secs: f64) -> PublishPlan {
    let count = (f64::from(RATE) * secs) as u64;
    let mut plan = PublishPlan::new("pub", TOPIC, count).rate(RATE);
    plan.deadline = Duration::from_secs_f64(secs) + Duration::from_secs(60);
    plan
}

/// A fault mesh with an agent whose uplink goes through a proxy seeded for `scenario`.
struct Proxied {
    fm: FaultMesh,
    proxy: UdpProxy,
    spec: AgentSpec,
    agent: Proc,
}

async fn proxied(scenario: &str) -> Proxied {
    let fm = FaultMesh::start(SITE).await;
    let proxy = UdpProxy::start(fm.hub_spec.quic, seed_for(scenario)).await;
    eprintln!(
        "{scenario}: proxy {} -> hub {}, seed {} (FAULT_SUITE_SEED={} replays it)",
        proxy.addr(),
        proxy.target(),
        proxy.seed(),
        proxy.seed()
    );
    let mut spec = fm
        .mesh
        .agent_spec(SITE, BrokerSpec::embedded(), &fm.hub_spec);
    spec.hub = proxy.addr();
    // To look inside a failure: e.g. FAULT_AGENT_LOG="info,quinn_proto::connection=trace".
    if let Ok(directive) = std::env::var("FAULT_AGENT_LOG") {
        spec.log = directive;
    }
    let agent = fm.mesh.start_agent(SITE, &spec).await;
    Proxied {
        fm,
        proxy,
        spec,
        agent,
    }
}

/// A fault mesh with an agent connected straight to the hub.
async fn direct() -> (FaultMesh, AgentSpec, Proc) {
    let fm = FaultMesh::start(SITE).await;
    let spec = fm
        .mesh
        .agent_spec(SITE, BrokerSpec::embedded(), &fm.hub_spec);
    let agent = fm.mesh.start_agent(SITE, &spec).await;
    (fm, spec, agent)
}

/// Waits for every acknowledged message, then checks and prints the scenario's line. `max_duplicates` is
/// 0 for graceful scenarios and one uplink window where a crash may make the hub publish a batch twice.
async fn conclude(
    name: &str,
    fm: &FaultMesh,
    outcome: &PublishOutcome,
    pad: usize,
    recovery: Duration,
    max_duplicates: usize,
    extra: &[(&str, String)],
) -> (ScenarioLine, Report) {
    let report = faults::settle_report(&fm.cloud, outcome, name, DRAIN_TIMEOUT).await;
    let received = fm.cloud.received();
    let mut line = ScenarioLine::new(name, outcome, &report, &received, pad, recovery);
    for (k, v) in extra {
        line.push(k, v);
    }
    line.print();
    assert_eq!(line.lost, 0, "{line}\n{report}");
    assert_eq!(line.unexpected, 0, "delivered but never sent: {line}");
    assert!(
        line.duplicates <= max_duplicates,
        "{} duplicates by meshbridge-id, at most {max_duplicates} allowed: {line}",
        line.duplicates
    );
    assert_eq!(
        report.reordered, 0,
        "a publisher's messages arrived out of order: {line}"
    );
    assert_eq!(
        report.missing_id, 0,
        "deliveries without meshbridge-id: {line}"
    );
    (line, report)
}

/// Waits until the cloud caught up with `acked_at_end` acknowledged messages; the recovery time.
async fn recovery_since(cloud: &Collector, acked_at_end: u64, name: &str) -> Duration {
    caught_up(cloud, "pub", acked_at_end, DRAIN_TIMEOUT)
        .await
        .unwrap_or_else(|| {
            panic!(
                "{name}: the cloud did not catch up with {acked_at_end} acknowledged messages within \
                 {DRAIN_TIMEOUT:?} of the fault's end (stuck)"
            )
        })
}

fn proxy_counts(proxy: &UdpProxy) -> Vec<(&'static str, String)> {
    vec![
        ("up", format!("[{}]", proxy.counts(Dir::AgentToHub))),
        ("down", format!("[{}]", proxy.counts(Dir::HubToAgent))),
        ("seed", proxy.seed().to_string()),
    ]
}

/// Blackholes the given directions for the fault duration under load, heals, and checks delivery.
async fn link_cut(name: &str, dirs: &[Dir]) {
    let started = Instant::now();
    let p = proxied(name).await;
    let fault = fault_duration();
    let plan = plan(1.0 + fault.as_secs_f64() + 2.0);
    let pad = plan.pad;
    let publisher = Publisher::start(p.spec.broker.client_addr(), plan);
    publisher
        .wait_acked(BEFORE_FAULT, Duration::from_secs(20))
        .await;
    for &dir in dirs {
        p.proxy.blackhole(dir, true);
    }
    let cut_at = p.fm.cloud.count();
    tokio::time::sleep(fault).await;
    let during = p.fm.cloud.count() - cut_at;
    p.proxy.heal();
    let acked_at_heal = publisher.acked();
    let recovery = recovery_since(&p.fm.cloud, acked_at_heal, name).await;
    let outcome = publisher.finish().await;
    assert!(
        outcome.refused.is_empty(),
        "the edge refused messages during the cut: {outcome:?}"
    );
    let mut extra = proxy_counts(&p.proxy);
    extra.push(("during_cut", during.to_string()));
    extra.push(("secs", format!("{:.1}", started.elapsed().as_secs_f64())));
    conclude(name, &p.fm, &outcome, pad, recovery, 0, &extra).await;
    drop(p.agent);
}

/// (1) Agent and hub partitioned (both directions blackholed) under paced load, then healed: the edge
/// keeps acknowledging, and after the heal everything arrives once. Graceful: no duplicate by id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_then_heal() {
    link_cut("partition", &Dir::BOTH).await;
}

/// (4) Acks lost: only hub→agent is blackholed, so the hub receives and publishes batches whose acks never
/// come back; after the heal the agent resends them and the hub's dedup drops the resends. Graceful: no
/// duplicate by id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_lost_then_healed() {
    link_cut("acks_lost", &[Dir::HubToAgent]).await;
}

/// Random loss of `p` in both directions for the whole run: [`random_loss_run`], whose stall must stay
/// under [`STALL_BOUND`]. A run that stalls longer gets one more run with a fresh seed, which must not:
/// at 30 % loss both ways QUIC's probe timeout doubles with every probe round lost (about one in three
/// there), and about one run in fifteen strings enough of them together to pass 2 s (session 24: 5 of 76
/// runs over two builds, 2.0-3.25 s, the same with and without that session's ack changes). What issue 7
/// mended (the link stopping until the idle timeout, 16.4 s) still fails both runs. Loss and duplicates
/// get no second chance: every run checks them. The rate is checked in every run without such a stall;
/// a stalled run's rate falls with its stall (session 25, CI: a 3.8 s stall with a reconnect, 112 of the
/// 150 msg/s required), so there the second run must meet both.
async fn random_loss(name: &str, p_loss: f64, min_rate_share: f64) {
    let min_rate = f64::from(RATE) * min_rate_share;
    let (stall, rate) = random_loss_run(name, p_loss).await;
    if stall < STALL_BOUND {
        assert!(
            rate >= min_rate,
            "{name}: {rate:.0} msg/s delivered of {RATE} offered (at least {min_rate:.0} expected)"
        );
        return;
    }
    eprintln!(
        "{name}: deliveries stopped for {stall:?} (bound {STALL_BOUND:?}), {rate:.0} msg/s; running again \
         with a fresh seed"
    );
    let again = format!("{name}_again");
    let (stall_again, rate_again) = random_loss_run(&again, p_loss).await;
    assert!(
        stall_again < STALL_BOUND,
        "{name}: deliveries stopped for {stall:?}, then for {stall_again:?} in a second run, under random \
         loss (bound {STALL_BOUND:?})"
    );
    assert!(
        rate_again >= min_rate,
        "{again}: {rate_again:.0} msg/s delivered of {RATE} offered (at least {min_rate:.0} expected)"
    );
}

/// One run of [`random_loss`]; returns the longest stall of deliveries and the rate delivered over the
/// run (publishing and draining), which [`random_loss`] holds to a share of the offered rate.
async fn random_loss_run(name: &str, p_loss: f64) -> (Duration, f64) {
    let started = Instant::now();
    let p = proxied(name).await;
    p.proxy.set_both(Faults::loss(p_loss));
    let secs = scaled(5.0, 30.0);
    let plan = plan(secs);
    let pad = plan.pad;
    let publish_start = Instant::now();
    let publisher = Publisher::start(p.spec.broker.client_addr(), plan);
    // The stall is measured over the whole run: publishing, then draining every acknowledged message.
    let ((outcome, recovery), stall) = longest_stall(&p.fm.cloud, async {
        let outcome = publisher.finish().await;
        let recovery = recovery_since(&p.fm.cloud, outcome.acked.len() as u64, name).await;
        (outcome, recovery)
    })
    .await;
    let elapsed = publish_start.elapsed();
    let delivered = faults::distinct_from("pub", &p.fm.cloud.received());
    let mut extra = proxy_counts(&p.proxy);
    extra.push((
        "rate",
        format!("{:.0}msg/s", delivered as f64 / elapsed.as_secs_f64()),
    ));
    extra.push(("longest_stall", format!("{:.2}s", stall.as_secs_f64())));
    // Reconnects under loss cost a handshake through the same loss: the line says how many there were.
    extra.push((
        "connects",
        p.agent
            .log_text()
            .matches("uplink connected")
            .count()
            .to_string(),
    ));
    extra.push(("secs", format!("{:.1}", started.elapsed().as_secs_f64())));
    conclude(name, &p.fm, &outcome, pad, recovery, 0, &extra).await;
    // Issue 7 hole 12: the link keeps moving under loss (it used to stop until the 15 s idle timeout,
    // 16.4 s at 30 %). Stalls over 2 s had two causes, both mended in the transports
    // (`edge-agent/src/tls.rs`, `cloud-hub/src/tls.rs`): probe timeouts built on QUIC's 25 ms ACK delay,
    // and the agent's 2 s idle timeout firing while its own probes backed off (then a handshake through
    // the same loss). The caller bounds both the stall and the delivered rate.
    let rate = delivered as f64 / elapsed.as_secs_f64();
    drop(p.agent);
    (stall, rate)
}

/// Longest stall of deliveries tolerated under random loss: issue 7's target for hole 12. Measured
/// 0.15-1.85 s over 32 runs of the 30 % scenario on a quiet machine when it was set, over 2 s in 5 of 76 in
/// session 24 (see [`random_loss`] and the README).
const STALL_BOUND: Duration = Duration::from_secs(2);

/// (2a) 10 % random loss both ways: nothing lost, nothing duplicated, no stall of 2 s, and at least 90 %
/// of the offered rate delivered over the run (measured 293 of 300 msg/s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_loss_10_percent() {
    random_loss("loss_10pct", 0.10, 0.9).await;
}

/// (2b) 30 % random loss both ways: nothing lost, nothing duplicated, no stall of 2 s (one more run when
/// there was one, see [`random_loss`]), at least half the offered rate delivered over the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_loss_30_percent() {
    random_loss("loss_30pct", 0.30, 0.5).await;
}

/// (3) A bad but working link for the whole run: 30 ms ± 25 ms per packet (so packets overtake each
/// other), 10 % explicitly reordered, 5 % duplicated, both ways. QUIC hides all of it; the check is that
/// nothing above it is lost, duplicated or reordered. Graceful: no duplicate by id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_reorder_and_duplication() {
    let name = "jitter_reorder_dup";
    let started = Instant::now();
    let p = proxied(name).await;
    p.proxy.set_both(Faults {
        delay: Duration::from_millis(30),
        jitter: Duration::from_millis(25),
        reorder: 0.10,
        duplicate: 0.05,
        ..Faults::default()
    });
    let plan = plan(scaled(5.0, 30.0));
    let pad = plan.pad;
    let publisher = Publisher::start(p.spec.broker.client_addr(), plan);
    let outcome = publisher.finish().await;
    let recovery = recovery_since(&p.fm.cloud, outcome.acked.len() as u64, name).await;
    let counts = p.proxy.counts(Dir::AgentToHub);
    assert!(
        counts.duplicated > 0 && counts.reordered > 0,
        "the proxy did not impair the link: {counts}"
    );
    let mut extra = proxy_counts(&p.proxy);
    extra.push(("secs", format!("{:.1}", started.elapsed().as_secs_f64())));
    conclude(name, &p.fm, &outcome, pad, recovery, 0, &extra).await;
    drop(p.agent);
}

/// (5) The agent is SIGKILLed under load 20 times in a row, a few hundred milliseconds after each restart,
/// then left running: every message the edge acknowledged arrives. The hub (and its dedup) never stops,
/// so a batch the killed agent resends under the same seq is dropped there: no duplicate by id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_twenty_times() {
    let name = "agent_sigkill_x20";
    let started = Instant::now();
    let (fm, spec, mut agent) = direct().await;
    let kills: u32 = scaled(20, 100);
    let plan = plan(scaled(20.0, 90.0));
    let pad = plan.pad;
    let publisher = Publisher::start(spec.broker.client_addr(), plan);
    publisher
        .wait_acked(BEFORE_FAULT, Duration::from_secs(20))
        .await;
    // Deterministic intervals from the scenario's seed: 150..650 ms of running between kills.
    let mut x = seed_for(name);
    let mut acked_at_kills = Vec::new();
    let (recovery, stall) = longest_stall(&fm.cloud, async {
        for _ in 0..kills {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            tokio::time::sleep(Duration::from_millis(150 + (x >> 33) % 500)).await;
            agent.kill9();
            acked_at_kills.push(publisher.acked());
            restart(&mut agent, &spec.broker).await;
        }
        let acked_at_last = publisher.acked();
        recovery_since(&fm.cloud, acked_at_last, name).await
    })
    .await;
    let outcome = publisher.finish().await;
    assert!(
        outcome.acked.len() as u64 > *acked_at_kills.last().unwrap_or(&0),
        "publishing resumed after the last restart: {outcome:?}"
    );
    // Each restart's connection waits for the one it replaces (hub `REPLACE_WAIT`); printed because it is
    // what the recovery time is made of.
    let slow_replacements = fm
        .hub
        .log_text()
        .matches("replaced connection did not finish in time")
        .count();
    let extra = [
        ("kills", kills.to_string()),
        ("slow_replacements", slow_replacements.to_string()),
        ("longest_stall", format!("{:.2}s", stall.as_secs_f64())),
        ("seed", seed_for(name).to_string()),
        ("unconfirmed", outcome.unconfirmed.len().to_string()),
        ("secs", format!("{:.1}", started.elapsed().as_secs_f64())),
    ];
    conclude(name, &fm, &outcome, pad, recovery, 0, &extra).await;
}

/// (9) The hub is SIGKILLed under load and restarted: nothing lost; the hub may publish the batches it had
/// not yet recorded in its dedup state again, so duplicates by id are bounded by one uplink window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_sigkill_and_restart() {
    let name = "hub_sigkill";
    let started = Instant::now();
    let (mut fm, spec, _agent) = direct().await;
    let plan = plan(1.0 + 1.0 + 3.0);
    let pad = plan.pad;
    let publisher = Publisher::start(spec.broker.client_addr(), plan);
    publisher
        .wait_acked(BEFORE_FAULT, Duration::from_secs(20))
        .await;
    let (cloud, hub, hub_broker) = (&fm.cloud, &mut fm.hub, &fm.hub_spec.broker);
    let (recovery, stall) = longest_stall(cloud, async {
        hub.kill9();
        tokio::time::sleep(Duration::from_secs(1)).await;
        restart(hub, hub_broker).await;
        let acked_at_restart = publisher.acked();
        recovery_since(cloud, acked_at_restart, name).await
    })
    .await;
    let outcome = publisher.finish().await;
    let window = spec.window_messages();
    let extra = [
        ("window", window.to_string()),
        ("longest_stall", format!("{:.2}s", stall.as_secs_f64())),
        ("secs", format!("{:.1}", started.elapsed().as_secs_f64())),
    ];
    let (line, report) = conclude(name, &fm, &outcome, pad, recovery, window, &extra).await;

    // The agent never stopped and the publisher never resent: every duplicate is a hub resend.
    assert_eq!(
        report.duplicates_by_payload, report.duplicates_by_id,
        "{line}"
    );
}

/// (10) The agent gets SIGTERM under load: it exits cleanly, and once restarted resumes from the hub's
/// last ack: nothing lost, and nothing the hub had acknowledged is published again (no duplicate by id,
/// none by payload either, since the publisher never resends). The hub's log shows the agent reconnecting
/// with its durable ack equal to the hub's mark. Recovery (from the restart until everything acknowledged
/// before the stop arrived) is 0 when the clean stop forwarded all of it before exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigterm_and_restart() {
    let name = "agent_sigterm";
    let started = Instant::now();
    let (fm, spec, mut agent) = direct().await;
    let plan = plan(1.0 + 1.0 + 3.0);
    let pad = plan.pad;
    let publisher = Publisher::start(spec.broker.client_addr(), plan);
    publisher
        .wait_acked(BEFORE_FAULT, Duration::from_secs(20))
        .await;
    let stop = Instant::now();
    let status = agent.terminate(STOP_TIMEOUT).await;
    let stop_took = stop.elapsed();
    assert!(
        status.success(),
        "the agent exits cleanly on SIGTERM: {status}"
    );
    let acked_at_stop = publisher.acked();
    tokio::time::sleep(Duration::from_secs(1)).await;
    restart(&mut agent, &spec.broker).await;
    let recovery = recovery_since(&fm.cloud, acked_at_stop, name).await;
    let outcome = publisher.finish().await;
    // The hub logs, per connection, the agent's own durable ack and its own mark: after a clean stop they
    // are equal, i.e. the agent had recorded every ack before exiting and resumes exactly there.
    let hub_log = fm.hub.log_text();
    let reconnect = hub_log
        .lines()
        .rfind(|l| l.contains("agent connected"))
        .expect("the hub logged the agent's reconnection");
    let field = |key: &str| -> u64 {
        reconnect
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {reconnect:?}"))
    };
    let (agent_last_acked, hub_high_water) = (field("agent_last_acked="), field("hub_high_water="));
    let extra = [
        ("agent_last_acked", agent_last_acked.to_string()),
        ("hub_high_water", hub_high_water.to_string()),
        ("stop", format!("{:.2}s", stop_took.as_secs_f64())),
        ("secs", format!("{:.1}", started.elapsed().as_secs_f64())),
    ];
    let (line, report) = conclude(name, &fm, &outcome, pad, recovery, 0, &extra).await;
    assert_eq!(report.duplicates_by_payload, 0, "{line}");
    assert_eq!(
        agent_last_acked, hub_high_water,
        "the agent stopped without recording the hub's last ack: {reconnect}"
    );
}

/// Raw MQTT 3.1.1 bytes for the input scenarios, written by hand because client libraries refuse to send
/// them.
mod raw {
    use std::net::SocketAddr;
    use std::time::Duration;

    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// MQTT's variable-length "remaining length".
    pub(super) fn remaining_length(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut byte = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if n == 0 {
                return out;
            }
        }
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![first];
        p.extend(remaining_length(body.len()));
        p.extend_from_slice(body);
        p
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut out = u16::try_from(s.len())
            .expect("short string")
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(s);
        out
    }

    /// CONNECT, MQTT 3.1.1, clean session, 60 s keep-alive, with header flags `flags` (0 is the only
    /// valid value).
    pub(super) fn connect(client_id: &str, flags: u8) -> Vec<u8> {
        let mut body = string(b"MQTT");
        body.extend([4, 0x02, 0, 60]);
        body.extend(string(client_id.as_bytes()));
        packet(0x10 | flags, &body)
    }

    /// PUBLISH at QoS 1 with packet id 1 and a topic of arbitrary bytes.
    pub(super) fn publish_qos1(topic: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut body = string(topic);
        body.extend([0, 1]);
        body.extend_from_slice(payload);
        packet(0x32, &body)
    }

    /// How a raw connection ended.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) enum End {
        /// The agent closed it (EOF or reset); `acked` if a success PUBACK came first.
        Closed { acked: bool },
        /// Still open after the timeout.
        Open { acked: bool },
    }

    /// Connects to `addr`, optionally completes a CONNECT handshake first, writes `bytes`, and reads until
    /// the agent closes the connection (or `timeout`).
    pub(super) async fn send(
        addr: SocketAddr,
        handshake: bool,
        bytes: &[u8],
        timeout: Duration,
    ) -> End {
        let mut s = TcpStream::connect(addr).await.expect("connect to the edge");
        if handshake {
            // A fresh client id each time: reusing the id of a connection the agent has just closed
            // raced with that close once (EOF instead of CONNACK), which is not what this tests.
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let id = format!("raw{}", NEXT.fetch_add(1, Ordering::Relaxed));
            s.write_all(&connect(&id, 0)).await.expect("write CONNECT");
            let mut connack = [0u8; 4];
            tokio::time::timeout(timeout, s.read_exact(&mut connack))
                .await
                .expect("CONNACK in time")
                .expect("read CONNACK");
            assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
        }
        // A write may fail once the agent closed the connection mid-way: that is the expected outcome.
        let _ = s.write_all(bytes).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Err(_) => {
                    return End::Open {
                        acked: puback_ok(&got),
                    }
                }
                Ok(Ok(0) | Err(_)) => {
                    return End::Closed {
                        acked: puback_ok(&got),
                    }
                }
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Whether `got` holds a PUBACK (3.1.1: always success) for packet id 1.
    fn puback_ok(got: &[u8]) -> bool {
        got.windows(4).any(|w| w == [0x40, 2, 0, 1])
    }
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// (13) Malformed input on the agent's MQTT port: each bad connection is closed, the agent stays up with
/// bounded memory, and a normal publish afterwards still arrives (graceful: no duplicate by id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_mqtt_input_is_refused_and_harmless() {
    let name = "malformed_input";
    let started = Instant::now();
    let (fm, spec, mut agent) = direct().await;
    let edge = spec.broker.client_addr();
    let pid = agent.pid().expect("agent running");
    let rss_before = rss_kib(pid);
    let hundred_mb = {
        let mut p = vec![0x30];
        p.extend(raw::remaining_length(100 * 1024 * 1024));
        p.extend(std::iter::repeat_n(0xAB, 64 * 1024));
        p
    };
    let mut garbage_length = vec![0x30, 0x80, 0x80, 0x80, 0x80];
    garbage_length.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    let cases: Vec<(&str, bool, Vec<u8>)> = vec![
        ("reserved packet type 0", false, vec![0x00, 0x00]),
        (
            "reserved packet type 0 after CONNECT",
            true,
            vec![0x00, 0x00],
        ),
        (
            "CONNECT with header flags 0001",
            false,
            raw::connect("bad-flags", 0x01),
        ),
        (
            "SUBSCRIBE with header flags 0000",
            true,
            vec![0x80, 6, 0, 1, 0, 1, b'a', 1],
        ),
        (
            "remaining length 80 80 80 80, then garbage",
            false,
            garbage_length.clone(),
        ),
        (
            "remaining length 80 80 80 80 after CONNECT",
            true,
            garbage_length,
        ),
        (
            "PUBLISH with an empty topic",
            true,
            raw::publish_qos1(b"", b"empty:0:"),
        ),
        (
            "PUBLISH with an invalid UTF-8 topic",
            true,
            raw::publish_qos1(b"telemetry/\xC3\x28", b"utf8:0:"),
        ),
        ("PUBLISH claiming 100 MB", true, hundred_mb),
    ];
    let mut open = Vec::new();
    let mut acked = Vec::new();
    for (what, handshake, bytes) in &cases {
        let end = raw::send(edge, *handshake, bytes, Duration::from_secs(5)).await;
        eprintln!("{name}: {what}: {end:?}");
        match end {
            raw::End::Closed { acked: false } => {}
            raw::End::Closed { acked: true } => acked.push(*what),
            raw::End::Open { acked: a } => {
                open.push(*what);
                if a {
                    acked.push(*what);
                }
            }
        }
        assert!(agent.is_running(), "the agent died on: {what}");
    }
    let rss_after = rss_kib(pid);
    let since_bad = Instant::now();
    let plan = PublishPlan::new("pub", TOPIC, 20);
    let pad = plan.pad;
    let outcome = Publisher::start(edge, plan).finish().await;
    assert_eq!(
        outcome.acked.len(),
        20,
        "normal publishing works: {outcome:?}"
    );
    // Recovery here: from the end of the bad input until a normal publish was through.
    recovery_since(&fm.cloud, 20, name).await;
    let recovery = since_bad.elapsed();
    let received = fm.cloud.received();
    let smuggled: Vec<&str> = received
        .iter()
        .filter(|r| r.payload.starts_with(b"empty:") || r.payload.starts_with(b"utf8:"))
        .map(|r| r.topic.as_str())
        .collect();
    let extra = [
        ("rss_before_kib", rss_before.to_string()),
        ("rss_after_kib", rss_after.to_string()),
        ("left_open", open.len().to_string()),
        ("bad_acked", acked.len().to_string()),
        ("secs", format!("{:.1}", started.elapsed().as_secs_f64())),
    ];
    conclude(name, &fm, &outcome, pad, recovery, 0, &extra).await;
    assert!(
        open.is_empty(),
        "connections left open after bad input: {open:?}"
    );
    assert!(acked.is_empty(), "bad PUBLISHes acknowledged: {acked:?}");
    assert!(
        smuggled.is_empty(),
        "bad PUBLISHes forwarded to: {smuggled:?}"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "agent RSS grew from {rss_before} KiB to {rss_after} KiB on bad input"
    );
}

/// (15) Spoofing from the edge, with the widest route (`#`): a local publish to `$SYS/x` is not forwarded
/// (`#` does not match `$` topics), and a PUBLISH whose topic holds a wildcard is refused (connection
/// closed, no PUBACK) and not forwarded; a normal message next to them arrives (graceful: no duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_topics_are_not_forwarded() {
    let name = "spoofing";
    let started = Instant::now();
    let fm = FaultMesh::start(SITE).await;
    let mut spec = fm
        .mesh
        .agent_spec(SITE, BrokerSpec::embedded(), &fm.hub_spec);
    spec.routes = vec!["#".to_owned()];
    let _agent = fm.mesh.start_agent(SITE, &spec).await;
    let edge = spec.broker.client_addr();
    // Everything the cloud broker carries, not only the hub's namespace. (`$SYS/#` is not added: with it
    // in the same SUBSCRIBE the in-process rumqttd delivered nothing at all to this client.)
    let everything =
        Collector::start(fm.cloud_broker.addr, "cloud-everything", &["#"], false).await;

    let sys = Publisher::start(edge, PublishPlan::new("sys", "$SYS/x", 5))
        .finish()
        .await;
    let mut wildcard_ends = Vec::new();
    for topic in ["telemetry/+/x", "telemetry/#"] {
        let payload = format!("wild:{}:", wildcard_ends.len());
        let end = raw::send(
            edge,
            true,
            &raw::publish_qos1(topic.as_bytes(), payload.as_bytes()),
            Duration::from_secs(5),
        )
        .await;
        eprintln!("{name}: PUBLISH on {topic}: {end:?}");
        wildcard_ends.push((topic, end));
    }
    let since = Instant::now();
    let plan = PublishPlan::new("pub", TOPIC, 20);
    let pad = plan.pad;
    let outcome = Publisher::start(edge, plan).finish().await;
    assert_eq!(outcome.acked.len(), 20, "{outcome:?}");
    recovery_since(&fm.cloud, 20, name).await;
    let recovery = since.elapsed();
    everything
        .settle(Duration::from_secs(1), Duration::from_secs(5))
        .await;

    // The wide subscriber works: it saw the normal messages, so an empty list below means something.
    assert_eq!(
        faults::distinct_from("pub", &everything.received()),
        20,
        "the cloud-wide subscriber saw the normal messages"
    );
    let spoofed: Vec<String> = everything
        .received()
        .iter()
        .filter(|r| {
            r.topic.starts_with('$')
                || r.topic.contains("$SYS")
                || r.topic.contains(['+', '#'])
                || r.payload.starts_with(b"sys:")
                || r.payload.starts_with(b"wild:")
        })
        .map(|r| format!("{} <- {:?}", r.topic, String::from_utf8_lossy(&r.payload)))
        .collect();
    let extra = [
        ("sys_acked_at_edge", sys.acked.len().to_string()),
        ("spoofed_forwarded", spoofed.len().to_string()),
        ("secs", format!("{:.1}", started.elapsed().as_secs_f64())),
    ];
    conclude(name, &fm, &outcome, pad, recovery, 0, &extra).await;
    assert!(spoofed.is_empty(), "forwarded to the cloud: {spoofed:?}");
    for (topic, end) in wildcard_ends {
        assert_eq!(
            end,
            raw::End::Closed { acked: false },
            "a PUBLISH on {topic} is refused"
        );
    }
}

/// (9b) The hub and the agent are SIGKILLed together under load (one machine losing power, as far as
/// processes can show it) and restarted: nothing lost. The hub fsyncs its dedup state every
/// `cloud_hub::store::FLUSH_EVERY` rather than per batch, and the agent's acknowledgement deletes are
/// not fsynced either, so the agent may resend what the hub acknowledged in the last flush period and the
/// hub publish it again: duplicates by id are bounded by one uplink window plus that period's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_and_agent_sigkill_together() {
    let name = "hub_and_agent_sigkill";
    let started = Instant::now();
    let (mut fm, spec, mut agent) = direct().await;
    let plan = plan(1.0 + 1.0 + 3.0);
    let pad = plan.pad;
    let publisher = Publisher::start(spec.broker.client_addr(), plan);
    publisher
        .wait_acked(BEFORE_FAULT, Duration::from_secs(20))
        .await;
    let (cloud, hub, hub_broker) = (&fm.cloud, &mut fm.hub, &fm.hub_spec.broker);
    let (recovery, stall) = longest_stall(cloud, async {
        agent.kill9();
        hub.kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        restart(hub, hub_broker).await;
        restart(&mut agent, &spec.broker).await;
        let acked_at_restart = publisher.acked();
        recovery_since(cloud, acked_at_restart, name).await
    })
    .await;
    let outcome = publisher.finish().await;
    let window = spec.window_messages();
    let flush_period =
        (f64::from(RATE) * cloud_hub::store::FLUSH_EVERY.as_secs_f64()).ceil() as usize;
    let extra = [
        ("window", window.to_string()),
        ("flush_period_messages", flush_period.to_string()),
        ("longest_stall", format!("{:.2}s", stall.as_secs_f64())),
        ("secs", format!("{:.1}", started.elapsed().as_secs_f64())),
    ];
    conclude(
        name,
        &fm,
        &outcome,
        pad,
        recovery,
        window + flush_period,
        &extra,
    )
    .await;
}
