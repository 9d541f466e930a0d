//! Smoke run of every gate-bench scenario at tiny size: checks the harness (each scenario runs,
//! produces its fields, sees no gaps or duplicates), never speed. No timing assertions.

use std::process::Command;

fn run(scenario: &str) -> serde_json::Value {
    run_with(scenario, &[], &[])
}

/// `gate-bench --tiny ... <before> <scenario> <after>`; the report of `scenario`.
fn run_with(scenario: &str, before: &[&str], after: &[&str]) -> serde_json::Value {
    let base = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_gate-bench"))
        .args(["--tiny", "--json", "--no-pin", "--rounds", "1", "--base"])
        .arg(base.path())
        .args(before)
        .arg(scenario)
        .args(after)
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
        &[
            "dp_deliveries_per_s",
            "dp_push_p99_us",
            "bare_msgs_per_s",
            "batch_deliveries_per_s",
            "stream_deliveries_per_s",
            "stream_push_p99_us",
        ],
    );
    // Gaps and duplicates are counted over every window (unary, batch, stream, onetarget).
    assert_eq!(field(&r, "dp_gaps_total"), 0.0);
    assert_eq!(field(&r, "dp_dups_total"), 0.0);
    assert_eq!(field(&r, "dp_undelivered"), 0.0);
    assert_eq!(field(&r, "batch_undelivered"), 0.0);
    assert_eq!(field(&r, "stream_undelivered"), 0.0);
    assert!(field(&r, "stream_deliveries") > 0.0);
    assert_eq!(field(&r, "onetarget_undelivered"), 0.0);
    assert!(field(&r, "onetarget_deliveries") > 0.0);
    assert_eq!(field(&r, "stream_pushes_refused"), 0.0);
    assert_eq!(field(&r, "bare_gaps"), 0.0);
    assert_eq!(field(&r, "bare_dups"), 0.0);
    assert_eq!(field(&r, "bare_last_gaps"), 0.0);
    assert_eq!(field(&r, "bare_last_dups"), 0.0);
    // The baseline ran first and last in the round; the ratios use the mean of the two.
    let (first, last) = (
        field(&r, "bare_first_msgs_per_s"),
        field(&r, "bare_last_msgs_per_s"),
    );
    assert!(first > 0.0 && last > 0.0);
    assert!((field(&r, "bare_msgs_per_s") - (first + last) / 2.0).abs() <= 1e-6 * (first + last));
    assert!(field(&r, "dp_deliveries") > 0.0);
    // The meters read the server's and this process's CPU and the clients' packets.
    for k in [
        "bare",
        "bare_last",
        "dp",
        "stream",
        "streambatch",
        "onetarget",
    ] {
        assert!(field(&r, &format!("{k}_pkts_in_per_delivery")) > 0.0, "{k}");
        assert!(
            field(&r, &format!("{k}_server_cpu_us_per_delivery")) > 0.0,
            "{k}"
        );
        // Every delivery came in a STREAM frame, and one stream puts at most one in a datagram.
        let frames = field(&r, &format!("{k}_server_stream_frames_per_delivery"));
        assert!(frames > 0.0, "{k}");
        assert!(
            frames <= field(&r, &format!("{k}_pkts_in_per_delivery")) + 1e-9,
            "{k}"
        );
    }
    // Each window counted the pushes it queued: its undelivered check compares against that
    // (the `batch` window once counted 0 of its codes-only batches, and its check could not fail).
    for k in ["dp", "batch", "stream", "streambatch", "onetarget"] {
        assert!(field(&r, &format!("{k}_pushes_accepted")) > 0.0, "{k}");
    }
    // How long a push_batch waited for its results.
    let p50 = field(&r, "streambatch_result_p50_us");
    assert!(p50 > 0.0 && p50 <= field(&r, "streambatch_result_p99_us"));
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
fn web_compares_browser_transports_with_native_quic() {
    let r = run("web");
    has_fields(
        &r,
        &[
            "quic_rtt_p50_us",
            "webtransport_rtt_p50_us",
            "webtransport_rss_bytes_per_session",
            "websocket_rtt_p50_us",
            "quic_rss_bytes_per_session",
            "quic_without_web_rss_bytes_per_session",
            "websocket_rss_bytes_per_session",
        ],
    );
}

#[test]
fn claims_commits_without_errors() {
    let r = run("claims");
    has_fields(
        &r,
        &[
            "claims_per_s",
            "claim_p99_us",
            "fsync_records_per_s",
            "claims_per_call",
        ],
    );
    // Claims go through the data plane's batching client: at least one per call.
    assert!(field(&r, "claims_per_call") >= 1.0);
    assert_eq!(field(&r, "claim_errors"), 0.0);
    assert!(field(&r, "claims_per_s") > 0.0);
}

#[test]
fn scale_releases_what_it_claimed_and_restores_a_backup() {
    let r = run_with(
        "scale",
        &[],
        &[
            "--lifecycles",
            "300",
            "--live",
            "30",
            "--churn",
            "1s",
            "--restore-owners",
            "1000",
            "--dp-nodes",
            "2",
            "--concurrency",
            "16",
        ],
    );
    has_fields(
        &r,
        &[
            "after_lifecycles_snapshot_bytes",
            "after_lifecycles_cp_rss_max_mib",
            "live_new_node_ready_ms",
            "live_watch_snapshot_bytes",
            "live_scoped_watch_snapshot_bytes",
            "restore_ms",
            "restored_export_bytes",
        ],
    );
    // Every lifecycle ended in a release: the state holds the live sessions only.
    assert_eq!(field(&r, "lifecycles_done"), 300.0);
    assert_eq!(field(&r, "after_lifecycles_owners"), 30.0);
    assert_eq!(field(&r, "after_churn_owners"), 30.0);
    assert_eq!(field(&r, "lifecycle_errors"), 0.0);
    assert_eq!(field(&r, "churn_errors"), 0.0);
    // The watch is scoped: a new node's view holds its own sessions (none),
    // and its snapshot is smaller than the unscoped one with every owner.
    assert_eq!(field(&r, "live_new_node_view_owners"), 0.0);
    assert!(field(&r, "live_scoped_watch_snapshot_bytes") < field(&r, "live_watch_snapshot_bytes"));
    assert_eq!(field(&r, "restored_owners"), 1030.0);
    assert_eq!(field(&r, "restored_watch_snapshot_owners"), 1030.0);
}

#[test]
fn failover_resumes_every_session_and_loses_no_durable_push() {
    let r = run("failover");
    has_fields(
        &r,
        &[
            "resume_p50_ms",
            "resume_p99_ms",
            "resume_max_ms",
            "detect_p99_ms",
            "reconnect_p99_ms",
            "durable_accepted",
            "durable_refused",
            "dups_redelivered",
            "cp_new_leader_ms",
            "cp_requests",
            "cp_failed_requests",
            "cp_new_session_failures",
        ],
    );
    assert!(field(&r, "durable_accepted") > 0.0);
    assert_eq!(field(&r, "durable_lost"), 0.0);
    assert_eq!(field(&r, "dups_unflagged"), 0.0);
    assert_eq!(field(&r, "gaps"), 0.0);
    assert_eq!(field(&r, "sessions_not_resumed"), 0.0);
    assert!(field(&r, "cp_requests") > 0.0);
}

#[test]
fn load_runs_steady_clients_against_a_local_cluster() {
    let r = run_with("load", &[], &["--duration", "3s"]);
    has_fields(
        &r,
        &[
            "requests",
            "failed_requests",
            "pushes_expected",
            "pushes_lost",
            "steady_req_p99_ms",
            "reconnects_resumed",
        ],
    );
    assert!(field(&r, "requests") > 0.0);
    assert!(field(&r, "pushes_expected") > 0.0);
    assert_eq!(field(&r, "pushes_lost"), 0.0);
    assert_eq!(field(&r, "push_gaps"), 0.0);
}

/// A data plane started apart (as a deployment would be), then scenarios against its
/// addresses with a token minted from its HMAC secret file.
#[test]
fn scenarios_run_against_given_addresses() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("temp dir");
    gatesvr_common::tls::install_crypto_provider();
    gatesvr_common::certs::generate(&dir.path().join("certs"), &[]).expect("dev certs");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a-deployment-secret-0123456789\n").expect("secret");
    let mut dp = Command::new(env!("CARGO_BIN_EXE_gate-bench"))
        .args(["serve", "dataplane", "--dir"])
        .arg(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("data plane starts");
    let mut line = String::new();
    std::io::BufReader::new(dp.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address line");
    let addrs: serde_json::Value = serde_json::from_str(&line).expect("JSON addresses");
    let ca = dir.path().join("certs").join("ca.crt");
    let target = [
        "--target-quic",
        addrs["quic"].as_str().expect("quic"),
        "--target-push",
        addrs["grpc"].as_str().expect("grpc"),
        "--ca",
        ca.to_str().expect("utf-8 path"),
        "--token-secret-file",
        secret.to_str().expect("utf-8 path"),
    ];
    let r = run_with("rtt", &target, &[]);
    has_fields(&r, &["dp_k1_p50_us", "dp_k64_req_per_s"]);
    assert_eq!(field(&r, "dp_k1_errors"), 0.0);
    let r = run_with("push", &target, &[]);
    assert!(field(&r, "dp_deliveries") > 0.0);
    assert_eq!(field(&r, "dp_gaps_total"), 0.0);
    assert_eq!(field(&r, "dp_dups_total"), 0.0);
    let r = run_with("broadcast", &target, &[]);
    assert_eq!(field(&r, "gaps_total"), 0.0);
    let r = run_with("sessions", &target, &[]);
    has_fields(&r, &["dp_full_per_s", "dp_resumed_per_s"]);
    let _ = dp.kill();
    let _ = dp.wait();
}
