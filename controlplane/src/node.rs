//! One control-plane node's raft handle and the paths every API goes through:
//!
//! ```text
//!  API write ──> Batcher (≈1 ms / N cmds) ──> leader? ── yes ──> client_write(Request{now_ms, cmds})
//!                                                └─ no ──> Forward RPC ──> leader: client_write
//!  linearizable read ──> leader? ── yes ──> ensure_linearizable (quorum heartbeat)
//!                           └─ no ──> Forward(ReadIndex) to leader, wait until applied >= index
//!  local read ──> SmHandle (this replica's applied state; may lag)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gatesvr_proto::raft::RaftMessage;
use gatesvr_proto::raft::raft_client::RaftClient;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::batcher::Batcher;
use crate::error::Error;
use crate::network::{PeerTls, channel, raft_client};
use crate::state::{Cmd, CmdResult};
use crate::store::SmHandle;
use crate::types::{Member, NodeId, Raft, Request};

/// What a follower asks the leader to do (JSON in `RaftMessage.data` of `Raft.Forward`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum ForwardRequest {
    Write { cmds: Vec<Cmd> },
    ReadIndex,
    AddLearner { id: NodeId, member: Member },
    Promote { id: NodeId },
    Remove { id: NodeId },
}

/// The leader's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum ForwardResponse {
    Write { results: Vec<CmdResult> },
    ReadIndex { index: u64 },
    Membership { log_index: u64 },
}

/// An [`Error`] as carried back over `Forward`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardError {
    pub code: String,
    pub message: String,
    pub leader: Option<(NodeId, Member)>,
}

impl From<&Error> for ForwardError {
    fn from(e: &Error) -> Self {
        let leader = match e {
            Error::NotLeader { leader } => leader.clone(),
            _ => None,
        };
        ForwardError {
            code: e.code().to_string(),
            message: e.to_string(),
            leader,
        }
    }
}

impl From<ForwardError> for Error {
    fn from(e: ForwardError) -> Self {
        let m = e.message;
        match e.code.as_str() {
            "not_leader" => Error::NotLeader { leader: e.leader },
            "unavailable" => Error::Unavailable(m),
            "invalid_argument" => Error::InvalidArgument(m),
            "not_found" => Error::NotFound(m),
            "conflict" => Error::Conflict(m),
            "fenced" => Error::Fenced(m),
            "failed_precondition" => Error::FailedPrecondition(m),
            _ => Error::Raft(m),
        }
    }
}

/// A copy of `e` (for answering every caller of a failed batch).
pub fn clone_error(e: &Error) -> Error {
    ForwardError::from(e).into()
}

/// Milliseconds since the Unix epoch (the leader's clock, stamped into entries).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// How far behind the leader's log a learner may be and still be promoted.
const PROMOTE_MAX_LAG: u64 = 1000;

/// Timeouts and identity the node needs at run time.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub id: NodeId,
    pub write_timeout: Duration,
    pub read_timeout: Duration,
    pub zone_count: u32,
    /// `raft.max_learners`.
    pub max_learners: u32,
}

/// Shared handle to this node's raft, state and write path. Cheap to clone.
#[derive(Clone)]
pub struct Node(Arc<Inner>);

pub(crate) struct Inner {
    settings: NodeSettings,
    raft: Raft,
    sm: SmHandle,
    tls: PeerTls,
    batcher: Batcher,
    /// One channel per leader we forward to (HTTP/2 multiplexes; no handshake per call).
    forward_clients: parking_lot::Mutex<BTreeMap<NodeId, (String, RaftClient<Channel>)>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.0.settings.id)
            .finish_non_exhaustive()
    }
}

fn map_write_err(e: RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> Error {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Error::NotLeader {
            leader: f.leader_id.zip(f.leader_node),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => match c {
            ChangeMembershipError::LearnerNotFound(_) => Error::FailedPrecondition(format!(
                "{c}: add the node as a learner first (gatectl cluster add-learner)"
            )),
            ChangeMembershipError::InProgress(_) => {
                Error::Unavailable(format!("{c}; retry when it has committed"))
            }
            other => Error::InvalidArgument(other.to_string()),
        },
        RaftError::Fatal(f) => Error::Raft(f.to_string()),
    }
}

impl Node {
    pub(crate) fn from_inner(inner: Arc<Inner>) -> Self {
        Node(inner)
    }

    pub fn new(
        settings: NodeSettings,
        raft: Raft,
        sm: SmHandle,
        tls: PeerTls,
        batch: crate::config::BatchConfig,
    ) -> Self {
        Node(Arc::new_cyclic(|weak| Inner {
            batcher: Batcher::spawn(weak.clone(), &batch),
            settings,
            raft,
            sm,
            tls,
            forward_clients: parking_lot::Mutex::new(BTreeMap::new()),
        }))
    }

    pub fn id(&self) -> NodeId {
        self.0.settings.id
    }

    pub fn settings(&self) -> &NodeSettings {
        &self.0.settings
    }

    pub fn raft(&self) -> &Raft {
        &self.0.raft
    }

    pub fn sm(&self) -> &SmHandle {
        &self.0.sm
    }

    /// The current leader and its addresses, as this node knows them.
    pub fn leader(&self) -> Option<(NodeId, Member)> {
        let m = self.0.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let member = m
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
            .unwrap_or_default();
        Some((id, member))
    }

    /// Whether this node believes it is the leader.
    pub fn is_leader(&self) -> bool {
        let m = self.0.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id())
    }

    /// Commits `cmds` (batched with concurrent writers) and returns one result per command.
    pub async fn write(&self, cmds: Vec<Cmd>) -> Result<Vec<CmdResult>, Error> {
        self.0.batcher.submit(cmds).await
    }

    /// Commits one batch: locally if leader, else forwarded to the leader (following one
    /// leader change).
    pub(crate) async fn commit(&self, cmds: Vec<Cmd>) -> Result<Vec<CmdResult>, Error> {
        let deadline = tokio::time::Instant::now() + self.0.settings.write_timeout;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = if self.is_leader() {
                self.commit_local(cmds.clone()).await
            } else {
                match self
                    .forward(ForwardRequest::Write { cmds: cmds.clone() }, deadline)
                    .await
                {
                    Ok(ForwardResponse::Write { results }) => Ok(results),
                    Ok(other) => Err(Error::Raft(format!("unexpected forward reply {other:?}"))),
                    Err(e) => Err(e),
                }
            };
            match res {
                Err(Error::NotLeader { .. })
                    if attempt < 3 && tokio::time::Instant::now() < deadline =>
                {
                    // Leadership moved; wait for the cluster to settle on a leader and retry.
                    self.wait_for_leader(deadline).await;
                }
                other => return other,
            }
        }
    }

    /// Leader-side commit with the leader's timestamp. Fails with `NotLeader` on a follower.
    pub async fn commit_local(&self, cmds: Vec<Cmd>) -> Result<Vec<CmdResult>, Error> {
        let req = Request {
            now_ms: now_ms(),
            cmds,
        };
        let n = req.cmds.len();
        match tokio::time::timeout(self.0.settings.write_timeout, self.0.raft.client_write(req))
            .await
        {
            Err(_) => Err(Error::Unavailable(format!(
                "write not committed within {:?}: no quorum reachable (minority partition or election); it may still commit, retrying is safe",
                self.0.settings.write_timeout
            ))),
            Ok(Err(e)) => Err(map_write_err(e)),
            Ok(Ok(resp)) if resp.data.results.len() == n => Ok(resp.data.results),
            Ok(Ok(resp)) => Err(Error::Raft(format!(
                "state machine returned {} results for {n} commands",
                resp.data.results.len()
            ))),
        }
    }

    async fn wait_for_leader(&self, deadline: tokio::time::Instant) {
        let mut rx = self.0.raft.metrics();
        let _ = tokio::time::timeout_at(deadline, async {
            loop {
                if rx.borrow().current_leader.is_some() {
                    // Give a new leader a moment to be known everywhere.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Sends `req` to the current leader over `Raft.Forward`.
    async fn forward(
        &self,
        req: ForwardRequest,
        deadline: tokio::time::Instant,
    ) -> Result<ForwardResponse, Error> {
        if self.leader().is_none() {
            self.wait_for_leader(deadline).await;
        }
        let Some((leader_id, member)) = self.leader() else {
            return Err(Error::Unavailable(
                "no leader known: election in progress or this node is cut off from a quorum; retry".into(),
            ));
        };
        if leader_id == self.id() {
            return Err(Error::NotLeader { leader: None });
        }
        let mut client = self.forward_client(leader_id, &member.grpc_addr)?;
        let data = serde_json::to_vec(&req).map_err(|e| Error::Raft(e.to_string()))?;
        let mut request = tonic::Request::new(RaftMessage {
            data,
            from: self.id(),
            to: leader_id,
        });
        request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let reply = client.forward(request).await.map_err(|s| {
            Error::Unavailable(format!(
                "leader {leader_id} at {} did not answer: {}",
                member.grpc_addr,
                s.message()
            ))
        })?;
        let result: Result<ForwardResponse, ForwardError> =
            serde_json::from_slice(&reply.into_inner().data)
                .map_err(|e| Error::Raft(format!("bad forward reply: {e}")))?;
        result.map_err(Error::from)
    }

    /// The cached channel to `leader_id` at `addr` (rebuilt if its address changed).
    fn forward_client(&self, leader_id: NodeId, addr: &str) -> Result<RaftClient<Channel>, Error> {
        let mut cache = self.0.forward_clients.lock();
        match cache.get(&leader_id) {
            Some((a, c)) if a == addr => return Ok(c.clone()),
            _ => {}
        }
        let client = raft_client(channel(addr, &self.0.tls)?);
        cache.insert(leader_id, (addr.to_string(), client.clone()));
        Ok(client)
    }

    /// Handles a forwarded request on the leader.
    pub async fn serve_forward(&self, req: ForwardRequest) -> Result<ForwardResponse, Error> {
        if !self.is_leader() {
            return Err(Error::NotLeader {
                leader: self.leader(),
            });
        }
        match req {
            ForwardRequest::Write { cmds } => Ok(ForwardResponse::Write {
                results: self.commit_local(cmds).await?,
            }),
            ForwardRequest::ReadIndex => Ok(ForwardResponse::ReadIndex {
                index: self.leader_read_index().await?,
            }),
            ForwardRequest::AddLearner { id, member } => self.add_learner_local(id, member).await,
            ForwardRequest::Promote { id } => self.promote_local(id).await,
            ForwardRequest::Remove { id } => self.remove_local(id).await,
        }
    }

    /// On the leader: confirms leadership with a quorum and returns the index to read at.
    async fn leader_read_index(&self) -> Result<u64, Error> {
        let t = self.0.settings.read_timeout;
        match tokio::time::timeout(t, self.0.raft.ensure_linearizable()).await {
            Err(_) => Err(Error::Unavailable(format!(
                "leadership not confirmed by a quorum within {t:?}"
            ))),
            Ok(Err(RaftError::APIError(e))) => Err(match e {
                openraft::error::CheckIsLeaderError::ForwardToLeader(f) => Error::NotLeader {
                    leader: f.leader_id.zip(f.leader_node),
                },
                other => Error::Unavailable(other.to_string()),
            }),
            Ok(Err(RaftError::Fatal(f))) => Err(Error::Raft(f.to_string())),
            Ok(Ok(log_id)) => Ok(log_id.map_or(0, |l| l.index)),
        }
    }

    /// Makes the next local read linearizable: after this returns, this replica has applied
    /// everything committed before the call (leader: quorum check; follower: read index from
    /// the leader, then wait to apply it).
    pub async fn linearizable_barrier(&self) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + self.0.settings.read_timeout;
        let index = if self.is_leader() {
            self.leader_read_index().await?
        } else {
            match self.forward(ForwardRequest::ReadIndex, deadline).await? {
                ForwardResponse::ReadIndex { index } => index,
                other => return Err(Error::Raft(format!("unexpected forward reply {other:?}"))),
            }
        };
        let waiter = self.0.raft.wait(Some(
            deadline.saturating_duration_since(tokio::time::Instant::now()),
        ));
        waiter
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map(|_| ())
            .map_err(|e| {
                Error::Unavailable(format!("could not catch up to read index {index}: {e}"))
            })
    }

    async fn membership_op(&self, req: ForwardRequest) -> Result<u64, Error> {
        let deadline = tokio::time::Instant::now() + self.0.settings.write_timeout * 4;
        let res = if self.is_leader() {
            self.serve_forward(req).await
        } else {
            self.forward(req, deadline).await
        };
        match res? {
            ForwardResponse::Membership { log_index } => Ok(log_index),
            other => Err(Error::Raft(format!("unexpected forward reply {other:?}"))),
        }
    }

    /// Adds `id` as a learner (it starts receiving the log / a snapshot). Any node may call.
    pub async fn add_learner(&self, id: NodeId, member: Member) -> Result<u64, Error> {
        self.membership_op(ForwardRequest::AddLearner { id, member })
            .await
    }

    /// Promotes learner `id` to voter.
    pub async fn promote(&self, id: NodeId) -> Result<u64, Error> {
        self.membership_op(ForwardRequest::Promote { id }).await
    }

    /// Removes `id` from the cluster (voter or learner).
    pub async fn remove(&self, id: NodeId) -> Result<u64, Error> {
        self.membership_op(ForwardRequest::Remove { id }).await
    }

    async fn membership_write<F>(&self, fut: F) -> Result<ForwardResponse, Error>
    where
        F: std::future::Future<
                Output = Result<
                    openraft::raft::ClientWriteResponse<crate::types::TypeConfig>,
                    RaftError<NodeId, ClientWriteError<NodeId, Member>>,
                >,
            >,
    {
        let t = self.0.settings.write_timeout * 4;
        match tokio::time::timeout(t, fut).await {
            Err(_) => Err(Error::Unavailable(format!(
                "membership change not committed within {t:?}; check `gatectl cluster status` and retry"
            ))),
            Ok(Err(e)) => Err(map_write_err(e)),
            Ok(Ok(resp)) => Ok(ForwardResponse::Membership {
                log_index: resp.log_id.index,
            }),
        }
    }

    async fn add_learner_local(
        &self,
        id: NodeId,
        member: Member,
    ) -> Result<ForwardResponse, Error> {
        if member.grpc_addr.is_empty() {
            return Err(Error::InvalidArgument("grpc_addr is required".into()));
        }
        let voters = self.voter_ids();
        if voters.contains(&id) {
            return Err(Error::Conflict(format!("node {id} is already a voter")));
        }
        let members = self.members();
        // The leader replicates to every learner, reachable or not, with a timeout and a log
        // line per failed call: their number is bounded (`raft.max_learners`). Adding a learner
        // that is already one is not one more (openraft keeps it as it is).
        let learners = members.keys().filter(|m| !voters.contains(m)).count();
        let max = self.0.settings.max_learners as usize;
        if !members.contains_key(&id) && learners >= max {
            return Err(Error::FailedPrecondition(format!(
                "the cluster has {learners} learner(s), the most raft.max_learners ({max}) allows: promote or remove one first"
            )));
        }
        // Two members at one address would make the leader replicate to the same process
        // twice (under two ids): refuse, whatever the id.
        if let Some((other, _)) = members.into_iter().find(|(other, m)| {
            *other != id && (m.grpc_addr == member.grpc_addr || m.admin_addr == member.admin_addr)
        }) {
            return Err(Error::Conflict(format!(
                "member {other} already uses grpc_addr {} or admin_addr {}",
                member.grpc_addr, member.admin_addr
            )));
        }
        self.membership_write(self.0.raft.add_learner(id, member, false))
            .await
    }

    async fn promote_local(&self, id: NodeId) -> Result<ForwardResponse, Error> {
        if self.voter_ids().contains(&id) {
            return Err(Error::Conflict(format!("node {id} is already a voter")));
        }
        if !self.members().contains_key(&id) {
            return Err(Error::NotFound(format!("node {id} is not a learner")));
        }
        // A voter that cannot be reached (or has not caught up) would cost the cluster its
        // quorum the moment it is promoted: only a learner the leader replicates to may
        // become one. A learner just added gets up to `write_timeout` to catch up.
        let caught_up = |m: &openraft::RaftMetrics<NodeId, Member>| {
            let last = m.last_log_index.unwrap_or(0);
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).copied().flatten())
                .map(|l| l.index);
            (
                matched.is_some_and(|i| last.saturating_sub(i) <= PROMOTE_MAX_LAG),
                matched,
                last,
            )
        };
        let mut rx = self.0.raft.metrics();
        let deadline = tokio::time::Instant::now() + self.0.settings.write_timeout;
        loop {
            let (ok, matched, last) = caught_up(&rx.borrow_and_update());
            if ok {
                break;
            }
            let changed = tokio::time::timeout_at(deadline, rx.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                return Err(Error::FailedPrecondition(format!(
                    "learner {id} has not caught up (replicated to index {}, log at {last}); check that it runs and is reachable, then retry",
                    matched.map_or_else(|| "none".to_string(), |i| i.to_string())
                )));
            }
        }
        let ids: BTreeSet<NodeId> = [id].into();
        self.membership_write(
            self.0
                .raft
                .change_membership(ChangeMembers::AddVoterIds(ids), false),
        )
        .await
    }

    async fn remove_local(&self, id: NodeId) -> Result<ForwardResponse, Error> {
        let ids: BTreeSet<NodeId> = [id].into();
        let voters = self.voter_ids();
        if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(Error::FailedPrecondition(
                    "cannot remove the last voter".into(),
                ));
            }
            // Remove as voter and drop it entirely (not retained as a learner).
            self.membership_write(
                self.0
                    .raft
                    .change_membership(ChangeMembers::RemoveVoters(ids), false),
            )
            .await
        } else if self.members().contains_key(&id) {
            self.membership_write(
                self.0
                    .raft
                    .change_membership(ChangeMembers::RemoveNodes(ids), false),
            )
            .await
        } else {
            Err(Error::NotFound(format!("node {id} is not a member")))
        }
    }

    /// Voter ids of the current (possibly joint) membership.
    pub fn voter_ids(&self) -> BTreeSet<NodeId> {
        self.0
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Every member (voters and learners) with its addresses.
    pub fn members(&self) -> BTreeMap<NodeId, Member> {
        self.0
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, m)| (*id, m.clone()))
            .collect()
    }
}
