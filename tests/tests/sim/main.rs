//! Deterministic simulation of a GateSvr cluster: N data-plane nodes running
//! the real session table (`gatesvr_dataplane::core::Table` over the real
//! `Session`), the real control-plane state machine (`State::apply`), the
//! real replica store, clients, an upstream, and a network that delays, drops,
//! duplicates, reorders and partitions; one thread, simulated time, one seed.
//!
//! The sim's node shell (`node.rs`) mirrors what the data plane's shell does
//! with the table's commands (claim, handover, stage, replicate, recover,
//! drain); the decisions are the core's. Faults are drawn per seed (see
//! [`Fault`]). Invariants are checked after every event (`check.rs`):
//! - no push is delivered twice without the redelivery flag, and a resumed
//!   session continues from the client's last ack (no gap) or says it could not;
//! - no request `seq_id` of a session is executed twice;
//! - at most one node serves a session at a given epoch; a push is never
//!   queued on a copy older than what its node's view shows;
//! - at the end (faults healed, traffic quiet): every durable push answered
//!   OK was delivered, unless the client was told its session could not be
//!   resumed after that push.
//!
//! A failing seed prints the one command that replays it. CI runs a bounded
//! number of seeds; `SIM_SEEDS=<n>` runs more (a soak; `SIM_SEEDS_FROM=<s>` starts
//! it at seed `s` instead of 0), `SIM_SEED=<s>` one.

mod check;
mod node;
mod world;

use world::{Plan, World};

/// Fault kinds a seed may draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// kill -9 of a node (it does not come back).
    Kill,
    /// kill -9, then the same node id starts again, empty.
    Restart,
    /// Two nodes cannot reach each other for a while.
    Partition,
    /// A node cannot reach the control plane (no heartbeats, no watch).
    CpPartition,
    /// A node drains (stage, transfer, GoAway) and leaves.
    Drain,
    /// Messages to one node are slow (a slow standby).
    SlowNode,
    /// The control plane is unreachable for everyone for a while.
    CpOutage,
    /// Watch deltas reach a node late (a lagging replica, a leader change),
    /// then it resyncs from a snapshot.
    LateWatch,
    /// Peer messages are duplicated.
    Duplicate,
    /// Peer messages are dropped.
    Drop,
    /// Pushes with large payloads.
    BigPayload,
    /// Every node is replaced by a new one (new name), one at a time: a
    /// rolling upgrade with Helm's new pod names.
    Rolling,
}

pub const ALL_FAULTS: [Fault; 12] = [
    Fault::Kill,
    Fault::Restart,
    Fault::Partition,
    Fault::CpPartition,
    Fault::Drain,
    Fault::SlowNode,
    Fault::CpOutage,
    Fault::LateWatch,
    Fault::Duplicate,
    Fault::Drop,
    Fault::BigPayload,
    Fault::Rolling,
];

fn try_seed(seed: u64, plan: Plan, test: &str) -> Result<world::Report, String> {
    let mut world = World::new(seed, plan);
    world.run().map_err(|violation| {
        format!(
            "simulation seed {seed} broke an invariant: {violation}\n\
             faults drawn: {:?}\n\
             replay: SIM_SEED={seed} cargo nextest run -p gatesvr-tests --test sim {test}\n\
             last events:\n{}",
            world.faults(),
            world.trace_tail()
        )
    })
}

fn run_seed(seed: u64, plan: Plan, test: &str) -> world::Report {
    try_seed(seed, plan, test).unwrap_or_else(|failure| panic!("{failure}"))
}

fn seeds(default: u64) -> Vec<u64> {
    if let Ok(one) = std::env::var("SIM_SEED") {
        return vec![one.parse().expect("SIM_SEED is a number")];
    }
    let n = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    // SIM_SEEDS_FROM=<s>: a soak of other seeds than the last one's.
    let from: u64 = std::env::var("SIM_SEEDS_FROM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (from..from + n).collect()
}

/// Mixed faults, a few hundred sessions, three to five nodes.
#[test]
fn seeds_with_random_faults() {
    let mut kinds = std::collections::BTreeSet::new();
    let mut totals = world::Report::default();
    // A soak (SIM_SEEDS) runs every seed and lists every failing one.
    let mut failures = Vec::new();
    for seed in seeds(2) {
        match try_seed(seed, Plan::random(seed), "seeds_with_random_faults") {
            Ok(r) => {
                kinds.extend(r.faults.iter().copied());
                totals.add(&r);
            }
            Err(failure) => failures.push(failure),
        }
    }
    eprintln!("sim totals: {totals}; fault kinds drawn: {}", kinds.len());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(totals.durable_ok > 0 && totals.delivered > 0 && totals.executed > 0);
}

/// The seeds whose soak failures sessions 10 and 11 fixed (architecture §6.8), run
/// in CI beside the two random ones. A later code change draws other faults
/// for them, so they guard the fault mixes that found those classes, not
/// the exact interleavings.
#[test]
fn seeds_that_once_lost_a_durable_push() {
    let mut failures = Vec::new();
    for seed in [
        1678, 2209, 2569, 3340, 5001, 5078, 5262, 6372, 6576, 6579, 6646,
    ] {
        if let Err(failure) = try_seed(
            seed,
            Plan::random(seed),
            "seeds_that_once_lost_a_durable_push",
        ) {
            failures.push(failure);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Twenty full rolling replacements of every node, then push, broadcast
/// (a push to every session), handover and crash recovery still work with
/// the departed nodes' records in the control plane.
#[test]
fn twenty_rolling_replacements() {
    for seed in seeds(2) {
        let r = run_seed(seed, Plan::rolling(seed, 20), "twenty_rolling_replacements");
        eprintln!("seed {seed}: {r}");
        assert!(r.departed_nodes >= 20 * 3, "{r}");
        assert!(r.final_broadcast_ok, "{r}");
    }
}

/// A thousand sessions through a crash, a drain and a partition.
#[test]
fn thousand_sessions() {
    for seed in seeds(1) {
        let r = run_seed(seed, Plan::big(seed, 1_000), "thousand_sessions");
        eprintln!("seed {seed}: {r}");
        assert!(r.sessions >= 1_000, "{r}");
        assert!(r.durable_ok > 0 && r.delivered > 0, "{r}");
    }
}

/// Ten thousand sessions through a crash, a drain and a partition (one seed
/// in CI: 25 s of CPU in a debug build at load 14 on 2 cores, 87 s wall; it
/// took 6 minutes before the per-event checks stopped scanning every session).
#[test]
fn ten_thousand_sessions() {
    for seed in seeds(1) {
        let r = run_seed(seed, Plan::big(seed, 10_000), "ten_thousand_sessions");
        eprintln!("seed {seed}: {r}");
        assert!(r.sessions >= 10_000, "{r}");
    }
}
