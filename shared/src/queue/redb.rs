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
//! Appends commit with `Durability::Immediate`, so an append that returned survives `kill -9` and power
//! loss. After a crash, opening the file runs redb's automatic recovery (a checksum walk that rebuilds the
//! allocator state) before the queue is used; nobody has to repair anything by hand. redb's quick-repair
//! mode would skip that walk, but it was measured here at 16x the cost per commit (141 vs 2,250 commits/s
//! at batch 1, 7.8k vs 89k msg/s at batch 64), which would break the agent's latency at low rates; a
//! recovery walk once per crash is the better trade. Acknowledgements and deletions commit with
//! `Durability::None`: the next append's commit makes them durable. A crash can therefore bring back
//! messages the hub had already acknowledged; they are sent again and the hub's dedup drops them. That
//! trade keeps one fsync per appended batch instead of two, and never loses anything.
//!
//! # Failure
//! Any failed write transaction (disk full included) leaves the file as of the last commit. redb then
//! refuses further writes on that handle (`PreviousIo`), so the queue marks itself poisoned and, on the
//! next call, reopens the file and reloads its state from disk: once space is freed, appends succeed again
//! without the caller reopening anything.

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

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
    /// The watermark as of the last commit, for readers (who do not take the writer lock).
    acked: AtomicU64,
    /// Set when a write transaction failed: redb's handle then refuses every operation (`PreviousIo`) and
    /// the ledger may be ahead of the disk, so both are reloaded before the next operation, read or write.
    poisoned: AtomicBool,
    repaired_on_open: bool,
    /// False on a custom storage backend, which cannot be reopened by path after a failed write.
    reopenable: bool,
}

#[derive(Debug)]
struct Writer {
    ledger: Ledger,
    /// Reused record buffer, so an append does not allocate.
    scratch: Vec<u8>,
}

impl RedbQueue {
    /// Messages stored and not acknowledged: [`QueueStats::depth`] without the file-size system call
    /// [`Queue::stats`] makes, for callers that ask on every turn of a loop.
    pub fn depth(&self) -> u64 {
        self.lock().ledger.stats().depth
    }

    /// The acknowledged watermark ([`QueueStats::acked`]) without a system call.
    pub fn acked(&self) -> u64 {
        self.lock().ledger.stats().acked
    }

    /// Opens the queue at `path`, creating it if it does not exist.
    pub fn open(path: impl AsRef<Path>, limits: QueueLimits) -> Result<Self, QueueError> {
        let path = path.as_ref().to_path_buf();
        let (db, repaired) = open_db(&path, None::<redb::backends::InMemoryBackend>)?;
        Self::with_db(path, db, repaired, limits, true)
    }

    /// Opens the queue on a custom redb storage backend; `label` names it in errors. For tests that
    /// model the disk itself (a power cut that loses unsynced writes: `shared/tests/queue_power_cut.rs`).
    /// After a failed write such a queue cannot reopen itself, so every later call fails.
    pub fn open_on_backend(
        backend: impl redb::StorageBackend,
        label: impl AsRef<Path>,
        limits: QueueLimits,
    ) -> Result<Self, QueueError> {
        let path = label.as_ref().to_path_buf();
        let (db, repaired) = open_db(&path, Some(backend))?;
        Self::with_db(path, db, repaired, limits, false)
    }

    fn with_db(
        path: PathBuf,
        db: Database,
        repaired: bool,
        limits: QueueLimits,
        reopenable: bool,
    ) -> Result<Self, QueueError> {
        let (ledger, incarnation) = load(&path, &db)?;
        Ok(Self {
            acked: AtomicU64::new(ledger.acked),
            path,
            limits,
            incarnation: AtomicU64::new(incarnation),
            db: RwLock::new(Some(Arc::new(db))),
            writer: Mutex::new(Writer {
                ledger,
                scratch: Vec::new(),
            }),
            poisoned: AtomicBool::new(false),
            repaired_on_open: repaired,
            reopenable,
        })
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
        self.acked.store(w.ledger.acked, Ordering::Release);
        self.incarnation.store(incarnation, Ordering::Release);
        Ok(incarnation)
    }

    /// Whether opening the file ran redb's automatic crash recovery (the previous process did not close it:
    /// `kill -9`, power cut). A cleanly closed queue never needs it; the model test checks that.
    pub fn repaired_on_open(&self) -> bool {
        self.repaired_on_open
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
        if bodies.is_empty() {
            return Ok(w.ledger.empty_append());
        }
        let cost = batch_cost(bodies);
        let removal = w.ledger.make_room(cost, &self.limits)?;
        let meta = w.ledger.push(bodies.len() as u64, cost, now_ms);
        self.write(
            &mut w,
            Durability::Immediate,
            !marks.is_empty(),
            |t, scratch| {
                t.remove(&removal)?;
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
        self.acked.store(w.ledger.acked, Ordering::Release);
        Ok(AppendOutcome {
            first_seq: meta.first,
            last_seq: meta.last,
            dropped: removal.passed,
        })
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
        w.ledger = ledger;
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
                f(&mut t, &mut w.scratch)?;
                t.write_ledger(&w.ledger)?;
            }
            txn.commit()?;
            Ok(())
        })();
        result.map_err(|e| {
            self.poisoned.store(true, Ordering::Release);
            self.error(e)
        })
    }

    fn error(&self, e: redb::Error) -> QueueError {
        storage_error(&self.path, e)
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

fn encode_record<B: AsRef<[u8]>>(out: &mut Vec<u8>, bodies: &[B], now_ms: u64) {
    out.clear();
    out.push(FORMAT as u8);
    out.extend_from_slice(&now_ms.to_le_bytes());
    out.extend_from_slice(&(bodies.len() as u32).to_le_bytes());
    for b in bodies {
        let b = b.as_ref();
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
}

/// Appends the messages of one record with seq >= `start` to `out`, within the limits. Returns false once a
/// limit is reached. A record that does not parse means the file is corrupt: redb checksums its pages, so
/// this only happens if a bug wrote it.
fn decode_record(
    first: u64,
    record: Bytes,
    start: u64,
    out: &mut Vec<Entry>,
    bytes: &mut usize,
    max_messages: usize,
    max_bytes: usize,
) -> Result<bool, &'static str> {
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
            if out.len() >= max_messages || (!out.is_empty() && *bytes + len > max_bytes) {
                return Ok(false);
            }
            *bytes += len;
            out.push(Entry {
                seq,
                body: record.slice(len_end..end),
            });
        }
        pos = end;
    }
    Ok(true)
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
        let mut out = Vec::new();
        if max_messages == 0 {
            return Ok(out);
        }
        if self.poisoned.load(Ordering::Acquire) {
            let mut w = self.lock();
            self.recover(&mut w)?;
        }
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
        let mut bytes = 0;
        for row in batches.range(first_key..).map_err(|e| err(e.into()))? {
            let (k, v) = row.map_err(|e| err(e.into()))?;
            let record = Bytes::copy_from_slice(v.value());
            let more = decode_record(
                k.value(),
                record,
                start,
                &mut out,
                &mut bytes,
                max_messages,
                max_bytes,
            )
            .map_err(|detail| QueueError::Format {
                path: self.path.display().to_string(),
                detail,
            })?;
            if !more {
                break;
            }
        }
        Ok(out)
    }

    fn ack_upto(&self, seq: u64) -> Result<u64, QueueError> {
        let mut w = self.lock();
        self.recover(&mut w)?;
        let removal = w.ledger.advance(seq);
        if removal.passed == 0 {
            return Ok(0);
        }
        self.write(&mut w, Durability::None, false, |t, _| t.remove(&removal))?;
        self.acked.store(w.ledger.acked, Ordering::Release);
        Ok(removal.passed)
    }

    fn expire(&self, now_ms: u64) -> Result<u64, QueueError> {
        let mut w = self.lock();
        self.recover(&mut w)?;
        let removal = w.ledger.expire(now_ms, &self.limits);
        if removal.passed == 0 {
            return Ok(0);
        }
        // Durable: an expiry is a decision to drop data, and the counters must not go back after a crash.
        self.write(&mut w, Durability::Immediate, false, |t, _| {
            t.remove(&removal)
        })?;
        self.acked.store(w.ledger.acked, Ordering::Release);
        Ok(removal.passed)
    }

    fn stats(&self) -> QueueStats {
        let mut stats = self.lock().ledger.stats();
        stats.file_bytes = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        stats
    }
}
