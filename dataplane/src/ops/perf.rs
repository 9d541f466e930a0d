//! `GET /performance`: request and push rates over recent windows and latency
//! quantiles, computed from the node's own Prometheus metrics by a sampler
//! that snapshots the counters once a second.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::core::Collector;

use crate::metrics::Metrics;

/// Samples kept: a little over the longest window.
const KEEP: usize = 62;

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    requests: f64,
    pushes_sent: f64,
    pushes_queued: f64,
}

/// A ring of counter snapshots.
#[derive(Default)]
pub struct Sampler {
    samples: Mutex<VecDeque<Sample>>,
}

fn counter_total(c: &prometheus::IntCounterVec) -> f64 {
    c.collect()
        .iter()
        .flat_map(|mf| mf.get_metric())
        .map(|m| m.get_counter().get_value())
        .sum()
}

fn counter_with(c: &prometheus::IntCounterVec, label_value: &str) -> f64 {
    c.collect()
        .iter()
        .flat_map(|mf| mf.get_metric())
        .filter(|m| m.get_label().iter().any(|l| l.value() == label_value))
        .map(|m| m.get_counter().get_value())
        .sum()
}

impl Sampler {
    pub fn sample(&self, metrics: &Metrics) {
        let s = Sample {
            at: Instant::now(),
            requests: counter_total(&metrics.requests),
            pushes_sent: counter_with(&metrics.pushes, "sent"),
            pushes_queued: counter_with(&metrics.pushes, "queued"),
        };
        let mut samples = self.samples.lock();
        samples.push_back(s);
        while samples.len() > KEEP {
            samples.pop_front();
        }
    }

    /// Per-second rates over the last `window` (None until enough samples).
    fn rates(&self, window: Duration) -> Option<serde_json::Value> {
        let samples = self.samples.lock();
        let last = *samples.back()?;
        let first = samples
            .iter()
            .find(|s| last.at.duration_since(s.at) <= window)
            .copied()?;
        let secs = last.at.duration_since(first.at).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        Some(serde_json::json!({
            "seconds": secs,
            "requests_per_second": (last.requests - first.requests) / secs,
            "pushes_sent_per_second": (last.pushes_sent - first.pushes_sent) / secs,
            "pushes_queued_per_second": (last.pushes_queued - first.pushes_queued) / secs,
        }))
    }

    pub fn report(&self, metrics: &Metrics) -> serde_json::Value {
        serde_json::json!({
            "rates_10s": self.rates(Duration::from_secs(10)),
            "rates_60s": self.rates(Duration::from_secs(60)),
            "request_latency_seconds": quantiles(&metrics.request_duration.collect()),
        })
    }
}

/// p50/p90/p99/p999 over every series of a histogram (since start),
/// interpolated linearly inside buckets.
fn quantiles(families: &[prometheus::proto::MetricFamily]) -> serde_json::Value {
    let mut bounds: Vec<(f64, u64)> = Vec::new();
    let mut count = 0u64;
    for m in families.iter().flat_map(|f| f.get_metric()) {
        let h = m.get_histogram();
        count += h.get_sample_count();
        for (i, b) in h.get_bucket().iter().enumerate() {
            if bounds.len() <= i {
                bounds.push((b.upper_bound(), 0));
            }
            bounds[i].1 += b.cumulative_count();
        }
    }
    if count == 0 {
        return serde_json::json!({ "count": 0 });
    }
    let q = |p: f64| -> f64 {
        let rank = p * count as f64;
        let mut lower = (0.0, 0u64);
        for &(upper, cum) in &bounds {
            if cum as f64 >= rank {
                let span = (cum - lower.1) as f64;
                let frac = if span > 0.0 {
                    (rank - lower.1 as f64) / span
                } else {
                    1.0
                };
                return lower.0 + (upper - lower.0) * frac;
            }
            lower = (upper, cum);
        }
        // Beyond the last finite bucket: report its bound.
        lower.0
    };
    serde_json::json!({
        "count": count,
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "p999": q(0.999),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let metrics = Metrics::new();
        let h = metrics.request_duration.with_label_values(&["001"]);
        for _ in 0..100 {
            h.observe(0.0007); // bucket (0.0005, 0.001]
        }
        let q = quantiles(&metrics.request_duration.collect());
        assert_eq!(q["count"], 100);
        let p50 = q["p50"].as_f64().unwrap();
        assert!(p50 > 0.0005 && p50 <= 0.001, "{p50}");
    }

    #[test]
    fn rates_need_two_samples() {
        let metrics = Metrics::new();
        let s = Sampler::default();
        s.sample(&metrics);
        assert!(s.rates(Duration::from_secs(10)).is_none());
    }
}
