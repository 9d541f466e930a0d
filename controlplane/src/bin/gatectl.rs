//! `gatectl`: the operator CLI over the control plane's admin HTTP API.
//!
//! Human-readable tables by default, `--output json` for scripts (the API's JSON verbatim).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gatesvr_controlplane::admin::model::*;
use gatesvr_controlplane::backup;
use http_body_util::{BodyExt, Full};
use serde::de::DeserializeOwned;
use serde_json::Value;

const EXIT_HELP: &str = "\
Exit codes:
  0   success
  1   unexpected error (bad response, internal error on the server)
  2   usage error
  3   not found
  4   refused: conflict, fencing, failed precondition, invalid argument
  5   unavailable: no leader / no quorum / not the leader (retry later)
  6   unauthorized or forbidden (token missing, wrong, or read-only)
  7   cannot reach the admin API
  8   bad backup file (truncated, checksum mismatch, unsupported version, not a backup)
";

#[derive(Debug, Parser)]
#[command(name = "gatectl", version, about = "Operate a GateSvr control plane", after_help = EXIT_HELP)]
struct Cli {
    /// Admin API base URL.
    #[arg(
        long,
        global = true,
        env = "GATECTL_ENDPOINT",
        default_value = "http://127.0.0.1:8095"
    )]
    endpoint: String,
    /// Bearer token (read-only or admin).
    #[arg(
        long,
        global = true,
        env = "GATESVR_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, global = true, env = "GATESVR_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Read consistency: linearizable (quorum-confirmed) or local (this node's view).
    #[arg(long, global = true, value_enum)]
    consistency: Option<ConsistencyArg>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ConsistencyArg {
    Linearizable,
    Local,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Zones and their upstreams.
    #[command(subcommand)]
    Zones(ZonesCmd),
    /// Upstream registrations.
    #[command(subcommand)]
    Upstreams(UpstreamsCmd),
    /// Data-plane nodes.
    #[command(subcommand)]
    Nodes(NodesCmd),
    /// Session ownership.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// The control-plane raft cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Backups of the replicated state (disaster recovery).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Client tokens.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Debug, Subcommand)]
enum SnapshotCmd {
    /// Write a consistent backup of the whole state (upstreams, nodes, session owners,
    /// failovers) to FILE (written atomically; verified before it is kept).
    Export {
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into the cluster behind --endpoint (meant for a fresh one): records
    /// the cluster already has are kept, nothing is deleted, epochs jump past both.
    Import { file: PathBuf },
    /// Verify a backup file offline and print its header.
    Inspect { file: PathBuf },
}

#[derive(Debug, Subcommand)]
enum ZonesCmd {
    /// List zones.
    List,
}

#[derive(Debug, Subcommand)]
enum UpstreamsCmd {
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
}

#[derive(Debug, Subcommand)]
enum NodesCmd {
    /// List data-plane nodes and recent failovers.
    List,
    /// Ask a node to drain.
    Drain { node_id: String },
}

#[derive(Debug, Subcommand)]
enum SessionsCmd {
    /// Who owns an openid's session.
    Get { openid: String },
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Leader, term, members and log indexes (as the answering node sees them).
    Status,
    /// Add a control-plane node as a learner.
    AddLearner {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        grpc_addr: String,
        #[arg(long)]
        admin_addr: String,
    },
    /// Promote a learner to voter.
    Promote { id: u64 },
    /// Remove a member (voter or learner).
    Remove { id: u64 },
    /// Build a snapshot (and compact the log) on the answering node.
    Snapshot,
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Print an HMAC client token.
    Issue {
        #[arg(long)]
        openid: String,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// File holding the shared secret (surrounding whitespace ignored).
        #[arg(long)]
        secret_file: PathBuf,
    },
}

/// A failure with its exit code.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        fail(1, format!("{e:#}"))
    }
}

struct Api {
    base: String,
    token: Option<String>,
    consistency: Option<ConsistencyArg>,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<bytes::Bytes>,
    >,
}

impl Api {
    fn query(&self, extra: &[(&str, &str)]) -> String {
        let mut q: Vec<String> = extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(c) = self.consistency {
            let c = match c {
                ConsistencyArg::Linearizable => "linearizable",
                ConsistencyArg::Local => "local",
            };
            q.push(format!("consistency={c}"));
        }
        if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        }
    }

    /// Sends a request; returns the JSON body of a 2xx answer, or a `Failure` with the exit
    /// code the API's error maps to.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Failure> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let bytes = self
            .call_raw(method, path, "application/json", bytes::Bytes::from(body))
            .await?;
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// Like [`Api::call`] with any body; returns the raw body of a 2xx answer.
    async fn call_raw(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: bytes::Bytes,
    ) -> Result<bytes::Bytes, Failure> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let mut req = http::Request::builder()
            .method(method)
            .uri(&url)
            .header("content-type", content_type);
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| fail(2, format!("bad request for {url}: {e}")))?;
        // Backups of large clusters take a while to serve and to commit.
        let t = Duration::from_secs(120);
        let resp = tokio::time::timeout(t, self.client.request(req))
            .await
            .map_err(|_| fail(7, format!("{url}: no answer within {t:?}")))?
            .map_err(|e| fail(7, format!("cannot reach {url}: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(7, format!("{url}: reading the answer: {e}")))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let err: Option<ApiError> = serde_json::from_value(json).ok();
        let (code_str, message, leader) = match err {
            Some(e) => (e.error, e.message, e.leader),
            None => (String::new(), format!("HTTP {status}"), None),
        };
        let code = match status.as_u16() {
            401 | 403 => 6,
            404 => 3,
            400 | 409 => 4,
            421 | 503 => 5,
            _ => 1,
        };
        let mut message = format!("{message} ({code_str}, HTTP {})", status.as_u16());
        if let Some(l) = leader {
            message.push_str(&format!(
                "\nleader: node {} at http://{} (try --endpoint http://{})",
                l.id, l.admin_addr, l.admin_addr
            ));
        }
        Err(fail(code, message))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<(Value, T), Failure> {
        let v = self.call("GET", path, None).await?;
        let t = serde_json::from_value(v.clone())
            .map_err(|e| fail(1, format!("unexpected answer from {path}: {e}")))?;
        Ok((v, t))
    }
}

/// Prints rows as an aligned table.
fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn ms(t: i64) -> String {
    if t == 0 {
        return "-".into();
    }
    let d = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(t).unwrap_or(0));
    humantime::format_rfc3339_seconds(d).to_string()
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn meta_line(m: &ReadMeta) {
    let c = match m.consistency {
        Consistency::Linearizable => "linearizable",
        Consistency::Local => "local",
    };
    eprintln!(
        "({c} read from node {} at index {})",
        m.served_by, m.applied_index
    );
}

fn print_members(members: &[MemberInfo]) {
    table(
        &["ID", "ROLE", "GRPC", "ADMIN", "MATCHED"],
        members
            .iter()
            .map(|m| {
                vec![
                    m.id.to_string(),
                    m.role.clone(),
                    m.grpc_addr.clone(),
                    m.admin_addr.clone(),
                    opt(m.matched_index),
                ]
            })
            .collect(),
    );
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Token(TokenCmd::Issue {
        openid,
        ttl,
        secret_file,
    }) = &cli.command
    {
        let raw = std::fs::read(secret_file)
            .with_context(|| format!("reading {}", secret_file.display()))
            .map_err(|e| fail(2, format!("{e:#}")))?;
        let secret = raw.trim_ascii();
        if secret.is_empty() {
            return Err(fail(
                2,
                format!("{}: secret is empty", secret_file.display()),
            ));
        }
        println!("{}", gatesvr_common::token::issue(secret, openid, *ttl));
        return Ok(());
    }
    if let Command::Snapshot(SnapshotCmd::Inspect { file }) = &cli.command {
        let b = backup::decode(&read_backup(file)?)
            .map_err(|e| fail(8, format!("{}: {e}", file.display())))?;
        if cli.output == Output::Json {
            println!(
                "{}",
                serde_json::to_string_pretty(&b.header).unwrap_or_default()
            );
        } else {
            println!("{}: a valid backup", file.display());
            print_header(&b.header);
        }
        return Ok(());
    }
    if !cli.endpoint.starts_with("http://") {
        return Err(fail(
            2,
            format!(
                "--endpoint {}: only http:// endpoints are supported",
                cli.endpoint
            ),
        ));
    }
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading {}", f.display()))
                .map_err(|e| fail(2, format!("{e:#}")))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let api = Api {
        base: cli.endpoint.clone(),
        token,
        consistency: cli.consistency,
        client: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http(),
    };
    let json = cli.output == Output::Json;
    let print_json =
        |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    match cli.command {
        Command::Token(_) | Command::Snapshot(SnapshotCmd::Inspect { .. }) => {}
        Command::Snapshot(SnapshotCmd::Export { out }) => {
            let bytes = api
                .call_raw(
                    "POST",
                    "/v1/cluster/backup",
                    "application/json",
                    bytes::Bytes::new(),
                )
                .await?;
            // Never keep a file that would not restore.
            let b = backup::decode(&bytes)
                .map_err(|e| fail(1, format!("the server sent a bad backup: {e}")))?;
            write_atomically(&out, &bytes)?;
            if json {
                print_json(&serde_json::to_value(&b.header).unwrap_or_default());
            } else {
                println!("wrote {} ({} bytes)", out.display(), bytes.len());
                print_header(&b.header);
            }
        }
        Command::Snapshot(SnapshotCmd::Import { file }) => {
            let bytes = read_backup(&file)?;
            let v = api
                .call_raw(
                    "POST",
                    "/v1/cluster/restore",
                    "application/octet-stream",
                    bytes.into(),
                )
                .await?;
            let v: Value = serde_json::from_slice(&v).unwrap_or(Value::Null);
            if json {
                print_json(&v);
            } else {
                let r: RestoreReply =
                    serde_json::from_value(v).map_err(|e| fail(1, e.to_string()))?;
                println!(
                    "restored {}: {} upstreams, {} nodes, {} session owners, {} failovers added; {} already present (kept); epochs continue after {}",
                    file.display(),
                    r.upstreams,
                    r.nodes,
                    r.owners,
                    r.failovers,
                    r.skipped,
                    r.last_epoch
                );
            }
        }
        Command::Zones(ZonesCmd::List) => {
            let (v, r): (_, ZonesReply) = api.get(&format!("/v1/zones{}", api.query(&[]))).await?;
            if json {
                print_json(&v);
            } else {
                meta_line(&r.meta);
                table(
                    &["ZONE", "UPSTREAMS", "SERVICES"],
                    r.zones
                        .into_iter()
                        .map(|z| vec![z.zone, z.upstreams.to_string(), z.services.join(",")])
                        .collect(),
                );
            }
        }
        Command::Upstreams(UpstreamsCmd::List { zone }) => {
            let q = match &zone {
                Some(z) => api.query(&[("zone", z)]),
                None => api.query(&[]),
            };
            let (v, r): (_, UpstreamsReply) = api.get(&format!("/v1/upstreams{q}")).await?;
            if json {
                print_json(&v);
            } else {
                meta_line(&r.meta);
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
            }
        }
        Command::Upstreams(UpstreamsCmd::Register {
            zone,
            addr,
            service,
            lease_ttl,
        }) => {
            let body = serde_json::to_value(RegisterUpstream {
                zone,
                address: addr,
                service_name: service,
                lease_ttl_ms: lease_ttl.map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
            })
            .map_err(|e| fail(1, e.to_string()))?;
            let v = api.call("POST", "/v1/upstreams", Some(body)).await?;
            if json {
                print_json(&v);
            } else {
                let r: RegisterUpstreamReply =
                    serde_json::from_value(v).map_err(|e| fail(1, e.to_string()))?;
                let what = if r.created {
                    "registered"
                } else {
                    "already registered; lease renewed"
                };
                println!("{} {what}", r.upstream.instance_id);
            }
        }
        Command::Upstreams(UpstreamsCmd::Deregister { instance_id }) => {
            let v = api
                .call("DELETE", &format!("/v1/upstreams/{instance_id}"), None)
                .await?;
            if json {
                print_json(&v);
            } else {
                println!("{instance_id} deregistered");
            }
        }
        Command::Nodes(NodesCmd::List) => {
            let (v, r): (_, NodesReply) = api.get(&format!("/v1/nodes{}", api.query(&[]))).await?;
            if json {
                print_json(&v);
            } else {
                meta_line(&r.meta);
                table(
                    &[
                        "NODE",
                        "STATE",
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
            }
        }
        Command::Nodes(NodesCmd::Drain { node_id }) => {
            let v = api
                .call("POST", &format!("/v1/nodes/{node_id}/drain"), None)
                .await?;
            if json {
                print_json(&v);
            } else {
                println!("{node_id}: drain requested (the node learns on its next heartbeat)");
            }
        }
        Command::Sessions(SessionsCmd::Get { openid }) => {
            let (v, r): (_, SessionReply) = api
                .get(&format!("/v1/sessions/{openid}{}", api.query(&[])))
                .await?;
            if json {
                print_json(&v);
            } else {
                meta_line(&r.meta);
                match r.session {
                    Some(s) => table(
                        &["OPENID", "ZONE", "OWNER", "EPOCH", "SESSION", "CHANGED"],
                        vec![vec![
                            s.openid,
                            r.zone,
                            s.owner_node,
                            s.epoch.to_string(),
                            s.session_id,
                            ms(s.changed_at_ms),
                        ]],
                    ),
                    None => {
                        return Err(fail(
                            3,
                            format!("{openid} (zone {}) has no session owner", r.zone),
                        ));
                    }
                }
            }
        }
        Command::Cluster(ClusterCmd::Status) => {
            let (v, r): (_, ClusterStatus) = api.get("/v1/cluster").await?;
            if json {
                print_json(&v);
            } else {
                println!("node:     {} ({})", r.node_id, r.state);
                println!("term:     {}", r.term);
                println!(
                    "leader:   {}",
                    r.leader.as_ref().map_or_else(
                        || "none".into(),
                        |l| format!("{} (admin {})", l.id, l.admin_addr)
                    )
                );
                println!(
                    "log:      last {} applied {} snapshot {} purged {}",
                    opt(r.last_log_index),
                    opt(r.last_applied_index),
                    opt(r.committed_snapshot_index),
                    opt(r.purged_index)
                );
                println!();
                print_members(&r.members);
            }
        }
        Command::Cluster(ClusterCmd::AddLearner {
            id,
            grpc_addr,
            admin_addr,
        }) => {
            let body = serde_json::to_value(AddLearner {
                id,
                grpc_addr,
                admin_addr,
            })
            .map_err(|e| fail(1, e.to_string()))?;
            membership(&api, json, "POST", "/v1/cluster/learners", Some(body)).await?;
        }
        Command::Cluster(ClusterCmd::Promote { id }) => {
            membership(
                &api,
                json,
                "POST",
                &format!("/v1/cluster/voters/{id}"),
                None,
            )
            .await?;
        }
        Command::Cluster(ClusterCmd::Remove { id }) => {
            membership(
                &api,
                json,
                "DELETE",
                &format!("/v1/cluster/members/{id}"),
                None,
            )
            .await?;
        }
        Command::Cluster(ClusterCmd::Snapshot) => {
            let v = api.call("POST", "/v1/cluster/snapshot", None).await?;
            if json {
                print_json(&v);
            } else {
                println!("snapshot triggered");
            }
        }
    }
    Ok(())
}

/// Reads `file` and verifies it as a backup (exit code 8 if it is not a good one).
fn read_backup(file: &std::path::Path) -> Result<Vec<u8>, Failure> {
    let bytes =
        std::fs::read(file).map_err(|e| fail(2, format!("reading {}: {e}", file.display())))?;
    backup::decode(&bytes).map_err(|e| fail(8, format!("{}: {e}", file.display())))?;
    Ok(bytes)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<(), Failure> {
    use std::io::Write;
    let tmp = path.with_extension("partial");
    let res = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail(1, format!("writing {}: {e}", path.display()))
    })
}

fn print_header(h: &backup::Header) {
    let voters: Vec<String> = h
        .membership
        .membership()
        .voter_ids()
        .map(|id| id.to_string())
        .collect();
    println!("format:       {} version {}", h.format, h.version);
    println!(
        "created:      {} by node {} (leader {})",
        ms(h.created_at_ms),
        h.served_by,
        opt(h.leader)
    );
    println!(
        "covers:       log {} (state version {})",
        h.last_applied.map_or_else(|| "-".into(), |l| l.to_string()),
        h.state_version
    );
    println!("membership:   voters [{}]", voters.join(", "));
    println!(
        "records:      {} upstreams, {} nodes, {} session owners, {} failovers",
        h.counts.upstreams, h.counts.nodes, h.counts.owners, h.counts.failovers
    );
    println!(
        "payload:      {} bytes, {}",
        h.payload_bytes, h.payload_sha256
    );
}

async fn membership(
    api: &Api,
    json: bool,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(), Failure> {
    let v = api.call(method, path, body).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let r: MembershipReply = serde_json::from_value(v).map_err(|e| fail(1, e.to_string()))?;
    println!("committed at log index {}", r.log_index);
    print_members(&r.members);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gatectl: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("gatectl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
