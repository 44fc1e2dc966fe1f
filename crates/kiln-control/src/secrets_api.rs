//! The secrets routes (see [`crate::secrets`] for what a change does).
//!
//! Scopes: `read` lists names and renders masked files; `secrets:write` sets and unsets;
//! `secrets:read` reveals values in `render`; `host` fetches the file of an instance placed on that
//! host. An app of another org answers 404 like a missing one, so its secret names stay unseen.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};

use kiln_api::secrets::{
    RenderedSecrets, SecretInfo, SecretList, SecretsChanged, SecretsQuery, SetSecrets,
    UnsetSecrets, MASK,
};
use kiln_api::REQUEST_ID;
use kiln_store::{AppRow, Append, Metadata, NewEvent};
use kiln_types::event::Event;
use kiln_types::secrets::{SecretName, SecretsFile, MAX_SECRETS};
use kiln_types::{HostId, InstanceId};

use crate::auth::{Principal, Scope};
use crate::error::ApiFailure;
use crate::secrets::{self, Change};
use crate::Control;

type Ctl = State<Arc<Control>>;
type ApiResult<T> = Result<T, ApiFailure>;

pub(crate) fn routes() -> Router<Arc<Control>> {
    Router::new()
        .route("/v1/apps/{app}/secrets", get(list).post(set))
        .route("/v1/apps/{app}/secrets/unset", post(unset))
        .route("/v1/apps/{app}/secrets/render", get(render))
        .route(
            "/v1/hosts/{host}/instances/{instance}/secrets",
            get(instance_file),
        )
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

async fn owned_app(c: &Control, p: &Principal, name: &str) -> ApiResult<AppRow> {
    match c.store.app_by_name(name.to_owned()).await? {
        Some(app) if app.org_id == p.org_id && p.allows_app(&app.id) => Ok(app),
        _ => Err(ApiFailure::not_found("app", name)),
    }
}

/// Parses a JSON body. The error gives only the position: serde's messages quote the offending
/// value, which here may be a secret.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiFailure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!(
                "the request body is not a valid secrets request (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })
}

#[utoipa::path(get, path = "/v1/apps/{app}/secrets", tag = "secrets",
    params(("app" = String, Path, description = "App name"), ("env" = Option<String>, Query, description = "Environment (default production)")),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "Names, versions, digests; never values.", body = kiln_api::secrets::SecretList)))]
pub(crate) async fn list(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    Query(q): Query<SecretsQuery>,
) -> ApiResult<Json<SecretList>> {
    p.require(Scope::Read)?;
    let row = owned_app(&c, &p, &app).await?;
    let env = secrets::env_of(q.env.as_deref())?;
    let state = c.store.secret_env(row.id.clone(), env.clone()).await?;
    let version = state.map_or(0, |s| s.version);
    let entries = c
        .store
        .secrets_at(row.id.clone(), env.clone(), version)
        .await?;
    let deployed_version = c
        .store
        .releases(row.id.clone())
        .await?
        .last()
        .map(|r| r.secrets_version);
    Ok(Json(SecretList {
        env,
        version,
        staged: state.is_some_and(|s| s.staged),
        deployed_version,
        secrets: entries
            .into_iter()
            .map(|e| SecretInfo {
                name: e.name.to_string(),
                version: e.version,
                digest: e.digest,
                updated_at: e.created_at,
            })
            .collect(),
    }))
}

#[utoipa::path(post, path = "/v1/apps/{app}/secrets", tag = "secrets", request_body = kiln_api::secrets::SetSecrets,
    params(("app" = String, Path, description = "App name"), ("env" = Option<String>, Query, description = "Environment (default production)"), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    security(("bearer" = ["secrets:write"])),
    responses((status = 201, description = "A new secrets version.", body = kiln_api::secrets::SecretsChanged)))]
pub(crate) async fn set(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    Query(q): Query<SecretsQuery>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<SecretsChanged>)> {
    p.require(Scope::SecretsWrite)?;
    let row = owned_app(&c, &p, &app).await?;
    let env = secrets::env_of(q.env.as_deref())?;
    let req: SetSecrets = body(&bytes)?;
    if req.secrets.is_empty() {
        return Err(ApiFailure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "no_secrets",
            "name at least one secret to set",
        ));
    }
    if req.secrets.len() > MAX_SECRETS {
        return Err(ApiFailure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_secrets",
            format!("at most {MAX_SECRETS} secrets per environment"),
        ));
    }
    let mut values: BTreeMap<SecretName, String> = BTreeMap::new();
    for (name, value) in req.secrets {
        let name = secrets::parse_name(&name)?;
        secrets::check_value(&name, &value)?;
        values.insert(name, value);
    }
    let names: Vec<String> = values.keys().map(|n| n.to_string()).collect();
    let applied = secrets::apply(
        &c,
        &row,
        &env,
        Change::Set(values),
        req.stage,
        metadata(&p, &headers),
    )
    .await?;
    tracing::info!(app = %app, env = %env, version = applied.version, names = ?names, staged = req.stage, rollout = applied.rollout, "secrets set");
    Ok((
        StatusCode::CREATED,
        Json(SecretsChanged {
            env,
            version: applied.version,
            staged: req.stage,
            rollout: applied.rollout.to_owned(),
            release_version: applied.release_version,
        }),
    ))
}

#[utoipa::path(post, path = "/v1/apps/{app}/secrets/unset", tag = "secrets", request_body = kiln_api::secrets::UnsetSecrets,
    params(("app" = String, Path, description = "App name"), ("env" = Option<String>, Query, description = "Environment (default production)"), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    security(("bearer" = ["secrets:write"])),
    responses((status = 200, description = "A new secrets version.", body = kiln_api::secrets::SecretsChanged)))]
pub(crate) async fn unset(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    Query(q): Query<SecretsQuery>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Json<SecretsChanged>> {
    p.require(Scope::SecretsWrite)?;
    let row = owned_app(&c, &p, &app).await?;
    let env = secrets::env_of(q.env.as_deref())?;
    let req: UnsetSecrets = body(&bytes)?;
    if req.names.is_empty() || req.names.len() > MAX_SECRETS {
        return Err(ApiFailure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "no_secrets",
            format!("name between 1 and {MAX_SECRETS} secrets to unset"),
        ));
    }
    let mut names = req
        .names
        .iter()
        .map(|n| secrets::parse_name(n))
        .collect::<ApiResult<Vec<_>>>()?;
    names.sort();
    names.dedup();
    let shown: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let applied = secrets::apply(
        &c,
        &row,
        &env,
        Change::Unset(names),
        req.stage,
        metadata(&p, &headers),
    )
    .await?;
    tracing::info!(app = %app, env = %env, version = applied.version, names = ?shown, staged = req.stage, rollout = applied.rollout, "secrets unset");
    Ok(Json(SecretsChanged {
        env,
        version: applied.version,
        staged: req.stage,
        rollout: applied.rollout.to_owned(),
        release_version: applied.release_version,
    }))
}

#[utoipa::path(get, path = "/v1/apps/{app}/secrets/render", tag = "secrets",
    params(("app" = String, Path, description = "App name"), ("env" = Option<String>, Query, description = "Environment (default production)"), ("reveal" = Option<bool>, Query, description = "Show values (needs secrets:read)")),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "The file instances receive; values masked unless revealed.", body = kiln_api::secrets::RenderedSecrets)))]
pub(crate) async fn render(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    Query(q): Query<SecretsQuery>,
) -> ApiResult<Json<RenderedSecrets>> {
    p.require(Scope::Read)?;
    let reveal = q.reveal.unwrap_or(false);
    if reveal {
        p.require(Scope::SecretsRead)?;
    }
    let row = owned_app(&c, &p, &app).await?;
    let env = secrets::env_of(q.env.as_deref())?;
    let version = c
        .store
        .secret_env(row.id.clone(), env.clone())
        .await?
        .map_or(0, |s| s.version);
    let file = if reveal {
        tracing::info!(app = %app, env = %env, version, actor = %p.actor(), "secrets revealed");
        secrets::file_at(&c, &row, &env, version).await?
    } else {
        let entries = c
            .store
            .secrets_at(row.id.clone(), env.clone(), version)
            .await?;
        SecretsFile {
            version,
            app: row.name.clone(),
            env: env.clone(),
            secrets: entries
                .into_iter()
                .map(|e| (e.name.to_string(), MASK.to_owned()))
                .collect(),
        }
    };
    Ok(Json(RenderedSecrets {
        revealed: reveal,
        file,
    }))
}

/// The agent's fetch: the secrets file of an instance placed on this host, at the version its
/// release pins (or newer, for `reload = "signal"`). Audited as `secrets_delivered`.
#[utoipa::path(get, path = "/v1/hosts/{host}/instances/{instance}/secrets", tag = "hosts",
    params(("host" = String, Path, description = "Host id"), ("instance" = String, Path, description = "Instance id")),
    security(("bearer" = ["host"])),
    responses((status = 200, description = "The instance's secrets file (values in plaintext).", body = kiln_types::secrets::SecretsFile)))]
pub(crate) async fn instance_file(
    State(c): Ctl,
    p: Principal,
    headers: HeaderMap,
    Path((host, instance)): Path<(String, String)>,
) -> ApiResult<Json<SecretsFile>> {
    crate::api::require_infra(&c, &p, Scope::Host).await?;
    let not_found = || ApiFailure::not_found("instance", &instance);
    let host: HostId = host.parse().map_err(|_| not_found())?;
    let id: InstanceId = instance.parse().map_err(|_| not_found())?;
    let inst = c.store.instance(id.clone()).await?.ok_or_else(not_found)?;
    if inst.host_id != host || !inst.desired_running {
        return Err(not_found());
    }
    let app = c
        .store
        .app(inst.app_id.clone())
        .await?
        .ok_or_else(not_found)?;
    let release = c
        .store
        .release(inst.app_id.clone(), inst.release_version)
        .await?
        .ok_or_else(not_found)?;
    let version = secrets::version_for(&c, &inst.app_id, &release).await?;
    let env = kiln_types::secrets::DEFAULT_ENV;
    let file = secrets::file_at(&c, &app, env, version).await?;
    c.store
        .append(Append {
            events: vec![NewEvent::any(Event::SecretsDelivered {
                instance_id: id.clone(),
                app_id: inst.app_id.clone(),
                host_id: host.clone(),
                version,
            })],
            metadata: metadata(&p, &headers),
            idempotency: None,
        })
        .await?;
    tracing::info!(instance_id = %id, host_id = %host, version, "secrets delivered");
    Ok(Json(file))
}
