//! Zones, upstream forwarding, push and broadcast end to end, overload
//! protection by reason, and observability: one data-plane node, real QUIC,
//! real gRPC upstreams (the demo upstream and a fault-injecting one).

use std::time::Duration;

use gatesvr_dataplane::config::StaticZone;
use gatesvr_proto::client::ErrorCode;
use gatesvr_sdk::{Client, Event, RequestError};
use gatesvr_tests::{FakeUpstream, TestNode, http_get};
use tokio_util::sync::CancellationToken;

fn zone_of(openid: &str) -> String {
    gatesvr_proto::zone::zone_of(openid, 6)
}

fn gateway_error(r: Result<gatesvr_sdk::Response, RequestError>) -> ErrorCode {
    match r {
        Err(RequestError::Gateway { code, .. }) => code,
        other => panic!("expected a gateway error, got {other:?}"),
    }
}

/// Starts one demo upstream for `zone`, pushing through `gateway`.
async fn demo_upstream(
    zone: &str,
    gateway: std::net::SocketAddr,
    stop: &CancellationToken,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = gate_upstream::Config::new(zone, gateway.to_string());
    cfg.addr = addr;
    let stop = stop.clone();
    tokio::spawn(async move { gate_upstream::run(cfg, listener, stop.cancelled_owned()).await });
    addr
}

#[tokio::test]
async fn requests_reach_their_zone_and_pushes_flow_back() {
    // Zones 006 (alice, user-2) and 001 (bob) get a demo upstream each; the
    // upstreams need the gateway's gRPC address, so add them after start.
    let node = TestNode::start_routed(|_| {}).await;
    let stop = CancellationToken::new();
    let grpc = node.dp.grpc_addr();
    let router = match &node.dp.node().handler {
        gatesvr_dataplane::Handler::Upstream(r) => r.clone(),
        gatesvr_dataplane::Handler::Echo => unreachable!("routed node"),
    };
    for zone in ["006", "001"] {
        let addr = demo_upstream(zone, grpc, &stop).await;
        let instance =
            gatesvr_dataplane::upstream::Instance::new(addr.to_string(), addr.to_string()).unwrap();
        router.set_zone_instances(zone, vec![instance]);
    }

    let alice = Client::connect(node.client_config("alice")).await.unwrap();
    let bob = Client::connect(node.client_config("bob")).await.unwrap();
    let user2 = Client::connect(node.client_config("user-2")).await.unwrap();
    for (client, openid) in [(&alice, "alice"), (&bob, "bob")] {
        let r = client.request(1, "echo ping").await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(
            body["zone"],
            zone_of(openid),
            "served by the zone's upstream"
        );
        assert_eq!(body["openid"], openid);
        assert_eq!(r.zone, zone_of(openid));
    }

    // A zone with no upstream: a clear error, not a hang.
    let carol = Client::connect(node.client_config("user-1")).await.unwrap();
    assert_eq!(zone_of("user-1"), "003");
    assert_eq!(
        gateway_error(carol.request(1, "echo x").await),
        ErrorCode::UpstreamUnavailable
    );

    // Chat: the upstream pushes to every room member through GatewayService.
    alice.request(1, "join lobby").await.unwrap();
    user2.request(1, "join lobby").await.unwrap();
    alice.request(1, "say lobby hello room").await.unwrap();
    for client in [&alice, &user2] {
        let push = next_push(client).await;
        assert_eq!(push.content, "hello room");
        assert_eq!(push.msg_type, "chat");
    }
    // Broadcast from zone 006's upstream reaches the zone's sessions only.
    user2
        .request(1, "broadcast to everyone in 006")
        .await
        .unwrap();
    for client in [&alice, &user2] {
        assert_eq!(next_push(client).await.content, "to everyone in 006");
    }
    // Bob (zone 001) sees his own session start and nothing else.
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(300), bob.next_event()).await
    {
        assert!(
            !matches!(event, Event::Push(_)),
            "bob got a zone-006 broadcast: {event:?}"
        );
    }

    // The upstream dies: requests fail cleanly and the node stays up.
    stop.cancel();
    let mut code = ErrorCode::Ok;
    for _ in 0..50 {
        match alice.request(1, "echo after death").await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                code = gateway_error(Err(e));
                break;
            }
        }
    }
    assert_eq!(code, ErrorCode::UpstreamUnavailable);
    assert_eq!(http_get(node.dp.http_addr(), "/health").await.0, 200);
}

async fn next_push(client: &Client) -> gatesvr_sdk::Push {
    loop {
        match tokio::time::timeout(gatesvr_tests::PATIENCE, client.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Push(p) => return p,
            _ => continue,
        }
    }
}

/// A node whose every zone is served by one fault-injecting upstream.
async fn faulty_node(
    tweak: impl FnOnce(&mut gatesvr_dataplane::DataPlaneConfig),
) -> (TestNode, FakeUpstream, CancellationToken) {
    let fake = FakeUpstream::default();
    let stop = CancellationToken::new();
    let addr = fake.serve(stop.clone()).await;
    let node = TestNode::start_routed(|c| {
        c.upstream.health_check_interval = Duration::ZERO;
        c.zones.upstreams = (0..6)
            .map(|z| StaticZone {
                zone: gatesvr_proto::zone::zone_id(z),
                addrs: vec![addr.to_string()],
            })
            .collect();
        tweak(c);
    })
    .await;
    (node, fake, stop)
}

#[tokio::test]
async fn slow_and_failing_upstreams_map_to_distinct_codes() {
    let (node, fake, _stop) = faulty_node(|c| {
        c.overload_protection.upstream_timeout = Duration::from_millis(300);
        c.upstream.outlier_detection.consecutive_errors = 1000;
    })
    .await;
    let client = Client::connect(node.client_config("dan")).await.unwrap();
    assert_eq!(
        &client.request(1, "plain").await.unwrap().payload[..],
        b"plain"
    );
    assert_eq!(
        gateway_error(client.request(1, "sleep:2000").await),
        ErrorCode::UpstreamTimeout
    );
    assert_eq!(
        gateway_error(client.request(1, "fail").await),
        ErrorCode::UpstreamError
    );
    assert_eq!(
        gateway_error(client.request(1, "shed").await),
        ErrorCode::UpstreamOverloaded
    );
    assert_eq!(fake.executed(), 4);
    let m = node.metrics().await;
    let zone = zone_of("dan");
    for outcome in [
        "ok",
        "upstream_timeout",
        "upstream_error",
        "upstream_overloaded",
    ] {
        assert_eq!(
            m.get(
                "gatesvr_requests_total",
                &[("zone", &zone), ("outcome", outcome)]
            ),
            1.0,
            "{outcome}"
        );
    }
}

#[tokio::test]
async fn overload_rejections_are_explicit_and_counted_by_reason() {
    // Node request rate: a burst of 3, then OVERLOADED with a retry hint.
    let (node, _fake, _stop) = faulty_node(|c| {
        c.overload_protection.max_qps = 3;
        c.overload_protection.qps_window_seconds = 60;
    })
    .await;
    let client = Client::connect(node.client_config("erin")).await.unwrap();
    for _ in 0..3 {
        client.request(1, "ok").await.unwrap();
    }
    match client.request(1, "one too many").await {
        Err(RequestError::Gateway {
            code,
            retry_after_ms,
            ..
        }) => {
            assert_eq!(code, ErrorCode::Overloaded);
            assert!(retry_after_ms > 0);
        }
        other => panic!("expected OVERLOADED, got {other:?}"),
    }
    let m = node.metrics().await;
    assert_eq!(
        m.get(
            "gatesvr_requests_total",
            &[("zone", &zone_of("erin")), ("outcome", "overloaded")]
        ),
        1.0
    );

    // Upstream concurrency: one call in flight, the next fails at once.
    let (node, fake, _stop) =
        faulty_node(|c| c.overload_protection.max_upstream_concurrent = 1).await;
    let client = std::sync::Arc::new(Client::connect(node.client_config("fay")).await.unwrap());
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.request(1, "sleep:3000").await })
    };
    gatesvr_tests::eventually("the slow call reached the upstream", || {
        fake.executed() == 1
    })
    .await;
    assert_eq!(
        gateway_error(client.request(1, "quick").await),
        ErrorCode::Overloaded,
        "refused at once while the slow call holds the only slot"
    );
    slow.await.unwrap().unwrap();
    assert_eq!(
        fake.executed(),
        1,
        "the refused request never reached the upstream"
    );

    // Connections: beyond max_connections the handshake is refused before TLS.
    let (node, _fake, _stop) = faulty_node(|c| c.overload_protection.max_connections = 1).await;
    let first = Client::connect(node.client_config("gus")).await.unwrap();
    let second = Client::connect(node.client_config("hal").with_reconnect(false)).await;
    assert!(second.is_err(), "second connection refused");
    first
        .request(1, "existing sessions keep working")
        .await
        .unwrap();
    let m = node.metrics().await;
    assert!(
        m.get(
            "gatesvr_connections_rejected_total",
            &[("reason", "max_connections")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn observability_endpoints_and_metrics_scrape() {
    let (node, _fake, _stop) = faulty_node(|_| {}).await;
    let client = Client::connect(node.client_config("ivy")).await.unwrap();
    client.request(1, "hello").await.unwrap();

    let (status, body) = http_get(node.dp.http_addr(), "/health").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_get(node.dp.http_addr(), "/ready").await;
    assert_eq!(status, 200);
    let (status, body) = http_get(node.dp.http_addr(), "/stats").await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["sessions"], 1);
    assert_eq!(stats["sessions_per_zone"][zone_of("ivy")], 1);
    // grpc.health.v1 on the push API port, for upstreams' balancers and probes.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", node.dp.grpc_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "gatesvr.upstream.v1.GatewayService"] {
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            reply.into_inner().status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    let (status, body) = http_get(node.dp.http_addr(), "/performance").await;
    assert_eq!(status, 200);
    let perf: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(perf["request_latency_seconds"]["count"], 1);

    let m = node.metrics().await;
    for (name, ty) in [
        ("gatesvr_active_connections", "gauge"),
        ("gatesvr_sessions", "gauge"),
        ("gatesvr_message_queue_size", "gauge"),
        ("gatesvr_requests_total", "counter"),
        ("gatesvr_request_duration_seconds", "histogram"),
        ("gatesvr_upstream_requests_total", "counter"),
        ("gatesvr_upstream_request_duration_seconds", "histogram"),
    ] {
        assert_eq!(m.types.get(name).map(String::as_str), Some(ty), "{name}");
    }
    assert_eq!(m.get("gatesvr_active_connections", &[]), 1.0);
    let zone = zone_of("ivy");
    assert_eq!(
        m.get(
            "gatesvr_requests_total",
            &[("zone", &zone), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "gatesvr_upstream_requests_total",
            &[("zone", &zone), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        m.get("gatesvr_request_duration_seconds_count", &[("zone", &zone)]),
        1.0
    );
}

#[tokio::test]
async fn a_request_in_flight_when_its_connection_dies_is_answered_on_the_retry_once() {
    use gatesvr_proto::client::{ClientRequest, envelope::Body};
    let (node, fake, _stop) = faulty_node(|_| {}).await;
    let mut first = node.raw().await;
    first.start("erin", &node.dir.token("erin"), "", 0).await;
    let Some(Body::StartOk(started)) = first.recv().await else {
        panic!("no StartOk");
    };
    let request = ClientRequest {
        msg_id: 1,
        seq_id: 1,
        payload: b"sleep:300".to_vec(),
        ..Default::default()
    };
    first.send(Body::Request(request.clone())).await;
    // The upstream holds it; the client's connection dies meanwhile.
    gatesvr_tests::eventually("the upstream got the request", || fake.executed() == 1).await;
    first.conn.close(0u8.into(), b"network lost");

    let mut second = node.raw().await;
    second
        .start("erin", &node.dir.token("erin"), &started.session_id, 0)
        .await;
    assert!(matches!(second.recv().await, Some(Body::StartOk(_))));
    // The retry: answered with the first execution's result, which either
    // was already waiting in the session or arrives when it completes.
    second.send(Body::Request(request)).await;
    let response = loop {
        match second.recv().await {
            Some(Body::Response(r)) => break r,
            Some(_) => continue,
            None => panic!("the stream ended without an answer"),
        }
    };
    assert_eq!(response.seq_id, 1);
    assert_eq!(response.payload, b"sleep:300");
    assert_eq!(fake.executed(), 1, "executed once");
}
