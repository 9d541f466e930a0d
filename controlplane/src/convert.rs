//! Conversions between the replicated records and the `gatesvr.control.v1` messages.

use gatesvr_proto::control as pb;

use crate::state::{FailoverRec, Key, NodeRec, NodeStatus, OwnerRec, State, Touched, UpstreamRec};
use crate::watch::HubEvent;

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
        registered_at_ms: n.registered_at_ms,
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

/// The owner records a watcher scoped to `scope` is sent (`None`: all of them): the
/// sessions that node owns.
fn scoped_owners(st: &State, scope: Option<&str>) -> Vec<pb::SessionOwner> {
    st.owners
        .iter()
        .filter(|(_, o)| scope.is_none_or(|n| o.owner_node == n))
        .map(|(k, o)| owner(k, o))
        .collect()
}

/// The full state as a watch snapshot (the owners of `scope` only, if set).
pub fn snapshot(st: &State, scope: Option<&str>) -> pb::Snapshot {
    pb::Snapshot {
        owners: scoped_owners(st, scope),
        ..snapshot_head(st, scope)
    }
}

/// The snapshot of `st` in chunks of about `budget` bytes
/// ([`gatesvr_proto::limits::chunk_by_size`]): the first carries the upstreams, nodes and
/// failovers (few, bounded by the fleet) and the first owners; each later one only more
/// owners. Every chunk but the last has `more` set. A watcher scoped to `scope` gets only
/// the owners of that node.
pub fn snapshot_chunks(st: &State, budget: usize, scope: Option<&str>) -> Vec<pb::Snapshot> {
    let owners = scoped_owners(st, scope);
    let mut runs = gatesvr_proto::limits::chunk_by_size(owners, budget).into_iter();
    let mut first = snapshot_head(st, scope);
    first.owners = runs.next().unwrap_or_default();
    let mut chunks = vec![first];
    chunks.extend(runs.map(|owners| pb::Snapshot {
        owners,
        scoped: scope.is_some(),
        ..Default::default()
    }));
    let last = chunks.len() - 1;
    for (i, c) in chunks.iter_mut().enumerate() {
        c.more = i < last;
    }
    chunks
}

fn snapshot_head(st: &State, scope: Option<&str>) -> pb::Snapshot {
    pb::Snapshot {
        upstreams: st.upstreams.values().map(upstream).collect(),
        nodes: st.nodes.values().map(node).collect(),
        owners: Vec::new(),
        failovers: st.failovers.values().map(failover).collect(),
        more: false,
        scoped: scope.is_some(),
    }
}

/// The hub event for change `t` at `version` (its value now in `st`), with the nodes it
/// concerns (see [`Touched::concerns`]).
pub fn hub_event(st: &State, t: &Touched, version: u64) -> HubEvent {
    HubEvent {
        event: event(st, &t.key, version),
        concerns: t.concerns(st),
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

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::state::Cmd;

    fn apply(st: &mut State, now: i64, cmd: Cmd) -> Vec<HubEvent> {
        let mut touched = Vec::new();
        st.apply(now, &cmd, &mut touched);
        touched
            .iter()
            .filter_map(|t| t.version.map(|v| hub_event(st, t, v)))
            .collect()
    }

    fn register(st: &mut State, node: &str) {
        apply(
            st,
            0,
            Cmd::RegisterNode {
                node_id: node.into(),
                quic_addr: "10.0.0.1:4433".into(),
                grpc_addr: "10.0.0.1:9090".into(),
                lease_ttl_ms: 3_600_000,
            },
        );
    }

    fn claim(st: &mut State, node: &str, openid: &str) -> Vec<HubEvent> {
        apply(
            st,
            1,
            Cmd::Claim {
                node_id: node.into(),
                openid: openid.into(),
                session_id: format!("{openid}-session-0123456789abcdef"),
            },
        )
    }

    fn names(e: &HubEvent) -> Vec<&str> {
        let mut n: Vec<&str> = e.concerns.iter().flatten().map(String::as_str).collect();
        n.sort_unstable();
        n
    }

    #[test]
    fn an_owner_change_concerns_its_owner_and_the_one_before() {
        let mut st = State::default();
        for n in ["dp-1", "dp-2", "dp-3"] {
            register(&mut st, n);
        }
        let node_event = apply(
            &mut st,
            0,
            Cmd::DrainNode {
                node_id: "dp-3".into(),
            },
        );
        assert!(
            node_event.iter().all(|e| e.concerns.is_none()),
            "nodes: everyone"
        );
        let first = claim(&mut st, "dp-1", "u");
        assert_eq!(names(&first[0]), vec!["dp-1"]);
        // Claimed away: the old owner hears it (it fences its copy).
        let moved = claim(&mut st, "dp-2", "u");
        assert_eq!(names(&moved[0]), vec!["dp-1", "dp-2"]);
        assert!(!moved[0].for_watcher(Some("dp-3")));
        assert!(moved[0].for_watcher(None));
        let epoch = st.owners["u"].epoch;
        let released = apply(
            &mut st,
            2,
            Cmd::Release {
                node_id: "dp-2".into(),
                openid: "u".into(),
                epoch,
            },
        );
        assert_eq!(names(&released[0]), vec!["dp-2"], "a release: its owner");
        claim(&mut st, "dp-1", "v");
        let gone = apply(&mut st, 3, Cmd::DisconnectSession { openid: "v".into() });
        assert_eq!(
            names(&gone[0]),
            vec![crate::state::DISCONNECTED_OWNER, "dp-1"],
            "an operator's disconnect: the owner before it"
        );
    }

    #[test]
    fn a_scoped_snapshot_carries_the_nodes_own_sessions() {
        let mut st = State::default();
        for n in ["dp-1", "dp-2"] {
            register(&mut st, n);
        }
        for i in 0..10 {
            claim(
                &mut st,
                if i % 2 == 0 { "dp-1" } else { "dp-2" },
                &format!("u{i}"),
            );
        }
        let whole = snapshot(&st, None);
        assert_eq!((whole.owners.len(), whole.scoped), (10, false));
        let mine = snapshot(&st, Some("dp-1"));
        assert!(mine.scoped);
        assert_eq!(mine.nodes.len(), 2);
        assert_eq!(mine.owners.len(), 5);
        assert!(mine.owners.iter().all(|o| o.owner_node == "dp-1"));
        let chunks = snapshot_chunks(&st, 64, Some("dp-2"));
        assert!(chunks.len() > 1 && chunks.iter().all(|c| c.scoped));
        let owners: usize = chunks.iter().map(|c| c.owners.len()).sum();
        assert_eq!(owners, 5);
    }

    /// Bytes of watch events on the wire per claim per data-plane node, every
    /// node watching everything (before) and scoped (now), at `n` nodes: each
    /// node claims its share of new sessions, and one claim in ten takes a
    /// session over from another node (a reconnect elsewhere). Returns
    /// (unscoped, scoped mean, scoped max over nodes).
    fn bytes_per_claim(n: usize, claims: usize) -> (f64, f64, f64) {
        let mut st = State::default();
        let nodes: Vec<String> = (0..n).map(|i| format!("dp-{i:03}")).collect();
        for node in &nodes {
            register(&mut st, node);
        }
        let mut every = 0u64;
        let mut per_node = vec![0u64; n];
        // openid index -> index of its owner node
        let mut owner_of: Vec<usize> = Vec::with_capacity(claims);
        for c in 0..claims {
            let (node, openid) = if c % 10 == 9 {
                // A session claimed before, now from the node after its owner.
                let earlier = c / 2 - usize::from(c / 2 % 10 == 9);
                let to = (owner_of[earlier] + 1) % n;
                owner_of[earlier] = to;
                owner_of.push(usize::MAX);
                (&nodes[to], format!("user-{earlier:08}"))
            } else {
                let k = c - c / 10; // new sessions so far: spread evenly
                owner_of.push(k % n);
                (&nodes[k % n], format!("user-{c:08}"))
            };
            for e in claim(&mut st, node, &openid) {
                let len = e.event.encoded_len() as u64;
                // A stream message: the event plus its 5-byte gRPC frame header.
                let wire = len + 5;
                every += wire;
                for (i, name) in nodes.iter().enumerate() {
                    if e.for_watcher(Some(name)) {
                        per_node[i] += wire;
                    }
                }
            }
        }
        let claims = claims as f64;
        let mean = per_node.iter().sum::<u64>() as f64 / n as f64 / claims;
        let max = *per_node.iter().max().unwrap_or(&0) as f64 / claims;
        (every as f64 / claims, mean, max)
    }

    #[test]
    fn watch_bytes_per_claim_per_node_shrink_with_the_fleet() {
        // The figure docs/benchmarks.md quotes ("Ownership at scale"): run with
        // `--nocapture` to see it.
        for n in [3usize, 10, 100] {
            let (before, mean, max) = bytes_per_claim(n, 10_000);
            println!(
                "{n:>3} nodes: {before:.1} B per claim per node unscoped; scoped {mean:.1} B mean, {max:.1} B max"
            );
            // Unscoped every node pays every claim; scoped a node pays its
            // own claims and the moves away from it: about 1.1/n of them.
            assert!(before > 50.0, "{before}");
            assert!(
                max <= before * 1.3 / n as f64 + 1.0,
                "{n} nodes: {max} vs {before}"
            );
            assert!(mean > 0.0);
        }
    }
}
