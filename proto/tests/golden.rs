//! Golden bytes of the client protocol. Deployed clients depend on these exact
//! encodings: these vectors must NEVER be updated to make a change pass. A
//! failure here means the change breaks wire compatibility. The same bytes are
//! quoted in docs/protocol.md.

use gatesvr_proto::client::{
    ClientAck, ClientRequest, Envelope, ErrorCode, HeartbeatRequest, ServerPush, StartRequest,
    envelope::Body,
};
use gatesvr_proto::frame::{FrameDecoder, encode_to_bytes};

fn frame(body: Body) -> String {
    hex::encode(encode_to_bytes(&Envelope { body: Some(body) }))
}

fn cases() -> Vec<(&'static str, Body, &'static str)> {
    vec![
        (
            "start",
            Body::Start(StartRequest {
                openid: "alice".into(),
                auth_token: "t".into(),
                last_acked_seq_id: 7,
                session_id: "s1".into(),
                ..Default::default()
            }),
            "120a100a05616c696365120174180722027331",
        ),
        (
            "heartbeat",
            Body::Heartbeat(HeartbeatRequest {
                client_timestamp: 1_700_000_000_000,
            }),
            "091a070880d095ffbc31",
        ),
        (
            "request",
            Body::Request(ClientRequest {
                msg_id: 1,
                seq_id: 2,
                payload: b"hi".to_vec(),
                ..Default::default()
            }),
            "0a2a080801100222026869",
        ),
        (
            "ack",
            Body::Ack(ClientAck { acked_seq_id: 300 }),
            "05420308ac02",
        ),
        (
            "push",
            Body::Push(ServerPush {
                seq_id: 1,
                msg_type: "chat".into(),
                content: "yo".into(),
                ..Default::default()
            }),
            "0e3a0c08011204636861741a02796f",
        ),
        (
            "error",
            Body::Error(gatesvr_proto::client::Error {
                code: ErrorCode::Unauthenticated as i32,
                message: "no".into(),
                retry_after_ms: 0,
                fatal: true,
            }),
            "0a5a08080412026e6f2001",
        ),
    ]
}

#[test]
fn client_frames_encode_to_golden_bytes() {
    // Cross-checked against an independent hand encoder of the protobuf wire format.
    for (name, body, hex) in cases() {
        let want: String = hex.chars().filter(|c| !c.is_whitespace()).collect();
        assert_eq!(frame(body), want, "{name}");
    }
}

#[test]
fn golden_bytes_decode_back() {
    for (name, body, hex) in cases() {
        let want: String = hex.chars().filter(|c| !c.is_whitespace()).collect();
        let mut dec = FrameDecoder::new(1024);
        dec.extend(&hex::decode(want).unwrap());
        let got = dec.next_frame().unwrap().unwrap();
        assert_eq!(got.body, Some(body), "{name}");
    }
}

#[test]
fn error_codes_are_frozen() {
    // Values clients switch on; append new codes, never renumber.
    let frozen = [
        (ErrorCode::Ok, 0),
        (ErrorCode::BadFrame, 1),
        (ErrorCode::FrameTooLarge, 2),
        (ErrorCode::ProtocolViolation, 3),
        (ErrorCode::Unauthenticated, 4),
        (ErrorCode::TokenExpired, 5),
        (ErrorCode::OpenidMismatch, 6),
        (ErrorCode::SeqOutOfWindow, 7),
        (ErrorCode::Overloaded, 8),
        (ErrorCode::UpstreamTimeout, 9),
        (ErrorCode::UpstreamUnavailable, 10),
        (ErrorCode::UpstreamError, 11),
        (ErrorCode::UpstreamOverloaded, 12),
        (ErrorCode::SlowConsumer, 13),
        (ErrorCode::SessionReplaced, 14),
        (ErrorCode::HeartbeatTimeout, 15),
        (ErrorCode::AckTimeout, 16),
        (ErrorCode::Draining, 17),
        (ErrorCode::Internal, 18),
        (ErrorCode::SessionClosed, 19),
        (ErrorCode::StartTimeout, 20),
        (ErrorCode::TooManyInflight, 21),
    ];
    for (code, value) in frozen {
        assert_eq!(code as i32, value, "{code:?}");
    }
}
