//! The states of one openid's slot in the [`Table`](super::Table).
//!
//! A slot is in exactly one state, and carries the ownership epoch it was in
//! that state at. There is no other map or flag saying where a session is.
//!
//! ```text
//!             begin_incoming                install (epoch >= held)
//!   (absent) ───────────────> Incoming ─────────────────────────────> Local
//!      │  start / install                   │ deadline / end_incoming    │
//!      └───────────────────────────────────>│──────────> (absent)        │
//!                                                                        │
//!   Local ── hand_over(peer, epoch > held) / drain stage ──> Moved{to, epoch}
//!   Local ── view: owner elsewhere at a newer epoch ───────> Fenced{owner, epoch, state}
//!   Fenced ── hand_over(epoch > fenced) ───────────────────> Moved{to, epoch}
//!   Moved, Fenced ── deadline ──> (absent)      Local ── expiry / stop ──> (absent)
//! ```

use std::time::Instant;

use gatesvr_proto::session::SessionState;

/// How a local session came to be here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holding {
    /// Started, resumed or handed over to this node after its claim.
    Owned,
    /// Staged here by a draining node that is moving its ownership here.
    Staged { from: String },
    /// Rebuilt from replicas after its owner crashed, under a new session id:
    /// a client resuming with `old_session_id` attaches to it (RECOVERED).
    Recovered { old_session_id: String },
}

/// One openid's slot.
#[derive(Debug)]
pub enum Slot<H> {
    /// Served here: pushes are queued into the session behind `handle`.
    Local {
        handle: H,
        /// The session's epoch when it became local (the session itself keeps
        /// the current one; see `Session::epoch`).
        holding: Holding,
    },
    /// Being claimed or fetched from its previous owner: pushes wait for the
    /// outcome (bounded by `deadline`).
    Incoming { deadline: Instant },
    /// Exported to `to`, which took it at `epoch`: pushes that still arrive
    /// here are forwarded there until `until`.
    Moved {
        to: String,
        epoch: u64,
        session_id: String,
        until: Instant,
        /// False while a drain's staging is in flight: pushes wait for it
        /// (then follow the session, or find it local again).
        settled: bool,
        /// While a drain's staging is in flight: the session it exported and
        /// how it was held, so a claimant's Handover still gets it and a
        /// failed staging takes it back as it was (a copy staged here and
        /// never committed goes back to staged, not owned).
        staging: Option<(H, Holding)>,
        /// A drain's staging whose ownership transfer did not commit: the
        /// state it exported (the successor's staged copy serves only once
        /// the view names it). A claimant elsewhere gets it from here by its
        /// Handover, instead of resuming from an older copy of its own
        /// (simulation seed 186). Dropped once given, or when the view names
        /// `to` (the transfer committed: the successor's copy is the session).
        ///
        /// Also the state a Handover exported to `to`, until `copy_until`: a
        /// retry of that Handover (same claimant, same epoch) gets it again.
        /// The first answer may never arrive (its deadline passed while the
        /// network held it, its connection broke after the last byte left);
        /// answered "no copy", the claimant could only rebuild from replicas,
        /// and this node holding the last one could crash first (simulation
        /// seed 369).
        copy: Option<Box<SessionState>>,
        /// When a Handover's `copy` is dropped (None: kept as long as the slot).
        copy_until: Option<Instant>,
    },
    /// The view showed `owner` holding the session at `epoch`, newer than our
    /// copy: our copy stopped serving. Its state is kept until `until` for a
    /// late Handover from `owner`; pushes are forwarded to `owner`.
    Fenced {
        owner: String,
        epoch: u64,
        state: Box<SessionState>,
        until: Instant,
    },
}

impl<H> Slot<H> {
    /// A short name for logs, metrics and the simulation's traces.
    pub fn name(&self) -> &'static str {
        match self {
            Slot::Local { .. } => "local",
            Slot::Incoming { .. } => "incoming",
            Slot::Moved { .. } => "moved",
            Slot::Fenced { .. } => "fenced",
        }
    }

    /// When the slot leaves this state by itself, if it does (a local
    /// session's deadlines are its `Session`'s).
    pub(crate) fn own_deadline(&self) -> Option<Instant> {
        match self {
            Slot::Local { .. } => None,
            Slot::Incoming { deadline } => Some(*deadline),
            Slot::Moved {
                until,
                copy: Some(_),
                copy_until: Some(copy_until),
                ..
            } => Some((*until).min(*copy_until)),
            Slot::Moved { until, .. } | Slot::Fenced { until, .. } => Some(*until),
        }
    }
}
