//! `./scripts/bench scheduler`: the scheduler simulator (pure code, one thread, no I/O).
//!
//! A seeded fleet of 10,000 hosts (4 regions; 8 to 64 GiB; firecracker, qemu and runc drivers;
//! 1% down and 1% draining) and ~100,000 instances over ~1,000 orgs and their apps (most apps
//! small, a few with thousands of instances; 1 or 2 process groups in 1 or 2 regions).
//!
//! - **fill**: every instance placed one after another (`place_many` per group and region) into
//!   the empty fleet; placements per second;
//! - **loaded**: 20,000 more instances of existing groups placed into the fleet that already
//!   holds the 100,000 (the "at 10k hosts / 100k instances"); placements per second;
//!   the memory hard cap is then checked on every host;
//! - **reconcile pass**: every app with its serving release and instances (1% of them failed),
//!   10% of apps mid-deploy (rolling, new release half started): build the inventory from hosts
//!   and instances, then `plan_pass` over every app (rollouts, upkeep, fair queue, placements
//!   of what it admits); 5 passes, the median;
//! - one `explain` of a request over all hosts (the debugging view's cost).
//!
//! Ends with `hosts=`, `instances=`, `fill_placements_per_sec=`, `placements_per_sec=` (loaded)
//! and `reconcile_pass_ms=` lines. `KILN_BENCH_SCHED_SEED` changes the seed (default 1).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{ensure, Result};

use kiln_scheduler::fair::Limits;
use kiln_scheduler::reconcile::{self, Actual, App, Deploy, GroupSpec, ReleaseSpec};
use kiln_scheduler::rollout::{Routes, Strategy};
use kiln_scheduler::{
    Driver, Group, Host, HostState, Inventory, Policy, Region, Request, Usage, Volumes,
};
use kiln_types::{AppId, HostId, InstanceId, InstanceState, MiB, MilliCpu, OrgId};

const HOSTS: u64 = 10_000;
const INSTANCES: u64 = 100_000;
const LOADED: u64 = 20_000;
const REGIONS: [&str; 4] = ["ams", "iad", "sin", "syd"];

/// splitmix64: a small, seeded generator so every run builds the same fleet.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

fn id<T: std::str::FromStr>(prefix: &str, n: u64) -> T
where
    T::Err: std::fmt::Debug,
{
    format!("{prefix}_{n:020}")
        .parse()
        .expect("digits are base32")
}

fn fleet(rng: &mut Rng) -> Vec<Host> {
    (0..HOSTS)
        .map(|n| {
            let gib = *rng.pick(&[8u64, 16, 32, 32, 64]);
            let driver = match rng.below(100) {
                0..80 => "firecracker",
                80..95 => "qemu",
                _ => "runc",
            };
            let state = match rng.below(100) {
                0 => HostState::Down,
                1 => HostState::Draining,
                _ => HostState::Ready,
            };
            Host {
                id: id("host", n),
                region: Region::new(*rng.pick(&REGIONS)),
                driver: Driver::new(driver),
                state,
                memory: MiB(gib * 1024),
                cpu: MilliCpu((gib / 4).max(2) as u32 * 1000),
                disk: MiB(gib * 1024 * 8),
            }
        })
        .collect()
}

/// Apps until their instances reach `INSTANCES`: most with 1–4 per group and region, one in 50
/// with 20–200, one in 1,000 with 1,000–3,000.
fn apps(rng: &mut Rng) -> Vec<App> {
    let mut apps = Vec::new();
    let mut total = 0u64;
    let mut n = 0u64;
    while total < INSTANCES {
        let per_region = match rng.below(1000) {
            0 => 1000 + rng.below(2001),
            1..21 => 20 + rng.below(181),
            _ => 1 + rng.below(4),
        } as u32;
        let nregions = 1 + rng.below(2) as usize;
        let first = rng.below(REGIONS.len() as u64) as usize;
        let regions: Vec<Region> = (0..nregions)
            .map(|i| Region::new(REGIONS[(first + i) % REGIONS.len()]))
            .collect();
        let drivers = match rng.below(10) {
            0 => vec![Driver::new("runc"), Driver::new("qemu")],
            1..4 => vec![],
            _ => vec![Driver::new("firecracker")],
        };
        let memory = MiB(*rng.pick(&[256u64, 256, 512, 512, 1024, 2048]));
        let groups: Vec<GroupSpec> = ["web", "worker"][..1 + rng.below(2) as usize]
            .iter()
            .map(|p| GroupSpec {
                process: (*p).into(),
                regions: regions.clone(),
                count: per_region,
                memory,
                cpu: MilliCpu(*rng.pick(&[500u32, 1000, 1000, 2000])),
                drivers: drivers.clone(),
                volume: None,
            })
            .collect();
        total += u64::from(per_region) * (groups.len() * regions.len()) as u64;
        apps.push(App {
            org: id("org", rng.below(1000)),
            app: id("app", n),
            serving: Some(ReleaseSpec {
                id: id("rel", n * 2),
                groups,
            }),
            deploy: None,
            instances: Vec::new(),
        });
        n += 1;
    }
    apps
}

fn request(app: &AppId, g: &GroupSpec, region: &Region) -> Request {
    Request {
        group: Group {
            app: app.clone(),
            process: g.process.clone(),
        },
        region: region.clone(),
        drivers: g.drivers.clone(),
        memory: g.memory,
        cpu: g.cpu,
        volumes: Volumes::None,
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Entry point of `kiln-bench scheduler`.
pub async fn run() -> Result<()> {
    let seed = std::env::var("KILN_BENCH_SCHED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut rng = Rng(seed);
    let hosts = fleet(&mut rng);
    let mut apps = apps(&mut rng);
    let orgs: std::collections::BTreeSet<&OrgId> = apps.iter().map(|a| &a.org).collect();
    println!(
        "scheduler benchmark: seed {seed}, {} hosts, {} apps of {} orgs, profile {}",
        hosts.len(),
        apps.len(),
        orgs.len(),
        std::env::var("KILN_PROFILE").unwrap_or_else(|_| "debug".into())
    );

    // Fill: every instance into the empty fleet.
    let mut inv = Inventory::new(hosts.clone(), Policy::default());
    let mut host_of: HashMap<InstanceId, HostId> = HashMap::new();
    let mut next_instance = 0u64;
    let mut placed = 0u64;
    let mut unplaced = 0u64;
    // Pieces larger than their bucket's host count are the slow case of the index: time them.
    let mut big = (0u64, std::time::Duration::ZERO);
    let start = Instant::now();
    for app in &mut apps {
        let rel = app.serving.as_ref().expect("every app serves");
        for g in &rel.groups {
            for region in &g.regions {
                let piece = Instant::now();
                let batch = inv.place_many(&request(&app.app, g, region), g.count);
                if g.count >= 1000 {
                    big.0 += batch.hosts.len() as u64;
                    big.1 += piece.elapsed();
                }
                for host in &batch.hosts {
                    let instance: InstanceId = id("ins", next_instance);
                    host_of.insert(instance.clone(), host.clone());
                    app.instances.push(Actual {
                        id: instance,
                        release: rel.id.clone(),
                        process: g.process.clone(),
                        region: region.clone(),
                        state: InstanceState::Healthy,
                        stop_requested: false,
                    });
                    next_instance += 1;
                }
                placed += batch.hosts.len() as u64;
                unplaced += batch.shortfall.map_or(0, |(n, _)| u64::from(n));
            }
        }
    }
    let fill = start.elapsed();
    let fill_rate = placed as f64 / fill.as_secs_f64();
    println!(
        "  fill: {placed} instances placed ({unplaced} did not fit) in {:.1} ms: {fill_rate:.0} placements/s",
        fill.as_secs_f64() * 1000.0
    );
    println!(
        "    of which {} in groups of 1,000+ per region: {:.1} ms ({:.0} placements/s); the rest {:.0} placements/s",
        big.0,
        big.1.as_secs_f64() * 1000.0,
        big.0 as f64 / big.1.as_secs_f64(),
        (placed - big.0) as f64 / (fill - big.1).as_secs_f64(),
    );
    ensure!(
        placed >= INSTANCES * 99 / 100,
        "the fleet should hold the instances"
    );

    // Loaded: more instances of existing groups into the fleet holding them all.
    let mut reqs = Vec::new();
    while (reqs.len() as u64) < LOADED {
        let app = rng.pick(&apps);
        let rel = app.serving.as_ref().expect("every app serves");
        let g = rng.pick(&rel.groups);
        reqs.push(request(&app.app, g, rng.pick(&g.regions)));
    }
    let start = Instant::now();
    let mut loaded_ok = 0u64;
    for r in &reqs {
        if inv.place(r).is_ok() {
            loaded_ok += 1;
        }
    }
    let loaded = start.elapsed();
    let rate = LOADED as f64 / loaded.as_secs_f64();
    println!(
        "  loaded: {LOADED} more placements ({loaded_ok} fit) into the fleet holding {placed}, in {:.1} ms: {rate:.0} placements/s",
        loaded.as_secs_f64() * 1000.0
    );
    for h in &hosts {
        let used = inv.used_memory(&h.id).unwrap_or_default();
        ensure!(used <= h.memory, "host {} over its memory: {used}", h.id);
    }
    println!("  memory hard cap holds on every host");

    let start = Instant::now();
    let ex = inv.explain(&reqs[0]);
    let explain_ms = start.elapsed().as_secs_f64() * 1000.0;
    println!(
        "  explain of one request over {} hosts: {explain_ms:.1} ms",
        ex.hosts.len()
    );

    // Reconcile pass: 1% of instances failed, 10% of apps mid-deploy.
    let mut deploying = 0;
    for (n, app) in apps.iter_mut().enumerate() {
        for i in &mut app.instances {
            if rng.below(100) == 0 {
                i.state = InstanceState::Failed;
            }
        }
        if rng.below(10) == 0 {
            deploying += 1;
            let old = app.serving.clone().expect("every app serves");
            let release = ReleaseSpec {
                id: id("rel", n as u64 * 2 + 1),
                groups: old.groups.clone(),
            };
            // Half of each piece already started and healthy (placed beside the old ones).
            let mut started = Vec::new();
            for g in &release.groups {
                for region in &g.regions {
                    let batch = inv.place_many(&request(&app.app, g, region), g.count / 2);
                    for host in batch.hosts {
                        let instance: InstanceId = id("ins", next_instance);
                        host_of.insert(instance.clone(), host);
                        started.push(Actual {
                            id: instance,
                            release: release.id.clone(),
                            process: g.process.clone(),
                            region: region.clone(),
                            state: InstanceState::Healthy,
                            stop_requested: false,
                        });
                        next_instance += 1;
                    }
                }
            }
            app.instances.extend(started);
            app.deploy = Some(Deploy {
                release,
                strategy: Strategy::Rolling {
                    max_unavailable: 1,
                    max_surge: 1,
                },
                routes: Routes::Old,
                deadline_passed: false,
                auto_rollback: true,
            });
        }
    }
    let instances: usize = apps.iter().map(|a| a.instances.len()).sum();
    let mut passes = Vec::new();
    let mut builds = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        let start = Instant::now();
        let mut inv = Inventory::new(hosts.clone(), Policy::default());
        for app in &apps {
            for i in &app.instances {
                let host = &host_of[&i.id];
                let g = app
                    .serving
                    .as_ref()
                    .and_then(|r| r.groups.iter().find(|g| g.process == i.process))
                    .expect("every instance's group is served");
                inv.add_instance(
                    host,
                    &Usage {
                        group: Group {
                            app: app.app.clone(),
                            process: i.process.clone(),
                        },
                        memory: g.memory,
                        cpu: g.cpu,
                        disk: MiB(0),
                    },
                );
            }
        }
        builds.push(start.elapsed().as_secs_f64() * 1000.0);
        let plan = reconcile::plan_pass(&apps, &mut inv, Limits::default(), None);
        passes.push(start.elapsed().as_secs_f64() * 1000.0);
        last = Some(plan);
    }
    let plan = last.expect("five passes ran");
    let pass_ms = median(passes.clone());
    let rounded: Vec<String> = passes.iter().map(|p| format!("{p:.1}")).collect();
    let build_ms = median(builds);
    println!(
        "  reconcile pass over {} apps ({deploying} deploying), {instances} instances: [{}] ms; \
         of which the inventory build {build_ms:.1} ms (median); admitted {} steps, deferred {}, \
         {} unplaced pieces, {} deploys ended",
        apps.len(),
        rounded.join(", "),
        plan.steps.len(),
        plan.deferred,
        plan.unplaced.len(),
        plan.ended.len(),
    );
    println!("hosts={}", hosts.len());
    println!("instances={placed}");
    println!("fill_placements_per_sec={fill_rate:.0}");
    println!("placements_per_sec={rate:.0}");
    println!("reconcile_pass_ms={pass_ms:.0}");
    Ok(())
}
