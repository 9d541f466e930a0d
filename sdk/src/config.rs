//! Client settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Exponential backoff with full jitter between reconnect attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// First delay. Default 100 ms.
    pub initial: Duration,
    /// Cap. Default 10 s.
    pub max: Duration,
    /// Give up after this many consecutive failed attempts (None = never).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// Delay before attempt `n` (0-based): uniform in [d/2, d] with
    /// d = min(max, initial * 2^n), so a crowd of clients spreads out.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Supplies a fresh auth token for each (re)connect.
pub type TokenProvider = Arc<dyn Fn() -> String + Send + Sync>;

/// How to reach and authenticate with a gateway.
#[derive(Clone)]
pub struct ClientConfig {
    /// Gateway QUIC address.
    pub addr: SocketAddr,
    /// Name checked against the server certificate. Default `localhost`.
    pub server_name: String,
    /// CA bundle (PEM) that signs the gateway's certificate.
    pub ca_file: Option<PathBuf>,
    pub openid: String,
    pub token: TokenProvider,
    /// Deadline of one request, including retries across reconnects. Default 30 s.
    pub request_timeout: Duration,
    /// Handshake + Start deadline of one connection attempt. Default 10 s.
    pub connect_timeout: Duration,
    pub backoff: Backoff,
    /// Reconnect automatically after a connection is lost. Default true.
    pub reconnect: bool,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .field("openid", &self.openid)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    pub fn new(addr: SocketAddr, openid: impl Into<String>, token: impl Into<String>) -> Self {
        let token = token.into();
        Self {
            addr,
            server_name: "localhost".into(),
            ca_file: None,
            openid: openid.into(),
            token: Arc::new(move || token.clone()),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            backoff: Backoff::default(),
            reconnect: true,
        }
    }

    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    pub fn with_token_provider(mut self, provider: TokenProvider) -> Self {
        self.token = provider;
        self
    }

    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    pub fn with_reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps_with_jitter() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            max_attempts: None,
        };
        for attempt in 0..30 {
            let d = b.delay(attempt);
            let cap = Duration::from_millis(100)
                .saturating_mul(1 << attempt.min(20))
                .min(Duration::from_secs(1));
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} vs {cap:?}"
            );
        }
    }
}
