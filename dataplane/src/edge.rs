//! The edge: where clients' connections come in and a session's frames go
//! out. Endpoints and admission, the per-connection shell around a
//! [`crate::session::Session`], the transports that carry its frames (native
//! QUIC, WebTransport, WebSocket), and who may start a session.
//!
//! - [`quic`]: the QUIC endpoint, transport settings, the accept loop
//!   (admission); [`quic_keys`]: keys shared by every node of a deployment.
//! - [`connection`]: one client connection, the I/O shell around a session.
//! - [`transport`]: what carries a session's frames; [`webtransport`] and
//!   [`websocket`] accept the browser ones.
//! - [`auth`]: the Start token check; [`start_limit`]: the Start rate limit.

pub mod auth;
pub mod connection;
pub mod quic;
pub mod quic_keys;
pub mod start_limit;
pub mod transport;
pub mod websocket;
pub mod webtransport;
