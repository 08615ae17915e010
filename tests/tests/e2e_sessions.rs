//! Issue 12, second part: persistent sessions of the embedded edge broker survive a restart and a
//! `kill -9`, as Mosquitto's do with `persistence true` (see `broker/src/sessions.rs` and
//! `shared/src/queue/session.rs`).
//!
//! With real clients: Debian's `mosquitto_sub -c -i ID` as the persistent subscriber (its libmosquitto
//! keeps the client side of QoS 2 state across reconnects, as MQTT requires), the harness's publishers,
//! and a cloud command through the hub for the downlink path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use meshbridge_tests::mesh::{restart, Mesh, STOP_TIMEOUT};
use meshbridge_tests::metrics::{sample, scrape};
use meshbridge_tests::mosquitto::{self, MosquittoSub};
use meshbridge_tests::mqtt::{parse_payload, publish_acked, Collector, PublishPlan, Publisher};
use meshbridge_tests::net::free_tcp;
use meshbridge_tests::spec::BrokerSpec;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;

/// How long a subscription or a batch of deliveries may take.
const ARRIVE: Duration = Duration::from_secs(20);

/// Starts a persistent `mosquitto_sub` and waits for its SUBACK.
async fn subscribe(edge: SocketAddr, args: &[&str]) -> MosquittoSub {
    let sub = MosquittoSub::start(edge, args);
    assert!(
        sub.wait_line("received SUBACK", ARRIVE).await,
        "no SUBACK for mosquitto_sub {args:?}:\n{}",
        sub.transcript()
    );
    sub
}

/// The message numbers of `publisher` in `mosquitto_sub -v` lines on `topic`, in arrival order.
fn numbers(lines: &[String], topic: &str, publisher: &str) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(topic)?.strip_prefix(' '))
        .filter_map(|payload| parse_payload(payload.as_bytes()))
        .filter(|id| id.publisher == publisher)
        .map(|id| id.n)
        .collect()
}

/// Publishes `payload` at QoS 1 on `topic` at `broker` and waits for its PUBACK.
async fn publish_once(broker: SocketAddr, client_id: &str, topic: &str, payload: &str) {
    let props = PublishProperties::default();
    publish_acked(broker, client_id, topic, payload.as_bytes(), false, props).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_persistent_subscriber_gets_everything_after_a_kill_9() {
    if mosquitto::clients_skip("an_offline_persistent_subscriber_gets_everything_after_a_kill_9") {
        return;
    }
    const COUNT: u64 = 300;
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    hub_spec.tail = vec![
        "[[routes]]\nname = \"commands\"\nkind = \"downlink\"\nto = \"*\"\nfilter = \"cmd/#\"\n"
            .to_owned(),
    ];
    let hub = mesh.start_hub(&hub_spec).await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let mut agent = mesh.start_agent("line1", &spec).await;
    let edge = spec.broker.client_addr();
    let args = [
        "-i", "plc-7", "-c", "-q", "1", "-t", "data/#", "-t", "cmd/#",
    ];

    // The session is made, then its client goes away without a DISCONNECT.
    subscribe(edge, &args).await.kill().await;

    // While it is away: local QoS 1 messages, and a cloud command through the hub.
    let outcome = Publisher::start(edge, PublishPlan::new("press", "data/press", COUNT))
        .finish()
        .await;
    assert_eq!(outcome.acked.len() as u64, COUNT, "{outcome:?}");
    let watch = Collector::start(edge, "watch", &["cmd/#"], false).await;
    let cloud = hub_spec.broker.client_addr();
    let deadline = std::time::Instant::now() + ARRIVE;
    let mut attempt = 0;
    let command = loop {
        // Sent again until the downlink route is pushed and the hub subscribed.
        attempt += 1;
        let command = format!("start-{attempt}");
        publish_once(cloud, "cloud", "acme/plant1/line1/cmd/line", &command).await;
        let seen = watch
            .wait_until(Duration::from_secs(1), |r| {
                r.iter().any(|m| m.payload == command.as_bytes())
            })
            .await;
        if seen {
            break command;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cloud command never reached line1"
        );
    };
    drop(watch);

    agent.kill9();
    restart(&mut agent, &spec.broker).await;

    let sub = subscribe(edge, &args).await;
    let want: Vec<u64> = (0..COUNT).collect();
    let complete = sub
        .wait_messages(ARRIVE, |lines| {
            numbers(lines, "data/press", "press").len() as u64 >= COUNT
                && lines.iter().any(|l| *l == format!("cmd/line {command}"))
        })
        .await;
    assert!(
        complete,
        "after kill -9 the persistent subscriber got {} of {COUNT} messages and the command {command}: {}\n{}",
        numbers(&sub.messages(), "data/press", "press").len(),
        sub.messages().iter().any(|l| *l == format!("cmd/line {command}")),
        agent.log_text()
    );
    assert_eq!(
        numbers(&sub.messages(), "data/press", "press"),
        want,
        "every message once, in publish order"
    );
    sub.kill().await;

    // A clean restart keeps the session too, and a message published after it is delivered.
    publish_once(edge, "late", "data/late", "after-restart").await;
    agent.terminate(STOP_TIMEOUT).await;
    restart(&mut agent, &spec.broker).await;
    let sub = subscribe(edge, &args).await;
    assert!(
        sub.wait_messages(ARRIVE, |l| l.iter().any(|m| m == "data/late after-restart"))
            .await,
        "{}",
        sub.transcript()
    );
    sub.kill().await;
    drop(agent);
    drop(hub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_deliveries_stay_exactly_once_across_a_kill_9() {
    if mosquitto::clients_skip("qos2_deliveries_stay_exactly_once_across_a_kill_9") {
        return;
    }
    const COUNT: u64 = 600;
    let mesh = Mesh::new(&["line1"]);
    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let hub = mesh.start_hub(&hub_spec).await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let mut agent = mesh.start_agent("line1", &spec).await;
    let edge = spec.broker.client_addr();

    // Stays connected through the crash: libmosquitto reconnects with its session, and its QoS 2 state.
    let sub = subscribe(edge, &["-i", "historian", "-c", "-q", "2", "-t", "q2/#"]).await;
    let mut plan = PublishPlan::new("valve", "q2/valve", COUNT).rate(300);
    plan.qos = QoS::ExactlyOnce;
    let publisher = Publisher::start(edge, plan);
    publisher.wait_acked(COUNT / 3, ARRIVE).await;
    agent.kill9();
    restart(&mut agent, &spec.broker).await;
    let outcome = publisher.finish().await;
    assert!(
        outcome.acked.len() as u64 >= COUNT / 2,
        "the publisher got through after the restart: {outcome:?}"
    );

    let delivered = sub
        .wait_messages(ARRIVE, |lines| {
            let got = numbers(lines, "q2/valve", "valve");
            outcome.acked.iter().all(|n| got.contains(n))
        })
        .await;
    let got = numbers(&sub.messages(), "q2/valve", "valve");
    let mut times: BTreeMap<u64, usize> = BTreeMap::new();
    for n in &got {
        *times.entry(*n).or_default() += 1;
    }
    let missing: Vec<&u64> = outcome
        .acked
        .iter()
        .filter(|n| !times.contains_key(n))
        .collect();
    assert!(
        delivered,
        "acknowledged QoS 2 messages lost across kill -9: {missing:?}\n{}",
        sub.transcript()
    );
    let twice: Vec<(&u64, &usize)> = times.iter().filter(|(_, t)| **t > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let unexpected: Vec<&u64> = times
        .keys()
        .filter(|n| !outcome.acked.contains(n) && !outcome.unconfirmed.contains(n))
        .collect();
    assert!(unexpected.is_empty(), "never published: {unexpected:?}");
    sub.kill().await;
    drop(agent);
    drop(hub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_bounds_and_expiry_are_kept_and_counted() {
    if mosquitto::clients_skip("session_bounds_and_expiry_are_kept_and_counted") {
        return;
    }
    let mesh = Mesh::new(&["line1"]);
    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let hub = mesh.start_hub(&hub_spec).await;
    let mut spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    spec.broker_extra = vec!["max_queued_messages = 5".to_owned()];
    let metrics = free_tcp();
    spec.metrics = Some(metrics);
    let mut agent = mesh.start_agent("line1", &spec).await;
    let edge = spec.broker.client_addr();

    // Bound: 12 published while the subscriber is away, the first 5 kept, 7 dropped and counted.
    let bounded = ["-i", "slow-hmi", "-c", "-q", "1", "-t", "bounded/#"];
    subscribe(edge, &bounded).await.kill().await;
    let outcome = Publisher::start(edge, PublishPlan::new("b", "bounded/x", 12))
        .finish()
        .await;
    assert_eq!(
        outcome.acked.len(),
        12,
        "publishers are acknowledged: {outcome:?}"
    );
    let body = scrape(metrics).await;
    assert_eq!(
        sample(
            &body,
            "meshbridge_session_messages_dropped_total{reason=\"full\"}"
        ),
        Some(7),
        "{body}"
    );
    assert_eq!(
        sample(&body, "meshbridge_session_messages_queued"),
        Some(5),
        "{body}"
    );
    agent
        .wait_log("persistent session full", Duration::from_secs(5))
        .await;
    let sub = subscribe(edge, &bounded).await;
    assert!(
        sub.wait_messages(ARRIVE, |l| numbers(l, "bounded/x", "b").len() >= 5)
            .await,
        "{}",
        sub.transcript()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(numbers(&sub.messages(), "bounded/x", "b"), [0, 1, 2, 3, 4]);
    sub.kill().await;

    // Expiry (MQTT 5, 2 s), kept across a restart: the session is gone afterwards, and so is its queue.
    let expiring = [
        "-V", "mqttv5", "-x", "2", "-i", "short", "-c", "-q", "1", "-t", "exp/#",
    ];
    subscribe(edge, &expiring).await.kill().await;
    publish_once(edge, "e1", "exp/x", "queued-then-expired").await;
    agent.terminate(STOP_TIMEOUT).await;
    restart(&mut agent, &spec.broker).await;
    agent
        .wait_log("persistent session expired", Duration::from_secs(10))
        .await;
    let body = scrape(metrics).await;
    assert_eq!(
        sample(&body, "meshbridge_sessions_expired_total"),
        Some(1),
        "{body}"
    );
    let sub = subscribe(edge, &expiring).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !sub.transcript().contains("queued-then-expired"),
        "an expired session's message was delivered:\n{}",
        sub.transcript()
    );
    assert!(
        sub.transcript().contains("received CONNACK (0)"),
        "{}",
        sub.transcript()
    );
    sub.kill().await;
    drop(agent);
    drop(hub);
}
