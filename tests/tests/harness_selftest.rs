//! The harness checked on its own, without the programs under test: a publisher and a collector through
//! the in-process cloud broker and through Mosquitto. If these fail, an e2e failure would say nothing about
//! meshbridge.

use std::time::Duration;

use meshbridge_tests::cloud::CloudBroker;
use meshbridge_tests::mosquitto::{self, Mosquitto, MosquittoOptions};
use meshbridge_tests::mqtt::{Collector, PublishPlan, Publisher, Report};

async fn round_trip(addr: std::net::SocketAddr, tag: &str) {
    let collector = Collector::start(addr, &format!("{tag}-sub"), &["selftest/#"], false).await;
    let plan = PublishPlan::new(&format!("{tag}-pub"), "selftest/a", 500).user_property("k", "v");
    let outcome = Publisher::start(addr, plan).finish().await;
    assert_eq!(
        outcome.acked.len(),
        500,
        "every message acknowledged: {outcome:?}"
    );
    assert!(outcome.unconfirmed.is_empty() && outcome.refused.is_empty() && outcome.unsent == 0);
    let expected = outcome.acked_ids().collect();
    assert!(
        collector
            .wait_for_all(&expected, Duration::from_secs(20))
            .await,
        "{tag}: {}",
        Report::new(&[&outcome], &collector.received())
    );
    let received = collector.received();
    let report = Report::new(&[&outcome], &received);
    report.assert_no_loss();
    assert_eq!(report.distinct, 500);
    assert_eq!(report.duplicates_by_payload, 0, "{report}");
    assert!(received
        .iter()
        .all(|r| r.user_property("k") == Some("v") && r.topic == "selftest/a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_and_collector_through_the_in_process_broker() {
    let broker = CloudBroker::start().await;
    round_trip(broker.addr, "inproc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_and_collector_through_mosquitto() {
    if mosquitto::skip("publisher_and_collector_through_mosquitto") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start("mosquitto", dir.path(), &MosquittoOptions::default()).await;
    round_trip(broker.addr, "mosq").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_survives_a_broker_restart_and_reports_what_was_acknowledged() {
    if mosquitto::skip("publisher_survives_a_broker_restart") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let options = MosquittoOptions::default();
    let mut broker = Mosquitto::start("mosquitto", dir.path(), &options).await;
    let publisher = Publisher::start(
        broker.addr,
        PublishPlan::new("restart-pub", "selftest/b", 1500).rate(500),
    );
    publisher.wait_acked(300, Duration::from_secs(20)).await;
    broker.proc.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.proc.restart();
    broker
        .proc
        .wait_ready(broker.addr, Duration::from_secs(10))
        .await;
    let started = std::time::Instant::now();
    let outcome = publisher.finish().await;
    eprintln!("after a broker kill: {outcome:?}");
    // A publish stranded by the broken connection must not be waited for until the deadline (60 s).
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the publisher finished promptly after the restart: took {:?}",
        started.elapsed()
    );
    assert!(outcome.connection_errors >= 1, "{outcome:?}");
    assert!(
        outcome.acked.len() > 300,
        "publishing resumed after the restart: {outcome:?}"
    );
    assert_eq!(
        outcome.acked.len()
            + outcome.unconfirmed.len()
            + outcome.refused.len()
            + outcome.unsent as usize,
        1500,
        "every message accounted for once: {outcome:?}"
    );
}
