//! Client-facing limits against a real `gatesvr dataplane` process, secure as
//! shipped (mTLS with role certificates on the push port):
//!
//! - the write deadline: 1,000 connections that stop reading lose their
//!   connection slots once their writes miss `server.write_timeout`, while
//!   other clients keep being served;
//! - the frame limit on pushes: an oversized push is refused to the upstream
//!   with INVALID_ARGUMENT and never queued, the session stays healthy;
//! - the Start rate limit per source address and per openid.
//!
//! Invariants are counted outcomes (metrics, close codes, clients served),
//! never durations.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use gatesvr_common::identity::Role;
use gatesvr_proto::client::{Envelope, ErrorCode, StartRequest, envelope::Body};
use gatesvr_proto::frame::{self, FrameDecoder};
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_proto::upstream::{BroadcastRequest, PushBatchRequest, PushToClientRequest};
use gatesvr_sdk::{Client, ClientConfig};
use gatesvr_tests::procs::{Proc, binary, free_port};
use gatesvr_tests::web::WsConn;
use gatesvr_tests::{Metrics, RawConn, TestDir, http_get, next_push};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const PATIENCE: Duration = Duration::from_secs(60);

/// A data-plane process and its ports.
struct Node {
    dir: TestDir,
    quic: u16,
    http: u16,
    grpc: u16,
    metrics: u16,
    _proc: Proc,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Node {
    /// Starts `gatesvr dataplane` (node dp-1, standalone) with `extra` YAML
    /// sections appended (`server:` keys go in `server_extra`).
    async fn start(server_extra: &str, extra: &str) -> Self {
        let gatesvr = binary("gatesvr", "gatesvr");
        let dir = TestDir::new();
        let root = dir.dir.path().to_path_buf();
        let (quic, http, grpc, metrics) = (free_port(), free_port(), free_port(), free_port());
        let c = dir.certs().display().to_string();
        let r = root.display();
        let yaml = format!(
            "node_id: dp-1\n\
             server:\n  quic_addr: 127.0.0.1:{quic}\n  http_addr: 127.0.0.1:{http}\n  grpc_addr: 127.0.0.1:{grpc}\n  metrics_addr: 127.0.0.1:{metrics}\n  cert_file: {c}/server.crt\n  key_file: {c}/server.key\n  grpc_tls: {{cert_file: {c}/dataplane-dp-1.crt, key_file: {c}/dataplane-dp-1.key, ca_file: {c}/ca.crt}}\n{server_extra}\
             auth:\n  secret_file: {r}/secret\n\
             upstream:\n  tls: {{ca_file: {c}/ca.crt}}\n\
             {extra}"
        );
        let path = root.join("dp.yaml");
        std::fs::write(&path, yaml).unwrap();
        let log = std::fs::File::create(root.join("dp.log")).unwrap();
        let child = std::process::Command::new(gatesvr)
            .args(["dataplane", "--config", path.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn gatesvr dataplane");
        let node = Self {
            dir,
            quic,
            http,
            grpc,
            metrics,
            _proc: Proc(child),
        };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while http_get(addr(node.http), "/ready").await.0 != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "data plane never ready; log:\n{}",
                node.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        node
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.dir.path().join("dp.log")).unwrap_or_default()
    }

    async fn metrics(&self) -> Metrics {
        Metrics::parse(&http_get(addr(self.metrics), "/metrics").await.1)
    }

    /// The push API as upstream `demo` (its role certificate).
    fn gateway(&self) -> GatewayServiceClient<Channel> {
        let f = gatesvr_common::certs::role_files(&self.dir.certs(), Role::Upstream, "demo");
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(self.dir.ca()).unwrap()))
            .domain_name("localhost")
            .identity(Identity::from_pem(
                std::fs::read(f.cert_file).unwrap(),
                std::fs::read(f.key_file).unwrap(),
            ));
        let channel = Endpoint::from_shared(format!("https://127.0.0.1:{}", self.grpc))
            .unwrap()
            .timeout(Duration::from_secs(30))
            .tls_config(tls)
            .unwrap()
            .connect_lazy();
        GatewayServiceClient::new(channel).max_decoding_message_size(64 << 20)
    }

    fn client(&self, openid: &str) -> ClientConfig {
        ClientConfig::new(addr(self.quic), openid, self.dir.token(openid))
            .with_ca_file(self.dir.ca())
            .with_request_timeout(Duration::from_secs(10))
    }

    /// Polls the metrics until `cond` holds.
    async fn wait_metrics(&self, what: &str, cond: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let m = self.metrics().await;
            if cond(&m) {
                return m;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {what}; metrics: {:?}",
                m.samples
                    .iter()
                    .filter(|(k, _)| k.contains("write_timeouts")
                        || k.contains("connections_closed")
                        || k.contains("active_connections"))
                    .filter(|(_, v)| **v > 0.0)
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn push(openid: &str, content: String) -> PushToClientRequest {
    PushToClientRequest {
        target_id: openid.into(),
        msg_type: "t".into(),
        content,
        ..Default::default()
    }
}

/// A QUIC client endpoint whose connections grant the server `window` bytes
/// of receive credit and never more: once the client stops reading, the
/// server's writes block on flow control.
fn stingy_endpoint(ca: &Path, window: u32) -> quinn::Endpoint {
    let mut tls = gatesvr_common::tls::client_config(ca).expect("client TLS");
    tls.alpn_protocols = vec![gatesvr_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(window.into())
        .receive_window(window.into());
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("UDP");
    endpoint.set_default_client_config(config);
    endpoint
}

/// A connection that sent Start and read the StartResponse, then stops reading.
struct Stalled {
    conn: quinn::Connection,
    _send: quinn::SendStream,
    _recv: quinn::RecvStream,
}

async fn stall(endpoint: &quinn::Endpoint, node: &Node, openid: &str, token: &str) -> Stalled {
    let conn = endpoint
        .connect(addr(node.quic), "localhost")
        .unwrap()
        .await
        .expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let mut buf = BytesMut::new();
    frame::encode(
        &Envelope {
            body: Some(Body::Start(StartRequest {
                openid: openid.into(),
                auth_token: token.into(),
                ..Default::default()
            })),
        },
        &mut buf,
    );
    send.write_all(&buf).await.expect("Start sent");
    if !token.is_empty() {
        // Read the StartResponse (it fits the window), then nothing more.
        let mut decoder = FrameDecoder::new(frame::DEFAULT_MAX_FRAME_SIZE);
        loop {
            if let Some(f) = decoder.next_frame().expect("valid frame") {
                assert!(matches!(f.body, Some(Body::StartOk(_))), "{:?}", f.body);
                break;
            }
            let chunk = recv
                .read_chunk(1024, true)
                .await
                .expect("read")
                .expect("StartResponse");
            decoder.extend(&chunk.bytes);
        }
    }
    Stalled {
        conn,
        _send: send,
        _recv: recv,
    }
}

fn close_code(conn: &quinn::Connection) -> Option<ErrorCode> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c) => {
            ErrorCode::try_from(c.error_code.into_inner() as i32).ok()
        }
        _ => None,
    }
}

const STALLED: usize = 1000;
/// Before-Start stalls: an invalid token, and no credit for the Error frame.
const STALLED_AT_START: usize = 20;
/// Connection slots besides the stalled ones.
const SPARE_SLOTS: usize = 5;
/// Normal clients served after the stalled ones were closed (more than the spare slots).
const LATER_CLIENTS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_lose_their_slots_and_others_are_served() {
    // Silence is not what closes them here: setting up 1,000 connections on a
    // loaded machine may take longer than the default heartbeat_timeout.
    let node = Node::start(
        "  write_timeout: 2s\n  heartbeat_timeout: 10m\n",
        &format!(
            "overload_protection:\n  max_connections: {}\n  start_rate_per_address: 0\n",
            STALLED + STALLED_AT_START + SPARE_SLOTS
        ),
    )
    .await;
    let ca = node.dir.ca();
    let endpoint = stingy_endpoint(&ca, 2048);
    let no_credit = stingy_endpoint(&ca, 0);

    // 1,000 sessions whose clients read their StartResponse and then stop.
    let mut stalled = Vec::with_capacity(STALLED);
    for chunk in (0..STALLED).collect::<Vec<_>>().chunks(50) {
        let batch = futures::future::join_all(chunk.iter().map(|i| {
            let openid = format!("slow-{i}");
            let token = node.dir.token(&openid);
            let endpoint = &endpoint;
            let node = &node;
            async move { stall(endpoint, node, &openid, &token).await }
        }))
        .await;
        stalled.extend(batch);
    }
    // And some that never authenticate and give no credit for the Error frame.
    let mut at_start = Vec::new();
    for _ in 0..STALLED_AT_START {
        at_start.push(stall(&no_credit, &node, "nobody", "").await);
    }
    // One push each, larger than the credit the client gives: every write blocks.
    let mut gateway = node.gateway();
    let mut queued = 0;
    for chunk in (0..STALLED).collect::<Vec<_>>().chunks(100) {
        let pushes = chunk
            .iter()
            .map(|i| push(&format!("slow-{i}"), "x".repeat(16 * 1024)))
            .collect();
        let results = gateway
            .push_batch(PushBatchRequest {
                pushes,
                codes_only: false,
            })
            .await
            .expect("push batch")
            .into_inner()
            .results;
        queued += results.iter().filter(|r| r.code == 0).count();
    }
    assert_eq!(queued, STALLED, "every stalled session took its push");

    // Other clients are served meanwhile (a spare slot, whatever the timing).
    let mut first = node.client("normal-0");
    first.connect_timeout = PATIENCE;
    let served = Client::connect(first)
        .await
        .expect("a normal client connects while 1,020 connections are stalled");
    gateway
        .push_to_client(push("normal-0", "hello".into()))
        .await
        .expect("push to the normal client");
    let p = next_push(&served)
        .await
        .expect("normal client gets its push");
    assert_eq!(p.content, "hello");

    // Every stalled write missed the deadline and its connection was closed.
    let m = node
        .wait_metrics("every stalled connection hit the write deadline", |m| {
            m.get(
                "gatesvr_client_write_timeouts_total",
                &[("transport", "quic"), ("phase", "session")],
            ) >= STALLED as f64
                && m.get(
                    "gatesvr_client_write_timeouts_total",
                    &[("transport", "quic"), ("phase", "start")],
                ) >= STALLED_AT_START as f64
        })
        .await;
    let closed_slow = m.get(
        "gatesvr_connections_closed_total",
        &[("code", "slow_consumer")],
    );
    assert!(closed_slow >= STALLED as f64, "{closed_slow}");
    // The stalled clients were told why in the QUIC close code: SLOW_CONSUMER
    // after Start; before it, the Start's own refusal (its Error frame could
    // not be delivered).
    for s in stalled.iter().chain(&at_start) {
        let _ = tokio::time::timeout(PATIENCE, s.conn.closed()).await;
    }
    let slow_consumer = stalled
        .iter()
        .filter(|s| close_code(&s.conn) == Some(ErrorCode::SlowConsumer))
        .count();
    assert_eq!(slow_consumer, STALLED);
    let refused = at_start
        .iter()
        .filter(|s| close_code(&s.conn) == Some(ErrorCode::Unauthenticated))
        .count();
    assert_eq!(refused, STALLED_AT_START);

    // Their slots are free: more clients than the spare slots connect at once.
    // (Held together to the end; connected ten at a time so a loaded machine
    // does not turn the test into one about handshake latency.)
    let mut later = Vec::new();
    for chunk in (1..=LATER_CLIENTS).collect::<Vec<_>>().chunks(10) {
        later.extend(
            futures::future::join_all(chunk.iter().map(|i| {
                let mut cfg = node.client(&format!("normal-{i}"));
                cfg.connect_timeout = PATIENCE;
                async move { Client::connect(cfg).await }
            }))
            .await,
        );
    }
    let connected = later.iter().filter(|c| c.is_ok()).count();
    assert_eq!(
        connected, LATER_CLIENTS,
        "slots of stalled connections were freed"
    );
    let m = node.metrics().await;
    assert_eq!(
        m.get("gatesvr_active_connections", &[]),
        (LATER_CLIENTS + 1) as f64,
        "only the normal clients hold connections"
    );
    drop(served);
}

/// The same deadline on the WebSocket transport: a browser-side client that
/// stops reading (its TCP window stays full) is closed, and others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_that_stops_reading_is_closed() {
    let ws_port = free_port();
    let node = Node::start(
        "  write_timeout: 2s\n",
        &format!("transports:\n  websocket_addr: 127.0.0.1:{ws_port}\n"),
    )
    .await;
    let ca = node.dir.ca();
    let mut slow = WsConn::connect_with_recv_buffer(addr(ws_port), &ca, 4096).await;
    slow.start("ws-slow", &node.dir.token("ws-slow"), "", 0)
        .await;
    assert!(matches!(slow.recv().await, Some(Body::StartOk(_))));
    // More than any socket buffer between us holds: the server's writes block.
    let mut gateway = node.gateway();
    for _ in 0..10 {
        gateway
            .push_to_client(push("ws-slow", "z".repeat(900_000)))
            .await
            .expect("push queued");
    }
    node.wait_metrics("the WebSocket write missed its deadline", |m| {
        m.get(
            "gatesvr_client_write_timeouts_total",
            &[("transport", "websocket"), ("phase", "session")],
        ) >= 1.0
    })
    .await;
    // Others are served on the same listener.
    let mut other = WsConn::connect(addr(ws_port), &ca).await;
    other.start("ws-ok", &node.dir.token("ws-ok"), "", 0).await;
    assert!(matches!(other.recv().await, Some(Body::StartOk(_))));
    gateway
        .push_to_client(push("ws-ok", "hi".into()))
        .await
        .expect("push");
    match other.recv().await {
        Some(Body::Push(p)) => assert_eq!(p.content, "hi"),
        other => panic!("no push: {other:?}"),
    }
    let m = node.metrics().await;
    assert_eq!(
        m.get(
            "gatesvr_transport_connections",
            &[("transport", "websocket")]
        ),
        1.0,
        "only the reading client holds a connection"
    );
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_push_is_refused_and_the_session_stays_healthy() {
    let node = Node::start("  max_frame_size: 65536\n", "").await;
    let mut gateway = node.gateway();
    let client = Client::connect(node.client("alice"))
        .await
        .expect("connects");

    let first = gateway
        .push_to_client(push("alice", "before".into()))
        .await
        .expect("normal push")
        .into_inner();
    assert_eq!(next_push(&client).await.expect("push").content, "before");

    // Over the frame limit: refused with a clear error, never queued.
    let err = gateway
        .push_to_client(push("alice", "x".repeat(70_000)))
        .await
        .expect_err("oversized push refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("push too large") && err.message().contains("65536"),
        "{}",
        err.message()
    );
    let err = gateway
        .broadcast_to_clients(BroadcastRequest {
            msg_type: "t".into(),
            content: "y".repeat(70_000),
            ..Default::default()
        })
        .await
        .expect_err("oversized broadcast refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // The session is healthy: the next push is delivered with the next seq.
    let second = gateway
        .push_to_client(push("alice", "after".into()))
        .await
        .expect("normal push after the oversized one")
        .into_inner();
    assert_eq!(
        second.seq_id,
        first.seq_id + 1,
        "the oversized push took no seq"
    );
    let p = next_push(&client).await.expect("push after");
    assert_eq!((p.content.as_str(), p.seq_id), ("after", second.seq_id));

    // A resume replays nothing oversized: after a reconnect the client keeps
    // working (a queued oversized push would break its stream on every resume).
    client.simulate_disconnect();
    // Queued whether or not the client is back yet (a detached session keeps its queue).
    let third = gateway
        .push_to_client(push("alice", "resumed".into()))
        .await
        .expect("push around the resume")
        .into_inner();
    let p = next_push(&client).await.expect("push after the resume");
    assert_eq!((p.content.as_str(), p.seq_id), ("resumed", third.seq_id));
    assert!(client.closed().is_none(), "{:?}", client.closed());

    let m = node.metrics().await;
    assert_eq!(
        m.get("gatesvr_pushes_total", &[("outcome", "rejected_too_large")]),
        2.0
    );
}

/// Starts `openid` on a raw connection: the StartResponse or the Error frame.
async fn raw_start(node: &Node, openid: &str) -> Body {
    raw_start_or_closed(node, openid)
        .await
        .unwrap_or_else(|code| panic!("closed ({code:?}) without an answer to Start"))
}

/// [`raw_start`], or the connection's close code when it closed before the answer was
/// read: QUIC's close may overtake the last frame still on its way (a later Start of the
/// same openid replaced the session, or the refusal's close followed its Error frame).
async fn raw_start_or_closed(node: &Node, openid: &str) -> Result<Body, Option<ErrorCode>> {
    let mut raw = RawConn::connect(addr(node.quic), &node.dir.ca()).await;
    raw.start(openid, &node.dir.token(openid), "", 0).await;
    match raw.recv().await {
        Some(body) => Ok(body),
        None => Err(raw.closed_with().await),
    }
}

fn overloaded(body: &Body) -> bool {
    matches!(body, Body::Error(e) if e.code == ErrorCode::Overloaded as i32 && e.fatal && e.retry_after_ms > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_are_rate_limited_per_address_and_per_openid() {
    // Per openid: a burst of 2 (then 1 a second); other openids are unaffected.
    let node = Node::start(
        "",
        "overload_protection:\n  start_rate_per_address: 0\n  start_rate_per_openid: 1\n  start_burst_per_openid: 2\n",
    )
    .await;
    // 20 at once: far more than the burst plus what refills meanwhile.
    let answers =
        futures::future::join_all((0..20).map(|_| raw_start_or_closed(&node, "alice"))).await;
    let mut refused = 0;
    for answer in &answers {
        match answer {
            Ok(body) if overloaded(body) => refused += 1,
            Ok(body) => assert!(matches!(body, Body::StartOk(_)), "{body:?}"),
            Err(Some(ErrorCode::Overloaded)) => refused += 1,
            Err(Some(ErrorCode::SessionReplaced)) => {}
            Err(code) => panic!("closed ({code:?}) without an answer to Start"),
        }
    }
    assert!(
        refused > 0,
        "20 Starts of one openid at once, burst 2: some refused"
    );
    assert!(matches!(raw_start(&node, "bob").await, Body::StartOk(_)));
    let m = node.metrics().await;
    assert_eq!(
        m.get(
            "gatesvr_connections_rejected_total",
            &[("reason", "start_rate_openid")]
        ),
        refused as f64
    );

    // Per source address, before the token is checked.
    let node = Node::start(
        "",
        "overload_protection:\n  start_rate_per_address: 1\n  start_burst_per_address: 3\n  start_rate_per_openid: 0\n",
    )
    .await;
    let users: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
    let answers = futures::future::join_all(users.iter().map(|u| raw_start(&node, u))).await;
    let refused = answers.iter().filter(|a| overloaded(a)).count();
    assert!(
        refused > 0,
        "20 Starts from one address at once, burst 3: some refused"
    );
    let m = node.metrics().await;
    assert_eq!(
        m.get(
            "gatesvr_connections_rejected_total",
            &[("reason", "start_rate_address")]
        ),
        refused as f64
    );
    assert_eq!(
        m.get("gatesvr_auth_failures_total", &[("reason", "invalid")]),
        0.0
    );
}
