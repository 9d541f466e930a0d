//! claims: session-ownership claims committed by a 3-node control plane (openraft + raft-log, every
//! log append flushed), from `clients` concurrent Starts on one data plane's control-plane client
//! (`gatesvr_dataplane::cluster::Cluster::claim`, which batches a burst into one ClaimSessions
//! call; `claims_per_call` reports how many it carried); claims/s and per-claim latency. Baselines on the same disk: a batched write + fdatasync loop (one batch per
//! `clients` records), and, when the `etcd` binary is installed (Debian `etcd-server`), a
//! 3-member etcd on this machine with the same number of clients (puts over its JSON gateway).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use gatesvr_controlplane::config::AuthMode;
use gatesvr_controlplane::{Cmd, ControlPlane, ControlPlaneConfig, Member};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Opts;
use crate::report::{Check, Cmp, Report, Round};
use crate::util::{Lat, free_port, progress};

pub const DP_NODE: &str = "dp-bench";

/// An in-process control-plane cluster (run by `gate-bench serve controlplane`).
pub struct Cluster {
    nodes: Vec<ControlPlane>,
    leader: u64,
}

fn config(dir: &Path, id: u64) -> ControlPlaneConfig {
    let mut cfg = ControlPlaneConfig {
        node_id: id,
        data_dir: dir.join(format!("cp-{id}")),
        grpc_addr: "127.0.0.1:0".parse().expect("literal"),
        admin_addr: "127.0.0.1:0".parse().expect("literal"),
        ..ControlPlaneConfig::default()
    }
    .fast_timings();
    cfg.tls.insecure = true;
    cfg.admin.auth = AuthMode::Tokens;
    cfg.admin.admin_token = Some("bench-admin".into());
    cfg.admin.insecure_plaintext_http = true;
    cfg.leases.max_ttl = Duration::from_secs(24 * 3600);
    // Tuning sweeps without a rebuild (the product's defaults otherwise).
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = env("GATE_BENCH_CP_BATCH_IN_FLIGHT") {
        cfg.batch.in_flight = n as usize;
    }
    if let Some(us) = env("GATE_BENCH_CP_BATCH_LINGER_US") {
        cfg.batch.linger = Duration::from_micros(us);
    }
    if let Some(n) = env("GATE_BENCH_CP_SNAPSHOT_EVERY") {
        cfg.raft.snapshot_every = n;
    }
    if let Some(n) = env("GATE_BENCH_CP_MAX_PAYLOAD_ENTRIES") {
        cfg.raft.max_payload_entries = n;
    }
    // The heartbeat (with the election timeouts in the same proportion as `fast_timings`).
    if let Some(ms) = env("GATE_BENCH_CP_HEARTBEAT_MS") {
        cfg.raft.heartbeat_interval = Duration::from_millis(ms);
        cfg.raft.election_timeout_min = Duration::from_millis(ms * 4);
        cfg.raft.election_timeout_max = Duration::from_millis(ms * 8);
    }
    cfg
}

async fn wait_leader(nodes: &[ControlPlane]) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen: Vec<Option<u64>> = nodes
            .iter()
            .map(|n| n.node().leader().map(|(id, _)| id))
            .collect();
        if let Some(Some(l)) = seen.first()
            && seen.iter().all(|s| *s == Some(*l))
            && nodes
                .iter()
                .any(|n| n.node().id() == *l && n.node().is_leader())
        {
            return Ok(*l);
        }
        if Instant::now() > deadline {
            bail!("no leader elected");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn start_cluster(dir: &Path, n: u64) -> Result<Cluster> {
    let mut cfg = config(dir, 1);
    cfg.cluster.bootstrap = true;
    let mut nodes = vec![ControlPlane::start(cfg).await?];
    wait_leader(&nodes).await?;
    for id in 2..=n {
        let cp = ControlPlane::start(config(dir, id)).await?;
        let member = Member {
            grpc_addr: cp.grpc_addr().to_string(),
            admin_addr: cp.admin_addr().to_string(),
        };
        nodes.push(cp);
        let first = nodes[0].node().clone();
        first.add_learner(id, member).await?;
        first.promote(id).await?;
    }
    let leader = wait_leader(&nodes).await?;
    let lnode = nodes
        .iter()
        .find(|n| n.node().id() == leader)
        .context("leader")?;
    lnode
        .node()
        .write(vec![Cmd::RegisterNode {
            node_id: DP_NODE.into(),
            quic_addr: "127.0.0.1:1".into(),
            grpc_addr: "127.0.0.1:1".into(),
            lease_ttl_ms: 24 * 3600 * 1000,
        }])
        .await?;
    Ok(Cluster { nodes, leader })
}

impl Cluster {
    pub fn info(&self) -> serde_json::Value {
        let leader = self.nodes.iter().find(|n| n.node().id() == self.leader);
        serde_json::json!({
            "grpc": leader.map(|n| n.grpc_addr().to_string()),
            "leader": self.leader,
            "nodes": self.nodes.iter().map(|n| n.grpc_addr().to_string()).collect::<Vec<_>>(),
        })
    }
    pub async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

/// The data plane's own control-plane client, registered with the control plane at `addr`
/// (node `dp-bench-<round>`), its loop running until the returned token is cancelled.
async fn bench_dp(
    addr: SocketAddr,
    name: String,
) -> Result<(
    Arc<gatesvr_dataplane::cluster::Cluster>,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
)> {
    use gatesvr_dataplane::cluster::{Cluster as DpCluster, ControlPlaneClientConfig};
    let mut cfg = ControlPlaneClientConfig {
        endpoints: vec![addr.to_string()],
        insecure: true,
        rpc_timeout: Duration::from_secs(5),
        lease_ttl: Duration::from_secs(30),
        ..ControlPlaneClientConfig::default()
    };
    // The data plane's side of the batching, for sweeps (its default otherwise).
    if let Some(n) = std::env::var("GATE_BENCH_DP_CLAIM_CALLS_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        cfg.claim_calls_in_flight = n;
    }
    let dp = Arc::new(
        DpCluster::new(cfg, name, "127.0.0.1:1".into(), "127.0.0.1:2".into(), None)
            .map_err(|e| anyhow::anyhow!(e))?,
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let runner = tokio::spawn(dp.clone().run(stop.clone()));
    let registered = Instant::now() + Duration::from_secs(30);
    while !dp.is_connected() {
        if Instant::now() > registered {
            bail!("the bench data plane did not register");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((dp, stop, runner))
}

/// Claims as a data plane makes them: `clients` concurrent Starts in a closed loop, each one
/// `Cluster::claim` of the data plane's own control-plane client, which batches the claims of
/// a burst into one `ClaimSessions` call. Returns claims/s, per-claim latency, errors, and the
/// claims per call it sent.
pub async fn claim_load(
    o: &Opts,
    addr: SocketAddr,
    clients: usize,
    round: usize,
) -> Result<(f64, Lat, u64, f64)> {
    let (dp, stop, runner) = bench_dp(addr, format!("{DP_NODE}-{round}")).await?;
    let start = Instant::now();
    let measure_from = start + o.warmup;
    let end = measure_from + o.window;
    let mut counts_at_start = None;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let dp = dp.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut n, mut errors, mut i) = (Lat::default(), 0u64, 0u64, 0u64);
            while Instant::now() < end {
                let id = format!("u-{round}-{c}-{i}");
                i += 1;
                let t0 = Instant::now();
                let r = dp.claim(&id, &format!("s-{id}"), "").await;
                let t1 = Instant::now();
                match r {
                    Ok(_) if t0 >= measure_from && t1 < end => {
                        n += 1;
                        lat.0.push((t1 - t0).as_nanos() as u64);
                    }
                    Ok(_) => {}
                    Err(_) => errors += 1,
                }
            }
            (lat, n, errors)
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    counts_at_start.get_or_insert(dp.claim_counts());
    tokio::time::sleep_until(end.into()).await;
    let counts_at_end = dp.claim_counts();
    let (mut lat, mut n, mut errors) = (Lat::default(), 0, 0);
    for t in tasks {
        let (l, a, e) = t.await?;
        lat.merge(l);
        n += a;
        errors += e;
    }
    stop.cancel();
    let _ = runner.await;
    let (calls0, sent0) = counts_at_start.unwrap_or_default();
    let calls = counts_at_end.0.saturating_sub(calls0).max(1);
    let sent = counts_at_end.1.saturating_sub(sent0);
    Ok((
        n as f64 / o.window.as_secs_f64(),
        lat,
        errors,
        sent as f64 / calls as f64,
    ))
}

/// Claims at a fixed `rate` (open loop: a new Start every `1/rate`, whether or not the earlier
/// ones were answered). Latency runs from the moment a claim was due, so a stalled control
/// plane shows as latency, not as a lower rate (no coordinated omission). Returns the rate
/// achieved in the window, the latency, errors, and claims per call.
pub async fn claim_paced(
    o: &Opts,
    addr: SocketAddr,
    rate: f64,
    round: usize,
) -> Result<(f64, Lat, u64, f64)> {
    let (dp, stop, runner) = bench_dp(addr, format!("{DP_NODE}-paced-{round}")).await?;
    let start = tokio::time::Instant::now();
    let measure_from = start + o.warmup;
    let end = measure_from + o.window;
    let every = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut counts_at_start = None;
    let mut i = 0u64;
    loop {
        let due = start + every.mul_f64(i as f64);
        if due >= end {
            break;
        }
        if due >= measure_from {
            counts_at_start.get_or_insert(dp.claim_counts());
        }
        tokio::time::sleep_until(due).await;
        let dp = dp.clone();
        let id = format!("p-{round}-{i}");
        i += 1;
        tasks.spawn(async move {
            let r = dp.claim(&id, &format!("s-{id}"), "").await;
            let t1 = tokio::time::Instant::now();
            (due, t1, r.is_ok())
        });
    }
    let counts_at_end = dp.claim_counts();
    let (mut lat, mut n, mut errors) = (Lat::default(), 0u64, 0u64);
    while let Some(r) = tasks.join_next().await {
        let (due, t1, ok) = r?;
        if !ok {
            errors += 1;
        } else if due >= measure_from {
            n += 1;
            lat.0.push((t1 - due).as_nanos() as u64);
        }
    }
    stop.cancel();
    let _ = runner.await;
    let (calls0, sent0) = counts_at_start.unwrap_or_default();
    let calls = counts_at_end.0.saturating_sub(calls0).max(1);
    let sent = counts_at_end.1.saturating_sub(sent0);
    Ok((
        n as f64 / o.window.as_secs_f64(),
        lat,
        errors,
        sent as f64 / calls as f64,
    ))
}

/// Batched write + fdatasync: one batch of `batch` 64-byte records per sync.
fn fsync_loop(path: &Path, batch: usize, warmup: Duration, window: Duration) -> Result<(f64, Lat)> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let record = [b'c'; 64];
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + window;
    let (mut n, mut lat) = (0u64, Lat::default());
    let mut buf = Vec::with_capacity(batch * 64);
    while Instant::now() < end {
        buf.clear();
        for _ in 0..batch {
            buf.extend_from_slice(&record);
        }
        let t0 = Instant::now();
        f.write_all(&buf)?;
        f.sync_data()?;
        let t1 = Instant::now();
        if t0 >= measure_from && t1 < end {
            n += batch as u64;
            lat.0.push((t1 - t0).as_nanos() as u64);
        }
    }
    Ok((n as f64 / window.as_secs_f64(), lat))
}

pub struct Etcd {
    procs: Vec<ServerProcLike>,
    pub client_addrs: Vec<SocketAddr>,
}

/// An etcd member (a plain child process; killed on drop).
struct ServerProcLike(std::process::Child);

impl Drop for ServerProcLike {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find_etcd() -> Option<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

pub async fn start_etcd(o: &Opts, bin: &Path, dir: &Path) -> Result<Etcd> {
    let mut peers = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        peers.push(free_port()?);
        clients.push(free_port()?);
    }
    let cluster: Vec<String> = (0..3)
        .map(|i| format!("e{i}=http://127.0.0.1:{}", peers[i]))
        .collect();
    let mut procs = Vec::new();
    for i in 0..3 {
        let mut cmd = match o.server_cpu() {
            Some(cpu) => {
                let mut c = std::process::Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(bin);
                c
            }
            None => std::process::Command::new(bin),
        };
        cmd.arg("--name")
            .arg(format!("e{i}"))
            .arg("--data-dir")
            .arg(dir.join(format!("etcd-{i}")))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", peers[i]))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", peers[i]))
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{}", clients[i]))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{}", clients[i]))
            .arg("--initial-cluster")
            .arg(cluster.join(","))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--log-level")
            .arg("error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        procs.push(ServerProcLike(cmd.spawn().context("starting etcd")?));
    }
    let client_addrs: Vec<SocketAddr> = clients
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let etcd = Etcd {
        procs,
        client_addrs,
    };
    // Ready when a put succeeds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = HttpConn::connect(etcd.client_addrs[0]).await
            && c.put("ready", "1").await.is_ok()
        {
            return Ok(etcd);
        }
        if Instant::now() > deadline {
            bail!("etcd did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keep-alive HTTP/1.1 to etcd's JSON gateway.
struct HttpConn {
    s: tokio::net::TcpStream,
    addr: SocketAddr,
    buf: Vec<u8>,
}

impl HttpConn {
    async fn connect(addr: SocketAddr) -> Result<Self> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self {
            s,
            addr,
            buf: Vec::new(),
        })
    }

    async fn put(&mut self, key: &str, value: &str) -> Result<()> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = format!(
            "{{\"key\":\"{}\",\"value\":\"{}\"}}",
            b64.encode(key),
            b64.encode(value)
        );
        let req = format!(
            "POST /v3/kv/put HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.s.write_all(req.as_bytes()).await?;
        // Read one response (headers + Content-Length body).
        loop {
            if let Some(pos) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..pos]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= pos + 4 + len {
                    self.buf.drain(..pos + 4 + len);
                    if !head.starts_with("HTTP/1.1 200") {
                        bail!("etcd put: {}", head.lines().next().unwrap_or(""));
                    }
                    return Ok(());
                }
            }
            let mut tmp = [0u8; 4096];
            let n = self.s.read(&mut tmp).await?;
            if n == 0 {
                bail!("etcd closed the connection");
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}

/// With `GATESVR_CP_STAGES=<file>` set, the control plane (a child process: it inherits the
/// variable) records per-stage timings of its write path (`gatesvr_controlplane::stages`).
fn stages_file() -> Option<PathBuf> {
    std::env::var_os("GATESVR_CP_STAGES").map(PathBuf::from)
}

/// Restarts the stage timings once the warm-up is over.
fn stages_reset(o: &Opts) {
    if let Some(f) = stages_file() {
        let warmup = o.warmup;
        tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            let _ = std::fs::write(format!("{}.reset", f.display()), b"");
        });
    }
}

/// Adds the stage timings of the phase that just ended to the report's notes.
async fn stages_note(rep: &mut Report, phase: &str) {
    let Some(f) = stages_file() else { return };
    // The control plane rewrites the file once a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let Ok(text) = std::fs::read_to_string(&f) else {
        return;
    };
    let Ok(serde_json::Value::Object(stages)) = serde_json::from_str(&text) else {
        return;
    };
    let mut note = format!("stages ({phase}; µs: n mean p50 p90 p99 max):");
    for (name, v) in stages {
        let g = |k: &str| v[k].as_u64().unwrap_or(0);
        note.push_str(&format!(
            "\n  {name:<28} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
            g("n"),
            g("mean"),
            g("p50"),
            g("p90"),
            g("p99"),
            g("max")
        ));
    }
    rep.notes.push(note);
}

pub async fn run(o: &Opts) -> Result<Report> {
    let mut rep = Report::new("claims");
    // `GATE_BENCH_CLAIM_CLIENTS`: a sweep of the closed loop's size (the fsync loop's batch
    // follows it, so the ratio stays fair).
    let clients = match std::env::var("GATE_BENCH_CLAIM_CLIENTS") {
        Ok(v) => v.parse().context("GATE_BENCH_CLAIM_CLIENTS")?,
        Err(_) if o.tiny => 4,
        Err(_) => 64,
    };
    rep.param("clients", clients);
    rep.param("control_plane_nodes", 3);
    rep.param("rounds", o.rounds);
    rep.param("window_s", o.window.as_secs_f64());
    let dir = o.rundir()?;
    rep.param("disk_dir", dir.path().display().to_string());
    progress("claims: starting a 3-node control plane");
    let cp = o.start_controlplane(&dir)?;
    let leader = cp.addr("grpc")?;
    let etcd = match find_etcd() {
        Some(bin) if !o.tiny => match start_etcd(o, &bin, &dir.path()).await {
            Ok(e) => match crate::peers::claims::leader(&e.client_addrs).await {
                Ok((addr, version)) => {
                    rep.param("etcd", version);
                    Some((e, crate::peers::claims::channel(addr)?))
                }
                Err(err) => {
                    rep.notes.push(format!("etcd baseline skipped: {err:#}"));
                    None
                }
            },
            Err(e) => {
                rep.notes.push(format!("etcd baseline skipped: {e:#}"));
                None
            }
        },
        Some(_) => None,
        None => {
            rep.notes
                .push("etcd baseline skipped: no etcd binary (apt-get install etcd-server)".into());
            None
        }
    };
    let fsync_path = Arc::new(dir.path().join("fsync-baseline.log"));
    for r in 0..o.rounds {
        progress(format!("claims round {}/{}", r + 1, o.rounds));
        let mut round = Round::new();
        let (path, warmup, window) = (fsync_path.clone(), o.warmup, o.window);
        let (fr, mut fl) =
            tokio::task::spawn_blocking(move || fsync_loop(&path, clients, warmup, window))
                .await??;
        round.insert("fsync_records_per_s".into(), fr);
        round.insert("fsync_batch_p99_us".into(), fl.pct_us(99.0));
        round.insert("fsync_batch_p50_us".into(), fl.pct_us(50.0));
        if let Some((_, ch)) = &etcd {
            // Plain puts (no lease) on the leader over gRPC: etcd at its best.
            let (er, mut el, ee) = crate::peers::claims::etcd_load(o, ch, 0, clients, r).await?;
            round.insert("etcd_puts_per_s".into(), er);
            round.insert("etcd_put_p50_us".into(), el.pct_us(50.0));
            round.insert("etcd_put_p99_us".into(), el.pct_us(99.0));
            round.insert("etcd_put_errors".into(), ee as f64);
        }
        stages_reset(o);
        let (cr, mut cl, errors, per_call) = claim_load(o, leader, clients, r).await?;
        stages_note(&mut rep, &format!("round {r}, closed loop")).await;
        round.insert("claims_per_s".into(), cr);
        // As the data plane really sends them: a burst of Starts shares a call.
        round.insert("claims_per_call".into(), per_call);
        round.insert("claim_p50_us".into(), cl.pct_us(50.0));
        round.insert("claim_p99_us".into(), cl.pct_us(99.0));
        round.insert("claim_errors".into(), errors as f64);
        // Half of this round's peak, paced: the latency a control plane with headroom gives.
        stages_reset(o);
        let (hr, mut hl, herrors, hper_call) = claim_paced(o, leader, cr / 2.0, r).await?;
        stages_note(&mut rep, &format!("round {r}, half rate")).await;
        round.insert("half_rate_claims_per_s".into(), hr);
        round.insert("half_rate_claims_per_call".into(), hper_call);
        round.insert("half_rate_claim_p50_us".into(), hl.pct_us(50.0));
        round.insert("half_rate_claim_p99_us".into(), hl.pct_us(99.0));
        round.insert("half_rate_claim_errors".into(), herrors as f64);
        rep.rounds.push(round);
    }
    drop(etcd.map(|(e, _)| e.procs));
    rep.median_all();
    let fields = rep.fields.clone();
    let f = |k: &str| fields[k];
    rep.checks.push(Check::ratio(
        "claims/s vs write+fdatasync records/s (same disk, same run)",
        f("claims_per_s"),
        f("fsync_records_per_s"),
        Cmp::AtLeast,
        0.1,
    ));
    rep.checks.push(Check::absolute(
        "p99 claim latency at half the peak rate (paced)",
        f("half_rate_claim_p99_us") / 1000.0,
        Cmp::AtMost,
        10.0,
        "ms",
    ));
    rep.checks.push(Check::absolute(
        "claim errors",
        f("claim_errors") + f("half_rate_claim_errors"),
        Cmp::AtMost,
        0.0,
        "",
    ));
    if rep.fields.contains_key("etcd_puts_per_s") {
        rep.checks.push(Check::ratio(
            "claims/s vs etcd plain puts/s (3 members, leader, gRPC)",
            f("claims_per_s"),
            f("etcd_puts_per_s"),
            Cmp::AtLeast,
            1.0,
        ));
        let mut c = Check::ratio(
            "claim p99 vs etcd put p99 (both saturated)",
            f("claim_p99_us"),
            f("etcd_put_p99_us"),
            Cmp::AtMost,
            1.0,
        );
        c.goal = "(report)".into();
        c.met = true;
        rep.checks.push(c);
    }
    drop(cp);
    Ok(rep)
}
