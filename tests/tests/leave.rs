//! A drained data-plane node leaves the control plane (`LeaveNode`) at the end of its drain.
//!
//! Invariants checked:
//! - the control plane shows the node as `left` as soon as the drain returns, long before its
//!   lease could have expired (leases here are 30 s), and no failover decision is recorded
//!   for a node that handed every session over;
//! - its sessions are owned by successors at newer epochs (fencing holds);
//! - a left node may neither heartbeat nor claim, and it does not register itself again;
//! - a node that leaves with sessions still recorded as its own (no successor) reports them
//!   as orphaned, keeps them pointed at itself for the next claimant's takeover, and a
//!   failover decision counts them.

use std::time::Duration;

use gatesvr_controlplane::state::NodeStatus;
use gatesvr_proto::control::control_plane_client::ControlPlaneClient;
use gatesvr_proto::control::{Claim, ClaimSessionsRequest, HeartbeatNodeRequest};
use gatesvr_sdk::Client;
use gatesvr_tests::cluster::TestCluster;

fn status(cluster: &TestCluster, node: &str) -> Option<NodeStatus> {
    let cp = cluster.cp.as_ref()?;
    cp.node()
        .sm()
        .read()
        .state
        .nodes
        .get(node)
        .map(|n| n.status)
}

fn owner(cluster: &TestCluster, openid: &str) -> Option<(String, u64)> {
    let cp = cluster.cp.as_ref()?;
    cp.node()
        .sm()
        .read()
        .state
        .owners
        .get(openid)
        .map(|o| (o.owner_node.clone(), o.epoch))
}

fn long_leases(cfg: &mut gatesvr_dataplane::DataPlaneConfig) {
    cfg.control_plane.lease_ttl = Duration::from_secs(30);
    cfg.server.drain_timeout = Duration::from_secs(5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_is_left_at_once_and_fenced() {
    let cluster = TestCluster::start(2, long_leases).await;
    let users = ["u1", "u2", "u3"];
    let mut clients = Vec::new();
    for u in users {
        let c = Client::connect(cluster.client_config(0, u)).await.unwrap();
        c.request(1, "hello").await.unwrap();
        clients.push(c);
    }
    let before: Vec<u64> = users
        .iter()
        .map(|u| owner(&cluster, u).expect("claimed").1)
        .collect();
    assert_eq!(status(&cluster, "dp-1"), Some(NodeStatus::Active));

    let report = cluster.dps[0].drain().await;
    assert_eq!(report.staged, users.len(), "{report:?}");
    assert!(report.left, "{report:?}");
    assert_eq!(report.orphaned, 0, "{report:?}");
    // At once: the drain returned well inside the 30 s lease.
    assert_eq!(status(&cluster, "dp-1"), Some(NodeStatus::Left));
    {
        let cp = cluster.cp.as_ref().unwrap();
        let st = &cp.node().sm().read().state;
        assert!(
            st.failovers.values().all(|f| f.failed_node != "dp-1"),
            "a complete drain is no failover: {:?}",
            st.failovers
        );
    }
    for (u, e) in users.iter().zip(&before) {
        let (node, epoch) = owner(&cluster, u).unwrap();
        assert_eq!(node, "dp-2", "{u} owned by the successor");
        assert!(epoch > *e, "{u}: epoch {epoch} not newer than {e}");
    }

    // Fenced: the left node can neither heartbeat nor claim.
    let addr = cluster.cp.as_ref().unwrap().grpc_addr();
    let mut cp = ControlPlaneClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let hb = cp
        .heartbeat_node(HeartbeatNodeRequest {
            node_id: "dp-1".into(),
            draining: true,
            sessions: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(hb.code(), tonic::Code::FailedPrecondition, "{hb:?}");
    let claim = cp
        .claim_sessions(ClaimSessionsRequest {
            node_id: "dp-1".into(),
            claims: vec![Claim {
                openid: "u9".into(),
                session_id: "s9".into(),
                seen_epoch: 0,
                fresh_session_id: String::new(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(claim.code(), tonic::Code::FailedPrecondition, "{claim:?}");
    // Still left a few heartbeat intervals later (lease 30 s: one every 10 s; the loop
    // stopped, so it never registers again). A negative check needs a bounded wait.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status(&cluster, "dp-1"), Some(NodeStatus::Left));
    // The successor's view agrees (for routing and handover sources).
    let c = cluster.dps[1].node().cluster.clone().unwrap();
    gatesvr_tests::eventually("dp-2 sees dp-1 as left", || {
        c.view().live_node("dp-1").is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leaving_with_sessions_reports_them_orphaned() {
    // One node: no successor, so its session cannot be staged anywhere.
    let cluster = TestCluster::start(1, long_leases).await;
    let client = Client::connect(cluster.client_config(0, "solo"))
        .await
        .unwrap();
    client.request(1, "hello").await.unwrap();
    let (_, epoch) = owner(&cluster, "solo").unwrap();
    let report = cluster.dps[0].drain().await;
    assert!(report.left, "{report:?}");
    assert_eq!(report.orphaned, 1, "{report:?}");
    assert_eq!(status(&cluster, "dp-1"), Some(NodeStatus::Left));
    // Still recorded as its own (the next claimant takes it over from a gone owner) ...
    assert_eq!(owner(&cluster, "solo"), Some(("dp-1".into(), epoch)));
    // ... and counted in a failover decision.
    let cp = cluster.cp.as_ref().unwrap();
    let st = &cp.node().sm().read().state;
    assert!(
        st.failovers
            .values()
            .any(|f| f.failed_node == "dp-1" && f.sessions == 1),
        "{:?}",
        st.failovers
    );
}

/// Issue 12, defect 4: a node that drained and left (its process gone, its record still in
/// the view) is not live. Broadcast fan-out skips it instead of waiting on it and answering
/// UNAVAILABLE, which after one rolling upgrade was every broadcast's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_after_a_node_left_reaches_every_live_session() {
    let mut cluster = TestCluster::start(3, long_leases).await;
    let mut clients = Vec::new();
    for (dp, u) in [(1, "b1"), (2, "b2")] {
        let c = Client::connect(cluster.client_config(dp, u)).await.unwrap();
        c.request(1, "hello").await.unwrap();
        clients.push(c);
    }
    let report = cluster.dps[0].drain().await;
    assert!(report.left, "{report:?}");
    let departed = cluster.dps.remove(0);
    departed.shutdown().await;
    let c = cluster.dps[0].node().cluster.clone().unwrap();
    gatesvr_tests::eventually("dp-2 sees dp-1 as left", || {
        c.view().live_node("dp-1").is_none() && c.view().nodes.contains_key("dp-1")
    })
    .await;
    let mut gw = cluster.gateway(0).await;
    let answer = gw
        .broadcast_to_clients(gatesvr_proto::upstream::BroadcastRequest {
            msg_type: "news".into(),
            content: "after the rollout".into(),
            data: Vec::new(),
            zones: Vec::new(),
        })
        .await;
    let answer = answer
        .expect("a departed node is not waited on")
        .into_inner();
    assert_eq!(answer.queued, 2, "{answer:?}");
    for c in &clients {
        let p = gatesvr_tests::next_push(c)
            .await
            .expect("broadcast delivered");
        assert_eq!(p.content, "after the rollout");
    }
}
