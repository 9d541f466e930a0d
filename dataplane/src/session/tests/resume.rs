//! `attach`: new, resumed, trimmed, ahead, replaced, expired.

use super::*;

#[test]
fn first_attach_is_new_and_ignores_last_acked() {
    let t0 = Instant::now();
    let mut s = Session::new(identity(), cfg(), t0);
    let out = s.attach(t0, 7);
    assert_eq!(
        out,
        ResumeOutcome {
            status: ResumeStatus::New,
            first_available_seq_id: 0,
            next_seq_id: 1,
            replaced: false
        }
    );
    assert!(s.is_attached());
    assert_eq!(s.stats().attaches_total, 1);
}

#[test]
fn resume_from_zero_redelivers_everything_in_order() {
    let (mut s, t0) = attached(cfg(), 3);
    drain(&mut s, t0);
    s.detach(t0);
    let out = s.attach(t0, 0);
    assert_eq!(
        (out.status, out.first_available_seq_id, out.next_seq_id),
        (ResumeStatus::Resumed, 1, 4)
    );
    s.push(t0, msg(4)).unwrap();
    assert_eq!(
        drain(&mut s, t0),
        again(1..=3)
            .into_iter()
            .chain([(4, false)])
            .collect::<Vec<_>>()
    );
}

#[test]
fn resume_from_the_middle_acks_up_to_last_acked() {
    let (mut s, t0) = attached(cfg(), 5);
    drain(&mut s, t0);
    s.on_ack(t0, 1).unwrap();
    s.detach(t0);
    let out = s.attach(t0, 3);
    assert_eq!(
        (out.status, out.first_available_seq_id),
        (ResumeStatus::Resumed, 4)
    );
    assert_eq!(s.stats().acked_seq_id, 3);
    assert_eq!(s.on_ack(t0, 3), Ok(AckOutcome::Stale { acked_seq: 3 }));
    assert_eq!(drain(&mut s, t0), again(4..=5));
}

#[test]
fn resume_with_everything_acked_has_nothing_available() {
    let (mut s, t0) = attached(cfg(), 2);
    drain(&mut s, t0);
    s.detach(t0);
    let out = s.attach(t0, 2);
    assert_eq!(
        (out.status, out.first_available_seq_id, out.next_seq_id),
        (ResumeStatus::Resumed, 0, 3)
    );
}

#[test]
fn resume_below_the_ack_point_continues_after_it() {
    let (mut s, t0) = attached(cfg(), 3);
    drain(&mut s, t0);
    s.on_ack(t0, 2).unwrap();
    s.detach(t0);
    let out = s.attach(t0, 1);
    assert_eq!(
        (out.status, out.first_available_seq_id),
        (ResumeStatus::Resumed, 3)
    );
    assert_eq!(drain(&mut s, t0), again(3..=3));
}

#[test]
fn resume_ahead_of_every_assigned_seq_is_refused_untouched() {
    let (mut s, t0) = attached(cfg(), 3);
    drain(&mut s, t0);
    s.detach(t0);
    let before = s.export();
    let out = s.attach(t0, 4);
    assert_eq!(
        (out.status, out.first_available_seq_id, out.next_seq_id),
        (ResumeStatus::SeqAhead, 0, 4)
    );
    assert!(!s.is_attached());
    assert_eq!(s.export(), before);
}

#[test]
fn resume_past_trimmed_seqs_reports_trimmed() {
    let cfg = SessionConfig {
        max_queue: 2,
        queue_policy: QueuePolicy::DropOldest,
        ..cfg()
    };
    let (mut s, t0) = attached(cfg, 4); // 1 and 2 trimmed
    s.detach(t0);
    let out = s.attach(t0, 0);
    assert_eq!(
        (out.status, out.first_available_seq_id, out.next_seq_id),
        (ResumeStatus::Trimmed, 3, 5)
    );
    assert_eq!(drain(&mut s, t0), fresh(3..=4));
    s.detach(t0);
    // Nothing after seq 2 was trimmed.
    assert_eq!(s.attach(t0, 2).status, ResumeStatus::Resumed);
}

#[test]
fn attach_over_an_attached_connection_replaces_it() {
    let (mut s, t0) = attached(cfg(), 2);
    drain(&mut s, t0);
    let out = s.attach(t0, 0);
    assert!(out.replaced);
    assert_eq!(out.status, ResumeStatus::Resumed);
    assert_eq!(drain(&mut s, t0), again(1..=2));
    assert_eq!(s.stats().attaches_total, 2);
}

#[test]
fn attach_to_an_expired_session_is_session_expired() {
    let t0 = Instant::now();
    let mut s = Session::new(identity(), cfg(), t0);
    s.handle_timeout(t0 + 60 * SECOND).unwrap();
    assert_eq!(s.attach(t0, 0).status, ResumeStatus::SessionExpired);
    assert!(s.is_expired());
    assert!(!s.is_attached());
}
