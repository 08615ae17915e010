//! Durable dedup state: one redb row per site holding that site's encoded [`DedupSnapshot`].
//!
//! Why a row per site rather than one blob: a flush writes only the sites whose state changed, so its size
//! follows the busy sites' windows, not the whole fleet.
//!
//! # Durability: one commit every [`FLUSH_EVERY`] for every site that changed, not one per batch
//! A batch is marked seen in memory (the site's `Dedup`), and its `Ack` goes out once the cloud broker
//! accepted it. The flusher (`crate::sites::flush_until`) takes the rows of the sites that changed every
//! [`FLUSH_EVERY`], and once more at shutdown after the connections drained, and writes them in one
//! `Durability::Immediate` commit ([`DedupStore::write_rows_blocking`]). At a factory line's 1,000 msg/s each
//! batch holds one message: a commit with fsync per batch cost the hub ~100 µs of CPU per message on this
//! machine, and a non-durable commit per batch (the step before this one) still a redb write transaction
//! and a blocking-pool hand-off each, for nothing a crash could keep: redb persists a `Durability::None`
//! commit only with the next durable one, so what a hub `kill -9` loses was always the last
//! [`FLUSH_EVERY`], and still is.
//!
//! What this can and cannot change, since the dedup state only ever suppresses duplicates:
//! - nothing is lost: a message is acknowledged only after the cloud broker accepted it, whatever the
//!   store holds;
//! - a hub `kill -9` alone adds no duplicate: the agent resends only what it had not seen acknowledged, and
//!   those batches the hub may have published before the crash could be resent either way (at most one
//!   uplink window, as before);
//! - only if the agent loses acknowledgements too (its deletes are not fsynced either: a power cut of both
//!   machines together, or of one machine running both) can it resend what the hub acknowledged within the
//!   last [`FLUSH_EVERY`]; those reach consumers again, tagged with their `meshbridge-id`;
//! - a graceful stop flushes: no duplicate after a restart.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::Duration;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use shared::policy::dedup::{Dedup, DedupError, DedupSnapshot};

/// One site's row as the flusher writes it: the encoded [`DedupSnapshot`] and, per origin, its encoded
/// [`PendingRefusals`] (`None`: none left, the row is removed). Taken together under the site's dedup lock.
#[derive(Debug, Clone)]
pub struct SiteRow {
    /// The site.
    pub site: String,
    /// Its encoded dedup snapshot.
    pub snapshot: Vec<u8>,
    /// Its origins' pending refusals.
    pub refusals: Vec<(String, Option<Vec<u8>>)>,
}

/// How often the dedup commits of the last period are made durable (see the module docs).
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// This file's schema version (`shared::queue::schema`); version 0, from before versions, has the same
/// layout.
const SCHEMA_VERSION: u64 = 1;

/// File name of the hub's database inside `data_dir`.
pub const DB_FILE: &str = "hub.redb";

/// site name -> encoded [`DedupSnapshot`] of a [`Dedup`] holding only that site.
const DEDUP: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("dedup");
/// One row, [`ROUTE_DEDUP_KEY`]: the routes' dedup sets (`shared::policy::route_dedup`), saved
/// periodically so a hub restart keeps most of what they had seen.
const ROUTE_DEDUP: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("route_dedup");
const ROUTE_DEDUP_KEY: &str = "routes";
/// origin (`<site>` or `<site>/<agent>`) -> encoded [`PendingRefusals`]: refusals the agent may not have
/// received. Written in the same commit as the site's dedup row, so a seq marked seen never lost its
/// refusal.
const REFUSALS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("refusals");
/// Most refusals kept per origin; the oldest go first (they are the likeliest to have been received).
pub const MAX_PENDING_REFUSALS: usize = 1024;

/// The refusals the hub decided or the cloud broker returned for one agent's entries, kept until the
/// agent's `Hello` shows it acknowledged past them. The `Refused` frames travel before the `Ack` that
/// covers them; if the connection drops in between, the agent resumes from the hub's mark and would delete
/// the entries without dead-lettering them. With these kept, the hub resumes the agent below the oldest
/// one and refuses it again when it is resent (`cloud-hub/src/agent_conn.rs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingRefusals {
    /// The agent queue's incarnation the seqs belong to.
    pub incarnation: u64,
    /// seq -> (MQTT 5 reason code, detail).
    pub by_seq: BTreeMap<u64, (u8, String)>,
}

impl PendingRefusals {
    /// `u64 incarnation`, `u32 count`, then per refusal `u64 seq` `u8 code` `u32 len` detail bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.by_seq.len() * 32);
        out.extend_from_slice(&self.incarnation.to_be_bytes());
        let count = u32::try_from(self.by_seq.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for (seq, (code, detail)) in self.by_seq.iter().take(count as usize) {
            out.extend_from_slice(&seq.to_be_bytes());
            out.push(*code);
            let len = u32::try_from(detail.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&detail.as_bytes()[..len as usize]);
        }
        out
    }

    /// The inverse of [`encode`](Self::encode); `None` for bytes it did not write.
    #[must_use]
    pub fn decode(mut bytes: &[u8]) -> Option<Self> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, rest) = bytes.split_at_checked(n)?;
            *bytes = rest;
            Some(head)
        }
        let u64_of = |b: &[u8]| b.try_into().ok().map(u64::from_be_bytes);
        let u32_of = |b: &[u8]| b.try_into().ok().map(u32::from_be_bytes);
        let incarnation = u64_of(take(&mut bytes, 8)?)?;
        let count = u32_of(take(&mut bytes, 4)?)?;
        let mut by_seq = BTreeMap::new();
        for _ in 0..count {
            let seq = u64_of(take(&mut bytes, 8)?)?;
            let code = take(&mut bytes, 1)?[0];
            let len = u32_of(take(&mut bytes, 4)?)? as usize;
            let detail = String::from_utf8(take(&mut bytes, len)?.to_vec()).ok()?;
            by_seq.insert(seq, (code, detail));
        }
        bytes.is_empty().then_some(Self {
            incarnation,
            by_seq,
        })
    }
}

/// Errors of the dedup store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file was written by a newer hub.
    #[error("dedup store {path}: {source}")]
    Schema {
        /// The file.
        path: PathBuf,
        /// The versions.
        #[source]
        source: shared::queue::schema::SchemaError,
    },
    /// redb failed opening, reading or committing (I/O error, full disk, corrupt file).
    #[error("dedup store {path}")]
    Redb {
        /// The database file.
        path: PathBuf,
        /// What redb reported.
        #[source]
        source: redb::Error,
    },
    /// A stored snapshot does not decode or restore: the row was corrupted or written by another format.
    #[error("dedup state of site {site:?} in {path} is unreadable")]
    CorruptSnapshot {
        /// The database file.
        path: PathBuf,
        /// The site whose row is bad.
        site: String,
        /// Why it was rejected.
        #[source]
        source: DedupError,
    },
    /// The blocking task running a commit panicked or was cancelled.
    #[error("dedup store task failed")]
    Join(#[source] tokio::task::JoinError),
}

/// The hub's redb database (cheap to clone: one shared handle).
#[derive(Debug, Clone)]
pub struct DedupStore {
    db: Arc<Database>,
    path: Arc<PathBuf>,
}

impl DedupStore {
    /// Opens (or creates) `data_dir/hub.redb` and loads every site's dedup state.
    ///
    /// Blocking (file I/O): call it from a blocking context or before serving.
    ///
    /// # Errors
    /// [`StoreError::Redb`] if the file cannot be opened or read, [`StoreError::CorruptSnapshot`] for a bad row.
    pub fn open(data_dir: &Path) -> Result<(Self, HashMap<String, Dedup>), StoreError> {
        let path = data_dir.join(DB_FILE);
        let err = |source: redb::Error| StoreError::Redb {
            path: path.clone(),
            source,
        };
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        // Create the table so that later read transactions find it.
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        shared::queue::schema::check_and_stamp(&txn, SCHEMA_VERSION).map_err(|e| match e {
            shared::queue::schema::SchemaError::Redb(e) => err(e),
            source => StoreError::Schema {
                path: path.clone(),
                source,
            },
        })?;
        txn.open_table(DEDUP).map_err(|e| err(e.into()))?;
        txn.commit().map_err(|e| err(e.into()))?;

        let mut sites = HashMap::new();
        let txn = db.begin_read().map_err(|e| err(e.into()))?;
        let table = txn.open_table(DEDUP).map_err(|e| err(e.into()))?;
        for row in table.iter().map_err(|e| err(e.into()))? {
            let (key, value) = row.map_err(|e| err(e.into()))?;
            let site = key.value().to_owned();
            let restored = DedupSnapshot::decode(value.value()).and_then(Dedup::restore);
            match restored {
                Ok(dedup) => {
                    sites.insert(site, dedup);
                }
                Err(source) => {
                    return Err(StoreError::CorruptSnapshot {
                        path: path.clone(),
                        site,
                        source,
                    })
                }
            }
        }
        drop(table);
        drop(txn);
        Ok((
            Self {
                db: Arc::new(db),
                path: Arc::new(path),
            },
            sites,
        ))
    }

    /// Every origin's pending refusals (blocking; call once at start). Unreadable rows are skipped with a
    /// warning: they only ever re-offer refusals.
    ///
    /// # Errors
    /// [`StoreError::Redb`] if the table cannot be read.
    pub fn refusals(&self) -> Result<HashMap<String, PendingRefusals>, StoreError> {
        let result = (|| -> Result<HashMap<String, PendingRefusals>, redb::Error> {
            let mut out = HashMap::new();
            let txn = self.db.begin_read()?;
            let table = match txn.open_table(REFUSALS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(out),
                Err(e) => return Err(e.into()),
            };
            for row in table.iter()? {
                let (key, value) = row?;
                match PendingRefusals::decode(value.value()) {
                    Some(pending) => {
                        out.insert(key.value().to_owned(), pending);
                    }
                    None => {
                        tracing::warn!(origin = key.value(), "unreadable pending refusals; skipped")
                    }
                }
            }
            Ok(out)
        })();
        result.map_err(|source| StoreError::Redb {
            path: self.path.as_ref().clone(),
            source,
        })
    }

    /// Writes the rows of the sites that changed since the last flush in one durable commit
    /// (`crate::sites::flush_until` calls it every [`FLUSH_EVERY`] and at shutdown).
    ///
    /// # Errors
    /// [`StoreError::Redb`] if the commit fails; nothing of it is then recorded, and the caller keeps the
    /// rows for the next attempt.
    pub fn write_rows_blocking(&self, rows: &[SiteRow]) -> Result<(), StoreError> {
        let result = (|| -> Result<(), redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                let mut table = txn.open_table(DEDUP)?;
                let mut pending = txn.open_table(REFUSALS)?;
                for row in rows {
                    table.insert(row.site.as_str(), row.snapshot.as_slice())?;
                    for (origin, refusals) in &row.refusals {
                        match refusals {
                            Some(bytes) => {
                                pending.insert(origin.as_str(), bytes.as_slice())?;
                            }
                            None => {
                                pending.remove(origin.as_str())?;
                            }
                        }
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })();
        result.map_err(|source| StoreError::Redb {
            path: self.path.as_ref().clone(),
            source,
        })
    }

    /// The routes' dedup snapshot saved last, if any.
    pub fn load_route_dedup(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let result = (|| -> Result<Option<Vec<u8>>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = match txn.open_table(ROUTE_DEDUP) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            Ok(table.get(ROUTE_DEDUP_KEY)?.map(|v| v.value().to_vec()))
        })();
        result.map_err(|source| StoreError::Redb {
            path: self.path.as_ref().clone(),
            source,
        })
    }

    /// Saves the routes' dedup snapshot (replacing the last one).
    pub fn save_route_dedup_blocking(&self, snapshot: &[u8]) -> Result<(), StoreError> {
        let result = (|| -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            {
                let mut table = txn.open_table(ROUTE_DEDUP)?;
                table.insert(ROUTE_DEDUP_KEY, snapshot)?;
            }
            txn.commit()?;
            Ok(())
        })();
        result.map_err(|source| StoreError::Redb {
            path: self.path.as_ref().clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One site's row, written as the flusher writes it.
    fn write(
        store: &DedupStore,
        site: &str,
        snapshot: &[u8],
        refusals: &[(String, Option<Vec<u8>>)],
    ) {
        store
            .write_rows_blocking(&[SiteRow {
                site: site.to_owned(),
                snapshot: snapshot.to_vec(),
                refusals: refusals.to_vec(),
            }])
            .expect("write");
    }

    /// A store from before schema versions opens with its sites and is stamped; a newer one is refused.
    #[test]
    fn older_files_migrate_and_newer_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, _) = DedupStore::open(dir.path()).expect("open");
            let snapshot = Dedup::new(8).expect("window").snapshot().encode();
            write(&store, "line1", &snapshot, &[]);
            shared::queue::schema::remove_version(&store.db).expect("as before versions");
        }
        {
            let (store, sites) = DedupStore::open(dir.path()).expect("migrates");
            assert!(sites.contains_key("line1"), "the site's state survived");
            assert_eq!(
                shared::queue::schema::version_of(&store.db).expect("read"),
                SCHEMA_VERSION
            );
            shared::queue::schema::force_version(&store.db, SCHEMA_VERSION + 1).expect("newer");
        }
        let err = DedupStore::open(dir.path()).expect_err("refused");
        assert!(matches!(err, StoreError::Schema { .. }), "{err}");
    }

    #[test]
    fn pending_refusals_survive_reopen_and_go_when_emptied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pending = PendingRefusals {
            incarnation: 7,
            by_seq: BTreeMap::from([
                (3, (0x95, "too large".to_owned())),
                (9, (0x87, String::new())),
            ]),
        };
        assert_eq!(
            PendingRefusals::decode(&pending.encode()),
            Some(pending.clone())
        );
        assert_eq!(PendingRefusals::decode(&pending.encode()[..20]), None);
        {
            let (store, _) = DedupStore::open(dir.path()).expect("open");
            assert!(store.refusals().expect("read").is_empty());
            let snapshot = Dedup::new(8).expect("window").snapshot().encode();
            write(
                &store,
                "line1",
                &snapshot,
                &[("line1/a".to_owned(), Some(pending.encode()))],
            );
        }
        let (store, _) = DedupStore::open(dir.path()).expect("reopen");
        let snapshot = Dedup::new(8).expect("window").snapshot().encode();
        assert_eq!(
            store.refusals().expect("read").get("line1/a"),
            Some(&pending)
        );
        write(&store, "line1", &snapshot, &[("line1/a".to_owned(), None)]);
        assert!(store.refusals().expect("read").is_empty());
    }

    #[test]
    fn the_routes_dedup_state_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, _) = DedupStore::open(dir.path()).expect("open");
            assert_eq!(store.load_route_dedup().expect("load"), None);
            store.save_route_dedup_blocking(b"first").expect("save");
            store.save_route_dedup_blocking(b"second").expect("save");
        }
        let (store, sites) = DedupStore::open(dir.path()).expect("reopen");
        assert!(sites.is_empty(), "the routes' row is not a site");
        assert_eq!(
            store.load_route_dedup().expect("load").as_deref(),
            Some(&b"second"[..])
        );
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, sites) = DedupStore::open(dir.path()).expect("open");
            assert!(sites.is_empty());
            let mut d = Dedup::new(64).expect("window");
            for seq in [1, 2, 3, 5] {
                let _ = d.observe("line1", 7, seq);
            }
            write(&store, "line1", &d.snapshot().encode(), &[]);
            let mut d2 = Dedup::new(64).expect("window");
            let _ = d2.observe("line2", 9, 1);
            write(&store, "line2", &d2.snapshot().encode(), &[]);
            // Overwrite line2: the last commit wins.
            let _ = d2.observe("line2", 9, 2);
            write(&store, "line2", &d2.snapshot().encode(), &[]);
        }
        let (_store, sites) = DedupStore::open(dir.path()).expect("reopen");
        let cases: &[(&str, u64, u64, &[u64])] = &[("line1", 7, 3, &[5]), ("line2", 9, 2, &[])];
        for &(site, inc, hw, above) in cases {
            let d = sites.get(site).expect("site restored");
            assert_eq!(d.high_water(site), Some((inc, hw)), "{site}");
            assert_eq!(
                d.window(site).expect("window").seen_above(),
                above,
                "{site}"
            );
        }
    }

    #[test]
    fn corrupt_row_is_reported_with_its_site() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, _) = DedupStore::open(dir.path()).expect("open");
            write(&store, "line9", b"garbage", &[]);
        }
        let err = DedupStore::open(dir.path()).expect_err("corrupt");
        assert!(
            matches!(err, StoreError::CorruptSnapshot { ref site, .. } if site == "line9"),
            "{err:?}"
        );
    }
}
