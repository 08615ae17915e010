//! What the fault tests (`tests/e2e_faults.rs`, `tests/fault_suite.rs`) share: a hub publishing into a
//! cloud broker that outlives it, with a subscriber on it ([`FaultMesh`]); waiting for every acknowledged
//! message ([`settle_report`]); and the one line a fault-suite scenario prints ([`ScenarioLine`]).

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use crate::cloud::CloudBroker;
use crate::mesh::Mesh;
use crate::mqtt::{payload, Collector, MsgId, PublishOutcome, Received, Report};
use crate::process::Proc;
use crate::spec::{BrokerSpec, HubSpec};

/// Whether the long (soak) durations are asked for: `FAULT_SUITE_SOAK=1`. (Not `MESHBRIDGE_*`: the
/// programs read every such variable as a config override, and the children inherit the environment.)
pub fn soak() -> bool {
    std::env::var("FAULT_SUITE_SOAK").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// `ci` normally, `soak` under `FAULT_SUITE_SOAK=1`.
pub fn scaled<T>(ci: T, soak_value: T) -> T {
    if soak() {
        soak_value
    } else {
        ci
    }
}

/// A hub for one site publishing into an in-process cloud broker (so every message it published stays
/// observable across hub restarts), and a subscriber on `acme/#` there that stays connected throughout.
#[derive(Debug)]
pub struct FaultMesh {
    /// Directory and certificates.
    pub mesh: Mesh,
    /// The cloud broker (kept alive for the test).
    pub cloud_broker: CloudBroker,
    /// Everything the hub published.
    pub cloud: Collector,
    /// The hub's config.
    pub hub_spec: HubSpec,
    /// The running hub.
    pub hub: Proc,
}

impl FaultMesh {
    /// Starts the cloud broker, a hub for `site` publishing into it as an external broker, and the
    /// subscriber.
    pub async fn start(site: &str) -> Self {
        let mesh = Mesh::new(&[site]);
        let cloud_broker = CloudBroker::start().await;
        let hub_spec = mesh.hub_spec(
            BrokerSpec::External {
                address: cloud_broker.addr,
                client_id: "meshbridge-hub".to_owned(),
            },
            &[site],
        );
        let hub = mesh.start_hub(&hub_spec).await;
        let cloud = Collector::start(cloud_broker.addr, "cloud-sub", &["acme/#"], false).await;
        Self {
            mesh,
            cloud_broker,
            cloud,
            hub_spec,
            hub,
        }
    }
}

/// Waits up to `timeout` for every acknowledged message of `outcome`, lets late duplicates show, prints
/// the report under `what`, and asserts that nothing acknowledged was lost.
pub async fn settle_report(
    cloud: &Collector,
    outcome: &PublishOutcome,
    what: &str,
    timeout: Duration,
) -> Report {
    let expected: BTreeSet<MsgId> = outcome.acked_ids().collect();
    let all_arrived = cloud.wait_for_all(&expected, timeout).await;
    cloud
        .settle(Duration::from_secs(1), Duration::from_secs(5))
        .await;
    let report = Report::new(&[outcome], &cloud.received());
    eprintln!(
        "{what}: {report}; publisher: {} acked, {} unconfirmed, {} refused, {} unsent, {} connection errors",
        outcome.acked.len(),
        outcome.unconfirmed.len(),
        outcome.refused.len(),
        outcome.unsent,
        outcome.connection_errors
    );
    assert!(all_arrived, "{what}: {report}");
    report.assert_no_loss();
    report
}

/// Receptions that no publisher sent: a payload that is not a test message, a message number the
/// publisher never wrote (neither acknowledged, nor in flight, nor refused), or bytes that differ from
/// what was written (`pad` filler bytes, as in the plan).
pub fn unexpected(outcomes: &[&PublishOutcome], received: &[Received], pad: usize) -> usize {
    let sent: HashSet<MsgId> = outcomes
        .iter()
        .flat_map(|o| {
            o.acked
                .iter()
                .chain(&o.unconfirmed)
                .chain(&o.refused)
                .map(|&n| MsgId {
                    publisher: o.name.clone(),
                    n,
                })
        })
        .collect();
    received
        .iter()
        .filter(|r| match r.msg_id() {
            Some(id) => !sent.contains(&id) || r.payload != payload(&id.publisher, id.n, pad),
            None => true,
        })
        .count()
}

/// Distinct test messages of `publisher` among `received`.
pub fn distinct_from(publisher: &str, received: &[Received]) -> usize {
    received
        .iter()
        .filter_map(Received::msg_id)
        .filter(|id| id.publisher == publisher)
        .collect::<HashSet<_>>()
        .len()
}

/// Waits until the cloud holds at least `n` distinct messages of `publisher` and returns how long that
/// took, or `None` after `timeout`. With `n` = the publisher's acknowledged count at the end of a fault,
/// this is the recovery time: messages are acknowledged and forwarded in order, so the cloud has caught
/// up once it holds as many.
pub async fn caught_up(
    cloud: &Collector,
    publisher: &str,
    n: u64,
    timeout: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    cloud
        .wait_until(timeout, |r| distinct_from(publisher, r) >= n)
        .await
        .then(|| start.elapsed())
}

/// Runs `work` while watching the cloud: returns its output and the longest time no new message arrived
/// (sampled every 50 ms). When that stall began is printed in UTC, to find it in the programs' logs.
pub async fn longest_stall<F: Future>(cloud: &Collector, work: F) -> (F::Output, Duration) {
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut last_count = cloud.count();
    let mut last_change = (Instant::now(), SystemTime::now());
    let mut longest = (Duration::ZERO, last_change.1);
    loop {
        tokio::select! {
            out = &mut work => {
                if last_change.0.elapsed() > longest.0 {
                    longest = (last_change.0.elapsed(), last_change.1);
                }
                eprintln!(
                    "longest stall of deliveries: {:.2}s from {} (count {})",
                    longest.0.as_secs_f64(),
                    humantime::format_rfc3339_millis(longest.1),
                    cloud.count()
                );
                return (out, longest.0);
            }
            _ = tick.tick() => {
                let count = cloud.count();
                if count != last_count {
                    if last_change.0.elapsed() > longest.0 {
                        longest = (last_change.0.elapsed(), last_change.1);
                    }
                    last_count = count;
                    last_change = (Instant::now(), SystemTime::now());
                }
            }
        }
    }
}

/// The one line a fault-suite scenario prints, in the issue's format, plus extra `key=value` fields.
#[derive(Debug, Clone)]
pub struct ScenarioLine {
    /// Scenario name.
    pub name: String,
    /// Messages the publisher wrote (acknowledged, in flight when a connection broke, or refused).
    pub sent: usize,
    /// Distinct messages delivered to the cloud.
    pub delivered: usize,
    /// Acknowledged messages never delivered.
    pub lost: usize,
    /// Deliveries of messages never sent (or altered).
    pub unexpected: usize,
    /// Deliveries whose `meshbridge-id` had been delivered before (what dedup let through).
    pub duplicates: usize,
    /// Seconds from the end of the fault until the cloud had caught up.
    pub recovery: Duration,
    /// Extra fields.
    pub extra: Vec<(String, String)>,
}

impl ScenarioLine {
    /// The line for `name` from the publisher outcome, the report and the cloud's receptions.
    pub fn new(
        name: &str,
        outcome: &PublishOutcome,
        report: &Report,
        received: &[Received],
        pad: usize,
        recovery: Duration,
    ) -> Self {
        let mut line = Self {
            name: name.to_owned(),
            sent: outcome.acked.len() + outcome.unconfirmed.len() + outcome.refused.len(),
            delivered: report.distinct,
            lost: report.lost.len(),
            unexpected: unexpected(&[outcome], received, pad),
            duplicates: report.duplicates_by_id,
            recovery,
            extra: Vec::new(),
        };
        line.push("acked", outcome.acked.len());
        line.push("dup_payload", report.duplicates_by_payload);
        line.push("reordered", report.reordered);
        line
    }

    /// Appends `key=value`.
    pub fn push(&mut self, key: &str, value: impl fmt::Display) -> &mut Self {
        self.extra.push((key.to_owned(), value.to_string()));
        self
    }

    /// Prints the line on stdout (cargo shows it with `--nocapture`, and for a failing test).
    pub fn print(&self) {
        println!("{self}");
    }
}

impl fmt::Display for ScenarioLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "scenario={} sent={} delivered={} lost={} unexpected={} duplicates={} recovery={:.2}",
            self.name,
            self.sent,
            self.delivered,
            self.lost,
            self.unexpected,
            self.duplicates,
            self.recovery.as_secs_f64()
        )?;
        for (k, v) in &self.extra {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn rx(p: Bytes) -> Received {
        Received {
            topic: "t".to_owned(),
            payload: p,
            retain: false,
            qos: 1,
            user_properties: Vec::new(),
        }
    }

    #[test]
    fn unexpected_counts_unsent_altered_and_foreign_payloads() {
        let outcome = PublishOutcome {
            name: "p".to_owned(),
            acked: (0..3).collect(),
            unconfirmed: [3].into_iter().collect(),
            ..PublishOutcome::default()
        };
        let received = vec![
            rx(payload("p", 0, 4)),
            rx(payload("p", 3, 4)),
            // Never written.
            rx(payload("p", 7, 4)),
            // Written, but the bytes changed on the way.
            rx(payload("p", 1, 5)),
            rx(Bytes::from_static(b"garbage")),
        ];
        assert_eq!(unexpected(&[&outcome], &received, 4), 3);
    }

    #[test]
    fn the_line_has_the_issue_format() {
        let mut line = ScenarioLine {
            name: "x".to_owned(),
            sent: 10,
            delivered: 9,
            lost: 0,
            unexpected: 0,
            duplicates: 1,
            recovery: Duration::from_millis(1500),
            extra: Vec::new(),
        };
        line.push("seed", 7);
        assert_eq!(
            line.to_string(),
            "scenario=x sent=10 delivered=9 lost=0 unexpected=0 duplicates=1 recovery=1.50 seed=7"
        );
    }
}
