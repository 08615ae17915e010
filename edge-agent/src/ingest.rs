//! The commit path: local messages → envelopes → one durable queue append per group → acknowledgements.
//!
//! Both local broker modes feed it. Messages that arrive while a commit runs are grouped into the next one
//! (group commit across clients), because a redb commit costs about the same for one message as for a
//! thousand (measured on this project's machine with redb 4.5: 1.6k commits/s one message each, 262k msg/s
//! at 1,000 per commit). Only after the append returned
//! are the messages acknowledged upstream (the front releases PUBACKs, the external client sends them), and
//! the uplink is woken.
//!
//! The queue is synchronous (a log `pwrite` + `fdatasync`, redb behind it). The embedded mode commits on the
//! async worker itself, in a task that blocks it for the commit ([`Ingest::run_front_commits`] says why);
//! the external mode on the blocking pool.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use meshbridge_broker::front::{CommitRejected, CommitRequest};
use shared::envelope::{Envelope, Properties, QoS, TraceContext};
use shared::link::lane::MAX_LANE;
use shared::queue::{
    AppendOutcome, Mark, Queue, QueueError, RedbQueue, RetainedChange, RetainedStore,
};
use shared::wire::EncodeError;
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use crate::routes::{LiveRoutes, Rule};

/// Most messages one group commit takes before it is written, so one commit stays short and a queue
/// limit far above it is never hit by the group alone.
pub(crate) const MAX_GROUP_MESSAGES: usize = 8192;
/// Most body bytes one group commit takes.
pub(crate) const MAX_GROUP_BYTES: usize = 8 << 20;

/// Current unix time in milliseconds: the only clock read on the commit path (`shared` takes time as a
/// parameter).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why a group commit did not happen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    /// The queue refused or failed the append.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The blocking append task panicked.
    #[error("the queue append task panicked")]
    Panicked(#[source] tokio::task::JoinError),
    /// A priority lane's queue could not be opened.
    #[error("cannot open the queue of priority lane {lane}")]
    Lane {
        /// The lane.
        lane: u8,
        /// Why.
        #[source]
        source: Box<crate::error::AgentError>,
    },
}

impl CommitError {
    /// The answer the front gives the publishers of the group.
    pub(crate) const fn rejection(&self) -> CommitRejected {
        match self {
            Self::Queue(QueueError::Full { .. } | QueueError::BatchTooLarge { .. }) => {
                CommitRejected::QueueFull
            }
            Self::Queue(QueueError::DiskFull { .. }) => CommitRejected::StorageFull,
            Self::Queue(_) | Self::Panicked(_) | Self::Lane { .. } => CommitRejected::StorageFailed,
        }
    }

    /// Whether retrying later can help (the uplink drains the queue, an operator frees disk space).
    pub(crate) const fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Queue(QueueError::Full { .. } | QueueError::DiskFull { .. })
        )
    }
}

/// What both local broker modes share to commit messages.
#[derive(Debug, Clone)]
pub(crate) struct Ingest {
    /// The durable queues, one per priority lane (see [`crate::lanes`]).
    pub(crate) lanes: Arc<crate::lanes::Lanes>,
    /// Which topics go up, and with which QoS/retain rule.
    pub(crate) routes: Arc<LiveRoutes>,
    /// Where the uplink publishes downlink messages; the local side fills it in once it is up.
    pub(crate) downlink_target:
        Arc<tokio::sync::watch::Sender<Option<crate::local::deliver::Target>>>,
    /// Site name, written as every envelope's origin.
    pub(crate) site: Arc<str>,
    /// What the path to the hub carries; messages beyond it are refused before they are committed.
    pub(crate) limits: Arc<shared::limits::SharedLimits>,
    /// Most payload bytes one commit group may hold: [`MAX_GROUP_BYTES`], or a quarter of the queue's
    /// `max_bytes` when that is less. A group larger than the whole queue could never be appended
    /// (`BatchTooLarge`), and the external mode would retry it forever; a quarter leaves room for groups
    /// to go in while the uplink drains.
    pub(crate) max_group_bytes: usize,
    /// The embedded broker's retained messages on disk (see `shared::queue::RetainedStore`); `None` in
    /// external mode, where the site's broker keeps its own.
    pub(crate) retained: Option<Arc<RetainedStore>>,
    /// Retained messages refused because the store was at its bounds.
    pub(crate) retained_refused: Arc<std::sync::atomic::AtomicU64>,
    /// The embedded broker's persistent sessions, served by the front; `None` in external mode.
    pub(crate) sessions: Option<Arc<meshbridge_broker::sessions::Sessions>>,
    /// Where the embedded broker counts refused logins and ACL denials (the metrics read them).
    pub(crate) auth_counters: Arc<meshbridge_broker::auth::AuthCounters>,
}

impl Ingest {
    /// Appends the group's bodies, one queue batch per priority lane, highest lane first, then wakes each
    /// lane's uplink. A lane's part is emptied once it is committed; on failure the parts not committed
    /// stay in the group (a retry does not commit the others twice). Runs the commit on the blocking pool
    /// (the external mode's path; the embedded mode commits on the worker, [`Self::run_front_commits`]).
    pub(crate) async fn commit(&self, group: &mut Group) -> Result<(), CommitError> {
        let lanes = self.lanes_of(group).await?;
        let this = self.clone();
        let mut owned = std::mem::replace(group, Group::unallocated(&self.site));
        let (result, owned) = tokio::task::spawn_blocking(move || {
            let result = this.commit_blocking(&mut owned, &lanes);
            (result, owned)
        })
        .await
        .map_err(CommitError::Panicked)?;
        *group = owned;
        result
    }

    /// The queue of every lane `group` holds messages for, opened if this is the lane's first message
    /// (opening is async and may wait for the blocking pool, which a commit on the worker cannot do).
    async fn lanes_of(&self, group: &Group) -> Result<GroupLanes, CommitError> {
        let mut lanes = GroupLanes::default();
        for l in 0..=MAX_LANE {
            if group.lanes[usize::from(l)].ends.is_empty() {
                continue;
            }
            let lane = self
                .lanes
                .ensure(l)
                .await
                .map_err(|source| CommitError::Lane {
                    lane: l,
                    source: Box::new(source),
                })?;
            lanes[usize::from(l)] = Some(lane);
        }
        Ok(lanes)
    }

    /// [`Self::commit`] on the calling thread, which blocks for the commit. `lanes` comes from
    /// [`Self::lanes_of`] for this group: a part whose lane it does not hold stays in the group.
    pub(crate) fn commit_blocking(
        &self,
        group: &mut Group,
        lanes: &GroupLanes,
    ) -> Result<(), CommitError> {
        let commit_start = std::time::SystemTime::now();
        if let (false, Some(store)) = (group.retained.is_empty(), &self.retained) {
            store.apply(&group.retained)?;
            debug!(changes = group.retained.len(), "retained messages stored");
            group.retained.clear();
        }
        for l in (0..=MAX_LANE).rev() {
            let part = &mut group.lanes[usize::from(l)];
            let (false, Some(lane)) = (part.ends.is_empty(), &lanes[usize::from(l)]) else {
                continue;
            };
            let outcome = commit_part(&lane.queue, part)?;
            crate::events::Committed {
                lane: l,
                first_seq: outcome.first_seq,
                last_seq: outcome.last_seq,
                dropped: outcome.dropped,
            }
            .emit(&lane.counters);
            lane.appended.notify_one();
            for r in group.traced.iter_mut().filter(|r| r.lane == l) {
                r.seq.get_or_insert(outcome.first_seq + r.index);
            }
        }
        if let (false, Some(traces)) = (group.traced.is_empty(), meshbridge_metrics::otel::traces())
        {
            let received = std::mem::take(&mut group.traced);
            crate::traced::committed(traces, &self.site, received, commit_start);
        }
        Ok(())
    }
}

/// The lanes of one group commit, indexed by lane (see [`Ingest::lanes_of`]).
pub(crate) type GroupLanes = [Option<Arc<crate::lanes::Lane>>; MAX_LANE as usize + 1];

/// Appends one lane's part of a group as one queue batch, on the calling thread. The part is emptied on
/// success and kept as it was on failure.
fn commit_part(queue: &RedbQueue, group: &mut LaneGroup) -> Result<AppendOutcome, CommitError> {
    let mut slices: Vec<&[u8]> = Vec::with_capacity(group.ends.len());
    let mut start = 0;
    for &end in &group.ends {
        slices.push(&group.buf[start..end]);
        start = end;
    }
    let outcome = if group.marks.is_empty() {
        queue.append(&slices, now_ms())
    } else {
        let refs: Vec<Mark<'_>> = group
            .marks
            .iter()
            .map(|(key, digest)| Mark {
                key,
                digest: *digest,
            })
            .collect();
        queue.append_marked(&slices, &refs, now_ms())
    }?;
    drop(slices);
    group.buf.clear();
    group.ends.clear();
    group.marks.clear();
    Ok(outcome)
}

impl Ingest {
    /// The embedded mode's commit loop: takes the front's [`CommitRequest`]s, groups whatever is waiting,
    /// commits, answers every request. Ends when every sender is gone (the front stopped), after the
    /// requests already taken are answered.
    ///
    /// It runs as a task on the agent's async worker and blocks that worker for each commit (the log's
    /// `pwrite` and `fdatasync`, `shared/src/queue/log.rs`), the way an event-loop broker writes to disk
    /// inside its loop. Why not a thread of its own, as before: at a factory line's rate every message is
    /// a group of its own, and the hand-off to a commit thread and its answer cost a wake-up each way (a
    /// futex wake, then an `eventfd` write and an `epoll_wait` return on the worker), about 50 µs of CPU
    /// per commit on this project's VM (`README.md`, Performance, eighth step). Grouping is
    /// kept: while a commit blocks the worker, the clients' bytes wait in their sockets; once it returns,
    /// the front's tasks read them and queue their requests, and the [`tokio::task::yield_now`] below lets
    /// every task that is ready run before the next group is taken. What it costs: the worker does nothing
    /// else during a commit, so the uplink sends and the front parses between commits rather than during
    /// them (measured: throughput held, see the README), and a disk that stalls stalls the agent's
    /// network side with it (nothing is lost: the hub sees a silent link, the publishers unanswered
    /// PUBLISHes). With `worker_threads` above 1 the other workers carry on meanwhile.
    pub(crate) async fn run_front_commits(self, mut requests: mpsc::Receiver<CommitRequest>) {
        let mut group = Group::new(&self.site);
        let mut waiting = Vec::new();
        while let Some(first) = requests.recv().await {
            waiting.push(first);
            tokio::task::yield_now().await;
            while group_has_room(&waiting, self.max_group_bytes) {
                match requests.try_recv() {
                    Ok(next) => waiting.push(next),
                    Err(_) => break,
                }
            }
            let mut answers = Vec::with_capacity(waiting.len());
            for request in waiting.drain(..) {
                let CommitRequest { mut messages, done } = request;
                if let Some(store) = &self.retained {
                    match retained_changes(store, &group.retained, &messages, &self.site) {
                        Ok(changes) => group.retained.extend(changes),
                        Err(topic) => {
                            let refused_total = self
                                .retained_refused
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                                + 1;
                            let (stored, bytes) = store.stats();
                            let limits = store.limits();
                            warn!(
                                %topic,
                                stored,
                                bytes,
                                max_messages = limits.max_messages,
                                max_bytes = limits.max_bytes,
                                refused_total,
                                "retained message refused: the retained store is full (the publisher's read is refused whole; MQTT 5 gets reason 0x97)"
                            );
                            let _ = done.send(Err(CommitRejected::QueueFull));
                            continue;
                        }
                    }
                }
                answers.push(done);
                for captured in messages.drain(..) {
                    let publish = captured.publish;
                    let Some(rule) = self.routes.decide(&publish.topic) else {
                        continue;
                    };
                    let mark = resend_key(&captured.client, &publish);
                    if let Some((key, digest)) = &mark {
                        if publish.dup && self.already_committed(&group, key, *digest) {
                            debug!(
                                packet_id = publish.packet_id,
                                "resend of a committed message: acknowledged, not queued again"
                            );
                            continue;
                        }
                    }
                    let qos = envelope_qos(publish.qos);
                    let p = publish.properties;
                    let properties = Properties {
                        user: p.user_properties,
                        content_type: p.content_type,
                        response_topic: p.response_topic,
                        correlation_data: p.correlation_data,
                        message_expiry: p.message_expiry_interval,
                        payload_format_utf8: p.payload_format_indicator == Some(1),
                    };
                    let pushed = group.push(
                        rule,
                        publish.topic,
                        publish.payload,
                        qos,
                        publish.retain,
                        properties,
                    );
                    if let (true, Some((key, digest))) = (pushed, mark) {
                        group.mark(key, digest);
                    }
                }
            }
            let answer = if group.is_empty() {
                Ok(())
            } else {
                match self.commit_front_group(&mut group).await {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        log_commit_error(&e);
                        group.clear();
                        Err(e.rejection())
                    }
                }
            };
            for done in answers {
                // A dropped receiver means the client's connection closed; nothing to tell it.
                let _ = done.send(answer);
            }
        }
    }

    /// Commits one group of the front's on the calling worker: [`Self::lanes_of`] (async), then the
    /// blocking commit (see [`Self::run_front_commits`]).
    async fn commit_front_group(&self, group: &mut Group) -> Result<(), CommitError> {
        let lanes = self.lanes_of(group).await?;
        self.commit_blocking(group, &lanes)
    }
}

/// The envelope's QoS of a PUBLISH's.
const fn envelope_qos(qos: shared::mqtt::QoS) -> QoS {
    match qos {
        shared::mqtt::QoS::AtMostOnce => QoS::AtMostOnce,
        shared::mqtt::QoS::AtLeastOnce => QoS::AtLeastOnce,
        shared::mqtt::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// The retained-store changes of one client read: a retained PUBLISH with a payload sets its topic, an
/// empty one clears it. `Err(topic)` if a new value would take the store past its bounds, counting the
/// changes already `pending` in the group.
fn retained_changes(
    store: &RetainedStore,
    pending: &[RetainedChange],
    messages: &[meshbridge_broker::front::Captured],
    site: &str,
) -> Result<Vec<RetainedChange>, String> {
    let mut changes: Vec<RetainedChange> = Vec::new();
    for captured in messages.iter().filter(|c| c.publish.retain) {
        let publish = &captured.publish;
        if publish.payload.is_empty() {
            changes.push(RetainedChange::Clear {
                topic: publish.topic.clone(),
            });
            continue;
        }
        let p = &publish.properties;
        let envelope = Envelope {
            origin: site.to_owned(),
            seq: 0,
            topic: publish.topic.clone(),
            payload: publish.payload.clone(),
            qos: envelope_qos(publish.qos),
            retain: true,
            properties: Properties {
                user: p.user_properties.clone(),
                content_type: p.content_type.clone(),
                response_topic: p.response_topic.clone(),
                correlation_data: p.correlation_data.clone(),
                message_expiry: p.message_expiry_interval,
                payload_format_utf8: p.payload_format_indicator == Some(1),
            },
            trace: None,
            enqueued_at_ms: now_ms(),
        };
        let mut body = BytesMut::with_capacity(envelope.encoded_body_len());
        if let Err(cause) = envelope.encode_body(&mut body) {
            warn!(topic = %publish.topic, %cause, "retained message cannot be encoded; not kept on disk");
            continue;
        }
        if !store.admits(&[pending, &changes], &publish.topic, body.len()) {
            return Err(publish.topic.clone());
        }
        changes.push(RetainedChange::Set {
            topic: publish.topic.clone(),
            body: body.freeze(),
        });
    }
    Ok(changes)
}

/// The group byte budget for a queue of `queue_max_bytes` (see [`Ingest::max_group_bytes`]).
pub(crate) fn group_budget(queue_max_bytes: u64) -> usize {
    usize::try_from(queue_max_bytes / 4)
        .unwrap_or(usize::MAX)
        .min(MAX_GROUP_BYTES)
}

/// The mark of a QoS 1/2 PUBLISH from a client with a stable id: (client id, packet id) as the key, and a
/// digest of what it carries, so a packet id reused for another message is not taken for a resend.
/// `None` for QoS 0 and for clients without an id (their sessions do not outlive a connection).
fn resend_key(client: &str, publish: &shared::mqtt::Publish) -> Option<(Vec<u8>, u64)> {
    use std::hash::{Hash, Hasher};
    let packet_id = publish.packet_id?;
    if client.is_empty() {
        return None;
    }
    let mut key = Vec::with_capacity(client.len() + 3);
    key.extend_from_slice(client.as_bytes());
    key.push(0);
    key.extend_from_slice(&packet_id.to_be_bytes());
    // SipHash with fixed keys: the same digest in every process, so marks hold across restarts.
    let mut h = std::hash::DefaultHasher::new();
    publish.topic.hash(&mut h);
    publish.payload.hash(&mut h);
    (publish.qos as u8).hash(&mut h);
    publish.retain.hash(&mut h);
    Some((key, h.finish()))
}

impl Ingest {
    /// Whether a resent message (DUP set) was committed before: in this group, or in the queue by its mark.
    /// A failed read counts as "not committed": queueing twice is the safe side.
    fn already_committed(&self, group: &Group, key: &[u8], digest: u64) -> bool {
        group.has_mark(key, digest)
            || self
                .lanes
                .all()
                .iter()
                .any(|l| matches!(l.queue.mark(key), Ok(Some(marked)) if marked == digest))
    }
}

fn group_has_room(waiting: &[CommitRequest], max_bytes: usize) -> bool {
    let (count, bytes) = waiting.iter().fold((0, 0), |(c, b), r| {
        (
            c + r.messages.len(),
            b + r
                .messages
                .iter()
                .map(|m| m.publish.payload.len())
                .sum::<usize>(),
        )
    });
    count < MAX_GROUP_MESSAGES && bytes < max_bytes
}

/// Logs a failed commit once, at the level that says whether an operator must act.
pub(crate) fn log_commit_error(error: &CommitError) {
    if error.is_transient() {
        warn!(cause = %error, "commit refused; publishers are pushed back until the queue drains");
    } else {
        error!(cause = %error, "commit failed");
    }
}

/// Envelope bodies encoded back to back for one group commit, per priority lane. One scratch envelope is
/// reused so that building a body allocates nothing beyond what the message already owns.
#[derive(Debug)]
pub(crate) struct Group {
    /// Indexed by lane; only lane 0's buffer is allocated up front.
    lanes: Vec<LaneGroup>,
    /// The lane of the message pushed last (which [`Self::mark`] marks).
    last_lane: usize,
    /// Changes to the retained store, applied before the queue appends (embedded mode).
    retained: Vec<RetainedChange>,
    /// The group's traced messages (see `crate::traced`), empty while tracing is off.
    traced: Vec<crate::traced::Received>,
    scratch: Envelope,
}

/// One lane's part of a [`Group`].
#[derive(Debug, Default)]
struct LaneGroup {
    buf: BytesMut,
    ends: Vec<usize>,
    /// Publisher marks to commit with the part (see `shared::queue::Mark`): (key, digest).
    marks: Vec<(Vec<u8>, u64)>,
}

impl Group {
    /// An empty group for `site`.
    pub(crate) fn new(site: &str) -> Self {
        let mut group = Self::unallocated(site);
        group.lanes[0].buf = BytesMut::with_capacity(64 * 1024);
        group
    }

    /// An empty group whose buffers grow on first use: what stands in for a group lent to a blocking
    /// thread, and what is left if that thread panicked.
    fn unallocated(site: &str) -> Self {
        let lanes: Vec<LaneGroup> = (0..=MAX_LANE).map(|_| LaneGroup::default()).collect();
        Self {
            lanes,
            last_lane: 0,
            retained: Vec::new(),
            traced: Vec::new(),
            scratch: Envelope {
                origin: site.to_owned(),
                seq: 0,
                topic: String::new(),
                payload: Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: Properties::default(),
                trace: None,
                enqueued_at_ms: 0,
            },
        }
    }

    /// Whether the group holds no message.
    pub(crate) fn is_empty(&self) -> bool {
        self.retained.is_empty() && self.lanes.iter().all(|l| l.ends.is_empty())
    }

    /// Forgets every message in the group.
    pub(crate) fn clear(&mut self) {
        for l in &mut self.lanes {
            l.buf.clear();
            l.ends.clear();
            l.marks.clear();
        }
        self.retained.clear();
        self.traced.clear();
    }

    /// Marks the message just pushed as `key` with `digest`, committed with it (in its lane's queue).
    pub(crate) fn mark(&mut self, key: Vec<u8>, digest: u64) {
        self.lanes[self.last_lane].marks.push((key, digest));
    }

    /// Whether a message of this group carries this mark (a resend within one group).
    fn has_mark(&self, key: &[u8], digest: u64) -> bool {
        self.lanes
            .iter()
            .any(|l| l.marks.iter().any(|(k, d)| k == key && *d == digest))
    }

    /// Encodes one message under `rule`: QoS capped, retain kept or cleared, `traceparent`/`tracestate`
    /// user properties moved into the trace context. A message that cannot be encoded (a field over the
    /// envelope's 16-bit limits, which MQTT itself mostly forbids) is dropped with a warning; returns whether
    /// it was added.
    pub(crate) fn push(
        &mut self,
        rule: Rule,
        topic: String,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        mut properties: Properties,
    ) -> bool {
        let mut trace = take_trace(&mut properties.user);
        let begun = meshbridge_metrics::otel::traces()
            .and_then(|t| t.begin(trace.as_ref().map(|c| c.traceparent.as_str())));
        if let Some(begun) = begun {
            // The envelope carries the edge's `receive` span as the next hop's parent; a publisher's
            // tracestate stays with its trace, and goes when a new trace replaces an invalid context.
            let tracestate = trace.and_then(|c| begun.parent.and(c.tracestate));
            trace = Some(TraceContext {
                traceparent: begun.context.header(),
                tracestate,
            });
        }
        let e = &mut self.scratch;
        e.topic = topic;
        e.payload = payload;
        e.qos = rule.qos(qos);
        e.retain = retain && rule.retain;
        e.properties = properties;
        e.trace = trace;
        e.enqueued_at_ms = now_ms();
        let lane = usize::from(rule.lane.min(MAX_LANE));
        let part = &mut self.lanes[lane];
        let result: Result<(), EncodeError> = e.encode_body(&mut part.buf);
        match result {
            Ok(()) => {
                part.ends.push(part.buf.len());
                self.last_lane = lane;
                if let Some(begun) = begun {
                    self.traced.push(crate::traced::Received {
                        begun,
                        start: std::time::SystemTime::now(),
                        topic: e.topic.clone(),
                        lane: rule.lane.min(MAX_LANE),
                        index: part.ends.len() as u64 - 1,
                        seq: None,
                    });
                }
                true
            }
            Err(cause) => {
                warn!(topic = %e.topic, %cause, "message cannot be encoded; not forwarded");
                false
            }
        }
    }
}

/// Moves the W3C trace context out of the user properties (the hub puts it back as user properties), so
/// it is carried once. An empty `tracestate` counts as absent, as OpenTelemetry injects empty ones.
fn take_trace(user: &mut Vec<(String, String)>) -> Option<TraceContext> {
    if !user.iter().any(|(k, _)| k == "traceparent") {
        return None;
    }
    let mut traceparent = None;
    let mut tracestate = None;
    user.retain_mut(|(k, v)| match k.as_str() {
        "traceparent" if traceparent.is_none() => {
            traceparent = Some(std::mem::take(v));
            false
        }
        "tracestate" if tracestate.is_none() => {
            tracestate = Some(std::mem::take(v)).filter(|s: &String| !s.is_empty());
            false
        }
        _ => true,
    });
    traceparent.map(|traceparent| TraceContext {
        traceparent,
        tracestate,
    })
}

/// Retry delays for a commit refused by a full queue in external mode: the broker keeps the messages
/// unacknowledged meanwhile, so nothing is dropped.
pub(crate) fn full_queue_backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << attempt.min(5))).min(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn trace_context_moves_out_of_user_properties() {
        type Case = (
            &'static [(&'static str, &'static str)],
            Option<(&'static str, Option<&'static str>)>,
            &'static [(&'static str, &'static str)],
        );
        let cases: &[Case] = &[
            (&[("a", "1")], None, &[("a", "1")]),
            (
                &[("traceparent", "00-ab-cd-01"), ("a", "1")],
                Some(("00-ab-cd-01", None)),
                &[("a", "1")],
            ),
            (
                &[("tracestate", "k=v"), ("traceparent", "tp"), ("a", "1")],
                Some(("tp", Some("k=v"))),
                &[("a", "1")],
            ),
            (
                &[("traceparent", "tp"), ("tracestate", "")],
                Some(("tp", None)),
                &[],
            ),
            // Without a traceparent a tracestate means nothing to the envelope; it stays a user property.
            (&[("tracestate", "k=v")], None, &[("tracestate", "k=v")]),
        ];
        for (input, trace, rest) in cases {
            let mut props = user(input);
            let got = take_trace(&mut props);
            let want = trace.map(|(tp, ts)| TraceContext {
                traceparent: tp.to_owned(),
                tracestate: ts.map(str::to_owned),
            });
            assert_eq!(got, want, "{input:?}");
            assert_eq!(props, user(rest), "{input:?}");
        }
    }

    #[test]
    fn group_encodes_rule_applied_bodies() {
        let mut group = Group::new("line1");
        let rule = Rule {
            qos_cap: Some(QoS::AtLeastOnce),
            retain: false,
            lane: 0,
        };
        let props = Properties {
            user: user(&[("k", "v"), ("traceparent", "tp")]),
            ..Properties::default()
        };
        assert!(group.push(
            rule,
            "telemetry/a".into(),
            Bytes::from_static(b"21.5"),
            QoS::ExactlyOnce,
            true,
            props,
        ));
        assert_eq!(group.lanes[0].ends.len(), 1);
        let body = group.lanes[0].buf.clone().freeze();
        let e = Envelope::decode_body(7, body).expect("decodes");
        assert_eq!(e.origin, "line1");
        assert_eq!(e.topic, "telemetry/a");
        assert_eq!(&e.payload[..], b"21.5");
        assert_eq!(e.qos, QoS::AtLeastOnce);
        assert!(!e.retain);
        assert_eq!(e.properties.user, user(&[("k", "v")]));
        assert_eq!(e.trace.map(|t| t.traceparent), Some("tp".to_owned()));
    }

    #[test]
    fn a_group_keeps_each_lane_and_its_marks_apart() {
        let mut group = Group::new("line1");
        let rule = |lane| Rule {
            qos_cap: None,
            retain: true,
            lane,
        };
        for (lane, topic) in [(0, "telemetry/a"), (9, "alarms/fire"), (0, "telemetry/b")] {
            assert!(group.push(
                rule(lane),
                topic.into(),
                Bytes::from_static(b"x"),
                QoS::AtLeastOnce,
                false,
                Properties::default(),
            ));
            group.mark(topic.as_bytes().to_vec(), u64::from(lane));
        }
        assert_eq!(group.lanes[0].ends.len(), 2);
        assert_eq!(group.lanes[9].ends.len(), 1);
        let body = group.lanes[9].buf.clone().freeze();
        let e = Envelope::decode_body(1, body).expect("decodes");
        assert_eq!(e.topic, "alarms/fire");
        assert_eq!(group.lanes[9].marks, [(b"alarms/fire".to_vec(), 9)]);
        assert!(group.has_mark(b"telemetry/b", 0));
        assert!(!group.is_empty());
        group.clear();
        assert!(group.is_empty());
    }

    #[test]
    fn a_commit_group_always_fits_the_queue() {
        // A quarter of the queue, capped; the smallest queue (1 MiB) still takes a 256 KiB message.
        assert_eq!(group_budget(1 << 20), 256 << 10);
        assert_eq!(group_budget(16 << 20), 4 << 20);
        assert_eq!(group_budget(u64::MAX), MAX_GROUP_BYTES);
    }

    #[test]
    fn full_queue_backoff_grows_and_caps() {
        let delays: Vec<u64> = (0..8)
            .map(|a| u64::try_from(full_queue_backoff(a).as_millis()).unwrap_or(u64::MAX))
            .collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
    }
}
