//! Active health checks, every `health_check_interval`, over the instance's
//! request channel (so a check exercises the same connection requests use).
//!
//! The probe is the contract's own `UpstreamService.GetStatus`: the instance
//! passes when it answers within `health_check_timeout` with `healthy: true`.
//! An instance that answers `UNIMPLEMENTED` (an upstream written before
//! `GetStatus` was probed, or one that only serves the standard health
//! service) is probed with `grpc.health.v1.Health/Check` (service
//! `health_check_service`) instead, and passes on `SERVING`. Documented in
//! docs/protocol.md, "Upstream contract".

use std::future::Future;
use std::sync::Arc;

use futures::future::join_all;
use gatesvr_proto::upstream::GetStatusRequest;
use gatesvr_proto::upstream::upstream_service_client::UpstreamServiceClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::{UpstreamRouter, Zone, log_transition, now};

impl UpstreamRouter {
    /// Runs active health checks until `shutdown` completes. Spawn it once
    /// per router. Returns at once if `health_check_interval` is `0s`.
    pub async fn run_health_checks(&self, shutdown: impl Future<Output = ()>) {
        if self.cfg.health_check_interval.is_zero() {
            tracing::info!("upstream health checks disabled (health_check_interval: 0s)");
            return;
        }
        let mut ticks = tokio::time::interval(self.cfg.health_check_interval);
        // A slow round delays the next one rather than bunching checks up.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = ticks.tick() => self.check_all().await,
            }
        }
    }

    /// One round: checks every instance of every zone concurrently, records
    /// the results and refreshes the instance gauges (which also reflects
    /// ejections that expired since the last round).
    pub(crate) async fn check_all(&self) {
        let zones: Vec<Arc<Zone>> = self.zones.read().values().cloned().collect();
        let checks =
            zones.iter().flat_map(|zone| {
                let targets = zone.state.lock().balancer.targets();
                targets.into_iter().map(move |(id, addr, channel)| async move {
                let passed = self.check(channel).await;
                if !passed {
                    tracing::debug!(zone = %zone.name, %addr, "upstream health check failed");
                }
                (zone, id, passed)
            })
            });
        let results = join_all(checks.collect::<Vec<_>>()).await;
        for (zone, id, passed) in results {
            let transition = zone.state.lock().balancer.record_check(id, passed);
            if let Some(transition) = transition {
                log_transition(&zone.name, &transition);
            }
        }
        let now = now();
        for zone in &zones {
            let state = zone.state.lock();
            self.report_instances(zone, &state, now);
        }
    }

    /// Whether the instance reports itself healthy within
    /// `health_check_timeout` (see the module docs for the probes).
    async fn check(&self, channel: tonic::transport::Channel) -> bool {
        let timeout = self.cfg.health_check_timeout;
        let mut request = tonic::Request::new(GetStatusRequest {});
        request.set_timeout(timeout);
        let mut client = UpstreamServiceClient::new(channel.clone());
        match tokio::time::timeout(timeout, client.get_status(request)).await {
            Ok(Ok(response)) => response.into_inner().healthy,
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                self.check_grpc_health(channel).await
            }
            Ok(Err(_)) | Err(_) => false,
        }
    }

    /// The fallback probe: `grpc.health.v1.Health/Check` answers `SERVING`.
    async fn check_grpc_health(&self, channel: tonic::transport::Channel) -> bool {
        let timeout = self.cfg.health_check_timeout;
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: self.cfg.health_check_service.clone(),
        });
        request.set_timeout(timeout);
        let mut client = HealthClient::new(channel);
        match tokio::time::timeout(timeout, client.check(request)).await {
            Ok(Ok(response)) => response.into_inner().status == ServingStatus::Serving as i32,
            Ok(Err(_)) | Err(_) => false,
        }
    }
}
