use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader, RaftSnapshotBuilder, Vote};

use super::*;
use crate::state::Cmd;
use crate::types::{Entry, LogId, Request, StorageError, TypeConfig};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
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
    Suite::test_all(SledBuilder)
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
    }
}

/// Everything acknowledged before a close is there after a reopen: vote, log, purge point,
/// applied state (records, counters, last_applied) and the snapshot.
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
        log.purge(log_id(3, 1)).await.unwrap();
        epoch_before = sm.handle().read().state.owners["carol"].epoch;
    }
    let (mut log, mut sm) = open(dir.path(), 16 << 20, 128).unwrap();
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
    let (_log2, mut sm2) = open(dir2.path(), 16 << 20, 128).unwrap();
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
    let (mut log, _sm) = open(dir.path(), 16 << 20, 128).unwrap();
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_log_id, Some(log_id(1, 2)));
}

/// Every acknowledged log operation (append, vote, truncate, purge) reached stable storage
/// first: each one is followed by an `fdatasync` of sled's data file before it returns.
/// `scripts/check-raft-fsync` runs this test under strace and counts the syscalls themselves.
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
    // The purge point is synced before the entries go, then the removal itself.
    assert_eq!(log.syncs(), 7);
}
