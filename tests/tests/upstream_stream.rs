//! The streaming upstream contract (docs/protocol.md §14) end to end: a real
//! data-plane node with `upstream.protocol: stream`, upstreams built on
//! `gatesvr-upstream-sdk` over real gRPC, clients over real QUIC.
//!
//! Invariants checked:
//! - across an upstream's restart (drain, stop, start on the same address)
//!   every request is answered, and each is executed exactly once;
//! - a stalled upstream holds at most its request window on the data plane:
//!   the rest is refused unexecuted at once, and runs when retried;
//! - an upstream that stops reading its stream altogether (and announces no
//!   window of its own) holds at most the node's `stream_max_requests_in_flight`:
//!   the rest is refused unexecuted with UPSTREAM_OVERLOADED, and the held
//!   ones fail explicitly when the stream ends;
//! - across a data-plane stop (drain, shutdown) with requests on the stream:
//!   the stream takes no new request (refused unexecuted), the ones on it are
//!   answered or, past the drain's deadline, failed explicitly; each ran once;
//! - an upstream pushes through the same stream, and the client gets it;
//! - a `push_batch` gets one result per push and is delivered in its order.
//! - a request whose handler waits does not hold up the next one on its
//!   stream (the library answers at once only what is done at once).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use gatesvr_dataplane::config::StaticZone;
use gatesvr_dataplane::upstream::UpstreamProtocol;
use gatesvr_proto::client::ErrorCode;
use gatesvr_sdk::{Client, RequestError};
use gatesvr_tests::{TestNode, next_push};
use gatesvr_upstream_sdk::proto::{PushResult, PushToClientRequest, TargetType};
use gatesvr_upstream_sdk::{Handler, Options, Reply, Upstream};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The test application: `slow:<ms>:<tag>` answers after a delay, `hold:<tag>`
/// waits for the gate, `push:<text>` pushes `<text>` to the caller first;
/// every request is counted by payload.
#[derive(Clone)]
struct App {
    executed: Arc<Mutex<HashMap<String, u32>>>,
    gate: Arc<Semaphore>,
    upstream: Arc<OnceLock<Upstream<App>>>,
}

impl App {
    fn new() -> Self {
        Self {
            executed: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            upstream: Arc::default(),
        }
    }

    fn executions(&self) -> HashMap<String, u32> {
        self.executed.lock().clone()
    }
}

impl Handler for App {
    async fn handle(&self, request: gatesvr_upstream_sdk::proto::ProcessRequestRequest) -> Reply {
        let text = String::from_utf8_lossy(&request.payload).into_owned();
        *self.executed.lock().entry(text.clone()).or_default() += 1;
        if let Some(rest) = text.strip_prefix("slow:") {
            let ms: u64 = rest
                .split(':')
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        } else if text.starts_with("hold:") {
            let _permit = self.gate.acquire().await;
        } else if let Some(content) = text.strip_prefix("push:") {
            let upstream = self.upstream.get().expect("set before serving");
            let pushed = upstream
                .push(PushToClientRequest {
                    target_type: TargetType::Openid as i32,
                    target_id: request.openid.clone(),
                    msg_type: "note".into(),
                    content: content.into(),
                    ..Default::default()
                })
                .await;
            if let Err(e) = pushed {
                return Reply::Done(gatesvr_upstream_sdk::proto::ProcessRequestResponse {
                    app_code: 9,
                    message: e.to_string(),
                    ..Default::default()
                });
            }
        }
        Reply::Done(gatesvr_upstream_sdk::proto::ProcessRequestResponse {
            app_code: 0,
            payload: request.payload.into(),
            message: String::new(),
        })
    }
}

/// One served instance of `app`.
struct Instance {
    upstream: Upstream<App>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn serve(app: &App, listener: TcpListener, window: u32) -> Instance {
    let mut opts = Options::new("test-app", "any");
    opts.max_requests_in_flight = window;
    let upstream = Upstream::new(app.clone(), opts);
    // A restarted instance replaces the old one in the handler's slot only
    // if none was set; tests that push use one instance.
    let _ = app.upstream.set(upstream.clone());
    upstream.set_serving(true);
    let stop = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .add_service(upstream.stream_service())
        .add_service(upstream.unary_service())
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            stop.clone().cancelled_owned(),
        );
    let task = tokio::spawn(async move {
        let _ = server.await;
    });
    Instance {
        upstream,
        stop,
        task,
    }
}

async fn node(addrs: &[SocketAddr]) -> TestNode {
    let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    TestNode::start_routed(|c| {
        c.upstream.protocol = UpstreamProtocol::Stream;
        c.upstream.health_check_interval = Duration::ZERO;
        c.zones.upstreams = (0..6)
            .map(|z| StaticZone {
                zone: gatesvr_proto::zone::zone_id(z),
                addrs: addrs.clone(),
            })
            .collect();
    })
    .await
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

#[tokio::test]
async fn requests_in_flight_across_an_upstream_restart_are_each_executed_once() {
    let (app_a, app_b) = (App::new(), App::new());
    let (listener_a, addr_a) = bind().await;
    let (listener_b, addr_b) = bind().await;
    let a = serve(&app_a, listener_a, 64).await;
    let _b = serve(&app_b, listener_b, 64).await;
    let node = node(&[addr_a, addr_b]).await;
    let client = Arc::new(Client::connect(node.client_config("lea")).await.unwrap());

    // 40 slow requests in flight on both instances.
    let mut calls = Vec::new();
    for i in 0..40 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            let payload = format!("slow:300:{i}");
            (payload.clone(), client.request(1, payload).await)
        }));
    }
    gatesvr_tests::eventually("requests reached instance a", || a.upstream.inflight() > 0).await;

    // Restart a: drain (answers what it has, refuses the rest unexecuted),
    // stop, and start again on the same address.
    a.upstream.drain().await;
    a.stop.cancel();
    let _ = a.task.await;
    let listener = TcpListener::bind(addr_a).await.expect("rebind a's address");
    let app_a2 = App::new();
    let _a2 = serve(&app_a2, listener, 64).await;

    // More requests while and after it restarts.
    for i in 40..60 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            let payload = format!("slow:10:{i}");
            (payload.clone(), client.request(1, payload).await)
        }));
    }
    for call in calls {
        let (payload, answer) = call.await.unwrap();
        match answer {
            Ok(r) => assert_eq!(&r.payload[..], payload.as_bytes()),
            Err(e) => panic!("{payload}: {e}"),
        }
    }
    let mut total: HashMap<String, u32> = HashMap::new();
    for app in [&app_a, &app_b, &app_a2] {
        for (payload, n) in app.executions() {
            *total.entry(payload).or_default() += n;
        }
    }
    assert_eq!(total.len(), 60, "every request executed");
    for (payload, n) in &total {
        assert_eq!(*n, 1, "{payload} executed {n} times");
    }
}

#[tokio::test]
async fn a_stalled_upstream_holds_only_its_request_window() {
    const WINDOW: u32 = 8;
    let app = App::new();
    let (listener, addr) = bind().await;
    let _instance = serve(&app, listener, WINDOW).await;
    let node = node(&[addr]).await;
    let client = Arc::new(Client::connect(node.client_config("max")).await.unwrap());

    let mut calls = Vec::new();
    for i in 0..40 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client.request(1, format!("hold:{i}")).await
        }));
    }
    // Everything beyond the window is refused at once, unexecuted, while the
    // window's requests stay held.
    gatesvr_tests::eventually("all but the window answered", || {
        calls.iter().filter(|c| c.is_finished()).count() == (40 - WINDOW) as usize
    })
    .await;
    let mut refused = 0;
    let mut held = Vec::new();
    for call in calls {
        if !call.is_finished() {
            held.push(call);
            continue;
        }
        match call.await.unwrap() {
            Err(RequestError::Gateway {
                code,
                retry_after_ms,
                ..
            }) => {
                assert_eq!(code, ErrorCode::UpstreamOverloaded);
                assert!(retry_after_ms > 0);
                refused += 1;
            }
            other => panic!("expected UPSTREAM_OVERLOADED, got {other:?}"),
        }
    }
    gatesvr_tests::eventually("the window is full and the rest refused", || {
        app.executions().len() == WINDOW as usize
    })
    .await;
    let m = node.metrics().await;
    assert_eq!(
        m.get("gatesvr_upstream_stream_requests_outstanding", &[]),
        f64::from(WINDOW),
        "the data plane holds the window, no more"
    );
    // The held ones are exactly the window, and they complete once released.
    let mut answered = 0;
    app.gate.add_permits(1000);
    for call in held {
        call.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        answered += 1;
    }
    assert_eq!(answered, WINDOW);
    assert_eq!(refused, 40 - WINDOW);
    assert_eq!(
        app.executions().values().sum::<u32>(),
        WINDOW,
        "refused ones never ran"
    );
}

#[tokio::test]
async fn an_upstream_pushes_through_its_stream() {
    let app = App::new();
    let (listener, addr) = bind().await;
    let instance = serve(&app, listener, 64).await;
    let node = node(&[addr]).await;
    let client = Client::connect(node.client_config("noa")).await.unwrap();
    let answer = client
        .request(1, "push:hello over the stream")
        .await
        .unwrap();
    assert_eq!(answer.app_code, 0, "{}", answer.message);
    let push = next_push(&client).await.expect("the push arrives");
    assert_eq!(push.msg_type, "note");
    assert_eq!(push.content, "hello over the stream");
    assert_eq!(
        instance.upstream.streams(),
        1,
        "one stream from the one node"
    );
}

/// One node with one stream upstream, `openid`'s client on it (its first
/// request made the node dial the stream), and `n` pushes of content `0..n`,
/// those at `ghost(i)` to a session that does not exist.
async fn batch_setup(
    openid: &str,
    n: usize,
    ghost: impl Fn(usize) -> bool,
) -> (Instance, TestNode, Client, Vec<PushToClientRequest>) {
    let app = App::new();
    let (listener, addr) = bind().await;
    let instance = serve(&app, listener, 64).await;
    let node = node(&[addr]).await;
    let client = Client::connect(node.client_config(openid)).await.unwrap();
    let answer = client.request(1, "hello").await.unwrap();
    assert_eq!(answer.app_code, 0, "{}", answer.message);
    let pushes = (0..n)
        .map(|i| PushToClientRequest {
            target_type: TargetType::Openid as i32,
            target_id: if ghost(i) { "ghost" } else { openid }.into(),
            msg_type: "batch".into(),
            content: i.to_string(),
            ..Default::default()
        })
        .collect();
    (instance, node, client, pushes)
}

/// Reads pushes until as many as `want` arrived: they must be `want`, in order.
async fn assert_delivered_in_order(client: &Client, want: Vec<String>) {
    let mut got = Vec::new();
    while got.len() < want.len() {
        let push = next_push(client).await.expect("every queued push arrives");
        got.push(push.content);
    }
    assert_eq!(got, want, "delivered in the batch's order");
}

/// Checks full results: the pushes at `ghost(i)` refused NOT_FOUND, the rest
/// queued with seqs in the batch's order. Returns the queued pushes' contents.
fn queued_in_order(results: &[PushResult], ghost: impl Fn(usize) -> bool) -> Vec<String> {
    let mut last_seq = 0;
    let mut want = Vec::new();
    for (i, r) in results.iter().enumerate() {
        if ghost(i) {
            assert_eq!(
                r.code,
                tonic::Code::NotFound as i32,
                "push {i}: {}",
                r.message
            );
        } else {
            assert_eq!(r.code, 0, "push {i}: {}", r.message);
            assert!(
                r.seq_id > last_seq,
                "push {i}: seqs follow the batch's order"
            );
            last_seq = r.seq_id;
            want.push(i.to_string());
        }
    }
    want
}

#[tokio::test]
async fn a_push_batch_on_the_stream_is_queued_in_order_with_a_result_each() {
    // 200 pushes (more than one run of the node's fast path): every 7th to a
    // session that does not exist, which takes the rest off the fast path.
    let ghost = |i| i % 7 == 3;
    let (instance, _node, client, pushes) = batch_setup("noa", 200, ghost).await;
    let results = instance
        .upstream
        .pusher()
        .push_batch(pushes)
        .await
        .expect("a stream is open");
    assert_eq!(results.len(), 200, "one result per push");
    let want = queued_in_order(&results, ghost);
    assert_delivered_in_order(&client, want).await;
}

#[tokio::test]
async fn a_push_batch_asking_for_codes_gets_a_code_each_and_the_refusals_in_full() {
    let ghost = |i| i % 5 == 2;
    let (instance, _node, client, pushes) = batch_setup("ines", 100, ghost).await;
    let results = instance
        .upstream
        .pusher()
        .push_batch_codes(pushes)
        .await
        .expect("a stream is open");
    assert_eq!(results.len(), 100, "one result per push");
    let mut want = Vec::new();
    for (i, r) in results.iter().enumerate() {
        if ghost(i) {
            assert_eq!(r.code, tonic::Code::NotFound as i32, "push {i}");
            assert!(
                r.message.contains("ghost"),
                "push {i}: a refusal comes in full: {:?}",
                r.message
            );
        } else {
            // The node sent the code alone: no seq, session or node id.
            assert_eq!(
                (r.code, r.seq_id, r.session_id.as_str(), r.node_id.as_str()),
                (0, 0, "", ""),
                "push {i}"
            );
            want.push(i.to_string());
        }
    }
    assert_delivered_in_order(&client, want).await;
}

#[tokio::test]
async fn a_push_batch_longer_than_one_frame_is_sent_in_frames_in_order() {
    // 1,100 pushes: more than a `push_batch` frame takes (the node's
    // MAX_PUSH_BATCH, 1,024), so the library sends two frames. Every other
    // one goes to a session that does not exist (the session's queue holds
    // 1,024).
    let ghost = |i| i % 2 == 1;
    let (instance, _node, client, pushes) = batch_setup("omar", 1_100, ghost).await;
    let results = instance
        .upstream
        .pusher()
        .push_batch(pushes)
        .await
        .expect("a stream is open");
    assert_eq!(results.len(), 1_100, "one result per push");
    let want = queued_in_order(&results, ghost);
    assert_delivered_in_order(&client, want).await;
}

#[tokio::test]
async fn a_push_batch_of_big_pushes_arrives_whole_and_in_order() {
    // Three pushes of 400 KiB, more bytes than the library puts in one
    // `push_batch` frame (1 MiB): it splits the batch by size. (The node
    // would take the batch whole too, so this checks the pushes, not the
    // split.)
    let (instance, _node, client, mut pushes) = batch_setup("pia", 3, |_| false).await;
    for (i, p) in pushes.iter_mut().enumerate() {
        p.data = vec![i as u8; 400 << 10].into();
    }
    let results = instance
        .upstream
        .pusher()
        .push_batch(pushes)
        .await
        .expect("a stream is open");
    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    assert_eq!(codes, [0, 0, 0], "{results:?}");
    for i in 0..3u8 {
        let push = next_push(&client).await.expect("every queued push arrives");
        assert_eq!(push.content, i.to_string(), "in the batch's order");
        assert_eq!(push.data.len(), 400 << 10);
        assert!(push.data.iter().all(|&b| b == i), "push {i} arrives whole");
    }
}

/// A TCP relay to `target` that can be cut: every connection through it is
/// dropped at once and new ones are refused, as when the host of an
/// instance dies.
async fn relay(target: SocketAddr) -> (SocketAddr, CancellationToken) {
    let (listener, addr) = bind().await;
    let cut = CancellationToken::new();
    let stop = cut.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((mut inbound, _)) = accepted else {
                return;
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    });
    (addr, cut)
}

#[tokio::test]
async fn requests_on_a_dead_instance_fail_explicitly_and_never_run_twice() {
    let (app_a, app_b) = (App::new(), App::new());
    let (listener_a, addr_a) = bind().await;
    let (listener_b, addr_b) = bind().await;
    let a = serve(&app_a, listener_a, 64).await;
    let _b = serve(&app_b, listener_b, 64).await;
    let (via_relay, cut) = relay(addr_a).await;
    let node = node(&[via_relay, addr_b]).await;
    let client = Arc::new(Client::connect(node.client_config("oli")).await.unwrap());

    let mut calls = Vec::new();
    for i in 0..30 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            let payload = format!("slow:500:{i}");
            (payload.clone(), client.request(1, payload).await)
        }));
    }
    gatesvr_tests::eventually("requests reached instance a", || a.upstream.inflight() > 0).await;
    cut.cancel();

    let mut unknown = 0;
    for call in calls {
        let (payload, answer) = call.await.unwrap();
        match answer {
            Ok(r) => assert_eq!(&r.payload[..], payload.as_bytes()),
            Err(RequestError::Gateway { code, message, .. }) => {
                assert_eq!(code, ErrorCode::UpstreamError, "{payload}: {message}");
                assert!(message.starts_with("outcome unknown"), "{message}");
                unknown += 1;
            }
            Err(e) => panic!("{payload}: {e}"),
        }
    }
    assert!(
        unknown > 0,
        "requests in flight on the dead instance are failed explicitly"
    );
    let mut total: HashMap<String, u32> = HashMap::new();
    for app in [&app_a, &app_b] {
        for (payload, n) in app.executions() {
            *total.entry(payload).or_default() += n;
        }
    }
    for (payload, n) in &total {
        assert_eq!(*n, 1, "{payload} executed {n} times");
    }

    // The dead instance refuses connections: every new request goes to b.
    for i in 0..10 {
        let payload = format!("after:{i}");
        let r = client
            .request(1, payload.clone())
            .await
            .unwrap_or_else(|e| panic!("{payload}: {e}"));
        assert_eq!(&r.payload[..], payload.as_bytes());
    }
}

#[tokio::test]
async fn the_demo_upstream_serves_and_pushes_over_streams() {
    // Its GatewayService address goes nowhere: pushes can only take the stream.
    let (listener, addr) = bind().await;
    let mut cfg = gate_upstream::Config::new("006", "127.0.0.1:1");
    cfg.addr = addr;
    let stop = CancellationToken::new();
    let serving = tokio::spawn(gate_upstream::run(
        cfg,
        listener,
        stop.clone().cancelled_owned(),
    ));
    let node = node(&[addr]).await;
    assert_eq!(gatesvr_proto::zone::zone_of("alice", 6), "006");
    let alice = Client::connect(node.client_config("alice")).await.unwrap();
    let user2 = Client::connect(node.client_config("user-2")).await.unwrap();

    let r = alice.request(1, "echo over a stream").await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(body["echo"], "over a stream");
    alice.request(1, "join lobby").await.unwrap();
    user2.request(1, "join lobby").await.unwrap();
    let said = alice.request(1, "say lobby hi all").await.unwrap();
    assert_eq!(said.app_code, 0, "{}", said.message);
    for client in [&alice, &user2] {
        let push = next_push(client).await.expect("the chat push arrives");
        assert_eq!(
            (push.msg_type.as_str(), push.content.as_str()),
            ("chat", "hi all")
        );
    }
    let b = user2.request(1, "broadcast to 006").await.unwrap();
    assert_eq!(b.app_code, 0, "{}", b.message);
    for client in [&alice, &user2] {
        assert_eq!(
            next_push(client).await.expect("broadcast").content,
            "to 006"
        );
    }

    // Shutdown drains the streams and returns.
    stop.cancel();
    serving.await.unwrap().expect("clean shutdown");
}

#[tokio::test]
async fn an_instance_removed_from_routing_loses_its_stream() {
    let app = App::new();
    let (listener, addr) = bind().await;
    let instance = serve(&app, listener, 64).await;
    let node = node(&[addr]).await;
    let client = Client::connect(node.client_config("pat")).await.unwrap();
    client.request(1, "echo open the stream").await.unwrap();
    assert_eq!(instance.upstream.streams(), 1);

    let gatesvr_dataplane::Handler::Upstream(router) = &node.dp.node().handler else {
        unreachable!("a routed node")
    };
    router.replace_all(HashMap::new());
    gatesvr_tests::eventually("the stream of the removed instance ends", || {
        instance.upstream.streams() == 0
    })
    .await;
}

/// An upstream that says hello on every stream and then never reads it: the
/// frames the data plane sends pile up in HTTP/2 buffers until flow control
/// stops them. Its streams end when `end` is cancelled.
#[derive(Clone, Default)]
struct Unreading {
    held: Arc<Mutex<Vec<tonic::Streaming<gatesvr_upstream_sdk::proto::GatewayFrame>>>>,
    end: CancellationToken,
}

#[tonic::async_trait]
impl gatesvr_upstream_sdk::proto::upstream_stream_service_server::UpstreamStreamService
    for Unreading
{
    type OpenStream = futures::stream::BoxStream<
        'static,
        Result<gatesvr_upstream_sdk::proto::UpstreamFrame, tonic::Status>,
    >;

    async fn open(
        &self,
        request: tonic::Request<tonic::Streaming<gatesvr_upstream_sdk::proto::GatewayFrame>>,
    ) -> Result<tonic::Response<Self::OpenStream>, tonic::Status> {
        use futures::StreamExt;
        use gatesvr_upstream_sdk::proto::{UpstreamFrame, UpstreamHello, upstream_frame::Body};
        self.held.lock().push(request.into_inner());
        let hello = UpstreamFrame {
            body: Some(Body::Hello(UpstreamHello {
                version: 1,
                service_name: "unreading".into(),
                zone: "any".into(),
                // 0: no window of its own; the node's bound applies.
                max_requests_in_flight: 0,
                serving: true,
            })),
        };
        let end = self.end.clone();
        let frames = futures::stream::once(async move { Ok(hello) }).chain(
            futures::stream::once(async move { end.cancelled_owned().await })
                .filter_map(|()| async { None }),
        );
        Ok(tonic::Response::new(frames.boxed()))
    }
}

#[tokio::test]
async fn an_upstream_that_stops_reading_holds_only_the_nodes_window() {
    const NODE_WINDOW: u32 = 16;
    const SENT: u32 = 60;
    let upstream = Unreading::default();
    let (listener, addr) = bind().await;
    let stop = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .add_service(
            gatesvr_upstream_sdk::proto::upstream_stream_service_server::UpstreamStreamServiceServer::new(
                upstream.clone(),
            ),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            stop.clone().cancelled_owned(),
        );
    tokio::spawn(server);
    let addrs = vec![addr.to_string()];
    let node = TestNode::start_routed(|c| {
        c.upstream.protocol = UpstreamProtocol::Stream;
        c.upstream.health_check_interval = Duration::ZERO;
        c.upstream.stream_max_requests_in_flight = NODE_WINDOW;
        c.zones.upstreams = (0..6)
            .map(|z| StaticZone {
                zone: gatesvr_proto::zone::zone_id(z),
                addrs: addrs.clone(),
            })
            .collect();
    })
    .await;
    let client = Arc::new(Client::connect(node.client_config("ria")).await.unwrap());

    // 1 KiB each: what piles up would show.
    let mut calls = Vec::new();
    for i in 0..SENT {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client.request(1, format!("{i:01024}")).await
        }));
    }
    gatesvr_tests::eventually("all but the node's window answered", || {
        calls.iter().filter(|c| c.is_finished()).count() == (SENT - NODE_WINDOW) as usize
    })
    .await;
    let mut held = Vec::new();
    for call in calls {
        if !call.is_finished() {
            held.push(call);
            continue;
        }
        match call.await.unwrap() {
            Err(RequestError::Gateway {
                code,
                retry_after_ms,
                ..
            }) => {
                assert_eq!(code, ErrorCode::UpstreamOverloaded);
                assert!(
                    retry_after_ms > 0,
                    "a not-executed refusal says when to retry"
                );
            }
            other => panic!("expected UPSTREAM_OVERLOADED, got {other:?}"),
        }
    }
    assert_eq!(held.len(), NODE_WINDOW as usize);
    let m = node.metrics().await;
    assert_eq!(
        m.get("gatesvr_upstream_stream_requests_outstanding", &[]),
        f64::from(NODE_WINDOW),
        "the data plane holds its window, no more"
    );
    assert_eq!(upstream.held.lock().len(), 1, "one stream");

    // The stream ends: every held request fails explicitly, outcome unknown.
    upstream.end.cancel();
    for call in held {
        match call.await.unwrap() {
            Err(RequestError::Gateway { code, message, .. }) => {
                assert_eq!(code, ErrorCode::UpstreamError, "{message}");
                assert!(message.starts_with("outcome unknown"), "{message}");
            }
            other => panic!("expected an explicit failure, got {other:?}"),
        }
    }
    let gatesvr_dataplane::Handler::Upstream(router) = &node.dp.node().handler else {
        unreachable!("a routed node")
    };
    assert_eq!(router.stream_requests_outstanding(), 0);
    stop.cancel();
}

#[tokio::test]
async fn a_stopping_node_answers_or_fails_what_is_on_its_streams() {
    let app = App::new();
    let (listener, addr) = bind().await;
    let _instance = serve(&app, listener, 64).await;
    let addrs = vec![addr.to_string()];
    let node = TestNode::start_routed(|c| {
        c.upstream.protocol = UpstreamProtocol::Stream;
        c.upstream.health_check_interval = Duration::ZERO;
        // How long the stop waits for what is on the streams.
        c.server.drain_timeout = Duration::from_millis(1500);
        c.zones.upstreams = (0..6)
            .map(|z| StaticZone {
                zone: gatesvr_proto::zone::zone_id(z),
                addrs: addrs.clone(),
            })
            .collect();
    })
    .await;
    let client = Arc::new(Client::connect(node.client_config("sol")).await.unwrap());

    // 8 that finish within the stop's grace, 2 that never would.
    let mut calls = Vec::new();
    for payload in (0..8)
        .map(|i| format!("slow:400:{i}"))
        .chain((0..2).map(|i| format!("hold:{i}")))
    {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            (payload.clone(), client.request(1, payload).await)
        }));
    }
    gatesvr_tests::eventually("all ten on the stream", || app.executions().len() == 10).await;

    let TestNode { dir: _dir, dp } = node;
    let stopping = tokio::spawn(dp.shutdown());
    // Once the stream drains, a new request is refused, unexecuted.
    let mut late = 0;
    let refused = loop {
        late += 1;
        assert!(late < 1000, "no request was ever refused");
        let payload = format!("late:{late}");
        match client.request(1, payload.clone()).await {
            Ok(r) => assert_eq!(&r.payload[..], payload.as_bytes()),
            Err(RequestError::Gateway { code, message, .. }) => {
                assert_eq!(code, ErrorCode::UpstreamUnavailable, "{payload}: {message}");
                break payload;
            }
            Err(e) => panic!("{payload}: {e}"),
        }
    };

    for call in calls {
        let (payload, answer) = call.await.unwrap();
        match answer {
            Ok(r) if payload.starts_with("slow:") => {
                assert_eq!(&r.payload[..], payload.as_bytes());
            }
            Err(RequestError::Gateway { code, message, .. }) if payload.starts_with("hold:") => {
                assert_eq!(code, ErrorCode::UpstreamError, "{payload}: {message}");
                assert!(message.starts_with("outcome unknown"), "{message}");
            }
            other => panic!("{payload}: {other:?}"),
        }
    }
    stopping.await.unwrap();
    let executed = app.executions();
    assert!(
        !executed.contains_key(&refused),
        "{refused} was refused, yet ran"
    );
    for (payload, n) in &executed {
        assert_eq!(*n, 1, "{payload} executed {n} times");
    }
}

/// The library polls a handler once on the stream's reader and answers at
/// once if it is done; a handler that waits moves to a task of its own, so a
/// request behind it on the same stream is answered while it still waits.
#[tokio::test]
async fn a_waiting_request_does_not_hold_up_the_next_one_on_its_stream() {
    let app = App::new();
    let (listener, addr) = bind().await;
    let _instance = serve(&app, listener, 64).await;
    let node = node(&[addr]).await;
    let client = Arc::new(Client::connect(node.client_config("ada")).await.unwrap());
    let held = tokio::spawn({
        let client = client.clone();
        async move { client.request(1, "hold:1").await }
    });
    gatesvr_tests::eventually("the held request runs", || {
        app.executions().contains_key("hold:1")
    })
    .await;
    let quick = client.request(1, "quick").await.expect("answered");
    assert_eq!(&quick.payload[..], b"quick");
    assert!(!held.is_finished(), "the held request is still waiting");
    app.gate.add_permits(1);
    let held = held.await.unwrap().expect("answered once released");
    assert_eq!(&held.payload[..], b"hold:1");
}
