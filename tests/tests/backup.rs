//! Disaster recovery of the control plane as real processes: three `gatesvr controlplane`
//! nodes with mTLS, `gatectl snapshot export`, the cluster destroyed (processes killed, data
//! directories deleted), a fresh cluster bootstrapped, `gatectl snapshot import`.
//!
//! Invariants checked:
//! - every upstream registration (same instance ids) and every session owner (same owner,
//!   same epoch) written before the export is there after the restore, on every node;
//! - epochs handed out after the restore are newer than any handed out before the backup;
//! - a truncated file, a file with a wrong checksum and a file of another format version are
//!   refused by `gatectl snapshot import` and `inspect` with a message naming the problem and
//!   exit code 8, and nothing is written to the cluster.
//!
//! Run after building the binaries (`cargo build -p gatesvr --bin gatesvr -p
//! gatesvr-controlplane --bin gatectl`); they are built if missing. Conditions are polled
//! with a bound; nothing is asserted about time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gatesvr_proto::control::control_plane_client::ControlPlaneClient;
use gatesvr_proto::control::{
    Claim, ClaimSessionsRequest, DataPlaneNode, NodeState, RegisterNodeRequest,
};
use gatesvr_tests::procs::{
    self, Proc, binary, controlplane_config, free_port, spawn_controlplane, wait_for,
};
use serde_json::Value;

const TOKEN: &str = "backup-test-admin-token";

struct Node {
    id: u64,
    grpc: u16,
    admin: u16,
    proc: Option<Proc>,
}

impl Node {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }
}

struct Cluster {
    nodes: Vec<Node>,
}

/// Starts three fresh nodes (node 1 bootstraps all three) with data under `dir/<tag>-<id>`.
fn start_cluster(gatesvr: &Path, dir: &Path, certs: &Path, tag: &str) -> Cluster {
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node {
            id,
            grpc: free_port(),
            admin: free_port(),
            proc: None,
        })
        .collect();
    let members: Vec<(u64, u16, u16)> = nodes.iter().map(|n| (n.id, n.grpc, n.admin)).collect();
    for n in &mut nodes {
        let config = dir.join(format!("{tag}-{}.yaml", n.id));
        let data = dir.join(format!("{tag}-data-{}", n.id));
        std::fs::write(
            &config,
            controlplane_config(n.id, &data, &members, certs, ""),
        )
        .expect("write config");
        let log = dir.join(format!("{tag}-{}.log", n.id));
        n.proc = Some(spawn_controlplane(gatesvr, &config, &log, TOKEN));
    }
    let cluster = Cluster { nodes };
    wait_for("a leader all nodes agree on", || {
        let seen: Vec<Option<u64>> = cluster
            .nodes
            .iter()
            .map(|n| {
                gatectl_json(&n.endpoint(), &["cluster", "status"])
                    .ok()
                    .and_then(|v| v["leader"]["id"].as_u64())
            })
            .collect();
        match seen[0] {
            Some(l) if seen.iter().all(|s| *s == Some(l)) => Some(l),
            _ => None,
        }
    });
    cluster
}

fn gatectl(endpoint: &str, args: &[&str]) -> Result<String, (Option<i32>, String)> {
    procs::gatectl(endpoint, TOKEN, args)
}

fn gatectl_json(endpoint: &str, args: &[&str]) -> Result<Value, (Option<i32>, String)> {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    gatectl(endpoint, &all).map(|s| serde_json::from_str(&s).unwrap_or(Value::Null))
}

/// (instance_id, zone, address) of every upstream, as `node` sees it.
fn upstreams(node: &Node, consistency: &str) -> Option<Vec<(String, String, String)>> {
    let v = gatectl_json(
        &node.endpoint(),
        &["--consistency", consistency, "upstreams", "list"],
    )
    .ok()?;
    let mut out: Vec<_> = v["upstreams"]
        .as_array()?
        .iter()
        .map(|u| {
            (
                u["instance_id"].as_str().unwrap_or_default().to_string(),
                u["zone"].as_str().unwrap_or_default().to_string(),
                u["address"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    out.sort();
    Some(out)
}

/// (owner node, epoch, session id) of `openid`'s session, as `node` sees it.
fn session(node: &Node, openid: &str, consistency: &str) -> Option<(String, u64, String)> {
    let v = gatectl_json(
        &node.endpoint(),
        &["--consistency", consistency, "sessions", "get", openid],
    )
    .ok()?;
    let s = &v["session"];
    Some((
        s["owner_node"].as_str()?.to_string(),
        s["epoch"].as_u64()?,
        s["session_id"].as_str()?.to_string(),
    ))
}

/// A data-plane stand-in over the real gRPC API (mTLS with its role certificate
/// `dataplane/<node_id>`): registers `node_id` and claims sessions for `openids`;
/// returns the epochs.
async fn claim(grpc: u16, certs: &Path, node_id: &str, openids: &[&str]) -> Vec<u64> {
    let role = gatesvr_common::identity::Role::DataPlane;
    let issued = gatesvr_common::certs::ensure(certs, &[(role, node_id.to_string())])
        .expect("data-plane certificate");
    let tls = gatesvr_common::tls::tonic_client_tls(&issued.role(role, node_id), "localhost")
        .expect("client tls");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("connect to the control plane");
    let mut cp = ControlPlaneClient::new(channel);
    cp.register_node(RegisterNodeRequest {
        node: Some(DataPlaneNode {
            node_id: node_id.into(),
            quic_addr: "127.0.0.1:8453".into(),
            grpc_addr: "127.0.0.1:8092".into(),
            state: NodeState::Active as i32,
            lease_expires_at_ms: 0,
            ..Default::default()
        }),
        lease_ttl_ms: 60_000,
    })
    .await
    .expect("register node");
    let r = cp
        .claim_sessions(ClaimSessionsRequest {
            node_id: node_id.into(),
            claims: openids
                .iter()
                .map(|o| Claim {
                    openid: (*o).into(),
                    session_id: format!("sess-{o}"),
                    seen_epoch: 0,
                })
                .collect(),
        })
        .await
        .expect("claim sessions")
        .into_inner();
    r.results
        .iter()
        .map(|c| {
            assert!(c.error.is_empty(), "claim refused: {}", c.error);
            c.owner.as_ref().expect("owner").epoch
        })
        .collect()
}

/// Writes a copy of `good` changed by `f` and returns its path.
fn variant(dir: &Path, name: &str, good: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = good.to_vec();
    f(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write variant");
    path
}

#[test]
fn export_destroy_restore_keeps_registrations_and_sessions() {
    let gatesvr = binary("gatesvr", "gatesvr");
    binary("gatesvr-controlplane", "gatectl");
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    gatesvr_common::certs::generate(&certs, &[]).expect("dev certs");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // --- the cluster that will be lost -------------------------------------------------
    let mut old = start_cluster(&gatesvr, dir.path(), &certs, "old");
    let ep = old.nodes[1].endpoint();
    for i in 0..6 {
        let zone = format!("{:03}", i + 1);
        let addr = format!("10.0.0.{}:9001", i + 1);
        let mut args = vec![
            "upstreams",
            "register",
            "--zone",
            &zone,
            "--addr",
            &addr,
            "--service",
            "game",
        ];
        if i % 2 == 1 {
            // Leased registrations too: their leases must not lapse at the restore.
            args.extend(["--lease-ttl", "60s"]);
        }
        wait_for(&format!("registering upstream {i}"), || {
            gatectl(&ep, &args).ok()
        });
    }
    let openids = ["alice", "bob", "carol", "dave"];
    let epochs = rt.block_on(claim(old.nodes[0].grpc, &certs, "dp-a", &openids));
    let max_epoch = epochs.iter().copied().max().unwrap();
    let before_upstreams = upstreams(&old.nodes[0], "linearizable").expect("upstreams");
    assert_eq!(before_upstreams.len(), 6);
    let before_sessions: Vec<_> = openids
        .iter()
        .map(|o| session(&old.nodes[0], o, "linearizable").expect("session"))
        .collect();

    // --- export (through a follower or the leader: any node serves it) ------------------
    let file = dir.path().join("backup.gsb");
    let out = gatectl(
        &old.nodes[2].endpoint(),
        &["snapshot", "export", "--out", file.to_str().unwrap()],
    )
    .unwrap_or_else(|e| panic!("export failed: {e:?}"));
    assert!(out.contains("6 upstreams"), "{out}");
    assert!(out.contains("4 session owners"), "{out}");
    let inspect = gatectl_json(
        "http://unused",
        &["snapshot", "inspect", file.to_str().unwrap()],
    )
    .expect("inspect a good file");
    assert_eq!(inspect["version"], 1);
    assert_eq!(inspect["counts"]["owners"], 4);
    assert!(
        inspect["last_applied"]["index"].as_u64().unwrap_or(0) > 0,
        "{inspect}"
    );
    assert_eq!(
        inspect["membership"]["membership"]["configs"][0]
            .as_array()
            .map(Vec::len),
        Some(3),
        "{inspect}"
    );

    // --- disaster: every process and every data directory gone --------------------------
    for n in &mut old.nodes {
        if let Some(mut p) = n.proc.take() {
            p.kill();
        }
    }
    for id in 1..=3 {
        std::fs::remove_dir_all(dir.path().join(format!("old-data-{id}"))).expect("rm data");
    }

    // --- a fresh cluster ------------------------------------------------------------------
    let new = start_cluster(&gatesvr, dir.path(), &certs, "new");
    assert_eq!(upstreams(&new.nodes[0], "linearizable"), Some(Vec::new()));

    // Bad files first: refused, exit 8, named, nothing written.
    let good = std::fs::read(&file).unwrap();
    let nl = good.iter().position(|&b| b == b'\n').unwrap();
    let cases = [
        (
            variant(dir.path(), "truncated.gsb", &good, |b| {
                b.truncate(b.len() - 40)
            }),
            "truncated",
        ),
        (
            variant(dir.path(), "corrupt.gsb", &good, |b| {
                // Same length, one payload byte changed: "alice" -> "alicf".
                let text = String::from_utf8(b.clone()).unwrap();
                let at = nl + text[nl..].find("alice").unwrap() + 4;
                b[at] = b'f';
            }),
            "checksum mismatch",
        ),
        (
            variant(dir.path(), "version.gsb", &good, |b| {
                let text = String::from_utf8(b.clone()).unwrap();
                *b = text
                    .replacen("\"version\":1,", "\"version\":7,", 1)
                    .into_bytes();
            }),
            "version 7 is not supported",
        ),
        (
            variant(dir.path(), "other.gsb", b"key: value\n", |_| {}),
            "not a GateSvr control-plane backup",
        ),
    ];
    for (path, expect) in &cases {
        let p = path.to_str().unwrap();
        for args in [["snapshot", "import", p], ["snapshot", "inspect", p]] {
            let (code, stderr) =
                gatectl(&new.nodes[0].endpoint(), &args).expect_err(&format!("{args:?} must fail"));
            assert_eq!(code, Some(8), "{args:?}: {stderr}");
            assert!(
                stderr.contains(expect),
                "{args:?}: `{stderr}` lacks `{expect}`"
            );
        }
    }
    assert_eq!(upstreams(&new.nodes[0], "linearizable"), Some(Vec::new()));

    // Restore through a follower-or-leader; it commits as one raft entry.
    let out = gatectl(
        &new.nodes[1].endpoint(),
        &["snapshot", "import", file.to_str().unwrap()],
    )
    .unwrap_or_else(|e| panic!("import failed: {e:?}"));
    assert!(out.contains("6 upstreams"), "{out}");
    assert!(out.contains("4 session owners"), "{out}");

    // Every node, the followers included, has it.
    for n in &new.nodes {
        wait_for(&format!("node {} applied the restore", n.id), || {
            (upstreams(n, "local")? == before_upstreams).then_some(())
        });
        for (o, want) in openids.iter().zip(&before_sessions) {
            assert_eq!(
                session(n, o, "local").as_ref(),
                Some(want),
                "{o} on node {}",
                n.id
            );
        }
    }
    assert_eq!(
        upstreams(&new.nodes[2], "linearizable").as_ref(),
        Some(&before_upstreams)
    );
    // Leased registrations got a fresh lease: still there after the lease checks ran.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        upstreams(&new.nodes[0], "linearizable").as_ref(),
        Some(&before_upstreams)
    );
    // Epochs continue far past anything handed out before.
    let after = rt.block_on(claim(new.nodes[0].grpc, &certs, "dp-b", &["alice", "erin"]));
    assert!(
        after.iter().all(|e| *e > max_epoch),
        "{after:?} vs {max_epoch}"
    );
    let (owner, epoch, _) = session(&new.nodes[0], "alice", "linearizable").unwrap();
    assert_eq!(owner, "dp-b");
    assert!(epoch > before_sessions[0].1);
}
