//! HTTP endpoints on `server.http_addr`: `/health` (liveness), `/ready`
//! (readiness), `/stats` (sessions), `/performance` (rates and latency
//! quantiles); `/metrics` on `server.metrics_addr`; and, on the separate
//! operations listener `server.ops_addr`, `POST /drain` and
//! `/debug/pprof/profile?seconds=N` (CPU flamegraph, SVG), each behind
//! `authorization: Bearer <ops token>`.
//!
//! The probes stay open because kubelet and load balancers call them without
//! credentials and they change nothing; the operations stop a node or cost
//! it CPU, so they live on their own port with their own credential and can
//! be bound to loopback (the preStop hook runs in the pod).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::errors::OpsError;
use crate::node::Node;

#[derive(Clone)]
pub struct HttpState {
    pub node: Arc<Node>,
    /// True once every listener is bound.
    pub ready: Arc<AtomicBool>,
    /// Notified by `POST /drain`.
    pub drain: Arc<tokio::sync::Notify>,
}

/// The probes and read-only status on `server.http_addr`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/stats", get(stats))
        .route("/performance", get(performance))
        .with_state(state)
}

/// `POST /drain` and profiling on `server.ops_addr`. With `token` every
/// request needs `authorization: Bearer <token>` (else 401, counted in
/// `gatesvr_ops_denied_total`); `None` only with
/// `server.insecure_plaintext_internal`.
pub fn ops_router(state: HttpState, token: Option<Arc<str>>) -> Result<Router, prometheus::Error> {
    let denied = prometheus::IntCounter::new(
        "gatesvr_ops_denied_total",
        "Requests to the operations listener (/drain, /debug/pprof) refused for a missing or wrong bearer token",
    )?;
    state
        .node
        .metrics
        .registry
        .register(Box::new(denied.clone()))?;
    let router = Router::new()
        .route("/drain", axum::routing::post(drain))
        .route("/debug/pprof/profile", get(profile))
        .with_state(state);
    let Some(token) = token else {
        return Ok(router);
    };
    Ok(router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            let denied = denied.clone();
            async move {
                let presented = req
                    .headers()
                    .get(axum::http::header::AUTHORIZATION)
                    .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
                if presented.is_some_and(|p| same(p, token.as_bytes())) {
                    return next.run(req).await;
                }
                denied.inc();
                tracing::debug!(path = %req.uri().path(), "ops request without a valid bearer token");
                OpsError::Unauthorized.into_response()
            }
        },
    )))
}

/// Compares without an early exit on the first differing byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the ops token file (trimmed); `None` without one.
pub fn ops_token(config: &crate::config::ServerConfig) -> Result<Option<Arc<str>>, String> {
    let Some(path) = &config.ops_token_file else {
        return Ok(None);
    };
    let raw = std::fs::read(path)
        .map_err(|e| format!("server.ops_token_file {}: {e}", path.display()))?;
    let token = String::from_utf8_lossy(raw.trim_ascii()).into_owned();
    if token.is_empty() {
        return Err(format!("server.ops_token_file {} is empty", path.display()));
    }
    Ok(Some(Arc::from(token)))
}

pub fn metrics_router(node: Arc<Node>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(node): State<Arc<Node>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    node.metrics.render(),
                )
            }),
        )
        .with_state(node)
}

/// Ready once listening and, for a cluster member, once its view is complete
/// (every chunk of the control plane's watch snapshot received, or a saved
/// state file loaded): before that it knows neither routes nor owners; and
/// once registered (or serving from its state file while the control plane
/// is unreachable), so its claims are accepted.
/// Stays ready while draining (see [`crate::drain`]).
async fn ready(State(state): State<HttpState>) -> Result<(StatusCode, &'static str), OpsError> {
    let routing_known = state.node.cluster.as_ref().is_none_or(|c| c.can_serve());
    if state.ready.load(Ordering::Relaxed) && routing_known {
        let draining = state.node.draining.load(Ordering::Relaxed);
        Ok((
            StatusCode::OK,
            if draining {
                "ready (draining)\n"
            } else {
                "ready\n"
            },
        ))
    } else {
        Err(OpsError::NotReady)
    }
}

/// Starts a drain (the process that owns the node runs it and exits when
/// done); answers 202 at once. Used by Kubernetes' preStop hook.
async fn drain(State(state): State<HttpState>) -> impl IntoResponse {
    let already = state.node.draining.load(Ordering::Relaxed);
    state.drain.notify_one();
    let body = if already {
        "already draining\n"
    } else {
        "drain started\n"
    };
    (StatusCode::ACCEPTED, body)
}

async fn stats(State(state): State<HttpState>) -> impl IntoResponse {
    let registry = &state.node.registry;
    let mut queued = 0u64;
    for entry in registry.all() {
        queued += entry.state.lock().stats().unacked;
    }
    let cluster = state.node.cluster.as_ref().map(|c| {
        serde_json::json!({
            "control_plane_connected": c.is_connected(),
            "serving_from_saved_state": c.is_stale(),
            "view_version": c.view().version,
            "view_complete": c.is_view_complete(),
            "view_owners": c.view().owners.len(),
            "cached_owners": c.cached_owners(),
        })
    });
    let m = &state.node.metrics;
    Json(serde_json::json!({
        "node_id": state.node.config.node_id,
        "draining": state.node.draining.load(Ordering::Relaxed),
        "cluster": cluster,
        "sessions": registry.len(),
        "connected_sessions": registry.connected(),
        "sessions_per_zone": registry.per_zone(),
        "queued_pushes": queued,
        // Other nodes' sessions this node holds a copy of (as a standby), as
        // of the last replica sweep (every second).
        "replicas": {
            "sessions": m.replica_sessions.get(),
            "pushes": m.replica_pushes.get(),
        },
        // The runtime's busy share (last 100 ms) and whether pushes share
        // writes because of it (`server.push_coalesce_busy`).
        "runtime": {
            "busy_ratio": state.node.load.busy(),
            "push_coalescing": state.node.load.coalescing(),
        },
        "upstreams": upstream_health(&state.node),
        "requests_by_outcome": crate::metrics::sum_by(&m.requests, "outcome"),
        "pushes_by_outcome": crate::metrics::sum_by(&m.pushes, "outcome"),
    }))
}

/// Every upstream instance this node routes to, with its health and ejection state (what
/// `gatectl upstreams health` and the console show).
fn upstream_health(node: &Node) -> Vec<serde_json::Value> {
    let crate::handler::Handler::Upstream(router) = &node.handler else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for zone in router.zones() {
        for i in router.instances(&zone).unwrap_or_default() {
            out.push(serde_json::json!({
                "zone": zone,
                "instance_id": i.instance.id(),
                "address": i.instance.addr(),
                "state": i.state.as_str(),
                "outstanding": i.outstanding,
            }));
        }
    }
    out
}

async fn performance(State(state): State<HttpState>) -> impl IntoResponse {
    Json(state.node.sampler.report(&state.node.metrics))
}

#[derive(serde::Deserialize)]
struct ProfileQuery {
    seconds: Option<u64>,
}

/// One CPU profile at a time: the profiler is process-wide.
static PROFILING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Samples every thread at 99 Hz for `seconds` (1..=60, default 10; anything
/// else is a 400) and answers an SVG flamegraph (one saying so if no sample
/// was taken).
async fn profile(
    axum::extract::Query(q): axum::extract::Query<ProfileQuery>,
) -> axum::response::Response {
    let seconds = q.seconds.unwrap_or(10);
    if !(1..=60).contains(&seconds) {
        return OpsError::BadRequest("seconds must be 1..=60 (default 10)").into_response();
    }
    let Ok(_one) = PROFILING.try_lock() else {
        return OpsError::ProfileBusy.into_response();
    };
    let guard = match pprof::ProfilerGuardBuilder::default()
        .frequency(99)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
    {
        Ok(g) => g,
        Err(e) => return profiler_failed("profiler", &e),
    };
    tokio::time::sleep(std::time::Duration::from_secs(seconds)).await;
    let report = match guard.report().build() {
        Ok(r) => r,
        Err(e) => return profiler_failed("profiler", &e),
    };
    if report.data.is_empty() {
        // An idle process can go a short profile without a single sample: say so in the
        // SVG rather than answering an empty one.
        let svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"40\"><text x=\"10\" y=\"25\">no CPU samples in {seconds} s: the process was idle; profile longer or under load</text></svg>\n"
        );
        return ([(axum::http::header::CONTENT_TYPE, "image/svg+xml")], svg).into_response();
    }
    let mut svg = Vec::new();
    if let Err(e) = report.flamegraph(&mut svg) {
        return profiler_failed("flamegraph", &e);
    }
    ([(axum::http::header::CONTENT_TYPE, "image/svg+xml")], svg).into_response()
}

/// A 500 naming the profiler's error: the caller is an operator.
fn profiler_failed(what: &'static str, e: &dyn std::fmt::Display) -> axum::response::Response {
    OpsError::Profiler {
        what,
        detail: e.to_string(),
    }
    .into_response()
}
