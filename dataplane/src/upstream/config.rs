//! Configuration of upstream forwarding: timeouts, the node-wide concurrency
//! cap, channel settings, active health checks and passive outlier ejection.
//!
//! Every field has a default, so an empty `upstream:` section is valid. The
//! defaults suit a handful of upstream instances per zone on a cluster network
//! (sub-millisecond RTT, requests that usually finish in milliseconds).

use std::time::Duration;

use gatesvr_common::config::{ConfigError, Validate};
use serde::{Deserialize, Serialize};

/// Where the data-plane config nests [`UpstreamConfig`]; prefixes error keys.
pub const SECTION: &str = "upstream";

/// Upstream forwarding settings of one data-plane node (the `upstream:`
/// section).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Deadline of one `ProcessRequest` call. Sent to the upstream as
    /// `grpc-timeout` and enforced locally as well, so a silent upstream
    /// cannot hold a client request longer. Default 30s.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Upstream calls in flight on this node, across all zones. Beyond it a
    /// request fails at once with `OVERLOADED` instead of queueing: a queue
    /// would only add latency to requests that are already late. Default 100.
    pub max_upstream_concurrent: usize,
    /// `retry_after_ms` suggested to clients refused by
    /// `max_upstream_concurrent`. Default 100ms.
    #[serde(with = "humantime_serde")]
    pub overload_retry_after: Duration,
    /// TCP connect timeout to an upstream instance (tonic has none by
    /// default). Default 1s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval on upstream connections, also while idle, so a
    /// dead peer or a silently dropped NAT entry is noticed before a request
    /// is sent into it. Default 10s.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How long to wait for a PING ack before closing the connection.
    /// Default 5s.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Period of active `grpc.health.v1.Health/Check` calls to every instance.
    /// `0s` disables active checks (for upstreams without the health service);
    /// passive ejection still applies. Default 5s.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// Deadline of one health check. Default 1s.
    #[serde(with = "humantime_serde")]
    pub health_check_timeout: Duration,
    /// Service name sent in `grpc.health.v1` checks, the fallback probe for
    /// upstreams that do not implement `GetStatus`; `""` asks for the whole server.
    /// Default `""`.
    pub health_check_service: String,
    /// Consecutive failed health checks that mark an instance unhealthy.
    /// Default 3.
    pub unhealthy_threshold: u32,
    /// Consecutive passed health checks that mark an unhealthy instance
    /// healthy again. Default 1.
    pub healthy_threshold: u32,
    /// Passive ejection of instances that fail requests.
    pub outlier_detection: OutlierDetectionConfig,
    /// TLS (or mTLS) to every zone's upstreams. Unset: plaintext, which a
    /// config file may choose only with `server.insecure_plaintext_internal`.
    pub tls: Option<super::tls::UpstreamTlsConfig>,
    /// Per-zone replacements of `tls`, keyed by zone id (`"003": {...}`).
    pub zone_tls: std::collections::BTreeMap<String, super::tls::UpstreamTlsConfig>,
    /// How requests reach upstreams: `unary` (one `ProcessRequest` call per
    /// request, the simple path) or `stream` (one long-lived
    /// `UpstreamStreamService.Open` stream per instance, docs/protocol.md
    /// §14). Default `unary`.
    pub protocol: UpstreamProtocol,
    /// Most pushes and broadcasts an upstream may have outstanding on one
    /// stream (told in `GatewayHello`). Default 256.
    pub stream_max_pushes_in_flight: u32,
    /// Cap on the request window an upstream announces in its hello: the
    /// most requests this node keeps outstanding (and in memory) per stream.
    /// Default 1024.
    pub stream_max_requests_in_flight: u32,
}

/// See [`UpstreamConfig::protocol`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// `UpstreamService.ProcessRequest`, one call per request.
    #[default]
    Unary,
    /// `UpstreamStreamService.Open`, one stream per instance.
    Stream,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            upstream_timeout: Duration::from_secs(30),
            max_upstream_concurrent: 100,
            overload_retry_after: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            health_check_interval: Duration::from_secs(5),
            health_check_timeout: Duration::from_secs(1),
            health_check_service: String::new(),
            unhealthy_threshold: 3,
            healthy_threshold: 1,
            outlier_detection: OutlierDetectionConfig::default(),
            tls: None,
            zone_tls: std::collections::BTreeMap::new(),
            protocol: UpstreamProtocol::Unary,
            stream_max_pushes_in_flight: 256,
            stream_max_requests_in_flight: 1024,
        }
    }
}

/// Passive outlier ejection, after Envoy's `consecutive_5xx`: an instance
/// that fails `consecutive_errors` requests in a row (connection errors,
/// timeouts, `UNAVAILABLE`, `INTERNAL`, `UNKNOWN`, ...) is taken out of
/// rotation for `base_ejection_time × times ejected`, capped at
/// `max_ejection_time`. Application errors (`app_code != 0`) and client
/// errors such as `INVALID_ARGUMENT` do not count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierDetectionConfig {
    /// Failures in a row that eject an instance. Default 5.
    pub consecutive_errors: u32,
    /// Ejection time of a first ejection; repeated ejections last longer.
    /// Default 30s.
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// Upper bound of one ejection. Default 300s.
    #[serde(with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// At most this percentage of a zone's instances is ejected at once, and
    /// never the last available one: a zone that ejected everything would
    /// fail every request, which is worse than a flaky instance. Default 50.
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetectionConfig {
    fn default() -> Self {
        Self {
            consecutive_errors: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

impl Validate for UpstreamConfig {
    /// Checks values serde cannot: zero limits, inverted bounds. Error keys
    /// are full paths (`upstream.outlier_detection.consecutive_errors`).
    fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |key: &str, reason: &str| Err(ConfigError::key(format!("{SECTION}.{key}"), reason));
        let od = &self.outlier_detection;
        if self.upstream_timeout.is_zero() {
            return bad("upstream_timeout", "must be positive");
        }
        if self.max_upstream_concurrent == 0 {
            return bad("max_upstream_concurrent", "must be at least 1");
        }
        if self.max_upstream_concurrent > tokio::sync::Semaphore::MAX_PERMITS {
            return bad("max_upstream_concurrent", "is too large");
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout", "must be positive");
        }
        if self.keepalive_interval.is_zero() || self.keepalive_timeout.is_zero() {
            return bad(
                "keepalive_interval",
                "keepalive interval and timeout must be positive",
            );
        }
        if !self.health_check_interval.is_zero() && self.health_check_timeout.is_zero() {
            return bad("health_check_timeout", "must be positive");
        }
        if self.unhealthy_threshold == 0 {
            return bad("unhealthy_threshold", "must be at least 1");
        }
        if self.stream_max_pushes_in_flight == 0 {
            return bad("stream_max_pushes_in_flight", "must be at least 1");
        }
        if self.stream_max_requests_in_flight == 0 {
            return bad("stream_max_requests_in_flight", "must be at least 1");
        }
        if self.healthy_threshold == 0 {
            return bad("healthy_threshold", "must be at least 1");
        }
        if od.consecutive_errors == 0 {
            return bad("outlier_detection.consecutive_errors", "must be at least 1");
        }
        if od.base_ejection_time.is_zero() {
            return bad("outlier_detection.base_ejection_time", "must be positive");
        }
        if od.max_ejection_time < od.base_ejection_time {
            return bad(
                "outlier_detection.max_ejection_time",
                "must not be below base_ejection_time",
            );
        }
        if od.max_ejection_percent > 100 {
            return bad("outlier_detection.max_ejection_percent", "must be 0..=100");
        }
        if let Some(tls) = &self.tls {
            tls.validate(&format!("{SECTION}.tls"))?;
        }
        for (zone, tls) in &self.zone_tls {
            tls.validate(&format!("{SECTION}.zone_tls.{zone}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_section_gives_documented_defaults() {
        let cfg: UpstreamConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, UpstreamConfig::default());
        assert_eq!(cfg.upstream_timeout, Duration::from_secs(30));
        assert_eq!(cfg.max_upstream_concurrent, 100);
        assert_eq!(cfg.health_check_interval, Duration::from_secs(5));
        cfg.validate().unwrap();
    }

    #[test]
    fn durations_are_human_readable_and_unknown_keys_rejected() {
        let cfg: UpstreamConfig = serde_json::from_str(
            r#"{"upstream_timeout":"1500ms","outlier_detection":{"base_ejection_time":"10s"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.upstream_timeout, Duration::from_millis(1500));
        assert_eq!(
            cfg.outlier_detection.base_ejection_time,
            Duration::from_secs(10)
        );
        assert_eq!(cfg.outlier_detection.consecutive_errors, 5);

        let err =
            serde_json::from_str::<UpstreamConfig>(r#"{"upstream_timout":"1s"}"#).unwrap_err();
        assert!(err.to_string().contains("upstream_timout"), "{err}");
    }

    #[test]
    fn validate_names_the_bad_key() {
        let mut cfg = UpstreamConfig::default();
        cfg.outlier_detection.max_ejection_time = Duration::from_secs(1);
        let err = cfg.validate().unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("upstream.outlier_detection.max_ejection_time")
        );

        let cfg = UpstreamConfig {
            max_upstream_concurrent: 0,
            ..UpstreamConfig::default()
        };
        assert_eq!(
            cfg.validate().unwrap_err().key.as_deref(),
            Some("upstream.max_upstream_concurrent")
        );
    }
}
