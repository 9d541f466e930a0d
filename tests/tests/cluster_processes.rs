//! The cluster as operators run it, as real processes on 127.0.0.1: three
//! `gatesvr controlplane` (raft, mTLS), three `gatesvr dataplane` (mTLS to the
//! control plane, state files), one `gate-upstream` per zone registered with
//! the control plane, and SDK clients.
//!
//! Invariants checked, with counts: no push lost, none duplicated, all in
//! order (`sent == delivered`, exactly once); no request failed; every
//! resumed session says RESUMED. Scenarios: takeover by reconnecting to
//! another node while the control-plane leader is killed; the control plane
//! fully down for 30 s while traffic continues, with a data-plane restart
//! during the outage; drain of a node under load by SIGTERM (a rolling
//! upgrade step); kill -9 of a session's owner (no unacked durable push lost).
//! No assertion is about time: conditions are polled with a bound.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use gatesvr_proto::client::ResumeStatus;
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_sdk::{Client, ClientConfig, Event};
use gatesvr_tests::cluster::push;
use gatesvr_tests::processes::spawn;
use gatesvr_tests::procs::{Proc, binary, free_port};
use gatesvr_tests::{PATIENCE, TestDir, http_get};

const ADMIN_TOKEN: &str = "process-cluster-admin";

struct Cp {
    id: u64,
    grpc: u16,
    admin: u16,
    proc: Option<Proc>,
}

struct Dp {
    name: String,
    quic: u16,
    http: u16,
    grpc: u16,
    config: PathBuf,
    proc: Option<Proc>,
}

struct ProcessCluster {
    dir: TestDir,
    gatesvr: PathBuf,
    cps: Vec<Cp>,
    dps: Vec<Dp>,
    _upstreams: Vec<Proc>,
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl ProcessCluster {
    async fn start() -> Self {
        let gatesvr = binary("gatesvr", "gatesvr");
        let upstream_bin = binary("gate-upstream", "gate-upstream");
        let dir = TestDir::new();
        let certs = dir.certs();
        let root = dir.dir.path().to_path_buf();

        // --- control plane: node 1 bootstraps with all three as voters ---
        let mut cps: Vec<Cp> = (1..=3)
            .map(|id| Cp {
                id,
                grpc: free_port(),
                admin: free_port(),
                proc: None,
            })
            .collect();
        let members: String = cps
            .iter()
            .map(|c| {
                format!(
                    "    - {{ id: {}, grpc_addr: \"127.0.0.1:{}\", admin_addr: \"127.0.0.1:{}\" }}\n",
                    c.id, c.grpc, c.admin
                )
            })
            .collect();
        for cp in &mut cps {
            let bootstrap = if cp.id == 1 {
                format!("  bootstrap: true\n  members:\n{members}")
            } else {
                "  bootstrap: false\n".into()
            };
            let yaml = format!(
                "node_id: {id}\ndata_dir: {root}/cp-{id}\ngrpc_addr: 127.0.0.1:{grpc}\nadmin_addr: 127.0.0.1:{admin}\n\
                 cluster:\n{bootstrap}\
                 tls:\n  cert_file: {c}/controlplane-{id}.crt\n  key_file: {c}/controlplane-{id}.key\n  ca_file: {c}/ca.crt\n  server_name: localhost\n\
                 raft:\n  heartbeat_interval: 100ms\n  election_timeout_min: 600ms\n  election_timeout_max: 1200ms\n\
                 leases:\n  min_ttl: 500ms\n  check_interval: 100ms\n\
                 admin:\n  auth: tokens\n  insecure_plaintext_http: true\n",
                id = cp.id,
                root = root.display(),
                grpc = cp.grpc,
                admin = cp.admin,
                c = certs.display(),
            );
            let path = root.join(format!("cp-{}.yaml", cp.id));
            std::fs::write(&path, yaml).unwrap();
            cp.proc = Some(spawn(
                &gatesvr,
                &["controlplane", "--config", path.to_str().unwrap()],
                &root.join(format!("cp-{}.log", cp.id)),
                &[("GATESVR_ADMIN__ADMIN_TOKEN", ADMIN_TOKEN)],
            ));
        }
        let endpoints: Vec<String> = cps
            .iter()
            .map(|c| format!("\"127.0.0.1:{}\"", c.grpc))
            .collect();

        // --- data planes ---
        let mut dps = Vec::new();
        for i in 1..=3 {
            let dp = Dp {
                name: format!("dp-{i}"),
                quic: free_port(),
                http: free_port(),
                grpc: free_port(),
                config: root.join(format!("dp-{i}.yaml")),
                proc: None,
            };
            let yaml = format!(
                "node_id: {name}\n\
                 server:\n  quic_addr: 127.0.0.1:{quic}\n  http_addr: 127.0.0.1:{http}\n  grpc_addr: 127.0.0.1:{grpc}\n  metrics_addr: 127.0.0.1:0\n  cert_file: {c}/server.crt\n  key_file: {c}/server.key\n  drain_rate: 1000\n  drain_timeout: 20s\n  insecure_plaintext_internal: true\n\
                 auth:\n  secret_file: {root}/secret\n\
                 upstream:\n  health_check_interval: 1s\n\
                 control_plane:\n  endpoints: [{endpoints}]\n  tls:\n    cert_file: {c}/dataplane-{name}.crt\n    key_file: {c}/dataplane-{name}.key\n    ca_file: {c}/ca.crt\n  lease_ttl: 1s\n  state_file: {root}/{name}.state\n",
                name = dp.name,
                quic = dp.quic,
                http = dp.http,
                grpc = dp.grpc,
                c = certs.display(),
                root = root.display(),
                endpoints = endpoints.join(", "),
            );
            std::fs::write(&dp.config, yaml).unwrap();
            dps.push(dp);
        }
        let mut cluster = ProcessCluster {
            dir,
            gatesvr,
            cps,
            dps,
            _upstreams: Vec::new(),
        };
        for i in 0..3 {
            cluster.start_dp(i);
        }

        // --- one demo upstream per zone, registered with the control plane over mTLS ---
        let cp_list = cluster
            .cps
            .iter()
            .map(|c| format!("127.0.0.1:{}", c.grpc))
            .collect::<Vec<_>>();
        for z in 0..6u32 {
            let zone = gatesvr_proto::zone::zone_id(z);
            let port = free_port();
            let args = [
                "--zone".to_string(),
                zone.clone(),
                "--addr".into(),
                format!("127.0.0.1:{port}"),
                "--gateway".into(),
                format!("127.0.0.1:{}", cluster.dps[0].grpc),
                "--control-plane".into(),
                cp_list[(z as usize) % 3].clone(),
                "--lease-ttl".into(),
                "2s".into(),
                "--cp-tls-cert".into(),
                certs.join("upstream-demo.crt").display().to_string(),
                "--cp-tls-key".into(),
                certs.join("upstream-demo.key").display().to_string(),
                "--cp-tls-ca".into(),
                certs.join("ca.crt").display().to_string(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cluster._upstreams.push(spawn(
                &upstream_bin,
                &args,
                &root.join(format!("up-{zone}.log")),
                &[],
            ));
        }

        // Ready: every data plane answers /ready and routes every zone.
        for i in 0..3 {
            cluster.wait_dp_ready(i).await;
        }
        cluster
    }

    fn start_dp(&mut self, i: usize) {
        let dp = &mut self.dps[i];
        let log = self.dir.dir.path().join(format!("{}.log", dp.name));
        // Append across restarts.
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(&self.gatesvr)
            .args(["dataplane", "--config"])
            .arg(&dp.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn data plane");
        dp.proc = Some(Proc(child));
    }

    /// Waits for /ready of data plane `i`; if it exits or never gets ready,
    /// fails with the end of its log (the test directory is gone afterwards).
    async fn wait_dp_ready(&mut self, i: usize) {
        let http = self.http(i);
        let log = self
            .dir
            .dir
            .path()
            .join(format!("{}.log", self.dps[i].name));
        let tail = || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        let deadline = tokio::time::Instant::now() + PATIENCE * 3;
        let mut last = (0, String::new());
        loop {
            if let Some(status) = self.dps[i].proc.as_mut().unwrap().0.try_wait().unwrap() {
                panic!("data plane {i} exited ({status}); its log:\n{}", tail());
            }
            if tokio::net::TcpStream::connect(http).await.is_ok() {
                last = http_get(http, "/ready").await;
                if last.0 == 200 {
                    return;
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "data plane {i} never ready (last /ready: {last:?}); its log:\n{}",
                    tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn quic(&self, i: usize) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.dps[i].quic).parse().unwrap()
    }

    fn http(&self, i: usize) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.dps[i].http).parse().unwrap()
    }

    async fn gateway(&self, i: usize) -> GatewayServiceClient<tonic::transport::Channel> {
        GatewayServiceClient::connect(format!("http://127.0.0.1:{}", self.dps[i].grpc))
            .await
            .unwrap()
    }

    fn client_config(&self, i: usize, openid: &str) -> ClientConfig {
        ClientConfig::new(self.quic(i), openid, self.dir.token(openid))
            .with_ca_file(self.dir.ca())
            .with_request_timeout(Duration::from_secs(10))
    }

    /// The control-plane leader, as the first live node reports it.
    async fn leader(&self) -> Option<u64> {
        for cp in self.cps.iter().filter(|c| c.proc.is_some()) {
            let addr = format!("127.0.0.1:{}", cp.admin).parse().unwrap();
            let (status, body) =
                gatesvr_tests::http_get_with_token(addr, "/v1/cluster", ADMIN_TOKEN).await;
            if status == 200 {
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                if let Some(l) = v
                    .get("leader")
                    .and_then(|l| l.get("id"))
                    .and_then(|l| l.as_u64())
                {
                    return Some(l);
                }
            }
        }
        None
    }
}

/// Pushes `from..=to` to `openid` through `gw`, retrying a push that found no
/// owner during a move (an upstream would), so each is accepted exactly once.
async fn push_range(
    gw: &mut GatewayServiceClient<tonic::transport::Channel>,
    openid: &str,
    from: u64,
    to: u64,
) {
    for n in from..=to {
        let mut attempts = 0;
        loop {
            match gw.push_to_client(push(openid, n)).await {
                Ok(_) => break,
                Err(s)
                    if matches!(s.code(), tonic::Code::NotFound | tonic::Code::Unavailable)
                        && attempts < 200 =>
                {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => panic!("push {n} to {openid}: {s}"),
            }
        }
    }
}

/// One durable push, retried while the entry node does not know the owner
/// yet (NOT_FOUND: nothing was queued, so a retry cannot duplicate).
async fn durable_push(
    gw: &mut GatewayServiceClient<tonic::transport::Channel>,
    openid: &str,
    n: u64,
) {
    for _ in 0..200 {
        let mut p = push(openid, n);
        p.durable = true;
        match gw.push_to_client(p).await {
            Ok(_) => return,
            Err(s) if s.code() == tonic::Code::NotFound => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("durable push {n}: {s}"),
        }
    }
    panic!("durable push {n}: the owner never became known");
}

/// Consumes events until `total` pushes arrived; returns their contents and the statuses seen.
async fn collect(client: &Client, total: usize) -> (Vec<u64>, Vec<ResumeStatus>) {
    let mut got = Vec::new();
    let mut statuses = Vec::new();
    while got.len() < total {
        let event = tokio::time::timeout(PATIENCE * 2, client.next_event())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "stalled after {} of {total} pushes; statuses {statuses:?}",
                    got.len()
                )
            })
            .expect("client open");
        match event {
            Event::Push(p) => got.push(p.content.parse().unwrap()),
            Event::Connected { status, .. } => statuses.push(status),
            Event::ResumeFailed { status, .. } => panic!("resume failed: {status:?}"),
            _ => {}
        }
    }
    (got, statuses)
}

fn assert_exactly_once(got: &[u64], sent: u64) {
    assert_eq!(got.len() as u64, sent, "delivered == sent");
    assert_eq!(
        got,
        (1..=sent).collect::<Vec<_>>(),
        "in order, no gap, no duplicate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_while_the_control_plane_leader_dies() {
    let mut cluster = ProcessCluster::start().await;
    let client = Client::connect(cluster.client_config(0, "alice"))
        .await
        .unwrap();
    // Requests go through the zone's upstream process.
    let r = client.request(1, "echo one").await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(body["zone"], gatesvr_proto::zone::zone_of("alice", 6));

    let mut gw = cluster.gateway(2).await;
    push_range(&mut gw, "alice", 1, 50).await;

    // Kill -9 the control-plane leader while requests and pushes continue.
    let leader = cluster.leader().await.expect("a leader");
    cluster.cps[(leader - 1) as usize]
        .proc
        .as_mut()
        .unwrap()
        .kill();
    cluster.cps[(leader - 1) as usize].proc = None;
    let mut failed_requests = 0;
    for i in 0..20 {
        if client.request(1, format!("echo during {i}")).await.is_err() {
            failed_requests += 1;
        }
    }
    assert_eq!(
        failed_requests, 0,
        "a control-plane leader change fails no client request"
    );

    // The client moves to node 2 (a load balancer decision) while pushes keep coming.
    client.reconnect_to(cluster.quic(1));
    push_range(&mut gw, "alice", 51, 100).await;
    let (got, statuses) = collect(&client, 100).await;
    assert_exactly_once(&got, 100);
    assert!(statuses.contains(&ResumeStatus::Resumed), "{statuses:?}");
    assert_eq!(client.node_id(), "dp-2");
    assert!(client.request(1, "echo after").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_down_traffic_continues_and_a_restarted_node_serves() {
    let mut cluster = ProcessCluster::start().await;
    let client = Client::connect(cluster.client_config(0, "bob"))
        .await
        .unwrap();
    client.request(1, "echo before").await.unwrap();
    // Let every node save a state file that knows the upstreams.
    tokio::time::sleep(Duration::from_secs(1)).await;

    for cp in &mut cluster.cps {
        if let Some(mut p) = cp.proc.take() {
            p.kill();
        }
    }
    // Traffic continues for 30 s with no control plane at all.
    let mut gw = cluster.gateway(0).await;
    let outage_end = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut sent, mut requests, mut failed) = (0u64, 0u64, 0u64);
    while tokio::time::Instant::now() < outage_end {
        if client.request(1, "echo during outage").await.is_err() {
            failed += 1;
        }
        requests += 1;
        // (Bounded below the session queue: the client consumes after the outage.)
        if sent < 400 {
            sent += 1;
            push_range(&mut gw, "bob", sent, sent).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(requests > 100, "traffic ran through the outage");
    assert_eq!(
        failed, 0,
        "existing sessions keep working: 0 of {requests} requests failed"
    );

    // A data plane restarted during the outage starts from its state file and routes.
    cluster.dps[2].proc.as_mut().unwrap().kill();
    cluster.start_dp(2);
    let http = cluster.http(2);
    wait_for("restarted node ready from its saved state", async || {
        http_get(http, "/ready").await.0 == 200
    })
    .await;
    let (_, stats) = http_get(http, "/stats").await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(
        stats["cluster"]["serving_from_saved_state"], true,
        "{stats}"
    );
    let newcomer = Client::connect(cluster.client_config(2, "user-3"))
        .await
        .unwrap();
    newcomer
        .request(1, "echo provisional")
        .await
        .expect("routed from the saved state");

    let (got, _) = collect(&client, sent as usize).await;
    assert_exactly_once(&got, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_node_under_load() {
    let mut cluster = ProcessCluster::start().await;
    let users = ["d1", "d2", "d3", "d4"];
    let mut clients = Vec::new();
    for u in users {
        clients.push(Client::connect(cluster.client_config(0, u)).await.unwrap());
    }
    let mut gw = cluster.gateway(1).await;
    for u in users {
        push_range(&mut gw, u, 1, 30).await;
    }
    // A rolling-upgrade step: SIGTERM node 1 while pushes continue.
    let pid = cluster.dps[0].proc.as_ref().unwrap().0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    for u in users {
        push_range(&mut gw, u, 31, 60).await;
    }
    let status = {
        let child = &mut cluster.dps[0].proc.as_mut().unwrap().0;
        let deadline = tokio::time::Instant::now() + PATIENCE * 2;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "drained node never exited"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert!(status.success(), "drained node exits cleanly: {status:?}");
    for (u, client) in users.iter().zip(&clients) {
        let (got, mut statuses) = collect(client, 60).await;
        assert_exactly_once(&got, 60);
        // The move may come after the last push was delivered.
        while !statuses.contains(&ResumeStatus::Resumed) {
            match tokio::time::timeout(PATIENCE, client.next_event()).await {
                Ok(Some(Event::Connected { status, .. })) => statuses.push(status),
                Ok(Some(Event::Push(p))) => panic!("{u}: unexpected extra push {}", p.content),
                Ok(Some(_)) => {}
                other => panic!("{u}: never resumed elsewhere ({statuses:?}, {other:?})"),
            }
        }
        assert_ne!(client.node_id(), "dp-1", "{u} moved off the drained node");
        client.request(1, "echo after drain").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_owner_loses_no_durable_push() {
    let mut cluster = ProcessCluster::start().await;
    let client = Client::connect(cluster.client_config(0, "carol"))
        .await
        .unwrap();
    let mut gw = cluster.gateway(1).await;
    // 10 durable pushes, processed (and so acked) by the client.
    for n in 1..=10u64 {
        durable_push(&mut gw, "carol", n).await;
    }
    let (got, _) = collect(&client, 10).await;
    assert_eq!(got, (1..=10).collect::<Vec<_>>());
    // The client loses its network (it keeps retrying an address that does
    // not answer) while 10 more durable pushes are accepted for it.
    client.reconnect_to("127.0.0.1:9".parse().unwrap());
    for n in 11..=20u64 {
        durable_push(&mut gw, "carol", n).await;
    }
    // Let the ack point reach the standby (synced once a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // kill -9 the owner; the client's network comes back and it lands on node 2.
    cluster.dps[0].proc.as_mut().unwrap().kill();
    cluster.dps[0].proc = None;
    client.reconnect_to(cluster.quic(1));
    // What counts is what the rebuilt session delivers after it says so.
    let mut status = None;
    let mut recovered = Vec::new();
    while status.is_none() || recovered.len() < 10 {
        match tokio::time::timeout(PATIENCE * 2, client.next_event()).await {
            Ok(Some(Event::Push(p))) if status.is_some() => {
                assert!(p.redelivery, "recovered pushes are marked as redeliveries");
                recovered.push(p.content.parse::<u64>().unwrap());
            }
            Ok(Some(Event::ResumeFailed { status: s, .. })) => status = Some(s),
            Ok(Some(_)) => {}
            other => panic!("stalled: status {status:?}, recovered {recovered:?} ({other:?})"),
        }
    }
    assert_eq!(
        status,
        Some(ResumeStatus::Recovered),
        "the client is told its session was rebuilt"
    );
    assert_eq!(
        recovered,
        (11..=20).collect::<Vec<_>>(),
        "every unacked durable push survived the crash, in order"
    );
    assert!(client.request(1, "echo after crash").await.is_ok());
}
