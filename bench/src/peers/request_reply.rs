//! Request/response through a middle hop, TLS on the client leg:
//!
//! ```text
//! GateSvr: client --QUIC/TLS--> data plane --gRPC--> upstream-echo --> back
//! NATS:    client --TLS--> nats-server --TLS--> responder (publishes to the reply inbox) --> back
//! ```
//!
//! Same payload, the same process placement (server on the server CPU, the upstream or the
//! responder and the load generator on the helper CPU). Closed loops at 1 and 64 in flight on one
//! connection (latency percentiles and req/s), then `--sat-clients` connections with 64 in flight
//! each (saturated req/s). NATS's responder is a client like any other, so its leg is TLS too
//! (the data plane's upstream leg is plaintext gRPC on loopback): noted in the report.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;

use super::{Helper, PeersArgs, nats_connect, parent_gone, start_nats, version, vs};
use crate::client::{Conn, Net, Reply, closed_loop, dp_session};
use crate::report::{Report, Round};
use crate::scenarios::{Opts, wait_upstream_ready};
use crate::util::{Lat, cpu_us, progress};

const SUBJECT: &str = "bench.echo";

/// `gate-bench peers nats-responder`: answers every request on [`SUBJECT`] with its payload.
pub async fn responder(url: &str, ca: &Path) -> Result<()> {
    let client = nats_connect(url, ca).await?;
    let mut sub = client.subscribe(SUBJECT).await?;
    client.flush().await?;
    println!("{{\"ready\":true}}");
    let serve = async {
        while let Some(msg) = sub.next().await {
            if let Some(reply) = msg.reply {
                client.publish(reply, msg.payload).await?;
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = serve => r,
        () = parent_gone() => Ok(()),
    }
}

/// Closed loop of NATS requests, `inflight` outstanding on one connection.
async fn nats_loop(
    client: &async_nats::Client,
    inflight: usize,
    payload: &Bytes,
    warmup: Duration,
    window: Duration,
) -> Result<(Lat, u64, u64, u64)> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + window;
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let client = client.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut n, mut errors, mut all) = (Lat::default(), 0u64, 0u64, 0u64);
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                match client.request(SUBJECT, payload.clone()).await {
                    Ok(m) if m.payload.len() == payload.len() => {
                        all += 1;
                        let t1 = Instant::now();
                        if t0 >= measure_from && t1 < end {
                            lat.0.push((t1 - t0).as_nanos() as u64);
                            n += 1;
                        }
                    }
                    _ => errors += 1,
                }
            }
            (lat, n, errors, all)
        }));
    }
    let (mut lat, mut n, mut errors, mut all) = (Lat::default(), 0, 0, 0);
    for t in tasks {
        let (l, c, e, a) = t.await?;
        lat.merge(l);
        n += c;
        errors += e;
        all += a;
    }
    Ok((lat, n, errors, all))
}

fn record(round: &mut Round, prefix: &str, mut lat: Lat, n: u64, window: Duration) {
    round.insert(format!("{prefix}_p50_us"), lat.pct_us(50.0));
    round.insert(format!("{prefix}_p99_us"), lat.pct_us(99.0));
    round.insert(format!("{prefix}_p999_us"), lat.pct_us(99.9));
    round.insert(
        format!("{prefix}_req_per_s"),
        n as f64 / window.as_secs_f64(),
    );
}

/// Saturated GateSvr: every session its own closed loop of 64.
async fn gs_saturated(
    sessions: Vec<Conn>,
    payload: &[u8],
    o: &Opts,
) -> Result<(Vec<Conn>, Lat, u64, u64)> {
    let mut tasks = Vec::new();
    for mut c in sessions {
        let payload = payload.to_vec();
        let (warmup, window) = (o.warmup, o.window);
        tasks.push(tokio::spawn(async move {
            let r = closed_loop(&mut c, 64, &payload, warmup, window, Reply::Response).await;
            (c, r)
        }));
    }
    let (mut back, mut lat, mut n, mut all) = (Vec::new(), Lat::default(), 0, 0);
    for t in tasks {
        let (c, r) = t.await?;
        let r = r?;
        anyhow::ensure!(r.errors == 0, "{} requests failed", r.errors);
        back.push(c);
        lat.merge(r.lat);
        n += r.completed;
        all += r.all;
    }
    Ok((back, lat, n, all))
}

async fn nats_saturated(
    clients: &[async_nats::Client],
    payload: &Bytes,
    o: &Opts,
) -> Result<(Lat, u64, u64, u64)> {
    let runs = clients
        .iter()
        .map(|c| nats_loop(c, 64, payload, o.warmup, o.window));
    let (mut lat, mut n, mut errors, mut all) = (Lat::default(), 0, 0, 0);
    for r in futures::future::join_all(runs).await {
        let (l, c, e, a) = r?;
        lat.merge(l);
        n += c;
        errors += e;
        all += a;
    }
    Ok((lat, n, errors, all))
}

pub async fn run(o: &Opts, args: &PeersArgs) -> Result<Report> {
    let mut rep = Report::new("peers-request-reply");
    let sat_clients = if o.tiny { 2 } else { args.sat_clients.max(1) };
    let levels: &[usize] = &[1, 64];
    rep.param("payload_bytes", o.payload);
    rep.param("rounds", o.rounds);
    rep.param("window_s", o.window.as_secs_f64());
    rep.param("inflight", serde_json::json!(levels));
    rep.param(
        "saturated",
        format!("{sat_clients} connections x 64 in flight"),
    );
    let dir = o.rundir()?;
    let ca = dir.ca();
    let (nats, url) = start_nats(o, &dir.path(), args.peer_limit)?;
    let nats_bin = super::need_bin("nats-server", "nats-server")?;
    rep.param("nats_server", version(&nats_bin, &["--version"]));
    let responder = Helper::spawn(
        &[
            "nats-responder".into(),
            "--url".into(),
            url.clone(),
            "--ca".into(),
            ca.display().to_string(),
        ],
        o.helper_cpu(),
    )
    .context("the NATS responder")?;
    let (dp, up) = o.start_dataplane(&dir, true)?;
    let up = up.context("the data plane's upstream")?;
    let net = Net::new(&ca, 4)?;
    let (mut sess, _) = dp_session(&net, dp.addr("quic")?, "rr-user").await?;
    wait_upstream_ready(&mut sess).await?;
    let mut sat_sessions = Vec::new();
    for i in 0..sat_clients {
        sat_sessions.push(
            dp_session(&net, dp.addr("quic")?, &format!("rr-sat-{i}"))
                .await?
                .0,
        );
    }
    let client = nats_connect(&url, &ca).await?;
    let mut sat_nats = Vec::new();
    for _ in 0..sat_clients {
        sat_nats.push(nats_connect(&url, &ca).await?);
    }
    // The responder is subscribed (it printed its line after a flush): one request proves it.
    client
        .request(SUBJECT, Bytes::from_static(b"ping"))
        .await
        .context("first NATS request")?;
    let payload = o.payload();
    let payload_b = Bytes::from(payload.clone());
    let mut nats_errors = 0u64;
    // Under `GATE_BENCH_WRAP=valgrind --tool=callgrind`: one profile per GateSvr window
    // (`k1`, `k64`, `sat`), so instructions per request can be read per load level.
    crate::util::callgrind_mark(&dp, "setup");
    for r in 0..o.rounds {
        let mut round = Round::new();
        // Alternate which side goes first, so neither always runs on a warmer machine.
        let gs_first = r % 2 == 1;
        for &k in levels {
            progress(format!(
                "peers request-reply round {}/{} inflight {k}",
                r + 1,
                o.rounds
            ));
            for side in if gs_first { [0, 1] } else { [1, 0] } {
                if side == 0 {
                    let meters = Lone::read(dp.pid(), up.pid());
                    // On a runtime worker, as `nats_loop`'s tasks and the saturated loops
                    // run: here, on `block_on`'s thread, every reply would cross from the
                    // worker that drives quinn to this thread and every request back, two
                    // thread wake-ups per request that the NATS client does not pay.
                    let (back, d) = {
                        let (payload, warmup, window) = (payload.clone(), o.warmup, o.window);
                        tokio::spawn(async move {
                            let d = closed_loop(
                                &mut sess,
                                k,
                                &payload,
                                warmup,
                                window,
                                Reply::Response,
                            )
                            .await;
                            (sess, d)
                        })
                        .await?
                    };
                    sess = back;
                    let d = d?;
                    anyhow::ensure!(d.errors == 0, "{} GateSvr requests failed", d.errors);
                    meters.record(&mut round, &format!("gs_k{k}"), d.all);
                    crate::util::callgrind_mark(&dp, &format!("k{k}"));
                    record(
                        &mut round,
                        &format!("gs_k{k}"),
                        d.lat,
                        d.completed,
                        o.window,
                    );
                } else {
                    let meters = Lone::read(nats.pid, responder.pid());
                    let (l, n, e, all) =
                        nats_loop(&client, k, &payload_b, o.warmup, o.window).await?;
                    meters.record(&mut round, &format!("nats_k{k}"), all);
                    nats_errors += e;
                    record(&mut round, &format!("nats_k{k}"), l, n, o.window);
                }
            }
        }
        progress(format!(
            "peers request-reply round {}/{} saturated",
            r + 1,
            o.rounds
        ));
        for side in if gs_first { [0, 1] } else { [1, 0] } {
            if side == 0 {
                let cpu = CpuPair::read(dp.pid(), up.pid(), o)?;
                let (back, l, n, all) =
                    gs_saturated(std::mem::take(&mut sat_sessions), &payload, o).await?;
                cpu.record(&mut round, "gs_sat", all)?;
                crate::util::callgrind_mark(&dp, "sat");
                sat_sessions = back;
                record(&mut round, "gs_sat", l, n, o.window);
            } else {
                let cpu = CpuPair::read(nats.pid, responder.pid(), o)?;
                let (l, n, e, all) = nats_saturated(&sat_nats, &payload_b, o).await?;
                cpu.record(&mut round, "nats_sat", all)?;
                nats_errors += e;
                record(&mut round, "nats_sat", l, n, o.window);
            }
        }
        rep.rounds.push(round);
    }
    if let Some(dir) = &args.profile {
        profile_saturated(o, &dp, sat_sessions, &payload, dir).await?;
    }
    rep.median_all();
    rep.field("nats_errors_total", nats_errors as f64);
    let f = rep.fields.clone();
    let f = |k: &str| f[k];
    for &k in levels {
        for p in ["p50", "p99", "p999"] {
            rep.checks.push(vs(
                &format!("[NATS] {p} latency us, {k} in flight"),
                f(&format!("gs_k{k}_{p}_us")),
                f(&format!("nats_k{k}_{p}_us")),
                true,
            ));
        }
        rep.checks.push(vs(
            &format!("[NATS] req/s, {k} in flight"),
            f(&format!("gs_k{k}_req_per_s")),
            f(&format!("nats_k{k}_req_per_s")),
            false,
        ));
    }
    rep.checks.push(vs(
        &format!("[NATS] saturated req/s ({sat_clients} conns x 64)"),
        f("gs_sat_req_per_s"),
        f("nats_sat_req_per_s"),
        false,
    ));
    rep.checks.push(vs(
        "[NATS] server CPU us/request, saturated (data plane vs nats-server)",
        f("gs_sat_server_cpu_us_per_req"),
        f("nats_sat_server_cpu_us_per_req"),
        true,
    ));
    rep.checks.push(vs(
        "[NATS] middle-hop CPU us/request, saturated (upstream echo vs responder)",
        f("gs_sat_hop_cpu_us_per_req"),
        f("nats_sat_hop_cpu_us_per_req"),
        true,
    ));
    rep.notes.push("CPU us/request: utime+stime (/proc/PID/stat) of the process over the saturated run (warm-up, window, drain) divided by every reply in it; independent of how much CPU other work on the machine left us".into());
    rep.notes.push("GateSvr: QUIC (TLS 1.3) client -> data plane -> plaintext gRPC upstream echo on loopback; NATS: TLS 1.3 client -> nats-server -> TLS 1.3 responder (NATS has one client port, so its responder leg pays TLS too)".into());
    rep.notes.push("placement: data plane and nats-server on the server CPU; upstream echo, NATS responder and load generator on the helper CPU".into());
    drop((nats, dp));
    Ok(rep)
}

/// What each process of a closed loop spent per request: on-CPU µs and voluntary sleeps (each
/// one a wake-up on the request's path when one request is in flight), and the UDP datagrams
/// the machine carried (GateSvr's client legs; NATS's are TCP). Over the whole loop (warm-up
/// included), divided by every reply in it.
struct Lone {
    pids: [u32; 3],
    before: [(f64, f64); 3],
    udp: (f64, f64),
}

impl Lone {
    fn read(server: u32, hop: u32) -> Self {
        let pids = [server, hop, std::process::id()];
        Self {
            pids,
            before: pids.map(crate::util::run_and_sleeps),
            udp: crate::util::udp_datagrams(),
        }
    }

    /// Records `{prefix}_{server,hop,client}_{run_us,sleeps}_per_req` and
    /// `{prefix}_udp_{in,out}_per_req`.
    fn record(&self, round: &mut Round, prefix: &str, replies: u64) {
        let per = |v: f64| v / replies.max(1) as f64;
        for ((pid, (run0, sleeps0)), who) in self
            .pids
            .into_iter()
            .zip(self.before)
            .zip(["server", "hop", "client"])
        {
            let (run, sleeps) = crate::util::run_and_sleeps(pid);
            round.insert(format!("{prefix}_{who}_run_us_per_req"), per(run - run0));
            round.insert(
                format!("{prefix}_{who}_sleeps_per_req"),
                per(sleeps - sleeps0),
            );
        }
        let (i, o) = crate::util::udp_datagrams();
        round.insert(format!("{prefix}_udp_in_per_req"), per(i - self.udp.0));
        round.insert(format!("{prefix}_udp_out_per_req"), per(o - self.udp.1));
    }
}

/// CPU time of the server, the middle hop and the load generator before a run, and of the
/// machine's CPUs: what each process used, waited for, and what other work took, per request
/// and as a share of the run's wall time.
struct CpuPair {
    server: (u32, f64),
    hop: (u32, f64),
    client: (u32, f64),
    /// Run-queue wait (µs) of server, hop and client before the run.
    waits: [(u32, f64); 3],
    /// Busy µs of every CPU before the run (`util::cpu_busy_us`).
    busy: Vec<f64>,
    started: Instant,
    /// (server CPU, helper CPU) when pinned.
    cpus: Option<(usize, usize)>,
}

impl CpuPair {
    fn read(server: u32, hop: u32, o: &Opts) -> Result<Self> {
        let me = std::process::id();
        let wait = |pid| (pid, crate::util::runq_wait_us(pid));
        Ok(Self {
            server: (server, cpu_us(server)?),
            hop: (hop, cpu_us(hop)?),
            client: (me, cpu_us(me)?),
            waits: [wait(server), wait(hop), wait(me)],
            busy: crate::util::cpu_busy_us(),
            started: Instant::now(),
            cpus: o.server_cpu().zip(o.helper_cpu()),
        })
    }

    /// Records `{prefix}_{server,hop,client}_cpu_us_per_req`, the run-queue waits, and the
    /// shares of the run's wall time (`_pct`): each process's CPU and wait, and on the server's
    /// and the helper CPU the time other work on the machine took (`_others_pct`).
    fn record(&self, round: &mut Round, prefix: &str, replies: u64) -> Result<()> {
        let wall_us = self.started.elapsed().as_secs_f64() * 1e6;
        let pct = |us: f64| 100.0 * us / wall_us.max(1.0);
        let used = |(pid, before): (u32, f64)| -> Result<f64> { Ok(cpu_us(pid)? - before) };
        let per = |us: f64| us / replies.max(1) as f64;
        let (server, hop, client) = (used(self.server)?, used(self.hop)?, used(self.client)?);
        round.insert(format!("{prefix}_server_cpu_us_per_req"), per(server));
        round.insert(format!("{prefix}_hop_cpu_us_per_req"), per(hop));
        // The load generator (this process): QUIC client vs NATS client.
        round.insert(format!("{prefix}_client_cpu_us_per_req"), per(client));
        round.insert(format!("{prefix}_wall_s"), wall_us / 1e6);
        for (who, us) in [("server", server), ("hop", hop), ("client", client)] {
            round.insert(format!("{prefix}_{who}_cpu_pct"), pct(us));
        }
        // Where the pipeline waited for a CPU (other work on the machine, or its own stages
        // on a shared CPU): µs per request that each process was runnable but not running.
        for ((pid, before), who) in self.waits.into_iter().zip(["server", "hop", "client"]) {
            let waited = crate::util::runq_wait_us(pid) - before;
            round.insert(format!("{prefix}_{who}_runq_wait_us_per_req"), per(waited));
            round.insert(format!("{prefix}_{who}_runq_wait_pct"), pct(waited));
        }
        // What the rest of the machine took from the two CPUs meanwhile (only the server is
        // ours on the server CPU; the hop and the load generator on the helper CPU).
        if let Some((s, h)) = self.cpus {
            let busy = crate::util::cpu_busy_us();
            let delta = |cpu: usize| {
                busy.get(cpu).copied().unwrap_or(0.0) - self.busy.get(cpu).copied().unwrap_or(0.0)
            };
            let others = |cpu: usize, ours: f64| pct((delta(cpu) - ours).max(0.0));
            round.insert(format!("{prefix}_server_cpu_others_pct"), others(s, server));
            round.insert(
                format!("{prefix}_helper_cpu_others_pct"),
                others(h, hop + client),
            );
        }
        Ok(())
    }
}

/// Takes a data-plane CPU flamegraph (its /debug/pprof/profile) during a saturated window and
/// writes it to `dir/dataplane-request-reply.svg`.
async fn profile_saturated(
    o: &Opts,
    dp: &crate::util::ServerProc,
    sessions: Vec<Conn>,
    payload: &[u8],
    dir: &Path,
) -> Result<()> {
    // Enough samples at 99 Hz even when the process gets little CPU on a shared machine.
    let secs = if o.tiny { 1 } else { 10 };
    let mut o2 = o.clone();
    o2.window = Duration::from_secs(secs + 1);
    let http = dp.addr("ops")?;
    progress(format!(
        "peers request-reply: profiling the data plane for {secs}s"
    ));
    let prof = super::pprof_svg(http, secs);
    let load = gs_saturated(sessions, payload, &o2);
    let (svg, load) = tokio::join!(prof, load);
    load?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("dataplane-request-reply.svg"), svg?)?;
    Ok(())
}
