//! An upstream written in Python from the proto files alone
//! (`upstream/examples/python/stream_upstream.py`) answers requests and pushes
//! over the streaming contract, through a real data-plane node, to a client of
//! the Rust SDK and to the `gate-client` binary (a real client process).
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
use gatesvr_tests::procs::{Proc, binary, free_port};
use gatesvr_tests::{TestNode, next_push};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Makes sure the Python modules are importable, installing them if not.
fn ensure_grpcio() {
    // The tests of this file run as parallel processes: one checks and
    // installs at a time. Two pip installs at once on a fresh machine raced,
    // and one test failed (session 27). Released when `_lock` drops.
    let _lock = {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("grpcio-install.lock");
        let file = std::fs::File::create(path).expect("create the install lock file");
        file.lock().expect("take the install lock");
        file
    };
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

/// The Python example upstream on a free port (grpcio installed if missing), and an
/// in-process node routing every zone to it over the streaming contract.
async fn node_with_python_upstream() -> (TestNode, Proc) {
    ensure_grpcio();
    let port = free_port();
    let python = tokio::task::spawn_blocking(move || start_example(port))
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
    (node, python)
}

#[tokio::test]
async fn a_python_upstream_answers_and_pushes_over_the_stream() {
    let (node, _python) = node_with_python_upstream().await;
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

/// Runs the `gate-client` binary against `node` as `openid`, sending each of
/// `send` in order and then listening for pushes; returns its JSON lines.
async fn gate_client(node: &TestNode, openid: &str, send: &[&str]) -> Vec<serde_json::Value> {
    let exe = binary("gatesvr-sdk", "gate-client");
    let mut cmd = Command::new(exe);
    cmd.arg("--addr")
        .arg(node.dp.quic_addr().to_string())
        .arg("--ca")
        .arg(node.dir.ca())
        .args(["--openid", openid, "--token", &node.dir.token(openid)])
        .args(["--listen", "2s"]);
    for payload in send {
        cmd.args(["--send", payload]);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("gate-client runs"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "gate-client failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[tokio::test]
async fn a_python_upstream_answers_and_pushes_through_the_gate_client_binary() {
    let (node, _python) = node_with_python_upstream().await;

    let lines = gate_client(
        &node,
        "quinn",
        &["echo through a process", "push hi from python", "dance"],
    )
    .await;
    let of = |kind: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["type"] == kind).collect()
    };
    assert_eq!(of("connected").len(), 1, "{lines:?}");
    let responses = of("response");
    assert_eq!(responses.len(), 3, "{lines:?}");
    assert_eq!(
        (&responses[0]["app_code"], &responses[0]["payload"]),
        (
            &serde_json::json!(0),
            &serde_json::json!("through a process")
        )
    );
    assert_eq!(
        (&responses[1]["app_code"], &responses[1]["payload"]),
        (&serde_json::json!(0), &serde_json::json!("pushed 1"))
    );
    assert_eq!(responses[2]["app_code"], 1, "unknown command: {lines:?}");
    let pushes = of("push");
    assert_eq!(pushes.len(), 1, "{lines:?}");
    assert_eq!(
        (
            &pushes[0]["msg_type"],
            &pushes[0]["content"],
            &pushes[0]["seq_id"]
        ),
        (
            &serde_json::json!("py"),
            &serde_json::json!("hi from python"),
            &serde_json::json!(1)
        )
    );
}
