//! Data plane <-> data plane: session handover and push forwarding.
//!
//! ```text
//!  new owner                         previous owner
//!  claim (epoch e) ──> control plane
//!  Peer.Handover(openid, e) ───────> fence local copy (epoch < e), export, forget
//!  install(state, e) <────────────── SessionState
//!
//!  any node: PushToClient for a session owned elsewhere
//!      ──> GatewayService.PushToClient on the owner (header x-gatesvr-forwarded)
//!
//!  owner: durable push ──Peer.Replicate──> standby (see `replica`)
//!  new owner, previous owner gone ──Peer.FetchReplicas──> live nodes
//!      (the fetches of a reconnect burst batched per node: replica::FetchBatcher)
//! ```
//!
//! A session's state grows with its queue (up to `session.max_queue` pushes
//! of up to `session.max_frame_size` bytes), so handovers and replica
//! fetches travel as streams of chunks of about
//! [`gatesvr_proto::limits::CHUNK_BYTES`] (`HandoverStream`,
//! `FetchReplicaStream`), never one message that could exceed a receiver's
//! limit. A node that answers Unimplemented (an older version) is asked with
//! the unary call.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use gatesvr_proto::limits::{CHUNK_BYTES, chunk_by_size};
use gatesvr_proto::session::SessionState;

use gatesvr_proto::peer::peer_server::Peer;
use gatesvr_proto::peer::{
    FetchReplicaRequest, FetchReplicaResponse, FetchReplicasChunk, FetchReplicasRequest,
    HandoverRequest, HandoverResponse, ReplicateRequest, ReplicateResponse, StageRequest,
    StageResponse, peer_client::PeerClient,
};
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use parking_lot::Mutex;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::core::{AfterHandover, Reach};
use crate::errors::PeerRefusal;
use crate::node::Node;

/// Marks a push forwarded by another node: it is never forwarded again.
pub const FORWARDED_HEADER: &str = "x-gatesvr-forwarded";

/// Deadline of one call to another data-plane node.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a peer that refused a connection counts as down (nothing
/// listens: its process is gone) without asking it again
/// ([`crate::core::Members::is_down`]). Covers the time until the control
/// plane declares the node dead (its lease, 3 s by default, then the view's
/// update), after which the view alone answers. An answer clears it at once.
pub const DOWN_MEMORY: Duration = Duration::from_secs(5);

/// Lazily connected channels to other nodes' gRPC ports, by address.
pub struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
    /// mTLS to other nodes (this node's certificate as client identity).
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Peers {
    pub fn new(tls: Option<tonic::transport::ClientTlsConfig>) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            tls,
        }
    }

    pub fn channel(&self, addr: &str) -> Result<Channel, Status> {
        if let Some(c) = self.channels.lock().get(addr) {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| Status::internal(format!("peer address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .http2_keep_alive_interval(Duration::from_secs(10));
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Status::internal(format!("peer TLS: {e}")))?;
        }
        let channel = endpoint.connect_lazy();
        self.channels
            .lock()
            .insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    pub fn gateway(&self, addr: &str) -> Result<GatewayServiceClient<Channel>, Status> {
        Ok(GatewayServiceClient::new(self.channel(addr)?)
            .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES))
    }

    pub fn peer(&self, addr: &str) -> Result<PeerClient<Channel>, Status> {
        Ok(PeerClient::new(self.channel(addr)?)
            .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES))
    }
}

/// The `Peer` service of a node.
pub struct PeerService {
    pub node: Arc<Node>,
}

impl PeerService {
    fn alive(&self) -> Result<(), Status> {
        if self.node.crashed() {
            return Err(PeerRefusal::Stopped.into());
        }
        Ok(())
    }
}

/// A server stream of chunks.
type Chunks<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn stream_of<T: Send + 'static>(chunks: Vec<T>) -> Chunks<T> {
    Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)))
}

/// A handed-over session's state whose stream has not been sent whole. If
/// the stream is dropped before its end (the asker timed out or went away,
/// the connection broke), the state goes back into the table as a fenced
/// copy for the asker at `epoch`: its retry gets the session whole, instead
/// of neither node holding it.
struct Unsent {
    node: Arc<Node>,
    openid: String,
    epoch: u64,
    state: Option<SessionState>,
}

impl Drop for Unsent {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else {
            return;
        };
        let kept = self
            .node
            .registry
            .handover_broken(&self.openid, self.epoch, state);
        tracing::info!(openid = %self.openid, epoch = self.epoch, kept, "handover stream broken before its end; the state is kept for a retry");
        self.node
            .metrics
            .handovers
            .with_label_values(&["stream_broken"])
            .inc();
    }
}

/// A stream of `chunks` that disarms `unsent` once the last chunk is out.
fn guarded_stream<T: Send + 'static>(chunks: Vec<T>, unsent: Unsent) -> Chunks<T> {
    Box::pin(futures::stream::unfold(
        (chunks.into_iter(), unsent),
        |(mut chunks, mut unsent)| async move {
            match chunks.next() {
                Some(chunk) => Some((Ok(chunk), (chunks, unsent))),
                None => {
                    // Asked for more after the last chunk: all of it is out.
                    drop(unsent.state.take());
                    None
                }
            }
        },
    ))
}

/// Splits a handover answer into chunks of about `budget` bytes: the first
/// carries every field of the state and the first pushes, later ones only
/// more pushes, then more completed requests (appended in order by
/// [`join_handover`]).
pub fn split_handover(answer: HandoverResponse, budget: usize) -> Vec<HandoverResponse> {
    let Some(mut head) = answer.state else {
        return vec![answer];
    };
    let pushes = std::mem::take(&mut head.pushes);
    let completed = std::mem::take(&mut head.completed_requests);
    let mut runs = chunk_by_size(pushes, budget).into_iter();
    head.pushes = runs.next().unwrap_or_default();
    let mut out = vec![HandoverResponse {
        found: answer.found,
        state: Some(head),
    }];
    let more = |state: SessionState| HandoverResponse {
        found: answer.found,
        state: Some(state),
    };
    out.extend(runs.map(|pushes| {
        more(SessionState {
            pushes,
            ..Default::default()
        })
    }));
    out.extend(
        chunk_by_size(completed, budget)
            .into_iter()
            .filter(|run| !run.is_empty())
            .map(|completed_requests| {
                more(SessionState {
                    completed_requests,
                    ..Default::default()
                })
            }),
    );
    out
}

/// Splits a Stage into chunks of about `budget` bytes (as
/// [`split_handover`]: the first carries the epoch, the sender and every
/// field of the state, later ones only more of its lists).
pub fn split_stage(req: StageRequest, budget: usize) -> Vec<StageRequest> {
    let StageRequest {
        state,
        epoch,
        from_node,
    } = req;
    let answer = HandoverResponse { found: true, state };
    let mut chunks = split_handover(answer, budget).into_iter();
    let mut out = Vec::new();
    if let Some(first) = chunks.next() {
        out.push(StageRequest {
            state: first.state,
            epoch,
            from_node,
        });
    }
    out.extend(chunks.map(|c| StageRequest {
        state: c.state,
        ..Default::default()
    }));
    out
}

/// Reassembles the chunks of [`split_stage`].
pub fn join_stage(chunks: Vec<StageRequest>) -> StageRequest {
    let Some(first) = chunks.first() else {
        return StageRequest::default();
    };
    let (epoch, from_node) = (first.epoch, first.from_node.clone());
    let whole = join_handover(
        chunks
            .into_iter()
            .map(|c| HandoverResponse {
                found: true,
                state: c.state,
            })
            .collect(),
    );
    StageRequest {
        state: whole.state,
        epoch,
        from_node,
    }
}

/// Reassembles the chunks of `split_handover`.
pub fn join_handover(chunks: Vec<HandoverResponse>) -> HandoverResponse {
    let mut chunks = chunks.into_iter();
    let Some(mut whole) = chunks.next() else {
        return HandoverResponse::default();
    };
    for chunk in chunks {
        if let (Some(state), Some(more)) = (whole.state.as_mut(), chunk.state) {
            state.pushes.extend(more.pushes);
            state.completed_requests.extend(more.completed_requests);
            state
                .unknown_outcome_request_seq_ids
                .extend(more.unknown_outcome_request_seq_ids);
        }
    }
    whole
}

/// Why a peer call brought no answer.
pub enum CallFailure {
    /// The peer answered with an error (possibly in the middle of a stream).
    Status(Status),
    /// No answer (or no next chunk) within [`PEER_TIMEOUT`].
    Timeout,
    /// The stream broke after its first chunk (an error or a silence
    /// mid-way): the peer answered, but not whole. A handover's sender keeps
    /// the state for a retry then.
    Broken(String),
}

/// Every message of a server stream, each within [`PEER_TIMEOUT`] of the
/// one before (a large state takes as long as it takes, a stalled peer not).
pub async fn collect_stream<T>(
    started: Result<Result<Response<tonic::Streaming<T>>, Status>, tokio::time::error::Elapsed>,
) -> Result<Vec<T>, CallFailure> {
    let mut stream = match started {
        Err(_) => return Err(CallFailure::Timeout),
        Ok(Err(status)) => return Err(CallFailure::Status(status)),
        Ok(Ok(r)) => r.into_inner(),
    };
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(PEER_TIMEOUT, stream.message()).await {
            Err(_) if out.is_empty() => return Err(CallFailure::Timeout),
            Ok(Err(status)) if out.is_empty() => return Err(CallFailure::Status(status)),
            Err(_) => return Err(CallFailure::Broken("no next chunk in time".into())),
            Ok(Err(status)) => return Err(CallFailure::Broken(status.to_string())),
            Ok(Ok(None)) => return Ok(out),
            Ok(Ok(Some(m))) => out.push(m),
        }
    }
}

/// `Peer.HandoverStream`, or `Peer.Handover` on a node that does not know it.
async fn call_handover(
    client: &mut PeerClient<Channel>,
    req: HandoverRequest,
) -> Result<HandoverResponse, CallFailure> {
    let mut request = Request::new(req.clone());
    request.set_timeout(PEER_TIMEOUT);
    let started = tokio::time::timeout(PEER_TIMEOUT, client.handover_stream(request)).await;
    if let Ok(Err(status)) = &started
        && status.code() == tonic::Code::Unimplemented
    {
        let mut request = Request::new(req);
        request.set_timeout(PEER_TIMEOUT);
        return match tokio::time::timeout(PEER_TIMEOUT, client.handover(request)).await {
            Err(_) => Err(CallFailure::Timeout),
            Ok(r) => r.map(Response::into_inner).map_err(CallFailure::Status),
        };
    }
    collect_stream(started).await.map(join_handover)
}

#[tonic::async_trait]
impl Peer for PeerService {
    type HandoverStreamStream = Chunks<HandoverResponse>;
    type FetchReplicaStreamStream = Chunks<FetchReplicaResponse>;
    type FetchReplicasStream = Chunks<FetchReplicasChunk>;

    async fn handover_stream(
        &self,
        request: Request<HandoverRequest>,
    ) -> Result<Response<Self::HandoverStreamStream>, Status> {
        let (openid, epoch) = (request.get_ref().openid.clone(), request.get_ref().epoch);
        let answer = self.handover(request).await?.into_inner();
        let Some(state) = answer.state.clone().filter(|_| answer.found) else {
            return Ok(Response::new(stream_of(vec![answer])));
        };
        // Until the last chunk is out, the state is kept: a stream broken
        // mid-way gives it back to the table, for the asker's retry.
        let unsent = Unsent {
            node: self.node.clone(),
            openid,
            epoch,
            state: Some(state),
        };
        Ok(Response::new(guarded_stream(
            split_handover(answer, CHUNK_BYTES),
            unsent,
        )))
    }

    async fn fetch_replica_stream(
        &self,
        request: Request<FetchReplicaRequest>,
    ) -> Result<Response<Self::FetchReplicaStreamStream>, Status> {
        let answer = self.fetch_replica(request).await?.into_inner();
        Ok(Response::new(stream_of(crate::replica::split_fetch(
            answer,
            CHUNK_BYTES,
        ))))
    }

    async fn fetch_replicas(
        &self,
        request: Request<FetchReplicasRequest>,
    ) -> Result<Response<Self::FetchReplicasStream>, Status> {
        self.alive()?;
        let sessions = request.into_inner().sessions;
        let max = crate::replica::MAX_FETCHES_PER_CALL;
        if sessions.len() > max {
            return Err(PeerRefusal::TooManyFetches {
                asked: sessions.len(),
                max,
            }
            .into());
        }
        // Each session is answered when the stream reaches it: one answer at
        // a time is held here, whatever the batch's size.
        let node = self.node.clone();
        let chunks = futures::stream::iter(sessions.into_iter().enumerate()).flat_map(
            move |(index, req)| {
                let answer = crate::replica::answer_fetch(&node, &req.openid, &req.session_id);
                let parts = crate::replica::split_fetch(answer, CHUNK_BYTES);
                futures::stream::iter(parts.into_iter().map(move |part| {
                    Ok(FetchReplicasChunk {
                        index: index as u32,
                        part: Some(part),
                    })
                }))
            },
        );
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn handover(
        &self,
        request: Request<HandoverRequest>,
    ) -> Result<Response<HandoverResponse>, Status> {
        self.alive()?;
        let req = request.into_inner();
        match self
            .node
            .registry
            .hand_over(&req.openid, req.epoch, &req.new_owner, true)
        {
            Ok(Some(state)) => {
                tracing::debug!(openid = %req.openid, to = %req.new_owner, epoch = req.epoch, "handed over session");
                // Held here too until the new owner's standby has it.
                let since = self
                    .node
                    .registry
                    .members(|m| m.registered_at(&req.new_owner));
                self.node
                    .replicas
                    .keep_handed_over(&state, &req.new_owner, since);
                Ok(Response::new(HandoverResponse {
                    found: true,
                    state: Some(state),
                }))
            }
            Ok(None) => Ok(Response::new(HandoverResponse {
                found: false,
                state: None,
            })),
            Err(e) => Err(PeerRefusal::from(e).into()),
        }
    }

    async fn stage_stream(
        &self,
        request: Request<tonic::Streaming<StageRequest>>,
    ) -> Result<Response<StageResponse>, Status> {
        self.alive()?;
        let mut stream = request.into_inner();
        let mut chunks = Vec::new();
        loop {
            match tokio::time::timeout(PEER_TIMEOUT, stream.message()).await {
                Err(_) => return Err(PeerRefusal::StageStalled.into()),
                Ok(Err(status)) => return Err(status),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => chunks.push(chunk),
            }
        }
        // Installed only whole: a broken stream stages nothing (the drainer
        // takes the session back).
        self.stage(Request::new(join_stage(chunks))).await
    }

    async fn stage(
        &self,
        request: Request<StageRequest>,
    ) -> Result<Response<StageResponse>, Status> {
        self.alive()?;
        let req = request.into_inner();
        let state = req.state.ok_or(PeerRefusal::NoState)?;
        let openid = state.openid.clone();
        let view_owner = self
            .node
            .cluster
            .as_ref()
            .and_then(|c| c.known_owner(&openid));
        self.node
            .registry
            .install_as(
                state,
                req.epoch,
                crate::core::Holding::Staged {
                    from: req.from_node.clone(),
                },
                view_owner.as_ref().map(|(n, e)| (n.as_str(), *e)),
            )
            .map_err(PeerRefusal::Stage)?;
        tracing::debug!(openid = %openid, from = %req.from_node, epoch = req.epoch, "session staged here");
        Ok(Response::new(StageResponse {}))
    }

    async fn replicate(
        &self,
        request: Request<ReplicateRequest>,
    ) -> Result<Response<ReplicateResponse>, Status> {
        self.alive()?;
        let req = request.into_inner();
        let owner_since = self
            .node
            .registry
            .members(|m| m.get(&req.owner_node).map_or(0, |o| o.registered_at_ms));
        if !req.relayed {
            self.node
                .replicas
                .heard_from(&req.owner_node, std::time::Instant::now());
        }
        let retained = self.node.replicas.apply(req, owner_since)?;
        Ok(Response::new(ReplicateResponse { retained }))
    }

    async fn fetch_replica(
        &self,
        request: Request<FetchReplicaRequest>,
    ) -> Result<Response<FetchReplicaResponse>, Status> {
        self.alive()?;
        let req = request.into_inner();
        Ok(Response::new(crate::replica::answer_fetch(
            &self.node,
            &req.openid,
            &req.session_id,
        )))
    }
}

/// What [`take_over`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeOver {
    /// The previous owner's state was installed here.
    Installed,
    /// The previous owner answered but had no usable copy (or refused).
    NotHandedOver,
    /// Nothing listens at the previous owner's address (or it is an earlier
    /// life of this node): its state may only survive as a replica of its
    /// durable pushes.
    OwnerGone,
    /// The previous owner never answered and the view no longer holds it
    /// live: as [`TakeOver::OwnerGone`], but it is asked for its replicas
    /// too, briefly, as every node declared dead is
    /// ([`AfterHandover::OwnerDeclaredDead`]).
    OwnerDeclaredDead,
    /// The previous owner answered that it has no copy (it restarted empty,
    /// or handed the session over already and the answer was lost): as
    /// [`TakeOver::OwnerGone`], but its own replicas are asked too (it keeps
    /// what it handed over, `ReplicaStore::keep_handed_over`).
    OwnerEmpty,
    /// The previous owner stayed live in the view without answering for
    /// [`RECOVERY_PATIENCE`]: it may still hold the session, so no second
    /// copy is rebuilt from replicas. The view fences its copy; the Start
    /// continues without the state and says so (SESSION_EXPIRED).
    OwnerSilent,
}

/// Fetches `openid`'s state from `previous_owner` after claiming it at
/// `epoch`, and installs it locally. If the previous owner is gone (crash)
/// and the Start resumes a session under a claim, the live nodes' replicas of
/// its durable pushes are fetched and stashed in the registry: the Start
/// then attaches to a session rebuilt from them (RECOVERED; see `replica`).
pub async fn take_over(
    node: &Node,
    previous_owner: &str,
    openid: &str,
    session_id: &str,
    epoch: u64,
) -> TakeOver {
    let started = tokio::time::Instant::now();
    let outcome = if previous_owner == node.config.node_id {
        // An earlier life of this node (restarted with the same node id):
        // nobody to ask, what it held survives only as replicas.
        TakeOver::OwnerGone
    } else {
        hand_over_from(node, previous_owner, openid, session_id, epoch).await
    };
    let handover_ms = started.elapsed().as_millis() as u64;
    node.metrics
        .start_phase
        .with_label_values(&["handover"])
        .observe(started.elapsed().as_secs_f64());
    if outcome == TakeOver::OwnerSilent {
        // A staged copy here may be stale (a late Stage of a staging its
        // drainer took back and served since): the Start does not resume
        // from it (core::Table::holds, copy_for_recovery fences it).
        let _ = node
            .registry
            .answer_fetch_replica(Default::default(), openid, session_id);
    }
    // A session served here needs no recovery; a copy staged here (never
    // named by the view) is joined with the replicas by the recovery.
    let held_here = node.registry.with_table(|t| t.holds(openid, session_id));
    // An owner that answered is asked for its replicas too (simulation seed
    // 127: a Handover's answer was lost, the owner answered the retry "not
    // found", and the copy it kept of what it handed over was not asked).
    let gone = match outcome {
        TakeOver::OwnerEmpty | TakeOver::OwnerDeclaredDead => "",
        _ => previous_owner,
    };
    if matches!(
        outcome,
        TakeOver::OwnerGone | TakeOver::OwnerEmpty | TakeOver::OwnerDeclaredDead
    ) && !held_here
        && !session_id.is_empty()
        && epoch != 0
    {
        let recovery_started = tokio::time::Instant::now();
        let recovered = recover(node, gone, openid, session_id, epoch).await;
        node.metrics
            .start_phase
            .with_label_values(&["recovery"])
            .observe(recovery_started.elapsed().as_secs_f64());
        tracing::debug!(
            openid,
            previous_owner,
            handover_ms,
            recovery_ms = (started.elapsed().as_millis() as u64).saturating_sub(handover_ms),
            found = recovered.is_some(),
            "takeover from a gone owner"
        );
        if let Some(recovery) = recovered {
            node.registry.stash_recovery(openid, recovery, epoch);
        }
    } else {
        tracing::debug!(openid, previous_owner, handover_ms, ?outcome, "takeover");
    }
    outcome
}

/// How long a Start waits for every live node to answer for its replicas
/// before settling for the copies it has. After a node dies, hundreds of its
/// clients reconnect at once, and a standby busy with them may answer late:
/// "no answer" must not be taken for "no copy", or confirmed durable pushes
/// would be dropped.
pub const RECOVERY_PATIENCE: Duration = Duration::from_secs(10);

/// Gathers the replicas of a crashed owner's session, asking again (with
/// backoff) the live nodes that have not answered. What a node answered is
/// kept across rounds: it may crash before the next one (as the
/// simulation's `recover` always did). It ends only after a round that began
/// with the view caught up with the claim at `epoch`
/// ([`Cluster::view_reached`]) and left no live node unanswered. When every
/// node answered but the view had not caught up, it waits for the watch
/// (woken by it, [`Cluster::view_reaches`]: not a sleep, which cost every
/// Start of a reconnect burst 100 ms), then asks the nodes that view added;
/// a view that never catches up makes the recovery incomplete.
///
/// [`Cluster::view_reached`]: crate::cluster::Cluster::view_reached
/// [`Cluster::view_reaches`]: crate::cluster::Cluster::view_reaches
async fn recover(
    node: &Node,
    gone: &str,
    openid: &str,
    session_id: &str,
    epoch: u64,
) -> Option<crate::replica::Recovery> {
    let give_up = tokio::time::Instant::now() + RECOVERY_PATIENCE;
    let mut pause = Duration::from_millis(100);
    let mut answered = std::collections::HashSet::new();
    let mut found = Vec::new();
    let mut waiting: Vec<String> = Vec::new();
    let mut incomplete = false;
    loop {
        // A node waited on that is gone from the view since may have been
        // leaving: it handed its replicas to other nodes, which may have
        // answered "nothing" before the copy reached them (simulation seed
        // 354 of session 8). Every live node is asked again.
        let departed = node.registry.members(|m| {
            let live: std::collections::HashSet<&str> = m
                .recovery_sources(gone)
                .into_iter()
                .map(|n| n.node_id.as_str())
                .collect();
            waiting.iter().any(|w| !live.contains(w.as_str()))
        });
        if departed {
            answered.clear();
        }
        // Read before the round: every node of a view that has caught up is
        // asked in it.
        let caught_up = node.cluster.as_ref().is_none_or(|c| c.view_reached(epoch));
        let round = crate::replica::fetch_recovery(node, gone, openid, session_id, &answered).await;
        for (id, answer) in round.answers {
            answered.insert(id);
            found.push(answer);
        }
        if round.unanswered.is_empty() && caught_up {
            break;
        }
        waiting = round.unanswered.clone();
        if round.unanswered.is_empty()
            && let Some(cluster) = &node.cluster
        {
            // Every node this view knows answered: what is missing is the
            // view itself. The next round asks the nodes it adds meanwhile.
            let wait_started = tokio::time::Instant::now();
            let reached = cluster.view_reaches(epoch, give_up).await;
            node.metrics
                .start_phase
                .with_label_values(&["view_wait"])
                .observe(wait_started.elapsed().as_secs_f64());
            node.metrics
                .sessions_recovered
                .with_label_values(&["view_waited"])
                .inc();
            if reached {
                continue;
            }
        } else if tokio::time::Instant::now() + pause <= give_up {
            node.metrics
                .sessions_recovered
                .with_label_values(&["retried"])
                .inc();
            tracing::debug!(openid, unanswered = ?round.unanswered, "replica fetch unanswered; asking again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            continue;
        }
        node.metrics
            .sessions_recovered
            .with_label_values(&["incomplete"])
            .inc();
        tracing::warn!(
            openid,
            session_id,
            unanswered = ?round.unanswered,
            caught_up = node.cluster.as_ref().is_none_or(|c| c.view_reached(epoch)),
            "nodes did not answer for their replicas in time, or the view did not catch up with the claim; recovering from the copies found"
        );
        incomplete = true;
        break;
    }
    let mut recovery = crate::replica::merge(node, openid, session_id, found)?;
    recovery.incomplete = incomplete;
    Some(recovery)
}

async fn hand_over_from(
    node: &Node,
    previous_owner: &str,
    openid: &str,
    session_id: &str,
    epoch: u64,
) -> TakeOver {
    if node.cluster.is_none() || epoch == 0 {
        return TakeOver::NotHandedOver;
    }
    // A live owner that does not answer may be busy, partitioned, or dead
    // with its lease not yet expired: only the control plane's lease tells
    // them apart. Ask again until it answers or the view says it is gone.
    let give_up = tokio::time::Instant::now() + RECOVERY_PATIENCE;
    let mut pause = Duration::from_millis(100);
    let mut first = true;
    while first || tokio::time::Instant::now() + pause <= give_up {
        if !first {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        first = false;
        let addr = node
            .registry
            .members(|m| m.live(previous_owner).map(|n| n.grpc_addr.clone()));
        let Some(addr) = addr else {
            tracing::info!(
                openid,
                previous_owner,
                "previous owner is not live; its session state survives in replicas (and maybe in it)"
            );
            return TakeOver::OwnerDeclaredDead;
        };
        let (reach, outcome) =
            ask_handover(node, &addr, previous_owner, openid, session_id, epoch).await;
        match node
            .registry
            .members(|m| m.after_failed_handover(previous_owner, reach))
        {
            AfterHandover::UseAnswer => return outcome,
            AfterHandover::OwnerGone => return TakeOver::OwnerGone,
            AfterHandover::OwnerDeclaredDead => return TakeOver::OwnerDeclaredDead,
            AfterHandover::OwnerSilent => {}
        }
    }
    tracing::info!(
        openid,
        previous_owner,
        "live previous owner did not answer the handover"
    );
    TakeOver::OwnerSilent
}

/// Whether `status` says the connection was refused (nothing listens at the
/// address), as opposed to a node that answered UNAVAILABLE itself or a
/// connection that broke: only a refusal is remembered for other calls.
pub(crate) fn refused(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = e.source();
    }
    // A source chain that does not reach the io::Error (a transport that
    // wraps it opaquely) still names it in its debug form.
    format!("{status:?}").contains("ConnectionRefused")
}

/// What a failed call to a peer says about whether the peer received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The peer answered with this status itself.
    Answered,
    /// The call never reached the peer's handler: the connection was refused
    /// or could not be made, or HTTP/2 told us the stream was not processed
    /// (REFUSED_STREAM, or a graceful GOAWAY the stream came after, RFC 9113
    /// §6.8). Safe to send again.
    Unsent,
    /// The call may have run: the connection broke or no answer came in time.
    Unknown,
}

/// Whether the peer got the call that failed with `status`. A status the peer
/// sent carries no source; the transport's own failures do.
pub(crate) fn delivery(status: &Status) -> Delivery {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    if source.is_none() {
        return match status.code() {
            // The server's deadline (ours, sent as grpc-timeout) ran out mid-call.
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => Delivery::Unknown,
            _ => Delivery::Answered,
        };
    }
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return Delivery::Unsent;
        }
        if let Some(err) = e.downcast_ref::<h2::Error>() {
            let not_processed = err.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (err.is_go_away()
                    && err.is_remote()
                    && err.reason() == Some(h2::Reason::NO_ERROR));
            return if not_processed {
                Delivery::Unsent
            } else {
                Delivery::Unknown
            };
        }
        source = e.source();
    }
    if refused(status) {
        Delivery::Unsent
    } else {
        Delivery::Unknown
    }
}

/// One `Peer.Handover` call: whether the owner answered, and what came of it.
async fn ask_handover(
    node: &Node,
    addr: &str,
    previous_owner: &str,
    openid: &str,
    session_id: &str,
    epoch: u64,
) -> (Reach, TakeOver) {
    if node.registry.is_down(previous_owner) {
        node.metrics
            .handovers
            .with_label_values(&["unreachable"])
            .inc();
        return (Reach::Down, TakeOver::NotHandedOver);
    }
    let Ok(mut client) = node.peers.peer(addr) else {
        return (Reach::NoAnswer, TakeOver::NotHandedOver);
    };
    let request = HandoverRequest {
        openid: openid.to_string(),
        session_id: session_id.to_string(),
        epoch,
        new_owner: node.config.node_id.clone(),
    };
    // A call queued behind others in the channel gives up as soon as one of
    // them found nothing listening (the owner's process is gone).
    let called = tokio::select! {
        r = call_handover(&mut client, request) => r,
        () = node.registry.until_down(previous_owner) => {
            node.metrics
                .handovers
                .with_label_values(&["unreachable"])
                .inc();
            return (Reach::Down, TakeOver::NotHandedOver);
        }
    };
    let answer = match called {
        Ok(r) => r,
        Err(CallFailure::Status(status)) => {
            let reach = match status.code() {
                // Connection refused (nothing listens) or a node that stopped
                // serving: its process is gone.
                tonic::Code::Unavailable => {
                    if refused(&status) {
                        node.registry.mark_unreachable(
                            previous_owner,
                            Reach::Down,
                            std::time::Instant::now() + DOWN_MEMORY,
                        );
                    }
                    Reach::Down
                }
                tonic::Code::DeadlineExceeded | tonic::Code::Unknown => Reach::NoAnswer,
                _ => {
                    tracing::info!(openid, previous_owner, error = %status, "handover refused");
                    node.metrics.handovers.with_label_values(&["refused"]).inc();
                    return (Reach::Answered, TakeOver::NotHandedOver);
                }
            };
            tracing::info!(openid, previous_owner, error = %status, "handover unanswered");
            node.metrics
                .handovers
                .with_label_values(&["unreachable"])
                .inc();
            return (reach, TakeOver::NotHandedOver);
        }
        Err(CallFailure::Timeout) => {
            tracing::info!(openid, previous_owner, "handover timed out");
            node.metrics.handovers.with_label_values(&["timeout"]).inc();
            return (Reach::NoAnswer, TakeOver::NotHandedOver);
        }
        Err(CallFailure::Broken(error)) => {
            // The owner keeps the state it could not send whole: ask again.
            tracing::info!(
                openid,
                previous_owner,
                error,
                "handover stream broke mid-way"
            );
            node.metrics.handovers.with_label_values(&["broken"]).inc();
            return (Reach::NoAnswer, TakeOver::NotHandedOver);
        }
    };
    node.registry.peer_answered(previous_owner);
    let Some(state) = answer.state.filter(|_| answer.found) else {
        node.metrics
            .handovers
            .with_label_values(&["not_found"])
            .inc();
        // The node the control plane names owner has no copy (it restarted
        // empty, or its copy expired): what survives of the session is in
        // replicas and unserved copies, gathered as for a crashed owner. A
        // staged copy here is not resumed as it is (simulation seed 107: a
        // stale staged copy lost the pushes the restarted owner had).
        return (Reach::Answered, TakeOver::OwnerEmpty);
    };
    let view_owner = node.cluster.as_ref().and_then(|c| c.known_owner(openid));
    match node.registry.install_as(
        state,
        epoch,
        crate::core::Holding::Owned,
        view_owner.as_ref().map(|(n, e)| (n.as_str(), *e)),
    ) {
        Ok(entry) => {
            node.metrics.handovers.with_label_values(&["taken"]).inc();
            if entry.state.lock().stats().unacked > 0 {
                node.registry.copy_soon(openid);
            }
            (Reach::Answered, TakeOver::Installed)
        }
        Err(e) => {
            tracing::warn!(openid, error = %e, "handed-over state rejected");
            node.metrics.handovers.with_label_values(&["invalid"]).inc();
            (Reach::Answered, TakeOver::NotHandedOver)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refused_connection_counts_as_down() {
        // As tonic's transport reports it: UNAVAILABLE with the io::Error
        // at the end of the source chain.
        let with_source = |kind: std::io::ErrorKind| {
            let mut status = Status::unavailable("tcp connect error");
            status.set_source(Arc::new(std::io::Error::from(kind)));
            status
        };
        assert!(super::refused(&with_source(
            std::io::ErrorKind::ConnectionRefused
        )));
        assert!(!super::refused(&Status::unavailable("node crashed")));
        assert!(!super::refused(&with_source(
            std::io::ErrorKind::ConnectionReset
        )));
    }

    /// A push through a real tonic client to `addr`, as `Gateway::forward` sends it.
    async fn push_to(addr: std::net::SocketAddr) -> Status {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let mut client = GatewayServiceClient::new(channel);
        let mut request = Request::new(gatesvr_proto::upstream::PushToClientRequest::default());
        request.set_timeout(Duration::from_secs(5));
        client.push_to_client(request).await.unwrap_err()
    }

    #[tokio::test]
    async fn a_call_tells_whether_the_peer_can_have_run_it() {
        // Nothing listens: never sent.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        assert_eq!(delivery(&push_to(addr).await), Delivery::Unsent);

        // The peer's HTTP/2 stack refuses the stream (RFC 9113: not processed): never run.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(socket).await.unwrap();
            if let Some(Ok((_, mut respond))) = conn.accept().await {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
            }
            while conn.accept().await.is_some() {}
        });
        assert_eq!(delivery(&push_to(addr).await), Delivery::Unsent);

        // The peer read the call, then its connection broke: it may have run.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(socket).await.unwrap();
            let _request = conn.accept().await;
            // Dropped with the stream open and unanswered.
        });
        assert_eq!(delivery(&push_to(addr).await), Delivery::Unknown);

        // A status the peer answered itself (no transport source).
        assert_eq!(
            delivery(&Status::not_found("no session for u")),
            Delivery::Answered
        );
        assert_eq!(
            delivery(&Status::deadline_exceeded("Timeout expired")),
            Delivery::Unknown
        );
    }
}
