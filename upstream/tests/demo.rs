//! The demo upstream over real gRPC on 127.0.0.1: echo through a tonic client,
//! `say` pushing through a fake GatewayService, health during shutdown, and
//! registration against a fake control plane. Conditions are awaited with
//! bounded polls; no test asserts a duration.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use gate_upstream::Config;
use gate_upstream::commands::app_code;
use gatesvr_proto::control::control_plane_server::{ControlPlane, ControlPlaneServer};
use gatesvr_proto::control::*;
use gatesvr_proto::upstream::gateway_service_server::{GatewayService, GatewayServiceServer};
use gatesvr_proto::upstream::upstream_service_client::UpstreamServiceClient;
use gatesvr_proto::upstream::*;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Polls `cond` every 20ms, at most 250 times (5s).
async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    for _ in 0..250 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A running gate-upstream.
struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), gate_upstream::Error>>,
}

impl Running {
    async fn start(cfg: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gate_upstream::run(cfg, listener, async {
            let _ = stopped.await;
        }));
        let running = Self {
            addr,
            stop: Some(stop),
            task,
        };
        eventually("upstream SERVING", async || {
            running.health().await == Some(ServingStatus::Serving)
        })
        .await;
        running
    }

    fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_lazy()
    }

    async fn health(&self) -> Option<ServingStatus> {
        let response = HealthClient::new(self.channel())
            .check(HealthCheckRequest::default())
            .await
            .ok()?;
        ServingStatus::try_from(response.into_inner().status).ok()
    }

    async fn call(&self, openid: &str, seq_id: u64, payload: &str) -> ProcessRequestResponse {
        let request = ProcessRequestRequest {
            openid: openid.into(),
            session_id: format!("session-{openid}"),
            zone: "003".into(),
            node_id: "dp-1".into(),
            msg_id: 7,
            seq_id,
            payload: payload.as_bytes().to_vec().into(),
            trace_id: "t-1".into(),
        };
        UpstreamServiceClient::new(self.channel())
            .process_request(request)
            .await
            .unwrap()
            .into_inner()
    }

    /// Triggers shutdown without waiting for it.
    fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and checks `run` returned Ok.
    async fn stop(mut self) {
        self.begin_stop();
        self.task.await.unwrap().unwrap();
    }
}

fn json(payload: &[u8]) -> Value {
    serde_json::from_slice(payload)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(payload)))
}

/// Serves `router` (a fake gateway or control plane) on 127.0.0.1.
async fn serve(router: Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = router
            .serve_with_incoming(TcpIncoming::from(listener))
            .await;
    });
    (addr, task)
}

#[tokio::test]
async fn echo_answers_with_the_serving_zone() {
    let upstream = Running::start(Config::new("003", "127.0.0.1:1")).await;

    let response = upstream.call("alice", 42, "echo hello there").await;
    assert_eq!(response.app_code, app_code::OK, "{}", response.message);
    let body = json(&response.payload);
    assert_eq!(body["zone"], "003");
    assert_eq!(body["openid"], "alice");
    assert_eq!(body["seq_id"], 42);
    assert_eq!(body["echo"], "hello there");

    let response = upstream.call("alice", 43, "whoami").await;
    assert_eq!(json(&response.payload)["session_id"], "session-alice");

    let response = upstream.call("alice", 44, "dance").await;
    assert_eq!(response.app_code, app_code::UNKNOWN_COMMAND);
    assert!(response.message.contains("dance"), "{}", response.message);

    let status = UpstreamServiceClient::new(upstream.channel())
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status.zone.as_str(), status.healthy, status.requests_total),
        ("003", true, 3)
    );
    upstream.stop().await;
}

/// Records pushes; refuses pushes to `refuse`.
#[derive(Clone, Default)]
struct FakeGateway {
    pushes: Arc<Mutex<Vec<PushToClientRequest>>>,
    refuse: Option<&'static str>,
}

#[tonic::async_trait]
impl GatewayService for FakeGateway {
    async fn push_to_client(
        &self,
        request: Request<PushToClientRequest>,
    ) -> Result<Response<PushToClientResponse>, Status> {
        let push = request.into_inner();
        if self.refuse == Some(push.target_id.as_str()) {
            return Err(Status::resource_exhausted("queue full"));
        }
        self.pushes.lock().push(push);
        Ok(Response::new(PushToClientResponse {
            seq_id: 1,
            ..Default::default()
        }))
    }

    async fn push_batch(
        &self,
        _: Request<gatesvr_proto::upstream::PushBatchRequest>,
    ) -> Result<Response<gatesvr_proto::upstream::PushBatchResponse>, Status> {
        Err(Status::unimplemented("the demo upstream does not batch"))
    }

    async fn broadcast_to_clients(
        &self,
        request: Request<BroadcastRequest>,
    ) -> Result<Response<BroadcastResponse>, Status> {
        let zones = request.into_inner().zones;
        Ok(Response::new(BroadcastResponse {
            queued: zones.len() as u32 * 10,
            rejected: 0,
        }))
    }

    async fn get_status(
        &self,
        _: Request<GatewayStatusRequest>,
    ) -> Result<Response<GatewayStatus>, Status> {
        Ok(Response::new(GatewayStatus::default()))
    }
}

#[tokio::test]
async fn say_pushes_to_every_member_through_the_gateway() {
    let gateway = FakeGateway {
        refuse: Some("dave"),
        ..FakeGateway::default()
    };
    let (gateway_addr, _gateway_task) =
        serve(Server::builder().add_service(GatewayServiceServer::new(gateway.clone()))).await;
    let upstream = Running::start(Config::new("003", gateway_addr.to_string())).await;

    for who in ["alice", "bob"] {
        let response = upstream.call(who, 1, "join lobby").await;
        assert_eq!(response.app_code, app_code::OK, "{}", response.message);
    }
    let response = upstream.call("alice", 2, "say lobby hello all").await;
    assert_eq!(response.app_code, app_code::OK, "{}", response.message);
    let body = json(&response.payload);
    assert_eq!(
        (body["pushed"].as_u64(), body["failed"].as_u64()),
        (Some(2), Some(0))
    );

    let mut pushes = gateway.pushes.lock().clone();
    pushes.sort_by(|a, b| a.target_id.cmp(&b.target_id));
    let targets: Vec<_> = pushes.iter().map(|p| p.target_id.as_str()).collect();
    assert_eq!(targets, ["alice", "bob"], "every member, and only members");
    for push in &pushes {
        assert_eq!(push.target_type, TargetType::Openid as i32);
        assert_eq!(
            (push.msg_type.as_str(), push.content.as_str()),
            ("chat", "hello all")
        );
        let data = json(&push.data);
        assert_eq!(
            (data["room"].as_str(), data["from"].as_str()),
            (Some("lobby"), Some("alice"))
        );
    }

    // Not a member: refused, nothing pushed.
    let response = upstream.call("carol", 3, "say lobby hi").await;
    assert_eq!(response.app_code, app_code::NOT_A_MEMBER);
    assert_eq!(gateway.pushes.lock().len(), 2);

    // A push the gateway refuses is reported, the others still go out.
    upstream.call("dave", 4, "join lobby").await;
    let response = upstream.call("bob", 5, "say lobby again").await;
    assert_eq!(response.app_code, app_code::PUSH_FAILED);
    let body = json(&response.payload);
    assert_eq!(
        (body["pushed"].as_u64(), body["failed"].as_u64()),
        (Some(2), Some(1))
    );

    let response = upstream.call("bob", 6, "broadcast maintenance").await;
    assert_eq!(
        json(&response.payload)["queued"],
        10,
        "broadcast is limited to our zone"
    );
    upstream.stop().await;
}

#[tokio::test]
async fn shutdown_reports_not_serving_before_it_stops() {
    let mut cfg = Config::new("001", "127.0.0.1:1");
    // Long enough to observe; the test does not wait for it to end by time.
    cfg.drain_delay = Duration::from_secs(2);
    let mut upstream = Running::start(cfg).await;
    upstream.begin_stop();
    eventually("NOT_SERVING while draining", async || {
        upstream.health().await == Some(ServingStatus::NotServing)
    })
    .await;
    // Still answering requests while draining.
    assert_eq!(
        upstream.call("alice", 1, "echo still here").await.app_code,
        app_code::OK
    );
    upstream.stop().await;
}

/// Records registrations; the first `fail_first` RegisterUpstream calls fail,
/// and every call fails while `down` is set (a member cut off from its leader).
/// While `hang` is set, heartbeats are never answered (a member behind a
/// partition that drops packets). With `lease` set, the lease it grants lapses
/// `lease.ttl` after its last renewal, and a heartbeat after that is refused
/// NOT_FOUND, as the control plane refuses it; members that clone one `lease`
/// share it, as the members of one raft group do.
#[derive(Clone, Default)]
struct FakeControlPlane {
    log: Arc<Mutex<Vec<String>>>,
    fail_first: Arc<Mutex<u32>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    hang: Arc<std::sync::atomic::AtomicBool>,
    lease: Option<Arc<Lease>>,
}

/// A lease the fake members enforce: its time to live and its last renewal.
struct Lease {
    ttl: Duration,
    renewed: Mutex<Option<tokio::time::Instant>>,
}

impl FakeControlPlane {
    fn check_up(&self) -> Result<(), Status> {
        if self.down.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Status::unavailable("no leader"));
        }
        Ok(())
    }

    /// Renews the lease, or refuses a renewal that comes after it lapsed.
    fn renew(&self) -> Result<(), Status> {
        let Some(lease) = &self.lease else {
            return Ok(());
        };
        let mut renewed = lease.renewed.lock();
        let now = tokio::time::Instant::now();
        if renewed.is_some_and(|at| now - at > lease.ttl) {
            *renewed = None;
            self.log.lock().push("expired".into());
            return Err(Status::not_found("unknown instance"));
        }
        *renewed = Some(now);
        Ok(())
    }

    fn heartbeats(&self) -> usize {
        let log = self.log.lock();
        log.iter().filter(|l| l.starts_with("heartbeat ")).count()
    }
}

type WatchStream = Pin<Box<dyn futures::Stream<Item = Result<WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ControlPlane for FakeControlPlane {
    async fn register_upstream(
        &self,
        request: Request<RegisterUpstreamRequest>,
    ) -> Result<Response<RegisterUpstreamResponse>, Status> {
        self.check_up()?;
        {
            let mut fail = self.fail_first.lock();
            if *fail > 0 {
                *fail -= 1;
                return Err(Status::unavailable("not yet"));
            }
        }
        let r = request.into_inner();
        self.log.lock().push(format!(
            "register {} {} {}",
            r.zone, r.address, r.service_name
        ));
        let lease_ttl_ms = match &self.lease {
            Some(lease) => {
                *lease.renewed.lock() = Some(tokio::time::Instant::now());
                lease.ttl.as_millis() as u32
            }
            None => r.lease_ttl_ms,
        };
        Ok(Response::new(RegisterUpstreamResponse {
            instance_id: "up-1".into(),
            lease_ttl_ms,
            heartbeat_interval_ms: 50,
        }))
    }

    async fn heartbeat_upstream(
        &self,
        request: Request<HeartbeatUpstreamRequest>,
    ) -> Result<Response<HeartbeatUpstreamResponse>, Status> {
        self.check_up()?;
        if self.hang.load(std::sync::atomic::Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
        self.renew()?;
        self.log
            .lock()
            .push(format!("heartbeat {}", request.into_inner().instance_id));
        Ok(Response::new(HeartbeatUpstreamResponse::default()))
    }

    async fn deregister_upstream(
        &self,
        request: Request<DeregisterUpstreamRequest>,
    ) -> Result<Response<DeregisterUpstreamResponse>, Status> {
        self.log
            .lock()
            .push(format!("deregister {}", request.into_inner().instance_id));
        Ok(Response::new(DeregisterUpstreamResponse {}))
    }

    async fn register_node(
        &self,
        _: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn heartbeat_node(
        &self,
        _: Request<HeartbeatNodeRequest>,
    ) -> Result<Response<HeartbeatNodeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn claim_sessions(
        &self,
        _: Request<ClaimSessionsRequest>,
    ) -> Result<Response<ClaimSessionsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn release_sessions(
        &self,
        _: Request<ReleaseSessionsRequest>,
    ) -> Result<Response<ReleaseSessionsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn transfer_session(
        &self,
        _: Request<TransferSessionRequest>,
    ) -> Result<Response<TransferSessionResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn leave_node(
        &self,
        _: Request<LeaveNodeRequest>,
    ) -> Result<Response<LeaveNodeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn lookup_owners(
        &self,
        _: Request<gatesvr_proto::control::LookupOwnersRequest>,
    ) -> Result<Response<gatesvr_proto::control::LookupOwnersResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

#[tokio::test]
async fn registers_retries_heartbeats_and_deregisters() {
    let control = FakeControlPlane {
        fail_first: Arc::new(Mutex::new(2)),
        ..FakeControlPlane::default()
    };
    let (control_addr, _control_task) =
        serve(Server::builder().add_service(ControlPlaneServer::new(control.clone()))).await;
    let mut cfg = Config::new("002", "127.0.0.1:1");
    cfg.control_plane = vec![control_addr.to_string()];
    cfg.advertise_addr = Some("10.0.0.7:9001".into());
    let upstream = Running::start(cfg).await;

    eventually("registered after retries, then heartbeats", async || {
        control
            .log
            .lock()
            .iter()
            .filter(|l| l.starts_with("heartbeat up-1"))
            .count()
            >= 2
    })
    .await;
    assert_eq!(control.log.lock()[0], "register 002 10.0.0.7:9001 demo");
    assert_eq!(
        *control.fail_first.lock(),
        0,
        "the failed attempts were retried"
    );

    upstream.stop().await;
    assert_eq!(
        control.log.lock().last().map(String::as_str),
        Some("deregister up-1")
    );
}

/// With every control-plane member given, a dead one and one that cannot
/// commit are passed over: the instance registers through the first live
/// member and keeps its lease through the next when that one fails.
#[tokio::test]
async fn a_failing_control_plane_member_is_passed_over() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let (a, b) = (FakeControlPlane::default(), FakeControlPlane::default());
    let (a_addr, _a_task) =
        serve(Server::builder().add_service(ControlPlaneServer::new(a.clone()))).await;
    let (b_addr, _b_task) =
        serve(Server::builder().add_service(ControlPlaneServer::new(b.clone()))).await;
    let mut cfg = Config::new("002", "127.0.0.1:1");
    cfg.control_plane = vec![dead.to_string(), a_addr.to_string(), b_addr.to_string()];
    let upstream = Running::start(cfg).await;

    eventually("registered through the first live member", async || {
        a.heartbeats() >= 2
    })
    .await;
    assert!(a.log.lock()[0].starts_with("register 002 "));
    assert!(b.log.lock().is_empty(), "{:?}", b.log.lock());

    a.down.store(true, std::sync::atomic::Ordering::Relaxed);
    eventually("heartbeats move to the next member", async || {
        b.heartbeats() >= 2
    })
    .await;
    assert!(
        !b.log.lock().iter().any(|l| l.starts_with("register")),
        "the lease was kept, not registered again: {:?}",
        b.log.lock()
    );
    upstream.stop().await;
    assert_eq!(
        b.log.lock().last().map(String::as_str),
        Some("deregister up-1")
    );
}

/// A member that stops answering (no refusal, no reset: its packets are
/// dropped) is given up within the heartbeat's deadline, 1 s at this
/// 50 ms interval, and the next member renews the lease before its 2.5 s
/// run out. Waiting the 5 s of any other call there would lose the lease:
/// the instance would be dropped from its zone and registered again.
#[tokio::test]
async fn a_member_that_stops_answering_is_left_before_the_lease_lapses() {
    let lease = Arc::new(Lease {
        ttl: Duration::from_millis(2500),
        renewed: Mutex::new(None),
    });
    let a = FakeControlPlane {
        lease: Some(lease.clone()),
        ..FakeControlPlane::default()
    };
    let b = FakeControlPlane {
        lease: Some(lease),
        ..FakeControlPlane::default()
    };
    let (a_addr, _a_task) =
        serve(Server::builder().add_service(ControlPlaneServer::new(a.clone()))).await;
    let (b_addr, _b_task) =
        serve(Server::builder().add_service(ControlPlaneServer::new(b.clone()))).await;
    let mut cfg = Config::new("002", "127.0.0.1:1");
    cfg.control_plane = vec![a_addr.to_string(), b_addr.to_string()];
    let upstream = Running::start(cfg).await;

    eventually("registered through the first member", async || {
        a.heartbeats() >= 2
    })
    .await;
    a.hang.store(true, std::sync::atomic::Ordering::Relaxed);
    eventually("heartbeats move to the next member", async || {
        b.heartbeats() >= 2
    })
    .await;
    let log = b.log.lock().clone();
    assert!(
        !log.iter()
            .any(|l| l == "expired" || l.starts_with("register")),
        "the lease lapsed while a heartbeat waited on the silent member: {log:?}"
    );
    upstream.stop().await;
}

#[tokio::test]
async fn serves_while_the_control_plane_is_unreachable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let mut cfg = Config::new("002", "127.0.0.1:1");
    cfg.control_plane = vec![dead.to_string()];
    let upstream = Running::start(cfg).await;
    assert_eq!(
        upstream.call("alice", 1, "echo ok").await.app_code,
        app_code::OK
    );
    upstream.stop().await;
}
