//! The operator API: HTTP/JSON (axum), OpenAPI document at `GET /openapi.json`.
//!
//! Any node answers. Writes (and membership changes) are forwarded to the leader internally;
//! if that fails the answer is `421 not_leader` with the leader's addresses, or `503
//! unavailable` when no quorum is reachable. Reads default to `consistency=linearizable`
//! (quorum-confirmed); `consistency=local` serves this node's applied state and says so in
//! `meta`.
//!
//! Authentication: `Authorization: Bearer <token>`; the read-only token for GET, the admin
//! token for everything. `/healthz`, `/readyz` and `/openapi.json` are open. Errors are
//! `{"error": code, "message": ..., "leader": ...}` with 400/401/403/404/409/421/503.

pub mod auth;
pub mod model;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
pub use model::ApiError;
use model::*;
use utoipa::OpenApi;

use crate::config::LeaseConfig;
use crate::error::Error;
use crate::node::Node;
use crate::state::{Cmd, CmdResult, NodeStatus};
use crate::types::{Member, NodeId};
use crate::validate;

impl ApiError {
    /// This body with `status`.
    pub fn with_status(self, status: StatusCode) -> Response {
        (status, Json(self)).into_response()
    }
}

fn member_info(id: NodeId, m: &Member, role: &str, matched: Option<u64>) -> MemberInfo {
    MemberInfo {
        id,
        grpc_addr: m.grpc_addr.clone(),
        admin_addr: m.admin_addr.clone(),
        role: role.into(),
        matched_index: matched,
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.http_status();
        let leader = match &self {
            Error::NotLeader {
                leader: Some((id, m)),
            } => Some(member_info(*id, m, "voter", None)),
            _ => None,
        };
        ApiError {
            error: self.code().into(),
            message: self.to_string(),
            leader,
        }
        .with_status(status)
    }
}

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub node: Node,
    pub leases: LeaseConfig,
}

type ApiResult<T> = Result<Json<T>, Error>;

/// The router with authentication applied.
pub fn router(state: AdminState, auth: auth::Auth) -> Router {
    let api = Router::new()
        .route("/v1/zones", get(list_zones))
        .route("/v1/upstreams", get(list_upstreams).post(register_upstream))
        .route("/v1/upstreams/{instance_id}", delete(deregister_upstream))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node_id}/drain", post(drain_node))
        .route("/v1/sessions/{openid}", get(get_session))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/learners", post(add_learner))
        .route("/v1/cluster/voters/{id}", post(promote))
        .route("/v1/cluster/members/{id}", delete(remove_member))
        .route("/v1/cluster/snapshot", post(trigger_snapshot))
        .route("/v1/cluster/backup", post(export_backup))
        .route(
            "/v1/cluster/restore",
            // A backup is far larger than any JSON request (the 2 MiB default).
            post(import_backup).layer(axum::extract::DefaultBodyLimit::max(
                crate::backup::MAX_PAYLOAD_BYTES + (1 << 20),
            )),
        )
        .route_layer(axum::middleware::from_fn_with_state(auth, auth::require));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .merge(api)
        .with_state(state)
}

async fn read_meta(node: &Node, consistency: Option<Consistency>) -> Result<ReadMeta, Error> {
    let consistency = consistency.unwrap_or_default();
    if consistency == Consistency::Linearizable {
        node.linearizable_barrier().await?;
    }
    let inner = node.sm().read();
    Ok(ReadMeta {
        consistency,
        served_by: node.id(),
        applied_index: inner.last_applied.map_or(0, |l| l.index),
        version: inner.state.version,
    })
}

fn upstream(u: &crate::state::UpstreamRec) -> Upstream {
    Upstream {
        instance_id: u.instance_id.clone(),
        zone: u.zone.clone(),
        address: u.address.clone(),
        service_name: u.service_name.clone(),
        registered_at_ms: u.registered_at_ms,
        lease_expires_at_ms: u.lease_expires_at_ms,
    }
}

fn status_name(s: NodeStatus) -> &'static str {
    match s {
        NodeStatus::Active => "active",
        NodeStatus::Draining => "draining",
        NodeStatus::Dead => "dead",
        NodeStatus::Left => "left",
    }
}

/// Commits one command and returns its result (errors mapped).
async fn write_one(node: &Node, cmd: Cmd) -> Result<CmdResult, Error> {
    let r = node
        .write(vec![cmd])
        .await?
        .pop()
        .ok_or_else(|| Error::Raft("no result".into()))?;
    match r {
        CmdResult::Err(e) => Err(e.into()),
        other => Ok(other),
    }
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
/// Liveness: the process serves HTTP.
async fn healthz(State(s): State<AdminState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        node_id: s.node.id(),
        leader: s.node.leader().map(|(id, _)| id),
    })
}

#[utoipa::path(get, path = "/readyz", responses((status = 200, body = Health), (status = 503, body = Health)))]
/// Readiness: a leader is known (this node can serve and forward).
async fn readyz(State(s): State<AdminState>) -> Response {
    let leader = s.node.leader().map(|(id, _)| id);
    let body = Health {
        status: if leader.is_some() {
            "ready"
        } else {
            "no_leader"
        }
        .into(),
        node_id: s.node.id(),
        leader,
    };
    let status = if leader.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

#[utoipa::path(get, path = "/v1/zones", params(("consistency" = Option<Consistency>, Query)),
    responses((status = 200, body = ZonesReply)), security(("bearer" = [])))]
/// Zones and how many upstreams serve each.
async fn list_zones(
    State(s): State<AdminState>,
    Query(q): Query<ReadParams>,
) -> ApiResult<ZonesReply> {
    let meta = read_meta(&s.node, q.consistency).await?;
    let count = s.node.settings().zone_count;
    let inner = s.node.sm().read();
    let zones = (0..count)
        .map(|i| {
            let id = gatesvr_proto::zone::zone_id(i);
            let ups: Vec<_> = inner
                .state
                .upstreams
                .values()
                .filter(|u| u.zone == id)
                .collect();
            let mut services: Vec<String> = ups.iter().map(|u| u.service_name.clone()).collect();
            services.sort();
            services.dedup();
            Zone {
                zone: id,
                upstreams: ups.len(),
                services,
            }
        })
        .collect();
    Ok(Json(ZonesReply { meta, zones }))
}

#[utoipa::path(get, path = "/v1/upstreams",
    params(("zone" = Option<String>, Query), ("consistency" = Option<Consistency>, Query)),
    responses((status = 200, body = UpstreamsReply), (status = 400, body = ApiError)), security(("bearer" = [])))]
/// Registered upstreams, optionally of one zone.
async fn list_upstreams(
    State(s): State<AdminState>,
    Query(q): Query<ReadParams>,
) -> ApiResult<UpstreamsReply> {
    if let Some(z) = &q.zone {
        validate::zone(z, s.node.settings().zone_count)?;
    }
    let meta = read_meta(&s.node, q.consistency).await?;
    let inner = s.node.sm().read();
    let upstreams = inner
        .state
        .upstreams
        .values()
        .filter(|u| q.zone.as_ref().is_none_or(|z| &u.zone == z))
        .map(upstream)
        .collect();
    Ok(Json(UpstreamsReply { meta, upstreams }))
}

#[utoipa::path(post, path = "/v1/upstreams", request_body = RegisterUpstream,
    responses((status = 200, body = RegisterUpstreamReply), (status = 400, body = ApiError),
        (status = 409, body = ApiError), (status = 503, body = ApiError)), security(("bearer" = [])))]
/// Registers an upstream (idempotent on zone + address + service; 409 if the address serves
/// another service).
async fn register_upstream(
    State(s): State<AdminState>,
    Json(req): Json<RegisterUpstream>,
) -> ApiResult<RegisterUpstreamReply> {
    validate::zone(&req.zone, s.node.settings().zone_count)?;
    validate::address("address", &req.address)?;
    validate::ident("service_name", &req.service_name)?;
    let ttl = req
        .lease_ttl_ms
        .map(|t| validate::lease_ttl_ms(t, &s.leases));
    match write_one(
        &s.node,
        Cmd::RegisterUpstream {
            instance_id: validate::new_instance_id(),
            zone: req.zone,
            address: req.address,
            service_name: req.service_name,
            lease_ttl_ms: ttl,
        },
    )
    .await?
    {
        CmdResult::Upstream {
            upstream: u,
            created,
        } => Ok(Json(RegisterUpstreamReply {
            upstream: upstream(&u),
            created,
        })),
        other => Err(Error::Raft(format!("unexpected {other:?}"))),
    }
}

#[utoipa::path(delete, path = "/v1/upstreams/{instance_id}",
    responses((status = 200, body = Done), (status = 404, body = ApiError)), security(("bearer" = [])))]
/// Removes an upstream registration.
async fn deregister_upstream(
    State(s): State<AdminState>,
    Path(instance_id): Path<String>,
) -> ApiResult<Done> {
    validate::ident("instance_id", &instance_id)?;
    write_one(&s.node, Cmd::DeregisterUpstream { instance_id }).await?;
    Ok(Json(Done { ok: true }))
}

#[utoipa::path(get, path = "/v1/nodes", params(("consistency" = Option<Consistency>, Query)),
    responses((status = 200, body = NodesReply)), security(("bearer" = [])))]
/// Data-plane nodes and recent failover decisions.
async fn list_nodes(
    State(s): State<AdminState>,
    Query(q): Query<ReadParams>,
) -> ApiResult<NodesReply> {
    let meta = read_meta(&s.node, q.consistency).await?;
    let inner = s.node.sm().read();
    let nodes = inner
        .state
        .nodes
        .values()
        .map(|n| DpNode {
            node_id: n.node_id.clone(),
            quic_addr: n.quic_addr.clone(),
            grpc_addr: n.grpc_addr.clone(),
            state: status_name(n.status).into(),
            lease_expires_at_ms: n.lease_expires_at_ms,
            drain_requested: n.drain_requested,
            sessions: n.sessions,
        })
        .collect();
    let failovers = inner
        .state
        .failovers
        .values()
        .map(|f| Failover {
            failed_node: f.failed_node.clone(),
            decided_at_ms: f.decided_at_ms,
            sessions: f.sessions,
            moved_to: f.moved_to.clone(),
        })
        .collect();
    Ok(Json(NodesReply {
        meta,
        nodes,
        failovers,
    }))
}

#[utoipa::path(post, path = "/v1/nodes/{node_id}/drain",
    responses((status = 200, body = Done), (status = 404, body = ApiError), (status = 409, body = ApiError)),
    security(("bearer" = [])))]
/// Asks a data-plane node to drain (it learns on its next heartbeat).
async fn drain_node(State(s): State<AdminState>, Path(node_id): Path<String>) -> ApiResult<Done> {
    validate::ident("node_id", &node_id)?;
    write_one(&s.node, Cmd::DrainNode { node_id }).await?;
    Ok(Json(Done { ok: true }))
}

#[utoipa::path(get, path = "/v1/sessions/{openid}", params(("consistency" = Option<Consistency>, Query)),
    responses((status = 200, body = SessionReply)), security(("bearer" = [])))]
/// Who owns `openid`'s session, at which epoch.
async fn get_session(
    State(s): State<AdminState>,
    Path(openid): Path<String>,
    Query(q): Query<ReadParams>,
) -> ApiResult<SessionReply> {
    validate::ident("openid", &openid)?;
    let meta = read_meta(&s.node, q.consistency).await?;
    let inner = s.node.sm().read();
    let session = inner.state.owners.get(&openid).map(|o| Session {
        openid: openid.clone(),
        session_id: o.session_id.clone(),
        owner_node: o.owner_node.clone(),
        epoch: o.epoch,
        changed_at_ms: o.changed_at_ms,
    });
    let zone = gatesvr_proto::zone::zone_of(&openid, s.node.settings().zone_count);
    Ok(Json(SessionReply {
        meta,
        session,
        zone,
    }))
}

fn members(node: &Node) -> Vec<MemberInfo> {
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
async fn cluster_status(State(s): State<AdminState>) -> ApiResult<ClusterStatus> {
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

async fn membership_reply(node: &Node, log_index: u64) -> ApiResult<MembershipReply> {
    Ok(Json(MembershipReply {
        log_index,
        members: members(node),
    }))
}

#[utoipa::path(post, path = "/v1/cluster/learners", request_body = AddLearner,
    responses((status = 200, body = MembershipReply), (status = 409, body = ApiError)), security(("bearer" = [])))]
/// Adds a node as a learner; it catches up from the log or a snapshot.
async fn add_learner(
    State(s): State<AdminState>,
    Json(req): Json<AddLearner>,
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
    membership_reply(&s.node, idx).await
}

#[utoipa::path(post, path = "/v1/cluster/voters/{id}",
    responses((status = 200, body = MembershipReply), (status = 409, body = ApiError)), security(("bearer" = [])))]
/// Promotes a learner to voter.
async fn promote(State(s): State<AdminState>, Path(id): Path<u64>) -> ApiResult<MembershipReply> {
    let idx = s.node.promote(id).await?;
    membership_reply(&s.node, idx).await
}

#[utoipa::path(delete, path = "/v1/cluster/members/{id}",
    responses((status = 200, body = MembershipReply), (status = 404, body = ApiError)), security(("bearer" = [])))]
/// Removes a voter or learner. A node whose disk was lost must be removed and re-added under
/// a new id.
async fn remove_member(
    State(s): State<AdminState>,
    Path(id): Path<u64>,
) -> ApiResult<MembershipReply> {
    let idx = s.node.remove(id).await?;
    membership_reply(&s.node, idx).await
}

#[utoipa::path(post, path = "/v1/cluster/snapshot", responses((status = 200, body = Done)), security(("bearer" = [])))]
/// Builds a snapshot on this node now (compacting its log).
async fn trigger_snapshot(State(s): State<AdminState>) -> ApiResult<Done> {
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
async fn export_backup(State(s): State<AdminState>) -> Result<Response, Error> {
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
/// Restores a backup through one raft entry. Merges into the running state (records it
/// already has win; nothing is deleted) and moves epochs past both. Meant for a freshly
/// bootstrapped cluster after a disaster (docs/operations.md).
async fn import_backup(
    State(s): State<AdminState>,
    body: axum::body::Bytes,
) -> ApiResult<RestoreReply> {
    let b = crate::backup::decode(&body).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let checksum = b.header.payload_sha256.clone();
    let r = write_one(
        &s.node,
        Cmd::Restore {
            state: Box::new(b.state),
            checksum: checksum.clone(),
        },
    )
    .await?;
    match r {
        CmdResult::Restored {
            upstreams,
            nodes,
            owners,
            failovers,
            skipped,
            last_epoch,
        } => {
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
        other => Err(Error::Raft(format!("unexpected {other:?}"))),
    }
}

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document of this API.
#[derive(OpenApi)]
#[openapi(
    info(title = "GateSvr control plane admin API", description = "Zones, upstreams, data-plane nodes, sessions and the raft cluster."),
    paths(healthz, readyz, list_zones, list_upstreams, register_upstream, deregister_upstream, list_nodes,
        drain_node, get_session, cluster_status, add_learner, promote, remove_member, trigger_snapshot,
        export_backup, import_backup),
    modifiers(&BearerScheme)
)]
pub struct AdminApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(AdminApiDoc::openapi())
}
