//! Seq assignment, the queue bound and its policies, `poll_transmit`.

use super::*;

#[test]
fn push_assigns_seqs_from_one_by_one() {
    let (mut s, t0) = attached(cfg(), 0);
    for want in 1..=5 {
        assert_eq!(s.push(t0, msg(want)), Ok(want));
    }
    assert_eq!(s.stats().next_seq_id, 6);
    assert_eq!(s.stats().pushes_total, 5);
}

#[test]
fn poll_transmit_yields_each_push_once_in_order_with_its_content() {
    let (mut s, t0) = attached(cfg(), 0);
    s.push(t0, msg(1)).unwrap();
    s.push(t0, msg(2)).unwrap();
    let p = s.poll_transmit(t0).unwrap();
    assert_eq!(
        (p.seq_id, p.msg_type.as_str(), p.content.as_str()),
        (1, "chat", "m1")
    );
    assert_eq!(p.data, Bytes::from(vec![1u8; 3]));
    assert_eq!(p.created_at_ms, 1_700_000_000_001);
    assert!(!p.redelivery);
    assert_eq!(drain(&mut s, t0), fresh(2..=2));
    assert_eq!(drain(&mut s, t0), vec![]);
    s.push(t0, msg(3)).unwrap();
    assert_eq!(drain(&mut s, t0), fresh(3..=3));
    assert_eq!(s.stats().queued, 0);
    assert_eq!(s.stats().unacked, 3);
}

#[test]
fn pushes_queue_while_detached_and_flow_on_attach() {
    let t0 = Instant::now();
    let mut s = Session::new(identity(), cfg(), t0);
    s.push(t0, msg(1)).unwrap();
    assert_eq!(s.poll_transmit(t0), None);
    let out = s.attach(t0, 0);
    assert_eq!(out.first_available_seq_id, 1);
    assert_eq!(out.next_seq_id, 2);
    assert_eq!(drain(&mut s, t0), fresh(1..=1));
    s.detach(t0);
    s.push(t0, msg(2)).unwrap();
    assert_eq!(s.poll_transmit(t0), None);
    assert_eq!(s.stats().queued, 2);
}

#[test]
fn queue_full_rejects_by_default_without_using_a_seq() {
    let (mut s, t0) = attached(cfg(), 8);
    assert_eq!(
        s.push(t0, msg(9)),
        Err(PushError::QueueFull {
            max_queue: 8,
            max_queue_bytes: 1 << 20,
            by_bytes: false
        })
    );
    assert_eq!(s.stats().rejected_total, 1);
    // Sent or not, everything unacked counts: sending frees nothing.
    drain(&mut s, t0);
    assert!(s.push(t0, msg(9)).is_err());
    s.on_ack(t0, 1).unwrap();
    assert_eq!(s.push(t0, msg(9)), Ok(9));
    assert_eq!(s.stats().unacked, 8);
}

#[test]
fn drop_oldest_trims_unsent_pushes_and_counts_them() {
    let cfg = SessionConfig {
        max_queue: 3,
        queue_policy: QueuePolicy::DropOldest,
        ..cfg()
    };
    let (mut s, t0) = attached(cfg, 5);
    let st = s.stats();
    assert_eq!((st.unacked, st.trimmed_total, st.pushes_total), (3, 2, 5));
    assert_eq!(s.export().trimmed_through_seq_id, 2);
    assert_eq!(drain(&mut s, t0), fresh(3..=5));
}

#[test]
fn drop_oldest_may_drop_sent_pushes_and_sending_continues_after_them() {
    let cfg = SessionConfig {
        max_queue: 3,
        queue_policy: QueuePolicy::DropOldest,
        ..cfg()
    };
    let (mut s, t0) = attached(cfg, 3);
    assert_eq!(
        drain(&mut s, t0),
        fresh(1..=2)
            .into_iter()
            .chain([(3, false)])
            .collect::<Vec<_>>()
    );
    s.push(t0, msg(4)).unwrap(); // drops sent seq 1
    assert_eq!(drain(&mut s, t0), fresh(4..=4));
    // The client acks what it got, including the dropped seq.
    assert_eq!(
        s.on_ack(t0, 2),
        Ok(AckOutcome::Advanced {
            acked_seq: 2,
            freed: 1
        })
    );
    assert_eq!(s.stats().unacked, 2);
}

#[test]
fn push_to_an_expired_session_fails() {
    let t0 = Instant::now();
    let mut s = Session::new(identity(), cfg(), t0);
    assert!(matches!(
        s.handle_timeout(t0 + 60 * SECOND),
        Some(SessionEvent::Expired { .. })
    ));
    assert_eq!(s.push(t0, msg(1)), Err(PushError::Expired));
}

/// A push of `len` payload bytes (content).
fn sized(len: usize) -> PushMessage {
    PushMessage {
        content: "x".repeat(len),
        ..PushMessage::default()
    }
}

#[test]
fn the_byte_bound_rejects_without_using_a_seq() {
    let bounded = SessionConfig {
        max_queue_bytes: 10_000,
        ..cfg()
    };
    let (mut s, t0) = attached(bounded, 0);
    assert_eq!(s.push(t0, sized(4_000)), Ok(1));
    assert_eq!(s.push(t0, sized(4_000)), Ok(2));
    assert_eq!(
        s.push(t0, sized(4_000)),
        Err(PushError::QueueFull {
            max_queue: 8,
            max_queue_bytes: 10_000,
            by_bytes: true
        })
    );
    // Small pushes still fit; an ack frees bytes for a big one.
    assert_eq!(s.push(t0, sized(100)), Ok(3));
    drain(&mut s, t0);
    s.on_ack(t0, 1).unwrap();
    assert_eq!(s.push(t0, sized(4_000)), Ok(4));
    assert!(s.queued_bytes() <= 10_000);
    // An empty queue always takes one push, whatever its size.
    let (mut empty, t0) = attached(
        SessionConfig {
            max_queue_bytes: 10,
            ..cfg()
        },
        0,
    );
    assert_eq!(empty.push(t0, sized(100)), Ok(1));
}

#[test]
fn drop_oldest_makes_room_by_bytes_too() {
    let cfg = SessionConfig {
        max_queue_bytes: 10_000,
        queue_policy: QueuePolicy::DropOldest,
        ..cfg()
    };
    let (mut s, t0) = attached(cfg, 0);
    for _ in 0..3 {
        s.push(t0, sized(4_000)).unwrap();
    }
    let st = s.stats();
    assert_eq!((st.unacked, st.trimmed_total), (2, 1));
    assert!(s.queued_bytes() <= 10_000);
    assert_eq!(s.export().trimmed_through_seq_id, 1);
}

#[test]
fn a_shared_body_queues_on_many_sessions_without_copies() {
    let body = PushBody::encode(&sized(4096));
    let mut sessions: Vec<_> = (0..3).map(|_| attached(cfg(), 0)).collect();
    for (s, t0) in &mut sessions {
        s.push(*t0, body.clone()).unwrap();
        let out = s.poll_transmit_encoded(*t0).unwrap();
        assert!(out.body.shares(&body));
        assert_eq!(out.to_push().content.len(), 4096);
    }
}

/// `server.push_coalesce`: pushes may wait to share a write only behind
/// earlier pushes in flight, and only while they would not fill a datagram.
#[test]
fn pushes_may_wait_only_behind_pushes_in_flight_and_below_a_datagram() {
    // Each push of `msg` is a frame of ~25 bytes: 100 bytes is 4 of them.
    let datagram = 100;
    let (mut s, t0) = attached(cfg(), 1);
    assert!(
        !s.may_hold_pushes(datagram),
        "nothing in flight: written at once"
    );
    assert_eq!(drain(&mut s, t0), fresh(1..=1));
    assert!(!s.may_hold_pushes(datagram), "in flight, nothing unsent");
    assert_eq!(s.push(t0, msg(2)), Ok(2));
    assert!(s.may_hold_pushes(datagram), "1 in flight, 2 waits");
    for n in 3..=5 {
        assert_eq!(s.push(t0, msg(n)), Ok(n));
    }
    assert!(
        !s.may_hold_pushes(datagram),
        "a datagram's worth unsent: written"
    );
    assert_eq!(drain(&mut s, t0), fresh(2..=5));
    assert_eq!(s.push(t0, msg(6)), Ok(6));
    assert!(s.may_hold_pushes(datagram));
    assert!(s.on_ack(t0, 5).is_ok());
    assert!(!s.may_hold_pushes(datagram), "all acked: written at once");
    s.detach(t0);
    assert!(
        !s.may_hold_pushes(datagram),
        "no connection: nothing to hold"
    );
}
