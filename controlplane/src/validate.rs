//! Input checks shared by the gRPC and admin APIs, run before anything is proposed.

use std::time::Duration;

use crate::config::LeaseConfig;
use crate::error::Error;

/// Checks a zone id ("001".."NNN") against the configured zone count.
pub fn zone(zone: &str, zone_count: u32) -> Result<(), Error> {
    match gatesvr_proto::zone::parse_zone_id(zone, zone_count) {
        Some(_) => Ok(()),
        None => Err(Error::InvalidArgument(format!(
            "unknown zone `{zone}`: zones are {} to {}",
            gatesvr_proto::zone::zone_id(0),
            gatesvr_proto::zone::zone_id(zone_count.saturating_sub(1)),
        ))),
    }
}

/// Most bytes of a `host:port` address (the admin API's schema says the same).
pub const MAX_ADDRESS_LEN: usize = 255;

/// Checks a `host:port` address (IP or DNS name, port 1..=65535, at most
/// [`MAX_ADDRESS_LEN`] bytes).
pub fn address(field: &str, addr: &str) -> Result<(), Error> {
    let bad = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "{field} `{addr}` is malformed: {why} (expected host:port)"
        )))
    };
    if addr.len() > MAX_ADDRESS_LEN {
        return bad("longer than 255 bytes");
    }
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return if sa.port() == 0 {
            bad("port must be 1..=65535")
        } else {
            Ok(())
        };
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("no port");
    };
    // Digits only, no leading zero: exactly what the API's schema pattern allows.
    let digits = !port.starts_with('0') && port.bytes().all(|b| b.is_ascii_digit());
    match port.parse::<u16>() {
        Ok(p) if p > 0 && digits => {}
        _ => return bad("port must be 1..=65535"),
    }
    let host_ok = !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !host_ok {
        return bad("bad host name");
    }
    Ok(())
}

/// Checks a non-empty identifier of 1..=256 characters, none a control character (the
/// admin API's schema says the same).
pub fn ident(field: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() || value.chars().count() > 256 {
        return Err(Error::InvalidArgument(format!(
            "{field} must be 1..=256 characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(())
}

/// The lease to grant for a requested ttl (0 = default), clamped to the configured range.
pub fn lease_ttl_ms(requested_ms: u32, cfg: &LeaseConfig) -> u32 {
    let want = if requested_ms == 0 {
        cfg.default_ttl
    } else {
        Duration::from_millis(u64::from(requested_ms))
    };
    let ttl = want.clamp(cfg.min_ttl, cfg.max_ttl);
    u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX)
}

/// A fresh random instance id for a new upstream registration.
pub fn new_instance_id() -> String {
    let bytes: [u8; 8] = rand::random();
    format!("up-{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for ok in ["10.0.0.5:9001", "[::1]:80", "game-1.svc.cluster.local:9001"] {
            address("address", ok).unwrap();
        }
        for bad in [
            "10.0.0.5",
            "10.0.0.5:0",
            "host:99999",
            ":80",
            "a..b:1",
            "sp ace:1",
            "",
        ] {
            assert!(address("address", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zones_and_ttls() {
        zone("001", 6).unwrap();
        zone("006", 6).unwrap();
        assert!(zone("007", 6).is_err());
        assert!(zone("1", 6).is_err());
        let cfg = LeaseConfig::default();
        assert_eq!(lease_ttl_ms(0, &cfg), 10_000);
        assert_eq!(lease_ttl_ms(1, &cfg), 1_000);
        assert_eq!(lease_ttl_ms(u32::MAX, &cfg), 60_000);
    }
}
