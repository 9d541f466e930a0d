//! Why a forwarded request failed, and what that means for the instance's
//! health. The mapping from gRPC statuses lives here, once; what the client
//! is told is `crate::errors::ClientError::forward`.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Status};

use super::balancer::Outcome;

/// Metadata key in which an upstream may ask callers to back off
/// (gRPC's retry pushback, milliseconds).
const RETRY_PUSHBACK_KEY: &str = "grpc-retry-pushback-ms";

/// A request the router could not get answered.
///
/// Every variant is the client's to retry (with the same `seq_id`, which the
/// session dedupes); the variants differ in whether retrying *soon* can help.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No routing entry for this zone at all: neither static config nor the
    /// control plane ever named it. Gateway-side configuration problem;
    /// retrying helps only once upstreams register for the zone.
    #[error("unknown zone {zone:?}")]
    UnknownZone {
        /// The zone asked for.
        zone: String,
    },
    /// The zone is known but none of its instances is available (none
    /// registered, all failing health checks or ejected). Retrying after a
    /// back-off may find one recovered.
    #[error("no available upstream instance in zone {zone:?}")]
    NoInstances {
        /// The zone asked for.
        zone: String,
    },
    /// This node already has `max_upstream_concurrent` upstream calls in
    /// flight; the request was not sent. Gateway-side; retry after
    /// `retry_after_ms`.
    #[error("gateway overloaded: upstream concurrency limit reached")]
    Overloaded {
        /// Suggested client back-off.
        retry_after_ms: u32,
    },
    /// The upstream did not answer within `upstream_timeout` (locally, or the
    /// upstream reported `DEADLINE_EXCEEDED`/`CANCELLED`). The request may have
    /// run; a retry relies on upstream idempotency or gateway dedupe.
    #[error("upstream {addr} did not answer within {timeout:?}")]
    Timeout {
        /// The instance asked.
        addr: Arc<str>,
        /// The deadline that expired.
        timeout: Duration,
    },
    /// The upstream shed the request: it answered `RESOURCE_EXHAUSTED`, or
    /// `UNAVAILABLE` with a `grpc-retry-pushback-ms` hint, which the contract
    /// reserves for requests it did not execute. Upstream-side; retry the same
    /// seq after `retry_after_ms`.
    #[error("upstream {addr} is overloaded: {status}")]
    UpstreamOverloaded {
        /// The instance asked.
        addr: Arc<str>,
        /// The upstream's back-off hint, if it gave one.
        retry_after_ms: Option<u32>,
        /// What the upstream answered.
        status: Status,
    },
    /// The request was never executed: the instance could not be reached
    /// (connection refused, TLS or connect failure: nothing was sent), or it
    /// answered `UNAVAILABLE`, which the upstream contract reserves for
    /// requests it did not execute. Upstream-side; the router tries another
    /// instance of the zone, and the client may retry the same seq.
    #[error("upstream {addr} unavailable: {status}")]
    Unavailable {
        /// The instance asked.
        addr: Arc<str>,
        /// The transport's or upstream's status.
        status: Status,
    },
    /// The connection broke after the request was sent (reset, keep-alive
    /// timeout, HTTP/2 error): the upstream may have executed it. Never
    /// retried by the router; the client learns the outcome is unknown.
    #[error("upstream {addr} connection lost with the request in flight: {status}")]
    Lost {
        /// The instance asked.
        addr: Arc<str>,
        /// The transport's status.
        status: Status,
    },
    /// The upstream answered with any other non-OK gRPC status. Upstream-side;
    /// whether a retry helps depends on the code.
    #[error("upstream {addr} failed the request: {status}")]
    Upstream {
        /// The instance asked.
        addr: Arc<str>,
        /// What the upstream answered.
        status: Status,
    },
}

impl ForwardError {
    /// Whether another instance of the zone may take the same request: true
    /// only when this one certainly did not execute it.
    pub fn retry_elsewhere(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::UpstreamOverloaded { .. }
        )
    }

    /// Short label for the `outcome` metric label and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::UnknownZone { .. } => "unknown_zone",
            Self::NoInstances { .. } => "no_instances",
            Self::Overloaded { .. } => "overloaded",
            Self::Timeout { .. } => "timeout",
            Self::UpstreamOverloaded { .. } => "upstream_overloaded",
            Self::Unavailable { .. } => "unavailable",
            Self::Lost { .. } => "lost",
            Self::Upstream { .. } => "upstream_error",
        }
    }

    /// Client back-off for `OVERLOADED` / `UPSTREAM_OVERLOADED`, if known.
    pub fn retry_after_ms(&self) -> Option<u32> {
        match self {
            Self::Overloaded { retry_after_ms } => Some(*retry_after_ms),
            Self::UpstreamOverloaded { retry_after_ms, .. } => *retry_after_ms,
            _ => None,
        }
    }

    /// Classifies a non-OK status from instance `addr`, and says what it
    /// means for the instance's health.
    pub(crate) fn from_status(
        addr: Arc<str>,
        status: Status,
        timeout: Duration,
    ) -> (Self, Outcome) {
        let pushback = status
            .metadata()
            .get(RETRY_PUSHBACK_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        match status.code() {
            // tonic reports its own client/server timeouts as CANCELLED
            // ("Timeout expired"); the router never cancels a call otherwise.
            Code::DeadlineExceeded | Code::Cancelled => {
                (Self::Timeout { addr, timeout }, Outcome::Failure)
            }
            // Load shedding is not a fault: least-outstanding picking already
            // steers away from a busy instance, ejecting it would overload the rest.
            Code::ResourceExhausted if status.source().is_none() => (
                Self::UpstreamOverloaded {
                    addr,
                    retry_after_ms: pushback,
                    status,
                },
                Outcome::Neutral,
            ),
            Code::Unavailable if pushback.is_some() && status.source().is_none() => (
                Self::UpstreamOverloaded {
                    addr,
                    retry_after_ms: pushback,
                    status,
                },
                Outcome::Neutral,
            ),
            // Nothing was sent (connect failed), or the upstream itself said
            // UNAVAILABLE (a status from the peer carries no local source).
            Code::Unavailable if is_connect_error(&status) || status.source().is_none() => {
                (Self::Unavailable { addr, status }, Outcome::Failure)
            }
            // The transport mapped a broken connection (keep-alive timeout,
            // REFUSED_STREAM is rare enough to count here too) to UNAVAILABLE
            // after the request may have left.
            Code::Unavailable => (Self::Lost { addr, status }, Outcome::Failure),
            // The instance is broken (or is not a GateSvr upstream at all).
            Code::Unknown | Code::Internal | Code::DataLoss | Code::Unimplemented => {
                (Self::Upstream { addr, status }, Outcome::Failure)
            }
            // The instance works; it refused this request.
            _ => (Self::Upstream { addr, status }, Outcome::Success),
        }
    }
}

/// Whether tonic failed to connect, so the request never left this node.
fn is_connect_error(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = status.source();
    while let Some(err) = source {
        if err.is::<tonic::ConnectError>() {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use gatesvr_proto::client::ErrorCode;

    use super::*;
    use crate::errors::ClientError;

    fn classify(status: Status) -> (ForwardError, Outcome) {
        ForwardError::from_status("h:1".into(), status, Duration::from_secs(1))
    }

    #[test]
    fn statuses_map_to_codes_and_health_outcomes() {
        let cases = [
            (
                Status::deadline_exceeded("x"),
                ErrorCode::UpstreamTimeout,
                Outcome::Failure,
            ),
            (
                Status::cancelled("Timeout expired"),
                ErrorCode::UpstreamTimeout,
                Outcome::Failure,
            ),
            (
                Status::resource_exhausted("x"),
                ErrorCode::UpstreamOverloaded,
                Outcome::Neutral,
            ),
            (
                Status::unavailable("draining"),
                ErrorCode::UpstreamUnavailable,
                Outcome::Failure,
            ),
            (
                Status::from_error(Box::new(tonic::ConnectError("refused".into()))),
                ErrorCode::UpstreamUnavailable,
                Outcome::Failure,
            ),
            (
                Status::internal("x"),
                ErrorCode::UpstreamError,
                Outcome::Failure,
            ),
            (
                Status::invalid_argument("x"),
                ErrorCode::UpstreamError,
                Outcome::Success,
            ),
        ];
        for (status, code, outcome) in cases {
            let (err, got) = classify(status);
            assert_eq!(
                (ClientError::forward(&err).code, got),
                (code, outcome),
                "{err}"
            );
        }
    }

    #[test]
    fn a_connection_lost_after_sending_is_not_unavailable() {
        // What hyper's keep-alive timeout becomes in tonic: UNAVAILABLE with
        // the local transport error as its source.
        let mut lost = Status::unavailable("keep-alive timeout");
        lost.set_source(Arc::new(std::io::Error::other("connection reset")));
        let (err, outcome) = classify(lost);
        assert!(matches!(err, ForwardError::Lost { .. }), "{err}");
        assert_eq!(ClientError::forward(&err).code, ErrorCode::UpstreamError);
        assert!(!err.retry_elsewhere());
        assert_eq!(outcome, Outcome::Failure);
    }

    #[test]
    fn client_messages_name_no_address() {
        let (err, _) = classify(Status::from_error(Box::new(tonic::ConnectError(
            "tcp connect error: 10.1.2.3:50051: Connection refused".into(),
        ))));
        assert!(err.retry_elsewhere());
        assert!(err.to_string().contains("h:1"), "logs name the instance");
        assert!(!ClientError::forward(&err).message.contains("h:1"));
        assert!(!ClientError::forward(&err).message.contains("10.1.2.3"));
    }

    #[test]
    fn unavailable_with_pushback_is_overload() {
        let mut status = Status::unavailable("draining");
        status
            .metadata_mut()
            .insert(RETRY_PUSHBACK_KEY, "250".parse().unwrap());
        let (err, outcome) = classify(status);
        assert_eq!(
            ClientError::forward(&err).code,
            ErrorCode::UpstreamOverloaded
        );
        assert_eq!(err.retry_after_ms(), Some(250));
        assert_eq!(outcome, Outcome::Neutral);
        assert_eq!(err.label(), "upstream_overloaded");
    }
}
