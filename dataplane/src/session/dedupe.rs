//! Request dedupe: every request seq_id is executed at most once.
//!
//! The window is `lowest..=highest_seen + request_window` with
//! `lowest = max(1, highest_seen - request_window + 1)`. Answers are kept for
//! seqs `>= lowest` only, so memory is bounded by `request_window` answers plus
//! `max_inflight` executing requests. A seq that falls below the window can
//! never be executed again: `highest_seen` only grows.

use std::collections::{BTreeMap, BTreeSet};

use gatesvr_proto::client::{ClientResponse, ErrorCode};

/// What the shell does with a `ClientRequest`, from
/// [`Session::begin_request`](super::Session::begin_request).
#[derive(Debug, Clone, PartialEq)]
pub enum RequestDisposition {
    /// First time this seq is seen: forward it to the upstream, then call
    /// [`Session::complete_request`](super::Session::complete_request) with the answer.
    Execute,
    /// A retry of a request already answered: send this response again,
    /// without contacting the upstream. For a request whose outcome was lost
    /// in a handover this is an `UPSTREAM_ERROR` answer (see [`unknown_outcome`]);
    /// its `msg_id` is 0, so the shell copies the retry's `msg_id` into it.
    Cached(ClientResponse),
    /// A retry of a request still executing: answer it when the original
    /// completes (one upstream call, one or more identical responses).
    InFlight,
    /// The seq is 0 or outside `lowest..=highest`: answer `SEQ_OUT_OF_WINDOW`.
    /// Nothing was recorded.
    OutOfWindow {
        /// Lowest seq_id currently accepted.
        lowest: u64,
        /// Highest seq_id currently accepted.
        highest: u64,
    },
    /// `max_inflight` requests are executing: answer `TOO_MANY_INFLIGHT`.
    /// Nothing was recorded; the client may retry the same seq later.
    TooManyInflight {
        /// The configured bound.
        max_inflight: usize,
    },
}

/// What [`Session::complete_request`](super::Session::complete_request) did with an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Kept for replay to retries.
    Stored,
    /// The answer is a refusal given before the request reached an upstream
    /// (see [`is_not_executed`]): nothing is kept and the seq is free again,
    /// so a retry with the same seq runs.
    NotExecuted,
    /// The request finished after its seq left the window: nothing is kept,
    /// and no retry can reach it (it would be `OutOfWindow`).
    OutOfWindow,
    /// The seq was not executing (never begun, already completed, or begun on
    /// another node before a handover). Ignored: a shell bug or a late
    /// answer after a handover.
    NotInFlight,
}

/// The answer to a retry of a request whose outcome is unknown: it was
/// executing on the node that exported the session, and that node's answer
/// did not travel with the state. Re-executing could apply it twice, so the
/// client is told to find out by itself.
pub fn unknown_outcome(seq_id: u64) -> ClientResponse {
    ClientResponse {
        seq_id,
        code: ErrorCode::UpstreamError as i32,
        message: "outcome unknown: the request was executing when the session moved to \
                  another gateway node; it may or may not have taken effect"
            .to_owned(),
        ..ClientResponse::default()
    }
}

/// Whether an answer with this code means the request never reached an
/// upstream, so that recording it would make every retry of the seq fail the
/// same way forever (docs/protocol.md §5, "Retry rule per code"):
/// - `OVERLOADED`: refused by the node's admission or concurrency limit;
/// - `UPSTREAM_UNAVAILABLE`: no instance could be reached, or the instance
///   answered gRPC `UNAVAILABLE` (which the upstream contract reserves for
///   requests it did not execute); a request that may have reached an upstream
///   is never answered with this code (see `ForwardError::code`);
/// - `UPSTREAM_OVERLOADED`: the upstream shed it (`RESOURCE_EXHAUSTED`, or
///   `UNAVAILABLE` with a retry pushback), which the contract likewise
///   reserves for requests it did not execute;
/// - `TOO_MANY_INFLIGHT`: refused by the session's own bound.
///
/// So every code that carries `retry_after_ms` is one of these.
///
/// Every other answer, success or failure, is an execution (or may be one)
/// and is kept for replay.
pub fn is_not_executed(code: i32) -> bool {
    code == ErrorCode::Overloaded as i32
        || code == ErrorCode::UpstreamUnavailable as i32
        || code == ErrorCode::UpstreamOverloaded as i32
        || code == ErrorCode::TooManyInflight as i32
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct RequestWindow {
    /// Highest seq ever begun (0 = none).
    highest: u64,
    /// Answers of completed requests, seqs `>= lowest`.
    completed: BTreeMap<u64, ClientResponse>,
    /// Requests executing on this node.
    in_flight: BTreeSet<u64>,
    /// Requests of unknown outcome (executing when a previous node exported
    /// the session), seqs `>= lowest`, not yet retried.
    unknown: BTreeSet<u64>,
}

impl RequestWindow {
    /// Rebuilds the window from a validated handover. Entries below the
    /// window of `window` (the importer's, maybe smaller) are dropped.
    pub(super) fn restored(
        highest: u64,
        completed: BTreeMap<u64, ClientResponse>,
        unknown: BTreeSet<u64>,
        window: u64,
    ) -> Self {
        let mut w = Self {
            highest,
            completed,
            in_flight: BTreeSet::new(),
            unknown,
        };
        w.evict(window);
        w
    }

    pub(super) fn highest(&self) -> u64 {
        self.highest
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub(super) fn cached(&self) -> usize {
        self.completed.len()
    }

    fn bounds(&self, window: u64) -> (u64, u64) {
        (
            self.highest.saturating_sub(window) + 1,
            self.highest.saturating_add(window),
        )
    }

    /// Classifies a request; returns whether it was a duplicate (a retry).
    pub(super) fn begin(
        &mut self,
        seq: u64,
        window: u64,
        max_inflight: usize,
    ) -> (RequestDisposition, bool) {
        let (lowest, highest) = self.bounds(window);
        if seq == 0 || seq < lowest || seq > highest {
            return (RequestDisposition::OutOfWindow { lowest, highest }, false);
        }
        if let Some(resp) = self.completed.get(&seq) {
            return (RequestDisposition::Cached(resp.clone()), true);
        }
        if self.in_flight.contains(&seq) {
            return (RequestDisposition::InFlight, true);
        }
        if self.unknown.remove(&seq) {
            // From now on it is an ordinary completed request: every retry
            // gets the same answer.
            let resp = unknown_outcome(seq);
            self.completed.insert(seq, resp.clone());
            return (RequestDisposition::Cached(resp), true);
        }
        if self.in_flight.len() >= max_inflight {
            return (RequestDisposition::TooManyInflight { max_inflight }, false);
        }
        self.in_flight.insert(seq);
        if seq > self.highest {
            self.highest = seq;
            self.evict(window);
        }
        (RequestDisposition::Execute, false)
    }

    pub(super) fn complete(&mut self, seq: u64, resp: ClientResponse, window: u64) -> Completion {
        if !self.in_flight.remove(&seq) {
            return Completion::NotInFlight;
        }
        if is_not_executed(resp.code) {
            // `highest` may have grown when it began; that only widens the
            // window upwards, and this seq stays inside it (it is <= highest).
            return Completion::NotExecuted;
        }
        if seq < self.bounds(window).0 {
            return Completion::OutOfWindow;
        }
        self.completed.insert(seq, resp);
        Completion::Stored
    }

    /// Drops answers that fell below the window. Executing requests stay:
    /// they are bounded by `max_inflight` and must still be completed.
    ///
    /// Popped from the front: a new highest seq usually drops one answer, and
    /// `split_off` would build a new tree for the whole rest each time (~2k
    /// instructions per request at 1 in flight; docs/benchmarks.md session 11).
    fn evict(&mut self, window: u64) {
        let lowest = self.bounds(window).0;
        while let Some(first) = self.completed.first_entry() {
            if *first.key() >= lowest {
                break;
            }
            first.remove();
        }
        while self.unknown.first().is_some_and(|s| *s < lowest) {
            self.unknown.pop_first();
        }
    }

    /// Answers kept for replay, ascending.
    pub(super) fn completed(&self) -> impl Iterator<Item = (u64, &ClientResponse)> {
        self.completed.iter().map(|(s, r)| (*s, r))
    }

    /// Seqs whose outcome an importer cannot know: executing here, or
    /// already unknown. Ascending; only those a retry can still reach.
    pub(super) fn unknown_on_export(&self, window: u64) -> Vec<u64> {
        let lowest = self.bounds(window).0;
        self.in_flight
            .union(&self.unknown)
            .copied()
            .filter(|s| *s >= lowest)
            .collect()
    }
}
