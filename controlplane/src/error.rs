//! The control plane's error type, and its mapping to gRPC and HTTP in one place.

use crate::state::CmdError;
use crate::types::{Member, NodeId};

/// Everything the control plane can answer with besides success.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid (start-up only; exit code 64).
    #[error(transparent)]
    Config(#[from] gatesvr_common::config::ConfigError),
    /// A local I/O problem at start-up (binding a port, creating the data dir). Not retryable
    /// without operator action.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The raft store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::OpenError),
    /// TLS material could not be loaded.
    #[error("tls: {0}")]
    Tls(String),
    /// Raft stopped or failed fatally on this node (storage failure, shutdown).
    #[error("raft: {0}")]
    Raft(String),
    /// The request must be served by the leader and this node could not forward it. Retry
    /// against the leader named here (its admin and gRPC addresses), or later if none is known.
    #[error("not the leader; leader is {}", leader_desc(.leader))]
    NotLeader { leader: Option<(NodeId, Member)> },
    /// No quorum answered in time (minority partition, election in progress). Retrying is safe
    /// for every API: writes are idempotent (registrations by address, claims by session).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request is malformed: unknown zone, bad address, empty id. Do not retry.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The named thing does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request conflicts with existing state (e.g. an address registered for another
    /// service).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The caller acted on a stale ownership epoch (fencing); re-read and retry if still wanted.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The caller's state does not allow this (a dead or unregistered data-plane node must
    /// register again).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A data-plane node did not answer the control plane's request for its stats (down,
    /// or its HTTP port unreachable from here). Retry, or ask the node directly.
    #[error("data plane unreachable: {0}")]
    DataPlaneUnreachable(String),
}

fn leader_desc(leader: &Option<(NodeId, Member)>) -> String {
    match leader {
        Some((id, m)) => format!("node {id} (admin {}, grpc {})", m.admin_addr, m.grpc_addr),
        None => "unknown (election in progress?)".into(),
    }
}

impl From<CmdError> for Error {
    fn from(e: CmdError) -> Self {
        let msg = e.to_string();
        match e {
            CmdError::NotFound { .. } => Error::NotFound(msg),
            CmdError::Conflict { .. } => Error::Conflict(msg),
            CmdError::Fenced { .. } => Error::Fenced(msg),
            CmdError::NodeNotActive { .. } => Error::FailedPrecondition(msg),
            CmdError::Invalid { .. } => Error::InvalidArgument(msg),
        }
    }
}

impl Error {
    /// The HTTP status for the admin API.
    pub fn http_status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Error::InvalidArgument(_) | Error::Config(_) => S::BAD_REQUEST,
            Error::NotFound(_) => S::NOT_FOUND,
            Error::Conflict(_) | Error::Fenced(_) | Error::FailedPrecondition(_) => S::CONFLICT,
            // 421: this node cannot serve it; the body names the leader.
            Error::NotLeader { .. } => S::MISDIRECTED_REQUEST,
            Error::Unavailable(_) => S::SERVICE_UNAVAILABLE,
            Error::DataPlaneUnreachable(_) => S::BAD_GATEWAY,
            Error::Io { .. } | Error::Store(_) | Error::Tls(_) | Error::Raft(_) => {
                S::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// A short machine-readable code for JSON bodies and gatectl exit codes.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Io { .. } => "io",
            Error::Store(_) => "store",
            Error::Tls(_) => "tls",
            Error::Raft(_) => "raft",
            Error::NotLeader { .. } => "not_leader",
            Error::Unavailable(_) => "unavailable",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::Fenced(_) => "fenced",
            Error::FailedPrecondition(_) => "failed_precondition",
            Error::DataPlaneUnreachable(_) => "dataplane_unreachable",
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::InvalidArgument(_) | Error::Config(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::Conflict(_) => Code::AlreadyExists,
            Error::Fenced(_) => Code::Aborted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::NotLeader { .. } | Error::Unavailable(_) | Error::DataPlaneUnreachable(_) => {
                Code::Unavailable
            }
            Error::Io { .. } | Error::Store(_) | Error::Tls(_) | Error::Raft(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
