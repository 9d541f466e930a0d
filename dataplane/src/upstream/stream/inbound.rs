//! `UpstreamFrame`s as the node decodes them: pushes without a `String` per
//! text field.
//!
//! [`InFrame`] has `UpstreamFrame`'s wire format. Its `push` (3) and
//! `push_batch` (7) bodies decode into [`InPush`]es, whose text stays in the
//! received buffer (`crate::gateway::wire`); every other body decodes with
//! prost's generated code, into [`Up`]. Malformed input fails as prost fails
//! it: the stream's `message()` returns the decode error as a status, and
//! the node ends the stream (docs/protocol.md §14.2).

use bytes::{Buf, BufMut};
use gatesvr_proto::upstream::upstream_frame::Body as Up;
use prost::encoding::{DecodeContext, WireType, message};
use prost::{DecodeError, Message};

use crate::gateway::wire::InPush;

/// `UpstreamFrame.body`'s field numbers decoded here (the rest are prost's).
const PUSH: u32 = 3;
const PUSH_BATCH: u32 = 7;

/// An `UpstreamFrame`.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct InFrame {
    pub body: Option<InBody>,
}

/// `UpstreamFrame.body`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum InBody {
    /// `push` (3).
    Push(InStreamPush),
    /// `push_batch` (7).
    PushBatch(InStreamPushBatch),
    /// Any other body, as prost decodes it (never `Up::Push` or
    /// `Up::PushBatch`: those are the two above).
    Other(Up),
}

/// `StreamPush`.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct InStreamPush {
    pub id: u64,
    pub push: Option<InPush>,
}

/// `StreamPushBatch`.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct InStreamPushBatch {
    pub id: u64,
    pub pushes: Vec<InPush>,
    pub codes_only: bool,
}

impl Message for InFrame {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.body {
            Some(InBody::Push(p)) => message::encode(PUSH, p, buf),
            Some(InBody::PushBatch(b)) => message::encode(PUSH_BATCH, b, buf),
            Some(InBody::Other(up)) => up.encode(buf),
            None => {}
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let named = |mut e: DecodeError| {
            e.push("UpstreamFrame", "body");
            e
        };
        // A oneof field seen again merges into the value it holds; another
        // field replaces it (as prost's generated code does).
        match tag {
            PUSH => {
                let mut push = match self.body.take() {
                    Some(InBody::Push(p)) => p,
                    _ => InStreamPush::default(),
                };
                merge_sliced(wire_type, &mut push, buf, ctx).map_err(named)?;
                self.body = Some(InBody::Push(push));
                Ok(())
            }
            PUSH_BATCH => {
                let mut batch = match self.body.take() {
                    Some(InBody::PushBatch(b)) => b,
                    _ => InStreamPushBatch::default(),
                };
                merge_sliced(wire_type, &mut batch, buf, ctx).map_err(named)?;
                self.body = Some(InBody::PushBatch(batch));
                Ok(())
            }
            1 | 2 | 4 | 5 | 6 => {
                let mut other = match self.body.take() {
                    Some(InBody::Other(up)) => Some(up),
                    _ => None,
                };
                Up::merge(&mut other, tag, wire_type, buf, ctx).map_err(named)?;
                self.body = other.map(InBody::Other);
                Ok(())
            }
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        match &self.body {
            Some(InBody::Push(p)) => message::encoded_len(PUSH, p),
            Some(InBody::PushBatch(b)) => message::encoded_len(PUSH_BATCH, b),
            Some(InBody::Other(up)) => up.encoded_len(),
            None => 0,
        }
    }

    fn clear(&mut self) {
        self.body = None;
    }
}

/// `message::merge`, run on a `Bytes` slice of the field rather than on
/// `buf` itself: one split of tonic's receive buffer for the whole field,
/// then every nested read is a cheap `Bytes` read, and every text field a
/// slice of it. Whatever prost would refuse (a wrong wire type, a length
/// past the end) is left to prost, on `buf`, so errors are its own.
fn merge_sliced<M: Message>(
    wire_type: WireType,
    msg: &mut M,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    let mut peek = buf.chunk();
    let before = peek.len();
    let whole = match prost::encoding::decode_varint(&mut peek) {
        Ok(len) if wire_type == WireType::LengthDelimited => usize::try_from(len)
            .ok()
            .and_then(|len| len.checked_add(before - peek.len())),
        // A wrong wire type, or a length cut at the end of this chunk.
        _ => None,
    };
    match whole {
        Some(n) if n <= buf.remaining() => {
            let mut field = buf.copy_to_bytes(n);
            message::merge(wire_type, msg, &mut field, ctx)
        }
        _ => message::merge(wire_type, msg, buf, ctx),
    }
}

impl Message for InStreamPush {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if self.id != 0 {
            prost::encoding::uint64::encode(1, &self.id, buf);
        }
        if let Some(p) = &self.push {
            message::encode(2, p, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => prost::encoding::uint64::merge(wire_type, &mut self.id, buf, ctx).map_err(
                |mut e| {
                    e.push("StreamPush", "id");
                    e
                },
            ),
            // A second `push` field merges into the first, as prost does.
            2 => match &mut self.push {
                Some(push) => message::merge(wire_type, push, buf, ctx),
                None => InPush::merge_received(wire_type, buf, ctx).map(|p| self.push = Some(p)),
            }
            .map_err(|mut e| {
                e.push("StreamPush", "push");
                e
            }),
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let id = if self.id != 0 {
            prost::encoding::uint64::encoded_len(1, &self.id)
        } else {
            0
        };
        id + self.push.as_ref().map_or(0, |p| message::encoded_len(2, p))
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

impl Message for InStreamPushBatch {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if self.id != 0 {
            prost::encoding::uint64::encode(1, &self.id, buf);
        }
        message::encode_repeated(2, &self.pushes, buf);
        if self.codes_only {
            prost::encoding::bool::encode(3, &self.codes_only, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => prost::encoding::uint64::merge(wire_type, &mut self.id, buf, ctx).map_err(
                |mut e| {
                    e.push("StreamPushBatch", "id");
                    e
                },
            ),
            2 => {
                let before = buf.remaining();
                InPush::merge_received(wire_type, buf, ctx).map(|p| {
                    if self.pushes.is_empty() {
                        // Room for as many pushes as the rest of the frame
                        // would hold at this one's size (a batch's pushes
                        // are alike), not a doubling per few pushes.
                        let size = (before - buf.remaining()).max(1);
                        let more = buf.remaining() / size;
                        self.pushes
                            .reserve(1 + more.min(super::MAX_PUSH_BATCH as usize));
                    }
                    self.pushes.push(p)
                })
            }
            .map_err(|mut e| {
                e.push("StreamPushBatch", "pushes");
                e
            }),
            3 => prost::encoding::bool::merge(wire_type, &mut self.codes_only, buf, ctx).map_err(
                |mut e| {
                    e.push("StreamPushBatch", "codes_only");
                    e
                },
            ),
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let id = if self.id != 0 {
            prost::encoding::uint64::encoded_len(1, &self.id)
        } else {
            0
        };
        let codes_only = if self.codes_only {
            prost::encoding::bool::encoded_len(3, &self.codes_only)
        } else {
            0
        };
        id + message::encoded_len_repeated(2, &self.pushes) + codes_only
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use gatesvr_proto::upstream::{
        Drain, PushToClientRequest, StreamHealth, StreamPush, StreamPushBatch, StreamResponse,
        UpstreamFrame, UpstreamHello,
    };

    fn push(i: u8) -> PushToClientRequest {
        PushToClientRequest {
            target_id: format!("user-{i}"),
            msg_type: "t".into(),
            data: Bytes::from(vec![i; 3]),
            ..Default::default()
        }
    }

    fn frames() -> Vec<UpstreamFrame> {
        let bodies = vec![
            Up::Hello(UpstreamHello {
                version: 1,
                service_name: "svc".into(),
                zone: "001".into(),
                max_requests_in_flight: 8,
                serving: true,
            }),
            Up::Response(StreamResponse {
                id: 4,
                not_executed: true,
                retry_after_ms: 10,
                ..Default::default()
            }),
            Up::Push(StreamPush {
                id: 9,
                push: Some(push(1)),
            }),
            Up::Push(StreamPush { id: 10, push: None }),
            Up::PushBatch(StreamPushBatch {
                id: 11,
                pushes: (0..5).map(push).collect(),
                codes_only: false,
            }),
            Up::PushBatch(StreamPushBatch {
                id: 12,
                pushes: (0..3).map(push).collect(),
                codes_only: true,
            }),
            Up::Health(StreamHealth { serving: false }),
            Up::Drain(Drain {
                reason: "bye".into(),
            }),
        ];
        bodies
            .into_iter()
            .map(|b| UpstreamFrame { body: Some(b) })
            .chain([UpstreamFrame { body: None }])
            .collect()
    }

    /// The generated type's body, rebuilt from ours.
    fn as_generated(frame: InFrame) -> UpstreamFrame {
        let body = frame.body.map(|b| match b {
            InBody::Push(p) => Up::Push(StreamPush {
                id: p.id,
                push: p.push.map(Into::into),
            }),
            InBody::PushBatch(b) => Up::PushBatch(StreamPushBatch {
                id: b.id,
                pushes: b.pushes.into_iter().map(Into::into).collect(),
                codes_only: b.codes_only,
            }),
            InBody::Other(up) => up,
        });
        UpstreamFrame { body }
    }

    #[test]
    fn every_body_decodes_as_prost_decodes_it() {
        for frame in frames() {
            let wire = frame.encode_to_vec();
            let ours = InFrame::decode(&wire[..]).unwrap();
            assert!(
                !matches!(
                    ours.body,
                    Some(InBody::Other(Up::Push(_) | Up::PushBatch(_)))
                ),
                "pushes take the borrowing decode"
            );
            assert_eq!(ours.encode_to_vec(), wire, "same bytes back");
            assert_eq!(as_generated(ours), frame);
        }
    }

    #[test]
    fn unknown_bodies_and_fields_are_ignored() {
        // Body field 20 (a newer upstream's frame), then nothing else.
        let wire = [0xa2, 0x01, 0x00];
        assert_eq!(InFrame::decode(&wire[..]).unwrap(), InFrame::default());
        // A push with an unknown field 9 inside.
        let mut inner = push(2).encode_to_vec();
        inner.extend_from_slice(&[0x48, 0x05]);
        let frame = UpstreamFrame {
            body: Some(Up::PushBatch(StreamPushBatch {
                id: 1,
                pushes: vec![push(2)],
                codes_only: false,
            })),
        };
        let mut wire = Vec::new();
        prost::encoding::encode_key(PUSH_BATCH, WireType::LengthDelimited, &mut wire);
        let batch_len = 2 + 1 + 1 + inner.len();
        prost::encoding::encode_varint(batch_len as u64, &mut wire);
        wire.extend_from_slice(&[0x08, 0x01, 0x12, inner.len() as u8]);
        wire.extend_from_slice(&inner);
        let ours = InFrame::decode(&wire[..]).unwrap();
        assert_eq!(as_generated(ours), frame);
    }

    #[test]
    fn malformed_frames_are_refused_as_prost_refuses_them() {
        // A push_batch whose second push has a target_id that is not UTF-8.
        let mut wire = UpstreamFrame {
            body: Some(Up::PushBatch(StreamPushBatch {
                id: 3,
                pushes: vec![push(1), push(2)],
                codes_only: false,
            })),
        }
        .encode_to_vec();
        let at = wire
            .windows(6)
            .rposition(|w| w == b"user-2")
            .expect("target_id present");
        wire[at] = 0xff;
        let ours = InFrame::decode(&wire[..]).unwrap_err();
        let prosts = UpstreamFrame::decode(&wire[..]).unwrap_err();
        assert!(ours.to_string().contains("not UTF-8"), "{ours}");
        assert!(prosts.to_string().contains("not UTF-8"), "{prosts}");
        assert!(ours.to_string().contains("target_id"), "{ours}");

        // Truncated in the middle of a push.
        let whole = frames()[2].encode_to_vec();
        let cut = &whole[..whole.len() - 2];
        assert!(InFrame::decode(cut).is_err());
        assert!(UpstreamFrame::decode(cut).is_err());
    }
}
