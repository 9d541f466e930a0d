//! Handover: a session leaves one node as a `gatesvr.session.v1.SessionState`
//! and arrives on another, under the importer's epoch and config.
//!
//! Import trusts nothing: the state may come from an older or newer GateSvr,
//! or be corrupt, or be made up by whoever reached the Peer service. Every
//! relation the session relies on is checked, so that a bad export fails
//! loudly here instead of yielding wrong seqs to a client; every number is
//! bounded by [`MAX_SEQ`] and every sum or difference on them is checked, so
//! no peer-supplied value can make a later `+ 1` overflow.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use gatesvr_proto::session::{CompletedRequest, SessionState};

use super::dedupe::RequestWindow;
use super::queue::PushQueue;
use super::{Link, Replaces, Session, SessionConfig, SessionIdentity};
use gatesvr_proto::client::ResumeStatus;

/// Largest seq (push or request) an imported session may carry: half the
/// `u64` range, so the session can keep counting from it for longer than
/// any deployment lives without an overflow (one push per nanosecond for
/// almost 300 years).
pub const MAX_SEQ: u64 = u64::MAX / 2;

/// Why [`Session::import`] refused a `SessionState`. The state is corrupt or
/// from an incompatible exporter (an internal fault, not the client's):
/// retrying the same bytes cannot help; the shell treats the session as
/// unknown, so the client's resume gets `SESSION_EXPIRED`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// `session_id` or `openid` is empty.
    #[error("session state has an empty {0}")]
    MissingIdentity(&'static str),
    /// `next_seq_id` is 0; seqs start at 1.
    #[error("next_seq_id is 0")]
    NextSeqZero,
    /// A seq field is at or beyond `next_seq_id` (acked, trimmed or sent
    /// something never assigned).
    #[error("{field} {value} is not below next_seq_id {next_seq}")]
    SeqNotAssigned {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// `next_seq_id`.
        next_seq: u64,
    },
    /// `acked_seq_id` is above `highest_sent_seq_id`.
    #[error("acked_seq_id {acked} is above highest_sent_seq_id {highest_sent}")]
    AckedBeyondSent {
        /// `acked_seq_id`.
        acked: u64,
        /// `highest_sent_seq_id`.
        highest_sent: u64,
    },
    /// The pushes are not exactly the retained range, ascending without holes.
    #[error("push #{index} has seq {found}, expected {expected}")]
    PushSeq {
        /// Position in `pushes`.
        index: usize,
        /// The seq it should have.
        expected: u64,
        /// The seq it has.
        found: u64,
    },
    /// Fewer pushes than the retained range `front..next_seq_id`.
    #[error("{found} pushes, expected {expected} (seqs {front}..{next_seq})")]
    PushCount {
        /// First retained seq.
        front: u64,
        /// `next_seq_id`.
        next_seq: u64,
        /// `next_seq_id - front`.
        expected: u64,
        /// `pushes.len()`.
        found: usize,
    },
    /// A request seq in the dedupe window is 0, above
    /// `highest_request_seq_id`, listed twice, or out of order.
    #[error("request seq {seq} invalid in the dedupe window (highest {highest})")]
    RequestSeq {
        /// The offending seq.
        seq: u64,
        /// `highest_request_seq_id`.
        highest: u64,
    },
    /// A completed request has no response.
    #[error("completed request {0} has no response")]
    MissingResponse(u64),
    /// A seq beyond [`MAX_SEQ`]: counting on from it could overflow.
    #[error("{field} {value} is above the largest importable seq {MAX_SEQ}")]
    SeqOutOfRange {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

impl Session {
    /// The session as a handover message. Deadlines and the attached
    /// connection are not part of it. Once the state has left, the shell
    /// stops using this session (closing its connection, dropping pushes to
    /// it): two live copies would hand out the same seqs twice.
    pub fn export(&self) -> SessionState {
        let q = &self.queue;
        let window = self.cfg.request_window;
        SessionState {
            session_id: self.identity.session_id.clone(),
            openid: self.identity.openid.clone(),
            zone: self.identity.zone.clone(),
            epoch: self.epoch,
            next_seq_id: q.next_seq(),
            acked_seq_id: q.acked(),
            trimmed_through_seq_id: q.trimmed_through(),
            highest_sent_seq_id: q.highest_sent(),
            pushes: q.export(),
            highest_request_seq_id: self.requests.highest(),
            completed_requests: self
                .requests
                .completed()
                .map(|(seq_id, resp)| CompletedRequest {
                    seq_id,
                    response: Some(resp.clone()),
                })
                .collect(),
            unknown_outcome_request_seq_ids: self.requests.unknown_on_export(window),
            counters: Some(self.counters),
            replaces_session_id: self
                .replaces
                .as_ref()
                .map(|r| r.session_id.clone())
                .unwrap_or_default(),
            replaces_status: self
                .replaces
                .as_ref()
                .map_or(ResumeStatus::New, |r| r.status)
                .into(),
        }
    }

    /// A detached session from a handover, expiring `session_timeout` after
    /// `now` unless a connection attaches. Its epoch is the exporter's; the
    /// shell sets its own with [`set_epoch`](Self::set_epoch).
    pub fn import(
        state: SessionState,
        now: Instant,
        cfg: SessionConfig,
    ) -> Result<Session, ImportError> {
        validate_seqs(&state)?;
        let requests = restore_requests(&state, cfg.request_window)?;
        if state.session_id.is_empty() {
            return Err(ImportError::MissingIdentity("session_id"));
        }
        if state.openid.is_empty() {
            return Err(ImportError::MissingIdentity("openid"));
        }
        let queue = PushQueue::restored(
            state.next_seq_id,
            state.acked_seq_id,
            state.trimmed_through_seq_id,
            state.highest_sent_seq_id,
            state.pushes,
        );
        Ok(Session {
            identity: SessionIdentity {
                session_id: state.session_id,
                openid: state.openid,
                zone: state.zone,
            },
            epoch: state.epoch,
            link: Link::Detached {
                expires_at: now.checked_add(cfg.session_timeout),
            },
            cfg,
            fresh: false,
            queue,
            requests,
            counters: state.counters.unwrap_or_default(),
            replaces: replaces_of(&state.replaces_session_id, state.replaces_status),
        })
    }
}

/// The `Replaces` a state carries. An unset or unknown status is RECOVERED:
/// what nodes older than `replaces_status` meant by `replaces_session_id`.
fn replaces_of(session_id: &str, status: i32) -> Option<Replaces> {
    if session_id.is_empty() {
        return None;
    }
    let status = match ResumeStatus::try_from(status) {
        Ok(s @ (ResumeStatus::SessionExpired | ResumeStatus::SeqAhead)) => s,
        _ => ResumeStatus::Recovered,
    };
    Some(Replaces {
        session_id: session_id.to_string(),
        status,
    })
}

fn validate_seqs(s: &SessionState) -> Result<(), ImportError> {
    let next_seq = s.next_seq_id;
    if next_seq == 0 {
        return Err(ImportError::NextSeqZero);
    }
    for (field, value) in [
        ("next_seq_id", next_seq),
        ("highest_request_seq_id", s.highest_request_seq_id),
    ] {
        if value > MAX_SEQ {
            return Err(ImportError::SeqOutOfRange { field, value });
        }
    }
    for (field, value) in [
        ("acked_seq_id", s.acked_seq_id),
        ("trimmed_through_seq_id", s.trimmed_through_seq_id),
        ("highest_sent_seq_id", s.highest_sent_seq_id),
    ] {
        if value >= next_seq {
            return Err(ImportError::SeqNotAssigned {
                field,
                value,
                next_seq,
            });
        }
    }
    if s.acked_seq_id > s.highest_sent_seq_id {
        return Err(ImportError::AckedBeyondSent {
            acked: s.acked_seq_id,
            highest_sent: s.highest_sent_seq_id,
        });
    }
    // Both below next_seq <= MAX_SEQ (checked above): neither can fail, but
    // a peer's numbers get checked arithmetic, not reasoning.
    let out_of_range = |field, value| ImportError::SeqOutOfRange { field, value };
    let front = s
        .acked_seq_id
        .max(s.trimmed_through_seq_id)
        .checked_add(1)
        .ok_or(out_of_range("acked_seq_id", s.acked_seq_id))?;
    let expected = next_seq
        .checked_sub(front)
        .ok_or(out_of_range("next_seq_id", next_seq))?;
    if u64::try_from(s.pushes.len()).ok() != Some(expected) {
        return Err(ImportError::PushCount {
            front,
            next_seq,
            expected,
            found: s.pushes.len(),
        });
    }
    for (index, (push, expected)) in s.pushes.iter().zip(front..).enumerate() {
        if push.seq_id != expected {
            return Err(ImportError::PushSeq {
                index,
                expected,
                found: push.seq_id,
            });
        }
    }
    Ok(())
}

fn restore_requests(s: &SessionState, window: u64) -> Result<RequestWindow, ImportError> {
    let highest = s.highest_request_seq_id;
    let bad = |seq| ImportError::RequestSeq { seq, highest };
    let mut completed = BTreeMap::new();
    let mut last = 0;
    for c in &s.completed_requests {
        if c.seq_id <= last || c.seq_id > highest {
            return Err(bad(c.seq_id));
        }
        last = c.seq_id;
        let resp = c
            .response
            .clone()
            .ok_or(ImportError::MissingResponse(c.seq_id))?;
        completed.insert(c.seq_id, resp);
    }
    let mut unknown = BTreeSet::new();
    let mut last = 0;
    for &seq in &s.unknown_outcome_request_seq_ids {
        if seq <= last || seq > highest || completed.contains_key(&seq) {
            return Err(bad(seq));
        }
        last = seq;
        unknown.insert(seq);
    }
    Ok(RequestWindow::restored(highest, completed, unknown, window))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(next_seq: u64, acked: u64, highest_request: u64) -> SessionState {
        SessionState {
            session_id: "s".into(),
            openid: "o".into(),
            zone: "001".into(),
            next_seq_id: next_seq,
            acked_seq_id: acked,
            trimmed_through_seq_id: acked,
            highest_sent_seq_id: acked,
            highest_request_seq_id: highest_request,
            ..Default::default()
        }
    }

    /// A peer's numbers near `u64::MAX` are refused at import, before the
    /// session would count past them (`next_seq += 1` on the next push).
    #[test]
    fn seqs_that_could_overflow_are_refused() {
        let now = Instant::now();
        let cfg = SessionConfig::default();
        let err = Session::import(state(u64::MAX, u64::MAX - 1, 0), now, cfg.clone())
            .err()
            .unwrap();
        assert_eq!(
            err,
            ImportError::SeqOutOfRange {
                field: "next_seq_id",
                value: u64::MAX
            }
        );
        let err = Session::import(state(5, 4, u64::MAX), now, cfg.clone())
            .err()
            .unwrap();
        assert!(matches!(
            err,
            ImportError::SeqOutOfRange {
                field: "highest_request_seq_id",
                ..
            }
        ));
        // At the bound the session imports and keeps counting.
        let mut s = Session::import(state(MAX_SEQ, MAX_SEQ - 1, MAX_SEQ), now, cfg).unwrap();
        let seq = s
            .push(
                now,
                crate::session::PushMessage {
                    msg_type: "t".into(),
                    content: "c".into(),
                    data: bytes::Bytes::new(),
                    created_at_ms: 0,
                },
            )
            .unwrap();
        assert_eq!(seq, MAX_SEQ);
        assert_eq!(s.export().next_seq_id, MAX_SEQ + 1);
        assert_eq!(s.export().highest_request_seq_id, MAX_SEQ);
    }
}
