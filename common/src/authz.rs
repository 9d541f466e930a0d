//! Per-method authorization of internal gRPC calls, as one tower layer.
//!
//! Each plane declares a table with exactly one [`Rule`] per gRPC path
//! (`/package.Service/Method`); a path missing from the table is refused, so a
//! method added to a `.proto` is closed until someone writes its rule. The
//! layer reads the verified client certificate (mTLS already checked the CA)
//! for its [`Identity`], applies the path's rule, and either passes the request
//! on with the caller's identity in its extensions (handlers that must compare
//! it with the body, such as "a data-plane node may only speak for itself",
//! read it with [`caller`]) or answers `UNAUTHENTICATED` / `PERMISSION_DENIED`
//! itself. Every refusal is counted by the plane's hook (its metric) and
//! logged at most once a second with the number suppressed in between, so an
//! attacker's loop cannot flood the log.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use rustls_pki_types::CertificateDer;
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::identity::{Identity, Role};

/// Who may call one method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Anyone who reached the port (grpc.health.v1: reveals nothing).
    Open,
    /// A certificate naming one of these roles.
    Roles(&'static [Role]),
    /// A certificate naming one of these roles, or `authorization: Bearer
    /// <token>` when the plane has a token configured.
    RolesOrToken(&'static [Role]),
}

/// Why a call was refused; also the `reason` label of the denial metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The path has no rule.
    UnknownMethod,
    /// No client certificate (and no acceptable token).
    NoCertificate,
    /// A certificate without a usable `spiffe://` identity.
    NoIdentity,
    /// An identity from another trust domain.
    ForeignTrustDomain,
    /// The role may not call this method.
    WrongRole,
    /// A bearer token was presented and is wrong.
    BadToken,
    /// A data-plane node spoke for another node (checked by handlers).
    WrongNode,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownMethod => "unknown_method",
            Reason::NoCertificate => "no_certificate",
            Reason::NoIdentity => "no_identity",
            Reason::ForeignTrustDomain => "foreign_trust_domain",
            Reason::WrongRole => "wrong_role",
            Reason::BadToken => "bad_token",
            Reason::WrongNode => "wrong_node",
        }
    }
}

/// One refusal, as reported to the plane's hook.
#[derive(Debug, Clone)]
pub struct Denial<'a> {
    /// `package.Service`, or `unknown` for a path without a rule (attacker
    /// controlled strings never become label values).
    pub service: &'a str,
    pub method: &'a str,
    pub reason: Reason,
}

type Hook = Arc<dyn Fn(&Denial<'_>) + Send + Sync>;

/// Counts and logs refusals (the log at most once a second).
#[derive(Clone)]
pub struct Denials {
    plane: &'static str,
    hook: Hook,
    /// Milliseconds since `start` of the last logged refusal.
    last_log_ms: Arc<AtomicU64>,
    suppressed: Arc<AtomicU64>,
    start: tokio::time::Instant,
}

impl std::fmt::Debug for Denials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Denials")
            .field("plane", &self.plane)
            .finish()
    }
}

const LOG_EVERY_MS: u64 = 1000;

impl Denials {
    /// `hook` records each refusal (typically a metric increment).
    pub fn new(plane: &'static str, hook: impl Fn(&Denial<'_>) + Send + Sync + 'static) -> Self {
        Self {
            plane,
            hook: Arc::new(hook),
            last_log_ms: Arc::new(AtomicU64::new(0)),
            suppressed: Arc::new(AtomicU64::new(0)),
            start: tokio::time::Instant::now(),
        }
    }

    /// Records a refusal and returns the status to answer with.
    pub fn refuse(&self, denial: Denial<'_>, caller: Option<&Identity>, detail: &str) -> Status {
        (self.hook)(&denial);
        let now =
            u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX) + LOG_EVERY_MS;
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= LOG_EVERY_MS
            && self
                .last_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(
                plane = self.plane,
                service = denial.service,
                method = denial.method,
                reason = denial.reason.as_str(),
                caller = caller.map(|c| c.uri()).unwrap_or_default(),
                suppressed_since_last_log = suppressed,
                "internal call refused: {detail}"
            );
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
        let message = format!("{}: {detail}", denial.reason.as_str());
        match denial.reason {
            Reason::NoCertificate | Reason::NoIdentity | Reason::BadToken => {
                Status::unauthenticated(message)
            }
            _ => Status::permission_denied(message),
        }
    }
}

/// One plane's rules and what they need to be checked.
#[derive(Clone)]
pub struct Policy {
    rules: &'static [(&'static str, Rule)],
    trust_domain: Arc<str>,
    token: Option<Arc<str>>,
    denials: Denials,
    /// False only for an explicitly insecure (plaintext) port: every call
    /// passes, since there is no certificate to check.
    enforce: bool,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("trust_domain", &self.trust_domain)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("enforce", &self.enforce)
            .finish()
    }
}

/// Compares without an early exit on the first differing byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `/package.Service/Method` -> (`package.Service`, `Method`).
fn split_path(path: &str) -> Option<(&str, &str)> {
    path.strip_prefix('/')?.split_once('/')
}

impl Policy {
    /// Enforcing `rules` for identities of `trust_domain`; `token` (the push
    /// token) satisfies [`Rule::RolesOrToken`].
    pub fn new(
        rules: &'static [(&'static str, Rule)],
        trust_domain: &str,
        token: Option<Arc<str>>,
        denials: Denials,
    ) -> Self {
        Self {
            rules,
            trust_domain: Arc::from(trust_domain),
            token,
            denials,
            enforce: true,
        }
    }

    /// For a port the operator explicitly left plaintext: nothing to verify.
    pub fn insecure(mut self) -> Self {
        self.enforce = false;
        self
    }

    pub fn denials(&self) -> &Denials {
        &self.denials
    }

    /// The rule of `path`, if it has one.
    pub fn rule(&self, path: &str) -> Option<Rule> {
        self.rules
            .iter()
            .find_map(|(p, rule)| (*p == path).then_some(*rule))
    }

    /// Decides one call: `Ok(identity)` to pass it on, or the status to answer.
    pub fn check(
        &self,
        path: &str,
        certs: Option<&[CertificateDer<'_>]>,
        authorization: Option<&[u8]>,
    ) -> Result<Option<Identity>, Status> {
        if !self.enforce {
            return Ok(None);
        }
        let Some(rule) = self.rule(path) else {
            let denial = Denial {
                service: "unknown",
                method: "unknown",
                reason: Reason::UnknownMethod,
            };
            return Err(self.denials.refuse(denial, None, "no such method"));
        };
        let (service, method) = split_path(path).unwrap_or(("unknown", "unknown"));
        let refuse = |reason, caller: Option<&Identity>, detail: &str| {
            self.denials.refuse(
                Denial {
                    service,
                    method,
                    reason,
                },
                caller,
                detail,
            )
        };
        let parsed = certs
            .and_then(|c| c.first())
            .map(|cert| Identity::from_cert(cert.as_ref()));
        if rule == Rule::Open {
            // Anyone may call it: a certificate naming no role is no reason to refuse.
            return Ok(parsed.and_then(Result::ok));
        }
        let identity = match parsed {
            Some(Ok(identity)) => Some(identity),
            Some(Err(e)) => return Err(refuse(Reason::NoIdentity, None, &e.to_string())),
            None => None,
        };
        let roles: &[Role] = match &rule {
            Rule::Open => return Ok(identity),
            Rule::Roles(roles) => roles,
            Rule::RolesOrToken(roles) => {
                if let (None, Some(token), Some(presented)) =
                    (&identity, &self.token, authorization)
                {
                    let bearer = presented.strip_prefix(b"Bearer ").unwrap_or(b"");
                    if same(bearer, token.as_bytes()) {
                        return Ok(None);
                    }
                    return Err(refuse(Reason::BadToken, None, "invalid push token"));
                }
                roles
            }
        };
        self.require(identity, roles, refuse)
    }

    fn require(
        &self,
        identity: Option<Identity>,
        roles: &[Role],
        refuse: impl Fn(Reason, Option<&Identity>, &str) -> Status,
    ) -> Result<Option<Identity>, Status> {
        let Some(identity) = identity else {
            let detail = if self.token.is_some() && roles.contains(&Role::Upstream) {
                "a client certificate or `authorization: Bearer <push token>` is required"
            } else {
                "a client certificate is required"
            };
            return Err(refuse(Reason::NoCertificate, None, detail));
        };
        if identity.trust_domain != *self.trust_domain {
            return Err(refuse(
                Reason::ForeignTrustDomain,
                Some(&identity),
                &format!("trust domain is {}", self.trust_domain),
            ));
        }
        if !roles.contains(&identity.role) {
            let allowed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            return Err(refuse(
                Reason::WrongRole,
                Some(&identity),
                &format!(
                    "role {} may not call this; allowed: {allowed:?}",
                    identity.role
                ),
            ));
        }
        Ok(Some(identity))
    }
}

/// The verified caller of a request that passed the layer (None on an
/// insecure port or for a token-authenticated push).
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&Identity> {
    request.extensions().get::<Identity>()
}

/// The tower layer applying a [`Policy`] in front of a tonic router.
#[derive(Clone, Debug)]
pub struct AuthzLayer {
    policy: Policy,
}

impl AuthzLayer {
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }
}

impl<S> tower_layer::Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service [`AuthzLayer`] wraps around each connection's router.
#[derive(Clone, Debug)]
pub struct Authz<S> {
    inner: S,
    policy: Policy,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for Authz<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let certs = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs());
        let decision = self.policy.check(
            req.uri().path(),
            certs.as_deref().map(Vec::as_slice),
            req.headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        );
        match decision {
            Ok(identity) => {
                if let Some(identity) = identity {
                    req.extensions_mut().insert(identity);
                }
                Box::pin(self.inner.call(req))
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const RULES: &[(&str, Rule)] = &[
        ("/grpc.health.v1.Health/Check", Rule::Open),
        ("/x.v1.Peer/Handover", Rule::Roles(&[Role::DataPlane])),
        ("/x.v1.Gateway/Push", Rule::RolesOrToken(&[Role::Upstream])),
    ];

    fn cert(uri: Option<&str>) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into().unwrap()));
        }
        params.self_signed(&key).unwrap().der().clone()
    }

    fn policy(seen: Arc<Mutex<Vec<String>>>) -> Policy {
        let denials = Denials::new("test", move |d| {
            seen.lock()
                .unwrap()
                .push(format!("{}/{} {}", d.service, d.method, d.reason.as_str()));
        });
        Policy::new(RULES, "gatesvr", Some(Arc::from("tok")), denials)
    }

    #[test]
    fn one_rule_per_path_and_denials_are_counted() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let p = policy(seen.clone());
        let dp = cert(Some("spiffe://gatesvr/dataplane/dp-1"));
        let up = cert(Some("spiffe://gatesvr/upstream/chat"));
        let foreign = cert(Some("spiffe://evil/dataplane/dp-1"));
        let anonymous = cert(None);
        let code = |r: Result<Option<Identity>, Status>| r.map(|_| ()).map_err(|s| s.code());

        // Allowed.
        let who = p
            .check("/x.v1.Peer/Handover", Some(std::slice::from_ref(&dp)), None)
            .unwrap()
            .unwrap();
        assert_eq!(who.id, "dp-1");
        assert!(
            p.check("/x.v1.Gateway/Push", Some(std::slice::from_ref(&up)), None)
                .is_ok()
        );
        assert!(matches!(
            p.check("/x.v1.Gateway/Push", None, Some(b"Bearer tok")),
            Ok(None)
        ));
        assert!(p.check("/grpc.health.v1.Health/Check", None, None).is_ok());
        let plain = cert(None);
        assert!(
            p.check(
                "/grpc.health.v1.Health/Check",
                Some(std::slice::from_ref(&plain)),
                None
            )
            .is_ok()
        );

        // Refused, with the documented codes.
        use tonic::Code::{PermissionDenied, Unauthenticated};
        let peer = "/x.v1.Peer/Handover";
        assert_eq!(
            code(p.check(peer, Some(std::slice::from_ref(&up)), None)),
            Err(PermissionDenied)
        );
        assert_eq!(code(p.check(peer, None, None)), Err(Unauthenticated));
        assert_eq!(
            code(p.check(peer, None, Some(b"Bearer tok"))),
            Err(Unauthenticated)
        );
        assert_eq!(
            code(p.check(peer, Some(&[foreign]), None)),
            Err(PermissionDenied)
        );
        assert_eq!(
            code(p.check(peer, Some(&[anonymous]), None)),
            Err(Unauthenticated)
        );
        let push = "/x.v1.Gateway/Push";
        assert_eq!(
            code(p.check(push, Some(&[dp]), None)),
            Err(PermissionDenied)
        );
        assert_eq!(
            code(p.check(push, None, Some(b"Bearer nope"))),
            Err(Unauthenticated)
        );
        assert_eq!(code(p.check(push, None, None)), Err(Unauthenticated));
        assert_eq!(
            code(p.check("/x.v1.Peer/Unlisted", Some(&[up]), None)),
            Err(PermissionDenied)
        );
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 9, "{seen:?}");
        assert!(seen.contains(&"x.v1.Peer/Handover wrong_role".to_string()));
        assert!(seen.contains(&"x.v1.Peer/Handover foreign_trust_domain".to_string()));
        assert!(seen.contains(&"unknown/unknown unknown_method".to_string()));
        assert!(seen.contains(&"x.v1.Gateway/Push bad_token".to_string()));
    }

    #[test]
    fn an_insecure_port_checks_nothing() {
        let p = policy(Arc::default()).insecure();
        assert!(matches!(
            p.check("/x.v1.Peer/Handover", None, None),
            Ok(None)
        ));
    }
}
