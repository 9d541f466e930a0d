//! Fan-out: one message to N subscribers, TLS on every connection, same payload:
//!
//! - GateSvr: `BroadcastToClients` to N sessions; every session acks cumulatively (ClientAck).
//! - Mosquitto: QoS 1 publish to N subscribers of one topic; every subscriber PUBACKs.
//! - NATS core: publish to N subscribers of one subject; **no acknowledgements** (at most once).
//!
//! Per round and system: one message (time until the last subscriber has it), then a burst of
//! `--burst` messages (deliveries/s over [first publish, last delivery], and the time until the
//! last delivery). The payload carries the send time and (peers) a sequence number, so every
//! subscriber checks order: gaps and duplicates are counted for all three.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use bytes::{BufMut, Bytes};
use futures::StreamExt;
use gatesvr_proto::upstream::BroadcastRequest;
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use rumqttc::{Event, Packet, QoS};
use tokio::sync::watch;

use super::{PeersArgs, mqtt_options, nats_connect, start_mosquitto, start_nats, version, vs};
use crate::client::{Net, PushStats};
use crate::report::{Check, Cmp, Report, Round};
use crate::scenarios::Opts;
use crate::scenarios::push::{Meter, await_deliveries, push_data, sessions_with_readers_conns};
use crate::util::{cpu_us, now_ns, progress};

const TOPIC: &str = "bench/fanout";
const SUBJECT: &str = "bench.fanout";

/// Payload of a peer message: send time, sequence number, padding to `size`.
fn peer_payload(size: usize, seq: u64) -> Bytes {
    let mut b = Vec::with_capacity(size.max(16));
    b.put_u64_le(now_ns());
    b.put_u64_le(seq);
    b.resize(size.max(16), 0);
    b.into()
}

/// One subscriber's view of a peer message: order check, latency, delivery count.
fn on_message(stats: &PushStats, last: &mut u64, payload: &[u8]) {
    if payload.len() < 16 {
        return;
    }
    let t = now_ns();
    let sent = u64::from_le_bytes(payload[..8].try_into().expect("checked length"));
    let seq = u64::from_le_bytes(payload[8..16].try_into().expect("checked length"));
    if seq <= *last {
        stats.dups.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if seq > *last + 1 && *last != 0 {
        stats.gaps.fetch_add(seq - *last - 1, Ordering::Relaxed);
    }
    *last = seq;
    stats.delivered.fetch_add(1, Ordering::Relaxed);
    stats.last_delivery_ns.fetch_max(t, Ordering::Relaxed);
    stats.lat.lock().0.push(t.saturating_sub(sent));
}

/// What one system needs to publish a message or a burst to its subscribers.
enum Publisher {
    GateSvr(GatewayServiceClient<tonic::transport::Channel>),
    Mqtt(rumqttc::AsyncClient),
    Nats(async_nats::Client),
}

impl Publisher {
    /// Publishes `count` messages numbered from `*seq + 1`, as fast as the system accepts them.
    async fn publish(&mut self, size: usize, count: usize, seq: &mut u64) -> Result<()> {
        match self {
            Publisher::GateSvr(client) => {
                // Every broadcast of the burst in flight at once, as NATS's publisher sends the
                // whole burst before its one flush (each call returns once its message is queued
                // to every session). Until session 15 at most 8 were: a connection's task then
                // found ~8 pushes per wake-up and sent a datagram each time, ~2x the datagrams
                // per delivery of a full burst (docs/benchmarks.md, "Session 15").
                let results = crate::client::bounded((0..count).collect(), count, |_| {
                    let mut c = client.clone();
                    async move {
                        c.broadcast_to_clients(BroadcastRequest {
                            msg_type: "bench".into(),
                            data: push_data(size).to_vec(),
                            ..Default::default()
                        })
                        .await
                    }
                })
                .await;
                for r in results {
                    let r = r?.into_inner();
                    anyhow::ensure!(
                        r.rejected == 0,
                        "broadcast rejected at {} sessions",
                        r.rejected
                    );
                }
                *seq += count as u64;
            }
            Publisher::Mqtt(client) => {
                for _ in 0..count {
                    *seq += 1;
                    client
                        .publish_bytes(TOPIC, QoS::AtLeastOnce, false, peer_payload(size, *seq))
                        .await?;
                }
            }
            Publisher::Nats(client) => {
                for _ in 0..count {
                    *seq += 1;
                    client.publish(SUBJECT, peer_payload(size, *seq)).await?;
                }
                client.flush().await?;
            }
        }
        Ok(())
    }
}

struct System {
    name: &'static str,
    publisher: Publisher,
    stats: Arc<PushStats>,
    seq: u64,
    /// The server process (data plane, mosquitto, nats-server), for CPU per delivery.
    pid: u32,
    /// The subscribers' QUIC connections (GateSvr only), for packets per delivery.
    quic: Vec<quinn::Connection>,
}

/// Measures one message and one burst on `sys`; records `{prefix}_*` into `round`.
async fn measure(
    sys: &mut System,
    o: &Opts,
    n: usize,
    burst: usize,
    round: &mut Round,
) -> Result<()> {
    let p = sys.name;
    let patience = Duration::from_secs(if o.tiny { 20 } else { 120 });
    sys.stats.reset();
    let t0 = now_ns();
    sys.publisher.publish(o.payload, 1, &mut sys.seq).await?;
    let complete = await_deliveries(&sys.stats, n as u64, patience).await;
    let last = sys.stats.last_delivery_ns.load(Ordering::Relaxed);
    let (delivered, _) = sys.stats.reset();
    round.insert(
        format!("{p}_one_last_ms"),
        last.saturating_sub(t0) as f64 / 1e6,
    );
    round.insert(
        format!("{p}_one_missing"),
        (n as u64).saturating_sub(delivered) as f64,
    );
    if !complete {
        progress(format!(
            "peers fanout: {p}: one message reached {delivered} of {n}"
        ));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    sys.stats.reset();
    let target = (n * burst) as u64;
    let me = std::process::id();
    let (server_cpu0, client_cpu0) = (cpu_us(sys.pid)?, cpu_us(me)?);
    let meter = Meter::start(sys.pid, &sys.quic);
    let t0 = now_ns();
    sys.publisher
        .publish(o.payload, burst, &mut sys.seq)
        .await?;
    let complete = await_deliveries(&sys.stats, target, patience).await;
    let last = sys.stats.last_delivery_ns.load(Ordering::Relaxed);
    let (delivered, mut lat) = sys.stats.reset();
    // busy, run-queue wait and (GateSvr) packets per delivery: `{p}_burst_*`.
    meter.finish(&format!("{p}_burst"), &sys.quic, delivered, round);
    let per = |now: f64, before: f64| (now - before) / delivered.max(1) as f64;
    round.insert(
        format!("{p}_server_cpu_us_per_delivery"),
        per(cpu_us(sys.pid)?, server_cpu0),
    );
    // The load generator: every subscriber's client stack, and the publisher.
    round.insert(
        format!("{p}_client_cpu_us_per_delivery"),
        per(cpu_us(me)?, client_cpu0),
    );
    let secs = last.saturating_sub(t0) as f64 / 1e9;
    round.insert(format!("{p}_burst_last_ms"), secs * 1e3);
    round.insert(
        format!("{p}_deliveries_per_s"),
        delivered as f64 / secs.max(1e-9),
    );
    round.insert(
        format!("{p}_burst_missing"),
        target.saturating_sub(delivered) as f64,
    );
    round.insert(format!("{p}_burst_p50_ms"), lat.pct_us(50.0) / 1e3);
    if !complete {
        progress(format!(
            "peers fanout: {p}: burst reached {delivered} of {target}"
        ));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// N MQTT subscribers (QoS 1, auto PUBACK), each polled by its own task until `stop`.
async fn mqtt_subscribers(
    port: u16,
    ca: &std::path::Path,
    n: usize,
    stats: &Arc<PushStats>,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let ready = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..n {
        let opts = mqtt_options(&format!("fan-sub-{i}"), port, ca)?;
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 16);
        client.subscribe(TOPIC, QoS::AtLeastOnce).await?;
        let (stats, ready_n, errors_n, mut stop) =
            (stats.clone(), ready.clone(), errors.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let _client = client; // dropping it would end the event loop
            let mut last = 0u64;
            loop {
                let ev = tokio::select! {
                    ev = eventloop.poll() => ev,
                    _ = stop.changed() => return,
                };
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        on_message(&stats, &mut last, &p.payload)
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        ready_n.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        errors_n.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
        // Connect in waves of 64 (as the QUIC sessions are opened).
        if i % 64 == 63 {
            wait_count(&ready, (i + 1) as u64, &errors).await?;
        }
    }
    wait_count(&ready, n as u64, &errors).await?;
    Ok(tasks)
}

async fn wait_count(count: &AtomicU64, target: u64, errors: &AtomicU64) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::Relaxed) < target {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "only {} of {target} MQTT subscriptions acknowledged ({} connection errors)",
                count.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// N NATS subscribers, each its own connection, subscribed and flushed before this returns.
async fn nats_subscribers(
    url: &str,
    ca: &std::path::Path,
    n: usize,
    stats: &Arc<PushStats>,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let subs = crate::client::bounded((0..n).collect(), 64, |_| async move {
        let c = nats_connect(url, ca).await?;
        let s = c.subscribe(SUBJECT).await?;
        c.flush().await?;
        anyhow::Ok((c, s))
    })
    .await;
    let mut tasks = Vec::new();
    for s in subs {
        let (client, mut sub) = s?;
        let (stats, mut stop) = (stats.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let _client = client;
            let mut last = 0u64;
            loop {
                tokio::select! {
                    m = sub.next() => match m {
                        Some(m) => on_message(&stats, &mut last, &m.payload),
                        None => return,
                    },
                    _ = stop.changed() => return,
                }
            }
        }));
    }
    Ok(tasks)
}

pub async fn run(o: &Opts, args: &PeersArgs) -> Result<Report> {
    let mut rep = Report::new("peers-fanout");
    let n = o.fanout.max(1);
    let burst = if o.tiny { 3 } else { args.burst.max(1) };
    rep.param("subscribers", n);
    rep.param("burst_messages", burst);
    rep.param("payload_bytes", o.payload);
    rep.param("rounds", o.rounds);
    let dir = o.rundir()?;
    let ca = dir.ca();
    let (nats, url) = start_nats(o, &dir.path(), args.peer_limit)?;
    let (mosq, port) = start_mosquitto(o, &dir.path(), args.peer_limit)?;
    if let Some(b) = super::find_bin("nats-server") {
        rep.param("nats_server", version(&b, &["--version"]));
    }
    if let Some(b) = super::find_bin("mosquitto") {
        rep.param("mosquitto", version(&b, &["-h"]));
    }
    let (dp, _) = o.start_dataplane(&dir, false)?;
    let (stop_tx, stop_rx) = watch::channel(false);

    progress(format!("peers fanout: {n} GateSvr sessions"));
    let net = Arc::new(Net::new(&ca, 8)?);
    let gs_stats = Arc::new(PushStats::default());
    let (_, gs_readers, gs_quic) =
        sessions_with_readers_conns(&net, dp.addr("quic")?, "fan", n, &gs_stats, &stop_rx).await?;
    let gs_client = GatewayServiceClient::new(crate::servers::upstream_channel(
        &dp.addr("grpc")?.to_string(),
    )?);

    progress(format!("peers fanout: {n} MQTT subscribers"));
    let mq_stats = Arc::new(PushStats::default());
    let mq_tasks = mqtt_subscribers(port, &ca, n, &mq_stats, &stop_rx).await?;
    let (mq_pub, mut mq_loop) =
        rumqttc::AsyncClient::new(mqtt_options("fan-pub", port, &ca)?, 1024);
    let mut pub_stop = stop_rx.clone();
    let mq_pub_task = tokio::spawn(async move {
        loop {
            tokio::select! {
                ev = mq_loop.poll() => if ev.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                },
                _ = pub_stop.changed() => return,
            }
        }
    });

    progress(format!("peers fanout: {n} NATS subscribers"));
    let nats_stats = Arc::new(PushStats::default());
    let nats_tasks = nats_subscribers(&url, &ca, n, &nats_stats, &stop_rx).await?;
    let nats_pub = nats_connect(&url, &ca).await?;

    let mut systems = [
        System {
            name: "gs",
            publisher: Publisher::GateSvr(gs_client),
            stats: gs_stats.clone(),
            seq: 0,
            pid: dp.pid(),
            quic: gs_quic,
        },
        System {
            name: "mqtt",
            publisher: Publisher::Mqtt(mq_pub),
            stats: mq_stats.clone(),
            seq: 0,
            pid: mosq.pid,
            quic: Vec::new(),
        },
        System {
            name: "nats",
            publisher: Publisher::Nats(nats_pub),
            stats: nats_stats.clone(),
            seq: 0,
            pid: nats.pid,
            quic: Vec::new(),
        },
    ];
    // Warm-up: one message through each (connections, TLS sessions, first allocations).
    for sys in systems.iter_mut() {
        sys.publisher.publish(o.payload, 1, &mut sys.seq).await?;
        await_deliveries(&sys.stats, n as u64, Duration::from_secs(30)).await;
        sys.stats.reset();
    }
    for r in 0..o.rounds {
        progress(format!("peers fanout round {}/{}", r + 1, o.rounds));
        let mut round = Round::new();
        // Rotate the order each round.
        for i in 0..systems.len() {
            let k = (i + r) % systems.len();
            measure(&mut systems[k], o, n, burst, &mut round).await?;
        }
        rep.rounds.push(round);
    }
    if let Some(dir) = &args.profile {
        let http = dp.addr("ops")?;
        let sys = &mut systems[0];
        progress("peers fanout: profiling the data plane during bursts");
        let secs = if o.tiny { 1 } else { 10 };
        let prof = super::pprof_svg(http, secs);
        let load = async {
            let end = tokio::time::Instant::now() + Duration::from_secs(secs + 1);
            while tokio::time::Instant::now() < end {
                sys.publisher
                    .publish(o.payload, burst, &mut sys.seq)
                    .await?;
                await_deliveries(&sys.stats, (n * burst) as u64, Duration::from_secs(60)).await;
                sys.stats.reset();
            }
            anyhow::Ok(())
        };
        let (svg, load) = tokio::join!(prof, load);
        load?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("dataplane-fanout.svg"), svg?)?;
    }
    let _ = stop_tx.send(true);
    for t in gs_readers {
        let _ = t.await;
    }
    for t in mq_tasks.into_iter().chain(nats_tasks).chain([mq_pub_task]) {
        let _ = t.await;
    }
    rep.median_all();
    for (sys, stats) in [
        ("gs", &gs_stats),
        ("mqtt", &mq_stats),
        ("nats", &nats_stats),
    ] {
        rep.field(
            &format!("{sys}_gaps_total"),
            stats.gaps.load(Ordering::Relaxed) as f64,
        );
        rep.field(
            &format!("{sys}_dups_total"),
            stats.dups.load(Ordering::Relaxed) as f64,
        );
    }
    let f = rep.fields.clone();
    let f = |k: &str| f[k];
    for (peer, key) in [("Mosquitto QoS 1", "mqtt"), ("NATS core, no acks", "nats")] {
        rep.checks.push(vs(
            &format!("[{peer}] deliveries/s, burst of {burst} to {n}"),
            f("gs_deliveries_per_s"),
            f(&format!("{key}_deliveries_per_s")),
            false,
        ));
        rep.checks.push(vs(
            &format!("[{peer}] ms to last delivery, 1 message to {n}"),
            f("gs_one_last_ms"),
            f(&format!("{key}_one_last_ms")),
            true,
        ));
        rep.checks.push(vs(
            &format!("[{peer}] ms to last delivery, burst of {burst} to {n}"),
            f("gs_burst_last_ms"),
            f(&format!("{key}_burst_last_ms")),
            true,
        ));
    }
    for (peer, key) in [("Mosquitto QoS 1", "mqtt"), ("NATS core, no acks", "nats")] {
        rep.checks.push(vs(
            &format!("[{peer}] server CPU us per delivery, burst"),
            f("gs_server_cpu_us_per_delivery"),
            f(&format!("{key}_server_cpu_us_per_delivery")),
            true,
        ));
    }
    for sys in ["gs", "mqtt", "nats"] {
        let lost = f(&format!("{sys}_gaps_total"))
            + f(&format!("{sys}_dups_total"))
            + f(&format!("{sys}_burst_missing"))
            + f(&format!("{sys}_one_missing"));
        rep.checks.push(Check::absolute(
            &format!("{sys}: gaps + duplicates + missing"),
            lost,
            Cmp::AtMost,
            0.0,
            "",
        ));
    }
    rep.notes.push("GateSvr: BroadcastToClients (the whole burst in flight, as NATS publishes it before one flush; 8 calls until session 15), every session acks (ClientAck, cumulative, once per chunk read); Mosquitto: QoS 1 both ways (PUBACK from the broker to the publisher and from every subscriber), max_inflight_messages 1024 per subscriber (GateSvr's push window: session.max_queue, 1024 unacked); NATS core: no acknowledgements at all".into());
    rep.notes.push("server CPU us per delivery: utime+stime of the server process over a burst / deliveries; *_client_cpu_us_per_delivery (fields): the same for the load generator holding every subscriber".into());
    rep.notes.push("deliveries/s = messages x subscribers / (last delivery - first publish); every subscriber is its own TLS connection from the load generator (helper CPU)".into());
    drop((dp, nats, mosq));
    Ok(rep)
}
