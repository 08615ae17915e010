//! External mode: join an existing broker (e.g. Mosquitto) as an MQTT 5 client.
//!
//! - Persistent session (clean start off, session expiry at its maximum) under the fixed
//!   `broker.client_id`, so the broker keeps queueing for the agent while it is down or restarting.
//! - Manual acks: a PUBLISH is acknowledged to the broker only after the durable queue committed it, so a
//!   crash before the commit makes the broker redeliver it (at-least-once).
//! - Subscribes QoS 1 to every route filter when the broker has no session for us (first start, or the
//!   broker lost it); with a session the subscriptions are the broker's to keep, and resubscribing would
//!   replay retained messages.
//! - Bounded memory, back-pressure to the broker (issue 7, hole 6): the agent asks the broker for at most
//!   [`RECEIVE_MAXIMUM`] unacknowledged QoS 1/2 messages (MQTT 5 Receive Maximum), and hands publishes to
//!   the ingest task through a channel with room for all of them plus [`QOS0_ROOM`] QoS 0 ones. A full
//!   queue stops acknowledging and retries the commit with a short backoff; the broker then stops sending
//!   QoS 1/2 and holds them (up to its own queue limit, hence the warning below): nothing is dropped at
//!   the edge. QoS 0 has no flow control in MQTT, so under that pressure (the QoS 0 room is used up) a
//!   QoS 0 message is dropped, counted and logged, as QoS 0 allows; the QoS 1/2 room is never taken by
//!   QoS 0.
//! - The broker may drop messages it queued for the session: Mosquitto's default `max_queued_messages
//!   1000` does. The agent warns once at startup, and watches `$SYS/broker/publish/messages/dropped`,
//!   warning whenever it increases.
//!
//! - A message the path to the hub cannot carry (payload over the limit in force, or a topic too long
//!   for the hub's namespace; see `crate::limits`) cannot be refused to its publisher: the site broker
//!   already acknowledged it. It is logged at `error` with its topic, counted, acknowledged to the broker
//!   and not forwarded, so it neither wedges the session (the broker would redeliver it forever) nor
//!   disappears without a trace. There is no dead-letter store. Set the broker's own limit (Mosquitto:
//!   `message_size_limit`) to the agent's to refuse such messages to their publishers.
//!
//! The EventLoop is polled by this task alone and never blocked: commits and acks run in the ingest task.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::mqttbytes::QoS as MqttQoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use shared::config::ExternalBroker;
use shared::envelope::{Properties, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::error::AgentError;
use crate::ingest::{full_queue_backoff, log_commit_error, Group, Ingest, MAX_GROUP_MESSAGES};

/// Mosquitto's counter of messages it dropped (for any client): the one hint a broker gives that it shed
/// queued QoS 1 messages.
pub(crate) const DROPPED_TOPIC: &str = "$SYS/broker/publish/messages/dropped";
/// Capacity of rumqttc's request channel (acks and subscriptions go through it).
const REQUESTS: usize = 10_000;
/// Largest packet accepted from the broker.
const MAX_PACKET: u32 = 256 << 20;
/// MQTT 5 Receive Maximum the agent announces: the most unacknowledged QoS 1/2 publishes the broker may
/// have in flight to it, so the agent never buffers more than this many of them.
pub(crate) const RECEIVE_MAXIMUM: u16 = 1_000;
/// Channel room for QoS 0 publishes on top of the QoS 1/2 ones; beyond it QoS 0 is dropped (counted).
pub(crate) const QOS0_ROOM: usize = 1_000;
/// Most often a "QoS 0 dropped" warning is logged (the count in it covers the interval).
const DROP_LOG_EVERY: Duration = Duration::from_secs(5);
/// Reconnect delays to the broker.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How long shutdown waits for the DISCONNECT to go out.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

/// Joins the broker until `shutdown`; returns after every message taken has been committed and
/// acknowledged (or left unacknowledged for the broker to redeliver).
pub(crate) async fn run(
    cfg: &ExternalBroker,
    ingest: Ingest,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let client_id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("meshbridge-{}", ingest.site));
    let mut options = MqttOptions::new(client_id.clone(), cfg.address.host(), cfg.address.port());
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(u32::MAX))
        .set_manual_acks(true)
        .set_keep_alive(cfg.keep_alive)
        .set_max_packet_size(Some(MAX_PACKET))
        .set_receive_maximum(Some(RECEIVE_MAXIMUM))
        .set_request_channel_capacity(REQUESTS);
    if let (Some(username), Some(password)) = (&cfg.username, &cfg.password) {
        options.set_credentials(username.clone(), password.expose().to_owned());
    }
    if let Some(t) = &cfg.tls {
        let client_auth = t.cert.as_deref().zip(t.key.as_deref());
        let config = meshbridge_tls::mqtt_client_config(&t.ca, client_auth)
            .map_err(AgentError::BrokerTls)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    let (client, mut eventloop) = AsyncClient::new(options, REQUESTS);
    // Downlink messages are published on a connection of their own; see `deliver`.
    let transport = match &cfg.tls {
        Some(t) => {
            let client_auth = t.cert.as_deref().zip(t.key.as_deref());
            let config = meshbridge_tls::mqtt_client_config(&t.ca, client_auth)
                .map_err(AgentError::BrokerTls)?;
            Some(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(config),
            )))
        }
        None => None,
    };
    ingest
        .downlink_target
        .send_replace(Some(super::deliver::Target {
            client_id: format!("{client_id}-downlink"),
            host: cfg.address.host().to_owned(),
            port: cfg.address.port(),
            credentials: cfg
                .username
                .clone()
                .zip(cfg.password.as_ref().map(|p| p.expose().to_owned())),
            transport,
        }));
    warn!(
        broker = %cfg.address,
        "an external broker may drop messages it queued for the agent's session when the agent falls \
         behind or is down: Mosquitto's default `max_queued_messages 1000` does. Set \
         `max_queued_messages 0` (unlimited) in the broker's config; drops are reported from {DROPPED_TOPIC}"
    );

    let (publishes_tx, publishes_rx) = mpsc::channel(usize::from(RECEIVE_MAXIMUM) + QOS0_ROOM);
    let mut qos0_drops = Qos0Drops::default();
    let stop_retrying = CancellationToken::new();
    let mut ingest_task = tokio::spawn(ingest_loop(
        ingest.clone(),
        client.clone(),
        publishes_rx,
        stop_retrying.clone(),
    ));
    let mut publishes = Some(publishes_tx);
    let mut dropped_seen: Option<u64> = None;
    let mut ready = false;
    let mut connected = false;
    let mut subscribed = BTreeSet::new();
    let mut routes_changed = ingest.routes.subscribe();
    let mut backoff = RECONNECT_MIN;
    let ingest_result = loop {
        tokio::select! {
            () = shutdown.cancelled(), if publishes.is_some() => {
                // Stop taking messages; what the ingest task holds is still committed and acknowledged,
                // so keep polling until it is done.
                publishes = None;
                stop_retrying.cancel();
            }
            joined = &mut ingest_task => break joined,
            changed = routes_changed.changed() => {
                // The hub pushed a config: follow its captures on the broker, without reconnecting.
                if changed.is_ok() && connected {
                    sync_subscriptions(&client, &ingest, &mut subscribed);
                }
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = RECONNECT_MIN;
                    info!(broker = %cfg.address, %client_id, session_present = ack.session_present, "connected to the site broker");
                    connected = true;
                    if !ack.session_present {
                        subscribed.clear();
                        subscribe_dropped(&client);
                    }
                    // A resumed session keeps what it subscribed to, but the routes may have changed
                    // while the agent was away: subscribing again is harmless, and filters this process
                    // never knew of only bring messages no route takes (acknowledged, not forwarded).
                    sync_subscriptions(&client, &ingest, &mut subscribed);
                    if !ready {
                        ready = true;
                        info!(broker = %cfg.address, site = %ingest.site, mode = "external", "ready");
                        meshbridge_metrics::systemd::ready(&format!("site {}: joined the broker at {}", ingest.site, cfg.address));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if publish.topic.as_ref() == DROPPED_TOPIC.as_bytes() {
                        watch_dropped(&publish.payload, &mut dropped_seen);
                    } else if let Some(tx) = &publishes {
                        if publish.qos == MqttQoS::AtMostOnce {
                            // Only while the QoS 0 room lasts: the rest of the channel is the QoS 1/2
                            // messages' (the broker never has more than RECEIVE_MAXIMUM in flight).
                            if tx.capacity() > usize::from(RECEIVE_MAXIMUM) {
                                let _ = tx.try_send(publish);
                            } else {
                                qos0_drops.count();
                            }
                        } else {
                            // Cannot wait long: the broker respects Receive Maximum, so there is room. A
                            // send error means the ingest task ended; the loop sees that next.
                            let _ = tx.send(publish).await;
                        }
                    }
                    // After shutdown began, a publish is left unacknowledged: the broker redelivers it.
                }
                Ok(_) => {}
                Err(cause) => {
                    connected = false;
                    warn!(broker = %cfg.address, %cause, retry_in = ?backoff, "site broker connection failed");
                    tokio::select! {
                        () = shutdown.cancelled(), if publishes.is_some() => {
                            publishes = None;
                            stop_retrying.cancel();
                        }
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            }
        }
    };
    // Flush the last acks and say goodbye; bounded, since the broker may be gone.
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    ingest_result.map_err(|source| AgentError::TaskPanicked {
        task: "external ingest",
        source,
    })
}

/// QoS 0 messages dropped under back-pressure, logged at most every [`DROP_LOG_EVERY`].
#[derive(Debug, Default)]
struct Qos0Drops {
    total: u64,
    since_log: u64,
    logged_at: Option<tokio::time::Instant>,
}

impl Qos0Drops {
    fn count(&mut self) {
        self.total += 1;
        self.since_log += 1;
        let now = tokio::time::Instant::now();
        if self.logged_at.is_none_or(|t| now - t >= DROP_LOG_EVERY) {
            warn!(
                dropped = self.since_log,
                dropped_total = self.total,
                "QoS 0 messages dropped: the agent is behind (queue full or committing slower than the broker sends)"
            );
            self.logged_at = Some(now);
            self.since_log = 0;
        }
    }
}

/// Asks for the broker's drop counter.
fn subscribe_dropped(client: &AsyncClient) {
    if let Err(cause) = client.try_subscribe(DROPPED_TOPIC, MqttQoS::AtMostOnce) {
        warn!(%cause, "cannot subscribe to the broker's drop counter");
    }
}

/// Subscribes (QoS 1) to the route filters in force that `subscribed` lacks and unsubscribes from those
/// no longer in force.
fn sync_subscriptions(client: &AsyncClient, ingest: &Ingest, subscribed: &mut BTreeSet<String>) {
    let wanted: BTreeSet<String> = ingest.routes.load().filters().map(str::to_owned).collect();
    let added: Vec<Filter> = wanted
        .difference(subscribed)
        .map(|f| Filter::new(f.clone(), MqttQoS::AtLeastOnce))
        .collect();
    if !added.is_empty() {
        if let Err(cause) = client.try_subscribe_many(added) {
            warn!(%cause, "cannot subscribe to the route filters");
            return;
        }
    }
    for filter in subscribed.difference(&wanted) {
        if let Err(cause) = client.try_unsubscribe(filter.clone()) {
            warn!(%cause, %filter, "cannot unsubscribe from a filter no route uses any more");
        }
    }
    info!(
        filters = wanted.len(),
        version = ingest.routes.version(),
        "subscribed to the route filters in force"
    );
    *subscribed = wanted;
}

/// Warns when the broker's drop counter goes up.
fn watch_dropped(payload: &Bytes, seen: &mut Option<u64>) {
    let Some(count) = std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return;
    };
    let previous = seen.replace(count);
    let increase = match previous {
        Some(previous) => count.saturating_sub(previous),
        None => count,
    };
    if increase > 0 {
        warn!(
            dropped = increase,
            total = count,
            "the site broker dropped messages (broker-wide counter {DROPPED_TOPIC}); if they were queued \
             for the agent they are lost: set `max_queued_messages 0` in its config"
        );
    }
}

/// Commits publishes in groups and acknowledges each one to the broker after its group committed.
async fn ingest_loop(
    ingest: Ingest,
    client: AsyncClient,
    mut publishes: mpsc::Receiver<Publish>,
    stop_retrying: CancellationToken,
) {
    let mut group = Group::new(&ingest.site);
    let mut taken: Vec<Publish> = Vec::new();
    while let Some(first) = publishes.recv().await {
        let mut bytes = first.payload.len();
        taken.push(first);
        while taken.len() < MAX_GROUP_MESSAGES && bytes < ingest.max_group_bytes {
            match publishes.try_recv() {
                Ok(next) => {
                    bytes += next.payload.len();
                    taken.push(next);
                }
                Err(_) => break,
            }
        }
        for publish in &mut taken {
            add(&mut group, &ingest, publish);
        }
        let mut committed = group.is_empty();
        let mut attempt = 0;
        while !committed {
            match ingest.commit(&mut group).await {
                Ok(_) => committed = true,
                Err(error) => {
                    if attempt == 0 {
                        log_commit_error(&error);
                    }
                    let delay = full_queue_backoff(attempt);
                    attempt += 1;
                    tokio::select! {
                        () = stop_retrying.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        if committed {
            if attempt > 0 {
                info!(retries = attempt, "commit went through after being refused");
            }
            for publish in &taken {
                if client.ack(publish).await.is_err() {
                    debug!("client closed; remaining acks left for redelivery");
                    return;
                }
            }
        } else {
            group.clear();
            warn!(
                messages = taken.len(),
                "shutting down with uncommitted messages; left unacknowledged for the broker to redeliver"
            );
        }
        taken.clear();
    }
}

/// An upper bound of the queue entry made from `publish` (see `shared::envelope`): fixed fields, origin,
/// topic, payload and every property with its length prefix. (The MQTT packet length is not known here:
/// rumqttc decoded it.)
fn entry_bound(origin_len: usize, topic: &str, publish: &Publish) -> usize {
    let fixed = shared::limits::ENVELOPE_EXTRA + origin_len + 2 + topic.len();
    let properties = publish.properties.as_ref().map_or(0, |p| {
        let text = |s: &Option<String>| s.as_ref().map_or(0, |s| 2 + s.len());
        text(&p.content_type)
            + text(&p.response_topic)
            + p.correlation_data.as_ref().map_or(0, |c| 2 + c.len())
            + 4
            + p.user_properties
                .iter()
                .map(|(k, v)| 4 + k.len() + v.len())
                .sum::<usize>()
    });
    fixed + properties + publish.payload.len()
}

/// Encodes `publish` into the group, moving its topic, payload and properties out (the ack only needs
/// its packet id and QoS).
fn add(group: &mut Group, ingest: &Ingest, publish: &mut Publish) {
    let topic = match std::str::from_utf8(&publish.topic) {
        Ok(topic) => topic.to_owned(),
        Err(_) => {
            warn!("PUBLISH with a non-UTF-8 topic; acknowledged but not forwarded");
            return;
        }
    };
    let Some(rule) = ingest.routes.decide(&topic) else {
        debug!(%topic, "no route matches; acknowledged but not forwarded");
        return;
    };
    if publish
        .properties
        .as_ref()
        .is_some_and(|p| super::deliver::arrived_from_the_mesh(&ingest.site, &p.user_properties))
    {
        debug!(%topic, "delivered here by the mesh (downlink or site-to-site); not forwarded again");
        return;
    }
    if let Err(refusal) = ingest.limits.check(
        topic.len(),
        publish.payload.len(),
        entry_bound(ingest.limits.origin_len(), &topic, publish),
    ) {
        // Logged with the topic (cut short) so the operator can find the publisher.
        let shown: String = topic.chars().take(200).collect();
        error!(
            topic = %shown,
            topic_len = topic.len(),
            payload_len = publish.payload.len(),
            cause = %refusal,
            kind = refusal.kind(),
            refused_total = ingest.limits.refused(),
            "message dropped: the path to the hub cannot carry it, and the site broker already acknowledged it to its publisher"
        );
        return;
    }
    let qos = match publish.qos {
        MqttQoS::AtMostOnce => QoS::AtMostOnce,
        MqttQoS::AtLeastOnce => QoS::AtLeastOnce,
        MqttQoS::ExactlyOnce => QoS::ExactlyOnce,
    };
    let properties = publish
        .properties
        .take()
        .map(|p| Properties {
            user: p.user_properties,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            message_expiry: p.message_expiry_interval,
            payload_format_utf8: p.payload_format_indicator == Some(1),
        })
        .unwrap_or_default();
    let payload = std::mem::take(&mut publish.payload);
    group.push(rule, topic, payload, qos, publish.retain, properties);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_bound_covers_the_encoded_envelope() {
        use rumqttc::v5::mqttbytes::v5::PublishProperties;
        use shared::envelope::Envelope;

        for with_props in [false, true] {
            let properties = with_props.then(|| PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(5),
                content_type: Some("text/plain".into()),
                response_topic: Some("reply/x".into()),
                correlation_data: Some(Bytes::from_static(b"corr")),
                user_properties: vec![
                    ("k".into(), "v".into()),
                    ("traceparent".into(), "00-a-b-01".into()),
                ],
                ..PublishProperties::default()
            });
            let publish = Publish::new("t/x", MqttQoS::AtLeastOnce, "payload", properties.clone());
            let p = properties.unwrap_or_default();
            let env = Envelope {
                origin: "line1".into(),
                seq: 1,
                topic: "t/x".into(),
                payload: Bytes::from_static(b"payload"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties {
                    user: p.user_properties,
                    content_type: p.content_type,
                    response_topic: p.response_topic,
                    correlation_data: p.correlation_data,
                    message_expiry: p.message_expiry_interval,
                    payload_format_utf8: p.payload_format_indicator == Some(1),
                },
                trace: None,
                enqueued_at_ms: 0,
            };
            let mut body = bytes::BytesMut::new();
            env.encode_body(&mut body).expect("encodable");
            let bound = entry_bound("line1".len(), "t/x", &publish);
            assert!(
                body.len() <= bound,
                "props={with_props}: {} > {bound}",
                body.len()
            );
        }
    }

    #[test]
    fn dropped_counter_tracks_increases() {
        let mut seen = None;
        for (payload, expected) in [
            ("0", Some(0)),
            ("5", Some(5)),
            ("5", Some(5)),
            ("not a number", Some(5)),
            (" 9\n", Some(9)),
        ] {
            watch_dropped(&Bytes::from(payload), &mut seen);
            assert_eq!(seen, expected, "{payload:?}");
        }
    }
}
