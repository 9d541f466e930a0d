//! Backup files of the replicated state: `gatectl snapshot export` writes one, `gatectl
//! snapshot import` restores it (through one raft entry, [`crate::Cmd::Restore`]).
//!
//! # Format, version 1
//! ```text
//!  {"format":"gatesvr-controlplane-backup","version":1,...header...}\n   one line of JSON
//!  {"version":..,"last_epoch":..,"upstreams":{..},"nodes":{..},"owners":{..},..}  the payload
//! ```
//! The header carries the format version, the log id of the last entry the state covers, the
//! raft membership at that point, record counts, and the payload's length and SHA-256. The
//! payload is the [`State`] as JSON (the same encoding as raft snapshots, pinned by
//! `state::tests::golden_state_v1`). A file is accepted only whole: a wrong magic, an unknown
//! version, a length mismatch (truncated or padded) or a checksum mismatch is refused before
//! the payload is even parsed.

use serde::{Deserialize, Serialize};

use crate::state::State;
use crate::types::{LogId, NodeId, StoredMembership};

/// The `format` field of every backup header.
pub const MAGIC: &str = "gatesvr-controlplane-backup";
/// The only version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Largest payload accepted (the HTTP body of a restore, held in memory while it is applied):
/// 1 GiB, several million owner records. The restore itself travels as a series of raft
/// entries of [`RESTORE_OWNERS_PER_ENTRY`] owners each ([`split`]), so no entry comes near the
/// raft transport's message limit.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 30;

/// Owner records per restore entry: ~120 bytes each as JSON with typical ids (at most ~600
/// with 256-character ids), so an entry is ~240 KB (at most ~1.2 MiB). openraft 0.9 gives an
/// AppendEntries call `heartbeat_interval` (250 ms) to complete; `gate-bench scale` found
/// entries of 10,000 owners (~1.2 MB) missing that on a loaded machine, so the restore never
/// committed.
pub const RESTORE_OWNERS_PER_ENTRY: usize = 2_000;

/// Splits a backup's state into restore entries: the first carries the upstreams, nodes,
/// failovers and counters plus the first owners; each later one only more owners (with the
/// same version and last epoch). Applying them in order merges exactly what one entry of the
/// whole state would (a restore skips records already present, so the parts never collide).
pub fn split(mut state: State, owners_per_entry: usize) -> Vec<State> {
    let owners = std::mem::take(&mut state.owners);
    let mut parts = vec![state];
    let per = owners_per_entry.max(1);
    let mut current = crate::state::Owners::new();
    for (openid, owner) in owners {
        current.insert(openid, owner);
        if current.len() == per {
            parts.push(State {
                owners: std::mem::take(&mut current),
                ..Default::default()
            });
        }
    }
    if !current.is_empty() {
        parts.push(State {
            owners: current,
            ..Default::default()
        });
    }
    // The head's owners: the first owner part, if any.
    if parts.len() > 1 {
        let first = parts.remove(1);
        parts[0].owners = first.owners;
    }
    let (version, last_epoch) = (parts[0].version, parts[0].last_epoch);
    for p in &mut parts[1..] {
        p.version = version;
        p.last_epoch = last_epoch;
    }
    parts
}

/// How many records of each kind a backup holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub upstreams: u64,
    pub nodes: u64,
    pub owners: u64,
    pub failovers: u64,
}

impl Counts {
    /// The counts of `st`.
    pub fn of(st: &State) -> Self {
        Counts {
            upstreams: st.upstreams.len() as u64,
            nodes: st.nodes.len() as u64,
            owners: st.owners.len() as u64,
            failovers: st.failovers.len() as u64,
        }
    }
}

/// The first line of a backup file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    /// Always [`MAGIC`].
    pub format: String,
    /// [`FORMAT_VERSION`] when written by this build.
    pub version: u32,
    /// Wall clock of the node that wrote it, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// The control-plane node that served the export.
    pub served_by: NodeId,
    /// The leader when the export was served, if known.
    pub leader: Option<NodeId>,
    /// The last raft entry the state covers.
    pub last_applied: Option<LogId>,
    /// The raft membership at `last_applied` (informational: a restore keeps the restoring
    /// cluster's own membership).
    pub membership: StoredMembership,
    /// The state machine's version (watchers' resume point) at `last_applied`.
    pub state_version: u64,
    pub counts: Counts,
    /// Exact length of the payload after the header line.
    pub payload_bytes: u64,
    /// `sha256:<hex>` of the payload.
    pub payload_sha256: String,
}

/// A decoded, verified backup.
#[derive(Debug, Clone)]
pub struct Backup {
    pub header: Header,
    pub state: State,
}

/// Why a file is not a usable backup. Every variant means the file (not the cluster) is at
/// fault: retrying with the same file cannot help.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackupError {
    /// No header line: empty, or cut before the first newline.
    #[error("not a GateSvr control-plane backup: no header line (empty or truncated file)")]
    NoHeader,
    /// The first line is not a backup header.
    #[error("not a GateSvr control-plane backup: {0}")]
    NotABackup(String),
    /// Written by a newer (or unknown) format version.
    #[error(
        "backup format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion { found: u64, supported: u32 },
    /// Fewer payload bytes than the header announces.
    #[error("backup is truncated: the payload has {found} of {expected} bytes")]
    Truncated { expected: u64, found: u64 },
    /// More payload bytes than the header announces.
    #[error("backup has {extra} bytes after its payload (concatenated or corrupted file)")]
    TrailingBytes { extra: u64 },
    /// The payload does not match its checksum.
    #[error(
        "backup checksum mismatch: header says {expected}, payload is {found} (corrupted file)"
    )]
    Checksum { expected: String, found: String },
    /// Checksum right but the payload does not decode (a bug in the writer).
    #[error("backup payload does not decode: {0}")]
    Payload(String),
    /// Larger than a restore can carry.
    #[error("backup payload is {found} bytes; at most {max} can be restored in one raft entry")]
    TooLarge { found: u64, max: usize },
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    format!("sha256:{}", hex::encode(d.as_ref()))
}

/// What an export knows besides the state.
#[derive(Debug, Clone)]
pub struct Source {
    pub created_at_ms: i64,
    pub served_by: NodeId,
    pub leader: Option<NodeId>,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// Encodes `state` as a backup file.
pub fn encode(source: Source, state: &State) -> Result<Vec<u8>, serde_json::Error> {
    let payload = serde_json::to_vec(state)?;
    let header = Header {
        format: MAGIC.into(),
        version: FORMAT_VERSION,
        created_at_ms: source.created_at_ms,
        served_by: source.served_by,
        leader: source.leader,
        last_applied: source.last_applied,
        membership: source.membership,
        state_version: state.version,
        counts: Counts::of(state),
        payload_bytes: payload.len() as u64,
        payload_sha256: sha256(&payload),
    };
    let mut out = serde_json::to_vec(&header)?;
    out.push(b'\n');
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes and verifies a backup file.
pub fn decode(bytes: &[u8]) -> Result<Backup, BackupError> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(BackupError::NoHeader)?;
    let (line, rest) = (&bytes[..nl], &bytes[nl + 1..]);
    // Magic and version first, so a newer header with other fields is named as such.
    let raw: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| BackupError::NotABackup(format!("header is not JSON ({e})")))?;
    if raw.get("format").and_then(|v| v.as_str()) != Some(MAGIC) {
        return Err(BackupError::NotABackup(format!(
            "header has no \"format\": \"{MAGIC}\""
        )));
    }
    let version = raw.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version != u64::from(FORMAT_VERSION) {
        return Err(BackupError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let header: Header = serde_json::from_value(raw)
        .map_err(|e| BackupError::NotABackup(format!("bad version-1 header: {e}")))?;
    let found = rest.len() as u64;
    if found < header.payload_bytes {
        return Err(BackupError::Truncated {
            expected: header.payload_bytes,
            found,
        });
    }
    if found > header.payload_bytes {
        return Err(BackupError::TrailingBytes {
            extra: found - header.payload_bytes,
        });
    }
    let sum = sha256(rest);
    if sum != header.payload_sha256 {
        return Err(BackupError::Checksum {
            expected: header.payload_sha256,
            found: sum,
        });
    }
    if rest.len() > MAX_PAYLOAD_BYTES {
        return Err(BackupError::TooLarge {
            found,
            max: MAX_PAYLOAD_BYTES,
        });
    }
    let state: State =
        serde_json::from_slice(rest).map_err(|e| BackupError::Payload(e.to_string()))?;
    Ok(Backup { header, state })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{OwnerRec, UpstreamRec};

    fn sample() -> Vec<u8> {
        let mut st = State {
            version: 9,
            last_epoch: 4,
            ..State::default()
        };
        st.upstreams.insert(
            "up-1".into(),
            UpstreamRec {
                instance_id: "up-1".into(),
                zone: "001".into(),
                address: "10.0.0.5:9001".into(),
                service_name: "game".into(),
                registered_at_ms: 1,
                lease_expires_at_ms: 0,
                lease_ttl_ms: 0,
            },
        );
        st.owners.insert(
            "alice".into(),
            OwnerRec {
                session_id: "s1".into(),
                owner_node: "dp-1".into(),
                epoch: 4,
                changed_at_ms: 2,
                fresh_session_id: String::new(),
            },
        );
        let source = Source {
            created_at_ms: 5,
            served_by: 1,
            leader: Some(1),
            last_applied: None,
            membership: StoredMembership::default(),
        };
        encode(source, &st).unwrap()
    }

    #[test]
    fn a_restore_in_parts_merges_what_one_entry_would() {
        let mut whole = decode(&sample()).unwrap().state;
        for i in 0..25 {
            whole.owners.insert(
                format!("user-{i:02}"),
                OwnerRec {
                    session_id: format!("s{i}"),
                    owner_node: "dp-1".into(),
                    epoch: i + 1,
                    changed_at_ms: 5,
                    fresh_session_id: String::new(),
                },
            );
        }
        let parts = split(whole.clone(), 10);
        assert_eq!(
            parts.iter().map(|p| p.owners.len()).collect::<Vec<_>>(),
            vec![10, 10, 6],
            "the sample's owner and 25 more"
        );
        assert!(parts[1..].iter().all(|p| p.upstreams.is_empty()));
        let restore = |st: &mut State, part: State| {
            let cmd = crate::Cmd::Restore {
                state: Box::new(part),
                checksum: String::new(),
            };
            st.apply(7, &cmd, &mut Vec::new())
        };
        let mut at_once = State::default();
        restore(&mut at_once, whole);
        let mut in_parts = State::default();
        for part in parts {
            restore(&mut in_parts, part);
        }
        assert_eq!(in_parts.owners, at_once.owners);
        assert_eq!(in_parts.upstreams, at_once.upstreams);
        assert_eq!(in_parts.nodes, at_once.nodes);
        assert!(in_parts.last_epoch >= at_once.last_epoch);
    }

    #[test]
    fn round_trip_keeps_the_state_and_header() {
        let b = decode(&sample()).unwrap();
        assert_eq!(b.state.owners["alice"].epoch, 4);
        assert_eq!(b.header.counts.upstreams, 1);
        assert_eq!(b.header.state_version, 9);
    }

    #[test]
    fn truncated_padded_and_corrupted_files_are_refused() {
        let good = sample();
        let cut = &good[..good.len() - 3];
        assert!(matches!(decode(cut), Err(BackupError::Truncated { .. })));
        let nl = good.iter().position(|&b| b == b'\n').unwrap();
        assert_eq!(decode(&good[..nl]).err(), Some(BackupError::NoHeader));
        assert_eq!(decode(b"").err(), Some(BackupError::NoHeader));
        let mut padded = good.clone();
        padded.extend_from_slice(b"xx");
        assert_eq!(
            decode(&padded).err(),
            Some(BackupError::TrailingBytes { extra: 2 })
        );
        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x01;
        assert!(matches!(
            decode(&flipped),
            Err(BackupError::Checksum { .. })
        ));
    }

    #[test]
    fn other_versions_and_other_files_are_named() {
        let good = String::from_utf8(sample()).unwrap();
        let v2 = good.replacen("\"version\":1,", "\"version\":2,", 1);
        assert_eq!(
            decode(v2.as_bytes()).err(),
            Some(BackupError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        );
        assert!(matches!(
            decode(b"{\"hello\":1}\n{}"),
            Err(BackupError::NotABackup(_))
        ));
        assert!(matches!(
            decode(b"PK\x03\x04 zip\n"),
            Err(BackupError::NotABackup(_))
        ));
    }
}
