//! Extractors that answer bad input with the API's JSON error instead of axum's text/plain
//! rejections, so every answer of the admin API matches its OpenAPI document.
//!
//! | rejection | status | `error` |
//! |---|---|---|
//! | body without `content-type: application/json` | 415 | `unsupported_media_type` |
//! | body that is not JSON | 400 | `invalid_json` |
//! | JSON of the wrong shape (missing field, wrong type, unknown field) | 422 | `invalid_body` |
//! | body over the size limit | 413 | `payload_too_large` |
//! | query string or path segment that does not parse | 400 | `invalid_argument` |
//! | no such route | 404 | `not_found` |
//! | route without this method | 405 | `method_not_allowed` (with `Allow`) |

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::ApiError;

fn error(status: StatusCode, code: &str, message: String) -> Response {
    ApiError {
        error: code.into(),
        message,
        leader: None,
    }
    .with_status(status)
}

/// A JSON body; rejections become 400/413/415/422 JSON errors.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(r) => Err(json_rejection(r)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> Response {
    let text = r.body_text();
    match r {
        JsonRejection::MissingJsonContentType(_) => error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as `content-type: application/json`".into(),
        ),
        JsonRejection::JsonSyntaxError(_) => error(StatusCode::BAD_REQUEST, "invalid_json", text),
        JsonRejection::JsonDataError(_) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", text)
        }
        JsonRejection::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", text)
        }
        _ => error(StatusCode::BAD_REQUEST, "invalid_body", text),
    }
}

/// A query string; a value that does not parse is a 400 JSON error.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|r: QueryRejection| {
                error(StatusCode::BAD_REQUEST, "invalid_argument", r.body_text())
            })
    }
}

/// Path parameters; a segment that does not parse (e.g. a non-numeric member id) is a 400
/// JSON error.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|r: PathRejection| {
                error(StatusCode::BAD_REQUEST, "invalid_argument", r.body_text())
            })
    }
}

/// The answer for a path no route matches.
pub async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint (see GET /openapi.json)".into(),
    )
}

/// Turns axum's empty 405 into the JSON error, keeping its `Allow` header.
pub async fn json_method_not_allowed(req: Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    if resp.status() != StatusCode::METHOD_NOT_ALLOWED {
        return resp;
    }
    let allow = resp.headers().get(axum::http::header::ALLOW).cloned();
    let mut out = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method (see the Allow header)".into(),
    );
    if let Some(a) = allow {
        out.headers_mut().insert(axum::http::header::ALLOW, a);
    }
    out.into_response()
}
