//! Rollout planning: the next step of a deploy, from what is.
//!
//! [`plan`] takes a deploy's strategy, the desired count, the instances of the old (serving)
//! release and of the new one with their states, where routes point (blue-green) and whether the
//! health deadline has passed, and returns the actions to take now and the deploy's outcome. It
//! keeps no state: the same input gives the same plan (instances are ordered by id inside, so the
//! order of the input does not matter), and an action already taken shows in the next input
//! (a started instance is `pending`, a stop has `stop_requested`), so nothing is done twice and a
//! restarted control plane resumes where the views say the deploy is.
//!
//! Per strategy:
//! - rolling (`max_unavailable` U, `max_surge` S): at most D + S instances live, at least D − U
//!   healthy (unless fewer were healthy to begin with: then no healthy one is stopped). New
//!   instances start while there is surge room; old ones stop while availability allows,
//!   unhealthy ones first (the rules of a Kubernetes Deployment).
//! - canary: one new instance; when it is healthy, the rest; old ones stop when all new are
//!   healthy.
//! - blue-green: the full new set; when all of it is healthy, routes switch to it; then the old
//!   set stops. Routes never go to an incomplete set.
//! - immediate: old instances stop and the new ones start at once.
//!
//! A deploy fails when a new instance fails or the deadline passes before it succeeds. With
//! `auto_rollback`, the failing plan rolls back: every new instance stops, routes go back to the
//! old release (blue-green) and old instances start again up to the old release's count.

use kiln_types::{InstanceId, InstanceState};

/// How a deploy replaces instances (the manifest's `[deploy]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// `max_unavailable` below the desired count may be unhealthy at once; `max_surge` above it
    /// may run at once. Both 0 is read as `max_unavailable` 1.
    Rolling {
        max_unavailable: u32,
        max_surge: u32,
    },
    Canary,
    BlueGreen,
    Immediate,
}

/// One instance of either release, as the views show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: InstanceId,
    pub state: InstanceState,
    /// A stop was requested (the instance is going away whatever its state says).
    pub stop_requested: bool,
}

impl Instance {
    /// Counts toward the instances the release runs.
    fn live(&self) -> bool {
        !self.stop_requested
            && matches!(
                self.state,
                InstanceState::Pending
                    | InstanceState::Starting
                    | InstanceState::Healthy
                    | InstanceState::Unhealthy
            )
    }

    fn healthy(&self) -> bool {
        self.live() && self.state == InstanceState::Healthy
    }

    /// Still has something on its host that a stop request would end.
    fn stoppable(&self) -> bool {
        !self.stop_requested && self.state != InstanceState::Stopped
    }
}

/// Which release the routes send traffic to (blue-green; other strategies route to every
/// healthy instance of both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routes {
    Old,
    New,
}

/// What a rollout knows about one deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input<'a> {
    pub strategy: Strategy,
    /// Instances the new release wants.
    pub desired: u32,
    /// Instances the old release ran (a rollback restores this many).
    pub old_desired: u32,
    pub old: &'a [Instance],
    pub new: &'a [Instance],
    pub routes: Routes,
    /// The deploy's health deadline has passed.
    pub deadline_passed: bool,
    pub auto_rollback: bool,
}

/// One thing to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Place this many new-release instances.
    StartNew(u32),
    /// Place this many old-release instances (rollback).
    StartOld(u32),
    /// Request a stop of these old-release instances.
    StopOld(Vec<InstanceId>),
    /// Request a stop of these new-release instances.
    StopNew(Vec<InstanceId>),
    /// Send traffic to this release.
    RouteTo(Routes),
}

/// Why a deploy failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// This new instance failed (the lowest id, when several did).
    InstanceFailed(InstanceId),
    /// The deadline passed with this many new instances healthy.
    DeadlinePassed { healthy: u32, desired: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    InProgress,
    Succeeded,
    /// Failed; `rolled_back` says the plan's actions roll back.
    Failed {
        failure: Failure,
        rolled_back: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// In the order to apply them. No actions with `InProgress` = wait for the instances.
    pub actions: Vec<Action>,
    pub outcome: Outcome,
}

/// Counts over one release's instances.
struct Side<'a> {
    sorted: Vec<&'a Instance>,
    live: u32,
    healthy: u32,
}

impl<'a> Side<'a> {
    fn new(instances: &'a [Instance]) -> Self {
        let mut sorted: Vec<&Instance> = instances.iter().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        Self {
            live: sorted.iter().filter(|i| i.live()).count() as u32,
            healthy: sorted.iter().filter(|i| i.healthy()).count() as u32,
            sorted,
        }
    }

    /// Up to `n` live instances to stop: not healthy ones first, then healthy, each by id.
    fn pick_live(&self, n: u32, healthy: bool) -> Vec<InstanceId> {
        self.sorted
            .iter()
            .filter(|i| i.live() && i.healthy() == healthy)
            .take(n as usize)
            .map(|i| i.id.clone())
            .collect()
    }

    fn all_stoppable(&self) -> Vec<InstanceId> {
        self.sorted
            .iter()
            .filter(|i| i.stoppable())
            .map(|i| i.id.clone())
            .collect()
    }

    fn all_live(&self) -> Vec<InstanceId> {
        self.sorted
            .iter()
            .filter(|i| i.live())
            .map(|i| i.id.clone())
            .collect()
    }

    /// Live instances beyond `keep`: not healthy ones first.
    fn surplus(&self, keep: u32) -> Vec<InstanceId> {
        let extra = self.live.saturating_sub(keep);
        let mut out = self.pick_live(extra, false);
        out.extend(self.pick_live(extra - out.len() as u32, true));
        out
    }
}

/// The next step of a deploy. See the module documentation for the rules.
pub fn plan(input: &Input<'_>) -> Plan {
    let old = Side::new(input.old);
    let new = Side::new(input.new);
    let d = input.desired;

    let failure = new
        .sorted
        .iter()
        .find(|i| i.state == InstanceState::Failed)
        .map(|i| Failure::InstanceFailed(i.id.clone()));
    let done = new.healthy >= d
        && (input.strategy != Strategy::BlueGreen || input.routes == Routes::New || d == 0);
    let failure = match failure {
        Some(f) => Some(f),
        None if input.deadline_passed && !done => Some(Failure::DeadlinePassed {
            healthy: new.healthy,
            desired: d,
        }),
        None => None,
    };
    if let Some(failure) = failure {
        return fail(input, &old, &new, failure);
    }

    let mut actions = Vec::new();
    let surplus = new.surplus(d);
    if done {
        push_stops(&mut actions, old.all_live(), surplus);
        return Plan {
            actions,
            outcome: Outcome::Succeeded,
        };
    }
    let missing = d.saturating_sub(new.live);
    match input.strategy {
        Strategy::Rolling {
            max_unavailable,
            max_surge,
        } => {
            let unavailable = if max_unavailable == 0 && max_surge == 0 {
                1
            } else {
                max_unavailable
            };
            let min_available = d.saturating_sub(unavailable);
            let all = old.live + new.live;
            // Stops: keep `min_available` healthy counting the new instances not healthy yet as
            // coming, unhealthy old ones first (they serve nothing), then healthy old ones.
            let new_unavailable = new.live - new.healthy;
            let mut budget = all.saturating_sub(min_available + new_unavailable);
            let mut stop_old = old.pick_live(budget.min(old.live - old.healthy), false);
            budget -= stop_old.len() as u32;
            let available = old.healthy + new.healthy;
            let healthy_stops = budget
                .min(available.saturating_sub(min_available))
                .min(old.healthy);
            stop_old.extend(old.pick_live(healthy_stops, true));
            push_stops(&mut actions, stop_old, surplus);
            let room = (d + max_surge).saturating_sub(all);
            let start = missing.min(room);
            if start > 0 {
                actions.push(Action::StartNew(start));
            }
        }
        Strategy::Canary => {
            push_stops(&mut actions, Vec::new(), surplus);
            let start = if new.healthy == 0 {
                // The canary: one instance, and nothing more until it is healthy.
                u32::from(new.live == 0).min(missing)
            } else {
                missing
            };
            if start > 0 {
                actions.push(Action::StartNew(start));
            }
        }
        Strategy::BlueGreen => {
            push_stops(&mut actions, Vec::new(), surplus);
            if missing > 0 {
                actions.push(Action::StartNew(missing));
            }
            if new.healthy >= d && input.routes == Routes::Old {
                actions.push(Action::RouteTo(Routes::New));
            }
        }
        Strategy::Immediate => {
            push_stops(&mut actions, old.all_live(), surplus);
            if missing > 0 {
                actions.push(Action::StartNew(missing));
            }
        }
    }
    Plan {
        actions,
        outcome: Outcome::InProgress,
    }
}

fn push_stops(actions: &mut Vec<Action>, old: Vec<InstanceId>, new: Vec<InstanceId>) {
    if !old.is_empty() {
        actions.push(Action::StopOld(old));
    }
    if !new.is_empty() {
        actions.push(Action::StopNew(new));
    }
}

/// The actions that roll a deploy back, whatever its state: routes back to the old release,
/// every new instance stopped, old instances started again up to `old_desired`. For a deploy
/// made of several rollouts (process groups, regions) that must fail together when one fails.
pub fn rollback(input: &Input<'_>) -> Vec<Action> {
    rollback_actions(input, &Side::new(input.old), &Side::new(input.new))
}

fn rollback_actions(input: &Input<'_>, old: &Side<'_>, new: &Side<'_>) -> Vec<Action> {
    let mut actions = Vec::new();
    if input.routes == Routes::New {
        actions.push(Action::RouteTo(Routes::Old));
    }
    let stop = new.all_stoppable();
    if !stop.is_empty() {
        actions.push(Action::StopNew(stop));
    }
    let restore = input.old_desired.saturating_sub(old.live);
    if restore > 0 {
        actions.push(Action::StartOld(restore));
    }
    actions
}

fn fail(input: &Input<'_>, old: &Side<'_>, new: &Side<'_>, failure: Failure) -> Plan {
    let actions = if input.auto_rollback {
        rollback_actions(input, old, new)
    } else {
        Vec::new()
    };
    Plan {
        actions,
        outcome: Outcome::Failed {
            failure,
            rolled_back: input.auto_rollback,
        },
    }
}

#[cfg(test)]
mod tests;
