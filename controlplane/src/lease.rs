//! The leader's lease keeper: declares dead nodes and upstreams by committing `ExpireLeases`.
//!
//! Leases are judged by the leader from committed heartbeats: the check runs on the leader's
//! copy of the state with the leader's clock, and the command is re-checked deterministically
//! at apply time against the entry's `now_ms`, so a heartbeat that lands first wins.
//!
//! A newly elected leader waits `grace` before expiring anything: heartbeats sent during the
//! election failed and their senders are still retrying, so their leases look stale only
//! because there was no leader to renew them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::node::{Node, now_ms};
use crate::state::Cmd;

/// Runs until `stop` is cancelled.
pub async fn run(node: Node, interval: Duration, grace: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if !node.is_leader() {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() < grace {
            continue;
        }
        let due = node.sm().read().state.has_expired_leases(now_ms());
        if !due {
            continue;
        }
        match node.commit_local(vec![Cmd::ExpireLeases]).await {
            Ok(results) => tracing::info!(?results, "expired leases"),
            Err(e) => tracing::warn!(error = %e, "could not commit lease expiry"),
        }
    }
}
