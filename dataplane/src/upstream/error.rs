//! Why a forwarded request failed, and what that means for the client and for
//! the instance's health. The mapping from gRPC statuses lives here, once.

use std::sync::Arc;
use std::time::Duration;

use gatesvr_proto::client::ErrorCode;
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
    /// The upstream shed the request: `RESOURCE_EXHAUSTED`, or `UNAVAILABLE`
    /// with a `grpc-retry-pushback-ms` hint. Upstream-side; retry later.
    #[error("upstream {addr} is overloaded: {status}")]
    UpstreamOverloaded {
        /// The instance asked.
        addr: Arc<str>,
        /// The upstream's back-off hint, if it gave one.
        retry_after_ms: Option<u32>,
        /// What the upstream answered.
        status: Status,
    },
    /// The instance could not be reached or answered `UNAVAILABLE` (connection
    /// refused or reset, TLS or HTTP/2 failure). Upstream-side; another
    /// instance may serve a retry.
    #[error("upstream {addr} unavailable: {status}")]
    Unavailable {
        /// The instance asked.
        addr: Arc<str>,
        /// The transport's or upstream's status.
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
    /// The client-visible error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownZone { .. } | Self::NoInstances { .. } | Self::Unavailable { .. } => {
                ErrorCode::UpstreamUnavailable
            }
            Self::Overloaded { .. } => ErrorCode::Overloaded,
            Self::Timeout { .. } => ErrorCode::UpstreamTimeout,
            Self::UpstreamOverloaded { .. } => ErrorCode::UpstreamOverloaded,
            Self::Upstream { .. } => ErrorCode::UpstreamError,
        }
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
            Code::ResourceExhausted => (
                Self::UpstreamOverloaded {
                    addr,
                    retry_after_ms: pushback,
                    status,
                },
                Outcome::Neutral,
            ),
            Code::Unavailable if pushback.is_some() => (
                Self::UpstreamOverloaded {
                    addr,
                    retry_after_ms: pushback,
                    status,
                },
                Outcome::Neutral,
            ),
            Code::Unavailable => (Self::Unavailable { addr, status }, Outcome::Failure),
            // The instance is broken (or is not a GateSvr upstream at all).
            Code::Unknown | Code::Internal | Code::DataLoss | Code::Unimplemented => {
                (Self::Upstream { addr, status }, Outcome::Failure)
            }
            // The instance works; it refused this request.
            _ => (Self::Upstream { addr, status }, Outcome::Success),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                Status::unavailable("refused"),
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
            assert_eq!((err.code(), got), (code, outcome), "{err}");
        }
    }

    #[test]
    fn unavailable_with_pushback_is_overload() {
        let mut status = Status::unavailable("draining");
        status
            .metadata_mut()
            .insert(RETRY_PUSHBACK_KEY, "250".parse().unwrap());
        let (err, outcome) = classify(status);
        assert_eq!(err.code(), ErrorCode::UpstreamOverloaded);
        assert_eq!(err.retry_after_ms(), Some(250));
        assert_eq!(outcome, Outcome::Neutral);
        assert_eq!(err.label(), "upstream_overloaded");
    }
}
