//! Shared QUIC/TLS keys (`server.shared_keys_dir`): a node that never saw a
//! connection resets it at once, and resumes TLS sessions another node began.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gatesvr_dataplane::config::ServerConfig;
use gatesvr_dataplane::edge::quic;
use gatesvr_dataplane::edge::quic_keys::{
    RESET_KEY_FILE, SharedKeys, TICKET_KEYS_FILE, TOKEN_KEY_FILE,
};
use parking_lot::Mutex;
use rustls::HandshakeKind;
use tokio::net::UdpSocket;

struct Setup {
    _dir: tempfile::TempDir,
    certs: gatesvr_common::certs::DevCerts,
    keys_a: std::path::PathBuf,
    keys_b: std::path::PathBuf,
}

fn write_keys(dir: &Path, seed: u8) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(RESET_KEY_FILE), [seed; 32]).unwrap();
    std::fs::write(dir.join(TOKEN_KEY_FILE), [seed ^ 0x55; 32]).unwrap();
    std::fs::write(dir.join(TICKET_KEYS_FILE), [seed ^ 0xaa; 32]).unwrap();
}

fn setup() -> Setup {
    gatesvr_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let certs = gatesvr_common::certs::generate(&dir.path().join("certs"), &[]).unwrap();
    let keys_a = dir.path().join("keys-a");
    let keys_b = dir.path().join("keys-b");
    write_keys(&keys_a, 1);
    write_keys(&keys_b, 2);
    Setup {
        _dir: dir,
        certs,
        keys_a,
        keys_b,
    }
}

fn server(setup: &Setup, keys: Option<&Path>) -> ServerConfig {
    let files = setup.certs.server();
    ServerConfig {
        quic_addr: "127.0.0.1:0".into(),
        cert_file: files.cert_file,
        key_file: files.key_file,
        shared_keys_dir: keys.map(Path::to_path_buf),
        ..ServerConfig::default()
    }
}

fn client_tls(setup: &Setup) -> rustls::ClientConfig {
    let mut tls = gatesvr_common::tls::client_config(&setup.certs.ca_cert()).unwrap();
    tls.alpn_protocols = vec![gatesvr_proto::ALPN.to_vec()];
    tls
}

/// One TLS handshake in memory; returns how it went.
fn handshake(client: &Arc<rustls::ClientConfig>, server: rustls::ServerConfig) -> HandshakeKind {
    let mut c = rustls::ClientConnection::new(client.clone(), "localhost".try_into().unwrap())
        .expect("client");
    let mut s = rustls::ServerConnection::new(Arc::new(server)).expect("server");
    // Enough flights for the handshake and the tickets that follow it.
    for _ in 0..6 {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().expect("server accepts");
        }
        let mut wire = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().expect("client accepts");
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    c.handshake_kind().expect("handshake done")
}

#[test]
fn a_node_resumes_tls_sessions_begun_on_another_node_with_the_same_keys() {
    let setup = setup();
    let keys_a = SharedKeys::load(&setup.keys_a).unwrap();
    let keys_b = SharedKeys::load(&setup.keys_b).unwrap();
    let node1 = server(&setup, Some(&setup.keys_a));
    let client = Arc::new(client_tls(&setup));

    let first = handshake(&client, quic::tls_config(&node1, Some(&keys_a)).unwrap());
    assert_eq!(first, HandshakeKind::Full);
    // Another node (its own config object) with the same keys resumes.
    let again = handshake(&client, quic::tls_config(&node1, Some(&keys_a)).unwrap());
    assert_eq!(again, HandshakeKind::Resumed);

    // A node with other keys cannot read the ticket: a full handshake, no error.
    let fresh_client = Arc::new(client_tls(&setup));
    handshake(
        &fresh_client,
        quic::tls_config(&node1, Some(&keys_a)).unwrap(),
    );
    let other = handshake(
        &fresh_client,
        quic::tls_config(&node1, Some(&keys_b)).unwrap(),
    );
    assert_eq!(other, HandshakeKind::Full);
}

/// A UDP "load balancer": the client talks to `front`; datagrams go to the
/// current backend, which a test switches as a pod replacement would.
struct Relay {
    front: SocketAddr,
    backend: Arc<Mutex<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(backend: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let backend = Arc::new(Mutex::new(backend));
        let front_addr = front.local_addr().unwrap();
        let target = backend.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut up = vec![0u8; 65536];
            let mut down = vec![0u8; 65536];
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut up) => {
                        client = Some(from);
                        let to = *target.lock();
                        let _ = back.send_to(&up[..n], to).await;
                    }
                    Ok((n, _)) = back.recv_from(&mut down) => {
                        if let Some(c) = client {
                            let _ = front.send_to(&down[..n], c).await;
                        }
                    }
                }
            }
        });
        Self {
            front: front_addr,
            backend,
            task,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves handshakes on `endpoint` and holds the connections open.
fn serve(endpoint: quinn::Endpoint) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(incoming) = endpoint.accept().await {
            if let Ok(conn) = incoming.await {
                held.push(conn);
            }
        }
    })
}

/// Connects through a relay to node A, moves the relay to node B, and
/// returns how the client's connection ended.
async fn replaced_pod_ends_connection_with(b_keys: Option<&Path>) -> quinn::ConnectionError {
    let setup = setup();
    let a = quic::bind(&server(&setup, Some(&setup.keys_a))).unwrap();
    let b = quic::bind(&server(&setup, b_keys)).unwrap();
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let _a_task = serve(a.clone());
    let _b_task = serve(b.clone());
    let relay = Relay::start(a_addr).await;

    let mut client_cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(&setup)).unwrap(),
    ));
    let mut transport = quinn::TransportConfig::default();
    // Short, so that a missing reset ends the test quickly (as TimedOut).
    transport
        .max_idle_timeout(Some(Duration::from_secs(2).try_into().unwrap()))
        .keep_alive_interval(Some(Duration::from_millis(100)));
    client_cfg.transport_config(Arc::new(transport));
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_cfg);
    let conn = client
        .connect(relay.front, "localhost")
        .unwrap()
        .await
        .expect("handshake with node A");

    // Node A's pod is replaced: the load balancer now routes the flow to B.
    *relay.backend.lock() = b_addr;
    let err = conn.closed().await;
    drop(relay);
    a.close(0u8.into(), b"");
    b.close(0u8.into(), b"");
    err
}

#[tokio::test]
async fn a_replacement_node_with_the_shared_reset_key_resets_the_old_nodes_connections() {
    let setup_for_paths = setup();
    // The same key material as node A's (seed 1).
    let same = setup_for_paths._dir.path().join("same");
    write_keys(&same, 1);
    let err = replaced_pod_ends_connection_with(Some(&same)).await;
    assert!(
        matches!(err, quinn::ConnectionError::Reset),
        "expected a stateless reset, got {err:?}"
    );
}

#[tokio::test]
async fn without_the_shared_key_the_replacement_stays_silent_until_the_idle_timeout() {
    let err = replaced_pod_ends_connection_with(None).await;
    assert!(
        matches!(err, quinn::ConnectionError::TimedOut),
        "expected an idle timeout, got {err:?}"
    );
}
