//! JSON bodies of the admin API (also what `gatectl` decodes).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

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
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadParams {
    /// linearizable (default) or local.
    pub consistency: Option<Consistency>,
}

/// `GET /v1/upstreams` query.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UpstreamParams {
    /// linearizable (default) or local.
    pub consistency: Option<Consistency>,
    /// Only this zone's upstreams (one of the configured zone ids).
    pub zone: Option<String>,
}

/// Most sessions one page of `GET /v1/sessions` holds.
pub const MAX_PAGE: u32 = 1000;

/// `GET /v1/sessions` query: filters and a cursor.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionsParams {
    /// linearizable (default) or local.
    pub consistency: Option<Consistency>,
    /// Only sessions owned by this data-plane node.
    pub node: Option<String>,
    /// Only sessions whose openid hashes to this zone.
    pub zone: Option<String>,
    /// Only openids starting with this.
    pub prefix: Option<String>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Cursor: the `next_after` of the previous page (openids after this one).
    pub after: Option<String>,
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

/// A zone and the upstreams registered for it.
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
    /// One of the configured zone ids.
    pub zone: String,
    /// host:port (IP or DNS name, port 1..=65535).
    #[schema(
        max_length = 255,
        pattern = r"^[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"
    )]
    pub address: String,
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub service_name: String,
    /// Lease in ms; omitted = static registration (never expires; deregister to remove).
    #[serde(default, deserialize_with = "int::opt_u32")]
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
    /// Keeps its sessions, takes no new ones.
    #[serde(default)]
    pub cordoned: bool,
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
    /// Empty: an operator disconnected it; the next node it connects to claims it.
    pub owner_node: String,
    pub epoch: u64,
    pub changed_at_ms: i64,
    /// Zone the openid hashes to.
    #[serde(default)]
    pub zone: String,
}

/// One page of `GET /v1/sessions`, in openid order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionsPage {
    pub meta: ReadMeta,
    pub sessions: Vec<Session>,
    /// Pass as `after` for the next page; null on the last page.
    pub next_after: Option<String>,
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
    #[serde(deserialize_with = "int::u64")]
    pub id: u64,
    /// host:port of its gRPC (raft) port; no existing member's.
    #[schema(
        max_length = 255,
        pattern = r"^[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"
    )]
    pub grpc_addr: String,
    /// host:port of its admin API; no existing member's.
    #[schema(
        max_length = 255,
        pattern = r"^[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"
    )]
    pub admin_addr: String,
}

/// Any membership change.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MembershipReply {
    /// The member this change was about.
    #[serde(default)]
    pub node_id: u64,
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

/// `{node_id}` in a path.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct NodePath {
    /// The data-plane node's id.
    #[param(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub node_id: String,
}

/// `{openid}` in a path.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct OpenidPath {
    /// The user's openid.
    #[param(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub openid: String,
}

/// Integers in request bodies as JSON Schema defines them: `5` and `5.0` are the same
/// integer (schemathesis sends both), while `5.5`, negatives and out-of-range values are not.
mod int {
    use serde::de::Error as _;

    use super::{Deserialize, Deserializer};

    /// 2^64 as f64: the first float past `u64::MAX`.
    const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;

    fn whole(n: &serde_json::Number) -> Option<u64> {
        if let Some(u) = n.as_u64() {
            return Some(u);
        }
        let f = n.as_f64()?;
        // The range is checked first, so the cast is exact.
        (f.fract() == 0.0 && (0.0..TWO_POW_64).contains(&f)).then_some(f as u64)
    }

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let n = serde_json::Number::deserialize(d)?;
        whole(&n).ok_or_else(|| D::Error::custom(format!("{n} is not an integer in 0..=2^64-1")))
    }

    pub fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
            return Ok(None);
        };
        whole(&n)
            .and_then(|v| u32::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("{n} is not an integer in 0..=2^32-1")))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn whole_numbers_only() {
            let n = |s: &str| serde_json::from_str::<serde_json::Number>(s).unwrap();
            assert_eq!(super::whole(&n("5")), Some(5));
            assert_eq!(super::whole(&n("5.0")), Some(5));
            assert_eq!(super::whole(&n("5.5")), None);
            assert_eq!(super::whole(&n("-1")), None);
            assert_eq!(super::whole(&n("18446744073709551616.0")), None);
        }
    }
}

/// An upstream instance as one data-plane node sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UpstreamHealth {
    pub zone: String,
    pub instance_id: String,
    pub address: String,
    /// healthy, unhealthy (failing active checks) or ejected (for request failures).
    pub state: String,
    /// Requests in flight to it from this node.
    pub outstanding: u32,
}

/// What a data-plane node reports about itself (`GET /v1/nodes/{node_id}/stats`), read from
/// its HTTP `/stats` when asked.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeStats {
    pub node_id: String,
    /// The URL it was read from.
    #[serde(default)]
    pub source: String,
    pub draining: bool,
    pub sessions: u64,
    pub connected_sessions: u64,
    pub upstreams: Vec<UpstreamHealth>,
    /// Client requests since the node started, by outcome (`ok`, or an error).
    pub requests_by_outcome: BTreeMap<String, u64>,
    /// Pushes since the node started, by outcome.
    pub pushes_by_outcome: BTreeMap<String, u64>,
}
