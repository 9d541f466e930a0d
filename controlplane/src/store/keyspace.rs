//! Typed key spaces over sled trees, so keys are built in one place per kind of record.
//!
//! Layout of one node's sled database (`<data_dir>/raft.sled`):
//!
//! | tree       | key                          | value (JSON)                         |
//! |------------|------------------------------|--------------------------------------|
//! | `log`      | index, u64 big-endian        | `Entry`                              |
//! | `meta`     | `vote` / `last_purged` / `committed` | `Vote` / `LogId` / `LogId`   |
//! | `sm`       | `m`                          | `SmMeta` (counters, last_applied)   |
//! | `sm`       | `u/` + instance id           | `UpstreamRec`                        |
//! | `sm`       | `n/` + node id               | `NodeRec`                            |
//! | `sm`       | `o/` + openid                | `OwnerRec`                           |
//! | `sm`       | `f/` + seq, u64 big-endian   | `FailoverRec`                        |
//! | `snapshot` | `current.meta` / `current.data` | `SnapshotMeta` (JSON) / payload bytes |
//!
//! Big-endian integer keys keep iteration in numeric order. The whole state machine lives in
//! one tree so one sled `Batch` updates records and `m` atomically.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::state::{FailoverRec, Key, NodeRec, OwnerRec, UpstreamRec};

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

/// Declares a string-keyed space.
macro_rules! str_space {
    ($name:ident, $prefix:literal, $value:ty) => {
        #[doc = concat!("`", stringify!($value), "` records keyed by their id.")]
        pub struct $name(PhantomData<()>);
        impl KeySpace for $name {
            const PREFIX: &'static [u8] = $prefix;
            const NAME: &'static str = stringify!($name);
            type Key = str;
            type Value = $value;
            fn key_suffix(key: &str) -> Vec<u8> {
                key.as_bytes().to_vec()
            }
        }
    };
}

str_space!(Upstreams, b"u/", UpstreamRec);
str_space!(Nodes, b"n/", NodeRec);
str_space!(Owners, b"o/", OwnerRec);

/// Failover decisions keyed by sequence number.
pub struct Failovers;
impl KeySpace for Failovers {
    const PREFIX: &'static [u8] = b"f/";
    const NAME: &'static str = "Failovers";
    type Key = u64;
    type Value = FailoverRec;
    fn key_suffix(key: &u64) -> Vec<u8> {
        key.to_be_bytes().to_vec()
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

/// The sled key of a state-machine record.
pub fn sm_key(key: &Key) -> Vec<u8> {
    match key {
        Key::Upstream(id) => Upstreams::key(id),
        Key::Node(id) => Nodes::key(id),
        Key::Owner(id) => Owners::key(id),
        Key::Failover(seq) => Failovers::key(seq),
    }
}

/// Key of the state machine's metadata record in tree `sm`.
pub const SM_META: &[u8] = b"m";

/// Keys of tree `meta`.
pub mod meta {
    pub const VOTE: &[u8] = b"vote";
    pub const LAST_PURGED: &[u8] = b"last_purged";
    pub const COMMITTED: &[u8] = b"committed";
}

/// Key of the current snapshot in tree `snapshot`.
pub const CURRENT_SNAPSHOT: &[u8] = b"current";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_and_numeric_keys_sort() {
        assert_eq!(Owners::key("alice"), b"o/alice".to_vec());
        assert!(Failovers::key(&2) < Failovers::key(&256));
        assert!(LogEntries::key(&9) < LogEntries::key(&10));
        assert_eq!(log_index(&LogEntries::key(&42)), Some(42));
    }
}
