//! The agent↔hub link's liveness with the real programs (issue 7: nothing acknowledged is ever stuck):
//! how often an agent retries a hub that cannot take its data, and how fast either side notices the other's
//! restart. Timings are asserted with generous bounds (debug builds on a loaded 2-core machine) and
//! printed; the tight figures are the benchmark's (README, Performance).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use meshbridge_tests::cloud::CloudBroker;
use meshbridge_tests::mesh::Mesh;
use meshbridge_tests::mqtt::{Collector, MsgId, PublishPlan, Publisher};
use meshbridge_tests::net;
use meshbridge_tests::process::Proc;
use meshbridge_tests::spec::BrokerSpec;

/// Connection attempts the agent has ended so far: it logs every ended attempt once, with the delay before
/// the next one (`retry_in`), whatever the cause (refused, unreachable, link lost).
fn attempts(agent: &Proc) -> usize {
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains("retry_in"))
        .count()
}

/// Issue 7, hole 9. With its cloud broker down, the hub used to welcome an agent and fail its first batch;
/// the agent took the `Welcome` as a healthy link, reset its backoff, and re-handshook about ten times a
/// second. Now the hub refuses before `Welcome` with a retry-after the agent honours: at most ~1.5
/// attempts per second (1 s plus up to 0.5 s of jitter). Once the broker is back, everything the edge
/// acknowledged meanwhile is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_backs_off_while_the_cloud_broker_is_down_and_delivers_once_it_is_back() {
    let mesh = Mesh::new(&["line1"]);
    // Nothing listens here until the broker is started below.
    let broker_addr = net::free_tcp();
    let hub_spec = mesh.hub_spec(
        BrokerSpec::External {
            address: broker_addr,
            client_id: "meshbridge-hub".to_owned(),
        },
        &["line1"],
    );
    let _hub = mesh.start_hub(&hub_spec).await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let agent = mesh.start_agent("line1", &spec).await;
    let outcome = Publisher::start(
        spec.broker.client_addr(),
        PublishPlan::new("pub", "telemetry/robot5/temp", 50),
    )
    .finish()
    .await;
    assert_eq!(
        outcome.acked.len(),
        50,
        "the edge queues while the cloud is down: {outcome:?}"
    );

    // Let the agent reach its steady retry pace (its backoff starts at 50 ms in tests), then count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let window = Duration::from_secs(6);
    let before = attempts(&agent);
    tokio::time::sleep(window).await;
    let counted = attempts(&agent) - before;
    let rate = counted as f64 / window.as_secs_f64();
    eprintln!("cloud broker down: {counted} connection attempts in {window:?} ({rate:.2}/s)");
    assert!(
        counted >= 2,
        "the agent keeps trying while the broker is down"
    );
    assert!(
        rate <= 2.0,
        "reconnect storm: {counted} attempts in {window:?} ({rate:.2}/s)\n{}",
        agent.log_text()
    );

    let back = Instant::now();
    let _broker = CloudBroker::start_on(broker_addr).await;
    let cloud = Collector::start(broker_addr, "cloud-sub", &["acme/#"], false).await;
    let expected: BTreeSet<MsgId> = outcome.acked_ids().collect();
    let all = cloud.wait_for_all(&expected, Duration::from_secs(30)).await;
    let resumed = back.elapsed();
    eprintln!(
        "cloud broker back: all {} queued messages delivered after {resumed:?}",
        expected.len()
    );
    assert!(
        all,
        "delivery did not resume within 30 s of the broker's return"
    );
    // The hub retries its broker at least every 2 s and the agent the hub about every 1-1.5 s.
    assert!(
        resumed <= Duration::from_secs(10),
        "delivery resumed only {resumed:?} after the broker came back"
    );
}
