//! Tunables of one session, with the defaults GateSvr ships.

use std::time::Duration;

/// What [`Session::push`](super::Session::push) does when `max_queue` pushes are
/// already waiting for an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueuePolicy {
    /// Refuse the new push with [`PushError::QueueFull`](super::PushError::QueueFull).
    /// Nothing the client has not acked is ever lost; the shell disconnects the
    /// client as `SLOW_CONSUMER` and the upstream sees the push fail.
    #[default]
    Reject,
    /// Accept the new push and drop the oldest unacked one. For feeds where
    /// fresh data matters more than completeness; a resume past a dropped seq
    /// reports `RESUME_STATUS_TRIMMED`.
    DropOldest,
}

/// Limits and timers of a [`Session`](super::Session).
///
/// Defaults suit interactive apps on mobile networks: a client that stays
/// connected but silent for 30 s is probably behind a dead path, and a phone
/// switching networks usually comes back within minutes.
///
/// Deserializes from the `session:` section of the config file; durations are
/// humantime strings (`"30s"`, `"5m"`), missing keys take their default and
/// unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// How long the oldest sent push may wait for its ack before everything
    /// unacked is sent again (go-back-N). Default 30 s: well above any RTT, so
    /// a retransmit means a stalled client rather than a slow network.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Retransmit rounds without ack progress before the connection is closed
    /// with `ACK_TIMEOUT`. Default 3.
    pub max_retries: u32,
    /// Pushes kept until acked, sent or not. Bounds memory per session:
    /// default 1024.
    pub max_queue: usize,
    /// Payload bytes of the pushes kept until acked: bounds memory per
    /// session whatever the push sizes. Default 16 MiB. At the bound the
    /// queue policy applies as at `max_queue`. Must be at least the largest
    /// push (`max_frame_size`), so one push always fits an empty queue.
    pub max_queue_bytes: usize,
    /// What happens at `max_queue` or `max_queue_bytes`. Default
    /// [`QueuePolicy::Reject`].
    pub queue_policy: QueuePolicy,
    /// How long a detached session waits for a resume before it expires and
    /// its undelivered pushes are lost. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Request seq_ids more than this far from the highest seen are refused,
    /// and answers are kept for replay for this many seq_ids. Default 128.
    pub request_window: u64,
    /// Requests executing at once on this session. Default 64.
    pub max_inflight: usize,
}

/// Default `max_queue_bytes`: 16 MiB per session.
pub const DEFAULT_MAX_QUEUE_BYTES: usize = 16 << 20;

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(30),
            max_retries: 3,
            max_queue: 1024,
            max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
            queue_policy: QueuePolicy::Reject,
            session_timeout: Duration::from_secs(5 * 60),
            request_window: 128,
            max_inflight: 64,
        }
    }
}

impl SessionConfig {
    /// Checks the values a session cannot work with. Call once at start-up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let zero = if self.ack_timeout.is_zero() {
            "ack_timeout"
        } else if self.max_queue == 0 {
            "max_queue"
        } else if self.max_queue_bytes == 0 {
            "max_queue_bytes"
        } else if self.session_timeout.is_zero() {
            "session_timeout"
        } else if self.request_window == 0 {
            "request_window"
        } else if self.max_inflight == 0 {
            "max_inflight"
        } else {
            return Ok(());
        };
        Err(ConfigError::Zero { key: zero })
    }
}

/// A [`SessionConfig`] value no session can run with (an operator error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The named setting is zero, which would refuse or time out everything.
    #[error("session.{key} must be greater than zero")]
    Zero {
        /// Name of the offending key, as in the config file.
        key: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_documented_values_and_valid() {
        let c = SessionConfig::default();
        assert_eq!(c.ack_timeout, Duration::from_secs(30));
        assert_eq!(c.max_retries, 3);
        assert_eq!(c.max_queue, 1024);
        assert_eq!(c.queue_policy, QueuePolicy::Reject);
        assert_eq!(c.session_timeout, Duration::from_secs(300));
        assert_eq!(c.request_window, 128);
        assert_eq!(c.max_inflight, 64);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn deserializes_humantime_with_defaults_and_rejects_unknown_keys() {
        let c: SessionConfig = serde_json::from_str(
            r#"{"ack_timeout": "2s", "queue_policy": "drop_oldest", "max_queue": 8}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            SessionConfig {
                ack_timeout: Duration::from_secs(2),
                queue_policy: QueuePolicy::DropOldest,
                max_queue: 8,
                ..SessionConfig::default()
            }
        );
        let err = serde_json::from_str::<SessionConfig>(r#"{"ack_timout": "2s"}"#).unwrap_err();
        assert!(err.to_string().contains("ack_timout"), "{err}");
    }

    #[test]
    fn zero_limits_are_rejected_by_name() {
        let c = SessionConfig {
            max_queue: 0,
            ..SessionConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::Zero { key: "max_queue" }));
        let c = SessionConfig {
            ack_timeout: Duration::ZERO,
            ..SessionConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::Zero { key: "ack_timeout" }));
    }
}
