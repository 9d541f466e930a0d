//! Client authentication: checks StartRequest.auth_token against the openid.
//!
//! Verifiers: HMAC tokens ([`gatesvr_common::token`], minted by
//! `gatectl token issue`), JWT (HS256 / RS256 / ES256, keys from files), and
//! `none` for `gatesvr dev` only. Each failure maps to a client error code and
//! a `gatesvr_auth_failures_total{reason}` label.
//!
//! JWT claims: `exp` is required; `nbf` is checked when present (a token not
//! yet valid, beyond `auth.clock_skew`, is refused as `not_yet_valid`); with
//! `auth.jwt_issuer` / `auth.jwt_audience` set, `iss` / `aud` are required and
//! must match (a token without them is refused, not waved through).

use std::time::Duration;

use gatesvr_proto::client::ErrorCode;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::config::{AuthConfig, AuthMode, JwtAlgorithm};

/// Why a Start was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, a malformed one, or a bad signature.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Signature fine, expiry (plus skew) passed.
    #[error("token expired")]
    Expired,
    /// The token belongs to another openid.
    #[error("token is for a different openid")]
    OpenidMismatch,
    /// Signature fine, but `nbf` (minus skew) is still in the future.
    #[error("token not valid yet (nbf)")]
    NotYetValid,
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Invalid(_) | AuthError::NotYetValid => ErrorCode::Unauthenticated,
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::OpenidMismatch => ErrorCode::OpenidMismatch,
        }
    }

    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Invalid(_) => "invalid",
            AuthError::Expired => "expired",
            AuthError::OpenidMismatch => "openid_mismatch",
            AuthError::NotYetValid => "not_yet_valid",
        }
    }
}

/// A configured verifier, cheap to share.
pub enum Verifier {
    None,
    Hmac {
        secret: Vec<u8>,
        skew: Duration,
        check_openid: bool,
    },
    Jwt {
        key: Box<DecodingKey>,
        validation: Box<Validation>,
        openid_claim: String,
        check_openid: bool,
    },
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verifier::None => "Verifier::None",
            Verifier::Hmac { .. } => "Verifier::Hmac",
            Verifier::Jwt { .. } => "Verifier::Jwt",
        })
    }
}

fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let trimmed = raw.trim_ascii().to_vec();
    if trimmed.is_empty() {
        return Err(format!("{}: secret is empty", path.display()));
    }
    Ok(trimmed)
}

impl Verifier {
    /// Builds the verifier, reading key files. Errors name the file.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, String> {
        Ok(match cfg.mode {
            AuthMode::None => {
                tracing::warn!(
                    "AUTHENTICATION IS DISABLED (auth.mode: none): any client may claim any openid. Development only."
                );
                Verifier::None
            }
            AuthMode::Hmac => {
                let path = cfg
                    .secret_file
                    .as_ref()
                    .ok_or("auth.secret_file is required")?;
                Verifier::Hmac {
                    secret: read_secret(path)?,
                    skew: cfg.clock_skew,
                    check_openid: cfg.check_openid,
                }
            }
            AuthMode::Jwt => {
                let (alg, key) = match cfg.jwt_algorithm {
                    JwtAlgorithm::HS256 => {
                        let path = cfg
                            .secret_file
                            .as_ref()
                            .ok_or("auth.secret_file is required")?;
                        (
                            Algorithm::HS256,
                            DecodingKey::from_secret(&read_secret(path)?),
                        )
                    }
                    JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                        let path = cfg
                            .jwt_public_key_file
                            .as_ref()
                            .ok_or("auth.jwt_public_key_file is required")?;
                        let pem =
                            std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                        if cfg.jwt_algorithm == JwtAlgorithm::RS256 {
                            let key = DecodingKey::from_rsa_pem(&pem)
                                .map_err(|e| format!("{}: {e}", path.display()))?;
                            (Algorithm::RS256, key)
                        } else {
                            let key = DecodingKey::from_ec_pem(&pem)
                                .map_err(|e| format!("{}: {e}", path.display()))?;
                            (Algorithm::ES256, key)
                        }
                    }
                };
                let mut validation = Validation::new(alg);
                validation.leeway = cfg.clock_skew.as_secs();
                validation.validate_nbf = true;
                validation.validate_aud = cfg.jwt_audience.is_some();
                let mut required = vec!["exp"];
                if let Some(aud) = &cfg.jwt_audience {
                    validation.set_audience(&[aud]);
                    required.push("aud");
                }
                if let Some(iss) = &cfg.jwt_issuer {
                    validation.set_issuer(&[iss]);
                    required.push("iss");
                }
                validation.set_required_spec_claims(&required);
                Verifier::Jwt {
                    key: Box::new(key),
                    validation: Box::new(validation),
                    openid_claim: cfg.openid_claim.clone(),
                    check_openid: cfg.check_openid,
                }
            }
        })
    }

    /// Checks `token` for `openid`.
    pub fn verify(&self, openid: &str, token: &str) -> Result<(), AuthError> {
        match self {
            Verifier::None => Ok(()),
            Verifier::Hmac {
                secret,
                skew,
                check_openid,
            } => {
                use gatesvr_common::token::{TokenError, verify};
                let claims = verify(secret, token, *skew).map_err(|e| match e {
                    TokenError::Expired { .. } => AuthError::Expired,
                    other => AuthError::Invalid(other.to_string()),
                })?;
                if *check_openid && claims.openid != openid {
                    return Err(AuthError::OpenidMismatch);
                }
                Ok(())
            }
            Verifier::Jwt {
                key,
                validation,
                openid_claim,
                check_openid,
            } => {
                let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                    token, key, validation,
                )
                .map_err(|e| match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                    jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    _ => AuthError::Invalid(e.to_string()),
                })?;
                if *check_openid {
                    let claimed = data.claims.get(openid_claim).and_then(|v| v.as_str());
                    if claimed != Some(openid) {
                        return Err(AuthError::OpenidMismatch);
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: AuthMode, secret: &std::path::Path) -> AuthConfig {
        AuthConfig {
            mode,
            secret_file: Some(secret.to_path_buf()),
            ..AuthConfig::default()
        }
    }

    #[test]
    fn hmac_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let v = Verifier::from_config(&cfg(AuthMode::Hmac, &secret)).unwrap();
        let good = gatesvr_common::token::issue(b"s3cret", "alice", Duration::from_secs(60));
        assert_eq!(v.verify("alice", &good), Ok(()));
        assert_eq!(v.verify("bob", &good), Err(AuthError::OpenidMismatch));
        let old = gatesvr_common::token::issue_at(b"s3cret", "alice", 1);
        assert_eq!(v.verify("alice", &old), Err(AuthError::Expired));
        let forged = gatesvr_common::token::issue(b"other", "alice", Duration::from_secs(60));
        assert_eq!(
            v.verify("alice", &forged).unwrap_err().code(),
            ErrorCode::Unauthenticated
        );
        assert_eq!(
            v.verify("alice", "").unwrap_err().code(),
            ErrorCode::Unauthenticated
        );
    }

    /// ES256 with a P-256 key pair generated here (rcgen writes PKCS#8 PEM).
    #[test]
    fn jwt_es256_with_a_public_key_file() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let public = dir.path().join("es256.pub.pem");
        std::fs::write(&public, key.public_key_pem()).unwrap();
        let cfg = AuthConfig {
            mode: AuthMode::Jwt,
            jwt_algorithm: JwtAlgorithm::ES256,
            jwt_public_key_file: Some(public),
            jwt_issuer: Some("login".into()),
            ..AuthConfig::default()
        };
        let v = Verifier::from_config(&cfg).unwrap();
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let mint = |iss: &str| {
            encode(
                &Header::new(Algorithm::ES256),
                &serde_json::json!({"sub": "alice", "exp": exp, "iss": iss}),
                &signing,
            )
            .unwrap()
        };
        assert_eq!(v.verify("alice", &mint("login")), Ok(()));
        assert!(matches!(
            v.verify("alice", &mint("elsewhere")),
            Err(AuthError::Invalid(_))
        ));
        // Another key's signature is refused.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let forged = encode(
            &Header::new(Algorithm::ES256),
            &serde_json::json!({"sub": "alice", "exp": exp, "iss": "login"}),
            &EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            v.verify("alice", &forged),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn jwt_hs256() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "jwt-secret").unwrap();
        let v = Verifier::from_config(&cfg(AuthMode::Jwt, &secret)).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mint = |sub: &str, exp: u64| {
            encode(
                &Header::new(Algorithm::HS256),
                &serde_json::json!({"sub": sub, "exp": exp}),
                &EncodingKey::from_secret(b"jwt-secret"),
            )
            .unwrap()
        };
        assert_eq!(v.verify("alice", &mint("alice", now + 60)), Ok(()));
        assert_eq!(
            v.verify("bob", &mint("alice", now + 60)),
            Err(AuthError::OpenidMismatch)
        );
        assert_eq!(
            v.verify("alice", &mint("alice", now - 3600)),
            Err(AuthError::Expired)
        );
        assert!(matches!(
            v.verify("alice", "not.a.jwt"),
            Err(AuthError::Invalid(_))
        ));
    }

    /// `nbf` is honoured; configured `aud` and `iss` are required, not optional.
    #[test]
    fn jwt_nbf_aud_and_iss() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "jwt-secret").unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mint = |claims: serde_json::Value| {
            encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(b"jwt-secret"),
            )
            .unwrap()
        };
        let exp = now + 600;

        // nbf, with or without aud/iss configured.
        let plain = Verifier::from_config(&cfg(AuthMode::Jwt, &secret)).unwrap();
        let later = mint(serde_json::json!({"sub": "alice", "exp": exp, "nbf": now + 300}));
        assert_eq!(plain.verify("alice", &later), Err(AuthError::NotYetValid));
        assert_eq!(AuthError::NotYetValid.reason(), "not_yet_valid");
        let within_skew = mint(serde_json::json!({"sub": "alice", "exp": exp, "nbf": now + 5}));
        assert_eq!(plain.verify("alice", &within_skew), Ok(()));
        let started = mint(serde_json::json!({"sub": "alice", "exp": exp, "nbf": now - 5}));
        assert_eq!(plain.verify("alice", &started), Ok(()));

        // aud and iss configured: required and checked.
        let strict = Verifier::from_config(&AuthConfig {
            jwt_audience: Some("gatesvr".into()),
            jwt_issuer: Some("login".into()),
            ..cfg(AuthMode::Jwt, &secret)
        })
        .unwrap();
        let ok =
            mint(serde_json::json!({"sub": "alice", "exp": exp, "aud": "gatesvr", "iss": "login"}));
        assert_eq!(strict.verify("alice", &ok), Ok(()));
        for claims in [
            serde_json::json!({"sub": "alice", "exp": exp, "iss": "login"}),
            serde_json::json!({"sub": "alice", "exp": exp, "aud": "gatesvr"}),
            serde_json::json!({"sub": "alice", "exp": exp, "aud": "other", "iss": "login"}),
            serde_json::json!({"sub": "alice", "exp": exp, "aud": "gatesvr", "iss": "elsewhere"}),
        ] {
            assert!(
                matches!(
                    strict.verify("alice", &mint(claims.clone())),
                    Err(AuthError::Invalid(_))
                ),
                "{claims}"
            );
        }
    }
}
