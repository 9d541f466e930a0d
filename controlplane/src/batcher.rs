//! Group commit: concurrent writers share raft entries.
//!
//! A reconnect storm after a data-plane node dies sends thousands of `ClaimSessions` calls at
//! once. Each raft entry costs every member an fdatasync (PITFALLS §3), and openraft 0.9's core
//! appends (and waits for the flush of) one client write at a time, so the entries must be few
//! and full. The batcher takes a commit slot first ([`BatchConfig::in_flight`], 1 by default),
//! then every write already queued (up to [`BatchConfig::max_cmds`] commands, optionally waiting
//! [`BatchConfig::linger`], 0 by default, for more) and commits them as one `Vec<Cmd>` entry.
//! While every slot is busy, new writes queue, so the next entry carries all of them: entries
//! grow with the load, with no timer (a timer would add its 1-2 ms tick to every write).
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
    loop {
        // The slot first: writes arriving while every slot is busy wait in the queue and
        // join the next entry together.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut n = first.cmds.len();
        let mut batch = vec![first];
        while n < max_cmds {
            match rx.try_recv() {
                Ok(p) => {
                    n += p.cmds.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        if !linger.is_zero() {
            let deadline = tokio::time::Instant::now() + linger;
            while n < max_cmds {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(p)) => {
                        n += p.cmds.len();
                        batch.push(p);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
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

    use crate::config::{AuthMode, ControlPlaneConfig};
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

    /// Group commit: writes submitted together share raft entries (one fdatasync each), with
    /// the shipped batching defaults.
    #[tokio::test]
    async fn concurrent_writes_share_raft_entries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = ControlPlaneConfig {
            node_id: 1,
            data_dir: dir.path().join("cp-1"),
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
        let cp = ControlPlane::start(cfg).await.expect("control plane");
        let node = cp.node().clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !node.is_leader() {
            assert!(tokio::time::Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The first write settles the leader's blank entry.
        node.write(vec![register(0)]).await.expect("first write");
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
