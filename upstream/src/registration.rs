//! Keeping this instance in the control plane's registry: register with a
//! lease, heartbeat it, re-register if the lease was lost, deregister on
//! shutdown. Serving never waits for any of it: an unreachable control plane
//! only means retries.
//!
//! A failed call moves to the next control-plane address, so one dead member
//! does not cut the lease. Registering retries with exponential backoff; a
//! registered instance retries its heartbeat at least once per heartbeat
//! interval, since waiting longer than that during an election would let the
//! lease expire on the new leader once its grace (`leases.default_ttl`) ends.
//!
//! ```text
//!   ┌──────────┐ ok  ┌────────────┐ NOT_FOUND (lease lost)
//!   │ register ├────▶│ heartbeat  ├───────────┐
//!   └────▲─────┘     └─────┬──────┘           │
//!        │ error: backoff  │ every interval   │
//!        └─────────────────┴──────────────────┘
//!   shutdown ──▶ deregister (best effort, bounded)
//! ```

use std::time::Duration;

use gatesvr_proto::control::control_plane_client::ControlPlaneClient;
use gatesvr_proto::control::{
    DeregisterUpstreamRequest, HeartbeatUpstreamRequest, RegisterUpstreamRequest,
};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

/// Deadline of one control-plane call (a heartbeat's: [`heartbeat_deadline`]).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failure; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What to register.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Zone served.
    pub zone: String,
    /// Address gateways should dial.
    pub address: String,
    /// Reported service name.
    pub service_name: String,
    /// Requested lease.
    pub lease_ttl: Duration,
}

/// Registers and heartbeats through `channels` (one per control-plane
/// address, at least one) until `cancel` fires, then deregisters.
pub async fn run(channels: Vec<Channel>, registration: Registration, cancel: CancellationToken) {
    let mut endpoints = Endpoints::new(channels);
    let mut backoff = Backoff::default();
    // The instance id and heartbeat interval, once registered.
    let mut registered: Option<(String, Duration)> = None;
    loop {
        let wait = match &registered {
            None => {
                // Shutdown does not wait for a registration attempt; a lease
                // granted to an abandoned attempt simply expires.
                let attempt = tokio::select! {
                    _ = cancel.cancelled() => break,
                    attempt = register(endpoints.client(), &registration) => attempt,
                };
                match attempt {
                    Ok((id, interval)) => {
                        tracing::info!(instance_id = %id, zone = %registration.zone,
                            address = %registration.address, "registered with the control plane");
                        registered = Some((id, interval));
                        backoff.reset();
                        interval
                    }
                    Err(status) => {
                        endpoints.rotate();
                        let wait = backoff.next();
                        tracing::warn!(%status, retry_in = ?wait, "control plane registration failed");
                        wait
                    }
                }
            }
            Some((id, interval)) => match heartbeat(endpoints.client(), id, *interval).await {
                Ok(()) => {
                    backoff.reset();
                    *interval
                }
                Err(status) if status.code() == Code::NotFound => {
                    tracing::warn!(instance_id = %id, "lease lost; registering again");
                    registered = None;
                    Duration::ZERO
                }
                Err(status) => {
                    // Keep the id: the lease may still be alive, and the next
                    // heartbeat says whether it is.
                    endpoints.rotate();
                    let wait = backoff.next_heartbeat(*interval);
                    tracing::warn!(%status, retry_in = ?wait, "heartbeat failed");
                    wait
                }
            },
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    if let Some((id, _)) = registered {
        let request = DeregisterUpstreamRequest {
            instance_id: id.clone(),
        };
        let mut client = endpoints.client();
        match bounded(request, CALL_TIMEOUT, |r| client.deregister_upstream(r)).await {
            Ok(_) => tracing::info!(instance_id = %id, "deregistered from the control plane"),
            // The lease expires on its own.
            Err(status) => tracing::warn!(instance_id = %id, %status, "deregistration failed"),
        }
    }
}

/// Registers; returns the instance id and how often to heartbeat.
async fn register(
    mut client: ControlPlaneClient<Channel>,
    registration: &Registration,
) -> Result<(String, Duration), tonic::Status> {
    let request = RegisterUpstreamRequest {
        zone: registration.zone.clone(),
        address: registration.address.clone(),
        service_name: registration.service_name.clone(),
        lease_ttl_ms: u32::try_from(registration.lease_ttl.as_millis()).unwrap_or(u32::MAX),
    };
    let response = bounded(request, CALL_TIMEOUT, |r| client.register_upstream(r))
        .await?
        .into_inner();
    let granted = (response.heartbeat_interval_ms > 0)
        .then(|| Duration::from_millis(response.heartbeat_interval_ms.into()))
        .or_else(|| {
            (response.lease_ttl_ms > 0)
                .then(|| Duration::from_millis(response.lease_ttl_ms.into()) / 3)
        });
    Ok((
        response.instance_id,
        heartbeat_interval(registration, granted),
    ))
}

/// One heartbeat, given at most [`heartbeat_deadline`]: a member that does not
/// answer (partitioned, no leader) is left for the next before the lease can
/// lapse.
async fn heartbeat(
    mut client: ControlPlaneClient<Channel>,
    id: &str,
    interval: Duration,
) -> Result<(), tonic::Status> {
    let request = HeartbeatUpstreamRequest {
        instance_id: id.to_owned(),
    };
    bounded(request, heartbeat_deadline(interval), |r| {
        client.heartbeat_upstream(r)
    })
    .await
    .map(|_| ())
}

/// A heartbeat's deadline: its interval, at least 1 s (a commit on a loaded
/// control plane) and at most [`CALL_TIMEOUT`].
fn heartbeat_deadline(interval: Duration) -> Duration {
    interval.clamp(Duration::from_secs(1), CALL_TIMEOUT)
}

/// The control plane's addresses, one in use at a time.
struct Endpoints {
    channels: Vec<Channel>,
    current: usize,
}

impl Endpoints {
    fn new(channels: Vec<Channel>) -> Self {
        assert!(!channels.is_empty(), "at least one control-plane address");
        Self {
            channels,
            current: 0,
        }
    }

    /// A client of the address in use (cloning a channel shares its connection).
    fn client(&self) -> ControlPlaneClient<Channel> {
        ControlPlaneClient::new(self.channels[self.current].clone())
            .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
    }

    /// Moves to the next address after a failed call.
    fn rotate(&mut self) {
        self.current = (self.current + 1) % self.channels.len();
    }
}

/// The server's interval if it gave one, else a third of the requested lease
/// (two heartbeats may be lost before the lease expires).
fn heartbeat_interval(registration: &Registration, granted: Option<Duration>) -> Duration {
    granted
        .unwrap_or(registration.lease_ttl / 3)
        .max(Duration::from_millis(100))
}

/// Makes `call` with `message`, its request carrying `deadline`
/// (`grpc-timeout`), and enforces the deadline here too: the header only
/// informs the server, and a connect to an unreachable address can take
/// longer.
async fn bounded<M, T, F>(
    message: M,
    deadline: Duration,
    call: impl FnOnce(tonic::Request<M>) -> F,
) -> Result<T, tonic::Status>
where
    F: Future<Output = Result<T, tonic::Status>>,
{
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    tokio::time::timeout(deadline, call(request))
        .await
        .unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(
                "control plane call timed out",
            ))
        })
}

/// Exponential backoff with ±20% jitter, so a fleet of upstreams restarted
/// together does not retry in lockstep.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = MIN_BACKOFF
            .saturating_mul(1 << self.failures.min(10))
            .min(MAX_BACKOFF);
        self.failures = self.failures.saturating_add(1);
        base.mul_f64(rand::rng().random_range(0.8..1.2))
    }

    /// The wait after a failed heartbeat: the backoff, but never longer than
    /// the heartbeat interval, so the lease is retried before it can lapse.
    fn next_heartbeat(&mut self, interval: Duration) -> Duration {
        self.next().min(interval)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_heartbeat_is_retried_within_its_interval() {
        let interval = Duration::from_millis(700);
        let mut backoff = Backoff::default();
        let waits: Vec<Duration> = (0..12).map(|_| backoff.next_heartbeat(interval)).collect();
        // Backs off from ~200 ms, then holds at the interval.
        assert!(waits[0] < interval, "{waits:?}");
        assert!(waits.iter().all(|w| *w <= interval), "{waits:?}");
        assert_eq!(waits[11], interval);
        // A heartbeat gives up within its interval (bounded both ways).
        assert_eq!(heartbeat_deadline(interval), Duration::from_secs(1));
        assert_eq!(
            heartbeat_deadline(Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        assert_eq!(heartbeat_deadline(Duration::from_secs(60)), CALL_TIMEOUT);
        // Registration keeps the full backoff.
        let mut backoff = Backoff::default();
        let last = (0..12).map(|_| backoff.next()).last().unwrap();
        assert!(last > interval * 10, "{last:?}");
    }
}
