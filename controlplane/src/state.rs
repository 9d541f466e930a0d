//! The replicated state and its transition function.
//!
//! [`State::apply`] is a pure function of the state, the entry's leader timestamp and a
//! command: no clock, no I/O, no randomness. Every replica applying the same log reaches the
//! same state, which is what makes leases judged "from the log" and fencing epochs safe.
//!
//! Each change bumps [`State::version`] once and reports a [`Touched`] key; the watch hub
//! turns the touched keys into `WatchEvent`s carrying that version, so a watcher can resume from any version it has seen (on any replica).

pub mod cmd;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use cmd::{Cmd, CmdError, CmdResult};

/// `owner_node` of a session an operator disconnected (`gatectl sessions disconnect`): no
/// data-plane node has this id, so the node that held the session sees it owned elsewhere and
/// closes it; the next claim by any node takes it over at a newer epoch.
pub const DISCONNECTED_OWNER: &str = "";

/// How many failover decisions the state keeps (older ones are dropped deterministically).
pub const FAILOVER_HISTORY: usize = 256;

/// How far a restore moves `last_epoch` past the larger of the backup's and the running
/// cluster's. Data-plane nodes that outlived the lost cluster may hold sessions at epochs
/// handed out after the backup was taken; every epoch issued after the restore must be
/// newer than those for fencing to stay right. 2^32 ownership changes between a backup and
/// the disaster is far beyond anything real, and u64 epochs leave room for 2^32 restores.
pub const RESTORE_EPOCH_GAP: u64 = 1 << 32;

/// An upstream registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamRec {
    pub instance_id: String,
    pub zone: String,
    pub address: String,
    pub service_name: String,
    pub registered_at_ms: i64,
    /// 0 for a static registration that never expires.
    pub lease_expires_at_ms: i64,
    /// 0 for a static registration.
    pub lease_ttl_ms: u32,
}

/// A data-plane node's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Active,
    Draining,
    /// Its lease expired (crash, partition).
    Dead,
    /// It drained and said goodbye (`LeaveNode`).
    Left,
}

impl NodeStatus {
    /// Holds a lease that can expire (active or draining).
    pub fn is_live(self) -> bool {
        matches!(self, NodeStatus::Active | NodeStatus::Draining)
    }
}

/// A data-plane node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRec {
    pub node_id: String,
    pub quic_addr: String,
    pub grpc_addr: String,
    pub status: NodeStatus,
    pub lease_expires_at_ms: i64,
    pub lease_ttl_ms: u32,
    /// An operator asked it to drain; reported back on its next heartbeat.
    pub drain_requested: bool,
    /// Sessions it reported on its last heartbeat.
    pub sessions: u64,
    /// An operator cordoned it: it keeps the sessions it owns but may claim no new ones
    /// (`gatectl nodes cordon`). Added after v1 records were written, hence the default.
    #[serde(default)]
    pub cordoned: bool,
    /// The node itself reported draining on a heartbeat (a drain it started can no longer
    /// be cancelled).
    #[serde(default)]
    pub draining_reported: bool,
    /// When its last registration was applied (the control plane's clock): a
    /// new value is a new process with the same node id, which holds none of
    /// the old one's sessions (replica holders give those a second copy).
    /// Added after v1 records were written, hence the default.
    #[serde(default)]
    pub registered_at_ms: i64,
}

/// Who owns a session. `epoch` is the fencing token: it increases on every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRec {
    pub session_id: String,
    pub owner_node: String,
    pub epoch: u64,
    pub changed_at_ms: i64,
    /// The fresh session a Start that resumed `session_id` made if the resume failed
    /// (`Claim::fresh_session_id`): lookups by session id match either, so that Start
    /// claims once. Kept while the record only changes owner (transfer, disconnect).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fresh_session_id: String,
}

impl OwnerRec {
    /// Whether this record is session `session_id`'s (its claimed or its fresh id).
    pub fn names_session(&self, session_id: &str) -> bool {
        self.session_id == session_id
            || (!self.fresh_session_id.is_empty() && self.fresh_session_id == session_id)
    }
}

/// A failover decision: a node was declared dead, and where its sessions went since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRec {
    pub seq: u64,
    pub failed_node: String,
    pub decided_at_ms: i64,
    /// Sessions it owned when it was declared dead.
    pub sessions: u64,
    /// Claimant node -> sessions claimed away from the failed node since.
    pub moved_to: BTreeMap<String, u64>,
}

/// A key whose value changed; `notify` is false for lease renewals, which are persisted but
/// not pushed to watchers (they would drown the stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touched {
    pub key: Key,
    /// The state version this change produced, if watchers should hear about it.
    pub version: Option<u64>,
    /// For an owner record: the node that owned the session just before this change
    /// (`None` if it had no record). A scoped watch tells that node too: its copy of the
    /// session was claimed away, transferred, released or disconnected.
    pub owner_was: Option<String>,
}

impl Touched {
    /// The data-plane nodes a scoped watch tells about this change: for an owner record,
    /// its owner now (in `st`) and its owner before; `None` (everyone) for anything else.
    pub fn concerns(&self, st: &State) -> Option<Vec<String>> {
        let Key::Owner(openid) = &self.key else {
            return None;
        };
        let mut nodes: Vec<String> = Vec::with_capacity(2);
        if let Some(o) = st.owners.get(openid) {
            nodes.push(o.owner_node.clone());
        }
        if let Some(was) = &self.owner_was
            && !nodes.contains(was)
        {
            nodes.push(was.clone());
        }
        Some(nodes)
    }
}

/// The addressable records of the state.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Upstream(String),
    Node(String),
    Owner(String),
    Failover(u64),
}

/// Owner records by openid. A persistent B-tree: cloning it (a snapshot's copy of the state)
/// shares every node and costs O(1); a write after that copies only the nodes on its path
/// that the copy still holds. A deep clone of a `BTreeMap` of ~300k owners stalled a
/// member's runtime for 120-340 ms per snapshot (docs/benchmarks.md, "Session 14"). Same
/// JSON as a map.
pub type Owners = imbl::OrdMap<String, OwnerRec>;

/// The whole replicated state (also the snapshot format, as JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Bumped once per notified change; watchers resume from it.
    pub version: u64,
    /// Last epoch handed out; epochs are global so an openid released and claimed again
    /// never reuses an old epoch.
    pub last_epoch: u64,
    /// Last failover sequence number.
    pub last_failover: u64,
    pub upstreams: BTreeMap<String, UpstreamRec>,
    pub nodes: BTreeMap<String, NodeRec>,
    pub owners: Owners,
    pub failovers: BTreeMap<u64, FailoverRec>,
}

impl State {
    /// Applies one command at the leader's time `now_ms`, recording touched keys in `touched`.
    pub fn apply(&mut self, now_ms: i64, cmd: &Cmd, touched: &mut Vec<Touched>) -> CmdResult {
        let mut cx = Cx {
            st: self,
            touched,
            now_ms,
        };
        match cmd {
            Cmd::RegisterUpstream {
                instance_id,
                zone,
                address,
                service_name,
                lease_ttl_ms,
            } => cx.register_upstream(instance_id, zone, address, service_name, *lease_ttl_ms),
            Cmd::HeartbeatUpstream { instance_id } => cx.heartbeat_upstream(instance_id),
            Cmd::DeregisterUpstream { instance_id } => cx.deregister_upstream(instance_id),
            Cmd::RegisterNode {
                node_id,
                quic_addr,
                grpc_addr,
                lease_ttl_ms,
            } => cx.register_node(node_id, quic_addr, grpc_addr, *lease_ttl_ms),
            Cmd::HeartbeatNode {
                node_id,
                draining,
                sessions,
            } => cx.heartbeat_node(node_id, *draining, *sessions),
            Cmd::DrainNode { node_id } => cx.drain_node(node_id),
            Cmd::ExpireLeases => cx.expire_leases(),
            Cmd::Claim {
                node_id,
                openid,
                session_id,
                fresh_session_id,
            } => cx.claim(node_id, openid, session_id, fresh_session_id),
            Cmd::Release {
                node_id,
                openid,
                epoch,
            } => cx.release(node_id, openid, *epoch),
            Cmd::Transfer {
                openid,
                expected_epoch,
                to_node,
            } => cx.transfer(openid, *expected_epoch, to_node),
            Cmd::LeaveNode { node_id } => cx.leave_node(node_id),
            Cmd::Restore { state, .. } => cx.restore(state),
            Cmd::CordonNode { node_id, cordoned } => cx.cordon_node(node_id, *cordoned),
            Cmd::CancelDrain { node_id } => cx.cancel_drain(node_id),
            Cmd::RemoveNode { node_id } => cx.remove_node(node_id),
            Cmd::DisconnectSession { openid } => cx.disconnect_session(openid),
            Cmd::Sweep {
                orphan_timeout_ms,
                node_retention_ms,
            } => cx.sweep(*orphan_timeout_ms, *node_retention_ms),
        }
    }

    /// Whether [`Cmd::Sweep`] has anything to do at `now_ms` (the leader's lease task asks).
    /// Cheap unless a departed node is past `orphan_timeout_ms`: then its owners are counted.
    pub fn has_sweep_due(
        &self,
        now_ms: i64,
        orphan_timeout_ms: u64,
        node_retention_ms: u64,
    ) -> bool {
        let since = |n: &NodeRec| now_ms.saturating_sub(n.lease_expires_at_ms);
        self.nodes
            .values()
            .filter(|n| !n.status.is_live())
            .any(|n| {
                since(n) >= node_retention_ms as i64
                    || (since(n) >= orphan_timeout_ms as i64
                        && self.owners.values().any(|o| o.owner_node == n.node_id))
            })
    }

    /// The owner records of `openids`, and of the sessions `session_ids` (one scan of
    /// every record, only when some are asked for): for `LookupOwners`. Each record once.
    pub fn lookup_owners<'a>(
        &'a self,
        openids: &[String],
        session_ids: &[String],
    ) -> Vec<(&'a str, &'a OwnerRec)> {
        let mut found: BTreeMap<&str, &OwnerRec> = openids
            .iter()
            .filter_map(|o| self.owners.get_key_value(o))
            .map(|(k, o)| (k.as_str(), o))
            .collect();
        if !session_ids.is_empty() {
            for (openid, o) in &self.owners {
                if session_ids.iter().any(|s| o.names_session(s)) {
                    found.insert(openid.as_str(), o);
                }
            }
        }
        found.into_iter().collect()
    }

    /// Whether any lease has ended by `now_ms` (the leader's lease task asks this).
    pub fn has_expired_leases(&self, now_ms: i64) -> bool {
        self.nodes
            .values()
            .any(|n| n.status.is_live() && n.lease_expires_at_ms < now_ms)
            || self
                .upstreams
                .values()
                .any(|u| u.lease_expires_at_ms != 0 && u.lease_expires_at_ms < now_ms)
    }

    /// The upstream registered at (zone, address), if any.
    fn upstream_at(&self, zone: &str, address: &str) -> Option<&UpstreamRec> {
        self.upstreams
            .values()
            .find(|u| u.zone == zone && u.address == address)
    }
}

/// One command's application context.
struct Cx<'a> {
    st: &'a mut State,
    touched: &'a mut Vec<Touched>,
    now_ms: i64,
}

fn not_found(what: impl Into<String>) -> CmdResult {
    CmdResult::Err(CmdError::NotFound { what: what.into() })
}

fn lease_end(now_ms: i64, ttl_ms: u32) -> i64 {
    now_ms.saturating_add(i64::from(ttl_ms))
}

impl Cx<'_> {
    fn touch(&mut self, key: Key, notify: bool) {
        let version = notify.then(|| {
            self.st.version += 1;
            self.st.version
        });
        self.touched.push(Touched {
            key,
            version,
            owner_was: None,
        });
    }

    /// Touches `openid`'s owner record, which `owner_was` held before this change.
    fn touch_owner(&mut self, openid: &str, owner_was: Option<String>) {
        self.touch(Key::Owner(openid.to_string()), true);
        if let Some(t) = self.touched.last_mut() {
            t.owner_was = owner_was;
        }
    }

    fn register_upstream(
        &mut self,
        instance_id: &str,
        zone: &str,
        address: &str,
        service_name: &str,
        lease_ttl_ms: Option<u32>,
    ) -> CmdResult {
        let now = self.now_ms;
        let lease = |ttl: Option<u32>| ttl.map_or(0, |t| lease_end(now, t));
        if let Some(existing) = self.st.upstream_at(zone, address) {
            if existing.service_name != service_name {
                return CmdResult::Err(CmdError::Conflict {
                    message: format!(
                        "{address} in zone {zone} is already registered for service `{}` ({})",
                        existing.service_name, existing.instance_id
                    ),
                });
            }
            let id = existing.instance_id.clone();
            let rec = self.st.upstreams.get_mut(&id).map(|u| {
                u.lease_expires_at_ms = lease(lease_ttl_ms);
                u.lease_ttl_ms = lease_ttl_ms.unwrap_or(0);
                u.clone()
            });
            self.touch(Key::Upstream(id), false);
            return match rec {
                Some(upstream) => CmdResult::Upstream {
                    upstream,
                    created: false,
                },
                None => not_found("upstream"),
            };
        }
        if instance_id.is_empty() || self.st.upstreams.contains_key(instance_id) {
            return CmdResult::Err(CmdError::Invalid {
                message: format!("instance id `{instance_id}` is empty or taken"),
            });
        }
        let rec = UpstreamRec {
            instance_id: instance_id.to_string(),
            zone: zone.to_string(),
            address: address.to_string(),
            service_name: service_name.to_string(),
            registered_at_ms: now,
            lease_expires_at_ms: lease(lease_ttl_ms),
            lease_ttl_ms: lease_ttl_ms.unwrap_or(0),
        };
        self.st
            .upstreams
            .insert(instance_id.to_string(), rec.clone());
        self.touch(Key::Upstream(instance_id.to_string()), true);
        CmdResult::Upstream {
            upstream: rec,
            created: true,
        }
    }

    fn heartbeat_upstream(&mut self, instance_id: &str) -> CmdResult {
        let now = self.now_ms;
        let Some(u) = self.st.upstreams.get_mut(instance_id) else {
            return not_found(format!("upstream {instance_id}"));
        };
        if u.lease_ttl_ms != 0 {
            u.lease_expires_at_ms = lease_end(now, u.lease_ttl_ms);
        }
        let expires = u.lease_expires_at_ms;
        self.touch(Key::Upstream(instance_id.to_string()), false);
        CmdResult::Lease {
            lease_expires_at_ms: expires,
            drain_requested: false,
        }
    }

    fn deregister_upstream(&mut self, instance_id: &str) -> CmdResult {
        if self.st.upstreams.remove(instance_id).is_none() {
            return not_found(format!("upstream {instance_id}"));
        }
        self.touch(Key::Upstream(instance_id.to_string()), true);
        CmdResult::Ok
    }

    fn register_node(
        &mut self,
        node_id: &str,
        quic_addr: &str,
        grpc_addr: &str,
        lease_ttl_ms: u32,
    ) -> CmdResult {
        let rec = NodeRec {
            node_id: node_id.to_string(),
            quic_addr: quic_addr.to_string(),
            grpc_addr: grpc_addr.to_string(),
            status: NodeStatus::Active,
            lease_expires_at_ms: lease_end(self.now_ms, lease_ttl_ms),
            lease_ttl_ms,
            drain_requested: false,
            sessions: 0,
            // Cordoning is an operator's decision; a re-registration (restart) keeps it.
            cordoned: self.st.nodes.get(node_id).is_some_and(|n| n.cordoned),
            draining_reported: false,
            registered_at_ms: self.now_ms,
        };
        let changed = self.st.nodes.get(node_id).is_none_or(|old| {
            old.status != rec.status
                || old.quic_addr != rec.quic_addr
                || old.grpc_addr != rec.grpc_addr
                || old.drain_requested
                || old.registered_at_ms != rec.registered_at_ms
        });
        self.st.nodes.insert(node_id.to_string(), rec.clone());
        self.touch(Key::Node(node_id.to_string()), changed);
        CmdResult::Lease {
            lease_expires_at_ms: rec.lease_expires_at_ms,
            drain_requested: false,
        }
    }

    fn heartbeat_node(&mut self, node_id: &str, draining: bool, sessions: u64) -> CmdResult {
        let now = self.now_ms;
        let Some(n) = self.st.nodes.get_mut(node_id) else {
            return CmdResult::Err(CmdError::NodeNotActive {
                node_id: node_id.to_string(),
                reason: "unknown node".into(),
            });
        };
        if !n.status.is_live() {
            let reason = if n.status == NodeStatus::Left {
                "it left the cluster"
            } else {
                "declared dead after its lease expired"
            };
            return CmdResult::Err(CmdError::NodeNotActive {
                node_id: node_id.to_string(),
                reason: reason.into(),
            });
        }
        let changed = draining && (n.status == NodeStatus::Active || !n.draining_reported);
        if draining {
            n.status = NodeStatus::Draining;
            n.draining_reported = true;
        }
        n.lease_expires_at_ms = lease_end(now, n.lease_ttl_ms);
        n.sessions = sessions;
        let result = CmdResult::Lease {
            lease_expires_at_ms: n.lease_expires_at_ms,
            drain_requested: n.drain_requested,
        };
        self.touch(Key::Node(node_id.to_string()), changed);
        result
    }

    fn drain_node(&mut self, node_id: &str) -> CmdResult {
        let Some(n) = self.st.nodes.get_mut(node_id) else {
            return not_found(format!("node {node_id}"));
        };
        if !n.status.is_live() {
            return CmdResult::Err(CmdError::NodeNotActive {
                node_id: node_id.to_string(),
                reason: "already dead or left".into(),
            });
        }
        let changed = !n.drain_requested || n.status != NodeStatus::Draining;
        n.drain_requested = true;
        n.status = NodeStatus::Draining;
        self.touch(Key::Node(node_id.to_string()), changed);
        CmdResult::Ok
    }

    fn cordon_node(&mut self, node_id: &str, cordoned: bool) -> CmdResult {
        let Some(n) = self.st.nodes.get_mut(node_id) else {
            return not_found(format!("node {node_id}"));
        };
        if !n.status.is_live() && cordoned {
            return CmdResult::Err(CmdError::NodeNotActive {
                node_id: node_id.to_string(),
                reason: "dead or left".into(),
            });
        }
        let changed = n.cordoned != cordoned;
        n.cordoned = cordoned;
        self.touch(Key::Node(node_id.to_string()), changed);
        CmdResult::Ok
    }

    fn cancel_drain(&mut self, node_id: &str) -> CmdResult {
        let Some(n) = self.st.nodes.get_mut(node_id) else {
            return not_found(format!("node {node_id}"));
        };
        if n.draining_reported || !n.status.is_live() {
            return CmdResult::Err(CmdError::Conflict {
                message: format!(
                    "node {node_id} already started draining (or is gone); a started drain cannot be cancelled"
                ),
            });
        }
        let changed = n.drain_requested || n.status != NodeStatus::Active;
        n.drain_requested = false;
        n.status = NodeStatus::Active;
        self.touch(Key::Node(node_id.to_string()), changed);
        CmdResult::Ok
    }

    fn remove_node(&mut self, node_id: &str) -> CmdResult {
        let Some(n) = self.st.nodes.get(node_id) else {
            return not_found(format!("node {node_id}"));
        };
        if n.status.is_live() {
            return CmdResult::Err(CmdError::Conflict {
                message: format!(
                    "node {node_id} is {}: only dead or departed nodes can be removed (drain it first)",
                    if n.status == NodeStatus::Active {
                        "active"
                    } else {
                        "draining"
                    }
                ),
            });
        }
        self.st.nodes.remove(node_id);
        self.touch(Key::Node(node_id.to_string()), true);
        CmdResult::Ok
    }

    /// See [`Cmd::Sweep`].
    fn sweep(&mut self, orphan_timeout_ms: u64, node_retention_ms: u64) -> CmdResult {
        let now = self.now_ms;
        let orphaned: Vec<String> = self
            .st
            .owners
            .iter()
            .filter(|(_, o)| {
                let since = match self.st.nodes.get(&o.owner_node) {
                    Some(n) if n.status.is_live() => return false,
                    Some(n) => n.lease_expires_at_ms.max(o.changed_at_ms),
                    None => o.changed_at_ms,
                };
                now.saturating_sub(since) >= orphan_timeout_ms as i64
            })
            .map(|(openid, _)| openid.clone())
            .collect();
        for openid in orphaned {
            let was = self.st.owners.remove(&openid).map(|o| o.owner_node);
            self.touch_owner(&openid, was);
        }
        let departed: Vec<String> = self
            .st
            .nodes
            .values()
            .filter(|n| {
                !n.status.is_live()
                    && now.saturating_sub(n.lease_expires_at_ms) >= node_retention_ms as i64
            })
            .map(|n| n.node_id.clone())
            .collect();
        for id in departed {
            self.st.nodes.remove(&id);
            self.touch(Key::Node(id), true);
        }
        CmdResult::Ok
    }

    fn disconnect_session(&mut self, openid: &str) -> CmdResult {
        let Some(current) = self.st.owners.get(openid).cloned() else {
            return not_found(format!("session of {openid}"));
        };
        if current.owner_node == DISCONNECTED_OWNER {
            return CmdResult::Ok;
        }
        let owner = self.set_owner(
            openid,
            &current.session_id,
            &current.fresh_session_id,
            DISCONNECTED_OWNER,
        );
        CmdResult::Owned {
            openid: openid.to_string(),
            owner,
            previous_owner: Some(current.owner_node),
            previous_epoch: current.epoch,
        }
    }

    fn expire_leases(&mut self) -> CmdResult {
        let now = self.now_ms;
        let dead_nodes: Vec<String> = self
            .st
            .nodes
            .values()
            .filter(|n| n.status.is_live() && n.lease_expires_at_ms < now)
            .map(|n| n.node_id.clone())
            .collect();
        for id in &dead_nodes {
            if let Some(n) = self.st.nodes.get_mut(id) {
                n.status = NodeStatus::Dead;
            }
            self.touch(Key::Node(id.clone()), true);
            let sessions = self.owned_by(id);
            self.record_failover(id, sessions);
        }
        let dead_upstreams: Vec<String> = self
            .st
            .upstreams
            .values()
            .filter(|u| u.lease_expires_at_ms != 0 && u.lease_expires_at_ms < now)
            .map(|u| u.instance_id.clone())
            .collect();
        for id in &dead_upstreams {
            self.st.upstreams.remove(id);
            self.touch(Key::Upstream(id.clone()), true);
        }
        CmdResult::Expired {
            nodes: dead_nodes,
            upstreams: dead_upstreams,
        }
    }

    /// How many sessions are recorded as `node_id`'s.
    fn owned_by(&self, node_id: &str) -> u64 {
        self.st
            .owners
            .values()
            .filter(|o| o.owner_node == node_id)
            .count() as u64
    }

    /// Records that `node_id` is gone with `sessions` still its own (bounded history).
    fn record_failover(&mut self, node_id: &str, sessions: u64) {
        self.st.last_failover += 1;
        let seq = self.st.last_failover;
        self.st.failovers.insert(
            seq,
            FailoverRec {
                seq,
                failed_node: node_id.to_string(),
                decided_at_ms: self.now_ms,
                sessions,
                moved_to: BTreeMap::new(),
            },
        );
        self.touch(Key::Failover(seq), true);
        while self.st.failovers.len() > FAILOVER_HISTORY {
            if let Some((&oldest, _)) = self.st.failovers.iter().next() {
                self.st.failovers.remove(&oldest);
                self.touch(Key::Failover(oldest), false);
            }
        }
    }

    fn leave_node(&mut self, node_id: &str) -> CmdResult {
        let Some(n) = self.st.nodes.get_mut(node_id) else {
            return not_found(format!("node {node_id}"));
        };
        if n.status == NodeStatus::Left {
            // A retried leave: same answer.
            let orphaned = self.owned_by(node_id);
            return CmdResult::Left { orphaned };
        }
        let was_dead = n.status == NodeStatus::Dead;
        n.status = NodeStatus::Left;
        n.lease_expires_at_ms = self.now_ms;
        n.drain_requested = false;
        self.touch(Key::Node(node_id.to_string()), true);
        let orphaned = self.owned_by(node_id);
        // A dead node already has its failover decision.
        if orphaned > 0 && !was_dead {
            self.record_failover(node_id, orphaned);
        }
        CmdResult::Left { orphaned }
    }

    fn restore(&mut self, backup: &State) -> CmdResult {
        let now = self.now_ms;
        // Versions only move forward, so a watcher never sees one twice.
        self.st.version = self.st.version.max(backup.version);
        let mut skipped = 0;
        let mut upstreams = 0;
        for (id, u) in &backup.upstreams {
            if self.st.upstreams.contains_key(id)
                || self.st.upstream_at(&u.zone, &u.address).is_some()
            {
                skipped += 1;
                continue;
            }
            let mut u = u.clone();
            if u.lease_ttl_ms != 0 {
                u.lease_expires_at_ms = lease_end(now, u.lease_ttl_ms);
            }
            self.st.upstreams.insert(id.clone(), u);
            self.touch(Key::Upstream(id.clone()), true);
            upstreams += 1;
        }
        let mut nodes = 0;
        for (id, n) in &backup.nodes {
            if self.st.nodes.contains_key(id) {
                skipped += 1;
                continue;
            }
            let mut n = n.clone();
            // A node alive at the backup gets one lease to heartbeat the new cluster.
            if n.status.is_live() {
                n.lease_expires_at_ms = lease_end(now, n.lease_ttl_ms);
            }
            n.drain_requested = false;
            self.st.nodes.insert(id.clone(), n);
            self.touch(Key::Node(id.clone()), true);
            nodes += 1;
        }
        let mut owners = 0;
        for (openid, o) in &backup.owners {
            if self.st.owners.contains_key(openid) {
                skipped += 1;
                continue;
            }
            self.st.owners.insert(openid.clone(), o.clone());
            self.touch_owner(openid, None);
            owners += 1;
        }
        // Failover history only into an empty one (sequence numbers would interleave).
        let mut failovers = 0;
        if self.st.failovers.is_empty() {
            for (seq, f) in &backup.failovers {
                self.st.failovers.insert(*seq, f.clone());
                self.touch(Key::Failover(*seq), true);
                failovers += 1;
            }
            self.st.last_failover = self.st.last_failover.max(backup.last_failover);
        } else {
            skipped += backup.failovers.len() as u64;
        }
        self.st.last_epoch = self
            .st
            .last_epoch
            .max(backup.last_epoch)
            .saturating_add(RESTORE_EPOCH_GAP);
        CmdResult::Restored {
            upstreams,
            nodes,
            owners,
            failovers,
            skipped,
            last_epoch: self.st.last_epoch,
        }
    }

    /// `Ok(())` if `node_id` may own sessions at this entry's time.
    fn check_owner_node(&self, node_id: &str) -> Result<(), CmdError> {
        let inactive = |reason: &str| CmdError::NodeNotActive {
            node_id: node_id.to_string(),
            reason: reason.into(),
        };
        match self.st.nodes.get(node_id) {
            None => Err(inactive("unknown node")),
            Some(n) if n.status == NodeStatus::Dead => Err(inactive("declared dead")),
            Some(n) if n.status == NodeStatus::Left => Err(inactive("left the cluster")),
            Some(n) if n.lease_expires_at_ms < self.now_ms => Err(inactive("lease expired")),
            Some(_) => Ok(()),
        }
    }

    /// A claim's node, checked as [`Self::check_owner_node`] does, except for a lease that ran
    /// out while the node was never declared dead: the claim renews it, as the node's heartbeat
    /// would. That is a leader election longer than the lease: no leader could renew it, the
    /// new leader's lease keeper waits a whole lease before declaring anyone dead, and the
    /// node's heartbeat may still be in its back-off when its clients' Starts arrive. A claim
    /// the leader commits shows the node alive as surely as a heartbeat; refusing it sent those
    /// clients away with DRAINING (`gate-bench failover` part (b)). The node's own lease view,
    /// which gates its durable pushes, still waits for its next heartbeat: it only ever ends
    /// before this one.
    fn renew_claimant(&mut self, node_id: &str) -> Result<(), CmdError> {
        let now = self.now_ms;
        match self.st.nodes.get_mut(node_id) {
            Some(n) if n.status.is_live() && n.lease_expires_at_ms < now => {
                n.lease_expires_at_ms = lease_end(now, n.lease_ttl_ms);
                self.touch(Key::Node(node_id.to_string()), false);
                Ok(())
            }
            _ => self.check_owner_node(node_id),
        }
    }

    fn set_owner(
        &mut self,
        openid: &str,
        session_id: &str,
        fresh_session_id: &str,
        node_id: &str,
    ) -> OwnerRec {
        self.st.last_epoch += 1;
        let rec = OwnerRec {
            session_id: session_id.to_string(),
            owner_node: node_id.to_string(),
            epoch: self.st.last_epoch,
            changed_at_ms: self.now_ms,
            fresh_session_id: fresh_session_id.to_string(),
        };
        let was = self
            .st
            .owners
            .insert(openid.to_string(), rec.clone())
            .map(|o| o.owner_node);
        self.touch_owner(openid, was);
        rec
    }

    /// Counts a session moving off a dead node in that node's latest failover decision.
    fn record_move(&mut self, from: &str, to: &str) {
        let from_dead = self.st.nodes.get(from).is_some_and(|n| !n.status.is_live());
        if !from_dead {
            return;
        }
        let seq = self
            .st
            .failovers
            .values()
            .rev()
            .find(|f| f.failed_node == from)
            .map(|f| f.seq);
        if let Some(seq) = seq {
            if let Some(f) = self.st.failovers.get_mut(&seq) {
                *f.moved_to.entry(to.to_string()).or_default() += 1;
            }
            self.touch(Key::Failover(seq), false);
        }
    }

    fn claim(
        &mut self,
        node_id: &str,
        openid: &str,
        session_id: &str,
        fresh_session_id: &str,
    ) -> CmdResult {
        if openid.is_empty() {
            return CmdResult::Err(CmdError::Invalid {
                message: "empty openid".into(),
            });
        }
        if let Err(e) = self.renew_claimant(node_id) {
            return CmdResult::Err(e);
        }
        let previous = self.st.owners.get(openid).cloned();
        let cordoned = self.st.nodes.get(node_id).is_some_and(|n| n.cordoned);
        if cordoned && previous.as_ref().is_none_or(|p| p.owner_node != node_id) {
            return CmdResult::Err(CmdError::NodeNotActive {
                node_id: node_id.to_string(),
                reason: "cordoned: it keeps its sessions but takes no new ones".into(),
            });
        }
        if let Some(p) = &previous {
            if p.owner_node == node_id && p.session_id == session_id {
                // A retried claim: same answer, same epoch (and the fresh id recorded
                // first: the claimant makes its fresh session with the one it is told).
                return CmdResult::Owned {
                    openid: openid.to_string(),
                    owner: p.clone(),
                    previous_owner: None,
                    previous_epoch: p.epoch,
                };
            }
            if p.owner_node != node_id {
                self.record_move(&p.owner_node.clone(), node_id);
            }
        }
        // A fresh id equal to the claimed one would name two sessions alike: not recorded.
        let fresh = if fresh_session_id == session_id {
            ""
        } else {
            fresh_session_id
        };
        let owner = self.set_owner(openid, session_id, fresh, node_id);
        CmdResult::Owned {
            openid: openid.to_string(),
            owner,
            previous_owner: previous.as_ref().map(|p| p.owner_node.clone()),
            previous_epoch: previous.map_or(0, |p| p.epoch),
        }
    }

    fn fenced(openid: &str, rec: Option<&OwnerRec>) -> CmdError {
        CmdError::Fenced {
            openid: openid.to_string(),
            current_epoch: rec.map_or(0, |r| r.epoch),
            owner: rec.map_or_else(String::new, |r| r.owner_node.clone()),
        }
    }

    fn release(&mut self, node_id: &str, openid: &str, epoch: u64) -> CmdResult {
        let current = self.st.owners.get(openid);
        if current.is_some_and(|r| r.owner_node == node_id && r.epoch == epoch) {
            let was = self.st.owners.remove(openid).map(|o| o.owner_node);
            self.touch_owner(openid, was);
            CmdResult::Released { released: true }
        } else {
            CmdResult::Released { released: false }
        }
    }

    fn transfer(&mut self, openid: &str, expected_epoch: u64, to_node: &str) -> CmdResult {
        let Some(current) = self.st.owners.get(openid).cloned() else {
            return not_found(format!("session of {openid}"));
        };
        if current.epoch != expected_epoch {
            return CmdResult::Err(Self::fenced(openid, Some(&current)));
        }
        if let Err(e) = self.check_owner_node(to_node) {
            return CmdResult::Err(e);
        }
        self.record_move(&current.owner_node, to_node);
        let owner = self.set_owner(
            openid,
            &current.session_id,
            &current.fresh_session_id,
            to_node,
        );
        CmdResult::Owned {
            openid: openid.to_string(),
            owner,
            previous_owner: Some(current.owner_node),
            previous_epoch: current.epoch,
        }
    }
}

#[cfg(test)]
mod tests;
