//! `GatewayService` (gRPC on `server.grpc_addr`): upstreams push to clients.
//!
//! Errors map to gRPC codes: NOT_FOUND (no such session), RESOURCE_EXHAUSTED
//! (the session's queue is full; the client is being disconnected as a slow
//! consumer and will resume), INVALID_ARGUMENT (empty target).
//!
//! A durable push (`durable: true`) answers OK only once the owner's standby
//! holds a copy (see `replica`); with no standby it is refused before being
//! queued (FAILED_PRECONDITION), and if the copy fails after queueing the
//! answer is UNAVAILABLE (the push may still be delivered, it is not durable).

use std::sync::Arc;

use gatesvr_proto::upstream::gateway_service_server::GatewayService;
use gatesvr_proto::upstream::{
    BroadcastRequest, BroadcastResponse, GatewayStatus, GatewayStatusRequest, PushBatchRequest,
    PushBatchResponse, PushResult, PushToClientRequest, PushToClientResponse, TargetType,
};
use tonic::{Request, Response, Status};

use crate::connection::unix_ms;
use crate::node::Node;
use crate::registry::PushFailure;
use crate::session::{PushError, PushMessage};

pub struct Gateway {
    pub node: Arc<Node>,
}

fn message(msg_type: String, content: String, data: bytes::Bytes) -> PushMessage {
    PushMessage {
        msg_type,
        content,
        data,
        created_at_ms: unix_ms(),
    }
}

impl Gateway {
    /// A push for a session this node does not hold: wait for one being
    /// handed to us, or forward to the owner (the node it moved to, else the
    /// owner in the watched view). A forwarded push is forwarded again only
    /// along a "moved to" record of this node (a session that left while
    /// the push was on its way), and at most once more: no loops.
    async fn push_elsewhere(
        &self,
        req: PushToClientRequest,
        by_session: bool,
        forwarded: bool,
    ) -> Result<Response<PushToClientResponse>, Status> {
        let node = &self.node;
        let not_found = || {
            node.metrics.pushes.with_label_values(&["no_session"]).inc();
            Err(Status::not_found(format!(
                "no session for {}",
                req.target_id
            )))
        };
        // By openid: a session being fetched from its previous owner.
        if !by_session
            && let Some(entry) = node
                .registry
                .wait_incoming(&req.target_id, crate::peer::PEER_TIMEOUT)
                .await
        {
            return self.push_here(&entry, req).await;
        }
        let moved = node
            .registry
            .moved_to(&req.target_id, by_session)
            .map(|(_, n)| n);
        if forwarded && moved.is_none() {
            return not_found();
        }
        let target = moved.or_else(|| {
            let cluster = node.cluster.as_ref()?;
            let view = cluster.view();
            let owner = if by_session {
                view.owners
                    .values()
                    .find(|o| o.session_id == req.target_id)?
            } else {
                view.owners.get(&req.target_id)?
            };
            (owner.owner_node != node.config.node_id).then(|| owner.owner_node.clone())
        });
        let Some(target) = target else {
            return not_found();
        };
        let addr = node
            .cluster
            .as_ref()
            .and_then(|c| c.view().live_node(&target).map(|n| n.grpc_addr.clone()));
        let Some(addr) = addr else {
            return not_found();
        };
        let mut client = node.peers.gateway(&addr)?;
        let mut forward = Request::new(req);
        forward.set_timeout(crate::peer::PEER_TIMEOUT);
        forward.metadata_mut().insert(
            crate::peer::FORWARDED_HEADER,
            tonic::metadata::MetadataValue::from_static(if forwarded { "2" } else { "1" }),
        );
        match client.push_to_client(forward).await {
            Ok(r) => {
                node.metrics
                    .pushes_forwarded
                    .with_label_values(&["ok"])
                    .inc();
                Ok(r)
            }
            Err(status) => {
                node.metrics
                    .pushes_forwarded
                    .with_label_values(&["failed"])
                    .inc();
                Err(status)
            }
        }
    }

    /// Queues on a local session; a durable push is replicated to the
    /// standby before OK.
    async fn push_here(
        &self,
        entry: &std::sync::Arc<crate::registry::SessionEntry>,
        req: PushToClientRequest,
    ) -> Result<Response<PushToClientResponse>, Status> {
        if !req.durable {
            return self.push_local(entry, req);
        }
        let node = &self.node;
        let Some(standby) = crate::replica::standby_for(node) else {
            node.metrics
                .durable_pushes
                .with_label_values(&["no_standby"])
                .inc();
            return Err(Status::failed_precondition(
                "cannot make the push durable: no standby node is available to replicate it to; not queued",
            ));
        };
        let mut push = gatesvr_proto::client::ServerPush {
            seq_id: 0,
            msg_type: req.msg_type.clone(),
            content: req.content.clone(),
            data: req.data.clone().into(),
            created_at_ms: unix_ms(),
            redelivery: false,
        };
        let response = self.push_local(entry, req)?;
        push.seq_id = response.get_ref().seq_id;
        match crate::replica::replicate(node, entry, &standby, vec![push]).await {
            Ok(()) => {
                node.metrics
                    .durable_pushes
                    .with_label_values(&["replicated"])
                    .inc();
                Ok(response)
            }
            Err(status) => {
                node.metrics
                    .durable_pushes
                    .with_label_values(&["replication_failed"])
                    .inc();
                Err(Status::unavailable(format!(
                    "cannot make the push durable: standby {} did not take the copy ({}); it was queued as seq {} and may still be delivered, but would not survive a crash",
                    standby.node_id,
                    status.message(),
                    response.get_ref().seq_id
                )))
            }
        }
    }

    /// One push, `hops` gateway hops in (0: from an upstream, 1: forwarded
    /// once by another node, 2+: serve here or refuse).
    async fn push_one(
        &self,
        hops: u8,
        req: PushToClientRequest,
    ) -> Result<Response<PushToClientResponse>, Status> {
        if self.node.crashed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Status::unavailable("node crashed"));
        }
        if hops >= 2 {
            // Second hop: serve locally or refuse, never forward a third time.
            let entry = match TargetType::try_from(req.target_type) {
                Ok(TargetType::Session) => self.node.registry.get_by_session(&req.target_id),
                _ => self.node.registry.get(&req.target_id),
            };
            return match entry {
                Some(entry) => self.push_here(&entry, req).await,
                None => Err(Status::not_found(format!(
                    "no session for {}",
                    req.target_id
                ))),
            };
        }
        let forwarded = hops == 1;
        if req.target_id.is_empty() {
            return Err(Status::invalid_argument("target_id is empty"));
        }
        let registry = &self.node.registry;
        let (entry, by_session) = match TargetType::try_from(req.target_type) {
            Ok(TargetType::Openid) => (registry.get(&req.target_id), false),
            Ok(TargetType::Session) => (registry.get_by_session(&req.target_id), true),
            Err(_) => return Err(Status::invalid_argument("unknown target_type")),
        };
        match entry {
            // The entry may have moved away between the lookup and the push.
            Some(entry) if !entry.moved.load(std::sync::atomic::Ordering::SeqCst) => {
                match self.push_here(&entry, req.clone()).await {
                    Err(status) if status.code() == tonic::Code::Aborted => {
                        self.push_elsewhere(req, by_session, forwarded).await
                    }
                    other => other,
                }
            }
            _ => self.push_elsewhere(req, by_session, forwarded).await,
        }
    }

    fn push_local(
        &self,
        entry: &std::sync::Arc<crate::registry::SessionEntry>,
        req: PushToClientRequest,
    ) -> Result<Response<PushToClientResponse>, Status> {
        let msg = message(req.msg_type, req.content, req.data.into());
        match self.node.registry.push(entry, msg) {
            Ok(receipt) => Ok(Response::new(PushToClientResponse {
                seq_id: receipt.seq_id,
                session_id: receipt.session_id,
                node_id: self.node.config.node_id.clone(),
            })),
            Err(PushFailure::Refused(PushError::QueueFull { max_queue })) => {
                Err(Status::resource_exhausted(format!(
                    "session queue full ({max_queue} unacked pushes); client disconnected as a slow consumer"
                )))
            }
            Err(PushFailure::Refused(PushError::Expired)) | Err(PushFailure::NoSession(_)) => Err(
                Status::not_found(format!("no session for {}", req.target_id)),
            ),
        }
    }
}

#[tonic::async_trait]
impl GatewayService for Gateway {
    async fn push_to_client(
        &self,
        request: Request<PushToClientRequest>,
    ) -> Result<Response<PushToClientResponse>, Status> {
        let hops = forwarded_hops(request.metadata());
        self.push_one(hops, request.into_inner()).await
    }

    async fn push_batch(
        &self,
        request: Request<PushBatchRequest>,
    ) -> Result<Response<PushBatchResponse>, Status> {
        const MAX_BATCH: usize = 1024;
        let hops = forwarded_hops(request.metadata());
        let batch = request.into_inner();
        if batch.pushes.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} pushes per batch"
            )));
        }
        let mut results = Vec::with_capacity(batch.pushes.len());
        for push in batch.pushes {
            // The same path as PushToClient, one push at a time: order per
            // session is the order in the batch.
            results.push(match self.push_one(hops, push).await {
                Ok(r) => {
                    let r = r.into_inner();
                    PushResult {
                        seq_id: r.seq_id,
                        session_id: r.session_id,
                        node_id: r.node_id,
                        code: 0,
                        message: String::new(),
                    }
                }
                Err(status) => PushResult {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                    ..Default::default()
                },
            });
        }
        Ok(Response::new(PushBatchResponse { results }))
    }

    async fn broadcast_to_clients(
        &self,
        request: Request<BroadcastRequest>,
    ) -> Result<Response<BroadcastResponse>, Status> {
        if self.node.crashed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Status::unavailable("node crashed"));
        }
        let forwarded = request
            .metadata()
            .contains_key(crate::peer::FORWARDED_HEADER);
        let req = request.into_inner();
        // Fan out to every other live node first (their sessions are theirs
        // to queue on), then queue on ours.
        let peers: Vec<String> = match (&self.node.cluster, forwarded) {
            (Some(cluster), false) => cluster
                .view()
                .nodes
                .values()
                .filter(|n| {
                    n.node_id != self.node.config.node_id
                        && n.state != gatesvr_proto::control::NodeState::Dead as i32
                })
                .map(|n| n.grpc_addr.clone())
                .collect(),
            _ => Vec::new(),
        };
        let remote = futures::future::join_all(peers.iter().map(|addr| {
            let req = req.clone();
            async move {
                let mut client = self.node.peers.gateway(addr).ok()?;
                let mut r = Request::new(req);
                r.set_timeout(crate::peer::PEER_TIMEOUT);
                r.metadata_mut().insert(
                    crate::peer::FORWARDED_HEADER,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                match client.broadcast_to_clients(r).await {
                    Ok(resp) => Some(resp.into_inner()),
                    Err(status) => {
                        tracing::warn!(peer = %addr, error = %status, "broadcast fan-out failed");
                        None
                    }
                }
            }
        }))
        .await;
        let unreachable = remote.iter().filter(|r| r.is_none()).count();
        let data: bytes::Bytes = req.data.into();
        let mut queued = 0u32;
        let mut rejected = 0u32;
        for r in remote.into_iter().flatten() {
            queued += r.queued;
            rejected += r.rejected;
        }
        for entry in self.node.registry.all() {
            if !req.zones.is_empty() && !req.zones.contains(&entry.identity.zone) {
                continue;
            }
            let msg = message(req.msg_type.clone(), req.content.clone(), data.clone());
            match self.node.registry.push(&entry, msg) {
                Ok(_) => queued += 1,
                Err(_) => rejected += 1,
            }
        }
        if unreachable > 0 {
            // Partial delivery is reported, never hidden.
            return Err(Status::unavailable(format!(
                "broadcast queued on {queued} sessions but {unreachable} node(s) were unreachable"
            )));
        }
        Ok(Response::new(BroadcastResponse { queued, rejected }))
    }

    async fn get_status(
        &self,
        _request: Request<GatewayStatusRequest>,
    ) -> Result<Response<GatewayStatus>, Status> {
        let registry = &self.node.registry;
        Ok(Response::new(GatewayStatus {
            node_id: self.node.config.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            sessions: registry.len() as u64,
            connected_sessions: registry.connected(),
            draining: self
                .node
                .draining
                .load(std::sync::atomic::Ordering::Relaxed),
            sessions_per_zone: registry.per_zone().into_iter().collect(),
        }))
    }
}

/// How many gateway hops a push has made (`x-gatesvr-forwarded`).
fn forwarded_hops(metadata: &tonic::metadata::MetadataMap) -> u8 {
    metadata
        .get(crate::peer::FORWARDED_HEADER)
        .map(|v| if v.as_bytes() == b"1" { 1 } else { 2 })
        .unwrap_or(0)
}
