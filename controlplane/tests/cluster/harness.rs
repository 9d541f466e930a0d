//! In-process control-plane nodes over real 127.0.0.1 sockets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use gatesvr_controlplane::config::AuthMode;
use gatesvr_controlplane::{ControlPlane, ControlPlaneConfig, Member, Node, NodeId};
use gatesvr_proto::control::control_plane_client::ControlPlaneClient;
use tonic::transport::Channel;

pub const ADMIN_TOKEN: &str = "admin-secret";
pub const READ_TOKEN: &str = "read-secret";

/// Polls `f` until it holds; panics naming `what` after a generous bound (never asserts a
/// duration: the bound only stops a hung test).
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node config for tests: loopback, port 0, plaintext, tokens, fast timings.
pub fn config(dir: &std::path::Path, id: NodeId) -> ControlPlaneConfig {
    let mut cfg = ControlPlaneConfig {
        node_id: id,
        data_dir: dir.join(format!("node-{id}")),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        ..ControlPlaneConfig::default()
    };
    cfg.tls.insecure = true;
    cfg.admin.auth = AuthMode::Tokens;
    cfg.admin.admin_token = Some(ADMIN_TOKEN.into());
    cfg.admin.insecure_plaintext_http = true;
    cfg.admin.read_token = Some(READ_TOKEN.into());
    // Tolerant of a loaded 2-core CI machine: no spurious elections from a starved heartbeat.
    cfg.raft.heartbeat_interval = Duration::from_millis(100);
    cfg.raft.election_timeout_min = Duration::from_millis(800);
    cfg.raft.election_timeout_max = Duration::from_millis(1600);
    cfg.raft.write_timeout = Duration::from_secs(3);
    cfg.raft.read_timeout = Duration::from_secs(3);
    cfg.leases.min_ttl = Duration::from_millis(100);
    cfg.leases.default_ttl = Duration::from_secs(1);
    cfg.leases.check_interval = Duration::from_millis(50);
    cfg
}

/// Clusters running at once across this test binary (tests run in parallel threads; more
/// clusters than cores starve heartbeats and cause spurious elections).
fn slots() -> std::sync::Arc<tokio::sync::Semaphore> {
    static SLOTS: std::sync::OnceLock<std::sync::Arc<tokio::sync::Semaphore>> =
        std::sync::OnceLock::new();
    SLOTS
        .get_or_init(|| std::sync::Arc::new(tokio::sync::Semaphore::new(2)))
        .clone()
}

/// A cluster of in-process nodes sharing one temp dir.
pub struct Cluster {
    _slot: tokio::sync::OwnedSemaphorePermit,
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<NodeId, ControlPlane>,
    /// Bound (grpc, admin) addresses, kept so a restarted node reuses them.
    pub addrs: BTreeMap<NodeId, (SocketAddr, SocketAddr)>,
    pub tweak: fn(&mut ControlPlaneConfig),
}

impl Cluster {
    /// Starts node 1 (bootstrapping), then adds the others as learners and promotes them.
    pub async fn start(n: u64, tweak: fn(&mut ControlPlaneConfig)) -> Cluster {
        let slot = slots().acquire_owned().await.unwrap();
        let mut c = Cluster {
            _slot: slot,
            dir: tempfile::tempdir().unwrap(),
            nodes: BTreeMap::new(),
            addrs: BTreeMap::new(),
            tweak,
        };
        let mut cfg = config(c.dir.path(), 1);
        cfg.cluster.bootstrap = true;
        tweak(&mut cfg);
        c.launch(1, cfg).await;
        c.wait_leader().await;
        for id in 2..=n {
            let mut cfg = config(c.dir.path(), id);
            tweak(&mut cfg);
            c.launch(id, cfg).await;
            let (grpc, admin) = c.addrs[&id];
            let member = Member {
                grpc_addr: grpc.to_string(),
                admin_addr: admin.to_string(),
            };
            let any = c.node(1).clone();
            any.add_learner(id, member).await.unwrap();
            any.promote(id).await.unwrap();
        }
        c
    }

    async fn launch(&mut self, id: NodeId, cfg: ControlPlaneConfig) {
        // The data directory's lock goes with the last store handle of the previous in-process
        // instance of this node, which a winding-down task may hold a moment: retry briefly.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let cp = loop {
            match ControlPlane::start(cfg.clone()).await {
                Ok(cp) => break cp,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("starting node {id}: {e}"),
            }
        };
        self.addrs.insert(id, (cp.grpc_addr(), cp.admin_addr()));
        self.nodes.insert(id, cp);
    }

    pub fn node(&self, id: NodeId) -> &Node {
        self.nodes[&id].node()
    }

    /// Waits until every running node agrees on one running leader; returns it.
    pub async fn wait_leader(&self) -> NodeId {
        let mut leader = 0;
        wait_until("a leader all running nodes agree on", || {
            let seen: Vec<Option<NodeId>> = self
                .nodes
                .values()
                .map(|n| n.node().leader().map(|(id, _)| id))
                .collect();
            match seen.first() {
                Some(Some(l))
                    if seen.iter().all(|s| *s == Some(*l)) && self.nodes.contains_key(l) =>
                {
                    leader = *l;
                    self.nodes[l].node().is_leader()
                }
                _ => false,
            }
        })
        .await;
        leader
    }

    /// Stops a node (its data dir stays).
    pub async fn kill(&mut self, id: NodeId) {
        if let Some(cp) = self.nodes.remove(&id) {
            cp.shutdown().await;
        }
    }

    /// Restarts a stopped node on its old addresses from its data dir.
    pub async fn restart(&mut self, id: NodeId) {
        let mut cfg = config(self.dir.path(), id);
        (self.tweak)(&mut cfg);
        let (grpc, admin) = self.addrs[&id];
        cfg.grpc_addr = grpc;
        cfg.admin_addr = admin;
        self.launch(id, cfg).await;
    }

    /// A data-plane API client to node `id`.
    pub async fn client(&self, id: NodeId) -> ControlPlaneClient<Channel> {
        let (grpc, _) = self.addrs[&id];
        ControlPlaneClient::connect(format!("http://{grpc}"))
            .await
            .unwrap()
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id).await;
        }
    }
}

/// A minimal HTTP/1 client for the admin API.
pub async fn http(
    method: &str,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let resp = client
        .request(req.body(Full::new(bytes::Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}
