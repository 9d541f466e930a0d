//! HTML building blocks of the console: escaping, the page frame, tables.

use std::fmt::Write;

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a URL query value.
pub fn url(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The page frame: title, navigation (`active` highlighted), body.
pub fn page(title: &str, active: &str, body: &str) -> String {
    let mut nav = String::new();
    for (href, name) in [
        ("/console", "Overview"),
        ("/console/nodes", "Nodes"),
        ("/console/zones", "Zones"),
        ("/console/sessions", "Sessions"),
    ] {
        let class = if name == active {
            " class=\"active\""
        } else {
            ""
        };
        let _ = write!(nav, "<a href=\"{href}\"{class}>{name}</a>");
    }
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · GateSvr</title>\
         <link rel=\"stylesheet\" href=\"/console/static/console.css\"></head>\
         <body><header><span class=\"brand\">GateSvr</span><nav>{nav}</nav>\
         <form method=\"post\" action=\"/console/logout\"><button id=\"logout\">Log out</button></form>\
         </header><main><h1>{title}</h1>{body}</main>\
         <script src=\"/console/static/console.js\"></script></body></html>",
        title = esc(title),
    )
}

/// A table; cells are HTML already (escape text with [`esc`]).
pub fn table(id: &str, headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("<table id=\"{id}\"><thead><tr>");
    for h in headers {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr></thead><tbody>");
    if rows.is_empty() {
        let _ = write!(
            s,
            "<tr><td colspan=\"{}\" class=\"empty\">none</td></tr>",
            headers.len()
        );
    }
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{c}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

/// Milliseconds since the epoch as RFC 3339 (`-` for 0).
pub fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let d =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(d).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        assert_eq!(
            super::esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(super::url("a b/é"), "a%20b%2F%C3%A9");
    }
}
