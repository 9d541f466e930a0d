//! WebTransport over HTTP/3 on the node's QUIC port: browsers' way in.
//!
//! With `transports.webtransport` on, the endpoint offers ALPN `h3` next to
//! `gatesvr/1`, and a connection that chose `h3` lands here instead of in
//! [`crate::connection::serve_quic`]. The browser sends an extended CONNECT
//! (`:protocol = webtransport`) for `https://HOST:PORT/gatesvr/v1`, then opens
//! ONE bidirectional WebTransport stream that carries the same varint frames
//! as the native stream. hyperium's `h3` / `h3-quinn` / `h3-webtransport` do
//! the HTTP/3 part on our own quinn endpoint.
//!
//! ```text
//!  QUIC (ALPN h3) ─> h3 SETTINGS ─> CONNECT /gatesvr/v1 ─> 200 ─> bidi stream ─> Link ─> connection::serve
//! ```
//!
//! Other requests get 404; further streams of the session are refused.

use std::sync::Arc;

use bytes::Bytes;
use gatesvr_proto::client::ErrorCode;
use h3::ext::Protocol;
use h3_webtransport::server::{AcceptedBi, WebTransportSession};
use http::{Method, Response, StatusCode};

use crate::node::Node;
use crate::transport::{Link, WEB_PATH};

/// The ALPN of HTTP/3.
pub const ALPN_H3: &[u8] = b"h3";

type Session = WebTransportSession<h3_quinn::Connection, Bytes>;
type Stream = h3_webtransport::stream::BidiStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Why no WebTransport session came up.
#[derive(Debug, thiserror::Error)]
enum AcceptError {
    #[error("HTTP/3: {0}")]
    H3(String),
    #[error("the client closed before opening a WebTransport session")]
    Gone,
}

fn h3_error(e: impl std::fmt::Display) -> AcceptError {
    AcceptError::H3(e.to_string())
}

/// True if the handshake of `conn` chose HTTP/3.
pub fn is_h3(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ALPN_H3)
}

/// Serves one HTTP/3 connection: one WebTransport session, one client session.
pub async fn serve(node: Arc<Node>, conn: quinn::Connection) {
    let start_timeout = node.config.server.start_timeout;
    let (session, stream) = match tokio::time::timeout(start_timeout, accept(&conn)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "no WebTransport session");
            node.metrics
                .connections_rejected
                .with_label_values(&["webtransport_setup"])
                .inc();
            return;
        }
        Err(_) => {
            node.metrics
                .connections_rejected
                .with_label_values(&["start_timeout"])
                .inc();
            conn.close(
                quinn::VarInt::from_u32(ErrorCode::StartTimeout as u32),
                b"no WebTransport stream opened in time",
            );
            return;
        }
    };
    let (recv, send) = tokio::io::split(stream);
    let limits = crate::transport::LinkLimits::of(&node.config.server);
    let link = Link::webtransport(conn, send, recv, limits);
    tokio::select! {
        () = crate::connection::serve(node, link) => {}
        () = refuse_more(&session) => {}
    }
}

/// Completes the HTTP/3 handshake and the CONNECT, and waits for the
/// session's first bidirectional stream.
async fn accept(conn: &quinn::Connection) -> Result<(Session, Stream), AcceptError> {
    let mut h3 = h3::server::builder()
        .enable_webtransport(true)
        .enable_extended_connect(true)
        .enable_datagram(true)
        .max_webtransport_sessions(1)
        .send_grease(true)
        .build(h3_quinn::Connection::new(conn.clone()))
        .await
        .map_err(h3_error)?;
    loop {
        let Some(resolver) = h3.accept().await.map_err(h3_error)? else {
            return Err(AcceptError::Gone);
        };
        let (request, mut stream) = resolver.resolve_request().await.map_err(h3_error)?;
        let is_ours = request.method() == Method::CONNECT
            && request.extensions().get::<Protocol>() == Some(&Protocol::WEB_TRANSPORT)
            && request.uri().path() == WEB_PATH;
        if !is_ours {
            let not_found = Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(())
                .map_err(h3_error)?;
            let _ = stream.send_response(not_found).await;
            let _ = stream.finish().await;
            continue;
        }
        let session = Session::accept(request, stream, h3)
            .await
            .map_err(h3_error)?;
        loop {
            match session.accept_bi().await.map_err(h3_error)? {
                Some(AcceptedBi::BidiStream(_, stream)) => return Ok((session, stream)),
                Some(AcceptedBi::Request(_, mut stream)) => {
                    let not_found = Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(())
                        .map_err(h3_error)?;
                    let _ = stream.send_response(not_found).await;
                }
                None => return Err(AcceptError::Gone),
            }
        }
    }
}

/// Keeps the HTTP/3 connection driven while the client session runs, and
/// drops any further stream (a session uses exactly one). Never completes:
/// the session's own stream says when the connection is over.
async fn refuse_more(session: &Session) {
    while let Ok(Some(accepted)) = session.accept_bi().await {
        drop(accepted);
    }
    std::future::pending::<()>().await
}
