//! `gatectl nodes`: list (and watch), drain and cancel, cordon and uncordon, remove.

use clap::Subcommand;
use gatesvr_controlplane::admin::model::*;
use serde_json::Value;

use crate::client::encode;
use crate::out::{Failure, ms, table};
use crate::{Ctx, WatchArgs, decode, done};

#[derive(Debug, Subcommand)]
pub enum NodesCmd {
    /// List data-plane nodes and recent failovers.
    List {
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Ask a node to drain (it moves its sessions away, then leaves).
    Drain { node_id: String },
    /// Withdraw a drain the node has not started yet.
    CancelDrain { node_id: String },
    /// Keep a node's sessions but let it take no new ones.
    Cordon { node_id: String },
    /// Let a cordoned node take new sessions again.
    Uncordon { node_id: String },
    /// Forget a dead or departed node.
    Remove { node_id: String },
}

pub async fn run(ctx: &Ctx, cmd: NodesCmd) -> Result<(), Failure> {
    match cmd {
        NodesCmd::List { watch } => list(ctx, &watch).await,
        NodesCmd::Drain { node_id } => {
            let m = format!("{node_id}: drain requested (the node learns on its next heartbeat)");
            write(ctx, "POST", &node_id, "/drain", &m).await
        }
        NodesCmd::CancelDrain { node_id } => {
            let m = format!("{node_id}: drain request withdrawn");
            write(ctx, "DELETE", &node_id, "/drain", &m).await
        }
        NodesCmd::Cordon { node_id } => {
            let m = format!("{node_id}: cordoned (keeps its sessions, takes no new ones)");
            write(ctx, "POST", &node_id, "/cordon", &m).await
        }
        NodesCmd::Uncordon { node_id } => {
            let m = format!("{node_id}: uncordoned");
            write(ctx, "DELETE", &node_id, "/cordon", &m).await
        }
        NodesCmd::Remove { node_id } => {
            let m = format!("{node_id}: removed");
            write(ctx, "DELETE", &node_id, "", &m).await
        }
    }
}

async fn write(
    ctx: &Ctx,
    method: &str,
    node_id: &str,
    suffix: &str,
    message: &str,
) -> Result<(), Failure> {
    let api = ctx.api()?;
    let v = api
        .call(
            method,
            &format!("/v1/nodes/{}{suffix}", encode(node_id)),
            None,
        )
        .await?;
    done(ctx, &v, message);
    Ok(())
}

async fn list(ctx: &Ctx, watch: &WatchArgs) -> Result<(), Failure> {
    let api = ctx.api()?;
    let path = format!("/v1/nodes{}", api.query(&[]));
    crate::list(ctx, watch, || api.call("GET", &path, None), show).await
}

fn show(v: &Value) -> Result<(), Failure> {
    let r: NodesReply = decode(v)?;
    table(
        &[
            "NODE",
            "STATE",
            "CORDONED",
            "QUIC",
            "GRPC",
            "SESSIONS",
            "DRAIN REQUESTED",
            "LEASE EXPIRES",
        ],
        r.nodes
            .into_iter()
            .map(|n| {
                vec![
                    n.node_id,
                    n.state,
                    n.cordoned.to_string(),
                    n.quic_addr,
                    n.grpc_addr,
                    n.sessions.to_string(),
                    n.drain_requested.to_string(),
                    ms(n.lease_expires_at_ms),
                ]
            })
            .collect(),
    );
    if !r.failovers.is_empty() {
        println!();
        table(
            &["FAILED NODE", "DECIDED", "SESSIONS", "MOVED TO"],
            r.failovers
                .into_iter()
                .map(|f| {
                    let moved: Vec<String> =
                        f.moved_to.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    vec![
                        f.failed_node,
                        ms(f.decided_at_ms),
                        f.sessions.to_string(),
                        moved.join(","),
                    ]
                })
                .collect(),
        );
    }
    Ok(())
}
