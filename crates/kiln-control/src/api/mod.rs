//! The `/v1` routes.
//!
//! Every handler: authenticate (the [`Principal`] extractor), check scope, read views or append
//! events, answer JSON. Resources of another org answer exactly like missing ones (404), so a
//! token cannot probe for names it does not own; the host and edge scopes count only on tokens of
//! the operator org. What every route shares (request ids, problems, rate limits, idempotency,
//! audit) is in [`conventions`]; every handler carries a `#[utoipa::path]` and is listed in
//! [`openapi`], which a test keeps equal to the router's routes and to docs/specs/api/openapi.yaml.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use sha2::{Digest, Sha256};

use kiln_api::{
    App, AppPage, AppStatus, Assignment, Assignments, CreateApp, CreateRelease, EventPage,
    EventRecord, EventsQuery, Host, HostPage, HostRegistration, Instance, InstancePage,
    InstanceReport, PageQuery, PortRoute, Problem, RegisterHost, Release, ReleasePage, Route,
    RouteTable, WatchQuery, IDEMPOTENCY_KEY, PROBLEM_JSON, REQUEST_ID,
};
use kiln_store::{
    AppRow, Append, ExpectedVersion, Idempotency, InstanceRow, Metadata, NewEvent, ReleaseRow,
};
use kiln_types::event::{Event, ReleaseState};
use kiln_types::{AppId, HostId, InstanceId, ReleaseId, ServiceProtocol};

use crate::auth::{Principal, Scope};
use crate::error::ApiFailure;
use crate::Control;

mod apps;
mod conventions;
mod domains;
mod edge;
mod events;
mod exec;
mod hosts;
mod logs;
mod openapi;

use apps::*;
use conventions::*;
use domains::*;
use edge::*;
use events::*;
use exec::*;
use hosts::*;
use logs::*;

pub use conventions::RateLimit;
pub(crate) use conventions::{IdempotencyCache, RateLimiter};
pub(crate) use hosts::host_view;
pub use openapi::{openapi_document, openapi_yaml};

type Ctl = State<Arc<Control>>;
type ApiResult<T> = Result<T, ApiFailure>;

pub(crate) fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/healthz", get(healthz))
        .route("/v1/whoami", get(crate::tokens_api::whoami))
        .route(
            "/v1/tokens",
            get(crate::tokens_api::list_tokens).post(crate::tokens_api::create_token),
        )
        .route(
            "/v1/tokens/{id}",
            axum::routing::delete(crate::tokens_api::revoke_token),
        )
        .route("/v1/device/code", post(crate::device::device_code))
        .route("/v1/device/token", post(crate::device::device_token))
        .route(
            "/v1/device",
            get(crate::device::device_page).post(crate::device::device_submit),
        )
        .route("/v1/apps", get(list_apps).post(create_app))
        .route("/v1/apps/{app}", get(get_app).delete(destroy_app))
        .route("/v1/apps/{app}/status", get(app_status))
        .route(
            "/v1/apps/{app}/releases",
            get(list_releases).post(create_release),
        )
        .route("/v1/apps/{app}/releases/{version}", get(get_release))
        .route("/v1/apps/{app}/instances", get(list_instances))
        .route("/v1/hosts", get(list_hosts).post(register_host))
        .route("/v1/hosts/{host}/assignments", get(assignments))
        .route(
            "/v1/hosts/{host}/instances/{instance}/report",
            post(report_instance),
        )
        .route("/v1/hosts/{host}/logs", post(ship_logs))
        .route("/v1/apps/{app}/logs", get(app_logs))
        .route("/v1/apps/{app}/exec", get(app_exec))
        .route("/v1/hosts/{host}/exec-requests", get(exec_requests))
        .route("/v1/hosts/{host}/exec/{session}", get(host_exec))
        .route("/v1/routes", get(routes))
        .route("/v1/events", get(list_events))
        .route(
            "/v1/apps/{app}/ips",
            get(crate::ips::list).post(crate::ips::allocate),
        )
        .route(
            "/v1/apps/{app}/ips/{address}",
            axum::routing::delete(crate::ips::release),
        )
        .route("/v1/hosts/{host}/heartbeat", post(crate::hosts::heartbeat))
        .route("/v1/hosts/{host}/drain", post(crate::hosts::drain))
        .route("/v1/hosts/{host}/ready", post(crate::hosts::undrain))
        .route("/v1/apps/{app}/rollback", post(rollback))
        .route("/v1/apps/{app}/scale", post(scale))
        .route("/v1/hosts/placement", get(explain_placement))
        .route("/v1/quotas", get(crate::quotas::own_quotas))
        .route(
            "/v1/orgs/{org}/quotas",
            get(crate::quotas::org_quotas).put(crate::quotas::set_org_quotas),
        )
        .route("/v1/apps/{app}/domains", get(list_domains).post(add_domain))
        .route(
            "/v1/apps/{app}/domains/{hostname}",
            get(get_domain).delete(remove_domain),
        )
        .route(
            "/v1/apps/{app}/domains/{hostname}/verify",
            post(verify_domain),
        )
        .merge(crate::secrets_api::routes())
        // Layers run bottom-up on the way in: the last added is the outermost.
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(control.clone(), audit))
        .layer(middleware::from_fn_with_state(control.clone(), idempotency))
        .layer(middleware::from_fn_with_state(control.clone(), rate_limit))
        .layer(middleware::from_fn(problems))
        .layer(middleware::from_fn(request_id))
        .with_state(control)
}

#[utoipa::path(get, path = "/v1/healthz", tag = "meta", security(()),
    responses((status = 200, description = "The API serves.", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

/// The durable idempotency of a request that appends events: its `Idempotency-Key` (if any),
/// scoped, with a hash of what the request asks for, so the store replays a retry from the log.
pub(crate) fn durable_idempotency(
    headers: &HeaderMap,
    scope: String,
    request: &[u8],
) -> Option<Idempotency> {
    headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .map(|key| Idempotency {
            scope,
            key: key.to_owned(),
            request_hash: hex::encode(Sha256::digest(request)),
        })
}

pub(crate) fn metadata(p: &Principal, headers: &HeaderMap) -> Metadata {
    Metadata {
        actor: p.actor(),
        request_id: headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        ..Default::default()
    }
}

fn app_view(c: &Control, row: AppRow) -> App {
    App {
        hostname: format!("{}.{}", row.name, c.config.app_domain),
        id: row.id,
        org_id: row.org_id,
        name: row.name,
        created_at: row.created_at,
        latest_version: row.release_count,
    }
}

fn release_view(r: ReleaseRow) -> Release {
    Release {
        id: r.id,
        app_id: r.app_id,
        version: r.version,
        image_input: r.image_input,
        image: r.image,
        state: r.state,
        reason: r.reason,
        created_at: r.created_at,
        updated_at: r.updated_at,
        secrets_version: r.secrets_version,
    }
}

fn instance_view(i: InstanceRow) -> Instance {
    Instance {
        ipv6: i.spec.network.ipv6,
        process: i.spec.process.clone(),
        id: i.id,
        release_version: i.release_version,
        host_id: i.host_id,
        state: i.state,
        reason: i.reason,
        desired_running: i.desired_running,
        updated_at: i.updated_at,
    }
}

/// The app named `name`, if it exists and belongs to the caller's org.
pub(crate) async fn owned_app(c: &Control, p: &Principal, name: &str) -> ApiResult<AppRow> {
    match c.store.app_by_name(name.to_owned()).await? {
        Some(app) if app.org_id == p.org_id && p.allows_app(&app.id) => Ok(app),
        _ => Err(ApiFailure::not_found("app", name)),
    }
}

/// Waits until the log's head passes `after` (or the wait ends); returns the head to report.
async fn wait_past(c: &Control, q: &WatchQuery) -> u64 {
    let mut rx = c.store.subscribe();
    let after = q.after.unwrap_or(0);
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(c.config.max_watch);
    if *rx.borrow_and_update() <= after && !wait.is_zero() {
        let _ = tokio::time::timeout(wait, rx.wait_for(|h| *h > after)).await;
    }
    // Read the head before the views: the state returned is at least as new as the seq reported,
    // so a watcher that polls again with this seq can never miss a change.
    let head = *rx.borrow();
    head
}

/// The operator org (the first one created): only its tokens may use the host and edge scopes.
async fn operator(c: &Control) -> ApiResult<&kiln_types::OrgId> {
    c.operator
        .get_or_try_init(|| async {
            c.store
                .read_after(0, 1)
                .await?
                .into_iter()
                .find_map(|e| match e.event {
                    Event::OrgCreated { org_id, .. } => Some(org_id),
                    _ => None,
                })
                .ok_or_else(|| {
                    ApiFailure::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not_bootstrapped",
                        "the control plane has no org yet",
                    )
                })
        })
        .await
}

/// `scope` on a token of the operator org: hosts and edges see every org's workloads, so a
/// tenant's token never acts as one, whatever its scopes.
pub(crate) async fn require_infra(c: &Control, p: &Principal, scope: Scope) -> ApiResult<()> {
    p.require(scope)?;
    if &p.org_id != operator(c).await? {
        return Err(ApiFailure::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            format!("the {scope} scope is valid only on tokens of the operator org"),
        ));
    }
    Ok(())
}

/// Default and largest page size of list endpoints.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 500;

fn page_limit(limit: Option<u32>) -> ApiResult<usize> {
    match limit {
        None => Ok(PAGE_DEFAULT),
        Some(n) if (1..=PAGE_MAX as u32).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "invalid_limit",
            format!("limit {n} is outside 1 to {PAGE_MAX}"),
        )),
    }
}

/// An opaque cursor: which list it belongs to and the sort key of the last item returned.
fn encode_cursor(list: &str, key: &str) -> String {
    format!("{list}.{}", hex::encode(key))
}

fn decode_cursor(list: &str, cursor: &str) -> ApiResult<String> {
    let bad = || {
        ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
            "the cursor is not a `next_cursor` of this list",
        )
    };
    let hexed = cursor
        .strip_prefix(list)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(bad)?;
    let bytes = hex::decode(hexed).map_err(|_| bad())?;
    String::from_utf8(bytes).map_err(|_| bad())
}

/// One page of `items` sorted by `key`, after the cursor's key.
fn paginate<T>(
    list: &str,
    mut items: Vec<T>,
    key: impl Fn(&T) -> String,
    q: &PageQuery,
) -> ApiResult<(Vec<T>, Option<String>)> {
    let limit = page_limit(q.limit)?;
    let after = q
        .cursor
        .as_deref()
        .map(|c| decode_cursor(list, c))
        .transpose()?;
    items.sort_by_key(|t| key(t));
    let mut page: Vec<T> = items
        .into_iter()
        .filter(|t| after.as_ref().is_none_or(|a| key(t) > *a))
        .take(limit + 1)
        .collect();
    let next = if page.len() > limit {
        page.truncate(limit);
        page.last().map(|t| encode_cursor(list, &key(t)))
    } else {
        None
    };
    Ok((page, next))
}
