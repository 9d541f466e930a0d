//! The data plane's CPU profile endpoint answers every `seconds` clearly.
//!
//! Invariants checked:
//! - `seconds` outside 1..=60 is a 400 naming the range (it used to be clamped silently);
//! - a 1-second profile of an idle node is a non-empty SVG (a flamegraph, or one saying that
//!   no sample was taken), never an empty body.

use gatesvr_tests::{TestNode, http_get};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_seconds_are_checked_and_short_profiles_are_not_empty() {
    let node = TestNode::start(|_| {}).await;
    let http = node.dp.http_addr();
    for bad in ["0", "61", "-1", "x"] {
        let (status, body) = http_get(http, &format!("/debug/pprof/profile?seconds={bad}")).await;
        assert_eq!(status, 400, "seconds={bad}: {body}");
    }
    let (status, body) = http_get(http, "/debug/pprof/profile?seconds=0").await;
    assert!(body.contains("1..=60"), "{status}: {body}");
    let (status, svg) = http_get(http, "/debug/pprof/profile?seconds=1").await;
    assert_eq!(status, 200, "{svg}");
    assert!(
        svg.contains("<svg") && svg.contains("</svg>"),
        "not an SVG: {svg:.200}"
    );
}
