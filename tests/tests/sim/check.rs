//! The invariants, as bookkeeping the world updates on every event. One
//! method per property; each returns the violation it saw, if any.

use std::collections::{HashMap, HashSet};

use super::world::Ms;

/// What clients, the upstream and the nodes did, as far as the invariants
/// are concerned.
#[derive(Default)]
pub struct Checks {
    /// (session id, request seq) executed by some node.
    executed: HashSet<(String, u64)>,
    /// Durable pushes answered OK: (openid, push id, when).
    durable_ok: Vec<(String, u64, Ms)>,
    /// Push ids each openid's client received.
    delivered: HashMap<String, HashSet<u64>>,
    /// When each openid's client was told its session could not be resumed.
    resume_failed: HashMap<String, Vec<Ms>>,
    pub executions: u64,
    pub deliveries: u64,
}

impl Checks {
    /// No request seq of a session is executed twice.
    pub fn executed(&mut self, session_id: &str, seq: u64) -> Result<(), String> {
        self.executions += 1;
        if !self.executed.insert((session_id.to_string(), seq)) {
            return Err(format!(
                "request seq {seq} of session {session_id} executed twice"
            ));
        }
        Ok(())
    }

    pub fn durable_ok(&mut self, openid: &str, id: u64, at: Ms) {
        self.durable_ok.push((openid.to_string(), id, at));
    }

    pub fn durable_ok_count(&self) -> u64 {
        self.durable_ok.len() as u64
    }

    /// A client received push `id`.
    pub fn delivered(&mut self, openid: &str, id: u64) {
        self.deliveries += 1;
        self.delivered
            .entry(openid.to_string())
            .or_default()
            .insert(id);
    }

    /// A client was told its session could not be resumed.
    pub fn resume_failed(&mut self, openid: &str, at: Ms) {
        self.resume_failed
            .entry(openid.to_string())
            .or_default()
            .push(at);
    }

    /// A push on a client's session: never twice without the redelivery
    /// flag, never past a hole (a resumed session continues from the ack).
    pub fn push_order(
        openid: &str,
        session_id: &str,
        highest: u64,
        seq: u64,
        redelivery: bool,
    ) -> Result<(), String> {
        if seq <= highest && !redelivery {
            return Err(format!(
                "{openid} got seq {seq} of session {session_id} again without the redelivery flag (highest {highest})"
            ));
        }
        if seq > highest + 1 {
            return Err(format!(
                "{openid} got seq {seq} of session {session_id} after {highest}: pushes in between are missing"
            ));
        }
        Ok(())
    }

    /// At the end: every durable push answered OK reached its client, unless
    /// the client was told after it that its session could not be resumed.
    pub fn durable_delivered(&self) -> Result<(), String> {
        for (openid, id, at) in &self.durable_ok {
            let got = self
                .delivered
                .get(openid)
                .is_some_and(|ids| ids.contains(id));
            let excused = self
                .resume_failed
                .get(openid)
                .is_some_and(|times| times.iter().any(|t| t >= at));
            if !got && !excused {
                let mut seen: Vec<u64> = self
                    .delivered
                    .get(openid)
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default();
                seen.sort_unstable();
                return Err(format!(
                    "durable push {id} to {openid}, answered OK at {at} ms, was never delivered (its client got {seen:?})"
                ));
            }
        }
        Ok(())
    }
}
