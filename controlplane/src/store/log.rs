//! The raft log store (openraft storage-v2 `RaftLogStorage`) on `raft-log`: a write-ahead log
//! of chunk files under `<data_dir>/raft-log/`, written by one flush thread that calls
//! `fdatasync` before it answers (see [`LogStore::append`]).
//!
//! Until session 6 the log lived in sled (trees `log` and `meta`): every append cost sled's
//! buffer write, `sync_file_range` and then our `fdatasync`, and every node's appends waited
//! behind sled's page cache work. `store::open` moves such a log over once (see
//! [`LogStore::migrate_from_sled`]).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{CommittedLeaderId, OptionalSend, RaftLogReader, StorageIOError, Vote};
use raft_log::api::raft_log_writer::RaftLogWriter;
use raft_log::codeq::{Decode, Encode};
use raft_log::{RaftLog, Types};

use super::keyspace::{log_index, meta};
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

/// Largest chunk file: a chunk is deleted once every entry in it is purged (after a snapshot),
/// so this bounds the disk the log keeps beyond what openraft keeps.
const CHUNK_MAX_BYTES: usize = 32 << 20;
/// Entries per chunk file (the same bound, for many small entries).
const CHUNK_MAX_RECORDS: usize = 65_536;
/// Payloads kept in memory beyond the open chunk (readers of older entries: lagging
/// followers, re-applies at start-up).
const CACHE_MAX_BYTES: usize = 64 << 20;
const CACHE_MAX_ITEMS: usize = 100_000;

/// `raft-log`'s type parameters for this log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LogTypes;

impl Types for LogTypes {
    /// `((term, leader node id), index)`: openraft 0.9's log id.
    type LogId = ((u64, NodeId), u64);
    /// The whole openraft `Entry` as JSON (the encoding the sled log used).
    type LogPayload = Vec<u8>;
    type Vote = StoredVote;
    type Callback = Flushed;
    /// The last committed log id as JSON (`save_committed`; best effort, never synced alone).
    type UserData = Vec<u8>;

    fn log_index(log_id: &Self::LogId) -> u64 {
        log_id.1
    }

    fn payload_size(payload: &Self::LogPayload) -> u64 {
        payload.len() as u64
    }
}

/// openraft's vote as `raft-log` stores it: ordered as openraft orders votes (`raft-log`
/// refuses a vote lower than the stored one), encoded as length-prefixed JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVote(pub Vote<NodeId>);

impl PartialOrd for StoredVote {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.0.partial_cmp(&other.0)
    }
}

impl Encode for StoredVote {
    fn encode<W: io::Write>(&self, w: W) -> Result<usize, io::Error> {
        serde_json::to_vec(&self.0)
            .map_err(io::Error::other)?
            .encode(w)
    }
}

impl Decode for StoredVote {
    fn decode<R: io::Read>(r: R) -> Result<Self, io::Error> {
        let bytes = Vec::<u8>::decode(r)?;
        serde_json::from_slice(&bytes)
            .map(StoredVote)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// What the flush thread calls once a flush is on stable storage (after `fdatasync`).
pub enum Flushed {
    /// An append: tell openraft.
    Raft(LogFlushed<TypeConfig>, Done),
    /// A vote, truncation or purge: wake the waiting call.
    Wait(tokio::sync::oneshot::Sender<io::Result<()>>, Done),
    /// Opening the store (no runtime needed).
    Blocking(std::sync::mpsc::SyncSender<io::Result<()>>),
}

/// Bookkeeping done when a flush completes.
pub struct Done {
    started: Instant,
    syncs: Arc<AtomicU64>,
    label: Arc<str>,
}

impl Done {
    fn finish(&self, res: &io::Result<()>) {
        if res.is_ok() {
            self.syncs.fetch_add(1, Ordering::Relaxed);
        }
        crate::stages::record(
            || format!("{}.log.flush", self.label),
            self.started.elapsed(),
        );
    }
}

impl raft_log::Callback for Flushed {
    fn send(self, res: Result<(), io::Error>) {
        match self {
            Flushed::Raft(cb, done) => {
                done.finish(&res);
                cb.log_io_completed(res);
            }
            Flushed::Wait(tx, done) => {
                done.finish(&res);
                let _ = tx.send(res);
            }
            Flushed::Blocking(tx) => {
                // The opener may have given up; nothing to tell then.
                let _ = std::sync::mpsc::SyncSender::send(&tx, res);
            }
        }
    }
}

/// The log store. Cheap to clone: the clone is openraft's log reader.
#[derive(Debug, Clone)]
pub struct LogStore {
    /// The data directory's lock, held by every store handle ([`LogStore::lock_weak`]).
    lock: Arc<super::DirLock>,
    wal: Arc<parking_lot::Mutex<RaftLog<LogTypes>>>,
    /// How many times the log was made stable (`fdatasync` returned): checked by tests.
    syncs: Arc<AtomicU64>,
    /// This node's name in [`crate::stages`] timings.
    label: Arc<str>,
}

fn io_err(e: impl Into<openraft::AnyError>) -> StorageError {
    StorageIOError::write(e).into()
}

fn to_log_id(id: &((u64, NodeId), u64)) -> LogId {
    LogId::new(CommittedLeaderId::new(id.0.0, id.0.1), id.1)
}

fn from_log_id(id: &LogId) -> ((u64, NodeId), u64) {
    ((id.leader_id.term, id.leader_id.node_id), id.index)
}

/// The `raft-log` configuration for `dir`.
fn wal_config(dir: &Path) -> raft_log::Config {
    let mut cfg = raft_log::Config::new(dir.display().to_string());
    cfg.log_cache_max_items = Some(CACHE_MAX_ITEMS);
    cfg.log_cache_capacity = Some(CACHE_MAX_BYTES);
    cfg.wal.chunk_max_size = Some(CHUNK_MAX_BYTES);
    cfg.wal.chunk_max_records = Some(CHUNK_MAX_RECORDS);
    // openraft 0.9 appends one batch at a time and waits for its flush: waiting for more
    // writes to share the sync would only add latency.
    cfg.wal.flush_batch_wait = Some(Duration::ZERO);
    cfg
}

impl LogStore {
    /// Opens (creating if needed) the log under `dir`.
    pub(super) fn open(lock: Arc<super::DirLock>, dir: &Path) -> Result<Self, super::OpenError> {
        let open_err = |e: io::Error| super::OpenError::Log {
            path: dir.display().to_string(),
            source: e,
        };
        std::fs::create_dir_all(dir).map_err(open_err)?;
        let wal = RaftLog::open(Arc::new(wal_config(dir))).map_err(open_err)?;
        Ok(Self {
            lock,
            wal: Arc::new(parking_lot::Mutex::new(wal)),
            syncs: Arc::default(),
            label: Arc::from("n?"),
        })
    }

    /// Names this node in [`crate::stages`] timings (`n<id>`).
    pub fn set_label(&mut self, label: String) {
        self.label = Arc::from(label);
    }

    /// How many flushes reached stable storage since the store was opened.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// A weak handle on the data directory's lock: once it no longer upgrades, every store
    /// handle is gone and the directory can be opened again.
    pub fn lock_weak(&self) -> std::sync::Weak<super::DirLock> {
        Arc::downgrade(&self.lock)
    }

    fn done(&self) -> Done {
        Done {
            started: Instant::now(),
            syncs: self.syncs.clone(),
            label: self.label.clone(),
        }
    }

    /// Queues everything written so far for the flush thread, which writes it and calls
    /// `fdatasync` before it wakes us.
    async fn flush(&self) -> Result<(), io::Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.wal
            .lock()
            .flush(true, Some(Flushed::Wait(tx, self.done())))?;
        rx.await
            .map_err(|_| io::Error::other("raft log flush thread stopped"))?
    }

    /// Moves a log kept in sled (before session 6) into this store, once: vote, purge point,
    /// entries and committed id are written and synced here; the caller then removes sled's
    /// copy. A crash in between leaves both; the next open finds this store non-empty and
    /// copies nothing.
    pub(super) fn migrate_from_sled(
        &self,
        log: &sled::Tree,
        meta: &sled::Tree,
    ) -> Result<(), io::Error> {
        if log.is_empty() && meta.is_empty() {
            return Ok(());
        }
        let get = |key: &[u8]| -> Result<Option<sled::IVec>, io::Error> {
            meta.get(key).map_err(io::Error::other)
        };
        let json = |bytes: &[u8]| -> Result<serde_json::Value, io::Error> {
            serde_json::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        };
        {
            let mut wal = self.wal.lock();
            let st = wal.log_state();
            let empty = st.vote().is_none() && st.last().is_none() && st.purged().is_none();
            if empty {
                if let Some(v) = get(meta::VOTE)? {
                    let vote: Vote<NodeId> = serde_json::from_value(json(&v)?)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    wal.save_vote(StoredVote(vote))?;
                }
                if let Some(p) = get(meta::LAST_PURGED)? {
                    let purged: LogId = serde_json::from_value(json(&p)?)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    wal.purge(from_log_id(&purged))?;
                }
                for item in log.iter() {
                    let (key, value) = item.map_err(io::Error::other)?;
                    if log_index(&key).is_none() {
                        continue;
                    }
                    let entry: Entry = serde_json::from_slice(&value)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    // Left over from a purge interrupted by a crash: below the purge point.
                    if wal
                        .log_state()
                        .purged()
                        .is_some_and(|p| entry.log_id.index <= p.1)
                    {
                        continue;
                    }
                    wal.append([(from_log_id(&entry.log_id), value.to_vec())])?;
                }
                if let Some(c) = get(meta::COMMITTED)? {
                    wal.save_user_data(Some(c.to_vec()))?;
                }
                tracing::info!("raft log moved from sled to raft-log");
            }
        }
        // Synced before sled forgets its copy.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.wal.lock().flush(true, Some(Flushed::Blocking(tx)))?;
        rx.recv()
            .map_err(|_| io::Error::other("raft log flush thread stopped"))?
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
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        let wal = self.wal.lock();
        let mut out = Vec::new();
        for item in wal.read(start, end) {
            let (_, payload) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(Self::decode(&payload)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let wal = self.wal.lock();
        let st = wal.log_state();
        let last_purged_log_id = st.purged().map(to_log_id);
        let last = st.last().map(to_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.max(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.wal
            .lock()
            .save_vote(StoredVote(*vote))
            .map_err(|e| StorageIOError::write_vote(&e))?;
        // A vote must be durable before it is sent, or a restarted node could vote twice in
        // one term.
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.wal.lock().log_state().vote().map(|v| v.0))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced on its own: it goes to disk with the next synced flush; a stale value only
        // means fewer entries are re-applied at start-up.
        let bytes = serde_json::to_vec(&committed).map_err(|e| io_err(&e))?;
        let mut wal = self.wal.lock();
        wal.save_user_data(Some(bytes)).map_err(|e| io_err(&e))?;
        wal.flush(false, None).map_err(|e| io_err(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let wal = self.wal.lock();
        let Some(bytes) = wal.log_state().user_data.as_ref() else {
            return Ok(None);
        };
        serde_json::from_slice::<Option<LogId>>(bytes).map_err(|e| StorageIOError::read(&e).into())
    }

    /// Queues the entries (readable at once from `raft-log`'s cache) and returns; openraft is
    /// told they are stable by `callback`, from the flush thread, after `fdatasync`.
    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let t0 = Instant::now();
        let mut records = Vec::new();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            records.push((from_log_id(&entry.log_id), bytes));
        }
        let mut wal = self.wal.lock();
        // Entries at or below the purge point are already covered by a snapshot: not stored
        // (openraft does not send them; its storage suite does, after `get_initial_state`
        // purged an empty log up to the state machine's last applied entry). Anything else out
        // of order is refused by `raft-log`.
        let purged = wal.log_state().purged().map(|p| p.1);
        records.retain(|(id, _)| purged.is_none_or(|p| id.1 > p));
        wal.append(records)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        wal.flush(true, Some(Flushed::Raft(callback, self.done())))
            .map_err(|e| StorageIOError::write_logs(&e))?;
        crate::stages::record(|| format!("{}.log.write", self.label), t0.elapsed());
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.wal
            .lock()
            .truncate(log_id.index)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // One record moves the purge point; whole chunk files below it are deleted by the
        // flush thread after that record is synced.
        self.wal
            .lock()
            .purge(from_log_id(&log_id))
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
