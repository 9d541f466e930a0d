//! Where a write waits: per-stage timings of the write path, for diagnosis only.
//!
//! Off (one relaxed atomic load per call site) unless the process starts with
//! `GATESVR_CP_STAGES=<file>`; then every stage's count and percentiles (µs) are rewritten to
//! `<file>` as JSON once a second, cumulative since the start or since `<file>.reset` was created
//! (`gate-bench claims` does that after each warm-up, then reads the file into its report's
//! notes; see docs/benchmarks.md). Stage names carry the node id where it matters
//! (`n1.log.fdatasync`), so the leader's and the followers' costs are told apart.
//!
//! ```text
//!  grpc.claim_sessions ─ batch.queue ─ batch.commit (client_write) ─────────────────────┐
//!                                        leader: nX.log.{write,flush_async,fdatasync}   │
//!                                        nX->nY.rpc.append[.err] (AppendEntries call)   │
//!                                        follower: nY.serve.append, nY.log.*            │
//!                                        nX.sm.apply                                    ┘
//!  sm.snapshot.{clone,encode,save} (a snapshot build, beside the write path)
//! ```

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

struct Recorder {
    samples: parking_lot::Mutex<BTreeMap<String, Vec<u32>>>,
}

fn recorder() -> Option<&'static Recorder> {
    static R: OnceLock<Option<&'static Recorder>> = OnceLock::new();
    *R.get_or_init(|| {
        let path = std::env::var_os("GATESVR_CP_STAGES")?;
        let r: &'static Recorder = Box::leak(Box::new(Recorder {
            samples: parking_lot::Mutex::new(BTreeMap::new()),
        }));
        let spawned = std::thread::Builder::new()
            .name("cp-stages".into())
            .spawn(move || {
                let reset = std::path::PathBuf::from(format!("{}.reset", path.to_string_lossy()));
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    // `<file>.reset` starts a new measurement (gate-bench: after its warm-up).
                    if std::fs::remove_file(&reset).is_ok() {
                        r.samples.lock().clear();
                    }
                    let json = summary(r);
                    let tmp = std::path::PathBuf::from(format!("{}.tmp", path.to_string_lossy()));
                    if std::fs::write(&tmp, json.to_string()).is_ok() {
                        let _ = std::fs::rename(&tmp, &path);
                    }
                }
            });
        if spawned.is_err() {
            return None;
        }
        Some(r)
    })
}

fn summary(r: &Recorder) -> serde_json::Value {
    let snapshot: Vec<(String, Vec<u32>)> = r
        .samples
        .lock()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut out = serde_json::Map::new();
    for (name, mut v) in snapshot {
        v.sort_unstable();
        let pct = |p: f64| -> u32 {
            if v.is_empty() {
                return 0;
            }
            let i = ((v.len() as f64 - 1.0) * p / 100.0).round() as usize;
            v[i.min(v.len() - 1)]
        };
        let sum: u64 = v.iter().map(|&x| u64::from(x)).sum();
        out.insert(
            name,
            serde_json::json!({
                "n": v.len(),
                "mean": if v.is_empty() { 0 } else { sum / v.len() as u64 },
                "p50": pct(50.0),
                "p90": pct(90.0),
                "p99": pct(99.0),
                "max": pct(100.0),
            }),
        );
    }
    serde_json::Value::Object(out)
}

/// Whether stage timings are being recorded.
pub fn enabled() -> bool {
    recorder().is_some()
}

/// Records one sample of `stage` (named lazily: nothing is built when recording is off).
pub fn record(stage: impl FnOnce() -> String, d: Duration) {
    value(stage, u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
}

/// Records a plain value (a count, not a duration) under `stage`.
pub fn value(stage: impl FnOnce() -> String, v: u32) {
    if let Some(r) = recorder() {
        r.samples.lock().entry(stage()).or_default().push(v);
    }
}
