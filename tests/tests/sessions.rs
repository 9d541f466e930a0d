//! One data-plane node, real QUIC on 127.0.0.1: the session protocol end to
//! end, through the SDK and through raw frames (docs/protocol.md).

use std::time::Duration;

use gatesvr_proto::client::{
    ClientAck, ClientRequest, ErrorCode, HeartbeatRequest, ResumeStatus, envelope::Body,
};
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_proto::upstream::{PushToClientRequest, TargetType};
use gatesvr_sdk::{Client, Event};
use gatesvr_tests::{TestNode, eventually};

async fn gateway(node: &TestNode) -> GatewayServiceClient<tonic::transport::Channel> {
    GatewayServiceClient::connect(format!("http://{}", node.dp.grpc_addr()))
        .await
        .expect("gRPC connect")
}

fn push_to(openid: &str, n: u64) -> PushToClientRequest {
    PushToClientRequest {
        target_type: TargetType::Openid as i32,
        target_id: openid.into(),
        msg_type: "chat".into(),
        content: format!("message {n}"),
        data: n.to_be_bytes().to_vec().into(),
        durable: false,
    }
}

/// Next push event, skipping connection events.
async fn next_push(client: &Client) -> gatesvr_sdk::Push {
    loop {
        let event = tokio::time::timeout(gatesvr_tests::PATIENCE, client.next_event())
            .await
            .expect("an event")
            .expect("client open");
        if let Event::Push(p) = event {
            return p;
        }
    }
}

#[tokio::test]
async fn request_response_through_sdk() {
    let node = TestNode::start(|_| {}).await;
    let client = Client::connect(node.client_config("alice")).await.unwrap();
    let r = client.request(7, "hello").await.unwrap();
    assert_eq!(r.msg_id, 7);
    assert_eq!(r.seq_id, 1);
    assert_eq!(&r.payload[..], b"hello");
    assert_eq!(r.zone, gatesvr_proto::zone::zone_of("alice", 6));
    assert_eq!(client.zone(), r.zone);
    let r2 = client.request(7, "again").await.unwrap();
    assert_eq!(r2.seq_id, 2);
    client.stop().await;
}

#[tokio::test]
async fn thousand_pushes_in_order_and_acked() {
    let node = TestNode::start(|_| {}).await;
    let client = Client::connect(node.client_config("bob")).await.unwrap();
    let mut gw = gateway(&node).await;
    let pusher = tokio::spawn(async move {
        for n in 1..=1000u64 {
            let r = gw
                .push_to_client(push_to("bob", n))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.seq_id, n, "seq assigned in order");
        }
    });
    for n in 1..=1000u64 {
        let p = next_push(&client).await;
        assert_eq!(p.seq_id, n);
        assert_eq!(p.content, format!("message {n}"));
    }
    pusher.await.unwrap();
    let entry = node.dp.node().registry.get("bob").unwrap();
    eventually("all 1000 pushes acked", || {
        entry.state.lock().stats().acked_seq_id == 1000
    })
    .await;
    assert_eq!(entry.state.lock().stats().unacked, 0);
}

#[tokio::test]
async fn connection_loss_resumes_every_push_exactly_once_in_order() {
    let node = TestNode::start(|_| {}).await;
    let client = Client::connect(node.client_config("carol")).await.unwrap();
    let mut gw = gateway(&node).await;
    for n in 1..=300u64 {
        gw.push_to_client(push_to("carol", n)).await.unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen.push(next_push(&client).await.seq_id);
    }
    // Drop the connection mid-stream; pushes keep coming while it is down.
    client.simulate_disconnect();
    for n in 301..=600u64 {
        gw.push_to_client(push_to("carol", n)).await.unwrap();
    }
    let mut resumed = false;
    while seen.len() < 600 {
        match tokio::time::timeout(gatesvr_tests::PATIENCE, client.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Push(p) => seen.push(p.seq_id),
            Event::Connected { status, .. } => {
                assert_eq!(status, ResumeStatus::Resumed);
                resumed = true;
            }
            Event::ResumeFailed { status, .. } => panic!("resume failed: {status:?}"),
            _ => {}
        }
    }
    assert!(resumed, "the client reconnected and resumed");
    assert_eq!(
        seen,
        (1..=600).collect::<Vec<_>>(),
        "exactly once, in order"
    );
    let m = node.metrics().await;
    assert!(m.get("gatesvr_session_starts_total", &[("status", "resumed")]) >= 1.0);
}

#[tokio::test]
async fn duplicate_request_seq_is_executed_once() {
    let node = TestNode::start(|_| {}).await;
    let mut raw = node.started_raw("dave").await;
    let req = ClientRequest {
        msg_id: 3,
        seq_id: 1,
        payload: b"once".to_vec(),
        ..Default::default()
    };
    // A retry while the first is in flight: one execution, whose answer
    // arrives once (it goes to whichever connection is attached).
    raw.send(Body::Request(req.clone())).await;
    raw.send(Body::Request(req.clone())).await;
    let mut answers = Vec::new();
    while answers.is_empty() {
        if let Some(Body::Response(r)) = raw.recv().await {
            answers.push(r);
        }
    }
    // A retry after the answer: the cached answer, not a second execution.
    raw.send(Body::Request(req)).await;
    while answers.len() < 2 {
        if let Some(Body::Response(r)) = raw.recv().await {
            answers.push(r);
        }
    }
    assert_eq!(answers[0], answers[1], "the retry gets the cached answer");
    assert_eq!(answers[0].payload, b"once");
    let zone = gatesvr_proto::zone::zone_of("dave", 6);
    let m = node.metrics().await;
    assert_eq!(
        m.get(
            "gatesvr_requests_total",
            &[("zone", &zone), ("outcome", "ok")]
        ),
        1.0,
        "executed once"
    );
    // Far outside the window: a clear error, not an execution.
    raw.send(Body::Request(ClientRequest {
        seq_id: 10_000,
        ..Default::default()
    }))
    .await;
    match raw.recv().await {
        Some(Body::Response(r)) => assert_eq!(r.code, ErrorCode::SeqOutOfWindow as i32),
        other => panic!("expected an out-of-window response, got {other:?}"),
    }
}

#[tokio::test]
async fn heartbeat_is_answered_with_both_timestamps() {
    let node = TestNode::start(|_| {}).await;
    let mut raw = node.started_raw("erin").await;
    raw.send(Body::Heartbeat(HeartbeatRequest {
        client_timestamp: 42,
    }))
    .await;
    match raw.recv().await {
        Some(Body::HeartbeatOk(hb)) => {
            assert_eq!(hb.client_timestamp, 42);
            assert!(hb.server_timestamp > 0);
        }
        other => panic!("expected HeartbeatResponse, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_frames_close_only_their_connection() {
    let node = TestNode::start(|_| {}).await;
    let bystander = Client::connect(node.client_config("frank")).await.unwrap();

    // Garbage after Start: BAD_FRAME.
    let mut raw = node.started_raw("mallory").await;
    raw.send_bytes(&[0x03, 0xff, 0xff, 0xff]).await;
    assert_eq!(raw.closed_with().await, Some(ErrorCode::BadFrame));

    // A length prefix beyond max_frame_size: FRAME_TOO_LARGE, before the body.
    let mut raw = node.raw().await;
    raw.send_bytes(&[0xff, 0xff, 0xff, 0x7f]).await;
    assert_eq!(raw.closed_with().await, Some(ErrorCode::FrameTooLarge));

    // A request before Start: PROTOCOL_VIOLATION.
    let mut raw = node.raw().await;
    raw.send(Body::Request(ClientRequest::default())).await;
    assert_eq!(raw.closed_with().await, Some(ErrorCode::ProtocolViolation));

    // An ack beyond anything sent: PROTOCOL_VIOLATION.
    let mut raw = node.started_raw("mallory2").await;
    raw.send(Body::Ack(ClientAck { acked_seq_id: 99 })).await;
    assert_eq!(raw.closed_with().await, Some(ErrorCode::ProtocolViolation));

    // The bystander never noticed.
    assert_eq!(
        &bystander.request(1, "still here").await.unwrap().payload[..],
        b"still here"
    );
    let m = node.metrics().await;
    assert!(m.get("gatesvr_protocol_errors_total", &[("code", "bad_frame")]) >= 1.0);
}

#[tokio::test]
async fn bad_and_expired_tokens_are_refused_with_codes() {
    let node = TestNode::start(|_| {}).await;
    let mut raw = node.raw().await;
    raw.start("grace", "v1.Z3JhY2U.9999999999.AAAA", "", 0)
        .await;
    match raw.recv().await {
        Some(Body::Error(e)) => assert_eq!(e.code, ErrorCode::Unauthenticated as i32),
        other => panic!("expected an Error frame, got {other:?}"),
    }
    assert_eq!(raw.closed_with().await, Some(ErrorCode::Unauthenticated));

    let expired = gatesvr_common::token::issue_at(&node.dir.secret, "grace", 1);
    let mut raw = node.raw().await;
    raw.start("grace", &expired, "", 0).await;
    assert_eq!(raw.closed_with().await, Some(ErrorCode::TokenExpired));

    let someone_else = node.dir.token("heidi");
    let mut raw = node.raw().await;
    raw.start("grace", &someone_else, "", 0).await;
    assert_eq!(raw.closed_with().await, Some(ErrorCode::OpenidMismatch));

    let err = Client::connect(node.client_config("grace").with_reconnect(false))
        .await
        .map(|_| ());
    assert!(err.is_ok(), "a valid token still works");
    let m = node.metrics().await;
    assert_eq!(
        m.get("gatesvr_auth_failures_total", &[("reason", "invalid")]),
        1.0
    );
    assert_eq!(
        m.get("gatesvr_auth_failures_total", &[("reason", "expired")]),
        1.0
    );
    assert_eq!(
        m.get(
            "gatesvr_auth_failures_total",
            &[("reason", "openid_mismatch")]
        ),
        1.0
    );
}

#[tokio::test]
async fn slow_consumer_at_the_queue_bound() {
    let node = TestNode::start(|c| c.server.max_queue = 8).await;
    let raw = node.started_raw("ivan").await;
    let mut gw = gateway(&node).await;
    for n in 1..=8 {
        gw.push_to_client(push_to("ivan", n)).await.unwrap();
    }
    // Never acked: the ninth push is refused, explicitly.
    let err = gw.push_to_client(push_to("ivan", 9)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert_eq!(raw.closed_with().await, Some(ErrorCode::SlowConsumer));
    // Nothing accepted is lost: a resume gets all eight.
    let session_id = node
        .dp
        .node()
        .registry
        .get("ivan")
        .unwrap()
        .identity
        .session_id
        .clone();
    let mut raw = node.raw().await;
    raw.start("ivan", &node.dir.token("ivan"), &session_id, 0)
        .await;
    match raw.recv().await {
        Some(Body::StartOk(ok)) => assert_eq!(ok.resume_status, ResumeStatus::Resumed as i32),
        other => panic!("expected StartResponse, got {other:?}"),
    }
    let mut seqs = Vec::new();
    while seqs.len() < 8 {
        if let Some(Body::Push(p)) = raw.recv().await {
            seqs.push(p.seq_id);
        }
    }
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
}

#[tokio::test]
async fn unacked_pushes_are_retransmitted_then_the_connection_closes() {
    let node = TestNode::start(|c| {
        c.server.ack_timeout = Duration::from_millis(200);
        c.server.max_retries = 2;
    })
    .await;
    let mut raw = node.started_raw("judy").await;
    gateway(&node)
        .await
        .push_to_client(push_to("judy", 1))
        .await
        .unwrap();
    let mut deliveries = Vec::new();
    while let Some(body) = raw.recv().await {
        if let Body::Push(p) = body {
            deliveries.push((p.seq_id, p.redelivery));
        }
    }
    assert_eq!(
        deliveries,
        vec![(1, false), (1, true), (1, true)],
        "sent, then max_retries retransmits"
    );
    assert_eq!(raw.closed_with().await, Some(ErrorCode::AckTimeout));
}

/// `server.push_coalesce` (its longest, 1 s: the checks below end a hold
/// sooner, by the ack or a full datagram), holding whatever the node's load
/// (`push_coalesce_busy` 0): a push to a session with nothing in flight is
/// written at once; one behind an unacked push waits for the ack; a
/// datagram's worth goes without it.
#[tokio::test]
async fn coalesced_pushes_wait_for_the_ack_or_a_full_datagram() {
    let node = TestNode::start(|c| {
        c.server.push_coalesce = Duration::from_secs(1);
        c.server.push_coalesce_busy = 0.0;
    })
    .await;
    let mut raw = node.started_raw("lena").await;
    let mut gw = gateway(&node).await;
    fn seq(body: Option<Body>) -> u64 {
        match body {
            Some(Body::Push(p)) => p.seq_id,
            other => panic!("expected a push, got {other:?}"),
        }
    }
    gw.push_to_client(push_to("lena", 1)).await.unwrap();
    assert_eq!(seq(raw.recv().await), 1, "nothing in flight: at once");
    gw.push_to_client(push_to("lena", 2)).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), raw.recv())
            .await
            .is_err(),
        "push 2 waits while push 1 is unacked"
    );
    raw.send(Body::Ack(ClientAck { acked_seq_id: 1 })).await;
    assert_eq!(seq(raw.recv().await), 2, "the ack ends the hold");
    // Push 2 is unacked; 20 pushes of 100 bytes (more than a datagram)
    // queued together are written without waiting for its ack.
    let pushes = (3..=22)
        .map(|n| PushToClientRequest {
            data: vec![n as u8; 100].into(),
            ..push_to("lena", n)
        })
        .collect();
    gw.push_batch(gatesvr_proto::upstream::PushBatchRequest {
        pushes,
        codes_only: true,
    })
    .await
    .unwrap();
    let mut seqs = Vec::with_capacity(20);
    for _ in 3..=22 {
        seqs.push(seq(raw.recv().await));
    }
    assert_eq!(seqs, (3..=22).collect::<Vec<u64>>());
    let holds = node.metrics().await.get("gatesvr_push_holds_total", &[]);
    assert!(holds >= 1.0, "the hold of push 2 is counted: {holds}");
    assert_eq!(coalescing(&node).await, Some(true), "/stats says so");
}

/// `/stats` `runtime.push_coalescing`.
async fn coalescing(node: &TestNode) -> Option<bool> {
    let (_, body) = gatesvr_tests::http_get(node.dp.http_addr(), "/stats").await;
    let stats: serde_json::Value = serde_json::from_str(&body).expect("/stats is JSON");
    stats["runtime"]["push_coalescing"].as_bool()
}

/// At the default `push_coalesce_busy` (0.9) an idle node holds nothing: a
/// push behind an unacked one is written at once, and no hold is counted.
#[tokio::test]
async fn an_idle_node_does_not_hold_pushes() {
    let node = TestNode::start(|c| c.server.push_coalesce = Duration::from_secs(1)).await;
    let mut raw = node.started_raw("mia").await;
    let mut gw = gateway(&node).await;
    // Start-up and the handshakes (a debug build's TLS) keep this runtime
    // busy for a while: wait for a sample that reads it idle.
    let deadline = tokio::time::Instant::now() + gatesvr_tests::PATIENCE;
    while node.metrics().await.get("gatesvr_runtime_busy_ratio", &[]) >= 0.5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never idles"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in 1..=3 {
        gw.push_to_client(push_to("mia", n)).await.unwrap();
        match raw.recv().await {
            Some(Body::Push(p)) => assert_eq!(p.seq_id, n),
            other => panic!("expected push {n}, got {other:?}"),
        }
    }
    let m = node.metrics().await;
    assert_eq!(
        m.get("gatesvr_push_holds_total", &[]),
        0.0,
        "pushes 2 and 3 followed unacked ones and were not held"
    );
    assert_eq!(coalescing(&node).await, Some(false), "/stats says so");
}

#[tokio::test]
async fn expired_session_is_reported_on_resume() {
    let node = TestNode::start(|c| c.server.session_timeout = Duration::from_millis(200)).await;
    let mut raw = node.raw().await;
    raw.start("ken", &node.dir.token("ken"), "", 0).await;
    let session_id = match raw.recv().await {
        Some(Body::StartOk(ok)) => ok.session_id,
        other => panic!("expected StartResponse, got {other:?}"),
    };
    gateway(&node)
        .await
        .push_to_client(push_to("ken", 1))
        .await
        .unwrap();
    raw.conn.close(0u32.into(), b"bye");
    let registry = &node.dp.node().registry;
    eventually("the session expires", || registry.get("ken").is_none()).await;

    let mut raw = node.raw().await;
    raw.start("ken", &node.dir.token("ken"), &session_id, 0)
        .await;
    match raw.recv().await {
        Some(Body::StartOk(ok)) => {
            assert_eq!(ok.resume_status, ResumeStatus::SessionExpired as i32);
            assert!(!ok.resumed);
            assert_ne!(ok.session_id, session_id);
        }
        other => panic!("expected StartResponse, got {other:?}"),
    }
    let m = node.metrics().await;
    assert_eq!(
        m.get("gatesvr_pushes_lost_total", &[("reason", "expired")]),
        1.0
    );
}

/// A batch's pushes that carry the same message share one encoded body on
/// the node; pushes that differ in any of type, content or payload do not.
/// Each client must get exactly what was pushed to it, in order: a field
/// left out of the comparison would deliver the previous push's message.
#[tokio::test]
async fn pushes_with_the_same_message_in_a_batch_each_arrive_whole() {
    let node = TestNode::start(|c| c.server.max_frame_size = 64 * 1024).await;
    let (a, b) = (
        Client::connect(node.client_config("share-a"))
            .await
            .unwrap(),
        Client::connect(node.client_config("share-b"))
            .await
            .unwrap(),
    );
    let push = |openid: &str, msg_type: &str, content: &str, data: &[u8]| PushToClientRequest {
        target_type: TargetType::Openid as i32,
        target_id: openid.into(),
        msg_type: msg_type.into(),
        content: content.into(),
        data: data.to_vec().into(),
        durable: false,
    };
    let big = vec![7u8; 70 * 1024];
    let pushes = vec![
        push("share-a", "t", "c", b"d"),
        push("share-b", "t", "c", b"d"),
        push("share-a", "t", "c", b"d"),
        push("share-a", "t", "c2", b"d"),
        push("share-a", "t2", "c2", b"d"),
        push("share-a", "t2", "c2", b"e"),
        // Too large for the clients, twice: each refused on its own, and
        // the next push is encoded afresh.
        push("share-a", "t2", "c2", &big),
        push("share-a", "t2", "c2", &big),
        push("share-b", "t2", "c2", b"e"),
    ];
    let sent = pushes.clone();
    let codes = gateway(&node)
        .await
        .push_batch(gatesvr_proto::upstream::PushBatchRequest {
            pushes,
            codes_only: true,
        })
        .await
        .unwrap()
        .into_inner()
        .codes;
    let too_large = tonic::Code::InvalidArgument as i32;
    assert_eq!(codes, vec![0, 0, 0, 0, 0, 0, too_large, too_large, 0]);
    for (i, p) in sent.iter().enumerate().filter(|(i, _)| codes[*i] == 0) {
        let client = if p.target_id == "share-a" { &a } else { &b };
        let got = next_push(client).await;
        assert_eq!(
            (got.msg_type.as_str(), got.content.as_str(), &got.data[..]),
            (p.msg_type.as_str(), p.content.as_str(), &p.data[..]),
            "push {i}"
        );
    }
}

#[tokio::test]
async fn push_batch_queues_each_push_on_its_own() {
    let node = TestNode::start(|_| {}).await;
    let client = Client::connect(node.client_config("batcher"))
        .await
        .unwrap();
    let mut gw = gateway(&node).await;
    let results = gw
        .push_batch(gatesvr_proto::upstream::PushBatchRequest {
            pushes: vec![
                push_to("batcher", 1),
                push_to("nobody", 2),
                push_to("batcher", 3),
            ],
            codes_only: false,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        vec![0, tonic::Code::NotFound as i32, 0],
        "{results:?}"
    );
    assert_eq!(
        (results[0].seq_id, results[2].seq_id),
        (1, 2),
        "in batch order"
    );
    assert_eq!(next_push(&client).await.content, "message 1");
    assert_eq!(next_push(&client).await.content, "message 3");
    // Codes only: a code per push, and only the refusal in full.
    let answer = gw
        .push_batch(gatesvr_proto::upstream::PushBatchRequest {
            pushes: vec![
                push_to("nobody", 4),
                push_to("batcher", 5),
                push_to("batcher", 6),
            ],
            codes_only: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.codes, vec![tonic::Code::NotFound as i32, 0, 0]);
    assert_eq!(answer.results.len(), 1, "{:?}", answer.results);
    assert_eq!(answer.results[0].code, tonic::Code::NotFound as i32);
    assert!(answer.results[0].message.contains("nobody"));
    assert_eq!(next_push(&client).await.content, "message 5");
    assert_eq!(next_push(&client).await.content, "message 6");
    let too_many = gatesvr_proto::upstream::PushBatchRequest {
        pushes: vec![push_to("batcher", 9); 1025],
        codes_only: false,
    };
    assert_eq!(
        gw.push_batch(too_many).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
}
