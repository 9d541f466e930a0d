//! Smoke run of every gate-bench scenario at tiny size: checks the harness (each scenario runs,
//! produces its fields, sees no gaps or duplicates), never speed. No timing assertions.

use std::process::Command;

fn run(scenario: &str) -> serde_json::Value {
    let base = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_gate-bench"))
        .args(["--tiny", "--json", "--no-pin", "--rounds", "1", "--base"])
        .arg(base.path())
        .arg(scenario)
        .output()
        .expect("gate-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gate-bench {scenario} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON report from {scenario}: {stdout}"));
    let report: serde_json::Value = serde_json::from_str(line).expect("JSON report");
    assert_eq!(report["scenario"], scenario);
    report
}

fn field(report: &serde_json::Value, name: &str) -> f64 {
    report["fields"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("{} lacks field {name}: {report}", report["scenario"]))
}

fn has_fields(report: &serde_json::Value, names: &[&str]) {
    for n in names {
        field(report, n);
    }
    assert!(
        !report["checks"].as_array().expect("checks").is_empty(),
        "no checks: {report}"
    );
}

#[test]
fn rtt_produces_latencies_and_limits() {
    let r = run("rtt");
    has_fields(
        &r,
        &[
            "dp_k1_p50_us",
            "dp_k1_p99_us",
            "dp_k64_p999_us",
            "dp_k64_req_per_s",
            "limit_k1_p50_us",
            "quinn_k1_p50_us",
            "tonic_k64_req_per_s",
        ],
    );
}

#[test]
fn throughput_reads_cpu_per_request() {
    let r = run("throughput");
    has_fields(
        &r,
        &[
            "dp_req_per_s",
            "dp_cpu_us_per_req",
            "relay_req_per_s",
            "relay_cpu_us_per_req",
        ],
    );
    assert!(field(&r, "dp_req_per_s") > 0.0);
}

#[test]
fn push_has_no_gaps_or_duplicates() {
    let r = run("push");
    has_fields(
        &r,
        &["dp_deliveries_per_s", "dp_push_p99_us", "bare_msgs_per_s"],
    );
    assert_eq!(field(&r, "dp_gaps_total"), 0.0);
    assert_eq!(field(&r, "dp_dups_total"), 0.0);
    assert_eq!(field(&r, "dp_undelivered"), 0.0);
    assert_eq!(field(&r, "bare_gaps"), 0.0);
    assert_eq!(field(&r, "bare_dups"), 0.0);
    assert!(field(&r, "dp_deliveries") > 0.0);
}

#[test]
fn broadcast_reaches_every_session_once() {
    let r = run("broadcast");
    has_fields(&r, &["last_delivery_ms", "delivered", "queued"]);
    assert_eq!(field(&r, "delivered"), field(&r, "queued"));
    assert_eq!(field(&r, "gaps_total"), 0.0);
    assert_eq!(field(&r, "dups_total"), 0.0);
}

#[test]
fn sessions_measures_memory_and_setup() {
    let r = run("sessions");
    has_fields(
        &r,
        &[
            "dp_rss_bytes_per_session",
            "bare_rss_bytes_per_connection",
            "dp_full_per_s",
            "dp_resumed_per_s",
            "bare_full_per_s",
        ],
    );
}

#[test]
fn claims_commits_without_errors() {
    let r = run("claims");
    has_fields(&r, &["claims_per_s", "claim_p99_us", "fsync_records_per_s"]);
    assert_eq!(field(&r, "claim_errors"), 0.0);
    assert!(field(&r, "claims_per_s") > 0.0);
}

#[test]
fn failover_is_reserved() {
    let out = Command::new(env!("CARGO_BIN_EXE_gate-bench"))
        .arg("failover")
        .output()
        .expect("gate-bench runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not available yet"));
}
