//! Development certificates: a private CA, a server certificate and a client
//! certificate (for mTLS between GateSvr's own processes), ECDSA P-256.
//!
//! Files written to the output directory (PEM):
//! `ca.crt`, `ca.key`, `server.crt`, `server.key`, `client.crt`, `client.key`.
//! The server certificate covers `localhost`, `127.0.0.1`, `::1`, `gatesvr`
//! and any extra names given. Never use these in production: the CA key sits
//! next to the certificates.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Names every dev server certificate covers.
pub const DEFAULT_SANS: &[&str] = &["localhost", "127.0.0.1", "::1", "gatesvr"];

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Paths of the generated files.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub dir: PathBuf,
}

impl DevCerts {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn server(&self) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles::dev_server(&self.dir)
    }
    pub fn client(&self) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles::dev_client(&self.dir)
    }
    /// True if every file exists.
    pub fn complete(dir: &Path) -> bool {
        FILES.iter().all(|f| dir.join(f).is_file())
    }
}

const FILES: &[&str] = &[
    "ca.crt",
    "ca.key",
    "server.crt",
    "server.key",
    "client.crt",
    "client.key",
];

/// Generates a fresh CA, server and client certificate into `dir`.
pub fn generate(dir: &Path, extra_sans: &[String]) -> Result<DevCerts, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })?;

    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "GateSvr development CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let mut sans: Vec<String> = DEFAULT_SANS.iter().map(|s| s.to_string()).collect();
    sans.extend(extra_sans.iter().cloned());
    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut server_params = CertificateParams::new(sans)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "gatesvr");
    server_params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        // Internal peers (raft, handover) use the server certificate as their
        // client identity too.
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut client_params = CertificateParams::new(vec!["gatesvr-client".to_string()])?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, "gatesvr-client");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &issuer)?;

    let write = |name: &str, contents: String| {
        let path = dir.join(name);
        std::fs::write(&path, contents).map_err(|source| CertError::Io { path, source })
    };
    write("ca.crt", ca_cert.pem())?;
    write("ca.key", ca_key.serialize_pem())?;
    write("server.crt", server_cert.pem())?;
    write("server.key", server_key.serialize_pem())?;
    write("client.crt", client_cert.pem())?;
    write("client.key", client_key.serialize_pem())?;
    Ok(DevCerts {
        dir: dir.to_path_buf(),
    })
}

/// Generates certificates into `dir` unless a complete set is already there.
pub fn ensure(dir: &Path) -> Result<DevCerts, CertError> {
    if DevCerts::complete(dir) {
        return Ok(DevCerts {
            dir: dir.to_path_buf(),
        });
    }
    generate(dir, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certs_load_and_build_configs() {
        crate::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let certs = generate(dir.path(), &["gate.example".into()]).unwrap();
        assert!(DevCerts::complete(dir.path()));
        crate::tls::server_config(&certs.server()).unwrap();
        crate::tls::client_config(&certs.ca_cert()).unwrap();
        crate::tls::tonic_server_tls(&certs.server()).unwrap();
        crate::tls::tonic_client_tls(&certs.client(), "localhost").unwrap();
        // ensure() keeps an existing set.
        let before = std::fs::read(certs.ca_cert()).unwrap();
        ensure(dir.path()).unwrap();
        assert_eq!(before, std::fs::read(certs.ca_cert()).unwrap());
    }
}
