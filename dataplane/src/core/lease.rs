//! [`Lease`]: whether this node's control-plane lease is surely still valid,
//! the condition for acknowledging a durable push (lease-based fencing).
//!
//! A node cut off from the control plane keeps its cached view, which may
//! still name it the owner of sessions that a client meanwhile claimed on
//! another node. Once the control plane declares the node dead (its lease
//! expired), a claimant may rebuild such a session from the replicas of its
//! durable pushes (§7 of docs/architecture.md); a durable push this node
//! acknowledged after that point is on a copy nobody will read again, and is
//! lost. So the owner acknowledges a durable push only while its lease surely
//! still holds: the control plane starts a lease when it applies the renewing
//! heartbeat, which is after the node sent it, so `sent_at + ttl` is an upper
//! bound of what the control plane grants; a safety margin
//! ([`Lease::margin_for`]) covers the difference of the two clocks' rates.
//!
//! ```text
//!  heartbeat sent at s ──> applied by the control plane at a >= s: lease until a + ttl
//!  this node: durable pushes acknowledged while now < s + ttl - margin  (<= a + ttl)
//!  control plane: node dead only once now > a + ttl; a claimant recovers from replicas after that
//! ```
//!
//! A node the control plane declared dead (a heartbeat refused: "unknown
//! node" / "declared dead") registers again, but its view may still lag
//! behind the claims committed while it was dead. Its lease counts again
//! only once the view went past the node's re-registration: the view showed
//! the node not live after the loss and live again (deltas come in commit
//! order), or a whole view (snapshot) arrived after the new registration was
//! answered.
//!
//! The trade-off: during a full control-plane outage (or a partition between
//! a node and the control plane) longer than `ttl - margin`, durable pushes
//! are refused with an explicit error; everything else (requests, non-durable
//! pushes, resumes) keeps serving from the cached view.

use std::time::{Duration, Instant};

/// Why a durable push cannot be acknowledged now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Never registered with the control plane (or no renewal answered yet).
    #[error("this node holds no control-plane lease yet")]
    NotHeld,
    /// The last renewal was sent too long ago: the control plane may have
    /// declared this node dead (it is unreachable from here).
    #[error("this node's control-plane lease may have lapsed (control plane unreachable)")]
    Lapsed,
    /// The control plane declared this node dead; it registered again but
    /// its view has not caught up with the claims made meanwhile.
    #[error("this node was declared dead and its view has not caught up since it registered again")]
    Rejoining,
}

impl LeaseError {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            LeaseError::NotHeld => "lease_not_held",
            LeaseError::Lapsed => "lease_lapsed",
            LeaseError::Rejoining => "lease_rejoining",
        }
    }
}

/// After the control plane declared this node dead: what the lease still
/// waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rejoin {
    /// A renewal (registration) was answered after the loss, sent at this time.
    renewed_at: Option<Instant>,
    /// The view showed this node not live after the loss.
    seen_down: bool,
}

/// This node's control-plane lease as far as it can tell, sans-IO.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lease {
    /// Durable pushes may be acknowledged strictly before this instant.
    until: Option<Instant>,
    rejoin: Option<Rejoin>,
}

impl Lease {
    /// The safety margin kept below a lease of `ttl`: a fifth of it (600 ms
    /// of the default 3 s lease, renewed every second), at least 100 ms.
    pub fn margin_for(ttl: Duration) -> Duration {
        (ttl / 5).max(Duration::from_millis(100)).min(ttl)
    }

    /// A registration or heartbeat sent at `sent_at` was accepted with a
    /// lease of `ttl` (the control plane's, possibly clamped, value).
    pub fn renewed(&mut self, sent_at: Instant, ttl: Duration) {
        let end = sent_at + ttl - Self::margin_for(ttl);
        self.until = Some(self.until.map_or(end, |u| u.max(end)));
        if let Some(r) = &mut self.rejoin
            && r.renewed_at.is_none()
        {
            r.renewed_at = Some(sent_at);
        }
    }

    /// The control plane refused a heartbeat: it declared this node dead (or
    /// does not know it). `live_in_view`: whether the view shows this node
    /// live right now (if it already shows it dead, that counts as seen).
    pub fn lost(&mut self, live_in_view: bool) {
        self.until = None;
        self.rejoin = Some(Rejoin {
            renewed_at: None,
            seen_down: !live_in_view,
        });
    }

    /// The view changed (a node record, or a whole view at `now`):
    /// `live_in_view` is whether it shows this node live.
    pub fn view_changed(&mut self, now: Instant, live_in_view: bool, whole: bool) {
        let Some(r) = &mut self.rejoin else {
            return;
        };
        if !live_in_view {
            r.seen_down = true;
            return;
        }
        // Live again in the view, and a registration answered since the
        // loss: either the view went through "not live" (deltas are in
        // commit order, so the re-registration is the newer record), or a
        // whole view arrived after the registration was sent.
        if let Some(renewed_at) = r.renewed_at
            && (r.seen_down || (whole && now >= renewed_at))
        {
            self.rejoin = None;
        }
    }

    /// Whether a durable push may be acknowledged at `now`.
    pub fn check(&self, now: Instant) -> Result<(), LeaseError> {
        if self.rejoin.is_some() {
            return Err(LeaseError::Rejoining);
        }
        match self.until {
            None => Err(LeaseError::NotHeld),
            Some(until) if now < until => Ok(()),
            Some(_) => Err(LeaseError::Lapsed),
        }
    }

    /// Until when durable pushes may be acknowledged (if at all).
    pub fn valid_until(&self) -> Option<Instant> {
        if self.rejoin.is_some() {
            return None;
        }
        self.until
    }
}
