//! Who may call what on `server.grpc_addr`: the data plane's authorization
//! table, one rule per gRPC method.
//!
//! With `server.grpc_tls` the TLS handshake verifies any client certificate
//! against the CA; this table then decides by the role the certificate names
//! (`spiffe://<trust-domain>/<role>/<id>`, see `gatesvr_common::identity`):
//!
//! | method | who |
//! |---|---|
//! | `Peer.Handover`, `Stage`, `Replicate`, `FetchReplica` (and their `*Stream` forms), `FetchReplicas` | data-plane nodes |
//! | `GatewayService.*` | upstreams, data-plane nodes (they forward pushes to a session's owner), or the push token |
//! | `grpc.health.v1.Health.*` | anyone |
//! | anything else | nobody |
//!
//! Refusals are `UNAUTHENTICATED` (no certificate, a certificate naming no
//! role, a wrong token) or `PERMISSION_DENIED` (wrong role or trust domain,
//! unknown method), counted in `gatesvr_authz_denied_total{service,method,
//! reason}` and logged at most once a second. Without `grpc_tls` (only with
//! `server.insecure_plaintext_internal`, or in `gatesvr dev`) nothing can be
//! checked and every call passes.

use std::sync::Arc;

use gatesvr_common::authz::{AuthzLayer, Denials, Policy, Rule};
use gatesvr_common::identity::{Identity, Role};

use crate::config::DataPlaneConfig;

const DATA_PLANE: &[Role] = &[Role::DataPlane];
const PUSHERS: &[Role] = &[Role::Upstream, Role::DataPlane];

/// One rule per method served on `server.grpc_addr`.
pub const RULES: &[(&str, Rule)] = &[
    ("/gatesvr.peer.v1.Peer/Handover", Rule::Roles(DATA_PLANE)),
    ("/gatesvr.peer.v1.Peer/Stage", Rule::Roles(DATA_PLANE)),
    ("/gatesvr.peer.v1.Peer/Replicate", Rule::Roles(DATA_PLANE)),
    (
        "/gatesvr.peer.v1.Peer/FetchReplica",
        Rule::Roles(DATA_PLANE),
    ),
    (
        "/gatesvr.peer.v1.Peer/HandoverStream",
        Rule::Roles(DATA_PLANE),
    ),
    (
        "/gatesvr.peer.v1.Peer/FetchReplicaStream",
        Rule::Roles(DATA_PLANE),
    ),
    ("/gatesvr.peer.v1.Peer/StageStream", Rule::Roles(DATA_PLANE)),
    (
        "/gatesvr.peer.v1.Peer/FetchReplicas",
        Rule::Roles(DATA_PLANE),
    ),
    (
        "/gatesvr.upstream.v1.GatewayService/PushToClient",
        Rule::RolesOrToken(PUSHERS),
    ),
    (
        "/gatesvr.upstream.v1.GatewayService/PushBatch",
        Rule::RolesOrToken(PUSHERS),
    ),
    (
        "/gatesvr.upstream.v1.GatewayService/BroadcastToClients",
        Rule::RolesOrToken(PUSHERS),
    ),
    (
        "/gatesvr.upstream.v1.GatewayService/GetStatus",
        Rule::RolesOrToken(PUSHERS),
    ),
    ("/grpc.health.v1.Health/Check", Rule::Open),
    ("/grpc.health.v1.Health/Watch", Rule::Open),
];

/// The identity in the first certificate of a PEM file.
fn identity_of(path: &std::path::Path) -> Result<Identity, String> {
    let certs = gatesvr_common::tls::load_certs(path).map_err(|e| e.to_string())?;
    let first = certs
        .first()
        .ok_or_else(|| format!("{}: no certificate", path.display()))?;
    Identity::from_cert(first.as_ref()).map_err(|e| format!("{}: {e}", path.display()))
}

/// Refuses to start with a certificate that other nodes would refuse: every
/// certificate this node presents internally must name it
/// (`dataplane/<node_id>` in `server.trust_domain`).
fn check_own_certificates(config: &DataPlaneConfig) -> Result<(), String> {
    let expected = Identity::new(
        config.server.trust_domain.clone(),
        Role::DataPlane,
        config.node_id.clone(),
    )
    .map_err(|e| format!("node_id / server.trust_domain: {e}"))?;
    let cp_cert = (!config.control_plane.insecure)
        .then(|| config.control_plane.tls.as_ref().map(|t| &t.cert_file))
        .flatten();
    let presented = [
        (
            "server.grpc_tls",
            config.server.grpc_tls.as_ref().map(|t| &t.cert_file),
        ),
        ("control_plane.tls", cp_cert),
        (
            "upstream.tls",
            config
                .upstream
                .tls
                .as_ref()
                .and_then(|t| t.cert_file.as_ref()),
        ),
    ];
    for (key, cert_file) in presented {
        let Some(cert_file) = cert_file else { continue };
        let found = identity_of(cert_file).map_err(|e| format!("{key}.cert_file: {e}"))?;
        let shared = Identity {
            id: gatesvr_common::identity::SHARED_ID.into(),
            ..expected.clone()
        };
        if found != expected && found != shared {
            return Err(format!(
                "{key}.cert_file names {found}, but this node is {expected}: issue it with `gatesvr certs --role dataplane:{}`",
                config.node_id
            ));
        }
    }
    Ok(())
}

/// The authorization layer for `server.grpc_addr`, its denials counted in
/// `registry`.
pub fn layer(
    config: &DataPlaneConfig,
    registry: &prometheus::Registry,
    token: Option<Arc<str>>,
) -> Result<AuthzLayer, String> {
    let denied = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "gatesvr_authz_denied_total",
            "Internal gRPC calls refused, by service, method and reason (no_certificate, no_identity, wrong_role, foreign_trust_domain, bad_token, unknown_method)",
        ),
        &["service", "method", "reason"],
    )
    .map_err(|e| e.to_string())?;
    registry
        .register(Box::new(denied.clone()))
        .map_err(|e| e.to_string())?;
    let denials = Denials::new("dataplane", move |d| {
        denied
            .with_label_values(&[d.service, d.method, d.reason.as_str()])
            .inc();
    });
    let policy = Policy::new(RULES, &config.server.trust_domain, token, denials);
    check_own_certificates(config)?;
    if config.server.grpc_tls.is_none() {
        return Ok(AuthzLayer::new(policy.insecure()));
    }
    Ok(AuthzLayer::new(policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_method_has_exactly_one_rule() {
        let services = [
            (
                "gatesvr.peer.v1.Peer",
                &[
                    "Handover",
                    "Stage",
                    "Replicate",
                    "FetchReplica",
                    "HandoverStream",
                    "FetchReplicaStream",
                    "StageStream",
                    "FetchReplicas",
                ][..],
            ),
            (
                "gatesvr.upstream.v1.GatewayService",
                &[
                    "PushToClient",
                    "PushBatch",
                    "BroadcastToClients",
                    "GetStatus",
                ][..],
            ),
            ("grpc.health.v1.Health", &["Check", "Watch"][..]),
        ];
        let mut expected = 0;
        for (service, methods) in services {
            for m in methods {
                let path = format!("/{service}/{m}");
                let n = RULES.iter().filter(|(p, _)| *p == path).count();
                assert_eq!(n, 1, "{path}");
                expected += 1;
            }
        }
        assert_eq!(RULES.len(), expected, "a rule for a method nobody serves");
        use gatesvr_proto::peer::peer_server::PeerServer;
        use gatesvr_proto::upstream::gateway_service_server::GatewayServiceServer;
        assert_eq!(
            <PeerServer<crate::peer::PeerService> as tonic::server::NamedService>::NAME,
            services[0].0
        );
        assert_eq!(
            <GatewayServiceServer<crate::gateway::Gateway> as tonic::server::NamedService>::NAME,
            services[1].0
        );
    }

    #[test]
    fn a_node_refuses_to_start_with_another_nodes_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let certs = gatesvr_common::certs::generate(dir.path(), &[]).unwrap();
        let mut config = DataPlaneConfig {
            node_id: "dp-1".into(),
            ..Default::default()
        };
        config.server.grpc_tls = Some(certs.role(Role::DataPlane, "dp-2"));
        let registry = prometheus::Registry::new();
        let err = layer(&config, &registry, None).unwrap_err();
        assert!(err.contains("dataplane:dp-1"), "{err}");
        config.server.grpc_tls = Some(certs.role(Role::DataPlane, "dp-1"));
        layer(&config, &prometheus::Registry::new(), None).unwrap();
    }
}
