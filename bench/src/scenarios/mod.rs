//! The scenarios. Each starts what it measures (child processes from `gate-bench serve`), runs
//! its baseline and the system under test interleaved (A/B/A/B) for `rounds` rounds, and reports
//! medians and ratios.

pub mod broadcast;
pub mod claims;
pub mod failover;
pub mod load;
pub mod push;
pub mod remote;
pub mod rtt;
pub mod scale;
pub mod sessions;
pub mod throughput;
pub mod web;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::util::{Pinning, RunDir, ServerProc};

/// Options shared by every scenario.
#[derive(Debug, Clone)]
pub struct Opts {
    pub rounds: usize,
    pub window: Duration,
    pub warmup: Duration,
    /// Smoke sizes (test suite): correctness of the harness, not speed.
    pub tiny: bool,
    pub payload: usize,
    /// Where run directories (certs, raft data, fsync files) go: a real disk.
    pub base: PathBuf,
    pub pin: Pinning,
    /// Sessions for `sessions` (idle-session memory).
    pub sessions: usize,
    /// Sessions for `push` / `broadcast`.
    pub fanout: usize,
    /// Pushes per call in `push` (1: PushToClient; more: PushBatch).
    pub push_batch: usize,
    /// Clients' QUIC idle timeout (`failover`, `load`).
    pub detect: Duration,
    /// `--client-sockets`: how failover's clients get their UDP sockets.
    pub client_sockets: crate::client::Sockets,
    /// Run against a given deployment instead of processes started here.
    pub target: Option<std::sync::Arc<crate::target::Target>>,
}

impl Opts {
    pub fn server_cpu(&self) -> Option<usize> {
        self.pin.enabled.then_some(self.pin.server_cpu)
    }
    pub fn helper_cpu(&self) -> Option<usize> {
        self.pin.enabled.then_some(self.pin.client_cpu)
    }
    pub fn rundir(&self) -> Result<RunDir> {
        RunDir::new(&self.base)
    }

    /// The data plane under test, its upstream (if `with_upstream`) on the helper CPU.
    pub fn start_dataplane(
        &self,
        dir: &RunDir,
        with_upstream: bool,
    ) -> Result<(ServerProc, Option<ServerProc>)> {
        let up = if with_upstream {
            Some(ServerProc::spawn(
                "upstream-echo",
                &["upstream-echo".into()],
                self.helper_cpu(),
            )?)
        } else {
            None
        };
        let mut args = vec![
            "dataplane".into(),
            "--dir".into(),
            dir.path().display().to_string(),
        ];
        if let Some(up) = &up {
            args.push("--upstream".into());
            args.push(up.addr("grpc")?.to_string());
        }
        let dp = ServerProc::spawn("dataplane", &args, self.server_cpu())?;
        Ok((dp, up))
    }

    /// The data plane under test with its upstream at `upstream` (for instance
    /// one served by the scenario itself), over the streaming contract.
    pub fn start_dataplane_stream_upstream(
        &self,
        dir: &RunDir,
        upstream: std::net::SocketAddr,
    ) -> Result<ServerProc> {
        let args = vec![
            "dataplane".into(),
            "--dir".into(),
            dir.path().display().to_string(),
            "--upstream".into(),
            upstream.to_string(),
            "--upstream-stream".into(),
        ];
        ServerProc::spawn("dataplane", &args, self.server_cpu())
    }

    /// A data plane (echo) that also offers WebTransport and a WebSocket listener.
    pub fn start_web_dataplane(&self, dir: &RunDir) -> Result<ServerProc> {
        let args = vec![
            "dataplane".into(),
            "--dir".into(),
            dir.path().display().to_string(),
            "--web".into(),
        ];
        ServerProc::spawn("dataplane", &args, self.server_cpu())
    }

    /// A 3-node control plane (durable) in one process on the server CPU.
    pub fn start_controlplane(&self, dir: &RunDir) -> Result<ServerProc> {
        ServerProc::spawn(
            "controlplane",
            &[
                "controlplane".into(),
                "--dir".into(),
                dir.path().display().to_string(),
                "--nodes".into(),
                "3".into(),
            ],
            self.server_cpu(),
        )
    }

    pub fn start_bare(&self, dir: &RunDir) -> Result<ServerProc> {
        ServerProc::spawn(
            "bare",
            &[
                "bare".into(),
                "--dir".into(),
                dir.path().display().to_string(),
            ],
            self.server_cpu(),
        )
    }

    pub fn payload(&self) -> Vec<u8> {
        vec![b'x'; self.payload]
    }
}

/// Waits until the data plane's upstream is in rotation (first health check passed).
pub async fn wait_upstream_ready(c: &mut crate::client::Conn) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = crate::client::closed_loop(
            c,
            1,
            b"ping",
            Duration::ZERO,
            Duration::from_millis(1),
            crate::client::Reply::Response,
        )
        .await?;
        if r.errors == 0 && r.all > 0 {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the data plane never reached its upstream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
