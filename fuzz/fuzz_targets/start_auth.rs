//! Fuzzes Start authentication: a `StartRequest` as a client sends it,
//! decoded, and its `auth_token` checked by the HMAC and the JWT (HS256, with
//! `aud` and `iss` required) verifiers the data plane builds from its config
//! (`auth::Verifier`).
//!
//! Invariants checked:
//! - decoding and verification never panic, whatever the token holds;
//! - every refusal maps to a client error code and a metric label;
//! - a token the fuzzer made up is never accepted: neither verifier's key is
//!   reachable from the input;
//! - an HMAC token minted here for the input's openid is accepted for that
//!   openid and refused (OPENID_MISMATCH) for any other.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use gatesvr_dataplane::edge::auth::{AuthError, Verifier};
use gatesvr_dataplane::config::{AuthConfig, AuthMode};
use gatesvr_proto::client::StartRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;

const SECRET: &[u8] = b"fuzz-secret-0123456789";

struct Verifiers {
    hmac: Verifier,
    jwt: Verifier,
    /// Keeps the secret file's directory for the process.
    _dir: tempfile::TempDir,
}

fn verifiers() -> &'static Verifiers {
    static V: OnceLock<Verifiers> = OnceLock::new();
    V.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, SECRET).expect("secret file");
        let cfg = |mode| AuthConfig {
            mode,
            secret_file: Some(secret.clone()),
            jwt_audience: Some("gatesvr".into()),
            jwt_issuer: Some("login".into()),
            ..AuthConfig::default()
        };
        Verifiers {
            hmac: Verifier::from_config(&cfg(AuthMode::Hmac)).expect("hmac verifier"),
            jwt: Verifier::from_config(&cfg(AuthMode::Jwt)).expect("jwt verifier"),
            _dir: dir,
        }
    })
}

fn refused(result: Result<(), AuthError>) {
    let err = result.expect_err("a made-up token was accepted");
    let _ = (err.code(), err.reason());
}

fuzz_target!(|data: &[u8]| {
    let Ok(start) = StartRequest::decode(data) else {
        return;
    };
    let v = verifiers();
    refused(v.hmac.verify(&start.openid, &start.auth_token));
    refused(v.jwt.verify(&start.openid, &start.auth_token));

    let minted = gatesvr_common::token::issue(SECRET, &start.openid, Duration::from_secs(60));
    assert_eq!(v.hmac.verify(&start.openid, &minted), Ok(()));
    let other = format!("{}x", start.openid);
    assert_eq!(
        v.hmac.verify(&other, &minted),
        Err(AuthError::OpenidMismatch)
    );
});
