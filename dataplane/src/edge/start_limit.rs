//! The Start rate limit: token buckets (GCRA, `governor`) per source address
//! and per openid.
//!
//! A Start is the expensive frame: token verification (RSA/ECDSA for JWT),
//! a control-plane claim, possibly a handover from another node. Two limits
//! bound it (docs/protocol.md "Limits"):
//!
//! - per source address, checked before the token is verified, so a flood
//!   from one place costs a hash lookup each; IPv6 addresses count per /64
//!   (one host usually holds a whole /64);
//! - per openid, checked after the token verified (an attacker without the
//!   user's token cannot use up the user's budget): a client stuck in a
//!   reconnect loop cannot churn its session and the control plane.
//!
//! Over either, the Start is answered `Error{OVERLOADED, retry_after_ms}` and
//! the connection closed; `gatesvr_connections_rejected_total{reason=
//! "start_rate_address"|"start_rate_openid"}` counts it.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::OverloadConfig;

/// Keys kept before idle ones are pruned (each costs a few dozen bytes).
const PRUNE_ABOVE: usize = 100_000;
/// Checks between two looks at the table's size.
const PRUNE_EVERY: u64 = 1024;

/// Which limit refused a Start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    Address,
    Openid,
}

impl Limited {
    /// The `gatesvr_connections_rejected_total` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Limited::Address => "start_rate_address",
            Limited::Openid => "start_rate_openid",
        }
    }
}

struct Bucket<K: Clone + std::hash::Hash + Eq> {
    limiter: DefaultKeyedRateLimiter<K>,
    checks: AtomicU64,
}

impl<K: Clone + std::hash::Hash + Eq> Bucket<K> {
    fn new(rate: u32, burst: u32) -> Option<Self> {
        let rate = NonZeroU32::new(rate)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        Some(Self {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            checks: AtomicU64::new(0),
        })
    }

    /// Takes one token for `key`, or says when to retry.
    fn check(&self, key: &K) -> Result<(), Duration> {
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(PRUNE_EVERY)
            && self.limiter.len() > PRUNE_ABOVE
        {
            // Keys whose bucket is full again are indistinguishable from new.
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// The node's two Start limits; either may be off (rate 0).
pub struct StartLimiter {
    by_address: Option<Bucket<IpAddr>>,
    by_openid: Option<Bucket<String>>,
}

impl StartLimiter {
    pub fn new(o: &OverloadConfig) -> Self {
        let on = o.enabled;
        Self {
            by_address: on
                .then(|| Bucket::new(o.start_rate_per_address, o.start_burst_per_address))
                .flatten(),
            by_openid: on
                .then(|| Bucket::new(o.start_rate_per_openid, o.start_burst_per_openid))
                .flatten(),
        }
    }

    /// A Start from `ip`, before its token is verified.
    pub fn check_address(&self, ip: IpAddr) -> Result<(), (Limited, Duration)> {
        match &self.by_address {
            Some(bucket) => bucket
                .check(&address_key(ip))
                .map_err(|wait| (Limited::Address, wait)),
            None => Ok(()),
        }
    }

    /// A Start for `openid`, once its token verified.
    pub fn check_openid(&self, openid: &str) -> Result<(), (Limited, Duration)> {
        match &self.by_openid {
            Some(bucket) => bucket
                .check(&openid.to_string())
                .map_err(|wait| (Limited::Openid, wait)),
            None => Ok(()),
        }
    }
}

/// The key an address counts under: itself for IPv4 (and IPv4-mapped IPv6),
/// its /64 for IPv6.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(addr: (u32, u32), openid: (u32, u32)) -> StartLimiter {
        StartLimiter::new(&OverloadConfig {
            start_rate_per_address: addr.0,
            start_burst_per_address: addr.1,
            start_rate_per_openid: openid.0,
            start_burst_per_openid: openid.1,
            ..OverloadConfig::default()
        })
    }

    #[test]
    fn a_burst_passes_then_the_address_is_refused_with_a_retry_hint() {
        let l = limits((1, 3), (0, 0));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.check_address(ip), Ok(()));
        }
        let (which, wait) = l.check_address(ip).unwrap_err();
        assert_eq!(which, Limited::Address);
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        // Another address has its own bucket; openids are unlimited (rate 0).
        assert_eq!(l.check_address("192.0.2.8".parse().unwrap()), Ok(()));
        for _ in 0..100 {
            assert_eq!(l.check_openid("alice"), Ok(()));
        }
    }

    #[test]
    fn openids_have_their_own_buckets() {
        let l = limits((0, 0), (1, 2));
        assert_eq!(l.check_openid("alice"), Ok(()));
        assert_eq!(l.check_openid("alice"), Ok(()));
        assert_eq!(l.check_openid("alice").unwrap_err().0, Limited::Openid);
        assert_eq!(l.check_openid("bob"), Ok(()));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn disabled_overload_protection_limits_nothing() {
        let l = StartLimiter::new(&OverloadConfig {
            enabled: false,
            start_rate_per_address: 1,
            start_burst_per_address: 1,
            ..OverloadConfig::default()
        });
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..10 {
            assert_eq!(l.check_address(ip), Ok(()));
        }
    }
}
