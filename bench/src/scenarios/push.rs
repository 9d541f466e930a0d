//! push: an upstream (this process) pushes to N sessions that ack cumulatively; deliveries/s,
//! push latency (call start to arrival at the client), gaps and duplicates (must be 0). Five
//! windows in the same run:
//! - `dp_*`: GatewayService.PushToClient (PushBatch with `--push-batch` above 1);
//! - `batch_*`: PushBatch of 64, codes only (when `dp_*` is unary);
//! - `stream_*`: pushes carried on the upstream's long-lived stream (streaming contract,
//!   `gatesvr-upstream-sdk`'s `Pusher`, which waits for each push's result as the SDK does);
//! - `streambatch_*`: `push_batch` frames of 64 on that stream asking for codes only
//!   (`Pusher::push_batch_codes`), each push to the next session;
//! - `onetarget_*`: the same frames with all 64 pushes of a batch to one session, the
//!   baseline's shape.
//!
//! Baseline: a bare quinn server writing the same frames one-way on N connections to the same
//! client, 64 per write, which acks them per chunk read as the sessions do. It runs first and
//! last in each round (`bare_*`, `bare_last_*`); `bare_msgs_per_s`, every ratio's baseline, is
//! the mean of the two, `bare_first_msgs_per_s` the first. Every window is metered
//! ([`Meter`]): CPU, run-queue wait and packets per delivery.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::BufMut;
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_proto::upstream::{PushBatchRequest, PushToClientRequest, TargetType};
use gatesvr_upstream_sdk::Pusher;

use super::Opts;
use crate::client::{Conn, Net, PushStats, dp_session, push_reader};
use crate::report::{Check, Cmp, Report, Round};
use crate::util::{now_ns, progress};

pub type Readers = Vec<tokio::task::JoinHandle<Result<Conn>>>;

/// Connects `n` sessions and starts a push reader on each.
pub async fn sessions_with_readers(
    net: &Arc<Net>,
    addr: std::net::SocketAddr,
    prefix: &str,
    n: usize,
    stats: &Arc<PushStats>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<(Vec<String>, Readers)> {
    let (openids, readers, _) =
        sessions_with_readers_conns(net, addr, prefix, n, stats, stop).await?;
    Ok((openids, readers))
}

/// As [`sessions_with_readers`], also returning the sessions' QUIC connections (for their
/// packet counters, [`Meter`]).
pub async fn sessions_with_readers_conns(
    net: &Arc<Net>,
    addr: std::net::SocketAddr,
    prefix: &str,
    n: usize,
    stats: &Arc<PushStats>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<(Vec<String>, Readers, Vec<quinn::Connection>)> {
    let openids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let conns = crate::client::bounded(openids.clone(), 64, |id| {
        let net = net.clone();
        async move { dp_session(&net, addr, &id).await }
    })
    .await;
    let mut readers = Vec::new();
    let mut quic = Vec::new();
    for c in conns {
        let (c, _) = c?;
        quic.push(c.conn.clone());
        readers.push(tokio::spawn(push_reader(
            c,
            stats.clone(),
            true,
            stop.clone(),
        )));
    }
    Ok((openids, readers, quic))
}

/// `/proc/PID/task/*/schedstat` summed over threads: (time on a CPU, time runnable but waiting
/// for one), µs. Finer than `/proc/PID/stat`'s ticks.
pub fn sched_us(pid: u32) -> (f64, f64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0.0, 0.0);
    };
    let mut sum = (0.0, 0.0);
    for t in tasks.flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        let mut f = s
            .split_whitespace()
            .map(|v| v.parse::<f64>().unwrap_or(0.0));
        sum.0 += f.next().unwrap_or(0.0) / 1e3;
        sum.1 += f.next().unwrap_or(0.0) / 1e3;
    }
    sum
}

/// What one window cost, read before and after it: CPU and run-queue wait of the server process
/// and of this process (the load generator: every client connection, the pushing upstream and
/// its callers), and the UDP datagrams and ACK frames of the client connections (quinn's
/// `ConnectionStats`), so that a window's rate can be read against which process was busy and
/// how many packets each delivery took.
pub struct Meter {
    at: Instant,
    server_pid: u32,
    server: (f64, f64),
    me: (f64, f64),
    quic: [u64; 5],
}

fn quic_counts(conns: &[quinn::Connection]) -> [u64; 5] {
    let mut c = [0u64; 5];
    for conn in conns {
        let s = conn.stats();
        c[0] += s.udp_rx.datagrams;
        c[1] += s.udp_tx.datagrams;
        c[2] += s.frame_tx.acks;
        c[3] += s.frame_tx.stream;
        c[4] += s.frame_rx.stream;
    }
    c
}

impl Meter {
    pub fn start(server_pid: u32, conns: &[quinn::Connection]) -> Self {
        Self {
            at: Instant::now(),
            server_pid,
            server: sched_us(server_pid),
            me: sched_us(std::process::id()),
            quic: quic_counts(conns),
        }
    }

    /// Records `{prefix}_*`: `server_busy`, `client_busy` (CPU time / wall time; 1.0 is one
    /// full core), `server_cpu_us_per_delivery`, `client_cpu_us_per_delivery`,
    /// `server_runq_us_per_delivery`, `client_runq_us_per_delivery`, `pkts_in_per_delivery`
    /// (datagrams the clients received), `pkts_out_per_delivery` (datagrams they sent),
    /// `client_stream_frames_per_delivery` (the clients' app-level acks, as STREAM frames),
    /// `server_stream_frames_per_delivery` (STREAM frames the clients received: the datagrams
    /// received without one carried only ACKs and other control frames).
    pub fn finish(
        &self,
        prefix: &str,
        conns: &[quinn::Connection],
        deliveries: u64,
        round: &mut Round,
    ) {
        let wall = self.at.elapsed().as_secs_f64() * 1e6;
        let server = sched_us(self.server_pid);
        let me = sched_us(std::process::id());
        let quic = quic_counts(conns);
        let d = deliveries.max(1) as f64;
        let mut put = |k: &str, v: f64| {
            round.insert(format!("{prefix}_{k}"), v);
        };
        put("server_busy", (server.0 - self.server.0) / wall);
        put("client_busy", (me.0 - self.me.0) / wall);
        put("server_cpu_us_per_delivery", (server.0 - self.server.0) / d);
        put("client_cpu_us_per_delivery", (me.0 - self.me.0) / d);
        put(
            "server_runq_us_per_delivery",
            (server.1 - self.server.1) / d,
        );
        put("client_runq_us_per_delivery", (me.1 - self.me.1) / d);
        put("pkts_in_per_delivery", (quic[0] - self.quic[0]) as f64 / d);
        put("pkts_out_per_delivery", (quic[1] - self.quic[1]) as f64 / d);
        put(
            "client_ack_frames_per_delivery",
            (quic[2] - self.quic[2]) as f64 / d,
        );
        put(
            "client_stream_frames_per_delivery",
            (quic[3] - self.quic[3]) as f64 / d,
        );
        put(
            "server_stream_frames_per_delivery",
            (quic[4] - self.quic[4]) as f64 / d,
        );
    }
}

/// A push's payload: `size` bytes (at least 8), the first 8 the send time (ns, LE), which the
/// reader turns into the push's latency. The pushes of one batch share one payload, stamped as
/// the batch is built: a stamp (a clock read) and an allocation per push were ~5% of the load
/// generator's core in `onetarget`, the core that binds there.
pub fn push_data(size: usize) -> bytes::Bytes {
    let mut data = Vec::with_capacity(size.max(8));
    data.put_u64_le(now_ns());
    data.resize(size.max(8), 0);
    data.into()
}

/// `GATE_BENCH_PUSH_DISTINCT=1`: each push of a `push_batch` carries its own payload (the
/// batch's stamp, then the push's index), as a batch of different messages would; by default
/// they share one, as one message to many users (or many times to one) does.
fn distinct_payloads() -> bool {
    std::env::var("GATE_BENCH_PUSH_DISTINCT").is_ok_and(|v| v == "1")
}

/// `data` with bytes 8..12 set to `k`: a payload of its own (at least 12 bytes).
fn distinct(data: &bytes::Bytes, k: usize) -> bytes::Bytes {
    let mut own = data.to_vec();
    own.resize(own.len().max(12), 0);
    own[8..12].copy_from_slice(&(k as u32).to_le_bytes());
    own.into()
}

/// Waits until `stats.delivered` reaches `target` or `patience` passes.
pub async fn await_deliveries(stats: &PushStats, target: u64, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    while stats.delivered.load(Ordering::Relaxed) < target {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

pub async fn run(o: &Opts) -> Result<Report> {
    if let Some(t) = &o.target {
        return super::remote::push(o, t).await;
    }
    let mut rep = Report::new("push");
    let n = o.fanout;
    // `GATE_BENCH_PUSH_CALLERS`: concurrent push calls (the offered load's depth).
    let callers = std::env::var("GATE_BENCH_PUSH_CALLERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if o.tiny { 4 } else { 64 });
    rep.param("sessions", n);
    rep.param("concurrent_push_rpcs", callers);
    rep.param("payload_bytes", o.payload);
    rep.param("rounds", o.rounds);
    rep.param("window_s", o.window.as_secs_f64());
    let dir = o.rundir()?;
    // The upstream that pushes over its stream: served here, as an SDK user would.
    let (up_addr, pusher) = serve_stream_upstream().await?;
    let dp = o.start_dataplane_stream_upstream(&dir, up_addr)?;
    let bare = o.start_bare(&dir)?;
    let net = Arc::new(Net::new(&dir.ca(), 4)?);
    let stats = Arc::new(PushStats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    progress(format!("push: connecting {n} sessions"));
    let (openids, readers, quic) =
        sessions_with_readers_conns(&net, dp.addr("quic")?, "push", n, &stats, &stop_rx).await?;
    let openids = Arc::new(openids);
    let channel = crate::servers::upstream_channel(&dp.addr("grpc")?.to_string())?;
    // The node dials an upstream's stream on its first request: one request opens it.
    let (mut warm, _) = dp_session(&net, dp.addr("quic")?, "push-warm").await?;
    super::wait_upstream_ready(&mut warm).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while pusher.streams() == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no data-plane stream reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    crate::util::callgrind_mark(&dp, "setup");
    let mut bare_before = [0f64; 8];
    for r in 0..o.rounds {
        progress(format!("push round {}/{}", r + 1, o.rounds));
        let mut round = Round::new();

        // A: bare quinn one-way streams on n connections; again as the round's last window (G).
        let first = bare_window(&net, &bare, &dir, o, &mut bare_before, "bare", &mut round).await?;

        // B: pushes through the data plane.
        let meter = Meter::start(dp.pid(), &quic);
        push_window(
            &channel,
            &openids,
            callers,
            o.push_batch,
            o.payload,
            o.window,
            &stats,
            &mut round,
        )
        .await?;
        meter.finish("dp", &quic, round["dp_deliveries"] as u64, &mut round);
        crate::util::callgrind_mark(&dp, "dp");
        round.insert("dp_gaps".into(), stats.gaps.load(Ordering::Relaxed) as f64);
        round.insert("dp_dups".into(), stats.dups.load(Ordering::Relaxed) as f64);

        // C: PushBatch of 64, when B was unary.
        if o.push_batch <= 1 {
            let via = Via::Grpc {
                channel: channel.clone(),
                batch: BATCH,
            };
            let meter = Meter::start(dp.pid(), &quic);
            push_window_via(
                "batch", &via, &openids, callers, o.payload, o.window, &stats, &mut round,
            )
            .await?;
            meter.finish("batch", &quic, round["batch_deliveries"] as u64, &mut round);
            crate::util::callgrind_mark(&dp, "batch");
        }

        // D: pushes on the upstream's stream.
        let via = Via::Stream(pusher.clone());
        let meter = Meter::start(dp.pid(), &quic);
        push_window_via(
            "stream", &via, &openids, callers, o.payload, o.window, &stats, &mut round,
        )
        .await?;
        meter.finish(
            "stream",
            &quic,
            round["stream_deliveries"] as u64,
            &mut round,
        );
        crate::util::callgrind_mark(&dp, "stream");

        // E: push_batch frames of 64 on the upstream's stream, each push to another session;
        // F: the same, each batch to one session (the bare baseline's shape: 64 frames per
        // write on one connection).
        for (prefix, per_target) in [("streambatch", 1), ("onetarget", BATCH)] {
            let via = Via::StreamBatch {
                pusher: pusher.clone(),
                batch: BATCH,
                per_target,
            };
            let meter = Meter::start(dp.pid(), &quic);
            push_window_via(
                prefix, &via, &openids, callers, o.payload, o.window, &stats, &mut round,
            )
            .await?;
            meter.finish(
                prefix,
                &quic,
                round[&format!("{prefix}_deliveries")] as u64,
                &mut round,
            );
            crate::util::callgrind_mark(&dp, prefix);
        }

        // G: bare again. The VM's speed drifts within a round (A and G of one round differed
        // by up to 24% in session 28): every window's baseline is the mean of the two, which
        // cancels a drift linear in time.
        let last = bare_window(
            &net,
            &bare,
            &dir,
            o,
            &mut bare_before,
            "bare_last",
            &mut round,
        )
        .await?;
        round.insert("bare_first_msgs_per_s".into(), first);
        round.insert("bare_last_msgs_per_s".into(), last);
        round.insert("bare_msgs_per_s".into(), (first + last) / 2.0);
        rep.rounds.push(round);
    }
    let _ = stop_tx.send(true);
    for r in readers {
        let _ = r.await;
    }
    rep.median_all();
    let f = rep.fields.clone();
    let f = |k: &str| f[k];
    rep.checks.push(Check::ratio(
        "deliveries/s vs bare quinn one-way",
        f("dp_deliveries_per_s"),
        f("bare_msgs_per_s"),
        Cmp::AtLeast,
        0.7,
    ));
    if o.push_batch <= 1 {
        rep.checks.push(Check::ratio(
            "PushBatch 64 deliveries/s vs bare quinn one-way",
            f("batch_deliveries_per_s"),
            f("bare_msgs_per_s"),
            Cmp::AtLeast,
            0.5,
        ));
    }
    rep.checks.push(Check::ratio(
        "stream push deliveries/s vs bare quinn one-way",
        f("stream_deliveries_per_s"),
        f("bare_msgs_per_s"),
        Cmp::AtLeast,
        0.5,
    ));
    rep.checks.push(Check::ratio(
        "stream push_batch 64 deliveries/s vs bare quinn one-way",
        f("streambatch_deliveries_per_s"),
        f("bare_msgs_per_s"),
        Cmp::AtLeast,
        0.5,
    ));
    rep.checks.push(Check::ratio(
        "stream push_batch 64 to one session deliveries/s vs bare quinn one-way (same shape)",
        f("onetarget_deliveries_per_s"),
        f("bare_msgs_per_s"),
        Cmp::AtLeast,
        0.5,
    ));
    let gaps = stats.gaps.load(Ordering::Relaxed) as f64;
    let dups = stats.dups.load(Ordering::Relaxed) as f64;
    rep.field("dp_gaps_total", gaps);
    rep.field("dp_dups_total", dups);
    rep.field(
        "dp_redeliveries_total",
        stats.redeliveries.load(Ordering::Relaxed) as f64,
    );
    rep.checks.push(Check::absolute(
        "gaps (all rounds)",
        gaps,
        Cmp::AtMost,
        0.0,
        "",
    ));
    rep.checks.push(Check::absolute(
        "duplicates (all rounds)",
        dups,
        Cmp::AtMost,
        0.0,
        "",
    ));
    for k in ["dp", "batch", "stream", "streambatch", "onetarget"] {
        if let Some(u) = rep.fields.get(&format!("{k}_undelivered")).copied() {
            rep.checks.push(Check::absolute(
                &format!("{k}: undelivered (median round)"),
                u,
                Cmp::AtMost,
                0.0,
                "",
            ));
        }
    }
    rep.checks.push(Check::absolute(
        "p99 push latency (report)",
        f("dp_push_p99_us"),
        Cmp::AtLeast,
        0.0,
        "us",
    ));
    rep.notes.push("push latency: from just before the PushToClient call to the client reading the frame; deliveries/s over [first call, last delivery]".into());
    rep.notes.push(format!("dp: {}; batch: PushBatch of {BATCH}, codes only; stream: pushes on the upstream's stream (gatesvr-upstream-sdk Pusher::push, each caller waits for its push's result); streambatch: push_batch frames of {BATCH} on that stream, codes only (Pusher::push_batch_codes), each push to the next session; onetarget: the same, all {BATCH} pushes of a batch to one session, as the bare server writes {BATCH} frames per write on one connection; {callers} concurrent callers each", if o.push_batch > 1 { format!("PushBatch of {}, codes only", o.push_batch) } else { "PushToClient".into() }));
    Ok(rep)
}

/// One window of bare quinn one-way streams on `o.fanout` connections: the baseline. Metered
/// as `{prefix}_*`, with `{prefix}_gaps` and `{prefix}_dups`; returns its msgs/s.
async fn bare_window(
    net: &Arc<Net>,
    bare: &crate::util::ServerProc,
    dir: &crate::util::RunDir,
    o: &Opts,
    bare_before: &mut [f64; 8],
    prefix: &str,
    round: &mut Round,
) -> Result<f64> {
    let n = o.fanout;
    let bstats = Arc::new(PushStats::default());
    let (bstop_tx, bstop_rx) = tokio::sync::watch::channel(false);
    let mut bconns = Vec::new();
    let bare_addr = bare.addr("quic")?;
    let opened = crate::client::bounded((0..n).collect(), 64, |_| {
        let net = net.clone();
        async move { net.connect(bare_addr).await }
    })
    .await;
    for c in opened {
        bconns.push(c?);
    }
    let mut breaders = Vec::new();
    let meter = Meter::start(bare.pid(), &bconns);
    let t0 = Instant::now();
    for conn in &bconns {
        let mut cmd = vec![b'P'];
        cmd.extend_from_slice(&u64::MAX.to_le_bytes());
        cmd.extend_from_slice(&(o.payload as u32).to_le_bytes());
        let c = Conn::open(conn.clone(), &cmd).await?;
        // Acked as the sessions are (once per read): the same client work.
        breaders.push(tokio::spawn(push_reader(
            c,
            bstats.clone(),
            true,
            bstop_rx.clone(),
        )));
    }
    tokio::time::sleep(o.window).await;
    let _ = bstop_tx.send(true);
    let elapsed = t0.elapsed();
    for b in breaders {
        let _ = b.await;
    }
    for c in &bconns {
        c.close(0u32.into(), b"done");
    }
    let (bdel, _) = bstats.reset();
    meter.finish(prefix, &bconns, bdel, round);
    bare_server_stats(
        &dir.path().join("bare-stats.json"),
        bare_before,
        n,
        bdel,
        prefix,
        round,
    )
    .await;
    round.insert(
        format!("{prefix}_gaps"),
        bstats.gaps.load(Ordering::Relaxed) as f64,
    );
    round.insert(
        format!("{prefix}_dups"),
        bstats.dups.load(Ordering::Relaxed) as f64,
    );
    Ok(bdel as f64 / elapsed.as_secs_f64())
}

/// The bare server's per-connection QUIC stats of the window's `n` connections (summed by the
/// server as each closes): `bare_server_*` per delivery, and mean cwnd / RTT at close.
async fn bare_server_stats(
    path: &std::path::Path,
    before: &mut [f64; 8],
    n: usize,
    deliveries: u64,
    prefix: &str,
    round: &mut Round,
) {
    let keys = [
        "closed",
        "datagrams",
        "lost_packets",
        "lost_bytes",
        "congestion_events",
        "stream_frames",
        "cwnd_sum",
        "rtt_us_sum",
    ];
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut now = [0f64; 8];
    loop {
        if let Ok(v) = std::fs::read_to_string(path)
            .map_err(anyhow::Error::from)
            .and_then(|t| Ok(serde_json::from_str::<serde_json::Value>(&t)?))
        {
            for (i, k) in keys.iter().enumerate() {
                now[i] = v[k].as_f64().unwrap_or(0.0);
            }
        }
        if now[0] - before[0] >= n as f64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = deliveries.max(1) as f64;
    let closed = (now[0] - before[0]).max(1.0);
    round.insert(
        format!("{prefix}_server_pkts_out_per_delivery"),
        (now[1] - before[1]) / d,
    );
    round.insert(
        format!("{prefix}_server_lost_pkts_per_delivery"),
        (now[2] - before[2]) / d,
    );
    round.insert(
        format!("{prefix}_server_congestion_events"),
        now[4] - before[4],
    );
    round.insert(
        format!("{prefix}_server_cwnd_mean"),
        (now[6] - before[6]) / closed,
    );
    round.insert(
        format!("{prefix}_server_rtt_us_mean"),
        (now[7] - before[7]) / closed,
    );
    *before = now;
}

/// Pushes per call of the `batch_*` window.
const BATCH: usize = 64;

/// How a window's pushes reach the data plane.
pub enum Via {
    /// GatewayService: PushToClient (`batch` 1) or PushBatch of `batch`.
    Grpc {
        channel: tonic::transport::Channel,
        batch: usize,
    },
    /// On the upstream's stream (streaming contract), through the SDK.
    Stream(Pusher),
    /// On the upstream's stream, `push_batch` frames of `batch` pushes asking for codes only
    /// (`Pusher::push_batch_codes`),
    /// `per_target` pushes in a row to each session (1: every push of a batch to another one).
    StreamBatch {
        pusher: Pusher,
        batch: usize,
        per_target: usize,
    },
}

/// Serves an SDK upstream (echo handler, streaming contract and health) on a
/// local port; its address and the pusher for its streams.
async fn serve_stream_upstream() -> Result<(std::net::SocketAddr, Pusher)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let mut opts = gatesvr_upstream_sdk::Options::new("gate-bench-push", "");
    opts.max_requests_in_flight = 100_000;
    let up = gatesvr_upstream_sdk::Upstream::new(crate::servers::EchoUpstream, opts);
    up.set_serving(true);
    let pusher = up.pusher();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(up.stream_service())
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    Ok((addr, pusher))
}

/// One window of pushes through a data plane: `callers` concurrent callers push round robin over
/// `openids` (PushBatch of `batch` when it is above 1) until `window` ends; then the deliveries
/// are awaited and the `dp_*` figures of the window go into `round`.
#[allow(clippy::too_many_arguments)]
pub async fn push_window(
    channel: &tonic::transport::Channel,
    openids: &Arc<Vec<String>>,
    callers: usize,
    batch: usize,
    payload: usize,
    window: Duration,
    stats: &PushStats,
    round: &mut Round,
) -> Result<()> {
    let via = Via::Grpc {
        channel: channel.clone(),
        batch,
    };
    push_window_via("dp", &via, openids, callers, payload, window, stats, round).await
}

/// As [`push_window`], any [`Via`]; the figures go into `round` as `{prefix}_*`.
#[allow(clippy::too_many_arguments)]
pub async fn push_window_via(
    prefix: &str,
    via: &Via,
    openids: &Arc<Vec<String>>,
    callers: usize,
    payload: usize,
    window: Duration,
    stats: &PushStats,
    round: &mut Round,
) -> Result<()> {
    let _ = stats.reset();
    // scripts/profile-push starts its profile on this line.
    progress(format!("push: {prefix} window"));
    let start = Instant::now();
    let end = start + window;
    let start_ns = now_ns();
    let mut tasks = Vec::new();
    // How long each `push_batch` waited for its results (queued, not delivered).
    let result_lat = Arc::new(std::sync::Mutex::new(crate::util::Lat::default()));
    for t in 0..callers {
        let openids = openids.clone();
        let size = payload;
        let (channel, batch) = match via {
            Via::Grpc { channel, batch } => (channel.clone(), *batch),
            Via::Stream(pusher) => {
                let pusher = pusher.clone();
                tasks.push(tokio::spawn(async move {
                    let (mut ok, mut refused) = (0u64, 0u64);
                    let mut i = t;
                    while Instant::now() < end {
                        let target_id = openids[i % openids.len()].clone();
                        i += callers;
                        let res = pusher
                            .push(PushToClientRequest {
                                target_type: TargetType::Openid as i32,
                                target_id,
                                msg_type: "bench".into(),
                                data: push_data(size),
                                ..Default::default()
                            })
                            .await;
                        match res {
                            Ok(_) => ok += 1,
                            Err(_) => refused += 1,
                        }
                    }
                    (ok, refused)
                }));
                continue;
            }
            Via::StreamBatch {
                pusher,
                batch,
                per_target,
            } => {
                let (pusher, batch, per_target) = (pusher.clone(), *batch, *per_target);
                let own_payloads = distinct_payloads();
                let result_lat = result_lat.clone();
                tasks.push(tokio::spawn(async move {
                    let (mut ok, mut refused) = (0u64, 0u64);
                    let mut lats = Vec::new();
                    let mut i = t;
                    while Instant::now() < end {
                        let mut pushes = Vec::with_capacity(batch);
                        let data = push_data(size);
                        for k in 1..=batch {
                            pushes.push(PushToClientRequest {
                                target_type: TargetType::Openid as i32,
                                target_id: openids[i % openids.len()].clone(),
                                msg_type: "bench".into(),
                                data: if own_payloads {
                                    distinct(&data, k)
                                } else {
                                    data.clone()
                                },
                                ..Default::default()
                            });
                            if k % per_target == 0 || k == batch {
                                i += callers;
                            }
                        }
                        let called = Instant::now();
                        // Codes only: a caller that counts refusals needs no seq or ids.
                        let answered = pusher.push_batch_codes(pushes).await;
                        lats.push(called.elapsed().as_nanos() as u64);
                        match answered {
                            Ok(results) => {
                                for r in results {
                                    if r.code == 0 {
                                        ok += 1;
                                    } else {
                                        refused += 1;
                                    }
                                }
                            }
                            Err(_) => refused += batch as u64,
                        }
                    }
                    result_lat.lock().expect("not poisoned").0.extend(lats);
                    (ok, refused)
                }));
                continue;
            }
        };
        let mut client = GatewayServiceClient::new(channel);
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u64, 0u64);
            let mut i = t;
            while Instant::now() < end {
                if batch > 1 {
                    let mut pushes = Vec::with_capacity(batch);
                    let data = push_data(size);
                    for _ in 0..batch {
                        pushes.push(PushToClientRequest {
                            target_type: TargetType::Openid as i32,
                            target_id: openids[i % openids.len()].clone(),
                            msg_type: "bench".into(),
                            data: data.clone(),
                            ..Default::default()
                        });
                        i += callers;
                    }
                    let request = PushBatchRequest {
                        pushes,
                        codes_only: true,
                    };
                    match client.push_batch(request).await {
                        Ok(r) => {
                            // Codes only: one code per push (`results` holds only the refused
                            // pushes').
                            let queued = r.get_ref().codes.iter().filter(|&&c| c == 0).count();
                            ok += queued as u64;
                            refused += (batch - queued) as u64;
                        }
                        Err(_) => refused += batch as u64,
                    }
                    continue;
                }
                let target = openids[i % openids.len()].clone();
                i += callers;
                let res = client
                    .push_to_client(PushToClientRequest {
                        target_type: TargetType::Openid as i32,
                        target_id: target,
                        msg_type: "bench".into(),
                        data: push_data(size),
                        ..Default::default()
                    })
                    .await;
                match res {
                    Ok(_) => ok += 1,
                    Err(_) => refused += 1,
                }
            }
            (ok, refused)
        }));
    }
    let work = async {
        let (mut ok, mut refused) = (0u64, 0u64);
        for t in tasks {
            let (a, b) = t.await?;
            ok += a;
            refused += b;
        }
        let complete = await_deliveries(stats, ok, Duration::from_secs(30)).await;
        Ok::<_, anyhow::Error>((ok, refused, complete))
    };
    // `GATE_BENCH_TRACE`: the window's deliveries/s and this process's CPU every 250 ms.
    let trace = async {
        if std::env::var_os("GATE_BENCH_TRACE").is_none() {
            return std::future::pending().await;
        }
        let me = std::process::id();
        let (mut last_d, mut last_cpu) = (0u64, sched_us(me).0);
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let d = stats.delivered.load(Ordering::Relaxed);
            let cpu = sched_us(me).0;
            eprintln!(
                "[gate-bench] trace {prefix}: {} deliveries/s, load generator cpu {:.2}",
                d.saturating_sub(last_d) * 4,
                (cpu - last_cpu) / 250_000.0
            );
            (last_d, last_cpu) = (d, cpu);
        }
    };
    let (ok, refused, complete) = tokio::select! {
        r = work => r?,
        () = trace => unreachable!("the trace never ends"),
    };
    let last = stats.last_delivery_ns.load(Ordering::Relaxed);
    let (delivered, mut lat) = stats.reset();
    let secs = (last.saturating_sub(start_ns)) as f64 / 1e9;
    let mut waited = std::mem::take(&mut *result_lat.lock().expect("not poisoned"));
    if !waited.0.is_empty() {
        round.insert(format!("{prefix}_result_p50_us"), waited.pct_us(50.0));
        round.insert(format!("{prefix}_result_p99_us"), waited.pct_us(99.0));
    }
    round.insert(format!("{prefix}_pushes_accepted"), ok as f64);
    round.insert(format!("{prefix}_pushes_refused"), refused as f64);
    round.insert(format!("{prefix}_deliveries"), delivered as f64);
    round.insert(
        format!("{prefix}_undelivered"),
        if complete {
            0.0
        } else {
            (ok - delivered.min(ok)) as f64
        },
    );
    round.insert(
        format!("{prefix}_deliveries_per_s"),
        delivered as f64 / secs.max(1e-9),
    );
    round.insert(format!("{prefix}_push_p50_us"), lat.pct_us(50.0));
    round.insert(format!("{prefix}_push_p99_us"), lat.pct_us(99.0));
    Ok(())
}
