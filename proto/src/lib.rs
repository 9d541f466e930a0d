//! GateSvr's wire contracts.
//!
//! Every protocol GateSvr speaks is protobuf, compiled from `proto/gatesvr/**`
//! at build time with protox (no `protoc` install). This crate also owns the two
//! pieces of the client protocol that are not protobuf messages but must be
//! identical in every implementation:
//!
//! - [`frame`]: how envelopes are delimited on the QUIC stream (varint length +
//!   envelope, bounded by a maximum frame size), as a sans-IO encoder/decoder;
//! - [`zone`]: the fixed openid -> zone hash;
//! - [`limits`]: the gRPC message limits and the chunking of what grows
//!   with sessions or queues.
//!
//! # Layout
//! - [`client`]: `gatesvr.client.v1`, client <-> data plane (ALPN [`ALPN`]).
//! - [`upstream`]: `gatesvr.upstream.v1`, `UpstreamService` and `GatewayService`.
//! - [`control`]: `gatesvr.control.v1`, data plane / upstream <-> control plane.
//! - [`raft`]: `gatesvr.raft.v1`, raft transport between control-plane nodes.
//! - [`session`]: `gatesvr.session.v1`, session state moved between data-plane nodes.

pub mod frame;
pub mod limits;
pub mod zone;

/// ALPN protocol id of the client protocol, version 1.
pub const ALPN: &[u8] = b"gatesvr/1";

/// Generated code, nested as the protobuf packages are (cross-package
/// references in generated code rely on it). Use the short aliases below.
pub mod gatesvr {
    pub mod client {
        pub mod v1 {
            tonic::include_proto!("gatesvr.client.v1");
        }
    }
    pub mod upstream {
        pub mod v1 {
            tonic::include_proto!("gatesvr.upstream.v1");
        }
    }
    pub mod control {
        pub mod v1 {
            tonic::include_proto!("gatesvr.control.v1");
        }
    }
    pub mod session {
        pub mod v1 {
            tonic::include_proto!("gatesvr.session.v1");
        }
    }
    pub mod raft {
        pub mod v1 {
            tonic::include_proto!("gatesvr.raft.v1");
        }
    }
    pub mod peer {
        pub mod v1 {
            tonic::include_proto!("gatesvr.peer.v1");
        }
    }
}

/// `gatesvr.client.v1`: the client protocol (see docs/protocol.md).
pub use gatesvr::client::v1 as client;
/// `gatesvr.control.v1`: the control plane's API for data-plane nodes and upstreams.
pub use gatesvr::control::v1 as control;
/// `gatesvr.peer.v1`: session handover between data-plane nodes.
pub use gatesvr::peer::v1 as peer;
/// `gatesvr.raft.v1`: raft RPCs between control-plane nodes.
pub use gatesvr::raft::v1 as raft;
/// `gatesvr.session.v1`: session state handed between data-plane nodes.
pub use gatesvr::session::v1 as session;
/// `gatesvr.upstream.v1`: upstream services and the gateway's push API.
pub use gatesvr::upstream::v1 as upstream;
