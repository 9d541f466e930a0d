//! The data plane's CPU profile endpoint answers every `seconds` clearly.
//!
//! Invariants checked:
//! - `seconds` outside 1..=60 is a 400 naming the range (it used to be clamped silently);
//! - a 1-second profile of an idle node is a non-empty SVG (a flamegraph, or one saying that
//!   no sample was taken), never an empty body.

use gatesvr_tests::{TestNode, http_get_with_token};

const TOKEN: &str = "ops-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_seconds_are_checked_and_short_profiles_are_not_empty() {
    // Profiling lives on the authenticated ops listener (docs/operations.md, Security).
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("ops-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let node = TestNode::start(|cfg| {
        cfg.server.ops_addr = Some("127.0.0.1:0".into());
        cfg.server.ops_token_file = Some(token_file.clone());
    })
    .await;
    // The port the node bound (what gate-bench announces).
    let ops = node.dp.ops_addr().expect("ops listener configured");
    let http_get =
        |addr, path: String| async move { http_get_with_token(addr, &path, TOKEN).await };
    for bad in ["0", "61", "-1", "x"] {
        let (status, body) = http_get(ops, format!("/debug/pprof/profile?seconds={bad}")).await;
        assert_eq!(status, 400, "seconds={bad}: {body}");
    }
    let (status, body) = http_get(ops, "/debug/pprof/profile?seconds=0".into()).await;
    assert!(body.contains("1..=60"), "{status}: {body}");
    let (status, svg) = http_get(ops, "/debug/pprof/profile?seconds=1".into()).await;
    assert_eq!(status, 200, "{svg}");
    assert!(
        svg.contains("<svg") && svg.contains("</svg>"),
        "not an SVG: {svg:.200}"
    );
}
