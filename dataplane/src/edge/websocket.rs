//! The WebSocket listener: the browser fallback where UDP is blocked.
//!
//! HTTPS (TLS over TCP, HTTP/1.1) on `transports.websocket_addr`:
//!
//! | path | what |
//! |---|---|
//! | `GET /gatesvr/v1` (Upgrade) | a client session: one binary message per frame ([`crate::transport`]) |
//! | `GET /gatesvr/v1/cert-hashes` | `{"sha256": [base64...], "webtransport_port": N or null}`: the node's certificate hashes for WebTransport's `serverCertificateHashes`, and its WebTransport (QUIC) port if enabled |
//! | `GET /*` | files under `transports.web_root`, if set (the dev demo page and the JavaScript SDK) |
//!
//! Admission is the same as for QUIC: one `max_connections` budget shared
//! by all transports, and nothing new while draining (HTTP 503 before the
//! upgrade; the client backs off and tries again or elsewhere).

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{State, WebSocketUpgrade};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::node::Node;
use crate::transport::{Link, WEB_PATH};

/// Bytes read from a WebSocket at once (larger messages take several reads).
const WS_READ_BUFFER: usize = 4 * 1024;

#[derive(Clone)]
struct WebState {
    node: Arc<Node>,
    slots: Arc<Semaphore>,
    cert_hashes: Arc<serde_json::Value>,
    web_root: Option<Arc<PathBuf>>,
}

/// The TLS settings of the listener: the node's certificate, HTTP/1.1.
pub fn tls_config(node: &Node) -> Result<Arc<rustls::ServerConfig>, String> {
    let server = &node.config.server;
    let files = gatesvr_common::tls::TlsFiles {
        cert_file: server.cert_file.clone(),
        key_file: server.key_file.clone(),
        ca_file: None,
    };
    let mut tls = gatesvr_common::tls::server_config(&files).map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// SHA-256 of each certificate in the node's chain (leaf first), base64:
/// what a page passes as `serverCertificateHashes`.
pub fn cert_hashes(cert_file: &Path) -> Result<Vec<String>, String> {
    use base64::Engine;
    let certs = gatesvr_common::tls::load_certs(cert_file).map_err(|e| e.to_string())?;
    Ok(certs
        .iter()
        .map(|c| {
            let digest = ring::digest::digest(&ring::digest::SHA256, c.as_ref());
            base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
        })
        .collect())
}

/// Serves the listener until `stop`. Connection tasks end with it too (a
/// crashed or stopped node leaves no WebSocket session running).
pub async fn accept_loop(
    node: Arc<Node>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    slots: Arc<Semaphore>,
    webtransport_port: Option<u16>,
    stop: CancellationToken,
) {
    let hashes = cert_hashes(&node.config.server.cert_file).unwrap_or_default();
    let state = WebState {
        node: node.clone(),
        slots,
        cert_hashes: Arc::new(serde_json::json!({
            "sha256": hashes,
            "webtransport_port": webtransport_port,
        })),
        web_root: node.config.transports.web_root.clone().map(Arc::new),
    };
    let router = axum::Router::new()
        .route(WEB_PATH, get(upgrade))
        .route(&format!("{WEB_PATH}/cert-hashes"), get(hashes_json))
        .fallback(get(static_file))
        .with_state(state);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake_timeout = node.config.server.start_timeout;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "WebSocket accept failed");
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let (acceptor, router, stop, node) =
            (acceptor.clone(), router.clone(), stop.clone(), node.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = serve_tcp(&node, tcp, peer, acceptor, router, handshake_timeout) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn serve_tcp(
    node: &Node,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    router: axum::Router,
    handshake_timeout: std::time::Duration,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            node.metrics
                .connections_rejected
                .with_label_values(&["handshake_failed"])
                .inc();
            tracing::debug!(%peer, error = %e, "WebSocket TLS handshake failed");
            return;
        }
        Err(_) => {
            node.metrics
                .connections_rejected
                .with_label_values(&["handshake_failed"])
                .inc();
            return;
        }
    };
    // The client's address reaches the upgrade handler (the Start rate
    // limit counts Starts per source address).
    let router = router.layer(axum::Extension(axum::extract::ConnectInfo(peer)));
    let service = hyper_util::service::TowerToHyperService::new(router);
    // A connection that holds no session must not sit idle for ever (it has
    // no connection slot until it upgrades): each request head, the first
    // included, must arrive within start_timeout.
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "WebSocket listener connection failed");
    }
}

async fn upgrade(
    State(state): State<WebState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    let node = state.node;
    if node.draining.load(Ordering::Relaxed) {
        node.metrics
            .connections_rejected
            .with_label_values(&["draining"])
            .inc();
        return (StatusCode::SERVICE_UNAVAILABLE, "node is draining").into_response();
    }
    let Ok(permit) = state.slots.try_acquire_owned() else {
        node.metrics
            .connections_rejected
            .with_label_values(&["max_connections"])
            .inc();
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    // A frame is at most max_frame_size plus a 10-byte length prefix. The
    // read buffer is allocated up front on every connection: tungstenite's
    // 128 KiB default would dominate an idle session's memory.
    let max = node.config.server.max_frame_size;
    ws.max_message_size(max + 10)
        .max_frame_size(max + 10)
        .read_buffer_size(WS_READ_BUFFER)
        .on_upgrade(move |socket| async move {
            let _permit = permit;
            let limits = crate::transport::LinkLimits::of(&node.config.server);
            crate::connection::serve(node, Link::websocket(socket, peer, limits)).await;
        })
}

async fn hashes_json(State(state): State<WebState>) -> impl IntoResponse {
    axum::Json(state.cert_hashes.as_ref().clone())
}

/// A file under `transports.web_root`; `/` and directories mean `index.html`.
async fn static_file(State(state): State<WebState>, uri: axum::http::Uri) -> Response {
    let Some(root) = state.web_root else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(path) = resolve(&root, uri.path()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let path = if tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_dir()) {
        path.join("index.html")
    } else {
        path
    };
    match tokio::fs::read(&path).await {
        Ok(body) => ([(header::CONTENT_TYPE, content_type(&path))], body).into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `request_path` under `root`, or None if it tries to leave it.
fn resolve(root: &Path, request_path: &str) -> Option<PathBuf> {
    let relative = Path::new(request_path.trim_start_matches('/'));
    let mut path = root.to_path_buf();
    for part in relative.components() {
        match part {
            Component::Normal(p) => path.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(path)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("ts") => "text/plain; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_paths_stay_under_the_root() {
        let root = Path::new("/srv/web");
        assert_eq!(
            resolve(root, "/demo/index.html"),
            Some(PathBuf::from("/srv/web/demo/index.html"))
        );
        assert_eq!(resolve(root, "/"), Some(PathBuf::from("/srv/web")));
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/demo/../../etc"), None);
    }
}
