//! Issue 11, namespaces hold for every topic field: an MQTT 5 Response Topic is mapped into the site's
//! namespace like the topic itself, so a site cannot point a cloud service's replies outside it, and a
//! cloud request that names a reply topic inside the site's namespace reaches the site under the local name
//! (one outside it is not passed on: the site's reply could never get there).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshbridge_tests::mesh::Mesh;
use meshbridge_tests::mqtt::publish_acked;
use meshbridge_tests::spec::BrokerSpec;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

const WAIT: Duration = Duration::from_secs(20);

/// (topic, response topic) of every PUBLISH a subscriber got.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Subscribes to `filter` at `broker` and records what arrives; returns once subscribed.
async fn watch(
    broker: SocketAddr,
    client_id: &str,
    filter: &str,
) -> (Seen, tokio::task::JoinHandle<()>) {
    let mut options = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("queue the subscribe");
    let seen: Seen = Arc::default();
    let sink = Arc::clone(&seen);
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    let task = tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let rt = p.properties.as_ref().and_then(|p| p.response_topic.clone());
                    sink.lock()
                        .expect("lock")
                        .push((String::from_utf8_lossy(&p.topic).into_owned(), rt));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(WAIT, subscribed)
        .await
        .expect("SUBACK in time")
        .expect("subscriber alive");
    (seen, task)
}

/// Publishes `topic` at QoS 1 with `response_topic` from a fresh MQTT 5 client and waits for the PUBACK.
async fn request(
    broker: SocketAddr,
    client_id: String,
    topic: &'static str,
    response_topic: &'static str,
) {
    let properties = PublishProperties {
        response_topic: Some(response_topic.to_owned()),
        correlation_data: Some(Bytes::from_static(b"req-1")),
        ..PublishProperties::default()
    };
    publish_acked(broker, &client_id, topic, b"?", false, properties).await;
}

/// Repeats `send` until `seen` holds a PUBLISH on `topic`; returns its response topic.
async fn until_seen<F, Fut>(seen: &Seen, topic: &str, mut send: F) -> Option<String>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let deadline = Instant::now() + WAIT;
    for attempt in 0.. {
        send(attempt).await;
        let settle = Instant::now() + Duration::from_secs(1);
        while Instant::now() < settle {
            let found = seen
                .lock()
                .expect("lock")
                .iter()
                .find(|(t, _)| t == topic)
                .map(|(_, rt)| rt.clone());
            if let Some(rt) = found {
                return rt;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            Instant::now() < deadline,
            "nothing on {topic} within {WAIT:?}"
        );
    }
    unreachable!("the loop returns or panics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_topics_are_mapped_into_the_site_namespace_both_ways() {
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    hub_spec.tail = vec![
        "[[routes]]\nname = \"up\"\nkind = \"uplink\"\nfrom = \"*\"\nfilter = \"telemetry/#\"\n"
            .to_owned(),
        "[[routes]]\nname = \"commands\"\nkind = \"downlink\"\nto = \"*\"\nfilter = \"cmd/#\"\n"
            .to_owned(),
    ];
    let hub = mesh.start_hub(&hub_spec).await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let agent = mesh.start_agent("line1", &spec).await;
    let edge = spec.broker.client_addr();
    let cloud = hub_spec.broker.client_addr();

    // Up: the site asks for replies on `replies/robot5`; the cloud sees it under the site's namespace.
    let (up, _up_task) = watch(cloud, "service", "acme/plant1/line1/telemetry/#").await;
    let rt = until_seen(&up, "acme/plant1/line1/telemetry/req", |n| {
        request(
            edge,
            format!("robot5-{n}"),
            "telemetry/req",
            "replies/robot5",
        )
    })
    .await;
    assert_eq!(rt.as_deref(), Some("acme/plant1/line1/replies/robot5"));

    // Down: a reply topic inside the namespace reaches the site by its local name, one outside does not.
    let (down, _down_task) = watch(edge, "plc", "cmd/#").await;
    let rt = until_seen(&down, "cmd/start", |n| {
        request(
            cloud,
            format!("mes-{n}"),
            "acme/plant1/line1/cmd/start",
            "acme/plant1/line1/replies/mes",
        )
    })
    .await;
    assert_eq!(rt.as_deref(), Some("replies/mes"));
    let rt = until_seen(&down, "cmd/stop", |n| {
        request(
            cloud,
            format!("other-{n}"),
            "acme/plant1/line1/cmd/stop",
            "acme/plant1/line2/replies/mes",
        )
    })
    .await;
    assert_eq!(rt, None, "another site's topic is not passed on");
    drop(agent);
    drop(hub);
}
