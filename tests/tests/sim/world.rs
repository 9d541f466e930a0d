//! The simulated world: time, the network, the control plane (the real
//! `State::apply`), clients, the upstream and the fault schedule. Nodes are in
//! `node.rs`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use gatesvr_controlplane::state::{Cmd, CmdResult, Key, State, Touched};
use gatesvr_proto::client::{ErrorCode, ResumeStatus, ServerPush};
use gatesvr_proto::control::DataPlaneNode;
use gatesvr_proto::peer::{FetchReplicaResponse, ReplicateRequest};
use gatesvr_proto::session::SessionState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::check::Checks;
use super::node::SimNode;
use super::{ALL_FAULTS, Fault};

pub type Ms = u64;

/// Lease of a node in the control plane.
pub const LEASE_MS: u32 = 1_000;

fn lease_ttl() -> Duration {
    Duration::from_millis(u64::from(LEASE_MS))
}
/// Deadline of one peer call (the shell's PEER_TIMEOUT).
pub const PEER_TIMEOUT_MS: Ms = 3_000;
/// How long a Start waits for a silent owner or for replicas (RECOVERY_PATIENCE).
pub const PATIENCE_MS: Ms = 10_000;
/// How long a recovery waits for nodes declared dead (`replica::DEAD_NODE_ASK`).
pub const DEAD_NODE_ASK_MS: Ms = 500;
/// The fault model of durable pushes: a node crashes (Kill, Restart) at
/// least this long after the previous crash. With one standby, a push
/// acknowledged by an owner and its standby is lost if both crash before
/// either made another copy; the survivor makes one within about a lease
/// plus an ack-sync round (1 s + 1 s here): the owner when a probe finds its
/// standby gone, the standby when the view shows the owner gone
/// (docs/architecture.md §6.8). Every other fault overlaps freely.
pub const CRASH_SPACING_MS: Ms = 3_000;

/// What a seed runs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub nodes: usize,
    pub sessions: usize,
    pub faults: Vec<Fault>,
    pub rolling_rounds: usize,
    pub run_ms: Ms,
    pub push_every_ms: Ms,
}

impl Plan {
    pub fn random(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_f00d);
        let n = rng.random_range(3..=6);
        let mut faults: Vec<Fault> = ALL_FAULTS
            .iter()
            .copied()
            .filter(|f| *f != Fault::Rolling)
            .collect();
        for i in (1..faults.len()).rev() {
            faults.swap(i, rng.random_range(0..=i));
        }
        faults.truncate(n);
        if rng.random_bool(0.3) {
            faults.push(Fault::Rolling);
        }
        Self {
            nodes: rng.random_range(3..=5),
            sessions: rng.random_range(30..=200),
            faults,
            rolling_rounds: 1,
            run_ms: 20_000,
            push_every_ms: 5,
        }
    }

    pub fn rolling(_seed: u64, rounds: usize) -> Self {
        Self {
            nodes: 3,
            sessions: 60,
            faults: vec![Fault::Rolling],
            rolling_rounds: rounds,
            run_ms: 10_000,
            push_every_ms: 10,
        }
    }

    pub fn big(_seed: u64, sessions: usize) -> Self {
        Self {
            nodes: 4,
            sessions,
            faults: vec![Fault::Kill, Fault::Drain, Fault::Partition],
            rolling_rounds: 1,
            run_ms: 15_000,
            push_every_ms: 1,
        }
    }
}

/// Who sends or receives a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum End {
    Node(String),
    Client(usize),
    Upstream,
    Cp,
}

/// A message on the simulated network.
#[derive(Debug, Clone)]
pub enum Body {
    Start {
        conn: u64,
        openid: String,
        session_id: String,
        last_acked: u64,
    },
    Started {
        conn: u64,
        session_id: String,
        status: ResumeStatus,
    },
    Refused {
        conn: u64,
    },
    Push {
        conn: u64,
        push: ServerPush,
    },
    Ack {
        openid: String,
        session_id: String,
        seq: u64,
    },
    Request {
        conn: u64,
        openid: String,
        session_id: String,
        seq: u64,
    },
    Answer {
        session_id: String,
        seq: u64,
        code: ErrorCode,
    },
    Closed {
        conn: u64,
    },
    GoAway {
        conn: u64,
        target: String,
    },
    UpPush {
        id: u64,
        openid: String,
        durable: bool,
        hops: u8,
        size: usize,
        give_up: Ms,
    },
    UpReply {
        id: u64,
        openid: String,
        durable: bool,
        ok: bool,
    },
    Handover {
        openid: String,
        epoch: u64,
        req: u64,
    },
    HandoverReply {
        openid: String,
        req: u64,
        state: Option<Box<SessionState>>,
    },
    Stage {
        state: Box<SessionState>,
        epoch: u64,
        req: u64,
    },
    StageAck {
        openid: String,
        req: u64,
        ok: bool,
    },
    Replicate {
        req: Box<ReplicateRequest>,
        wait: Option<u64>,
    },
    ReplicateAck {
        wait: u64,
        ok: bool,
    },
    /// The standby holds no copy to update (it restarted with the same
    /// name): NOT_FOUND to an incremental `Replicate`.
    ReplicateMissing {
        openid: String,
        session_id: String,
        wait: Option<u64>,
    },
    FetchReplica {
        openid: String,
        session_id: String,
        req: u64,
    },
    FetchReply {
        req: u64,
        resp: Box<FetchReplicaResponse>,
    },
    /// A standby's probe of an owner it stopped hearing from
    /// (`replica::probe_silent_owners`, a `grpc.health.v1` check there).
    Probe {
        req: u64,
    },
    ProbeReply {
        req: u64,
    },
    /// Nothing listens at the destination (its process is gone).
    Bounce {
        to_node: String,
        original: Box<Body>,
    },
    Watch(Watch),
    /// A node's own timer.
    Timer(Timer),
}

/// What the control plane's watch tells a node.
#[derive(Debug, Clone)]
pub enum Watch {
    Owner {
        openid: String,
        owner: String,
        epoch: u64,
    },
    Node(DataPlaneNode),
    /// The node's watch broke and reconnected: the whole state.
    Snapshot,
}

#[derive(Debug, Clone)]
pub enum Timer {
    Table,
    StartDeadline {
        openid: String,
        req: u64,
    },
    ReplicateDeadline {
        wait: u64,
    },
    StageDeadline {
        openid: String,
        req: u64,
    },
    DrainStep,
    AckSync,
    /// A standby was found unreachable: the ack sync runs now.
    MovedOn,
    /// A probe of a silent owner got no answer in time.
    ProbeDeadline {
        req: u64,
    },
    /// A second copy of an orphan replica got no answer in time.
    OrphanCopyDeadline {
        wait: u64,
    },
    /// The short wait for nodes declared dead during a recovery ended.
    RecoverCheck {
        req: u64,
    },
    Complete {
        openid: String,
        session_id: String,
        seq: u64,
    },
    RetryPush(Box<Body>),
    /// The claim of a Start answered; the shell goes on (begin_incoming,
    /// Handover) in a later step, so pushes and watch deltas can land in
    /// between (the data plane's order: answer, then begin_incoming).
    ClaimAnswered {
        client: usize,
        conn: u64,
        openid: String,
        session_id: String,
        new_id: String,
        last_acked: u64,
        epoch: u64,
        previous: Option<String>,
    },
}

/// A scheduled event (the queue holds it boxed: a binary heap of a million
/// events moves each several times, and a body is large).
struct Event {
    at: Ms,
    n: u64,
    to: End,
    from: End,
    incarnation: u64,
    body: Body,
}

impl PartialEq for Event {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.n) == (o.at, o.n)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Event {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.n).cmp(&(o.at, o.n))
    }
}

/// A client of one openid.
pub struct Client {
    pub openid: String,
    pub node: Option<String>,
    pub conn: u64,
    pub connecting: bool,
    pub session_id: String,
    pub highest: u64,
    pub acked: u64,
    pub goaway: Option<String>,
    pub pending: Option<(String, u64, Ms)>,
    pub next_req: u64,
    pub next_action: Ms,
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub faults: Vec<Fault>,
    pub sessions: usize,
    pub pushes_ok: u64,
    pub durable_ok: u64,
    pub delivered: u64,
    pub executed: u64,
    pub departed_nodes: usize,
    pub events: u64,
    pub final_broadcast_ok: bool,
}

impl Report {
    pub fn add(&mut self, o: &Report) {
        self.sessions += o.sessions;
        self.pushes_ok += o.pushes_ok;
        self.durable_ok += o.durable_ok;
        self.delivered += o.delivered;
        self.executed += o.executed;
        self.departed_nodes += o.departed_nodes;
        self.events += o.events;
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sessions {} pushes_ok {} durable_ok {} delivered {} requests_executed {} departed_nodes {} events {}",
            self.sessions,
            self.pushes_ok,
            self.durable_ok,
            self.delivered,
            self.executed,
            self.departed_nodes,
            self.events
        )
    }
}

pub struct World {
    pub rng: StdRng,
    pub plan: Plan,
    pub now: Ms,
    pub base: Instant,
    queue: BinaryHeap<Reverse<Box<Event>>>,
    n: u64,
    pub cp: State,
    pub cp_down_until: Ms,
    /// The leader's grace after an outage (leases are not expired meanwhile).
    cp_grace_until: Ms,
    pub nodes: BTreeMap<String, SimNode>,
    pub clients: Vec<Client>,
    /// Clients that got a session id once (they keep one), ascending: the
    /// upstream pushes to them (kept here, not filtered every millisecond).
    known: Vec<usize>,
    pub checks: Checks,
    pub partitions: HashSet<(String, String)>,
    pub cp_partitioned: HashSet<String>,
    pub slow: HashSet<String>,
    pub late_watch: HashSet<String>,
    /// When the last Kill or Restart happened ([`CRASH_SPACING_MS`]).
    last_crash: Ms,
    pub dup_rate: f64,
    pub drop_rate: f64,
    pub big_payloads: bool,
    next_node: u64,
    next_id: u64,
    pub departed: usize,
    /// Rolling replacements started.
    rolled: u64,
    trace: VecDeque<String>,
    /// `SIM_WATCH`: the openid whose every event is printed (read once).
    watch: Option<String>,
    report: Report,
    pending_up: HashMap<u64, (String, bool)>,
    /// Last delivery time per ordered link (client connections).
    fifo: HashMap<(End, End), Ms>,
}

impl World {
    pub fn new(seed: u64, plan: Plan) -> Self {
        let mut w = Self {
            rng: StdRng::seed_from_u64(seed),
            now: 0,
            base: Instant::now(),
            queue: BinaryHeap::new(),
            n: 0,
            cp: State::default(),
            cp_down_until: 0,
            cp_grace_until: 0,
            nodes: BTreeMap::new(),
            clients: Vec::new(),
            known: Vec::new(),
            checks: Checks::default(),
            partitions: HashSet::new(),
            cp_partitioned: HashSet::new(),
            slow: HashSet::new(),
            late_watch: HashSet::new(),
            last_crash: 0,
            dup_rate: 0.0,
            drop_rate: 0.0,
            big_payloads: false,
            next_node: 1,
            next_id: 1,
            departed: 0,
            rolled: 0,
            trace: VecDeque::new(),
            watch: std::env::var("SIM_WATCH").ok().map(|w| format!("\"{w}\"")),
            report: Report {
                faults: plan.faults.clone(),
                sessions: plan.sessions,
                ..Default::default()
            },
            pending_up: HashMap::new(),
            fifo: HashMap::new(),
            plan,
        };
        for _ in 0..w.plan.nodes {
            w.add_node(None);
        }
        for i in 0..w.plan.sessions {
            w.clients.push(Client {
                openid: format!("u{i}"),
                node: None,
                conn: 0,
                connecting: false,
                session_id: String::new(),
                highest: 0,
                acked: 0,
                goaway: None,
                pending: None,
                next_req: 1,
                next_action: 0,
            });
        }
        w
    }

    pub fn faults(&self) -> &[Fault] {
        &self.plan.faults
    }

    pub fn trace_tail(&self) -> String {
        self.trace.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    pub fn trace(&mut self, line: String) {
        // The watched openid's events, and every fault and node lifecycle.
        if let Some(w) = &self.watch
            && (line.contains(w.as_str())
                || line.starts_with("fault ")
                || line.starts_with("node "))
        {
            eprintln!("{:>7} ms {line}", self.now);
        }
        if self.trace.len() >= 40 {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>7} ms {line}", self.now));
    }

    pub fn instant(&self) -> Instant {
        self.base + Duration::from_millis(self.now)
    }

    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Starts a node (a new name unless `name` is given) and registers it.
    pub fn add_node(&mut self, name: Option<String>) -> String {
        let name = name.unwrap_or_else(|| {
            let n = self.next_node;
            self.next_node += 1;
            format!("dp-{n}")
        });
        let incarnation = self.id();
        let node = SimNode::new(&name, incarnation);
        self.nodes.insert(name.clone(), node);
        self.cp_apply(Cmd::RegisterNode {
            node_id: name.clone(),
            quic_addr: format!("{name}:quic"),
            grpc_addr: format!("{name}:grpc"),
            lease_ttl_ms: LEASE_MS,
        });
        let now = self.instant();
        if let Some(n) = self.nodes.get_mut(&name) {
            n.lease.renewed(now, lease_ttl());
        }
        self.resync(&name);
        self.timer(&name, 1_000, Timer::AckSync);
        name
    }

    // ----- scheduling -----

    fn push_event(&mut self, at: Ms, from: End, to: End, incarnation: u64, body: Body) {
        self.n += 1;
        self.queue.push(Reverse(Box::new(Event {
            at,
            n: self.n,
            to,
            from,
            incarnation,
            body,
        })));
    }

    pub fn timer(&mut self, node: &str, after: Ms, t: Timer) {
        let inc = self.nodes.get(node).map_or(0, |n| n.incarnation);
        let at = self.now + after;
        self.push_event(
            at,
            End::Node(node.into()),
            End::Node(node.into()),
            inc,
            Body::Timer(t),
        );
    }

    /// Sends over the network: delayed, maybe dropped or duplicated (peer
    /// messages), never across a partition.
    pub fn send(&mut self, from: End, to: End, body: Body) {
        let peer = matches!((&from, &to), (End::Node(_), End::Node(_)));
        if let (End::Node(a), End::Node(b)) = (&from, &to)
            && (self.partitions.contains(&(a.clone(), b.clone()))
                || self.partitions.contains(&(b.clone(), a.clone())))
        {
            return;
        }
        if peer && self.rng.random_bool(self.drop_rate) {
            return;
        }
        let mut delay = self.rng.random_range(1..=20);
        if let End::Node(n) = &to
            && self.slow.contains(n)
        {
            delay += self.rng.random_range(500..=4_000);
        }
        let copies = if peer && self.rng.random_bool(self.dup_rate) {
            2
        } else {
            1
        };
        // A client's connection is one ordered QUIC stream each way; peer
        // calls are independent and may overtake each other.
        let ordered = matches!((&from, &to), (End::Client(_), _) | (_, End::Client(_)));
        for i in 0..copies {
            let mut at = self.now + delay + i * self.rng.random_range(1..=50);
            if ordered {
                let tail = self.fifo.entry((from.clone(), to.clone())).or_insert(0);
                at = at.max(*tail);
                *tail = at;
            }
            self.push_event(at, from.clone(), to.clone(), 0, body.clone());
        }
    }

    // ----- the control plane -----

    pub fn cp_reachable(&self, node: &str) -> bool {
        self.now >= self.cp_down_until && !self.cp_partitioned.contains(node)
    }

    /// Applies `cmd` with the real state machine and sends the watch events,
    /// scoped as the real watch is (`Touched::concerns`): an owner record
    /// only to its owner and the node that owned it just before.
    pub fn cp_apply(&mut self, cmd: Cmd) -> CmdResult {
        let mut touched: Vec<Touched> = Vec::new();
        let result = self
            .cp
            .apply(self.now as i64 + 1_000_000, &cmd, &mut touched);
        for t in touched {
            if t.version.is_none() {
                continue;
            }
            let event = match &t.key {
                Key::Owner(openid) => self.cp.owners.get(openid).map(|o| Watch::Owner {
                    openid: openid.clone(),
                    owner: o.owner_node.clone(),
                    epoch: o.epoch,
                }),
                Key::Node(id) => self.cp.nodes.get(id).map(|n| Watch::Node(proto_node(n))),
                _ => None,
            };
            let concerns = t.concerns(&self.cp);
            if let Some(event) = event {
                self.broadcast_watch(event, concerns.as_deref());
            }
        }
        result
    }

    /// `LookupOwners` from node `name`: the owner of `openid` now, if the
    /// control plane answers (a scoped view does not carry other nodes'
    /// sessions; the shell looks one up when a push needs it).
    pub fn lookup_owner(&self, name: &str, openid: &str) -> Option<(String, u64)> {
        if !self.cp_reachable(name) {
            return None;
        }
        self.cp
            .owners
            .get(openid)
            .map(|o| (o.owner_node.clone(), o.epoch))
    }

    /// Sends `event` on the watch of every node `to` names (`None`: all).
    fn broadcast_watch(&mut self, event: Watch, to: Option<&[String]>) {
        let names: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| to.is_none_or(|to| to.contains(n)))
            .cloned()
            .collect();
        for name in names {
            let Some(node) = self.nodes.get_mut(&name) else {
                continue;
            };
            if !node.alive {
                continue;
            }
            if self.now < self.cp_down_until || self.cp_partitioned.contains(&name) {
                node.needs_resync = true;
                continue;
            }
            // The watch is one ordered stream per node.
            let lag = if self.late_watch.contains(&name) {
                self.rng.random_range(500..=3_000)
            } else {
                self.rng.random_range(1..=15)
            };
            let at = (self.now + lag).max(node.watch_tail);
            node.watch_tail = at;
            let inc = node.incarnation;
            self.push_event(
                at,
                End::Cp,
                End::Node(name.clone()),
                inc,
                Body::Watch(event.clone()),
            );
        }
    }

    /// The node's watch reconnects: a snapshot.
    pub fn resync(&mut self, name: &str) {
        let Some(node) = self.nodes.get_mut(name) else {
            return;
        };
        node.needs_resync = false;
        let at = (self.now + 5).max(node.watch_tail);
        node.watch_tail = at;
        let inc = node.incarnation;
        self.push_event(
            at,
            End::Cp,
            End::Node(name.into()),
            inc,
            Body::Watch(Watch::Snapshot),
        );
    }

    fn heartbeats(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            let (alive, draining, left, resync) = match self.nodes.get(&name) {
                Some(n) => (n.alive, n.draining, n.left, n.needs_resync),
                None => continue,
            };
            if !alive || left || !self.cp_reachable(&name) {
                continue;
            }
            if resync {
                self.resync(&name);
            }
            let sessions = self.nodes[&name].table.local_count() as u64;
            let r = self.cp_apply(Cmd::HeartbeatNode {
                node_id: name.clone(),
                draining,
                sessions,
            });
            // The heartbeat is sent (and applied: the control plane is one
            // step away here) now: the lease runs from the send.
            let sent = self.instant();
            match r {
                CmdResult::Lease {
                    drain_requested, ..
                } => {
                    if let Some(n) = self.nodes.get_mut(&name) {
                        n.lease.renewed(sent, lease_ttl());
                    }
                    if drain_requested && !draining {
                        self.start_drain(&name);
                    }
                }
                CmdResult::Err(_) => {
                    // Declared dead after a lapse: the lease is lost until the
                    // view went past the new registration; register again.
                    if let Some(n) = self.nodes.get_mut(&name) {
                        let live = n.table.members().is_live(&name);
                        n.lease.lost(live);
                    }
                    let r = self.cp_apply(Cmd::RegisterNode {
                        node_id: name.clone(),
                        quic_addr: format!("{name}:quic"),
                        grpc_addr: format!("{name}:grpc"),
                        lease_ttl_ms: LEASE_MS,
                    });
                    if matches!(r, CmdResult::Lease { .. })
                        && let Some(n) = self.nodes.get_mut(&name)
                    {
                        n.lease.renewed(sent, lease_ttl());
                    }
                }
                _ => {}
            }
        }
        if self.now >= self.cp_down_until
            && self.now >= self.cp_grace_until
            && self.cp.has_expired_leases(self.now as i64 + 1_000_000)
        {
            self.cp_apply(Cmd::ExpireLeases);
        }
    }

    // ----- the run -----

    pub fn run(&mut self) -> Result<Report, String> {
        self.schedule_faults();
        let end_of_faults = self.plan.run_ms;
        let end = end_of_faults + 20_000;
        let mut next_heartbeat = 0;
        let mut next_client_round = 0;
        let mut next_push = 0;
        let mut healed = false;
        while self.now < end {
            let next_event = self.queue.peek().map(|Reverse(e)| e.at).unwrap_or(end);
            let tick = next_event.min(next_heartbeat).min(next_client_round).min(
                if self.now < end_of_faults {
                    next_push
                } else {
                    end
                },
            );
            self.now = self.now.max(tick);
            if !healed && self.now >= end_of_faults {
                healed = true;
                self.heal();
            }
            if self.now >= next_heartbeat {
                self.heartbeats();
                next_heartbeat = self.now + 300;
            }
            if self.now >= next_client_round {
                self.client_round()?;
                next_client_round = self.now + 50;
            }
            if self.now < end_of_faults && self.now >= next_push {
                self.upstream_push();
                next_push = self.now + self.plan.push_every_ms;
            }
            while let Some(Reverse(e)) = self.queue.peek() {
                if e.at > self.now {
                    break;
                }
                let Some(Reverse(e)) = self.queue.pop() else {
                    break;
                };
                self.report.events += 1;
                self.dispatch(*e)?;
            }
        }
        self.checks.durable_delivered()?;
        self.report.final_broadcast_ok = self.final_broadcast()?;
        self.report.durable_ok = self.checks.durable_ok_count();
        self.report.delivered = self.checks.deliveries;
        self.report.executed = self.checks.executions;
        self.report.departed_nodes = self.departed;
        Ok(self.report.clone())
    }

    fn dispatch(&mut self, e: Event) -> Result<(), String> {
        match e.to {
            End::Node(name) => {
                let Some(node) = self.nodes.get(&name) else {
                    return Ok(());
                };
                let (alive, current) = (node.alive, node.incarnation);
                if !alive || (e.incarnation != 0 && e.incarnation != current) {
                    // A message to a gone process bounces back (connection
                    // refused); timers and watch events of an old life vanish.
                    if !alive {
                        match (e.from, e.body) {
                            (
                                End::Upstream,
                                Body::UpPush {
                                    id,
                                    openid,
                                    durable,
                                    ..
                                },
                            ) => self.reply_up(id, openid, durable, false),
                            // A client's handshake with a gone process times
                            // out (QUIC has no "refused"): it tries another
                            // node then, not after a Start's full patience.
                            (End::Client(c), Body::Start { conn, .. }) => {
                                let at = self.now + PEER_TIMEOUT_MS;
                                self.push_event(
                                    at,
                                    End::Node(name),
                                    End::Client(c),
                                    0,
                                    Body::Refused { conn },
                                );
                            }
                            (End::Node(from), body)
                                if !matches!(body, Body::Timer(_) | Body::Bounce { .. }) =>
                            {
                                self.send(
                                    End::Node(name.clone()),
                                    End::Node(from),
                                    Body::Bounce {
                                        to_node: name,
                                        original: Box::new(body),
                                    },
                                );
                            }
                            _ => {}
                        }
                    }
                    return Ok(());
                }
                if !matches!(e.body, Body::Timer(_) | Body::Ack { .. }) {
                    let line = format!("{:?} -> {name}: {}", e.from, short(&e.body));
                    self.trace(line);
                }
                let touched = body_openid(&e.body);
                let snapshot = matches!(e.body, Body::Watch(Watch::Snapshot));
                self.node_event(&name, e.from, e.body)?;
                self.check_single_owner(touched.as_deref(), snapshot)
            }
            End::Client(i) => {
                {
                    let line = format!(
                        "{:?} -> client {i} (\"{}\"): {}",
                        e.from,
                        self.clients[i].openid,
                        short(&e.body)
                    );
                    self.trace(line);
                }
                self.client_event(i, e.body)
            }
            End::Upstream => {
                if let Body::UpReply {
                    id,
                    openid,
                    durable,
                    ok,
                } = e.body
                    && self.pending_up.remove(&id).is_some()
                    && ok
                {
                    self.report.pushes_ok += 1;
                    if durable {
                        let at = self.now;
                        self.checks.durable_ok(&openid, id, at);
                    }
                }
                Ok(())
            }
            End::Cp => Ok(()),
        }
    }

    pub fn reply_up(&mut self, id: u64, openid: String, durable: bool, ok: bool) {
        let from = End::Upstream;
        self.send(
            from,
            End::Upstream,
            Body::UpReply {
                id,
                openid,
                durable,
                ok,
            },
        );
    }

    /// At most one node serves a session at a given epoch: checked for the
    /// openid the event touched on every event; for every session after a
    /// watch snapshot (it may settle many slots at once) and as a safety net
    /// every `max(500, sessions)` events, so the cost per event does not
    /// grow with the number of sessions (10,000-session seeds).
    fn check_single_owner(&self, touched: Option<&str>, full: bool) -> Result<(), String> {
        use gatesvr_dataplane::core::{Holding, SessionCell};
        let every = (self.plan.sessions as u64).max(500);
        let full = full || self.report.events.is_multiple_of(every);
        let mut seen: HashMap<(&str, u64), &str> = HashMap::new();
        for (name, node) in &self.nodes {
            if !node.alive {
                continue;
            }
            let cells: Vec<&gatesvr_dataplane::core::PlainCell> = if full {
                node.table.locals().collect()
            } else {
                touched
                    .and_then(|o| node.table.local(o))
                    .into_iter()
                    .collect()
            };
            for h in cells {
                let openid = h.identity().openid.as_str();
                // A staged copy does not serve until the view names its node.
                if matches!(node.table.holding(openid), Some(Holding::Staged { .. })) {
                    continue;
                }
                let epoch = h.with(|s| s.epoch());
                if epoch == 0 {
                    continue;
                }
                if let Some(other) = seen.insert((openid, epoch), name.as_str()) {
                    return Err(format!(
                        "{openid} served by {other} and {name} at the same epoch {epoch}"
                    ));
                }
            }
        }
        Ok(())
    }

    // ----- upstream -----

    fn upstream_push(&mut self) {
        if self.known.is_empty() {
            return;
        }
        let c = self.known[self.rng.random_range(0..self.known.len())];
        let live: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.alive && !n.left)
            .map(|(k, _)| k.clone())
            .collect();
        if live.is_empty() {
            return;
        }
        let node = live[self.rng.random_range(0..live.len())].clone();
        let id = self.id();
        let durable = self.rng.random_bool(0.5);
        let size = if self.big_payloads && self.rng.random_bool(0.05) {
            1 << 20
        } else {
            16
        };
        let openid = self.clients[c].openid.clone();
        self.pending_up.insert(id, (openid.clone(), durable));
        let give_up = self.now + PEER_TIMEOUT_MS;
        self.send(
            End::Upstream,
            End::Node(node),
            Body::UpPush {
                id,
                openid,
                durable,
                hops: 0,
                size,
                give_up,
            },
        );
    }

    /// After the run: a push to every session through one node, answered
    /// OK for each client connected (the broadcast of the rolling test).
    fn final_broadcast(&mut self) -> Result<bool, String> {
        let live: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.alive && !n.left)
            .map(|(k, _)| k.clone())
            .collect();
        let Some(entry) = live.first().cloned() else {
            return Ok(false);
        };
        let ids: Vec<(u64, String)> = self
            .clients
            .iter()
            .filter(|c| c.node.is_some())
            .map(|c| c.openid.clone())
            .collect::<Vec<_>>()
            .into_iter()
            .map(|o| (0, o))
            .collect();
        let mut sent = Vec::new();
        for (_, openid) in ids {
            let id = self.id();
            self.pending_up.insert(id, (openid.clone(), true));
            let give_up = self.now + PEER_TIMEOUT_MS;
            self.send(
                End::Upstream,
                End::Node(entry.clone()),
                Body::UpPush {
                    id,
                    openid: openid.clone(),
                    durable: true,
                    hops: 0,
                    size: 16,
                    give_up,
                },
            );
            sent.push((id, openid));
        }
        let end = self.now + 10_000;
        while self.now < end {
            let Some(Reverse(e)) = self.queue.pop() else {
                break;
            };
            self.now = self.now.max(e.at);
            self.dispatch(*e)?;
        }
        let answered = sent
            .iter()
            .filter(|(id, _)| !self.pending_up.contains_key(id))
            .count();
        self.checks.durable_delivered()?;
        Ok(!sent.is_empty() && answered == sent.len())
    }

    // ----- faults -----

    fn schedule_faults(&mut self) {
        let faults = self.plan.faults.clone();
        for f in faults {
            match f {
                Fault::Duplicate => self.dup_rate = 0.05,
                Fault::Drop => self.drop_rate = 0.02,
                Fault::BigPayload => self.big_payloads = true,
                Fault::Rolling => {}
                _ => {}
            }
        }
    }

    /// Called every client round: starts faults at their (seeded) times.
    fn maybe_fault(&mut self) {
        if self.now >= self.plan.run_ms || self.now < 2_000 {
            return;
        }
        // About one fault action per second of the run.
        if !self.rng.random_bool(0.05) {
            return;
        }
        let kinds: Vec<Fault> = self
            .plan
            .faults
            .iter()
            .copied()
            .filter(|f| !matches!(f, Fault::Duplicate | Fault::Drop | Fault::BigPayload))
            .collect();
        if kinds.is_empty() {
            return;
        }
        let f = kinds[self.rng.random_range(0..kinds.len())];
        let live: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.alive && !n.left && !n.draining)
            .map(|(k, _)| k.clone())
            .collect();
        if live.len() < 3 {
            // Keep a quorum of serving nodes: replace instead.
            self.add_node(None);
            return;
        }
        let pick = live[self.rng.random_range(0..live.len())].clone();
        if matches!(f, Fault::Kill | Fault::Restart) {
            if self.now < self.last_crash + CRASH_SPACING_MS {
                return;
            }
            self.last_crash = self.now;
        }
        self.trace(format!("fault {f:?} on {pick}"));
        match f {
            Fault::Kill => {
                self.kill(&pick);
                self.add_node(None);
            }
            Fault::Restart => {
                self.kill(&pick);
                self.nodes.remove(&pick);
                self.add_node(Some(pick));
            }
            Fault::Partition => {
                let other = live[self.rng.random_range(0..live.len())].clone();
                if other != pick {
                    self.partitions.insert((pick, other));
                }
            }
            Fault::CpPartition => {
                self.cp_partitioned.insert(pick);
            }
            Fault::Drain => {
                self.add_node(None);
                self.start_drain(&pick);
            }
            Fault::SlowNode => {
                self.slow.insert(pick);
            }
            Fault::CpOutage => {
                let d = self.rng.random_range(1_000..=5_000);
                self.cp_down_until = self.now + d;
                self.cp_grace_until = self.now + d + 1_500;
            }
            Fault::LateWatch => {
                self.late_watch.insert(pick);
            }
            Fault::Rolling => self.rolling(),
            Fault::Duplicate | Fault::Drop | Fault::BigPayload => {}
        }
        // Faults heal by themselves after a while.
        if self.rng.random_bool(0.3) {
            self.partitions.clear();
            self.cp_partitioned.clear();
            self.slow.clear();
            self.late_watch.clear();
            self.resync_all();
        }
    }

    fn resync_all(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in names {
            if self.nodes[&n].alive {
                self.resync(&n);
            }
        }
    }

    /// One full rolling replacement: every node gets a successor with a new
    /// name, then drains and leaves.
    pub fn rolling(&mut self) {
        let old: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.alive && !n.left && !n.draining)
            .map(|(k, _)| k.clone())
            .collect();
        for name in old {
            self.add_node(None);
            self.start_drain(&name);
        }
    }

    fn heal(&mut self) {
        self.partitions.clear();
        self.cp_partitioned.clear();
        self.slow.clear();
        self.late_watch.clear();
        self.drop_rate = 0.0;
        self.dup_rate = 0.0;
        self.cp_down_until = 0;
        self.resync_all();
        self.trace("healed".into());
    }

    /// kill -9: the node's memory is gone; its clients see the connection drop.
    pub fn kill(&mut self, name: &str) {
        let Some(node) = self.nodes.get_mut(name) else {
            return;
        };
        node.alive = false;
        self.trace(format!("node {name} killed"));
        let Some(node) = self.nodes.get_mut(name) else {
            return;
        };
        let mut attached: Vec<(usize, u64)> = node.attached.values().map(|a| (a.0, a.1)).collect();
        attached.sort_unstable();
        node.attached.clear();
        for (client, conn) in attached {
            let at = self.now + 300;
            self.push_event(
                at,
                End::Node(name.into()),
                End::Client(client),
                0,
                Body::Closed { conn },
            );
        }
        self.departed += 1;
    }

    // ----- clients -----

    fn client_round(&mut self) -> Result<(), String> {
        self.maybe_fault();
        if self.rolling_pending() {
            self.rolling();
        }
        for i in 0..self.clients.len() {
            if self.clients[i].next_action > self.now {
                continue;
            }
            let jitter = self.rng.random_range(50..=400);
            self.clients[i].next_action = self.now + jitter;
            self.client_act(i);
        }
        Ok(())
    }

    fn rolling_pending(&mut self) -> bool {
        if !self.plan.faults.contains(&Fault::Rolling) || self.plan.rolling_rounds == 0 {
            return false;
        }
        let busy = self.nodes.values().any(|n| n.alive && n.draining);
        let due = self.now >= 1_000;
        if due && !busy && self.rolled < self.plan.rolling_rounds as u64 {
            self.rolled += 1;
            return true;
        }
        false
    }

    fn client_act(&mut self, i: usize) {
        let c = &self.clients[i];
        if c.node.is_none() && !c.connecting {
            let target = c.goaway.clone();
            // What a load balancer or DNS lists: nodes the control plane
            // holds live (a killed node stays listed until its lease ends).
            let live: Vec<String> = self
                .nodes
                .iter()
                .filter(|(k, n)| {
                    !n.left && self.cp.nodes.get(*k).is_none_or(|r| r.status.is_live())
                })
                .map(|(k, _)| k.clone())
                .collect();
            let node = match target.filter(|t| self.nodes.get(t).is_some_and(|n| n.alive)) {
                Some(t) => t,
                None if live.is_empty() => return,
                None => live[self.rng.random_range(0..live.len())].clone(),
            };
            let c = &mut self.clients[i];
            c.goaway = None;
            c.conn += 1;
            c.connecting = true;
            c.node = Some(node.clone());
            let body = Body::Start {
                conn: c.conn,
                openid: c.openid.clone(),
                session_id: c.session_id.clone(),
                last_acked: c.acked,
            };
            let conn = c.conn;
            self.send(End::Client(i), End::Node(node.clone()), body);
            // A Start that is never answered (dead node) is given up.
            let at = self.now + PATIENCE_MS + PEER_TIMEOUT_MS * 2;
            self.push_event(
                at,
                End::Node(node),
                End::Client(i),
                0,
                Body::Refused { conn },
            );
            return;
        }
        let c = &self.clients[i];
        if c.connecting || c.session_id.is_empty() {
            return;
        }
        let Some(node) = c.node.clone() else {
            return;
        };
        // A request: the pending one again (retry) or the next.
        let (session_id, seq) = match &c.pending {
            Some((s, q, sent)) if *s == c.session_id => {
                if self.now < sent + 2_000 {
                    return;
                }
                (s.clone(), *q)
            }
            _ => {
                if !self.rng.random_bool(0.2) {
                    return;
                }
                (c.session_id.clone(), c.next_req)
            }
        };
        let c = &mut self.clients[i];
        if c.pending
            .as_ref()
            .is_none_or(|p| p.1 != seq || p.0 != session_id)
        {
            c.next_req += 1;
        }
        c.pending = Some((session_id.clone(), seq, self.now));
        let body = Body::Request {
            conn: c.conn,
            openid: c.openid.clone(),
            session_id,
            seq,
        };
        self.send(End::Client(i), End::Node(node), body);
    }

    fn client_event(&mut self, i: usize, body: Body) -> Result<(), String> {
        let now = self.now;
        let c = &mut self.clients[i];
        match body {
            Body::Started {
                conn,
                session_id,
                status,
            } if conn == c.conn => {
                c.connecting = false;
                let asked = !c.session_id.is_empty();
                match status {
                    ResumeStatus::Resumed if session_id == c.session_id => {
                        c.highest = c.acked;
                    }
                    _ => {
                        if asked && status != ResumeStatus::Recovered {
                            let openid = c.openid.clone();
                            self.checks.resume_failed(&openid, now);
                        }
                        if !session_id.is_empty()
                            && let Err(at) = self.known.binary_search(&i)
                        {
                            self.known.insert(at, i);
                        }
                        let c = &mut self.clients[i];
                        c.session_id = session_id;
                        c.highest = 0;
                        c.acked = 0;
                        c.pending = None;
                        c.next_req = 1;
                    }
                }
            }
            // Refused: the Start was refused, or never answered (a dead
            // node); only while still connecting.
            Body::Refused { conn } if conn == c.conn && c.connecting => {
                c.node = None;
                c.connecting = false;
            }
            Body::Closed { conn } if conn == c.conn => {
                c.node = None;
                c.connecting = false;
            }
            Body::GoAway { conn, target } if conn == c.conn => {
                c.goaway = Some(target);
                c.node = None;
                c.connecting = false;
            }
            Body::Push { conn, push } if conn == c.conn && !c.connecting => {
                let (openid, sid, highest) = (c.openid.clone(), c.session_id.clone(), c.highest);
                Checks::push_order(&openid, &sid, highest, push.seq_id, push.redelivery)?;
                if let Ok(id) = push.content.parse::<u64>() {
                    self.checks.delivered(&openid, id);
                }
                let c = &mut self.clients[i];
                c.highest = c.highest.max(push.seq_id);
                c.acked = c.highest;
                if let Some(node) = c.node.clone() {
                    let body = Body::Ack {
                        openid,
                        session_id: sid,
                        seq: c.acked,
                    };
                    self.send(End::Client(i), End::Node(node), body);
                }
            }
            Body::Answer {
                session_id,
                seq,
                code,
            } if c
                .pending
                .as_ref()
                .is_some_and(|p| p.0 == session_id && p.1 == seq)
                && code != ErrorCode::Draining =>
            {
                c.pending = None;
            }
            _ => {}
        }
        Ok(())
    }
}

/// The control plane's node record as the watch carries it.
pub fn proto_node(n: &gatesvr_controlplane::state::NodeRec) -> DataPlaneNode {
    gatesvr_controlplane::convert::node(n)
}

/// A message in one line for the trace (payloads left out: a state or a
/// big push is never formatted).
fn short(b: &Body) -> String {
    let s = match b {
        Body::Push { conn, push } => format!(
            "Push {{ conn: {conn}, seq_id: {}, redelivery: {}, content: {:?} }}",
            push.seq_id, push.redelivery, push.content
        ),
        Body::Stage { state, epoch, req } => format!(
            "Stage {{ openid: {:?}, session_id: {:?}, epoch: {epoch}, req: {req}, next_seq_id: {} }}",
            state.openid, state.session_id, state.next_seq_id
        ),
        Body::HandoverReply { openid, req, state } => format!(
            "HandoverReply {{ openid: {openid:?}, req: {req}, state: {} }}",
            if state.is_some() { "Some" } else { "None" }
        ),
        Body::Replicate { req, wait } => format!(
            "Replicate {{ openid: {:?}, wait: {wait:?}, pushes: {} }}",
            req.openid,
            req.pushes.len()
        ),
        Body::FetchReply { req, resp } => format!(
            "FetchReply {{ req: {req}, found: {}, pushes: {} }}",
            resp.found,
            resp.pushes.len()
        ),
        Body::Bounce { to_node, original } => {
            format!(
                "Bounce {{ to_node: {to_node:?}, original: {} }}",
                short(original)
            )
        }
        Body::Timer(Timer::RetryPush(b)) => format!("Timer(RetryPush({}))", short(b)),
        other => format!("{other:?}"),
    };
    let mut s = s;
    if s.len() > 160 {
        let mut cut = 160;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// The openid a message is about, if it names one.
fn body_openid(b: &Body) -> Option<String> {
    match b {
        Body::Start { openid, .. }
        | Body::Ack { openid, .. }
        | Body::Request { openid, .. }
        | Body::UpPush { openid, .. }
        | Body::Handover { openid, .. }
        | Body::HandoverReply { openid, .. }
        | Body::StageAck { openid, .. }
        | Body::Watch(Watch::Owner { openid, .. }) => Some(openid.clone()),
        Body::Stage { state, .. } => Some(state.openid.clone()),
        Body::Timer(Timer::StartDeadline { openid, .. } | Timer::StageDeadline { openid, .. }) => {
            Some(openid.clone())
        }
        _ => None,
    }
}
