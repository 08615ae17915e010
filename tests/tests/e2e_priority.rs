//! Issue 8, route `priority`, end to end: when a link has a backlog, a higher priority goes first, in both
//! directions (see `shared/src/link/lane.rs`).
//!
//! Each test builds a backlog of many low-priority messages, then a few high-priority ones behind them, and
//! lets the link drain it. In one FIFO queue every high-priority message would arrive after the whole
//! low-priority backlog; with lanes they arrive while most of it is still waiting. The tests assert the
//! latter, and that nothing of either is lost.

use std::collections::BTreeSet;
use std::time::Duration;

use meshbridge_tests::cloud::CloudBroker;
use meshbridge_tests::mesh::{prove_path, restart, Mesh, STOP_TIMEOUT};
use meshbridge_tests::mosquitto::{self, Mosquitto, MosquittoOptions};
use meshbridge_tests::mqtt::{Collector, MsgId, PublishOutcome, PublishPlan, Publisher, Received};
use meshbridge_tests::spec::BrokerSpec;

/// How long a probe or the drained backlog may take to arrive.
const ARRIVE: Duration = Duration::from_secs(60);
/// Low-priority messages in the backlog.
const BULK: u64 = 3000;
/// High-priority messages queued behind them.
const URGENT: u64 = 20;

/// Publishes `count` QoS 1 messages as `name` on `topic` at `broker`, all of which must be acknowledged.
async fn publish_all(
    broker: std::net::SocketAddr,
    name: &str,
    topic: &str,
    count: u64,
) -> PublishOutcome {
    let mut plan = PublishPlan::new(name, topic, count);
    plan.window = 64;
    let outcome = Publisher::start(broker, plan).finish().await;
    assert_eq!(
        outcome.acked.len() as u64,
        count,
        "{name}: every message acknowledged ({} unconfirmed)",
        outcome.unconfirmed.len()
    );
    outcome
}

/// Waits until every message of both outcomes arrived at `collector`, then returns how many `bulk`
/// messages arrived before the last `urgent` one, after asserting none was lost.
async fn bulk_before_last_urgent(
    collector: &Collector,
    bulk: &PublishOutcome,
    urgent: &PublishOutcome,
) -> usize {
    let expected: BTreeSet<MsgId> = bulk.acked_ids().chain(urgent.acked_ids()).collect();
    let all = collector.wait_for_all(&expected, ARRIVE).await;
    let received = collector.received();
    let arrived: BTreeSet<MsgId> = received.iter().filter_map(Received::msg_id).collect();
    let missing: Vec<&MsgId> = expected.difference(&arrived).take(10).collect();
    assert!(
        all,
        "{} of {} acknowledged messages missing, e.g. {missing:?}",
        expected.difference(&arrived).count(),
        expected.len()
    );
    let ids: Vec<MsgId> = received.iter().filter_map(Received::msg_id).collect();
    let last_urgent = ids
        .iter()
        .rposition(|id| id.publisher == urgent.name)
        .expect("urgent messages arrived");
    let bulk_before = ids[..last_urgent]
        .iter()
        .filter(|id| id.publisher == bulk.name)
        .collect::<BTreeSet<_>>()
        .len();
    println!(
        "{bulk_before} of {} low-priority messages arrived before the last of {} high-priority ones",
        bulk.acked.len(),
        urgent.acked.len()
    );
    bulk_before
}

/// Uplink: line1 captures `telemetry/#` at priority 0 and `alarms/#` at priority 9. While the hub is
/// down, 3,000 telemetry messages are queued, then 20 alarms. When the hub is back, the alarms arrive
/// in the cloud before most of the telemetry backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_uplink_backlog_drains_first() {
    // A cloud broker that outlives the hub, so its subscriber sees the backlog as it drains.
    let cloud_broker = CloudBroker::start().await;
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::hub_client_of(cloud_broker.addr), &["line1"]);
    hub_spec.tail = vec![
        "[[routes]]\nname = \"telemetry\"\nkind = \"uplink\"\nfrom = \"*\"\nfilter = \"telemetry/#\"\n"
            .to_owned(),
        "[[routes]]\nname = \"alarms\"\nkind = \"uplink\"\nfrom = \"*\"\nfilter = \"alarms/#\"\npriority = 9\n"
            .to_owned(),
    ];
    let mut hub = mesh.start_hub(&hub_spec).await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let agent = mesh.start_agent("line1", &spec).await;
    let cloud = Collector::start(cloud_broker.addr, "cloud", &["acme/#"], false).await;
    let edge = spec.broker.client_addr();
    // Telemetry first: an idle higher lane holds nothing back.
    prove_path(
        edge,
        &cloud,
        "telemetry/probe",
        "acme/plant1/line1/telemetry/probe",
        ARRIVE,
    )
    .await;
    prove_path(
        edge,
        &cloud,
        "alarms/probe",
        "acme/plant1/line1/alarms/probe",
        ARRIVE,
    )
    .await;
    assert!(
        spec.data_dir.join("queue+p9.redb").is_file(),
        "the alarms have a lane of their own"
    );
    assert!(
        hub.log_text().contains("lane=9"),
        "the hub served the alarms' lane: {}",
        hub.log_text()
    );

    hub.terminate(STOP_TIMEOUT).await;
    let bulk = publish_all(edge, "bulk", "telemetry/backlog", BULK).await;
    let urgent = publish_all(edge, "urgent", "alarms/backlog", URGENT).await;
    restart(&mut hub, &hub_spec.broker).await;
    let bulk_before = bulk_before_last_urgent(&cloud, &bulk, &urgent).await;
    assert!(
        bulk_before < (BULK / 2) as usize,
        "the alarms waited behind the telemetry backlog: {bulk_before} of {BULK} telemetry messages came first"
    );
    drop(agent);
    drop(hub);
}

/// Downlink: commands to line1 on `cmd/bulk/#` at priority 0 and `cmd/urgent/#` at priority 9, line1's
/// broker a Mosquitto (it outlives the agent, so its subscriber sees every delivery). While line1's agent
/// is down, 1,500 bulk commands are queued at the hub, then 20 urgent ones. When the agent is back, the
/// urgent commands arrive before most of the bulk backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_downlink_backlog_drains_first() {
    const NAME: &str = "a_higher_priority_downlink_backlog_drains_first";
    const QUEUED: u64 = 1500;
    if mosquitto::skip(NAME) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let site_broker =
        Mosquitto::start("line1-mosquitto", dir.path(), &MosquittoOptions::default()).await;
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    // The hub logs each queued downlink message, so the test knows when the backlog is all at the hub.
    hub_spec.log = "info,cloud_hub::downlink=debug".to_owned();
    hub_spec.tail = vec![
        "[[routes]]\nname = \"bulk\"\nkind = \"downlink\"\nto = \"*\"\nfilter = \"cmd/bulk/#\"\n"
            .to_owned(),
        "[[routes]]\nname = \"urgent\"\nkind = \"downlink\"\nto = \"*\"\nfilter = \"cmd/urgent/#\"\npriority = 9\n"
            .to_owned(),
    ];
    let hub = mesh.start_hub(&hub_spec).await;
    let spec = mesh.agent_spec(
        "line1",
        BrokerSpec::External {
            address: site_broker.addr,
            client_id: "meshbridge-line1".to_owned(),
        },
        &hub_spec,
    );
    let mut agent = mesh.start_agent("line1", &spec).await;
    let local = Collector::start(site_broker.addr, "line1-sub", &["cmd/#"], false).await;
    let cloud = hub_spec.broker.client_addr();
    prove_path(
        cloud,
        &local,
        "acme/plant1/line1/cmd/urgent/probe",
        "cmd/urgent/probe",
        ARRIVE,
    )
    .await;
    prove_path(
        cloud,
        &local,
        "acme/plant1/line1/cmd/bulk/probe",
        "cmd/bulk/probe",
        ARRIVE,
    )
    .await;

    agent.terminate(STOP_TIMEOUT).await;
    let bulk = publish_all(cloud, "bulk", "acme/plant1/line1/cmd/bulk/backlog", QUEUED).await;
    let urgent = publish_all(
        cloud,
        "urgent",
        "acme/plant1/line1/cmd/urgent/backlog",
        URGENT,
    )
    .await;
    // The hub's subscriber commits in arrival order: once the last urgent command is queued, so is all
    // the bulk.
    let queued = |log: &str| {
        log.lines()
            .filter(|l| l.contains("downlink queued") && l.contains("cmd/urgent/backlog"))
            .count()
    };
    let deadline = std::time::Instant::now() + ARRIVE;
    while queued(&hub.log_text()) < URGENT as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "the hub did not queue the commands in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    restart(&mut agent, &spec.broker).await;
    let bulk_before = bulk_before_last_urgent(&local, &bulk, &urgent).await;
    assert!(
        bulk_before < (QUEUED / 2) as usize,
        "the urgent commands waited behind the bulk backlog: {bulk_before} of {QUEUED} bulk commands came first"
    );
    drop(agent);
    drop(hub);
    drop(site_broker);
}
