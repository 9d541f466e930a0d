//! GateSvr's control plane: a raft group (openraft 0.9, raft-log) holding the registry of zones,
//! upstreams and data-plane nodes, session ownership with fencing epochs, and failover
//! decisions; served over gRPC (mTLS) to data-plane nodes and upstreams and over an HTTP/JSON
//! admin API to operators (`gatectl`).
//!
//! It does not route client traffic (that is the data plane, which it never links) and does
//! not move session state between nodes (it only decides who owns a session).
//!
//! # Layout
//! - [`state`]: the replicated state and its pure transition function over typed [`Cmd`]s.
//! - [`store`]: openraft's log store (raft-log) and state machine (in memory, snapshots in a
//!   file).
//! - [`network`] / [`raft_service`]: the raft transport over `gatesvr.raft.v1` (tonic).
//! - [`node`]: write path (batched, forwarded to the leader), linearizable reads, membership.
//! - [`batcher`]: group commit of concurrent writes into one raft entry.
//! - [`lease`]: the leader's lease keeper (expires dead nodes/upstreams by committing).
//! - [`watch`]: recent deltas + broadcast behind the `Watch` stream.
//! - [`grpc`]: `gatesvr.control.v1.ControlPlane` for data-plane nodes and upstreams.
//! - [`admin`]: the operator HTTP(S) API (axum) with its OpenAPI document and the web console.
//! - [`metrics`]: Prometheus series of raft, the state and the watchers (`GET /metrics`).
//! - [`backup`]: the backup file format (`gatectl snapshot export` / `import`).
//! - [`config`]: [`ControlPlaneConfig`] with documented defaults.
//!
//! # Flow
//! ```text
//!  data plane / upstream ──gRPC──┐                      ┌── Raft.AppendEntries/Vote/InstallSnapshot ──> peers
//!  operator / gatectl ──HTTP─────┼─> Node::write ─> Batcher ─> leader: Raft::client_write(Request{now_ms, cmds})
//!                                │        (follower: Raft.Forward to the leader)      │
//!                                │                                                    v
//!  Watch stream <── watch::Hub <─┴──────────────── StateMachineStore::apply ── State::apply (pure)
//! ```
//!
//! # Bad input and faults: the documented answers
//! | situation | gRPC | admin HTTP | notes |
//! |---|---|---|---|
//! | unknown zone, malformed `host:port`, empty id | `INVALID_ARGUMENT` | 400 `invalid_argument` | checked before proposing; nothing is written |
//! | duplicate upstream (same zone, address, service) | OK, same `instance_id` | 200, `created: false` | idempotent: renews the lease |
//! | same zone + address, other service | `ALREADY_EXISTS` | 409 `conflict` | |
//! | stale epoch (release / transfer) | release: counted in `fenced`; transfer: `ABORTED` | - | fencing: the record moved on |
//! | unknown or dead data-plane node claims/heartbeats | `FAILED_PRECONDITION` | 409 `failed_precondition` | register again |
//! | write on a minority partition / no leader | `UNAVAILABLE` after `raft.write_timeout` | 503 `unavailable` | retry is safe: every write is idempotent |
//! | forwarding to the leader impossible | `UNAVAILABLE` | 421 `not_leader` + leader addresses | |
//! | linearizable read without quorum | - | 503 `unavailable` | `?consistency=local` still answers, marked local |
//! | node rejoins with an old log | - | - | raft truncates its uncommitted suffix; it catches up by log or snapshot |
//! | node whose disk was lost | - | - | remove it and re-add under a new `node_id` (PITFALLS §3) |
//!
//! Nothing committed is lost (log and vote are fsynced before acknowledgement) or applied twice
//! (`last_applied` is written atomically with the state it covers).

#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod backup;
pub mod batcher;
pub mod config;
pub mod convert;
pub mod error;
pub mod grpc;
pub mod lease;
pub mod metrics;
pub mod network;
pub mod node;
pub mod raft_service;
pub mod stages;
pub mod state;
pub mod store;
pub mod types;
pub mod validate;
pub mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gatesvr_common::config::Validate;
use gatesvr_proto::control::control_plane_server::ControlPlaneServer;
use gatesvr_proto::raft::raft_server::RaftServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::ControlPlaneConfig;
pub use error::Error;
pub use node::Node;
pub use state::Cmd;
pub use types::{Member, NodeId};

use crate::network::{MAX_MESSAGE_BYTES, Network, PeerTls};
use crate::node::NodeSettings;

/// A running control-plane node.
pub struct ControlPlane {
    node: Node,
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Released when the last store handle is dropped (see `shutdown`).
    lock: std::sync::Weak<store::DirLock>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("node_id", &self.node.id())
            .field("grpc_addr", &self.grpc_addr)
            .field("admin_addr", &self.admin_addr)
            .finish()
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn raft_config(cfg: &ControlPlaneConfig) -> Result<Arc<openraft::Config>, Error> {
    let r = &cfg.raft;
    let c = openraft::Config {
        cluster_name: "gatesvr-controlplane".into(),
        heartbeat_interval: millis(r.heartbeat_interval),
        election_timeout_min: millis(r.election_timeout_min),
        election_timeout_max: millis(r.election_timeout_max),
        install_snapshot_timeout: millis(r.install_snapshot_timeout),
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_every),
        max_in_snapshot_log_to_keep: r.keep_after_snapshot,
        // Sized so one AppendEntries call fits in `heartbeat_interval`, which openraft 0.9 uses
        // as its timeout (see `RaftConfig::max_payload_entries`).
        max_payload_entries: r.max_payload_entries,
        // 3 MiB chunks stay well under the raft service's message limit.
        snapshot_max_chunk_size: 3 << 20,
        purge_batch_size: 256,
        ..Default::default()
    };
    c.validate().map(Arc::new).map_err(|e| {
        Error::Config(gatesvr_common::config::ConfigError::key(
            "raft",
            e.to_string(),
        ))
    })
}

impl ControlPlane {
    /// Validates `cfg`, opens the store, binds both ports, starts raft and the APIs, and (with
    /// `cluster.bootstrap` on a fresh data dir) initializes the cluster.
    pub async fn start(cfg: ControlPlaneConfig) -> Result<ControlPlane, Error> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(io(format!("creating data_dir {}", cfg.data_dir.display())))?;

        let (peer_tls, server_tls) = if cfg.tls.insecure {
            tracing::warn!(
                "!!! tls.insecure: control-plane gRPC (raft and the data-plane API) is PLAINTEXT and unauthenticated; never use this outside a trusted test network !!!"
            );
            (PeerTls::Insecure, None)
        } else {
            let files = cfg
                .tls
                .files()
                .ok_or_else(|| Error::Tls("tls files not configured".into()))?;
            let server = gatesvr_common::tls::tonic_server_tls(&files)
                .map_err(|e| Error::Tls(e.to_string()))?;
            (
                PeerTls::Mtls {
                    files,
                    server_name: cfg.tls.server_name.clone(),
                },
                Some(server),
            )
        };
        let auth = match cfg.admin.auth {
            config::AuthMode::None => {
                tracing::warn!(
                    "!!! admin.auth: none: the admin API on {} accepts requests WITHOUT a token (gatesvr dev only) !!!",
                    cfg.admin_addr
                );
                admin::auth::Auth::Disabled
            }
            config::AuthMode::Tokens => admin::auth::Auth::Tokens(cfg.admin.tokens()?),
        };

        let grpc_listener = tokio::net::TcpListener::bind(cfg.grpc_addr)
            .await
            .map_err(io(format!("binding grpc_addr {}", cfg.grpc_addr)))?;
        let admin_listener = tokio::net::TcpListener::bind(cfg.admin_addr)
            .await
            .map_err(io(format!("binding admin_addr {}", cfg.admin_addr)))?;
        let grpc_addr = grpc_listener.local_addr().map_err(io("grpc local addr"))?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(io("admin local addr"))?;
        let me = Member {
            grpc_addr: cfg
                .advertise_grpc_addr
                .clone()
                .unwrap_or_else(|| grpc_addr.to_string()),
            admin_addr: cfg
                .advertise_admin_addr
                .clone()
                .unwrap_or_else(|| admin_addr.to_string()),
        };

        let (mut log_store, sm_store) =
            store::open(&cfg.data_dir, cfg.sled_cache_bytes, cfg.watch_history)?;
        log_store.set_label(format!("n{}", cfg.node_id));
        let sm = sm_store.handle();
        let lock = log_store.lock_weak();
        let network = Network {
            self_id: cfg.node_id,
            tls: peer_tls.clone(),
        };
        let raft = types::Raft::new(
            cfg.node_id,
            raft_config(&cfg)?,
            network,
            log_store,
            sm_store,
        )
        .await
        .map_err(|e| Error::Raft(e.to_string()))?;
        let node = Node::new(
            NodeSettings {
                id: cfg.node_id,
                write_timeout: cfg.raft.write_timeout,
                read_timeout: cfg.raft.read_timeout,
                zone_count: cfg.zone_count,
                max_learners: cfg.raft.max_learners,
            },
            raft.clone(),
            sm,
            peer_tls,
            cfg.batch.clone(),
        );

        let stop = CancellationToken::new();
        let mut tasks = Vec::new();

        // grpc.health.v1 (Kubernetes gRPC probes, load balancers): "" is
        // SERVING while the process serves; the ControlPlane service only
        // while this node knows a leader (it can answer claims and reads).
        let (health, health_service) = tonic_health::server::health_reporter();
        tasks.push(tokio::spawn(report_health(
            health,
            raft.clone(),
            stop.clone(),
        )));

        // gRPC: raft + data-plane API on one port.
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = server_tls {
            builder = builder
                .tls_config(tls)
                .map_err(|e| Error::Tls(e.to_string()))?;
        }
        let router = builder
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            // One rule per method (authz): roles from the certificates.
            .layer(authz::layer(
                &cfg.tls.trust_domain,
                authz::denials(),
                cfg.tls.insecure,
            ))
            .add_service(
                RaftServer::new(raft_service::RaftService::new(
                    node.clone(),
                    cfg.tls.raft_peer_names.clone(),
                ))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                ControlPlaneServer::new(grpc::ControlService::new(
                    node.clone(),
                    cfg.leases.clone(),
                    stop.clone(),
                ))
                .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES),
            )
            .add_service(health_service);
        let grpc_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            // TCP_NODELAY on every accepted connection: `Server::tcp_nodelay` does not apply
            // to `serve_with_incoming`, and without it a response written in more than one
            // segment waited for the client's delayed ACK (~40 ms per ClaimSessions call:
            // docs/benchmarks.md, claims, session 6).
            let incoming =
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, grpc_stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "control-plane gRPC server failed");
            }
        }));

        // Admin HTTP(S), the console and /metrics.
        let metrics = metrics::Metrics::new().map_err(|e| Error::Raft(format!("metrics: {e}")))?;
        tasks.push(tokio::spawn(
            metrics.clone().run(node.clone(), stop.clone()),
        ));
        let app = admin::router(
            admin::AdminState {
                node: node.clone(),
                leases: cfg.leases.clone(),
                metrics,
                dataplane_http: admin::DataPlaneHttp {
                    port: cfg.admin.dataplane_http_port,
                    addrs: cfg.admin.dataplane_http_addrs.clone(),
                },
                https: cfg.admin.tls.enabled(),
            },
            auth,
        );
        tasks.push(tokio::spawn(serve_admin(
            admin_listener,
            app,
            &cfg,
            stop.clone(),
        )?));

        tasks.push(tokio::spawn(lease::run(
            node.clone(),
            cfg.leases.clone(),
            stop.clone(),
        )));

        if cfg.cluster.bootstrap {
            let initialized = raft
                .is_initialized()
                .await
                .map_err(|e| Error::Raft(e.to_string()))?;
            if !initialized {
                let members: BTreeMap<NodeId, Member> = if cfg.cluster.members.is_empty() {
                    [(cfg.node_id, me.clone())].into()
                } else {
                    cfg.cluster
                        .members
                        .iter()
                        .map(|m| {
                            (
                                m.id,
                                Member {
                                    grpc_addr: m.grpc_addr.clone(),
                                    admin_addr: m.admin_addr.clone(),
                                },
                            )
                        })
                        .collect()
                };
                tracing::info!(?members, "bootstrapping a new control-plane cluster");
                if let Err(e) = raft.initialize(members).await {
                    // NotAllowed: someone (a peer's leader) got here first; that is fine.
                    tracing::warn!(error = %e, "cluster initialization skipped");
                }
            }
        }
        tracing::info!(node_id = cfg.node_id, %grpc_addr, %admin_addr, "control plane started");
        Ok(ControlPlane {
            node,
            grpc_addr,
            admin_addr,
            stop,
            tasks,
            lock,
        })
    }

    /// The bound gRPC address (raft + data-plane API).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The node's handle (raft metrics, state, write path), for embedding and tests.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Stops the APIs and raft, and waits (bounded) for everything to close, releasing the
    /// data directory.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(e) = self.node.raft().shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        for mut t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut t)
                .await
                .is_err()
            {
                t.abort();
            }
        }
        let id = self.node.id();
        drop(self.node);
        // Replication, snapshot and watch tasks wind down on their own once raft has stopped;
        // wait (bounded) until the last store handle is gone so the data dir can be reopened.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.lock.strong_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.lock.strong_count() > 0 {
            tracing::warn!(node_id = id, "raft store still referenced after shutdown");
        }
        tracing::info!(node_id = id, "control plane stopped");
    }
}

/// The admin API's server task: HTTPS with `admin.tls`, else plain HTTP (dev or the
/// explicit opt-in, warned about loudly).
fn serve_admin(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    cfg: &ControlPlaneConfig,
    stop: CancellationToken,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, Error> {
    let tls = if cfg.admin.tls.enabled() {
        let peers = admin::tls::AdminPeers {
            trust_domain: cfg.tls.trust_domain.clone(),
            denials: authz::denials(),
        };
        Some((admin::tls::server_config(&cfg.admin.tls)?, peers))
    } else {
        tracing::warn!(
            "!!! the admin API on {} is PLAIN HTTP: bearer tokens cross the network in clear ({}) !!!",
            cfg.admin_addr,
            if cfg.dev_mode {
                "gatesvr dev"
            } else {
                "admin.insecure_plaintext_http"
            }
        );
        None
    };
    Ok(async move {
        let res = match tls {
            Some((config, peers)) => {
                match admin::tls::TlsListener::new(listener, config, peers, stop.clone()) {
                    Ok(l) => {
                        axum::serve(l, app)
                            .with_graceful_shutdown(stop.cancelled_owned())
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
            }
        };
        if let Err(e) = res {
            tracing::error!(error = %e, "admin API server failed");
        }
    })
}

/// Keeps `grpc.health.v1` in step with raft: the ControlPlane service is
/// SERVING while a leader is known, everything NOT_SERVING once stopping.
async fn report_health(
    health: tonic_health::server::HealthReporter,
    raft: types::Raft,
    stop: CancellationToken,
) {
    use tonic::server::NamedService;
    use tonic_health::ServingStatus;
    const SERVICE: &str = <ControlPlaneServer<grpc::ControlService> as NamedService>::NAME;
    let mut metrics = raft.metrics();
    health.set_service_status("", ServingStatus::Serving).await;
    loop {
        let status = if metrics.borrow_and_update().current_leader.is_some() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status(SERVICE, status).await;
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(SERVICE, ServingStatus::NotServing)
        .await;
}
