//! The hub's MQTT 5 client into the cloud broker, with a completion per batch.
//!
//! rumqttc 0.25 has no per-publish acknowledgement future, so this module builds one:
//! - the [`EventLoop`] runs in a task of its own ([`drive`]) and forwards every event, tagged with the client's
//!   *generation*, to the publisher task;
//! - the publisher task is the only one that hands requests to rumqttc, so it knows their order. It keeps a
//!   FIFO of submitted publishes; `Outgoing::Publish(pkid)` events arrive in request order (rumqttc reads no new
//!   request while a packet-id collision is pending), so each pops the FIFO head and maps `pkid` to its batch.
//!   `PubAck` (QoS 1) or `PubComp` (QoS 2) completes a message; QoS 0 completes when it is written.
//! - A batch (one agent `Batch` frame) has one [`oneshot`] completion: no allocation or task per message.
//!
//! When the broker connection fails, rumqttc would keep the unsent requests and retransmit some of them on the
//! next connection, which makes the FIFO ambiguous. So the whole client is thrown away instead: every batch in
//! flight fails (its agent connection is closed and the agent resends from its last ack), and a fresh client of
//! a new generation reconnects after a back-off. Events of older generations are ignored.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{PubAckReason, PubCompReason, PubRecReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

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
}

/// Why a batch was not accepted by the cloud broker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The broker connection was down when the batch arrived.
    #[error("the cloud broker is not connected")]
    BrokerUnavailable,
    /// The broker connection failed while the batch was in flight; some of it may have been published.
    #[error("the cloud broker connection was lost")]
    ConnectionLost,
    /// The broker answered a QoS 1 publish with a failure reason code.
    #[error("the cloud broker refused a publish: PUBACK {0:?}")]
    PubAckRefused(PubAckReason),
    /// The broker answered a QoS 2 publish with a failure reason code in PUBREC.
    #[error("the cloud broker refused a publish: PUBREC {0:?}")]
    PubRecRefused(PubRecReason),
    /// The broker answered a QoS 2 release with a failure reason code in PUBCOMP.
    #[error("the cloud broker refused a publish: PUBCOMP {0:?}")]
    PubCompRefused(PubCompReason),
    /// rumqttc refused the request itself (an invalid topic, or a closed client).
    #[error("the MQTT client refused a publish request")]
    ClientRefused,
    /// The publisher has stopped (the hub is shutting down).
    #[error("the publisher has stopped")]
    Stopped,
}

/// A batch and its completion.
#[derive(Debug)]
struct PublishBatch {
    messages: Vec<OutMessage>,
    done: oneshot::Sender<Result<(), PublishError>>,
}

/// Handle to the publisher task (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct Publisher {
    tx: mpsc::Sender<PublishBatch>,
    connected: watch::Receiver<bool>,
}

impl Publisher {
    /// Starts the publisher task on `tracker`; it runs until `stop` is cancelled.
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

    /// Queues a batch for publishing; the returned receiver completes when every message is accepted by the
    /// broker (or the batch failed). An empty batch completes at once.
    pub(crate) async fn submit(
        &self,
        messages: Vec<OutMessage>,
    ) -> oneshot::Receiver<Result<(), PublishError>> {
        let (done, rx) = oneshot::channel();
        if messages.is_empty() {
            let _ = done.send(Ok(()));
            return rx;
        }
        if let Err(mpsc::error::SendError(batch)) =
            self.tx.send(PublishBatch { messages, done }).await
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
    remaining: usize,
    done: oneshot::Sender<Result<(), PublishError>>,
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
    /// Handed to rumqttc, waiting for `Outgoing::Publish`: (batch id, QoS).
    unsent: VecDeque<(u64, QoS)>,
    /// Written QoS 1/2 publishes by packet id: batch id.
    inflight: HashMap<u16, u64>,
    waiters: HashMap<u64, Waiter>,
    next_batch: u64,
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
            waiters: HashMap::new(),
            next_batch: 0,
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
        let id = self.next_batch;
        self.next_batch += 1;
        self.waiters.insert(
            id,
            Waiter {
                remaining: batch.messages.len(),
                done: batch.done,
            },
        );
        self.backlog
            .extend(batch.messages.into_iter().map(|m| (id, m)));
    }

    /// Hands backlog messages to rumqttc while its request channel has room (only this task sends on it, so
    /// `try_publish` cannot find it full).
    fn feed(&mut self) {
        while self.unsent.len() < REQUEST_CAP {
            let Some((id, m)) = self.backlog.pop_front() else {
                break;
            };
            if !self.waiters.contains_key(&id) {
                // The batch already failed; do not publish the rest of it.
                continue;
            }
            let qos = m.qos;
            match self.client.try_publish_with_properties(
                m.topic,
                qos,
                m.retain,
                m.payload,
                m.properties,
            ) {
                Ok(()) => self.unsent.push_back((id, qos)),
                Err(error) => {
                    warn!(cause = %error, "the MQTT client refused a publish");
                    self.fail(id, PublishError::ClientRefused);
                }
            }
        }
    }

    fn on_event(&mut self, event: Result<Event, ConnectionError>) {
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                info!(
                    generation = self.generation,
                    "connected to the cloud broker"
                );
                self.connected = true;
                self.consecutive_failures = 0;
                self.connected_tx.send_replace(true);
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let Some((id, qos)) = self.unsent.pop_front() else {
                    warn!(pkid, "publish event without a pending request; ignored");
                    return;
                };
                if qos == QoS::AtMostOnce {
                    self.complete(id);
                } else {
                    self.inflight.insert(pkid, id);
                }
            }
            Ok(Event::Incoming(Incoming::PubAck(ack))) => match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                    self.complete_pkid(ack.pkid);
                }
                reason => self.fail_pkid(ack.pkid, PublishError::PubAckRefused(reason)),
            },
            Ok(Event::Incoming(Incoming::PubRec(rec))) => match rec.reason {
                PubRecReason::Success | PubRecReason::NoMatchingSubscribers => {}
                reason => self.fail_pkid(rec.pkid, PublishError::PubRecRefused(reason)),
            },
            Ok(Event::Incoming(Incoming::PubComp(comp))) => match comp.reason {
                PubCompReason::Success => self.complete_pkid(comp.pkid),
                reason => self.fail_pkid(comp.pkid, PublishError::PubCompRefused(reason)),
            },
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

    fn complete_pkid(&mut self, pkid: u16) {
        match self.inflight.remove(&pkid) {
            Some(id) => self.complete(id),
            None => debug!(pkid, "ack for an unknown packet id; ignored"),
        }
    }

    fn fail_pkid(&mut self, pkid: u16, error: PublishError) {
        warn!(pkid, cause = %error, "the cloud broker refused a publish");
        if let Some(id) = self.inflight.remove(&pkid) {
            self.fail(id, error);
        }
    }

    fn complete(&mut self, id: u64) {
        let finished = match self.waiters.get_mut(&id) {
            Some(w) => {
                w.remaining -= 1;
                w.remaining == 0
            }
            // The batch failed earlier; its other messages still complete here.
            None => false,
        };
        if finished {
            if let Some(w) = self.waiters.remove(&id) {
                let _ = w.done.send(Ok(()));
            }
        }
    }

    fn fail(&mut self, id: u64, error: PublishError) {
        if let Some(w) = self.waiters.remove(&id) {
            let _ = w.done.send(Err(error));
        }
    }

    fn fail_all(&mut self, error: &PublishError) {
        for (_, w) in self.waiters.drain() {
            let _ = w.done.send(Err(error.clone()));
        }
        self.backlog.clear();
        self.unsent.clear();
        self.inflight.clear();
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
