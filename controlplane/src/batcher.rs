//! Group commit: concurrent writers share raft entries.
//!
//! A reconnect storm after a data-plane node dies sends thousands of `ClaimSessions` calls at
//! once. Each raft entry costs the leader an fsync (PITFALLS §3), so the batcher takes the first
//! waiting write, waits up to `linger` (≈1 ms) for more, up to `max_cmds` commands, and commits
//! them as one `Vec<Cmd>` entry. Up to [`IN_FLIGHT`] batches are in flight at once, so a slow
//! commit does not stop the next batch from forming.

use std::sync::Weak;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::Error;
use crate::node::{Inner, Node, clone_error};
use crate::state::{Cmd, CmdResult};

/// Batches committed concurrently.
pub const IN_FLIGHT: usize = 4;

type Reply = oneshot::Sender<Result<Vec<CmdResult>, Error>>;

struct Pending {
    cmds: Vec<Cmd>,
    reply: Reply,
}

/// Handle to the batching task.
#[derive(Debug, Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Pending>,
}

impl Batcher {
    pub(crate) fn spawn(node: Weak<Inner>, linger: Duration, max_cmds: usize) -> Self {
        let (tx, rx) = mpsc::channel(max_cmds.max(64) * 4);
        tokio::spawn(run(node, rx, linger, max_cmds));
        Batcher { tx }
    }

    /// Queues `cmds` and waits for their results (in order).
    pub async fn submit(&self, cmds: Vec<Cmd>) -> Result<Vec<CmdResult>, Error> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { cmds, reply })
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
) {
    let permits = std::sync::Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut n = batch[0].cmds.len();
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
        let Some(inner) = node.upgrade() else {
            return;
        };
        let node = Node::from_inner(inner);
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
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
    for p in batch {
        cmds.extend(p.cmds);
        replies.push(p.reply);
    }
    match node.commit(cmds).await {
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
