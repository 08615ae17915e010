//! Delivery through Debian's Mosquitto at both ends: the agent joins the site's Mosquitto (external mode,
//! persistent session, manual acks) and the hub publishes into a cloud Mosquitto. Skipped, with a printed
//! reason, where Mosquitto is not installed (`scripts/install-test-deps.sh` installs it; CI does).

use std::collections::BTreeSet;
use std::time::Duration;

use meshbridge_tests::mesh::{prove_path, Mesh};
use meshbridge_tests::mosquitto::{self, Mosquitto, MosquittoOptions};
use meshbridge_tests::mqtt::{payload, Collector, MsgId, PublishPlan, Publisher, Report};
use meshbridge_tests::spec::BrokerSpec;

const COUNT: u64 = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_at_the_edge_and_at_the_cloud() {
    if mosquitto::skip("mosquitto_at_the_edge_and_at_the_cloud") {
        return;
    }
    let mesh = Mesh::new(&["line1"]);
    let edge = Mosquitto::start("edge-mosquitto", mesh.path(), &MosquittoOptions::default()).await;
    let cloud_broker =
        Mosquitto::start("cloud-mosquitto", mesh.path(), &MosquittoOptions::default()).await;
    let hub_spec = mesh.hub_spec(BrokerSpec::hub_client_of(cloud_broker.addr), &["line1"]);
    let _hub = mesh.start_hub(&hub_spec).await;
    let cloud = Collector::start(cloud_broker.addr, "cloud-sub", &["acme/#"], false).await;
    let spec = mesh.agent_spec(
        "line1",
        BrokerSpec::External {
            address: edge.addr,
            client_id: "meshbridge-line1".to_owned(),
        },
        &hub_spec,
    );
    let _agent = mesh.start_agent("line1", &spec).await;
    prove_path(
        edge.addr,
        &cloud,
        "telemetry/probe",
        "acme/plant1/line1/telemetry/probe",
        Duration::from_secs(20),
    )
    .await;

    let plan =
        PublishPlan::new("mosq-pub", "telemetry/robot5/temp", COUNT).user_property("app", "robot5");
    let outcome = Publisher::start(edge.addr, plan).finish().await;
    assert_eq!(
        outcome.acked.len() as u64,
        COUNT,
        "Mosquitto acknowledged every message: {outcome:?}"
    );
    let expected: BTreeSet<MsgId> = outcome.acked_ids().collect();
    let all_arrived = cloud.wait_for_all(&expected, Duration::from_secs(40)).await;
    cloud
        .settle(Duration::from_millis(500), Duration::from_secs(5))
        .await;
    let received = cloud.received();
    let report = Report::new(&[&outcome], &received);
    eprintln!("mosquitto delivery: {report}");
    assert!(all_arrived, "{report}");
    report.assert_no_loss();
    assert_eq!(report.duplicates_by_id, 0, "{report}");
    assert_eq!(report.missing_id, 0, "{report}");
    for r in received
        .iter()
        .filter(|r| r.msg_id().is_some_and(|id| id.publisher == "mosq-pub"))
    {
        let id = r.msg_id().expect("a test message");
        assert_eq!(r.topic, "acme/plant1/line1/telemetry/robot5/temp");
        assert_eq!(r.payload, payload("mosq-pub", id.n, 64));
        assert_eq!(
            r.user_property("app"),
            Some("robot5"),
            "user property of {id}"
        );
        assert!(r.meshbridge_id().is_some_and(|m| m.starts_with("line1/")));
    }
}
