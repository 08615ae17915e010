//! Schema versions of the redb files besides the queue (issue 13 item 6): the retained store, the
//! persistent sessions, the dead letters and the hub's dedup store each carry one row,
//! `meshbridge_schema.version`, checked and written in the write transaction that opens the file.
//!
//! - A file without the row was written before versions existed: version 0. Versions 0 and 1 share one
//!   layout, so migrating it is writing the row; a later layout change adds its step here, keyed by the
//!   version found.
//! - A file with a version above the build's is refused with both numbers (a downgrade would misread it),
//!   rather than opened and damaged.
//!
//! The queue (`redb.rs`) has carried its own `meta.format` since its first release and keeps it.

use redb::{ReadableTable, TableDefinition, WriteTransaction};

/// The table holding the version row.
const SCHEMA: TableDefinition<'_, &str, u64> = TableDefinition::new("meshbridge_schema");
const VERSION: &str = "version";

/// Why a file's schema cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A newer meshbridge wrote it.
    #[error("written by a newer meshbridge (schema version {found}; this build reads up to {supported})")]
    Newer {
        /// The version in the file.
        found: u64,
        /// The newest this build reads.
        supported: u64,
    },
    /// redb failed reading or writing the row.
    #[error(transparent)]
    Redb(#[from] redb::Error),
}

/// Reads the version of the file `txn` writes to (0 when it has none), refuses one above `current`, and
/// records `current`; returns the version found, for the caller's migration steps.
///
/// # Errors
/// [`SchemaError`].
pub fn check_and_stamp(txn: &WriteTransaction, current: u64) -> Result<u64, SchemaError> {
    let mut table = txn.open_table(SCHEMA).map_err(redb::Error::from)?;
    let found = table
        .get(VERSION)
        .map_err(redb::Error::from)?
        .map_or(0, |v| v.value());
    if found > current {
        return Err(SchemaError::Newer {
            found,
            supported: current,
        });
    }
    if found != current {
        table.insert(VERSION, current).map_err(redb::Error::from)?;
    }
    Ok(found)
}

/// [`check_and_stamp`] for the stores whose errors are [`super::QueueError`]s (retained, sessions, dead
/// letters): a newer file becomes [`super::QueueError::Schema`], a redb failure a storage error naming
/// `path`.
///
/// # Errors
/// As described.
pub(super) fn check_queue_file(
    txn: &WriteTransaction,
    current: u64,
    path: &std::path::Path,
) -> Result<u64, super::QueueError> {
    check_and_stamp(txn, current).map_err(|e| match e {
        SchemaError::Redb(e) => super::redb::storage_error(path, e),
        source => super::QueueError::Schema {
            path: path.display().to_string(),
            source,
        },
    })
}

/// The version recorded in `db` (0 when none), for tests and diagnostics.
///
/// # Errors
/// redb's read errors.
pub fn version_of(db: &redb::Database) -> Result<u64, redb::Error> {
    use redb::ReadableDatabase;
    let txn = db.begin_read()?;
    let table = match txn.open_table(SCHEMA) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    Ok(table.get(VERSION)?.map_or(0, |v| v.value()))
}

/// Writes `version` into `db` as if a build of that schema had (tests of the refusal).
///
/// # Errors
/// redb's write errors.
pub fn force_version(db: &redb::Database, version: u64) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    txn.open_table(SCHEMA)?.insert(VERSION, version)?;
    txn.commit()?;
    Ok(())
}

/// Removes the version row's table from `db`, leaving the file as a build from before schema versions
/// wrote it (tests of the migration).
///
/// # Errors
/// redb's write errors.
pub fn remove_version(db: &redb::Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    txn.delete_table(SCHEMA)?;
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_stamped_and_newer_files_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = redb::Database::create(dir.path().join("x.redb")).expect("create");
        assert_eq!(version_of(&db).expect("read"), 0);
        let txn = db.begin_write().expect("txn");
        assert_eq!(check_and_stamp(&txn, 1).expect("stamp"), 0);
        txn.commit().expect("commit");
        assert_eq!(version_of(&db).expect("read"), 1);
        let txn = db.begin_write().expect("txn");
        assert_eq!(check_and_stamp(&txn, 1).expect("current"), 1);
        drop(txn);
        force_version(&db, 7).expect("force");
        let txn = db.begin_write().expect("txn");
        let err = check_and_stamp(&txn, 1).expect_err("newer");
        assert!(
            matches!(
                err,
                SchemaError::Newer {
                    found: 7,
                    supported: 1
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "written by a newer meshbridge (schema version 7; this build reads up to 1)"
        );
    }
}
