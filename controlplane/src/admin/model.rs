//! JSON bodies of the admin API (also what `gatectl` decodes).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How fresh a read is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// Confirmed with a quorum: reflects every write committed before the request.
    #[default]
    Linearizable,
    /// This node's applied state; may lag the leader by a few entries.
    Local,
}

/// `?consistency=` on reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ReadParams {
    pub consistency: Option<Consistency>,
    pub zone: Option<String>,
}

/// Every error body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// Machine-readable code: invalid_argument, not_found, conflict, fenced, failed_precondition,
    /// not_leader, unavailable, unauthorized, forbidden, raft, ...
    pub error: String,
    pub message: String,
    /// Where to send the request instead (with `not_leader`), if known.
    pub leader: Option<MemberInfo>,
}

/// A control-plane member.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberInfo {
    pub id: u64,
    pub grpc_addr: String,
    pub admin_addr: String,
    /// voter or learner.
    pub role: String,
    /// Highest log index known replicated to it (leader only).
    pub matched_index: Option<u64>,
}

/// Metadata of every read.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReadMeta {
    pub consistency: Consistency,
    /// Answering node.
    pub served_by: u64,
    /// Raft log index this answer reflects.
    pub applied_index: u64,
    /// State version (as in Watch).
    pub version: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Zone {
    pub zone: String,
    pub upstreams: usize,
    pub services: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ZonesReply {
    pub meta: ReadMeta,
    pub zones: Vec<Zone>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Upstream {
    pub instance_id: String,
    pub zone: String,
    pub address: String,
    pub service_name: String,
    pub registered_at_ms: i64,
    /// 0: a static registration that never expires.
    pub lease_expires_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UpstreamsReply {
    pub meta: ReadMeta,
    pub upstreams: Vec<Upstream>,
}

/// `POST /v1/upstreams`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterUpstream {
    pub zone: String,
    /// host:port
    pub address: String,
    pub service_name: String,
    /// Lease in ms; omitted = static registration (never expires; deregister to remove).
    pub lease_ttl_ms: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegisterUpstreamReply {
    pub upstream: Upstream,
    /// false: (zone, address, service) was already registered; this renewed it.
    pub created: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DpNode {
    pub node_id: String,
    pub quic_addr: String,
    pub grpc_addr: String,
    /// active, draining or dead.
    pub state: String,
    pub lease_expires_at_ms: i64,
    pub drain_requested: bool,
    pub sessions: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodesReply {
    pub meta: ReadMeta,
    pub nodes: Vec<DpNode>,
    pub failovers: Vec<Failover>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Failover {
    pub failed_node: String,
    pub decided_at_ms: i64,
    pub sessions: u64,
    pub moved_to: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Session {
    pub openid: String,
    pub session_id: String,
    pub owner_node: String,
    pub epoch: u64,
    pub changed_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionReply {
    pub meta: ReadMeta,
    /// null: nobody owns this openid.
    pub session: Option<Session>,
    /// Zone the openid hashes to.
    pub zone: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    pub node_id: u64,
    /// leader, follower, candidate, learner or shutdown.
    pub state: String,
    pub term: u64,
    pub leader: Option<MemberInfo>,
    pub members: Vec<MemberInfo>,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub committed_snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    /// Leader only: ms since a quorum last acknowledged it.
    pub millis_since_quorum_ack: Option<u64>,
}

/// `POST /v1/cluster/learners`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddLearner {
    pub id: u64,
    pub grpc_addr: String,
    pub admin_addr: String,
}

/// Any membership change.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MembershipReply {
    /// Log index of the committed membership entry.
    pub log_index: u64,
    pub members: Vec<MemberInfo>,
}

/// A write with nothing else to say.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Done {
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub node_id: u64,
    pub leader: Option<u64>,
}

/// What `POST /v1/cluster/restore` did. A restore merges: records the cluster already had are
/// kept (counted in `skipped`), nothing is deleted.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RestoreReply {
    pub upstreams: u64,
    pub nodes: u64,
    pub owners: u64,
    pub failovers: u64,
    pub skipped: u64,
    /// Every epoch handed out from now on exceeds this.
    pub last_epoch: u64,
    /// The raft index the backup covered on the cluster it came from.
    pub backup_last_applied_index: Option<u64>,
    pub backup_created_at_ms: i64,
    /// `sha256:<hex>` of the restored payload.
    pub checksum: String,
}
