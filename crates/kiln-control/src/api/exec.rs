//! Exec sessions: the user's WebSocket and the agent's end.

use super::*;

#[utoipa::path(get, path = "/v1/apps/{app}/exec", tag = "streams",
    params(("app" = String, Path, description = "App name"), kiln_api::ExecQuery),
    security(("bearer" = ["exec"])),
    responses((status = 101, description = "WebSocket: binary messages carry guest-channel frames.")))]
pub(super) async fn app_exec(
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

#[utoipa::path(get, path = "/v1/hosts/{host}/exec-requests", tag = "hosts",
    params(("host" = String, Path, description = "Host id"), WatchQuery),
    security(("bearer" = ["host"])),
    responses((status = 200, description = "Exec sessions for the host's agent to serve (long-poll).", body = Vec<kiln_api::ExecRequest>)))]
pub(super) async fn exec_requests(
    State(c): Ctl,
    p: Principal,
    Path(host): Path<String>,
    Query(q): Query<WatchQuery>,
) -> ApiResult<Json<Vec<kiln_api::ExecRequest>>> {
    require_infra(&c, &p, Scope::Host).await?;
    let host = known_host(&c, &host).await?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(c.config.max_watch);
    Ok(Json(c.exec.take(&host, wait).await))
}

#[utoipa::path(get, path = "/v1/hosts/{host}/exec/{session}", tag = "hosts",
    params(("host" = String, Path, description = "Host id"), ("session" = String, Path, description = "Exec session id")),
    security(("bearer" = ["host"])),
    responses((status = 101, description = "WebSocket: the agent's end of an exec session.")))]
pub(super) async fn host_exec(
    State(c): Ctl,
    p: Principal,
    Path((host, session)): Path<(String, String)>,
    ws: axum::extract::WebSocketUpgrade,
) -> ApiResult<Response> {
    require_infra(&c, &p, Scope::Host).await?;
    let _ = host;
    Ok(ws.on_upgrade(move |socket| async move {
        if !c.exec.attach(&session, socket) {
            tracing::debug!(session = %session, "agent attached to an unknown exec session");
        }
    }))
}
