//! Prometheus metrics of upstream forwarding.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use super::balancer::InstanceState;

/// Request latency buckets, seconds: 0.5ms (same-host upstream) to 10s
/// (near the default 30s deadline, beyond which only the timeout count matters).
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Label used for zones the router does not know, so a bad zone id cannot
/// grow the label set.
pub(crate) const UNKNOWN_ZONE_LABEL: &str = "unknown";

#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    /// `gatesvr_upstream_requests_total{zone,outcome}`.
    pub requests: IntCounterVec,
    /// `gatesvr_upstream_request_duration_seconds{zone}`: requests that were sent.
    pub duration: HistogramVec,
    /// `gatesvr_upstream_instances{zone,state}`.
    pub instances: IntGaugeVec,
    /// `gatesvr_upstream_inflight`.
    pub inflight: IntGauge,
    /// `gatesvr_upstream_panic_routed_total{zone}`: requests sent while no
    /// instance of the zone was available (every one unhealthy or ejected).
    pub panic_routed: IntCounterVec,
    /// `gatesvr_upstream_retried_total{zone}`: requests sent to another
    /// instance after one refused them unexecuted (connection refused,
    /// `UNAVAILABLE`).
    pub retried: IntCounterVec,
    /// `gatesvr_upstream_stream_requests_outstanding`: requests sent on
    /// upstream streams and not yet answered (bounded by the windows).
    pub stream_outstanding: IntGauge,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "gatesvr_upstream_requests_total",
                "Requests forwarded to upstreams, by outcome.",
            ),
            &["zone", "outcome"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "gatesvr_upstream_request_duration_seconds",
                "Time from sending a request to an upstream to its answer or failure.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["zone"],
        )?;
        let instances = IntGaugeVec::new(
            Opts::new(
                "gatesvr_upstream_instances",
                "Upstream instances per zone, by state.",
            ),
            &["zone", "state"],
        )?;
        let inflight = IntGauge::new(
            "gatesvr_upstream_inflight",
            "Upstream requests in flight on this node.",
        )?;
        let panic_routed = IntCounterVec::new(
            Opts::new(
                "gatesvr_upstream_panic_routed_total",
                "Requests routed to any instance because none of the zone was available.",
            ),
            &["zone"],
        )?;
        let retried = IntCounterVec::new(
            Opts::new(
                "gatesvr_upstream_retried_total",
                "Requests sent to another instance after one refused them unexecuted.",
            ),
            &["zone"],
        )?;
        let stream_outstanding = IntGauge::new(
            "gatesvr_upstream_stream_requests_outstanding",
            "Requests sent on upstream streams and not yet answered.",
        )?;
        registry.register(Box::new(stream_outstanding.clone()))?;
        registry.register(Box::new(retried.clone()))?;
        registry.register(Box::new(panic_routed.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(instances.clone()))?;
        registry.register(Box::new(inflight.clone()))?;
        Ok(Self {
            requests,
            duration,
            instances,
            inflight,
            panic_routed,
            retried,
            stream_outstanding,
        })
    }

    pub fn set_instances(&self, zone: &str, state: InstanceState, n: usize) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.instances
            .with_label_values(&[zone, state.as_str()])
            .set(n);
    }

    pub fn forget_zone(&self, zone: &str) {
        for state in InstanceState::ALL {
            // Absent labels are fine: the zone may never have been reported.
            let _ = self.instances.remove_label_values(&[zone, state.as_str()]);
        }
    }
}
