//! A slow subscriber on the hub's embedded cloud broker loses nothing; the wait goes back to the agent.
//!
//! rumqttd keeps a fixed in-memory log per subscription filter (`broker.max_log_per_filter`) and drops its
//! oldest segment when a new one starts, read or not. Before the subscriber pressure of the patched router
//! (`vendor/rumqttd/PATCHED.md`) a subscriber slower than the sites silently missed every message the log
//! dropped, after the hub had acknowledged them to the agents. Now the hub's publisher holds while such a
//! subscriber is close to the end of its log (`cloud-hub/src/publisher.rs`, `PRESSURE_POLL`), and the
//! agent's queue takes the wait.

use std::collections::BTreeSet;
use std::time::Duration;

use meshbridge_tests::mesh::Mesh;
use meshbridge_tests::metrics::{sample, scrape};
use meshbridge_tests::mqtt::{Collector, MsgId, PublishPlan, Publisher, Report};
use meshbridge_tests::spec::BrokerSpec;

/// Messages published: with 1 KiB of filler each, about 5 times the hub's log per filter.
const COUNT: u64 = 5_000;
/// The hub's `broker.max_log_per_filter`.
const LOG_PER_FILTER: &str = "1MiB";
/// The slow subscriber's pause after each message: at most ~1,000 messages a second, well below what the
/// publisher offers unpaced.
const PAUSE: Duration = Duration::from_millis(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_cloud_subscriber_misses_nothing_and_the_agent_queue_takes_the_wait() {
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    hub_spec
        .broker_extra
        .push(format!("max_log_per_filter = \"{LOG_PER_FILTER}\""));
    let hub_metrics = meshbridge_tests::net::free_tcp();
    hub_spec.metrics = Some(hub_metrics);
    let mut hub = mesh.start_hub(&hub_spec).await;
    let slow = Collector::start_paced(
        hub_spec.broker.client_addr(),
        "slow-sub",
        &["acme/#"],
        false,
        Some(PAUSE),
    )
    .await;

    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let _agent = mesh.start_agent("line1", &spec).await;
    let mut plan = PublishPlan::new("line1-pub", "telemetry/robot5/temp", COUNT);
    plan.pad = 1024;
    plan.window = 64;
    let outcome = Publisher::start(spec.broker.client_addr(), plan)
        .finish()
        .await;
    assert_eq!(
        outcome.acked.len() as u64,
        COUNT,
        "the edge acknowledged every message: {outcome:?}"
    );

    let expected: BTreeSet<MsgId> = outcome.acked_ids().collect();
    let all_arrived = slow.wait_for_all(&expected, Duration::from_secs(90)).await;
    slow.settle(Duration::from_millis(500), Duration::from_secs(5))
        .await;
    let report = Report::new(&[&outcome], &slow.received());
    eprintln!("slow subscriber: {report}");
    assert!(all_arrived, "the slow subscriber missed messages: {report}");
    report.assert_no_loss();

    // The hub held while the subscriber was behind, and says it lost nothing for any subscriber.
    hub.wait_log("holding new messages", Duration::from_secs(1))
        .await;
    let body = scrape(hub_metrics).await;
    assert_eq!(
        sample(
            &body,
            "meshbridge_cloud_broker_subscriber_messages_lost_total"
        ),
        Some(0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "meshbridge_cloud_broker_subscribers_held"),
        Some(0),
        "released once the subscriber caught up: {body}"
    );
}
