//! The table's rules, one test each, without a network or a clock.

use std::time::{Duration, Instant};

use gatesvr_proto::client::{ErrorCode, ResumeStatus, ServerPush};
use gatesvr_proto::control::NodeState;

use super::*;
use crate::session::{PushMessage, RequestDisposition, Session, SessionConfig, SessionIdentity};

fn cell(openid: &str, sid: &str, now: Instant, epoch: u64) -> PlainCell {
    let id = SessionIdentity {
        session_id: sid.into(),
        openid: openid.into(),
        zone: "001".into(),
    };
    let mut s = Session::new(id, SessionConfig::default(), now);
    s.set_epoch(epoch);
    PlainCell::new(s)
}

fn msg(n: u64) -> PushMessage {
    PushMessage {
        content: format!("m{n}"),
        ..Default::default()
    }
}

fn table() -> Table<PlainCell> {
    table_of(
        "dp-1",
        &[
            ("dp-1", NodeState::Active),
            ("dp-2", NodeState::Active),
            ("dp-3", NodeState::Draining),
            ("dp-4", NodeState::Left),
            ("dp-5", NodeState::Dead),
        ],
    )
}

/// A copy of "u" (session "s", cell epoch `cell_epoch`) staged here by dp-2
/// at `epoch`, as a drain's Stage installs it.
fn staged_copy(t: &mut Table<PlainCell>, now: Instant, cell_epoch: u64, epoch: u64) -> PlainCell {
    let c = cell("u", "s", now, cell_epoch);
    t.install(
        c.clone(),
        epoch,
        Holding::Staged {
            from: "dp-2".into(),
        },
        None,
    )
    .unwrap();
    c
}

/// The table of node `me` with these members.
fn table_of(me: &str, nodes: &[(&str, NodeState)]) -> Table<PlainCell> {
    let mut t = Table::new(me, TableConfig::default());
    for &(id, state) in nodes {
        t.members_mut().put(Member {
            node_id: id.into(),
            state,
            grpc_addr: format!("{id}:1"),
            quic_addr: format!("{id}:2"),
            registered_at_ms: 0,
        });
    }
    t
}

fn queued<H>(o: &PushOutcome<H>) -> Option<u64> {
    match o {
        PushOutcome::Queued { seq_id, .. } => Some(*seq_id),
        _ => None,
    }
}

#[test]
fn a_push_after_a_handover_is_forwarded_never_queued_on_the_export() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 3);
    t.start(c.clone(), Holding::Owned, "replaced");
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), None);
    assert_eq!(queued(&o), Some(1));
    let (state, handle) = t
        .hand_over(
            now,
            "u",
            HandoverAsk::Peer {
                epoch: 4,
                new_owner: "dp-2".into(),
            },
        )
        .unwrap()
        .unwrap();
    assert_eq!(state.pushes.len(), 1);
    assert!(handle.is_some());
    let (o, _) = t.push(now, Target::Openid("u"), msg(2), None);
    assert!(
        matches!(o, PushOutcome::Forward { ref to } if to == "dp-2"),
        "{o:?}"
    );
    let (o, _) = t.push(now, Target::Session("s"), msg(3), None);
    assert!(
        matches!(o, PushOutcome::Forward { ref to } if to == "dp-2"),
        "{o:?}"
    );
    // Nothing reached the exported session.
    assert_eq!(c.with(|s| s.stats().unacked), 1);
}

#[test]
fn a_request_on_a_moved_session_is_not_executed() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 3);
    t.start(c.clone(), Holding::Owned, "replaced");
    t.hand_over(
        now,
        "u",
        HandoverAsk::Drain {
            successor: "dp-2".into(),
        },
    )
    .unwrap();
    assert_eq!(t.begin_request(&c, 1), RequestOutcome::NotHere);
    assert_eq!(c.with(|s| s.stats().requests_in_flight), 0);
}

#[test]
fn a_request_on_a_local_session_is_the_sessions_decision() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 3);
    t.start(c.clone(), Holding::Owned, "replaced");
    assert_eq!(
        t.begin_request(&c, 1),
        RequestOutcome::Here(RequestDisposition::Execute)
    );
    assert_eq!(
        t.begin_request(&c, 1),
        RequestOutcome::Here(RequestDisposition::InFlight)
    );
}

#[test]
fn a_handover_without_an_epoch_is_refused() {
    let now = Instant::now();
    let mut t = table();
    t.start(cell("u", "s", now, 3), Holding::Owned, "replaced");
    let r = t.hand_over(
        now,
        "u",
        HandoverAsk::Peer {
            epoch: 0,
            new_owner: "x".into(),
        },
    );
    assert_eq!(r.unwrap_err(), HandoverError::NoEpoch);
    assert_eq!(t.slot("u").unwrap().name(), "local");
}

#[test]
fn a_handover_at_an_older_or_equal_epoch_is_fenced() {
    let now = Instant::now();
    let mut t = table();
    t.start(cell("u", "s", now, 5), Holding::Owned, "replaced");
    for asked in [4, 5] {
        let r = t.hand_over(
            now,
            "u",
            HandoverAsk::Peer {
                epoch: asked,
                new_owner: "dp-2".into(),
            },
        );
        assert_eq!(r.unwrap_err(), HandoverError::Fenced { held: 5, asked });
    }
}

#[test]
fn the_view_fences_an_older_local_copy_at_once_and_keeps_its_state_for_the_owner() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 3);
    t.start(c.clone(), Holding::Owned, "replaced");
    t.push(now, Target::Openid("u"), msg(1), None);
    let cmds = t.owner_changed(now, "u", "dp-2", 7);
    assert!(cmds.iter().any(|c| matches!(
        c,
        Command::Close {
            code: ErrorCode::SessionReplaced,
            ..
        }
    )));
    assert_eq!(t.slot("u").unwrap().name(), "fenced");
    let (o, _) = t.push(now, Target::Openid("u"), msg(2), None);
    assert!(matches!(o, PushOutcome::Forward { ref to } if to == "dp-2"));
    // The owner's late Handover gets the state with the push accepted before.
    let (state, _) = t
        .hand_over(
            now,
            "u",
            HandoverAsk::Peer {
                epoch: 7,
                new_owner: "dp-2".into(),
            },
        )
        .unwrap()
        .unwrap();
    assert_eq!(state.pushes.len(), 1);
    assert_eq!(t.slot("u").unwrap().name(), "moved");
}

#[test]
fn a_snapshot_fences_like_a_delta() {
    let now = Instant::now();
    let mut t = table();
    t.start(cell("a", "sa", now, 3), Holding::Owned, "r");
    t.start(cell("b", "sb", now, 3), Holding::Owned, "r");
    let cmds = t.reconcile(now, |o| match o {
        "a" => Some(("dp-2".into(), 9)),
        "b" => Some(("dp-1".into(), 3)),
        _ => None,
    });
    assert_eq!(t.slot("a").unwrap().name(), "fenced");
    assert_eq!(t.slot("b").unwrap().name(), "local");
    assert_eq!(
        cmds.iter()
            .filter(|c| matches!(c, Command::Close { .. }))
            .count(),
        1
    );
}

#[test]
fn a_push_compares_the_epoch_with_the_view_before_queueing() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 3);
    t.start(c.clone(), Holding::Owned, "r");
    let (o, cmds) = t.push(now, Target::Openid("u"), msg(1), Some(("dp-2", 4)));
    assert!(
        matches!(o, PushOutcome::Forward { ref to } if to == "dp-2"),
        "{o:?}"
    );
    assert!(!cmds.is_empty());
    assert_eq!(c.with(|s| s.stats().unacked), 0);
    // The view naming us at a newer epoch is ours: adopted.
    let c2 = cell("v", "s2", now, 3);
    t.start(c2.clone(), Holding::Owned, "r");
    let (o, _) = t.push(now, Target::Openid("v"), msg(1), Some(("dp-1", 8)));
    assert_eq!(queued(&o), Some(1));
    assert_eq!(c2.with(|s| s.epoch()), 8);
}

#[test]
fn install_refuses_a_state_older_than_the_copy_known() {
    let now = Instant::now();
    let mut t = table();
    t.start(cell("u", "s", now, 6), Holding::Owned, "r");
    let r = t.install(cell("u", "s", now, 0), 5, Holding::Owned, None);
    assert_eq!(
        r.unwrap_err(),
        InstallError::Stale {
            held: 6,
            offered: 5
        }
    );
    // Older than the owner the view shows elsewhere: refused too.
    let mut t = table();
    let r = t.install(cell("x", "s", now, 0), 5, Holding::Owned, Some(("dp-2", 9)));
    assert!(r.is_err());
    // Newer: installed, the old local copy's connection closed.
    let mut t = table();
    t.start(cell("u", "s", now, 6), Holding::Owned, "r");
    let cmds = t
        .install(cell("u", "s", now, 0), 7, Holding::Owned, None)
        .unwrap();
    assert_eq!(cmds.len(), 1);
    assert_eq!(t.local("u").unwrap().with(|s| s.epoch()), 7);
}

#[test]
fn fenced_and_moved_slots_are_pruned_by_their_deadline() {
    let now = Instant::now();
    let cfg = TableConfig::default();
    let mut t = table();
    t.start(cell("a", "sa", now, 1), Holding::Owned, "r");
    t.start(cell("b", "sb", now, 1), Holding::Owned, "r");
    t.owner_changed(now, "a", "dp-2", 2);
    t.hand_over(
        now,
        "b",
        HandoverAsk::Peer {
            epoch: 2,
            new_owner: "dp-2".into(),
        },
    )
    .unwrap();
    assert_eq!(t.slot_count(), 2);
    // First due: the state kept for a retry of b's Handover.
    assert_eq!(t.poll_timeout(), Some(now + cfg.handover_copy_ttl));
    t.tick(now + cfg.handover_copy_ttl);
    assert_eq!(t.slot_count(), 2);
    assert_eq!(t.poll_timeout(), Some(now + cfg.fenced_ttl));
    t.tick(now + cfg.fenced_ttl);
    assert!(t.slot("a").is_none());
    t.tick(now + cfg.moved_ttl);
    assert!(t.slot("b").is_none());
    assert!(t.openid_of("sb").is_none());
    assert_eq!(t.poll_timeout(), None);
}

/// A session rebuilt from replicas (here on dp-2) and handed over to dp-1
/// before its client heard the RECOVERED answer: dp-1 holds it as recovered
/// too, so the client resuming the crashed id attaches to it (failover
/// finding 4: it was replaced, its durable pushes lost). A plain session
/// handed over stays owned.
#[test]
fn a_recovered_session_stays_recovered_across_a_handover() {
    let now = Instant::now();
    let mut b = table_of(
        "dp-2",
        &[("dp-1", NodeState::Active), ("dp-2", NodeState::Active)],
    );
    b.install(
        cell("u", "new", now, 4),
        4,
        Holding::Recovered {
            old_session_id: "old".into(),
        },
        None,
    )
    .unwrap();
    let (state, _) = b
        .hand_over(
            now,
            "u",
            HandoverAsk::Peer {
                epoch: 5,
                new_owner: "dp-1".into(),
            },
        )
        .unwrap()
        .expect("exported");
    assert_eq!(state.replaces_session_id, "old");

    let mut t = table();
    let imported = PlainCell::new(Session::import(state, now, SessionConfig::default()).unwrap());
    t.install(imported, 5, Holding::Owned, None).unwrap();
    assert_eq!(
        t.holding("u"),
        Some(&Holding::Recovered {
            old_session_id: "old".into()
        })
    );
    assert_eq!(t.stands_in_for("u", "old"), Some(ResumeStatus::Recovered));
    assert_eq!(t.stands_in_for("u", "new"), None);
    assert_eq!(t.stands_in_for("u", "other"), None);

    t.install(cell("v", "plain", now, 5), 5, Holding::Owned, None)
        .unwrap();
    assert_eq!(t.holding("v"), Some(&Holding::Owned));
    assert_eq!(t.stands_in_for("v", ""), None);
}

/// The same through a drain: a staged recovered session is recovered once
/// its claim commits, and a Start resuming the crashed id attaches to it
/// even before.
#[test]
fn a_staged_recovered_session_is_recovered_once_claimed() {
    let now = Instant::now();
    let mut t = table();
    let mut s = Session::new(
        SessionIdentity {
            session_id: "new".into(),
            openid: "u".into(),
            zone: "001".into(),
        },
        SessionConfig::default(),
        now,
    );
    s.set_replaces("old", ResumeStatus::Recovered);
    let c = PlainCell::new(Session::import(s.export(), now, SessionConfig::default()).unwrap());
    t.install(
        c.clone(),
        7,
        Holding::Staged {
            from: "dp-2".into(),
        },
        None,
    )
    .unwrap();
    assert_eq!(t.stands_in_for("u", "old"), Some(ResumeStatus::Recovered));
    t.claimed(now, &c, 7, Some(("dp-1", 7)));
    assert_eq!(
        t.holding("u"),
        Some(&Holding::Recovered {
            old_session_id: "old".into()
        })
    );
}

/// `gate-bench failover`, session 8: a client resumed its crashed session
/// "old" on dp-1, which made a fresh session in its place (SESSION_EXPIRED),
/// but the client gave up on that Start and resumed "old" on dp-2 instead.
/// The fresh session had accepted durable pushes meanwhile, and dp-2's claim
/// moved it there: the retry attached to a second fresh session and the
/// pushes were dropped with the first. It now attaches to the one that
/// stands in for "old", told SESSION_EXPIRED again, and gets its pushes.
#[test]
fn a_retried_resume_attaches_to_the_fresh_session_its_first_try_made() {
    let now = Instant::now();
    let mut a = table();
    let made = std::cell::Cell::new(0);
    let fresh = |id: &'static str| {
        made.set(made.get() + 1);
        cell("u", id, now, 0)
    };
    let (first, outcome, _) = a.start_session(now, "u", "old", 3, || fresh("s1"));
    assert_eq!(outcome.status, ResumeStatus::SessionExpired);
    assert_eq!(first.identity().session_id, "s1");
    let (o, _) = a.push(now, Target::Openid("u"), msg(1), None);
    assert_eq!(queued(&o), Some(1));

    // The same Start again, here: the same session, the same answer.
    let (again, outcome, cmds) = a.start_session(now, "u", "old", 3, || fresh("s2"));
    assert!(again.same(&first));
    assert_eq!(outcome.status, ResumeStatus::SessionExpired);
    assert_eq!(outcome.first_available_seq_id, 1);
    assert!(cmds.is_empty(), "{cmds:?}");
    assert_eq!(made.get(), 1);

    // Or on another node, after a Handover carried it there.
    let (state, _) = a
        .hand_over(
            now,
            "u",
            HandoverAsk::Peer {
                epoch: 5,
                new_owner: "dp-2".into(),
            },
        )
        .unwrap()
        .expect("exported");
    assert_eq!(state.replaces_session_id, "old");
    let mut b = table_of(
        "dp-2",
        &[("dp-1", NodeState::Active), ("dp-2", NodeState::Active)],
    );
    let imported = PlainCell::new(Session::import(state, now, SessionConfig::default()).unwrap());
    b.install(imported, 5, Holding::Owned, None).unwrap();
    assert_eq!(b.holding("u"), Some(&Holding::Owned));
    let (there, outcome, _) = b.start_session(now, "u", "old", 3, || fresh("s3"));
    assert_eq!(there.identity().session_id, "s1");
    assert_eq!(outcome.status, ResumeStatus::SessionExpired);
    assert_eq!(there.with(|s| s.stats().unacked), 1);
    assert_eq!(made.get(), 1);

    // Its own id resumes it as usual; a new session still replaces it.
    let (same, outcome, _) = b.start_session(now, "u", "s1", 0, || fresh("s4"));
    assert!(same.same(&there));
    assert_eq!(outcome.status, ResumeStatus::Resumed);
    let (new, outcome, _) = b.start_session(now, "u", "", 0, || fresh("s5"));
    assert_eq!(new.identity().session_id, "s5");
    assert_eq!(outcome.status, ResumeStatus::New);
}

/// Simulation seed 189 of session 9: a recovery whose patience ran out with
/// a live node silent (cut off from the claimant; it held the only copy of
/// two durable pushes) rebuilt the session from the copies it had and told
/// the client RECOVERED, which promises every durable push: two were lost
/// without a word. It now says SESSION_EXPIRED, and the pushes it found still
/// follow; a complete recovery says RECOVERED as before.
#[test]
fn a_recovery_that_missed_a_live_node_says_session_expired_with_what_it_found() {
    let now = Instant::now();
    let found = gatesvr_proto::peer::FetchReplicaResponse {
        found: true,
        session_id: "old".into(),
        zone: "001".into(),
        acked_seq_id: 1,
        next_seq_id: 4,
        pushes: [2, 3]
            .map(|seq| ServerPush {
                seq_id: seq,
                content: format!("p{seq}"),
                ..Default::default()
            })
            .to_vec(),
        ..Default::default()
    };
    let nothing = gatesvr_proto::peer::FetchReplicaResponse::default();
    for (incomplete, told) in [
        (false, ResumeStatus::Recovered),
        (true, ResumeStatus::SessionExpired),
    ] {
        let mut recovery =
            crate::replica::Recovery::merge("old", [nothing.clone(), found.clone()]).unwrap();
        recovery.incomplete = incomplete;
        let (state, _) = recovery.rebuild("u", "new".into(), 1);
        let mut t = table();
        let c = PlainCell::new(Session::import(state, now, SessionConfig::default()).unwrap());
        t.install(c.clone(), 4, Holding::Owned, None).unwrap();
        let (h, outcome, _) = t.start_session(now, "u", "old", 1, || cell("u", "x", now, 0));
        assert!(h.same(&c));
        assert_eq!(outcome.status, told);
        assert_eq!(outcome.first_available_seq_id, 1);
        assert_eq!(h.with(|s| s.stats().unacked), 2);
    }
    assert!(crate::replica::Recovery::merge("old", [nothing]).is_none());
}

#[test]
fn a_removed_recovered_session_leaves_nothing_behind() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "new", now, 4);
    t.install(
        c.clone(),
        4,
        Holding::Recovered {
            old_session_id: "old".into(),
        },
        None,
    )
    .unwrap();
    assert!(matches!(t.holding("u"), Some(Holding::Recovered { .. })));
    let cmds = t.remove(&c, "stopped");
    assert!(matches!(
        cmds.as_slice(),
        [Command::Removed {
            reason: "stopped",
            ..
        }]
    ));
    assert_eq!(t.slot_count(), 0);
    assert!(t.holding("u").is_none());
}

#[test]
fn a_detached_session_expires_from_the_next_deadline_not_a_sweep() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 1);
    t.start(c.clone(), Holding::Owned, "r");
    t.push(now, Target::Openid("u"), msg(1), None);
    let due = t.poll_timeout().expect("expiry armed");
    assert_eq!(due, now + SessionConfig::default().session_timeout);
    assert!(t.tick(due - Duration::from_millis(1)).is_empty());
    let cmds = t.tick(due);
    assert!(matches!(
        cmds.as_slice(),
        [Command::Removed {
            reason: "expired",
            lost: 1,
            ..
        }]
    ));
    assert_eq!(t.local_count(), 0);
}

#[test]
fn a_drain_stage_holds_pushes_until_settled_and_can_be_taken_back() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 2);
    t.start(c.clone(), Holding::Owned, "r");
    t.hand_over(
        now,
        "u",
        HandoverAsk::Drain {
            successor: "dp-2".into(),
        },
    )
    .unwrap()
    .unwrap();
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), None);
    assert!(matches!(o, PushOutcome::Wait));
    t.take_back(now, c.clone(), None);
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), None);
    assert_eq!(queued(&o), Some(1));
    t.hand_over(
        now,
        "u",
        HandoverAsk::Drain {
            successor: "dp-2".into(),
        },
    )
    .unwrap();
    t.staged("u", 3);
    let (o, _) = t.push(now, Target::Openid("u"), msg(2), None);
    assert!(matches!(o, PushOutcome::Forward { ref to } if to == "dp-2"));
}

#[test]
fn departed_nodes_are_never_live() {
    let t = table();
    let m = t.members();
    assert!(m.is_live("dp-2") && m.is_live("dp-3"));
    assert!(!m.is_live("dp-4") && !m.is_live("dp-5"));
    let ids = |v: Vec<&Member>| v.iter().map(|m| m.node_id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(m.fan_out()), ["dp-2", "dp-3"]);
    assert_eq!(ids(m.recovery_sources("dp-2")), ["dp-3"]);
    // Declared dead (not departed): asked briefly by a recovery, never waited on.
    assert_eq!(ids(m.recovery_maybe("dp-2")), ["dp-5"]);
    assert!(m.recovery_maybe("dp-5").is_empty());
    assert_eq!(ids(m.successors()), ["dp-2"]);
    assert_eq!(m.standby_for(Instant::now()).unwrap().node_id, "dp-2");
}

#[test]
fn the_standby_ring_starts_at_the_standby_and_wraps_over_active_nodes_only() {
    let t = table_of(
        "dp-3",
        &[
            ("dp-1", NodeState::Active),
            ("dp-2", NodeState::Active),
            ("dp-3", NodeState::Active),
            ("dp-4", NodeState::Draining),
            ("dp-5", NodeState::Active),
            ("dp-6", NodeState::Left),
        ],
    );
    let now = Instant::now();
    let m = t.members();
    let ring: Vec<String> = m
        .standby_ring(now)
        .iter()
        .map(|m| m.node_id.clone())
        .collect();
    assert_eq!(ring, ["dp-5", "dp-1", "dp-2"]);
    assert_eq!(m.standby_for(now).unwrap().node_id, ring[0]);
}

/// Simulation seed 17: the owner's standby was killed, and the owner 450 ms
/// later, before the control plane had declared the standby dead; pushes
/// acknowledged while both held them were lost. A standby a call finds
/// unreachable is passed over at once (the owner's sessions then go to the
/// next node), until the hold ends or the view drops it.
#[test]
fn a_standby_found_unreachable_is_passed_over_until_its_hold_ends() {
    let mut t = table_of(
        "dp-1",
        &[
            ("dp-1", NodeState::Active),
            ("dp-2", NodeState::Active),
            ("dp-3", NodeState::Active),
        ],
    );
    let now = Instant::now();
    let hold = now + Duration::from_secs(10);
    assert_eq!(t.members().standby_for(now).unwrap().node_id, "dp-2");
    assert_eq!(t.members().standby_of("dp-9", now).unwrap().node_id, "dp-2");
    t.members_mut()
        .mark_unreachable("dp-2", Reach::NoAnswer, hold);
    let m = t.members();
    assert_eq!(m.standby_for(now).unwrap().node_id, "dp-3");
    // A crashed owner's heir too (simulation seed 647 of session 9).
    assert_eq!(m.standby_of("dp-9", now).unwrap().node_id, "dp-3");
    assert_eq!(m.standby_ring(now).len(), 1);
    assert!(
        m.is_live("dp-2"),
        "unreachable is not dead: only the lease says that"
    );
    assert_eq!(m.standby_for(hold).unwrap().node_id, "dp-2");
    // Every other node unreachable: no standby, durable pushes are refused.
    t.members_mut().mark_unreachable("dp-3", Reach::Down, hold);
    assert!(t.members().standby_for(now).is_none());
}

/// One memory of unreachable peers (the Handover path kept a second one, by
/// address, before session 9): both kinds pass a node over as standby; only
/// "nothing listens" stops a Handover; a later silence does not weaken it;
/// an answer clears it.
#[test]
fn a_peer_found_down_or_silent_is_remembered_in_one_place() {
    let mut t = table();
    let now = Instant::now();
    let (short, long) = (now + Duration::from_secs(5), now + Duration::from_secs(10));
    let m = t.members_mut();
    m.mark_unreachable("dp-2", Reach::NoAnswer, long);
    assert!(m.is_unreachable("dp-2", now));
    assert!(!m.is_down("dp-2", now), "silent is not down: it may serve");
    m.mark_unreachable("dp-2", Reach::Down, short);
    assert!(m.is_down("dp-2", now));
    m.mark_unreachable("dp-2", Reach::NoAnswer, long);
    assert!(m.is_down("dp-2", now), "a later silence keeps it down");
    assert!(m.is_down("dp-2", short) && !m.is_down("dp-2", long));
    m.mark_unreachable("dp-2", Reach::Answered, long);
    assert!(!m.is_unreachable("dp-2", now));
    // A node the view does not hold is not remembered.
    m.mark_unreachable("dp-9", Reach::Down, long);
    assert!(!m.is_down("dp-9", now));
}

#[test]
fn a_silent_live_owner_is_not_taken_for_gone() {
    let t = table();
    let m = t.members();
    assert_eq!(
        m.after_failed_handover("dp-2", Reach::NoAnswer),
        AfterHandover::OwnerSilent
    );
    // Declared dead but silent, not refused: maybe only cut off from the
    // control plane, so the recovery asks it too.
    assert_eq!(
        m.after_failed_handover("dp-4", Reach::NoAnswer),
        AfterHandover::OwnerDeclaredDead
    );
    assert_eq!(
        m.after_failed_handover("dp-2", Reach::Down),
        AfterHandover::OwnerGone
    );
    assert_eq!(
        m.after_failed_handover("dp-2", Reach::Answered),
        AfterHandover::UseAnswer
    );
}

#[test]
fn a_duplicated_install_of_the_same_copy_keeps_the_pushes_queued_since() {
    let now = Instant::now();
    let mut t = table();
    let staged = || Holding::Staged {
        from: "dp-2".into(),
    };
    let first = cell("u", "s", now, 0);
    t.install(first.clone(), 4, staged(), None).unwrap();
    // Queued since (a claim at the staged epoch settled it here).
    t.claimed(now, &first, 4, Some(("dp-1", 4)));
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), Some(("dp-1", 4)));
    assert_eq!(queued(&o), Some(1));
    let again = t.install(cell("u", "s", now, 0), 4, staged(), None);
    assert_eq!(again.unwrap_err(), InstallError::AlreadyHere { epoch: 4 });
    assert_eq!(t.local("u").unwrap().with(|s| s.stats().unacked), 1);
    // A handover answer at the claim's epoch replaces it (the owner's state).
    t.install(cell("u", "s", now, 0), 4, Holding::Owned, None)
        .unwrap();
    assert_eq!(t.local("u").unwrap().with(|s| s.stats().unacked), 0);
}

#[test]
fn a_staged_copy_sends_upstream_pushes_to_the_views_owner_and_holds_forwarded_ones_until_it_is_named()
 {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 0);
    t.install(
        c.clone(),
        5,
        Holding::Staged {
            from: "dp-2".into(),
        },
        Some(("dp-2", 5)),
    )
    .unwrap();
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), Some(("dp-2", 5)));
    assert!(
        matches!(o, PushOutcome::Forward { ref to } if to == "dp-2"),
        "{o:?}"
    );
    // Forwarded by the drainer (no view compare): waits for the view.
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), None);
    assert!(matches!(o, PushOutcome::Wait), "{o:?}");
    // The transfer names this node: it serves.
    t.owner_changed(now, "u", "dp-1", 6);
    assert_eq!(t.holding("u"), Some(&Holding::Owned));
    let (o, _) = t.push(now, Target::Openid("u"), msg(2), Some(("dp-1", 6)));
    assert_eq!(queued(&o), Some(1));
}

#[test]
fn a_copy_taken_back_after_the_view_moved_on_is_fenced() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 2);
    t.start(c.clone(), Holding::Owned, "r");
    t.hand_over(
        now,
        "u",
        HandoverAsk::Drain {
            successor: "dp-2".into(),
        },
    )
    .unwrap();
    let cmds = t.take_back(now, c.clone(), Some(("dp-3", 9)));
    assert_eq!(t.slot("u").unwrap().name(), "fenced");
    assert!(cmds.iter().any(|c| matches!(c, Command::Close { .. })));
}

#[test]
fn a_claim_during_a_drains_staging_gets_the_session() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 2);
    t.start(c.clone(), Holding::Owned, "r");
    t.push(now, Target::Openid("u"), msg(1), None);
    t.hand_over(
        now,
        "u",
        HandoverAsk::Drain {
            successor: "dp-2".into(),
        },
    )
    .unwrap();
    let (state, handle) = t
        .hand_over(
            now,
            "u",
            HandoverAsk::Peer {
                epoch: 3,
                new_owner: "dp-3".into(),
            },
        )
        .unwrap()
        .expect("the staging session is handed over");
    assert_eq!(state.pushes.len(), 1);
    assert!(handle.is_some());
    // The staging then fails: nothing is taken back (it left for dp-3).
    t.take_back(now, c, None);
    assert_eq!(t.slot("u").unwrap().name(), "moved");
}

/// Soak seed 8: a staged copy took pushes forwarded to it while its drainer,
/// whose staging had timed out, took the session back and served it: two
/// diverging copies, and pushes acknowledged on the staged one were lost.
#[test]
fn a_staged_copy_takes_no_push_until_the_view_names_its_node() {
    let now = Instant::now();
    let mut t = table();
    staged_copy(&mut t, now, 5, 5);
    // Forwarded (no view passed): waits.
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), None);
    assert!(matches!(o, PushOutcome::Wait), "{o:?}");
    // From an upstream while the view names the drainer: forwarded there.
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), Some(("dp-2", 5)));
    assert!(
        matches!(o, PushOutcome::Forward { ref to } if to == "dp-2"),
        "{o:?}"
    );
    // The transfer commits: the view names this node at a newer epoch.
    t.owner_changed(now, "u", "dp-1", 6);
    assert_eq!(t.holding("u"), Some(&Holding::Owned));
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), None);
    assert_eq!(queued(&o), Some(1));
}

/// Simulation seed 475 of session 9: this node owned the session at 5 and
/// staged it away (a drain); a draining node staged a copy exported at 7 back
/// here, and the view, late, still named this node at 5 (seed 596: at 7, the
/// epoch it had staged the session away at, with a transfer whose commit it
/// never heard of). That record is this
/// node's old ownership, not a commitment of the copy: it took durable pushes
/// while the control plane had moved the session to a third node, and they
/// were lost.
#[test]
fn a_staged_copy_newer_than_the_views_record_of_this_node_takes_no_push() {
    let now = Instant::now();
    let mut t = table();
    let c = staged_copy(&mut t, now, 0, 7);
    for named_at in [5, 7] {
        let (o, _) = t.push(now, Target::Openid("u"), msg(1), Some(("dp-1", named_at)));
        assert!(matches!(o, PushOutcome::Wait), "{o:?}");
    }
    assert_eq!(c.with(|s| s.stats().unacked), 0);
    // Named at a later epoch (a transfer or a claim of the copy): it serves.
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), Some(("dp-1", 8)));
    assert_eq!(queued(&o), Some(1));
}

/// Simulation seed 979 of session 9: a draining node held a stale staged
/// copy when a client's Start claimed the session there; the drain staged
/// the copy away (which dropped the claim's hold on pushes), the staging
/// failed, and the copy taken back served a durable push that the Start's
/// Handover then replaced with the owner's state. A session being claimed
/// here is not staged by a drain.
#[test]
fn a_drain_does_not_stage_a_session_a_start_is_claiming_here() {
    let now = Instant::now();
    let mut t = table();
    let c = staged_copy(&mut t, now, 5, 5);
    t.claim_begins("u");
    let drain = HandoverAsk::Drain {
        successor: "dp-2".into(),
    };
    assert!(matches!(t.hand_over(now, "u", drain.clone()), Ok(None)));
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), Some(("dp-1", 9)));
    assert!(matches!(o, PushOutcome::Wait), "{o:?}");
    // Once the Start settled it, the drain stages it.
    t.claimed(now, &c, 9, Some(("dp-1", 9)));
    assert!(matches!(t.hand_over(now, "u", drain), Ok(Some(_))));
}

/// A client's claim on the node holding a staged copy settles it there.
#[test]
fn a_claim_on_the_staged_node_owns_the_staged_copy() {
    let now = Instant::now();
    let mut t = table();
    let c = staged_copy(&mut t, now, 5, 5);
    t.claimed(now, &c, 7, Some(("dp-1", 7)));
    assert_eq!(t.holding("u"), Some(&Holding::Owned));
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), None);
    assert_eq!(queued(&o), Some(1));
}

/// Soak seed 8: a staged copy this node re-staged (it drains too) and took
/// back after a timeout is staged again, not owned: it would otherwise be a
/// second serving copy at the owner's epoch.
#[test]
fn a_failed_restaging_takes_a_staged_copy_back_as_staged() {
    let now = Instant::now();
    let mut t = table();
    let c = staged_copy(&mut t, now, 5, 5);
    t.hand_over(
        now,
        "u",
        HandoverAsk::Drain {
            successor: "dp-3".into(),
        },
    )
    .unwrap()
    .expect("staged out");
    t.take_back(now, c, Some(("dp-2", 5)));
    assert_eq!(
        t.holding("u"),
        Some(&Holding::Staged {
            from: "dp-2".into()
        })
    );
}

/// Soak seed 8: a transfer retried at the end of a drain commits only while
/// the session is still where the drain put it.
#[test]
fn a_retried_transfer_is_pending_only_while_the_session_is_still_there() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 5);
    t.start(c.clone(), Holding::Owned, "r");
    t.hand_over(
        now,
        "u",
        HandoverAsk::Drain {
            successor: "dp-2".into(),
        },
    )
    .unwrap();
    t.staged("u", 5);
    assert!(t.transfer_pending("u", "dp-2", 5));
    // dp-2 drains too and stages it back here.
    let back = cell("u", "s", now, 5);
    t.install(
        back,
        5,
        Holding::Staged {
            from: "dp-2".into(),
        },
        None,
    )
    .unwrap();
    assert!(!t.transfer_pending("u", "dp-2", 5));
}

/// Soak seed 2: a drain's staged copy whose transfer never committed holds
/// pushes the drainer forwarded; the node that recovers the session after the
/// drainer left gets them, and the copy stops taking pushes.
#[test]
fn a_staged_copy_is_part_of_a_recovery_and_then_fenced() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 5);
    t.install(
        c.clone(),
        5,
        Holding::Staged {
            from: "dp-4".into(),
        },
        None,
    )
    .unwrap();
    // Queued while the view named this node once (then the view moved back).
    t.owner_changed(now, "u", "dp-1", 5);
    c.with(|s| s.push(now, msg(1))).unwrap();
    let (copy, cmds) = t.copy_for_recovery(now, "u", "s");
    let copy = copy.expect("the staged copy is offered");
    assert_eq!(copy.pushes.len(), 1);
    assert!(cmds.iter().any(|c| matches!(c, Command::Removed { .. })));
    assert_eq!(t.slot("u").unwrap().name(), "fenced");
    let answer = recovery::with_copy(Default::default(), Some(&copy));
    assert!(answer.found);
    assert_eq!(answer.pushes.len(), 1);
    // Another session id: nothing.
    assert!(t.copy_for_recovery(now, "u", "other").0.is_none());
}

/// Soak seed 0 (after the fixes above): a client claimed on the node holding
/// a stale staged copy; the view named that node (its own claim) and the copy
/// took pushes before the previous owner's Handover answer replaced it.
#[test]
fn a_staged_copy_being_claimed_waits_for_the_handover() {
    let now = Instant::now();
    let mut t = table();
    staged_copy(&mut t, now, 5, 5);
    t.begin_incoming(now, "u");
    t.owner_changed(now, "u", "dp-1", 9);
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), Some(("dp-1", 9)));
    assert!(matches!(o, PushOutcome::Wait), "{o:?}");
    // The previous owner's state arrives: it serves.
    let answer = cell("u", "s", now, 0);
    t.install(answer, 9, Holding::Owned, Some(("dp-1", 9)))
        .unwrap();
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), Some(("dp-1", 9)));
    assert_eq!(queued(&o), Some(1));
}

/// Soak seed 9: a drainer took the session back, served it, and staged it
/// again; the second Stage (same session, same epoch, more pushes) is not a
/// duplicate of the first copy that arrived late.
#[test]
fn a_newer_stage_of_the_same_session_replaces_the_older_copy() {
    let now = Instant::now();
    let mut t = table();
    let staged = || Holding::Staged {
        from: "dp-2".into(),
    };
    t.install(cell("u", "s", now, 4), 4, staged(), None)
        .unwrap();
    let newer = cell("u", "s", now, 4);
    newer.with(|s| s.push(now, msg(1))).unwrap();
    t.install(newer, 4, staged(), None)
        .expect("a newer export replaces the older copy");
    assert_eq!(t.local("u").unwrap().with(|s| s.stats().unacked), 1);
}

// ----- lease-based fencing of durable pushes -----

#[test]
fn a_durable_push_is_acknowledged_only_while_the_lease_surely_holds() {
    let t0 = Instant::now();
    let ttl = Duration::from_secs(3);
    let margin = Lease::margin_for(ttl);
    let mut lease = Lease::default();
    assert_eq!(lease.check(t0), Err(LeaseError::NotHeld));
    // The heartbeat was sent at t0 and answered a second later: the lease is
    // measured from the send (the control plane's starts later, not earlier).
    lease.renewed(t0, ttl);
    assert_eq!(lease.check(t0 + Duration::from_secs(1)), Ok(()));
    assert_eq!(
        lease.check(t0 + ttl - margin - Duration::from_millis(1)),
        Ok(())
    );
    assert_eq!(lease.check(t0 + ttl - margin), Err(LeaseError::Lapsed));
    // A later renewal extends it; an older one (answered late) never shortens it.
    lease.renewed(t0 + Duration::from_secs(1), ttl);
    lease.renewed(t0, ttl);
    assert_eq!(lease.check(t0 + ttl - margin), Ok(()));
    assert_eq!(
        lease.check(t0 + Duration::from_secs(1) + ttl - margin),
        Err(LeaseError::Lapsed)
    );
}

#[test]
fn a_node_declared_dead_holds_no_lease_until_its_view_went_past_its_new_registration() {
    let t0 = Instant::now();
    let ttl = Duration::from_secs(3);
    let mut lease = Lease::default();
    lease.renewed(t0, ttl);
    // A heartbeat refused: declared dead. The view still shows this node live.
    let t1 = t0 + Duration::from_secs(5);
    lease.lost(true);
    // Registered again: its view may still lack the claims made while it was
    // dead (a client recovered one of its sessions from replicas).
    lease.renewed(t1, ttl);
    assert_eq!(lease.check(t1), Err(LeaseError::Rejoining));
    // A delta of another node's record, or an old record of this node still
    // showing it live: not past the re-registration.
    lease.view_changed(t1, true, false);
    assert_eq!(lease.check(t1), Err(LeaseError::Rejoining));
    // Deltas in commit order: this node dead, then live again.
    lease.view_changed(t1, false, false);
    assert_eq!(lease.check(t1), Err(LeaseError::Rejoining));
    lease.view_changed(t1, true, false);
    assert_eq!(lease.check(t1), Ok(()));

    // Or a whole view that arrived after the new registration was sent.
    let mut lease = Lease::default();
    lease.renewed(t0, ttl);
    lease.lost(true);
    lease.view_changed(t0, true, true);
    assert_eq!(
        lease.check(t0),
        Err(LeaseError::Rejoining),
        "no registration yet"
    );
    lease.renewed(t1, ttl);
    lease.view_changed(t1, true, true);
    assert_eq!(lease.check(t1), Ok(()));
}

/// Simulation seed 186: a drain staged a session on dp-2 and its transfer
/// did not commit (a client claimed the session on dp-3 meanwhile). dp-3's
/// Handover must get the staged state (with the pushes queued since an
/// earlier, failed staging), not "not here": dp-3 would resume from an older
/// staged copy of its own and lose the durable pushes acknowledged since.
#[test]
fn a_claimant_gets_the_state_of_a_staging_whose_transfer_did_not_commit() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 2);
    t.start(c.clone(), Holding::Owned, "r");
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), None);
    assert_eq!(queued(&o), Some(1));
    t.hand_over(
        now,
        "u",
        HandoverAsk::Drain {
            successor: "dp-2".into(),
        },
    )
    .unwrap()
    .unwrap();
    // The transfer did not commit: the epoch stays where it was.
    t.staged("u", 2);
    // The view names the claimant first, then its Handover arrives.
    t.owner_changed(now, "u", "dp-3", 9);
    let (state, handle) = t
        .hand_over(
            now,
            "u",
            HandoverAsk::Peer {
                epoch: 9,
                new_owner: "dp-3".into(),
            },
        )
        .unwrap()
        .expect("the staged state goes to the claimant");
    assert!(handle.is_none());
    assert_eq!(state.pushes.len(), 1);
    // Given once only.
    let again = t.hand_over(
        now,
        "u",
        HandoverAsk::Peer {
            epoch: 10,
            new_owner: "dp-2".into(),
        },
    );
    assert!(matches!(again, Ok(None)), "{again:?}");

    // A transfer that committed leaves nothing here: the successor's copy
    // is the session.
    let mut t = table();
    let c = cell("v", "s2", now, 2);
    t.start(c, Holding::Owned, "r");
    t.hand_over(
        now,
        "v",
        HandoverAsk::Drain {
            successor: "dp-2".into(),
        },
    )
    .unwrap()
    .unwrap();
    t.staged("v", 3);
    let r = t.hand_over(
        now,
        "v",
        HandoverAsk::Peer {
            epoch: 4,
            new_owner: "dp-3".into(),
        },
    );
    assert!(matches!(r, Ok(None)), "{r:?}");
}

/// Simulation seed 43: dp-1 re-staged a copy staged on it; meanwhile its
/// drainer's transfer committed, so the view names dp-1 at epoch 9. An older
/// copy staged at epoch 2 by another draining node must not replace what
/// dp-1 holds (it carried none of the pushes acknowledged since).
#[test]
fn a_stage_older_than_the_epoch_the_view_gives_this_node_is_refused() {
    let now = Instant::now();
    let mut t = table();
    let r = t.install(
        cell("u", "s", now, 2),
        2,
        Holding::Staged {
            from: "dp-2".into(),
        },
        Some(("dp-1", 9)),
    );
    assert!(
        matches!(
            r,
            Err(InstallError::Stale {
                held: 9,
                offered: 2
            })
        ),
        "{r:?}"
    );
    // A handover answer at our claim's epoch is installed as before.
    let r = t.install(cell("u", "s", now, 9), 9, Holding::Owned, Some(("dp-1", 9)));
    assert!(r.is_ok(), "{r:?}");
}

/// The shell's order: the claim answers (the view names this node), then a
/// push and a watch delta land before `begin_incoming`. A staged copy here
/// is marked before the claim is sent, so neither serves it.
#[test]
fn a_staged_copy_being_claimed_serves_nothing_before_begin_incoming() {
    let now = Instant::now();
    let mut t = table();
    let staged = cell("u", "s", now, 2);
    t.install(
        staged,
        2,
        Holding::Staged {
            from: "dp-2".into(),
        },
        None,
    )
    .unwrap();
    t.claim_begins("u");
    // The claim answered at epoch 5 (previous owner dp-2): the view names us.
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), Some(("dp-1", 5)));
    assert!(matches!(o, PushOutcome::Wait), "{o:?}");
    t.owner_changed(now, "u", "dp-1", 5);
    assert_eq!(
        t.holding("u"),
        Some(&Holding::Staged {
            from: "dp-2".into()
        })
    );
    t.begin_incoming(now, "u");
    let (o, _) = t.push(now, Target::Openid("u"), msg(2), Some(("dp-1", 5)));
    assert!(matches!(o, PushOutcome::Wait), "{o:?}");
    // The Handover answer settles it: the owner's state is installed.
    t.install(cell("u", "s", now, 5), 5, Holding::Owned, Some(("dp-1", 5)))
        .unwrap();
    t.end_incoming("u");
    let (o, _) = t.push(now, Target::Openid("u"), msg(3), Some(("dp-1", 5)));
    assert_eq!(queued(&o), Some(1));
}

/// Simulation seed 112: a control-plane outage left every drain's transfer
/// uncommitted. dp-1 staged its session on dp-2, the staging failed and dp-1
/// took it back and queued more; it staged it again (on dp-3, transfer not
/// committed: the slot keeps that state for a claimant). dp-2, draining in
/// turn, re-staged its older copy back to dp-1 at the same epoch: it replaced
/// the slot, and the claimant's Handover got the older copy without the
/// pushes acknowledged since. Copies of one session at one epoch are ordered
/// by how far they got; an older one is refused.
#[test]
fn an_older_staged_copy_at_the_same_epoch_does_not_replace_a_newer_export() {
    let now = Instant::now();
    let mut t = table();
    let c = cell("u", "s", now, 2);
    t.start(c.clone(), Holding::Owned, "r");
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), None);
    assert_eq!(queued(&o), Some(1));
    // First staging on dp-2: the state reaches dp-2, the answer does not.
    let (older, _) = t
        .hand_over(
            now,
            "u",
            HandoverAsk::Drain {
                successor: "dp-2".into(),
            },
        )
        .unwrap()
        .unwrap();
    t.take_back(now, c.clone(), None);
    for n in 2..=3 {
        let (o, _) = t.push(now, Target::Openid("u"), msg(n), None);
        assert_eq!(queued(&o), Some(n));
    }
    // Second staging (dp-3 held it), transfer not committed.
    let (newer, _) = t
        .hand_over(
            now,
            "u",
            HandoverAsk::Drain {
                successor: "dp-3".into(),
            },
        )
        .unwrap()
        .unwrap();
    assert_eq!(newer.pushes.len(), 3);
    t.staged("u", 2);
    // dp-2 re-stages the older copy here at the same epoch.
    let stale = Session::import(older, now, SessionConfig::default()).unwrap();
    let r = t.install(
        PlainCell::new(stale),
        2,
        Holding::Staged {
            from: "dp-2".into(),
        },
        Some(("dp-1", 2)),
    );
    assert!(matches!(r, Err(InstallError::Stale { .. })), "{r:?}");
    // The claimant gets the newer state, with all three pushes.
    let (state, _) = t
        .hand_over(
            now,
            "u",
            HandoverAsk::Peer {
                epoch: 9,
                new_owner: "dp-3".into(),
            },
        )
        .unwrap()
        .expect("the state staged last goes to the claimant");
    assert_eq!(state.pushes.len(), 3);

    // The same during the staging (not settled yet): refused too.
    let mut t = table();
    let c = cell("v", "s2", now, 2);
    t.start(c.clone(), Holding::Owned, "r");
    let (older, _) = t
        .hand_over(
            now,
            "v",
            HandoverAsk::Drain {
                successor: "dp-2".into(),
            },
        )
        .unwrap()
        .unwrap();
    t.take_back(now, c.clone(), None);
    t.push(now, Target::Openid("v"), msg(1), None);
    t.hand_over(
        now,
        "v",
        HandoverAsk::Drain {
            successor: "dp-3".into(),
        },
    )
    .unwrap()
    .unwrap();
    let stale = Session::import(older, now, SessionConfig::default()).unwrap();
    let r = t.install(
        PlainCell::new(stale),
        2,
        Holding::Staged {
            from: "dp-2".into(),
        },
        Some(("dp-1", 2)),
    );
    assert!(matches!(r, Err(InstallError::Stale { .. })), "{r:?}");
}

/// Simulation seed 369: a claimant's Handover answer arrived after its
/// deadline; its retry found the session exported and was answered "no
/// copy", and the old owner, which held the last copy of its durable pushes,
/// crashed before the claimant's recovery asked it. A retry by the same
/// claimant at the same epoch now gets the state again, for
/// `handover_copy_ttl`; nobody else gets it.
#[test]
fn a_handover_retried_by_its_claimant_gets_the_same_state_again() {
    let now = Instant::now();
    let cfg = TableConfig::default();
    let mut t = table();
    t.start(cell("u", "s", now, 3), Holding::Owned, "r");
    let (o, _) = t.push(now, Target::Openid("u"), msg(1), None);
    assert_eq!(queued(&o), Some(1));
    let ask = |epoch, who: &str| HandoverAsk::Peer {
        epoch,
        new_owner: who.into(),
    };
    let (first, handle) = t.hand_over(now, "u", ask(4, "dp-2")).unwrap().unwrap();
    assert!(handle.is_some());
    // Another node, or the claimant at another epoch, gets nothing.
    let other = t.hand_over(now, "u", ask(5, "dp-3"));
    assert!(matches!(other, Ok(None)), "{other:?}");
    let other = t.hand_over(now, "u", ask(5, "dp-2"));
    assert!(matches!(other, Ok(None)), "{other:?}");
    // The retry gets the same state (its connection was closed the first time).
    let later = now + Duration::from_secs(3);
    let (again, handle) = t
        .hand_over(later, "u", ask(4, "dp-2"))
        .unwrap()
        .expect("a retry by the claimant gets the state again");
    assert!(handle.is_none());
    assert_eq!(again, first);
    assert_eq!(again.pushes.len(), 1);
    // Pushes still follow the session to its claimant.
    let (o, _) = t.push(later, Target::Openid("u"), msg(2), None);
    assert!(
        matches!(o, PushOutcome::Forward { ref to } if to == "dp-2"),
        "{o:?}"
    );
    // The state is dropped after `handover_copy_ttl`; the forwarding
    // address stays until `moved_ttl`.
    let expiry = later + cfg.handover_copy_ttl;
    assert_eq!(t.poll_timeout(), Some(expiry));
    t.tick(expiry);
    let gone = t.hand_over(expiry, "u", ask(4, "dp-2"));
    assert!(matches!(gone, Ok(None)), "{gone:?}");
    assert_eq!(t.slot("u").map(|s| s.name()), Some("moved"));
    assert_eq!(t.poll_timeout(), Some(later + cfg.moved_ttl));
}

/// Simulation seed 154: a copy fenced for a claimant that then restarted
/// empty and left was the last copy of its durable pushes, on one node; seed
/// 833 of session 9: the same with a claimant that restarted with its node
/// id, so it stayed live in the view. Every fenced copy with pushes is listed
/// for the shell to keep as a replica (and copy again once its owner is
/// gone); one without pushes has nothing to keep.
#[test]
fn fenced_copies_with_pushes_are_listed_to_be_kept_as_replicas() {
    let now = Instant::now();
    let mut t = table();
    for (openid, owner) in [("a", "dp-2"), ("b", "dp-4"), ("c", "dp-5")] {
        let sid = format!("s{openid}");
        t.start(cell(openid, &sid, now, 1), Holding::Owned, "r");
        let (o, _) = t.push(now, Target::Openid(openid), msg(1), None);
        assert_eq!(queued(&o), Some(1));
        t.owner_changed(now, openid, owner, 2);
    }
    // No push: nothing to keep.
    t.start(cell("d", "sd", now, 1), Holding::Owned, "r");
    t.owner_changed(now, "d", "dp-5", 2);
    assert_eq!(t.fenced_states().len(), 4);
    let gone: Vec<(String, String, usize)> = t
        .fenced_with_pushes()
        .into_iter()
        .map(|(s, owner)| (s.openid, owner, s.pushes.len()))
        .collect();
    assert_eq!(
        gone,
        vec![
            ("a".to_string(), "dp-2".to_string(), 1),
            ("b".to_string(), "dp-4".to_string(), 1),
            ("c".to_string(), "dp-5".to_string(), 1)
        ]
    );
}

/// `push_many` is `push` once per message: the same outcomes (queued seqs,
/// then the refusals of a full queue), the same session state and the same
/// timer; a target that is not local takes one outcome for the run.
#[test]
fn push_many_is_one_push_after_another() {
    let now = Instant::now();
    // Session "s" of "u" with a queue of 5, started on `t`.
    let local = |t: &mut Table<PlainCell>, queue_policy| {
        let config = SessionConfig {
            max_queue: 5,
            queue_policy,
            ..SessionConfig::default()
        };
        let id = SessionIdentity {
            session_id: "s".into(),
            openid: "u".into(),
            zone: "001".into(),
        };
        let c = PlainCell::new(Session::new(id, config, now));
        t.start(c.clone(), Holding::Owned, "replaced");
        c
    };
    let (mut one, mut many) = (table(), table());
    let reject = crate::session::QueuePolicy::Reject;
    let (c1, c2) = (local(&mut one, reject), local(&mut many, reject));
    // One already queued, so the run starts behind an unsent push.
    one.push(now, Target::Openid("u"), msg(0), None);
    many.push(now, Target::Openid("u"), msg(0), None);
    let later = now + Duration::from_millis(5);
    let singles: Vec<_> = (1..=7)
        .map(|n| one.push(later, Target::Openid("u"), msg(n), None).0)
        .collect();
    let mut outcomes = Vec::new();
    let bodies = (1..=7).map(|n| crate::session::PushBody::from(msg(n)));
    many.push_many(later, Target::Openid("u"), bodies, None, &mut outcomes);
    let summary = |o: &PushOutcome<PlainCell>| match o {
        PushOutcome::Queued { seq_id, .. } => format!("queued {seq_id}"),
        PushOutcome::Refused { error, .. } => format!("refused {error}"),
        other => format!("{other:?}"),
    };
    let want: Vec<_> = singles.iter().map(summary).collect();
    let got: Vec<_> = outcomes.iter().map(summary).collect();
    assert_eq!(got, want);
    assert!(
        want[0].starts_with("queued") && want[6].starts_with("refused"),
        "{want:?}"
    );
    assert_eq!(c1.with(|s| s.stats()), c2.with(|s| s.stats()));
    assert_eq!(one.poll_timeout(), many.poll_timeout());

    // A full queue that drops its oldest: each push trims a sent one, and
    // the retransmit deadline moves with every trim of the run.
    let (mut one, mut many) = (table(), table());
    let mut cells = Vec::new();
    for t in [&mut one, &mut many] {
        let c = local(t, crate::session::QueuePolicy::DropOldest);
        c.with(|s| s.attach(now, 0));
        for n in 0..5 {
            t.push(now, Target::Openid("u"), msg(n), None);
            let sent_at = now + Duration::from_millis(n);
            assert!(c.with(|s| s.poll_transmit(sent_at)).is_some());
        }
        cells.push(c);
    }
    let before = many.poll_timeout();
    for n in 5..8 {
        one.push(later, Target::Openid("u"), msg(n), None);
    }
    let mut outcomes = Vec::new();
    let bodies = (5..8).map(|n| crate::session::PushBody::from(msg(n)));
    many.push_many(later, Target::Openid("u"), bodies, None, &mut outcomes);
    assert_eq!(
        outcomes.iter().filter_map(queued).collect::<Vec<_>>(),
        [6, 7, 8]
    );
    assert_eq!(cells[0].with(|s| s.stats()), cells[1].with(|s| s.stats()));
    assert_ne!(many.poll_timeout(), before, "the trims moved the deadline");
    assert_eq!(one.poll_timeout(), many.poll_timeout());

    // Not local: one outcome for the whole run.
    let mut outcomes = Vec::new();
    let bodies = (1..=3).map(|n| crate::session::PushBody::from(msg(n)));
    many.push_many(now, Target::Openid("nobody"), bodies, None, &mut outcomes);
    assert_eq!(outcomes.len(), 1);
    assert!(matches!(outcomes[0], PushOutcome::Absent));
}
