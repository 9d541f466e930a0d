//! The web console (stub replaced below).
use super::AdminState;
use axum::Router;
pub(super) fn routes() -> Router<AdminState> {
    Router::new()
}
pub(super) fn public_routes() -> Router<AdminState> {
    Router::new()
}
