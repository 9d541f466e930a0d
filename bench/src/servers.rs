//! `gate-bench serve <mode>`: the processes under test and the baselines, each in its own
//! process so that its CPU time and RSS can be read from /proc. Each prints one JSON line with
//! its addresses on stdout, then serves until its stdin closes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::BytesMut;
use gatesvr_dataplane::{DataPlane, DataPlaneConfig, Routing};
use gatesvr_proto::client::{ClientResponse, Envelope, ErrorCode, ServerPush, envelope::Body};
use gatesvr_proto::frame::{self, FrameDecoder};
use gatesvr_proto::upstream::upstream_service_client::UpstreamServiceClient;
use gatesvr_proto::upstream::upstream_service_server::{UpstreamService, UpstreamServiceServer};
use gatesvr_proto::upstream::{
    GetStatusRequest, ProcessRequestRequest, ProcessRequestResponse, UpstreamStatus,
};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

/// Which server to run.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Serve {
    /// A data-plane node (the system under test), config generated from `--dir`.
    Dataplane {
        #[arg(long)]
        dir: PathBuf,
        /// Upstream address for every zone; without it the node echoes (Routing::Echo).
        #[arg(long)]
        upstream: Option<String>,
        /// Node id (default dp-bench).
        #[arg(long)]
        node_id: Option<String>,
        /// Control-plane gRPC endpoints (comma-separated): a cluster member whose upstreams
        /// come from the control plane's registry.
        #[arg(long, value_delimiter = ',')]
        control_plane: Vec<String>,
        /// Membership lease requested from the control plane.
        #[arg(long, default_value = "3s", value_parser = crate::humantime_dur)]
        lease_ttl: Duration,
        /// Browser transports too: WebTransport on the QUIC port, a WebSocket listener.
        #[arg(long)]
        web: bool,
        /// The upstream leg uses the streaming contract (as `GATE_BENCH_UPSTREAM=stream`).
        #[arg(long)]
        upstream_stream: bool,
        /// `server.shared_keys_dir`: QUIC and TLS keys shared with the other nodes (as the
        /// Helm chart does by default), so a client resumes its TLS session on any node.
        #[arg(long)]
        shared_keys_dir: Option<PathBuf>,
    },
    /// One control-plane node (raft log fdatasync'ed, durable) on the given addresses; node 1
    /// bootstraps the cluster with every `--member`.
    CpNode {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: u64,
        /// Every member as `id=grpc_addr=admin_addr` (comma-separated).
        #[arg(long, value_delimiter = ',')]
        member: Vec<String>,
        /// Raft write timeout (`raft.write_timeout`); default the product's.
        #[arg(long, value_parser = crate::humantime_dur)]
        write_timeout: Option<Duration>,
        /// Raft heartbeat (`raft.heartbeat_interval`, also openraft's AppendEntries timeout);
        /// election timeouts become 6x..12x of it. Default the product's.
        #[arg(long, value_parser = crate::humantime_dur)]
        heartbeat: Option<Duration>,
    },
    /// The demo upstream (gate-upstream) for every zone, registered with a control plane.
    Upstreams {
        /// The control plane's members' gRPC addresses (comma-separated).
        #[arg(long, value_delimiter = ',')]
        control_plane: Vec<String>,
        /// A data plane's GatewayService (used by the demo's chat pushes).
        #[arg(long)]
        gateway: String,
        #[arg(long, default_value_t = 6)]
        zones: u32,
    },
    /// Bare quinn server with the data plane's transport settings and certificate: echo
    /// streams ('E') and one-way message streams ('P').
    Bare {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Trivial UpstreamService: answers every request with its payload.
    UpstreamEcho,
    /// Minimal quinn -> tonic relay: frames in, ProcessRequest out, no session logic.
    Relay {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        upstream: String,
    },
    /// A control plane of `--nodes` raft nodes (durable) in one process.
    Controlplane {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: u64,
    },
}

/// The bearer token of the generated data plane's ops listener (`/debug/pprof`).
pub const OPS_TOKEN: &str = "gate-bench-ops";

/// Generated data-plane config (what `gate-bench` runs against): loopback, ephemeral ports,
/// HMAC tokens, no rate limit in the way of the load, long heartbeat timeout (idle sessions
/// stay idle: no client heartbeats are needed to keep them).
pub fn dataplane_config(dir: &Path, upstream: Option<&str>) -> DataPlaneConfig {
    let mut cfg = DataPlaneConfig {
        node_id: "dp-bench".into(),
        ..DataPlaneConfig::default()
    };
    let s = &mut cfg.server;
    s.quic_addr = "127.0.0.1:0".into();
    s.http_addr = "127.0.0.1:0".into();
    s.grpc_addr = "127.0.0.1:0".into();
    s.metrics_addr = "127.0.0.1:0".into();
    s.cert_file = dir.join("certs").join("server.crt");
    s.key_file = dir.join("certs").join("server.key");
    s.heartbeat_timeout = Duration::from_secs(3600);
    // `GATE_BENCH_PUSH_COALESCE` (e.g. `0s`): the data plane's `server.push_coalesce`
    // (default: the product's).
    if let Some(d) = std::env::var("GATE_BENCH_PUSH_COALESCE")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
    {
        s.push_coalesce = d;
    }
    // `GATE_BENCH_PUSH_COALESCE_BUSY` (e.g. `0`): `server.push_coalesce_busy`.
    if let Some(b) = std::env::var("GATE_BENCH_PUSH_COALESCE_BUSY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        s.push_coalesce_busy = b;
    }
    // Profiling lives on the token-protected ops listener (`gate-bench peers --profile`),
    // on a port the data plane picks (announced as `ops`).
    let token_file = dir.join("ops-token");
    if std::fs::write(&token_file, OPS_TOKEN).is_ok() {
        s.ops_addr = Some("127.0.0.1:0".into());
        s.ops_token_file = Some(token_file);
    }
    cfg.auth.secret_file = Some(dir.join("secret"));
    cfg.overload_protection.max_qps = 100_000_000;
    cfg.overload_protection.max_connections = 1_000_000;
    cfg.overload_protection.max_upstream_concurrent = 100_000;
    // The scenarios open sessions from one address as fast as they can and
    // reconnect the same openids round after round: the Start rate limits
    // (a defence against abusive clients, 200/s per address, 5/s per openid
    // by default) would measure the limiter, not the node. Raised, as
    // max_qps and max_connections are; docs/benchmarks.md says so.
    cfg.overload_protection.start_rate_per_address = 10_000_000;
    cfg.overload_protection.start_burst_per_address = 10_000_000;
    cfg.overload_protection.start_rate_per_openid = 10_000_000;
    cfg.overload_protection.start_burst_per_openid = 10_000_000;
    // `GATE_BENCH_UPSTREAM=stream`: the upstream leg uses the streaming
    // contract (docs/protocol.md §14) instead of one unary call per request.
    if std::env::var("GATE_BENCH_UPSTREAM").is_ok_and(|v| v == "stream") {
        cfg.upstream.protocol = gatesvr_dataplane::upstream::UpstreamProtocol::Stream;
        cfg.upstream.stream_max_requests_in_flight = 100_000;
    }
    if let Some(addr) = upstream {
        cfg.zones.upstreams = (0..cfg.zones.count)
            .map(|i| gatesvr_dataplane::config::StaticZone {
                zone: gatesvr_proto::zone::zone_id(i),
                addrs: vec![addr.to_string()],
            })
            .collect();
    }
    cfg
}

fn announce(v: serde_json::Value) {
    println!("{v}");
}

/// Returns when stdin closes (the parent exited or dropped us).
async fn parent_gone() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// `GATE_BENCH_LOG=<filter>` (an `EnvFilter`, e.g. `gatesvr_dataplane=info`): the server logs
/// to `GATE_BENCH_LOG_DIR` (default the system temp dir), one file per process named after
/// its mode and pid, without colours. Off by default: the scenarios measure the servers, and
/// logging costs CPU. Used to see where a failover's reconnect time goes (docs/benchmarks.md).
///
/// Without it, a subscriber that writes nowhere at the product's default level (`info`), as
/// `gatesvr` always has one: with no subscriber at all, `tracing`'s `log` feature (on through
/// quinn) sends every disabled span of quinn and h2 through `Span::log`, which costs the data
/// plane ~8% of its instructions per request at 1 in flight and that `gatesvr` never pays
/// (callgrind, docs/benchmarks.md "Session 10").
fn init_logs(mode: &Serve) {
    let Ok(filter) = std::env::var("GATE_BENCH_LOG") else {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(std::io::sink)
            .try_init();
        return;
    };
    let name = match mode {
        Serve::Dataplane { node_id, .. } => node_id.clone().unwrap_or_else(|| "dp-bench".into()),
        Serve::CpNode { id, .. } => format!("cp-{id}"),
        other => format!("{other:?}")
            .split([' ', '{'])
            .next()
            .unwrap_or("serve")
            .to_lowercase(),
    };
    let dir = std::env::var_os("GATE_BENCH_LOG_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let path = dir.join(format!("{name}-{}.log", std::process::id()));
    match std::fs::File::create(&path) {
        Ok(file) => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .try_init();
        }
        Err(e) => eprintln!("gate-bench serve: log file {}: {e}", path.display()),
    }
}

pub async fn run(mode: Serve) -> Result<()> {
    gatesvr_common::tls::install_crypto_provider();
    init_logs(&mode);
    match mode {
        Serve::Dataplane {
            dir,
            upstream,
            node_id,
            control_plane,
            lease_ttl,
            web,
            upstream_stream,
            shared_keys_dir,
        } => {
            let routing = if upstream.is_some() || !control_plane.is_empty() {
                Routing::Upstreams
            } else {
                Routing::Echo
            };
            let mut cfg = dataplane_config(&dir, upstream.as_deref());
            if upstream_stream {
                cfg.upstream.protocol = gatesvr_dataplane::upstream::UpstreamProtocol::Stream;
                cfg.upstream.stream_max_requests_in_flight = 100_000;
            }
            if let Some(id) = node_id {
                cfg.control_plane.state_file = Some(dir.join(format!("{id}.state")));
                cfg.node_id = id;
            }
            if !control_plane.is_empty() {
                cfg.control_plane.endpoints = control_plane;
                cfg.control_plane.insecure = true;
                cfg.control_plane.lease_ttl = lease_ttl;
            }
            if shared_keys_dir.is_some() {
                cfg.server.shared_keys_dir = shared_keys_dir;
            }
            if web {
                cfg.transports.webtransport = true;
                cfg.transports.websocket_addr = Some("127.0.0.1:0".into());
            }
            let dp = DataPlane::start(cfg, routing)
                .await
                .map_err(|e| anyhow::anyhow!("data plane: {e}"))?;
            announce(serde_json::json!({
                "ops": dp.ops_addr().map(|a| a.to_string()),
                "quic": dp.quic_addr().to_string(),
                "grpc": dp.grpc_addr().to_string(),
                "http": dp.http_addr().to_string(),
                "metrics": dp.metrics_addr().to_string(),
                "websocket": dp.websocket_addr().map(|a| a.to_string()),
            }));
            parent_gone().await;
            dp.shutdown().await;
        }
        Serve::Bare { dir } => {
            let cfg = dataplane_config(&dir, None);
            let endpoint = gatesvr_dataplane::edge::quic::bind(&cfg.server)
                .map_err(|e| anyhow::anyhow!("bare quic: {e}"))?;
            announce(serde_json::json!({"quic": endpoint.local_addr()?.to_string()}));
            tokio::spawn(bare_accept(endpoint, dir.join("bare-stats.json")));
            parent_gone().await;
        }
        Serve::UpstreamEcho => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let (health, health_service) = tonic_health::server::health_reporter();
            health
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
            health
                .set_serving::<UpstreamServiceServer<EchoUpstream>>()
                .await;
            // Both contracts: the data plane picks (`GATE_BENCH_UPSTREAM`).
            let mut opts = gatesvr_upstream_sdk::Options::new("gate-bench-echo", "");
            opts.max_requests_in_flight = 100_000;
            let stream = gatesvr_upstream_sdk::Upstream::new(EchoUpstream, opts);
            stream.set_serving(true);
            let server = tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(UpstreamServiceServer::new(EchoUpstream))
                .add_service(stream.stream_service())
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                );
            announce(serde_json::json!({"grpc": addr.to_string()}));
            tokio::select! {
                r = server => r?,
                () = parent_gone() => {}
            }
        }
        Serve::Relay { dir, upstream } => {
            let cfg = dataplane_config(&dir, None);
            let endpoint = gatesvr_dataplane::edge::quic::bind(&cfg.server)
                .map_err(|e| anyhow::anyhow!("relay quic: {e}"))?;
            let channel = upstream_channel(&upstream)?;
            announce(serde_json::json!({"quic": endpoint.local_addr()?.to_string()}));
            tokio::spawn(relay_accept(endpoint, channel));
            parent_gone().await;
        }
        Serve::CpNode {
            dir,
            id,
            member,
            write_timeout,
            heartbeat,
        } => {
            let cp = crate::scenarios::failover::start_cp_node(
                &dir,
                id,
                &member,
                write_timeout,
                heartbeat,
            )
            .await?;
            announce(serde_json::json!({
                "grpc": cp.grpc_addr().to_string(),
                "admin": cp.admin_addr().to_string(),
                "id": id,
            }));
            parent_gone().await;
            cp.shutdown().await;
        }
        Serve::Upstreams {
            control_plane,
            gateway,
            zones,
        } => {
            let stop = tokio_util::sync::CancellationToken::new();
            let mut tasks = Vec::new();
            let mut addrs = Vec::new();
            for z in 0..zones {
                let zone = gatesvr_proto::zone::zone_id(z);
                let mut cfg = gate_upstream::Config::new(zone.clone(), gateway.clone());
                cfg.control_plane = control_plane.clone();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                cfg.addr = listener.local_addr()?;
                addrs.push(cfg.addr.to_string());
                let stop = stop.clone();
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = gate_upstream::run(cfg, listener, stop.cancelled_owned()).await
                    {
                        eprintln!("gate-bench upstream {zone}: {e}");
                    }
                }));
            }
            announce(serde_json::json!({ "grpc": addrs.first(), "zones": addrs }));
            parent_gone().await;
            stop.cancel();
            for t in tasks {
                let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
            }
        }
        Serve::Controlplane { dir, nodes } => {
            let cluster = crate::scenarios::claims::start_cluster(&dir, nodes).await?;
            announce(cluster.info());
            parent_gone().await;
            cluster.shutdown().await;
        }
    }
    Ok(())
}

pub fn upstream_channel(addr: &str) -> Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy(),
    )
}

/// The trivial upstream: echo.
pub struct EchoUpstream;

impl gatesvr_upstream_sdk::Handler for EchoUpstream {
    async fn handle(&self, request: ProcessRequestRequest) -> gatesvr_upstream_sdk::Reply {
        gatesvr_upstream_sdk::Reply::Done(ProcessRequestResponse {
            app_code: 0,
            payload: request.payload.into(),
            message: String::new(),
        })
    }
}

#[tonic::async_trait]
impl UpstreamService for EchoUpstream {
    async fn process_request(
        &self,
        request: tonic::Request<ProcessRequestRequest>,
    ) -> Result<tonic::Response<ProcessRequestResponse>, tonic::Status> {
        let req = request.into_inner();
        Ok(tonic::Response::new(ProcessRequestResponse {
            app_code: 0,
            payload: req.payload.into(),
            message: String::new(),
        }))
    }

    async fn get_status(
        &self,
        _request: tonic::Request<GetStatusRequest>,
    ) -> Result<tonic::Response<UpstreamStatus>, tonic::Status> {
        Ok(tonic::Response::new(UpstreamStatus {
            service_name: "gate-bench-echo".into(),
            zone: String::new(),
            healthy: true,
            requests_total: 0,
            inflight: 0,
        }))
    }
}

/// What the bare server's connections sent, summed when each closes: (connections closed,
/// datagrams sent, packets lost, bytes lost, congestion events, STREAM frames sent, sum of the
/// congestion windows at close, sum of smoothed RTTs at close in µs).
static BARE_STATS: parking_lot::Mutex<[u64; 8]> = parking_lot::Mutex::new([0; 8]);

async fn bare_accept(endpoint: quinn::Endpoint, stats_file: PathBuf) {
    while let Some(incoming) = endpoint.accept().await {
        let stats_file = stats_file.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.accept() else { return };
            let Ok(conn) = conn.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(bare_stream(send, recv));
            }
            let st = conn.stats();
            let json = {
                let mut s = BARE_STATS.lock();
                s[0] += 1;
                s[1] += st.udp_tx.datagrams;
                s[2] += st.path.lost_packets;
                s[3] += st.path.lost_bytes;
                s[4] += st.path.congestion_events;
                s[5] += st.frame_tx.stream;
                s[6] += st.path.cwnd;
                s[7] += st.path.rtt.as_micros() as u64;
                serde_json::json!({
                    "closed": s[0], "datagrams": s[1], "lost_packets": s[2], "lost_bytes": s[3],
                    "congestion_events": s[4], "stream_frames": s[5], "cwnd_sum": s[6], "rtt_us_sum": s[7],
                })
            };
            let _ = std::fs::write(&stats_file, json.to_string());
        });
    }
}

/// 'E': echo every byte back. 'P' + count (u64 LE) + size (u32 LE): write `count` Push frames
/// with seq 1.. and `size` bytes of data, as fast as flow control allows.
async fn bare_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut kind = [0u8; 1];
    if recv.read_exact(&mut kind).await.is_err() {
        return;
    }
    match kind[0] {
        b'E' => {
            while let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await {
                if send.write_all(&chunk.bytes).await.is_err() {
                    return;
                }
            }
        }
        b'P' => {
            let mut hdr = [0u8; 12];
            if recv.read_exact(&mut hdr).await.is_err() {
                return;
            }
            let count = u64::from_le_bytes(hdr[..8].try_into().expect("8 bytes"));
            let size = u32::from_le_bytes(hdr[8..].try_into().expect("4 bytes")) as usize;
            let mut buf = BytesMut::new();
            let mut seq = 1u64;
            while seq <= count {
                buf.clear();
                // Batches of up to 64 frames per write, as the data plane's writer drains its
                // queue into one write. A write's frames share one payload stamped once, as
                // the pushes of one of gate-bench's batches do (`push::push_data`).
                let data = crate::scenarios::push::push_data(size);
                for _ in 0..64 {
                    if seq > count {
                        break;
                    }
                    let push = Envelope {
                        body: Some(Body::Push(ServerPush {
                            seq_id: seq,
                            msg_type: "bench".into(),
                            data: data.clone(),
                            ..Default::default()
                        })),
                    };
                    frame::encode(&push, &mut buf);
                    seq += 1;
                }
                if send.write_all(&buf).await.is_err() {
                    return;
                }
            }
            let _ = send.finish();
            // Keep the stream until the client has read everything.
            let _ = recv.read_chunk(1, true).await;
        }
        _ => {}
    }
}

async fn relay_accept(endpoint: quinn::Endpoint, channel: Channel) {
    while let Some(incoming) = endpoint.accept().await {
        let channel = channel.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.accept() else { return };
            let Ok(conn) = conn.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(relay_stream(send, recv, channel.clone()));
            }
        });
    }
}

/// Reads Request frames, calls ProcessRequest for each concurrently, writes Response frames.
async fn relay_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, channel: Channel) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ClientResponse>();
    let writer = tokio::spawn(async move {
        let mut buf = BytesMut::new();
        while let Some(first) = rx.recv().await {
            buf.clear();
            let mut next = Some(first);
            while let Some(resp) = next {
                frame::encode(
                    &Envelope {
                        body: Some(Body::Response(resp)),
                    },
                    &mut buf,
                );
                next = rx.try_recv().ok();
            }
            if send.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let mut decoder = FrameDecoder::new(frame::DEFAULT_MAX_FRAME_SIZE);
    'read: while let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await {
        decoder.extend(&chunk.bytes);
        loop {
            match decoder.next_frame() {
                Ok(Some(Envelope {
                    body: Some(Body::Request(req)),
                })) => {
                    let mut client = UpstreamServiceClient::new(channel.clone());
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let call = client
                            .process_request(ProcessRequestRequest {
                                msg_id: req.msg_id,
                                seq_id: req.seq_id,
                                payload: req.payload.into(),
                                ..Default::default()
                            })
                            .await;
                        let mut resp = ClientResponse {
                            msg_id: req.msg_id,
                            seq_id: req.seq_id,
                            ..Default::default()
                        };
                        match call {
                            Ok(ok) => {
                                let ok = ok.into_inner();
                                resp.payload = ok.payload;
                                resp.app_code = ok.app_code;
                            }
                            Err(e) => {
                                resp.code = ErrorCode::UpstreamUnavailable as i32;
                                resp.message = e.message().to_string();
                            }
                        }
                        let _ = tx.send(resp);
                    });
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => break 'read,
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Connects a tonic client to an upstream address (used by baselines in the bench process).
pub fn upstream_client(addr: SocketAddr) -> Result<UpstreamServiceClient<Channel>> {
    Ok(UpstreamServiceClient::new(
        upstream_channel(&addr.to_string()).context("upstream channel")?,
    ))
}
