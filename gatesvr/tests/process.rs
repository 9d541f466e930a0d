//! The `gatesvr` binary as operators run it: a standalone data-plane process
//! that drains and exits on `gatesvr drain` (Kubernetes' preStop hook).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn drain_command_stops_a_running_node() {
    let dir = tempfile::tempdir().unwrap();
    gatesvr_common::certs::generate(&dir.path().join("certs"), &[]).unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret").unwrap();
    let http = free_port();
    let config = format!(
        "server:\n  quic_addr: 127.0.0.1:0\n  http_addr: 127.0.0.1:{http}\n  grpc_addr: 127.0.0.1:0\n  metrics_addr: 127.0.0.1:0\n  cert_file: certs/server.crt\n  key_file: certs/server.key\nauth:\n  secret_file: secret\n"
    );
    std::fs::write(dir.path().join("dp.yaml"), config).unwrap();
    let mut node = Command::new(env!("CARGO_BIN_EXE_gatesvr"))
        .args(["dataplane", "--config", "dp.yaml"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait (bounded) until it listens.
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let drain = Command::new(env!("CARGO_BIN_EXE_gatesvr"))
        .args([
            "drain",
            "--http-addr",
            &format!("127.0.0.1:{http}"),
            "--deadline",
            "30s",
        ])
        .output()
        .unwrap();
    assert!(
        drain.status.success(),
        "{}",
        String::from_utf8_lossy(&drain.stderr)
    );
    assert!(String::from_utf8_lossy(&drain.stdout).contains("drained"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = node.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "a drained node exits cleanly: {status:?}");
}
