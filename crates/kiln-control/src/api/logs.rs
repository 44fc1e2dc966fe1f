//! Instance logs: agents ship them, users read and follow them.

use super::*;

/// Largest log batch an agent may send at once.
const MAX_LOG_BATCH: usize = 5_000;

#[utoipa::path(post, path = "/v1/hosts/{host}/logs", tag = "hosts",
    request_body = Vec<kiln_api::LogRecord>,
    params(("host" = String, Path, description = "Host id")),
    security(("bearer" = ["host"])),
    responses((status = 200, description = "Accepted; lines of instances not on the host are dropped.", body = Object)))]
pub(super) async fn ship_logs(
    State(c): Ctl,
    p: Principal,
    Path(host): Path<String>,
    Json(lines): Json<Vec<kiln_api::LogRecord>>,
) -> ApiResult<Json<serde_json::Value>> {
    require_infra(&c, &p, Scope::Host).await?;
    if lines.len() > MAX_LOG_BATCH {
        return Err(ApiFailure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("at most {MAX_LOG_BATCH} lines per batch"),
        ));
    }
    let host = known_host(&c, &host).await?;
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

#[utoipa::path(get, path = "/v1/apps/{app}/logs", tag = "streams",
    params(("app" = String, Path, description = "App name"), kiln_api::LogsQuery),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "JSON lines of `LogRecord`; with `follow`, kept open.",
        body = kiln_api::LogRecord, content_type = "application/x-ndjson")))]
pub(super) async fn app_logs(
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
