//! The hub's MQTT 5 client into the cloud broker, with a completion per batch.
//!
//! rumqttc 0.25 has no per-publish acknowledgement future, so this module builds one:
//! - the [`EventLoop`] runs in a task of its own ([`drive`]) and forwards every event, tagged with the client's
//!   *generation*, to the publisher task;
//! - the publisher task is the only one that hands requests to rumqttc, so it knows their order. It keeps a
//!   FIFO of submitted publishes; `Outgoing::Publish(pkid)` events arrive in request order (rumqttc reads no new
//!   request while a packet-id collision is pending), so each pops the FIFO head and maps `pkid` to its batch.
//!   `PubAck` (QoS 1) or `PubComp` (QoS 2) completes a message. QoS 0 has no acknowledgement in MQTT, so it
//!   completes when rumqttc reports it as outgoing (`Outgoing::Publish`), which is when it is queued for the
//!   socket, not when the broker has it: a broker connection that fails at that moment loses it. That is
//!   QoS 0's own contract (at most once) and the README says so; QoS 1/2 never complete without the broker.
//! - A batch (one agent `Batch` frame) has one [`oneshot`] completion: no allocation or task per message.
//! - A broker that refuses *one* message (a failure reason code in PUBACK/PUBREC, e.g. not authorized), a
//!   message over the broker's Maximum Packet Size (from CONNACK; rumqttc would otherwise fail the whole
//!   connection, for every site) and a request rumqttc itself refuses are final for that message only: the
//!   batch completes with a [`Refusal`] for it, which the agent connection reports to the agent (which
//!   dead-letters it). Only a lost connection fails a batch.
//! - Some brokers refuse by closing the connection instead (Mosquitto 2.0.11 sends PUBACK 0x87 for an
//!   ACL-denied publish and then drops the client; rumqttc loses that PUBACK with the connection). Such a
//!   *poison* message would fail its batch forever. So the QoS 1/2 messages in flight when the connection
//!   fails become [`Suspects`]: when they come again (the agent resends), each is published alone, and one
//!   that is alone in flight when the connection fails [`POISON_STRIKES`] times is refused (0x80) instead.
//!
//! When the broker connection fails, rumqttc would keep the unsent requests and retransmit some of them on the
//! next connection, which makes the FIFO ambiguous. So the whole client is thrown away instead: every batch in
//! flight fails (its agent connection is closed and the agent resends from its last ack), and a fresh client of
//! a new generation reconnects after a back-off. Events of older generations are ignored.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meshbridge_broker::embedded::{LocalLinks, SubscriberPressure};
use rumqttc::v5::mqttbytes::v5::{PubAckReason, PubCompReason, PubRecReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

mod local;

/// Most publishes handed to rumqttc and not yet written; also the capacity of its request channel.
const REQUEST_CAP: usize = 4096;
/// Batches queued towards the publisher task; beyond this, agent connections wait (backpressure).
const BATCH_QUEUE: usize = 256;
/// Most unacknowledged QoS 1/2 publishes towards the broker (the broker's receive maximum may lower it).
const INFLIGHT_LIMIT: u16 = 1000;
/// First reconnect delay after a broker connection failure; doubled per consecutive failure.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay. Short, because while the broker is away every agent is refused
/// ([`crate::agent_conn`], `GoAwayCode::Unavailable`): delivery resumes at most this long after the broker is
/// back, and one client retrying every 2 s costs the broker nothing.
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// How long a stopping publisher waits for its DISCONNECT to be written.
const DISCONNECT_WAIT: Duration = Duration::from_millis(500);

/// One message to publish, already mapped into the site's namespace.
#[derive(Debug)]
pub(crate) struct OutMessage {
    /// Full cloud topic (`<namespace>/<local topic>`).
    pub(crate) topic: String,
    /// QoS as published at the origin.
    pub(crate) qos: QoS,
    /// Retain flag as published at the origin.
    pub(crate) retain: bool,
    /// Payload bytes (a slice of the agent's frame, not copied).
    pub(crate) payload: Bytes,
    /// MQTT 5 properties, including the `meshbridge-id` user property.
    pub(crate) properties: PublishProperties,
    /// The agent's seq of the entry, for a [`Refusal`].
    pub(crate) seq: u64,
}

impl OutMessage {
    /// An upper bound of the PUBLISH packet's size on the wire (within a few bytes of rumqttc's
    /// `Publish::size`): what the broker's Maximum Packet Size is compared with.
    fn packet_size_bound(&self) -> usize {
        let p = &self.properties;
        let str_prop = |s: &Option<String>| s.as_ref().map_or(0, |s| 3 + s.len());
        let props = 5 // property length, message expiry
            + 2 // payload format indicator
            + str_prop(&p.content_type)
            + str_prop(&p.response_topic)
            + p.correlation_data.as_ref().map_or(0, |c| 3 + c.len())
            + p.user_properties
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>();
        5 + 2 + self.topic.len() + 2 + 4 + props + self.payload.len()
    }
}

/// One message of a batch the broker (or the client library) refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The agent's seq of the entry.
    pub(crate) seq: u64,
    /// The MQTT 5 reason code: the broker's, or the one the hub chose (0x95 packet too large, 0x90 topic
    /// name invalid).
    pub(crate) reason_code: u8,
    /// For the log and the dead-letter listing.
    pub(crate) detail: String,
}

/// What a completed batch left unpublished: its refusals (usually none).
pub(crate) type Refusals = Vec<Refusal>;

/// Why a batch was not accepted by the cloud broker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The broker connection was down when the batch arrived.
    #[error("the cloud broker is not connected")]
    BrokerUnavailable,
    /// The broker connection failed while the batch was in flight; some of it may have been published.
    #[error("the cloud broker connection was lost")]
    ConnectionLost,
    /// The broker said a packet id was still in use: a state mix-up of this connection, not a verdict on
    /// the message, so the batch is retried.
    #[error("the cloud broker reported packet id {0} in use")]
    PacketIdInUse(u16),
    /// The publisher has stopped (the hub is shutting down).
    #[error("the publisher has stopped")]
    Stopped,
}

/// A batch and its completion.
#[derive(Debug)]
struct PublishBatch {
    /// The site the batch came from (suspects are per site and seq).
    site: String,
    messages: Vec<OutMessage>,
    done: oneshot::Sender<Result<Refusals, PublishError>>,
}

/// Handle to the publisher task (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct Publisher {
    tx: mpsc::Sender<PublishBatch>,
    connected: watch::Receiver<bool>,
}

impl Publisher {
    /// Starts the publisher task for an MQTT broker (an external one) on `tracker`; it runs until
    /// `stop` is cancelled.
    pub(crate) fn spawn(
        options: MqttOptions,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(BATCH_QUEUE);
        let (connected_tx, connected) = watch::channel(false);
        let (events_tx, events_rx) = mpsc::channel(REQUEST_CAP);
        let task = PublisherTask::new(options, events_tx, connected_tx, tracker.clone(), stop);
        tracker.spawn(task.run(rx, events_rx));
        Self { tx, connected }
    }

    /// Starts the publisher task of the embedded cloud broker, on an in-process link to its router
    /// (see [`local`] for why), as `client_id`; it runs until `stop` is cancelled. While the broker's
    /// subscriber `pressure` is held, nothing new is handed over, and never more than `handed_budget`
    /// message bytes are handed over and unacknowledged (see [`local::PRESSURE_POLL`]).
    pub(crate) fn spawn_local(
        links: LocalLinks,
        client_id: &str,
        pressure: Arc<SubscriberPressure>,
        handed_budget: usize,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(BATCH_QUEUE);
        let (connected_tx, connected) = watch::channel(false);
        let task = local::LocalTask::new(
            links,
            client_id,
            pressure,
            handed_budget,
            connected_tx,
            stop,
        );
        tracker.spawn(task.run(rx));
        Self { tx, connected }
    }

    /// Queues a batch for publishing; the returned receiver completes when every message is accepted by the
    /// broker (or the batch failed). An empty batch completes at once.
    pub(crate) async fn submit(
        &self,
        site: &str,
        messages: Vec<OutMessage>,
    ) -> oneshot::Receiver<Result<Refusals, PublishError>> {
        let (done, rx) = oneshot::channel();
        if messages.is_empty() {
            let _ = done.send(Ok(Vec::new()));
            return rx;
        }
        if let Err(mpsc::error::SendError(batch)) = self
            .tx
            .send(PublishBatch {
                site: site.to_owned(),
                messages,
                done,
            })
            .await
        {
            let _ = batch.done.send(Err(PublishError::Stopped));
        }
        rx
    }

    /// Whether the broker connection is up right now (it may still fail before the next publish).
    pub(crate) fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until the broker connection is up, for at most `limit`; returns whether it is.
    pub(crate) async fn wait_connected(&self, limit: Duration) -> bool {
        let mut connected = self.connected.clone();
        tokio::time::timeout(limit, connected.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// A generation-tagged event from [`drive`].
type Tagged = (u64, Result<Event, ConnectionError>);

/// A batch waiting for its messages' acknowledgements.
#[derive(Debug)]
struct Waiter {
    site: String,
    remaining: usize,
    refused: Refusals,
    done: oneshot::Sender<Result<Refusals, PublishError>>,
}

/// The batches handed to a publisher task and not completed yet, by batch id: both tasks' bookkeeping
/// (this module's, for any MQTT broker, and [`local`]'s, for the embedded one).
#[derive(Debug, Default)]
struct Waiters {
    by_id: HashMap<u64, Waiter>,
    next: u64,
}

impl Waiters {
    /// Registers a batch of `len` messages; returns its id.
    fn add(
        &mut self,
        site: String,
        len: usize,
        done: oneshot::Sender<Result<Refusals, PublishError>>,
    ) -> u64 {
        let id = self.next;
        self.next += 1;
        self.by_id.insert(
            id,
            Waiter {
                site,
                remaining: len,
                refused: Vec::new(),
                done,
            },
        );
        id
    }

    fn get(&self, id: u64) -> Option<&Waiter> {
        self.by_id.get(&id)
    }

    fn len(&self) -> usize {
        self.by_id.len()
    }

    /// One message of batch `id` is done; the batch completes with its last one. A batch that failed
    /// earlier is gone, and its other messages are ignored here.
    fn complete(&mut self, id: u64) {
        let finished = self.by_id.get_mut(&id).is_some_and(|w| {
            w.remaining -= 1;
            w.remaining == 0
        });
        if finished {
            if let Some(w) = self.by_id.remove(&id) {
                let _ = w.done.send(Ok(w.refused));
            }
        }
    }

    /// Records a final refusal of one message; it counts as done for its batch.
    fn refuse(&mut self, id: u64, seq: u64, reason_code: u8, detail: String) {
        if let Some(w) = self.by_id.get_mut(&id) {
            w.refused.push(Refusal {
                seq,
                reason_code,
                detail,
            });
        }
        self.complete(id);
    }

    /// Fails batch `id` as a whole (the agent resends it).
    fn fail(&mut self, id: u64, error: PublishError) {
        if let Some(w) = self.by_id.remove(&id) {
            let _ = w.done.send(Err(error));
        }
    }

    fn fail_all(&mut self, error: &PublishError) {
        for (_, w) in self.by_id.drain() {
            let _ = w.done.send(Err(error.clone()));
        }
    }
}

struct PublisherTask {
    options: MqttOptions,
    client: AsyncClient,
    generation: u64,
    connected: bool,
    connected_tx: watch::Sender<bool>,
    consecutive_failures: u32,
    /// Messages of accepted batches not yet handed to rumqttc (kept while `unsent` is full).
    backlog: VecDeque<(u64, OutMessage)>,
    /// Handed to rumqttc, waiting for `Outgoing::Publish`: (batch id, QoS, seq).
    unsent: VecDeque<(u64, QoS, u64)>,
    /// Written QoS 1/2 publishes by packet id: (batch id, seq).
    inflight: HashMap<u16, (u64, u64)>,
    /// The broker's Maximum Packet Size from its CONNACK, if it set one.
    max_packet_size: Option<usize>,
    /// Messages in flight when the broker connection failed; see the module docs.
    suspects: Suspects,
    /// The suspect published alone, waiting for its answer: (batch id, seq).
    isolated: Option<(u64, u64)>,
    waiters: Waiters,
    events_tx: mpsc::Sender<Tagged>,
    tracker: TaskTracker,
    stop: CancellationToken,
    /// Stops the current generation's event loop task.
    drive_stop: CancellationToken,
}

impl PublisherTask {
    fn new(
        options: MqttOptions,
        events_tx: mpsc::Sender<Tagged>,
        connected_tx: watch::Sender<bool>,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        // Not a child of `stop`: the publisher stops its event loop itself, after a DISCONNECT.
        let drive_stop = CancellationToken::new();
        let (client, eventloop) = AsyncClient::new(options.clone(), REQUEST_CAP);
        tracker.spawn(drive(
            eventloop,
            0,
            Duration::ZERO,
            events_tx.clone(),
            drive_stop.clone(),
        ));
        Self {
            options,
            client,
            generation: 0,
            connected: false,
            connected_tx,
            consecutive_failures: 0,
            backlog: VecDeque::new(),
            unsent: VecDeque::with_capacity(REQUEST_CAP),
            inflight: HashMap::with_capacity(usize::from(INFLIGHT_LIMIT)),
            max_packet_size: None,
            suspects: Suspects::default(),
            isolated: None,
            waiters: Waiters::default(),
            events_tx,
            tracker,
            stop,
            drive_stop,
        }
    }

    async fn run(
        mut self,
        mut batches: mpsc::Receiver<PublishBatch>,
        mut events: mpsc::Receiver<Tagged>,
    ) {
        loop {
            let accepting = self.backlog.is_empty();
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                Some((generation, event)) = events.recv() => {
                    if generation == self.generation {
                        self.on_event(event);
                        self.feed();
                    }
                }
                Some(batch) = batches.recv(), if accepting => {
                    self.accept(batch);
                    self.feed();
                }
            }
        }
        self.fail_all(&PublishError::Stopped);
        batches.close();
        while let Ok(batch) = batches.try_recv() {
            let _ = batch.done.send(Err(PublishError::Stopped));
        }
        // A polite DISCONNECT, then the event loop task is stopped (bounded: the broker may be gone).
        if self.connected && self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(DISCONNECT_WAIT, async {
                while let Some((generation, event)) = events.recv().await {
                    let sent = matches!(event, Ok(Event::Outgoing(Outgoing::Disconnect)));
                    if generation == self.generation && (sent || event.is_err()) {
                        break;
                    }
                }
            })
            .await;
        }
        self.drive_stop.cancel();
    }

    fn accept(&mut self, batch: PublishBatch) {
        if !self.connected {
            let _ = batch.done.send(Err(PublishError::BrokerUnavailable));
            return;
        }
        let id = self
            .waiters
            .add(batch.site, batch.messages.len(), batch.done);
        self.backlog
            .extend(batch.messages.into_iter().map(|m| (id, m)));
    }

    /// Hands backlog messages to rumqttc while its request channel has room (only this task sends on it, so
    /// `try_publish` cannot find it full).
    fn feed(&mut self) {
        if self.backlog.is_empty() {
            return;
        }
        while self.unsent.len() < REQUEST_CAP && self.isolated.is_none() {
            let Some((id, m)) = self.backlog.front() else {
                break;
            };
            let (id, seq) = (*id, m.seq);
            let Some(waiter) = self.waiters.get(id) else {
                // The batch already failed; do not publish the rest of it.
                self.backlog.pop_front();
                continue;
            };
            if let Some(strikes) = self.suspects.strikes(&waiter.site, seq) {
                if strikes >= POISON_STRIKES {
                    let site = waiter.site.clone();
                    self.backlog.pop_front();
                    self.suspects.clear(&site, seq);
                    warn!(%site, seq, strikes, "the cloud broker closed its connection every time this message was published alone: refused as poison");
                    self.refuse(
                        id,
                        seq,
                        REASON_UNSPECIFIED,
                        format!("the cloud broker closed its connection each of the {strikes} times this message was published alone (a refusal it does not report, such as Mosquitto's ACL denial)"),
                    );
                    continue;
                }
                if !(self.unsent.is_empty() && self.inflight.is_empty()) {
                    // Publish it alone: wait for what is in flight.
                    break;
                }
                self.isolated = Some((id, seq));
            }
            let Some((id, m)) = self.backlog.pop_front() else {
                break;
            };
            let qos = m.qos;
            if let Some(max) = self.max_packet_size {
                let size = m.packet_size_bound();
                if size > max {
                    self.refuse(
                        id,
                        seq,
                        REASON_PACKET_TOO_LARGE,
                        format!("{size}-byte PUBLISH over the cloud broker's Maximum Packet Size of {max}"),
                    );
                    continue;
                }
            }
            if m.topic.contains(['+', '#']) {
                // rumqttc would refuse it with the same error as a closed client; tell them apart here.
                self.refuse(
                    id,
                    seq,
                    REASON_TOPIC_NAME_INVALID,
                    format!("wildcard in topic {:?}", m.topic),
                );
                continue;
            }
            match self.client.try_publish_with_properties(
                m.topic,
                qos,
                m.retain,
                m.payload,
                m.properties,
            ) {
                Ok(()) => self.unsent.push_back((id, qos, seq)),
                Err(error) => {
                    warn!(cause = %error, "the MQTT client refused a publish; failing its batch");
                    self.fail(id, PublishError::ConnectionLost);
                }
            }
        }
    }

    fn on_event(&mut self, event: Result<Event, ConnectionError>) {
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                self.max_packet_size = ack
                    .properties
                    .and_then(|p| p.max_packet_size)
                    .and_then(|m| usize::try_from(m).ok());
                info!(
                    generation = self.generation,
                    "connected to the cloud broker"
                );
                self.connected = true;
                self.consecutive_failures = 0;
                self.connected_tx.send_replace(true);
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let Some((id, qos, seq)) = self.unsent.pop_front() else {
                    warn!(pkid, "publish event without a pending request; ignored");
                    return;
                };
                if qos == QoS::AtMostOnce {
                    self.resolve_isolated(id, seq);
                    self.complete(id);
                } else {
                    self.inflight.insert(pkid, (id, seq));
                }
            }
            Ok(Event::Incoming(Incoming::PubAck(ack))) => match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                    self.complete_pkid(ack.pkid);
                }
                PubAckReason::PacketIdentifierInUse => {
                    self.fail_pkid(ack.pkid, PublishError::PacketIdInUse(ack.pkid));
                }
                reason => {
                    self.refuse_pkid(ack.pkid, puback_code(&reason), format!("PUBACK {reason:?}"))
                }
            },
            Ok(Event::Incoming(Incoming::PubRec(rec))) => match rec.reason {
                PubRecReason::Success | PubRecReason::NoMatchingSubscribers => {}
                PubRecReason::PacketIdentifierInUse => {
                    self.fail_pkid(rec.pkid, PublishError::PacketIdInUse(rec.pkid));
                }
                reason => {
                    self.refuse_pkid(rec.pkid, pubrec_code(&reason), format!("PUBREC {reason:?}"))
                }
            },
            Ok(Event::Incoming(Incoming::PubComp(comp))) => {
                if comp.reason != PubCompReason::Success {
                    // PUBREC already said the broker owns the message; a PUBCOMP that no longer knows the
                    // packet id does not take that back, and resending would duplicate it.
                    debug!(pkid = comp.pkid, reason = ?comp.reason, "PUBCOMP with a failure reason after a successful PUBREC; counted as published");
                }
                self.complete_pkid(comp.pkid);
            }
            Ok(_) => {}
            Err(error) => self.on_connection_error(&error),
        }
    }

    fn on_connection_error(&mut self, error: &ConnectionError) {
        let delay = RECONNECT_MIN
            .saturating_mul(1 << self.consecutive_failures.min(10))
            .min(RECONNECT_MAX);
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        warn!(
            cause = %error,
            in_flight_batches = self.waiters.len(),
            retry_in = ?delay,
            "cloud broker connection failed; failing batches in flight and reconnecting"
        );
        self.connected = false;
        self.connected_tx.send_replace(false);
        self.note_suspects();
        self.fail_all(&PublishError::ConnectionLost);
        // A fresh client: the old one's leftovers must never be sent (see the module docs).
        self.drive_stop.cancel();
        self.drive_stop = CancellationToken::new();
        self.generation += 1;
        let (client, eventloop) = AsyncClient::new(self.options.clone(), REQUEST_CAP);
        self.client = client;
        self.tracker.spawn(drive(
            eventloop,
            self.generation,
            delay,
            self.events_tx.clone(),
            self.drive_stop.clone(),
        ));
    }

    /// Takes a written QoS 1/2 publish out of `inflight`.
    fn take_inflight(&mut self, pkid: u16) -> Option<(u64, u64)> {
        self.inflight.remove(&pkid)
    }

    fn complete_pkid(&mut self, pkid: u16) {
        match self.take_inflight(pkid) {
            Some((id, seq)) => {
                self.resolve_isolated(id, seq);
                self.complete(id);
            }
            None => debug!(pkid, "ack for an unknown packet id; ignored"),
        }
    }

    /// The broker answered the message published alone: it is no longer a suspect.
    fn resolve_isolated(&mut self, id: u64, seq: u64) {
        if self.isolated == Some((id, seq)) {
            self.isolated = None;
            if let Some(w) = self.waiters.get(id) {
                self.suspects.clear(&w.site, seq);
            }
        }
    }

    fn fail_pkid(&mut self, pkid: u16, error: PublishError) {
        warn!(pkid, cause = %error, "cloud broker publish failed; failing its batch");
        if let Some((id, _)) = self.take_inflight(pkid) {
            self.fail(id, error);
        }
    }

    fn refuse_pkid(&mut self, pkid: u16, reason_code: u8, detail: String) {
        match self.take_inflight(pkid) {
            Some((id, seq)) => {
                self.resolve_isolated(id, seq);
                self.refuse(id, seq, reason_code, detail);
            }
            None => debug!(pkid, "refusal for an unknown packet id; ignored"),
        }
    }

    /// Records a final refusal of one message; it counts as done for its batch.
    fn refuse(&mut self, id: u64, seq: u64, reason_code: u8, detail: String) {
        self.resolve_isolated(id, seq);
        self.waiters.refuse(id, seq, reason_code, detail);
    }

    fn complete(&mut self, id: u64) {
        self.waiters.complete(id);
    }

    fn fail(&mut self, id: u64, error: PublishError) {
        if self.isolated.is_some_and(|(isolated, _)| isolated == id) {
            // Its batch failed for another reason; the suspect stays a suspect.
            self.isolated = None;
        }
        self.waiters.fail(id, error);
    }

    /// On a failed connection: a message published alone gets a strike; otherwise every QoS 1/2 message
    /// still waiting for the broker becomes a suspect (QoS 0 ones completed when written).
    fn note_suspects(&mut self) {
        if let Some((id, seq)) = self.isolated.take() {
            if let Some(w) = self.waiters.get(id) {
                let strikes = self.suspects.strike(&w.site, seq);
                warn!(site = %w.site, seq, strikes, "the cloud broker connection failed while this message was published alone");
            }
            return;
        }
        let in_flight = self.inflight.values().copied().chain(
            self.unsent
                .iter()
                .filter(|u| u.1 != QoS::AtMostOnce)
                .map(|u| (u.0, u.2)),
        );
        for (id, seq) in in_flight {
            if let Some(w) = self.waiters.get(id) {
                self.suspects.suspect(&w.site, seq);
            }
        }
    }

    fn fail_all(&mut self, error: &PublishError) {
        self.waiters.fail_all(error);
        self.backlog.clear();
        self.unsent.clear();
        self.inflight.clear();
        self.isolated = None;
    }
}

/// Times a message may be alone in flight when the broker connection fails before it counts as poison.
/// Two, so that one unrelated connection failure does not condemn a good message.
const POISON_STRIKES: u8 = 2;
/// Most suspects remembered; beyond that new ones are not tracked (they are retried as before).
const MAX_SUSPECTS: usize = 10_000;

/// Messages that were in flight when the broker connection failed, by site and seq, with how often the
/// connection failed while each was published alone. Pure bookkeeping; the publisher task decides.
#[derive(Debug, Default)]
struct Suspects {
    by_site: HashMap<String, HashMap<u64, u8>>,
    len: usize,
}

impl Suspects {
    fn strikes(&self, site: &str, seq: u64) -> Option<u8> {
        if self.len == 0 {
            return None;
        }
        self.by_site.get(site)?.get(&seq).copied()
    }

    fn suspect(&mut self, site: &str, seq: u64) {
        if self.len >= MAX_SUSPECTS {
            return;
        }
        let entry = self.by_site.entry(site.to_owned()).or_default();
        if let std::collections::hash_map::Entry::Vacant(v) = entry.entry(seq) {
            v.insert(0);
            self.len += 1;
        }
    }

    /// Adds a strike (suspecting it first if needed) and returns the count.
    fn strike(&mut self, site: &str, seq: u64) -> u8 {
        self.suspect(site, seq);
        match self.by_site.get_mut(site).and_then(|m| m.get_mut(&seq)) {
            Some(strikes) => {
                *strikes = strikes.saturating_add(1);
                *strikes
            }
            None => 0,
        }
    }

    fn clear(&mut self, site: &str, seq: u64) {
        if let Some(m) = self.by_site.get_mut(site) {
            if m.remove(&seq).is_some() {
                self.len -= 1;
            }
            if m.is_empty() {
                self.by_site.remove(site);
            }
        }
    }
}

/// MQTT 5 reason codes the hub gives refusals it decides itself.
const REASON_UNSPECIFIED: u8 = 0x80;
const REASON_TOPIC_NAME_INVALID: u8 = 0x90;
const REASON_PACKET_TOO_LARGE: u8 = 0x95;

/// The wire value of a PUBACK failure reason (MQTT 5 section 3.4.2.1).
fn puback_code(reason: &PubAckReason) -> u8 {
    match reason {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

/// The wire value of a PUBREC failure reason (the same table as PUBACK's).
fn pubrec_code(reason: &PubRecReason) -> u8 {
    match reason {
        PubRecReason::Success => 0x00,
        PubRecReason::NoMatchingSubscribers => 0x10,
        PubRecReason::UnspecifiedError => 0x80,
        PubRecReason::ImplementationSpecificError => 0x83,
        PubRecReason::NotAuthorized => 0x87,
        PubRecReason::TopicNameInvalid => 0x90,
        PubRecReason::PacketIdentifierInUse => 0x91,
        PubRecReason::QuotaExceeded => 0x97,
        PubRecReason::PayloadFormatInvalid => 0x99,
    }
}

/// Polls one generation's event loop and forwards its events until it fails, `stop` is cancelled, or the
/// publisher is gone. Waits `delay` first (the reconnect back-off).
async fn drive(
    mut eventloop: EventLoop,
    generation: u64,
    delay: Duration,
    events: mpsc::Sender<Tagged>,
    stop: CancellationToken,
) {
    tokio::select! {
        () = stop.cancelled() => return,
        () = tokio::time::sleep(delay) => {}
    }
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = eventloop.poll() => event,
        };
        let failed = event.is_err();
        if events.send((generation, event)).await.is_err() || failed {
            return;
        }
    }
}

/// Options shared by both broker kinds: a clean session (see the module docs for why nothing is resumed),
/// a large in-flight window and request channel for throughput.
pub(crate) fn base_options(
    client_id: &str,
    host: &str,
    port: u16,
    keep_alive: Duration,
) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, host, port);
    options
        .set_clean_start(true)
        .set_keep_alive(keep_alive)
        .set_outgoing_inflight_upper_limit(INFLIGHT_LIMIT)
        .set_request_channel_capacity(REQUEST_CAP);
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspects_count_strikes_per_site_and_seq_and_forget_when_cleared() {
        let mut s = Suspects::default();
        assert_eq!(s.strikes("line1", 5), None);
        s.suspect("line1", 5);
        s.suspect("line1", 5);
        s.suspect("line2", 5);
        assert_eq!(s.len, 2);
        assert_eq!(s.strikes("line1", 5), Some(0));
        assert_eq!(s.strike("line1", 5), 1);
        assert_eq!(s.strike("line1", 5), 2);
        assert_eq!(s.strikes("line2", 5), Some(0), "sites are apart");
        // A strike on an unknown message suspects it first.
        assert_eq!(s.strike("line3", 9), 1);
        s.clear("line1", 5);
        s.clear("line1", 5);
        assert_eq!(s.strikes("line1", 5), None);
        assert_eq!(s.len, 2);
        s.clear("line2", 5);
        s.clear("line3", 9);
        assert_eq!(s.len, 0);
        assert!(s.by_site.is_empty());
    }

    #[test]
    fn suspects_are_bounded() {
        let mut s = Suspects::default();
        for seq in 0..(MAX_SUSPECTS as u64 + 10) {
            s.suspect("line1", seq);
        }
        assert_eq!(s.len, MAX_SUSPECTS);
        assert_eq!(s.strikes("line1", MAX_SUSPECTS as u64 + 5), None);
    }

    #[test]
    fn the_packet_size_bound_is_never_below_rumqttcs_size() {
        use rumqttc::v5::mqttbytes::v5::Publish;
        let props = PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            topic_alias: None,
            response_topic: Some("reply/to".to_owned()),
            correlation_data: Some(Bytes::from_static(b"abc")),
            user_properties: vec![("meshbridge-id".to_owned(), "line1/17".to_owned())],
            subscription_identifiers: Vec::new(),
            content_type: Some("text/plain".to_owned()),
        };
        for payload in [0usize, 10, 200, 20_000] {
            let m = OutMessage {
                topic: "acme/plant1/line1/t".to_owned(),
                qos: QoS::AtLeastOnce,
                retain: false,
                payload: Bytes::from(vec![0; payload]),
                properties: props.clone(),
                seq: 17,
            };
            let mut exact = Publish::new(
                m.topic.clone(),
                m.qos,
                m.payload.clone(),
                Some(props.clone()),
            );
            exact.pkid = 1;
            let bound = m.packet_size_bound();
            assert!(bound >= exact.size(), "{bound} < {}", exact.size());
            assert!(
                bound <= exact.size() + 8,
                "{bound} far above {}",
                exact.size()
            );
        }
    }
}
