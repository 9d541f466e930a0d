//! The push path's entry: `GatewayService`, where upstreams push and
//! broadcast to clients, and who may call what on `server.grpc_addr`.
//!
//! - [`gateway`]: `GatewayService` (push, broadcast, forwarding to the owner).
//! - [`grpc_auth`]: the authorization of the node's gRPC port.
//! - [`gateway::wire`]: pushes as received, their text not copied out of the frame.

pub(crate) mod gateway;
pub(crate) mod grpc_auth;
