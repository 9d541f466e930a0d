use super::*;

fn apply(st: &mut State, now: i64, cmd: Cmd) -> (CmdResult, Vec<Touched>) {
    let mut touched = Vec::new();
    let r = st.apply(now, &cmd, &mut touched);
    (r, touched)
}

fn register(st: &mut State, now: i64, node: &str) {
    let (r, _) = apply(
        st,
        now,
        Cmd::RegisterNode {
            node_id: node.into(),
            quic_addr: "127.0.0.1:1".into(),
            grpc_addr: "127.0.0.1:2".into(),
            lease_ttl_ms: 1000,
        },
    );
    assert!(matches!(r, CmdResult::Lease { .. }), "{r:?}");
}

fn claim(node: &str, openid: &str, session: &str) -> Cmd {
    Cmd::Claim {
        node_id: node.into(),
        openid: openid.into(),
        session_id: session.into(),
        fresh_session_id: String::new(),
    }
}

fn owned_epoch(r: &CmdResult) -> u64 {
    match r {
        CmdResult::Owned { owner, .. } => owner.epoch,
        other => panic!("expected Owned, got {other:?}"),
    }
}

fn claim_fresh(node: &str, openid: &str, session: &str, fresh: &str) -> Cmd {
    Cmd::Claim {
        node_id: node.into(),
        openid: openid.into(),
        session_id: session.into(),
        fresh_session_id: fresh.into(),
    }
}

fn found_by_session(st: &State, session_id: &str) -> Vec<String> {
    st.lookup_owners(&[], &[session_id.to_string()])
        .into_iter()
        .map(|(openid, _)| openid.to_string())
        .collect()
}

/// A Start resuming a session records the id of the fresh session it makes if the resume
/// fails beside the resumed one (so it claims once): a lookup by either id finds the
/// record; a retried claim keeps the epoch and the fresh id recorded first; a transfer
/// keeps it; a claim by another node replaces both; a fresh id equal to the claimed one
/// is not recorded. The encoding stays the old one when there is none.
#[test]
fn a_claim_records_the_fresh_session_id_beside_the_resumed_one() {
    let mut st = State::default();
    register(&mut st, 0, "a");
    register(&mut st, 0, "b");
    let e1 = owned_epoch(&apply(&mut st, 1, claim_fresh("a", "alice", "old", "new1")).0);
    assert_eq!(st.owners["alice"].fresh_session_id, "new1");
    assert_eq!(found_by_session(&st, "old"), ["alice"]);
    assert_eq!(found_by_session(&st, "new1"), ["alice"]);
    assert!(found_by_session(&st, "new2").is_empty());

    let (r, _) = apply(&mut st, 2, claim_fresh("a", "alice", "old", "new2"));
    match &r {
        CmdResult::Owned { owner, .. } => {
            assert_eq!((owner.epoch, owner.fresh_session_id.as_str()), (e1, "new1"));
        }
        other => panic!("expected Owned, got {other:?}"),
    }
    assert!(found_by_session(&st, "new2").is_empty());

    let (r, _) = apply(
        &mut st,
        3,
        Cmd::Transfer {
            openid: "alice".into(),
            expected_epoch: e1,
            to_node: "b".into(),
        },
    );
    let e2 = owned_epoch(&r);
    assert!(e2 > e1);
    assert_eq!(st.owners["alice"].owner_node, "b");
    assert_eq!(
        found_by_session(&st, "new1"),
        ["alice"],
        "kept by a transfer"
    );

    let (r, _) = apply(&mut st, 4, claim_fresh("a", "alice", "new1", ""));
    assert!(owned_epoch(&r) > e2);
    assert!(found_by_session(&st, "old").is_empty());
    assert_eq!(found_by_session(&st, "new1"), ["alice"]);
    assert_eq!(st.owners["alice"].fresh_session_id, "");

    apply(&mut st, 5, claim_fresh("b", "alice", "s9", "s9"));
    assert_eq!(st.owners["alice"].fresh_session_id, "", "not a second id");

    let json = r#"{"cmd":"claim","node_id":"n1","openid":"alice","session_id":"s1","fresh_session_id":"s2"}"#;
    let cmd = claim_fresh("n1", "alice", "s1", "s2");
    assert_eq!(serde_json::from_str::<Cmd>(json).unwrap(), cmd);
    assert_eq!(serde_json::to_string(&cmd).unwrap(), json);
    let rec = r#"{"session_id":"s","owner_node":"dp-1","epoch":2,"changed_at_ms":7}"#;
    let decoded: OwnerRec = serde_json::from_str(rec).unwrap();
    assert_eq!(decoded.fresh_session_id, "");
    assert_eq!(serde_json::to_string(&decoded).unwrap(), rec);
}

#[test]
fn epochs_increase_on_every_owner_change_and_retries_are_idempotent() {
    let mut st = State::default();
    register(&mut st, 0, "a");
    register(&mut st, 0, "b");
    let e1 = owned_epoch(&apply(&mut st, 1, claim("a", "alice", "s1")).0);
    let again = owned_epoch(&apply(&mut st, 2, claim("a", "alice", "s1")).0);
    assert_eq!(e1, again, "a retried claim keeps its epoch");
    let (r, _) = apply(&mut st, 3, claim("b", "alice", "s2"));
    let e2 = owned_epoch(&r);
    assert!(e2 > e1);
    assert!(
        matches!(r, CmdResult::Owned { previous_owner: Some(ref p), previous_epoch, .. } if p == "a" && previous_epoch == e1)
    );
    // The old owner acting on its old epoch is fenced.
    let (r, _) = apply(
        &mut st,
        4,
        Cmd::Release {
            node_id: "a".into(),
            openid: "alice".into(),
            epoch: e1,
        },
    );
    assert_eq!(r, CmdResult::Released { released: false });
    let (r, _) = apply(
        &mut st,
        5,
        Cmd::Transfer {
            openid: "alice".into(),
            expected_epoch: e1,
            to_node: "a".into(),
        },
    );
    assert!(
        matches!(r, CmdResult::Err(CmdError::Fenced { current_epoch, .. }) if current_epoch == e2)
    );
    // Released and claimed again: the epoch never goes back.
    let (r, _) = apply(
        &mut st,
        6,
        Cmd::Release {
            node_id: "b".into(),
            openid: "alice".into(),
            epoch: e2,
        },
    );
    assert_eq!(r, CmdResult::Released { released: true });
    let e3 = owned_epoch(&apply(&mut st, 7, claim("a", "alice", "s3")).0);
    assert!(e3 > e2);
}

#[test]
fn claims_need_a_live_node() {
    let mut st = State::default();
    let (r, _) = apply(&mut st, 0, claim("ghost", "alice", "s"));
    assert!(matches!(r, CmdResult::Err(CmdError::NodeNotActive { .. })));
    register(&mut st, 0, "a");
    register(&mut st, 0, "b");
    // Declared dead: claims are refused until it registers again.
    apply(
        &mut st,
        500,
        Cmd::HeartbeatNode {
            node_id: "a".into(),
            draining: false,
            sessions: 0,
        },
    );
    let (r, _) = apply(&mut st, 1001, Cmd::ExpireLeases);
    assert!(matches!(r, CmdResult::Expired { ref nodes, .. } if nodes == &["b".to_string()]));
    let (r, _) = apply(&mut st, 1002, claim("b", "bob", "s"));
    assert!(
        matches!(r, CmdResult::Err(CmdError::NodeNotActive { .. })),
        "{r:?}"
    );
}

/// A lease that ran out without the node being declared dead (no leader could renew it
/// during an election) is renewed by the node's claim, as by a heartbeat: the claim is
/// committed, and the lease keeper's next `ExpireLeases` does not declare it dead. A node
/// declared dead is still refused (`claims_need_a_live_node`), as a transfer to it.
#[test]
fn a_claim_renews_a_lease_that_ran_out_during_an_election() {
    let mut st = State::default();
    register(&mut st, 0, "a");
    register(&mut st, 0, "b");
    let e = owned_epoch(&apply(&mut st, 10, claim("b", "bob", "s")).0);
    // Lease (1000 ms) has lapsed by t=2500; nobody declared it dead.
    let (r, touched) = apply(&mut st, 2500, claim("a", "alice", "s"));
    owned_epoch(&r);
    assert_eq!(st.nodes["a"].lease_expires_at_ms, 2500 + 1000);
    assert!(touched.iter().any(|t| t.key == Key::Node("a".into())));
    let (r, _) = apply(&mut st, 2501, Cmd::ExpireLeases);
    assert_eq!(
        r,
        CmdResult::Expired {
            nodes: vec!["b".into()],
            upstreams: vec![]
        }
    );
    assert_eq!(st.nodes["a"].status, NodeStatus::Active);
    // b is dead now; a transfer to it is refused.
    let (r, _) = apply(
        &mut st,
        2502,
        Cmd::Transfer {
            openid: "alice".into(),
            expected_epoch: e + 1,
            to_node: "b".into(),
        },
    );
    assert!(
        matches!(r, CmdResult::Err(CmdError::NodeNotActive { .. })),
        "{r:?}"
    );
}

#[test]
fn expiry_is_judged_from_entry_time_and_records_failover() {
    let mut st = State::default();
    register(&mut st, 0, "a");
    register(&mut st, 0, "b");
    apply(&mut st, 10, claim("a", "u1", "s"));
    apply(&mut st, 10, claim("a", "u2", "s"));
    // b heartbeats at 900: lease now ends at 1900.
    apply(
        &mut st,
        900,
        Cmd::HeartbeatNode {
            node_id: "b".into(),
            draining: false,
            sessions: 0,
        },
    );
    assert!(!st.has_expired_leases(1000));
    let (r, _) = apply(&mut st, 1001, Cmd::ExpireLeases);
    assert_eq!(
        r,
        CmdResult::Expired {
            nodes: vec!["a".into()],
            upstreams: vec![]
        }
    );
    assert_eq!(st.nodes["a"].status, NodeStatus::Dead);
    assert_eq!(st.nodes["b"].status, NodeStatus::Active);
    let f = st.failovers.values().next().cloned().unwrap();
    assert_eq!((f.failed_node.as_str(), f.sessions), ("a", 2));
    apply(&mut st, 1002, claim("b", "u1", "s9"));
    assert_eq!(st.failovers[&f.seq].moved_to.get("b"), Some(&1));
    // The dead node's heartbeat is refused: it must register again.
    let (r, _) = apply(
        &mut st,
        1003,
        Cmd::HeartbeatNode {
            node_id: "a".into(),
            draining: false,
            sessions: 0,
        },
    );
    assert!(matches!(r, CmdResult::Err(CmdError::NodeNotActive { .. })));
}

#[test]
fn upstream_registration_is_idempotent_and_conflicts_are_refused() {
    let mut st = State::default();
    let reg = |id: &str, service: &str| Cmd::RegisterUpstream {
        instance_id: id.into(),
        zone: "001".into(),
        address: "10.0.0.5:9001".into(),
        service_name: service.into(),
        lease_ttl_ms: Some(1000),
    };
    let (r, t) = apply(&mut st, 0, reg("i1", "game"));
    assert!(matches!(r, CmdResult::Upstream { created: true, .. }));
    assert_eq!(t[0].version, Some(1));
    let (r, t) = apply(&mut st, 500, reg("i2", "game"));
    assert!(
        matches!(r, CmdResult::Upstream { created: false, ref upstream } if upstream.instance_id == "i1" && upstream.lease_expires_at_ms == 1500)
    );
    assert_eq!(t[0].version, None, "a renewal is not pushed to watchers");
    let (r, _) = apply(&mut st, 600, reg("i3", "chat"));
    assert!(matches!(r, CmdResult::Err(CmdError::Conflict { .. })));
    let (r, _) = apply(&mut st, 1501, Cmd::ExpireLeases);
    assert!(
        matches!(r, CmdResult::Expired { ref upstreams, .. } if upstreams == &["i1".to_string()])
    );
    assert!(st.upstreams.is_empty());
}

/// Log entries written by this version must decode forever (rolling upgrades replay them).
/// These bytes must never be updated; add a new golden test for a new format instead.
#[test]
fn golden_cmd_v1() {
    let cases: &[(&str, Cmd)] = &[
        (
            r#"{"cmd":"claim","node_id":"n1","openid":"alice","session_id":"s1"}"#,
            claim("n1", "alice", "s1"),
        ),
        (r#"{"cmd":"expire_leases"}"#, Cmd::ExpireLeases),
        (
            r#"{"cmd":"register_upstream","instance_id":"i","zone":"001","address":"10.0.0.5:9001","service_name":"game","lease_ttl_ms":null}"#,
            Cmd::RegisterUpstream {
                instance_id: "i".into(),
                zone: "001".into(),
                address: "10.0.0.5:9001".into(),
                service_name: "game".into(),
                lease_ttl_ms: None,
            },
        ),
        (
            r#"{"cmd":"release","node_id":"n1","openid":"alice","epoch":7}"#,
            Cmd::Release {
                node_id: "n1".into(),
                openid: "alice".into(),
                epoch: 7,
            },
        ),
    ];
    for (json, cmd) in cases {
        let decoded: Cmd = serde_json::from_str(json).unwrap();
        assert_eq!(&decoded, cmd);
        assert_eq!(&serde_json::to_string(cmd).unwrap(), json);
    }
}

#[test]
fn replicas_applying_the_same_log_agree() {
    let log: Vec<(i64, Cmd)> = vec![
        (
            0,
            Cmd::RegisterNode {
                node_id: "a".into(),
                quic_addr: "q".into(),
                grpc_addr: "g".into(),
                lease_ttl_ms: 100,
            },
        ),
        (1, claim("a", "x", "1")),
        (2, claim("a", "y", "1")),
        (500, Cmd::ExpireLeases),
    ];
    let run = || {
        let mut st = State::default();
        let mut t = Vec::new();
        for (now, c) in &log {
            st.apply(*now, c, &mut t);
        }
        st
    };
    assert_eq!(run(), run());
}

/// Snapshot payloads (format 1) carry the whole `State` as JSON; a snapshot written by this
/// version must install on later ones. These bytes must never be updated.
#[test]
fn golden_state_v1() {
    let json = r#"{"version":3,"last_epoch":2,"last_failover":1,
        "upstreams":{"up-1":{"instance_id":"up-1","zone":"001","address":"10.0.0.5:9001","service_name":"game","registered_at_ms":5,"lease_expires_at_ms":0,"lease_ttl_ms":0}},
        "nodes":{"dp-1":{"node_id":"dp-1","quic_addr":"q:1","grpc_addr":"g:1","status":"dead","lease_expires_at_ms":9,"lease_ttl_ms":4,"drain_requested":false,"sessions":1}},
        "owners":{"alice":{"session_id":"s","owner_node":"dp-1","epoch":2,"changed_at_ms":7}},
        "failovers":{"1":{"seq":1,"failed_node":"dp-1","decided_at_ms":10,"sessions":1,"moved_to":{"dp-2":1}}}}"#;
    let st: State = serde_json::from_str(json).unwrap();
    assert_eq!(st.version, 3);
    assert_eq!(st.nodes["dp-1"].status, NodeStatus::Dead);
    assert_eq!(st.owners["alice"].epoch, 2);
    assert_eq!(st.failovers[&1].moved_to["dp-2"], 1);
    assert_eq!(st.upstreams["up-1"].lease_expires_at_ms, 0);
}

#[test]
fn a_node_that_leaves_is_left_at_once_and_owns_nothing_more() {
    let mut st = State::default();
    register(&mut st, 0, "a");
    register(&mut st, 0, "b");
    let e1 = owned_epoch(&apply(&mut st, 1, claim("a", "alice", "s1")).0);
    let (r, touched) = apply(
        &mut st,
        2,
        Cmd::LeaveNode {
            node_id: "a".into(),
        },
    );
    assert_eq!(r, CmdResult::Left { orphaned: 1 });
    assert!(
        touched
            .iter()
            .any(|t| t.key == Key::Node("a".into()) && t.version.is_some())
    );
    assert_eq!(st.nodes["a"].status, NodeStatus::Left);
    // The orphaned session stays pointed at the left node (the next claimant takes it over
    // from a gone owner), and the move is counted in the failover decision.
    assert_eq!(st.failovers.values().last().map(|f| f.sessions), Some(1));
    // Retried leave: same answer, no second decision.
    let (r, _) = apply(
        &mut st,
        3,
        Cmd::LeaveNode {
            node_id: "a".into(),
        },
    );
    assert_eq!(r, CmdResult::Left { orphaned: 1 });
    assert_eq!(st.failovers.len(), 1);
    // Fenced: it may neither heartbeat nor claim; its lease never "expires" into dead.
    let (r, _) = apply(
        &mut st,
        4,
        Cmd::HeartbeatNode {
            node_id: "a".into(),
            draining: true,
            sessions: 0,
        },
    );
    assert!(
        matches!(r.err(), Some(CmdError::NodeNotActive { .. })),
        "{r:?}"
    );
    assert!(apply(&mut st, 5, claim("a", "bob", "s2")).0.err().is_some());
    assert!(!st.has_expired_leases(10_000_000) || st.nodes["b"].lease_expires_at_ms < 10_000_000);
    apply(&mut st, 10_000_000, Cmd::ExpireLeases);
    assert_eq!(st.nodes["a"].status, NodeStatus::Left);
    // Another node takes the session over at a newer epoch, counted as moved.
    register(&mut st, 10_000_001, "b");
    let (r, _) = apply(&mut st, 10_000_002, claim("b", "alice", "s1"));
    assert!(owned_epoch(&r) > e1);
    assert_eq!(
        st.failovers
            .values()
            .next()
            .map(|f| f.moved_to.get("b").copied()),
        Some(Some(1))
    );
    // Registering again makes it active.
    register(&mut st, 10_000_003, "a");
    assert_eq!(st.nodes["a"].status, NodeStatus::Active);
}

#[test]
fn a_leave_with_no_sessions_left_records_no_failover() {
    let mut st = State::default();
    register(&mut st, 0, "a");
    let (r, _) = apply(
        &mut st,
        1,
        Cmd::LeaveNode {
            node_id: "a".into(),
        },
    );
    assert_eq!(r, CmdResult::Left { orphaned: 0 });
    assert!(st.failovers.is_empty());
    let (r, _) = apply(
        &mut st,
        1,
        Cmd::LeaveNode {
            node_id: "zz".into(),
        },
    );
    assert!(matches!(r.err(), Some(CmdError::NotFound { .. })));
}

#[test]
fn restore_merges_keeps_live_records_and_moves_epochs_past_both() {
    // The backed-up cluster.
    let mut old = State::default();
    register(&mut old, 0, "a");
    for (i, who) in ["alice", "bob"].iter().enumerate() {
        apply(&mut old, 1, claim("a", who, &format!("s{i}")));
    }
    apply(
        &mut old,
        1,
        Cmd::RegisterUpstream {
            instance_id: "up-1".into(),
            zone: "001".into(),
            address: "10.0.0.5:9001".into(),
            service_name: "game".into(),
            lease_ttl_ms: Some(5_000),
        },
    );
    // The fresh cluster already saw node b and a claim for bob.
    let mut st = State::default();
    register(&mut st, 100_000, "b");
    let bob = owned_epoch(&apply(&mut st, 100_001, claim("b", "bob", "s9")).0);
    let before_version = st.version.max(old.version);
    let (r, touched) = apply(
        &mut st,
        100_002,
        Cmd::Restore {
            state: Box::new(old.clone()),
            checksum: "sha256:x".into(),
        },
    );
    let CmdResult::Restored {
        upstreams,
        nodes,
        owners,
        skipped,
        last_epoch,
        ..
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!((upstreams, nodes, owners, skipped), (1, 1, 1, 1));
    assert_eq!(last_epoch, old.last_epoch.max(bob) + RESTORE_EPOCH_GAP);
    assert!(st.version > before_version, "versions only move forward");
    assert!(touched.iter().all(|t| t.version.is_some()));
    // Live record kept; the backup's alice restored at her epoch.
    assert_eq!(st.owners["bob"].owner_node, "b");
    assert_eq!(st.owners["alice"], old.owners["alice"]);
    // Leases re-stamped from the entry's time: nothing expires at once.
    assert_eq!(st.upstreams["up-1"].lease_expires_at_ms, 100_002 + 5_000);
    assert_eq!(st.nodes["a"].lease_expires_at_ms, 100_002 + 1_000);
    assert!(!st.has_expired_leases(100_003));
    // New epochs exceed anything handed out before.
    let e = owned_epoch(&apply(&mut st, 100_004, claim("b", "carol", "s")).0);
    assert!(e > last_epoch);
}

#[test]
fn golden_cmd_leave_and_restore_v1() {
    let json = r#"{"cmd":"leave_node","node_id":"dp-1"}"#;
    let cmd = Cmd::LeaveNode {
        node_id: "dp-1".into(),
    };
    assert_eq!(serde_json::from_str::<Cmd>(json).unwrap(), cmd);
    assert_eq!(serde_json::to_string(&cmd).unwrap(), json);
    let json = r#"{"cmd":"restore","state":{"version":1,"last_epoch":2,"last_failover":0,"upstreams":{},"nodes":{},"owners":{},"failovers":{}},"checksum":"sha256:ab"}"#;
    let cmd = Cmd::Restore {
        state: Box::new(State {
            version: 1,
            last_epoch: 2,
            ..State::default()
        }),
        checksum: "sha256:ab".into(),
    };
    assert_eq!(serde_json::from_str::<Cmd>(json).unwrap(), cmd);
    assert_eq!(serde_json::to_string(&cmd).unwrap(), json);
    assert_eq!(
        serde_json::to_string(&NodeStatus::Left).unwrap(),
        r#""left""#
    );
}

#[test]
fn a_cordoned_node_keeps_its_sessions_and_claims_no_new_ones() {
    let mut st = State::default();
    register(&mut st, 0, "a");
    let e1 = owned_epoch(&apply(&mut st, 1, claim("a", "alice", "s1")).0);
    let cordon = |on| Cmd::CordonNode {
        node_id: "a".into(),
        cordoned: on,
    };
    let (r, touched) = apply(&mut st, 2, cordon(true));
    assert_eq!(r, CmdResult::Ok);
    assert!(touched[0].version.is_some(), "watchers hear of a cordon");
    // Its own session: still its own (a resume, a new connection of the same user).
    assert!(owned_epoch(&apply(&mut st, 3, claim("a", "alice", "s1")).0) >= e1);
    assert!(owned_epoch(&apply(&mut st, 3, claim("a", "alice", "s2")).0) > e1);
    let (r, _) = apply(&mut st, 4, claim("a", "bob", "s3"));
    assert!(
        matches!(r, CmdResult::Err(CmdError::NodeNotActive { ref reason, .. }) if reason.contains("cordoned")),
        "{r:?}"
    );
    // A restart (register again) keeps the operator's cordon.
    register(&mut st, 5, "a");
    assert!(st.nodes["a"].cordoned);
    apply(&mut st, 6, cordon(false));
    owned_epoch(&apply(&mut st, 7, claim("a", "bob", "s3")).0);
    assert_eq!(
        apply(
            &mut st,
            8,
            Cmd::CordonNode {
                node_id: "nope".into(),
                cordoned: true
            }
        )
        .0,
        CmdResult::Err(CmdError::NotFound {
            what: "node nope".into()
        })
    );
}

#[test]
fn a_drain_can_be_cancelled_until_the_node_starts_it() {
    let mut st = State::default();
    register(&mut st, 0, "a");
    let drain = Cmd::DrainNode {
        node_id: "a".into(),
    };
    let cancel = Cmd::CancelDrain {
        node_id: "a".into(),
    };
    apply(&mut st, 1, drain.clone());
    assert!(st.nodes["a"].drain_requested);
    assert_eq!(apply(&mut st, 2, cancel.clone()).0, CmdResult::Ok);
    assert_eq!(st.nodes["a"].status, NodeStatus::Active);
    assert!(!st.nodes["a"].drain_requested);
    // Requested again, and this time the node reports it started: too late to cancel.
    apply(&mut st, 3, drain);
    apply(
        &mut st,
        4,
        Cmd::HeartbeatNode {
            node_id: "a".into(),
            draining: true,
            sessions: 0,
        },
    );
    assert!(matches!(
        apply(&mut st, 5, cancel).0,
        CmdResult::Err(CmdError::Conflict { .. })
    ));
    assert_eq!(st.nodes["a"].status, NodeStatus::Draining);
}

#[test]
fn only_dead_or_departed_nodes_can_be_removed() {
    let mut st = State::default();
    register(&mut st, 0, "a");
    let remove = Cmd::RemoveNode {
        node_id: "a".into(),
    };
    let (r, _) = apply(&mut st, 1, remove.clone());
    let CmdResult::Err(CmdError::Conflict { message }) = r else {
        panic!("a live node was removed: {r:?}");
    };
    assert!(!message.starts_with("conflict"), "{message}");
    apply(
        &mut st,
        2,
        Cmd::LeaveNode {
            node_id: "a".into(),
        },
    );
    let (r, touched) = apply(&mut st, 3, remove.clone());
    assert_eq!(r, CmdResult::Ok);
    assert!(!st.nodes.contains_key("a"));
    assert_eq!(touched[0].key, Key::Node("a".into()));
    assert!(matches!(
        apply(&mut st, 4, remove).0,
        CmdResult::Err(CmdError::NotFound { .. })
    ));
}

#[test]
fn a_disconnected_session_is_owned_by_nobody_at_a_newer_epoch() {
    let mut st = State::default();
    register(&mut st, 0, "a");
    register(&mut st, 0, "b");
    let e1 = owned_epoch(&apply(&mut st, 1, claim("a", "alice", "s1")).0);
    let disconnect = Cmd::DisconnectSession {
        openid: "alice".into(),
    };
    let e2 = owned_epoch(&apply(&mut st, 2, disconnect.clone()).0);
    assert!(e2 > e1);
    assert_eq!(st.owners["alice"].owner_node, DISCONNECTED_OWNER);
    // Again: nothing changes.
    assert_eq!(apply(&mut st, 3, disconnect).0, CmdResult::Ok);
    assert_eq!(st.owners["alice"].epoch, e2);
    // The next node the client reaches claims it afresh.
    let (r, _) = apply(&mut st, 4, claim("b", "alice", "s2"));
    assert!(owned_epoch(&r) > e2);
    assert!(matches!(
        apply(
            &mut st,
            5,
            Cmd::DisconnectSession {
                openid: "nobody".into()
            }
        )
        .0,
        CmdResult::Err(CmdError::NotFound { .. })
    ));
}

/// The operator commands' encoding in the log (added after v1; never change these strings).
#[test]
fn golden_cmd_operator_v1() {
    let cases: &[(&str, Cmd)] = &[
        (
            r#"{"cmd":"cordon_node","node_id":"dp-1","cordoned":true}"#,
            Cmd::CordonNode {
                node_id: "dp-1".into(),
                cordoned: true,
            },
        ),
        (
            r#"{"cmd":"cancel_drain","node_id":"dp-1"}"#,
            Cmd::CancelDrain {
                node_id: "dp-1".into(),
            },
        ),
        (
            r#"{"cmd":"remove_node","node_id":"dp-1"}"#,
            Cmd::RemoveNode {
                node_id: "dp-1".into(),
            },
        ),
        (
            r#"{"cmd":"disconnect_session","openid":"alice"}"#,
            Cmd::DisconnectSession {
                openid: "alice".into(),
            },
        ),
    ];
    for (json, cmd) in cases {
        let decoded: Cmd = serde_json::from_str(json).unwrap();
        assert_eq!(&decoded, cmd);
        assert_eq!(&serde_json::to_string(cmd).unwrap(), json);
    }
}

#[test]
fn sweep_releases_orphaned_owners_then_forgets_departed_nodes() {
    let mut st = State::default();
    register(&mut st, 0, "a");
    register(&mut st, 0, "b");
    apply(&mut st, 1, claim("a", "alice", "s1"));
    apply(&mut st, 1, claim("a", "carol", "s3"));
    apply(&mut st, 1, claim("b", "bob", "s2"));
    apply(
        &mut st,
        100,
        Cmd::LeaveNode {
            node_id: "a".into(),
        },
    );
    // carol's client came back to b: re-claimed, no longer orphaned.
    apply(&mut st, 150, claim("b", "carol", "s4"));
    let sweep = Cmd::Sweep {
        orphan_timeout_ms: 1_000,
        node_retention_ms: 10_000,
    };
    assert!(!st.has_sweep_due(1_099, 1_000, 10_000), "not yet");
    apply(&mut st, 1_099, sweep.clone());
    assert!(st.owners.contains_key("alice"), "within the orphan timeout");

    assert!(st.has_sweep_due(1_100, 1_000, 10_000));
    apply(&mut st, 1_100, sweep.clone());
    assert!(
        !st.owners.contains_key("alice"),
        "released after the timeout"
    );
    assert_eq!(st.owners["carol"].owner_node, "b", "re-claimed stays");
    assert!(st.owners.contains_key("bob"), "a live node's owners stay");
    assert!(st.nodes.contains_key("a"), "kept for the retention period");
    assert!(
        !st.has_sweep_due(1_100, 1_000, 10_000),
        "nothing left to do"
    );

    assert!(st.has_sweep_due(10_100, 1_000, 10_000));
    apply(&mut st, 10_100, sweep);
    assert!(!st.nodes.contains_key("a"), "removed after retention");
    assert!(st.nodes.contains_key("b"));
}

/// A node that registers again (it restarted with its node id) gets a new
/// `registered_at_ms`, and watchers hear of it even when nothing else
/// changed: replica holders give the old process's sessions a second copy
/// (data plane `ReplicaStore::orphans`; simulation seed 2569 of session 10).
#[test]
fn a_node_that_registers_again_is_a_new_registration_watchers_hear_of() {
    let mut st = State::default();
    register(&mut st, 100, "a");
    assert_eq!(st.nodes["a"].registered_at_ms, 100);
    let cmd = Cmd::RegisterNode {
        node_id: "a".into(),
        quic_addr: "127.0.0.1:1".into(),
        grpc_addr: "127.0.0.1:2".into(),
        lease_ttl_ms: 1000,
    };
    let (_, touched) = apply(&mut st, 250, cmd);
    assert_eq!(st.nodes["a"].registered_at_ms, 250);
    assert!(
        touched.iter().any(|t| t.version.is_some()),
        "a restart with the same addresses is an event: {touched:?}"
    );
    assert_eq!(crate::convert::node(&st.nodes["a"]).registered_at_ms, 250);
}
