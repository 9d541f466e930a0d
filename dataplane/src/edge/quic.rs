//! The QUIC endpoint: transport settings sized for many mostly-idle sessions,
//! and the accept loop that refuses over-limit handshakes before TLS work.
//!
//! With `transports.webtransport` the same endpoint also offers ALPN `h3`;
//! the accept loop hands such connections to `crate::webtransport`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use quinn_proto::HashedConnectionIdGenerator;
use tokio::sync::Semaphore;

use crate::config::ServerConfig;
use crate::node::Node;
use crate::quic_keys::SharedKeys;

/// Transport settings for client connections.
///
/// quinn's defaults are tuned for bulk transfer (100 streams of each kind,
/// 1.25 MB stream windows, an unbounded connection window). A GateSvr
/// connection uses exactly one client-opened bidirectional stream, so: one
/// bidi stream, no uni streams, no datagrams, windows a few frames deep.
pub fn transport_config(server: &ServerConfig) -> quinn::TransportConfig {
    transport_config_for(server, false)
}

/// [`transport_config`], widened for HTTP/3 when WebTransport is on: the
/// limits are sent before ALPN picks a protocol, so they hold for every
/// connection. HTTP/3 needs the CONNECT stream plus the session's stream
/// (2 bidi), three uni streams (control, QPACK encoder and decoder; one
/// spare) and datagram support (browsers require the transport parameter
/// with SETTINGS_H3_DATAGRAM). A native client gains nothing from them: the
/// server accepts only its first stream, and the connection window still
/// bounds what it may buffer.
fn transport_config_for(server: &ServerConfig, webtransport: bool) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let frame = server.max_frame_size as u64;
    let stream_window = (2 * frame).clamp(64 * 1024, 4 << 20);
    let (bidi, uni, datagrams) = if webtransport {
        (2u8, 4u8, Some(WEBTRANSPORT_DATAGRAM_BUFFER))
    } else {
        (1, 0, None)
    };
    t.max_concurrent_bidi_streams(bidi.into())
        .max_concurrent_uni_streams(uni.into())
        .stream_receive_window(quinn::VarInt::from_u64(stream_window).unwrap_or(quinn::VarInt::MAX))
        .receive_window(quinn::VarInt::from_u64(stream_window).unwrap_or(quinn::VarInt::MAX))
        .send_window(SEND_WINDOW)
        .datagram_receive_buffer_size(datagrams)
        .keep_alive_interval(Some(server.keep_alive_interval))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(server.idle_timeout)
                .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000))),
        ));
    t
}

/// Most bytes a connection holds written but unacknowledged (quinn
/// `send_window`; its default is 10 MB, and ours was twice the stream window,
/// 4 MiB). It bounds memory per connection (PITFALLS §1), and it bounds the
/// sender's cost per packet: quinn-proto 0.11 finds the bytes of each STREAM
/// frame by walking the stream's unacknowledged segments from the oldest
/// (`SendBuffer::get`; inferred from its code, not profiled), so a connection that may hold megabytes unacked
/// spends more per packet the further it runs ahead of its acks. Measured with
/// `gate-bench push`'s bare quinn sender (which uses this config), session 8:
/// 17-19 µs of server CPU per 64-byte message at 4 MiB, 2.7-3.0 at 256 KiB,
/// 1.4-1.7 at 128 KiB (docs/benchmarks.md). A session's pushes stay below
/// it at the default push window (1,024 unacked pushes of ~90 bytes); a
/// larger frame is written as acks return, 128 KiB per round trip.
pub const SEND_WINDOW: u64 = 128 * 1024;

/// Datagrams are advertised for HTTP/3 but unused: a token buffer.
const WEBTRANSPORT_DATAGRAM_BUFFER: usize = 16 * 1024;

/// Reads `server.shared_keys_dir`, if set.
pub fn shared_keys(server: &ServerConfig) -> Result<Option<SharedKeys>, String> {
    server
        .shared_keys_dir
        .as_deref()
        .map(|dir| SharedKeys::load(dir).map_err(|e| format!("server.shared_keys_dir: {e}")))
        .transpose()
}

/// Builds the server endpoint config from the node's certificate.
///
/// TLS 1.3 session tickets are stateless (no per-process cache to outgrow);
/// with shared keys any node decrypts them, and address-validation tokens
/// are accepted by every node too.
pub fn server_config(server: &ServerConfig) -> Result<quinn::ServerConfig, String> {
    build_server_config(server, shared_keys(server)?.as_ref(), false)
}

/// The TLS half of [`server_config`]: certificate, ALPN, session tickets.
pub fn tls_config(
    server: &ServerConfig,
    keys: Option<&SharedKeys>,
) -> Result<rustls::ServerConfig, String> {
    let files = gatesvr_common::tls::TlsFiles {
        cert_file: server.cert_file.clone(),
        key_file: server.key_file.clone(),
        ca_file: None,
    };
    let mut tls = gatesvr_common::tls::server_config(&files).map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![gatesvr_proto::ALPN.to_vec()];
    tls.ticketer = match keys {
        Some(keys) => keys.ticketer(),
        None => rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?,
    };
    Ok(tls)
}

fn build_server_config(
    server: &ServerConfig,
    keys: Option<&SharedKeys>,
    webtransport: bool,
) -> Result<quinn::ServerConfig, String> {
    let mut tls = tls_config(server, keys)?;
    if webtransport {
        tls.alpn_protocols
            .push(crate::webtransport::ALPN_H3.to_vec());
    }
    let crypto = Arc::new(QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?);
    let mut config = match keys {
        Some(keys) => quinn::ServerConfig::new(crypto, keys.token_key()),
        None => quinn::ServerConfig::with_crypto(crypto),
    };
    config.transport_config(Arc::new(transport_config_for(server, webtransport)));
    Ok(config)
}

/// Receive buffer asked for the QUIC socket. The kernel's default (212,992
/// bytes on Linux) is charged per datagram at its buffer's true size (about
/// 2 KiB on loopback even for a 50-byte keep-alive), so it holds only about a
/// hundred datagrams: the keep-alives of 1,000 sessions started together
/// arrive in one burst every few hundred ms, and the Initials of a crashed
/// node's clients all at once. Datagrams beyond it are dropped (counted in
/// `RcvbufErrors` of /proc/net/snmp): keep-alives lost, connections timed out
/// before any crash, handshakes retried after a 1 s PTO or given up
/// (`gate-bench failover`, docs/benchmarks.md). quinn never enlarges it
/// (PITFALLS §1). Linux caps the request at `net.core.rmem_max`.
pub const UDP_RECV_BUFFER: usize = 8 * 1024 * 1024;

/// Asks for [`UDP_RECV_BUFFER`]; logs what the kernel granted when it is
/// less (raise `net.core.rmem_max`, docs/operations.md).
fn enlarge_recv_buffer(socket: &std::net::UdpSocket) {
    let granted = quinn::udp::UdpSocketState::new(socket.into()).and_then(|state| {
        state.set_recv_buffer_size(socket.into(), UDP_RECV_BUFFER)?;
        state.recv_buffer_size(socket.into())
    });
    match granted {
        // Linux reports twice what it grants (the bookkeeping overhead).
        Ok(bytes) if bytes >= UDP_RECV_BUFFER => {}
        Ok(bytes) => tracing::warn!(
            asked = UDP_RECV_BUFFER,
            granted = bytes,
            "QUIC receive buffer smaller than asked: raise net.core.rmem_max, or bursts of datagrams are dropped"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot size the QUIC receive buffer"),
    }
}

/// Binds the QUIC endpoint.
///
/// With shared keys, the stateless-reset key and the connection-ID generator
/// come from them (PITFALLS §1: a node must recognise another node's CIDs to
/// reset them), and resets are rate-limited less, because after a node dies
/// every one of its clients deserves a prompt reset.
pub fn bind(server: &ServerConfig) -> Result<quinn::Endpoint, String> {
    bind_with(server, false)
}

/// [`bind`], offering WebTransport (ALPN `h3`) too if `webtransport`.
pub fn bind_with(server: &ServerConfig, webtransport: bool) -> Result<quinn::Endpoint, String> {
    let addr: SocketAddr = server
        .quic_addr
        .parse()
        .map_err(|_| format!("server.quic_addr `{}` is not ip:port", server.quic_addr))?;
    let keys = shared_keys(server)?;
    let config = build_server_config(server, keys.as_ref(), webtransport)?;
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|e| format!("cannot bind QUIC on {addr}: {e}"))?;
    enlarge_recv_buffer(&socket);
    let runtime = quinn::default_runtime().ok_or("no async runtime for QUIC")?;
    let Some(keys) = keys else {
        return quinn::Endpoint::new(Default::default(), Some(config), socket, runtime)
            .map_err(|e| format!("cannot bind QUIC on {addr}: {e}"));
    };
    let mut endpoint = quinn::EndpointConfig::new(keys.reset_key());
    let cid_key = keys.cid_key();
    endpoint
        .cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)))
        .min_reset_interval(SHARED_KEY_RESET_INTERVAL);
    quinn::Endpoint::new(endpoint, Some(config), socket, runtime)
        .map_err(|e| format!("cannot bind QUIC on {addr}: {e}"))
}

/// Minimum interval between stateless resets with shared keys (quinn's
/// default, 20 ms, answers only ~50 of a dead node's clients per second).
const SHARED_KEY_RESET_INTERVAL: Duration = Duration::from_millis(1);

/// Accepts connections until the endpoint closes.
///
/// Over `max_connections`, or while draining, an Initial is refused with
/// CONNECTION_REFUSED before any TLS work (quinn `Incoming::refuse`).
pub async fn accept_loop(
    node: Arc<Node>,
    endpoint: quinn::Endpoint,
    draining: Arc<std::sync::atomic::AtomicBool>,
    slots: Arc<Semaphore>,
) {
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
                Ok(conn) if crate::webtransport::is_h3(&conn) => {
                    crate::webtransport::serve(node, conn).await;
                }
                Ok(conn) => crate::connection::serve_quic(node, conn).await,
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
