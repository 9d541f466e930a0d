//! `gatectl zones` and `gatectl upstreams`.

use std::time::Duration;

use clap::Subcommand;
use gatesvr_controlplane::admin::model::*;
use serde_json::Value;

use crate::client::encode;
use crate::out::{Failure, fail, ms, table};
use crate::{Ctx, decode, done};

#[derive(Debug, Subcommand)]
pub enum ZonesCmd {
    /// List zones.
    List,
}

#[derive(Debug, Subcommand)]
pub enum UpstreamsCmd {
    /// List upstreams.
    List {
        #[arg(long)]
        zone: Option<String>,
    },
    /// Register an upstream (static unless --lease-ttl).
    Register {
        #[arg(long)]
        zone: String,
        /// host:port
        #[arg(long)]
        addr: String,
        #[arg(long)]
        service: String,
        /// Lease, e.g. 30s; omit for a static registration.
        #[arg(long, value_parser = humantime::parse_duration)]
        lease_ttl: Option<Duration>,
    },
    /// Remove an upstream registration.
    Deregister { instance_id: String },
    /// Each upstream instance's health and ejection as every data-plane node sees it (from the
    /// control plane's `GET /v1/nodes/{node}/stats`, which asks the node).
    Health {
        /// Only this data-plane node.
        #[arg(long)]
        node: Option<String>,
    },
}

pub async fn zones(ctx: &Ctx, ZonesCmd::List: ZonesCmd) -> Result<(), Failure> {
    let api = ctx.api()?;
    let (v, r): (Value, ZonesReply) = api.get(&format!("/v1/zones{}", api.query(&[]))).await?;
    if ctx.json {
        crate::out::print_json(&v);
        return Ok(());
    }
    table(
        &["ZONE", "UPSTREAMS", "SERVICES"],
        r.zones
            .into_iter()
            .map(|z| vec![z.zone, z.upstreams.to_string(), z.services.join(",")])
            .collect(),
    );
    Ok(())
}

pub async fn upstreams(ctx: &Ctx, cmd: UpstreamsCmd) -> Result<(), Failure> {
    match cmd {
        UpstreamsCmd::List { zone } => list(ctx, zone).await,
        UpstreamsCmd::Register {
            zone,
            addr,
            service,
            lease_ttl,
        } => register(ctx, zone, addr, service, lease_ttl).await,
        UpstreamsCmd::Deregister { instance_id } => {
            let api = ctx.api()?;
            let v = api
                .call(
                    "DELETE",
                    &format!("/v1/upstreams/{}", encode(&instance_id)),
                    None,
                )
                .await?;
            done(ctx, &v, &format!("{instance_id} deregistered"));
            Ok(())
        }
        UpstreamsCmd::Health { node } => health(ctx, node).await,
    }
}

async fn list(ctx: &Ctx, zone: Option<String>) -> Result<(), Failure> {
    let api = ctx.api()?;
    let q = match &zone {
        Some(z) => api.query(&[("zone", z)]),
        None => api.query(&[]),
    };
    let (v, r): (Value, UpstreamsReply) = api.get(&format!("/v1/upstreams{q}")).await?;
    if ctx.json {
        crate::out::print_json(&v);
        return Ok(());
    }
    table(
        &[
            "INSTANCE",
            "ZONE",
            "ADDRESS",
            "SERVICE",
            "REGISTERED",
            "LEASE EXPIRES",
        ],
        r.upstreams
            .into_iter()
            .map(|u| {
                vec![
                    u.instance_id,
                    u.zone,
                    u.address,
                    u.service_name,
                    ms(u.registered_at_ms),
                    if u.lease_expires_at_ms == 0 {
                        "never (static)".into()
                    } else {
                        ms(u.lease_expires_at_ms)
                    },
                ]
            })
            .collect(),
    );
    Ok(())
}

async fn register(
    ctx: &Ctx,
    zone: String,
    addr: String,
    service: String,
    lease_ttl: Option<Duration>,
) -> Result<(), Failure> {
    let api = ctx.api()?;
    let body = serde_json::to_value(RegisterUpstream {
        zone,
        address: addr,
        service_name: service,
        lease_ttl_ms: lease_ttl.map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
    })
    .map_err(|e| fail(1, e.to_string()))?;
    let v = api.call("POST", "/v1/upstreams", Some(body)).await?;
    let r: RegisterUpstreamReply = decode(&v)?;
    let what = if r.created {
        "registered"
    } else {
        "already registered; lease renewed"
    };
    done(ctx, &v, &format!("{} {what}", r.upstream.instance_id));
    Ok(())
}

async fn health(ctx: &Ctx, only: Option<String>) -> Result<(), Failure> {
    let api = ctx.api()?;
    let (_, nodes): (Value, NodesReply) = api.get(&format!("/v1/nodes{}", api.query(&[]))).await?;
    let mut reports = Vec::new();
    for n in nodes
        .nodes
        .iter()
        .filter(|n| n.state == "active" || n.state == "draining")
    {
        if only.as_ref().is_some_and(|o| o != &n.node_id) {
            continue;
        }
        let (v, r): (Value, NodeStats) = api
            .get(&format!("/v1/nodes/{}/stats", encode(&n.node_id)))
            .await?;
        reports.push((n.node_id.clone(), v, r));
    }
    if let Some(o) = &only
        && reports.is_empty()
    {
        return Err(fail(3, format!("no live data-plane node {o}")));
    }
    if ctx.json {
        let all: serde_json::Map<String, Value> =
            reports.into_iter().map(|(id, v, _)| (id, v)).collect();
        crate::out::print_json(&Value::Object(all));
        return Ok(());
    }
    let mut rows = Vec::new();
    for (node, _, r) in reports {
        for u in r.upstreams {
            rows.push(vec![
                node.clone(),
                u.zone,
                u.instance_id,
                u.address,
                u.state,
                u.outstanding.to_string(),
            ]);
        }
    }
    table(
        &[
            "NODE",
            "ZONE",
            "INSTANCE",
            "ADDRESS",
            "STATE",
            "OUTSTANDING",
        ],
        rows,
    );
    Ok(())
}
