//! Issue 12, first part: the embedded edge broker keeps retained messages across a restart and a
//! `kill -9`, as Mosquitto does with `persistence true` (see `shared/src/queue/retained.rs`).
//!
//! A retained message is on disk before its publisher's PUBACK; an empty retained publish clears it; the
//! store is replayed into the broker before clients are served again.

use std::net::SocketAddr;
use std::time::Duration;

use meshbridge_tests::mesh::{restart, Mesh, STOP_TIMEOUT};
use meshbridge_tests::mqtt::{publish_acked, Collector, Received};
use meshbridge_tests::spec::BrokerSpec;
use rumqttc::v5::mqttbytes::v5::PublishProperties;

/// How long a retained message may take to reach a new subscriber.
const ARRIVE: Duration = Duration::from_secs(10);

/// Publishes `payload` retained at QoS 1 on `topic` and waits for its PUBACK.
async fn publish_retained(broker: SocketAddr, client_id: &str, topic: &str, payload: &[u8]) {
    publish_acked(
        broker,
        client_id,
        topic,
        payload,
        true,
        PublishProperties::default(),
    )
    .await;
}

/// The retained messages a new subscriber to `status/#` gets, as (topic, payload).
async fn retained_now(broker: SocketAddr, client_id: &str) -> Vec<(String, String)> {
    let sub = Collector::start(broker, client_id, &["status/#"], false).await;
    // Retained messages come right after the SUBACK; give stragglers a moment.
    sub.settle(Duration::from_millis(500), ARRIVE).await;
    let mut got: Vec<(String, String)> = sub
        .received()
        .iter()
        .filter(|m: &&Received| m.retain)
        .map(|m| {
            (
                m.topic.clone(),
                String::from_utf8_lossy(&m.payload).into_owned(),
            )
        })
        .collect();
    got.sort();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart_and_a_kill_9() {
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    hub_spec.tail = vec![
        "[[routes]]\nname = \"remote\"\nkind = \"downlink\"\nto = \"*\"\nfilter = \"status/remote/#\"\n"
            .to_owned(),
    ];
    let hub = mesh.start_hub(&hub_spec).await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let mut agent = mesh.start_agent("line1", &spec).await;
    let edge = spec.broker.client_addr();

    // A retained message the hub delivers (a downlink route) is kept like a local one. Published again
    // until the route is pushed and the hub subscribed; a retained publish replaces itself.
    let local = Collector::start(edge, "watch", &["status/remote/#"], false).await;
    let cloud = hub_spec.broker.client_addr();
    let deadline = std::time::Instant::now() + ARRIVE;
    loop {
        publish_retained(
            cloud,
            "cloud",
            "acme/plant1/line1/status/remote/mode",
            b"auto",
        )
        .await;
        if local
            .wait_until(Duration::from_secs(1), |r| {
                r.iter().any(|m| m.topic == "status/remote/mode")
            })
            .await
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the retained downlink message never reached line1"
        );
    }
    drop(local);

    publish_retained(edge, "door", "status/door", b"open").await;
    publish_retained(edge, "lamp", "status/lamp", b"on").await;
    // Cleared by an empty retained publish: it must not come back either.
    publish_retained(edge, "lamp-off", "status/lamp", b"").await;
    let want = vec![
        ("status/door".to_owned(), "open".to_owned()),
        ("status/remote/mode".to_owned(), "auto".to_owned()),
    ];
    assert_eq!(
        retained_now(edge, "before").await,
        want,
        "the broker's own view"
    );

    agent.terminate(STOP_TIMEOUT).await;
    restart(&mut agent, &spec.broker).await;
    assert_eq!(
        retained_now(edge, "after-restart").await,
        want,
        "after a clean restart"
    );

    // A new value right before a kill -9: acknowledged, so on disk.
    publish_retained(edge, "door2", "status/door", b"closed").await;
    agent.kill9();
    restart(&mut agent, &spec.broker).await;
    assert_eq!(
        retained_now(edge, "after-kill").await,
        vec![
            ("status/door".to_owned(), "closed".to_owned()),
            ("status/remote/mode".to_owned(), "auto".to_owned()),
        ],
        "after kill -9"
    );
    let log = agent.log_text();
    assert!(
        log.contains("retained messages restored into the broker"),
        "{log}"
    );
    drop(agent);
    drop(hub);
}
