//! Persistent sessions of the edge broker, served by the front and kept on disk
//! (`shared/src/queue/session.rs`), because rumqttd keeps sessions in memory only and has no hook to
//! persist them: a restart or `kill -9` of the agent lost every subscription and every message queued for an
//! offline subscriber.
//!
//! # Who serves what
//! A connection is *persistent* when it asks for a session that outlives it: MQTT 3.1.1 `cleansession=0`,
//! or MQTT 5 with a Session Expiry Interval above 0 (or `clean start = 0` resuming a stored session). For
//! such a connection the front answers SUBSCRIBE and UNSUBSCRIBE itself and never forwards them, so
//! rumqttd routes nothing to it; instead every PUBLISH the front relays (and every downlink message and
//! last will, which reach rumqttd by other paths) is matched here against the stored subscriptions:
//!
//! - QoS 1/2 deliveries are written to the store by one writer thread (group commit: one fsync for what
//!   arrived meanwhile), and the publisher's PUBACK/PUBREC is held until that commit, as it is for the
//!   uplink queue. So a message acknowledged to its publisher is on disk for every persistent
//!   subscriber, online or not.
//! - QoS 0 deliveries go to an online session directly and are not kept for an offline one (Mosquitto's
//!   default, `queue_qos0_messages false`).
//!
//! Clean sessions are untouched: rumqttd serves them, and a PUBLISH that matches no persistent
//! subscription costs one check of an atomic counter.
//!
//! # Delivery
//! Each online persistent connection runs an outbox ([`run_outbox`]): it reads the session's queued messages
//! in order, at most [`INFLIGHT`] unacknowledged at a time (Mosquitto's `max_inflight_messages`), and
//! removes each on PUBACK (QoS 1) or PUBCOMP (QoS 2); a PUBREC is recorded durably before the PUBREL
//! goes out, so that PUBREL, not the message, is what a reconnect or restart resends. The packet id is derived from the message's place in the store, so it is
//! the same after a restart and a QoS 2 receiver recognises a redelivery. Redeliveries carry DUP.
//!
//! # Limits (said in the README)
//! Shared subscriptions (`$share/...`) are refused on a persistent connection (3.1.1 0x80, 5.0 0x9E);
//! subscription identifiers are not sent; a message's expiry interval is passed on as published, not
//! reduced by the time it waited; a session expiry changed in an MQTT 5 DISCONNECT is ignored.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use shared::mqtt::{self, ProtocolVersion, Publish, QoS, SubscriptionOptions};
use shared::queue::{QueueError, SessionRecord, SessionStore};
use shared::topic::TopicFilter;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, error, info, warn};

use crate::front::CommitRejected;

/// Most unacknowledged deliveries per connection (Mosquitto's `max_inflight_messages` default).
pub const INFLIGHT: usize = 20;
/// QoS 0 deliveries buffered for a slow online subscriber before further ones are dropped (counted).
const LIVE_BUFFER: usize = 1024;
/// Session expiry of a 3.1.1 persistent session: never.
const NEVER: u32 = u32::MAX;
/// SUBACK failure codes for a refused filter.
const SUBACK_FAILURE_V3: u8 = 0x80;
const SUBACK_SHARED_NOT_SUPPORTED_V5: u8 = 0x9E;
/// UNSUBACK reason "no subscription existed" (MQTT 5.0 §3.11.3).
const UNSUBACK_NO_SUBSCRIPTION: u8 = 0x11;

/// Deliveries waiting to be stored, as (client id, QoS, PUBLISH packet).
pub type Deliveries = Vec<(Arc<str>, u8, Bytes)>;

/// The retained messages matching a filter, for a new subscription (the agent's retained store).
pub type RetainedLookup = Arc<dyn Fn(&TopicFilter) -> Vec<Publish> + Send + Sync>;

/// What the sessions counted, for metrics.
#[derive(Debug, Default)]
pub struct SessionCounters {
    /// QoS 1/2 messages stored for a session.
    pub queued: AtomicU64,
    /// Messages not stored because a session's bound was reached.
    pub dropped_full: AtomicU64,
    /// QoS 0 messages dropped because an online subscriber did not read them fast enough.
    pub dropped_slow: AtomicU64,
    /// Deliveries acknowledged by subscribers.
    pub acknowledged: AtomicU64,
    /// Sessions removed because their expiry interval ran out.
    pub expired: AtomicU64,
}

#[derive(Debug, Clone)]
struct Subscription {
    filter: TopicFilter,
    options: SubscriptionOptions,
}

struct Entry {
    record: SessionRecord,
    subscriptions: Vec<Subscription>,
    online: Option<Online>,
}

struct Online {
    generation: u64,
    wake: Arc<Notify>,
    live: mpsc::Sender<Bytes>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<Arc<str>, Entry>,
    next_generation: u64,
    /// Highest seq handed to a connection per client in this process: a later send of it is a redelivery.
    sent_up_to: HashMap<Arc<str>, u64>,
}

struct WriteJob {
    items: Deliveries,
    done: Option<oneshot::Sender<Result<(), CommitRejected>>>,
}

/// The persistent sessions; see the module docs.
pub struct Sessions {
    store: Arc<SessionStore>,
    retained: Option<RetainedLookup>,
    inner: Mutex<Inner>,
    /// Subscriptions over all sessions: 0 lets [`Sessions::route`] return at once.
    subscriptions: AtomicUsize,
    writer: std::sync::mpsc::Sender<WriteJob>,
    /// Messages with a lower seq were stored before this process started: they may have been sent.
    restart_seq: u64,
    /// What was counted.
    pub counters: SessionCounters,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("subscriptions", &self.subscriptions)
            .finish_non_exhaustive()
    }
}

/// How the front serves one connection's session.
pub struct Attachment {
    /// CONNACK's session-present flag for a connection the front serves.
    pub session_present: bool,
    /// `Some` when the connection is persistent and the front serves its session.
    pub link: Option<SessionLink>,
}

/// Which connection holds a session: what SUBSCRIBE, UNSUBSCRIBE and the end of the connection name.
#[derive(Debug, Clone)]
pub struct LinkId {
    client: Arc<str>,
    generation: u64,
    version: ProtocolVersion,
}

impl LinkId {
    /// The client id.
    #[must_use]
    pub fn client(&self) -> &Arc<str> {
        &self.client
    }
}

/// One online persistent connection's hold on its session, for [`run_outbox`].
pub struct SessionLink {
    /// The connection.
    pub id: LinkId,
    wake: Arc<Notify>,
    live: mpsc::Receiver<Bytes>,
}

/// A client's acknowledgement of a delivery, for the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAck {
    /// PUBACK (QoS 1 done).
    Puback(u16),
    /// PUBREC (QoS 2 received; PUBREL follows).
    Pubrec(u16),
    /// PUBCOMP (QoS 2 done).
    Pubcomp(u16),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The packet id of the stored message `seq`: stable across restarts (see the module docs).
#[must_use]
pub fn packet_id_of(seq: u64) -> u16 {
    // In 1..=65535; the cast cannot truncate after the modulo.
    #[allow(clippy::cast_possible_truncation)]
    let id = (seq % 65_535) as u16 + 1;
    id
}

impl Sessions {
    /// Loads every stored session and starts the writer thread. Sessions online when the agent stopped
    /// count as offline from now.
    ///
    /// # Errors
    /// As the store's reads.
    pub fn open(
        store: Arc<SessionStore>,
        retained: Option<RetainedLookup>,
    ) -> Result<Arc<Self>, QueueError> {
        let mut inner = Inner::default();
        let now = now_ms();
        let mut count = 0;
        for (client, mut record) in store.sessions()? {
            if record.offline_since_ms == 0 {
                record.offline_since_ms = now;
            }
            let subscriptions = parse_subscriptions(&record);
            count += subscriptions.len();
            inner.sessions.insert(
                Arc::from(client.as_str()),
                Entry {
                    record,
                    subscriptions,
                    online: None,
                },
            );
        }
        let (queued, bytes) = store.totals();
        info!(
            sessions = inner.sessions.len(),
            subscriptions = count,
            queued,
            bytes,
            "persistent sessions loaded"
        );
        let restart_seq = store.next_seq();
        let (writer, jobs) = std::sync::mpsc::channel();
        let sessions = Arc::new(Self {
            store,
            retained,
            inner: Mutex::new(inner),
            subscriptions: AtomicUsize::new(count),
            writer,
            restart_seq,
            counters: SessionCounters::default(),
        });
        let weak = Arc::downgrade(&sessions);
        // Ends when the last `Sessions` is dropped (its sender closes the channel).
        std::thread::spawn(move || write_loop(&weak, &jobs));
        Ok(sessions)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether any persistent subscription exists (else [`Sessions::route`] has nothing to do).
    #[must_use]
    pub fn active(&self) -> bool {
        self.subscriptions.load(Ordering::Relaxed) > 0
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &Arc<SessionStore> {
        &self.store
    }

    /// Stored sessions and how many are online.
    #[must_use]
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        let online = inner
            .sessions
            .values()
            .filter(|e| e.online.is_some())
            .count();
        (inner.sessions.len(), online)
    }

    /// Takes a connection's CONNECT into account (blocking: may write the store). `client_id` empty means
    /// the broker assigns one, which cannot name a stored session: such a connection is left to the broker.
    ///
    /// # Errors
    /// As the store's writes; the connection should then be refused.
    pub fn attach(
        &self,
        client_id: &str,
        version: ProtocolVersion,
        clean_start: bool,
        expiry_secs: u32,
    ) -> Result<Attachment, QueueError> {
        let expiry = match version {
            ProtocolVersion::V5 => expiry_secs,
            _ if clean_start => 0,
            _ => NEVER,
        };
        let none = Attachment {
            session_present: false,
            link: None,
        };
        if client_id.is_empty() {
            return Ok(none);
        }
        let mut inner = self.lock();
        let existed = inner.sessions.contains_key(client_id);
        if clean_start && existed {
            let entry = inner
                .sessions
                .remove(client_id)
                .expect("invariant: checked above");
            self.subscriptions
                .fetch_sub(entry.subscriptions.len(), Ordering::Relaxed);
            let discarded = self.store.remove(client_id)?;
            inner.sent_up_to.remove(client_id);
            info!(
                client_id,
                discarded, "clean start: stored session discarded"
            );
        }
        let resumes = existed && !clean_start;
        if expiry == 0 && !resumes {
            return Ok(none);
        }
        let generation = inner.next_generation;
        inner.next_generation += 1;
        let wake = Arc::new(Notify::new());
        let (live_tx, live_rx) = mpsc::channel(LIVE_BUFFER);
        let client: Arc<str> = Arc::from(client_id);
        let record = SessionRecord {
            protocol_level: version.level(),
            expiry_secs: expiry,
            offline_since_ms: 0,
            subscriptions: Vec::new(),
        };
        let entry = inner
            .sessions
            .entry(Arc::clone(&client))
            .or_insert_with(|| Entry {
                record,
                subscriptions: Vec::new(),
                online: None,
            });
        entry.record.protocol_level = version.level();
        entry.record.expiry_secs = expiry;
        entry.record.offline_since_ms = 0;
        entry.online = Some(Online {
            generation,
            wake: Arc::clone(&wake),
            live: live_tx,
        });
        let record = entry.record.clone();
        // No fsync: a session without subscriptions lost in a crash loses nothing.
        self.store.put(client_id, &record, false)?;
        debug!(client_id, resumes, expiry, "persistent session attached");
        Ok(Attachment {
            session_present: resumes,
            link: Some(SessionLink {
                id: LinkId {
                    client,
                    generation,
                    version,
                },
                wake,
                live: live_rx,
            }),
        })
    }

    /// The connection of `link` ended (blocking: writes the store). A session with expiry 0 ends with it.
    pub fn detach(&self, link: &LinkId) {
        let mut inner = self.lock();
        let Some(entry) = inner.sessions.get_mut(&link.client) else {
            return;
        };
        if entry
            .online
            .as_ref()
            .is_none_or(|o| o.generation != link.generation)
        {
            // A newer connection of the same client took the session over.
            return;
        }
        entry.online = None;
        entry.record.offline_since_ms = now_ms();
        let record = entry.record.clone();
        let result = if record.expiry_secs == 0 {
            let entry = inner
                .sessions
                .remove(&link.client)
                .expect("invariant: found above");
            self.subscriptions
                .fetch_sub(entry.subscriptions.len(), Ordering::Relaxed);
            inner.sent_up_to.remove(&link.client);
            self.store.remove(&link.client).map(drop)
        } else {
            self.store.put(&link.client, &record, false)
        };
        if let Err(cause) = result {
            warn!(client_id = %link.client, %cause, "persistent session: cannot record the disconnect");
        }
    }

    /// Removes offline sessions whose expiry interval ran out (blocking); returns how many.
    pub fn expire(&self) -> usize {
        let now = now_ms();
        let mut inner = self.lock();
        let expired: Vec<Arc<str>> = inner
            .sessions
            .iter()
            .filter(|(_, e)| {
                e.online.is_none()
                    && e.record.expiry_secs != NEVER
                    && e.record.offline_since_ms
                        + u64::from(e.record.expiry_secs).saturating_mul(1000)
                        <= now
            })
            .map(|(c, _)| Arc::clone(c))
            .collect();
        for client in &expired {
            if let Some(entry) = inner.sessions.remove(client) {
                self.subscriptions
                    .fetch_sub(entry.subscriptions.len(), Ordering::Relaxed);
            }
            inner.sent_up_to.remove(client);
            match self.store.remove(client) {
                Ok(discarded) => {
                    self.counters.expired.fetch_add(1, Ordering::Relaxed);
                    info!(client_id = %client, discarded, "persistent session expired");
                }
                Err(cause) => {
                    warn!(client_id = %client, %cause, "cannot remove an expired session")
                }
            }
        }
        expired.len()
    }

    /// Applies a SUBSCRIBE of the connection `link` (blocking: commits the subscriptions durably before
    /// returning, so a SUBACK sent afterwards is true after a crash). Returns the SUBACK codes and the
    /// retained messages to deliver for it, to hand to [`Sessions::submit`] once the SUBACK is on its way.
    ///
    /// # Errors
    /// As the store's writes; nothing changed then.
    pub fn subscribe(
        &self,
        link: &LinkId,
        requested: &[(String, u8)],
    ) -> Result<(Vec<u8>, Deliveries), QueueError> {
        let mut codes = Vec::with_capacity(requested.len());
        let mut accepted = Vec::new();
        for (filter, byte) in requested {
            let options = SubscriptionOptions::from_byte(*byte);
            match (TopicFilter::parse(filter), options) {
                (Ok(parsed), Some(options)) if !filter.starts_with("$share/") => {
                    codes.push(options.qos as u8);
                    accepted.push((filter.clone(), parsed, options));
                }
                _ => codes.push(match link.version {
                    ProtocolVersion::V5 => SUBACK_SHARED_NOT_SUPPORTED_V5,
                    _ => SUBACK_FAILURE_V3,
                }),
            }
        }
        let mut inner = self.lock();
        let Some(entry) = inner.sessions.get_mut(&link.client) else {
            return Ok((codes, Vec::new()));
        };
        let mut record = entry.record.clone();
        let mut subscriptions = entry.subscriptions.clone();
        let mut retained_for = Vec::new();
        for (text, filter, options) in accepted {
            let existed = record.subscriptions.iter().position(|(f, _)| *f == text);
            match existed {
                Some(at) => {
                    record.subscriptions[at].1 = options.to_byte();
                    subscriptions[at].options = options;
                }
                None => {
                    record.subscriptions.push((text, options.to_byte()));
                    subscriptions.push(Subscription {
                        filter: filter.clone(),
                        options,
                    });
                }
            }
            let send_retained = match options.retain_handling {
                0 => true,
                1 => existed.is_none(),
                _ => false,
            };
            if send_retained {
                retained_for.push((filter, options));
            }
        }
        self.store.put(&link.client, &record, true)?;
        let added = subscriptions
            .len()
            .saturating_sub(entry.subscriptions.len());
        entry.record = record;
        entry.subscriptions = subscriptions;
        self.subscriptions.fetch_add(added, Ordering::Relaxed);
        let level = entry.record.protocol_level;
        drop(inner);
        let mut retained = Vec::new();
        if let Some(lookup) = &self.retained {
            for (filter, options) in retained_for {
                for mut publish in lookup(&filter) {
                    publish.qos = publish.qos.min(options.qos);
                    publish.retain = true;
                    if let Some(packet) = delivery_packet(&publish, level) {
                        retained.push((Arc::clone(&link.client), publish.qos as u8, packet));
                    }
                }
            }
        }
        Ok((codes, retained))
    }

    /// Applies an UNSUBSCRIBE of `link` (blocking, durable); returns the UNSUBACK reason codes.
    ///
    /// # Errors
    /// As the store's writes; nothing changed then.
    pub fn unsubscribe(&self, link: &LinkId, filters: &[String]) -> Result<Vec<u8>, QueueError> {
        let mut inner = self.lock();
        let Some(entry) = inner.sessions.get_mut(&link.client) else {
            return Ok(vec![UNSUBACK_NO_SUBSCRIPTION; filters.len()]);
        };
        let mut record = entry.record.clone();
        let mut subscriptions = entry.subscriptions.clone();
        let mut codes = Vec::with_capacity(filters.len());
        for filter in filters {
            match record.subscriptions.iter().position(|(f, _)| f == filter) {
                Some(at) => {
                    record.subscriptions.remove(at);
                    subscriptions.remove(at);
                    codes.push(0);
                }
                None => codes.push(UNSUBACK_NO_SUBSCRIPTION),
            }
        }
        self.store.put(&link.client, &record, true)?;
        let removed = entry.subscriptions.len() - subscriptions.len();
        entry.record = record;
        entry.subscriptions = subscriptions;
        self.subscriptions.fetch_sub(removed, Ordering::Relaxed);
        Ok(codes)
    }

    /// Matches messages against every persistent subscription. QoS 0 deliveries go to online sessions at
    /// once; QoS 1/2 ones are queued for the writer. Returns the indexes of the messages that were queued
    /// for some session, and the receiver of the commit's outcome (`None` if nothing was queued).
    #[must_use]
    pub fn route(
        &self,
        messages: &[(&Publish, &str)],
    ) -> (
        Vec<usize>,
        Option<oneshot::Receiver<Result<(), CommitRejected>>>,
    ) {
        if self.subscriptions.load(Ordering::Relaxed) == 0 {
            return (Vec::new(), None);
        }
        let mut items = Vec::new();
        let mut stored = Vec::new();
        {
            let inner = self.lock();
            for (index, (publish, publisher)) in messages.iter().enumerate() {
                let mut any = false;
                for (client, entry) in &inner.sessions {
                    let Some(delivery) =
                        deliver_as(publish, publisher, client, &entry.subscriptions)
                    else {
                        continue;
                    };
                    let Some(packet) = delivery_packet(&delivery, entry.record.protocol_level)
                    else {
                        continue;
                    };
                    if delivery.qos == QoS::AtMostOnce {
                        if let Some(online) = &entry.online {
                            if online.live.try_send(packet).is_err() {
                                self.counters.dropped_slow.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        continue;
                    }
                    any = true;
                    items.push((Arc::clone(client), delivery.qos as u8, packet));
                }
                if any {
                    stored.push(index);
                }
            }
        }
        if items.is_empty() {
            return (stored, None);
        }
        let (done, answer) = oneshot::channel();
        self.submit_with(items, Some(done));
        (stored, Some(answer))
    }

    /// Queues deliveries (from [`Sessions::subscribe`]) without waiting for their commit.
    pub fn submit(&self, items: Deliveries) {
        if !items.is_empty() {
            self.submit_with(items, None);
        }
    }

    fn submit_with(
        &self,
        items: Deliveries,
        done: Option<oneshot::Sender<Result<(), CommitRejected>>>,
    ) {
        if let Err(std::sync::mpsc::SendError(job)) = self.writer.send(WriteJob { items, done }) {
            if let Some(done) = job.done {
                let _ = done.send(Err(CommitRejected::StorageFailed));
            }
        }
    }

    /// Whether `seq` may have been sent to `client` before (so a send of it is a redelivery, with DUP).
    fn possibly_sent(&self, client: &Arc<str>, seq: u64) -> bool {
        seq < self.restart_seq
            || self
                .lock()
                .sent_up_to
                .get(client)
                .is_some_and(|&s| seq <= s)
    }

    fn mark_sent(&self, client: &Arc<str>, seq: u64) {
        let mut inner = self.lock();
        let slot = inner.sent_up_to.entry(Arc::clone(client)).or_insert(0);
        *slot = (*slot).max(seq);
    }
}

fn parse_subscriptions(record: &SessionRecord) -> Vec<Subscription> {
    record
        .subscriptions
        .iter()
        .filter_map(|(filter, byte)| {
            Some(Subscription {
                filter: TopicFilter::parse(filter).ok()?,
                options: SubscriptionOptions::from_byte(*byte)?,
            })
        })
        .collect()
}

/// How `publish` (sent by `publisher`) reaches `client` with these subscriptions, if at all: one copy
/// with the highest QoS any matching subscription grants (MQTT 3.1.1 §3.3.5, 5.0 §3.3.4).
fn deliver_as(
    publish: &Publish,
    publisher: &str,
    client: &str,
    subscriptions: &[Subscription],
) -> Option<Publish> {
    let mut granted: Option<QoS> = None;
    let mut keep_retain = false;
    for sub in subscriptions {
        if sub.options.no_local && publisher == client {
            continue;
        }
        if !sub.filter.matches_str(&publish.topic) {
            continue;
        }
        granted = Some(granted.map_or(sub.options.qos, |g| g.max(sub.options.qos)));
        keep_retain |= sub.options.retain_as_published;
    }
    let qos = publish.qos.min(granted?);
    let mut delivery = publish.clone();
    delivery.qos = qos;
    delivery.dup = false;
    delivery.retain = keep_retain && publish.retain;
    delivery.properties.topic_alias = None;
    delivery.properties.subscription_identifiers.clear();
    Some(delivery)
}

/// `publish` encoded for a session of protocol `level`, with a placeholder packet id for QoS 1/2.
fn delivery_packet(publish: &Publish, level: u8) -> Option<Bytes> {
    let version = ProtocolVersion::from_level(level)?;
    let mut publish = publish.clone();
    publish.packet_id = (publish.qos != QoS::AtMostOnce).then_some(1);
    let mut out = BytesMut::new();
    match mqtt::encode_publish(&publish, version, &mut out) {
        Ok(()) => Some(out.freeze()),
        Err(cause) => {
            warn!(topic = %publish.topic, %cause, "cannot encode a delivery for a persistent session; skipped");
            None
        }
    }
}

fn write_loop(sessions: &std::sync::Weak<Sessions>, jobs: &std::sync::mpsc::Receiver<WriteJob>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Some(sessions) = sessions.upgrade() else {
            return;
        };
        let items: Vec<(&str, u8, Bytes)> = batch
            .iter()
            .flat_map(|job| job.items.iter())
            .map(|(client, qos, packet)| (&**client, *qos, packet.clone()))
            .collect();
        // The store keeps (client, protocol level, packet); the level is that of the session now.
        let levels: Vec<(&str, u8, Bytes)> = {
            let inner = sessions.lock();
            items
                .into_iter()
                .map(|(client, _, packet)| {
                    let level = inner
                        .sessions
                        .get(client)
                        .map_or(ProtocolVersion::V3_1_1.level(), |e| e.record.protocol_level);
                    (client, level, packet)
                })
                .collect()
        };
        let outcome = match sessions.store.enqueue(&levels) {
            Ok((enqueued, _)) => {
                sessions
                    .counters
                    .queued
                    .fetch_add(enqueued.stored, Ordering::Relaxed);
                for (client, count) in &enqueued.dropped {
                    let total = sessions
                        .counters
                        .dropped_full
                        .fetch_add(*count, Ordering::Relaxed)
                        + count;
                    let (messages, bytes) = sessions.store.depth(client);
                    warn!(
                        client_id = %client,
                        dropped = count,
                        dropped_total = total,
                        queued = messages,
                        queued_bytes = bytes,
                        "persistent session full (broker.max_queued_messages / max_queued_bytes): messages for it dropped"
                    );
                }
                let inner = sessions.lock();
                for (client, _, _) in &levels {
                    if let Some(online) =
                        inner.sessions.get(*client).and_then(|e| e.online.as_ref())
                    {
                        online.wake.notify_one();
                    }
                }
                Ok(())
            }
            Err(cause) => {
                error!(%cause, "persistent sessions: cannot store deliveries; publishers get no ack");
                Err(match cause {
                    QueueError::DiskFull { .. } => CommitRejected::StorageFull,
                    _ => CommitRejected::StorageFailed,
                })
            }
        };
        for job in batch {
            if let Some(done) = job.done {
                let _ = done.send(outcome);
            }
        }
    }
}

/// Delivers `link`'s queued messages to its connection through `out`, and applies the client's
/// acknowledgements from `acks`, until either channel closes. See the module docs.
///
/// Once `stop` is cancelled (the connection ended), the acknowledgements the client sent before it went
/// are still applied: a client that acknowledged and then disconnected must not get the message again.
pub async fn run_outbox(
    sessions: Arc<Sessions>,
    link: SessionLink,
    mut acks: mpsc::UnboundedReceiver<ClientAck>,
    out: mpsc::Sender<Bytes>,
    stop: tokio_util::sync::CancellationToken,
) {
    let client = Arc::clone(&link.id.client);
    tokio::select! {
        () = deliver(&sessions, link, &mut acks, out) => {}
        () = stop.cancelled() => {}
    }
    let mut done = Vec::new();
    while let Ok(ack) = acks.try_recv() {
        if let ClientAck::Puback(id) | ClientAck::Pubcomp(id) = ack {
            done.push(id);
        }
    }
    if done.is_empty() {
        return;
    }
    // The in-flight map went with `deliver`; the packet ids name the queued messages again.
    let store = Arc::clone(&sessions.store);
    let c = Arc::clone(&client);
    let applied = tokio::task::spawn_blocking(move || {
        let pending = store.pending(&c, 0, usize::MAX)?;
        let seqs: Vec<u64> = pending
            .iter()
            .filter(|d| done.contains(&packet_id_of(d.seq)))
            .map(|d| d.seq)
            .collect();
        store.acknowledge(&c, &seqs).map(|()| seqs.len())
    })
    .await;
    if let Ok(Ok(n)) = applied {
        sessions
            .counters
            .acknowledged
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn deliver(
    sessions: &Arc<Sessions>,
    link: SessionLink,
    acks: &mut mpsc::UnboundedReceiver<ClientAck>,
    out: mpsc::Sender<Bytes>,
) {
    let SessionLink {
        id: link,
        wake,
        mut live,
    } = link;
    // Packet id -> (seq, QoS 2 released).
    let mut inflight: BTreeMap<u16, (u64, bool)> = BTreeMap::new();
    let mut loaded_up_to = 0u64;
    let client = Arc::clone(&link.client);
    loop {
        if inflight.len() < INFLIGHT {
            let store = Arc::clone(&sessions.store);
            let c = Arc::clone(&client);
            let room = INFLIGHT - inflight.len();
            let pending =
                tokio::task::spawn_blocking(move || store.pending(&c, loaded_up_to, room)).await;
            let pending = match pending {
                Ok(Ok(pending)) => pending,
                Ok(Err(cause)) => {
                    error!(client_id = %client, %cause, "persistent session: cannot read queued messages");
                    return;
                }
                Err(_) => return,
            };
            for delivery in pending {
                let id = packet_id_of(delivery.seq);
                if inflight.contains_key(&id) {
                    // An older message still holds this id (65,535 messages apart): wait for its ack.
                    break;
                }
                loaded_up_to = delivery.seq;
                let frame = if delivery.released {
                    let mut f = BytesMut::with_capacity(4);
                    mqtt::encode_pubrel(id, &mut f);
                    f.freeze()
                } else {
                    let dup = sessions.possibly_sent(&client, delivery.seq);
                    let Some(frame) = outgoing(
                        &delivery.packet,
                        delivery.protocol_level,
                        link.version,
                        id,
                        dup,
                    ) else {
                        warn!(client_id = %client, seq = delivery.seq, "unreadable queued delivery; discarded");
                        let store = Arc::clone(&sessions.store);
                        let c = Arc::clone(&client);
                        let seq = delivery.seq;
                        let _ = tokio::task::spawn_blocking(move || store.acknowledge(&c, &[seq]))
                            .await;
                        continue;
                    };
                    frame
                };
                sessions.mark_sent(&client, delivery.seq);
                inflight.insert(id, (delivery.seq, delivery.released));
                if out.send(frame).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            () = wake.notified() => {}
            packet = live.recv() => match packet {
                Some(packet) => {
                    if out.send(packet).await.is_err() {
                        return;
                    }
                }
                None => return,
            },
            ack = acks.recv() => {
                let Some(ack) = ack else { return };
                let mut done = Vec::new();
                let mut received = Vec::new();
                let mut next = Some(ack);
                while let Some(ack) = next {
                    match ack {
                        ClientAck::Puback(id) | ClientAck::Pubcomp(id) => {
                            if let Some((seq, _)) = inflight.remove(&id) {
                                done.push(seq);
                            }
                        }
                        ClientAck::Pubrec(id) => {
                            if let Some((seq, released)) = inflight.get_mut(&id) {
                                if !*released {
                                    *released = true;
                                    received.push((id, *seq));
                                }
                            }
                        }
                    }
                    next = acks.try_recv().ok();
                }
                if !received.is_empty() {
                    // Durable before any PUBREL goes out (see `SessionStore::release`).
                    let seqs: Vec<u64> = received.iter().map(|(_, seq)| *seq).collect();
                    let (store, c) = (Arc::clone(&sessions.store), Arc::clone(&client));
                    match tokio::task::spawn_blocking(move || store.release(&c, &seqs)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(cause)) => {
                            error!(client_id = %client, %cause, "cannot record PUBREC; ending delivery");
                            return;
                        }
                        Err(_) => return,
                    }
                    for (id, _) in received {
                        let mut f = BytesMut::with_capacity(4);
                        mqtt::encode_pubrel(id, &mut f);
                        if out.send(f.freeze()).await.is_err() {
                            return;
                        }
                    }
                }
                if !done.is_empty() {
                    sessions.counters.acknowledged.fetch_add(done.len() as u64, Ordering::Relaxed);
                    let (store, c) = (Arc::clone(&sessions.store), Arc::clone(&client));
                    if let Ok(Err(cause)) = tokio::task::spawn_blocking(move || store.acknowledge(&c, &done)).await {
                        warn!(client_id = %client, %cause, "cannot remove acknowledged deliveries");
                    }
                }
            }
        }
    }
}

/// A stored delivery as sent: re-encoded if the client now speaks another protocol level, with its
/// packet id and DUP flag set.
fn outgoing(
    packet: &Bytes,
    level: u8,
    version: ProtocolVersion,
    id: u16,
    dup: bool,
) -> Option<Bytes> {
    let mut frame = if level == version.level() {
        BytesMut::from(&packet[..])
    } else {
        let from = ProtocolVersion::from_level(level)?;
        let publish = Publish::decode(packet, from).ok()?;
        let mut out = BytesMut::new();
        mqtt::encode_publish(&publish, version, &mut out).ok()?;
        out
    };
    mqtt::set_publish_packet_id(&mut frame, id, dup).then(|| frame.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, qos: QoS, retain: bool) -> Publish {
        Publish {
            dup: false,
            qos,
            retain,
            topic: topic.to_owned(),
            packet_id: (qos != QoS::AtMostOnce).then_some(7),
            properties: mqtt::PublishProperties::default(),
            payload: Bytes::from_static(b"x"),
        }
    }

    fn sub(filter: &str, byte: u8) -> Subscription {
        Subscription {
            filter: TopicFilter::parse(filter).expect("filter"),
            options: SubscriptionOptions::from_byte(byte).expect("options"),
        }
    }

    #[test]
    fn one_copy_at_the_highest_granted_qos_capped_by_the_message() {
        let subs = [sub("a/#", 0), sub("a/+", 1)];
        let d =
            deliver_as(&publish("a/b", QoS::ExactlyOnce, false), "p", "c", &subs).expect("match");
        assert_eq!(d.qos, QoS::AtLeastOnce);
        let d =
            deliver_as(&publish("a/b", QoS::AtMostOnce, false), "p", "c", &subs).expect("match");
        assert_eq!(d.qos, QoS::AtMostOnce);
        assert!(deliver_as(&publish("b", QoS::AtLeastOnce, false), "p", "c", &subs).is_none());
    }

    #[test]
    fn no_local_and_retain_as_published() {
        let no_local = [sub("t", 0b0101)];
        assert!(deliver_as(&publish("t", QoS::AtLeastOnce, false), "c", "c", &no_local).is_none());
        assert!(deliver_as(&publish("t", QoS::AtLeastOnce, false), "p", "c", &no_local).is_some());
        let rap = [sub("t", 0b1001)];
        assert!(
            deliver_as(&publish("t", QoS::AtLeastOnce, true), "p", "c", &rap)
                .expect("m")
                .retain
        );
        let plain = [sub("t", 1)];
        assert!(
            !deliver_as(&publish("t", QoS::AtLeastOnce, true), "p", "c", &plain)
                .expect("m")
                .retain
        );
    }

    #[test]
    fn packet_ids_are_stable_nonzero_and_cycle() {
        assert_eq!(packet_id_of(0), 1);
        assert_eq!(packet_id_of(65_534), 65_535);
        assert_eq!(packet_id_of(65_535), 1);
        let stored = delivery_packet(&publish("t/x", QoS::AtLeastOnce, false), 4).expect("encode");
        let sent = outgoing(&stored, 4, ProtocolVersion::V5, 300, true).expect("re-encode");
        let back = Publish::decode(&sent, ProtocolVersion::V5).expect("decode");
        assert_eq!(
            (back.packet_id, back.dup, back.topic.as_str()),
            (Some(300), true, "t/x")
        );
    }
}
