//! Durable dedup state: one redb row per site holding that site's encoded [`DedupSnapshot`].
//!
//! Why a row per site rather than one blob: every agent connection persists after each group of acknowledged
//! batches, and a per-site row keeps that write proportional to one site's window, not to the whole fleet.
//! The commit happens *before* the hub sends `Ack`, so anything an agent saw acknowledged is recorded as seen
//! here, and a restarted hub (graceful or SIGKILL) drops its replay. redb commits with
//! `Durability::Immediate`: a returned commit survives a crash.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use shared::policy::dedup::{Dedup, DedupError, DedupSnapshot};

/// File name of the hub's database inside `data_dir`.
pub const DB_FILE: &str = "hub.redb";

/// site name -> encoded [`DedupSnapshot`] of a [`Dedup`] holding only that site.
const DEDUP: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("dedup");
/// One row, [`ROUTE_DEDUP_KEY`]: the routes' dedup sets (`shared::policy::route_dedup`), saved
/// periodically so a hub restart keeps most of what they had seen.
const ROUTE_DEDUP: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("route_dedup");
const ROUTE_DEDUP_KEY: &str = "routes";

/// Errors of the dedup store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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

    /// Writes one site's encoded snapshot in one durable commit (blocking).
    ///
    /// # Errors
    /// [`StoreError::Redb`] if the commit fails (nothing is then recorded, and the caller must not ack).
    pub fn save_blocking(&self, site: &str, snapshot: &[u8]) -> Result<(), StoreError> {
        let result = (|| -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            {
                let mut table = txn.open_table(DEDUP)?;
                table.insert(site, snapshot)?;
            }
            txn.commit()?;
            Ok(())
        })();
        result.map_err(|source| StoreError::Redb {
            path: self.path.as_ref().clone(),
            source,
        })
    }

    /// [`save_blocking`](Self::save_blocking) on tokio's blocking pool.
    ///
    /// # Errors
    /// As `save_blocking`, plus [`StoreError::Join`].
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

    pub async fn save(&self, site: String, snapshot: Vec<u8>) -> Result<(), StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.save_blocking(&site, &snapshot))
            .await
            .map_err(StoreError::Join)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            store
                .save_blocking("line1", &d.snapshot().encode())
                .expect("save");
            let mut d2 = Dedup::new(64).expect("window");
            let _ = d2.observe("line2", 9, 1);
            store
                .save_blocking("line2", &d2.snapshot().encode())
                .expect("save");
            // Overwrite line2: the last commit wins.
            let _ = d2.observe("line2", 9, 2);
            store
                .save_blocking("line2", &d2.snapshot().encode())
                .expect("save");
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
            store.save_blocking("line9", b"garbage").expect("save");
        }
        let err = DedupStore::open(dir.path()).expect_err("corrupt");
        assert!(
            matches!(err, StoreError::CorruptSnapshot { ref site, .. } if site == "line9"),
            "{err:?}"
        );
    }
}
