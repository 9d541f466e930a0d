//! Go-back-N on `ack_timeout`, `max_retries`, `AckTimeout`.

use super::*;

#[test]
fn retransmit_deadline_is_oldest_unacked_send_plus_ack_timeout() {
    let (mut s, t0) = attached(cfg(), 2);
    assert_eq!(s.poll_timeout(), None, "nothing sent, nothing to time out");
    s.poll_transmit(t0).unwrap();
    s.poll_transmit(t0 + 5 * SECOND).unwrap();
    assert_eq!(s.poll_timeout(), Some(t0 + 10 * SECOND));
    s.on_ack(t0, 1).unwrap();
    assert_eq!(s.poll_timeout(), Some(t0 + 15 * SECOND));
    s.on_ack(t0, 2).unwrap();
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn nothing_happens_before_the_deadline() {
    let (mut s, t0) = attached(cfg(), 1);
    drain(&mut s, t0);
    assert_eq!(
        s.handle_timeout(t0 + 10 * SECOND - Duration::from_nanos(1)),
        None
    );
    assert_eq!(drain(&mut s, t0), vec![]);
}

#[test]
fn retransmit_goes_back_n_and_redelivers_in_order() {
    let (mut s, t0) = attached(cfg(), 4);
    assert_eq!(drain(&mut s, t0), fresh(1..=4));
    s.on_ack(t0, 1).unwrap();
    let t1 = t0 + 10 * SECOND;
    assert_eq!(
        s.handle_timeout(t1),
        Some(SessionEvent::Retransmit {
            from_seq: 2,
            count: 3,
            attempt: 1
        })
    );
    assert_eq!(s.poll_timeout(), None, "rewound: nothing sent on the wire");
    s.push(t1, msg(5)).unwrap();
    assert_eq!(
        drain(&mut s, t1),
        again(2..=4)
            .into_iter()
            .chain([(5, false)])
            .collect::<Vec<_>>()
    );
    assert_eq!(s.poll_timeout(), Some(t1 + 10 * SECOND));
    let st = s.stats();
    assert_eq!((st.redelivered_total, st.retransmits_total), (3, 1));
}

#[test]
fn retries_exhausted_is_ack_timeout_and_the_queue_survives_for_resume() {
    let (mut s, t0) = attached(cfg(), 2); // max_retries 2
    drain(&mut s, t0);
    let mut now = t0;
    for attempt in 1..=2 {
        now += 10 * SECOND;
        assert_eq!(
            s.handle_timeout(now),
            Some(SessionEvent::Retransmit {
                from_seq: 1,
                count: 2,
                attempt
            })
        );
        assert_eq!(drain(&mut s, now), again(1..=2));
    }
    now += 10 * SECOND;
    assert_eq!(
        s.handle_timeout(now),
        Some(SessionEvent::AckTimeout {
            oldest_unacked_seq: 1,
            retries: 2
        })
    );
    assert!(!s.is_attached());
    assert_eq!(s.poll_transmit(now), None);
    assert_eq!(s.poll_timeout(), Some(now + 60 * SECOND), "expiry armed");
    let out = s.attach(now, 0);
    assert_eq!(
        (out.status, out.first_available_seq_id, out.replaced),
        (ResumeStatus::Resumed, 1, false)
    );
    assert_eq!(drain(&mut s, now), again(1..=2));
}

#[test]
fn ack_progress_resets_the_retry_counter() {
    let (mut s, t0) = attached(cfg(), 3);
    drain(&mut s, t0);
    let mut now = t0;
    for _ in 0..2 {
        now += 10 * SECOND;
        assert!(matches!(
            s.handle_timeout(now),
            Some(SessionEvent::Retransmit { .. })
        ));
        drain(&mut s, now);
    }
    s.on_ack(now, 1).unwrap();
    now += 10 * SECOND;
    assert_eq!(
        s.handle_timeout(now),
        Some(SessionEvent::Retransmit {
            from_seq: 2,
            count: 2,
            attempt: 1
        })
    );
}

#[test]
fn a_stale_ack_does_not_reset_the_retry_counter() {
    let (mut s, t0) = attached(cfg(), 2);
    drain(&mut s, t0);
    s.on_ack(t0, 1).unwrap();
    let mut now = t0;
    for _ in 0..2 {
        now += 10 * SECOND;
        s.handle_timeout(now).unwrap();
        drain(&mut s, now);
        s.on_ack(now, 1).unwrap();
    }
    now += 10 * SECOND;
    assert!(matches!(
        s.handle_timeout(now),
        Some(SessionEvent::AckTimeout { .. })
    ));
}

#[test]
fn zero_max_retries_times_out_on_the_first_deadline() {
    let (mut s, t0) = attached(
        SessionConfig {
            max_retries: 0,
            ..cfg()
        },
        1,
    );
    drain(&mut s, t0);
    assert_eq!(
        s.handle_timeout(t0 + 10 * SECOND),
        Some(SessionEvent::AckTimeout {
            oldest_unacked_seq: 1,
            retries: 0
        })
    );
}
