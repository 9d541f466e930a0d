//! `gate-upstream`: parses flags, binds, runs [`gate_upstream::run`] until
//! Ctrl-C or SIGTERM.

use anyhow::Context;
use clap::Parser;

/// GateSvr demo upstream: echo and a tiny chat room, for one zone.
#[derive(Debug, Parser)]
#[command(name = "gate-upstream", version, about)]
struct Cli {
    #[command(flatten)]
    config: gate_upstream::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    gatesvr_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.config.addr)
        .await
        .with_context(|| format!("binding {}", cli.config.addr))?;
    gate_upstream::run(cli.config, listener, shutdown_signal()).await?;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(err) => {
                    tracing::warn!(%err, "cannot listen for SIGTERM; Ctrl-C only");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
