//! Test harness for GateSvr's cross-crate and cluster tests.
//!
//! Everything listens on 127.0.0.1 with port 0; certificates and secrets live
//! in a temporary directory per test. Waiting is always a bounded poll
//! ([`eventually`]), never a bare sleep, and no test asserts a duration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use gatesvr_dataplane::{DataPlane, DataPlaneConfig, Routing};
use gatesvr_proto::client::{Envelope, ErrorCode, StartRequest, envelope::Body};
use gatesvr_proto::frame::{self, FrameDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub mod browser;
pub mod cluster;
pub mod processes;
pub mod procs;
pub mod web;

/// Upper bound for any wait in tests: generous, since CI machines are slow
/// and shared. Reaching it fails the test; nothing asserts being faster.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Polls `cond` until it is true, panicking with `what` after [`PATIENCE`].
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The next push a client receives (other events skipped), or None after [`PATIENCE`].
pub async fn next_push(client: &gatesvr_sdk::Client) -> Option<gatesvr_sdk::Push> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, client.next_event()).await {
            Ok(Some(gatesvr_sdk::Event::Push(p))) => return Some(p),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Certificates and an HMAC secret in a temporary directory.
pub struct TestDir {
    pub dir: tempfile::TempDir,
    pub secret: Vec<u8>,
}

impl TestDir {
    pub fn new() -> Self {
        gatesvr_common::tls::install_crypto_provider();
        // Logs only when asked for (RUST_LOG=...), captured per test.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().expect("temp dir");
        gatesvr_common::certs::generate(&dir.path().join("certs"), &[]).expect("dev certs");
        let secret = b"test-secret-0123456789".to_vec();
        std::fs::write(dir.path().join("secret"), &secret).expect("secret file");
        Self { dir, secret }
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn ca(&self) -> PathBuf {
        self.certs().join("ca.crt")
    }

    pub fn token(&self, openid: &str) -> String {
        gatesvr_common::token::issue(&self.secret, openid, Duration::from_secs(3600))
    }

    /// A data-plane config on ephemeral loopback ports with HMAC auth.
    pub fn dataplane_config(&self, node_id: &str) -> DataPlaneConfig {
        let mut cfg = DataPlaneConfig {
            node_id: node_id.into(),
            ..DataPlaneConfig::default()
        };
        let s = &mut cfg.server;
        s.quic_addr = "127.0.0.1:0".into();
        s.http_addr = "127.0.0.1:0".into();
        s.grpc_addr = "127.0.0.1:0".into();
        s.metrics_addr = "127.0.0.1:0".into();
        s.cert_file = self.certs().join("server.crt");
        s.key_file = self.certs().join("server.key");
        cfg.auth.secret_file = Some(self.dir.path().join("secret"));
        cfg
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

/// A running data-plane node with its test directory.
pub struct TestNode {
    pub dir: Arc<TestDir>,
    pub dp: DataPlane,
}

impl TestNode {
    /// Starts a node with the echo handler after `tweak` adjusts its config.
    pub async fn start(tweak: impl FnOnce(&mut DataPlaneConfig)) -> Self {
        let dir = Arc::new(TestDir::new());
        let mut cfg = dir.dataplane_config("dp-test");
        tweak(&mut cfg);
        let dp = DataPlane::start(cfg, Routing::Echo)
            .await
            .expect("data plane starts");
        Self { dir, dp }
    }

    pub fn client_config(&self, openid: &str) -> gatesvr_sdk::ClientConfig {
        gatesvr_sdk::ClientConfig::new(self.dp.quic_addr(), openid, self.dir.token(openid))
            .with_ca_file(self.dir.ca())
    }

    pub async fn raw(&self) -> RawConn {
        RawConn::connect(self.dp.quic_addr(), &self.dir.ca()).await
    }

    /// A raw client whose new session for `openid` has started (its
    /// StartResponse read).
    pub async fn started_raw(&self, openid: &str) -> RawConn {
        let mut raw = self.raw().await;
        raw.start(openid, &self.dir.token(openid), "", 0).await;
        match raw.recv().await {
            Some(Body::StartOk(_)) => raw,
            other => panic!("expected StartResponse, got {other:?}"),
        }
    }

    /// Parsed /metrics.
    pub async fn metrics(&self) -> Metrics {
        Metrics::parse(&http_get(self.dp.metrics_addr(), "/metrics").await.1)
    }
}

/// A client speaking raw frames: for protocol tests that must not go through
/// the SDK (and so check docs/protocol.md, not our own client).
pub struct RawConn {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub decoder: FrameDecoder,
    _endpoint: quinn::Endpoint,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr, ca: &std::path::Path) -> Self {
        let mut tls = gatesvr_common::tls::client_config(ca).expect("client TLS");
        tls.alpn_protocols = vec![gatesvr_proto::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
        let mut endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("UDP socket");
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = endpoint
            .connect(addr, "localhost")
            .unwrap()
            .await
            .expect("handshake");
        let (send, recv) = conn.open_bi().await.expect("stream");
        Self {
            conn,
            send,
            recv,
            decoder: FrameDecoder::new(frame::DEFAULT_MAX_FRAME_SIZE),
            _endpoint: endpoint,
        }
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The server may close right away (that is what some tests check).
        let _ = self.send.write_all(bytes).await;
    }

    pub async fn send(&mut self, body: Body) {
        let mut buf = BytesMut::new();
        frame::encode(&Envelope { body: Some(body) }, &mut buf);
        self.send_bytes(&buf).await;
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

    /// The next frame, or None when the stream or connection ended.
    pub async fn recv(&mut self) -> Option<Body> {
        let read = async {
            loop {
                match self.decoder.next_frame() {
                    Ok(Some(f)) => return f.body,
                    Ok(None) => {}
                    Err(e) => panic!("server sent a bad frame: {e}"),
                }
                match self.recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => self.decoder.extend(&chunk.bytes),
                    Ok(None) | Err(_) => return None,
                }
            }
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .expect("a frame or the end of the stream")
    }

    /// The application close code, once the server closed the connection.
    pub async fn closed_with(&self) -> Option<ErrorCode> {
        let err = tokio::time::timeout(PATIENCE, self.conn.closed())
            .await
            .expect("connection closes");
        match err {
            quinn::ConnectionError::ApplicationClosed(c) => {
                ErrorCode::try_from(c.error_code.into_inner() as i32).ok()
            }
            _ => None,
        }
    }
}

/// Minimal HTTP/1.1 GET (status, body) for probing our own endpoints.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get_with_token(addr, path, "").await
}

/// POST with an empty body. Status 0 if nothing answered.
pub async fn http_post(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "POST", path, "").await
}

/// POST with an empty body and a bearer token (empty: none). Status 0 if nothing answered.
pub async fn http_post_with_token(addr: SocketAddr, path: &str, token: &str) -> (u16, String) {
    http_request(addr, "POST", path, token).await
}

/// GET with a bearer token (empty: none). Status 0 if nothing answered.
pub async fn http_get_with_token(addr: SocketAddr, path: &str, token: &str) -> (u16, String) {
    http_request(addr, "GET", path, token).await
}

/// A plain HTTP/1.1 request with an empty body and a bearer token (empty:
/// none): (status, body), status 0 if nothing answered.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, String) {
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    exchange(stream, addr, method, path, token).await
}

/// TLS settings of [`https_request`]: the CA to trust and, optionally, the
/// client certificate to present (mTLS).
#[derive(Clone)]
pub struct HttpsClient {
    connector: tokio_rustls::TlsConnector,
}

impl HttpsClient {
    /// Trusts `ca`; presents `cert` (certificate file, key file) if set.
    pub fn new(ca: &std::path::Path, cert: Option<(&std::path::Path, &std::path::Path)>) -> Self {
        use gatesvr_common::tls::{load_certs, load_key, provider, root_store};
        let builder = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(root_store(ca).expect("CA file"));
        let mut config = match cert {
            Some((c, k)) => builder
                .with_client_auth_cert(load_certs(c).expect("cert"), load_key(k).expect("key"))
                .expect("client certificate"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }
}

/// [`http_request`] over TLS to `localhost` at `addr`. Status 0 if nothing
/// answered: no connection, or the TLS handshake was refused (a client
/// certificate the server does not accept, or none where one is required).
pub async fn https_request(
    client: &HttpsClient,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, String) {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("server name");
    let Ok(Ok(tls)) = tokio::time::timeout(PATIENCE, client.connector.connect(name, tcp)).await
    else {
        return (0, String::new());
    };
    exchange(tls, addr, method, path, token).await
}

/// One request on `stream`, read to the end (`Connection: close`).
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, String) {
    let auth = if token.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {token}\r\n")
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    // A TLS peer may end without close_notify: keep what arrived.
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw)).await;
    if raw.is_empty() && !matches!(read, Ok(Ok(_))) {
        return (0, String::new());
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Samples of a Prometheus text exposition, keyed by `name{labels}` exactly
/// as exposed (labels sorted by name, as the prometheus crate writes them).
#[derive(Debug, Default)]
pub struct Metrics {
    pub samples: BTreeMap<String, f64>,
    pub types: BTreeMap<String, String>,
}

impl Metrics {
    /// Parses the text format, panicking on a malformed line (the test's point).
    pub fn parse(text: &str) -> Self {
        let mut m = Metrics::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE line has a type");
                m.types.insert(name.into(), ty.into());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line: {line}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad sample value: {line}"));
            m.samples.insert(key.to_string(), value);
        }
        m
    }

    /// Value of `name` with exactly `labels` (e.g. `[("outcome","ok")]`), 0 if absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut labels = labels.to_vec();
        labels.sort();
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", inner.join(","))
        };
        self.samples.get(&key).copied().unwrap_or(0.0)
    }
}

/// An `UpstreamService` whose behaviour the payload picks, for fault tests:
/// `sleep:<ms>` answers after a delay, `fail` answers INTERNAL, `shed`
/// answers RESOURCE_EXHAUSTED, anything else is echoed. Counts executions.
#[derive(Clone, Default)]
pub struct FakeUpstream {
    pub executed: Arc<std::sync::atomic::AtomicU64>,
}

#[tonic::async_trait]
impl gatesvr_proto::upstream::upstream_service_server::UpstreamService for FakeUpstream {
    async fn process_request(
        &self,
        request: tonic::Request<gatesvr_proto::upstream::ProcessRequestRequest>,
    ) -> Result<tonic::Response<gatesvr_proto::upstream::ProcessRequestResponse>, tonic::Status>
    {
        self.executed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let req = request.into_inner();
        let text = String::from_utf8_lossy(&req.payload).into_owned();
        if let Some(ms) = text.strip_prefix("sleep:") {
            let ms: u64 = ms.parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        } else if text == "fail" {
            return Err(tonic::Status::internal("upstream failed on purpose"));
        } else if text == "shed" {
            return Err(tonic::Status::resource_exhausted("upstream shedding"));
        }
        Ok(tonic::Response::new(
            gatesvr_proto::upstream::ProcessRequestResponse {
                app_code: 0,
                payload: req.payload.into(),
                message: req.zone,
            },
        ))
    }

    async fn get_status(
        &self,
        _request: tonic::Request<gatesvr_proto::upstream::GetStatusRequest>,
    ) -> Result<tonic::Response<gatesvr_proto::upstream::UpstreamStatus>, tonic::Status> {
        // The data plane's health probe.
        Ok(tonic::Response::new(
            gatesvr_proto::upstream::UpstreamStatus {
                healthy: true,
                ..Default::default()
            },
        ))
    }
}

impl FakeUpstream {
    /// Serves on 127.0.0.1:0 until the token is cancelled; returns the address.
    pub async fn serve(&self, stop: tokio_util::sync::CancellationToken) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = gatesvr_proto::upstream::upstream_service_server::UpstreamServiceServer::new(
            self.clone(),
        );
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream_listener(listener),
                    stop.cancelled_owned(),
                )
                .await;
        });
        addr
    }

    pub fn executed(&self) -> u64 {
        self.executed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
}

impl TestNode {
    /// Starts a node that routes to upstreams, after `tweak`.
    pub async fn start_routed(tweak: impl FnOnce(&mut DataPlaneConfig)) -> Self {
        let dir = Arc::new(TestDir::new());
        let mut cfg = dir.dataplane_config("dp-routed");
        tweak(&mut cfg);
        let dp = DataPlane::start(cfg, Routing::Upstreams)
            .await
            .expect("data plane starts");
        Self { dir, dp }
    }
}
