//! `gatesvr`: the GateSvr server binary.
//!
//! - `gatesvr dataplane --config F`: one data-plane node.
//! - `gatesvr controlplane --config F`: one control-plane (raft) node.
//! - `gatesvr certs --out DIR`: a CA, the client-facing certificate and role
//!   certificates (`--role dataplane:dp-4`, ...) for every internal identity.
//! - `gatesvr dev`: the whole system on one machine (see [`dev`]).
//!
//! Exit codes: 0 clean stop, 64 configuration error (the message names the
//! key or file), 1 any other failure.

mod dev;

/// mimalloc instead of glibc's malloc: a push or a request allocates a few times on its way
/// through the data plane (decoded strings, the encoded frame, results), and glibc's malloc +
/// free were ~26% of the data plane's instructions per batched push (callgrind, docs/benchmarks.md
/// "Session 10").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Generate a CA, the client-facing server certificate and role
    /// certificates (PEM; private keys mode 0600). Each role certificate names
    /// `spiffe://<trust-domain>/<role>/<id>`, which decides what it may call.
    Certs {
        /// Output directory.
        #[arg(long, default_value = "certs/dev")]
        out: PathBuf,
        /// Extra DNS names or IPs for every certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Role certificates to issue, `ROLE:ID` (repeatable): `controlplane:1`,
        /// `dataplane:dp-1`, `upstream:chat`, `admin:alice`. With an existing CA
        /// in --out, only these are issued (signed by it). Default: controlplane
        /// 1-3, dataplane dp-1..dp-3, upstream demo, admin operator.
        #[arg(long = "role", value_parser = parse_role)]
        roles: Vec<(gatesvr_common::identity::Role, String)>,
        /// Trust domain of the identities.
        #[arg(long, default_value = gatesvr_common::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Replace an existing CA and everything it signed.
        #[arg(long)]
        force: bool,
    },
    /// Run the whole system on this machine: control plane, data plane(s) and
    /// demo upstreams for every zone. Ctrl-C stops it.
    Dev(dev::DevArgs),
    /// Ask a local data-plane node to drain and wait until it has exited (or
    /// the deadline passes). For Kubernetes preStop hooks: the image has no shell.
    Drain {
        /// The node's HTTP address (server.http_addr), polled for progress.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: std::net::SocketAddr,
        /// The node's operations listener (server.ops_addr), where `POST
        /// /drain` is served.
        #[arg(long, default_value = "127.0.0.1:8081")]
        ops_addr: std::net::SocketAddr,
        /// File holding the ops bearer token (server.ops_token_file).
        #[arg(long, env = "GATESVR_OPS_TOKEN_FILE")]
        token_file: Option<PathBuf>,
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
        Command::Certs {
            out,
            sans,
            roles,
            trust_domain,
            force,
        } => certs(&out, &sans, roles, &trust_domain, force),
        Command::Dev(args) => dev::run(args, signals).await,
        Command::Drain {
            http_addr,
            ops_addr,
            token_file,
            deadline,
        } => drain_node(http_addr, ops_addr, token_file, deadline).await,
    }
}

/// `ROLE:ID`, e.g. `dataplane:dp-1`.
fn parse_role(s: &str) -> Result<(gatesvr_common::identity::Role, String), String> {
    let (role, id) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected ROLE:ID, e.g. dataplane:dp-1"))?;
    let role = gatesvr_common::identity::Role::parse(role)
        .ok_or_else(|| format!("{role:?}: roles are controlplane, dataplane, upstream, admin"))?;
    Ok((role, id.to_string()))
}

fn certs(
    out: &std::path::Path,
    sans: &[String],
    roles: Vec<(gatesvr_common::identity::Role, String)>,
    trust_domain: &str,
    force: bool,
) -> Result<(), Failure> {
    use gatesvr_common::certs;
    use gatesvr_common::identity::Identity;
    let has_ca = certs::DevCerts::complete(out);
    if has_ca && !force {
        if roles.is_empty() {
            println!(
                "certificates already in {} (name --role ROLE:ID to issue more, or --force to replace them all)",
                out.display()
            );
            return Ok(());
        }
        for (role, id) in roles {
            let identity = Identity::new(trust_domain, role, id).map_err(anyhow::Error::from)?;
            let files = certs::issue(out, &identity, sans).map_err(anyhow::Error::from)?;
            println!("issued {identity}: {}", files.cert_file.display());
        }
        return Ok(());
    }
    let roles = if roles.is_empty() {
        certs::DEFAULT_IDENTITIES
            .iter()
            .map(|(r, id)| (*r, (*id).to_string()))
            .collect()
    } else {
        roles
    };
    certs::generate_with(out, sans, trust_domain, &roles).map_err(anyhow::Error::from)?;
    println!(
        "wrote ca.crt ca.key server.crt server.key to {}",
        out.display()
    );
    for (role, id) in &roles {
        println!("  {role}-{id}.crt/.key: spiffe://{trust_domain}/{role}/{id}");
    }
    println!("private keys are mode 0600; keep ca.key off the cluster in production");
    Ok(())
}

/// One HTTP/1.1 request to a local node: (status, body), or None if the node
/// is not listening (anymore).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
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
    ops_addr: std::net::SocketAddr,
    token_file: Option<PathBuf>,
    deadline: std::time::Duration,
) -> Result<(), Failure> {
    let until = tokio::time::Instant::now() + deadline;
    let token = match &token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let posted = http(ops_addr, "POST", "/drain", token.as_deref()).await;
    match posted.map(|(status, _)| status) {
        Some(202) => println!("drain started on {ops_addr}"),
        Some(code) => {
            return Err(anyhow::anyhow!("POST /drain on {ops_addr} answered {code}").into());
        }
        None => {
            println!("nothing listening on {ops_addr}: already stopped");
            return Ok(());
        }
    }
    // The node exits once drained: done when its HTTP port closes, or when
    // it reports no session left (return before the exit, so a preStop hook
    // is not killed with its container).
    while tokio::time::Instant::now() < until {
        match http(addr, "GET", "/stats", None)
            .await
            .map(|(_, body)| body)
        {
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
        gatesvr_dataplane::edge::auth::Verifier::from_config(&cfg.auth)
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
