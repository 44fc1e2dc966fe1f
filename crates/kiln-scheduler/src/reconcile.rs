//! One reconcile pass over every app: desired against actual, into a plan.
//!
//! [`plan_pass`] takes every app (its serving release, the deploy in progress if any, and its
//! instances as the views show them) and an [`Inventory`] holding every instance still on a host,
//! and returns what to do now:
//! 1. per app, per process group and region (a *piece*): with a deploy in progress, the
//!    [`rollout`](crate::rollout) plan of that piece; otherwise the serving release's upkeep
//!    (stop failed instances and replace them, start missing ones, stop surplus ones). A deploy
//!    is one unit: it succeeds when every piece has, it fails (and, with `auto_rollback`, rolls
//!    back every piece) when one fails, and blue-green routes switch only when every piece's new
//!    set is complete. Instances of any other release are stopped (orphans).
//! 2. every placement and stop goes through a [`FairQueue`]: at most `per_pass` of them, shared
//!    round robin between orgs, the rest left for the next pass;
//! 3. admitted placements are placed on the inventory in admission order, so when capacity is
//!    short it is shared the same fair way. A piece whose placement does not fit reports how
//!    many of its instances are missing and why ([`Unplaced`]).
//!
//! Like the rollout it keeps no state: the caller turns the plan into events, and the next pass
//! sees them in its input. Route switches and deploy outcomes are not throttled.

use std::collections::HashMap;

use kiln_types::{AppId, HostId, InstanceId, InstanceState, MiB, MilliCpu, OrgId, ReleaseId};

use crate::fair::{FairQueue, Limits};
use crate::inventory::Inventory;
use crate::model::{Driver, Group, NoFit, Region, Request, Volumes};
use crate::rollout::{self, Action, Outcome, Routes, Strategy};

/// One process group of a release: what each instance needs and how many per region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    pub process: String,
    pub regions: Vec<Region>,
    /// Instances per region.
    pub count: u32,
    pub memory: MiB,
    pub cpu: MilliCpu,
    pub drivers: Vec<Driver>,
    /// A new volume of this size for each new instance.
    pub volume: Option<MiB>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseSpec {
    pub id: ReleaseId,
    pub groups: Vec<GroupSpec>,
}

/// A deploy in progress: the release it brings and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deploy {
    pub release: ReleaseSpec,
    pub strategy: Strategy,
    pub routes: Routes,
    pub deadline_passed: bool,
    pub auto_rollback: bool,
}

/// One instance as the views show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actual {
    pub id: InstanceId,
    pub release: ReleaseId,
    pub process: String,
    pub region: Region,
    pub state: InstanceState,
    pub stop_requested: bool,
}

/// One app's desired and actual state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    pub org: OrgId,
    pub app: AppId,
    /// The release serving now (none before the first deploy succeeds).
    pub serving: Option<ReleaseSpec>,
    pub deploy: Option<Deploy>,
    pub instances: Vec<Actual>,
}

/// One admitted action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// An instance of `release`'s `process` placed on `host` (recorded in the inventory).
    Place {
        org: OrgId,
        app: AppId,
        release: ReleaseId,
        process: String,
        region: Region,
        host: HostId,
    },
    /// A stop requested for `instance`.
    Stop {
        org: OrgId,
        app: AppId,
        instance: InstanceId,
    },
}

/// Instances of a piece that did not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    pub app: AppId,
    pub release: ReleaseId,
    pub process: String,
    pub region: Region,
    pub missing: u32,
    pub why: NoFit,
}

/// A deploy that ended in this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub app: AppId,
    pub release: ReleaseId,
    pub outcome: Outcome,
}

/// The plan of one pass.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PassPlan {
    /// Admitted placements and stops, in the order to apply them.
    pub steps: Vec<Step>,
    /// Placements and stops left for a later pass.
    pub deferred: usize,
    /// Blue-green route switches: send `app`'s traffic to this release.
    pub routes: Vec<(AppId, ReleaseId)>,
    /// Deploys that succeeded or failed.
    pub ended: Vec<Ended>,
    pub unplaced: Vec<Unplaced>,
    /// Pass it to the next pass (fair rotation between orgs).
    pub last_org: Option<OrgId>,
}

/// A queued action: a placement of one instance of a piece, or a stop.
enum Want<'a> {
    Place { piece: usize },
    Stop { app: &'a App, instance: InstanceId },
}

/// What placements of one piece need.
struct Piece<'a> {
    app: &'a App,
    release: &'a ReleaseId,
    process: &'a str,
    region: &'a Region,
    request: Request,
}

/// Plans one pass; see the module documentation. `after` is the previous pass's
/// [`PassPlan::last_org`].
pub fn plan_pass(
    apps: &[App],
    inventory: &mut Inventory,
    limits: Limits,
    after: Option<&OrgId>,
) -> PassPlan {
    let mut out = PassPlan::default();
    let mut queue: FairQueue<Want<'_>> = FairQueue::new(limits);
    let mut pieces: Vec<Piece<'_>> = Vec::new();
    for app in apps {
        plan_app(app, &mut queue, &mut pieces, &mut out);
    }
    let taken = queue.take(after);
    out.deferred = taken.deferred;
    out.last_org = taken.last;
    let mut failed: HashMap<usize, usize> = HashMap::new();
    for (org, want) in taken.admitted {
        match want {
            Want::Stop { app, instance } => out.steps.push(Step::Stop {
                org,
                app: app.app.clone(),
                instance,
            }),
            Want::Place { piece } => {
                if let Some(&u) = failed.get(&piece) {
                    out.unplaced[u].missing += 1;
                    continue;
                }
                let p = &pieces[piece];
                match inventory.place(&p.request) {
                    Ok(host) => out.steps.push(Step::Place {
                        org,
                        app: p.app.app.clone(),
                        release: p.release.clone(),
                        process: p.process.to_owned(),
                        region: p.region.clone(),
                        host,
                    }),
                    Err(why) => {
                        failed.insert(piece, out.unplaced.len());
                        out.unplaced.push(Unplaced {
                            app: p.app.app.clone(),
                            release: p.release.clone(),
                            process: p.process.to_owned(),
                            region: p.region.clone(),
                            missing: 1,
                            why,
                        });
                    }
                }
            }
        }
    }
    out
}

/// The instances of one app, by (release, process, region).
type Index<'a> = HashMap<(&'a ReleaseId, &'a str, &'a Region), Vec<rollout::Instance>>;

fn plan_app<'a>(
    app: &'a App,
    queue: &mut FairQueue<Want<'a>>,
    pieces: &mut Vec<Piece<'a>>,
    out: &mut PassPlan,
) {
    let mut index: Index<'a> = HashMap::new();
    for i in &app.instances {
        let known = [
            app.serving.as_ref(),
            app.deploy.as_ref().map(|d| &d.release),
        ]
        .into_iter()
        .flatten()
        .any(|r| {
            r.id == i.release
                && r.groups
                    .iter()
                    .any(|g| g.process == i.process && g.regions.contains(&i.region))
        });
        if !known {
            // Orphan: a release that neither serves nor deploys, or a group or region its
            // release does not have.
            if !i.stop_requested && i.state != InstanceState::Stopped {
                queue.push(
                    &app.org,
                    Want::Stop {
                        app,
                        instance: i.id.clone(),
                    },
                );
            }
            continue;
        }
        index
            .entry((&i.release, i.process.as_str(), &i.region))
            .or_default()
            .push(rollout::Instance {
                id: i.id.clone(),
                state: i.state,
                stop_requested: i.stop_requested,
            });
    }
    let stop = |queue: &mut FairQueue<Want<'a>>, id: &InstanceId| {
        queue.push(
            &app.org,
            Want::Stop {
                app,
                instance: id.clone(),
            },
        );
    };
    let place = |queue: &mut FairQueue<Want<'a>>,
                 pieces: &mut Vec<Piece<'a>>,
                 release: &'a ReleaseId,
                 g: &'a GroupSpec,
                 region: &'a Region,
                 n: u32| {
        if n == 0 {
            return;
        }
        let piece = pieces.len();
        pieces.push(Piece {
            app,
            release,
            process: &g.process,
            region,
            request: Request {
                group: Group {
                    app: app.app.clone(),
                    process: g.process.clone(),
                },
                region: region.clone(),
                drivers: g.drivers.clone(),
                memory: g.memory,
                cpu: g.cpu,
                volumes: g.volume.map_or(Volumes::None, |size| Volumes::New { size }),
            },
        });
        for _ in 0..n {
            queue.push(&app.org, Want::Place { piece });
        }
    };
    let empty = Vec::new();

    let Some(deploy) = &app.deploy else {
        // Upkeep of the serving release.
        let Some(rel) = &app.serving else { return };
        for g in &rel.groups {
            for region in &g.regions {
                let insts = index
                    .get(&(&rel.id, g.process.as_str(), region))
                    .unwrap_or(&empty);
                let mut live: Vec<&rollout::Instance> = Vec::new();
                for i in insts {
                    if i.stop_requested {
                        continue;
                    }
                    match i.state {
                        InstanceState::Failed => stop(queue, &i.id),
                        InstanceState::Stopping | InstanceState::Stopped => {}
                        _ => live.push(i),
                    }
                }
                let have = live.len() as u32;
                if have > g.count {
                    live.sort_by(|a, b| {
                        (a.state == InstanceState::Healthy, &a.id)
                            .cmp(&(b.state == InstanceState::Healthy, &b.id))
                    });
                    for i in &live[..(have - g.count) as usize] {
                        stop(queue, &i.id);
                    }
                }
                place(
                    queue,
                    pieces,
                    &rel.id,
                    g,
                    region,
                    g.count.saturating_sub(have),
                );
            }
        }
        return;
    };

    // A deploy: one rollout per piece of the new release, plus the old release's pieces the new
    // one drops (they roll to zero).
    let old_rel = app.serving.as_ref();
    let mut keys: Vec<(
        &'a str,
        &'a Region,
        Option<&'a GroupSpec>,
        Option<&'a GroupSpec>,
    )> = Vec::new();
    for g in &deploy.release.groups {
        for region in &g.regions {
            let old_g = old_rel.and_then(|r| {
                r.groups
                    .iter()
                    .find(|o| o.process == g.process && o.regions.contains(region))
            });
            keys.push((&g.process, region, Some(g), old_g));
        }
    }
    for o in old_rel.map(|r| r.groups.as_slice()).unwrap_or_default() {
        for region in &o.regions {
            if !keys.iter().any(|k| k.0 == o.process && k.1 == region) {
                keys.push((&o.process, region, None, Some(o)));
            }
        }
    }
    let mut plans = Vec::with_capacity(keys.len());
    for &(process, region, new_g, old_g) in &keys {
        let old = old_rel
            .and_then(|r| index.get(&(&r.id, process, region)))
            .unwrap_or(&empty);
        let new = index
            .get(&(&deploy.release.id, process, region))
            .unwrap_or(&empty);
        let input = rollout::Input {
            strategy: deploy.strategy,
            desired: new_g.map_or(0, |g| g.count),
            old_desired: old_g.map_or(0, |g| g.count),
            old,
            new,
            routes: deploy.routes,
            deadline_passed: deploy.deadline_passed,
            auto_rollback: deploy.auto_rollback,
        };
        let plan = rollout::plan(&input);
        plans.push((input, plan));
    }
    let failure = plans.iter().find_map(|(_, p)| match &p.outcome {
        Outcome::Failed { failure, .. } => Some(failure.clone()),
        _ => None,
    });
    let mut route_new = !plans.is_empty();
    let mut all_done = true;
    for (k, (input, p)) in keys.iter().zip(&plans) {
        let actions = match &failure {
            Some(_) if deploy.auto_rollback => rollout::rollback(input),
            Some(_) => Vec::new(),
            None => p.actions.clone(),
        };
        all_done &= p.outcome == Outcome::Succeeded;
        route_new &= p.actions.contains(&Action::RouteTo(Routes::New));
        for a in actions {
            match a {
                Action::StartNew(n) => {
                    if let Some(g) = k.2 {
                        place(queue, pieces, &deploy.release.id, g, k.1, n);
                    }
                }
                Action::StartOld(n) => {
                    if let (Some(r), Some(g)) = (old_rel, k.3) {
                        place(queue, pieces, &r.id, g, k.1, n);
                    }
                }
                Action::StopOld(ids) | Action::StopNew(ids) => {
                    for id in &ids {
                        stop(queue, id);
                    }
                }
                Action::RouteTo(_) => {}
            }
        }
    }
    match failure {
        Some(failure) => {
            if deploy.auto_rollback && deploy.routes == Routes::New {
                if let Some(r) = old_rel {
                    out.routes.push((app.app.clone(), r.id.clone()));
                }
            }
            out.ended.push(Ended {
                app: app.app.clone(),
                release: deploy.release.id.clone(),
                outcome: Outcome::Failed {
                    failure,
                    rolled_back: deploy.auto_rollback,
                },
            });
        }
        None if all_done => out.ended.push(Ended {
            app: app.app.clone(),
            release: deploy.release.id.clone(),
            outcome: Outcome::Succeeded,
        }),
        None if route_new && deploy.routes == Routes::Old => {
            out.routes
                .push((app.app.clone(), deploy.release.id.clone()));
        }
        None => {}
    }
}

#[cfg(test)]
mod tests;
