//! One test per rule of the contract in the module docs.

use std::time::{Duration, Instant};

use bytes::Bytes;
use gatesvr_proto::client::{ClientResponse, ErrorCode, ResumeStatus};
use gatesvr_proto::session::SessionState;
use prost::Message;

use super::*;

const SECOND: Duration = Duration::from_secs(1);

fn cfg() -> SessionConfig {
    SessionConfig {
        ack_timeout: Duration::from_secs(10),
        max_retries: 2,
        max_queue: 8,
        max_queue_bytes: 1 << 20,
        queue_policy: QueuePolicy::Reject,
        session_timeout: Duration::from_secs(60),
        request_window: 4,
        max_inflight: 2,
    }
}

fn identity() -> SessionIdentity {
    SessionIdentity {
        session_id: "s-1".into(),
        openid: "alice".into(),
        zone: "003".into(),
    }
}

fn msg(n: u64) -> PushMessage {
    PushMessage {
        msg_type: "chat".into(),
        content: format!("m{n}"),
        data: Bytes::from(vec![n as u8; 3]),
        created_at_ms: 1_700_000_000_000 + n as i64,
    }
}

/// A session with `pushes` queued and a connection attached (status New).
fn attached(cfg: SessionConfig, pushes: u64) -> (Session, Instant) {
    let t0 = Instant::now();
    let mut s = Session::new(identity(), cfg, t0);
    assert_eq!(s.attach(t0, 0).status, ResumeStatus::New);
    for n in 1..=pushes {
        assert_eq!(s.push(t0, msg(n)), Ok(n));
    }
    (s, t0)
}

/// Everything `poll_transmit` yields now, as (seq, redelivery).
fn drain(s: &mut Session, now: Instant) -> Vec<(u64, bool)> {
    std::iter::from_fn(|| s.poll_transmit(now))
        .map(|p| (p.seq_id, p.redelivery))
        .collect()
}

fn fresh(seqs: std::ops::RangeInclusive<u64>) -> Vec<(u64, bool)> {
    seqs.map(|s| (s, false)).collect()
}

fn again(seqs: std::ops::RangeInclusive<u64>) -> Vec<(u64, bool)> {
    seqs.map(|s| (s, true)).collect()
}

fn response(seq_id: u64) -> ClientResponse {
    ClientResponse {
        msg_id: 7,
        seq_id,
        payload: vec![seq_id as u8],
        zone: "003".into(),
        ..ClientResponse::default()
    }
}

mod acks;
mod expiry;
mod handover;
mod pushes;
mod requests;
mod resume;
mod retransmit;
