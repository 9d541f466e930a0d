//! What a scenario produces: named fields, goal checks (a ratio against the baseline measured
//! in the same run, or an absolute bound), printed as a table or JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    /// What is compared, e.g. "p50 vs quinn+tonic".
    pub name: String,
    /// Measured value of the system under test (median of rounds).
    pub value: f64,
    /// Baseline value (median of rounds), if this is a ratio check.
    pub baseline: Option<f64>,
    /// value / baseline.
    pub ratio: Option<f64>,
    /// The promise, e.g. "<= 1.1x" or ">= 20000/s".
    pub goal: String,
    pub met: bool,
}

impl Check {
    /// A ratio goal: `ratio <= max` (lower is better) or `ratio >= min`.
    pub fn ratio(name: &str, value: f64, baseline: f64, cmp: Cmp, bound: f64) -> Self {
        let ratio = if baseline > 0.0 {
            value / baseline
        } else {
            f64::NAN
        };
        Self {
            name: name.into(),
            value,
            baseline: Some(baseline),
            ratio: Some(ratio),
            goal: format!("{} {bound}x", cmp.sign()),
            met: cmp.holds(ratio, bound),
        }
    }

    /// An absolute goal on `value`.
    pub fn absolute(name: &str, value: f64, cmp: Cmp, bound: f64, unit: &str) -> Self {
        Self {
            name: name.into(),
            value,
            baseline: None,
            ratio: None,
            goal: format!("{} {bound} {unit}", cmp.sign()),
            met: cmp.holds(value, bound),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Cmp {
    AtMost,
    AtLeast,
}

impl Cmp {
    fn sign(self) -> &'static str {
        match self {
            Cmp::AtMost => "<=",
            Cmp::AtLeast => ">=",
        }
    }
    fn holds(self, v: f64, bound: f64) -> bool {
        match self {
            Cmp::AtMost => v <= bound,
            Cmp::AtLeast => v >= bound,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Report {
    pub scenario: String,
    /// Sizes and settings of this run.
    pub params: BTreeMap<String, serde_json::Value>,
    /// Medians over rounds (units in the name: _us, _per_s, _bytes, ...).
    pub fields: BTreeMap<String, f64>,
    pub checks: Vec<Check>,
    /// Every round's raw values, for the record.
    pub rounds: Vec<BTreeMap<String, f64>>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str) -> Self {
        Self {
            scenario: scenario.into(),
            ..Self::default()
        }
    }

    pub fn param(&mut self, k: &str, v: impl Into<serde_json::Value>) {
        self.params.insert(k.into(), v.into());
    }

    pub fn field(&mut self, k: &str, v: f64) {
        self.fields.insert(k.into(), v);
    }

    /// Median of `key` over the rounds (also stored as a field).
    pub fn median_field(&mut self, key: &str) -> f64 {
        let vals: Vec<f64> = self
            .rounds
            .iter()
            .filter_map(|r| r.get(key))
            .copied()
            .collect();
        let m = crate::util::median(&vals);
        self.fields.insert(key.into(), m);
        m
    }

    /// Stores the median of every key seen in the rounds.
    pub fn median_all(&mut self) {
        let keys: Vec<String> = self
            .rounds
            .iter()
            .flat_map(|r| r.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for k in keys {
            self.median_field(&k);
        }
    }

    pub fn print_table(&self) {
        println!("== {} ==", self.scenario);
        if !self.params.is_empty() {
            let p: Vec<String> = self
                .params
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("params: {}", p.join(" "));
        }
        for (k, v) in &self.fields {
            println!("  {k:<44} {}", fmt_num(*v));
        }
        if !self.checks.is_empty() {
            println!(
                "  {:<44} {:>12} {:>12} {:>8}  {:<14} met",
                "check", "value", "baseline", "ratio", "goal"
            );
            for c in &self.checks {
                println!(
                    "  {:<44} {:>12} {:>12} {:>8}  {:<14} {}",
                    c.name,
                    fmt_num(c.value),
                    c.baseline.map(fmt_num).unwrap_or_else(|| "-".into()),
                    c.ratio
                        .map(|r| format!("{r:.2}x"))
                        .unwrap_or_else(|| "-".into()),
                    c.goal,
                    if c.met { "yes" } else { "NO" }
                );
            }
        }
        for n in &self.notes {
            println!("  note: {n}");
        }
    }
}

pub fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A round's named values.
pub type Round = BTreeMap<String, f64>;
