//! `GatewayService` (gRPC on `server.grpc_addr`): upstreams push to clients.
//!
//! Errors map to gRPC codes: NOT_FOUND (no such session), RESOURCE_EXHAUSTED
//! (the session's queue is full, by count or bytes; the client is being
//! disconnected as a slow consumer and will resume), INVALID_ARGUMENT (empty
//! target; a push larger than the client frame limit, refused before it is
//! queued: queued, it would break the client's stream on every resume).
//!
//! A push's payload is encoded once ([`PushBody`]) and shared: by a
//! broadcast's sessions, by retries and retransmits.
//!
//! A durable push (`durable: true`) answers OK only once the owner's standby
//! holds a copy (see `replica`); with no standby it is refused before being
//! queued (FAILED_PRECONDITION). A durable push is also refused UNAVAILABLE
//! ("not queued": retry) while this node's control-plane lease may have lapsed
//! (lease-based fencing, `core::lease`). Once it is queued, a failure to make
//! it durable (the copy failed, or the lease lapsed while it travelled) is
//! UNKNOWN: it may still be delivered, it is not durable, and a blind retry
//! would deliver it twice; UNAVAILABLE always means "not queued".

use std::sync::Arc;

use gatesvr_proto::upstream::gateway_service_server::GatewayService;
use gatesvr_proto::upstream::{
    BroadcastRequest, BroadcastResponse, GatewayStatus, GatewayStatusRequest, PushBatchRequest,
    PushBatchResponse, PushResult, PushToClientRequest, PushToClientResponse, TargetType,
};
use tonic::{Request, Response, Status};

use crate::connection::unix_ms;
use crate::core::Target;
use crate::errors::GatewayRefusal;
use crate::node::Node;
use crate::registry::PushFailure;
use crate::session::{PushBody, PushError, PushMessage};

pub(crate) mod wire;

use wire::InPush;

pub struct Gateway {
    pub node: Arc<Node>,
}

/// Refuses a push whose frame could exceed the client frame limit
/// (`server.max_frame_size`, announced in StartResponse): the client's
/// decoder would refuse it and close the connection, and, still unacked, it
/// would be sent again on every resume.
fn check_size(node: &Node, body: &PushBody) -> Result<(), Status> {
    let max = node.config.server.max_frame_size;
    let len = body.max_envelope_len();
    if len <= max {
        return Ok(());
    }
    node.metrics
        .pushes
        .with_label_values(&["rejected_too_large"])
        .inc();
    Err(GatewayRefusal::TooLarge { len, max }.into())
}

impl Gateway {
    /// The owner known here for `openid`: (node, epoch) from the view (this
    /// node's sessions) or the cache of other nodes' (no lookup).
    fn view_owner(&self, openid: &str) -> Option<(String, u64)> {
        self.node.cluster.as_ref()?.known_owner(openid)
    }

    /// Forwards `req` to node `to` (`hops` made so far, 0 or 1). A forwarded
    /// push is forwarded again only along a "moved to" record of the node it
    /// reached, and at most once more: no loops.
    async fn forward(
        &self,
        to: &str,
        req: PushToClientRequest,
        hops: u8,
    ) -> Result<Response<PushToClientResponse>, Status> {
        let node = &self.node;
        let addr = node
            .registry
            .members(|m| m.live(to).map(|n| n.grpc_addr.clone()));
        let Some(addr) = addr else {
            node.metrics.pushes.with_label_values(&["no_session"]).inc();
            return Err(GatewayRefusal::NoSession {
                target: req.target_id.clone(),
            }
            .into());
        };
        let mut client = node.peers.gateway(&addr)?;
        let mut forward = Request::new(req);
        forward.set_timeout(crate::peer::PEER_TIMEOUT);
        forward.metadata_mut().insert(
            crate::peer::FORWARDED_HEADER,
            tonic::metadata::MetadataValue::from_static(if hops == 0 { "1" } else { "2" }),
        );
        match client.push_to_client(forward).await {
            Ok(r) => {
                node.metrics
                    .pushes_forwarded
                    .with_label_values(&["ok"])
                    .inc();
                Ok(r)
            }
            // The owner's own refusal goes back as it is; a transport failure is
            // told apart by whether the owner can have queued the push.
            Err(status) => {
                let (outcome, status) = match crate::peer::delivery(&status) {
                    crate::peer::Delivery::Answered => ("failed", status),
                    crate::peer::Delivery::Unsent => {
                        ("unsent", GatewayRefusal::NotForwarded.into())
                    }
                    crate::peer::Delivery::Unknown => {
                        tracing::warn!(owner = to, error = %status, "forwarded push unanswered");
                        ("unanswered", GatewayRefusal::ForwardUnanswered.into())
                    }
                };
                node.metrics
                    .pushes_forwarded
                    .with_label_values(&[outcome])
                    .inc();
                Err(status)
            }
        }
    }

    /// One push, `hops` gateway hops in (0: from an upstream, 1: forwarded
    /// once by another node, 2+: serve here or refuse).
    ///
    /// The table decides (under its lock) whether the session is served
    /// here, comparing its epoch with the view's owner first; a durable push
    /// answers OK only once the owner's standby holds a copy.
    async fn push_one(
        &self,
        hops: u8,
        req: PushToClientRequest,
    ) -> Result<Response<PushToClientResponse>, Status> {
        let node = &self.node;
        if node.crashed() {
            return Err(GatewayRefusal::Stopped.into());
        }
        if req.target_id.is_empty() {
            return Err(GatewayRefusal::NoTarget.into());
        }
        let by_session = match TargetType::try_from(req.target_type) {
            Ok(TargetType::Openid) => false,
            Ok(TargetType::Session) => true,
            Err(_) => return Err(GatewayRefusal::UnknownTargetType.into()),
        };
        let registry = &node.registry;
        let openid = if by_session {
            registry.with_table(|t| t.openid_of(&req.target_id).map(str::to_string))
        } else {
            Some(req.target_id.clone())
        };
        // Pushes from an upstream are checked against the view; a push
        // forwarded by another node followed that node's own table.
        let view_owner = openid
            .as_deref()
            .and_then(|o| self.view_owner(o))
            .filter(|_| hops == 0);
        let target = if by_session {
            Target::Session(&req.target_id)
        } else {
            Target::Openid(&req.target_id)
        };
        let local = if by_session {
            registry.get_by_session(&req.target_id)
        } else {
            registry.get(&req.target_id)
        };
        let standby = if req.durable && local.is_some() {
            let standby = crate::replica::standby_for(node);
            if standby.is_none() {
                node.metrics
                    .durable_pushes
                    .with_label_values(&["no_standby"])
                    .inc();
                return Err(GatewayRefusal::NoStandby.into());
            }
            self.lease_check(false).await?;
            standby
        } else {
            None
        };
        let created_at_ms = unix_ms();
        let msg = PushBody::encode(&PushMessage {
            msg_type: req.msg_type.clone(),
            content: req.content.clone(),
            data: req.data.clone(),
            created_at_ms,
        });
        check_size(node, &msg)?;
        let result = registry
            .push_settled(
                target,
                msg,
                view_owner.as_ref().map(|(n, e)| (n.as_str(), *e)),
                crate::peer::PEER_TIMEOUT,
            )
            .await;
        let not_found = || {
            node.metrics.pushes.with_label_values(&["no_session"]).inc();
            Err(GatewayRefusal::NoSession {
                target: req.target_id.clone(),
            }
            .into())
        };
        match result {
            Ok(receipt) => {
                let response = Response::new(PushToClientResponse {
                    seq_id: receipt.seq_id,
                    session_id: receipt.entry.identity.session_id.clone(),
                    node_id: node.config.node_id.clone(),
                });
                match (req.durable, standby) {
                    (true, Some(standby)) => {
                        let push = gatesvr_proto::client::ServerPush {
                            seq_id: receipt.seq_id,
                            msg_type: req.msg_type,
                            content: req.content,
                            data: req.data,
                            created_at_ms,
                            redelivery: false,
                        };
                        self.replicate(&receipt, &standby, push, response).await
                    }
                    (true, None) => Err(GatewayRefusal::MovedWhileQueued {
                        seq: receipt.seq_id,
                    }
                    .into()),
                    _ => Ok(response),
                }
            }
            Err(PushFailure::Moved(to)) if hops < 2 => self.forward(&to, req, hops).await,
            Err(PushFailure::Moved(_)) => not_found(),
            Err(PushFailure::NoSession(_)) if hops == 0 => {
                // Not here: forward to the owner, known or looked up (a
                // scoped watch does not carry other nodes' sessions).
                let cluster = node.cluster.as_ref();
                let owner = match (&view_owner, cluster, openid.as_deref()) {
                    (Some((owner, epoch)), _, _) => Some((owner.clone(), *epoch)),
                    (None, Some(c), Some(openid)) => c.lookup_owner(openid).await,
                    (None, Some(c), None) if by_session => {
                        c.lookup_session_owner(&req.target_id).await.map(|o| (o, 0))
                    }
                    _ => None,
                };
                match owner.filter(|(o, _)| *o != node.config.node_id) {
                    Some((owner, epoch)) => {
                        let forwarded = self.forward(&owner, req, hops).await;
                        // The owner named here no longer has it: stale.
                        if let (Err(status), Some(c), Some(openid)) = (&forwarded, cluster, &openid)
                            && status.code() == tonic::Code::NotFound
                        {
                            c.forget_owner(openid, epoch);
                        }
                        forwarded
                    }
                    None => not_found(),
                }
            }
            Err(PushFailure::NoSession(_)) => not_found(),
            Err(PushFailure::InTransit) => Err(GatewayRefusal::InTransit.into()),
            Err(PushFailure::Refused(full @ PushError::QueueFull { .. })) => {
                Err(GatewayRefusal::QueueFull {
                    full: full.to_string(),
                }
                .into())
            }
            Err(PushFailure::Refused(PushError::Expired)) => not_found(),
        }
    }

    /// Many pushes in order (PushBatch, a stream's `push_batch` and pushes
    /// that arrived together on a stream): one result each, as
    /// [`Gateway::push_one`] would give it.
    ///
    /// The leading run of plain pushes (by openid, not durable) whose
    /// sessions are served here is queued in chunks, one table lock and one
    /// wake-up per session per chunk ([`crate::registry::Registry::push_run`]),
    /// each payload encoded once from the borrowed fields. From the first
    /// push that is not such a push, the rest go one at a time through
    /// `push_one` (forwarding, durability, waits): order per session is the
    /// order given, because a push never overtakes an earlier one.
    ///
    /// With `codes_only` (a `push_batch` that asked for codes), a push queued
    /// here adds its code 0 alone to the answer: no result is made for it,
    /// no session id or node id copied.
    pub(crate) async fn push_many(
        &self,
        hops: u8,
        mut pushes: Vec<InPush>,
        codes_only: bool,
    ) -> BatchAnswer {
        /// Pushes queued per table lock: bounds how long one batch holds it.
        const CHUNK: usize = 64;
        let node = &self.node;
        let plain =
            |p: &InPush| !p.durable && p.has_target() && p.target_type == TargetType::Openid as i32;
        let mut results = BatchAnswer::new(codes_only, pushes.len());
        // `pushes[..at]` have their results. Chunks are read in place (not
        // moved out of `pushes`).
        let mut at = 0;
        while !node.crashed() && at < pushes.len() {
            let end = at
                + pushes[at..]
                    .iter()
                    .take(CHUNK)
                    .take_while(|p| plain(p))
                    .count();
            if end == at {
                break;
            }
            let chunk = &pushes[at..end];
            let created_at_ms = unix_ms();
            // Each push's openid and the view's owner of it, read once per
            // run of pushes to one openid (a batch to one user reads them
            // once): `target_id` checks a received field's UTF-8 again, and
            // the owner is a lookup (and a copy of a node id) in a cluster.
            // `targets[i]`: push i's openid and its owner's index in `owners`.
            let mut targets: Vec<(&str, usize)> = Vec::with_capacity(chunk.len());
            let mut owners: Vec<Option<(String, u64)>> = Vec::new();
            for p in chunk {
                let same = targets
                    .last()
                    .filter(|(openid, _)| openid.as_bytes() == p.target_bytes())
                    .copied();
                targets.push(same.unwrap_or_else(|| {
                    let openid = p.target_id();
                    owners.push(self.view_owner(openid).filter(|_| hops == 0));
                    (openid, owners.len() - 1)
                }));
            }
            let mut run: Vec<crate::registry::RunPush<'_>> = Vec::with_capacity(chunk.len());
            // A push too large for the client is refused alone; the run stops
            // before it so results stay in order.
            let mut too_large = None;
            // The previous push's message and where its body is in `run`: a
            // push carrying the same message (a group's message to each
            // member, one message to one user many times) shares that body
            // instead of encoding its own. (Only a shared body is cloned: the
            // first clone of a fresh one allocates its reference count.)
            let mut last: Option<(Contents<'_>, usize)> = None;
            for (p, &(openid, owner)) in chunk.iter().zip(&targets) {
                let contents = Contents::of(p);
                let body = match last {
                    Some((c, i)) if c == contents => run[i].body.clone(),
                    _ => {
                        let body = PushBody::encode_fields(
                            contents.msg_type,
                            contents.content,
                            contents.data,
                            created_at_ms,
                        );
                        if let Err(status) = check_size(node, &body) {
                            too_large = Some(status);
                            break;
                        }
                        last = Some((contents, run.len()));
                        body
                    }
                };
                run.push(crate::registry::RunPush {
                    openid,
                    body,
                    view_owner: owners[owner].as_ref().map(|(n, e)| (n.as_str(), *e)),
                });
            }
            let queued = run.len();
            let outcomes = node.registry.push_run(run);
            let done = outcomes.len();
            let stopped = done < queued;
            for (outcome, p) in outcomes.into_iter().zip(chunk) {
                let refusal = match outcome {
                    Ok(receipt) => {
                        results.queued(|| PushResult {
                            seq_id: receipt.seq_id,
                            session_id: receipt.entry.identity.session_id.clone(),
                            node_id: node.config.node_id.clone(),
                            code: 0,
                            message: String::new(),
                        });
                        continue;
                    }
                    Err(full @ PushError::QueueFull { .. }) => refused(
                        GatewayRefusal::QueueFull {
                            full: full.to_string(),
                        }
                        .into(),
                    ),
                    Err(PushError::Expired) => {
                        node.metrics.pushes.with_label_values(&["no_session"]).inc();
                        refused(
                            GatewayRefusal::NoSession {
                                target: p.target_id().to_owned(),
                            }
                            .into(),
                        )
                    }
                };
                results.push(refusal);
            }
            at += done;
            if let (false, Some(status)) = (stopped, too_large) {
                at += 1;
                results.push(refused(status));
            }
            if at < end {
                // The first of the chunk's rest needs the full path: it and
                // everything after it take it.
                break;
            }
        }
        let rest = pushes.split_off(at);
        results.extend(self.push_each(hops, rest).await);
        results
    }

    /// Pushes through [`Gateway::push_one`] (forwarding to other nodes,
    /// durability, waits for sessions in transit): each target's pushes one
    /// after another in the order given, different openids concurrently. A
    /// run with any push by session id goes one push at a time (a session id
    /// and an openid may name the same session).
    async fn push_each(&self, hops: u8, pushes: Vec<InPush>) -> Vec<PushResult> {
        if pushes.len() <= 1
            || pushes
                .iter()
                .any(|p| p.target_type != TargetType::Openid as i32)
        {
            let mut results = Vec::with_capacity(pushes.len());
            for push in pushes {
                results.push(push_result(self.push_one(hops, push.into()).await));
            }
            return results;
        }
        let n = pushes.len();
        let mut by_target: std::collections::HashMap<String, Vec<(usize, InPush)>> =
            std::collections::HashMap::new();
        for (i, p) in pushes.into_iter().enumerate() {
            by_target
                .entry(p.target_id().to_owned())
                .or_default()
                .push((i, p));
        }
        let done = futures::future::join_all(by_target.into_values().map(|list| async move {
            let mut out = Vec::with_capacity(list.len());
            for (i, push) in list {
                out.push((i, push_result(self.push_one(hops, push.into()).await)));
            }
            out
        }))
        .await;
        let mut results = vec![PushResult::default(); n];
        for (i, r) in done.into_iter().flatten() {
            results[i] = r;
        }
        results
    }

    /// Lease-based fencing (`core::lease`): a durable push is acknowledged
    /// only while this node's control-plane lease surely still holds. A node
    /// cut off from the control plane may have been declared dead, and a
    /// client that reconnected elsewhere had its session rebuilt from the
    /// replicas: a push acknowledged here now would be lost. Counted in
    /// `gatesvr_durable_pushes_total{outcome="lease_lapsed"}` (and
    /// `lease_rejoining`, `lease_not_held`); refused with UNAVAILABLE. A
    /// lease that does not hold right now is waited for up to a third of the
    /// lease time (a heartbeat interval): the renewal in flight usually lands.
    async fn lease_check(&self, queued: bool) -> Result<(), Status> {
        let node = &self.node;
        let Some(cluster) = &node.cluster else {
            return Ok(());
        };
        let patience = node.config.control_plane.lease_ttl / 3;
        cluster.lease_wait(patience).await.map_err(|e| {
            node.metrics
                .durable_pushes
                .with_label_values(&[e.label()])
                .inc();
            let lease = e.to_string();
            if queued {
                GatewayRefusal::NoLeaseQueued { lease }.into()
            } else {
                GatewayRefusal::NoLease { lease }.into()
            }
        })
    }

    /// Copies a queued durable push to the standby before answering OK.
    async fn replicate(
        &self,
        receipt: &crate::registry::PushReceipt,
        standby: &crate::core::Member,
        push: gatesvr_proto::client::ServerPush,
        response: Response<PushToClientResponse>,
    ) -> Result<Response<PushToClientResponse>, Status> {
        let node = &self.node;
        let seq = receipt.seq_id;
        let mut result =
            crate::replica::replicate(node, &receipt.entry, standby, vec![push.clone()]).await;
        // A standby that cannot be reached or dropped the call (UNAVAILABLE, CANCELLED: it
        // exited a moment ago in a rollout, before the view says so): it is passed over from
        // now on (its other sessions are copied to the next node by the ack sync at once), and
        // this copy goes to the next nodes on the ring instead (a recovery asks every live
        // node; a standby new to the session gets its whole queue). The push is queued once
        // whatever happens here.
        // UNKNOWN is tonic's "transport error": the connection broke in the middle of the
        // call, as when the standby exits (the rolling test saw it); a standby's own refusals
        // carry other codes.
        let gone = |r: &Result<(), Status>| {
            r.as_ref().is_err_and(|s| {
                matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
                )
            })
        };
        if let Err(status) = &result
            && crate::replica::unreachable(status)
        {
            crate::replica::standby_unreachable(node, &standby.node_id, status);
        }
        if gone(&result) {
            let next: Vec<crate::core::Member> = node.registry.members(|m| {
                m.standby_ring(std::time::Instant::now())
                    .into_iter()
                    .filter(|c| c.node_id != standby.node_id)
                    .take(2)
                    .cloned()
                    .collect()
            });
            for candidate in next {
                tracing::info!(
                    standby = %standby.node_id,
                    next = %candidate.node_id,
                    "standby unreachable; copying the durable push to the next node"
                );
                result =
                    crate::replica::replicate(node, &receipt.entry, &candidate, vec![push.clone()])
                        .await;
                if let Err(status) = &result
                    && crate::replica::unreachable(status)
                {
                    crate::replica::standby_unreachable(node, &candidate.node_id, status);
                }
                if !gone(&result) {
                    break;
                }
            }
        }
        match result {
            // Checked again now: the lease may have lapsed while the copy
            // travelled, and the answer is what must not be a silent OK.
            Ok(()) => {
                if self.lease_check(true).await.is_err() {
                    return Err(GatewayRefusal::LeaseLapsedAfterCopy { seq }.into());
                }
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
                Err(GatewayRefusal::NotCopied {
                    standby: standby.node_id.clone(),
                    why: status.message().to_string(),
                    seq,
                }
                .into())
            }
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
            return Err(GatewayRefusal::BatchTooLarge { max: MAX_BATCH }.into());
        }
        // Per push the same outcome as PushToClient; order per session is
        // the order in the batch. (The Strings are taken over, not copied.)
        let pushes = batch.pushes.into_iter().map(InPush::from).collect();
        let answer = self.push_many(hops, pushes, batch.codes_only).await;
        Ok(Response::new(PushBatchResponse {
            results: answer.results,
            codes: answer.codes,
        }))
    }

    async fn broadcast_to_clients(
        &self,
        request: Request<BroadcastRequest>,
    ) -> Result<Response<BroadcastResponse>, Status> {
        if self.node.crashed() {
            return Err(GatewayRefusal::Stopped.into());
        }
        let forwarded = request
            .metadata()
            .contains_key(crate::peer::FORWARDED_HEADER);
        let req = request.into_inner();
        // Encoded once, shared by every session here (session/body.rs); a
        // broadcast too large for the client frame limit is refused before
        // any node queues it.
        let body = PushBody::encode(&PushMessage {
            msg_type: req.msg_type.clone(),
            content: req.content.clone(),
            data: req.data.clone().into(),
            created_at_ms: unix_ms(),
        });
        check_size(&self.node, &body)?;
        // Fan out to every other live node first (their sessions are theirs
        // to queue on), then queue on ours.
        // Live nodes only: dead and departed (`left`) records are never
        // waited on (core::Members decides).
        let peers: Vec<String> = match (&self.node.cluster, forwarded) {
            (Some(_), false) => self.node.registry.members(|m| {
                m.fan_out()
                    .into_iter()
                    .map(|n| n.grpc_addr.clone())
                    .collect()
            }),
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
        let mut queued = 0u32;
        let mut rejected = 0u32;
        for r in remote.into_iter().flatten() {
            queued += r.queued;
            rejected += r.rejected;
        }
        let mut entries = self.node.registry.all();
        if !req.zones.is_empty() {
            entries.retain(|e| req.zones.contains(&e.identity.zone));
        }
        // One table lock and one metrics update per run of sessions.
        let (here_queued, here_rejected) = self.node.registry.push_each(&entries, &body);
        queued += here_queued;
        rejected += here_rejected;
        if unreachable > 0 {
            // Partial delivery is reported, never hidden.
            return Err(GatewayRefusal::BroadcastPartial {
                queued,
                unreachable,
            }
            .into());
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

/// What a push delivers (its body's fields, borrowed): two pushes with equal
/// ones share one encoded body. The payload is compared first, where pushes
/// that differ usually differ (a length mismatch is one comparison).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Contents<'a> {
    data: &'a [u8],
    msg_type: &'a [u8],
    content: &'a [u8],
}

impl<'a> Contents<'a> {
    #[inline]
    fn of(push: &'a InPush) -> Self {
        Self {
            data: push.data(),
            msg_type: push.msg_type(),
            content: push.content(),
        }
    }
}

/// How many gateway hops a push has made (`x-gatesvr-forwarded`).
fn forwarded_hops(metadata: &tonic::metadata::MetadataMap) -> u8 {
    metadata
        .get(crate::peer::FORWARDED_HEADER)
        .map(|v| if v.as_bytes() == b"1" { 1 } else { 2 })
        .unwrap_or(0)
}

/// A refusal as one item of a batch result.
fn refused(status: Status) -> PushResult {
    push_result(Err(status))
}

/// A batch's answer as it goes on the wire (docs/protocol.md §13.3 and
/// §14.2): every push's result, or with `codes_only` every push's code and
/// the refused pushes' results (code != 0), both in order. Built push by
/// push: with `codes_only` a queued push adds its code and nothing else.
#[derive(Debug, Default)]
pub struct BatchAnswer {
    codes_only: bool,
    pub results: Vec<PushResult>,
    pub codes: Vec<i32>,
}

impl BatchAnswer {
    /// An empty answer with room for `n` pushes.
    pub(crate) fn new(codes_only: bool, n: usize) -> Self {
        let (results, codes) = if codes_only { (0, n) } else { (n, 0) };
        Self {
            codes_only,
            results: Vec::with_capacity(results),
            codes: Vec::with_capacity(codes),
        }
    }

    /// Every push of a batch of `n` answered with `result`.
    pub(crate) fn all(codes_only: bool, n: usize, result: PushResult) -> Self {
        let mut answer = Self::new(codes_only, n);
        answer.extend(std::iter::repeat_n(result, n));
        answer
    }

    /// The next push's result.
    pub(crate) fn push(&mut self, result: PushResult) {
        if !self.codes_only {
            self.results.push(result);
            return;
        }
        self.codes.push(result.code);
        if result.code != 0 {
            self.results.push(result);
        }
    }

    /// The next push was queued; `result` is made only if the answer has
    /// room for it (not with `codes_only`).
    fn queued(&mut self, result: impl FnOnce() -> PushResult) {
        if self.codes_only {
            self.codes.push(0);
        } else {
            self.results.push(result());
        }
    }

    pub(crate) fn extend(&mut self, results: impl IntoIterator<Item = PushResult>) {
        for result in results {
            self.push(result);
        }
    }
}

/// A `PushToClient` outcome as one item of a batch (or stream) result.
pub(crate) fn push_result(
    outcome: Result<tonic::Response<PushToClientResponse>, Status>,
) -> PushResult {
    match outcome {
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
            message: status.message().to_owned(),
            ..Default::default()
        },
    }
}
