//! Plumbing shared by GateSvr's binaries and both planes.
//!
//! Nothing here knows about sessions, raft or routing: the planes meet only on
//! the wire (`gatesvr-proto`). What lives here is what every process needs the
//! same way:
//!
//! - [`config`]: YAML file + `GATESVR_*` environment layering, validated once,
//!   with errors that name the key (exit code [`config::EXIT_CONFIG`]).
//! - [`tls`]: rustls configs (ring provider) for QUIC and mTLS gRPC from PEM files.
//! - [`certs`]: a CA, the client-facing certificate and role certificates (rcgen).
//! - [`identity`]: the `spiffe://<trust-domain>/<role>/<id>` a certificate names.
//! - [`authz`]: the per-method authorization layer both planes' gRPC ports run.
//! - [`logging`]: tracing setup, human or JSON, optional size-rotated file.
//! - [`token`]: the HMAC client token format (`gatectl token issue`, verified by
//!   the data plane).
//! - [`shutdown`]: a ctrl-c / SIGTERM future.

pub mod authz;
pub mod certs;
pub mod config;
pub mod identity;
pub mod logging;
pub mod shutdown;
pub mod tls;
pub mod token;
pub mod webcert;
