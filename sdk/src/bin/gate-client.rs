//! `gate-client`: a diagnostic client on top of the SDK.
//!
//! Connects as an openid, sends requests, prints every response and push as
//! one JSON line on stdout (pushes are acked as they are printed), and exits
//! non-zero with a message on stderr when something fails.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use clap::Parser;
use gatesvr_sdk::{Client, ClientConfig, Event, RequestError};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "gate-client",
    version,
    about = "Diagnostic GateSvr client: requests and pushes as JSON lines"
)]
struct Args {
    /// Gateway QUIC address.
    #[arg(long, default_value = "127.0.0.1:8453", env = "GATE_CLIENT_ADDR")]
    addr: SocketAddr,
    /// Name checked against the gateway's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// CA certificate (PEM) that signed the gateway's certificate.
    #[arg(long, default_value = "certs/dev/ca.crt", env = "GATE_CLIENT_CA")]
    ca: PathBuf,
    /// The user to connect as.
    #[arg(long)]
    openid: String,
    /// Auth token (e.g. from `gatectl token issue`). Empty works with `auth.mode: none`.
    #[arg(long, default_value = "", env = "GATE_CLIENT_TOKEN")]
    token: String,
    /// Mint an HMAC token locally from this secret file instead of --token.
    #[arg(long, conflicts_with = "token")]
    token_secret_file: Option<PathBuf>,
    /// Send this payload as a request (repeatable, in order).
    #[arg(long = "send")]
    send: Vec<String>,
    /// Application msg_id of the requests.
    #[arg(long, default_value_t = 1)]
    msg_id: u32,
    /// After the requests, keep printing pushes for this long (e.g. 5s).
    #[arg(long, value_parser = humantime::parse_duration)]
    listen: Option<Duration>,
    /// Per-request timeout.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    timeout: Duration,
}

fn print(value: serde_json::Value) {
    println!("{value}");
}

fn text_or_b64(bytes: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => json!(s),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(bytes) }),
    }
}

fn print_event(event: &Event) {
    match event {
        Event::Push(p) => print(json!({
            "type": "push", "seq_id": p.seq_id, "msg_type": p.msg_type, "content": p.content,
            "data": text_or_b64(&p.data), "created_at_ms": p.created_at_ms, "redelivery": p.redelivery,
        })),
        Event::Connected {
            session_id,
            node_id,
            zone,
            status,
        } => print(json!({
            "type": "connected", "session_id": session_id, "node_id": node_id, "zone": zone,
            "status": status.as_str_name(),
        })),
        Event::ResumeFailed {
            status,
            last_acked_seq_id,
            first_available_seq_id,
        } => print(json!({
            "type": "resume_failed", "status": status.as_str_name(),
            "last_acked_seq_id": last_acked_seq_id, "first_available_seq_id": first_available_seq_id,
        })),
        Event::Disconnected { code, reason } => print(json!({
            "type": "disconnected", "code": code.map(|c| c.as_str_name()), "reason": reason,
        })),
        Event::GoAway {
            reconnect_delay_ms,
            target_addr,
        } => print(json!({
            "type": "goaway", "reconnect_delay_ms": reconnect_delay_ms, "target_addr": target_addr,
        })),
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("gate-client: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let token = match &args.token_secret_file {
        Some(path) => {
            let secret =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            gatesvr_common::token::issue(
                secret.trim_ascii(),
                &args.openid,
                Duration::from_secs(3600),
            )
        }
        None => args.token.clone(),
    };
    let config = ClientConfig::new(args.addr, args.openid.clone(), token)
        .with_ca_file(&args.ca)
        .with_server_name(args.server_name.clone())
        .with_request_timeout(args.timeout);
    let client = Client::connect(config).await.context("connect")?;
    // The Connected event comes first.
    if let Some(event) = client.next_event().await {
        print_event(&event);
    }
    let mut failed = 0;
    for payload in &args.send {
        match client
            .request(args.msg_id, payload.clone().into_bytes())
            .await
        {
            Ok(r) => print(json!({
                "type": "response", "msg_id": r.msg_id, "seq_id": r.seq_id, "zone": r.zone,
                "app_code": r.app_code, "message": r.message, "payload": text_or_b64(&r.payload),
            })),
            Err(e) => {
                failed += 1;
                let (code, retry) = match &e {
                    RequestError::Gateway {
                        code,
                        retry_after_ms,
                        ..
                    } => (Some(code.as_str_name()), *retry_after_ms),
                    _ => (None, 0),
                };
                print(
                    json!({"type": "error", "code": code, "retry_after_ms": retry, "message": e.to_string()}),
                );
            }
        }
    }
    if let Some(listen) = args.listen {
        let deadline = tokio::time::Instant::now() + listen;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, client.next_event()).await {
            print_event(&event);
        }
    }
    if let Some(err) = client.closed() {
        bail!("client closed: {err}");
    }
    client.stop().await;
    if failed > 0 {
        bail!("{failed} request(s) failed");
    }
    Ok(())
}
