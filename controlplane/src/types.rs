//! The openraft type configuration: what a raft entry carries and what a member is.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{Cmd, CmdResult};

/// A control-plane node's raft id. Stable for the life of its data directory; a node whose disk
/// was lost must rejoin under a new id (PITFALLS §3).
pub type NodeId = u64;

/// What the membership records about a control-plane node: where to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `host:port` of its gRPC port (raft + the data-plane API).
    pub grpc_addr: String,
    /// `host:port` of its admin HTTP API (returned to clients as the leader's address).
    pub admin_addr: String,
}

/// One raft entry: a batch of commands stamped with the leader's clock.
///
/// Every replica computes lease expiry from `now_ms`, never from its own clock, so applying
/// the log is a pure function of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Milliseconds since the Unix epoch on the leader that proposed the entry.
    pub now_ms: i64,
    /// Applied in order; one result each.
    pub cmds: Vec<Cmd>,
}

/// The results of one entry's commands, in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub results: Vec<CmdResult>,
}

openraft::declare_raft_types!(
    /// GateSvr's raft types.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A storage error.
pub type StorageError = openraft::StorageError<NodeId>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
/// Membership as stored in the log and snapshots.
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
