//! The hub's publisher into its *embedded* cloud broker, over an in-process link to rumqttd's router.
//!
//! Why not the MQTT client the parent module drives: over loopback TCP a message to the embedded broker
//! was encoded by rumqttc, written by its event loop task, read and decoded by rumqttd's connection task,
//! handed to the router thread, and its PUBACK came back the same way. At a factory line's rate each of
//! those hops is a thread wake-up of its own, and on this project's VM a wake-up costs more CPU than the
//! rest of the message (README, "Performance"). A local link (`broker/src/embedded.rs`, `LocalLinks`)
//! shares two buffers with the router: a batch of PUBLISHes is pushed into one with a single lock and
//! announced with a single wake-up, and the router answers every PUBACK of it in the other with a single
//! wake-up back. No encoding, no socket, no task in between.
//!
//! What stays the same as with an MQTT client (and as the agent connections expect from [`Publisher`]):
//! - Messages keep their QoS and get packet ids; a QoS 1 message completes on the router's PUBACK, QoS 2
//!   on PUBCOMP (after our PUBREL), QoS 0 once it is in the router's buffer. The router acknowledges a
//!   PUBLISH once it is in the topic's log, which is what "accepted by the cloud broker" means for an
//!   in-memory broker.
//! - Subscriber pressure and the handed-over budget hold exactly as in the parent module
//!   ([`super::PRESSURE_POLL`]).
//! - If the router drops the link, every batch in flight fails ([`PublishError::ConnectionLost`]), the
//!   agents resend from their last ack, and a new link is opened after a back-off.
//!
//! What the router could drop the link for is ruled out before a message is handed over: a wildcard in
//! the topic is refused (0x90), topic aliases and subscription identifiers are never set, and the link
//! has dynamic filters, so a topic without subscribers is not an error. So no poison message can
//! exist here, and the parent module's suspect tracking is not needed.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meshbridge_broker::embedded::{LinkRx, LinkTx, LocalLinks, SubscriberPressure};
use rumqttc::v5::mqttbytes::QoS;
use rumqttd::protocol::{
    Packet, PubAckReason, PubCompReason, PubRecReason, PubRel, PubRelReason, Publish,
    PublishProperties as RouterProperties, QoS as RouterQoS,
};
use rumqttd::{Ack, Notification};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    OutMessage, PublishBatch, PublishError, Waiters, DISCONNECT_WAIT, INFLIGHT_LIMIT,
    REASON_TOPIC_NAME_INVALID, REASON_UNSPECIFIED, RECONNECT_MAX, RECONNECT_MIN,
};

/// How often a publisher held by the embedded broker's subscriber pressure looks again.
///
/// Why the publisher holds: rumqttd keeps a fixed log per subscription filter and drops its oldest
/// segment when a new one starts, read or not, so a subscriber slower than the publishers would lose
/// messages the hub had already acknowledged to the agents. The patched router
/// (`vendor/rumqttd/PATCHED.md`) says when a connected QoS 1/2 subscriber gets close to that; the
/// publisher then hands nothing new to the broker, its batch queue fills, agent connections stop
/// getting acknowledgements, and the agents' windows and then their disk queues take the wait. What is
/// already handed over still goes in: the router holds with half of the log left for it, checked after
/// every event that starts a segment (`broker/src/embedded.rs`), and the publisher never has more than an
/// eighth of the log handed over and unacknowledged (`handed_budget`).
pub(super) const PRESSURE_POLL: Duration = Duration::from_millis(5);

/// The publisher task of the embedded broker: one local link at a time.
pub(super) struct LocalTask {
    links: LocalLinks,
    client_id: String,
    /// The link's sending half while connected.
    tx: Option<LinkTx>,
    connected_tx: watch::Sender<bool>,
    consecutive_failures: u32,
    /// Messages of accepted batches not yet handed to the router, in the router's form.
    backlog: VecDeque<(u64, Ready)>,
    /// Handed-over QoS 1/2 publishes by packet id: (batch id, seq, size in the log).
    inflight: HashMap<u16, (u64, u64, usize)>,
    last_pkid: u16,
    /// Message bytes in `inflight`, as rumqttd counts them in its log.
    handed_bytes: usize,
    /// Most `handed_bytes` before feeding waits (see [`super::PRESSURE_POLL`]).
    handed_budget: usize,
    /// The embedded broker's subscriber pressure; see [`PRESSURE_POLL`].
    pressure: Arc<SubscriberPressure>,
    /// Whether the last look at `pressure` found it held.
    held: bool,
    waiters: Waiters,
    /// Packets to push into the link with the next [`LocalTask::flush`].
    out: Vec<Packet>,
    /// Batches whose QoS 0 messages complete once `out` is pushed.
    qos0_done: Vec<u64>,
    stop: CancellationToken,
}

impl LocalTask {
    pub(super) fn new(
        links: LocalLinks,
        client_id: &str,
        pressure: Arc<SubscriberPressure>,
        handed_budget: usize,
        connected_tx: watch::Sender<bool>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            links,
            client_id: client_id.to_owned(),
            tx: None,
            connected_tx,
            consecutive_failures: 0,
            backlog: VecDeque::new(),
            inflight: HashMap::with_capacity(usize::from(INFLIGHT_LIMIT)),
            last_pkid: 0,
            handed_bytes: 0,
            handed_budget,
            pressure,
            held: false,
            waiters: Waiters::default(),
            out: Vec::new(),
            qos0_done: Vec::new(),
            stop,
        }
    }

    pub(super) async fn run(mut self, mut batches: mpsc::Receiver<PublishBatch>) {
        let mut rx: Option<LinkRx> = None;
        let mut retry_at = Instant::now();
        // Built once: one built inside `select!` registers with the token on every turn, two per message.
        let stop = self.stop.clone();
        let mut stopped = std::pin::pin!(stop.cancelled());
        loop {
            let waiting_out_pressure = self.held && !self.backlog.is_empty();
            tokio::select! {
                biased;
                () = stopped.as_mut() => break,
                () = tokio::time::sleep_until(retry_at), if rx.is_none() => {
                    rx = self.connect().await;
                    if rx.is_none() {
                        retry_at = Instant::now() + self.backoff();
                    }
                }
                () = tokio::time::sleep(PRESSURE_POLL), if waiting_out_pressure => {
                    if !self.feed().await {
                        rx = None;
                        retry_at = Instant::now() + self.backoff();
                    }
                }
                notification = next(&mut rx) => {
                    let alive = match notification {
                        Ok(Some(notification)) => self.on_notification(notification, &mut rx).await,
                        Ok(None) => true,
                        Err(error) => {
                            debug!(cause = %error, "local link closed by the router");
                            self.lost(&PublishError::ConnectionLost);
                            false
                        }
                    };
                    if !(alive && self.feed().await) {
                        rx = None;
                        retry_at = Instant::now() + self.backoff();
                    }
                }
                Some(batch) = batches.recv(), if self.backlog.is_empty() => {
                    self.accept(batch);
                    if !self.feed().await {
                        rx = None;
                        retry_at = Instant::now() + self.backoff();
                    }
                }
            }
        }
        // Taken before `lost`, which forgets the link.
        let tx = self.tx.take();
        self.lost(&PublishError::Stopped);
        batches.close();
        while let Ok(batch) = batches.try_recv() {
            let _ = batch.done.send(Err(PublishError::Stopped));
        }
        if let Some(mut tx) = tx {
            // Bounded: the router's channel may be full or the router gone.
            let _ = tokio::time::timeout(DISCONNECT_WAIT, tx.disconnect()).await;
        }
    }

    /// Opens a link; on success the publisher is connected and the link's receiving half is returned.
    async fn connect(&mut self) -> Option<LinkRx> {
        match self.links.open(&self.client_id).await {
            Ok((tx, rx)) => {
                info!(
                    client_id = self.client_id,
                    "connected to the embedded cloud broker (in-process link)"
                );
                self.tx = Some(tx);
                self.consecutive_failures = 0;
                self.connected_tx.send_replace(true);
                Some(rx)
            }
            Err(error) => {
                warn!(cause = %error, "could not open the link to the embedded cloud broker");
                None
            }
        }
    }

    /// The delay before the next attempt after a failure; doubles per consecutive failure.
    fn backoff(&mut self) -> Duration {
        let delay = RECONNECT_MIN
            .saturating_mul(1 << self.consecutive_failures.min(10))
            .min(RECONNECT_MAX);
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        delay
    }

    fn accept(&mut self, batch: PublishBatch) {
        if self.tx.is_none() {
            let _ = batch.done.send(Err(PublishError::BrokerUnavailable));
            return;
        }
        let id = self
            .waiters
            .add(batch.site, batch.messages.len(), batch.done);
        self.backlog
            .extend(batch.messages.into_iter().map(|m| (id, Ready::from(m))));
    }

    /// Whether the embedded broker asks the publisher to hold; logs each change.
    fn holding(&mut self) -> bool {
        let held = self
            .pressure
            .held
            .load(std::sync::atomic::Ordering::Acquire);
        if held != self.held {
            self.held = held;
            if held {
                warn!(
                    backlog = self.backlog.len(),
                    "a subscriber of the cloud broker is falling behind: holding new messages (the agents' queues take the wait)"
                );
            } else {
                info!("the cloud broker's subscribers caught up: publishing again");
            }
        }
        held
    }

    /// Hands backlog messages to the router while the in-flight window, the budget and the subscriber
    /// pressure allow, then pushes them in one go. Returns false when the link is gone.
    async fn feed(&mut self) -> bool {
        if self.tx.is_none() {
            return true;
        }
        if !self.backlog.is_empty() && !self.holding() {
            while self.inflight.len() < usize::from(INFLIGHT_LIMIT) {
                let Some((_, m)) = self.backlog.front() else {
                    break;
                };
                let size = m.size;
                if self.handed_bytes + size > self.handed_budget && !self.inflight.is_empty() {
                    break;
                }
                let Some((id, m)) = self.backlog.pop_front() else {
                    break;
                };
                if self.waiters.get(id).is_none() {
                    // The batch already failed; do not publish the rest of it.
                    continue;
                }
                if m.topic.iter().any(|&b| b == b'+' || b == b'#') {
                    self.waiters.refuse(
                        id,
                        m.seq,
                        REASON_TOPIC_NAME_INVALID,
                        format!("wildcard in topic {:?}", String::from_utf8_lossy(&m.topic)),
                    );
                    continue;
                }
                let pkid = if m.qos == RouterQoS::AtMostOnce {
                    self.qos0_done.push(id);
                    0
                } else {
                    let pkid = self.next_pkid();
                    self.inflight.insert(pkid, (id, m.seq, size));
                    self.handed_bytes += size;
                    pkid
                };
                self.out.push(m.into_packet(pkid));
            }
        }
        if !self.flush().await {
            return false;
        }
        for id in std::mem::take(&mut self.qos0_done) {
            self.waiters.complete(id);
        }
        true
    }

    /// Pushes `out` into the link with one lock and wakes the router once. Returns false (and fails
    /// everything in flight) when the router is gone.
    async fn flush(&mut self) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let Some(tx) = self.tx.as_mut() else {
            return true;
        };
        tx.buffer().extend(self.out.drain(..));
        match tx.notify().await {
            Ok(()) => true,
            Err(error) => {
                warn!(cause = %error, "the embedded cloud broker's router is gone");
                self.lost(&PublishError::ConnectionLost);
                false
            }
        }
    }

    /// A packet id not in flight (there are at most [`INFLIGHT_LIMIT`] of 65,535).
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid % u16::MAX + 1;
            if !self.inflight.contains_key(&self.last_pkid) {
                return self.last_pkid;
            }
        }
    }

    /// Handles one notification of the router; returns false when the link is gone.
    async fn on_notification(
        &mut self,
        notification: Notification,
        rx: &mut Option<LinkRx>,
    ) -> bool {
        match notification {
            Notification::DeviceAck(Ack::PubAck(ack) | Ack::PubAckWithProperties(ack, _)) => {
                match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                        self.complete_pkid(ack.pkid);
                    }
                    reason => self.refuse_pkid(ack.pkid, format!("PUBACK {reason:?}")),
                }
            }
            Notification::DeviceAck(Ack::PubRec(rec) | Ack::PubRecWithProperties(rec, _)) => {
                match rec.reason {
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers => {
                        self.out.push(Packet::PubRel(
                            PubRel {
                                pkid: rec.pkid,
                                reason: PubRelReason::Success,
                            },
                            None,
                        ));
                    }
                    reason => self.refuse_pkid(rec.pkid, format!("PUBREC {reason:?}")),
                }
            }
            Notification::DeviceAck(Ack::PubComp(comp) | Ack::PubCompWithProperties(comp, _)) => {
                if comp.reason != PubCompReason::Success {
                    // As in the parent module: PUBREC already said the broker owns the message.
                    debug!(pkid = comp.pkid, reason = ?comp.reason, "PUBCOMP with a failure reason after a successful PUBREC; counted as published");
                }
                self.complete_pkid(comp.pkid);
            }
            Notification::Unschedule => {
                // The router paused the link for a full buffer (only subscriptions fill it; this link
                // has none): ask to be scheduled again, as rumqttd's network links do.
                if let Some(rx) = rx.as_ref() {
                    if rx.wake().await.is_err() {
                        self.lost(&PublishError::ConnectionLost);
                        return false;
                    }
                }
            }
            Notification::Disconnect(disconnect, _) => {
                warn!(reason = ?disconnect.reason_code, "the embedded cloud broker disconnected the hub's publisher");
                self.lost(&PublishError::ConnectionLost);
                return false;
            }
            other => {
                debug!(notification = ?other, "unexpected notification on the publisher's link; ignored")
            }
        }
        true
    }

    fn complete_pkid(&mut self, pkid: u16) {
        match self.inflight.remove(&pkid) {
            Some((id, _, size)) => {
                self.handed_bytes = self.handed_bytes.saturating_sub(size);
                self.waiters.complete(id);
            }
            None => debug!(pkid, "ack for an unknown packet id; ignored"),
        }
    }

    /// rumqttd 0.20's router acknowledges every PUBLISH it appends with success; a failure code would
    /// be a refusal of that message alone, as from any broker.
    fn refuse_pkid(&mut self, pkid: u16, detail: String) {
        match self.inflight.remove(&pkid) {
            Some((id, seq, size)) => {
                self.handed_bytes = self.handed_bytes.saturating_sub(size);
                self.waiters.refuse(id, seq, REASON_UNSPECIFIED, detail);
            }
            None => debug!(pkid, "refusal for an unknown packet id; ignored"),
        }
    }

    /// The link is gone (or the publisher stops): every batch in flight fails with `error`.
    fn lost(&mut self, error: &PublishError) {
        if self.tx.take().is_some() && !matches!(error, PublishError::Stopped) {
            warn!(
                cause = %error,
                in_flight_batches = self.waiters.len(),
                "lost the link to the embedded cloud broker; failing batches in flight and reconnecting"
            );
        }
        self.connected_tx.send_replace(false);
        self.waiters.fail_all(error);
        self.backlog.clear();
        self.inflight.clear();
        self.out.clear();
        self.qos0_done.clear();
        self.handed_bytes = 0;
    }
}

/// The next notification of the link, or never while there is none.
async fn next(
    rx: &mut Option<LinkRx>,
) -> Result<Option<Notification>, meshbridge_broker::embedded::LinkError> {
    match rx {
        Some(rx) => rx.next().await,
        None => std::future::pending().await,
    }
}

/// A message in the router's form, and what it will cost in the router's log.
///
/// The topic's `String` becomes `Bytes` without a copy, the properties move over without the two the
/// router would disconnect for, and the payload is copied. Why copy the payload: it is a slice of the
/// agent's frame buffer, and rumqttd keeps what it is given in its log until the log's segment is
/// dropped, long after the message was delivered. A slice keeps its whole buffer alive, so the log held
/// every agent frame (up to 1 MiB each, with the envelopes around the payloads) that still had one
/// message in it: with 10 publishers, 40 MiB of the hub's peak (heaptrack, `agent_conn::read_frame`).
/// Over loopback TCP rumqttd copied it out of its own read buffer; this copy is the same one.
struct Ready {
    seq: u64,
    qos: RouterQoS,
    retain: bool,
    topic: Bytes,
    payload: Bytes,
    properties: RouterProperties,
    /// What the log counts for it (`rumqttd::log_entry_size`), for the handed-over budget.
    size: usize,
}

impl From<OutMessage> for Ready {
    fn from(m: OutMessage) -> Self {
        let qos = match m.qos {
            QoS::AtMostOnce => RouterQoS::AtMostOnce,
            QoS::AtLeastOnce => RouterQoS::AtLeastOnce,
            QoS::ExactlyOnce => RouterQoS::ExactlyOnce,
        };
        let p = m.properties;
        let properties = RouterProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            topic_alias: None,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            subscription_identifiers: Vec::new(),
            content_type: p.content_type,
        };
        let topic = Bytes::from(m.topic);
        let payload = Bytes::copy_from_slice(&m.payload);
        let size = rumqttd::log_entry_size(
            &Publish::with_qos(topic.clone(), payload.clone(), qos, 0, m.retain),
            Some(&properties),
        );
        Self {
            seq: m.seq,
            qos,
            retain: m.retain,
            topic,
            payload,
            properties,
            size,
        }
    }
}

impl Ready {
    fn into_packet(self, pkid: u16) -> Packet {
        Packet::Publish(
            Publish::with_qos(self.topic, self.payload, self.qos, pkid, self.retain),
            Some(self.properties),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::{base_options, Publisher, REQUEST_CAP};
    use super::*;
    use meshbridge_broker::embedded::{EmbeddedBroker, EmbeddedSettings};
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::{AsyncClient, Event, Incoming};
    use tokio_util::task::TaskTracker;

    const WAIT: Duration = Duration::from_secs(10);
    const CLIENT_ID: &str = "meshbridge-hub";

    fn message(topic: &str, qos: QoS, seq: u64) -> OutMessage {
        OutMessage {
            topic: topic.to_owned(),
            qos,
            retain: false,
            payload: Bytes::from(format!("payload {seq}")),
            properties: PublishProperties {
                user_properties: vec![("meshbridge-id".to_owned(), format!("line1/{seq}"))],
                ..PublishProperties::default()
            },
            seq,
        }
    }

    /// A QoS 1 subscriber on the broker's internal v5 listener; returns once its SUBACK came.
    async fn subscriber(broker: &EmbeddedBroker, filter: &str) -> rumqttc::v5::EventLoop {
        let mut options = base_options(
            "test-subscriber",
            &broker.v5_addr.ip().to_string(),
            broker.v5_addr.port(),
            Duration::from_secs(30),
        );
        options.set_credentials(broker.login().user(), broker.login().secret());
        let (client, mut events) = AsyncClient::new(options, REQUEST_CAP);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe request");
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Incoming::SubAck(_)) =
                    events.poll().await.expect("subscriber connection")
                {
                    break;
                }
            }
        })
        .await
        .expect("SUBACK in time");
        // The client must live as long as its event loop; leak it for the test.
        std::mem::forget(client);
        events
    }

    /// The next `n` publishes the subscriber receives: (topic, payload, meshbridge-id).
    async fn receive(
        events: &mut rumqttc::v5::EventLoop,
        n: usize,
    ) -> Vec<(String, String, String)> {
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, async {
            while got.len() < n {
                if let Event::Incoming(Incoming::Publish(p)) =
                    events.poll().await.expect("subscriber connection")
                {
                    let id = p
                        .properties
                        .as_ref()
                        .and_then(|props| props.user_properties.first())
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default();
                    got.push((
                        String::from_utf8_lossy(&p.topic).into_owned(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                        id,
                    ));
                }
            }
        })
        .await
        .expect("the messages in time");
        got
    }

    async fn start() -> (EmbeddedBroker, Publisher, CancellationToken, TaskTracker) {
        let broker = EmbeddedBroker::start(&EmbeddedSettings::default())
            .await
            .expect("broker");
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let publisher = Publisher::spawn_local(
            broker.local_links(),
            CLIENT_ID,
            broker.pressure(),
            1024 * 1024,
            &tracker,
            stop.clone(),
        );
        assert!(publisher.wait_connected(WAIT).await, "link opened");
        (broker, publisher, stop, tracker)
    }

    /// The handed-over budget and the log's limit count the same thing: what an entry costs in
    /// memory (the entry, its properties' strings, an allocation each), not only topic and payload,
    /// which was 2.4 times less than what the log held (`vendor/rumqttd/PATCHED.md`).
    #[test]
    fn a_message_costs_the_log_its_entry_and_properties_not_only_topic_and_payload() {
        let mut bare = message("acme/line1/a", QoS::AtLeastOnce, 1);
        bare.properties = PublishProperties::default();
        let bare = Ready::from(bare);
        let topic_and_payload = "acme/line1/a".len() + "payload 1".len();
        assert!(
            bare.size > topic_and_payload + 200,
            "an entry is more than its bytes: {}",
            bare.size
        );
        let with_id = Ready::from(message("acme/line1/a", QoS::AtLeastOnce, 1));
        assert!(
            with_id.size >= bare.size + "meshbridge-id".len() + "line1/1".len() + 48,
            "a user property costs its strings and their allocations: {} vs {}",
            with_id.size,
            bare.size
        );
        // The payload is the router's own copy, not a slice of the agent's frame.
        let frame = Bytes::from(vec![7u8; 4096]);
        let mut m = message("acme/line1/a", QoS::AtLeastOnce, 1);
        m.payload = frame.slice(100..300);
        let ready = Ready::from(m);
        assert_eq!(ready.payload.len(), 200);
        assert!(
            !frame.as_ptr_range().contains(&ready.payload.as_ptr()),
            "the payload still points into the frame"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_of_every_qos_reach_a_subscriber_with_their_properties() {
        let (broker, publisher, stop, tracker) = start().await;
        let mut events = subscriber(&broker, "acme/#").await;
        let batch = vec![
            message("acme/line1/a", QoS::AtMostOnce, 1),
            message("acme/line1/b", QoS::AtLeastOnce, 2),
            message("acme/line1/c", QoS::ExactlyOnce, 3),
        ];
        let done = publisher.submit("line1", batch).await;
        let refusals = tokio::time::timeout(WAIT, done)
            .await
            .expect("completion in time")
            .expect("publisher alive")
            .expect("batch accepted");
        assert!(refusals.is_empty(), "{refusals:?}");
        let mut got = receive(&mut events, 3).await;
        got.sort();
        assert_eq!(
            got,
            (1..=3)
                .map(|seq| (
                    format!("acme/line1/{}", ["a", "b", "c"][seq - 1]),
                    format!("payload {seq}"),
                    format!("line1/{seq}")
                ))
                .collect::<Vec<_>>()
        );
        stop.cancel();
        tracker.close();
        tokio::time::timeout(WAIT, tracker.wait())
            .await
            .expect("the publisher stops");
        broker.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wildcard_topic_is_refused_alone_and_the_rest_published() {
        let (broker, publisher, stop, _tracker) = start().await;
        let mut events = subscriber(&broker, "acme/#").await;
        let batch = vec![
            message("acme/line1/+", QoS::AtLeastOnce, 7),
            message("acme/line1/ok", QoS::AtLeastOnce, 8),
        ];
        let refusals = tokio::time::timeout(WAIT, publisher.submit("line1", batch).await)
            .await
            .expect("completion in time")
            .expect("publisher alive")
            .expect("batch accepted");
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert_eq!(
            (refusals[0].seq, refusals[0].reason_code),
            (7, REASON_TOPIC_NAME_INVALID)
        );
        let got = receive(&mut events, 1).await;
        assert_eq!(got[0].0, "acme/line1/ok");
        stop.cancel();
        broker.stop().await;
    }

    /// A second connection with the publisher's client id takes the session over, so the router drops
    /// the publisher's link: the publisher must notice, reconnect, and publish again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_the_router_drops_is_reopened() {
        let (broker, publisher, stop, _tracker) = start().await;
        let mut events = subscriber(&broker, "acme/#").await;
        let (_tx, _rx) = broker
            .local_links()
            .open(CLIENT_ID)
            .await
            .expect("a second link");
        // The publisher sees its link dropped, and then opens a new one (which drops the test's).
        tokio::time::timeout(WAIT, async {
            while publisher.is_connected() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the publisher noticed the takeover");
        assert!(publisher.wait_connected(WAIT).await, "reconnected");
        let batch = vec![message("acme/line1/after", QoS::AtLeastOnce, 9)];
        let refusals = tokio::time::timeout(WAIT, publisher.submit("line1", batch).await)
            .await
            .expect("completion in time")
            .expect("publisher alive")
            .expect("batch accepted after the reconnect");
        assert!(refusals.is_empty());
        assert_eq!(receive(&mut events, 1).await[0].1, "payload 9");
        stop.cancel();
        broker.stop().await;
    }
}
