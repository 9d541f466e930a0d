//! Where errors reach the wire: what a client, a QUIC or WebSocket close, an
//! upstream or a peer is told when something fails. The layers keep their
//! typed errors (thiserror enums that say which side failed and whether a
//! retry helps: [`ForwardError`], [`AuthError`], [`ClaimError`], ...); this
//! module alone turns them into wire codes and messages, so the rule below
//! is kept in one place.
//!
//! **A client never sees an internal address, a node's name or a library's
//! error text.** Its message is fixed per case (docs/protocol.md §8); the
//! detail (instance address, transport error, the control plane's reason)
//! goes to the log and a metric label at the place that failed.
//!
//! | wire | built by | documented in |
//! |---|---|---|
//! | client `Error` frame / `ClientResponse.code` + `message` | [`ClientError`] | protocol.md §5.1, §8 |
//! | QUIC `CONNECTION_CLOSE` application code | [`quic_close_code`], [`NODE_STOPPED`] | protocol.md §8.1 |
//! | WebSocket close code | [`websocket_close_code`] | protocol.md §12.3 |
//! | gRPC status of `GatewayService` (to upstreams) | [`GatewayRefusal`] | protocol.md §13.3 |
//! | gRPC status of `PeerService` (node to node) | [`PeerRefusal`] | architecture.md §8 |
//! | HTTP status of the ops endpoints | [`OpsError`] | operations.md |
//!
//! `GatewayService`'s callers are an operator's upstreams: its messages may
//! name a node (a standby that did not take a copy), never a library's text
//! beyond what a peer answered.

use std::borrow::Cow;

use gatesvr_proto::client::ErrorCode;
use gatesvr_proto::frame::FrameError;

use crate::auth::AuthError;
use crate::cluster::ClaimError;
use crate::core::HandoverError;
use crate::upstream::ForwardError;

/// What a client is told: the `code`, `message` and `retry_after_ms` of an
/// `Error` frame or of a `ClientResponse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientError {
    pub(crate) code: ErrorCode,
    /// Fixed per case; never an address, a node name or a library's text.
    pub(crate) message: Cow<'static, str>,
    /// Client back-off for `OVERLOADED` / `UPSTREAM_OVERLOADED`; 0 if none.
    pub(crate) retry_after_ms: u32,
}

impl ClientError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: 0,
        }
    }

    /// A request the router could not get answered (docs/protocol.md §5.1).
    pub(crate) fn forward(err: &ForwardError) -> Self {
        let (code, message) = match err {
            ForwardError::UnknownZone { .. } => (
                ErrorCode::UpstreamUnavailable,
                "not executed: no upstream is registered for this zone",
            ),
            ForwardError::NoInstances { .. } => (
                ErrorCode::UpstreamUnavailable,
                "not executed: no upstream instance of this zone is available",
            ),
            ForwardError::Unavailable { .. } => (
                ErrorCode::UpstreamUnavailable,
                "not executed: no upstream instance of this zone could take the request",
            ),
            ForwardError::Overloaded { .. } => (
                ErrorCode::Overloaded,
                "not executed: gateway overloaded; retry after retry_after_ms",
            ),
            ForwardError::Timeout { .. } => (
                ErrorCode::UpstreamTimeout,
                "the upstream did not answer in time; the request may have taken effect",
            ),
            ForwardError::UpstreamOverloaded { .. } => (
                ErrorCode::UpstreamOverloaded,
                "not executed: the upstream shed the request; retry after retry_after_ms",
            ),
            ForwardError::Lost { .. } => (
                ErrorCode::UpstreamError,
                "outcome unknown: the connection to the upstream broke after the request was sent",
            ),
            ForwardError::Upstream { .. } => {
                (ErrorCode::UpstreamError, "the upstream failed the request")
            }
        };
        Self {
            code,
            message: message.into(),
            retry_after_ms: err.retry_after_ms().unwrap_or(0),
        }
    }

    /// A Start whose token was refused. An invalid token's detail is the
    /// verifier's (a JWT library's) text: the caller logs it and counts
    /// `gatesvr_auth_failures_total{reason}`.
    pub(crate) fn auth(err: &AuthError) -> Self {
        let message = match err {
            AuthError::Invalid(_) => "invalid token",
            AuthError::Expired => "token expired",
            AuthError::OpenidMismatch => "token is for a different openid",
            AuthError::NotYetValid => "token not valid yet (nbf)",
        };
        Self::new(err.code(), message)
    }

    /// A Start the control plane refused to let this node own. Its reason
    /// (node names, states) is for the log and
    /// `gatesvr_connections_rejected_total{reason="claim_refused"}`.
    pub(crate) fn claim_refused(_err: &ClaimError) -> Self {
        Self::new(
            ErrorCode::Draining,
            "this node may not take sessions now: connect to another node",
        )
    }

    /// A byte stream that is not a valid sequence of frames. The messages
    /// describe the client's own bytes (and the configured frame limit).
    pub(crate) fn frame(err: &FrameError) -> Self {
        Self::new(err.code(), err.to_string())
    }
}

/// What an operations endpoint answers when it does not do what was asked
/// (the success answers stay with their handlers in `ops/http.rs`). Its
/// callers are operators and kubelet: the text may carry detail.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpsError {
    /// 401: no or a wrong `authorization: Bearer` on the operations listener.
    #[error("the operations listener needs `authorization: Bearer <server.ops_token_file>`")]
    Unauthorized,
    /// 503 on `/ready`: the node knows neither routes nor owners yet.
    #[error("not ready")]
    NotReady,
    /// 400: a query parameter out of range.
    #[error("{0}")]
    BadRequest(&'static str),
    /// 409: a CPU profile is being taken (the profiler is process-wide).
    #[error("a profile is already being taken")]
    ProfileBusy,
    /// 500: the profiler (`what`) failed.
    #[error("{what}: {detail}")]
    Profiler { what: &'static str, detail: String },
}

impl axum::response::IntoResponse for OpsError {
    fn into_response(self) -> axum::response::Response {
        use axum::http::StatusCode;
        let status = match &self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::ProfileBusy => StatusCode::CONFLICT,
            Self::Profiler { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = format!("{self}\n");
        if matches!(self, Self::Unauthorized) {
            let challenge = [(axum::http::header::WWW_AUTHENTICATE, "Bearer")];
            return (status, challenge, body).into_response();
        }
        (status, body).into_response()
    }
}

/// The QUIC application close code of a connection ended with `code`: the
/// `ErrorCode` value itself (docs/protocol.md §8.1).
pub(crate) fn quic_close_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(code as u32)
}

/// The QUIC close code when the whole node stops (shutdown, a test's crash):
/// 0, no session-level error; the client resumes elsewhere.
pub(crate) const NODE_STOPPED: quinn::VarInt = quinn::VarInt::from_u32(0);

/// WebSocket close codes are `4000 + ErrorCode` (4000..4999 are the
/// application's, RFC 6455 §7.4.2).
pub(crate) fn websocket_close_code(code: ErrorCode) -> u16 {
    crate::transport::WS_CLOSE_BASE + code as u16
}

/// Why a node's `PeerService` refused another node's call. The caller acts
/// on the gRPC code, so each case has one (architecture.md §8): UNAVAILABLE
/// is "ask again or elsewhere", NOT_FOUND from a standby is "send the whole
/// queue", FAILED_PRECONDITION is a fencing refusal a retry cannot change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    /// UNAVAILABLE: the node is stopping.
    #[error("node crashed")]
    Stopped,
    /// FAILED_PRECONDITION (fenced) or INVALID_ARGUMENT (no epoch).
    #[error(transparent)]
    Handover(#[from] HandoverError),
    /// FAILED_PRECONDITION: a staged state this node cannot take (older than
    /// a copy known here, or malformed).
    #[error("cannot stage session: {0}")]
    Stage(String),
    /// INVALID_ARGUMENT: a Stage without its state.
    #[error("state is required")]
    NoState,
    /// DEADLINE_EXCEEDED: a Stage stream stopped between chunks.
    #[error("no next stage chunk in time")]
    StageStalled,
    /// NOT_FOUND: an update (`incremental`) to a copy this standby does not
    /// hold (it restarted): the owner sends the whole queue.
    #[error("no copy of this session here: send the whole queue")]
    NoCopy,
    /// FAILED_PRECONDITION: this standby holds a newer session of the openid.
    #[error("replica holds session {session_id} at epoch {held}, newer than {offered}")]
    NewerReplica {
        session_id: String,
        held: u64,
        offered: u64,
    },
    /// RESOURCE_EXHAUSTED: the replica reached its push limit.
    #[error("replica full")]
    ReplicaFull,
    /// UNAVAILABLE: this node is leaving and has handed what it holds on; the
    /// owner copies to the next node of its ring.
    #[error("this node is leaving and takes no more copies")]
    Leaving,
    /// INVALID_ARGUMENT: a `FetchReplicas` call over the per-call limit.
    #[error("at most {max} sessions per FetchReplicas call, {asked} asked")]
    TooManyFetches { asked: usize, max: usize },
}

impl PeerRefusal {
    pub fn code(&self) -> tonic::Code {
        match self {
            PeerRefusal::Stopped | PeerRefusal::Leaving => tonic::Code::Unavailable,
            PeerRefusal::Handover(HandoverError::NoEpoch)
            | PeerRefusal::NoState
            | PeerRefusal::TooManyFetches { .. } => tonic::Code::InvalidArgument,
            PeerRefusal::Handover(HandoverError::Fenced { .. })
            | PeerRefusal::Stage(_)
            | PeerRefusal::NewerReplica { .. } => tonic::Code::FailedPrecondition,
            PeerRefusal::StageStalled => tonic::Code::DeadlineExceeded,
            PeerRefusal::NoCopy => tonic::Code::NotFound,
            PeerRefusal::ReplicaFull => tonic::Code::ResourceExhausted,
        }
    }
}

/// Why `GatewayService` (an upstream's push or broadcast) did not answer
/// OK, one gRPC code per case (protocol.md §13.3): UNAVAILABLE is "retry,
/// here or on another node", INVALID_ARGUMENT and FAILED_PRECONDITION are
/// not changed by a retry, UNKNOWN says the push was queued but is not
/// durable (it may still be delivered: a retry may deliver it twice).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayRefusal {
    /// UNAVAILABLE: the node is stopping.
    #[error("node crashed")]
    Stopped,
    /// INVALID_ARGUMENT.
    #[error("target_id is empty")]
    NoTarget,
    /// INVALID_ARGUMENT.
    #[error("unknown target_type")]
    UnknownTargetType,
    /// INVALID_ARGUMENT: the client's decoder would refuse the frame.
    #[error(
        "push too large: {len} bytes encoded, over the client frame limit of {max} bytes (server.max_frame_size); not queued"
    )]
    TooLarge { len: usize, max: usize },
    /// INVALID_ARGUMENT.
    #[error("at most {max} pushes per batch")]
    BatchTooLarge { max: usize },
    /// NOT_FOUND: no session (here or on the owner the view names).
    #[error("no session for {target}")]
    NoSession { target: String },
    /// FAILED_PRECONDITION: a durable push with no standby to copy it to.
    #[error(
        "cannot make the push durable: no standby node is available to replicate it to; not queued"
    )]
    NoStandby,
    /// UNAVAILABLE: the session is moving between nodes.
    #[error("the session is moving between nodes; not queued, retry")]
    InTransit,
    /// RESOURCE_EXHAUSTED: the session's queue is full (`full` says how).
    #[error("{full}; client disconnected as a slow consumer")]
    QueueFull { full: String },
    /// UNAVAILABLE: this node's lease may have lapsed (`lease` says how);
    /// the push was not queued.
    #[error(
        "cannot make the push durable: {lease}; not queued, retry (another node, or once the control plane is reachable)"
    )]
    NoLease { lease: String },
    /// UNAVAILABLE: as [`GatewayRefusal::NoLease`], after queueing.
    #[error("cannot make the push durable: {lease}")]
    NoLeaseQueued { lease: String },
    /// UNKNOWN: queued, but the session moved here while it was queued.
    #[error(
        "cannot make the push durable: the session moved here while it was queued; it was queued as seq {seq} and may still be delivered, but is not durable"
    )]
    MovedWhileQueued { seq: u64 },
    /// UNKNOWN: copied, but the lease may have lapsed meanwhile.
    #[error(
        "cannot make the push durable: this node's control-plane lease may have lapsed; it was queued as seq {seq} and may still be delivered, but is not durable"
    )]
    LeaseLapsedAfterCopy { seq: u64 },
    /// UNKNOWN: the standby did not take the copy (`why`: its answer).
    #[error(
        "cannot make the push durable: standby {standby} did not take the copy ({why}); it was queued as seq {seq} and may still be delivered, but would not survive a crash"
    )]
    NotCopied {
        standby: String,
        why: String,
        seq: u64,
    },
    /// UNAVAILABLE: the session's owner did not receive the forwarded push
    /// (it refused the connection, or is stopping and did not process it).
    #[error("the push could not be forwarded to the session's owner; not queued, retry")]
    NotForwarded,
    /// UNKNOWN: forwarded, but the owner's answer never came back (the
    /// connection broke or timed out mid-call).
    #[error(
        "the push was forwarded to the session's owner, which did not answer; it may have been queued"
    )]
    ForwardUnanswered,
    /// UNAVAILABLE: a broadcast reached some nodes only (never hidden).
    #[error("broadcast queued on {queued} sessions but {unreachable} node(s) were unreachable")]
    BroadcastPartial { queued: u32, unreachable: usize },
}

impl GatewayRefusal {
    pub fn code(&self) -> tonic::Code {
        use GatewayRefusal as G;
        match self {
            G::Stopped | G::InTransit | G::NoLease { .. } | G::NoLeaseQueued { .. } => {
                tonic::Code::Unavailable
            }
            G::BroadcastPartial { .. } | G::NotForwarded => tonic::Code::Unavailable,
            G::NoTarget | G::UnknownTargetType | G::TooLarge { .. } | G::BatchTooLarge { .. } => {
                tonic::Code::InvalidArgument
            }
            G::NoSession { .. } => tonic::Code::NotFound,
            G::NoStandby => tonic::Code::FailedPrecondition,
            G::QueueFull { .. } => tonic::Code::ResourceExhausted,
            G::MovedWhileQueued { .. }
            | G::LeaseLapsedAfterCopy { .. }
            | G::NotCopied { .. }
            | G::ForwardUnanswered => tonic::Code::Unknown,
        }
    }
}

impl From<GatewayRefusal> for tonic::Status {
    fn from(refusal: GatewayRefusal) -> Self {
        tonic::Status::new(refusal.code(), refusal.to_string())
    }
}

impl From<PeerRefusal> for tonic::Status {
    fn from(refusal: PeerRefusal) -> Self {
        tonic::Status::new(refusal.code(), refusal.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Internal details a failure may carry; none may reach a client.
    const SECRETS: [&str; 5] = ["10.9.8.7", "50051", "dp-7", "os error", "Unexpected"];

    fn assert_clean(what: &str, err: &ClientError) {
        for secret in SECRETS {
            assert!(
                !err.message.contains(secret),
                "{what}: the client's message names {secret:?}: {}",
                err.message
            );
        }
    }

    #[test]
    fn a_client_message_carries_no_internal_detail() {
        let addr: Arc<str> = "10.9.8.7:50051".into();
        let refused = tonic::Status::unavailable(
            "tcp connect error: 10.9.8.7:50051: Connection refused (os error 111)",
        );
        let forwards = [
            ForwardError::Unavailable {
                addr: addr.clone(),
                status: refused.clone(),
            },
            ForwardError::Lost {
                addr: addr.clone(),
                status: refused.clone(),
            },
            ForwardError::Upstream {
                addr: addr.clone(),
                status: refused.clone(),
            },
            ForwardError::Timeout {
                addr: addr.clone(),
                timeout: Duration::from_secs(1),
            },
        ];
        for err in &forwards {
            assert_clean(&format!("{err}"), &ClientError::forward(err));
        }
        // What the control plane answers a refused claim (its own text, a
        // node name, or a Debug dump of an unexpected result).
        let refused_claims = [
            ClaimError::NotActive(
                "failed precondition: node dp-7 is not active (cordoned: it keeps its sessions but takes no new ones)".into(),
            ),
            ClaimError::Refused("node dp-7 is not active (state Left)".into()),
            ClaimError::Refused("unexpected Unexpected { at: \"10.9.8.7:50051\" }".into()),
        ];
        for err in &refused_claims {
            let client = ClientError::claim_refused(err);
            assert_eq!(client.code, ErrorCode::Draining);
            assert_clean(&format!("{err}"), &client);
        }
        // A JWT library's text about the token.
        let auth = AuthError::Invalid("Unexpected end of input at line 1 (os error 0)".into());
        assert_clean("auth", &ClientError::auth(&auth));
        assert_eq!(ClientError::auth(&auth).code, ErrorCode::Unauthenticated);
    }

    #[test]
    fn ops_errors_keep_their_statuses_and_bodies() {
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        let cases = [
            (OpsError::Unauthorized, StatusCode::UNAUTHORIZED),
            (OpsError::NotReady, StatusCode::SERVICE_UNAVAILABLE),
            (
                OpsError::BadRequest("seconds must be 1..=60"),
                StatusCode::BAD_REQUEST,
            ),
            (OpsError::ProfileBusy, StatusCode::CONFLICT),
            (
                OpsError::Profiler {
                    what: "profiler",
                    detail: "x".into(),
                },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (err, status) in cases {
            let challenged = matches!(err, OpsError::Unauthorized);
            let response = err.into_response();
            assert_eq!(response.status(), status);
            let header = response.headers().get(axum::http::header::WWW_AUTHENTICATE);
            assert_eq!(header.is_some(), challenged, "{status}");
        }
        assert_eq!(OpsError::NotReady.to_string(), "not ready");
    }

    #[test]
    fn close_codes_are_the_error_codes() {
        assert_eq!(
            quic_close_code(ErrorCode::SessionReplaced).into_inner(),
            ErrorCode::SessionReplaced as u64
        );
        assert_eq!(
            websocket_close_code(ErrorCode::Draining),
            4000 + ErrorCode::Draining as u16
        );
    }

    /// The codes callers act on: a standby's NOT_FOUND makes the owner send
    /// the whole queue (`replica::copy_lost`), a fencing refusal is final.
    #[test]
    fn gateway_refusals_keep_the_codes_upstreams_act_on() {
        use GatewayRefusal as G;
        let cases = [
            (G::Stopped, tonic::Code::Unavailable),
            (G::InTransit, tonic::Code::Unavailable),
            (G::NoTarget, tonic::Code::InvalidArgument),
            (G::TooLarge { len: 9, max: 8 }, tonic::Code::InvalidArgument),
            (
                G::NoSession {
                    target: "u1".into(),
                },
                tonic::Code::NotFound,
            ),
            (G::NoStandby, tonic::Code::FailedPrecondition),
            (
                G::QueueFull {
                    full: "queue full".into(),
                },
                tonic::Code::ResourceExhausted,
            ),
            (G::MovedWhileQueued { seq: 3 }, tonic::Code::Unknown),
            (
                G::BroadcastPartial {
                    queued: 1,
                    unreachable: 1,
                },
                tonic::Code::Unavailable,
            ),
        ];
        for (refusal, code) in cases {
            assert_eq!(
                tonic::Status::from(refusal.clone()).code(),
                code,
                "{refusal}"
            );
        }
        assert_eq!(
            tonic::Status::from(G::NoSession {
                target: "u1".into()
            })
            .message(),
            "no session for u1"
        );
    }

    #[test]
    fn peer_refusals_keep_the_codes_callers_act_on() {
        let status = tonic::Status::from(PeerRefusal::NoCopy);
        assert_eq!(status.code(), tonic::Code::NotFound);
        let fenced = PeerRefusal::from(HandoverError::Fenced { held: 5, asked: 4 });
        assert_eq!(
            tonic::Status::from(fenced).code(),
            tonic::Code::FailedPrecondition
        );
        let no_epoch = PeerRefusal::from(HandoverError::NoEpoch);
        assert_eq!(no_epoch.code(), tonic::Code::InvalidArgument);
        assert_eq!(PeerRefusal::Stopped.code(), tonic::Code::Unavailable);
        assert_eq!(
            tonic::Status::from(PeerRefusal::Stage("stale".into())).message(),
            "cannot stage session: stale"
        );
    }
}
