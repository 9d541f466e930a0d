//! Fuzzes the client frame decoder (`gatesvr_proto::frame::FrameDecoder`) and
//! envelope handling with byte streams split at arbitrary points.
//!
//! Input layout: `[chunk size] [stream bytes...]`. The stream is fed to the
//! decoder `chunk size` bytes at a time (0 = the whole stream in one call),
//! draining every complete frame after each chunk, as the data plane does.
//!
//! Invariants checked:
//! - nothing panics (decoding, error codes, re-encoding);
//! - `buffered()` never exceeds `max_frame_size + 10 (longest prefix) + chunk`;
//! - every decoded envelope has a body;
//! - once `next_frame` has returned an error, every later call errors too and
//!   nothing more is buffered;
//! - the outcome (frames, then the error if any, and what stays buffered) does
//!   not depend on how the stream was split;
//! - every decoded envelope re-encodes (`frame::encode`) to a frame that decodes
//!   to an equal envelope, and re-encoding is stable.
#![no_main]

use bytes::BytesMut;
use gatesvr_proto::client::Envelope;
use gatesvr_proto::frame::{self, DEFAULT_MAX_FRAME_SIZE, FrameDecoder, FrameError};
use libfuzzer_sys::fuzz_target;

/// Maximum frame size under test: small so that inputs reach it.
const MAX_FRAME: usize = 4096;
/// Longest varint length prefix.
const MAX_PREFIX: usize = 10;

/// What a decoder made of a whole stream.
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Envelope>,
    error: Option<FrameError>,
    buffered: usize,
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = match chunk {
        0 => stream.len().max(1),
        n => usize::from(n),
    };

    let split = decode(stream, chunk);
    for envelope in &split.frames {
        round_trip(envelope);
    }

    // The same stream in one piece gives the same result.
    if chunk < stream.len() {
        let whole = decode(stream, stream.len());
        assert_eq!(split, whole, "outcome depends on the split (chunk {chunk})");
    }
});

/// Feeds `stream` in `chunk`-byte pieces, checking the decoder's invariants.
fn decode(stream: &[u8], chunk: usize) -> Outcome {
    let mut dec = FrameDecoder::new(MAX_FRAME);
    assert_eq!(dec.max_frame_size(), MAX_FRAME);
    let mut frames = Vec::new();
    let mut error: Option<FrameError> = None;

    for piece in stream.chunks(chunk) {
        dec.extend(piece);
        if error.is_some() {
            // Failed: input is ignored and every call keeps erroring.
            assert_eq!(dec.buffered(), 0, "failed decoder buffered input");
            assert!(dec.next_frame().is_err(), "Ok after an error");
            continue;
        }
        loop {
            let bound = MAX_FRAME + MAX_PREFIX + piece.len();
            assert!(
                dec.buffered() <= bound,
                "buffered {} > {bound}",
                dec.buffered()
            );
            match dec.next_frame() {
                Ok(Some(envelope)) => {
                    assert!(envelope.body.is_some(), "decoded envelope without body");
                    frames.push(envelope);
                }
                Ok(None) => break,
                Err(e) => {
                    check_error(&e);
                    error = Some(e);
                    break;
                }
            }
        }
        // Between chunks at most one incomplete frame (prefix + partial body) remains.
        assert!(
            dec.buffered() < MAX_FRAME + MAX_PREFIX,
            "buffered {} after draining",
            dec.buffered()
        );
    }

    if error.is_some() {
        assert_eq!(dec.buffered(), 0);
        for _ in 0..2 {
            let e = dec.next_frame().expect_err("Ok after an error");
            let _ = e.code();
            let _ = e.to_string();
        }
        dec.extend(b"\x02\x42\x00");
        assert!(dec.next_frame().is_err(), "recovered after an error");
        assert_eq!(dec.buffered(), 0);
    } else {
        // Drained: another call without new bytes yields nothing.
        assert_eq!(dec.next_frame(), Ok(None));
    }

    Outcome {
        frames,
        error,
        buffered: dec.buffered(),
    }
}

fn check_error(e: &FrameError) {
    let _ = e.code();
    let _ = e.to_string();
    match e {
        FrameError::TooLarge { len, max } => {
            assert_eq!(*max, MAX_FRAME);
            assert!(*len > MAX_FRAME as u64, "TooLarge for {len} bytes");
        }
        FrameError::BadLength | FrameError::Decode(_) | FrameError::EmptyEnvelope => {}
    }
}

/// A decoded envelope re-encodes to a frame that decodes to an equal envelope.
fn round_trip(envelope: &Envelope) {
    let mut wire = BytesMut::new();
    frame::encode(envelope, &mut wire);
    assert_eq!(frame::encode_to_bytes(envelope), wire.as_ref());

    // Re-encoding is canonical and may be longer than the original bytes
    // (e.g. a short non-canonical varint), so decode without the small limit.
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE);
    dec.extend(&wire);
    let back = dec
        .next_frame()
        .expect("re-encoded envelope does not decode")
        .expect("re-encoded envelope is not a whole frame");
    assert_eq!(&back, envelope, "round trip changed the envelope");
    assert_eq!(dec.buffered(), 0, "re-encoded frame has trailing bytes");
    assert_eq!(dec.next_frame(), Ok(None));

    // Stable: encoding the decoded copy gives the same bytes.
    assert_eq!(frame::encode_to_bytes(&back), wire.as_ref());
}
