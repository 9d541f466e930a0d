//! The operator API: HTTP(S)/JSON (axum), OpenAPI document at `GET /openapi.json`, and the
//! web console at `/console` over the same state and commands.
//!
//! Any node answers. Writes (and membership changes) are forwarded to the leader internally;
//! if that fails the answer is `421 not_leader` with the leader's addresses, or `503
//! unavailable` when no quorum is reachable. Reads default to `consistency=linearizable`
//! (quorum-confirmed); `consistency=local` serves this node's applied state and says so in
//! `meta`.
//!
//! Authentication: `Authorization: Bearer <token>` (or the console's cookie); the read-only
//! token for GET, the admin token for everything. `/healthz`, `/readyz`, `/openapi.json`,
//! `/metrics` and the console's login page are open. Every error, bad input included, is
//! `{"error": code, "message": ..., "leader": ...}` (see `extract` for axum's rejections).
//!
//! # Layout
//! - `registry`: zones and upstreams; `nodes`: data-plane nodes (drain, cordon, remove,
//!   stats); `sessions`: ownership (list, get, disconnect); `cluster`: raft membership,
//!   snapshots, backup and restore.
//! - `openapi`: the exact document; `extract`: JSON rejections; `auth`: tokens;
//!   `tls`: the HTTPS listener; `dataplane`: reading a data plane's `/stats`;
//!   `console`: the web console.

pub mod auth;
mod cluster;
mod console;
mod dataplane;
mod extract;
pub mod model;
mod nodes;
mod openapi;
mod registry;
mod sessions;
pub mod tls;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
pub use model::ApiError;
use model::*;

use crate::config::LeaseConfig;
use crate::error::Error;
use crate::node::Node;
use crate::state::{Cmd, CmdResult, NodeStatus};
use crate::types::{Member, NodeId};

impl ApiError {
    /// This body with `status`.
    pub fn with_status(self, status: StatusCode) -> Response {
        (status, Json(self)).into_response()
    }
}

pub(crate) fn member_info(id: NodeId, m: &Member, role: &str, matched: Option<u64>) -> MemberInfo {
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
    /// The control plane's Prometheus registry (`GET /metrics`).
    pub metrics: crate::metrics::Metrics,
    /// Where data-plane nodes serve `/stats` (from `admin.dataplane_http_*`).
    pub dataplane_http: DataPlaneHttp,
    /// The admin port speaks HTTPS: the console's cookie is marked `Secure`.
    pub https: bool,
}

/// How to reach a data-plane node's HTTP port.
#[derive(Debug, Clone, Default)]
pub struct DataPlaneHttp {
    pub port: Option<u16>,
    pub addrs: std::collections::BTreeMap<String, String>,
}

type ApiResult<T> = Result<Json<T>, Error>;

/// The router with authentication applied.
pub fn router(state: AdminState, auth: auth::Auth) -> Router {
    use cluster::*;
    use nodes::*;
    use registry::*;
    use sessions::*;
    let api = Router::new()
        .route("/v1/zones", get(list_zones))
        .route("/v1/upstreams", get(list_upstreams).post(register_upstream))
        .route("/v1/upstreams/{instance_id}", delete(deregister_upstream))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node_id}", delete(remove_node))
        .route(
            "/v1/nodes/{node_id}/drain",
            post(drain_node).delete(cancel_drain),
        )
        .route("/v1/nodes/{node_id}/cordon", post(cordon).delete(uncordon))
        .route("/v1/nodes/{node_id}/stats", get(node_stats))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{openid}", get(get_session))
        .route("/v1/sessions/{openid}/disconnect", post(disconnect))
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
        .merge(console::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            auth.clone(),
            auth::require,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi::serve))
        .route("/metrics", get(crate::metrics::serve))
        .merge(console::public_routes())
        .merge(api)
        .fallback(extract::not_found)
        .layer(axum::middleware::from_fn(extract::json_method_not_allowed))
        .with_state(state)
}

pub(crate) async fn read_meta(
    node: &Node,
    consistency: Option<Consistency>,
) -> Result<ReadMeta, Error> {
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

pub(crate) fn upstream(u: &crate::state::UpstreamRec) -> Upstream {
    Upstream {
        instance_id: u.instance_id.clone(),
        zone: u.zone.clone(),
        address: u.address.clone(),
        service_name: u.service_name.clone(),
        registered_at_ms: u.registered_at_ms,
        lease_expires_at_ms: u.lease_expires_at_ms,
    }
}

pub(crate) fn status_name(s: NodeStatus) -> &'static str {
    match s {
        NodeStatus::Active => "active",
        NodeStatus::Draining => "draining",
        NodeStatus::Dead => "dead",
        NodeStatus::Left => "left",
    }
}

/// Commits one command and returns its result (errors mapped).
pub(crate) async fn write_one(node: &Node, cmd: Cmd) -> Result<CmdResult, Error> {
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
