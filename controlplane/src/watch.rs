//! The watch hub: recent deltas for resuming watchers, and a broadcast of new ones.
//!
//! ```text
//!  apply(entries) ──(state write lock)──> Hub::publish(events) ──> ring (last N events)
//!                                                               └─> broadcast ──> Watch streams
//!  install_snapshot ────────────────────> Hub::reset()  ──────────> every watcher re-snapshots
//! ```
//!
//! The hub lives under the same lock as the state, so a watcher that reads the state (or the
//! ring) and subscribes in one critical section sees every later event exactly once.
//!
//! Each event says which data-plane nodes it concerns ([`HubEvent::concerns`]): an owner
//! record concerns its owner and the node that owned the session before the change; the
//! rest (nodes, upstreams, failovers) concerns everyone. A scoped watcher (`scoped` in the
//! `WatchRequest`) is sent only what concerns it, so a claim costs one data-plane node one
//! event (two on a move), not every node one event.

use std::collections::VecDeque;
use std::sync::Arc;

use gatesvr_proto::control::WatchEvent;
use tokio::sync::broadcast;

/// One published event and the nodes it concerns.
#[derive(Debug, Clone)]
pub struct HubEvent {
    pub event: WatchEvent,
    /// The data-plane nodes a scoped watch sends it to; `None`: every watcher.
    pub concerns: Option<Vec<String>>,
}

impl HubEvent {
    /// An event for every watcher.
    pub fn all(event: WatchEvent) -> Self {
        Self {
            event,
            concerns: None,
        }
    }

    /// Whether a watcher scoped to `node` (`None`: unscoped, everything) is sent it.
    pub fn for_watcher(&self, node: Option<&str>) -> bool {
        match (&self.concerns, node) {
            (None, _) | (_, None) => true,
            (Some(nodes), Some(node)) => nodes.iter().any(|n| n == node),
        }
    }
}

/// What watchers receive from the hub.
#[derive(Debug, Clone)]
pub enum HubMsg {
    /// New events, in version order.
    Events(Arc<[HubEvent]>),
    /// The state was replaced (snapshot install): the watcher must re-snapshot.
    Reset,
}

/// Bounded history of recent events plus the live broadcast.
#[derive(Debug)]
pub struct Hub {
    ring: VecDeque<HubEvent>,
    capacity: usize,
    tx: broadcast::Sender<HubMsg>,
}

impl Hub {
    /// A hub keeping the last `capacity` events for resuming watchers.
    pub fn new(capacity: usize) -> Self {
        // A watcher more than this many *batches* behind is lagging; it re-snapshots.
        let (tx, _) = broadcast::channel(1024);
        Self {
            ring: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
            tx,
        }
    }

    /// Records and broadcasts `events` (already in version order).
    pub fn publish(&mut self, events: Vec<HubEvent>) {
        if events.is_empty() {
            return;
        }
        for e in &events {
            if self.ring.len() == self.capacity {
                self.ring.pop_front();
            }
            self.ring.push_back(e.clone());
        }
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(HubMsg::Events(events.into()));
    }

    /// Forgets history and tells every watcher to re-snapshot.
    pub fn reset(&mut self) {
        self.ring.clear();
        let _ = self.tx.send(HubMsg::Reset);
    }

    /// Events after `from_version` if the ring still has all of them; `None` if the watcher
    /// must start from a snapshot (too old, unknown future version, or history lost). Only
    /// those for a watcher scoped to `scope` (`None`: all).
    pub fn since(
        &self,
        from_version: u64,
        current_version: u64,
        scope: Option<&str>,
    ) -> Option<Vec<WatchEvent>> {
        if from_version == 0 || from_version > current_version {
            return None;
        }
        if from_version == current_version {
            return Some(Vec::new());
        }
        let oldest = self.ring.front()?.event.version;
        if oldest > from_version + 1 {
            return None;
        }
        Some(
            self.ring
                .iter()
                .filter(|e| e.event.version > from_version && e.for_watcher(scope))
                .map(|e| e.event.clone())
                .collect(),
        )
    }

    /// How many receivers are subscribed.
    pub fn receiver_count(&self) -> usize {
        self.tx.receiver_count()
    }

    /// A receiver of everything published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<HubMsg> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(v: u64) -> HubEvent {
        HubEvent::all(WatchEvent {
            version: v,
            event: None,
        })
    }

    #[test]
    fn resumes_from_ring_or_asks_for_snapshot() {
        let mut hub = Hub::new(3);
        hub.publish((1..=5).map(ev).collect());
        // Ring holds 3, 4, 5.
        assert!(hub.since(1, 5, None).is_none(), "version 2 is gone");
        let got: Vec<u64> = hub
            .since(2, 5, None)
            .unwrap()
            .iter()
            .map(|e| e.version)
            .collect();
        assert_eq!(got, vec![3, 4, 5]);
        assert_eq!(hub.since(5, 5, None).unwrap().len(), 0);
        assert!(hub.since(0, 5, None).is_none());
        assert!(
            hub.since(9, 5, None).is_none(),
            "a version from another history"
        );
        hub.reset();
        assert!(hub.since(4, 5, None).is_none());
    }

    #[test]
    fn a_scoped_watcher_resumes_with_what_concerns_it() {
        let mut hub = Hub::new(8);
        let owned = |v: u64, nodes: &[&str]| HubEvent {
            concerns: Some(nodes.iter().map(|n| n.to_string()).collect()),
            ..ev(v)
        };
        let events = vec![
            owned(1, &["dp-1"]),
            ev(2),
            owned(3, &["dp-2", "dp-1"]),
            owned(4, &["dp-2"]),
        ];
        hub.publish(events);
        let versions = |scope| -> Vec<u64> {
            hub.since(1, 4, scope)
                .unwrap()
                .iter()
                .map(|e| e.version)
                .collect()
        };
        assert_eq!(versions(Some("dp-1")), vec![2, 3]);
        assert_eq!(versions(Some("dp-2")), vec![2, 3, 4]);
        assert_eq!(versions(Some("dp-3")), vec![2]);
        assert_eq!(versions(None), vec![2, 3, 4]);
    }
}
