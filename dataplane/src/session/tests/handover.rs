//! Export, import, and what import refuses.

use super::*;

/// Mid-stream: pushes 1..=5 sent, acked to 2, then a retransmit round that
/// has resent 3 and 4 so far; request 1 answered, request 2 executing.
fn mid_stream() -> (Session, Instant) {
    let (mut s, t0) = attached(cfg(), 5);
    s.set_epoch(41);
    assert_eq!(drain(&mut s, t0), fresh(1..=5));
    s.on_ack(t0, 2).unwrap();
    s.handle_timeout(t0 + 10 * SECOND).unwrap();
    s.poll_transmit(t0 + 10 * SECOND).unwrap();
    s.poll_transmit(t0 + 10 * SECOND).unwrap();
    assert_eq!(s.begin_request(1), RequestDisposition::Execute);
    s.complete_request(1, response(1));
    assert_eq!(s.begin_request(2), RequestDisposition::Execute);
    (s, t0 + 10 * SECOND)
}

#[test]
fn handover_mid_stream_continues_on_the_new_node() {
    let (old, t0) = mid_stream();
    let state = old.export();
    assert_eq!(state.epoch, 41);
    assert_eq!(
        state
            .pushes
            .iter()
            .map(|p| (p.seq_id, p.redelivery))
            .collect::<Vec<_>>(),
        again(3..=5)
    );
    assert_eq!(state.unknown_outcome_request_seq_ids, vec![2]);

    let t1 = t0 + 3600 * SECOND; // another process: its own clock
    let mut s = Session::import(state, t1, cfg()).unwrap();
    assert!(!s.is_attached());
    assert_eq!(s.poll_timeout(), Some(t1 + 60 * SECOND), "expiry re-armed");
    assert_eq!(s.identity(), old.identity());
    assert_eq!(s.epoch(), 41);
    s.set_epoch(42);

    let out = s.attach(t1, 3);
    assert_eq!(
        (out.status, out.first_available_seq_id, out.next_seq_id),
        (ResumeStatus::Resumed, 4, 6)
    );
    assert_eq!(s.push(t1, msg(6)), Ok(6));
    assert_eq!(drain(&mut s, t1), vec![(4, true), (5, true), (6, false)]);
    assert!(s.on_ack(t1, 6).is_ok());

    // Answered before: replayed. Executing at export: never executed again.
    assert_eq!(s.begin_request(1), RequestDisposition::Cached(response(1)));
    let RequestDisposition::Cached(unknown) = s.begin_request(2) else {
        panic!("in-flight request must not re-execute after a handover");
    };
    assert_eq!(unknown.code, ErrorCode::UpstreamError as i32);
    assert_eq!(unknown.seq_id, 2);
    assert!(unknown.message.contains("outcome unknown"));
    assert_eq!(s.begin_request(2), RequestDisposition::Cached(unknown));
    assert_eq!(s.begin_request(3), RequestDisposition::Execute);
    // The old node's late answer for 2 is not taken.
    assert_eq!(s.complete_request(2, response(2)), Completion::NotInFlight);

    let (old, new) = (old.stats(), s.stats());
    assert_eq!(new.retransmits_total, old.retransmits_total);
    assert_eq!(new.redelivered_total, old.redelivered_total + 2);
    assert_eq!(new.attaches_total, 2);
}

#[test]
fn export_import_round_trips_through_bytes() {
    let (s, t0) = mid_stream();
    let state = s.export();
    let bytes = state.encode_to_vec();
    let decoded = SessionState::decode(bytes.as_slice()).unwrap();
    assert_eq!(decoded, state);
    let imported = Session::import(decoded, t0, cfg()).unwrap();
    assert_eq!(imported.export(), state);
}

#[test]
fn import_with_a_smaller_window_drops_older_answers() {
    let (mut s, t0) = attached(cfg(), 0);
    for seq in 1..=4 {
        s.begin_request(seq);
        s.complete_request(seq, response(seq));
    }
    let small = SessionConfig {
        request_window: 2,
        ..cfg()
    };
    let mut s = Session::import(s.export(), t0, small).unwrap();
    assert_eq!(s.stats().requests_cached, 2);
    assert!(matches!(
        s.begin_request(2),
        RequestDisposition::OutOfWindow { lowest: 3, .. }
    ));
    assert_eq!(s.begin_request(3), RequestDisposition::Cached(response(3)));
}

#[test]
fn an_imported_queue_over_the_bound_is_kept_whole() {
    let (s, t0) = attached(cfg(), 5);
    let small = SessionConfig {
        max_queue: 3,
        ..cfg()
    };
    let mut s = Session::import(s.export(), t0, small.clone()).unwrap();
    assert_eq!(s.stats().unacked, 5);
    assert!(s.push(t0, msg(6)).is_err());

    let drop = SessionConfig {
        queue_policy: QueuePolicy::DropOldest,
        ..small
    };
    let mut s = Session::import(s.export(), t0, drop).unwrap();
    assert_eq!(s.push(t0, msg(6)), Ok(6));
    assert_eq!(s.stats().unacked, 3);
    assert_eq!(s.attach(t0, 0).status, ResumeStatus::Trimmed);
}

#[test]
fn import_refuses_inconsistent_states() {
    let (s, t0) = mid_stream();
    let good = s.export(); // next 6, acked 2, sent 5, pushes 3..=5, requests 1 done / 2 unknown
    type Corrupt = fn(&mut SessionState);
    let cases: Vec<(&str, Corrupt, ImportError)> = vec![
        ("next 0", |s| s.next_seq_id = 0, ImportError::NextSeqZero),
        (
            "acked not below next",
            |s| s.acked_seq_id = 6,
            ImportError::SeqNotAssigned {
                field: "acked_seq_id",
                value: 6,
                next_seq: 6,
            },
        ),
        (
            "trimmed not below next",
            |s| s.trimmed_through_seq_id = 9,
            ImportError::SeqNotAssigned {
                field: "trimmed_through_seq_id",
                value: 9,
                next_seq: 6,
            },
        ),
        (
            "sent never assigned",
            |s| s.highest_sent_seq_id = 6,
            ImportError::SeqNotAssigned {
                field: "highest_sent_seq_id",
                value: 6,
                next_seq: 6,
            },
        ),
        (
            "acked beyond sent",
            |s| s.highest_sent_seq_id = 1,
            ImportError::AckedBeyondSent {
                acked: 2,
                highest_sent: 1,
            },
        ),
        (
            "hole",
            |s| s.pushes[1].seq_id = 5,
            ImportError::PushSeq {
                index: 1,
                expected: 4,
                found: 5,
            },
        ),
        (
            "unordered",
            |s| s.pushes.swap(0, 2),
            ImportError::PushSeq {
                index: 0,
                expected: 3,
                found: 5,
            },
        ),
        (
            "missing push",
            |s| {
                s.pushes.pop();
            },
            ImportError::PushCount {
                front: 3,
                next_seq: 6,
                expected: 3,
                found: 2,
            },
        ),
        (
            "acked push still listed",
            |s| s.acked_seq_id = 3,
            ImportError::PushCount {
                front: 4,
                next_seq: 6,
                expected: 2,
                found: 3,
            },
        ),
        (
            "request beyond highest",
            |s| s.highest_request_seq_id = 1,
            ImportError::RequestSeq { seq: 2, highest: 1 },
        ),
        (
            "request seq 0",
            |s| s.completed_requests[0].seq_id = 0,
            ImportError::RequestSeq { seq: 0, highest: 2 },
        ),
        (
            "request both done and unknown",
            |s| s.unknown_outcome_request_seq_ids = vec![1],
            ImportError::RequestSeq { seq: 1, highest: 2 },
        ),
        (
            "unknown listed twice",
            |s| s.unknown_outcome_request_seq_ids = vec![2, 2],
            ImportError::RequestSeq { seq: 2, highest: 2 },
        ),
        (
            "answer missing",
            |s| s.completed_requests[0].response = None,
            ImportError::MissingResponse(1),
        ),
        (
            "no session id",
            |s| s.session_id.clear(),
            ImportError::MissingIdentity("session_id"),
        ),
        (
            "no openid",
            |s| s.openid.clear(),
            ImportError::MissingIdentity("openid"),
        ),
    ];
    for (name, corrupt, want) in cases {
        let mut state = good.clone();
        corrupt(&mut state);
        let got = Session::import(state, t0, cfg()).err();
        assert_eq!(got, Some(want), "{name}");
    }
    assert!(Session::import(good, t0, cfg()).is_ok());
}

#[test]
fn stats_split_queued_and_sent() {
    let (mut s, t0) = attached(cfg(), 4);
    s.poll_transmit(t0).unwrap();
    let st = s.stats();
    assert_eq!((st.queued, st.unacked), (3, 4));
    s.detach(t0);
    assert_eq!(s.stats().queued, 4, "nothing counts as sent while detached");
}
