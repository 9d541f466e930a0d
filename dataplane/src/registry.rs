//! The node's sessions: lookup by openid and session id, start / resume /
//! replace, pushes, and the timer sweep that drives retransmits and expiry.
//!
//! Each session is a [`SessionEntry`]: the sans-IO [`Session`] behind a mutex,
//! the connection currently attached to it (if any), and a [`Notify`] that
//! wakes that connection's task when there is something to send.
//!
//! ```text
//!  GatewayService.PushToClient ─┐
//!  ClientAck / ClientRequest ───┼─> SessionEntry { Mutex<Session>, attached conn } ──wake──> connection task
//!  sweep (timers) ──────────────┘
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gatesvr_proto::client::{ClientResponse, Envelope, ErrorCode, ResumeStatus};
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};

use crate::metrics::{Metrics, code_label};
use crate::session::{
    PushError, PushMessage, ResumeOutcome, Session, SessionConfig, SessionEvent, SessionIdentity,
};

/// A connection bound to a session.
#[derive(Clone)]
pub struct Attachment {
    /// Unique per connection on this node.
    pub conn_id: u64,
    pub connection: crate::transport::ConnectionHandle,
    /// Frames other than pushes (responses, heartbeats) for the writer,
    /// already encoded: a channel block holds 32 slots, and an `Envelope` is
    /// 136 bytes where `Bytes` is 32, on every idle connection.
    pub control: mpsc::Sender<bytes::Bytes>,
}

pub struct SessionEntry {
    pub identity: SessionIdentity,
    pub state: Mutex<Session>,
    /// Wakes the attached connection's task (pushes ready to send).
    pub wake: Notify,
    pub attached: Mutex<Option<Attachment>>,
    /// Set (under the `state` lock) once the session's state left this node:
    /// pushes that found the entry just before must go elsewhere too.
    pub moved: std::sync::atomic::AtomicBool,
}

impl SessionEntry {
    /// Sends a non-push frame to whichever connection is attached now. A
    /// request's answer goes to the current connection even if the request
    /// arrived on an earlier one; with none attached it stays cached in the
    /// session for the client's retry.
    pub async fn send_control(&self, frame: Envelope) {
        let tx = self.attached.lock().as_ref().map(|a| a.control.clone());
        if let Some(tx) = tx {
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
                .close(quinn::VarInt::from_u32(code as u32), reason.as_bytes());
        }
    }
}

/// Why a push could not be queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PushFailure {
    #[error("no session for {0}")]
    NoSession(String),
    #[error(transparent)]
    Refused(#[from] PushError),
}

/// Where a push landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReceipt {
    pub seq_id: u64,
    pub session_id: String,
}

pub struct Registry {
    by_openid: Mutex<HashMap<String, Arc<SessionEntry>>>,
    /// session id -> openid.
    by_session: Mutex<HashMap<String, String>>,
    config: SessionConfig,
    zone_count: u32,
    metrics: Metrics,
    next_conn_id: AtomicU64,
    /// Sessions handed to another node recently: openid -> (node, when). Pushes
    /// that still arrive here are forwarded there.
    moved: Mutex<HashMap<String, (String, Instant)>>,
    /// session id -> openid for `moved`.
    moved_sessions: Mutex<HashMap<String, String>>,
    /// Sessions being fetched from their previous owner: pushes wait for them.
    incoming: Mutex<HashMap<String, Arc<Notify>>>,
    /// State of sessions fenced by the watch before their new owner asked
    /// for them: a late Handover still gets it.
    fenced: Mutex<HashMap<String, (gatesvr_proto::session::SessionState, Instant)>>,
    /// Sessions rebuilt from a replica after their owner crashed: openid ->
    /// (the old session id the client resumes with, the new session id); see
    /// `replica::recover`. Kept until the session ends, so a client that lost
    /// the StartResponse and retries with the old id gets RECOVERED again.
    recovered: Mutex<HashMap<String, (String, String)>>,
    /// Replicas fetched for a Start whose session's owner is gone: openid ->
    /// (what they hold, the claim's epoch); consumed by that Start.
    recovering: Mutex<HashMap<String, (crate::replica::Recovery, u64)>>,
    /// Sessions rebuilt from a replica whose queue must be copied to this
    /// node's standby; `recovered_wake` tells the replica task.
    to_replicate: Mutex<Vec<String>>,
    pub recovered_wake: Notify,
}

/// How long a moved session's forwarding address is remembered.
const MOVED_TTL: Duration = Duration::from_secs(120);

/// Why a handover was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandoverError {
    /// This node holds the session at an equal or newer epoch: the caller's
    /// claim is stale (fencing).
    #[error("session held here at epoch {held}, not older than {asked}")]
    Fenced { held: u64, asked: u64 },
}

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

impl Registry {
    pub fn new(config: SessionConfig, zone_count: u32, metrics: Metrics) -> Self {
        Self {
            by_openid: Mutex::new(HashMap::new()),
            by_session: Mutex::new(HashMap::new()),
            config,
            zone_count,
            metrics,
            next_conn_id: AtomicU64::new(1),
            moved: Mutex::new(HashMap::new()),
            moved_sessions: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            fenced: Mutex::new(HashMap::new()),
            recovered: Mutex::new(HashMap::new()),
            recovering: Mutex::new(HashMap::new()),
            to_replicate: Mutex::new(Vec::new()),
            recovered_wake: Notify::new(),
        }
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.by_openid.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, openid: &str) -> Option<Arc<SessionEntry>> {
        self.by_openid.lock().get(openid).cloned()
    }

    pub fn get_by_session(&self, session_id: &str) -> Option<Arc<SessionEntry>> {
        let openid = self.by_session.lock().get(session_id).cloned()?;
        self.get(&openid)
    }

    /// Every session (a snapshot of handles; sessions may end meanwhile).
    pub fn all(&self) -> Vec<Arc<SessionEntry>> {
        self.by_openid.lock().values().cloned().collect()
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
            moved: Default::default(),
        })
    }

    /// Starts or resumes `openid`'s session on a new connection.
    ///
    /// - `session_id` empty: a new session; any previous one of this openid is
    ///   replaced and its unacked pushes discarded (counted as lost, reason
    ///   `replaced`): the client asked for a fresh start.
    /// - `session_id` matching: resume from `last_acked`.
    /// - `session_id` unknown, or the resume point is ahead of the session: a
    ///   fresh session, and the StartResponse says why (never silent).
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
        let existing = self.get(openid);
        // The session was rebuilt from a replica under a new id: attach to it
        // and say RECOVERED (the client's seqs start over).
        let recovered = !session_id.is_empty()
            && existing.as_ref().is_some_and(|e| {
                self.recovered.lock().get(openid)
                    == Some(&(session_id.to_string(), e.identity.session_id.clone()))
            });
        if recovered && let Some(entry) = existing.clone() {
            let mut outcome = entry.state.lock().attach(now, 0);
            outcome.status = ResumeStatus::Recovered;
            self.metrics.resumes.with_label_values(&["recovered"]).inc();
            if let Some(old) = entry.attached.lock().replace(attachment) {
                old.connection.close(
                    quinn::VarInt::from_u32(ErrorCode::SessionReplaced as u32),
                    b"session resumed on another connection",
                );
            }
            entry.wake.notify_one();
            return Started { entry, outcome };
        }
        let mut reported: Option<ResumeStatus> = None;
        let entry = match existing {
            Some(entry) if !session_id.is_empty() && entry.identity.session_id == session_id => {
                let outcome = entry.state.lock().attach(now, last_acked);
                match outcome.status {
                    ResumeStatus::SeqAhead | ResumeStatus::SessionExpired => {
                        reported = Some(outcome.status);
                        self.replace(&entry, now, "resume_failed", new_id.take())
                    }
                    _ => {
                        self.metrics
                            .resumes
                            .with_label_values(&[status_label(outcome.status)])
                            .inc();
                        if let Some(old) = entry.attached.lock().replace(attachment) {
                            old.connection.close(
                                quinn::VarInt::from_u32(ErrorCode::SessionReplaced as u32),
                                b"session resumed on another connection",
                            );
                        }
                        entry.wake.notify_one();
                        return Started { entry, outcome };
                    }
                }
            }
            Some(entry) => {
                if !session_id.is_empty() {
                    reported = Some(ResumeStatus::SessionExpired);
                }
                self.replace(&entry, now, "replaced", new_id.take())
            }
            None => {
                if !session_id.is_empty() {
                    reported = Some(ResumeStatus::SessionExpired);
                }
                let entry = self.fresh_entry(openid, now, new_id.take());
                self.insert(&entry);
                entry
            }
        };
        let mut outcome = entry.state.lock().attach(now, 0);
        if let Some(status) = reported {
            outcome.status = status;
        }
        self.metrics
            .resumes
            .with_label_values(&[status_label(outcome.status)])
            .inc();
        *entry.attached.lock() = Some(attachment);
        Started { entry, outcome }
    }

    fn insert(&self, entry: &Arc<SessionEntry>) {
        self.by_session.lock().insert(
            entry.identity.session_id.clone(),
            entry.identity.openid.clone(),
        );
        self.by_openid
            .lock()
            .insert(entry.identity.openid.clone(), entry.clone());
        self.metrics.sessions.inc();
    }

    /// Ends `old` and installs a fresh session for the same openid.
    fn replace(
        &self,
        old: &Arc<SessionEntry>,
        now: Instant,
        reason: &str,
        id: Option<String>,
    ) -> Arc<SessionEntry> {
        old.close_connection(
            ErrorCode::SessionReplaced,
            "session replaced by a new start",
        );
        self.remove(old, reason);
        let entry = self.fresh_entry(&old.identity.openid, now, id);
        self.insert(&entry);
        entry
    }

    /// Frees `entry` if it is still the registered session of its openid,
    /// counting its unacked pushes as lost for `reason`.
    pub fn remove(&self, entry: &Arc<SessionEntry>, reason: &str) {
        let removed = {
            let mut map = self.by_openid.lock();
            match map.get(&entry.identity.openid) {
                Some(current) if Arc::ptr_eq(current, entry) => {
                    map.remove(&entry.identity.openid);
                    true
                }
                _ => false,
            }
        };
        if !removed {
            return;
        }
        self.by_session.lock().remove(&entry.identity.session_id);
        self.recovered.lock().remove(&entry.identity.openid);
        self.metrics.sessions.dec();
        self.metrics
            .sessions_closed
            .with_label_values(&[reason])
            .inc();
        let unacked = entry.state.lock().stats().unacked;
        if unacked > 0 {
            self.metrics
                .pushes_lost
                .with_label_values(&[reason])
                .inc_by(unacked);
        }
    }

    /// Installs a session handed over by another node (or staged on this one
    /// by a draining node), replacing any local copy of the openid.
    pub fn install(
        &self,
        state: gatesvr_proto::session::SessionState,
        epoch: u64,
    ) -> Result<Arc<SessionEntry>, String> {
        let now = Instant::now();
        let mut session =
            Session::import(state, now, self.config.clone()).map_err(|e| e.to_string())?;
        session.set_epoch(epoch);
        let identity = session.identity().clone();
        if let Some(old) = self.get(&identity.openid) {
            old.close_connection(
                ErrorCode::SessionReplaced,
                "session replaced by a newer copy",
            );
            self.remove_quietly(&old);
        }
        let entry = Arc::new(SessionEntry {
            identity,
            state: Mutex::new(session),
            wake: Notify::new(),
            attached: Mutex::new(None),
            moved: Default::default(),
        });
        self.insert(&entry);
        self.moved.lock().remove(&entry.identity.openid);
        Ok(entry)
    }

    /// Hands `openid`'s session to `new_owner`, which claimed it at `epoch`:
    /// fences the local copy (closes its connection, stops delivering),
    /// exports its state and forgets it. `Ok(None)`: no local copy.
    ///
    /// With `close_client` false (drain) the connection stays open so the
    /// caller can send a GoAway first.
    pub fn hand_over(
        &self,
        openid: &str,
        epoch: u64,
        new_owner: &str,
        close_client: bool,
    ) -> Result<Option<gatesvr_proto::session::SessionState>, HandoverError> {
        let Some(entry) = self.get(openid) else {
            // Fenced already by the watch: hand over what it held.
            let fenced = self.fenced.lock().remove(openid);
            return Ok(fenced
                .map(|(state, _)| state)
                .filter(|s| s.epoch < epoch || epoch == 0));
        };
        let state = {
            let session = entry.state.lock();
            if session.epoch() >= epoch && epoch != 0 {
                return Err(HandoverError::Fenced {
                    held: session.epoch(),
                    asked: epoch,
                });
            }
            // Exported under the lock: every push accepted before this point
            // is in the state; later ones see `moved` (or miss the entry) and
            // follow the forwarding address recorded here.
            let state = session.export();
            entry.moved.store(true, Ordering::SeqCst);
            self.remember_moved(&entry, new_owner);
            self.remove_quietly(&entry);
            state
        };
        if close_client {
            entry.close_connection(ErrorCode::SessionReplaced, "session moved to another node");
        }
        self.metrics
            .sessions_closed
            .with_label_values(&["moved"])
            .inc();
        Ok(Some(state))
    }

    /// The watch shows `owner` holding a session at a newer epoch than our
    /// copy: drop ours (single owner). Its pushes are the new owner's now.
    pub fn fence(&self, owner: &gatesvr_proto::control::SessionOwner) {
        let Some(entry) = self.get(&owner.openid) else {
            return;
        };
        let state = {
            let session = entry.state.lock();
            let stale = session.epoch() < owner.epoch;
            if stale {
                entry.moved.store(true, Ordering::SeqCst);
            }
            stale.then(|| session.export())
        };
        if let Some(state) = state {
            tracing::info!(openid = %owner.openid, owner = %owner.owner_node, epoch = owner.epoch, "fenced: session owned elsewhere");
            self.fenced
                .lock()
                .insert(owner.openid.clone(), (state, Instant::now()));
            self.remember_moved(&entry, &owner.owner_node);
            entry.close_connection(ErrorCode::SessionReplaced, "session owned by another node");
            self.remove_quietly(&entry);
            self.metrics
                .sessions_closed
                .with_label_values(&["fenced"])
                .inc();
        }
    }

    fn remember_moved(&self, entry: &Arc<SessionEntry>, node: &str) {
        self.moved.lock().insert(
            entry.identity.openid.clone(),
            (node.to_string(), Instant::now()),
        );
        self.moved_sessions.lock().insert(
            entry.identity.session_id.clone(),
            entry.identity.openid.clone(),
        );
    }

    /// Where a recently moved session went: (openid, node).
    pub fn moved_to(&self, openid_or_session: &str, by_session: bool) -> Option<(String, String)> {
        let openid = if by_session {
            self.moved_sessions.lock().get(openid_or_session).cloned()?
        } else {
            openid_or_session.to_string()
        };
        let node = self.moved.lock().get(&openid).map(|(n, _)| n.clone())?;
        Some((openid, node))
    }

    /// `openid`'s session `old_session_id` was rebuilt from a replica under a
    /// new id: the client's next Start with the old id attaches to it.
    pub fn mark_recovered(&self, openid: &str, old_session_id: &str, new_session_id: &str) {
        self.recovered.lock().insert(
            openid.to_string(),
            (old_session_id.to_string(), new_session_id.to_string()),
        );
    }

    /// The replicas of `openid`'s session (its owner is gone) as fetched by
    /// `peer::take_over`, for the Start that claimed it at `epoch`.
    pub fn stash_recovery(&self, openid: &str, recovery: crate::replica::Recovery, epoch: u64) {
        self.recovering
            .lock()
            .insert(openid.to_string(), (recovery, epoch));
    }

    /// Sessions rebuilt from a replica since the last call.
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
        let stashed = {
            let mut stash = self.recovering.lock();
            match stash.get(openid) {
                Some((r, _)) if r.session_id == session_id => stash.remove(openid),
                _ => None,
            }
        };
        let Some((recovery, epoch)) = stashed else {
            return;
        };
        let id = new_id.take().unwrap_or_else(new_session_id);
        let (state, lost) = recovery.rebuild(openid, id.clone(), last_acked);
        let n = state.pushes.len() as u64;
        match self.install(state, epoch) {
            Ok(_) => {
                self.mark_recovered(openid, session_id, &id);
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
                tracing::info!(openid, old = session_id, new = %id, durable = n, lost_non_durable = lost, "session recovered from replicas");
                self.to_replicate.lock().push(openid.to_string());
                self.recovered_wake.notify_one();
            }
            Err(e) => tracing::warn!(openid, error = %e, "recovered state rejected"),
        }
    }

    /// Marks `openid` as being fetched from another node.
    pub fn begin_incoming(&self, openid: &str) {
        self.incoming
            .lock()
            .entry(openid.to_string())
            .or_insert_with(|| Arc::new(Notify::new()));
    }

    pub fn end_incoming(&self, openid: &str) {
        if let Some(n) = self.incoming.lock().remove(openid) {
            n.notify_waiters();
        }
    }

    /// Waits (bounded) for a session being fetched, then returns it.
    pub async fn wait_incoming(&self, openid: &str, limit: Duration) -> Option<Arc<SessionEntry>> {
        let notify = self.incoming.lock().get(openid).cloned();
        if let Some(notify) = notify {
            let notified = notify.notified();
            // Re-check after registering interest, so a completion in between is not missed.
            if self.incoming.lock().contains_key(openid) {
                let _ = tokio::time::timeout(limit, notified).await;
            }
        }
        self.get(openid)
    }

    /// Removes without counting pushes as lost (they moved with the state).
    fn remove_quietly(&self, entry: &Arc<SessionEntry>) {
        let removed = {
            let mut map = self.by_openid.lock();
            match map.get(&entry.identity.openid) {
                Some(current) if Arc::ptr_eq(current, entry) => {
                    map.remove(&entry.identity.openid);
                    true
                }
                _ => false,
            }
        };
        if removed {
            self.by_session.lock().remove(&entry.identity.session_id);
            self.metrics.sessions.dec();
        }
    }

    /// The connection `conn_id` ended; the session (if still bound to it)
    /// goes dormant and will expire after `session_timeout`.
    pub fn detach(&self, entry: &Arc<SessionEntry>, conn_id: u64) {
        let mut attached = entry.attached.lock();
        if attached.as_ref().is_some_and(|a| a.conn_id == conn_id) {
            *attached = None;
            drop(attached);
            let mut state = entry.state.lock();
            if state.is_attached() {
                state.detach(Instant::now());
            }
        }
    }

    /// Queues a push on `openid`'s (or, by session id, that) session.
    pub fn push(
        &self,
        entry: &Arc<SessionEntry>,
        msg: PushMessage,
    ) -> Result<PushReceipt, PushFailure> {
        let result = entry.state.lock().push(Instant::now(), msg);
        match result {
            Ok(seq_id) => {
                self.metrics.pushes.with_label_values(&["queued"]).inc();
                entry.wake.notify_one();
                Ok(PushReceipt {
                    seq_id,
                    session_id: entry.identity.session_id.clone(),
                })
            }
            Err(err) => {
                let label = match err {
                    PushError::QueueFull { .. } => {
                        // Documented: a client that lets max_queue pushes
                        // pile up is disconnected; it resumes and catches up.
                        entry.close_connection(
                            ErrorCode::SlowConsumer,
                            "push queue full: reconnect and resume",
                        );
                        self.metrics
                            .connections_closed
                            .with_label_values(&[&code_label(ErrorCode::SlowConsumer)])
                            .inc();
                        "rejected_queue_full"
                    }
                    PushError::Expired => "rejected_expired",
                };
                self.metrics.pushes.with_label_values(&[label]).inc();
                Err(err.into())
            }
        }
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

    /// Runs due timers of every session: retransmits, ack timeouts, expiry.
    /// Also refreshes the queue-size gauge.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut queued = 0u64;
        for entry in self.all() {
            let event = {
                let mut state = entry.state.lock();
                let due = state.poll_timeout().is_some_and(|t| t <= now);
                let event = if due { state.handle_timeout(now) } else { None };
                queued += state.stats().unacked;
                event
            };
            match event {
                Some(SessionEvent::Retransmit { .. }) => entry.wake.notify_one(),
                Some(SessionEvent::AckTimeout { .. }) => {
                    entry.close_connection(
                        ErrorCode::AckTimeout,
                        "pushes unacknowledged after max_retries: reconnect and resume",
                    );
                    self.metrics
                        .connections_closed
                        .with_label_values(&[&code_label(ErrorCode::AckTimeout)])
                        .inc();
                }
                Some(SessionEvent::Expired { .. }) => self.remove(&entry, "expired"),
                None => {}
            }
        }
        self.metrics.message_queue_size.set(queued as i64);
        let mut moved = self.moved.lock();
        moved.retain(|_, (_, at)| now.duration_since(*at) < MOVED_TTL);
        let live: std::collections::HashSet<String> = moved.keys().cloned().collect();
        drop(moved);
        self.moved_sessions
            .lock()
            .retain(|_, openid| live.contains(openid));
    }

    /// How often [`Registry::sweep`] should run for timers to fire promptly.
    pub fn sweep_interval(&self) -> Duration {
        let finest = self.config.ack_timeout.min(self.config.session_timeout) / 4;
        finest.clamp(Duration::from_millis(10), Duration::from_secs(1))
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
