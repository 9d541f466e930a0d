//! Running against given addresses (an existing deployment: `gatesvr dev`, deploy/cluster.sh,
//! a Kubernetes install) instead of the processes gate-bench starts itself. Nothing of the
//! deployment is under gate-bench's control, so there is no in-run baseline: the reports carry
//! absolute figures only and say so.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::util::{TokenSource, set_token_source};

/// `--target-*` flags (global). Any `--target-quic` switches the scenarios that support it
/// (rtt, push, broadcast, sessions, load) to the given deployment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TargetArgs {
    /// Data-plane QUIC address(es) to run against, `host:port` (repeatable or comma-separated).
    /// Sessions are spread over them; a session that loses its node reconnects to the next.
    #[arg(long = "target-quic", global = true, value_delimiter = ',')]
    pub quic: Vec<String>,
    /// A file listing QUIC addresses, one `host:port` per line, re-read for every new
    /// connection (the nodes a load balancer would route new flows to). `load` only.
    #[arg(long = "target-quic-file", global = true)]
    pub quic_file: Option<PathBuf>,
    /// A data-plane GatewayService (gRPC, plaintext) for pushes and broadcasts, `host:port`.
    /// Needed by push and broadcast; `load` pushes through the demo upstream's chat room without it.
    #[arg(long = "target-push", global = true)]
    pub push: Option<String>,
    /// CA certificate (PEM) that signs the data plane's certificate (`gatesvr dev`: certs/dev/ca.crt).
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// Name to check on the data plane's certificate.
    #[arg(long, global = true, default_value = "localhost")]
    pub server_name: String,
    /// HMAC secret file of the deployment's `auth.secret_file`: tokens are minted from it.
    #[arg(long, global = true, conflicts_with_all = ["token_cmd", "token"])]
    pub token_secret_file: Option<PathBuf>,
    /// A shell command printing a token for the openid given as its last argument.
    #[arg(long, global = true, conflicts_with = "token")]
    pub token_cmd: Option<String>,
    /// One fixed token for every client (`gatesvr dev` has client auth off: any value works).
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// PID of the (local) data-plane process, so `sessions` can read its RSS.
    #[arg(long = "target-pid", global = true)]
    pub pid: Option<u32>,
}

/// A deployment to run against.
#[derive(Debug, Clone)]
pub struct Target {
    pub quic: Vec<SocketAddr>,
    pub quic_file: Option<PathBuf>,
    pub push: Option<SocketAddr>,
    pub ca: PathBuf,
    pub server_name: String,
    pub pid: Option<u32>,
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))
}

/// Reads a list of `host:port` lines (blank lines and `#` comments skipped).
pub fn read_addr_file(path: &std::path::Path) -> Result<Vec<SocketAddr>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(resolve)
        .collect()
}

impl TargetArgs {
    /// The target, if any `--target-quic*` was given; sets the token source.
    pub fn target(&self) -> Result<Option<Target>> {
        if self.quic.is_empty() && self.quic_file.is_none() {
            if self.push.is_some() || self.pid.is_some() {
                bail!("--target-push/--target-pid need --target-quic (or --target-quic-file)");
            }
            return Ok(None);
        }
        let quic = self
            .quic
            .iter()
            .filter(|a| !a.is_empty())
            .map(|a| resolve(a))
            .collect::<Result<Vec<_>>>()?;
        let ca = self.ca.clone().context(
            "--ca is required with --target-quic (the CA of the data plane's certificate)",
        )?;
        let source = if let Some(path) = &self.token_secret_file {
            let secret =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            TokenSource::Secret(secret.trim_ascii().to_vec())
        } else if let Some(cmd) = &self.token_cmd {
            TokenSource::Command(cmd.clone())
        } else {
            TokenSource::Fixed(self.token.clone().unwrap_or_else(|| "gate-bench".into()))
        };
        set_token_source(source);
        Ok(Some(Target {
            quic,
            quic_file: self.quic_file.clone(),
            push: self.push.as_deref().map(resolve).transpose()?,
            ca,
            server_name: self.server_name.clone(),
            pid: self.pid,
        }))
    }
}

impl Target {
    /// The QUIC addresses to use now: the file's (if given and not empty), else the flags'.
    pub fn quic_now(&self) -> Vec<SocketAddr> {
        if let Some(path) = &self.quic_file
            && let Ok(list) = read_addr_file(path)
            && !list.is_empty()
        {
            return list;
        }
        self.quic.clone()
    }

    pub fn push_addr(&self, scenario: &str) -> Result<SocketAddr> {
        self.push.with_context(|| {
            format!("{scenario} against given addresses needs --target-push HOST:PORT (a data plane's GatewayService)")
        })
    }

    pub fn net(&self, sockets: usize) -> Result<crate::client::Net> {
        let mut net = crate::client::Net::new(&self.ca, sockets)?;
        net.server_name = self.server_name.clone();
        Ok(net)
    }

    pub fn describe(&self) -> String {
        format!(
            "quic {:?}{}, push {}",
            self.quic,
            self.quic_file
                .as_ref()
                .map(|f| format!(" + file {}", f.display()))
                .unwrap_or_default(),
            self.push.map_or("-".into(), |a| a.to_string())
        )
    }
}
