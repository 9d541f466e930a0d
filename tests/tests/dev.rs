//! `gatesvr dev --dataplanes 3` as a developer runs it (one process: control
//! plane, three data planes, a demo upstream), on a loopback address of its
//! own (dev listens on fixed ports).
//!
//! Invariant checked (issue 12, defect 6): an operator's drain request
//! (`gatectl nodes drain`, i.e. `POST /v1/nodes/{id}/drain` on the admin API)
//! drains the node: its session moves to another node with nothing lost, and
//! the node leaves (`left`). Before the fix `dev` never listened for drain
//! requests: the node logged "asked to drain" every heartbeat and no session
//! moved.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use gatesvr_sdk::{Client, ClientConfig, Event};
use gatesvr_tests::procs::{Proc, binary};
use gatesvr_tests::{PATIENCE, TestDir, http_get, http_post};

/// Ports of `gatesvr dev` (gatesvr/src/dev.rs): node i adds 10*i.
const QUIC: u16 = 8453;
const HTTP: u16 = 8080;
const GRPC: u16 = 8092;
const ADMIN: u16 = 8095;

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A loopback address no other test uses (dev's ports are fixed).
fn host() -> IpAddr {
    let pid = std::process::id();
    IpAddr::V4(Ipv4Addr::new(127, 77, (pid >> 8) as u8, (pid as u8).max(2)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_drains_a_node_when_an_operator_asks() {
    let gatesvr = binary("gatesvr", "gatesvr");
    let dir = TestDir::new();
    let root = dir.dir.path();
    let host = host();
    let log = std::fs::File::create(root.join("dev.log")).unwrap();
    let _dev = Proc(
        Command::new(&gatesvr)
            .args(["dev", "--dataplanes", "3", "--zones", "1", "--host"])
            .arg(host.to_string())
            .arg("--data-dir")
            .arg(root.join("dev"))
            .arg("--certs")
            .arg(root.join("dev-certs"))
            .stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "info")
            .spawn()
            .expect("spawn gatesvr dev"),
    );
    let at = |port: u16| SocketAddr::new(host, port);
    for i in 0..3u16 {
        wait_for("every dev data plane ready", async || {
            http_get(at(HTTP + 10 * i), "/ready").await.0 == 200
        })
        .await;
    }
    let nodes = async || http_get(at(ADMIN), "/v1/nodes").await.1;
    wait_for("three active nodes", async || {
        nodes().await.matches("\"state\":\"active\"").count() == 3
    })
    .await;

    let config = ClientConfig::new(at(QUIC), "dev-user", "unused-in-dev")
        .with_ca_file(root.join("dev-certs").join("ca.crt"));
    let client = Client::connect(config).await.expect("client on dp-1");
    assert_eq!(client.node_id(), "dp-1");
    client.request(1, "echo before").await.expect("request");
    let mut gw = gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient::connect(
        format!("http://{}", at(GRPC + 10)),
    )
    .await
    .unwrap();
    gw.push_to_client(gatesvr_tests::cluster::push("dev-user", 1))
        .await
        .expect("push before the drain");

    let (status, body) = http_post(at(ADMIN), "/v1/nodes/dp-1/drain").await;
    assert!((200..300).contains(&status), "{status} {body}");

    // The session moves: the client is sent elsewhere and resumes there.
    let mut delivered = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    loop {
        let event = tokio::time::timeout_at(deadline, client.next_event())
            .await
            .expect("the drained node's client moves to another node");
        match event {
            Some(Event::Push(p)) => delivered.push(p.content),
            Some(Event::Connected { node_id, .. }) if node_id != "dp-1" => break,
            Some(_) => {}
            None => panic!("client closed"),
        }
    }
    gw.push_to_client(gatesvr_tests::cluster::push("dev-user", 2))
        .await
        .expect("push after the drain");
    while delivered.len() < 2 {
        match tokio::time::timeout(PATIENCE, client.next_event()).await {
            Ok(Some(Event::Push(p))) => delivered.push(p.content),
            Ok(Some(_)) => {}
            other => panic!("push lost after the drain: {delivered:?} {other:?}"),
        }
    }
    assert_eq!(delivered, ["1", "2"], "exactly once, in order");
    client
        .request(2, "echo after")
        .await
        .expect("request after");
    wait_for("dp-1 left the cluster", async || {
        nodes().await.contains("\"node_id\":\"dp-1\"")
            && nodes().await.matches("\"state\":\"left\"").count() == 1
    })
    .await;
}
