//! Client protocol framing, sans-IO.
//!
//! A frame is `varint(len) || Envelope` where `varint` is the protobuf base-128
//! varint (LEB128, at most 10 bytes) and `len` is the byte length of the
//! protobuf-encoded [`Envelope`]. This is what most protobuf libraries call
//! "length-delimited" (`writeDelimitedTo`, `encode_length_delimited`).
//!
//! ```text
//!  bytes on the stream:  | varint len | Envelope (len bytes) | varint len | Envelope | ...
//! ```
//!
//! [`FrameDecoder`] takes bytes as they arrive (any split) and yields whole
//! envelopes. It never buffers more than `max_frame_size` plus one length
//! prefix: a prefix announcing a larger frame is an error before its body
//! arrives, so a peer cannot make us allocate what it claims.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::client::{Envelope, ErrorCode};

/// Default and recommended maximum frame size: 1 MiB.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 1 << 20;

/// Longest valid varint length prefix.
const MAX_VARINT_LEN: usize = 10;

/// Why a byte stream is not a valid sequence of frames. After any of these the
/// stream is unusable: the peer gets an `Error` frame and the connection closes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than the negotiated maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: u64, max: usize },
    /// The length prefix is not a valid varint (over 10 bytes, or overflows u64).
    #[error("invalid varint length prefix")]
    BadLength,
    /// The frame body is not a valid `Envelope`.
    #[error("frame is not a valid Envelope: {0}")]
    Decode(String),
    /// The envelope decoded but carries no body.
    #[error("envelope has no body")]
    EmptyEnvelope,
}

impl FrameError {
    /// The protocol error code reported to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::BadLength | FrameError::Decode(_) | FrameError::EmptyEnvelope => {
                ErrorCode::BadFrame
            }
        }
    }
}

/// Appends one frame (length prefix + envelope) to `dst`.
pub fn encode(envelope: &Envelope, dst: &mut BytesMut) {
    let len = envelope.encoded_len();
    dst.reserve(len + MAX_VARINT_LEN);
    prost::encoding::encode_varint(len as u64, dst);
    // Encoding into a BytesMut with enough capacity reserved cannot fail
    // (BytesMut grows as needed).
    envelope
        .encode(dst)
        .expect("BytesMut has unbounded capacity");
}

/// One frame as a standalone buffer.
pub fn encode_to_bytes(envelope: &Envelope) -> Bytes {
    let mut buf = BytesMut::new();
    encode(envelope, &mut buf);
    buf.freeze()
}

/// Incremental frame decoder.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame_size: usize,
    failed: bool,
}

impl FrameDecoder {
    pub fn new(max_frame_size: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_frame_size,
            failed: false,
        }
    }

    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }

    /// Bytes received but not yet part of a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Feeds received bytes. Ignored once the decoder has failed.
    pub fn extend(&mut self, data: &[u8]) {
        if !self.failed {
            self.buf.put_slice(data);
        }
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    ///
    /// After an error every further call returns the same kind of error: a
    /// framing error desynchronises the stream for good.
    pub fn next_frame(&mut self) -> Result<Option<Envelope>, FrameError> {
        if self.failed {
            return Err(FrameError::BadLength);
        }
        let result = self.try_next();
        if result.is_err() {
            self.failed = true;
            self.buf.clear();
        }
        result
    }

    fn try_next(&mut self) -> Result<Option<Envelope>, FrameError> {
        let Some((len, prefix)) = peek_varint(&self.buf)? else {
            return Ok(None);
        };
        if len > self.max_frame_size as u64 {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_size,
            });
        }
        // len <= max_frame_size, which is a usize.
        let len = len as usize;
        if self.buf.len() < prefix + len {
            self.buf.reserve(prefix + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(prefix);
        let body = self.buf.split_to(len).freeze();
        let envelope = Envelope::decode(body).map_err(|e| FrameError::Decode(e.to_string()))?;
        if envelope.body.is_none() {
            return Err(FrameError::EmptyEnvelope);
        }
        Ok(Some(envelope))
    }
}

/// Reads a varint at the start of `buf` without consuming it:
/// `Some((value, prefix_len))`, or `None` if it is still incomplete.
fn peek_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, FrameError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        let bits = u64::from(byte & 0x7f);
        if i == MAX_VARINT_LEN - 1 && byte > 1 {
            return Err(FrameError::BadLength);
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= MAX_VARINT_LEN {
        return Err(FrameError::BadLength);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ClientAck, HeartbeatRequest, envelope::Body};
    use proptest::prelude::*;

    fn ack(seq: u64) -> Envelope {
        Envelope {
            body: Some(Body::Ack(ClientAck { acked_seq_id: seq })),
        }
    }

    #[test]
    fn round_trip_split_anywhere() {
        let frames = [
            ack(1),
            ack(u64::MAX),
            Envelope {
                body: Some(Body::Heartbeat(HeartbeatRequest {
                    client_timestamp: -5,
                })),
            },
        ];
        let mut wire = BytesMut::new();
        for f in &frames {
            encode(f, &mut wire);
        }
        for split in 0..wire.len() {
            let mut dec = FrameDecoder::new(64);
            dec.extend(&wire[..split]);
            let mut got = Vec::new();
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
            dec.extend(&wire[split..]);
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got, frames, "split at {split}");
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn oversized_prefix_rejected_before_body() {
        let mut dec = FrameDecoder::new(16);
        let mut prefix = BytesMut::new();
        prost::encoding::encode_varint(17, &mut prefix);
        dec.extend(&prefix);
        assert_eq!(
            dec.next_frame(),
            Err(FrameError::TooLarge { len: 17, max: 16 })
        );
        assert_eq!(dec.next_frame().unwrap_err().code(), ErrorCode::BadFrame);
    }

    #[test]
    fn overlong_varint_rejected() {
        let mut dec = FrameDecoder::new(16);
        dec.extend(&[0xff; 11]);
        assert_eq!(dec.next_frame(), Err(FrameError::BadLength));
    }

    #[test]
    fn empty_envelope_rejected() {
        let mut dec = FrameDecoder::new(16);
        dec.extend(&[0x00]);
        assert_eq!(dec.next_frame(), Err(FrameError::EmptyEnvelope));
    }

    #[test]
    fn garbage_body_rejected() {
        let mut dec = FrameDecoder::new(16);
        // length 2, then a field with wire type 7 (invalid).
        dec.extend(&[0x02, 0x0f, 0x00]);
        assert!(matches!(dec.next_frame(), Err(FrameError::Decode(_))));
    }

    proptest! {
        /// Arbitrary bytes never panic and never make the decoder buffer more
        /// than one frame plus one prefix.
        #[test]
        fn arbitrary_input_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut dec = FrameDecoder::new(128);
            for chunk in chunks {
                dec.extend(&chunk);
                while let Ok(Some(env)) = dec.next_frame() {
                    prop_assert!(env.body.is_some());
                }
                prop_assert!(dec.buffered() <= 128 + MAX_VARINT_LEN + 64);
            }
        }

        #[test]
        fn any_ack_round_trips(seq in any::<u64>()) {
            let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE);
            dec.extend(&encode_to_bytes(&ack(seq)));
            prop_assert_eq!(dec.next_frame().unwrap(), Some(ack(seq)));
        }
    }
}
