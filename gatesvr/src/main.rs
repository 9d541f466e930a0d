//! `gatesvr`: the GateSvr server binary.
//!
//! - `gatesvr dataplane --config F`: one data-plane node.
//! - `gatesvr controlplane --config F`: one control-plane (raft) node.
//! - `gatesvr certs --out DIR`: a development CA with server and client certificates.
//! - `gatesvr dev`: the whole system on one machine (see [`dev`]).
//!
//! Exit codes: 0 clean stop, 64 configuration error (the message names the
//! key or file), 1 any other failure.

mod dev;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gatesvr_common::config::{ConfigError, EXIT_CONFIG};

#[derive(Parser, Debug)]
#[command(
    name = "gatesvr",
    version,
    about = "GateSvr: a QUIC gateway cluster for real-time apps",
    long_about = "GateSvr terminates clients' QUIC connections, keeps one resumable session per \
user, routes requests to the user's zone upstream over gRPC and delivers acknowledged, ordered \
pushes. `gatesvr dev` runs everything on this machine; the other commands run one process of a \
real deployment."
)]
struct Cli {
    /// Log as JSON lines (overrides `log.format`).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

/// The log settings in force: the config's, with `--log-json` applied.
fn log_config(mut cfg: gatesvr_common::logging::LogConfig) -> gatesvr_common::logging::LogConfig {
    if LOG_JSON.load(std::sync::atomic::Ordering::Relaxed) {
        cfg.format = gatesvr_common::logging::LogFormat::Json;
    }
    cfg
}

static LOG_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a data-plane node (QUIC sessions, routing, push API).
    Dataplane {
        /// YAML config file (see deploy/config/dataplane.yaml); GATESVR_* env vars override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Validate the configuration and exit (0 if valid, 64 if not).
        #[arg(long)]
        check: bool,
    },
    /// Run a control-plane node (raft registry and ownership, admin API).
    Controlplane {
        /// YAML config file (see deploy/config/controlplane-*.yaml); GATESVR_* env vars override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Validate the configuration and exit (0 if valid, 64 if not).
        #[arg(long)]
        check: bool,
    },
    /// Generate a development CA, server and client certificates (PEM).
    Certs {
        /// Output directory.
        #[arg(long, default_value = "certs/dev")]
        out: PathBuf,
        /// Extra DNS names or IPs for the server certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Overwrite an existing set.
        #[arg(long)]
        force: bool,
    },
    /// Run the whole system on this machine: control plane, data plane(s) and
    /// demo upstreams for every zone. Ctrl-C stops it.
    Dev(dev::DevArgs),
    /// Ask a local data-plane node to drain and wait until it has exited (or
    /// the deadline passes). For Kubernetes preStop hooks: the image has no shell.
    Drain {
        /// The node's HTTP address (server.http_addr).
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: std::net::SocketAddr,
        /// Stop waiting after this long (keep it below terminationGracePeriodSeconds).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        deadline: std::time::Duration,
    },
}

/// A failure and the exit code it maps to.
pub enum Failure {
    Config(ConfigError),
    Other(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    LOG_JSON.store(cli.log_json, std::sync::atomic::Ordering::Relaxed);
    gatesvr_common::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gatesvr: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("gatesvr: {e}");
            ExitCode::from(EXIT_CONFIG as u8)
        }
        Err(Failure::Other(e)) => {
            eprintln!("gatesvr: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), Failure> {
    // Before anything slow: a SIGTERM during start-up must not be ignored.
    let signals = gatesvr_common::shutdown::Signals::install();
    match command {
        Command::Dataplane { config, check } => run_dataplane(config, check, signals).await,
        Command::Controlplane { config, check } => run_controlplane(config, check, signals).await,
        Command::Certs { out, sans, force } => {
            if !force && gatesvr_common::certs::DevCerts::complete(&out) {
                println!(
                    "certificates already in {} (use --force to replace them)",
                    out.display()
                );
                return Ok(());
            }
            gatesvr_common::certs::generate(&out, &sans).map_err(anyhow::Error::from)?;
            println!(
                "wrote ca.crt ca.key server.crt server.key client.crt client.key to {}",
                out.display()
            );
            Ok(())
        }
        Command::Dev(args) => dev::run(args, signals).await,
        Command::Drain {
            http_addr,
            deadline,
        } => drain_node(http_addr, deadline).await,
    }
}

/// One HTTP/1.1 request to a local node: (status, body), or None if the node
/// is not listening (anymore).
async fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

async fn drain_node(
    addr: std::net::SocketAddr,
    deadline: std::time::Duration,
) -> Result<(), Failure> {
    let until = tokio::time::Instant::now() + deadline;
    match http(addr, "POST", "/drain").await.map(|(status, _)| status) {
        Some(202) => println!("drain started on {addr}"),
        Some(code) => return Err(anyhow::anyhow!("POST /drain on {addr} answered {code}").into()),
        None => {
            println!("nothing listening on {addr}: already stopped");
            return Ok(());
        }
    }
    // The node exits once drained: done when its HTTP port closes, or when
    // it reports no session left (return before the exit, so a preStop hook
    // is not killed with its container).
    while tokio::time::Instant::now() < until {
        match http(addr, "GET", "/stats").await.map(|(_, body)| body) {
            None => {
                println!("node drained and stopped");
                return Ok(());
            }
            Some(body) if body.contains("\"draining\":true") && body.contains("\"sessions\":0") => {
                println!("node drained (no session left)");
                return Ok(());
            }
            Some(_) => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    println!("deadline reached while draining; giving way to SIGTERM");
    Ok(())
}

fn config_ok(config: Option<&std::path::Path>) {
    let name = config.map_or("defaults".into(), |p| p.display().to_string());
    println!("configuration OK ({name})");
}

async fn run_dataplane(
    config: Option<PathBuf>,
    check: bool,
    mut signals: gatesvr_common::shutdown::Signals,
) -> Result<(), Failure> {
    let cfg: gatesvr_dataplane::DataPlaneConfig =
        gatesvr_common::config::load(config.as_deref(), gatesvr_dataplane::config::ENV_ALIASES)?;
    if check {
        // Also read the key material the config points at.
        gatesvr_dataplane::auth::Verifier::from_config(&cfg.auth)
            .map_err(|e| ConfigError::key("auth", e))?;
        config_ok(config.as_deref());
        return Ok(());
    }
    let _log =
        gatesvr_common::logging::init(&log_config(cfg.log.clone())).map_err(anyhow::Error::msg)?;
    let dp = gatesvr_dataplane::DataPlane::start(cfg, gatesvr_dataplane::Routing::Upstreams)
        .await
        .map_err(|e| match e {
            gatesvr_dataplane::StartError::Config(msg) => Failure::Config(ConfigError::new(msg)),
            other => Failure::Other(other.into()),
        })?;
    // SIGTERM (Kubernetes), Ctrl-C, `POST /drain` or `gatectl nodes drain`:
    // move the sessions to other nodes, then stop.
    dp.serve_until(signals.recv(), gatesvr_dataplane::OnSignal::Drain)
        .await;
    Ok(())
}

async fn run_controlplane(
    config: Option<PathBuf>,
    check: bool,
    mut signals: gatesvr_common::shutdown::Signals,
) -> Result<(), Failure> {
    let cfg: gatesvr_controlplane::ControlPlaneConfig =
        gatesvr_common::config::load(config.as_deref(), &[])?;
    if check {
        config_ok(config.as_deref());
        return Ok(());
    }
    let _log = gatesvr_common::logging::init(&log_config(Default::default()))
        .map_err(anyhow::Error::msg)?;
    let cp = gatesvr_controlplane::ControlPlane::start(cfg)
        .await
        .map_err(|e| match e {
            gatesvr_controlplane::Error::Config(c) => Failure::Config(c),
            other => Failure::Other(other.into()),
        })?;
    signals.recv().await;
    cp.shutdown().await;
    Ok(())
}
