//! The front against a real embedded rumqttd and real rumqttc clients on loopback ephemeral ports.
//!
//! The test plays the commit pipeline: it receives the front's `CommitRequest`s and decides when and
//! how to answer, so it can check that a publisher's ack waits for the commit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use meshbridge_broker::embedded::EmbeddedBroker;
use meshbridge_broker::front::{CommitRejected, FrontOptions};
use shared::limits::{PathLimits, SharedLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

mod front_harness;
use front_harness::{Harness, WAIT};

/// How long "no ack yet" is observed while the commit is held.
const HOLD: Duration = Duration::from_millis(300);

/// A v4 client whose event loop runs in a task, forwarding events.
fn v4_client(
    id: &str,
    addr: SocketAddr,
    inflight: u16,
) -> (
    rumqttc::AsyncClient,
    mpsc::UnboundedReceiver<Result<rumqttc::Event, rumqttc::ConnectionError>>,
    JoinHandle<()>,
) {
    let mut options = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(inflight);
    v4_client_with(options)
}

/// [`v4_client`] with options of the caller's.
fn v4_client_with(
    options: rumqttc::MqttOptions,
) -> (
    rumqttc::AsyncClient,
    mpsc::UnboundedReceiver<Result<rumqttc::Event, rumqttc::ConnectionError>>,
    JoinHandle<()>,
) {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await;
            let failed = event.is_err();
            if tx.send(event).is_err() || failed {
                return;
            }
        }
    });
    (client, rx, task)
}

/// A v5 client whose event loop runs in a task, forwarding events.
fn v5_client(
    id: &str,
    addr: SocketAddr,
) -> (
    rumqttc::v5::AsyncClient,
    mpsc::UnboundedReceiver<Result<rumqttc::v5::Event, rumqttc::v5::ConnectionError>>,
    JoinHandle<()>,
) {
    let mut options = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 1000);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await;
            let failed = event.is_err();
            if tx.send(event).is_err() || failed {
                return;
            }
        }
    });
    (client, rx, task)
}

type V4Events = mpsc::UnboundedReceiver<Result<rumqttc::Event, rumqttc::ConnectionError>>;
type V5Events = mpsc::UnboundedReceiver<Result<rumqttc::v5::Event, rumqttc::v5::ConnectionError>>;

/// Waits for the first incoming v4 packet `pick` accepts; fails on a connection error.
async fn v4_wait<T>(
    events: &mut V4Events,
    mut pick: impl FnMut(&rumqttc::Packet) -> Option<T>,
) -> Result<T> {
    timeout(WAIT, async {
        while let Some(event) = events.recv().await {
            if let rumqttc::Event::Incoming(packet) = event? {
                if let Some(found) = pick(&packet) {
                    return Ok(found);
                }
            }
        }
        bail!("event loop ended")
    })
    .await
    .context("timed out waiting for a v4 packet")?
}

/// Waits for the first incoming v5 packet `pick` accepts; fails on a connection error.
async fn v5_wait<T>(
    events: &mut V5Events,
    mut pick: impl FnMut(&rumqttc::v5::mqttbytes::v5::Packet) -> Option<T>,
) -> Result<T> {
    timeout(WAIT, async {
        while let Some(event) = events.recv().await {
            if let rumqttc::v5::Event::Incoming(packet) = event? {
                if let Some(found) = pick(&packet) {
                    return Ok(found);
                }
            }
        }
        bail!("event loop ended")
    })
    .await
    .context("timed out waiting for a v5 packet")?
}

/// True if a v4 PUBACK arrives within `within`.
async fn v4_puback_within(events: &mut V4Events, within: Duration) -> bool {
    timeout(
        within,
        v4_wait(events, |p| {
            matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
        }),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

/// A subscriber connected directly to the broker's v4 listener, subscribed to `#` and ready.
async fn subscriber(
    broker: &EmbeddedBroker,
    id: &str,
) -> Result<(rumqttc::AsyncClient, V4Events, JoinHandle<()>)> {
    // Straight to the internal listener, which takes only the broker's per-start login.
    let addr = broker.v4_addr;
    let mut options = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    let login = broker.login();
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(100)
        .set_credentials(login.user(), login.secret());
    let (client, mut events, task) = v4_client_with(options);
    v4_wait(&mut events, |p| {
        matches!(p, rumqttc::Packet::ConnAck(_)).then_some(())
    })
    .await?;
    client.subscribe("#", rumqttc::QoS::AtLeastOnce).await?;
    v4_wait(&mut events, |p| {
        matches!(p, rumqttc::Packet::SubAck(_)).then_some(())
    })
    .await?;
    Ok((client, events, task))
}

#[tokio::test]
async fn v4_puback_waits_for_the_commit() -> Result<()> {
    timeout(Duration::from_secs(30), async {
        let mut h = Harness::start().await?;
        let (_sub, mut sub_events, sub_task) = subscriber(&h.broker, "sub-v4").await?;
        let (client, mut events, task) = v4_client("pub-v4", h.front_addr, 10);
        v4_wait(&mut events, |p| {
            matches!(p, rumqttc::Packet::ConnAck(_)).then_some(())
        })
        .await?;

        client
            .publish("sel/line1/temp", rumqttc::QoS::AtLeastOnce, false, "21.5")
            .await?;
        let request = h.next_commit().await?;
        ensure!(request.messages.len() == 1, "one message in the batch");
        let captured = &request.messages[0].publish;
        ensure!(captured.topic == "sel/line1/temp" && &captured.payload[..] == b"21.5");
        ensure!(captured.qos == shared::mqtt::QoS::AtLeastOnce);

        // The broker has the message (forwarded at once) but the publisher has no ack yet.
        let delivered = v4_wait(&mut sub_events, |p| match p {
            rumqttc::Packet::Publish(p) => Some(p.topic.clone()),
            _ => None,
        })
        .await?;
        ensure!(delivered == "sel/line1/temp");
        ensure!(
            !v4_puback_within(&mut events, HOLD).await,
            "PUBACK arrived before the commit finished"
        );

        request
            .done
            .send(Ok(()))
            .map_err(|_| anyhow::anyhow!("front dropped the request"))?;
        ensure!(
            v4_puback_within(&mut events, WAIT).await,
            "PUBACK did not arrive after the commit"
        );

        task.abort();
        sub_task.abort();
        h.stop().await
    })
    .await?
}

#[tokio::test]
async fn v5_puback_waits_for_the_commit_and_keeps_user_properties() -> Result<()> {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    timeout(Duration::from_secs(30), async {
        let mut h = Harness::start().await?;
        let (client, mut events, task) = v5_client("pub-v5", h.front_addr);
        v5_wait(&mut events, |p| {
            matches!(p, Packet::ConnAck(_)).then_some(())
        })
        .await?;

        let properties = PublishProperties {
            user_properties: vec![
                ("traceparent".into(), "00-abc-def-01".into()),
                ("k".into(), "v".into()),
            ],
            content_type: Some("text/plain".into()),
            ..PublishProperties::default()
        };
        client
            .publish_with_properties("sel/v5", QoS::AtLeastOnce, false, "x", properties)
            .await?;
        let request = h.next_commit().await?;
        let captured = &request.messages[0].publish;
        ensure!(captured.topic == "sel/v5");
        ensure!(
            captured.properties.user_properties
                == vec![
                    ("traceparent".to_owned(), "00-abc-def-01".to_owned()),
                    ("k".to_owned(), "v".to_owned())
                ],
            "user properties kept in order: {:?}",
            captured.properties.user_properties
        );
        ensure!(captured.properties.content_type.as_deref() == Some("text/plain"));

        let early = timeout(
            HOLD,
            v5_wait(&mut events, |p| {
                matches!(p, Packet::PubAck(_)).then_some(())
            }),
        )
        .await;
        ensure!(early.is_err(), "PUBACK arrived before the commit finished");
        request
            .done
            .send(Ok(()))
            .map_err(|_| anyhow::anyhow!("front dropped the request"))?;
        let reason = v5_wait(&mut events, |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await?;
        ensure!(
            reason == rumqttc::v5::mqttbytes::v5::PubAckReason::Success,
            "reason {reason:?}"
        );

        task.abort();
        h.stop().await
    })
    .await?
}

#[tokio::test]
async fn unselected_topics_pass_without_commit() -> Result<()> {
    timeout(Duration::from_secs(30), async {
        let mut h = Harness::start().await?;
        let (_sub, mut sub_events, sub_task) = subscriber(&h.broker, "sub-other").await?;
        let (client, mut events, task) = v4_client("pub-other", h.front_addr, 10);
        v4_wait(&mut events, |p| {
            matches!(p, rumqttc::Packet::ConnAck(_)).then_some(())
        })
        .await?;

        client
            .publish("other/x", rumqttc::QoS::AtLeastOnce, false, "1")
            .await?;
        client
            .publish("other/y", rumqttc::QoS::AtMostOnce, false, "2")
            .await?;
        ensure!(
            v4_puback_within(&mut events, WAIT).await,
            "PUBACK for an unselected topic"
        );
        for expected in ["other/x", "other/y"] {
            let topic = v4_wait(&mut sub_events, |p| match p {
                rumqttc::Packet::Publish(p) => Some(p.topic.clone()),
                _ => None,
            })
            .await?;
            ensure!(topic == expected, "delivered {topic}, expected {expected}");
        }
        ensure!(
            h.commits.try_recv().is_err(),
            "no commit request for unselected topics"
        );

        task.abort();
        sub_task.abort();
        h.stop().await
    })
    .await?
}

/// With `capture_retained`, a retained PUBLISH is captured whatever `select` says and its PUBACK waits for
/// the commit (the agent keeps it on disk first); a plain one on the same topic still passes at once.
#[tokio::test]
async fn retained_publishes_are_captured_when_asked() -> Result<()> {
    timeout(Duration::from_secs(30), async {
        let mut h = Harness::start_with(FrontOptions {
            capture_retained: true,
            ..FrontOptions::default()
        })
        .await?;
        let (client, mut events, task) = v4_client("pub-retained", h.front_addr, 10);
        v4_wait(&mut events, |p| {
            matches!(p, rumqttc::Packet::ConnAck(_)).then_some(())
        })
        .await?;

        client
            .publish("other/plain", rumqttc::QoS::AtLeastOnce, false, "1")
            .await?;
        ensure!(
            v4_puback_within(&mut events, WAIT).await,
            "a plain unselected PUBLISH is acknowledged without a commit"
        );
        ensure!(h.commits.try_recv().is_err(), "nothing captured for it");

        client
            .publish("status/door", rumqttc::QoS::AtLeastOnce, true, "open")
            .await?;
        let request = h.next_commit().await?;
        let got: Vec<(String, bool)> = request
            .messages
            .iter()
            .map(|m| (m.publish.topic.clone(), m.publish.retain))
            .collect();
        ensure!(
            got == [("status/door".to_owned(), true)],
            "captured {got:?}"
        );
        ensure!(
            !v4_puback_within(&mut events, Duration::from_millis(300)).await,
            "the retained PUBLISH's PUBACK waits for its commit"
        );
        request
            .done
            .send(Ok(()))
            .map_err(|_| anyhow::anyhow!("front dropped the request"))?;
        ensure!(
            v4_puback_within(&mut events, WAIT).await,
            "PUBACK after the commit"
        );
        task.abort();
        h.stop().await
    })
    .await?
}

#[tokio::test]
async fn v5_rejected_commit_answers_quota_exceeded() -> Result<()> {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::mqttbytes::QoS;
    timeout(Duration::from_secs(30), async {
        let mut h = Harness::start().await?;
        let (client, mut events, task) = v5_client("pub-v5-reject", h.front_addr);
        v5_wait(&mut events, |p| {
            matches!(p, Packet::ConnAck(_)).then_some(())
        })
        .await?;

        client
            .publish("sel/full", QoS::AtLeastOnce, false, "x")
            .await?;
        let request = h.next_commit().await?;
        request
            .done
            .send(Err(CommitRejected::QueueFull))
            .map_err(|_| anyhow::anyhow!("front dropped the request"))?;
        let reason = v5_wait(&mut events, |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await?;
        ensure!(reason == PubAckReason::QuotaExceeded, "reason {reason:?}");

        // The connection stays usable.
        client
            .publish("sel/full", QoS::AtLeastOnce, false, "y")
            .await?;
        h.next_commit()
            .await?
            .done
            .send(Ok(()))
            .map_err(|_| anyhow::anyhow!("front dropped the request"))?;
        let reason = v5_wait(&mut events, |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await?;
        ensure!(reason == PubAckReason::Success, "reason {reason:?}");

        task.abort();
        h.stop().await
    })
    .await?
}

#[tokio::test]
async fn v4_rejected_commit_closes_the_connection() -> Result<()> {
    timeout(Duration::from_secs(30), async {
        let mut h = Harness::start().await?;
        let (client, mut events, task) = v4_client("pub-v4-reject", h.front_addr, 10);
        v4_wait(&mut events, |p| {
            matches!(p, rumqttc::Packet::ConnAck(_)).then_some(())
        })
        .await?;

        client
            .publish("sel/full", rumqttc::QoS::AtLeastOnce, false, "x")
            .await?;
        let request = h.next_commit().await?;
        request
            .done
            .send(Err(CommitRejected::StorageFull))
            .map_err(|_| anyhow::anyhow!("front dropped the request"))?;
        let outcome = timeout(WAIT, async {
            while let Some(event) = events.recv().await {
                match event {
                    Err(_) => return Ok(()),
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        bail!("PUBACK after a rejected commit")
                    }
                    Ok(_) => {}
                }
            }
            Ok(())
        })
        .await
        .context("connection was not closed")?;
        outcome?;

        task.abort();
        h.stop().await
    })
    .await?
}

#[tokio::test]
async fn many_messages_are_captured_once_in_order_and_all_acked() -> Result<()> {
    const COUNT: usize = 2_000;
    timeout(Duration::from_secs(60), async {
        let mut h = Harness::start().await?;
        let (client, mut events, task) = v4_client("pub-many", h.front_addr, 100);
        v4_wait(&mut events, |p| {
            matches!(p, rumqttc::Packet::ConnAck(_)).then_some(())
        })
        .await?;

        let mut commits = std::mem::replace(&mut h.commits, mpsc::channel(1).1);
        let pipeline = tokio::spawn(async move {
            let mut payloads = Vec::with_capacity(COUNT);
            let mut batches = 0usize;
            while payloads.len() < COUNT {
                let Some(request) = commits.recv().await else {
                    break;
                };
                batches += 1;
                payloads.extend(request.messages.iter().map(|m| m.publish.payload.clone()));
                let _ = request.done.send(Ok(()));
            }
            (payloads, batches, commits)
        });
        let publisher = tokio::spawn(async move {
            for i in 0..COUNT {
                client
                    .publish("sel/many", rumqttc::QoS::AtLeastOnce, false, i.to_string())
                    .await?;
            }
            Ok::<_, anyhow::Error>(client)
        });

        let mut acks = 0;
        while acks < COUNT {
            v4_wait(&mut events, |p| {
                matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
            })
            .await?;
            acks += 1;
        }
        let _client = publisher.await??;
        let (payloads, batches, commits) = timeout(WAIT, pipeline).await??;
        h.commits = commits;
        ensure!(
            payloads.len() == COUNT,
            "captured {} of {COUNT}",
            payloads.len()
        );
        for (i, payload) in payloads.iter().enumerate() {
            ensure!(
                payload[..] == *i.to_string().as_bytes(),
                "message {i} out of order or duplicated"
            );
        }
        ensure!(batches <= COUNT, "{batches} batches");
        ensure!(h.commits.try_recv().is_err(), "no extra commit request");

        task.abort();
        h.stop().await
    })
    .await?
}

/// Sends raw bytes to the front and returns everything it answers until it closes.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8], read_until_close: bool) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(bytes).await?;
    let mut answer = Vec::new();
    if read_until_close {
        timeout(WAIT, stream.read_to_end(&mut answer)).await??;
    } else {
        let mut buf = [0u8; 64];
        let n = timeout(WAIT, stream.read(&mut buf)).await??;
        answer.extend_from_slice(&buf[..n]);
    }
    Ok(answer)
}

#[tokio::test]
async fn mqtt_3_1_is_refused_and_keep_alive_zero_is_accepted() -> Result<()> {
    timeout(Duration::from_secs(30), async {
        let h = Harness::start().await?;
        let v31 = [
            0x10, 0x11, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 3, b'a', b'b',
            b'c',
        ];
        let answer = raw_exchange(h.front_addr, &v31, true).await?;
        ensure!(answer == [0x20, 2, 0, 1], "MQTT 3.1 refusal: {answer:02x?}");

        // Keep-alive 0 is valid MQTT; rumqttd rejects it, so the front rewrites it.
        let ka0 = [
            0x10, 0x0f, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0, 0, 3, b'k', b'a', b'0',
        ];
        let answer = raw_exchange(h.front_addr, &ka0, false).await?;
        ensure!(
            answer == [0x20, 2, 0, 0],
            "keep-alive 0 CONNACK: {answer:02x?}"
        );
        h.stop().await
    })
    .await?
}

#[tokio::test]
async fn v4_qos2_pubrec_waits_for_the_commit() -> Result<()> {
    timeout(Duration::from_secs(30), async {
        let mut h = Harness::start().await?;
        let (client, mut events, task) = v4_client("pub-qos2", h.front_addr, 10);
        v4_wait(&mut events, |p| {
            matches!(p, rumqttc::Packet::ConnAck(_)).then_some(())
        })
        .await?;

        client
            .publish("sel/q2", rumqttc::QoS::ExactlyOnce, false, "once")
            .await?;
        let request = h.next_commit().await?;
        ensure!(request.messages[0].publish.qos == shared::mqtt::QoS::ExactlyOnce);
        let early = timeout(
            HOLD,
            v4_wait(&mut events, |p| {
                matches!(p, rumqttc::Packet::PubRec(_)).then_some(())
            }),
        )
        .await;
        ensure!(early.is_err(), "PUBREC arrived before the commit finished");
        request
            .done
            .send(Ok(()))
            .map_err(|_| anyhow::anyhow!("front dropped the request"))?;
        v4_wait(&mut events, |p| {
            matches!(p, rumqttc::Packet::PubRec(_)).then_some(())
        })
        .await?;
        v4_wait(&mut events, |p| {
            matches!(p, rumqttc::Packet::PubComp(_)).then_some(())
        })
        .await?;

        task.abort();
        h.stop().await
    })
    .await?
}

#[tokio::test]
async fn v5_topic_aliases_are_resolved_in_captures() -> Result<()> {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    timeout(Duration::from_secs(30), async {
        let mut h = Harness::start().await?;
        let (client, mut events, task) = v5_client("pub-alias", h.front_addr);
        v5_wait(&mut events, |p| {
            matches!(p, Packet::ConnAck(_)).then_some(())
        })
        .await?;

        let with_alias = || PublishProperties {
            topic_alias: Some(3),
            ..PublishProperties::default()
        };
        client
            .publish_with_properties("sel/aliased", QoS::AtMostOnce, false, "1", with_alias())
            .await?;
        client
            .publish_with_properties("", QoS::AtMostOnce, false, "2", with_alias())
            .await?;
        let mut captured = Vec::new();
        while captured.len() < 2 {
            let request = h.next_commit().await?;
            captured.extend(request.messages.into_iter().map(|m| m.publish));
        }
        for (publish, payload) in captured.iter().zip(["1", "2"]) {
            ensure!(publish.topic == "sel/aliased", "topic {:?}", publish.topic);
            ensure!(publish.properties.topic_alias.is_none(), "alias cleared");
            ensure!(&publish.payload[..] == payload.as_bytes());
        }

        task.abort();
        h.stop().await
    })
    .await?
}

/// A front whose path carries payloads up to `max_message_size` bytes and topics up to `max_topic_len`.
async fn limited(
    max_message_size: u32,
    max_topic_len: u16,
) -> Result<(Harness, Arc<SharedLimits>)> {
    limited_frame(max_message_size, max_topic_len, 1 << 20).await
}

/// As [`limited`], with an agent↔hub frame of `max_frame_size` bytes.
async fn limited_frame(
    max_message_size: u32,
    max_topic_len: u16,
    max_frame_size: u32,
) -> Result<(Harness, Arc<SharedLimits>)> {
    let limits = Arc::new(SharedLimits::new(max_message_size, max_frame_size, "site"));
    limits.announce(PathLimits {
        max_message_size,
        max_topic_len,
        max_frame_size,
    });
    let options = FrontOptions {
        limits: Some(Arc::clone(&limits)),
        ..FrontOptions::default()
    };
    Ok((Harness::start_with(options).await?, limits))
}

/// Answers the next commit request with success and returns the topics and payload lengths it held.
async fn commit_ok(h: &mut Harness) -> Result<Vec<(String, usize)>> {
    let request = h.next_commit().await?;
    let got = request
        .messages
        .iter()
        .map(|m| (m.publish.topic.clone(), m.publish.payload.len()))
        .collect();
    request
        .done
        .send(Ok(()))
        .map_err(|_| anyhow::anyhow!("front dropped the request"))?;
    Ok(got)
}

#[tokio::test]
async fn v5_oversize_publish_is_refused_with_a_reason_and_later_messages_flow() -> Result<()> {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PubRecReason};
    use rumqttc::v5::mqttbytes::QoS;
    timeout(Duration::from_secs(30), async {
        let (mut h, limits) = limited(1000, u16::MAX).await?;
        let (_sub, mut sub_events, sub_task) = subscriber(&h.broker, "sub-big-v5").await?;
        let (client, mut events, task) = v5_client("pub-big-v5", h.front_addr);
        v5_wait(&mut events, |p| {
            matches!(p, Packet::ConnAck(_)).then_some(())
        })
        .await?;

        let big = vec![b'x'; 1001];
        client
            .publish("sel/big", QoS::AtLeastOnce, false, big.clone())
            .await?;
        let reason = v5_wait(&mut events, |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await?;
        ensure!(
            reason == PubAckReason::ImplementationSpecificError,
            "QoS 1 refusal reason {reason:?}"
        );
        client
            .publish("sel/big2", QoS::ExactlyOnce, false, big.clone())
            .await?;
        let reason = v5_wait(&mut events, |p| match p {
            Packet::PubRec(rec) => Some(rec.reason),
            _ => None,
        })
        .await?;
        ensure!(
            reason == PubRecReason::ImplementationSpecificError,
            "QoS 2 refusal reason {reason:?}"
        );

        // A message at the limit still goes through: committed (the refused ones never were, the commit
        // channel is FIFO), acknowledged with success, delivered.
        client
            .publish("sel/ok", QoS::AtLeastOnce, false, vec![b'y'; 1000])
            .await?;
        let committed = commit_ok(&mut h).await?;
        ensure!(
            committed == vec![("sel/ok".to_owned(), 1000)],
            "committed {committed:?}"
        );
        let reason = v5_wait(&mut events, |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await?;
        ensure!(reason == PubAckReason::Success, "reason {reason:?}");
        let delivered = v4_wait(&mut sub_events, |p| match p {
            rumqttc::Packet::Publish(p) => Some(p.topic.clone()),
            _ => None,
        })
        .await?;
        ensure!(delivered == "sel/ok", "the broker got {delivered} first");
        ensure!(limits.refused() == 2, "refused {}", limits.refused());

        // Topics no route selects stay local and are not limited.
        client
            .publish("local/big", QoS::AtLeastOnce, false, big)
            .await?;
        let reason = v5_wait(&mut events, |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await?;
        ensure!(reason == PubAckReason::Success, "local reason {reason:?}");
        ensure!(h.commits.try_recv().is_err(), "nothing else committed");

        task.abort();
        sub_task.abort();
        h.stop().await
    })
    .await?
}

#[tokio::test]
async fn v5_topic_too_long_for_the_hub_namespace_is_refused() -> Result<()> {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::mqttbytes::QoS;
    timeout(Duration::from_secs(30), async {
        // The hub left 10 bytes of topic to this site.
        let (mut h, limits) = limited(1000, 10).await?;
        let (client, mut events, task) = v5_client("pub-long-v5", h.front_addr);
        v5_wait(&mut events, |p| {
            matches!(p, Packet::ConnAck(_)).then_some(())
        })
        .await?;
        client
            .publish("sel/eleven!", QoS::AtLeastOnce, false, "x")
            .await?;
        let reason = v5_wait(&mut events, |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await?;
        ensure!(
            reason == PubAckReason::TopicNameInvalid,
            "reason {reason:?}"
        );
        client
            .publish("sel/ten_12", QoS::AtLeastOnce, false, "y")
            .await?;
        let committed = commit_ok(&mut h).await?;
        ensure!(
            committed == vec![("sel/ten_12".to_owned(), 1)],
            "committed {committed:?}"
        );
        let reason = v5_wait(&mut events, |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await?;
        ensure!(reason == PubAckReason::Success, "reason {reason:?}");
        ensure!(limits.refused() == 1);

        task.abort();
        h.stop().await
    })
    .await?
}

#[tokio::test]
async fn v4_oversize_publish_is_acked_discarded_and_later_messages_flow() -> Result<()> {
    timeout(Duration::from_secs(30), async {
        let (mut h, limits) = limited(1000, u16::MAX).await?;
        let (_sub, mut sub_events, sub_task) = subscriber(&h.broker, "sub-big-v4").await?;
        let (client, mut events, task) = v4_client("pub-big-v4", h.front_addr, 10);
        v4_wait(&mut events, |p| {
            matches!(p, rumqttc::Packet::ConnAck(_)).then_some(())
        })
        .await?;

        let big = vec![b'x'; 1001];
        // 3.1.1 has no negative ack: as Mosquitto's message_size_limit, acknowledged and discarded.
        client
            .publish("sel/big", rumqttc::QoS::AtLeastOnce, false, big.clone())
            .await?;
        ensure!(
            v4_puback_within(&mut events, WAIT).await,
            "no PUBACK for the refused QoS 1 message"
        );
        // QoS 2: PUBREC, then the front itself completes the exchange with PUBCOMP.
        client
            .publish("sel/big2", rumqttc::QoS::ExactlyOnce, false, big.clone())
            .await?;
        v4_wait(&mut events, |p| {
            matches!(p, rumqttc::Packet::PubRec(_)).then_some(())
        })
        .await?;
        v4_wait(&mut events, |p| {
            matches!(p, rumqttc::Packet::PubComp(_)).then_some(())
        })
        .await?;
        client
            .publish("sel/big0", rumqttc::QoS::AtMostOnce, false, big)
            .await?;

        client
            .publish("sel/ok", rumqttc::QoS::AtLeastOnce, false, "fine")
            .await?;
        let committed = commit_ok(&mut h).await?;
        ensure!(
            committed == vec![("sel/ok".to_owned(), 4)],
            "committed {committed:?}"
        );
        ensure!(
            v4_puback_within(&mut events, WAIT).await,
            "no PUBACK for the message after the refused ones"
        );
        let delivered = v4_wait(&mut sub_events, |p| match p {
            rumqttc::Packet::Publish(p) => Some(p.topic.clone()),
            _ => None,
        })
        .await?;
        ensure!(delivered == "sel/ok", "the broker got {delivered} first");
        ensure!(limits.refused() == 3, "refused {}", limits.refused());

        task.abort();
        sub_task.abort();
        h.stop().await
    })
    .await?
}

#[tokio::test]
async fn v5_alias_defined_by_a_refused_publish_still_works() -> Result<()> {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    timeout(Duration::from_secs(30), async {
        let (mut h, _limits) = limited(1000, u16::MAX).await?;
        let (_sub, mut sub_events, sub_task) = subscriber(&h.broker, "sub-alias").await?;
        let (client, mut events, task) = v5_client("pub-alias-big", h.front_addr);
        v5_wait(&mut events, |p| {
            matches!(p, Packet::ConnAck(_)).then_some(())
        })
        .await?;
        let alias = || PublishProperties {
            topic_alias: Some(4),
            ..PublishProperties::default()
        };
        // Defines alias 4 with a message the front refuses: the broker never sees the definition.
        client
            .publish_with_properties(
                "sel/aliased",
                QoS::AtLeastOnce,
                false,
                vec![b'x'; 1001],
                alias(),
            )
            .await?;
        let reason = v5_wait(&mut events, |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await?;
        ensure!(
            reason == PubAckReason::ImplementationSpecificError,
            "{reason:?}"
        );
        // Uses only the alias: committed under the real topic, acknowledged, delivered by the broker.
        client
            .publish_with_properties("", QoS::AtLeastOnce, false, "small", alias())
            .await?;
        let committed = commit_ok(&mut h).await?;
        ensure!(
            committed == vec![("sel/aliased".to_owned(), 5)],
            "committed {committed:?}"
        );
        let reason = v5_wait(&mut events, |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await?;
        ensure!(reason == PubAckReason::Success, "{reason:?}");
        let delivered = v4_wait(&mut sub_events, |p| match p {
            rumqttc::Packet::Publish(p) => Some((p.topic.clone(), p.payload.clone())),
            _ => None,
        })
        .await?;
        ensure!(
            delivered.0 == "sel/aliased" && &delivered.1[..] == b"small",
            "broker delivered {delivered:?}"
        );

        task.abort();
        sub_task.abort();
        h.stop().await
    })
    .await?
}

/// A message within the payload limit whose queue entry (payload, topic, properties, envelope fields)
/// would not fit one frame to the hub is refused too: queued, it would stop the uplink for good.
#[tokio::test]
async fn v5_message_too_large_for_a_frame_is_refused() -> Result<()> {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::mqttbytes::QoS;
    timeout(Duration::from_secs(30), async {
        // Payloads up to 10,000 bytes, but frames of 1,100 bytes.
        let (mut h, limits) = limited_frame(10_000, u16::MAX, 1_100).await?;
        let (client, mut events, task) = v5_client("pub-frame", h.front_addr);
        v5_wait(&mut events, |p| {
            matches!(p, Packet::ConnAck(_)).then_some(())
        })
        .await?;
        client
            .publish("sel/f", QoS::AtLeastOnce, false, vec![b'x'; 1_080])
            .await?;
        let reason = v5_wait(&mut events, |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await?;
        ensure!(
            reason == PubAckReason::ImplementationSpecificError,
            "{reason:?}"
        );
        client
            .publish("sel/f", QoS::AtLeastOnce, false, vec![b'y'; 1_000])
            .await?;
        let committed = commit_ok(&mut h).await?;
        ensure!(
            committed == vec![("sel/f".to_owned(), 1_000)],
            "{committed:?}"
        );
        let reason = v5_wait(&mut events, |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await?;
        ensure!(reason == PubAckReason::Success, "{reason:?}");
        ensure!(limits.refused() == 1);

        task.abort();
        h.stop().await
    })
    .await?
}

/// 3.1.1 has no negative ack: a topic too long for the hub's namespace is handled as an oversize message
/// (acknowledged, discarded, counted), and the connection keeps working.
#[tokio::test]
async fn v4_topic_too_long_for_the_hub_namespace_is_acked_and_discarded() -> Result<()> {
    timeout(Duration::from_secs(30), async {
        let (mut h, limits) = limited(1000, 10).await?;
        let (client, mut events, task) = v4_client("pub-long-v4", h.front_addr, 10);
        v4_wait(&mut events, |p| {
            matches!(p, rumqttc::Packet::ConnAck(_)).then_some(())
        })
        .await?;
        client
            .publish("sel/eleven!", rumqttc::QoS::AtLeastOnce, false, "x")
            .await?;
        ensure!(
            v4_puback_within(&mut events, WAIT).await,
            "no PUBACK for the refused message"
        );
        client
            .publish("sel/ten_12", rumqttc::QoS::AtLeastOnce, false, "y")
            .await?;
        let committed = commit_ok(&mut h).await?;
        ensure!(
            committed == vec![("sel/ten_12".to_owned(), 1)],
            "committed {committed:?}"
        );
        ensure!(v4_puback_within(&mut events, WAIT).await, "no PUBACK after");
        ensure!(limits.refused() == 1);

        task.abort();
        h.stop().await
    })
    .await?
}
