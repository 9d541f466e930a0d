//! Who a certificate belongs to: a role and an id inside one trust domain.
//!
//! Every certificate GateSvr's processes present to each other names its
//! holder as one SAN URI `spiffe://<trust-domain>/<role>/<id>` (the SPIFFE ID
//! shape, so a SPIRE or cert-manager CSI setup can issue them too). The CA
//! signing a certificate proves only that it is ours; the URI says what the
//! holder may do: a leaked upstream certificate must not be able to pose as a
//! data-plane node, nor a data-plane node as another one.

use std::fmt;

use x509_parser::extensions::GeneralName;

/// The trust domain `gatesvr certs` and the configs use unless told otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "gatesvr";

/// The id of a role certificate shared by every process of the role (what
/// Helm's generated certificates carry: one Secret serves every pod of a
/// Deployment). It still cannot act as another role, but it may act for any
/// node of its own; per-node certificates bind the node id too.
pub const SHARED_ID: &str = "_any";

/// What a process is, hence which internal methods it may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A control-plane (raft) member. Id: its raft node id.
    ControlPlane,
    /// A data-plane node. Id: its `node_id`.
    DataPlane,
    /// An upstream service instance. Id: free (service or instance name).
    Upstream,
    /// An operator or tool (gatectl, the admin API, `/drain`). Id: who.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::ControlPlane,
        Role::DataPlane,
        Role::Upstream,
        Role::Admin,
    ];

    /// The path segment in the SPIFFE URI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ControlPlane => "controlplane",
            Role::DataPlane => "dataplane",
            Role::Upstream => "upstream",
            Role::Admin => "admin",
        }
    }

    /// Parses a role name; `operator` is accepted for `admin`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "controlplane" => Some(Role::ControlPlane),
            "dataplane" => Some(Role::DataPlane),
            "upstream" => Some(Role::Upstream),
            "admin" | "operator" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verified holder: trust domain, role and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub role: Role,
    pub id: String,
}

/// Why a certificate or URI names no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The certificate could not be parsed as X.509.
    #[error("unparsable certificate")]
    BadCertificate,
    /// No `spiffe://` URI in the certificate's SAN.
    #[error("the certificate names no role (no spiffe:// SAN URI); issue one with `gatesvr certs`")]
    NoIdentity,
    /// More than one `spiffe://` URI: ambiguous, refused.
    #[error("the certificate has several spiffe:// SAN URIs")]
    Ambiguous,
    /// A URI not of the form `spiffe://<trust-domain>/<role>/<id>`.
    #[error("{uri:?} is not spiffe://<trust-domain>/<role>/<id>: {reason}")]
    Malformed { uri: String, reason: &'static str },
}

/// Ids and trust domains: what is safe in a URI path, a log line and a
/// metric label without escaping.
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Identity {
    /// An identity; fails if the trust domain or id holds characters a URI
    /// path segment cannot carry unescaped.
    pub fn new(
        trust_domain: impl Into<String>,
        role: Role,
        id: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let identity = Identity {
            trust_domain: trust_domain.into(),
            role,
            id: id.into(),
        };
        if !valid_segment(&identity.trust_domain) || !valid_segment(&identity.id) {
            return Err(IdentityError::Malformed {
                uri: identity.uri(),
                reason: "trust domain and id must be 1-128 of [A-Za-z0-9._-]",
            });
        }
        Ok(identity)
    }

    /// `spiffe://<trust-domain>/<role>/<id>`.
    pub fn uri(&self) -> String {
        format!("spiffe://{}/{}/{}", self.trust_domain, self.role, self.id)
    }

    /// Parses `spiffe://<trust-domain>/<role>/<id>`.
    pub fn parse_uri(uri: &str) -> Result<Self, IdentityError> {
        let bad = |reason| IdentityError::Malformed {
            uri: uri.to_string(),
            reason,
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("scheme must be spiffe"))?;
        let mut parts = rest.split('/');
        let (Some(td), Some(role), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected exactly <trust-domain>/<role>/<id>"));
        };
        let role = Role::parse(role).ok_or_else(|| bad("unknown role"))?;
        Identity::new(td, role, id).map_err(|_| bad("invalid trust domain or id"))
    }

    /// True if this identity may act for node `id` of its role: its own id,
    /// or any id for a [`SHARED_ID`] certificate.
    pub fn acts_for(&self, id: &str) -> bool {
        self.id == id || self.id == SHARED_ID
    }

    /// The identity a DER certificate names: its one `spiffe://` SAN URI, or,
    /// for issuers that cannot write URI SANs (Helm's `genSignedCert`), a
    /// subject CN holding the same URI. The CA vouches for both alike.
    pub fn from_cert(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::BadCertificate)?;
        let san = cert
            .subject_alternative_name()
            .map_err(|_| IdentityError::BadCertificate)?;
        let mut uris = san
            .iter()
            .flat_map(|s| s.value.general_names.iter())
            .filter_map(|n| match n {
                GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
                _ => None,
            });
        let Some(first) = uris.next() else {
            let cn = cert
                .subject()
                .iter_common_name()
                .find_map(|cn| cn.as_str().ok().filter(|s| s.starts_with("spiffe://")));
            return cn.map_or(Err(IdentityError::NoIdentity), Identity::parse_uri);
        };
        if uris.next().is_some() {
            return Err(IdentityError::Ambiguous);
        }
        Identity::parse_uri(first)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip_and_refusals() {
        let id = Identity::new("gatesvr", Role::DataPlane, "dp-1").unwrap();
        assert_eq!(id.uri(), "spiffe://gatesvr/dataplane/dp-1");
        assert_eq!(Identity::parse_uri(&id.uri()).unwrap(), id);
        assert_eq!(
            Identity::parse_uri("spiffe://td/operator/alice")
                .unwrap()
                .role,
            Role::Admin
        );
        for bad in [
            "https://gatesvr/dataplane/dp-1",
            "spiffe://gatesvr/dataplane",
            "spiffe://gatesvr/dataplane/dp-1/x",
            "spiffe://gatesvr/king/dp-1",
            "spiffe://gatesvr/dataplane/",
            "spiffe:///dataplane/dp-1",
            "spiffe://gatesvr/dataplane/a b",
        ] {
            assert!(Identity::parse_uri(bad).is_err(), "{bad}");
        }
        assert!(Identity::new("gatesvr", Role::Upstream, "a/b").is_err());
    }

    #[test]
    fn identity_from_a_certificate() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://gatesvr/upstream/chat".try_into().unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        let id = Identity::from_cert(cert.der()).unwrap();
        assert_eq!((id.role, id.id.as_str()), (Role::Upstream, "chat"));

        let plain = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            Identity::from_cert(plain.der()),
            Err(IdentityError::NoIdentity)
        );
        assert_eq!(
            Identity::from_cert(b"junk"),
            Err(IdentityError::BadCertificate)
        );

        // A CN holding the URI (Helm's genSignedCert cannot write URI SANs).
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "spiffe://gatesvr/dataplane/_any");
        let shared = Identity::from_cert(params.self_signed(&key).unwrap().der()).unwrap();
        assert_eq!(shared.role, Role::DataPlane);
        assert!(shared.acts_for("dp-7"));
        assert!(!id.acts_for("other"));
    }
}
