//! The signal that stops a process: Ctrl-C or SIGTERM (Kubernetes' stop signal).
//!
//! Register with [`Signals::install`] first thing: as PID 1 in a container
//! a process ignores SIGTERM until it installs a handler, so a pod stopped
//! while still starting would otherwise wait out its whole grace period.

/// Installed SIGINT / SIGTERM listeners.
pub struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Registers the handlers now. Needs a tokio runtime.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Resolves on the first SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = next(&mut self.int) => tracing::info!("received interrupt, shutting down"),
                () = next(&mut self.term) => tracing::info!("received SIGTERM, shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM (installs the handlers when first polled).
pub async fn signal() {
    Signals::install().recv().await;
}
