//! `gatesvr dev`: the whole system on one machine, from nothing.
//!
//! Starts, in this process: a single-node control plane (raft log and snapshot
//! under `--data-dir`, bootstrapped on first run, mTLS with the dev certificates),
//! one demo upstream per zone registered with the control plane, and
//! `--dataplanes` data-plane nodes. Generates dev certificates if missing and
//! prints every endpoint and a command to try. Ctrl-C stops everything.
//!
//! Browsers get in too: every data plane offers WebTransport on its QUIC port
//! and a WebSocket listener (QUIC port + 1, TCP) that also serves the
//! JavaScript SDK and a demo chat page from `--web-root`. The node certificate
//! is issued at each start, valid for 13 days, so that pages can pin it with
//! `serverCertificateHashes` (browsers accept no longer validity there).
//!
//! Client authentication and the admin API's bearer tokens are off here (with
//! a loud warning): `gatesvr dev` is for a laptop, never for a network.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use gatesvr_dataplane::{DataPlane, DataPlaneConfig, Routing};
use tokio_util::sync::CancellationToken;

use crate::Failure;

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Where the control plane keeps its raft data.
    #[arg(long, default_value = ".gatesvr-dev")]
    pub data_dir: PathBuf,
    /// Development certificates (generated here if missing).
    #[arg(long, default_value = "certs/dev")]
    pub certs: PathBuf,
    /// Number of data-plane nodes. Node i (from 0) listens on the base ports + 10*i.
    #[arg(long, default_value_t = 1)]
    pub dataplanes: u16,
    /// Zones (ids 001..NNN), one demo upstream each.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=999))]
    pub zones: u32,
    /// Bind address for every listener.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Served on each WebSocket listener: the JavaScript SDK and the demo
    /// page (`/demo/`). Skipped if the directory does not exist.
    #[arg(long, default_value = "sdk-js")]
    pub web_root: PathBuf,
}

const QUIC_PORT: u16 = 8453;
/// WebSocket (TLS over TCP), and the demo page.
const WEBSOCKET_PORT: u16 = 8454;
const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 8092;
const METRICS_PORT: u16 = 9090;
const ADMIN_PORT: u16 = 8095;
const CP_GRPC_PORT: u16 = 8096;
const UPSTREAM_BASE_PORT: u16 = 9000;

fn upstream_addr(host: std::net::IpAddr, zone_index: u32) -> SocketAddr {
    // Zones are validated to at most 999, so the port stays below 10000.
    addr(host, UPSTREAM_BASE_PORT + 1 + zone_index as u16)
}

fn addr(host: std::net::IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(host, port)
}

pub async fn run(
    args: DevArgs,
    mut signals: gatesvr_common::shutdown::Signals,
) -> Result<(), Failure> {
    let _log = gatesvr_common::logging::init(&crate::log_config(Default::default()))
        .map_err(anyhow::Error::msg)?;
    eprintln!(
        "WARNING: gatesvr dev runs every internal hop (control plane, Peer, GatewayService, upstreams) in PLAINTEXT without authorization. Never expose it to a network."
    );
    let certs = gatesvr_common::certs::ensure(&args.certs, &[])
        .with_context(|| format!("dev certificates in {}", args.certs.display()))?;
    let host = args.host;

    // --- control plane ---
    let mut cp_cfg = gatesvr_controlplane::ControlPlaneConfig {
        node_id: 1,
        data_dir: args.data_dir.join("controlplane"),
        grpc_addr: addr(host, CP_GRPC_PORT),
        admin_addr: addr(host, ADMIN_PORT),
        dev_mode: true,
        zone_count: args.zones,
        ..Default::default()
    }
    .fast_timings();
    cp_cfg.cluster.bootstrap = true;
    cp_cfg.admin.auth = gatesvr_controlplane::config::AuthMode::None;
    // Plaintext control-plane gRPC in dev (the control plane logs a warning):
    // the demo upstreams and data planes on this machine reach it directly.
    cp_cfg.tls.insecure = true;
    // The console and `gatectl upstreams health` read each data plane's /stats.
    cp_cfg.admin.dataplane_http_addrs = (0..args.dataplanes)
        .map(|i| {
            (
                format!("dp-{}", i + 1),
                addr(host, HTTP_PORT + 10 * i).to_string(),
            )
        })
        .collect();
    // The data planes' certificate: short-lived, signed by the dev CA (native
    // clients verify it as before; browsers pin its hash).
    let names: Vec<String> = gatesvr_common::certs::DEFAULT_SANS
        .iter()
        .map(|s| s.to_string())
        .chain(std::iter::once(host.to_string()))
        .collect();
    let web = gatesvr_common::webcert::issue(&args.certs, &args.certs.join("web"), &names)
        .with_context(|| format!("web certificate in {}", args.certs.display()))?;
    let cp = gatesvr_controlplane::ControlPlane::start(cp_cfg)
        .await
        .map_err(|e| anyhow::anyhow!("control plane: {e}"))?;

    // --- data planes ---
    let mut dataplanes = Vec::new();
    for i in 0..args.dataplanes {
        let mut cfg = DataPlaneConfig {
            node_id: format!("dp-{}", i + 1),
            ..Default::default()
        };
        let off = 10 * i;
        cfg.server.quic_addr = addr(host, QUIC_PORT + off).to_string();
        cfg.server.http_addr = addr(host, HTTP_PORT + off).to_string();
        cfg.server.grpc_addr = addr(host, GRPC_PORT + off).to_string();
        cfg.server.metrics_addr = addr(host, METRICS_PORT + off).to_string();
        cfg.server.cert_file = web.cert_file.clone();
        cfg.server.key_file = web.key_file.clone();
        cfg.transports.webtransport = true;
        cfg.transports.websocket_addr = Some(addr(host, WEBSOCKET_PORT + off).to_string());
        cfg.transports.web_root = args.web_root.is_dir().then(|| args.web_root.clone());
        cfg.auth.mode = gatesvr_dataplane::config::AuthMode::None;
        cfg.auth.allow_none = true;
        cfg.zones.count = args.zones;
        // Upstreams register with the control plane; every data plane learns
        // them (and session owners) from its watch.
        cfg.control_plane.endpoints = vec![cp.grpc_addr().to_string()];
        cfg.control_plane.insecure = true;
        cfg.control_plane.state_file = Some(args.data_dir.join(format!("dp-{}.state", i + 1)));
        let dp = DataPlane::start(cfg, Routing::Upstreams)
            .await
            .map_err(|e| anyhow::anyhow!("data plane {}: {e}", i + 1))?;
        dataplanes.push(dp);
    }

    // --- demo upstreams, one per zone, pushing through the first data plane
    // (any data plane forwards a push to the node that owns the session) ---
    let stop_upstreams = CancellationToken::new();
    let mut upstreams = Vec::new();
    let gateway = dataplanes
        .first()
        .map(|d| d.grpc_addr().to_string())
        .unwrap_or_default();
    for z in 0..args.zones {
        let zone = gatesvr_proto::zone::zone_id(z);
        let mut cfg = gate_upstream::Config::new(zone.clone(), gateway.clone());
        cfg.addr = upstream_addr(host, z);
        cfg.control_plane = vec![cp.grpc_addr().to_string()];
        let listener = tokio::net::TcpListener::bind(cfg.addr)
            .await
            .with_context(|| format!("binding demo upstream for zone {zone} on {}", cfg.addr))?;
        let stop = stop_upstreams.clone();
        upstreams.push(tokio::spawn(async move {
            if let Err(e) = gate_upstream::run(cfg, listener, stop.cancelled_owned()).await {
                tracing::error!(zone = %zone, error = %e, "demo upstream failed");
            }
        }));
    }

    print_banner(&args, &cp, &dataplanes, &certs.ca_cert());
    // Each node serves until Ctrl-C, or drains and leaves when asked
    // (`gatectl nodes drain`, `POST /drain`), as `gatesvr dataplane` does.
    let stop_dataplanes = CancellationToken::new();
    let nodes: Vec<_> = dataplanes
        .into_iter()
        .map(|dp| {
            let stop = stop_dataplanes.clone().cancelled_owned();
            tokio::spawn(dp.serve_until(stop, gatesvr_dataplane::OnSignal::Stop))
        })
        .collect();
    signals.recv().await;
    stop_upstreams.cancel();
    for upstream in upstreams {
        let _ = tokio::time::timeout(Duration::from_secs(5), upstream).await;
    }
    stop_dataplanes.cancel();
    for node in nodes {
        let _ = node.await;
    }
    cp.shutdown().await;
    // Give background tasks a moment to log their exit.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}

fn print_banner(
    args: &DevArgs,
    cp: &gatesvr_controlplane::ControlPlane,
    dataplanes: &[DataPlane],
    ca: &std::path::Path,
) {
    println!();
    println!(
        "GateSvr dev cluster is up ({} zones). Ctrl-C stops it.",
        args.zones
    );
    println!();
    println!(
        "  control plane   admin API  http://{}   (gatectl default; no auth in dev)",
        cp.admin_addr()
    );
    println!(
        "                  gRPC       {}   (plaintext in dev)",
        cp.grpc_addr()
    );
    for dp in dataplanes {
        let node = &dp.node().config.node_id;
        println!(
            "  data plane {node:<5} QUIC       {}/udp (ALPN gatesvr/1; WebTransport: https://{}/gatesvr/v1)",
            dp.quic_addr(),
            dp.quic_addr()
        );
        if let Some(ws) = dp.websocket_addr() {
            println!("                  WebSocket  wss://{ws}/gatesvr/v1");
            if dp.node().config.transports.web_root.is_some() {
                println!(
                    "                  demo chat  https://127.0.0.1:{}/demo/   (accept the dev certificate once)",
                    ws.port()
                );
            }
        }
        println!(
            "                  HTTP       http://{}/health /ready /stats",
            dp.http_addr()
        );
        println!(
            "                  gRPC       {}   (GatewayService: push, broadcast)",
            dp.grpc_addr()
        );
        println!(
            "                  metrics    http://{}/metrics",
            dp.metrics_addr()
        );
    }
    println!();
    let first = dataplanes
        .first()
        .map(|d| d.quic_addr().to_string())
        .unwrap_or_default();
    println!("Try it:");
    println!(
        "  cargo run --release --bin gate-client -- --addr {first} --ca {} --openid alice --send 'echo hello' --listen 5s",
        ca.display()
    );
    println!(
        "  cargo run --release --bin gatectl -- --endpoints http://{} cluster status",
        cp.admin_addr()
    );
    println!(
        "  open http://{}/console   (the web console)",
        cp.admin_addr()
    );
    println!();
}
