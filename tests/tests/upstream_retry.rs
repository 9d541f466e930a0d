//! The retry rules of docs/protocol.md §5, end to end: a real data-plane node
//! (QUIC, gRPC) and real tonic upstreams.
//!
//! Invariants checked:
//! - a request refused before it reached an upstream is not recorded: its
//!   retry with the same seq runs, once, and only that execution is replayed;
//! - a refused connection (instance killed) is retried on another healthy
//!   instance of the zone, so every request succeeds while a live one exists;
//! - a client never sees an instance address in an error message.

use std::time::Duration;

use gatesvr_dataplane::config::StaticZone;
use gatesvr_proto::client::envelope::Body;
use gatesvr_proto::client::{ClientRequest, ClientResponse, ErrorCode};
use gatesvr_sdk::Client;
use gatesvr_tests::{FakeUpstream, RawConn, TestNode};
use tokio_util::sync::CancellationToken;

/// Every zone served by these upstream addresses.
fn zones(addrs: &[std::net::SocketAddr]) -> Vec<StaticZone> {
    (0..6)
        .map(|z| StaticZone {
            zone: gatesvr_proto::zone::zone_id(z),
            addrs: addrs.iter().map(|a| a.to_string()).collect(),
        })
        .collect()
}

async fn request(raw: &mut RawConn, seq_id: u64, payload: &str) -> ClientResponse {
    raw.send(Body::Request(ClientRequest {
        msg_id: 7,
        seq_id,
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    }))
    .await;
    loop {
        match raw.recv().await {
            Some(Body::Response(r)) if r.seq_id == seq_id => return r,
            Some(Body::HeartbeatOk(_)) | Some(Body::Response(_)) => continue,
            other => panic!("expected the response to seq {seq_id}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_request_refused_as_overloaded_runs_when_retried_with_its_seq() {
    let fake = FakeUpstream::default();
    let stop = CancellationToken::new();
    let addr = fake.serve(stop.clone()).await;
    let node = TestNode::start_routed(|c| {
        c.upstream.health_check_interval = Duration::ZERO;
        c.zones.upstreams = zones(&[addr]);
        c.overload_protection.max_qps = 1;
        c.overload_protection.qps_window_seconds = 1;
    })
    .await;
    let mut raw = node.started_raw("ivy").await;

    // Find a seq the node refuses (the rate limit admits one per second).
    let mut refused = None;
    for seq in 1..=20 {
        let r = request(&mut raw, seq, &format!("p{seq}")).await;
        if r.code == ErrorCode::Overloaded as i32 {
            assert!(r.retry_after_ms > 0);
            refused = Some(seq);
            break;
        }
        assert_eq!(r.code, ErrorCode::Ok as i32, "{r:?}");
    }
    let seq = refused.expect("a burst of 20 exceeds max_qps 1");
    let executed_before = fake.executed();

    // Retry the same seq after the hint until the node admits it: it runs.
    let mut answer = None;
    for _ in 0..50 {
        let r = request(&mut raw, seq, &format!("p{seq}")).await;
        if r.code == ErrorCode::Overloaded as i32 {
            tokio::time::sleep(Duration::from_millis(u64::from(r.retry_after_ms))).await;
            continue;
        }
        answer = Some(r);
        break;
    }
    let answer =
        answer.expect("the retry of a refused seq is executed, not answered from a record");
    assert_eq!(answer.code, ErrorCode::Ok as i32, "{answer:?}");
    assert_eq!(answer.payload, format!("p{seq}").into_bytes());
    assert_eq!(fake.executed(), executed_before + 1, "executed once");

    // What was executed is what is replayed, without running again.
    let replay = request(&mut raw, seq, &format!("p{seq}")).await;
    assert_eq!(replay.code, ErrorCode::Ok as i32);
    assert_eq!(replay.payload, answer.payload);
    assert_eq!(
        fake.executed(),
        executed_before + 1,
        "a replay does not run"
    );
}

#[tokio::test]
async fn requests_succeed_while_one_of_two_instances_is_killed() {
    let (a, b) = (FakeUpstream::default(), FakeUpstream::default());
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let addr_a = a.serve(stop_a.clone()).await;
    let addr_b = b.serve(stop_b.clone()).await;
    // Default health checking (every 5 s, 3 failures): the killed instance
    // stays in rotation for the whole test unless requests route around it.
    let node = TestNode::start_routed(|c| c.zones.upstreams = zones(&[addr_a, addr_b])).await;
    let client = Client::connect(node.client_config("jay")).await.unwrap();
    for i in 0..10 {
        client.request(1, format!("warm-{i}")).await.unwrap();
    }

    stop_a.cancel();
    gatesvr_tests::eventually("the killed instance refuses connections", || {
        std::net::TcpStream::connect(addr_a).is_err()
    })
    .await;
    let executed_before = a.executed() + b.executed();
    for i in 0..30 {
        let payload = format!("after-{i}");
        match client.request(1, payload.clone()).await {
            Ok(r) => assert_eq!(&r.payload[..], payload.as_bytes()),
            Err(e) => panic!("request {i} after the kill failed: {e}"),
        }
    }
    assert_eq!(
        a.executed() + b.executed(),
        executed_before + 30,
        "each request executed exactly once"
    );
}

#[tokio::test]
async fn a_client_never_sees_an_instance_address() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let node = TestNode::start_routed(|c| {
        c.upstream.health_check_interval = Duration::ZERO;
        c.zones.upstreams = zones(&[dead]);
    })
    .await;
    let mut raw = node.started_raw("kim").await;
    let r = request(&mut raw, 1, "x").await;
    assert_eq!(r.code, ErrorCode::UpstreamUnavailable as i32, "{r:?}");
    // No address, IP or port, and no transport's or library's error text.
    for detail in [
        dead.port().to_string().as_str(),
        "127.0.0.1",
        "error",
        "refused",
        "tcp",
        "transport",
    ] {
        assert!(
            !r.message.to_lowercase().contains(detail),
            "the client's message names {detail:?}: {}",
            r.message
        );
    }
    assert!(r.message.starts_with("not executed"), "{}", r.message);
    // The detail is the operator's: counted by outcome (and logged).
    let refused = node.metrics().await.get(
        "gatesvr_upstream_requests_total",
        &[("zone", &r.zone), ("outcome", "unavailable")],
    );
    assert!(refused >= 1.0, "the refusal is counted: {refused}");
    // Not recorded: the same seq is tried again (and refused again).
    let again = request(&mut raw, 1, "x").await;
    assert_eq!(again.code, ErrorCode::UpstreamUnavailable as i32);
}
