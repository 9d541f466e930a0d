//! `gate-bench peers`: GateSvr side by side with what users would pick instead, on this machine,
//! in the same run (issue 9; docs/benchmarks.md "Peers").
//!
//! ```text
//! request-reply  GateSvr client -> data plane -> upstream -> back   vs  NATS request-reply
//! fanout         broadcast to N sessions (client acks)              vs  Mosquitto QoS 1, NATS core
//! claims         3-node control plane, ClaimSessions                vs  etcd 3 members, put + lease
//! idle           RSS per idle TLS client connection                 vs  nats-server, mosquitto
//! doc            results (JSON lines) -> the Peers section of docs/benchmarks.md + an SVG chart
//! ```
//!
//! Every check is a ratio GateSvr / peer with the goal "ahead of the peer" (`<= 1x` where lower
//! is better, `>= 1x` where higher is better). Peer servers are the Debian binaries
//! (`nats-server`, `mosquitto`, `etcd`), started with the configs in `bench/peers/` on loopback,
//! TLS on every client leg, pinned like the data plane (server CPU), each wrapped in
//! `timeout` so that none outlives its scenario, and killed when the scenario ends.

pub mod claims;
pub mod doc;
pub mod fanout;
pub mod idle;
pub mod request_reply;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::report::{Check, Cmp, Report};
use crate::scenarios::Opts;
use crate::util::free_port;

/// `gate-bench peers [which]`.
#[derive(Debug, clap::Args)]
pub struct PeersArgs {
    #[command(subcommand)]
    pub which: Option<Which>,
    /// Idle client connections per system in `idle` (TCP peers need a port and a descriptor
    /// each in the load generator: this stays under the ephemeral port range and leaves room
    /// under a 20,000 open-file limit while the previous system's sockets close).
    #[arg(long, default_value_t = 8_000)]
    pub idle_conns: usize,
    /// Messages per fan-out burst (each to every subscriber; `--fanout` subscribers).
    #[arg(long, default_value_t = 100)]
    pub burst: usize,
    /// Client connections in the saturated request/reply run, each with 64 in flight.
    #[arg(long, default_value_t = 16)]
    pub sat_clients: usize,
    /// Upper bound on each peer server's life (it is killed earlier when its scenario ends).
    #[arg(long, default_value = "30m", value_parser = crate::humantime_dur)]
    pub peer_limit: Duration,
    /// Also take data-plane CPU flamegraphs (its /debug/pprof/profile) under saturated load and
    /// write them into this directory.
    #[arg(long)]
    pub profile: Option<PathBuf>,
}

/// Which comparison (default: all).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Which {
    /// Request/response through a middle hop vs NATS request-reply.
    #[command(alias = "rr")]
    RequestReply,
    /// Broadcast to N acking sessions vs Mosquitto QoS 1 and NATS core fan-out.
    Fanout,
    /// Ownership claims on the 3-node control plane vs etcd (3 members, lease-attached puts).
    Claims,
    /// RSS per idle TLS client connection vs nats-server and mosquitto.
    Idle,
    /// Every comparison in order.
    All,
    /// Writes the Peers section of a markdown file (between markers) and an SVG chart.
    Doc {
        /// Results of `gate-bench --json peers ...` (JSON lines).
        input: PathBuf,
        /// The markdown file to update (docs/benchmarks.md).
        #[arg(long)]
        md: PathBuf,
        /// Where the chart goes (the markdown links it by file name).
        #[arg(long)]
        svg: PathBuf,
        /// The command that produced the results, quoted in the section.
        #[arg(long, default_value = "scripts/bench-peers")]
        command: String,
    },
    /// Internal: the NATS responder (the upstream's counterpart), in its own process.
    #[command(hide = true)]
    NatsResponder {
        #[arg(long)]
        url: String,
        #[arg(long)]
        ca: PathBuf,
    },
}

/// Runs `gate-bench peers`; returns the exit code.
pub fn main(
    rt: &tokio::runtime::Runtime,
    o: &Opts,
    args: &PeersArgs,
    json: bool,
    machine: &str,
) -> Result<i32> {
    let which = args.which.clone().unwrap_or(Which::All);
    let names: Vec<&str> = match which {
        Which::Doc {
            input,
            md,
            svg,
            command,
        } => {
            doc::write(&input, &md, &svg, &command)?;
            return Ok(0);
        }
        Which::NatsResponder { url, ca } => {
            rt.block_on(request_reply::responder(&url, &ca))?;
            return Ok(0);
        }
        Which::RequestReply => vec!["request-reply"],
        Which::Fanout => vec!["fanout"],
        Which::Claims => vec!["claims"],
        Which::Idle => vec!["idle"],
        Which::All => vec!["request-reply", "fanout", "claims", "idle"],
    };
    let mut failed = false;
    for name in names {
        let result: Result<Report> = rt.block_on(async {
            match name {
                "request-reply" => request_reply::run(o, args).await,
                "fanout" => fanout::run(o, args).await,
                "claims" => claims::run(o).await,
                "idle" => idle::run(o, args).await,
                _ => unreachable!("names come from the match above"),
            }
        });
        match result {
            Ok(mut rep) => {
                rep.param("machine", machine);
                if json {
                    println!("{}", serde_json::to_string(&rep)?);
                } else {
                    rep.print_table();
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("gate-bench peers {name}: {e:#}");
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

/// A GateSvr / peer check with the goal "GateSvr ahead" (ties count as ahead).
pub fn vs(name: &str, gatesvr: f64, peer: f64, lower_is_better: bool) -> Check {
    let cmp = if lower_is_better {
        Cmp::AtMost
    } else {
        Cmp::AtLeast
    };
    Check::ratio(name, gatesvr, peer, cmp, 1.0)
}

/// The peer server binaries, looked up on PATH and in the sbin directories Debian uses.
pub fn find_bin(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds a peer binary or fails with the package to install.
pub fn need_bin(name: &str, package: &str) -> Result<PathBuf> {
    find_bin(name).with_context(|| {
        format!(
            "{name} is not installed (apt-get install -y {package}; scripts/bench-peers does it)"
        )
    })
}

/// First line of `bin args` (stdout, else stderr): the version string for the report.
pub fn version(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            let out = String::from_utf8_lossy(&o.stdout).to_string();
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            let text = if out.trim().is_empty() { err } else { out };
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Fills a config template from `bench/peers/` (`@KEY@` placeholders) and writes it to `out`.
pub fn render_config(template: &str, vars: &[(&str, String)], out: &Path) -> Result<()> {
    let mut text = template.to_string();
    for (k, v) in vars {
        text = text.replace(&format!("@{k}@"), v);
    }
    if let Some(left) = text.find('@').and_then(|i| {
        let rest = &text[i + 1..];
        rest.find('@')
            .map(|j| &rest[..j])
            .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
    }) {
        bail!("config template has an unfilled placeholder @{left}@");
    }
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))
}

/// A peer server process: `[taskset -c CPU] timeout -k 5 LIMIT BIN ARGS`, output to a log file.
/// `pid` is the server itself (timeout's child), whose RSS and CPU are read. Killed on drop.
pub struct PeerProc {
    child: Child,
    pub pid: u32,
    log: PathBuf,
}

impl PeerProc {
    /// Starts the server and waits until `port` accepts TCP connections.
    pub fn spawn(
        name: &str,
        bin: &Path,
        args: &[String],
        cpu: Option<usize>,
        limit: Duration,
        log: &Path,
        port: u16,
    ) -> Result<Self> {
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg("timeout");
                c
            }
            None => Command::new("timeout"),
        };
        let logf = std::fs::File::create(log)?;
        cmd.args(["-k", "5"])
            .arg(format!("{}s", limit.as_secs().max(1)))
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let timeout_pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(20);
        let pid = loop {
            if let Some(pid) = child_of(timeout_pid) {
                break pid;
            }
            if Instant::now() > deadline {
                bail!("{name} did not start");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut p = Self {
            child,
            pid,
            log: log.to_path_buf(),
        };
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(p);
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!("{name} exited ({status}): {}", p.log_tail());
            }
            if Instant::now() > deadline {
                bail!("{name} never listened on {port}: {}", p.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn rss(&self) -> Result<u64> {
        crate::util::rss_bytes(self.pid)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

impl Drop for PeerProc {
    fn drop(&mut self) {
        // SIGKILL to timeout would orphan the server: kill the server, then reap timeout.
        let killed = Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !killed {
            // `kill` could not run (e.g. out of file descriptors): leave `timeout` alive, it
            // ends the server at its limit; killing `timeout` now would orphan the server.
            eprintln!(
                "[gate-bench] could not stop {} (pid {}); `timeout` ends it at its limit",
                self.log.display(),
                self.pid
            );
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first process whose parent is `ppid` (from /proc/*/stat).
fn child_of(ppid: u32) -> Option<u32> {
    let dir = std::fs::read_dir("/proc").ok()?;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces): state, ppid, ...
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        if rest.split_whitespace().nth(1) == Some(ppid.to_string().as_str()) {
            return Some(pid);
        }
    }
    None
}

/// A helper of ours in its own process (`gate-bench peers <args>`, e.g. the NATS responder):
/// prints one line when ready, exits when its stdin closes; killed on drop.
pub struct Helper {
    child: Child,
}

impl Helper {
    pub fn spawn(args: &[String], cpu: Option<usize>) -> Result<Self> {
        let exe = std::env::current_exe().context("own executable")?;
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.arg("--no-pin")
            .arg("peers")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("spawning a helper")?;
        let stdout = child.stdout.take().context("helper stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim().is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("helper {args:?} exited before it was ready");
        }
        Ok(Self { child })
    }
}

impl Helper {
    /// The helper's process id (taskset execs it, so this is the helper itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Returns when stdin closes (the parent exited or dropped us).
pub async fn parent_gone() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The NATS server for a scenario: `bench/peers/nats.conf` with TLS from the run directory.
pub fn start_nats(o: &Opts, dir: &Path, limit: Duration) -> Result<(PeerProc, String)> {
    let bin = need_bin("nats-server", "nats-server")?;
    let port = free_port()?;
    let conf = dir.join("nats.conf");
    render_config(
        include_str!("../../peers/nats.conf"),
        &[
            ("PORT", port.to_string()),
            ("CERTS", dir.join("certs").display().to_string()),
        ],
        &conf,
    )?;
    let p = PeerProc::spawn(
        "nats-server",
        &bin,
        &["-c".into(), conf.display().to_string()],
        o.server_cpu(),
        limit,
        &dir.join("nats.log"),
        port,
    )?;
    Ok((p, format!("tls://127.0.0.1:{port}")))
}

/// The MQTT broker for a scenario: `bench/peers/mosquitto.conf` with TLS from the run directory.
pub fn start_mosquitto(o: &Opts, dir: &Path, limit: Duration) -> Result<(PeerProc, u16)> {
    let bin = need_bin("mosquitto", "mosquitto")?;
    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    render_config(
        include_str!("../../peers/mosquitto.conf"),
        &[
            ("PORT", port.to_string()),
            ("CERTS", dir.join("certs").display().to_string()),
        ],
        &conf,
    )?;
    let p = PeerProc::spawn(
        "mosquitto",
        &bin,
        &["-c".into(), conf.display().to_string()],
        o.server_cpu(),
        limit,
        &dir.join("mosquitto.log"),
        port,
    )?;
    Ok((p, port))
}

/// A NATS client over TLS (ring, TLS 1.3, trusting the run's CA).
pub async fn nats_connect(url: &str, ca: &Path) -> Result<async_nats::Client> {
    let tls = gatesvr_common::tls::client_config(ca).context("NATS client TLS")?;
    async_nats::ConnectOptions::new()
        .require_tls(true)
        .tls_client_config(tls)
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

/// MQTT options for a TLS client (ring, TLS 1.3, trusting the run's CA).
pub fn mqtt_options(id: &str, port: u16, ca: &Path) -> Result<rumqttc::MqttOptions> {
    let tls = gatesvr_common::tls::client_config(ca).context("MQTT client TLS")?;
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
    ));
    opts.set_keep_alive(Duration::from_secs(300));
    opts.set_clean_session(true);
    Ok(opts)
}

/// GET `/debug/pprof/profile?seconds=N` from a data plane's ops address: an SVG flamegraph.
pub async fn pprof_svg(ops: std::net::SocketAddr, secs: u64) -> Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(ops).await?;
    let token = crate::servers::OPS_TOKEN;
    s.write_all(
        format!(
            "GET /debug/pprof/profile?seconds={secs} HTTP/1.0\r\nHost: {ops}\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header end in the profile response")?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    anyhow::ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "profile: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(buf[split + 4..].to_vec())
}
