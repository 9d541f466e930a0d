//! An SVG bar chart of every ratio check in a results file (`gate-bench --json all > f`), with
//! the goal marked on each bar.

use std::path::Path;

use anyhow::{Context, Result};

use crate::report::Report;

/// Reads JSON lines (one report per line) or a JSON array of reports.
pub fn load(path: &Path) -> Result<Vec<Report>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if text.trim_start().starts_with('[') {
        return Ok(serde_json::from_str(&text)?);
    }
    text.lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|l| serde_json::from_str(l).context("a report line"))
        .collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn svg(reports: &[Report]) -> String {
    let rows: Vec<(String, f64, Option<f64>, bool)> = reports
        .iter()
        .flat_map(|r| {
            r.checks.iter().filter_map(move |c| {
                let ratio = c.ratio?;
                let goal = c
                    .goal
                    .trim_start_matches(['<', '>', '=', ' '])
                    .trim_end_matches('x')
                    .parse::<f64>()
                    .ok()
                    .filter(|g| *g > 0.0);
                Some((format!("{}: {}", r.scenario, c.name), ratio, goal, c.met))
            })
        })
        .collect();
    let max = rows
        .iter()
        .map(|(_, r, g, _)| r.max(g.unwrap_or(0.0)))
        .fold(2.0f64, f64::max)
        .min(20.0);
    let (label_w, bar_w, row_h) = (360.0, 420.0, 22.0);
    let h = 40.0 + row_h * rows.len() as f64 + 30.0;
    let w = label_w + bar_w + 90.0;
    let x = |v: f64| label_w + bar_w * (v.min(max) / max);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"10\" y=\"20\" font-size=\"14\">gate-bench: measured / baseline (same run, median of rounds); | = goal</text>\n"
    );
    for (i, (name, ratio, goal, met)) in rows.iter().enumerate() {
        let y = 36.0 + row_h * i as f64;
        let color = if *met { "#4a9d5b" } else { "#c8553d" };
        s += &format!(
            "<text x=\"10\" y=\"{:.1}\">{}</text>\n<rect x=\"{label_w}\" y=\"{:.1}\" width=\"{:.1}\" height=\"14\" fill=\"{color}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{:.2}x</text>\n",
            y + 11.0,
            esc(name),
            y,
            x(*ratio) - label_w,
            x(*ratio) + 4.0,
            y + 11.0,
            ratio
        );
        if let Some(g) = goal {
            s += &format!(
                "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1:.1}\" y2=\"{2:.1}\" stroke=\"black\" stroke-width=\"2\"/>\n",
                x(*g),
                y - 2.0,
                y + 16.0
            );
        }
    }
    let y = 36.0 + row_h * rows.len() as f64 + 10.0;
    s += &format!(
        "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"30\" y2=\"{y:.1}\" stroke=\"#888\" stroke-dasharray=\"3,3\"/>\n<text x=\"{0:.1}\" y=\"{1:.1}\">1x</text>\n</svg>\n",
        x(1.0),
        y + 14.0
    );
    s
}
