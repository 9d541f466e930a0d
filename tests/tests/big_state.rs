//! State that grows with queues and sessions crosses the wire in bounded
//! chunks (proto/src/limits.rs), with no size cliff at tonic's 4 MiB default.
//!
//! Invariants:
//! - a handover of a session holding 1,024 unacked 4 KB pushes (over 4 MiB
//!   of state) moves every push; all are delivered, in order, after the move;
//! - a crash failover that fetches a replica of 1,024 durable 4 KB pushes
//!   from the standby recovers every one of them;
//! - a restarted data plane whose watch snapshot is over 4 MiB never reports
//!   ready before the whole snapshot is applied;
//! - a handover stream broken after its first chunk loses nothing: the old
//!   owner keeps the state, and the retried handover gets all of it;
//! - a drain stages a session whose state is over the 16 MiB message limit
//!   (1,024 unacked 17 KB pushes) on its successor whole, in chunks.

use gatesvr_proto::client::ResumeStatus;
use gatesvr_proto::control::control_plane_client::ControlPlaneClient;
use gatesvr_proto::control::{Claim, ClaimSessionsRequest, NodeState};
use gatesvr_proto::upstream::PushToClientRequest;
use gatesvr_sdk::{Client, Event};
use gatesvr_tests::cluster::{TestCluster, push};
use gatesvr_tests::{PATIENCE, eventually, http_get};
use prost::Message;

const PUSHES: u64 = 1024;
const PUSH_BYTES: usize = 4096;
/// tonic's default decode limit: the cliff these tests cross.
const TONIC_DEFAULT_LIMIT: usize = 4 << 20;

fn big(openid: &str, n: u64, durable: bool) -> PushToClientRequest {
    PushToClientRequest {
        data: vec![(n % 251) as u8; PUSH_BYTES].into(),
        durable,
        ..push(openid, n)
    }
}

async fn next(client: &Client) -> Event {
    tokio::time::timeout(PATIENCE, client.next_event())
        .await
        .expect("an event within the patience")
        .expect("client open")
}

/// Reads pushes until `n` arrived; checks each one's content and data.
async fn expect_pushes(client: &Client, n: u64) {
    let mut got = 0u64;
    while got < n {
        match next(client).await {
            Event::Push(p) => {
                got += 1;
                assert_eq!(p.content, got.to_string(), "in order, no gap");
                assert_eq!(p.data.len(), PUSH_BYTES);
                assert!(p.data.iter().all(|b| u64::from(*b) == got % 251));
            }
            Event::Connected { .. } | Event::Disconnected { .. } | Event::GoAway { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_of_1024_unacked_4k_pushes_moves_them_all() {
    let cluster = TestCluster::start(2, |_| {}).await;
    let client = Client::connect(cluster.client_config(0, "big"))
        .await
        .unwrap();
    assert!(matches!(next(&client).await, Event::Connected { .. }));
    let mut gw = cluster.gateway(0).await;
    for n in 1..=PUSHES {
        gw.push_to_client(big("big", n, false)).await.unwrap();
    }
    let old = cluster.dps[0].node().clone();
    let exported = old.registry.get("big").unwrap().state.lock().export();
    assert_eq!(exported.pushes.len() as u64, PUSHES, "all unacked");
    assert!(
        exported.encoded_len() > TONIC_DEFAULT_LIMIT,
        "the state ({} bytes) is over tonic's default limit",
        exported.encoded_len()
    );

    // The client reconnects to dp-2 (as a load balancer might send it):
    // dp-2 claims the session and streams its state from dp-1.
    client.reconnect_to(cluster.dps[1].quic_addr());
    eventually("the client resumed on dp-2", || client.node_id() == "dp-2").await;
    let new = cluster.dps[1].node().clone();
    let moved = new.registry.get("big").expect("dp-2 holds the session");
    assert_eq!(moved.identity.session_id, client.session_id(), "resumed");
    let stats = moved.state.lock().stats();
    assert_eq!(stats.unacked, PUSHES, "every push moved");
    assert!(old.registry.get("big").is_none(), "one owner");
    assert_eq!(new.metrics.handovers.with_label_values(&["taken"]).get(), 1);

    expect_pushes(&client, PUSHES).await;
    eventually("dp-2 saw every push acked", || {
        moved.state.lock().stats().acked_seq_id == PUSHES
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_failover_fetches_a_replica_of_1024_durable_4k_pushes() {
    let mut cluster = TestCluster::start(3, |_| {}).await;
    let client = Client::connect(cluster.client_config(0, "big"))
        .await
        .unwrap();
    assert!(matches!(next(&client).await, Event::Connected { .. }));
    let old_session = client.session_id();
    let mut gw = cluster.gateway(0).await;
    for n in 1..=PUSHES {
        gw.push_to_client(big("big", n, true)).await.unwrap();
    }
    // dp-2 is dp-1's standby (next on the ring); dp-3 will take over and
    // must fetch the copy from dp-2 over the network.
    let standby = cluster.dps[1].node().clone();
    let replica = standby.replicas.fetch("big", &old_session);
    assert_eq!(replica.pushes.len() as u64, PUSHES);
    assert!(
        replica.encoded_len() > TONIC_DEFAULT_LIMIT,
        "the replica ({} bytes) is over tonic's default limit",
        replica.encoded_len()
    );

    cluster.dps.remove(0).crash();
    let taker = cluster.dps[1].node().clone();
    let view = taker.cluster.clone().unwrap();
    eventually("dp-1 declared dead", || {
        view.view()
            .nodes
            .get("dp-1")
            .is_none_or(|n| n.state == NodeState::Dead as i32)
    })
    .await;
    client.reconnect_to(cluster.dps[1].quic_addr());
    // Nothing is read before the reconnect: a push taken now would be acked.
    eventually("the client reconnected", || {
        client.session_id() != old_session
    })
    .await;
    assert_eq!(client.node_id(), "dp-3");
    // Leftovers of the old session first, then the recovered one.
    loop {
        match next(&client).await {
            Event::ResumeFailed { status, .. } => {
                assert_eq!(status, ResumeStatus::Recovered);
                break;
            }
            Event::Push(_) | Event::Disconnected { .. } | Event::Connected { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    expect_pushes(&client, PUSHES).await;
    assert_eq!(taker.metrics.durable_pushes_recovered.get(), PUSHES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_data_plane_is_ready_only_with_its_whole_view() {
    let mut cluster = TestCluster::start(2, |_| {}).await;
    // Owner records with long ids: a watch snapshot well over 4 MiB.
    const OWNERS: usize = 12_000;
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "http://{}",
        cluster.cp.as_ref().unwrap().grpc_addr()
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut cp = ControlPlaneClient::new(channel)
        .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES);
    // The owners are the restarted node's own: its watch is scoped to the
    // sessions it owns (other nodes' are looked up on demand).
    let restarting = cluster.dps[1].node().config.node_id.clone();
    for batch in 0..OWNERS / 2000 {
        let claims = (0..2000)
            .map(|i| {
                let n = batch * 2000 + i;
                Claim {
                    openid: format!("{n:0>200}"),
                    session_id: format!("s{n:0>199}"),
                    seen_epoch: 0,
                    fresh_session_id: String::new(),
                }
            })
            .collect();
        let r = cp
            .claim_sessions(ClaimSessionsRequest {
                node_id: restarting.clone(),
                claims,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.results.iter().all(|c| c.error.is_empty()));
    }

    // dp-2 restarts without a state file: its view comes only from the watch.
    let old = cluster.dps.remove(1);
    let mut cfg = old.node().config.clone();
    old.shutdown().await;
    cfg.control_plane.state_file = None;
    let restarted = gatesvr_dataplane::DataPlane::start(cfg, gatesvr_dataplane::Routing::Echo)
        .await
        .unwrap();
    let c = restarted.node().cluster.clone().unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut polls_not_ready = 0;
    loop {
        let (status, body) = http_get(restarted.http_addr(), "/ready").await;
        if status == 200 {
            // Read after the answer: the view only grows here, so a ready
            // answer given with a partial view shows as fewer owners.
            let view = c.view();
            assert!(c.is_view_complete(), "ready before the view was complete");
            assert!(
                view.owners.len() >= OWNERS,
                "ready with {} of {OWNERS} owners",
                view.owners.len()
            );
            let bytes: usize = view.owners.values().map(Message::encoded_len).sum();
            assert!(bytes > TONIC_DEFAULT_LIMIT, "snapshot of {bytes} bytes");
            eprintln!(
                "ready after {polls_not_ready} not-ready answers; view of {} owners, {bytes} bytes",
                view.owners.len()
            );
            break;
        }
        assert_eq!(status, 503, "{body}");
        polls_not_ready += 1;
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_stream_broken_mid_way_keeps_the_session_for_a_retry() {
    use gatesvr_proto::peer::HandoverRequest;
    use gatesvr_proto::peer::peer_client::PeerClient;
    let cluster = TestCluster::start(2, |_| {}).await;
    let client = Client::connect(cluster.client_config(0, "broken"))
        .await
        .unwrap();
    assert!(matches!(next(&client).await, Event::Connected { .. }));
    let mut gw = cluster.gateway(0).await;
    for n in 1..=PUSHES {
        gw.push_to_client(big("broken", n, false)).await.unwrap();
    }
    let old = cluster.dps[0].node().clone();
    let entry = old.registry.get("broken").unwrap();
    let held = entry.state.lock().epoch();
    assert!(held > 0);
    let request = HandoverRequest {
        openid: "broken".into(),
        session_id: entry.identity.session_id.clone(),
        epoch: held + 1,
        new_owner: "dp-2".into(),
    };
    let mut peer = PeerClient::connect(format!("http://{}", cluster.dps[0].grpc_addr()))
        .await
        .unwrap();
    // The new owner reads the first chunk, then the stream breaks.
    let mut stream = peer
        .handover_stream(request.clone())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first chunk");
    let first_pushes = first.state.as_ref().map_or(0, |s| s.pushes.len()) as u64;
    assert!(
        first.found && first_pushes < PUSHES,
        "more chunks were to follow"
    );
    drop(stream);
    // Its retry (the same claim, the same epoch) gets the session whole.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let whole = loop {
        let mut stream = peer
            .handover_stream(request.clone())
            .await
            .unwrap()
            .into_inner();
        let mut chunks = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            chunks.push(chunk);
        }
        let answer = gatesvr_dataplane::cluster::join_handover(chunks);
        if answer.found {
            break answer.state.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broken handover lost the session: neither node holds it"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(whole.pushes.len() as u64, PUSHES, "every push, once");
    let seqs: Vec<u64> = whole.pushes.iter().map(|p| p.seq_id).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "in order, no gap"
    );
    assert_eq!(
        old.metrics
            .handovers
            .with_label_values(&["stream_broken"])
            .get(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_stages_a_session_over_the_message_limit_in_chunks() {
    // 1,024 pushes of 17 KB: a state over MAX_MESSAGE_BYTES (16 MiB), which
    // one Stage message could not carry (4 KB pushes make 4 MiB: under it).
    const BIG_PUSH: usize = 17 << 10;
    let cluster = TestCluster::start(2, |cfg| {
        cfg.server.max_queue_bytes = 32 << 20;
    })
    .await;
    let client = Client::connect(cluster.client_config(0, "staged"))
        .await
        .unwrap();
    assert!(matches!(next(&client).await, Event::Connected { .. }));
    let mut gw = cluster.gateway(0).await;
    for n in 1..=PUSHES {
        let push = PushToClientRequest {
            data: vec![(n % 251) as u8; BIG_PUSH].into(),
            ..push("staged", n)
        };
        gw.push_to_client(push).await.unwrap();
    }
    let exported = cluster.dps[0]
        .node()
        .registry
        .get("staged")
        .unwrap()
        .state
        .lock()
        .export();
    assert!(
        exported.encoded_len() > gatesvr_proto::limits::MAX_MESSAGE_BYTES,
        "the state ({} bytes) is over the message limit",
        exported.encoded_len()
    );
    let report = cluster.dps[0].drain().await;
    assert_eq!(report.staged, 1, "{report:?}");
    let successor = cluster.dps[1].node().clone();
    let staged = successor.registry.get("staged").expect("staged on dp-2");
    let state = staged.state.lock().export();
    assert_eq!(state.pushes.len() as u64, PUSHES, "every push, once");
    assert!(
        state
            .pushes
            .iter()
            .enumerate()
            .all(|(i, p)| p.seq_id == i as u64 + 1 && p.data.len() == BIG_PUSH),
        "in order, whole"
    );
}
