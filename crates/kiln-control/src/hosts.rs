//! Host liveness and operator actions: heartbeats, the `down` verdict, drain and undrain.
//!
//! Agents send `POST /v1/hosts/{host}/heartbeat` every few seconds. Heartbeats are not events
//! (thousands of hosts times one every five seconds would drown the log): their times live in
//! memory, and only a change of verdict is recorded — `host_state_changed` to `down` when a
//! host's last heartbeat is older than `host_down_after`, back to `ready` when heartbeats
//! resume. A control plane that just started counts every host as seen at its start, so a
//! restart never declares the fleet down. The reconciler acts on the state: no new work on a
//! host that is not `ready`; the stateless instances of a `down` host are replaced elsewhere;
//! those of a `draining` host are replaced elsewhere, each stopping only once enough healthy
//! replacements run (no downtime).
//!
//! Hosts belong to the platform, not to a tenant: listing and draining them needs the `admin`
//! scope of the operator org (the org created at first start).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;

use kiln_api::Host;
use kiln_store::{Append, HostRow, NewEvent};
use kiln_types::event::{Event, HostState};
use kiln_types::HostId;

use crate::api::metadata;
use crate::auth::{Principal, Scope};
use crate::error::ApiFailure;
use crate::Control;

type ApiResult<T> = Result<T, ApiFailure>;

/// Last heartbeat of each host, in memory.
pub(crate) struct Heartbeats {
    started: Instant,
    seen: Mutex<HashMap<HostId, Instant>>,
}

impl Default for Heartbeats {
    fn default() -> Self {
        Heartbeats {
            started: Instant::now(),
            seen: Mutex::new(HashMap::new()),
        }
    }
}

impl Heartbeats {
    pub fn beat(&self, host: &HostId) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.clone(), Instant::now());
    }

    /// How long since the host was last heard from (its heartbeat, or this process's start).
    pub fn silent_for(&self, host: &HostId) -> Duration {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(host).copied().unwrap_or(self.started).elapsed()
    }
}

/// The `host_state_changed` events a reconcile pass appends: hosts whose heartbeats stopped.
pub(crate) fn overdue(c: &Control, hosts: &[HostRow]) -> Vec<Event> {
    let limit = c.config.host_down_after;
    hosts
        .iter()
        .filter(|h| h.state != HostState::Down)
        .filter_map(|h| {
            let silent = c.heartbeats.silent_for(&h.id);
            (silent > limit).then(|| {
                tracing::warn!(host_id = %h.id, name = %h.name, silent_ms = silent.as_millis() as u64, "host missed its heartbeats; declaring it down");
                Event::HostStateChanged {
                    host_id: h.id.clone(),
                    state: HostState::Down,
                    reason: Some(format!(
                        "no heartbeat for {} s (limit {} s)",
                        silent.as_secs(),
                        limit.as_secs()
                    )),
                }
            })
        })
        .collect()
}

async fn host(c: &Control, id: &str) -> ApiResult<HostRow> {
    c.store
        .hosts()
        .await?
        .into_iter()
        .find(|h| h.id.as_str() == id || h.name == id)
        .ok_or_else(|| ApiFailure::not_found("host", id))
}

#[utoipa::path(post, path = "/v1/hosts/{host}/heartbeat", tag = "hosts",
    params(("host" = String, Path, description = "Host id or name")),
    security(("bearer" = ["host"])),
    responses((status = 200, description = "Recorded; a down host becomes ready.", body = Object)))]
pub(crate) async fn heartbeat(
    State(c): State<Arc<Control>>,
    p: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    crate::api::require_infra(&c, &p, Scope::Host).await?;
    let row = host(&c, &id).await?;
    c.heartbeats.beat(&row.id);
    if row.state == HostState::Down {
        c.store
            .append(Append {
                events: vec![NewEvent::any(Event::HostStateChanged {
                    host_id: row.id.clone(),
                    state: HostState::Ready,
                    reason: Some("heartbeats resumed".into()),
                })],
                metadata: metadata(&p, &headers),
                idempotency: None,
            })
            .await?;
        tracing::info!(host_id = %row.id, name = %row.name, "host is back");
    }
    Ok(Json(serde_json::json!({})))
}

/// Hosts are the operator's: the admin scope of the org created at first start.
async fn require_operator(c: &Control, p: &Principal) -> ApiResult<()> {
    p.require(Scope::Admin)?;
    let operator = c.first_org().await.ok().flatten();
    if operator.as_ref() != Some(&p.org_id) {
        return Err(ApiFailure::new(
            StatusCode::FORBIDDEN,
            "not_operator",
            "hosts are managed by the platform operator's org",
        ));
    }
    Ok(())
}

async fn set_state(
    c: &Control,
    p: &Principal,
    headers: &HeaderMap,
    id: &str,
    state: HostState,
) -> ApiResult<Json<Host>> {
    require_operator(c, p).await?;
    let row = host(c, id).await?;
    if row.state == HostState::Down && state == HostState::Ready {
        return Err(ApiFailure::new(
            StatusCode::CONFLICT,
            "host_down",
            format!(
                "host {} is down ({}); it becomes ready again when its agent heartbeats",
                row.name,
                row.state_reason.as_deref().unwrap_or("no heartbeat")
            ),
        ));
    }
    if row.state != state {
        c.store
            .append(Append {
                events: vec![NewEvent::any(Event::HostStateChanged {
                    host_id: row.id.clone(),
                    state,
                    reason: Some(format!("{} by token {:?}", state.as_str(), p.token_name)),
                })],
                metadata: metadata(p, headers),
                idempotency: None,
            })
            .await?;
        tracing::info!(host_id = %row.id, name = %row.name, state = state.as_str(), "host state set");
    }
    Ok(Json(crate::api::host_view(host(c, id).await?)))
}

#[utoipa::path(post, path = "/v1/hosts/{host}/drain", tag = "hosts",
    params(("host" = String, Path, description = "Host id or name")),
    security(("bearer" = ["admin"])),
    responses((status = 200, description = "The host, draining. Operator org only.", body = kiln_api::Host)))]
pub(crate) async fn drain(
    State(c): State<Arc<Control>>,
    p: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Host>> {
    set_state(&c, &p, &headers, &id, HostState::Draining).await
}

#[utoipa::path(post, path = "/v1/hosts/{host}/ready", tag = "hosts",
    params(("host" = String, Path, description = "Host id or name")),
    security(("bearer" = ["admin"])),
    responses((status = 200, description = "The host, ready. Operator org only.", body = kiln_api::Host)))]
pub(crate) async fn undrain(
    State(c): State<Arc<Control>>,
    p: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Host>> {
    set_state(&c, &p, &headers, &id, HostState::Ready).await
}
