//! The dead-letter store: messages refused for good, kept with their reason so an operator can list and
//! replay them, instead of a refusal wedging everything behind it (resent forever) or losing it silently.
//!
//! # Why a file of its own, opened per operation
//! Refusals are rare (a cloud broker's ACL denies a topic, a message can never fit the path), and the
//! operator's `dead-letters list|replay` command must work while the program runs. redb locks its file
//! for one process, so the store is a small redb file beside the queue that the program opens only for the
//! moment it adds letters, and the command only for the moment it reads or removes them;
//! [`DeadLetters::open`] retries while the other side holds it.
//!
//! # On disk
//! `letters: u64 -> bytes`, keyed by an id that only grows (`meta.next_id`). A value is
//! `[seq u64 BE][at_ms u64 BE][reason_code u8][detail str16][body...]`, where the body is the envelope body
//! exactly as the queue stored it ([`crate::envelope::Envelope::decode_body`] reads it back). Every add
//! commits with `Durability::Immediate` before the caller lets the queue forget the message.
//!
//! # Bounds
//! At most [`DeadLetterLimits::max_letters`] letters and [`DeadLetterLimits::max_bytes`] bytes; adding
//! beyond either evicts the oldest letters, and the add reports how many, so the caller counts and logs
//! them. A refused message is already an exception; an unbounded store of them would let one bad
//! publisher fill the disk the queue needs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use redb::{Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::QueueError;

/// This file's schema version (`super::schema`).
const SCHEMA_VERSION: u64 = 1;
const LETTERS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("letters");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// seq -> id of the letter holding it: the same message filed twice (a refusal repeated after a crash, an
/// oversize entry met again after a reconnect) is kept once.
const BY_SEQ: TableDefinition<'_, u64, u64> = TableDefinition::new("by_seq");
const HEADER: usize = 8 + 8 + 1 + 2;

/// How much the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterLimits {
    /// Most letters kept.
    pub max_letters: u64,
    /// Most bytes of letters kept (headers and bodies).
    pub max_bytes: u64,
}

impl Default for DeadLetterLimits {
    /// 10,000 letters and 64 MiB: plenty to diagnose and replay a misconfiguration, small beside the queue.
    fn default() -> Self {
        Self {
            max_letters: 10_000,
            max_bytes: 64 << 20,
        }
    }
}

/// A message to file, with why it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeadLetter {
    /// Its seq in the queue it came from.
    pub seq: u64,
    /// An MQTT 5 reason code (0x87 not authorized, 0x95 packet too large, ...).
    pub reason_code: u8,
    /// What the refusing side said.
    pub detail: String,
    /// The envelope body, as the queue stored it.
    pub body: Bytes,
}

/// A filed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The store's id for it (what `replay` and `remove` take).
    pub id: u64,
    /// When it was filed (unix ms).
    pub at_ms: u64,
    /// The message and its reason.
    pub letter: NewDeadLetter,
}

/// The dead-letter store; see the module docs.
#[derive(Debug)]
pub struct DeadLetters {
    path: PathBuf,
    db: Database,
    limits: DeadLetterLimits,
}

impl DeadLetters {
    /// Opens (or creates) the store at `path`, waiting up to `wait` while another process has it open.
    ///
    /// # Errors
    /// [`QueueError::Storage`] (including "already open" after `wait`) or [`QueueError::DiskFull`].
    pub fn open(
        path: impl AsRef<Path>,
        limits: DeadLetterLimits,
        wait: Duration,
    ) -> Result<Self, QueueError> {
        let path = path.as_ref().to_path_buf();
        let deadline = std::time::Instant::now() + wait;
        let db = loop {
            match Database::create(&path) {
                Ok(db) => break db,
                Err(DatabaseError::DatabaseAlreadyOpen) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(super::redb::storage_error(&path, e.into())),
            }
        };
        let err = |e: redb::Error| super::redb::storage_error(&path, e);
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        super::schema::check_queue_file(&txn, SCHEMA_VERSION, &path)?;
        txn.commit().map_err(|e| err(e.into()))?;
        Ok(Self { path, db, limits })
    }

    /// Files `letters` at `now_ms` in one durable commit; returns how many old letters were evicted to
    /// stay within the limits. A letter whose seq is already filed is skipped.
    ///
    /// # Errors
    /// As any write; on error nothing was filed.
    pub fn add(&self, letters: &[NewDeadLetter], now_ms: u64) -> Result<u64, QueueError> {
        let err = |e: redb::Error| super::redb::storage_error(&self.path, e);
        let run = || -> Result<u64, redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            let mut evicted = 0;
            {
                let mut table = txn.open_table(LETTERS)?;
                let mut by_seq = txn.open_table(BY_SEQ)?;
                let mut meta = txn.open_table(META)?;
                let mut next_id = meta.get("next_id")?.map_or(1, |v| v.value());
                let mut count = meta.get("count")?.map_or(0, |v| v.value());
                let mut bytes = meta.get("bytes")?.map_or(0, |v| v.value());
                let mut value = Vec::new();
                for letter in letters {
                    if by_seq.get(letter.seq)?.is_some() {
                        continue;
                    }
                    by_seq.insert(letter.seq, next_id)?;
                    encode(&mut value, letter, now_ms);
                    table.insert(next_id, value.as_slice())?;
                    next_id += 1;
                    count += 1;
                    bytes += value.len() as u64;
                }
                while count > self.limits.max_letters || bytes > self.limits.max_bytes {
                    let Some((_, oldest)) = table.pop_first()? else {
                        break;
                    };
                    count -= 1;
                    bytes -= oldest.value().len() as u64;
                    if let Some(seq) = oldest.value().get(..8) {
                        let seq = u64::from_be_bytes(seq.try_into().unwrap_or_default());
                        by_seq.remove(seq)?;
                    }
                    evicted += 1;
                }
                meta.insert("next_id", next_id)?;
                meta.insert("count", count)?;
                meta.insert("bytes", bytes)?;
            }
            txn.commit()?;
            Ok(evicted)
        };
        run().map_err(err)
    }

    /// Every letter, oldest first.
    ///
    /// # Errors
    /// As any read; [`QueueError::Format`] for a value this version cannot read.
    pub fn list(&self) -> Result<Vec<DeadLetter>, QueueError> {
        let err = |e: redb::Error| super::redb::storage_error(&self.path, e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = match txn.open_table(LETTERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(e.into())),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| err(e.into()))? {
            let (k, v) = row.map_err(|e| err(e.into()))?;
            let letter = decode(k.value(), v.value()).ok_or_else(|| QueueError::Format {
                path: self.path.display().to_string(),
                detail: "unreadable dead letter",
            })?;
            out.push(letter);
        }
        Ok(out)
    }

    /// Removes the letters with these ids (unknown ids are ignored); returns how many were removed.
    ///
    /// # Errors
    /// As any write.
    pub fn remove(&self, ids: &[u64]) -> Result<u64, QueueError> {
        let err = |e: redb::Error| super::redb::storage_error(&self.path, e);
        let run = || -> Result<u64, redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            let mut removed = 0;
            {
                let mut table = txn.open_table(LETTERS)?;
                let mut by_seq = txn.open_table(BY_SEQ)?;
                let mut meta = txn.open_table(META)?;
                let mut count = meta.get("count")?.map_or(0, |v| v.value());
                let mut bytes = meta.get("bytes")?.map_or(0, |v| v.value());
                for id in ids {
                    if let Some(v) = table.remove(id)? {
                        removed += 1;
                        count -= 1;
                        bytes -= v.value().len() as u64;
                        if let Some(seq) = v.value().get(..8) {
                            by_seq
                                .remove(u64::from_be_bytes(seq.try_into().unwrap_or_default()))?;
                        }
                    }
                }
                meta.insert("count", count)?;
                meta.insert("bytes", bytes)?;
            }
            txn.commit()?;
            Ok(removed)
        };
        run().map_err(err)
    }
}

fn encode(out: &mut Vec<u8>, letter: &NewDeadLetter, now_ms: u64) {
    out.clear();
    out.put_u64(letter.seq);
    out.put_u64(now_ms);
    out.put_u8(letter.reason_code);
    // A detail longer than a u16 length is cut at a character boundary: it is for people, not machines.
    let mut end = letter.detail.len().min(usize::from(u16::MAX));
    while !letter.detail.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16(end as u16);
    out.put_slice(&letter.detail.as_bytes()[..end]);
    out.put_slice(&letter.body);
}

fn decode(id: u64, value: &[u8]) -> Option<DeadLetter> {
    if value.len() < HEADER {
        return None;
    }
    let mut v = value;
    let seq = v.get_u64();
    let at_ms = v.get_u64();
    let reason_code = v.get_u8();
    let len = usize::from(v.get_u16());
    let detail = std::str::from_utf8(v.get(..len)?).ok()?.to_owned();
    let body = Bytes::copy_from_slice(&v[len..]);
    Some(DeadLetter {
        id,
        at_ms,
        letter: NewDeadLetter {
            seq,
            reason_code,
            detail,
            body,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(seq: u64, len: usize) -> NewDeadLetter {
        NewDeadLetter {
            seq,
            reason_code: 0x87,
            detail: format!("not authorized ({seq})"),
            body: Bytes::from(vec![seq as u8; len]),
        }
    }

    /// A store from before schema versions opens with its letters and is stamped; a newer one is refused.
    #[test]
    fn older_files_migrate_and_newer_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dead.redb");
        let limits = DeadLetterLimits::default();
        {
            let store = DeadLetters::open(&path, limits, Duration::ZERO).expect("open");
            store.add(&[letter(7, 10)], 1_000).expect("add");
            super::super::schema::remove_version(&store.db).expect("as before versions");
        }
        {
            let store = DeadLetters::open(&path, limits, Duration::ZERO).expect("migrates");
            assert_eq!(store.list().expect("list").len(), 1, "the letter survived");
            assert_eq!(
                super::super::schema::version_of(&store.db).expect("read"),
                SCHEMA_VERSION
            );
            super::super::schema::force_version(&store.db, SCHEMA_VERSION + 1).expect("newer");
        }
        let err = DeadLetters::open(&path, limits, Duration::ZERO).expect_err("refused");
        assert!(matches!(err, QueueError::Schema { .. }), "{err}");
    }

    #[test]
    fn letters_round_trip_survive_reopen_and_are_removed_by_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dead.redb");
        let limits = DeadLetterLimits::default();
        {
            let store = DeadLetters::open(&path, limits, Duration::ZERO).expect("open");
            assert_eq!(store.list().expect("list"), Vec::new());
            assert_eq!(
                store
                    .add(&[letter(7, 10), letter(9, 0)], 1_000)
                    .expect("add"),
                0
            );
        }
        let store = DeadLetters::open(&path, limits, Duration::ZERO).expect("reopen");
        let all = store.list().expect("list");
        assert_eq!(
            all,
            vec![
                DeadLetter {
                    id: 1,
                    at_ms: 1_000,
                    letter: letter(7, 10)
                },
                DeadLetter {
                    id: 2,
                    at_ms: 1_000,
                    letter: letter(9, 0)
                },
            ]
        );
        // The same seq filed again is kept once.
        store.add(&[letter(7, 10)], 1_500).expect("add again");
        assert_eq!(store.list().expect("list").len(), 2);
        assert_eq!(store.remove(&[1, 42]).expect("remove"), 1);
        assert_eq!(store.list().expect("list").len(), 1);
        // Ids are never reused after a removal.
        store.add(&[letter(11, 1)], 2_000).expect("add");
        let ids: Vec<u64> = store.list().expect("list").iter().map(|d| d.id).collect();
        assert_eq!(ids, vec![2, 3]);
    }

    #[test]
    fn the_oldest_letters_are_evicted_beyond_the_bounds_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dead.redb");
        let by_count = DeadLetterLimits {
            max_letters: 3,
            max_bytes: u64::MAX,
        };
        let store = DeadLetters::open(&path, by_count, Duration::ZERO).expect("open");
        let batch: Vec<NewDeadLetter> = (1..=5).map(|s| letter(s, 4)).collect();
        assert_eq!(store.add(&batch, 1).expect("add"), 2);
        let seqs: Vec<u64> = store
            .list()
            .expect("list")
            .iter()
            .map(|d| d.letter.seq)
            .collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        drop(store);

        // Stored: three letters of 19 + 18 + 4 = 41 bytes; the new one takes 19 + 18 + 100 = 137. Within 180
        // bytes only the newest two fit.
        let by_bytes = DeadLetterLimits {
            max_letters: u64::MAX,
            max_bytes: 180,
        };
        let store = DeadLetters::open(&path, by_bytes, Duration::ZERO).expect("open");
        assert_eq!(store.add(&[letter(6, 100)], 2).expect("add"), 2);
        let seqs: Vec<u64> = store
            .list()
            .expect("list")
            .iter()
            .map(|d| d.letter.seq)
            .collect();
        assert_eq!(seqs, vec![5, 6]);
    }

    #[test]
    fn a_second_opener_waits_for_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dead.redb");
        let limits = DeadLetterLimits::default();
        let first = DeadLetters::open(&path, limits, Duration::ZERO).expect("open");
        assert!(DeadLetters::open(&path, limits, Duration::ZERO).is_err());
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(first);
        });
        DeadLetters::open(&path, limits, Duration::from_secs(10)).expect("opened once released");
        holder.join().expect("holder");
    }
}
