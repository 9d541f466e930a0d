//! What operators' commands do to real data-plane nodes (in-process control plane and two
//! data planes, real QUIC clients): no data-plane code knows about these commands; they
//! act through session ownership and claims in the control plane's state machine.
//!
//! Invariants checked:
//! - `DisconnectSession` (gatectl sessions disconnect, the console) closes the client's
//!   connection with SESSION_REPLACED, and the client can start again afterwards;
//! - a cordoned node refuses new sessions (DRAINING: connect elsewhere) while a session it
//!   already owns can still resume on it; uncordoned, it takes new sessions again.

use gatesvr_controlplane::Cmd;
use gatesvr_proto::client::ErrorCode;
use gatesvr_proto::client::envelope::Body;
use gatesvr_tests::RawConn;
use gatesvr_tests::cluster::TestCluster;

fn owner(cluster: &TestCluster, openid: &str) -> Option<String> {
    let cp = cluster.cp.as_ref()?;
    cp.node()
        .sm()
        .read()
        .state
        .owners
        .get(openid)
        .map(|o| o.owner_node.clone())
}

async fn write(cluster: &TestCluster, cmd: Cmd) {
    let cp = cluster.cp.as_ref().expect("control plane");
    let r = cp.node().write(vec![cmd]).await.expect("committed");
    assert!(r[0].err().is_none(), "refused: {r:?}");
}

/// A started session of `openid` on data plane `dp`.
async fn started(cluster: &TestCluster, dp: usize, openid: &str, session: &str) -> RawConn {
    let mut c = RawConn::connect(cluster.dps[dp].quic_addr(), &cluster.dir.ca()).await;
    c.start(openid, &cluster.dir.token(openid), session, 0)
        .await;
    match c.recv().await {
        Some(Body::StartOk(_)) => c,
        other => panic!("{openid} on dp {dp}: expected StartOk, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_the_session_and_the_client_may_return() {
    let cluster = TestCluster::start(2, |_| {}).await;
    let conn = started(&cluster, 0, "alice", "s-alice").await;
    assert_eq!(owner(&cluster, "alice").as_deref(), Some("dp-1"));
    write(
        &cluster,
        Cmd::DisconnectSession {
            openid: "alice".into(),
        },
    )
    .await;
    assert_eq!(conn.closed_with().await, Some(ErrorCode::SessionReplaced));
    // The user comes back (here to the other node) and is claimed afresh.
    let _again = started(&cluster, 1, "alice", "s-alice-2").await;
    gatesvr_tests::eventually("alice owned by dp-2", || {
        owner(&cluster, "alice").as_deref() == Some("dp-2")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordoned_node_keeps_its_sessions_and_refuses_new_ones() {
    let cluster = TestCluster::start(2, |_| {}).await;
    let bob = started(&cluster, 1, "bob", "s-bob").await;
    write(
        &cluster,
        Cmd::CordonNode {
            node_id: "dp-2".into(),
            cordoned: true,
        },
    )
    .await;
    // A new user is sent elsewhere.
    let mut carol = RawConn::connect(cluster.dps[1].quic_addr(), &cluster.dir.ca()).await;
    carol
        .start("carol", &cluster.dir.token("carol"), "s-carol", 0)
        .await;
    match carol.recv().await {
        Some(Body::Error(e)) => assert_eq!(e.code, ErrorCode::Draining as i32, "{e:?}"),
        other => panic!("expected a DRAINING error, got {other:?}"),
    }
    // bob's own session resumes on it.
    drop(bob);
    let _bob = started(&cluster, 1, "bob", "s-bob").await;
    assert_eq!(owner(&cluster, "bob").as_deref(), Some("dp-2"));
    write(
        &cluster,
        Cmd::CordonNode {
            node_id: "dp-2".into(),
            cordoned: false,
        },
    )
    .await;
    let _carol = started(&cluster, 1, "carol", "s-carol").await;
    assert_eq!(owner(&cluster, "carol").as_deref(), Some("dp-2"));
}
