//! The raft cluster: status, membership changes, snapshots, backup and restore.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::extract::{ApiJson, ApiPath};
use super::model::*;
use super::{AdminState, ApiResult, member_info, write_one};
use crate::error::Error;
use crate::node::Node;
use crate::state::{Cmd, CmdResult};
use crate::types::Member;
use crate::validate;

pub(super) fn members(node: &Node) -> Vec<MemberInfo> {
    let m = node.raft().metrics().borrow().clone();
    let voters = node.voter_ids();
    let replication = m.replication.clone().unwrap_or_default();
    node.members()
        .iter()
        .map(|(id, mem)| {
            let role = if voters.contains(id) {
                "voter"
            } else {
                "learner"
            };
            let matched = replication.get(id).and_then(|l| l.map(|l| l.index));
            member_info(*id, mem, role, matched)
        })
        .collect()
}

#[utoipa::path(get, path = "/v1/cluster", responses((status = 200, body = ClusterStatus)), security(("bearer" = [])))]
/// This node's view of the raft group (served locally).
pub(super) async fn cluster_status(State(s): State<AdminState>) -> ApiResult<ClusterStatus> {
    let m = s.node.raft().metrics().borrow().clone();
    let members = members(&s.node);
    let leader = m
        .current_leader
        .and_then(|id| members.iter().find(|x| x.id == id).cloned());
    Ok(Json(ClusterStatus {
        node_id: m.id,
        state: format!("{:?}", m.state).to_lowercase(),
        term: m.current_term,
        leader,
        members,
        last_log_index: m.last_log_index,
        last_applied_index: m.last_applied.map(|l| l.index),
        committed_snapshot_index: m.snapshot.map(|l| l.index),
        purged_index: m.purged.map(|l| l.index),
        millis_since_quorum_ack: m.millis_since_quorum_ack,
    }))
}

pub(super) async fn membership_reply(
    node: &Node,
    node_id: u64,
    log_index: u64,
) -> ApiResult<MembershipReply> {
    Ok(Json(MembershipReply {
        node_id,
        log_index,
        members: members(node),
    }))
}

#[utoipa::path(post, path = "/v1/cluster/learners", request_body = AddLearner,
    responses((status = 200, body = MembershipReply), (status = 409, body = ApiError)), security(("bearer" = [])))]
/// Adds a node as a learner; it catches up from the log or a snapshot. At most
/// `raft.max_learners` (default 1) at once: one more is refused (409).
pub(super) async fn add_learner(
    State(s): State<AdminState>,
    ApiJson(req): ApiJson<AddLearner>,
) -> ApiResult<MembershipReply> {
    validate::address("grpc_addr", &req.grpc_addr)?;
    validate::address("admin_addr", &req.admin_addr)?;
    let idx = s
        .node
        .add_learner(
            req.id,
            Member {
                grpc_addr: req.grpc_addr,
                admin_addr: req.admin_addr,
            },
        )
        .await?;
    membership_reply(&s.node, req.id, idx).await
}

#[utoipa::path(post, path = "/v1/cluster/voters/{id}",
    params(("id" = u64, Path, description = "the learner's raft node id")),
    responses((status = 200, body = MembershipReply), (status = 409, body = ApiError)), security(("bearer" = [])))]
/// Promotes a learner to voter.
pub(super) async fn promote(
    State(s): State<AdminState>,
    ApiPath(id): ApiPath<u64>,
) -> ApiResult<MembershipReply> {
    let idx = s.node.promote(id).await?;
    membership_reply(&s.node, id, idx).await
}

#[utoipa::path(delete, path = "/v1/cluster/members/{id}",
    params(("id" = u64, Path, description = "the member's raft node id")),
    responses((status = 200, body = MembershipReply), (status = 404, body = ApiError)), security(("bearer" = [])))]
/// Removes a voter or learner. A node whose disk was lost must be removed and re-added under
/// a new id.
pub(super) async fn remove_member(
    State(s): State<AdminState>,
    ApiPath(id): ApiPath<u64>,
) -> ApiResult<MembershipReply> {
    let idx = s.node.remove(id).await?;
    membership_reply(&s.node, id, idx).await
}

#[utoipa::path(post, path = "/v1/cluster/snapshot", responses((status = 200, body = Done)), security(("bearer" = [])))]
/// Builds a snapshot on this node now (compacting its log).
pub(super) async fn trigger_snapshot(State(s): State<AdminState>) -> ApiResult<Done> {
    s.node
        .raft()
        .trigger()
        .snapshot()
        .await
        .map_err(|e| Error::Raft(e.to_string()))?;
    Ok(Json(Done { ok: true }))
}

#[utoipa::path(post, path = "/v1/cluster/backup",
    responses((status = 200, description = "a backup file (docs/operations.md, `controlplane/src/backup.rs`)", content_type = "application/octet-stream"),
        (status = 503, body = ApiError)), security(("bearer" = [])))]
/// A consistent backup of the replicated state: after a linearizable barrier (it covers every
/// write committed before the request), the state, its last applied log id and the membership
/// are read together under the state machine's lock. Any node serves it.
pub(super) async fn export_backup(State(s): State<AdminState>) -> Result<Response, Error> {
    s.node.linearizable_barrier().await?;
    let leader = s.node.leader().map(|(id, _)| id);
    let (state, source) = {
        let inner = s.node.sm().read();
        (
            inner.state.clone(),
            crate::backup::Source {
                created_at_ms: crate::node::now_ms(),
                served_by: s.node.id(),
                leader,
                last_applied: inner.last_applied,
                membership: inner.membership.clone(),
            },
        )
    };
    let bytes = crate::backup::encode(source, &state).map_err(|e| Error::Raft(e.to_string()))?;
    tracing::info!(
        bytes = bytes.len(),
        upstreams = state.upstreams.len(),
        owners = state.owners.len(),
        "backup exported"
    );
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response())
}

#[utoipa::path(post, path = "/v1/cluster/restore",
    request_body(content = Vec<u8>, description = "a backup file", content_type = "application/octet-stream"),
    responses((status = 200, body = RestoreReply), (status = 400, body = ApiError), (status = 503, body = ApiError)),
    security(("bearer" = [])))]
/// Restores a backup through a series of raft entries of at most
/// `backup::RESTORE_OWNERS_PER_ENTRY` owners each (`backup::split`). Merges into the running
/// state (records it already has win; nothing is deleted) and moves epochs past both. Meant for
/// a freshly bootstrapped cluster after a disaster (docs/operations.md). Not atomic: a restore
/// cut short leaves the parts applied so far; running it again completes it (records already
/// present are skipped).
pub(super) async fn import_backup(
    State(s): State<AdminState>,
    body: axum::body::Bytes,
) -> ApiResult<RestoreReply> {
    let b = crate::backup::decode(&body).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    drop(body);
    let checksum = b.header.payload_sha256.clone();
    let (mut upstreams, mut nodes, mut owners, mut failovers, mut skipped, mut last_epoch) =
        (0, 0, 0, 0, 0, 0);
    let parts = crate::backup::split(b.state, crate::backup::RESTORE_OWNERS_PER_ENTRY);
    for part in parts {
        let r = write_one(
            &s.node,
            Cmd::Restore {
                state: Box::new(part),
                checksum: checksum.clone(),
            },
        )
        .await?;
        match r {
            CmdResult::Restored {
                upstreams: u,
                nodes: n,
                owners: o,
                failovers: f,
                skipped: k,
                last_epoch: e,
            } => {
                upstreams += u;
                nodes += n;
                owners += o;
                failovers += f;
                skipped += k;
                last_epoch = e;
            }
            other => return Err(Error::Raft(format!("unexpected {other:?}"))),
        }
    }
    tracing::info!(upstreams, nodes, owners, failovers, skipped, last_epoch, %checksum, "backup restored");
    Ok(Json(RestoreReply {
        upstreams,
        nodes,
        owners,
        failovers,
        skipped,
        last_epoch,
        backup_last_applied_index: b.header.last_applied.map(|l| l.index),
        backup_created_at_ms: b.header.created_at_ms,
        checksum,
    }))
}
