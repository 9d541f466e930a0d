//! gatectl's output: failures with exit codes, tables, JSON, time formatting.

use std::time::Duration;

use serde_json::Value;

/// A failure with its exit code (the same in every output format).
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

pub fn fail(code: u8, message: impl Into<String>) -> Failure {
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

/// Prints rows as an aligned table.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) {
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

/// Pretty JSON on stdout.
pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Milliseconds since the epoch as RFC 3339 (`-` for 0).
pub fn ms(t: i64) -> String {
    if t == 0 {
        return "-".into();
    }
    let d = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(t).unwrap_or(0));
    humantime::format_rfc3339_seconds(d).to_string()
}

pub fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}
