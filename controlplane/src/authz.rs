//! Who may call what on the control plane's gRPC port: one rule per method.
//!
//! The TLS handshake verifies the caller's certificate against `tls.ca_file`;
//! the rule of the called method then decides by the role the certificate
//! names (`spiffe://<trust-domain>/<role>/<id>`, `gatesvr_common::identity`):
//!
//! | method | who |
//! |---|---|
//! | `Raft.*` (replication, votes, snapshots, forwarded writes) | control-plane members |
//! | `ControlPlane.RegisterUpstream`, `HeartbeatUpstream`, `DeregisterUpstream` | upstreams |
//! | `ControlPlane.RegisterNode`, `HeartbeatNode`, `LeaveNode`, `Watch`, `ClaimSessions`, `ReleaseSessions`, `LookupOwners` | data-plane nodes, for their own `node_id` only (a shared `dataplane/_any` certificate: any node) |
//! | `ControlPlane.TransferSession` | the data-plane node that owns the session at `expected_epoch` |
//! | `grpc.health.v1.Health.*` | anyone |
//! | anything else | nobody |
//!
//! The role check is the tower layer; "for their own node id" needs the
//! request body, so `grpc.rs` checks it with [`speaks_for`]. Refusals are
//! `UNAUTHENTICATED` / `PERMISSION_DENIED`, counted in
//! `gatesvr_authz_denied_total{service,method,reason}` in [`registry`]'s
//! registry and logged at most once a second.

use std::sync::OnceLock;

use gatesvr_common::authz::{AuthzLayer, Denial, Denials, Policy, Reason, Rule};
use gatesvr_common::identity::{Identity, Role};
use tonic::Status;

const CONTROL_PLANE: &[Role] = &[Role::ControlPlane];
const DATA_PLANE: &[Role] = &[Role::DataPlane];
const UPSTREAM: &[Role] = &[Role::Upstream];

/// One rule per method served on `grpc_addr`.
pub const RULES: &[(&str, Rule)] = &[
    (
        "/gatesvr.raft.v1.Raft/AppendEntries",
        Rule::Roles(CONTROL_PLANE),
    ),
    ("/gatesvr.raft.v1.Raft/Vote", Rule::Roles(CONTROL_PLANE)),
    (
        "/gatesvr.raft.v1.Raft/InstallSnapshot",
        Rule::Roles(CONTROL_PLANE),
    ),
    ("/gatesvr.raft.v1.Raft/Forward", Rule::Roles(CONTROL_PLANE)),
    (
        "/gatesvr.control.v1.ControlPlane/RegisterUpstream",
        Rule::Roles(UPSTREAM),
    ),
    (
        "/gatesvr.control.v1.ControlPlane/HeartbeatUpstream",
        Rule::Roles(UPSTREAM),
    ),
    (
        "/gatesvr.control.v1.ControlPlane/DeregisterUpstream",
        Rule::Roles(UPSTREAM),
    ),
    (
        "/gatesvr.control.v1.ControlPlane/RegisterNode",
        Rule::Roles(DATA_PLANE),
    ),
    (
        "/gatesvr.control.v1.ControlPlane/HeartbeatNode",
        Rule::Roles(DATA_PLANE),
    ),
    (
        "/gatesvr.control.v1.ControlPlane/LeaveNode",
        Rule::Roles(DATA_PLANE),
    ),
    (
        "/gatesvr.control.v1.ControlPlane/Watch",
        Rule::Roles(DATA_PLANE),
    ),
    (
        "/gatesvr.control.v1.ControlPlane/ClaimSessions",
        Rule::Roles(DATA_PLANE),
    ),
    (
        "/gatesvr.control.v1.ControlPlane/ReleaseSessions",
        Rule::Roles(DATA_PLANE),
    ),
    (
        "/gatesvr.control.v1.ControlPlane/TransferSession",
        Rule::Roles(DATA_PLANE),
    ),
    (
        "/gatesvr.control.v1.ControlPlane/LookupOwners",
        Rule::Roles(DATA_PLANE),
    ),
    ("/grpc.health.v1.Health/Check", Rule::Open),
    ("/grpc.health.v1.Health/Watch", Rule::Open),
];

/// The control plane's denial counter and the registry holding it (one per
/// process: every control-plane node of a process counts into it).
pub fn registry() -> &'static prometheus::Registry {
    &metrics().0
}

fn metrics() -> &'static (prometheus::Registry, prometheus::IntCounterVec) {
    static METRICS: OnceLock<(prometheus::Registry, prometheus::IntCounterVec)> = OnceLock::new();
    METRICS.get_or_init(|| {
        let registry = prometheus::Registry::new();
        let denied = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "gatesvr_authz_denied_total",
                "Internal gRPC calls refused, by service, method and reason (no_certificate, no_identity, wrong_role, wrong_node, foreign_trust_domain, unknown_method)",
            ),
            &["service", "method", "reason"],
        )
        .expect("a constant, valid metric definition");
        // A fresh registry holds nothing that could clash.
        let _ = registry.register(Box::new(denied.clone()));
        (registry, denied)
    })
}

/// The refusal recorder shared by the layer and the handlers.
pub fn denials() -> Denials {
    Denials::new("controlplane", |d| {
        metrics()
            .1
            .with_label_values(&[d.service, d.method, d.reason.as_str()])
            .inc();
    })
}

/// The layer for the gRPC port; `insecure` (tls.insecure) checks nothing.
pub fn layer(trust_domain: &str, denials: Denials, insecure: bool) -> AuthzLayer {
    let policy = Policy::new(RULES, trust_domain, None, denials);
    AuthzLayer::new(if insecure { policy.insecure() } else { policy })
}

/// Refuses a data-plane caller acting for a node other than itself. Passes
/// when there is no verified caller (plaintext `tls.insecure`).
pub fn speaks_for(
    denials: &Denials,
    caller: Option<&Identity>,
    method: &str,
    node_id: &str,
) -> Result<(), Status> {
    match caller {
        Some(c) if c.role == Role::DataPlane && !c.acts_for(node_id) => Err(denials.refuse(
            Denial {
                service: "gatesvr.control.v1.ControlPlane",
                method,
                reason: Reason::WrongNode,
            },
            Some(c),
            &format!("{c} may act only for node {:?}, not {node_id:?}", c.id),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_method_has_exactly_one_rule() {
        let raft = ["AppendEntries", "Vote", "InstallSnapshot", "Forward"];
        let control = [
            "RegisterUpstream",
            "HeartbeatUpstream",
            "DeregisterUpstream",
            "RegisterNode",
            "HeartbeatNode",
            "LeaveNode",
            "Watch",
            "ClaimSessions",
            "ReleaseSessions",
            "TransferSession",
            "LookupOwners",
        ];
        use gatesvr_proto::control::control_plane_server::ControlPlaneServer;
        use gatesvr_proto::raft::raft_server::RaftServer;
        use tonic::server::NamedService;
        let raft_name = <RaftServer<crate::raft_service::RaftService> as NamedService>::NAME;
        let cp_name = <ControlPlaneServer<crate::grpc::ControlService> as NamedService>::NAME;
        let mut paths: Vec<String> = raft.iter().map(|m| format!("/{raft_name}/{m}")).collect();
        paths.extend(control.iter().map(|m| format!("/{cp_name}/{m}")));
        paths.push("/grpc.health.v1.Health/Check".into());
        paths.push("/grpc.health.v1.Health/Watch".into());
        for path in &paths {
            assert_eq!(RULES.iter().filter(|(p, _)| p == path).count(), 1, "{path}");
        }
        assert_eq!(RULES.len(), paths.len());
    }

    #[test]
    fn a_node_speaks_only_for_itself() {
        let d = denials();
        let dp1 = Identity::new("gatesvr", Role::DataPlane, "dp-1").unwrap();
        assert!(speaks_for(&d, Some(&dp1), "RegisterNode", "dp-1").is_ok());
        let err = speaks_for(&d, Some(&dp1), "RegisterNode", "dp-2").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(speaks_for(&d, None, "RegisterNode", "dp-2").is_ok());
        let text = String::from_utf8(
            prometheus::TextEncoder::new()
                .encode_to_string(&registry().gather())
                .unwrap()
                .into_bytes(),
        )
        .unwrap();
        assert!(text.contains("reason=\"wrong_node\""), "{text}");
    }
}
