//! Detached sessions expire after `session_timeout`.

use super::*;

#[test]
fn a_detached_session_expires_and_reports_its_lost_pushes() {
    let (mut s, t0) = attached(cfg(), 3);
    drain(&mut s, t0);
    s.on_ack(t0, 1).unwrap();
    let t1 = t0 + 5 * SECOND;
    s.detach(t1);
    assert_eq!(s.poll_timeout(), Some(t1 + 60 * SECOND));
    assert_eq!(s.handle_timeout(t1 + 59 * SECOND), None);
    assert_eq!(
        s.handle_timeout(t1 + 60 * SECOND),
        Some(SessionEvent::Expired { lost_pushes: 2 })
    );
    assert!(s.is_expired());
    assert_eq!(s.poll_timeout(), None);
    assert_eq!(s.handle_timeout(t1 + 600 * SECOND), None);
}

#[test]
fn attaching_in_time_cancels_expiry() {
    let (mut s, t0) = attached(cfg(), 0);
    s.detach(t0);
    s.attach(t0 + 59 * SECOND, 0);
    assert_eq!(s.poll_timeout(), None);
    assert_eq!(s.handle_timeout(t0 + 61 * SECOND), None);
    assert!(s.is_attached());
}

#[test]
fn a_new_session_expires_if_no_connection_attaches() {
    let t0 = Instant::now();
    let s = Session::new(identity(), cfg(), t0);
    assert_eq!(s.poll_timeout(), Some(t0 + 60 * SECOND));
}

#[test]
fn detach_is_idempotent_and_keeps_the_first_deadline() {
    let (mut s, t0) = attached(cfg(), 0);
    s.detach(t0);
    s.detach(t0 + 30 * SECOND);
    assert_eq!(s.poll_timeout(), Some(t0 + 60 * SECOND));
}
