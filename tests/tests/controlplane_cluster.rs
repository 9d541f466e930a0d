//! The documented three-node control plane as real processes: three `gatesvr controlplane
//! --config F` on 127.0.0.1 with mTLS, driven by `gatectl`.
//!
//! Invariant checked: the cluster elects a leader; after the leader is killed a new leader is
//! elected, writes continue and nothing committed is lost; the killed node rejoins and catches
//! up by installing a snapshot (the survivors compacted their logs past it).
//!
//! The binaries are taken from the target directory this test runs from, and built with cargo
//! if missing. No assertion is about time: conditions are polled with a bound.

use std::path::{Path, PathBuf};

use serde_json::Value;

const TOKEN: &str = "cluster-test-admin-token";

use gatesvr_tests::procs::{
    self, Proc, binary, controlplane_config, free_port, spawn_controlplane, wait_for,
};

struct Node {
    id: u64,
    grpc: u16,
    admin: u16,
    config: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Node {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }
}

fn write_config(dir: &Path, node: &Node, all: &[(u64, u16, u16)], certs: &Path) {
    let data = dir.join(format!("data-{}", node.id));
    let raft_extra = "  snapshot_every: 20\n  keep_after_snapshot: 0\n";
    let yaml = controlplane_config(node.id, &data, all, certs, raft_extra);
    std::fs::write(&node.config, yaml).expect("write config");
}

fn start(gatesvr: &Path, node: &mut Node) {
    node.proc = Some(spawn_controlplane(gatesvr, &node.config, &node.log, TOKEN));
}

/// Runs gatectl with JSON output; `Ok(json)` on exit 0, else `Err(exit code, stderr)`.
fn gatectl(endpoint: &str, args: &[&str]) -> Result<Value, (Option<i32>, String)> {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    procs::gatectl(endpoint, TOKEN, &all).map(|s| serde_json::from_str(&s).unwrap_or(Value::Null))
}

fn leader_of(node: &Node) -> Option<u64> {
    let st = gatectl(&node.endpoint(), &["cluster", "status"]).ok()?;
    st["leader"]["id"].as_u64()
}

fn upstream_count(node: &Node, consistency: &str) -> Option<usize> {
    let v = gatectl(
        &node.endpoint(),
        &["--consistency", consistency, "upstreams", "list"],
    )
    .ok()?;
    v["upstreams"].as_array().map(Vec::len)
}

fn register(node: &Node, i: usize) {
    let addr = format!("10.0.{}.{}:9001", i / 200, i % 200 + 1);
    let zone = format!("{:03}", i % 6 + 1);
    wait_for(&format!("registering upstream {i}"), || {
        gatectl(
            &node.endpoint(),
            &[
                "upstreams",
                "register",
                "--zone",
                &zone,
                "--addr",
                &addr,
                "--service",
                "game",
            ],
        )
        .ok()
    });
}

#[test]
fn three_process_cluster_survives_leader_loss_and_rejoiner_catches_up_by_snapshot() {
    let gatesvr = binary("gatesvr", "gatesvr");
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    gatesvr_common::certs::generate(&certs, &[]).expect("dev certs");

    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node {
            id,
            grpc: free_port(),
            admin: free_port(),
            config: dir.path().join(format!("cp-{id}.yaml")),
            log: dir.path().join(format!("cp-{id}.log")),
            proc: None,
        })
        .collect();
    let all: Vec<(u64, u16, u16)> = nodes.iter().map(|n| (n.id, n.grpc, n.admin)).collect();
    for n in &mut nodes {
        write_config(dir.path(), n, &all, &certs);
        start(&gatesvr, n);
    }

    // One leader, agreed by all three.
    let leader = wait_for("a leader all nodes agree on", || {
        let seen: Vec<Option<u64>> = nodes.iter().map(leader_of).collect();
        match seen[0] {
            Some(l) if seen.iter().all(|s| *s == Some(l)) => Some(l),
            _ => None,
        }
    });

    // Writes through a follower (forwarded to the leader).
    let follower = nodes
        .iter()
        .position(|n| n.id != leader)
        .expect("a follower");
    for i in 0..10 {
        register(&nodes[follower], i);
    }
    assert_eq!(upstream_count(&nodes[follower], "linearizable"), Some(10));

    // Kill the leader.
    let li = nodes
        .iter()
        .position(|n| n.id == leader)
        .expect("leader index");
    drop(nodes[li].proc.take());
    let survivors: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    let new_leader = wait_for("a new leader among the survivors", || {
        let l = leader_of(&nodes[survivors[0]])?;
        (l != leader && leader_of(&nodes[survivors[1]]) == Some(l)).then_some(l)
    });
    assert_ne!(new_leader, leader);

    // Writes continue; keep writing until the survivors have compacted their logs, so the
    // killed node can only catch up by snapshot.
    let writer = survivors[0];
    let mut total = 10;
    wait_for("the new leader to purge its log", || {
        register(&nodes[writer], total);
        total += 1;
        let nl = nodes.iter().find(|n| n.id == new_leader)?;
        let st = gatectl(&nl.endpoint(), &["cluster", "status"]).ok()?;
        (st["purged_index"].as_u64()? > 15 && total >= 40).then_some(())
    });
    assert_eq!(
        upstream_count(&nodes[writer], "linearizable"),
        Some(total),
        "nothing lost"
    );

    // The killed node rejoins from its data dir and catches up by snapshot.
    start(&gatesvr, &mut nodes[li]);
    wait_for("the rejoined node to catch up", || {
        let n = &nodes[li];
        let st = gatectl(&n.endpoint(), &["cluster", "status"]).ok()?;
        let has_snapshot = st["committed_snapshot_index"].as_u64().is_some();
        (has_snapshot && upstream_count(n, "local")? == total).then_some(())
    });
    // And it serves linearizable reads as a follower.
    assert_eq!(upstream_count(&nodes[li], "linearizable"), Some(total));
}
