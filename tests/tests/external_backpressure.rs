//! External mode stays bounded in memory when the agent falls behind (issue 7, hole 6). Before, every
//! PUBLISH the site broker sent went into an unbounded channel while the ingest task retried a full queue:
//! QoS 0 messages (which MQTT does not flow-control) piled up in the agent's memory without limit. Now the
//! agent announces a Receive Maximum for QoS 1/2 (the broker holds the rest), and QoS 0 beyond a fixed room
//! is dropped, counted and logged, as QoS 0 allows. No QoS 1 message the broker accepted is lost.

use std::collections::BTreeSet;
use std::time::Duration;

use meshbridge_tests::cloud::CloudBroker;
use meshbridge_tests::mesh::Mesh;
use meshbridge_tests::mosquitto::{self, Mosquitto, MosquittoOptions};
use meshbridge_tests::mqtt::{Collector, MsgId, PublishPlan, Publisher, Report};
use meshbridge_tests::spec::BrokerSpec;
use rumqttc::v5::mqttbytes::QoS;

/// Resident memory of `pid` in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_flood_while_the_queue_is_full_stays_bounded_and_loses_no_qos1() {
    if mosquitto::skip("a_qos0_flood_while_the_queue_is_full_stays_bounded_and_loses_no_qos1") {
        return;
    }
    let mesh = Mesh::new(&["line1"]);
    let edge = Mosquitto::start("edge-mosquitto", mesh.path(), &MosquittoOptions::default()).await;
    let cloud_broker = CloudBroker::start().await;
    let hub_spec = mesh.hub_spec(BrokerSpec::hub_client_of(cloud_broker.addr), &["line1"]);
    let mut spec = mesh.agent_spec(
        "line1",
        BrokerSpec::External {
            address: edge.addr,
            client_id: "meshbridge-line1".to_owned(),
        },
        &hub_spec,
    );
    spec.queue_max_bytes = Some("1 MiB".to_owned());
    // No hub yet: the queue fills and stays full.
    let agent = mesh.start_agent("line1", &spec).await;
    let pid = agent.pid().expect("agent pid");

    // Settled first: the agent's own connections to the site broker (subscriber, downlink delivery, the
    // status topic's publisher, made within a second of start) belong to the baseline, not to the flood.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_kib(pid);

    // 40 MB of QoS 0: the first ~500 fill the queue, the rest arrive at a full queue. (QoS 0 first:
    // Mosquitto holds everything behind unacknowledged QoS 1 deliveries, so QoS 0 piles up in the agent
    // only when no QoS 1 is in flight.)
    let mut flood = PublishPlan::new("flood", "telemetry/q0", 20_000);
    flood.qos = QoS::AtMostOnce;
    flood.pad = 2_000;
    let _ = Publisher::start(edge.addr, flood).finish().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    let grew = after.saturating_sub(before);
    println!("scenario=external-qos0-flood rss_before_kib={before} rss_after_kib={after} grew_kib={grew}");
    assert!(
        grew < 20 * 1024,
        "the agent's memory grew by {grew} KiB under a 40 MB QoS 0 flood it could not commit"
    );
    assert!(
        agent.log_text().contains("QoS 0 messages dropped"),
        "the drops are logged:\n{}",
        agent.log_text()
    );

    // QoS 1 at the full queue: the site broker holds what the agent cannot take yet.
    let mut qos1 = PublishPlan::new("qos1", "telemetry/q1", 1_000);
    qos1.pad = 2_000;
    let qos1 = Publisher::start(edge.addr, qos1).finish().await;
    assert_eq!(qos1.acked.len(), 1_000, "the site broker took them all");

    // The hub comes: every QoS 1 message arrives.
    let cloud = Collector::start(cloud_broker.addr, "cloud-sub", &["acme/#"], false).await;
    let _hub = mesh.start_hub(&hub_spec).await;
    let expected: BTreeSet<MsgId> = qos1.acked_ids().collect();
    let arrived = cloud.wait_for_all(&expected, Duration::from_secs(60)).await;
    let report = Report::new(&[&qos1], &cloud.received());
    if !arrived {
        let log = agent.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "{report}\nagent log (last lines, newest first):\n{}",
            tail.join("\n")
        );
    }
    report.assert_no_loss();
}
