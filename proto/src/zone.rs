//! The openid -> zone mapping.
//!
//! `zone_index = fnv1a_64(utf8(openid)) % zone_count`, and the zone id is
//! `zone_index + 1` zero-padded to three digits ("001".."006" for the default
//! six zones). FNV-1a 64 is fixed forever: every node, SDK and upstream, in any
//! language, must compute the same zone. docs/protocol.md lists test vectors,
//! and the tests below pin them.

/// Default number of zones.
pub const DEFAULT_ZONE_COUNT: u32 = 6;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64-bit.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// Zero-based zone index of `openid` among `zone_count` zones.
///
/// # Panics
/// If `zone_count` is 0 (config validation rejects that).
pub fn zone_index(openid: &str, zone_count: u32) -> u32 {
    assert!(zone_count > 0, "zone_count must be positive");
    // The remainder is < zone_count, so it fits in u32.
    (fnv1a_64(openid.as_bytes()) % u64::from(zone_count)) as u32
}

/// Zone id ("001", "002", ...) for a zero-based index.
pub fn zone_id(index: u32) -> String {
    format!("{:03}", index + 1)
}

/// Zone id of `openid` among `zone_count` zones.
pub fn zone_of(openid: &str, zone_count: u32) -> String {
    zone_id(zone_index(openid, zone_count))
}

/// Parses a zone id back to its zero-based index, checking it exists.
pub fn parse_zone_id(id: &str, zone_count: u32) -> Option<u32> {
    if id.len() < 3 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = id.parse().ok()?;
    (1..=zone_count).contains(&n).then(|| n - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Published in docs/protocol.md. These must never change.
    const VECTORS: &[(&str, u64, &str)] = &[
        ("user-7", 0xf84b_a0aa_754a_486e, "001"),
        ("user-6", 0xf84b_a1aa_754a_4a21, "002"),
        ("user-1", 0xf84b_a2aa_754a_4bd4, "003"),
        ("user-13", 0x32d1_4ea5_4d3e_f985, "004"),
        ("user-3", 0xf84b_a4aa_754a_4f3a, "005"),
        ("user-2", 0xf84b_a5aa_754a_50ed, "006"),
        ("", 0xcbf2_9ce4_8422_2325, "006"),
        ("alice", 0x508b_2abb_65a0_3907, "006"),
        ("bob", 0x004d_4419_134a_0a54, "001"),
        ("玩家42", 0x1a0e_1a21_0db8_6f0c, "003"),
    ];

    #[test]
    fn vectors_are_stable() {
        for &(openid, hash, zone) in VECTORS {
            assert_eq!(fnv1a_64(openid.as_bytes()), hash, "hash of {openid:?}");
            assert_eq!(
                zone_of(openid, DEFAULT_ZONE_COUNT),
                zone,
                "zone of {openid:?}"
            );
        }
    }

    #[test]
    fn zone_ids_round_trip() {
        for i in 0..12 {
            assert_eq!(parse_zone_id(&zone_id(i), 12), Some(i));
        }
        assert_eq!(parse_zone_id("000", 6), None);
        assert_eq!(parse_zone_id("007", 6), None);
        assert_eq!(parse_zone_id("1", 6), None);
        assert_eq!(parse_zone_id("00a", 6), None);
    }
}
