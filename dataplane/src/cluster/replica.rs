//! Durable pushes and crash failover.
//!
//! A durable push (`PushToClientRequest.durable`) is copied to the session
//! owner's **standby** node before PushToClient answers OK. The standby is the
//! next active node after the owner on the ring of sorted node ids in the
//! watched view (deterministic, no extra control-plane state). It keeps a
//! bounded per-session [`ReplicaStore`] entry: the durable pushes above the
//! owner's ack point. The owner piggybacks its ack point on every copy and
//! sends it on a timer ([`ACK_SYNC_INTERVAL`]), so replicas are trimmed; a
//! replica not updated for `session_timeout` expires.
//!
//! ```text
//!  upstream     owner (dp-1)                      standby (dp-2)
//!  PushToClient(durable) ─> standby? none ─> FAILED_PRECONDITION (not queued)
//!                          queue (seq n) ─ Peer.Replicate{push n, acked} ─> keep n (> acked)
//!  <── OK(seq n) ───────── <──────────────────────── retained ───────────────
//!                          every 1 s: Peer.Replicate{acked, next_seq} ───> trim
//!  dp-1 killed; lease expires; control plane marks it dead
//!  client ──Start(session s, last_acked a)──> dp-2: claim (previous owner dp-1 gone)
//!                          peer::take_over: Peer.FetchReplicas(s, ...) to every live
//!                          node (a burst's fetches batched per node: FetchBatcher)
//!                          (+ local copy), merged ─> Registry::stash_recovery
//!                          Registry::start: durable pushes > max(a, replica acks)
//!                          new session s' (seqs from 1, redelivery) ─> StartResponse RECOVERED
//!                          then s''s queue is replicated to dp-2's own standby
//! ```
//!
//! Recovery rebuilds a **new** session: the non-durable pushes that shared the
//! old numbering are gone, so keeping the old seqs would leave silent holes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gatesvr_proto::client::{ResumeStatus, ServerPush};
use gatesvr_proto::limits::chunk_by_size;
use gatesvr_proto::peer::peer_client::PeerClient;
use gatesvr_proto::peer::{
    FetchReplicaRequest, FetchReplicaResponse, FetchReplicasChunk, FetchReplicasRequest,
    ReplicateRequest, ReplicateResponse,
};
use gatesvr_proto::session::SessionState;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::core::Member;
use crate::errors::PeerRefusal;
use crate::node::Node;
use crate::peer::{PEER_TIMEOUT, collect_stream};
use crate::registry::SessionEntry;

/// How often an owner sends its sessions' ack points to their standbys (and
/// checks that each standby still answers).
pub const ACK_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// How long a recovery waits for a node the control plane declared dead
/// ([`crate::core::Members::recovery_maybe`]); a crashed process refuses at once.
pub const DEAD_NODE_ASK: Duration = Duration::from_millis(500);

/// A standby that has not heard from the owner of a replica it holds (pushes
/// included) for this long probes it (`grpc.health.v1` on the owner's gRPC
/// address); an owner the probe finds unreachable gets its replicas copied to
/// its next heir ([`ReplicaStore::orphans`]) without waiting for the control
/// plane to declare it dead (simulation seed 5262 of session 10: the owner was
/// killed during a control-plane outage, which delayed its death in the view,
/// and its standby, with the only copy, was killed 4.8 s later). Owners probe
/// each standby once per [`ACK_SYNC_INTERVAL`], so a live owner is heard
/// well within it.
pub const OWNER_SILENCE: Duration = Duration::from_secs(2);

/// How long a standby that a call found unreachable is passed over
/// ([`crate::core::Members::mark_unreachable`]); then it is tried again.
pub const UNREACHABLE_HOLD: Duration = Duration::from_secs(10);

/// One session's copy on a standby.
struct Replica {
    session_id: String,
    /// The node that sent it last (the session's owner).
    owner: String,
    /// The owner's registration as this node's view had it when the owner's
    /// copy came (0: unknown); a newer one in the view means the owner
    /// restarted and holds none of it ([`ReplicaStore::orphans`]).
    owner_since: i64,
    zone: String,
    epoch: u64,
    acked: u64,
    next_seq: u64,
    pushes: BTreeMap<u64, ServerPush>,
    updated: Instant,
    /// The node a second copy went to after the owner left the view
    /// ([`ReplicaStore::orphans`]); reset when the copy changes.
    copied_to: Option<String>,
    /// Kept from a session fenced here whose new owner never received its
    /// state ([`ReplicaStore::keep_fenced`]): it gets a second copy like an
    /// orphan's, until the owner itself sends a copy.
    fenced: bool,
}

impl Replica {
    fn new(req: &ReplicateRequest, owner_since: i64, now: Instant) -> Self {
        Self {
            session_id: req.session_id.clone(),
            owner: req.owner_node.clone(),
            owner_since,
            zone: req.zone.clone(),
            epoch: req.epoch,
            acked: 0,
            next_seq: 1,
            pushes: BTreeMap::new(),
            updated: now,
            copied_to: None,
            fenced: false,
        }
    }

    /// The whole copy, as a `Replicate` on behalf of its owner.
    fn copy(&self, openid: &str) -> ReplicateRequest {
        ReplicateRequest {
            openid: openid.to_string(),
            session_id: self.session_id.clone(),
            zone: self.zone.clone(),
            epoch: self.epoch,
            owner_node: self.owner.clone(),
            pushes: self.pushes.values().cloned().collect(),
            acked_seq_id: self.acked,
            next_seq_id: self.next_seq,
            release: false,
            incremental: false,
            relayed: true,
            owner_since: self.owner_since,
        }
    }
}

/// Every replica of `map` as a whole copy, by openid.
fn copies_of(map: &HashMap<String, Replica>) -> Vec<ReplicateRequest> {
    let mut out: Vec<ReplicateRequest> = map.iter().map(|(openid, r)| r.copy(openid)).collect();
    out.sort_by(|a, b| a.openid.cmp(&b.openid));
    out
}

/// When a standby last heard from an owner, and last probed it.
#[derive(Debug, Clone, Copy)]
struct Contact {
    heard: Instant,
    probed: Option<Instant>,
}

/// Copies of other nodes' durable pushes held by this node (as a standby).
pub struct ReplicaStore {
    map: Mutex<HashMap<String, Replica>>,
    /// Owners by node id: when a `Replicate` they sent themselves last came
    /// (any session, a probe included; never a relayed copy).
    contacts: Mutex<HashMap<String, Contact>>,
    /// Set (under `map`'s lock) when this node planned the handoff of what it
    /// holds before leaving ([`ReplicaStore::seal`]): it takes no more copies.
    sealed: std::sync::atomic::AtomicBool,
    ttl: Duration,
    max_pushes: usize,
    /// This node's fetches of other nodes' copies (a recovery), batched per node.
    pub fetches: FetchBatcher,
}

impl ReplicaStore {
    /// `ttl`: the session timeout; `max_pushes`: the session queue bound.
    pub fn new(ttl: Duration, max_pushes: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            contacts: Mutex::new(HashMap::new()),
            sealed: std::sync::atomic::AtomicBool::new(false),
            ttl,
            max_pushes,
            fetches: FetchBatcher::default(),
        }
    }

    /// Applies an owner's copy or ack-point update; `owner_since` is the
    /// owner's registration in this node's view ([`Member::registered_at_ms`],
    /// 0 if unknown). Returns the pushes held.
    pub fn apply(&self, req: ReplicateRequest, owner_since: i64) -> Result<u64, PeerRefusal> {
        // A relayed copy keeps the registration its first holder took it
        // under (simulation seed 6579 of session 11: a copy made because the
        // owner had restarted was taken under the restarted owner's new
        // registration, so its holder never copied it on, and was the last).
        let owner_since = if req.relayed && req.owner_since != 0 {
            req.owner_since
        } else {
            owner_since
        };
        let mut map = self.map.lock();
        if req.release {
            if map
                .get(&req.openid)
                .is_some_and(|r| r.session_id == req.session_id)
            {
                map.remove(&req.openid);
            }
            return Ok(0);
        }
        if self.sealed.load(Ordering::Relaxed) {
            return Err(PeerRefusal::Leaving);
        }
        // An update to a copy this node does not hold (it restarted with the
        // same node id since the owner's last copy): taking it would leave
        // the earlier pushes on the owner alone while it believes them here.
        if req.incremental
            && map
                .get(&req.openid)
                .is_none_or(|r| r.session_id != req.session_id)
        {
            return Err(PeerRefusal::NoCopy);
        }
        let now = Instant::now();
        let replica = map
            .entry(req.openid.clone())
            .or_insert_with(|| Replica::new(&req, owner_since, now));
        if replica.session_id != req.session_id {
            if req.epoch < replica.epoch {
                return Err(PeerRefusal::NewerReplica {
                    session_id: replica.session_id.clone(),
                    held: replica.epoch,
                    offered: req.epoch,
                });
            }
            // A newer session of the openid: the old copy is obsolete.
            *replica = Replica::new(&req, owner_since, now);
        }
        if req.epoch >= replica.epoch && !req.owner_node.is_empty() {
            // The registration the copy was first taken under: a later
            // one in the view is a restart (a copy of this session from a
            // restarted owner only costs a second copy).
            if replica.owner != req.owner_node || replica.owner_since == 0 {
                replica.owner_since = owner_since;
            }
            replica.owner = req.owner_node.clone();
        }
        if !req.relayed {
            replica.fenced = false;
        }
        replica.epoch = replica.epoch.max(req.epoch);
        replica.acked = replica.acked.max(req.acked_seq_id);
        replica.next_seq = replica.next_seq.max(req.next_seq_id);
        replica.updated = now;
        let acked = replica.acked;
        replica.pushes.retain(|seq, _| *seq > acked);
        for push in req.pushes {
            if push.seq_id > acked {
                replica.next_seq = replica.next_seq.max(push.seq_id + 1);
                // A push this copy did not hold: a second copy made before
                // lacks it (a copy of the same pushes changes nothing, or two
                // holders would copy to each other forever).
                if replica.pushes.insert(push.seq_id, push).is_none() {
                    replica.copied_to = None;
                }
            }
        }
        if replica.pushes.len() > self.max_pushes {
            // The owner's own queue bound makes this unreachable for an honest
            // owner; refuse rather than grow without bound.
            let excess: Vec<u64> = replica
                .pushes
                .keys()
                .rev()
                .take(replica.pushes.len() - self.max_pushes)
                .copied()
                .collect();
            for seq in excess {
                replica.pushes.remove(&seq);
            }
            return Err(PeerRefusal::ReplicaFull);
        }
        Ok(replica.pushes.len() as u64)
    }

    /// `owner` sent this node a `Replicate` itself (not relayed) at `now`,
    /// or answered its probe: it is alive.
    pub fn heard_from(&self, owner: &str, now: Instant) {
        if owner.is_empty() {
            return;
        }
        self.contacts.lock().insert(
            owner.to_string(),
            Contact {
                heard: now,
                probed: None,
            },
        );
    }

    /// Owners of replicas holding pushes that this node heard from once but
    /// not for [`OWNER_SILENCE`], and did not probe within it: the shell
    /// probes each, and marks the ones that do not answer unreachable
    /// ([`crate::core::Members::mark_unreachable`]), which makes their
    /// replicas orphans. Owners no replica names any more are forgotten.
    pub fn owners_to_probe(&self, now: Instant) -> Vec<String> {
        let map = self.map.lock();
        let mut named: HashSet<&str> = HashSet::new();
        let mut holding: HashSet<&str> = HashSet::new();
        for r in map.values() {
            named.insert(r.owner.as_str());
            if !r.pushes.is_empty() {
                holding.insert(r.owner.as_str());
            }
        }
        let mut contacts = self.contacts.lock();
        contacts.retain(|owner, _| named.contains(owner.as_str()));
        let mut due: Vec<String> = contacts
            .iter_mut()
            .filter(|(owner, _)| holding.contains(owner.as_str()))
            .filter_map(|(owner, c)| {
                let last = c.probed.unwrap_or(c.heard).max(c.heard);
                (now.saturating_duration_since(last) >= OWNER_SILENCE).then(|| {
                    c.probed = Some(now);
                    owner.clone()
                })
            })
            .collect();
        due.sort();
        due
    }

    /// This node's copy of `openid`'s session `session_id`, if any.
    pub fn fetch(&self, openid: &str, session_id: &str) -> FetchReplicaResponse {
        let map = self.map.lock();
        match map.get(openid).filter(|r| r.session_id == session_id) {
            Some(r) => FetchReplicaResponse {
                found: true,
                session_id: r.session_id.clone(),
                zone: r.zone.clone(),
                epoch: r.epoch,
                acked_seq_id: r.acked,
                next_seq_id: r.next_seq,
                pushes: r.pushes.values().cloned().collect(),
            },
            None => FetchReplicaResponse::default(),
        }
    }

    /// The node that exported `state` to `new_owner` (a Handover, or a
    /// drain's staging) keeps its unacknowledged pushes as a replica for the
    /// new owner (handed on to the new owner's standby if this node leaves):
    /// the new owner replicates the session only at its next durable push,
    /// and if it is also the old owner's standby (a client that reconnects
    /// to the standby, a drain that picks it) one crash of it lost the
    /// session's durable pushes (simulation seeds 118 and 69). Nothing is
    /// kept for a state without unacknowledged pushes; the copy expires with
    /// the session timeout.
    /// `owner_since`: the new owner's registration in this node's view
    /// ([`crate::core::Members::registered_at`]; simulation seed 5078 of
    /// session 10: the new owner restarted, and the old one, holding the
    /// last copy, restarted later).
    pub fn keep_handed_over(&self, state: &SessionState, new_owner: &str, owner_since: i64) {
        if state.pushes.is_empty() {
            return;
        }
        let _ = self.apply(
            ReplicateRequest {
                openid: state.openid.clone(),
                session_id: state.session_id.clone(),
                zone: state.zone.clone(),
                epoch: state.epoch,
                owner_node: new_owner.to_string(),
                pushes: state.pushes.clone(),
                acked_seq_id: state.acked_seq_id,
                next_seq_id: state.next_seq_id,
                release: false,
                incremental: false,
                relayed: true,
                owner_since: 0,
            },
            owner_since,
        );
    }

    /// A session fenced here (the view names a newer owner) that was never
    /// handed over: kept as [`ReplicaStore::keep_handed_over`] does, and, since
    /// its new owner may never have received it (its Handover did not get
    /// through), it gets a second copy on the new owner's standby like an
    /// orphan's (simulation seed 6372 of session 11: the owner's standby died,
    /// a partition kept the claimant's Handover from it, and then the owner,
    /// fenced and holding the only copy, was killed).
    pub fn keep_fenced(&self, state: &SessionState, new_owner: &str, owner_since: i64) {
        self.keep_handed_over(state, new_owner, owner_since);
        if state.pushes.is_empty() {
            return;
        }
        if let Some(r) = self
            .map
            .lock()
            .get_mut(&state.openid)
            .filter(|r| r.session_id == state.session_id && r.owner == new_owner)
            && !r.fenced
        {
            r.fenced = true;
            r.copied_to = None;
        }
    }

    /// What a leaving node hands over before it goes ([`Handoff`]): a copy
    /// of every replica it holds, by openid.
    pub fn copies(&self) -> Vec<ReplicateRequest> {
        copies_of(&self.map.lock())
    }

    /// Whether [`ReplicaStore::seal`] ran: this node takes no more copies.
    pub fn sealed(&self) -> bool {
        self.sealed.load(Ordering::Relaxed)
    }

    /// [`ReplicaStore::copies`] for the handoff of a node about to leave, and
    /// from then on no copy is taken ([`PeerRefusal::Leaving`], UNAVAILABLE:
    /// the owner copies to the next node of its ring). A copy taken after the
    /// plan would leave with this node (simulation seed 6576 of session 11:
    /// an owner whose view lagged made a leaving node its standby after that
    /// node planned its handoff; the owner restarted and the node left with
    /// the only copy).
    pub fn seal(&self) -> Vec<ReplicateRequest> {
        let map = self.map.lock();
        self.sealed.store(true, Ordering::Relaxed);
        copies_of(&map)
    }

    /// Replicas whose owner is no longer live in the view (it crashed or
    /// left) or registered again since its copy came (it restarted with the
    /// same node id, holding none of it: simulation seed 2569 of session 10,
    /// where the owner and then its standby restarted 3.4 s apart and the
    /// standby had held the last copy): until its client comes back, this
    /// node holds the only copy of what the owner acknowledged, and a second
    /// crash would lose it. The same holds for an owner still live in the
    /// view that a call found unreachable at `now` (its standby's probe,
    /// [`ReplicaStore::owners_to_probe`]). Each
    /// gets a second copy on the owner's next standby other than this node
    /// ([`Members::standby_of`]), once per heir ([`ReplicaStore::copied`]).
    /// Replicas that hold no push are not copied.
    pub fn orphans(
        &self,
        members: &crate::core::Members,
        now: Instant,
    ) -> Vec<(Member, ReplicateRequest)> {
        let map = self.map.lock();
        let mut out: Vec<(Member, ReplicateRequest)> = map
            .iter()
            .filter(|(_, r)| {
                let restarted = members.get(&r.owner).is_some_and(|m| {
                    r.owner_since != 0
                        && m.registered_at_ms != 0
                        && m.registered_at_ms != r.owner_since
                });
                // A probe (or another call) found the owner unreachable.
                let unreachable = members.is_unreachable(&r.owner, now);
                !r.pushes.is_empty()
                    && (!members.is_live(&r.owner) || restarted || unreachable || r.fenced)
            })
            .filter_map(|(openid, r)| {
                // With no other node to take it, an owner that restarted can
                // hold its old session's copy like any node (simulation seed
                // 6646 of session 11: the only other active node was cut off
                // from this one).
                let heir = members.standby_of(&r.owner, now).or_else(|| {
                    members.live(&r.owner).filter(|m| {
                        m.registered_at_ms != 0
                            && r.owner_since != 0
                            && m.registered_at_ms != r.owner_since
                            && m.node_id != members.me()
                            && !members.is_unreachable(&m.node_id, now)
                    })
                })?;
                let copied = r.copied_to.as_deref() == Some(heir.node_id.as_str());
                (!copied).then(|| (heir.clone(), r.copy(openid)))
            })
            .collect();
        out.sort_by(|a, b| a.1.openid.cmp(&b.1.openid));
        out
    }

    /// The second copy of `openid`'s replica (`session_id`) is on `heir`.
    pub fn copied(&self, openid: &str, session_id: &str, heir: &str) {
        if let Some(r) = self
            .map
            .lock()
            .get_mut(openid)
            .filter(|r| r.session_id == session_id)
        {
            r.copied_to = Some(heir.to_string());
        }
    }

    /// Drops replicas not updated for the session timeout. Returns
    /// (sessions, pushes) held afterwards.
    pub fn sweep(&self) -> (usize, usize) {
        let now = Instant::now();
        let mut map = self.map.lock();
        map.retain(|_, r| now.duration_since(r.updated) < self.ttl);
        (map.len(), map.values().map(|r| r.pushes.len()).sum())
    }
}

/// What an owner last told a standby about one session.
struct Tracked {
    session_id: String,
    zone: String,
    standby: String,
    acked: u64,
    next_seq: u64,
}

/// The owner side: which sessions have durable pushes on which standby.
#[derive(Default)]
pub struct Replicator {
    tracked: Mutex<HashMap<String, Tracked>>,
    /// Woken when a standby was found unreachable: the ack sync then copies
    /// its sessions to the next node at once.
    moved_on: tokio::sync::Notify,
}

impl Replicator {
    /// `entry`'s whole queue must go to this node's standby: tracked with no
    /// standby yet, so the ack sync copies it until one holds it.
    pub fn needs_copy(&self, entry: &SessionEntry) {
        let mut tracked = self.tracked.lock();
        let t = tracked
            .entry(entry.identity.openid.clone())
            .or_insert_with(|| Tracked {
                session_id: entry.identity.session_id.clone(),
                zone: entry.identity.zone.clone(),
                standby: String::new(),
                acked: 0,
                next_seq: 0,
            });
        if t.session_id != entry.identity.session_id {
            t.session_id = entry.identity.session_id.clone();
            t.zone = entry.identity.zone.clone();
            t.standby = String::new();
            t.acked = 0;
            t.next_seq = 0;
        }
    }
}

/// The standby of `node`: the next active node after it on the ring of
/// sorted node ids that no call found unreachable lately (None when it is
/// alone or not in a cluster); see [`crate::core::Members::standby_for`].
pub fn standby_for(node: &Node) -> Option<Member> {
    node.cluster.as_ref()?;
    node.registry
        .members(|m| m.standby_for(Instant::now()).cloned())
}

/// Whether a failed call says the standby may be gone: nothing listens at
/// its address, the call was dropped, or no answer came in time.
pub fn unreachable(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
    )
}

/// How a failed call to a peer ended: nothing listened, or no answer.
fn reach_of(status: &Status) -> crate::core::Reach {
    if crate::peer::refused(status) {
        crate::core::Reach::Down
    } else {
        crate::core::Reach::NoAnswer
    }
}

/// A call found `standby` unreachable: it is passed over as this node's
/// standby for [`UNREACHABLE_HOLD`], and the sessions whose copies it held are
/// copied to the next node now. Until the control plane declares it dead
/// (a lease later) this node would otherwise hold their only copy.
pub fn standby_unreachable(node: &Node, standby: &str, status: &Status) {
    tracing::warn!(standby, error = %status, "standby unreachable; its sessions go to the next node");
    node.registry
        .mark_unreachable(standby, reach_of(status), Instant::now() + UNREACHABLE_HOLD);
    node.replicator.moved_on.notify_one();
}

async fn send(node: &Node, addr: &str, req: ReplicateRequest) -> Result<ReplicateResponse, Status> {
    let mut client = node.peers.peer(addr)?;
    let mut request = Request::new(req);
    request.set_timeout(PEER_TIMEOUT);
    match tokio::time::timeout(PEER_TIMEOUT, client.replicate(request)).await {
        Err(_) => Err(Status::deadline_exceeded("standby did not answer in time")),
        Ok(r) => r.map(|r| r.into_inner()),
    }
}

/// Copies durable `pushes` of `entry`'s session to `standby` with the owner's
/// current ack point. OK only once the standby holds them. A standby new to
/// the session (the first durable push, a session handed over here, a ring
/// that moved on) gets the session's whole queue: the pushes acknowledged
/// before are held on it too, not only on a standby that may be leaving.
pub async fn replicate(
    node: &Node,
    entry: &Arc<SessionEntry>,
    standby: &Member,
    pushes: Vec<ServerPush>,
) -> Result<(), Status> {
    let known = node
        .replicator
        .tracked
        .lock()
        .get(&entry.identity.openid)
        .is_some_and(|t| t.session_id == entry.identity.session_id && t.standby == standby.node_id);
    let copy = |whole: bool, pushes: Vec<ServerPush>| {
        let s = entry.state.lock();
        let stats = s.stats();
        let req = ReplicateRequest {
            openid: entry.identity.openid.clone(),
            session_id: entry.identity.session_id.clone(),
            zone: entry.identity.zone.clone(),
            epoch: s.epoch(),
            owner_node: node.config.node_id.clone(),
            pushes: if whole { s.export().pushes } else { pushes },
            acked_seq_id: stats.acked_seq_id,
            next_seq_id: stats.next_seq_id,
            release: false,
            incremental: !whole,
            relayed: false,
            owner_since: 0,
        };
        (req, stats)
    };
    let (req, mut stats) = copy(!known, pushes);
    match send(node, &standby.grpc_addr, req).await {
        // The standby holds no copy of the session (it restarted with the
        // same node id): it gets the whole queue.
        Err(status) if known && status.code() == tonic::Code::NotFound => {
            let (req, whole) = copy(true, Vec::new());
            stats = whole;
            send(node, &standby.grpc_addr, req).await?;
        }
        other => {
            other?;
        }
    }
    let mut tracked = node.replicator.tracked.lock();
    let t = tracked
        .entry(entry.identity.openid.clone())
        .or_insert_with(|| Tracked {
            session_id: entry.identity.session_id.clone(),
            zone: entry.identity.zone.clone(),
            standby: standby.node_id.clone(),
            acked: 0,
            next_seq: 0,
        });
    if t.session_id != entry.identity.session_id || t.standby != standby.node_id {
        t.session_id = entry.identity.session_id.clone();
        t.zone = entry.identity.zone.clone();
        t.standby = standby.node_id.clone();
        t.acked = 0;
        t.next_seq = 0;
    }
    t.acked = t.acked.max(stats.acked_seq_id);
    t.next_seq = t.next_seq.max(stats.next_seq_id);
    Ok(())
}

/// Sends changed ack points to standbys; releases replicas of sessions that
/// ended here (not of sessions that moved: their new owner may need them).
pub async fn sync_ack_points(node: &Node) {
    let snapshot: Vec<(String, String, String, String, u64, u64)> = node
        .replicator
        .tracked
        .lock()
        .iter()
        .map(|(o, t)| {
            (
                o.clone(),
                t.session_id.clone(),
                t.zone.clone(),
                t.standby.clone(),
                t.acked,
                t.next_seq,
            )
        })
        .collect();
    let current = standby_for(node);
    // Standbys that answered a call in this round, and one ack point per
    // standby to ask the others with: a standby that died is found by this
    // sync, not only by the next durable push or the control plane.
    let mut answered = std::collections::HashSet::new();
    let mut probes: HashMap<String, (String, ReplicateRequest)> = HashMap::new();
    for (openid, session_id, zone, standby, acked, next_seq) in snapshot {
        let addr = node
            .registry
            .members(|m| m.live(&standby).map(|n| n.grpc_addr.clone()));
        let entry = node
            .registry
            .get(&openid)
            .filter(|e| e.identity.session_id == session_id);
        // The standby drained, left or died (the ring moved on): the whole
        // queue goes to the new one before the old copy leaves with it.
        if let (Some(entry), Some(new)) = (&entry, &current)
            && new.node_id != standby
        {
            match replicate(node, entry, new, Vec::new()).await {
                Ok(()) => {
                    answered.insert(new.node_id.clone());
                }
                Err(e) if unreachable(&e) => standby_unreachable(node, &new.node_id, &e),
                Err(e) => {
                    tracing::warn!(openid, standby = %new.node_id, error = %e, "re-replicating to a new standby failed");
                }
            }
            continue;
        }
        let Some(addr) = addr else {
            node.replicator.tracked.lock().remove(&openid);
            continue;
        };
        let mut req = ReplicateRequest {
            openid: openid.clone(),
            session_id: session_id.clone(),
            zone,
            owner_node: node.config.node_id.clone(),
            incremental: true,
            ..Default::default()
        };
        match entry {
            Some(entry) => {
                let (epoch, stats) = {
                    let s = entry.state.lock();
                    (s.epoch(), s.stats())
                };
                req.epoch = epoch;
                req.acked_seq_id = stats.acked_seq_id;
                req.next_seq_id = stats.next_seq_id;
                if stats.acked_seq_id <= acked && stats.next_seq_id <= next_seq {
                    probes.entry(standby).or_insert((addr, req));
                    continue;
                }
                match send(node, &addr, req).await {
                    Ok(_) => {
                        answered.insert(standby);
                        if let Some(t) = node.replicator.tracked.lock().get_mut(&openid)
                            && t.session_id == session_id
                        {
                            t.acked = t.acked.max(stats.acked_seq_id);
                            t.next_seq = t.next_seq.max(stats.next_seq_id);
                        }
                    }
                    Err(e) if unreachable(&e) => {
                        answered.insert(standby.clone());
                        standby_unreachable(node, &standby, &e);
                    }
                    Err(e) if e.code() == tonic::Code::NotFound => {
                        answered.insert(standby);
                        copy_lost(node, &openid, &session_id);
                    }
                    Err(_) => {}
                }
            }
            None => {
                let moved = node.registry.moved_to(&openid, false).is_some();
                if !moved {
                    req.release = true;
                    req.incremental = false;
                    let _ = send(node, &addr, req).await;
                }
                let mut tracked = node.replicator.tracked.lock();
                if tracked
                    .get(&openid)
                    .is_some_and(|t| t.session_id == session_id)
                {
                    tracked.remove(&openid);
                }
            }
        }
    }
    // A standby nothing was sent to in this round is asked with an unchanged
    // ack point (idempotent): one call per standby per round.
    for (standby, (addr, req)) in probes {
        if answered.contains(&standby) {
            continue;
        }
        let (openid, session_id) = (req.openid.clone(), req.session_id.clone());
        match send(node, &addr, req).await {
            Err(e) if unreachable(&e) => standby_unreachable(node, &standby, &e),
            Err(e) if e.code() == tonic::Code::NotFound => copy_lost(node, &openid, &session_id),
            _ => {}
        }
    }
}

/// The standby answered that it holds no copy of `openid`'s session (it
/// restarted with the same node id): the session is new to it again, and the
/// next sync (run now) sends it the whole queue. Its other sessions are found
/// the same way, one per sync round at least (the probe).
fn copy_lost(node: &Node, openid: &str, session_id: &str) {
    let mut tracked = node.replicator.tracked.lock();
    if let Some(t) = tracked.get_mut(openid)
        && t.session_id == session_id
    {
        tracing::info!(openid, standby = %t.standby, "the standby lost its copy; sending the whole queue");
        t.standby.clear();
    }
    drop(tracked);
    node.replicator.moved_on.notify_one();
}

/// How many times a leaving node sends a replica that no heir took to a
/// heir that failed before (a round that finds a heir not tried before for
/// every such copy does not count: simulation seed 969 of session 9, a
/// leaving node with a stale view tried three departed heirs and left with
/// the copy).
pub const HANDOFF_ROUNDS: u32 = 3;

/// Every round of a leaving node's replica handoff, new heirs or not.
pub const HANDOFF_TRIES: u32 = 12;

/// How many heirs a leaving node hands each replica to. One was not enough:
/// every holder of an owner's replicas picks the same heir (the owner's next
/// standby), so rolling drains gathered the copies of a session whose owner
/// had restarted empty on one node, and a kill of that node lost them
/// (simulation seed 1678 of session 9).
pub const HANDOFF_HOLDERS: usize = 2;

/// How long a round that only sends copies again to heirs that failed waits
/// after the round before. The leaving node's view may be late (its watch
/// lags, or the heirs left a moment ago), and a later view names new heirs:
/// simulation seed 2209 of session 10, a leaving node whose view was 1-3 s
/// behind retried two departed heirs in 140 ms and left with the only copy
/// of eight acknowledged pushes.
pub const HANDOFF_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A leaving node's replica handoff, sans-IO: which copy goes to which heir,
/// round after round. Each replica goes to the first [`HANDOFF_HOLDERS`] of
/// its owner's heirs ([`Members::heirs_of`]); a heir that failed is passed
/// over for that copy; a copy no heir took waits [`HANDOFF_RETRY_AFTER`] for
/// the view to name a new heir, and goes again to the last heir that failed
/// when none is left, up to [`HANDOFF_ROUNDS`] times. Both shells (the data
/// plane's [`hand_over_replicas`] and the simulation) carry out its rounds.
///
/// [`Members::heirs_of`]: crate::core::Members::heirs_of
pub struct Handoff {
    copies: Vec<Placing>,
    rounds: u32,
    tries: u32,
    /// When the last round was sent.
    last: Option<Instant>,
}

/// What a leaving node does next in its [`Handoff`].
#[derive(Debug)]
pub enum HandoffStep {
    /// Send these copies, each to its heir, and report every answer.
    Send(Vec<(Member, ReplicateRequest)>),
    /// Ask again at this instant (or when the view changes).
    WaitUntil(Instant),
    /// The handoff is over: every copy has its heirs or none to go to, or
    /// the rounds are used up.
    Done,
}

/// One replica being handed over.
struct Placing {
    req: ReplicateRequest,
    /// Heirs that took the copy.
    held: Vec<String>,
    /// Heirs that failed it, the last one last.
    failed: Vec<Member>,
}

impl Handoff {
    /// `copies`: what this node holds ([`ReplicaStore::copies`]).
    pub fn new(mut copies: Vec<ReplicateRequest>) -> Self {
        copies.sort_by(|a, b| a.openid.cmp(&b.openid));
        Self {
            copies: copies
                .into_iter()
                .map(|req| Placing {
                    req,
                    held: Vec::new(),
                    failed: Vec::new(),
                })
                .collect(),
            rounds: 0,
            tries: 0,
            last: None,
        }
    }

    /// Replicas to hand over.
    pub fn len(&self) -> usize {
        self.copies.len()
    }

    /// Whether there is nothing to hand over.
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// Replicas no heir took (they leave with this node).
    pub fn unplaced(&self) -> usize {
        self.copies.iter().filter(|p| p.held.is_empty()).count()
    }

    /// The next step at `now`, after every answer of the round before was
    /// given to [`Handoff::answered`].
    pub fn next_step(&mut self, members: &crate::core::Members, now: Instant) -> HandoffStep {
        if self.rounds >= HANDOFF_ROUNDS || self.tries >= HANDOFF_TRIES {
            return HandoffStep::Done;
        }
        let mut fresh_round = Vec::new();
        let mut again_round = Vec::new();
        for p in &self.copies {
            let want = HANDOFF_HOLDERS.saturating_sub(p.held.len());
            if want == 0 {
                continue;
            }
            let tried = |id: &str| {
                p.held.iter().any(|h| h == id) || p.failed.iter().any(|f| f.node_id == id)
            };
            let fresh: Vec<&Member> = members
                .heirs_of(&p.req.owner_node, now)
                .into_iter()
                .filter(|m| !tried(&m.node_id))
                .take(want)
                .collect();
            if !fresh.is_empty() {
                fresh_round.extend(fresh.into_iter().map(|m| (m.clone(), p.req.clone())));
            } else if p.held.is_empty()
                && let Some(last) = p.failed.last()
            {
                again_round.push((last.clone(), p.req.clone()));
            }
        }
        let round = if !fresh_round.is_empty() {
            fresh_round
        } else if again_round.is_empty() {
            return HandoffStep::Done;
        } else {
            let after = self.last.map(|t| t + HANDOFF_RETRY_AFTER);
            if let Some(after) = after.filter(|a| now < *a) {
                return HandoffStep::WaitUntil(after);
            }
            self.rounds += 1;
            again_round
        };
        self.tries += 1;
        self.last = Some(now);
        HandoffStep::Send(round)
    }

    /// `heir` took (`ok`) or failed the copy of `openid`'s replica.
    pub fn answered(&mut self, openid: &str, heir: &Member, ok: bool) {
        let Ok(i) = self
            .copies
            .binary_search_by(|p| p.req.openid.as_str().cmp(openid))
        else {
            return;
        };
        let p = &mut self.copies[i];
        p.failed.retain(|f| f.node_id != heir.node_id);
        if ok {
            if !p.held.contains(&heir.node_id) {
                p.held.push(heir.node_id.clone());
            }
        } else {
            p.failed.push(heir.clone());
        }
    }
}

/// Before this node leaves (the end of a drain): hands every replica it
/// holds to its owner's next heirs, as [`Handoff`] plans, a few calls at a
/// time, each bounded by the peer timeout (a lost copy was the only one left
/// of what a fenced or departed owner acknowledged: simulation seed 152).
pub async fn hand_over_replicas(node: &Node) {
    use futures::StreamExt;
    let mut handoff = Handoff::new(node.replicas.seal());
    loop {
        let round = match node
            .registry
            .members(|m| handoff.next_step(m, Instant::now()))
        {
            HandoffStep::Done => break,
            HandoffStep::WaitUntil(at) => {
                tokio::time::sleep_until(at.into()).await;
                continue;
            }
            HandoffStep::Send(round) => round,
        };
        let answers: Vec<(Member, String, bool)> = futures::stream::iter(round)
            .map(|(heir, req)| async move {
                let openid = req.openid.clone();
                let ok = match send(node, &heir.grpc_addr, req).await {
                    Ok(_) => true,
                    Err(status) => {
                        node.registry.mark_unreachable(
                            &heir.node_id,
                            reach_of(&status),
                            Instant::now() + UNREACHABLE_HOLD,
                        );
                        false
                    }
                };
                (heir, openid, ok)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for (heir, openid, ok) in &answers {
            handoff.answered(openid, heir, *ok);
        }
    }
    if !handoff.is_empty() {
        tracing::info!(
            replicas = handoff.len(),
            unplaced = handoff.unplaced(),
            "replicas handed to the owners' next heirs"
        );
    }
}

/// Gives the replicas of owners gone from the view a second copy
/// ([`ReplicaStore::orphans`]), a few calls at a time.
async fn copy_orphans(node: &Node) {
    use futures::StreamExt;
    let fenced = node.registry.with_table(|t| {
        t.fenced_with_pushes()
            .into_iter()
            .map(|(state, owner)| {
                let since = t.members().registered_at(&owner);
                (state, owner, since)
            })
            .collect::<Vec<_>>()
    });
    for (state, owner, since) in &fenced {
        node.replicas.keep_fenced(state, owner, *since);
    }
    let orphans = node
        .registry
        .members(|m| node.replicas.orphans(m, Instant::now()));
    if orphans.is_empty() {
        return;
    }
    let n = orphans.len();
    let copied = futures::stream::iter(orphans)
        .map(|(heir, req)| async move {
            let (openid, session_id) = (req.openid.clone(), req.session_id.clone());
            match send(node, &heir.grpc_addr, req).await {
                Ok(_) => {
                    node.replicas.copied(&openid, &session_id, &heir.node_id);
                    true
                }
                // Passed over until the mark ends: the next sync tries the
                // next heir (simulation seed 6646 of session 11).
                Err(e) if unreachable(&e) => {
                    standby_unreachable(node, &heir.node_id, &e);
                    false
                }
                Err(_) => false,
            }
        })
        .buffer_unordered(16)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    tracing::info!(
        replicas = n,
        copied,
        "replicas of owners gone from the view copied to a second node"
    );
}

/// Probes, off this task, the owners this node holds replicas for and has
/// not heard from ([`ReplicaStore::owners_to_probe`]): one that does not
/// answer is marked unreachable, and its replicas are copied to its next heir
/// at once (the control plane may take long to declare it dead, or be down).
fn probe_silent_owners(node: &Arc<Node>) {
    let due = node.replicas.owners_to_probe(Instant::now());
    for owner in due {
        let Some(addr) = node
            .registry
            .members(|m| m.live(&owner).map(|n| n.grpc_addr.clone()))
        else {
            continue; // Gone from the view: its replicas are orphans already.
        };
        let node = node.clone();
        tokio::spawn(async move {
            let reach = probe(&node, &addr).await;
            let now = Instant::now();
            if reach == crate::core::Reach::Answered {
                node.metrics
                    .replica_owner_probes
                    .with_label_values(&["answered"])
                    .inc();
                node.replicas.heard_from(&owner, now);
                node.registry.peer_answered(&owner);
                return;
            }
            tracing::warn!(
                owner,
                ?reach,
                "silent owner unreachable; its replicas get a second copy"
            );
            node.metrics
                .replica_owner_probes
                .with_label_values(&["unreachable"])
                .inc();
            node.registry
                .mark_unreachable(&owner, reach, now + UNREACHABLE_HOLD);
            node.replicator.moved_on.notify_one();
        });
    }
}

/// One `grpc.health.v1.Health/Check` of a peer: any answer the peer gave
/// (serving or not) shows it alive.
async fn probe(node: &Node, addr: &str) -> crate::core::Reach {
    use crate::peer::Delivery;
    let Ok(channel) = node.peers.channel(addr) else {
        return crate::core::Reach::NoAnswer;
    };
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut request = Request::new(tonic_health::pb::HealthCheckRequest::default());
    request.set_timeout(PEER_TIMEOUT);
    let status = match tokio::time::timeout(PEER_TIMEOUT, client.check(request)).await {
        Ok(Ok(_)) => return crate::core::Reach::Answered,
        Ok(Err(status)) => status,
        Err(_) => return crate::core::Reach::NoAnswer,
    };
    match crate::peer::delivery(&status) {
        Delivery::Answered => crate::core::Reach::Answered,
        Delivery::Unsent if crate::peer::refused(&status) => crate::core::Reach::Down,
        Delivery::Unsent | Delivery::Unknown => crate::core::Reach::NoAnswer,
    }
}

/// Timer task: ack-point sync and replica expiry.
pub async fn run(node: Arc<Node>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(ACK_SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = node.registry.recovered_wake.notified() => {
                replicate_recovered(&node).await;
                continue;
            }
            () = node.replicator.moved_on.notified() => {
                sync_ack_points(&node).await;
                copy_orphans(&node).await;
                continue;
            }
            () = stop.cancelled() => return,
        }
        replicate_recovered(&node).await;
        sync_ack_points(&node).await;
        copy_orphans(&node).await;
        probe_silent_owners(&node);
        let (sessions, pushes) = node.replicas.sweep();
        node.metrics.replica_sessions.set(sessions as i64);
        node.metrics.replica_pushes.set(pushes as i64);
    }
}

/// What the live nodes' replicas hold of one session whose owner is gone.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// The old session id (the client resumes with it).
    pub session_id: String,
    pub zone: String,
    /// Highest ack point any replica saw.
    pub acked: u64,
    /// Highest next seq any replica saw.
    pub next_seq: u64,
    /// Durable pushes above `acked`, by old seq.
    pub pushes: BTreeMap<u64, ServerPush>,
    /// A live node never answered within [`crate::peer::RECOVERY_PATIENCE`]:
    /// a copy it holds is missing, so the client is told SESSION_EXPIRED (the
    /// pushes found still follow), not RECOVERED, which promises every
    /// durable push (simulation seed 189 of session 9).
    pub incomplete: bool,
}

impl Recovery {
    /// The union of the copies `found` (answers with `found: false` are
    /// skipped) of session `session_id`: every push above the highest ack
    /// point (an older standby may hold pushes from before a handover; the
    /// seqs are the same session's). `None` if nobody had a copy.
    pub fn merge(
        session_id: &str,
        found: impl IntoIterator<Item = FetchReplicaResponse>,
    ) -> Option<Recovery> {
        let mut recovery: Option<Recovery> = None;
        for r in found.into_iter().filter(|r| r.found) {
            let recovery = recovery.get_or_insert_with(|| Recovery {
                session_id: session_id.to_string(),
                zone: r.zone.clone(),
                ..Default::default()
            });
            recovery.acked = recovery.acked.max(r.acked_seq_id);
            recovery.next_seq = recovery.next_seq.max(r.next_seq_id);
            for p in r.pushes {
                recovery.pushes.insert(p.seq_id, p);
            }
        }
        let mut recovery = recovery?;
        let acked = recovery.acked;
        recovery.pushes.retain(|seq, _| *seq > acked);
        Some(recovery)
    }

    /// The session to install for a client that acked `last_acked` (old
    /// numbering): a NEW session `new_id` whose queue holds the durable pushes
    /// after it, renumbered from 1 and marked as redeliveries. Also returns
    /// how many non-durable pushes are known lost (seqs the replica saw
    /// assigned, above the ack, not durable: a lower bound, since pushes after
    /// the owner's last sync are unknown).
    pub fn rebuild(self, openid: &str, new_id: String, last_acked: u64) -> (SessionState, u64) {
        let acked = self.acked.max(last_acked);
        let pushes: Vec<ServerPush> = self
            .pushes
            .into_iter()
            .filter(|(seq, _)| *seq > acked)
            .map(|(_, p)| p)
            .collect();
        let highest = self
            .next_seq
            .saturating_sub(1)
            .max(pushes.last().map_or(0, |p| p.seq_id));
        let lost = highest
            .saturating_sub(acked)
            .saturating_sub(pushes.len() as u64);
        let n = pushes.len() as u64;
        let renumbered = pushes
            .into_iter()
            .enumerate()
            .map(|(i, mut p)| {
                p.seq_id = i as u64 + 1;
                p.redelivery = true;
                p
            })
            .collect();
        let state = SessionState {
            session_id: new_id,
            openid: openid.to_string(),
            zone: self.zone,
            epoch: 0,
            next_seq_id: n + 1,
            acked_seq_id: 0,
            trimmed_through_seq_id: 0,
            highest_sent_seq_id: n,
            pushes: renumbered,
            replaces_session_id: self.session_id,
            replaces_status: if self.incomplete {
                ResumeStatus::SessionExpired
            } else {
                ResumeStatus::Recovered
            }
            .into(),
            ..Default::default()
        };
        (state, lost)
    }
}

/// What one round of [`fetch_recovery`] gathered.
pub struct Gathered {
    /// The answers, by node (a node with no copy answers `found: false`).
    pub answers: Vec<(String, FetchReplicaResponse)>,
    /// Live nodes that did not answer (overloaded, partitioned): a copy they
    /// hold is missing from `answers`.
    pub unanswered: Vec<String>,
}

/// The previous owner of `openid` is gone: asks the live nodes other than
/// `gone`, this one and those in `answered` (an earlier round's) for their
/// replicas of session `session_id`; [`merge`] joins what the rounds found.
pub async fn fetch_recovery(
    node: &Node,
    gone: &str,
    openid: &str,
    session_id: &str,
    answered: &HashSet<String>,
) -> Gathered {
    let mut gathered = Gathered {
        answers: Vec::new(),
        unanswered: Vec::new(),
    };
    if node.cluster.is_none() {
        return gathered;
    }
    let ids = |members: Vec<&Member>| -> Vec<(String, String)> {
        members
            .into_iter()
            .filter(|n| !answered.contains(&n.node_id))
            .map(|n| (n.node_id.clone(), n.grpc_addr.clone()))
            .collect()
    };
    // Live nodes only: a dead or departed (`left`) node cannot answer and is
    // not waited on (core::Members decides).
    let peers = node.registry.members(|m| ids(m.recovery_sources(gone)));
    // Nodes declared dead are asked too, briefly and without waiting on
    // them: one only cut off from the control plane is alive and may hold the
    // last copy (simulation seed 72: the standby and the owner both lost the
    // control plane; the standby held the pushes the owner had acknowledged).
    let maybe = node.registry.members(|m| ids(m.recovery_maybe(gone)));
    let req = || FetchReplicaRequest {
        openid: openid.to_string(),
        session_id: session_id.to_string(),
    };
    let ask = |addr: String| async move {
        let mut client = node.peers.peer(&addr).ok()?;
        call_fetch(&mut client, req()).await
    };
    // Live nodes are asked in batches: a reconnect burst after a crash sends
    // each node a few `FetchReplicas` calls, not one call per session.
    let batched = |addr: String| async move {
        let client = node.peers.peer(&addr).ok()?;
        node.replicas.fetches.fetch(client, &addr, req()).await
    };
    let remote = futures::future::join_all(
        peers
            .into_iter()
            .map(|(id, addr)| async move { (batched(addr).await, id) }),
    );
    let dead = futures::future::join_all(maybe.into_iter().map(|(id, addr)| async move {
        let answer = tokio::time::timeout(DEAD_NODE_ASK, ask(addr)).await;
        (answer.ok().flatten(), id)
    }));
    let (remote, dead) = tokio::join!(remote, dead);
    gathered.answers = dead
        .into_iter()
        .filter_map(|(answer, id)| Some((id, answer?)))
        .collect();
    for (answer, id) in remote {
        match answer {
            Some(r) => gathered.answers.push((id, r)),
            None => gathered.unanswered.push(id),
        }
    }
    gathered
}

/// This node's answer to a fetch of `openid`'s session `session_id` (a
/// claimant recovers a gone owner's session): its replica, joined with an
/// unserved copy of the table ([`crate::registry::Registry::answer_fetch_replica`]).
pub fn answer_fetch(node: &Node, openid: &str, session_id: &str) -> FetchReplicaResponse {
    let replica = node.replicas.fetch(openid, session_id);
    node.registry
        .answer_fetch_replica(replica, openid, session_id)
}

/// Most sessions asked of one node in one `Peer.FetchReplicas` call.
pub const MAX_FETCHES_PER_CALL: usize = 1_024;

/// `FetchReplicas` calls in flight to one node at once: fetches arriving
/// while all are busy wait and go together in the next call.
const FETCH_CALLS_PER_PEER: usize = 4;

type FetchReply = tokio::sync::oneshot::Sender<Option<FetchReplicaResponse>>;

/// Fetches waiting for one node, and the calls to it in flight.
#[derive(Default)]
struct PeerFetches {
    waiting: Vec<(FetchReplicaRequest, FetchReply)>,
    calls: usize,
}

/// Replica fetches to other nodes, batched per node as claims are
/// (`Cluster::claim`): an idle node's fetch goes at once; in a reconnect
/// burst the fetches that arrive while [`FETCH_CALLS_PER_PEER`] calls are
/// in flight share the next call (at most [`MAX_FETCHES_PER_CALL`]).
#[derive(Default)]
pub struct FetchBatcher {
    peers: Arc<Mutex<HashMap<String, PeerFetches>>>,
    /// `FetchReplicas` calls made and the fetches they carried.
    counts: Arc<(AtomicU64, AtomicU64)>,
}

impl FetchBatcher {
    /// `req` asked of the node at `addr` (`client`: a channel to it).
    /// `None`: not answered whole (the call failed or timed out).
    pub async fn fetch(
        &self,
        client: PeerClient<Channel>,
        addr: &str,
        req: FetchReplicaRequest,
    ) -> Option<FetchReplicaResponse> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut peers = self.peers.lock();
            let peer = peers.entry(addr.to_string()).or_default();
            peer.waiting.push((req, reply));
            let start = peer.calls < FETCH_CALLS_PER_PEER;
            if start {
                peer.calls += 1;
            }
            start
        };
        if start {
            tokio::spawn(send_fetches(
                self.peers.clone(),
                self.counts.clone(),
                addr.to_string(),
                client,
            ));
        }
        answer.await.ok().flatten()
    }

    /// `FetchReplicas` calls made so far and the fetches they carried.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counts.0.load(Ordering::Relaxed),
            self.counts.1.load(Ordering::Relaxed),
        )
    }
}

/// One of the calls in flight to `addr`: sends what waits, until nothing does.
async fn send_fetches(
    peers: Arc<Mutex<HashMap<String, PeerFetches>>>,
    counts: Arc<(AtomicU64, AtomicU64)>,
    addr: String,
    mut client: PeerClient<Channel>,
) {
    loop {
        let batch: Vec<(FetchReplicaRequest, FetchReply)> = {
            let mut map = peers.lock();
            let Some(peer) = map.get_mut(&addr) else {
                return;
            };
            if peer.waiting.is_empty() {
                peer.calls -= 1;
                if peer.calls == 0 {
                    map.remove(&addr);
                }
                return;
            }
            let n = peer.waiting.len().min(MAX_FETCHES_PER_CALL);
            peer.waiting.drain(..n).collect()
        };
        counts.0.fetch_add(1, Ordering::Relaxed);
        counts.1.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let (reqs, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let answers = call_fetches(&mut client, reqs).await;
        for (reply, answer) in replies.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }
}

/// `Peer.FetchReplicas` for `reqs`; one answer per request, in order
/// (`None`: not answered whole). A node that does not know the call is
/// asked per session ([`call_fetch`]).
async fn call_fetches(
    client: &mut PeerClient<Channel>,
    reqs: Vec<FetchReplicaRequest>,
) -> Vec<Option<FetchReplicaResponse>> {
    let n = reqs.len();
    let mut request = Request::new(FetchReplicasRequest {
        sessions: reqs.clone(),
    });
    request.set_timeout(PEER_TIMEOUT);
    let started = tokio::time::timeout(PEER_TIMEOUT, client.fetch_replicas(request)).await;
    if let Ok(Err(status)) = &started
        && status.code() == tonic::Code::Unimplemented
    {
        return futures::future::join_all(reqs.into_iter().map(|req| {
            let mut client = client.clone();
            async move { call_fetch(&mut client, req).await }
        }))
        .await;
    }
    match collect_stream(started).await {
        Ok(chunks) => join_fetches(n, chunks),
        Err(_) => vec![None; n],
    }
}

/// The answers of a `FetchReplicas` stream of `n` sessions, each joined
/// from its chunks ([`join_fetch`]); `None` for a session with no chunk.
pub fn join_fetches(
    n: usize,
    chunks: Vec<FetchReplicasChunk>,
) -> Vec<Option<FetchReplicaResponse>> {
    let mut parts: Vec<Vec<FetchReplicaResponse>> = vec![Vec::new(); n];
    for chunk in chunks {
        if let (Some(answer), Some(part)) = (parts.get_mut(chunk.index as usize), chunk.part) {
            answer.push(part);
        }
    }
    parts
        .into_iter()
        .map(|p| (!p.is_empty()).then(|| join_fetch(p)))
        .collect()
}

/// Splits a replica into chunks of about `budget` bytes: the first carries
/// every field and the first pushes, later ones only more pushes.
pub fn split_fetch(answer: FetchReplicaResponse, budget: usize) -> Vec<FetchReplicaResponse> {
    let mut head = answer;
    let mut runs = chunk_by_size(std::mem::take(&mut head.pushes), budget).into_iter();
    head.pushes = runs.next().unwrap_or_default();
    let mut out = vec![head];
    out.extend(runs.map(|pushes| FetchReplicaResponse {
        pushes,
        ..Default::default()
    }));
    out
}

/// Reassembles the chunks of [`split_fetch`].
pub fn join_fetch(chunks: Vec<FetchReplicaResponse>) -> FetchReplicaResponse {
    let mut chunks = chunks.into_iter();
    let mut whole = chunks.next().unwrap_or_default();
    for chunk in chunks {
        whole.pushes.extend(chunk.pushes);
    }
    whole
}

/// `Peer.FetchReplicaStream`, or `Peer.FetchReplica` on a node that does not
/// know it. `None`: no (complete) answer.
async fn call_fetch(
    client: &mut PeerClient<Channel>,
    req: FetchReplicaRequest,
) -> Option<FetchReplicaResponse> {
    let mut request = Request::new(req.clone());
    request.set_timeout(PEER_TIMEOUT);
    let started = tokio::time::timeout(PEER_TIMEOUT, client.fetch_replica_stream(request)).await;
    if let Ok(Err(status)) = &started
        && status.code() == tonic::Code::Unimplemented
    {
        let mut request = Request::new(req);
        request.set_timeout(PEER_TIMEOUT);
        return match tokio::time::timeout(PEER_TIMEOUT, client.fetch_replica(request)).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        };
    }
    collect_stream(started).await.ok().map(join_fetch)
}

/// Merges the copies found (this node's own included).
pub fn merge(
    node: &Node,
    openid: &str,
    session_id: &str,
    mut found: Vec<FetchReplicaResponse>,
) -> Option<Recovery> {
    // This node's replica, joined with its own unserved copy (a staged copy
    // the view never named): core::Table::copy_for_recovery.
    let own = node.replicas.fetch(openid, session_id);
    found.push(node.registry.answer_fetch_replica(own, openid, session_id));
    let recovery = Recovery::merge(session_id, found);
    if recovery.is_none() {
        node.metrics
            .sessions_recovered
            .with_label_values(&["no_replica"])
            .inc();
        tracing::info!(
            openid,
            session_id,
            "previous owner gone and no replica found"
        );
    }
    recovery
}

/// Copies the queue of sessions that just arrived with pushes (rebuilt from
/// a replica, or handed over by their previous owner) to this node's
/// standby: those pushes are durable again only once it holds them. Until
/// this node's first copy, the only other one was the previous owner's (or
/// the replicas'), and this node crashing meant relying on that one node
/// alone (simulation seed 189: the new owner, which had been the old
/// owner's standby, restarted 0.8 s after the handover; the old owner, the
/// last holder, crashed 3.8 s later). A copy that fails is tried again by
/// the next ack sync (the session is tracked with no standby yet).
pub async fn replicate_recovered(node: &Node) {
    for openid in node.registry.take_recovered_to_replicate() {
        let Some(entry) = node.registry.get(&openid) else {
            continue;
        };
        let pushes = entry.state.lock().export().pushes;
        if pushes.is_empty() {
            continue;
        }
        node.replicator.needs_copy(&entry);
        match standby_for(node) {
            Some(standby) => {
                if let Err(e) = replicate(node, &entry, &standby, pushes).await {
                    tracing::warn!(openid, error = %e, "re-replicating recovered pushes failed");
                }
            }
            None => tracing::warn!(openid, "no standby to re-replicate recovered pushes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use gatesvr_proto::control::NodeState;

    use super::*;
    use crate::core::{Members, Reach};

    fn member(id: &str, state: NodeState) -> Member {
        Member {
            node_id: id.into(),
            state,
            grpc_addr: format!("{id}:grpc"),
            quic_addr: format!("{id}:quic"),
            registered_at_ms: 1,
        }
    }

    fn push(seq: u64) -> ServerPush {
        ServerPush {
            seq_id: seq,
            content: format!("p{seq}"),
            ..Default::default()
        }
    }

    /// A `FetchReplicas` stream answers each session in its own consecutive
    /// chunks: joined per index they give every answer whole, in request
    /// order (a multi-chunk answer too); a session the stream never named is
    /// not taken for "no copy" but for unanswered.
    #[test]
    fn a_batched_fetch_joins_each_sessions_chunks_in_order() {
        let answer = |session: &str, seqs: std::ops::RangeInclusive<u64>| FetchReplicaResponse {
            found: true,
            session_id: session.into(),
            acked_seq_id: 1,
            next_seq_id: 40,
            pushes: seqs.map(push).collect(),
            ..Default::default()
        };
        let big = answer("s0", 2..=30);
        let none = FetchReplicaResponse::default();
        let small = answer("s2", 5..=6);
        // A small budget: "s0" travels in several chunks.
        let parts = split_fetch(big.clone(), 40);
        assert!(parts.len() > 1);
        let mut chunks: Vec<FetchReplicasChunk> = parts
            .into_iter()
            .map(|part| FetchReplicasChunk {
                index: 0,
                part: Some(part),
            })
            .collect();
        for (index, a) in [(1, none.clone()), (2, small.clone())] {
            chunks.extend(
                split_fetch(a, 40)
                    .into_iter()
                    .map(|part| FetchReplicasChunk {
                        index,
                        part: Some(part),
                    }),
            );
        }
        // An index beyond the request is ignored.
        chunks.push(FetchReplicasChunk {
            index: 9,
            part: Some(small.clone()),
        });
        let joined = join_fetches(4, chunks);
        assert_eq!(joined, vec![Some(big), Some(none), Some(small), None]);
    }

    /// Simulation seed 1: the owner crashed, and its standby 1.8 s later,
    /// before the client came back: what only the standby held was lost. A
    /// replica whose owner left the view gets one second copy, on the owner's
    /// next standby other than this node; the same pushes again do not ask
    /// for another (two holders copied to each other every second: seed 217),
    /// a new push does.
    #[test]
    fn a_replica_of_a_gone_owner_gets_one_second_copy() {
        let store = ReplicaStore::new(Duration::from_secs(60), 100);
        let copy = |pushes| ReplicateRequest {
            openid: "u1".into(),
            session_id: "s1".into(),
            zone: "001".into(),
            epoch: 3,
            owner_node: "dp-1".into(),
            pushes,
            acked_seq_id: 3,
            next_seq_id: 6,
            release: false,
            incremental: false,
            relayed: false,
            owner_since: 0,
        };
        store
            .apply(copy(vec![push(4), push(5)]), 0)
            .expect("applied");
        let mut view = Members::new("dp-2");
        view.put(member("dp-1", NodeState::Active));
        view.put(member("dp-2", NodeState::Active));
        view.put(member("dp-3", NodeState::Active));
        assert!(
            store.orphans(&view, Instant::now()).is_empty(),
            "a live owner's replica"
        );
        view.put(member("dp-1", NodeState::Dead));
        let orphans = store.orphans(&view, Instant::now());
        assert_eq!(orphans.len(), 1);
        let (heir, req) = &orphans[0];
        assert_eq!(
            heir.node_id, "dp-3",
            "the owner's next standby but this node"
        );
        assert_eq!(req.pushes.len(), 2);
        assert!(!req.incremental, "a whole copy");
        store.copied("u1", "s1", "dp-3");
        assert!(
            store.orphans(&view, Instant::now()).is_empty(),
            "copied once"
        );
        store
            .apply(copy(vec![push(4), push(5)]), 0)
            .expect("applied");
        assert!(
            store.orphans(&view, Instant::now()).is_empty(),
            "the same pushes again"
        );
        store.apply(copy(vec![push(6)]), 0).expect("applied");
        assert_eq!(
            store.orphans(&view, Instant::now()).len(),
            1,
            "a new push is copied again"
        );
    }

    /// Simulation seed 2569 of session 10: the owner restarted with its node
    /// id (so it stayed live in the view, holding nothing of the session),
    /// and its standby, which held the only copy, restarted 3.4 s later. A
    /// replica whose owner registered again since its copy came gets a
    /// second copy as a departed owner's does; a view that had not heard of
    /// the owner's registration (0) or the same registration asks for none.
    #[test]
    fn a_replica_of_an_owner_that_restarted_gets_a_second_copy() {
        let store = ReplicaStore::new(Duration::from_secs(60), 100);
        let copy = copy_of("u1", "s1", vec![push(4)]);
        store.apply(copy.clone(), 100).expect("applied");
        let mut view = Members::new("dp-2");
        let registered = |id: &str, at| Member {
            registered_at_ms: at,
            ..member(id, NodeState::Active)
        };
        view.put(registered("dp-1", 100));
        view.put(member("dp-2", NodeState::Active));
        view.put(member("dp-3", NodeState::Active));
        assert!(
            store.orphans(&view, Instant::now()).is_empty(),
            "the owner that sent the copy"
        );
        view.put(registered("dp-1", 0));
        assert!(
            store.orphans(&view, Instant::now()).is_empty(),
            "an unknown registration proves nothing"
        );
        view.put(registered("dp-1", 250));
        let orphans = store.orphans(&view, Instant::now());
        assert_eq!(orphans.len(), 1, "the owner restarted");
        assert_eq!(orphans[0].0.node_id, "dp-3");
        // The restarted owner's own copy of a later session is its again.
        store
            .apply(
                ReplicateRequest {
                    session_id: "s2".into(),
                    epoch: 4,
                    ..copy
                },
                250,
            )
            .expect("applied");
        assert!(store.orphans(&view, Instant::now()).is_empty());

        // Seed 5078: the node that handed a session over keeps its copy
        // under the new owner's registration; the new owner's restart makes
        // it an orphan too.
        let old_owner = ReplicaStore::new(Duration::from_secs(60), 100);
        let state = SessionState {
            session_id: "s9".into(),
            openid: "u9".into(),
            zone: "001".into(),
            epoch: 7,
            next_seq_id: 6,
            acked_seq_id: 4,
            pushes: vec![push(5)],
            ..Default::default()
        };
        old_owner.keep_handed_over(&state, "dp-3", 100);
        view.put(registered("dp-3", 100));
        assert!(old_owner.orphans(&view, Instant::now()).is_empty());
        old_owner.keep_handed_over(&state, "dp-3", 300);
        view.put(registered("dp-3", 300));
        assert_eq!(
            old_owner.orphans(&view, Instant::now()).len(),
            1,
            "kept again after the restart, still under the first registration"
        );
    }

    /// Simulation seed 5262 of session 10: the owner was killed during a
    /// control-plane outage (so the view kept it live), and its standby,
    /// holding the only copy, was killed 4.8 s later. A standby that stops
    /// hearing from an owner probes it after [`OWNER_SILENCE`] (once per
    /// silence), and an owner the probe found unreachable makes its replicas
    /// orphans while the view still names it live.
    #[test]
    fn a_standby_probes_a_silent_owner_and_copies_its_replicas_if_unreachable() {
        let store = ReplicaStore::new(Duration::from_secs(60), 100);
        let t0 = Instant::now();
        store
            .apply(copy_of("u1", "s1", vec![push(4)]), 0)
            .expect("applied");
        // An owner never heard from (only relayed copies came) is not probed.
        assert!(store.owners_to_probe(t0 + OWNER_SILENCE * 5).is_empty());
        store.heard_from("dp-1", t0);
        assert!(store.owners_to_probe(t0 + OWNER_SILENCE / 2).is_empty());
        assert_eq!(store.owners_to_probe(t0 + OWNER_SILENCE), vec!["dp-1"]);
        assert!(
            store
                .owners_to_probe(t0 + OWNER_SILENCE + OWNER_SILENCE / 2)
                .is_empty(),
            "probed once per silence"
        );
        assert_eq!(store.owners_to_probe(t0 + OWNER_SILENCE * 2), vec!["dp-1"]);
        store.heard_from("dp-1", t0 + OWNER_SILENCE * 3);
        assert!(
            store
                .owners_to_probe(t0 + OWNER_SILENCE * 3 + OWNER_SILENCE / 2)
                .is_empty(),
            "heard again"
        );

        let mut view = Members::new("dp-2");
        for id in ["dp-1", "dp-2", "dp-3"] {
            view.put(member(id, NodeState::Active));
        }
        assert!(
            store.orphans(&view, t0).is_empty(),
            "a live owner's replica"
        );
        view.mark_unreachable("dp-1", Reach::Down, t0 + UNREACHABLE_HOLD);
        let orphans = store.orphans(&view, t0);
        assert_eq!(orphans.len(), 1, "the probe found the owner unreachable");
        assert_eq!(orphans[0].0.node_id, "dp-3");
        assert!(orphans[0].1.relayed, "a second copy is not the owner's");
        assert!(
            store.orphans(&view, t0 + UNREACHABLE_HOLD).is_empty(),
            "the mark ended: the owner is tried again"
        );

        // A replica without pushes needs no probe; a forgotten owner is dropped.
        let empty = ReplicaStore::new(Duration::from_secs(60), 100);
        empty
            .apply(copy_of("u2", "s2", vec![]), 0)
            .expect("applied");
        empty.heard_from("dp-1", t0);
        empty.heard_from("dp-9", t0);
        assert!(empty.owners_to_probe(t0 + OWNER_SILENCE * 2).is_empty());
        assert_eq!(empty.contacts.lock().len(), 1, "dp-9 holds nothing here");
    }

    /// Simulation seed 6576 of session 11: an owner whose view lagged made a
    /// leaving node its standby after that node planned its handoff, and the
    /// node left with the only copy. Once the handoff is planned, copies are
    /// refused (UNAVAILABLE: the owner goes to the next node); releases are
    /// still taken.
    #[test]
    fn a_leaving_node_takes_no_copy_after_planning_its_handoff() {
        let store = ReplicaStore::new(Duration::from_secs(60), 100);
        store
            .apply(copy_of("u1", "s1", vec![push(4)]), 0)
            .expect("applied");
        assert!(!store.sealed());
        let planned = store.seal();
        assert_eq!(planned.len(), 1);
        assert!(store.sealed());
        let refused = store
            .apply(copy_of("u2", "s2", vec![push(4)]), 0)
            .expect_err("sealed");
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert_eq!(store.copies().len(), 1, "nothing taken after the plan");
        let release = ReplicateRequest {
            release: true,
            ..copy_of("u1", "s1", vec![])
        };
        store.apply(release, 0).expect("a release is taken");
        assert!(store.copies().is_empty());
    }

    /// Simulation seed 6579 of session 11: the second copy a holder makes
    /// because the owner restarted keeps the registration it was taken under,
    /// so its new holder also sees the restart and copies it on if the first
    /// holder goes (before, it took the restarted owner's new registration).
    #[test]
    fn a_relayed_copy_keeps_the_owners_registration_it_was_taken_under() {
        let first = ReplicaStore::new(Duration::from_secs(60), 100);
        first
            .apply(copy_of("u1", "s1", vec![push(4)]), 100)
            .expect("applied");
        let mut view = Members::new("dp-2");
        view.put(Member {
            registered_at_ms: 250,
            ..member("dp-1", NodeState::Active)
        });
        view.put(member("dp-2", NodeState::Active));
        view.put(member("dp-3", NodeState::Active));
        let orphans = first.orphans(&view, Instant::now());
        assert_eq!(orphans.len(), 1);
        let (_, relayed) = orphans.into_iter().next().expect("one");
        assert_eq!(relayed.owner_since, 100);

        // dp-3 takes it while its view names the restarted owner (250).
        let second = ReplicaStore::new(Duration::from_secs(60), 100);
        second.apply(relayed, 250).expect("applied");
        let mut view3 = Members::new("dp-3");
        view3.put(Member {
            registered_at_ms: 250,
            ..member("dp-1", NodeState::Active)
        });
        view3.put(member("dp-3", NodeState::Active));
        view3.put(member("dp-4", NodeState::Active));
        let orphans = second.orphans(&view3, Instant::now());
        assert_eq!(orphans.len(), 1, "still the old owner's copy");
        assert_eq!(orphans[0].0.node_id, "dp-4");
    }

    /// Simulation seed 6372 of session 11: a session fenced here whose new
    /// owner never got its state gets a second copy on the new owner's
    /// standby while the new owner is live, once; a copy the new owner sends
    /// itself ends that.
    #[test]
    fn a_fenced_session_never_handed_over_gets_a_second_copy() {
        let store = ReplicaStore::new(Duration::from_secs(60), 100);
        let state = SessionState {
            session_id: "s1".into(),
            openid: "u1".into(),
            zone: "001".into(),
            epoch: 3,
            next_seq_id: 6,
            acked_seq_id: 4,
            pushes: vec![push(5)],
            ..Default::default()
        };
        let mut view = Members::new("dp-1");
        for id in ["dp-1", "dp-2", "dp-3"] {
            view.put(member(id, NodeState::Active));
        }
        let now = Instant::now();
        store.keep_handed_over(&state, "dp-2", 1);
        assert!(store.orphans(&view, now).is_empty(), "handed over: no copy");
        store.keep_fenced(&state, "dp-2", 1);
        let orphans = store.orphans(&view, now);
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].0.node_id, "dp-3", "the new owner's standby");
        store.copied("u1", "s1", "dp-3");
        store.keep_fenced(&state, "dp-2", 1);
        assert!(store.orphans(&view, now).is_empty(), "copied once");
        // The new owner replicates the session here itself (this node is its standby).
        store
            .apply(
                ReplicateRequest {
                    owner_node: "dp-2".into(),
                    epoch: 4,
                    ..copy_of("u1", "s1", vec![push(6)])
                },
                1,
            )
            .expect("applied");
        assert!(store.orphans(&view, now).is_empty(), "the owner's own copy");
    }

    /// Simulation seed 6646 of session 11: the owner restarted, and the only
    /// other active node was cut off from this one. The restarted owner is a
    /// holder of last resort for its old session's copy; any other heir
    /// comes first.
    #[test]
    fn a_restarted_owner_takes_its_old_copy_when_no_other_heir_can() {
        let store = ReplicaStore::new(Duration::from_secs(60), 100);
        store
            .apply(copy_of("u1", "s1", vec![push(4)]), 100)
            .expect("applied");
        let now = Instant::now();
        let mut view = Members::new("dp-2");
        view.put(Member {
            registered_at_ms: 250,
            ..member("dp-1", NodeState::Active)
        });
        view.put(member("dp-2", NodeState::Active));
        view.put(member("dp-3", NodeState::Active));
        assert_eq!(store.orphans(&view, now)[0].0.node_id, "dp-3");
        view.mark_unreachable("dp-3", Reach::NoAnswer, now + UNREACHABLE_HOLD);
        let orphans = store.orphans(&view, now);
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].0.node_id, "dp-1", "the restarted owner");
        // An owner that did not restart (only unreachable) is no heir of its own.
        view.put(Member {
            registered_at_ms: 100,
            ..member("dp-1", NodeState::Active)
        });
        view.mark_unreachable("dp-1", Reach::Down, now + UNREACHABLE_HOLD);
        assert!(store.orphans(&view, now).is_empty());
    }

    /// Simulation seeds 94 and 190 (Restart): the standby restarted with the
    /// same node id and came back empty; the owner went on sending it single
    /// pushes and ack points, which it took as a new copy, and a crash of the
    /// owner then lost the pushes it had acknowledged before. An update to a
    /// copy the standby does not hold is refused, so the owner sends the
    /// whole queue (`replicate`, `sync_ack_points`).
    #[test]
    fn a_standby_without_a_copy_refuses_an_incremental_update() {
        let standby = ReplicaStore::new(Duration::from_secs(60), 100);
        let update = |incremental, pushes, session: &str| ReplicateRequest {
            openid: "u1".into(),
            session_id: session.into(),
            zone: "001".into(),
            epoch: 3,
            owner_node: "dp-1".into(),
            pushes,
            acked_seq_id: 3,
            next_seq_id: 7,
            release: false,
            incremental,
            relayed: false,
            owner_since: 0,
        };
        let refused = standby
            .apply(update(true, vec![push(6)], "s1"), 0)
            .expect_err("no copy to add to");
        assert_eq!(refused.code(), tonic::Code::NotFound);
        assert!(!standby.fetch("u1", "s1").found, "nothing kept of it");
        // The whole queue is taken; then single pushes and ack points are.
        standby
            .apply(update(false, vec![push(4), push(5), push(6)], "s1"), 0)
            .expect("a whole copy");
        standby
            .apply(update(true, Vec::new(), "s1"), 0)
            .expect("an ack point");
        // A copy of another session of the openid is not the one updated.
        let other = standby
            .apply(update(true, vec![push(7)], "s2"), 0)
            .expect_err("s2 has no copy here");
        assert_eq!(other.code(), tonic::Code::NotFound);
        assert_eq!(standby.fetch("u1", "s1").pushes.len(), 3);
    }

    /// Simulation seed 174: the owner's standby left in a rolling replacement
    /// and the owner was killed before its next ack sync copied the session's
    /// queue to its new standby; the recovery found nothing of the pushes
    /// acknowledged. A leaving standby now hands what it holds to the owner's
    /// next standby before it goes.
    #[test]
    fn a_leaving_standby_hands_its_replicas_to_the_owners_next_standby() {
        let leaving = ReplicaStore::new(Duration::from_secs(60), 100);
        leaving
            .apply(
                ReplicateRequest {
                    openid: "u1".into(),
                    session_id: "s1".into(),
                    zone: "001".into(),
                    epoch: 3,
                    owner_node: "dp-1".into(),
                    pushes: vec![push(4), push(5)],
                    acked_seq_id: 3,
                    next_seq_id: 6,
                    release: false,
                    incremental: false,
                    relayed: false,
                    owner_since: 0,
                },
                0,
            )
            .expect("applied");
        // The leaving node dp-2 (draining) sees the owner dp-1, a departed
        // dp-0 and the new node dp-4; dp-3 is dead.
        let mut view = Members::new("dp-2");
        view.put(member("dp-0", NodeState::Left));
        view.put(member("dp-1", NodeState::Active));
        view.put(member("dp-2", NodeState::Draining));
        view.put(member("dp-3", NodeState::Dead));
        view.put(member("dp-4", NodeState::Active));
        let handed = sent(Handoff::new(leaving.copies()).next_step(&view, Instant::now()));
        assert_eq!(handed.len(), 1, "one replica, one heir left to take it");
        let (heir, req) = handed.into_iter().next().expect("one");
        assert_eq!(
            heir.node_id, "dp-4",
            "the owner's next active node, not the one leaving"
        );
        let next = ReplicaStore::new(Duration::from_secs(60), 100);
        next.apply(req, 0).expect("applied");
        let got = next.fetch("u1", "s1");
        assert!(got.found);
        assert_eq!(got.epoch, 3);
        assert_eq!(got.acked_seq_id, 3);
        assert_eq!(got.next_seq_id, 6);
        assert_eq!(
            got.pushes.iter().map(|p| p.seq_id).collect::<Vec<_>>(),
            vec![4, 5]
        );

        // The owner itself is gone (dead): its replicas are what a recovery
        // needs, so they are handed on all the same.
        view.put(member("dp-1", NodeState::Dead));
        let handed = sent(Handoff::new(leaving.copies()).next_step(&view, Instant::now()));
        assert_eq!(handed.len(), 1);
        assert_eq!(handed[0].0.node_id, "dp-4");
        // Nobody to hand to: they leave with the node.
        let mut alone = Members::new("dp-2");
        alone.put(member("dp-1", NodeState::Active));
        alone.put(member("dp-2", NodeState::Draining));
        assert!(matches!(
            Handoff::new(leaving.copies()).next_step(&alone, Instant::now()),
            HandoffStep::Done
        ));
    }

    /// Simulation seed 1678 of session 9: the owner restarted empty after a
    /// drain moved a session to it; the copies of its durable pushes were on
    /// four nodes, all draining, and each handed its copy to the same heir
    /// (the owner's next standby), which was killed a moment later. Each
    /// replica now goes to two heirs; a heir that fails is replaced by the
    /// next one; a copy no heir took is sent again to the last that failed,
    /// for [`HANDOFF_ROUNDS`] rounds at most.
    #[test]
    fn a_leaving_node_hands_each_replica_to_two_heirs_and_replaces_one_that_fails() {
        let leaving = ReplicaStore::new(Duration::from_secs(60), 100);
        for openid in ["u1", "u2"] {
            leaving
                .apply(copy_of(openid, &format!("s-{openid}"), vec![push(4)]), 0)
                .expect("applied");
        }
        let mut view = Members::new("dp-2");
        for id in ["dp-1", "dp-3", "dp-4", "dp-5"] {
            view.put(member(id, NodeState::Active));
        }
        view.put(member("dp-2", NodeState::Draining));
        let now = Instant::now();
        let mut plan = Handoff::new(leaving.copies());
        let heirs = |round: &[(Member, ReplicateRequest)], openid: &str| -> Vec<String> {
            round
                .iter()
                .filter(|(_, r)| r.openid == openid)
                .map(|(m, _)| m.node_id.clone())
                .collect()
        };
        let first = sent(plan.next_step(&view, now));
        assert_eq!(
            heirs(&first, "u1"),
            ["dp-3", "dp-4"],
            "the owner's next two"
        );
        assert_eq!(heirs(&first, "u2"), ["dp-3", "dp-4"]);
        // dp-4 took both; dp-3 took u2 and failed u1.
        for (heir, req) in &first {
            let ok = !(heir.node_id == "dp-3" && req.openid == "u1");
            plan.answered(&req.openid, heir, ok);
        }
        let second = sent(plan.next_step(&view, now));
        assert_eq!(heirs(&second, "u1"), ["dp-5"], "the next heir not tried");
        assert!(heirs(&second, "u2").is_empty(), "u2 has its two heirs");
        plan.answered("u1", &second[0].0, false);
        assert!(
            matches!(plan.next_step(&view, now), HandoffStep::Done),
            "u1 is held by dp-4, and no heir is left to try"
        );
        assert_eq!(plan.unplaced(), 0);

        // A copy no heir took goes again to the last that failed, a bounded
        // number of rounds, each after a pause, then leaves with the node.
        let mut alone = Members::new("dp-2");
        alone.put(member("dp-1", NodeState::Active));
        alone.put(member("dp-3", NodeState::Active));
        let mut plan = Handoff::new(leaving.copies());
        let (mut rounds, mut at) = (0, now);
        loop {
            let round = match plan.next_step(&alone, at) {
                HandoffStep::Done => break,
                HandoffStep::WaitUntil(until) => {
                    assert_eq!(until, at + HANDOFF_RETRY_AFTER, "a pause before a retry");
                    at = until;
                    continue;
                }
                HandoffStep::Send(round) => round,
            };
            assert!(round.iter().all(|(m, _)| m.node_id == "dp-3"));
            for (heir, req) in &round {
                plan.answered(&req.openid, heir, false);
            }
            rounds += 1;
            assert!(rounds <= HANDOFF_TRIES, "bounded");
        }
        assert_eq!(rounds, 1 + HANDOFF_ROUNDS, "the first try and its retries");
        assert_eq!(plan.unplaced(), 2, "they leave with the node");
    }

    /// Simulation seed 2209 of session 10: a leaving node's view was behind
    /// (its watch lagged); both heirs it named had left, and it retried them
    /// at once and left with the only copy. A copy no heir took waits for
    /// the view to name a new heir.
    #[test]
    fn a_copy_whose_heirs_all_failed_waits_for_a_view_that_names_a_new_one() {
        let leaving = ReplicaStore::new(Duration::from_secs(60), 100);
        leaving
            .apply(copy_of("u1", "s1", vec![push(4)]), 0)
            .expect("applied");
        let mut view = Members::new("dp-2");
        for id in ["dp-1", "dp-3", "dp-4"] {
            view.put(member(id, NodeState::Active));
        }
        let now = Instant::now();
        let mut plan = Handoff::new(leaving.copies());
        for (heir, req) in sent(plan.next_step(&view, now)) {
            plan.answered(&req.openid, &heir, false);
        }
        let HandoffStep::WaitUntil(until) = plan.next_step(&view, now) else {
            panic!("no retry before the pause");
        };
        // The view catches up: dp-3 and dp-4 left, dp-5 joined.
        view.put(member("dp-3", NodeState::Left));
        view.put(member("dp-4", NodeState::Left));
        view.put(member("dp-5", NodeState::Active));
        let round = sent(plan.next_step(&view, now));
        assert_eq!(round.len(), 1, "a new heir is tried without waiting");
        assert_eq!(round[0].0.node_id, "dp-5");
        plan.answered("u1", &round[0].0, true);
        assert!(matches!(plan.next_step(&view, until), HandoffStep::Done));
        assert_eq!(plan.unplaced(), 0);
    }

    /// A whole copy from owner dp-1 at epoch 3, acked up to 3.
    fn copy_of(openid: &str, session_id: &str, pushes: Vec<ServerPush>) -> ReplicateRequest {
        let next_seq_id = pushes.iter().map(|p| p.seq_id + 1).max().unwrap_or(4);
        ReplicateRequest {
            openid: openid.into(),
            session_id: session_id.into(),
            zone: "001".into(),
            epoch: 3,
            owner_node: "dp-1".into(),
            pushes,
            acked_seq_id: 3,
            next_seq_id,
            release: false,
            incremental: false,
            relayed: false,
            owner_since: 0,
        }
    }

    fn sent(step: HandoffStep) -> Vec<(Member, ReplicateRequest)> {
        match step {
            HandoffStep::Send(round) => round,
            other => panic!("expected a round to send, got {other:?}"),
        }
    }

    #[test]
    fn an_old_owner_keeps_a_replica_of_the_state_it_handed_over() {
        let old_owner = ReplicaStore::new(Duration::from_secs(60), 100);
        let state = SessionState {
            session_id: "s1".into(),
            openid: "u1".into(),
            zone: "001".into(),
            epoch: 4,
            next_seq_id: 4,
            acked_seq_id: 1,
            highest_sent_seq_id: 1,
            pushes: vec![push(2), push(3)],
            ..Default::default()
        };
        old_owner.keep_handed_over(&state, "dp-8", 0);
        let got = old_owner.fetch("u1", "s1");
        assert!(got.found, "the state handed over is held as a replica");
        assert_eq!(
            got.pushes.iter().map(|p| p.seq_id).collect::<Vec<_>>(),
            vec![2, 3]
        );
        // Its owner is the new one: a leaving node hands it to that owner's
        // next standby.
        let mut view = Members::new("dp-7");
        view.put(member("dp-7", NodeState::Draining));
        view.put(member("dp-8", NodeState::Active));
        view.put(member("dp-9", NodeState::Active));
        assert_eq!(
            sent(Handoff::new(old_owner.copies()).next_step(&view, Instant::now()))[0]
                .0
                .node_id,
            "dp-9"
        );
        // A state with nothing unacknowledged leaves nothing.
        let empty = ReplicaStore::new(Duration::from_secs(60), 100);
        empty.keep_handed_over(
            &SessionState {
                pushes: Vec::new(),
                ..state
            },
            "dp-8",
            0,
        );
        assert!(!empty.fetch("u1", "s1").found);
    }
}
