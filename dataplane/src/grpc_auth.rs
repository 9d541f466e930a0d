//! Who may call `server.grpc_addr`.
//!
//! With `server.grpc_tls` set, the TLS handshake requires a client
//! certificate signed by its CA: other data-plane nodes and upstreams use
//! theirs. With `server.push_token_file` too, the certificate becomes optional
//! at the TLS layer and this interceptor enforces the rule per service:
//! `GatewayService` accepts a verified certificate or
//! `authorization: Bearer <token>`; the `Peer` service (session state moving
//! between nodes) always requires a certificate. Without `grpc_tls` every
//! call passes (plaintext, private network).

use std::sync::Arc;

use tonic::{Request, Status};

#[derive(Clone)]
pub struct Gate {
    /// The upstream push token, when configured.
    pub token: Option<Arc<str>>,
}

/// Compares without an early exit on the first differing byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Gate {
    fn has_cert(req: &Request<()>) -> bool {
        req.peer_certs().is_some_and(|c| !c.is_empty())
    }

    /// For `GatewayService`: a certificate or the push token.
    pub fn for_gateway(self) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
        move |req: Request<()>| {
            let Some(token) = &self.token else {
                return Ok(req); // TLS (if any) already required a certificate
            };
            if Self::has_cert(&req) {
                return Ok(req);
            }
            let presented = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match presented {
                Some(p) if same(p.as_bytes(), token.as_bytes()) => Ok(req),
                Some(_) => Err(Status::unauthenticated("invalid push token")),
                None => Err(Status::unauthenticated(
                    "a client certificate or `authorization: Bearer <push token>` is required",
                )),
            }
        }
    }

    /// For the `Peer` service: a certificate whenever TLS is on.
    pub fn for_peers(self) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
        move |req: Request<()>| {
            if self.token.is_some() && !Self::has_cert(&req) {
                return Err(Status::unauthenticated(
                    "the Peer service requires a client certificate",
                ));
            }
            Ok(req)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
