//! Sans-IO instance selection for one zone.
//!
//! [`Balancer`] picks an instance per request by least outstanding requests
//! with power-of-two-choices (two random available instances, the less busy
//! one wins: nearly as good as a full scan, and no herd on the single least
//! loaded instance), and keeps each instance's health:
//!
//! - **active**: results of `grpc.health.v1` checks, fed in by the caller;
//!   `unhealthy_threshold` failures in a row take an instance out,
//!   `healthy_threshold` passes bring it back;
//! - **passive**: outcomes of real requests; `consecutive_errors` failures in a
//!   row eject an instance for `base_ejection_time × n` (n = recent
//!   ejections, decaying by one per quiet `base_ejection_time`), capped at
//!   `max_ejection_time`, unless that would eject more than
//!   `max_ejection_percent` of the zone or its last available instance.
//!
//! No sockets, no clock, no global RNG: time comes in as `now` and randomness
//! from the caller's RNG, so the tests below are deterministic. `T` is what the
//! caller attaches to an instance (the router's tonic `Channel`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use super::config::UpstreamConfig;
use super::instance::Instance;

/// The subset of [`UpstreamConfig`] that selection depends on.
#[derive(Clone, Debug)]
pub struct BalancerConfig {
    /// Failed health checks in a row that mark an instance unhealthy.
    pub unhealthy_threshold: u32,
    /// Passed health checks in a row that mark it healthy again.
    pub healthy_threshold: u32,
    /// Failed requests in a row that eject an instance.
    pub consecutive_errors: u32,
    /// First ejection's length.
    pub base_ejection_time: Duration,
    /// Longest ejection.
    pub max_ejection_time: Duration,
    /// Most of the zone (in percent) ejected at once.
    pub max_ejection_percent: u32,
}

impl From<&UpstreamConfig> for BalancerConfig {
    fn from(cfg: &UpstreamConfig) -> Self {
        let od = &cfg.outlier_detection;
        Self {
            unhealthy_threshold: cfg.unhealthy_threshold,
            healthy_threshold: cfg.healthy_threshold,
            consecutive_errors: od.consecutive_errors,
            base_ejection_time: od.base_ejection_time,
            max_ejection_time: od.max_ejection_time,
            max_ejection_percent: od.max_ejection_percent,
        }
    }
}

/// Names one instance for the lifetime of a [`Balancer`]. Never reused, so a
/// request that finishes after its instance was removed (and perhaps re-added)
/// cannot touch the new entry's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointId(u64);

/// How a forwarded request ended, as far as the instance's health goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The instance answered (an application or client error counts too).
    Success,
    /// The instance failed: connection error, timeout, `UNAVAILABLE`,
    /// `INTERNAL`, ...
    Failure,
    /// Says nothing about the instance (cancelled by the caller, or the
    /// upstream deliberately shed load).
    Neutral,
}

/// Where an instance stands, for metrics and the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// Takes requests.
    Healthy,
    /// Failing active health checks.
    Unhealthy,
    /// Passing health checks (or unchecked) but ejected for request failures.
    Ejected,
}

impl InstanceState {
    /// Every state, for resetting gauges.
    pub const ALL: [InstanceState; 3] = [Self::Healthy, Self::Unhealthy, Self::Ejected];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Ejected => "ejected",
        }
    }
}

/// A change of an instance's availability worth logging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Health checks failed `unhealthy_threshold` times in a row.
    MarkedUnhealthy { addr: Arc<str> },
    /// Health checks passed `healthy_threshold` times in a row.
    MarkedHealthy { addr: Arc<str> },
    /// Ejected for `duration` after consecutive request failures.
    Ejected { addr: Arc<str>, duration: Duration },
}

/// The instance chosen for one request. Report its end with
/// [`Balancer::finish`], exactly once.
#[derive(Clone, Debug)]
pub struct Pick<T> {
    /// Pass back to [`Balancer::finish`].
    pub id: EndpointId,
    /// The instance's address, for errors and logs.
    pub addr: Arc<str>,
    /// The caller's value for this instance.
    pub value: T,
    /// No instance was available: chosen among all of them (panic routing).
    pub panic: bool,
}

/// Snapshot of one instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceStatus {
    /// The instance.
    pub instance: Instance,
    /// Its state now.
    pub state: InstanceState,
    /// Requests picked and not yet finished.
    pub outstanding: u32,
}

#[derive(Debug)]
struct Endpoint<T> {
    id: EndpointId,
    instance: Instance,
    addr: Arc<str>,
    value: T,
    outstanding: u32,
    /// Active health. Starts true: a new instance takes traffic at once rather
    /// than after a check interval, and passive ejection covers a bad start.
    healthy: bool,
    check_failures: u32,
    check_passes: u32,
    consecutive_errors: u32,
    ejected_until: Option<Instant>,
    /// Recent ejections; scales the next ejection's length.
    ejections: u32,
}

impl<T> Endpoint<T> {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    fn is_available(&self, now: Instant) -> bool {
        self.healthy && !self.is_ejected(now)
    }

    fn state(&self, now: Instant) -> InstanceState {
        if !self.healthy {
            InstanceState::Unhealthy
        } else if self.is_ejected(now) {
            InstanceState::Ejected
        } else {
            InstanceState::Healthy
        }
    }
}

/// Instance selection and health bookkeeping for one zone.
#[derive(Debug)]
pub struct Balancer<T> {
    cfg: BalancerConfig,
    endpoints: Vec<Endpoint<T>>,
    next_id: u64,
}

impl<T: Clone> Balancer<T> {
    /// An empty zone.
    pub fn new(cfg: BalancerConfig) -> Self {
        Self {
            cfg,
            endpoints: Vec::new(),
            next_id: 0,
        }
    }

    /// Replaces the instance set. Instances whose address is already known keep
    /// their value, health and counters (their id is refreshed); `make` is
    /// called only for new addresses. Duplicate addresses are kept once.
    pub fn set_instances(
        &mut self,
        instances: Vec<Instance>,
        mut make: impl FnMut(&Instance) -> T,
    ) {
        let mut old = std::mem::take(&mut self.endpoints);
        for instance in instances {
            if self
                .endpoints
                .iter()
                .any(|e| e.instance.addr() == instance.addr())
            {
                continue;
            }
            if let Some(pos) = old
                .iter()
                .position(|e| e.instance.addr() == instance.addr())
            {
                let mut kept = old.swap_remove(pos);
                kept.instance = instance;
                self.endpoints.push(kept);
                continue;
            }
            let id = EndpointId(self.next_id);
            self.next_id += 1;
            self.endpoints.push(Endpoint {
                id,
                addr: instance.addr().into(),
                value: make(&instance),
                instance,
                outstanding: 0,
                healthy: true,
                check_failures: 0,
                check_passes: 0,
                consecutive_errors: 0,
                ejected_until: None,
                ejections: 0,
            });
        }
    }

    /// Number of instances, available or not.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Picks the instance of the zone for one request: [`pick_excluding`]
    /// with nothing tried yet. The router always passes what it tried; this
    /// form is the tests'.
    ///
    /// [`pick_excluding`]: Self::pick_excluding
    #[cfg(test)]
    pub fn pick(&mut self, now: Instant, rng: &mut impl Rng) -> Option<Pick<T>> {
        self.pick_excluding(now, rng, &[])
    }

    /// Chooses an instance for one request and counts it as outstanding,
    /// never one in `tried` (the ones a request already failed on without
    /// being executed). `None` when the zone has no instance, or every
    /// instance was tried.
    ///
    /// When every instance is unhealthy or ejected the zone is in *panic*
    /// (Envoy's panic threshold): the request goes to any instance rather
    /// than failing outright, because a whole zone failing its checks at once
    /// is more often the checker's problem (a starved node, a slow check)
    /// than every instance's. [`Pick::panic`] says so, for a metric.
    pub fn pick_excluding(
        &mut self,
        now: Instant,
        rng: &mut impl Rng,
        tried: &[EndpointId],
    ) -> Option<Pick<T>> {
        let candidates =
            || (0..self.endpoints.len()).filter(|&i| !tried.contains(&self.endpoints[i].id));
        let mut available: Vec<usize> = candidates()
            .filter(|&i| self.endpoints[i].is_available(now))
            .collect();
        let panic = available.is_empty();
        if panic {
            available = candidates().collect();
        }
        let chosen = match available.len() {
            0 => return None,
            1 => available[0],
            n => {
                let a = rng.random_range(0..n);
                // A second, distinct candidate.
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (available[a], available[b]);
                if self.endpoints[b].outstanding < self.endpoints[a].outstanding {
                    b
                } else {
                    a
                }
            }
        };
        let endpoint = &mut self.endpoints[chosen];
        endpoint.outstanding += 1;
        Some(Pick {
            id: endpoint.id,
            addr: endpoint.addr.clone(),
            value: endpoint.value.clone(),
            panic,
        })
    }

    /// Ends a request picked with [`pick`](Self::pick). Returns the ejection it
    /// caused, if any. Unknown ids (instance since removed) are ignored.
    pub fn finish(&mut self, id: EndpointId, outcome: Outcome, now: Instant) -> Option<Transition> {
        let pos = self.endpoints.iter().position(|e| e.id == id)?;
        let endpoint = &mut self.endpoints[pos];
        endpoint.outstanding = endpoint.outstanding.saturating_sub(1);
        match outcome {
            Outcome::Neutral => None,
            Outcome::Success => {
                endpoint.consecutive_errors = 0;
                None
            }
            Outcome::Failure => {
                endpoint.consecutive_errors += 1;
                if endpoint.consecutive_errors < self.cfg.consecutive_errors
                    || endpoint.is_ejected(now)
                    || !self.may_eject(pos, now)
                {
                    // Below the threshold, or ejection not allowed now: keep
                    // counting, the next failure tries again.
                    return None;
                }
                Some(self.eject(pos, now))
            }
        }
    }

    /// Records one active health check result.
    pub fn record_check(&mut self, id: EndpointId, passed: bool) -> Option<Transition> {
        let endpoint = self.endpoints.iter_mut().find(|e| e.id == id)?;
        if passed {
            endpoint.check_failures = 0;
            endpoint.check_passes = endpoint.check_passes.saturating_add(1);
            if !endpoint.healthy && endpoint.check_passes >= self.cfg.healthy_threshold {
                endpoint.healthy = true;
                return Some(Transition::MarkedHealthy {
                    addr: endpoint.addr.clone(),
                });
            }
        } else {
            endpoint.check_passes = 0;
            endpoint.check_failures = endpoint.check_failures.saturating_add(1);
            if endpoint.healthy && endpoint.check_failures >= self.cfg.unhealthy_threshold {
                endpoint.healthy = false;
                return Some(Transition::MarkedUnhealthy {
                    addr: endpoint.addr.clone(),
                });
            }
        }
        None
    }

    /// Every instance's id, address and value, for health checks.
    pub fn targets(&self) -> Vec<(EndpointId, Arc<str>, T)> {
        self.endpoints
            .iter()
            .map(|e| (e.id, e.addr.clone(), e.value.clone()))
            .collect()
    }

    /// Every instance's state.
    pub fn statuses(&self, now: Instant) -> Vec<InstanceStatus> {
        self.endpoints
            .iter()
            .map(|e| InstanceStatus {
                instance: e.instance.clone(),
                state: e.state(now),
                outstanding: e.outstanding,
            })
            .collect()
    }

    /// Number of instances in `state`.
    pub fn count(&self, state: InstanceState, now: Instant) -> usize {
        self.endpoints
            .iter()
            .filter(|e| e.state(now) == state)
            .count()
    }

    /// Whether ejecting `pos` keeps the zone within `max_ejection_percent` and
    /// leaves at least one available instance.
    fn may_eject(&self, pos: usize, now: Instant) -> bool {
        let ejected = self.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        let available = self
            .endpoints
            .iter()
            .filter(|e| e.is_available(now))
            .count();
        let loses_one = usize::from(self.endpoints[pos].is_available(now));
        let within_percent =
            (ejected + 1) * 100 <= self.cfg.max_ejection_percent as usize * self.endpoints.len();
        within_percent && available - loses_one >= 1
    }

    fn eject(&mut self, pos: usize, now: Instant) -> Transition {
        let base = self.cfg.base_ejection_time;
        let endpoint = &mut self.endpoints[pos];
        // Forget one past ejection per quiet `base` since the last one ended.
        if let Some(ended) = endpoint.ejected_until {
            let quiet = now.saturating_duration_since(ended).as_nanos() / base.as_nanos().max(1);
            let quiet = u32::try_from(quiet).unwrap_or(u32::MAX);
            endpoint.ejections = endpoint.ejections.saturating_sub(quiet);
        }
        endpoint.ejections = endpoint.ejections.saturating_add(1);
        let duration = base
            .saturating_mul(endpoint.ejections)
            .min(self.cfg.max_ejection_time);
        endpoint.ejected_until = Some(now + duration);
        endpoint.consecutive_errors = 0;
        Transition::Ejected {
            addr: endpoint.addr.clone(),
            duration,
        }
    }
}

#[cfg(test)]
mod tests;
