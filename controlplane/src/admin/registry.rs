//! Zones and upstream registrations: `/v1/zones`, `/v1/upstreams`.

use axum::Json;
use axum::extract::State;

use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::model::*;
use super::{AdminState, ApiResult, read_meta, upstream, write_one};
use crate::error::Error;
use crate::state::{Cmd, CmdResult};
use crate::validate;

#[utoipa::path(get, path = "/v1/zones", params(ReadParams),
    responses((status = 200, body = ZonesReply)), security(("bearer" = [])))]
/// Zones and how many upstreams serve each.
pub(super) async fn list_zones(
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<ReadParams>,
) -> ApiResult<ZonesReply> {
    let meta = read_meta(&s.node, q.consistency).await?;
    let count = s.node.settings().zone_count;
    let inner = s.node.sm().read();
    let zones = (0..count)
        .map(|i| {
            let id = gatesvr_proto::zone::zone_id(i);
            let ups: Vec<_> = inner
                .state
                .upstreams
                .values()
                .filter(|u| u.zone == id)
                .collect();
            let mut services: Vec<String> = ups.iter().map(|u| u.service_name.clone()).collect();
            services.sort();
            services.dedup();
            Zone {
                zone: id,
                upstreams: ups.len(),
                services,
            }
        })
        .collect();
    Ok(Json(ZonesReply { meta, zones }))
}

#[utoipa::path(get, path = "/v1/upstreams",
    params(UpstreamParams),
    responses((status = 200, body = UpstreamsReply), (status = 400, body = ApiError)), security(("bearer" = [])))]
/// Registered upstreams, optionally of one zone.
pub(super) async fn list_upstreams(
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<UpstreamParams>,
) -> ApiResult<UpstreamsReply> {
    if let Some(z) = &q.zone {
        validate::zone(z, s.node.settings().zone_count)?;
    }
    let meta = read_meta(&s.node, q.consistency).await?;
    let inner = s.node.sm().read();
    let upstreams = inner
        .state
        .upstreams
        .values()
        .filter(|u| q.zone.as_ref().is_none_or(|z| &u.zone == z))
        .map(upstream)
        .collect();
    Ok(Json(UpstreamsReply { meta, upstreams }))
}

#[utoipa::path(post, path = "/v1/upstreams", request_body = RegisterUpstream,
    responses((status = 200, body = RegisterUpstreamReply), (status = 400, body = ApiError),
        (status = 409, body = ApiError), (status = 503, body = ApiError)), security(("bearer" = [])))]
/// Registers an upstream (idempotent on zone + address + service; 409 if the address serves
/// another service).
pub(super) async fn register_upstream(
    State(s): State<AdminState>,
    ApiJson(req): ApiJson<RegisterUpstream>,
) -> ApiResult<RegisterUpstreamReply> {
    validate::zone(&req.zone, s.node.settings().zone_count)?;
    validate::address("address", &req.address)?;
    validate::ident("service_name", &req.service_name)?;
    let ttl = req
        .lease_ttl_ms
        .map(|t| validate::lease_ttl_ms(t, &s.leases));
    match write_one(
        &s.node,
        Cmd::RegisterUpstream {
            instance_id: validate::new_instance_id(),
            zone: req.zone,
            address: req.address,
            service_name: req.service_name,
            lease_ttl_ms: ttl,
        },
    )
    .await?
    {
        CmdResult::Upstream {
            upstream: u,
            created,
        } => Ok(Json(RegisterUpstreamReply {
            upstream: upstream(&u),
            created,
        })),
        other => Err(Error::Raft(format!("unexpected {other:?}"))),
    }
}

#[utoipa::path(delete, path = "/v1/upstreams/{instance_id}",
    params(("instance_id" = String, Path, description = "the registration's instance id", min_length = 1, max_length = 256, pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$")),
    responses((status = 200, body = Done), (status = 404, body = ApiError)), security(("bearer" = [])))]
/// Removes an upstream registration.
pub(super) async fn deregister_upstream(
    State(s): State<AdminState>,
    ApiPath(instance_id): ApiPath<String>,
) -> ApiResult<Done> {
    validate::ident("instance_id", &instance_id)?;
    write_one(&s.node, Cmd::DeregisterUpstream { instance_id }).await?;
    Ok(Json(Done { ok: true }))
}
