//! Bearer-token authentication of the admin API: a read-only token and an admin token.

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::config::AdminTokens;

/// What the admin API requires.
#[derive(Debug, Clone)]
pub enum Auth {
    /// `admin.auth: none` (`gatesvr dev` only).
    Disabled,
    Tokens(AdminTokens),
}

/// Compares in time independent of where the inputs differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn deny(status: StatusCode, message: &str) -> Response {
    let mut resp = ApiError {
        error: if status == StatusCode::UNAUTHORIZED {
            "unauthorized"
        } else {
            "forbidden"
        }
        .into(),
        message: message.into(),
        leader: None,
    }
    .with_status(status);
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"gatesvr-admin\""),
        );
    }
    resp
}

/// Middleware: GET/HEAD need the read or admin token; everything else the admin token.
pub async fn require(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    let Auth::Tokens(tokens) = &auth else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = presented else {
        return deny(
            StatusCode::UNAUTHORIZED,
            "missing bearer token: send `Authorization: Bearer <token>` (gatectl: --token or GATESVR_ADMIN_TOKEN)",
        );
    };
    let is = |t: &Option<String>| {
        t.as_deref()
            .is_some_and(|t| ct_eq(t.as_bytes(), token.as_bytes()))
    };
    let is_admin = is(&tokens.admin);
    let is_read = is(&tokens.read);
    if !is_admin && !is_read {
        return deny(StatusCode::UNAUTHORIZED, "invalid bearer token");
    }
    let read_only = matches!(*req.method(), Method::GET | Method::HEAD);
    if !read_only && !is_admin {
        return deny(
            StatusCode::FORBIDDEN,
            "the read-only token cannot change anything: use the admin token",
        );
    }
    next.run(req).await.into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ct_eq_compares() {
        assert!(super::ct_eq(b"abc", b"abc"));
        assert!(!super::ct_eq(b"abc", b"abd"));
        assert!(!super::ct_eq(b"abc", b"ab"));
    }
}
