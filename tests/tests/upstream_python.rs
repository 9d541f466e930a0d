//! An upstream written in Python from the proto files alone
//! (`upstream/examples/python/stream_upstream.py`) answers requests and pushes
//! over the streaming contract, through a real data-plane node, to a client of
//! the Rust SDK (the library `gate-client` is built on).
//!
//! Needs `python3`; installs `grpcio` and `grpcio-tools` from PyPI with pip
//! when they are missing. Without python3 the test fails: it never passes
//! without running.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use gatesvr_dataplane::config::StaticZone;
use gatesvr_dataplane::upstream::UpstreamProtocol;
use gatesvr_sdk::Client;
use gatesvr_tests::procs::{Proc, free_port};
use gatesvr_tests::{TestNode, next_push};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Makes sure the Python modules are importable, installing them if not.
fn ensure_grpcio() {
    let importable = || {
        Command::new("python3")
            .args(["-c", "import grpc, grpc_tools"])
            .status()
            .expect("python3 runs")
            .success()
    };
    if importable() {
        return;
    }
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "grpcio", "grpcio-tools"])
        .status()
        .expect("pip runs");
    assert!(status.success(), "pip install grpcio grpcio-tools failed");
    assert!(importable(), "grpcio installed but not importable");
}

/// Starts the example on `port`; returns once it printed READY.
fn start_example(port: u16) -> Proc {
    let mut child = Command::new("python3")
        .arg(root().join("upstream/examples/python/stream_upstream.py"))
        .args(["--port", &port.to_string(), "--zone", "any", "--proto-root"])
        .arg(root().join("proto"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python upstream");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut proc = Proc(child);
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    if read.is_err() || line.trim() != "READY" {
        proc.kill();
        panic!("the Python upstream did not start: {line:?}");
    }
    proc
}

#[tokio::test]
async fn a_python_upstream_answers_and_pushes_over_the_stream() {
    ensure_grpcio();
    let port = free_port();
    let _python = tokio::task::spawn_blocking(move || start_example(port))
        .await
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let node = TestNode::start_routed(|c| {
        c.upstream.protocol = UpstreamProtocol::Stream;
        c.zones.upstreams = (0..6)
            .map(|z| StaticZone {
                zone: gatesvr_proto::zone::zone_id(z),
                addrs: vec![addr.clone()],
            })
            .collect();
    })
    .await;
    let client = Client::connect(node.client_config("pia")).await.unwrap();

    let r = client.request(1, "echo from python").await.unwrap();
    assert_eq!((r.app_code, &r.payload[..]), (0, &b"from python"[..]));

    let r = client.request(1, "push hello from python").await.unwrap();
    assert_eq!(r.app_code, 0, "{}", r.message);
    assert_eq!(&r.payload[..], b"pushed 1");
    let push = next_push(&client).await.expect("the push arrives");
    assert_eq!(push.msg_type, "py");
    assert_eq!(push.content, "hello from python");

    let r = client.request(1, "dance").await.unwrap();
    assert_eq!(r.app_code, 1);
}
