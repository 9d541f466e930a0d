//! Arbitrary interleavings of everything the shell can do, against a small
//! model of what the client must observe.
//!
//! Invariants checked after every step (none may ever fail):
//! - no method panics;
//! - push seqs start at 1 and grow by exactly 1 (per session);
//! - within one delivery round (from an attach or a go-back-N retransmit to
//!   the next), yielded seqs strictly increase from the round's start, and
//!   with the `Reject` policy (no trimming) each is the lowest unacked seq not
//!   yet sent in the round: no gaps;
//! - no yielded seq is above `next_seq - 1` or at or below any ack applied;
//! - `redelivery` is true exactly for seqs yielded before;
//! - an ack is refused exactly when it is above everything sent;
//! - unacked pushes never exceed `max_queue`, executing requests never
//!   exceed `max_inflight`;
//! - a request seq is executed at most once, even across handovers, and a
//!   retry of a completed one replays its answer;
//! - no deadline fires early, and none is left in the past after handling;
//! - export -> bytes -> import -> export is the identity.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use gatesvr_proto::client::{ClientResponse, ErrorCode, ResumeStatus};
use gatesvr_proto::session::SessionState;
use proptest::prelude::*;
use prost::Message;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Push,
    Poll(u8),
    Ack(u64),
    Attach(u64),
    Detach,
    Advance(u64),
    Begin(u64),
    Complete(u64),
    Handover,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Push),
        4 => (1u8..4).prop_map(Op::Poll),
        3 => (0u64..24).prop_map(Op::Ack),
        1 => (0u64..24).prop_map(Op::Attach),
        1 => Just(Op::Detach),
        2 => (0u64..70).prop_map(Op::Advance),
        2 => (0u64..16).prop_map(Op::Begin),
        2 => (0u64..16).prop_map(Op::Complete),
        1 => Just(Op::Handover),
    ]
}

fn config() -> impl Strategy<Value = SessionConfig> {
    (1usize..6, any::<bool>(), 0u32..3, 1u64..6, 1usize..4).prop_map(
        |(max_queue, drop_oldest, max_retries, request_window, max_inflight)| SessionConfig {
            ack_timeout: Duration::from_secs(10),
            max_retries,
            max_queue,
            max_queue_bytes: 1 << 20,
            queue_policy: if drop_oldest {
                QueuePolicy::DropOldest
            } else {
                QueuePolicy::Reject
            },
            session_timeout: Duration::from_secs(60),
            request_window,
            max_inflight,
        },
    )
}

fn answer(seq_id: u64) -> ClientResponse {
    ClientResponse {
        seq_id,
        payload: seq_id.to_be_bytes().to_vec(),
        ..ClientResponse::default()
    }
}

/// What the client side has observed of one session.
#[derive(Default)]
struct Model {
    next_seq: u64,
    /// Highest ack the session accepted (on_ack or resume).
    acked: u64,
    /// Highest seq the session may count as sent (yielded, or acked on resume).
    highest_sent: u64,
    ever_sent: BTreeSet<u64>,
    attached: bool,
    /// Never attached nor handed over: the next attach is `NEW`.
    fresh: bool,
    /// Lowest seq the current round may start at, and the last seq yielded in it.
    round_start: u64,
    round_last: Option<u64>,
    executed: BTreeSet<u64>,
    executing: BTreeSet<u64>,
    /// Executing during a handover: never to be executed again.
    unknown: BTreeSet<u64>,
}

impl Model {
    fn new() -> Self {
        Self {
            next_seq: 1,
            fresh: true,
            ..Self::default()
        }
    }

    fn end_round(&mut self, start: u64) {
        self.round_start = start;
        self.round_last = None;
    }
}

fn identity() -> SessionIdentity {
    SessionIdentity {
        session_id: "s".into(),
        openid: "o".into(),
        zone: "001".into(),
    }
}

fn run(cfg: SessionConfig, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut now = Instant::now();
    let mut s = Session::new(identity(), cfg.clone(), now);
    let mut m = Model::new();
    for op in ops {
        match op {
            Op::Push => match s.push(now, PushMessage::default()) {
                Ok(seq) => {
                    prop_assert_eq!(seq, m.next_seq);
                    m.next_seq += 1;
                }
                Err(e) => {
                    prop_assert_eq!(
                        e,
                        PushError::QueueFull {
                            max_queue: cfg.max_queue,
                            max_queue_bytes: cfg.max_queue_bytes,
                            by_bytes: false,
                        }
                    );
                    prop_assert_eq!(cfg.queue_policy, QueuePolicy::Reject);
                    prop_assert_eq!(s.stats().unacked, cfg.max_queue as u64);
                }
            },
            Op::Poll(n) => {
                for _ in 0..n {
                    let Some(p) = s.poll_transmit(now) else {
                        break;
                    };
                    prop_assert!(m.attached);
                    let seq = p.seq_id;
                    prop_assert!(seq < m.next_seq, "seq {} never assigned", seq);
                    prop_assert!(seq > m.acked, "acked seq {} yielded again", seq);
                    prop_assert_eq!(p.redelivery, m.ever_sent.contains(&seq));
                    let floor = m
                        .round_last
                        .map_or(m.round_start, |l| l + 1)
                        .max(m.acked + 1);
                    if cfg.queue_policy == QueuePolicy::Reject {
                        prop_assert_eq!(seq, floor, "gap or reorder in a round");
                    } else {
                        prop_assert!(seq >= floor, "seq {} below {} in a round", seq, floor);
                    }
                    m.round_last = Some(seq);
                    m.ever_sent.insert(seq);
                    m.highest_sent = m.highest_sent.max(seq);
                }
            }
            Op::Ack(k) => match s.on_ack(now, k) {
                Ok(AckOutcome::Stale { acked_seq }) => {
                    prop_assert!(k <= m.acked);
                    prop_assert_eq!(acked_seq, m.acked);
                }
                Ok(AckOutcome::Advanced { acked_seq, .. }) => {
                    prop_assert!(k > m.acked && k <= m.highest_sent);
                    prop_assert_eq!(acked_seq, k);
                    m.acked = k;
                }
                Err(AckError::BeyondSent {
                    acked,
                    highest_sent,
                }) => {
                    prop_assert!(k > m.acked && k > m.highest_sent);
                    prop_assert_eq!((acked, highest_sent), (k, m.highest_sent));
                }
            },
            Op::Attach(last) => {
                let out = s.attach(now, last);
                match out.status {
                    ResumeStatus::SeqAhead => {
                        prop_assert!(!m.fresh && last >= m.next_seq);
                        prop_assert_eq!(s.is_attached(), m.attached);
                        continue;
                    }
                    ResumeStatus::New => prop_assert!(m.fresh),
                    ResumeStatus::Resumed | ResumeStatus::Trimmed => {
                        prop_assert!(!m.fresh && last < m.next_seq);
                        if last > m.acked {
                            m.acked = last;
                            m.highest_sent = m.highest_sent.max(last);
                        }
                    }
                    ResumeStatus::SessionExpired => {
                        prop_assert!(false, "expired sessions are replaced")
                    }
                    ResumeStatus::Recovered => {
                        prop_assert!(false, "only the registry reports RECOVERED")
                    }
                }
                prop_assert_eq!(out.replaced, m.attached);
                prop_assert_eq!(out.next_seq_id, m.next_seq);
                if out.first_available_seq_id != 0 {
                    prop_assert!(out.first_available_seq_id > m.acked);
                }
                m.attached = true;
                m.fresh = false;
                m.end_round(out.first_available_seq_id.max(m.acked + 1));
            }
            Op::Detach => {
                s.detach(now);
                m.attached = false;
            }
            Op::Advance(secs) => {
                now += Duration::from_secs(secs);
                for _ in 0..8 {
                    let due = s.poll_timeout();
                    let unacked = s.stats().unacked;
                    let Some(event) = s.handle_timeout(now) else {
                        break;
                    };
                    prop_assert!(due.is_some_and(|d| d <= now), "fired early");
                    match event {
                        SessionEvent::Retransmit {
                            from_seq, attempt, ..
                        } => {
                            prop_assert!(m.attached);
                            prop_assert!(attempt >= 1 && attempt <= cfg.max_retries);
                            m.end_round(from_seq);
                        }
                        SessionEvent::AckTimeout { .. } => {
                            prop_assert!(m.attached);
                            prop_assert!(!s.is_attached());
                            m.attached = false;
                        }
                        SessionEvent::Expired { lost_pushes } => {
                            prop_assert!(!m.attached);
                            prop_assert_eq!(lost_pushes, unacked);
                            // The shell frees it and the client starts over.
                            s = Session::new(identity(), cfg.clone(), now);
                            m = Model::new();
                        }
                    }
                }
                prop_assert!(
                    s.poll_timeout().is_none_or(|d| d > now),
                    "deadline left in the past"
                );
            }
            Op::Begin(seq) => match s.begin_request(seq) {
                RequestDisposition::Execute => {
                    prop_assert!(m.executed.insert(seq), "seq {} executed twice", seq);
                    prop_assert!(!m.unknown.contains(&seq));
                    m.executing.insert(seq);
                }
                RequestDisposition::Cached(resp) => {
                    if m.unknown.contains(&seq) {
                        prop_assert_eq!(resp.code, ErrorCode::UpstreamError as i32);
                        prop_assert_eq!(resp.seq_id, seq);
                    } else {
                        prop_assert_eq!(resp, answer(seq));
                    }
                }
                RequestDisposition::InFlight => prop_assert!(m.executing.contains(&seq)),
                RequestDisposition::OutOfWindow { lowest, highest } => {
                    prop_assert!(seq == 0 || seq < lowest || seq > highest);
                }
                RequestDisposition::TooManyInflight { max_inflight } => {
                    prop_assert_eq!(m.executing.len(), max_inflight);
                }
            },
            Op::Complete(seq) => {
                let done = s.complete_request(seq, answer(seq));
                prop_assert_eq!(done != Completion::NotInFlight, m.executing.remove(&seq));
            }
            Op::Handover => {
                let state = s.export();
                let bytes = state.encode_to_vec();
                let decoded = SessionState::decode(bytes.as_slice());
                prop_assert!(decoded.as_ref().is_ok_and(|d| *d == state));
                let imported = Session::import(state.clone(), now, cfg.clone());
                prop_assert!(imported.is_ok(), "{:?}", imported.err());
                if let Ok(imported) = imported {
                    prop_assert_eq!(imported.export(), state);
                    s = imported;
                }
                m.attached = false;
                m.fresh = false;
                m.unknown.extend(std::mem::take(&mut m.executing));
            }
        }
        let st = s.stats();
        prop_assert!(st.unacked <= cfg.max_queue as u64);
        prop_assert!(st.requests_in_flight <= cfg.max_inflight as u64);
        prop_assert_eq!(st.next_seq_id, m.next_seq);
        prop_assert_eq!(st.acked_seq_id, m.acked);
        prop_assert_eq!(s.is_attached(), m.attached);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn interleavings_keep_the_invariants(
        cfg in config(),
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        run(cfg, ops)?;
    }
}

/// A handover of a session that is mid-retransmit, mid-resume and
/// mid-request, replayed as a fixed case so it never depends on shrinking.
#[test]
fn fixed_interleaving_across_handovers() {
    let cfg = SessionConfig {
        max_queue: 4,
        max_retries: 1,
        request_window: 3,
        max_inflight: 2,
        ..SessionConfig::default()
    };
    let ops = vec![
        Op::Attach(0),
        Op::Push,
        Op::Push,
        Op::Push,
        Op::Poll(3),
        Op::Ack(1),
        Op::Begin(1),
        Op::Begin(2),
        Op::Complete(1),
        Op::Advance(30),
        Op::Poll(1),
        Op::Handover,
        Op::Begin(2),
        Op::Attach(2),
        Op::Poll(3),
        Op::Ack(3),
        Op::Begin(3),
        Op::Handover,
        Op::Attach(3),
        Op::Push,
        Op::Poll(3),
        Op::Advance(400),
        Op::Advance(400),
    ];
    run(cfg, ops).unwrap();
}
