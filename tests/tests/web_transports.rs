//! One session across transports: WebSocket and native QUIC on one node
//! (docs/protocol.md §12). Pushes are acked, resumed from the last ack on the
//! other transport, and none is lost or processed twice; a retried request is
//! answered from the session, not executed again.

use gatesvr_proto::client::{
    ClientAck, ClientRequest, ErrorCode, ResumeStatus, StartResponse, envelope::Body,
};
use gatesvr_sdk::{Client, Event};
use gatesvr_tests::cluster::push_messages;
use gatesvr_tests::web::WsConn;
use gatesvr_tests::{PATIENCE, TestNode, eventually};
use tokio_tungstenite::tungstenite::Message;

async fn web_node() -> TestNode {
    TestNode::start(|c| c.transports.websocket_addr = Some("127.0.0.1:0".into())).await
}

async fn ws(node: &TestNode) -> WsConn {
    let addr = node.dp.websocket_addr().expect("WebSocket listener");
    WsConn::connect(addr, &node.dir.ca()).await
}

/// What a client application saw: pushes processed in seq order, each once
/// (docs/protocol.md §6: drop any seq at or below the last processed).
#[derive(Default)]
struct App {
    processed: Vec<u64>,
    /// The highest ack the server has seen.
    acked: u64,
    /// Pushes delivered again although acked (must stay 0).
    acked_then_redelivered: u64,
}

impl App {
    fn take(&mut self, seq: u64, content: &str) {
        if seq <= self.acked {
            self.acked_then_redelivered += 1;
        }
        if self.processed.last().is_some_and(|&last| seq <= last) {
            return;
        }
        assert_eq!(content, format!("message {seq}"), "payload of seq {seq}");
        self.processed.push(seq);
    }
    fn last(&self) -> u64 {
        self.processed.last().copied().unwrap_or(0)
    }
}

fn start_ok(body: Option<Body>) -> StartResponse {
    match body {
        Some(Body::StartOk(ok)) => ok,
        other => panic!("expected StartResponse, got {other:?}"),
    }
}

#[tokio::test]
async fn a_websocket_session_resumes_over_native_quic_and_back() {
    let node = web_node().await;
    let token = node.dir.token("alice");
    let mut app = App::default();

    // 1. WebSocket: a new session, 20 pushes, only the first 10 acked.
    let mut socket = ws(&node).await;
    socket.start("alice", &token, "", 0).await;
    let ok = start_ok(socket.recv().await);
    assert_eq!(ok.resume_status, ResumeStatus::New as i32);
    let session_id = ok.session_id;
    push_messages(node.dp.grpc_addr(), "alice", 1..=20).await;
    while app.last() < 20 {
        if let Some(Body::Push(p)) = socket.recv().await {
            app.take(p.seq_id, &p.content);
            if p.seq_id == 10 {
                socket.send(Body::Ack(ClientAck { acked_seq_id: 10 })).await;
                app.acked = 10;
            }
        }
    }
    socket
        .send(Body::Request(ClientRequest {
            msg_id: 5,
            seq_id: 1,
            payload: b"once".to_vec(),
            ..Default::default()
        }))
        .await;
    loop {
        match socket.recv().await {
            Some(Body::Response(r)) => {
                assert_eq!((r.seq_id, &r.payload[..]), (1, &b"once"[..]));
                break;
            }
            Some(_) => {}
            None => panic!("WebSocket closed before the response"),
        }
    }
    eventually("the ack of 10 reached the session", || {
        node.dp
            .node()
            .registry
            .get("alice")
            .is_some_and(|e| e.state.lock().stats().unacked == 10)
    })
    .await;
    drop(socket); // the network goes away; the session stays

    // 2. Native QUIC resumes from the ack: 11..=20 again, then new ones.
    let mut raw = node.raw().await;
    raw.start("alice", &token, &session_id, 10).await;
    let ok = start_ok(raw.recv().await);
    assert_eq!(ok.resume_status, ResumeStatus::Resumed as i32);
    assert_eq!(ok.session_id, session_id);
    assert_eq!(ok.first_available_seq_id, 11);
    push_messages(node.dp.grpc_addr(), "alice", 21..=30).await;
    let mut redelivered = Vec::new();
    while app.last() < 30 {
        if let Some(Body::Push(p)) = raw.recv().await {
            if p.seq_id <= 20 {
                assert!(p.redelivery, "seq {} is a redelivery", p.seq_id);
                redelivered.push(p.seq_id);
            }
            app.take(p.seq_id, &p.content);
        }
    }
    assert_eq!(redelivered, (11..=20).collect::<Vec<_>>());
    raw.send(Body::Ack(ClientAck { acked_seq_id: 30 })).await;
    app.acked = 30;
    // A retry of request 1 (its answer was received, but a client cannot
    // always know that) gets the stored answer.
    raw.send(Body::Request(ClientRequest {
        msg_id: 5,
        seq_id: 1,
        payload: b"once".to_vec(),
        ..Default::default()
    }))
    .await;
    loop {
        if let Some(Body::Response(r)) = raw.recv().await {
            assert_eq!((r.seq_id, &r.payload[..]), (1, &b"once"[..]));
            break;
        }
    }
    eventually("the ack of 30 reached the session", || {
        node.dp
            .node()
            .registry
            .get("alice")
            .is_some_and(|e| e.state.lock().stats().unacked == 0)
    })
    .await;
    drop(raw);

    // 3. Back to WebSocket: nothing is redelivered, new pushes follow.
    let mut socket = ws(&node).await;
    socket.start("alice", &token, &session_id, 30).await;
    let ok = start_ok(socket.recv().await);
    assert_eq!(ok.resume_status, ResumeStatus::Resumed as i32);
    push_messages(node.dp.grpc_addr(), "alice", 31..=40).await;
    while app.last() < 40 {
        if let Some(Body::Push(p)) = socket.recv().await {
            assert!(!p.redelivery, "seq {} was acked before", p.seq_id);
            app.take(p.seq_id, &p.content);
        }
    }
    socket.send(Body::Ack(ClientAck { acked_seq_id: 40 })).await;

    assert_eq!(
        app.processed,
        (1..=40).collect::<Vec<_>>(),
        "none lost or processed twice"
    );
    assert_eq!(
        app.acked_then_redelivered, 0,
        "nothing acked is delivered again"
    );
    let m = node.metrics().await;
    let executed = m.get(
        "gatesvr_requests_total",
        &[
            ("outcome", "ok"),
            ("zone", &gatesvr_proto::zone::zone_of("alice", 6)),
        ],
    );
    assert_eq!(executed, 1.0, "the retried request ran once");
    assert_eq!(
        m.get(
            "gatesvr_transport_connections",
            &[("transport", "websocket")]
        ),
        1.0
    );
}

#[tokio::test]
async fn an_sdk_session_over_quic_resumes_over_websocket() {
    let node = web_node().await;
    let config = node
        .client_config("bob")
        .with_reconnect(false)
        .with_request_timeout(PATIENCE);
    let client = Client::connect(config).await.expect("SDK connects");
    push_messages(node.dp.grpc_addr(), "bob", 1..=8).await;
    let mut app = App::default();
    while app.last() < 8 {
        let event = tokio::time::timeout(PATIENCE, client.next_event())
            .await
            .expect("an event")
            .expect("client open");
        if let Event::Push(p) = event {
            app.take(p.seq_id, &p.content);
        }
    }
    let response = client.request(1, "from quic").await.expect("answered");
    assert_eq!(response.seq_id, 1);
    let session_id = client.session_id();
    let last_acked = client.last_acked_seq_id();
    drop(client); // abrupt: no Stop

    push_messages(node.dp.grpc_addr(), "bob", 9..=12).await;
    let mut socket = ws(&node).await;
    socket
        .start("bob", &node.dir.token("bob"), &session_id, last_acked)
        .await;
    let ok = start_ok(socket.recv().await);
    assert_eq!(ok.resume_status, ResumeStatus::Resumed as i32);
    while app.last() < 12 {
        if let Some(Body::Push(p)) = socket.recv().await {
            app.take(p.seq_id, &p.content);
        }
    }
    socket.send(Body::Ack(ClientAck { acked_seq_id: 12 })).await;
    // The session's request numbering carries over: seq 2 is new work.
    socket
        .send(Body::Request(ClientRequest {
            msg_id: 1,
            seq_id: 2,
            payload: b"from websocket".to_vec(),
            ..Default::default()
        }))
        .await;
    loop {
        match socket.recv().await {
            Some(Body::Response(r)) => {
                assert_eq!((r.seq_id, r.code), (2, ErrorCode::Ok as i32));
                break;
            }
            Some(_) => {}
            None => panic!("closed before the response"),
        }
    }
    assert_eq!(app.processed, (1..=12).collect::<Vec<_>>(), "none lost");
    eventually("every push acked", || {
        node.dp
            .node()
            .registry
            .get("bob")
            .is_some_and(|e| e.state.lock().stats().unacked == 0)
    })
    .await;
}

#[tokio::test]
async fn a_websocket_is_replaced_by_a_quic_connection_with_a_code() {
    let node = web_node().await;
    let token = node.dir.token("carol");
    let mut socket = ws(&node).await;
    socket.start("carol", &token, "", 0).await;
    let session_id = start_ok(socket.recv().await).session_id;

    let mut raw = node.raw().await;
    raw.start("carol", &token, &session_id, 0).await;
    assert_eq!(
        start_ok(raw.recv().await).resume_status,
        ResumeStatus::Resumed as i32
    );
    // The browser cannot read a QUIC close code: an Error frame comes first,
    // then the close frame carries 4000 + code.
    match socket.recv().await {
        Some(Body::Error(e)) => {
            assert_eq!(e.code, ErrorCode::SessionReplaced as i32);
            assert!(e.fatal);
        }
        other => panic!("expected Error(SESSION_REPLACED), got {other:?}"),
    }
    assert_eq!(socket.recv().await, None);
    assert_eq!(
        socket.close_code,
        Some(4000 + ErrorCode::SessionReplaced as u16)
    );
}

#[tokio::test]
async fn bad_websocket_input_gets_a_documented_error() {
    let node = web_node().await;
    // Text instead of binary.
    let mut socket = ws(&node).await;
    socket.send_message(Message::text("hello")).await;
    match socket.recv().await {
        Some(Body::Error(e)) => assert_eq!(e.code, ErrorCode::BadFrame as i32),
        other => panic!("expected Error(BAD_FRAME), got {other:?}"),
    }
    assert_eq!(socket.recv().await, None);
    assert_eq!(socket.close_code, Some(4000 + ErrorCode::BadFrame as u16));

    // A bad token.
    let mut socket = ws(&node).await;
    socket.start("dave", "not-a-token", "", 0).await;
    match socket.recv().await {
        Some(Body::Error(e)) => assert_eq!(e.code, ErrorCode::Unauthenticated as i32),
        other => panic!("expected Error(UNAUTHENTICATED), got {other:?}"),
    }
    assert_eq!(socket.recv().await, None);
    assert_eq!(
        socket.close_code,
        Some(4000 + ErrorCode::Unauthenticated as u16)
    );

    // The node stays up and counts what it refused.
    let mut socket = ws(&node).await;
    socket.start("dave", &node.dir.token("dave"), "", 0).await;
    start_ok(socket.recv().await);
    let m = node.metrics().await;
    assert_eq!(
        m.get(
            "gatesvr_connections_rejected_total",
            &[("reason", "bad_frame")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "gatesvr_connections_rejected_total",
            &[("reason", "unauthenticated")]
        ),
        1.0
    );
}

#[tokio::test]
async fn idle_websocket_listener_connections_are_closed() {
    let node = TestNode::start(|c| {
        c.transports.websocket_addr = Some("127.0.0.1:0".into());
        c.server.start_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    // Upgraded but silent: START_TIMEOUT, as on QUIC.
    let mut socket = ws(&node).await;
    match socket.recv().await {
        Some(Body::Error(e)) => assert_eq!(e.code, ErrorCode::StartTimeout as i32),
        other => panic!("expected Error(START_TIMEOUT), got {other:?}"),
    }
    assert_eq!(socket.recv().await, None);
    assert_eq!(
        socket.close_code,
        Some(4000 + ErrorCode::StartTimeout as u16)
    );

    // TLS up but no HTTP request at all: the listener lets go.
    let addr = node.dp.websocket_addr().expect("WebSocket listener");
    let tls = gatesvr_common::tls::client_config(&node.dir.ca()).expect("client TLS");
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("TCP");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut stream = connector.connect(name, tcp).await.expect("TLS");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
    )
    .await
    .expect("the server closes an idle connection");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed, nothing sent: {read:?}"
    );
}
