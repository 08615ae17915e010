//! Delivery through embedded brokers at both ends, with the real `cloud-hub` and `edge-agent` programs.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use meshbridge_tests::mesh::Mesh;
use meshbridge_tests::mqtt::{payload, Collector, MsgId, PublishPlan, Publisher, Report};
use meshbridge_tests::spec::BrokerSpec;

const PER_SITE: u64 = 2_000;

/// Two sites, 2,000 QoS 1 messages each: every one arrives once, under its site's namespace, with its
/// payload, its publisher's user property and a `meshbridge-id` of `<site>/<seq>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_deliver_everything_once_under_their_namespace() {
    let mesh = Mesh::new(&["line1", "line2"]);
    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1", "line2"]);
    let _hub = mesh.start_hub(&hub_spec).await;
    let cloud = Collector::start(hub_spec.broker.client_addr(), "cloud-sub", &["#"], false).await;
    let sites = [
        ("line1", "telemetry/robot5/temp"),
        ("line2", "telemetry/press/force"),
    ];
    let mut agents = Vec::new();
    let mut publishers = Vec::new();
    for (site, topic) in sites {
        let spec = mesh.agent_spec(site, BrokerSpec::embedded(), &hub_spec);
        agents.push(mesh.start_agent(site, &spec).await);
        let plan = PublishPlan::new(&format!("{site}-pub"), topic, PER_SITE)
            .user_property("app", &format!("{site}-robot"));
        publishers.push(Publisher::start(spec.broker.client_addr(), plan));
    }
    let mut outcomes = Vec::new();
    for p in publishers {
        outcomes.push(p.finish().await);
    }
    for o in &outcomes {
        assert_eq!(
            o.acked.len() as u64,
            PER_SITE,
            "edge acknowledged every message: {o:?}"
        );
    }
    let expected: BTreeSet<MsgId> = outcomes.iter().flat_map(|o| o.acked_ids()).collect();
    let all_arrived = cloud.wait_for_all(&expected, Duration::from_secs(30)).await;
    cloud
        .settle(Duration::from_millis(500), Duration::from_secs(5))
        .await;
    let received = cloud.received();
    let report = Report::new(&outcomes.iter().collect::<Vec<_>>(), &received);
    eprintln!("delivery: {report}");
    assert!(all_arrived, "{report}");
    report.assert_no_loss();
    assert_eq!(report.duplicates_by_id, 0, "{report}");
    assert_eq!(report.duplicates_by_payload, 0, "{report}");
    assert_eq!(report.missing_id, 0, "{report}");

    let mut ids = HashSet::new();
    for r in &received {
        let Some(id) = r.msg_id() else { continue };
        let (site, topic) = sites
            .iter()
            .find(|(s, _)| id.publisher == format!("{s}-pub"))
            .expect("a message from one of our publishers");
        assert_eq!(
            r.topic,
            format!("acme/plant1/{site}/{topic}"),
            "namespace of {id}"
        );
        assert_eq!(
            r.payload,
            payload(&id.publisher, id.n, 64),
            "payload of {id} intact"
        );
        assert_eq!(r.qos, 1, "QoS of {id} kept");
        assert_eq!(
            r.user_property("app"),
            Some(format!("{site}-robot").as_str()),
            "user property of {id}"
        );
        let mid = r.meshbridge_id().expect("meshbridge-id");
        let (mid_site, seq) = mid.split_once('/').expect("meshbridge-id is <site>/<seq>");
        assert_eq!(
            mid_site, *site,
            "meshbridge-id {mid} names the site of {id}"
        );
        assert!(
            seq.parse::<u64>().is_ok_and(|s| s > 0),
            "meshbridge-id {mid}: seq is a positive number"
        );
        assert!(ids.insert(mid.to_owned()), "meshbridge-id {mid} is unique");
    }
}

/// A retained message is published retained at the cloud (a late subscriber gets it, flagged retained),
/// and a message on a topic no route selects stays at the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_stay_retained_and_unrouted_topics_stay_local() {
    let mesh = Mesh::new(&["line1"]);
    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let _hub = mesh.start_hub(&hub_spec).await;
    let cloud_addr = hub_spec.broker.client_addr();
    let cloud = Collector::start(cloud_addr, "cloud-sub", &["#"], false).await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let _agent = mesh.start_agent("line1", &spec).await;
    let edge = spec.broker.client_addr();

    let local = Publisher::start(edge, PublishPlan::new("local-pub", "local/x", 5))
        .finish()
        .await;
    assert_eq!(
        local.acked.len(),
        5,
        "the edge broker takes unrouted messages too: {local:?}"
    );
    let retained = Publisher::start(
        edge,
        PublishPlan::new("retain-pub", "telemetry/line1/config", 1).retain(true),
    )
    .finish()
    .await;
    assert_eq!(retained.acked.len(), 1, "{retained:?}");
    // Published after the others: once it arrives, they had their chance.
    let marker = Publisher::start(edge, PublishPlan::new("marker-pub", "telemetry/marker", 1))
        .finish()
        .await;
    assert_eq!(marker.acked.len(), 1, "{marker:?}");
    let cloud_topic = "acme/plant1/line1/telemetry/line1/config";
    assert!(
        cloud
            .wait_until(Duration::from_secs(20), |r| {
                r.iter()
                    .any(|m| m.topic == "acme/plant1/line1/telemetry/marker")
                    && r.iter().any(|m| m.topic == cloud_topic)
            })
            .await,
        "retained and marker messages reach the cloud: {:?}",
        cloud.received()
    );
    cloud
        .settle(Duration::from_millis(500), Duration::from_secs(5))
        .await;
    let leaked: Vec<String> = cloud
        .received()
        .iter()
        .filter(|m| m.topic.contains("local/"))
        .map(|m| m.topic.clone())
        .collect();
    assert!(
        leaked.is_empty(),
        "unrouted messages reached the cloud: {leaked:?}"
    );

    let late = Collector::start(cloud_addr, "late-sub", &[cloud_topic], false).await;
    assert!(
        late.wait_for(1, Duration::from_secs(10)).await,
        "a late subscriber gets the retained message"
    );
    let got = late.received();
    assert!(got[0].retain, "delivered as retained: {:?}", got[0]);
    assert_eq!(got[0].payload, payload("retain-pub", 0, 64));
    assert_eq!(
        got[0].meshbridge_id().map(|m| m.starts_with("line1/")),
        Some(true)
    );
}

/// The README's try-it commands: `mosquitto_pub` and `mosquitto_sub` speak MQTT 3.1.1 by default, so a
/// 3.1.1 publisher at the edge and a 3.1.1 subscriber at the cloud must work too (the hub publishes with
/// MQTT 5 properties, which a 3.1.1 subscriber must get without them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_clients_at_both_ends_as_in_the_readme() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let mesh = Mesh::new(&["line1"]);
    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let _hub = mesh.start_hub(&hub_spec).await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let _agent = mesh.start_agent("line1", &spec).await;

    let cloud = hub_spec.broker.client_addr();
    let (sub, mut sub_loop) = AsyncClient::new(
        MqttOptions::new("sub311", cloud.ip().to_string(), cloud.port()),
        10,
    );
    sub.subscribe("acme/#", QoS::AtLeastOnce)
        .await
        .expect("queue the subscription");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sub_task = tokio::spawn(async move {
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(None);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(Some((p.topic, p.payload)));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let suback = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
    assert!(
        matches!(suback, Ok(Some(None))),
        "3.1.1 subscription acknowledged"
    );

    let edge = spec.broker.client_addr();
    let (publisher, mut pub_loop) = AsyncClient::new(
        MqttOptions::new("pub311", edge.ip().to_string(), edge.port()),
        10,
    );
    publisher
        .publish("telemetry/robot5/temp", QoS::AtLeastOnce, false, "21.5")
        .await
        .expect("queue the publish");
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match pub_loop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    assert_eq!(acked, Ok(true), "the edge acknowledged the 3.1.1 publish");

    let got = tokio::time::timeout(Duration::from_secs(15), rx.recv()).await;
    sub_task.abort();
    match got {
        Ok(Some(Some((topic, payload)))) => {
            assert_eq!(topic, "acme/plant1/line1/telemetry/robot5/temp");
            assert_eq!(&payload[..], b"21.5");
        }
        other => panic!("the 3.1.1 subscriber at the cloud got nothing: {other:?}"),
    }
}

/// Issue 7, "acknowledged, then dropped": with default configs (the hub's `limits.max_message_size` and the
/// agent's `uplink.max_message_size` are 256 KiB) a 300 KB QoS 1 message to the edge used to get a PUBACK
/// and then be dropped by the hub. Now an MQTT 5 publisher is refused at PUBLISH time (reason 0x83), a
/// 3.1.1 publisher gets Mosquitto's behaviour (acknowledged and discarded at the edge, logged), and the
/// messages after it arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_message_is_refused_at_the_edge_not_dropped_at_the_hub() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let mesh = Mesh::new(&["line1"]);
    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let _hub = mesh.start_hub(&hub_spec).await;
    let cloud = Collector::start(hub_spec.broker.client_addr(), "cloud-sub", &["#"], false).await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let _agent = mesh.start_agent("line1", &spec).await;
    let edge = spec.broker.client_addr();

    let (client, mut eventloop) = AsyncClient::new(
        MqttOptions::new("pub-v5-big", edge.ip().to_string(), edge.port()),
        10,
    );
    let mut reasons = Vec::new();
    for (topic, len) in [("telemetry/big", 300_000), ("telemetry/after", 10)] {
        client
            .publish(topic, QoS::AtLeastOnce, false, vec![b'b'; len])
            .await
            .expect("queue the publish");
        let reason = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(ack))) => return Ok(ack.reason),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .expect("a PUBACK in time");
        reasons.push(reason);
    }
    assert_eq!(
        reasons,
        [
            Ok(PubAckReason::ImplementationSpecificError),
            Ok(PubAckReason::Success)
        ]
    );
    // 3.1.1: the oversize message is acknowledged (no negative ack exists) but not forwarded.
    let mut options = rumqttc::MqttOptions::new("pub-v4-big", edge.ip().to_string(), edge.port());
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    for (topic, len) in [("telemetry/v4/big", 300_000), ("telemetry/v4", 10)] {
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, vec![b'b'; len])
            .await
            .expect("queue the publish");
        let acked = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await;
        assert_eq!(acked, Ok(Ok(())), "3.1.1 PUBACK for {topic}");
    }
    assert!(
        cloud
            .wait_until(Duration::from_secs(20), |r| {
                r.iter()
                    .any(|m| m.topic == "acme/plant1/line1/telemetry/after")
                    && r.iter()
                        .any(|m| m.topic == "acme/plant1/line1/telemetry/v4")
            })
            .await,
        "the messages after the oversize one arrive: {:?}",
        cloud.received()
    );
    cloud
        .settle(Duration::from_millis(500), Duration::from_secs(5))
        .await;
    assert!(
        cloud.received().iter().all(|m| !m.topic.ends_with("/big")),
        "the oversize message never reaches the cloud"
    );
}
