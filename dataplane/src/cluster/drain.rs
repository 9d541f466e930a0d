//! Graceful drain (rolling upgrade, `gatectl nodes drain`, SIGTERM,
//! `POST /drain`).
//!
//! 1. Stop taking sessions: new handshakes are refused before TLS work, a
//!    Start on an open connection gets DRAINING, and heartbeats tell the
//!    control plane. Readiness stays true on purpose: on Kubernetes a
//!    terminating pod already gets no new flows, and failing readiness would
//!    delete the UDP conntrack entries of the clients still being moved
//!    (shared PITFALLS §6).
//! 2. For each session, paced at `server.drain_rate` per second: wait for its
//!    in-flight requests (so none is left with an unknown outcome), stage its
//!    state on a successor (`Peer.Stage`), then move its ownership there in
//!    the control plane (`TransferSession` at the current epoch: from then on
//!    every node forwards its pushes there, where the state already is), then
//!    send the client a GoAway naming the successor, with a reconnect delay
//!    spread over the drain so the successors are not hit by a thundering
//!    herd. Pushes arriving here meanwhile wait for the staging and follow it.
//! 3. Without a successor (standalone node, or no other active node) the
//!    client still gets a GoAway without a target and resumes wherever the
//!    load balancer sends it; the session stays here to be handed over.
//! 4. Done when no session is left or at `server.drain_timeout`. Then the node
//!    leaves the control plane (`LeaveNode`): `gatectl nodes list` shows it as
//!    `left` at once rather than `dead` a lease later, and sessions still
//!    recorded as its own are counted and taken over from a gone owner by
//!    whichever node their clients reach. The process exits right after.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gatesvr_proto::client::{Envelope, GoAway, envelope::Body};
use gatesvr_proto::peer::StageRequest;

use crate::core::Member;
use crate::node::Node;
use crate::registry::SessionEntry;

/// What a drain did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DrainReport {
    pub sessions_at_start: usize,
    /// Staged on a successor and told to reconnect there.
    pub staged: usize,
    /// Told to reconnect anywhere (no successor, or staging failed).
    pub told_to_reconnect: usize,
    /// Still here at the end.
    pub remaining: usize,
    pub timed_out: bool,
    /// The control plane recorded the leave (false: standalone, or unreachable, in which
    /// case the node shows as dead once its lease expires).
    pub left: bool,
    /// Sessions the control plane still recorded as this node's when it left.
    pub orphaned: u64,
}

fn goaway(target: &str, delay: Duration, session_id: &str) -> Envelope {
    Envelope {
        body: Some(Body::GoAway(GoAway {
            reason: "node draining".into(),
            reconnect_delay_ms: delay.as_millis().min(u128::from(u32::MAX)) as u32,
            target_addr: target.to_string(),
            resume_token: session_id.to_string(),
        })),
    }
}

/// Drains `node`; returns once it is empty or the deadline passed.
pub async fn drain(node: Arc<Node>) -> DrainReport {
    node.draining.store(true, Ordering::Relaxed);
    if let Some(cluster) = &node.cluster {
        cluster.set_draining();
    }
    let server = &node.config.server;
    let deadline = Instant::now() + server.drain_timeout;
    let sessions = node.registry.all();
    let mut report = DrainReport {
        sessions_at_start: sessions.len(),
        ..Default::default()
    };
    tracing::info!(sessions = sessions.len(), "draining");
    // Spread reconnects over (at most) half the drain window.
    let spread = Duration::from_secs_f64(sessions.len() as f64 / server.drain_rate.max(1) as f64)
        .min(server.drain_timeout / 2);
    let pace = Duration::from_secs_f64(1.0 / server.drain_rate.max(1) as f64);

    let mut pending: std::collections::VecDeque<Arc<SessionEntry>> = sessions.into();
    let mut untransferred = Vec::new();
    let mut turn = 0usize;
    while let Some(entry) = pending.pop_front() {
        if Instant::now() >= deadline {
            report.timed_out = true;
            break;
        }
        if entry.state.lock().stats().requests_in_flight > 0 && Instant::now() + pace < deadline {
            // Let its requests finish first; come back to it.
            pending.push_back(entry);
            tokio::time::sleep(pace).await;
            continue;
        }
        let delay = spread.mul_f64(rand::random::<f64>());
        if move_session(&node, &entry, turn, delay, &mut untransferred).await {
            report.staged += 1;
        } else {
            report.told_to_reconnect += 1;
        }
        turn += 1;
        tokio::time::sleep(pace).await;
    }
    // Wait for the clients to go.
    while !node.registry.is_empty() && Instant::now() < deadline {
        let connected = node.registry.connected();
        if connected == 0 && node.cluster.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    report.remaining = node.registry.len();
    report.timed_out |= Instant::now() >= deadline;
    if let Some(cluster) = &node.cluster {
        commit_transfers(&node, cluster, untransferred, deadline).await;
        // The replicas held here for other owners outlive this node, and so
        // do the copies fenced here that their new owner never fetched.
        node.registry.with_table(|t| {
            for (state, owner) in t.fenced_states() {
                let since = t.members().registered_at(owner);
                node.replicas.keep_handed_over(state, owner, since);
            }
        });
        crate::replica::hand_over_replicas(&node).await;
        match cluster.leave().await {
            Ok(orphaned) => {
                report.left = true;
                report.orphaned = orphaned;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not leave the control plane; this node will show as dead once its lease expires")
            }
        }
    }
    tracing::info!(?report, "drain finished");
    report
}

/// Stages one session on a successor and sends its client there. Returns
/// false if it could only tell the client to reconnect anywhere.
async fn move_session(
    node: &Node,
    entry: &Arc<SessionEntry>,
    turn: usize,
    delay: Duration,
    untransferred: &mut Vec<Untransferred>,
) -> bool {
    let session_id = entry.identity.session_id.clone();
    if let Some(cluster) = &node.cluster {
        let successors: Vec<Member> = node
            .registry
            .members(|m| m.successors().into_iter().cloned().collect());
        if !successors.is_empty() {
            let successor = &successors[turn % successors.len()];
            let epoch = entry.state.lock().epoch();
            if let Some(staged) =
                move_to(node, entry, cluster, successor, epoch, delay, untransferred).await
            {
                return staged;
            }
        }
    }
    entry.send_control(goaway("", delay, &session_id)).await;
    false
}

/// Stages one session on `successor`, moves its ownership there, then sends
/// the GoAway. `Some(staged)` once the session left this node; `None` if it
/// stays here.
///
/// Staging comes before the ownership transfer: once the control plane names
/// the successor, every node forwards pushes there, so the state must already
/// be there.
async fn move_to(
    node: &Node,
    entry: &Arc<SessionEntry>,
    cluster: &crate::cluster::Cluster,
    successor: &Member,
    epoch: u64,
    delay: Duration,
    untransferred: &mut Vec<Untransferred>,
) -> Option<bool> {
    let openid = &entry.identity.openid;
    // The table exports it and holds its pushes (and refuses its requests:
    // they would run on a copy that is leaving) until the staging settles.
    let state = node.registry.stage_out(openid, &successor.node_id)?;
    // Its pushes stay here as a replica until this node leaves (then they
    // go to the successor's standby): the successor may be this node's
    // standby too, holding the only other copy (simulation seed 69).
    node.replicas
        .keep_handed_over(&state, &successor.node_id, successor.registered_at_ms);
    if !stage(node, &successor.grpc_addr, state, epoch).await {
        // Keep serving it here; the client still gets a GoAway (no target).
        tracing::warn!(openid = %openid, successor = %successor.node_id, "staging failed; keeping the session");
        node.registry.take_back(entry, Some(cluster));
        return None;
    }
    // A copy staged here whose own transfer never committed is not this
    // node's to give (Table::may_transfer): it stays staged on the successor.
    let may_transfer = node.registry.with_table(|t| t.may_transfer(openid));
    let transferred = if may_transfer {
        Some(cluster.transfer(openid, epoch, &successor.node_id).await)
    } else {
        None
    };
    let new_epoch = match transferred.unwrap_or(Ok(epoch)) {
        Ok(new_epoch) => {
            tracing::debug!(openid = %openid, epoch = new_epoch, "ownership transferred");
            new_epoch
        }
        // The successor holds the state either way; the client's claim there
        // settles ownership when it resumes.
        Err(e) => {
            tracing::info!(openid = %openid, error = %e, "transfer not committed yet; retried before leaving");
            untransferred.push(Untransferred {
                openid: openid.clone(),
                epoch,
                to: successor.node_id.clone(),
            });
            epoch
        }
    };
    node.registry.staged(openid, new_epoch);
    // Behind a load balancer clients may not reach node addresses: then the
    // GoAway names no target and the session follows the client by handover.
    let target = if node.config.server.drain_redirect {
        successor.quic_addr.as_str()
    } else {
        ""
    };
    entry
        .send_control(goaway(target, delay, &entry.identity.session_id))
        .await;
    close_later(entry.clone(), delay);
    Some(true)
}

/// A session staged on `to` whose ownership transfer did not commit (the
/// control plane was unreachable).
struct Untransferred {
    openid: String,
    epoch: u64,
    to: String,
}

/// Retries the transfers that did not commit before the node leaves: a
/// staged copy the control plane does not point at is found by nobody (a
/// client resuming elsewhere would recover from replicas and lose what was
/// queued on it since). Found by the simulation (`tests/sim`, seed 2).
/// Only while the table still says the session went there at that epoch
/// (`Table::transfer_pending`): a session staged back here since would
/// otherwise be handed to an older copy (simulation seed 8).
async fn commit_transfers(
    node: &Node,
    cluster: &crate::cluster::Cluster,
    mut left: Vec<Untransferred>,
    deadline: Instant,
) {
    while !left.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for t in left {
            if !node
                .registry
                .with_table(|table| table.transfer_pending(&t.openid, &t.to, t.epoch))
            {
                continue;
            }
            match cluster.transfer(&t.openid, t.epoch, &t.to).await {
                Ok(_) => {}
                // Fenced: claimed since by whoever its client reached; done.
                Err(
                    crate::cluster::ClaimError::Refused(_)
                    | crate::cluster::ClaimError::NotActive(_),
                ) => {}
                Err(crate::cluster::ClaimError::Unreachable(_)) => still.push(t),
            }
        }
        left = still;
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if !left.is_empty() {
        tracing::warn!(
            sessions = left.len(),
            "ownership transfers still not committed at the drain deadline"
        );
    }
}

/// Closes the connection if the client has not left on its own after the
/// GoAway (it should close right away and reconnect after `delay`).
fn close_later(entry: Arc<SessionEntry>, delay: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(delay + Duration::from_secs(5)).await;
        entry.close_connection(
            gatesvr_proto::client::ErrorCode::Draining,
            "node draining: reconnect to the GoAway target",
        );
    });
}

async fn stage(
    node: &Node,
    addr: &str,
    state: gatesvr_proto::session::SessionState,
    epoch: u64,
) -> bool {
    let Ok(mut client) = node.peers.peer(addr) else {
        return false;
    };
    let whole = StageRequest {
        state: Some(state),
        epoch,
        from_node: node.config.node_id.clone(),
    };
    // In bounded chunks (a session's queue may hold 1,024 pushes of 4 KB):
    // never one message over the successor's limit. The stream's deadline
    // covers sending every chunk.
    let chunks = crate::peer::split_stage(whole.clone(), gatesvr_proto::limits::CHUNK_BYTES);
    let deadline = crate::peer::PEER_TIMEOUT * (1 + chunks.len() as u32 / 8);
    let mut request = tonic::Request::new(futures::stream::iter(chunks));
    request.set_timeout(deadline);
    match tokio::time::timeout(deadline, client.stage_stream(request)).await {
        Ok(Ok(_)) => true,
        // A successor of an older version: one message.
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            let mut request = tonic::Request::new(whole);
            request.set_timeout(crate::peer::PEER_TIMEOUT);
            matches!(
                tokio::time::timeout(crate::peer::PEER_TIMEOUT, client.stage(request)).await,
                Ok(Ok(_))
            )
        }
        _ => false,
    }
}

/// Before a node with `upstream.protocol: stream` stops: its upstream streams
/// take no new request (each link sends `drain`; a new request is refused
/// unexecuted, UPSTREAM_UNAVAILABLE), the requests already on them are
/// answered, or at `min(upstream_timeout, server.drain_timeout)` fail
/// explicitly (outcome unknown), and those answers are written to the clients
/// before the connections close. Never a silent drop: without this the
/// endpoint closed under them (docs/protocol.md §14).
pub(crate) async fn drain_upstream_streams(node: &Node) {
    use crate::upstream::UpstreamProtocol;
    let crate::handler::Handler::Upstream(router) = &node.handler else {
        return;
    };
    if router.config().protocol != UpstreamProtocol::Stream {
        return;
    }
    router.drain_streams().await;
    let in_flight = || {
        router.stream_requests_outstanding() > 0
            || node
                .registry
                .all()
                .iter()
                .any(|e| e.state.lock().stats().requests_in_flight > 0)
    };
    if !in_flight() {
        return;
    }
    let grace = router
        .config()
        .upstream_timeout
        .min(node.config.server.drain_timeout);
    let deadline = Instant::now() + grace;
    while in_flight() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if router.stream_requests_outstanding() > 0 {
        tracing::warn!(
            requests = router.stream_requests_outstanding(),
            "upstream stream requests unanswered at shutdown; failing them (outcome unknown)"
        );
        router.abandon_streams().await;
    }
    // The connection tasks write those answers; give them a moment before
    // the endpoint closes (closing discards unsent stream data).
    let flush = Instant::now() + STREAM_DRAIN_FLUSH;
    while in_flight() && Instant::now() < flush {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Longest [`drain_upstream_streams`] waits for failed requests' answers to
/// be written after failing them.
const STREAM_DRAIN_FLUSH: Duration = Duration::from_secs(1);
