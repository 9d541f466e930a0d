//! Forwarding client requests to the upstream services of their zone.
//!
//! Each zone has a set of upstream instances (static `zones:` config now, the
//! control plane's registry later). The router keeps one lazily connected tonic
//! [`Channel`] per instance, picks an instance per request (least outstanding
//! requests, power-of-two-choices, among available instances), calls
//! `UpstreamService.ProcessRequest` under a deadline, and keeps each instance's
//! health from active checks (`UpstreamService.GetStatus`, `grpc.health.v1`
//! for upstreams without it) and from request outcomes
//! (passive ejection).
//!
//! It retries only what was certainly not executed: when an instance refuses
//! the connection or answers `UNAVAILABLE`, the request goes to another
//! instance of the zone (up to [`MAX_ATTEMPTS`] in all, within the same
//! deadline). A request that may have reached an upstream (timeout, a
//! connection lost after sending, any other status) is never sent again; the
//! client decides, with the same `seq_id`, which the session dedupes. It does not decide zones either: callers pass the zone of the
//! session's openid (`gatesvr_proto::zone`).
//!
//! ```text
//!  session ──forward(req)──▶ UpstreamRouter
//!                              │ 1. zone lookup            ─▶ UnknownZone
//!                              │ 2. node-wide semaphore     ─▶ Overloaded (no waiting)
//!                              │ 3. Balancer::pick (p2c; all instances if none is available) ─▶ NoInstances
//!                              │ 4. ProcessRequest, grpc-timeout + local timeout
//!                              │    refused unexecuted ─▶ back to 3, another instance
//!                              ▼
//!                          Channel ──HTTP/2──▶ upstream instance
//!                              │ 5. Balancer::finish(outcome): passive ejection
//!  run_health_checks ──every health_check_interval──▶ GetStatus ─▶ Balancer::record_check
//! ```
//!
//! # Layout
//! - `config` — [`UpstreamConfig`], the `upstream:` config section.
//! - `handler` — what answers a client request: the zone's upstream, or
//!   the echo handler of tests and `gatesvr dev`.
//! - `instance` — [`Instance`] (address + registry id), validation.
//! - `balancer` — sans-IO selection and health bookkeeping for one zone.
//! - `error` — [`ForwardError`], the gRPC status mapping (what the client is
//!   told is in `crate::errors`).
//! - `health` — the active health-check loop.
//! - `metrics` — Prometheus metrics.

pub(crate) mod balancer;
pub(crate) mod config;
pub(crate) mod error;
pub(crate) mod handler;
mod health;
pub(crate) mod instance;
mod metrics;
pub(crate) mod sink;
pub(crate) mod stream;
pub(crate) mod tls;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use gatesvr_common::config::Validate;
use gatesvr_proto::upstream::upstream_service_client::UpstreamServiceClient;
use gatesvr_proto::upstream::{ProcessRequestRequest, ProcessRequestResponse};
use parking_lot::{Mutex, RwLock};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

pub use balancer::{InstanceState, InstanceStatus};
pub use config::{OutlierDetectionConfig, UpstreamConfig, UpstreamProtocol};
pub use error::ForwardError;
pub use instance::{Instance, InvalidAddress, instances_by_zone, static_instances};
pub use stream::PushSink;

use balancer::{Balancer, BalancerConfig, EndpointId, Outcome, Transition};
use metrics::{Metrics, UNKNOWN_ZONE_LABEL};

/// Instances one request may try: the first, then others only while each
/// refused it without executing it (connection refused, `UNAVAILABLE`).
const MAX_ATTEMPTS: usize = 3;

/// Metadata key carrying the request's trace id to the upstream.
pub const TRACE_ID_METADATA: &str = "x-gatesvr-trace-id";

/// One client request to forward.
#[derive(Clone, Debug, Default)]
pub struct ForwardRequest {
    /// The session's user.
    pub openid: String,
    /// The session.
    pub session_id: String,
    /// Zone of `openid`; picks the upstream.
    pub zone: String,
    /// This data-plane node's id.
    pub node_id: String,
    /// Application command id (opaque).
    pub msg_id: u32,
    /// The request's per-session sequence number.
    pub seq_id: u64,
    /// Application payload (opaque).
    pub payload: Bytes,
    /// Trace id, sent in the body and as `x-gatesvr-trace-id`.
    pub trace_id: String,
}

/// Could not set up the router.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A configuration value cannot work.
    #[error(transparent)]
    Config(#[from] gatesvr_common::config::ConfigError),
    /// Metrics could not be registered (already registered in this registry).
    #[error("registering upstream metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Routes requests to upstream instances by zone. Share it behind an `Arc`.
#[derive(Debug)]
pub struct UpstreamRouter {
    cfg: UpstreamConfig,
    zones: RwLock<HashMap<String, Arc<Zone>>>,
    /// Node-wide cap on upstream calls in flight (`max_upstream_concurrent`).
    /// Acquired without waiting: queueing behind a full upstream only turns an
    /// overload into timeouts.
    limit: Arc<Semaphore>,
    metrics: Metrics,
    /// Client TLS per zone (`upstream.tls`, `upstream.zone_tls`).
    tls: tls::TlsByZone,
    /// With `protocol: stream`: one stream link per instance address.
    streams: Mutex<HashMap<Arc<str>, Arc<stream::StreamLink>>>,
    /// Where pushes arriving on streams go; set once the node exists.
    push_sink: Arc<std::sync::OnceLock<Arc<dyn PushSink>>>,
    /// This node's id, told to upstreams in the stream hello.
    node_id: String,
}

#[derive(Debug)]
struct Zone {
    name: String,
    /// Held only for bookkeeping, never across an await.
    state: Mutex<ZoneState>,
}

#[derive(Debug)]
struct ZoneState {
    balancer: Balancer<Channel>,
    rng: StdRng,
}

impl UpstreamRouter {
    /// A router with no zones; add them with [`set_zone_instances`] or
    /// [`replace_all`]. Registers its metrics in `registry`.
    ///
    /// [`set_zone_instances`]: Self::set_zone_instances
    /// [`replace_all`]: Self::replace_all
    pub fn new(cfg: UpstreamConfig, registry: &prometheus::Registry) -> Result<Self, SetupError> {
        Self::for_node(cfg, registry, "")
    }

    /// As [`new`](Self::new), naming this node to upstreams (stream hellos).
    pub fn for_node(
        cfg: UpstreamConfig,
        registry: &prometheus::Registry,
        node_id: &str,
    ) -> Result<Self, SetupError> {
        cfg.validate()?;
        let metrics = Metrics::register(registry)?;
        let tls = tls::TlsByZone::build(cfg.tls.as_ref(), &cfg.zone_tls)?;
        Ok(Self {
            streams: Mutex::new(HashMap::new()),
            push_sink: Arc::new(std::sync::OnceLock::new()),
            node_id: node_id.to_owned(),
            tls,
            limit: Arc::new(Semaphore::new(cfg.max_upstream_concurrent)),
            zones: RwLock::new(HashMap::new()),
            metrics,
            cfg,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &UpstreamConfig {
        &self.cfg
    }

    /// Where pushes and broadcasts that upstreams send on their streams go.
    /// Set once; later calls are ignored.
    pub fn set_push_sink(&self, sink: Arc<dyn PushSink>) {
        let _ = self.push_sink.set(sink);
    }

    /// Requests outstanding on upstream streams, all instances together.
    pub fn stream_requests_outstanding(&self) -> i64 {
        self.metrics.stream_outstanding.get()
    }

    /// Tells every upstream this node has a stream to that the node is
    /// leaving (`GatewayFrame.drain`); no new requests go on those streams.
    pub async fn drain_streams(&self) {
        let links: Vec<_> = self.streams.lock().values().cloned().collect();
        for link in links {
            link.drain().await;
        }
    }

    /// Fails every request still outstanding on an upstream stream with an
    /// explicit outcome-unknown error (the node is stopping).
    pub async fn abandon_streams(&self) {
        let links: Vec<_> = self.streams.lock().values().cloned().collect();
        for link in links {
            link.abandon().await;
        }
    }

    /// The stream link to `addr`, made on first use.
    fn stream_link(&self, addr: &Arc<str>, channel: &Channel) -> Arc<stream::StreamLink> {
        self.streams
            .lock()
            .entry(addr.clone())
            .or_insert_with(|| {
                Arc::new(stream::StreamLink::new(
                    channel.clone(),
                    stream::LinkConfig {
                        node_id: self.node_id.clone(),
                        connect_timeout: self.cfg.connect_timeout,
                        max_pushes_in_flight: self.cfg.stream_max_pushes_in_flight,
                        max_requests_in_flight: self.cfg.stream_max_requests_in_flight,
                    },
                    self.push_sink.clone(),
                    Arc::new(self.metrics.stream_outstanding.clone()),
                ))
            })
            .clone()
    }

    /// One request over the instance's stream.
    async fn attempt_stream(
        &self,
        zone: &Zone,
        picked: &balancer::Pick<Channel>,
        body: ProcessRequestRequest,
        timeout: std::time::Duration,
    ) -> Result<ProcessRequestResponse, ForwardError> {
        let mut in_flight = InFlight {
            router: self,
            zone,
            id: picked.id,
            outcome: Outcome::Neutral,
        };
        let link = self.stream_link(&picked.addr, &picked.value);
        let started = tokio::time::Instant::now();
        let result = link.call(body, timeout).await;
        self.metrics
            .duration
            .with_label_values(&[zone.name.as_str()])
            .observe(started.elapsed().as_secs_f64());
        let addr = picked.addr.clone();
        let retry_after =
            || u32::try_from(self.cfg.overload_retry_after.as_millis()).unwrap_or(u32::MAX);
        let (result, outcome) = match result {
            Ok(answer) => (Ok(answer), Outcome::Success),
            Err(stream::CallError::NotSent(reason)) => (
                Err(ForwardError::Unavailable {
                    addr,
                    status: tonic::Status::unavailable(reason),
                }),
                Outcome::Failure,
            ),
            Err(stream::CallError::NoCredit) => (
                Err(ForwardError::UpstreamOverloaded {
                    addr,
                    retry_after_ms: Some(retry_after()),
                    status: tonic::Status::resource_exhausted("request window full"),
                }),
                Outcome::Neutral,
            ),
            Err(stream::CallError::NotExecuted { retry_after_ms }) => (
                Err(ForwardError::UpstreamOverloaded {
                    addr,
                    retry_after_ms: Some(if retry_after_ms == 0 {
                        retry_after()
                    } else {
                        retry_after_ms
                    }),
                    status: tonic::Status::unavailable("not executed"),
                }),
                Outcome::Neutral,
            ),
            Err(stream::CallError::Lost) => (
                Err(ForwardError::Lost {
                    addr,
                    status: tonic::Status::unavailable("stream ended"),
                }),
                Outcome::Failure,
            ),
            Err(stream::CallError::Timeout) => (
                Err(ForwardError::Timeout { addr, timeout }),
                Outcome::Failure,
            ),
        };
        in_flight.outcome = outcome;
        result
    }

    /// Sets the instances of `zone`, creating the zone if needed. Instances
    /// whose address is already known keep their channel, health and counters.
    /// An empty list keeps the zone known (requests fail with `NoInstances`,
    /// not `UnknownZone`).
    ///
    /// # Panics
    /// Outside a Tokio runtime (tonic spawns each new channel's worker).
    pub fn set_zone_instances(&self, zone: &str, instances: Vec<Instance>) {
        let existing = self.zones.read().get(zone).cloned();
        let zone = match existing {
            Some(zone) => zone,
            None => self
                .zones
                .write()
                .entry(zone.to_owned())
                .or_insert_with(|| self.new_zone(zone))
                .clone(),
        };
        {
            let mut state = zone.state.lock();
            state
                .balancer
                .set_instances(instances, |instance| self.channel(&zone.name, instance));
            self.report_instances(&zone, &state, now());
        }
        self.prune_streams();
    }

    /// Forgets the stream links of instances no zone names any more (their
    /// streams end once no request holds them).
    fn prune_streams(&self) {
        if self.streams.lock().is_empty() {
            return;
        }
        let zones: Vec<Arc<Zone>> = self.zones.read().values().cloned().collect();
        let known: std::collections::HashSet<Arc<str>> = zones
            .iter()
            .flat_map(|z| z.state.lock().balancer.targets())
            .map(|(_, addr, _)| addr)
            .collect();
        self.streams.lock().retain(|addr, _| known.contains(addr));
    }

    /// Replaces the whole routing table: zones missing from `zones` are
    /// removed (their channels close once in-flight requests finish), the
    /// others are updated as by [`set_zone_instances`](Self::set_zone_instances).
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn replace_all(&self, zones: HashMap<String, Vec<Instance>>) {
        let removed: Vec<String> = {
            let mut table = self.zones.write();
            let removed = table
                .keys()
                .filter(|z| !zones.contains_key(*z))
                .cloned()
                .collect();
            table.retain(|z, _| zones.contains_key(z));
            removed
        };
        for zone in removed {
            self.metrics.forget_zone(&zone);
        }
        for (zone, instances) in zones {
            self.set_zone_instances(&zone, instances);
        }
        self.prune_streams();
    }

    /// Known zones, sorted.
    pub fn zones(&self) -> Vec<String> {
        let mut zones: Vec<String> = self.zones.read().keys().cloned().collect();
        zones.sort();
        zones
    }

    /// The instances of `zone` and their state, or `None` for an unknown zone.
    pub fn instances(&self, zone: &str) -> Option<Vec<InstanceStatus>> {
        let zone = self.zones.read().get(zone).cloned()?;
        let statuses = zone.state.lock().balancer.statuses(now());
        Some(statuses)
    }

    /// Forwards one request to an instance of `req.zone` and returns its
    /// answer. Bounded in time by `upstream_timeout` (plus connection setup
    /// within `connect_timeout`); fails fast when the node is at
    /// `max_upstream_concurrent`.
    pub async fn forward(
        &self,
        req: ForwardRequest,
    ) -> Result<ProcessRequestResponse, ForwardError> {
        let zone_name = req.zone.clone();
        // One future, not one per step: every request's future is moved by
        // value into its box and into each caller's state, so its size is
        // paid per request (docs/benchmarks.md "Session 12").
        let result = 'forward: {
            let Some(zone) = self.zones.read().get(&req.zone).cloned() else {
                break 'forward Err(ForwardError::UnknownZone { zone: req.zone });
            };
            let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                let retry_after_ms =
                    u32::try_from(self.cfg.overload_retry_after.as_millis()).unwrap_or(u32::MAX);
                break 'forward Err(ForwardError::Overloaded { retry_after_ms });
            };
            let _admitted = Admitted::new(permit, &self.metrics);

            let deadline = tokio::time::Instant::now() + self.cfg.upstream_timeout;
            let mut body = ProcessRequestRequest {
                openid: req.openid,
                session_id: req.session_id,
                zone: req.zone,
                node_id: req.node_id,
                msg_id: req.msg_id,
                seq_id: req.seq_id,
                payload: req.payload,
                trace_id: req.trace_id,
            };
            let mut tried: Vec<EndpointId> = Vec::new();
            loop {
                let (picked, others) = {
                    let mut state = zone.state.lock();
                    let ZoneState { balancer, rng } = &mut *state;
                    let picked = balancer.pick_excluding(now(), rng, &tried);
                    (picked, balancer.len().saturating_sub(tried.len() + 1))
                };
                let Some(picked) = picked else {
                    break 'forward Err(ForwardError::NoInstances { zone: body.zone });
                };
                if picked.panic {
                    self.metrics
                        .panic_routed
                        .with_label_values(&[&body.zone])
                        .inc();
                }
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                // Keep the body for another instance only when there is one (the
                // payload is shared, the few strings are copied).
                let spare = (others > 0 && tried.len() < MAX_ATTEMPTS - 1).then(|| body.clone());
                // The unary call is boxed: its future (tonic's client call in a
                // timeout) is several KiB, and this one would hold it even for
                // requests that take the stream.
                let result = if self.cfg.protocol == UpstreamProtocol::Stream {
                    self.attempt_stream(&zone, &picked, body, remaining).await
                } else {
                    let picked = balancer::Pick {
                        id: picked.id,
                        addr: picked.addr.clone(),
                        value: picked.value.clone(),
                        panic: picked.panic,
                    };
                    Box::pin(self.attempt_unary(&zone, picked, body, remaining)).await
                };
                match result {
                    Err(err) if err.retry_elsewhere() && !remaining.is_zero() => match spare {
                        Some(spare) => {
                            tracing::debug!(zone = %zone.name, error = %err, "not executed; trying another instance");
                            self.metrics
                                .retried
                                .with_label_values(&[zone.name.as_str()])
                                .inc();
                            tried.push(picked.id);
                            body = spare;
                        }
                        None => break 'forward Err(err),
                    },
                    result => break 'forward result,
                }
            }
        };
        let (zone, outcome) = match &result {
            Ok(_) => (zone_name.as_str(), "ok"),
            // Only known zones become label values.
            Err(err @ ForwardError::UnknownZone { .. }) => (UNKNOWN_ZONE_LABEL, err.label()),
            Err(err) => (zone_name.as_str(), err.label()),
        };
        self.metrics
            .requests
            .with_label_values(&[zone, outcome])
            .inc();
        result
    }

    /// One unary `ProcessRequest` call to one picked instance, within `timeout`.
    async fn attempt_unary(
        &self,
        zone: &Zone,
        picked: balancer::Pick<Channel>,
        body: ProcessRequestRequest,
        timeout: std::time::Duration,
    ) -> Result<ProcessRequestResponse, ForwardError> {
        // Reports the outcome to the balancer when dropped, also if this future
        // is dropped mid-call (then as Neutral).
        let mut in_flight = InFlight {
            router: self,
            zone,
            id: picked.id,
            outcome: Outcome::Neutral,
        };
        let trace_id = MetadataValue::try_from(body.trace_id.as_str());
        let mut request = tonic::Request::new(body);
        // Tells the upstream its deadline; the local timeout below enforces it.
        request.set_timeout(timeout);
        match trace_id {
            Ok(value) => {
                request.metadata_mut().insert(TRACE_ID_METADATA, value);
            }
            // Still in the body; a header cannot carry it.
            Err(_) => {
                tracing::debug!("trace id is not a valid header value; sent in the body only")
            }
        }

        let started = tokio::time::Instant::now();
        // The one place upstream channels get their message limits (proto/src/limits.rs).
        let mut client = UpstreamServiceClient::new(picked.value)
            .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES);
        let result = tokio::time::timeout(timeout, client.process_request(request)).await;
        self.metrics
            .duration
            .with_label_values(&[zone.name.as_str()])
            .observe(started.elapsed().as_secs_f64());

        let (result, outcome) = match result {
            Ok(Ok(response)) => (Ok(response.into_inner()), Outcome::Success),
            Ok(Err(status)) => {
                let (err, outcome) = ForwardError::from_status(picked.addr, status, timeout);
                (Err(err), outcome)
            }
            Err(_elapsed) => (
                Err(ForwardError::Timeout {
                    addr: picked.addr,
                    timeout,
                }),
                Outcome::Failure,
            ),
        };
        in_flight.outcome = outcome;
        result
    }

    /// Reports a finished request to its zone's balancer.
    fn finish(&self, zone: &Zone, id: EndpointId, outcome: Outcome) {
        let now = now();
        let mut state = zone.state.lock();
        if let Some(transition) = state.balancer.finish(id, outcome, now) {
            log_transition(&zone.name, &transition);
            self.report_instances(zone, &state, now);
        }
    }

    fn new_zone(&self, name: &str) -> Arc<Zone> {
        Arc::new(Zone {
            name: name.to_owned(),
            state: Mutex::new(ZoneState {
                balancer: Balancer::new(BalancerConfig::from(&self.cfg)),
                rng: StdRng::seed_from_u64(rand::random()),
            }),
        })
    }

    /// A lazily connected channel to `instance`: requests wait for the
    /// connection (bounded by `connect_timeout`), and a broken connection is
    /// re-established on the next request.
    fn channel(&self, zone: &str, instance: &Instance) -> Channel {
        let endpoint = match self.tls.for_zone(zone) {
            None => instance.endpoint().clone(),
            Some(tls) => match tonic::transport::Endpoint::from_shared(format!(
                "https://{}",
                instance.addr()
            ))
            .and_then(|e| e.tls_config(tls.clone()))
            {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    // Not expected: the address was validated and the same
                    // TLS config accepted at start. Never fall back to
                    // plaintext: a channel to nowhere fails every request.
                    tracing::error!(zone, addr = instance.addr(), error = %e, "cannot build a TLS channel to the upstream");
                    tonic::transport::Endpoint::from_static("https://0.0.0.0:1")
                }
            },
        };
        endpoint
            .connect_timeout(self.cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.cfg.keepalive_interval)
            .keep_alive_timeout(self.cfg.keepalive_timeout)
            .keep_alive_while_idle(true)
            .connect_lazy()
    }

    /// Updates the zone's instance gauges.
    fn report_instances(&self, zone: &Zone, state: &ZoneState, now: Instant) {
        for s in InstanceState::ALL {
            self.metrics
                .set_instances(&zone.name, s, state.balancer.count(s, now));
        }
    }
}

/// Holds one `max_upstream_concurrent` permit and the in-flight gauge.
struct Admitted<'a> {
    _permit: OwnedSemaphorePermit,
    metrics: &'a Metrics,
}

impl<'a> Admitted<'a> {
    fn new(permit: OwnedSemaphorePermit, metrics: &'a Metrics) -> Self {
        metrics.inflight.inc();
        Self {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.metrics.inflight.dec();
    }
}

/// One picked request; tells the balancer how it ended when dropped.
struct InFlight<'a> {
    router: &'a UpstreamRouter,
    zone: &'a Zone,
    id: EndpointId,
    outcome: Outcome,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.router.finish(self.zone, self.id, self.outcome);
    }
}

/// The clock the balancer is fed: Tokio's, so tests can pause it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn log_transition(zone: &str, transition: &Transition) {
    match transition {
        Transition::MarkedUnhealthy { addr } => {
            tracing::warn!(zone, %addr, "upstream instance failed health checks; taken out of rotation");
        }
        Transition::MarkedHealthy { addr } => {
            tracing::info!(zone, %addr, "upstream instance passed health checks; back in rotation");
        }
        Transition::Ejected { addr, duration } => {
            tracing::warn!(zone, %addr, ?duration, "upstream instance ejected after consecutive failures");
        }
    }
}

#[cfg(test)]
mod tests;
