//! The web console: server-rendered pages over the same state and commands as the API,
//! behind the same tokens, with one small bundled script for live rates. No CDN, no build
//! step: everything it serves is in this binary (production clusters have no network).
//!
//! ```text
//!  /console/login  ── token ──> cookie (HttpOnly, SameSite=Strict) ──> /console
//!  /console            members, leader, term; nodes and zones at a glance; live rates
//!  /console/nodes      data-plane nodes: state, sessions, cordon; drain/cordon actions
//!  /console/zones      zones, registered upstream instances, health as each node sees it
//!  /console/sessions   look up an openid; disconnect it
//!  /console/confirm    every action asks first; the confirmation page posts the action
//! ```
//!
//! The cookie holds the token itself (read-only or admin): the auth middleware accepts it
//! for `/console` and for API reads, so the console can do exactly what the token can.

mod html;
mod pages;

use axum::Router;
use axum::routing::{get, post};

use super::AdminState;

/// The login page.
pub const LOGIN: &str = "/console/login";

/// Pages and actions behind the tokens.
pub(super) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/console", get(pages::overview))
        .route("/console/nodes", get(pages::nodes))
        .route("/console/zones", get(pages::zones))
        .route("/console/sessions", get(pages::sessions))
        .route("/console/confirm", get(pages::confirm))
        .route("/console/actions/{action}", post(pages::act))
        .route("/console/logout", post(pages::logout))
}

/// The login page and the static script: no token needed.
pub(super) fn public_routes() -> Router<AdminState> {
    Router::new()
        .route(LOGIN, get(pages::login_form).post(pages::login))
        .route("/console/static/console.js", get(pages::script))
        .route("/console/static/console.css", get(pages::style))
}
