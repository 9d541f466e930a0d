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
    /// Other gateway addresses to try, in order, when the current one stops
    /// answering (a node died; no load balancer in front). Default none.
    pub fallback_addrs: Vec<SocketAddr>,
    /// A silent gateway is declared lost after this (the QUIC idle timeout
    /// the client asks for; keep-alives go out every third of it). QUIC
    /// restarts the idle timer when the keep-alive goes out, so a crash is
    /// noticed between this and 4/3 of it later (15-20 s by default), and
    /// never before three probe timeouts, which stay long for some seconds
    /// after a reconnect storm (docs/benchmarks.md, Failover, session 8).
    /// Lower means faster failover and more keep-alive packets (at 1 s about
    /// three datagrams per second each way). Default 15 s.
    pub liveness_timeout: Duration,
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
            fallback_addrs: Vec::new(),
            liveness_timeout: Duration::from_secs(15),
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

    pub fn with_fallback_addrs(mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.fallback_addrs = addrs.into_iter().collect();
        self
    }

    pub fn with_liveness_timeout(mut self, timeout: Duration) -> Self {
        self.liveness_timeout = timeout;
        self
    }

    /// The address to try after `current` stopped answering: the next of
    /// `addr` and `fallback_addrs`, round robin. Without fallbacks it is
    /// `current` itself (which may be a GoAway target or a `reconnect_to`).
    pub fn next_addr(&self, current: SocketAddr) -> SocketAddr {
        if self.fallback_addrs.is_empty() {
            return current;
        }
        let all: Vec<SocketAddr> = std::iter::once(self.addr)
            .chain(self.fallback_addrs.iter().copied())
            .collect();
        match all.iter().position(|a| *a == current) {
            Some(i) => all[(i + 1) % all.len()],
            None => all[0],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_addr_goes_round_the_fallbacks() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let alone = ClientConfig::new(a, "u", "t");
        assert_eq!(alone.next_addr(a), a);
        let elsewhere: SocketAddr = "127.0.0.1:8".parse().unwrap();
        assert_eq!(
            alone.next_addr(elsewhere),
            elsewhere,
            "no fallbacks: keep the address it was sent to"
        );
        let cfg = alone.with_fallback_addrs([b, c]);
        assert_eq!(cfg.next_addr(a), b);
        assert_eq!(cfg.next_addr(b), c);
        assert_eq!(cfg.next_addr(c), a);
        // A GoAway target outside the list: start from the top.
        let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(cfg.next_addr(other), a);
    }

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
