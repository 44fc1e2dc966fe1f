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
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use sha2::{Digest, Sha256};

use kiln_api::{
    App, AppStatus, Assignment, Assignments, CreateApp, CreateRelease, HostRegistration, Instance,
    InstanceReport, PortRoute, RegisterHost, Release, Route, RouteTable, WatchQuery,
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

type Ctl = State<Arc<Control>>;
type ApiResult<T> = Result<T, ApiFailure>;

pub(crate) fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/healthz", get(|| async { "ok" }))
        .route("/v1/whoami", get(crate::tokens_api::whoami))
        .route(
            "/v1/tokens",
            get(crate::tokens_api::list_tokens).post(crate::tokens_api::create_token),
        )
        .route("/v1/tokens/{id}", delete(crate::tokens_api::revoke_token))
        .route("/v1/device/code", post(crate::device::device_code))
        .route("/v1/device/token", post(crate::device::device_token))
        .route(
            "/v1/device",
            get(crate::device::device_page).post(crate::device::device_submit),
        )
        .route("/v1/apps", get(list_apps).post(create_app))
        .route("/v1/apps/{app}/status", get(app_status))
        .route(
            "/v1/apps/{app}/releases",
            get(list_releases).post(create_release),
        )
        .route("/v1/apps/{app}/releases/{version}", get(get_release))
        .route("/v1/hosts", get(crate::hosts::list).post(register_host))
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
        .merge(crate::secrets_api::routes())
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

async fn list_apps(State(c): Ctl, p: Principal) -> ApiResult<Json<Vec<App>>> {
    p.require(Scope::Read)?;
    let rows = c.store.apps(Some(p.org_id.clone())).await?;
    Ok(Json(
        rows.into_iter()
            .filter(|r| p.allows_app(&r.id))
            .map(|r| app_view(&c, r))
            .collect(),
    ))
}

async fn create_app(
    State(c): Ctl,
    p: Principal,
    headers: HeaderMap,
    Json(body): Json<CreateApp>,
) -> ApiResult<(StatusCode, Json<App>)> {
    p.require(Scope::Deploy)?;
    if p.app_id.is_some() {
        return Err(ApiFailure::new(
            StatusCode::FORBIDDEN,
            "app_scoped_token",
            "this token is restricted to one app and cannot create apps",
        ));
    }
    if c.store.app_by_name(body.name.to_string()).await?.is_some() {
        return Err(ApiFailure::new(
            StatusCode::CONFLICT,
            "app_exists",
            format!(
                "an app named {:?} already exists; app names are unique across the platform",
                body.name.as_str()
            ),
        ));
    }
    let app_id = AppId::generate();
    let event = Event::AppCreated {
        app_id: app_id.clone(),
        org_id: p.org_id.clone(),
        name: body.name.clone(),
    };
    let res = c
        .store
        .append(Append {
            events: vec![NewEvent {
                event,
                expected: ExpectedVersion::NoStream,
            }],
            metadata: metadata(&p, &headers),
            idempotency: None,
        })
        .await;
    match res {
        Ok(_) => {}
        // Two creates raced past the check above; the view's unique name decides.
        Err(kiln_store::StoreError::ApplyView { .. }) => {
            return Err(ApiFailure::new(
                StatusCode::CONFLICT,
                "app_exists",
                format!("an app named {:?} already exists", body.name.as_str()),
            ))
        }
        Err(e) => return Err(e.into()),
    }
    let row = c
        .store
        .app_by_name(body.name.to_string())
        .await?
        .ok_or_else(|| ApiFailure::not_found("app", body.name.as_str()))?;
    tracing::info!(app_id = %app_id, app = %body.name, "app created");
    Ok((StatusCode::CREATED, Json(app_view(&c, row))))
}

async fn app_status(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
) -> ApiResult<Json<AppStatus>> {
    p.require(Scope::Read)?;
    let row = owned_app(&c, &p, &app).await?;
    let releases: Vec<Release> = c
        .store
        .releases(row.id.clone())
        .await?
        .into_iter()
        .map(release_view)
        .collect();
    let current = releases
        .iter()
        .rev()
        .find(|r| r.state == ReleaseState::Healthy)
        .cloned();
    let instances = c
        .store
        .instances_of_app(row.id.clone())
        .await?
        .into_iter()
        .filter(|i| i.state != kiln_types::InstanceState::Stopped)
        .map(instance_view)
        .collect();
    Ok(Json(AppStatus {
        app: app_view(&c, row),
        current,
        releases,
        instances,
    }))
}

async fn list_releases(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
) -> ApiResult<Json<Vec<Release>>> {
    p.require(Scope::Read)?;
    let row = owned_app(&c, &p, &app).await?;
    Ok(Json(
        c.store
            .releases(row.id)
            .await?
            .into_iter()
            .map(release_view)
            .collect(),
    ))
}

async fn get_release(
    State(c): Ctl,
    p: Principal,
    Path((app, version)): Path<(String, u64)>,
) -> ApiResult<Json<Release>> {
    p.require(Scope::Read)?;
    let row = owned_app(&c, &p, &app).await?;
    let rel = c
        .store
        .release(row.id, version)
        .await?
        .ok_or_else(|| ApiFailure::not_found("release", &format!("v{version}")))?;
    Ok(Json(release_view(rel)))
}

async fn create_release(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    headers: HeaderMap,
    Json(body): Json<CreateRelease>,
) -> ApiResult<(StatusCode, Json<Release>)> {
    p.require(Scope::Deploy)?;
    let row = owned_app(&c, &p, &app).await?;
    let file = body
        .manifest_file
        .clone()
        .unwrap_or_else(|| "kiln.toml".into());
    let manifest = kiln_manifest::parse(&file, &body.manifest).map_err(|e| ApiFailure {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        code: "invalid_manifest",
        detail: e.report().trim_end().to_owned(),
        errors: serde_json::to_value(&e.problems).ok(),
    })?;
    let image_input = body
        .image
        .clone()
        .or_else(|| manifest.image.clone())
        .ok_or_else(|| {
            ApiFailure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "missing_image",
                "no image given: set `image` in kiln.toml or pass --image",
            )
        })?;
    let reference = kiln_oci::Reference::parse(&image_input).map_err(|e| {
        ApiFailure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image_reference",
            e.to_string(),
        )
    })?;

    let idem_key = headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let request_hash = hex::encode(Sha256::digest(
        serde_json::to_vec(&(&body.image, &body.manifest)).unwrap_or_default(),
    ));
    let idempotency = idem_key.map(|key| Idempotency {
        scope: format!("release:{}", row.id),
        key,
        request_hash,
    });

    // A retry with the same key is answered by the store from the log (the events recorded the
    // first time), whatever the tag resolves to now.
    let image = c.registry.resolve(&reference).await.map_err(|e| {
        let detail = crate::error::error_chain(&e);
        match e {
            ref e2 if e2.is_not_found() => {
                ApiFailure::new(StatusCode::UNPROCESSABLE_ENTITY, "image_not_found", detail)
            }
            _ => ApiFailure::new(StatusCode::BAD_GATEWAY, "registry_error", detail),
        }
    })?;
    let manifest_json = serde_json::to_value(&manifest).unwrap_or_default();
    let port_events = allocate_ports(&c, &row.id, &manifest).await?;
    append_release(
        &c,
        &p,
        &headers,
        &app,
        NewRelease {
            image_input,
            image,
            manifest: manifest_json,
            manifest_source: body.manifest.clone(),
            extra: port_events,
            secrets_version: None,
        },
        idempotency,
    )
    .await
}

/// What a new release is made of (a deploy's, or a rollback's copy of an older release).
struct NewRelease {
    image_input: String,
    image: kiln_types::ImageRef,
    manifest: serde_json::Value,
    manifest_source: String,
    /// Events appended with `release_created`, in the same append (port allocations).
    extra: Vec<Event>,
    /// The secrets version to pin; `None`: the environment's current one.
    secrets_version: Option<u64>,
}

/// Appends `release_created` with the next version of the app (optimistic concurrency on the
/// app stream makes versions gap-free and unique) and answers the release.
async fn append_release(
    c: &Control,
    p: &Principal,
    headers: &HeaderMap,
    app: &str,
    new: NewRelease,
    idempotency: Option<Idempotency>,
) -> ApiResult<(StatusCode, Json<Release>)> {
    let row = owned_app(c, p, app).await?;
    let stream = kiln_types::event::StreamRef {
        kind: kiln_types::event::StreamType::App,
        id: row.id.to_string(),
    };
    for _ in 0..5 {
        let current = c.store.stream_version(stream.clone()).await?;
        // The release pins a secrets version: the one current now (the expectation on the app
        // stream, which secrets changes also append to, keeps the two consistent), or the one a
        // rollback restores.
        let secrets_version = match new.secrets_version {
            Some(v) => v,
            None => c
                .store
                .secret_env(row.id.clone(), kiln_types::secrets::DEFAULT_ENV.to_owned())
                .await?
                .map_or(0, |s| s.version),
        };
        let app_now = owned_app(c, p, app).await?;
        let event = Event::ReleaseCreated {
            app_id: row.id.clone(),
            release_id: ReleaseId::generate(),
            version: app_now.release_count + 1,
            image_input: new.image_input.clone(),
            image: new.image.clone(),
            manifest: new.manifest.clone(),
            manifest_source: new.manifest_source.clone(),
            secrets_version,
        };
        // Port allocations go in the same append: a release never runs with ports it does not
        // own, and the allocations view rejects the append if another app took a port meanwhile.
        let mut events = vec![NewEvent {
            event,
            expected: ExpectedVersion::Exact(current),
        }];
        events.extend(new.extra.iter().cloned().map(NewEvent::any));
        let res = c
            .store
            .append(Append {
                events,
                metadata: metadata(p, headers),
                idempotency: idempotency.clone(),
            })
            .await;
        match res {
            Ok(out) => {
                let version = match &out.events[0].event {
                    Event::ReleaseCreated { version, .. } => *version,
                    _ => app_now.release_count + 1,
                };
                let rel = c
                    .store
                    .release(row.id.clone(), version)
                    .await?
                    .ok_or_else(|| ApiFailure::not_found("release", &format!("v{version}")))?;
                tracing::info!(app = %app, version, image = %rel.image, "release created");
                return Ok((StatusCode::CREATED, Json(release_view(rel))));
            }
            Err(kiln_store::StoreError::VersionConflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiFailure::new(
        StatusCode::CONFLICT,
        "conflict",
        "too many concurrent releases of this app; retry",
    ))
}

/// `POST /v1/apps/{app}/rollback`: a new release with the image and manifest of an older one,
/// deployed (and health-gated) like any release.
async fn rollback(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    headers: HeaderMap,
    Json(body): Json<kiln_api::Rollback>,
) -> ApiResult<(StatusCode, Json<Release>)> {
    p.require(Scope::Deploy)?;
    let row = owned_app(&c, &p, &app).await?;
    let releases = c.store.releases(row.id.clone()).await?;
    let current = releases
        .iter()
        .filter(|r| r.state == ReleaseState::Healthy)
        .map(|r| r.version)
        .max();
    let target = match body.version {
        Some(v) => releases
            .iter()
            .find(|r| r.version == v)
            .ok_or_else(|| ApiFailure::not_found("release", &format!("v{v}")))?,
        // The newest release before the serving one that once served (superseded after being
        // healthy, or healthy).
        None => releases
            .iter()
            .rev()
            .find(|r| {
                Some(r.version) < current
                    && r.state == ReleaseState::Superseded
                    && r.reason
                        .as_deref()
                        .is_some_and(|why| why.starts_with("replaced by v"))
            })
            .ok_or_else(|| {
                ApiFailure::new(
                    StatusCode::CONFLICT,
                    "no_previous_release",
                    format!("{app} has no earlier release that served; name one with a version"),
                )
            })?,
    };
    if Some(target.version) == current {
        return Err(ApiFailure::new(
            StatusCode::CONFLICT,
            "already_serving",
            format!("v{} of {app} is the release serving now", target.version),
        ));
    }
    let manifest: kiln_manifest::Manifest = serde_json::from_value(target.manifest.clone())
        .map_err(|e| {
            ApiFailure::new(
                StatusCode::CONFLICT,
                "release_unreadable",
                format!("the manifest of v{} cannot be read: {e}", target.version),
            )
        })?;
    let port_events = allocate_ports(&c, &row.id, &manifest).await?;
    let idempotency = headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .map(|key| Idempotency {
            scope: format!("release:{}", row.id),
            key: key.to_owned(),
            request_hash: hex::encode(Sha256::digest(format!("rollback:{}", target.version))),
        });
    append_release(
        &c,
        &p,
        &headers,
        &app,
        NewRelease {
            image_input: format!("rollback to v{}", target.version),
            image: target.image.clone(),
            manifest: target.manifest.clone(),
            manifest_source: target.manifest_source.clone(),
            extra: port_events,
            // Restored with the rest: a release is image, manifest and secrets as one unit.
            secrets_version: Some(target.secrets_version),
        },
        idempotency,
    )
    .await
}

async fn register_host(
    State(c): Ctl,
    p: Principal,
    headers: HeaderMap,
    Json(body): Json<RegisterHost>,
) -> ApiResult<Json<HostRegistration>> {
    p.require(Scope::Host)?;
    let hosts = c.store.hosts().await?;
    let (host_id, index) = match hosts.iter().find(|h| h.name == body.name) {
        Some(h) => (h.id.clone(), h.index),
        None => (
            HostId::generate(),
            hosts.iter().map(|h| h.index).max().unwrap_or(0) + 1,
        ),
    };
    let event = Event::HostRegistered {
        host_id: host_id.clone(),
        name: body.name.clone(),
        index,
        driver: body.driver,
        cpu: body.cpu,
        memory: body.memory,
    };
    c.store
        .append(Append {
            events: vec![NewEvent::any(event)],
            metadata: metadata(&p, &headers),
            idempotency: None,
        })
        .await?;
    tracing::info!(host_id = %host_id, name = %body.name, index, "host registered");
    Ok(Json(HostRegistration { host_id, index }))
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

async fn assignments(
    State(c): Ctl,
    p: Principal,
    Path(host): Path<String>,
    Query(q): Query<WatchQuery>,
) -> ApiResult<Json<Assignments>> {
    p.require(Scope::Host)?;
    let host: HostId = host
        .parse()
        .map_err(|_| ApiFailure::not_found("host", &host))?;
    let seq = wait_past(&c, &q).await;
    let rows = c.store.instances_on_host(host).await?;
    let rows: Vec<InstanceRow> = rows
        .into_iter()
        .filter(|i| !i.state.is_terminal() || i.desired_running)
        .collect();
    let secrets_versions = crate::secrets::assigned_versions(&c, &rows).await?;
    let assignments = rows
        .into_iter()
        .map(|i| Assignment {
            secrets_version: secrets_versions
                .get(&i.id)
                .copied()
                .unwrap_or(i.spec.secrets.version),
            desired_running: i.desired_running,
            state: i.state,
            spec: i.spec,
        })
        .collect();
    Ok(Json(Assignments { seq, assignments }))
}

async fn report_instance(
    State(c): Ctl,
    p: Principal,
    headers: HeaderMap,
    Path((host, instance)): Path<(String, String)>,
    Json(report): Json<InstanceReport>,
) -> ApiResult<Json<serde_json::Value>> {
    p.require(Scope::Host)?;
    let id: InstanceId = instance
        .parse()
        .map_err(|_| ApiFailure::not_found("instance", &instance))?;
    let row = c
        .store
        .instance(id.clone())
        .await?
        .ok_or_else(|| ApiFailure::not_found("instance", &instance))?;
    if row.host_id.as_str() != host {
        return Err(ApiFailure::not_found("instance", &instance));
    }
    if row.state != report.state || row.reason != report.reason {
        let event = Event::InstanceStateChanged {
            instance_id: id,
            app_id: row.app_id,
            state: report.state,
            reason: report.reason.clone(),
        };
        c.store
            .append(Append {
                events: vec![NewEvent::any(event)],
                metadata: metadata(&p, &headers),
                idempotency: None,
            })
            .await?;
    }
    Ok(Json(serde_json::json!({})))
}

/// The `port_allocated` events a release of `app` needs: the public ports of its `tcp` services
/// that the app does not own yet. A port another app owns is a conflict.
async fn allocate_ports(
    c: &Control,
    app: &AppId,
    manifest: &kiln_manifest::Manifest,
) -> ApiResult<Vec<Event>> {
    let wanted: std::collections::BTreeSet<u16> = manifest
        .processes
        .iter()
        .flat_map(|p| &p.services)
        .filter(|s| s.protocol == ServiceProtocol::Tcp)
        .flat_map(|s| s.ports.iter().copied())
        .collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let owners: BTreeMap<u16, AppId> = c
        .store
        .allocations()
        .await?
        .into_iter()
        .filter_map(|a| match a.allocation {
            kiln_store::Allocation::SharedPort(port) => Some((port, a.app_id)),
            kiln_store::Allocation::DedicatedIpv4(_) => None,
        })
        .collect();
    let mut events = Vec::new();
    for port in wanted {
        match owners.get(&port) {
            Some(owner) if owner == app => {}
            Some(_) => {
                return Err(ApiFailure::new(
                    StatusCode::CONFLICT,
                    "port_taken",
                    format!("public port {port} of the shared addresses belongs to another app"),
                ))
            }
            None => events.push(Event::PortAllocated {
                app_id: app.clone(),
                port,
            }),
        }
    }
    Ok(events)
}

async fn routes(
    State(c): Ctl,
    p: Principal,
    Query(q): Query<WatchQuery>,
) -> ApiResult<Json<RouteTable>> {
    p.require(Scope::Edge)?;
    let seq = wait_past(&c, &q).await;
    let apps: BTreeMap<AppId, AppRow> = c
        .store
        .apps(None)
        .await?
        .into_iter()
        .map(|a| (a.id.clone(), a))
        .collect();
    let mut shared_ports: BTreeMap<u16, AppId> = BTreeMap::new();
    let mut dedicated: BTreeMap<AppId, Vec<std::net::Ipv4Addr>> = BTreeMap::new();
    for a in c.store.allocations().await? {
        match a.allocation {
            kiln_store::Allocation::SharedPort(port) => {
                shared_ports.insert(port, a.app_id);
            }
            kiln_store::Allocation::DedicatedIpv4(ip) => {
                dedicated.entry(a.app_id).or_default().push(ip)
            }
        }
    }
    let mut table: BTreeMap<String, Route> = BTreeMap::new();
    let mut ports: BTreeMap<SocketAddr, PortRoute> = BTreeMap::new();
    fn port_route<'a>(
        ports: &'a mut BTreeMap<SocketAddr, PortRoute>,
        listen: SocketAddr,
        app: &AppRow,
        svc: &kiln_types::ServiceSpec,
    ) -> &'a mut PortRoute {
        ports.entry(listen).or_insert_with(|| PortRoute {
            listen,
            app: app.name.clone(),
            protocol: svc.protocol,
            proxy_protocol: svc.proxy_protocol,
            backends: Vec::new(),
            concurrency: Some(svc.concurrency),
        })
    }
    // Traffic goes to the serving (healthy) release and to deploys that replace instances in
    // place; a blue-green deploy's new set only once all of it is healthy (the release is then
    // `healthy` and the old one `superseded`, its instances stopping).
    let mut routed: std::collections::BTreeSet<ReleaseId> = c
        .store
        .releases_in_state(ReleaseState::Healthy)
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect();
    routed.extend(
        c.store
            .releases_in_state(ReleaseState::Deploying)
            .await?
            .into_iter()
            .filter(|r| r.manifest["deploy"]["strategy"] != "bluegreen")
            .map(|r| r.id),
    );
    for inst in c.store.all_instances().await? {
        if inst.state != kiln_types::InstanceState::Healthy
            || !inst.desired_running
            || !routed.contains(&inst.release_id)
        {
            continue;
        }
        let Some(app) = apps.get(&inst.app_id) else {
            continue;
        };
        for svc in &inst.spec.services {
            let backend = SocketAddr::new(inst.spec.network.ipv6.into(), svc.internal_port);
            // A dedicated IPv4: TLS on 443 (no SNI needed) and every public port of the app.
            let public_ports: Vec<u16> = match svc.protocol {
                ServiceProtocol::Tls => vec![443],
                ServiceProtocol::Tcp => svc.ports.clone(),
            };
            for ip in dedicated.get(&inst.app_id).into_iter().flatten() {
                for port in &public_ports {
                    let listen = SocketAddr::new((*ip).into(), *port);
                    port_route(&mut ports, listen, app, svc)
                        .backends
                        .push(backend);
                }
            }
            if svc.protocol == ServiceProtocol::Tcp {
                // Shared addresses: the ports the app owns, on every address of every edge.
                for port in svc
                    .ports
                    .iter()
                    .filter(|p| shared_ports.get(p) == Some(&inst.app_id))
                {
                    for any in [
                        std::net::IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
                        std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
                    ] {
                        port_route(&mut ports, SocketAddr::new(any, *port), app, svc)
                            .backends
                            .push(backend);
                    }
                }
                continue;
            }
            let default_host = format!("{}.{}", app.name, c.config.app_domain);
            for hostname in std::iter::once(default_host).chain(svc.hostnames.iter().cloned()) {
                let route = table.entry(hostname.clone()).or_insert_with(|| Route {
                    hostname,
                    app: app.name.clone(),
                    proxy_protocol: svc.proxy_protocol,
                    backends: Vec::new(),
                    concurrency: Some(svc.concurrency),
                });
                route.backends.push(backend);
            }
        }
    }
    Ok(Json(RouteTable {
        seq,
        routes: table.into_values().collect(),
        ports: ports.into_values().collect(),
    }))
}

/// Largest log batch an agent may send at once.
const MAX_LOG_BATCH: usize = 5_000;

async fn ship_logs(
    State(c): Ctl,
    p: Principal,
    Path(host): Path<String>,
    Json(lines): Json<Vec<kiln_api::LogRecord>>,
) -> ApiResult<Json<serde_json::Value>> {
    p.require(Scope::Host)?;
    if lines.len() > MAX_LOG_BATCH {
        return Err(ApiFailure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("at most {MAX_LOG_BATCH} lines per batch"),
        ));
    }
    let host: HostId = host
        .parse()
        .map_err(|_| ApiFailure::not_found("host", &host))?;
    // A host may only ship lines of instances placed on it, attributed to their real app.
    let mine: BTreeMap<InstanceId, AppId> = c
        .store
        .instances_on_host(host)
        .await?
        .into_iter()
        .map(|i| (i.id, i.app_id))
        .collect();
    let accepted: Vec<_> = lines
        .into_iter()
        .filter(|l| mine.get(&l.instance_id) == Some(&l.app_id))
        .collect();
    c.logs.push(accepted);
    Ok(Json(serde_json::json!({})))
}

async fn app_logs(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    Query(q): Query<kiln_api::LogsQuery>,
) -> ApiResult<Response> {
    p.require(Scope::Read)?;
    let row = owned_app(&c, &p, &app).await?;
    let instance = q.instance.clone();
    let matches =
        move |r: &kiln_api::LogRecord| instance.as_ref().is_none_or(|i| *i == r.instance_id);
    let (past, mut live) = c.logs.tail(
        &row.id,
        q.tail.unwrap_or(100).min(crate::logs::PER_APP),
        &matches,
    );
    let follow = q.follow.unwrap_or(false);
    let app_id = row.id.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let line = |r: &kiln_api::LogRecord| {
            let mut v = serde_json::to_vec(r).unwrap_or_default();
            v.push(b'\n');
            v
        };
        for r in &past {
            if tx.send(Ok(line(r))).await.is_err() {
                return;
            }
        }
        if !follow {
            return;
        }
        loop {
            tokio::select! {
                msg = live.recv() => match msg {
                    Ok(r) if r.app_id == app_id && matches(&r) => {
                        if tx.send(Ok(line(&r))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(skipped = n, "log follower lagged");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(axum::body::Body::from_stream(stream))
        .unwrap_or_default())
}

async fn app_exec(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    Query(q): Query<kiln_api::ExecQuery>,
    ws: axum::extract::WebSocketUpgrade,
) -> ApiResult<Response> {
    p.require(Scope::Exec)?;
    let row = owned_app(&c, &p, &app).await?;
    let running: Vec<InstanceRow> = c
        .store
        .instances_of_app(row.id.clone())
        .await?
        .into_iter()
        .filter(|i| i.desired_running && i.state == kiln_types::InstanceState::Healthy)
        .collect();
    let target = match &q.instance {
        Some(id) => running.into_iter().find(|i| &i.id == id).ok_or_else(|| {
            ApiFailure::new(
                StatusCode::CONFLICT,
                "instance_not_running",
                format!("instance {id} of {app} is not running"),
            )
        })?,
        // The newest release's instance first: that is what a user deploying expects to reach.
        None => running
            .into_iter()
            .max_by_key(|i| (i.release_version, i.created_at))
            .ok_or_else(|| {
                ApiFailure::new(
                    StatusCode::CONFLICT,
                    "no_running_instance",
                    format!("{app} has no running instance"),
                )
            })?,
    };
    let session = format!("exs_{}", InstanceId::generate().suffix());
    let request = kiln_api::ExecRequest {
        session: session.clone(),
        instance_id: target.id.clone(),
    };
    let agent = c.exec.request(&target.host_id, request).ok_or_else(|| {
        ApiFailure::new(
            StatusCode::TOO_MANY_REQUESTS,
            "exec_busy",
            "too many exec sessions waiting for this host; retry",
        )
    })?;
    tracing::info!(app = %app, instance_id = %target.id, actor = %p.actor(), "exec session requested");
    Ok(ws.on_upgrade(move |client| async move {
        match tokio::time::timeout(crate::exec::AGENT_TIMEOUT, agent).await {
            Ok(Ok(agent)) => crate::exec::splice(client, agent).await,
            _ => {
                c.exec.cancel(&session);
                let mut client = client;
                let frame = kiln_types::frame::Frame::Error {
                    stream: 0,
                    message: "the host agent did not pick up the session".into(),
                };
                let _ = client
                    .send(axum::extract::ws::Message::Binary(frame.to_bytes().into()))
                    .await;
            }
        }
    }))
}

async fn exec_requests(
    State(c): Ctl,
    p: Principal,
    Path(host): Path<String>,
    Query(q): Query<WatchQuery>,
) -> ApiResult<Json<Vec<kiln_api::ExecRequest>>> {
    p.require(Scope::Host)?;
    let host: HostId = host
        .parse()
        .map_err(|_| ApiFailure::not_found("host", &host))?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(c.config.max_watch);
    Ok(Json(c.exec.take(&host, wait).await))
}

async fn host_exec(
    State(c): Ctl,
    p: Principal,
    Path((host, session)): Path<(String, String)>,
    ws: axum::extract::WebSocketUpgrade,
) -> ApiResult<Response> {
    p.require(Scope::Host)?;
    let _ = host;
    Ok(ws.on_upgrade(move |socket| async move {
        if !c.exec.attach(&session, socket) {
            tracing::debug!(session = %session, "agent attached to an unknown exec session");
        }
    }))
}
