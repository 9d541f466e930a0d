//! Pushes as they arrive, their text kept in the received frame.
//!
//! prost decodes every protobuf `string` into a `String` of its own: for a
//! push that is one allocation and one copy for each of `target_id`,
//! `msg_type` and `content`, made only to be read once while the push is
//! queued. An [`InPush`] decoded from an upstream's stream
//! ([`InPush::merge_received`]) holds instead one slice of the received
//! buffer (one reference count, no copy) and where each field lies in it,
//! checked as UTF-8 when decoded. Input the fast decoder does not accept is
//! decoded again by prost, so a malformed push is refused with prost's own
//! error ("invalid string value: data is not UTF-8 encoded", with the field's
//! name) and anything prost accepts is accepted.
//!
//! The wire format is `PushToClientRequest`'s, field for field; unknown
//! fields are skipped, as prost skips them. `PushBatch` calls convert their
//! decoded `String`s without copying ([`From<PushToClientRequest>`]).

use bytes::{Buf, BufMut, Bytes};
use gatesvr_proto::upstream::PushToClientRequest;
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

/// A `PushToClientRequest` as received: same fields, same wire format.
#[derive(Clone, Default)]
pub struct InPush {
    /// `TargetType`: openid (0) or session id (1).
    pub target_type: i32,
    /// Replicate before answering OK.
    pub durable: bool,
    text: Text,
}

/// Where `InPush`'s text and data are.
#[derive(Clone)]
enum Text {
    /// In a received push's encoding (`raw`), at these ranges; the three
    /// strings checked as UTF-8.
    Received { raw: Bytes, spans: [Span; 4] },
    /// Taken over from a decoded `PushToClientRequest`.
    Owned {
        target_id: String,
        msg_type: String,
        content: String,
        data: Bytes,
    },
}

impl Default for Text {
    fn default() -> Self {
        Text::Received {
            raw: Bytes::new(),
            spans: [Span::default(); 4],
        }
    }
}

/// A byte range of `Text::Received::raw`.
#[derive(Clone, Copy, Default)]
struct Span {
    start: u32,
    end: u32,
}

/// Indices into `Text::Received::spans`.
const TARGET_ID: usize = 0;
const MSG_TYPE: usize = 1;
const CONTENT: usize = 2;
const DATA: usize = 3;

impl InPush {
    /// Decodes a length-delimited push (a field of `buf`): one slice of
    /// `buf` (no copy when `buf` is a received `Bytes`), its fields located
    /// in place.
    pub fn merge_received(
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<Self, DecodeError> {
        // The field's length, then one slice of `buf`: prost's
        // `bytes::merge` took two (`copy_to_bytes` of a `Take`), ~125
        // instructions a push under callgrind against ~55 this way. What it
        // would refuse is left to it, so errors are its own.
        let mut peek = buf.chunk();
        let before = peek.len();
        let field = match prost::encoding::decode_varint(&mut peek) {
            Ok(len) if wire_type == WireType::LengthDelimited => usize::try_from(len)
                .ok()
                .map(|len| (before - peek.len(), len)),
            // A wrong wire type, or a length cut at the end of this chunk.
            _ => None,
        };
        let raw = match field {
            Some((prefix, len))
                if prefix
                    .checked_add(len)
                    .is_some_and(|n| n <= buf.remaining()) =>
            {
                buf.advance(prefix);
                buf.copy_to_bytes(len)
            }
            _ => {
                let mut raw = Bytes::new();
                prost::encoding::bytes::merge(wire_type, &mut raw, buf, ctx.clone())?;
                raw
            }
        };
        Self::received(raw, ctx)
    }

    /// Decodes an encoded `PushToClientRequest` held in `raw`.
    pub fn received(raw: Bytes, ctx: DecodeContext) -> Result<Self, DecodeError> {
        match locate(&raw, ctx.clone()) {
            Some((target_type, durable, spans)) => Ok(Self {
                target_type,
                durable,
                text: Text::Received { raw, spans },
            }),
            // Malformed, or a form this decoder leaves to prost: prost's
            // answer, its error included.
            None => PushToClientRequest::decode(raw).map(Self::from),
        }
    }

    /// The openid or session id. A received one is checked as UTF-8 again
    /// on each call (~60 instructions for a short id under callgrind): read
    /// it once per push; [`has_target`](Self::has_target) does not check.
    pub fn target_id(&self) -> &str {
        self.text(TARGET_ID)
    }

    /// The target's bytes, not checked again (as [`target_id`](Self::target_id)
    /// is): to compare targets.
    pub fn target_bytes(&self) -> &[u8] {
        self.bytes(TARGET_ID)
    }

    /// True if the push names its target.
    pub fn has_target(&self) -> bool {
        !self.bytes(TARGET_ID).is_empty()
    }

    /// `msg_type`'s UTF-8 bytes.
    pub fn msg_type(&self) -> &[u8] {
        self.bytes(MSG_TYPE)
    }

    /// `content`'s UTF-8 bytes.
    pub fn content(&self) -> &[u8] {
        self.bytes(CONTENT)
    }

    /// The payload.
    pub fn data(&self) -> &[u8] {
        self.bytes(DATA)
    }

    /// Field `i`'s bytes (UTF-8 for the text fields).
    fn bytes(&self, i: usize) -> &[u8] {
        match &self.text {
            Text::Received { raw, spans } => {
                let Span { start, end } = spans[i];
                &raw[start as usize..end as usize]
            }
            Text::Owned {
                target_id,
                msg_type,
                content,
                data,
            } => match i {
                TARGET_ID => target_id.as_bytes(),
                MSG_TYPE => msg_type.as_bytes(),
                CONTENT => content.as_bytes(),
                _ => data,
            },
        }
    }

    fn text(&self, i: usize) -> &str {
        match &self.text {
            Text::Owned {
                target_id,
                msg_type,
                content,
                ..
            } => match i {
                TARGET_ID => target_id,
                MSG_TYPE => msg_type,
                _ => content,
            },
            // Checked as UTF-8 when decoded (`locate`): this never falls
            // back.
            Text::Received { .. } => std::str::from_utf8(self.bytes(i)).unwrap_or_default(),
        }
    }
}

/// The fields of an encoded `PushToClientRequest`: (target_type, durable,
/// spans), or None for anything but a well-formed push whose every field
/// has its own wire type (prost then decides).
fn locate(raw: &[u8], ctx: DecodeContext) -> Option<(i32, bool, [Span; 4])> {
    let mut buf = raw;
    let mut target_type = 0;
    let mut durable = false;
    let mut spans = [Span::default(); 4];
    while buf.has_remaining() {
        // The usual field first: a one-byte key (every tag here is below 16)
        // and a one-byte length or value (a short id, type or payload). Read
        // in place, it cost ~40% fewer instructions per push (callgrind,
        // session 27) than prost's general reads, which take every other
        // field below.
        if let [key, n, rest @ ..] = buf
            && (key | n) < 0x80
        {
            let (key, n) = (*key, usize::from(*n));
            let slot = match (u32::from(key >> 3), key & 7) {
                (tag::TARGET_TYPE, 0) => {
                    target_type = n as i32;
                    buf = rest;
                    continue;
                }
                (tag::DURABLE, 0) => {
                    durable = n != 0;
                    buf = rest;
                    continue;
                }
                (tag::TARGET_ID, 2) => Some(TARGET_ID),
                (tag::MSG_TYPE, 2) => Some(MSG_TYPE),
                (tag::CONTENT, 2) => Some(CONTENT),
                (tag::DATA, 2) => Some(DATA),
                _ => None,
            };
            if let Some(slot) = slot {
                (spans[slot], buf) = field_span(raw, rest, n, slot)?;
                continue;
            }
        }
        let (tag, wire_type) = prost::encoding::decode_key(&mut buf).ok()?;
        let slot = match tag {
            tag::TARGET_TYPE | tag::DURABLE => {
                if wire_type != WireType::Varint {
                    return None;
                }
                let v = prost::encoding::decode_varint(&mut buf).ok()?;
                if tag == tag::DURABLE {
                    durable = v != 0;
                } else {
                    target_type = v as i32;
                }
                continue;
            }
            tag::TARGET_ID => TARGET_ID,
            tag::MSG_TYPE => MSG_TYPE,
            tag::CONTENT => CONTENT,
            tag::DATA => DATA,
            _ => {
                prost::encoding::skip_field(wire_type, tag, &mut buf, ctx.clone()).ok()?;
                continue;
            }
        };
        if wire_type != WireType::LengthDelimited {
            return None;
        }
        let len = usize::try_from(prost::encoding::decode_varint(&mut buf).ok()?).ok()?;
        (spans[slot], buf) = field_span(raw, buf, len, slot)?;
    }
    Some((target_type, durable, spans))
}

/// Field `slot` of the push in `raw`: the first `len` bytes of `at`, a tail
/// of `raw`. Its span, and the rest of `at` after it; None if it runs past
/// the end, or if it is text and not UTF-8.
#[inline]
fn field_span<'a>(raw: &[u8], at: &'a [u8], len: usize, slot: usize) -> Option<(Span, &'a [u8])> {
    if len > at.len() {
        return None;
    }
    let (field, rest) = at.split_at(len);
    if slot != DATA && !field.is_ascii() && std::str::from_utf8(field).is_err() {
        return None;
    }
    let start = raw.len() - at.len();
    // A push is at most a gRPC message (far below 4 GiB).
    let span = Span {
        start: u32::try_from(start).ok()?,
        end: u32::try_from(start + len).ok()?,
    };
    Some((span, rest))
}

impl PartialEq for InPush {
    fn eq(&self, other: &Self) -> bool {
        self.target_type == other.target_type
            && self.durable == other.durable
            && (0..4).all(|i| self.bytes(i) == other.bytes(i))
    }
}

impl Eq for InPush {}

impl std::fmt::Debug for InPush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InPush")
            .field("target_type", &self.target_type)
            .field("target_id", &self.target_id())
            .field("msg_type", &self.text(MSG_TYPE))
            .field("content", &self.text(CONTENT))
            .field("data", &self.data().len())
            .field("durable", &self.durable)
            .finish()
    }
}

impl From<PushToClientRequest> for InPush {
    fn from(p: PushToClientRequest) -> Self {
        Self {
            target_type: p.target_type,
            durable: p.durable,
            text: Text::Owned {
                target_id: p.target_id,
                msg_type: p.msg_type,
                content: p.content,
                data: p.data,
            },
        }
    }
}

impl From<InPush> for PushToClientRequest {
    fn from(p: InPush) -> Self {
        let (target_id, msg_type, content, data) = match p.text {
            Text::Owned {
                target_id,
                msg_type,
                content,
                data,
            } => (target_id, msg_type, content, data),
            Text::Received { ref raw, spans } => {
                let Span { start, end } = spans[DATA];
                (
                    p.text(TARGET_ID).to_owned(),
                    p.text(MSG_TYPE).to_owned(),
                    p.text(CONTENT).to_owned(),
                    raw.slice(start as usize..end as usize),
                )
            }
        };
        Self {
            target_type: p.target_type,
            target_id,
            msg_type,
            content,
            data,
            durable: p.durable,
        }
    }
}

/// `PushToClientRequest`'s field numbers.
mod tag {
    pub const TARGET_TYPE: u32 = 1;
    pub const TARGET_ID: u32 = 2;
    pub const MSG_TYPE: u32 = 3;
    pub const CONTENT: u32 = 5;
    pub const DATA: u32 = 6;
    pub const DURABLE: u32 = 7;
}

/// Encodes as `PushToClientRequest`. Decoding field by field (prost's
/// generic path, not the upstream stream's) goes through that type.
impl Message for InPush {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        use prost::encoding::{bool, int32};
        if self.target_type != 0 {
            int32::encode(tag::TARGET_TYPE, &self.target_type, buf);
        }
        for (i, tag) in [
            (TARGET_ID, tag::TARGET_ID),
            (MSG_TYPE, tag::MSG_TYPE),
            (CONTENT, tag::CONTENT),
            (DATA, tag::DATA),
        ] {
            let bytes = self.bytes(i);
            if !bytes.is_empty() {
                prost::encoding::encode_key(tag, WireType::LengthDelimited, buf);
                prost::encoding::encode_varint(bytes.len() as u64, buf);
                buf.put_slice(bytes);
            }
        }
        if self.durable {
            bool::encode(tag::DURABLE, &self.durable, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut p = PushToClientRequest::from(std::mem::take(self));
        let merged = p.merge_field(tag, wire_type, buf, ctx);
        *self = p.into();
        merged
    }

    fn encoded_len(&self) -> usize {
        use prost::encoding::{bool, int32};
        let mut len = 0;
        if self.target_type != 0 {
            len += int32::encoded_len(tag::TARGET_TYPE, &self.target_type);
        }
        for (i, tag) in [
            (TARGET_ID, tag::TARGET_ID),
            (MSG_TYPE, tag::MSG_TYPE),
            (CONTENT, tag::CONTENT),
            (DATA, tag::DATA),
        ] {
            let n = self.bytes(i).len();
            if n > 0 {
                len += prost::encoding::key_len(tag)
                    + prost::encoding::encoded_len_varint(n as u64)
                    + n;
            }
        }
        if self.durable {
            len += bool::encoded_len(tag::DURABLE, &self.durable);
        }
        len
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatesvr_proto::upstream::TargetType;
    use proptest::prelude::*;

    fn sample() -> PushToClientRequest {
        PushToClientRequest {
            target_type: TargetType::Session as i32,
            target_id: "s-1".into(),
            msg_type: "chat".into(),
            content: "héllo".into(),
            data: Bytes::from_static(b"\x00\x01\x02"),
            durable: true,
        }
    }

    fn received(wire: &[u8]) -> Result<InPush, DecodeError> {
        InPush::received(Bytes::copy_from_slice(wire), DecodeContext::default())
    }

    #[test]
    fn decodes_and_encodes_as_prost_does() {
        let wire = sample().encode_to_vec();
        let push = received(&wire).unwrap();
        assert_eq!(push.target_id(), "s-1");
        assert_eq!(push.content(), "héllo".as_bytes());
        assert_eq!(push.data(), b"\x00\x01\x02");
        assert!(push.durable);
        assert_eq!(push.encoded_len(), wire.len());
        assert_eq!(push.encode_to_vec(), wire);
        assert_eq!(PushToClientRequest::from(push), sample());
        // Defaults (all fields absent) both ways.
        let empty = PushToClientRequest::default().encode_to_vec();
        assert_eq!(received(&empty).unwrap(), InPush::default());
        assert_eq!(InPush::default().encode_to_vec(), empty);
        // prost's generic path (field by field) decodes the same push.
        assert_eq!(InPush::decode(&wire[..]).unwrap(), received(&wire).unwrap());
    }

    #[test]
    fn a_received_push_is_a_slice_of_the_frame() {
        // The push as a length-delimited field of a frame, and a field after it.
        let push = sample().encode_to_vec();
        let mut frame = Vec::new();
        prost::encoding::encode_varint(push.len() as u64, &mut frame);
        frame.extend(&push);
        frame.extend([0x18, 0x01]);
        let frame = Bytes::from(frame);
        let mut rest = frame.clone();
        let push = InPush::merge_received(
            WireType::LengthDelimited,
            &mut rest,
            DecodeContext::default(),
        )
        .unwrap();
        assert_eq!(&rest[..], [0x18, 0x01], "reads the push's bytes, no more");
        let inside = frame.as_ptr_range();
        for field in [
            push.target_id().as_ptr(),
            push.msg_type().as_ptr(),
            push.data().as_ptr(),
        ] {
            assert!(inside.contains(&field), "a field copied out of the frame");
        }
        assert_eq!(PushToClientRequest::from(push), sample());
    }

    #[test]
    fn a_big_payload_is_located_not_copied() {
        // 4 MiB of data (the gRPC message limit allows 16 MiB), and text after it.
        let big = PushToClientRequest {
            target_id: "user-big".into(),
            msg_type: "blob".into(),
            data: Bytes::from(vec![7u8; 4 << 20]),
            durable: true,
            ..Default::default()
        };
        let mut wire = big.encode_to_vec();
        wire.extend(
            PushToClientRequest {
                content: "after".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let wire = Bytes::from(wire);
        let push = InPush::received(wire.clone(), DecodeContext::default()).unwrap();
        assert_eq!(push.data().len(), 4 << 20);
        assert!(wire.as_ptr_range().contains(&push.data().as_ptr()));
        assert_eq!(push.content(), b"after");
        assert_eq!(push.target_id(), "user-big");
        assert!(push.durable);
    }

    #[test]
    fn strings_are_taken_over_not_copied() {
        let p = sample();
        let (id, data) = (p.target_id.as_ptr(), p.data.as_ptr());
        let push = InPush::from(p);
        assert_eq!(push.target_id().as_ptr(), id);
        let back = PushToClientRequest::from(push);
        assert_eq!(back.target_id.as_ptr(), id);
        assert_eq!(back.data.as_ptr(), data);
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut wire = sample().encode_to_vec();
        // Field 15, varint 1 (a newer upstream's field).
        wire.extend_from_slice(&[0x78, 0x01]);
        let push = received(&wire).unwrap();
        assert_eq!(PushToClientRequest::from(push), sample());
    }

    /// Ours and prost's answer to `wire`: the same push or the same error.
    fn same_as_prost(wire: &[u8]) -> Result<(), TestCaseError> {
        match (received(wire), PushToClientRequest::decode(wire)) {
            (Ok(ours), Ok(prosts)) => prop_assert_eq!(PushToClientRequest::from(ours), prosts),
            (Err(ours), Err(prosts)) => prop_assert_eq!(ours.to_string(), prosts.to_string()),
            (ours, prosts) => prop_assert!(false, "ours {:?}, prost's {:?}", ours, prosts),
        }
        Ok(())
    }

    #[test]
    fn malformed_input_is_refused_as_prost_refuses_it() {
        // `msg_type` (3) that is not UTF-8.
        let mut bad = PushToClientRequest {
            target_id: "u".into(),
            ..Default::default()
        }
        .encode_to_vec();
        bad.extend_from_slice(&[0x1a, 0x02, 0xc3, 0x28]);
        let ours = received(&bad).unwrap_err().to_string();
        assert!(ours.contains("not UTF-8"), "{ours}: names the cause");
        assert!(ours.contains("msg_type"), "{ours}: names the field");
        same_as_prost(&bad).unwrap();
        // Truncated: a length past the end.
        same_as_prost(&[0x12, 0x05, b'a']).unwrap();
        // A string field sent with the varint wire type.
        assert!(received(&[0x10, 0x01]).is_err());
        same_as_prost(&[0x10, 0x01]).unwrap();
        // A varint field sent length-delimited.
        same_as_prost(&[0x08, 0x01, 0x00]).unwrap();
    }

    /// A field of a `PushToClientRequest`, well-formed or not.
    fn field() -> impl Strategy<Value = Vec<u8>> {
        let text = prop_oneof![
            "[a-z0-9é-]{0,12}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..6),
        ];
        prop_oneof![
            (1u32..=8, text).prop_map(|(tag, v)| {
                let mut out = Vec::new();
                prost::encoding::encode_key(tag, WireType::LengthDelimited, &mut out);
                prost::encoding::encode_varint(v.len() as u64, &mut out);
                out.extend(v);
                out
            }),
            (1u32..=8, any::<u64>()).prop_map(|(tag, v)| {
                let mut out = Vec::new();
                prost::encoding::encode_key(tag, WireType::Varint, &mut out);
                prost::encoding::encode_varint(v, &mut out);
                out
            }),
            proptest::collection::vec(any::<u8>(), 1..4),
        ]
    }

    /// A well-formed field: each of ours with its own wire type and any
    /// length (one- and two-byte lengths), or an unknown one (one- and
    /// two-byte keys) of any wire type.
    fn good_field() -> impl Strategy<Value = Vec<u8>> {
        use prost::encoding::{encode_key, encode_varint};
        let text = (
            prop_oneof![
                Just(tag::TARGET_ID),
                Just(tag::MSG_TYPE),
                Just(tag::CONTENT)
            ],
            "[a-z0-9é]{0,200}".prop_map(String::into_bytes),
        );
        let data = (
            Just(tag::DATA),
            proptest::collection::vec(any::<u8>(), 0..300),
        );
        let length_delimited = prop_oneof![text, data].prop_map(|(tag, v)| {
            let mut out = Vec::new();
            encode_key(tag, WireType::LengthDelimited, &mut out);
            encode_varint(v.len() as u64, &mut out);
            out.extend(v);
            out
        });
        let varint = (
            prop_oneof![Just(tag::TARGET_TYPE), Just(tag::DURABLE)],
            any::<u64>(),
        )
            .prop_map(|(tag, v)| {
                let mut out = Vec::new();
                encode_key(tag, WireType::Varint, &mut out);
                encode_varint(v, &mut out);
                out
            });
        let unknown_tag = (4u32..40).prop_filter("not ours", |t| *t == 4 || *t > 7);
        let unknown =
            (unknown_tag, 0usize..4, any::<u64>(), 0usize..140).prop_map(|(tag, kind, v, len)| {
                let mut out = Vec::new();
                match kind {
                    0 => {
                        encode_key(tag, WireType::Varint, &mut out);
                        encode_varint(v, &mut out);
                    }
                    1 => {
                        encode_key(tag, WireType::SixtyFourBit, &mut out);
                        out.extend(v.to_le_bytes());
                    }
                    2 => {
                        encode_key(tag, WireType::ThirtyTwoBit, &mut out);
                        out.extend(&v.to_le_bytes()[..4]);
                    }
                    _ => {
                        encode_key(tag, WireType::LengthDelimited, &mut out);
                        encode_varint(len as u64, &mut out);
                        out.extend(std::iter::repeat_n(7u8, len));
                    }
                }
                out
            });
        prop_oneof![length_delimited, varint, unknown]
    }

    proptest! {
        /// A well-formed push is located in place (never left to prost), and
        /// what is located is what prost decodes.
        #[test]
        fn well_formed_pushes_are_located_as_prost_decodes_them(
            fields in proptest::collection::vec(good_field(), 0..8),
        ) {
            let wire = fields.concat();
            let prosts = PushToClientRequest::decode(&wire[..]).unwrap();
            let located = locate(&wire, DecodeContext::default());
            prop_assert!(located.is_some(), "left to prost: {:?}", wire);
            let (target_type, durable, spans) = located.unwrap();
            let ours = InPush {
                target_type,
                durable,
                text: Text::Received { raw: Bytes::from(wire), spans },
            };
            prop_assert_eq!(PushToClientRequest::from(ours), prosts);
        }

        /// A push as a field of a frame (its length, then its bytes), cut
        /// anywhere and followed by anything, with any wire type: taken as
        /// prost's `bytes::merge` takes it (the same bytes, the same rest,
        /// or an error where it has one).
        #[test]
        fn a_push_field_is_taken_as_prost_takes_it(
            fields in proptest::collection::vec(field(), 0..4),
            len_delta in -3i64..3,
            tail in proptest::collection::vec(any::<u8>(), 0..6),
            cut in any::<prop::sample::Index>(),
            length_delimited in any::<bool>(),
        ) {
            let push = fields.concat();
            let mut frame = Vec::new();
            let len = (push.len() as i64 + len_delta).max(0) as u64;
            prost::encoding::encode_varint(len, &mut frame);
            frame.extend(&push);
            frame.extend(&tail);
            let frame = Bytes::from(frame);
            let frame = frame.slice(..cut.index(frame.len() + 1));
            let wire_type = if length_delimited {
                WireType::LengthDelimited
            } else {
                WireType::Varint
            };
            let mut theirs_rest = frame.clone();
            let mut theirs = Bytes::new();
            let taken = prost::encoding::bytes::merge(
                wire_type,
                &mut theirs,
                &mut theirs_rest,
                DecodeContext::default(),
            );
            let mut ours_rest = frame.clone();
            let ours = InPush::merge_received(wire_type, &mut ours_rest, DecodeContext::default());
            match taken {
                Err(e) => prop_assert_eq!(ours.err().map(|e| e.to_string()), Some(e.to_string())),
                Ok(()) => {
                    prop_assert_eq!(&ours_rest, &theirs_rest);
                    let theirs = InPush::received(theirs, DecodeContext::default());
                    prop_assert_eq!(ours.map_err(|e| e.to_string()), theirs.map_err(|e| e.to_string()));
                }
            }
        }

        /// Any sequence of fields, and any cut of it, decodes as prost
        /// decodes it.
        #[test]
        fn decodes_whatever_prost_decodes_the_same_way(
            fields in proptest::collection::vec(field(), 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let wire = fields.concat();
            same_as_prost(&wire)?;
            same_as_prost(&wire[..cut.index(wire.len() + 1)])?;
        }
    }
}
