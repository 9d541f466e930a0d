//! An attacker inside the cluster network, with real processes and real
//! certificates: a control plane, two data-plane nodes and an upstream, every
//! internal hop over mTLS with role certificates, as `deploy/config` ships.
//!
//! Invariant: from (a) no certificate, (b) an upstream's certificate, (c) a
//! data-plane certificate acting for another node, (d) a certificate from
//! another CA, no call to an internal method or operations endpoint is
//! accepted unless that identity's role may make it: Raft, ControlPlane, Peer,
//! GatewayService, the data plane's `/drain` and profiling, and every route
//! of the admin API (HTTPS requiring a client certificate of the cluster CA,
//! and a token; see [`admin_api_attempts`]). "Accepted" means the call got past
//! authorization: it succeeded, or its handler answered (any status but
//! UNAUTHENTICATED / PERMISSION_DENIED or a refused TLS handshake). In the
//! same run the legitimate paths work: client requests through the data plane
//! to the upstream, pushes with a certificate and with the push token, the
//! nodes' own control-plane calls, an authorized drain and profile.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gatesvr_common::identity::Role;
use gatesvr_proto::control as cp;
use gatesvr_proto::control::control_plane_client::ControlPlaneClient;
use gatesvr_proto::peer as peer_pb;
use gatesvr_proto::peer::peer_client::PeerClient;
use gatesvr_proto::raft::RaftMessage;
use gatesvr_proto::raft::raft_client::RaftClient;
use gatesvr_proto::upstream as up;
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_sdk::{Client, ClientConfig, Event};
use gatesvr_tests::procs::{Proc, binary, controlplane_config, free_port, spawn_controlplane};
use gatesvr_tests::{
    HttpsClient, TestDir, http_get_with_token, http_post_with_token as http_post, https_request,
};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const ADMIN_TOKEN: &str = "zt-admin-token";
const PUSH_TOKEN: &str = "zt-push-token";
const OPS_TOKEN: &str = "zt-ops-token";
const PATIENCE: Duration = Duration::from_secs(60);

/// One attacker: a name and the certificate files it presents, if any.
struct Attacker {
    name: &'static str,
    cert: Option<(PathBuf, PathBuf)>,
    /// Roles whose methods this identity may legitimately call (not attacks).
    role: Option<Role>,
}

/// What one attempt achieved.
#[derive(Debug)]
struct Attempt {
    attacker: &'static str,
    target: String,
    accepted: bool,
    detail: String,
}

struct Dp {
    name: String,
    quic: u16,
    http: u16,
    grpc: u16,
    ops: u16,
    metrics: u16,
    _proc: Proc,
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> Proc {
    let log = std::fs::File::create(log).expect("log file");
    let child = std::process::Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    Proc(child)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A lazily connecting mTLS channel trusting the cluster CA, presenting `cert`.
fn channel(port: u16, ca: &Path, cert: Option<&(PathBuf, PathBuf)>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((c, k)) = cert {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(c).unwrap(),
            std::fs::read(k).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .tls_config(tls)
        .unwrap()
        .connect_lazy()
}

/// True if the call got past authorization (see the module doc).
fn got_through<T>(result: &Result<T, tonic::Status>) -> (bool, String) {
    match result {
        Ok(_) => (true, "OK".into()),
        Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => {
            (false, format!("{:?}: {}", s.code(), s.message()))
        }
        // A server that refuses the client certificate ends the TLS connection
        // with an alert; tonic reports that as UNKNOWN "transport error",
        // UNAVAILABLE, or CANCELLED "operation was canceled" (no handler of
        // ours answers CANCELLED).
        Err(s) => {
            let text = format!("{} {:?}", s.message(), std::error::Error::source(s)).to_lowercase();
            let handshake = s.code() == Code::Cancelled
                || matches!(s.code(), Code::Unavailable | Code::Unknown)
                    && [
                        "transport",
                        "connect",
                        "tls",
                        "certificate",
                        "handshake",
                        "connection",
                        "h2",
                    ]
                    .iter()
                    .any(|w| text.contains(w));
            (!handshake, format!("{:?}: {}", s.code(), s.message()))
        }
    }
}

/// The victim's session as the control plane records it: (owner, epoch, session id).
async fn owner_of(
    operator: &HttpsClient,
    admin: u16,
    openid: &str,
) -> Option<(String, u64, String)> {
    let path = format!("/v1/sessions/{openid}");
    let (status, body) = https_request(operator, addr(admin), "GET", &path, ADMIN_TOKEN).await;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let s = v.get("session").unwrap_or(&v);
    Some((
        s["owner_node"].as_str()?.to_string(),
        s["epoch"].as_u64()?,
        s["session_id"].as_str()?.to_string(),
    ))
}

/// Every route of the admin API, with ids of this run (a wrongly accepted
/// call would drain, cordon or remove them, which the test would see too).
const ADMIN_ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/zones"),
    ("GET", "/v1/upstreams"),
    ("POST", "/v1/upstreams"),
    ("DELETE", "/v1/upstreams/demo"),
    ("GET", "/v1/nodes"),
    ("DELETE", "/v1/nodes/dp-2"),
    ("POST", "/v1/nodes/dp-1/drain"),
    ("DELETE", "/v1/nodes/dp-1/drain"),
    ("POST", "/v1/nodes/dp-1/cordon"),
    ("DELETE", "/v1/nodes/dp-1/cordon"),
    ("GET", "/v1/nodes/dp-1/stats"),
    ("GET", "/v1/sessions"),
    ("GET", "/v1/sessions/victim-user"),
    ("POST", "/v1/sessions/victim-user/disconnect"),
    ("GET", "/v1/cluster"),
    ("POST", "/v1/cluster/learners"),
    ("POST", "/v1/cluster/voters/2"),
    ("DELETE", "/v1/cluster/members/1"),
    ("POST", "/v1/cluster/snapshot"),
    ("POST", "/v1/cluster/backup"),
    ("POST", "/v1/cluster/restore"),
    ("GET", "/console"),
    ("POST", "/console/actions/drain"),
];

/// The admin API part of the attack: every route, from each attacker's
/// certificate (none, upstream, another node's, a foreign CA's) and from the
/// operator's own certificate, with no token and with a guessed one. Refused
/// means: the TLS handshake failed (status 0), 401/403, or for the console a
/// redirect to its login page.
async fn admin_api_attempts(
    admin: u16,
    ca: &Path,
    operator: &(PathBuf, PathBuf),
    attackers: &[Attacker],
) -> Vec<Attempt> {
    let mut identities: Vec<(&'static str, Option<&(PathBuf, PathBuf)>)> = attackers
        .iter()
        .map(|a| (a.name, a.cert.as_ref()))
        .collect();
    identities.push(("operator certificate, no admin token", Some(operator)));
    let mut attempts = Vec::new();
    for (name, cert) in identities {
        let client = HttpsClient::new(ca, cert.map(|(c, k)| (c.as_path(), k.as_path())));
        // The attackers also hold the real admin token (stolen): the certificate's role
        // must still keep them out; the operator's own certificate is only tried without it.
        let tokens: &[&str] = if cert == Some(operator) {
            &["", "guessed"]
        } else {
            &["", "guessed", ADMIN_TOKEN]
        };
        for &token in tokens {
            for (method, path) in ADMIN_ROUTES {
                let (status, body) = https_request(&client, addr(admin), method, path, token).await;
                let to_login = path.starts_with("/console") && status == 303;
                attempts.push(Attempt {
                    attacker: name,
                    target: format!(
                        "admin {method} {path}{}",
                        match token {
                            "" => "",
                            ADMIN_TOKEN => " (stolen admin token)",
                            _ => " (guessed token)",
                        }
                    ),
                    accepted: !(matches!(status, 0 | 401 | 403) || to_login),
                    detail: format!(
                        "HTTP {status} {}",
                        body.chars().take(80).collect::<String>()
                    ),
                });
            }
        }
    }
    attempts
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_internal_call_is_accepted_from_the_wrong_identity() {
    let gatesvr = binary("gatesvr", "gatesvr");
    let upstream_bin = binary("gate-upstream", "gate-upstream");
    let dir = TestDir::new();
    let certs = dir.certs();
    let ca = certs.join("ca.crt");
    let root = dir.dir.path().to_path_buf();
    let role_cert = |role: Role, id: &str| {
        let f = gatesvr_common::certs::role_files(&certs, role, id);
        (f.cert_file, f.key_file)
    };
    // (d): the same identity as node dp-1, signed by another CA.
    let foreign = root.join("foreign-ca");
    gatesvr_common::certs::generate(&foreign, &[]).unwrap();
    let foreign_dp1 = gatesvr_common::certs::role_files(&foreign, Role::DataPlane, "dp-1");
    std::fs::write(root.join("push-token"), PUSH_TOKEN).unwrap();
    std::fs::write(root.join("ops-token"), OPS_TOKEN).unwrap();

    // --- control plane: one node over mTLS -------------------------------------------
    let (cp_grpc, cp_admin) = (free_port(), free_port());
    let mut cp_yaml =
        controlplane_config(1, &root.join("cp-1"), &[(1, cp_grpc, cp_admin)], &certs, "");
    // The admin API over HTTPS, with client certificates of the cluster CA required (as
    // the chart ships it); `admin:` is the last section of the generated config.
    assert!(cp_yaml.ends_with("insecure_plaintext_http: true\n"));
    cp_yaml.push_str(&format!(
        "  tls:\n    cert_file: {c}/controlplane-1.crt\n    key_file: {c}/controlplane-1.key\n    client_ca_file: {c}/ca.crt\n",
        c = certs.display()
    ));
    let operator_cert = role_cert(Role::Admin, "operator");
    let operator = HttpsClient::new(&ca, Some((&operator_cert.0, &operator_cert.1)));
    std::fs::write(root.join("cp-1.yaml"), cp_yaml).unwrap();
    let _cp = spawn_controlplane(
        &gatesvr,
        &root.join("cp-1.yaml"),
        &root.join("cp-1.log"),
        ADMIN_TOKEN,
    );

    // --- two data-plane nodes, secure as shipped -------------------------------------
    let mut dps = Vec::new();
    for i in 1..=2 {
        let name = format!("dp-{i}");
        let (quic, http, grpc, ops, metrics) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );
        let c = certs.display();
        let r = root.display();
        let yaml = format!(
            "node_id: {name}\n\
             server:\n  quic_addr: 127.0.0.1:{quic}\n  http_addr: 127.0.0.1:{http}\n  grpc_addr: 127.0.0.1:{grpc}\n  metrics_addr: 127.0.0.1:{metrics}\n  ops_addr: 127.0.0.1:{ops}\n  ops_token_file: {r}/ops-token\n  push_token_file: {r}/push-token\n  cert_file: {c}/server.crt\n  key_file: {c}/server.key\n  grpc_tls: {{cert_file: {c}/dataplane-{name}.crt, key_file: {c}/dataplane-{name}.key, ca_file: {c}/ca.crt}}\n\
             auth:\n  secret_file: {r}/secret\n\
             upstream:\n  health_check_interval: 1s\n  tls: {{ca_file: {c}/ca.crt, cert_file: {c}/dataplane-{name}.crt, key_file: {c}/dataplane-{name}.key}}\n\
             control_plane:\n  endpoints: [\"127.0.0.1:{cp_grpc}\"]\n  tls: {{cert_file: {c}/dataplane-{name}.crt, key_file: {c}/dataplane-{name}.key, ca_file: {c}/ca.crt}}\n  lease_ttl: 2s\n  state_file: {r}/{name}.state\n"
        );
        let path = root.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let proc = spawn(
            &gatesvr,
            &["dataplane", "--config", path.to_str().unwrap()],
            &root.join(format!("{name}.log")),
        );
        dps.push(Dp {
            name,
            quic,
            http,
            grpc,
            ops,
            metrics,
            _proc: proc,
        });
    }

    // --- the victim's zone's upstream, mTLS both ways --------------------------------
    let victim = "victim-user";
    let zone = gatesvr_proto::zone::zone_of(victim, 6);
    let (up_cert, up_key) = role_cert(Role::Upstream, "demo");
    let up_port = free_port();
    let _upstream = spawn(
        &upstream_bin,
        &[
            "--zone",
            &zone,
            "--addr",
            &format!("127.0.0.1:{up_port}"),
            "--gateway",
            &format!("127.0.0.1:{}", dps[0].grpc),
            "--control-plane",
            &format!("127.0.0.1:{cp_grpc}"),
            "--lease-ttl",
            "3s",
            "--tls-cert",
            up_cert.to_str().unwrap(),
            "--tls-key",
            up_key.to_str().unwrap(),
            "--tls-ca",
            ca.to_str().unwrap(),
        ],
        &root.join("upstream.log"),
    );

    // --- legitimate paths ------------------------------------------------------------
    let mut legit = 0u32;
    for dp in &dps {
        wait_until(&format!("{} ready", dp.name), || async {
            http_get_with_token(addr(dp.http), "/ready", "").await.0 == 200
        })
        .await;
    }
    // Both nodes registered themselves (RegisterNode, HeartbeatNode as dataplane/<own id>).
    wait_until("both nodes registered with the control plane", || async {
        let (s, body) =
            https_request(&operator, addr(cp_admin), "GET", "/v1/nodes", ADMIN_TOKEN).await;
        s == 200 && body.contains("\"dp-1\"") && body.contains("\"dp-2\"")
    })
    .await;
    legit += 2;
    // A client request reaches the upstream over mTLS (the data plane learned it from
    // its Watch; the upstream registered as role upstream).
    let client = Client::connect(
        ClientConfig::new(addr(dps[0].quic), victim, dir.token(victim))
            .with_ca_file(dir.ca())
            .with_request_timeout(Duration::from_secs(10)),
    )
    .await
    .expect("victim connects");
    let mut answered = false;
    for _ in 0..100 {
        match client.request(1, "echo hello".as_bytes().to_vec()).await {
            Ok(_) => {
                answered = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    assert!(
        answered,
        "a client request never reached the upstream over mTLS"
    );
    legit += 1;
    wait_until("the victim's session is recorded", || async {
        owner_of(&operator, cp_admin, victim).await.is_some()
    })
    .await;
    let (owner, epoch, session_id) = owner_of(&operator, cp_admin, victim).await.unwrap();
    assert_eq!(owner, "dp-1");

    let push = |content: &str| up::PushToClientRequest {
        target_type: up::TargetType::Openid as i32,
        target_id: victim.into(),
        msg_type: "note".into(),
        content: content.into(),
        ..Default::default()
    };
    // Pushes with the upstream certificate, and with the push token and no certificate.
    let up_identity = Some((up_cert.clone(), up_key.clone()));
    GatewayServiceClient::new(channel(dps[0].grpc, &ca, up_identity.as_ref()))
        .push_to_client(push("legit-cert"))
        .await
        .expect("a push with the upstream certificate");
    let mut with_token = tonic::Request::new(push("legit-token"));
    with_token.metadata_mut().insert(
        "authorization",
        format!("Bearer {PUSH_TOKEN}").parse().unwrap(),
    );
    GatewayServiceClient::new(channel(dps[0].grpc, &ca, None))
        .push_to_client(with_token)
        .await
        .expect("a push with the push token");
    legit += 2;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(PATIENCE, client.next_event()).await {
            Ok(Some(Event::Push(p))) => seen.push(p.content.clone()),
            Ok(Some(_)) => {}
            other => panic!("the victim did not get both legitimate pushes: {other:?}"),
        }
    }
    // A data-plane node may call another's Peer service (its role's method).
    let peer_call = PeerClient::new(channel(
        dps[0].grpc,
        &ca,
        Some(&role_cert(Role::DataPlane, "dp-2")),
    ))
    .fetch_replica(peer_pb::FetchReplicaRequest {
        openid: "nobody".into(),
        session_id: "none".into(),
    })
    .await;
    assert!(
        got_through(&peer_call).0,
        "dp-2 refused on Peer: {peer_call:?}"
    );
    legit += 1;
    // The batched form a recovery uses (a reconnect burst's fetches in one call).
    let batch_call = PeerClient::new(channel(
        dps[0].grpc,
        &ca,
        Some(&role_cert(Role::DataPlane, "dp-2")),
    ))
    .fetch_replicas(peer_pb::FetchReplicasRequest {
        sessions: vec![peer_pb::FetchReplicaRequest {
            openid: "nobody".into(),
            session_id: "none".into(),
        }],
    })
    .await;
    assert!(
        got_through(&batch_call).0,
        "dp-2 refused on Peer.FetchReplicas: {batch_call:?}"
    );
    legit += 1;
    // The ops listener with its token: a profile.
    let (status, _) = http_get_with_token(
        addr(dps[0].ops),
        "/debug/pprof/profile?seconds=1",
        OPS_TOKEN,
    )
    .await;
    assert_eq!(status, 200, "an authorized profile");
    legit += 1;
    // The probes stay open.
    assert_eq!(
        http_get_with_token(addr(dps[0].http), "/health", "")
            .await
            .0,
        200
    );
    legit += 1;

    // --- the attack --------------------------------------------------------------------
    let attackers = [
        Attacker {
            name: "no certificate",
            cert: None,
            role: None,
        },
        Attacker {
            name: "upstream certificate",
            cert: Some(role_cert(Role::Upstream, "demo")),
            role: Some(Role::Upstream),
        },
        Attacker {
            name: "dp-2 certificate acting as dp-1",
            cert: Some(role_cert(Role::DataPlane, "dp-2")),
            role: Some(Role::DataPlane),
        },
        Attacker {
            name: "certificate from another CA",
            cert: Some((foreign_dp1.cert_file.clone(), foreign_dp1.key_file.clone())),
            role: None,
        },
    ];
    let mut attempts: Vec<Attempt> = Vec::new();
    for a in &attackers {
        let cert = a.cert.as_ref();
        let mut note = |target: &str, (accepted, detail): (bool, String)| {
            attempts.push(Attempt {
                attacker: a.name,
                target: target.to_string(),
                accepted,
                detail,
            });
        };
        let msg = || RaftMessage {
            data: b"{}".to_vec(),
            from: 1,
            to: 1,
        };
        // Raft: control-plane members only.
        let mut raft = RaftClient::new(channel(cp_grpc, &ca, cert));
        note(
            "Raft.AppendEntries",
            got_through(&raft.append_entries(msg()).await),
        );
        note("Raft.Vote", got_through(&raft.vote(msg()).await));
        note(
            "Raft.InstallSnapshot",
            got_through(&raft.install_snapshot(msg()).await),
        );
        note("Raft.Forward", got_through(&raft.forward(msg()).await));

        // ControlPlane.
        let mut c = ControlPlaneClient::new(channel(cp_grpc, &ca, cert));
        if a.role != Some(Role::Upstream) {
            let r = c
                .register_upstream(cp::RegisterUpstreamRequest {
                    zone: zone.clone(),
                    address: "127.0.0.1:1".into(),
                    service_name: "evil".into(),
                    lease_ttl_ms: 0,
                })
                .await;
            note("ControlPlane.RegisterUpstream", got_through(&r));
            let r = c
                .heartbeat_upstream(cp::HeartbeatUpstreamRequest {
                    instance_id: "x".into(),
                })
                .await;
            note("ControlPlane.HeartbeatUpstream", got_through(&r));
            let r = c
                .deregister_upstream(cp::DeregisterUpstreamRequest {
                    instance_id: "x".into(),
                })
                .await;
            note("ControlPlane.DeregisterUpstream", got_through(&r));
        }
        // Data-plane methods, acting for dp-1 (no attacker is dp-1).
        let r = c
            .register_node(cp::RegisterNodeRequest {
                node: Some(cp::DataPlaneNode {
                    node_id: "dp-1".into(),
                    quic_addr: "127.0.0.1:1".into(),
                    grpc_addr: "127.0.0.1:1".into(),
                    ..Default::default()
                }),
                lease_ttl_ms: 0,
            })
            .await;
        note("ControlPlane.RegisterNode", got_through(&r));
        let r = c
            .heartbeat_node(cp::HeartbeatNodeRequest {
                node_id: "dp-1".into(),
                draining: true,
                ..Default::default()
            })
            .await;
        note("ControlPlane.HeartbeatNode", got_through(&r));
        let r = c
            .leave_node(cp::LeaveNodeRequest {
                node_id: "dp-1".into(),
            })
            .await;
        note("ControlPlane.LeaveNode", got_through(&r));
        let r = c
            .watch(cp::WatchRequest {
                from_version: 0,
                node_id: "dp-1".into(),
                chunked_snapshot: true,
                ..Default::default()
            })
            .await;
        note("ControlPlane.Watch", got_through(&r));
        let r = c
            .claim_sessions(cp::ClaimSessionsRequest {
                node_id: "dp-1".into(),
                claims: vec![cp::Claim {
                    openid: victim.into(),
                    session_id: "evil".into(),
                    seen_epoch: 0,
                    fresh_session_id: String::new(),
                }],
            })
            .await;
        note("ControlPlane.ClaimSessions", got_through(&r));
        let r = c
            .release_sessions(cp::ReleaseSessionsRequest {
                node_id: "dp-1".into(),
                sessions: vec![cp::SessionOwner {
                    openid: victim.into(),
                    session_id: session_id.clone(),
                    owner_node: "dp-1".into(),
                    epoch,
                    fresh_session_id: String::new(),
                }],
            })
            .await;
        note("ControlPlane.ReleaseSessions", got_through(&r));
        let r = c
            .transfer_session(cp::TransferSessionRequest {
                openid: victim.into(),
                expected_epoch: epoch,
                to_node: "dp-2".into(),
            })
            .await;
        note("ControlPlane.TransferSession", got_through(&r));
        let r = c
            .lookup_owners(cp::LookupOwnersRequest {
                node_id: "dp-1".into(),
                openids: vec![victim.into()],
                session_ids: Vec::new(),
            })
            .await;
        note("ControlPlane.LookupOwners", got_through(&r));

        // Peer: data-plane nodes only (a data-plane certificate may call it).
        if a.role != Some(Role::DataPlane) {
            let mut p = PeerClient::new(channel(dps[0].grpc, &ca, cert));
            let r = p
                .handover(peer_pb::HandoverRequest {
                    openid: victim.into(),
                    session_id: session_id.clone(),
                    epoch: 0,
                    new_owner: "evil".into(),
                })
                .await;
            note("Peer.Handover", got_through(&r));
            let r = p
                .stage(peer_pb::StageRequest {
                    state: None,
                    epoch: 0,
                    from_node: "evil".into(),
                })
                .await;
            note("Peer.Stage", got_through(&r));
            let r = p
                .stage_stream(futures::stream::iter(vec![peer_pb::StageRequest {
                    state: None,
                    epoch: 0,
                    from_node: "evil".into(),
                }]))
                .await;
            note("Peer.StageStream", got_through(&r));
            let r = p
                .replicate(peer_pb::ReplicateRequest {
                    openid: victim.into(),
                    session_id: session_id.clone(),
                    zone: zone.clone(),
                    epoch: epoch + 1000,
                    owner_node: "evil".into(),
                    ..Default::default()
                })
                .await;
            note("Peer.Replicate", got_through(&r));
            let r = p
                .fetch_replica(peer_pb::FetchReplicaRequest {
                    openid: victim.into(),
                    session_id: session_id.clone(),
                })
                .await;
            note("Peer.FetchReplica", got_through(&r));
            let r = p
                .fetch_replicas(peer_pb::FetchReplicasRequest {
                    sessions: vec![peer_pb::FetchReplicaRequest {
                        openid: victim.into(),
                        session_id: session_id.clone(),
                    }],
                })
                .await;
            note("Peer.FetchReplicas", got_through(&r));
        }

        // GatewayService: upstreams and data-plane nodes (or the token).
        if a.role.is_none() {
            let mut g = GatewayServiceClient::new(channel(dps[0].grpc, &ca, cert));
            note(
                "GatewayService.PushToClient",
                got_through(&g.push_to_client(push("evil")).await),
            );
            let r = g
                .push_batch(up::PushBatchRequest {
                    pushes: vec![push("evil")],
                    codes_only: false,
                })
                .await;
            note("GatewayService.PushBatch", got_through(&r));
            let r = g
                .broadcast_to_clients(up::BroadcastRequest {
                    content: "evil".into(),
                    ..Default::default()
                })
                .await;
            note("GatewayService.BroadcastToClients", got_through(&r));
            let r = g.get_status(up::GatewayStatusRequest {}).await;
            note("GatewayService.GetStatus", got_through(&r));
            // A wrong push token instead of a certificate.
            let mut bad = tonic::Request::new(push("evil"));
            bad.metadata_mut()
                .insert("authorization", "Bearer guessed".parse().unwrap());
            note(
                "GatewayService.PushToClient (wrong token)",
                got_through(&g.push_to_client(bad).await),
            );
        }
    }
    // The operations endpoints: no token, a wrong one (certificates do not help here).
    for token in ["", "guessed"] {
        let who = if token.is_empty() {
            "no ops token"
        } else {
            "wrong ops token"
        };
        let (status, body) = http_post(addr(dps[0].ops), "/drain", token).await;
        attempts.push(Attempt {
            attacker: who,
            target: "POST /drain".into(),
            accepted: !matches!(status, 401 | 403),
            detail: format!("HTTP {status} {}", body.lines().last().unwrap_or_default()),
        });
        let (status, _) =
            http_get_with_token(addr(dps[0].ops), "/debug/pprof/profile?seconds=1", token).await;
        attempts.push(Attempt {
            attacker: who,
            target: "GET /debug/pprof/profile".into(),
            accepted: !matches!(status, 401 | 403),
            detail: format!("HTTP {status}"),
        });
        // The probes port no longer serves them.
        let (status, _) = http_post(addr(dps[0].http), "/drain", token).await;
        attempts.push(Attempt {
            attacker: who,
            target: "POST /drain on the probes port".into(),
            accepted: !matches!(status, 401 | 403 | 404 | 405),
            detail: format!("HTTP {status}"),
        });
    }
    attempts.extend(admin_api_attempts(cp_admin, &ca, &operator_cert, &attackers).await);

    let accepted: Vec<&Attempt> = attempts.iter().filter(|a| a.accepted).collect();
    for a in &attempts {
        println!(
            "  {:<36} {:<44} {} ({})",
            a.attacker,
            a.target,
            if a.accepted { "ACCEPTED" } else { "refused" },
            a.detail
        );
    }

    // --- afterwards: nothing moved, the legitimate paths still work -------------------
    let (owner_after, epoch_after, session_after) =
        owner_of(&operator, cp_admin, victim).await.unwrap();
    assert_eq!(
        (owner_after.as_str(), epoch_after, session_after.as_str()),
        ("dp-1", epoch, session_id.as_str()),
        "the victim's ownership record changed"
    );
    GatewayServiceClient::new(channel(dps[0].grpc, &ca, up_identity.as_ref()))
        .push_to_client(push("after"))
        .await
        .expect("a push after the attack");
    loop {
        match tokio::time::timeout(PATIENCE, client.next_event()).await {
            Ok(Some(Event::Push(p))) if p.content == "after" => break,
            Ok(Some(Event::Push(p))) => {
                assert_ne!(p.content, "evil", "an attacker's push was delivered")
            }
            Ok(Some(_)) => {}
            other => panic!("the victim lost its session: {other:?}"),
        }
    }
    assert!(client.closed().is_none(), "the victim was disconnected");
    legit += 1;
    // Every refusal was counted.
    let (_, metrics) = http_get_with_token(addr(dps[0].metrics), "/metrics", "").await;
    for reason in ["no_certificate", "wrong_role", "bad_token"] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "gatesvr_authz_denied_total has no {reason} sample"
        );
    }
    assert!(
        metrics.contains("gatesvr_ops_denied_total 4"),
        "ops denials counted"
    );
    // An operator's authorized drain stops dp-2.
    let (status, _) = http_post(addr(dps[1].ops), "/drain", OPS_TOKEN).await;
    assert_eq!(status, 202, "an authorized drain");
    legit += 1;

    println!(
        "zero-trust: {} attempts, {} accepted that should not be, {legit} legitimate calls OK",
        attempts.len(),
        accepted.len()
    );
    assert!(
        accepted.is_empty(),
        "calls accepted from the wrong identity: {accepted:#?}"
    );
    assert!(
        attempts.len() >= 60 + 5 * 2 * ADMIN_ROUTES.len(),
        "the attack covered every method and admin route"
    );
    client.stop().await;
}
