//! [`Table`]: the events a node's session table takes and the commands it
//! gives back.
//!
//! The table is generic over the handle `H` of a local session
//! ([`SessionCell`]): the data plane's shell uses its registry entries (a
//! session behind a mutex plus the attached connection), the simulation uses
//! plain cells. Either way the rules here run the real
//! [`Session`](crate::session::Session) state machine: a push is queued, a
//! state exported, a request classified by the same code in production and
//! under simulation.
//!
//! Exclusive access (`&mut self`) is what makes "export, then stop taking
//! pushes" atomic: a push either lands before the export (and is in the
//! exported state) or finds the slot `Moved` and is forwarded.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use gatesvr_proto::client::{ErrorCode, ResumeStatus, ServerPush};
use gatesvr_proto::session::SessionState;

use super::members::Members;
use super::slot::{Holding, Slot};
use crate::session::{
    AckError, AckOutcome, PushError, RequestDisposition, ResumeOutcome, Session, SessionEvent,
    SessionIdentity,
};

/// A handle on one local session, as the shell holds it.
pub trait SessionCell: Clone {
    /// Who the session belongs to (fixed for its lifetime).
    fn identity(&self) -> &SessionIdentity;
    /// Runs `f` on the session, exclusively.
    fn with<R>(&self, f: impl FnOnce(&mut Session) -> R) -> R;
    /// The same session object (not an equal copy).
    fn same(&self, other: &Self) -> bool;
}

/// How long the table remembers sessions that left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableConfig {
    /// A moved session's forwarding address is kept this long.
    pub moved_ttl: Duration,
    /// A fenced session's state is kept this long for a late Handover.
    pub fenced_ttl: Duration,
    /// Pushes wait at most this long for a session being fetched.
    pub incoming_ttl: Duration,
    /// A state handed over to a claimant is kept this long for a retry of
    /// its Handover (`Slot::Moved::copy`): longer than a claimant keeps
    /// asking (`cluster::peer::RECOVERY_PATIENCE`, 10 s) plus one call.
    pub handover_copy_ttl: Duration,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            moved_ttl: Duration::from_secs(120),
            fenced_ttl: Duration::from_secs(60),
            incoming_ttl: Duration::from_secs(10),
            handover_copy_ttl: Duration::from_secs(15),
        }
    }
}

/// What the shell must do.
#[derive(Debug)]
pub enum Command<H> {
    /// The session has pushes to send: wake its connection's writer.
    Wake(H),
    /// Close the connection attached to this session (if any) with `code`.
    Close {
        handle: H,
        code: ErrorCode,
        reason: &'static str,
    },
    /// A local session ended here for `reason`; `lost` pushes were never
    /// acked and went nowhere (0 when its state moved on).
    Removed {
        openid: String,
        session_id: String,
        epoch: u64,
        reason: &'static str,
        lost: u64,
    },
}

/// Who asks for a session's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoverAsk {
    /// Another node claimed the session at `epoch` (`Peer.Handover`).
    Peer { epoch: u64, new_owner: String },
    /// This node is draining and stages the session on `successor`; the
    /// export is settled by [`Table::staged`] or undone by [`Table::take_back`].
    Drain { successor: String },
}

/// Why a handover was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HandoverError {
    /// This node holds the session at an equal or newer epoch: the caller's
    /// claim is stale (fencing). Retrying with the same claim cannot help.
    #[error("session held here at epoch {held}, not older than {asked}")]
    Fenced { held: u64, asked: u64 },
    /// A peer asked without a claim epoch: nothing to fence against, refused.
    #[error("a handover needs the claim's epoch (got 0)")]
    NoEpoch,
}

/// Why a state could not be installed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum InstallError {
    /// A copy at a newer epoch is known (here, or as the owner in the view):
    /// the offered state is stale and would be a second live copy.
    #[error("state at epoch {offered} is older than the copy at epoch {held}")]
    Stale { held: u64, offered: u64 },
    /// The same session at the same epoch is already staged here (a
    /// duplicated Stage): installing it again would drop the pushes queued
    /// since. The local copy stays; nothing to do.
    #[error("session already here at epoch {epoch}")]
    AlreadyHere { epoch: u64 },
}

/// Where a push went.
#[derive(Debug)]
pub enum PushOutcome<H> {
    /// Queued on the local session as `seq_id` (the session is woken). The
    /// session's id is `handle.identity().session_id`.
    Queued { seq_id: u64, handle: H },
    /// The local session refused it (queue full: the shell disconnects the
    /// client as a slow consumer; expired).
    Refused { error: PushError, handle: H },
    /// The session is on `to` (moved, fenced, or owned there by the view).
    Forward { to: String },
    /// The session is on its way here or out of here: ask again shortly.
    Wait,
    /// Not known here.
    Absent,
}

/// What to do with a client request on a connection's session.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestOutcome {
    /// The session is served here: the session's own decision.
    Here(RequestDisposition),
    /// The connection's session is no longer served here (moved or fenced):
    /// the request is not executed; the client retries after reconnecting.
    NotHere,
}

/// A push's target.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Openid(&'a str),
    Session(&'a str),
}

/// The table's maps: keyed by openids and session ids (issued by the auth
/// service and this node), hashed with foldhash, seeded at random per map.
/// std's SipHash cost ~180 instructions per push (one lookup of its openid).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The node's session table. See the module docs of [`crate::core`].
#[derive(Debug)]
pub struct Table<H> {
    cfg: TableConfig,
    slots: Map<String, Slot<H>>,
    /// session id -> openid, for local, moved and fenced slots.
    by_session: Map<String, String>,
    /// Deadlines, earliest first: (when, openid). One per openid.
    timers: BTreeSet<(Instant, String)>,
    armed: Map<String, Instant>,
    members: Members,
    locals: usize,
    /// Openids with a staged copy here whose Start (claim, then Handover)
    /// is in flight: the copy takes no push until the Handover settles
    /// which state is the session's (the view naming this node is then our
    /// own claim, not a committed transfer).
    claiming: std::collections::HashSet<String>,
}

impl<H: SessionCell> Table<H> {
    pub fn new(me: impl Into<String>, cfg: TableConfig) -> Self {
        Self {
            cfg,
            slots: Map::default(),
            by_session: Map::default(),
            timers: BTreeSet::new(),
            armed: Map::default(),
            members: Members::new(me),
            locals: 0,
            claiming: std::collections::HashSet::new(),
        }
    }

    pub fn members(&self) -> &Members {
        &self.members
    }

    pub fn members_mut(&mut self) -> &mut Members {
        &mut self.members
    }

    fn me(&self) -> &str {
        self.members.me()
    }

    /// Sessions served here.
    pub fn local_count(&self) -> usize {
        self.locals
    }

    /// Every slot (local or not).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn slot(&self, openid: &str) -> Option<&Slot<H>> {
        self.slots.get(openid)
    }

    /// The local session of `openid`.
    pub fn local(&self, openid: &str) -> Option<&H> {
        match self.slots.get(openid) {
            Some(Slot::Local { handle, .. }) => Some(handle),
            _ => None,
        }
    }

    /// The openid of session `session_id` (local, moved or fenced here).
    pub fn openid_of(&self, session_id: &str) -> Option<&str> {
        self.by_session.get(session_id).map(String::as_str)
    }

    /// Whether session `session_id` of `openid` is served here: then a Start
    /// resuming it needs no recovery from replicas, whose copy is never newer
    /// than this one. A staged copy the view never named is not enough: its
    /// drainer may have taken the session back and served it since (a late
    /// Stage); a recovery joins it with the replicas instead
    /// ([`Table::copy_for_recovery`]).
    pub fn holds(&self, openid: &str, session_id: &str) -> bool {
        matches!(
            self.slots.get(openid),
            Some(Slot::Local { handle, holding }) if handle.identity().session_id == session_id
                && !matches!(holding, Holding::Staged { .. })
        )
    }

    /// Whether this node has any slot for `openid`: served, staged, moved
    /// or fenced here.
    pub fn knows(&self, openid: &str) -> bool {
        self.slots.contains_key(openid)
    }

    /// Every local session.
    pub fn locals(&self) -> impl Iterator<Item = &H> {
        self.slots.values().filter_map(|s| match s {
            Slot::Local { handle, .. } => Some(handle),
            _ => None,
        })
    }

    /// Whether `handle` is the session served here for its openid.
    pub fn is_current(&self, handle: &H) -> bool {
        self.local(&handle.identity().openid)
            .is_some_and(|h| h.same(handle))
    }

    /// The states of sessions fenced here that still wait for their new
    /// owner's Handover, with that owner. A leaving node keeps them as
    /// replicas, which it hands over before it goes: the fenced copy may be
    /// the last one of what it acknowledged (simulation seed 475: the
    /// claimant's Handover was lost and the claimant crashed).
    pub fn fenced_states(&self) -> Vec<(&SessionState, &str)> {
        let mut out: Vec<(&SessionState, &str)> = self
            .slots
            .values()
            .filter_map(|s| match s {
                Slot::Fenced { owner, state, .. } => Some((&**state, owner.as_str())),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.0.openid.cmp(&b.0.openid));
        out
    }

    /// The fenced copies that hold unacknowledged pushes, with the owner the
    /// view named (which has not fetched them): nobody may ever ask for them,
    /// and this node may hold the last copy of their durable pushes. The
    /// shell keeps them as replicas (`replica::copy_orphans`), so a recovery
    /// finds them after the fenced slot expires, and a second copy is made
    /// once the owner is gone. Simulation seed 154: the claimant restarted
    /// empty and left, then this node crashed with the only copy; seed 833
    /// of session 9: the claimant restarted empty with the same node id, so
    /// it never left the view, and the fenced copy expired 16 s before the
    /// client came back.
    pub fn fenced_with_pushes(&self) -> Vec<(SessionState, String)> {
        self.fenced_states()
            .into_iter()
            .filter(|(state, _)| !state.pushes.is_empty())
            .map(|(state, owner)| (state.clone(), owner.to_string()))
            .collect()
    }

    /// Where a session that left this node went: (openid, node).
    pub fn moved_to(&self, target: Target<'_>) -> Option<(String, String)> {
        let openid = self.resolve(target)?;
        match self.slots.get(openid)? {
            Slot::Moved { to, .. } => Some((openid.to_string(), to.clone())),
            Slot::Fenced { owner, .. } => Some((openid.to_string(), owner.clone())),
            _ => None,
        }
    }

    fn resolve<'a>(&'a self, target: Target<'a>) -> Option<&'a str> {
        match target {
            Target::Openid(o) => Some(o),
            Target::Session(s) => self.openid_of(s),
        }
    }

    // ----- timers -----

    fn arm(&mut self, openid: &str) {
        let at = match self.slots.get(openid) {
            Some(Slot::Local { handle, .. }) => handle.with(|s| s.poll_timeout()),
            Some(other) => other.own_deadline(),
            None => None,
        };
        self.arm_at(openid, at);
    }

    /// [`Table::arm`] with the slot's deadline already read.
    fn arm_at(&mut self, openid: &str, at: Option<Instant>) {
        // Unchanged (a push queued behind unacked ones, a send after the
        // oldest was sent): no timer to move. Every push re-arms, so this
        // saves two String allocations and a BTreeSet remove + insert each.
        if self.armed.get(openid).copied() == at {
            return;
        }
        if let Some(old) = self.armed.remove(openid) {
            self.timers.remove(&(old, openid.to_string()));
        }
        if let Some(at) = at {
            self.armed.insert(openid.to_string(), at);
            self.timers.insert((at, openid.to_string()));
        }
    }

    /// A local session's deadlines may have changed (it sent, was acked,
    /// attached or detached outside the table): re-read them.
    pub fn rearm(&mut self, handle: &H) {
        if self.is_current(handle) {
            let openid = handle.identity().openid.clone();
            self.arm(&openid);
        }
    }

    /// The earliest deadline: call [`Table::tick`] then.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// Acts on every deadline due at `now`: retransmits, ack timeouts and
    /// expiry of local sessions; forgetting moved, fenced and incoming slots.
    pub fn tick(&mut self, now: Instant) -> Vec<Command<H>> {
        let mut out = Vec::new();
        while let Some((at, openid)) = self.timers.first().cloned() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, openid.clone()));
            self.armed.remove(&openid);
            match self.slots.get(&openid) {
                Some(Slot::Local { handle, .. }) => {
                    let handle = handle.clone();
                    match handle.with(|s| s.handle_timeout(now)) {
                        Some(SessionEvent::Retransmit { .. }) => out.push(Command::Wake(handle)),
                        Some(SessionEvent::AckTimeout { .. }) => out.push(Command::Close {
                            handle,
                            code: ErrorCode::AckTimeout,
                            reason: "pushes unacknowledged after max_retries: reconnect and resume",
                        }),
                        Some(SessionEvent::Expired { lost_pushes }) => {
                            self.drop_local(&openid, "expired", lost_pushes, &mut out);
                            continue;
                        }
                        None => {}
                    }
                    self.arm(&openid);
                }
                Some(slot) => {
                    if slot.own_deadline().is_some_and(|d| d <= now) {
                        if let Some(Slot::Moved {
                            until,
                            copy,
                            copy_until,
                            ..
                        }) = self.slots.get_mut(&openid)
                            && *until > now
                        {
                            // Only the Handover's kept state is due.
                            *copy = None;
                            *copy_until = None;
                            self.arm(&openid);
                        } else {
                            self.forget(&openid);
                        }
                    } else {
                        self.arm(&openid);
                    }
                }
                None => {}
            }
        }
        out
    }

    // ----- slots coming and going -----

    fn forget(&mut self, openid: &str) {
        self.claiming.remove(openid);
        if let Some(slot) = self.slots.remove(openid) {
            match &slot {
                Slot::Local { handle, .. } => {
                    self.locals -= 1;
                    self.by_session.remove(&handle.identity().session_id);
                }
                Slot::Moved { session_id, .. } => {
                    self.unindex(session_id, openid);
                }
                Slot::Fenced { state, .. } => {
                    self.unindex(&state.session_id, openid);
                }
                Slot::Incoming { .. } => {}
            }
        }
        if let Some(old) = self.armed.remove(openid) {
            self.timers.remove(&(old, openid.to_string()));
        }
    }

    fn unindex(&mut self, session_id: &str, openid: &str) {
        if self.by_session.get(session_id).map(String::as_str) == Some(openid) {
            self.by_session.remove(session_id);
        }
    }

    fn put(&mut self, openid: &str, slot: Slot<H>) {
        self.forget(openid);
        match &slot {
            Slot::Local { handle, .. } => {
                self.locals += 1;
                self.by_session
                    .insert(handle.identity().session_id.clone(), openid.to_string());
            }
            Slot::Moved { session_id, .. } => {
                self.by_session
                    .insert(session_id.clone(), openid.to_string());
            }
            Slot::Fenced { state, .. } => {
                self.by_session
                    .insert(state.session_id.clone(), openid.to_string());
            }
            Slot::Incoming { .. } => {}
        }
        self.slots.insert(openid.to_string(), slot);
        self.arm(openid);
    }

    /// Removes a local session that ended here, counting its unacked pushes.
    fn drop_local(
        &mut self,
        openid: &str,
        reason: &'static str,
        lost: u64,
        out: &mut Vec<Command<H>>,
    ) {
        if let Some(Slot::Local { handle, .. }) = self.slots.get(openid) {
            let (session_id, epoch) = (
                handle.identity().session_id.clone(),
                handle.with(|s| s.epoch()),
            );
            self.forget(openid);
            out.push(Command::Removed {
                openid: openid.to_string(),
                session_id,
                epoch,
                reason,
                lost,
            });
        }
    }

    /// A session started here (new, or a fresh one replacing a failed
    /// resume): any previous local session of the openid is replaced, its
    /// connection closed and its unacked pushes counted as lost for `reason`.
    pub fn start(&mut self, handle: H, holding: Holding, reason: &'static str) -> Vec<Command<H>> {
        let openid = handle.identity().openid.clone();
        let mut out = Vec::new();
        if let Some(old) = self.local(&openid).cloned()
            && !old.same(&handle)
        {
            let lost = old.with(|s| s.stats().unacked);
            out.push(Command::Close {
                handle: old,
                code: ErrorCode::SessionReplaced,
                reason: "session replaced by a new one",
            });
            self.drop_local(&openid, reason, lost, &mut out);
        }
        self.put(&openid, Slot::Local { handle, holding });
        out
    }

    /// A session's state arrived (handed over after our claim at `epoch`,
    /// staged by a draining node, rebuilt from replicas) behind `handle`.
    /// Refused if a newer copy is known here or `view_owner` (the owner the
    /// view shows) is another node at a newer epoch (or, for a staged copy,
    /// any node, this one too). Replaces an older local
    /// copy (its connection is closed, its pushes travelled with the state).
    pub fn install(
        &mut self,
        handle: H,
        epoch: u64,
        holding: Holding,
        view_owner: Option<(&str, u64)>,
    ) -> Result<Vec<Command<H>>, InstallError> {
        let openid = handle.identity().openid.clone();
        // A second Stage of the same copy (a duplicated message): keep the
        // one here. A handover answer is never a duplicate: it is the
        // owner's state at our claim, newer than any staged copy.
        if matches!(holding, Holding::Staged { .. })
            && let Some(Slot::Local { handle: h, .. }) = self.slots.get(&openid)
            && !h.same(&handle)
            && h.identity().session_id == handle.identity().session_id
            && h.with(|s| s.epoch()) == epoch
            // A newer export of the same session (its drainer took it back,
            // served it, and staged it again) is not a duplicate: it
            // replaces the older staged copy (simulation seed 9).
            && !progress(&handle.with(|s| s.export())).newer_than(&progress(&h.with(|s| s.export())))
        {
            return Err(InstallError::AlreadyHere { epoch });
        }
        // A staged copy older than what this node exported at the same
        // epoch (a drain's staging in flight, or one whose transfer did not
        // commit) is an older copy of that session: one from an earlier,
        // failed staging, re-staged from node to node while the transfers
        // could not commit. It would replace the state a claimant's Handover
        // is to get here with one that lacks the pushes acknowledged since
        // (simulation seed 112).
        if matches!(holding, Holding::Staged { .. })
            && let Some(Slot::Moved {
                epoch: e,
                session_id,
                staging,
                copy,
                ..
            }) = self.slots.get(&openid)
            && *e == epoch
            && *session_id == handle.identity().session_id
        {
            let exported = match (staging, copy) {
                (Some((h, _)), _) => Some(progress(&h.with(|s| s.export()))),
                (None, Some(state)) => Some(progress(state)),
                (None, None) => None,
            };
            // The very state exported coming back (its successor drains in
            // turn) is taken: it is the session.
            if let Some(exported) = exported
                && exported.newer_than(&progress(&handle.with(|s| s.export())))
            {
                return Err(InstallError::Stale {
                    held: *e,
                    offered: epoch,
                });
            }
        }
        let held = match self.slots.get(&openid) {
            Some(Slot::Local { handle: h, .. }) if !h.same(&handle) => h.with(|s| s.epoch()),
            Some(Slot::Moved { epoch: e, to, .. }) if to != self.me() => *e,
            Some(Slot::Fenced { epoch: e, .. }) => *e,
            _ => 0,
        };
        // A staged copy older than the epoch the view gives even to this
        // node is from a node that no longer owned the session when it
        // staged it (a re-staging of a staged copy, crossed by the transfer
        // to here): the state that moved here at that epoch is newer
        // (simulation seed 43).
        let staged = matches!(holding, Holding::Staged { .. });
        let newer_elsewhere = view_owner
            .filter(|(node, _)| staged || *node != self.me())
            .map_or(0, |(_, e)| e);
        let held = held.max(newer_elsewhere);
        if epoch < held {
            return Err(InstallError::Stale {
                held,
                offered: epoch,
            });
        }
        handle.with(|s| s.set_epoch(epoch));
        // A recovered session says so in its state, which every export
        // carries: a node that takes it over (Handover) holds it as
        // recovered too, so a client still resuming the crashed session's id
        // (the RECOVERED answer never reached it) attaches to it there
        // instead of replacing it (durable pushes lost, failover finding 4).
        let holding = match holding {
            Holding::Recovered { old_session_id } => {
                handle.with(|s| s.set_replaces(&old_session_id, ResumeStatus::Recovered));
                Holding::Recovered { old_session_id }
            }
            Holding::Owned => owned(&handle),
            staged => staged,
        };
        self.claiming.remove(&openid);
        let mut out = Vec::new();
        if let Some(old) = self.local(&openid).cloned()
            && !old.same(&handle)
        {
            out.push(Command::Close {
                handle: old,
                code: ErrorCode::SessionReplaced,
                reason: "session replaced by a newer copy",
            });
        }
        self.put(&openid, Slot::Local { handle, holding });
        Ok(out)
    }

    /// A Start is about to claim `openid` here (before the claim is sent).
    /// A staged copy here takes no push and is not made `Owned` by the view
    /// from now on until the Start settles which state is the session's
    /// ([`Table::end_incoming`] or [`Table::claimed`]): the claim's answer
    /// names this node, and a push or a watch delta landing between that
    /// answer and [`Table::begin_incoming`] would otherwise serve a stale
    /// staged copy (the shell's order no longer matters).
    pub fn claim_begins(&mut self, openid: &str) {
        if let Some(Slot::Local {
            holding: Holding::Staged { .. },
            ..
        }) = self.slots.get(openid)
        {
            self.claiming.insert(openid.to_string());
        }
    }

    /// `openid` is being claimed or fetched: pushes wait (until `now` plus
    /// `incoming_ttl`). A local session stays local (a resume on this node).
    pub fn begin_incoming(&mut self, now: Instant, openid: &str) {
        if let Some(Slot::Local { holding, .. }) = self.slots.get(openid) {
            if matches!(holding, Holding::Staged { .. }) {
                self.claiming.insert(openid.to_string());
            }
            return;
        }
        let deadline = now + self.cfg.incoming_ttl;
        self.put(openid, Slot::Incoming { deadline });
    }

    /// The fetch of `openid` ended (installed or not).
    pub fn end_incoming(&mut self, openid: &str) {
        self.claiming.remove(openid);
        if matches!(self.slots.get(openid), Some(Slot::Incoming { .. })) {
            self.forget(openid);
        }
    }

    /// Someone asks for `openid`'s state. `Ok(Some)`: the state (and, for a
    /// peer, the handle whose connection the shell closes); the slot is now
    /// `Moved`. `Ok(None)`: nothing to hand over here.
    #[allow(clippy::type_complexity)]
    pub fn hand_over(
        &mut self,
        now: Instant,
        openid: &str,
        ask: HandoverAsk,
    ) -> Result<Option<(SessionState, Option<H>)>, HandoverError> {
        match (self.slots.get(openid), &ask) {
            (_, HandoverAsk::Peer { epoch: 0, .. }) => Err(HandoverError::NoEpoch),
            (Some(Slot::Local { handle, .. }), HandoverAsk::Peer { epoch, new_owner }) => {
                let handle = handle.clone();
                let (held, state) = handle.with(|s| (s.epoch(), s.export()));
                if held >= *epoch {
                    return Err(HandoverError::Fenced {
                        held,
                        asked: *epoch,
                    });
                }
                self.handed_over(now, openid, new_owner, *epoch, &state);
                Ok(Some((state, Some(handle))))
            }
            // A Start here is settling which state is the session's (its
            // claim named this node): a drain does not stage it meanwhile.
            // Staging cleared the claim's hold, and a failed staging took
            // back a stale staged copy that then served pushes the Start's
            // Handover replaced (simulation seed 979 of session 9). The drain
            // comes back to it.
            (Some(Slot::Local { .. }), HandoverAsk::Drain { .. })
                if self.claiming.contains(openid) =>
            {
                Ok(None)
            }
            (Some(Slot::Local { handle, holding }), HandoverAsk::Drain { successor }) => {
                let (held, state) = handle.with(|s| (s.epoch(), s.export()));
                let holding = holding.clone();
                let slot = Slot::Moved {
                    to: successor.clone(),
                    epoch: held,
                    session_id: state.session_id.clone(),
                    until: now + self.cfg.moved_ttl,
                    settled: false,
                    staging: Some((handle.clone(), holding)),
                    copy: None,
                    copy_until: None,
                };
                self.put(openid, slot);
                Ok(Some((state, None)))
            }
            // Claimed by another node while a drain stages it: the claimant
            // gets the session (the staged copy never serves: the view will
            // name the claimant, not the successor).
            (
                Some(Slot::Moved {
                    staging: Some((handle, _)),
                    ..
                }),
                HandoverAsk::Peer { epoch, new_owner },
            ) => {
                let handle = handle.clone();
                let (held, state) = handle.with(|s| (s.epoch(), s.export()));
                if held >= *epoch {
                    return Err(HandoverError::Fenced {
                        held,
                        asked: *epoch,
                    });
                }
                self.handed_over(now, openid, new_owner, *epoch, &state);
                Ok(Some((state, Some(handle))))
            }
            (
                Some(Slot::Fenced {
                    epoch: fenced_at,
                    state,
                    ..
                }),
                HandoverAsk::Peer { epoch, new_owner },
            ) => {
                if *epoch < *fenced_at {
                    return Err(HandoverError::Fenced {
                        held: *fenced_at,
                        asked: *epoch,
                    });
                }
                let state = (**state).clone();
                self.handed_over(now, openid, new_owner, *epoch, &state);
                Ok(Some((state, None)))
            }
            // A state exported from here and kept. A drain's staging that
            // did not commit its transfer (the state staged is the session's
            // latest: nothing was queued here since) goes to a claimant at a
            // newer epoch. A Handover's answer goes again to its claimant
            // only, at the same epoch (a retry): anyone later asks that
            // claimant, which may have served the session since.
            (
                Some(Slot::Moved {
                    to,
                    epoch: known,
                    copy: Some(copy),
                    copy_until,
                    ..
                }),
                HandoverAsk::Peer { epoch, new_owner },
            ) if match copy_until {
                Some(_) => to == new_owner && epoch == known,
                None => *epoch >= *known && *epoch > copy.epoch,
            } =>
            {
                let state = (**copy).clone();
                self.handed_over(now, openid, new_owner, *epoch, &state);
                Ok(Some((state, None)))
            }
            _ => Ok(None),
        }
    }

    /// `openid`'s `state` went to `new_owner`, which claimed it at `epoch`:
    /// pushes follow it there, and the state is kept for a retry of the
    /// Handover ([`Slot::Moved`]'s `copy`).
    fn handed_over(
        &mut self,
        now: Instant,
        openid: &str,
        new_owner: &str,
        epoch: u64,
        state: &SessionState,
    ) {
        let slot = Slot::Moved {
            to: new_owner.to_string(),
            epoch,
            session_id: state.session_id.clone(),
            until: now + self.cfg.moved_ttl,
            settled: true,
            staging: None,
            copy: Some(Box::new(state.clone())),
            copy_until: Some(now + self.cfg.handover_copy_ttl),
        };
        self.put(openid, slot);
    }

    /// The state handed over to a peer at `epoch` did not reach it whole
    /// (its stream broke): if the slot still says the session went there at
    /// that epoch, the state waits here as a fenced copy for that owner, so
    /// its retried Handover gets it. Whether it was kept.
    pub fn handover_broken(
        &mut self,
        now: Instant,
        openid: &str,
        epoch: u64,
        state: SessionState,
    ) -> bool {
        let owner = match self.slots.get(openid) {
            Some(Slot::Moved {
                to,
                epoch: e,
                staging: None,
                ..
            }) if *e == epoch => to.clone(),
            _ => return false,
        };
        let slot = Slot::Fenced {
            owner,
            epoch,
            state: Box::new(state),
            until: now + self.cfg.fenced_ttl,
        };
        self.put(openid, slot);
        true
    }

    /// A drain's staging of `openid` failed: the exported session `handle`
    /// (unchanged since the export, since nothing reaches a moved session)
    /// is held here again as it was (served; staged if its own transfer never
    /// committed), unless the view (`view_owner`) moved on
    /// meanwhile: then it is fenced at once, its state kept for the owner.
    pub fn take_back(
        &mut self,
        now: Instant,
        handle: H,
        view_owner: Option<(&str, u64)>,
    ) -> Vec<Command<H>> {
        let openid = handle.identity().openid.clone();
        let holding = match self.slots.get(&openid) {
            Some(Slot::Moved {
                staging: Some((h, holding)),
                ..
            }) if h.same(&handle) => holding.clone(),
            _ => return Vec::new(),
        };
        self.put(&openid, Slot::Local { handle, holding });
        match view_owner {
            Some((owner, epoch)) => self.owner_changed(now, &openid, owner, epoch),
            None => Vec::new(),
        }
    }

    /// The successor holds the staged state of `openid`; `new_epoch` is the
    /// epoch its ownership moved there at (the old one if the transfer did
    /// not commit: the client's claim there settles it). Pushes now follow it.
    /// If the transfer did not commit, the state staged is kept for a
    /// claimant's Handover (the claimant may be another node, holding an
    /// older copy of its own).
    pub fn staged(&mut self, openid: &str, new_epoch: u64) {
        if let Some(Slot::Moved {
            epoch,
            settled,
            staging,
            copy,
            ..
        }) = self.slots.get_mut(openid)
            && let Some((handle, _)) = staging.take()
        {
            // Committed: ownership moved past the epoch the session was
            // exported at.
            let (exported_at, state) = handle.with(|s| (s.epoch(), s.export()));
            if new_epoch <= exported_at {
                *copy = Some(Box::new(state));
            }
            *epoch = (*epoch).max(new_epoch);
            *settled = true;
        }
    }

    /// Whether a drain that staged `openid` may move its ownership (the
    /// control plane's Transfer): only if this node held it as its owner. A
    /// copy staged here whose own transfer never committed is not this
    /// node's to give: a Transfer would take ownership from the node the
    /// view names (which may have taken the session back and served it
    /// since) and hand it to a stale copy (simulation seed 14).
    pub fn may_transfer(&self, openid: &str) -> bool {
        matches!(
            self.slots.get(openid),
            Some(Slot::Moved { staging: Some((_, holding)), .. })
                if !matches!(holding, Holding::Staged { .. })
        )
    }

    /// Whether a drain may still commit the ownership transfer of `openid` to
    /// `to` (retried after the control plane was unreachable): only while
    /// the slot still says the session went there at `epoch`. A session that
    /// came back here since (its successor drained and staged it back), or
    /// was claimed away, must not have its ownership moved to a copy that is
    /// older than the one serving now.
    pub fn transfer_pending(&self, openid: &str, to: &str, epoch: u64) -> bool {
        matches!(
            self.slots.get(openid),
            Some(Slot::Moved { to: t, epoch: e, staging: None, .. }) if t == to && *e == epoch
        )
    }

    // ----- the view (level-triggered) -----

    /// The view shows `owner` holding `openid` at `epoch` (a watch delta, a
    /// claim answer, or one record of a snapshot). A local copy at an older
    /// epoch owned elsewhere is fenced at once: it stops serving, its state
    /// waits for the owner's Handover.
    pub fn owner_changed(
        &mut self,
        now: Instant,
        openid: &str,
        owner: &str,
        epoch: u64,
    ) -> Vec<Command<H>> {
        let mut out = Vec::new();
        let me = self.me().to_string();
        match self.slots.get_mut(openid) {
            Some(Slot::Local { handle, holding }) => {
                let held = handle.with(|s| s.epoch());
                if epoch <= held {
                    return out;
                }
                if owner == me && self.claiming.contains(openid) {
                    // Our own claim: the Handover settles the state.
                    return out;
                }
                if owner == me {
                    handle.with(|s| s.set_epoch(epoch));
                    *holding = match std::mem::replace(holding, Holding::Owned) {
                        Holding::Staged { .. } => owned(handle),
                        other => other,
                    };
                    return out;
                }
                let handle = handle.clone();
                let state = handle.with(|s| s.export());
                let session_id = state.session_id.clone();
                self.put(
                    openid,
                    Slot::Fenced {
                        owner: owner.to_string(),
                        epoch,
                        state: Box::new(state),
                        until: now + self.cfg.fenced_ttl,
                    },
                );
                out.push(Command::Close {
                    handle,
                    code: ErrorCode::SessionReplaced,
                    reason: "session owned by another node",
                });
                out.push(Command::Removed {
                    openid: openid.to_string(),
                    session_id,
                    epoch: held,
                    reason: "fenced",
                    lost: 0,
                });
            }
            Some(Slot::Moved {
                to, epoch: e, copy, ..
            }) if epoch > *e && owner != me => {
                if owner == to.as_str() {
                    // The transfer committed: the successor's copy is the session.
                    *copy = None;
                }
                *to = owner.to_string();
                *e = epoch;
            }
            Some(Slot::Fenced {
                owner: o, epoch: e, ..
            }) if epoch > *e => {
                *o = owner.to_string();
                *e = epoch;
            }
            _ => {}
        }
        out
    }

    /// A Start finished attaching `handle` under a claim at `epoch` (which
    /// may have taken a while: a handover, a recovery). The view may have
    /// moved on meanwhile: compared with `view_owner` at once, so a session
    /// claimed away during the Start is fenced, not served at an old epoch.
    pub fn claimed(
        &mut self,
        now: Instant,
        handle: &H,
        epoch: u64,
        view_owner: Option<(&str, u64)>,
    ) -> Vec<Command<H>> {
        if !self.is_current(handle) {
            return Vec::new();
        }
        handle.with(|s| s.set_epoch(epoch));
        self.claiming.remove(&handle.identity().openid);
        // The claim committed for this node: a staged copy is owned now.
        if let Some(Slot::Local { holding, .. }) = self.slots.get_mut(&handle.identity().openid)
            && matches!(holding, Holding::Staged { .. })
        {
            *holding = owned(handle);
        }
        match view_owner {
            Some((owner, e)) => {
                let openid = handle.identity().openid.clone();
                self.owner_changed(now, &openid, owner, e)
            }
            None => Vec::new(),
        }
    }

    /// A whole view (a watch snapshot, a resync): every local session is
    /// compared with `owner_of` its openid, as [`Table::owner_changed`] does.
    pub fn reconcile(
        &mut self,
        now: Instant,
        owner_of: impl Fn(&str) -> Option<(String, u64)>,
    ) -> Vec<Command<H>> {
        let locals: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Local { .. }))
            .map(|(o, _)| o.clone())
            .collect();
        // In a stable order: the commands come out the same every run.
        let mut locals = locals;
        locals.sort_unstable();
        let mut out = Vec::new();
        for openid in locals {
            if let Some((owner, epoch)) = owner_of(&openid) {
                out.extend(self.owner_changed(now, &openid, &owner, epoch));
            }
        }
        out
    }

    // ----- traffic -----

    /// A push for `target`. `view_owner` is the owner the view shows for the
    /// openid (if any): a local copy older than it is fenced first, so a
    /// stale owner never answers OK. The shell passes it for pushes from an
    /// upstream, not for pushes another node forwarded here (that node
    /// followed its own slot; a staged copy takes them).
    pub fn push(
        &mut self,
        now: Instant,
        target: Target<'_>,
        msg: impl Into<crate::session::PushBody>,
        view_owner: Option<(&str, u64)>,
    ) -> (PushOutcome<H>, Vec<Command<H>>) {
        // No allocation on the push path (a batch or broadcast calls this per
        // push): the openid is the caller's, or a local session's own (its
        // handle held here), copied only for a session that is not local.
        let mut local: Option<H> = None;
        let owned: String;
        let openid: &str = match target {
            Target::Openid(o) => o,
            Target::Session(s) => match self.openid_of(s) {
                None => return (PushOutcome::Absent, Vec::new()),
                Some(o) => match self.local(o) {
                    Some(handle) => &local.insert(handle.clone()).identity().openid,
                    None => {
                        owned = o.to_string();
                        &owned
                    }
                },
            },
        };
        let mut out = Vec::new();
        if let Some((owner, epoch)) = view_owner {
            out = self.owner_changed(now, openid, owner, epoch);
        }
        let view_is_me = view_owner.is_some_and(|(o, _)| o == self.me());
        let outcome = match self.slots.get(openid) {
            // A staged copy serves once the view names this node (the
            // transfer or a client's claim committed): until then the drainer
            // may still take it back (its staging timed out while the copy
            // did arrive), and a push queued here would be on a copy that
            // then never serves. A push straight from an upstream goes to
            // the view's owner; a forwarded one waits for the view.
            Some(Slot::Local {
                holding: Holding::Staged { .. },
                ..
            }) if self.claiming.contains(openid) => PushOutcome::Wait,
            // The view naming this node at the staged copy's epoch or an
            // older one is this node's own earlier ownership (it staged the
            // session away since, with a transfer whose outcome it may not
            // know, and a draining node staged a copy back here), not a
            // commitment of the copy: it waits too. Simulation seeds 475 and
            // 596 of session 9: stale views served re-staged copies (at 714
            // named at 662; at 381 named at 381) while the control plane had
            // moved the session on, and the pushes they took were lost.
            Some(Slot::Local {
                handle,
                holding: Holding::Staged { .. },
            }) if view_owner
                .is_none_or(|(_, e)| !view_is_me || e <= handle.with(|s| s.epoch())) =>
            {
                match view_owner {
                    Some((o, _)) if !view_is_me => PushOutcome::Forward { to: o.to_string() },
                    _ => PushOutcome::Wait,
                }
            }
            Some(Slot::Local { handle, .. }) => {
                let handle = handle.clone();
                if let Target::Session(sid) = target
                    && handle.identity().session_id != sid
                {
                    return (PushOutcome::Absent, out);
                }
                // A push never brings a session's deadline forward (it adds
                // an unsent push behind the others; a trim drops the oldest
                // ones), and a timer that fires early only re-arms (`tick`):
                // the timer is touched only if the deadline moved, which
                // saves the `armed` lookup on nearly every push. Only a trim
                // can move it, and only then is it read (`push_moving`),
                // under the same lock as the push.
                let (result, moved) = handle.with(|s| s.push_moving(now, msg));
                match result {
                    Ok(seq_id) => {
                        if let Some(at) = moved {
                            self.arm_at(openid, at);
                        }
                        PushOutcome::Queued { seq_id, handle }
                    }
                    Err(error) => PushOutcome::Refused { error, handle },
                }
            }
            Some(Slot::Incoming { .. }) => PushOutcome::Wait,
            Some(Slot::Moved { settled: false, .. }) => PushOutcome::Wait,
            Some(Slot::Moved { to, .. }) => PushOutcome::Forward { to: to.clone() },
            Some(Slot::Fenced { owner, .. }) => PushOutcome::Forward { to: owner.clone() },
            None => PushOutcome::Absent,
        };
        (outcome, out)
    }

    /// [`push`](Self::push) of consecutive pushes to one target with one
    /// view: the first takes the full path; when it reached a local session
    /// (queued or refused), the others go to that session under one lock,
    /// with nothing between them that could change the slot. One outcome per
    /// push in `outcomes`; a first push with another outcome is the only one.
    pub fn push_many(
        &mut self,
        now: Instant,
        target: Target<'_>,
        msgs: impl IntoIterator<Item = crate::session::PushBody>,
        view_owner: Option<(&str, u64)>,
        outcomes: &mut Vec<PushOutcome<H>>,
    ) -> Vec<Command<H>> {
        let mut msgs = msgs.into_iter().peekable();
        let Some(first) = msgs.next() else {
            return Vec::new();
        };
        let (outcome, commands) = self.push(now, target, first, view_owner);
        if msgs.peek().is_none() {
            outcomes.push(outcome);
            return commands;
        }
        let handle = match &outcome {
            PushOutcome::Queued { handle, .. } | PushOutcome::Refused { handle, .. } => {
                handle.clone()
            }
            PushOutcome::Forward { .. } | PushOutcome::Wait | PushOutcome::Absent => {
                outcomes.push(outcome);
                return commands;
            }
        };
        outcomes.push(outcome);
        let moved = handle.with(|s| {
            let mut moved = None;
            for msg in msgs {
                let (result, m) = s.push_moving(now, msg);
                moved = m.or(moved);
                outcomes.push(match result {
                    Ok(seq_id) => PushOutcome::Queued {
                        seq_id,
                        handle: handle.clone(),
                    },
                    Err(error) => PushOutcome::Refused {
                        error,
                        handle: handle.clone(),
                    },
                });
            }
            moved
        });
        if let Some(at) = moved {
            let openid = handle.identity().openid.clone();
            self.arm_at(&openid, at);
        }
        commands
    }

    /// A client request arrived on the connection of session `handle`.
    pub fn begin_request(&mut self, handle: &H, seq_id: u64) -> RequestOutcome {
        if !self.is_current(handle) {
            return RequestOutcome::NotHere;
        }
        RequestOutcome::Here(handle.with(|s| s.begin_request(seq_id)))
    }

    /// A client ack on the connection of session `handle`; `None` if the
    /// session is no longer served here (the ack is moot: its state left).
    pub fn ack(
        &mut self,
        now: Instant,
        handle: &H,
        seq: u64,
    ) -> Option<Result<AckOutcome, AckError>> {
        if !self.is_current(handle) {
            return None;
        }
        let r = handle.with(|s| s.on_ack(now, seq));
        self.rearm(handle);
        Some(r)
    }

    /// The next push to send on the connection of `handle`, if it is served here.
    pub fn poll_transmit(&mut self, now: Instant, handle: &H) -> Option<ServerPush> {
        if !self.is_current(handle) {
            return None;
        }
        let p = handle.with(|s| s.poll_transmit(now));
        self.rearm(handle);
        p
    }

    /// The connection of `handle` is gone: the session's expiry starts.
    pub fn detach(&mut self, now: Instant, handle: &H) {
        handle.with(|s| {
            if s.is_attached() {
                s.detach(now);
            }
        });
        self.rearm(handle);
    }

    /// A local session ended here (Stop, ...): forgotten, pushes counted lost.
    pub fn remove(&mut self, handle: &H, reason: &'static str) -> Vec<Command<H>> {
        let mut out = Vec::new();
        if self.is_current(handle) {
            let lost = handle.with(|s| s.stats().unacked);
            let openid = handle.identity().openid.clone();
            self.drop_local(&openid, reason, lost, &mut out);
        }
        out
    }

    /// A node that claimed `openid` after its previous owner was gone
    /// gathers what is left of session `session_id` (`Peer.FetchReplica`).
    /// Besides replicas, a copy that is here but not served is part of it: a
    /// drain's staged copy whose transfer never committed (it took the pushes
    /// the drainer forwarded, acknowledged with this node's standby), or a
    /// fenced copy. A staged copy given away stops taking pushes at once: it
    /// is fenced (pushes follow the view's owner, which becomes the claimant),
    /// so nothing is queued on it after the claimant took its state.
    pub fn copy_for_recovery(
        &mut self,
        now: Instant,
        openid: &str,
        session_id: &str,
    ) -> (Option<SessionState>, Vec<Command<H>>) {
        let mut out = Vec::new();
        match self.slots.get(openid) {
            Some(Slot::Local {
                handle,
                holding: Holding::Staged { from },
            }) if handle.identity().session_id == session_id => {
                let (handle, from) = (handle.clone(), from.clone());
                let (held, state) = handle.with(|s| (s.epoch(), s.export()));
                self.put(
                    openid,
                    Slot::Fenced {
                        owner: from,
                        epoch: held,
                        state: Box::new(state.clone()),
                        until: now + self.cfg.fenced_ttl,
                    },
                );
                out.push(Command::Close {
                    handle,
                    code: ErrorCode::SessionReplaced,
                    reason: "session recovered by another node",
                });
                out.push(Command::Removed {
                    openid: openid.to_string(),
                    session_id: session_id.to_string(),
                    epoch: held,
                    reason: "recovered_elsewhere",
                    lost: 0,
                });
                (Some(state), out)
            }
            Some(Slot::Fenced { state, .. }) if state.session_id == session_id => {
                (Some((**state).clone()), out)
            }
            _ => (None, out),
        }
    }

    /// The holding of `openid`'s local session.
    pub fn holding(&self, openid: &str) -> Option<&Holding> {
        match self.slots.get(openid) {
            Some(Slot::Local { holding, .. }) => Some(holding),
            _ => None,
        }
    }

    /// What a Start resuming `session_id` is told if it attaches to
    /// `openid`'s local session because that session stands in for
    /// `session_id`: RECOVERED (rebuilt from its replicas, here or on a node
    /// that handed it over or staged it here since), or the SESSION_EXPIRED
    /// / SEQ_AHEAD a Start resuming it was answered when this session was
    /// made in its place (the answer may never have reached the client).
    pub fn stands_in_for(&self, openid: &str, session_id: &str) -> Option<ResumeStatus> {
        if session_id.is_empty() {
            return None;
        }
        match self.slots.get(openid) {
            Some(Slot::Local {
                holding: Holding::Recovered { old_session_id },
                ..
            }) if old_session_id == session_id => Some(ResumeStatus::Recovered),
            Some(Slot::Local { handle, .. }) => handle.with(|s| {
                s.replaces()
                    .filter(|r| r.session_id == session_id)
                    .map(|r| r.status)
            }),
            _ => None,
        }
    }

    /// A Start of `openid` attaches its client: to the local session it
    /// resumes (`resume`: its id, empty for a new session; `last_acked`: the
    /// client's ack point), to the session that stands in for it
    /// ([`Table::stands_in_for`]), or to a fresh one made by `fresh`, which
    /// replaces any other local session. A fresh session made because the
    /// resume failed stands in for `resume` from then on: a retry of the
    /// same Start (its answer lost, or given up on) attaches to it and is
    /// told the same, instead of replacing it and dropping the pushes it
    /// accepted meanwhile (`gate-bench failover`, session 8).
    pub fn start_session(
        &mut self,
        now: Instant,
        openid: &str,
        resume: &str,
        last_acked: u64,
        fresh: impl FnOnce() -> H,
    ) -> (H, ResumeOutcome, Vec<Command<H>>) {
        let mut out = Vec::new();
        let existing = self.local(openid).cloned();
        if let Some(status) = self.stands_in_for(openid, resume)
            && let Some(handle) = existing.clone()
        {
            let mut outcome = handle.with(|s| s.attach(now, 0));
            outcome.status = status;
            self.rearm(&handle);
            return (handle, outcome, out);
        }
        let (reported, reason) = match existing {
            Some(handle) if !resume.is_empty() && handle.identity().session_id == resume => {
                let outcome = handle.with(|s| s.attach(now, last_acked));
                match outcome.status {
                    ResumeStatus::SeqAhead | ResumeStatus::SessionExpired => {
                        (Some(outcome.status), "resume_failed")
                    }
                    _ => {
                        self.rearm(&handle);
                        return (handle, outcome, out);
                    }
                }
            }
            _ if !resume.is_empty() => (Some(ResumeStatus::SessionExpired), "replaced"),
            _ => (None, "replaced"),
        };
        let handle = fresh();
        if let Some(status) = reported {
            handle.with(|s| s.set_replaces(resume, status));
        }
        out.extend(self.start(handle.clone(), Holding::Owned, reason));
        let mut outcome = handle.with(|s| s.attach(now, 0));
        if let Some(status) = reported {
            outcome.status = status;
        }
        self.rearm(&handle);
        (handle, outcome, out)
    }
}

/// How a node holds a session it owns now: recovered if its state says it
/// was rebuilt from a crashed session's replicas, else owned.
fn owned<H: SessionCell>(handle: &H) -> Holding {
    let recovered_from = handle.with(|s| {
        s.replaces()
            .filter(|r| r.status == ResumeStatus::Recovered)
            .map(|r| r.session_id.clone())
    });
    match recovered_from {
        Some(old_session_id) => Holding::Recovered { old_session_id },
        None => Holding::Owned,
    }
}

/// How far one copy of a session got. At one epoch only the node the view
/// names serves the session (every other copy is a frozen export of it), so
/// these only grow along the copy that serves: a copy is newer than another
/// of the same session at the same epoch iff it got further in one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    next_seq: u64,
    acked: u64,
    highest_sent: u64,
    highest_request: u64,
}

impl Progress {
    fn newer_than(&self, o: &Progress) -> bool {
        self.next_seq > o.next_seq
            || self.acked > o.acked
            || self.highest_sent > o.highest_sent
            || self.highest_request > o.highest_request
    }
}

fn progress(s: &SessionState) -> Progress {
    Progress {
        next_seq: s.next_seq_id,
        acked: s.acked_seq_id,
        highest_sent: s.highest_sent_seq_id,
        highest_request: s.highest_request_seq_id,
    }
}
