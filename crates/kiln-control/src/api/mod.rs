//! The `/v1` routes.
//!
//! Every handler: authenticate (the [`Principal`] extractor), check scope, read views or append
//! events, answer JSON. Resources of another org answer exactly like missing ones (404), so a
//! token cannot probe for names it does not own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use sha2::{Digest, Sha256};

use kiln_api::{
    App, AppStatus, Assignment, Assignments, CreateApp, CreateRelease, HostRegistration, Instance,
    InstanceReport, PortRoute, RegisterHost, Release, Route, RouteTable, WatchQuery, WhoAmI,
    IDEMPOTENCY_KEY, REQUEST_ID,
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
mod edge;
mod exec;
mod hosts;
mod logs;

use apps::*;
use edge::*;
use exec::*;
use hosts::*;
use logs::*;

type Ctl = State<Arc<Control>>;
type ApiResult<T> = Result<T, ApiFailure>;

pub(crate) fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/healthz", get(|| async { "ok" }))
        .route("/v1/whoami", get(whoami))
        .route("/v1/apps", get(list_apps).post(create_app))
        .route("/v1/apps/{app}/status", get(app_status))
        .route(
            "/v1/apps/{app}/releases",
            get(list_releases).post(create_release),
        )
        .route("/v1/apps/{app}/releases/{version}", get(get_release))
        .route("/v1/hosts", post(register_host))
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
        .layer(middleware::from_fn(request_id))
        .with_state(control)
}

/// Gives every response an `x-request-id` (the caller's, if it sent a sane one).
async fn request_id(req: Request<axum::body::Body>, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req_{}", kiln_types::InstanceId::generate().suffix()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

fn metadata(p: &Principal, headers: &HeaderMap) -> Metadata {
    Metadata {
        actor: p.actor(),
        request_id: headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        ..Default::default()
    }
}

async fn whoami(p: Principal) -> Json<WhoAmI> {
    Json(WhoAmI {
        org_id: p.org_id,
        token_name: p.token_name,
        scopes: p.scopes,
    })
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
async fn owned_app(c: &Control, p: &Principal, name: &str) -> ApiResult<AppRow> {
    match c.store.app_by_name(name.to_owned()).await? {
        Some(app) if app.org_id == p.org_id => Ok(app),
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
