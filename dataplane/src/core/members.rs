//! Which data-plane nodes are live, decided in one place.
//!
//! Before this module the data plane had five definitions of "live node"
//! (broadcast fan-out and crash recovery skipped only `dead` nodes, so every
//! node that had drained and `left` was still waited on) and four of "peer
//! unreachable" (a Handover that timed out was taken for "owner gone" while the
//! owner may be alive). Every caller now asks [`Members`]:
//!
//! | question                               | nodes                       |
//! |----------------------------------------|-----------------------------|
//! | [`Members::is_live`]                   | active or draining          |
//! | [`Members::successors`] (drain)        | active, not this node       |
//! | [`Members::standby_for`] (durable)     | next active on the id ring, |
//! |                                        | not found unreachable       |
//! | [`Members::standby_of`] (replica heir) | the same, seen for an owner |
//! | [`Members::heirs_of`] (handoff)        | the same, in ring order     |
//! | [`Members::fan_out`] (broadcast)       | live, not this node         |
//! | [`Members::recovery_sources`]          | live, not this node or gone |
//! | [`Members::recovery_maybe`]            | dead (maybe only cut off)   |
//! | [`Members::after_failed_handover`]     | see [`Reach`]               |
//!
//! A peer a call found unreachable is marked with [`Members::mark_unreachable`]
//! until an instant, with how ([`Reach`]); this is the node's one memory of
//! unreachable peers (the Handover path kept its own, by address, until
//! session 9):
//!
//! | question                               | marks counted               |
//! |----------------------------------------|-----------------------------|
//! | [`Members::is_unreachable`] (standby)  | `Down` and `NoAnswer`       |
//! | [`Members::is_down`] (Handover not sent) | `Down` only               |
//!
//! The standby questions skip an unreachable node, so an owner whose standby
//! died copies its sessions to the next node at once instead of after the
//! control plane declares the standby dead (which takes a lease): until then
//! the owner held the only copy. Only a node where nothing listens counts as
//! down for a Handover: one that did not answer may be busy and still
//! serving (two live copies, issue 12's defect 3). An answer clears the mark
//! ([`Members::answered`]).
//!
//! Departed (`left`) and `dead` records stay in the control plane's view for a
//! while (rolling upgrades give pods new names every time); none of the
//! questions above ever returns them.

use std::collections::BTreeMap;
use std::time::Instant;

use gatesvr_proto::control::{DataPlaneNode, NodeState};

/// One node as this node last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node_id: String,
    pub state: NodeState,
    pub grpc_addr: String,
    pub quic_addr: String,
    /// When the control plane applied its last registration (0: unknown). A
    /// new value is a new process with the same node id
    /// ([`DataPlaneNode::registered_at_ms`]).
    pub registered_at_ms: i64,
}

impl Member {
    fn live(&self) -> bool {
        matches!(self.state, NodeState::Active | NodeState::Draining)
    }
}

impl From<&DataPlaneNode> for Member {
    fn from(n: &DataPlaneNode) -> Self {
        Self {
            node_id: n.node_id.clone(),
            // An unknown state number (a newer control plane) is treated as
            // not live: never waited on, never chosen.
            state: NodeState::try_from(n.state).unwrap_or(NodeState::Dead),
            grpc_addr: n.grpc_addr.clone(),
            quic_addr: n.quic_addr.clone(),
            registered_at_ms: n.registered_at_ms,
        }
    }
}

/// How a call to a peer ended, as far as its liveness is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// It answered (whatever the answer).
    Answered,
    /// Nothing listens at its address (connection refused): its process is
    /// gone, even if its lease has not expired yet.
    Down,
    /// It did not answer in time: busy, partitioned or dead, and it may still
    /// be serving. Only its lease tells.
    NoAnswer,
}

/// What a node that claimed a session does after asking the previous owner
/// for its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterHandover {
    /// The owner answered: use its answer.
    UseAnswer,
    /// Nothing listens at the owner's address: its state only survives as
    /// replicas of its durable pushes; recover from those.
    OwnerGone,
    /// The owner did not answer and the view no longer holds it live
    /// (declared dead, or left): recover from replicas as for
    /// [`AfterHandover::OwnerGone`], and ask the owner too, as every node
    /// declared dead is asked ([`Members::recovery_maybe`]): one cut off from
    /// the control plane only is alive and may hold the session, e.g. the
    /// copy of a Handover it answered whose answer was lost (simulation seed
    /// 354 of session 9).
    OwnerDeclaredDead,
    /// The owner is live in the view but did not answer: it may still hold
    /// (and serve) the session. Never start a second copy from replicas; ask
    /// again, or refuse the Start so the client retries.
    OwnerSilent,
}

/// The data-plane nodes of the cluster as seen from `me`.
#[derive(Debug, Clone, Default)]
pub struct Members {
    me: String,
    nodes: BTreeMap<String, Member>,
    /// Nodes a call found unreachable: until when, and whether nothing
    /// listened (`Down`) or nothing answered (`NoAnswer`).
    unreachable: BTreeMap<String, (Instant, Reach)>,
}

impl Members {
    pub fn new(me: impl Into<String>) -> Self {
        Self {
            me: me.into(),
            nodes: BTreeMap::new(),
            unreachable: BTreeMap::new(),
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// Replaces every node (a view snapshot or any change: level-triggered).
    pub fn set<'a>(&mut self, nodes: impl IntoIterator<Item = &'a DataPlaneNode>) {
        self.nodes = nodes
            .into_iter()
            .map(|n| (n.node_id.clone(), Member::from(n)))
            .collect();
        let nodes = &self.nodes;
        self.unreachable.retain(|id, _| nodes.contains_key(id));
    }

    /// A call to `node_id` found nothing listening (`Down`) or got no answer
    /// (`NoAnswer`): it is not chosen as a standby before `until`, and while
    /// `Down` no Handover is sent to it (a view that drops the node forgets
    /// this). A `NoAnswer` does not weaken a `Down` marked before; `Answered`
    /// clears the mark.
    pub fn mark_unreachable(&mut self, node_id: &str, reach: Reach, until: Instant) {
        if reach == Reach::Answered {
            self.answered(node_id);
            return;
        }
        if !self.nodes.contains_key(node_id) {
            return;
        }
        let mark = self
            .unreachable
            .entry(node_id.to_string())
            .or_insert((until, reach));
        *mark = match (*mark, reach) {
            ((held, Reach::Down), Reach::NoAnswer) => (held.max(until), Reach::Down),
            _ => (until, reach),
        };
    }

    /// `node_id` answered a call: it is reachable again.
    pub fn answered(&mut self, node_id: &str) {
        self.unreachable.remove(node_id);
    }

    /// Found unreachable (either way) and not yet due for another try at `now`.
    pub fn is_unreachable(&self, node_id: &str, now: Instant) -> bool {
        self.unreachable
            .get(node_id)
            .is_some_and(|(until, _)| now < *until)
    }

    /// Found with nothing listening, and not yet due for another try at `now`.
    pub fn is_down(&self, node_id: &str, now: Instant) -> bool {
        self.unreachable
            .get(node_id)
            .is_some_and(|(until, reach)| now < *until && *reach == Reach::Down)
    }

    /// Adds or updates one node (tests and the simulation).
    pub fn put(&mut self, member: Member) {
        self.nodes.insert(member.node_id.clone(), member);
    }

    pub fn get(&self, node_id: &str) -> Option<&Member> {
        self.nodes.get(node_id)
    }

    /// Active or draining: holds a lease, answers its peers, may own sessions.
    pub fn is_live(&self, node_id: &str) -> bool {
        self.nodes.get(node_id).is_some_and(Member::live)
    }

    /// `node_id`'s registration as this view has it (0: unknown), see
    /// [`Member::registered_at_ms`].
    pub fn registered_at(&self, node_id: &str) -> i64 {
        self.nodes.get(node_id).map_or(0, |m| m.registered_at_ms)
    }

    /// A live node's record (for its addresses).
    pub fn live(&self, node_id: &str) -> Option<&Member> {
        self.nodes.get(node_id).filter(|m| m.live())
    }

    fn others(&self) -> impl Iterator<Item = &Member> {
        self.nodes.values().filter(move |m| m.node_id != self.me)
    }

    /// Active nodes other than this one, by id: where a drain stages sessions.
    pub fn successors(&self) -> Vec<&Member> {
        self.others()
            .filter(|m| m.state == NodeState::Active)
            .collect()
    }

    /// The standby of this node at `now`: the next active node after it on
    /// the ring of sorted node ids that was not found unreachable (None when
    /// there is no such node).
    pub fn standby_for(&self, now: Instant) -> Option<&Member> {
        self.standby_ring(now).into_iter().next()
    }

    /// The standby `owner` picks (the next active node after it on the ring),
    /// never this node: where a leaving standby hands the replicas it holds
    /// for `owner`, so that they outlive it (the owner moves its sessions to
    /// that node too, but only at its next ack sync: a crash of the owner
    /// between this node's leave and that sync lost what only it held).
    /// `owner` may be dead or gone: its replicas are what a recovery needs.
    /// Nodes found unreachable at `now` are passed over (simulation seed 647
    /// of session 9: leaving nodes whose views were stale handed the only
    /// copies of a crashed owner's pushes to a departed heir three times
    /// each, and left).
    pub fn standby_of(&self, owner: &str, now: Instant) -> Option<&Member> {
        self.heirs_of(owner, now).into_iter().next()
    }

    /// Every node [`Members::standby_of`] could pick for `owner`, in the
    /// order it picks them: active nodes after `owner` on the id ring, never
    /// this node or `owner`, none found unreachable at `now`. A leaving node
    /// hands its replicas to the first [`crate::replica::HANDOFF_HOLDERS`].
    pub fn heirs_of(&self, owner: &str, now: Instant) -> Vec<&Member> {
        let active: Vec<&Member> = self
            .others()
            .filter(|m| m.state == NodeState::Active && m.node_id != owner)
            .filter(|m| !self.is_unreachable(&m.node_id, now))
            .collect();
        let split = active
            .iter()
            .position(|m| m.node_id.as_str() > owner)
            .unwrap_or(0);
        active[split..]
            .iter()
            .chain(&active[..split])
            .copied()
            .collect()
    }

    /// Every active node in ring order after this one, without the ones
    /// found unreachable at `now`: the first is the standby; the next ones are
    /// where a durable push goes when the standby does not answer (it may have
    /// exited a moment ago in a rollout, before the view says so).
    pub fn standby_ring(&self, now: Instant) -> Vec<&Member> {
        let active: Vec<&Member> = self
            .successors()
            .into_iter()
            .filter(|m| !self.is_unreachable(&m.node_id, now))
            .collect();
        let split = active
            .iter()
            .position(|m| m.node_id.as_str() > self.me.as_str())
            .unwrap_or(0);
        active[split..]
            .iter()
            .chain(&active[..split])
            .copied()
            .collect()
    }

    /// Live nodes other than this one: a broadcast reaches their sessions.
    pub fn fan_out(&self) -> Vec<&Member> {
        self.others().filter(|m| m.live()).collect()
    }

    /// Live nodes other than this one and `gone`: the ones that may hold
    /// replicas of a crashed owner's durable pushes and can answer for them.
    pub fn recovery_sources(&self, gone: &str) -> Vec<&Member> {
        self.others()
            .filter(|m| m.live() && m.node_id != gone)
            .collect()
    }

    /// Nodes the control plane declared dead, other than this one and
    /// `gone`: most are, but one cut off from the control plane only is alive
    /// and may hold the last copy of a crashed owner's pushes. A recovery asks
    /// them too, briefly, and never waits on them.
    pub fn recovery_maybe(&self, gone: &str) -> Vec<&Member> {
        self.others()
            .filter(|m| m.state == NodeState::Dead && m.node_id != gone)
            .collect()
    }

    /// After asking `owner` for a session's state: what its silence means.
    pub fn after_failed_handover(&self, owner: &str, reach: Reach) -> AfterHandover {
        match reach {
            Reach::Answered => AfterHandover::UseAnswer,
            Reach::Down => AfterHandover::OwnerGone,
            Reach::NoAnswer if self.is_live(owner) => AfterHandover::OwnerSilent,
            Reach::NoAnswer => AfterHandover::OwnerDeclaredDead,
        }
    }
}
