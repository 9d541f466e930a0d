//! What carries a client session's frames: native QUIC, WebTransport or
//! WebSocket, behind one small interface.
//!
//! The session logic in [`crate::connection`] is the same for every transport.
//! It sees a [`Link`]: a [`FrameSource`] of decoded frames, a [`FrameSink`]
//! that takes encoded frames (varint length + Envelope, docs/protocol.md §2),
//! and a way to end the connection with a protocol error code. The registry
//! keeps a [`ConnectionHandle`] to close the connection from outside its task
//! (SESSION_REPLACED, SLOW_CONSUMER, drain).
//!
//! ```text
//!  native QUIC   (ALPN gatesvr/1) ── one bidi stream: varint frames ──┐
//!  WebTransport  (ALPN h3)        ── one bidi stream: varint frames ──┼─> Link ─> connection::serve
//!  WebSocket     (TLS over TCP)   ── one binary message per frame ───┘
//! ```
//!
//! Every write has a deadline (`server.write_timeout`, `FrameSink::write`):
//! a client that stops reading (no QUIC flow-control credit, a full TCP
//! window) gets `WriteError::Deadline`, and the connection is closed with
//! SLOW_CONSUMER, freeing its task, buffers and connection slot.
//!
//! Closing differs by transport. A QUIC connection carries the error code in
//! its CONNECTION_CLOSE, so the handle closes it at once. A browser cannot
//! read a QUIC close code, so for WebTransport and WebSocket the handle asks
//! the connection's task to send an `Error{code, fatal}` frame first; the
//! WebSocket close frame then carries `4000 + code`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::{Buf, BytesMut};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use gatesvr_proto::client::{Envelope, ErrorCode};
use gatesvr_proto::frame::{FrameDecoder, FrameError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// The HTTP path of the WebSocket and WebTransport endpoints.
pub const WEB_PATH: &str = "/gatesvr/v1";

/// WebSocket close codes are `WS_CLOSE_BASE + ErrorCode` (4000..4999 are
/// private-use codes, RFC 6455 §7.4.2).
pub const WS_CLOSE_BASE: u16 = 4000;

/// Most bytes read from a QUIC stream at once (quinn hands over its own
/// buffers: nothing is held while waiting).
const READ_CHUNK: usize = 64 * 1024;

/// Bytes read at once from a WebTransport stream (a buffer of ours).
const STREAM_READ_BUFFER: usize = 4 * 1024;

/// The node's `max_connections` budget, shared by every transport.
pub(crate) fn connection_slots(o: &crate::config::OverloadConfig) -> Arc<tokio::sync::Semaphore> {
    let limit = if o.enabled {
        o.max_connections
    } else {
        tokio::sync::Semaphore::MAX_PERMITS
    };
    Arc::new(tokio::sync::Semaphore::new(limit))
}

/// How a client reached the node; the `transport` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // WebTransport is the protocol's name
pub enum Transport {
    Quic,
    WebTransport,
    WebSocket,
}

impl Transport {
    pub const ALL: [Transport; 3] = [
        Transport::Quic,
        Transport::WebTransport,
        Transport::WebSocket,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::WebTransport => "webtransport",
            Transport::WebSocket => "websocket",
        }
    }
}

/// Closes a client connection from outside its task.
#[derive(Clone)]
pub struct ConnectionHandle(Closer);

#[derive(Clone)]
enum Closer {
    /// Native QUIC: CONNECTION_CLOSE carries the code.
    Quic(quinn::Connection),
    /// WebTransport and WebSocket: the task sends an Error frame, then closes.
    Task(Arc<CloseRequest>),
}

impl ConnectionHandle {
    /// Closes the connection with application error `code` (an [`ErrorCode`]
    /// value) and `reason`. Takes QUIC's shape (`quinn::VarInt` converts) so
    /// callers read the same for every transport.
    pub fn close(&self, code: impl Into<u64>, reason: &[u8]) {
        let code = code.into();
        match &self.0 {
            Closer::Quic(conn) => conn.close(
                quinn::VarInt::from_u64(code).unwrap_or(quinn::VarInt::MAX),
                reason,
            ),
            Closer::Task(request) => request.request(code, reason),
        }
    }
}

/// A close asked of a connection's task: the first request wins.
#[derive(Default)]
pub(crate) struct CloseRequest {
    wanted: parking_lot::Mutex<Option<(ErrorCode, String)>>,
    notify: Notify,
}

impl CloseRequest {
    fn request(&self, code: u64, reason: &[u8]) {
        let code = i32::try_from(code)
            .ok()
            .and_then(|c| ErrorCode::try_from(c).ok())
            .unwrap_or(ErrorCode::Internal);
        let mut wanted = self.wanted.lock();
        if wanted.is_none() {
            *wanted = Some((code, String::from_utf8_lossy(reason).into_owned()));
            // notify_one keeps a permit if the task is not waiting right now.
            self.notify.notify_one();
        }
    }

    fn pending(&self) -> Option<(ErrorCode, String)> {
        self.wanted.lock().clone()
    }

    async fn wait(&self) -> (ErrorCode, String) {
        loop {
            if let Some(wanted) = self.pending() {
                return wanted;
            }
            self.notify.notified().await;
        }
    }
}

/// Waits until someone asks the connection to close; never, for transports
/// whose handle closes directly.
pub(crate) async fn close_requested(closing: &Option<Arc<CloseRequest>>) -> (ErrorCode, String) {
    match closing {
        Some(request) => request.wait().await,
        None => std::future::pending().await,
    }
}

/// A client connection, whatever carries it.
pub(crate) struct Link {
    pub transport: Transport,
    /// The client's address (the source the Start rate limit counts).
    pub peer: std::net::SocketAddr,
    pub source: FrameSource,
    pub sink: FrameSink,
    /// Set for transports closed through their task.
    pub closing: Option<Arc<CloseRequest>>,
    /// The QUIC connection under native QUIC and WebTransport.
    quic: Option<quinn::Connection>,
}

impl Link {
    /// Native QUIC: one bidirectional stream of varint frames.
    pub fn quic(
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        limits: LinkLimits,
    ) -> Self {
        Self {
            transport: Transport::Quic,
            peer: conn.remote_address(),
            source: FrameSource::Quic {
                recv,
                decoder: FrameDecoder::new(limits.max_frame_size),
            },
            sink: FrameSink::new(SinkKind::Quic(send), limits.write_timeout),
            closing: None,
            quic: Some(conn),
        }
    }

    /// WebTransport: one bidirectional stream of varint frames inside an
    /// HTTP/3 session on `conn`.
    pub fn webtransport(
        conn: quinn::Connection,
        send: impl AsyncWrite + Send + 'static,
        recv: impl AsyncRead + Send + 'static,
        limits: LinkLimits,
    ) -> Self {
        Self {
            transport: Transport::WebTransport,
            peer: conn.remote_address(),
            source: FrameSource::Stream {
                recv: Box::pin(recv),
                decoder: FrameDecoder::new(limits.max_frame_size),
            },
            sink: FrameSink::new(SinkKind::Stream(Box::pin(send)), limits.write_timeout),
            closing: Some(Arc::default()),
            quic: Some(conn),
        }
    }

    /// WebSocket: one binary message per frame.
    pub fn websocket(socket: WebSocket, peer: std::net::SocketAddr, limits: LinkLimits) -> Self {
        let (send, recv) = socket.split();
        Self {
            transport: Transport::WebSocket,
            peer,
            source: FrameSource::WebSocket {
                recv,
                max_frame_size: limits.max_frame_size,
            },
            sink: FrameSink::new(SinkKind::WebSocket(send), limits.write_timeout),
            closing: Some(Arc::default()),
            quic: None,
        }
    }

    /// The handle the registry keeps to close this connection.
    pub fn handle(&self) -> ConnectionHandle {
        match (&self.closing, &self.quic) {
            (Some(request), _) => ConnectionHandle(Closer::Task(request.clone())),
            (None, Some(conn)) => ConnectionHandle(Closer::Quic(conn.clone())),
            // Every constructor sets one of the two.
            (None, None) => ConnectionHandle(Closer::Task(Arc::default())),
        }
    }

    /// A close someone asked for that the task has not carried out yet.
    pub fn pending_close(&self) -> Option<(ErrorCode, String)> {
        self.closing.as_ref().and_then(|c| c.pending())
    }

    /// Ends the connection with `code`. The caller has already sent (and
    /// flushed, see [`FrameSink::finish`]) any Error frame.
    pub async fn close(&mut self, code: ErrorCode, reason: &str, grace: Duration) {
        match self.transport {
            Transport::Quic => {
                if let Some(conn) = &self.quic {
                    conn.close(crate::errors::quic_close_code(code), reason.as_bytes());
                }
            }
            Transport::WebTransport => {
                if let Some(conn) = &self.quic {
                    // The browser closes the session when it reads the Error
                    // frame; a QUIC close now could overtake that frame.
                    let _ = tokio::time::timeout(grace, conn.closed()).await;
                    conn.close(crate::errors::quic_close_code(code), reason.as_bytes());
                }
            }
            Transport::WebSocket => {
                if let SinkKind::WebSocket(send) = &mut self.sink.kind {
                    let frame = CloseFrame {
                        code: crate::errors::websocket_close_code(code),
                        reason: truncate_reason(reason).into(),
                    };
                    let _ =
                        tokio::time::timeout(grace, send.send(Message::Close(Some(frame)))).await;
                }
                // Read until the client's close reply (or the grace ends):
                // dropping a socket with unread input resets it, which can
                // destroy the frames just sent before the client reads them.
                let _ = tokio::time::timeout(grace, async {
                    while let Ok(Some(_)) = self.source.next().await {}
                })
                .await;
            }
        }
    }
}

/// A WebSocket close reason is at most 123 bytes (RFC 6455 §5.5).
fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// Frames from the client.
pub(crate) enum FrameSource {
    Quic {
        recv: quinn::RecvStream,
        decoder: FrameDecoder,
    },
    Stream {
        recv: Pin<Box<dyn AsyncRead + Send>>,
        decoder: FrameDecoder,
    },
    WebSocket {
        recv: SplitStream<WebSocket>,
        max_frame_size: usize,
    },
}

impl FrameSource {
    /// The next frame. `Ok(None)`: the client ended the stream or the
    /// connection is gone. Cancel-safe: nothing read is lost if the future
    /// is dropped, so it can sit in a `select!`.
    pub async fn next(&mut self) -> Result<Option<Envelope>, FrameError> {
        match self {
            FrameSource::Quic { recv, decoder } => loop {
                if let Some(frame) = decoder.next_frame()? {
                    return Ok(Some(frame));
                }
                match recv.read_chunk(READ_CHUNK, true).await {
                    Ok(Some(chunk)) => decoder.extend(&chunk.bytes),
                    Ok(None) | Err(_) => return Ok(None),
                }
            },
            FrameSource::Stream { recv, decoder } => loop {
                if let Some(frame) = decoder.next_frame()? {
                    return Ok(Some(frame));
                }
                // Held while the read waits, so kept small: an idle
                // connection should not pin a large buffer.
                let mut chunk = BytesMut::with_capacity(STREAM_READ_BUFFER);
                match recv.read_buf(&mut chunk).await {
                    Ok(0) | Err(_) => return Ok(None),
                    Ok(_) => decoder.extend(&chunk),
                }
            },
            FrameSource::WebSocket {
                recv,
                max_frame_size,
            } => loop {
                match recv.next().await {
                    Some(Ok(Message::Binary(data))) => {
                        return decode_message(&data, *max_frame_size).map(Some);
                    }
                    Some(Ok(Message::Text(_))) => {
                        return Err(FrameError::Decode(
                            "text message: frames travel in binary messages".into(),
                        ));
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Ok(None),
                }
            },
        }
    }

    /// A frame already received and buffered, without waiting for more.
    pub fn buffered(&mut self) -> Result<Option<Envelope>, FrameError> {
        match self {
            FrameSource::Quic { decoder, .. } | FrameSource::Stream { decoder, .. } => {
                decoder.next_frame()
            }
            FrameSource::WebSocket { .. } => Ok(None),
        }
    }
}

/// Decodes a WebSocket message that must hold exactly one whole frame.
fn decode_message(data: &[u8], max_frame_size: usize) -> Result<Envelope, FrameError> {
    let mut decoder = FrameDecoder::new(max_frame_size);
    decoder.extend(data);
    match decoder.next_frame()? {
        Some(frame) if decoder.buffered() == 0 => Ok(frame),
        Some(_) => Err(FrameError::Decode(
            "a WebSocket message must carry exactly one frame".into(),
        )),
        None => Err(FrameError::Decode(
            "a WebSocket message must carry one whole frame".into(),
        )),
    }
}

/// Why a write to the client failed; nothing more can be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteError {
    /// The connection is gone.
    Closed,
    /// The client did not take the frames within `server.write_timeout`
    /// (it stopped reading: no flow-control credit, a full TCP window). The
    /// caller closes the connection with SLOW_CONSUMER.
    Deadline,
}

/// Per-connection limits every transport applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinkLimits {
    /// Largest frame read (`server.max_frame_size`).
    pub max_frame_size: usize,
    /// Longest one write may wait for the client (`server.write_timeout`).
    pub write_timeout: Duration,
}

impl LinkLimits {
    pub fn of(server: &crate::config::ServerConfig) -> Self {
        Self {
            max_frame_size: server.max_frame_size,
            write_timeout: server.write_timeout,
        }
    }
}

/// Frames to the client. Every write has a deadline: a client that stops
/// reading cannot hold a task, a connection slot and its buffers for ever.
pub(crate) struct FrameSink {
    kind: SinkKind,
    write_timeout: Duration,
}

enum SinkKind {
    Quic(quinn::SendStream),
    Stream(Pin<Box<dyn AsyncWrite + Send>>),
    WebSocket(SplitSink<WebSocket, Message>),
}

impl FrameSink {
    fn new(kind: SinkKind, write_timeout: Duration) -> Self {
        Self {
            kind,
            write_timeout,
        }
    }

    /// Writes the encoded frames in `frames` (whole frames, back to back) and
    /// leaves it empty, within `server.write_timeout`. On a WebSocket each
    /// frame becomes one binary message.
    pub async fn write(&mut self, frames: &mut BytesMut) -> Result<(), WriteError> {
        let deadline = self.write_timeout;
        self.write_within(frames, deadline).await
    }

    /// [`write`](Self::write) bounded by `deadline` instead (never longer
    /// than `server.write_timeout`): a final Error frame before a close.
    pub async fn write_within(
        &mut self,
        frames: &mut BytesMut,
        deadline: Duration,
    ) -> Result<(), WriteError> {
        let deadline = deadline.min(self.write_timeout);
        let result = {
            let write = self.kind.write(frames);
            tokio::pin!(write);
            // Most writes complete on their first poll (the stream has room):
            // the deadline's timer is set only for one that has to wait.
            // Setting and cancelling a timer for every write was ~1% of a
            // node's CPU when pushing to many sessions.
            match futures::poll!(write.as_mut()) {
                std::task::Poll::Ready(written) => written,
                std::task::Poll::Pending => match tokio::time::timeout(deadline, write).await {
                    Ok(written) => written,
                    Err(_) => Err(WriteError::Deadline),
                },
            }
        };
        frames.clear();
        result
    }

    /// Ends the server's direction after a final frame and waits (bounded
    /// by `grace`) until the client has it.
    pub async fn finish(&mut self, grace: Duration) {
        match &mut self.kind {
            SinkKind::Quic(send) => {
                if send.finish().is_ok() {
                    let _ = tokio::time::timeout(grace, send.stopped()).await;
                }
            }
            SinkKind::Stream(send) => {
                let _ = tokio::time::timeout(grace, send.shutdown()).await;
            }
            // The close frame ends the direction (Link::close).
            SinkKind::WebSocket(_) => {}
        }
    }
}

impl SinkKind {
    async fn write(&mut self, frames: &mut BytesMut) -> Result<(), WriteError> {
        match self {
            // Handed over as a shared buffer, not copied: quinn keeps the
            // chunk until the client acks it (`write_all` of a slice copies
            // every write into a fresh allocation). `frames` keeps the rest
            // of its capacity for the next write.
            SinkKind::Quic(send) => send
                .write_chunk(frames.split().freeze())
                .await
                .map_err(|_| WriteError::Closed),
            SinkKind::Stream(send) => {
                let written = send.write_all(frames).await;
                match written {
                    Ok(()) => send.flush().await.map_err(|_| WriteError::Closed),
                    Err(_) => Err(WriteError::Closed),
                }
            }
            SinkKind::WebSocket(send) => {
                while !frames.is_empty() {
                    let Some(len) = frame_len(frames) else {
                        // Only whole frames are ever queued here.
                        break;
                    };
                    let frame = frames.split_to(len.min(frames.len())).freeze();
                    if send.feed(Message::Binary(frame)).await.is_err() {
                        return Err(WriteError::Closed);
                    }
                }
                send.flush().await.map_err(|_| WriteError::Closed)
            }
        }
    }
}

/// Length of the frame at the start of `buf`, prefix included.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let mut cursor = buf;
    let body = prost::encoding::decode_varint(&mut cursor).ok()?;
    let prefix = buf.len() - cursor.remaining();
    usize::try_from(body).ok()?.checked_add(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatesvr_proto::client::{ClientAck, envelope::Body};

    fn ack(seq: u64) -> BytesMut {
        let mut buf = BytesMut::new();
        gatesvr_proto::frame::encode(
            &Envelope {
                body: Some(Body::Ack(ClientAck { acked_seq_id: seq })),
            },
            &mut buf,
        );
        buf
    }

    #[test]
    fn a_message_holds_exactly_one_frame() {
        let one = ack(300);
        assert_eq!(
            decode_message(&one, 1024).map(|e| e.body),
            Ok(Some(Body::Ack(ClientAck { acked_seq_id: 300 })))
        );
        let mut two = ack(1);
        two.extend_from_slice(&ack(2));
        assert!(decode_message(&two, 1024).is_err());
        assert!(decode_message(&one[..one.len() - 1], 1024).is_err());
        assert!(matches!(
            decode_message(&one, 2),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn frame_len_splits_a_batch_at_frame_boundaries() {
        let mut batch = ack(1);
        let first = batch.len();
        batch.extend_from_slice(&ack(300));
        assert_eq!(frame_len(&batch), Some(first));
        assert_eq!(frame_len(&batch[first..]), Some(batch.len() - first));
    }

    #[test]
    fn close_requests_keep_the_first_code() {
        let request = CloseRequest::default();
        request.request(ErrorCode::SessionReplaced as u64, b"replaced");
        request.request(ErrorCode::Draining as u64, b"later");
        assert_eq!(
            request.pending(),
            Some((ErrorCode::SessionReplaced, "replaced".to_string()))
        );
        let unknown = CloseRequest::default();
        unknown.request(u64::MAX, b"");
        assert_eq!(unknown.pending().map(|p| p.0), Some(ErrorCode::Internal));
    }

    #[test]
    fn close_reasons_fit_a_websocket_close_frame() {
        let long = "é".repeat(100);
        let cut = truncate_reason(&long);
        assert!(cut.len() <= 123 && long.starts_with(&cut));
    }
}
