//! Durable raft storage: the log in `raft-log` (a write-ahead log of chunk files under
//! `<data_dir>/raft-log/`), the state machine and snapshots in sled (`<data_dir>/raft.sled`).
//!
//! See [`keyspace`] for sled's tree layout. Durability rules (PITFALLS §3, §4):
//! - log appends, truncations, purges and votes are on stable storage before they are
//!   acknowledged to openraft: `raft-log`'s flush thread writes them and calls `fdatasync`
//!   before it runs the callback (`LogFlushed` for appends); one device sync per flush, where
//!   the sled log needed sled's `sync_file_range` and then an `fdatasync`;
//! - the state machine is in memory: at start it is the current snapshot's, and openraft
//!   re-applies the committed log entries after it (see [`sm`]);
//! - snapshots are on stable storage (sled's flush, then `fdatasync` of sled's data file)
//!   before `install_snapshot` or `build_snapshot` returns, so before the log they cover is
//!   purged.

// openraft's traits fix the error type (`StorageError`, ~224 bytes); helpers return it too.
#![allow(clippy::result_large_err)]

pub mod keyspace;
pub mod log;
pub mod sm;

use std::path::Path;
use std::sync::Arc;

pub use log::LogStore;
pub use sm::{SmHandle, StateMachineStore};

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// sled could not open the database (permissions, corruption, another process holds it).
    #[error("cannot open sled database at {path}: {source}")]
    Sled {
        path: String,
        #[source]
        source: sled::Error,
    },
    /// The data file or its directory could not be opened or synced.
    #[error("cannot sync sled data file under {path}: {source}")]
    Sync {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The raft log could not be opened (permissions, corruption, another process holds it).
    #[error("cannot open the raft log at {path}: {source}")]
    Log {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A stored record does not decode (corruption or a newer format).
    #[error("cannot decode stored {what}: {message}")]
    Decode { what: String, message: String },
}

/// Opens sled's data file for `fdatasync` and fsyncs the directory holding it.
fn sync_data_dir(path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::File::open(path.join("db"))?;
    std::fs::File::open(path)?.sync_all()?;
    Ok(file)
}

/// Opens (creating if needed) the node's raft database under `dir`.
///
/// `cache_capacity` bounds sled's page cache (sled's default is 1 GiB).
pub fn open(
    dir: &Path,
    cache_capacity: u64,
    watch_ring: usize,
) -> Result<(LogStore, StateMachineStore), OpenError> {
    let path = dir.join("raft.sled");
    let db = sled::Config::new()
        .path(&path)
        .cache_capacity(cache_capacity)
        .open()
        .map_err(|source| OpenError::Sled {
            path: path.display().to_string(),
            source,
        })?;
    let tree = |name: &str| {
        db.open_tree(name).map_err(|source| OpenError::Sled {
            path: format!("{}#{name}", path.display()),
            source,
        })
    };
    // Trees `log` and `meta` held the raft log before session 6: read once, to move it.
    let legacy_log = tree("log")?;
    let legacy_meta = tree("meta")?;
    let snapshot = tree("snapshot")?;
    // Tree `sm` held a write-through copy of the state machine before session 13: the
    // snapshot and the log hold everything it did.
    db.drop_tree("sm").map_err(|source| OpenError::Sled {
        path: format!("{}#sm", path.display()),
        source,
    })?;
    // sled keeps everything in one file, `db`, which the state machine fdatasyncs after a
    // snapshot (see `StateMachineStore`). The directory is synced once so the file's own
    // entry is durable.
    let data_file = sync_data_dir(&path).map_err(|source| OpenError::Sync {
        path: path.display().to_string(),
        source,
    })?;
    let db = Arc::new(db);
    let log_store = LogStore::open(db.clone(), &dir.join("raft-log"), &legacy_log, &legacy_meta)?;
    let sm_store = StateMachineStore::open(db, data_file, snapshot, watch_ring)?;
    Ok((log_store, sm_store))
}

#[cfg(test)]
mod tests;
