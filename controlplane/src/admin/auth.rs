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

/// How much of a refused request's body is read (and dropped) before the
/// refusal is sent, and for how long at most.
const DRAIN_LIMIT: usize = 8 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// [`deny`], after reading the request's body (bounded): a connection closed
/// with the client's bytes unread is reset, and the reset can reach the client
/// before it read the refusal (schemathesis saw "EOF occurred in violation of
/// protocol" instead of a 401 for `POST /v1/cluster/restore` without a token).
async fn refuse(req: Request, status: StatusCode, message: &str) -> Response {
    let _ = tokio::time::timeout(
        DRAIN_TIME,
        axum::body::to_bytes(req.into_body(), DRAIN_LIMIT),
    )
    .await;
    deny(status, message)
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

/// Name of the cookie the console's login sets (HttpOnly, SameSite=Strict).
pub const COOKIE: &str = "gatesvr_admin_token";

/// The token in the console's cookie, accepted for the console's pages and forms and for
/// reads of the API (the console's live rates). The cookie is SameSite=Strict, so another
/// site cannot make a browser send it with a form or script of its own.
fn console_cookie(req: &Request) -> Option<&str> {
    let path = req.uri().path();
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if !(path.starts_with("/console") || (read && path.starts_with("/v1/"))) {
        return None;
    }
    // The browser says where a request comes from: refuse another site's.
    if let Some(site) = req.headers().get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return None;
    }
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// Middleware: GET/HEAD need the read or admin token; everything else the admin token.
pub async fn require(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    let Auth::Tokens(tokens) = &auth else {
        return next.run(req).await;
    };
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let presented = bearer.or_else(|| console_cookie(&req));
    let Some(token) = presented else {
        if req.uri().path().starts_with("/console") {
            // A browser without the console's cookie: to the login page.
            return axum::response::Redirect::to(super::console::LOGIN).into_response();
        }
        return refuse(
            req,
            StatusCode::UNAUTHORIZED,
            "missing bearer token: send `Authorization: Bearer <token>` (gatectl: --token or GATESVR_ADMIN_TOKEN)",
        )
        .await;
    };
    let is = |t: &Option<String>| {
        t.as_deref()
            .is_some_and(|t| ct_eq(t.as_bytes(), token.as_bytes()))
    };
    let is_admin = is(&tokens.admin);
    let is_read = is(&tokens.read);
    if !is_admin && !is_read {
        if req.uri().path().starts_with("/console") {
            return axum::response::Redirect::to(&format!(
                "{}?error=invalid",
                super::console::LOGIN
            ))
            .into_response();
        }
        return refuse(req, StatusCode::UNAUTHORIZED, "invalid bearer token").await;
    }
    let read_only = matches!(*req.method(), Method::GET | Method::HEAD);
    if !read_only && !is_admin {
        return refuse(
            req,
            StatusCode::FORBIDDEN,
            "the read-only token cannot change anything: use the admin token",
        )
        .await;
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
