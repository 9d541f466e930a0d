//! GateSvr data plane: terminates clients' QUIC connections, runs their
//! sessions, forwards requests to the zone's upstream, and accepts pushes from
//! upstreams.
//!
//! It does not decide ownership or membership: that is the control plane's job,
//! reached only over gRPC (`gatesvr.control.v1`). A node keeps serving what it
//! has when the control plane is away.
//!
//! # Layout
//! One folder per layer; the crate's API is [`DataPlane`] and its
//! [`config`]. [`core`] and [`session`] are public because the simulation
//! (tests/tests/sim) and the fuzz targets drive them directly; what else is
//! public is named below; everything else is `pub(crate)`.
//! - [`session`]: the sans-IO session state machine (seq numbers, unacked
//!   queue, retransmit, resume, request dedupe, export/import). No I/O.
//! - [`core`]: the sans-IO session table: which sessions are here, incoming,
//!   moved, fenced, at which epoch; events in, commands out.
//! - [`edge`]: clients' way in. `quic` (endpoint, admission; public for
//!   gate-bench), `quic_keys`, `transport` (QUIC, WebTransport, WebSocket),
//!   `connection` (the I/O shell around a session), `webtransport`,
//!   `websocket`, `auth` (public for the binary and fuzzing), `start_limit`.
//! - [`cluster`]: the control-plane client (`cluster.rs`: membership, view,
//!   claims; public for gate-bench) and beside it `registry` (the table's
//!   shell), `peer` (handover, push forwarding), `replica` (durable pushes,
//!   crash recovery), `drain`, `node` (what a node shares).
//! - `push`: `GatewayService` for upstreams (push, broadcast) and the gRPC
//!   port's authorization.
//! - [`upstream`]: zone -> upstream instances, picking and forwarding, and
//!   the request `handler`.
//! - `ops`: HTTP endpoints, metrics, performance windows.
//! - `errors`: every error's wire form (client codes and messages, QUIC and
//!   WebSocket close codes), in one place.
//! - [`config`]: the typed configuration.
//!
//! ```text
//!  client ──QUIC──> quic::accept_loop ─┬──> connection::serve ──> Session (registry)
//!  browser ─WebTransport (h3, same port)┘        ▲
//!  browser ─WebSocket──> websocket::accept_loop ─┘
//!                                              │  request            ▲ push
//!                                              ▼                     │
//!                                      handler / upstream ──gRPC──> upstream ──gRPC──> gateway (GatewayService)
//! ```

pub mod cluster;
pub mod config;
pub mod core;
pub mod edge;
pub(crate) mod errors;
pub(crate) mod ops;
pub(crate) mod push;
pub mod session;
pub mod upstream;

// The modules by their names before the layer folders (`crate::registry`,
// ...), so that a file that moved kept its `use` lines.
use cluster::{drain, node, peer, registry};
use edge::{auth, connection, quic, quic_keys, start_limit, transport, websocket, webtransport};
use ops::{http, load, metrics, perf};
use push::{gateway, grpc_auth};
use upstream::handler;
// The simulation (tests/tests/sim) still names the replica store by its old path.
pub use cluster::replica;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::DataPlaneConfig;
pub use handler::{Handler, Routing};
pub use node::Node;

/// Why a node could not start. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
}

/// What [`DataPlane::serve_until`] does when its signal comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSignal {
    /// Drain, then stop (SIGTERM of `gatesvr dataplane`: a rolling upgrade).
    Drain,
    /// Stop at once (Ctrl-C of `gatesvr dev`).
    Stop,
}

/// A running data-plane node.
pub struct DataPlane {
    node: Arc<Node>,
    endpoint: quinn::Endpoint,
    quic_addr: SocketAddr,
    http_addr: SocketAddr,
    grpc_addr: SocketAddr,
    metrics_addr: SocketAddr,
    ops_addr: Option<SocketAddr>,
    websocket_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    drain_signal: Arc<tokio::sync::Notify>,
}

async fn bind_tcp(what: &'static str, addr: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

/// A router over every configured zone, with the static instances from
/// `zones.upstreams` (a zone without instances answers UPSTREAM_UNAVAILABLE).
fn static_router(
    config: &DataPlaneConfig,
    metrics: &metrics::Metrics,
) -> Result<upstream::UpstreamRouter, StartError> {
    let router = upstream::UpstreamRouter::for_node(
        config.upstream_config(),
        &metrics.registry,
        &config.node_id,
    )
    .map_err(|e| StartError::Config(e.to_string()))?;
    for index in 0..config.zones.count {
        let zone = gatesvr_proto::zone::zone_id(index);
        let addrs: Vec<String> = config
            .zones
            .upstreams
            .iter()
            .filter(|z| z.zone == zone)
            .flat_map(|z| z.addrs.iter().cloned())
            .collect();
        let instances =
            upstream::static_instances(&addrs).map_err(|e| StartError::Config(e.to_string()))?;
        router.set_zone_instances(&zone, instances);
    }
    Ok(router)
}

/// TLS for `server.grpc_addr`: (server config, client config for peers, push token).
#[allow(clippy::type_complexity)]
fn internal_tls(
    config: &DataPlaneConfig,
) -> Result<
    (
        Option<tonic::transport::ServerTlsConfig>,
        Option<tonic::transport::ClientTlsConfig>,
        Option<Arc<str>>,
    ),
    StartError,
> {
    let s = &config.server;
    let Some(files) = &s.grpc_tls else {
        tracing::warn!(
            "server.grpc_tls unset: GatewayService and the Peer service on {} are PLAINTEXT; keep that port on a private network",
            s.grpc_addr
        );
        return Ok((None, None, None));
    };
    let err =
        |e: gatesvr_common::tls::TlsError| StartError::Config(format!("server.grpc_tls: {e}"));
    let token = match &s.push_token_file {
        Some(path) => {
            let raw = std::fs::read(path)
                .map_err(|e| StartError::Config(format!("server.push_token_file: {e}")))?;
            Some(Arc::from(
                String::from_utf8_lossy(raw.trim_ascii()).as_ref(),
            ))
        }
        None => None,
    };
    let server = gatesvr_common::tls::tonic_server_tls(files)
        .map_err(err)?
        .client_auth_optional(token.is_some());
    let client = gatesvr_common::tls::tonic_client_tls(files, &s.grpc_server_name).map_err(err)?;
    Ok((Some(server), Some(client), token))
}

/// Once a second: report the session count, refresh the cluster gauges, and
/// claim sessions that started while the control plane was unreachable.
async fn cluster_upkeep(node: Arc<Node>, stop: CancellationToken) {
    let Some(cluster) = node.cluster.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        cluster.set_session_count(node.registry.len());
        node.metrics
            .control_plane_connected
            .set(i64::from(cluster.is_connected()));
        node.metrics
            .cluster_state_stale
            .set(i64::from(cluster.is_stale()));
        if !cluster.is_connected() {
            continue;
        }
        let pending: Vec<String> = node.provisional.lock().iter().cloned().collect();
        for openid in pending {
            let Some(entry) = node.registry.get(&openid) else {
                node.provisional.lock().remove(&openid);
                continue;
            };
            match cluster.claim(&openid, &entry.identity.session_id, "").await {
                Ok(claimed) => {
                    entry.state.lock().set_epoch(claimed.epoch);
                    node.provisional.lock().remove(&openid);
                    node.metrics
                        .provisional_sessions
                        .with_label_values(&["claimed"])
                        .inc();
                }
                Err(e) => {
                    tracing::debug!(openid = %openid, error = %e, "provisional claim failed; will retry")
                }
            }
        }
    }
}

impl DataPlane {
    /// Binds every listener and starts serving. Addresses with port 0 get an
    /// ephemeral port; the accessors return what was bound.
    pub async fn start(config: DataPlaneConfig, routing: Routing) -> Result<Self, StartError> {
        gatesvr_common::tls::install_crypto_provider();
        let verifier = auth::Verifier::from_config(&config.auth).map_err(StartError::Config)?;
        let metrics = metrics::Metrics::new();
        let handler = match routing {
            Routing::Echo => Handler::Echo,
            Routing::Upstreams => Handler::Upstream(Arc::new(static_router(&config, &metrics)?)),
        };
        let router = match &handler {
            Handler::Upstream(r) => Some(r.clone()),
            Handler::Echo => None,
        };
        let endpoint = quic::bind_counted(
            &config.server,
            config.transports.webtransport,
            Some(&metrics),
        )
        .map_err(StartError::Config)?;
        let quic_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
            what: "QUIC",
            addr: config.server.quic_addr.clone(),
            source,
        })?;
        let http = bind_tcp("HTTP", &config.server.http_addr).await?;
        let grpc = bind_tcp("gRPC", &config.server.grpc_addr).await?;
        let metrics_listener = bind_tcp("metrics", &config.server.metrics_addr).await?;
        let websocket = match &config.transports.websocket_addr {
            Some(addr) => Some(bind_tcp("WebSocket", addr).await?),
            None => None,
        };
        let local = |l: &TcpListener, what| {
            l.local_addr().map_err(|source| StartError::Bind {
                what,
                addr: String::new(),
                source,
            })
        };
        let websocket_addr = websocket
            .as_ref()
            .map(|l| local(l, "WebSocket"))
            .transpose()?;
        let (http_addr, grpc_addr, metrics_addr) = (
            local(&http, "HTTP")?,
            local(&grpc, "gRPC")?,
            local(&metrics_listener, "metrics")?,
        );

        let cluster = if config.control_plane.enabled() {
            let cp = &config.control_plane;
            let cluster = cluster::Cluster::new(
                cp.clone(),
                config.node_id.clone(),
                cp.advertise_quic_addr
                    .clone()
                    .unwrap_or_else(|| quic_addr.to_string()),
                cp.advertise_grpc_addr
                    .clone()
                    .unwrap_or_else(|| grpc_addr.to_string()),
                router,
            )
            .map_err(StartError::Config)?;
            Some(Arc::new(cluster))
        } else {
            None
        };

        let (grpc_tls, peer_tls, push_token) = internal_tls(&config)?;
        let authz =
            grpc_auth::layer(&config, &metrics.registry, push_token).map_err(StartError::Config)?;
        let ops_token = http::ops_token(&config.server).map_err(StartError::Config)?;
        let ops = match &config.server.ops_addr {
            Some(addr) => Some(bind_tcp("ops", addr).await?),
            None => None,
        };
        let ops_addr = ops.as_ref().map(|l| local(l, "ops")).transpose()?;
        let node = Arc::new(Node::new(
            config,
            verifier,
            handler,
            metrics,
            cluster,
            peer::Peers::new(peer_tls),
        ));
        let cancel = CancellationToken::new();
        let draining = node.draining.clone();
        let ready = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();

        if let Some(cluster) = &node.cluster {
            // The view feeds the session table, level-triggered: an owner
            // record (delta) or the whole view (snapshot, resync, node
            // change) is compared with the table's slots at once. A local
            // copy owned elsewhere at a newer epoch is fenced immediately; its
            // state waits in the table for the new owner's Handover.
            let weak = Arc::downgrade(&node);
            cluster.on_owner_moved(move |owner| {
                if let Some(node) = weak.upgrade() {
                    node.registry.owner_changed(owner);
                }
            });
            // A session that ended here gives its owner record back (batched).
            let releaser = Arc::downgrade(cluster);
            node.registry.on_ended(move |openid, session_id, epoch| {
                if let Some(c) = releaser.upgrade() {
                    c.release_later(openid, session_id, epoch);
                }
            });
            // A scoped watch: after a snapshot, the sessions served here
            // that it does not name as this node's are looked up (fenced if
            // owned elsewhere).
            let weak = Arc::downgrade(&node);
            cluster.on_local_openids(move || {
                weak.upgrade().map_or_else(Vec::new, |node| {
                    node.registry
                        .all()
                        .iter()
                        .map(|e| e.identity.openid.clone())
                        .collect()
                })
            });
            let lookups = node.metrics.owner_lookups.clone();
            cluster.on_lookup(move |result| lookups.with_label_values(&[result]).inc());
            let weak = Arc::downgrade(&node);
            cluster.on_view(move |view| {
                if let Some(node) = weak.upgrade() {
                    node.registry.view_changed(view);
                }
            });
            tasks.push(tokio::spawn(cluster.clone().run(cancel.clone())));
            tasks.push(tokio::spawn(cluster_upkeep(node.clone(), cancel.clone())));
            tasks.push(tokio::spawn(replica::run(node.clone(), cancel.clone())));
        }

        if let Handler::Upstream(router) = &node.handler {
            let router = router.clone();
            let stop = cancel.clone();
            tasks.push(tokio::spawn(async move {
                router.run_health_checks(stop.cancelled_owned()).await;
            }));
        }
        // One max_connections budget for every transport.
        let slots = transport::connection_slots(&node.config.overload_protection);
        tasks.push(tokio::spawn(quic::accept_loop(
            node.clone(),
            endpoint.clone(),
            draining,
            slots.clone(),
        )));
        if let Some(listener) = websocket {
            let tls = websocket::tls_config(&node).map_err(StartError::Config)?;
            tasks.push(tokio::spawn(websocket::accept_loop(
                node.clone(),
                listener,
                tls,
                slots,
                node.config
                    .transports
                    .webtransport
                    .then_some(quic_addr.port()),
                cancel.clone(),
            )));
        }

        // The session table's timers: sleep until its next deadline.
        let timers = node.clone();
        let stop = cancel.clone();
        tasks.push(tokio::spawn(async move {
            registry::run_timers(&timers.registry, stop).await;
        }));
        let sampler = node.clone();
        let stop = cancel.clone();
        tasks.push(tokio::spawn(async move {
            let mut sample = tokio::time::interval(std::time::Duration::from_secs(1));
            sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = sample.tick() => {
                        sampler.metrics.message_queue_size.set(sampler.registry.queued() as i64);
                        sampler.sampler.sample(&sampler.metrics);
                    }
                    () = stop.cancelled() => return,
                }
            }
        }));

        let sampler = node.clone();
        let stop = cancel.clone();
        tasks.push(tokio::spawn(async move {
            let s = &sampler.config.server;
            let (coalesce, busy) = (s.push_coalesce, s.push_coalesce_busy);
            let gauge = &sampler.metrics.runtime_busy;
            load::run(&sampler.load, gauge, coalesce, busy, stop).await;
        }));

        let drain_signal = Arc::new(tokio::sync::Notify::new());
        let http_router = http::router(http::HttpState {
            node: node.clone(),
            ready: ready.clone(),
            drain: drain_signal.clone(),
        });
        let stop = cancel.clone();
        tasks.push(tokio::spawn(async move {
            let serve =
                axum::serve(http, http_router).with_graceful_shutdown(stop.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        }));
        if let Some(ops) = ops {
            let ops_router = http::ops_router(
                http::HttpState {
                    node: node.clone(),
                    ready: ready.clone(),
                    drain: drain_signal.clone(),
                },
                ops_token,
            )
            .map_err(|e| StartError::Config(e.to_string()))?;
            let stop = cancel.clone();
            tasks.push(tokio::spawn(async move {
                let serve =
                    axum::serve(ops, ops_router).with_graceful_shutdown(stop.cancelled_owned());
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "ops HTTP server failed");
                }
            }));
        }
        let stop = cancel.clone();
        let metrics_router = http::metrics_router(node.clone());
        tasks.push(tokio::spawn(async move {
            let serve = axum::serve(metrics_listener, metrics_router)
                .with_graceful_shutdown(stop.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "metrics server failed");
            }
        }));

        if let Handler::Upstream(router) = &node.handler {
            // Pushes upstreams send on their streams (upstream protocol `stream`).
            router.set_push_sink(Arc::new(upstream::sink::GatewaySink(node.clone())));
        }
        let gateway = gatesvr_proto::upstream::gateway_service_server::GatewayServiceServer::new(
            gateway::Gateway { node: node.clone() },
        )
        .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES);
        let stop = cancel.clone();
        let peer_node = node.clone();
        tasks.push(tokio::spawn(async move {
            // TCP_NODELAY on every accepted connection: `Server::tcp_nodelay` does not apply to
            // `serve_with_incoming`, and without it an answer written in more than one segment
            // waits for the caller's delayed ACK (~40 ms; the control plane's ClaimSessions showed
            // it, docs/benchmarks.md).
            let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
            let peer = gatesvr_proto::peer::peer_server::PeerServer::new(peer::PeerService {
                node: peer_node,
            })
            .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES);
            let mut server = tonic::transport::Server::builder();
            if let Some(tls) = grpc_tls {
                server = match server.tls_config(tls) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "gRPC TLS configuration rejected");
                        return;
                    }
                };
            }
            // One rule per method (grpc_auth): roles from the certificates.
            let mut server = server.layer(authz);
            // grpc.health.v1 for upstreams' load balancers and gRPC probes:
            // SERVING until shutdown (a draining node still takes pushes and
            // forwards them to the sessions' new owners).
            let (health, health_service) = tonic_health::server::health_reporter();
            health
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
            health
                .set_serving::<gatesvr_proto::upstream::gateway_service_server::GatewayServiceServer<gateway::Gateway>>()
                .await;
            let result = server
                .add_service(health_service)
                .add_service(gateway)
                .add_service(peer)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }));

        ready.store(true, Ordering::Relaxed);
        tracing::info!(
            node_id = %node.config.node_id,
            quic = %quic_addr, http = %http_addr, grpc = %grpc_addr, metrics = %metrics_addr,
            websocket = ?websocket_addr, webtransport = node.config.transports.webtransport,
            "data plane serving"
        );
        Ok(Self {
            node,
            endpoint,
            quic_addr,
            http_addr,
            grpc_addr,
            metrics_addr,
            ops_addr,
            websocket_addr,
            cancel,
            tasks,
            drain_signal,
        })
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }
    /// The operations listener (`server.ops_addr`), if configured.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops_addr
    }
    /// The WebSocket listener (`transports.websocket_addr`), if enabled.
    pub fn websocket_addr(&self) -> Option<SocketAddr> {
        self.websocket_addr
    }

    /// Drains the node (see `cluster::drain`): sessions move to other nodes, clients
    /// get a GoAway. Call [`DataPlane::shutdown`] afterwards.
    pub async fn drain(&self) -> drain::DrainReport {
        drain::drain(self.node.clone()).await
    }

    /// Serves until `signal` resolves or an operator asks for a drain
    /// (`POST /drain`, `gatectl nodes drain`), then stops. A drain request
    /// always drains first; `signal` drains or just stops as `on_signal`
    /// says. Returns the drain's report if one ran.
    ///
    /// `gatesvr dataplane` and every node of `gatesvr dev` run through here,
    /// so a drain request is never left unheard (issue 12, defect 6: `dev`
    /// never listened, and its nodes logged "asked to drain" forever).
    pub async fn serve_until(
        self,
        signal: impl std::future::Future<Output = ()>,
        on_signal: OnSignal,
    ) -> Option<drain::DrainReport> {
        let drain = tokio::select! {
            () = signal => on_signal == OnSignal::Drain,
            () = self.drain_requested() => {
                tracing::info!(node = %self.node.config.node_id, "drain requested");
                true
            }
        };
        let report = if drain {
            let report = self.drain().await;
            tracing::info!(
                staged = report.staged,
                remaining = report.remaining,
                "drained; stopping"
            );
            Some(report)
        } else {
            None
        };
        self.shutdown().await;
        report
    }

    /// Resolves when an operator asks for a drain (`POST /drain` or the
    /// control plane's drain request).
    pub async fn drain_requested(&self) {
        let http = self.drain_signal.notified();
        match &self.node.cluster {
            Some(cluster) => tokio::select! {
                () = http => {}
                () = cluster.drain_requested.notified() => {}
            },
            None => http.await,
        }
    }

    /// Test-only stand-in for `kill -9`: stops every task at once without a
    /// drain, a handover or a goodbye to the control plane (its lease simply
    /// expires). The gRPC services answer UNAVAILABLE from now on, so peers
    /// holding a channel see what they would see of a dead process; client
    /// connections are closed. Nothing is exported: whatever only this node
    /// held is lost, as in a real crash. Only with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    pub fn crash(self) {
        self.node.set_crashed(true);
        for task in &self.tasks {
            task.abort();
        }
        self.cancel.cancel();
        self.endpoint.close(errors::NODE_STOPPED, b"node crashed");
    }

    /// Closes every connection (code 0) and stops all listeners.
    pub async fn shutdown(self) {
        // Upstream streams take no new request; what is on them is answered
        // or failed explicitly before the connections close.
        drain::drain_upstream_streams(&self.node).await;
        self.cancel.cancel();
        self.endpoint
            .close(errors::NODE_STOPPED, b"server shutting down");
        let _ = tokio::time::timeout(quic::CLOSE_GRACE, self.endpoint.wait_idle()).await;
        for task in self.tasks {
            task.abort();
        }
    }
}
