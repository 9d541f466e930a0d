//! Data-plane configuration: the Go gateway's keys where they apply
//! (`server.*`, `overload_protection.*`), plus `auth`, `zones`, `log`.
//!
//! Loaded by [`gatesvr_common::config::load`] (YAML, then `GATESVR_*`
//! environment), validated once. Every field has a documented default so an
//! empty file is a working single-node config (apart from certificates).

use std::path::PathBuf;
use std::time::Duration;

use gatesvr_common::config::{ConfigError, Validate, require_file, require_socket_addr};
use gatesvr_common::logging::LogConfig;
use serde::Deserialize;

use crate::session::{QueuePolicy, SessionConfig};

/// Environment names kept from the Go gateway, mapped to our keys.
/// QUIC's smallest allowed `max_udp_payload_size` (RFC 9000 §18.2), the
/// default of `server.max_udp_payload_size`.
pub const MIN_UDP_PAYLOAD: u16 = 1200;

/// The longest `server.push_coalesce`.
pub const MAX_PUSH_COALESCE: Duration = Duration::from_secs(1);

/// QUIC's largest `max_udp_payload_size`.
pub const MAX_UDP_PAYLOAD: u16 = 65_527;

pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("GATESVR_QUIC_ADDR", "server.quic_addr"),
    ("GATESVR_HTTP_ADDR", "server.http_addr"),
    ("GATESVR_GRPC_ADDR", "server.grpc_addr"),
    ("GATESVR_METRICS_ADDR", "server.metrics_addr"),
    ("GATESVR_NODE_ID", "node_id"),
];

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlaneConfig {
    /// Stable id of this node, reported to clients and the control plane.
    /// Default: `dp-` + the host name.
    pub node_id: String,
    pub server: ServerConfig,
    pub overload_protection: OverloadConfig,
    pub auth: AuthConfig,
    pub zones: ZonesConfig,
    /// Upstream channels, health checks and outlier ejection. Its deadline
    /// and concurrency cap come from `overload_protection`.
    pub upstream: crate::upstream::UpstreamConfig,
    /// The control plane; without endpoints the node is standalone.
    pub control_plane: crate::cluster::ControlPlaneClientConfig,
    /// Browser transports besides native QUIC.
    pub transports: TransportsConfig,
    pub log: LogConfig,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
        Self {
            node_id: format!("dp-{host}"),
            server: ServerConfig::default(),
            overload_protection: OverloadConfig::default(),
            auth: AuthConfig::default(),
            zones: ZonesConfig::default(),
            upstream: crate::upstream::UpstreamConfig::default(),
            control_plane: crate::cluster::ControlPlaneClientConfig::default(),
            transports: TransportsConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// `transports:` how browsers reach the node (docs/protocol.md §12). Native
/// QUIC (`gatesvr/1` on `server.quic_addr`) is always on; both browser
/// transports are off by default and on in `gatesvr dev`. Sessions, auth and
/// overload protection are the same whichever transport a client uses.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TransportsConfig {
    /// WebTransport over HTTP/3 on `server.quic_addr` (ALPN `h3` next to
    /// `gatesvr/1`), at `https://HOST:PORT/gatesvr/v1`. Default false.
    pub webtransport: bool,
    /// WebSocket over TLS (TCP) listener, `wss://ADDR/gatesvr/v1`: the
    /// fallback where UDP is blocked. Unset (default): off.
    pub websocket_addr: Option<String>,
    /// A directory served as static files on the WebSocket listener (the
    /// demo page and the JavaScript SDK in `gatesvr dev`). Unset (default):
    /// none.
    pub web_root: Option<PathBuf>,
}

/// `server:` listeners, certificate and per-session protocol settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// QUIC (UDP) listener for clients. Default `127.0.0.1:8453`.
    pub quic_addr: String,
    /// HTTP: /health, /ready, /stats. Default `127.0.0.1:8080`.
    pub http_addr: String,
    /// gRPC GatewayService for upstreams. Default `127.0.0.1:8092`.
    pub grpc_addr: String,
    /// Prometheus /metrics. Default `127.0.0.1:9090`.
    pub metrics_addr: String,
    /// TLS certificate chain (PEM) presented to clients.
    pub cert_file: PathBuf,
    /// Private key (PEM) of `cert_file`.
    pub key_file: PathBuf,
    /// A disconnected session keeps its queue this long. Default 5m.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Unacked pushes are retransmitted after this. Default 30s.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Retransmit rounds before the connection is closed with ACK_TIMEOUT. Default 3.
    pub max_retries: u32,
    /// Interval clients are told to heartbeat at. Default 10s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A connection silent for this long is closed (HEARTBEAT_TIMEOUT). Default 30s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// The Start frame must arrive within this after the handshake. Default 10s.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// QUIC idle timeout (the lower of both peers' applies). Default 30s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// QUIC keep-alive sent by the server, below every idle timeout. Default 10s.
    #[serde(with = "humantime_serde")]
    pub keep_alive_interval: Duration,
    /// Largest UDP payload clients may send to this node, in bytes (QUIC's
    /// `max_udp_payload_size` transport parameter), 1200..=65527. Default
    /// 1200, QUIC's minimum: a client then sends no MTU probes. Each probe
    /// is a datagram of up to ~1.45 KB of PADDING, which quinn 0.11 parses
    /// one byte at a time; the ~4 probes of every new connection were 15% of
    /// a survivor's CPU in a reconnect burst (docs/benchmarks.md, "Session
    /// 11"). What it costs: a client's frames over ~1.1 KB take more
    /// datagrams toward the node (requests, acks); what the node sends is
    /// not capped (its own MTU discovery is unchanged).
    pub max_udp_payload_size: u16,
    /// Longest one write to a client may wait (error frames, answers,
    /// pushes, on every transport). A client that stops reading (no receive
    /// credit, a full TCP window) loses its connection after this, before or
    /// after Start: it cannot hold a connection slot. Closed with
    /// SLOW_CONSUMER; counted in `gatesvr_client_write_timeouts_total`.
    /// Default 10s.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// How long a session's pushes may wait to share a write while earlier
    /// pushes are unacked and less than a datagram's worth is waiting (as
    /// Nagle's algorithm, bounded), and only while the node is CPU-bound
    /// (`push_coalesce_busy`). A push to a session with nothing in flight is
    /// never held. Fewer, fuller datagrams under steady push streams, for up
    /// to this much latency on those pushes. At most 1s; 0s is off.
    /// Default 10ms.
    #[serde(with = "humantime_serde")]
    pub push_coalesce: Duration,
    /// How busy the node's runtime must be (share of its workers' time spent
    /// running tasks, over 100 ms) before `push_coalesce` holds any push; it
    /// stops again 0.2 below. A CPU-bound node saves per-datagram work by
    /// holding; an idle one would only add latency. 0 holds whenever
    /// `push_coalesce` is set. Default 0.9.
    pub push_coalesce_busy: f64,
    /// Largest frame accepted or sent, in bytes (the `max_frame_size` a
    /// StartResponse announces). A push or an upstream answer that would not
    /// fit is refused with an error, never sent. Default 1 MiB.
    pub max_frame_size: usize,
    /// Pushes kept per session until acked. Default 1024.
    pub max_queue: usize,
    /// Payload bytes kept per session until acked; at least
    /// `max_frame_size`. Default 16 MiB.
    pub max_queue_bytes: usize,
    /// `reject` (default) or `drop_oldest` at `max_queue` or `max_queue_bytes`.
    pub queue_policy: QueuePolicy,
    /// Request dedupe window per session. Default 128.
    pub request_window: u64,
    /// Requests executing at once per session. Default 64.
    pub max_inflight: usize,
    /// A drain gives up waiting for clients after this. Default 30s (keep
    /// Kubernetes' terminationGracePeriodSeconds above it).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Sessions moved per second during a drain. Default 200.
    pub drain_rate: u32,
    /// mTLS on `grpc_addr` (GatewayService and the Peer service): this
    /// node's certificate and key, and the CA that signs its clients (other
    /// data-plane nodes, which present their own server certificate, and
    /// upstreams). Unset: plaintext, for a private network only (warns).
    pub grpc_tls: Option<gatesvr_common::tls::TlsFiles>,
    /// Lets upstreams without a client certificate push with
    /// `authorization: Bearer <token>` (the file's trimmed contents).
    /// Requires `grpc_tls`. Default none.
    pub push_token_file: Option<PathBuf>,
    /// Name checked on other nodes' certificates. Default `localhost`.
    pub grpc_server_name: String,
    /// A drain's GoAway names the successor's QUIC address. Set false when
    /// clients reach nodes only through a load balancer (the session then
    /// follows the client to whichever node it lands on). Default true.
    pub drain_redirect: bool,
    /// Directory with the QUIC/TLS keys every node of the deployment shares
    /// (files `stateless-reset-key`, `token-key`, `ticket-keys`; see
    /// `quic_keys`): any node can then reset a dead node's connections at once
    /// and resume its clients' TLS sessions. Unset: per-process random keys.
    pub shared_keys_dir: Option<PathBuf>,
    /// Trust domain of the `spiffe://<trust-domain>/<role>/<id>` identities
    /// internal callers' certificates must name. Default `gatesvr`.
    pub trust_domain: String,
    /// Allows internal hops without TLS (`grpc_tls` unset, upstreams
    /// without `upstream.tls`, an ops listener without a token). Anyone who
    /// reaches those ports can then take sessions and push to any user.
    /// For a laptop or a sealed test network only. Default false.
    pub insecure_plaintext_internal: bool,
    /// Operations listener: `POST /drain` and `/debug/pprof/profile`, apart
    /// from the probes on `http_addr`. Every request needs
    /// `authorization: Bearer <ops token>`. Unset (default): not served
    /// (drain with SIGTERM or `gatectl nodes drain`).
    pub ops_addr: Option<String>,
    /// File holding the ops listener's bearer token (trimmed). Required
    /// with `ops_addr` unless `insecure_plaintext_internal`.
    pub ops_token_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let session = SessionConfig::default();
        Self {
            quic_addr: "127.0.0.1:8453".into(),
            http_addr: "127.0.0.1:8080".into(),
            grpc_addr: "127.0.0.1:8092".into(),
            metrics_addr: "127.0.0.1:9090".into(),
            cert_file: PathBuf::from("certs/dev/server.crt"),
            key_file: PathBuf::from("certs/dev/server.key"),
            session_timeout: session.session_timeout,
            ack_timeout: session.ack_timeout,
            max_retries: session.max_retries,
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Duration::from_secs(10),
            max_udp_payload_size: MIN_UDP_PAYLOAD,
            write_timeout: Duration::from_secs(10),
            push_coalesce: Duration::from_millis(10),
            push_coalesce_busy: 0.9,
            max_frame_size: gatesvr_proto::frame::DEFAULT_MAX_FRAME_SIZE,
            max_queue: session.max_queue,
            max_queue_bytes: session.max_queue_bytes,
            queue_policy: session.queue_policy,
            request_window: session.request_window,
            max_inflight: session.max_inflight,
            drain_timeout: Duration::from_secs(30),
            drain_rate: 200,
            drain_redirect: true,
            grpc_tls: None,
            push_token_file: None,
            grpc_server_name: "localhost".into(),
            shared_keys_dir: None,
            trust_domain: gatesvr_common::identity::DEFAULT_TRUST_DOMAIN.into(),
            insecure_plaintext_internal: false,
            ops_addr: None,
            ops_token_file: None,
        }
    }
}

impl ServerConfig {
    pub fn session_config(&self) -> SessionConfig {
        SessionConfig {
            ack_timeout: self.ack_timeout,
            max_retries: self.max_retries,
            max_queue: self.max_queue,
            max_queue_bytes: self.max_queue_bytes,
            queue_policy: self.queue_policy,
            session_timeout: self.session_timeout,
            request_window: self.request_window,
            max_inflight: self.max_inflight,
        }
    }
}

/// `overload_protection:` limits that shed load with an explicit error.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OverloadConfig {
    /// Master switch. Default true.
    pub enabled: bool,
    /// Concurrent client connections; beyond it new handshakes are refused
    /// before any TLS work. Default 100000.
    pub max_connections: usize,
    /// Client requests per `qps_window_seconds` window for the node. Default 50000.
    pub max_qps: u64,
    /// Window of `max_qps`, seconds. Default 1.
    pub qps_window_seconds: u64,
    /// Upstream calls in flight for the node. Default 1000.
    pub max_upstream_concurrent: usize,
    /// Deadline of one upstream call. Default 30s.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Starts per second from one source IP address, checked before the
    /// token is verified (0: no limit). Over it the Start is answered
    /// `Error{OVERLOADED, retry_after_ms}` and the connection closed.
    /// Default 200 (carrier NATs put many users behind one address).
    pub start_rate_per_address: u32,
    /// Burst of `start_rate_per_address`. Default 400.
    pub start_burst_per_address: u32,
    /// Starts per second for one openid, checked once its token verified
    /// (0: no limit): a reconnect loop cannot churn its session. Default 5.
    pub start_rate_per_openid: u32,
    /// Burst of `start_rate_per_openid`. Default 20.
    pub start_burst_per_openid: u32,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_connections: 100_000,
            max_qps: 50_000,
            qps_window_seconds: 1,
            max_upstream_concurrent: 1000,
            upstream_timeout: Duration::from_secs(30),
            start_rate_per_address: 200,
            start_burst_per_address: 400,
            start_rate_per_openid: 5,
            start_burst_per_openid: 20,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// HMAC-signed tokens (`gatectl token issue`), the default.
    #[default]
    Hmac,
    /// JWT signed with HS256, RS256 or ES256.
    Jwt,
    /// No authentication. Only `gatesvr dev` may use it.
    None,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum JwtAlgorithm {
    #[default]
    HS256,
    RS256,
    ES256,
}

/// `auth:` how clients' `auth_token` is verified.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// HMAC secret (hmac mode) or HS256 secret (jwt mode), raw bytes of the file
    /// with surrounding whitespace trimmed.
    pub secret_file: Option<PathBuf>,
    /// JWT algorithm. Default HS256.
    pub jwt_algorithm: JwtAlgorithm,
    /// PEM public key for RS256 / ES256.
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `iss`, if set.
    pub jwt_issuer: Option<String>,
    /// Required `aud`, if set.
    pub jwt_audience: Option<String>,
    /// Claim holding the openid. Default `sub`.
    pub openid_claim: String,
    /// Refuse a token whose openid differs from StartRequest.openid. Default true.
    pub check_openid: bool,
    /// Allowed clock difference when checking expiry. Default 30s.
    #[serde(with = "humantime_serde")]
    pub clock_skew: Duration,
    /// Set only by `gatesvr dev`; `mode: none` is refused without it.
    #[serde(skip)]
    pub allow_none: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Hmac,
            secret_file: None,
            jwt_algorithm: JwtAlgorithm::HS256,
            jwt_public_key_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            openid_claim: "sub".into(),
            check_openid: true,
            clock_skew: Duration::from_secs(30),
            allow_none: false,
        }
    }
}

/// `zones:` how many zones exist and, until the control plane provides them,
/// which upstream instances serve each.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ZonesConfig {
    /// Number of zones; ids are "001".."NNN". Default 6.
    pub count: u32,
    /// Static upstreams: `[{zone: "001", addrs: ["10.0.0.5:9001"]}]`.
    pub upstreams: Vec<StaticZone>,
}

impl Default for ZonesConfig {
    fn default() -> Self {
        Self {
            count: gatesvr_proto::zone::DEFAULT_ZONE_COUNT,
            upstreams: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticZone {
    pub zone: String,
    pub addrs: Vec<String>,
}

impl DataPlaneConfig {
    /// The router's settings, with the seed's `overload_protection` keys applied.
    pub fn upstream_config(&self) -> crate::upstream::UpstreamConfig {
        let mut cfg = self.upstream.clone();
        cfg.upstream_timeout = self.overload_protection.upstream_timeout;
        cfg.max_upstream_concurrent = self.overload_protection.max_upstream_concurrent;
        cfg
    }
}

impl Validate for DataPlaneConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id.is_empty() {
            return Err(ConfigError::key("node_id", "must not be empty"));
        }
        if self.node_id == gatesvr_common::identity::SHARED_ID {
            return Err(ConfigError::key(
                "node_id",
                "`_any` is reserved for shared role certificates",
            ));
        }
        let s = &self.server;
        require_socket_addr("server.quic_addr", &s.quic_addr)?;
        require_socket_addr("server.http_addr", &s.http_addr)?;
        require_socket_addr("server.grpc_addr", &s.grpc_addr)?;
        require_socket_addr("server.metrics_addr", &s.metrics_addr)?;
        require_file("server.cert_file", &s.cert_file)?;
        require_file("server.key_file", &s.key_file)?;
        if let Some(addr) = &self.transports.websocket_addr {
            require_socket_addr("transports.websocket_addr", addr)?;
        }
        if let Some(root) = &self.transports.web_root {
            if self.transports.websocket_addr.is_none() {
                return Err(ConfigError::key(
                    "transports.web_root",
                    "is served on transports.websocket_addr, which is not set",
                ));
            }
            if !root.is_dir() {
                return Err(ConfigError::key(
                    "transports.web_root",
                    format!("{} is not a directory", root.display()),
                ));
            }
        }
        let positive = [
            ("server.session_timeout", s.session_timeout),
            ("server.ack_timeout", s.ack_timeout),
            ("server.heartbeat_interval", s.heartbeat_interval),
            ("server.heartbeat_timeout", s.heartbeat_timeout),
            ("server.start_timeout", s.start_timeout),
            ("server.write_timeout", s.write_timeout),
            ("server.idle_timeout", s.idle_timeout),
            ("server.keep_alive_interval", s.keep_alive_interval),
            ("server.drain_timeout", s.drain_timeout),
            (
                "overload_protection.upstream_timeout",
                self.overload_protection.upstream_timeout,
            ),
        ];
        for (key, d) in positive {
            if d.is_zero() {
                return Err(ConfigError::key(key, "must be greater than zero"));
            }
        }
        if s.push_coalesce > MAX_PUSH_COALESCE {
            return Err(ConfigError::key(
                "server.push_coalesce",
                "must be at most 1s (it is latency added to pushes)",
            ));
        }
        if !(0.0..=1.0).contains(&s.push_coalesce_busy) {
            return Err(ConfigError::key(
                "server.push_coalesce_busy",
                "must be between 0 and 1 (a share of the runtime's time)",
            ));
        }
        if let Some(tls) = &s.grpc_tls {
            tls.validate("server.grpc_tls")?;
            if tls.ca_file.is_none() {
                return Err(ConfigError::key(
                    "server.grpc_tls.ca_file",
                    "required: it verifies the certificates of peers and upstreams",
                ));
            }
        }
        if let Some(file) = &s.push_token_file {
            if s.grpc_tls.is_none() {
                return Err(ConfigError::key(
                    "server.push_token_file",
                    "needs server.grpc_tls (a bearer token over plaintext would be readable)",
                ));
            }
            require_file("server.push_token_file", file)?;
        }
        if s.grpc_tls.is_none() && !s.insecure_plaintext_internal {
            return Err(ConfigError::key(
                "server.grpc_tls",
                "required: GatewayService and the Peer service must not be plaintext (set server.insecure_plaintext_internal: true to accept that risk)",
            ));
        }
        if self.upstream.tls.is_none() && !s.insecure_plaintext_internal {
            return Err(ConfigError::key(
                "upstream.tls",
                "required: requests to upstreams must not be plaintext (set upstream.tls.insecure_plaintext: true, or server.insecure_plaintext_internal: true)",
            ));
        }
        if let Some(addr) = &s.ops_addr {
            require_socket_addr("server.ops_addr", addr)?;
            match &s.ops_token_file {
                Some(file) => require_file("server.ops_token_file", file)?,
                None if s.insecure_plaintext_internal => {}
                None => {
                    return Err(ConfigError::key(
                        "server.ops_token_file",
                        "required with server.ops_addr: /drain and profiling need a bearer token",
                    ));
                }
            }
        }
        gatesvr_common::identity::Identity::new(
            s.trust_domain.clone(),
            gatesvr_common::identity::Role::DataPlane,
            self.node_id.clone(),
        )
        .map_err(|e| ConfigError::key("node_id", e.to_string()))?;
        if let Some(dir) = &s.shared_keys_dir {
            crate::quic_keys::SharedKeys::load(dir)
                .map_err(|e| ConfigError::key("server.shared_keys_dir", e))?;
        }
        if s.drain_rate == 0 {
            return Err(ConfigError::key("server.drain_rate", "must be at least 1"));
        }
        if s.heartbeat_timeout <= s.heartbeat_interval {
            return Err(ConfigError::key(
                "server.heartbeat_timeout",
                "must be longer than server.heartbeat_interval",
            ));
        }
        if !(MIN_UDP_PAYLOAD..=MAX_UDP_PAYLOAD).contains(&s.max_udp_payload_size) {
            return Err(ConfigError::key(
                "server.max_udp_payload_size",
                "must be between 1200 and 65527 bytes (QUIC's bounds)",
            ));
        }
        if s.keep_alive_interval >= s.idle_timeout {
            return Err(ConfigError::key(
                "server.keep_alive_interval",
                "must be shorter than server.idle_timeout",
            ));
        }
        if !(1024..=16 << 20).contains(&s.max_frame_size) {
            return Err(ConfigError::key(
                "server.max_frame_size",
                "must be between 1024 and 16777216 bytes",
            ));
        }
        if s.max_queue_bytes < s.max_frame_size {
            return Err(ConfigError::key(
                "server.max_queue_bytes",
                "must be at least server.max_frame_size (one push must fit an empty queue)",
            ));
        }
        for (key, rate, burst) in [
            (
                "overload_protection.start_burst_per_address",
                self.overload_protection.start_rate_per_address,
                self.overload_protection.start_burst_per_address,
            ),
            (
                "overload_protection.start_burst_per_openid",
                self.overload_protection.start_rate_per_openid,
                self.overload_protection.start_burst_per_openid,
            ),
        ] {
            if rate > 0 && burst == 0 {
                return Err(ConfigError::key(
                    key,
                    "must be at least 1 when its rate is set",
                ));
            }
        }
        s.session_config()
            .validate()
            .map_err(|e| ConfigError::key("server", e.to_string()))?;
        let o = &self.overload_protection;
        if o.qps_window_seconds == 0 {
            return Err(ConfigError::key(
                "overload_protection.qps_window_seconds",
                "must be at least 1",
            ));
        }
        for (key, v) in [
            (
                "overload_protection.max_connections",
                o.max_connections as u64,
            ),
            ("overload_protection.max_qps", o.max_qps),
            (
                "overload_protection.max_upstream_concurrent",
                o.max_upstream_concurrent as u64,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::key(key, "must be at least 1"));
            }
        }
        let a = &self.auth;
        match a.mode {
            AuthMode::None if !a.allow_none => {
                return Err(ConfigError::key(
                    "auth.mode",
                    "`none` disables authentication and is only allowed by `gatesvr dev`",
                ));
            }
            AuthMode::None => {}
            AuthMode::Hmac => {
                let file = a.secret_file.as_ref().ok_or_else(|| {
                    ConfigError::key("auth.secret_file", "required when auth.mode is hmac")
                })?;
                require_file("auth.secret_file", file)?;
            }
            AuthMode::Jwt => match a.jwt_algorithm {
                JwtAlgorithm::HS256 => {
                    let file = a.secret_file.as_ref().ok_or_else(|| {
                        ConfigError::key("auth.secret_file", "required for jwt HS256")
                    })?;
                    require_file("auth.secret_file", file)?;
                }
                JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                    let file = a.jwt_public_key_file.as_ref().ok_or_else(|| {
                        ConfigError::key("auth.jwt_public_key_file", "required for jwt RS256/ES256")
                    })?;
                    require_file("auth.jwt_public_key_file", file)?;
                }
            },
        }
        if a.openid_claim.is_empty() {
            return Err(ConfigError::key("auth.openid_claim", "must not be empty"));
        }
        if !(1..=999).contains(&self.zones.count) {
            return Err(ConfigError::key("zones.count", "must be between 1 and 999"));
        }
        for (i, z) in self.zones.upstreams.iter().enumerate() {
            let key = format!("zones.upstreams[{i}]");
            if gatesvr_proto::zone::parse_zone_id(&z.zone, self.zones.count).is_none() {
                return Err(ConfigError::key(
                    format!("{key}.zone"),
                    format!(
                        "unknown zone `{}` (zones are 001..{:03})",
                        z.zone, self.zones.count
                    ),
                ));
            }
            for addr in &z.addrs {
                require_socket_addr(&format!("{key}.addrs"), addr)?;
            }
        }
        // One key per setting: these two live in the seed's overload_protection section.
        let defaults = crate::upstream::UpstreamConfig::default();
        if self.upstream.upstream_timeout != defaults.upstream_timeout {
            return Err(ConfigError::key(
                "upstream.upstream_timeout",
                "set overload_protection.upstream_timeout instead",
            ));
        }
        if self.upstream.max_upstream_concurrent != defaults.max_upstream_concurrent {
            return Err(ConfigError::key(
                "upstream.max_upstream_concurrent",
                "set overload_protection.max_upstream_concurrent instead",
            ));
        }
        self.upstream_config().validate()?;
        self.control_plane.validate()?;
        if self.control_plane.enabled() && !self.zones.upstreams.is_empty() {
            return Err(ConfigError::key(
                "zones.upstreams",
                "static upstreams conflict with control_plane.endpoints: upstreams register with the control plane",
            ));
        }
        self.log.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_certs(extra: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.pem"), "x").unwrap();
        std::fs::write(dir.path().join("secret"), "s3cret").unwrap();
        let yaml = format!(
            "server:\n  cert_file: {d}/c.pem\n  key_file: {d}/c.pem\n  insecure_plaintext_internal: true\nauth:\n  secret_file: {d}/secret\n{extra}",
            d = dir.path().display()
        );
        (dir, yaml)
    }

    fn load(yaml: &str) -> Result<DataPlaneConfig, ConfigError> {
        gatesvr_common::config::load_str(yaml, ENV_ALIASES)
    }

    #[test]
    fn defaults_are_valid() {
        let (_d, yaml) = with_certs("");
        let cfg = load(&yaml).unwrap();
        assert_eq!(cfg.server.quic_addr, "127.0.0.1:8453");
        assert_eq!(cfg.zones.count, 6);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("server:\n  quic_adr: x\n", "quic_adr"),
            (
                "overload_protection:\n  max_qps: 0\n",
                "overload_protection.max_qps",
            ),
            (
                "zones:\n  upstreams: [{zone: '007', addrs: []}]\n",
                "zones.upstreams[0].zone",
            ),
            (
                "zones:\n  upstreams: [{zone: '001', addrs: ['nope']}]\n",
                "zones.upstreams[0].addrs",
            ),
            ("auth:\n  mode: none\n", "auth.mode"),
            (
                "server:\n  max_queue_bytes: 1000\n",
                "server.max_queue_bytes",
            ),
            ("server:\n  write_timeout: 0s\n", "server.write_timeout"),
            ("server:\n  push_coalesce: 2s\n", "server.push_coalesce"),
            (
                "server:\n  push_coalesce_busy: 1.5\n",
                "server.push_coalesce_busy",
            ),
            (
                "overload_protection:\n  start_burst_per_openid: 0\n",
                "overload_protection.start_burst_per_openid",
            ),
            (
                "upstream:\n  upstream_timeout: 5s\n",
                "overload_protection.upstream_timeout",
            ),
        ];
        for (extra, key) in cases {
            // Merge the case into the base YAML by appending a second document
            // section: later keys override earlier ones.
            let (_d, base) = with_certs("");
            let yaml = merge(&base, extra);
            let err = load(&yaml).unwrap_err();
            assert!(err.to_string().contains(key), "{extra:?}: {err}");
        }
    }

    #[test]
    fn bad_duration_names_the_key() {
        let (_d, base) = with_certs("");
        let yaml = base.replace("server:\n", "server:\n  ack_timeout: soon\n");
        let err = load(&yaml).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("server.ack_timeout"), "{err}");
    }

    #[test]
    fn a_bad_shared_keys_dir_names_the_key_and_the_file() {
        let (d, base) = with_certs("");
        let yaml = base.replace(
            "server:\n",
            &format!("server:\n  shared_keys_dir: {}/keys\n", d.path().display()),
        );
        let err = load(&yaml).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("server.shared_keys_dir"), "{err}");
        assert!(err.to_string().contains("stateless-reset-key"), "{err}");
    }

    #[test]
    fn missing_cert_names_the_path() {
        let err = load("server:\n  cert_file: /nope/server.crt\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("server.cert_file"), "{err}");
        assert!(err.to_string().contains("/nope/server.crt"));
    }

    #[test]
    fn internal_hops_are_secure_unless_the_opt_in_says_otherwise() {
        let (d, base) = with_certs("");
        let secure = base.replace("  insecure_plaintext_internal: true\n", "");
        let err = load(&secure).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("server.grpc_tls"), "{err}");
        let certs = gatesvr_common::certs::generate(&d.path().join("certs"), &[]).unwrap();
        let dp = certs.role(gatesvr_common::identity::Role::DataPlane, "dp-1");
        let tls = format!(
            "  grpc_tls: {{cert_file: {}, key_file: {}, ca_file: {}}}\n",
            dp.cert_file.display(),
            dp.key_file.display(),
            certs.ca_cert().display()
        );
        let with_grpc = secure.replace("server:\n", &format!("server:\n{tls}"));
        let err = load(&with_grpc).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("upstream.tls"), "{err}");
        let upstream = format!(
            "upstream:\n  tls: {{ca_file: {}}}\n",
            certs.ca_cert().display()
        );
        let full = format!("node_id: dp-1\n{with_grpc}{upstream}");
        load(&full).unwrap();
        let ops = full.replace("server:\n", "server:\n  ops_addr: 127.0.0.1:0\n");
        let err = load(&ops).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("server.ops_token_file"), "{err}");
    }

    /// Inserts `extra`'s sections into `base` (both are `section:\n  k: v` YAML).
    fn merge(base: &str, extra: &str) -> String {
        let mut out = base.to_string();
        let mut section = String::new();
        for line in extra.lines() {
            if !line.starts_with(' ') {
                section = line.to_string();
                if !out.contains(&format!("{section}\n")) {
                    out.push_str(&format!("{section}\n"));
                }
            } else {
                out = out.replacen(&format!("{section}\n"), &format!("{section}\n{line}\n"), 1);
            }
        }
        out
    }
}
