//! Data-plane nodes: list, drain and cancel, cordon and uncordon, remove.
//!
//! Each write is one [`Cmd`] through raft; the node learns of a drain on its next heartbeat,
//! and a cordon takes effect at once in the state machine (its claims of new sessions are
//! refused).

use axum::Json;
use axum::extract::State;

use super::extract::{ApiPath, ApiQuery};
use super::model::*;
use super::{AdminState, ApiResult, read_meta, status_name, write_one};
use crate::error::Error;
use crate::state::Cmd;
use crate::validate;

#[utoipa::path(get, path = "/v1/nodes", params(ReadParams),
    responses((status = 200, body = NodesReply)), security(("bearer" = [])))]
/// Data-plane nodes and recent failover decisions.
pub(super) async fn list_nodes(
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<ReadParams>,
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
            cordoned: n.cordoned,
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

/// Validates the node id and commits `cmd`.
async fn node_write(s: &AdminState, node_id: &str, cmd: Cmd) -> ApiResult<Done> {
    validate::ident("node_id", node_id)?;
    write_one(&s.node, cmd).await?;
    Ok(Json(Done { ok: true }))
}

#[utoipa::path(post, path = "/v1/nodes/{node_id}/drain", params(NodePath),
    responses((status = 200, body = Done), (status = 404, body = ApiError), (status = 409, body = ApiError)),
    security(("bearer" = [])))]
/// Asks a data-plane node to drain (it learns on its next heartbeat).
pub(super) async fn drain_node(
    State(s): State<AdminState>,
    ApiPath(node_id): ApiPath<String>,
) -> ApiResult<Done> {
    node_write(
        &s,
        &node_id,
        Cmd::DrainNode {
            node_id: node_id.clone(),
        },
    )
    .await
}

#[utoipa::path(delete, path = "/v1/nodes/{node_id}/drain", params(NodePath),
    responses((status = 200, body = Done), (status = 404, body = ApiError), (status = 409, body = ApiError)),
    security(("bearer" = [])))]
/// Withdraws a drain request the node has not started on (409 once it has).
pub(super) async fn cancel_drain(
    State(s): State<AdminState>,
    ApiPath(node_id): ApiPath<String>,
) -> ApiResult<Done> {
    node_write(
        &s,
        &node_id,
        Cmd::CancelDrain {
            node_id: node_id.clone(),
        },
    )
    .await
}

#[utoipa::path(post, path = "/v1/nodes/{node_id}/cordon", params(NodePath),
    responses((status = 200, body = Done), (status = 404, body = ApiError), (status = 409, body = ApiError)),
    security(("bearer" = [])))]
/// Cordons a node: it keeps its sessions, but its claims of new ones are refused (clients
/// are served by other nodes).
pub(super) async fn cordon(
    State(s): State<AdminState>,
    ApiPath(node_id): ApiPath<String>,
) -> ApiResult<Done> {
    let cmd = Cmd::CordonNode {
        node_id: node_id.clone(),
        cordoned: true,
    };
    node_write(&s, &node_id, cmd).await
}

#[utoipa::path(delete, path = "/v1/nodes/{node_id}/cordon", params(NodePath),
    responses((status = 200, body = Done), (status = 404, body = ApiError)),
    security(("bearer" = [])))]
/// Uncordons a node: it may take new sessions again.
pub(super) async fn uncordon(
    State(s): State<AdminState>,
    ApiPath(node_id): ApiPath<String>,
) -> ApiResult<Done> {
    let cmd = Cmd::CordonNode {
        node_id: node_id.clone(),
        cordoned: false,
    };
    node_write(&s, &node_id, cmd).await
}

#[utoipa::path(delete, path = "/v1/nodes/{node_id}", params(NodePath),
    responses((status = 200, body = Done), (status = 404, body = ApiError), (status = 409, body = ApiError)),
    security(("bearer" = [])))]
/// Forgets a dead or departed node (409 while it is active or draining).
pub(super) async fn remove_node(
    State(s): State<AdminState>,
    ApiPath(node_id): ApiPath<String>,
) -> ApiResult<Done> {
    node_write(
        &s,
        &node_id,
        Cmd::RemoveNode {
            node_id: node_id.clone(),
        },
    )
    .await
}

#[utoipa::path(get, path = "/v1/nodes/{node_id}/stats", params(NodePath),
    responses((status = 200, body = NodeStats), (status = 404, body = ApiError),
        (status = 409, body = ApiError, description = "the node is not live, or its HTTP address is not configured"),
        (status = 502, body = ApiError, description = "the node did not answer")),
    security(("bearer" = [])))]
/// A live data-plane node's own report: sessions, each upstream instance's health and
/// ejection as it sees them, request and push counters. Asked of the node when called.
pub(super) async fn node_stats(
    State(s): State<AdminState>,
    ApiPath(node_id): ApiPath<String>,
) -> ApiResult<NodeStats> {
    validate::ident("node_id", &node_id)?;
    let grpc_addr = {
        let inner = s.node.sm().read();
        let n = inner
            .state
            .nodes
            .get(&node_id)
            .ok_or_else(|| Error::NotFound(format!("node {node_id}")))?;
        if !n.status.is_live() {
            return Err(Error::FailedPrecondition(format!(
                "node {node_id} is {}",
                status_name(n.status)
            )));
        }
        n.grpc_addr.clone()
    };
    let addr = dataplane_http_addr(&s.dataplane_http, &node_id, &grpc_addr)?;
    let url = format!("http://{addr}/stats");
    let v = super::dataplane::get_json(&url).await?;
    let mut stats: NodeStats = serde_json::from_value(v)
        .map_err(|e| Error::DataPlaneUnreachable(format!("{url}: unexpected answer: {e}")))?;
    stats.source = url;
    Ok(Json(stats))
}

/// Where `node_id` serves HTTP: its configured address, or the configured port on the host
/// of its gRPC address.
pub(super) fn dataplane_http_addr(
    cfg: &super::DataPlaneHttp,
    node_id: &str,
    grpc_addr: &str,
) -> Result<String, Error> {
    if let Some(a) = cfg.addrs.get(node_id) {
        return Ok(a.clone());
    }
    let Some(port) = cfg.port else {
        return Err(Error::FailedPrecondition(
            "the control plane does not know data planes' HTTP port: set admin.dataplane_http_port"
                .into(),
        ));
    };
    let host = grpc_addr.rsplit_once(':').map_or(grpc_addr, |(h, _)| h);
    Ok(format!("{host}:{port}"))
}
