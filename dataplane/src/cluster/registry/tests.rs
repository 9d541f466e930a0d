//! Registry rules the shell relies on, each tied to a defect of issue 12
//! ("two sources of truth"): these failed before the registry asked the core.

use std::time::Instant;

use crate::metrics::Metrics;
use crate::session::{PushMessage, Session, SessionConfig, SessionIdentity};

use super::Registry;

fn registry() -> Registry {
    Registry::new(SessionConfig::default(), 4, Metrics::new())
}

fn state(openid: &str, sid: &str) -> gatesvr_proto::session::SessionState {
    Session::new(
        SessionIdentity {
            session_id: sid.into(),
            openid: openid.into(),
            zone: "001".into(),
        },
        SessionConfig::default(),
        Instant::now(),
    )
    .export()
}

fn msg() -> PushMessage {
    PushMessage {
        content: "x".into(),
        ..Default::default()
    }
}

/// Defect 1: a push that found the entry just before a handover exported it
/// was queued into the exported copy and answered OK, then lost.
#[test]
fn a_push_racing_a_handover_is_never_queued_on_the_exported_copy() {
    let reg = registry();
    reg.install(state("u", "s"), 3).unwrap();
    let entry = reg.get("u").expect("installed");
    let handed = reg.hand_over("u", 4, "dp-2", true).unwrap();
    assert!(handed.is_some());
    // The gateway looked the entry up before the handover; its push lands now.
    assert!(
        reg.push(&entry, msg()).is_err(),
        "a push queued on an exported session is answered OK and lost"
    );
}

/// Defect 3: `install` replaced a local copy without comparing epochs.
#[test]
fn install_refuses_a_state_older_than_the_local_copy() {
    let reg = registry();
    reg.install(state("u", "s"), 6).unwrap();
    assert!(
        reg.install(state("u", "s"), 5).is_err(),
        "an older copy replaced a newer one"
    );
    assert_eq!(reg.get("u").unwrap().state.lock().epoch(), 6);
}

/// Defect 3: a Handover with epoch 0 skipped fencing and took the session.
#[test]
fn a_handover_without_an_epoch_is_refused() {
    let reg = registry();
    reg.install(state("u", "s"), 6).unwrap();
    assert!(
        reg.hand_over("u", 0, "intruder", true).is_err(),
        "epoch 0 took a session held at epoch 6"
    );
    assert!(reg.get("u").is_some());
}

/// Defect 2: a request that began after a drain staged the session on its
/// successor ran on the exported copy; the client's retry ran it again there.
#[test]
fn a_request_on_a_session_staged_away_is_not_executed() {
    let reg = registry();
    reg.install(state("u", "s"), 3).unwrap();
    let entry = reg.get("u").unwrap();
    assert!(reg.stage_out("u", "dp-2").is_some());
    assert_eq!(
        reg.begin_request(&entry, 1),
        crate::core::RequestOutcome::NotHere
    );
    assert_eq!(entry.state.lock().stats().requests_in_flight, 0);
}

fn owner(openid: &str, node: &str, epoch: u64) -> gatesvr_proto::control::SessionOwner {
    gatesvr_proto::control::SessionOwner {
        openid: openid.into(),
        owner_node: node.into(),
        epoch,
        ..Default::default()
    }
}

/// Defect 3: fencing fired only on a watch delta (plus 5 s), never when the
/// watch resynced with a snapshot; the stale copy kept taking pushes.
#[test]
fn a_view_snapshot_fences_an_older_local_copy_at_once() {
    let reg = registry();
    reg.install(state("u", "s"), 3).unwrap();
    let mut view = crate::cluster::View::default();
    view.owners.insert("u".into(), owner("u", "dp-2", 9));
    reg.view_changed(&view);
    assert!(reg.get("u").is_none(), "a stale copy still serves");
    assert_eq!(
        reg.push_to(crate::core::Target::Openid("u"), msg(), None)
            .err(),
        Some(super::PushFailure::Moved("dp-2".into()))
    );
    // The owner's Handover still gets the state.
    assert!(reg.hand_over("u", 9, "dp-2", true).unwrap().is_some());
}

/// Defect 3: the push path compares the local epoch with the view's owner.
#[test]
fn a_push_to_a_stale_copy_is_forwarded_to_the_views_owner() {
    let reg = registry();
    reg.install(state("u", "s"), 3).unwrap();
    let r = reg.push_to(crate::core::Target::Openid("u"), msg(), Some(("dp-2", 4)));
    assert_eq!(r.err(), Some(super::PushFailure::Moved("dp-2".into())));
}

/// Defect 5: the `fenced` map was never pruned.
#[test]
fn fenced_state_is_forgotten_after_its_deadline() {
    let reg = registry();
    reg.install(state("u", "s"), 1).unwrap();
    reg.owner_changed(&owner("u", "dp-2", 2));
    assert_eq!(reg.with_table(|t| t.slot_count()), 1);
    let later = Instant::now() + crate::core::TableConfig::default().fenced_ttl;
    reg.tick(later);
    assert_eq!(reg.with_table(|t| t.slot_count()), 0, "fenced state leaked");
}

/// Defect 5: the `recovered` marker outlived its session when the session
/// left by handover (`remove_quietly` did not clear it).
#[test]
fn a_recovered_marker_leaves_with_its_session() {
    let reg = registry();
    reg.install_as(
        state("u", "new"),
        3,
        crate::core::Holding::Recovered {
            old_session_id: "old".into(),
        },
        None,
    )
    .unwrap();
    assert!(reg.hand_over("u", 4, "dp-2", true).unwrap().is_some());
    reg.install(state("u", "other"), 5).unwrap();
    assert_eq!(
        reg.with_table(|t| t.holding("u").cloned()),
        Some(crate::core::Holding::Owned),
        "the recovered marker outlived its session (a leak)"
    );
}

/// A Handover queued behind the dead owner's connection attempt learns
/// "down" as soon as another call was refused (`gate-bench failover`: the
/// last of 500 waited 1.2-1.5 s for its own refusal before).
#[tokio::test]
async fn one_refusal_answers_every_call_waiting_on_the_node() {
    use crate::core::Reach;
    let reg = std::sync::Arc::new(registry());
    reg.with_table(|t| {
        for id in ["dp-2", "dp-3"] {
            t.members_mut().put(crate::core::Member {
                node_id: id.into(),
                state: gatesvr_proto::control::NodeState::Active,
                grpc_addr: format!("{id}:1"),
                quic_addr: format!("{id}:2"),
                registered_at_ms: 0,
            });
        }
    });
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let reg = reg.clone();
            tokio::spawn(async move { reg.until_down("dp-2").await })
        })
        .collect();
    tokio::task::yield_now().await;
    let until = Instant::now() + std::time::Duration::from_secs(5);
    reg.mark_unreachable("dp-3", Reach::Down, until);
    reg.mark_unreachable("dp-2", Reach::NoAnswer, until);
    tokio::task::yield_now().await;
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "another node, or silence"
    );
    reg.mark_unreachable("dp-2", Reach::Down, until);
    for w in waiting {
        tokio::time::timeout(std::time::Duration::from_secs(5), w)
            .await
            .expect("woken")
            .unwrap();
    }
    reg.peer_answered("dp-2");
    assert!(!reg.is_down("dp-2"));
}
