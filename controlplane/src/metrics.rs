//! The control plane's Prometheus metrics, served at `GET /metrics` on the admin port.
//!
//! Gauges are read from raft's metrics and the state machine at scrape time (nothing to keep
//! in step); counters (leader changes, session claims and releases) are counted by one task
//! that follows raft's metrics and the watch broadcast. Every series exists from start-up,
//! at zero, so alerts on them see a value before the first event (`metrics::tests` checks
//! the list). Every node serves its own view: claims are counted where they are applied, so
//! each replica reports the cluster's rate.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use prometheus::{IntCounter, IntGauge, Opts, Registry};
use tokio_util::sync::CancellationToken;

use crate::node::Node;
use crate::watch::HubMsg;

/// Every series this module registers (the Grafana check and the tests read this list).
pub const SERIES: &[&str] = &[
    "gatesvr_cp_raft_term",
    "gatesvr_cp_raft_is_leader",
    "gatesvr_cp_raft_leader_changes_total",
    "gatesvr_cp_raft_last_log_index",
    "gatesvr_cp_raft_commit_index",
    "gatesvr_cp_raft_applied_index",
    "gatesvr_cp_raft_apply_lag",
    "gatesvr_cp_raft_members",
    "gatesvr_cp_raft_voters",
    "gatesvr_cp_raft_millis_since_quorum_ack",
    "gatesvr_cp_snapshot_bytes",
    "gatesvr_cp_snapshot_index",
    "gatesvr_cp_session_claims_total",
    "gatesvr_cp_session_releases_total",
    "gatesvr_cp_sessions",
    "gatesvr_cp_dataplane_nodes",
    "gatesvr_cp_upstreams",
    "gatesvr_cp_watchers",
    "gatesvr_cp_state_version",
];

#[derive(Debug)]
struct Inner {
    registry: Registry,
    term: IntGauge,
    is_leader: IntGauge,
    leader_changes: IntCounter,
    last_log: IntGauge,
    commit: IntGauge,
    applied: IntGauge,
    apply_lag: IntGauge,
    members: IntGauge,
    voters: IntGauge,
    quorum_ack: IntGauge,
    snapshot_bytes: IntGauge,
    snapshot_index: IntGauge,
    claims: IntCounter,
    releases: IntCounter,
    sessions: IntGauge,
    nodes: prometheus::IntGaugeVec,
    upstreams: IntGauge,
    watchers: IntGauge,
    version: IntGauge,
}

/// The control plane's registry and its series.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<Inner>);

fn gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Data-plane node states, each a label value of `gatesvr_cp_dataplane_nodes` from start-up.
const NODE_STATES: &[&str] = &["active", "draining", "dead", "left", "cordoned"];

impl Metrics {
    /// A fresh registry with every series at zero.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let r = Registry::new();
        let nodes = prometheus::IntGaugeVec::new(
            Opts::new(
                "gatesvr_cp_dataplane_nodes",
                "Data-plane nodes by state (cordoned counts live nodes that are cordoned)",
            ),
            &["state"],
        )?;
        r.register(Box::new(nodes.clone()))?;
        for s in NODE_STATES {
            nodes.with_label_values(&[s]).set(0);
        }
        let inner = Inner {
            term: gauge(&r, "gatesvr_cp_raft_term", "Current raft term")?,
            is_leader: gauge(&r, "gatesvr_cp_raft_is_leader", "1 on the leader")?,
            leader_changes: counter(
                &r,
                "gatesvr_cp_raft_leader_changes_total",
                "Times this node saw the leader change (including to none)",
            )?,
            last_log: gauge(&r, "gatesvr_cp_raft_last_log_index", "Last log index")?,
            commit: gauge(
                &r,
                "gatesvr_cp_raft_commit_index",
                "Committed index: the quorum-replicated index on the leader, the applied index elsewhere",
            )?,
            applied: gauge(&r, "gatesvr_cp_raft_applied_index", "Last applied index")?,
            apply_lag: gauge(
                &r,
                "gatesvr_cp_raft_apply_lag",
                "Log entries appended but not applied yet",
            )?,
            members: gauge(&r, "gatesvr_cp_raft_members", "Voters and learners")?,
            voters: gauge(&r, "gatesvr_cp_raft_voters", "Voters")?,
            quorum_ack: gauge(
                &r,
                "gatesvr_cp_raft_millis_since_quorum_ack",
                "Leader only: ms since a quorum acknowledged it (-1 elsewhere)",
            )?,
            snapshot_bytes: gauge(
                &r,
                "gatesvr_cp_snapshot_bytes",
                "Size of the stored raft snapshot",
            )?,
            snapshot_index: gauge(
                &r,
                "gatesvr_cp_snapshot_index",
                "Log index the stored snapshot covers",
            )?,
            claims: counter(
                &r,
                "gatesvr_cp_session_claims_total",
                "Session ownership changes applied (claims, transfers, disconnects)",
            )?,
            releases: counter(
                &r,
                "gatesvr_cp_session_releases_total",
                "Session ownership records released",
            )?,
            sessions: gauge(&r, "gatesvr_cp_sessions", "Sessions with an owner")?,
            nodes,
            upstreams: gauge(&r, "gatesvr_cp_upstreams", "Registered upstreams")?,
            watchers: gauge(&r, "gatesvr_cp_watchers", "Open Watch streams")?,
            version: gauge(&r, "gatesvr_cp_state_version", "Replicated state version")?,
            registry: r,
        };
        inner.quorum_ack.set(-1);
        Ok(Metrics(Arc::new(inner)))
    }

    /// Refreshes the gauges from `node` and renders the text format.
    pub fn render(&self, node: &Node) -> String {
        self.refresh(node);
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        // The gRPC authorization layer counts its refusals in a registry of its own.
        let mut families = self.0.registry.gather();
        families.extend(crate::authz::registry().gather());
        if let Err(e) = prometheus::Encoder::encode(&enc, &families, &mut buf) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    fn refresh(&self, node: &Node) {
        let m = &self.0;
        let rm = node.raft().metrics().borrow().clone();
        let last_log = rm.last_log_index.unwrap_or(0);
        let applied = rm.last_applied.map_or(0, |l| l.index);
        let voters = node.voter_ids();
        let leader = rm.current_leader == Some(rm.id);
        let commit = if leader {
            // The highest index a majority of voters holds (the leader holds its whole log).
            let repl = rm.replication.clone().unwrap_or_default();
            let mut matched: Vec<u64> = voters
                .iter()
                .map(|id| {
                    if *id == rm.id {
                        last_log
                    } else {
                        repl.get(id).copied().flatten().map_or(0, |l| l.index)
                    }
                })
                .collect();
            matched.sort_unstable_by(|a, b| b.cmp(a));
            matched.get(voters.len() / 2).copied().unwrap_or(applied)
        } else {
            applied
        };
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        m.term.set(i(rm.current_term));
        m.is_leader.set(i64::from(leader));
        m.last_log.set(i(last_log));
        m.commit.set(i(commit));
        m.applied.set(i(applied));
        m.apply_lag.set(i(last_log.saturating_sub(applied)));
        m.members.set(i(node.members().len() as u64));
        m.voters.set(i(voters.len() as u64));
        m.quorum_ack.set(rm.millis_since_quorum_ack.map_or(-1, i));
        m.snapshot_index.set(rm.snapshot.map_or(0, |l| i(l.index)));
        m.snapshot_bytes.set(i(node.sm().snapshot_bytes()));
        // The counting task holds one receiver.
        m.watchers
            .set(i(node.sm().watch_receivers().saturating_sub(1) as u64));
        let inner = node.sm().read();
        let st = &inner.state;
        m.sessions.set(i(st.owners.len() as u64));
        m.upstreams.set(i(st.upstreams.len() as u64));
        m.version.set(i(st.version));
        for s in NODE_STATES {
            let n = st
                .nodes
                .values()
                .filter(|n| match *s {
                    "cordoned" => n.cordoned && n.status.is_live(),
                    other => super::admin::status_name(n.status) == other,
                })
                .count();
            m.nodes.with_label_values(&[s]).set(i(n as u64));
        }
    }

    /// Counts leader changes and applied claims/releases until `stop`.
    pub async fn run(self, node: Node, stop: CancellationToken) {
        use gatesvr_proto::control::watch_event::Event;
        let mut raft = node.raft().metrics();
        let mut leader = raft.borrow_and_update().current_leader;
        let mut events = node.sm().subscribe();
        loop {
            tokio::select! {
                changed = raft.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = raft.borrow_and_update().current_leader;
                    if now != leader {
                        leader = now;
                        self.0.leader_changes.inc();
                    }
                }
                msg = events.recv() => match msg {
                    Ok(HubMsg::Events(evs)) => {
                        for e in evs.iter() {
                            match e.event.event {
                                Some(Event::OwnerPut(_)) => self.0.claims.inc(),
                                Some(Event::OwnerRemoved(_)) => self.0.releases.inc(),
                                _ => {}
                            }
                        }
                    }
                    Ok(HubMsg::Reset) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(missed = n, "metrics fell behind the watch broadcast");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                () = stop.cancelled() => return,
            }
        }
    }
}

/// `GET /metrics` (open, like `/healthz`: no secrets in it).
pub async fn serve(State(s): State<crate::admin::AdminState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(&s.node),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_series_is_registered_at_start() {
        let m = super::Metrics::new().unwrap();
        let names: Vec<String> =
            m.0.registry
                .gather()
                .iter()
                .map(|f| f.name().to_string())
                .collect();
        for s in super::SERIES {
            assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
        }
        assert_eq!(names.len(), super::SERIES.len(), "{names:?} vs SERIES");
    }
}
