//! Issue 9, the stuck-link watchdog (`uplink.ack_timeout`, `shared/src/link/agent.rs`): a link that stays
//! connected but stops acknowledging is detected, logged, counted and replaced, and nothing is lost.
//!
//! Stuck for real: the hub's cloud broker (Debian's Mosquitto) is frozen with SIGSTOP, so its TCP
//! connection stays open and the QUIC link's keep-alives are answered, but no PUBACK comes back, so the hub
//! acknowledges nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use meshbridge_tests::mesh::{prove_path, Mesh};
use meshbridge_tests::metrics::{sample, scrape};
use meshbridge_tests::mosquitto::{self, Mosquitto, MosquittoOptions};
use meshbridge_tests::mqtt::{Collector, MsgId, PublishPlan, Publisher};
use meshbridge_tests::net::free_tcp;
use meshbridge_tests::spec::BrokerSpec;

const COUNT: u64 = 200;

/// Sends `signal` (`STOP`, `CONT`) to `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_link_that_stops_acknowledging_is_replaced_and_loses_nothing() {
    if mosquitto::skip("a_connected_link_that_stops_acknowledging_is_replaced_and_loses_nothing") {
        return;
    }
    let mesh = Mesh::new(&["line1"]);
    let cloud = Mosquitto::start("cloud", mesh.path(), &MosquittoOptions::default()).await;
    let hub_spec = mesh.hub_spec(BrokerSpec::hub_client_of(cloud.addr), &["line1"]);
    let hub = mesh.start_hub(&hub_spec).await;
    let mut spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    spec.ack_timeout = Some(Duration::from_secs(1));
    let metrics = free_tcp();
    spec.metrics = Some(metrics);
    let mut agent = mesh.start_agent("line1", &spec).await;
    let edge = spec.broker.client_addr();
    let consumer = Collector::start(
        cloud.addr,
        "historian",
        &["acme/plant1/line1/telemetry/#"],
        true,
    )
    .await;
    prove_path(
        edge,
        &consumer,
        "telemetry/probe",
        "acme/plant1/line1/telemetry/probe",
        Duration::from_secs(20),
    )
    .await;

    let pid = cloud.proc.pid().expect("mosquitto runs");
    signal(pid, "STOP");
    let outcome = Publisher::start(edge, PublishPlan::new("press", "telemetry/press", COUNT))
        .finish()
        .await;
    assert_eq!(
        outcome.acked.len() as u64,
        COUNT,
        "the edge keeps accepting: {outcome:?}"
    );
    let line = agent.wait_log("stuck link", Duration::from_secs(10)).await;
    let stalls = sample(
        &scrape(metrics).await,
        "meshbridge_uplink_stalls_total{lane=\"0\"}",
    );
    signal(pid, "CONT");
    assert!(
        stalls.is_some_and(|n| n >= 1),
        "stalls counted: {stalls:?}; {line}"
    );

    let want: BTreeSet<MsgId> = outcome
        .acked
        .iter()
        .map(|&n| MsgId {
            publisher: "press".to_owned(),
            n,
        })
        .collect();
    assert!(
        consumer.wait_for_all(&want, Duration::from_secs(60)).await,
        "every acknowledged message arrives once the broker answers again: {} of {COUNT}",
        consumer.count()
    );
    drop(agent);
    drop(hub);
}

/// The downlink direction (`downlink.ack_timeout`, `shared/src/link/hub.rs`): the site's own broker is
/// frozen, so the agent cannot hand a cloud command on and acknowledges nothing; the hub notices, counts
/// and closes the link, and the command still arrives once the broker answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downlink_that_stops_acknowledging_is_closed_and_the_command_still_arrives() {
    if mosquitto::skip(
        "a_downlink_that_stops_acknowledging_is_closed_and_the_command_still_arrives",
    ) {
        return;
    }
    let mesh = Mesh::new(&["line1"]);
    let site_broker = Mosquitto::start("site", mesh.path(), &MosquittoOptions::default()).await;
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let metrics = free_tcp();
    hub_spec.metrics = Some(metrics);
    hub_spec.tail = vec![
        "[downlink]\nack_timeout = \"1s\"\n".to_owned(),
        "[[routes]]\nname = \"commands\"\nkind = \"downlink\"\nto = \"*\"\nfilter = \"cmd/#\"\n"
            .to_owned(),
    ];
    let mut hub = mesh.start_hub(&hub_spec).await;
    let spec = mesh.agent_spec(
        "line1",
        BrokerSpec::External {
            address: site_broker.addr,
            client_id: "meshbridge-line1".to_owned(),
        },
        &hub_spec,
    );
    let agent = mesh.start_agent("line1", &spec).await;
    let plc = Collector::start(site_broker.addr, "plc", &["cmd/#"], true).await;
    let cloud = hub_spec.broker.client_addr();
    // The route is pushed and the hub subscribed once a command gets through.
    prove_path(
        cloud,
        &plc,
        "acme/plant1/line1/cmd/probe",
        "cmd/probe",
        Duration::from_secs(20),
    )
    .await;

    let pid = site_broker.proc.pid().expect("mosquitto runs");
    signal(pid, "STOP");
    let outcome = Publisher::start(
        cloud,
        PublishPlan::new("mes", "acme/plant1/line1/cmd/start", 1),
    )
    .finish()
    .await;
    assert_eq!(outcome.acked.len(), 1, "{outcome:?}");
    let line = hub
        .wait_log("stuck link: downlink", Duration::from_secs(10))
        .await;
    let stalls = sample(
        &scrape(metrics).await,
        "meshbridge_downlink_stalls_total{site=\"line1\"}",
    );
    signal(pid, "CONT");
    assert!(
        stalls.is_some_and(|n| n >= 1),
        "stalls counted: {stalls:?}; {line}"
    );
    let want: BTreeSet<MsgId> = [MsgId {
        publisher: "mes".to_owned(),
        n: 0,
    }]
    .into();
    assert!(
        plc.wait_for_all(&want, Duration::from_secs(60)).await,
        "the command arrives once the site's broker answers again"
    );
    drop(agent);
    drop(hub);
}
