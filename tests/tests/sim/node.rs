//! One simulated data-plane node: the real session table and replica store,
//! and a shell that does with the table's commands what the data plane's
//! shell does (claim, handover, stage, replicate, recover, drain), over the
//! simulated network.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use gatesvr_controlplane::state::{Cmd, CmdResult};
use gatesvr_dataplane::core::{
    AfterHandover, Command, Holding, Lease, Member, PlainCell, PushOutcome, Reach, RequestOutcome,
    SessionCell, Table, TableConfig, Target,
};
use gatesvr_dataplane::replica::{Handoff, HandoffStep, Recovery, ReplicaStore, UNREACHABLE_HOLD};
use gatesvr_dataplane::session::{
    PushMessage, RequestDisposition, Session, SessionConfig, SessionIdentity,
};
use gatesvr_proto::client::{ClientResponse, ErrorCode, ServerPush};
use gatesvr_proto::control::DataPlaneNode;
use gatesvr_proto::peer::{FetchReplicaResponse, ReplicateRequest};
use gatesvr_proto::session::SessionState;
use rand::Rng;

use super::world::{
    Body, DEAD_NODE_ASK_MS, End, Ms, PATIENCE_MS, PEER_TIMEOUT_MS, Timer, Watch, World,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handover,
    Recover,
}

struct PendingStart {
    req: u64,
    client: usize,
    conn: u64,
    session_id: String,
    new_id: String,
    last_acked: u64,
    epoch: u64,
    previous: String,
    phase: Phase,
    give_up: Ms,
    gathered: Vec<FetchReplicaResponse>,
    waiting: HashSet<String>,
    /// The previous owner answered that it has no copy: its own replicas
    /// are asked too (`TakeOver::OwnerEmpty`).
    owner_empty: bool,
    /// Nodes declared dead that were asked too, and until when their answers
    /// are waited for (`Members::recovery_maybe`, `replica::DEAD_NODE_ASK`).
    maybe: HashSet<String>,
    maybe_until: Ms,
    /// The owner the recovery leaves out (`""`: none), and every node it
    /// asked: a view that catches up later adds nodes to ask.
    gone: String,
    asked: HashSet<String>,
}

pub struct SimNode {
    pub incarnation: u64,
    pub alive: bool,
    pub draining: bool,
    pub left: bool,
    pub needs_resync: bool,
    pub watch_tail: Ms,
    pub table: Table<PlainCell>,
    view_owners: HashMap<String, (String, u64)>,
    /// The highest owner epoch the watch delivered (`View::owner_epoch_seen`).
    owner_epoch_seen: u64,
    view_nodes: BTreeMap<String, DataPlaneNode>,
    /// openid -> (client, connection, session handle).
    pub attached: HashMap<String, (usize, u64, PlainCell)>,
    replicas: ReplicaStore,
    starts: HashMap<String, PendingStart>,
    /// Durable pushes waiting for their standby's copy: wait id -> the wait.
    durable: HashMap<u64, DurableWait>,
    stages: HashMap<String, (u64, PlainCell, String, u64)>,
    drain_queue: VecDeque<String>,
    drain_deadline: Ms,
    tracked: HashMap<String, (String, String)>,
    untransferred: Vec<(String, u64, String)>,
    executing: HashMap<(String, u64), PlainCell>,
    table_timer: Option<Ms>,
    /// A leaving node's replica handoff (`replica::hand_over_replicas`): the
    /// copies not answered yet, and until when it waits for them.
    handoff: Option<Handing>,
    /// Whole-queue copies to a new standby in flight: wait id -> (openid,
    /// session id, standby); the standby is the session's once it answered.
    resyncs: HashMap<u64, (String, String, String)>,
    /// The ack points last sent to a session's standby.
    synced: HashMap<String, (u64, u64)>,
    /// Second copies of replicas whose owner left the view, in flight:
    /// wait id -> (openid, session id, heir) (`replica::copy_orphans`).
    orphan_copies: HashMap<u64, (String, String, String)>,
    /// Probes of silent owners in flight: req -> owner
    /// (`replica::probe_silent_owners`).
    probes: HashMap<u64, String>,
    /// This node's control-plane lease (renewed by the world's heartbeats):
    /// durable pushes are acknowledged only while it surely holds.
    pub lease: Lease,
}

/// A leaving node's replica handoff (`replica::hand_over_replicas`).
struct Handing {
    /// The rounds, as the data plane plans them.
    plan: Handoff,
    /// Copies not answered yet: wait id -> (openid, heir).
    pending: HashMap<u64, (String, Member)>,
    /// When the round's unanswered copies count as failed.
    until: Ms,
}

/// A durable push whose copy is on its way to a standby.
struct DurableWait {
    id: u64,
    openid: String,
    standby: String,
    /// Next nodes of the ring tried after the standby did not answer
    /// (`gateway.rs` tries two).
    tries: u8,
}

fn session_config() -> SessionConfig {
    SessionConfig::default()
}

impl SimNode {
    pub fn new(name: &str, incarnation: u64) -> Self {
        let cfg = TableConfig {
            incoming_ttl: Duration::from_millis(PEER_TIMEOUT_MS * 2),
            ..TableConfig::default()
        };
        Self {
            incarnation,
            alive: true,
            draining: false,
            left: false,
            needs_resync: false,
            watch_tail: 0,
            table: Table::new(name, cfg),
            view_owners: HashMap::new(),
            owner_epoch_seen: 0,
            view_nodes: BTreeMap::new(),
            attached: HashMap::new(),
            replicas: ReplicaStore::new(Duration::from_secs(3600), 1024),
            starts: HashMap::new(),
            durable: HashMap::new(),
            stages: HashMap::new(),
            drain_queue: VecDeque::new(),
            drain_deadline: 0,
            tracked: HashMap::new(),
            untransferred: Vec::new(),
            executing: HashMap::new(),
            table_timer: None,
            handoff: None,
            resyncs: HashMap::new(),
            synced: HashMap::new(),
            orphan_copies: HashMap::new(),
            probes: HashMap::new(),
            lease: Lease::default(),
        }
    }

    fn owner(&self, openid: &str) -> Option<(&str, u64)> {
        self.view_owners.get(openid).map(|(n, e)| (n.as_str(), *e))
    }
}

fn import(state: SessionState, w: &World) -> Option<PlainCell> {
    Session::import(state, w.instant(), session_config())
        .ok()
        .map(PlainCell::new)
}

impl World {
    fn node(&mut self, name: &str) -> &mut SimNode {
        // Only called for a node that `dispatch` found alive.
        self.nodes.get_mut(name).expect("node exists")
    }

    pub fn node_event(&mut self, name: &str, from: End, body: Body) -> Result<(), String> {
        match body {
            Body::Start {
                conn,
                openid,
                session_id,
                last_acked,
            } => {
                if let End::Client(c) = from {
                    self.on_start(name, c, conn, openid, session_id, last_acked);
                }
            }
            Body::HandoverReply { openid, req, state } => {
                self.on_handover_reply(name, &openid, req, state.map(|s| *s))
            }
            Body::Handover { openid, epoch, req } => {
                if let End::Node(asker) = from {
                    self.on_handover(name, &asker, &openid, epoch, req);
                }
            }
            Body::Bounce { to_node, original } => self.on_bounce(name, &to_node, *original),
            Body::Probe { req } => {
                if let End::Node(asker) = from {
                    self.send(
                        End::Node(name.into()),
                        End::Node(asker),
                        Body::ProbeReply { req },
                    );
                }
            }
            Body::ProbeReply { req } => {
                let now = self.instant();
                let node = self.node(name);
                if let Some(owner) = node.probes.remove(&req) {
                    node.replicas.heard_from(&owner, now);
                    node.table.members_mut().answered(&owner);
                }
            }
            Body::FetchReplica {
                openid,
                session_id,
                req,
            } => {
                let now = self.instant();
                let node = self.node(name);
                let replica = node.replicas.fetch(&openid, &session_id);
                let (copy, cmds) = node.table.copy_for_recovery(now, &openid, &session_id);
                let resp = gatesvr_dataplane::core::recovery::with_copy(replica, copy.as_ref());
                self.carry(name, cmds);
                let line = format!(
                    "{name} answers {from:?} for \"{openid}\" {session_id} (req {req}): pushes {:?}",
                    resp.pushes.iter().map(|p| p.seq_id).collect::<Vec<_>>()
                );
                self.trace(line);
                if let End::Node(asker) = from {
                    self.send(
                        End::Node(name.into()),
                        End::Node(asker),
                        Body::FetchReply {
                            req,
                            resp: Box::new(resp),
                        },
                    );
                }
            }
            Body::FetchReply { req, resp } => {
                if let End::Node(from) = from {
                    self.on_fetch_reply(name, &from, req, *resp);
                }
            }
            Body::Ack {
                openid,
                session_id,
                seq,
            } => {
                let now = self.instant();
                let node = self.node(name);
                if let Some((_, _, h)) = node.attached.get(&openid).cloned()
                    && h.identity().session_id == session_id
                {
                    let _ = node.table.ack(now, &h, seq);
                }
            }
            Body::Request {
                conn,
                openid,
                session_id,
                seq,
            } => self.on_request(name, conn, &openid, &session_id, seq)?,
            Body::UpPush { .. } => self.on_up_push(name, body)?,
            Body::Replicate { req, wait } => {
                let line = format!(
                    "{name} replica of \"{}\" {} epoch {} acked {} pushes {:?}",
                    req.openid,
                    req.session_id,
                    req.epoch,
                    req.acked_seq_id,
                    req.pushes.iter().map(|p| p.seq_id).collect::<Vec<_>>()
                );
                self.trace(line);
                let (openid, session_id) = (req.openid.clone(), req.session_id.clone());
                let now = self.instant();
                let node = self.node(name);
                let owner_since = node
                    .table
                    .members()
                    .get(&req.owner_node)
                    .map_or(0, |o| o.registered_at_ms);
                if !req.relayed {
                    node.replicas.heard_from(&req.owner_node, now);
                }
                let original = node.replicas.sealed().then(|| req.clone());
                let applied = node.replicas.apply(*req, owner_since);
                let missing = applied
                    .as_ref()
                    .is_err_and(|e| e.code() == tonic::Code::NotFound);
                // As `Peer.Replicate`'s UNAVAILABLE: this node planned its
                // handoff and takes no more copies; the sender goes on as if
                // nothing listened here.
                let leaving = applied
                    .as_ref()
                    .is_err_and(|e| e.code() == tonic::Code::Unavailable);
                match (wait, from, original) {
                    (_, End::Node(sender), Some(req)) if leaving => self.send(
                        End::Node(name.into()),
                        End::Node(sender),
                        Body::Bounce {
                            to_node: name.into(),
                            original: Box::new(Body::Replicate { req, wait }),
                        },
                    ),
                    (wait, End::Node(owner), _) if missing => self.send(
                        End::Node(name.into()),
                        End::Node(owner),
                        Body::ReplicateMissing {
                            openid,
                            session_id,
                            wait,
                        },
                    ),
                    (Some(wait), End::Node(owner), _) => self.send(
                        End::Node(name.into()),
                        End::Node(owner),
                        Body::ReplicateAck {
                            wait,
                            ok: applied.is_ok(),
                        },
                    ),
                    _ => {}
                }
            }
            Body::ReplicateMissing {
                openid,
                session_id,
                wait,
            } => {
                // As `replica::copy_lost` and `replica::replicate`: the
                // session is new to that standby again; a durable push's copy
                // goes again as the whole queue, and the sync resends the
                // rest.
                let node = self.node(name);
                if let Some((s, st)) = node.tracked.get_mut(&openid)
                    && *s == session_id
                {
                    st.clear();
                }
                self.timer(name, 0, Timer::MovedOn);
                if let Some(d) = wait.and_then(|w| self.node(name).durable.remove(&w)) {
                    let to = d.standby.clone();
                    self.copy_whole(name, d, Some(to));
                }
            }
            Body::ReplicateAck { wait, ok } => {
                let now = self.instant();
                let node = self.node(name);
                if let Some(h) = &mut node.handoff
                    && let Some((openid, heir)) = h.pending.remove(&wait)
                {
                    h.plan.answered(&openid, &heir, ok);
                }
                if let Some((openid, sid, standby)) = node.resyncs.remove(&wait)
                    && ok
                    && node.tracked.get(&openid).is_some_and(|(s, _)| *s == sid)
                {
                    node.tracked.insert(openid, (sid, standby));
                }
                if let Some((openid, sid, heir)) = node.orphan_copies.remove(&wait)
                    && ok
                {
                    node.replicas.copied(&openid, &sid, &heir);
                }
                if let Some(d) = node.durable.remove(&wait) {
                    // The lease is checked again when the answer is given:
                    // it may have lapsed while the copy travelled.
                    let ok = ok && node.lease.check(now).is_ok();
                    self.reply_up(d.id, d.openid, true, ok);
                }
            }
            Body::Stage { state, epoch, req } => {
                let openid = state.openid.clone();
                let ok = match import(*state, self) {
                    Some(cell) => {
                        let node = self.node(name);
                        let owner = node.owner(&openid).map(|(n, e)| (n.to_string(), e));
                        let from_node = match &from {
                            End::Node(n) => n.clone(),
                            _ => String::new(),
                        };
                        let r = node.table.install(
                            cell,
                            epoch,
                            Holding::Staged { from: from_node },
                            owner.as_ref().map(|(n, e)| (n.as_str(), *e)),
                        );
                        match r {
                            Ok(cmds) => {
                                self.carry(name, cmds);
                                true
                            }
                            Err(gatesvr_dataplane::core::InstallError::AlreadyHere { .. }) => true,
                            Err(_) => false,
                        }
                    }
                    None => false,
                };
                if let End::Node(drainer) = from {
                    self.send(
                        End::Node(name.into()),
                        End::Node(drainer),
                        Body::StageAck { openid, req, ok },
                    );
                }
            }
            Body::StageAck { openid, req, ok } => self.on_stage_ack(name, &openid, req, ok),
            Body::Watch(w) => self.on_watch(name, w),
            Body::Timer(t) => self.on_timer(name, t)?,
            _ => {}
        }
        self.arm_table_timer(name);
        Ok(())
    }

    fn arm_table_timer(&mut self, name: &str) {
        let base = self.base;
        let now = self.now;
        let node = self.node(name);
        let Some(at) = node.table.poll_timeout() else {
            return;
        };
        let at_ms = (at.saturating_duration_since(base).as_millis() as Ms).max(now);
        if node.table_timer.is_some_and(|t| t <= at_ms && t >= now) {
            return;
        }
        node.table_timer = Some(at_ms);
        self.timer(name, at_ms - now, Timer::Table);
    }

    /// Carries out the table's commands.
    fn carry(&mut self, name: &str, commands: Vec<Command<PlainCell>>) {
        for c in commands {
            match c {
                Command::Wake(h) => self.pump(name, &h.identity().openid.clone()),
                Command::Close { handle, .. } => self.close_client(name, &handle),
                Command::Removed { .. } => {}
            }
        }
    }

    fn close_client(&mut self, name: &str, handle: &PlainCell) {
        let now = self.instant();
        let openid = handle.identity().openid.clone();
        let node = self.node(name);
        if let Some((client, conn, h)) = node.attached.get(&openid).cloned()
            && h.same(handle)
        {
            node.attached.remove(&openid);
            node.table.detach(now, &h);
            self.send(
                End::Node(name.into()),
                End::Client(client),
                Body::Closed { conn },
            );
        }
    }

    /// Sends the pushes the attached session has ready.
    fn pump(&mut self, name: &str, openid: &str) {
        let now = self.instant();
        let node = self.node(name);
        let Some((client, conn, h)) = node.attached.get(openid).cloned() else {
            return;
        };
        let mut out = Vec::new();
        while let Some(p) = node.table.poll_transmit(now, &h) {
            out.push(p);
        }
        for push in out {
            self.send(
                End::Node(name.into()),
                End::Client(client),
                Body::Push { conn, push },
            );
        }
    }

    // ----- Start -----

    fn on_start(
        &mut self,
        name: &str,
        client: usize,
        conn: u64,
        openid: String,
        session_id: String,
        last_acked: u64,
    ) {
        let node = self.node(name);
        if node.draining || !self.cp_reachable(name) {
            // Draining, or no claim possible (the sim has no provisional
            // sessions): the client goes elsewhere or tries later.
            self.send(
                End::Node(name.into()),
                End::Client(client),
                Body::Refused { conn },
            );
            return;
        }
        let new_id = format!("s{}", self.id());
        let claimed = if session_id.is_empty() {
            new_id.clone()
        } else {
            session_id.clone()
        };
        // As `connection::claim_ownership`: before the claim goes out.
        self.node(name).table.claim_begins(&openid);
        // As `connection::claim_ownership`: a resume records the fresh id too.
        let fresh_session_id = if session_id.is_empty() {
            String::new()
        } else {
            new_id.clone()
        };
        let r = self.cp_apply(Cmd::Claim {
            node_id: name.into(),
            openid: openid.clone(),
            session_id: claimed,
            fresh_session_id,
        });
        let CmdResult::Owned {
            owner,
            previous_owner,
            ..
        } = r
        else {
            self.node(name).table.end_incoming(&openid);
            self.send(
                End::Node(name.into()),
                End::Client(client),
                Body::Refused { conn },
            );
            return;
        };
        let epoch = owner.epoch;
        let node = self.node(name);
        // The claim's answer is recorded at once (pushes route right), as
        // `Cluster::claim` does.
        if node
            .view_owners
            .get(&openid)
            .is_none_or(|(_, e)| *e < epoch)
        {
            node.view_owners
                .insert(openid.clone(), (name.to_string(), epoch));
        }
        // The rest is a later step: pushes and watch deltas may land first.
        let after = self.rng.random_range(1..=10);
        self.timer(
            name,
            after,
            Timer::ClaimAnswered {
                client,
                conn,
                openid,
                session_id,
                new_id,
                last_acked,
                epoch,
                previous: previous_owner,
            },
        );
    }

    /// The claim answered (a step after it was sent): as the shell, pushes
    /// wait for the previous owner's state, then the Handover.
    #[allow(clippy::too_many_arguments)]
    fn on_claim_answered(
        &mut self,
        name: &str,
        client: usize,
        conn: u64,
        openid: String,
        session_id: String,
        new_id: String,
        last_acked: u64,
        epoch: u64,
        previous_owner: Option<String>,
    ) {
        let now = self.instant();
        let node = self.node(name);
        // As `connection::claim_ownership`: the control plane names no other
        // node, but this node knows nothing of the session it resumes: an
        // earlier life of this node (a restart with the same node id) held
        // it, and it survives only as replicas.
        let earlier_life = !session_id.is_empty() && !node.table.knows(&openid);
        let previous_owner = previous_owner
            .filter(|p| p != name)
            .or_else(|| earlier_life.then(|| name.to_string()));
        if previous_owner.is_some() {
            node.table.begin_incoming(now, &openid);
        }
        let cmds = node.table.owner_changed(now, &openid, name, epoch);
        self.carry(name, cmds);
        let req = self.id();
        let mut pending = PendingStart {
            req,
            client,
            conn,
            session_id,
            new_id,
            last_acked,
            epoch,
            previous: String::new(),
            phase: Phase::Handover,
            give_up: self.now + PATIENCE_MS,
            gathered: Vec::new(),
            waiting: HashSet::new(),
            owner_empty: false,
            maybe: HashSet::new(),
            maybe_until: 0,
            gone: String::new(),
            asked: HashSet::new(),
        };
        match previous_owner {
            Some(previous) if previous == name => {
                pending.previous = previous;
                self.node(name).starts.insert(openid.clone(), pending);
                self.handover_failed(name, &openid, req, name, Reach::Down);
            }
            Some(previous) => {
                pending.previous = previous.clone();
                let node = self.node(name);
                node.table.begin_incoming(now, &openid);
                node.starts.insert(openid.clone(), pending);
                self.send(
                    End::Node(name.into()),
                    End::Node(previous),
                    Body::Handover {
                        openid: openid.clone(),
                        epoch,
                        req,
                    },
                );
                self.timer(name, PEER_TIMEOUT_MS, Timer::StartDeadline { openid, req });
            }
            None => self.finish_start(name, &openid, pending, None),
        }
    }

    fn on_handover(&mut self, name: &str, asker: &str, openid: &str, epoch: u64, req: u64) {
        let now = self.instant();
        let node = self.node(name);
        let r = node.table.hand_over(
            now,
            openid,
            gatesvr_dataplane::core::HandoverAsk::Peer {
                epoch,
                new_owner: asker.into(),
            },
        );
        let line = match &r {
            Ok(Some((s, _))) => format!(
                "{name} hands \"{openid}\" over to {asker} at epoch {epoch}: {} pushes {:?}",
                s.session_id,
                s.pushes.iter().map(|p| p.seq_id).collect::<Vec<_>>()
            ),
            other => format!("{name} hands \"{openid}\" over to {asker}: {other:?}"),
        };
        self.trace(line);
        let state = match r {
            Ok(Some((state, handle))) => {
                if let Some(h) = handle {
                    self.close_client(name, &h);
                }
                // As peer.rs: held here too until the new owner's standby
                // has it.
                let node = self.node(name);
                let since = node.table.members().registered_at(asker);
                node.replicas.keep_handed_over(&state, asker, since);
                Some(Box::new(state))
            }
            _ => None,
        };
        self.send(
            End::Node(name.into()),
            End::Node(asker.into()),
            Body::HandoverReply {
                openid: openid.into(),
                req,
                state,
            },
        );
    }

    fn on_handover_reply(
        &mut self,
        name: &str,
        openid: &str,
        req: u64,
        state: Option<SessionState>,
    ) {
        let node = self.node(name);
        let Some(mut p) = node.starts.remove(openid) else {
            return;
        };
        if p.req != req || p.phase != Phase::Handover {
            self.node(name).starts.insert(openid.into(), p);
            return;
        }
        // As peer.rs: the owner the control plane names has no copy (it
        // restarted empty): gathered from replicas and unserved copies as
        // for a crashed owner.
        if state.is_none() && !p.session_id.is_empty() && p.epoch != 0 {
            let owner = p.previous.clone();
            p.owner_empty = true;
            self.node(name).starts.insert(openid.into(), p);
            self.handover_failed(name, openid, req, &owner, Reach::Down);
            return;
        }
        if let Some(state) = state
            && let Some(cell) = import(state, self)
        {
            let node = self.node(name);
            let owner = node.owner(openid).map(|(n, e)| (n.to_string(), e));
            match node.table.install(
                cell,
                p.epoch,
                Holding::Owned,
                owner.as_ref().map(|(n, e)| (n.as_str(), *e)),
            ) {
                Ok(cmds) => {
                    self.carry(name, cmds);
                    self.copy_soon(name, openid);
                }
                Err(e) => {
                    let line = format!("{name} could not install \"{openid}\": {e}");
                    self.trace(line);
                }
            }
        }
        self.node(name).table.end_incoming(openid);
        self.finish_start(name, openid, p, None);
    }

    fn on_bounce(&mut self, name: &str, to_node: &str, original: Body) {
        match original {
            Body::Handover { openid, req, .. } => {
                self.handover_failed(name, &openid, req, to_node, Reach::Down)
            }
            Body::Replicate { wait, .. } => {
                // As `replica::standby_unreachable`: passed over from now on,
                // and the sessions it held copies of go to the next node now.
                self.standby_unreachable(name, to_node, Reach::Down);
                let Some(w) = wait else { return };
                self.node(name).orphan_copies.remove(&w);
                if let Some(h) = &mut self.node(name).handoff
                    && let Some((openid, heir)) = h.pending.remove(&w)
                {
                    h.plan.answered(&openid, &heir, false);
                }
                if let Some(d) = self.node(name).durable.remove(&w) {
                    self.copy_to_next(name, d);
                }
            }
            Body::Stage { state, req, .. } => self.on_stage_ack(name, &state.openid, req, false),
            Body::Probe { req } => self.owner_unreachable(name, req, Reach::Down),
            Body::FetchReplica { req, .. } => {
                self.reask_after_departure(name, to_node, req);
                self.on_fetch_reply(name, to_node, req, FetchReplicaResponse::default())
            }
            Body::UpPush {
                id,
                openid,
                durable,
                ..
            } => self.reply_up(id, openid, durable, false),
            _ => {}
        }
    }

    /// Probes the owners this node holds replicas for and stopped hearing
    /// from (`replica::probe_silent_owners`).
    fn probe_silent_owners(&mut self, name: &str) {
        let now = self.instant();
        let due = self.node(name).replicas.owners_to_probe(now);
        for owner in due {
            if self.node(name).table.members().live(&owner).is_none() {
                continue;
            }
            let req = self.id();
            self.node(name).probes.insert(req, owner.clone());
            self.send(
                End::Node(name.into()),
                End::Node(owner),
                Body::Probe { req },
            );
            self.timer(name, PEER_TIMEOUT_MS, Timer::ProbeDeadline { req });
        }
    }

    /// Probe `req` found its owner unreachable: marked so (its replicas are
    /// orphans now), and the copies go out at once (`Timer::MovedOn`).
    fn owner_unreachable(&mut self, name: &str, req: u64, reach: Reach) {
        let Some(owner) = self.node(name).probes.remove(&req) else {
            return;
        };
        let until = self.instant() + UNREACHABLE_HOLD;
        self.node(name)
            .table
            .members_mut()
            .mark_unreachable(&owner, reach, until);
        self.trace(format!(
            "{name}'s probe found owner \"{owner}\" unreachable"
        ));
        self.timer(name, 0, Timer::MovedOn);
    }

    /// A call found `standby` unreachable (`replica::standby_unreachable`).
    fn standby_unreachable(&mut self, name: &str, standby: &str, reach: Reach) {
        let until = self.instant() + UNREACHABLE_HOLD;
        self.node(name)
            .table
            .members_mut()
            .mark_unreachable(standby, reach, until);
        self.trace(format!("{name} found {standby} unreachable"));
        self.timer(name, 0, Timer::MovedOn);
    }

    /// As `gateway.rs`'s `replicate`: the standby did not take a durable
    /// push's copy; the next node of the ring gets the session's whole queue
    /// (it is new to the session), up to two of them, else the push fails.
    fn copy_to_next(&mut self, name: &str, d: DurableWait) {
        let now = self.instant();
        let next = self
            .node(name)
            .table
            .members()
            .standby_ring(now)
            .into_iter()
            .map(|m| m.node_id.clone())
            .find(|n| *n != d.standby)
            .filter(|_| d.tries < 2);
        let retry = d.tries + 1;
        self.copy_whole(name, DurableWait { tries: retry, ..d }, next);
    }

    /// Sends the session's whole queue to `to` for a durable push waiting
    /// for its copy (the push fails when there is nobody to send it to).
    fn copy_whole(&mut self, name: &str, mut d: DurableWait, to: Option<String>) {
        let handle = self.node(name).table.local(&d.openid).cloned();
        let (Some(to), Some(handle)) = (to, handle) else {
            self.reply_up(d.id, d.openid, true, false);
            return;
        };
        let pushes = handle.with(|s| s.export().pushes);
        let req = copy_of(name, &handle, pushes, false);
        d.standby = to;
        self.send_durable_copy(name, d, handle.identity().session_id.clone(), req);
    }

    /// Sends a durable push's copy (`req`) to `d.standby`, which is the
    /// session's standby from now on; the push is answered when it acks.
    fn send_durable_copy(
        &mut self,
        name: &str,
        d: DurableWait,
        session_id: String,
        req: ReplicateRequest,
    ) {
        let wait = self.id();
        let to = d.standby.clone();
        let node = self.node(name);
        node.tracked
            .insert(d.openid.clone(), (session_id, to.clone()));
        node.durable.insert(wait, d);
        self.send(
            End::Node(name.into()),
            End::Node(to),
            Body::Replicate {
                req: Box::new(req),
                wait: Some(wait),
            },
        );
        self.timer(name, PEER_TIMEOUT_MS, Timer::ReplicateDeadline { wait });
    }

    /// The previous owner did not answer the handover: the core's members
    /// decide what its silence means.
    fn handover_failed(&mut self, name: &str, openid: &str, req: u64, owner: &str, reach: Reach) {
        let node = self.node(name);
        let Some(mut p) = node.starts.remove(openid) else {
            return;
        };
        if p.req != req || p.phase != Phase::Handover {
            node.starts.insert(openid.into(), p);
            return;
        }
        let held_here = node.table.holds(openid, &p.session_id);
        match node.table.members().after_failed_handover(owner, reach) {
            after @ (AfterHandover::OwnerGone | AfterHandover::OwnerDeclaredDead)
                if !p.session_id.is_empty() && !held_here =>
            {
                p.phase = Phase::Recover;
                let asked_too = p.owner_empty || after == AfterHandover::OwnerDeclaredDead;
                let gone = if asked_too { "" } else { owner };
                let sources: Vec<String> = node
                    .table
                    .members()
                    .recovery_sources(gone)
                    .into_iter()
                    .map(|m| m.node_id.clone())
                    .collect();
                let maybe: Vec<String> = node
                    .table
                    .members()
                    .recovery_maybe(gone)
                    .into_iter()
                    .map(|m| m.node_id.clone())
                    .collect();
                // This node's replica and its own unserved copy (a staged
                // copy the view never named), as `replica::merge` does.
                let own = node.replicas.fetch(openid, &p.session_id);
                let now = self.instant();
                let node = self.node(name);
                let (copy, cmds) = node.table.copy_for_recovery(now, openid, &p.session_id);
                p.gathered
                    .push(gatesvr_dataplane::core::recovery::with_copy(
                        own,
                        copy.as_ref(),
                    ));
                self.carry(name, cmds);
                p.waiting = sources.iter().cloned().collect();
                p.maybe = maybe.iter().cloned().collect();
                p.maybe_until = self.now + DEAD_NODE_ASK_MS;
                p.gone = gone.to_string();
                p.asked = p.waiting.union(&p.maybe).cloned().collect();
                p.req = self.id();
                let (req, sid) = (p.req, p.session_id.clone());
                let done = p.waiting.is_empty() && p.maybe.is_empty();
                self.node(name).starts.insert(openid.into(), p);
                if done {
                    let now = self.now;
                    self.recover_check(name, req, now);
                    return;
                }
                self.ask_for_replicas(name, openid, &sid, req, sources.into_iter().chain(maybe));
                self.timer(name, DEAD_NODE_ASK_MS, Timer::RecoverCheck { req });
                self.timer(
                    name,
                    PEER_TIMEOUT_MS,
                    Timer::StartDeadline {
                        openid: openid.into(),
                        req,
                    },
                );
            }
            AfterHandover::OwnerSilent if self.now < p.give_up => {
                // Ask again: only its lease tells a silent owner from a dead one.
                p.req = self.id();
                let (req, epoch) = (p.req, p.epoch);
                self.node(name).starts.insert(openid.into(), p);
                self.send(
                    End::Node(name.into()),
                    End::Node(owner.into()),
                    Body::Handover {
                        openid: openid.into(),
                        epoch,
                        req,
                    },
                );
                self.timer(
                    name,
                    PEER_TIMEOUT_MS,
                    Timer::StartDeadline {
                        openid: openid.into(),
                        req,
                    },
                );
            }
            _ => {
                // The owner never answered: a staged copy here may be stale
                // (a late Stage of a staging its drainer took back); the Start
                // does not resume from it (as `peer::take_over`).
                let now = self.instant();
                let node = self.node(name);
                let (_, cmds) = node.table.copy_for_recovery(now, openid, &p.session_id);
                node.table.end_incoming(openid);
                self.carry(name, cmds);
                self.finish_start(name, openid, p, None);
            }
        }
    }

    fn on_fetch_reply(&mut self, name: &str, from: &str, req: u64, resp: FetchReplicaResponse) {
        let node = self.node(name);
        let Some(p) = node
            .starts
            .get_mut(openid_of(&node.starts, req).as_deref().unwrap_or(""))
        else {
            return;
        };
        if p.phase != Phase::Recover || !(p.waiting.remove(from) || p.maybe.remove(from)) {
            return;
        }
        p.gathered.push(resp);
        let now = self.now;
        self.recover_check(name, req, now);
    }

    /// Sends `nodes` a FetchReplica of `openid`'s session `session_id` for
    /// the recovery `req`.
    fn ask_for_replicas(
        &mut self,
        name: &str,
        openid: &str,
        session_id: &str,
        req: u64,
        nodes: impl IntoIterator<Item = String>,
    ) {
        for n in nodes {
            let line =
                format!("{name} asks {n} for replicas of \"{openid}\" {session_id} (req {req})");
            self.trace(line);
            self.send(
                End::Node(name.into()),
                End::Node(n),
                Body::FetchReplica {
                    openid: openid.into(),
                    session_id: session_id.into(),
                    req,
                },
            );
        }
    }

    /// As `peer::recover`: a node a recovery was waiting for is gone. If it
    /// was leaving, it handed its replicas to other nodes, which may have
    /// answered "nothing" before the copy reached them (simulation seed 354
    /// of session 8): every live node that answered is asked again.
    fn reask_after_departure(&mut self, name: &str, gone_node: &str, req: u64) {
        let node = self.node(name);
        let Some(openid) = openid_of(&node.starts, req) else {
            return;
        };
        let Some(p) = node.starts.get(&openid) else {
            return;
        };
        // Only a node gone from this node's view (it left); one that crashed
        // while the view still shows it is not waited on again either way.
        if p.phase != Phase::Recover
            || !p.waiting.contains(gone_node)
            || node.table.members().is_live(gone_node)
        {
            return;
        }
        let gone = if p.owner_empty {
            ""
        } else {
            p.previous.as_str()
        };
        let again: Vec<String> = node
            .table
            .members()
            .recovery_sources(gone)
            .into_iter()
            .map(|m| m.node_id.clone())
            .filter(|n| n != gone_node && !p.waiting.contains(n))
            .collect();
        let sid = p.session_id.clone();
        if let Some(p) = self.node(name).starts.get_mut(&openid) {
            p.waiting.extend(again.iter().cloned());
        }
        self.ask_for_replicas(name, &openid, &sid, req, again);
    }

    /// As `replica::fetch_recovery` and `peer::recover`: done once every
    /// live node answered, the nodes declared dead answered or their short
    /// wait ended, and the view caught up with the claim
    /// (`Cluster::view_reached`), asking the nodes a later view adds; or
    /// when the patience ends.
    fn recover_check(&mut self, name: &str, req: u64, now: Ms) {
        let node = self.node(name);
        let Some(openid) = openid_of(&node.starts, req) else {
            return;
        };
        let Some(p) = node.starts.get(&openid) else {
            return;
        };
        if p.phase != Phase::Recover {
            return;
        }
        if now >= p.give_up {
            self.finish_recovery(name, &openid);
            return;
        }
        let answered = p.waiting.is_empty() && (p.maybe.is_empty() || now >= p.maybe_until);
        if !answered {
            return;
        }
        let added: Vec<String> = node
            .table
            .members()
            .recovery_sources(&p.gone)
            .into_iter()
            .map(|m| m.node_id.clone())
            .filter(|n| !p.asked.contains(n))
            .collect();
        if added.is_empty() && node.owner_epoch_seen >= p.epoch {
            self.finish_recovery(name, &openid);
            return;
        }
        let sid = p.session_id.clone();
        if let Some(p) = self.node(name).starts.get_mut(&openid) {
            p.waiting.extend(added.iter().cloned());
            p.asked.extend(added.iter().cloned());
        }
        if !added.is_empty() {
            let line = format!("{name} asks nodes its view added since the claim: {added:?}");
            self.trace(line);
        }
        self.ask_for_replicas(name, &openid, &sid, req, added);
        self.timer(name, 100, Timer::RecoverCheck { req });
    }

    /// Merges the replicas gathered (as `replica::merge` does) and rebuilds
    /// the session for the Start.
    fn finish_recovery(&mut self, name: &str, openid: &str) {
        let node = self.node(name);
        let Some(p) = node.starts.remove(openid) else {
            return;
        };
        let found: Vec<&FetchReplicaResponse> = p.gathered.iter().filter(|r| r.found).collect();
        let line = format!(
            "{name} recovers \"{openid}\" {} from {} replicas: {:?}",
            p.session_id,
            found.len(),
            found
                .iter()
                .map(|r| (
                    r.acked_seq_id,
                    r.next_seq_id,
                    r.pushes.iter().map(|p| p.seq_id).collect::<Vec<_>>()
                ))
                .collect::<Vec<_>>()
        );
        self.trace(line);
        let mut rebuilt = None;
        // Patience ran out with a live node silent, or before the view
        // caught up with the claim: a copy may be missing, and the client is
        // told so (as `peer::recover`).
        let incomplete = !p.waiting.is_empty() || self.node(name).owner_epoch_seen < p.epoch;
        if let Some(mut recovery) = Recovery::merge(&p.session_id, p.gathered.iter().cloned()) {
            recovery.incomplete = incomplete;
            let (state, _lost) = recovery.rebuild(openid, p.new_id.clone(), p.last_acked);
            if let Some(cell) = import(state, self) {
                let node = self.node(name);
                if let Ok(cmds) = node.table.install(cell, p.epoch, Holding::Owned, None) {
                    self.carry(name, cmds);
                    self.copy_soon(name, openid);
                    rebuilt = Some(());
                }
            }
        }
        self.node(name).table.end_incoming(openid);
        self.finish_start(name, openid, p, rebuilt);
    }

    /// Attaches the client, as `Registry::start` does.
    fn finish_start(&mut self, name: &str, openid: &str, p: PendingStart, _rebuilt: Option<()>) {
        let now = self.instant();
        let node = self.node(name);
        let (handle, outcome, cmds) =
            node.table
                .start_session(now, openid, &p.session_id, p.last_acked, || {
                    fresh(openid, &p.new_id, now)
                });
        let status = outcome.status;
        self.carry(name, cmds);
        let node = self.node(name);
        let owner = node.owner(openid).map(|(n, e)| (n.to_string(), e));
        let cmds = node.table.claimed(
            now,
            &handle,
            p.epoch,
            owner.as_ref().map(|(n, e)| (n.as_str(), *e)),
        );
        node.table.rearm(&handle);
        if let Some((old_client, old_conn, _)) = node
            .attached
            .insert(openid.into(), (p.client, p.conn, handle.clone()))
            && (old_client, old_conn) != (p.client, p.conn)
        {
            self.send(
                End::Node(name.into()),
                End::Client(old_client),
                Body::Closed { conn: old_conn },
            );
        }
        self.send(
            End::Node(name.into()),
            End::Client(p.client),
            Body::Started {
                conn: p.conn,
                session_id: handle.identity().session_id.clone(),
                status,
            },
        );
        self.carry(name, cmds);
        self.pump(name, openid);
    }

    // ----- requests -----

    fn on_request(
        &mut self,
        name: &str,
        conn: u64,
        openid: &str,
        session_id: &str,
        seq: u64,
    ) -> Result<(), String> {
        let node = self.node(name);
        let Some((client, c, h)) = node.attached.get(openid).cloned() else {
            return Ok(());
        };
        if c != conn || h.identity().session_id != session_id {
            return Ok(());
        }
        let answer = match node.table.begin_request(&h, seq) {
            RequestOutcome::Here(RequestDisposition::Execute) => {
                node.executing.insert((session_id.into(), seq), h.clone());
                self.checks.executed(session_id, seq)?;
                let after = self.rng.random_range(5..=60);
                self.timer(
                    name,
                    after,
                    Timer::Complete {
                        openid: openid.into(),
                        session_id: session_id.into(),
                        seq,
                    },
                );
                None
            }
            RequestOutcome::Here(RequestDisposition::Cached(r)) => {
                Some(ErrorCode::try_from(r.code).unwrap_or(ErrorCode::Internal))
            }
            RequestOutcome::Here(RequestDisposition::InFlight) => None,
            RequestOutcome::Here(_) => Some(ErrorCode::TooManyInflight),
            RequestOutcome::NotHere => Some(ErrorCode::Draining),
        };
        if let Some(code) = answer {
            self.send(
                End::Node(name.into()),
                End::Client(client),
                Body::Answer {
                    session_id: session_id.into(),
                    seq,
                    code,
                },
            );
        }
        Ok(())
    }

    // ----- pushes -----

    fn on_up_push(&mut self, name: &str, body: Body) -> Result<(), String> {
        let Body::UpPush {
            id,
            openid,
            durable,
            hops,
            size,
            give_up,
        } = body.clone()
        else {
            return Ok(());
        };
        let now = self.instant();
        let node = self.node(name);
        let owner = node.owner(&openid).map(|(n, e)| (n.to_string(), e));
        let standby = node
            .table
            .members()
            .standby_for(now)
            .map(|m| m.node_id.clone());
        // As `gateway.rs`: no standby, or a lease that may have lapsed (the
        // control plane may have declared this node dead and a claimant be
        // recovering its sessions from replicas): refused before queueing.
        if durable
            && node.table.local(&openid).is_some()
            && (standby.is_none() || node.lease.check(now).is_err())
        {
            self.reply_up(id, openid, durable, false);
            return Ok(());
        }
        let msg = PushMessage {
            content: id.to_string(),
            data: bytes::Bytes::from(vec![0u8; size]),
            ..Default::default()
        };
        let (outcome, cmds) = node.table.push(
            now,
            Target::Openid(&openid),
            msg,
            owner
                .as_ref()
                .filter(|_| hops == 0)
                .map(|(n, e)| (n.as_str(), *e)),
        );
        self.carry(name, cmds);
        match outcome {
            PushOutcome::Queued { seq_id, handle, .. } => {
                // Fenced writes are refused: never queued on a copy older
                // than what this node's view shows.
                let epoch = handle.with(|s| s.epoch());
                if let Some((o, e)) = &owner
                    && o != name
                    && *e > epoch
                {
                    return Err(format!(
                        "{name} queued push {id} for {openid} at epoch {epoch} while its view shows {o} at {e}"
                    ));
                }
                let line = format!(
                    "{name} queued push {id} for \"{openid}\" as seq {seq_id} of {} at epoch {epoch}",
                    handle.identity().session_id
                );
                self.trace(line);
                self.pump(name, &openid);
                match (durable, standby) {
                    (true, Some(standby)) => {
                        let export = handle.with(|s| s.export().pushes);
                        // As `replica::replicate`: a standby new to the
                        // session gets its whole queue, not only this push.
                        let sid = handle.identity().session_id.clone();
                        let known = self
                            .node(name)
                            .tracked
                            .get(&openid)
                            .is_some_and(|(s, st)| *s == sid && *st == standby);
                        let pushes: Vec<_> = if known {
                            export.into_iter().filter(|p| p.seq_id == seq_id).collect()
                        } else {
                            export
                        };
                        let req = copy_of(name, &handle, pushes, known);
                        let d = DurableWait {
                            id,
                            openid: openid.clone(),
                            standby,
                            tries: 0,
                        };
                        self.send_durable_copy(name, d, sid, req);
                    }
                    (true, None) => self.reply_up(id, openid, durable, false),
                    _ => self.reply_up(id, openid, durable, true),
                }
            }
            PushOutcome::Refused { .. } => self.reply_up(id, openid, durable, false),
            PushOutcome::Forward { to } if hops < 2 => self.forward(name, &to, body, hops),
            PushOutcome::Forward { .. } => self.reply_up(id, openid, durable, false),
            PushOutcome::Wait if self.now < give_up => {
                self.timer(name, 50, Timer::RetryPush(Box::new(body)));
            }
            PushOutcome::Wait => self.reply_up(id, openid, durable, false),
            // Not here: the owner is looked up (a scoped view knows only
            // this node's sessions; a cached foreign owner is refreshed).
            PushOutcome::Absent => match self.lookup_owner(name, &openid).or(owner) {
                Some((o, _)) if hops == 0 && o != name => self.forward(name, &o, body, hops),
                _ => self.reply_up(id, openid, durable, false),
            },
        }
        Ok(())
    }

    fn forward(&mut self, name: &str, to: &str, body: Body, hops: u8) {
        if let Body::UpPush {
            id,
            openid,
            durable,
            size,
            give_up,
            ..
        } = body
        {
            if !self.node(name).table.members().is_live(to) {
                self.reply_up(id, openid, durable, false);
                return;
            }
            self.send(
                End::Node(name.into()),
                End::Node(to.into()),
                Body::UpPush {
                    id,
                    openid,
                    durable,
                    hops: hops + 1,
                    size,
                    give_up,
                },
            );
        }
    }

    // ----- drain -----

    pub fn start_drain(&mut self, name: &str) {
        let deadline = self.now + 30_000;
        let Some(node) = self.nodes.get_mut(name) else {
            return;
        };
        if node.draining || !node.alive {
            return;
        }
        node.draining = true;
        node.drain_deadline = deadline;
        let mut queue: Vec<String> = node
            .table
            .locals()
            .map(|h| h.identity().openid.clone())
            .collect();
        queue.sort();
        node.drain_queue = queue.into();
        self.trace(format!("{name} drains"));
        self.timer(name, 1, Timer::DrainStep);
    }

    fn drain_step(&mut self, name: &str) {
        let now = self.instant();
        let now_ms = self.now;
        let node = self.node(name);
        let next = node.drain_queue.pop_front();
        match next {
            Some(openid) => {
                let handle = node.table.local(&openid).cloned();
                if let Some(h) = handle {
                    let busy = h.with(|s| s.stats().requests_in_flight) > 0;
                    if busy && now_ms + 5 < node.drain_deadline {
                        node.drain_queue.push_back(openid);
                    } else {
                        let successors: Vec<String> = node
                            .table
                            .members()
                            .successors()
                            .into_iter()
                            .map(|m| m.node_id.clone())
                            .collect();
                        let pick = if successors.is_empty() {
                            None
                        } else {
                            Some(successors[self.rng.random_range(0..successors.len())].clone())
                        };
                        self.stage_one(name, &openid, &h, pick, now);
                    }
                }
                self.timer(name, 2, Timer::DrainStep);
            }
            None => {
                if !node.untransferred.is_empty() && self.cp_reachable(name) {
                    let node = self.node(name);
                    let pending = std::mem::take(&mut node.untransferred);
                    let pending: Vec<_> = pending
                        .into_iter()
                        .filter(|(o, e, to)| node.table.transfer_pending(o, to, *e))
                        .collect();
                    for (openid, epoch, to) in pending {
                        self.cp_apply(Cmd::Transfer {
                            openid,
                            expected_epoch: epoch,
                            to_node: to,
                        });
                    }
                }
                let node = self.node(name);
                let done = node.stages.is_empty()
                    && node.table.local_count() == 0
                    && node.untransferred.is_empty();
                if done || now_ms >= node.drain_deadline {
                    // As drain.rs: the replicas held here go to their owners'
                    // next standbys before the node leaves.
                    // Copies that failed (or got no answer in a round) are sent
                    // again, for a few rounds.
                    if node.handoff.is_none() {
                        for (state, owner) in node.table.fenced_states() {
                            let since = node.table.members().registered_at(owner);
                            node.replicas.keep_handed_over(state, owner, since);
                        }
                        node.handoff = Some(Handing {
                            plan: Handoff::new(node.replicas.seal()),
                            pending: HashMap::new(),
                            until: now_ms,
                        });
                    }
                    let h = node.handoff.as_mut().expect("set above");
                    if !h.pending.is_empty() && now_ms < h.until {
                        self.timer(name, 10, Timer::DrainStep);
                        return;
                    }
                    // As `replica::hand_over_replicas`: a copy not answered
                    // in its round failed, and its heir is passed over.
                    let mut unanswered: Vec<_> = h.pending.drain().collect();
                    unanswered.sort_by_key(|(w, _)| *w);
                    let hold = now + UNREACHABLE_HOLD;
                    for (_, (openid, heir)) in &unanswered {
                        h.plan.answered(openid, heir, false);
                    }
                    for (_, (_, heir)) in &unanswered {
                        node.table.members_mut().mark_unreachable(
                            &heir.node_id,
                            Reach::NoAnswer,
                            hold,
                        );
                    }
                    let h = node.handoff.as_mut().expect("set above");
                    match h.plan.next_step(node.table.members(), now) {
                        HandoffStep::Done => self.leave(name),
                        HandoffStep::WaitUntil(at) => {
                            let wait = at.saturating_duration_since(now).as_millis() as Ms;
                            self.timer(name, wait.max(1), Timer::DrainStep);
                        }
                        HandoffStep::Send(round) => {
                            self.hand_over_replicas(name, round);
                            self.timer(name, 10, Timer::DrainStep);
                        }
                    }
                } else {
                    let mut left: Vec<String> = node
                        .table
                        .locals()
                        .map(|h| h.identity().openid.clone())
                        .filter(|o| !node.stages.contains_key(o))
                        .collect();
                    left.sort();
                    node.drain_queue.extend(left);
                    self.timer(name, 100, Timer::DrainStep);
                }
            }
        }
    }

    fn stage_one(
        &mut self,
        name: &str,
        openid: &str,
        handle: &PlainCell,
        successor: Option<String>,
        now: std::time::Instant,
    ) {
        let Some(successor) = successor else {
            self.goaway(name, openid, "");
            return;
        };
        let node = self.node(name);
        let epoch = handle.with(|s| s.epoch());
        let handed = node.table.hand_over(
            now,
            openid,
            gatesvr_dataplane::core::HandoverAsk::Drain {
                successor: successor.clone(),
            },
        );
        let Ok(Some((state, _))) = handed else {
            return;
        };
        // As drain.rs: its pushes stay here as a replica until this node
        // leaves (then they go to the successor's standby).
        let node = self.node(name);
        let since = node.table.members().registered_at(&successor);
        node.replicas.keep_handed_over(&state, &successor, since);
        let line = format!(
            "{name} stages \"{openid}\" on {successor} at epoch {epoch}: pushes {:?}",
            state.pushes.iter().map(|p| p.seq_id).collect::<Vec<_>>()
        );
        self.trace(line);
        let req = self.id();
        self.node(name).stages.insert(
            openid.into(),
            (req, handle.clone(), successor.clone(), epoch),
        );
        self.send(
            End::Node(name.into()),
            End::Node(successor),
            Body::Stage {
                state: Box::new(state),
                epoch,
                req,
            },
        );
        self.timer(
            name,
            PEER_TIMEOUT_MS,
            Timer::StageDeadline {
                openid: openid.into(),
                req,
            },
        );
    }

    fn on_stage_ack(&mut self, name: &str, openid: &str, req: u64, ok: bool) {
        let now = self.instant();
        let node = self.node(name);
        let Some((r, handle, successor, epoch)) = node.stages.remove(openid) else {
            return;
        };
        if r != req {
            node.stages
                .insert(openid.into(), (r, handle, successor, epoch));
            return;
        }
        if !ok {
            let owner = node.owner(openid).map(|(n, e)| (n.to_string(), e));
            let line = format!("{name} takes \"{openid}\" back (view: {owner:?})");
            self.trace(line);
            let node = self.node(name);
            let cmds =
                node.table
                    .take_back(now, handle, owner.as_ref().map(|(n, e)| (n.as_str(), *e)));
            self.carry(name, cmds);
            self.goaway(name, openid, "");
            return;
        }
        let mut new_epoch = epoch;
        let may_transfer = self.node(name).table.may_transfer(openid);
        if !may_transfer {
            // Not this node's to give (a staged copy): the successor's copy
            // stays staged until the view or a claim settles it.
        } else if self.cp_reachable(name)
            && let CmdResult::Owned { owner, .. } = self.cp_apply(Cmd::Transfer {
                openid: openid.into(),
                expected_epoch: epoch,
                to_node: successor.clone(),
            })
        {
            new_epoch = owner.epoch;
        } else if !self.cp_reachable(name) {
            // As drain.rs: retried before the node leaves.
            self.node(name)
                .untransferred
                .push((openid.to_string(), epoch, successor.clone()));
        }
        let line = format!("{name} staged \"{openid}\" on {successor} (epoch {new_epoch})");
        self.trace(line);
        self.node(name).table.staged(openid, new_epoch);
        self.goaway(name, openid, &successor);
    }

    /// As `replica::hand_over_replicas`: one round of the handoff.
    fn hand_over_replicas(&mut self, name: &str, round: Vec<(Member, ReplicateRequest)>) {
        let mut pending = HashMap::new();
        for (heir, req) in round {
            let wait = self.id();
            pending.insert(wait, (req.openid.clone(), heir.clone()));
            let line = format!(
                "{name} hands the replica of \"{}\" {} (owner {}) to {}: pushes {:?}",
                req.openid,
                req.session_id,
                req.owner_node,
                heir.node_id,
                req.pushes.iter().map(|p| p.seq_id).collect::<Vec<_>>()
            );
            self.trace(line);
            self.send(
                End::Node(name.into()),
                End::Node(heir.node_id),
                Body::Replicate {
                    req: Box::new(req),
                    wait: Some(wait),
                },
            );
        }
        let until = self.now + PEER_TIMEOUT_MS;
        if let Some(h) = &mut self.node(name).handoff {
            h.pending = pending;
            h.until = until;
        }
    }

    fn goaway(&mut self, name: &str, openid: &str, target: &str) {
        let now = self.instant();
        let node = self.node(name);
        if let Some((client, conn, h)) = node.attached.remove(openid) {
            node.table.detach(now, &h);
            self.send(
                End::Node(name.into()),
                End::Client(client),
                Body::GoAway {
                    conn,
                    target: target.into(),
                },
            );
        }
    }

    fn leave(&mut self, name: &str) {
        if self.cp_reachable(name) {
            self.cp_apply(Cmd::LeaveNode {
                node_id: name.into(),
            });
        }
        self.trace(format!("node {name} left"));
        self.kill(name);
        if let Some(n) = self.nodes.get_mut(name) {
            n.left = true;
        }
    }

    // ----- the view -----

    fn on_watch(&mut self, name: &str, w: Watch) {
        let now = self.instant();
        match w {
            Watch::Owner {
                openid,
                owner,
                epoch,
            } => {
                let node = self.node(name);
                node.owner_epoch_seen = node.owner_epoch_seen.max(epoch);
                if node
                    .view_owners
                    .get(&openid)
                    .is_none_or(|(_, e)| *e <= epoch)
                {
                    node.view_owners
                        .insert(openid.clone(), (owner.clone(), epoch));
                }
                let cmds = node.table.owner_changed(now, &openid, &owner, epoch);
                self.carry(name, cmds);
            }
            Watch::Node(n) => {
                let node = self.node(name);
                let mine = n.node_id == name;
                node.view_nodes.insert(n.node_id.clone(), n);
                let nodes: Vec<DataPlaneNode> = node.view_nodes.values().cloned().collect();
                node.table.members_mut().set(nodes.iter());
                if mine {
                    let live = node.table.members().is_live(name);
                    node.lease.view_changed(now, live, false);
                }
            }
            Watch::Snapshot => {
                // Scoped: this node's own sessions only.
                let owners: HashMap<String, (String, u64)> = self
                    .cp
                    .owners
                    .iter()
                    .filter(|(_, r)| r.owner_node == name)
                    .map(|(o, r)| (o.clone(), (r.owner_node.clone(), r.epoch)))
                    .collect();
                let nodes: BTreeMap<String, DataPlaneNode> = self
                    .cp
                    .nodes
                    .iter()
                    .map(|(k, n)| (k.clone(), super::world::proto_node(n)))
                    .collect();
                let node = self.node(name);
                let newest = owners.values().map(|(_, e)| *e).max().unwrap_or(0);
                node.owner_epoch_seen = node.owner_epoch_seen.max(newest);
                node.view_owners = owners;
                node.view_nodes = nodes;
                let list: Vec<DataPlaneNode> = node.view_nodes.values().cloned().collect();
                node.table.members_mut().set(list.iter());
                let live = node.table.members().is_live(name);
                node.lease.view_changed(now, live, true);
                let view = node.view_owners.clone();
                let cmds = node.table.reconcile(now, |o| view.get(o).cloned());
                self.carry(name, cmds);
                // A local session the scoped snapshot does not name is
                // looked up (`Cluster::resolve_missing`): owned elsewhere,
                // it is fenced.
                let missing: Vec<String> = self
                    .node(name)
                    .table
                    .locals()
                    .map(|h| h.identity().openid.clone())
                    .filter(|o| !view.contains_key(o))
                    .collect();
                for openid in missing {
                    if let Some((owner, epoch)) = self.lookup_owner(name, &openid)
                        && owner != name
                    {
                        let cmds = self
                            .node(name)
                            .table
                            .owner_changed(now, &openid, &owner, epoch);
                        self.carry(name, cmds);
                    }
                }
            }
        }
    }

    // ----- timers -----

    fn on_timer(&mut self, name: &str, t: Timer) -> Result<(), String> {
        match t {
            Timer::Table => {
                let now = self.instant();
                let node = self.node(name);
                node.table_timer = None;
                let cmds = node.table.tick(now);
                self.carry(name, cmds);
            }
            Timer::StartDeadline { openid, req } => {
                let now_ms = self.now;
                let node = self.node(name);
                let Some(p) = node.starts.get(&openid) else {
                    return Ok(());
                };
                if p.req != req {
                    return Ok(());
                }
                match p.phase {
                    Phase::Handover => {
                        let owner = p.previous.clone();
                        self.handover_failed(name, &openid, req, &owner, Reach::NoAnswer);
                    }
                    // As `peer::recover`: silence is not "no copy"; ask the
                    // nodes that did not answer again, until the patience ends.
                    Phase::Recover if !p.waiting.is_empty() && now_ms < p.give_up => {
                        let mut waiting: Vec<String> = p.waiting.iter().cloned().collect();
                        waiting.sort();
                        let sid = p.session_id.clone();
                        let req = self.id();
                        if let Some(p) = self.node(name).starts.get_mut(&openid) {
                            p.req = req;
                        }
                        self.ask_for_replicas(name, &openid, &sid, req, waiting);
                        self.timer(name, PEER_TIMEOUT_MS, Timer::StartDeadline { openid, req });
                    }
                    Phase::Recover => self.recover_check(name, req, now_ms),
                }
            }
            Timer::ReplicateDeadline { wait } => {
                // No answer in time: passed over like a refused standby; the
                // push itself fails (its caller waited long enough).
                if let Some(d) = self.node(name).durable.remove(&wait) {
                    self.standby_unreachable(name, &d.standby, Reach::NoAnswer);
                    self.reply_up(d.id, d.openid, true, false);
                }
            }
            Timer::MovedOn => {
                self.ack_sync(name);
                self.copy_orphans(name);
            }
            Timer::ProbeDeadline { req } => self.owner_unreachable(name, req, Reach::NoAnswer),
            // As `replica::copy_orphans`: a heir that did not answer is
            // passed over, and the next one is tried at once.
            Timer::OrphanCopyDeadline { wait } => {
                if let Some((_, _, heir)) = self.node(name).orphan_copies.remove(&wait) {
                    self.standby_unreachable(name, &heir, Reach::NoAnswer);
                }
            }
            Timer::RecoverCheck { req } => {
                let now = self.now;
                self.recover_check(name, req, now);
            }
            Timer::StageDeadline { openid, req } => self.on_stage_ack(name, &openid, req, false),
            Timer::DrainStep => self.drain_step(name),
            Timer::AckSync => {
                self.ack_sync(name);
                self.copy_orphans(name);
                self.probe_silent_owners(name);
                self.timer(name, 1_000, Timer::AckSync);
            }
            Timer::Complete {
                openid,
                session_id,
                seq,
            } => {
                let node = self.node(name);
                if let Some(h) = node.executing.remove(&(session_id.clone(), seq)) {
                    h.with(|s| {
                        s.complete_request(
                            seq,
                            ClientResponse {
                                seq_id: seq,
                                ..Default::default()
                            },
                        )
                    });
                    if let Some((client, _, a)) = node.attached.get(&openid).cloned()
                        && a.same(&h)
                    {
                        self.send(
                            End::Node(name.into()),
                            End::Client(client),
                            Body::Answer {
                                session_id,
                                seq,
                                code: ErrorCode::Ok,
                            },
                        );
                    }
                }
            }
            Timer::RetryPush(body) => self.on_up_push(name, *body)?,
            Timer::ClaimAnswered {
                client,
                conn,
                openid,
                session_id,
                new_id,
                last_acked,
                epoch,
                previous,
            } => self.on_claim_answered(
                name, client, conn, openid, session_id, new_id, last_acked, epoch, previous,
            ),
        }
        Ok(())
    }

    /// Second copies of replicas whose owner left the view
    /// (`replica::copy_orphans`).
    fn copy_orphans(&mut self, name: &str) {
        let now = self.instant();
        let node = self.node(name);
        for (state, owner) in node.table.fenced_with_pushes() {
            let since = node.table.members().registered_at(&owner);
            node.replicas.keep_fenced(&state, &owner, since);
        }
        let orphans = node.replicas.orphans(node.table.members(), now);
        for (heir, req) in orphans {
            let wait = self.id();
            self.timer(name, PEER_TIMEOUT_MS, Timer::OrphanCopyDeadline { wait });
            self.node(name).orphan_copies.insert(
                wait,
                (
                    req.openid.clone(),
                    req.session_id.clone(),
                    heir.node_id.clone(),
                ),
            );
            self.send(
                End::Node(name.into()),
                End::Node(heir.node_id),
                Body::Replicate {
                    req: Box::new(req),
                    wait: Some(wait),
                },
            );
        }
    }

    /// As `Registry::copy_soon` and `replica::replicate_recovered`: a session
    /// that arrived with pushes sends its whole queue to this node's standby
    /// now; tracked with no standby until one acknowledges, so the ack sync
    /// tries again.
    fn copy_soon(&mut self, name: &str, openid: &str) {
        let now = self.instant();
        let node = self.node(name);
        let Some(h) = node.table.local(openid).cloned() else {
            return;
        };
        let pushes = h.with(|s| s.export().pushes);
        if pushes.is_empty() {
            return;
        }
        let sid = h.identity().session_id.clone();
        let fresh = node.tracked.get(openid).is_none_or(|(s, _)| *s != sid);
        if fresh {
            node.tracked
                .insert(openid.into(), (sid.clone(), String::new()));
            node.synced.remove(openid);
        }
        let Some(standby) = node
            .table
            .members()
            .standby_for(now)
            .map(|m| m.node_id.clone())
        else {
            return;
        };
        let wait = self.id();
        self.node(name)
            .resyncs
            .insert(wait, (openid.into(), sid, standby.clone()));
        let req = copy_of(name, &h, pushes, false);
        self.send(
            End::Node(name.into()),
            End::Node(standby),
            Body::Replicate {
                req: Box::new(req),
                wait: Some(wait),
            },
        );
    }

    /// Sends changed ack points to standbys (`replica::sync_ack_points`).
    fn ack_sync(&mut self, name: &str) {
        let now = self.instant();
        let node = self.node(name);
        let mut tracked: Vec<(String, String, String)> = node
            .tracked
            .iter()
            .map(|(o, (s, st))| (o.clone(), s.clone(), st.clone()))
            .collect();
        tracked.sort();
        let mut sends = Vec::new();
        // As `replica::sync_ack_points`: one unchanged ack point per standby
        // nothing else is sent to, so that a dead standby is found here.
        let mut probes: BTreeMap<String, ReplicateRequest> = BTreeMap::new();
        let current = node
            .table
            .members()
            .standby_for(now)
            .map(|m| m.node_id.clone());
        for (openid, session_id, standby) in tracked {
            let node = self.node(name);
            let Some(h) = node.table.local(&openid).cloned() else {
                node.tracked.remove(&openid);
                node.synced.remove(&openid);
                continue;
            };
            if h.identity().session_id != session_id {
                node.tracked.remove(&openid);
                node.synced.remove(&openid);
                continue;
            }
            let stats = h.with(|s| s.stats());
            let points = (stats.acked_seq_id, stats.next_seq_id);
            let req = copy_of(name, &h, Vec::new(), true);
            // As `replica::sync_ack_points`: the standby drained, left or
            // died (the ring moved on): the whole queue goes to the new one,
            // which is the session's standby once it answered (until then
            // this is tried again every sync). Otherwise only a changed ack
            // point is sent.
            let (standby, pushes, wait) = match &current {
                Some(c) if *c != standby => {
                    let wait = self.id();
                    self.node(name)
                        .resyncs
                        .insert(wait, (openid.clone(), session_id.clone(), c.clone()));
                    (c.clone(), h.with(|s| s.export().pushes), Some(wait))
                }
                Some(_) if node.synced.get(&openid) == Some(&points) => {
                    probes.entry(standby).or_insert(req);
                    continue;
                }
                Some(_) => (standby, Vec::new(), None),
                None => continue,
            };
            self.node(name).synced.insert(openid.clone(), points);
            // A whole queue (to a new standby) is not an update.
            let incremental = wait.is_none();
            sends.push((
                standby,
                wait,
                ReplicateRequest {
                    pushes,
                    incremental,
                    ..req
                },
            ));
        }
        for (standby, req) in probes {
            if !sends.iter().any(|(s, _, _)| *s == standby) {
                sends.push((standby, None, req));
            }
        }
        for (standby, wait, req) in sends {
            self.send(
                End::Node(name.into()),
                End::Node(standby),
                Body::Replicate {
                    req: Box::new(req),
                    wait,
                },
            );
        }
    }
}

/// `owner`'s copy of `handle`'s session for its standby, with the session's
/// epoch and ack point now (`replica::replicate`).
fn copy_of(
    owner: &str,
    handle: &PlainCell,
    pushes: Vec<ServerPush>,
    incremental: bool,
) -> ReplicateRequest {
    let (epoch, stats) = handle.with(|s| (s.epoch(), s.stats()));
    let id = handle.identity();
    ReplicateRequest {
        openid: id.openid.clone(),
        session_id: id.session_id.clone(),
        zone: id.zone.clone(),
        epoch,
        owner_node: owner.into(),
        pushes,
        acked_seq_id: stats.acked_seq_id,
        next_seq_id: stats.next_seq_id,
        release: false,
        incremental,
        relayed: false,
        owner_since: 0,
    }
}

fn fresh(openid: &str, id: &str, now: std::time::Instant) -> PlainCell {
    PlainCell::new(Session::new(
        SessionIdentity {
            session_id: id.into(),
            openid: openid.into(),
            zone: "001".into(),
        },
        session_config(),
        now,
    ))
}

fn openid_of(starts: &HashMap<String, PendingStart>, req: u64) -> Option<String> {
    starts
        .iter()
        .find(|(_, p)| p.req == req)
        .map(|(o, _)| o.clone())
}
