//! An upstream instance: where to reach it and how the registry names it.

use std::collections::HashMap;

use gatesvr_proto::control;
use tonic::transport::Endpoint;

/// One upstream instance of a zone.
///
/// The address is the identity the router keys channels and health state on:
/// an instance that re-registers under a new id but the same address keeps its
/// connection.
#[derive(Clone, Debug)]
pub struct Instance {
    id: String,
    addr: String,
    /// Parsed once from `addr`.
    endpoint: Endpoint,
}

impl PartialEq for Instance {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.addr == other.addr
    }
}

impl Eq for Instance {}

/// An instance address that is not `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid upstream address {addr:?}: expected host:port")]
pub struct InvalidAddress {
    /// The rejected address.
    pub addr: String,
}

impl Instance {
    /// An instance with registry id `id` at `addr` (`host:port`, IPv6 hosts in
    /// brackets).
    pub fn new(id: impl Into<String>, addr: impl Into<String>) -> Result<Self, InvalidAddress> {
        let addr = addr.into();
        let host_port = addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
        let endpoint = match Endpoint::from_shared(format!("http://{addr}")) {
            Ok(endpoint) if host_port => endpoint,
            _ => return Err(InvalidAddress { addr }),
        };
        Ok(Self {
            id: id.into(),
            addr,
            endpoint,
        })
    }

    /// Registry id (the control plane's `instance_id`, or the address for
    /// static instances).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The plaintext gRPC endpoint of this instance.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// The instances of a static `zones.upstreams` entry; a static instance's id
/// is its address.
pub fn static_instances(addrs: &[String]) -> Result<Vec<Instance>, InvalidAddress> {
    addrs
        .iter()
        .map(|addr| Instance::new(addr.clone(), addr.clone()))
        .collect()
}

/// Groups the control plane's upstream records by zone, as
/// [`UpstreamRouter::replace_all`](super::UpstreamRouter::replace_all) takes
/// them. Records with an invalid address are skipped with a warning: one bad
/// registration must not take down routing for the others.
pub fn instances_by_zone<'a>(
    upstreams: impl IntoIterator<Item = &'a control::Upstream>,
) -> HashMap<String, Vec<Instance>> {
    let mut zones: HashMap<String, Vec<Instance>> = HashMap::new();
    for up in upstreams {
        match Instance::new(up.instance_id.clone(), up.address.clone()) {
            Ok(instance) => zones.entry(up.zone.clone()).or_default().push(instance),
            Err(err) => tracing::warn!(zone = %up.zone, instance_id = %up.instance_id, %err,
                "skipping upstream registration"),
        }
    }
    zones
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_validated() {
        for ok in ["127.0.0.1:9001", "upstream-0.svc:80", "[::1]:9001"] {
            assert!(Instance::new("i", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "127.0.0.1",
            ":9001",
            "host:0",
            "host:99999",
            "host:port",
            "a b:1",
        ] {
            assert!(Instance::new("i", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn registrations_group_by_zone_and_skip_bad_ones() {
        let up = |zone: &str, addr: &str, id: &str| control::Upstream {
            zone: zone.into(),
            address: addr.into(),
            instance_id: id.into(),
            ..Default::default()
        };
        let ups = [
            up("001", "a:1", "i1"),
            up("001", "b:1", "i2"),
            up("002", "nope", "i3"),
        ];
        let zones = instances_by_zone(&ups);
        assert_eq!(zones.len(), 1);
        assert_eq!(zones["001"].len(), 2);
        assert_eq!(zones["001"][1].id(), "i2");
    }

    #[test]
    fn static_instances_are_named_by_address() {
        let instances = static_instances(&["127.0.0.1:9001".into()]).unwrap();
        assert_eq!(instances[0].id(), "127.0.0.1:9001");
        assert!(static_instances(&["127.0.0.1".into()]).is_err());
    }
}
