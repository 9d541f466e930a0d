//! `gate-bench`: GateSvr's benchmarks. Every figure is a ratio against a baseline measured in
//! the same run, interleaved A/B/A/B, median of the rounds (see docs/benchmarks.md).
//!
//! ```text
//! gate-bench [--json] [--rounds 3] [--window 3s] <rtt|throughput|push|broadcast|sessions|claims|failover|scale|all>
//! gate-bench chart results.json > docs/benchmarks.svg
//! gate-bench serve <mode>      (internal: the processes under test)
//! ```

mod chart;
mod client;
mod peers;
mod report;
mod scenarios;
mod servers;
mod session;
mod target;
mod util;
mod wt;

/// The same allocator as the `gatesvr` binary: `gate-bench serve dataplane` is the data plane
/// under test, and the bare baseline, the upstreams and the load generator use it too, so every
/// side of a ratio runs on the same allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::report::Report;
use crate::scenarios::Opts;

#[derive(Debug, Parser)]
#[command(
    name = "gate-bench",
    version,
    about = "GateSvr benchmarks (ratios against in-run baselines)"
)]
struct Cli {
    /// JSON on stdout instead of a table (progress stays on stderr).
    #[arg(long, global = true)]
    json: bool,
    /// Rounds per scenario (A/B interleaved in each); the median is reported.
    #[arg(long, global = true, default_value_t = 3)]
    rounds: usize,
    /// Measurement window of each side in each round.
    #[arg(long, global = true, default_value = "3s", value_parser = humantime_dur)]
    window: Duration,
    /// Warm-up before each window (not recorded).
    #[arg(long, global = true, default_value = "300ms", value_parser = humantime_dur)]
    warmup: Duration,
    /// Smoke sizes: checks the harness, not speed.
    #[arg(long, global = true)]
    tiny: bool,
    /// Request/push payload in bytes.
    #[arg(long, global = true, default_value_t = 64)]
    payload: usize,
    /// Idle sessions opened by `sessions`.
    #[arg(long, global = true, default_value_t = 50_000)]
    sessions: usize,
    /// Sessions receiving pushes in `push` and `broadcast`.
    #[arg(long, global = true, default_value_t = 1000)]
    fanout: usize,
    /// Pushes per GatewayService call in `push`: 1 = PushToClient, more = PushBatch.
    #[arg(long, global = true, default_value_t = 1)]
    push_batch: usize,
    /// Directory for run data (certificates, raft logs, fsync files). Must be a real disk.
    #[arg(long, global = true, default_value = "target/bench-tmp")]
    base: PathBuf,
    /// Do not pin processes to CPUs.
    #[arg(long, global = true)]
    no_pin: bool,
    /// Clients' QUIC idle timeout in `failover` and `load`: how long a crashed node goes
    /// unnoticed (keep-alives every third of it).
    #[arg(long, global = true, default_value = "1s", value_parser = humantime_dur)]
    detect: Duration,
    /// Clients' UDP sockets in `failover`: `shared` (a few sockets that hear which node
    /// addresses refuse their datagrams, so a crashed node is noticed as the SDK notices it),
    /// `connected` (one per connection, connected to its node, as the SDK's: about twice the
    /// load generator's CPU per datagram) or `deaf` (shared sockets that ignore refusals: only
    /// the idle timeout notices a crash, as before session 12).
    #[arg(long, global = true, default_value = "shared")]
    client_sockets: client::Sockets,
    #[command(flatten)]
    target: target::TargetArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

fn humantime_dur(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Request round trip through a node to a trivial upstream vs quinn echo + tonic echo.
    Rtt,
    /// Saturating load: req/s and data-plane CPU-us/request vs a bare quinn->tonic relay.
    Throughput,
    /// Upstream pushes to N sessions with seq + acks vs bare quinn one-way streams.
    Push,
    /// One broadcast to N sessions: time until the last delivery.
    Broadcast,
    /// N idle sessions: RSS per session; handshakes/s full and resumed vs bare quinn.
    Sessions,
    /// WebTransport and WebSocket vs native QUIC: request RTT and RSS per idle session.
    Web,
    /// Session-ownership claims committed by a 3-node control plane vs fdatasync (and etcd).
    Claims,
    /// kill -9 of a data plane holding N sessions under durable pushes (resume time, pushes
    /// lost), then of the raft leader under request load (time to a new leader, failed requests).
    Failover,
    /// Steady clients (requests + pushes) against given addresses for a duration: failed
    /// requests, lost/duplicated pushes, resumed sessions, latency per phase.
    Load(scenarios::load::LoadArgs),
    /// Ownership at scale (not in `all`): N session lifecycles through a 3-process control
    /// plane, churn, a new node's complete view, backup restore/export of a large state.
    Scale(scenarios::scale::ScaleArgs),
    /// Every scenario in order, one report each.
    All,
    /// GateSvr side by side with NATS, Mosquitto and etcd (docs/benchmarks.md "Peers").
    Peers(peers::PeersArgs),
    /// Renders results (JSON lines or array from --json) as an SVG bar chart of ratios.
    Chart { input: PathBuf },
    /// Internal: a server process (data plane, baselines, control plane).
    #[command(hide = true)]
    Serve {
        #[command(subcommand)]
        mode: servers::Serve,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gate-bench: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn real_main(cli: Cli) -> Result<i32> {
    if let Cmd::Serve { mode } = cli.cmd {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(servers::run(mode))?;
        return Ok(0);
    }
    if let Cmd::Chart { input } = &cli.cmd {
        let reports = chart::load(input)?;
        print!("{}", chart::svg(&reports));
        return Ok(0);
    }
    let target = cli.target.target()?.map(std::sync::Arc::new);
    let pin = util::Pinning::detect(!cli.no_pin);
    pin.pin_self();
    let mut o = Opts {
        rounds: cli.rounds.max(1),
        window: cli.window,
        warmup: cli.warmup,
        tiny: cli.tiny,
        payload: cli.payload.max(8),
        base: cli.base.clone(),
        pin,
        sessions: cli.sessions,
        fanout: cli.fanout,
        push_batch: cli.push_batch.clamp(1, 1024),
        detect: cli.detect.max(Duration::from_millis(30)),
        client_sockets: cli.client_sockets,
        target,
    };
    if o.tiny {
        o.rounds = o.rounds.min(3);
        o.window = Duration::from_millis(200);
        o.warmup = Duration::from_millis(50);
        o.sessions = o.sessions.min(50);
        o.fanout = o.fanout.min(10);
    }
    util::progress(format!(
        "{}; {}; rounds {}, window {:?}",
        machine(),
        o.pin.describe(),
        o.rounds,
        o.window
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Cmd::Peers(args) = &cli.cmd {
        let code = peers::main(&rt, &o, args, cli.json, &machine())?;
        rt.shutdown_timeout(Duration::from_secs(2));
        return Ok(code);
    }
    let names: Vec<&str> = match cli.cmd {
        Cmd::Rtt => vec!["rtt"],
        Cmd::Throughput => vec!["throughput"],
        Cmd::Push => vec!["push"],
        Cmd::Broadcast => vec!["broadcast"],
        Cmd::Sessions => vec!["sessions"],
        Cmd::Web => vec!["web"],
        Cmd::Claims => vec!["claims"],
        Cmd::Failover => vec!["failover"],
        Cmd::Load(_) => vec!["load"],
        Cmd::Scale(_) => vec!["scale"],
        Cmd::All => vec![
            "rtt",
            "push",
            "sessions",
            "throughput",
            "broadcast",
            "claims",
            "failover",
        ],
        Cmd::Chart { .. } | Cmd::Serve { .. } | Cmd::Peers(_) => unreachable!("handled above"),
    };
    // Against given addresses only the client-side scenarios make sense.
    let names: Vec<&str> = if o.target.is_some() && matches!(cli.cmd, Cmd::All) {
        names
            .into_iter()
            .filter(|n| scenarios::remote::SUPPORTED.contains(n))
            .collect()
    } else {
        names
    };
    if o.target.is_some()
        && let Some(n) = names
            .iter()
            .find(|n| !scenarios::remote::SUPPORTED.contains(n))
    {
        anyhow::bail!(
            "{n} starts its own processes and cannot run against given addresses (supported: {})",
            scenarios::remote::SUPPORTED.join(", ")
        );
    }
    let mut failed = false;
    for name in names {
        let result: Result<Report> = rt.block_on(async {
            match name {
                "rtt" => scenarios::rtt::run(&o).await,
                "throughput" => scenarios::throughput::run(&o).await,
                "push" => scenarios::push::run(&o).await,
                "broadcast" => scenarios::broadcast::run(&o).await,
                "sessions" => scenarios::sessions::run(&o).await,
                "web" => scenarios::web::run(&o).await,
                "claims" => scenarios::claims::run(&o).await,
                "failover" => scenarios::failover::run(&o).await,
                "load" => match &cli.cmd {
                    Cmd::Load(args) => scenarios::load::run(&o, args).await,
                    _ => unreachable!(),
                },
                "scale" => match &cli.cmd {
                    Cmd::Scale(args) => scenarios::scale::run(&o, args).await,
                    _ => unreachable!(),
                },
                _ => unreachable!(),
            }
        });
        match result {
            Ok(mut rep) => {
                rep.param("machine", machine());
                if cli.json {
                    println!("{}", serde_json::to_string(&rep)?);
                } else {
                    rep.print_table();
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("gate-bench {name}: {e:#}");
            }
        }
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(if failed { 1 } else { 0 })
}

fn machine() -> String {
    // Not available_parallelism: this process is pinned to one CPU by now.
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    format!("{cpus} cpus ({model}), Linux {}", kernel.trim())
}
