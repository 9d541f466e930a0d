//! HTTPS for the admin API: an [`axum::serve::Listener`] whose connections are TLS streams.
//!
//! Handshakes run in their own tasks (bounded by a deadline), so a client that stalls in its
//! handshake never holds up others; finished ones are handed to axum through a channel.
//! With `admin.tls.client_ca_file`, a client certificate signed by that CA is required too, and
//! it must name the `admin` role of the cluster's trust domain (a data-plane or upstream
//! certificate from the same CA is refused at the handshake, counted in
//! `gatesvr_authz_denied_total{service="admin"}`): a stolen token alone, or with the wrong
//! certificate, opens nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use gatesvr_common::authz::{Denial, Denials, Reason};
use gatesvr_common::identity::{Identity, Role};

use crate::config::AdminTlsConfig;
use crate::error::Error;

/// Who may hold an admin connection when client certificates are required.
#[derive(Clone, Debug)]
pub struct AdminPeers {
    pub trust_domain: String,
    pub denials: Denials,
}

impl AdminPeers {
    /// `Ok` for a connection without a client certificate (none required) or
    /// with an `admin` identity of our trust domain.
    fn check(&self, certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Result<(), ()> {
        let Some(leaf) = certs.and_then(|c| c.first()) else {
            return Ok(());
        };
        let (reason, caller, detail) = match Identity::from_cert(leaf.as_ref()) {
            Ok(id) if id.trust_domain != self.trust_domain => {
                (Reason::ForeignTrustDomain, Some(id), "foreign trust domain")
            }
            Ok(id) if id.role != Role::Admin => (
                Reason::WrongRole,
                Some(id),
                "the admin API needs the admin role",
            ),
            Ok(_) => return Ok(()),
            Err(_) => (Reason::NoIdentity, None, "the certificate names no role"),
        };
        let _ = self.denials.refuse(
            Denial {
                service: "admin",
                method: "https",
                reason,
            },
            caller.as_ref(),
            detail,
        );
        Err(())
    }
}

/// A TLS handshake not finished in this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The rustls server config of the admin port.
pub fn server_config(cfg: &AdminTlsConfig) -> Result<rustls::ServerConfig, Error> {
    use gatesvr_common::tls::{load_certs, load_key, provider, root_store};
    let tls = |e: &dyn std::fmt::Display| Error::Tls(format!("admin.tls: {e}"));
    let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) else {
        return Err(Error::Tls(
            "admin.tls: cert_file and key_file are needed".into(),
        ));
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls(&e))?;
    let builder = match &cfg.client_ca_file {
        Some(ca) => {
            let roots = Arc::new(root_store(ca).map_err(|e| tls(&e))?);
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| tls(&e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(
            load_certs(cert).map_err(|e| tls(&e))?,
            load_key(key).map_err(|e| tls(&e))?,
        )
        .map_err(|e| tls(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Accepted, handshaken TLS connections.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `listener` until `stop`.
    pub fn new(
        listener: TcpListener,
        config: rustls::ServerConfig,
        peers: AdminPeers,
        stop: CancellationToken,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::debug!(error = %e, "admin accept");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = stop.cancelled() => return,
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let peers = peers.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            if peers.check(tls.get_ref().1.peer_certificates()).is_ok() {
                                let _ = tx.send((tls, peer)).await;
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "admin TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "admin TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended (stopping): wait for the graceful shutdown to finish.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
