//! MQTT conformance of the front with rumqttd behind it, for MQTT 3.1.1 and 5.0, on loopback ephemeral ports.
//!
//! The cases follow Eclipse Paho's MQTT interoperability test suite (`client_test.py` and
//! `client_test5.py` of paho.mqtt.testing): basic publish/subscribe at QoS 0/1/2, retained messages, will
//! message, zero-length client id, offline message queueing, overlapping subscriptions, keepalive,
//! redelivery on reconnect, subscribe failure, `$` topics and unsubscribe, plus the protocol violations the
//! front itself must close on (a second CONNECT, an empty topic name, a malformed filter). Clients are the
//! raw-packet clients of `tests/raw/mod.rs`, so a test controls every byte (no ack, abrupt close) and sees
//! every byte the front sends.
//! Every topic goes through the commit path (the test's pipeline commits everything at once), as on an
//! agent whose route is `#`.
//!
//! Where rumqttd behind the front does not conform, the test says so by name and the README lists it
//! ("MQTT conformance of the embedded broker"); it is not hidden behind a passing assertion.

mod raw;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use shared::mqtt::{PacketType, ProtocolVersion};
use tokio::time::timeout;

use raw::*;

/// Upper bound for a whole test.
const TEST: Duration = Duration::from_secs(40);

/// Topic names of a test, unique per version so retained state of one run cannot leak into the other.
fn topics(version: ProtocolVersion) -> [String; 4] {
    let v = version.level();
    [
        format!("TopicA{v}"),
        format!("TopicA{v}/B"),
        format!("Topic{v}/C"),
        format!("TopicA{v}/C"),
    ]
}

/// Runs a case for both protocol versions, in both set-ups of the front: the hub's (rumqttd serves every
/// session) and the edge agent's (the front serves persistent sessions from disk, `src/sessions.rs`).
async fn run<F, Fut>(f: F) -> Result<()>
where
    F: Fn(SocketAddr, ProtocolVersion) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    run_in(&[false, true], f).await
}

/// Runs a case for both protocol versions in the edge agent's set-up only.
async fn run_agent<F, Fut>(f: F) -> Result<()>
where
    F: Fn(SocketAddr, ProtocolVersion) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    run_in(&[true], f).await
}

async fn run_in<F, Fut>(setups: &[bool], f: F) -> Result<()>
where
    F: Fn(SocketAddr, ProtocolVersion) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    timeout(TEST, async {
        for &agent in setups {
            let mesh = if agent {
                Mesh::start_agent().await?
            } else {
                Mesh::start().await?
            };
            for version in [V4, V5] {
                f(mesh.addr, version)
                    .await
                    .with_context(|| format!("{version:?}, agent set-up: {agent}"))?;
            }
            mesh.stop().await?;
        }
        Ok(())
    })
    .await
    .context("test exceeded its time bound")?
}

// ---------------------------------------------------------------------------------------------------
// Paho interoperability cases.

/// Paho `test_basic`: subscribe at QoS 2, publish at QoS 0, 1 and 2, receive all three.
#[tokio::test]
async fn basic_publish_subscribe_at_every_qos() -> Result<()> {
    run(|addr, version| async move {
        let [topic_a, ..] = topics(version);
        let (mut c, session_present) =
            Client::connected(addr, &Conn::new(version, "basic")).await?;
        ensure!(!session_present, "clean session has no session present");
        ensure!(c.subscribe(&[(&topic_a, 2)]).await? == [2], "granted QoS 2");
        let mut extra = Vec::new();
        for qos in 0..=2u8 {
            extra.extend(c.publish(&topic_a, qos, false, &[b'q', b'0' + qos]).await?);
        }
        let mut got = c.receive(extra, 3).await?;
        got.sort_by(|a, b| a.payload.cmp(&b.payload));
        let payloads: Vec<&[u8]> = got.iter().map(|g| g.payload.as_slice()).collect();
        ensure!(payloads == [b"q0", b"q1", b"q2"], "{got:?}");
        ensure!(got.iter().all(|g| g.topic == topic_a && !g.retain));
        c.quiet().await.context("a message was delivered twice")?;
        c.disconnect().await
    })
    .await
}

/// Part of Paho `test_basic`: a message is delivered at the minimum of its published QoS and the
/// granted QoS (3.1.1 §3.8.4 [MQTT-3.8.4-6], 5.0 §3.8.4). rumqttd 0.20 delivers at the subscription's
/// QoS instead (a QoS 0 publish reaches a QoS 2 subscriber as QoS 2); the front cannot repair that,
/// because it does not know the QoS a delivery was published with. Listed in README.
#[tokio::test]
#[ignore = "rumqttd 0.20 delivers at the subscription QoS, not min(published, granted); see README"]
async fn delivery_qos_is_the_minimum_of_published_and_granted() -> Result<()> {
    run(|addr, version| async move {
        let [topic_a, ..] = topics(version);
        let (mut c, _) = Client::connected(addr, &Conn::new(version, "minqos")).await?;
        c.subscribe(&[(&topic_a, 2)]).await?;
        let mut extra = Vec::new();
        for qos in 0..=2u8 {
            extra.extend(c.publish(&topic_a, qos, false, &[b'q', b'0' + qos]).await?);
        }
        let mut got = c.receive(extra, 3).await?;
        got.sort_by(|a, b| a.payload.cmp(&b.payload));
        let qos: Vec<u8> = got.iter().map(|g| g.qos).collect();
        ensure!(qos == [0, 1, 2], "delivered at the published QoS: {got:?}");
        c.disconnect().await
    })
    .await
}

/// The same rule for a persistent session in the edge agent's set-up, where the front delivers: QoS 0, 1
/// and 2 publishes reach a QoS 2 subscription at QoS 0, 1 and 2, and a QoS 1 subscription caps them at 1.
#[tokio::test]
async fn delivery_qos_to_a_persistent_session_is_the_minimum() -> Result<()> {
    run_agent(|addr, version| async move {
        let [topic_a, _, _, topic_c] = topics(version);
        let id = format!("minqos-p{}", version.level());
        let persistent = Conn {
            clean: false,
            session_expiry: 600,
            ..Conn::new(version, &id)
        };
        let (mut c, _) = Client::connected(addr, &persistent).await?;
        c.subscribe(&[(&topic_a, 2), (&topic_c, 1)]).await?;
        let mut extra = Vec::new();
        for qos in 0..=2u8 {
            extra.extend(c.publish(&topic_a, qos, false, &[b'a', b'0' + qos]).await?);
            extra.extend(c.publish(&topic_c, qos, false, &[b'c', b'0' + qos]).await?);
        }
        let mut got = c.receive(extra, 6).await?;
        got.sort_by(|a, b| a.payload.cmp(&b.payload));
        let qos: Vec<u8> = got.iter().map(|g| g.qos).collect();
        ensure!(qos == [0, 1, 2, 0, 1, 1], "delivered QoS: {got:?}");
        c.disconnect().await
    })
    .await
}

/// Paho `test_retained_messages`: retained messages at QoS 0/1/2 are delivered retained to a new
/// subscription; an empty retained payload clears them.
#[tokio::test]
async fn retained_messages_are_kept_and_cleared() -> Result<()> {
    run(|addr, version| async move {
        let [_, a_b, c_c, a_c] = topics(version);
        let (mut c, _) = Client::connected(addr, &Conn::new(version, "retain")).await?;
        for (topic, qos) in [(&a_b, 0u8), (&c_c, 1), (&a_c, 2)] {
            c.publish(topic, qos, true, b"qos retained").await?;
        }
        let filter = format!("{}/+", a_b.split('/').next().unwrap_or_default());
        let other = format!("{}/+", c_c.split('/').next().unwrap_or_default());
        c.subscribe(&[(&filter, 2), (&other, 2)]).await?;
        let got = c.receive(Vec::new(), 3).await?;
        ensure!(got.iter().all(|g| g.retain), "delivered retained: {got:?}");
        let mut names: Vec<&str> = got.iter().map(|g| g.topic.as_str()).collect();
        names.sort_unstable();
        let mut want = [a_b.as_str(), c_c.as_str(), a_c.as_str()];
        want.sort_unstable();
        ensure!(names == want, "retained topics {names:?}");
        c.unsubscribe(&[&filter, &other]).await?;
        // Clear them, then a new subscription gets nothing.
        for topic in [&a_b, &c_c, &a_c] {
            c.publish(topic, 1, true, b"").await?;
        }
        c.subscribe(&[(&filter, 2), (&other, 2)]).await?;
        c.quiet()
            .await
            .context("cleared retained messages were delivered")?;
        c.disconnect().await
    })
    .await
}

/// Paho `test_will_message`: a client that goes away without DISCONNECT has its will published.
#[tokio::test]
async fn will_message_on_abrupt_close() -> Result<()> {
    run(|addr, version| async move {
        let [_, a_b, ..] = topics(version);
        let (mut sub, _) = Client::connected(addr, &Conn::new(version, "will-sub")).await?;
        sub.subscribe(&[(&a_b, 2)]).await?;
        let conn = Conn {
            will: Some((&a_b, b"client not disconnected", 2, false)),
            ..Conn::new(version, "will-pub")
        };
        let (c, _) = Client::connected(addr, &conn).await?;
        drop(c); // TCP close without DISCONNECT
        let got = sub.receive(Vec::new(), 1).await?;
        ensure!(got[0].topic == a_b && got[0].payload == b"client not disconnected");
        // A clean DISCONNECT discards the will.
        let (c, _) = Client::connected(addr, &conn).await?;
        c.disconnect().await?;
        sub.quiet()
            .await
            .context("will published after DISCONNECT")?;
        sub.disconnect().await
    })
    .await
}

/// Paho `test_zero_length_clientid`: 3.1.1 accepts an empty client id only with a clean session
/// (else CONNACK 0x02); 5.0 accepts it and assigns an id (CONNACK property 0x12).
#[tokio::test]
async fn zero_length_client_id() -> Result<()> {
    run(|addr, version| async move {
        let (c, connack) = Client::connect(addr, &Conn::new(version, "")).await?;
        ensure!(
            connack.body[1] == 0,
            "clean + empty id accepted: {connack:?}"
        );
        if version == V5 {
            let assigned = connack_property_ids(&connack.body)?;
            ensure!(
                assigned.contains(&0x12),
                "v5 CONNACK assigns a client identifier (property 0x12): {:02x?}",
                &connack.body[..]
            );
        }
        c.disconnect().await?;
        if version == V4 {
            let conn = Conn {
                clean: false,
                ..Conn::new(version, "")
            };
            let (_, connack) = Client::connect(addr, &conn).await?;
            ensure!(
                connack.body[1] == 0x02,
                "persistent session with an empty id refused with 0x02: {connack:?}"
            );
        }
        Ok(())
    })
    .await
}

/// The property identifiers of a v5 CONNACK body (MQTT 5.0 §3.2.2.3).
fn connack_property_ids(body: &[u8]) -> Result<Vec<u8>> {
    let mut at = 2;
    let mut len = 0usize;
    for shift in [0, 7, 14, 21] {
        let b = *body.get(at).context("CONNACK property length")?;
        at += 1;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    let end = at + len;
    ensure!(end <= body.len(), "CONNACK properties truncated");
    let mut ids = Vec::new();
    while at < end {
        let id = body[at];
        at += 1;
        ids.push(id);
        let two = |at: usize| -> Result<usize> {
            Ok(usize::from(u16::from_be_bytes([
                *body.get(at).context("truncated")?,
                *body.get(at + 1).context("truncated")?,
            ])))
        };
        at += match id {
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x13 | 0x21 | 0x22 => 2,
            0x11 | 0x27 => 4,
            0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => 2 + two(at)?,
            0x26 => {
                let key = 2 + two(at)?;
                key + 2 + two(at + key)?
            }
            other => bail!("unknown CONNACK property {other:#04x}"),
        };
    }
    Ok(ids)
}

/// Paho `test_offline_message_queueing`: QoS 1 and 2 messages published while a persistent session is
/// offline are delivered when it reconnects.
#[tokio::test]
async fn offline_messages_are_queued_for_a_persistent_session() -> Result<()> {
    run(|addr, version| async move {
        let [_, a_b, c_c, a_c] = topics(version);
        let persistent = Conn {
            clean: false,
            session_expiry: 600,
            ..Conn::new(version, "offline")
        };
        // Start from no session: a clean connection first.
        let (c, _) = Client::connected(addr, &Conn::new(version, "offline")).await?;
        c.disconnect().await?;
        let (mut c, _) = Client::connected(addr, &persistent).await?;
        let filters = [(a_b.as_str(), 2u8), (c_c.as_str(), 2), (a_c.as_str(), 2)];
        c.subscribe(&filters).await?;
        c.disconnect().await?;
        let (mut p, _) = Client::connected(addr, &Conn::new(version, "offline-pub")).await?;
        for (topic, qos) in [(&a_b, 0u8), (&c_c, 1), (&a_c, 2)] {
            p.publish(topic, qos, false, b"offline").await?;
        }
        p.disconnect().await?;
        let (mut c, session_present) = Client::connected(addr, &persistent).await?;
        ensure!(session_present, "the session was kept");
        // Paho accepts 2 or 3 messages: a server may queue QoS 0 messages too (3.1.1 §3.1.2.4).
        let mut got = c.receive(Vec::new(), 2).await?;
        if let Ok(Some(p)) = c.next_within(QUIET).await {
            if p.kind == PacketType::Publish {
                got.push(c.take(&p).await?);
            }
        }
        let names: Vec<&str> = got.iter().map(|g| g.topic.as_str()).collect();
        ensure!(
            names.contains(&c_c.as_str()) && names.contains(&a_c.as_str()),
            "QoS 1 and 2 messages queued: {got:?}"
        );
        c.disconnect().await
    })
    .await
}

/// Paho `test_overlapping_subscriptions`: a message matching two subscriptions is delivered once at the
/// higher QoS, or once per subscription at each one's QoS.
#[tokio::test]
async fn overlapping_subscriptions() -> Result<()> {
    run(|addr, version| async move {
        let [topic_a, _, _, a_c] = topics(version);
        let (mut c, _) = Client::connected(addr, &Conn::new(version, "overlap")).await?;
        let all = format!("{topic_a}/#");
        let one = format!("{topic_a}/+");
        c.subscribe(&[(&all, 2), (&one, 1)]).await?;
        let extra = c.publish(&a_c, 2, false, b"overlapping").await?;
        let first = c.receive(extra, 1).await?;
        let mut got = first.clone();
        if let Ok(Some(p)) = c.next_within(QUIET).await {
            if p.kind == PacketType::Publish {
                got.push(c.take(&p).await?);
            }
        }
        let mut qos: Vec<u8> = got.iter().map(|g| g.qos).collect();
        qos.sort_unstable();
        ensure!(
            qos == [2] || qos == [1, 2],
            "once at QoS 2, or once per subscription: {got:?}"
        );
        c.disconnect().await
    })
    .await
}

/// Paho `test_keepalive`: a client silent for 1.5 × its keep-alive is disconnected and its will
/// published.
#[tokio::test]
async fn keepalive_expiry_disconnects_and_publishes_the_will() -> Result<()> {
    run(|addr, version| async move {
        let [_, a_b, ..] = topics(version);
        let (mut sub, _) = Client::connected(addr, &Conn::new(version, "ka-sub")).await?;
        sub.subscribe(&[(&a_b, 2)]).await?;
        let conn = Conn {
            keep_alive: 2,
            will: Some((&a_b, b"keepalive expiry", 1, false)),
            ..Conn::new(version, "ka")
        };
        let (mut c, _) = Client::connected(addr, &conn).await?;
        ensure!(
            c.closed_within(Duration::from_secs(6)).await,
            "not disconnected after 1.5 × keep-alive (3 s)"
        );
        let got = sub.receive(Vec::new(), 1).await?;
        ensure!(got[0].payload == b"keepalive expiry");
        sub.disconnect().await
    })
    .await
}

/// Paho `test_redelivery_on_reconnect`: unacknowledged QoS 1 and 2 deliveries to a persistent session
/// are sent again, with DUP, after it reconnects.
#[tokio::test]
async fn unacknowledged_deliveries_are_redelivered_on_reconnect() -> Result<()> {
    run(|addr, version| async move {
        let [topic_a, a_b, _, a_c] = topics(version);
        let persistent = Conn {
            clean: false,
            session_expiry: 600,
            ..Conn::new(version, "redeliver")
        };
        let (c, _) = Client::connected(addr, &Conn::new(version, "redeliver")).await?;
        c.disconnect().await?;
        let (mut c, _) = Client::connected(addr, &persistent).await?;
        let all = format!("{topic_a}/#");
        c.subscribe(&[(&all, 2)]).await?;
        let (mut p, _) = Client::connected(addr, &Conn::new(version, "redeliver-pub")).await?;
        p.publish(&a_b, 1, false, b"r1").await?;
        p.publish(&a_c, 2, false, b"r2").await?;
        // Receive both without acknowledging, then go away.
        for _ in 0..2 {
            c.expect(PacketType::Publish).await?;
        }
        drop(c);
        let (mut c, session_present) = Client::connected(addr, &persistent).await?;
        ensure!(session_present, "the session was kept");
        let mut got = c.receive(Vec::new(), 2).await?;
        got.sort_by(|a, b| a.payload.cmp(&b.payload));
        let payloads: Vec<&[u8]> = got.iter().map(|g| g.payload.as_slice()).collect();
        ensure!(payloads == [b"r1", b"r2"], "both redelivered: {got:?}");
        c.disconnect().await?;
        p.disconnect().await
    })
    .await
}

/// Part of Paho `test_redelivery_on_reconnect`: a redelivered PUBLISH carries DUP = 1 (3.1.1 §3.3.1.1
/// [MQTT-3.3.1-1], 5.0 §3.3.1.1). Redeliveries happen to persistent sessions, which the edge agent's front
/// serves itself (rumqttd 0.20, serving them in the hub's set-up, redelivers with DUP = 0; listed in the
/// README).
#[tokio::test]
async fn redeliveries_carry_the_dup_flag() -> Result<()> {
    run_agent(|addr, version| async move {
        let [topic_a, a_b, ..] = topics(version);
        let persistent = Conn {
            clean: false,
            session_expiry: 600,
            ..Conn::new(version, "dup")
        };
        let (c, _) = Client::connected(addr, &Conn::new(version, "dup")).await?;
        c.disconnect().await?;
        let (mut c, _) = Client::connected(addr, &persistent).await?;
        c.subscribe(&[(&format!("{topic_a}/#"), 1)]).await?;
        let (mut p, _) = Client::connected(addr, &Conn::new(version, "dup-pub")).await?;
        p.publish(&a_b, 1, false, b"d1").await?;
        c.expect(PacketType::Publish).await?;
        drop(c);
        let (mut c, _) = Client::connected(addr, &persistent).await?;
        let got = c.receive(Vec::new(), 1).await?;
        ensure!(got[0].dup, "redelivery without DUP: {got:?}");
        c.disconnect().await?;
        p.disconnect().await
    })
    .await
}

/// Paho `test_subscribe_failure`: a subscription the server does not accept is answered with a failure
/// code (3.1.1: 0x80; 5.0: a reason ≥ 0x80), not silently granted. Paho uses a topic its broker is
/// configured to refuse; an embedded broker has no such ACL, so an invalid filter stands in for it
/// (MQTT 3.1.1 §4.7.1, 5.0 §4.7.1: `#` must be last); closing the connection is also conformant.
#[tokio::test]
async fn invalid_subscription_is_refused() -> Result<()> {
    run(|addr, version| async move {
        let (mut c, _) = Client::connected(addr, &Conn::new(version, "subfail")).await?;
        let id = c.id();
        c.send(&subscribe(version, id, &[("a/#/b", 1)])).await?;
        match c.next_within(WAIT).await? {
            None => Ok(()),
            Some(p) if p.kind == PacketType::Suback => {
                let code = *p.body.last().context("empty SUBACK")?;
                ensure!(code >= 0x80, "invalid filter granted: {:02x?}", &p.body[..]);
                Ok(())
            }
            Some(p) => bail!("unexpected {p:?}"),
        }
    })
    .await
}

/// Paho `test_dollar_topics`: a wildcard at the first level does not match topics starting with `$`.
#[tokio::test]
async fn wildcards_do_not_match_dollar_topics() -> Result<()> {
    run(|addr, version| async move {
        let [_, a_b, ..] = topics(version);
        let (mut c, _) = Client::connected(addr, &Conn::new(version, "dollar")).await?;
        c.subscribe(&[("#", 2), ("+/+", 2)]).await?;
        let dollar = format!("${a_b}");
        let mut extra = c.publish(&dollar, 1, false, b"dollar").await?;
        extra.extend(c.publish(&a_b, 1, false, b"marker").await?);
        let got = c.receive(extra, 1).await?;
        ensure!(got[0].topic == a_b, "a $ topic matched a wildcard: {got:?}");
        // `+/+` matches the marker a second time; nothing else may arrive.
        if let Ok(Some(p)) = c.next_within(QUIET).await {
            let more = c.take(&p).await?;
            ensure!(more.topic == a_b, "a $ topic matched a wildcard: {more:?}");
        }
        c.disconnect().await
    })
    .await
}

/// Paho `test_unsubscribe`: after unsubscribing two of three topics, only the third is delivered.
#[tokio::test]
async fn unsubscribe_stops_delivery() -> Result<()> {
    run(|addr, version| async move {
        let [_, a_b, c_c, a_c] = topics(version);
        let (mut c, _) = Client::connected(addr, &Conn::new(version, "unsub")).await?;
        c.subscribe(&[(&a_b, 2), (&c_c, 2), (&a_c, 2)]).await?;
        c.unsubscribe(&[&a_b, &c_c]).await?;
        let mut extra = Vec::new();
        for topic in [&a_b, &c_c, &a_c] {
            extra.extend(c.publish(topic, 1, false, b"unsub").await?);
        }
        let got = c.receive(extra, 1).await?;
        ensure!(got[0].topic == a_c, "{got:?}");
        c.quiet()
            .await
            .context("an unsubscribed topic was delivered")?;
        c.disconnect().await
    })
    .await
}

// ---------------------------------------------------------------------------------------------------
// Protocol violations the front closes on (issue 7, hole 13).

/// A second CONNECT on one connection closes it (3.1.1 §3.1 [MQTT-3.1.0-2], 5.0 §3.1).
#[tokio::test]
async fn second_connect_closes_the_connection() -> Result<()> {
    run(|addr, version| async move {
        let conn = Conn::new(version, "twice");
        let (mut c, _) = Client::connected(addr, &conn).await?;
        c.send(&conn.encode()).await?;
        ensure!(c.closed_within(WAIT).await, "a second CONNECT was ignored");
        Ok(())
    })
    .await
}

/// An empty topic name: 3.1.1 forbids it (§4.7.3 [MQTT-4.7.3-1]), 5.0 allows it only with a topic
/// alias (§3.3.2.1). Either way the QoS 1 PUBLISH gets no PUBACK, the connection is closed, and
/// nothing is committed.
#[tokio::test]
async fn empty_topic_closes_the_connection_without_ack() -> Result<()> {
    timeout(TEST, async {
        let mesh = Mesh::start().await?;
        for version in [V4, V5] {
            let (mut c, _) = Client::connected(mesh.addr, &Conn::new(version, "empty")).await?;
            c.send(&publish(version, "", 1, false, 1, b"nowhere"))
                .await?;
            match c.next_within(WAIT).await {
                Ok(None) => {}
                other => bail!("{version:?}: expected a close, got {other:?}"),
            }
        }
        ensure!(
            mesh.committed().iter().all(|t| !t.is_empty()),
            "an empty topic was committed"
        );
        mesh.stop().await
    })
    .await?
}

/// A wildcard in a PUBLISH topic name is malformed (3.1.1 §4.7.1 [MQTT-3.3.2-2]): closed, not acked.
#[tokio::test]
async fn wildcard_in_topic_name_closes_the_connection() -> Result<()> {
    run(|addr, version| async move {
        let (mut c, _) = Client::connected(addr, &Conn::new(version, "wild")).await?;
        c.send(&publish(version, "a/+/b", 1, false, 1, b"x"))
            .await?;
        match c.next_within(WAIT).await {
            Ok(None) => Ok(()),
            other => bail!("expected a close, got {other:?}"),
        }
    })
    .await
}
