//! throughput: saturating load (many sessions, many requests in flight each) through a
//! data-plane node to a trivial upstream; req/s and the node's CPU-us per request (from
//! /proc/PID/stat). Baseline: a minimal quinn -> tonic relay (no session logic) to the same
//! upstream, driven by the same client.

use anyhow::Result;

use super::{Opts, wait_upstream_ready};
use crate::client::{Conn, LoopResult, Net, Reply, closed_loop, dp_session};
use crate::report::{Check, Cmp, Report, Round};
use crate::util::{ServerProc, progress};

async fn saturate(
    o: &Opts,
    conns: &mut [Conn],
    inflight: usize,
    server: &ServerProc,
    round: &mut Round,
    prefix: &str,
) -> Result<()> {
    let payload = o.payload();
    let cpu0 = server.cpu_us()?;
    let results: Vec<Result<LoopResult>> = futures::future::join_all(
        conns
            .iter_mut()
            .map(|c| closed_loop(c, inflight, &payload, o.warmup, o.window, Reply::Response)),
    )
    .await;
    let cpu1 = server.cpu_us()?;
    let (mut done, mut all, mut errors) = (0u64, 0u64, 0u64);
    for r in results {
        let r = r?;
        done += r.completed;
        all += r.all;
        errors += r.errors;
    }
    anyhow::ensure!(errors == 0, "{prefix}: {errors} requests failed");
    round.insert(
        format!("{prefix}_req_per_s"),
        done as f64 / o.window.as_secs_f64(),
    );
    round.insert(
        format!("{prefix}_cpu_us_per_req"),
        (cpu1 - cpu0) / all.max(1) as f64,
    );
    round.insert(
        format!("{prefix}_cpu_util"),
        (cpu1 - cpu0) / 1e6 / (o.window + o.warmup).as_secs_f64(),
    );
    Ok(())
}

pub async fn run(o: &Opts) -> Result<Report> {
    let mut rep = Report::new("throughput");
    let (n_conns, inflight) = if o.tiny { (2, 4) } else { (16, 64) };
    rep.param("connections", n_conns);
    rep.param("inflight_per_connection", inflight);
    rep.param("payload_bytes", o.payload);
    rep.param("rounds", o.rounds);
    rep.param("window_s", o.window.as_secs_f64());
    let dir = o.rundir()?;
    let (dp, up) = o.start_dataplane(&dir, true)?;
    let up = up.expect("upstream");
    let relay = ServerProc::spawn(
        "relay",
        &[
            "relay".into(),
            "--dir".into(),
            dir.path().display().to_string(),
            "--upstream".into(),
            up.addr("grpc")?.to_string(),
        ],
        o.server_cpu(),
    )?;
    let net = Net::new(&dir.ca(), 4)?;
    let mut dp_conns = Vec::new();
    let mut relay_conns = Vec::new();
    for i in 0..n_conns {
        let (mut c, _) = dp_session(&net, dp.addr("quic")?, &format!("tp-{i}")).await?;
        if i == 0 {
            wait_upstream_ready(&mut c).await?;
        }
        dp_conns.push(c);
        relay_conns.push(Conn::open(net.connect(relay.addr("quic")?).await?, &[]).await?);
    }
    for r in 0..o.rounds {
        progress(format!("throughput round {}/{}", r + 1, o.rounds));
        let mut round = Round::new();
        saturate(o, &mut relay_conns, inflight, &relay, &mut round, "relay").await?;
        saturate(o, &mut dp_conns, inflight, &dp, &mut round, "dp").await?;
        rep.rounds.push(round);
    }
    rep.median_all();
    let fields = rep.fields.clone();
    let f = |k: &str| fields[k];
    rep.checks.push(Check::ratio(
        "req/s vs bare relay",
        f("dp_req_per_s"),
        f("relay_req_per_s"),
        Cmp::AtLeast,
        0.8,
    ));
    rep.checks.push(Check::ratio(
        "CPU-us/request vs bare relay",
        f("dp_cpu_us_per_req"),
        f("relay_cpu_us_per_req"),
        Cmp::AtMost,
        1.25,
    ));
    rep.notes.push(format!(
        "CPU from /proc/PID/stat utime+stime ({} ticks/s) over warm-up+window+drain, divided by every reply in that span",
        crate::util::clk_tck()
    ));
    Ok(rep)
}
