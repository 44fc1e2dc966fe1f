//! Pass tests: a deploy from nothing to success, upkeep, orphans, failure and fairness.

use kiln_types::{AppId, HostId, InstanceId, InstanceState, MiB, MilliCpu, OrgId, ReleaseId};

use super::*;
use crate::model::{Host, HostState, Policy};

fn id<T: std::str::FromStr>(prefix: &str, n: u64) -> T
where
    T::Err: std::fmt::Debug,
{
    format!("{prefix}_{n:020}").parse().unwrap()
}

fn hosts(n: u64, memory: u64) -> Inventory {
    Inventory::new(
        (0..n)
            .map(|i| Host {
                id: id::<HostId>("host", i),
                region: Region::new(if i.is_multiple_of(2) { "ams" } else { "syd" }),
                driver: Driver::new("firecracker"),
                state: HostState::Ready,
                memory: MiB(memory),
                cpu: MilliCpu(8000),
                disk: MiB(0),
            })
            .collect(),
        Policy::default(),
    )
}

fn release(n: u64, count: u32) -> ReleaseSpec {
    let group = |process: &str| GroupSpec {
        process: process.into(),
        regions: vec![Region::new("ams"), Region::new("syd")],
        count,
        memory: MiB(256),
        cpu: MilliCpu(1000),
        drivers: vec![],
        volume: None,
    };
    ReleaseSpec {
        id: id::<ReleaseId>("rel", n),
        groups: vec![group("web"), group("worker")],
    }
}

fn app(org: u64, n: u64, serving: Option<ReleaseSpec>, deploy: Option<ReleaseSpec>) -> App {
    App {
        org: id::<OrgId>("org", org),
        app: id::<AppId>("app", n),
        serving,
        deploy: deploy.map(|release| Deploy {
            release,
            strategy: Strategy::Rolling {
                max_unavailable: 1,
                max_surge: 1,
            },
            routes: Routes::Old,
            deadline_passed: false,
            auto_rollback: true,
        }),
        instances: Vec::new(),
    }
}

/// Applies a plan the way the control plane would: placements become pending instances, stops
/// set `stop_requested`.
fn apply(apps: &mut [App], plan: &PassPlan, next: &mut u64) {
    for s in &plan.steps {
        match s {
            Step::Place {
                app,
                release,
                process,
                region,
                ..
            } => {
                let a = apps.iter_mut().find(|a| &a.app == app).unwrap();
                a.instances.push(Actual {
                    id: id::<InstanceId>("ins", *next),
                    release: release.clone(),
                    process: process.clone(),
                    region: region.clone(),
                    state: InstanceState::Pending,
                    stop_requested: false,
                });
                *next += 1;
            }
            Step::Stop { app, instance, .. } => {
                let a = apps.iter_mut().find(|a| &a.app == app).unwrap();
                let i = a.instances.iter_mut().find(|i| &i.id == instance).unwrap();
                assert!(!i.stop_requested, "a stop is never requested twice");
                i.stop_requested = true;
            }
        }
    }
}

fn all_healthy(apps: &mut [App]) {
    for a in apps {
        for i in &mut a.instances {
            i.state = if i.stop_requested {
                InstanceState::Stopped
            } else {
                InstanceState::Healthy
            };
        }
    }
}

fn places(plan: &PassPlan) -> usize {
    plan.steps
        .iter()
        .filter(|s| matches!(s, Step::Place { .. }))
        .count()
}

#[test]
fn a_first_deploy_places_every_piece_once_then_succeeds() {
    let mut inv = hosts(8, 16_384);
    let mut apps = vec![app(1, 1, None, Some(release(1, 2)))];
    let mut next = 0;
    let plan = plan_pass(&apps, &mut inv, Limits::default(), None);
    // Two groups × two regions × two instances.
    assert_eq!(places(&plan), 8);
    for s in &plan.steps {
        if let Step::Place { region, host, .. } = s {
            let n: u64 = host.as_str()[5..].parse().unwrap();
            assert_eq!(region.0, if n.is_multiple_of(2) { "ams" } else { "syd" });
        }
    }
    apply(&mut apps, &plan, &mut next);
    // Level-triggered: the same state again plans nothing new.
    let again = plan_pass(&apps, &mut inv, Limits::default(), None);
    assert!(again.steps.is_empty() && again.ended.is_empty());
    all_healthy(&mut apps);
    let done = plan_pass(&apps, &mut inv, Limits::default(), None);
    assert_eq!(
        done.ended,
        vec![Ended {
            app: id("app", 1),
            release: id("rel", 1),
            outcome: Outcome::Succeeded
        }]
    );
}

#[test]
fn a_rolling_deploy_replaces_every_old_instance_and_orphans_stop() {
    let mut inv = hosts(8, 16_384);
    let mut apps = vec![app(1, 1, Some(release(1, 2)), None)];
    let mut next = 0;
    let plan = plan_pass(&apps, &mut inv, Limits::default(), None);
    apply(&mut apps, &plan, &mut next);
    all_healthy(&mut apps);
    // An instance of a release nobody wants any more.
    apps[0].instances.push(Actual {
        id: id("ins", 999),
        release: id("rel", 77),
        process: "web".into(),
        region: Region::new("ams"),
        state: InstanceState::Healthy,
        stop_requested: false,
    });
    apps[0].deploy = app(1, 1, None, Some(release(2, 2))).deploy;
    let mut ended = None;
    for _ in 0..20 {
        let plan = plan_pass(&apps, &mut inv, Limits::default(), None);
        apply(&mut apps, &plan, &mut next);
        if let Some(e) = plan.ended.first() {
            ended = Some(e.outcome.clone());
            break;
        }
        all_healthy(&mut apps);
    }
    assert_eq!(ended, Some(Outcome::Succeeded));
    let live = |rel: u64| {
        apps[0]
            .instances
            .iter()
            .filter(|i| i.release == id("rel", rel) && !i.stop_requested)
            .count()
    };
    assert_eq!((live(1), live(2), live(77)), (0, 8, 0));
}

#[test]
fn upkeep_replaces_failed_instances_and_stops_surplus_ones() {
    let mut inv = hosts(4, 16_384);
    let mut apps = vec![app(1, 1, Some(release(1, 1)), None)];
    let mut next = 0;
    let plan = plan_pass(&apps, &mut inv, Limits::default(), None);
    apply(&mut apps, &plan, &mut next);
    all_healthy(&mut apps);
    apps[0].instances[0].state = InstanceState::Failed;
    let plan = plan_pass(&apps, &mut inv, Limits::default(), None);
    assert_eq!(places(&plan), 1);
    assert!(plan.steps.contains(&Step::Stop {
        org: id("org", 1),
        app: id("app", 1),
        instance: id("ins", 0)
    }));
    apply(&mut apps, &plan, &mut next);
    all_healthy(&mut apps);
    apps[0].serving = Some(release(1, 0));
    let plan = plan_pass(&apps, &mut inv, Limits::default(), None);
    assert_eq!(
        plan.steps.len(),
        4,
        "scaled to zero: every live instance stops"
    );
}

#[test]
fn a_failure_in_one_piece_rolls_back_every_piece() {
    let mut inv = hosts(8, 16_384);
    let mut apps = vec![app(1, 1, None, Some(release(1, 2)))];
    let mut next = 0;
    let plan = plan_pass(&apps, &mut inv, Limits::default(), None);
    apply(&mut apps, &plan, &mut next);
    apps[0].instances[3].state = InstanceState::Failed;
    let plan = plan_pass(&apps, &mut inv, Limits::default(), None);
    assert!(matches!(
        plan.ended[0].outcome,
        Outcome::Failed {
            rolled_back: true,
            ..
        }
    ));
    assert_eq!(plan.steps.len(), 8, "all eight new instances stop");
    assert!(plan.steps.iter().all(|s| matches!(s, Step::Stop { .. })));
}

#[test]
fn what_does_not_fit_is_reported_per_piece() {
    // Two hosts of 600 MiB: one 256 MiB instance (+16) each fits twice per host.
    let mut inv = hosts(2, 600);
    let apps = vec![app(1, 1, None, Some(release(1, 3)))];
    let plan = plan_pass(&apps, &mut inv, Limits::default(), None);
    assert_eq!(places(&plan), 4);
    let missing: u32 = plan.unplaced.iter().map(|u| u.missing).sum();
    assert_eq!(missing, 8);
    assert_eq!(
        plan.unplaced[0].why.to_string(),
        "no host fits: 1 host in another region, 1 host with insufficient memory"
    );
}

#[test]
fn one_orgs_huge_deploy_does_not_starve_anothers_single_instance() {
    let mut inv = hosts(100, 1 << 30);
    let mut big = app(1, 1, None, Some(release(1, 2500)));
    big.deploy.as_mut().unwrap().strategy = Strategy::Immediate;
    let small = app(2, 2, None, Some(release(2, 1)));
    let limits = Limits {
        per_pass: 50,
        per_org: 10_000,
    };
    let plan = plan_pass(&[big, small], &mut inv, limits, None);
    assert_eq!(plan.steps.len(), 50);
    let of_small = plan
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Place { org, .. } if *org == id::<OrgId>("org", 2)))
        .count();
    assert_eq!(
        of_small, 4,
        "all four of the small org's instances in the first pass"
    );
    assert_eq!(plan.deferred, 10_000 - 46);
}
