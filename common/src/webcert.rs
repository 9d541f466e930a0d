//! Short-lived server certificates for browsers' WebTransport.
//!
//! A page may reach a WebTransport server whose certificate no browser
//! trusts only through `serverCertificateHashes`, and then the certificate
//! must be ECDSA P-256 with a validity period under two weeks (MDN,
//! `WebTransport()`; shared PITFALLS §7). `gatesvr dev` and the browser tests
//! therefore issue such a certificate at start-up, signed by the dev CA so
//! that native clients holding the CA keep verifying it as before. Restart
//! (or re-issue) before it expires.

use std::path::Path;
use std::time::Duration;

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};

use crate::certs::CertError;
use crate::tls::TlsFiles;

/// Longest validity browsers accept with `serverCertificateHashes` is 14
/// days; one hour of it covers clock skew before `now`.
pub const VALIDITY: Duration = Duration::from_secs(13 * 24 * 3600);

/// Issues a P-256 server certificate for `names`, valid from an hour ago for
/// [`VALIDITY`], signed by the CA in `ca_dir` (`ca.crt`, `ca.key`), and
/// writes it to `out_dir` as `web.crt` / `web.key`.
pub fn issue(ca_dir: &Path, out_dir: &Path, names: &[String]) -> Result<TlsFiles, CertError> {
    let read = |name: &str| {
        let path = ca_dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| CertError::Io { path, source })
    };
    let ca_key = KeyPair::from_pem(&read("ca.key")?)?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.crt")?, ca_key)?;

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "gatesvr-web");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + VALIDITY;
    let cert = params.signed_by(&key, &issuer)?;

    std::fs::create_dir_all(out_dir).map_err(|source| CertError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let files = TlsFiles {
        cert_file: out_dir.join("web.crt"),
        key_file: out_dir.join("web.key"),
        ca_file: None,
    };
    let write = |path: &Path, contents: String| {
        std::fs::write(path, contents).map_err(|source| CertError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    write(&files.cert_file, cert.pem())?;
    write(&files.key_file, key.serialize_pem())?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn issued_certificates_chain_to_the_dev_ca_and_expire_within_two_weeks() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = crate::certs::generate(dir.path(), &[]).expect("dev certs");
        let files =
            issue(dir.path(), &dir.path().join("web"), &["localhost".into()]).expect("issued");
        let certs = crate::tls::load_certs(&files.cert_file).expect("pem");
        let roots = crate::tls::root_store(&ca.ca_cert()).expect("ca");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            crate::tls::provider(),
        )
        .build()
        .expect("verifier");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let now = rustls_pki_types::UnixTime::now();
        verifier
            .verify_server_cert(&certs[0], &[], &name, &[], now)
            .expect("chains to the dev CA");
        let later = rustls_pki_types::UnixTime::since_unix_epoch(
            Duration::from_secs(now.as_secs()) + Duration::from_secs(14 * 24 * 3600),
        );
        assert!(
            verifier
                .verify_server_cert(&certs[0], &[], &name, &[], later)
                .is_err(),
            "expired after two weeks"
        );
    }
}
