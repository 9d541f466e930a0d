//! The `gatesvr` binary as operators run it: a standalone data-plane process
//! that drains and exits on `gatesvr drain` (Kubernetes' preStop hook).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gatesvr_tests::procs::free_port;

#[test]
fn drain_command_stops_a_running_node() {
    let dir = tempfile::tempdir().unwrap();
    gatesvr_common::certs::generate(&dir.path().join("certs"), &[]).unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret").unwrap();
    std::fs::write(dir.path().join("ops-token"), "0ps-t0ken\n").unwrap();
    let (http, ops) = (free_port(), free_port());
    // Secure as shipped: mTLS with its role certificate on the internal
    // port, TLS to upstreams, /drain behind the ops token.
    let config = format!(
        "node_id: dp-1\nserver:\n  quic_addr: 127.0.0.1:0\n  http_addr: 127.0.0.1:{http}\n  grpc_addr: 127.0.0.1:0\n  metrics_addr: 127.0.0.1:0\n  ops_addr: 127.0.0.1:{ops}\n  ops_token_file: ops-token\n  cert_file: certs/server.crt\n  key_file: certs/server.key\n  grpc_tls: {{cert_file: certs/dataplane-dp-1.crt, key_file: certs/dataplane-dp-1.key, ca_file: certs/ca.crt}}\nupstream:\n  tls: {{ca_file: certs/ca.crt, cert_file: certs/dataplane-dp-1.crt, key_file: certs/dataplane-dp-1.key}}\nauth:\n  secret_file: secret\n"
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
            "--ops-addr",
            &format!("127.0.0.1:{ops}"),
            "--deadline",
            "30s",
        ])
        .env("GATESVR_OPS_TOKEN_FILE", dir.path().join("ops-token"))
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
