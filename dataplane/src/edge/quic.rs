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
use rustls::sign::CertifiedKey;
use tokio::sync::Semaphore;

use crate::config::ServerConfig;
use crate::metrics::Metrics;
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
        .ack_frequency_config(Some(ack_frequency()))
        .keep_alive_interval(Some(server.keep_alive_interval))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(server.idle_timeout)
                .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000))),
        ));
    t
}

/// What the node asks of its clients' ACKs (the QUIC ACK frequency
/// extension, draft-ietf-quic-ack-frequency; quinn clients support it, and a
/// peer that does not is never asked).
fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut a = quinn::AckFrequencyConfig::default();
    a.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    a
}

/// Ack-eliciting packets a client may receive before it must ACK.
pub const ACK_ELICITING_THRESHOLD: u32 = 9;

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
    build_server_config(server, shared_keys(server)?.as_ref(), false, None)
}

/// The TLS half of [`server_config`]: certificate, ALPN, session tickets,
/// TLS 1.3 only (as `gatesvr_common::tls::server_config`), and the cipher
/// suite chosen by the server, AES-128-GCM-SHA256 first (RFC 8446's
/// mandatory suite). rustls's clients ask for AES-256-GCM-SHA384 first, whose
/// key schedule runs on SHA-384: a handshake's HKDF work is SHA-512
/// compression in software, where SHA-256 has CPU instructions (SHA-NI) on
/// current x86 and ARM servers; AES-128 is also fewer rounds per packet. The
/// handshake CPU of a reconnect storm is the survivors' (docs/benchmarks.md,
/// "Failover"). Every node picks the same suite, so a ticket from one node
/// resumes on another (rustls resumes only within the ticket's suite).
pub fn tls_config(
    server: &ServerConfig,
    keys: Option<&SharedKeys>,
) -> Result<rustls::ServerConfig, String> {
    use gatesvr_common::tls::{load_certs, load_key};
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(
            load_certs(&server.cert_file).map_err(|e| e.to_string())?,
            load_key(&server.key_file).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
    tls.ignore_client_order = true;
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
    counts: Option<&TlsCounts>,
) -> Result<quinn::ServerConfig, String> {
    let mut tls = tls_config(server, keys)?;
    if let Some(counts) = counts {
        counts.wrap(&mut tls);
    }
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
/// every one of its clients deserves a prompt reset. Clients are told the
/// largest datagram the node takes (`server.max_udp_payload_size`).
pub fn bind(server: &ServerConfig) -> Result<quinn::Endpoint, String> {
    bind_with(server, false)
}

/// [`bind`], offering WebTransport (ALPN `h3`) too if `webtransport`.
pub fn bind_with(server: &ServerConfig, webtransport: bool) -> Result<quinn::Endpoint, String> {
    bind_counted(server, webtransport, None)
}

/// [`bind_with`], counting TLS handshakes (full or resumed) and session
/// tickets in `metrics` (`gatesvr_tls_handshakes_total`,
/// `gatesvr_tls_tickets_total`).
pub(crate) fn bind_counted(
    server: &ServerConfig,
    webtransport: bool,
    metrics: Option<&Metrics>,
) -> Result<quinn::Endpoint, String> {
    let counts = metrics.map(TlsCounts::of);
    let addr: SocketAddr = server
        .quic_addr
        .parse()
        .map_err(|_| format!("server.quic_addr `{}` is not ip:port", server.quic_addr))?;
    let keys = shared_keys(server)?;
    let config = build_server_config(server, keys.as_ref(), webtransport, counts.as_ref())?;
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|e| format!("cannot bind QUIC on {addr}: {e}"))?;
    enlarge_recv_buffer(&socket);
    let runtime = quinn::default_runtime().ok_or("no async runtime for QUIC")?;
    let mut endpoint = match &keys {
        Some(keys) => {
            let mut endpoint = quinn::EndpointConfig::new(keys.reset_key());
            let cid_key = keys.cid_key();
            endpoint
                .cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)))
                .min_reset_interval(SHARED_KEY_RESET_INTERVAL);
            endpoint
        }
        None => quinn::EndpointConfig::default(),
    };
    // Clients send no MTU probes at the default (`server.max_udp_payload_size`).
    endpoint
        .max_udp_payload_size(server.max_udp_payload_size)
        .map_err(|_| "server.max_udp_payload_size: must be between 1200 and 65527 bytes")?;
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
        tokio::spawn(serve_incoming(node.clone(), incoming, permit));
    }
}

/// One accepted connection, from its handshake until it ends (a task each).
/// Its future lives as long as the connection, and a future is as large as
/// its largest state, so rare large states are boxed: the test
/// `an_idle_connection_s_task_stays_small` holds the size.
async fn serve_incoming(
    node: Arc<Node>,
    incoming: quinn::Incoming,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _permit = permit;
    let accepted = tokio::time::Instant::now();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "incoming connection failed");
            return;
        }
    };
    let connected = connecting.await;
    node.metrics
        .start_phase
        .with_label_values(&["handshake"])
        .observe(accepted.elapsed().as_secs_f64());
    match connected {
        // Boxed, or every native connection would carry HTTP/3's state.
        Ok(conn) if crate::webtransport::is_h3(&conn) => {
            Box::pin(crate::webtransport::serve(node, conn)).await;
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
}

/// Counters of a node's TLS work, bumped where rustls does it: a full
/// handshake signs one CertificateVerify (TLS 1.3 only, `tls::server_config`),
/// a resumed one decrypts a session ticket instead and signs nothing. Counted
/// at the ClientHello, so a handshake abandoned later still counts; a ticket
/// that decrypts but was issued for another server name counts as resumed and
/// then as full (rustls falls back to a full handshake; one deployment's
/// nodes share one name, so this does not happen between them).
#[derive(Clone)]
pub(crate) struct TlsCounts {
    full: prometheus::IntCounter,
    resumed: prometheus::IntCounter,
    issued: prometheus::IntCounter,
    refused: prometheus::IntCounter,
}

impl std::fmt::Debug for TlsCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCounts")
            .field("full", &self.full.get())
            .field("resumed", &self.resumed.get())
            .finish_non_exhaustive()
    }
}

impl TlsCounts {
    pub(crate) fn of(metrics: &Metrics) -> Self {
        Self {
            full: metrics.tls_handshakes.with_label_values(&["full"]),
            resumed: metrics.tls_handshakes.with_label_values(&["resumed"]),
            issued: metrics.tls_tickets.with_label_values(&["issued"]),
            refused: metrics.tls_tickets.with_label_values(&["refused"]),
        }
    }

    /// Wraps `tls`'s ticketer and certificate key so that they count.
    fn wrap(&self, tls: &mut rustls::ServerConfig) {
        tls.ticketer = Arc::new(CountingTicketer {
            inner: tls.ticketer.clone(),
            counts: self.clone(),
        });
        tls.cert_resolver = Arc::new(CountingResolver {
            inner: tls.cert_resolver.clone(),
            full: self.full.clone(),
            wrapped: parking_lot::Mutex::new(None),
        });
    }
}

/// Counts tickets issued, accepted (a resumed handshake) and refused.
#[derive(Debug)]
struct CountingTicketer {
    inner: Arc<dyn rustls::server::ProducesTickets>,
    counts: TlsCounts,
}

impl rustls::server::ProducesTickets for CountingTicketer {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let ticket = self.inner.encrypt(plain);
        if ticket.is_some() {
            self.counts.issued.inc();
        }
        ticket
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.inner.decrypt(cipher);
        match plain {
            Some(_) => self.counts.resumed.inc(),
            None => self.counts.refused.inc(),
        }
        plain
    }
}

/// Hands out the node's certificate with a key that counts its signatures
/// (one per full handshake). The wrapped key is made once per certificate
/// the inner resolver returns, not per handshake.
#[derive(Debug)]
struct CountingResolver {
    inner: Arc<dyn rustls::server::ResolvesServerCert>,
    full: prometheus::IntCounter,
    /// What the inner resolver returned last, and its counting copy.
    wrapped: parking_lot::Mutex<Option<(Arc<CertifiedKey>, Arc<CertifiedKey>)>>,
}

impl rustls::server::ResolvesServerCert for CountingResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let got = self.inner.resolve(hello)?;
        let mut wrapped = self.wrapped.lock();
        if let Some((of, copy)) = wrapped.as_ref()
            && Arc::ptr_eq(of, &got)
        {
            return Some(copy.clone());
        }
        let copy = Arc::new(CertifiedKey {
            cert: got.cert.clone(),
            key: Arc::new(CountingKey {
                inner: got.key.clone(),
                full: self.full.clone(),
            }),
            ocsp: got.ocsp.clone(),
        });
        *wrapped = Some((got, copy.clone()));
        Some(copy)
    }

    fn only_raw_public_keys(&self) -> bool {
        self.inner.only_raw_public_keys()
    }
}

#[derive(Debug)]
struct CountingKey {
    inner: Arc<dyn rustls::sign::SigningKey>,
    full: prometheus::IntCounter,
}

impl rustls::sign::SigningKey for CountingKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        let inner = self.inner.choose_scheme(offered)?;
        Some(Box::new(CountingSigner {
            inner,
            full: self.full.clone(),
        }))
    }

    fn public_key(&self) -> Option<rustls::pki_types::SubjectPublicKeyInfoDer<'_>> {
        self.inner.public_key()
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        self.inner.algorithm()
    }
}

#[derive(Debug)]
struct CountingSigner {
    inner: Box<dyn rustls::sign::Signer>,
    full: prometheus::IntCounter,
}

impl rustls::sign::Signer for CountingSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let signature = self.inner.sign(message)?;
        self.full.inc();
        Ok(signature)
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        self.inner.scheme()
    }
}

/// Grace given to connections to receive CONNECTION_CLOSE on shutdown.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    //! Real quinn on loopback: a client whose first connection went to one
    //! node resumes its TLS session on another node with the same keys.

    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};

    use quinn::crypto::rustls::QuicClientConfig;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    use super::*;
    use crate::quic_keys::{RESET_KEY_FILE, TICKET_KEYS_FILE, TOKEN_KEY_FILE};

    /// The size of the future `make` returns, read from its type (`make` is never called).
    fn future_size<F: std::future::Future>(_make: impl FnOnce() -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every connection holds its task's future for its whole life, idle or not, and a
    /// future is as large as its largest state. Inlining HTTP/3's session (WebTransport) made
    /// every native connection's task 10.6 KB, a fifth of an idle session's memory
    /// (docs/benchmarks.md, "Idle-session memory", session 16).
    #[test]
    #[allow(unreachable_code)]
    fn an_idle_connection_s_task_stays_small() {
        let task = future_size(|| serve_incoming(unreachable!(), unreachable!(), unreachable!()));
        let session = future_size(|| crate::connection::serve_quic(unreachable!(), unreachable!()));
        println!("connection task {task} B, of which serve_quic {session} B");
        assert!(
            task <= TASK_FUTURE_BUDGET,
            "a connection's task future is {task} B (serve_quic {session} B), over the \
             budget of {TASK_FUTURE_BUDGET} B: box the large state that is rare"
        );
    }

    /// Bytes a connection's task future may take (measured 2026-12-06: see the test's output).
    const TASK_FUTURE_BUDGET: usize = 4096;

    /// The client's own view: rustls verifies the server's certificate on
    /// a full handshake only (a resumed one carries none).
    #[derive(Debug)]
    struct CountingVerifier {
        inner: Arc<dyn ServerCertVerifier>,
        full: AtomicU64,
    }

    impl ServerCertVerifier for CountingVerifier {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            self.full.fetch_add(1, Ordering::Relaxed);
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }

    fn write_keys(dir: &Path, seed: u8) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(RESET_KEY_FILE), [seed; 32]).unwrap();
        std::fs::write(dir.join(TOKEN_KEY_FILE), [seed ^ 0x55; 32]).unwrap();
        std::fs::write(dir.join(TICKET_KEYS_FILE), [seed ^ 0xaa; 32]).unwrap();
    }

    /// A node on loopback with `keys`, counting into its own metrics, and a
    /// task accepting (and holding) its connections.
    fn node(
        certs: &gatesvr_common::certs::DevCerts,
        keys: &Path,
    ) -> (quinn::Endpoint, Metrics, tokio::task::JoinHandle<()>) {
        node_taking(certs, keys, ServerConfig::default().max_udp_payload_size)
    }

    /// [`node`], taking datagrams of up to `max_udp_payload_size` bytes.
    fn node_taking(
        certs: &gatesvr_common::certs::DevCerts,
        keys: &Path,
        max_udp_payload_size: u16,
    ) -> (quinn::Endpoint, Metrics, tokio::task::JoinHandle<()>) {
        let files = certs.server();
        let server = ServerConfig {
            quic_addr: "127.0.0.1:0".into(),
            cert_file: files.cert_file,
            key_file: files.key_file,
            shared_keys_dir: Some(keys.to_path_buf()),
            max_udp_payload_size,
            ..ServerConfig::default()
        };
        let metrics = Metrics::new();
        let endpoint = bind_counted(&server, false, Some(&metrics)).unwrap();
        let accepting = endpoint.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(incoming) = accepting.accept().await {
                if let Ok(conn) = incoming.await {
                    held.push(conn);
                }
            }
        });
        (endpoint, metrics, task)
    }

    fn count(metrics: &Metrics, name: &str, label: &str) -> u64 {
        let vec = if name == "handshakes" {
            &metrics.tls_handshakes
        } else {
            &metrics.tls_tickets
        };
        vec.with_label_values(&[label]).get()
    }

    #[tokio::test]
    async fn a_client_of_one_node_resumes_its_tls_session_on_another_with_the_same_keys() {
        gatesvr_common::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let certs = gatesvr_common::certs::generate(&dir.path().join("certs"), &[]).unwrap();
        let (same, other) = (dir.path().join("keys"), dir.path().join("other-keys"));
        write_keys(&same, 1);
        write_keys(&other, 2);
        let (a, a_metrics, _a) = node(&certs, &same);
        let (b, b_metrics, _b) = node(&certs, &same);
        let (c, c_metrics, _c) = node(&certs, &other);

        // One client (one ticket store, one verifier), as the SDK keeps per Client.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(certs.ca_cert()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let verifier = Arc::new(CountingVerifier {
            inner: webpki,
            full: AtomicU64::new(0),
        });
        let mut tls = gatesvr_common::tls::client_config(&certs.ca_cert()).unwrap();
        tls.alpn_protocols = vec![gatesvr_proto::ALPN.to_vec()];
        tls.dangerous().set_certificate_verifier(verifier.clone());
        let client_config = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(tls).expect("TLS 1.3 client config"),
        ));
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connect = |to: &quinn::Endpoint| {
            let addr = to.local_addr().unwrap();
            let client = client.clone();
            let config = client_config.clone();
            async move {
                client
                    .connect_with(config, addr, "localhost")
                    .unwrap()
                    .await
                    .expect("handshake")
            }
        };

        let _first = connect(&a).await;
        assert_eq!(verifier.full.load(Ordering::Relaxed), 1);
        assert_eq!(count(&a_metrics, "handshakes", "full"), 1);
        // The tickets come after the handshake: wait until A issued them
        // and give the client a moment to file them (bounded).
        for _ in 0..200 {
            if count(&a_metrics, "tickets", "issued") > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(count(&a_metrics, "tickets", "issued") > 0);
        tokio::time::sleep(Duration::from_millis(100)).await;

        // Node B never saw this client: it resumes with A's ticket.
        let _second = connect(&b).await;
        assert_eq!(
            verifier.full.load(Ordering::Relaxed),
            1,
            "the client verified a certificate again: B did a full handshake"
        );
        assert_eq!(count(&b_metrics, "handshakes", "resumed"), 1);
        assert_eq!(count(&b_metrics, "handshakes", "full"), 0);
        assert_eq!(count(&b_metrics, "tickets", "refused"), 0);

        // Node C has other keys: it cannot read the ticket, and says so.
        let _third = connect(&c).await;
        assert_eq!(verifier.full.load(Ordering::Relaxed), 2);
        assert_eq!(count(&c_metrics, "tickets", "refused"), 1);
        assert_eq!(count(&c_metrics, "handshakes", "full"), 1);
        assert_eq!(count(&c_metrics, "handshakes", "resumed"), 0);
        for e in [a, b, c] {
            e.close(0u8.into(), b"");
        }
    }

    /// Session 11: each new connection's client probed the path MTU with
    /// about four datagrams of up to ~1.45 KB of PADDING, which quinn 0.11
    /// parses one byte at a time: 15% of a survivor's CPU in a reconnect
    /// burst. At the default `server.max_udp_payload_size` (1200) a client
    /// has nothing to probe; a node that takes larger datagrams is probed
    /// by the same client (the control: probes are seen when they are sent).
    #[tokio::test]
    async fn clients_send_no_mtu_probes_to_a_node_that_takes_only_1200_byte_datagrams() {
        gatesvr_common::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let certs = gatesvr_common::certs::generate(&dir.path().join("certs"), &[]).unwrap();
        let keys = dir.path().join("keys");
        write_keys(&keys, 3);
        let (small, _, _small) = node(&certs, &keys);
        let (large, _, _large) = node_taking(&certs, &keys, 1472);

        // quinn's client defaults: MTU discovery on, as in the SDK.
        let mut tls = gatesvr_common::tls::client_config(&certs.ca_cert()).unwrap();
        tls.alpn_protocols = vec![gatesvr_proto::ALPN.to_vec()];
        let client_config = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(tls).expect("TLS 1.3 client config"),
        ));
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connect = |to: &quinn::Endpoint| {
            client
                .connect_with(client_config.clone(), to.local_addr().unwrap(), "localhost")
                .unwrap()
        };
        let (to_small, to_large) = tokio::join!(connect(&small), connect(&large));
        let (to_small, to_large) = (to_small.expect("handshake"), to_large.expect("handshake"));
        // Bounded poll: the client probes the node that takes 1472 bytes.
        for _ in 0..500 {
            if to_large.stats().path.sent_plpmtud_probes > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            to_large.stats().path.sent_plpmtud_probes > 0,
            "the control: a node taking 1472-byte datagrams is probed"
        );
        let path = to_small.stats().path;
        assert_eq!(
            path.sent_plpmtud_probes, 0,
            "no probe toward a 1200-byte node"
        );
        assert_eq!(path.current_mtu, 1200);
        for e in [small, large] {
            e.close(0u8.into(), b"");
        }
    }
}
