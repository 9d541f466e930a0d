//! `gatectl cluster` (raft status and membership), `gatectl snapshot` (backups) and
//! `gatectl token` (client tokens, offline).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use gatesvr_controlplane::admin::model::*;
use gatesvr_controlplane::backup;
use serde_json::Value;

use crate::out::{Failure, fail, ms, opt, print_json, table};
use crate::{Ctx, decode};

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
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
    /// Promote a learner to voter (once it has caught up).
    Promote { id: u64 },
    /// Remove a member (voter or learner).
    Remove { id: u64 },
    /// Build a snapshot (and compact the log) on the answering node.
    Snapshot,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Write a consistent backup of the whole state (upstreams, nodes, session owners,
    /// failovers) to FILE (written atomically; verified before it is kept).
    Export {
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into the cluster behind --endpoints (meant for a fresh one): records
    /// the cluster already has are kept, nothing is deleted, epochs jump past both.
    Import { file: PathBuf },
    /// Verify a backup file offline and print its header.
    Inspect { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
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

pub async fn run(ctx: &Ctx, cmd: ClusterCmd) -> Result<(), Failure> {
    let api = ctx.api()?;
    match cmd {
        ClusterCmd::Status => {
            let (v, r): (Value, ClusterStatus) = api.get("/v1/cluster").await?;
            if ctx.json {
                print_json(&v);
            } else {
                print_status(&r);
            }
            Ok(())
        }
        ClusterCmd::AddLearner {
            id,
            grpc_addr,
            admin_addr,
        } => {
            let body = serde_json::to_value(AddLearner {
                id,
                grpc_addr,
                admin_addr,
            })
            .map_err(|e| fail(1, e.to_string()))?;
            let v = api.call("POST", "/v1/cluster/learners", Some(body)).await?;
            membership(ctx, &v)
        }
        ClusterCmd::Promote { id } => {
            let v = api
                .call("POST", &format!("/v1/cluster/voters/{id}"), None)
                .await?;
            membership(ctx, &v)
        }
        ClusterCmd::Remove { id } => {
            let v = api
                .call("DELETE", &format!("/v1/cluster/members/{id}"), None)
                .await?;
            membership(ctx, &v)
        }
        ClusterCmd::Snapshot => {
            let v = api.call("POST", "/v1/cluster/snapshot", None).await?;
            crate::done(ctx, &v, "snapshot triggered");
            Ok(())
        }
    }
}

fn print_status(r: &ClusterStatus) {
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

fn membership(ctx: &Ctx, v: &Value) -> Result<(), Failure> {
    if ctx.json {
        print_json(v);
        return Ok(());
    }
    let r: MembershipReply = decode(v)?;
    println!("committed at log index {}", r.log_index);
    print_members(&r.members);
    Ok(())
}

pub async fn snapshot(ctx: &Ctx, cmd: SnapshotCmd) -> Result<(), Failure> {
    match cmd {
        SnapshotCmd::Inspect { file } => {
            let b = backup::decode(&read_backup(&file)?)
                .map_err(|e| fail(8, format!("{}: {e}", file.display())))?;
            if ctx.json {
                print_json(&serde_json::to_value(&b.header).unwrap_or_default());
            } else {
                println!("{}: a valid backup", file.display());
                print_header(&b.header);
            }
            Ok(())
        }
        SnapshotCmd::Export { out } => export(ctx, &out).await,
        SnapshotCmd::Import { file } => import(ctx, &file).await,
    }
}

async fn export(ctx: &Ctx, out: &Path) -> Result<(), Failure> {
    let api = ctx.api()?;
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
    write_atomically(out, &bytes)?;
    if ctx.json {
        print_json(&serde_json::to_value(&b.header).unwrap_or_default());
    } else {
        println!("wrote {} ({} bytes)", out.display(), bytes.len());
        print_header(&b.header);
    }
    Ok(())
}

async fn import(ctx: &Ctx, file: &Path) -> Result<(), Failure> {
    let api = ctx.api()?;
    let bytes = read_backup(file)?;
    let v = api
        .call_raw(
            "POST",
            "/v1/cluster/restore",
            "application/octet-stream",
            bytes.into(),
        )
        .await?;
    let v: Value = serde_json::from_slice(&v).unwrap_or(Value::Null);
    if ctx.json {
        print_json(&v);
        return Ok(());
    }
    let r: RestoreReply = decode(&v)?;
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
    Ok(())
}

pub fn token(cmd: TokenCmd) -> Result<(), Failure> {
    let TokenCmd::Issue {
        openid,
        ttl,
        secret_file,
    } = cmd;
    let raw = std::fs::read(&secret_file)
        .map_err(|e| fail(2, format!("reading {}: {e}", secret_file.display())))?;
    let secret = raw.trim_ascii();
    if secret.is_empty() {
        return Err(fail(
            2,
            format!("{}: secret is empty", secret_file.display()),
        ));
    }
    println!("{}", gatesvr_common::token::issue(secret, &openid, ttl));
    Ok(())
}

/// Reads `file` and verifies it as a backup (exit code 8 if it is not a good one).
fn read_backup(file: &Path) -> Result<Vec<u8>, Failure> {
    let bytes =
        std::fs::read(file).map_err(|e| fail(2, format!("reading {}: {e}", file.display())))?;
    backup::decode(&bytes).map_err(|e| fail(8, format!("{}: {e}", file.display())))?;
    Ok(bytes)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
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
