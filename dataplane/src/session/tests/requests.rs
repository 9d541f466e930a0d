//! Request dedupe: executed at most once.

use super::*;

#[test]
fn a_request_executes_once_then_waits_then_replays() {
    let (mut s, _) = attached(cfg(), 0);
    assert_eq!(s.begin_request(1), RequestDisposition::Execute);
    assert_eq!(s.begin_request(1), RequestDisposition::InFlight);
    assert_eq!(s.complete_request(1, response(1)), Completion::Stored);
    for _ in 0..2 {
        assert_eq!(s.begin_request(1), RequestDisposition::Cached(response(1)));
    }
    assert_eq!(s.stats().duplicate_requests_total, 3);
    assert_eq!(s.stats().requests_cached, 1);
}

#[test]
fn requests_out_of_window_are_refused_with_the_window() {
    let (mut s, _) = attached(cfg(), 0); // window 4
    assert_eq!(
        s.begin_request(0),
        RequestDisposition::OutOfWindow {
            lowest: 1,
            highest: 4
        }
    );
    assert_eq!(
        s.begin_request(5),
        RequestDisposition::OutOfWindow {
            lowest: 1,
            highest: 4
        }
    );
    assert_eq!(s.begin_request(4), RequestDisposition::Execute);
    assert_eq!(s.begin_request(8), RequestDisposition::Execute);
    // highest 8: 8 - 4 = 4 and below are out, up to 12 is in.
    let window = RequestDisposition::OutOfWindow {
        lowest: 5,
        highest: 12,
    };
    assert_eq!(
        s.begin_request(4),
        window,
        "low edge, even though in flight"
    );
    assert_eq!(s.begin_request(13), window, "high edge");
    assert_eq!(s.begin_request(0), window);
    assert_eq!(s.stats().duplicate_requests_total, 0);
}

#[test]
fn seqs_inside_the_window_may_arrive_out_of_order() {
    let (mut s, _) = attached(cfg(), 0);
    assert_eq!(s.begin_request(3), RequestDisposition::Execute);
    assert_eq!(s.begin_request(1), RequestDisposition::Execute);
    assert_eq!(s.complete_request(3, response(3)), Completion::Stored);
    assert_eq!(s.begin_request(2), RequestDisposition::Execute);
}

#[test]
fn answers_are_kept_only_for_the_window() {
    let (mut s, _) = attached(cfg(), 0);
    for seq in 1..=2 {
        assert_eq!(s.begin_request(seq), RequestDisposition::Execute);
        s.complete_request(seq, response(seq));
    }
    assert_eq!(s.begin_request(6), RequestDisposition::Execute); // lowest becomes 3
    assert_eq!(s.stats().requests_cached, 0);
    assert!(matches!(
        s.begin_request(1),
        RequestDisposition::OutOfWindow { lowest: 3, .. }
    ));
}

#[test]
fn in_flight_requests_are_bounded() {
    let (mut s, _) = attached(cfg(), 0); // max_inflight 2
    assert_eq!(s.begin_request(1), RequestDisposition::Execute);
    assert_eq!(s.begin_request(2), RequestDisposition::Execute);
    assert_eq!(
        s.begin_request(3),
        RequestDisposition::TooManyInflight { max_inflight: 2 }
    );
    // A retry of an executing one is not a new execution.
    assert_eq!(s.begin_request(2), RequestDisposition::InFlight);
    s.complete_request(1, response(1));
    assert_eq!(s.begin_request(3), RequestDisposition::Execute);
    assert_eq!(s.stats().requests_in_flight, 2);
}

#[test]
fn completing_what_is_not_executing_is_reported_and_ignored() {
    let (mut s, _) = attached(cfg(), 0);
    assert_eq!(s.complete_request(1, response(1)), Completion::NotInFlight);
    assert_eq!(s.begin_request(1), RequestDisposition::Execute);
    assert_eq!(s.begin_request(5), RequestDisposition::Execute); // 1 leaves the window
    assert_eq!(s.complete_request(1, response(1)), Completion::OutOfWindow);
    assert_eq!(s.complete_request(5, response(5)), Completion::Stored);
    assert_eq!(s.complete_request(5, response(5)), Completion::NotInFlight);
    assert_eq!(s.stats().requests_cached, 1);
}

fn refusal(seq: u64, code: ErrorCode) -> ClientResponse {
    ClientResponse {
        seq_id: seq,
        code: code as i32,
        retry_after_ms: 100,
        ..ClientResponse::default()
    }
}

#[test]
fn a_refusal_before_any_upstream_is_not_recorded_so_the_retry_runs() {
    for code in [
        ErrorCode::Overloaded,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::UpstreamOverloaded,
        ErrorCode::TooManyInflight,
    ] {
        let (mut s, _) = attached(cfg(), 0);
        assert_eq!(s.begin_request(1), RequestDisposition::Execute);
        assert_eq!(
            s.complete_request(1, refusal(1, code)),
            Completion::NotExecuted,
            "{code:?}"
        );
        assert_eq!(s.stats().requests_in_flight, 0, "{code:?}");
        assert_eq!(s.stats().requests_cached, 0, "{code:?}");
        // The retry with the same seq runs, and its real answer is what is replayed.
        assert_eq!(s.begin_request(1), RequestDisposition::Execute, "{code:?}");
        assert_eq!(s.complete_request(1, response(1)), Completion::Stored);
        assert_eq!(s.begin_request(1), RequestDisposition::Cached(response(1)));
    }
}

#[test]
fn a_failure_that_may_have_executed_is_recorded() {
    for code in [
        ErrorCode::UpstreamTimeout,
        ErrorCode::UpstreamError,
        ErrorCode::Internal,
    ] {
        let (mut s, _) = attached(cfg(), 0);
        assert_eq!(s.begin_request(1), RequestDisposition::Execute);
        assert_eq!(s.complete_request(1, refusal(1, code)), Completion::Stored);
        assert_eq!(
            s.begin_request(1),
            RequestDisposition::Cached(refusal(1, code)),
            "{code:?}: replayed, never executed twice"
        );
    }
}
