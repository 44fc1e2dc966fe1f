//! Per-org quotas: how much one tenant may hold, checked where it asks for more (creating an
//! app, creating a release — deploy, rollback, scale, secrets rollout — and allocating an IPv4).
//!
//! Usage is derived from the views at the time of the request: the org's apps, the instances
//! and memory its apps' current releases want (the newest release that is deploying or healthy,
//! per app), the volumes those releases want (one per mount per instance slot), and its
//! dedicated IPv4 addresses. A refusal is 409 `quota_exceeded` naming the quota,
//! the usage, the limit and who can raise it; nothing is appended.
//!
//! Limits are the platform's defaults (`ControlConfig::quotas`) unless the operator set others for
//! the org (`org_quotas_set`, `PUT /v1/orgs/{org}/quotas`, `kiln quotas set`); `GET /v1/quotas`
//! shows an org its limits and usage.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;

use kiln_api::{OrgQuotas, QuotaLine};
use kiln_store::{Allocation, AppRow, Append, NewEvent, OrgRow, ReleaseRow};
use kiln_types::event::{Event, QuotaOverrides, ReleaseState};
use kiln_types::{AppId, OrgId};

use crate::api::{metadata, require_infra};
use crate::auth::{Principal, Scope};
use crate::error::ApiFailure;
use crate::Control;

type ApiResult<T> = Result<T, ApiFailure>;

/// Limits per org. The defaults are the documented fair-use limits
/// (docs/specs/scheduler/quotas-and-fairness.md), the same for every org (`ControlConfig::quotas`)
/// unless the operator overrides them for one.
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

impl Quotas {
    /// These defaults with an org's overrides on top.
    pub fn with(self, o: &QuotaOverrides) -> Quotas {
        Quotas {
            apps: o.apps.unwrap_or(self.apps),
            instances: o.instances.unwrap_or(self.instances),
            memory_mib: o.memory_mib.unwrap_or(self.memory_mib),
            volumes: o.volumes.unwrap_or(self.volumes),
            ipv4_addresses: o.ipv4_addresses.unwrap_or(self.ipv4_addresses),
        }
    }
}

/// The limits that apply to `org`.
async fn limits(c: &Control, org: &OrgId) -> Result<Quotas, ApiFailure> {
    let overrides = c
        .store
        .org(org.clone())
        .await?
        .map(|o| o.quotas)
        .unwrap_or_default();
    Ok(c.config.quotas.with(&overrides))
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

/// What releases want: instances, their memory, and volumes (one per mount per instance slot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Wants {
    instances: u64,
    memory_mib: u64,
    volumes: u64,
}

impl std::ops::AddAssign for Wants {
    fn add_assign(&mut self, o: Wants) {
        self.instances += o.instances;
        self.memory_mib += o.memory_mib;
        self.volumes += o.volumes;
    }
}

/// What a release's manifest wants (nothing, for one that cannot be read).
fn wants(manifest: &serde_json::Value) -> Wants {
    let Ok(m) = serde_json::from_value::<kiln_manifest::Manifest>(manifest.clone()) else {
        return Wants::default();
    };
    let instances = u64::from(m.total_count());
    Wants {
        instances,
        memory_mib: instances.saturating_mul(m.vm.memory.0),
        volumes: m
            .processes
            .iter()
            .map(|p| u64::from(m.desired_count(p)) * m.mount_specs(&p.name).len() as u64)
            .sum(),
    }
}

/// The release that runs (or is about to) for an app: its newest deploying or healthy one.
fn current(releases: &[ReleaseRow]) -> Option<&ReleaseRow> {
    releases
        .iter()
        .filter(|r| matches!(r.state, ReleaseState::Deploying | ReleaseState::Healthy))
        .max_by_key(|r| r.version)
}

/// What the current releases of `apps` want, leaving out `except`'s.
async fn releases_want(
    c: &Control,
    apps: &[AppRow],
    except: Option<&AppId>,
) -> Result<Wants, ApiFailure> {
    let mut w = Wants::default();
    for a in apps.iter().filter(|a| Some(&a.id) != except) {
        if let Some(r) = current(&c.store.releases(a.id.clone()).await?) {
            w += wants(&r.manifest);
        }
    }
    Ok(w)
}

/// The dedicated IPv4 addresses `apps` hold.
async fn ipv4_used(c: &Control, apps: &[AppRow]) -> Result<u64, ApiFailure> {
    let ids: std::collections::BTreeSet<&AppId> = apps.iter().map(|a| &a.id).collect();
    Ok(c.store
        .allocations()
        .await?
        .into_iter()
        .filter(|a| ids.contains(&a.app_id) && matches!(a.allocation, Allocation::DedicatedIpv4(_)))
        .count() as u64)
}

/// Refuses an app beyond the org's apps quota.
pub(crate) async fn check_new_app(c: &Control, org: &OrgId) -> Result<(), ApiFailure> {
    let used = c.store.apps(Some(org.clone())).await?.len() as u64;
    let limit = limits(c, org).await?.apps;
    if used + 1 > limit {
        return Err(exceeded("apps", used, 1, limit));
    }
    Ok(())
}

/// Refuses a release of `app` whose manifest would take the org past its instance, memory or
/// volume quota (the app's current release is replaced by this one in the count).
pub(crate) async fn check_release(
    c: &Control,
    org: &OrgId,
    app: &AppId,
    manifest: &serde_json::Value,
) -> Result<(), ApiFailure> {
    let apps = c.store.apps(Some(org.clone())).await?;
    let used = releases_want(c, &apps, Some(app)).await?;
    let asked = wants(manifest);
    let q = limits(c, org).await?;
    if used.instances + asked.instances > q.instances {
        return Err(exceeded(
            "instances",
            used.instances,
            asked.instances,
            q.instances,
        ));
    }
    if used.memory_mib + asked.memory_mib > q.memory_mib {
        return Err(exceeded(
            "memory (MiB)",
            used.memory_mib,
            asked.memory_mib,
            q.memory_mib,
        ));
    }
    if used.volumes + asked.volumes > q.volumes {
        return Err(exceeded("volumes", used.volumes, asked.volumes, q.volumes));
    }
    Ok(())
}

/// Refuses a dedicated IPv4 beyond the org's quota.
pub(crate) async fn check_ipv4(c: &Control, org: &OrgId) -> Result<(), ApiFailure> {
    let apps = c.store.apps(Some(org.clone())).await?;
    let used = ipv4_used(c, &apps).await?;
    let limit = limits(c, org).await?.ipv4_addresses;
    if used + 1 > limit {
        return Err(exceeded("dedicated IPv4 addresses", used, 1, limit));
    }
    Ok(())
}

fn report(org: &OrgRow, q: Quotas, apps: u64, w: Wants, ipv4: u64) -> OrgQuotas {
    let o = &org.quotas;
    let line = |name: &str, limit: u64, used: Option<u64>, set: Option<u64>| QuotaLine {
        name: name.to_owned(),
        limit,
        used,
        overridden: set.is_some(),
    };
    OrgQuotas {
        org: org.name.clone(),
        quotas: vec![
            line("apps", q.apps, Some(apps), o.apps),
            line("instances", q.instances, Some(w.instances), o.instances),
            line("memory_mib", q.memory_mib, Some(w.memory_mib), o.memory_mib),
            line("volumes", q.volumes, Some(w.volumes), o.volumes),
            line(
                "ipv4_addresses",
                q.ipv4_addresses,
                Some(ipv4),
                o.ipv4_addresses,
            ),
        ],
        overrides: *o,
    }
}

async fn org_report(c: &Control, org: &OrgRow) -> ApiResult<OrgQuotas> {
    let q = c.config.quotas.with(&org.quotas);
    let apps = c.store.apps(Some(org.id.clone())).await?;
    let w = releases_want(c, &apps, None).await?;
    let ipv4 = ipv4_used(c, &apps).await?;
    Ok(report(org, q, apps.len() as u64, w, ipv4))
}

/// An org by name or id, for the operator's routes; anything else answers 404.
async fn org_named(c: &Control, org: &str) -> ApiResult<OrgRow> {
    if let Ok(id) = org.parse::<OrgId>() {
        if let Some(row) = c.store.org(id).await? {
            return Ok(row);
        }
    }
    c.store
        .org_by_name(org.to_owned())
        .await?
        .ok_or_else(|| ApiFailure::not_found("org", org))
}

#[utoipa::path(get, path = "/v1/quotas", tag = "orgs",
    security(("bearer" = ["read"])),
    responses((status = 200, description = "The caller's org: each quota's limit and what the org uses of it.", body = OrgQuotas)))]
pub(crate) async fn own_quotas(
    State(c): State<std::sync::Arc<Control>>,
    p: Principal,
) -> ApiResult<Json<OrgQuotas>> {
    p.require(Scope::Read)?;
    let org = c
        .store
        .org(p.org_id.clone())
        .await?
        .ok_or_else(|| ApiFailure::not_found("org", p.org_id.as_str()))?;
    Ok(Json(org_report(&c, &org).await?))
}

#[utoipa::path(get, path = "/v1/orgs/{org}/quotas", tag = "orgs",
    params(("org" = String, Path, description = "Org name or id")),
    security(("bearer" = ["admin"])),
    responses((status = 200, description = "Any org's quotas and usage. Operator org only.", body = OrgQuotas)))]
pub(crate) async fn org_quotas(
    State(c): State<std::sync::Arc<Control>>,
    p: Principal,
    Path(org): Path<String>,
) -> ApiResult<Json<OrgQuotas>> {
    require_infra(&c, &p, Scope::Admin).await?;
    let row = org_named(&c, &org).await?;
    Ok(Json(org_report(&c, &row).await?))
}

/// Largest limit an override may set (the views store integers as signed 64-bit).
const MAX_LIMIT: u64 = 1 << 40;

#[utoipa::path(put, path = "/v1/orgs/{org}/quotas", tag = "orgs", request_body = QuotaOverrides,
    params(("org" = String, Path, description = "Org name or id")),
    security(("bearer" = ["admin"])),
    responses((status = 200, description = "The org's overrides replaced (a limit left out is the platform default again). Operator org only.", body = OrgQuotas)))]
pub(crate) async fn set_org_quotas(
    State(c): State<std::sync::Arc<Control>>,
    p: Principal,
    Path(org): Path<String>,
    headers: HeaderMap,
    Json(body): Json<QuotaOverrides>,
) -> ApiResult<Json<OrgQuotas>> {
    require_infra(&c, &p, Scope::Admin).await?;
    let row = org_named(&c, &org).await?;
    for (name, v) in [
        ("apps", body.apps),
        ("instances", body.instances),
        ("memory_mib", body.memory_mib),
        ("volumes", body.volumes),
        ("ipv4_addresses", body.ipv4_addresses),
    ] {
        if v.is_some_and(|n| n > MAX_LIMIT) {
            return Err(ApiFailure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_quota",
                format!("{name} must be at most {MAX_LIMIT}"),
            ));
        }
    }
    c.store
        .append(Append {
            events: vec![NewEvent::any(Event::OrgQuotasSet {
                org_id: row.id.clone(),
                quotas: body,
            })],
            metadata: metadata(&p, &headers),
            idempotency: None,
        })
        .await?;
    tracing::info!(org_id = %row.id, "org quotas set");
    let row = OrgRow {
        quotas: body,
        ..row
    };
    Ok(Json(org_report(&c, &row).await?))
}
