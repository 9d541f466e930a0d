//! TLS configuration from PEM files, always on the ring provider.
//!
//! GateSvr never compiles aws-lc-rs, so exactly one rustls provider exists;
//! [`install_crypto_provider`] still installs it explicitly first thing in
//! `main` so nothing depends on rustls guessing (PITFALLS §2).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// Certificate, key and (for mTLS) the CA that signs peers' certificates.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CA bundle used to verify the peer. Required for mTLS.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl TlsFiles {
    /// The client-facing certificate written by `gatesvr certs --out DIR`
    /// (role certificates: [`crate::certs::role_files`]).
    pub fn dev_server(dir: &Path) -> Self {
        Self {
            cert_file: dir.join("server.crt"),
            key_file: dir.join("server.key"),
            ca_file: Some(dir.join("ca.crt")),
        }
    }

    /// Checks every named file exists; `key` prefixes the error's key path.
    pub fn validate(&self, key: &str) -> Result<(), crate::config::ConfigError> {
        crate::config::require_file(&format!("{key}.cert_file"), &self.cert_file)?;
        crate::config::require_file(&format!("{key}.key_file"), &self.key_file)?;
        if let Some(ca) = &self.ca_file {
            crate::config::require_file(&format!("{key}.ca_file"), ca)?;
        }
        Ok(())
    }
}

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing, unreadable or holds no usable item.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// rustls refused the combination (e.g. key does not match certificate).
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// mTLS was asked for but no CA file was configured.
    #[error("mutual TLS needs a ca_file to verify peers")]
    NoCa,
}

/// Installs ring as the process-wide rustls provider. Idempotent.
pub fn install_crypto_provider() {
    // Err means a provider is already installed (by an earlier call): fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The ring provider, for builders that take one explicitly.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("no CERTIFICATE in PEM file".into()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Root store holding the certificates of `ca_file`.
pub fn root_store(ca_file: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca_file)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A TLS 1.3 server config presenting `files`' certificate, without client
/// authentication (client-facing QUIC: clients authenticate with tokens).
pub fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(load_certs(&files.cert_file)?, load_key(&files.key_file)?)?;
    Ok(config)
}

/// A TLS 1.3 client config trusting `ca_file` (or, without one, nothing but
/// what the caller adds), presenting no client certificate.
pub fn client_config(ca_file: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(ca_file)?)
        .with_no_client_auth();
    Ok(config)
}

/// tonic server TLS requiring a client certificate signed by `ca_file` (mTLS).
pub fn tonic_server_tls(files: &TlsFiles) -> Result<tonic::transport::ServerTlsConfig, TlsError> {
    let ca = files.ca_file.as_deref().ok_or(TlsError::NoCa)?;
    let identity =
        tonic::transport::Identity::from_pem(read(&files.cert_file)?, read(&files.key_file)?);
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?)))
}

/// tonic client TLS presenting `files`' certificate and trusting `ca_file`.
/// `domain` is the name checked against the server certificate.
pub fn tonic_client_tls(
    files: &TlsFiles,
    domain: &str,
) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
    let ca = files.ca_file.as_deref().ok_or(TlsError::NoCa)?;
    let identity =
        tonic::transport::Identity::from_pem(read(&files.cert_file)?, read(&files.key_file)?);
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?))
        .identity(identity)
        .domain_name(domain))
}
