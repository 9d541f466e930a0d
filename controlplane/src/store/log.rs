//! The raft log store (openraft storage-v2 `RaftLogStorage`) over sled trees `log` and `meta`.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError, Vote};

use super::keyspace::{KeySpace, LogEntries, log_index, meta};
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

/// The log store. Cheap to clone: the clone is openraft's log reader.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<sled::Db>,
    log: sled::Tree,
    meta: sled::Tree,
    /// sled's data file, opened by us only to `fdatasync` it (see [`LogStore::flush`]).
    data_file: Arc<std::fs::File>,
    /// How many times the log was made stable (`fdatasync` returned): checked by tests.
    syncs: Arc<AtomicU64>,
    /// This node's name in [`crate::stages`] timings.
    label: Arc<str>,
}

fn io_err(e: impl Into<openraft::AnyError>) -> StorageError {
    StorageIOError::write(e).into()
}

impl LogStore {
    pub(super) fn new(
        db: Arc<sled::Db>,
        log: sled::Tree,
        meta: sled::Tree,
        data_file: std::fs::File,
    ) -> Self {
        Self {
            db,
            log,
            meta,
            data_file: Arc::new(data_file),
            syncs: Arc::default(),
            label: Arc::from("n?"),
        }
    }

    /// Names this node in [`crate::stages`] timings (`n<id>`).
    pub fn set_label(&mut self, label: String) {
        self.label = Arc::from(label);
    }

    /// How many flushes reached stable storage since the store was opened.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// A weak handle on the database: once it no longer upgrades, every store handle is gone
    /// and sled has released the data directory's lock.
    pub fn db_weak(&self) -> std::sync::Weak<sled::Db> {
        Arc::downgrade(&self.db)
    }

    /// Puts everything written so far (the whole sled database) on stable storage.
    ///
    /// sled 0.34's `flush_async` writes its buffers and calls `sync_file_range` on Linux:
    /// that starts and waits for the data writeback but flushes neither the file's metadata
    /// (its size, as the file grows) nor the device's write cache, so a power loss can still
    /// erase an entry raft was told is stable (sled's real `fsync` runs in its background
    /// flusher, every 500 ms). `fdatasync` on any descriptor of the file flushes the inode's
    /// dirty data, the metadata needed to read it back and the device cache: it runs on a
    /// blocking thread, never on the async runtime.
    async fn flush(&self) -> Result<(), std::io::Error> {
        let t0 = std::time::Instant::now();
        self.db.flush_async().await.map_err(std::io::Error::other)?;
        let t1 = std::time::Instant::now();
        let file = self.data_file.clone();
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(std::io::Error::other)??;
        crate::stages::record(|| format!("{}.log.flush_async", self.label), t1 - t0);
        crate::stages::record(|| format!("{}.log.fdatasync", self.label), t1.elapsed());
        crate::stages::record(|| format!("{}.log.flush", self.label), t0.elapsed());
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let Some(bytes) = self.meta.get(key).map_err(|e| StorageIOError::read(&e))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StorageIOError::read(&e).into())
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(|e| io_err(&e))?;
        self.meta.insert(key, bytes).map_err(|e| io_err(&e))?;
        Ok(())
    }

    fn decode(bytes: &[u8]) -> Result<Entry, StorageError> {
        serde_json::from_slice(bytes).map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in self.log.range(LogEntries::key(&start)..) {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let Some(index) = log_index(&key) else {
                continue;
            };
            if !range.contains(&index) {
                break;
            }
            out.push(Self::decode(&value)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(meta::LAST_PURGED)?;
        let last = match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((_, v)) => Some(Self::decode(&v)?.log_id),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(meta::VOTE, vote)?;
        // A vote must be durable before it is sent, or a restarted node could vote twice in
        // one term.
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(meta::VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed: a stale value only means fewer entries are re-applied at start-up.
        self.put_meta(meta::COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(meta::COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let t0 = std::time::Instant::now();
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.insert(LogEntries::key(&entry.log_id.index), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        crate::stages::record(|| format!("{}.log.write", self.label), t0.elapsed());
        // Only report the I/O complete once it is on disk.
        let flushed = self.flush().await;
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for key in self.log.range(LogEntries::key(&log_id.index)..).keys() {
            batch.remove(key.map_err(|e| StorageIOError::write_logs(&e))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first (flushed): after a crash between the two steps the log
        // state still reports it, and the leftover entries are only garbage.
        self.put_meta(meta::LAST_PURGED, &log_id)?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = sled::Batch::default();
        let end = log_id.index.saturating_add(1);
        for key in self.log.range(..LogEntries::key(&end)).keys() {
            batch.remove(key.map_err(|e| StorageIOError::write_logs(&e))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
