//! The OpenAPI document: utoipa derives the operations and bodies; [`document`] then adds
//! what every operation shares (the error answers of authentication, body parsing and
//! raft) and the values only known at run time (the configured zone ids), so that the
//! document says exactly what the server does. `scripts/schema-check` holds it to that with
//! schemathesis.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use utoipa::OpenApi;

use super::AdminState;
use super::model::*;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The operations and schemas utoipa derives.
#[derive(OpenApi)]
#[openapi(
    info(title = "GateSvr control plane admin API", description = "Zones, upstreams, data-plane nodes, sessions and the raft cluster."),
    paths(super::healthz, super::readyz,
        super::registry::list_zones, super::registry::list_upstreams,
        super::registry::register_upstream, super::registry::deregister_upstream,
        super::nodes::list_nodes, super::nodes::drain_node, super::nodes::cancel_drain,
        super::nodes::cordon, super::nodes::uncordon, super::nodes::remove_node,
        super::nodes::node_stats,
        super::sessions::get_session, super::sessions::list_sessions, super::sessions::disconnect,
        super::cluster::cluster_status, super::cluster::add_learner, super::cluster::promote,
        super::cluster::remove_member, super::cluster::trigger_snapshot,
        super::cluster::export_backup, super::cluster::import_backup),
    components(schemas(ApiError)),
    modifiers(&BearerScheme)
)]
pub struct AdminApiDoc;

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ApiError"}}}
    })
}

/// Adds `status` to `responses` unless the operation declares it already.
fn add(responses: &mut serde_json::Map<String, Value>, status: &str, description: &str) {
    responses
        .entry(status.to_string())
        .or_insert_with(|| error_response(description));
}

/// The exact document for a cluster with `zone_count` zones.
pub fn document(zone_count: u32) -> Value {
    let mut doc = serde_json::to_value(AdminApiDoc::openapi()).unwrap_or_default();
    let zones: Vec<String> = (0..zone_count).map(gatesvr_proto::zone::zone_id).collect();
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in item.iter_mut() {
                patch_operation(path, method, op, &zones);
            }
        }
    }
    for schema in ["RegisterUpstream"] {
        if let Some(zone) =
            doc.pointer_mut(&format!("/components/schemas/{schema}/properties/zone"))
        {
            *zone = json!({"type": "string", "enum": zones, "description": "One of the configured zone ids."});
        }
    }
    // Integer ranges as the server checks them (utoipa says int32/int64 for u32/u64).
    for (pointer, max, nullable) in [
        (
            "/components/schemas/RegisterUpstream/properties/lease_ttl_ms",
            u64::from(u32::MAX),
            true,
        ),
        (
            "/components/schemas/AddLearner/properties/id",
            u64::MAX,
            false,
        ),
    ] {
        if let Some(v) = doc.pointer_mut(pointer) {
            let ty = if nullable {
                json!(["integer", "null"])
            } else {
                json!("integer")
            };
            *v = json!({"type": ty, "minimum": 0, "maximum": max});
        }
    }
    // A backup file is opaque bytes (checked against its own header and checksum).
    if let Some(body) = doc.pointer_mut(
        "/paths/~1v1~1cluster~1restore/post/requestBody/content/application~1octet-stream/schema",
    ) {
        *body = json!({"type": "string", "format": "binary"});
    }
    add_links(&mut doc);
    doc
}

fn patch_operation(path: &str, method: &str, op: &mut Value, zones: &[String]) {
    let secured = op.get("security").is_some();
    let json_body = op
        .pointer("/requestBody/content/application~1json")
        .is_some();
    let binary_body = op
        .pointer("/requestBody/content/application~1octet-stream")
        .is_some();
    let mut has_path = false;
    let mut has_query = false;
    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
        for p in params.iter_mut() {
            match p.get("in").and_then(Value::as_str) {
                Some("path") => has_path = true,
                Some("query") => has_query = true,
                _ => {}
            }
            if p.get("name").and_then(Value::as_str) == Some("zone") {
                p["schema"] = json!({"type": "string", "enum": zones});
            }
            // u64 ids: say where they end, so a larger number is known to be invalid.
            if p.pointer("/schema/format").and_then(Value::as_str) == Some("int64")
                && p.pointer("/schema/minimum").is_some()
            {
                p["schema"]["maximum"] = json!(u64::MAX);
            }
        }
    }
    let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
        return;
    };
    if secured {
        add(responses, "401", "no or an unknown bearer token");
        if method != "get" {
            add(responses, "403", "the read-only token cannot write");
        }
    }
    if json_body {
        add(responses, "400", "the body is not JSON");
        add(
            responses,
            "415",
            "the body is not sent as content-type: application/json",
        );
        add(
            responses,
            "422",
            "the JSON does not match the schema (missing or unknown field, wrong type)",
        );
        add(responses, "413", "the body is too large");
    }
    if binary_body {
        add(responses, "413", "the body is too large");
    }
    if has_path || has_query || json_body || binary_body {
        add(responses, "400", "a parameter or the body is invalid");
    }
    if has_path {
        add(responses, "404", "no such resource");
    }
    if path.starts_with("/v1/") {
        add(
            responses,
            "503",
            "no quorum or no leader within the timeout; retry later",
        );
        if method != "get" || path == "/v1/cluster" {
            add(
                responses,
                "421",
                "this node could not forward to the leader; the body names it",
            );
        }
        if method != "get" {
            add(responses, "409", "refused by the cluster's current state");
        }
    }
}

/// OpenAPI links: what a client (and schemathesis' stateful phase) can do next with what an
/// answer returns.
fn add_links(doc: &mut Value) {
    if let Some(ok) = doc.pointer_mut("/paths/~1v1~1upstreams/post/responses/200") {
        ok["links"] = json!({
            "DeregisterUpstream": {
                "operationId": "deregister_upstream",
                "parameters": {"instance_id": "$response.body#/upstream/instance_id"}
            }
        });
    }
    if let Some(ok) = doc.pointer_mut("/paths/~1v1~1cluster~1learners/post/responses/200") {
        ok["links"] = json!({
            "RemoveLearner": {
                "operationId": "remove_member",
                "parameters": {"id": "$response.body#/node_id"}
            }
        });
    }
}

/// `GET /openapi.json`.
pub(super) async fn serve(State(s): State<AdminState>) -> Json<Value> {
    Json(document(s.node.settings().zone_count))
}
