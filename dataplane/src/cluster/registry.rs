//! The shell around the node's session table ([`crate::core::Table`]): it
//! holds the table behind one lock and carries out the table's commands
//! (wake a connection, close it, count what ended).
//!
//! Each local session is a [`SessionEntry`]: the sans-IO [`Session`] behind a
//! mutex, the connection currently attached to it (if any), and a [`Notify`]
//! that wakes that connection's task when there is something to send. Where a
//! session is (local, incoming, moved, fenced) and at which epoch is the
//! table's alone to say; nothing here keeps a second copy of it.
//!
//! Lock order: the table, then a session. Connection tasks lock a session
//! alone (sending, acks); nothing locks the table while holding a session.
//!
//! ```text
//!  GatewayService.PushToClient ─┐
//!  Peer.Handover / Stage ───────┤
//!  watch (owners) ──────────────┼─> Mutex<Table> ──Command──> wake / close / metrics
//!  ClientRequest / Start / Stop ┤         │ Slot::Local(Arc<SessionEntry>)
//!  timer task (poll_timeout) ───┘         └──────────────────────────> connection task
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::SinkExt;
use gatesvr_proto::client::{ClientResponse, Envelope, ErrorCode, ResumeStatus};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::core::{
    Command, HandoverAsk, Holding, InstallError, PushOutcome, Reach, RequestOutcome, SessionCell,
    Table, TableConfig, Target,
};
use crate::metrics::{Metrics, code_label};
use crate::session::{PushBody, PushError, ResumeOutcome, Session, SessionConfig, SessionIdentity};

/// A connection bound to a session.
#[derive(Clone)]
pub struct Attachment {
    /// Unique per connection on this node.
    pub conn_id: u64,
    pub connection: crate::transport::ConnectionHandle,
    /// Frames other than pushes (answers of requests that arrived on an
    /// earlier connection) for the writer, already encoded. `futures`'s
    /// channel allocates per queued frame, where tokio's preallocates a block
    /// of 32 slots (~1.5 KB with its state) on every idle connection.
    pub control: futures::channel::mpsc::Sender<bytes::Bytes>,
}

pub struct SessionEntry {
    pub identity: SessionIdentity,
    pub state: Mutex<Session>,
    /// Wakes the attached connection's task (pushes ready to send).
    pub wake: Notify,
    pub attached: Mutex<Option<Attachment>>,
}

/// The shell's session handle, as the core's table holds it.
impl SessionCell for Arc<SessionEntry> {
    fn identity(&self) -> &SessionIdentity {
        &self.identity
    }

    fn with<R>(&self, f: impl FnOnce(&mut Session) -> R) -> R {
        f(&mut self.state.lock())
    }

    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(self, other)
    }
}

impl SessionEntry {
    /// Sends a non-push frame to whichever connection is attached now. A
    /// request's answer goes to the current connection even if the request
    /// arrived on an earlier one; with none attached it stays cached in the
    /// session for the client's retry.
    pub async fn send_control(&self, frame: Envelope) {
        let tx = self.attached.lock().as_ref().map(|a| a.control.clone());
        if let Some(mut tx) = tx {
            let mut buf = bytes::BytesMut::new();
            gatesvr_proto::frame::encode(&frame, &mut buf);
            // A closed channel means the connection just ended; the session
            // keeps the answer for the retry.
            let _ = tx.send(buf.freeze()).await;
        }
    }

    /// Closes the attached connection, if any, with `code`.
    pub fn close_connection(&self, code: ErrorCode, reason: &str) {
        if let Some(a) = self.attached.lock().take() {
            a.connection
                .close(crate::errors::quic_close_code(code), reason.as_bytes());
        }
    }
}

/// Why a push could not be queued here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PushFailure {
    /// Not known here.
    #[error("no session for {0}")]
    NoSession(String),
    /// The session refused it (queue full, expired).
    #[error(transparent)]
    Refused(#[from] PushError),
    /// The session is on another node now: the push goes there.
    #[error("session moved to {0}")]
    Moved(String),
    /// The session is on its way here or out of here: ask again shortly.
    #[error("session in transit")]
    InTransit,
}

/// Sessions a broadcast queues on under one table lock ([`Registry::push_each`]):
/// bounds how long other users of the table wait behind it.
pub const BROADCAST_RUN: usize = 64;

/// One push of a [`Registry::push_run`].
pub struct RunPush<'a> {
    pub openid: &'a str,
    pub body: PushBody,
    /// The view's owner of the session and its epoch (see [`Registry::push_to`]).
    pub view_owner: Option<(&'a str, u64)>,
}

/// A push's result from its table outcome; None where the run stops
/// (forward, wait, absent). A push refused for a full queue closes the
/// session as a slow consumer.
#[inline]
fn receipt(
    outcome: PushOutcome<Arc<SessionEntry>>,
    commands: &mut Vec<Command<Arc<SessionEntry>>>,
) -> Option<Result<PushReceipt, PushError>> {
    match outcome {
        PushOutcome::Queued { seq_id, handle } => Some(Ok(PushReceipt {
            seq_id,
            entry: handle,
        })),
        PushOutcome::Refused { error, handle } => {
            if matches!(error, PushError::QueueFull { .. }) {
                commands.push(Command::Close {
                    handle,
                    code: ErrorCode::SlowConsumer,
                    reason: "push queue full: reconnect and resume",
                });
            }
            Some(Err(error))
        }
        PushOutcome::Forward { .. } | PushOutcome::Wait | PushOutcome::Absent => None,
    }
}

/// Where a push landed.
#[derive(Clone)]
pub struct PushReceipt {
    pub seq_id: u64,
    /// The session it was queued on (its id: `entry.identity.session_id`).
    pub entry: Arc<SessionEntry>,
}

pub struct Registry {
    table: Mutex<Table<Arc<SessionEntry>>>,
    config: SessionConfig,
    zone_count: u32,
    metrics: Metrics,
    next_conn_id: AtomicU64,
    /// Replicas fetched for a Start whose session's owner is gone: openid ->
    /// (what they hold, the claim's epoch); consumed by that Start. Data in
    /// transit, not a location: the slot is `Incoming` meanwhile.
    recovering: Mutex<HashMap<String, (crate::replica::Recovery, u64)>>,
    /// Sessions whose queue must be copied to this node's standby now
    /// (rebuilt from a replica, or handed over with pushes: [`Registry::copy_soon`]);
    /// `recovered_wake` tells the replica task.
    to_replicate: Mutex<Vec<String>>,
    pub recovered_wake: Notify,
    /// Signalled whenever a slot settles (an incoming session arrived or
    /// gave up, a drain's staging finished): pushes waiting on it look again.
    settled: Notify,
    /// Woken when a peer is found down ([`Registry::mark_unreachable`]).
    went_down: Notify,
    /// Signalled when a deadline earlier than the timer task's sleep appears.
    pub timer_wake: Notify,
    /// Told (openid, session_id, epoch) of every session that ended here, so
    /// its owner record is released in the control plane (`cluster`).
    ended: parking_lot::Mutex<Option<EndedHook>>,
}

/// See [`Registry::on_ended`].
type EndedHook = Box<dyn Fn(&str, &str, u64) + Send + Sync>;

pub use crate::core::HandoverError;

/// Result of a Start.
pub struct Started {
    pub entry: Arc<SessionEntry>,
    pub outcome: ResumeOutcome,
}

/// A fresh random session id (128 bits, hex).
pub fn new_session_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn status_label(status: ResumeStatus) -> &'static str {
    match status {
        ResumeStatus::New => "new",
        ResumeStatus::Resumed => "resumed",
        ResumeStatus::SessionExpired => "session_expired",
        ResumeStatus::Trimmed => "trimmed",
        ResumeStatus::SeqAhead => "seq_ahead",
        ResumeStatus::Recovered => "recovered",
    }
}

fn replace_attachment(entry: &SessionEntry, attachment: Attachment) {
    if let Some(old) = entry.attached.lock().replace(attachment) {
        old.connection.close(
            crate::errors::quic_close_code(ErrorCode::SessionReplaced),
            b"session resumed on another connection",
        );
    }
}

impl Registry {
    pub fn new(config: SessionConfig, zone_count: u32, metrics: Metrics) -> Self {
        Self::with_node_id("", config, zone_count, metrics)
    }

    /// A registry for node `node_id` (its own id matters to the table: the
    /// view naming it as a session's owner is not a reason to fence).
    pub fn with_node_id(
        node_id: &str,
        config: SessionConfig,
        zone_count: u32,
        metrics: Metrics,
    ) -> Self {
        let table_cfg = TableConfig {
            // Pushes wait for a session being fetched as long as a peer call.
            incoming_ttl: crate::peer::PEER_TIMEOUT * 2,
            ..TableConfig::default()
        };
        Self {
            table: Mutex::new(Table::new(node_id, table_cfg)),
            config,
            zone_count,
            metrics,
            next_conn_id: AtomicU64::new(1),
            recovering: Mutex::new(HashMap::new()),
            to_replicate: Mutex::new(Vec::new()),
            recovered_wake: Notify::new(),
            settled: Notify::new(),
            went_down: Notify::new(),
            timer_wake: Notify::new(),
            ended: parking_lot::Mutex::new(None),
        }
    }

    /// Registers the hook told of every session that ended here (stop,
    /// expiry, replacement, fencing) with the epoch it held. Releasing at
    /// that epoch is safe for every reason: the control plane releases only
    /// an owner record that still names this node at that epoch.
    pub fn on_ended(&self, f: impl Fn(&str, &str, u64) + Send + Sync + 'static) {
        *self.ended.lock() = Some(Box::new(f));
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs `f` on the table (the one place that says where a session is).
    /// Commands it returns must go through [`Registry::carry_out`].
    pub fn with_table<R>(&self, f: impl FnOnce(&mut Table<Arc<SessionEntry>>) -> R) -> R {
        let mut t = self.table.lock();
        let before = t.poll_timeout();
        let r = f(&mut t);
        let after = t.poll_timeout();
        self.metrics.sessions.set(t.local_count() as i64);
        drop(t);
        if after.is_some() && (before.is_none() || after < before) {
            self.timer_wake.notify_one();
        }
        r
    }

    /// Carries out the table's commands: wakes, closes, and what ended.
    pub fn carry_out(&self, commands: Vec<Command<Arc<SessionEntry>>>) {
        for command in commands {
            match command {
                Command::Wake(entry) => entry.wake.notify_one(),
                Command::Close {
                    handle,
                    code,
                    reason,
                } => {
                    if matches!(code, ErrorCode::AckTimeout | ErrorCode::SlowConsumer) {
                        self.metrics
                            .connections_closed
                            .with_label_values(&[&code_label(code)])
                            .inc();
                    }
                    handle.close_connection(code, reason);
                }
                Command::Removed {
                    openid,
                    session_id,
                    epoch,
                    reason,
                    lost,
                } => {
                    if epoch > 0
                        && let Some(f) = self.ended.lock().as_ref()
                    {
                        f(&openid, &session_id, epoch);
                    }
                    if reason == "fenced" {
                        tracing::info!(openid = %openid, "fenced: session owned elsewhere");
                    }
                    self.metrics
                        .sessions_closed
                        .with_label_values(&[reason])
                        .inc();
                    if lost > 0 {
                        self.metrics
                            .pushes_lost
                            .with_label_values(&[reason])
                            .inc_by(lost);
                    }
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.table.lock().local_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, openid: &str) -> Option<Arc<SessionEntry>> {
        self.table.lock().local(openid).cloned()
    }

    pub fn get_by_session(&self, session_id: &str) -> Option<Arc<SessionEntry>> {
        let t = self.table.lock();
        let openid = t.openid_of(session_id)?;
        t.local(openid)
            .filter(|e| e.identity.session_id == session_id)
            .cloned()
    }

    /// Every session (a snapshot of handles; sessions may end meanwhile).
    pub fn all(&self) -> Vec<Arc<SessionEntry>> {
        self.table.lock().locals().cloned().collect()
    }

    fn fresh_entry(&self, openid: &str, now: Instant, id: Option<String>) -> Arc<SessionEntry> {
        let identity = SessionIdentity {
            session_id: id.unwrap_or_else(new_session_id),
            openid: openid.to_string(),
            zone: gatesvr_proto::zone::zone_of(openid, self.zone_count),
        };
        Arc::new(SessionEntry {
            state: Mutex::new(Session::new(identity.clone(), self.config.clone(), now)),
            identity,
            wake: Notify::new(),
            attached: Mutex::new(None),
        })
    }

    /// Starts or resumes `openid`'s session on a new connection.
    ///
    /// - `session_id` empty: a new session; any previous one of this openid is
    ///   replaced and its unacked pushes discarded (counted as lost, reason
    ///   `replaced`): the client asked for a fresh start.
    /// - `session_id` matching: resume from `last_acked`.
    /// - `session_id` unknown, or the resume point is ahead of the session: a
    ///   fresh session, and the StartResponse says why (never silent). It
    ///   stands in for `session_id` from then on: a retry of this Start
    ///   attaches to it with the same answer ([`crate::core::Table::start_session`]).
    pub fn start(
        &self,
        openid: &str,
        session_id: &str,
        last_acked: u64,
        attachment: Attachment,
        new_id: String,
    ) -> Started {
        let mut new_id = Some(new_id);
        let now = Instant::now();
        if !session_id.is_empty() {
            self.rebuild_recovered(openid, session_id, last_acked, &mut new_id);
        }
        let (entry, outcome, commands) = self.with_table(|t| {
            t.start_session(now, openid, session_id, last_acked, || {
                self.fresh_entry(openid, now, new_id.take())
            })
        });
        self.carry_out(commands);
        self.metrics
            .resumes
            .with_label_values(&[status_label(outcome.status)])
            .inc();
        replace_attachment(&entry, attachment);
        entry.wake.notify_one();
        Started { entry, outcome }
    }

    /// Frees `entry` if it is still the local session of its openid,
    /// counting its unacked pushes as lost for `reason`.
    pub fn remove(&self, entry: &Arc<SessionEntry>, reason: &'static str) {
        let commands = self.with_table(|t| t.remove(entry, reason));
        self.carry_out(commands);
    }

    /// Installs a session handed over by another node after our claim at
    /// `epoch` (or staged here by a draining node, or rebuilt from replicas),
    /// replacing an older local copy. Refused when a copy at a newer epoch is
    /// known here: an older state never replaces a newer one.
    pub fn install(
        &self,
        state: gatesvr_proto::session::SessionState,
        epoch: u64,
    ) -> Result<Arc<SessionEntry>, String> {
        self.install_as(state, epoch, Holding::Owned, None)
    }

    /// [`Registry::install`] with how it came here and the owner the view
    /// shows for it (a state older than that owner's epoch is refused).
    pub fn install_as(
        &self,
        state: gatesvr_proto::session::SessionState,
        epoch: u64,
        holding: Holding,
        view_owner: Option<(&str, u64)>,
    ) -> Result<Arc<SessionEntry>, String> {
        let now = Instant::now();
        let session =
            Session::import(state, now, self.config.clone()).map_err(|e| e.to_string())?;
        let entry = Arc::new(SessionEntry {
            identity: session.identity().clone(),
            state: Mutex::new(session),
            wake: Notify::new(),
            attached: Mutex::new(None),
        });
        let installed = self.with_table(|t| {
            t.install(entry.clone(), epoch, holding, view_owner)
                .map(|c| (c, entry.clone()))
                .or_else(|e| match e {
                    InstallError::AlreadyHere { .. } => t
                        .local(&entry.identity.openid)
                        .cloned()
                        .map(|here| (Vec::new(), here))
                        .ok_or(e),
                    other => Err(other),
                })
        });
        let (commands, entry) = installed.map_err(|e| e.to_string())?;
        self.carry_out(commands);
        self.settled.notify_waiters();
        Ok(entry)
    }

    /// Hands `openid`'s session to `new_owner`, which claimed it at `epoch`
    /// (`Peer.Handover`): the local copy (or the state kept after fencing)
    /// is exported and the slot becomes `Moved`; the client's connection is
    /// closed. `Ok(None)`: nothing to hand over here. Epoch 0 is refused.
    /// The stream of a handover to the asker at `epoch` broke before its
    /// end: the state is kept here (fenced, for the asker's retry) if the
    /// session did not move on since. Whether it was kept.
    pub fn handover_broken(
        &self,
        openid: &str,
        epoch: u64,
        state: gatesvr_proto::session::SessionState,
    ) -> bool {
        let now = Instant::now();
        self.with_table(|t| t.handover_broken(now, openid, epoch, state))
    }

    pub fn hand_over(
        &self,
        openid: &str,
        epoch: u64,
        new_owner: &str,
        close_client: bool,
    ) -> Result<Option<gatesvr_proto::session::SessionState>, HandoverError> {
        let now = Instant::now();
        let handed = self.with_table(|t| {
            t.hand_over(
                now,
                openid,
                HandoverAsk::Peer {
                    epoch,
                    new_owner: new_owner.to_string(),
                },
            )
        })?;
        let Some((state, handle)) = handed else {
            return Ok(None);
        };
        if close_client && let Some(entry) = handle {
            entry.close_connection(ErrorCode::SessionReplaced, "session moved to another node");
        }
        self.metrics
            .sessions_closed
            .with_label_values(&["moved"])
            .inc();
        Ok(Some(state))
    }

    /// A draining node exports `openid`'s session to stage it on
    /// `successor`. Pushes wait until [`Registry::staged`] or
    /// [`Registry::take_back`]; requests on the connection are no longer
    /// executed here. `None`: no local session.
    pub fn stage_out(
        &self,
        openid: &str,
        successor: &str,
    ) -> Option<gatesvr_proto::session::SessionState> {
        let now = Instant::now();
        let handed = self.with_table(|t| {
            t.hand_over(
                now,
                openid,
                HandoverAsk::Drain {
                    successor: successor.to_string(),
                },
            )
        });
        handed.ok().flatten().map(|(state, _)| state)
    }

    /// The successor holds the staged state (ownership at `epoch`).
    pub fn staged(&self, openid: &str, epoch: u64) {
        self.with_table(|t| t.staged(openid, epoch));
        self.metrics
            .sessions_closed
            .with_label_values(&["moved"])
            .inc();
        self.settled.notify_waiters();
    }

    /// Staging failed: `entry` is served here again, unless the view
    /// (`cluster`) shows it owned elsewhere at a newer epoch by now.
    pub fn take_back(&self, entry: &Arc<SessionEntry>, cluster: Option<&crate::cluster::Cluster>) {
        let now = Instant::now();
        let view_owner = cluster.and_then(|c| c.known_owner(&entry.identity.openid));
        let commands = self.with_table(|t| {
            t.take_back(
                now,
                entry.clone(),
                view_owner.as_ref().map(|(n, e)| (n.as_str(), *e)),
            )
        });
        self.carry_out(commands);
        self.settled.notify_waiters();
    }

    /// The view shows `owner` holding `openid` at `epoch` (watch delta or
    /// claim): an older local copy is fenced at once.
    pub fn owner_changed(&self, owner: &gatesvr_proto::control::SessionOwner) {
        let now = Instant::now();
        let commands = self
            .with_table(|t| t.owner_changed(now, &owner.openid, &owner.owner_node, owner.epoch));
        self.carry_out(commands);
        // A staged copy named by the view serves now: pushes waiting wake.
        self.settled.notify_waiters();
    }

    /// A Start attached `entry` under a claim at `epoch`; compared with the
    /// owner the view shows now (`cluster`), which may be newer.
    pub fn claimed(
        &self,
        entry: &Arc<SessionEntry>,
        epoch: u64,
        cluster: Option<&crate::cluster::Cluster>,
    ) {
        let now = Instant::now();
        let view_owner = cluster.and_then(|c| c.known_owner(&entry.identity.openid));
        let commands = self.with_table(|t| {
            t.claimed(
                now,
                entry,
                epoch,
                view_owner.as_ref().map(|(n, e)| (n.as_str(), *e)),
            )
        });
        self.carry_out(commands);
        self.settled.notify_waiters();
    }

    /// The whole view (snapshot, resync): every local session is compared
    /// with its owner in `owners`; nodes replace the table's members.
    pub fn view_changed(&self, view: &crate::cluster::View) {
        let now = Instant::now();
        let commands = self.with_table(|t| {
            t.members_mut().set(view.nodes.values());
            t.reconcile(now, |openid| {
                view.owners
                    .get(openid)
                    .map(|o| (o.owner_node.clone(), o.epoch))
            })
        });
        self.carry_out(commands);
        self.settled.notify_waiters();
    }

    /// Node liveness, standby, successors: asked of the table's members.
    pub fn members<R>(&self, f: impl FnOnce(&crate::core::Members) -> R) -> R {
        f(self.table.lock().members())
    }

    /// A call to `node_id` ended as `reach`: an unreachable node is not
    /// chosen as a standby before `until`, and one found down gets no
    /// Handover either ([`crate::core::Members::mark_unreachable`]). Calls
    /// waiting on it ([`Registry::until_down`]) learn it at once.
    pub fn mark_unreachable(&self, node_id: &str, reach: Reach, until: Instant) {
        self.table
            .lock()
            .members_mut()
            .mark_unreachable(node_id, reach, until);
        if reach == Reach::Down {
            self.went_down.notify_waiters();
        }
    }

    /// `node_id` answered a call: it is reachable again.
    pub fn peer_answered(&self, node_id: &str) {
        self.table.lock().members_mut().answered(node_id);
    }

    /// Whether nothing listened at `node_id` lately (a Handover is not sent).
    pub fn is_down(&self, node_id: &str) -> bool {
        self.members(|m| m.is_down(node_id, Instant::now()))
    }

    /// Resolves once `node_id` is found down. After a crash every client of
    /// the dead node reconnects at once and each Start asks the dead owner
    /// for a Handover: the calls queue behind one connection attempt each,
    /// and one refusal now answers all of them (`gate-bench failover`).
    pub async fn until_down(&self, node_id: &str) {
        loop {
            let notified = self.went_down.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_down(node_id) {
                return;
            }
            notified.await;
        }
    }

    /// Where a session that left went: (openid, node).
    pub fn moved_to(&self, openid_or_session: &str, by_session: bool) -> Option<(String, String)> {
        let target = if by_session {
            Target::Session(openid_or_session)
        } else {
            Target::Openid(openid_or_session)
        };
        self.table.lock().moved_to(target)
    }

    /// The answer to `Peer.FetchReplica` (a claimant gathers what is left of
    /// a gone owner's session): this node's `replica` joined with an unserved
    /// copy the table holds (a drain's staged copy whose transfer never
    /// committed, which stops taking pushes now; a fenced copy).
    pub fn answer_fetch_replica(
        &self,
        replica: gatesvr_proto::peer::FetchReplicaResponse,
        openid: &str,
        session_id: &str,
    ) -> gatesvr_proto::peer::FetchReplicaResponse {
        let now = Instant::now();
        let (copy, commands) = self.with_table(|t| t.copy_for_recovery(now, openid, session_id));
        self.carry_out(commands);
        crate::core::recovery::with_copy(replica, copy.as_ref())
    }

    /// The replicas of `openid`'s session (its owner is gone) as fetched by
    /// `peer::take_over`, for the Start that claimed it at `epoch`.
    pub fn stash_recovery(&self, openid: &str, recovery: crate::replica::Recovery, epoch: u64) {
        self.recovering
            .lock()
            .insert(openid.to_string(), (recovery, epoch));
    }

    /// `openid`'s session arrived here with pushes: its whole queue goes to
    /// this node's standby now (`replica::replicate_recovered`), not at its
    /// next durable push.
    pub fn copy_soon(&self, openid: &str) {
        self.to_replicate.lock().push(openid.to_string());
        self.recovered_wake.notify_one();
    }

    /// Sessions to copy to the standby ([`Registry::copy_soon`]) since the last call.
    pub fn take_recovered_to_replicate(&self) -> Vec<String> {
        std::mem::take(&mut *self.to_replicate.lock())
    }

    /// A Start resuming `session_id`, whose owner crashed, with replicas
    /// stashed: installs the rebuilt session (a new id, the durable pushes
    /// after `last_acked`) for the Start to attach to as RECOVERED.
    fn rebuild_recovered(
        &self,
        openid: &str,
        session_id: &str,
        last_acked: u64,
        new_id: &mut Option<String>,
    ) {
        // Whatever the stash holds for this openid is consumed now: a stash
        // for another session id is stale.
        let Some((recovery, epoch)) = self.recovering.lock().remove(openid) else {
            return;
        };
        if recovery.session_id != session_id {
            return;
        }
        let id = new_id.take().unwrap_or_else(new_session_id);
        let incomplete = recovery.incomplete;
        let (state, lost) = recovery.rebuild(openid, id.clone(), last_acked);
        let n = state.pushes.len() as u64;
        // The state says what it stands in for: held as recovered, or (a
        // recovery that missed a live node) as a fresh session whose client
        // is told SESSION_EXPIRED with the pushes found.
        match self.install_as(state, epoch, Holding::Owned, None) {
            Ok(_) => {
                self.metrics
                    .sessions_recovered
                    .with_label_values(&["recovered"])
                    .inc();
                self.metrics.durable_pushes_recovered.inc_by(n);
                if lost > 0 {
                    self.metrics
                        .pushes_lost
                        .with_label_values(&["owner_crashed"])
                        .inc_by(lost);
                }
                tracing::info!(openid, old = session_id, new = %id, durable = n, lost_non_durable = lost, incomplete, "session recovered from replicas");
                self.copy_soon(openid);
            }
            Err(e) => tracing::warn!(openid, error = %e, "recovered state rejected"),
        }
    }

    /// A Start is about to claim `openid` here: a staged copy serves
    /// nothing until the Start settles (`Table::claim_begins`), whatever
    /// lands between the claim's answer and [`Registry::begin_incoming`].
    pub fn claim_begins(&self, openid: &str) {
        self.with_table(|t| t.claim_begins(openid));
    }

    /// Marks `openid` as being fetched from another node: pushes wait.
    pub fn begin_incoming(&self, openid: &str) {
        let now = Instant::now();
        self.with_table(|t| t.begin_incoming(now, openid));
    }

    pub fn end_incoming(&self, openid: &str) {
        self.with_table(|t| t.end_incoming(openid));
        self.settled.notify_waiters();
    }

    /// Waits (bounded) while a push for `target` finds its session in
    /// transit (incoming, or being staged by a drain), then pushes.
    pub async fn push_settled(
        &self,
        target: Target<'_>,
        msg: impl Into<PushBody>,
        view_owner: Option<(&str, u64)>,
        limit: Duration,
    ) -> Result<PushReceipt, PushFailure> {
        // Encoded once: a retry below shares the same bytes.
        let msg: PushBody = msg.into();
        let give_up = tokio::time::Instant::now() + limit;
        loop {
            let settled = self.settled.notified();
            match self.push_to(target, msg.clone(), view_owner) {
                Err(PushFailure::InTransit) if tokio::time::Instant::now() < give_up => {
                    let _ = tokio::time::timeout_at(give_up, settled).await;
                }
                other => return other,
            }
        }
    }

    /// The connection `conn_id` ended; the session (if still bound to it)
    /// goes dormant and will expire after `session_timeout`.
    pub fn detach(&self, entry: &Arc<SessionEntry>, conn_id: u64) {
        let mut attached = entry.attached.lock();
        if attached.as_ref().is_some_and(|a| a.conn_id == conn_id) {
            *attached = None;
            drop(attached);
            let now = Instant::now();
            self.with_table(|t| t.detach(now, entry));
        }
    }

    /// The session's deadlines may have moved (it sent pushes): re-read them.
    pub fn rearm(&self, entry: &Arc<SessionEntry>) {
        self.with_table(|t| t.rearm(entry));
    }

    /// Classifies a client request on `entry`'s connection; a session no
    /// longer served here does not execute it (defect 2 of issue 12: its
    /// retry would run again on the successor).
    pub fn begin_request(&self, entry: &Arc<SessionEntry>, seq_id: u64) -> RequestOutcome {
        self.with_table(|t| t.begin_request(entry, seq_id))
    }

    /// Queues a push on `entry`'s session, if that session is still the one
    /// served here (checked under the table lock, so a handover cannot slip
    /// in between: defect 1 of issue 12).
    pub fn push(
        &self,
        entry: &Arc<SessionEntry>,
        msg: impl Into<PushBody>,
    ) -> Result<PushReceipt, PushFailure> {
        self.push_to(Target::Session(&entry.identity.session_id), msg, None)
    }

    /// Queues a push on `target`'s local session, comparing its epoch with
    /// `view_owner` first (a stale local copy is fenced, never pushed to).
    pub fn push_to(
        &self,
        target: Target<'_>,
        msg: impl Into<PushBody>,
        view_owner: Option<(&str, u64)>,
    ) -> Result<PushReceipt, PushFailure> {
        let msg: PushBody = msg.into();
        let now = Instant::now();
        let (outcome, commands) = self.with_table(|t| t.push(now, target, msg, view_owner));
        self.carry_out(commands);
        let id = match target {
            Target::Openid(o) | Target::Session(o) => o,
        };
        match outcome {
            PushOutcome::Queued { seq_id, handle } => {
                self.metrics.pushes.with_label_values(&["queued"]).inc();
                handle.wake.notify_one();
                Ok(PushReceipt {
                    seq_id,
                    entry: handle,
                })
            }
            PushOutcome::Refused { error, handle } => {
                let label = match error {
                    PushError::QueueFull { .. } => {
                        // Documented: a client that lets max_queue pushes
                        // pile up is disconnected; it resumes and catches up.
                        self.carry_out(vec![Command::Close {
                            handle,
                            code: ErrorCode::SlowConsumer,
                            reason: "push queue full: reconnect and resume",
                        }]);
                        "rejected_queue_full"
                    }
                    PushError::Expired => "rejected_expired",
                };
                self.metrics.pushes.with_label_values(&[label]).inc();
                Err(error.into())
            }
            PushOutcome::Forward { to } => Err(PushFailure::Moved(to)),
            PushOutcome::Wait => Err(PushFailure::InTransit),
            PushOutcome::Absent => Err(PushFailure::NoSession(id.to_string())),
        }
    }

    /// Queues one payload on each of `entries` (a broadcast), each only if
    /// it is still the session served here (as [`Registry::push`]), under
    /// one table lock per [`BROADCAST_RUN`] sessions, with one metrics update
    /// per run. Returns (queued, refused). A full queue closes its client
    /// with SLOW_CONSUMER, as for a single push.
    pub fn push_each(&self, entries: &[Arc<SessionEntry>], body: &PushBody) -> (u32, u32) {
        let (mut queued, mut refused) = (0u32, 0u32);
        for run in entries.chunks(BROADCAST_RUN) {
            let now = Instant::now();
            let mut commands = Vec::new();
            let mut woken = Vec::with_capacity(run.len());
            let (mut full, mut expired) = (0u64, 0u64);
            self.with_table(|t| {
                for entry in run {
                    let target = Target::Session(&entry.identity.session_id);
                    let (outcome, mut c) = t.push(now, target, body.clone(), None);
                    commands.append(&mut c);
                    match outcome {
                        PushOutcome::Queued { handle, .. } => woken.push(handle),
                        PushOutcome::Refused { error, handle } => {
                            if matches!(error, PushError::QueueFull { .. }) {
                                full += 1;
                                commands.push(Command::Close {
                                    handle,
                                    code: ErrorCode::SlowConsumer,
                                    reason: "push queue full: reconnect and resume",
                                });
                            } else {
                                expired += 1;
                            }
                        }
                        PushOutcome::Forward { .. } | PushOutcome::Wait | PushOutcome::Absent => {}
                    }
                }
            });
            self.carry_out(commands);
            for handle in &woken {
                handle.wake.notify_one();
            }
            queued += woken.len() as u32;
            refused += (run.len() - woken.len()) as u32;
            for (label, n) in [
                ("queued", woken.len() as u64),
                ("rejected_queue_full", full),
                ("rejected_expired", expired),
            ] {
                if n > 0 {
                    self.metrics.pushes.with_label_values(&[label]).inc_by(n);
                }
            }
        }
        (queued, refused)
    }

    /// Queues a run of pushes to local sessions (by openid) under one table
    /// lock, in order, and wakes each session's connection once: a batch
    /// costs one lock and one wake-up per session instead of one per push.
    /// Stops at the first push that is neither queued nor refused here (its
    /// session moved, is in transit, or is not here): the outcomes returned
    /// are those before it, and the caller takes the rest through
    /// [`Registry::push_settled`] (forwarding, waiting), in order.
    ///
    /// The bodies are moved into the queues, not cloned: a body queued once
    /// keeps its single owner (no shared header allocated for it, no reference
    /// count to move).
    pub fn push_run(&self, pushes: Vec<RunPush<'_>>) -> Vec<Result<PushReceipt, PushError>> {
        // The pushes of a run to one openid usually share its `&str` (the
        // gateway reads it once per run): equal without a `memcmp` call.
        let same_str = |a: &str, b: &str| std::ptr::eq(a, b) || a == b;
        let now = Instant::now();
        let mut results = Vec::with_capacity(pushes.len());
        let mut commands = Vec::new();
        self.with_table(|t| {
            // Sized for the longest run: grown push by push it was
            // reallocated four times on the way to a run of 64.
            let mut outcomes = Vec::with_capacity(pushes.len());
            let mut pushes = pushes.into_iter();
            'run: while let Some(first) = pushes.next() {
                let (openid, view_owner) = (first.openid, first.view_owner);
                // The run is found by reading ahead in place, and a push
                // alone takes `Table::push` directly: a first version that
                // sent every push through `push_many` and a `Peekable` cost
                // spread pushes ~240 instructions each (callgrind, session 22).
                let same = pushes
                    .as_slice()
                    .iter()
                    .take_while(|p| same_str(p.openid, openid) && p.view_owner == view_owner)
                    .count();
                if same == 0 {
                    let (outcome, mut c) =
                        t.push(now, Target::Openid(openid), first.body, view_owner);
                    commands.append(&mut c);
                    match receipt(outcome, &mut commands) {
                        Some(r) => results.push(r),
                        None => break,
                    }
                    continue;
                }
                // Consecutive pushes to one session (a batch to one user)
                // share its lookup and lock.
                let same = pushes.by_ref().take(same).map(|p| p.body);
                let bodies = std::iter::once(first.body).chain(same);
                let mut c = t.push_many(
                    now,
                    Target::Openid(openid),
                    bodies,
                    view_owner,
                    &mut outcomes,
                );
                commands.append(&mut c);
                for outcome in outcomes.drain(..) {
                    match receipt(outcome, &mut commands) {
                        Some(r) => results.push(r),
                        None => break 'run,
                    }
                }
            }
        });
        self.carry_out(commands);
        // One wake-up per session of the run: a second `notify_one` after the
        // first woke the task would make it run once more for nothing.
        // Sorted pointers, not a hash set: a run is at most a few dozen
        // pushes, and hashing each was ~3% of a batched push's instructions.
        let mut woken: Vec<&Arc<SessionEntry>> = Vec::with_capacity(results.len());
        let (mut queued, mut full, mut expired) = (0, 0, 0);
        for r in &results {
            match r {
                Ok(receipt) => {
                    queued += 1;
                    woken.push(&receipt.entry);
                }
                Err(PushError::QueueFull { .. }) => full += 1,
                Err(PushError::Expired) => expired += 1,
            }
        }
        woken.sort_unstable_by_key(|entry| Arc::as_ptr(entry));
        woken.dedup_by_key(|entry| Arc::as_ptr(entry));
        for entry in woken {
            entry.wake.notify_one();
        }
        for (label, n) in [
            ("queued", queued),
            ("rejected_queue_full", full),
            ("rejected_expired", expired),
        ] {
            if n > 0 {
                self.metrics.pushes.with_label_values(&[label]).inc_by(n);
            }
        }
        results
    }

    /// Stores a request's answer and sends it to the attached connection.
    pub async fn complete_request(&self, entry: &Arc<SessionEntry>, response: ClientResponse) {
        let seq = response.seq_id;
        entry.state.lock().complete_request(seq, response.clone());
        entry
            .send_control(Envelope {
                body: Some(gatesvr_proto::client::envelope::Body::Response(response)),
            })
            .await;
    }

    /// Acts on every deadline due at `now` (retransmits, ack timeouts,
    /// expiry, forgetting moved and fenced sessions). Returns the next one.
    pub fn tick(&self, now: Instant) -> Option<Instant> {
        let (commands, next) = self.with_table(|t| {
            let c = t.tick(now);
            (c, t.poll_timeout())
        });
        self.carry_out(commands);
        next
    }

    /// Unacked pushes over every local session (the queue-size gauge).
    pub fn queued(&self) -> u64 {
        self.all()
            .iter()
            .map(|e| e.state.lock().stats().unacked)
            .sum()
    }

    /// Sessions per zone (for /stats and GetStatus).
    pub fn per_zone(&self) -> std::collections::BTreeMap<String, u64> {
        let mut map = std::collections::BTreeMap::new();
        for entry in self.all() {
            *map.entry(entry.identity.zone.clone()).or_insert(0) += 1;
        }
        map
    }

    pub fn connected(&self) -> u64 {
        self.all()
            .iter()
            .filter(|e| e.attached.lock().is_some())
            .count() as u64
    }
}

/// Runs the table's timers until `stop`: sleeps until the next deadline
/// ([`Table::poll_timeout`]), or until an earlier one appears.
pub async fn run_timers(registry: &Registry, stop: tokio_util::sync::CancellationToken) {
    let idle = Duration::from_secs(1);
    let mut next: Option<Instant> = None;
    loop {
        let wait = next
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or(idle)
            .min(idle);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = registry.timer_wake.notified() => {}
            () = stop.cancelled() => return,
        }
        next = registry.tick(Instant::now());
    }
}

#[cfg(test)]
mod tests;
