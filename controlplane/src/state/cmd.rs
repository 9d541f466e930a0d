//! The typed commands replicated through the raft log, and their results.
//!
//! These are persisted (in log entries) and replicated between versions during a rolling
//! upgrade: add variants and `#[serde(default)]` fields only; never rename or remove one.
//! `state::tests::golden_*` pins the encoding.

use serde::{Deserialize, Serialize};

use super::{OwnerRec, State, UpstreamRec};

/// One state change. Proposed by any node, stamped with the leader's clock, applied in log order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "cmd")]
pub enum Cmd {
    /// Register an upstream. Idempotent on (zone, address, service): re-registering renews the
    /// lease and keeps the first instance id.
    RegisterUpstream {
        /// Chosen by the proposer; used only if this creates a registration.
        instance_id: String,
        zone: String,
        address: String,
        service_name: String,
        /// `None`: a static registration (operator-made) that never expires.
        lease_ttl_ms: Option<u32>,
    },
    /// Renew an upstream's lease.
    HeartbeatUpstream { instance_id: String },
    /// Remove an upstream registration.
    DeregisterUpstream { instance_id: String },
    /// Register (or re-register after death) a data-plane node; it becomes active.
    RegisterNode {
        node_id: String,
        quic_addr: String,
        grpc_addr: String,
        lease_ttl_ms: u32,
    },
    /// Renew a data-plane node's lease; `draining` moves it to draining (sticky).
    HeartbeatNode {
        node_id: String,
        draining: bool,
        sessions: u64,
    },
    /// An operator asks a node to drain.
    DrainNode { node_id: String },
    /// Expire every node and upstream whose lease ended before the entry's `now_ms`.
    /// Proposed by the leader's lease task; a no-op if heartbeats arrived in between.
    ExpireLeases,
    /// `node_id` takes ownership of `openid`'s session.
    Claim {
        node_id: String,
        openid: String,
        session_id: String,
        /// A Start resuming `session_id`: the id of the fresh session it makes if the resume
        /// fails. Recorded beside `session_id` ([`OwnerRec::fresh_session_id`]). Absent in
        /// entries written before it existed (and omitted when empty: same bytes as before).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        fresh_session_id: String,
    },
    /// `node_id` gives up `openid` if it still owns it at `epoch`.
    Release {
        node_id: String,
        openid: String,
        epoch: u64,
    },
    /// Move `openid` to `to_node` if its epoch is still `expected_epoch`.
    Transfer {
        openid: String,
        expected_epoch: u64,
        to_node: String,
    },
    /// A drained data-plane node leaves the cluster for good (the last call of its drain).
    /// It becomes `left` at once instead of `dead` after its lease. Sessions still recorded
    /// as its own stay pointed at it, so the next claimant takes them over from a gone owner
    /// (replica recovery), and a failover decision counts them; it may own nothing more
    /// until it registers again.
    LeaveNode { node_id: String },
    /// Restore a backup (`gatectl snapshot import`). Merges: records the running cluster
    /// already has win (they are newer than any backup); everything else is taken from the
    /// backup, leases re-stamped from this entry's time; epochs jump past both (see
    /// [`crate::state::RESTORE_EPOCH_GAP`]). Never deletes anything.
    Restore {
        /// The backup's state (boxed: far larger than every other command).
        state: Box<State>,
        /// `sha256:<hex>` of the backup's payload, for the record.
        checksum: String,
    },
    /// An operator cordons (`true`) or uncordons a node: a cordoned node keeps the sessions
    /// it owns but its claims of new ones are refused.
    CordonNode { node_id: String, cordoned: bool },
    /// An operator withdraws a drain request the node has not acted on yet.
    CancelDrain { node_id: String },
    /// An operator forgets a dead or departed node (its record, not its sessions' owners).
    RemoveNode { node_id: String },
    /// An operator disconnects a session: ownership moves to
    /// [`crate::state::DISCONNECTED_OWNER`] at a new epoch, so the holding node closes it.
    DisconnectSession { openid: String },
    /// Lifecycle upkeep, committed by the leader's lease keeper: releases the owner records
    /// still held by a dead or departed node (or by no known node) `orphan_timeout_ms` after
    /// it departed (their clients did not come back to be claimed elsewhere), and removes
    /// the records of nodes departed more than `node_retention_ms` ago. The limits travel in
    /// the command so that every replica applies the same rule.
    Sweep {
        orphan_timeout_ms: u64,
        node_retention_ms: u64,
    },
}

/// Why a command was refused by the state machine. Deterministic: every replica refuses alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "error")]
pub enum CmdError {
    /// The named upstream, node or session does not exist.
    #[error("{what} not found")]
    NotFound { what: String },
    /// The request conflicts with an existing registration.
    #[error("{message}")]
    Conflict { message: String },
    /// The caller acted on an old epoch (fencing); the record has moved on.
    #[error("fenced: {openid} is at epoch {current_epoch} owned by {owner}")]
    Fenced {
        openid: String,
        current_epoch: u64,
        owner: String,
    },
    /// The data-plane node is unknown, dead or its lease has lapsed: register again.
    #[error("node {node_id} is not active ({reason}); register again")]
    NodeNotActive { node_id: String, reason: String },
    /// A malformed command (caught here only if a proposer skipped validation).
    #[error("invalid: {message}")]
    Invalid { message: String },
}

/// The outcome of one [`Cmd`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum CmdResult {
    /// Done; nothing to report.
    Ok,
    /// An upstream registration (new or renewed).
    Upstream {
        upstream: UpstreamRec,
        created: bool,
    },
    /// A renewed lease.
    Lease {
        lease_expires_at_ms: i64,
        drain_requested: bool,
    },
    /// A claim or transfer succeeded.
    Owned {
        openid: String,
        owner: OwnerRec,
        /// The owner before, if it changed.
        previous_owner: Option<String>,
        previous_epoch: u64,
    },
    /// A release: `true` if removed, `false` if fenced (stale epoch / other owner / gone).
    Released { released: bool },
    /// What a `Restore` added (records the running cluster already had are skipped).
    Restored {
        upstreams: u64,
        nodes: u64,
        owners: u64,
        failovers: u64,
        skipped: u64,
        /// The epoch the next ownership change will exceed.
        last_epoch: u64,
    },
    /// A node left; `orphaned` sessions were still recorded as its own.
    Left { orphaned: u64 },
    /// What `ExpireLeases` expired.
    Expired {
        nodes: Vec<String>,
        upstreams: Vec<String>,
    },
    /// Refused.
    Err(CmdError),
}

impl CmdResult {
    /// The error, if this result is one.
    pub fn err(&self) -> Option<&CmdError> {
        match self {
            CmdResult::Err(e) => Some(e),
            _ => None,
        }
    }
}
