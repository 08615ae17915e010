//! The edge broker's retained messages, on disk: what Mosquitto keeps with `persistence true`.
//!
//! rumqttd keeps retained messages in memory only, so a restart of the agent (or a `kill -9`) lost every
//! one: `mosquitto_sub -t status/door` printed nothing afterwards. The agent's front sees every PUBLISH
//! before the broker acknowledges it; a retained one is written here, durably, before its PUBACK is
//! released, and the store is replayed into the broker before clients are accepted again.
//!
//! # On disk
//! `retained: topic -> value`, one row per topic, where the value is an encoded
//! [`crate::envelope::Envelope`] body (topic, payload, QoS, MQTT 5 properties). An empty payload clears
//! the topic, as MQTT says. Every [`RetainedStore::apply`] is one transaction committed with
//! `Durability::Immediate`.
//!
//! # Bounds
//! At most [`RetainedLimits::max_messages`] topics and [`RetainedLimits::max_bytes`] bytes of values.
//! [`RetainedStore::admits`] says whether a new value fits, counting what it replaces; the caller refuses
//! the PUBLISH (and counts and logs it) rather than let the store grow past the bound. A clear always fits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::QueueError;

/// This file's schema version (`super::schema`).
const SCHEMA_VERSION: u64 = 1;
const RETAINED: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("retained");

/// How much the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedLimits {
    /// Most retained topics.
    pub max_messages: u64,
    /// Most bytes of stored values.
    pub max_bytes: u64,
}

impl Default for RetainedLimits {
    /// 100,000 topics and 64 MiB: far above a line's status topics, small beside the queue.
    fn default() -> Self {
        Self {
            max_messages: 100_000,
            max_bytes: 64 << 20,
        }
    }
}

/// One change to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetainedChange {
    /// Keep `body` (an encoded envelope body) as `topic`'s retained message.
    Set {
        /// The topic.
        topic: String,
        /// Its encoded envelope body.
        body: Bytes,
    },
    /// Forget `topic`'s retained message (an empty retained PUBLISH).
    Clear {
        /// The topic.
        topic: String,
    },
}

impl RetainedChange {
    fn topic(&self) -> &str {
        match self {
            Self::Set { topic, .. } | Self::Clear { topic } => topic,
        }
    }
}

/// The store; see the module docs.
#[derive(Debug)]
pub struct RetainedStore {
    path: PathBuf,
    db: Database,
    limits: RetainedLimits,
    /// Size of each stored value by topic, and their total: what [`Self::admits`] checks against.
    sizes: Mutex<Sizes>,
}

#[derive(Debug, Default)]
struct Sizes {
    by_topic: HashMap<String, u64>,
    total: u64,
}

impl Sizes {
    fn apply(&mut self, change: &RetainedChange) {
        let (topic, new) = match change {
            RetainedChange::Set { topic, body } => (topic, Some(body.len() as u64)),
            RetainedChange::Clear { topic } => (topic, None),
        };
        if let Some(old) = self.by_topic.remove(topic) {
            self.total -= old;
        }
        if let Some(new) = new {
            self.by_topic.insert(topic.clone(), new);
            self.total += new;
        }
    }
}

impl RetainedStore {
    /// Opens (or creates) the store at `path`.
    ///
    /// # Errors
    /// [`QueueError::Storage`] or [`QueueError::DiskFull`].
    pub fn open(path: impl AsRef<Path>, limits: RetainedLimits) -> Result<Self, QueueError> {
        let path = path.as_ref().to_path_buf();
        let err = |e: redb::Error| super::redb::storage_error(&path, e);
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        let mut sizes = Sizes::default();
        {
            let txn = db.begin_write().map_err(|e| err(e.into()))?;
            super::schema::check_queue_file(&txn, SCHEMA_VERSION, &path)?;
            txn.open_table(RETAINED).map_err(|e| err(e.into()))?;
            txn.commit().map_err(|e| err(e.into()))?;
            let read = db.begin_read().map_err(|e| err(e.into()))?;
            let table = read.open_table(RETAINED).map_err(|e| err(e.into()))?;
            for row in table.iter().map_err(|e| err(e.into()))? {
                let (topic, value) = row.map_err(|e| err(e.into()))?;
                let size = value.value().len() as u64;
                sizes.by_topic.insert(topic.value().to_owned(), size);
                sizes.total += size;
            }
        }
        Ok(Self {
            path,
            db,
            limits,
            sizes: Mutex::new(sizes),
        })
    }

    /// Whether setting `topic` to a value of `len` bytes keeps the store within its limits, given
    /// `pending` changes not yet applied (those of the same commit group, in order, in one or more slices).
    #[must_use]
    pub fn admits(&self, pending: &[&[RetainedChange]], topic: &str, len: usize) -> bool {
        let sizes = self.sizes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut count = sizes.by_topic.len() as u64;
        let mut total = sizes.total;
        let mut current: HashMap<&str, Option<u64>> = HashMap::new();
        let stored = |t: &str, current: &HashMap<&str, Option<u64>>| {
            current
                .get(t)
                .copied()
                .unwrap_or_else(|| sizes.by_topic.get(t).copied())
        };
        for change in pending.iter().flat_map(|p| p.iter()) {
            let before = stored(change.topic(), &current);
            let after = match change {
                RetainedChange::Set { body, .. } => Some(body.len() as u64),
                RetainedChange::Clear { .. } => None,
            };
            count = count + u64::from(after.is_some()) - u64::from(before.is_some());
            total = total + after.unwrap_or(0) - before.unwrap_or(0);
            current.insert(change.topic(), after);
        }
        let before = stored(topic, &current);
        let count = count + 1 - u64::from(before.is_some());
        let total = total + len as u64 - before.unwrap_or(0);
        count <= self.limits.max_messages && total <= self.limits.max_bytes
    }

    /// Applies `changes` in order, in one durable commit.
    ///
    /// # Errors
    /// As any write; on error nothing changed.
    pub fn apply(&self, changes: &[RetainedChange]) -> Result<(), QueueError> {
        if changes.is_empty() {
            return Ok(());
        }
        let err = |e: redb::Error| super::redb::storage_error(&self.path, e);
        let run = || -> Result<(), redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                let mut table = txn.open_table(RETAINED)?;
                for change in changes {
                    match change {
                        RetainedChange::Set { topic, body } => {
                            table.insert(topic.as_str(), body.as_ref())?;
                        }
                        RetainedChange::Clear { topic } => {
                            table.remove(topic.as_str())?;
                        }
                    }
                }
            }
            txn.commit()?;
            Ok(())
        };
        run().map_err(err)?;
        let mut sizes = self.sizes.lock().unwrap_or_else(PoisonError::into_inner);
        for change in changes {
            sizes.apply(change);
        }
        Ok(())
    }

    /// Every stored message as (topic, encoded envelope body), by topic.
    ///
    /// # Errors
    /// As any read.
    pub fn all(&self) -> Result<Vec<(String, Bytes)>, QueueError> {
        let err = |e: redb::Error| super::redb::storage_error(&self.path, e);
        let run = || -> Result<Vec<(String, Bytes)>, redb::Error> {
            let read = self.db.begin_read()?;
            let table = read.open_table(RETAINED)?;
            let mut out = Vec::new();
            for row in table.iter()? {
                let (topic, value) = row?;
                out.push((
                    topic.value().to_owned(),
                    Bytes::copy_from_slice(value.value()),
                ));
            }
            Ok(out)
        };
        run().map_err(err)
    }

    /// Topics stored and bytes their values take.
    #[must_use]
    pub fn stats(&self) -> (u64, u64) {
        let sizes = self.sizes.lock().unwrap_or_else(PoisonError::into_inner);
        (sizes.by_topic.len() as u64, sizes.total)
    }

    /// The limits it was opened with.
    #[must_use]
    pub const fn limits(&self) -> RetainedLimits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(topic: &str, body: &'static [u8]) -> RetainedChange {
        RetainedChange::Set {
            topic: topic.to_owned(),
            body: Bytes::from_static(body),
        }
    }

    fn clear(topic: &str) -> RetainedChange {
        RetainedChange::Clear {
            topic: topic.to_owned(),
        }
    }

    #[test]
    fn sets_replace_clears_forget_and_all_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("retained.redb");
        let store = RetainedStore::open(&path, RetainedLimits::default()).expect("open");
        store
            .apply(&[set("status/door", b"open"), set("status/lamp", b"on")])
            .expect("apply");
        store
            .apply(&[
                set("status/door", b"closed"),
                clear("status/lamp"),
                clear("never/set"),
            ])
            .expect("apply");
        assert_eq!(store.stats(), (1, 6));
        drop(store);
        let store = RetainedStore::open(&path, RetainedLimits::default()).expect("reopen");
        assert_eq!(
            store.all().expect("all"),
            [("status/door".to_owned(), Bytes::from_static(b"closed"))]
        );
        assert_eq!(store.stats(), (1, 6), "sizes are rebuilt on open");
    }

    /// A store written before schema versions (no version row) opens with its messages and is stamped; one
    /// a newer build stamped is refused, naming both versions.
    #[test]
    fn older_files_migrate_and_newer_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("retained.redb");
        {
            let store = RetainedStore::open(&path, RetainedLimits::default()).expect("open");
            store.apply(&[set("status/door", b"open")]).expect("apply");
            super::super::schema::remove_version(&store.db).expect("as before versions");
        }
        {
            let store = RetainedStore::open(&path, RetainedLimits::default()).expect("migrates");
            assert_eq!(store.all().expect("read").len(), 1, "the message survived");
            assert_eq!(
                super::super::schema::version_of(&store.db).expect("read"),
                SCHEMA_VERSION
            );
            super::super::schema::force_version(&store.db, SCHEMA_VERSION + 1).expect("newer");
        }
        let err = RetainedStore::open(&path, RetainedLimits::default()).expect_err("refused");
        assert!(err.to_string().contains("newer meshbridge"), "{err}");
    }

    #[test]
    fn admits_counts_what_a_value_replaces_and_pending_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = RetainedLimits {
            max_messages: 2,
            max_bytes: 10,
        };
        let store = RetainedStore::open(dir.path().join("r.redb"), limits).expect("open");
        store.apply(&[set("a", b"12345")]).expect("apply");
        assert!(store.admits(&[], "b", 5), "a second topic fits exactly");
        assert!(!store.admits(&[], "b", 6), "one byte over");
        assert!(
            store.admits(&[], "a", 10),
            "a replacement counts only the difference"
        );
        assert!(
            !store.admits(&[&[set("b", b"1")]], "c", 1),
            "a third topic is over the count, pending ones included"
        );
        assert!(
            store.admits(&[&[set("b", b"1")], &[clear("a")]], "c", 1),
            "a pending clear makes room"
        );
    }
}
