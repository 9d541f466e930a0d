use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;

fn cfg() -> BalancerConfig {
    BalancerConfig {
        unhealthy_threshold: 2,
        healthy_threshold: 1,
        consecutive_errors: 3,
        base_ejection_time: Duration::from_secs(10),
        max_ejection_time: Duration::from_secs(25),
        max_ejection_percent: 50,
    }
}

/// A zone of `n` instances `i0..`, each carrying its index as value.
fn zone(n: usize) -> Balancer<usize> {
    let mut b = Balancer::new(cfg());
    let instances = (0..n).map(|i| Instance::new(format!("i{i}"), format!("h{i}:1")).unwrap());
    let mut next = 0;
    b.set_instances(instances.collect(), |_| {
        next += 1;
        next - 1
    });
    b
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(7)
}

/// Fails `n` requests on instance `value`, picking until it comes up.
fn fail_on(b: &mut Balancer<usize>, value: usize, n: u32, now: Instant) -> Vec<Transition> {
    let mut rng = rng();
    let mut transitions = Vec::new();
    let mut failed = 0;
    for _ in 0..10_000 {
        if failed == n {
            return transitions;
        }
        let pick = b.pick(now, &mut rng).expect("an instance is available");
        let outcome = if pick.value == value {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        failed += u32::from(pick.value == value);
        transitions.extend(b.finish(pick.id, outcome, now));
    }
    panic!("instance {value} was never picked");
}

#[test]
fn p2c_never_picks_the_most_loaded_of_three() {
    let now = Instant::now();
    let mut b = zone(3);
    let mut rng = rng();
    // Hold 15 requests (5 each), then finish those on 1 and 2: only instance 0
    // stays loaded.
    let held: Vec<_> = (0..15).map(|_| b.pick(now, &mut rng).unwrap()).collect();
    for pick in held.iter().filter(|p| p.value != 0) {
        b.finish(pick.id, Outcome::Success, now);
    }
    assert_eq!(
        b.statuses(now)
            .iter()
            .map(|s| s.outstanding)
            .collect::<Vec<_>>(),
        [5, 0, 0]
    );
    // Any pair of distinct candidates includes a less loaded one than 0.
    let mut picked = [0u32; 3];
    for _ in 0..1_000 {
        let pick = b.pick(now, &mut rng).unwrap();
        picked[pick.value] += 1;
        b.finish(pick.id, Outcome::Success, now);
    }
    assert_eq!(picked[0], 0, "{picked:?}");
    assert!(
        picked[1] > 300 && picked[2] > 300,
        "both idle instances share the load: {picked:?}"
    );
}

#[test]
fn p2c_balances_outstanding_requests() {
    let now = Instant::now();
    let mut b = zone(2);
    let mut rng = rng();
    let picks: Vec<_> = (0..10).map(|_| b.pick(now, &mut rng).unwrap()).collect();
    let on_first = picks.iter().filter(|p| p.value == 0).count();
    assert_eq!(on_first, 5, "two instances: p2c compares both every time");
    let statuses = b.statuses(now);
    assert!(statuses.iter().all(|s| s.outstanding == 5), "{statuses:?}");
}

#[test]
fn consecutive_failures_eject_and_the_instance_returns_after_the_backoff() {
    let t0 = Instant::now();
    let mut b = zone(2);
    let transitions = fail_on(&mut b, 1, 3, t0);
    assert_eq!(
        transitions,
        vec![Transition::Ejected {
            addr: "h1:1".into(),
            duration: Duration::from_secs(10)
        }]
    );
    assert_eq!(b.count(InstanceState::Ejected, t0), 1);

    // While ejected, every request goes to instance 0.
    let mut rng = rng();
    for _ in 0..100 {
        let pick = b.pick(t0 + Duration::from_secs(9), &mut rng).unwrap();
        assert_eq!(pick.value, 0);
        b.finish(pick.id, Outcome::Success, t0);
    }

    // After the ejection it is back; failing again ejects it for longer.
    let t1 = t0 + Duration::from_secs(10);
    assert_eq!(b.count(InstanceState::Healthy, t1), 2);
    let transitions = fail_on(&mut b, 1, 3, t1);
    assert_eq!(
        transitions,
        vec![Transition::Ejected {
            addr: "h1:1".into(),
            duration: Duration::from_secs(20)
        }]
    );
    // Capped at max_ejection_time.
    let t2 = t1 + Duration::from_secs(20);
    let transitions = fail_on(&mut b, 1, 3, t2);
    assert_eq!(
        transitions,
        vec![Transition::Ejected {
            addr: "h1:1".into(),
            duration: Duration::from_secs(25)
        }]
    );
    // A long quiet period resets the backoff.
    let t3 = t2 + Duration::from_secs(25 + 10 * 5);
    let transitions = fail_on(&mut b, 1, 3, t3);
    assert_eq!(
        transitions,
        vec![Transition::Ejected {
            addr: "h1:1".into(),
            duration: Duration::from_secs(10)
        }]
    );
}

#[test]
fn successes_reset_the_failure_count() {
    let now = Instant::now();
    let mut b = zone(2);
    for _ in 0..5 {
        assert!(fail_on(&mut b, 1, 2, now).is_empty());
        // One success on instance 1 (fail_on with n = 0 picks nothing).
        let mut rng = rng();
        loop {
            let pick = b.pick(now, &mut rng).unwrap();
            b.finish(pick.id, Outcome::Success, now);
            if pick.value == 1 {
                break;
            }
        }
    }
    assert_eq!(b.count(InstanceState::Ejected, now), 0);
}

#[test]
fn never_ejects_the_last_available_instance_or_beyond_the_percentage() {
    let now = Instant::now();
    // One instance: ejecting it would leave nothing.
    let mut b = zone(1);
    let mut rng = rng();
    for _ in 0..10 {
        let pick = b.pick(now, &mut rng).unwrap();
        assert_eq!(b.finish(pick.id, Outcome::Failure, now), None);
    }
    assert_eq!(b.count(InstanceState::Healthy, now), 1);

    // Three instances at 50%: one may be ejected, not two.
    let mut b = zone(3);
    assert_eq!(fail_on(&mut b, 0, 3, now).len(), 1);
    assert!(fail_on(&mut b, 1, 6, now).is_empty());
    assert_eq!(b.count(InstanceState::Ejected, now), 1);
    assert!(b.pick(now, &mut rng).is_some());
}

#[test]
fn health_checks_take_instances_out_and_back() {
    let now = Instant::now();
    let mut b = zone(2);
    let ids: Vec<_> = b.targets().into_iter().map(|(id, _, _)| id).collect();
    assert_eq!(
        b.record_check(ids[0], false),
        None,
        "one failure is below the threshold"
    );
    assert_eq!(
        b.record_check(ids[0], false),
        Some(Transition::MarkedUnhealthy {
            addr: "h0:1".into()
        })
    );
    let mut rng = rng();
    for _ in 0..50 {
        let pick = b.pick(now, &mut rng).unwrap();
        assert_eq!(pick.value, 1);
        b.finish(pick.id, Outcome::Success, now);
    }
    assert_eq!(
        b.record_check(ids[0], true),
        Some(Transition::MarkedHealthy {
            addr: "h0:1".into()
        })
    );
    assert_eq!(b.count(InstanceState::Healthy, now), 2);
}

#[test]
fn all_unhealthy_zone_panics_to_every_instance() {
    let now = Instant::now();
    let mut b = zone(2);
    for (id, _, _) in b.targets() {
        b.record_check(id, false);
        b.record_check(id, false);
    }
    assert_eq!(b.count(InstanceState::Unhealthy, now), 2);
    let mut seen = [false; 2];
    let mut rng = rng();
    for _ in 0..50 {
        let pick = b.pick(now, &mut rng).expect("panic routing picks");
        assert!(pick.panic);
        seen[pick.value] = true;
        b.finish(pick.id, Outcome::Success, now);
    }
    assert_eq!(seen, [true, true], "spread over every instance");
    // One healthy instance again: no panic, only it is picked.
    b.record_check(b.targets()[1].0, true);
    for _ in 0..20 {
        let pick = b.pick(now, &mut rng).unwrap();
        assert!(!pick.panic);
        assert_eq!(pick.value, 1);
        b.finish(pick.id, Outcome::Success, now);
    }
    assert!(
        zone(0).pick(now, &mut rng).is_none(),
        "an empty zone has none"
    );
}

#[test]
fn set_instances_keeps_state_of_unchanged_addresses() {
    let now = Instant::now();
    let mut b = zone(2);
    let mut rng = rng();
    let held = b.pick(now, &mut rng).unwrap();
    let mut made = Vec::new();
    b.set_instances(
        vec![
            Instance::new("renamed", held.addr.to_string()).unwrap(),
            Instance::new("new", "h9:1").unwrap(),
            Instance::new("dup", "h9:1").unwrap(),
        ],
        |i| {
            made.push(i.addr().to_string());
            99
        },
    );
    assert_eq!(made, ["h9:1"], "only the new address gets a new value");
    let statuses = b.statuses(now);
    assert_eq!(statuses.len(), 2);
    assert_eq!(statuses[0].instance.id(), "renamed");
    assert_eq!(statuses[0].outstanding, 1, "counters survive the update");

    // Finishing a request of a removed instance is harmless.
    b.set_instances(vec![Instance::new("new", "h9:1").unwrap()], |_| 0);
    assert_eq!(b.finish(held.id, Outcome::Failure, now), None);
    assert_eq!(b.len(), 1);
}
