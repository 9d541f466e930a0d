//! Day-2 operations against a real `gatesvr controlplane` process, through `gatectl` as an
//! operator runs it: HTTPS with a CA file and a client certificate, a list of endpoints
//! tried in turn, and every day-2 command (sessions list/get/disconnect, nodes
//! cordon/uncordon/drain/cancel-drain/remove, upstreams health, watch, completion).
//! Data-plane nodes are stand-ins over the real gRPC API (mTLS), so the test controls
//! exactly which sessions exist.
//!
//! Invariants checked:
//! - exit codes are the same in table and JSON output (`sessions get UNKNOWN` exits 3 both
//!   ways); refusals exit 4, a missing client certificate or no reachable endpoint exits 7;
//! - a cordoned node's claims of new sessions are refused while it keeps its own; uncordon
//!   lifts that;
//! - a drain not yet started can be cancelled; only dead or departed nodes can be removed;
//! - a disconnected session has no owner node and a newer epoch;
//! - a learner at an existing member's address is refused; no message says "conflict:
//!   conflict:".
//!
//! Conditions are polled with a bound; nothing is asserted about time.

use std::path::PathBuf;
use std::process::Command;

use gatesvr_common::identity::Role;
use gatesvr_proto::control::control_plane_client::ControlPlaneClient;
use gatesvr_proto::control::{
    Claim, ClaimSessionsRequest, DataPlaneNode, LeaveNodeRequest, NodeState, RegisterNodeRequest,
};
use gatesvr_tests::procs::{Proc, binary, free_port, wait_for};
use serde_json::Value;
use tonic::transport::Channel;

const TOKEN: &str = "operations-test-admin";

struct Setup {
    _dir: tempfile::TempDir,
    _cp: Proc,
    certs: PathBuf,
    admin: u16,
    grpc: u16,
}

fn start() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    // Role certificates: the control plane's own, and one per data-plane node id the test
    // registers (a node may only act for itself, docs/operations.md "Security").
    let nodes = [
        (Role::DataPlane, "dp-a".into()),
        (Role::DataPlane, "dp-b".into()),
    ];
    gatesvr_common::certs::ensure(&certs, &nodes).expect("dev certs");
    let (admin, grpc) = (free_port(), free_port());
    let c = certs.display();
    let yaml = format!(
        "node_id: 1\ndata_dir: {data}\ngrpc_addr: 127.0.0.1:{grpc}\nadmin_addr: 127.0.0.1:{admin}\n\
         cluster: {{ bootstrap: true }}\n\
         tls: {{ cert_file: {c}/controlplane-1.crt, key_file: {c}/controlplane-1.key, ca_file: {c}/ca.crt, server_name: localhost }}\n\
         raft: {{ heartbeat_interval: 100ms, election_timeout_min: 500ms, election_timeout_max: 1000ms }}\n\
         admin:\n  auth: tokens\n  tls: {{ cert_file: {c}/server.crt, key_file: {c}/server.key, client_ca_file: {c}/ca.crt }}\n",
        data = dir.path().join("cp").display(),
    );
    let config = dir.path().join("cp.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let log = std::fs::File::create(dir.path().join("cp.log")).expect("log");
    let child = Command::new(binary("gatesvr", "gatesvr"))
        .args(["controlplane", "--config"])
        .arg(&config)
        .env("GATESVR_ADMIN__ADMIN_TOKEN", TOKEN)
        // gatectl's own variable in the operator's shell must not break the server.
        .env("GATESVR_ADMIN_TOKEN", "whatever-gatectl-uses")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn gatesvr controlplane");
    Setup {
        _dir: dir,
        _cp: Proc(child),
        certs,
        admin,
        grpc,
    }
}

/// What gatectl printed and how it exited.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

impl Setup {
    /// gatectl with a dead endpoint first, then the real one, over HTTPS with the client
    /// certificate.
    fn gatectl(&self, args: &[&str]) -> Out {
        let endpoints = format!(
            "https://127.0.0.1:{},https://127.0.0.1:{}",
            free_port(),
            self.admin
        );
        let c = &self.certs;
        let (ca, cert, key) = (
            c.join("ca.crt"),
            c.join("admin-operator.crt"),
            c.join("admin-operator.key"),
        );
        let mut all: Vec<&str> = vec!["--endpoints", &endpoints, "--token", TOKEN];
        all.extend(["--cacert", ca.to_str().unwrap()]);
        all.extend(["--cert", cert.to_str().unwrap()]);
        all.extend(["--key", key.to_str().unwrap()]);
        all.extend_from_slice(args);
        self.gatectl_raw(&all)
    }

    fn gatectl_raw(&self, args: &[&str]) -> Out {
        let out = Command::new(binary("gatesvr-controlplane", "gatectl"))
            .args(args)
            .env_remove("GATESVR_ADMIN_TOKEN")
            .env_remove("GATECTL_ENDPOINT")
            .output()
            .expect("run gatectl");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn ok(&self, args: &[&str]) -> Out {
        let o = self.gatectl(args);
        assert_eq!(o.code, 0, "gatectl {args:?}: {}", o.stderr);
        o
    }

    /// The control plane's gRPC API as data-plane node `node`.
    async fn grpc(&self, node: &str) -> ControlPlaneClient<Channel> {
        let tls = gatesvr_common::tls::tonic_client_tls(
            &gatesvr_common::certs::role_files(&self.certs, Role::DataPlane, node),
            "localhost",
        )
        .expect("client tls");
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", self.grpc))
                .expect("endpoint")
                .tls_config(tls)
                .expect("tls");
        for _ in 0..200 {
            if let Ok(ch) = endpoint.connect().await {
                return ControlPlaneClient::new(ch);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("control plane gRPC never came up");
    }
}

async fn register(cp: &mut ControlPlaneClient<Channel>, node_id: &str) {
    cp.register_node(RegisterNodeRequest {
        node: Some(DataPlaneNode {
            node_id: node_id.into(),
            quic_addr: format!("127.0.0.1:{}", free_port()),
            grpc_addr: format!("127.0.0.1:{}", free_port()),
            state: NodeState::Active as i32,
            lease_expires_at_ms: 0,
            ..Default::default()
        }),
        lease_ttl_ms: 60_000,
    })
    .await
    .expect("register node");
}

/// Claims `openid` for `node`; `Err(reason)` if refused.
async fn claim(
    cp: &mut ControlPlaneClient<Channel>,
    node: &str,
    openid: &str,
) -> Result<u64, String> {
    let r = cp
        .claim_sessions(ClaimSessionsRequest {
            node_id: node.into(),
            claims: vec![Claim {
                openid: openid.into(),
                session_id: format!("sess-{openid}"),
                seen_epoch: 0,
                fresh_session_id: String::new(),
            }],
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let c = &r.results[0];
    if c.error.is_empty() {
        Ok(c.owner.as_ref().map_or(0, |o| o.epoch))
    } else {
        Err(c.error.clone())
    }
}

fn node<'a>(nodes: &'a Value, id: &str) -> &'a Value {
    nodes["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node_id"] == id))
        .unwrap_or_else(|| panic!("{id} not in {nodes}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gatectl_day_two() {
    let s = start();
    // Up: the first endpoint is dead, the second answers (over HTTPS, client cert).
    wait_for("the control plane to elect itself", || {
        let o = s.gatectl(&["-o", "json", "cluster", "status"]);
        (o.code == 0 && o.json()["leader"]["id"] == 1).then_some(())
    });

    // Without a client certificate the admin port refuses the connection: exit 7.
    let ca = s.certs.join("ca.crt");
    let no_cert = s.gatectl_raw(&[
        "--endpoints",
        &format!("https://127.0.0.1:{}", s.admin),
        "--cacert",
        ca.to_str().unwrap(),
        "--token",
        TOKEN,
        "cluster",
        "status",
    ]);
    assert_eq!(no_cert.code, 7, "{}", no_cert.stderr);
    // No endpoint reachable at all: exit 7, naming each.
    let dead = s.gatectl_raw(&[
        "--endpoints",
        &format!("http://127.0.0.1:{}", free_port()),
        "zones",
        "list",
    ]);
    assert_eq!(dead.code, 7, "{}", dead.stderr);

    let mut cp = s.grpc("dp-a").await;
    let mut cp_b = s.grpc("dp-b").await;
    register(&mut cp, "dp-a").await;
    register(&mut cp_b, "dp-b").await;
    for o in ["alice", "alfred", "bob", "carol"] {
        claim(&mut cp, "dp-a", o).await.expect("claim");
    }
    claim(&mut cp_b, "dp-b", "dave").await.expect("claim");

    // sessions list: filters and pages.
    let page = s
        .ok(&[
            "-o", "json", "sessions", "list", "--node", "dp-a", "--limit", "2",
        ])
        .json();
    let ids: Vec<&str> = page["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["openid"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alfred", "alice"]);
    assert_eq!(page["next_after"], "alice");
    let all = s
        .ok(&[
            "-o", "json", "sessions", "list", "--node", "dp-a", "--limit", "1", "--all",
        ])
        .json();
    assert_eq!(all.as_array().unwrap().len(), 4, "{all}");
    let al = s
        .ok(&["-o", "json", "sessions", "list", "--prefix", "al"])
        .json();
    assert_eq!(al["sessions"].as_array().unwrap().len(), 2, "{al}");
    let table = s.ok(&["sessions", "list", "--node", "dp-b"]);
    assert!(
        table.stdout.contains("dave") && !table.stdout.contains("alice"),
        "{}",
        table.stdout
    );

    // sessions get: exit 3 for nobody's openid, in both formats.
    assert_eq!(s.gatectl(&["sessions", "get", "nobody"]).code, 3);
    let j = s.gatectl(&["-o", "json", "sessions", "get", "nobody"]);
    assert_eq!(j.code, 3, "{}", j.stderr);
    assert!(j.json()["session"].is_null());
    let before = s.ok(&["-o", "json", "sessions", "get", "bob"]).json()["session"]["epoch"]
        .as_u64()
        .unwrap();

    // sessions disconnect: nobody owns it any more, at a newer epoch.
    s.ok(&["sessions", "disconnect", "bob"]);
    let after = s.ok(&["-o", "json", "sessions", "get", "bob"]).json();
    assert_eq!(after["session"]["owner_node"], "", "{after}");
    assert!(after["session"]["epoch"].as_u64().unwrap() > before);
    assert_eq!(s.gatectl(&["sessions", "disconnect", "nobody"]).code, 3);

    // cordon: dp-a keeps its sessions, may not take new ones; uncordon lifts it.
    s.ok(&["nodes", "cordon", "dp-a"]);
    let nodes = s.ok(&["-o", "json", "nodes", "list"]).json();
    assert_eq!(node(&nodes, "dp-a")["cordoned"], true);
    let refused = claim(&mut cp, "dp-a", "erin").await;
    assert!(refused.is_err(), "a cordoned node claimed a new session");
    claim(&mut cp, "dp-a", "alice")
        .await
        .expect("its own session stays");
    s.ok(&["nodes", "uncordon", "dp-a"]);
    claim(&mut cp, "dp-a", "erin").await.expect("uncordoned");

    // drain, then cancel before the node acts on it.
    s.ok(&["nodes", "drain", "dp-b"]);
    let nodes = s.ok(&["-o", "json", "nodes", "list"]).json();
    assert_eq!(node(&nodes, "dp-b")["drain_requested"], true);
    s.ok(&["nodes", "cancel-drain", "dp-b"]);
    let nodes = s.ok(&["-o", "json", "nodes", "list"]).json();
    assert_eq!(node(&nodes, "dp-b")["state"], "active");
    assert_eq!(node(&nodes, "dp-b")["drain_requested"], false);

    // remove: refused while live (exit 4), done once the node left.
    let live = s.gatectl(&["nodes", "remove", "dp-b"]);
    assert_eq!(live.code, 4, "{}", live.stderr);
    assert!(
        !live.stderr.contains("conflict: conflict:"),
        "{}",
        live.stderr
    );
    cp_b.leave_node(LeaveNodeRequest {
        node_id: "dp-b".into(),
    })
    .await
    .expect("leave");
    s.ok(&["nodes", "remove", "dp-b"]);
    let nodes = s.ok(&["-o", "json", "nodes", "list"]).json();
    assert!(
        nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["node_id"] != "dp-b")
    );
    assert_eq!(s.gatectl(&["nodes", "remove", "dp-b"]).code, 3);

    // watch: one version printed, then stop (a JSON line per version).
    let w = s.ok(&["-o", "json", "nodes", "list", "--watch", "--count", "1"]);
    assert_eq!(w.stdout.lines().count(), 1, "{}", w.stdout);
    let w = s.ok(&[
        "sessions",
        "list",
        "--watch",
        "--count",
        "1",
        "--interval",
        "100ms",
    ]);
    assert!(w.stdout.contains("alice"), "{}", w.stdout);

    // upstreams health: this control plane was not told the data planes' HTTP port.
    let h = s.gatectl(&["upstreams", "health"]);
    assert_eq!(h.code, 4, "{}", h.stderr);
    assert!(h.stderr.contains("dataplane_http_port"), "{}", h.stderr);

    // A learner at this member's own address: refused, clearly.
    let grpc_addr = format!("127.0.0.1:{}", s.grpc);
    let admin_addr = format!("127.0.0.1:{}", s.admin);
    let l = s.gatectl(&[
        "cluster",
        "add-learner",
        "--id",
        "7",
        "--grpc-addr",
        &grpc_addr,
        "--admin-addr",
        &admin_addr,
    ]);
    assert_eq!(l.code, 4, "{}", l.stderr);
    assert!(l.stderr.contains("already uses"), "{}", l.stderr);
    assert!(!l.stderr.contains("conflict: conflict:"), "{}", l.stderr);

    // One learner at a time (`raft.max_learners`, default 1): a second is refused with a
    // message naming the key, and removing the first makes room. Nothing listens at these
    // addresses; a single voter commits without its learners.
    let add = |id: &str| {
        let (grpc, admin) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        s.gatectl(&[
            "cluster",
            "add-learner",
            "--id",
            id,
            "--grpc-addr",
            &grpc,
            "--admin-addr",
            &admin,
        ])
    };
    let first = add("8");
    assert_eq!(first.code, 0, "{}", first.stderr);
    let second = add("9");
    assert_eq!(second.code, 4, "{}", second.stderr);
    assert!(
        second.stderr.contains("raft.max_learners"),
        "{}",
        second.stderr
    );
    let removed = s.gatectl(&["cluster", "remove", "8"]);
    assert_eq!(removed.code, 0, "{}", removed.stderr);
    let again = add("9");
    assert_eq!(again.code, 0, "{}", again.stderr);
    let removed = s.gatectl(&["cluster", "remove", "9"]);
    assert_eq!(removed.code, 0, "{}", removed.stderr);

    // Shell completion.
    let comp = s.gatectl_raw(&["completion", "bash"]);
    assert_eq!(comp.code, 0);
    assert!(comp.stdout.contains("gatectl") && comp.stdout.contains("cordon"));
}

/// `--endpoints` parsing never needs a server: bad input is a usage error (exit 2).
#[test]
fn gatectl_usage_errors() {
    let run = |args: &[&str]| {
        Command::new(binary("gatesvr-controlplane", "gatectl"))
            .args(args)
            .env_remove("GATECTL_ENDPOINT")
            .output()
            .expect("run gatectl")
    };
    let o = run(&["--endpoints", "ftp://x:1", "zones", "list"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["--endpoints", "https://127.0.0.1:1", "zones", "list"]);
    assert_eq!(o.status.code(), Some(2), "https needs --cacert");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--cacert"));
}
