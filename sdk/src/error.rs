//! SDK errors.

use gatesvr_proto::client::ErrorCode;

/// The client as a whole failed (connect, auth, closed).
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ClientError {
    /// TLS or QUIC set-up failed locally (bad CA file, no UDP socket).
    #[error("client setup: {0}")]
    Setup(String),
    /// The gateway could not be reached or the handshake failed.
    #[error("connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The gateway refused the session; retrying with the same input won't help
    /// (e.g. UNAUTHENTICATED, TOKEN_EXPIRED, OPENID_MISMATCH).
    #[error("gateway refused the session: {code:?}: {message}")]
    Refused { code: ErrorCode, message: String },
    /// The client was stopped or gave up reconnecting.
    #[error("client closed: {0}")]
    Closed(String),
}

/// One request failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RequestError {
    /// No answer within the request timeout (the request may still run).
    #[error("request timed out")]
    Timeout,
    /// The gateway answered with an error code (upstream down, overloaded...).
    #[error("gateway error {code:?}: {message}")]
    Gateway {
        code: ErrorCode,
        message: String,
        /// For OVERLOADED / UPSTREAM_OVERLOADED: wait at least this long.
        retry_after_ms: u32,
    },
    /// The session was lost while the request was in flight and a new session
    /// replaced it: whether it ran is unknown, and it is NOT retried (it could
    /// otherwise run twice).
    #[error("session lost while the request was in flight; outcome unknown")]
    OutcomeUnknown,
    /// The client is closed.
    #[error("client closed")]
    Closed,
}
