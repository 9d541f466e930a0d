//! An in-process cluster over real loopback sockets: one control-plane node
//! (raft on disk in a temp dir) and N data-plane nodes that register with it,
//! watch it and claim sessions through it.

use std::sync::Arc;
use std::time::Duration;

use gatesvr_controlplane::{ControlPlane, ControlPlaneConfig};
use gatesvr_dataplane::{DataPlane, DataPlaneConfig, Routing};
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_proto::upstream::{PushToClientRequest, TargetType};

use crate::{TestDir, eventually};

pub struct TestCluster {
    pub dir: Arc<TestDir>,
    pub cp: Option<ControlPlane>,
    pub cp_config: ControlPlaneConfig,
    pub dps: Vec<DataPlane>,
}

fn cp_config(dir: &TestDir) -> ControlPlaneConfig {
    let mut cfg = ControlPlaneConfig {
        node_id: 1,
        data_dir: dir.dir.path().join("cp-1"),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        dev_mode: true,
        ..ControlPlaneConfig::default()
    }
    .fast_timings();
    cfg.cluster.bootstrap = true;
    cfg.tls.insecure = true;
    cfg.admin.auth = gatesvr_controlplane::config::AuthMode::None;
    cfg.leases.min_ttl = Duration::from_millis(100);
    cfg.leases.check_interval = Duration::from_millis(50);
    cfg
}

impl TestCluster {
    /// Starts the control plane and `n` data planes (echo routing), and waits
    /// until every data plane sees every other one.
    pub async fn start(n: usize, tweak: impl Fn(&mut DataPlaneConfig)) -> Self {
        let dir = Arc::new(TestDir::new());
        let mut cp_config = cp_config(&dir);
        let cp = ControlPlane::start(cp_config.clone())
            .await
            .expect("control plane starts");
        // Restarts reuse the bound ports.
        cp_config.grpc_addr = cp.grpc_addr();
        cp_config.admin_addr = cp.admin_addr();
        cp_config.cluster.bootstrap = false;
        let mut dps = Vec::new();
        for i in 1..=n {
            let mut cfg = dir.dataplane_config(&format!("dp-{i}"));
            cfg.control_plane.endpoints = vec![cp.grpc_addr().to_string()];
            cfg.control_plane.insecure = true;
            cfg.control_plane.lease_ttl = Duration::from_secs(1);
            cfg.control_plane.state_file = Some(dir.dir.path().join(format!("dp-{i}.state")));
            cfg.server.drain_rate = 1000;
            tweak(&mut cfg);
            dps.push(
                DataPlane::start(cfg, Routing::Echo)
                    .await
                    .expect("data plane starts"),
            );
        }
        let cluster = Self {
            dir,
            cp: Some(cp),
            cp_config,
            dps,
        };
        for dp in &cluster.dps {
            let c = dp.node().cluster.clone().expect("cluster member");
            eventually("every data plane sees every node", || {
                c.is_connected() && c.view().nodes.len() == n
            })
            .await;
        }
        cluster
    }

    pub fn client_config(&self, dp: usize, openid: &str) -> gatesvr_sdk::ClientConfig {
        gatesvr_sdk::ClientConfig::new(self.dps[dp].quic_addr(), openid, self.dir.token(openid))
            .with_ca_file(self.dir.ca())
    }

    pub async fn gateway(&self, dp: usize) -> GatewayServiceClient<tonic::transport::Channel> {
        GatewayServiceClient::connect(format!("http://{}", self.dps[dp].grpc_addr()))
            .await
            .expect("gRPC connect")
    }

    pub async fn stop_control_plane(&mut self) {
        if let Some(cp) = self.cp.take() {
            cp.shutdown().await;
        }
    }

    /// Starts the control plane again on the same data directory and ports. A winding-down
    /// task of the stopped instance can hold the directory's lock for a moment (a process
    /// restart has no such overlap), so a failed start is retried for a bounded time.
    pub async fn restart_control_plane(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let cp = loop {
            match ControlPlane::start(self.cp_config.clone()).await {
                Ok(cp) => break cp,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("control plane restart: {e:#}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("control plane restarts: {e:#}"),
            }
        };
        self.cp = Some(cp);
    }
}

/// A push addressed by openid.
pub fn push(openid: &str, n: u64) -> PushToClientRequest {
    PushToClientRequest {
        target_type: TargetType::Openid as i32,
        target_id: openid.into(),
        msg_type: "seq".into(),
        content: n.to_string(),
        data: Default::default(),
        durable: false,
    }
}

/// Pushes "message N" for every N of `range` to `openid` through the plaintext GatewayService
/// at `grpc` (an in-process test node), each accepted.
pub async fn push_messages(
    grpc: std::net::SocketAddr,
    openid: &str,
    range: std::ops::RangeInclusive<u64>,
) {
    let mut gw = GatewayServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("gRPC connect");
    for n in range {
        let mut p = push(openid, n);
        p.msg_type = "chat".into();
        p.content = format!("message {n}");
        gw.push_to_client(p).await.expect("push accepted");
    }
}
