//! Settings of one demo upstream instance, as command-line flags (each also
//! readable from a `GATE_UPSTREAM_*` environment variable).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use gatesvr_common::tls::TlsFiles;

/// Settings of one demo upstream instance.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Zone this instance serves, e.g. `001`.
    #[arg(long, env = "GATE_UPSTREAM_ZONE", value_parser = parse_zone)]
    pub zone: String,

    /// Address to listen on for UpstreamService and grpc.health.v1.
    #[arg(long, env = "GATE_UPSTREAM_ADDR", default_value = "127.0.0.1:9001")]
    pub addr: SocketAddr,

    /// Address to register with the control plane (e.g. the pod IP when
    /// listening on 0.0.0.0). Default: the listening address.
    #[arg(long, env = "GATE_UPSTREAM_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,

    /// A data-plane node's GatewayService (`host:port`), used to push to clients.
    #[arg(long, env = "GATE_UPSTREAM_GATEWAY", default_value = "127.0.0.1:8092")]
    pub gateway: String,

    /// The control plane's gRPC addresses (`host:port`, comma-separated, or
    /// the flag repeated): every member, or one Service address that reaches
    /// them. When set, the instance registers itself and keeps its lease
    /// alive, moving to the next address when a call fails; when not, the
    /// gateway must list it in its static `zones.upstreams`.
    #[arg(long, env = "GATE_UPSTREAM_CONTROL_PLANE", value_delimiter = ',')]
    pub control_plane: Vec<String>,

    /// Service name reported to the control plane and in GetStatus.
    #[arg(long, env = "GATE_UPSTREAM_SERVICE_NAME", default_value = "demo")]
    pub service_name: String,

    /// Registration lease requested from the control plane.
    #[arg(long, env = "GATE_UPSTREAM_LEASE_TTL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,

    /// Deadline of one push to the gateway.
    #[arg(long, env = "GATE_UPSTREAM_PUSH_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub push_timeout: Duration,

    /// On shutdown, how long to keep serving after reporting NOT_SERVING and
    /// deregistering, so gateways stop sending first. Set it above the
    /// gateways' `health_check_interval` in production.
    #[arg(long, env = "GATE_UPSTREAM_DRAIN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,

    /// mTLS: this instance's certificate (PEM). With `--tls-key` and
    /// `--tls-ca`, serves gRPC over TLS requiring client certificates and
    /// connects to the gateway and control plane over TLS.
    #[arg(long, env = "GATE_UPSTREAM_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// mTLS: this instance's private key (PEM).
    #[arg(long, env = "GATE_UPSTREAM_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,

    /// mTLS: CA bundle that signs the gateway's, control plane's and callers'
    /// certificates (PEM).
    #[arg(long, env = "GATE_UPSTREAM_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,

    /// Name expected in the gateway's and control plane's certificates.
    #[arg(
        long,
        env = "GATE_UPSTREAM_TLS_SERVER_NAME",
        default_value = "localhost"
    )]
    pub tls_server_name: String,
    /// Client certificate for mTLS to the control plane only (the control
    /// plane requires mTLS even where the gateway <-> upstream hop is plaintext).
    #[arg(long, env = "GATE_UPSTREAM_CP_TLS_CERT", requires_all = ["cp_tls_key", "cp_tls_ca"])]
    pub cp_tls_cert: Option<PathBuf>,
    /// Key of `--cp-tls-cert`.
    #[arg(long, env = "GATE_UPSTREAM_CP_TLS_KEY", requires_all = ["cp_tls_cert", "cp_tls_ca"])]
    pub cp_tls_key: Option<PathBuf>,
    /// CA that signed the control plane's certificate.
    #[arg(long, env = "GATE_UPSTREAM_CP_TLS_CA", requires_all = ["cp_tls_cert", "cp_tls_key"])]
    pub cp_tls_ca: Option<PathBuf>,
    /// Trust domain of callers' `spiffe://<trust-domain>/dataplane/<id>`
    /// certificates (with `--tls-*`, only data-plane nodes may call).
    #[arg(long, env = "GATE_UPSTREAM_TRUST_DOMAIN", default_value = gatesvr_common::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

impl Config {
    /// Plaintext settings for `zone` pushing via `gateway`, all else default
    /// (what tests and embedders start from).
    pub fn new(zone: impl Into<String>, gateway: impl Into<String>) -> Self {
        Self {
            zone: zone.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 9001)),
            advertise_addr: None,
            gateway: gateway.into(),
            control_plane: Vec::new(),
            service_name: "demo".into(),
            lease_ttl: Duration::from_secs(15),
            push_timeout: Duration::from_secs(5),
            drain_delay: Duration::ZERO,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_server_name: "localhost".into(),
            cp_tls_cert: None,
            cp_tls_key: None,
            cp_tls_ca: None,
            trust_domain: gatesvr_common::identity::DEFAULT_TRUST_DOMAIN.into(),
        }
    }

    /// The control-plane mTLS files: `--cp-tls-*` if given, else `--tls-*`.
    pub fn cp_tls(&self) -> Option<TlsFiles> {
        match (&self.cp_tls_cert, &self.cp_tls_key, &self.cp_tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
                cert_file: cert.clone(),
                key_file: key.clone(),
                ca_file: Some(ca.clone()),
            }),
            _ => self.tls(),
        }
    }

    /// The mTLS files, when all three flags are given.
    pub fn tls(&self) -> Option<TlsFiles> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
                cert_file: cert.clone(),
                key_file: key.clone(),
                ca_file: Some(ca.clone()),
            }),
            _ => None,
        }
    }
}

/// Zone ids are at least three digits, `001` and up.
fn parse_zone(s: &str) -> Result<String, String> {
    gatesvr_proto::zone::parse_zone_id(s, u32::MAX)
        .map(|_| s.to_owned())
        .ok_or_else(|| format!("{s:?} is not a zone id like 001"))
}
