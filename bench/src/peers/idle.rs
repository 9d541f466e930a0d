//! Idle connections: RSS growth of the server process per idle client connection, TLS on for
//! all (QUIC/TLS 1.3 for GateSvr; TLS 1.3 over TCP for NATS and MQTT). Each round starts a fresh
//! server, reads VmRSS (/proc/PID/status) after a settle, opens `--idle-conns` connections
//! (64 handshakes at a time), waits 2 s and reads VmRSS again.
//!
//! A GateSvr connection carries a started session (Start/StartResponse done); a NATS connection
//! has done CONNECT + PING/PONG; an MQTT connection has done CONNECT/CONNACK and subscribed to
//! nothing. The clients stay quiet: QUIC keep-alives (10 s) on GateSvr, 300 s MQTT keep-alive,
//! NATS's 2 min server pings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rumqttc::{Event, Packet};
use tokio::sync::watch;

use super::{PeersArgs, mqtt_options, nats_connect, start_mosquitto, start_nats};
use crate::client::{Net, dp_session};
use crate::report::{Report, Round};
use crate::scenarios::Opts;
use crate::util::progress;

const SETTLE: Duration = Duration::from_secs(2);

/// (per-connection RSS growth in bytes, RSS before, handshakes/s while opening, failed opens)
type Measured = (f64, f64, f64, u64);

/// Keeps the connections that opened; a few may time out on a loaded machine (counted, and
/// RSS is divided by the ones held). More than 5% failing fails the run.
fn held<T>(results: Vec<Result<T>>, n: usize) -> Result<(Vec<T>, u64)> {
    let mut ok = Vec::with_capacity(n);
    let mut failed = 0u64;
    let mut first_err = None;
    for r in results {
        match r {
            Ok(c) => ok.push(c),
            Err(e) => {
                failed += 1;
                first_err.get_or_insert(e);
            }
        }
    }
    if failed as usize * 20 > n {
        let e = first_err.map(|e| format!("{e:#}")).unwrap_or_default();
        bail!("{failed} of {n} connections failed (first: {e})");
    }
    Ok((ok, failed))
}

async fn gatesvr(o: &Opts, n: usize) -> Result<Measured> {
    let dir = o.rundir()?;
    let (dp, _) = o.start_dataplane(&dir, false)?;
    let net = Arc::new(Net::new(&dir.ca(), 16)?);
    let addr = dp.addr("quic")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = dp.rss()? as f64;
    let t0 = Instant::now();
    let conns = crate::client::bounded((0..n).collect(), 64, |i| {
        let net = net.clone();
        async move { dp_session(&net, addr, &format!("idle-{i}")).await }
    })
    .await;
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    let (held, failed) = held(conns, n)?;
    tokio::time::sleep(SETTLE).await;
    let after = dp.rss()? as f64;
    for (c, _) in &held {
        c.conn.close(0u32.into(), b"done");
    }
    Ok(((after - before) / held.len() as f64, before, rate, failed))
}

async fn nats(o: &Opts, args: &PeersArgs, n: usize) -> Result<Measured> {
    let dir = o.rundir()?;
    let ca = dir.ca();
    let (server, url) = start_nats(o, &dir.path(), args.peer_limit)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss()? as f64;
    let t0 = Instant::now();
    let conns = crate::client::bounded((0..n).collect(), 64, |_| {
        let (url, ca) = (url.clone(), ca.clone());
        async move {
            let c = nats_connect(&url, &ca).await?;
            c.flush().await?;
            anyhow::Ok(c)
        }
    })
    .await;
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    let (held, failed) = held(conns, n)?;
    tokio::time::sleep(SETTLE).await;
    let after = server.rss()? as f64;
    let count = held.len() as f64;
    // Close them now: a dropped async-nats client closes its socket only eventually, and the
    // next system needs the file descriptors.
    crate::client::bounded(held, 64, |c| async move {
        let _ = c.drain().await;
    })
    .await;
    drop(server);
    Ok(((after - before) / count, before, rate, failed))
}

async fn mqtt(o: &Opts, args: &PeersArgs, n: usize) -> Result<Measured> {
    let dir = o.rundir()?;
    let ca = dir.ca();
    let (server, port) = start_mosquitto(o, &dir.path(), args.peer_limit)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss()? as f64;
    let (stop_tx, stop_rx) = watch::channel(false);
    let connected = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (client, mut eventloop) =
            rumqttc::AsyncClient::new(mqtt_options(&format!("idle-{i}"), port, &ca)?, 4);
        let (connected_n, errors_n, mut stop) =
            (connected.clone(), errors.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let _client = client; // dropping it would end the event loop
            loop {
                let ev = tokio::select! {
                    ev = eventloop.poll() => ev,
                    _ = stop.changed() => return,
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected_n.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        errors_n.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }));
        // At most 64 handshakes outstanding, as for the other two.
        while (i as u64 + 1).saturating_sub(connected.load(Ordering::Relaxed)) > 64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if t0.elapsed() > Duration::from_secs(300) {
                bail!(
                    "MQTT connections stalled ({} errors)",
                    errors.load(Ordering::Relaxed)
                );
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while connected.load(Ordering::Relaxed) < n as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} MQTT connections acknowledged ({} errors)",
                connected.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let after = server.rss()? as f64;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    drop(server);
    Ok(((after - before) / n as f64, before, rate, 0))
}

/// Descriptors open in this process (the load generator holds one per TCP connection).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Waits (up to 30 s) until the previous system's client sockets are closed: the open-file
/// limit (20,000 on the reference machine, not raisable in its container) must hold the next
/// system's connections.
async fn settle_fds(baseline: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_fds() > baseline + 256 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if open_fds() > baseline + 256 {
        progress(format!("peers idle: {} descriptors still open", open_fds()));
    }
}

pub async fn run(o: &Opts, args: &PeersArgs) -> Result<Report> {
    let mut rep = Report::new("peers-idle");
    let n = if o.tiny { 20 } else { args.idle_conns.max(1) };
    rep.param("idle_connections", n);
    rep.param("rounds", o.rounds);
    rep.param(
        "certificate",
        "ECDSA P-256 (gatesvr_common::certs), TLS 1.3 everywhere",
    );
    let fds0 = open_fds();
    for r in 0..o.rounds {
        let mut round = Round::new();
        progress(format!(
            "peers idle round {}/{}: {n} GateSvr sessions",
            r + 1,
            o.rounds
        ));
        let (per, base, rate, failed) = gatesvr(o, n).await?;
        round.insert("gs_rss_bytes_per_conn".into(), per);
        round.insert("gs_failed_opens".into(), failed as f64);
        round.insert("gs_rss_base_bytes".into(), base);
        round.insert("gs_open_per_s".into(), rate);
        settle_fds(fds0).await;
        progress(format!(
            "peers idle round {}/{}: {n} MQTT connections",
            r + 1,
            o.rounds
        ));
        let (per, base, rate, failed) = mqtt(o, args, n).await?;
        round.insert("mqtt_rss_bytes_per_conn".into(), per);
        round.insert("mqtt_failed_opens".into(), failed as f64);
        round.insert("mqtt_rss_base_bytes".into(), base);
        round.insert("mqtt_open_per_s".into(), rate);
        settle_fds(fds0).await;
        progress(format!(
            "peers idle round {}/{}: {n} NATS connections",
            r + 1,
            o.rounds
        ));
        let (per, base, rate, failed) = nats(o, args, n).await?;
        round.insert("nats_rss_bytes_per_conn".into(), per);
        round.insert("nats_failed_opens".into(), failed as f64);
        round.insert("nats_rss_base_bytes".into(), base);
        round.insert("nats_open_per_s".into(), rate);
        settle_fds(fds0).await;
        rep.rounds.push(round);
    }
    rep.median_all();
    let f = rep.fields.clone();
    let f = |k: &str| f[k];
    rep.checks.push(super::vs(
        &format!("[NATS] RSS bytes per idle connection at {n}"),
        f("gs_rss_bytes_per_conn"),
        f("nats_rss_bytes_per_conn"),
        true,
    ));
    rep.checks.push(super::vs(
        &format!("[Mosquitto] RSS bytes per idle connection at {n}"),
        f("gs_rss_bytes_per_conn"),
        f("mqtt_rss_bytes_per_conn"),
        true,
    ));
    rep.notes.push("RSS = VmRSS of the server process (/proc/PID/status), growth per connection after a 2 s settle; a fresh server per round. *_open_per_s (fields only: the client side differs per protocol) includes the session Start for GateSvr and CONNECT for the peers".into());
    Ok(rep)
}
