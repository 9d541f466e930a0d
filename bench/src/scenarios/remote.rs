//! rtt, push, broadcast and sessions against given addresses (`--target-quic`, `--target-push`,
//! `--ca`, a token source): the client side of each scenario, unchanged, against a deployment
//! gate-bench did not start. No baseline can run next to it (the baselines are processes with
//! the data plane's settings on this machine), so these reports carry absolute figures only;
//! their checks are marked "(report)" except the correctness ones (gaps, duplicates, errors).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;

use super::Opts;
use crate::client::{Net, PushStats, Reply, closed_loop, dp_session, push_reader};
use crate::report::{Check, Cmp, Report, Round};
use crate::target::Target;
use crate::util::{now_ns, progress, rss_bytes};

/// Scenarios that run against given addresses.
pub const SUPPORTED: &[&str] = &["rtt", "push", "broadcast", "sessions", "load"];

const NO_BASELINE: &str = "against given addresses: absolute figures only (no in-run baseline: the baselines must run on the same machine with the data plane's own settings; compare with a local `gate-bench` run of the same scenario)";

fn report(name: &str, o: &Opts, t: &Target) -> Report {
    let mut rep = Report::new(name);
    rep.param("target", t.describe());
    rep.param("rounds", o.rounds);
    rep.param("window_s", o.window.as_secs_f64());
    rep.notes.push(NO_BASELINE.into());
    rep
}

fn report_only(rep: &mut Report, name: &str, v: f64, unit: &str) {
    let mut c = Check::absolute(name, v, Cmp::AtLeast, 0.0, unit);
    c.goal = "(report)".into();
    c.met = true;
    rep.checks.push(c);
}

fn first_addr(t: &Target) -> Result<SocketAddr> {
    t.quic_now()
        .first()
        .copied()
        .context("no --target-quic address")
}

/// The demo upstream (and most upstreams) parse the payload: `echo <text>` answers with it.
fn echo_payload(size: usize) -> Vec<u8> {
    let mut p = b"echo ".to_vec();
    p.resize(size.max(8), b'x');
    p
}

pub async fn rtt(o: &Opts, t: &Target) -> Result<Report> {
    let mut rep = report("rtt", o, t);
    let net = t.net(1)?;
    let addr = first_addr(t)?;
    let (mut sess, _) = dp_session(&net, addr, "gate-bench-rtt").await?;
    super::wait_upstream_ready(&mut sess).await?;
    let payload = echo_payload(o.payload);
    let levels = [1usize, 64];
    rep.param("payload_bytes", payload.len());
    rep.param("inflight", serde_json::json!(levels));
    for r in 0..o.rounds {
        let mut round = Round::new();
        for k in levels {
            progress(format!(
                "rtt (target) round {}/{} inflight {k}",
                r + 1,
                o.rounds
            ));
            let d =
                closed_loop(&mut sess, k, &payload, o.warmup, o.window, Reply::Response).await?;
            round.insert(format!("dp_k{k}_errors"), d.errors as f64);
            super::rtt::record(
                &mut round,
                &format!("dp_k{k}"),
                d.lat,
                d.completed,
                o.window,
            );
        }
        rep.rounds.push(round);
    }
    rep.median_all();
    for k in levels {
        for p in ["p50", "p99", "p999"] {
            let v = rep.fields[&format!("dp_k{k}_{p}_us")];
            report_only(&mut rep, &format!("{p} k={k}"), v, "us");
        }
        let v = rep.fields[&format!("dp_k{k}_req_per_s")];
        report_only(&mut rep, &format!("req/s k={k}"), v, "/s");
        let e = rep.fields[&format!("dp_k{k}_errors")];
        rep.checks.push(Check::absolute(
            &format!("gateway errors k={k} (median round)"),
            e,
            Cmp::AtMost,
            0.0,
            "",
        ));
    }
    Ok(rep)
}

/// `n` sessions spread over the target's addresses, each with a push reader.
async fn readers(
    net: &Arc<Net>,
    t: &Target,
    prefix: &str,
    n: usize,
    stats: &Arc<PushStats>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<(Vec<String>, super::push::Readers)> {
    let addrs = t.quic_now();
    anyhow::ensure!(!addrs.is_empty(), "no --target-quic address");
    let run = now_ns();
    let openids: Vec<String> = (0..n).map(|i| format!("{prefix}-{run}-{i}")).collect();
    let conns = crate::client::bounded(
        openids.iter().cloned().enumerate().collect(),
        64,
        |(i, id)| {
            let net = net.clone();
            let addr = addrs[i % addrs.len()];
            async move { dp_session(&net, addr, &id).await }
        },
    )
    .await;
    let mut rs = Vec::new();
    for c in conns {
        let (c, _) = c?;
        rs.push(tokio::spawn(push_reader(
            c,
            stats.clone(),
            true,
            stop.clone(),
        )));
    }
    Ok((openids, rs))
}

pub async fn push(o: &Opts, t: &Target) -> Result<Report> {
    let mut rep = report("push", o, t);
    let push_addr = t.push_addr("push")?;
    let n = o.fanout;
    let callers = if o.tiny { 4 } else { 64 };
    rep.param("sessions", n);
    rep.param("concurrent_push_rpcs", callers);
    rep.param("payload_bytes", o.payload);
    let net = Arc::new(t.net(4)?);
    let stats = Arc::new(PushStats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    progress(format!("push (target): connecting {n} sessions"));
    let (openids, rs) = readers(&net, t, "gb-push", n, &stats, &stop_rx).await?;
    let openids = Arc::new(openids);
    let channel = crate::servers::upstream_channel(&push_addr.to_string())?;
    for r in 0..o.rounds {
        progress(format!("push (target) round {}/{}", r + 1, o.rounds));
        let mut round = Round::new();
        super::push::push_window(
            &channel, &openids, callers, 1, o.payload, o.window, &stats, &mut round,
        )
        .await?;
        rep.rounds.push(round);
    }
    let _ = stop_tx.send(true);
    for r in rs {
        let _ = r.await;
    }
    rep.median_all();
    let gaps = stats.gaps.load(Ordering::Relaxed) as f64;
    let dups = stats.dups.load(Ordering::Relaxed) as f64;
    rep.field("dp_gaps_total", gaps);
    rep.field("dp_dups_total", dups);
    let f = rep.fields.clone();
    report_only(&mut rep, "deliveries/s", f["dp_deliveries_per_s"], "/s");
    report_only(&mut rep, "p99 push latency", f["dp_push_p99_us"], "us");
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
    rep.checks.push(Check::absolute(
        "undelivered (median round)",
        f["dp_undelivered"],
        Cmp::AtMost,
        0.0,
        "",
    ));
    rep.notes.push("push latency: from just before the PushToClient call to the client reading the frame (both in this process)".into());
    Ok(rep)
}

pub async fn broadcast(o: &Opts, t: &Target) -> Result<Report> {
    let mut rep = report("broadcast", o, t);
    let push_addr = t.push_addr("broadcast")?;
    let n = o.fanout;
    rep.param("sessions", n);
    rep.param("payload_bytes", o.payload);
    let net = Arc::new(t.net(8)?);
    let stats = Arc::new(PushStats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    progress(format!("broadcast (target): connecting {n} sessions"));
    let (_, rs) = readers(&net, t, "gb-bc", n, &stats, &stop_rx).await?;
    let mut client =
        GatewayServiceClient::new(crate::servers::upstream_channel(&push_addr.to_string())?);
    super::broadcast::measure(
        o,
        &mut rep,
        &mut client,
        &stats,
        n,
        "broadcast (target)",
        "our sessions",
    )
    .await?;
    let _ = stop_tx.send(true);
    for r in rs {
        let _ = r.await;
    }
    let last = rep.fields["last_delivery_ms"];
    report_only(&mut rep, "time to last delivery", last, "ms");
    rep.notes.push("BroadcastToClients reaches every session of the deployment, not only ours: `queued` counts them all; delivery is checked on our sessions".into());
    Ok(rep)
}

pub async fn sessions(o: &Opts, t: &Target) -> Result<Report> {
    use super::sessions::{Target as Kind, setup_once, setup_rate, setup_workers};
    let mut rep = report("sessions", o, t);
    let n = o.sessions;
    let addr = first_addr(t)?;
    rep.param("idle_sessions", n);
    rep.param("setup_workers", setup_workers(o));
    let net = Arc::new(t.net(16)?);
    progress(format!("sessions (target): holding {n} idle sessions"));
    let before = t.pid.map(rss_bytes).transpose()?;
    let t0 = Instant::now();
    let cfg = net.config.clone();
    let run = now_ns();
    let results = crate::client::bounded((0..n).collect(), 64, |i| {
        let net = net.clone();
        let cfg = cfg.clone();
        async move { setup_once(&net, &cfg, addr, Kind::Dp, &format!("gb-idle-{run}-{i}")).await }
    })
    .await;
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    let mut held = Vec::with_capacity(n);
    for r in results {
        held.push(r?);
    }
    rep.field("dp_open_rate_at_scale_per_s", rate);
    if let (Some(pid), Some(before)) = (t.pid, before) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_bytes(pid)?;
        let per = after.saturating_sub(before) as f64 / n.max(1) as f64;
        rep.field("dp_rss_bytes_per_session", per);
        rep.checks.push(Check::absolute(
            &format!("RSS per idle session at {n}"),
            per,
            Cmp::AtMost,
            16384.0,
            "bytes",
        ));
    } else {
        rep.notes.push(
            "RSS per session: not measured (give --target-pid PID of a local data-plane process)"
                .into(),
        );
    }
    for c in &held {
        c.conn.close(0u32.into(), b"done");
    }
    drop(held);
    let ca = t.ca.clone();
    for r in 0..o.rounds {
        progress(format!(
            "sessions (target) setup round {}/{}",
            r + 1,
            o.rounds
        ));
        let mut round = Round::new();
        let (f, _) = setup_rate(o, &net, &ca, addr, Kind::Dp, false, "gbf").await?;
        round.insert("dp_full_per_s".into(), f);
        let (res, offered) = setup_rate(o, &net, &ca, addr, Kind::Dp, true, "gbr").await?;
        round.insert("dp_resumed_per_s".into(), res);
        round.insert(
            "dp_resumed_tickets_offered_per_s".into(),
            offered as f64 / o.window.as_secs_f64(),
        );
        rep.rounds.push(round);
    }
    rep.median_all();
    let f = rep.fields.clone();
    report_only(&mut rep, "full setups/s", f["dp_full_per_s"], "/s");
    rep.checks.push(Check::ratio(
        "resumed vs full setups/s",
        f["dp_resumed_per_s"],
        f["dp_full_per_s"],
        Cmp::AtLeast,
        2.0,
    ));
    Ok(rep)
}
