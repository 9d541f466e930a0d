//! Everything one data-plane node shares between its connections and APIs.

use std::num::NonZeroU32;
use std::time::Duration;

use gatesvr_proto::client::ErrorCode;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::auth::Verifier;
use crate::config::DataPlaneConfig;
use crate::handler::Handler;
use crate::metrics::{Metrics, code_label};
use crate::registry::Registry;

pub struct Node {
    pub config: DataPlaneConfig,
    pub registry: Registry,
    pub metrics: Metrics,
    pub verifier: Verifier,
    pub handler: Handler,
    /// Counter snapshots behind `/performance`.
    pub sampler: crate::perf::Sampler,
    /// How busy the runtime is; whether pushes share writes now.
    pub load: crate::load::Load,
    /// Membership, view and claims; None for a standalone node.
    pub cluster: Option<std::sync::Arc<crate::cluster::Cluster>>,
    /// Channels to other data-plane nodes.
    pub peers: crate::peer::Peers,
    /// Set once the node drains: new sessions are refused.
    pub draining: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Openids started while the control plane was unreachable, to claim later.
    pub provisional: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// Durable pushes of other nodes' sessions held here (standby role).
    pub replicas: crate::replica::ReplicaStore,
    /// Which of our sessions have durable pushes on which standby.
    pub replicator: crate::replica::Replicator,
    /// Set by `DataPlane::crash` and `Node::set_crashed` (the `test-hooks`
    /// feature): the node answers nothing any more.
    #[cfg(feature = "test-hooks")]
    crashed: std::sync::atomic::AtomicBool,
    /// `overload_protection.max_qps` per `qps_window_seconds`; None when disabled.
    rate: Option<DefaultDirectRateLimiter>,
    /// Starts per source address and per openid (`overload_protection.start_*`).
    pub start_limit: crate::start_limit::StartLimiter,
}

impl Node {
    /// True once a test crashed this node (`test-hooks` feature; always
    /// false in a production build): its services answer UNAVAILABLE.
    pub fn crashed(&self) -> bool {
        #[cfg(feature = "test-hooks")]
        return self.crashed.load(std::sync::atomic::Ordering::SeqCst);
        #[cfg(not(feature = "test-hooks"))]
        false
    }

    /// Test hook: the node stops (or resumes) answering its peers and the
    /// push API, as a crashed (or revived) process would look to them.
    #[cfg(feature = "test-hooks")]
    pub fn set_crashed(&self, crashed: bool) {
        self.crashed
            .store(crashed, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn new(
        config: DataPlaneConfig,
        verifier: Verifier,
        handler: Handler,
        metrics: Metrics,
        cluster: Option<std::sync::Arc<crate::cluster::Cluster>>,
        peers: crate::peer::Peers,
    ) -> Self {
        let o = &config.overload_protection;
        let rate = o.enabled.then(|| {
            // Validated: max_qps >= 1 and window >= 1 s.
            let burst = NonZeroU32::new(o.max_qps.min(u64::from(u32::MAX)) as u32)
                .unwrap_or(NonZeroU32::MIN);
            let period = Duration::from_secs(o.qps_window_seconds) / burst.get();
            let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
                .unwrap_or_else(|| Quota::per_second(burst))
                .allow_burst(burst);
            RateLimiter::direct(quota)
        });
        let registry = Registry::with_node_id(
            &config.node_id,
            config.server.session_config(),
            config.zones.count,
            metrics.clone(),
        );
        let replicas = crate::replica::ReplicaStore::new(
            config.server.session_timeout,
            config.server.max_queue,
        );
        let load = crate::load::Load::new(
            config.server.push_coalesce,
            config.server.push_coalesce_busy,
        );
        Self {
            start_limit: crate::start_limit::StartLimiter::new(&config.overload_protection),
            replicas,
            replicator: Default::default(),
            #[cfg(feature = "test-hooks")]
            crashed: Default::default(),
            config,
            registry,
            metrics,
            verifier,
            handler,
            sampler: crate::perf::Sampler::default(),
            load,
            cluster,
            peers,
            draining: Default::default(),
            provisional: Default::default(),
            rate,
        }
    }

    /// Admits one request under the node's rate limit, or says when to retry.
    pub fn admit_request(&self) -> Result<(), Duration> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        rate.check().map_err(|not_until| {
            not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ))
        })
    }

    pub fn count_request(&self, zone: &str, code: ErrorCode) {
        let outcome = if code == ErrorCode::Ok {
            "ok".to_string()
        } else {
            code_label(code)
        };
        self.metrics
            .requests
            .with_label_values(&[zone, &outcome])
            .inc();
    }
}
