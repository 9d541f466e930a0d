//! scale: session ownership at the scale of many sessions (issue 13, "Done means"). Real
//! processes on disk: a 3-node control plane (one `gate-bench serve cp-node` process per raft
//! node, durable, production raft timings, plaintext gRPC on loopback as in `failover`).
//! Simulated data-plane nodes are the data plane's own control-plane client
//! (`gatesvr_dataplane::cluster::Cluster`: registration, leases, watch, batched claims and
//! batched releases), several in this process.
//!
//! 1. `--live` sessions are claimed and kept (the live state).
//! 2. `--lifecycles` sessions are claimed and, once claimed, released (`release_later`, as a
//!    session that ends); then the control plane's owner count is awaited back at `--live`.
//! 3. Steady churn (claim + release) for `--churn`.
//! 4. A new data-plane node (a fresh `Cluster`) watches: time until its view is complete, and
//!    the bytes of that snapshot on the wire (a raw Watch, prost-encoded sizes).
//! 5. A backup of `--restore-owners` owners (built with `backup::encode`) is restored through
//!    the admin API (`POST /v1/cluster/restore`), then exported again; a new node then watches
//!    that state.
//!
//! Reported at each step: each control-plane member's RSS (VmRSS of its process) and the
//! snapshot size (the JSON state payload that a raft snapshot and a backup both carry,
//! measured as the backup's `payload_bytes`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gatesvr_controlplane::backup;
use gatesvr_controlplane::state::{NodeRec, NodeStatus, OwnerRec, State};
use gatesvr_dataplane::cluster::{Cluster as DpCluster, ControlPlaneClientConfig};
use gatesvr_proto::control::control_plane_client::ControlPlaneClient;
use gatesvr_proto::control::watch_event::Event as WatchBody;
use gatesvr_proto::control::{WatchEvent, WatchRequest};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::Opts;
use super::failover::{ADMIN_TOKEN, leader_of};
use crate::report::{Check, Cmp, Report};
use crate::util::{Lat, ServerProc, free_port, progress};

#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    /// Session lifecycles (claim, then release) driven through the control plane.
    #[arg(long, default_value_t = 1_000_000)]
    pub lifecycles: u64,
    /// Sessions claimed first and kept for the whole run (the live state).
    #[arg(long, default_value_t = 10_000)]
    pub live: u64,
    /// Simulated data-plane nodes (each the data plane's own control-plane client).
    #[arg(long, default_value_t = 4)]
    pub dp_nodes: usize,
    /// Concurrent Starts across the simulated nodes.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Steady churn (claim + release) after the lifecycles.
    #[arg(long, default_value = "120s", value_parser = crate::humantime_dur)]
    pub churn: Duration,
    /// Raft heartbeat of the control plane, which openraft also uses as the AppendEntries
    /// timeout: a 10,000-owner restore entry must replicate (and be fsynced) within it
    /// (product default 250ms).
    #[arg(long, default_value = "250ms", value_parser = crate::humantime_dur)]
    pub raft_heartbeat: Duration,
    /// Owners in the backup that is restored and exported (0: skip).
    #[arg(long, default_value_t = 1_000_000)]
    pub restore_owners: u64,
}

struct Cp {
    id: u64,
    admin: SocketAddr,
    grpc: SocketAddr,
    proc: ServerProc,
}

fn rss_bytes(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb * 1024.0)
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// One HTTP/1.1 request to an admin API (bearer token, `Connection: close`): status, body.
async fn admin(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let pos = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header")?;
    let status_line = String::from_utf8_lossy(&out[..pos]).to_string();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    Ok((status, out[pos + 4..].to_vec()))
}

async fn leader_admin(cps: &[Cp]) -> Result<SocketAddr> {
    let admins: Vec<(u64, SocketAddr)> = cps.iter().map(|c| (c.id, c.admin)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((l, _)) = leader_of(&admins).await {
            return Ok(cps.iter().find(|c| c.id == l).context("leader")?.admin);
        }
        anyhow::ensure!(Instant::now() < deadline, "no control-plane leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A backup export: (time, file bytes, decoded backup).
async fn export(cps: &[Cp]) -> Result<(Duration, usize, backup::Backup)> {
    let addr = leader_admin(cps).await?;
    let t0 = Instant::now();
    let (status, body) = admin(addr, "POST", "/v1/cluster/backup", b"").await?;
    let took = t0.elapsed();
    if status != 200 {
        bail!(
            "backup export: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let b = backup::decode(&body).map_err(|e| anyhow::anyhow!("backup decode: {e}"))?;
    Ok((took, body.len(), b))
}

/// RSS and snapshot size of the control plane now, as fields `<tag>_...`.
async fn measure(rep: &mut Report, cps: &[Cp], dir: &Path, tag: &str) -> Result<usize> {
    let (took, _, b) = export(cps).await?;
    let owners = b.state.owners.len();
    rep.field(&format!("{tag}_owners"), owners as f64);
    rep.field(
        &format!("{tag}_snapshot_bytes"),
        b.header.payload_bytes as f64,
    );
    rep.field(&format!("{tag}_export_ms"), took.as_secs_f64() * 1e3);
    let mut max_rss: f64 = 0.0;
    for c in cps {
        let rss = rss_bytes(c.proc.child.id());
        rep.field(&format!("{tag}_cp{}_rss_mib", c.id), rss / 1048576.0);
        max_rss = max_rss.max(rss);
    }
    rep.field(&format!("{tag}_cp_rss_max_mib"), max_rss / 1048576.0);
    let disk: u64 = cps
        .iter()
        .map(|c| dir_bytes(&dir.join(format!("cp-{}", c.id))))
        .sum::<u64>()
        / cps.len() as u64;
    rep.field(&format!("{tag}_cp_disk_mib"), disk as f64 / 1048576.0);
    progress(format!(
        "scale: {tag}: {owners} owners, snapshot {} B, cp RSS max {:.0} MiB",
        b.header.payload_bytes,
        max_rss / 1048576.0
    ));
    Ok(owners)
}

fn dp_config(cps: &[Cp]) -> ControlPlaneClientConfig {
    ControlPlaneClientConfig {
        endpoints: cps.iter().map(|c| c.grpc.to_string()).collect(),
        insecure: true,
        rpc_timeout: Duration::from_secs(10),
        lease_ttl: Duration::from_secs(30),
        ..ControlPlaneClientConfig::default()
    }
}

async fn start_dp(cps: &[Cp], id: &str) -> Result<(Arc<DpCluster>, CancellationToken)> {
    let dp = Arc::new(
        DpCluster::new(
            dp_config(cps),
            id.into(),
            "127.0.0.1:1".into(),
            "127.0.0.1:2".into(),
            None,
        )
        .map_err(|e| anyhow::anyhow!(e))?,
    );
    let stop = CancellationToken::new();
    tokio::spawn(dp.clone().run(stop.clone()));
    Ok((dp, stop))
}

/// Claims (and, with `release`, then releases) `ids` from the simulated nodes; returns the
/// claim latencies and the errors.
struct Drive {
    next: AtomicU64,
    end_id: u64,
    deadline: Option<Instant>,
    errors: AtomicU64,
    done: AtomicU64,
}

async fn drive(
    dps: &[Arc<DpCluster>],
    concurrency: usize,
    prefix: &'static str,
    release: bool,
    d: Arc<Drive>,
) -> Lat {
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let dp = dps[w % dps.len()].clone();
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Lat::default();
            loop {
                if d.deadline.is_some_and(|t| Instant::now() >= t) {
                    break;
                }
                let i = d.next.fetch_add(1, Ordering::Relaxed);
                if i >= d.end_id {
                    break;
                }
                let openid = format!("{prefix}-{i}");
                let sid = format!("s{i}");
                let t0 = Instant::now();
                match dp.claim(&openid, &sid, "").await {
                    Ok(c) => {
                        lat.0.push(t0.elapsed().as_nanos() as u64);
                        if release {
                            dp.release_later(&openid, &sid, c.epoch);
                        }
                        d.done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        d.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut all = Lat::default();
    for t in tasks {
        if let Ok(l) = t.await {
            all.merge(l);
        }
    }
    all
}

/// A raw Watch from scratch as a new node would open it (`scoped`, as the data plane does; or
/// unscoped, every owner, as before issue 13's scoped watch): (time to the whole snapshot,
/// bytes of its messages, owners in it).
async fn raw_watch(cps: &[Cp], node_id: &str, scoped: bool) -> Result<(Duration, u64, usize)> {
    let t0 = Instant::now();
    let mut client = ControlPlaneClient::connect(format!("http://{}", cps[0].grpc))
        .await?
        .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES);
    let mut stream = client
        .watch(WatchRequest {
            from_version: 0,
            node_id: node_id.into(),
            chunked_snapshot: true,
            scoped,
        })
        .await?
        .into_inner();
    let (mut bytes, mut owners) = (0u64, 0usize);
    while let Some(ev) = stream.message().await? {
        let ev: WatchEvent = ev;
        bytes += ev.encoded_len() as u64;
        match ev.event {
            Some(WatchBody::Snapshot(s)) => {
                owners += s.owners.len();
                if !s.more {
                    return Ok((t0.elapsed(), bytes, owners));
                }
            }
            Some(WatchBody::SnapshotMore(m)) => {
                owners += m.owners.len();
                if !m.more {
                    return Ok((t0.elapsed(), bytes, owners));
                }
            }
            _ => {}
        }
    }
    bail!("the watch ended before its snapshot was whole")
}

/// A new data-plane node (the real client): time until its view is complete, its owners.
async fn new_node_ready(cps: &[Cp], id: &str) -> Result<(Duration, usize)> {
    let t0 = Instant::now();
    let (dp, stop) = start_dp(cps, id).await?;
    let deadline = t0 + Duration::from_secs(600);
    while !dp.is_view_complete() {
        anyhow::ensure!(Instant::now() < deadline, "{id} never had a complete view");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = t0.elapsed();
    let owners = dp.view().owners.len();
    stop.cancel();
    Ok((took, owners))
}

async fn ready_fields(rep: &mut Report, cps: &[Cp], tag: &str) -> Result<()> {
    let (t, owners) = new_node_ready(cps, &format!("dp-new-{tag}")).await?;
    rep.field(&format!("{tag}_new_node_ready_ms"), t.as_secs_f64() * 1e3);
    rep.field(&format!("{tag}_new_node_view_owners"), owners as f64);
    let (rt, bytes, raw_owners) = raw_watch(cps, &format!("dp-raw-{tag}"), false).await?;
    rep.field(&format!("{tag}_watch_snapshot_ms"), rt.as_secs_f64() * 1e3);
    rep.field(&format!("{tag}_watch_snapshot_bytes"), bytes as f64);
    rep.field(&format!("{tag}_watch_snapshot_owners"), raw_owners as f64);
    // What a new node really receives: the scoped snapshot (nodes, upstreams, its own owners).
    let (_, scoped_bytes, _) = raw_watch(cps, &format!("dp-raw-{tag}"), true).await?;
    rep.field(
        &format!("{tag}_scoped_watch_snapshot_bytes"),
        scoped_bytes as f64,
    );
    progress(format!(
        "scale: {tag}: a new node is ready in {:.0} ms ({owners} owners); raw snapshot {bytes} B, scoped {scoped_bytes} B",
        t.as_secs_f64() * 1e3
    ));
    Ok(())
}

/// Waits until the control plane holds `want` owners (releases are sent asynchronously).
async fn wait_owners(cps: &[Cp], want: usize) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        let (_, _, b) = export(cps).await?;
        let n = b.state.owners.len();
        if n <= want {
            return Ok(t0.elapsed());
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "owners stayed at {n}, expected {want} after the releases"
        );
        progress(format!("scale: {n} owners, waiting for {want}"));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// A backup file holding `n` owners on one (re-stamped, long-lease) node.
fn synthetic_backup(n: u64) -> Result<Vec<u8>> {
    let node = "dp-restored";
    let mut state = State::default();
    state.nodes.insert(
        node.into(),
        NodeRec {
            node_id: node.into(),
            quic_addr: "127.0.0.1:1".into(),
            grpc_addr: "127.0.0.1:1".into(),
            status: NodeStatus::Active,
            lease_expires_at_ms: 0,
            lease_ttl_ms: 24 * 3600 * 1000,
            drain_requested: false,
            sessions: n,
            cordoned: false,
            draining_reported: false,
            registered_at_ms: 0,
        },
    );
    for i in 0..n {
        state.owners.insert(
            format!("restored-user-{i:08}"),
            OwnerRec {
                session_id: format!("session-{i:08}"),
                owner_node: node.into(),
                epoch: i + 1,
                changed_at_ms: 0,
                fresh_session_id: String::new(),
            },
        );
    }
    state.last_epoch = n;
    state.version = 1;
    let source = backup::Source {
        created_at_ms: 0,
        served_by: 1,
        leader: Some(1),
        last_applied: None,
        membership: Default::default(),
    };
    Ok(backup::encode(source, &state)?)
}

pub async fn run(o: &Opts, a: &ScaleArgs) -> Result<Report> {
    let mut rep = Report::new("scale");
    rep.param("lifecycles", a.lifecycles);
    rep.param("live_sessions", a.live);
    rep.param("simulated_dp_nodes", a.dp_nodes);
    rep.param("concurrency", a.concurrency);
    rep.param("churn_s", a.churn.as_secs_f64());
    rep.param("restore_owners", a.restore_owners);
    rep.param("controlplane_nodes", 3);
    rep.param("raft_heartbeat_ms", a.raft_heartbeat.as_millis() as u64);
    rep.param(
        "build",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    );
    let rundir = o.rundir()?;
    let dir = rundir.path().to_path_buf();
    rep.param("disk_dir", dir.display().to_string());

    progress("scale: starting a 3-node control plane (3 processes)");
    let mut addrs = Vec::new();
    for id in 1..=3u64 {
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        addrs.push((id, admin, grpc));
    }
    let members: Vec<String> = addrs
        .iter()
        .map(|(id, admin, grpc)| format!("{id}={grpc}={admin}"))
        .collect();
    let mut cps = Vec::new();
    for (id, admin, grpc) in addrs {
        let proc = ServerProc::spawn(
            &format!("cp-{id}"),
            &[
                "cp-node".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--id".into(),
                id.to_string(),
                "--member".into(),
                members.join(","),
                // A restore entry can take longer than the product's 5 s
                // on a loaded machine (debug build); the figure is measured either way.
                "--write-timeout".into(),
                "60s".into(),
                "--heartbeat".into(),
                format!("{}ms", a.raft_heartbeat.as_millis()),
            ],
            o.server_cpu(),
        )?;
        cps.push(Cp {
            id,
            admin,
            grpc,
            proc,
        });
    }
    leader_admin(&cps).await?;
    measure(&mut rep, &cps, &dir, "empty").await?;

    let mut dps = Vec::new();
    let mut stops = Vec::new();
    for i in 0..a.dp_nodes.max(1) {
        let (dp, stop) = start_dp(&cps, &format!("dp-scale-{i}")).await?;
        dps.push(dp);
        stops.push(stop);
    }
    let t0 = Instant::now();
    while !dps.iter().all(|d| d.is_connected()) {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "simulated nodes did not register"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 1. Live sessions.
    progress(format!("scale: claiming {} live sessions", a.live));
    let live = Arc::new(Drive {
        next: AtomicU64::new(0),
        end_id: a.live,
        deadline: None,
        errors: AtomicU64::new(0),
        done: AtomicU64::new(0),
    });
    drive(&dps, a.concurrency, "live", false, live.clone()).await;
    let live_n = live.done.load(Ordering::Relaxed) as usize;
    rep.field(
        "live_claim_errors",
        live.errors.load(Ordering::Relaxed) as f64,
    );
    measure(&mut rep, &cps, &dir, "live").await?;

    // 2. Lifecycles.
    progress(format!(
        "scale: {} lifecycles (claim, release)",
        a.lifecycles
    ));
    let lc = Arc::new(Drive {
        next: AtomicU64::new(0),
        end_id: a.lifecycles,
        deadline: None,
        errors: AtomicU64::new(0),
        done: AtomicU64::new(0),
    });
    let reporter = {
        let lc = lc.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                progress(format!(
                    "scale: {} lifecycles done",
                    lc.done.load(Ordering::Relaxed)
                ));
            }
        })
    };
    let t0 = Instant::now();
    let mut lat = drive(&dps, a.concurrency, "user", true, lc.clone()).await;
    let claims_took = t0.elapsed();
    let drain = wait_owners(&cps, live_n).await?;
    let took = t0.elapsed();
    reporter.abort();
    let done = lc.done.load(Ordering::Relaxed);
    rep.field("lifecycles_done", done as f64);
    rep.field("lifecycle_errors", lc.errors.load(Ordering::Relaxed) as f64);
    rep.field("lifecycles_s", took.as_secs_f64());
    rep.field("lifecycles_per_s", done as f64 / took.as_secs_f64());
    rep.field(
        "lifecycle_claims_per_s",
        done as f64 / claims_took.as_secs_f64(),
    );
    rep.field("release_drain_s", drain.as_secs_f64());
    rep.field("lifecycle_claim_p50_ms", lat.pct_us(50.0) / 1e3);
    rep.field("lifecycle_claim_p99_ms", lat.pct_us(99.0) / 1e3);
    let after = measure(&mut rep, &cps, &dir, "after_lifecycles").await?;

    // 3. Churn.
    progress(format!("scale: churn for {:?}", a.churn));
    let churn = Arc::new(Drive {
        next: AtomicU64::new(0),
        end_id: u64::MAX,
        deadline: Some(Instant::now() + a.churn),
        errors: AtomicU64::new(0),
        done: AtomicU64::new(0),
    });
    let t0 = Instant::now();
    let mut clat = drive(&dps, a.concurrency, "churn", true, churn.clone()).await;
    let ct = t0.elapsed();
    let cdone = churn.done.load(Ordering::Relaxed);
    wait_owners(&cps, live_n).await?;
    rep.field("churn_lifecycles", cdone as f64);
    rep.field("churn_per_s", cdone as f64 / ct.as_secs_f64());
    rep.field("churn_errors", churn.errors.load(Ordering::Relaxed) as f64);
    rep.field("churn_claim_p99_ms", clat.pct_us(99.0) / 1e3);
    measure(&mut rep, &cps, &dir, "after_churn").await?;
    ready_fields(&mut rep, &cps, "live").await?;

    // 5. Backup restore and export of a large state. The simulated nodes stop first (their
    // views would hold every restored owner too).
    for s in &stops {
        s.cancel();
    }
    drop(dps);
    if a.restore_owners > 0 {
        progress(format!(
            "scale: restoring a backup of {} owners",
            a.restore_owners
        ));
        let file = tokio::task::spawn_blocking({
            let n = a.restore_owners;
            move || synthetic_backup(n)
        })
        .await??;
        rep.field("restore_file_bytes", file.len() as f64);
        // A restore cut short is completed by running it again (docs/operations.md).
        let t0 = Instant::now();
        let mut attempts = 0;
        let body = loop {
            attempts += 1;
            let addr = leader_admin(&cps).await?;
            let (status, body) = admin(addr, "POST", "/v1/cluster/restore", &file).await?;
            if status == 200 {
                break body;
            }
            progress(format!(
                "scale: restore attempt {attempts}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            ));
            anyhow::ensure!(attempts < 5, "restore failed {attempts} times");
        };
        let rt = t0.elapsed();
        rep.field("restore_attempts", attempts as f64);
        let reply: serde_json::Value = serde_json::from_slice(&body)?;
        rep.field("restore_ms", rt.as_secs_f64() * 1e3);
        rep.field(
            "restore_reply_owners",
            reply["owners"].as_f64().unwrap_or_default(),
        );
        drop(file);
        let (et, ebytes, _) = export(&cps).await?;
        rep.field("restored_export_ms", et.as_secs_f64() * 1e3);
        rep.field("restored_export_bytes", ebytes as f64);
        measure(&mut rep, &cps, &dir, "restored").await?;
        ready_fields(&mut rep, &cps, "restored").await?;
    }

    let f = rep.fields.clone();
    let g = |k: &str| f.get(k).copied().unwrap_or_default();
    rep.checks.push(Check::absolute(
        "owners after N lifecycles = live sessions",
        after as f64,
        Cmp::AtMost,
        live_n as f64,
        "",
    ));
    rep.checks.push(Check::absolute(
        "lifecycle + churn claim errors",
        g("lifecycle_errors") + g("churn_errors") + g("live_claim_errors"),
        Cmp::AtMost,
        0.0,
        "",
    ));
    let mut c = Check::ratio(
        "snapshot after N lifecycles vs with live sessions only",
        g("after_lifecycles_snapshot_bytes"),
        g("live_snapshot_bytes"),
        Cmp::AtMost,
        1.1,
    );
    c.goal = "<= 1.1x (bounded by live sessions)".into();
    rep.checks.push(c);
    if a.restore_owners > 0 {
        rep.checks.push(Check::absolute(
            "restored owners",
            g("restored_owners"),
            Cmp::AtLeast,
            a.restore_owners as f64,
            "",
        ));
    }
    for c in cps {
        drop(c.proc);
    }
    Ok(rep)
}
