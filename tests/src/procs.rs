//! Real processes for cluster tests: the workspace binaries from the target
//! directory the test runs from (built with cargo if missing), free loopback
//! ports, and children that are killed when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// The target dir's profile directory (`target/debug`), from the running test's path.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    // target/debug/deps/<test>-HASH -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Path of a workspace binary, building it if it is not there yet.
pub fn binary(package: &str, name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(cargo)
            .current_dir(root)
            .args(["build", "-p", package, "--bin", name])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building {name} failed");
    }
    path
}

/// A port free on 127.0.0.1 right now, for both TCP and UDP (a data plane's QUIC port is
/// UDP, its other ports TCP), and never handed out before by this test process.
///
/// The port is released before the child process binds it, so three things could take it in
/// that window, and each is ruled out:
/// - an outgoing connection's source port: ports are drawn below the kernel's ephemeral
///   range (32768 and up on Linux), never with `bind(0)` (seen in CI: "cannot bind HTTP ...
///   Address already in use");
/// - another port of the same test (a cluster asks for a dozen before any process starts):
///   the process remembers what it handed out;
/// - a test running beside this one (seen in CI: "cannot bind gRPC ... Address already in
///   use"): under nextest each concurrently running test has its own slot number
///   (`NEXTEST_TEST_GLOBAL_SLOT`), and each slot draws from its own block of ports.
pub fn free_port() -> u16 {
    use rand::Rng;
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    const LOW: u16 = 20_000;
    const BLOCK: u16 = 1_000;
    const BLOCKS: u16 = 12; // 20000..32000
    static ISSUED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

    let block = std::env::var("NEXTEST_TEST_GLOBAL_SLOT")
        .ok()
        .and_then(|slot| slot.parse::<u64>().ok())
        .map(|slot| (slot % u64::from(BLOCKS)) as u16);
    let (low, high) = match block {
        Some(b) => (LOW + b * BLOCK, LOW + (b + 1) * BLOCK),
        None => (LOW, LOW + BLOCKS * BLOCK),
    };
    let mut issued = ISSUED.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let port = rng.random_range(low..high);
        if issued.contains(&port) {
            continue;
        }
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            issued.insert(port);
            return port;
        }
    }
    panic!("no free port in {low}..{high} on 127.0.0.1 after 1000 tries")
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves nothing running.
pub struct Proc(pub Child);

impl Proc {
    /// kill -9.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.0.wait().expect("wait for child")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Config of node `id` of a control-plane process cluster over mTLS (certificates from
/// `gatesvr certs` in `certs`), admin API behind tokens. Node 1 bootstraps every one of `members`
/// (id, gRPC port, admin port); `raft_extra` adds lines to the `raft:` section.
pub fn controlplane_config(
    id: u64,
    data_dir: &Path,
    members: &[(u64, u16, u16)],
    certs: &Path,
    raft_extra: &str,
) -> String {
    let (_, grpc, admin) = *members
        .iter()
        .find(|(m, _, _)| *m == id)
        .expect("the node is one of the members");
    // Its role certificate (controlplane/<id>), issued by the same CA if new.
    gatesvr_common::certs::ensure(
        certs,
        &[(gatesvr_common::identity::Role::ControlPlane, id.to_string())],
    )
    .expect("control-plane certificate");
    let listed: String = members
        .iter()
        .map(|(m, g, a)| {
            format!(
                "    - {{ id: {m}, grpc_addr: \"127.0.0.1:{g}\", admin_addr: \"127.0.0.1:{a}\" }}\n"
            )
        })
        .collect();
    let bootstrap = if id == 1 {
        format!("  bootstrap: true\n  members:\n{listed}")
    } else {
        "  bootstrap: false\n".to_string()
    };
    format!(
        "node_id: {id}\n\
         data_dir: {data}\n\
         grpc_addr: 127.0.0.1:{grpc}\n\
         admin_addr: 127.0.0.1:{admin}\n\
         cluster:\n{bootstrap}\
         tls:\n  cert_file: {c}/controlplane-{id}.crt\n  key_file: {c}/controlplane-{id}.key\n  ca_file: {c}/ca.crt\n  server_name: localhost\n\
         raft:\n  heartbeat_interval: 100ms\n  election_timeout_min: 500ms\n  election_timeout_max: 1000ms\n  write_timeout: 3s\n{raft_extra}\
         admin:\n  auth: tokens\n  insecure_plaintext_http: true\n",
        data = data_dir.display(),
        c = certs.display(),
    )
}

/// Starts `gatesvr controlplane --config config` with admin token `token`, stderr to `log`.
pub fn spawn_controlplane(gatesvr: &Path, config: &Path, log: &Path, token: &str) -> Proc {
    let log = std::fs::File::create(log).expect("log file");
    let child = Command::new(gatesvr)
        .args(["controlplane", "--config"])
        .arg(config)
        .env("GATESVR_ADMIN__ADMIN_TOKEN", token)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn gatesvr controlplane");
    Proc(child)
}

/// Runs gatectl against `endpoint` with `token`; `Ok(stdout)` on exit 0, else
/// `Err((exit code, stderr))`.
pub fn gatectl(
    endpoint: &str,
    token: &str,
    args: &[&str],
) -> Result<String, (Option<i32>, String)> {
    let out = Command::new(binary("gatesvr-controlplane", "gatectl"))
        .args(["--endpoint", endpoint, "--token", token])
        .args(args)
        .env_remove("GATESVR_ADMIN_TOKEN")
        .output()
        .expect("run gatectl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err((
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

/// Polls `f` (blocking) until it returns `Some`; panics naming `what` after 60 s.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    /// A process never gets one port twice, and under nextest every port comes from its
    /// slot's block (so tests running side by side cannot draw the same one).
    #[test]
    fn free_ports_are_never_handed_out_twice_and_stay_in_the_slot_s_block() {
        let ports: Vec<u16> = (0..300).map(|_| super::free_port()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice");
        if let Some(slot) = std::env::var("NEXTEST_TEST_GLOBAL_SLOT")
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
        {
            let low = 20_000 + (slot % 12) * 1_000;
            assert!(
                ports.iter().all(|p| (low..low + 1_000).contains(p)),
                "slot {slot}: ports outside {low}..{}",
                low + 1_000
            );
        }
    }
}
