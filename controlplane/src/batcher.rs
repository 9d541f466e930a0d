//! Group commit: concurrent writers share raft entries.
//!
//! A reconnect storm after a data-plane node dies sends thousands of `ClaimSessions` calls at
//! once. Each raft entry costs every member an fdatasync (PITFALLS §3), and openraft 0.9's core
//! appends (and waits for the flush of) one client write at a time, so the entries must be few
//! and full. The batcher takes a commit slot first ([`BatchConfig::in_flight`], 1 by default),
//! then every write already queued (up to [`BatchConfig::max_cmds`] commands) and commits them
//! as one `Vec<Cmd>` entry. While every slot is busy, new writes queue, so the next entry
//! carries all of them: entries grow with the load.
//!
//! Under load, one thing more: the writers the last entry answered are on their way back with
//! their next writes (a data plane answers its clients' Starts, and their next Starts follow).
//! An entry that leaves without them leaves them for the one after, and from then on two half
//! entries take turns, each paying a whole commit (measured: 30 claims per entry instead of
//! 60, 14k claims/s instead of 21k). So when the last entry carried more than one command, the
//! batcher waits for as many commands as it answered, at most [`BatchConfig::linger`] (1 ms
//! by default, timed by a blocking-pool thread's sleep: tokio's timer would round it up to its
//! 1 ms tick). An idle control plane (a lone write after a lone write) never waits.
//!
//! ```text
//!  writers ──> queue ──> [slot free?] ──> drain queue ──> one entry ──> raft (fdatasync ×3)
//! ```
//!
//! [`BatchConfig::in_flight`]: crate::config::BatchConfig::in_flight
//! [`BatchConfig::max_cmds`]: crate::config::BatchConfig::max_cmds
//! [`BatchConfig::linger`]: crate::config::BatchConfig::linger

use std::sync::Weak;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::config::BatchConfig;
use crate::error::Error;
use crate::node::{Inner, Node, clone_error};
use crate::state::{Cmd, CmdResult};

type Reply = oneshot::Sender<Result<Vec<CmdResult>, Error>>;

struct Pending {
    cmds: Vec<Cmd>,
    reply: Reply,
    /// When it was queued (for [`crate::stages`]).
    queued: std::time::Instant,
}

/// Handle to the batching task.
#[derive(Debug, Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Pending>,
}

impl Batcher {
    pub(crate) fn spawn(node: Weak<Inner>, cfg: &BatchConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.max_cmds.max(64) * 4);
        tokio::spawn(run(
            node,
            rx,
            cfg.linger,
            cfg.max_cmds,
            cfg.in_flight.max(1),
        ));
        Batcher { tx }
    }

    /// Queues `cmds` and waits for their results (in order).
    pub async fn submit(&self, cmds: Vec<Cmd>) -> Result<Vec<CmdResult>, Error> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending {
                cmds,
                reply,
                queued: std::time::Instant::now(),
            })
            .await
            .map_err(|_| Error::Raft("control plane is shutting down".into()))?;
        rx.await
            .map_err(|_| Error::Raft("control plane is shutting down".into()))?
    }
}

async fn run(
    node: Weak<Inner>,
    mut rx: mpsc::Receiver<Pending>,
    linger: Duration,
    max_cmds: usize,
    in_flight: usize,
) {
    let permits = std::sync::Arc::new(Semaphore::new(in_flight));
    // Commands in the entry before this one: the writers it answered, who come back with their
    // next writes under load.
    let mut answered = 0usize;
    loop {
        // The slot first: writes arriving while every slot is busy wait in the queue and
        // join the next entry together.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::new();
        let mut n = 0;
        drain(&mut rx, &mut batch, &mut n, max_cmds);
        if !linger.is_zero() && answered > 1 {
            // Wait (at most `linger`) for the writers the last entry answered: in a closed
            // loop they are on their way back, and an entry without them leaves them for
            // the next one, which halves every entry from then on (two waves take turns).
            let target = (n + answered).min(max_cmds);
            let timer = tokio::task::spawn_blocking(move || std::thread::sleep(linger));
            tokio::pin!(timer);
            while n < target {
                tokio::select! {
                    biased;
                    p = rx.recv() => match p {
                        Some(p) => {
                            n += p.cmds.len();
                            batch.push(p);
                        }
                        None => break,
                    },
                    _ = &mut timer => break,
                }
            }
        }
        if batch.is_empty() {
            let Some(first) = rx.recv().await else {
                return;
            };
            n = first.cmds.len();
            batch.push(first);
            drain(&mut rx, &mut batch, &mut n, max_cmds);
        }
        answered = n;
        let Some(inner) = node.upgrade() else {
            return;
        };
        let node = Node::from_inner(inner);
        tokio::spawn(async move {
            let _permit = permit;
            commit(&node, batch).await;
        });
    }
}

/// Moves writes already queued into `batch` until it holds `max_cmds` commands.
fn drain(
    rx: &mut mpsc::Receiver<Pending>,
    batch: &mut Vec<Pending>,
    n: &mut usize,
    max_cmds: usize,
) {
    while *n < max_cmds {
        match rx.try_recv() {
            Ok(p) => {
                *n += p.cmds.len();
                batch.push(p);
            }
            Err(_) => break,
        }
    }
}

async fn commit(node: &Node, batch: Vec<Pending>) {
    let sizes: Vec<usize> = batch.iter().map(|p| p.cmds.len()).collect();
    let mut cmds = Vec::with_capacity(sizes.iter().sum());
    let mut replies = Vec::with_capacity(batch.len());
    let t0 = std::time::Instant::now();
    for p in batch {
        crate::stages::record(|| "batch.queue".into(), t0 - p.queued);
        cmds.extend(p.cmds);
        replies.push(p.reply);
    }
    crate::stages::value(|| "batch.cmds".into(), cmds.len() as u32);
    let committed = node.commit(cmds).await;
    crate::stages::record(|| "batch.commit".into(), t0.elapsed());
    match committed {
        Ok(results) => {
            let mut results = results.into_iter();
            for (reply, size) in replies.into_iter().zip(sizes) {
                let part: Vec<CmdResult> = results.by_ref().take(size).collect();
                // A caller that gave up is fine to ignore.
                let _ = reply.send(Ok(part));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(clone_error(&e)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::{AuthMode, BatchConfig, ControlPlaneConfig};
    use crate::state::Cmd;
    use crate::{ControlPlane, Node};

    fn register(i: usize) -> Cmd {
        Cmd::RegisterNode {
            node_id: format!("dp-{i}"),
            quic_addr: "127.0.0.1:1".into(),
            grpc_addr: "127.0.0.1:2".into(),
            lease_ttl_ms: 60_000,
        }
    }

    fn last_log_index(node: &Node) -> u64 {
        node.raft().metrics().borrow().last_log_index.unwrap_or(0)
    }

    async fn leader(dir: &std::path::Path, linger: Duration) -> (ControlPlane, Node) {
        let mut cfg = ControlPlaneConfig {
            node_id: 1,
            data_dir: dir.join("cp-1"),
            grpc_addr: "127.0.0.1:0".parse().expect("literal"),
            admin_addr: "127.0.0.1:0".parse().expect("literal"),
            ..ControlPlaneConfig::default()
        }
        .fast_timings();
        cfg.cluster.bootstrap = true;
        cfg.tls.insecure = true;
        cfg.admin.auth = AuthMode::Tokens;
        cfg.admin.admin_token = Some("test-admin".into());
        cfg.admin.insecure_plaintext_http = true;
        cfg.batch.linger = linger;
        let cp = ControlPlane::start(cfg).await.expect("control plane");
        let node = cp.node().clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !node.is_leader() {
            assert!(tokio::time::Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The first write settles the leader's blank entry.
        node.write(vec![register(0)]).await.expect("first write");
        (cp, node)
    }

    /// Writers in a closed loop who come back a little after their answer (as a data plane's
    /// clients do) share one entry per round: the next entry waits for them instead of leaving
    /// with whoever queued meanwhile. With `linger` 0 the same load takes about twice the
    /// entries (a lone first writer, then the rest).
    #[tokio::test]
    async fn an_entry_waits_for_the_writers_the_last_one_answered() {
        const WRITERS: usize = 32;
        const ROUNDS: usize = 10;
        let dir = tempfile::tempdir().expect("temp dir");
        // Generous, so a slow machine still merges; the wait ends when the writers are in.
        let (cp, node) = leader(dir.path(), BatchConfig::MAX_LINGER).await;
        let before = last_log_index(&node);
        let writers = (0..WRITERS).map(|w| {
            let node = node.clone();
            tokio::spawn(async move {
                for r in 0..ROUNDS {
                    node.write(vec![register(1 + w * ROUNDS + r)])
                        .await
                        .expect("write");
                    // The way back: an answer reaches a client, whose next write follows.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        });
        for w in futures::future::join_all(writers).await {
            w.expect("writer");
        }
        // One more write, alone: the metrics have seen every entry before it.
        node.write(vec![register(0)]).await.expect("last write");
        let entries = last_log_index(&node) - before - 1;
        assert!(
            entries <= ROUNDS as u64 + 3,
            "{WRITERS} writers x {ROUNDS} rounds took {entries} raft entries: an entry left \
             without the writers the one before it answered"
        );
        drop(node);
        cp.shutdown().await;
    }

    /// Group commit: writes submitted together share raft entries (one fdatasync each), with
    /// the shipped batching defaults.
    #[tokio::test]
    async fn concurrent_writes_share_raft_entries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cp, node) = leader(dir.path(), BatchConfig::default().linger).await;
        let before = last_log_index(&node);

        let writes = (1..=64).map(|i| node.write(vec![register(i)]));
        for r in futures::future::join_all(writes).await {
            r.expect("write");
        }
        // One more write, alone: the metrics have seen every entry before it.
        node.write(vec![register(65)]).await.expect("last write");
        let entries = last_log_index(&node) - before;
        assert!(
            entries <= 8,
            "65 writes took {entries} raft entries: concurrent writes are not batched"
        );
        // Our handle holds the stores: shutdown waits for the last one.
        drop(node);
        cp.shutdown().await;
    }
}
