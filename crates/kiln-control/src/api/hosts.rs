//! Host agents: registration, assignments, instance reports.

use super::*;

pub(super) async fn register_host(
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

pub(super) async fn assignments(
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
    let assignments = rows
        .into_iter()
        .filter(|i| !i.state.is_terminal() || i.desired_running)
        .map(|i| Assignment {
            desired_running: i.desired_running,
            state: i.state,
            spec: i.spec,
        })
        .collect();
    Ok(Json(Assignments { seq, assignments }))
}

pub(super) async fn report_instance(
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
