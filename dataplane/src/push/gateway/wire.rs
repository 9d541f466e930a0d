//! Pushes as they arrive, their text kept in the received frame.
//!
//! prost decodes every protobuf `string` into a `String` of its own: for a
//! push that is one allocation and one copy for each of `target_id`,
//! `msg_type` and `content`, made only to be read once while the push is
//! queued. [`InPush`] holds the same fields as [`PushToClientRequest`], with
//! the text as [`WireStr`]: slices of the buffer the frame was received in
//! (reference-counted, no copy), checked as UTF-8 when decoded, so malformed
//! input is refused as prost refuses it (a `DecodeError`, "invalid string
//! value: data is not UTF-8 encoded").
//!
//! The wire format is `PushToClientRequest`'s, field for field; unknown
//! fields are skipped, as prost skips them. `upstream::stream` decodes the
//! pushes of an upstream's stream straight into these; `PushBatch` calls
//! convert their `String`s without copying ([`From<PushToClientRequest>`]).

use bytes::{Buf, BufMut, Bytes};
use gatesvr_proto::upstream::PushToClientRequest;
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

/// A protobuf `string` field: a slice of a received buffer, checked as UTF-8
/// when it was decoded, or a `String` taken over as it is (a `PushBatch`
/// call's fields, decoded by prost).
#[derive(Clone)]
pub struct WireStr(Repr);

#[derive(Clone)]
enum Repr {
    Received(Bytes),
    Owned(String),
}

impl Default for WireStr {
    fn default() -> Self {
        Self(Repr::Received(Bytes::new()))
    }
}

impl WireStr {
    /// The text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Owned(s) => s,
            // Checked as UTF-8 when decoded (`merge`) or built
            // (`From<&'static str>`): this never falls back.
            Repr::Received(b) => std::str::from_utf8(b).unwrap_or_default(),
        }
    }

    /// The UTF-8 bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Owned(s) => s.as_bytes(),
            Repr::Received(b) => b,
        }
    }

    /// True for the empty string.
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }

    /// True if the text is a slice of a received buffer (not copied).
    pub fn is_received(&self) -> bool {
        matches!(self.0, Repr::Received(_))
    }

    /// Decodes a length-delimited `string` field, sliced out of `buf`
    /// (`Buf::copy_to_bytes`: no copy when `buf` is tonic's receive buffer).
    fn merge(
        &mut self,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut bytes = Bytes::new();
        prost::encoding::bytes::merge(wire_type, &mut bytes, buf, ctx.clone())?;
        // ASCII (every id and type in practice) is checked in a few
        // instructions; anything else by the full UTF-8 check.
        if !bytes.is_ascii() && std::str::from_utf8(&bytes).is_err() {
            return Err(invalid_utf8(ctx));
        }
        self.0 = Repr::Received(bytes);
        Ok(())
    }

    fn encode(&self, tag: u32, buf: &mut impl BufMut) {
        let bytes = self.as_bytes();
        if !bytes.is_empty() {
            prost::encoding::encode_key(tag, WireType::LengthDelimited, buf);
            prost::encoding::encode_varint(bytes.len() as u64, buf);
            buf.put_slice(bytes);
        }
    }

    fn encoded_len(&self, tag: u32) -> usize {
        let len = self.as_bytes().len();
        if len == 0 {
            0
        } else {
            prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(len as u64) + len
        }
    }
}

/// prost's own error for a `string` field that is not UTF-8 (its decoder
/// run on such a field), so this decode refuses what prost refuses, in the
/// same words.
#[cold]
fn invalid_utf8(ctx: DecodeContext) -> DecodeError {
    // Length 1, byte 0xff: never UTF-8.
    let mut field: &[u8] = &[0x01, 0xff];
    match prost::encoding::string::merge(
        WireType::LengthDelimited,
        &mut String::new(),
        &mut field,
        ctx,
    ) {
        Err(e) => e,
        Ok(()) => unreachable!("0xff is never UTF-8"),
    }
}

impl From<String> for WireStr {
    fn from(s: String) -> Self {
        // Kept as it is: no copy, no allocation.
        Self(Repr::Owned(s))
    }
}

impl From<&'static str> for WireStr {
    fn from(s: &'static str) -> Self {
        Self(Repr::Received(Bytes::from_static(s.as_bytes())))
    }
}

impl From<WireStr> for String {
    fn from(s: WireStr) -> Self {
        match s.0 {
            Repr::Owned(s) => s,
            Repr::Received(_) => s.as_str().to_owned(),
        }
    }
}

impl PartialEq for WireStr {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for WireStr {}

impl std::hash::Hash for WireStr {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::fmt::Debug for WireStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for WireStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `PushToClientRequest` as received: same fields, same wire format, the
/// text not copied out of the frame.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct InPush {
    /// `TargetType`: openid (0) or session id (1).
    pub target_type: i32,
    /// The openid or session id.
    pub target_id: WireStr,
    pub msg_type: WireStr,
    pub content: WireStr,
    pub data: Bytes,
    /// Replicate before answering OK.
    pub durable: bool,
}

impl From<PushToClientRequest> for InPush {
    fn from(p: PushToClientRequest) -> Self {
        Self {
            target_type: p.target_type,
            target_id: p.target_id.into(),
            msg_type: p.msg_type.into(),
            content: p.content.into(),
            data: p.data,
            durable: p.durable,
        }
    }
}

impl From<InPush> for PushToClientRequest {
    fn from(p: InPush) -> Self {
        Self {
            target_type: p.target_type,
            target_id: p.target_id.into(),
            msg_type: p.msg_type.into(),
            content: p.content.into(),
            data: p.data,
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

/// Names the field in a decode error, as prost's generated code does.
fn at(field: &'static str) -> impl FnOnce(DecodeError) -> DecodeError {
    move |mut e| {
        e.push("PushToClientRequest", field);
        e
    }
}

impl Message for InPush {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        use prost::encoding::{bool, bytes, int32};
        if self.target_type != 0 {
            int32::encode(tag::TARGET_TYPE, &self.target_type, buf);
        }
        self.target_id.encode(tag::TARGET_ID, buf);
        self.msg_type.encode(tag::MSG_TYPE, buf);
        self.content.encode(tag::CONTENT, buf);
        if !self.data.is_empty() {
            bytes::encode(tag::DATA, &self.data, buf);
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
        use prost::encoding::{bool, bytes, int32, skip_field};
        match tag {
            tag::TARGET_TYPE => {
                int32::merge(wire_type, &mut self.target_type, buf, ctx).map_err(at("target_type"))
            }
            tag::TARGET_ID => self
                .target_id
                .merge(wire_type, buf, ctx)
                .map_err(at("target_id")),
            tag::MSG_TYPE => self
                .msg_type
                .merge(wire_type, buf, ctx)
                .map_err(at("msg_type")),
            tag::CONTENT => self
                .content
                .merge(wire_type, buf, ctx)
                .map_err(at("content")),
            tag::DATA => bytes::merge(wire_type, &mut self.data, buf, ctx).map_err(at("data")),
            tag::DURABLE => {
                bool::merge(wire_type, &mut self.durable, buf, ctx).map_err(at("durable"))
            }
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        use prost::encoding::{bool, bytes, int32};
        let mut len = 0;
        if self.target_type != 0 {
            len += int32::encoded_len(tag::TARGET_TYPE, &self.target_type);
        }
        len += self.target_id.encoded_len(tag::TARGET_ID);
        len += self.msg_type.encoded_len(tag::MSG_TYPE);
        len += self.content.encoded_len(tag::CONTENT);
        if !self.data.is_empty() {
            len += bytes::encoded_len(tag::DATA, &self.data);
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

    #[test]
    fn decodes_and_encodes_as_prost_does() {
        let wire = sample().encode_to_vec();
        let push = InPush::decode(Bytes::from(wire.clone())).unwrap();
        assert_eq!(push.target_id.as_str(), "s-1");
        assert_eq!(push.content.as_str(), "héllo");
        assert_eq!(push.encode_to_vec(), wire);
        assert_eq!(PushToClientRequest::from(push), sample());
        // Defaults (all fields absent) both ways.
        let empty = PushToClientRequest::default().encode_to_vec();
        assert_eq!(InPush::decode(&empty[..]).unwrap(), InPush::default());
        assert_eq!(InPush::default().encode_to_vec(), empty);
    }

    #[test]
    fn text_is_sliced_from_the_received_buffer() {
        let wire = Bytes::from(sample().encode_to_vec());
        let push = InPush::decode(wire.clone()).unwrap();
        let inside = wire.as_ptr_range();
        assert!(push.target_id.is_received());
        assert!(inside.contains(&push.target_id.as_bytes().as_ptr()));
        assert!(inside.contains(&push.msg_type.as_bytes().as_ptr()));
        assert!(inside.contains(&push.data.as_ptr()));
    }

    #[test]
    fn strings_are_taken_over_not_copied() {
        let s = String::from("user-1");
        let at = s.as_ptr();
        let w = WireStr::from(s);
        assert!(!w.is_received());
        assert_eq!(w.as_bytes().as_ptr(), at);
        let back = String::from(w);
        assert_eq!(back.as_ptr(), at);
        assert_eq!(
            WireStr::from("user-1"),
            WireStr::from(String::from("user-1"))
        );
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut wire = sample().encode_to_vec();
        // Field 15, varint 1 (a newer upstream's field).
        wire.extend_from_slice(&[0x78, 0x01]);
        let push = InPush::decode(&wire[..]).unwrap();
        assert_eq!(PushToClientRequest::from(push), sample());
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
        let ours = InPush::decode(&bad[..]).unwrap_err();
        let prosts = PushToClientRequest::decode(&bad[..]).unwrap_err();
        assert_eq!(ours.to_string(), prosts.to_string());
        assert!(
            ours.to_string().contains("not UTF-8"),
            "{ours}: names the cause"
        );
        assert!(
            ours.to_string().contains("msg_type"),
            "{ours}: names the field"
        );

        // Truncated: a length past the end.
        let cut = [0x12, 0x05, b'a'];
        let ours = InPush::decode(&cut[..]).unwrap_err();
        let prosts = PushToClientRequest::decode(&cut[..]).unwrap_err();
        assert_eq!(ours.to_string(), prosts.to_string());

        // A string field sent with the varint wire type.
        let wrong = [0x10, 0x01];
        assert!(InPush::decode(&wrong[..]).is_err());
        assert!(PushToClientRequest::decode(&wrong[..]).is_err());
    }
}
