//! The reconciler: drives every release toward its desired state.
//!
//! It is level-triggered: each pass reads the views, compares desired with actual, and appends the
//! events that close the gap. A pass is idempotent (running it twice appends nothing new the second
//! time) and keeps no state between passes but the fair queue's rotation, so a control plane
//! killed mid-deploy resumes where the log says it was.
//!
//! Per app, a deploy proceeds like this (docs/specs/scheduler/reconciliation-loop.md):
//! 1. each pass, per process group, `kiln_scheduler::rollout::plan` gives the next step under the
//!    manifest's `deploy.strategy` (rolling, canary, blue-green, immediate) from both releases'
//!    instances: new instances to place, old ones to stop; the progress becomes the release's
//!    reason;
//! 2. when every group is done (blue-green: the full new set is healthy), the release becomes
//!    `healthy` and the previous one `superseded`, which stops its instances;
//! 3. if a new instance fails, or the health timeout passes first, the release is `failed` and
//!    its instances stop; with `auto_rollback`, the previous release gets back its count at once.
//!
//! Placements go out through `kiln_scheduler::fair::FairQueue`, bounded per pass and shared
//! between orgs; what does not fit in a pass is computed again by the next one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kiln_manifest::{Manifest, Process, RestartPolicy};
use kiln_scheduler::fair::{FairQueue, Limits};
use kiln_scheduler::rollout::{self, Action, Failure, Outcome, Routes, Strategy};
use kiln_scheduler::{
    Driver, Group, Host, HostState, Inventory, Policy, Region, Request, Usage, Volumes,
};
use kiln_store::{Append, InstanceRow, Metadata, NewEvent, ReleaseRow, VolumeRow};
use kiln_types::event::{Event, ReleaseState};
use kiln_types::workload::{BootSpec, MetricsSpec, NetworkSpec, SecretsSpec, VmSpec};
use kiln_types::{
    now_millis, AppId, HostId, InstanceId, InstanceState, MiB, MilliCpu, OrgId, StopSpec, VolumeId,
    WorkloadSpec, WORKLOAD_SPEC_VERSION,
};

use crate::error::ControlError;
use crate::Control;

pub struct Reconciler {
    control: Arc<Control>,
    limits: Limits,
    /// The org served last by the fair queue (fair rotation only: losing it loses no work).
    last_org: Mutex<Option<OrgId>>,
}

impl Reconciler {
    pub fn new(control: Arc<Control>) -> Self {
        Self::with_limits(control, Limits::default())
    }

    /// With bounds on the placements of one pass (all orgs, and in flight per org).
    pub fn with_limits(control: Arc<Control>, limits: Limits) -> Self {
        Self {
            control,
            limits,
            last_org: Mutex::new(None),
        }
    }

    /// Runs passes forever: after every change to the log, and on a tick for deadlines.
    pub async fn run(self) {
        let mut head = self.control.store.subscribe();
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %crate::error::error_chain(&e), "reconcile pass failed");
            }
            tokio::select! {
                _ = head.changed() => {}
                _ = tokio::time::sleep(self.control.config.reconcile_tick) => {}
            }
        }
    }

    /// One pass over every app with a release in progress or serving.
    pub async fn pass(&self) -> Result<(), ControlError> {
        let store = &self.control.store;
        let hosts = store
            .hosts()
            .await
            .map_err(ControlError::store("list hosts"))?;
        let apps = store
            .apps(None)
            .await
            .map_err(ControlError::store("list apps"))?;
        let instances = store
            .all_instances()
            .await
            .map_err(ControlError::store("list instances"))?;
        let mut releases: BTreeMap<AppId, Vec<ReleaseRow>> = BTreeMap::new();
        for state in [
            ReleaseState::Deploying,
            ReleaseState::Healthy,
            ReleaseState::Superseded,
            ReleaseState::Failed,
        ] {
            for r in store
                .releases_in_state(state)
                .await
                .map_err(ControlError::store("list releases"))?
            {
                releases.entry(r.app_id.clone()).or_default().push(r);
            }
        }

        // Hosts whose heartbeats stopped are down from this pass on.
        let newly_down = crate::hosts::overdue(&self.control, &hosts);
        let host_state: BTreeMap<HostId, HostState> = hosts
            .iter()
            .map(|h| {
                let down = newly_down.iter().any(
                    |e| matches!(e, Event::HostStateChanged { host_id, .. } if *host_id == h.id),
                );
                (h.id.clone(), if down { HostState::Down } else { h.state })
            })
            .collect();
        let capacity = build_inventory(&hosts, &instances, &host_state);
        let mut next_ordinal: BTreeMap<HostId, u64> = BTreeMap::new();
        for i in &instances {
            if let Some(n) = hosts
                .iter()
                .find(|h| h.id == i.host_id)
                .and_then(|h| kiln_types::net::instance_ordinal(h.index, i.spec.network.ipv6))
            {
                let e = next_ordinal.entry(i.host_id.clone()).or_default();
                *e = (*e).max(n + 1);
            }
        }
        let mut by_release: BTreeMap<&kiln_types::ReleaseId, Vec<&InstanceRow>> = BTreeMap::new();
        for i in &instances {
            by_release.entry(&i.release_id).or_default().push(i);
        }

        let volumes = store
            .volumes()
            .await
            .map_err(ControlError::store("list volumes"))?;
        // A volume is attached from an instance's placement until it is stopped or failed (the
        // agent reports either only after it unmounted the volume).
        let attached: std::collections::BTreeSet<VolumeId> = instances
            .iter()
            .filter(|i| !i.state.is_terminal())
            .flat_map(|i| i.spec.mounts.iter().filter_map(|m| m.volume_id.clone()))
            .collect();
        let shared_ports: Vec<(AppId, u16)> = store
            .allocations()
            .await
            .map_err(ControlError::store("list allocations"))?
            .into_iter()
            .filter_map(|a| match a.allocation {
                kiln_store::Allocation::SharedPort(port) => Some((a.app_id, port)),
                kiln_store::Allocation::DedicatedIpv4(_) => None,
            })
            .collect();
        let mut volumes_of: BTreeMap<(AppId, String), Vec<&VolumeRow>> = BTreeMap::new();
        for v in &volumes {
            volumes_of
                .entry((v.app_id.clone(), v.process.clone()))
                .or_default()
                .push(v);
        }
        let mut plan = Plan {
            events: newly_down,
            capacity,
            next_ordinal,
            hosts: &hosts,
            host_region: hosts.iter().map(|h| (&h.id, h.region.as_str())).collect(),
            shared_ports: &shared_ports,
            host_state: &host_state,
            wants: Vec::new(),
            volumes: volumes_of,
            attached,
            slots_taken: Default::default(),
        };
        // The instances of a down host are lost: stateless ones are marked failed (and replaced
        // below like any failed instance); ones with volumes wait for their host, which holds
        // their data.
        for i in &instances {
            if host_state.get(&i.host_id) == Some(&HostState::Down)
                && i.desired_running
                && !i.state.is_terminal()
                && i.spec.mounts.is_empty()
            {
                plan.events.push(Event::InstanceStateChanged {
                    instance_id: i.id.clone(),
                    app_id: i.app_id.clone(),
                    state: InstanceState::Failed,
                    reason: Some(format!("{HOST_DOWN_PREFIX}{} is down", i.host_id)),
                });
                plan.stop(i, "host down");
            }
        }
        // Instances of a destroyed app (gone from the views with its releases) stop.
        let app_ids: std::collections::BTreeSet<&AppId> = apps.iter().map(|a| &a.id).collect();
        for i in &instances {
            if i.desired_running && !app_ids.contains(&i.app_id) {
                plan.stop(i, "app destroyed");
            }
        }
        // Views in this pass still show those instances live: act on them from the next pass.
        if plan
            .events
            .iter()
            .any(|e| matches!(e, Event::InstanceStopRequested { .. }))
        {
            return self.append(plan.events).await;
        }
        let now = now_millis();
        for rels in releases.values_mut() {
            rels.sort_by_key(|r| r.version);
        }
        for (app_id, rels) in &releases {
            let newest_deploying = rels
                .iter()
                .filter(|r| r.state == ReleaseState::Deploying)
                .map(|r| r.version)
                .max();
            let newest_healthy = rels
                .iter()
                .filter(|r| r.state == ReleaseState::Healthy)
                .map(|r| r.version)
                .max();
            let prev = newest_healthy.and_then(|v| rels.iter().find(|r| r.version == v));
            let prev_insts: Vec<&InstanceRow> = prev
                .and_then(|p| by_release.get(&p.id).cloned())
                .unwrap_or_default();
            // While a newer release deploys, its rollout decides what the serving one runs.
            let deploying = newest_deploying.is_some_and(|d| newest_healthy.is_none_or(|h| d > h));
            // Canary and blue-green deploys stop no old instance before they succeed: the
            // serving release keeps its upkeep (failed instances replaced, drains) meanwhile.
            let old_kept = deploying
                && rels
                    .iter()
                    .find(|r| Some(r.version) == newest_deploying)
                    .is_some_and(|r| old_kept_while_deploying(&r.manifest));
            for rel in rels {
                let insts: Vec<&InstanceRow> = by_release.get(&rel.id).cloned().unwrap_or_default();
                match rel.state {
                    ReleaseState::Deploying if Some(rel.version) != newest_deploying => {
                        plan.release_state(
                            app_id,
                            rel,
                            ReleaseState::Superseded,
                            Some(format!(
                                "replaced by a newer deploy (v{})",
                                newest_deploying.unwrap_or(0)
                            )),
                        );
                        plan.stop_all(&insts, "release superseded");
                    }
                    ReleaseState::Deploying => plan.deploy_step(
                        app_id,
                        rel,
                        DeployCx {
                            insts: &insts,
                            now,
                            prev: prev.filter(|_| deploying),
                            prev_insts: if deploying { &prev_insts } else { &[] },
                        },
                    ),
                    ReleaseState::Healthy if Some(rel.version) != newest_healthy => {
                        plan.release_state(app_id, rel, ReleaseState::Superseded, None);
                        plan.stop_all(&insts, "release superseded");
                    }
                    ReleaseState::Healthy if deploying && !old_kept => {}
                    ReleaseState::Healthy => plan.keep_running(rel, &insts),
                    ReleaseState::Superseded | ReleaseState::Failed => {
                        plan.stop_all(&insts, "release no longer serving")
                    }
                }
            }
        }

        // Placements go out through the fair queue: at most `per_pass` in a pass, shared round
        // robin between orgs, each org bounded by what it already has starting; the rest wait
        // for a later pass (which computes them again).
        let org_of: BTreeMap<&AppId, &OrgId> = apps.iter().map(|a| (&a.id, &a.org_id)).collect();
        let mut queue: FairQueue<Wanted<'_>> = FairQueue::new(self.limits);
        let mut in_flight: BTreeMap<&OrgId, u32> = BTreeMap::new();
        for i in &instances {
            if i.desired_running
                && matches!(i.state, InstanceState::Pending | InstanceState::Starting)
            {
                if let Some(org) = org_of.get(&i.app_id) {
                    *in_flight.entry(org).or_default() += 1;
                }
            }
        }
        for (org, n) in in_flight {
            queue.set_in_flight(org, n);
        }
        for w in std::mem::take(&mut plan.wants) {
            match org_of.get(&w.app) {
                Some(org) => queue.push(org, w),
                None => tracing::warn!(app_id = %w.app, "placement for an app with no org"),
            }
        }
        let taken = {
            let mut last = self.last_org.lock().unwrap_or_else(|e| e.into_inner());
            let taken = queue.take(last.as_ref());
            *last = taken.last.clone();
            taken
        };
        if taken.deferred > 0 {
            tracing::info!(
                deferred = taken.deferred,
                "placements left for a later pass"
            );
        }
        let mut leaving_apps: std::collections::BTreeSet<AppId> = instances
            .iter()
            .filter(|i| !i.desired_running && !i.state.is_terminal())
            .map(|i| i.app_id.clone())
            .collect();
        leaving_apps.extend(plan.events.iter().filter_map(|e| match e {
            Event::InstanceStopRequested { app_id, .. } => Some(app_id.clone()),
            _ => None,
        }));
        let mut failed: Vec<&kiln_types::ReleaseId> = Vec::new();
        for (_, w) in taken.admitted {
            if failed.contains(&&w.rel.id) {
                continue;
            }
            let Some(group) = w.manifest.processes.iter().find(|p| p.name == w.group) else {
                continue;
            };
            if let Err(reason) = plan.place(w.rel, &w.manifest, group, &w.region) {
                match w.purpose {
                    // Instances of the app still on their way out hold room the deploy may
                    // need (memory is a hard cap, so it is not freed before they stop): wait
                    // for them, under the deploy's deadline.
                    Purpose::Deploy if leaving_apps.contains(&w.app) => {
                        tracing::info!(release_id = %w.rel.id, reason = %reason, "placement waits for stopping instances");
                        failed.push(&w.rel.id);
                    }
                    Purpose::Deploy => {
                        plan.release_state(&w.app, w.rel, ReleaseState::Failed, Some(reason));
                        let insts = by_release.get(&w.rel.id).cloned().unwrap_or_default();
                        plan.stop_all(&insts, "deploy failed");
                        failed.push(&w.rel.id);
                    }
                    Purpose::Upkeep => {
                        tracing::warn!(release_id = %w.rel.id, reason = %reason, "cannot place instance");
                    }
                }
            }
        }

        self.append(plan.events).await
    }

    async fn append(&self, events: Vec<Event>) -> Result<(), ControlError> {
        if events.is_empty() {
            return Ok(());
        }
        self.control
            .store
            .append(Append {
                events: events.into_iter().map(NewEvent::any).collect(),
                metadata: Metadata {
                    actor: "system:reconciler".into(),
                    ..Default::default()
                },
                idempotency: None,
            })
            .await
            .map_err(ControlError::store("append reconcile plan"))?;
        Ok(())
    }
}

/// What a deploy step sees of its app.
struct DeployCx<'s, 'a> {
    insts: &'s [&'a InstanceRow],
    now: i64,
    /// The serving release the deploy replaces, if any.
    prev: Option<&'a ReleaseRow>,
    prev_insts: &'s [&'a InstanceRow],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A new instance of a deploy: no room fails the deploy.
    Deploy,
    /// A replacement, or an old instance restored by a rollback: no room waits.
    Upkeep,
}

/// One instance to place, waiting for the fair queue.
struct Wanted<'a> {
    app: AppId,
    rel: &'a ReleaseRow,
    manifest: Arc<Manifest>,
    group: String,
    region: String,
    purpose: Purpose,
}

struct Plan<'a> {
    events: Vec<Event>,
    wants: Vec<Wanted<'a>>,
    capacity: Inventory,
    next_ordinal: BTreeMap<HostId, u64>,
    hosts: &'a [kiln_store::HostRow],
    /// Each host's region, looked up per instance.
    host_region: BTreeMap<&'a HostId, &'a str>,
    /// Public ports owned on the shared addresses, by app.
    shared_ports: &'a [(AppId, u16)],
    host_state: &'a BTreeMap<HostId, HostState>,
    /// Every volume by app and process group, and the ones an instance holds (including those
    /// placed in this pass).
    volumes: BTreeMap<(AppId, String), Vec<&'a VolumeRow>>,
    attached: std::collections::BTreeSet<VolumeId>,
    /// Instance slots given to placements of this pass (app, group, slot).
    slots_taken: std::collections::BTreeSet<(AppId, String, u32)>,
}

/// The deploy strategy of a stored manifest stops no old instance before it succeeds. Not so for
/// an app with volumes: its groups with mounts are replaced stop-first whatever the strategy.
fn old_kept_while_deploying(manifest: &serde_json::Value) -> bool {
    matches!(
        manifest["deploy"]["strategy"].as_str(),
        Some("canary" | "bluegreen")
    ) && manifest["mounts"].as_array().is_none_or(|m| m.is_empty())
}

/// The region of `host` (`local` for a host the views do not know).
fn region_in<'a>(regions: &BTreeMap<&'a HostId, &'a str>, host: &HostId) -> &'a str {
    regions
        .get(host)
        .copied()
        .unwrap_or(kiln_types::event::LOCAL_REGION)
}

/// Reason given to instances lost with their host (not counted as the app's own failures).
const HOST_DOWN_PREFIX: &str = "host ";

impl<'a> Plan<'a> {
    /// The region of the host an instance is on (`local` for a host the views do not know).
    fn region_of(&self, host: &HostId) -> &'a str {
        region_in(&self.host_region, host)
    }

    #[allow(clippy::too_many_arguments)]
    fn want(
        &mut self,
        app_id: &AppId,
        rel: &'a ReleaseRow,
        manifest: &Arc<Manifest>,
        group: &str,
        region: &str,
        n: u32,
        purpose: Purpose,
    ) {
        for _ in 0..n {
            self.wants.push(Wanted {
                app: app_id.clone(),
                rel,
                manifest: manifest.clone(),
                group: group.to_owned(),
                region: region.to_owned(),
                purpose,
            });
        }
    }

    fn release_state(
        &mut self,
        app_id: &AppId,
        rel: &ReleaseRow,
        state: ReleaseState,
        reason: Option<String>,
    ) {
        tracing::info!(app_id = %app_id, version = rel.version, state = state.as_str(), "release state changed");
        self.events.push(Event::ReleaseStateChanged {
            app_id: app_id.clone(),
            release_id: rel.id.clone(),
            state,
            reason,
        });
    }

    fn stop(&mut self, i: &InstanceRow, reason: &str) {
        self.events.push(Event::InstanceStopRequested {
            instance_id: i.id.clone(),
            app_id: i.app_id.clone(),
            reason: reason.to_owned(),
        });
    }

    /// Requests a stop of every instance that still has something on its host.
    fn stop_all(&mut self, insts: &[&InstanceRow], reason: &str) {
        for i in insts {
            if i.desired_running && i.state != InstanceState::Stopped {
                self.stop(i, reason);
            }
        }
    }

    /// One pass of a deploy in progress: the rollout of each process group under the manifest's
    /// strategy, gated on health with the release's deadline (see the module documentation).
    fn deploy_step(&mut self, app_id: &AppId, rel: &'a ReleaseRow, d: DeployCx<'_, 'a>) {
        let DeployCx {
            insts,
            now,
            prev,
            prev_insts,
        } = d;
        let manifest = match serde_json::from_value::<Manifest>(rel.manifest.clone()) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                self.release_state(
                    app_id,
                    rel,
                    ReleaseState::Failed,
                    Some(format!("stored manifest cannot be read: {e}")),
                );
                return;
            }
        };
        let prev_manifest = prev
            .and_then(|p| serde_json::from_value::<Manifest>(p.manifest.clone()).ok())
            .map(Arc::new);
        // Rolling and immediate: an old instance that failed during the deploy is not replaced
        // (the rollout counts it as gone), only cleaned up. Otherwise the upkeep does both.
        if !old_kept_while_deploying(&rel.manifest) {
            for i in prev_insts
                .iter()
                .filter(|i| i.desired_running && i.state == InstanceState::Failed)
            {
                self.stop(i, "failed during a deploy");
            }
        }
        let strategy = |count: u32, name: &str| match manifest.deploy.strategy {
            // A group with mounts is replaced stop-first: an old instance stops and releases its
            // volume before its replacement attaches it (placement waits for that), so no
            // strategy may start a new instance above the count.
            kiln_manifest::Strategy::Rolling
            | kiln_manifest::Strategy::Canary
            | kiln_manifest::Strategy::Bluegreen
                if !manifest.mount_specs(name).is_empty() =>
            {
                Strategy::Rolling {
                    max_unavailable: manifest.deploy.max_unavailable.of(count),
                    max_surge: 0,
                }
            }
            // New instances start above the count and old ones stop only as new ones become
            // healthy: `max_unavailable` is how many are replaced at once, capacity never drops.
            kiln_manifest::Strategy::Rolling => Strategy::Rolling {
                max_unavailable: 0,
                max_surge: manifest.deploy.max_unavailable.of(count),
            },
            kiln_manifest::Strategy::Canary => Strategy::Canary,
            kiln_manifest::Strategy::Bluegreen => Strategy::BlueGreen,
            kiln_manifest::Strategy::Immediate => Strategy::Immediate,
        };
        let host_region = &self.host_region;
        let view = |list: &[&InstanceRow], process: &str, region: &str| -> Vec<rollout::Instance> {
            list.iter()
                .filter(|i| {
                    i.spec.process == process && region_in(host_region, &i.host_id) == region
                })
                .map(|i| rollout::Instance {
                    id: i.id.clone(),
                    // A failed instance already stopped (lost with its host) is gone, not a
                    // failure of the deploy.
                    state: if !i.desired_running && i.state == InstanceState::Failed {
                        InstanceState::Stopped
                    } else {
                        i.state
                    },
                    stop_requested: !i.desired_running,
                })
                .collect()
        };
        let deadline_passed = now - rel.created_at > manifest.deploy.health_timeout_ms as i64;
        // One rollout per process group and region of either release.
        let mut keys: Vec<(&str, &str)> = Vec::new();
        for m in std::iter::once(&manifest).chain(prev_manifest.iter()) {
            for p in &m.processes {
                for r in &m.regions {
                    if !keys.contains(&(p.name.as_str(), r.as_str())) {
                        keys.push((&p.name, r));
                    }
                }
            }
        }
        let count_in = |m: &Manifest, name: &str, region: &str| {
            m.processes
                .iter()
                .find(|p| p.name == name)
                .filter(|_| m.regions.iter().any(|r| r == region))
                .map_or(0, |p| p.scale.count_in(region))
        };
        let mut pieces = Vec::with_capacity(keys.len());
        for (name, region) in keys {
            let desired = count_in(&manifest, name, region);
            let old_desired = prev_manifest
                .as_ref()
                .map_or(0, |m| count_in(m, name, region));
            pieces.push((
                (name, region),
                desired,
                old_desired,
                view(prev_insts, name, region),
                view(insts, name, region),
            ));
        }
        let mut plans = Vec::with_capacity(pieces.len());
        for ((name, _), desired, old_desired, old, new) in &pieces {
            let input = rollout::Input {
                strategy: strategy(*desired, name),
                desired: *desired,
                old_desired: *old_desired,
                old,
                new,
                // The new set is routed only once the release is healthy (blue-green).
                routes: Routes::Old,
                deadline_passed,
                auto_rollback: manifest.deploy.auto_rollback,
            };
            let plan = rollout::plan(&input);
            plans.push((input, plan));
        }
        let failure = plans.iter().find_map(|(_, p)| match &p.outcome {
            Outcome::Failed { failure, .. } => Some(failure.clone()),
            _ => None,
        });
        if let Some(failure) = failure {
            let reason = match failure {
                Failure::InstanceFailed(id) => {
                    let why = insts
                        .iter()
                        .find(|i| i.id == id)
                        .and_then(|i| i.reason.clone())
                        .unwrap_or_else(|| "exited".into());
                    format!("instance {id} failed: {why}")
                }
                Failure::DeadlinePassed { .. } => {
                    let healthy = insts
                        .iter()
                        .filter(|i| i.desired_running && i.state == InstanceState::Healthy)
                        .count();
                    // The agent records why a starting instance is not healthy yet (a failing
                    // check).
                    let why = insts
                        .iter()
                        .find(|i| {
                            i.desired_running
                                && !i.state.is_terminal()
                                && i.state != InstanceState::Healthy
                                && i.reason.is_some()
                        })
                        .map(|i| {
                            format!("; instance {}: {}", i.id, i.reason.as_deref().unwrap_or(""))
                        })
                        .unwrap_or_default();
                    format!(
                        "{healthy} of {} instance(s) healthy after {}s (deploy.health_timeout){why}",
                        manifest.total_count(),
                        manifest.deploy.health_timeout_ms / 1000
                    )
                }
            };
            let reason = if manifest.deploy.auto_rollback && prev.is_some() {
                format!(
                    "{reason}; rolled back to v{}",
                    prev.map_or(0, |p| p.version)
                )
            } else {
                reason
            };
            self.release_state(app_id, rel, ReleaseState::Failed, Some(reason));
            // A failed release never serves: its instances stop whatever `auto_rollback` says.
            self.stop_all(insts, "deploy failed");
            // (Canary and blue-green stopped no old instance: the upkeep keeps its count.)
            if manifest.deploy.auto_rollback && !old_kept_while_deploying(&rel.manifest) {
                if let (Some(prev), Some(m)) = (prev, &prev_manifest) {
                    for (((name, region), ..), (input, _)) in pieces.iter().zip(&plans) {
                        for a in rollout::rollback(input) {
                            if let Action::StartOld(n) = a {
                                self.want(app_id, prev, m, name, region, n, Purpose::Upkeep);
                            }
                        }
                    }
                }
            }
            return;
        }
        // Done, or (blue-green) the full new set is healthy and routes may switch to it.
        if plans.iter().all(|(_, p)| {
            p.outcome == Outcome::Succeeded || p.actions.contains(&Action::RouteTo(Routes::New))
        }) {
            self.succeed(app_id, rel, &manifest, prev, prev_insts);
            return;
        }
        let mut old_stopping = 0;
        for (((name, region), ..), (_, p)) in pieces.iter().zip(&plans) {
            for a in &p.actions {
                match a {
                    Action::StartNew(n) => {
                        self.want(app_id, rel, &manifest, name, region, *n, Purpose::Deploy)
                    }
                    Action::StopOld(ids) | Action::StopNew(ids) => {
                        let ids: std::collections::BTreeSet<&InstanceId> = ids.iter().collect();
                        for i in prev_insts.iter().chain(insts) {
                            if ids.contains(&i.id) {
                                old_stopping += usize::from(i.release_id != rel.id);
                                self.stop(i, "replaced by the deploy");
                            }
                        }
                    }
                    Action::StartOld(_) | Action::RouteTo(_) => {}
                }
            }
        }
        // Progress, as the release's reason while it deploys (appended when it changes).
        let count = |list: &[rollout::Instance], healthy: bool| {
            list.iter()
                .filter(|i| {
                    !i.stop_requested
                        && !i.state.is_terminal()
                        && (!healthy || i.state == InstanceState::Healthy)
                })
                .count()
        };
        let new_healthy: usize = pieces.iter().map(|p| count(&p.4, true)).sum();
        let old_live = pieces
            .iter()
            .map(|p| count(&p.3, false))
            .sum::<usize>()
            .saturating_sub(old_stopping);
        let progress = format!(
            "{}: {new_healthy} of {} new instance(s) healthy, {old_live} old running",
            manifest.deploy.strategy.as_str(),
            manifest.total_count(),
        );
        if rel.reason.as_deref() != Some(progress.as_str()) {
            self.release_state(app_id, rel, ReleaseState::Deploying, Some(progress));
        }
    }

    /// The deploy succeeded (blue-green: the full new set is healthy): the release serves, the
    /// previous one is superseded (its instances stop in the next pass, after routes switched).
    fn succeed(
        &mut self,
        app_id: &AppId,
        rel: &ReleaseRow,
        manifest: &Manifest,
        prev: Option<&ReleaseRow>,
        prev_insts: &[&InstanceRow],
    ) {
        self.release_state(app_id, rel, ReleaseState::Healthy, None);
        // The release serves now: shared ports its `tcp` services no longer list go back to
        // the pool (the previous release kept them routed until this moment).
        let wanted: std::collections::BTreeSet<u16> = manifest
            .processes
            .iter()
            .flat_map(|p| &p.services)
            .filter(|s| s.protocol == kiln_types::ServiceProtocol::Tcp)
            .flat_map(|s| s.ports.iter().copied())
            .collect();
        for (owner, port) in self.shared_ports {
            if owner == app_id && !wanted.contains(port) {
                self.events.push(Event::PortReleased {
                    app_id: app_id.clone(),
                    port: *port,
                });
            }
        }
        if let Some(prev_rel) = prev {
            self.release_state(
                app_id,
                prev_rel,
                ReleaseState::Superseded,
                Some(format!("replaced by v{}", rel.version)),
            );
            if manifest.deploy.strategy != kiln_manifest::Strategy::Bluegreen {
                self.stop_all(prev_insts, "release superseded");
            }
        }
    }

    /// A serving release: replace instances that died.
    fn keep_running(&mut self, rel: &'a ReleaseRow, insts: &[&InstanceRow]) {
        let Ok(manifest) = serde_json::from_value::<Manifest>(rel.manifest.clone()) else {
            return;
        };
        let manifest = Arc::new(manifest);
        for i in insts
            .iter()
            .filter(|i| i.desired_running && i.state == InstanceState::Failed)
        {
            self.stop(i, "replaced after failure");
        }
        if manifest.restart.policy == RestartPolicy::Never {
            return;
        }
        for group in &manifest.processes {
            let of_group = || insts.iter().filter(|i| i.spec.process == group.name);
            // Each failure of this group was replaced once; stop after `max_retries`.
            let failures = of_group()
                .filter(|i| i.state == InstanceState::Failed)
                .filter(|i| {
                    !i.reason
                        .as_deref()
                        .is_some_and(|r| r.starts_with(HOST_DOWN_PREFIX))
                })
                .count();
            if failures > manifest.restart.max_retries as usize {
                continue;
            }
            for region in &manifest.regions {
                self.keep_region(rel, &manifest, insts, &group.name, region);
            }
        }
    }

    /// Upkeep of one process group in one region: replacements for what is gone, and the
    /// instances of draining hosts stopped once enough replacements are healthy.
    fn keep_region(
        &mut self,
        rel: &'a ReleaseRow,
        manifest: &Arc<Manifest>,
        insts: &[&InstanceRow],
        group: &str,
        region: &str,
    ) {
        let Some(p) = manifest.processes.iter().find(|p| p.name == group) else {
            return;
        };
        // Instances on a draining host are leaving: replacements start elsewhere, and each
        // leaving one stops only once enough replacements are healthy (no downtime).
        let leaving = |i: &&&InstanceRow| {
            self.host_state.get(&i.host_id) == Some(&HostState::Draining)
                && i.spec.mounts.is_empty()
        };
        let live: Vec<&&InstanceRow> = insts
            .iter()
            .filter(|i| i.spec.process == group && self.region_of(&i.host_id) == region)
            .filter(|i| i.desired_running && !i.state.is_terminal())
            .collect();
        let staying = live.iter().filter(|i| !leaving(i)).count();
        let want = p.scale.count_in(region) as usize;
        self.want(
            &rel.app_id,
            rel,
            manifest,
            group,
            region,
            want.saturating_sub(staying) as u32,
            Purpose::Upkeep,
        );
        let healthy_staying = live
            .iter()
            .filter(|i| !leaving(i) && i.state == InstanceState::Healthy)
            .count();
        if healthy_staying >= want {
            let out: Vec<&InstanceRow> = live.iter().filter(|i| leaving(i)).map(|i| **i).collect();
            for i in out {
                self.stop(i, "host draining");
            }
        }
    }

    fn place(
        &mut self,
        rel: &ReleaseRow,
        manifest: &Manifest,
        group: &Process,
        region: &str,
    ) -> Result<(), String> {
        let mut req = Request {
            group: Group {
                app: rel.app_id.clone(),
                process: group.name.clone(),
            },
            region: Region::new(region),
            drivers: vec![],
            memory: manifest.vm.memory,
            cpu: MilliCpu::from_cpus(manifest.vm.cpus),
            volumes: Volumes::None,
        };
        let mut mounts = manifest.mount_specs(&group.name);
        let slot = if mounts.is_empty() {
            None
        } else {
            let (slot, host) = self.volume_slot(rel, manifest, group, region)?;
            if let Some(host) = host {
                req.volumes = Volumes::Existing { host };
            }
            Some(slot)
        };
        // Records the instance on its host, so the next placement of this pass sees it.
        let host = self.capacity.place(&req).map_err(|e| e.to_string())?;
        if let Some(slot) = slot {
            self.attach_volumes(rel, group, slot, &host, &mut mounts);
        }
        let index = self
            .hosts
            .iter()
            .find(|h| h.id == host)
            .map(|h| h.index)
            .unwrap_or(0);
        let ordinal = self.next_ordinal.entry(host.clone()).or_default();
        let ipv6 = kiln_types::net::instance_address(index, *ordinal);
        *ordinal += 1;
        // The release's pinned secrets version; 0 means no secrets file (and nothing to export).
        let secrets = SecretsSpec {
            version: rel.secrets_version,
            export_env: rel.secrets_version > 0 && manifest.secrets.export_env,
        };
        let mut spec = WorkloadSpec {
            spec_version: WORKLOAD_SPEC_VERSION.into(),
            requires: Default::default(),
            instance_id: InstanceId::generate(),
            app_id: rel.app_id.clone(),
            app_name: manifest.app.clone(),
            release_id: rel.id.clone(),
            release_version: rel.version,
            process: group.name.clone(),
            image: rel.image.clone(),
            boot: BootSpec::default(),
            entrypoint: group.entrypoint.clone(),
            command: group.command.clone(),
            env: manifest.env.clone(),
            vm: VmSpec {
                cpu: req.cpu,
                memory: req.memory,
                cpu_kind: manifest.vm.cpu_kind,
            },
            network: NetworkSpec {
                ipv6,
                gateway: kiln_types::net::host_address(index),
            },
            services: group.services.iter().map(|s| s.to_spec()).collect(),
            mounts,
            secrets,
            metrics: manifest.metrics.as_ref().map(|m| MetricsSpec {
                port: m.port,
                path: m.path.clone(),
            }),
            stop: StopSpec {
                signal: manifest.stop_signal.clone(),
                timeout_ms: manifest.stop_timeout_ms,
            },
            read_only_root: manifest.vm.read_only_root,
        };
        // Name what an agent must not ignore, so that one lacking it refuses the spec whole.
        spec.requires = spec.required_capabilities();
        tracing::info!(instance_id = %spec.instance_id, host_id = %host, release_id = %rel.id, "instance placed");
        self.events.push(Event::InstancePlaced {
            host_id: host,
            spec,
        });
        Ok(())
    }
}

impl Plan<'_> {
    /// The instance slot the next instance of `group` takes, and the host its volumes pin it
    /// to (`None`: the slot has none yet, they are created where the instance is placed).
    ///
    /// Slots are 0..count of the group. The lowest slot none of whose volumes is attached to a
    /// live or stopping instance is taken, so a replacement gets the volumes of the instance it
    /// replaces. When every slot is held the placement waits (an instance stopping releases
    /// one): a group with volumes never runs above its count, and never gets a new, empty volume
    /// for a slot that has one, even when that volume's host is down.
    fn volume_slot(
        &self,
        rel: &ReleaseRow,
        manifest: &Manifest,
        group: &Process,
        region: &str,
    ) -> Result<(u32, Option<HostId>), String> {
        let group_volumes = self
            .volumes
            .get(&(rel.app_id.clone(), group.name.clone()))
            .map_or(&[][..], Vec::as_slice);
        // Slots whose volumes live in another region are that region's.
        let elsewhere: std::collections::BTreeSet<u32> = group_volumes
            .iter()
            .filter(|v| self.region_of(&v.host_id) != region)
            .map(|v| v.slot)
            .collect();
        free_slot(
            group_volumes,
            manifest.desired_count(group) + elsewhere.len() as u32,
            |v| self.attached.contains(&v.id) || elsewhere.contains(&v.slot),
            |slot| {
                self.slots_taken
                    .contains(&(rel.app_id.clone(), group.name.clone(), slot))
            },
        )
        .ok_or_else(|| {
            format!(
                "every volume slot of process group {:?} is held by an instance that has not \
                 stopped yet (a group with volumes is replaced stop-first)",
                group.name
            )
        })
    }

    /// Fills in the volume of each mount for `slot`, creating (`volume_created`) those the
    /// slot does not have yet on `host`, and marks them attached for the rest of the pass.
    fn attach_volumes(
        &mut self,
        rel: &ReleaseRow,
        group: &Process,
        slot: u32,
        host: &HostId,
        mounts: &mut [kiln_types::workload::MountSpec],
    ) {
        self.slots_taken
            .insert((rel.app_id.clone(), group.name.clone(), slot));
        let group_volumes = self
            .volumes
            .get(&(rel.app_id.clone(), group.name.clone()))
            .map_or(&[][..], Vec::as_slice);
        for m in mounts.iter_mut() {
            let existing = group_volumes
                .iter()
                .find(|v| v.slot == slot && v.name == m.volume);
            let id = match existing {
                Some(v) => v.id.clone(),
                None => {
                    let id = VolumeId::generate();
                    tracing::info!(volume_id = %id, app_id = %rel.app_id, slot, host_id = %host, "volume created");
                    self.events.push(Event::VolumeCreated {
                        volume_id: id.clone(),
                        app_id: rel.app_id.clone(),
                        env: kiln_types::secrets::DEFAULT_ENV.into(),
                        name: m.volume.clone(),
                        process: group.name.clone(),
                        slot,
                        host_id: host.clone(),
                        size: m.initial_size,
                    });
                    id
                }
            };
            self.attached.insert(id.clone());
            m.volume_id = Some(id);
        }
    }
}

/// The lowest instance slot below `count` whose volumes no instance holds and that is not
/// `taken`, with the host of its volumes (`None`: it has none yet).
fn free_slot(
    group_volumes: &[&VolumeRow],
    count: u32,
    held: impl Fn(&VolumeRow) -> bool,
    taken: impl Fn(u32) -> bool,
) -> Option<(u32, Option<HostId>)> {
    (0..count).find_map(|slot| {
        let mut vols = group_volumes.iter().filter(|v| v.slot == slot).peekable();
        let host = vols.peek().map(|v| v.host_id.clone());
        (!taken(slot) && !vols.any(|v| held(v))).then_some((slot, host))
    })
}

/// The scheduler's view of the fleet: every host with its state, and what the instances that are
/// not stopped or failed take on it. Hosts carry no volume space yet (volumes do not count against
/// a host's disk); only `ready` hosts take new instances.
fn build_inventory(
    hosts: &[kiln_store::HostRow],
    instances: &[InstanceRow],
    host_state: &BTreeMap<HostId, HostState>,
) -> Inventory {
    let mut capacity = Inventory::new(
        hosts
            .iter()
            .map(|h| Host {
                id: h.id.clone(),
                region: Region::new(h.region.clone()),
                driver: Driver::new(h.driver.clone()),
                state: host_state.get(&h.id).copied().unwrap_or(h.state),
                memory: h.memory,
                cpu: h.cpu,
                disk: MiB(0),
            })
            .collect(),
        Policy::default(),
    );
    for i in instances.iter().filter(|i| !i.state.is_terminal()) {
        capacity.add_instance(
            &i.host_id,
            &Usage {
                group: Group {
                    app: i.app_id.clone(),
                    process: i.spec.process.clone(),
                },
                memory: i.spec.vm.memory,
                cpu: i.spec.vm.cpu,
                disk: MiB(0),
            },
        );
    }
    capacity
}

/// Why each host would or would not get the next instance of `process` of `app`'s current release
/// (the scheduler's explain over the fleet as the views show it now), for `kiln debug placement`.
pub(crate) async fn explain_placement(
    control: &Control,
    app: &AppId,
    process: Option<&str>,
    region: Option<&str>,
) -> Result<Option<kiln_scheduler::Explanation>, ControlError> {
    let store = &control.store;
    let hosts = store
        .hosts()
        .await
        .map_err(ControlError::store("list hosts"))?;
    let instances = store
        .all_instances()
        .await
        .map_err(ControlError::store("list instances"))?;
    let releases = store
        .releases(app.clone())
        .await
        .map_err(ControlError::store("list releases"))?;
    let Some(rel) = releases
        .iter()
        .filter(|r| matches!(r.state, ReleaseState::Deploying | ReleaseState::Healthy))
        .max_by_key(|r| r.version)
    else {
        return Ok(None);
    };
    let Ok(manifest) = serde_json::from_value::<Manifest>(rel.manifest.clone()) else {
        return Ok(None);
    };
    let Some(group) = manifest
        .processes
        .iter()
        .find(|g| process.is_none_or(|p| p == g.name))
    else {
        return Ok(None);
    };
    let host_state = hosts.iter().map(|h| (h.id.clone(), h.state)).collect();
    let inventory = build_inventory(&hosts, &instances, &host_state);
    // A group with volumes: the next instance takes the next free slot, pinned to its volumes.
    let mut volumes = Volumes::None;
    if !manifest.mount_specs(&group.name).is_empty() {
        let all = store
            .volumes()
            .await
            .map_err(ControlError::store("list volumes"))?;
        let group_volumes: Vec<&VolumeRow> = all
            .iter()
            .filter(|v| &v.app_id == app && v.process == group.name)
            .collect();
        let held: std::collections::BTreeSet<&VolumeId> = instances
            .iter()
            .filter(|i| !i.state.is_terminal())
            .flat_map(|i| i.spec.mounts.iter().filter_map(|m| m.volume_id.as_ref()))
            .collect();
        if let Some((_, Some(host))) = free_slot(
            &group_volumes,
            manifest.desired_count(group),
            |v| held.contains(&v.id),
            |_| false,
        ) {
            volumes = Volumes::Existing { host };
        }
    }
    Ok(Some(inventory.explain(&Request {
        group: Group {
            app: app.clone(),
            process: group.name.clone(),
        },
        region: Region::new(region.unwrap_or(&manifest.primary_region)),
        drivers: vec![],
        memory: manifest.vm.memory,
        cpu: MilliCpu::from_cpus(manifest.vm.cpus),
        volumes,
    })))
}
