//! Typed key spaces over sled trees, so keys are built in one place per kind of record.
//!
//! Layout of a sled database (`<data_dir>/raft.sled`) written before session 14, which
//! `store::open` reads once to move to today's layout and then removes:
//!
//! | tree       | key                          | value (JSON)                         |
//! |------------|------------------------------|--------------------------------------|
//! | `log`      | index, u64 big-endian        | `Entry`                              |
//! | `meta`     | `vote` / `last_purged` / `committed` | `Vote` / `LogId` / `LogId`   |
//! | `snapshot` | `current.meta` / `current.data` | `SnapshotMeta` (JSON) / payload bytes |
//!
//! Trees `log` and `meta` hold the log of a data directory from before session 6 (since
//! then in `raft-log`); tree `snapshot` the snapshot until session 14 (since then a file).
//! Big-endian integer keys keep iteration in numeric order. (Tree `sm`, a write-through copy
//! of the state machine until session 13, is not read.)

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A kind of record stored under a fixed prefix of a tree.
pub trait KeySpace {
    /// Prefix of every key of this space (may be empty for a tree of its own).
    const PREFIX: &'static [u8];
    /// Human name for errors and logs.
    const NAME: &'static str;
    type Key: ?Sized;
    type Value: Serialize + DeserializeOwned;
    /// The key's bytes after the prefix.
    fn key_suffix(key: &Self::Key) -> Vec<u8>;

    /// The full key.
    fn key(key: &Self::Key) -> Vec<u8> {
        let mut k = Self::PREFIX.to_vec();
        k.extend_from_slice(&Self::key_suffix(key));
        k
    }
}

/// Log entries keyed by index (tree `log`).
pub struct LogEntries;
impl KeySpace for LogEntries {
    const PREFIX: &'static [u8] = b"";
    const NAME: &'static str = "LogEntries";
    type Key = u64;
    type Value = crate::types::Entry;
    fn key_suffix(key: &u64) -> Vec<u8> {
        key.to_be_bytes().to_vec()
    }
}

/// Decodes a `LogEntries` key.
pub fn log_index(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Keys of tree `meta`.
pub mod meta {
    pub const VOTE: &[u8] = b"vote";
    pub const LAST_PURGED: &[u8] = b"last_purged";
    pub const COMMITTED: &[u8] = b"committed";
}

/// Keys of the snapshot's metadata and payload in tree `snapshot`.
pub mod snapshot {
    pub const META: &[u8] = b"current.meta";
    pub const DATA: &[u8] = b"current.data";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_keys_sort() {
        assert!(LogEntries::key(&9) < LogEntries::key(&10));
        assert_eq!(log_index(&LogEntries::key(&42)), Some(42));
    }
}
