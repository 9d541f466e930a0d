//! The cluster as operators run it, as real processes on 127.0.0.1, secure as
//! `deploy/config` ships it: three `gatesvr controlplane` nodes (raft over
//! mTLS), data-plane processes (`gatesvr dataplane`, every internal hop over
//! mTLS with their role certificates: GatewayService and Peer, upstreams,
//! control plane) started under any name (Helm names pods anew on every
//! rollout), and one `gate-upstream` per zone serving mTLS with an upstream
//! certificate. Nothing runs with `insecure_plaintext_internal`.
//!
//! Used by `cluster_processes.rs` (takeover, outage, drain, kill -9) and
//! `rolling.rs` (rolling replacements).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use gatesvr_common::certs;
use gatesvr_common::identity::Role;
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_sdk::ClientConfig;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::procs::{Proc, binary, controlplane_config, free_port, spawn_controlplane};
use crate::{PATIENCE, TestDir, http_get, http_get_with_token};

/// The control plane's admin token in these clusters.
pub const ADMIN_TOKEN: &str = "process-cluster-admin";

/// One control-plane process.
pub struct ControlPlaneProc {
    pub id: u64,
    pub grpc: u16,
    pub admin: u16,
    /// None once killed.
    pub proc: Option<Proc>,
}

/// One data-plane process.
pub struct DataPlaneProc {
    pub name: String,
    pub quic: u16,
    pub http: u16,
    pub grpc: u16,
    config: PathBuf,
    /// None once stopped or killed.
    pub proc: Option<Proc>,
}

/// Control plane, upstreams and data planes as processes on 127.0.0.1.
pub struct ProcessCluster {
    pub dir: TestDir,
    gatesvr: PathBuf,
    pub cps: Vec<ControlPlaneProc>,
    _upstreams: Vec<Proc>,
    /// Every data plane ever started, in start order (stopped ones keep their slot).
    pub dps: Vec<DataPlaneProc>,
}

/// Starts `bin` with `args` and `envs`, stderr appended to `log`, at `RUST_LOG=info`.
pub fn spawn(bin: &Path, args: &[&str], log: &Path, envs: &[(&str, &str)]) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .env("RUST_LOG", "info");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().expect("spawn"))
}

/// A lazily connecting gRPC channel to `127.0.0.1:port` over TLS trusting the CA in
/// `certs`, presenting the role certificate `(role, id)` if given.
pub fn mtls_channel(port: u16, certs_dir: &Path, identity: Option<(Role, &str)>) -> Channel {
    let ca = std::fs::read(certs_dir.join("ca.crt")).expect("ca.crt");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((role, id)) = identity {
        certs::ensure(certs_dir, &[(role, id.to_string())]).expect("role certificate");
        let files = certs::role_files(certs_dir, role, id);
        tls = tls.identity(Identity::from_pem(
            std::fs::read(files.cert_file).expect("cert"),
            std::fs::read(files.key_file).expect("key"),
        ));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .tls_config(tls)
        .expect("tls config")
        .connect_lazy()
}

impl ProcessCluster {
    /// Three control-plane nodes, one upstream per zone (`zones`), and the
    /// data planes `names`, each ready (routing every zone) on return.
    pub async fn start(names: &[&str], zones: u32) -> Self {
        let gatesvr = binary("gatesvr", "gatesvr");
        let upstream_bin = binary("gate-upstream", "gate-upstream");
        let dir = TestDir::new();
        let certs_dir = dir.certs();
        let root = dir.dir.path().to_path_buf();
        let members: Vec<(u64, u16, u16)> =
            (1..=3).map(|id| (id, free_port(), free_port())).collect();
        let mut cps = Vec::new();
        for &(id, grpc, admin) in &members {
            // Short leases so that a killed node is noticed within a test's patience.
            // `default_ttl` is also a new leader's grace before it declares anyone dead:
            // at the shipped 10 s it raced a replica recovery's 10 s patience in the tests
            // that restart the control plane, and a recovery that gave up first said
            // SESSION_EXPIRED instead of RECOVERED.
            let yaml = controlplane_config(
                id,
                &root.join(format!("cp-{id}")),
                &members,
                &certs_dir,
                "leases:\n  default_ttl: 2s\n  min_ttl: 500ms\n  check_interval: 100ms\n",
            );
            let path = root.join(format!("cp-{id}.yaml"));
            std::fs::write(&path, yaml).expect("cp config");
            let proc = spawn_controlplane(
                &gatesvr,
                &path,
                &root.join(format!("cp-{id}.log")),
                ADMIN_TOKEN,
            );
            cps.push(ControlPlaneProc {
                id,
                grpc,
                admin,
                proc: Some(proc),
            });
        }
        let mut cluster = Self {
            dir,
            gatesvr,
            cps,
            _upstreams: Vec::new(),
            dps: Vec::new(),
        };
        for name in names {
            cluster.spawn_dp(name);
        }
        let upstream_cert = certs::role_files(&certs_dir, Role::Upstream, "demo");
        for z in 0..zones {
            let zone = gatesvr_proto::zone::zone_id(z);
            let port = free_port();
            let args = [
                "--zone".to_string(),
                zone.clone(),
                "--addr".into(),
                format!("127.0.0.1:{port}"),
                "--gateway".into(),
                format!("127.0.0.1:{}", cluster.dps[0].grpc),
                // Every member, each upstream starting at a different one: a dead member
                // (the leader-kill tests) must not cut an upstream's lease renewals.
                "--control-plane".into(),
                (0..3)
                    .map(|i| format!("127.0.0.1:{}", cluster.cps[(z as usize + i) % 3].grpc))
                    .collect::<Vec<_>>()
                    .join(","),
                "--lease-ttl".into(),
                "2s".into(),
                // Serves mTLS to the data planes and uses the same identity towards the
                // control plane and the gateway.
                "--tls-cert".into(),
                upstream_cert.cert_file.display().to_string(),
                "--tls-key".into(),
                upstream_cert.key_file.display().to_string(),
                "--tls-ca".into(),
                certs_dir.join("ca.crt").display().to_string(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cluster._upstreams.push(spawn(
                &upstream_bin,
                &args,
                &root.join(format!("up-{zone}.log")),
                &[],
            ));
        }
        for i in 0..cluster.dps.len() {
            cluster.wait_ready(i).await;
        }
        cluster
    }

    fn spawn_dp(&mut self, name: &str) -> usize {
        let certs_dir = self.dir.certs();
        certs::ensure(&certs_dir, &[(Role::DataPlane, name.to_string())]).expect("dp cert");
        let root = self.dir.dir.path().to_path_buf();
        let endpoints: Vec<String> = self
            .cps
            .iter()
            .map(|c| format!("\"127.0.0.1:{}\"", c.grpc))
            .collect();
        let (quic, http, grpc) = (free_port(), free_port(), free_port());
        let config = root.join(format!("{name}.yaml"));
        let own = format!(
            "{{cert_file: {c}/dataplane-{name}.crt, key_file: {c}/dataplane-{name}.key, ca_file: {c}/ca.crt}}",
            c = certs_dir.display()
        );
        let yaml = format!(
            "node_id: {name}\n\
             server:\n  quic_addr: 127.0.0.1:{quic}\n  http_addr: 127.0.0.1:{http}\n  grpc_addr: 127.0.0.1:{grpc}\n  metrics_addr: 127.0.0.1:0\n  cert_file: {c}/server.crt\n  key_file: {c}/server.key\n  drain_rate: 1000\n  drain_timeout: 20s\n  grpc_tls: {own}\n\
             auth:\n  secret_file: {root}/secret\n\
             upstream:\n  health_check_interval: 1s\n  tls: {own}\n\
             control_plane:\n  endpoints: [{endpoints}]\n  tls: {own}\n  lease_ttl: 1s\n  state_file: {root}/{name}.state\n",
            c = certs_dir.display(),
            root = root.display(),
            endpoints = endpoints.join(", "),
        );
        std::fs::write(&config, yaml).expect("dp config");
        self.dps.push(DataPlaneProc {
            name: name.to_string(),
            quic,
            http,
            grpc,
            config,
            proc: None,
        });
        let i = self.dps.len() - 1;
        self.restart_dp(i);
        i
    }

    /// Starts data plane `i` again (same name, config and state file; its log is appended to).
    pub fn restart_dp(&mut self, i: usize) {
        if let Some(mut old) = self.dps[i].proc.take() {
            old.kill();
        }
        let config = self.dps[i].config.display().to_string();
        let log = self.log_path(i);
        self.dps[i].proc = Some(spawn(
            &self.gatesvr,
            &["dataplane", "--config", &config],
            &log,
            &[],
        ));
    }

    /// Starts data plane `name` (a new pod) and waits until it is ready.
    pub async fn add_dp(&mut self, name: &str) -> usize {
        let i = self.spawn_dp(name);
        self.wait_ready(i).await;
        i
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir
            .dir
            .path()
            .join(format!("{}.log", self.dps[i].name))
    }

    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits for /ready of data plane `i` (fails with its log's end).
    pub async fn wait_ready(&mut self, i: usize) {
        let http = self.http(i);
        let deadline = tokio::time::Instant::now() + PATIENCE * 3;
        let mut last = (0, String::new());
        loop {
            let proc = self.dps[i].proc.as_mut().expect("started");
            if let Some(status) = proc.0.try_wait().expect("try_wait") {
                panic!(
                    "data plane {i} exited ({status}); its log:\n{}",
                    self.log_tail(i)
                );
            }
            if tokio::net::TcpStream::connect(http).await.is_ok() {
                last = http_get(http, "/ready").await;
                if last.0 == 200 {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "data plane {i} never ready (last /ready: {last:?}); its log:\n{}",
                self.log_tail(i)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM to data plane `i` (it drains and leaves) and its exit status.
    pub async fn drain_and_stop(&mut self, i: usize) -> ExitStatus {
        self.sigterm(i);
        self.wait_exit(i).await
    }

    /// SIGTERM to data plane `i` (a rolling-upgrade step); it drains and exits.
    pub fn sigterm(&self, i: usize) {
        let pid = self.dps[i]
            .proc
            .as_ref()
            .expect("running")
            .0
            .id()
            .to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
    }

    /// Waits for data plane `i` to exit (after a SIGTERM) and returns its status.
    pub async fn wait_exit(&mut self, i: usize) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + PATIENCE * 3;
        loop {
            let child = &mut self.dps[i].proc.as_mut().expect("running").0;
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.dps[i].proc = None;
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "drained node {} never exited; its log:\n{}",
                self.dps[i].name,
                self.log_tail(i)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// kill -9 of data plane `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.dps[i].proc.take() {
            p.kill();
        }
    }

    /// kill -9 of control-plane node `id`.
    pub fn kill_cp(&mut self, id: u64) {
        let cp = self
            .cps
            .iter_mut()
            .find(|c| c.id == id)
            .expect("a control-plane node of the cluster");
        if let Some(mut p) = cp.proc.take() {
            p.kill();
        }
    }

    /// Starts control-plane node `id` again after [`ProcessCluster::kill_cp`], on its
    /// data directory, config and ports (its new log: `cp-<id>.restarted.log`).
    pub fn restart_cp(&mut self, id: u64) {
        let root = self.dir.dir.path().to_path_buf();
        let cp = self
            .cps
            .iter_mut()
            .find(|c| c.id == id)
            .expect("a control-plane node of the cluster");
        assert!(cp.proc.is_none(), "control-plane node {id} is running");
        cp.proc = Some(spawn_controlplane(
            &self.gatesvr,
            &root.join(format!("cp-{id}.yaml")),
            &root.join(format!("cp-{id}.restarted.log")),
            ADMIN_TOKEN,
        ));
    }

    /// The control-plane leader, as the first live node reports it.
    pub async fn leader(&self) -> Option<u64> {
        for cp in self.cps.iter().filter(|c| c.proc.is_some()) {
            let addr = SocketAddr::from(([127, 0, 0, 1], cp.admin));
            let (status, body) = http_get_with_token(addr, "/v1/cluster", ADMIN_TOKEN).await;
            if status == 200 {
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                if let Some(leader) = v.pointer("/leader/id").and_then(|l| l.as_u64()) {
                    return Some(leader);
                }
            }
        }
        None
    }

    /// Indices of the data planes running now.
    pub fn running(&self) -> Vec<usize> {
        (0..self.dps.len())
            .filter(|i| self.dps[*i].proc.is_some())
            .collect()
    }

    /// The index of the data plane called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.dps.iter().position(|d| d.name == name)
    }

    pub fn quic(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.dps[i].quic))
    }

    pub fn http(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.dps[i].http))
    }

    /// GatewayService of data plane `i`, as an upstream calls it (mTLS, upstream certificate).
    pub async fn gateway(&self, i: usize) -> GatewayServiceClient<Channel> {
        GatewayServiceClient::new(mtls_channel(
            self.dps[i].grpc,
            &self.dir.certs(),
            Some((Role::Upstream, "demo")),
        ))
    }

    pub fn client_config(&self, i: usize, openid: &str) -> ClientConfig {
        ClientConfig::new(self.quic(i), openid, self.dir.token(openid))
            .with_ca_file(self.dir.ca())
            .with_request_timeout(Duration::from_secs(10))
    }

    /// The path of data plane `i`'s config file.
    pub fn config_path(&self, i: usize) -> &Path {
        &self.dps[i].config
    }
}
