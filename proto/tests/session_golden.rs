//! Golden bytes of `gatesvr.session.v1.SessionState`, the session handover
//! format. Two data-plane nodes of different versions exchange it during a
//! rolling upgrade, so its encoding must never change silently.
//!
//! These bytes should never be updated. A change that breaks this test breaks
//! handover between versions: add a field with a new number instead, and add
//! a new golden test for the new version next to this one.

use bytes::Bytes;
use gatesvr_proto::client::{ClientResponse, ErrorCode, ServerPush};
use gatesvr_proto::session::{CompletedRequest, SessionCounters, SessionState};
use prost::Message;

/// Every field set, so that renumbering or retyping any of them shows.
fn state_v1() -> SessionState {
    SessionState {
        session_id: "s-0001".into(),
        openid: "alice".into(),
        zone: "003".into(),
        epoch: 7,
        next_seq_id: 6,
        acked_seq_id: 2,
        trimmed_through_seq_id: 3,
        highest_sent_seq_id: 4,
        pushes: vec![
            ServerPush {
                seq_id: 4,
                msg_type: "chat".into(),
                content: "hi".into(),
                data: Bytes::from_static(&[0xde, 0xad]),
                created_at_ms: 1_700_000_000_000,
                redelivery: true,
            },
            ServerPush {
                seq_id: 5,
                msg_type: "chat".into(),
                content: "yo".into(),
                data: Bytes::new(),
                created_at_ms: 1_700_000_000_001,
                redelivery: false,
            },
        ],
        highest_request_seq_id: 9,
        completed_requests: vec![CompletedRequest {
            seq_id: 8,
            response: Some(ClientResponse {
                msg_id: 100,
                seq_id: 8,
                code: ErrorCode::UpstreamTimeout as i32,
                payload: vec![1, 2],
                message: "slow".into(),
                zone: "003".into(),
                app_code: -1,
                retry_after_ms: 250,
            }),
        }],
        unknown_outcome_request_seq_ids: vec![9],
        counters: Some(SessionCounters {
            pushes_total: 5,
            redelivered_total: 1,
            trimmed_total: 1,
            rejected_total: 2,
            retransmits_total: 3,
            stale_acks_total: 4,
            duplicate_requests_total: 6,
            attaches_total: 2,
        }),
        // Added in v2: a v1 node never sets it.
        replaces_session_id: String::new(),
        // Added in v3.
        replaces_status: 0,
    }
}

/// Written by the first version of the format; field by field.
const STATE_V1_HEX: &str = concat!(
    "0a06732d30303031",       // 1 session_id "s-0001"
    "1205616c696365",         // 2 openid "alice"
    "1a03303033",             // 3 zone "003"
    "2007",                   // 4 epoch 7
    "2806",                   // 5 next_seq_id 6
    "3002",                   // 6 acked_seq_id 2
    "3803",                   // 7 trimmed_through_seq_id 3
    "4004",                   // 8 highest_sent_seq_id 4
    "4a19",                   // 9 pushes[0], 25 bytes:
    "0804120463686174",       //   seq_id 4, msg_type "chat"
    "1a0268692202dead",       //   content "hi", data dead
    "2880d095ffbc313001",     //   created_at_ms 1700000000000, redelivery true
    "4a13",                   // 9 pushes[1], 19 bytes:
    "0805120463686174",       //   seq_id 5, msg_type "chat"
    "1a02796f",               //   content "yo" (empty data omitted)
    "2881d095ffbc31",         //   created_at_ms 1700000000001 (redelivery false omitted)
    "5009",                   // 10 highest_request_seq_id 9
    "5a27",                   // 11 completed_requests[0], 39 bytes:
    "08081223",               //   seq_id 8, response (35 bytes):
    "086410081809",           //     msg_id 100, seq_id 8, code UPSTREAM_TIMEOUT
    "220201022a04736c6f77",   //     payload 0102, message "slow"
    "3203303033",             //     zone "003"
    "38ffffffffffffffffff01", //     app_code -1
    "40fa01",                 //     retry_after_ms 250
    "620109",                 // 12 unknown_outcome_request_seq_ids [9] (packed)
    "6a10",                   // 13 counters, 16 bytes:
    "0805100118012002",       //   pushes 5, redelivered 1, trimmed 1, rejected 2
    "2803300438064002",       //   retransmits 3, stale acks 4, duplicate requests 6, attaches 2
);

#[test]
fn session_state_v1_encoding_is_frozen() {
    assert_eq!(hex::encode(state_v1().encode_to_vec()), STATE_V1_HEX);
}

#[test]
fn session_state_v1_bytes_still_decode() {
    let bytes = hex::decode(STATE_V1_HEX).expect("valid hex");
    let decoded = SessionState::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(decoded, state_v1());
}

/// v2 added field 14, `replaces_session_id` (a session rebuilt from a crashed
/// session's replicas names that session). v1 bytes decode with it empty
/// (above); a v1 node decoding v2 bytes skips it as an unknown field.
fn state_v2() -> SessionState {
    SessionState {
        replaces_session_id: "s-0000".into(),
        ..state_v1()
    }
}

/// v1's bytes followed by field 14.
fn state_v2_hex() -> String {
    format!(
        "{STATE_V1_HEX}{}",
        "7206732d30303030" // 14 replaces_session_id "s-0000"
    )
}

#[test]
fn session_state_v2_encoding_is_frozen() {
    assert_eq!(hex::encode(state_v2().encode_to_vec()), state_v2_hex());
}

#[test]
fn session_state_v2_bytes_still_decode() {
    let bytes = hex::decode(state_v2_hex()).expect("valid hex");
    let decoded = SessionState::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(decoded, state_v2());
}

/// v3 added field 15, `replaces_status`: a fresh session made by a resume
/// that failed names the session it stands in for and the status its client
/// was told. v2 bytes decode with it unset (RECOVERED for a non-empty field
/// 14, as v2 meant); a v2 node decoding v3 bytes skips it and takes the
/// session for a recovered one.
fn state_v3() -> SessionState {
    SessionState {
        replaces_status: gatesvr_proto::client::ResumeStatus::SessionExpired.into(),
        ..state_v2()
    }
}

#[test]
fn session_state_v3_encoding_is_frozen() {
    let hex = format!("{}{}", state_v2_hex(), "7802"); // 15 replaces_status SESSION_EXPIRED
    assert_eq!(hex::encode(state_v3().encode_to_vec()), hex);
    let decoded = SessionState::decode(hex::decode(&hex).unwrap().as_slice()).expect("decodes");
    assert_eq!(decoded, state_v3());
}
