//! What answers a client request: the zone's upstream through the
//! [`UpstreamRouter`], or an echo for tests and baselines.

use std::sync::Arc;

use gatesvr_proto::client::{ClientRequest, ClientResponse, ErrorCode};

use crate::session::SessionIdentity;
use crate::upstream::{ForwardRequest, UpstreamRouter};

/// How a node answers requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Forward to the zone's upstream instances (every real deployment).
    Upstreams,
    /// Answer every request with its own payload, no upstream involved. For
    /// protocol tests and `gate-bench` baselines only.
    Echo,
}

/// The request handler of a node.
pub enum Handler {
    Echo,
    Upstream(Arc<UpstreamRouter>),
}

fn response(request: &ClientRequest, zone: &str) -> ClientResponse {
    ClientResponse {
        msg_id: request.msg_id,
        seq_id: request.seq_id,
        code: ErrorCode::Ok as i32,
        zone: zone.to_string(),
        ..Default::default()
    }
}

impl Handler {
    pub async fn handle(
        &self,
        node_id: &str,
        session: &SessionIdentity,
        request: &ClientRequest,
    ) -> ClientResponse {
        let mut answer = response(request, &session.zone);
        match self {
            Handler::Echo => answer.payload = request.payload.clone(),
            Handler::Upstream(router) => {
                let forward = ForwardRequest {
                    openid: session.openid.clone(),
                    session_id: session.session_id.clone(),
                    zone: session.zone.clone(),
                    node_id: node_id.to_string(),
                    msg_id: request.msg_id,
                    seq_id: request.seq_id,
                    payload: request.payload.clone().into(),
                    trace_id: format!("{}-{}", session.session_id, request.seq_id),
                };
                match router.forward(forward).await {
                    Ok(ok) => {
                        answer.app_code = ok.app_code;
                        answer.payload = ok.payload;
                        answer.message = ok.message;
                    }
                    Err(err) => {
                        // The detail (instance address, transport error) is
                        // for operators; the client gets a fixed message.
                        tracing::debug!(zone = %session.zone, seq_id = request.seq_id, error = %err, "request failed");
                        answer.code = err.code() as i32;
                        answer.message = err.client_message().to_owned();
                        answer.retry_after_ms = err.retry_after_ms().unwrap_or(0);
                    }
                }
            }
        }
        answer
    }
}
