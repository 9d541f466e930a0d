//! HMAC client tokens: the simplest credential a game backend can mint.
//!
//! ```text
//! token   = "v1." b64(openid) "." expiry "." b64(mac)
//! mac     = HMAC-SHA256(secret, "v1." b64(openid) "." expiry)
//! b64     = base64url without padding (RFC 4648 §5)
//! expiry  = Unix seconds, decimal ASCII
//! ```
//!
//! Any language with HMAC-SHA256 can mint one; `gatectl token issue` does it
//! from the command line. The data plane checks the MAC in constant time, then
//! expiry with a clock-skew allowance.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;

const VERSION: &str = "v1";

/// Why a token was refused. Maps to the client error codes UNAUTHENTICATED
/// (all but `Expired`) and TOKEN_EXPIRED.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not of the form `v1.<openid>.<expiry>.<mac>`.
    #[error("token is malformed")]
    Malformed,
    /// The MAC does not match (wrong secret or tampered token).
    #[error("token signature is invalid")]
    BadSignature,
    /// The expiry (plus the allowed skew) is in the past.
    #[error("token expired at {expired_at} (unix seconds)")]
    Expired { expired_at: u64 },
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub openid: String,
    pub expires_at: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn signing_input(openid_b64: &str, expiry: u64) -> String {
    format!("{VERSION}.{openid_b64}.{expiry}")
}

/// Mints a token for `openid` valid for `ttl` from now.
pub fn issue(secret: &[u8], openid: &str, ttl: Duration) -> String {
    issue_at(secret, openid, unix_now() + ttl.as_secs())
}

/// Mints a token with an explicit expiry (Unix seconds).
pub fn issue_at(secret: &[u8], openid: &str, expires_at: u64) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let openid_b64 = URL_SAFE_NO_PAD.encode(openid.as_bytes());
    let input = signing_input(&openid_b64, expires_at);
    let mac = hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
}

/// Checks `token` against `secret` at the current time.
pub fn verify(secret: &[u8], token: &str, skew: Duration) -> Result<Claims, TokenError> {
    verify_at(secret, token, unix_now(), skew)
}

/// Checks `token` as of `now` (Unix seconds).
pub fn verify_at(
    secret: &[u8],
    token: &str,
    now: u64,
    skew: Duration,
) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(version), Some(openid_b64), Some(expiry), Some(mac_b64), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    if version != VERSION {
        return Err(TokenError::Malformed);
    }
    let expires_at: u64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
    let mac = URL_SAFE_NO_PAD
        .decode(mac_b64)
        .map_err(|_| TokenError::Malformed)?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, signing_input(openid_b64, expires_at).as_bytes(), &mac)
        .map_err(|_| TokenError::BadSignature)?;
    let openid = URL_SAFE_NO_PAD
        .decode(openid_b64)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(TokenError::Malformed)?;
    if expires_at.saturating_add(skew.as_secs()) < now {
        return Err(TokenError::Expired {
            expired_at: expires_at,
        });
    }
    Ok(Claims { openid, expires_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";

    #[test]
    fn golden_token() {
        // Pinned so other languages can check their minting against ours.
        assert_eq!(
            issue_at(SECRET, "alice", 2_000_000_000),
            "v1.YWxpY2U.2000000000.Q1MuNE1209aGlukpDEn7iBur_3xWFAXDdQJNrIM6diY"
        );
    }

    #[test]
    fn round_trip_and_failures() {
        let t = issue_at(SECRET, "玩家42", 1_000);
        let c = verify_at(SECRET, &t, 900, Duration::ZERO).unwrap();
        assert_eq!(c.openid, "玩家42");
        assert_eq!(
            verify_at(SECRET, &t, 1_001, Duration::ZERO),
            Err(TokenError::Expired { expired_at: 1_000 })
        );
        assert!(verify_at(SECRET, &t, 1_030, Duration::from_secs(30)).is_ok());
        assert_eq!(
            verify_at(b"other", &t, 900, Duration::ZERO),
            Err(TokenError::BadSignature)
        );
        let tampered = t.replacen("1000", "9000", 1);
        assert_eq!(
            verify_at(SECRET, &tampered, 900, Duration::ZERO),
            Err(TokenError::BadSignature)
        );
        for bad in [
            "",
            "v1",
            "v1.a.b",
            "v2.YQ.1.AA",
            "v1.YQ.x.AA",
            "v1.YQ.1.AA.extra",
        ] {
            assert_eq!(
                verify_at(SECRET, bad, 0, Duration::ZERO),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }
}
