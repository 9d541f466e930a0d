//! Measurement plumbing: latency summaries, medians over rounds, /proc readings, CPU pinning and
//! the child processes that hold the system under test.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Latencies of one measurement window, in nanoseconds.
#[derive(Debug, Default, Clone)]
pub struct Lat(pub Vec<u64>);

impl Lat {
    pub fn merge(&mut self, other: Lat) {
        self.0.extend(other.0);
    }

    /// Percentile `p` (0..=100) in microseconds; 0 without samples.
    pub fn pct_us(&mut self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let rank = ((p / 100.0) * (self.0.len() - 1) as f64).round() as usize;
        self.0[rank.min(self.0.len() - 1)] as f64 / 1000.0
    }
}

/// Median of the rounds' values (the statistic every ratio uses).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Monotonic nanoseconds since the first call (timestamps carried inside pushes).
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Clock ticks per second of /proc/PID/stat.
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of a process, in microseconds.
pub fn cpu_us(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces: fields start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let stime: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    Ok((utime + stime) / clk_tck() * 1e6)
}

/// Time a process's threads spent waiting on a CPU's run queue (runnable, not running), in µs:
/// the sum of `/proc/PID/task/*/schedstat` field 2 (threads that ended are not counted). What a
/// loaded machine costs a pipeline shows here, not in its CPU time.
pub fn runq_wait_us(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e3
}

/// A process's threads: on-CPU time (µs, `/proc/PID/task/*/schedstat` field 1, nanosecond
/// resolution, unlike `/proc/PID/stat`'s ticks) and voluntary context switches (times a thread
/// went to sleep waiting for something: a wake-up each). Threads that ended are not counted.
pub fn run_and_sleeps(pid: u32) -> (f64, f64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0.0, 0.0);
    };
    let (mut run_ns, mut sleeps) = (0.0, 0.0);
    for t in tasks.flatten() {
        if let Some(ns) = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        {
            run_ns += ns;
        }
        if let Some(n) = std::fs::read_to_string(t.path().join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
        {
            sleeps += n;
        }
    }
    (run_ns / 1e3, sleeps)
}

/// Machine-wide UDP datagrams received and sent (`/proc/net/snmp`, `InDatagrams`,
/// `OutDatagrams`).
pub fn udp_datagrams() -> (f64, f64) {
    let Ok(text) = std::fs::read_to_string("/proc/net/snmp") else {
        return (0.0, 0.0);
    };
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return (0.0, 0.0);
    };
    let field = |want: &str| {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == want)
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field("InDatagrams"), field("OutDatagrams"))
}

/// Busy time of every CPU since boot, in µs, indexed by CPU number: `/proc/stat`'s `cpuN` lines,
/// every field but idle and iowait (steal included: time the hypervisor gave to someone else).
/// With the processes of a run pinned, a CPU's busy time minus theirs is what other work on the
/// machine took from that CPU.
pub fn cpu_busy_us() -> Vec<f64> {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    parse_cpu_busy(&stat, clk_tck())
}

fn parse_cpu_busy(stat: &str, tck: f64) -> Vec<f64> {
    let mut busy = Vec::new();
    for line in stat.lines() {
        let mut f = line.split_whitespace();
        let Some(n) = f
            .next()
            .and_then(|name| name.strip_prefix("cpu"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let v: Vec<f64> = f.filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total: f64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
        if busy.len() <= n {
            busy.resize(n + 1, 0.0);
        }
        busy[n] = (total - idle) / tck * 1e6;
    }
    busy
}

/// VmRSS of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("no VmRSS line")
}

/// How processes are placed on CPUs: the process under test alone on one core, the load
/// generator (and helpers) on another, when the machine has two or more and taskset exists.
#[derive(Debug, Clone)]
pub struct Pinning {
    pub enabled: bool,
    pub server_cpu: usize,
    pub client_cpu: usize,
}

impl Pinning {
    pub fn detect(allow: bool) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let taskset = Command::new("taskset")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        Self {
            enabled: allow && cpus >= 2 && taskset,
            server_cpu: 1,
            client_cpu: 0,
        }
    }

    /// Pins every thread of this process (call before starting the runtime).
    pub fn pin_self(&self) {
        if !self.enabled {
            return;
        }
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", &self.client_cpu.to_string()])
            .arg(std::process::id().to_string())
            .stdout(Stdio::null())
            .status();
    }

    pub fn describe(&self) -> String {
        if self.enabled {
            format!(
                "server on cpu {}, client and helpers on cpu {}",
                self.server_cpu, self.client_cpu
            )
        } else {
            "not pinned".into()
        }
    }
}

/// Under `GATE_BENCH_WRAP="valgrind --tool=callgrind ..."`: dumps (and zeroes) the wrapped
/// server's instruction counts, labelled, so each window of a scenario gets its own profile.
pub fn callgrind_mark(server: &ServerProc, label: &str) {
    if !server.wrapped || !std::env::var("GATE_BENCH_WRAP").is_ok_and(|w| w.contains("callgrind")) {
        return;
    }
    let _ = Command::new("callgrind_control")
        .arg(format!("--dump={label}"))
        .arg(server.pid().to_string())
        .stdout(Stdio::null())
        .status();
}

/// A server mode of gate-bench in its own process (so its CPU and RSS can be read). Killed on
/// drop; it also exits when its stdin closes (if gate-bench dies).
pub struct ServerProc {
    pub child: Child,
    pub info: Value,
    pub name: String,
    /// Runs under `GATE_BENCH_WRAP`: stopped with SIGTERM so the wrapper writes its output.
    pub wrapped: bool,
}

impl ServerProc {
    /// Spawns `gate-bench serve <args>` on `cpu` (if pinning) and waits for its JSON line.
    pub fn spawn(name: &str, args: &[String], cpu: Option<usize>) -> Result<Self> {
        let exe = std::env::current_exe().context("own executable")?;
        // `GATE_BENCH_WRAP="valgrind --tool=callgrind ..."`: runs the server named
        // `GATE_BENCH_WRAP_NAME` (default `dataplane`) under that command (profiles).
        let wrap: Vec<String> = std::env::var("GATE_BENCH_WRAP")
            .ok()
            .filter(|_| {
                std::env::var("GATE_BENCH_WRAP_NAME").unwrap_or_else(|_| "dataplane".into()) == name
            })
            .map(|w| w.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(cpu) = cpu {
            argv.extend(["taskset".into(), "-c".into(), cpu.to_string().into()]);
        }
        argv.extend(wrap.iter().map(Into::into));
        argv.push(exe.into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        let wrapped = !wrap.is_empty();
        cmd.arg("serve")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning server {name}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the server's address line")?;
        if line.trim().is_empty() {
            let _ = child.kill();
            bail!("server {name} exited before printing its addresses");
        }
        let info: Value = serde_json::from_str(line.trim())
            .with_context(|| format!("server {name} printed {line:?}"))?;
        Ok(Self {
            child,
            info,
            name: name.into(),
            wrapped,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self, key: &str) -> Result<std::net::SocketAddr> {
        self.info[key]
            .as_str()
            .with_context(|| format!("server {} has no {key}", self.name))?
            .parse()
            .with_context(|| format!("server {} {key}", self.name))
    }

    pub fn cpu_us(&self) -> Result<f64> {
        cpu_us(self.pid())
    }

    pub fn rss(&self) -> Result<u64> {
        rss_bytes(self.pid())
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if self.wrapped {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Certificates, the HMAC secret and scratch space for one run. Lives under `base` (a real
/// disk: fsync figures on tmpfs would mean nothing).
pub struct RunDir {
    pub dir: tempfile::TempDir,
}

pub const SECRET: &[u8] = b"gate-bench-secret-0123456789";

impl RunDir {
    pub fn new(base: &Path) -> Result<Self> {
        std::fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("gate-bench-")
            .tempdir_in(base)?;
        gatesvr_common::tls::install_crypto_provider();
        gatesvr_common::certs::generate(&dir.path().join("certs"), &[])
            .map_err(|e| anyhow::anyhow!("dev certs: {e}"))?;
        std::fs::write(dir.path().join("secret"), SECRET)?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("certs").join("ca.crt")
    }
}

/// How clients get their auth token: the run's own HMAC secret (default), another secret (a
/// given deployment's `auth.secret_file`), a command that prints one, or a fixed string
/// (`gatesvr dev` runs with client auth off and accepts any token).
#[derive(Debug, Clone)]
pub enum TokenSource {
    Secret(Vec<u8>),
    /// Run with the openid as its last argument; its trimmed stdout is the token.
    Command(String),
    Fixed(String),
}

static TOKENS: OnceLock<TokenSource> = OnceLock::new();

/// Sets the token source once, before any client connects (gate-bench against given addresses).
pub fn set_token_source(source: TokenSource) {
    let _ = TOKENS.set(source);
}

pub fn token(openid: &str) -> String {
    match TOKENS.get() {
        None => gatesvr_common::token::issue(SECRET, openid, Duration::from_secs(24 * 3600)),
        Some(TokenSource::Secret(s)) => {
            gatesvr_common::token::issue(s, openid, Duration::from_secs(24 * 3600))
        }
        Some(TokenSource::Fixed(t)) => t.clone(),
        Some(TokenSource::Command(cmd)) => Command::new("sh")
            .arg("-c")
            .arg(format!("{cmd} \"$0\""))
            .arg(openid)
            .stderr(Stdio::inherit())
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

/// A port free on 127.0.0.1 right now, for TCP and UDP (for processes that must know each
/// other's addresses before they start, like raft members).
///
/// Drawn at random below the kernel's ephemeral range (32768 and up on Linux), as the tests'
/// `free_port` does (in 10000..20000, apart from the tests' range): a port `bind(0)` handed out
/// is free again until the server binds it, and any outgoing connection may take it as its
/// source port meanwhile (CI: "binding admin_addr ...: Address already in use").
pub fn free_port() -> Result<u16> {
    use rand::Rng;
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let port = rng.random_range(10_000..20_000);
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port in 10000..20000 on 127.0.0.1 after 1000 tries",
    )
    .into())
}

/// Progress on stderr (never on stdout, which may carry JSON).
pub fn progress(msg: impl AsRef<str>) {
    eprintln!("[gate-bench] {}", msg.as_ref());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Busy time is every field but idle and iowait, per `cpuN` line; the aggregate `cpu`
    /// line is not a CPU.
    #[test]
    fn cpu_busy_reads_each_cpu_line() {
        let stat = "cpu  10 20 30 400 50 6 7 8 0 0\n\
                    cpu0 1 2 3 40 5 0 1 1 0 0\n\
                    cpu1 9 18 27 360 45 6 6 7 0 0\n\
                    intr 12345\n";
        let busy = parse_cpu_busy(stat, 100.0);
        assert_eq!(busy, vec![8.0 * 1e4, 73.0 * 1e4]);
    }
}
