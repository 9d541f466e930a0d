//! `gatectl sessions`: list (filtered, paginated, watchable), get, disconnect.

use clap::Subcommand;
use gatesvr_controlplane::admin::model::*;
use serde_json::Value;

use crate::client::encode;
use crate::out::{Failure, fail, ms, print_json, table};
use crate::{Ctx, WatchArgs, decode, done};

#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// Who owns an openid's session (exit 3 if nobody does, in every output format).
    Get { openid: String },
    /// Sessions in openid order, one page at a time.
    List {
        /// Only sessions owned by this data-plane node.
        #[arg(long)]
        node: Option<String>,
        /// Only sessions whose openid hashes to this zone.
        #[arg(long)]
        zone: Option<String>,
        /// Only openids starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Page size (1..=1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Start after this openid (the `next_after` a previous page printed).
        #[arg(long)]
        after: Option<String>,
        /// Fetch every page, not just one.
        #[arg(long, conflicts_with = "watch")]
        all: bool,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Disconnect a session: the node holding it closes it; the client may reconnect.
    Disconnect { openid: String },
}

pub async fn run(ctx: &Ctx, cmd: SessionsCmd) -> Result<(), Failure> {
    match cmd {
        SessionsCmd::Get { openid } => get(ctx, &openid).await,
        SessionsCmd::List {
            node,
            zone,
            prefix,
            limit,
            after,
            all,
            watch,
        } => {
            let f = Filter {
                node,
                zone,
                prefix,
                limit,
            };
            if all {
                list_all(ctx, &f, after).await
            } else {
                list(ctx, &f, after, &watch).await
            }
        }
        SessionsCmd::Disconnect { openid } => {
            let api = ctx.api()?;
            let v = api
                .call(
                    "POST",
                    &format!("/v1/sessions/{}/disconnect", encode(&openid)),
                    None,
                )
                .await?;
            done(
                ctx,
                &v,
                &format!("{openid}: disconnected (its node closes the session)"),
            );
            Ok(())
        }
    }
}

async fn get(ctx: &Ctx, openid: &str) -> Result<(), Failure> {
    let api = ctx.api()?;
    let (v, r): (Value, SessionReply) = api
        .get(&format!(
            "/v1/sessions/{}{}",
            encode(openid),
            api.query(&[])
        ))
        .await?;
    if ctx.json {
        print_json(&v);
    }
    let Some(s) = r.session else {
        return Err(fail(
            3,
            format!("{openid} (zone {}) has no session owner", r.zone),
        ));
    };
    if !ctx.json {
        rows(vec![s]);
    }
    Ok(())
}

struct Filter {
    node: Option<String>,
    zone: Option<String>,
    prefix: Option<String>,
    limit: u32,
}

fn path(ctx_api: &crate::client::Api, f: &Filter, after: Option<&str>) -> String {
    let limit = f.limit.to_string();
    let mut q: Vec<(&str, &str)> = vec![("limit", &limit)];
    for (k, v) in [
        ("node", f.node.as_deref()),
        ("zone", f.zone.as_deref()),
        ("prefix", f.prefix.as_deref()),
        ("after", after),
    ] {
        if let Some(v) = v {
            q.push((k, v));
        }
    }
    format!("/v1/sessions{}", ctx_api.query(&q))
}

async fn list(
    ctx: &Ctx,
    f: &Filter,
    after: Option<String>,
    watch: &WatchArgs,
) -> Result<(), Failure> {
    let api = ctx.api()?;
    let path = path(&api, f, after.as_deref());
    crate::list(ctx, watch, || api.call("GET", &path, None), show).await
}

async fn list_all(ctx: &Ctx, f: &Filter, mut after: Option<String>) -> Result<(), Failure> {
    let api = ctx.api()?;
    let mut all = Vec::new();
    loop {
        let (_, page): (Value, SessionsPage) = api.get(&path(&api, f, after.as_deref())).await?;
        all.extend(page.sessions);
        match page.next_after {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    if ctx.json {
        print_json(&serde_json::to_value(&all).unwrap_or_default());
    } else {
        rows(all);
    }
    Ok(())
}

fn show(v: &Value) -> Result<(), Failure> {
    let page: SessionsPage = decode(v)?;
    rows(page.sessions);
    if let Some(n) = page.next_after {
        eprintln!("(more: --after {n})");
    }
    Ok(())
}

fn rows(sessions: Vec<Session>) {
    table(
        &["OPENID", "ZONE", "OWNER", "EPOCH", "SESSION", "CHANGED"],
        sessions
            .into_iter()
            .map(|s| {
                vec![
                    s.openid,
                    s.zone,
                    if s.owner_node.is_empty() {
                        "(disconnected)".into()
                    } else {
                        s.owner_node
                    },
                    s.epoch.to_string(),
                    s.session_id,
                    ms(s.changed_at_ms),
                ]
            })
            .collect(),
    );
}
