//! An agent's data directory restored from a backup (a VM snapshot, a copy taken earlier) meets a hub that
//! has already seen more of that queue than the copy ever wrote. Without a check the agent trusted the
//! hub's high-water mark: messages taken after the restore reused seqs the hub had seen, were dropped as
//! duplicates at the hub and deleted locally, though their publishers had PUBACKs. The agent must start a
//! new incarnation numbered above the hub's mark, both sides must log it, and every message taken after
//! the restore must reach the cloud under a `meshbridge-id` never used before.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::time::Duration;

use meshbridge_tests::faults::FaultMesh;
use meshbridge_tests::mesh::{restart, STOP_TIMEOUT};
use meshbridge_tests::mqtt::{Collector, MsgId, PublishOutcome, PublishPlan, Publisher, Report};
use meshbridge_tests::spec::BrokerSpec;

const TOPIC: &str = "telemetry/line/counter";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy dir");
    for entry in std::fs::read_dir(from).expect("read data dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

async fn publish_all(edge: std::net::SocketAddr, name: &str, count: u64) -> PublishOutcome {
    let outcome = Publisher::start(edge, PublishPlan::new(name, TOPIC, count))
        .finish()
        .await;
    assert_eq!(
        outcome.acked.len() as u64,
        count,
        "{name}: the edge acknowledged every message: {outcome:?}"
    );
    outcome
}

async fn wait_delivered(cloud: &Collector, outcome: &PublishOutcome) {
    let expected: BTreeSet<MsgId> = outcome.acked_ids().collect();
    let arrived = cloud.wait_for_all(&expected, Duration::from_secs(30)).await;
    let report = Report::new(&[outcome], &cloud.received());
    assert!(arrived, "{}: {report}", outcome.name);
    report.assert_no_loss();
}

/// The `meshbridge-id`s the cloud received for `outcome`'s messages.
fn ids_of(cloud: &Collector, outcome: &PublishOutcome) -> Vec<String> {
    cloud
        .received()
        .iter()
        .filter(|r| r.msg_id().is_some_and(|id| id.publisher == outcome.name))
        .filter_map(|r| r.meshbridge_id().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_data_directory_loses_no_new_message() {
    let FaultMesh {
        mesh,
        cloud_broker: _cloud_broker,
        cloud,
        hub_spec,
        mut hub,
    } = FaultMesh::start("line1").await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let edge = spec.broker.client_addr();

    // The backup is taken after 40 messages went through.
    let mut agent = mesh.start_agent("line1", &spec).await;
    let before = publish_all(edge, "before", 40).await;
    wait_delivered(&cloud, &before).await;
    assert!(agent.terminate(STOP_TIMEOUT).await.success());
    let backup = mesh.path().join("line1-backup");
    copy_dir(&spec.data_dir, &backup);

    // Life goes on: 60 more reach the hub, which now knows seqs the backup never wrote.
    restart(&mut agent, &spec.broker).await;
    let between = publish_all(edge, "between", 60).await;
    wait_delivered(&cloud, &between).await;
    assert!(agent.terminate(STOP_TIMEOUT).await.success());

    // The backup is restored, and the agent takes messages while the hub is down, so they are queued
    // under seqs the hub has already seen.
    std::fs::remove_dir_all(&spec.data_dir).expect("remove data dir");
    copy_dir(&backup, &spec.data_dir);
    assert!(hub.terminate(STOP_TIMEOUT).await.success());
    restart(&mut agent, &spec.broker).await;
    let offline = publish_all(edge, "offline", 30).await;
    restart(&mut hub, &hub_spec.broker).await;
    wait_delivered(&cloud, &offline).await;

    // And after the reconnect, new messages flow under fresh numbers too.
    let after = publish_all(edge, "after", 30).await;
    wait_delivered(&cloud, &after).await;

    let old_ids: HashSet<String> = ids_of(&cloud, &before)
        .into_iter()
        .chain(ids_of(&cloud, &between))
        .collect();
    for outcome in [&offline, &after] {
        let ids = ids_of(&cloud, outcome);
        assert_eq!(
            ids.len(),
            outcome.acked.len(),
            "{}: one id each",
            outcome.name
        );
        let reused: Vec<&String> = ids.iter().filter(|id| old_ids.contains(*id)).collect();
        assert!(
            reused.is_empty(),
            "{}: meshbridge-ids reused from before the restore (consumers would drop these): {reused:?}",
            outcome.name
        );
    }

    let agent_log = agent.log_text();
    assert!(
        agent_log.contains("data directory restored or copied?"),
        "the agent logs the conflict:\n{agent_log}"
    );
    let hub_log = hub.log_text();
    assert!(
        hub_log.contains("site's queue has a new incarnation"),
        "the hub logs the new incarnation:\n{hub_log}"
    );
}
