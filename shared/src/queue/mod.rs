//! The durable outbound queue: what the agent has accepted and the hub has not yet acknowledged.
//!
//! The product's first promise is that a QoS 1 message acknowledged at the edge is never lost. The queue is
//! where that promise is kept: [`Queue::append`] returns only once the batch is on disk, so the caller may
//! acknowledge upstream (PUBACK to the publisher, ack to the broker) right after it returns, and nothing
//! short of losing the disk takes it back. The agent uses one queue for its uplink; the hub will use one per
//! site for the downlink.
//!
//! # Model
//! Messages get consecutive sequence numbers starting at 1, assigned by the queue in append order. The queue
//! keeps every message with a seq above the *acknowledged watermark* (`acked`); everything at or below it
//! is gone (acknowledged by the peer, dropped by the `drop-oldest` policy, or expired by age). Readers read
//! forward from any cursor; the cursor never has to be persisted because the peer acknowledges
//! cumulatively and a reconnect resumes from `acked + 1`.
//!
//! # Invariants (checked by the model test in `tests/queue_model.rs`)
//! - seqs are strictly increasing and never reused, across reopen too;
//! - an appended, unacknowledged, undropped message is returned by reads, in seq order, after any number of
//!   reopens and crashes (for a crash: every append that *returned*);
//! - `ack_upto` is idempotent and monotonic: acknowledging a lower seq again changes nothing;
//! - limits: `bytes` never exceeds `max_bytes` after an append returns Ok.
//!
//! # Implementations
//! - [`RedbQueue`]: the real one, on redb: one write transaction per appended batch (group commit), or,
//!   opened with [`RedbQueue::open_logged`], one frame of an append log per batch, moved into redb many at a
//!   time (`log.rs` says why).
//! - [`DeadLetters`]: not a queue but its companion: messages refused for good, with their reason, for an
//!   operator to list and replay.
//! - [`RetainedStore`]: not a queue either: the embedded edge broker's retained messages, one per topic.
//! - [`MemQueue`]: in memory, simple enough to be obviously right; the model the redb queue is checked
//!   against (as raft-rs's `MemStorage` and Vector's disk-buffer model).

mod dead;
mod log;
mod mem;
mod redb;
mod retained;
pub mod schema;
mod session;

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use self::dead::{DeadLetter, DeadLetterLimits, DeadLetters, NewDeadLetter};
pub use self::log::DEFAULT_LOG_BYTES;
pub use self::mem::MemQueue;
pub use self::redb::{Mark, RedbQueue};
pub use self::retained::{RetainedChange, RetainedLimits, RetainedStore};
pub use self::session::{Enqueued, SessionLimits, SessionRecord, SessionStore, StoredDelivery};

/// What the queue does when an append would go over [`QueueLimits::max_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Refuse the append with [`QueueError::Full`]: back-pressure to the publishers. Nothing accepted is
    /// ever dropped. The default, because dropping acknowledged data is what we promise not to do.
    #[default]
    Block,
    /// Make room by dropping the oldest stored messages, counted in [`QueueStats::dropped`] and reported by
    /// [`AppendOutcome::dropped`]; never silent.
    DropOldest,
}

/// Bounds of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most bytes of message bodies (plus per-batch overhead) the queue holds.
    pub max_bytes: u64,
    /// Messages older than this are expired by [`Queue::expire`] (counted in [`QueueStats::expired`]).
    /// `None`: no age bound.
    pub max_age: Option<Duration>,
    /// What an append does when it does not fit in `max_bytes`.
    pub full_policy: FullPolicy,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            full_policy: FullPolicy::Block,
        }
    }
}

/// One stored message as read back from the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The message's sequence number.
    pub seq: u64,
    /// The opaque body the caller appended (for the agent: an encoded [`crate::envelope::Envelope`] body).
    pub body: Bytes,
}

/// The result of a successful [`Queue::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Seq of the first appended message (the others follow consecutively).
    pub first_seq: u64,
    /// Seq of the last appended message; `first_seq - 1` for an empty batch.
    pub last_seq: u64,
    /// Messages dropped by [`FullPolicy::DropOldest`] to make room for this batch.
    pub dropped: u64,
}

/// A snapshot of a queue's state, for metrics and health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Messages stored and not acknowledged (nor dropped, nor expired).
    pub depth: u64,
    /// Bytes the stored batches take (message bodies plus per-batch overhead), as counted against
    /// [`QueueLimits::max_bytes`]. A batch whose messages are partly acknowledged counts whole until all of
    /// it is.
    pub bytes: u64,
    /// Size of the file on disk (it does not shrink when entries are deleted; freed pages are reused).
    pub file_bytes: u64,
    /// Enqueue time (unix ms, as passed to [`Queue::append`]) of the oldest stored batch.
    pub oldest_enqueued_ms: Option<u64>,
    /// The acknowledged watermark: every seq at or below it is gone.
    pub acked: u64,
    /// The seq the next appended message gets.
    pub next_seq: u64,
    /// Messages dropped by the drop-oldest policy since the queue was created.
    pub dropped: u64,
    /// Messages expired by age since the queue was created.
    pub expired: u64,
}

impl QueueStats {
    /// Age of the oldest stored message at `now_ms` (unix ms), if any is stored.
    pub fn oldest_age(&self, now_ms: u64) -> Option<Duration> {
        self.oldest_enqueued_ms
            .map(|t| Duration::from_millis(now_ms.saturating_sub(t)))
    }
}

/// Errors of the durable queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The append does not fit under [`QueueLimits::max_bytes`] and the policy is [`FullPolicy::Block`].
    /// Nothing of the batch was stored; retry after the uplink drained some.
    #[error(
        "queue full: {stored} bytes stored, {incoming} more would exceed the limit of {max} bytes"
    )]
    Full {
        /// Bytes currently stored.
        stored: u64,
        /// Bytes the refused batch needs.
        incoming: u64,
        /// The configured limit.
        max: u64,
    },
    /// A single batch is larger than the whole queue may ever hold.
    #[error("batch of {incoming} bytes can never fit a queue limited to {max} bytes")]
    BatchTooLarge {
        /// Bytes the batch needs.
        incoming: u64,
        /// The configured limit.
        max: u64,
    },
    /// The filesystem is full. Nothing of the batch was stored; what was committed before is intact and
    /// appends work again once space is freed (the queue reopens its file by itself).
    #[error("disk full while writing the queue at {path}")]
    DiskFull {
        /// The queue file.
        path: String,
    },
    /// Any other storage failure (I/O error, corruption) with the file it concerns.
    #[error("queue storage error at {path}: {source}")]
    Storage {
        /// The queue file.
        path: String,
        /// What redb reported.
        #[source]
        source: ::redb::Error,
    },
    /// The file's schema version is newer than this build reads (see [`schema`]).
    #[error("{path}: {source}")]
    Schema {
        /// The file.
        path: String,
        /// The versions.
        #[source]
        source: schema::SchemaError,
    },
    /// The file holds something this version cannot read (a newer format, or not a queue at all).
    #[error("queue file {path} is not a meshbridge queue of a known format: {detail}")]
    Format {
        /// The queue file.
        path: String,
        /// What was wrong.
        detail: &'static str,
    },
}

/// The queue interface both implementations share, so the model test can drive them side by side.
///
/// Methods take `&self`: the agent appends from its ingest task while the uplink task reads and acks.
/// Time is always a parameter (unix milliseconds), never read from a clock.
pub trait Queue {
    /// Appends `bodies` as one batch, all or nothing, and returns once the batch is durable. An empty batch
    /// stores nothing, costs nothing and always succeeds.
    fn append<B: AsRef<[u8]>>(
        &self,
        bodies: &[B],
        now_ms: u64,
    ) -> Result<AppendOutcome, QueueError>;

    /// Reads stored messages in seq order starting at `from` (or at the first stored seq, if `from` is
    /// below it), at most `max_messages` of them and, past the first, at most `max_bytes` of bodies.
    fn read(
        &self,
        from: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, QueueError>;

    /// Acknowledges every message up to and including `seq` (clamped to the last appended seq) and deletes
    /// what becomes unreachable (at once, or with the next write: reads never return it again either way).
    /// Returns how many messages this call newly acknowledged; acknowledging a lower seq than before is a
    /// no-op returning 0.
    fn ack_upto(&self, seq: u64) -> Result<u64, QueueError>;

    /// Drops batches older than [`QueueLimits::max_age`] at `now_ms`; returns how many messages expired.
    fn expire(&self, now_ms: u64) -> Result<u64, QueueError>;

    /// Current depth, bytes and counters.
    fn stats(&self) -> QueueStats;
}

/// Bytes a batch of bodies takes in the queue, as counted against the limit: the bodies plus a fixed
/// per-batch and per-message overhead (the on-disk record header). Both implementations use this so the
/// model and the real queue make the same full/not-full decisions.
pub fn batch_cost<B: AsRef<[u8]>>(bodies: &[B]) -> u64 {
    BATCH_HEADER_LEN as u64
        + bodies
            .iter()
            .map(|b| (ENTRY_HEADER_LEN + b.as_ref().len()) as u64)
            .sum::<u64>()
}

/// Bytes of the on-disk batch header: format version (1), enqueue time (8), message count (4).
const BATCH_HEADER_LEN: usize = 13;
/// Bytes of the on-disk per-message header: body length (4).
const ENTRY_HEADER_LEN: usize = 4;

/// The bookkeeping both implementations share: which batches are stored, the watermark and the counters.
/// Keeping it in one place means the redb queue and the model can only differ in what they store, which is
/// exactly what the model test is meant to check.
#[derive(Debug, Clone, Default)]
struct Ledger {
    /// Stored batches, oldest first.
    batches: std::collections::VecDeque<BatchMeta>,
    acked: u64,
    next_seq: u64,
    bytes: u64,
    dropped: u64,
    expired: u64,
}

/// Where one stored batch sits in seq space, what it costs and when it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchMeta {
    first: u64,
    last: u64,
    bytes: u64,
    enqueued_ms: u64,
}

/// What a ledger operation decided; the implementation applies it to its storage.
#[derive(Debug, Default)]
struct Removal {
    /// Batches no longer reachable, to delete.
    removed: Vec<BatchMeta>,
    /// Messages newly passed by the watermark.
    passed: u64,
}

impl Ledger {
    fn new() -> Self {
        Self {
            next_seq: 1,
            ..Self::default()
        }
    }

    /// The outcome of appending an empty batch: nothing stored, nothing dropped.
    fn empty_append(&self) -> AppendOutcome {
        AppendOutcome {
            first_seq: self.next_seq,
            last_seq: self.next_seq - 1,
            dropped: 0,
        }
    }

    fn stats(&self) -> QueueStats {
        QueueStats {
            depth: self.next_seq - 1 - self.acked,
            bytes: self.bytes,
            file_bytes: 0,
            oldest_enqueued_ms: self.batches.front().map(|b| b.enqueued_ms),
            acked: self.acked,
            next_seq: self.next_seq,
            dropped: self.dropped,
            expired: self.expired,
        }
    }

    /// Moves every seq up by `by`: the stored batches, the watermark and the next seq. Used when the queue
    /// starts a new incarnation above a mark the hub has already seen (see `RedbQueue::restart_above`).
    fn shift(&mut self, by: u64) {
        for b in &mut self.batches {
            b.first += by;
            b.last += by;
        }
        self.acked += by;
        self.next_seq += by;
    }

    /// Moves the watermark to `upto` (if higher) and pops every batch it fully passes.
    fn advance(&mut self, upto: u64) -> Removal {
        let upto = upto.min(self.next_seq - 1);
        let mut out = Removal::default();
        if upto <= self.acked {
            return out;
        }
        out.passed = upto - self.acked;
        self.acked = upto;
        while let Some(front) = self.batches.front() {
            if front.last > upto {
                break;
            }
            self.bytes -= front.bytes;
            out.removed.extend(self.batches.pop_front());
        }
        out
    }

    /// Decides how to fit a batch of `cost` bytes: Ok with the batches drop-oldest must remove, or the
    /// error for the block policy.
    fn make_room(&mut self, cost: u64, limits: &QueueLimits) -> Result<Removal, QueueError> {
        if cost > limits.max_bytes {
            return Err(QueueError::BatchTooLarge {
                incoming: cost,
                max: limits.max_bytes,
            });
        }
        if self.bytes + cost <= limits.max_bytes {
            return Ok(Removal::default());
        }
        match limits.full_policy {
            FullPolicy::Block => Err(QueueError::Full {
                stored: self.bytes,
                incoming: cost,
                max: limits.max_bytes,
            }),
            FullPolicy::DropOldest => {
                let mut upto = self.acked;
                let mut freed = 0;
                for b in &self.batches {
                    if self.bytes - freed + cost <= limits.max_bytes {
                        break;
                    }
                    freed += b.bytes;
                    upto = b.last;
                }
                let removal = self.advance(upto);
                self.dropped += removal.passed;
                Ok(removal)
            }
        }
    }

    /// Records an appended batch of `count` messages and returns its meta.
    fn push(&mut self, count: u64, cost: u64, now_ms: u64) -> BatchMeta {
        let meta = BatchMeta {
            first: self.next_seq,
            last: self.next_seq + count - 1,
            bytes: cost,
            enqueued_ms: now_ms,
        };
        self.next_seq += count;
        if count > 0 {
            self.bytes += cost;
            self.batches.push_back(meta);
        }
        meta
    }

    /// Expires every batch enqueued before `now_ms - max_age`.
    fn expire(&mut self, now_ms: u64, limits: &QueueLimits) -> Removal {
        let Some(max_age) = limits.max_age else {
            return Removal::default();
        };
        let cutoff = now_ms.saturating_sub(u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX));
        let upto = self
            .batches
            .iter()
            .take_while(|b| b.enqueued_ms < cutoff)
            .last()
            .map_or(self.acked, |b| b.last);
        let removal = self.advance(upto);
        self.expired += removal.passed;
        removal
    }

    /// The first seq a read from `from` returns.
    fn read_start(&self, from: u64) -> u64 {
        from.max(self.acked + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_bytes: u64, full_policy: FullPolicy) -> QueueLimits {
        QueueLimits {
            max_bytes,
            max_age: Some(Duration::from_secs(10)),
            full_policy,
        }
    }

    #[test]
    fn block_refuses_and_drop_oldest_makes_room() {
        let body = [0u8; 87]; // cost 13 + 4 + 87 = 104
        let cost = batch_cost(&[body]);
        assert_eq!(cost, 104);

        let mut l = Ledger::new();
        let block = limits(3 * cost, FullPolicy::Block);
        for _ in 0..3 {
            l.make_room(cost, &block).expect("fits");
            l.push(1, cost, 0);
        }
        assert!(matches!(
            l.make_room(cost, &block),
            Err(QueueError::Full {
                stored: 312,
                incoming: 104,
                max: 312
            })
        ));

        let drop = limits(3 * cost, FullPolicy::DropOldest);
        let removal = l.make_room(cost, &drop).expect("drop-oldest makes room");
        assert_eq!(removal.removed.len(), 1);
        assert_eq!(l.stats().dropped, 1);
        assert_eq!(l.acked, 1);
        assert!(matches!(
            l.make_room(4 * cost, &drop),
            Err(QueueError::BatchTooLarge { .. })
        ));
    }

    #[test]
    fn ack_is_clamped_monotonic_and_keeps_partial_batches() {
        let mut l = Ledger::new();
        l.push(5, 100, 0); // 1..=5
        l.push(5, 100, 0); // 6..=10
        assert_eq!(l.advance(3).passed, 3);
        assert_eq!(l.batches.len(), 2, "a partly acked batch stays");
        assert_eq!(l.advance(2).passed, 0, "lower ack is a no-op");
        let r = l.advance(99);
        assert_eq!(r.passed, 7, "clamped to the last appended seq");
        assert_eq!(r.removed.len(), 2);
        assert_eq!(l.stats().depth, 0);
        assert_eq!(l.bytes, 0);
        assert_eq!(l.read_start(1), 11);
    }

    #[test]
    fn expire_by_age_counts() {
        let mut l = Ledger::new();
        let lim = limits(1 << 20, FullPolicy::Block);
        l.push(2, 50, 1_000);
        l.push(3, 50, 5_000);
        l.push(1, 50, 12_000);
        assert_eq!(
            l.expire(11_000, &lim).passed,
            0,
            "exactly max_age old stays"
        );
        assert_eq!(l.expire(15_500, &lim).passed, 5);
        assert_eq!(l.stats().expired, 5);
        assert_eq!(l.stats().oldest_enqueued_ms, Some(12_000));
    }
}
