//! The console's pages and actions (see the module above for the map).

use std::fmt::Write;

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::html::{esc, page, table, time, url};
use crate::admin::auth::COOKIE;
use crate::admin::{AdminState, status_name, write_one};
use crate::error::Error;
use crate::state::{Cmd, NodeStatus};

#[derive(Debug, Default, Deserialize)]
pub(super) struct LoginQuery {
    error: Option<String>,
}

pub(super) async fn login_form(Query(q): Query<LoginQuery>) -> Html<String> {
    let error = if q.error.is_some() {
        "<p class=\"error\" id=\"login-error\">That token was not accepted.</p>"
    } else {
        ""
    };
    Html(format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Log in · GateSvr</title>\
         <link rel=\"stylesheet\" href=\"/console/static/console.css\"></head><body class=\"login\"><main>\
         <h1>GateSvr console</h1>{error}\
         <form method=\"post\" action=\"/console/login\">\
         <label>Admin or read-only token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"off\" required></label>\
         <button type=\"submit\" id=\"login\">Log in</button></form>\
         <p class=\"hint\">The same tokens as the admin API (<code>admin.admin_token</code>, <code>admin.read_token</code>).</p>\
         </main></body></html>"
    ))
}

#[derive(Debug, Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

fn cookie(s: &AdminState, value: &str, max_age: u32) -> Option<HeaderValue> {
    let secure = if s.https { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .ok()
}

/// Stores the token in the console's cookie; the next page checks it.
pub(super) async fn login(State(s): State<AdminState>, Form(f): Form<LoginForm>) -> Response {
    let token = f.token.trim();
    // A cookie value cannot carry these; no real token has them.
    if token.is_empty() || token.contains([';', ',', ' ', '"', '\\']) || !token.is_ascii() {
        return Redirect::to(&format!("{}?error=invalid", super::LOGIN)).into_response();
    }
    let mut resp = Redirect::to("/console").into_response();
    if let Some(c) = cookie(&s, token, 12 * 3600) {
        resp.headers_mut().insert(header::SET_COOKIE, c);
    }
    resp
}

pub(super) async fn logout(State(s): State<AdminState>) -> Response {
    let mut resp = Redirect::to(super::LOGIN).into_response();
    if let Some(c) = cookie(&s, "", 0) {
        resp.headers_mut().insert(header::SET_COOKIE, c);
    }
    resp
}

pub(super) async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("console.js"),
    )
}

pub(super) async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("console.css"),
    )
}

/// An error as a console page.
fn error_page(e: &Error) -> Response {
    let body = format!(
        "<p class=\"error\" id=\"error\">{} ({})</p><p><a href=\"/console\">Back</a></p>",
        esc(&e.to_string()),
        e.code()
    );
    (e.http_status(), Html(page("Error", "", &body))).into_response()
}

/// Live-rate cells the script fills for `node`.
fn rate_cells(node: &str) -> [String; 3] {
    ["requests", "errors", "pushes"].map(|k| {
        format!(
            "<span class=\"rate\" data-node=\"{}\" data-kind=\"{k}\">…</span>",
            esc(node)
        )
    })
}

pub(super) async fn overview(State(s): State<AdminState>) -> Response {
    let m = s.node.raft().metrics().borrow().clone();
    let members = crate::admin::cluster::members(&s.node);
    let mut body = String::new();
    let leader = m.current_leader.map_or_else(
        || "none (election in progress?)".to_string(),
        |l| l.to_string(),
    );
    let _ = write!(
        body,
        "<section><h2>Control plane</h2><p id=\"leader\">Leader: <b>{}</b> · term {} · this node {} ({})</p>",
        esc(&leader),
        m.current_term,
        m.id,
        esc(&format!("{:?}", m.state).to_lowercase())
    );
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|x| {
            let lead = if Some(x.id) == m.current_leader {
                " (leader)"
            } else {
                ""
            };
            vec![
                format!("{}{lead}", x.id),
                esc(&x.role),
                esc(&x.grpc_addr),
                esc(&x.admin_addr),
                x.matched_index.map_or("-".into(), |i| i.to_string()),
            ]
        })
        .collect();
    body.push_str(&table(
        "members",
        &["ID", "Role", "gRPC", "Admin", "Matched index"],
        &rows,
    ));
    body.push_str("</section>");
    let inner = s.node.sm().read();
    let st = &inner.state;
    let live = st.nodes.values().filter(|n| n.status.is_live()).count();
    let _ = write!(
        body,
        "<section><h2>Cluster</h2><ul class=\"facts\">\
         <li><b id=\"live-nodes\">{live}</b> live data-plane nodes of {}</li>\
         <li><b>{}</b> sessions with an owner</li><li><b>{}</b> upstream instances</li>\
         <li>state version {}, applied index {}</li></ul></section>",
        st.nodes.len(),
        st.owners.len(),
        st.upstreams.len(),
        st.version,
        inner.last_applied.map_or(0, |l| l.index),
    );
    let rows: Vec<Vec<String>> = st
        .nodes
        .values()
        .filter(|n| n.status.is_live())
        .map(|n| {
            let [r, e, p] = rate_cells(&n.node_id);
            vec![esc(&n.node_id), status_name(n.status).into(), r, e, p]
        })
        .collect();
    body.push_str("<section><h2>Live rates (per second, from each node)</h2>");
    body.push_str(&table(
        "rates",
        &["Node", "State", "Requests/s", "Errors/s", "Pushes/s"],
        &rows,
    ));
    body.push_str("</section>");
    Html(page("Overview", "Overview", &body)).into_response()
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct Notice {
    done: Option<String>,
}

fn notice(q: &Notice) -> String {
    q.done.as_deref().map_or_else(String::new, |d| {
        format!("<p class=\"notice\" id=\"notice\">{}</p>", esc(d))
    })
}

fn action_link(action: &str, target: &str, label: &str) -> String {
    format!(
        "<a class=\"action\" id=\"{action}-{id}\" href=\"/console/confirm?action={action}&amp;target={t}\">{label}</a>",
        id = esc(target),
        t = url(target)
    )
}

pub(super) async fn nodes(State(s): State<AdminState>, Query(q): Query<Notice>) -> Response {
    let inner = s.node.sm().read();
    let rows: Vec<Vec<String>> = inner
        .state
        .nodes
        .values()
        .map(|n| {
            let mut actions = Vec::new();
            if n.status.is_live() {
                if n.drain_requested && !n.draining_reported {
                    actions.push(action_link("cancel_drain", &n.node_id, "Cancel drain"));
                } else if n.status == NodeStatus::Active {
                    actions.push(action_link("drain", &n.node_id, "Drain"));
                }
                if n.cordoned {
                    actions.push(action_link("uncordon", &n.node_id, "Uncordon"));
                } else {
                    actions.push(action_link("cordon", &n.node_id, "Cordon"));
                }
            } else {
                actions.push(action_link("remove", &n.node_id, "Remove"));
            }
            let [r, e, p] = rate_cells(&n.node_id);
            vec![
                esc(&n.node_id),
                format!(
                    "<span class=\"state {0}\" id=\"state-{1}\">{0}</span>",
                    status_name(n.status),
                    esc(&n.node_id)
                ),
                if n.cordoned { "yes" } else { "no" }.into(),
                n.sessions.to_string(),
                esc(&n.quic_addr),
                time(n.lease_expires_at_ms),
                format!("{r} / {e} / {p}"),
                actions.join(" "),
            ]
        })
        .collect();
    let body = format!(
        "{}{}<p class=\"hint\">Drain moves a node's sessions to the others and stops it; cordon keeps its sessions but gives it no new ones.</p>",
        notice(&q),
        table(
            "nodes",
            &[
                "Node",
                "State",
                "Cordoned",
                "Sessions",
                "QUIC",
                "Lease until",
                "Req/s / err/s / push/s",
                "Actions"
            ],
            &rows
        )
    );
    Html(page("Data-plane nodes", "Nodes", &body)).into_response()
}

pub(super) async fn zones(State(s): State<AdminState>) -> Response {
    // Each live node's view of upstream health (asked now, in parallel, bounded).
    let live: Vec<(String, String)> = {
        let inner = s.node.sm().read();
        inner
            .state
            .nodes
            .values()
            .filter(|n| n.status.is_live())
            .map(|n| (n.node_id.clone(), n.grpc_addr.clone()))
            .collect()
    };
    let asks = live.iter().map(|(id, grpc)| {
        let cfg = s.dataplane_http.clone();
        async move {
            let r = match crate::admin::nodes::dataplane_http_addr(&cfg, id, grpc) {
                Ok(addr) => crate::admin::dataplane::get_json(&format!("http://{addr}/stats"))
                    .await
                    .and_then(|v| {
                        serde_json::from_value::<crate::admin::model::NodeStats>(v)
                            .map_err(|e| Error::DataPlaneUnreachable(e.to_string()))
                    }),
                Err(e) => Err(e),
            };
            (id.clone(), r)
        }
    });
    let reports = futures::future::join_all(asks).await;
    let mut body = String::new();
    for (id, r) in &reports {
        if let Err(e) = r {
            let _ = write!(
                body,
                "<p class=\"warn\">Health as {} sees it is unknown: {}</p>",
                esc(id),
                esc(&e.to_string())
            );
        }
    }
    let inner = s.node.sm().read();
    for i in 0..s.node.settings().zone_count {
        let zone = gatesvr_proto::zone::zone_id(i);
        let rows: Vec<Vec<String>> = inner
            .state
            .upstreams
            .values()
            .filter(|u| u.zone == zone)
            .map(|u| {
                let health: Vec<String> = reports
                    .iter()
                    .filter_map(|(node, r)| {
                        let r = r.as_ref().ok()?;
                        let h = r
                            .upstreams
                            .iter()
                            .find(|h| h.zone == zone && h.address == u.address)?;
                        Some(format!(
                            "<span class=\"health {0}\">{1}: {0}</span>",
                            esc(&h.state),
                            esc(node)
                        ))
                    })
                    .collect();
                vec![
                    esc(&u.instance_id),
                    esc(&u.address),
                    esc(&u.service_name),
                    if u.lease_expires_at_ms == 0 {
                        "static".into()
                    } else {
                        time(u.lease_expires_at_ms)
                    },
                    if health.is_empty() {
                        "-".into()
                    } else {
                        health.join(" ")
                    },
                ]
            })
            .collect();
        let _ = write!(body, "<section><h2>Zone {zone}</h2>");
        body.push_str(&table(
            &format!("zone-{zone}"),
            &[
                "Instance",
                "Address",
                "Service",
                "Lease until",
                "Health (per data-plane node)",
            ],
            &rows,
        ));
        body.push_str("</section>");
    }
    Html(page("Zones and upstreams", "Zones", &body)).into_response()
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct SessionQuery {
    openid: Option<String>,
    prefix: Option<String>,
    done: Option<String>,
}

pub(super) async fn sessions(
    State(s): State<AdminState>,
    Query(q): Query<SessionQuery>,
) -> Response {
    let mut body = notice(&Notice {
        done: q.done.clone(),
    });
    let openid = q.openid.as_deref().unwrap_or("").trim();
    let _ = write!(
        body,
        "<form method=\"get\" action=\"/console/sessions\" class=\"inline\">\
         <label>openid <input name=\"openid\" id=\"openid\" value=\"{}\"></label>\
         <button type=\"submit\" id=\"lookup\">Look up</button></form>",
        esc(openid)
    );
    let zone_count = s.node.settings().zone_count;
    let inner = s.node.sm().read();
    if !openid.is_empty() {
        let zone = gatesvr_proto::zone::zone_of(openid, zone_count);
        match inner.state.owners.get(openid) {
            Some(o) => {
                let owner = if o.owner_node.is_empty() {
                    "(disconnected)".to_string()
                } else {
                    esc(&o.owner_node)
                };
                body.push_str(&table(
                    "session",
                    &["openid", "Zone", "Owner", "Epoch", "Session", "Changed", ""],
                    &[vec![
                        esc(openid),
                        zone,
                        owner,
                        o.epoch.to_string(),
                        esc(&o.session_id),
                        time(o.changed_at_ms),
                        action_link("disconnect", openid, "Disconnect"),
                    ]],
                ));
            }
            None => {
                let _ = write!(
                    body,
                    "<p id=\"no-session\">{} (zone {zone}) has no session.</p>",
                    esc(openid)
                );
            }
        }
    }
    let prefix = q.prefix.as_deref().unwrap_or("");
    let rows: Vec<Vec<String>> = inner
        .state
        .owners
        .range::<_, str>((
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(k, _)| k.starts_with(prefix))
        .take(50)
        .map(|(k, o)| {
            vec![
                format!(
                    "<a href=\"/console/sessions?openid={}\">{}</a>",
                    url(k),
                    esc(k)
                ),
                esc(&o.owner_node),
                o.epoch.to_string(),
            ]
        })
        .collect();
    let _ = write!(
        body,
        "<section><h2>Sessions{}</h2><form method=\"get\" action=\"/console/sessions\" class=\"inline\">\
         <label>openid prefix <input name=\"prefix\" value=\"{}\"></label><button type=\"submit\">Filter</button></form>",
        if prefix.is_empty() {
            String::new()
        } else {
            format!(" starting with {}", esc(prefix))
        },
        esc(prefix)
    );
    body.push_str(&table("sessions", &["openid", "Owner", "Epoch"], &rows));
    body.push_str("<p class=\"hint\">The first 50; <code>gatectl sessions list</code> pages through all.</p></section>");
    Html(page("Sessions", "Sessions", &body)).into_response()
}

/// The actions the console can take, each one command.
#[derive(Debug, Clone, Copy)]
enum Action {
    Drain,
    CancelDrain,
    Cordon,
    Uncordon,
    Remove,
    Disconnect,
}

impl Action {
    fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "drain" => Action::Drain,
            "cancel_drain" => Action::CancelDrain,
            "cordon" => Action::Cordon,
            "uncordon" => Action::Uncordon,
            "remove" => Action::Remove,
            "disconnect" => Action::Disconnect,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Action::Drain => "drain",
            Action::CancelDrain => "cancel_drain",
            Action::Cordon => "cordon",
            Action::Uncordon => "uncordon",
            Action::Remove => "remove",
            Action::Disconnect => "disconnect",
        }
    }

    /// What the confirmation page asks.
    fn question(self, target: &str) -> String {
        let t = esc(target);
        match self {
            Action::Drain => format!(
                "Drain data-plane node <b>{t}</b>? Its sessions move to the other nodes, then it stops."
            ),
            Action::CancelDrain => format!("Withdraw the drain request of <b>{t}</b>?"),
            Action::Cordon => {
                format!("Cordon <b>{t}</b>? It keeps its sessions but takes no new ones.")
            }
            Action::Uncordon => format!("Uncordon <b>{t}</b>? It takes new sessions again."),
            Action::Remove => format!("Forget the departed node <b>{t}</b>?"),
            Action::Disconnect => format!(
                "Disconnect the session of <b>{t}</b>? Its node closes it; the client may reconnect."
            ),
        }
    }

    fn cmd(self, target: String) -> Cmd {
        match self {
            Action::Drain => Cmd::DrainNode { node_id: target },
            Action::CancelDrain => Cmd::CancelDrain { node_id: target },
            Action::Cordon => Cmd::CordonNode {
                node_id: target,
                cordoned: true,
            },
            Action::Uncordon => Cmd::CordonNode {
                node_id: target,
                cordoned: false,
            },
            Action::Remove => Cmd::RemoveNode { node_id: target },
            Action::Disconnect => Cmd::DisconnectSession { openid: target },
        }
    }

    /// Where to go once done.
    fn back(self, target: &str, done: &str) -> String {
        match self {
            Action::Disconnect => format!(
                "/console/sessions?openid={}&done={}",
                url(target),
                url(done)
            ),
            _ => format!("/console/nodes?done={}", url(done)),
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ConfirmQuery {
    action: String,
    target: String,
}

pub(super) async fn confirm(Query(q): Query<ConfirmQuery>) -> Response {
    let Some(action) = Action::parse(&q.action) else {
        return error_page(&Error::InvalidArgument(format!(
            "unknown action {}",
            q.action
        )));
    };
    let body = format!(
        "<p id=\"question\">{}</p><form method=\"post\" action=\"/console/actions/{}\">\
         <input type=\"hidden\" name=\"target\" value=\"{}\">\
         <button type=\"submit\" id=\"confirm\" class=\"danger\">Yes, {}</button> \
         <a href=\"javascript:history.back()\" id=\"cancel\">Cancel</a></form>",
        action.question(&q.target),
        action.name(),
        esc(&q.target),
        action.name().replace('_', " "),
    );
    Html(page("Confirm", "", &body)).into_response()
}

#[derive(Debug, Deserialize)]
pub(super) struct ActForm {
    target: String,
}

pub(super) async fn act(
    State(s): State<AdminState>,
    Path(action): Path<String>,
    Form(f): Form<ActForm>,
) -> Response {
    let Some(action) = Action::parse(&action) else {
        return error_page(&Error::InvalidArgument(format!("unknown action {action}")));
    };
    if let Err(e) = crate::validate::ident("target", &f.target) {
        return error_page(&e);
    }
    match write_one(&s.node, action.cmd(f.target.clone())).await {
        Ok(_) => {
            tracing::info!(action = action.name(), target = %f.target, "console action");
            let done = format!("{}: {} done", f.target, action.name().replace('_', " "));
            Redirect::to(&action.back(&f.target, &done)).into_response()
        }
        Err(e) => error_page(&e),
    }
}
