//! A push's payload, encoded once and shared.
//!
//! A `ServerPush` on the wire is `seq_id (1) | msg_type (2) | content (3) |
//! data (4) | created_at_ms (5) | redelivery (6)`. Fields 2..=5 are the same
//! for every session a broadcast reaches and for every retransmit, so they
//! are encoded once into a [`PushBody`] (reference-counted `Bytes`): one
//! 4 MiB broadcast to N sessions holds one 4 MiB buffer, not N. Only the
//! per-session seq and the redelivery flag are encoded at send time, around
//! the shared bytes, in field order: the frame is byte for byte what prost
//! would encode for the whole `ServerPush` (a unit test checks it).

use bytes::{BufMut, Bytes, BytesMut};
use gatesvr_proto::client::ServerPush;
use prost::Message;
use prost::encoding::encoded_len_varint;

use super::PushMessage;

/// `Envelope.push` is field 7, length-delimited: key `7 << 3 | 2`.
const ENVELOPE_PUSH_KEY: u8 = 0x3a;
/// `ServerPush.seq_id` is field 1, varint: key `1 << 3 | 0`.
const SEQ_KEY: u8 = 0x08;
/// `ServerPush.redelivery` is field 6, varint: key `6 << 3 | 0`.
const REDELIVERY_KEY: u8 = 0x30;
/// Least a write buffer grows by when a frame does not fit (bytes): about
/// one QUIC datagram.
const MIN_GROWTH: usize = 1200;

/// Appends `v` as a protobuf varint.
fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Writes `v` as a protobuf varint into `buf` from `at`; returns the end.
/// `buf` has room: a varint is at most 10 bytes, and callers size for it.
fn put_varint(buf: &mut [u8], mut at: usize, mut v: u64) -> usize {
    while v >= 0x80 {
        buf[at] = v as u8 | 0x80;
        v >>= 7;
        at += 1;
    }
    buf[at] = v as u8;
    at + 1
}

/// Fields 2..=5 of a `ServerPush`, protobuf-encoded. Cloning shares them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PushBody(Bytes);

impl PushBody {
    /// Encodes a push's payload.
    pub fn encode(msg: &PushMessage) -> Self {
        Self::encode_fields(
            msg.msg_type.as_bytes(),
            msg.content.as_bytes(),
            &msg.data,
            msg.created_at_ms,
        )
    }

    /// Encodes a push's payload from borrowed fields: one copy of each, into
    /// the shared buffer (no `ServerPush` built on the way). `msg_type` and
    /// `content` are UTF-8 (`string` fields); the caller checked them.
    pub fn encode_fields(msg_type: &[u8], content: &[u8], data: &[u8], created_at_ms: i64) -> Self {
        use prost::encoding::int64;
        // Proto3 leaves zero-valued fields out (seq 0 and redelivery false
        // too): exactly fields 2..=5, byte for byte as prost encodes them.
        let mut len = 0;
        if !msg_type.is_empty() {
            len += 1 + encoded_len_varint(msg_type.len() as u64) + msg_type.len();
        }
        if !content.is_empty() {
            len += 1 + encoded_len_varint(content.len() as u64) + content.len();
        }
        if !data.is_empty() {
            len += 1 + encoded_len_varint(data.len() as u64) + data.len();
        }
        if created_at_ms != 0 {
            len += int64::encoded_len(5, &created_at_ms);
        }
        // Keys and lengths written as bytes here: prost's `encode_key` and
        // `encode_varint` are calls through `BufMut`, per byte, and were most
        // of this function's instructions (callgrind, docs/benchmarks.md
        // session 11).
        let mut out = Vec::with_capacity(len);
        for (key, field) in [(0x12, msg_type), (0x1a, content), (0x22, data)] {
            if !field.is_empty() {
                out.push(key);
                push_varint(&mut out, field.len() as u64);
                out.extend_from_slice(field);
            }
        }
        if created_at_ms != 0 {
            // int64: the two's complement as a varint (10 bytes if negative).
            out.push(0x28);
            push_varint(&mut out, created_at_ms as u64);
        }
        Self(Bytes::from(out))
    }

    /// Bytes held (what `max_queue_bytes` counts).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if both hold the same buffer (not merely equal bytes).
    pub fn shares(&self, other: &PushBody) -> bool {
        self.0.as_ptr() == other.0.as_ptr() && self.0.len() == other.0.len()
    }

    /// True for a push with no type, content, data or timestamp.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Length of the `ServerPush` message carrying this body.
    fn push_len(&self, seq_id: u64, redelivery: bool) -> usize {
        let seq = if seq_id == 0 {
            0
        } else {
            1 + encoded_len_varint(seq_id)
        };
        let again = if redelivery { 2 } else { 0 };
        seq + self.0.len() + again
    }

    /// Length of the `Envelope` carrying this body as a push: what the
    /// client's frame limit (`max_frame_size`) bounds.
    pub fn envelope_len(&self, seq_id: u64, redelivery: bool) -> usize {
        let push = self.push_len(seq_id, redelivery);
        1 + encoded_len_varint(push as u64) + push
    }

    /// The largest envelope this body can ever travel in (any seq, redelivered).
    pub fn max_envelope_len(&self) -> usize {
        self.envelope_len(u64::MAX, true)
    }

    /// Appends the whole frame (`varint(len) || Envelope{push}`) to `out`.
    pub fn encode_frame(&self, seq_id: u64, redelivery: bool, out: &mut BytesMut) {
        let push = self.push_len(seq_id, redelivery);
        let envelope = self.envelope_len(seq_id, redelivery);
        // The header (frame length, envelope key, push length, seq) is built
        // on the stack and appended in one copy: at most 1 + 10 + 1 + 10 +
        // 1 + 10 bytes.
        let mut stack = [0u8; 36];
        let mut at = 0;
        at = put_varint(&mut stack, at, envelope as u64);
        stack[at] = ENVELOPE_PUSH_KEY;
        at = put_varint(&mut stack, at + 1, push as u64);
        if seq_id != 0 {
            stack[at] = SEQ_KEY;
            at = put_varint(&mut stack, at + 1, seq_id);
        }
        let need = at + self.0.len() + 2;
        if out.capacity() - out.len() < need {
            // Grown by at least a datagram's worth: a write gathers several
            // pushes, and growing one push at a time reallocated (and
            // copied) the buffer ~4 times per write.
            out.reserve(need.max(MIN_GROWTH));
        }
        out.put_slice(&stack[..at]);
        out.put_slice(&self.0);
        if redelivery {
            out.put_slice(&[REDELIVERY_KEY, 1]);
        }
    }

    /// The push as a message (handover export, tests).
    pub fn to_push(&self, seq_id: u64, redelivery: bool) -> ServerPush {
        // The bytes were produced by `encode` or `from_push`: they decode.
        let mut push = ServerPush::decode(self.0.clone()).unwrap_or_default();
        push.seq_id = seq_id;
        push.redelivery = redelivery;
        push
    }

    /// The body of an imported push (seq and redelivery dropped).
    pub fn from_push(push: &ServerPush) -> Self {
        Self::encode(&PushMessage {
            msg_type: push.msg_type.clone(),
            content: push.content.clone(),
            data: push.data.clone(),
            created_at_ms: push.created_at_ms,
        })
    }
}

impl From<PushMessage> for PushBody {
    fn from(msg: PushMessage) -> Self {
        Self::encode(&msg)
    }
}

impl From<&PushMessage> for PushBody {
    fn from(msg: &PushMessage) -> Self {
        Self::encode(msg)
    }
}

/// A push ready to write on the attached connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingPush {
    pub seq_id: u64,
    /// This seq was sent before (retransmit, resume, handover).
    pub redelivery: bool,
    pub body: PushBody,
}

impl OutgoingPush {
    /// Appends the frame to `out`.
    pub fn encode_frame(&self, out: &mut BytesMut) {
        self.body.encode_frame(self.seq_id, self.redelivery, out);
    }

    /// The push as a message.
    pub fn to_push(&self) -> ServerPush {
        self.body.to_push(self.seq_id, self.redelivery)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatesvr_proto::client::{Envelope, envelope::Body};

    fn msg(content: &str, data: &'static [u8]) -> PushMessage {
        PushMessage {
            msg_type: "chat".into(),
            content: content.into(),
            data: Bytes::from_static(data),
            created_at_ms: 1_700_000_000_123,
        }
    }

    /// The frame built around the shared body is exactly prost's encoding of
    /// the whole push, for every seq width and both redelivery values.
    #[test]
    fn frames_are_byte_identical_to_prost() {
        for m in [
            msg("", b""),
            msg("héllo", b"\x00\x01"),
            PushMessage::default(),
            // Lengths of 3 varint bytes (frame, envelope, data).
            PushMessage {
                data: Bytes::from(vec![9u8; 20_000]),
                created_at_ms: -1,
                ..msg("x", b"")
            },
        ] {
            let body = PushBody::encode(&m);
            for seq in [0, 1, 127, 128, 300, 1 << 35, u64::MAX] {
                for redelivery in [false, true] {
                    let push = body.to_push(seq, redelivery);
                    assert_eq!(push.content, m.content);
                    let mut want = BytesMut::new();
                    gatesvr_proto::frame::encode(
                        &Envelope {
                            body: Some(Body::Push(push)),
                        },
                        &mut want,
                    );
                    let mut got = BytesMut::new();
                    body.encode_frame(seq, redelivery, &mut got);
                    assert_eq!(got, want, "seq {seq} redelivery {redelivery}");
                    let prefix = encoded_len_varint(body.envelope_len(seq, redelivery) as u64);
                    assert_eq!(got.len(), prefix + body.envelope_len(seq, redelivery));
                    assert!(body.envelope_len(seq, redelivery) <= body.max_envelope_len());
                }
            }
        }
    }

    /// A write buffer grows by a datagram's worth at least: a dozen small
    /// pushes go into it with one allocation, not one per doubling.
    #[test]
    fn a_write_of_small_pushes_allocates_once() {
        let body = PushBody::encode(&msg("hi", &[1u8; 64]));
        let mut out = BytesMut::new();
        body.encode_frame(1, false, &mut out);
        let room = out.capacity();
        assert!(room >= MIN_GROWTH, "grew to {room} bytes for one frame");
        for seq in 2..=12 {
            body.encode_frame(seq, false, &mut out);
        }
        assert!(out.len() <= room, "{} bytes", out.len());
        assert_eq!(out.capacity(), room, "the buffer grew again");
    }

    /// The hand-written encoder is prost's encoding of fields 2..=5.
    #[test]
    fn encoded_fields_are_prosts() {
        for (t, c, d, at) in [
            ("", "", &b""[..], 0),
            ("chat", "héllo", &b"\x00\x01"[..], 1_700_000_000_123),
            ("", "x", &[7u8; 300][..], -5),
        ] {
            let want = ServerPush {
                seq_id: 0,
                msg_type: t.into(),
                content: c.into(),
                data: Bytes::copy_from_slice(d),
                created_at_ms: at,
                redelivery: false,
            }
            .encode_to_vec();
            assert_eq!(
                PushBody::encode_fields(t.as_bytes(), c.as_bytes(), d, at).0,
                want
            );
        }
    }

    #[test]
    fn clones_share_the_encoded_bytes() {
        let body = PushBody::encode(&msg(&"x".repeat(4096), b""));
        let copy = body.clone();
        assert_eq!(body.0.as_ptr(), copy.0.as_ptr());
    }
}
