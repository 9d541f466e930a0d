//! TLS from the data plane to upstream instances, per zone.
//!
//! `upstream.tls` applies to every zone; `upstream.zone_tls."<zone>"`
//! replaces it for one zone (a zone run by another team, with its own CA, or
//! one still migrating). Requests carry users' payloads and identities, so
//! they travel encrypted, and with a client certificate the upstream can check
//! that the caller is a data-plane node. Without either section the hop is
//! plaintext, which a file-loaded config accepts only with
//! `server.insecure_plaintext_internal: true`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use gatesvr_common::config::ConfigError;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// TLS settings for calls to one zone's upstreams (or all zones).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// CA bundle (PEM) that signs the upstreams' server certificates.
    /// Required unless `insecure_plaintext`.
    pub ca_file: Option<PathBuf>,
    /// This node's client certificate (PEM) for upstreams that require mTLS;
    /// `gatesvr certs` issues `dataplane-<node_id>.crt`. With `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Name checked on the upstream's certificate. Default: the host part of
    /// the instance address.
    pub server_name: Option<String>,
    /// Plaintext to these upstreams, deliberately. Default false.
    pub insecure_plaintext: bool,
}

impl UpstreamTlsConfig {
    /// Checks files and combinations; `key` prefixes error keys.
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.insecure_plaintext {
            return Ok(());
        }
        let Some(ca) = &self.ca_file else {
            return Err(ConfigError::key(
                format!("{key}.ca_file"),
                "required (or set insecure_plaintext: true)",
            ));
        };
        gatesvr_common::config::require_file(&format!("{key}.ca_file"), ca)?;
        match (&self.cert_file, &self.key_file) {
            (None, None) => {}
            (Some(cert), Some(k)) => {
                gatesvr_common::config::require_file(&format!("{key}.cert_file"), cert)?;
                gatesvr_common::config::require_file(&format!("{key}.key_file"), k)?;
            }
            _ => {
                return Err(ConfigError::key(
                    format!("{key}.cert_file"),
                    "cert_file and key_file go together",
                ));
            }
        }
        Ok(())
    }

    /// The tonic client TLS, or None for plaintext.
    fn client_tls(&self, key: &str) -> Result<Option<ClientTlsConfig>, ConfigError> {
        if self.insecure_plaintext {
            return Ok(None);
        }
        let read = |name: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| {
                ConfigError::key(
                    format!("{key}.{name}"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })
        };
        let ca = self.ca_file.as_ref().ok_or_else(|| {
            ConfigError::key(
                format!("{key}.ca_file"),
                "required (or set insecure_plaintext: true)",
            )
        })?;
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca_file", ca)?));
        if let (Some(cert), Some(k)) = (&self.cert_file, &self.key_file) {
            tls = tls.identity(Identity::from_pem(
                read("cert_file", cert)?,
                read("key_file", k)?,
            ));
        }
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        // Surfaces unparsable PEM now, not at the first request.
        Endpoint::from_static("https://localhost:1")
            .tls_config(tls.clone())
            .map_err(|e| ConfigError::key(key.to_string(), e.to_string()))?;
        Ok(Some(tls))
    }
}

/// The client TLS of every zone, built once at start.
#[derive(Clone, Debug, Default)]
pub(crate) struct TlsByZone {
    default: Option<ClientTlsConfig>,
    zones: HashMap<String, Option<ClientTlsConfig>>,
}

impl TlsByZone {
    pub(crate) fn build(
        default: Option<&UpstreamTlsConfig>,
        zones: &BTreeMap<String, UpstreamTlsConfig>,
    ) -> Result<Self, ConfigError> {
        let default = match default {
            Some(cfg) => cfg.client_tls("upstream.tls")?,
            None => None,
        };
        let zones = zones
            .iter()
            .map(|(zone, cfg)| {
                Ok((
                    zone.clone(),
                    cfg.client_tls(&format!("upstream.zone_tls.{zone}"))?,
                ))
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(Self { default, zones })
    }

    /// The TLS for `zone`'s upstreams, or None for plaintext.
    pub(crate) fn for_zone(&self, zone: &str) -> Option<&ClientTlsConfig> {
        match self.zones.get(zone) {
            Some(tls) => tls.as_ref(),
            None => self.default.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_overrides_replace_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let certs = gatesvr_common::certs::generate(dir.path(), &[]).unwrap();
        let dp = certs.role(gatesvr_common::identity::Role::DataPlane, "dp-1");
        let mtls = UpstreamTlsConfig {
            ca_file: Some(certs.ca_cert()),
            cert_file: Some(dp.cert_file.clone()),
            key_file: Some(dp.key_file.clone()),
            ..Default::default()
        };
        mtls.validate("upstream.tls").unwrap();
        let plain = UpstreamTlsConfig {
            insecure_plaintext: true,
            ..Default::default()
        };
        let zones = BTreeMap::from([("003".to_string(), plain)]);
        let by_zone = TlsByZone::build(Some(&mtls), &zones).unwrap();
        assert!(by_zone.for_zone("001").is_some());
        assert!(by_zone.for_zone("003").is_none());

        let half = UpstreamTlsConfig {
            ca_file: Some(certs.ca_cert()),
            cert_file: Some(dp.cert_file),
            ..Default::default()
        };
        let err = half.validate("upstream.tls").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("upstream.tls.cert_file"));
        let err = UpstreamTlsConfig::default()
            .validate("upstream.zone_tls.002")
            .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("upstream.zone_tls.002.ca_file"));
    }
}
