//! Host agents: registration, assignments, instance reports.

use super::*;

#[utoipa::path(get, path = "/v1/hosts", tag = "hosts", params(PageQuery),
    security(("bearer" = ["host"])),
    responses((status = 200, description = "Registered hosts, by name. Operator org only.", body = HostPage)))]
pub(super) async fn list_hosts(
    State(c): Ctl,
    p: Principal,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<HostPage>> {
    require_infra(&c, &p, Scope::Host).await?;
    let rows = c.store.hosts().await?;
    let (rows, next_cursor) = paginate("hosts", rows, |h| h.name.clone(), &q)?;
    Ok(Json(HostPage {
        items: rows.into_iter().map(host_view).collect(),
        next_cursor,
    }))
}

/// Bounds of a host's reported capacity: past them the numbers are garbage, and the views store
/// them as signed 64-bit integers.
const MAX_HOST_CPU: u32 = 100_000_000;
const MAX_HOST_MEMORY_MIB: u64 = 1 << 32;

fn check_registration(body: &RegisterHost) -> ApiResult<()> {
    let bad =
        |detail: String| ApiFailure::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_host", detail);
    if body.name.is_empty()
        || body.name.len() > 253
        || !body.name.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad(
            "host names are 1 to 253 visible ASCII characters".into()
        ));
    }
    if body.cpu.0 == 0 || body.cpu.0 > MAX_HOST_CPU {
        return Err(bad(format!("cpu must be 1 to {MAX_HOST_CPU} millicpu")));
    }
    if body.memory.0 == 0 || body.memory.0 > MAX_HOST_MEMORY_MIB {
        return Err(bad(format!(
            "memory must be 1 to {MAX_HOST_MEMORY_MIB} MiB"
        )));
    }
    if let Some(region) = &body.region {
        kiln_types::name::check_dns_label(region, 63)
            .map_err(|e| bad(format!("region {region:?}: {e}")))?;
    }
    Ok(())
}

/// A registered host, by id; anything else answers 404.
pub(super) async fn known_host(c: &Control, host: &str) -> ApiResult<HostId> {
    let id: HostId = host
        .parse()
        .map_err(|_| ApiFailure::not_found("host", host))?;
    if c.store.hosts().await?.iter().any(|h| h.id == id) {
        Ok(id)
    } else {
        Err(ApiFailure::not_found("host", host))
    }
}

#[utoipa::path(post, path = "/v1/hosts", tag = "hosts", request_body = RegisterHost,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    security(("bearer" = ["host"])),
    responses((status = 200, description = "Registered (again, for a known name).", body = HostRegistration)))]
pub(super) async fn register_host(
    State(c): Ctl,
    p: Principal,
    headers: HeaderMap,
    Json(body): Json<RegisterHost>,
) -> ApiResult<Json<HostRegistration>> {
    require_infra(&c, &p, Scope::Host).await?;
    check_registration(&body)?;
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
        region: body
            .region
            .clone()
            .unwrap_or_else(|| kiln_types::event::LOCAL_REGION.to_owned()),
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

#[utoipa::path(get, path = "/v1/hosts/{host}/assignments", tag = "hosts",
    params(("host" = String, Path, description = "Host id"), WatchQuery),
    security(("bearer" = ["host"])),
    responses((status = 200, description = "The host's workloads as of `seq` (long-poll).", body = Assignments)))]
pub(super) async fn assignments(
    State(c): Ctl,
    p: Principal,
    Path(host): Path<String>,
    Query(q): Query<WatchQuery>,
) -> ApiResult<Json<Assignments>> {
    require_infra(&c, &p, Scope::Host).await?;
    let host = known_host(&c, &host).await?;
    let seq = wait_past(&c, &q).await;
    let deleted_volumes = c
        .store
        .deleted_volumes_on_host(&host)
        .await?
        .into_iter()
        .map(|v| v.id)
        .collect();
    let rows: Vec<InstanceRow> = c
        .store
        .instances_on_host(host)
        .await?
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
    Ok(Json(Assignments {
        seq,
        assignments,
        deleted_volumes,
    }))
}

#[utoipa::path(post, path = "/v1/hosts/{host}/instances/{instance}/report", tag = "hosts",
    request_body = InstanceReport,
    params(("host" = String, Path, description = "Host id"), ("instance" = String, Path, description = "Instance id")),
    security(("bearer" = ["host"])),
    responses((status = 200, description = "Recorded (nothing is appended when nothing changed).", body = Object)))]
pub(super) async fn report_instance(
    State(c): Ctl,
    p: Principal,
    headers: HeaderMap,
    Path((host, instance)): Path<(String, String)>,
    Json(report): Json<InstanceReport>,
) -> ApiResult<Json<serde_json::Value>> {
    require_infra(&c, &p, Scope::Host).await?;
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

#[utoipa::path(get, path = "/v1/hosts/placement", tag = "hosts",
    params(("app" = String, Query, description = "App name"),
        ("process" = Option<String>, Query, description = "Process group (default: the first)"),
        ("region" = Option<String>, Query, description = "Region (default: the app's primary region)")),
    security(("bearer" = ["host"])),
    responses((status = 200, description = "Why each host would or would not get the app's next instance. Operator org only.", body = kiln_api::PlacementExplanation)))]
pub(super) async fn explain_placement(
    State(c): Ctl,
    p: Principal,
    Query(q): Query<kiln_api::PlacementQuery>,
) -> ApiResult<Json<kiln_api::PlacementExplanation>> {
    require_infra(&c, &p, Scope::Host).await?;
    if q.app.is_empty() {
        return Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "give the app: ?app=NAME",
        ));
    }
    let app = c
        .store
        .app_by_name(q.app.clone())
        .await?
        .ok_or_else(|| ApiFailure::not_found("app", &q.app))?;
    let e = crate::reconciler::explain_placement(
        &c,
        &app.id,
        q.process.as_deref(),
        q.region.as_deref(),
    )
    .await
    .map_err(|e| {
        ApiFailure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            crate::error::error_chain(&e),
        )
    })?
    .ok_or_else(|| {
        ApiFailure::new(
            StatusCode::CONFLICT,
            "nothing_to_place",
            format!(
                "{} has no deploying or serving release{}",
                q.app,
                q.process
                    .as_deref()
                    .map(|p| format!(" with a process group {p:?}"))
                    .unwrap_or_default()
            ),
        )
    })?;
    Ok(Json(kiln_api::PlacementExplanation {
        chosen: e.outcome.as_ref().ok().cloned(),
        no_fit: e.outcome.as_ref().err().map(|n| n.to_string()),
        explanation: e.to_string(),
    }))
}

/// A host as the API shows it.
pub(crate) fn host_view(h: kiln_store::HostRow) -> Host {
    Host {
        id: h.id,
        name: h.name,
        index: h.index,
        driver: h.driver,
        cpu: h.cpu,
        memory: h.memory,
        registered_at: h.registered_at,
        last_registered_at: h.last_registered_at,
        state: h.state,
        state_reason: h.state_reason,
        region: h.region,
    }
}
