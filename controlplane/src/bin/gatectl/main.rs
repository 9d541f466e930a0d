//! `gatectl`: the operator CLI over the control plane's admin HTTP(S) API.
//!
//! Human-readable tables by default, `--output json` for scripts (the API's JSON verbatim).
//! Exit codes are the same in every output format. Each command is one small function in a
//! module by subject: `registry` (zones, upstreams), `nodes`, `sessions`, `cluster`
//! (raft, backups, tokens); `client` talks to the API (endpoints tried in turn, TLS);
//! `out` prints.

mod client;
mod cluster;
mod nodes;
mod out;
mod registry;
mod sessions;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use client::{Api, TlsOptions};
use out::{Failure, fail};

const EXIT_HELP: &str = "\
Exit codes (the same with --output json and table):
  0   success
  1   unexpected error (bad response, internal error on the server)
  2   usage error
  3   not found
  4   refused: conflict, fencing, failed precondition, invalid argument
  5   unavailable: no leader / no quorum / not the leader (retry later)
  6   unauthorized or forbidden (token missing, wrong, or read-only)
  7   cannot reach the admin API (every endpoint tried)
  8   bad backup file (truncated, checksum mismatch, unsupported version, not a backup)
";

#[derive(Debug, Parser)]
#[command(name = "gatectl", version, about = "Operate a GateSvr control plane", after_help = EXIT_HELP)]
struct Cli {
    /// Admin API base URLs, comma-separated or repeated; tried in turn until one answers
    /// (like etcdctl).
    #[arg(
        long = "endpoints",
        visible_alias = "endpoint",
        global = true,
        env = "GATECTL_ENDPOINT",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8095"
    )]
    endpoints: Vec<String>,
    /// CA certificate (PEM) that signed the admin API's certificate (https endpoints).
    #[arg(long, global = true, env = "GATECTL_CACERT")]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM) when the admin API requires one.
    #[arg(long, global = true, env = "GATECTL_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(long, global = true, env = "GATECTL_KEY", requires = "cert")]
    key: Option<PathBuf>,
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

/// `--watch` for list commands.
#[derive(Debug, Clone, clap::Args)]
struct WatchArgs {
    /// Keep polling and print the list again whenever it changes (Ctrl-C to stop).
    #[arg(long, short)]
    watch: bool,
    /// Poll interval with --watch.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Stop after printing this many versions (with --watch).
    #[arg(long)]
    count: Option<u32>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Zones and their upstreams.
    #[command(subcommand)]
    Zones(registry::ZonesCmd),
    /// Upstream registrations, and their health as each data plane sees it.
    #[command(subcommand)]
    Upstreams(registry::UpstreamsCmd),
    /// Data-plane nodes: list, drain, cordon, remove.
    #[command(subcommand)]
    Nodes(nodes::NodesCmd),
    /// Sessions: list, look up, disconnect.
    #[command(subcommand)]
    Sessions(sessions::SessionsCmd),
    /// The control-plane raft cluster.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Backups of the replicated state (disaster recovery).
    #[command(subcommand)]
    Snapshot(cluster::SnapshotCmd),
    /// Client tokens.
    #[command(subcommand)]
    Token(cluster::TokenCmd),
    /// Print a shell completion script (e.g. `gatectl completion bash > /etc/bash_completion.d/gatectl`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// What every command gets: the API (built on first use) and the output format.
pub struct Ctx {
    json: bool,
    endpoints: Vec<String>,
    tls: TlsOptions,
    token: Option<String>,
    consistency: Option<&'static str>,
}

impl Ctx {
    /// The admin API client (fails with exit 2 on bad endpoint or TLS options).
    fn api(&self) -> Result<Api, Failure> {
        Api::new(
            &self.endpoints,
            self.token.clone(),
            &self.tls,
            self.consistency,
        )
    }
}

fn read_token(cli: &Cli) -> Result<Option<String>, Failure> {
    match (&cli.token, &cli.token_file) {
        (Some(t), _) => Ok(Some(t.trim().to_string())),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| fail(2, format!("reading {}: {e}", f.display()))),
        (None, None) => Ok(None),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let ctx = Ctx {
        json: cli.output == Output::Json,
        endpoints: cli.endpoints.clone(),
        tls: TlsOptions {
            cacert: cli.cacert.clone(),
            cert: cli.cert.clone(),
            key: cli.key.clone(),
        },
        token: read_token(&cli)?,
        consistency: cli.consistency.map(|c| match c {
            ConsistencyArg::Linearizable => "linearizable",
            ConsistencyArg::Local => "local",
        }),
    };
    match cli.command {
        Command::Zones(c) => registry::zones(&ctx, c).await,
        Command::Upstreams(c) => registry::upstreams(&ctx, c).await,
        Command::Nodes(c) => nodes::run(&ctx, c).await,
        Command::Sessions(c) => sessions::run(&ctx, c).await,
        Command::Cluster(c) => cluster::run(&ctx, c).await,
        Command::Snapshot(c) => cluster::snapshot(&ctx, c).await,
        Command::Token(c) => cluster::token(c),
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "gatectl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

/// Prints `fetch`'s answer with `show`, and with `--watch` again whenever it changes (its
/// `meta` aside); in JSON, one compact document per line.
async fn list<F, Fut>(
    ctx: &Ctx,
    args: &WatchArgs,
    mut fetch: F,
    show: impl Fn(&serde_json::Value) -> Result<(), Failure>,
) -> Result<(), Failure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<serde_json::Value, Failure>>,
{
    if !args.watch {
        let v = fetch().await?;
        return if ctx.json {
            out::print_json(&v);
            Ok(())
        } else {
            show(&v)
        };
    }
    let mut last: Option<serde_json::Value> = None;
    let mut printed = 0u32;
    loop {
        let v = fetch().await?;
        let mut seen = v.clone();
        if let Some(o) = seen.as_object_mut() {
            o.remove("meta");
        }
        if last.as_ref() != Some(&seen) {
            if ctx.json {
                println!("{}", serde_json::to_string(&v).unwrap_or_default());
            } else {
                println!(
                    "--- {}",
                    humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                );
                show(&v)?;
            }
            last = Some(seen);
            printed += 1;
            if args.count.is_some_and(|c| printed >= c) {
                return Ok(());
            }
        }
        tokio::time::sleep(args.interval).await;
    }
}

/// Decodes an API answer already fetched as JSON.
fn decode<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, Failure> {
    serde_json::from_value(v.clone()).map_err(|e| fail(1, format!("unexpected answer: {e}")))
}

/// Prints a write's answer: the JSON, or `message` as a line.
fn done(ctx: &Ctx, v: &serde_json::Value, message: &str) {
    if ctx.json {
        out::print_json(v);
    } else {
        println!("{message}");
    }
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
