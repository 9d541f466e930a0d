//! How busy the node's runtime is, and whether it is busy enough that pushes
//! should share writes (`server.push_coalesce`).
//!
//! Every [`SAMPLE`] the share of the tokio workers' time spent running tasks
//! is read from the runtime's own counters (`worker_total_busy_duration`).
//! A CPU-bound node spends part of each push's cost per datagram (a packet
//! built, encrypted and sent, an ACK received), so there fewer and fuller
//! writes buy throughput; an idle node would only add latency by waiting.
//! [`Busy`] turns the ratio into that decision with hysteresis, so a node
//! whose holding relieves it does not flap at the threshold.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often the runtime's busy time is read.
pub const SAMPLE: Duration = Duration::from_millis(100);

/// Below the threshold by this much, holding stops again.
const HYSTERESIS: f64 = 0.2;

/// The node's load as its connections read it: lock-free, set by [`run`].
#[derive(Debug, Default)]
pub struct Load {
    /// Busy share of the last sample, in thousandths.
    busy_permille: AtomicU32,
    /// Whether pushes may be held to share writes.
    coalescing: AtomicBool,
}

impl Load {
    /// Before the first sample: coalescing if it does not depend on load.
    pub fn new(push_coalesce: Duration, coalesce_above: f64) -> Self {
        let load = Self::default();
        load.set(0.0, !push_coalesce.is_zero() && coalesce_above <= 0.0);
        load
    }

    /// Whether pushes may wait to share a write now (`server.push_coalesce`
    /// is set and the runtime is busy enough).
    pub fn coalescing(&self) -> bool {
        self.coalescing.load(Ordering::Relaxed)
    }

    /// The runtime's busy share over the last sample, 0.0..=1.0.
    pub fn busy(&self) -> f64 {
        f64::from(self.busy_permille.load(Ordering::Relaxed)) / 1000.0
    }

    fn set(&self, busy: f64, coalescing: bool) {
        self.busy_permille
            .store((busy * 1000.0).round() as u32, Ordering::Relaxed);
        self.coalescing.store(coalescing, Ordering::Relaxed);
    }
}

/// The coalescing decision: on once the busy share reaches `above`, off
/// again only below `above - 0.2`. `above` 0 is always on.
#[derive(Debug, Clone, Copy)]
pub struct Busy {
    above: f64,
    on: bool,
}

impl Busy {
    pub fn new(above: f64) -> Self {
        Self {
            above,
            on: above <= 0.0,
        }
    }

    /// Takes the busy share of one sample; returns whether to coalesce.
    pub fn update(&mut self, busy: f64) -> bool {
        if self.above <= 0.0 {
            self.on = true;
        } else if self.on {
            self.on = busy >= self.above - HYSTERESIS;
        } else {
            self.on = busy >= self.above;
        }
        self.on
    }
}

/// The busy share of `elapsed` wall time across `workers` workers that ran
/// tasks for `busy` in total (clamped: a sample can straddle a worker's
/// busy spell).
pub fn busy_share(busy: Duration, elapsed: Duration, workers: usize) -> f64 {
    if elapsed.is_zero() || workers == 0 {
        return 0.0;
    }
    (busy.as_secs_f64() / (elapsed.as_secs_f64() * workers as f64)).clamp(0.0, 1.0)
}

/// Samples the current runtime every [`SAMPLE`] into `load` (and the
/// `gatesvr_runtime_busy_ratio` gauge) until `stop`. With
/// `push_coalesce` zero, coalescing stays off whatever the load.
pub async fn run(
    load: &Load,
    gauge: &prometheus::Gauge,
    push_coalesce: Duration,
    coalesce_above: f64,
    stop: CancellationToken,
) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let total = || -> Duration {
        (0..metrics.num_workers())
            .map(|w| metrics.worker_total_busy_duration(w))
            .sum()
    };
    let mut busy = Busy::new(coalesce_above);
    let mut tick = tokio::time::interval(SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut at, mut before) = (Instant::now(), total());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let (now, spent) = (Instant::now(), total());
        let share = busy_share(
            spent.saturating_sub(before),
            now - at,
            metrics.num_workers(),
        );
        (at, before) = (now, spent);
        let coalescing = !push_coalesce.is_zero() && busy.update(share);
        load.set(share, coalescing);
        gauge.set(share);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescing_starts_at_the_threshold_and_stops_below_its_hysteresis() {
        let mut b = Busy::new(0.9);
        assert!(!b.update(0.5), "idle");
        assert!(!b.update(0.89), "just under");
        assert!(b.update(0.9), "at the threshold");
        assert!(b.update(0.75), "relieved, still within the hysteresis");
        assert!(b.update(0.7), "at its edge");
        assert!(!b.update(0.69), "below it");
        assert!(!b.update(0.8), "off until the threshold again");
        assert!(b.update(1.0));
    }

    #[test]
    fn a_threshold_of_zero_always_coalesces() {
        let mut b = Busy::new(0.0);
        assert!(b.update(0.0));
        assert!(b.update(1.0));
    }

    #[test]
    fn the_busy_share_is_per_worker_and_clamped() {
        let ms = Duration::from_millis;
        assert_eq!(busy_share(ms(50), ms(100), 1), 0.5);
        assert!((busy_share(ms(150), ms(100), 2) - 0.75).abs() < 1e-9);
        assert_eq!(busy_share(ms(300), ms(100), 2), 1.0);
        assert_eq!(busy_share(ms(10), Duration::ZERO, 2), 0.0);
        assert_eq!(busy_share(ms(10), ms(100), 0), 0.0);
    }

    /// The sampler reads a real runtime: a worker kept spinning reads busy,
    /// and with a threshold it coalesces; with `push_coalesce` zero never.
    #[test]
    fn a_spinning_runtime_reads_busy_and_an_idle_one_does_not() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (load, off) = (
                std::sync::Arc::new(Load::default()),
                std::sync::Arc::new(Load::default()),
            );
            let gauge = prometheus::Gauge::new("busy", "busy").unwrap();
            let stop = CancellationToken::new();
            let sampler = {
                let (load, gauge, stop) = (load.clone(), gauge.clone(), stop.clone());
                tokio::spawn(async move {
                    run(&load, &gauge, Duration::from_millis(5), 0.9, stop).await;
                })
            };
            let never = {
                let (off, gauge, stop) = (off.clone(), gauge.clone(), stop.clone());
                tokio::spawn(async move { run(&off, &gauge, Duration::ZERO, 0.9, stop).await })
            };
            tokio::time::sleep(SAMPLE * 3).await;
            assert!(load.busy() < 0.5, "idle read {}", load.busy());
            assert!(!load.coalescing());
            // Spin the one worker in short slices (the sampler must still
            // run); `block_on`'s own future runs on this thread, not on it.
            // The runtime hands its workers' busy time to its metrics in
            // batches (every few dozen polls, and when a worker parks), so a
            // single sample of a loaded machine can miss a batch: the
            // highest reading while spinning is what must show it.
            let (highest, held) = tokio::spawn({
                let load = load.clone();
                async move {
                    let (mut highest, mut held) = (0.0f64, false);
                    let until = Instant::now() + SAMPLE * 5;
                    while Instant::now() < until {
                        let slice = Instant::now() + Duration::from_micros(200);
                        while Instant::now() < slice {
                            std::hint::spin_loop();
                        }
                        highest = highest.max(load.busy());
                        held |= load.coalescing();
                        tokio::task::yield_now().await;
                    }
                    (highest, held)
                }
            })
            .await
            .unwrap();
            assert!(highest > 0.9, "spinning read at most {highest}");
            assert!(held, "coalescing while spinning");
            assert!(!off.coalescing(), "push_coalesce 0 never holds");
            stop.cancel();
            sampler.await.unwrap();
            never.await.unwrap();
        });
    }
}
