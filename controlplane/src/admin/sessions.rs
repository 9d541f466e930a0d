//! Session ownership: look one up, list them (filtered, paginated), disconnect one.

use axum::Json;
use axum::extract::State;

use super::extract::{ApiPath, ApiQuery};
use super::model::*;
use super::{AdminState, ApiResult, read_meta, write_one};
use crate::error::Error;
use crate::state::{Cmd, OwnerRec};
use crate::validate;

fn session(openid: &str, o: &OwnerRec, zone_count: u32) -> Session {
    Session {
        openid: openid.to_string(),
        session_id: o.session_id.clone(),
        owner_node: o.owner_node.clone(),
        epoch: o.epoch,
        changed_at_ms: o.changed_at_ms,
        zone: gatesvr_proto::zone::zone_of(openid, zone_count),
    }
}

#[utoipa::path(get, path = "/v1/sessions/{openid}", params(OpenidPath, ReadParams),
    responses((status = 200, body = SessionReply)), security(("bearer" = [])))]
/// Who owns `openid`'s session, at which epoch (`session: null` if nobody does).
pub(super) async fn get_session(
    State(s): State<AdminState>,
    ApiPath(openid): ApiPath<String>,
    ApiQuery(q): ApiQuery<ReadParams>,
) -> ApiResult<SessionReply> {
    validate::ident("openid", &openid)?;
    let meta = read_meta(&s.node, q.consistency).await?;
    let zone_count = s.node.settings().zone_count;
    let inner = s.node.sm().read();
    let session = inner
        .state
        .owners
        .get(&openid)
        .map(|o| session(&openid, o, zone_count));
    let zone = gatesvr_proto::zone::zone_of(&openid, zone_count);
    Ok(Json(SessionReply {
        meta,
        session,
        zone,
    }))
}

#[utoipa::path(get, path = "/v1/sessions", params(SessionsParams),
    responses((status = 200, body = SessionsPage)), security(("bearer" = [])))]
/// Sessions in openid order, filtered by owner node, zone and openid prefix; one page at a
/// time (`after` = the previous page's `next_after`).
pub(super) async fn list_sessions(
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<SessionsParams>,
) -> ApiResult<SessionsPage> {
    let zone_count = s.node.settings().zone_count;
    if let Some(z) = &q.zone {
        validate::zone(z, zone_count)?;
    }
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(Error::InvalidArgument(format!(
            "limit must be 1..={MAX_PAGE}"
        )));
    }
    let limit = limit as usize;
    let meta = read_meta(&s.node, q.consistency).await?;
    let inner = s.node.sm().read();
    let start = match &q.after {
        Some(a) => std::ops::Bound::Excluded(a.clone()),
        None => std::ops::Bound::Unbounded,
    };
    let prefix = q.prefix.as_deref().unwrap_or("");
    let mut sessions = Vec::new();
    let mut more = false;
    for (openid, o) in inner
        .state
        .owners
        .range::<_, String>((start, std::ops::Bound::Unbounded))
    {
        if !openid.starts_with(prefix) {
            // Owners are sorted: past the prefix's range nothing more can match.
            if openid.as_str() > prefix {
                break;
            }
            continue;
        }
        if q.node.as_ref().is_some_and(|n| n != &o.owner_node) {
            continue;
        }
        let item = session(openid, o, zone_count);
        if q.zone.as_ref().is_some_and(|z| z != &item.zone) {
            continue;
        }
        if sessions.len() == limit {
            more = true;
            break;
        }
        sessions.push(item);
    }
    let next_after = if more {
        sessions.last().map(|s: &Session| s.openid.clone())
    } else {
        None
    };
    Ok(Json(SessionsPage {
        meta,
        sessions,
        next_after,
    }))
}

#[utoipa::path(post, path = "/v1/sessions/{openid}/disconnect", params(OpenidPath),
    responses((status = 200, body = Done), (status = 404, body = ApiError)), security(("bearer" = [])))]
/// Disconnects a session: its ownership moves to nobody at a new epoch, so the data-plane
/// node holding it closes the connection (`SESSION_REPLACED`); the client may reconnect and
/// is claimed afresh.
pub(super) async fn disconnect(
    State(s): State<AdminState>,
    ApiPath(openid): ApiPath<String>,
) -> ApiResult<Done> {
    validate::ident("openid", &openid)?;
    write_one(&s.node, Cmd::DisconnectSession { openid }).await?;
    Ok(Json(Done { ok: true }))
}
