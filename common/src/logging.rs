//! Logging: `tracing` with a human (default) or JSON format, to stderr or to a
//! file rotated by size (the Go gateway's defaults: `gatesvr.log`, 3 MB, 5 files).
//!
//! `RUST_LOG`, when set, overrides the configured level filter.

use std::path::PathBuf;

use serde::Deserialize;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// `log:` section of every config file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Filter directive, e.g. `info` or `info,gatesvr_dataplane=debug`.
    pub level: String,
    pub format: LogFormat,
    /// Write to this file instead of stderr.
    pub file: Option<PathBuf>,
    /// Rotate the file when it reaches this many megabytes.
    pub max_size_mb: u64,
    /// Keep this many rotated files.
    pub max_files: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info,openraft=warn,sled=warn".into(),
            format: LogFormat::Human,
            file: None,
            max_size_mb: 3,
            max_files: 5,
        }
    }
}

impl crate::config::Validate for LogConfig {
    fn validate(&self) -> Result<(), crate::config::ConfigError> {
        EnvFilter::try_new(&self.level)
            .map_err(|e| crate::config::ConfigError::key("log.level", e.to_string()))?;
        if self.max_size_mb == 0 {
            return Err(crate::config::ConfigError::key(
                "log.max_size_mb",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Keeps the background log writer alive; drop it last (flushes on drop).
pub struct LogGuard {
    _worker: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Installs the global subscriber. Call once, early in `main`.
pub fn init(config: &LogConfig) -> Result<LogGuard, String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directive) if !directive.is_empty() => EnvFilter::try_new(directive),
        _ => EnvFilter::try_new(&config.level),
    }
    .map_err(|e| format!("invalid log filter: {e}"))?;

    let (writer, guard) = match &config.file {
        Some(path) => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("log directory {}: {e}", parent.display()))?;
            }
            let rotating = file_rotate::FileRotate::new(
                path,
                file_rotate::suffix::AppendCount::new(config.max_files),
                file_rotate::ContentLimit::Bytes(config.max_size_mb as usize * 1024 * 1024),
                file_rotate::compression::Compression::None,
                None,
            );
            let (nb, guard) = tracing_appender::non_blocking(rotating);
            (BoxMakeWriter::new(nb), Some(guard))
        }
        None => (BoxMakeWriter::new(std::io::stderr), None),
    };

    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(
            config.file.is_none()
                && config.format == LogFormat::Human
                && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        );
    let result = match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("logging already initialised: {e}"))?;
    Ok(LogGuard { _worker: guard })
}
