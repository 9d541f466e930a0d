//! Durable raft storage in a node's data directory:
//!
//! | path | what |
//! |------|------|
//! | `LOCK` | held (`flock`) while a process has the directory open |
//! | `raft-log/` | the raft log and vote (`raft-log`: a write-ahead log of chunk files) |
//! | `snapshot` | the current snapshot ([`snapshot::SnapshotFile`]) |
//!
//! Durability rules (PITFALLS §3):
//! - log appends, truncations, purges and votes are on stable storage before they are
//!   acknowledged to openraft: `raft-log`'s flush thread writes them and calls `fdatasync`
//!   before it runs the callback (`LogFlushed` for appends);
//! - the state machine is in memory: at start it is the current snapshot's, and openraft
//!   re-applies the committed log entries after it (see [`sm`]);
//! - a snapshot is written to a temporary file, `fdatasync`ed and renamed over `snapshot`
//!   (the directory fsynced) before `install_snapshot` or `build_snapshot` returns, so before
//!   the log it covers is purged.
//!
//! A data directory written before session 14 also has `raft.sled` (sled 0.34: the raft log
//! before session 6, snapshots until session 14). [`open`] moves what it holds to the layout
//! above, syncs it, and removes `raft.sled`; sled is not opened otherwise.

// openraft's traits fix the error type (`StorageError`, ~224 bytes); helpers return it too.
#![allow(clippy::result_large_err)]

pub mod keyspace;
pub mod log;
pub mod sm;
pub mod snapshot;

use std::path::Path;
use std::sync::Arc;

pub use log::LogStore;
pub use sm::{SmHandle, StateMachineStore};
use snapshot::SnapshotFile;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process has the data directory open (two members on one volume).
    #[error("data directory {path} is in use by another process (lock file {path}/LOCK)")]
    Locked { path: String },
    /// The data directory, its lock or its snapshot file could not be opened or written.
    #[error("cannot use data directory {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// sled could not open a data directory written before session 14 (permissions,
    /// corruption, another process holds it).
    #[error("cannot open sled database at {path}: {source}")]
    Sled {
        path: String,
        #[source]
        source: sled::Error,
    },
    /// The raft log could not be opened (permissions, corruption).
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

/// The data directory's lock: an exclusive `flock` on `<data_dir>/LOCK`, released when the
/// last store handle drops it.
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] std::fs::File);

fn lock_dir(dir: &Path) -> Result<DirLock, OpenError> {
    let dir_err = |source| OpenError::Dir {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(dir_err)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .map_err(dir_err)?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::Locked {
            path: dir.display().to_string(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(dir_err(e)),
    }
}

/// Opens (creating if needed) the node's raft storage under `dir`.
///
/// `sled_cache_capacity` bounds sled's page cache while a data directory written before
/// session 14 is moved (sled's default is 1 GiB); sled is not opened otherwise.
pub fn open(
    dir: &Path,
    sled_cache_capacity: u64,
    watch_ring: usize,
) -> Result<(LogStore, StateMachineStore), OpenError> {
    let lock = Arc::new(lock_dir(dir)?);
    let log_store = LogStore::open(lock.clone(), &dir.join("raft-log"))?;
    let snapshot = SnapshotFile::open(dir).map_err(|source| OpenError::Dir {
        path: dir.display().to_string(),
        source,
    })?;
    let legacy = dir.join("raft.sled");
    if legacy.exists() {
        move_from_sled(&legacy, sled_cache_capacity, &log_store, &snapshot)?;
    }
    let sm_store = StateMachineStore::open(lock, snapshot, watch_ring)?;
    Ok((log_store, sm_store))
}

/// Moves a data directory's `raft.sled` (written before session 14) to today's layout: the
/// log in trees `log` and `meta` (before session 6) to `raft-log`, the snapshot in tree
/// `snapshot` to the snapshot file, both synced; then removes `raft.sled`. Each step is
/// skipped if its target already holds data, so a crash part-way only repeats the rest.
fn move_from_sled(
    path: &Path,
    cache_capacity: u64,
    log_store: &LogStore,
    snapshot: &SnapshotFile,
) -> Result<(), OpenError> {
    let sled_err = |name: &str| {
        let path = format!("{}#{name}", path.display());
        move |source| OpenError::Sled {
            path: path.clone(),
            source,
        }
    };
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(cache_capacity)
        .open()
        .map_err(sled_err(""))?;
    let log = db.open_tree("log").map_err(sled_err("log"))?;
    let meta = db.open_tree("meta").map_err(sled_err("meta"))?;
    log_store
        .migrate_from_sled(&log, &meta)
        .map_err(|source| OpenError::Log {
            path: path.display().to_string(),
            source,
        })?;
    let tree = db.open_tree("snapshot").map_err(sled_err("snapshot"))?;
    let get = |key: &[u8]| tree.get(key).map_err(sled_err("snapshot"));
    if !snapshot.exists()
        && let (Some(meta), Some(data)) = (
            get(keyspace::snapshot::META)?,
            get(keyspace::snapshot::DATA)?,
        )
    {
        let meta: crate::types::SnapshotMeta =
            serde_json::from_slice(&meta).map_err(|e| OpenError::Decode {
                what: "snapshot metadata in raft.sled".into(),
                message: e.to_string(),
            })?;
        // Checked before it replaces nothing: a snapshot that does not decode stays in sled.
        sm::decode_snapshot(&meta, &data).map_err(|e| OpenError::Decode {
            what: "snapshot".into(),
            message: e.to_string(),
        })?;
        snapshot
            .save(&meta, &data)
            .map_err(|source| OpenError::Dir {
                path: path.display().to_string(),
                source,
            })?;
    }
    drop((log, meta, tree));
    // sled writes its dirty pages from background threads as the last handle goes; flush
    // first so the directory is quiet when it is removed.
    db.flush().map_err(sled_err(""))?;
    drop(db);
    if let Err(e) = std::fs::remove_dir_all(path) {
        // Harmless: every step above is skipped next time, and this is retried.
        tracing::warn!(path = %path.display(), error = %e, "could not remove raft.sled after moving it");
    } else {
        tracing::info!(path = %path.display(), "data directory moved off sled (raft.sled removed)");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
