//! The state machine store (openraft `RaftStateMachine`): [`State`] in memory only, with
//! the current snapshot in one file ([`SnapshotFile`]).
//!
//! Applying an entry touches memory and nothing else: the raft log is the state machine's
//! durable record. At start the state is the current snapshot's, and openraft re-applies the
//! committed entries after it (`StorageHelper::get_initial_state`); the log keeps every entry
//! after the snapshot, since openraft purges only what a snapshot that is already on stable
//! storage covers. Until session 13 every applied batch was also written through to sled
//! tree `sm`: that cost each member sled's encoding, its I/O threads and one
//! `sync_file_range` per sealed buffer, and it was ~30% of a loaded control plane's CPU
//! (docs/benchmarks.md, "Session 13"). A data directory that still has sled is moved
//! to today's layout at open (`store::open`).
//!
//! A snapshot is built off the async runtime: the state is copied under the read lock (O(1):
//! the owner map shares its nodes, `state::Owners`), then encoded and saved on a thread of
//! its own at a lower CPU priority, so a member's heartbeats and appends do not wait for the
//! encoding of a million owners.

use std::io::Cursor;
use std::sync::Arc;

use gatesvr_proto::control::{WatchEvent, watch_event};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use parking_lot::{RwLock, RwLockReadGuard};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::OpenError;
use super::snapshot::SnapshotFile;
use crate::convert;
use crate::state::{State, Touched};
use crate::types::{
    Entry, LogId, Response, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::watch::{Hub, HubMsg};

/// Format version of snapshot payloads (`SnapshotPayload::format`).
const SNAPSHOT_FORMAT: u32 = 1;

/// What a snapshot carries (JSON). Raft metadata travels in `SnapshotMeta` beside it.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotPayload {
    format: u32,
    state: State,
}

/// In-memory view, guarded by one lock so readers see applied state and watch history agree.
#[derive(Debug)]
pub struct SmInner {
    pub state: State,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    hub: Hub,
}

#[derive(Debug)]
struct Shared {
    /// The data directory's lock (see `store::DirLock`), held while this store lives.
    _lock: Arc<super::DirLock>,
    snapshot: SnapshotFile,
    inner: RwLock<SmInner>,
}

/// Read access to the applied state for the APIs (never blocks raft for long: reads are
/// in-memory).
#[derive(Debug, Clone)]
pub struct SmHandle(Arc<Shared>);

impl SmHandle {
    /// The applied state, locked for reading. Do not hold it across an `.await`.
    pub fn read(&self) -> RwLockReadGuard<'_, SmInner> {
        self.0.inner.read()
    }

    /// Index of the last applied log entry (0 if none).
    pub fn applied_index(&self) -> u64 {
        self.read().last_applied.map_or(0, |l| l.index)
    }

    /// Starts a watch: the events to send first (deltas after `from_version` if still in the
    /// ring, else a snapshot, in chunks if `chunked`) and a receiver for everything after them.
    /// A watcher scoped to node `scope` gets only what concerns it (`watch::HubEvent`).
    pub fn watch_from(
        &self,
        from_version: u64,
        chunked: bool,
        scope: Option<&str>,
    ) -> (Vec<WatchEvent>, broadcast::Receiver<HubMsg>) {
        let inner = self.read();
        let rx = inner.hub.subscribe();
        let first = match inner.hub.since(from_version, inner.state.version, scope) {
            Some(events) => events,
            None => snapshot_events(&inner.state, chunked, scope),
        };
        (first, rx)
    }

    /// The current state as snapshot events: one, or chunks of about
    /// [`gatesvr_proto::limits::CHUNK_BYTES`] for a watcher that takes them
    /// (only the owners of node `scope`, if set).
    pub fn snapshot_events(&self, chunked: bool, scope: Option<&str>) -> Vec<WatchEvent> {
        snapshot_events(&self.read().state, chunked, scope)
    }

    /// Receivers of the watch broadcast (watch streams, plus the metrics counter).
    pub fn watch_receivers(&self) -> usize {
        self.read().hub.receiver_count()
    }

    /// A receiver of every event published from now on (no history).
    pub fn subscribe(&self) -> broadcast::Receiver<HubMsg> {
        self.read().hub.subscribe()
    }

    /// Bytes of the current stored snapshot's payload (0 if none yet).
    pub fn snapshot_bytes(&self) -> u64 {
        self.0.snapshot.bytes()
    }
}

fn snapshot_events(st: &State, chunked: bool, scope: Option<&str>) -> Vec<WatchEvent> {
    if !chunked {
        return vec![WatchEvent {
            version: st.version,
            event: Some(watch_event::Event::Snapshot(convert::snapshot(st, scope))),
        }];
    }
    convert::snapshot_chunks(st, gatesvr_proto::limits::CHUNK_BYTES, scope)
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| WatchEvent {
            version: st.version,
            event: Some(if i == 0 {
                watch_event::Event::Snapshot(chunk)
            } else {
                watch_event::Event::SnapshotMore(chunk)
            }),
        })
        .collect()
}

/// The openraft state machine.
#[derive(Debug)]
pub struct StateMachineStore(Arc<Shared>);

/// Builds snapshots from a consistent copy of the state.
#[derive(Debug)]
pub struct SnapshotBuilder(Arc<Shared>);

fn decode_err(what: &str, e: impl std::fmt::Display) -> OpenError {
    OpenError::Decode {
        what: what.into(),
        message: e.to_string(),
    }
}

pub(super) fn decode_snapshot(meta: &SnapshotMeta, data: &[u8]) -> Result<State, StorageError> {
    let payload: SnapshotPayload = serde_json::from_slice(data)
        .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
    if payload.format != SNAPSHOT_FORMAT {
        let e = std::io::Error::other(format!(
            "snapshot format {} is not supported (expected {SNAPSHOT_FORMAT})",
            payload.format
        ));
        return Err(StorageIOError::read_snapshot(Some(meta.signature()), &e).into());
    }
    Ok(payload.state)
}

impl StateMachineStore {
    /// The state of the current snapshot (empty if none): openraft re-applies the committed
    /// log after it.
    pub(super) fn open(
        lock: Arc<super::DirLock>,
        snapshot: SnapshotFile,
        watch_ring: usize,
    ) -> Result<Self, OpenError> {
        let mut shared = Shared {
            _lock: lock,
            snapshot,
            inner: RwLock::new(SmInner {
                state: State::default(),
                last_applied: None,
                membership: StoredMembership::default(),
                hub: Hub::new(watch_ring),
            }),
        };
        if let Some((meta, data)) = shared
            .snapshot
            .load()
            .map_err(|e| decode_err("snapshot", e))?
        {
            let state = decode_snapshot(&meta, &data).map_err(|e| decode_err("snapshot", e))?;
            let inner = shared.inner.get_mut();
            inner.state = state;
            inner.last_applied = meta.last_log_id;
            inner.membership = meta.last_membership;
        }
        Ok(Self(Arc::new(shared)))
    }

    /// A read handle for the APIs.
    pub fn handle(&self) -> SmHandle {
        SmHandle(self.0.clone())
    }
}

fn snapshot_write_err(meta: &SnapshotMeta, e: &std::io::Error) -> StorageError {
    StorageIOError::write_snapshot(Some(meta.signature()), e).into()
}

/// Niceness a snapshot build's thread adds to its process's (Linux; at most 19): on a busy core the runtime (heartbeats,
/// appends, claims) goes first and the build takes what is left. The three members of
/// `gate-bench claims` share one core and reach their snapshot points together: at normal
/// priority their three encoders left the runtime a quarter of it, and claims queued for up
/// to 200 ms (docs/benchmarks.md, "Session 14").
const SNAPSHOT_NICE: i32 = 10;

/// Runs a snapshot build on a thread of its own at a lower CPU priority ([`SNAPSHOT_NICE`]).
async fn in_background<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cp-snapshot".into())
        .spawn(move || {
            #[cfg(target_os = "linux")]
            lower_priority();
            let _ = tx.send(f());
        })
        .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
    rx.await.map_err(|_| {
        let e = std::io::Error::other("snapshot thread panicked");
        StorageIOError::write_snapshot(None, &e)
    })?
}

/// Lowers the calling thread's priority by [`SNAPSHOT_NICE`], relative to what it inherited: a
/// member run at nice 5 builds its snapshots at 15, never above its own priority.
#[cfg(target_os = "linux")]
fn lower_priority() {
    let me = Some(rustix::thread::gettid());
    let lowered = rustix::process::getpriority_process(me)
        .and_then(|nice| rustix::process::setpriority_process(me, (nice + SNAPSHOT_NICE).min(19)));
    if let Err(e) = lowered {
        tracing::debug!(error = %e, "snapshot thread keeps its priority");
    }
}

/// Runs blocking snapshot work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, &e))?
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let t0 = std::time::Instant::now();
        let (state, last_applied, membership) = {
            let inner = self.0.inner.read();
            (
                inner.state.clone(),
                inner.last_applied,
                inner.membership.clone(),
            )
        };
        crate::stages::record(|| "sm.snapshot.clone".into(), t0.elapsed());
        // Unique even for two snapshots at the same log id.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{nanos}", l.leader_id, l.index),
            None => format!("none-{nanos}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let shared = self.0.clone();
        let (meta, data) = in_background(move || {
            let t1 = std::time::Instant::now();
            let payload = SnapshotPayload {
                format: SNAPSHOT_FORMAT,
                state,
            };
            let data =
                serde_json::to_vec(&payload).map_err(|e| StorageIOError::read_state_machine(&e))?;
            drop(payload);
            let t2 = std::time::Instant::now();
            crate::stages::record(|| "sm.snapshot.encode".into(), t2 - t1);
            shared
                .snapshot
                .save(&meta, &data)
                .map_err(|e| snapshot_write_err(&meta, &e))?;
            crate::stages::record(|| "sm.snapshot.save".into(), t2.elapsed());
            Ok((meta, data))
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let inner = self.0.inner.read();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let t0 = std::time::Instant::now();
        let mut guard = self.0.inner.write();
        let inner = &mut *guard;
        let mut responses = Vec::new();
        let mut touched: Vec<Touched> = Vec::new();
        let mut events = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Response::default()),
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), m);
                    responses.push(Response::default());
                }
                EntryPayload::Normal(req) => {
                    let mut results = Vec::with_capacity(req.cmds.len());
                    for cmd in &req.cmds {
                        let from = touched.len();
                        results.push(inner.state.apply(req.now_ms, cmd, &mut touched));
                        // Events show the value right after this command.
                        for t in &touched[from..] {
                            if let Some(v) = t.version {
                                events.push(convert::hub_event(&inner.state, t, v));
                            }
                        }
                    }
                    responses.push(Response { results });
                }
            }
        }
        inner.hub.publish(events);
        crate::stages::record(|| "sm.apply".into(), t0.elapsed());
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder(self.0.clone())
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let shared = self.0.clone();
        let stored = meta.clone();
        // Decoded and on stable storage before it replaces the state in memory.
        let state = blocking(move || {
            let state = decode_snapshot(&stored, &data)?;
            shared
                .snapshot
                .save(&stored, &data)
                .map_err(|e| snapshot_write_err(&stored, &e))?;
            Ok(state)
        })
        .await?;
        let mut guard = self.0.inner.write();
        let inner = &mut *guard;
        inner.state = state;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.hub.reset();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let shared = self.0.clone();
        let current = blocking(move || {
            shared
                .snapshot
                .load()
                .map_err(|e| StorageIOError::read_snapshot(None, &e).into())
        })
        .await?;
        Ok(current.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn own_nice() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
    }

    /// A snapshot build runs on a thread [`SNAPSHOT_NICE`] below the caller's priority (as low
    /// as 19 at most), so on a busy core the runtime goes first.
    #[tokio::test]
    async fn a_snapshot_build_runs_at_a_lower_priority() {
        let caller = own_nice();
        let builder = in_background(|| Ok(own_nice())).await.unwrap();
        assert_eq!(builder, (caller + SNAPSHOT_NICE).min(19));
        assert!(caller == 19 || builder > caller, "{builder} vs {caller}");
    }
}
