//! `gate-upstream`: GateSvr's demo upstream service, and the example upstream
//! teams start from.
//!
//! Built on `gatesvr-upstream-sdk`, it serves both upstream contracts for one
//! zone with one handler: the streaming one (`UpstreamStreamService`, one
//! stream per data-plane node) and the unary one (`UpstreamService`, whose
//! `GetStatus` is the gateways' health probe). Each client request's payload
//! is a small text command (`echo`, `whoami`, `join`, `leave`, `say`,
//! `broadcast`; see [`commands`]); `say` and `broadcast` push to clients
//! through a data-plane stream, or through `GatewayService` when no stream is
//! open. It also serves `grpc.health.v1` (NOT_SERVING until ready and while
//! shutting down) for tools, and, given a control plane, keeps itself
//! registered there. On shutdown it drains: streams are told, requests
//! already received are answered, then the streams end.
//!
//! It does not persist anything: rooms live in memory, per instance.
//!
//! ```text
//!  client ─QUIC─▶ gateway ══Open stream / ProcessRequest══▶ gate-upstream ──(say)──▶ push on the stream ─▶ members
//!                    ▲        GetStatus ◀─┘      │
//!                    │                              └─Register/Heartbeat──▶ control plane
//!                    └──── Watch(upstreams) ◀──────────────────────────────────┘
//! ```
//!
//! # Layout
//! - [`run`] — the server as a library function; `src/bin/gate-upstream.rs` only
//!   parses flags, binds and waits for Ctrl-C / SIGTERM.
//! - [`config`] — flags.
//! - [`commands`] — the request language (pure parsing) and `app_code`s.
//! - [`service`] — the `UpstreamService` implementation.
//! - [`rooms`] — chat-room membership.
//! - [`registration`] — control-plane lease upkeep.

#![forbid(unsafe_code)]

pub mod commands;
pub mod config;
pub mod registration;
pub mod rooms;
pub mod service;

use std::future::Future;

use gatesvr_proto::upstream::upstream_service_server::UpstreamServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::ServingStatus;

pub use config::Config;
pub use service::DemoUpstream;

/// Why the upstream could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--gateway` or `--control-plane` is not a usable `host:port`.
    #[error("invalid {flag} address {addr:?}")]
    InvalidAddress {
        /// The flag.
        flag: &'static str,
        /// Its value.
        addr: String,
    },
    /// The TLS files could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] gatesvr_common::tls::TlsError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The listener has no local address.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves on `listener` until `shutdown` completes, then drains: reports
/// NOT_SERVING, deregisters, waits `drain_delay`, and finishes in-flight
/// Who may call this upstream: one rule per method (see `gatesvr_common::authz`).
const CALLERS: &[(&str, gatesvr_common::authz::Rule)] = {
    use gatesvr_common::authz::Rule;
    use gatesvr_common::identity::Role;
    &[
        (
            "/gatesvr.upstream.v1.UpstreamService/ProcessRequest",
            Rule::Roles(&[Role::DataPlane]),
        ),
        (
            "/gatesvr.upstream.v1.UpstreamStreamService/Open",
            Rule::Roles(&[Role::DataPlane]),
        ),
        (
            "/gatesvr.upstream.v1.UpstreamService/GetStatus",
            Rule::Roles(&[Role::DataPlane, Role::Admin]),
        ),
        ("/grpc.health.v1.Health/Check", Rule::Open),
        ("/grpc.health.v1.Health/Watch", Rule::Open),
    ]
};

/// requests before returning.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let local_addr = listener.local_addr()?;
    let gateway = channel(&cfg, "--gateway", &cfg.gateway)?;
    let pusher = gatesvr_upstream_sdk::Pusher::default();
    let demo = DemoUpstream::new(
        cfg.zone.clone(),
        cfg.service_name.clone(),
        gateway,
        pusher.clone(),
        cfg.push_timeout,
    );
    let upstream = gatesvr_upstream_sdk::Upstream::with_pusher(
        demo,
        gatesvr_upstream_sdk::Options::new(cfg.service_name.clone(), cfg.zone.clone()),
        pusher,
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;

    let mut server = Server::builder();
    let tls = cfg.tls();
    if let Some(tls) = &tls {
        server = server.tls_config(gatesvr_common::tls::tonic_server_tls(tls)?)?;
    }
    // With mTLS only data-plane nodes may send requests (their certificates
    // name role `dataplane`); an upstream or a stray client certificate from
    // the same CA is refused.
    let policy = gatesvr_common::authz::Policy::new(
        CALLERS,
        &cfg.trust_domain,
        None,
        gatesvr_common::authz::Denials::new("upstream", |_| {}),
    );
    let mut server = server.layer(gatesvr_common::authz::AuthzLayer::new(if tls.is_some() {
        policy
    } else {
        policy.insecure()
    }));
    let stop = CancellationToken::new();
    let serving = server
        .add_service(health_service)
        .add_service(upstream.unary_service())
        .add_service(upstream.stream_service())
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY an answer written in more than one segment waits for the data
            // plane's delayed ACK (`Server::tcp_nodelay` does not apply to `serve_with_incoming`).
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop.clone().cancelled_owned(),
        );
    let mut serving = tokio::spawn(serving);

    // Ready: the listener is accepting and the handler needs nothing else.
    set_health(&health, ServingStatus::Serving).await;
    upstream.set_serving(true);
    tracing::info!(zone = %cfg.zone, addr = %local_addr, gateway = %cfg.gateway, "gate-upstream serving");

    let registration_stop = CancellationToken::new();
    let registration = match cfg.control_plane.as_slice() {
        [] => None,
        addrs => {
            let registration = registration::Registration {
                zone: cfg.zone.clone(),
                address: cfg
                    .advertise_addr
                    .clone()
                    .unwrap_or_else(|| local_addr.to_string()),
                service_name: cfg.service_name.clone(),
                lease_ttl: cfg.lease_ttl,
            };
            let channels = addrs
                .iter()
                .map(|addr| channel(&cfg, "--control-plane", addr))
                .collect::<Result<_, _>>()?;
            Some(tokio::spawn(registration::run(
                channels,
                registration,
                registration_stop.clone(),
            )))
        }
    };

    // Serve until asked to stop, or until the server fails on its own.
    let early_exit = tokio::select! {
        _ = shutdown => None,
        result = &mut serving => Some(result),
    };
    if let Some(result) = early_exit {
        registration_stop.cancel();
        return flatten(result);
    }

    tracing::info!("shutting down: NOT_SERVING, deregistering, draining");
    set_health(&health, ServingStatus::NotServing).await;
    upstream.set_serving(false);
    registration_stop.cancel();
    if let Some(task) = registration {
        // Bounded by the deregistration call's own timeout.
        let _ = task.await;
    }
    tokio::time::sleep(cfg.drain_delay).await;
    // Answers what the streams carried in, then ends them; bounded so a stuck
    // handler cannot hold the shutdown forever.
    if tokio::time::timeout(DRAIN_LIMIT, upstream.drain())
        .await
        .is_err()
    {
        tracing::warn!("requests still running after {DRAIN_LIMIT:?}; stopping anyway");
    }
    stop.cancel();
    flatten(serving.await)
}

/// Longest wait for in-flight requests at shutdown.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Sets the overall ("") and the UpstreamService status together.
async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    use tonic::server::NamedService;
    let service =
        <UpstreamServiceServer<gatesvr_upstream_sdk::Unary<DemoUpstream>> as NamedService>::NAME;
    health.set_service_status("", status).await;
    health.set_service_status(service, status).await;
}

/// A lazily connected channel to `addr` (TLS when configured): the peer may
/// start later, and connections are re-established on demand.
fn channel(cfg: &Config, flag: &'static str, addr: &str) -> Result<Channel, Error> {
    let invalid = || Error::InvalidAddress {
        flag,
        addr: addr.to_owned(),
    };
    let tls = if flag == "--control-plane" {
        cfg.cp_tls()
    } else {
        cfg.tls()
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint =
        Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|_| invalid())?;
    if endpoint.uri().port_u16().is_none() {
        return Err(invalid());
    }
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(gatesvr_common::tls::tonic_client_tls(
            &tls,
            &cfg.tls_server_name,
        )?)?;
    }
    Ok(endpoint
        .connect_timeout(std::time::Duration::from_secs(2))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

fn flatten(
    joined: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), Error> {
    match joined {
        Ok(result) => Ok(result?),
        Err(join) => Err(Error::Io(std::io::Error::other(join))),
    }
}
