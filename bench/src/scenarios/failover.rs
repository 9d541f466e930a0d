//! failover, with real processes (each `gate-bench serve ...`): a 3-node control plane (one
//! process per raft node, durable, production raft timings), `DP_NODES` data-plane nodes
//! that are cluster members (leases, watch, claims, durable-push standbys), and the demo
//! upstream for every zone registered with the control plane.
//!
//! (a) Data-plane crash: N sessions on dp-1 receive durable pushes (PushToClient{durable},
//!     entering through the other nodes, forwarded to the owner); `kill -9` dp-1. Each client
//!     notices on its own (QUIC idle timeout `--detect`, keep-alives at a third of it) and
//!     reconnects to another node (spread over the survivors, as a load balancer would), which
//!     claims the session and rebuilds it from the standby's replica. Per session: time from
//!     the kill until its Start is answered elsewhere; durable pushes lost (accepted by the
//!     gateway, never delivered: must be 0), duplicates, gaps.
//! (b) Control-plane leader crash: sessions send requests through the data plane (to the
//!     upstream) in a steady loop and new sessions keep starting (each needs a claim, a raft
//!     commit); `kill -9` the raft leader; time until a survivor is leader (polled on the admin
//!     API), and the requests and new sessions that failed.
//!
//! Reference (no in-run baseline exists for a crash): the Go gateway this replaces declares its
//! peer dead after a 6 s heartbeat timeout, before any takeover starts.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gatesvr_controlplane::config::{AuthMode, MemberConfig};
use gatesvr_controlplane::{ControlPlane, ControlPlaneConfig};
use gatesvr_proto::client::ResumeStatus;
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_proto::upstream::{PushToClientRequest, TargetType};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Opts;
use crate::client::{Net, Sockets};
use crate::report::{Check, Cmp, Report};
use crate::session::{Endpoints, Session, SessionConfig, quic_config};
use crate::util::{Lat, ServerProc, free_port, now_ns, progress};

mod evidence;

pub const ADMIN_TOKEN: &str = "gate-bench-admin";
const DP_NODES: usize = 3;
/// The seed Go gateway's heartbeat timeout: its failover cannot start before this.
const SEED_HEARTBEAT_TIMEOUT_MS: f64 = 6000.0;

/// One control-plane node for `gate-bench serve cp-node`: production raft timings, plaintext
/// gRPC on loopback, admin API with a bearer token. Node 1 bootstraps every member.
pub async fn start_cp_node(
    dir: &Path,
    id: u64,
    members: &[String],
    write_timeout: Option<Duration>,
    heartbeat: Option<Duration>,
) -> Result<ControlPlane> {
    let members: Vec<MemberConfig> = members
        .iter()
        .map(|m| {
            let mut it = m.split('=');
            let (Some(mid), Some(grpc), Some(admin)) = (it.next(), it.next(), it.next()) else {
                bail!("--member {m:?} is not id=grpc=admin");
            };
            Ok(MemberConfig {
                id: mid.parse()?,
                grpc_addr: grpc.into(),
                admin_addr: admin.into(),
            })
        })
        .collect::<Result<_>>()?;
    let me = members
        .iter()
        .find(|m| m.id == id)
        .context("--id is not among --member")?;
    let mut cfg = ControlPlaneConfig {
        node_id: id,
        data_dir: dir.join(format!("cp-{id}")),
        grpc_addr: me.grpc_addr.parse()?,
        admin_addr: me.admin_addr.parse()?,
        ..ControlPlaneConfig::default()
    };
    cfg.tls.insecure = true;
    cfg.admin.auth = AuthMode::Tokens;
    cfg.admin.admin_token = Some(ADMIN_TOKEN.into());
    cfg.admin.insecure_plaintext_http = true;
    if let Some(t) = write_timeout {
        cfg.raft.write_timeout = t;
    }
    if let Some(h) = heartbeat {
        cfg.raft.heartbeat_interval = h;
        cfg.raft.election_timeout_min = h * 6;
        cfg.raft.election_timeout_max = h * 12;
    }
    if id == 1 {
        cfg.cluster.bootstrap = true;
        cfg.cluster.members = members;
    }
    Ok(ControlPlane::start(cfg).await?)
}

/// GET on a control-plane admin API (bearer token), JSON body; None if it does not answer.
async fn admin_get(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        let text = String::from_utf8_lossy(&body);
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200") {
            return None;
        }
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(Duration::from_millis(500), fut)
        .await
        .ok()
        .flatten()
}

/// (node id, term) of a node that says it is the leader, among `admins`.
pub(crate) async fn leader_of(admins: &[(u64, SocketAddr)]) -> Option<(u64, u64)> {
    for (id, addr) in admins {
        if let Some(v) = admin_get(*addr, "/v1/cluster").await
            && v["state"] == "leader"
        {
            return Some((*id, v["term"].as_u64().unwrap_or(0)));
        }
    }
    None
}

pub(crate) struct Cluster {
    /// (id, admin addr, grpc addr, process)
    cps: Vec<(u64, SocketAddr, SocketAddr, Option<ServerProc>)>,
    dps: Vec<Option<ServerProc>>,
    pub dp_quic: Vec<SocketAddr>,
    dp_grpc: Vec<SocketAddr>,
    /// Each data plane's Prometheus listener (None from a binary that does not announce it).
    dp_metrics: Vec<Option<SocketAddr>>,
    _upstreams: ServerProc,
}

/// How long a client waits for a connection and its StartResponse before it tries another
/// node: the SDK's default (`connect_timeout`, sdk/src/config.rs). A shorter one abandons
/// Starts that a busy survivor is still serving (handshake, claim, takeover) and sends the
/// same work to the other survivor, which is then busier still.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the evidence sampler reads every client connection's statistics.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

impl Cluster {
    /// This process and every server process still running, for CPU and run-queue figures.
    fn procs(&self) -> Vec<evidence::Proc> {
        let mut out = vec![evidence::Proc {
            name: "bench".into(),
            pid: std::process::id(),
        }];
        for (i, p) in self.dps.iter().enumerate() {
            if let Some(p) = p {
                out.push(evidence::Proc {
                    name: format!("dp{}", i + 1),
                    pid: p.pid(),
                });
            }
        }
        for (id, _, _, p) in &self.cps {
            if let Some(p) = p {
                out.push(evidence::Proc {
                    name: format!("cp{id}"),
                    pid: p.pid(),
                });
            }
        }
        out.push(evidence::Proc {
            name: "upstreams".into(),
            pid: self._upstreams.pid(),
        });
        out
    }

    fn live_admins(&self) -> Vec<(u64, SocketAddr)> {
        self.cps
            .iter()
            .filter(|c| c.3.is_some())
            .map(|c| (c.0, c.1))
            .collect()
    }
}

async fn start_cluster(o: &Opts, dir: &Path) -> Result<Cluster> {
    let mut cps = Vec::new();
    for id in 1..=3u64 {
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        cps.push((id, admin, grpc, None));
    }
    let members: Vec<String> = cps
        .iter()
        .map(|(id, admin, grpc, _)| format!("{id}={grpc}={admin}"))
        .collect();
    for cp in &mut cps {
        cp.3 = Some(ServerProc::spawn(
            &format!("cp-{}", cp.0),
            &[
                "cp-node".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--id".into(),
                cp.0.to_string(),
                "--member".into(),
                members.join(","),
            ],
            o.helper_cpu(),
        )?);
    }
    let admins: Vec<(u64, SocketAddr)> = cps.iter().map(|c| (c.0, c.1)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while leader_of(&admins).await.is_none() {
        anyhow::ensure!(Instant::now() < deadline, "no control-plane leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cp_grpc: Vec<String> = cps.iter().map(|c| c.2.to_string()).collect();
    let keys = shared_keys(dir)?;
    let mut dps = Vec::new();
    let (mut dp_quic, mut dp_grpc, mut dp_metrics) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=DP_NODES {
        let p = ServerProc::spawn(
            &format!("dp-{i}"),
            &[
                "dataplane".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--node-id".into(),
                format!("dp-{i}"),
                "--control-plane".into(),
                cp_grpc.join(","),
                "--shared-keys-dir".into(),
                keys.display().to_string(),
            ],
            o.server_cpu(),
        )?;
        dp_quic.push(p.addr("quic")?);
        dp_grpc.push(p.addr("grpc")?);
        dp_metrics.push(p.addr("metrics").ok());
        dps.push(Some(p));
    }
    let upstreams = ServerProc::spawn(
        "upstreams",
        &[
            "upstreams".into(),
            "--control-plane".into(),
            cp_grpc.join(","),
            "--gateway".into(),
            dp_grpc[1].to_string(),
        ],
        o.helper_cpu(),
    )?;
    Ok(Cluster {
        cps,
        dps,
        dp_quic,
        dp_grpc,
        dp_metrics,
        _upstreams: upstreams,
    })
}

/// Random QUIC and TLS keys for every data plane of the run (`server.shared_keys_dir`): the
/// Helm chart shares them by default, so a client of a dead node resumes its TLS session on
/// the node it moves to, and nodes can reset each other's connections.
fn shared_keys(dir: &Path) -> Result<std::path::PathBuf> {
    use gatesvr_dataplane::edge::quic_keys::{RESET_KEY_FILE, TICKET_KEYS_FILE, TOKEN_KEY_FILE};
    use std::io::Read as _;
    let keys = dir.join("quic-keys");
    std::fs::create_dir_all(&keys)?;
    let mut random = std::fs::File::open("/dev/urandom").context("/dev/urandom")?;
    for name in [RESET_KEY_FILE, TOKEN_KEY_FILE, TICKET_KEYS_FILE] {
        let mut key = [0u8; 32];
        random.read_exact(&mut key)?;
        std::fs::write(keys.join(name), key)?;
    }
    Ok(keys)
}

/// The cluster of this scenario, ready to serve (for `load` without given addresses).
pub(crate) async fn start_local(o: &Opts, dir: &Path) -> Result<Cluster> {
    let c = start_cluster(o, dir).await?;
    let ca = dir.join("certs").join("ca.crt");
    let cfg = Arc::new(SessionConfig {
        net: Arc::new(Net::new(&ca, 2)?),
        quic: quic_config(&ca, o.detect)?,
        endpoints: Endpoints::Fixed(Arc::new(c.dp_quic.clone())),
        connect_timeout: CONNECT_TIMEOUT,
    });
    wait_ready(&cfg, &c).await?;
    Ok(c)
}

/// An openid in each zone (FNV-1a of the openid, as the gateway routes).
fn openid_in_zone(prefix: &str, zone: u32) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| gatesvr_proto::zone::zone_index(id, 6) == zone)
        .expect("some id hashes to every zone")
}

fn gateway(addr: SocketAddr) -> Result<GatewayServiceClient<tonic::transport::Channel>> {
    Ok(GatewayServiceClient::new(crate::servers::upstream_channel(
        &addr.to_string(),
    )?))
}

/// Waits until every node routes requests of every zone to an upstream, and a durable push
/// to a session on dp-1 is accepted (every node sees its standby).
async fn wait_ready(cfg: &Arc<SessionConfig>, c: &Cluster) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, _) in c.dp_quic.iter().enumerate() {
        for z in 0..6 {
            let id = openid_in_zone(&format!("probe-{i}"), z);
            let s = Session::spawn(
                Arc::new(SessionConfig {
                    net: cfg.net.clone(),
                    quic: cfg.quic.clone(),
                    endpoints: Endpoints::Fixed(Arc::new(vec![c.dp_quic[i]])),
                    connect_timeout: cfg.connect_timeout,
                }),
                id,
                0,
                0,
            );
            loop {
                if s.request(1, b"echo ready".to_vec(), Duration::from_secs(2))
                    .await
                    .is_ok_and(|r| r.app_code == 0)
                {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "dp-{} never routed zone {z} to an upstream",
                    i + 1
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if i == 0 && z == 0 {
                let mut gw = gateway(c.dp_grpc[1])?;
                loop {
                    let r = gw
                        .push_to_client(PushToClientRequest {
                            target_type: TargetType::Openid as i32,
                            target_id: s.openid.clone(),
                            msg_type: "probe".into(),
                            durable: true,
                            ..Default::default()
                        })
                        .await;
                    if r.is_ok() {
                        break;
                    }
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "durable pushes never accepted: {r:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            s.join().await;
        }
    }
    Ok(())
}

/// Pushes accepted and refused per session (content = k, 1.. per session).
#[derive(Default)]
struct PushLedger {
    accepted: Vec<Mutex<Vec<u64>>>,
    next: Vec<AtomicU64>,
    refused: AtomicU64,
    rpc_lat: Mutex<Lat>,
}

/// Durable pushes at `rate`/s in all, round robin over sessions, through `gateways`.
fn push_driver(
    openids: Arc<Vec<String>>,
    gateways: Vec<SocketAddr>,
    rate: f64,
    payload: usize,
    ledger: Arc<PushLedger>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let clients = gateways
        .iter()
        .map(|a| gateway(*a))
        .collect::<Result<Vec<_>>>()?;
    Ok(tokio::spawn(async move {
        let sem = Arc::new(tokio::sync::Semaphore::new(512));
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut i = 0usize;
        let mut tasks = Vec::new();
        while !*stop.borrow() {
            tick.tick().await;
            let s = i % openids.len();
            let mut gw = clients[i % clients.len()].clone();
            i += 1;
            let k = ledger.next[s].fetch_add(1, Ordering::Relaxed) + 1;
            let mut req = tonic::Request::new(PushToClientRequest {
                target_type: TargetType::Openid as i32,
                target_id: openids[s].clone(),
                msg_type: "bench".into(),
                content: k.to_string(),
                data: super::push::push_data(payload),
                durable: true,
            });
            req.set_timeout(Duration::from_secs(2));
            let ledger = ledger.clone();
            let Ok(permit) = sem.clone().acquire_owned().await else {
                break;
            };
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(3), gw.push_to_client(req)).await;
                match r {
                    Ok(Ok(_)) => {
                        ledger.accepted[s].lock().push(k);
                        ledger.rpc_lat.lock().0.push(t0.elapsed().as_nanos() as u64);
                    }
                    _ => {
                        ledger.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                drop(permit);
            }));
            tasks.retain(|t| !t.is_finished());
        }
        for t in tasks {
            let _ = t.await;
        }
    }))
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn pct_ms(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[(((p / 100.0) * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

/// How long the sessions stay connected to dp-1, idle but for keep-alives, before the pushes
/// start (and `warm` later, the kill): `GATE_BENCH_FAILOVER_SETTLE` (e.g. `0s`), default
/// [`SETTLE`] (none with `--tiny`).
fn settle_time(o: &Opts) -> Result<Duration> {
    match std::env::var("GATE_BENCH_FAILOVER_SETTLE") {
        Ok(v) => {
            crate::humantime_dur(&v).map_err(|e| anyhow::anyhow!("GATE_BENCH_FAILOVER_SETTLE: {e}"))
        }
        Err(_) if o.tiny => Ok(Duration::ZERO),
        Err(_) => Ok(SETTLE),
    }
}

/// Default settle: a crash hits a node whose sessions have been connected for a while, not
/// only the instant after they all connected at once. A QUIC client's idle timeout is at least
/// three PTOs, and its PTO comes from its RTT estimate, which starts from the handshake: in a
/// connect burst the handshakes queue for the server's CPU, the first RTT samples are hundreds
/// of ms, and the estimate (RFC 9002: 7/8 old + 1/8 new per sample, one sample per keep-alive)
/// takes seconds to forget them. A crash within those seconds is noticed late: `0s` measures
/// that case (docs/benchmarks.md, "Session 8").
const SETTLE: Duration = Duration::from_secs(10);

pub async fn run(o: &Opts) -> Result<Report> {
    let mut rep = Report::new("failover");
    let n = o.fanout;
    // One durable push per session every 5 s (at least 100/s): load, not overload. At 1000/s
    // (1 per session per second) the three data planes sharing one core saturate before the
    // kill (docs/benchmarks.md).
    let rate = (n as f64 / 5.0).max(100.0);
    let warm = if o.tiny {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(2)
    };
    rep.param("sessions", n);
    rep.param("dataplane_nodes", DP_NODES);
    rep.param("controlplane_nodes", 3);
    rep.param("durable_pushes_per_s", rate);
    rep.param("client_idle_timeout_ms", o.detect.as_millis() as u64);
    rep.param(
        "client_sockets",
        match o.client_sockets {
            Sockets::Shared => "shared (8 sockets hearing refusals by node address)",
            Sockets::Connected => "connected (one per connection, as the SDK's)",
            Sockets::Deaf => "deaf (8 shared sockets; only the idle timeout notices a crash)",
        },
    );
    rep.param(
        "raft_timings",
        "defaults: heartbeat 250ms, election 1.5s..3s",
    );
    rep.param("dataplane_lease_ttl_s", 3);
    rep.param(
        "settle_before_pushes_ms",
        settle_time(o)?.as_millis() as u64,
    );
    let dir = o.rundir()?;
    progress("failover: starting 3 control-plane nodes, 3 data planes, upstreams");
    let mut c = start_cluster(o, &dir.path()).await?;
    // Shared sockets ask for the data plane's 8 MiB receive buffer: the load
    // generator must not drop its own datagrams in the reconnect burst.
    let net = Arc::new(Net::with(&dir.ca(), o.client_sockets, 8)?);
    let cfg = Arc::new(SessionConfig {
        net: net.clone(),
        quic: quic_config(&dir.ca(), o.detect)?,
        endpoints: Endpoints::Fixed(Arc::new(c.dp_quic.clone())),
        connect_timeout: CONNECT_TIMEOUT,
    });
    wait_ready(&cfg, &c).await?;

    // ---- (a) kill -9 of the data plane holding every session ----
    progress(format!("failover: {n} sessions on dp-1"));
    let openids: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("fo-{i}")).collect());
    let sessions: Vec<Session> = openids
        .iter()
        .enumerate()
        .map(|(i, id)| Session::spawn(cfg.clone(), id.clone(), 0, i))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sessions.iter().all(Session::started) {
        anyhow::ensure!(Instant::now() < deadline, "sessions did not start on dp-1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The clients' RTT estimates right after the connect burst, then an idle settle (only
    // keep-alives) before the pushes start and dp-1 is killed.
    let recs: Vec<_> = sessions.iter().map(|s| s.rec.clone()).collect();
    let snaps_started = evidence::snaps(&recs);
    let settle = settle_time(o)?;
    if !settle.is_zero() {
        progress(format!("failover: sessions settle for {settle:?}"));
        tokio::time::sleep(settle).await;
    }
    let ledger = Arc::new(PushLedger {
        accepted: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
        next: (0..n).map(|_| AtomicU64::new(0)).collect(),
        ..Default::default()
    });
    // Evidence of where detection goes (read-only: quinn's statistics, /proc).
    let procs = c.procs();
    let sampler = evidence::Sampler::spawn(recs.clone(), SAMPLE_EVERY);
    let lag = evidence::Lag::spawn();
    let (times_a, snaps_a) = (evidence::times(&procs), evidence::snaps(&recs));
    let (rcvbuf_a, drops_a) = (evidence::udp_rcvbuf_errors(), evidence::udp_drops());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let driver = push_driver(
        openids.clone(),
        c.dp_grpc[1..].to_vec(),
        rate,
        o.payload,
        ledger.clone(),
        stop_rx,
    )?;
    tokio::time::sleep(warm).await;
    let tickets_b = cfg.quic.tickets_offered.load(Ordering::Relaxed);
    let full_b = cfg.quic.full_handshakes.load(Ordering::Relaxed);
    let tls_b = evidence::tls_counts(&c.dp_metrics).await;
    let takeover_b = evidence::takeover_counts(&c.dp_metrics).await;
    let cp_admins: Vec<SocketAddr> = c.cps.iter().map(|cp| cp.1).collect();
    let claims_b = evidence::cp_claims(&cp_admins).await;
    let (times_b, snaps_b) = (evidence::times(&procs), evidence::snaps(&recs));
    let rcvbuf_b = evidence::udp_rcvbuf_errors();
    progress("failover: kill -9 dp-1");
    let victim = c.dp_quic[0];
    let t_kill = now_ns();
    drop(c.dps[0].take());
    // Per session at the kill: durable pushes accepted so far (a session with none has no
    // replica anywhere, so its takeover can only say SESSION_EXPIRED) and failed Start
    // attempts so far (those after the kill are reconnects the client gave up on: its
    // connect timeout, or a refusal).
    let accepted_at_kill: Vec<usize> = ledger.accepted.iter().map(|a| a.lock().len()).collect();
    let failed_at_kill: Vec<u64> = sessions
        .iter()
        .map(|s| s.rec.lock().failed_attempts)
        .collect();
    // Sessions connected to dp-1 at the kill (a session whose connection dropped earlier, on
    // a loaded machine with a short idle timeout, may have moved already: counted apart).
    let on_victim: Vec<bool> = sessions
        .iter()
        .map(|s| {
            let r = s.rec.lock();
            let last_start = r.starts.last().map_or(0, |st| st.t_ns);
            r.starts.last().is_some_and(|st| st.addr == victim)
                && !r.losses.iter().any(|l| *l > last_start)
        })
        .collect();
    let resume_deadline = Instant::now() + Duration::from_secs(if o.tiny { 30 } else { 60 });
    let resumed_after = |s: &Session| s.rec.lock().starts.iter().any(|st| st.t_ns > t_kill);
    while !sessions
        .iter()
        .zip(&on_victim)
        .all(|(s, v)| !v || resumed_after(s))
        && Instant::now() < resume_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tickets_c = cfg.quic.tickets_offered.load(Ordering::Relaxed);
    let full_c = cfg.quic.full_handshakes.load(Ordering::Relaxed);
    let times_c = evidence::times(&procs);
    let tls_c = evidence::tls_counts(&c.dp_metrics).await;
    let takeover_c = evidence::takeover_counts(&c.dp_metrics).await;
    let claims_c = evidence::cp_claims(&cp_admins).await;
    let (rcvbuf_c, drops_c) = (evidence::udp_rcvbuf_errors(), evidence::udp_drops());
    let tracks = sampler.finish().await;
    let lags = lag.finish().await;
    progress("failover: sessions resumed; pushing on");
    tokio::time::sleep(warm).await;
    let _ = stop_tx.send(true);
    let _ = driver.await;
    // Settle: every accepted push delivered, or 10 s.
    let settle = Instant::now() + Duration::from_secs(10);
    loop {
        let missing: usize = sessions
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let r = s.rec.lock();
                ledger.accepted[i]
                    .lock()
                    .iter()
                    .filter(|k| !r.seen.contains_key(k))
                    .count()
            })
            .sum();
        if missing == 0 || Instant::now() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut resume, mut detect, mut reconnect) = (Vec::new(), Vec::new(), Vec::new());
    // The reconnect split: failed attempts and back-off before the attempt that got the
    // answer, its QUIC handshake, its Start on the node (claim, takeover, StartResponse).
    let (mut re_wait, mut re_handshake, mut re_start) = (Vec::new(), Vec::new(), Vec::new());
    // Starts answered after the kill, by node index.
    let mut answered_by = vec![0u64; c.dp_quic.len()];
    let (mut st_resumed, mut st_recovered, mut st_expired, mut st_other, mut not_resumed) =
        (0, 0, 0, 0, 0);
    // Sessions that came back EXPIRED although a durable push of theirs had been accepted
    // before the kill (their replica should have been found), and RECOVERED without one.
    let (mut expired_with_durable, mut recovered_without_durable) = (0, 0);
    // Start attempts after the kill that failed (the client timed out or was refused), and
    // the sessions that needed more than one attempt.
    let (mut failed_after_kill, mut retried_sessions) = (0u64, 0);
    let (mut accepted, mut lost, mut delivered_ok, mut unconfirmed) = (0u64, 0u64, 0u64, 0u64);
    // Of `lost`: on sessions that came back EXPIRED, and on sessions that never came back.
    let (mut lost_expired, mut lost_unresumed) = (0u64, 0u64);
    let (mut gaps, mut seq_dups, mut redelivered, mut unflagged, mut trimmed) = (0, 0, 0, 0, 0);
    let mut push_lat = Lat::default();
    for (i, s) in sessions.iter().enumerate() {
        let r = s.rec.lock();
        let after_kill = r.starts.iter().find(|st| st.t_ns > t_kill);
        match after_kill.filter(|_| on_victim[i]) {
            Some(st) => {
                resume.push(ms(st.t_ns - t_kill));
                let had_durable = accepted_at_kill[i] > 0;
                match st.status {
                    ResumeStatus::Resumed => st_resumed += 1,
                    ResumeStatus::Recovered => {
                        st_recovered += 1;
                        recovered_without_durable += usize::from(!had_durable);
                    }
                    ResumeStatus::SessionExpired => {
                        st_expired += 1;
                        expired_with_durable += usize::from(had_durable);
                    }
                    _ => st_other += 1,
                }
                let failed = r.failed_attempts - failed_at_kill[i];
                failed_after_kill += failed;
                retried_sessions += usize::from(failed > 0);
                if let Some(l) = r.losses.iter().find(|l| **l > t_kill) {
                    detect.push(ms(l - t_kill));
                    reconnect.push(ms(st.t_ns.saturating_sub(*l)));
                    re_wait.push(ms(st.attempt_ns.saturating_sub(*l)));
                    re_handshake.push(ms(st.connected_ns.saturating_sub(st.attempt_ns)));
                    re_start.push(ms(st.t_ns.saturating_sub(st.connected_ns)));
                }
                if let Some(i) = c.dp_quic.iter().position(|a| *a == st.addr) {
                    answered_by[i] += 1;
                }
            }
            None if on_victim[i] => not_resumed += 1,
            None => {}
        }
        let acc = ledger.accepted[i].lock();
        accepted += acc.len() as u64;
        for k in acc.iter() {
            if r.seen.contains_key(k) {
                delivered_ok += 1;
            } else {
                lost += 1;
                match after_kill.map(|st| st.status) {
                    None => lost_unresumed += 1,
                    Some(ResumeStatus::SessionExpired) => lost_expired += 1,
                    _ => {}
                }
            }
        }
        unconfirmed += r.seen.keys().filter(|k| !acc.contains(k)).count() as u64;
        gaps += r.gaps;
        seq_dups += r.seq_dups;
        redelivered += r.redelivered_dups;
        unflagged += r.unflagged_dups;
        trimmed += r.trimmed;
        push_lat.0.extend(r.push_lat.iter().map(|(_, l)| *l));
    }
    // Connections lost before the kill (none is expected), and why.
    let mut early: std::collections::BTreeMap<String, u64> = Default::default();
    for s in &sessions {
        let r = s.rec.lock();
        for (t, why) in r.losses.iter().zip(&r.loss_reasons) {
            if *t < t_kill {
                *early.entry(why.clone()).or_default() += 1;
            }
        }
        for (t, why) in &r.failures {
            if *t < t_kill {
                *early
                    .entry(format!("Start attempt failed: {why}"))
                    .or_default() += 1;
            }
        }
    }
    for (why, n) in &early {
        progress(format!("failover: before the kill, {n} connections: {why}"));
    }
    // Why the Start attempts after the kill failed, by node (the reconnect tail).
    let node_of = |why: &str| {
        c.dp_quic
            .iter()
            .position(|a| why.starts_with(&a.to_string()))
            .map_or_else(|| "?".to_string(), |i| format!("dp-{}", i + 1))
    };
    let mut reasons: std::collections::BTreeMap<String, u64> = Default::default();
    for s in &sessions {
        for (t, why) in &s.rec.lock().failures {
            if *t > t_kill {
                let text = why.split_once(": ").map_or(why.as_str(), |(_, w)| w);
                *reasons
                    .entry(format!("{} {text}", node_of(why)))
                    .or_default() += 1;
            }
        }
    }
    for (why, n) in &reasons {
        progress(format!(
            "failover: {n} Start attempts after the kill failed: {why}"
        ));
    }
    // Per session on dp-1: its connection at the kill, and what the sampler saw of it.
    let at_kill: Vec<Option<(evidence::Snap, Option<&evidence::Track>)>> = snaps_b
        .iter()
        .zip(&tracks)
        .zip(&on_victim)
        .map(|((snap, tracks), v)| {
            let snap = (*v).then_some(*snap)??;
            Some((snap, tracks.iter().find(|t| t.id == snap.id)))
        })
        .collect();
    if let Some(path) = std::env::var_os("GATE_BENCH_FAILOVER_TRACE") {
        write_trace(Path::new(&path), &sessions, &c.dp_quic, t_kill, &at_kill)?;
    }
    // A percentile of nothing is left out rather than reported as NaN (null in JSON).
    let f = |rep: &mut Report, k: &str, v: f64| {
        if !v.is_nan() {
            rep.field(k, v);
        }
    };
    // Detection: the RTT the clients measured, how long before the kill they last heard from
    // dp-1, and how long a connection stayed silent before it gave up (max(idle timeout,
    // 3 PTO)).
    let rtt_started: Vec<f64> = snaps_started
        .iter()
        .flatten()
        .map(|s| ms(s.rtt_ns))
        .collect();
    let rtt_at_kill: Vec<f64> = at_kill
        .iter()
        .flatten()
        .map(|(s, _)| ms(s.rtt_ns))
        .collect();
    let rtt_max: Vec<f64> = at_kill
        .iter()
        .flatten()
        .filter_map(|(_, t)| t.map(|t| ms(t.max_rtt_ns)))
        .collect();
    let (mut heard_before_kill, mut silent_until_lost) = (Vec::new(), Vec::new());
    for ((a, s), v) in at_kill.iter().zip(&sessions).zip(&on_victim) {
        let Some((_, Some(t))) = a else { continue };
        if !*v {
            continue;
        }
        heard_before_kill.push(ms(t_kill.saturating_sub(t.last_rx_ns)));
        if let Some(l) = s.rec.lock().losses.iter().find(|l| **l > t_kill) {
            silent_until_lost.push(ms(l.saturating_sub(t.last_rx_ns)));
        }
    }
    for (k, v) in [
        ("client_rtt_after_start", &rtt_started),
        ("client_rtt_at_kill", &rtt_at_kill),
        ("client_rtt_max_before_kill", &rtt_max),
        ("last_heard_before_kill", &heard_before_kill),
        ("silent_until_lost", &silent_until_lost),
    ] {
        f(&mut rep, &format!("{k}_p50_ms"), pct_ms(v, 50.0));
        f(&mut rep, &format!("{k}_p99_ms"), pct_ms(v, 99.0));
    }
    // TLS resumption on the new node shows as fewer bytes before the StartResponse.
    let rx_first: Vec<f64> = sessions
        .iter()
        .filter_map(|s| s.rec.lock().starts.first().map(|st| st.rx_bytes as f64))
        .collect();
    let rx_after: Vec<f64> = sessions
        .iter()
        .filter_map(|s| {
            let r = s.rec.lock();
            r.starts
                .iter()
                .find(|st| st.t_ns > t_kill)
                .map(|st| st.rx_bytes as f64)
        })
        .collect();
    f(
        &mut rep,
        "tls_tickets_offered_after_kill",
        tickets_c.saturating_sub(tickets_b) as f64,
    );
    // Full handshakes after the kill as the clients saw them (a certificate verified), and
    // as the survivors counted them (`gatesvr_tls_handshakes_total`, absent from older builds).
    f(
        &mut rep,
        "client_tls_full_handshakes_after_kill",
        full_c.saturating_sub(full_b) as f64,
    );
    // Ownership changes the control plane applied from the kill until every session was back,
    // per session that reconnected: 1 when each reconnect claims once.
    if let (Some(b), Some(c)) = (claims_b, claims_c) {
        let claims = c.saturating_sub(b);
        f(&mut rep, "cp_claims_after_kill", claims as f64);
        let back = sessions
            .iter()
            .zip(&on_victim)
            .filter(|(s, v)| **v && resumed_after(s))
            .count();
        if back > 0 {
            f(
                &mut rep,
                "cp_claims_per_reconnect",
                claims as f64 / back as f64,
            );
        }
    }
    // Where the survivors' Starts spent their time (`gatesvr_start_phase_seconds`, mean per
    // Start that went through the phase) and how often a recovery waited (absent from builds
    // older than session 11).
    for phase in [
        "handshake",
        "start_frame",
        "answered",
        "claim",
        "handover",
        "recovery",
        "view_wait",
    ] {
        let sum = evidence::grown(&takeover_b, &takeover_c, &format!("{phase}_sum"));
        let n = evidence::grown(&takeover_b, &takeover_c, &format!("{phase}_count"));
        if let (Some(sum), Some(n)) = (sum, n) {
            f(&mut rep, &format!("dp_start_{phase}_after_kill"), n);
            if n > 0.0 {
                f(
                    &mut rep,
                    &format!("dp_start_{phase}_mean_ms"),
                    sum * 1e3 / n,
                );
            }
        }
    }
    for outcome in [
        "recovered",
        "no_replica",
        "retried",
        "view_waited",
        "incomplete",
    ] {
        if let Some(v) = evidence::grown(&takeover_b, &takeover_c, &format!("recovered_{outcome}"))
        {
            f(&mut rep, &format!("dp_recovery_{outcome}_after_kill"), v);
        }
    }
    for (key, label) in [
        ("dp_tls_full_after_kill", "full"),
        ("dp_tls_resumed_after_kill", "resumed"),
        ("dp_tls_tickets_refused_after_kill", "refused"),
    ] {
        let sum: Option<u64> = tls_b
            .iter()
            .zip(&tls_c)
            .skip(1)
            .map(|(b, c)| {
                Some(
                    c.as_ref()?
                        .get(label)?
                        .saturating_sub(*b.as_ref()?.get(label)?),
                )
            })
            .sum();
        if let Some(v) = sum {
            f(&mut rep, key, v as f64);
        }
    }
    f(
        &mut rep,
        "start_rx_bytes_first_p50",
        pct_ms(&rx_first, 50.0),
    );
    f(
        &mut rep,
        "start_rx_bytes_after_kill_p50",
        pct_ms(&rx_after, 50.0),
    );
    f(
        &mut rep,
        "start_rx_bytes_after_kill_p99",
        pct_ms(&rx_after, 99.0),
    );
    // Keep-alive cost: datagrams per session per second before the kill (same connection at
    // both ends of the window).
    let secs = warm.as_secs_f64();
    let (mut pings, mut tx, mut rx, mut conns) = (0u64, 0u64, 0u64, 0u64);
    for (a, b) in snaps_a.iter().zip(&snaps_b) {
        if let (Some(a), Some(b)) = (a, b)
            && a.id == b.id
        {
            pings += b.pings - a.pings;
            tx += b.tx - a.tx;
            rx += b.rx - a.rx;
            conns += 1;
        }
    }
    let per = |x: u64| x as f64 / conns.max(1) as f64 / secs;
    f(&mut rep, "client_pings_per_session_s", per(pings));
    f(&mut rep, "client_datagrams_tx_per_session_s", per(tx));
    f(&mut rep, "client_datagrams_rx_per_session_s", per(rx));
    // CPU and run-queue wait per process, before the kill and during the takeover.
    for (phase, a, b) in [
        ("warm", &times_a, &times_b),
        ("takeover", &times_b, &times_c),
    ] {
        let w = evidence::window(&procs, a, b);
        let line: Vec<String> = w
            .iter()
            .filter(|x| x.1.is_finite())
            .map(|(n, cpu, runq)| format!("{n} {cpu:.0}% cpu, {runq:.0} ms/s runnable"))
            .collect();
        progress(format!("failover: {phase}: {}", line.join("; ")));
        for (name, cpu, runq) in w {
            f(&mut rep, &format!("{name}_cpu_pct_{phase}"), cpu);
            f(&mut rep, &format!("{name}_runq_ms_per_s_{phase}"), runq);
        }
    }
    for (phase, from, to) in [("warm", 0, t_kill), ("takeover", t_kill, u64::MAX)] {
        let v: Vec<f64> = lags
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, l)| ms(*l))
            .collect();
        f(
            &mut rep,
            &format!("bench_timer_lag_p50_ms_{phase}"),
            pct_ms(&v, 50.0),
        );
        f(
            &mut rep,
            &format!("bench_timer_lag_p99_ms_{phase}"),
            pct_ms(&v, 99.0),
        );
        f(
            &mut rep,
            &format!("bench_timer_lag_max_ms_{phase}"),
            pct_ms(&v, 100.0),
        );
    }
    f(
        &mut rep,
        "udp_rcvbuf_errors_warm",
        rcvbuf_b.saturating_sub(rcvbuf_a) as f64,
    );
    f(
        &mut rep,
        "udp_rcvbuf_errors_takeover",
        rcvbuf_c.saturating_sub(rcvbuf_b) as f64,
    );
    let dropped = |ports: &[u16]| -> f64 {
        ports
            .iter()
            .map(|p| {
                drops_c
                    .get(p)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(drops_a.get(p).copied().unwrap_or(0))
            })
            .sum::<u64>() as f64
    };
    for (i, a) in c.dp_quic.iter().enumerate() {
        f(
            &mut rep,
            &format!("udp_drops_dp{}", i + 1),
            dropped(&[a.port()]),
        );
    }
    if o.client_sockets != Sockets::Connected {
        // Connected sockets come and go with their connections: not counted.
        f(&mut rep, "udp_drops_clients", dropped(&net.local_ports()));
    }
    f(&mut rep, "resume_p50_ms", pct_ms(&resume, 50.0));
    f(&mut rep, "resume_p99_ms", pct_ms(&resume, 99.0));
    f(&mut rep, "resume_max_ms", pct_ms(&resume, 100.0));
    f(&mut rep, "detect_p50_ms", pct_ms(&detect, 50.0));
    f(&mut rep, "detect_p99_ms", pct_ms(&detect, 99.0));
    f(&mut rep, "reconnect_p50_ms", pct_ms(&reconnect, 50.0));
    f(&mut rep, "reconnect_p99_ms", pct_ms(&reconnect, 99.0));
    for (k, v) in [
        ("reconnect_failed_attempts", &re_wait),
        ("reconnect_handshake", &re_handshake),
        ("reconnect_start", &re_start),
    ] {
        f(&mut rep, &format!("{k}_p50_ms"), pct_ms(v, 50.0));
        f(&mut rep, &format!("{k}_p99_ms"), pct_ms(v, 99.0));
    }
    // Survivors' CPU per Start they answered, from the kill until every session was back
    // (everything they did in that window: handshakes, Starts, takeovers, pushes, watch).
    for (i, n) in answered_by.iter().enumerate().skip(1) {
        let name = format!("dp{}", i + 1);
        if let Some(cpu_ms) = evidence::run_ms(&procs, &times_b, &times_c, &name) {
            f(&mut rep, &format!("{name}_starts_after_kill"), *n as f64);
            f(&mut rep, &format!("{name}_cpu_ms_takeover"), cpu_ms);
            if *n > 0 {
                f(
                    &mut rep,
                    &format!("{name}_cpu_us_per_start"),
                    cpu_ms * 1e3 / *n as f64,
                );
            }
        }
    }
    f(
        &mut rep,
        "sessions_on_victim_at_kill",
        on_victim.iter().filter(|v| **v).count() as f64,
    );
    f(
        &mut rep,
        "sessions_moved_before_kill",
        on_victim.iter().filter(|v| !**v).count() as f64,
    );
    f(
        &mut rep,
        "reconnects_before_kill",
        sessions
            .iter()
            .map(|s| {
                s.rec
                    .lock()
                    .starts
                    .iter()
                    .filter(|st| st.t_ns < t_kill)
                    .count() as f64
                    - 1.0
            })
            .sum(),
    );
    f(&mut rep, "sessions_resumed", f64::from(st_resumed));
    f(&mut rep, "sessions_recovered", f64::from(st_recovered));
    f(&mut rep, "sessions_expired", f64::from(st_expired));
    f(&mut rep, "sessions_other_status", f64::from(st_other));
    f(
        &mut rep,
        "sessions_with_durable_before_kill",
        on_victim
            .iter()
            .zip(&accepted_at_kill)
            .filter(|(v, a)| **v && **a > 0)
            .count() as f64,
    );
    f(
        &mut rep,
        "expired_with_durable_before_kill",
        expired_with_durable as f64,
    );
    f(
        &mut rep,
        "recovered_without_durable_before_kill",
        recovered_without_durable as f64,
    );
    f(
        &mut rep,
        "start_attempts_failed_after_kill",
        failed_after_kill as f64,
    );
    f(
        &mut rep,
        "sessions_retried_after_kill",
        retried_sessions as f64,
    );
    f(&mut rep, "sessions_not_resumed", f64::from(not_resumed));
    f(&mut rep, "durable_accepted", accepted as f64);
    f(&mut rep, "durable_delivered", delivered_ok as f64);
    f(&mut rep, "durable_lost", lost as f64);
    f(&mut rep, "durable_lost_on_expired", lost_expired as f64);
    f(&mut rep, "durable_lost_on_unresumed", lost_unresumed as f64);
    f(
        &mut rep,
        "durable_refused",
        ledger.refused.load(Ordering::Relaxed) as f64,
    );
    f(&mut rep, "delivered_not_confirmed", unconfirmed as f64);
    f(&mut rep, "gaps", gaps as f64);
    f(&mut rep, "seq_dups", seq_dups as f64);
    f(&mut rep, "dups_redelivered", redelivered as f64);
    f(&mut rep, "dups_unflagged", unflagged as f64);
    f(&mut rep, "trimmed", trimmed as f64);
    f(&mut rep, "push_p50_ms", push_lat.pct_us(50.0) / 1e3);
    f(&mut rep, "push_p99_ms", push_lat.pct_us(99.0) / 1e3);
    f(
        &mut rep,
        "durable_rpc_p99_ms",
        ledger.rpc_lat.lock().pct_us(99.0) / 1e3,
    );

    // ---- (b) kill -9 of the control-plane leader under request load ----
    let lb = leader_kill(o, &mut c, &cfg, &sessions).await?;
    for (k, v) in lb {
        f(&mut rep, &k, v);
    }
    for s in sessions {
        s.join().await;
    }

    let fields = rep.fields.clone();
    let g = |k: &str| fields.get(k).copied().unwrap_or(f64::NAN);
    let p99 = g("resume_p99_ms");
    rep.checks.push(Check {
        baseline: Some(SEED_HEARTBEAT_TIMEOUT_MS),
        ratio: Some(p99 / SEED_HEARTBEAT_TIMEOUT_MS),
        ..Check::absolute(
            "p99 resume after kill -9 (baseline: seed heartbeat timeout)",
            p99,
            Cmp::AtMost,
            1500.0,
            "ms",
        )
    });
    for (name, k) in [
        ("durable pushes lost", "durable_lost"),
        ("duplicates without the redelivery flag", "dups_unflagged"),
        ("gaps in push seqs", "gaps"),
        ("sessions not resumed", "sessions_not_resumed"),
        (
            "failed requests across the leader kill",
            "cp_failed_requests",
        ),
    ] {
        rep.checks
            .push(Check::absolute(name, g(k), Cmp::AtMost, 0.0, ""));
    }
    let mut report_only = |name: &str, v: f64, unit: &str| {
        let mut ch = Check::absolute(name, v, Cmp::AtLeast, 0.0, unit);
        ch.goal = "(report)".into();
        ch.met = true;
        rep.checks.push(ch);
    };
    report_only("time to a new raft leader", g("cp_new_leader_ms"), "ms");
    report_only(
        "failed Start attempts of new sessions across the leader kill",
        g("cp_new_session_failed_attempts"),
        "",
    );
    report_only(
        "new sessions the data planes served provisionally (no claim) across the leader kill",
        g("cp_dp_provisional_sessions"),
        "",
    );
    report_only(
        "Starts the data planes refused (claim refused: DRAINING) across the leader kill",
        g("cp_dp_claims_refused"),
        "",
    );
    // A new session that needed a retry, or never started, fails this figure: the client
    // retrying by itself must not hide it.
    rep.checks.push(Check::absolute(
        "new sessions failed across the leader kill (retried or not started)",
        g("cp_new_session_failures"),
        Cmp::AtMost,
        0.0,
        "",
    ));
    rep.notes.push(format!(
        "resume = from the kill -9 until the session's Start is answered by another node; it includes detection by the client (two datagrams refused by the dead node's host with none answered, unless --client-sockets deaf; else the QUIC idle timeout {} ms; keep-alive every {} ms: detect_*), then reconnect + claim + replica fetch (reconnect_*)",
        o.detect.as_millis(),
        (o.detect / 3).as_millis()
    ));
    rep.notes.push("baseline: the seed Go gateway's 6 s heartbeat timeout (failover cannot begin before it); there is no in-run baseline for a crash".into());
    rep.notes.push("durable_lost = pushes the gateway accepted as durable (OK) that never reached the client; durable_refused = push RPCs refused or timed out (the owner was dead or the standby unreachable: an upstream retries those); dups_redelivered = pushes delivered again after the recovery, flagged redelivery (at-least-once: the ack of the first copy had not reached the replica)".into());
    rep.notes.push("durable_lost_on_expired: on sessions whose takeover found no replica (SESSION_EXPIRED); durable_lost_on_unresumed: on sessions that had not come back when the run ended (undelivered, not provably lost)".into());
    rep.notes
        .push("the demo upstreams and the data planes list all three control-plane nodes".into());
    drop(c);
    Ok(rep)
}

/// `GATE_BENCH_FAILOVER_TRACE=<file>`: one line per session of part (a), times in ms from
/// the kill: when its connection was found lost, each failed Start attempt (node, reason) and
/// each Start answered (node, status). Shows where a slow reconnect spent its time. Part (b)
/// writes `<file>` with the extension `b`: when the new leader was known and, per new
/// session, when it was spawned, each failed Start attempt (node, reason) and when it started
/// (ms from the control-plane leader kill).
fn write_trace(
    path: &Path,
    sessions: &[Session],
    nodes: &[SocketAddr],
    t_kill: u64,
    at_kill: &[Option<(evidence::Snap, Option<&evidence::Track>)>],
) -> Result<()> {
    use std::fmt::Write as _;
    let rel = |t: u64| (t as f64 - t_kill as f64) / 1e6;
    let name = |a: &SocketAddr| {
        nodes
            .iter()
            .position(|n| n == a)
            .map_or_else(|| a.to_string(), |i| format!("dp-{}", i + 1))
    };
    let mut out = String::new();
    for (s, k) in sessions.iter().zip(at_kill) {
        let r = s.rec.lock();
        let _ = write!(out, "{}", s.openid);
        if let Some((snap, track)) = k {
            let _ = write!(out, " rtt={:.1}", snap.rtt_ns as f64 / 1e6);
            if let Some(t) = track {
                let _ = write!(
                    out,
                    " rtt_max={:.1} heard@{:.0}",
                    t.max_rtt_ns as f64 / 1e6,
                    rel(t.last_rx_ns)
                );
            }
        }
        for l in r.losses.iter().filter(|l| **l > t_kill) {
            let _ = write!(out, " lost@{:.0}", rel(*l));
        }
        let mut events: Vec<(u64, String)> = r
            .failures
            .iter()
            .filter(|(t, _)| *t > t_kill)
            .map(|(t, why)| {
                let (node, text) = why.split_once(": ").unwrap_or(("?", why));
                let node = node.parse().map_or_else(|_| node.to_string(), |a| name(&a));
                (*t, format!("fail@{:.0}:{node}:{text}", rel(*t)))
            })
            .collect();
        events.extend(r.starts.iter().filter(|st| st.t_ns > t_kill).map(|st| {
            (
                st.t_ns,
                format!(
                    "start@{:.0}:{}:{:?}:attempt@{:.0}:handshake={:.0}",
                    rel(st.t_ns),
                    name(&st.addr),
                    st.status,
                    rel(st.attempt_ns),
                    (st.connected_ns as f64 - st.attempt_ns as f64) / 1e6
                ),
            )
        }));
        events.sort();
        for (_, e) in events {
            let _ = write!(out, " {e}");
        }
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// A session started during (b): (spawn ns, start latency ns if it started, request ok,
/// Start attempts that failed before it started: the client retries by itself, so a session
/// that started on a later attempt hid a failure of the cluster).
type NewSession = (u64, Option<u64>, bool, u64);

/// Part (b). Returns named fields.
async fn leader_kill(
    o: &Opts,
    c: &mut Cluster,
    cfg: &Arc<SessionConfig>,
    sessions: &[Session],
) -> Result<Vec<(String, f64)>> {
    let steady = if o.tiny {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(3)
    };
    let requesters = sessions.len().clamp(1, 32);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // (send ns, latency ns, ok)
    let samples: Arc<Mutex<Vec<(u64, u64, bool)>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    progress(format!(
        "failover (b): {requesters} sessions sending requests, new sessions every 100 ms"
    ));
    let sessions_arc: Vec<_> = sessions.iter().take(requesters).collect();
    let survivors: Vec<SocketAddr> = c
        .dp_quic
        .iter()
        .zip(&c.dps)
        .filter(|(_, p)| p.is_some())
        .map(|(a, _)| *a)
        .collect();
    // New sessions: (spawn ns, start latency ns or none, request ok)
    let churn: Arc<Mutex<Vec<NewSession>>> = Arc::default();
    // Why new sessions' Start attempts failed: (spawn ns, failure ns, reason).
    let churn_why: Arc<Mutex<Vec<(u64, u64, String)>>> = Arc::default();
    let dp_before = evidence::takeover_counts(&c.dp_metrics).await;
    let churn_task = {
        let churn = churn.clone();
        let churn_why = churn_why.clone();
        let stop = stop_rx.clone();
        let cfg = Arc::new(SessionConfig {
            net: cfg.net.clone(),
            quic: cfg.quic.clone(),
            endpoints: Endpoints::Fixed(Arc::new(survivors.clone())),
            // The SDK's connect timeout, as part (a)'s clients (since session 15; sessions 4
            // to 14 gave up after max(2 x --detect, 5 s), less than a control-plane election
            // with the shipped timings, ~5 s: a Start the data plane held through the
            // election until the new leader committed its claim counted as failed).
            connect_timeout: CONNECT_TIMEOUT,
        });
        tokio::spawn(async move {
            let mut j = 0usize;
            let mut tasks = Vec::new();
            while !*stop.borrow() {
                let cfg = cfg.clone();
                let churn = churn.clone();
                let churn_why = churn_why.clone();
                tasks.push(tokio::spawn(async move {
                    let t0 = now_ns();
                    let s = Session::spawn(cfg, format!("churn-{j}"), j, j);
                    let until = Instant::now() + Duration::from_secs(10);
                    while !s.started() && Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let (started, failed_attempts) = {
                        let r = s.rec.lock();
                        churn_why
                            .lock()
                            .extend(r.failures.iter().map(|(t, why)| (t0, *t, why.clone())));
                        (r.starts.first().map(|st| st.t_ns - t0), r.failed_attempts)
                    };
                    let ok = started.is_some()
                        && s.request(1, b"echo new".to_vec(), Duration::from_secs(5))
                            .await
                            .is_ok();
                    churn.lock().push((t0, started, ok, failed_attempts));
                    s.join().await;
                }));
                j += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    };
    let run = async {
        let loops = sessions_arc.iter().enumerate().map(|(i, s)| {
            let samples = samples.clone();
            let failures = failures.clone();
            let stop = stop_rx.clone();
            async move {
                let mut j = 0u64;
                while !*stop.borrow() {
                    let t0 = now_ns();
                    let r = s
                        .request(
                            1,
                            format!("echo r{i}-{j}").into_bytes(),
                            Duration::from_secs(5),
                        )
                        .await;
                    let ok = r.is_ok();
                    if let Err(e) = r {
                        failures.lock().push(format!("{}: {e}", s.openid));
                    }
                    samples.lock().push((t0, now_ns() - t0, ok));
                    j += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        futures::future::join_all(loops).await;
    };
    let control = async {
        tokio::time::sleep(steady).await;
        let admins = c.live_admins();
        let (old, old_term) = leader_of(&admins)
            .await
            .context("no leader before the kill")?;
        progress(format!(
            "failover (b): kill -9 control-plane leader cp-{old}"
        ));
        let t_kill = now_ns();
        let idx = c.cps.iter().position(|x| x.0 == old).context("leader")?;
        drop(c.cps[idx].3.take());
        let admins = c.live_admins();
        let deadline = Instant::now() + Duration::from_secs(30);
        let (new, term, t_new) = loop {
            if let Some((id, term)) = leader_of(&admins).await
                && term > old_term
            {
                break (id, term, now_ns());
            }
            anyhow::ensure!(Instant::now() < deadline, "no new leader within 30 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        progress(format!(
            "failover (b): cp-{new} leads (term {term}) after {:.0} ms",
            ms(t_new - t_kill)
        ));
        tokio::time::sleep(steady).await;
        let _ = stop_tx.send(true);
        anyhow::Ok((t_kill, t_new, old, new))
    };
    let (_, ctl) = tokio::join!(run, control);
    let (t_kill, t_new, _old, _new) = match ctl {
        Ok(v) => v,
        Err(e) => {
            let _ = stop_tx.send(true);
            let _ = churn_task.await;
            return Err(e);
        }
    };
    let _ = churn_task.await;
    let dp_after = evidence::takeover_counts(&c.dp_metrics).await;
    // during: from the kill until a new leader is known; after: from then on.
    let during_end = t_new;
    let samples = samples.lock().clone();
    let phase = |from: u64, to: u64| -> (Vec<f64>, usize, usize) {
        let v: Vec<&(u64, u64, bool)> =
            samples.iter().filter(|s| s.0 >= from && s.0 < to).collect();
        let lat = v.iter().filter(|s| s.2).map(|s| ms(s.1)).collect();
        (lat, v.len(), v.iter().filter(|s| !s.2).count())
    };
    let (before, nb, fb) = phase(0, t_kill);
    let (during, nd, fd) = phase(t_kill, during_end);
    let (after, na, fa) = phase(during_end, u64::MAX);
    let churn = churn.lock().clone();
    // A new session failed if it never started, its first request failed, or it started
    // only after failed attempts (the client's own retries would hide those).
    let churn_fail = churn.iter().filter(|c| !c.2 || c.3 > 0).count();
    let churn_failed_attempts: u64 = churn.iter().map(|c| c.3).sum();
    let churn_during: Vec<f64> = churn
        .iter()
        .filter(|c| c.0 >= t_kill && c.0 < during_end)
        .filter_map(|c| c.1.map(ms))
        .collect();
    let churn_before: Vec<f64> = churn
        .iter()
        .filter(|c| c.0 < t_kill)
        .filter_map(|c| c.1.map(ms))
        .collect();
    for f in failures.lock().iter().take(5) {
        progress(format!("failover (b): failed request: {f}"));
    }
    // Why new sessions' Start attempts failed, by reason (the node's address left out), and
    // when, in ms from the kill (the new session's spawn, then the failure).
    let why = churn_why.lock().clone();
    let mut by_reason: std::collections::BTreeMap<String, usize> = Default::default();
    for (_, _, w) in &why {
        let reason = w.split_once(": ").map_or(w.as_str(), |(_, r)| r);
        *by_reason.entry(reason.to_string()).or_default() += 1;
    }
    for (reason, n) in &by_reason {
        progress(format!("failover (b): {n} failed Start attempts: {reason}"));
    }
    if let Some(path) = std::env::var_os("GATE_BENCH_FAILOVER_TRACE") {
        use std::fmt::Write as _;
        let rel = |t: u64| (t as f64 - t_kill as f64) / 1e6;
        let mut out = format!("new leader@{:.0}\n", rel(t_new));
        for (t0, started, ok, _) in &churn {
            let _ = write!(out, "churn spawned@{:.0}", rel(*t0));
            for (_, t, w) in why.iter().filter(|(s, _, _)| s == t0) {
                let _ = write!(out, " fail@{:.0}:{w}", rel(*t));
            }
            match started {
                Some(d) => {
                    let _ = write!(out, " start@{:.0}", rel(t0 + d));
                }
                None => out.push_str(" never-started"),
            }
            let _ = writeln!(out, " request_ok={ok}");
        }
        let mut p = std::path::PathBuf::from(path);
        p.set_extension("b");
        std::fs::write(&p, out).with_context(|| format!("writing {}", p.display()))?;
    }
    // What the data planes did with Starts across the leader kill: provisional sessions (no
    // claim), refused claims (DRAINING), claims retried (absent from builds before session 15).
    let dp = |key: &str| evidence::grown(&dp_before, &dp_after, key).unwrap_or(0.0);
    Ok(vec![
        (
            "cp_dp_provisional_sessions".into(),
            dp("provisional_started"),
        ),
        ("cp_dp_claims_refused".into(), dp("rejected_claim_refused")),
        ("cp_dp_claim_retries".into(), dp("claim_retries")),
        ("cp_new_leader_ms".into(), ms(t_new - t_kill)),
        ("cp_requests".into(), (nb + nd + na) as f64),
        ("cp_failed_requests".into(), (fb + fd + fa) as f64),
        ("cp_failed_requests_during".into(), fd as f64),
        ("cp_req_p99_before_ms".into(), pct_ms(&before, 99.0)),
        ("cp_req_p99_during_ms".into(), pct_ms(&during, 99.0)),
        ("cp_req_p99_after_ms".into(), pct_ms(&after, 99.0)),
        ("cp_req_p50_during_ms".into(), pct_ms(&during, 50.0)),
        ("cp_new_sessions".into(), churn.len() as f64),
        ("cp_new_session_failures".into(), churn_fail as f64),
        (
            "cp_new_session_failed_attempts".into(),
            churn_failed_attempts as f64,
        ),
        ("cp_start_p99_before_ms".into(), pct_ms(&churn_before, 99.0)),
        ("cp_start_p99_during_ms".into(), pct_ms(&churn_during, 99.0)),
        (
            "cp_start_max_during_ms".into(),
            pct_ms(&churn_during, 100.0),
        ),
    ])
}
