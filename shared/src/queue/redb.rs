//! The durable queue on redb.
//!
//! # On disk
//! One redb file with three tables:
//! - `batches: u64 -> bytes`: one record per appended batch, keyed by the batch's first seq. A record is
//!   `[format u8 = 1][enqueued_ms u64 LE][count u32 LE]` then `count` times `[len u32 LE][body]`. Storing a
//!   batch as one value rather than one row per message is what makes group commit cheap: redb's cost is
//!   per B-tree insert and per fsync, and this pays one of each per batch (about 2.6 µs per row saved).
//! - `index: u64 -> (last_seq, bytes, enqueued_ms)`: the batch's extent and cost, so opening, acks,
//!   drop-oldest and expiry never read the bodies.
//! - `meta: str -> u64`: `format`, `incarnation`, `next_seq`, `acked`, `dropped`, `expired`.
//!
//! # Durability
//! A queue opened with [`RedbQueue::open`] commits each append with `Durability::Immediate`; one opened
//! with [`RedbQueue::open_logged`] (the agent's) writes each append to an append log beside the file and
//! `fdatasync`s it, and moves the logged batches into redb in one durable commit when the log is full,
//! on close, and with any other write transaction (`super::log` says why and how it is replayed). Either
//! way an append that returned survives `kill -9` and power loss. After a crash, opening the file runs redb's automatic recovery (a checksum walk that rebuilds the
//! allocator state) before the queue is used; nobody has to repair anything by hand. redb's quick-repair
//! mode would skip that walk, but it was measured here at 16x the cost per commit (141 vs 2,250 commits/s
//! at batch 1, 7.8k vs 89k msg/s at batch 64), which would break the agent's latency at low rates; a
//! recovery walk once per crash is the better trade. Acknowledgements write nothing when they arrive:
//! [`Queue::ack_upto`] moves the watermark in memory, and the next write transaction (the next append's,
//! which is durable, or the housekeeping's every few seconds) deletes what it passed and stores the
//! watermark; closing the queue writes it too. A crash can therefore bring back messages the hub had
//! already acknowledged; they are sent again and the hub's dedup drops them. That trade keeps one commit
//! and one fsync per appended batch instead of two commits, and never loses anything.
//!
//! # Reading what was just written
//! The uplink reads right behind the appends. The records of the last appends (up to [`TAIL_BYTES`]) stay
//! in memory ([`RedbQueue::read_cached`]), so such a read opens no transaction and, taking only a short
//! lock that no I/O ever holds, needs no blocking thread: at a factory line's rate every message is its
//! own batch, and each hop to a blocking thread costs a wake-up of two threads. Older entries (a backlog
//! after an outage, or after a restart) are read from the file.
//!
//! # Failure
//! Any failed write transaction (disk full included) leaves the file as of the last commit. redb then
//! refuses further writes on that handle (`PreviousIo`), so the queue marks itself poisoned and, on the
//! next call, reopens the file and reloads its state from disk: once space is freed, appends succeed again
//! without the caller reopening anything.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::log::{self, FrameHead, LogFile};
use super::{
    batch_cost, AppendOutcome, BatchMeta, Entry, Ledger, Queue, QueueError, QueueLimits,
    QueueStats, Removal, BATCH_HEADER_LEN, ENTRY_HEADER_LEN,
};

const BATCHES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("batches");
const INDEX: TableDefinition<'_, u64, (u64, u64, u64)> = TableDefinition::new("index");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// Publisher marks (see [`Mark`]): key -> (digest, unix ms when written).
const MARKS: TableDefinition<'_, &[u8], (u64, u64)> = TableDefinition::new("marks");

/// Version of the record layout above; a file of another version is refused, not misread.
const FORMAT: u64 = 1;
/// Most record bytes of the latest appends kept in memory for [`RedbQueue::read_cached`]. Enough for
/// the uplink's window at low and medium rates; under a backlog the uplink reads from the file anyway.
const TAIL_BYTES: usize = 2 << 20;
/// redb's page cache. Its default (1 GiB) would let a long backlog drain grow the agent's memory with
/// pages it reads once; the queue reads forward, so a small cache loses nothing.
const CACHE_BYTES: usize = 16 << 20;

/// A note written in the same transaction as an append: "the message with this `key` (a publisher's client
/// id and packet id) and this content `digest` is committed". A PUBLISH the publisher sends again with DUP
/// set (its PUBACK was lost, or the agent was killed before sending it) is recognised by its mark and
/// acknowledged without being queued twice: [`RedbQueue::mark`]. Because the mark commits with the message,
/// the two survive or vanish together, `kill -9` and power cuts included.
#[derive(Debug, Clone, Copy)]
pub struct Mark<'a> {
    /// Identifies the message at its publisher (e.g. client id and packet id).
    pub key: &'a [u8],
    /// A digest of its content, so a reused packet id with other content is not mistaken for a resend.
    pub digest: u64,
}

/// A durable [`super::Queue`] in one redb file.
#[derive(Debug)]
pub struct RedbQueue {
    path: PathBuf,
    limits: QueueLimits,
    /// Changes only in [`RedbQueue::restart_above`].
    incarnation: AtomicU64,
    /// The open database; `None` only between closing a poisoned handle and reopening the file. Readers
    /// clone the `Arc` so they never wait on a writer.
    db: RwLock<Option<Arc<Database>>>,
    writer: Mutex<Writer>,
    /// The watermark readers see (they do not take the writer lock): the ledger's, or a later one
    /// [`Queue::ack_upto`] set and the ledger has not taken in yet (`ack_requested`).
    acked: AtomicU64,
    /// The highest acknowledgement not yet taken into the ledger; the next holder of the writer lock
    /// applies it (`absorb`). Kept apart so an acknowledgement never waits for a commit's fsync.
    ack_requested: AtomicU64,
    /// The latest appended records, for reads right behind the appends. Its lock is never held across
    /// I/O; lock order is writer, then tail.
    tail: Mutex<Tail>,
    /// Set when a write transaction failed: redb's handle then refuses every operation (`PreviousIo`) and
    /// the ledger may be ahead of the disk, so both are reloaded before the next operation, read or write.
    poisoned: AtomicBool,
    repaired_on_open: bool,
    /// Messages the append log gave back on open (see [`RedbQueue::replayed_on_open`]).
    replayed_on_open: u64,
    /// False on a custom storage backend, which cannot be reopened by path after a failed write.
    reopenable: bool,
}

#[derive(Debug)]
struct Writer {
    ledger: Ledger,
    /// The append log, for a queue opened with [`RedbQueue::open_logged`].
    log: Option<Log>,
    /// Reused record buffer, so an append does not allocate.
    scratch: Vec<u8>,
    /// Batches the watermark passed since the last write transaction, deleted by the next one.
    pending: Vec<BatchMeta>,
    /// Whether the ledger moved since the last write transaction (an acknowledgement within a batch
    /// deletes nothing but still moves the stored watermark).
    dirty: bool,
}

/// The append log of a logged queue (see `super::log`) and the batches it holds that redb does not.
#[derive(Debug)]
struct Log {
    file: Box<dyn redb::StorageBackend>,
    capacity: u64,
    /// False when the queue was opened without the log option and only replays a log left beside it:
    /// appends then commit to redb directly.
    appends: bool,
    /// Where the next frame goes; back to 0 after every durable redb commit.
    pos: u64,
    /// Reused frame buffer.
    frame: Vec<u8>,
    /// Batches durable in the log and not yet written to redb, oldest first. Every write transaction
    /// writes them (those the watermark has not passed) before anything else; a durable one also lets the
    /// log start over.
    unapplied: Vec<Unapplied>,
}

#[derive(Debug)]
struct Unapplied {
    meta: BatchMeta,
    record: Bytes,
    /// (key, digest, written ms) of the batch's publisher marks.
    marks: Vec<(Vec<u8>, u64, u64)>,
}

/// The records of the latest appends, contiguous: they hold every stored seq from the first record's
/// first seq up to `end`, minus what the watermark passed.
#[derive(Debug)]
struct Tail {
    records: VecDeque<TailRecord>,
    /// The next seq as of the last append.
    end: u64,
    /// Record bytes held.
    bytes: usize,
}

#[derive(Debug)]
struct TailRecord {
    first: u64,
    last: u64,
    record: Bytes,
}

impl Tail {
    fn empty(end: u64) -> Self {
        Self {
            records: VecDeque::new(),
            end,
            bytes: 0,
        }
    }

    /// Adds a committed record; keeps the tail within [`TAIL_BYTES`] by forgetting the oldest.
    fn push(&mut self, first: u64, last: u64, record: Bytes) {
        if first != self.end || record.len() > TAIL_BYTES {
            // Not contiguous (cannot happen after a successful append) or too big to keep: start over.
            *self = Self::empty(last + 1);
            return;
        }
        self.bytes += record.len();
        self.records.push_back(TailRecord {
            first,
            last,
            record,
        });
        self.end = last + 1;
        while self.bytes > TAIL_BYTES {
            self.pop_front();
        }
    }

    /// Forgets the records the watermark fully passed.
    fn trim(&mut self, acked: u64) {
        while self.records.front().is_some_and(|r| r.last <= acked) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(r) = self.records.pop_front() {
            self.bytes -= r.record.len();
        }
    }
}

impl RedbQueue {
    /// Messages stored and not acknowledged: [`QueueStats::depth`] without the file-size system call
    /// [`Queue::stats`] makes, for callers that ask on every turn of a loop.
    pub fn depth(&self) -> u64 {
        let tail = self.tail();
        (tail.end - 1).saturating_sub(self.acked.load(Ordering::Acquire))
    }

    /// The acknowledged watermark ([`QueueStats::acked`]) without a system call or waiting for a commit.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// Reads like [`Queue::read`] if the entries are still held in memory (see the module docs): `None`
    /// when the read must go to the file. Never waits for I/O, so async code may call it directly.
    pub fn read_cached(
        &self,
        from: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> Option<Vec<Entry>> {
        if self.poisoned.load(Ordering::Acquire) {
            return None;
        }
        let tail = self.tail();
        let start = from.max(self.acked.load(Ordering::Acquire) + 1);
        if start < tail.records.front().map_or(tail.end, |r| r.first) {
            return None;
        }
        let mut c = Collect::new(max_messages, max_bytes);
        if max_messages == 0 {
            return Some(c.out);
        }
        for r in tail.records.iter().filter(|r| r.last >= start) {
            match c.record(r.first, r.record.clone(), start) {
                Ok(true) => {}
                Ok(false) => break,
                // Only a bug could make a record this queue encoded fail to decode; the file decides.
                Err(_) => return None,
            }
        }
        Some(c.out)
    }

    /// Opens the queue at `path`, creating it if it does not exist; every append is its own durable redb
    /// commit. An append log left beside the file by [`RedbQueue::open_logged`] is replayed first.
    pub fn open(path: impl AsRef<Path>, limits: QueueLimits) -> Result<Self, QueueError> {
        Self::open_file(path.as_ref(), limits, None)
    }

    /// Opens the queue at `path` with an append log of `log_bytes` beside it ([`RedbQueue::log_path_of`];
    /// see the module docs), creating either if missing and replaying the log. Appends whose log frame
    /// does not fit in `log_bytes` commit to redb directly.
    pub fn open_logged(
        path: impl AsRef<Path>,
        limits: QueueLimits,
        log_bytes: u64,
    ) -> Result<Self, QueueError> {
        Self::open_file(path.as_ref(), limits, Some(log_bytes))
    }

    fn open_file(
        path: &Path,
        limits: QueueLimits,
        log_bytes: Option<u64>,
    ) -> Result<Self, QueueError> {
        let path = path.to_path_buf();
        let (db, repaired) = open_db(&path, None::<redb::backends::InMemoryBackend>)?;
        let log_path = Self::log_path_of(&path);
        let log = match log_bytes {
            Some(capacity) => Some((capacity, true)),
            // A log left by a logged open still holds appends redb may not have: replay it.
            None if log_path.exists() => Some((0, false)),
            None => None,
        };
        let log = log
            .map(|(capacity, appends)| {
                let file: Box<dyn redb::StorageBackend> = Box::new(LogFile::open(&log_path)?);
                log::preallocate(file.as_ref(), capacity)?;
                Ok((file, capacity, appends))
            })
            .transpose()
            .map_err(|e: io::Error| storage_error(&log_path, e.into()))?;
        Self::with_db(path, db, repaired, limits, true, log)
    }

    /// Opens the queue on a custom redb storage backend, and its append log on `log` (a backend and its
    /// size) if given; `label` names it in errors. For tests that model the disk itself (a power cut that
    /// loses unsynced writes: `shared/tests/queue_power_cut.rs`). After a failed write such a queue cannot
    /// reopen itself, so every later call fails.
    pub fn open_on_backend(
        backend: impl redb::StorageBackend,
        log: Option<(Box<dyn redb::StorageBackend>, u64)>,
        label: impl AsRef<Path>,
        limits: QueueLimits,
    ) -> Result<Self, QueueError> {
        let path = label.as_ref().to_path_buf();
        let (db, repaired) = open_db(&path, Some(backend))?;
        let log = log
            .map(|(file, capacity)| {
                log::preallocate(file.as_ref(), capacity)?;
                Ok((file, capacity, true))
            })
            .transpose()
            .map_err(|e: io::Error| storage_error(&path, e.into()))?;
        Self::with_db(path, db, repaired, limits, false, log)
    }

    /// Where the append log of the queue file at `path` lives: beside it, with the extension `log`.
    pub fn log_path_of(path: &Path) -> PathBuf {
        path.with_extension("log")
    }

    fn with_db(
        path: PathBuf,
        db: Database,
        repaired: bool,
        limits: QueueLimits,
        reopenable: bool,
        log: Option<(Box<dyn redb::StorageBackend>, u64, bool)>,
    ) -> Result<Self, QueueError> {
        let (ledger, incarnation) = load(&path, &db)?;
        let mut queue = Self {
            acked: AtomicU64::new(ledger.acked),
            ack_requested: AtomicU64::new(ledger.acked),
            tail: Mutex::new(Tail::empty(ledger.next_seq)),
            path,
            limits,
            incarnation: AtomicU64::new(incarnation),
            db: RwLock::new(Some(Arc::new(db))),
            writer: Mutex::new(Writer {
                ledger,
                log: log.map(|(file, capacity, appends)| Log {
                    file,
                    // Every logged batch must fit in the memory tail (see `read`).
                    capacity: capacity.min(TAIL_BYTES as u64 / 2),
                    appends,
                    pos: 0,
                    frame: Vec::new(),
                    unapplied: Vec::new(),
                }),
                scratch: Vec::new(),
                pending: Vec::new(),
                dirty: false,
            }),
            poisoned: AtomicBool::new(false),
            repaired_on_open: repaired,
            replayed_on_open: 0,
            reopenable,
        };
        let replayed = queue.replay(&mut queue.lock())?;
        queue.replayed_on_open = replayed;
        Ok(queue)
    }

    /// Takes back the frames of the append log that redb does not hold (see `super::log`): into the
    /// ledger, the memory tail and the unapplied list, exactly as if they had just been appended, and the
    /// log goes on after them. Writes nothing, so a queue opens (and a poisoned one recovers) on a full
    /// disk too; the next write transaction moves them into redb. Returns the messages taken back.
    fn replay(&self, w: &mut Writer) -> Result<u64, QueueError> {
        let Some(log) = w.log.as_mut() else {
            return Ok(0);
        };
        let log_err = |e: io::Error| storage_error(&Self::log_path_of(&self.path), e.into());
        let len = log.file.len().map_err(log_err)?;
        let mut bytes = vec![0; usize::try_from(len).unwrap_or(usize::MAX)];
        log.file.read(0, &mut bytes).map_err(log_err)?;
        log.unapplied.clear();
        log.pos = 0;
        let incarnation = self.incarnation();
        let mut tail = Tail::empty(w.ledger.next_seq);
        let mut replayed = 0u64;
        for (end, frame) in log::frames(&bytes) {
            let count = frame.count();
            if frame.head.incarnation != incarnation || count == 0 {
                break;
            }
            let last = frame.head.first + count - 1;
            if last >= w.ledger.next_seq {
                if frame.head.first != w.ledger.next_seq {
                    break;
                }
                let removal = w.ledger.advance(frame.head.acked);
                w.pending.extend(removal.removed);
                w.ledger.dropped = w.ledger.dropped.max(frame.head.dropped);
                let meta = w
                    .ledger
                    .push(count, frame.record.len() as u64, frame.enqueued_ms());
                let record = Bytes::copy_from_slice(frame.record);
                tail.trim(w.ledger.acked);
                tail.push(meta.first, meta.last, record.clone());
                log.unapplied.push(Unapplied {
                    meta,
                    record,
                    marks: frame
                        .marks
                        .iter()
                        .map(|(k, d)| (k.to_vec(), *d, meta.enqueued_ms))
                        .collect(),
                });
                replayed += count;
            }
            // Otherwise written to redb before its last durable commit (or by a later commit that reached
            // the disk anyway): skipped, and the log goes on after it.
            log.pos = end as u64;
        }
        if replayed > 0 {
            tracing::info!(path = %self.path.display(), messages = replayed, "queue log replayed");
            w.dirty = true;
        }
        self.ack_requested
            .fetch_max(w.ledger.acked, Ordering::AcqRel);
        self.acked.fetch_max(w.ledger.acked, Ordering::AcqRel);
        *self.tail() = tail;
        Ok(replayed)
    }

    /// A random id given to this queue file when it was created. Seqs restart at 1 in a new file, so the
    /// hub keys its dedup state by (site, incarnation) and never mistakes a fresh queue's messages for
    /// replays.
    pub fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Acquire)
    }

    /// Starts a new incarnation whose seqs all lie above `floor`, in one durable commit: a new random
    /// incarnation id, every stored batch (and the watermark and next seq) moved up so the first unacked
    /// entry gets `floor + 1`. Returns the new incarnation; does nothing to the seqs if `floor` is at or
    /// below the watermark.
    ///
    /// Why: the hub remembers the highest seq it has seen per (site, incarnation). If this file was
    /// restored from a backup or a VM snapshot, the hub has seen seqs this copy never wrote, and new
    /// messages would reuse them: the hub would drop them as duplicates (and consumers that drop by
    /// `meshbridge-id`, `<site>/<seq>`, would too). Moving everything above the hub's mark gives every
    /// message still stored an id never used before. What the restored copy held from before the backup
    /// may then reach consumers a second time, under a new id: duplicates bounded by that backlog, where
    /// the alternative is loss. The batches are rewritten under their new keys, so the cost is one copy of
    /// the backlog, once per restore.
    ///
    /// # Errors
    /// As any write; on error nothing changed.
    pub fn restart_above(&self, floor: u64) -> Result<u64, QueueError> {
        let mut w = self.lock();
        self.recover(&mut w)?;
        self.absorb(&mut w);
        if w.log.is_some() {
            // The shift below moves what redb holds; logged batches must be there first.
            self.write(&mut w, Durability::Immediate, false, |_, _| Ok(()))?;
        }
        let by = floor.saturating_sub(w.ledger.acked);
        let old_batches: Vec<BatchMeta> = w.ledger.batches.iter().copied().collect();
        let mut shifted = w.ledger.clone();
        shifted.shift(by);
        let incarnation = loop {
            let id = random_u64();
            if id != self.incarnation() {
                break id;
            }
        };
        let previous = std::mem::replace(&mut w.ledger, shifted);
        let result = self.write(&mut w, Durability::Immediate, false, |t, _| {
            if by > 0 {
                // Highest first, so a moved batch never lands on a key not yet moved.
                for b in old_batches.iter().rev() {
                    let record = t
                        .batches
                        .remove(b.first)?
                        .map(|v| v.value().to_vec())
                        .unwrap_or_default();
                    t.index.remove(b.first)?;
                    t.batches.insert(b.first + by, record.as_slice())?;
                    t.index
                        .insert(b.first + by, (b.last + by, b.bytes, b.enqueued_ms))?;
                }
            }
            t.meta.insert("incarnation", incarnation)?;
            Ok(())
        });
        if let Err(e) = result {
            w.ledger = previous;
            return Err(e);
        }
        // Every seq moved: what was requested and what the tail holds refer to the old ones.
        self.ack_requested.store(w.ledger.acked, Ordering::Release);
        self.acked.store(w.ledger.acked, Ordering::Release);
        *self.tail() = Tail::empty(w.ledger.next_seq);
        self.incarnation.store(incarnation, Ordering::Release);
        Ok(incarnation)
    }

    /// Whether opening the file ran redb's automatic crash recovery (the previous process did not close it:
    /// `kill -9`, power cut). A cleanly closed queue never needs it; the model test checks that.
    pub fn repaired_on_open(&self) -> bool {
        self.repaired_on_open
    }

    /// How many messages opening the queue took back from its append log: appends that were durable
    /// only there when the previous process stopped without closing the queue (`kill -9`, power cut).
    pub fn replayed_on_open(&self) -> u64 {
        self.replayed_on_open
    }

    /// The queue file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends like [`Queue::append`], writing `marks` in the same transaction.
    ///
    /// # Errors
    /// As [`Queue::append`]; on error neither the batch nor the marks are written.
    pub fn append_marked<B: AsRef<[u8]>>(
        &self,
        bodies: &[B],
        marks: &[Mark<'_>],
        now_ms: u64,
    ) -> Result<AppendOutcome, QueueError> {
        self.append_with(bodies, marks, now_ms)
    }

    /// The digest marked for `key`, if any (see [`Mark`]).
    ///
    /// # Errors
    /// A storage error reading the file.
    pub fn mark(&self, key: &[u8]) -> Result<Option<u64>, QueueError> {
        {
            let w = self.lock();
            let logged = w.log.iter().flat_map(|l| l.unapplied.iter().rev());
            for u in logged {
                if let Some((_, digest, _)) = u.marks.iter().rev().find(|(k, _, _)| k == key) {
                    return Ok(Some(*digest));
                }
            }
        }
        let db = self.db()?;
        let err = |e: redb::Error| self.error(e);
        let txn = db.begin_read().map_err(|e| err(e.into()))?;
        let table = match txn.open_table(MARKS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(err(e.into())),
        };
        Ok(table
            .get(key)
            .map_err(|e| err(e.into()))?
            .map(|v| v.value().0))
    }

    /// Deletes marks written before `before_ms` (unix ms); returns how many. Publishers resend within
    /// seconds of a lost acknowledgement, so old marks only take space.
    ///
    /// # Errors
    /// As any write.
    pub fn forget_marks(&self, before_ms: u64) -> Result<u64, QueueError> {
        let mut w = self.lock();
        self.recover(&mut w)?;
        self.absorb(&mut w);
        let mut forgotten = 0;
        self.write(&mut w, Durability::None, true, |t, _| {
            let Some(marks) = t.marks.as_mut() else {
                return Ok(());
            };
            let old: Vec<Vec<u8>> = marks
                .iter()?
                .filter_map(Result::ok)
                .filter(|(_, v)| v.value().1 < before_ms)
                .map(|(k, _)| k.value().to_vec())
                .collect();
            for key in &old {
                marks.remove(key.as_slice())?;
            }
            forgotten = old.len() as u64;
            Ok(())
        })?;
        Ok(forgotten)
    }

    fn append_with<B: AsRef<[u8]>>(
        &self,
        bodies: &[B],
        marks: &[Mark<'_>],
        now_ms: u64,
    ) -> Result<AppendOutcome, QueueError> {
        let mut w = self.lock();
        self.recover(&mut w)?;
        self.absorb(&mut w);
        if bodies.is_empty() {
            return Ok(w.ledger.empty_append());
        }
        let cost = batch_cost(bodies);
        let frame_len = log::frame_len(cost, marks);
        let logged = match &w.log {
            Some(log) if log.appends && frame_len <= log.capacity => {
                Some(log.pos + frame_len > log.capacity)
            }
            _ => None,
        };
        if logged == Some(true) {
            // The log is full: move what it holds into redb, durably, and start it over.
            self.write(&mut w, Durability::Immediate, false, |_, _| Ok(()))?;
        }
        let removal = w.ledger.make_room(cost, &self.limits)?;
        let meta = w.ledger.push(bodies.len() as u64, cost, now_ms);
        let dropped = removal.passed;
        let record = if logged.is_some() {
            self.append_logged(&mut w, removal.removed, meta, bodies, marks, now_ms)?
        } else {
            self.write(
                &mut w,
                Durability::Immediate,
                !marks.is_empty(),
                |t, scratch| {
                    t.remove(&removal)?;
                    scratch.clear();
                    encode_record(scratch, bodies, now_ms);
                    debug_assert_eq!(scratch.len() as u64, cost);
                    t.batches.insert(meta.first, scratch.as_slice())?;
                    t.index
                        .insert(meta.first, (meta.last, meta.bytes, meta.enqueued_ms))?;
                    if let Some(table) = t.marks.as_mut() {
                        for m in marks {
                            table.insert(m.key, (m.digest, now_ms))?;
                        }
                    }
                    Ok(())
                },
            )?;
            Bytes::copy_from_slice(&w.scratch)
        };
        self.acked.fetch_max(w.ledger.acked, Ordering::AcqRel);
        {
            let mut tail = self.tail();
            tail.trim(w.ledger.acked);
            tail.push(meta.first, meta.last, record);
        }
        Ok(AppendOutcome {
            first_seq: meta.first,
            last_seq: meta.last,
            dropped,
        })
    }

    /// Writes the batch `meta` (already in the ledger) as one frame of the append log and syncs it; the
    /// batches `removed` (by drop-oldest) are deleted from redb by the next write transaction. Returns the
    /// batch record. On failure the queue is poisoned, so the ledger is reloaded from disk.
    fn append_logged<B: AsRef<[u8]>>(
        &self,
        w: &mut Writer,
        removed: Vec<BatchMeta>,
        meta: BatchMeta,
        bodies: &[B],
        marks: &[Mark<'_>],
        now_ms: u64,
    ) -> Result<Bytes, QueueError> {
        if !removed.is_empty() {
            w.pending.extend(removed);
            w.dirty = true;
        }
        let head = FrameHead {
            incarnation: self.incarnation(),
            first: meta.first,
            acked: w.ledger.acked,
            dropped: w.ledger.dropped,
        };
        let Some(log) = w.log.as_mut() else {
            unreachable!("append_logged is only called with a log");
        };
        let at = log::begin_frame(&mut log.frame, head, marks);
        encode_record(&mut log.frame, bodies, now_ms);
        log::seal_frame(&mut log.frame);
        let written = log
            .file
            .write(log.pos, &log.frame)
            .and_then(|()| log.file.sync_data());
        if let Err(e) = written {
            self.poisoned.store(true, Ordering::Release);
            return Err(storage_error(&Self::log_path_of(&self.path), e.into()));
        }
        log.pos += log.frame.len() as u64;
        let record = Bytes::copy_from_slice(&log.frame[at..]);
        debug_assert_eq!(record.len() as u64, meta.bytes);
        log.unapplied.push(Unapplied {
            meta,
            record: record.clone(),
            marks: marks
                .iter()
                .map(|m| (m.key.to_vec(), m.digest, now_ms))
                .collect(),
        });
        Ok(record)
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        // Every change to the tail is a handful of field writes that cannot panic half-way.
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the latest acknowledgement into the ledger; the batches it passed are deleted by the next
    /// write transaction.
    fn absorb(&self, w: &mut Writer) {
        let requested = self.ack_requested.load(Ordering::Acquire);
        if requested > w.ledger.acked {
            let removal = w.ledger.advance(requested);
            w.pending.extend(removal.removed);
            w.dirty = true;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        // Every mutation either completes or poisons the writer (which reloads from disk), so the state
        // behind a panicked holder is still consistent.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn db(&self) -> Result<Arc<Database>, QueueError> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| self.error(redb::StorageError::DatabaseClosed.into()))
    }

    /// Reopens the file after a failed write and reloads the ledger from what is committed.
    fn recover(&self, w: &mut Writer) -> Result<(), QueueError> {
        if !self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        if !self.reopenable {
            return Err(QueueError::Format {
                path: self.path.display().to_string(),
                detail:
                    "a queue on a custom storage backend cannot reopen itself after a failed write",
            });
        }
        let db = {
            let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
            // Close the poisoned handle first: redb locks the file, so a second handle cannot open it. A
            // reader still holding the old Arc keeps it open; the open below then fails, the writer stays
            // poisoned and the next call retries.
            drop(slot.take());
            let (db, _) = open_db(&self.path, None::<redb::backends::InMemoryBackend>)?;
            let db = Arc::new(db);
            *slot = Some(Arc::clone(&db));
            db
        };
        let (ledger, _) = load(&self.path, &db)?;
        self.acked.store(ledger.acked, Ordering::Release);
        *self.tail() = Tail::empty(ledger.next_seq);
        w.ledger = ledger;
        // Deletions not written are gone with the failed handle; the acknowledgement is taken in again.
        w.pending.clear();
        w.dirty = false;
        // What the log holds beyond redb's last durable commit comes back from the log.
        self.replay(w)?;
        self.absorb(w);
        self.acked.fetch_max(w.ledger.acked, Ordering::AcqRel);
        self.poisoned.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), "queue reopened after a failed write");
        Ok(())
    }

    /// Runs one write transaction; on failure poisons the writer so the next call starts from disk.
    fn write(
        &self,
        w: &mut Writer,
        durability: Durability,
        with_marks: bool,
        f: impl FnOnce(&mut Tables<'_>, &mut Vec<u8>) -> Result<(), redb::Error>,
    ) -> Result<(), QueueError> {
        let db = self.db()?;
        let durable = matches!(durability, Durability::Immediate);
        let Writer {
            ledger,
            log,
            scratch,
            pending,
            ..
        } = w;
        let unapplied = log.as_ref().map_or(&[][..], |l| l.unapplied.as_slice());
        let with_marks = with_marks || unapplied.iter().any(|u| !u.marks.is_empty());
        let result = (|| -> Result<(), redb::Error> {
            let mut txn = db.begin_write()?;
            txn.set_durability(durability)?;
            {
                let mut t = Tables {
                    batches: txn.open_table(BATCHES)?,
                    index: txn.open_table(INDEX)?,
                    meta: txn.open_table(META)?,
                    marks: if with_marks {
                        Some(txn.open_table(MARKS)?)
                    } else {
                        None
                    },
                };
                for b in pending.iter() {
                    t.batches.remove(b.first)?;
                    t.index.remove(b.first)?;
                }
                for u in unapplied {
                    // A batch the watermark already passed is not written at all; its marks are, since a
                    // mark outlives its message (see [`Mark`]).
                    if u.meta.last > ledger.acked {
                        let m = u.meta;
                        t.batches.insert(m.first, &u.record[..])?;
                        t.index.insert(m.first, (m.last, m.bytes, m.enqueued_ms))?;
                    }
                    if let Some(table) = t.marks.as_mut() {
                        for (key, digest, ms) in &u.marks {
                            table.insert(key.as_slice(), (*digest, *ms))?;
                        }
                    }
                }
                f(&mut t, scratch)?;
                t.write_ledger(ledger)?;
            }
            txn.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                w.pending.clear();
                w.dirty = false;
                if let Some(log) = w.log.as_mut() {
                    log.unapplied.clear();
                    if durable {
                        log.pos = 0;
                    }
                }
                Ok(())
            }
            Err(e) => {
                self.poisoned.store(true, Ordering::Release);
                Err(self.error(e))
            }
        }
    }

    /// Writes an acknowledgement no write transaction has taken yet: on close, so a clean restart does
    /// not send again what the hub already has.
    fn write_acks(&self, w: &mut Writer) -> Result<(), QueueError> {
        self.absorb(w);
        let log_used = w.log.as_ref().is_some_and(|l| l.pos > 0);
        if !(w.dirty || log_used) || self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        self.write(w, Durability::Immediate, false, |_, _| Ok(()))
    }

    fn error(&self, e: redb::Error) -> QueueError {
        storage_error(&self.path, e)
    }
}

impl Drop for RedbQueue {
    fn drop(&mut self) {
        let w = self.writer.get_mut().unwrap_or_else(|p| p.into_inner());
        let mut w = std::mem::replace(
            w,
            Writer {
                ledger: Ledger::new(),
                log: None,
                scratch: Vec::new(),
                pending: Vec::new(),
                dirty: false,
            },
        );
        if let Err(e) = self.write_acks(&mut w) {
            // Nothing is lost: the hub has these messages, and its dedup drops them when they come again.
            tracing::warn!(path = %self.path.display(), error = %e, "acknowledgements not written on close; the messages will be sent again");
        }
    }
}

/// The three tables open in one write transaction.
struct Tables<'t> {
    batches: redb::Table<'t, u64, &'static [u8]>,
    index: redb::Table<'t, u64, (u64, u64, u64)>,
    meta: redb::Table<'t, &'static str, u64>,
    /// Opened only by the writes that need it (most appends carry no marks).
    marks: Option<redb::Table<'t, &'static [u8], (u64, u64)>>,
}

impl Tables<'_> {
    fn remove(&mut self, removal: &Removal) -> Result<(), redb::Error> {
        for b in &removal.removed {
            self.batches.remove(b.first)?;
            self.index.remove(b.first)?;
        }
        Ok(())
    }

    fn write_ledger(&mut self, l: &Ledger) -> Result<(), redb::Error> {
        self.meta.insert("next_seq", l.next_seq)?;
        self.meta.insert("acked", l.acked)?;
        self.meta.insert("dropped", l.dropped)?;
        self.meta.insert("expired", l.expired)?;
        Ok(())
    }
}

/// Opens the file at `path`, or the given backend, with the queue's builder settings; says whether redb
/// ran its crash recovery.
fn open_db(
    path: &Path,
    backend: Option<impl redb::StorageBackend>,
) -> Result<(Database, bool), QueueError> {
    let repaired = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&repaired);
    let mut builder = Database::builder();
    builder
        .set_cache_size(CACHE_BYTES)
        .set_repair_callback(move |_| flag.store(true, Ordering::Relaxed));
    let db = match backend {
        None => builder.create(path),
        Some(backend) => builder.create_with_backend(backend),
    }
    .map_err(|e| storage_error(path, e.into()))?;
    Ok((db, repaired.load(Ordering::Relaxed)))
}

/// Reads the ledger (and the incarnation, created on first open) from the file.
fn load(path: &Path, db: &Database) -> Result<(Ledger, u64), QueueError> {
    let err = |e: redb::Error| storage_error(path, e);
    let txn = db.begin_write().map_err(|e| err(e.into()))?;
    let mut ledger = Ledger::new();
    let incarnation;
    {
        let mut meta = txn.open_table(META).map_err(|e| err(e.into()))?;
        let get =
            |meta: &redb::Table<'_, &str, u64>, key: &str| -> Result<Option<u64>, QueueError> {
                Ok(meta.get(key).map_err(|e| err(e.into()))?.map(|v| v.value()))
            };
        match get(&meta, "format")? {
            None => {
                meta.insert("format", FORMAT).map_err(|e| err(e.into()))?;
                meta.insert("incarnation", random_u64())
                    .map_err(|e| err(e.into()))?;
            }
            Some(FORMAT) => {}
            Some(_) => {
                return Err(QueueError::Format {
                    path: path.display().to_string(),
                    detail: "unknown format version",
                })
            }
        }
        incarnation = get(&meta, "incarnation")?.ok_or(QueueError::Format {
            path: path.display().to_string(),
            detail: "no incarnation",
        })?;
        ledger.next_seq = get(&meta, "next_seq")?.unwrap_or(1);
        ledger.acked = get(&meta, "acked")?.unwrap_or(0);
        ledger.dropped = get(&meta, "dropped")?.unwrap_or(0);
        ledger.expired = get(&meta, "expired")?.unwrap_or(0);
        txn.open_table(BATCHES).map_err(|e| err(e.into()))?;
        let index = txn.open_table(INDEX).map_err(|e| err(e.into()))?;
        for row in index.iter().map_err(|e| err(e.into()))? {
            let (k, v) = row.map_err(|e| err(e.into()))?;
            let (last, bytes, enqueued_ms) = v.value();
            ledger.bytes += bytes;
            ledger.batches.push_back(BatchMeta {
                first: k.value(),
                last,
                bytes,
                enqueued_ms,
            });
        }
    }
    if ledger.acked >= ledger.next_seq
        || ledger
            .batches
            .back()
            .is_some_and(|b| b.last >= ledger.next_seq)
    {
        return Err(QueueError::Format {
            path: path.display().to_string(),
            detail: "inconsistent sequence bookkeeping",
        });
    }
    txn.commit().map_err(|e| err(e.into()))?;
    Ok((ledger, incarnation))
}

pub(super) fn storage_error(path: &Path, e: redb::Error) -> QueueError {
    let path = path.display().to_string();
    let full = match &e {
        redb::Error::Io(io) => io.kind() == io::ErrorKind::StorageFull,
        _ => false,
    };
    if full {
        QueueError::DiskFull { path }
    } else {
        QueueError::Storage { path, source: e }
    }
}

/// A random id. The std hasher is seeded from the OS's randomness per process; that is all an incarnation
/// needs (it must differ from the file it replaces, not resist an adversary).
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

/// Appends the batch record of `bodies` to `out`.
fn encode_record<B: AsRef<[u8]>>(out: &mut Vec<u8>, bodies: &[B], now_ms: u64) {
    out.push(FORMAT as u8);
    out.extend_from_slice(&now_ms.to_le_bytes());
    out.extend_from_slice(&(bodies.len() as u32).to_le_bytes());
    for b in bodies {
        let b = b.as_ref();
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
}

/// What a read collects: the entries so far and the limits they stop at.
struct Collect {
    out: Vec<Entry>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl Collect {
    fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self {
            out: Vec::new(),
            bytes: 0,
            max_messages,
            max_bytes,
        }
    }

    /// Takes the messages of one record (its first seq `first`) with seq >= `start`, within the limits.
    /// Returns false once a limit is reached. A record that does not parse means the file is corrupt: redb
    /// checksums its pages, and the log its frames, so this only happens if a bug wrote it.
    fn record(&mut self, first: u64, record: Bytes, start: u64) -> Result<bool, &'static str> {
        if record.len() < BATCH_HEADER_LEN || u64::from(record[0]) != FORMAT {
            return Err("batch record header");
        }
        let count = u32::from_le_bytes(record[9..13].try_into().map_err(|_| "count")?);
        let mut pos = BATCH_HEADER_LEN;
        for i in 0..u64::from(count) {
            let len_end = pos + ENTRY_HEADER_LEN;
            let len = record
                .get(pos..len_end)
                .and_then(|s| s.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or("entry length")? as usize;
            let end = len_end.checked_add(len).ok_or("entry length")?;
            if end > record.len() {
                return Err("entry body");
            }
            let seq = first + i;
            if seq >= start {
                if self.out.len() >= self.max_messages
                    || (!self.out.is_empty() && self.bytes + len > self.max_bytes)
                {
                    return Ok(false);
                }
                self.bytes += len;
                self.out.push(Entry {
                    seq,
                    body: record.slice(len_end..end),
                });
            }
            pos = end;
        }
        Ok(true)
    }
}

impl Queue for RedbQueue {
    fn append<B: AsRef<[u8]>>(
        &self,
        bodies: &[B],
        now_ms: u64,
    ) -> Result<AppendOutcome, QueueError> {
        self.append_with(bodies, &[], now_ms)
    }

    fn read(
        &self,
        from: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, QueueError> {
        if max_messages == 0 {
            return Ok(Vec::new());
        }
        if self.poisoned.load(Ordering::Acquire) {
            let mut w = self.lock();
            self.recover(&mut w)?;
        }
        if let Some(entries) = self.read_cached(from, max_messages, max_bytes) {
            return Ok(entries);
        }
        // Batches only the append log holds are not in redb but always in the memory tail (the log is
        // smaller than the tail, and both keep the latest appends). Holding the writer lock keeps the two
        // parts apart while reading: redb below the first of them, the tail from there on.
        let w = self.lock();
        let logged_from = w
            .log
            .as_ref()
            .and_then(|l| l.unapplied.first())
            .map_or(u64::MAX, |u| u.meta.first);
        let start = from.max(self.acked.load(Ordering::Acquire) + 1);
        let db = self.db()?;
        let err = |e: redb::Error| self.error(e);
        let txn = db.begin_read().map_err(|e| err(e.into()))?;
        let index = txn.open_table(INDEX).map_err(|e| err(e.into()))?;
        let batches = txn.open_table(BATCHES).map_err(|e| err(e.into()))?;
        // The record holding `start` is the last one keyed at or below it (if it reaches that far).
        let first_key = match index
            .range(..=start)
            .map_err(|e| err(e.into()))?
            .next_back()
        {
            Some(row) => row.map_err(|e| err(e.into()))?.0.value(),
            None => start,
        };
        let corrupt = |detail| QueueError::Format {
            path: self.path.display().to_string(),
            detail,
        };
        let mut c = Collect::new(max_messages, max_bytes);
        for row in batches
            .range(first_key..logged_from)
            .map_err(|e| err(e.into()))?
        {
            let (k, v) = row.map_err(|e| err(e.into()))?;
            let record = Bytes::copy_from_slice(v.value());
            if !c.record(k.value(), record, start).map_err(corrupt)? {
                return Ok(c.out);
            }
        }
        if logged_from != u64::MAX && c.out.len() < max_messages {
            let next = c.out.last().map_or(start, |e| e.seq + 1).max(logged_from);
            let tail = self.tail();
            for r in tail.records.iter().filter(|r| r.last >= next) {
                if !c.record(r.first, r.record.clone(), next).map_err(corrupt)? {
                    break;
                }
            }
        }
        drop(w);
        Ok(c.out)
    }

    /// Moves the watermark in memory only, without waiting for the writer (see the module docs): never
    /// blocks on I/O, so async code may call it directly. Never fails.
    fn ack_upto(&self, seq: u64) -> Result<u64, QueueError> {
        let mut tail = self.tail();
        let upto = seq.min(tail.end - 1);
        let before = self.acked.fetch_max(upto, Ordering::AcqRel);
        if upto <= before {
            return Ok(0);
        }
        self.ack_requested.fetch_max(upto, Ordering::AcqRel);
        tail.trim(upto);
        Ok(upto - before)
    }

    fn expire(&self, now_ms: u64) -> Result<u64, QueueError> {
        let mut w = self.lock();
        self.recover(&mut w)?;
        self.absorb(&mut w);
        let removal = w.ledger.expire(now_ms, &self.limits);
        if removal.passed == 0 {
            return Ok(0);
        }
        // Durable: an expiry is a decision to drop data, and the counters must not go back after a crash.
        self.write(&mut w, Durability::Immediate, false, |t, _| {
            t.remove(&removal)
        })?;
        self.acked.fetch_max(w.ledger.acked, Ordering::AcqRel);
        self.tail().trim(w.ledger.acked);
        Ok(removal.passed)
    }

    fn stats(&self) -> QueueStats {
        let mut stats = {
            let mut w = self.lock();
            self.absorb(&mut w);
            w.ledger.stats()
        };
        stats.file_bytes = std::fs::metadata(&self.path).map_or(0, |m| m.len())
            + std::fs::metadata(Self::log_path_of(&self.path)).map_or(0, |m| m.len());
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::FullPolicy;

    fn limits() -> QueueLimits {
        QueueLimits {
            max_bytes: 1 << 20,
            max_age: None,
            full_policy: FullPolicy::Block,
        }
    }

    #[test]
    fn reads_right_behind_appends_come_from_memory_and_a_backlog_from_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.redb");
        let q = RedbQueue::open(&path, limits()).expect("open");
        q.append(&[b"a".as_slice(), b"b"], 1).expect("append");
        q.append(&[b"c".as_slice()], 2).expect("append");
        let cached = q.read_cached(1, 10, usize::MAX).expect("held in memory");
        let seqs: Vec<u64> = cached.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(&cached[2].body[..], b"c");
        assert_eq!(q.read_cached(4, 10, usize::MAX), Some(vec![]), "caught up");

        assert_eq!(q.ack_upto(2).expect("ack"), 2);
        assert_eq!(
            (q.acked(), q.depth()),
            (2, 1),
            "seen at once, before any write"
        );
        let after_ack = q.read_cached(1, 10, usize::MAX).expect("held in memory");
        assert_eq!(after_ack.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
        drop(q);

        // Reopened: the acknowledgement was written on close; what is left is a backlog on disk.
        let q = RedbQueue::open(&path, limits()).expect("reopen");
        assert_eq!((q.acked(), q.depth()), (2, 1));
        assert_eq!(
            q.read_cached(3, 10, usize::MAX),
            None,
            "not in memory after a restart"
        );
        let from_file = q.read(1, 10, usize::MAX).expect("read");
        assert_eq!(from_file.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
        // A new append is held; the backlog before it still comes from the file.
        q.append(&[b"d".as_slice()], 3).expect("append");
        assert_eq!(q.read_cached(3, 10, usize::MAX), None);
        let d = q.read_cached(4, 10, usize::MAX).expect("held in memory");
        assert_eq!(&d[0].body[..], b"d");
    }

    #[test]
    fn acknowledged_batches_are_deleted_by_the_next_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = RedbQueue::open(dir.path().join("q.redb"), limits()).expect("open");
        q.append(&[b"a".as_slice()], 1).expect("append");
        q.append(&[b"b".as_slice()], 1).expect("append");
        q.ack_upto(1).expect("ack");
        {
            let w = q.lock();
            assert_eq!(w.ledger.acked, 0, "the ledger has not taken the ack in yet");
        }
        q.append(&[b"c".as_slice()], 1).expect("append");
        let w = q.lock();
        assert_eq!(w.ledger.acked, 1);
        assert!(w.pending.is_empty() && !w.dirty, "written with the append");
        drop(w);
        let db = q.db().expect("db");
        let txn = db.begin_read().expect("read txn");
        let index = txn.open_table(INDEX).expect("index");
        let keys: Vec<u64> = index
            .iter()
            .expect("iter")
            .map(|r| r.expect("row").0.value())
            .collect();
        assert_eq!(keys, [2, 3], "the acknowledged batch is gone from the file");
    }

    #[test]
    fn the_tail_stays_within_its_bound_and_contiguous() {
        let mut tail = Tail::empty(1);
        let record = Bytes::from(vec![0u8; TAIL_BYTES / 3]);
        for i in 0..5 {
            tail.push(1 + i * 10, 10 + i * 10, record.clone());
            assert!(tail.bytes <= TAIL_BYTES);
        }
        assert_eq!(tail.end, 51);
        assert_eq!(tail.records.len(), 3);
        assert!(tail
            .records
            .iter()
            .zip(tail.records.iter().skip(1))
            .all(|(a, b)| b.first == a.last + 1));
        tail.push(99, 99, record);
        assert!(
            tail.records.is_empty() && tail.end == 100,
            "a gap starts over"
        );
    }
}
