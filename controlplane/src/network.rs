//! Raft transport, client side: openraft's `RaftNetwork` over `gatesvr.raft.v1.Raft` (tonic).
//!
//! openraft's request and response types travel as JSON inside `RaftMessage` (see raft.proto
//! for why). Every message names the sender and the intended receiver; a receiver whose id
//! differs refuses it, so a stale address that now points at another node cannot corrupt it.

use std::time::Duration;

use gatesvr_common::tls::TlsFiles;
use gatesvr_proto::raft::RaftMessage;
use gatesvr_proto::raft::raft_client::RaftClient;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use crate::error::Error;
use crate::types::{Member, NodeId, TypeConfig};

/// Largest raft message accepted (AppendEntries batches, 3 MiB snapshot chunks + overhead):
/// [`gatesvr_proto::limits::RAFT_MAX_MESSAGE_BYTES`].
pub const MAX_MESSAGE_BYTES: usize = gatesvr_proto::limits::RAFT_MAX_MESSAGE_BYTES;

/// How this node dials its peers.
#[derive(Debug, Clone)]
pub enum PeerTls {
    /// Plaintext (`tls.insecure`).
    Insecure,
    /// mTLS with this node's certificate; `server_name` overrides the peer host as the name
    /// checked on the peer's certificate.
    Mtls {
        files: TlsFiles,
        server_name: Option<String>,
    },
}

/// A lazily connecting channel to `addr` (`host:port`).
pub fn channel(addr: &str, tls: &PeerTls) -> Result<Channel, Error> {
    let scheme = match tls {
        PeerTls::Insecure => "http",
        PeerTls::Mtls { .. } => "https",
    };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| Error::InvalidArgument(format!("bad peer address {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let PeerTls::Mtls { files, server_name } = tls {
        let host = match server_name {
            Some(n) => n.clone(),
            None => host_of(addr).to_string(),
        };
        let cfg = gatesvr_common::tls::tonic_client_tls(files, &host)
            .map_err(|e| Error::Tls(e.to_string()))?;
        ep = ep
            .tls_config(cfg)
            .map_err(|e| Error::Tls(format!("peer {addr}: {e}")))?;
    }
    Ok(ep.connect_lazy())
}

/// The host part of `host:port` / `[v6]:port`.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A raft client for `channel` with raised message limits.
pub fn raft_client(channel: Channel) -> RaftClient<Channel> {
    RaftClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Creates per-peer connections for openraft.
#[derive(Debug, Clone)]
pub struct Network {
    pub self_id: NodeId,
    pub tls: PeerTls,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        let client = match channel(&node.grpc_addr, &self.tls) {
            Ok(ch) => Ok(raft_client(ch)),
            Err(e) => {
                tracing::warn!(target_node = target, addr = %node.grpc_addr, error = %e, "cannot build raft channel");
                Err(e.to_string())
            }
        };
        PeerConnection {
            from: self.self_id,
            target,
            client,
        }
    }
}

/// One peer, as seen by openraft's replication and election tasks.
#[derive(Debug)]
pub struct PeerConnection {
    from: NodeId,
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
}

/// Which RPC a message is for.
#[derive(Debug, Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => {
                let e = std::io::Error::other(e.clone());
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
        };
        let data = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftMessage {
            data,
            from: self.from,
            to: self.target,
        });
        request.set_timeout(option.soft_ttl());
        let reply = match rpc {
            Rpc::Append => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply.into_inner().data)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let (t0, n) = (std::time::Instant::now(), rpc.entries.len());
        let res = self.call(Rpc::Append, &rpc, &option).await;
        crate::stages::record(
            || {
                let kind = if n == 0 { "heartbeat" } else { "append" };
                let err = if res.is_ok() { "" } else { ".err" };
                format!("n{}->n{}.rpc.{kind}{err}", self.from, self.target)
            },
            t0.elapsed(),
        );
        if n > 0 {
            crate::stages::value(
                || format!("n{}->n{}.rpc.entries", self.from, self.target),
                n as u32,
            );
        }
        res
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(super::host_of("127.0.0.1:8096"), "127.0.0.1");
        assert_eq!(super::host_of("[::1]:8096"), "::1");
        assert_eq!(super::host_of("cp-0.cp:8096"), "cp-0.cp");
    }
}
