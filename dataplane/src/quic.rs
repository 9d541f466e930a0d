//! The QUIC endpoint: transport settings sized for many mostly-idle sessions,
//! and the accept loop that refuses over-limit handshakes before TLS work.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use tokio::sync::Semaphore;

use crate::config::ServerConfig;
use crate::node::Node;

/// Transport settings for client connections.
///
/// quinn's defaults are tuned for bulk transfer (100 streams of each kind,
/// 1.25 MB stream windows, an unbounded connection window). A GateSvr
/// connection uses exactly one client-opened bidirectional stream, so: one
/// bidi stream, no uni streams, no datagrams, windows a few frames deep.
pub fn transport_config(server: &ServerConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let frame = server.max_frame_size as u64;
    let stream_window = (2 * frame).clamp(64 * 1024, 4 << 20);
    t.max_concurrent_bidi_streams(1u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .stream_receive_window(quinn::VarInt::from_u64(stream_window).unwrap_or(quinn::VarInt::MAX))
        .receive_window(quinn::VarInt::from_u64(stream_window).unwrap_or(quinn::VarInt::MAX))
        .send_window(2 * stream_window)
        .datagram_receive_buffer_size(None)
        .keep_alive_interval(Some(server.keep_alive_interval))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(server.idle_timeout)
                .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000))),
        ));
    t
}

/// Builds the server endpoint config from the node's certificate.
pub fn server_config(server: &ServerConfig) -> Result<quinn::ServerConfig, String> {
    let files = gatesvr_common::tls::TlsFiles {
        cert_file: server.cert_file.clone(),
        key_file: server.key_file.clone(),
        ca_file: None,
    };
    let mut tls = gatesvr_common::tls::server_config(&files).map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![gatesvr_proto::ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(server)));
    Ok(config)
}

/// Binds the QUIC endpoint.
pub fn bind(server: &ServerConfig) -> Result<quinn::Endpoint, String> {
    let addr: SocketAddr = server
        .quic_addr
        .parse()
        .map_err(|_| format!("server.quic_addr `{}` is not ip:port", server.quic_addr))?;
    quinn::Endpoint::server(server_config(server)?, addr)
        .map_err(|e| format!("cannot bind QUIC on {addr}: {e}"))
}

/// Accepts connections until the endpoint closes.
///
/// Over `max_connections`, or while draining, an Initial is refused with
/// CONNECTION_REFUSED before any TLS work (quinn `Incoming::refuse`).
pub async fn accept_loop(
    node: Arc<Node>,
    endpoint: quinn::Endpoint,
    draining: Arc<std::sync::atomic::AtomicBool>,
) {
    let o = &node.config.overload_protection;
    let limit = if o.enabled {
        o.max_connections
    } else {
        Semaphore::MAX_PERMITS
    };
    let slots = Arc::new(Semaphore::new(limit));
    while let Some(incoming) = endpoint.accept().await {
        if draining.load(std::sync::atomic::Ordering::Relaxed) {
            node.metrics
                .connections_rejected
                .with_label_values(&["draining"])
                .inc();
            incoming.refuse();
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            node.metrics
                .connections_rejected
                .with_label_values(&["max_connections"])
                .inc();
            incoming.refuse();
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "incoming connection failed");
                    return;
                }
            };
            match connecting.await {
                Ok(conn) => crate::connection::serve(node, conn).await,
                Err(e) => {
                    node.metrics
                        .connections_rejected
                        .with_label_values(&["handshake_failed"])
                        .inc();
                    tracing::debug!(error = %e, "handshake failed");
                }
            }
        });
    }
}

/// Grace given to connections to receive CONNECTION_CLOSE on shutdown.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
