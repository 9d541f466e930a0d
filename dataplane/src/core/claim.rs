//! [`ClaimRetry`]: how long, and how often, a Start's ownership claim is
//! tried again while the control plane cannot answer it, sans-IO.
//!
//! A Start claims its session in the control plane (a raft commit) before it
//! is answered. While the control plane elects a new leader (its leader
//! crashed: with the shipped raft timings a follower waits 1.5-3 s before it
//! stands, and `gate-bench failover` measures ~5 s until a new leader), every
//! claim fails: the dead member refuses the connection, a follower answers
//! UNAVAILABLE ("no leader known", "leader did not answer"), or the call
//! finds no answer within `rpc_timeout`. None of those is an answer to the
//! claim: the next leader will commit it. So such a failure
//! ([`ClaimFailure::Unavailable`]) is tried again with a growing pause until
//! the Start's patience runs out, and only then does the Start fall back to a
//! provisional session (static stability).
//!
//! An election longer than this node's lease (3 s by default) leaves one more
//! failure behind it: the node's lease expired (no leader renewed it). Since
//! session 17 the new leader's claim renews such a lease, but a control plane
//! may still answer FAILED_PRECONDITION "node is not active" (the node was
//! declared dead meanwhile; a member older than session 17 during a rolling
//! upgrade, which refused every claim until the node's next heartbeat, still
//! in its back-off of up to 2 s). Such an answer, while this node's own lease
//! view agrees that its lease lapsed, is [`ClaimFailure::LeaseLapsed`]: the
//! shell sends a heartbeat at once and claims again after its renewal
//! ([`ClaimNext::AfterRenewal`]). Until session 15 the Start was refused with
//! DRAINING there, and the client's retry on another node met the same answer
//! (`gate-bench failover` part (b): every failed Start attempt across the
//! leader kill).
//!
//! A refusal ([`ClaimFailure::Refused`]: "not active" while this node's lease
//! holds, i.e. cordoned or left; a malformed claim) is the control plane's
//! answer and is not tried again, as Envoy's `retry_on` and etcd's client
//! retry "unavailable / no leader", never a refusal or a fencing error.
//! Retrying is safe: a claim of the same session by the same node is
//! idempotent in the control plane.
//!
//! ```text
//!  Start ─ claim ─✗ unavailable ─ 25 ms ─ claim ─✗ ─ 50 ms ─ … ─ ≤ 250 ms ─ claim ─✗ lease lapsed
//!        ─ heartbeat now ─ renewed ─ claim ─✓ claimed
//!        │<──────────────── patience (control_plane.claim_patience, 7 s) ────────────────>│
//!        every attempt ends by the deadline; past it: provisional session (unavailable,
//!        lease lapsed) or, at once, DRAINING (refused)
//! ```
//!
//! The patience stays below the client's connect timeout (the SDK's
//! `connect_timeout`, 10 s, covers the handshake and the Start): the client
//! hears an answer, claimed or provisional, instead of giving up and taking
//! the same election to another node.

use std::time::{Duration, Instant};

/// Why one claim attempt failed, as far as retrying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimFailure {
    /// No answer to the claim: no leader, a leader change, a member down or
    /// shutting down, a call broken or timed out. The next leader may commit it.
    Unavailable,
    /// "Not active" while this node's own lease has lapsed too: no leader
    /// renewed it (an election). The next renewal cures it.
    LeaseLapsed,
    /// The control plane answered and refused: trying again gets the same answer.
    Refused,
}

/// What the shell does after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimNext {
    /// Claim again at this instant (the attempt still ends by
    /// [`ClaimRetry::deadline`]).
    RetryAt(Instant),
    /// Renew this node's lease now, and claim again once it was renewed
    /// (unless the deadline comes first).
    AfterRenewal,
    /// Stop: a refusal, or the patience ran out. The Start falls back on
    /// what the last failure calls for (provisional, or DRAINING).
    GiveUp,
}

/// One Start's claim attempts: when to try again and when to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRetry {
    deadline: Instant,
    backoff: Duration,
    retries: u32,
}

impl ClaimRetry {
    /// The pause after the first unavailable answer; doubled after each
    /// (Envoy's default retry back-off base).
    pub const FIRST_BACKOFF: Duration = Duration::from_millis(25);
    /// The longest pause between two attempts: once a leader is elected, a
    /// waiting Start claims within this (ten times the base, as Envoy's).
    pub const MAX_BACKOFF: Duration = Duration::from_millis(250);

    /// A Start's first claim goes out at `now`; no attempt ends after
    /// `now + patience`.
    pub fn new(now: Instant, patience: Duration) -> Self {
        Self {
            deadline: now + patience,
            backoff: Self::FIRST_BACKOFF,
            retries: 0,
        }
    }

    /// When the Start stops waiting for the control plane: each attempt is
    /// cut off here (an attempt in flight may still commit; the session then
    /// runs provisionally and is claimed again, as after an outage).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Attempts tried again so far.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// An attempt failed at `now` with `failure`: claim again, or stop.
    pub fn failed(&mut self, now: Instant, failure: ClaimFailure) -> ClaimNext {
        match failure {
            ClaimFailure::Refused => return ClaimNext::GiveUp,
            ClaimFailure::LeaseLapsed if now < self.deadline => {
                self.retries += 1;
                return ClaimNext::AfterRenewal;
            }
            ClaimFailure::LeaseLapsed => return ClaimNext::GiveUp,
            ClaimFailure::Unavailable => {}
        }
        let at = now + self.backoff;
        if at >= self.deadline {
            return ClaimNext::GiveUp;
        }
        self.backoff = (self.backoff * 2).min(Self::MAX_BACKOFF);
        self.retries += 1;
        ClaimNext::RetryAt(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENCE: Duration = Duration::from_secs(7);

    #[test]
    fn an_unavailable_control_plane_is_tried_again_with_a_growing_pause_up_to_the_cap() {
        let t0 = Instant::now();
        let mut r = ClaimRetry::new(t0, PATIENCE);
        let mut now = t0;
        let mut pauses = Vec::new();
        for _ in 0..6 {
            let ClaimNext::RetryAt(at) = r.failed(now, ClaimFailure::Unavailable) else {
                panic!("gave up within its patience");
            };
            pauses.push(at - now);
            now = at;
        }
        let ms = |m| Duration::from_millis(m);
        assert_eq!(pauses, [ms(25), ms(50), ms(100), ms(200), ms(250), ms(250)]);
        assert_eq!(r.retries(), 6);
    }

    #[test]
    fn a_refusal_is_not_tried_again() {
        let t0 = Instant::now();
        let mut r = ClaimRetry::new(t0, PATIENCE);
        assert_eq!(r.failed(t0, ClaimFailure::Refused), ClaimNext::GiveUp);
        // Not even after unavailable answers.
        let mut r = ClaimRetry::new(t0, PATIENCE);
        assert!(matches!(
            r.failed(t0, ClaimFailure::Unavailable),
            ClaimNext::RetryAt(_)
        ));
        assert_eq!(r.failed(t0, ClaimFailure::Refused), ClaimNext::GiveUp);
        assert_eq!(r.retries(), 1);
    }

    #[test]
    fn a_lease_lapsed_during_an_election_is_renewed_and_the_claim_tried_again() {
        let t0 = Instant::now();
        let mut r = ClaimRetry::new(t0, PATIENCE);
        // The election: no answer, tried again.
        assert!(matches!(
            r.failed(t0, ClaimFailure::Unavailable),
            ClaimNext::RetryAt(_)
        ));
        // The new leader finds this node's lease expired: renew, then claim.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(
            r.failed(later, ClaimFailure::LeaseLapsed),
            ClaimNext::AfterRenewal
        );
        assert_eq!(r.retries(), 2);
        // Not past the patience.
        assert_eq!(
            r.failed(t0 + PATIENCE, ClaimFailure::LeaseLapsed),
            ClaimNext::GiveUp
        );
    }

    #[test]
    fn no_attempt_is_planned_at_or_past_the_deadline() {
        let t0 = Instant::now();
        let mut r = ClaimRetry::new(t0, PATIENCE);
        let mut now = t0;
        loop {
            match r.failed(now, ClaimFailure::Unavailable) {
                ClaimNext::RetryAt(at) => {
                    assert!(at < r.deadline(), "planned at the deadline or past it");
                    now = at;
                }
                ClaimNext::GiveUp => break,
                ClaimNext::AfterRenewal => panic!("no renewal asked for an unavailable answer"),
            }
        }
        assert_eq!(r.deadline(), t0 + PATIENCE);
        // A failure found at the deadline (an attempt cut off there) ends it.
        let mut r = ClaimRetry::new(t0, PATIENCE);
        assert_eq!(
            r.failed(t0 + PATIENCE, ClaimFailure::Unavailable),
            ClaimNext::GiveUp
        );
    }
}
