//! Rollout tests: each strategy step by step, then properties over any input and whole
//! simulated deploys.

use kiln_types::{InstanceId, InstanceState};
use proptest::prelude::{
    any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest, Just, ProptestConfig,
};
use proptest::strategy::Strategy as Gen;

use super::*;

fn iid(n: u64) -> InstanceId {
    format!("ins_{n:020}").parse().unwrap()
}

fn inst(n: u64, state: InstanceState) -> Instance {
    Instance {
        id: iid(n),
        state,
        stop_requested: false,
    }
}

fn healthy(range: std::ops::Range<u64>) -> Vec<Instance> {
    range.map(|n| inst(n, InstanceState::Healthy)).collect()
}

fn input<'a>(strategy: Strategy, old: &'a [Instance], new: &'a [Instance]) -> Input<'a> {
    Input {
        strategy,
        desired: 3,
        old_desired: 3,
        old,
        new,
        routes: Routes::Old,
        deadline_passed: false,
        auto_rollback: true,
    }
}

const ROLLING_1_0: Strategy = Strategy::Rolling {
    max_unavailable: 1,
    max_surge: 0,
};

#[test]
fn rolling_without_surge_stops_one_old_then_starts_its_replacement() {
    let old = healthy(0..3);
    let p = plan(&input(ROLLING_1_0, &old, &[]));
    assert_eq!(p.outcome, Outcome::InProgress);
    assert_eq!(p.actions, vec![Action::StopOld(vec![iid(0)])]);
    // The same input gives the same plan, whatever the order of the instances.
    let mut reversed = old.clone();
    reversed.reverse();
    assert_eq!(plan(&input(ROLLING_1_0, &reversed, &[])), p);

    let mut old = old;
    old[0].stop_requested = true;
    let p = plan(&input(ROLLING_1_0, &old, &[]));
    assert_eq!(p.actions, vec![Action::StartNew(1)]);
    // Started, not healthy yet: wait.
    let new = vec![inst(10, InstanceState::Starting)];
    assert!(plan(&input(ROLLING_1_0, &old, &new)).actions.is_empty());
    let new = healthy(10..11);
    assert_eq!(
        plan(&input(ROLLING_1_0, &old, &new)).actions,
        vec![Action::StopOld(vec![iid(1)])]
    );
}

#[test]
fn rolling_stops_unhealthy_old_instances_first() {
    let mut old = healthy(0..3);
    old[2].state = InstanceState::Unhealthy;
    let p = plan(&input(ROLLING_1_0, &old, &[]));
    assert_eq!(p.actions, vec![Action::StopOld(vec![iid(2)])]);
}

#[test]
fn rolling_with_surge_starts_before_stopping() {
    let s = Strategy::Rolling {
        max_unavailable: 0,
        max_surge: 1,
    };
    let old = healthy(0..3);
    assert_eq!(
        plan(&input(s, &old, &[])).actions,
        vec![Action::StartNew(1)]
    );
    let new = healthy(10..11);
    assert_eq!(
        plan(&input(s, &old, &new)).actions,
        vec![Action::StopOld(vec![iid(0)])]
    );
}

#[test]
fn canary_waits_for_one_healthy_instance_then_starts_the_rest() {
    let old = healthy(0..3);
    assert_eq!(
        plan(&input(Strategy::Canary, &old, &[])).actions,
        vec![Action::StartNew(1)]
    );
    let new = vec![inst(10, InstanceState::Starting)];
    assert!(plan(&input(Strategy::Canary, &old, &new))
        .actions
        .is_empty());
    let new = healthy(10..11);
    assert_eq!(
        plan(&input(Strategy::Canary, &old, &new)).actions,
        vec![Action::StartNew(2)]
    );
    let new = healthy(10..13);
    let p = plan(&input(Strategy::Canary, &old, &new));
    assert_eq!(p.outcome, Outcome::Succeeded);
    assert_eq!(
        p.actions,
        vec![Action::StopOld(vec![iid(0), iid(1), iid(2)])]
    );
}

#[test]
fn bluegreen_switches_routes_only_to_a_full_healthy_set_then_stops_the_old() {
    let old = healthy(0..3);
    let b = Strategy::BlueGreen;
    assert_eq!(
        plan(&input(b, &old, &[])).actions,
        vec![Action::StartNew(3)]
    );
    let mut new = healthy(10..13);
    new[1].state = InstanceState::Starting;
    assert!(plan(&input(b, &old, &new)).actions.is_empty());
    new[1].state = InstanceState::Healthy;
    let p = plan(&input(b, &old, &new));
    assert_eq!(p.actions, vec![Action::RouteTo(Routes::New)]);
    assert_eq!(p.outcome, Outcome::InProgress);
    let mut switched = input(b, &old, &new);
    switched.routes = Routes::New;
    let p = plan(&switched);
    assert_eq!(p.outcome, Outcome::Succeeded);
    assert_eq!(
        p.actions,
        vec![Action::StopOld(vec![iid(0), iid(1), iid(2)])]
    );
}

#[test]
fn immediate_stops_the_old_and_starts_the_new_at_once() {
    let old = healthy(0..3);
    assert_eq!(
        plan(&input(Strategy::Immediate, &old, &[])).actions,
        vec![
            Action::StopOld(vec![iid(0), iid(1), iid(2)]),
            Action::StartNew(3)
        ]
    );
}

#[test]
fn a_failed_instance_rolls_back_and_restores_the_old_count() {
    // Immediate: the old ones are already stopping; the rollback starts three again.
    let mut old = healthy(0..3);
    for o in &mut old {
        o.stop_requested = true;
    }
    let new = vec![
        inst(10, InstanceState::Healthy),
        inst(11, InstanceState::Failed),
        inst(12, InstanceState::Starting),
    ];
    let p = plan(&input(Strategy::Immediate, &old, &new));
    assert_eq!(
        p.outcome,
        Outcome::Failed {
            failure: Failure::InstanceFailed(iid(11)),
            rolled_back: true
        }
    );
    assert_eq!(
        p.actions,
        vec![
            Action::StopNew(vec![iid(10), iid(11), iid(12)]),
            Action::StartOld(3)
        ]
    );
    let mut no_rollback = input(Strategy::Immediate, &old, &new);
    no_rollback.auto_rollback = false;
    assert!(plan(&no_rollback).actions.is_empty());
}

#[test]
fn the_deadline_fails_an_unfinished_deploy_and_routes_go_back() {
    let old = healthy(0..3);
    let new = vec![
        inst(10, InstanceState::Healthy),
        inst(11, InstanceState::Healthy),
        inst(12, InstanceState::Unhealthy),
    ];
    let mut i = input(Strategy::BlueGreen, &old, &new);
    i.deadline_passed = true;
    i.routes = Routes::New;
    let p = plan(&i);
    assert_eq!(
        p.outcome,
        Outcome::Failed {
            failure: Failure::DeadlinePassed {
                healthy: 2,
                desired: 3
            },
            rolled_back: true
        }
    );
    assert_eq!(
        p.actions,
        vec![
            Action::RouteTo(Routes::Old),
            Action::StopNew(vec![iid(10), iid(11), iid(12)])
        ]
    );
}

// Properties.

fn arb_state() -> impl Gen<Value = InstanceState> {
    prop::sample::select(vec![
        InstanceState::Pending,
        InstanceState::Starting,
        InstanceState::Healthy,
        InstanceState::Healthy,
        InstanceState::Unhealthy,
        InstanceState::Stopping,
        InstanceState::Stopped,
        InstanceState::Failed,
    ])
}

fn arb_instances(base: u64) -> impl Gen<Value = Vec<Instance>> {
    prop::collection::vec((arb_state(), any::<bool>()), 0..8).prop_map(move |v| {
        v.into_iter()
            .enumerate()
            .map(|(n, (state, stop_requested))| Instance {
                id: iid(base + n as u64),
                state,
                stop_requested,
            })
            .collect()
    })
}

fn arb_strategy() -> impl Gen<Value = Strategy> {
    prop_oneof![
        (0..4u32, 0..4u32).prop_map(|(u, s)| Strategy::Rolling {
            max_unavailable: u,
            max_surge: s
        }),
        Just(Strategy::Canary),
        Just(Strategy::BlueGreen),
        Just(Strategy::Immediate),
    ]
}

type Case = (
    Strategy,
    u32,
    u32,
    Vec<Instance>,
    Vec<Instance>,
    bool,
    bool,
    bool,
);

fn arb_case() -> impl Gen<Value = Case> {
    (
        arb_strategy(),
        0..7u32,
        0..7u32,
        arb_instances(0),
        arb_instances(100),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
}

fn stops(p: &Plan) -> (Vec<InstanceId>, Vec<InstanceId>) {
    let mut old = Vec::new();
    let mut new = Vec::new();
    for a in &p.actions {
        match a {
            Action::StopOld(ids) => old.extend(ids.iter().cloned()),
            Action::StopNew(ids) => new.extend(ids.iter().cloned()),
            _ => {}
        }
    }
    (old, new)
}

fn started(p: &Plan) -> u32 {
    p.actions
        .iter()
        .map(|a| match a {
            Action::StartNew(n) => *n,
            _ => 0,
        })
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_input_gives_a_safe_deterministic_plan(
        (strategy, desired, old_desired, old, new, routed_new, deadline, rollback) in arb_case()
    ) {
        let routes = if routed_new { Routes::New } else { Routes::Old };
        let i = Input { strategy, desired, old_desired, old: &old, new: &new, routes,
            deadline_passed: deadline, auto_rollback: rollback };
        let p = plan(&i);
        let mut old_r = old.clone();
        old_r.reverse();
        let mut new_r = new.clone();
        new_r.reverse();
        prop_assert_eq!(&plan(&Input { old: &old_r, new: &new_r, ..i.clone() }), &p);

        let (stop_old, stop_new) = stops(&p);
        // Never a stop for an instance already stopping or stopped.
        for id in &stop_old {
            let o = old.iter().find(|o| &o.id == id).unwrap();
            prop_assert!(!o.stop_requested && o.state != InstanceState::Stopped);
        }
        for id in &stop_new {
            let n = new.iter().find(|n| &n.id == id).unwrap();
            prop_assert!(!n.stop_requested && n.state != InstanceState::Stopped);
        }
        let new_healthy = new.iter().filter(|n| n.healthy()).count() as u32;
        let any_failed = new.iter().any(|n| n.state == InstanceState::Failed);
        match &p.outcome {
            Outcome::Failed { rolled_back, .. } => {
                prop_assert!(any_failed || deadline);
                prop_assert_eq!(*rolled_back, rollback);
                if rollback {
                    // Every new instance stops, routes go back, the old count comes back.
                    let stoppable = new.iter().filter(|n| n.stoppable()).count();
                    prop_assert_eq!(stop_new.len(), stoppable);
                    prop_assert!(stop_old.is_empty());
                    prop_assert_eq!(p.actions.contains(&Action::RouteTo(Routes::Old)), routed_new);
                    let old_live = old.iter().filter(|o| o.live()).count() as u32;
                    let restore = old_desired.saturating_sub(old_live);
                    prop_assert_eq!(p.actions.contains(&Action::StartOld(restore)), restore > 0);
                } else {
                    prop_assert!(p.actions.is_empty());
                }
            }
            _ => prop_assert!(!any_failed),
        }
        if p.outcome == Outcome::Succeeded {
            prop_assert!(new_healthy >= desired);
        }
        // Blue-green never routes to an incomplete set and never stops the old set while it
        // still serves.
        if strategy == Strategy::BlueGreen {
            if p.actions.contains(&Action::RouteTo(Routes::New)) {
                prop_assert!(new_healthy >= desired && !any_failed);
            }
            if !stop_old.is_empty() {
                prop_assert!(routed_new || desired == 0);
            }
        }
        // Rolling keeps desired − max_unavailable healthy (or all it had) and the surge bound.
        if let Strategy::Rolling { max_unavailable, max_surge } = strategy {
            if !matches!(p.outcome, Outcome::Failed { .. }) {
                let u = if max_unavailable == 0 && max_surge == 0 { 1 } else { max_unavailable };
                let healthy_before = new_healthy + old.iter().filter(|o| o.healthy()).count() as u32;
                let healthy_stopped = old.iter().filter(|o| o.healthy() && stop_old.contains(&o.id)).count() as u32
                    + new.iter().filter(|n| n.healthy() && stop_new.contains(&n.id)).count() as u32;
                let floor = healthy_before.min(desired.saturating_sub(u));
                if p.outcome == Outcome::InProgress {
                    prop_assert!(healthy_before - healthy_stopped >= floor);
                }
                let live = old.iter().filter(|o| o.live()).count() as u32
                    + new.iter().filter(|n| n.live()).count() as u32;
                prop_assert!(live + started(&p) <= live.max(desired + max_surge));
            }
        }
    }

    /// A whole deploy from `desired` healthy old instances, applying every plan and letting one
    /// instance change state per step: it ends, and a rolling deploy keeps its floor all along.
    #[test]
    fn simulated_deploys_finish_and_keep_their_floor(
        strategy in arb_strategy(),
        desired in 1..6u32,
        order in prop::collection::vec(any::<prop::sample::Index>(), 200),
        fail_at in prop::option::of(0..30usize),
    ) {
        let mut old = healthy(0..u64::from(desired));
        let mut new: Vec<Instance> = Vec::new();
        let mut routes = Routes::Old;
        let mut next_id = 100;
        let mut finished = None;
        for (step, pick) in order.iter().enumerate() {
            let p = plan(&Input { strategy, desired, old_desired: desired, old: &old, new: &new,
                routes, deadline_passed: false, auto_rollback: true });
            for a in &p.actions {
                match a {
                    Action::StartNew(n) => for _ in 0..*n {
                        new.push(inst(next_id, InstanceState::Pending));
                        next_id += 1;
                    },
                    Action::StartOld(n) => for _ in 0..*n {
                        old.push(inst(next_id, InstanceState::Pending));
                        next_id += 1;
                    },
                    Action::StopOld(ids) => for o in old.iter_mut().filter(|o| ids.contains(&o.id)) {
                        o.stop_requested = true;
                    },
                    Action::StopNew(ids) => for n in new.iter_mut().filter(|n| ids.contains(&n.id)) {
                        n.stop_requested = true;
                    },
                    Action::RouteTo(r) => routes = *r,
                }
            }
            if let Strategy::Rolling { max_unavailable, max_surge } = strategy {
                let u = if max_unavailable == 0 && max_surge == 0 { 1 } else { max_unavailable };
                let healthy = old.iter().chain(&new).filter(|i| i.healthy()).count() as u32;
                if !matches!(p.outcome, Outcome::Failed { .. }) {
                    prop_assert!(healthy >= desired.saturating_sub(u), "step {step}: {healthy} healthy");
                }
            }
            if p.outcome != Outcome::InProgress {
                finished = Some(p.outcome);
                break;
            }
            // One instance moves on: pending → starting → healthy (or failed at `fail_at`);
            // a stop completes.
            let all: Vec<&mut Instance> = old.iter_mut().chain(new.iter_mut())
                .filter(|i| !matches!(i.state, InstanceState::Healthy | InstanceState::Stopped | InstanceState::Failed) || (i.stop_requested && i.state != InstanceState::Stopped))
                .collect();
            if all.is_empty() {
                continue;
            }
            let n = pick.index(all.len());
            let i = all.into_iter().nth(n).unwrap();
            i.state = if i.stop_requested {
                InstanceState::Stopped
            } else if fail_at == Some(step) {
                InstanceState::Failed
            } else if i.state == InstanceState::Pending {
                InstanceState::Starting
            } else {
                InstanceState::Healthy
            };
        }
        match finished {
            Some(Outcome::Succeeded) => {
                prop_assert!(new.iter().filter(|n| n.healthy()).count() as u32 >= desired);
            }
            Some(Outcome::Failed { .. }) => prop_assert!(fail_at.is_some()),
            other => prop_assert!(false, "deploy did not finish: {other:?}"),
        }
    }
}
