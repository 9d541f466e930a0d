//! broadcast: one BroadcastToClients to N connected sessions; time from the call until the last
//! session has the push (and the median session). Reported per round, median of rounds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use gatesvr_proto::upstream::BroadcastRequest;
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;

use super::Opts;
use super::push::{await_deliveries, push_data, sessions_with_readers};
use crate::client::{Net, PushStats};
use crate::report::{Check, Cmp, Report, Round};
use crate::util::progress;

pub async fn run(o: &Opts) -> Result<Report> {
    if let Some(t) = &o.target {
        return super::remote::broadcast(o, t).await;
    }
    let mut rep = Report::new("broadcast");
    let n = if o.tiny {
        o.fanout
    } else {
        o.fanout.max(10_000)
    };
    rep.param("sessions", n);
    rep.param("payload_bytes", o.payload);
    rep.param("rounds", o.rounds);
    let dir = o.rundir()?;
    let (dp, _) = o.start_dataplane(&dir, false)?;
    let net = Arc::new(Net::new(&dir.ca(), 8)?);
    let stats = Arc::new(PushStats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    progress(format!("broadcast: connecting {n} sessions"));
    let (_, readers) =
        sessions_with_readers(&net, dp.addr("quic")?, "bc", n, &stats, &stop_rx).await?;
    let mut client = GatewayServiceClient::new(crate::servers::upstream_channel(
        &dp.addr("grpc")?.to_string(),
    )?);
    // One warm-up broadcast (connections, channel).
    client
        .broadcast_to_clients(BroadcastRequest {
            msg_type: "warm".into(),
            data: push_data(o.payload).to_vec(),
            ..Default::default()
        })
        .await?;
    await_deliveries(&stats, n as u64, Duration::from_secs(30)).await;
    stats.reset();
    measure(o, &mut rep, &mut client, &stats, n, "broadcast", "sessions").await?;
    let _ = stop_tx.send(true);
    for r in readers {
        let _ = r.await;
    }
    rep.checks.push(Check::absolute(
        "time to last delivery (report)",
        rep.fields["last_delivery_ms"],
        Cmp::AtLeast,
        0.0,
        "ms",
    ));
    Ok(rep)
}

/// `o.rounds` broadcasts, each awaited on the `n` sessions counted by `stats`, into `rep`
/// (median of rounds), with the gap, duplicate and missing-session checks.
pub async fn measure(
    o: &Opts,
    rep: &mut Report,
    client: &mut GatewayServiceClient<tonic::transport::Channel>,
    stats: &PushStats,
    n: usize,
    label: &str,
    whose: &str,
) -> Result<()> {
    for r in 0..o.rounds {
        progress(format!("{label} round {}/{}", r + 1, o.rounds));
        let mut round = Round::new();
        let _ = stats.reset();
        let t0 = Instant::now();
        let resp = client
            .broadcast_to_clients(BroadcastRequest {
                msg_type: "bench".into(),
                data: push_data(o.payload).to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let rpc = t0.elapsed();
        let complete = await_deliveries(stats, n as u64, Duration::from_secs(60)).await;
        let (delivered, mut lat) = stats.reset();
        round.insert("queued".into(), f64::from(resp.queued));
        round.insert("rejected".into(), f64::from(resp.rejected));
        round.insert("delivered".into(), delivered as f64);
        round.insert("rpc_ms".into(), rpc.as_secs_f64() * 1e3);
        round.insert("last_delivery_ms".into(), lat.pct_us(100.0) / 1e3);
        round.insert("median_delivery_ms".into(), lat.pct_us(50.0) / 1e3);
        round.insert("complete".into(), if complete { 1.0 } else { 0.0 });
        rep.rounds.push(round);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rep.median_all();
    let gaps = stats.gaps.load(Ordering::Relaxed) as f64;
    let dups = stats.dups.load(Ordering::Relaxed) as f64;
    rep.field("gaps_total", gaps);
    rep.field("dups_total", dups);
    rep.checks
        .push(Check::absolute("gaps", gaps, Cmp::AtMost, 0.0, ""));
    rep.checks
        .push(Check::absolute("duplicates", dups, Cmp::AtMost, 0.0, ""));
    let missing = n as f64 - rep.fields["delivered"];
    rep.checks.push(Check::absolute(
        &format!("{whose} missing the broadcast (median round)"),
        missing,
        Cmp::AtMost,
        0.0,
        "",
    ));
    Ok(())
}
