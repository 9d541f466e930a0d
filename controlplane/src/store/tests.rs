use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader, RaftSnapshotBuilder, Vote};

use super::*;
use crate::state::Cmd;
use crate::types::{Entry, LogId, Request, StorageError, TypeConfig};

struct FileBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for FileBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
        let (log, sm) = open(dir.path(), 16 << 20, 128)
            .map_err(|e| openraft::StorageIOError::write(&std::io::Error::other(e.to_string())))?;
        Ok((dir, log, sm))
    }
}

/// openraft's storage conformance suite. It builds its own runtime, so a plain `#[test]`.
#[test]
fn openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(FileBuilder)
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64, cmds: Vec<Cmd>) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Request { now_ms: 0, cmds }),
    }
}

fn register(node: &str) -> Cmd {
    Cmd::RegisterNode {
        node_id: node.into(),
        quic_addr: "q".into(),
        grpc_addr: "g".into(),
        lease_ttl_ms: 60_000,
    }
}

fn claim(node: &str, openid: &str) -> Cmd {
    Cmd::Claim {
        node_id: node.into(),
        openid: openid.into(),
        session_id: "s".into(),
        fresh_session_id: String::new(),
    }
}

/// Everything acknowledged before a close is there after a reopen: vote, log, purge point,
/// the snapshot, and the applied state (records, counters, last_applied), which is the
/// snapshot's plus the committed entries openraft re-applies at start.
#[tokio::test]
async fn reopen_keeps_vote_log_state_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let epoch_before;
    {
        let (mut log, mut sm) = open(dir.path(), 16 << 20, 128).unwrap();
        log.save_vote(&Vote::new(3, 1)).await.unwrap();
        let entries = vec![
            entry(3, 1, vec![register("a")]),
            entry(3, 2, vec![claim("a", "alice"), claim("a", "bob")]),
            entry(3, 3, vec![claim("a", "carol")]),
        ];
        openraft::storage::RaftLogStorageExt::blocking_append(&mut log, entries.clone())
            .await
            .unwrap();
        sm.apply(entries[..2].to_vec()).await.unwrap();
        let mut builder = sm.get_snapshot_builder().await;
        builder.build_snapshot().await.unwrap();
        sm.apply(entries[2..].to_vec()).await.unwrap();
        log.save_committed(Some(log_id(3, 3))).await.unwrap();
        // Synced, and the committed id with it.
        log.purge(log_id(3, 1)).await.unwrap();
        epoch_before = sm.handle().read().state.owners["carol"].epoch;
    }
    let (mut log, mut sm) = reopen(dir.path()).await;
    // Only the snapshot's state is read; nothing else is stored for the state machine.
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(3, 2)));
    assert_eq!(sm.handle().read().state.owners.len(), 2);
    openraft::storage::StorageHelper::new(&mut log, &mut sm)
        .get_initial_state()
        .await
        .unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(log_id(3, 1)));
    assert_eq!(st.last_log_id, Some(log_id(3, 3)));
    let got = log.try_get_log_entries(0..10).await.unwrap();
    assert_eq!(
        got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        vec![2, 3]
    );
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(3, 3)));
    let handle = sm.handle();
    {
        let inner = handle.read();
        assert_eq!(inner.state.owners.len(), 3);
        assert_eq!(inner.state.owners["carol"].epoch, epoch_before);
        assert_eq!(inner.state.last_epoch, epoch_before);
    }
    let snap = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(3, 2)));

    // Installing that snapshot on a fresh store reproduces the state as of index 2.
    let dir2 = tempfile::tempdir().unwrap();
    let (log2, mut sm2) = open(dir2.path(), 16 << 20, 128).unwrap();
    sm2.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    drop((log2, sm2));
    let (_log2, mut sm2) = reopen(dir2.path()).await;
    assert_eq!(sm2.applied_state().await.unwrap().0, Some(log_id(3, 2)));
    assert_eq!(sm2.handle().read().state.owners.len(), 2);
}

/// A truncated suffix stays gone after a reopen (a node that rejoins with an old, conflicting
/// log has the conflicting entries removed durably).
#[tokio::test]
async fn truncate_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = open(dir.path(), 16 << 20, 128).unwrap();
        let entries: Vec<Entry> = (1..=5).map(|i| entry(1, i, vec![])).collect();
        openraft::storage::RaftLogStorageExt::blocking_append(&mut log, entries)
            .await
            .unwrap();
        log.truncate(log_id(1, 3)).await.unwrap();
    }
    let (mut log, _sm) = reopen(dir.path()).await;
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_log_id, Some(log_id(1, 2)));
}

/// Every acknowledged log operation (append, vote, truncate, purge) reached stable storage
/// first: each one is followed by an `fdatasync` of the log's chunk file before openraft is
/// told (an append's callback) or the call returns. `scripts/check-raft-fsync` runs this test
/// under strace and counts the syscalls themselves.
#[tokio::test]
async fn appends_votes_truncates_and_purges_are_synced() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open(dir.path(), 16 << 20, 128).unwrap();
    assert_eq!(log.syncs(), 0);
    for i in 1..=3 {
        openraft::storage::RaftLogStorageExt::blocking_append(&mut log, [entry(1, i, vec![])])
            .await
            .unwrap();
    }
    assert_eq!(log.syncs(), 3, "one fdatasync per append");
    log.save_vote(&Vote::new(2, 1)).await.unwrap();
    assert_eq!(log.syncs(), 4, "the vote is synced before it returns");
    log.truncate(log_id(1, 3)).await.unwrap();
    assert_eq!(log.syncs(), 5, "a truncation is synced");
    log.purge(log_id(1, 1)).await.unwrap();
    assert_eq!(log.syncs(), 6, "a purge is synced");
}

/// Opens the store in `dir` again. The data directory's lock goes with the last store
/// handle; a reopen retries for up to 5 s in case a task still holds one.
async fn reopen(dir: &std::path::Path) -> (LogStore, StateMachineStore) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match open(dir, 16 << 20, 128) {
            Ok(stores) => return stores,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("reopen: {e}; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

/// A second open of a data directory in use fails by name (two members on one volume would
/// otherwise write one log from two processes); it opens once the first is closed.
#[tokio::test]
async fn a_data_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), 16 << 20, 128).unwrap();
    let err = open(dir.path(), 16 << 20, 128).unwrap_err();
    assert!(matches!(err, OpenError::Locked { .. }), "{err}");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    drop(first);
    open(dir.path(), 16 << 20, 128).unwrap();
}

/// A state with one node and the claims of `openids`, snapshotted, as the snapshot's stored
/// metadata and payload.
async fn snapshot_of(openids: &[&str]) -> (crate::types::SnapshotMeta, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path(), 16 << 20, 128).unwrap();
    let mut cmds = vec![register("a")];
    cmds.extend(openids.iter().map(|o| claim("a", o)));
    sm.apply(vec![entry(1, 1, cmds)]).await.unwrap();
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    (snap.meta, snap.snapshot.into_inner())
}

/// A `raft.sled` as versions before session 14 wrote it, with `meta` and `data` as the
/// snapshot in tree `snapshot` (flushed).
fn sled_with_snapshot(
    path: &std::path::Path,
    meta: &crate::types::SnapshotMeta,
    data: &[u8],
) -> sled::Db {
    let db = sled::Config::new().path(path).open().unwrap();
    let snapshot = db.open_tree("snapshot").unwrap();
    snapshot
        .insert(keyspace::snapshot::META, serde_json::to_vec(meta).unwrap())
        .unwrap();
    snapshot.insert(keyspace::snapshot::DATA, data).unwrap();
    db.flush().unwrap();
    db
}

/// A data directory written before session 14 (`raft.sled` with its snapshot in tree
/// `snapshot`, and tree `sm`, the write-through copy of sessions before 13) opens with the
/// snapshot's state; the snapshot is in the file, `raft.sled` is gone, and the next open
/// reads the file alone.
#[tokio::test]
async fn a_data_directory_kept_in_sled_is_moved_on_open() {
    let (meta, data) = snapshot_of(&["alice", "bob"]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.sled");
    {
        let db = sled_with_snapshot(&path, &meta, &data);
        let sm = db.open_tree("sm").unwrap();
        sm.insert(b"o/mallory", b"{}".to_vec()).unwrap();
        db.flush().unwrap();
    }
    for _ in 0..2 {
        let (_log, mut sm) = reopen(dir.path()).await;
        assert!(!path.exists(), "raft.sled is still there");
        assert_eq!(sm.applied_state().await.unwrap().0, meta.last_log_id);
        let owners: Vec<String> = sm.handle().read().state.owners.keys().cloned().collect();
        assert_eq!(owners, ["alice", "bob"]);
        assert!(dir.path().join("snapshot").exists());
    }
}

/// A snapshot in `raft.sled` that does not decode stops the open with an error naming it, and
/// the move leaves everything where it was: `raft.sled` is kept (a fixed binary or a restore
/// from a peer can still use it) and no snapshot file is made from it. The open succeeds once
/// the snapshot there decodes.
#[tokio::test]
async fn a_damaged_snapshot_in_sled_stops_the_move_and_keeps_sled() {
    let (meta, data) = snapshot_of(&["alice"]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.sled");
    drop(sled_with_snapshot(&path, &meta, b"{\"owners\": 17"));
    let err = open(dir.path(), 16 << 20, 128).unwrap_err();
    assert!(
        matches!(&err, OpenError::Decode { what, .. } if what == "snapshot"),
        "{err}"
    );
    assert!(path.exists(), "raft.sled was removed after a failed move");
    assert!(
        !dir.path().join("snapshot").exists(),
        "a snapshot file was made"
    );
    drop(sled_with_snapshot(&path, &meta, &data));
    let (_log, sm) = reopen(dir.path()).await;
    assert!(!path.exists(), "raft.sled is still there");
    let owners: Vec<String> = sm.handle().read().state.owners.keys().cloned().collect();
    assert_eq!(owners, ["alice"]);
}

/// A snapshot that does not decode (a damaged disk, a newer format) stops the open with an
/// error naming it, instead of a member starting from an empty state: a payload that is not
/// a state, and a file whose bytes no longer match their checksum.
#[tokio::test]
async fn a_snapshot_that_does_not_decode_fails_the_open() {
    let (meta, data) = snapshot_of(&["alice"]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = snapshot::SnapshotFile::open(dir.path()).unwrap();
    file.save(&meta, b"{not json").unwrap();
    let err = open(dir.path(), 16 << 20, 128).unwrap_err();
    assert!(
        matches!(&err, OpenError::Decode { what, .. } if what == "snapshot"),
        "{err}"
    );
    file.save(&meta, &data).unwrap();
    drop(open(dir.path(), 16 << 20, 128).unwrap());
    let path = dir.path().join("snapshot");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();
    let err = open(dir.path(), 16 << 20, 128).unwrap_err();
    assert!(
        matches!(&err, OpenError::Decode { what, message } if what == "snapshot" && message.contains("checksum")),
        "{err}"
    );
}

/// A log written by an earlier version (in sled's `log` and `meta` trees) is moved to the
/// raft-log store on open: vote, purge point, entries and committed id survive, and sled's
/// copy is gone.
#[tokio::test]
async fn a_log_kept_in_sled_is_moved_on_open() {
    use super::keyspace::{KeySpace, LogEntries, meta};
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::Config::new()
            .path(dir.path().join("raft.sled"))
            .open()
            .unwrap();
        let log = db.open_tree("log").unwrap();
        let m = db.open_tree("meta").unwrap();
        m.insert(
            meta::VOTE,
            serde_json::to_vec(&Vote::<u64>::new(4, 2)).unwrap(),
        )
        .unwrap();
        m.insert(
            meta::LAST_PURGED,
            serde_json::to_vec(&log_id(3, 1)).unwrap(),
        )
        .unwrap();
        m.insert(
            meta::COMMITTED,
            serde_json::to_vec(&Some(log_id(4, 3))).unwrap(),
        )
        .unwrap();
        for e in [
            entry(3, 1, vec![]),
            entry(3, 2, vec![register("a")]),
            entry(4, 3, vec![claim("a", "alice")]),
        ] {
            log.insert(
                LogEntries::key(&e.log_id.index),
                serde_json::to_vec(&e).unwrap(),
            )
            .unwrap();
        }
        db.flush().unwrap();
    }
    for _ in 0..2 {
        let (mut log, _sm) = reopen(dir.path()).await;
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(4, 2)));
        let st = log.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(log_id(3, 1)));
        assert_eq!(st.last_log_id, Some(log_id(4, 3)));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(4, 3)));
        let got = log.try_get_log_entries(0..10).await.unwrap();
        assert_eq!(
            got.iter().map(|e| e.log_id).collect::<Vec<_>>(),
            vec![log_id(3, 2), log_id(4, 3)]
        );
    }
    assert!(
        !dir.path().join("raft.sled").exists(),
        "sled's copy is gone"
    );
}

/// Purged entries stay purged across a reopen; the later ones are kept.
#[tokio::test]
async fn purge_then_reopen_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = open(dir.path(), 16 << 20, 128).unwrap();
        let entries: Vec<Entry> = (1..=200)
            .map(|i| entry(1, i, vec![claim("a", "x")]))
            .collect();
        openraft::storage::RaftLogStorageExt::blocking_append(&mut log, entries)
            .await
            .unwrap();
        log.purge(log_id(1, 150)).await.unwrap();
    }
    let (mut log, _sm) = reopen(dir.path()).await;
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(log_id(1, 150)));
    assert_eq!(st.last_log_id, Some(log_id(1, 200)));
    let got = log.try_get_log_entries(151..=200).await.unwrap();
    assert_eq!(got.len(), 50);
    assert_eq!(got[0].log_id, log_id(1, 151));
}
