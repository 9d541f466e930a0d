//! Smoke run of `gate-bench peers` (GateSvr vs NATS, Mosquitto, etcd) and `scripts/bench-peers`
//! at tiny size: each comparison runs, produces its fields and ratio checks, loses nothing.
//! No timing is asserted.
//!
//! The peers are Debian packages (nats-server, mosquitto, etcd-server); `scripts/test` (and so
//! CI) and `scripts/bench-peers` install them. A missing peer fails the test, naming the package.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Same lookup as gate-bench: PATH, then Debian's sbin directories.
fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Fails, naming the packages, unless every peer binary is installed.
fn require_peers(test: &str, bins: &[(&str, &str)]) {
    let missing: Vec<&str> = bins
        .iter()
        .filter(|(bin, _)| find(bin).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    assert!(
        missing.is_empty(),
        "{test}: peer binaries not installed ({}); `apt-get install -y {}`, scripts/test or scripts/bench-peers installs them",
        missing.join(", "),
        missing.join(" ")
    );
}

const NATS: (&str, &str) = ("nats-server", "nats-server");
const MOSQUITTO: (&str, &str) = ("mosquitto", "mosquitto");
const ETCD: (&str, &str) = ("etcd", "etcd-server");

fn gate_bench() -> &'static str {
    env!("CARGO_BIN_EXE_gate-bench")
}

/// `gate-bench --tiny --json peers <which>` under `timeout` (which kills every server it started
/// if it hangs); returns the one JSON report.
fn run(which: &str) -> serde_json::Value {
    let base = tempfile::tempdir().expect("temp dir");
    let out = Command::new("timeout")
        .args(["-k", "5", "240", gate_bench()])
        .args(["--tiny", "--json", "--no-pin", "--rounds", "1", "--base"])
        .arg(base.path())
        .args(["peers", which])
        .output()
        .expect("gate-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gate-bench peers {which} failed ({}): {}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON report from peers {which}: {stdout}"));
    let report: serde_json::Value = serde_json::from_str(line).expect("JSON report");
    assert_eq!(report["scenario"], format!("peers-{which}"));
    report
}

fn field(report: &serde_json::Value, name: &str) -> f64 {
    report["fields"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("{} lacks field {name}: {report}", report["scenario"]))
}

/// Every ratio check compares two measured, positive values (CPU-time lines excepted: at tiny
/// sizes they fall under the 10 ms tick of /proc/PID/stat and read 0).
fn ratios_measured(report: &serde_json::Value, at_least: usize) {
    let checks = report["checks"].as_array().expect("checks");
    let ratios: Vec<&serde_json::Value> = checks
        .iter()
        .filter(|c| !c["ratio"].is_null() && !c["name"].as_str().unwrap_or("").contains("CPU"))
        .collect();
    assert!(ratios.len() >= at_least, "too few ratio checks: {report}");
    for c in ratios {
        assert!(
            c["value"].as_f64().is_some_and(|v| v > 0.0)
                && c["baseline"].as_f64().is_some_and(|v| v > 0.0),
            "unmeasured line {c}"
        );
    }
}

#[test]
fn request_reply_runs_against_nats() {
    require_peers("request_reply_runs_against_nats", &[NATS]);
    let r = run("request-reply");
    for k in ["gs", "nats"] {
        for f in [
            "k1_p50_us",
            "k1_p999_us",
            "k64_p99_us",
            "k64_req_per_s",
            "sat_req_per_s",
        ] {
            assert!(field(&r, &format!("{k}_{f}")) > 0.0, "{k}_{f} is 0: {r}");
        }
    }
    assert_eq!(field(&r, "nats_errors_total"), 0.0);
    ratios_measured(&r, 9);
}

#[test]
fn fanout_reaches_every_subscriber_once() {
    require_peers("fanout_reaches_every_subscriber_once", &[NATS, MOSQUITTO]);
    let r = run("fanout");
    for sys in ["gs", "mqtt", "nats"] {
        for f in ["gaps_total", "dups_total", "one_missing", "burst_missing"] {
            assert_eq!(field(&r, &format!("{sys}_{f}")), 0.0, "{sys}_{f}: {r}");
        }
        field(&r, &format!("{sys}_deliveries_per_s"));
        field(&r, &format!("{sys}_one_last_ms"));
    }
    ratios_measured(&r, 6);
}

#[test]
fn claims_commit_on_both_without_errors() {
    require_peers("claims_commit_on_both_without_errors", &[ETCD]);
    let r = run("claims");
    assert_eq!(field(&r, "gs_claim_errors"), 0.0);
    assert_eq!(field(&r, "etcd_put_errors"), 0.0);
    ratios_measured(&r, 3);
}

#[test]
fn idle_reads_rss_of_every_server() {
    require_peers("idle_reads_rss_of_every_server", &[NATS, MOSQUITTO]);
    let r = run("idle");
    for sys in ["gs", "nats", "mqtt"] {
        assert!(field(&r, &format!("{sys}_rss_base_bytes")) > 0.0);
        field(&r, &format!("{sys}_rss_bytes_per_conn"));
    }
    assert_eq!(r["checks"].as_array().expect("checks").len(), 2);
}

/// The one command: `scripts/bench-peers` (no install, this binary, tiny sizes) writes the
/// generated block and the chart, and a second run replaces the block instead of adding one.
#[test]
fn script_writes_the_peers_section() {
    require_peers("script_writes_the_peers_section", &[NATS]);
    let tmp = tempfile::tempdir().expect("temp dir");
    let doc = tmp.path().join("benchmarks.md");
    std::fs::write(&doc, "# Benchmarks\n\nhand-written text\n").expect("doc");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for _ in 0..2 {
        let out = Command::new(root.join("scripts/bench-peers"))
            .args(["request-reply"])
            .arg(tmp.path().join("r.jsonl"))
            .env("GATE_BENCH_BIN", gate_bench())
            .env("PEERS_NO_INSTALL", "1")
            .env("PEERS_DOC", &doc)
            .env("PEERS_TIME_LIMIT", "240")
            .env(
                "GATE_BENCH_FLAGS",
                format!("--tiny --no-pin --rounds 1 --base {}", tmp.path().display()),
            )
            .output()
            .expect("scripts/bench-peers runs");
        assert!(
            out.status.success(),
            "scripts/bench-peers failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&doc).expect("doc written");
    assert!(text.starts_with("# Benchmarks\n\nhand-written text"));
    assert_eq!(text.matches("<!-- peers:begin").count(), 1, "{text}");
    assert_eq!(text.matches("<!-- peers:end -->").count(), 1, "{text}");
    assert!(
        text.contains("| [NATS] p50 latency us, 1 in flight |"),
        "{text}"
    );
    let svg = std::fs::read_to_string(tmp.path().join("benchmarks-peers.svg")).expect("chart");
    assert!(svg.starts_with("<svg") && svg.contains("NATS"));
}
