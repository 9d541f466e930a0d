//! The data plane's side of the control plane: membership (register +
//! heartbeat lease), the watched view of upstreams, nodes and session owners,
//! ownership claims, and the on-disk copy of the view that keeps a node
//! serving through a control-plane outage (static stability).
//!
//! ```text
//!  control plane ──Watch (scoped: snapshot, then deltas by version)──> View ──> UpstreamRouter
//!        ▲                                                              └──> state_file (atomic rewrite)
//!        ├── LookupOwners (a foreign session's owner, on demand) ──> OwnerCache (bounded, by epoch)
//!        ├── RegisterNode / HeartbeatNode (lease; drain_requested)
//!        ├── ClaimSessions (on Start: new epoch, previous owner)
//!        ├── ReleaseSessions (batched: sessions that ended here, at their epoch)
//!        └── LeaveNode (end of a drain: shown as left at once, not dead after the lease)
//! ```
//!
//! The watch is scoped to this node: every node and upstream, but only the
//! owner records that concern it (its own sessions; a change of a session it
//! owned just before). The owner of any other session is looked up when a
//! push needs it and kept in a bounded cache ([`OwnerCache`]) that newer
//! epochs overwrite and a refused forward evicts. After a snapshot, a local
//! session missing from it is looked up: owned elsewhere, it is fenced.
//!
//! Without `control_plane.endpoints` the node is standalone: static zones,
//! local ownership only.

// The cluster layer: this file is the control-plane client; beside it, the
// node's shell around the session table, peers, replicas and drain.
pub(crate) mod drain;
pub mod node;
pub(crate) mod peer;
pub(crate) mod registry;
pub mod replica;

// What tests/tests/big_state.rs checks a chunked handover with.
pub use peer::join_handover;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gatesvr_common::tls::TlsFiles;
use gatesvr_proto::control::{
    self, Claim, ClaimResult, ClaimSessionsRequest, DataPlaneNode, HeartbeatNodeRequest,
    LeaveNodeRequest, LookupOwnersRequest, NodeState, RegisterNodeRequest, SessionOwner,
    WatchEvent, WatchRequest, control_plane_client::ControlPlaneClient,
    watch_event::Event as WatchBody,
};
use parking_lot::{Mutex, RwLock};
use prost::Message;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::upstream::UpstreamRouter;

/// `control_plane:` how this node reaches the control plane.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneClientConfig {
    /// Control-plane gRPC endpoints (`host:port`). Empty: a standalone node
    /// (static zones, no cluster-wide ownership). Default empty.
    pub endpoints: Vec<String>,
    /// Plaintext gRPC (logs a warning). Default false: mTLS with `tls`.
    pub insecure: bool,
    /// Client certificate, key and CA for mTLS to the control plane.
    pub tls: Option<TlsFiles>,
    /// Name checked on the control plane's certificate. Default `localhost`.
    pub server_name: String,
    /// Requested membership lease; the control plane may clamp it. Default 3s.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Deadline of one control-plane call. Default 2s.
    #[serde(with = "humantime_serde")]
    pub rpc_timeout: Duration,
    /// How long a Start waits for its claim while the control plane cannot
    /// answer it (a leader election; this node's lease lapsed meanwhile),
    /// trying again with back-off (`core::claim`); then the session runs
    /// provisionally. Default 7s: longer than an election with the shipped
    /// raft timings (~5 s measured), shorter than a client's connect timeout
    /// (the SDK's 10 s covers the handshake and the Start).
    #[serde(with = "humantime_serde")]
    pub claim_patience: Duration,
    /// Where the last view learned from the control plane is kept, so a node
    /// restarted during an outage still routes. Default none.
    pub state_file: Option<PathBuf>,
    /// A state file older than this is not used. Default 24h.
    #[serde(with = "humantime_serde")]
    pub max_state_age: Duration,
    /// QUIC address clients are sent to (GoAway targets). Default: the bound address.
    pub advertise_quic_addr: Option<String>,
    /// gRPC address other nodes and upstreams reach this node on. Default: the bound address.
    pub advertise_grpc_addr: Option<String>,
    /// `ClaimSessions` calls in flight at once. Claims arriving while every
    /// call is busy wait and go together in the next one (a burst shares a
    /// call). Default 64: the control plane's batcher merges concurrent calls
    /// into one raft entry anyway, so a claim should not wait here for a slot
    /// (4 and 16 were measured slower in `gate-bench claims`, docs/benchmarks.md).
    pub claim_calls_in_flight: usize,
}

impl Default for ControlPlaneClientConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            insecure: false,
            tls: None,
            server_name: "localhost".into(),
            lease_ttl: Duration::from_secs(3),
            rpc_timeout: Duration::from_secs(2),
            claim_patience: Duration::from_secs(7),
            state_file: None,
            max_state_age: Duration::from_secs(24 * 3600),
            advertise_quic_addr: None,
            advertise_grpc_addr: None,
            claim_calls_in_flight: 64,
        }
    }
}

impl ControlPlaneClientConfig {
    pub fn enabled(&self) -> bool {
        !self.endpoints.is_empty()
    }

    pub fn validate(&self) -> Result<(), gatesvr_common::config::ConfigError> {
        use gatesvr_common::config::ConfigError;
        for e in &self.endpoints {
            if e.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(ConfigError::key(
                    "control_plane.endpoints",
                    format!("`{e}` is not host:port"),
                ));
            }
        }
        if self.enabled() && !self.insecure {
            let tls = self.tls.as_ref().ok_or_else(|| {
                ConfigError::key(
                    "control_plane.tls",
                    "required (or set control_plane.insecure: true, plaintext)",
                )
            })?;
            tls.validate("control_plane.tls")?;
            if tls.ca_file.is_none() {
                return Err(ConfigError::key(
                    "control_plane.tls.ca_file",
                    "required for mTLS",
                ));
            }
        }
        if self.lease_ttl < Duration::from_millis(500) {
            return Err(ConfigError::key(
                "control_plane.lease_ttl",
                "must be at least 500ms",
            ));
        }
        if self.claim_calls_in_flight == 0 {
            return Err(ConfigError::key(
                "control_plane.claim_calls_in_flight",
                "must be positive",
            ));
        }
        if self.rpc_timeout.is_zero() {
            return Err(ConfigError::key(
                "control_plane.rpc_timeout",
                "must be positive",
            ));
        }
        if self.claim_patience.is_zero() {
            return Err(ConfigError::key(
                "control_plane.claim_patience",
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// What this node knows of the cluster, at `version`.
#[derive(Debug, Default, Clone)]
pub struct View {
    pub version: u64,
    pub upstreams: HashMap<String, control::Upstream>,
    pub nodes: HashMap<String, DataPlaneNode>,
    /// The owner records the watch carries: with a scoped watch (`scoped`),
    /// this node's own sessions (a record that moves elsewhere leaves it for
    /// the [`OwnerCache`]); otherwise every session's.
    pub owners: HashMap<String, SessionOwner>,
    /// The last snapshot was scoped: a session missing from `owners` is not
    /// this node's (look it up), rather than unknown.
    pub scoped: bool,
    /// The highest owner epoch the watch delivered (a claim's own answer
    /// does not count). Epochs are assigned in commit order, so a view that
    /// saw epoch `e` holds every node change committed before the claim that
    /// made `e` ([`Cluster::view_reached`]).
    pub owner_epoch_seen: u64,
}

impl View {
    fn apply(&mut self, event: WatchEvent) {
        self.version = event.version;
        match event.event {
            Some(WatchBody::Snapshot(s)) => {
                self.upstreams = s
                    .upstreams
                    .into_iter()
                    .map(|u| (u.instance_id.clone(), u))
                    .collect();
                self.nodes = s
                    .nodes
                    .into_iter()
                    .map(|n| (n.node_id.clone(), n))
                    .collect();
                self.owners = s
                    .owners
                    .into_iter()
                    .map(|o| (o.openid.clone(), o))
                    .collect();
                self.scoped = s.scoped;
                let newest = self.owners.values().map(|o| o.epoch).max();
                self.owner_epoch_seen = self.owner_epoch_seen.max(newest.unwrap_or(0));
            }
            Some(WatchBody::UpstreamPut(u)) => {
                self.upstreams.insert(u.instance_id.clone(), u);
            }
            Some(WatchBody::UpstreamRemoved(id)) => {
                self.upstreams.remove(&id);
            }
            Some(WatchBody::NodePut(n)) => {
                self.nodes.insert(n.node_id.clone(), n);
            }
            Some(WatchBody::NodeRemoved(id)) => {
                self.nodes.remove(&id);
            }
            Some(WatchBody::OwnerPut(o)) => {
                self.owner_epoch_seen = self.owner_epoch_seen.max(o.epoch);
                self.owners.insert(o.openid.clone(), o);
            }
            Some(WatchBody::OwnerRemoved(openid)) => {
                self.owners.remove(&openid);
            }
            // Chunks are merged by the watch loop before they reach the view.
            Some(WatchBody::Failover(_) | WatchBody::SnapshotMore(_)) | None => {}
        }
    }

    /// The view as one snapshot event (for the state file).
    fn to_event(&self) -> WatchEvent {
        WatchEvent {
            version: self.version,
            event: Some(WatchBody::Snapshot(control::Snapshot {
                upstreams: self.upstreams.values().cloned().collect(),
                nodes: self.nodes.values().cloned().collect(),
                owners: self.owners.values().cloned().collect(),
                failovers: Vec::new(),
                more: false,
                scoped: self.scoped,
            })),
        }
    }

    /// A node that can take sessions: known, neither dead nor left.
    pub fn live_node(&self, node_id: &str) -> Option<&DataPlaneNode> {
        self.nodes
            .get(node_id)
            .filter(|n| n.state != NodeState::Dead as i32 && n.state != NodeState::Left as i32)
    }
}

/// Most foreign owner records the [`OwnerCache`] keeps (about 100 bytes
/// each): the sessions this node forwards pushes to, not every session.
pub const OWNER_CACHE_CAPACITY: usize = 65_536;

/// Most openids in one `LookupOwners` call (the control plane accepts 1,000).
pub const MAX_LOOKUPS_PER_CALL: usize = 1_000;

/// The owners of other nodes' sessions, as last learnt (a lookup, or a watch
/// delta of a session that moved away from here): bounded, oldest insertion
/// evicted first. A record is replaced only by a newer epoch, and evicted
/// when a forward to its owner finds the session gone (the owner moved on).
#[derive(Debug)]
pub struct OwnerCache {
    map: HashMap<String, SessionOwner>,
    /// Insertion order (may hold openids evicted since: skipped).
    order: VecDeque<String>,
    capacity: usize,
}

impl OwnerCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, openid: &str) -> Option<&SessionOwner> {
        self.map.get(openid)
    }

    /// Records `owner` unless an equal or newer epoch is known.
    pub fn put(&mut self, owner: SessionOwner) {
        if let Some(known) = self.map.get_mut(&owner.openid) {
            if known.epoch < owner.epoch {
                *known = owner;
            }
            return;
        }
        while self.map.len() >= self.capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&oldest);
        }
        self.order.push_back(owner.openid.clone());
        self.map.insert(owner.openid.clone(), owner);
        // Evictions leave stale names behind: compact now and then.
        if self.order.len() > 2 * self.capacity {
            let map = &self.map;
            self.order.retain(|o| map.contains_key(o));
        }
    }

    /// Forgets `openid`'s record if it is not newer than `epoch`.
    pub fn evict(&mut self, openid: &str, epoch: u64) -> bool {
        if self.map.get(openid).is_some_and(|o| o.epoch <= epoch) {
            self.map.remove(openid);
            return true;
        }
        false
    }

    /// The record of session `session_id`, if cached (a scan).
    pub fn by_session(&self, session_id: &str) -> Option<&SessionOwner> {
        self.map.values().find(|o| names_session(o, session_id))
    }
}

/// Callback counting one owner lookup's outcome (`found`, `absent`, `failed`,
/// `evicted`): `gatesvr_owner_lookups_total{result}`.
type LookupCounted = Box<dyn Fn(&'static str) + Send + Sync>;

/// Callback listing the openids of the sessions served here.
type LocalOpenids = Box<dyn Fn() -> Vec<String> + Send + Sync>;

/// Whether owner record `o` is session `session_id`'s: its claimed id, or
/// the fresh session its claiming Start made if the resume failed
/// (`SessionOwner.fresh_session_id`).
pub fn names_session(o: &SessionOwner, session_id: &str) -> bool {
    o.session_id == session_id
        || (!o.fresh_session_id.is_empty() && o.fresh_session_id == session_id)
}

/// The outcome of a successful claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub epoch: u64,
    /// The owner before this claim, if another node.
    pub previous_owner: Option<String>,
    /// The fresh session id the record holds beside the claimed one (the
    /// one asked for, or, for a retried claim, the one recorded first):
    /// the id a Start gives the fresh session it makes if its resume fails.
    /// Empty: none recorded (a control plane older than the field).
    pub fresh_session_id: String,
}

/// Why a claim did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClaimError {
    /// No answer to the claim: no member reached, no leader (an election),
    /// the leader gone, a member shutting down, a call broken or timed out.
    /// Retrying can help (the next leader commits it); in the end the
    /// session runs provisionally.
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    /// The control plane counts this node as not active (FAILED_PRECONDITION:
    /// its lease expired, declared dead, cordoned, left). After a leader
    /// election longer than the lease, every claim gets this until the
    /// node's next heartbeat commits: retrying after a renewal helps then
    /// ([`ClaimError::failure`]); otherwise it is a refusal.
    #[error("claim refused: {0}")]
    NotActive(String),
    /// The control plane refused the claim; retrying gets the same answer.
    #[error("claim refused: {0}")]
    Refused(String),
}

impl ClaimError {
    /// The error of a failed `ClaimSessions` call (the one place a status
    /// becomes a `ClaimError`). UNKNOWN is a call broken mid-way (the member
    /// died: tonic's h2 errors) and INTERNAL a member whose raft stopped
    /// (shutting down): another member may answer.
    pub fn of_status(status: &tonic::Status) -> Self {
        let message = status.message().to_string();
        match status.code() {
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::Internal => ClaimError::Unreachable(message),
            tonic::Code::FailedPrecondition => ClaimError::NotActive(message),
            _ => ClaimError::Refused(message),
        }
    }

    /// Whether trying again can help (`core::claim`). `lease_holds`:
    /// this node's own lease surely holds now ([`Cluster::lease_check`]).
    /// A "not active" answer while it does not is this node's lapsed lease
    /// (no leader renewed it): a renewal cures it. While it holds, the
    /// control plane means it (cordoned, left): a refusal.
    pub fn failure(&self, lease_holds: bool) -> crate::core::ClaimFailure {
        use crate::core::ClaimFailure;
        match self {
            ClaimError::Unreachable(_) => ClaimFailure::Unavailable,
            ClaimError::NotActive(_) if !lease_holds => ClaimFailure::LeaseLapsed,
            ClaimError::NotActive(_) | ClaimError::Refused(_) => ClaimFailure::Refused,
        }
    }
}

/// A Start's claim after [`Cluster::claim_patiently`]: the last answer, how
/// it counts for retrying (an error's), and how many times it was tried again.
#[derive(Debug)]
pub struct PatientClaim {
    pub result: Result<Claimed, ClaimError>,
    pub failure: Option<crate::core::ClaimFailure>,
    pub retries: u32,
}

/// Callback for one owner record that changed (a watch delta or a claim).
type OwnerMoved = Box<dyn Fn(&SessionOwner) + Send + Sync>;

/// Callback for a whole view to compare with (a snapshot, a node change).
type ViewChanged = Box<dyn Fn(&View) + Send + Sync>;

/// Membership, the watched view and claims.
pub struct Cluster {
    cfg: ControlPlaneClientConfig,
    node_id: String,
    quic_addr: String,
    grpc_addr: String,
    channels: Vec<Channel>,
    /// Index of the endpoint currently used.
    current: AtomicUsize,
    view: RwLock<View>,
    connected: AtomicBool,
    /// This process has been registered at least once: its claims are
    /// accepted (it stays so while the control plane is unreachable).
    registered_once: AtomicBool,
    /// The view is whole: a complete snapshot was applied (from the control
    /// plane, every chunk of it, or from the state file). `/ready` waits for it.
    complete: AtomicBool,
    /// The view changed since the state file was last written.
    dirty: AtomicBool,
    /// Wakes the state-file writer.
    persist_wake: Notify,
    /// The view came from the state file and the control plane was not reached since.
    stale: AtomicBool,
    draining: AtomicBool,
    /// Said goodbye (`LeaveNode`): no more heartbeats or registrations.
    left: AtomicBool,
    /// Wakes the node when an operator asked it to drain.
    pub drain_requested: Notify,
    router: Option<Arc<UpstreamRouter>>,
    /// Called with every owner record put by a watch delta (the session
    /// table compares it with its slot: level-triggered fencing).
    on_owner_moved: Mutex<Option<OwnerMoved>>,
    /// Called with the whole view after a snapshot or a node change.
    on_view: Mutex<Option<ViewChanged>>,
    /// Lists the sessions served here (checked after a scoped snapshot).
    local_openids: Mutex<Option<LocalOpenids>>,
    /// Counts owner lookups.
    on_lookup: Mutex<Option<LookupCounted>>,
    /// Owners of other nodes' sessions (a scoped watch does not carry them).
    cache: Mutex<OwnerCache>,
    sessions: AtomicUsize,
    /// Owner records of sessions that ended here, to release (batched).
    releases: Mutex<Vec<SessionOwner>>,
    release_wake: Notify,
    /// Claims waiting for the next `ClaimSessions` call (a burst shares one).
    claims: Mutex<Vec<PendingClaim>>,
    claim_wake: Notify,
    /// `ClaimSessions` calls made, and claims they carried.
    claim_calls: AtomicU64,
    claims_sent: AtomicU64,
    /// This node's lease as far as it can tell (renewals by send time): a
    /// durable push is acknowledged only while it surely holds (`core::lease`).
    lease: Mutex<crate::core::Lease>,
    /// Woken on every lease renewal and view change (a durable push waiting
    /// for the renewal in flight, `lease_wait`).
    lease_changed: Notify,
    /// Woken when the watch delivered owner records (a newer epoch maybe):
    /// recoveries waiting for the view to reach their claim
    /// ([`Cluster::view_reaches`]).
    view_advanced: Notify,
    /// Renewals of this node's lease answered so far (heartbeats and
    /// registrations): a claim refused for a lapsed lease waits for the next.
    renewals: AtomicU64,
    /// Wakes the membership loop for a heartbeat now, out of its back-off: a
    /// claim was refused because this node's lease lapsed (a leader election
    /// longer than the lease), and every Start waits for that renewal.
    renew_wake: Notify,
}

/// One Start's claim, waiting to be sent.
struct PendingClaim {
    claim: Claim,
    reply: tokio::sync::oneshot::Sender<Result<ClaimResult, ClaimError>>,
}

/// Most claims in one `ClaimSessions` call.
pub const MAX_CLAIMS_PER_CALL: usize = 1000;

/// Most owner records released in one `ReleaseSessions` call (the control
/// plane accepts up to 10,000).
pub const MAX_RELEASES_PER_CALL: usize = 1000;

/// Releases waiting beyond this (a long control-plane outage) are dropped
/// with a warning; the control plane then frees those records when this
/// node departs (see docs/operations.md, "Session ownership lifecycle").
pub const MAX_PENDING_RELEASES: usize = 100_000;

/// How long the first release of a burst waits for company.
const RELEASE_LINGER: Duration = Duration::from_millis(20);

impl Cluster {
    pub fn new(
        cfg: ControlPlaneClientConfig,
        node_id: String,
        quic_addr: String,
        grpc_addr: String,
        router: Option<Arc<UpstreamRouter>>,
    ) -> Result<Self, String> {
        let tls = if cfg.insecure {
            tracing::warn!("control_plane.insecure: talking to the control plane in PLAINTEXT");
            None
        } else {
            let files = cfg.tls.as_ref().ok_or("control_plane.tls is required")?;
            Some(
                gatesvr_common::tls::tonic_client_tls(files, &cfg.server_name)
                    .map_err(|e| e.to_string())?,
            )
        };
        let mut channels = Vec::new();
        for endpoint in &cfg.endpoints {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut ep = Endpoint::from_shared(format!("{scheme}://{endpoint}"))
                .map_err(|e| format!("control_plane.endpoints `{endpoint}`: {e}"))?
                .connect_timeout(cfg.rpc_timeout)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_while_idle(true);
            if let Some(tls) = &tls {
                ep = ep.tls_config(tls.clone()).map_err(|e| e.to_string())?;
            }
            channels.push(ep.connect_lazy());
        }
        let cluster = Self {
            cfg,
            node_id,
            quic_addr,
            grpc_addr,
            channels,
            current: AtomicUsize::new(0),
            view: RwLock::new(View::default()),
            connected: AtomicBool::new(false),
            registered_once: AtomicBool::new(false),
            complete: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            persist_wake: Notify::new(),
            stale: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            left: AtomicBool::new(false),
            drain_requested: Notify::new(),
            router,
            on_owner_moved: Mutex::new(None),
            on_view: Mutex::new(None),
            local_openids: Mutex::new(None),
            on_lookup: Mutex::new(None),
            cache: Mutex::new(OwnerCache::new(OWNER_CACHE_CAPACITY)),
            sessions: AtomicUsize::new(0),
            releases: Mutex::new(Vec::new()),
            release_wake: Notify::new(),
            claims: Mutex::new(Vec::new()),
            claim_wake: Notify::new(),
            claim_calls: AtomicU64::new(0),
            claims_sent: AtomicU64::new(0),
            lease: Mutex::new(crate::core::Lease::default()),
            lease_changed: Notify::new(),
            view_advanced: Notify::new(),
            renewals: AtomicU64::new(0),
            renew_wake: Notify::new(),
        };
        cluster.load_state_file();
        Ok(cluster)
    }

    /// Whether a durable push may be acknowledged at `now`: only while this
    /// node's control-plane lease surely still holds (`core::lease`).
    pub fn lease_check(&self, now: Instant) -> Result<(), crate::core::LeaseError> {
        self.lease.lock().check(now)
    }

    /// [`lease_check`](Self::lease_check), waiting up to `patience` for a
    /// renewal (or the view catching up) when the lease does not hold now.
    /// Heartbeats go out every third of the lease, so on a busy node or
    /// control plane the renewal in flight is usually what is missing; only
    /// if none lands in time is the push refused.
    pub async fn lease_wait(&self, patience: Duration) -> Result<(), crate::core::LeaseError> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let changed = self.lease_changed.notified();
            match self.lease_check(Instant::now()) {
                Err(_) if tokio::time::Instant::now() < deadline => {
                    let _ = tokio::time::timeout_at(deadline, changed).await;
                }
                result => return result,
            }
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Deadline of one control-plane call.
    pub fn rpc_timeout(&self) -> Duration {
        self.cfg.rpc_timeout
    }

    pub fn view(&self) -> parking_lot::RwLockReadGuard<'_, View> {
        self.view.read()
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The view is complete: a whole snapshot was applied (from the control
    /// plane or the state file). Until then routing and owners are unknown.
    pub fn is_view_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Ready to take sessions: the view is complete, and the control plane
    /// knows this node (registered since start), or it serves from its state
    /// file while the control plane is unreachable. A node only complete but
    /// not yet registered would see its first claims refused ("unknown node").
    pub fn can_serve(&self) -> bool {
        self.is_view_complete() && (self.registered_once.load(Ordering::Relaxed) || self.is_stale())
    }

    /// Serving from a state file, not yet confirmed by the control plane.
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn set_session_count(&self, n: usize) {
        self.sessions.store(n, Ordering::Relaxed);
    }

    /// Registers the callback run with every owner record a watch delta puts.
    pub fn on_owner_moved(&self, f: impl Fn(&SessionOwner) + Send + Sync + 'static) {
        *self.on_owner_moved.lock() = Some(Box::new(f));
    }

    /// Registers the callback run with the whole view after a snapshot
    /// (including a resync and the state file) or a node change, and runs it
    /// once now.
    pub fn on_view(&self, f: impl Fn(&View) + Send + Sync + 'static) {
        f(&self.view.read());
        *self.on_view.lock() = Some(Box::new(f));
    }

    /// Registers the list of sessions served here: after a scoped snapshot
    /// those missing from it are looked up, and fenced if owned elsewhere.
    pub fn on_local_openids(&self, f: impl Fn() -> Vec<String> + Send + Sync + 'static) {
        *self.local_openids.lock() = Some(Box::new(f));
    }

    /// Registers the counter of owner lookups by outcome.
    pub fn on_lookup(&self, f: impl Fn(&'static str) + Send + Sync + 'static) {
        *self.on_lookup.lock() = Some(Box::new(f));
    }

    fn count_lookup(&self, result: &'static str) {
        if let Some(f) = self.on_lookup.lock().as_ref() {
            f(result);
        }
    }

    /// Whether the watched view has caught up with the claim that made
    /// `epoch`: it saw an owner record at `epoch` or later, so every node
    /// that joined before the claim is in it. A crash recovery asks the
    /// nodes of such a view (simulation seed 3340 of session 10: a claimant
    /// whose watch lagged by a second asked the nodes it knew, missed the
    /// new node holding the only copy, and answered RECOVERED).
    pub fn view_reached(&self, epoch: u64) -> bool {
        self.view.read().owner_epoch_seen >= epoch
    }

    /// Waits until the view has reached `epoch` ([`Cluster::view_reached`]),
    /// but not past `until`: whether it did. Woken by the watch, not polled,
    /// so a recovery ends as soon as the claim's own record arrives.
    pub async fn view_reaches(&self, epoch: u64, until: tokio::time::Instant) -> bool {
        loop {
            let advanced = self.view_advanced.notified();
            tokio::pin!(advanced);
            // Registered before the check: a delivery in between still wakes.
            advanced.as_mut().enable();
            if self.view_reached(epoch) {
                return true;
            }
            if tokio::time::timeout_at(until, advanced).await.is_err() {
                return self.view_reached(epoch);
            }
        }
    }

    /// The owner known here for `openid` without asking: the view (this
    /// node's own sessions), else the cache of other nodes' sessions.
    pub fn known_owner(&self, openid: &str) -> Option<(String, u64)> {
        if let Some(o) = self.view.read().owners.get(openid) {
            return Some((o.owner_node.clone(), o.epoch));
        }
        self.cache
            .lock()
            .get(openid)
            .map(|o| (o.owner_node.clone(), o.epoch))
    }

    /// The owner of `openid`: known here, else looked up at the control
    /// plane (and cached). `None`: no owner, or the lookup failed.
    pub async fn lookup_owner(&self, openid: &str) -> Option<(String, u64)> {
        if let Some(known) = self.known_owner(openid) {
            return Some(known);
        }
        let found = self.lookup(vec![openid.to_string()], Vec::new()).await?;
        found
            .into_iter()
            .find(|o| o.openid == openid)
            .map(|o| (o.owner_node, o.epoch))
    }

    /// The owner of session `session_id` (a push by session id): known here,
    /// else looked up. `None`: no owner, or the lookup failed.
    pub async fn lookup_session_owner(&self, session_id: &str) -> Option<String> {
        let known = self
            .view
            .read()
            .owners
            .values()
            .find(|o| names_session(o, session_id))
            .map(|o| o.owner_node.clone());
        if let Some(known) = known {
            return Some(known);
        }
        if let Some(o) = self.cache.lock().by_session(session_id) {
            return Some(o.owner_node.clone());
        }
        let found = self
            .lookup(Vec::new(), vec![session_id.to_string()])
            .await?;
        found
            .into_iter()
            .find(|o| names_session(o, session_id))
            .map(|o| o.owner_node)
    }

    /// A forward to the owner cached for `openid` at `epoch` found no
    /// session there: the record is stale; the next push looks it up again.
    pub fn forget_owner(&self, openid: &str, epoch: u64) {
        if self.cache.lock().evict(openid, epoch) {
            self.count_lookup("evicted");
        }
    }

    /// Foreign owner records cached here.
    pub fn cached_owners(&self) -> usize {
        self.cache.lock().len()
    }

    /// One `LookupOwners` call; the records found are cached (foreign ones)
    /// and returned. `None` if the control plane did not answer.
    async fn lookup(
        &self,
        openids: Vec<String>,
        session_ids: Vec<String>,
    ) -> Option<Vec<SessionOwner>> {
        if self.channels.is_empty() {
            return None;
        }
        let asked = openids.len() + session_ids.len();
        let req = self.request(LookupOwnersRequest {
            node_id: self.node_id.clone(),
            openids,
            session_ids,
        });
        let mut client = self.client();
        let owners =
            match tokio::time::timeout(self.cfg.rpc_timeout, client.lookup_owners(req)).await {
                Ok(Ok(r)) => r.into_inner().owners,
                Ok(Err(status)) => {
                    tracing::debug!(error = %status, "owner lookup failed");
                    if status.code() == tonic::Code::Unavailable {
                        self.rotate();
                    }
                    self.count_lookup("failed");
                    return None;
                }
                Err(_) => {
                    self.rotate();
                    self.count_lookup("failed");
                    return None;
                }
            };
        for _ in 0..owners.len() {
            self.count_lookup("found");
        }
        for _ in owners.len()..asked {
            self.count_lookup("absent");
        }
        {
            let mut cache = self.cache.lock();
            for o in owners.iter().filter(|o| o.owner_node != self.node_id) {
                cache.put(o.clone());
            }
        }
        Some(owners)
    }

    /// After a scoped snapshot: the sessions served here that it does not
    /// name as this node's are looked up, and each found owned elsewhere is
    /// passed to the owner callback (the table fences an older local copy).
    /// Level-triggered fencing holds across a resync that missed the delta.
    async fn resolve_missing(self: Arc<Self>) {
        let locals = match self.local_openids.lock().as_ref() {
            Some(f) => f(),
            None => return,
        };
        let missing: Vec<String> = {
            let view = self.view.read();
            if !view.scoped {
                return;
            }
            locals
                .into_iter()
                .filter(|o| !view.owners.contains_key(o))
                .collect()
        };
        for batch in missing.chunks(MAX_LOOKUPS_PER_CALL) {
            let Some(found) = self.lookup(batch.to_vec(), Vec::new()).await else {
                // Unanswered: the next snapshot (reconnect) tries again.
                return;
            };
            for owner in found.iter().filter(|o| o.owner_node != self.node_id) {
                if let Some(f) = self.on_owner_moved.lock().as_ref() {
                    f(owner);
                }
            }
        }
    }

    fn client(&self) -> ControlPlaneClient<Channel> {
        let i = self.current.load(Ordering::Relaxed) % self.channels.len().max(1);
        ControlPlaneClient::new(self.channels[i].clone())
            .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
    }

    /// Moves to the next endpoint after a failure.
    fn rotate(&self) {
        self.current.fetch_add(1, Ordering::Relaxed);
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.cfg.rpc_timeout);
        r
    }

    /// `ClaimSessions` calls made so far and the claims they carried (the
    /// claims benchmark reports their ratio).
    pub fn claim_counts(&self) -> (u64, u64) {
        (
            self.claim_calls.load(Ordering::Relaxed),
            self.claims_sent.load(Ordering::Relaxed),
        )
    }

    /// Claims `openid`'s session for this node: a new epoch. Claims made at
    /// the same time share one `ClaimSessions` call (see [`Cluster::run`]).
    ///
    /// `fresh_session_id` (may be empty): a Start resuming `session_id` gives
    /// this id to the fresh session it makes if the resume fails; the record
    /// answers for it too, so that Start claims once. Use the one in the
    /// answer ([`Claimed::fresh_session_id`]): a retried claim keeps the id
    /// recorded first.
    pub async fn claim(
        &self,
        openid: &str,
        session_id: &str,
        fresh_session_id: &str,
    ) -> Result<Claimed, ClaimError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.claims.lock().push(PendingClaim {
            claim: Claim {
                openid: openid.to_string(),
                session_id: session_id.to_string(),
                seen_epoch: 0,
                fresh_session_id: fresh_session_id.to_string(),
            },
            reply,
        });
        self.claim_wake.notify_one();
        // The call has its own deadline; this one also covers a claim loop
        // that is not running (yet, or any more).
        let wait = self.cfg.rpc_timeout * 2;
        let result = match tokio::time::timeout(wait, answer).await {
            Err(_) => return Err(ClaimError::Unreachable("timed out".into())),
            Ok(Err(_)) => return Err(ClaimError::Unreachable("claim abandoned".into())),
            Ok(Ok(r)) => r?,
        };
        if !result.error.is_empty() {
            return Err(ClaimError::Refused(result.error));
        }
        let owner = result
            .owner
            .ok_or_else(|| ClaimError::Refused("claim answer without owner".into()))?;
        // Record it at once: pushes arriving before the watch delta route right.
        {
            let mut view = self.view.write();
            let newer = view
                .owners
                .get(openid)
                .is_none_or(|o| o.epoch < owner.epoch);
            if newer {
                view.owners.insert(openid.to_string(), owner.clone());
            }
        }
        let previous = (!result.previous_owner.is_empty() && result.previous_owner != self.node_id)
            .then_some(result.previous_owner);
        // The fresh id counts only on the record of the session claimed.
        let fresh_session_id = if owner.session_id == session_id {
            owner.fresh_session_id.clone()
        } else {
            String::new()
        };
        Ok(Claimed {
            epoch: owner.epoch,
            previous_owner: previous,
            fresh_session_id,
        })
    }

    /// Claims as [`Cluster::claim`] does, and rides out a control-plane
    /// leader change (`core::claim`, [`ClaimRetry`](crate::core::ClaimRetry)):
    /// while no member answers the claim (an election) it is tried again with
    /// back-off; when the control plane refuses it because this node's lease
    /// lapsed meanwhile, a heartbeat goes out at once and the claim follows
    /// its renewal. A refusal is final. No attempt outlasts
    /// `control_plane.claim_patience`.
    pub async fn claim_patiently(
        &self,
        openid: &str,
        session_id: &str,
        fresh_session_id: &str,
    ) -> PatientClaim {
        use crate::core::{ClaimNext, ClaimRetry};
        let mut retry = ClaimRetry::new(
            tokio::time::Instant::now().into_std(),
            self.cfg.claim_patience,
        );
        let deadline = tokio::time::Instant::from_std(retry.deadline());
        loop {
            let renewals = self.renewals.load(Ordering::SeqCst);
            let attempt = self.claim(openid, session_id, fresh_session_id);
            let result = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(result) => result,
                Err(_) => Err(ClaimError::Unreachable(
                    "no answer within control_plane.claim_patience".into(),
                )),
            };
            let failure = match &result {
                Ok(_) => None,
                Err(e) => Some(e.failure(self.lease_check(Instant::now()).is_ok())),
            };
            let Some(f) = failure else {
                return PatientClaim {
                    result,
                    failure,
                    retries: retry.retries(),
                };
            };
            let give_up = |retries| PatientClaim {
                result: result.clone(),
                failure,
                retries,
            };
            match retry.failed(tokio::time::Instant::now().into_std(), f) {
                ClaimNext::GiveUp => return give_up(retry.retries()),
                ClaimNext::RetryAt(at) => {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                }
                ClaimNext::AfterRenewal => {
                    self.renew_wake.notify_one();
                    if !self.renewed_since(renewals, deadline).await {
                        return give_up(retry.retries());
                    }
                }
            }
        }
    }

    /// Waits until a renewal of this node's lease newer than the `seen`-th
    /// was answered, or `until`; whether one was.
    async fn renewed_since(&self, seen: u64, until: tokio::time::Instant) -> bool {
        loop {
            let changed = self.lease_changed.notified();
            if self.renewals.load(Ordering::SeqCst) > seen {
                return true;
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return self.renewals.load(Ordering::SeqCst) > seen;
            }
        }
    }

    /// Sends waiting claims, up to [`MAX_CLAIMS_PER_CALL`] per call and
    /// `claim_calls_in_flight` calls at once: claims arriving while all are
    /// busy wait and go together in the next call, so under load one call
    /// carries a burst (group commit) and idle a claim goes at once.
    async fn claim_loop(self: Arc<Self>, stop: CancellationToken) {
        let calls = Arc::new(tokio::sync::Semaphore::new(
            self.cfg.claim_calls_in_flight.max(1),
        ));
        loop {
            tokio::select! {
                () = self.claim_wake.notified() => {}
                () = stop.cancelled() => return,
            }
            // Let the tasks woken with the one that woke us (a burst of Starts, or the
            // callers of a call just answered) queue their claims first, so they share a call.
            tokio::task::yield_now().await;
            loop {
                let permit = tokio::select! {
                    p = calls.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    () = stop.cancelled() => return,
                };
                let batch: Vec<PendingClaim> = {
                    let mut pending = self.claims.lock();
                    let n = pending.len().min(MAX_CLAIMS_PER_CALL);
                    pending.drain(..n).collect()
                };
                if batch.is_empty() {
                    break;
                }
                let me = self.clone();
                tokio::spawn(async move {
                    me.send_claims(batch).await;
                    drop(permit);
                });
            }
        }
    }

    /// One `ClaimSessions` call for `batch`; every claim gets its answer.
    async fn send_claims(&self, batch: Vec<PendingClaim>) {
        let n = batch.len();
        self.claim_calls.fetch_add(1, Ordering::Relaxed);
        self.claims_sent.fetch_add(n as u64, Ordering::Relaxed);
        let req = self.request(ClaimSessionsRequest {
            node_id: self.node_id.clone(),
            claims: batch.iter().map(|p| p.claim.clone()).collect(),
        });
        let mut client = self.client();
        let outcome =
            match tokio::time::timeout(self.cfg.rpc_timeout, client.claim_sessions(req)).await {
                Err(_) => {
                    self.rotate();
                    Err(ClaimError::Unreachable("timed out".into()))
                }
                Ok(Err(status)) => {
                    let e = ClaimError::of_status(&status);
                    if matches!(e, ClaimError::Unreachable(_)) {
                        self.rotate();
                    }
                    Err(e)
                }
                Ok(Ok(r)) => Ok(r.into_inner().results),
            };
        match outcome {
            Err(e) => {
                for p in batch {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
            Ok(results) => {
                // Answers come in the order of the claims.
                let mut results = results.into_iter();
                for p in batch {
                    let answer = results
                        .next()
                        .filter(|r| r.openid == p.claim.openid)
                        .ok_or_else(|| ClaimError::Refused("claim answer missing".into()));
                    let _ = p.reply.send(answer);
                }
            }
        }
    }

    /// Queues the release of `openid`'s owner record (a session that ended
    /// here at `epoch`); sent in batches by the release loop.
    pub fn release_later(&self, openid: &str, session_id: &str, epoch: u64) {
        let mut pending = self.releases.lock();
        if pending.len() >= MAX_PENDING_RELEASES {
            tracing::warn!(
                openid,
                "too many owner releases pending; this one is dropped"
            );
            return;
        }
        pending.push(SessionOwner {
            openid: openid.to_string(),
            session_id: session_id.to_string(),
            owner_node: self.node_id.clone(),
            epoch,
            fresh_session_id: String::new(),
        });
        drop(pending);
        self.release_wake.notify_one();
    }

    /// Sends queued releases, [`MAX_RELEASES_PER_CALL`] per call, until none
    /// is left; on failure they wait for the next round (with backoff).
    async fn release_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                () = self.release_wake.notified() => {}
                () = stop.cancelled() => return,
            }
            tokio::time::sleep(RELEASE_LINGER).await;
            loop {
                let batch: Vec<SessionOwner> = {
                    let mut pending = self.releases.lock();
                    let n = pending.len().min(MAX_RELEASES_PER_CALL);
                    pending.drain(..n).collect()
                };
                if batch.is_empty() {
                    break;
                }
                let n = batch.len();
                let req = self.request(control::ReleaseSessionsRequest {
                    node_id: self.node_id.clone(),
                    sessions: batch.clone(),
                });
                let mut client = self.client();
                match tokio::time::timeout(self.cfg.rpc_timeout, client.release_sessions(req)).await
                {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        backoff = Duration::from_millis(100);
                        tracing::debug!(
                            released = r.released,
                            fenced = r.fenced,
                            "owner records released"
                        );
                    }
                    Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                        tracing::warn!(error = %status, n, "owner releases refused; dropped");
                    }
                    failed => {
                        let error = match failed {
                            Ok(Err(status)) => status.message().to_string(),
                            _ => "timed out".into(),
                        };
                        tracing::debug!(error, n, "owner releases failed; retrying");
                        self.rotate();
                        {
                            let mut pending = self.releases.lock();
                            let room = MAX_PENDING_RELEASES.saturating_sub(pending.len());
                            pending.splice(0..0, batch.into_iter().take(room));
                        }
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = stop.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    /// Moves `openid`'s ownership to `to_node` if it is still at `epoch`
    /// (drain). Returns the new epoch.
    pub async fn transfer(
        &self,
        openid: &str,
        epoch: u64,
        to_node: &str,
    ) -> Result<u64, ClaimError> {
        let req = self.request(control::TransferSessionRequest {
            openid: openid.to_string(),
            expected_epoch: epoch,
            to_node: to_node.to_string(),
        });
        let mut client = self.client();
        match tokio::time::timeout(self.cfg.rpc_timeout, client.transfer_session(req)).await {
            Err(_) => {
                self.rotate();
                Err(ClaimError::Unreachable("timed out".into()))
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                self.rotate();
                Err(ClaimError::Unreachable(status.message().to_string()))
            }
            Ok(Err(status)) => Err(ClaimError::Refused(status.message().to_string())),
            Ok(Ok(r)) => {
                let owner = r
                    .into_inner()
                    .owner
                    .ok_or_else(|| ClaimError::Refused("transfer answer without owner".into()))?;
                let epoch = owner.epoch;
                let mut view = self.view.write();
                if view.scoped && owner.owner_node != self.node_id {
                    // Another node's session now: the cache, not the view.
                    view.owners.remove(openid);
                    self.cache.lock().put(owner);
                } else {
                    view.owners.insert(openid.to_string(), owner);
                }
                Ok(epoch)
            }
        }
    }

    /// Leaves the cluster (the last step of a drain, just before the process exits): the
    /// control plane shows this node as left at once instead of dead after its lease, and
    /// the membership loop stops (it would otherwise register the node again). Returns how
    /// many sessions the control plane still recorded as this node's (they are taken over
    /// by whichever node their clients reach next). Tries each endpoint once.
    pub async fn leave(&self) -> Result<u64, ClaimError> {
        self.left.store(true, Ordering::SeqCst);
        let mut last = ClaimError::Unreachable("no control-plane endpoint".into());
        for _ in 0..self.channels.len().max(1) {
            let req = self.request(LeaveNodeRequest {
                node_id: self.node_id.clone(),
            });
            let mut client = self.client();
            match tokio::time::timeout(self.cfg.rpc_timeout, client.leave_node(req)).await {
                Ok(Ok(r)) => return Ok(r.into_inner().orphaned_sessions),
                Ok(Err(status))
                    if !matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) =>
                {
                    return Err(ClaimError::Refused(status.message().to_string()));
                }
                Ok(Err(status)) => last = ClaimError::Unreachable(status.message().to_string()),
                Err(_) => last = ClaimError::Unreachable("timed out".into()),
            }
            self.rotate();
        }
        Err(last)
    }

    /// Active nodes other than this one (drain successors).
    pub fn successors(&self) -> Vec<DataPlaneNode> {
        let mut nodes: Vec<DataPlaneNode> = self
            .view
            .read()
            .nodes
            .values()
            .filter(|n| n.node_id != self.node_id && n.state == NodeState::Active as i32)
            .cloned()
            .collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        nodes
    }

    /// Runs membership and watch loops until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let membership = tokio::spawn(self.clone().membership_loop(stop.clone()));
        let watch = tokio::spawn(self.clone().watch_loop(stop.clone()));
        let writer = tokio::spawn(self.clone().state_file_loop(stop.clone()));
        let releaser = tokio::spawn(self.clone().release_loop(stop.clone()));
        let claimer = tokio::spawn(self.clone().claim_loop(stop.clone()));
        stop.cancelled().await;
        membership.abort();
        watch.abort();
        releaser.abort();
        claimer.abort();
        // The writer saves a last change before it returns.
        let _ = writer.await;
    }

    async fn membership_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut registered = false;
        let mut interval = self.cfg.lease_ttl / 3;
        let mut lease_ttl = self.cfg.lease_ttl;
        let mut backoff = Duration::from_millis(100);
        loop {
            if stop.is_cancelled() || self.left.load(Ordering::SeqCst) {
                return;
            }
            // The lease is measured from the send: the control plane starts
            // it when it applies the call, never earlier.
            let sent = Instant::now();
            let ok = if registered {
                let req = self.request(HeartbeatNodeRequest {
                    node_id: self.node_id.clone(),
                    draining: self.draining.load(Ordering::Relaxed),
                    sessions: self.sessions.load(Ordering::Relaxed) as u64,
                });
                match self.client().heartbeat_node(req).await {
                    Ok(r) => {
                        if r.into_inner().drain_requested && !self.draining.load(Ordering::Relaxed)
                        {
                            tracing::info!("control plane asked this node to drain");
                            self.drain_requested.notify_one();
                        }
                        self.lease.lock().renewed(sent, lease_ttl);
                        self.renewals.fetch_add(1, Ordering::SeqCst);
                        self.lease_changed.notify_waiters();
                        true
                    }
                    // Unknown to the control plane, or declared dead after a lapse (e.g. a
                    // long pause): register again ("register again" is what it says).
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::NotFound | tonic::Code::FailedPrecondition
                        ) =>
                    {
                        tracing::info!(error = %s, "membership lost; registering again");
                        let live = self.view.read().live_node(&self.node_id).is_some();
                        self.lease.lock().lost(live);
                        registered = false;
                        false
                    }
                    Err(s) => {
                        tracing::debug!(error = %s, "heartbeat failed");
                        false
                    }
                }
            } else if self.left.load(Ordering::SeqCst) {
                // A heartbeat refused because we left must not register us again.
                return;
            } else {
                let req = self.request(RegisterNodeRequest {
                    node: Some(DataPlaneNode {
                        node_id: self.node_id.clone(),
                        quic_addr: self.quic_addr.clone(),
                        grpc_addr: self.grpc_addr.clone(),
                        state: NodeState::Active as i32,
                        lease_expires_at_ms: 0,
                        ..Default::default()
                    }),
                    lease_ttl_ms: self.cfg.lease_ttl.as_millis() as u32,
                });
                match self.client().register_node(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        registered = true;
                        self.registered_once.store(true, Ordering::Relaxed);
                        interval =
                            Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(100)));
                        if r.lease_ttl_ms > 0 {
                            lease_ttl = Duration::from_millis(u64::from(r.lease_ttl_ms));
                        }
                        self.lease.lock().renewed(sent, lease_ttl);
                        self.renewals.fetch_add(1, Ordering::SeqCst);
                        self.lease_changed.notify_waiters();
                        tracing::info!(node = %self.node_id, lease_ms = r.lease_ttl_ms, "registered with the control plane");
                        true
                    }
                    Err(s) => {
                        tracing::debug!(error = %s, "registration failed");
                        false
                    }
                }
            };
            self.connected.store(ok, Ordering::Relaxed);
            let wait = if ok {
                backoff = Duration::from_millis(100);
                interval
            } else {
                self.rotate();
                backoff = (backoff * 2).min(Duration::from_secs(2));
                backoff
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                // A claim needs the renewal now (its lease lapsed during an
                // election): out of the back-off, which reaches 2 s.
                () = self.renew_wake.notified() => {}
                () = stop.cancelled() => return,
            }
        }
    }

    async fn watch_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let from = self.view.read().version;
            let req = WatchRequest {
                from_version: from,
                node_id: self.node_id.clone(),
                chunked_snapshot: true,
                scoped: true,
            };
            match self.client().watch(req).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    backoff = Duration::from_millis(100);
                    // A snapshot being received in chunks: applied only whole.
                    let mut partial: Option<(u64, control::Snapshot)> = None;
                    loop {
                        let next = tokio::select! {
                            next = stream.message() => next,
                            () = stop.cancelled() => return,
                        };
                        let event = match next {
                            Ok(Some(event)) => event,
                            Ok(None) => break,
                            Err(status) => {
                                tracing::debug!(error = %status, "watch stream ended");
                                break;
                            }
                        };
                        match merge_chunk(&mut partial, event) {
                            Ok(Some(whole)) => {
                                self.stale.store(false, Ordering::Relaxed);
                                let snapshot = matches!(whole.event, Some(WatchBody::Snapshot(_)));
                                self.apply(whole);
                                if snapshot {
                                    tokio::spawn(self.clone().resolve_missing());
                                }
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(
                                    error = e,
                                    "watch snapshot chunks out of order; watching again"
                                );
                                break;
                            }
                        }
                    }
                }
                Err(status) => tracing::debug!(error = %status, "watch failed"),
            }
            self.rotate();
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn apply(&self, event: WatchEvent) {
        let touches_upstreams = matches!(
            event.event,
            Some(
                WatchBody::Snapshot(_) | WatchBody::UpstreamPut(_) | WatchBody::UpstreamRemoved(_)
            )
        );
        let moved = match &event.event {
            Some(WatchBody::OwnerPut(o)) => Some(o.clone()),
            _ => None,
        };
        let whole = matches!(
            event.event,
            Some(WatchBody::Snapshot(_) | WatchBody::NodePut(_) | WatchBody::NodeRemoved(_))
        );
        let snapshot = matches!(event.event, Some(WatchBody::Snapshot(_)));
        let owners_seen = snapshot || moved.is_some();
        {
            let mut view = self.view.write();
            if event.version <= view.version && !matches!(event.event, Some(WatchBody::Snapshot(_)))
            {
                return;
            }
            view.apply(event);
            // A scoped view keeps this node's own sessions; one that moved
            // away (the delta this node hears as its previous owner) goes to
            // the cache of foreign owners, so the view stays O(own sessions).
            if let Some(o) = moved.as_ref().filter(|o| o.owner_node != self.node_id)
                && view.scoped
            {
                view.owners.remove(&o.openid);
                self.cache.lock().put(o.clone());
            }
        }
        if snapshot {
            self.complete.store(true, Ordering::Release);
        }
        if owners_seen {
            self.view_advanced.notify_waiters();
        }
        if whole {
            // A node was declared dead and registered again: its lease counts
            // once the view went past the re-registration (`core::lease`).
            let live = self.view.read().live_node(&self.node_id).is_some();
            self.lease
                .lock()
                .view_changed(Instant::now(), live, snapshot);
            self.lease_changed.notify_waiters();
        }
        if let Some(owner) = moved
            && let Some(f) = self.on_owner_moved.lock().as_ref()
        {
            f(&owner);
        }
        if whole && let Some(f) = self.on_view.lock().as_ref() {
            f(&self.view.read());
        }
        if touches_upstreams {
            self.update_router();
        }
        self.persist();
    }

    fn update_router(&self) {
        if let Some(router) = &self.router {
            let zones = crate::upstream::instances_by_zone(self.view.read().upstreams.values());
            for (zone, instances) in zones {
                router.set_zone_instances(&zone, instances);
            }
            // Zones whose last upstream left get an empty list.
            let view = self.view.read();
            for zone in router.zones() {
                if !view.upstreams.values().any(|u| u.zone == zone) {
                    router.set_zone_instances(&zone, Vec::new());
                }
            }
        }
    }

    /// Marks the view changed: the state-file writer saves it within
    /// [`STATE_FILE_DEBOUNCE`] (one write for a burst of changes).
    fn persist(&self) {
        if self.cfg.state_file.is_some() {
            self.dirty.store(true, Ordering::Release);
            self.persist_wake.notify_one();
        }
    }

    /// Writes the state file after changes, at most once per
    /// [`STATE_FILE_DEBOUNCE`], off the async runtime; once more at `stop`.
    async fn state_file_loop(self: Arc<Self>, stop: CancellationToken) {
        if self.cfg.state_file.is_none() {
            return;
        }
        loop {
            let stopping = tokio::select! {
                () = self.persist_wake.notified() => false,
                () = stop.cancelled() => true,
            };
            if !stopping {
                tokio::select! {
                    () = tokio::time::sleep(STATE_FILE_DEBOUNCE) => {}
                    () = stop.cancelled() => {}
                }
            }
            if self.dirty.swap(false, Ordering::AcqRel) {
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.write_state_file()).await;
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }

    /// Rewrites the state file atomically and durably: temp file, fsync,
    /// rename, fsync of the directory. Blocking: run on a blocking thread.
    fn write_state_file(&self) {
        let Some(path) = &self.cfg.state_file else {
            return;
        };
        if !self.is_view_complete() {
            return;
        }
        let bytes = self.view.read().to_event().encode_to_vec();
        if let Err(e) = write_atomically(path, &bytes) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the cluster state file");
        }
    }

    fn load_state_file(&self) {
        let Some(path) = &self.cfg.state_file else {
            return;
        };
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .unwrap_or_default();
        if age > self.cfg.max_state_age {
            tracing::warn!(path = %path.display(), ?age, "cluster state file too old; not used");
            return;
        }
        match std::fs::read(path).map(|b| WatchEvent::decode(b.as_slice())) {
            Ok(Ok(event)) => {
                self.view.write().apply(event);
                self.complete.store(true, Ordering::Release);
                self.stale.store(true, Ordering::Relaxed);
                self.update_router();
                tracing::info!(path = %path.display(), version = self.view.read().version, "serving from the saved cluster state until the control plane answers");
            }
            Ok(Err(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "cluster state file unreadable; ignored")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cluster state file unreadable; ignored")
            }
        }
    }
}

/// How long the state file waits after a change for more changes before it
/// is rewritten: a burst of claims costs one write.
pub const STATE_FILE_DEBOUNCE: Duration = Duration::from_millis(500);

/// Writes `bytes` to `path` so that a crash leaves either the old or the new
/// file: a temporary file beside it, fsync, rename, fsync of the directory.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Feeds one watch event through the chunk merger: a whole event to apply,
/// `None` while a chunked snapshot is incomplete, or an error when chunks
/// arrive out of order (the watch is then restarted).
fn merge_chunk(
    partial: &mut Option<(u64, control::Snapshot)>,
    event: WatchEvent,
) -> Result<Option<WatchEvent>, &'static str> {
    let version = event.version;
    match event.event {
        Some(WatchBody::Snapshot(s)) if s.more => {
            *partial = Some((version, s));
            Ok(None)
        }
        Some(WatchBody::SnapshotMore(more)) => {
            let Some((v, acc)) = partial.as_mut() else {
                return Err("a snapshot continuation without its start");
            };
            if *v != version {
                *partial = None;
                return Err("snapshot chunks of different versions");
            }
            acc.upstreams.extend(more.upstreams);
            acc.nodes.extend(more.nodes);
            acc.owners.extend(more.owners);
            acc.failovers.extend(more.failovers);
            if more.more {
                return Ok(None);
            }
            let Some((version, mut whole)) = partial.take() else {
                return Err("a snapshot continuation without its start");
            };
            whole.more = false;
            Ok(Some(WatchEvent {
                version,
                event: Some(WatchBody::Snapshot(whole)),
            }))
        }
        body => {
            if partial.is_some() {
                *partial = None;
                return Err("an event inside a chunked snapshot");
            }
            Ok(Some(WatchEvent {
                version,
                event: body,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(openid: &str, node: &str, epoch: u64) -> SessionOwner {
        SessionOwner {
            openid: openid.into(),
            session_id: format!("s-{openid}"),
            owner_node: node.into(),
            epoch,
            fresh_session_id: String::new(),
        }
    }

    fn unconnected_cluster() -> Arc<Cluster> {
        let cfg = ControlPlaneClientConfig {
            endpoints: vec!["127.0.0.1:9".into()],
            insecure: true,
            ..Default::default()
        };
        let cluster = Cluster::new(cfg, "dp-1".into(), "q".into(), "g".into(), None);
        Arc::new(cluster.expect("a plaintext config with one endpoint is valid"))
    }

    fn owner_put(version: u64, openid: &str, epoch: u64) -> WatchEvent {
        WatchEvent {
            version,
            event: Some(WatchBody::OwnerPut(rec(openid, "dp-1", epoch))),
        }
    }

    /// Session 11: a crash recovery whose nodes had all answered slept 100 ms
    /// and looked again while the watch lagged its claim; every Start of a
    /// reconnect burst paid it. The wait is now woken by the watch delivery
    /// that reaches the claim's epoch, well before its deadline (the clock is
    /// paused: it moves only when every task waits on a timer).
    #[tokio::test(start_paused = true)]
    async fn a_wait_for_the_view_ends_when_the_watch_delivers_the_claims_epoch() {
        let cluster = unconnected_cluster();
        let until = tokio::time::Instant::now() + Duration::from_secs(3600);
        let waiter = tokio::spawn({
            let cluster = cluster.clone();
            async move { cluster.view_reaches(9, until).await }
        });
        tokio::task::yield_now().await;
        // An older epoch wakes the wait without ending it.
        cluster.apply(owner_put(1, "a", 5));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "epoch 5 is not the claim's 9");
        // The claim's own answer, written into the view for routing, does not count.
        cluster
            .view
            .write()
            .owners
            .insert("b".into(), rec("b", "dp-1", 9));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        cluster.apply(owner_put(2, "b", 9));
        assert!(waiter.await.expect("the waiter ran"), "the view reached 9");
        assert!(
            tokio::time::Instant::now() < until,
            "woken by the delivery, not by its deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_for_a_view_that_never_reaches_the_claim_gives_up_at_its_deadline() {
        let cluster = unconnected_cluster();
        cluster.apply(owner_put(1, "a", 5));
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        assert!(!cluster.view_reaches(9, until).await);
        assert!(tokio::time::Instant::now() >= until);
        // Already reached: answered at once.
        assert!(cluster.view_reaches(5, until).await);
    }

    #[test]
    fn the_owner_cache_is_bounded_and_ordered_by_epoch() {
        let mut cache = OwnerCache::new(3);
        cache.put(rec("a", "dp-2", 5));
        // An older record does not replace a newer one; a newer one does.
        cache.put(rec("a", "dp-3", 4));
        assert_eq!(cache.get("a").unwrap().owner_node, "dp-2");
        cache.put(rec("a", "dp-3", 6));
        assert_eq!(cache.get("a").unwrap().owner_node, "dp-3");
        for o in ["b", "c", "d", "e"] {
            cache.put(rec(o, "dp-2", 1));
        }
        assert_eq!(cache.len(), 3, "bounded");
        assert!(cache.get("a").is_none(), "the oldest insertion goes first");
        assert_eq!(cache.by_session("s-e").unwrap().openid, "e");
        // A forward refused by the cached owner evicts that record only.
        assert!(
            !cache.evict("e", 0),
            "a newer record than the refusal stays"
        );
        assert!(cache.evict("e", 1));
        assert!(cache.get("e").is_none());
        for i in 0..100 {
            cache.put(rec(&format!("x{i}"), "dp-2", 1));
            cache.evict(&format!("x{i}"), 1);
        }
        assert!(
            cache.order.len() <= 2 * cache.capacity + 1,
            "order compacts"
        );
    }

    #[test]
    fn a_scoped_view_keeps_its_own_sessions_and_the_state_file_says_so() {
        let mut view = View::default();
        view.apply(WatchEvent {
            version: 3,
            event: Some(WatchBody::Snapshot(control::Snapshot {
                owners: vec![rec("mine", "dp-1", 2)],
                scoped: true,
                ..Default::default()
            })),
        });
        assert!(view.scoped);
        let saved = view.to_event();
        let mut restored = View::default();
        restored.apply(saved);
        assert!(restored.scoped && restored.owners.contains_key("mine"));
    }

    /// Simulation seed 3340 of session 10: a claimant whose watch lagged
    /// recovered from the nodes its view knew and missed a new node holding
    /// the only copy. A recovery waits until the watch delivered an owner
    /// record at the claim's epoch or later; the claim's own answer, written
    /// into the view at once for routing, does not count.
    #[test]
    fn the_view_has_reached_a_claim_only_once_the_watch_delivered_its_epoch() {
        let mut view = View::default();
        view.apply(WatchEvent {
            version: 3,
            event: Some(WatchBody::Snapshot(control::Snapshot {
                owners: vec![rec("a", "dp-1", 5)],
                scoped: true,
                ..Default::default()
            })),
        });
        assert_eq!(view.owner_epoch_seen, 5);
        // A claim at epoch 9 answered: recorded for routing, not seen.
        view.owners.insert("b".into(), rec("b", "dp-1", 9));
        assert_eq!(view.owner_epoch_seen, 5);
        // The nodes committed before the claim come first on the watch.
        view.apply(WatchEvent {
            version: 4,
            event: Some(WatchBody::NodePut(DataPlaneNode {
                node_id: "dp-8".into(),
                ..Default::default()
            })),
        });
        assert!(view.owner_epoch_seen < 9);
        view.apply(WatchEvent {
            version: 5,
            event: Some(WatchBody::OwnerPut(rec("b", "dp-1", 9))),
        });
        assert!(view.owner_epoch_seen >= 9, "the claim's own record came");
        assert!(view.nodes.contains_key("dp-8"));
    }
}
