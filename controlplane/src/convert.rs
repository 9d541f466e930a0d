//! Conversions between the replicated records and the `gatesvr.control.v1` messages.

use gatesvr_proto::control as pb;

use crate::state::{FailoverRec, Key, NodeRec, NodeStatus, OwnerRec, State, UpstreamRec};

pub fn upstream(u: &UpstreamRec) -> pb::Upstream {
    pb::Upstream {
        zone: u.zone.clone(),
        address: u.address.clone(),
        service_name: u.service_name.clone(),
        registered_at_ms: u.registered_at_ms,
        lease_expires_at_ms: u.lease_expires_at_ms,
        instance_id: u.instance_id.clone(),
    }
}

pub fn node_state(s: NodeStatus) -> pb::NodeState {
    match s {
        NodeStatus::Active => pb::NodeState::Active,
        NodeStatus::Draining => pb::NodeState::Draining,
        NodeStatus::Dead => pb::NodeState::Dead,
        NodeStatus::Left => pb::NodeState::Left,
    }
}

pub fn node(n: &NodeRec) -> pb::DataPlaneNode {
    pb::DataPlaneNode {
        node_id: n.node_id.clone(),
        quic_addr: n.quic_addr.clone(),
        grpc_addr: n.grpc_addr.clone(),
        state: node_state(n.status).into(),
        lease_expires_at_ms: n.lease_expires_at_ms,
    }
}

pub fn owner(openid: &str, o: &OwnerRec) -> pb::SessionOwner {
    pb::SessionOwner {
        openid: openid.to_string(),
        session_id: o.session_id.clone(),
        owner_node: o.owner_node.clone(),
        epoch: o.epoch,
    }
}

pub fn failover(f: &FailoverRec) -> pb::FailoverDecision {
    pb::FailoverDecision {
        failed_node: f.failed_node.clone(),
        decided_at_ms: f.decided_at_ms,
        sessions: f.sessions,
        moved_to: f.moved_to.clone().into_iter().collect(),
    }
}

/// The full state as a watch snapshot.
pub fn snapshot(st: &State) -> pb::Snapshot {
    pb::Snapshot {
        upstreams: st.upstreams.values().map(upstream).collect(),
        nodes: st.nodes.values().map(node).collect(),
        owners: st.owners.iter().map(|(k, o)| owner(k, o)).collect(),
        failovers: st.failovers.values().map(failover).collect(),
        more: false,
    }
}

/// The snapshot of `st` in chunks of about `budget` bytes
/// ([`gatesvr_proto::limits::chunk_by_size`]): the first carries the upstreams, nodes and
/// failovers (few, bounded by the fleet) and the first owners; each later one only more
/// owners. Every chunk but the last has `more` set.
pub fn snapshot_chunks(st: &State, budget: usize) -> Vec<pb::Snapshot> {
    let owners: Vec<pb::SessionOwner> = st.owners.iter().map(|(k, o)| owner(k, o)).collect();
    let mut runs = gatesvr_proto::limits::chunk_by_size(owners, budget).into_iter();
    let mut first = snapshot_head(st);
    first.owners = runs.next().unwrap_or_default();
    let mut chunks = vec![first];
    chunks.extend(runs.map(|owners| pb::Snapshot {
        owners,
        ..Default::default()
    }));
    let last = chunks.len() - 1;
    for (i, c) in chunks.iter_mut().enumerate() {
        c.more = i < last;
    }
    chunks
}

fn snapshot_head(st: &State) -> pb::Snapshot {
    pb::Snapshot {
        upstreams: st.upstreams.values().map(upstream).collect(),
        nodes: st.nodes.values().map(node).collect(),
        owners: Vec::new(),
        failovers: st.failovers.values().map(failover).collect(),
        more: false,
    }
}

/// The watch event for a change of `key` (its value now in `st`) at `version`.
pub fn event(st: &State, key: &Key, version: u64) -> pb::WatchEvent {
    use pb::watch_event::Event;
    let event = match key {
        Key::Upstream(id) => match st.upstreams.get(id) {
            Some(u) => Event::UpstreamPut(upstream(u)),
            None => Event::UpstreamRemoved(id.clone()),
        },
        Key::Node(id) => match st.nodes.get(id) {
            Some(n) => Event::NodePut(node(n)),
            None => Event::NodeRemoved(id.clone()),
        },
        Key::Owner(id) => match st.owners.get(id) {
            Some(o) => Event::OwnerPut(owner(id, o)),
            None => Event::OwnerRemoved(id.clone()),
        },
        Key::Failover(seq) => match st.failovers.get(seq) {
            Some(f) => Event::Failover(failover(f)),
            // Dropped from history: nothing a watcher needs to hear.
            None => Event::Failover(pb::FailoverDecision::default()),
        },
    };
    pb::WatchEvent {
        version,
        event: Some(event),
    }
}
