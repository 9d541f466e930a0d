//! The current snapshot as one file, `<data_dir>/snapshot`, replaced atomically.
//!
//! A save writes `snapshot.tmp`, `fdatasync`s it (every [`SYNC_EVERY`] bytes as it goes), renames it over `snapshot` and fsyncs the
//! directory, so after a crash the file is either the old snapshot or the new one, and once
//! [`SnapshotFile::save`] returns the new one is on stable storage (openraft purges the log it
//! covers only after that). Until session 14 the snapshot was a value in sled: at ~300k owners
//! sled's save and flush took each member ~380 ms per snapshot, on the runtime that serves
//! raft (docs/benchmarks.md, "Session 13" and "Session 14").
//!
//! Layout (integers little-endian):
//!
//! | bytes | field |
//! |-------|-------|
//! | 8     | magic `GSNAP\0\0\x01` |
//! | 4     | length of the metadata |
//! | 8     | length of the payload |
//! | 4     | CRC-32 of metadata and payload |
//! | ...   | `SnapshotMeta` (JSON), then the payload (`sm::SnapshotPayload`, JSON) |

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::types::SnapshotMeta;

const MAGIC: &[u8; 8] = b"GSNAP\0\0\x01";
const HEADER: usize = 8 + 4 + 8 + 4;

/// A save syncs the file after every this many payload bytes, not once at the end. The raft
/// log shares the disk and `fdatasync`s every entry: behind one sync of a whole snapshot
/// (~36 MB at 300k owners, ~121 MB at 1M) each log flush waited for the snapshot's writeback,
/// and during the round of `gate-bench claims` that builds snapshots the members' log flushes
/// reached a p99 of 4.7-6.7 ms and a max of 16-20 ms (~1 ms in the other rounds).
const SYNC_EVERY: usize = 4 << 20;

fn invalid(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

/// The node's current snapshot on disk.
#[derive(Debug)]
pub struct SnapshotFile {
    path: PathBuf,
    tmp: PathBuf,
    /// Payload bytes of the snapshot on disk (0 if none), for metrics.
    bytes: AtomicU64,
}

impl SnapshotFile {
    /// The snapshot file in `dir` (which must exist). A `snapshot.tmp` left by a crash during
    /// a save is removed.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let file = Self {
            path: dir.join("snapshot"),
            tmp: dir.join("snapshot.tmp"),
            bytes: AtomicU64::new(0),
        };
        match std::fs::remove_file(&file.tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(file)
    }

    /// Whether a snapshot has been saved.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Payload bytes of the current snapshot (0 if none yet).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Replaces the snapshot with `meta` and `data`; on stable storage when it returns.
    /// Blocking: call it off the async runtime.
    pub fn save(&self, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
        let meta_bytes = serde_json::to_vec(meta)?;
        let meta_len = u32::try_from(meta_bytes.len())
            .map_err(|_| invalid(&self.path, "snapshot metadata over 4 GiB"))?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&meta_bytes);
        crc.update(data);
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&meta_len.to_le_bytes());
        header.extend_from_slice(&(data.len() as u64).to_le_bytes());
        header.extend_from_slice(&crc.finalize().to_le_bytes());
        {
            let mut f = File::create(&self.tmp)?;
            f.write_all(&header)?;
            f.write_all(&meta_bytes)?;
            if data.is_empty() {
                f.sync_data()?;
            }
            for chunk in data.chunks(SYNC_EVERY) {
                f.write_all(chunk)?;
                f.sync_data()?;
            }
        }
        std::fs::rename(&self.tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.bytes.store(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The current snapshot, if one was saved: its metadata and payload, checked against the
    /// stored lengths and checksum. Blocking.
    pub fn load(&self) -> io::Result<Option<(SnapshotMeta, Vec<u8>)>> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut header = [0u8; HEADER];
        f.read_exact(&mut header)
            .map_err(|e| invalid(&self.path, format!("header: {e}")))?;
        if &header[..8] != MAGIC {
            return Err(invalid(&self.path, "not a GateSvr snapshot file"));
        }
        let meta_len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
        let data_len = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
        let want_crc = u32::from_le_bytes(header[20..24].try_into().expect("4 bytes"));
        let file_len = f.metadata()?.len();
        if file_len != HEADER as u64 + meta_len as u64 + data_len {
            return Err(invalid(
                &self.path,
                format!(
                    "{file_len} bytes, the header says {}",
                    HEADER as u64 + meta_len as u64 + data_len
                ),
            ));
        }
        let mut meta_bytes = vec![0u8; meta_len];
        f.read_exact(&mut meta_bytes)?;
        let mut data = vec![0u8; data_len as usize];
        f.read_exact(&mut data)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&meta_bytes);
        crc.update(&data);
        if crc.finalize() != want_crc {
            return Err(invalid(&self.path, "checksum mismatch"));
        }
        let meta: SnapshotMeta = serde_json::from_slice(&meta_bytes)
            .map_err(|e| invalid(&self.path, format!("metadata: {e}")))?;
        self.bytes.store(data_len, Ordering::Relaxed);
        Ok(Some((meta, data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: None,
            last_membership: Default::default(),
            snapshot_id: id.into(),
        }
    }

    #[test]
    fn save_then_load_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let f = SnapshotFile::open(dir.path()).unwrap();
        assert!(f.load().unwrap().is_none());
        f.save(&meta("a"), b"first").unwrap();
        f.save(&meta("b"), b"second payload").unwrap();
        let f = SnapshotFile::open(dir.path()).unwrap();
        let (m, data) = f.load().unwrap().unwrap();
        assert_eq!(m.snapshot_id, "b");
        assert_eq!(data, b"second payload");
        assert_eq!(f.bytes(), 14);
        assert!(!dir.path().join("snapshot.tmp").exists());
    }

    /// A flipped byte, a truncated file and a foreign file are each refused by name, never
    /// taken for an empty or older state.
    #[test]
    fn damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = SnapshotFile::open(dir.path()).unwrap();
        f.save(&meta("a"), b"payload bytes").unwrap();
        let path = dir.path().join("snapshot");
        let good = std::fs::read(&path).unwrap();
        let cases: [(&str, Vec<u8>); 3] = [
            ("checksum", {
                let mut b = good.clone();
                *b.last_mut().unwrap() ^= 1;
                b
            }),
            ("bytes", good[..good.len() - 1].to_vec()),
            (
                "not a GateSvr snapshot",
                b"{\"json\": true, \"padding\": 1234567}".to_vec(),
            ),
        ];
        for (want, bytes) in cases {
            std::fs::write(&path, bytes).unwrap();
            let e = f.load().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
    }

    /// A payload larger than one sync step is written in steps (the last one short) and
    /// reads back whole, byte for byte.
    #[test]
    fn a_payload_of_several_sync_steps_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let f = SnapshotFile::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..2 * SYNC_EVERY + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        f.save(&meta("big"), &data).unwrap();
        let (m, back) = SnapshotFile::open(dir.path())
            .unwrap()
            .load()
            .unwrap()
            .unwrap();
        assert_eq!(m.snapshot_id, "big");
        assert!(back == data, "the payload read back differs");
        f.save(&meta("empty"), b"").unwrap();
        let (_, back) = f.load().unwrap().unwrap();
        assert!(back.is_empty());
    }

    /// A save interrupted before its rename leaves the old snapshot in place, and the
    /// leftover temporary file is removed at the next open.
    #[test]
    fn an_interrupted_save_keeps_the_old_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let f = SnapshotFile::open(dir.path()).unwrap();
        f.save(&meta("old"), b"old").unwrap();
        std::fs::write(dir.path().join("snapshot.tmp"), b"half a new snap").unwrap();
        let f = SnapshotFile::open(dir.path()).unwrap();
        assert!(!dir.path().join("snapshot.tmp").exists());
        assert_eq!(f.load().unwrap().unwrap().0.snapshot_id, "old");
    }
}
