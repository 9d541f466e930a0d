//! Three consecutive rolling replacements of every data-plane process, as
//! real processes: a 3-node control plane (raft, mTLS), three data planes and
//! one upstream per zone. Each replacement starts a new node (a new name, as
//! Helm names pods on every rollout), drains the old one by SIGTERM and waits
//! for it to exit, while pushes keep flowing to every client. Afterwards, with
//! nine departed nodes' records in the control plane: a broadcast reaches
//! every session, pushes are delivered, and a kill -9 of a session's owner
//! loses no unacknowledged durable push.
//!
//! Counts are printed and asserted: sent, acked, delivered, duplicates,
//! lost = 0, failed = 0. No assertion is about time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gatesvr_proto::client::ResumeStatus;
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_sdk::{Client, Event};
use gatesvr_tests::PATIENCE;
use gatesvr_tests::cluster::push;
use gatesvr_tests::processes::ProcessCluster;
use parking_lot::Mutex;

type Gw = GatewayServiceClient<tonic::transport::Channel>;

/// What one client saw.
#[derive(Default, Debug)]
struct Seen {
    /// Push contents in arrival order.
    pushes: Vec<String>,
    /// Contents that arrived again marked as redeliveries (a recovered
    /// session redelivers what its replica holds above the ack it knew).
    redelivered: Vec<String>,
    statuses: Vec<ResumeStatus>,
    resume_failed: Vec<ResumeStatus>,
}

#[derive(Default, Debug)]
struct Counts {
    sent: u64,
    acked: u64,
    failed: u64,
}

/// Consumes `client`'s events into `seen` until it closes.
fn collect(client: Arc<Client>, seen: Arc<Mutex<Seen>>) {
    tokio::spawn(async move {
        while let Some(event) = client.next_event().await {
            let mut s = seen.lock();
            match event {
                Event::Push(p) if p.redelivery && s.pushes.contains(&p.content) => {
                    s.redelivered.push(p.content)
                }
                Event::Push(p) => s.pushes.push(p.content),
                Event::Connected { status, .. } => s.statuses.push(status),
                Event::ResumeFailed { status, .. } => s.resume_failed.push(status),
                _ => {}
            }
        }
    });
}

/// One push, retried while the session is between nodes (NOT_FOUND or
/// UNAVAILABLE: nothing was queued, so a retry cannot duplicate).
async fn send(gw: &mut Gw, openid: &str, content: String, durable: bool, counts: &mut Counts) {
    counts.sent += 1;
    for _ in 0..400 {
        let mut p = push(openid, 0);
        p.content = content.clone();
        p.durable = durable;
        match gw.push_to_client(p).await {
            Ok(_) => {
                counts.acked += 1;
                return;
            }
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::NotFound | tonic::Code::Unavailable | tonic::Code::Aborted
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => {
                eprintln!("push {content} to {openid} failed: {s}");
                counts.failed += 1;
                return;
            }
        }
    }
    eprintln!("push {content} to {openid}: never accepted");
    counts.failed += 1;
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_rolling_replacements_then_broadcast_push_and_kill_9_recovery() {
    let mut cluster = ProcessCluster::start(&["dp-1", "dp-2", "dp-3"], 6).await;
    let users: Vec<String> = (1..=6).map(|i| format!("roll-{i}")).collect();
    let mut clients = Vec::new();
    let mut seen = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let c = Arc::new(
            Client::connect(cluster.client_config(i % 3, u))
                .await
                .unwrap(),
        );
        let s = Arc::new(Mutex::new(Seen::default()));
        collect(c.clone(), s.clone());
        clients.push(c);
        seen.push(s);
    }
    let mut counts = Counts::default();
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut next = 0u64;
    let mut names = 3;
    for round in 1..=3 {
        let old: Vec<usize> = cluster.running();
        for o in old {
            names += 1;
            let new = cluster.add_dp(&format!("dp-{names}")).await;
            let pid = cluster.dps[o].name.clone();
            // Pushes enter through the newest node while the old one drains.
            let mut gw = cluster.gateway(new).await;
            let drain = cluster.drain_and_stop(o);
            let traffic = async {
                for _ in 0..5 {
                    for u in &users {
                        next += 1;
                        let content = format!("{round}-{next}");
                        send(
                            &mut gw,
                            u,
                            content.clone(),
                            next.is_multiple_of(2),
                            &mut counts,
                        )
                        .await;
                        expected.entry(u.clone()).or_default().push(content);
                    }
                }
            };
            let (status, ()) = tokio::join!(drain, traffic);
            assert!(
                status.success(),
                "{pid} drained and exited cleanly: {status:?}"
            );
        }
    }
    let live = cluster.running();
    assert_eq!(live.len(), 3);
    let mut gw = cluster.gateway(live[0]).await;

    // Broadcast with nine departed nodes in the view: reaches every session.
    let answer = gw
        .broadcast_to_clients(gatesvr_proto::upstream::BroadcastRequest {
            msg_type: "news".into(),
            content: "after three rollouts".into(),
            data: Vec::new(),
            zones: Vec::new(),
        })
        .await
        .expect("broadcast answered")
        .into_inner();
    counts.sent += users.len() as u64;
    counts.acked += u64::from(answer.queued);
    counts.failed += u64::from(answer.rejected);
    assert_eq!(answer.queued as usize, users.len(), "{answer:?}");
    for u in &users {
        expected
            .entry(u.clone())
            .or_default()
            .push("after three rollouts".into());
    }
    // Pushes after the rollouts.
    for u in &users {
        for _ in 0..5 {
            next += 1;
            let content = format!("after-{next}");
            send(&mut gw, u, content.clone(), true, &mut counts).await;
            expected.entry(u.clone()).or_default().push(content);
        }
    }
    for (i, u) in users.iter().enumerate() {
        let want = expected[u].len();
        wait_until(&format!("{u} got its {want} pushes"), || {
            seen[i].lock().pushes.len() >= want
        })
        .await;
    }

    // Requests go through the upstreams after the rollouts.
    for c in &clients {
        c.request(1, "after the rollouts")
            .await
            .expect("requests still work");
    }

    // kill -9 of the owner of one session with unacked durable pushes.
    let victim = 0;
    let owner = cluster
        .index_of(&clients[victim].node_id())
        .expect("owner is a known node");
    let other = *live.iter().find(|i| **i != owner).expect("another node");
    let mut gw = cluster.gateway(other).await;
    clients[victim].reconnect_to("127.0.0.1:9".parse().unwrap());
    let mut durable = Vec::new();
    for _ in 0..10 {
        next += 1;
        let content = format!("durable-{next}");
        send(&mut gw, &users[victim], content.clone(), true, &mut counts).await;
        durable.push(content);
    }
    // The ack point reaches the standby once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.kill(owner);
    clients[victim].reconnect_to(cluster.quic(other));
    let before = expected[&users[victim]].len();
    wait_until(
        "the victim's session is recovered with its durable pushes",
        || {
            let s = seen[victim].lock();
            s.resume_failed.contains(&ResumeStatus::Recovered)
                && s.pushes.len() >= before + durable.len()
        },
    )
    .await;
    expected
        .get_mut(&users[victim])
        .expect("victim")
        .extend(durable.iter().cloned());

    // Counts.
    let mut delivered = 0u64;
    let mut duplicates = 0u64;
    let mut lost = 0u64;
    for (i, u) in users.iter().enumerate() {
        let s = seen[i].lock();
        let mut distinct = std::collections::HashSet::new();
        for p in &s.pushes {
            if !distinct.insert(p.clone()) {
                eprintln!("{u}: push {p} delivered twice without the redelivery flag");
                duplicates += 1;
            }
        }
        delivered += distinct.len() as u64;
        for want in &expected[u] {
            if !distinct.contains(want) {
                eprintln!("{u}: push {want} lost");
                lost += 1;
            }
        }
        // In order: the pushes of one sender arrive in the order sent.
        let order: Vec<&String> = s
            .pushes
            .iter()
            .filter(|p| expected[u].contains(p))
            .collect();
        let mut dedup = order.clone();
        dedup.dedup();
        assert_eq!(
            dedup,
            expected[u].iter().collect::<Vec<_>>(),
            "{u}: every push once, in order"
        );
    }
    let redelivered: usize = seen.iter().map(|s| s.lock().redelivered.len()).sum();
    eprintln!(
        "rolling: sent {} acked {} delivered {delivered} duplicates {duplicates} (and {redelivered} flagged redeliveries) lost {lost} failed {} (departed nodes: 9)",
        counts.sent, counts.acked, counts.failed
    );
    assert_eq!(counts.failed, 0, "failed = 0");
    assert_eq!(counts.acked, counts.sent, "every push acknowledged");
    assert_eq!(lost, 0, "lost = 0");
    assert_eq!(duplicates, 0, "duplicates = 0");
    assert_eq!(delivered, counts.sent, "delivered == sent");
    clients[victim]
        .request(1, "after the crash")
        .await
        .expect("the recovered session serves requests");
}
