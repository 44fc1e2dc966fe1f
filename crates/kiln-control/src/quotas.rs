//! Per-org quotas: how much one tenant may hold, checked where it asks for more (creating an
//! app, creating a release — deploy, rollback, scale, secrets rollout — and allocating an IPv4).
//!
//! Usage is derived from the views at the time of the request: the org's apps, the instances
//! and memory its apps' current releases want (the newest release that is deploying or healthy,
//! per app), the volumes those releases want (one per mount per instance slot), and its
//! dedicated IPv4 addresses. A refusal is 409 `quota_exceeded` naming the quota,
//! the usage, the limit and who can raise it; nothing is appended.

use axum::http::StatusCode;

use kiln_store::{Allocation, ReleaseRow};
use kiln_types::event::ReleaseState;
use kiln_types::{AppId, OrgId};

use crate::error::ApiFailure;
use crate::Control;

/// Limits per org. The defaults are the documented fair-use limits
/// (docs/specs/scheduler/quotas-and-fairness.md), the same for every org (`ControlConfig::quotas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub apps: u64,
    /// Instances wanted by the current releases of all the org's apps.
    pub instances: u64,
    /// Memory (MiB) of those instances.
    pub memory_mib: u64,
    pub ipv4_addresses: u64,
    /// Local volumes wanted by those releases: one per mount per instance slot.
    pub volumes: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            apps: 100,
            instances: 500,
            memory_mib: 512 * 1024,
            ipv4_addresses: 5,
            volumes: 100,
        }
    }
}

fn exceeded(what: &str, used: u64, asked: u64, limit: u64) -> ApiFailure {
    ApiFailure::new(
        StatusCode::CONFLICT,
        "quota_exceeded",
        format!(
            "the org's {what} quota is {limit}: it uses {used} and this asks for {asked} more; \
             free some up, or ask the platform operator to raise it"
        ),
    )
}

/// Refuses an app beyond the org's apps quota.
pub(crate) async fn check_new_app(c: &Control, org: &OrgId) -> Result<(), ApiFailure> {
    let used = c.store.apps(Some(org.clone())).await?.len() as u64;
    if used + 1 > c.config.quotas.apps {
        return Err(exceeded("apps", used, 1, c.config.quotas.apps));
    }
    Ok(())
}

/// Instances and memory a release's manifest wants.
fn wants(manifest: &serde_json::Value) -> (u64, u64) {
    match serde_json::from_value::<kiln_manifest::Manifest>(manifest.clone()) {
        Ok(m) => {
            let n = u64::from(m.total_count());
            (n, n.saturating_mul(m.vm.memory.0))
        }
        Err(_) => (0, 0),
    }
}

/// Volumes a release's manifest wants: each instance slot of a group has one per mount of the
/// group.
fn volumes_wanted(manifest: &serde_json::Value) -> u64 {
    match serde_json::from_value::<kiln_manifest::Manifest>(manifest.clone()) {
        Ok(m) => m
            .processes
            .iter()
            .map(|p| u64::from(m.desired_count(p)) * m.mount_specs(&p.name).len() as u64)
            .sum(),
        Err(_) => 0,
    }
}

/// The release that runs (or is about to) for an app: its newest deploying or healthy one.
fn current(releases: &[ReleaseRow]) -> Option<&ReleaseRow> {
    releases
        .iter()
        .filter(|r| matches!(r.state, ReleaseState::Deploying | ReleaseState::Healthy))
        .max_by_key(|r| r.version)
}

/// Refuses a release of `app` whose manifest would take the org past its instance or memory
/// quota (the app's current release is replaced by this one in the count).
pub(crate) async fn check_release(
    c: &Control,
    org: &OrgId,
    app: &AppId,
    manifest: &serde_json::Value,
) -> Result<(), ApiFailure> {
    let (mut instances, mut memory, mut volumes) = (0u64, 0u64, 0u64);
    for a in c.store.apps(Some(org.clone())).await? {
        if &a.id == app {
            continue;
        }
        if let Some(r) = current(&c.store.releases(a.id.clone()).await?) {
            let (n, m) = wants(&r.manifest);
            instances += n;
            memory += m;
            volumes += volumes_wanted(&r.manifest);
        }
    }
    let (n, m) = wants(manifest);
    let q = c.config.quotas;
    if instances + n > q.instances {
        return Err(exceeded("instances", instances, n, q.instances));
    }
    if memory + m > q.memory_mib {
        return Err(exceeded("memory (MiB)", memory, m, q.memory_mib));
    }
    let v = volumes_wanted(manifest);
    if volumes + v > q.volumes {
        return Err(exceeded("volumes", volumes, v, q.volumes));
    }
    Ok(())
}

/// Refuses a dedicated IPv4 beyond the org's quota.
pub(crate) async fn check_ipv4(c: &Control, org: &OrgId) -> Result<(), ApiFailure> {
    let apps: std::collections::BTreeSet<AppId> = c
        .store
        .apps(Some(org.clone()))
        .await?
        .into_iter()
        .map(|a| a.id)
        .collect();
    let used = c
        .store
        .allocations()
        .await?
        .into_iter()
        .filter(|a| {
            apps.contains(&a.app_id) && matches!(a.allocation, Allocation::DedicatedIpv4(_))
        })
        .count() as u64;
    if used + 1 > c.config.quotas.ipv4_addresses {
        return Err(exceeded(
            "dedicated IPv4 addresses",
            used,
            1,
            c.config.quotas.ipv4_addresses,
        ));
    }
    Ok(())
}
