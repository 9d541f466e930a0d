//! Certificates for GateSvr: a private CA, the client-facing server
//! certificate, and one role certificate per internal identity, ECDSA P-256.
//!
//! Files written to the output directory (PEM):
//! - `ca.crt`, `ca.key`: the CA (keep `ca.key` offline outside development).
//! - `server.crt`, `server.key`: what clients see on QUIC; it names no role
//!   and internal ports refuse it.
//! - `<role>-<id>.crt`, `<role>-<id>.key` for each identity (see
//!   [`crate::identity`]): SAN URI `spiffe://<trust-domain>/<role>/<id>` plus
//!   the DNS names and IPs given, usable as server and client certificate.
//!
//! Private keys are written with mode 0600 (owner only), certificates 0644.
//! The server names cover `localhost`, `127.0.0.1`, `::1`, `gatesvr` and any
//! extra names given.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::identity::{Identity, Role};
use crate::tls::TlsFiles;

/// Names every certificate covers.
pub const DEFAULT_SANS: &[&str] = &["localhost", "127.0.0.1", "::1", "gatesvr"];

/// The identities `gatesvr certs` issues when none are named: a three-node
/// control plane, three data-plane nodes, the demo upstream and an operator.
pub const DEFAULT_IDENTITIES: &[(Role, &str)] = &[
    (Role::ControlPlane, "1"),
    (Role::ControlPlane, "2"),
    (Role::ControlPlane, "3"),
    (Role::DataPlane, "dp-1"),
    (Role::DataPlane, "dp-2"),
    (Role::DataPlane, "dp-3"),
    (Role::Upstream, "demo"),
    (Role::Admin, "operator"),
];

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Identity(#[from] crate::identity::IdentityError),
}

/// A directory of generated certificates.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub dir: PathBuf,
}

impl DevCerts {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    /// The client-facing (QUIC) certificate. It names no role.
    pub fn server(&self) -> TlsFiles {
        TlsFiles::dev_server(&self.dir)
    }
    /// The certificate of `role`/`id` (issue it first with [`issue`]).
    pub fn role(&self, role: Role, id: &str) -> TlsFiles {
        role_files(&self.dir, role, id)
    }
    /// True if the CA and the server certificate exist.
    pub fn complete(dir: &Path) -> bool {
        FILES.iter().all(|f| dir.join(f).is_file())
    }
}

const FILES: &[&str] = &["ca.crt", "ca.key", "server.crt", "server.key"];

/// Where the certificate of `role`/`id` lives in `dir`.
pub fn role_files(dir: &Path, role: Role, id: &str) -> TlsFiles {
    TlsFiles {
        cert_file: dir.join(format!("{role}-{id}.crt")),
        key_file: dir.join(format!("{role}-{id}.key")),
        ca_file: Some(dir.join("ca.crt")),
    }
}

/// Writes `contents` to `path`; `secret` files get mode 0600 from creation on
/// (never briefly world-readable).
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(if secret { 0o600 } else { 0o644 });
        let mut file = options.open(path).map_err(io)?;
        // An existing file keeps its old mode through open(): set it.
        if secret {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io)?;
        }
        file.write_all(contents.as_bytes()).map_err(io)?;
    }
    #[cfg(not(unix))]
    {
        let _ = secret;
        let mut file = options.open(path).map_err(io)?;
        file.write_all(contents.as_bytes()).map_err(io)?;
    }
    Ok(())
}

fn leaf_params(sans: Vec<String>, cn: &str) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

fn sans(extra: &[String]) -> Vec<String> {
    let mut sans: Vec<String> = DEFAULT_SANS.iter().map(|s| s.to_string()).collect();
    sans.extend(extra.iter().cloned());
    sans
}

/// Generates a fresh CA and server certificate into `dir`, plus a role
/// certificate for each of `identities` (in `trust_domain`).
pub fn generate_with(
    dir: &Path,
    extra_sans: &[String],
    trust_domain: &str,
    identities: &[(Role, String)],
) -> Result<DevCerts, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })?;

    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("GateSvr CA ({trust_domain})"));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write_file(&dir.join("ca.crt"), &ca_cert.pem(), false)?;
    write_file(&dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let server_cert = leaf_params(sans(extra_sans), "gatesvr")?.signed_by(&server_key, &issuer)?;
    write_file(&dir.join("server.crt"), &server_cert.pem(), false)?;
    write_file(&dir.join("server.key"), &server_key.serialize_pem(), true)?;

    for (role, id) in identities {
        let identity = Identity::new(trust_domain, *role, id.clone())?;
        issue_with(dir, &issuer, &identity, extra_sans)?;
    }
    Ok(DevCerts {
        dir: dir.to_path_buf(),
    })
}

/// [`generate_with`] in the default trust domain with [`DEFAULT_IDENTITIES`].
pub fn generate(dir: &Path, extra_sans: &[String]) -> Result<DevCerts, CertError> {
    let identities: Vec<(Role, String)> = DEFAULT_IDENTITIES
        .iter()
        .map(|(r, id)| (*r, (*id).to_string()))
        .collect();
    generate_with(
        dir,
        extra_sans,
        crate::identity::DEFAULT_TRUST_DOMAIN,
        &identities,
    )
}

fn issue_with(
    dir: &Path,
    issuer: &Issuer<'_, impl rcgen::SigningKey>,
    identity: &Identity,
    extra_sans: &[String],
) -> Result<TlsFiles, CertError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = leaf_params(
        sans(extra_sans),
        &format!("{}/{}", identity.role, identity.id),
    )?;
    params
        .subject_alt_names
        .push(SanType::URI(identity.uri().try_into()?));
    let cert = params.signed_by(&key, issuer)?;
    let files = role_files(dir, identity.role, &identity.id);
    write_file(&files.cert_file, &cert.pem(), false)?;
    write_file(&files.key_file, &key.serialize_pem(), true)?;
    Ok(files)
}

/// Issues one more role certificate signed by the CA in `dir` (`ca.crt`,
/// `ca.key`), e.g. for a new data-plane node. Returns its files.
pub fn issue(
    dir: &Path,
    identity: &Identity,
    extra_sans: &[String],
) -> Result<TlsFiles, CertError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| CertError::Io { path, source })
    };
    let ca_key = KeyPair::from_pem(&read("ca.key")?)?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.crt")?, &ca_key)?;
    issue_with(dir, &issuer, identity, extra_sans)
}

/// Generates certificates into `dir` unless a CA is already there; then
/// issues whichever of `identities` is missing.
pub fn ensure(dir: &Path, identities: &[(Role, String)]) -> Result<DevCerts, CertError> {
    if !DevCerts::complete(dir) {
        generate(dir, &[])?;
    }
    let certs = DevCerts {
        dir: dir.to_path_buf(),
    };
    for (role, id) in identities {
        if !certs.role(*role, id).cert_file.is_file() {
            let identity = Identity::new(crate::identity::DEFAULT_TRUST_DOMAIN, *role, id.clone())?;
            issue(dir, &identity, &[])?;
        }
    }
    Ok(certs)
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
        let dp = certs.role(Role::DataPlane, "dp-1");
        crate::tls::tonic_server_tls(&dp).unwrap();
        crate::tls::tonic_client_tls(&dp, "localhost").unwrap();
        // ensure() keeps an existing set and adds a missing identity.
        let before = std::fs::read(certs.ca_cert()).unwrap();
        ensure(dir.path(), &[(Role::DataPlane, "dp-9".into())]).unwrap();
        assert_eq!(before, std::fs::read(certs.ca_cert()).unwrap());
        let der = crate::tls::load_certs(&certs.role(Role::DataPlane, "dp-9").cert_file).unwrap();
        let id = Identity::from_cert(der[0].as_ref()).unwrap();
        assert_eq!(id.uri(), "spiffe://gatesvr/dataplane/dp-9");
        let der = crate::tls::load_certs(&certs.server().cert_file).unwrap();
        assert!(Identity::from_cert(der[0].as_ref()).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let certs = generate(dir.path(), &[]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
        assert_eq!(mode(&certs.server().key_file), 0o600);
        assert_eq!(mode(&certs.role(Role::Upstream, "demo").key_file), 0o600);
        assert_eq!(mode(&certs.ca_cert()), 0o644);
        // Regenerating over a world-readable key tightens it.
        let key = dir.path().join("ca.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        generate(dir.path(), &[]).unwrap();
        assert_eq!(mode(&key), 0o600);
    }
}
