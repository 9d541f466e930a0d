//! Sessions across data-plane nodes under control-plane ownership: takeover by
//! reconnecting elsewhere, push routing to the owner, fencing, drain, and a
//! control-plane outage. Each test states the invariants it checks and counts
//! sent / delivered / duplicates / lost.

use std::collections::BTreeMap;
use std::time::Duration;

use gatesvr_proto::client::ResumeStatus;
use gatesvr_sdk::{Client, Event};
use gatesvr_tests::cluster::{TestCluster, push};
use gatesvr_tests::{PATIENCE, eventually};

/// Delivered push contents, in arrival order, plus resume statuses seen.
#[derive(Default, Debug)]
struct Log {
    delivered: Vec<u64>,
    statuses: Vec<ResumeStatus>,
    goaways: usize,
}

impl Log {
    async fn collect_until(&mut self, client: &Client, total: usize) {
        while self.delivered.len() < total {
            let event = tokio::time::timeout(PATIENCE, client.next_event())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no event within the patience; delivered {} of {total}, missing {:?}, statuses {:?}",
                        self.delivered.len(),
                        (1..=total as u64).filter(|n| !self.delivered.contains(n)).collect::<Vec<_>>(),
                        self.statuses
                    )
                })
                .expect("client open");
            match event {
                Event::Push(p) => self.delivered.push(p.content.parse().unwrap()),
                Event::Connected { status, .. } => self.statuses.push(status),
                Event::ResumeFailed { status, .. } => panic!("resume failed: {status:?}"),
                Event::GoAway { .. } => self.goaways += 1,
                Event::Disconnected { .. } => {}
            }
        }
    }

    /// Invariant: every push exactly once, in order (no loss, no duplicate).
    fn assert_exactly_once(&self, sent: u64) {
        let expected: Vec<u64> = (1..=sent).collect();
        assert_eq!(self.delivered.len() as u64, sent, "delivered count");
        assert_eq!(self.delivered, expected, "in order, no gaps, no duplicates");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_by_reconnecting_elsewhere_loses_nothing() {
    let cluster = TestCluster::start(3, |_| {}).await;
    let client = Client::connect(cluster.client_config(0, "alice"))
        .await
        .unwrap();
    let mut log = Log::default();
    log.collect_until(&client, 0).await;
    // Pushes enter at node 3; alice's session lives on node 1: routed to the owner.
    let mut gw = cluster.gateway(2).await;
    // Node 3's watch is scoped to its own sessions: it looks alice's owner
    // up (LookupOwners) once the claim is committed.
    let dp1 = cluster.dps[0].node().cluster.clone().unwrap();
    eventually("alice's claim is committed", || {
        dp1.view().owners.contains_key("alice")
    })
    .await;
    let dp3 = cluster.dps[2].node().cluster.clone().unwrap();
    assert!(
        !dp3.view().owners.contains_key("alice"),
        "not node 3's session"
    );
    for n in 1..=100 {
        let r = gw
            .push_to_client(push("alice", n))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.node_id, "dp-1", "queued by the owner");
    }
    let lookups = &cluster.dps[2].node().metrics.owner_lookups;
    assert_eq!(
        lookups.with_label_values(&["found"]).get(),
        1,
        "looked up once, then cached"
    );
    log.collect_until(&client, 50).await;
    // The load balancer sends the reconnect to node 2, while pushes continue.
    client.reconnect_to(cluster.dps[1].quic_addr());
    let pusher = tokio::spawn(async move {
        for n in 101..=200 {
            // During the handover a push may briefly find no owner; retry it
            // (an upstream would), never count it twice.
            loop {
                match gw.push_to_client(push("alice", n)).await {
                    Ok(_) => break,
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(s) => panic!("push {n}: {s}"),
                }
            }
        }
    });
    log.collect_until(&client, 200).await;
    pusher.await.unwrap();
    log.assert_exactly_once(200);
    assert!(
        log.statuses.contains(&ResumeStatus::Resumed),
        "{:?}",
        log.statuses
    );
    // Single owner: node 2 holds the session, node 1 no longer does.
    assert!(cluster.dps[1].node().registry.get("alice").is_some());
    assert!(cluster.dps[0].node().registry.get("alice").is_none());
    assert_eq!(client.node_id(), "dp-2");
    // Requests keep their seq numbering across the move.
    let r = client.request(1, "after move").await.unwrap();
    assert_eq!(&r.payload[..], b"after move");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epoch_handover_is_fenced() {
    let cluster = TestCluster::start(2, |_| {}).await;
    let client = Client::connect(cluster.client_config(0, "bob"))
        .await
        .unwrap();
    client.request(1, "hi").await.unwrap();
    let epoch = cluster.dps[0]
        .node()
        .registry
        .get("bob")
        .unwrap()
        .state
        .lock()
        .epoch();
    assert!(epoch > 0, "claimed in the control plane");
    // A node acting on an older (or equal) epoch is refused.
    let mut peer = gatesvr_proto::peer::peer_client::PeerClient::connect(format!(
        "http://{}",
        cluster.dps[0].grpc_addr()
    ))
    .await
    .unwrap();
    let refused = peer
        .handover(gatesvr_proto::peer::HandoverRequest {
            openid: "bob".into(),
            session_id: client.session_id(),
            epoch,
            new_owner: "dp-2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        cluster.dps[0].node().registry.get("bob").is_some(),
        "still served by its owner"
    );
    client.request(1, "still fine").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_every_session_and_loses_nothing() {
    let cluster = TestCluster::start(3, |_| {}).await;
    let users = ["u1", "u2", "u3", "u4", "u5", "u6"];
    let mut clients = BTreeMap::new();
    for u in users {
        clients.insert(
            u,
            Client::connect(cluster.client_config(0, u)).await.unwrap(),
        );
    }
    let mut gw = cluster.gateway(0).await;
    for n in 1..=20 {
        for u in users {
            gw.push_to_client(push(u, n)).await.unwrap();
        }
    }
    let report = cluster.dps[0].drain().await;
    assert_eq!(report.sessions_at_start, users.len());
    assert_eq!(report.staged, users.len(), "{report:?}");
    // Pushes sent to the draining node after the drain still reach the owners.
    for n in 21..=40 {
        for u in users {
            let r = gw.push_to_client(push(u, n)).await.unwrap().into_inner();
            assert_ne!(
                r.node_id, "dp-1",
                "queued by the successor, not the drained node"
            );
        }
    }
    for (u, client) in &clients {
        let mut log = Log::default();
        log.collect_until(client, 40).await;
        log.assert_exactly_once(40);
        assert_eq!(log.goaways, 1, "{u} told to move once");
        assert_ne!(client.node_id(), "dp-1", "{u} moved off the drained node");
    }
    assert!(cluster.dps[0].node().registry.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_outage_keeps_serving_and_reconciles() {
    let mut cluster = TestCluster::start(2, |_| {}).await;
    let existing = Client::connect(cluster.client_config(0, "carol"))
        .await
        .unwrap();
    existing.request(1, "before").await.unwrap();
    cluster.stop_control_plane().await;
    let c = cluster.dps[0].node().cluster.clone().unwrap();
    eventually("the node notices the outage", || !c.is_connected()).await;

    // Existing sessions keep working: requests and pushes.
    existing.request(1, "during").await.unwrap();
    let mut gw = cluster.gateway(0).await;
    gw.push_to_client(push("carol", 1)).await.unwrap();
    let mut log = Log::default();
    log.collect_until(&existing, 1).await;
    // Durable pushes are refused once the node's lease may have lapsed (it
    // may be declared dead and the session recovered elsewhere), never
    // acknowledged (lease-based fencing); non-durable ones keep flowing.
    eventually("the node's lease may have lapsed", || {
        c.lease_check(std::time::Instant::now()).is_err()
    })
    .await;
    let mut durable = push("carol", 2);
    durable.durable = true;
    let refused = gw.push_to_client(durable.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("lease"), "{refused:?}");
    gw.push_to_client(push("carol", 3)).await.unwrap();
    // New sessions start provisionally.
    let newcomer = Client::connect(cluster.client_config(1, "dave"))
        .await
        .unwrap();
    newcomer.request(1, "provisional").await.unwrap();
    assert!(cluster.dps[1].node().provisional.lock().contains("dave"));

    cluster.restart_control_plane().await;
    let dp2 = cluster.dps[1].node().clone();
    eventually("the provisional session is claimed", || {
        dp2.provisional.lock().is_empty()
    })
    .await;
    assert!(dp2.registry.get("dave").unwrap().state.lock().epoch() > 0);
    newcomer.request(1, "after").await.unwrap();
    // The lease is renewed with the heartbeats: durable pushes are accepted again.
    eventually("the lease holds again", || {
        c.lease_check(std::time::Instant::now()).is_ok()
    })
    .await;
    gw.push_to_client(durable).await.unwrap();
}

/// Internal traffic over mTLS: handover and push forwarding between nodes
/// present certificates; upstreams push with a client certificate or a
/// bearer token; a caller with neither is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_grpc_runs_over_mtls_with_a_token_option_for_upstreams() {
    use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("push-token");
    std::fs::write(&token_file, "push-s3cret\n").unwrap();
    let token_path = token_file.clone();
    let cluster = TestCluster::start(2, move |c| {
        let certs = c.server.cert_file.parent().unwrap().to_path_buf();
        // Each node presents its own role certificate (dataplane/<node_id>).
        let me = [(gatesvr_common::identity::Role::DataPlane, c.node_id.clone())];
        let issued = gatesvr_common::certs::ensure(&certs, &me).unwrap();
        c.server.grpc_tls = Some(issued.role(me[0].0, &c.node_id));
        c.server.push_token_file = Some(token_path.clone());
    })
    .await;
    let certs = cluster.dir.certs();
    let addr = |i: usize| format!("https://{}", cluster.dps[i].grpc_addr());

    // Takeover between the nodes (Peer.Handover over mTLS) loses nothing.
    let client = Client::connect(cluster.client_config(0, "tls-user"))
        .await
        .unwrap();
    let with_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(certs.join("ca.crt")).unwrap(),
        ))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(certs.join("upstream-demo.crt")).unwrap(),
            std::fs::read(certs.join("upstream-demo.key")).unwrap(),
        ))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(addr(1))
        .unwrap()
        .tls_config(with_cert)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut gw = GatewayServiceClient::new(channel);
    let dp1 = cluster.dps[0].node().cluster.clone().unwrap();
    eventually("the owner's claim is committed", || {
        dp1.view().owners.contains_key("tls-user")
    })
    .await;
    for n in 1..=5 {
        // Enters at node 2, forwarded to node 1 over mTLS.
        gw.push_to_client(push("tls-user", n)).await.unwrap();
    }
    let mut log = Log::default();
    log.collect_until(&client, 5).await;
    client.reconnect_to(cluster.dps[1].quic_addr());
    for n in 6..=10 {
        loop {
            match gw.push_to_client(push("tls-user", n)).await {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::NotFound => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(s) => panic!("push {n}: {s}"),
            }
        }
    }
    log.collect_until(&client, 10).await;
    log.assert_exactly_once(10);
    assert_eq!(client.node_id(), "dp-2");

    // An upstream without a certificate: the token works, nothing else does.
    let ca_only = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(certs.join("ca.crt")).unwrap(),
        ))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(addr(1))
        .unwrap()
        .tls_config(ca_only)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut anonymous = GatewayServiceClient::new(channel.clone());
    let refused = anonymous
        .push_to_client(push("tls-user", 11))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut with_token = tonic::Request::new(push("tls-user", 11));
    with_token
        .metadata_mut()
        .insert("authorization", "Bearer push-s3cret".parse().unwrap());
    GatewayServiceClient::new(channel.clone())
        .push_to_client(with_token)
        .await
        .unwrap();
    let mut wrong = tonic::Request::new(push("tls-user", 12));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer guess".parse().unwrap());
    assert_eq!(
        GatewayServiceClient::new(channel.clone())
            .push_to_client(wrong)
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    // The Peer service never takes a token: session state needs a certificate.
    let mut peer = gatesvr_proto::peer::peer_client::PeerClient::new(channel);
    let mut handover = tonic::Request::new(gatesvr_proto::peer::HandoverRequest {
        openid: "tls-user".into(),
        ..Default::default()
    });
    handover
        .metadata_mut()
        .insert("authorization", "Bearer push-s3cret".parse().unwrap());
    assert_eq!(
        peer.handover(handover).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    // Plaintext is refused outright.
    let plain = Endpoint::from_shared(format!("http://{}", cluster.dps[1].grpc_addr()))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        assert!(
            GatewayServiceClient::new(channel)
                .push_to_client(push("tls-user", 13))
                .await
                .is_err()
        );
    }
}

/// A control plane whose answers the test scripts, as a data plane sees them
/// through a leader crash (`gate-bench failover` part (b), docs/benchmarks.md
/// "Session 15"): what each call answers in each phase is what the real
/// members answered in that run (the data planes' logs).
mod election {
    use std::pin::Pin;
    use std::sync::Arc;

    use gatesvr_proto::control as pb;
    use gatesvr_proto::control::control_plane_server::{ControlPlane, ControlPlaneServer};
    use parking_lot::Mutex;
    use tonic::{Request, Response, Status};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Phase {
        /// A leader: every call is answered.
        Leading,
        /// The leader crashed, no new one yet: nothing commits. Followers
        /// answer UNAVAILABLE ("leader 1 ... did not answer").
        Election,
        /// A new leader, after an election longer than the node's lease,
        /// that refuses every claim ("node ... is not active (lease
        /// expired)") until a heartbeat renews it, as control planes before
        /// session 17 did (a member of one may lead during a rolling
        /// upgrade; ours renew the lease on the claim instead). The node's heartbeat loop is still in its back-off
        /// (up to 2 s) when the first Start arrives: heartbeats get no answer
        /// until a claim has been refused.
        NewLeader,
    }

    #[derive(Debug)]
    pub struct Seen {
        pub phase: Phase,
        pub claims_in_election: u32,
        pub refused_for_lease: u32,
        /// A heartbeat renewed the lease in `NewLeader`.
        pub renewed: bool,
        /// Claims committed: (openid, epoch).
        pub committed: Vec<(String, u64)>,
        epoch: u64,
    }

    #[derive(Clone)]
    pub struct FakeControlPlane(pub Arc<Mutex<Seen>>);

    impl FakeControlPlane {
        pub fn new() -> Self {
            Self(Arc::new(Mutex::new(Seen {
                phase: Phase::Leading,
                claims_in_election: 0,
                refused_for_lease: 0,
                renewed: false,
                committed: Vec::new(),
                epoch: 0,
            })))
        }

        /// Serves on 127.0.0.1:0 (plaintext) until the process ends.
        pub async fn serve(&self) -> std::net::SocketAddr {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let svc = ControlPlaneServer::new(self.clone());
            tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                    .await;
            });
            addr
        }
    }

    fn no_leader() -> Status {
        Status::unavailable(
            "unavailable: leader 1 at 127.0.0.1:1 did not answer: tcp connect error",
        )
    }

    type WatchStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::WatchEvent, Status>> + Send + 'static>>;

    #[tonic::async_trait]
    impl ControlPlane for FakeControlPlane {
        type WatchStream = WatchStream;

        async fn register_upstream(
            &self,
            _: Request<pb::RegisterUpstreamRequest>,
        ) -> Result<Response<pb::RegisterUpstreamResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn heartbeat_upstream(
            &self,
            _: Request<pb::HeartbeatUpstreamRequest>,
        ) -> Result<Response<pb::HeartbeatUpstreamResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn deregister_upstream(
            &self,
            _: Request<pb::DeregisterUpstreamRequest>,
        ) -> Result<Response<pb::DeregisterUpstreamResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn register_node(
            &self,
            _: Request<pb::RegisterNodeRequest>,
        ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
            match self.0.lock().phase {
                Phase::Leading => Ok(Response::new(pb::RegisterNodeResponse {
                    lease_ttl_ms: 1000,
                    heartbeat_interval_ms: 333,
                })),
                _ => Err(no_leader()),
            }
        }
        async fn heartbeat_node(
            &self,
            _: Request<pb::HeartbeatNodeRequest>,
        ) -> Result<Response<pb::HeartbeatNodeResponse>, Status> {
            let mut s = self.0.lock();
            let renews = match s.phase {
                Phase::Leading => true,
                Phase::Election => false,
                Phase::NewLeader => s.refused_for_lease > 0,
            };
            if !renews {
                return Err(no_leader());
            }
            if s.phase == Phase::NewLeader {
                s.renewed = true;
            }
            Ok(Response::new(pb::HeartbeatNodeResponse {
                lease_expires_at_ms: 0,
                drain_requested: false,
            }))
        }
        async fn leave_node(
            &self,
            _: Request<pb::LeaveNodeRequest>,
        ) -> Result<Response<pb::LeaveNodeResponse>, Status> {
            Ok(Response::new(pb::LeaveNodeResponse::default()))
        }
        async fn watch(
            &self,
            _: Request<pb::WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            Ok(Response::new(Box::pin(futures::stream::pending())))
        }
        async fn claim_sessions(
            &self,
            request: Request<pb::ClaimSessionsRequest>,
        ) -> Result<Response<pb::ClaimSessionsResponse>, Status> {
            let req = request.into_inner();
            let mut s = self.0.lock();
            match s.phase {
                Phase::Election => {
                    s.claims_in_election += 1;
                    return Err(no_leader());
                }
                Phase::NewLeader if !s.renewed => {
                    s.refused_for_lease += 1;
                    return Err(Status::failed_precondition(format!(
                        "failed precondition: node {} is not active (lease expired); register again",
                        req.node_id
                    )));
                }
                _ => {}
            }
            let mut results = Vec::new();
            for c in req.claims {
                s.epoch += 1;
                let epoch = s.epoch;
                s.committed.push((c.openid.clone(), epoch));
                results.push(pb::ClaimResult {
                    openid: c.openid.clone(),
                    owner: Some(pb::SessionOwner {
                        openid: c.openid,
                        session_id: c.session_id,
                        owner_node: req.node_id.clone(),
                        epoch,
                        fresh_session_id: c.fresh_session_id,
                    }),
                    previous_owner: String::new(),
                    previous_epoch: 0,
                    error: String::new(),
                });
            }
            Ok(Response::new(pb::ClaimSessionsResponse { results }))
        }
        async fn release_sessions(
            &self,
            _: Request<pb::ReleaseSessionsRequest>,
        ) -> Result<Response<pb::ReleaseSessionsResponse>, Status> {
            Ok(Response::new(pb::ReleaseSessionsResponse::default()))
        }
        async fn transfer_session(
            &self,
            _: Request<pb::TransferSessionRequest>,
        ) -> Result<Response<pb::TransferSessionResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn lookup_owners(
            &self,
            _: Request<pb::LookupOwnersRequest>,
        ) -> Result<Response<pb::LookupOwnersResponse>, Status> {
            Ok(Response::new(pb::LookupOwnersResponse::default()))
        }
    }
}

/// Invariant: a new session's Start that arrives while the control plane
/// elects a new leader is held until the new leader commits its claim, and
/// is then answered as a claimed session: never refused, never served
/// provisionally, even when the election outlasted the node's lease (the new
/// leader refuses claims until the node's heartbeat renews it). Before
/// session 15 this Start was refused with DRAINING (the claim's "not active
/// (lease expired)" taken for a refusal): `gate-bench failover` part (b)'s
/// failed new sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_during_a_control_plane_election_is_claimed_by_the_new_leader() {
    use election::{FakeControlPlane, Phase};
    let cp = FakeControlPlane::new();
    let cp_addr = cp.serve().await;
    let dir = gatesvr_tests::TestDir::new();
    let mut cfg = dir.dataplane_config("dp-1");
    cfg.control_plane.endpoints = vec![cp_addr.to_string()];
    cfg.control_plane.insecure = true;
    cfg.control_plane.lease_ttl = Duration::from_secs(1);
    let dp = gatesvr_dataplane::DataPlane::start(cfg, gatesvr_dataplane::Routing::Echo)
        .await
        .expect("data plane starts");
    let cluster = dp.node().cluster.clone().expect("a cluster member");
    eventually("the node registered", || cluster.is_connected()).await;

    // The leader crashes; nothing commits, and the node's lease lapses.
    cp.0.lock().phase = Phase::Election;
    eventually("the node's lease lapsed", || {
        cluster.lease_check(std::time::Instant::now()).is_err()
    })
    .await;
    let config = gatesvr_sdk::ClientConfig::new(dp.quic_addr(), "erin", dir.token("erin"))
        .with_ca_file(dir.ca());
    let start = tokio::spawn(Client::connect(config));
    // The Start's claim is tried again through the election (not given up
    // after a few attempts for a provisional session).
    eventually("the claim is tried again through the election", || {
        cp.0.lock().claims_in_election >= 6
    })
    .await;
    // A new leader, which finds the node's lease expired.
    cp.0.lock().phase = Phase::NewLeader;
    let client = tokio::time::timeout(PATIENCE, start)
        .await
        .expect("the Start is answered")
        .expect("the connect task")
        .expect("the Start succeeds (not refused with DRAINING)");
    client.request(1, "hello").await.expect("a request");

    let epoch = {
        let seen = cp.0.lock();
        assert!(
            seen.refused_for_lease >= 1 && seen.renewed,
            "refused for the lapsed lease, then renewed: {seen:?}"
        );
        seen.committed
            .iter()
            .find(|(openid, _)| openid == "erin")
            .map(|(_, epoch)| *epoch)
            .expect("the new leader committed the Start's claim")
    };
    assert!(
        !dp.node().provisional.lock().contains("erin"),
        "served provisionally"
    );
    let entry = dp.node().registry.get("erin").expect("the session");
    assert_eq!(entry.state.lock().epoch(), epoch, "claimed at that epoch");
    let m = gatesvr_tests::Metrics::parse(
        &gatesvr_tests::http_get(dp.metrics_addr(), "/metrics")
            .await
            .1,
    );
    assert_eq!(
        m.get(
            "gatesvr_provisional_sessions_total",
            &[("outcome", "started")]
        ),
        0.0
    );
    assert_eq!(
        m.get(
            "gatesvr_connections_rejected_total",
            &[("reason", "claim_refused")]
        ),
        0.0
    );
    assert!(m.get("gatesvr_start_claim_retries_total", &[]) >= 6.0);
}
