//! The leader's lease keeper: declares dead nodes and upstreams by committing `ExpireLeases`,
//! and keeps the state O(live sessions + live nodes) by committing `Sweep` (owner records of
//! departed nodes released after `leases.orphaned_session_timeout`, departed node records
//! removed after `leases.departed_node_retention`).
//!
//! Leases are judged by the leader from committed heartbeats: the check runs on the leader's
//! copy of the state with the leader's clock, and the command is re-checked deterministically
//! at apply time against the entry's `now_ms`, so a heartbeat that lands first wins.
//!
//! A newly elected leader waits `grace` before expiring anything: heartbeats sent during the
//! election failed and their senders are still retrying, so their leases look stale only
//! because there was no leader to renew them.

use tokio_util::sync::CancellationToken;

use crate::config::LeaseConfig;
use crate::node::{Node, now_ms};
use crate::state::Cmd;

/// Runs until `stop` is cancelled. A new leader waits `leases.default_ttl` (the grace).
pub async fn run(node: Node, leases: LeaseConfig, stop: CancellationToken) {
    let grace = leases.default_ttl;
    let orphan_timeout_ms =
        u64::try_from(leases.orphaned_session_timeout.as_millis()).unwrap_or(u64::MAX);
    let node_retention_ms =
        u64::try_from(leases.departed_node_retention.as_millis()).unwrap_or(u64::MAX);
    let mut ticker = tokio::time::interval(leases.check_interval);
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
        let (due, sweep) = {
            let sm = node.sm();
            let st = &sm.read().state;
            let now = now_ms();
            (
                st.has_expired_leases(now),
                st.has_sweep_due(now, orphan_timeout_ms, node_retention_ms),
            )
        };
        if due {
            match node.commit_local(vec![Cmd::ExpireLeases]).await {
                Ok(results) => tracing::info!(?results, "expired leases"),
                Err(e) => tracing::warn!(error = %e, "could not commit lease expiry"),
            }
        }
        if sweep {
            let cmd = Cmd::Sweep {
                orphan_timeout_ms,
                node_retention_ms,
            };
            match node.commit_local(vec![cmd]).await {
                Ok(_) => tracing::info!("released orphaned owners / removed departed nodes"),
                Err(e) => tracing::warn!(error = %e, "could not commit the lifecycle sweep"),
            }
        }
    }
}
