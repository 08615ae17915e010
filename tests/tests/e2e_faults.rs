//! Faults mid-stream with the real programs: the hub stopped, the hub killed, the agent killed. The cloud
//! broker is one that outlives the hub (in-process rumqttd, external to the hub), so every message the hub
//! published is observable across its restarts; the subscriber stays connected throughout.
//!
//! Publishing is paced (300 messages/s for 10 s) so the fault lands mid-stream.

use std::time::Duration;

use meshbridge_tests::faults::{self, FaultMesh};
use meshbridge_tests::mesh::{prove_path, restart, STOP_TIMEOUT};
use meshbridge_tests::mosquitto::{self, Mosquitto, MosquittoOptions};
use meshbridge_tests::mqtt::{Collector, PublishOutcome, PublishPlan, Publisher, Report};
use meshbridge_tests::spec::{AgentSpec, BrokerSpec};

const COUNT: u64 = 3_000;
const RATE: u32 = 300;
/// Acknowledged messages before the fault is injected.
const BEFORE_FAULT: u64 = 600;

type Setup = FaultMesh;

/// A hub for line1 publishing into an in-process broker, and a subscriber on `acme/#` there.
async fn setup() -> Setup {
    FaultMesh::start("line1").await
}

fn plan(name: &str) -> PublishPlan {
    let mut plan = PublishPlan::new(name, "telemetry/robot5/temp", COUNT).rate(RATE);
    plan.deadline = Duration::from_secs(40);
    plan
}

/// Waits for every acknowledged message, lets late duplicates show, and returns the report.
async fn settle_report(cloud: &Collector, outcome: &PublishOutcome, what: &str) -> Report {
    faults::settle_report(cloud, outcome, what, Duration::from_secs(30)).await
}

/// The hub is stopped with SIGTERM for 5 s while the edge keeps taking messages, then restarted on the
/// same data directory: nothing lost, and no duplicate reaches the cloud (clean shutdown persisted dedup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_stopped_for_five_seconds_loses_nothing_and_duplicates_nothing() {
    let mut s = setup().await;
    let spec = s
        .mesh
        .agent_spec("line1", BrokerSpec::embedded(), &s.hub_spec);
    let _agent = s.mesh.start_agent("line1", &spec).await;
    let publisher = Publisher::start(spec.broker.client_addr(), plan("pub"));
    publisher
        .wait_acked(BEFORE_FAULT, Duration::from_secs(20))
        .await;
    let status = s.hub.terminate(STOP_TIMEOUT).await;
    assert!(
        status.success(),
        "the hub exits cleanly on SIGTERM: {status}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    restart(&mut s.hub, &s.hub_spec.broker).await;
    let outcome = publisher.finish().await;
    assert_eq!(
        outcome.acked.len() as u64,
        COUNT,
        "the edge kept acknowledging while the hub was down: {outcome:?}"
    );
    let report = settle_report(&s.cloud, &outcome, "hub stopped").await;
    assert_eq!(report.duplicates_by_id, 0, "{report}");
    assert_eq!(report.duplicates_by_payload, 0, "{report}");
}

/// The hub is killed with SIGKILL mid-stream and restarted: nothing lost; duplicates (batches published
/// but not yet recorded in the dedup state) stay within one uplink window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_killed_loses_nothing_and_dedup_bounds_duplicates() {
    let mut s = setup().await;
    let spec = s
        .mesh
        .agent_spec("line1", BrokerSpec::embedded(), &s.hub_spec);
    let _agent = s.mesh.start_agent("line1", &spec).await;
    let publisher = Publisher::start(spec.broker.client_addr(), plan("pub"));
    publisher
        .wait_acked(BEFORE_FAULT, Duration::from_secs(20))
        .await;
    s.hub.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    restart(&mut s.hub, &s.hub_spec.broker).await;
    let outcome = publisher.finish().await;
    assert_eq!(outcome.acked.len() as u64, COUNT, "{outcome:?}");
    let report = settle_report(&s.cloud, &outcome, "hub killed").await;
    eprintln!(
        "hub killed: {} duplicates by meshbridge-id (bound: one uplink window = {} messages)",
        report.duplicates_by_id,
        spec.window_messages()
    );
    assert!(
        report.duplicates_by_id <= spec.window_messages(),
        "dedup let more than one window through: {report}"
    );
    // The agent was never interrupted, so every duplicate is a hub resend and carries its meshbridge-id.
    assert_eq!(
        report.duplicates_by_payload, report.duplicates_by_id,
        "{report}"
    );
}

/// Kills the agent mid-stream, restarts it on the same queue, and checks that every message the publisher
/// saw acknowledged arrives.
async fn agent_killed(s: &Setup, spec: &AgentSpec, edge: std::net::SocketAddr, what: &str) {
    let mut agent = s.mesh.start_agent("line1", spec).await;
    prove_path(
        edge,
        &s.cloud,
        "telemetry/probe",
        "acme/plant1/line1/telemetry/probe",
        Duration::from_secs(20),
    )
    .await;
    let publisher = Publisher::start(edge, plan("pub"));
    publisher
        .wait_acked(BEFORE_FAULT, Duration::from_secs(20))
        .await;
    agent.kill9();
    let at_kill = publisher.acked();
    tokio::time::sleep(Duration::from_millis(500)).await;
    restart(&mut agent, &spec.broker).await;
    let outcome = publisher.finish().await;
    assert!(
        outcome.acked.len() as u64 > at_kill,
        "publishing resumed after the restart: {outcome:?}"
    );
    let report = settle_report(&s.cloud, &outcome, what).await;
    eprintln!(
        "{what}: {} acknowledged before the kill; duplicates {} by meshbridge-id, {} by payload",
        at_kill, report.duplicates_by_id, report.duplicates_by_payload
    );
}

/// Agent with its embedded broker killed with SIGKILL mid-stream: the front acknowledged only committed
/// messages, so none of them is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_with_embedded_broker_loses_no_acknowledged_message() {
    let s = setup().await;
    let spec = s
        .mesh
        .agent_spec("line1", BrokerSpec::embedded(), &s.hub_spec);
    let edge = spec.broker.client_addr();
    agent_killed(&s, &spec, edge, "agent killed (embedded broker)").await;
}

/// Agent joined to a site Mosquitto killed with SIGKILL mid-stream: Mosquitto keeps the session and
/// redelivers what the agent had not acknowledged (it acks only after the queue commit), so every message
/// Mosquitto acknowledged to the publisher arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_with_mosquitto_at_the_edge_loses_no_acknowledged_message() {
    if mosquitto::skip("agent_killed_with_mosquitto_at_the_edge") {
        return;
    }
    let s = setup().await;
    let edge = Mosquitto::start(
        "edge-mosquitto",
        s.mesh.path(),
        &MosquittoOptions::default(),
    )
    .await;
    let spec = s.mesh.agent_spec(
        "line1",
        BrokerSpec::External {
            address: edge.addr,
            client_id: "meshbridge-line1".to_owned(),
        },
        &s.hub_spec,
    );
    agent_killed(&s, &spec, edge.addr, "agent killed (Mosquitto at the edge)").await;
}
