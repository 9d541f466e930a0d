//! load: steady clients for a duration, against given addresses (`--target-quic` or
//! `--target-quic-file`), or against a local 3+3-node cluster started here when none is given.
//! What deploy/loadgen.py does with gate-client processes, in one process with raw-frame
//! sessions that reconnect on their own (dead node: to another address; GoAway: to its target).
//!
//! - listeners: sessions receiving pushes. With `--target-push` the pushes come from here
//!   (PushToClient, `--durable` optional), round robin over listeners; without it through the
//!   demo upstream's chat room: every listener (all in zone 001) joins a room and one more
//!   session `say`s numbered messages there, which the upstream pushes to every member.
//! - requesters: sessions sending `echo` requests at `--rate` each.
//!
//! Every sample is tagged with the phase read from `--phase-file` (e.g. before/during/after,
//! written by deploy/cluster.sh). Reports failed requests and latency per phase, pushes lost
//! (accepted but never delivered), duplicates, gaps, and how sessions reconnected.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use gatesvr_proto::client::ResumeStatus;
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_proto::upstream::{PushToClientRequest, TargetType};
use parking_lot::Mutex;

use super::Opts;
use crate::report::{Check, Cmp, Report};
use crate::session::{Endpoints, Session, SessionConfig, quic_config};
use crate::util::{now_ns, progress};

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// How long to run (it also stops when --stop-file appears).
    #[arg(long, default_value = "60s", value_parser = crate::humantime_dur)]
    pub duration: Duration,
    /// Sessions receiving pushes.
    #[arg(long, default_value_t = 24)]
    pub listeners: usize,
    /// Sessions sending requests.
    #[arg(long, default_value_t = 8)]
    pub requesters: usize,
    /// Requests per second per requester (one at a time: a slow answer slows its sender).
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    /// Push messages per second in all (chat mode: `say`s, each pushed to every listener).
    #[arg(long, default_value_t = 4.0)]
    pub push_rate: f64,
    /// Durable pushes (needs --target-push).
    #[arg(long)]
    pub durable: bool,
    /// A file holding the current phase label (re-read every 200 ms); default "steady".
    #[arg(long)]
    pub phase_file: Option<PathBuf>,
    /// Created once every session is connected (and in the room).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Stop when this file exists.
    #[arg(long)]
    pub stop_file: Option<PathBuf>,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

struct Sample {
    phase: String,
    lat_ns: u64,
    ok: bool,
}

fn phase_of(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "steady".into())
}

fn pct_ms(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    v[(((p / 100.0) * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)] as f64 / 1e6
}

fn zone001(prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|id| gatesvr_proto::zone::zone_index(id, 6) == 0)
        .take(n)
        .collect()
}

pub async fn run(o: &Opts, a: &LoadArgs) -> Result<Report> {
    let mut rep = Report::new("load");
    let tiny = o.tiny;
    let duration = if tiny {
        a.duration.min(Duration::from_secs(3))
    } else {
        a.duration
    };
    let (listeners_n, requesters_n) = if tiny {
        (a.listeners.min(4), a.requesters.min(2))
    } else {
        (a.listeners, a.requesters)
    };
    // Where to run: the given deployment, or a local cluster.
    let dir;
    let mut _local = None;
    let (net, endpoints, push_addr, ca) = match &o.target {
        Some(t) => (
            Arc::new(t.net(8)?),
            Endpoints::Target(t.clone()),
            t.push,
            t.ca.clone(),
        ),
        None => {
            dir = o.rundir()?;
            progress(
                "load: no --target-quic: starting a local cluster (3 control-plane, 3 data-plane nodes)",
            );
            let c = super::failover::start_local(o, &dir.path()).await?;
            let ep = Endpoints::Fixed(Arc::new(c.dp_quic.clone()));
            let net = Arc::new(crate::client::Net::new(&dir.ca(), 8)?);
            _local = Some(c);
            (net, ep, None, dir.ca())
        }
    };
    let chat = push_addr.is_none();
    anyhow::ensure!(
        !(a.durable && chat),
        "--durable needs --target-push (the demo upstream's chat pushes are not durable)"
    );
    rep.param(
        "target",
        o.target
            .as_ref()
            .map_or("local cluster".into(), |t| t.describe()),
    );
    rep.param("duration_s", duration.as_secs_f64());
    rep.param("listeners", listeners_n);
    rep.param("requesters", requesters_n);
    rep.param("requests_per_s_per_requester", a.rate);
    rep.param("push_messages_per_s", a.push_rate);
    rep.param(
        "pushes",
        if chat {
            "demo upstream chat room (say)".to_string()
        } else {
            format!(
                "PushToClient via {}, durable {}",
                push_addr.expect("set"),
                a.durable
            )
        },
    );
    rep.param("client_idle_timeout_ms", o.detect.as_millis() as u64);
    let cfg = Arc::new(SessionConfig {
        net,
        quic: quic_config(&ca, o.detect)?,
        endpoints,
        connect_timeout: (o.detect * 3).max(Duration::from_secs(3)),
    });
    let run_id = now_ns() ^ u64::from(std::process::id());
    let room = format!("gb-{run_id:x}");
    let listener_ids = zone001(&format!("gbl-{run_id:x}-"), listeners_n);
    let listeners: Vec<Session> = listener_ids
        .iter()
        .enumerate()
        .map(|(i, id)| Session::spawn(cfg.clone(), id.clone(), i, i))
        .collect();
    let requesters: Vec<Session> = (0..requesters_n)
        .map(|i| Session::spawn(cfg.clone(), format!("gbr-{run_id:x}-{i}"), i, i))
        .collect();
    let sayer = chat.then(|| {
        Session::spawn(
            cfg.clone(),
            zone001(&format!("gbs-{run_id:x}-"), 1).remove(0),
            0,
            0,
        )
    });
    // Connected, and (chat) every listener and the sayer in the room.
    let deadline = Instant::now() + Duration::from_secs(60);
    for s in listeners.iter().chain(&requesters).chain(sayer.iter()) {
        while !s.started() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not connect within 60 s",
                s.openid
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if chat {
        for s in listeners.iter().chain(sayer.iter()) {
            loop {
                let r = s
                    .request(
                        1,
                        format!("join {room}").into_bytes(),
                        Duration::from_secs(5),
                    )
                    .await;
                if r.as_ref().is_ok_and(|r| r.app_code == 0) {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{} could not join {room}: {r:?}",
                    s.openid
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    if let Some(f) = &a.ready_file {
        std::fs::write(f, "ready\n").with_context(|| format!("writing {}", f.display()))?;
    }
    progress(format!(
        "load: {} listeners, {} requesters connected; running {:?}",
        listeners.len(),
        requesters.len(),
        duration
    ));

    let phase = Arc::new(Mutex::new(phase_of(&a.phase_file)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let failures: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    // Expected contents per listener, pushes refused, and per-phase push counts.
    let expected: Arc<Vec<Mutex<Vec<u64>>>> = Arc::new(
        (0..listeners.len())
            .map(|_| Mutex::new(Vec::new()))
            .collect(),
    );
    let refused = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));

    let requests = async {
        let loops = requesters.iter().map(|s| {
            let (samples, failures, phase, stop) = (
                samples.clone(),
                failures.clone(),
                phase.clone(),
                stop_rx.clone(),
            );
            async move {
                let period = Duration::from_secs_f64(1.0 / a.rate.max(0.01));
                let mut j = 0u64;
                while !*stop.borrow() {
                    let t0 = Instant::now();
                    let ph = phase.lock().clone();
                    let r = s
                        .request(1, format!("echo {j}").into_bytes(), Duration::from_secs(10))
                        .await;
                    let lat_ns = t0.elapsed().as_nanos() as u64;
                    if let Err(e) = &r {
                        *failures.lock().entry(e.to_string()).or_default() += 1;
                    }
                    samples.lock().push(Sample {
                        phase: ph,
                        lat_ns,
                        ok: r.is_ok(),
                    });
                    j += 1;
                    tokio::time::sleep(period.saturating_sub(t0.elapsed())).await;
                }
            }
        });
        futures::future::join_all(loops).await;
    };
    let pushes = async {
        let period = Duration::from_secs_f64(1.0 / a.push_rate.max(0.01));
        let mut k = 0u64;
        let mut gw = match push_addr {
            Some(addr) => Some(GatewayServiceClient::new(crate::servers::upstream_channel(
                &addr.to_string(),
            )?)),
            None => None,
        };
        while !*stop_rx.borrow() {
            let t0 = Instant::now();
            k += 1;
            let ph = phase.lock().clone();
            match (&mut gw, &sayer) {
                (Some(gw), _) => {
                    let i = (k as usize) % listeners.len().max(1);
                    let mut req = tonic::Request::new(PushToClientRequest {
                        target_type: TargetType::Openid as i32,
                        target_id: listeners[i].openid.clone(),
                        msg_type: "bench".into(),
                        content: k.to_string(),
                        data: super::push::push_data(o.payload),
                        durable: a.durable,
                    });
                    req.set_timeout(Duration::from_secs(5));
                    match gw.push_to_client(req).await {
                        Ok(_) => expected[i].lock().push(k),
                        Err(_) => *refused.lock().entry(ph).or_default() += 1,
                    }
                }
                (None, Some(sayer)) => {
                    let r = sayer
                        .request(
                            1,
                            format!("say {room} {k}").into_bytes(),
                            Duration::from_secs(10),
                        )
                        .await;
                    match r {
                        // Every member got it queued (failed == 0): each listener must see it.
                        Ok(r) if r.app_code == 0 => {
                            for e in expected.iter() {
                                e.lock().push(k);
                            }
                        }
                        _ => *refused.lock().entry(ph).or_default() += 1,
                    }
                }
                (None, None) => unreachable!("chat mode has a sayer"),
            }
            tokio::time::sleep(period.saturating_sub(t0.elapsed())).await;
        }
        anyhow::Ok(())
    };
    let control = async {
        let end = Instant::now() + duration;
        while Instant::now() < end && !a.stop_file.as_ref().is_some_and(|f| f.exists()) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            *phase.lock() = phase_of(&a.phase_file);
        }
        let _ = stop_tx.send(true);
    };
    let ((), pushed, ()) = tokio::join!(requests, pushes, control);
    pushed?;
    // Settle: every expected push delivered, or 10 s.
    let settle = Instant::now() + Duration::from_secs(10);
    let missing = || -> u64 {
        listeners
            .iter()
            .zip(expected.iter())
            .map(|(s, e)| {
                let r = s.rec.lock();
                e.lock().iter().filter(|k| !r.seen.contains_key(k)).count() as u64
            })
            .sum()
    };
    while missing() > 0 && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // ---- report ----
    let mut by_phase: BTreeMap<String, (Vec<u64>, u64, u64)> = BTreeMap::new();
    for s in samples.lock().iter() {
        let e = by_phase.entry(s.phase.clone()).or_default();
        e.1 += 1;
        if s.ok {
            e.0.push(s.lat_ns);
        } else {
            e.2 += 1;
        }
    }
    let (mut total, mut failed) = (0u64, 0u64);
    for (ph, (lat, n, f)) in &mut by_phase {
        total += *n;
        failed += *f;
        rep.field(&format!("{ph}_requests"), *n as f64);
        rep.field(&format!("{ph}_failed_requests"), *f as f64);
        if !lat.is_empty() {
            rep.field(&format!("{ph}_req_p50_ms"), pct_ms(lat, 50.0));
            rep.field(&format!("{ph}_req_p99_ms"), pct_ms(lat, 99.0));
        }
    }
    rep.field("requests", total as f64);
    rep.field("failed_requests", failed as f64);
    for (ph, n) in refused.lock().iter() {
        rep.field(&format!("{ph}_pushes_refused"), *n as f64);
    }
    let (mut exp, mut lost, mut gaps, mut seq_dups, mut redelivered, mut unflagged) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut starts: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut losses, mut goaways, mut attempts) = (0u64, 0u64, 0u64);
    let mut push_lat = Vec::new();
    for (i, s) in listeners
        .iter()
        .chain(&requesters)
        .chain(sayer.iter())
        .enumerate()
    {
        let r = s.rec.lock();
        if let Some(e) = expected.get(i) {
            let e = e.lock();
            exp += e.len() as u64;
            lost += e.iter().filter(|k| !r.seen.contains_key(k)).count() as u64;
            gaps += r.gaps;
            seq_dups += r.seq_dups;
            redelivered += r.redelivered_dups;
            unflagged += r.unflagged_dups;
            push_lat.extend(r.push_lat.iter().map(|(_, l)| *l));
        }
        for st in r.starts.iter().skip(1) {
            let name = match st.status {
                ResumeStatus::Resumed => "resumed",
                ResumeStatus::Recovered => "recovered",
                ResumeStatus::SessionExpired => "expired",
                ResumeStatus::Trimmed => "trimmed",
                ResumeStatus::SeqAhead => "seq_ahead",
                ResumeStatus::New => "new",
            };
            *starts.entry(name).or_default() += 1;
        }
        losses += r.losses.len() as u64;
        goaways += r.goaways;
        attempts += r.failed_attempts;
    }
    rep.field("pushes_expected", exp as f64);
    rep.field("pushes_lost", lost as f64);
    rep.field("push_gaps", gaps as f64);
    rep.field("push_seq_dups", seq_dups as f64);
    rep.field("push_dups_redelivered", redelivered as f64);
    rep.field("push_dups_unflagged", unflagged as f64);
    if !push_lat.is_empty() {
        rep.field("push_p99_ms", pct_ms(&mut push_lat, 99.0));
    }
    for k in [
        "resumed",
        "recovered",
        "expired",
        "trimmed",
        "seq_ahead",
        "new",
    ] {
        rep.field(
            &format!("reconnects_{k}"),
            starts.get(k).copied().unwrap_or(0) as f64,
        );
    }
    rep.field("connections_lost", losses as f64);
    rep.field("goaways", goaways as f64);
    rep.field("failed_connect_attempts", attempts as f64);
    for (name, v) in [
        ("failed requests", failed as f64),
        ("pushes lost", lost as f64),
        ("push gaps", gaps as f64),
        ("duplicates without the redelivery flag", unflagged as f64),
        (
            "reconnects that could not resume (expired)",
            starts.get("expired").copied().unwrap_or(0) as f64,
        ),
    ] {
        rep.checks
            .push(Check::absolute(name, v, Cmp::AtMost, 0.0, ""));
    }
    for (e, n) in failures.lock().iter() {
        rep.notes.push(format!("{n} requests failed: {e}"));
    }
    rep.notes.push("pushes_lost: pushes the gateway (or, in chat mode, the upstream's say with failed = 0) accepted for a listener that never reached it; refused pushes are counted per phase and not expected".into());
    rep.notes.push("reconnects_*: each reconnect's resume status; a drained node's GoAway is followed to its target; a crashed node is noticed after the client's idle timeout".into());
    for s in listeners.into_iter().chain(requesters).chain(sayer) {
        s.join().await;
    }
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&rep)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(rep)
}
