//! Router tests against real tonic servers on 127.0.0.1. No test asserts a
//! duration; conditions are awaited with bounded loops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use gatesvr_proto::client::ErrorCode;
use gatesvr_proto::upstream::upstream_service_server::{UpstreamService, UpstreamServiceServer};
use gatesvr_proto::upstream::{
    GetStatusRequest, ProcessRequestRequest, ProcessRequestResponse, UpstreamStatus,
};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};
use tonic_health::server::HealthReporter;

use super::*;
use crate::errors::ClientError;

/// What a fake upstream does with each request.
#[derive(Clone)]
enum Mode {
    /// Answers `<name>:<payload>`, with the trace-id header as `message`.
    Echo,
    /// Fails with this code.
    Fail(Code),
    /// Waits for a permit of this semaphore, then echoes.
    Hold(Arc<Semaphore>),
}

#[derive(Clone)]
struct FakeUpstream {
    name: &'static str,
    mode: Mode,
    calls: Arc<AtomicU32>,
    /// What `GetStatus` reports as `healthy`; `None`: `UNIMPLEMENTED`.
    healthy: Option<Arc<AtomicBool>>,
}

#[tonic::async_trait]
impl UpstreamService for FakeUpstream {
    async fn process_request(
        &self,
        request: Request<ProcessRequestRequest>,
    ) -> Result<Response<ProcessRequestResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let trace = request
            .metadata()
            .get(TRACE_ID_METADATA)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let req = request.into_inner();
        match &self.mode {
            Mode::Echo => {}
            Mode::Fail(code) => return Err(Status::new(*code, "fake failure")),
            Mode::Hold(gate) => {
                let _permit = gate
                    .acquire()
                    .await
                    .map_err(|_| Status::internal("gate closed"))?;
            }
        }
        let mut payload = format!("{}:", self.name).into_bytes();
        payload.extend_from_slice(&req.payload);
        Ok(Response::new(ProcessRequestResponse {
            app_code: 0,
            payload,
            message: trace,
        }))
    }

    async fn get_status(
        &self,
        _: Request<GetStatusRequest>,
    ) -> Result<Response<UpstreamStatus>, Status> {
        let Some(healthy) = &self.healthy else {
            return Err(Status::unimplemented("GetStatus"));
        };
        Ok(Response::new(UpstreamStatus {
            healthy: healthy.load(Ordering::SeqCst),
            ..UpstreamStatus::default()
        }))
    }
}

/// A fake upstream serving on 127.0.0.1 until dropped.
struct Served {
    addr: SocketAddr,
    calls: Arc<AtomicU32>,
    /// `grpc.health.v1` status, when served.
    health: HealthReporter,
    /// `GetStatus.healthy`.
    healthy: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Served {
    fn instance(&self) -> Instance {
        Instance::new(format!("id-{}", self.addr), self.addr.to_string()).unwrap()
    }
}

async fn serve(name: &'static str, mode: Mode) -> Served {
    serve_with(name, mode, Probes::Both).await
}

/// Which health probes a fake upstream answers.
#[derive(Clone, Copy, PartialEq)]
enum Probes {
    Both,
    /// `GetStatus` only: no `grpc.health.v1` service.
    GetStatusOnly,
    /// `grpc.health.v1` only: `GetStatus` is `UNIMPLEMENTED`.
    GrpcHealthOnly,
}

async fn serve_with(name: &'static str, mode: Mode, probes: Probes) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let healthy = Arc::new(AtomicBool::new(true));
    let upstream = FakeUpstream {
        name,
        mode,
        calls: calls.clone(),
        healthy: (probes != Probes::GrpcHealthOnly).then(|| healthy.clone()),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    let task = tokio::spawn(async move {
        let router = Server::builder().add_service(UpstreamServiceServer::new(upstream));
        let router = if probes == Probes::GetStatusOnly {
            router
        } else {
            router.add_service(health_service)
        };
        let _ = router
            .serve_with_incoming(TcpIncoming::from(listener))
            .await;
    });
    Served {
        addr,
        calls,
        health,
        healthy,
        task,
    }
}

fn test_config() -> UpstreamConfig {
    UpstreamConfig {
        upstream_timeout: Duration::from_secs(10),
        // Tests drive checks with `check_all`.
        health_check_interval: Duration::ZERO,
        unhealthy_threshold: 1,
        outlier_detection: OutlierDetectionConfig {
            consecutive_errors: 3,
            ..OutlierDetectionConfig::default()
        },
        ..UpstreamConfig::default()
    }
}

fn router(cfg: UpstreamConfig) -> (Arc<UpstreamRouter>, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let router = UpstreamRouter::new(cfg, &registry).unwrap();
    (Arc::new(router), registry)
}

fn request(zone: &str, payload: &str) -> ForwardRequest {
    ForwardRequest {
        openid: "alice".into(),
        session_id: "s1".into(),
        zone: zone.into(),
        node_id: "node-1".into(),
        msg_id: 1,
        seq_id: 1,
        payload: Bytes::from(payload.to_owned()),
        trace_id: "trace-123".into(),
    }
}

/// `gatesvr_upstream_requests_total{zone,outcome}`, read from the text exposition.
fn requests_total(registry: &prometheus::Registry, zone: &str, outcome: &str) -> u64 {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    let (zone, outcome) = (format!("zone=\"{zone}\""), format!("outcome=\"{outcome}\""));
    text.lines()
        .filter(|l| l.starts_with("gatesvr_upstream_requests_total{"))
        .filter(|l| l.contains(&zone) && l.contains(&outcome))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn forwards_to_the_zone_with_trace_id_and_counts_it() {
    let one = serve("one", Mode::Echo).await;
    let two = serve("two", Mode::Echo).await;
    let (router, registry) = router(test_config());
    router.set_zone_instances("001", vec![one.instance()]);
    router.set_zone_instances("002", vec![two.instance()]);

    let response = router.forward(request("002", "hi")).await.unwrap();
    assert_eq!(response.payload, b"two:hi");
    assert_eq!(
        response.message, "trace-123",
        "x-gatesvr-trace-id reaches the upstream"
    );
    let response = router.forward(request("001", "hi")).await.unwrap();
    assert_eq!(response.payload, b"one:hi");

    assert_eq!(requests_total(&registry, "002", "ok"), 1);
    assert_eq!(router.zones(), ["001", "002"]);
}

#[tokio::test]
async fn unknown_zone_and_empty_zone_fail_fast() {
    let (router, registry) = router(test_config());
    router.set_zone_instances("001", Vec::new());

    let err = router.forward(request("001", "x")).await.unwrap_err();
    assert!(matches!(err, ForwardError::NoInstances { .. }), "{err}");
    assert_eq!(
        ClientError::forward(&err).code,
        ErrorCode::UpstreamUnavailable
    );

    let err = router.forward(request("zzz", "x")).await.unwrap_err();
    assert!(matches!(err, ForwardError::UnknownZone { .. }), "{err}");
    assert_eq!(
        requests_total(&registry, "unknown", "unknown_zone"),
        1,
        "bad zone ids share one label"
    );
}

#[tokio::test]
async fn slow_upstream_times_out() {
    // Never released: the upstream does not answer.
    let gate = Arc::new(Semaphore::new(0));
    let slow = serve("slow", Mode::Hold(gate)).await;
    let cfg = UpstreamConfig {
        upstream_timeout: Duration::from_millis(200),
        ..test_config()
    };
    let (router, _registry) = router(cfg);
    router.set_zone_instances("001", vec![slow.instance()]);

    let err = router.forward(request("001", "x")).await.unwrap_err();
    assert!(matches!(err, ForwardError::Timeout { .. }), "{err}");
    assert_eq!(ClientError::forward(&err).code, ErrorCode::UpstreamTimeout);
    assert_eq!(slow.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn erroring_instance_fails_requests_then_is_ejected() {
    let bad = serve("bad", Mode::Fail(Code::Internal)).await;
    let good = serve("good", Mode::Echo).await;
    let (router, _registry) = router(test_config());
    router.set_zone_instances("001", vec![bad.instance(), good.instance()]);

    let mut saw_upstream_error = false;
    let mut ejected = false;
    for _ in 0..500 {
        match router.forward(request("001", "x")).await {
            Ok(response) => assert_eq!(response.payload, b"good:x"),
            Err(err) => {
                assert!(matches!(err, ForwardError::Upstream { .. }), "{err}");
                assert_eq!(ClientError::forward(&err).code, ErrorCode::UpstreamError);
                saw_upstream_error = true;
            }
        }
        let statuses = router.instances("001").unwrap();
        if statuses.iter().any(|s| s.state == InstanceState::Ejected) {
            assert_eq!(statuses[0].instance.addr(), bad.addr.to_string());
            assert_eq!(statuses[0].state, InstanceState::Ejected);
            ejected = true;
            break;
        }
    }
    assert!(
        saw_upstream_error && ejected,
        "error seen: {saw_upstream_error}, ejected: {ejected}"
    );

    // While ejected, the bad instance gets nothing.
    let calls_before = bad.calls.load(Ordering::SeqCst);
    for _ in 0..20 {
        router.forward(request("001", "x")).await.unwrap();
    }
    assert_eq!(bad.calls.load(Ordering::SeqCst), calls_before);
}

#[tokio::test]
async fn dead_address_is_unavailable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let (router, _registry) = router(test_config());
    router.set_zone_instances(
        "001",
        vec![Instance::new("dead", addr.to_string()).unwrap()],
    );

    let err = router.forward(request("001", "x")).await.unwrap_err();
    assert!(matches!(err, ForwardError::Unavailable { .. }), "{err}");
    assert_eq!(
        ClientError::forward(&err).code,
        ErrorCode::UpstreamUnavailable
    );
    assert!(
        err.to_string().contains(&addr.to_string()),
        "errors name the instance: {err}"
    );
    assert!(
        !ClientError::forward(&err)
            .message
            .contains(&addr.to_string()),
        "the client never sees it"
    );
}

#[tokio::test]
async fn concurrency_cap_refuses_without_waiting() {
    let gate = Arc::new(Semaphore::new(0));
    let held = serve("held", Mode::Hold(gate.clone())).await;
    let cfg = UpstreamConfig {
        max_upstream_concurrent: 2,
        ..test_config()
    };
    let (router, registry) = router(cfg);
    router.set_zone_instances("001", vec![held.instance()]);

    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let router = router.clone();
            tokio::spawn(async move { router.forward(request("001", "x")).await })
        })
        .collect();
    for _ in 0..500 {
        if held.calls.load(Ordering::SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        held.calls.load(Ordering::SeqCst),
        2,
        "both requests reached the upstream"
    );

    let err = router.forward(request("001", "x")).await.unwrap_err();
    assert!(matches!(err, ForwardError::Overloaded { .. }), "{err}");
    assert_eq!(ClientError::forward(&err).code, ErrorCode::Overloaded);
    assert_eq!(err.retry_after_ms(), Some(100));
    assert_eq!(
        held.calls.load(Ordering::SeqCst),
        2,
        "the refused request was not sent"
    );

    gate.add_permits(2);
    for task in in_flight {
        task.await.unwrap().unwrap();
    }
    // Permits are back.
    router
        .forward(request("001", "x"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(requests_total(&registry, "001", "overloaded"), 1);
}

#[tokio::test]
async fn health_checks_take_instances_out_and_back() {
    let up = serve("up", Mode::Echo).await;
    let (router, registry) = router(test_config());
    router.set_zone_instances("001", vec![up.instance()]);

    up.healthy.store(false, Ordering::SeqCst);
    router.check_all().await;
    assert_eq!(
        router.instances("001").unwrap()[0].state,
        InstanceState::Unhealthy
    );
    // Its only instance failing checks puts the zone in panic: the request
    // is still tried (Envoy's panic threshold) and counted.
    let response = router.forward(request("001", "x")).await.unwrap();
    assert_eq!(response.payload, b"up:x");
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("gatesvr_upstream_panic_routed_total{zone=\"001\"} 1"),
        "{text}"
    );

    up.healthy.store(true, Ordering::SeqCst);
    router.check_all().await;
    assert_eq!(
        router.instances("001").unwrap()[0].state,
        InstanceState::Healthy
    );
    router.forward(request("001", "x")).await.unwrap();
}

#[tokio::test]
async fn an_upstream_with_only_get_status_stays_in_rotation() {
    let up = serve_with("up", Mode::Echo, Probes::GetStatusOnly).await;
    let (router, _registry) = router(test_config()); // unhealthy_threshold 1
    router.set_zone_instances("001", vec![up.instance()]);
    for _ in 0..3 {
        router.check_all().await;
        assert_eq!(
            router.instances("001").unwrap()[0].state,
            InstanceState::Healthy
        );
    }
    up.healthy.store(false, Ordering::SeqCst);
    router.check_all().await;
    assert_eq!(
        router.instances("001").unwrap()[0].state,
        InstanceState::Unhealthy,
        "GetStatus.healthy decides"
    );
}

#[tokio::test]
async fn an_upstream_without_get_status_is_probed_with_grpc_health() {
    let up = serve_with("up", Mode::Echo, Probes::GrpcHealthOnly).await;
    let (router, _registry) = router(test_config());
    router.set_zone_instances("001", vec![up.instance()]);
    router.check_all().await;
    assert_eq!(
        router.instances("001").unwrap()[0].state,
        InstanceState::Healthy
    );
    up.health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    router.check_all().await;
    assert_eq!(
        router.instances("001").unwrap()[0].state,
        InstanceState::Unhealthy
    );
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_another_instance() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let live = serve("live", Mode::Echo).await;
    let (router, registry) = router(test_config());
    router.set_zone_instances(
        "001",
        vec![
            Instance::new("dead", dead.to_string()).unwrap(),
            live.instance(),
        ],
    );
    // Health checks are off and ejection needs 3 failures: the dead instance
    // stays in rotation, so without the retry about half would fail.
    for i in 0..20 {
        let answer = router
            .forward(request("001", &i.to_string()))
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(answer.payload, format!("live:{i}").into_bytes());
    }
    assert_eq!(live.calls.load(Ordering::SeqCst), 20, "each executed once");
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("gatesvr_upstream_retried_total{zone=\"001\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn a_request_that_may_have_run_is_not_retried() {
    let bad = serve("bad", Mode::Fail(Code::Internal)).await;
    let good = serve("good", Mode::Echo).await;
    let (router, _registry) = router(test_config());
    router.set_zone_instances("001", vec![bad.instance(), good.instance()]);
    let mut failed = 0;
    for _ in 0..20 {
        if router.forward(request("001", "x")).await.is_err() {
            failed += 1;
        }
    }
    let (bad_calls, good_calls) = (
        bad.calls.load(Ordering::SeqCst),
        good.calls.load(Ordering::SeqCst),
    );
    assert!(
        bad_calls > 0,
        "the failing instance was picked at least once"
    );
    assert_eq!(failed, bad_calls, "its failures reached the caller");
    assert_eq!(bad_calls + good_calls, 20, "no request was sent twice");
}

#[tokio::test]
async fn replace_all_drops_missing_zones() {
    let up = serve("up", Mode::Echo).await;
    let (router, _registry) = router(test_config());
    router.replace_all(HashMap::from([
        ("001".to_owned(), vec![up.instance()]),
        ("002".to_owned(), vec![up.instance()]),
    ]));
    router.forward(request("002", "x")).await.unwrap();

    router.replace_all(HashMap::from([("001".to_owned(), vec![up.instance()])]));
    assert_eq!(router.zones(), ["001"]);
    let err = router.forward(request("002", "x")).await.unwrap_err();
    assert!(matches!(err, ForwardError::UnknownZone { .. }), "{err}");
    router.forward(request("001", "x")).await.unwrap();
}

/// Every request's future is moved by value (into the connection's box of
/// executing requests, and into each caller's state on the way down), so its
/// size is copied per request: 4,832 bytes before session 12, where 14% of
/// the data plane's saturated CPU was `memcpy` (docs/benchmarks.md). The unary
/// call and the stream's dial are boxed to keep them out of it; this fails if
/// a large future is inlined again.
#[tokio::test]
async fn a_request_future_stays_small() {
    let (r, _) = router(UpstreamConfig::default());
    let handler = crate::upstream::handler::Handler::Upstream(r.clone());
    let identity = crate::session::SessionIdentity::default();
    let request = gatesvr_proto::client::ClientRequest::default();
    let handle = handler.handle("node", &identity, &request);
    let size = std::mem::size_of_val(&handle);
    assert!(size <= 2560, "Handler::handle's future is {size} bytes");
    let channel = tonic::transport::Channel::from_static("http://127.0.0.1:1").connect_lazy();
    let link = stream::StreamLink::new(
        channel,
        stream::LinkConfig {
            node_id: String::new(),
            connect_timeout: Duration::from_secs(1),
            max_pushes_in_flight: 1,
            max_requests_in_flight: 1,
        },
        Arc::new(std::sync::OnceLock::new()),
        Arc::new(prometheus::IntGauge::new("outstanding", "test").unwrap()),
    );
    let call = link.call(Default::default(), Duration::from_secs(1));
    let size = std::mem::size_of_val(&call);
    assert!(size <= 1024, "StreamLink::call's future is {size} bytes");
}
