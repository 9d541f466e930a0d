//! The push side of a session: seq assignment, the unacked queue, the send
//! cursor of the current connection and go-back-N bookkeeping.
//!
//! Seqs are contiguous. With `front = max(acked, trimmed_through) + 1`, the
//! queue holds exactly the pushes `front..next_seq`; the first `send_next -
//! front` of them were sent on the current connection (and carry their send
//! time), the rest wait for [`PushQueue::poll`]. Sending always starts at
//! `front` and moves up one by one, so a retained seq has been sent before (on
//! any connection) exactly when it is `<= highest_sent`: one number replaces a
//! per-push flag and survives a handover.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use gatesvr_proto::client::ServerPush;

use super::body::{OutgoingPush, PushBody};
use super::{AckError, AckOutcome, QueuePolicy};

/// One retained push.
#[derive(Debug, Clone)]
struct Entry {
    seq_id: u64,
    /// The payload, shared with every other session the push went to.
    body: PushBody,
    /// When it was last sent on the current connection; `None` while unsent.
    sent_at: Option<Instant>,
}

/// Why [`PushQueue::push`] refused a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    /// `max_queue` pushes are retained.
    Count,
    /// Their payloads would exceed `max_queue_bytes`.
    Bytes,
}

/// The bounds of a queue.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    pub max_queue: usize,
    pub max_queue_bytes: usize,
    pub policy: QueuePolicy,
}

#[derive(Debug, Clone)]
pub(super) struct PushQueue {
    entries: VecDeque<Entry>,
    /// Payload bytes of `entries` (what `max_queue_bytes` bounds). A body
    /// shared with other sessions counts in each: the bound is per session.
    bytes: usize,
    /// Seq of the next accepted push; starts at 1.
    next_seq: u64,
    /// Highest cumulative ack (0 = none).
    acked: u64,
    /// Highest seq dropped unacked by `DropOldest` (0 = none).
    trimmed_through: u64,
    /// Highest seq ever sent, on any connection (0 = none).
    highest_sent: u64,
    /// Next seq to send on the current connection; always in `front..=next_seq`.
    send_next: u64,
    /// Go-back-N rounds since the last ack progress on this connection.
    retries: u32,
}

impl PushQueue {
    pub(super) fn new() -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            next_seq: 1,
            acked: 0,
            trimmed_through: 0,
            highest_sent: 0,
            send_next: 1,
            retries: 0,
        }
    }

    /// Rebuilds a queue from a validated handover (see `transfer.rs`); nothing
    /// counts as sent on the (not yet existing) connection.
    pub(super) fn restored(
        next_seq: u64,
        acked: u64,
        trimmed_through: u64,
        highest_sent: u64,
        pushes: Vec<ServerPush>,
    ) -> Self {
        let entries: VecDeque<Entry> = pushes
            .iter()
            .map(|push| Entry {
                seq_id: push.seq_id,
                body: PushBody::from_push(push),
                sent_at: None,
            })
            .collect();
        let mut q = Self {
            bytes: entries.iter().map(|e| e.body.len()).sum(),
            entries,
            next_seq,
            acked,
            trimmed_through,
            highest_sent,
            send_next: 0,
            retries: 0,
        };
        q.send_next = q.front();
        q
    }

    /// Lowest retained seq, or `next_seq` when nothing is retained.
    pub(super) fn front(&self) -> u64 {
        self.acked.max(self.trimmed_through) + 1
    }

    pub(super) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub(super) fn acked(&self) -> u64 {
        self.acked
    }

    pub(super) fn trimmed_through(&self) -> u64 {
        self.trimmed_through
    }

    pub(super) fn highest_sent(&self) -> u64 {
        self.highest_sent
    }

    pub(super) fn retries(&self) -> u32 {
        self.retries
    }

    /// Pushes retained until acked (what `max_queue` bounds).
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Payload bytes retained (what `max_queue_bytes` bounds).
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Pushes sent on the current connection and not yet acked.
    pub(super) fn in_flight(&self) -> usize {
        // send_next >= front, and the difference is at most len.
        (self.send_next - self.front()) as usize
    }

    /// About the encoded size of the unsent pushes' frames, if it is below
    /// `limit` (`None` at or above it): a walk of at most the pushes that fit.
    pub(super) fn unsent_bytes_below(&self, limit: usize) -> Option<usize> {
        let first = (self.send_next - self.front()) as usize;
        let mut total = 0;
        for entry in self.entries.range(first.min(self.entries.len())..) {
            // The envelope and its length prefix (at most 3 bytes here).
            total += entry.body.envelope_len(entry.seq_id, false) + 3;
            if total >= limit {
                return None;
            }
        }
        Some(total)
    }

    /// Accepts a push under `bounds`; returns its seq and how many older
    /// pushes were dropped to make room.
    pub(super) fn push(&mut self, body: PushBody, bounds: Bounds) -> Result<(u64, u64), Full> {
        let over_count = |q: &Self| q.entries.len() >= bounds.max_queue;
        let over_bytes = |q: &Self| {
            !q.entries.is_empty() && q.bytes.saturating_add(body.len()) > bounds.max_queue_bytes
        };
        let mut dropped = 0;
        if over_count(self) || over_bytes(self) {
            if bounds.policy == QueuePolicy::Reject || self.entries.is_empty() {
                return Err(if over_count(self) {
                    Full::Count
                } else {
                    Full::Bytes
                });
            }
            // An imported queue may be over the bound; drop down to it.
            while over_count(self) || over_bytes(self) {
                let Some(old) = self.entries.pop_front() else {
                    break;
                };
                self.bytes -= old.body.len();
                self.trimmed_through = old.seq_id;
                dropped += 1;
            }
            self.send_next = self.send_next.max(self.front());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += body.len();
        self.entries.push_back(Entry {
            seq_id: seq,
            body,
            sent_at: None,
        });
        Ok((seq, dropped))
    }

    /// The next push not yet sent on this connection, marked sent at `now`.
    pub(super) fn poll(&mut self, now: Instant) -> Option<OutgoingPush> {
        self.poll_with(now, |seq_id, redelivery, body| OutgoingPush {
            seq_id,
            redelivery,
            body: body.clone(),
        })
    }

    /// As [`PushQueue::poll`], handing `f` the push by reference (seq,
    /// redelivery, payload): the connection encodes its frame straight from
    /// the queue, with no clone of the shared payload.
    pub(super) fn poll_with<R>(
        &mut self,
        now: Instant,
        f: impl FnOnce(u64, bool, &PushBody) -> R,
    ) -> Option<R> {
        let idx = usize::try_from(self.send_next - self.front()).ok()?;
        let entry = self.entries.get_mut(idx)?;
        let seq = entry.seq_id;
        entry.sent_at = Some(now);
        let out = f(seq, seq <= self.highest_sent, &entry.body);
        self.highest_sent = self.highest_sent.max(seq);
        self.send_next = seq + 1;
        Some(out)
    }

    /// Applies a cumulative ack.
    pub(super) fn ack(&mut self, acked: u64) -> Result<AckOutcome, AckError> {
        if acked <= self.acked {
            return Ok(AckOutcome::Stale {
                acked_seq: self.acked,
            });
        }
        if acked > self.highest_sent {
            return Err(AckError::BeyondSent {
                acked,
                highest_sent: self.highest_sent,
            });
        }
        let freed = self.free_through(acked);
        self.retries = 0;
        Ok(AckOutcome::Advanced {
            acked_seq: acked,
            freed,
        })
    }

    /// Frees every push `<= seq` and moves the ack point there. The caller
    /// checked `acked < seq < next_seq`.
    pub(super) fn free_through(&mut self, seq: u64) -> u64 {
        let mut freed = 0;
        while self.entries.front().is_some_and(|e| e.seq_id <= seq) {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= e.body.len();
            }
            freed += 1;
        }
        self.acked = seq;
        // A resuming client may report more than this node ever sent (state
        // lost in a handover); keep `acked <= highest_sent`.
        self.highest_sent = self.highest_sent.max(seq);
        self.send_next = self.send_next.max(self.front());
        freed
    }

    /// When the oldest push sent on this connection is due for a retransmit.
    pub(super) fn retransmit_deadline(&self, ack_timeout: Duration) -> Option<Instant> {
        // Only a sent entry has `sent_at`, and sent entries are a prefix.
        self.entries.front()?.sent_at?.checked_add(ack_timeout)
    }

    /// Go-back-N: everything sent and unacked becomes unsent again. Returns
    /// the first seq to resend and how many.
    pub(super) fn go_back(&mut self) -> (u64, u64) {
        let from = self.front();
        let count = self.send_next - from;
        self.rewind();
        self.retries += 1;
        (from, count)
    }

    /// A new connection (or none): nothing is sent on it yet, no retries.
    pub(super) fn reset_connection(&mut self) {
        self.rewind();
        self.retries = 0;
    }

    fn rewind(&mut self) {
        for e in self.entries.iter_mut() {
            e.sent_at = None;
        }
        self.send_next = self.front();
    }

    /// Retained pushes in seq order, as exported (`redelivery` = sent before).
    pub(super) fn export(&self) -> Vec<ServerPush> {
        self.entries
            .iter()
            .map(|e| e.body.to_push(e.seq_id, e.seq_id <= self.highest_sent))
            .collect()
    }
}
