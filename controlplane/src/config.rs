//! Control-plane configuration: one YAML section, `GATESVR_*` overrides, validated at start.
//!
//! Defaults suit `gatesvr dev` (one node, loopback). A production node sets `node_id`,
//! `data_dir`, addresses, `cluster`, `tls` and `admin.auth`; see `deploy/config/`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use gatesvr_common::config::{ConfigError, Validate};
use gatesvr_common::tls::TlsFiles;
use serde::Deserialize;

use crate::types::NodeId;

/// Everything a control-plane node needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// This node's raft id (default 1). Never reuse an id whose data directory was lost.
    pub node_id: NodeId,
    /// Where the raft log, state machine and snapshots live (default `.gatesvr-dev/controlplane`).
    pub data_dir: PathBuf,
    /// gRPC listen address: raft between control-plane nodes and the data-plane/upstream API
    /// (default `127.0.0.1:8096`; port 0 picks a free port).
    pub grpc_addr: SocketAddr,
    /// Admin HTTP/JSON API listen address (default `127.0.0.1:8095`).
    pub admin_addr: SocketAddr,
    /// `host:port` peers use to reach this node's gRPC port (default: the bound `grpc_addr`).
    pub advertise_grpc_addr: Option<String>,
    /// `host:port` of this node's admin API as told to clients (default: the bound `admin_addr`).
    pub advertise_admin_addr: Option<String>,
    /// Set by `gatesvr dev` only: permits `admin.auth: none`.
    pub dev_mode: bool,
    /// Number of zones; valid zone ids are "001" up to this (default 6).
    pub zone_count: u32,
    pub cluster: ClusterConfig,
    pub tls: TlsConfig,
    pub raft: RaftConfig,
    pub leases: LeaseConfig,
    pub batch: BatchConfig,
    pub admin: AdminConfig,
    /// Watch deltas kept in memory for resuming watchers (default 8192).
    pub watch_history: usize,
    /// sled page-cache bound in bytes while a data directory written before session 14
    /// (`raft.sled`) is moved at start (default 64 MiB; sled's own default is 1 GiB).
    pub sled_cache_bytes: u64,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            node_id: 1,
            data_dir: PathBuf::from(".gatesvr-dev/controlplane"),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 8096)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 8095)),
            advertise_grpc_addr: None,
            advertise_admin_addr: None,
            dev_mode: false,
            zone_count: gatesvr_proto::zone::DEFAULT_ZONE_COUNT,
            cluster: ClusterConfig::default(),
            tls: TlsConfig::default(),
            raft: RaftConfig::default(),
            leases: LeaseConfig::default(),
            batch: BatchConfig::default(),
            admin: AdminConfig::default(),
            watch_history: 8192,
            sled_cache_bytes: 64 << 20,
        }
    }
}

/// How the raft group is formed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Initialize a new cluster on first start (empty data dir). Set on exactly one node;
    /// the others join as `members` listed here or via `gatectl cluster add-learner`.
    /// Restarted nodes ignore it (default false; `gatesvr dev` sets it).
    pub bootstrap: bool,
    /// Initial voters when bootstrapping; empty means this node alone.
    pub members: Vec<MemberConfig>,
}

/// One initial member.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    pub id: NodeId,
    pub grpc_addr: String,
    pub admin_addr: String,
}

/// Transport security of the gRPC port (raft and data-plane APIs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Plaintext gRPC. Logs a warning; never use outside a trusted test network.
    pub insecure: bool,
    /// Server certificate; also this node's client certificate towards peers (needs the
    /// clientAuth usage, as `gatesvr certs` issues).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// CA that signs every peer and client certificate (mTLS).
    pub ca_file: Option<PathBuf>,
    /// Name checked on peers' server certificates (default: the host of the peer address).
    pub server_name: Option<String>,
    /// Certificate names (SAN DNS name or IP, or subject CN) allowed to call the raft
    /// service, on top of the role check (every raft caller must present a
    /// `controlplane` role certificate). Empty (default): the role decides alone.
    pub raft_peer_names: Vec<String>,
    /// Trust domain of the `spiffe://<trust-domain>/<role>/<id>` identities
    /// callers' certificates must name (see `authz`). Default `gatesvr`.
    pub trust_domain: String,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            insecure: false,
            cert_file: None,
            key_file: None,
            ca_file: None,
            server_name: None,
            raft_peer_names: Vec::new(),
            trust_domain: gatesvr_common::identity::DEFAULT_TRUST_DOMAIN.into(),
        }
    }
}

impl TlsConfig {
    /// The certificate files, if TLS is configured.
    pub fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert_file: self.cert_file.clone()?,
            key_file: self.key_file.clone()?,
            ca_file: self.ca_file.clone(),
        })
    }
}

/// Raft timing and log compaction. Defaults follow PITFALLS §3 for Kubernetes; tests and
/// `gatesvr dev` may shorten them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Leader heartbeat (default 250ms).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Election timeout range (default 1.5s..3s). Must exceed the heartbeat.
    #[serde(with = "humantime_serde")]
    pub election_timeout_min: Duration,
    #[serde(with = "humantime_serde")]
    pub election_timeout_max: Duration,
    /// Per-chunk snapshot install timeout (default 4s; openraft's 200ms is too tight).
    #[serde(with = "humantime_serde")]
    pub install_snapshot_timeout: Duration,
    /// Take a snapshot after this many entries since the last one (default 5000).
    pub snapshot_every: u64,
    /// Entries kept after a snapshot for slow followers (default 1000).
    pub keep_after_snapshot: u64,
    /// Most log entries in one AppendEntries call (default 8; openraft's own default is 300).
    /// openraft 0.9 gives each AppendEntries call `heartbeat_interval` to complete (send,
    /// follower append + fdatasync, reply) and retries a call that misses it with the same
    /// entries, so a call must fit in one heartbeat or a lagging follower never catches up.
    /// An entry carries up to `batch.max_cmds` commands plus one caller's call (~150 B per
    /// command as JSON, ~600 B with 256-character ids; a data plane sends up to 1,000 per
    /// call, the API takes 10,000) or a 2,000-owner restore part (~240 KB): 8 entries are
    /// ~1-2 MB per call in practice and stay under the 64 MiB raft message limit at the worst,
    /// while a follower 5,000 entries behind still catches up in ~600 calls.
    pub max_payload_entries: u64,
    /// A write not committed in this long fails as unavailable (default 5s).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// A linearizable read that cannot confirm leadership in this long fails (default 3s).
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Most learners at once (default 1, as etcd's `--max-learners`). The leader replicates
    /// to every learner, reachable or not: adding a node is add-learner then promote, one at a
    /// time, and a learner that never comes up must be removed before the next is added.
    pub max_learners: u32,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(250),
            election_timeout_min: Duration::from_millis(1500),
            election_timeout_max: Duration::from_millis(3000),
            install_snapshot_timeout: Duration::from_secs(4),
            snapshot_every: 5000,
            keep_after_snapshot: 1000,
            max_payload_entries: 8,
            write_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(3),
            max_learners: 1,
        }
    }
}

/// Lease lengths granted to data-plane nodes and upstreams.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// Lease when a registration asks for none (default 10s).
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Requested leases are clamped into [min_ttl, max_ttl] (defaults 1s, 60s).
    #[serde(with = "humantime_serde")]
    pub min_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// How often the leader looks for expired leases (default 500ms).
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Sessions still owned by a dead or departed (`left`) data-plane node are released this
    /// long after it departed, unless their clients came back and another node claimed them
    /// (default 5m: the data plane's `session.session_timeout`, after which the sessions would
    /// have expired anyway).
    #[serde(with = "humantime_serde")]
    pub orphaned_session_timeout: Duration,
    /// The records of dead or departed data-plane nodes are removed this long after they
    /// departed (default 1h; at least `orphaned_session_timeout`). Until then they show in
    /// `gatectl nodes` and in failover decisions.
    #[serde(with = "humantime_serde")]
    pub departed_node_retention: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(10),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(60),
            check_interval: Duration::from_millis(500),
            orphaned_session_timeout: Duration::from_secs(300),
            departed_node_retention: Duration::from_secs(3600),
        }
    }
}

/// Write batching (group commit): concurrent writes (claim storms) share one raft entry, and
/// so one fdatasync on each member.
///
/// The defaults commit one entry at a time: whatever queued while an entry was being committed
/// goes into the next one, so entries grow with the load and an idle write goes at once; under
/// load an entry waits up to `linger` for the writers the last one answered (see
/// `batcher.rs`; `gate-bench claims`, sessions 7 and 17 in docs/benchmarks.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Once a commit slot is free, how long the next entry may wait for as many commands as the
    /// last entry carried (their writers come back under load) when that was more than one
    /// (default 1 ms; 0 never waits). It stops waiting as soon as they are in.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Most commands in one entry (default 1024).
    pub max_cmds: usize,
    /// Batches committed at once (default 1). More lets the leader flush one entry while the
    /// ones before it replicate, but gives more, smaller entries (one fdatasync each on the
    /// leader, in series, and one AppendEntries each); measured slower on a shared 2-core
    /// machine with all three members on one core.
    pub in_flight: usize,
}

impl BatchConfig {
    /// The longest `linger` accepted.
    pub const MAX_LINGER: Duration = Duration::from_millis(100);
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            linger: Duration::from_millis(1),
            max_cmds: 1024,
            in_flight: 1,
        }
    }
}

/// Admin API authentication mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Bearer tokens required (default).
    #[default]
    Tokens,
    /// No authentication: `gatesvr dev` only, with a loud warning.
    None,
}

/// The operator API.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub auth: AuthMode,
    /// Token for writes and reads. Usually from the environment
    /// (`GATESVR_ADMIN__ADMIN_TOKEN`) or `admin_token_file`.
    pub admin_token: Option<String>,
    pub admin_token_file: Option<PathBuf>,
    /// Token for reads only.
    pub read_token: Option<String>,
    pub read_token_file: Option<PathBuf>,
    /// HTTPS for the admin API (and the console). Required outside `gatesvr dev` unless
    /// `insecure_plaintext_http` is set.
    pub tls: AdminTlsConfig,
    /// Serve the admin API over plain HTTP outside `gatesvr dev`: bearer tokens then cross
    /// the network in clear. Logged loudly at start; for a loopback-only admin port or a
    /// TLS-terminating proxy in front of it.
    pub insecure_plaintext_http: bool,
    /// Port of the data-plane nodes' HTTP endpoint (`/stats`), on the host of each node's
    /// registered gRPC address; lets `GET /v1/nodes/{node}/stats`, `gatectl upstreams
    /// health` and the console show upstream health and live rates. Unset: unknown.
    pub dataplane_http_port: Option<u16>,
    /// `host:port` of a node's HTTP endpoint by node id, where it differs from the above.
    pub dataplane_http_addrs: std::collections::BTreeMap<String, String>,
}

/// The admin API's HTTPS settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminTlsConfig {
    /// Server certificate (PEM, chain) and key.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// If set, every client must present a certificate signed by this CA (in addition to
    /// its bearer token); gatectl's `--cert`/`--key`.
    pub client_ca_file: Option<PathBuf>,
}

impl AdminTlsConfig {
    /// Whether HTTPS is configured (certificate and key).
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }
}

/// Never prints token values (configs get logged).
impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |t: &Option<String>| t.as_ref().map(|_| "<redacted>");
        f.debug_struct("AdminConfig")
            .field("auth", &self.auth)
            .field("admin_token", &redact(&self.admin_token))
            .field("admin_token_file", &self.admin_token_file)
            .field("read_token", &redact(&self.read_token))
            .field("read_token_file", &self.read_token_file)
            .field("tls", &self.tls)
            .field("insecure_plaintext_http", &self.insecure_plaintext_http)
            .field("dataplane_http_port", &self.dataplane_http_port)
            .field("dataplane_http_addrs", &self.dataplane_http_addrs)
            .finish()
    }
}

/// The admin tokens, resolved from inline values or files.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AdminTokens {
    pub admin: Option<String>,
    pub read: Option<String>,
}

impl std::fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTokens")
            .field("admin", &self.admin.as_ref().map(|_| "<redacted>"))
            .field("read", &self.read.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn token_from(
    key: &str,
    inline: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    if let Some(t) = inline.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(Some(t.to_string()));
    }
    let Some(path) = file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::key(
            format!("{key}_file"),
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let t = text.trim();
    if t.is_empty() {
        return Err(ConfigError::key(
            format!("{key}_file"),
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Some(t.to_string()))
}

impl AdminConfig {
    /// Resolves the tokens (reading files). Errors name the key.
    pub fn tokens(&self) -> Result<AdminTokens, ConfigError> {
        Ok(AdminTokens {
            admin: token_from(
                "admin.admin_token",
                &self.admin_token,
                &self.admin_token_file,
            )?,
            read: token_from("admin.read_token", &self.read_token, &self.read_token_file)?,
        })
    }
}

fn positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::key(key, "must be greater than zero"));
    }
    Ok(())
}

impl Validate for ControlPlaneConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.zone_count == 0 || self.zone_count > 999 {
            return Err(ConfigError::key("zone_count", "must be 1..=999"));
        }
        let r = &self.raft;
        positive("raft.heartbeat_interval", r.heartbeat_interval)?;
        if r.election_timeout_min <= r.heartbeat_interval {
            return Err(ConfigError::key(
                "raft.election_timeout_min",
                "must be greater than raft.heartbeat_interval",
            ));
        }
        if r.election_timeout_max <= r.election_timeout_min {
            return Err(ConfigError::key(
                "raft.election_timeout_max",
                "must be greater than raft.election_timeout_min",
            ));
        }
        positive("raft.write_timeout", r.write_timeout)?;
        positive("raft.read_timeout", r.read_timeout)?;
        if r.max_learners == 0 {
            return Err(ConfigError::key(
                "raft.max_learners",
                "must be at least 1 (a node joins as a learner)",
            ));
        }
        positive("raft.install_snapshot_timeout", r.install_snapshot_timeout)?;
        if r.snapshot_every == 0 {
            return Err(ConfigError::key("raft.snapshot_every", "must be positive"));
        }
        let l = &self.leases;
        positive("leases.min_ttl", l.min_ttl)?;
        positive("leases.check_interval", l.check_interval)?;
        if l.max_ttl < l.min_ttl || l.default_ttl < l.min_ttl || l.default_ttl > l.max_ttl {
            return Err(ConfigError::key(
                "leases.default_ttl",
                "need min_ttl <= default_ttl <= max_ttl",
            ));
        }
        if l.departed_node_retention < l.orphaned_session_timeout {
            return Err(ConfigError::key(
                "leases.departed_node_retention",
                "must be at least leases.orphaned_session_timeout",
            ));
        }
        if r.max_payload_entries == 0 {
            return Err(ConfigError::key(
                "raft.max_payload_entries",
                "must be positive",
            ));
        }
        if self.batch.max_cmds == 0 {
            return Err(ConfigError::key("batch.max_cmds", "must be positive"));
        }
        if self.batch.in_flight == 0 {
            return Err(ConfigError::key("batch.in_flight", "must be positive"));
        }
        if self.batch.linger > BatchConfig::MAX_LINGER {
            return Err(ConfigError::key(
                "batch.linger",
                "at most 100ms: under load every write may wait this long before its commit",
            ));
        }
        if self.cluster.bootstrap
            && !self.cluster.members.is_empty()
            && !self.cluster.members.iter().any(|m| m.id == self.node_id)
        {
            return Err(ConfigError::key(
                "cluster.members",
                "when bootstrapping, the members must include this node_id",
            ));
        }
        if !self.tls.insecure {
            let files = self.tls.files().ok_or_else(|| {
                ConfigError::key(
                    "tls",
                    "set tls.cert_file, tls.key_file and tls.ca_file (mTLS), or tls.insecure: true",
                )
            })?;
            if files.ca_file.is_none() {
                return Err(ConfigError::key(
                    "tls.ca_file",
                    "required: peers and clients are verified against it (mTLS)",
                ));
            }
            files.validate("tls")?;
            self.check_own_identity(&files)?;
        } else if !self.tls.raft_peer_names.is_empty() {
            return Err(ConfigError::key(
                "tls.raft_peer_names",
                "needs mTLS: plaintext peers present no certificate (tls.insecure is set)",
            ));
        }
        let t = &self.admin.tls;
        if t.cert_file.is_some() != t.key_file.is_some() {
            return Err(ConfigError::key(
                "admin.tls",
                "set both cert_file and key_file (or neither)",
            ));
        }
        if t.client_ca_file.is_some() && !t.enabled() {
            return Err(ConfigError::key(
                "admin.tls.client_ca_file",
                "client certificates need HTTPS: set admin.tls.cert_file and key_file",
            ));
        }
        if !t.enabled() && !self.dev_mode && !self.admin.insecure_plaintext_http {
            return Err(ConfigError::key(
                "admin.tls",
                "the admin API needs HTTPS: set admin.tls.cert_file and key_file (or, for a loopback-only port or a TLS proxy, admin.insecure_plaintext_http: true)",
            ));
        }
        for (key, f) in [
            ("admin.tls.cert_file", &t.cert_file),
            ("admin.tls.key_file", &t.key_file),
            ("admin.tls.client_ca_file", &t.client_ca_file),
        ] {
            if let Some(f) = f
                && !f.is_file()
            {
                return Err(ConfigError::key(
                    key,
                    format!("{} is not a file", f.display()),
                ));
            }
        }
        match self.admin.auth {
            AuthMode::None if !self.dev_mode => {
                return Err(ConfigError::key(
                    "admin.auth",
                    "`none` is only allowed in `gatesvr dev`; configure admin tokens",
                ));
            }
            AuthMode::None => {}
            AuthMode::Tokens => {
                if self.admin.tokens()?.admin.is_none() {
                    return Err(ConfigError::key(
                        "admin.admin_token",
                        "required with admin.auth: tokens (or set admin_token_file)",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl ControlPlaneConfig {
    /// Refuses a certificate its peers would refuse: `tls.cert_file` must name
    /// `controlplane/<node_id>` in `tls.trust_domain`.
    fn check_own_identity(&self, files: &TlsFiles) -> Result<(), ConfigError> {
        use gatesvr_common::identity::{Identity, Role};
        let expected = Identity::new(
            self.tls.trust_domain.clone(),
            Role::ControlPlane,
            self.node_id.to_string(),
        )
        .map_err(|e| ConfigError::key("tls.trust_domain", e.to_string()))?;
        let bad = |reason: String| ConfigError::key("tls.cert_file", reason);
        let certs =
            gatesvr_common::tls::load_certs(&files.cert_file).map_err(|e| bad(e.to_string()))?;
        let found = certs
            .first()
            .map(|c| Identity::from_cert(c.as_ref()))
            .ok_or_else(|| bad("no certificate".into()))?
            .map_err(|e| bad(e.to_string()))?;
        if found.role != expected.role
            || found.trust_domain != expected.trust_domain
            || !found.acts_for(&expected.id)
        {
            return Err(bad(format!(
                "names {found}, but this node is {expected}: issue it with `gatesvr certs --role controlplane:{}`",
                self.node_id
            )));
        }
        Ok(())
    }

    /// Fast timings for tests and `gatesvr dev` on one machine.
    pub fn fast_timings(mut self) -> Self {
        self.raft.heartbeat_interval = Duration::from_millis(100);
        self.raft.election_timeout_min = Duration::from_millis(400);
        self.raft.election_timeout_max = Duration::from_millis(800);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_append_entries_call_fits_the_raft_message_limit() {
        // openraft's default of 300 entries per call did not: a lagging follower would get
        // calls the transport refuses, again and again.
        let cfg = ControlPlaneConfig::default();
        let per_cmd = 600; // JSON of a claim with 256-character ids
        let worst_entry = (cfg.batch.max_cmds + crate::grpc::MAX_CLAIMS_PER_CALL) * per_cmd;
        let worst_call = cfg.raft.max_payload_entries as usize * worst_entry;
        assert!(
            worst_call < gatesvr_proto::limits::RAFT_MAX_MESSAGE_BYTES,
            "{worst_call} B per AppendEntries call at the worst"
        );
    }

    #[test]
    fn defaults_need_tls_and_tokens() {
        let cfg = ControlPlaneConfig::default();
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.key.as_deref(), Some("tls"));
        let mut cfg = ControlPlaneConfig::default();
        cfg.tls.insecure = true;
        let err = cfg.validate().unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("admin.tls"),
            "plain HTTP needs the opt-in"
        );
        cfg.admin.insecure_plaintext_http = true;
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.key.as_deref(), Some("admin.admin_token"));
        cfg.admin.auth = AuthMode::None;
        assert_eq!(
            cfg.validate().unwrap_err().key.as_deref(),
            Some("admin.auth")
        );
        cfg.dev_mode = true;
        cfg.validate().unwrap();
        cfg.batch.linger = Duration::from_secs(1);
        assert_eq!(
            cfg.validate().unwrap_err().key.as_deref(),
            Some("batch.linger")
        );
        cfg.batch.linger = BatchConfig::MAX_LINGER;
        cfg.validate().unwrap();
    }

    #[test]
    fn yaml_with_durations_and_unknown_keys() {
        let yaml = "node_id: 2\ntls: {insecure: true}\nadmin: {admin_token: s3cret, insecure_plaintext_http: true}\nraft: {heartbeat_interval: 50ms, election_timeout_min: 300ms, election_timeout_max: 600ms}\n";
        let cfg: ControlPlaneConfig = gatesvr_common::config::load_str(yaml, &[]).unwrap();
        assert_eq!(cfg.node_id, 2);
        assert_eq!(cfg.raft.heartbeat_interval, Duration::from_millis(50));
        let bad = "tls: {insecure: true}\nadmin: {admin_token: x}\nnode_idd: 3\n";
        let err = gatesvr_common::config::load_str::<ControlPlaneConfig>(bad, &[]).unwrap_err();
        assert!(err.to_string().contains("node_idd"), "{err}");
    }

    #[test]
    fn no_learner_at_all_is_refused_by_name() {
        let yaml = "tls: {insecure: true}\nadmin: {admin_token: s3cret, insecure_plaintext_http: true}\nraft: {max_learners: 0}\n";
        let err = gatesvr_common::config::load_str::<ControlPlaneConfig>(yaml, &[]).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("raft.max_learners"), "{err}");
        assert_eq!(ControlPlaneConfig::default().raft.max_learners, 1);
    }
}
