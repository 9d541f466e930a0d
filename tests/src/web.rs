//! A raw-frame WebSocket client (docs/protocol.md §12): one binary message
//! per frame, TLS verified against the test CA. The browser tests drive the
//! JavaScript SDK; this one checks the wire format itself.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use gatesvr_proto::client::{Envelope, StartRequest, envelope::Body};
use gatesvr_proto::frame::{self, FrameDecoder};
use tokio_tungstenite::tungstenite::Message;

use crate::PATIENCE;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

pub struct WsConn {
    socket: Socket,
    /// The close code the server sent, once it closed.
    pub close_code: Option<u16>,
}

impl WsConn {
    /// Opens `wss://localhost:PORT/gatesvr/v1` on `addr`.
    pub async fn connect(addr: SocketAddr, ca: &Path) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .expect("TCP connect");
        Self::over(tcp, addr, ca).await
    }

    /// [`connect`](Self::connect) with a TCP receive buffer of about
    /// `bytes`: once this client stops reading, the server's writes block
    /// after little data (slow-reader tests).
    pub async fn connect_with_recv_buffer(addr: SocketAddr, ca: &Path, bytes: u32) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("TCP socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let tcp = socket.connect(addr).await.expect("TCP connect");
        Self::over(tcp, addr, ca).await
    }

    async fn over(tcp: tokio::net::TcpStream, addr: SocketAddr, ca: &Path) -> Self {
        let tls = gatesvr_common::tls::client_config(ca).expect("client TLS");
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let stream = connector.connect(name, tcp).await.expect("TLS handshake");
        let url = format!("wss://localhost:{}/gatesvr/v1", addr.port());
        let (socket, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("WebSocket upgrade");
        Self {
            socket,
            close_code: None,
        }
    }

    /// Sends raw bytes as one binary message.
    pub async fn send_message(&mut self, message: Message) {
        // The server may close right away (that is what some tests check).
        let _ = self.socket.send(message).await;
    }

    pub async fn send(&mut self, body: Body) {
        let mut buf = BytesMut::new();
        frame::encode(&Envelope { body: Some(body) }, &mut buf);
        self.send_message(Message::Binary(buf.freeze())).await;
    }

    pub async fn start(&mut self, openid: &str, token: &str, session_id: &str, last_acked: u64) {
        self.send(Body::Start(StartRequest {
            openid: openid.into(),
            auth_token: token.into(),
            last_acked_seq_id: last_acked,
            session_id: session_id.into(),
            ..Default::default()
        }))
        .await;
    }

    /// The next frame (each message holds exactly one), or None once closed.
    pub async fn recv(&mut self) -> Option<Body> {
        let read = async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Binary(data))) => {
                        let mut decoder = FrameDecoder::new(frame::DEFAULT_MAX_FRAME_SIZE);
                        decoder.extend(&data);
                        let frame = decoder.next_frame().expect("a valid frame");
                        assert_eq!(decoder.buffered(), 0, "one frame per message");
                        return frame.expect("a whole frame per message").body;
                    }
                    Some(Ok(Message::Close(close))) => {
                        self.close_code = close.map(|c| u16::from(c.code));
                        return None;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return None,
                }
            }
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .expect("a frame or the end of the connection")
    }
}
