//! Prometheus metrics of the data plane, one registry per node.
//!
//! Names follow Prometheus conventions (base units, `_total` counters). The Go
//! gateway's names map as: `gatesvr_active_connections` (same),
//! `gatesvr_total_requests` -> `gatesvr_requests_total`,
//! `gatesvr_request_duration` -> `gatesvr_request_duration_seconds`,
//! `gatesvr_upstream_requests` -> `gatesvr_upstream_requests_total` (owned by
//! the upstream router), `gatesvr_message_queue_size` (same).

use std::collections::BTreeMap;

use gatesvr_proto::client::ErrorCode;
use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Request latency buckets, seconds: 0.5 ms .. 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Open QUIC connections that completed Start.
    pub active_connections: IntGauge,
    /// Open connections that completed Start, by transport (quic,
    /// webtransport, websocket).
    pub transport_connections: IntGaugeVec,
    /// Sessions held by this node, connected or not.
    pub sessions: IntGauge,
    /// Pushes queued on this node's sessions and not yet acked.
    pub message_queue_size: IntGauge,
    /// Share of the runtime workers' time spent running tasks, last 100 ms
    /// (`server.push_coalesce_busy` reads it).
    pub runtime_busy: Gauge,
    /// Times a connection held its session's pushes to share a write
    /// (`server.push_coalesce`).
    pub push_holds: IntCounter,
    /// Client requests by zone and outcome (`ok` or an error code name).
    pub requests: IntCounterVec,
    /// End-to-end request latency seen by the gateway, by zone.
    pub request_duration: HistogramVec,
    /// Pushes by outcome: queued, rejected_queue_full, rejected_too_large, no_session, sent.
    pub pushes: IntCounterVec,
    /// `pushes{outcome="sent"}`, resolved once: a connection counts what it
    /// wrote on every write, and resolving the label costs a hash and a lock.
    pub pushes_sent: IntCounter,
    /// Connections refused or closed early, by reason.
    pub connections_rejected: IntCounterVec,
    /// Client writes that missed `server.write_timeout` (the client stopped
    /// reading; its connection is closed), by transport and phase (`start`:
    /// before the session started, `session`: after).
    pub client_write_timeouts: IntCounterVec,
    /// Failed Starts by reason: invalid, expired, openid_mismatch.
    pub auth_failures: IntCounterVec,
    /// Frames the client got wrong, by error code.
    pub protocol_errors: IntCounterVec,
    /// Sessions ended, by reason: stopped, expired, replaced.
    pub sessions_closed: IntCounterVec,
    /// Connections closed by the server, by error code.
    pub connections_closed: IntCounterVec,
    /// Resumes by status (resumed, trimmed, session_expired, seq_ahead, new).
    pub resumes: IntCounterVec,
    /// Pushes discarded without delivery, by reason (expired, stopped, trimmed).
    pub pushes_lost: IntCounterVec,
    /// Sessions fetched from their previous owner, by outcome.
    pub handovers: IntCounterVec,
    /// Pushes forwarded to the owning node, by outcome.
    pub pushes_forwarded: IntCounterVec,
    /// Sessions started without a control-plane claim (control plane unreachable).
    pub provisional_sessions: IntCounterVec,
    /// Start claims tried again because the control plane could not answer
    /// them (a leader election, this node's lease lapsed meanwhile).
    pub start_claim_retries: IntCounter,
    /// Owner lookups at the control plane (a foreign session's owner) by
    /// result: found, absent, failed; and cached records evicted (a forward
    /// found the session gone).
    pub owner_lookups: IntCounterVec,
    /// 1 while the control plane answers.
    pub control_plane_connected: IntGauge,
    /// 1 while routing from a saved state file the control plane has not confirmed.
    pub cluster_state_stale: IntGauge,
    /// Durable PushToClient calls by outcome: replicated, no_standby, replication_failed,
    /// lease_lapsed / lease_rejoining / lease_not_held (refused: `core::lease`).
    pub durable_pushes: IntCounterVec,
    /// Durable pushes redelivered in sessions rebuilt from a replica.
    pub durable_pushes_recovered: IntCounter,
    /// Takeovers after the previous owner was gone, by outcome: recovered, no_replica.
    pub sessions_recovered: IntCounterVec,
    /// Sessions of other nodes this node holds a replica of (as a standby).
    pub replica_sessions: IntGauge,
    /// Probes of owners this node holds replicas for and stopped hearing
    /// from, by outcome: answered, unreachable.
    pub replica_owner_probes: IntCounterVec,
    /// Durable pushes held in those replicas.
    pub replica_pushes: IntGauge,
    /// TLS handshakes by kind: `full` (the node signed a CertificateVerify)
    /// or `resumed` (it accepted a session ticket: no certificate, no
    /// signature on either side). `edge::quic` counts them where rustls does
    /// the work, so a handshake the client abandons later still counts.
    pub tls_handshakes: IntCounterVec,
    /// TLS 1.3 session tickets by outcome: `issued` to clients, and offered
    /// by clients but `refused` (not readable here: other ticket keys, too
    /// old, damaged; a full handshake follows).
    pub tls_tickets: IntCounterVec,
    /// Where a Start's time goes on the node, by phase: `handshake` (QUIC
    /// and TLS, from the accepted Initial until the connection is up),
    /// `start_frame` (from a stream until its Start frame is read),
    /// `answered` (from that frame until the StartResponse is written), and
    /// within `answered`: `claim` (the
    /// `ClaimSessions` answer, batched with the burst's other claims),
    /// `handover` (asking the previous owner), `recovery` (a gone owner's
    /// replicas, gathered from the live nodes), `view_wait` (part of
    /// `recovery`: every node had answered, the watch had not yet delivered
    /// the claim's epoch). The failover benchmark reads them.
    pub start_phase: HistogramVec,
}

/// Registers `metric` (names are static: a failure is a programming error).
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    register(registry, c)
}

fn int_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name, help).expect("valid metric definition"),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(
        registry,
        IntGauge::new(name, help).expect("valid metric definition"),
    )
}

fn float_gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    register(
        registry,
        Gauge::new(name, help).expect("valid metric definition"),
    )
}

impl Metrics {
    /// Creates and registers every metric. Names are static, so failures here
    /// are programming errors, caught by the tests.
    pub fn new() -> Self {
        let registry = Registry::new();
        let pushes = counter(
            &registry,
            "gatesvr_pushes_total",
            "Pushes by outcome",
            &["outcome"],
        );
        let pushes_sent = pushes.with_label_values(&["sent"]);
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "gatesvr_request_duration_seconds",
                "Client request latency through the gateway",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["zone"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(request_duration.clone()))
            .expect("metric registered once");
        let start_phase = HistogramVec::new(
            HistogramOpts::new(
                "gatesvr_start_phase_seconds",
                "Time a Start spent on this node, by phase (handshake, start_frame, answered; within answered: claim, handover, recovery, view_wait)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["phase"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(start_phase.clone()))
            .expect("metric registered once");
        let metrics = Self {
            start_phase,
            active_connections: gauge(
                &registry,
                "gatesvr_active_connections",
                "Client connections with a started session",
            ),
            transport_connections: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "gatesvr_transport_connections",
                        "Client connections with a started session, by transport",
                    ),
                    &["transport"],
                )
                .expect("valid metric definition");
                registry
                    .register(Box::new(g.clone()))
                    .expect("metric registered once");
                for t in crate::transport::Transport::ALL {
                    g.with_label_values(&[t.label()]).set(0);
                }
                g
            },
            sessions: gauge(&registry, "gatesvr_sessions", "Sessions held by this node"),
            message_queue_size: gauge(
                &registry,
                "gatesvr_message_queue_size",
                "Pushes queued and not yet acknowledged",
            ),
            push_holds: int_counter(
                &registry,
                "gatesvr_push_holds_total",
                "Times a connection held pushes to share a write (server.push_coalesce)",
            ),
            runtime_busy: float_gauge(
                &registry,
                "gatesvr_runtime_busy_ratio",
                "Share of the runtime workers' time spent running tasks, last 100 ms",
            ),
            requests: counter(
                &registry,
                "gatesvr_requests_total",
                "Client requests by zone and outcome",
                &["zone", "outcome"],
            ),
            request_duration,
            pushes,
            pushes_sent,
            connections_rejected: counter(
                &registry,
                "gatesvr_connections_rejected_total",
                "Connections refused before a session started, by reason",
                &["reason"],
            ),
            client_write_timeouts: counter(
                &registry,
                "gatesvr_client_write_timeouts_total",
                "Client connections closed because a write missed server.write_timeout, by transport and phase",
                &["transport", "phase"],
            ),
            auth_failures: counter(
                &registry,
                "gatesvr_auth_failures_total",
                "Failed authentications by reason",
                &["reason"],
            ),
            protocol_errors: counter(
                &registry,
                "gatesvr_protocol_errors_total",
                "Client protocol errors by code",
                &["code"],
            ),
            sessions_closed: counter(
                &registry,
                "gatesvr_sessions_closed_total",
                "Sessions ended, by reason",
                &["reason"],
            ),
            connections_closed: counter(
                &registry,
                "gatesvr_connections_closed_total",
                "Connections closed by the server, by error code",
                &["code"],
            ),
            resumes: counter(
                &registry,
                "gatesvr_session_starts_total",
                "Session starts by resume status",
                &["status"],
            ),
            pushes_lost: counter(
                &registry,
                "gatesvr_pushes_lost_total",
                "Pushes discarded without being acknowledged, by reason",
                &["reason"],
            ),
            handovers: counter(
                &registry,
                "gatesvr_session_handovers_total",
                "Sessions fetched from their previous owner, by outcome",
                &["outcome"],
            ),
            pushes_forwarded: counter(
                &registry,
                "gatesvr_pushes_forwarded_total",
                "Pushes forwarded to the node owning the session, by outcome",
                &["outcome"],
            ),
            provisional_sessions: counter(
                &registry,
                "gatesvr_provisional_sessions_total",
                "Session starts without a control-plane claim, by what followed",
                &["outcome"],
            ),
            start_claim_retries: int_counter(
                &registry,
                "gatesvr_start_claim_retries_total",
                "Start claims tried again because the control plane could not answer them (a leader election; this node's lease lapsed meanwhile)",
            ),
            owner_lookups: counter(
                &registry,
                "gatesvr_owner_lookups_total",
                "Owners of other nodes' sessions looked up at the control plane (found, absent, failed) and cached records evicted (evicted)",
                &["result"],
            ),
            control_plane_connected: gauge(
                &registry,
                "gatesvr_control_plane_connected",
                "1 while the control plane answers heartbeats",
            ),
            cluster_state_stale: gauge(
                &registry,
                "gatesvr_cluster_state_stale",
                "1 while routing from a saved cluster state not yet confirmed by the control plane",
            ),
            durable_pushes: counter(
                &registry,
                "gatesvr_durable_pushes_total",
                "Durable pushes by outcome (replicated to the standby, or refused)",
                &["outcome"],
            ),
            durable_pushes_recovered: int_counter(
                &registry,
                "gatesvr_durable_pushes_recovered_total",
                "Durable pushes redelivered from a replica after their owner crashed",
            ),
            sessions_recovered: counter(
                &registry,
                "gatesvr_sessions_recovered_total",
                "Sessions whose owner was gone, by outcome (recovered, no_replica; retried: a live node had not answered yet, asked again; view_waited: every node had answered, the view had not caught up with the claim; incomplete: gave up waiting after 10 s)",
                &["outcome"],
            ),
            replica_owner_probes: counter(
                &registry,
                "gatesvr_replica_owner_probes_total",
                "Probes of silent owners whose replicas this node holds, by outcome (unreachable: the replicas were copied to the owner's next heir)",
                &["outcome"],
            ),
            replica_sessions: gauge(
                &registry,
                "gatesvr_replica_sessions",
                "Sessions of other nodes replicated here",
            ),
            replica_pushes: gauge(
                &registry,
                "gatesvr_replica_pushes",
                "Durable pushes held here for other nodes",
            ),
            tls_handshakes: counter(
                &registry,
                "gatesvr_tls_handshakes_total",
                "TLS handshakes of client connections, by kind (full: certificate signed; resumed: session ticket accepted)",
                &["kind"],
            ),
            tls_tickets: counter(
                &registry,
                "gatesvr_tls_tickets_total",
                "TLS session tickets issued, and offered tickets refused (a full handshake follows)",
                &["outcome"],
            ),
            registry,
        };
        metrics.precreate();
        metrics
    }

    /// Creates, at zero, every label value of the counters operators alert on
    /// (docs/operations.md), so an alert sees a series before the first event.
    /// `metrics::tests` fails if one is missing.
    fn precreate(&self) {
        let codes: Vec<String> = (1..=64)
            .filter_map(|i| ErrorCode::try_from(i).ok())
            .map(code_label)
            .collect();
        for reason in REJECT_REASONS
            .iter()
            .map(|r| r.to_string())
            .chain(codes.iter().cloned())
        {
            self.connections_rejected.with_label_values(&[&reason]);
        }
        for code in &codes {
            self.connections_closed.with_label_values(&[code]);
        }
        for reason in AUTH_FAILURE_REASONS {
            self.auth_failures.with_label_values(&[reason]);
        }
        for t in crate::transport::Transport::ALL {
            for phase in ["start", "session"] {
                self.client_write_timeouts
                    .with_label_values(&[t.label(), phase]);
            }
        }
        for outcome in ["rejected_too_large", "rejected_queue_full"] {
            self.pushes.with_label_values(&[outcome]);
        }
        for outcome in ["answered", "unreachable"] {
            self.replica_owner_probes.with_label_values(&[outcome]);
        }
        for outcome in ["unsent", "unanswered"] {
            self.pushes_forwarded.with_label_values(&[outcome]);
        }
        for kind in ["full", "resumed"] {
            self.tls_handshakes.with_label_values(&[kind]);
        }
        for outcome in ["issued", "refused"] {
            self.tls_tickets.with_label_values(&[outcome]);
        }
    }

    /// Text exposition of every metric.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `gatesvr_connections_rejected_total` reasons that are not error codes.
pub const REJECT_REASONS: &[&str] = &[
    "draining",
    "max_connections",
    "handshake_failed",
    "start_timeout",
    "start_rate_address",
    "start_rate_openid",
];

/// `gatesvr_auth_failures_total` reasons (`AuthError::reason`).
pub const AUTH_FAILURE_REASONS: &[&str] = &["invalid", "expired", "openid_mismatch"];

/// Sums a counter's series by the value of `label` (for `/stats`).
pub fn sum_by(counter: &IntCounterVec, label: &str) -> BTreeMap<String, u64> {
    use prometheus::core::Collector;
    let mut out = BTreeMap::new();
    for family in counter.collect() {
        for m in family.get_metric() {
            let Some(value) = m
                .get_label()
                .iter()
                .find(|l| l.name() == label)
                .map(|l| l.value().to_string())
            else {
                continue;
            };
            *out.entry(value).or_insert(0) += m.get_counter().get_value() as u64;
        }
    }
    out
}

/// Metric label for an error code: its protobuf name in lower case.
pub fn code_label(code: gatesvr_proto::client::ErrorCode) -> String {
    code.as_str_name().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The labelled counters operators alert on exist at zero before any event.
    #[test]
    fn alerting_series_exist_from_start() {
        let text = Metrics::new().render();
        for series in [
            "gatesvr_connections_rejected_total{reason=\"draining\"} 0",
            "gatesvr_connections_rejected_total{reason=\"max_connections\"} 0",
            "gatesvr_connections_rejected_total{reason=\"unauthenticated\"} 0",
            "gatesvr_connections_closed_total{code=\"slow_consumer\"} 0",
            "gatesvr_connections_closed_total{code=\"ack_timeout\"} 0",
            "gatesvr_auth_failures_total{reason=\"invalid\"} 0",
            "gatesvr_auth_failures_total{reason=\"expired\"} 0",
            "gatesvr_auth_failures_total{reason=\"openid_mismatch\"} 0",
            "gatesvr_connections_rejected_total{reason=\"start_rate_address\"} 0",
            "gatesvr_connections_rejected_total{reason=\"start_rate_openid\"} 0",
            "gatesvr_client_write_timeouts_total{phase=\"session\",transport=\"quic\"} 0",
            "gatesvr_pushes_total{outcome=\"rejected_too_large\"} 0",
            "gatesvr_tls_handshakes_total{kind=\"resumed\"} 0",
            "gatesvr_tls_tickets_total{outcome=\"refused\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        assert!(
            !text.contains("gatesvr_push_ack_latency_seconds"),
            "never observed: it must not be exported"
        );
    }
}
