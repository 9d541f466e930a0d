//! Browsers on GateSvr sessions, in a real headless Chromium driving the
//! JavaScript SDK (`sdk-js/`): WebTransport with `serverCertificateHashes`
//! (a 13-day ECDSA P-256 certificate issued for the test), the WebSocket
//! fallback, and one session moving between them.
//!
//! Invariant checked everywhere: the application sees every push exactly
//! once, in order (lost = 0, duplicated = 0), and requests are answered.

use gatesvr_proto::upstream::{PushToClientRequest, TargetType};
use gatesvr_tests::browser::{Browser, sdk_js_dir};
use gatesvr_tests::cluster::push_messages;
use gatesvr_tests::{TestNode, eventually};
use serde_json::{Value, json};

/// A node with WebTransport and WebSocket on, serving the SDK, with a
/// browser-acceptable certificate.
async fn browser_node() -> TestNode {
    TestNode::start(web_transports_on).await
}

/// WebTransport and WebSocket on, the SDK served, and a certificate a browser accepts
/// (`webcert`: short-lived, for `serverCertificateHashes`).
fn web_transports_on(c: &mut gatesvr_dataplane::config::DataPlaneConfig) {
    let certs = c
        .server
        .cert_file
        .parent()
        .expect("certs dir")
        .to_path_buf();
    let web = gatesvr_common::webcert::issue(
        &certs,
        &certs.join("web"),
        &["localhost".into(), "127.0.0.1".into()],
    )
    .expect("web certificate");
    c.server.cert_file = web.cert_file;
    c.server.key_file = web.key_file;
    c.transports.webtransport = true;
    c.transports.websocket_addr = Some("127.0.0.1:0".into());
    c.transports.web_root = Some(sdk_js_dir());
}

/// The SDK's endpoint entry for `node`.
fn endpoint(node: &TestNode, webtransport_port: u16) -> Value {
    let ws = node.dp.websocket_addr().expect("WebSocket listener");
    let hashes =
        gatesvr_dataplane::edge::websocket::cert_hashes(&node.dp.node().config.server.cert_file)
            .expect("certificate hashes");
    json!({
        "webtransport": format!("https://127.0.0.1:{webtransport_port}/gatesvr/v1"),
        "websocket": format!("wss://127.0.0.1:{}/gatesvr/v1", ws.port()),
        "serverCertificateHashes": hashes,
    })
}

/// Pushes the application received: (seq, content) in arrival order.
fn received(pushes: &Value) -> Vec<(u64, String)> {
    pushes
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["seqId"].as_u64().unwrap_or(0),
                        p["content"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that the application got exactly `message 1..=n`, once each.
fn assert_exactly_once(pushes: &Value, n: u64) {
    let got = received(pushes);
    let expected: Vec<(u64, String)> = (1..=n).map(|i| (i, format!("message {i}"))).collect();
    let lost = expected.iter().filter(|e| !got.contains(e)).count();
    let duplicated = got.len() - got.iter().collect::<std::collections::HashSet<_>>().len();
    assert_eq!((lost, duplicated), (0, 0), "lost and duplicated pushes");
    assert_eq!(got, expected, "in order");
}

fn unacked(node: &TestNode, openid: &str) -> Option<u64> {
    node.dp
        .node()
        .registry
        .get(openid)
        .map(|e| e.state.lock().stats().unacked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_sessions_over_webtransport_and_websocket() {
    let node = browser_node().await;
    let grpc = node.dp.grpc_addr();
    let quic_port = node.dp.quic_addr().port();
    let browser = Browser::start().await;
    browser
        .open_harness(node.dp.websocket_addr().expect("WebSocket listener"))
        .await;

    // --- WebTransport: connect, request/response, pushes with acks ---
    let alice = json!({
        "endpoints": [endpoint(&node, quic_port)],
        "openid": "alice",
        "token": node.dir.token("alice"),
    });
    let info = browser.call("connect", vec![json!("alice"), alice]).await;
    assert_eq!(info["transport"], "webtransport", "{info}");
    let answer = browser
        .call(
            "request",
            vec![json!("alice"), json!(7), json!("hello over h3")],
        )
        .await;
    assert_eq!(answer["payload"], "hello over h3", "{answer}");
    assert_eq!(answer["seqId"], 1);
    push_messages(grpc, "alice", 1..=20).await;
    let pushes = browser
        .until(
            "20 pushes in the page",
            "pushes",
            vec![json!("alice")],
            |p| received(p).len() >= 20,
        )
        .await;
    assert_exactly_once(&pushes, 20);
    eventually("the browser acked every push", || {
        unacked(&node, "alice") == Some(0)
    })
    .await;
    assert_eq!(
        node.metrics().await.get(
            "gatesvr_transport_connections",
            &[("transport", "webtransport")]
        ),
        1.0
    );

    // --- the certificate hash is what WebTransport trusts: a wrong one fails ---
    let mut wrong = endpoint(&node, quic_port);
    wrong["serverCertificateHashes"] = json!(["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]);
    let refused = browser
        .client
        .execute(
            "return window.harness.connect('mallory', arguments[0]).then(() => 'connected', (e) => 'failed: ' + e.message)",
            vec![json!({
                "endpoints": [wrong],
                "openid": "mallory",
                "token": node.dir.token("mallory"),
                "transports": ["webtransport"],
                "connectTimeoutMs": 3000,
                "reconnect": false,
            })],
        )
        .await
        .expect("script runs");
    eprintln!("WebTransport with a wrong certificate hash: {refused}");
    assert!(
        refused.as_str().is_some_and(|r| r.starts_with("failed")),
        "a wrong serverCertificateHashes entry must fail: {refused}"
    );

    // --- resume over WebTransport after a network drop ---
    let session = info["sessionId"].clone();
    browser
        .call("simulateDisconnect", vec![json!("alice")])
        .await;
    push_messages(grpc, "alice", 21..=30).await;
    let pushes = browser
        .until(
            "30 pushes after the resume",
            "pushes",
            vec![json!("alice")],
            |p| received(p).len() >= 30,
        )
        .await;
    assert_exactly_once(&pushes, 30);
    let info = browser.call("info", vec![json!("alice")]).await;
    assert_eq!(info["sessionId"], session, "the same session");

    // --- WebSocket fallback when UDP is blocked: WebTransport points at a
    // UDP port nothing listens on ---
    let closed_udp = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a UDP port")
        .port();
    let bob = json!({
        "endpoints": [endpoint(&node, closed_udp)],
        "openid": "bob",
        "token": node.dir.token("bob"),
        "connectTimeoutMs": 3000,
    });
    let info = browser.call("connect", vec![json!("bob"), bob]).await;
    assert_eq!(info["transport"], "websocket", "{info}");
    let bob_session = info["sessionId"].clone();
    let answer = browser
        .call(
            "request",
            vec![json!("bob"), json!(1), json!("hello over ws")],
        )
        .await;
    assert_eq!(answer["payload"], "hello over ws", "{answer}");
    push_messages(grpc, "bob", 1..=10).await;
    browser
        .until(
            "10 pushes over WebSocket",
            "pushes",
            vec![json!("bob")],
            |p| received(p).len() >= 10,
        )
        .await;
    eventually("bob acked 10", || unacked(&node, "bob") == Some(0)).await;

    // --- the WebSocket session resumes over WebTransport once UDP works ---
    browser
        .call(
            "setOptions",
            vec![
                json!("bob"),
                json!({ "endpoints": [endpoint(&node, quic_port)] }),
            ],
        )
        .await;
    browser.call("simulateDisconnect", vec![json!("bob")]).await;
    browser
        .until(
            "bob back on WebTransport",
            "info",
            vec![json!("bob")],
            |i| i["transport"] == "webtransport",
        )
        .await;
    push_messages(grpc, "bob", 11..=20).await;
    let pushes = browser
        .until("20 pushes for bob", "pushes", vec![json!("bob")], |p| {
            received(p).len() >= 20
        })
        .await;
    assert_exactly_once(&pushes, 20);
    let info = browser.call("info", vec![json!("bob")]).await;
    assert_eq!(info["sessionId"], bob_session, "resumed, not a new session");
    let answer = browser
        .call("request", vec![json!("bob"), json!(2), json!("second")])
        .await;
    assert_eq!(
        answer["seqId"], 2,
        "request numbering carried over: {answer}"
    );
    let events = browser.call("events", vec![json!("bob")]).await;
    assert!(
        !events.to_string().contains("resumefailed"),
        "every resume succeeded: {events}"
    );
    eventually("bob acked 20", || unacked(&node, "bob") == Some(0)).await;

    // Figures, printed and not asserted: request round trips from the page
    // (echo routing, one request in flight) over each transport.
    let carol = json!({
        "endpoints": [endpoint(&node, quic_port)],
        "openid": "carol",
        "token": node.dir.token("carol"),
        "transports": ["websocket"],
    });
    let info = browser.call("connect", vec![json!("carol"), carol]).await;
    assert_eq!(info["transport"], "websocket", "{info}");
    let over_wt = browser.call("rtt", vec![json!("alice"), json!(200)]).await;
    let over_ws = browser.call("rtt", vec![json!("carol"), json!(200)]).await;
    eprintln!(
        "request RTT from headless Chromium (ms): WebTransport {over_wt}, WebSocket {over_ws}"
    );
    assert_eq!(over_wt["count"], 200);
    // Memory per idle session, read from this process (the node runs in it):
    // rough, as the allocator may reuse memory freed earlier in the test.
    for transport in ["webtransport", "websocket"] {
        let n = 100;
        let before = rss_bytes();
        let tokens: Vec<String> = (0..n)
            .map(|i| node.dir.token(&format!("{transport}-{i}")))
            .collect();
        let options = json!({
            "endpoints": [endpoint(&node, quic_port)],
            "tokens": tokens,
            "transports": [transport],
        });
        let opened = browser
            .call("openMany", vec![json!(transport), json!(n), options])
            .await;
        assert_eq!(opened.as_array().map(Vec::len), Some(n), "{opened}");
        eventually("the sessions started", || {
            node.dp
                .node()
                .registry
                .get(&format!("{transport}-{}", n - 1))
                .is_some()
        })
        .await;
        let per = rss_bytes().saturating_sub(before) / n as u64;
        eprintln!("{transport}: ~{per} bytes of node RSS per idle browser session ({n} sessions)");
        browser
            .call("stopMany", vec![json!(transport), json!(n)])
            .await;
    }
    browser.close().await;
}

/// This process's resident set, bytes (Linux).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// A cluster of `n` browser-enabled data planes sharing one web certificate.
async fn browser_cluster(n: usize) -> gatesvr_tests::cluster::TestCluster {
    let web = std::sync::OnceLock::new();
    gatesvr_tests::cluster::TestCluster::start(n, |c| {
        let files = web.get_or_init(|| {
            let certs = c
                .server
                .cert_file
                .parent()
                .expect("certs dir")
                .to_path_buf();
            gatesvr_common::webcert::issue(
                &certs,
                &certs.join("web"),
                &["localhost".into(), "127.0.0.1".into()],
            )
            .expect("web certificate")
        });
        c.server.cert_file = files.cert_file.clone();
        c.server.key_file = files.key_file.clone();
        c.transports.webtransport = true;
        c.transports.websocket_addr = Some("127.0.0.1:0".into());
        c.transports.web_root = Some(sdk_js_dir());
    })
    .await
}

fn cluster_endpoint(dp: &gatesvr_dataplane::DataPlane) -> Value {
    let ws = dp.websocket_addr().expect("WebSocket listener");
    let hashes =
        gatesvr_dataplane::edge::websocket::cert_hashes(&dp.node().config.server.cert_file)
            .expect("certificate hashes");
    json!({
        "webtransport": format!("https://127.0.0.1:{}/gatesvr/v1", dp.quic_addr().port()),
        "websocket": format!("wss://127.0.0.1:{}/gatesvr/v1", ws.port()),
        "serverCertificateHashes": hashes,
    })
}

fn durable(openid: &str, n: u64) -> PushToClientRequest {
    PushToClientRequest {
        target_type: TargetType::Openid as i32,
        target_id: openid.into(),
        msg_type: "chat".into(),
        content: format!("message {n}"),
        data: Default::default(),
        durable: true,
    }
}

/// Contents the application received, each counted.
fn contents(pushes: &Value) -> Vec<String> {
    received(pushes).into_iter().map(|(_, c)| c).collect()
}

/// (lost, duplicated) against `message 1..=n`, by content (seqs renumber
/// after a crash recovery).
fn lost_and_duplicated(pushes: &Value, n: u64) -> (usize, usize) {
    let got = contents(pushes);
    let lost = (1..=n)
        .filter(|i| !got.contains(&format!("message {i}")))
        .count();
    let distinct = got.iter().collect::<std::collections::HashSet<_>>().len();
    (lost, got.len() - distinct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_sessions_survive_a_drain_and_a_crash() {
    let mut cluster = browser_cluster(3).await;
    let browser = Browser::start().await;
    browser
        .open_harness(cluster.dps[0].websocket_addr().expect("WebSocket listener"))
        .await;
    let endpoints: Vec<Value> = cluster.dps.iter().map(cluster_endpoint).collect();
    let options = json!({
        "endpoints": endpoints,
        "openid": "erin",
        "token": cluster.dir.token("erin"),
        "connectTimeoutMs": 3000,
    });
    let info = browser.call("connect", vec![json!("erin"), options]).await;
    assert_eq!(
        (info["transport"].as_str(), info["nodeId"].as_str()),
        (Some("webtransport"), Some("dp-1")),
        "{info}"
    );
    let session = info["sessionId"].clone();
    let mut gw = cluster.gateway(1).await;
    for n in 1..=10 {
        gw.push_to_client(durable("erin", n)).await.expect("push");
    }
    browser
        .until("10 pushes", "pushes", vec![json!("erin")], |p| {
            received(p).len() >= 10
        })
        .await;

    // --- drain dp-1: GoAway names a successor; the session follows ---
    let report = cluster.dps[0].drain().await;
    assert_eq!(report.remaining, 0, "{report:?}");
    let info = browser
        .until(
            "resumed on another node",
            "info",
            vec![json!("erin")],
            |i| i["nodeId"] != "dp-1" && i["transport"].is_string(),
        )
        .await;
    assert_eq!(
        info["sessionId"], session,
        "the same session after the drain"
    );
    assert_eq!(info["transport"], "webtransport");
    let owner = info["nodeId"].as_str().unwrap_or_default().to_string();
    for n in 11..=20 {
        gw.push_to_client(durable("erin", n)).await.expect("push");
    }
    let pushes = browser
        .until("20 pushes", "pushes", vec![json!("erin")], |p| {
            received(p).len() >= 20
        })
        .await;
    assert_eq!(lost_and_duplicated(&pushes, 20), (0, 0), "after the drain");
    let owner_index = cluster
        .dps
        .iter()
        .position(|d| d.node().config.node_id == owner)
        .expect("the owner is a cluster node");
    let owner_node = cluster.dps[owner_index].node().clone();
    eventually("the owner saw the ack of 20", || {
        owner_node
            .registry
            .get("erin")
            .is_some_and(|e| e.state.lock().stats().acked_seq_id == 20)
    })
    .await;
    drop(owner_node);

    // --- kill -9 of the owner: the browser moves on and resumes ---
    cluster.dps.remove(owner_index).crash();
    let info = browser
        .until(
            "reconnected after the crash",
            "info",
            vec![json!("erin")],
            |i| {
                i["nodeId"] != owner.as_str() && i["nodeId"] != "dp-1" && i["transport"].is_string()
            },
        )
        .await;
    let survivor = info["nodeId"].as_str().unwrap_or_default().to_string();
    let survivor_index = cluster
        .dps
        .iter()
        .position(|d| d.node().config.node_id == survivor)
        .expect("the survivor is a cluster node");
    // Non-durable now: the crashed node was this session's standby, and the
    // drained one takes no replicas, so a durable push would be refused.
    let mut gw = cluster.gateway(survivor_index).await;
    for n in 21..=30 {
        let mut push = durable("erin", n);
        push.durable = false;
        gw.push_to_client(push).await.expect("push");
    }
    let pushes = browser
        .until("30 pushes", "pushes", vec![json!("erin")], |p| {
            received(p).len() >= 30
        })
        .await;
    let (lost, duplicated) = lost_and_duplicated(&pushes, 30);
    assert_eq!(
        (lost, duplicated),
        (0, 0),
        "lost and duplicated pushes: {pushes}"
    );
    // The crash is surfaced, never hidden (docs/protocol.md §4).
    let events = browser.call("events", vec![json!("erin")]).await;
    let surfaced = events.as_array().is_some_and(|e| {
        e.iter()
            .any(|ev| ev["type"] == "resumefailed" && (ev["status"] == 5 || ev["status"] == 2))
    });
    let same_session = browser.call("info", vec![json!("erin")]).await["sessionId"] == session;
    eprintln!(
        "after the crash of {owner}: resumed on {survivor}, same session: {same_session}, \
         lost {lost}, duplicated {duplicated}; events: {events}"
    );
    assert!(
        same_session || surfaced,
        "either the session survived or the SDK said it did not: {events}"
    );
    browser.close().await;
}

/// Text content of `selector` in the page.
async fn text_of(browser: &Browser, selector: &str) -> String {
    let script = format!("return document.querySelector({selector:?})?.textContent ?? ''");
    browser
        .client
        .execute(&script, vec![])
        .await
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

async fn page_until(browser: &Browser, what: &str, selector: &str, needle: &str) {
    let deadline = tokio::time::Instant::now() + gatesvr_tests::PATIENCE;
    loop {
        let text = text_of(browser, selector).await;
        if text.contains(needle) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what} (page shows {text:?})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_chat_page_works_against_the_demo_upstream() {
    // The demo upstream for alice's zone; auth off, as under gatesvr dev.
    let zone = gatesvr_proto::zone::zone_of("alice", 6);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("upstream port");
    let upstream_addr = listener.local_addr().expect("bound");
    let node = TestNode::start_routed(|c| {
        web_transports_on(c);
        c.auth.mode = gatesvr_dataplane::config::AuthMode::None;
        c.auth.allow_none = true;
        c.zones.upstreams = vec![gatesvr_dataplane::config::StaticZone {
            zone: zone.clone(),
            addrs: vec![upstream_addr.to_string()],
        }];
    })
    .await;
    let mut cfg = gate_upstream::Config::new(zone, node.dp.grpc_addr().to_string());
    cfg.addr = upstream_addr;
    let stop = tokio_util::sync::CancellationToken::new();
    let upstream = tokio::spawn(gate_upstream::run(
        cfg,
        listener,
        stop.clone().cancelled_owned(),
    ));

    let browser = Browser::start().await;
    let ws = node.dp.websocket_addr().expect("WebSocket listener");
    browser
        .client
        .goto(&format!("https://127.0.0.1:{}/demo/", ws.port()))
        .await
        .expect("demo page loads");
    let join = r#"
        document.querySelector('#connect [name=openid]').value = 'alice';
        document.querySelector('#connect').requestSubmit();
    "#;
    // The upstream's health check may not have passed yet: retry the join.
    let deadline = tokio::time::Instant::now() + gatesvr_tests::PATIENCE;
    'joined: loop {
        browser.client.execute(join, vec![]).await.expect("form");
        let attempt_ends = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        while tokio::time::Instant::now() < attempt_ends {
            if text_of(&browser, "#log").await.contains("joined lobby") {
                break 'joined;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never joined: {}",
            text_of(&browser, "#status").await
        );
    }
    page_until(
        &browser,
        "connected over WebTransport",
        "#status",
        "over webtransport",
    )
    .await;
    let say = r#"
        document.querySelector('#say [name=text]').value = 'hello from the demo';
        document.querySelector('#say').requestSubmit();
    "#;
    browser.client.execute(say, vec![]).await.expect("form");
    // The upstream pushes `chat` to every member of the room, the sender too.
    page_until(
        &browser,
        "the chat push",
        "#log",
        "alice: hello from the demo",
    )
    .await;
    browser.close().await;
    stop.cancel();
    let _ = upstream.await;
}
