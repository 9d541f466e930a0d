//! A minimal WebTransport client for the `web` scenario: just enough HTTP/3
//! (RFC 9114) to open one WebTransport session and its one stream, written by
//! hand because hyperium's h3 client cannot announce WebTransport support.
//!
//! ```text
//!  uni stream:  0x00 (control) SETTINGS{CONNECT_PROTOCOL, H3_DATAGRAM, ENABLE_WEBTRANSPORT}
//!  bidi stream: HEADERS{:method CONNECT, :protocol webtransport, :scheme https, :authority, :path}
//!               <- HEADERS{:status 200}
//!  bidi stream: 0x41 (WEBTRANSPORT_STREAM) session id, then the client protocol's frames
//! ```
//!
//! The header block uses QPACK's static table only (RFC 9204 Appendix A), no
//! dynamic table, no Huffman.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use gatesvr_proto::client::{StartRequest, envelope::Body};

use crate::client::{Conn, Net};

/// A WebTransport session carrying a client-protocol stream.
pub struct WtConn {
    pub conn: Conn,
    /// The HTTP/3 control stream and the CONNECT stream: closing either ends the session.
    _control: quinn::SendStream,
    _connect: (quinn::SendStream, quinn::RecvStream),
}

fn varint(v: u64, out: &mut Vec<u8>) {
    match v {
        0..=0x3f => out.push(v as u8),
        0x40..=0x3fff => out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes()),
        0x4000..=0x3fff_ffff => out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

fn frame(kind: u64, payload: &[u8], out: &mut Vec<u8>) {
    varint(kind, out);
    varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// A QPACK string literal (no Huffman) with a 7-bit length prefix; short values only.
fn qpack_value(s: &str, out: &mut Vec<u8>) {
    debug_assert!(s.len() < 127);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// The CONNECT request's header block.
fn connect_headers(authority: &str, path: &str) -> Vec<u8> {
    let mut b = vec![0x00, 0x00]; // required insert count 0, base 0
    b.push(0xc0 | 15); // :method CONNECT (static 15)
    b.push(0xc0 | 23); // :scheme https (static 23)
    b.push(0x50); // :authority (static 0), literal value
    qpack_value(authority, &mut b);
    b.push(0x51); // :path (static 1), literal value
    qpack_value(path, &mut b);
    // :protocol, a literal name (9 bytes: 3-bit prefix 7 + 2).
    b.extend_from_slice(&[0x27, 0x02]);
    b.extend_from_slice(b":protocol");
    qpack_value("webtransport", &mut b);
    b
}

/// The client's QUIC config for HTTP/3: ALPN h3, the server may open its
/// control and QPACK streams, datagrams on (the server requires them).
pub fn client_config(ca: &std::path::Path) -> Result<quinn::ClientConfig> {
    let mut tls = gatesvr_common::tls::client_config(ca).context("client TLS")?;
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(0u8.into())
        .max_concurrent_uni_streams(4u8.into());
    quic.transport_config(Arc::new(transport));
    Ok(quic)
}

async fn read_varint(recv: &mut quinn::RecvStream) -> Result<u64> {
    let mut first = [0u8; 1];
    recv.read_exact(&mut first).await?;
    let len = 1usize << (first[0] >> 6);
    let mut v = u64::from(first[0] & 0x3f);
    let mut rest = [0u8; 7];
    recv.read_exact(&mut rest[..len - 1]).await?;
    for b in &rest[..len - 1] {
        v = (v << 8) | u64::from(*b);
    }
    Ok(v)
}

/// Opens a WebTransport session to `addr` and starts a client session on it.
pub async fn session(
    net: &Net,
    config: &quinn::ClientConfig,
    addr: SocketAddr,
    openid: &str,
) -> Result<WtConn> {
    let conn = net.connect_with(addr, config).await?;
    let mut control = conn.open_uni().await?;
    let mut settings = Vec::new();
    for (id, value) in [
        (0x08u64, 1u64),
        (0x33, 1),
        (0x2b60_3742, 1),
        (0x2b60_3743, 1),
    ] {
        varint(id, &mut settings);
        varint(value, &mut settings);
    }
    let mut out = vec![0x00]; // control stream type
    frame(0x04, &settings, &mut out);
    control.write_all(&out).await?;

    let (mut send, mut recv) = conn.open_bi().await?;
    // The session id is the CONNECT stream's id.
    let session_id = quinn::VarInt::from(send.id()).into_inner();
    let mut out = Vec::new();
    frame(
        0x01,
        &connect_headers(&format!("localhost:{}", addr.port()), "/gatesvr/v1"),
        &mut out,
    );
    send.write_all(&out).await?;
    loop {
        let kind = read_varint(&mut recv).await?;
        let len = read_varint(&mut recv).await? as usize;
        let mut payload = vec![0u8; len];
        recv.read_exact(&mut payload).await?;
        if kind == 0x01 {
            // :status 200 is static entry 25.
            if payload.get(2) != Some(&(0xc0 | 25)) {
                bail!("CONNECT refused: header block {payload:02x?}");
            }
            break;
        }
    }

    let mut prefix = Vec::new();
    varint(0x41, &mut prefix); // WEBTRANSPORT_STREAM
    varint(session_id, &mut prefix);
    let mut c = Conn::open(conn, &prefix).await?;
    c.send_body(Body::Start(StartRequest {
        openid: openid.into(),
        auth_token: crate::util::token(openid),
        client_version: "gate-bench".into(),
        ..Default::default()
    }))
    .await?;
    match c.next_frame().await?.body {
        Some(Body::StartOk(_)) => Ok(WtConn {
            conn: c,
            _control: control,
            _connect: (send, recv),
        }),
        other => bail!("expected StartResponse, got {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_use_the_shortest_quic_encoding() {
        let enc = |v| {
            let mut out = Vec::new();
            varint(v, &mut out);
            out
        };
        // RFC 9000 §A.1 examples.
        assert_eq!(enc(37), [0x25]);
        assert_eq!(enc(15_293), [0x7b, 0xbd]);
        assert_eq!(enc(494_878_333), [0x9d, 0x7f, 0x3e, 0x7d]);
        assert_eq!(enc(0x41), [0x40, 0x41]);
    }
}
