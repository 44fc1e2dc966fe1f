//! Apps and releases.

use super::*;

#[utoipa::path(get, path = "/v1/apps", tag = "apps", params(PageQuery),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "Apps of the caller's org, by name.", body = AppPage)))]
pub(super) async fn list_apps(
    State(c): Ctl,
    p: Principal,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<AppPage>> {
    p.require(Scope::Read)?;
    let rows: Vec<AppRow> = c
        .store
        .apps(Some(p.org_id.clone()))
        .await?
        .into_iter()
        .filter(|r| p.allows_app(&r.id))
        .collect();
    let (rows, next_cursor) = paginate("apps", rows, |r| r.name.to_string(), &q)?;
    Ok(Json(AppPage {
        items: rows.into_iter().map(|r| app_view(&c, r)).collect(),
        next_cursor,
    }))
}

/// The app's ETag: its latest release version, which `If-Match` on a new release checks.
fn app_etag(row: &AppRow) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{}\"", row.release_count))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

#[utoipa::path(get, path = "/v1/apps/{app}", tag = "apps",
    params(("app" = String, Path, description = "App name")),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "The app; `ETag` is its latest release version.", body = App,
        headers(("etag" = String, description = "`\"<latest_version>\"`, for `If-Match` on a new release")))))]
pub(super) async fn get_app(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
) -> ApiResult<([(axum::http::HeaderName, HeaderValue); 1], Json<App>)> {
    p.require(Scope::Read)?;
    let row = owned_app(&c, &p, &app).await?;
    Ok((
        [(axum::http::header::ETAG, app_etag(&row))],
        Json(app_view(&c, row)),
    ))
}

#[utoipa::path(get, path = "/v1/apps/{app}/instances", tag = "apps",
    params(("app" = String, Path, description = "App name"), PageQuery),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "Every instance of the app (stopped ones too), by id.", body = InstancePage)))]
pub(super) async fn list_instances(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<InstancePage>> {
    p.require(Scope::Read)?;
    let row = owned_app(&c, &p, &app).await?;
    let rows = c.store.instances_of_app(row.id).await?;
    let (rows, next_cursor) = paginate("instances", rows, |i| i.id.to_string(), &q)?;
    Ok(Json(InstancePage {
        items: rows.into_iter().map(instance_view).collect(),
        next_cursor,
    }))
}

#[utoipa::path(post, path = "/v1/apps", tag = "apps", request_body = CreateApp,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    security(("bearer" = ["deploy"])),
    responses((status = 201, description = "Created. 409 `app_exists`: names are platform-wide.", body = App)))]
pub(super) async fn create_app(
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
    crate::quotas::check_new_app(&c, &p.org_id).await?;
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

/// `DELETE /v1/apps/{app}?confirm=NAME`: the app's name again, so that no stray request destroys
/// an app.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DestroyQuery {
    /// The app's name, repeated.
    #[serde(default)]
    confirm: Option<String>,
}

#[utoipa::path(delete, path = "/v1/apps/{app}", tag = "apps",
    params(("app" = String, Path, description = "App name"), DestroyQuery),
    security(("bearer" = ["admin"])),
    responses((status = 204, description = "Destroyed: its instances stop, its releases, secrets and addresses are dropped, its name is free. 422 `confirmation_required` without `confirm` equal to the name.")))]
pub(super) async fn destroy_app(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    Query(q): Query<DestroyQuery>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    p.require(Scope::Admin)?;
    let row = owned_app(&c, &p, &app).await?;
    if q.confirm.as_deref() != Some(row.name.as_str()) {
        return Err(ApiFailure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "confirmation_required",
            format!("destroying {app} cannot be undone: repeat its name as ?confirm={app}"),
        ));
    }
    // Its volumes go with it (their hosts' agents delete the files once no instance holds them).
    let mut events: Vec<NewEvent> = c
        .store
        .volumes()
        .await?
        .into_iter()
        .filter(|v| v.app_id == row.id && v.deleted_at.is_none())
        .map(|v| {
            NewEvent::any(Event::VolumeDeleted {
                volume_id: v.id,
                app_id: v.app_id,
                host_id: v.host_id,
            })
        })
        .collect();
    events.push(NewEvent::any(Event::AppDestroyed {
        app_id: row.id.clone(),
        org_id: row.org_id.clone(),
        name: row.name.clone(),
    }));
    c.store
        .append(Append {
            events,
            metadata: metadata(&p, &headers),
            idempotency: None,
        })
        .await?;
    tracing::info!(app_id = %row.id, "app destroyed");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/apps/{app}/status", tag = "apps",
    params(("app" = String, Path, description = "App name")),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "Releases and live instances.", body = AppStatus)))]
pub(super) async fn app_status(
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

#[utoipa::path(get, path = "/v1/apps/{app}/releases", tag = "apps",
    params(("app" = String, Path, description = "App name"), PageQuery),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "Releases, oldest first.", body = ReleasePage)))]
pub(super) async fn list_releases(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<ReleasePage>> {
    p.require(Scope::Read)?;
    let row = owned_app(&c, &p, &app).await?;
    let rows = c.store.releases(row.id).await?;
    let (rows, next_cursor) = paginate("releases", rows, |r| format!("{:020}", r.version), &q)?;
    Ok(Json(ReleasePage {
        items: rows.into_iter().map(release_view).collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/apps/{app}/releases/{version}", tag = "apps",
    params(("app" = String, Path, description = "App name"), ("version" = u64, Path, description = "Release version")),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "The release.", body = Release)))]
pub(super) async fn get_release(
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

#[utoipa::path(post, path = "/v1/apps/{app}/releases", tag = "apps", request_body = CreateRelease,
    params(("app" = String, Path, description = "App name"),
        ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer (durably, per app)"),
        ("If-Match" = Option<String>, Header, description = "The app's ETag (`\"<latest_version>\"`): 412 `precondition_failed` if another release came first")),
    security(("bearer" = ["deploy"])),
    responses((status = 201, description = "The release; the reconciler deploys it.", body = Release)))]
pub(super) async fn create_release(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    headers: HeaderMap,
    Json(body): Json<CreateRelease>,
) -> ApiResult<(StatusCode, Json<Release>)> {
    p.require(Scope::Deploy)?;
    let row = owned_app(&c, &p, &app).await?;
    // Fail fast; checked again against the version the append expects.
    check_if_match(&headers, &row)?;
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

    let idempotency = durable_idempotency(
        &headers,
        format!("release:{}", row.id),
        &serde_json::to_vec(&(&body.image, &body.manifest)).unwrap_or_default(),
    );

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
    crate::quotas::check_release(c, &p.org_id, &row.id, &new.manifest).await?;
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
        check_if_match(headers, &app_now)?;
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
#[utoipa::path(post, path = "/v1/apps/{app}/rollback", tag = "apps", request_body = kiln_api::Rollback,
    params(("app" = String, Path, description = "App name"), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    security(("bearer" = ["deploy"])),
    responses((status = 201, description = "A new release with the image, manifest and secrets version of an earlier one.", body = Release)))]
pub(super) async fn rollback(
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
    let idempotency = durable_idempotency(
        &headers,
        format!("release:{}", row.id),
        format!("rollback:{}", target.version).as_bytes(),
    );
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

/// The `port_allocated` events a release of `app` needs: the public ports of its `tcp` services
/// that the app does not own yet. A port another app owns is a conflict.
pub(super) async fn allocate_ports(
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

/// `If-Match` on a new release: the app's latest version must still be the one the caller saw.
fn check_if_match(headers: &HeaderMap, app: &AppRow) -> ApiResult<()> {
    let Some(want) = headers.get(axum::http::header::IF_MATCH) else {
        return Ok(());
    };
    let want = want.to_str().unwrap_or("").trim();
    if want == "*" || want.as_bytes() == app_etag(app).as_bytes() {
        return Ok(());
    }
    Err(ApiFailure::new(
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
        format!(
            "If-Match {want} does not match the app's ETag \"{}\" (its latest release); \
             read the app again",
            app.release_count
        ),
    ))
}

/// Largest instance count per region `kiln scale` accepts (a fair-use bound, not capacity).
const MAX_SCALE_COUNT: u32 = 1000;

#[utoipa::path(post, path = "/v1/apps/{app}/scale", tag = "apps", request_body = kiln_api::ScaleRequest,
    params(("app" = String, Path, description = "App name"),
        ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    security(("bearer" = ["deploy"])),
    responses((status = 201, description = "A new release of the serving one with the new count or VM size; deployed like any release.", body = Release)))]
pub(super) async fn scale(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    headers: HeaderMap,
    Json(body): Json<kiln_api::ScaleRequest>,
) -> ApiResult<(StatusCode, Json<Release>)> {
    p.require(Scope::Deploy)?;
    let row = owned_app(&c, &p, &app).await?;
    let invalid =
        |detail: String| ApiFailure::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_scale", detail);
    if body.count.is_none() && body.cpus.is_none() && body.memory_mib.is_none() {
        return Err(invalid(
            "nothing to change: give count, cpus or memory_mib".into(),
        ));
    }
    if body.count.is_some_and(|n| n > MAX_SCALE_COUNT) {
        return Err(invalid(format!(
            "count must be at most {MAX_SCALE_COUNT} instances per region"
        )));
    }
    if body.cpus.is_some_and(|n| !(1..=64).contains(&n)) {
        return Err(invalid("cpus must be between 1 and 64".into()));
    }
    if body
        .memory_mib
        .is_some_and(|m| !(64..=262_144).contains(&m))
    {
        return Err(invalid("memory_mib must be between 64 and 262144".into()));
    }
    let releases = c.store.releases(row.id.clone()).await?;
    let Some(serving) = releases
        .iter()
        .filter(|r| r.state == ReleaseState::Healthy)
        .max_by_key(|r| r.version)
    else {
        return Err(ApiFailure::new(
            StatusCode::CONFLICT,
            "no_serving_release",
            format!("{app} has no serving release to scale; deploy one first"),
        ));
    };
    let mut manifest: kiln_manifest::Manifest = serde_json::from_value(serving.manifest.clone())
        .map_err(|e| {
            ApiFailure::new(
                StatusCode::CONFLICT,
                "release_unreadable",
                format!("the manifest of v{} cannot be read: {e}", serving.version),
            )
        })?;
    let mut changed = Vec::new();
    if body.region.is_some() && body.count.is_none() {
        return Err(invalid("region applies to count: give count too".into()));
    }
    if let Some(region) = &body.region {
        if !manifest.regions.contains(region) {
            return Err(invalid(format!(
                "{app} does not run in region {region:?}; its regions are {} (add the region to `regions` in kiln.toml and deploy)",
                manifest.regions.join(", ")
            )));
        }
    }
    if let Some(count) = body.count {
        let mut matched = false;
        for group in manifest.processes.iter_mut() {
            if body.process.as_deref().is_none_or(|p| p == group.name) {
                match &body.region {
                    Some(region) => {
                        group.scale.regions.insert(region.clone(), count);
                    }
                    None => {
                        group.scale.count = count;
                        group.scale.regions.clear();
                    }
                }
                group.scale.max = group.scale.max.max(count);
                group.scale.min = group.scale.min.min(count);
                matched = true;
            }
        }
        if !matched {
            let names: Vec<&str> = manifest.processes.iter().map(|g| g.name.as_str()).collect();
            return Err(invalid(format!(
                "no process group {:?}; the release has: {}",
                body.process.as_deref().unwrap_or(""),
                names.join(", ")
            )));
        }
        let mut what = format!("count={count}");
        if let Some(p) = &body.process {
            what.push_str(&format!(" process={p}"));
        }
        if let Some(r) = &body.region {
            what.push_str(&format!(" region={r}"));
        }
        changed.push(what);
    }
    if let Some(cpus) = body.cpus {
        manifest.vm.cpus = cpus;
        changed.push(format!("cpus={cpus}"));
    }
    if let Some(m) = body.memory_mib {
        manifest.vm.memory = kiln_types::MiB(m);
        changed.push(format!("memory_mib={m}"));
    }
    let idempotency = durable_idempotency(
        &headers,
        format!("release:{}", row.id),
        &serde_json::to_vec(&body).unwrap_or_default(),
    );
    let what = changed.join(" ");
    append_release(
        &c,
        &p,
        &headers,
        &app,
        NewRelease {
            image_input: format!("scale of v{}: {what}", serving.version),
            image: serving.image.clone(),
            manifest: serde_json::to_value(&manifest).unwrap_or_default(),
            // The text as the user wrote it, with what `kiln scale` changed on top.
            manifest_source: format!(
                "# kiln scale on v{}: {what}\n{}",
                serving.version, serving.manifest_source
            ),
            extra: Vec::new(),
            secrets_version: Some(serving.secrets_version),
        },
        idempotency,
    )
    .await
}
