//! Cumulative, stale and refused acks.

use super::*;

#[test]
fn ack_is_cumulative_and_frees_everything_up_to_it() {
    let (mut s, t0) = attached(cfg(), 5);
    drain(&mut s, t0);
    assert_eq!(
        s.on_ack(t0, 3),
        Ok(AckOutcome::Advanced {
            acked_seq: 3,
            freed: 3
        })
    );
    let st = s.stats();
    assert_eq!((st.acked_seq_id, st.unacked, st.queued), (3, 2, 0));
}

#[test]
fn duplicate_and_reordered_acks_are_counted_stale_noops() {
    let (mut s, t0) = attached(cfg(), 5);
    drain(&mut s, t0);
    s.on_ack(t0, 4).unwrap();
    let before = s.export();
    for old in [4, 2, 0] {
        assert_eq!(s.on_ack(t0, old), Ok(AckOutcome::Stale { acked_seq: 4 }));
    }
    assert_eq!(s.stats().stale_acks_total, 3);
    let mut after = s.export();
    after.counters = before.counters;
    assert_eq!(after, before);
}

#[test]
fn ack_beyond_highest_sent_is_refused_and_changes_nothing() {
    let (mut s, t0) = attached(cfg(), 5);
    s.poll_transmit(t0).unwrap();
    s.poll_transmit(t0).unwrap();
    let before = s.export();
    // Assigned but not sent, and never assigned.
    for acked in [3, 99] {
        assert_eq!(
            s.on_ack(t0, acked),
            Err(AckError::BeyondSent {
                acked,
                highest_sent: 2
            })
        );
    }
    assert_eq!(s.export(), before);
    assert_eq!(drain(&mut s, t0), fresh(3..=5));
}

#[test]
fn ack_of_a_seq_sent_on_an_earlier_connection_is_accepted_before_resending() {
    let (mut s, t0) = attached(cfg(), 3);
    drain(&mut s, t0);
    s.detach(t0);
    s.attach(t0, 0);
    // The client processes buffered pushes from the old connection late.
    assert!(s.on_ack(t0, 2).is_ok());
    assert_eq!(drain(&mut s, t0), again(3..=3));
}
