//! One user's session: the sans-IO state machine behind reliable pushes,
//! resume and request dedupe.
//!
//! A [`Session`] belongs to one openid and outlives its connections. It owns
//! no socket, task or clock: every method that depends on time takes `now`,
//! and each call returns what the QUIC shell must do (send a push, close the
//! connection with a code, free the session). The same inputs always give the
//! same outputs, so every rule below is unit-tested without a network.
//!
//! ```text
//!  from the shell      Session                             to the shell
//!  upstream push ───> push() ──> [unacked queue] ──> poll_transmit() ──> ServerPush
//!  ClientAck ───────> on_ack(): frees the queue up to the ack
//!  timer ───────────> handle_timeout() ──> Retransmit (go-back-N) | AckTimeout | Expired
//!                     poll_timeout() ────> next deadline
//!  StartRequest ────> attach(last_acked) ──> ResumeOutcome (StartResponse fields)
//!  connection gone ─> detach(): expiry armed
//!  ClientRequest ───> begin_request() ──> Execute | Cached | InFlight | OutOfWindow
//!  upstream answer ─> complete_request()                               | TooManyInflight
//!  handover ────────> export() ──> SessionState ──> Session::import() on the new owner
//! ```
//!
//! # The contract (docs/protocol.md "Sessions")
//!
//! ## Pushes
//! - [`Session::push`] gives the push the next seq: seqs start at 1 and grow by
//!   exactly 1. The queue keeps every push not yet acked, sent or not, up to
//!   `max_queue` pushes and `max_queue_bytes` of payload. At either bound,
//!   policy [`QueuePolicy::Reject`] (the default)
//!   refuses the push with [`PushError::QueueFull`] and the shell disconnects
//!   the connected client as `SLOW_CONSUMER`; policy [`QueuePolicy::DropOldest`]
//!   drops the oldest unacked push, remembers the highest dropped seq
//!   (`trimmed_through`), counts it, and accepts.
//! - While a connection is attached, [`Session::poll_transmit`] yields the
//!   queued pushes not yet sent on that connection, in seq order, and marks
//!   them sent. `redelivery` is true when that seq was sent before, on any
//!   connection (this node or, after a handover, another). Detached: `None`.
//! - [`Session::on_ack`] takes the client's cumulative ack. An ack at or below
//!   the current one is a duplicate or reordered ack: a no-op, counted as
//!   stale. An ack above the highest seq ever sent is a protocol violation,
//!   [`AckError::BeyondSent`], and changes nothing. Otherwise every push up to
//!   the ack is freed and the retransmit state resets.
//! - Retransmit: when the oldest push sent and unacked on this connection has
//!   waited `ack_timeout` since it was (re)sent, everything sent and unacked
//!   becomes unsent again (go-back-N), so `poll_transmit` yields it again in
//!   order with `redelivery = true`, and the retry counter grows. Ack progress
//!   resets the counter. When one more retransmit would exceed `max_retries`
//!   the session instead reports [`SessionEvent::AckTimeout`]: it detaches
//!   itself (keeping its queue for a resume) and the shell closes the
//!   connection with `ACK_TIMEOUT`.
//! - [`Session::poll_timeout`] is the earliest deadline: the retransmit while
//!   attached, the expiry while detached. [`Session::handle_timeout`] acts on
//!   a due deadline and returns at most one [`SessionEvent`].
//!
//! ## Attach, resume, expiry
//! - [`Session::attach`] binds a connection with the client's cumulative
//!   `last_acked` and answers a [`ResumeOutcome`]:
//!   - the first attach of a session made by [`Session::new`] is `NEW`
//!     (`last_acked` is ignored: the client asked for a new session);
//!   - `last_acked` above the highest seq ever assigned is `SEQ_AHEAD`: the
//!     session is left untouched and the shell creates a fresh one;
//!   - if any seq after `last_acked` was dropped by `DropOldest`
//!     (`trimmed_through > last_acked`) it is `TRIMMED`, and delivery
//!     continues from the oldest retained push (`first_available_seq_id`);
//!   - otherwise `RESUMED`: every push after `last_acked` is delivered again,
//!     in order. `last_acked` counts as an ack (frees everything up to it). A
//!     `last_acked` below the session's ack point is not a gap: the client
//!     acked those pushes before, so delivery continues after the ack point.
//!     A `last_acked` above the highest seq sent but not above the highest
//!     assigned is taken as is (an exporter may have sent more than its
//!     export recorded).
//!   - an expired session answers `SESSION_EXPIRED` and stays expired.
//!
//!   On every successful attach all retained pushes become unsent on the new
//!   connection and the retry counter resets. Attaching while another
//!   connection is attached replaces it ([`ResumeOutcome::replaced`]: the
//!   shell closes the old one with `SESSION_REPLACED`).
//! - [`Session::detach`]: the connection is gone. The session sleeps, and
//!   expires at `now + session_timeout` unless a connection attaches first:
//!   then `handle_timeout` reports [`SessionEvent::Expired`] with the number of
//!   pushes lost (never acked), and the shell frees the session.
//!
//! ## Requests: executed at most once
//! [`Session::begin_request`] classifies every `ClientRequest` by seq_id; see
//! [`RequestDisposition`]. Seq 0, seqs `<= highest_seen - request_window` and
//! seqs `> highest_seen + request_window` are out of window. A new seq is
//! recorded as executing (at most `max_inflight` at once), a retry of an
//! executing one waits for it, a retry of a completed one replays the answer
//! given to [`Session::complete_request`]. Answers are kept for the last
//! `request_window` seqs only. Only executions are recorded: an answer that
//! says the request was never executed (`OVERLOADED`, `UPSTREAM_UNAVAILABLE`,
//! `UPSTREAM_OVERLOADED`, `TOO_MANY_INFLIGHT`, see [`is_not_executed`]) frees
//! the seq instead, so the client's retry with the same seq runs.
//!
//! ## Handover
//! Another node takes a session over under a new ownership epoch:
//! [`Session::export`] writes a `gatesvr.session.v1.SessionState`, and
//! [`Session::import`] validates it (no holes, seqs in order, `acked <
//! next`) and yields a detached session ready for `attach`. Instants never
//! leave the process: the expiry re-arms at import, retransmits at the next
//! send. Requests executing at export have an unknown outcome on the new
//! node: a retry is never executed again but answered `UPSTREAM_ERROR`
//! ("outcome unknown", see [`unknown_outcome`]), because the client can find
//! out whether it took effect and the gateway cannot.
//!
//! # Layout
//! - `session.rs`: [`Session`] and what its methods return;
//! - [`config`]: [`SessionConfig`] and [`QueuePolicy`];
//! - `queue`: seqs, the unacked queue, the send cursor, go-back-N;
//! - `body`: a push's payload encoded once ([`PushBody`]) and shared by
//!   every session and retransmit it goes to;
//! - `dedupe`: the request window;
//! - `transfer`: export and import.

use std::time::Instant;

use bytes::Bytes;
use gatesvr_proto::client::{ClientResponse, ResumeStatus, ServerPush};
use gatesvr_proto::session::SessionCounters;

mod body;
pub mod config;
mod dedupe;
mod queue;
mod transfer;

pub use body::{OutgoingPush, PushBody};
pub use config::{ConfigError, QueuePolicy, SessionConfig};
pub use dedupe::{Completion, RequestDisposition, is_not_executed, unknown_outcome};
pub use transfer::ImportError;

use dedupe::RequestWindow;
use queue::PushQueue;

/// Who a session belongs to; fixed for its lifetime and carried by handovers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionIdentity {
    /// Returned in `StartResponse.session_id`; the client resumes with it.
    pub session_id: String,
    /// The user.
    pub openid: String,
    /// The openid's zone, "001".."NNN".
    pub zone: String,
}

/// A push from the upstream, before it has a seq.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PushMessage {
    /// Application message type, opaque to the gateway.
    pub msg_type: String,
    /// Application text content, opaque to the gateway.
    pub content: String,
    /// Application payload, opaque to the gateway.
    pub data: Bytes,
    /// When the gateway accepted it, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

/// Why [`Session::push`] refused a push. Nothing was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// `max_queue` pushes are unacked, or their payloads would exceed
    /// `max_queue_bytes`, and the policy is `Reject`: the client is too slow
    /// (downstream fault). The shell disconnects it as `SLOW_CONSUMER`; the
    /// upstream may retry once the client resumed and acked.
    #[error("{}", if *by_bytes {
        format!("push queue full (unacked pushes would exceed max_queue_bytes, {max_queue_bytes} bytes)")
    } else {
        format!("push queue full ({max_queue} unacked pushes)")
    })]
    QueueFull {
        /// The configured count bound.
        max_queue: usize,
        /// The configured byte bound.
        max_queue_bytes: usize,
        /// The byte bound refused the push (else the count bound did).
        by_bytes: bool,
    },
    /// The session expired; no retry on this session can succeed.
    #[error("session expired")]
    Expired,
}

/// What a valid [`Session::on_ack`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The ack point moved up to `acked_seq`, freeing `freed` pushes (fewer
    /// than the seqs acked if some were trimmed before).
    Advanced {
        /// The new cumulative ack.
        acked_seq: u64,
        /// Pushes removed from the queue.
        freed: u64,
    },
    /// A duplicate or reordered ack at or below the ack point: nothing changed.
    Stale {
        /// The unchanged cumulative ack.
        acked_seq: u64,
    },
}

/// A `ClientAck` the session refuses; its state is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The client acked a seq never sent to it: a client bug (downstream
    /// fault, retrying cannot help). The shell closes the connection with
    /// `PROTOCOL_VIOLATION`.
    #[error("ack of seq {acked} beyond the highest sent seq {highest_sent}")]
    BeyondSent {
        /// The acked seq.
        acked: u64,
        /// The highest seq ever sent.
        highest_sent: u64,
    },
}

/// The answer to [`Session::attach`], which fills the `StartResponse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeOutcome {
    /// `StartResponse.resume_status`. On `SeqAhead` and `SessionExpired` the
    /// session did not attach: the shell creates a fresh session (whose own
    /// first attach says `New`) and reports this status to the client.
    pub status: ResumeStatus,
    /// First seq that will be delivered on this connection, 0 if none is queued.
    pub first_available_seq_id: u64,
    /// The seq of the next new push.
    pub next_seq_id: u64,
    /// Another connection was attached and is now replaced: the shell closes
    /// it with `SESSION_REPLACED`.
    pub replaced: bool,
}

/// Something due at [`Session::poll_timeout`] happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEvent {
    /// The oldest sent push went unacked for `ack_timeout`: `count` pushes
    /// from `from_seq` on are unsent again. The shell keeps calling
    /// `poll_transmit` (informational; count it in metrics).
    Retransmit {
        /// First seq to be sent again.
        from_seq: u64,
        /// Pushes rewound.
        count: u64,
        /// Retransmit rounds since the last ack progress, 1..=max_retries.
        attempt: u32,
    },
    /// `max_retries` retransmits went unacked. The session has detached
    /// itself (and keeps its queue for a resume); the shell closes the
    /// connection with `ACK_TIMEOUT` and must not call `detach`.
    AckTimeout {
        /// The push that was never acked.
        oldest_unacked_seq: u64,
        /// Retransmit rounds made.
        retries: u32,
    },
    /// No connection attached within `session_timeout`. The session is dead:
    /// the shell frees it and counts `lost_pushes` (never acked, now dropped).
    Expired {
        /// Pushes dropped unacked with the session.
        lost_pushes: u64,
    },
}

/// Gauges and counters for the shell's metrics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionStats {
    /// Seq of the next new push.
    pub next_seq_id: u64,
    /// Cumulative ack point.
    pub acked_seq_id: u64,
    /// Retained pushes not yet sent on the current connection (all of them
    /// while detached).
    pub queued: u64,
    /// Retained pushes, sent or not: what `max_queue` bounds.
    pub unacked: u64,
    /// Requests executing.
    pub requests_in_flight: u64,
    /// Answers kept for replay.
    pub requests_cached: u64,
    /// Pushes accepted.
    pub pushes_total: u64,
    /// Pushes sent with `redelivery = true`.
    pub redelivered_total: u64,
    /// Pushes dropped unacked by `DropOldest`.
    pub trimmed_total: u64,
    /// Pushes refused by `Reject`.
    pub rejected_total: u64,
    /// Go-back-N rounds.
    pub retransmits_total: u64,
    /// Duplicate or reordered acks.
    pub stale_acks_total: u64,
    /// Request retries answered from the window (cached, in flight, unknown).
    pub duplicate_requests_total: u64,
    /// Connections attached.
    pub attaches_total: u64,
}

/// Whether a connection is bound to the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// A connection delivers pushes.
    Attached,
    /// No connection; expires at the deadline (`None`: too far to represent).
    Detached { expires_at: Option<Instant> },
    /// Expired; only waits to be freed.
    Expired,
}

/// One openid's session. See the module docs for the contract.
#[derive(Debug, Clone)]
pub struct Session {
    identity: SessionIdentity,
    epoch: u64,
    cfg: SessionConfig,
    link: Link,
    /// Made by `new` and never attached: its first attach is `NEW`.
    fresh: bool,
    queue: PushQueue,
    requests: RequestWindow,
    /// Lifetime counters, kept in their wire form since handovers carry them.
    counters: SessionCounters,
    /// The session a client may still resume in order to attach here, and
    /// what it is told then. Travels with handovers.
    replaces: Option<Replaces>,
}

/// A session that stands in for an earlier one: a client that resumes the
/// earlier session's id attaches here (it may never have got the answer that
/// named this one) and is told `status` again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaces {
    pub session_id: String,
    /// `Recovered` (rebuilt from the earlier session's replicas), or
    /// `SessionExpired` / `SeqAhead` (made fresh by a resume that failed).
    pub status: ResumeStatus,
}

impl Session {
    /// A new, empty session, detached until its first [`attach`](Self::attach)
    /// (which reports `NEW`); it expires `session_timeout` after `now` if none comes.
    pub fn new(identity: SessionIdentity, cfg: SessionConfig, now: Instant) -> Self {
        let link = Link::Detached {
            expires_at: now.checked_add(cfg.session_timeout),
        };
        Self {
            identity,
            epoch: 0,
            cfg,
            link,
            fresh: true,
            queue: PushQueue::new(),
            requests: RequestWindow::default(),
            counters: SessionCounters::default(),
            replaces: None,
        }
    }

    /// Who the session belongs to.
    pub fn identity(&self) -> &SessionIdentity {
        &self.identity
    }

    /// The ownership epoch under which this node holds the session.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sets the ownership epoch (the shell does, on creation and takeover).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// The earlier session a Start may resume to attach here, if any.
    pub fn replaces(&self) -> Option<&Replaces> {
        self.replaces.as_ref()
    }

    /// Marks this session as standing in for `session_id`: a Start resuming
    /// that id attaches here and is told `status`.
    pub fn set_replaces(&mut self, session_id: &str, status: ResumeStatus) {
        self.replaces = Some(Replaces {
            session_id: session_id.to_string(),
            status,
        });
    }

    /// The configuration the session runs with.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Whether a connection is attached.
    pub fn is_attached(&self) -> bool {
        self.link == Link::Attached
    }

    /// Whether the session expired (the shell should have freed it).
    pub fn is_expired(&self) -> bool {
        self.link == Link::Expired
    }

    /// Queues a push; returns its seq. A [`PushBody`] (encoded once, see
    /// `body.rs`) is shared with every other session it is pushed to.
    pub fn push(&mut self, _now: Instant, msg: impl Into<PushBody>) -> Result<u64, PushError> {
        if self.link == Link::Expired {
            return Err(PushError::Expired);
        }
        let bounds = queue::Bounds {
            max_queue: self.cfg.max_queue,
            max_queue_bytes: self.cfg.max_queue_bytes,
            policy: self.cfg.queue_policy,
        };
        match self.queue.push(msg.into(), bounds) {
            Ok((seq, dropped)) => {
                self.counters.pushes_total += 1;
                self.counters.trimmed_total += dropped;
                Ok(seq)
            }
            Err(full) => {
                self.counters.rejected_total += 1;
                Err(PushError::QueueFull {
                    max_queue: self.cfg.max_queue,
                    max_queue_bytes: self.cfg.max_queue_bytes,
                    by_bytes: full == queue::Full::Bytes,
                })
            }
        }
    }

    /// [`push`](Self::push), with the session's new deadline if the push
    /// moved it ([`poll_timeout`](Self::poll_timeout)). Only a trim can: a
    /// push adds an unsent push behind the others, and dropping the oldest
    /// (sent) ones may move the retransmit deadline later. The deadline is
    /// read only then: reading it touches the oldest push, a cache line the
    /// push itself does not (with many sessions that one load was about a
    /// fifth of a push's time under the session's lock).
    pub fn push_moving(
        &mut self,
        now: Instant,
        msg: impl Into<PushBody>,
    ) -> (Result<u64, PushError>, Option<Option<Instant>>) {
        let trimmed = self.counters.trimmed_total;
        let result = self.push(now, msg);
        let moved = (self.counters.trimmed_total != trimmed).then(|| self.poll_timeout());
        (result, moved)
    }

    /// The next push to write on the attached connection, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<ServerPush> {
        self.poll_transmit_encoded(now).map(|p| p.to_push())
    }

    /// [`poll_transmit`](Self::poll_transmit) with the payload still
    /// encoded: what the connection writes (no decode, no copy until the
    /// write buffer).
    pub fn poll_transmit_encoded(&mut self, now: Instant) -> Option<OutgoingPush> {
        if self.link != Link::Attached {
            return None;
        }
        let push = self.queue.poll(now)?;
        if push.redelivery {
            self.counters.redelivered_total += 1;
        }
        Some(push)
    }

    /// Encodes the pushes ready to write on the attached connection into
    /// `out`, as frames, until `out` holds `limit` bytes or none is left;
    /// returns how many. Each frame is built around the queued payload (no
    /// copy of it besides into `out`, no clone of the shared buffer).
    pub fn transmit_into(&mut self, now: Instant, out: &mut bytes::BytesMut, limit: usize) -> u64 {
        if self.link != Link::Attached {
            return 0;
        }
        // Room for every frame up to `limit` at once: `out` grown frame by
        // frame was reallocated (and copied) several times per write.
        out.reserve(self.queue.unsent_bytes_below(limit).unwrap_or(limit));
        let mut sent = 0;
        while out.len() < limit {
            let Some(again) = self.queue.poll_with(now, |seq_id, redelivery, body| {
                body.encode_frame(seq_id, redelivery, out);
                redelivery
            }) else {
                break;
            };
            sent += 1;
            if again {
                self.counters.redelivered_total += 1;
            }
        }
        sent
    }

    /// Whether pushes are written on the attached connection and unacked:
    /// the retransmit deadline runs. A [`transmit_into`](Self::transmit_into)
    /// that writes pushes moves the deadline only when none were (it starts
    /// it); answered without reading the oldest push.
    pub fn has_in_flight(&self) -> bool {
        self.queue.in_flight() > 0
    }

    /// Whether the pushes ready to write may wait for more to share their
    /// write (`server.push_coalesce`): some are unsent, earlier ones are in
    /// flight (written, unacked), and the unsent ones' frames would not fill
    /// `datagram` bytes. With nothing in flight a push is written at once.
    pub fn may_hold_pushes(&self, datagram: usize) -> bool {
        self.link == Link::Attached
            && self.queue.in_flight() > 0
            && self
                .queue
                .unsent_bytes_below(datagram)
                .is_some_and(|b| b > 0)
    }

    /// Payload bytes of the pushes retained until acked.
    pub fn queued_bytes(&self) -> usize {
        self.queue.bytes()
    }

    /// Applies a cumulative `ClientAck`.
    pub fn on_ack(&mut self, _now: Instant, acked_seq: u64) -> Result<AckOutcome, AckError> {
        let outcome = self.queue.ack(acked_seq)?;
        if let AckOutcome::Stale { .. } = outcome {
            self.counters.stale_acks_total += 1;
        }
        Ok(outcome)
    }

    /// The earliest instant at which [`handle_timeout`](Self::handle_timeout)
    /// has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.link {
            Link::Attached => self.queue.retransmit_deadline(self.cfg.ack_timeout),
            Link::Detached { expires_at } => expires_at,
            Link::Expired => None,
        }
    }

    /// Acts on the deadline if it is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<SessionEvent> {
        if self.poll_timeout().is_none_or(|due| now < due) {
            return None;
        }
        match self.link {
            Link::Attached if self.queue.retries() >= self.cfg.max_retries => {
                let event = SessionEvent::AckTimeout {
                    oldest_unacked_seq: self.queue.front(),
                    retries: self.queue.retries(),
                };
                self.detach(now);
                Some(event)
            }
            Link::Attached => {
                let (from_seq, count) = self.queue.go_back();
                self.counters.retransmits_total += 1;
                Some(SessionEvent::Retransmit {
                    from_seq,
                    count,
                    attempt: self.queue.retries(),
                })
            }
            Link::Detached { .. } => {
                self.link = Link::Expired;
                Some(SessionEvent::Expired {
                    lost_pushes: self.queue.len() as u64,
                })
            }
            Link::Expired => None,
        }
    }

    /// Binds a (new) connection that reported `last_acked`; see the module
    /// docs for each status.
    pub fn attach(&mut self, _now: Instant, last_acked: u64) -> ResumeOutcome {
        let refused = |status| ResumeOutcome {
            status,
            first_available_seq_id: 0,
            next_seq_id: self.queue.next_seq(),
            replaced: false,
        };
        let status = if self.link == Link::Expired {
            return refused(ResumeStatus::SessionExpired);
        } else if self.fresh {
            ResumeStatus::New
        } else if last_acked >= self.queue.next_seq() {
            return refused(ResumeStatus::SeqAhead);
        } else if self.queue.trimmed_through() > last_acked {
            ResumeStatus::Trimmed
        } else {
            ResumeStatus::Resumed
        };
        if !self.fresh && last_acked > self.queue.acked() {
            self.queue.free_through(last_acked);
        }
        self.fresh = false;
        let replaced = self.link == Link::Attached;
        self.link = Link::Attached;
        self.queue.reset_connection();
        self.counters.attaches_total += 1;
        ResumeOutcome {
            status,
            first_available_seq_id: if self.queue.len() == 0 {
                0
            } else {
                self.queue.front()
            },
            next_seq_id: self.queue.next_seq(),
            replaced,
        }
    }

    /// The connection is gone; the session waits `session_timeout` for a
    /// resume. No-op unless attached.
    pub fn detach(&mut self, now: Instant) {
        if self.link == Link::Attached {
            self.link = Link::Detached {
                expires_at: now.checked_add(self.cfg.session_timeout),
            };
            self.queue.reset_connection();
        }
    }

    /// Classifies a `ClientRequest` by its seq_id.
    pub fn begin_request(&mut self, seq_id: u64) -> RequestDisposition {
        let (disposition, duplicate) =
            self.requests
                .begin(seq_id, self.cfg.request_window, self.cfg.max_inflight);
        if duplicate {
            self.counters.duplicate_requests_total += 1;
        }
        disposition
    }

    /// Records the answer of a request [`begin_request`](Self::begin_request)
    /// said to execute, for replay to its retries. The shell sends `response`
    /// itself (to the original request and to every retry that got `InFlight`).
    /// A refusal that never reached an upstream ([`is_not_executed`]) is not
    /// recorded: the seq is free again ([`Completion::NotExecuted`]).
    pub fn complete_request(&mut self, seq_id: u64, response: ClientResponse) -> Completion {
        self.requests
            .complete(seq_id, response, self.cfg.request_window)
    }

    /// Current gauges and counters.
    pub fn stats(&self) -> SessionStats {
        let c = &self.counters;
        let unacked = self.queue.len() as u64;
        let sent = if self.link == Link::Attached {
            self.queue.in_flight() as u64
        } else {
            0
        };
        SessionStats {
            next_seq_id: self.queue.next_seq(),
            acked_seq_id: self.queue.acked(),
            queued: unacked - sent,
            unacked,
            requests_in_flight: self.requests.in_flight() as u64,
            requests_cached: self.requests.cached() as u64,
            pushes_total: c.pushes_total,
            redelivered_total: c.redelivered_total,
            trimmed_total: c.trimmed_total,
            rejected_total: c.rejected_total,
            retransmits_total: c.retransmits_total,
            stale_acks_total: c.stale_acks_total,
            duplicate_requests_total: c.duplicate_requests_total,
            attaches_total: c.attaches_total,
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
