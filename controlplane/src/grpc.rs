//! `gatesvr.control.v1.ControlPlane`: the API for data-plane nodes and upstreams.
//!
//! Writes go through [`Node::write`] (batched, forwarded to the leader). `Watch` is served from
//! this replica's applied state: it may lag the leader slightly, never skips or reorders, and
//! its versions are the same on every replica.
//!
//! Who may call which method is decided before a handler runs (`authz`, by
//! certificate role); the handlers add what needs the body: a data-plane node
//! acts only for its own `node_id`, and transfers only sessions it owns.

use std::pin::Pin;

use futures::Stream;
use gatesvr_proto::control as pb;
use gatesvr_proto::control::control_plane_server::ControlPlane as ControlPlaneApi;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::authz;
use crate::config::LeaseConfig;
use crate::error::Error;
use crate::node::Node;
use crate::state::{Cmd, CmdError, CmdResult};
use crate::watch::HubMsg;
use crate::{convert, validate};

/// Most claims accepted in one `ClaimSessions` call.
pub const MAX_CLAIMS_PER_CALL: usize = 10_000;

/// Most openids looked up in one `LookupOwners` call.
pub const MAX_LOOKUPS_PER_CALL: usize = 1_000;

/// Most session ids looked up in one `LookupOwners` call (each call with any scans the
/// owner records once).
pub const MAX_SESSION_LOOKUPS_PER_CALL: usize = 16;

/// The data-plane / upstream API of one control-plane node.
#[derive(Debug, Clone)]
pub struct ControlService {
    node: Node,
    leases: LeaseConfig,
    stop: CancellationToken,
    denials: gatesvr_common::authz::Denials,
}

impl ControlService {
    pub fn new(node: Node, leases: LeaseConfig, stop: CancellationToken) -> Self {
        Self {
            node,
            leases,
            stop,
            denials: authz::denials(),
        }
    }

    /// Refuses a data-plane caller acting for another node.
    fn speaks_for<T>(&self, req: &Request<T>, method: &str, node_id: &str) -> Result<(), Status> {
        authz::speaks_for(
            &self.denials,
            gatesvr_common::authz::caller(req),
            method,
            node_id,
        )
    }

    /// Refuses a transfer by a data-plane node that does not own `openid` at
    /// `expected_epoch`. This replica may lag the one that will apply the
    /// write: it waits (bounded) to know that epoch's owner. Owner and epoch
    /// go together (fencing), so the owner seen here is the one the write
    /// would move from.
    async fn owns(
        &self,
        caller: Option<&gatesvr_common::identity::Identity>,
        openid: &str,
        expected_epoch: u64,
    ) -> Result<(), Status> {
        let Some(caller) = caller else {
            return Ok(()); // plaintext: nothing to check against
        };
        let deadline = tokio::time::Instant::now() + self.node.settings().read_timeout;
        loop {
            let owner = self
                .node
                .sm()
                .read()
                .state
                .owners
                .get(openid)
                .map(|o| (o.owner_node.clone(), o.epoch));
            match owner {
                Some((node, epoch)) if epoch == expected_epoch => {
                    return authz::speaks_for(
                        &self.denials,
                        Some(caller),
                        "TransferSession",
                        &node,
                    );
                }
                // Moved on already: the write fails its epoch check (ABORTED).
                Some((_, epoch)) if epoch > expected_epoch => return Ok(()),
                _ if tokio::time::Instant::now() >= deadline => {
                    return authz::speaks_for(
                        &self.denials,
                        Some(caller),
                        "TransferSession",
                        "<unknown owner>",
                    );
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }

    async fn one(&self, cmd: Cmd) -> Result<CmdResult, Status> {
        let mut results = self.node.write(vec![cmd]).await?;
        let r = results
            .pop()
            .ok_or_else(|| Status::internal("no result for command"))?;
        match r {
            CmdResult::Err(e) => Err(Error::from(e).into()),
            other => Ok(other),
        }
    }
}

fn unexpected(r: &CmdResult) -> Status {
    Status::internal(format!("unexpected state machine result {r:?}"))
}

fn heartbeat_every(ttl_ms: u32) -> u32 {
    (ttl_ms / 3).max(1)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ControlPlaneApi for ControlService {
    async fn register_upstream(
        &self,
        request: Request<pb::RegisterUpstreamRequest>,
    ) -> Result<Response<pb::RegisterUpstreamResponse>, Status> {
        let req = request.into_inner();
        validate::zone(&req.zone, self.node.settings().zone_count)?;
        validate::address("address", &req.address)?;
        validate::ident("service_name", &req.service_name)?;
        let ttl = validate::lease_ttl_ms(req.lease_ttl_ms, &self.leases);
        let r = self
            .one(Cmd::RegisterUpstream {
                instance_id: validate::new_instance_id(),
                zone: req.zone,
                address: req.address,
                service_name: req.service_name,
                lease_ttl_ms: Some(ttl),
            })
            .await?;
        match r {
            CmdResult::Upstream { upstream, .. } => {
                Ok(Response::new(pb::RegisterUpstreamResponse {
                    instance_id: upstream.instance_id,
                    lease_ttl_ms: ttl,
                    heartbeat_interval_ms: heartbeat_every(ttl),
                }))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn heartbeat_upstream(
        &self,
        request: Request<pb::HeartbeatUpstreamRequest>,
    ) -> Result<Response<pb::HeartbeatUpstreamResponse>, Status> {
        let req = request.into_inner();
        validate::ident("instance_id", &req.instance_id)?;
        match self
            .one(Cmd::HeartbeatUpstream {
                instance_id: req.instance_id,
            })
            .await?
        {
            CmdResult::Lease {
                lease_expires_at_ms,
                ..
            } => Ok(Response::new(pb::HeartbeatUpstreamResponse {
                lease_expires_at_ms,
            })),
            other => Err(unexpected(&other)),
        }
    }

    async fn deregister_upstream(
        &self,
        request: Request<pb::DeregisterUpstreamRequest>,
    ) -> Result<Response<pb::DeregisterUpstreamResponse>, Status> {
        let req = request.into_inner();
        validate::ident("instance_id", &req.instance_id)?;
        self.one(Cmd::DeregisterUpstream {
            instance_id: req.instance_id,
        })
        .await?;
        Ok(Response::new(pb::DeregisterUpstreamResponse {}))
    }

    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        let node_id = request.get_ref().node.as_ref().map(|n| n.node_id.clone());
        self.speaks_for(&request, "RegisterNode", node_id.as_deref().unwrap_or(""))?;
        let req = request.into_inner();
        let node = req
            .node
            .ok_or_else(|| Status::invalid_argument("node is required"))?;
        validate::ident("node.node_id", &node.node_id)?;
        validate::address("node.quic_addr", &node.quic_addr)?;
        validate::address("node.grpc_addr", &node.grpc_addr)?;
        let ttl = validate::lease_ttl_ms(req.lease_ttl_ms, &self.leases);
        self.one(Cmd::RegisterNode {
            node_id: node.node_id,
            quic_addr: node.quic_addr,
            grpc_addr: node.grpc_addr,
            lease_ttl_ms: ttl,
        })
        .await?;
        Ok(Response::new(pb::RegisterNodeResponse {
            lease_ttl_ms: ttl,
            heartbeat_interval_ms: heartbeat_every(ttl),
        }))
    }

    async fn heartbeat_node(
        &self,
        request: Request<pb::HeartbeatNodeRequest>,
    ) -> Result<Response<pb::HeartbeatNodeResponse>, Status> {
        self.speaks_for(&request, "HeartbeatNode", &request.get_ref().node_id)?;
        let req = request.into_inner();
        validate::ident("node_id", &req.node_id)?;
        match self
            .one(Cmd::HeartbeatNode {
                node_id: req.node_id,
                draining: req.draining,
                sessions: req.sessions,
            })
            .await?
        {
            CmdResult::Lease {
                lease_expires_at_ms,
                drain_requested,
            } => Ok(Response::new(pb::HeartbeatNodeResponse {
                lease_expires_at_ms,
                drain_requested,
            })),
            other => Err(unexpected(&other)),
        }
    }

    async fn leave_node(
        &self,
        request: Request<pb::LeaveNodeRequest>,
    ) -> Result<Response<pb::LeaveNodeResponse>, Status> {
        self.speaks_for(&request, "LeaveNode", &request.get_ref().node_id)?;
        let req = request.into_inner();
        validate::ident("node_id", &req.node_id)?;
        let node_id = req.node_id;
        match self
            .one(Cmd::LeaveNode {
                node_id: node_id.clone(),
            })
            .await?
        {
            CmdResult::Left { orphaned } => {
                tracing::info!(node = %node_id, orphaned, "data-plane node left");
                Ok(Response::new(pb::LeaveNodeResponse {
                    orphaned_sessions: orphaned,
                }))
            }
            other => Err(unexpected(&other)),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.speaks_for(&request, "Watch", &request.get_ref().node_id)?;
        let req = request.into_inner();
        // A watcher that saw a newer version on another replica waits (bounded) for this one
        // to catch up rather than being sent back in time by an older snapshot.
        let deadline = tokio::time::Instant::now() + self.node.settings().read_timeout;
        while self.node.sm().read().state.version < req.from_version
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let chunked = req.chunked_snapshot;
        // A scoped watch: only the owner records that concern this node.
        let scope = req.scoped.then(|| req.node_id.clone());
        let (first, rx) = self
            .node
            .sm()
            .watch_from(req.from_version, chunked, scope.as_deref());
        let (tx, out) = mpsc::channel(256);
        tokio::spawn(pump(
            self.node.clone(),
            first,
            rx,
            tx,
            self.stop.clone(),
            chunked,
            scope,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn claim_sessions(
        &self,
        request: Request<pb::ClaimSessionsRequest>,
    ) -> Result<Response<pb::ClaimSessionsResponse>, Status> {
        let t0 = std::time::Instant::now();
        self.speaks_for(&request, "ClaimSessions", &request.get_ref().node_id)?;
        let req = request.into_inner();
        validate::ident("node_id", &req.node_id)?;
        if req.claims.len() > MAX_CLAIMS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_CLAIMS_PER_CALL} claims per call"
            )));
        }
        for c in &req.claims {
            validate::ident("claims.openid", &c.openid)?;
            validate::ident("claims.session_id", &c.session_id)?;
            if !c.fresh_session_id.is_empty() {
                validate::ident("claims.fresh_session_id", &c.fresh_session_id)?;
            }
        }
        let cmds: Vec<Cmd> = req
            .claims
            .iter()
            .map(|c| Cmd::Claim {
                node_id: req.node_id.clone(),
                openid: c.openid.clone(),
                session_id: c.session_id.clone(),
                fresh_session_id: c.fresh_session_id.clone(),
            })
            .collect();
        let results = self.node.write(cmds).await;
        crate::stages::record(|| "grpc.claim_sessions".into(), t0.elapsed());
        let results = results?;
        // A claimant that may not own sessions gets one clear error, not N per-claim ones.
        if let Some(CmdResult::Err(e @ CmdError::NodeNotActive { .. })) = results.first() {
            return Err(Error::from(e.clone()).into());
        }
        let results = req
            .claims
            .iter()
            .zip(results)
            .map(|(claim, r)| match r {
                CmdResult::Owned {
                    openid,
                    owner,
                    previous_owner,
                    previous_epoch,
                } => pb::ClaimResult {
                    owner: Some(convert::owner(&openid, &owner)),
                    openid,
                    previous_owner: previous_owner.unwrap_or_default(),
                    previous_epoch,
                    error: String::new(),
                },
                other => pb::ClaimResult {
                    openid: claim.openid.clone(),
                    owner: None,
                    previous_owner: String::new(),
                    previous_epoch: 0,
                    error: other
                        .err()
                        .map_or_else(|| format!("unexpected {other:?}"), ToString::to_string),
                },
            })
            .collect();
        Ok(Response::new(pb::ClaimSessionsResponse { results }))
    }

    async fn release_sessions(
        &self,
        request: Request<pb::ReleaseSessionsRequest>,
    ) -> Result<Response<pb::ReleaseSessionsResponse>, Status> {
        self.speaks_for(&request, "ReleaseSessions", &request.get_ref().node_id)?;
        let req = request.into_inner();
        validate::ident("node_id", &req.node_id)?;
        if req.sessions.len() > MAX_CLAIMS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_CLAIMS_PER_CALL} sessions per call"
            )));
        }
        let cmds: Vec<Cmd> = req
            .sessions
            .iter()
            .map(|s| Cmd::Release {
                node_id: req.node_id.clone(),
                openid: s.openid.clone(),
                epoch: s.epoch,
            })
            .collect();
        let results = self.node.write(cmds).await?;
        let released = results
            .iter()
            .filter(|r| matches!(r, CmdResult::Released { released: true }))
            .count();
        let fenced = results.len() - released;
        Ok(Response::new(pb::ReleaseSessionsResponse {
            released: u32::try_from(released).unwrap_or(u32::MAX),
            fenced: u32::try_from(fenced).unwrap_or(u32::MAX),
        }))
    }

    async fn transfer_session(
        &self,
        request: Request<pb::TransferSessionRequest>,
    ) -> Result<Response<pb::TransferSessionResponse>, Status> {
        let caller = gatesvr_common::authz::caller(&request).cloned();
        let req = request.into_inner();
        validate::ident("openid", &req.openid)?;
        validate::ident("to_node", &req.to_node)?;
        self.owns(caller.as_ref(), &req.openid, req.expected_epoch)
            .await?;
        match self
            .one(Cmd::Transfer {
                openid: req.openid,
                expected_epoch: req.expected_epoch,
                to_node: req.to_node,
            })
            .await?
        {
            CmdResult::Owned { openid, owner, .. } => {
                Ok(Response::new(pb::TransferSessionResponse {
                    owner: Some(convert::owner(&openid, &owner)),
                }))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn lookup_owners(
        &self,
        request: Request<pb::LookupOwnersRequest>,
    ) -> Result<Response<pb::LookupOwnersResponse>, Status> {
        self.speaks_for(&request, "LookupOwners", &request.get_ref().node_id)?;
        let req = request.into_inner();
        if req.openids.len() > MAX_LOOKUPS_PER_CALL
            || req.session_ids.len() > MAX_SESSION_LOOKUPS_PER_CALL
        {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_LOOKUPS_PER_CALL} openids and {MAX_SESSION_LOOKUPS_PER_CALL} session ids per call"
            )));
        }
        // This replica's applied state: a lagging answer names an older owner at an older
        // epoch, which the caller's forward then finds moved on (it evicts and asks again).
        let sm = self.node.sm();
        let inner = sm.read();
        let owners = inner
            .state
            .lookup_owners(&req.openids, &req.session_ids)
            .into_iter()
            .map(|(openid, o)| convert::owner(openid, o))
            .collect();
        Ok(Response::new(pb::LookupOwnersResponse {
            owners,
            version: inner.state.version,
        }))
    }
}

/// Feeds one watcher: the first events, then live deltas; re-snapshots after a reset or lag.
async fn pump(
    node: Node,
    first: Vec<pb::WatchEvent>,
    mut rx: broadcast::Receiver<HubMsg>,
    tx: mpsc::Sender<Result<pb::WatchEvent, Status>>,
    stop: CancellationToken,
    chunked: bool,
    scope: Option<String>,
) {
    let mut last = 0;
    for e in first {
        last = e.version;
        if tx.send(Ok(e)).await.is_err() {
            return;
        }
    }
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => {
                let _ = tx.send(Err(Status::unavailable("control plane shutting down; resume elsewhere"))).await;
                return;
            }
            _ = tx.closed() => return,
            msg = rx.recv() => msg,
        };
        let batch: Vec<pb::WatchEvent> = match msg {
            Ok(HubMsg::Events(events)) => events
                .iter()
                .filter(|e| e.event.version > last && e.for_watcher(scope.as_deref()))
                .map(|e| e.event.clone())
                .collect(),
            Ok(HubMsg::Reset) | Err(broadcast::error::RecvError::Lagged(_)) => {
                // Resubscribing is unnecessary: the receiver skips ahead; a snapshot covers
                // everything up to its version and later events are filtered by version.
                node.sm().snapshot_events(chunked, scope.as_deref())
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        for e in batch {
            last = last.max(e.version);
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
    }
}
