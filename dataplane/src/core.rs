//! The node's session table as one sans-IO state machine: where each of this
//! node's sessions is, at which ownership epoch, and which nodes are live.
//!
//! [`Session`](crate::session::Session) is one user's state machine; this is the
//! level above it, as quinn-proto's `Endpoint` is above its `Connection`s and
//! openraft's engine turns events into commands. Every openid this node knows
//! of is in exactly one [`Slot`]; every question "where is this session now",
//! "may this push be queued here", "is that node live" has one answer, here.
//! The shell (QUIC connections, the peer gRPC service, the control-plane
//! client) feeds events in and carries out the [`Command`]s that come out. No
//! clock, socket or task is touched in this module: time is an argument, and
//! the shell sleeps until [`Table::poll_timeout`].
//!
//! ```text
//!  events in                                 Table                          commands out
//!  start / install (claim, handover, stage) ─> Slot::Local{epoch, kind}      Close(handle, code)
//!  begin_incoming (claim sent, fetch) ──────> Slot::Incoming{deadline}       Wake(handle)
//!  hand_over (peer asks / drain stages) ────> Slot::Moved{to, epoch}         Removed{reason, lost}
//!  owner_changed / reconcile (view) ────────> Slot::Fenced{owner, epoch}     Release{openid, epoch}
//!  push / begin_request / ack / detach ─────> PushOutcome / RequestOutcome
//!  tick(now) ───────────────────────────────> expiries, retransmits, pruning
//!  members: Members (node liveness, standby, successors, fan-out targets)
//! ```
//!
//! # Layout
//! - [`slot`]: the states a session slot can be in;
//! - [`members`]: node liveness, decided once (standby, successors, fan-out,
//!   recovery sources, handover reachability);
//! - [`table`]: [`Table`], the events and the commands;
//! - [`claim`]: how a Start's claim rides out a control-plane leader change
//!   (tried again while unavailable, after a renewal when this node's lease
//!   lapsed meanwhile, never after a refusal; bounded by the patience);
//! - [`lease`]: whether this node's control-plane lease surely still
//!   holds, the condition for acknowledging a durable push (fencing a node
//!   cut off from the control plane);
//! - [`recovery`]: what a node answers when a claimant gathers a gone
//!   owner's session (replicas and unserved copies);
//! - [`cell`]: [`PlainCell`], a session handle without a connection (tests,
//!   simulation);
//! - `tests`: one test per rule, no network.

pub mod cell;
pub mod claim;
pub mod lease;
pub mod members;
pub mod recovery;
pub mod slot;
pub mod table;
#[cfg(test)]
mod tests;

pub use cell::PlainCell;
pub use claim::{ClaimFailure, ClaimNext, ClaimRetry};
pub use lease::{Lease, LeaseError};
pub use members::{AfterHandover, Member, Members, Reach};
pub use slot::{Holding, Slot};
pub use table::{
    Command, HandoverAsk, HandoverError, InstallError, PushOutcome, RequestOutcome, SessionCell,
    Table, TableConfig, Target,
};
