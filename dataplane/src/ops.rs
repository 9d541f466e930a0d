//! What operators see and ask: the HTTP endpoints (health, readiness, drain,
//! performance), Prometheus metrics, and the performance windows.
//!
//! - [`http`]: `/health`, `/ready`, `/stats`, `/performance`, `/metrics`,
//!   and on the operations port `POST /drain` and the CPU profile.
//! - [`metrics`]: the node's Prometheus registry and its metrics.
//! - [`perf`]: request and push rates and latency over recent windows.
//! - [`load`]: how busy the runtime is, and whether pushes share writes.

pub(crate) mod http;
pub(crate) mod load;
pub(crate) mod metrics;
pub(crate) mod perf;
