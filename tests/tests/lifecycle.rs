//! Ownership lifecycle: the control plane's state is O(live sessions + live
//! nodes).
//!
//! Invariants:
//! - a session whose client sends Stop gives its owner record back (the data
//!   plane batches `ReleaseSessions`), observed on the admin API;
//! - a data-plane node that left is removed from the state after
//!   `leases.departed_node_retention`, and owner records it still held are
//!   released after `leases.orphaned_session_timeout`.

use std::time::{Duration, Instant};

use gatesvr_sdk::{Client, Event};
use gatesvr_tests::cluster::TestCluster;
use gatesvr_tests::{PATIENCE, http_get};

/// The admin API's owner record of `openid` (JSON null if none).
async fn owner(cluster: &TestCluster, openid: &str) -> serde_json::Value {
    let admin = cluster.cp.as_ref().unwrap().admin_addr();
    let (status, body) = http_get(admin, &format!("/v1/sessions/{openid}")).await;
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    reply["session"].clone()
}

/// The admin API's node records, by id.
async fn nodes(cluster: &TestCluster) -> serde_json::Value {
    let admin = cluster.cp.as_ref().unwrap().admin_addr();
    let (status, body) = http_get(admin, "/v1/nodes").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls `cond` every 10 ms, at most [`PATIENCE`]; returns how long it took.
async fn poll_until<F, Fut>(what: &str, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_session_releases_its_owner_record() {
    let cluster = TestCluster::start(1, |_| {}).await;
    let client = Client::connect(cluster.client_config(0, "stopper"))
        .await
        .unwrap();
    let event = tokio::time::timeout(PATIENCE, client.next_event())
        .await
        .unwrap();
    assert!(matches!(event, Some(Event::Connected { .. })), "{event:?}");
    let held = owner(&cluster, "stopper").await;
    assert_eq!(held["owner_node"], "dp-1", "{held}");

    // Another session on the same node stays owned: only the stopped one goes.
    let other = Client::connect(cluster.client_config(0, "stayer"))
        .await
        .unwrap();
    poll_until("the second session is owned", || async {
        !owner(&cluster, "stayer").await.is_null()
    })
    .await;

    client.stop().await;
    let took = poll_until("the stopped session's owner record is released", || async {
        owner(&cluster, "stopper").await.is_null()
    })
    .await;
    eprintln!("owner record released {took:?} after the Stop was acknowledged");
    assert!(!owner(&cluster, "stayer").await.is_null());
    let view = cluster.dps[0].node().cluster.clone().unwrap();
    poll_until("the release reached the data plane's view", || async {
        !view.view().owners.contains_key("stopper")
    })
    .await;
    drop(other);
}

/// A burst of Starts (a reconnect storm) shares `ClaimSessions` calls: the
/// data plane's claim loop lets the claims queued together go in one call,
/// where it used to send a call for nearly every claim while call slots were
/// free (2 claims per call in `gate-bench claims`, session 12).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_claims_shares_calls() {
    const BURST: u64 = 200;
    let cluster = TestCluster::start(1, |_| {}).await;
    let dp = cluster.dps[0].node().cluster.clone().unwrap();
    let (calls_before, claims_before) = dp.claim_counts();
    let mut claims = tokio::task::JoinSet::new();
    for i in 0..BURST {
        let dp = dp.clone();
        claims.spawn(async move {
            let openid = format!("burst-{i}");
            dp.claim(&openid, &format!("s-{openid}"), "").await
        });
    }
    while let Some(r) = claims.join_next().await {
        r.unwrap().expect("claimed");
    }
    let (calls_after, claims_after) = dp.claim_counts();
    let (calls, sent) = (calls_after - calls_before, claims_after - claims_before);
    eprintln!("{sent} claims in {calls} calls");
    assert_eq!(sent, BURST);
    assert!(
        calls * 8 <= BURST,
        "{BURST} claims started together took {calls} calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departed_node_is_removed_after_retention() {
    let mut cluster = TestCluster::start(2, |_| {}).await;
    // Short lifecycle limits for the test (defaults: 5m and 1h).
    cluster.stop_control_plane().await;
    cluster.cp_config.leases.orphaned_session_timeout = Duration::from_millis(500);
    cluster.cp_config.leases.departed_node_retention = Duration::from_secs(2);
    cluster.restart_control_plane().await;
    let view = cluster.dps[0].node().cluster.clone().unwrap();
    poll_until("dp-1 sees both nodes again", || async {
        view.is_connected() && view.view().nodes.len() == 2
    })
    .await;

    // dp-2 leaves at the end of a drain (no sessions to move).
    let leaving = cluster.dps.remove(1);
    leaving.drain().await;
    leaving.shutdown().await;
    poll_until("dp-2 is shown as left", || async {
        nodes(&cluster).await.to_string().contains("\"left\"")
    })
    .await;
    let took = poll_until("dp-2's record is removed", || async {
        !nodes(&cluster).await.to_string().contains("dp-2")
    })
    .await;
    eprintln!("departed node removed {took:?} after it was shown as left");
    assert!(nodes(&cluster).await.to_string().contains("dp-1"));
    poll_until("dp-1's view forgot dp-2", || async {
        !view.view().nodes.contains_key("dp-2")
    })
    .await;
}
