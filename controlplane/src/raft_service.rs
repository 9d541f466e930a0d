//! Raft transport, server side: `gatesvr.raft.v1.Raft` feeding openraft, plus `Forward`.

use std::sync::Arc;

use gatesvr_proto::raft::RaftMessage;
use gatesvr_proto::raft::raft_server::Raft as RaftApi;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};
use x509_parser::extensions::GeneralName;

use crate::node::{ForwardError, ForwardRequest, ForwardResponse, Node};

/// Serves raft RPCs for one node.
#[derive(Debug, Clone)]
pub struct RaftService {
    node: Node,
    /// Certificate names allowed to call (empty: any certificate the TLS layer accepted).
    allowed: Arc<Vec<String>>,
}

/// The names a DER certificate answers to: SAN DNS names and IPs, and the subject CN.
pub fn cert_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => names.push((*d).to_string()),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => {
                        names.push(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string())
                    }
                    16 => {
                        let mut b = [0u8; 16];
                        b.copy_from_slice(ip);
                        names.push(std::net::Ipv6Addr::from(b).to_string());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    names
}

impl RaftService {
    pub fn new(node: Node, allowed: Vec<String>) -> Self {
        Self {
            node,
            allowed: Arc::new(allowed),
        }
    }

    /// Refuses callers whose certificate is not a control-plane peer's.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.allowed.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = req
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| cert_names(c.as_ref())))
            .unwrap_or_default();
        if names.iter().any(|n| self.allowed.contains(n)) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "certificate {names:?} may not call the raft service (tls.raft_peer_names)"
            )))
        }
    }

    /// Decodes a message addressed to this node from an allowed peer.
    fn open<T: DeserializeOwned>(&self, req: Request<RaftMessage>) -> Result<T, Status> {
        self.authorize(&req)?;
        let msg = req.into_inner();
        if msg.to != self.node.id() {
            // A peer dialled an address that is no longer (or never was) node `to`.
            return Err(Status::failed_precondition(format!(
                "message for raft node {} reached node {}",
                msg.to,
                self.node.id()
            )));
        }
        serde_json::from_slice(&msg.data)
            .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
    }

    fn reply<T: Serialize>(&self, value: &T) -> Result<Response<RaftMessage>, Status> {
        let data = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RaftMessage {
            data,
            from: self.node.id(),
            to: 0,
        }))
    }
}

#[tonic::async_trait]
impl RaftApi for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: openraft::raft::AppendEntriesRequest<crate::types::TypeConfig> =
            self.open(request)?;
        let (t0, n) = (std::time::Instant::now(), rpc.entries.len());
        let res = self.node.raft().append_entries(rpc).await;
        crate::stages::record(
            || {
                let kind = if n == 0 { "heartbeat" } else { "append" };
                format!("n{}.serve.{kind}", self.node.id())
            },
            t0.elapsed(),
        );
        self.reply(&res)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc = self.open(request)?;
        let res = self.node.raft().vote(rpc).await;
        self.reply(&res)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc = self.open(request)?;
        let res = self.node.raft().install_snapshot(rpc).await;
        self.reply(&res)
    }

    async fn forward(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let req: ForwardRequest = self.open(request)?;
        let res: Result<ForwardResponse, ForwardError> = self
            .node
            .serve_forward(req)
            .await
            .map_err(|e| ForwardError::from(&e));
        self.reply(&res)
    }
}
