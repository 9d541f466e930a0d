//! rtt: closed-loop request/response through a data-plane node to a trivial upstream, at 1 and
//! 64 requests in flight on one session. Baseline: a bare quinn echo server and a bare tonic
//! unary echo with the same payload; the limit is the sum of their round trips.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use gatesvr_proto::upstream::ProcessRequestRequest;

use super::{Opts, wait_upstream_ready};
use crate::client::{Conn, Net, Reply, closed_loop, dp_session};
use crate::report::{Check, Cmp, Report, Round};
use crate::servers::upstream_client;
use crate::util::{Lat, progress};

/// Closed loop of unary ProcessRequest calls, `inflight` at once over one channel.
pub async fn tonic_loop(
    addr: std::net::SocketAddr,
    inflight: usize,
    payload: &[u8],
    warmup: Duration,
    window: Duration,
) -> Result<(Lat, u64)> {
    let client = upstream_client(addr)?;
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + window;
    let payload = Arc::new(payload.to_vec());
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let mut client = client.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Lat::default();
            let mut n = 0u64;
            let mut seq = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                seq += 1;
                client
                    .process_request(ProcessRequestRequest {
                        msg_id: 1,
                        seq_id: seq,
                        payload: payload.to_vec().into(),
                        ..Default::default()
                    })
                    .await?;
                let t1 = Instant::now();
                if t0 >= measure_from && t1 < end {
                    lat.0.push((t1 - t0).as_nanos() as u64);
                    n += 1;
                }
            }
            anyhow::Ok((lat, n))
        }));
    }
    let mut lat = Lat::default();
    let mut n = 0;
    for t in tasks {
        let (l, c) = t.await??;
        lat.merge(l);
        n += c;
    }
    Ok((lat, n))
}

pub(crate) fn record(round: &mut Round, prefix: &str, mut lat: Lat, n: u64, window: Duration) {
    round.insert(format!("{prefix}_p50_us"), lat.pct_us(50.0));
    round.insert(format!("{prefix}_p99_us"), lat.pct_us(99.0));
    round.insert(format!("{prefix}_p999_us"), lat.pct_us(99.9));
    round.insert(
        format!("{prefix}_req_per_s"),
        n as f64 / window.as_secs_f64(),
    );
}

pub async fn run(o: &Opts) -> Result<Report> {
    if let Some(t) = &o.target {
        return super::remote::rtt(o, t).await;
    }
    let mut rep = Report::new("rtt");
    let dir = o.rundir()?;
    let (dp, up) = o.start_dataplane(&dir, true)?;
    let up = up.expect("started with an upstream");
    let bare = o.start_bare(&dir)?;
    let net = Net::new(&dir.ca(), 1)?;
    let (mut sess, _) = dp_session(&net, dp.addr("quic")?, "rtt-user").await?;
    wait_upstream_ready(&mut sess).await?;
    let mut echo = Conn::open(net.connect(bare.addr("quic")?).await?, b"E").await?;
    let payload = o.payload();
    let levels: &[usize] = &[1, 64];
    rep.param("payload_bytes", o.payload);
    rep.param("rounds", o.rounds);
    rep.param("window_s", o.window.as_secs_f64());
    rep.param("inflight", serde_json::json!(levels));
    for r in 0..o.rounds {
        let mut round = Round::new();
        for &k in levels {
            progress(format!("rtt round {}/{} inflight {k}", r + 1, o.rounds));
            // A: quinn echo, tonic echo; B: the data plane. Same window each.
            let q = closed_loop(&mut echo, k, &payload, o.warmup, o.window, Reply::Echo).await?;
            record(
                &mut round,
                &format!("quinn_k{k}"),
                q.lat,
                q.completed,
                o.window,
            );
            let (tl, tn) = tonic_loop(up.addr("grpc")?, k, &payload, o.warmup, o.window).await?;
            record(&mut round, &format!("tonic_k{k}"), tl, tn, o.window);
            let d =
                closed_loop(&mut sess, k, &payload, o.warmup, o.window, Reply::Response).await?;
            anyhow::ensure!(
                d.errors == 0,
                "{} requests failed through the data plane",
                d.errors
            );
            record(
                &mut round,
                &format!("dp_k{k}"),
                d.lat,
                d.completed,
                o.window,
            );
            // The limit: the sum of both round trips (per percentile), and the matching rate.
            for p in ["p50", "p99", "p999"] {
                let sum =
                    round[&format!("quinn_k{k}_{p}_us")] + round[&format!("tonic_k{k}_{p}_us")];
                round.insert(format!("limit_k{k}_{p}_us"), sum);
            }
            let (qr, tr) = (
                round[&format!("quinn_k{k}_req_per_s")],
                round[&format!("tonic_k{k}_req_per_s")],
            );
            let limit = if qr > 0.0 && tr > 0.0 {
                1.0 / (1.0 / qr + 1.0 / tr)
            } else {
                0.0
            };
            round.insert(format!("limit_k{k}_req_per_s"), limit);
        }
        rep.rounds.push(round);
    }
    rep.median_all();
    for &k in levels {
        let fields = rep.fields.clone();
        let f = |n: &str| fields[n];
        let checks = vec![
            Check::ratio(
                &format!("p50 k={k} vs quinn+tonic"),
                f(&format!("dp_k{k}_p50_us")),
                f(&format!("limit_k{k}_p50_us")),
                Cmp::AtMost,
                1.1,
            ),
            Check::ratio(
                &format!("p99 k={k} vs quinn+tonic"),
                f(&format!("dp_k{k}_p99_us")),
                f(&format!("limit_k{k}_p99_us")),
                Cmp::AtMost,
                1.5,
            ),
        ];
        rep.checks.extend(checks);
        rep.checks.push(Check {
            goal: "(report)".into(),
            met: true,
            ..Check::ratio(
                &format!("req/s k={k} vs quinn+tonic"),
                f(&format!("dp_k{k}_req_per_s")),
                f(&format!("limit_k{k}_req_per_s")),
                Cmp::AtLeast,
                0.0,
            )
        });
    }
    rep.notes.push("limit = quinn echo RTT + tonic unary RTT per percentile (medians of per-round values); req/s limit = 1/(1/quinn + 1/tonic)".into());
    drop((dp, bare));
    Ok(rep)
}
