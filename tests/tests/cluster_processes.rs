//! The cluster as operators run it, as real processes on 127.0.0.1
//! (`gatesvr_tests::processes`: three `gatesvr controlplane`, three `gatesvr
//! dataplane`, one `gate-upstream` per zone, every internal hop over mTLS with
//! role certificates, state files), and SDK clients.
//!
//! Invariants checked, with counts: no push lost, none duplicated, all in
//! order (`sent == delivered`, exactly once); no request failed; every
//! resumed session says RESUMED. Scenarios: takeover by reconnecting to
//! another node while the control-plane leader is killed; the control plane
//! fully down for 30 s while traffic continues, with a data-plane restart
//! during the outage; drain of a node under load by SIGTERM (a rolling
//! upgrade step); kill -9 of a session's owner, the client coming back on
//! another node or on the owner restarted with its node id (no unacked durable
//! push lost); kill -9 of a session's standby, then of its owner; kill -9 of
//! the owner during a full control-plane outage, then of its standby; kill -9
//! of a client's node noticed by the refused datagrams (no idle timeout); new
//! sessions started while the control-plane leader dies.
//! No assertion is about time: conditions are polled with a bound.

use std::time::Duration;

use gatesvr_proto::client::ResumeStatus;
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_sdk::{Client, Event};
use gatesvr_tests::cluster::push;
use gatesvr_tests::processes::ProcessCluster;
use gatesvr_tests::{PATIENCE, http_get};

/// Three control-plane nodes, three data planes (dp-1..dp-3), one upstream per zone.
async fn three_by_three() -> ProcessCluster {
    ProcessCluster::start(&["dp-1", "dp-2", "dp-3"], 6).await
}

/// Pushes `from..=to` to `openid` through `gw`, retrying a push that found no
/// owner during a move (an upstream would), so each is accepted exactly once.
async fn push_range(
    gw: &mut GatewayServiceClient<tonic::transport::Channel>,
    openid: &str,
    from: u64,
    to: u64,
) {
    for n in from..=to {
        let mut attempts = 0;
        loop {
            match gw.push_to_client(push(openid, n)).await {
                Ok(_) => break,
                Err(s)
                    if matches!(s.code(), tonic::Code::NotFound | tonic::Code::Unavailable)
                        && attempts < 200 =>
                {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => panic!("push {n} to {openid}: {s}"),
            }
        }
    }
}

/// One durable push, retried while the entry node does not know the owner
/// yet (NOT_FOUND: nothing was queued, so a retry cannot duplicate).
async fn durable_push(
    gw: &mut GatewayServiceClient<tonic::transport::Channel>,
    openid: &str,
    n: u64,
) {
    for _ in 0..200 {
        let mut p = push(openid, n);
        p.durable = true;
        match gw.push_to_client(p).await {
            Ok(_) => return,
            Err(s) if s.code() == tonic::Code::NotFound => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("durable push {n}: {s}"),
        }
    }
    panic!("durable push {n}: the owner never became known");
}

/// Consumes events until `total` pushes arrived; returns their contents and the statuses seen.
async fn collect(client: &Client, total: usize) -> (Vec<u64>, Vec<ResumeStatus>) {
    let mut got = Vec::new();
    let mut statuses = Vec::new();
    while got.len() < total {
        let event = tokio::time::timeout(PATIENCE * 2, client.next_event())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "stalled after {} of {total} pushes; statuses {statuses:?}",
                    got.len()
                )
            })
            .expect("client open");
        match event {
            Event::Push(p) => got.push(p.content.parse().unwrap()),
            Event::Connected { status, .. } => statuses.push(status),
            Event::ResumeFailed { status, .. } => panic!("resume failed: {status:?}"),
            _ => {}
        }
    }
    (got, statuses)
}

fn assert_exactly_once(got: &[u64], sent: u64) {
    assert_eq!(got.len() as u64, sent, "delivered == sent");
    assert_eq!(
        got,
        (1..=sent).collect::<Vec<_>>(),
        "in order, no gap, no duplicate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_while_the_control_plane_leader_dies() {
    let mut cluster = three_by_three().await;
    let client = Client::connect(cluster.client_config(0, "alice"))
        .await
        .unwrap();
    // Requests go through the zone's upstream process.
    let r = client.request(1, "echo one").await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(body["zone"], gatesvr_proto::zone::zone_of("alice", 6));

    let mut gw = cluster.gateway(2).await;
    push_range(&mut gw, "alice", 1, 50).await;

    // Kill -9 the control-plane leader while requests and pushes continue.
    let leader = cluster.leader().await.expect("a leader");
    cluster.kill_cp(leader);
    let mut failed_requests = 0;
    for i in 0..20 {
        if client.request(1, format!("echo during {i}")).await.is_err() {
            failed_requests += 1;
        }
    }
    assert_eq!(
        failed_requests, 0,
        "a control-plane leader change fails no client request"
    );

    // The client moves to node 2 (a load balancer decision) while pushes keep coming.
    client.reconnect_to(cluster.quic(1));
    push_range(&mut gw, "alice", 51, 100).await;
    let (got, statuses) = collect(&client, 100).await;
    assert_exactly_once(&got, 100);
    assert!(statuses.contains(&ResumeStatus::Resumed), "{statuses:?}");
    assert_eq!(client.node_id(), "dp-2");
    assert!(client.request(1, "echo after").await.is_ok());
}

/// Invariant: no new session fails across a kill -9 of the control-plane
/// leader. A new session starts every 100 ms on one of the three data planes
/// from the kill until a new leader is known and [`AFTER_ELECTION`] after;
/// each must start on its first attempt (`Client::connect` makes one) and
/// answer a request. The data planes hold each Start's claim through the
/// election (`core::claim`), including the new leader's refusals while their
/// leases, not renewed during the election, are expired. And every zone keeps
/// its upstream: the new leader expires leases not renewed within its grace
/// (2 s here), so an upstream whose renewals stopped with the old leader would
/// drop out of routing inside the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_started_while_the_control_plane_leader_dies_all_start() {
    let mut cluster = three_by_three().await;
    let leader = cluster.leader().await.expect("a leader");
    cluster.kill_cp(leader);
    let mut starts = Vec::new();
    let mut leader_known_at: Option<tokio::time::Instant> = None;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut i = 0usize;
    // Past the new leader's lease grace (2 s) and a lease (2 s): an upstream
    // lease not renewed across the election has expired by the end.
    const AFTER_ELECTION: Duration = Duration::from_secs(5);
    while leader_known_at.is_none_or(|t| t.elapsed() < AFTER_ELECTION) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new control-plane leader"
        );
        let config = cluster.client_config(i % 3, &format!("newcomer-{i}"));
        starts.push(tokio::spawn(async move {
            let client = Client::connect(config)
                .await
                .map_err(|e| format!("start: {e}"))?;
            client
                .request(1, "echo first")
                .await
                .map_err(|e| format!("first request: {e}"))?;
            Ok::<_, String>(())
        }));
        i += 1;
        if leader_known_at.is_none()
            && let Some(new) = cluster.leader().await
            && new != leader
        {
            leader_known_at = Some(tokio::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut failed = Vec::new();
    for (i, start) in starts.into_iter().enumerate() {
        if let Err(e) = start.await.expect("the session task") {
            failed.push(format!("newcomer-{i}: {e}"));
        }
    }
    assert!(i >= 5, "sessions started during the election: {i}");
    assert!(
        failed.is_empty(),
        "{} of {i} new sessions failed: {failed:?}",
        failed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_down_traffic_continues_and_a_restarted_node_serves() {
    let mut cluster = three_by_three().await;
    let client = Client::connect(cluster.client_config(0, "bob"))
        .await
        .unwrap();
    client.request(1, "echo before").await.unwrap();
    // Let every node save a state file that knows the upstreams.
    tokio::time::sleep(Duration::from_secs(1)).await;

    for cp in &mut cluster.cps {
        if let Some(mut p) = cp.proc.take() {
            p.kill();
        }
    }
    // Traffic continues for 30 s with no control plane at all.
    let mut gw = cluster.gateway(0).await;
    let outage_end = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut sent, mut requests, mut failed) = (0u64, 0u64, 0u64);
    while tokio::time::Instant::now() < outage_end {
        if client.request(1, "echo during outage").await.is_err() {
            failed += 1;
        }
        requests += 1;
        // (Bounded below the session queue: the client consumes after the outage.)
        if sent < 400 {
            sent += 1;
            push_range(&mut gw, "bob", sent, sent).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(requests > 100, "traffic ran through the outage");
    assert_eq!(
        failed, 0,
        "existing sessions keep working: 0 of {requests} requests failed"
    );

    // A data plane restarted during the outage starts from its state file and routes.
    cluster.restart_dp(2);
    cluster.wait_ready(2).await;
    let http = cluster.http(2);
    let (_, stats) = http_get(http, "/stats").await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(
        stats["cluster"]["serving_from_saved_state"], true,
        "{stats}"
    );
    let newcomer = Client::connect(cluster.client_config(2, "user-3"))
        .await
        .unwrap();
    newcomer
        .request(1, "echo provisional")
        .await
        .expect("routed from the saved state");

    let (got, _) = collect(&client, sent as usize).await;
    assert_exactly_once(&got, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_node_under_load() {
    let mut cluster = three_by_three().await;
    let users = ["d1", "d2", "d3", "d4"];
    let mut clients = Vec::new();
    for u in users {
        clients.push(Client::connect(cluster.client_config(0, u)).await.unwrap());
    }
    let mut gw = cluster.gateway(1).await;
    for u in users {
        push_range(&mut gw, u, 1, 30).await;
    }
    // A rolling-upgrade step: SIGTERM node 1 while pushes continue.
    cluster.sigterm(0);
    for u in users {
        push_range(&mut gw, u, 31, 60).await;
    }
    let status = cluster.wait_exit(0).await;
    assert!(status.success(), "drained node exits cleanly: {status:?}");
    for (u, client) in users.iter().zip(&clients) {
        let (got, mut statuses) = collect(client, 60).await;
        assert_exactly_once(&got, 60);
        // The move may come after the last push was delivered.
        while !statuses.contains(&ResumeStatus::Resumed) {
            match tokio::time::timeout(PATIENCE, client.next_event()).await {
                Ok(Some(Event::Connected { status, .. })) => statuses.push(status),
                Ok(Some(Event::Push(p))) => panic!("{u}: unexpected extra push {}", p.content),
                Ok(Some(_)) => {}
                other => panic!("{u}: never resumed elsewhere ({statuses:?}, {other:?})"),
            }
        }
        assert_ne!(client.node_id(), "dp-1", "{u} moved off the drained node");
        client.request(1, "echo after drain").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_owner_loses_no_durable_push() {
    kill_9_with_unacked_durable_pushes(Comeback::OnAnotherNode).await;
}

/// A restart keeps the node id (a StatefulSet pod, a supervisor restarting
/// the process in place): the control plane then names the restarted node as
/// the session's previous owner. It used to take that for "the session is
/// mine" and answer SESSION_EXPIRED, dropping the durable pushes its standby
/// held (simulation seed 14, Restart fault).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_with_the_same_node_id_loses_no_durable_push() {
    kill_9_with_unacked_durable_pushes(Comeback::SameNodeRestarted).await;
}

/// kill -9 of the node a client is connected to. The node's host refuses the
/// client's next datagrams (ICMP port unreachable, reported on the SDK's
/// connected socket), so the SDK moves on to its fallback address without
/// waiting for its liveness timeout, set here far beyond the test's patience.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_clients_node_is_noticed_by_its_refused_datagrams() {
    let mut cluster = three_by_three().await;
    let config = cluster
        .client_config(0, "erin")
        .with_fallback_addrs([cluster.quic(1)])
        .with_liveness_timeout(Duration::from_secs(600));
    let client = Client::connect(config).await.unwrap();
    assert!(matches!(
        client.next_event().await,
        Some(Event::Connected { .. })
    ));
    assert!(client.request(1, "before").await.is_ok());
    cluster.kill(0);
    let mut reason = None;
    loop {
        match tokio::time::timeout(PATIENCE, client.next_event()).await {
            Ok(Some(Event::Disconnected { reason: r, .. })) => reason = Some(r),
            Ok(Some(Event::Connected { node_id, .. })) => {
                assert_eq!(node_id, "dp-2", "the fallback address");
                break;
            }
            Ok(Some(_)) => {}
            other => panic!(
                "no reconnect within {PATIENCE:?} of the kill (liveness timeout 600 s): \
                 {other:?}, disconnected: {reason:?}"
            ),
        }
    }
    let reason = reason.expect("a Disconnected event before the reconnect");
    assert!(
        reason.contains("unreachable"),
        "noticed by the refusals, not the idle timeout: {reason}"
    );
    assert!(client.request(2, "after").await.is_ok());
}

/// The standby of a session is killed, then, once the owner has copied the
/// session to the next node, the owner. Each ack-sync round probes every
/// standby, so the owner finds the dead one within about a second (it is still
/// live in the view: its lease has not run out) and copies the whole queue to
/// the next node of the ring (`core::Members::mark_unreachable`,
/// `replica::standby_unreachable`). Until this test only the simulation's
/// mirror of that path checked it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_standby_then_of_the_owner_loses_no_durable_push() {
    let mut cluster = three_by_three().await;
    let mut gw = cluster.gateway(0).await;
    let client = acked_then_unacked(&cluster, &mut gw, "dave", 10, 10).await;
    // The standby is whichever of the other two holds dave's pushes (the
    // client's acks of 1..=10 may not have reached the owner before it lost
    // its network: at least the 10 unacked ones).
    let standby = wait_for(|| async {
        for i in [1, 2] {
            let (sessions, pushes) = replicas_held(&cluster, i).await;
            if sessions == 1 && pushes >= 10 {
                return Some((i, pushes));
            }
        }
        None
    })
    .await;
    let Some((standby, pushes)) = standby else {
        let mut held = Vec::new();
        for i in 0..3 {
            held.push(replicas_held(&cluster, i).await);
        }
        panic!("no node holds the replica of dave's pushes: {held:?}");
    };
    let heir = 3 - standby;
    assert_eq!(replicas_held(&cluster, heir).await, (0, 0), "one copy only");

    cluster.kill(standby);
    // The owner copies the session to the other node, with no push to prompt it.
    wait_for(|| async { (replicas_held(&cluster, heir).await == (1, pushes)).then_some(()) })
        .await
        .unwrap_or_else(|| {
            panic!(
                "the owner never copied the session to {heir}\nDP0 {}",
                cluster.log_tail(0)
            )
        });
    // New durable pushes are replicated there.
    for n in 21..=25u64 {
        durable_push(&mut gw, "dave", n).await;
    }
    cluster.kill(0);
    client.reconnect_to(cluster.quic(heir));
    let (status, recovered) = after_resume_failed(&client, 15, || cluster.log_tail(heir)).await;
    assert_eq!(status, ResumeStatus::Recovered);
    assert_eq!(
        recovered,
        (11..=25).collect::<Vec<_>>(),
        "every unacked durable push survived both crashes, in order"
    );
}

/// Simulation seed 5262 of session 10, as processes: the owner is killed
/// during a full control-plane outage, so nothing declares it dead. Its
/// standby, holding the only copy, stops hearing from it, probes it, finds
/// nothing listening and copies the session to the third node
/// (`replica::probe_silent_owners`); then the standby is killed too and the
/// control plane comes back. The client, back on the third node, is told
/// RECOVERED with every unacked durable push. Before the probe, the standby
/// waited for the control plane to declare the owner dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_owner_during_a_control_plane_outage_then_of_its_standby_loses_no_durable_push()
 {
    let mut cluster = three_by_three().await;
    let mut gw = cluster.gateway(0).await;
    let client = acked_then_unacked(&cluster, &mut gw, "gina", 10, 10).await;
    // The standby holds the 10 unacked pushes, and those of the first 10 whose
    // acks had not reached the owner: read twice, an ack sync (once a second)
    // apart, until the count is settled.
    let give_up = tokio::time::Instant::now() + PATIENCE;
    let mut seen = None;
    let (standby, pushes) = loop {
        let mut now = None;
        for i in [1, 2] {
            let (sessions, pushes) = replicas_held(&cluster, i).await;
            if sessions == 1 && pushes >= 10 {
                now = Some((i, pushes));
            }
        }
        if let Some(settled) = now
            && now == seen
        {
            break settled;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "no node holds a settled replica of gina's pushes ({now:?})"
        );
        seen = now;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    };
    let heir = 3 - standby;
    assert_eq!(replicas_held(&cluster, heir).await, (0, 0), "one copy only");

    for id in 1..=3 {
        cluster.kill_cp(id);
    }
    cluster.kill(0);
    wait_for(|| async { (replicas_held(&cluster, heir).await == (1, pushes)).then_some(()) })
        .await
        .unwrap_or_else(|| {
            panic!(
                "the standby never copied the dead owner's session to {heir}\nDP{standby} {}",
                cluster.log_tail(standby)
            )
        });
    cluster.kill(standby);
    for id in 1..=3 {
        cluster.restart_cp(id);
    }
    client.reconnect_to(cluster.quic(heir));
    let (status, mut recovered) = after_resume_failed(&client, 10, || cluster.log_tail(heir)).await;
    assert_eq!(status, ResumeStatus::Recovered);
    // Pushes whose ack had not reached the owner come again too.
    while recovered.last() != Some(&20) && recovered.len() < pushes as usize {
        match tokio::time::timeout(PATIENCE, client.next_event()).await {
            Ok(Some(Event::Push(p))) => recovered.push(p.content.parse().unwrap()),
            Ok(Some(_)) => {}
            other => panic!("stalled after {recovered:?} ({other:?})"),
        }
    }
    let first = recovered[0];
    assert!(first <= 11, "{recovered:?}");
    assert_eq!(
        recovered,
        (first..=20).collect::<Vec<_>>(),
        "every unacked durable push survived both crashes, in order"
    );
}

/// A client moves its session to the owner's standby (dp-1 -> dp-2, the next
/// node on the ring). The session arrives there with unacked durable pushes,
/// and dp-2 copies it to its own standby (dp-3) at once, with no new push
/// to prompt it (`Registry::copy_soon`). Before, the only other copy was the
/// old owner's, until the next durable push: with the new owner restarting
/// soon after, one more crash lost them (simulation seed 189 of session 8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_handed_over_with_pushes_is_copied_to_the_new_standby_at_once() {
    let cluster = three_by_three().await;
    let mut gw = cluster.gateway(0).await;
    let client = acked_then_unacked(&cluster, &mut gw, "erin", 5, 5).await;
    // dp-2 is dp-1's standby (the ring of sorted node ids) and holds the copy.
    wait_for(|| async {
        let (sessions, pushes) = replicas_held(&cluster, 1).await;
        (sessions == 1 && pushes >= 5).then_some(())
    })
    .await
    .expect("dp-2 holds erin's replica");
    assert_eq!(
        replicas_held(&cluster, 2).await,
        (0, 0),
        "dp-3 holds nothing yet"
    );
    // The client comes back on dp-2, which takes the session over.
    client.reconnect_to(cluster.quic(1));
    let (got, statuses) = collect(&client, 5).await;
    assert_eq!(got, (6..=10).collect::<Vec<_>>(), "resumed on dp-2");
    assert_eq!(statuses, vec![ResumeStatus::Resumed]);
    // dp-3, dp-2's standby, gets the whole queue without another push.
    wait_for(|| async { (replicas_held(&cluster, 2).await.0 == 1).then_some(()) })
        .await
        .unwrap_or_else(|| {
            panic!(
                "dp-2 never copied the session to its standby\nDP1 {}",
                cluster.log_tail(1)
            )
        });
}

/// Waits for the client's resume to be refused (the status it got) and for
/// the `n` pushes the session it got instead delivers after that, each
/// marked as a redelivery; `logs` explains a stall.
async fn after_resume_failed(
    client: &Client,
    n: usize,
    logs: impl Fn() -> String,
) -> (ResumeStatus, Vec<u64>) {
    let mut status = None;
    let mut pushes = Vec::new();
    loop {
        match (status, pushes.len()) {
            (Some(s), got) if got >= n => return (s, pushes),
            _ => {}
        }
        match tokio::time::timeout(PATIENCE * 2, client.next_event()).await {
            Ok(Some(Event::Push(p))) if status.is_some() => {
                assert!(p.redelivery, "recovered pushes are marked as redeliveries");
                pushes.push(p.content.parse::<u64>().unwrap());
            }
            Ok(Some(Event::ResumeFailed { status: s, .. })) => status = Some(s),
            Ok(Some(_)) => {}
            other => panic!(
                "stalled: status {status:?}, pushes {pushes:?} ({other:?})\n{}",
                logs()
            ),
        }
    }
}

/// Starts `openid` on data plane 0; `acked` durable pushes through `gw` that
/// the client reads, then the client loses its network and `unacked` more
/// are accepted for it (numbered on from `acked + 1`).
async fn acked_then_unacked(
    cluster: &ProcessCluster,
    gw: &mut GatewayServiceClient<tonic::transport::Channel>,
    openid: &str,
    acked: u64,
    unacked: u64,
) -> Client {
    let client = Client::connect(cluster.client_config(0, openid))
        .await
        .unwrap();
    for n in 1..=acked {
        durable_push(gw, openid, n).await;
    }
    let (got, _) = collect(&client, acked as usize).await;
    assert_eq!(got, (1..=acked).collect::<Vec<_>>());
    // The client keeps retrying an address that does not answer.
    client.reconnect_to("127.0.0.1:9".parse().unwrap());
    for n in acked + 1..=acked + unacked {
        durable_push(gw, openid, n).await;
    }
    client
}

/// (sessions, durable pushes) data plane `i` holds as replicas, from `/stats`.
async fn replicas_held(cluster: &ProcessCluster, i: usize) -> (u64, u64) {
    let (status, body) = http_get(cluster.http(i), "/stats").await;
    assert_eq!(status, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    let replicas = &stats["replicas"];
    (
        replicas["sessions"].as_u64().unwrap(),
        replicas["pushes"].as_u64().unwrap(),
    )
}

/// Polls `f` every 100 ms until it gives a value, for at most `PATIENCE`.
async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    mut f: impl FnMut() -> F,
) -> Option<T> {
    let give_up = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < give_up {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

enum Comeback {
    /// The client reconnects to another node.
    OnAnotherNode,
    /// The killed node starts again with its node id; the client comes back to it.
    SameNodeRestarted,
}

/// kill -9 of the owner of a session holding 10 unacked durable pushes; the
/// client comes back and is told RECOVERED with all 10, in order.
async fn kill_9_with_unacked_durable_pushes(comeback: Comeback) {
    let mut cluster = three_by_three().await;
    let mut gw = cluster.gateway(1).await;
    // 10 durable pushes the client reads (and so acks), then 10 more
    // accepted while it has lost its network.
    let client = acked_then_unacked(&cluster, &mut gw, "carol", 10, 10).await;
    // Let the ack point reach the standby (synced once a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // kill -9 the owner; the client's network comes back.
    cluster.kill(0);
    match comeback {
        Comeback::OnAnotherNode => client.reconnect_to(cluster.quic(1)),
        Comeback::SameNodeRestarted => {
            cluster.restart_dp(0);
            cluster.wait_ready(0).await;
            client.reconnect_to(cluster.quic(0));
        }
    }
    // What counts is what the rebuilt session delivers after it says so.
    let (status, recovered) = after_resume_failed(&client, 10, || {
        format!("DP0 {}\nDP1 {}", cluster.log_tail(0), cluster.log_tail(1))
    })
    .await;
    assert_eq!(
        status,
        ResumeStatus::Recovered,
        "the client is told its session was rebuilt"
    );
    assert_eq!(
        recovered,
        (11..=20).collect::<Vec<_>>(),
        "every unacked durable push survived the crash, in order"
    );
    assert!(client.request(1, "echo after crash").await.is_ok());
}
