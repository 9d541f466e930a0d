//! A cluster of real processes whose data planes come and go: three
//! `gatesvr controlplane` nodes (raft, mTLS), any number of `gatesvr
//! dataplane` processes started under new names (as Helm names pods on every
//! rollout), and one `gate-upstream` per zone. For rolling-replacement tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use gatesvr_common::certs;
use gatesvr_common::identity::Role;
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_sdk::ClientConfig;

use crate::procs::{Proc, binary, free_port};
use crate::{PATIENCE, TestDir, http_get};

/// One data-plane process.
pub struct DataPlaneProc {
    pub name: String,
    pub quic: u16,
    pub http: u16,
    pub grpc: u16,
    config: PathBuf,
    pub proc: Option<Proc>,
}

/// Control plane, upstreams and data planes as processes on 127.0.0.1.
pub struct ProcessCluster {
    pub dir: TestDir,
    gatesvr: PathBuf,
    cp_grpc: Vec<u16>,
    _cps: Vec<Proc>,
    _upstreams: Vec<Proc>,
    /// Every data plane ever started, in start order (stopped ones keep their slot).
    pub dps: Vec<DataPlaneProc>,
}

/// Starts `bin` with `args` and `envs`, stderr to `log`, at `RUST_LOG=info`.
pub fn spawn(bin: &Path, args: &[&str], log: &Path, envs: &[(&str, &str)]) -> Proc {
    let log = std::fs::File::create(log).expect("log file");
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

impl ProcessCluster {
    /// Three control-plane nodes, one upstream per zone (`zones`), and the
    /// data planes `names`, each ready (routing every zone) on return.
    pub async fn start(names: &[&str], zones: u32) -> Self {
        let gatesvr = binary("gatesvr", "gatesvr");
        let upstream_bin = binary("gate-upstream", "gate-upstream");
        let dir = TestDir::new();
        let certs_dir = dir.certs();
        let root = dir.dir.path().to_path_buf();
        let ports: Vec<(u64, u16, u16)> =
            (1..=3).map(|id| (id, free_port(), free_port())).collect();
        let members: String = ports
            .iter()
            .map(|(id, g, a)| {
                format!(
                    "    - {{ id: {id}, grpc_addr: \"127.0.0.1:{g}\", admin_addr: \"127.0.0.1:{a}\" }}\n"
                )
            })
            .collect();
        let mut cps = Vec::new();
        for (id, grpc, admin) in &ports {
            let bootstrap = if *id == 1 {
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
                root = root.display(),
                c = certs_dir.display(),
            );
            let path = root.join(format!("cp-{id}.yaml"));
            std::fs::write(&path, yaml).expect("cp config");
            cps.push(spawn(
                &gatesvr,
                &[
                    "controlplane",
                    "--config",
                    path.to_str().expect("utf-8 path"),
                ],
                &root.join(format!("cp-{id}.log")),
                &[("GATESVR_ADMIN__ADMIN_TOKEN", "rolling-admin")],
            ));
        }
        let mut cluster = Self {
            dir,
            gatesvr,
            cp_grpc: ports.iter().map(|(_, g, _)| *g).collect(),
            _cps: cps,
            _upstreams: Vec::new(),
            dps: Vec::new(),
        };
        for name in names {
            cluster.spawn_dp(name);
        }
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
                "--control-plane".into(),
                format!("127.0.0.1:{}", cluster.cp_grpc[(z as usize) % 3]),
                "--lease-ttl".into(),
                "2s".into(),
                "--cp-tls-cert".into(),
                certs_dir.join("upstream-demo.crt").display().to_string(),
                "--cp-tls-key".into(),
                certs_dir.join("upstream-demo.key").display().to_string(),
                "--cp-tls-ca".into(),
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
            .cp_grpc
            .iter()
            .map(|g| format!("\"127.0.0.1:{g}\""))
            .collect();
        let (quic, http, grpc) = (free_port(), free_port(), free_port());
        let config = root.join(format!("{name}.yaml"));
        let yaml = format!(
            "node_id: {name}\n\
             server:\n  quic_addr: 127.0.0.1:{quic}\n  http_addr: 127.0.0.1:{http}\n  grpc_addr: 127.0.0.1:{grpc}\n  metrics_addr: 127.0.0.1:0\n  cert_file: {c}/server.crt\n  key_file: {c}/server.key\n  drain_rate: 1000\n  drain_timeout: 20s\n  insecure_plaintext_internal: true\n\
             auth:\n  secret_file: {root}/secret\n\
             upstream:\n  health_check_interval: 1s\n\
             control_plane:\n  endpoints: [{endpoints}]\n  tls:\n    cert_file: {c}/dataplane-{name}.crt\n    key_file: {c}/dataplane-{name}.key\n    ca_file: {c}/ca.crt\n  lease_ttl: 1s\n  state_file: {root}/{name}.state\n",
            c = certs_dir.display(),
            root = root.display(),
            endpoints = endpoints.join(", "),
        );
        std::fs::write(&config, yaml).expect("dp config");
        let log = std::fs::File::create(root.join(format!("{name}.log"))).expect("dp log");
        let child = Command::new(&self.gatesvr)
            .args(["dataplane", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn data plane");
        self.dps.push(DataPlaneProc {
            name: name.to_string(),
            quic,
            http,
            grpc,
            config,
            proc: Some(Proc(child)),
        });
        self.dps.len() - 1
    }

    /// Starts data plane `name` (a new pod) and waits until it is ready.
    pub async fn add_dp(&mut self, name: &str) -> usize {
        let i = self.spawn_dp(name);
        self.wait_ready(i).await;
        i
    }

    fn log_tail(&self, i: usize) -> String {
        let path = self
            .dir
            .dir
            .path()
            .join(format!("{}.log", self.dps[i].name));
        let text = std::fs::read_to_string(path).unwrap_or_default();
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

    pub async fn gateway(&self, i: usize) -> GatewayServiceClient<tonic::transport::Channel> {
        GatewayServiceClient::connect(format!("http://127.0.0.1:{}", self.dps[i].grpc))
            .await
            .expect("gateway gRPC")
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
