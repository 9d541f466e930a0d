//! `GatewayFrame`s as the node encodes them: push results written with
//! fewer calls than prost's generated encoder makes.
//!
//! A `push_batch` of 64 pushes is answered by one `push_batch_result` of 64
//! `PushResult`s. prost encodes each result with a call per key and per
//! length (`encode_key`, `encode_varint` through `BufMut`) and computes each
//! result's length twice; that was ~7% of the node's instructions per
//! batched push (callgrind, docs/benchmarks.md session 11). [`OutFrame`]
//! writes `push_result` and `push_batch_result` bodies itself, byte for byte
//! as prost does (a test compares them), and leaves every other body to
//! prost.

use bytes::{Buf, BufMut};
use gatesvr_proto::upstream::gateway_frame::Body as Down;
use gatesvr_proto::upstream::{GatewayFrame, PushResult};
use prost::encoding::{DecodeContext, WireType, encoded_len_varint};
use prost::{DecodeError, Message};

/// A `GatewayFrame`, encoded as prost encodes it.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct OutFrame(pub GatewayFrame);

/// `GatewayFrame.body.push_result` (4) and `.push_batch_result` (7), both
/// length-delimited.
const PUSH_RESULT_KEY: u8 = 4 << 3 | 2;
const PUSH_BATCH_RESULT_KEY: u8 = 7 << 3 | 2;
/// `id` (1, varint) of both; `result` (2) / `results` (2), length-delimited.
const ID_KEY: u8 = 1 << 3;
const RESULT_KEY: u8 = 2 << 3 | 2;

/// Bytes of a field key and varint lengths, gathered before one `put_slice`.
struct Head {
    bytes: [u8; 48],
    len: usize,
}

impl Head {
    fn new() -> Self {
        Self {
            bytes: [0; 48],
            len: 0,
        }
    }

    fn key(&mut self, key: u8) {
        self.bytes[self.len] = key;
        self.len += 1;
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.bytes[self.len] = v as u8 | 0x80;
            self.len += 1;
            v >>= 7;
        }
        self.bytes[self.len] = v as u8;
        self.len += 1;
    }

    /// A length-delimited field's key and length (its bytes follow).
    fn text(&mut self, key: u8, text: &str) {
        self.key(key);
        self.varint(text.len() as u64);
    }

    /// Writes what was gathered. Callers flush before each 3 keys + lengths
    /// at most (33 bytes), so it never overflows.
    fn flush(&mut self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes[..self.len]);
        self.len = 0;
    }
}

fn text_len(text: &str) -> usize {
    if text.is_empty() {
        0
    } else {
        1 + encoded_len_varint(text.len() as u64) + text.len()
    }
}

/// `PushResult`'s encoded length (proto3: zero values left out).
fn result_len(r: &PushResult) -> usize {
    let seq = if r.seq_id == 0 {
        0
    } else {
        1 + encoded_len_varint(r.seq_id)
    };
    // int32: negative values are sign-extended to 64 bits.
    let code = if r.code == 0 {
        0
    } else {
        1 + encoded_len_varint(i64::from(r.code) as u64)
    };
    seq + text_len(&r.session_id) + text_len(&r.node_id) + code + text_len(&r.message)
}

/// One result as field 2 (`result`/`results`) of the enclosing message.
fn put_result(r: &PushResult, head: &mut Head, buf: &mut impl BufMut) {
    head.key(RESULT_KEY);
    head.varint(result_len(r) as u64);
    if r.seq_id != 0 {
        head.key(1 << 3);
        head.varint(r.seq_id);
    }
    if !r.session_id.is_empty() {
        head.text(2 << 3 | 2, &r.session_id);
        head.flush(buf);
        buf.put_slice(r.session_id.as_bytes());
    }
    if !r.node_id.is_empty() {
        head.text(3 << 3 | 2, &r.node_id);
        head.flush(buf);
        buf.put_slice(r.node_id.as_bytes());
    }
    if r.code != 0 {
        head.key(4 << 3);
        head.varint(i64::from(r.code) as u64);
    }
    if !r.message.is_empty() {
        head.text(5 << 3 | 2, &r.message);
        head.flush(buf);
        buf.put_slice(r.message.as_bytes());
    }
    head.flush(buf);
}

fn id_len(id: u64) -> usize {
    if id == 0 {
        0
    } else {
        1 + encoded_len_varint(id)
    }
}

/// Length of a `StreamPushResult` / `StreamPushBatchResult` body.
fn results_len<'a>(id: u64, results: impl Iterator<Item = &'a PushResult>) -> usize {
    id_len(id)
        + results
            .map(|r| {
                let len = result_len(r);
                1 + encoded_len_varint(len as u64) + len
            })
            .sum::<usize>()
}

/// Writes a body of `id` + results as `GatewayFrame` field `key`.
fn put_results<'a>(
    key: u8,
    id: u64,
    results: impl Iterator<Item = &'a PushResult> + Clone,
    buf: &mut impl BufMut,
) {
    let mut head = Head::new();
    head.key(key);
    head.varint(results_len(id, results.clone()) as u64);
    if id != 0 {
        head.key(ID_KEY);
        head.varint(id);
    }
    head.flush(buf);
    for r in results {
        put_result_gathered(r, &mut head, buf);
    }
    head.flush(buf);
}

/// [`put_result`] into a stack buffer, then one `put_slice` into `buf`
/// (each `put_slice` into tonic's buffer is a reserve and a copy), for
/// results that fit: every successful one (a seq, a session id, a node id).
/// Larger ones are written piece by piece.
fn put_result_gathered(r: &PushResult, head: &mut Head, buf: &mut impl BufMut) {
    let mut stack = [0u8; 160];
    let len = result_len(r);
    let whole = 1 + encoded_len_varint(len as u64) + len;
    if whole > stack.len() {
        return put_result(r, head, buf);
    }
    put_result(r, head, &mut &mut stack[..]);
    buf.put_slice(&stack[..whole]);
}

impl Message for OutFrame {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.0.body {
            Some(Down::PushBatchResult(b)) => {
                put_results(PUSH_BATCH_RESULT_KEY, b.id, b.results.iter(), buf)
            }
            Some(Down::PushResult(r)) => {
                put_results(PUSH_RESULT_KEY, r.id, r.result.iter(), buf)
            }
            _ => self.0.encode_raw(buf),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        self.0.merge_field(tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let body = match &self.0.body {
            Some(Down::PushBatchResult(b)) => results_len(b.id, b.results.iter()),
            Some(Down::PushResult(r)) => results_len(r.id, r.result.iter()),
            _ => return self.0.encoded_len(),
        };
        1 + encoded_len_varint(body as u64) + body
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatesvr_proto::upstream::{
        CancelRequest, StreamPushBatchResult, StreamPushResult, StreamRequest,
    };

    fn results() -> Vec<PushResult> {
        vec![
            PushResult::default(),
            PushResult {
                seq_id: 1,
                session_id: "0193c1f0-7d2e-7b4a-9c1e-5f6a7b8c9d0e".into(),
                node_id: "dp-1".into(),
                ..Default::default()
            },
            PushResult {
                seq_id: u64::MAX,
                session_id: "s".repeat(200),
                node_id: "n".into(),
                ..Default::default()
            },
            PushResult {
                code: 5,
                message: "no session for user-1".into(),
                ..Default::default()
            },
            PushResult {
                code: -1,
                message: "m".repeat(20_000),
                ..Default::default()
            },
        ]
    }

    fn frames() -> Vec<GatewayFrame> {
        let mut bodies = vec![
            Down::Cancel(CancelRequest { id: 3 }),
            Down::Request(StreamRequest {
                id: 4,
                timeout_ms: 10,
                request: None,
            }),
            Down::PushBatchResult(StreamPushBatchResult {
                id: 0,
                results: Vec::new(),
            }),
            Down::PushBatchResult(StreamPushBatchResult {
                id: 1 << 40,
                results: results(),
            }),
            Down::PushResult(StreamPushResult {
                id: 9,
                result: None,
            }),
        ];
        for (i, r) in results().into_iter().enumerate() {
            bodies.push(Down::PushResult(StreamPushResult {
                id: i as u64,
                result: Some(r),
            }));
        }
        bodies
            .into_iter()
            .map(|b| GatewayFrame { body: Some(b) })
            .chain([GatewayFrame { body: None }])
            .collect()
    }

    #[test]
    fn frames_are_byte_identical_to_prost() {
        for frame in frames() {
            let want = frame.encode_to_vec();
            let ours = OutFrame(frame.clone());
            assert_eq!(ours.encoded_len(), want.len(), "{frame:?}");
            assert_eq!(ours.encode_to_vec(), want, "{frame:?}");
            assert_eq!(GatewayFrame::decode(&want[..]).unwrap(), frame);
        }
    }
}
