//! The reconciler: drives every release toward its desired state.
//!
//! It is level-triggered: each pass reads the views, compares desired with actual, and appends the
//! events that close the gap. A pass is idempotent (running it twice appends nothing new the second
//! time) and keeps no state between passes, so a control plane killed mid-deploy resumes where the
//! log says it was.
//!
//! Per app, a deploy proceeds like this:
//! 1. the newest `deploying` release gets its instances placed (one `instance_placed` each);
//! 2. when all of them report healthy, it becomes `healthy` and the previous healthy release is
//!    `superseded`, which requests a stop of its instances;
//! 3. if any instance fails, or the health timeout passes, the release is `failed` and its
//!    instances are stopped; the previous release was never touched, so it keeps serving.

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_manifest::{Manifest, Process, RestartPolicy};
use kiln_scheduler::{
    Driver, Group, Host, HostState, Inventory, Policy, Region, Request, Usage, Volumes,
};
use kiln_store::{Append, InstanceRow, Metadata, NewEvent, ReleaseRow};
use kiln_types::event::{Event, ReleaseState};
use kiln_types::workload::{BootSpec, MetricsSpec, NetworkSpec, SecretsSpec, VmSpec};
use kiln_types::{
    now_millis, AppId, HostId, InstanceId, InstanceState, MiB, MilliCpu, StopSpec, WorkloadSpec,
    WORKLOAD_SPEC_VERSION,
};

use crate::error::ControlError;
use crate::Control;

/// The region every host is in until hosts report one.
const HOST_REGION: &str = "local";

pub struct Reconciler {
    control: Arc<Control>,
}

impl Reconciler {
    pub fn new(control: Arc<Control>) -> Self {
        Self { control }
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
        // Hosts carry no region or volume space yet: one region for all, no volumes placed.
        // Only `ready` hosts take new instances.
        let mut capacity = Inventory::new(
            hosts
                .iter()
                .map(|h| Host {
                    id: h.id.clone(),
                    region: Region::new(HOST_REGION),
                    driver: Driver::new(h.driver.clone()),
                    state: host_state.get(&h.id).copied().unwrap_or_default(),
                    memory: h.memory,
                    cpu: h.cpu,
                    disk: MiB(0),
                })
                .collect(),
            Policy::default(),
        );
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
            if !i.state.is_terminal() {
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
        }
        let mut by_release: BTreeMap<&kiln_types::ReleaseId, Vec<&InstanceRow>> = BTreeMap::new();
        for i in &instances {
            by_release.entry(&i.release_id).or_default().push(i);
        }

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
        let mut plan = Plan {
            events: newly_down,
            capacity,
            next_ordinal,
            hosts: &hosts,
            shared_ports: &shared_ports,
            host_state: &host_state,
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
        // Views in this pass still show those instances live: act on them from the next pass.
        if plan
            .events
            .iter()
            .any(|e| matches!(e, Event::InstanceStopRequested { .. }))
        {
            return self.append(plan.events).await;
        }
        let now = now_millis();
        for (app_id, mut rels) in releases {
            rels.sort_by_key(|r| r.version);
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
            for rel in &rels {
                let insts: Vec<&InstanceRow> = by_release.get(&rel.id).cloned().unwrap_or_default();
                match rel.state {
                    ReleaseState::Deploying if Some(rel.version) != newest_deploying => {
                        plan.release_state(
                            &app_id,
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
                        &app_id,
                        rel,
                        &insts,
                        now,
                        newest_healthy,
                        &by_release,
                        &rels,
                    ),
                    ReleaseState::Healthy if Some(rel.version) != newest_healthy => {
                        plan.release_state(&app_id, rel, ReleaseState::Superseded, None);
                        plan.stop_all(&insts, "release superseded");
                    }
                    ReleaseState::Healthy => plan.keep_running(rel, &insts),
                    ReleaseState::Superseded | ReleaseState::Failed => {
                        plan.stop_all(&insts, "release no longer serving")
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

struct Plan<'a> {
    events: Vec<Event>,
    capacity: Inventory,
    next_ordinal: BTreeMap<HostId, u64>,
    hosts: &'a [kiln_store::HostRow],
    /// Public ports owned on the shared addresses, by app.
    shared_ports: &'a [(AppId, u16)],
    host_state: &'a BTreeMap<HostId, HostState>,
}

/// Reason given to instances lost with their host (not counted as the app's own failures).
const HOST_DOWN_PREFIX: &str = "host ";

impl Plan<'_> {
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

    #[allow(clippy::too_many_arguments)]
    fn deploy_step(
        &mut self,
        app_id: &AppId,
        rel: &ReleaseRow,
        insts: &[&InstanceRow],
        now: i64,
        newest_healthy: Option<u64>,
        by_release: &BTreeMap<&kiln_types::ReleaseId, Vec<&InstanceRow>>,
        rels: &[ReleaseRow],
    ) {
        let manifest = match serde_json::from_value::<Manifest>(rel.manifest.clone()) {
            Ok(m) => m,
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
        let live: Vec<&&InstanceRow> = insts
            .iter()
            .filter(|i| i.desired_running && !i.state.is_terminal())
            .collect();
        if let Some(failed) = insts
            .iter()
            .find(|i| i.desired_running && i.state == InstanceState::Failed)
        {
            let why = failed.reason.clone().unwrap_or_else(|| "exited".into());
            self.release_state(
                app_id,
                rel,
                ReleaseState::Failed,
                Some(format!("instance {} failed: {why}", failed.id)),
            );
            self.stop_all(insts, "deploy failed");
            return;
        }
        if now - rel.created_at > manifest.deploy.health_timeout_ms as i64 {
            let healthy = live
                .iter()
                .filter(|i| i.state == InstanceState::Healthy)
                .count();
            // The agent records why a starting instance is not healthy yet (a failing check).
            let why = live
                .iter()
                .find(|i| i.state != InstanceState::Healthy && i.reason.is_some())
                .map(|i| format!("; instance {}: {}", i.id, i.reason.as_deref().unwrap_or("")))
                .unwrap_or_default();
            self.release_state(
                app_id,
                rel,
                ReleaseState::Failed,
                Some(format!(
                    "{healthy} of {} instance(s) healthy after {}s (deploy.health_timeout){why}",
                    manifest.total_count(),
                    manifest.deploy.health_timeout_ms / 1000
                )),
            );
            self.stop_all(insts, "deploy failed");
            return;
        }
        // Each process group gets its own instances: `scale.count` per region, each spec
        // carrying the group's name, command and services.
        let mut placed = false;
        for group in &manifest.processes {
            let want = manifest.desired_count(group) as usize;
            let have = live.iter().filter(|i| i.spec.process == group.name).count();
            for _ in have..want {
                if let Err(reason) = self.place(rel, &manifest, group) {
                    self.release_state(app_id, rel, ReleaseState::Failed, Some(reason));
                    self.stop_all(insts, "deploy failed");
                    return;
                }
                placed = true;
            }
        }
        if placed {
            return;
        }
        if live.iter().all(|i| i.state == InstanceState::Healthy) {
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
            if let Some(prev) = newest_healthy {
                if let Some(prev_rel) = rels.iter().find(|r| r.version == prev) {
                    self.release_state(
                        app_id,
                        prev_rel,
                        ReleaseState::Superseded,
                        Some(format!("replaced by v{}", rel.version)),
                    );
                    let prev_insts = by_release.get(&prev_rel.id).cloned().unwrap_or_default();
                    self.stop_all(&prev_insts, "release superseded");
                }
            }
        }
    }

    /// A serving release: replace instances that died.
    fn keep_running(&mut self, rel: &ReleaseRow, insts: &[&InstanceRow]) {
        let Ok(manifest) = serde_json::from_value::<Manifest>(rel.manifest.clone()) else {
            return;
        };
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
            // Instances on a draining host are leaving: replacements start elsewhere, and each
            // leaving one stops only once enough replacements are healthy (no downtime).
            let leaving = |i: &&&InstanceRow| {
                self.host_state.get(&i.host_id) == Some(&HostState::Draining)
                    && i.spec.mounts.is_empty()
            };
            let live: Vec<&&InstanceRow> = of_group()
                .filter(|i| i.desired_running && !i.state.is_terminal())
                .collect();
            let staying = live.iter().filter(|i| !leaving(i)).count();
            let want = manifest.desired_count(group) as usize;
            for _ in staying..want {
                if let Err(reason) = self.place(rel, &manifest, group) {
                    tracing::warn!(release_id = %rel.id, reason = %reason, "cannot place replacement instance");
                    return;
                }
            }
            let healthy_staying = live
                .iter()
                .filter(|i| !leaving(i) && i.state == InstanceState::Healthy)
                .count();
            if healthy_staying >= want {
                let out: Vec<&InstanceRow> =
                    live.iter().filter(|i| leaving(i)).map(|i| **i).collect();
                for i in out {
                    self.stop(i, "host draining");
                }
            }
        }
    }

    fn place(
        &mut self,
        rel: &ReleaseRow,
        manifest: &Manifest,
        group: &Process,
    ) -> Result<(), String> {
        let req = Request {
            group: Group {
                app: rel.app_id.clone(),
                process: group.name.clone(),
            },
            region: Region::new(HOST_REGION),
            drivers: vec![],
            memory: manifest.vm.memory,
            cpu: MilliCpu::from_cpus(manifest.vm.cpus),
            volumes: Volumes::None,
        };
        // Records the instance on its host, so the next placement of this pass sees it.
        let host = self.capacity.place(&req).map_err(|e| e.to_string())?;
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
            mounts: manifest.mount_specs(&group.name),
            secrets,
            metrics: manifest.metrics.as_ref().map(|m| MetricsSpec {
                port: m.port,
                path: m.path.clone(),
            }),
            stop: StopSpec {
                signal: manifest.stop_signal.clone(),
                timeout_ms: manifest.stop_timeout_ms,
            },
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
