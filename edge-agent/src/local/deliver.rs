//! Downlink delivery: messages the hub sends down (from the cloud, or from another site) are published into
//! the local broker, and acknowledged to the hub only once the broker has accepted them (PUBACK for QoS 1,
//! PUBCOMP for QoS 2, written for QoS 0), so a downlink message is never lost between hub and site.
//!
//! # Its own connection, never captured again
//! The agent publishes downlink messages on a connection of its own: to the embedded broker's internal
//! port (rumqttd itself, behind the ack-holding front, so the front never sees them and cannot capture
//! them for the uplink), or to the external broker as `<client id>-downlink`. An external broker delivers
//! them to the agent's own uplink subscriptions like any message; those carry `meshbridge-path` with this
//! site on it, and the external ingest drops them ([`arrived_from_the_mesh`]). A message delivered to a
//! site therefore never goes up again from that site, in either mode, and the hub's path check refuses it
//! anyway should it ever.
//!
//! # Refusals
//! A message the local broker refuses (PUBACK reason code >= 0x80, e.g. an ACL) is logged and counts as
//! handled: sending the batch again would be refused again and block every message behind it.
//!
//! # Expiry
//! A message whose MQTT 5 Message Expiry Interval (the route's time to live, set by the hub) ran out while
//! it waited is not published; it counts as delivered (acknowledged) and is logged. The interval left is
//! what the local broker gets. The hub's and the agent's clocks are compared here; a skew makes messages
//! expire earlier or later by that much.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meshbridge_broker::sessions::Sessions;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS as MqttQoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use shared::envelope::{Envelope, QoS};
use shared::mqtt::{self, Publish};
use shared::policy::path::PATH_PROPERTY;
use shared::queue::{RetainedChange, RetainedStore};
use tracing::{debug, info, warn};

/// Keep-alive of the delivery connection.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long one batch may take to be accepted before the connection is considered stuck.
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a batch was not (wholly) accepted; the hub sends it again.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeliverError {
    /// The broker connection failed.
    #[error("the local broker connection failed: {0}")]
    Connection(String),
    /// The broker did not accept the batch in time.
    #[error("the local broker did not accept the batch within {0:?}")]
    Timeout(Duration),
}

/// Whether a message captured at `site` carries a path with `site` on it: it was delivered here by the
/// mesh and must not go up again.
pub(crate) fn arrived_from_the_mesh(site: &str, user: &[(String, String)]) -> bool {
    user.iter()
        .filter(|(k, _)| k == PATH_PROPERTY)
        .any(|(_, v)| v.split(',').any(|place| place == site))
}

/// Where downlink messages are published: known once the local side is up (the embedded broker's
/// internal port is chosen when it starts).
#[derive(Clone)]
pub(crate) struct Target {
    /// Client id of the delivery connection.
    pub(crate) client_id: String,
    /// Broker host.
    pub(crate) host: String,
    /// Broker port.
    pub(crate) port: u16,
    /// Username and password, for an external broker that asks for them.
    pub(crate) credentials: Option<(String, String)>,
    /// TLS, for an external broker that speaks it.
    pub(crate) transport: Option<rumqttc::Transport>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("client_id", &self.client_id)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.transport.is_some())
            .finish_non_exhaustive()
    }
}

/// Downlink delivery for the uplink task: waits for the local side's [`Target`] and connects on first use.
#[derive(Debug)]
pub(crate) struct Delivery {
    target: tokio::sync::watch::Receiver<Option<Target>>,
    /// The priority lane delivering (each lane has its own connection, so its own client id).
    lane: u8,
    /// The embedded broker's retained store: a retained downlink message is kept there too, before it is
    /// published, so it outlives an agent restart like one a local client published.
    retained: Option<Arc<RetainedStore>>,
    /// The embedded broker's persistent sessions: downlink messages reach rumqttd behind the front, so
    /// they are matched against the stored subscriptions here, and the hub's ack waits for their commit.
    sessions: Option<Arc<Sessions>>,
    current: Option<Deliverer>,
}

/// How long a delivery waits for the local side to come up.
const TARGET_WAIT: Duration = Duration::from_secs(10);

impl Delivery {
    /// Delivery to whatever `target` names, for priority lane `lane`.
    pub(crate) fn new(
        target: tokio::sync::watch::Receiver<Option<Target>>,
        lane: u8,
        retained: Option<Arc<RetainedStore>>,
        sessions: Option<Arc<Sessions>>,
    ) -> Self {
        Self {
            target,
            lane,
            retained,
            sessions,
            current: None,
        }
    }

    /// [`Deliverer::deliver`] on the target's connection, made on first use.
    ///
    /// # Errors
    /// [`DeliverError`]; also when the local side is not up within [`TARGET_WAIT`].
    pub(crate) async fn deliver(
        &mut self,
        entries: &[Envelope],
        now_ms: u64,
    ) -> Result<usize, DeliverError> {
        if self.current.is_none() {
            let target = tokio::time::timeout(TARGET_WAIT, self.target.wait_for(Option::is_some))
                .await
                .map_err(|_| DeliverError::Timeout(TARGET_WAIT))?
                .map_err(|_| DeliverError::Connection("the local side stopped".to_owned()))?
                .clone()
                .expect("waited for Some");
            // Two connections with one client id take each other over: a lane above 0 adds its own.
            let client_id = if self.lane == 0 {
                target.client_id
            } else {
                format!("{}-p{}", target.client_id, self.lane)
            };
            self.current = Some(Deliverer::new(
                &client_id,
                &target.host,
                target.port,
                target.credentials,
                target.transport,
            ));
        }
        keep_retained(self.retained.clone(), entries).await?;
        let deliverer = self.current.as_mut().expect("made above");
        let delivered = deliverer.deliver(entries, now_ms).await?;
        if let Some(sessions) = self.sessions.as_ref().filter(|s| s.active()) {
            let publishes: Vec<Publish> = entries
                .iter()
                .filter_map(|e| Some(envelope_publish(e, remaining_expiry(e, now_ms)?)))
                .collect();
            let batch: Vec<(&Publish, &str)> = publishes.iter().map(|p| (p, "")).collect();
            if let (_, Some(stored)) = sessions.route(&batch) {
                match stored.await {
                    Ok(Ok(())) => {}
                    Ok(Err(cause)) => {
                        return Err(DeliverError::Connection(format!(
                            "the persistent sessions could not store the batch: {cause}"
                        )))
                    }
                    Err(_) => {
                        return Err(DeliverError::Connection(
                            "the persistent sessions' writer stopped".to_owned(),
                        ))
                    }
                }
            }
        }
        Ok(delivered)
    }
}

/// `entry` as the PUBLISH a local subscriber gets, with `expiry` left of its Message Expiry Interval.
pub(crate) fn envelope_publish(entry: &Envelope, expiry: Option<u32>) -> Publish {
    let p = &entry.properties;
    Publish {
        dup: false,
        qos: match entry.qos {
            QoS::AtMostOnce => mqtt::QoS::AtMostOnce,
            QoS::AtLeastOnce => mqtt::QoS::AtLeastOnce,
            QoS::ExactlyOnce => mqtt::QoS::ExactlyOnce,
        },
        retain: entry.retain,
        topic: entry.topic.clone(),
        packet_id: None,
        properties: mqtt::PublishProperties {
            payload_format_indicator: p.payload_format_utf8.then_some(1),
            message_expiry_interval: expiry,
            topic_alias: None,
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone(),
            user_properties: p.user.clone(),
            subscription_identifiers: Vec::new(),
            content_type: p.content_type.clone(),
        },
        payload: Bytes::clone(&entry.payload),
    }
}

/// Keeps a batch's retained messages in the retained store (blocking work off the async workers). One
/// that would take the store past its bounds is delivered but not kept, and logged.
async fn keep_retained(
    store: Option<Arc<RetainedStore>>,
    entries: &[Envelope],
) -> Result<(), DeliverError> {
    let Some(store) = store else {
        return Ok(());
    };
    let mut changes: Vec<RetainedChange> = Vec::new();
    for entry in entries.iter().filter(|e| e.retain) {
        if entry.payload.is_empty() {
            changes.push(RetainedChange::Clear {
                topic: entry.topic.clone(),
            });
            continue;
        }
        let mut body = bytes::BytesMut::with_capacity(entry.encoded_body_len());
        if entry.encode_body(&mut body).is_err()
            || !store.admits(&[&changes], &entry.topic, body.len())
        {
            warn!(topic = %entry.topic, "retained downlink message not kept on disk: the retained store is full; delivered, but gone after a restart");
            continue;
        }
        changes.push(RetainedChange::Set {
            topic: entry.topic.clone(),
            body: body.freeze(),
        });
    }
    if changes.is_empty() {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || store.apply(&changes))
        .await
        .map_err(|e| DeliverError::Connection(format!("the retained store task failed: {e}")))?
        .map_err(|e| DeliverError::Connection(format!("the retained store failed: {e}")))
}

/// A connection to the local broker that publishes downlink batches.
pub(crate) struct Deliverer {
    client: AsyncClient,
    eventloop: EventLoop,
    connected: bool,
}

impl std::fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer")
            .field("connected", &self.connected)
            .finish_non_exhaustive()
    }
}

impl Deliverer {
    /// A deliverer for the broker at `host:port` as `client_id` (connected on first use). `credentials`
    /// for an external broker that asks for them.
    pub(crate) fn new(
        client_id: &str,
        host: &str,
        port: u16,
        credentials: Option<(String, String)>,
        transport: Option<rumqttc::Transport>,
    ) -> Self {
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_keep_alive(KEEP_ALIVE).set_clean_start(true);
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        if let Some(transport) = transport {
            options.set_transport(transport);
        }
        let (client, eventloop) = AsyncClient::new(options, 256);
        Self {
            client,
            eventloop,
            connected: false,
        }
    }

    /// Publishes `entries` in order and returns once the broker accepted every one of them (expired ones
    /// are skipped). On error, some may have been published: the hub sends the batch again, so the local
    /// broker may see a message twice (each carries its `meshbridge-id` to drop it by).
    ///
    /// # Errors
    /// [`DeliverError`]; the connection is then reset.
    pub(crate) async fn deliver(
        &mut self,
        entries: &[Envelope],
        now_ms: u64,
    ) -> Result<usize, DeliverError> {
        let result = tokio::time::timeout(BATCH_TIMEOUT, self.deliver_inner(entries, now_ms))
            .await
            .unwrap_or(Err(DeliverError::Timeout(BATCH_TIMEOUT)));
        if result.is_err() {
            self.connected = false;
        }
        result
    }

    /// Disconnects cleanly (bounded: a broker that does not answer is left behind).
    pub(crate) async fn close(mut self) {
        if !self.connected {
            return;
        }
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }

    async fn deliver_inner(
        &mut self,
        entries: &[Envelope],
        now_ms: u64,
    ) -> Result<usize, DeliverError> {
        while !self.connected {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    info!("downlink delivery connected to the local broker");
                    self.connected = true;
                }
                Ok(_) => {}
                Err(e) => return Err(DeliverError::Connection(e.to_string())),
            }
        }
        // Publishes handed to rumqttc whose `Outgoing::Publish` was not seen yet, and QoS 1/2 publishes
        // waiting for their PUBACK/PUBCOMP. The event loop runs only in this task, so a publish is
        // counted before its events can arrive.
        let mut unwritten = 0usize;
        let mut awaiting = 0usize;
        let mut published = 0usize;
        for entry in entries {
            let Some(expiry) = remaining_expiry(entry, now_ms) else {
                warn!(topic = %entry.topic, origin = %entry.origin, "downlink message expired before it reached the site; not published");
                continue;
            };
            let qos = match entry.qos {
                QoS::AtMostOnce => MqttQoS::AtMostOnce,
                QoS::AtLeastOnce => MqttQoS::AtLeastOnce,
                QoS::ExactlyOnce => MqttQoS::ExactlyOnce,
            };
            let p = &entry.properties;
            let properties = PublishProperties {
                payload_format_indicator: p.payload_format_utf8.then_some(1),
                message_expiry_interval: expiry,
                topic_alias: None,
                response_topic: p.response_topic.clone(),
                correlation_data: p.correlation_data.clone(),
                user_properties: p.user.clone(),
                subscription_identifiers: Vec::new(),
                content_type: p.content_type.clone(),
            };
            let client = self.client.clone();
            let publish = client.publish_with_properties(
                entry.topic.clone(),
                qos,
                entry.retain,
                Bytes::clone(&entry.payload),
                properties,
            );
            // The request channel is bounded: drive the event loop while it is full.
            let mut publish = std::pin::pin!(publish);
            loop {
                tokio::select! {
                    done = &mut publish => {
                        done.map_err(|e| DeliverError::Connection(e.to_string()))?;
                        break;
                    }
                    event = self.eventloop.poll() => count(event, &mut unwritten, &mut awaiting)?,
                }
            }
            unwritten += 1;
            if qos != MqttQoS::AtMostOnce {
                awaiting += 1;
            }
            published += 1;
        }
        while unwritten > 0 || awaiting > 0 {
            let event = self.eventloop.poll().await;
            count(event, &mut unwritten, &mut awaiting)?;
        }
        debug!(published, "downlink batch accepted by the local broker");
        Ok(published)
    }
}

/// Counts an event against what is outstanding: a written publish, an acknowledgement, or a failure.
fn count(
    event: Result<Event, rumqttc::v5::ConnectionError>,
    unwritten: &mut usize,
    awaiting: &mut usize,
) -> Result<(), DeliverError> {
    match event {
        Ok(Event::Outgoing(Outgoing::Publish(_))) => *unwritten = unwritten.saturating_sub(1),
        Ok(Event::Incoming(Packet::PubAck(ack))) => {
            use rumqttc::v5::mqttbytes::v5::PubAckReason;
            let reason = match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                PubAckReason::UnspecifiedError => Some(0x80),
                PubAckReason::ImplementationSpecificError => Some(0x83),
                PubAckReason::NotAuthorized => Some(0x87),
                PubAckReason::TopicNameInvalid => Some(0x90),
                PubAckReason::PacketIdentifierInUse => Some(0x91),
                PubAckReason::QuotaExceeded => Some(0x97),
                PubAckReason::PayloadFormatInvalid => Some(0x99),
            };
            if let Some(reason) = reason {
                // Final for this message only: resending the batch would be refused again and wedge
                // every message behind it (as issue 7's dead letters avoid on the uplink).
                warn!(
                    reason = format_args!("0x{reason:02x}"),
                    "the local broker refused a downlink message; it is not delivered (check the broker's ACL for the agent's -downlink client)"
                );
            }
            *awaiting = awaiting.saturating_sub(1);
        }
        Ok(Event::Incoming(Packet::PubComp(_))) => *awaiting = awaiting.saturating_sub(1),
        Ok(_) => {}
        Err(e) => return Err(DeliverError::Connection(e.to_string())),
    }
    Ok(())
}

/// The Message Expiry Interval to publish `entry` with: `Some(None)` if it has none, `Some(Some(left))`
/// with the seconds left, `None` if it expired.
fn remaining_expiry(entry: &Envelope, now_ms: u64) -> Option<Option<u32>> {
    let Some(expiry) = entry.properties.message_expiry else {
        return Some(None);
    };
    let deadline = entry
        .enqueued_at_ms
        .saturating_add(u64::from(expiry) * 1000);
    if now_ms >= deadline {
        return None;
    }
    let left = (deadline - now_ms).div_ceil(1000);
    Some(Some(u32::try_from(left).unwrap_or(u32::MAX).max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_marks_what_came_from_the_mesh() {
        let user = |v: &str| vec![(PATH_PROPERTY.to_owned(), v.to_owned())];
        assert!(arrived_from_the_mesh("line2", &user("$cloud,line2")));
        assert!(arrived_from_the_mesh("line2", &user("line1,line2")));
        assert!(!arrived_from_the_mesh("line2", &user("line1,line22")));
        assert!(!arrived_from_the_mesh("line2", &[]));
    }

    #[test]
    fn expiry_counts_down_and_runs_out() {
        let mut e = Envelope {
            origin: "$cloud".to_owned(),
            seq: 1,
            topic: "cmd/stop".to_owned(),
            payload: Bytes::new(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: shared::envelope::Properties::default(),
            trace: None,
            enqueued_at_ms: 10_000,
        };
        assert_eq!(remaining_expiry(&e, 99_999), Some(None));
        e.properties.message_expiry = Some(60);
        assert_eq!(remaining_expiry(&e, 10_000), Some(Some(60)));
        assert_eq!(remaining_expiry(&e, 40_500), Some(Some(30)));
        assert_eq!(remaining_expiry(&e, 69_999), Some(Some(1)));
        assert_eq!(remaining_expiry(&e, 70_000), None);
    }
}
