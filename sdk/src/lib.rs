//! GateSvr client SDK: what app teams link to talk to a GateSvr data plane.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use gatesvr_sdk::{Client, ClientConfig, Event};
//! let config = ClientConfig::new("127.0.0.1:8453".parse().unwrap(), "alice", "TOKEN")
//!     .with_ca_file("certs/dev/ca.crt");
//! let client = Client::connect(config).await?;
//! let answer = client.request(1, "echo hi").await?;
//! println!("{:?}", answer.payload);
//! while let Some(event) = client.next_event().await {
//!     if let Event::Push(push) = event {
//!         println!("push #{}: {}", push.seq_id, push.content); // acked once returned
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! What it does for you:
//! - one QUIC connection (ALPN `gatesvr/1`) with the framing of docs/protocol.md;
//! - typed request/response with timeouts; a request interrupted by a
//!   disconnect is re-sent with the same `seq_id` on the resumed session, so the
//!   gateway executes it at most once;
//! - pushes in seq order, exactly once: duplicates from retransmits and resumes
//!   are dropped, and a push is acked (cumulatively) once [`Client::next_event`]
//!   has handed it to you;
//! - heartbeats at the interval the server asks for;
//! - a crashed gateway process noticed within a round trip or two of the next
//!   keep-alive (its host refuses the datagrams: [`socket`]), not after the
//!   liveness timeout;
//! - automatic reconnect from a new UDP socket with exponential backoff and
//!   jitter, honouring a server's GoAway delay and target, resuming from the
//!   last acked push. A resume the server could not honour is reported as
//!   [`Event::ResumeFailed`], never hidden.
//!
//! # Layout
//! - [`config`]: [`ClientConfig`], [`Backoff`].
//! - [`client`]: [`Client`] and the connection driver.
//! - [`error`]: [`ClientError`], [`RequestError`].
//! - [`socket`]: the connected UDP socket that hears a crashed gateway's port refuse.

pub mod client;
pub mod config;
pub mod error;
pub mod socket;

pub use client::{Client, Event, Push, Response};
pub use config::{Backoff, ClientConfig};
pub use error::{ClientError, RequestError};
pub use gatesvr_proto::client::{ErrorCode, ResumeStatus};
