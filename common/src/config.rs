//! Configuration loading: one YAML file, then `GATESVR_*` environment
//! overrides, deserialised into a typed struct and validated once at start.
//!
//! Environment overrides:
//! - `GATESVR_<SECTION>__<KEY>` sets `section.key` (double underscore nests;
//!   matching is case-insensitive), e.g. `GATESVR_SERVER__QUIC_ADDR=0.0.0.0:8453`.
//! - `GATESVR_<KEY>` sets a top-level `key`.
//! - A caller may declare aliases (env name -> key path), e.g. the Go gateway's
//!   `GATESVR_QUIC_ADDR` -> `server.quic_addr`.
//!
//! Every error names the key (and where its value came from) and maps to exit
//! code [`EXIT_CONFIG`] (64, `EX_USAGE`). Structs deny unknown fields, so a
//! typo is an error, never silently ignored.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format};
use serde::de::DeserializeOwned;
use serde_saphyr::figment::Yaml;

/// Process exit code for any configuration error (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// A configuration problem, naming the key when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path, e.g. `server.session_timeout`.
    pub key: Option<String>,
    /// Where the bad value came from (a file or an environment variable).
    pub source: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            key: None,
            source: None,
            message: message.into(),
        }
    }

    pub fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: Some(key.into()),
            source: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("config error")?;
        if let Some(key) = &self.key {
            write!(f, " at `{key}`")?;
        }
        if let Some(source) = &self.source {
            write!(f, " (from {source})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        // figment may accumulate several errors; the first is what the
        // operator fixes first, and one clear message beats a wall of text.
        let first = err.into_iter().next();
        let Some(e) = first else {
            return ConfigError::new("invalid configuration");
        };
        let key = (!e.path.is_empty()).then(|| e.path.join("."));
        let source = e.metadata.as_ref().map(|m| match &m.source {
            Some(src) => format!("{} {}", m.name, src),
            None => m.name.to_string(),
        });
        ConfigError {
            key,
            source,
            message: e.kind.to_string(),
        }
    }
}

/// Checks that need more than types: ranges, files that must exist, consistency.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Loads `T` from an optional YAML file plus the environment, then validates it.
///
/// With no file, `T`'s serde defaults apply. A file that is named but missing
/// is an error.
pub fn load<T>(path: Option<&Path>, aliases: &[(&str, &str)]) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
{
    let mut figment = Figment::new();
    if let Some(path) = path {
        if !path.is_file() {
            return Err(ConfigError {
                key: None,
                source: Some(path.display().to_string()),
                message: "config file not found or not a regular file".into(),
            });
        }
        figment = figment.merge(Yaml::file_exact(path));
    }
    extract(figment, aliases)
}

/// Loads `T` from YAML text plus the environment (tests, embedded defaults).
pub fn load_str<T>(yaml: &str, aliases: &[(&str, &str)]) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
{
    extract(Figment::new().merge(Yaml::string(yaml)), aliases)
}

fn extract<T>(mut figment: Figment, aliases: &[(&str, &str)]) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
{
    // The prefixed provider sees names with the prefix already stripped.
    let alias_names: Vec<&str> = aliases
        .iter()
        .map(|(env, _)| env.strip_prefix("GATESVR_").unwrap_or(env))
        .collect();
    figment = figment.merge(
        Env::prefixed("GATESVR_")
            .ignore(&alias_names)
            .filter(|key| !is_service_link(key.as_str()) && !is_client_setting(key.as_str()))
            .map(|key| key.as_str().replace("__", ".").into()),
    );
    for &(env, key) in aliases {
        let key = key.to_string();
        figment = figment.merge(Env::raw().only(&[env]).map(move |_| key.clone().into()));
    }
    let value: T = figment.extract()?;
    value.validate()?;
    Ok(value)
}

/// Kubernetes injects `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT`,
/// `<SERVICE>_PORT_<n>_<PROTO>...` for every Service in the namespace; a
/// Service named `gatesvr-*` yields `GATESVR_*` names that are not config.
/// (Nested keys always contain `__`, so they are never mistaken for these.)
fn is_service_link(key: &str) -> bool {
    let key = key.to_ascii_uppercase();
    !key.contains("__")
        && (key.ends_with("_SERVICE_HOST")
            || key.ends_with("_SERVICE_PORT")
            || key.contains("_SERVICE_PORT_")
            || key.ends_with("_PORT")
            || key.contains("_PORT_")
            || key == "PORT"
            || key == "SERVICE_HOST")
}

/// `GATESVR_*` names that clients read, not servers: gatectl's `GATESVR_ADMIN_TOKEN` and
/// `GATESVR_ADMIN_TOKEN_FILE` in an operator's shell must not make a server started from it
/// fail on an unknown key.
fn is_client_setting(key: &str) -> bool {
    let key = key.to_ascii_uppercase();
    key == "ADMIN_TOKEN" || key == "ADMIN_TOKEN_FILE"
}

/// Validation helper: `path` must name an existing regular file.
pub fn require_file(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(ConfigError::key(
            key,
            format!("file {} does not exist or is not a file", path.display()),
        ))
    }
}

/// Resolves `path` against `base` unless it is absolute.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// Validation helper: a socket address given as text.
pub fn require_socket_addr(key: &str, addr: &str) -> Result<std::net::SocketAddr, ConfigError> {
    addr.parse()
        .map_err(|_| ConfigError::key(key, format!("`{addr}` is not a socket address (ip:port)")))
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours.
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::time::Duration;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Server {
        quic_addr: String,
        #[serde(with = "humantime_serde")]
        session_timeout: Duration,
        max_retries: u32,
    }

    impl Default for Server {
        fn default() -> Self {
            Self {
                quic_addr: "127.0.0.1:8453".into(),
                session_timeout: Duration::from_secs(300),
                max_retries: 3,
            }
        }
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        server: Server,
    }

    impl Validate for Cfg {
        fn validate(&self) -> Result<(), ConfigError> {
            if self.server.max_retries > 10 {
                return Err(ConfigError::key("server.max_retries", "must be <= 10"));
            }
            Ok(())
        }
    }

    // Env-mutating tests share one process: keep all env cases in one test.
    #[test]
    fn env_layering_and_aliases() {
        let aliases = [("GATESVR_QUIC_ADDR", "server.quic_addr")];
        // figment's Jail serialises env-mutating tests; every test here runs in one.
        figment::Jail::expect_with(|jail| {
            jail.set_env("GATESVR_SERVER__MAX_RETRIES", "5");
            jail.set_env("GATESVR_QUIC_ADDR", "0.0.0.0:9999");
            let cfg: Cfg = load_str("server:\n  session_timeout: 5m\n", &aliases).unwrap();
            assert_eq!(cfg.server.max_retries, 5);
            assert_eq!(cfg.server.quic_addr, "0.0.0.0:9999");
            assert_eq!(cfg.server.session_timeout, Duration::from_secs(300));

            // Kubernetes service links for a Service named `gatesvr` / `gatesvr-quic` are not config.
            jail.set_env("GATESVR_SERVICE_HOST", "10.0.0.1");
            jail.set_env("GATESVR_QUIC_PORT", "udp://10.0.0.1:8453");
            jail.set_env("GATESVR_QUIC_PORT_8453_UDP_PROTO", "udp");
            // gatectl's own settings in the same shell.
            jail.set_env("GATESVR_ADMIN_TOKEN", "t0ken");
            jail.set_env("GATESVR_ADMIN_TOKEN_FILE", "/tmp/token");
            assert!(load_str::<Cfg>("", &aliases).is_ok());

            jail.set_env("GATESVR_SERVER__BOGUS", "1");
            let err = load_str::<Cfg>("", &aliases).unwrap_err();
            assert_eq!(err.key.as_deref(), Some("server.bogus"), "{err}");
            assert!(err.message.contains("bogus"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_named() {
        figment::Jail::expect_with(|_| {
            let err = load_str::<Cfg>("server:\n  quic_adr: x\n", &[]).unwrap_err();
            assert!(err.message.contains("quic_adr"), "{err}");
            assert!(err.to_string().contains("server"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_duration_is_named() {
        figment::Jail::expect_with(|_| {
            let err = load_str::<Cfg>("server:\n  session_timeout: 5 parsecs\n", &[]).unwrap_err();
            assert_eq!(err.key.as_deref(), Some("server.session_timeout"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn validation_error_is_named() {
        figment::Jail::expect_with(|_| {
            let err = load_str::<Cfg>("server:\n  max_retries: 11\n", &[]).unwrap_err();
            assert_eq!(err.key.as_deref(), Some("server.max_retries"));
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_an_error() {
        figment::Jail::expect_with(|_| {
            let err = load::<Cfg>(Some(Path::new("/nonexistent/gatesvr.yaml")), &[]).unwrap_err();
            assert!(
                err.to_string().contains("/nonexistent/gatesvr.yaml"),
                "{err}"
            );
            Ok(())
        });
    }
}
