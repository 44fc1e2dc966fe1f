//! `/v1/whoami` and `/v1/tokens`: who a token is, and creating, listing and revoking tokens.
//!
//! Rules (docs/security/02-authz-and-scopes.md):
//! 1. Creating a token needs a user token or an admin token; the new token gets only scopes the
//!    caller has (admin implies all), the caller's user, and the caller's app restriction (or a
//!    new one with `app`). A token cannot mint a wider one.
//! 2. A token bound to a user always expires (default 30 days, at most 365); only a machine admin
//!    token may create a token that never expires.
//! 3. A token restricted to one app carries only `read`, `deploy`, `exec` and `secrets:write`
//!    (default `read` + `deploy`): never `admin`, `host` or `edge`.
//! 4. Admin sees and revokes every token of its org; a user token those of its user; any token
//!    itself. Anything else answers 404, like a token that does not exist.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;

use kiln_api::{CreateToken, CreatedToken, TokenInfo, UserRef, WhoAmI, REQUEST_ID};
use kiln_store::{Append, Metadata, NewEvent, TokenRow};
use kiln_types::event::Event;
use kiln_types::{AppName, TokenId};

use crate::auth::{new_token, NewToken, Principal, Scope};
use crate::error::ApiFailure;
use crate::Control;

type Ctl = State<Arc<Control>>;
type ApiResult<T> = Result<T, ApiFailure>;

/// Default lifetime of a token made with `POST /v1/tokens`.
pub(crate) const DEFAULT_TTL_SECS: u64 = 30 * 24 * 3600;
/// Longest lifetime of a token bound to a user.
pub(crate) const MAX_USER_TTL_SECS: u64 = 365 * 24 * 3600;
/// The scopes a token restricted to one app may carry (not org-wide or infrastructure ones).
const APP_SCOPES: [Scope; 4] = [Scope::Read, Scope::Deploy, Scope::Exec, Scope::SecretsWrite];
/// Longest token name.
const MAX_NAME: usize = 100;

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

#[utoipa::path(get, path = "/v1/whoami", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "The caller: token, org, user and role, scopes, app, expiry.", body = kiln_api::WhoAmI)))]
pub(crate) async fn whoami(State(c): Ctl, p: Principal) -> ApiResult<Json<WhoAmI>> {
    let org_name = c.store.org(p.org_id.clone()).await?.map(|o| o.name);
    let (user, role) = match &p.user_id {
        Some(uid) => {
            let user = c.store.user(uid.clone()).await?;
            let role = c
                .store
                .memberships_of_user(uid.clone())
                .await?
                .into_iter()
                .find(|m| m.org_id == p.org_id)
                .map(|m| m.role);
            (
                user.map(|u| UserRef {
                    id: u.id,
                    email: u.email,
                }),
                role,
            )
        }
        None => (None, None),
    };
    let app = app_name(&c, &p.app_id).await?;
    Ok(Json(WhoAmI {
        org_id: p.org_id,
        token_name: p.token_name,
        scopes: p.scopes,
        token_id: Some(p.token_id),
        org_name,
        user,
        role,
        app,
        expires_at: p.expires_at,
    }))
}

async fn app_name(c: &Control, app: &Option<kiln_types::AppId>) -> ApiResult<Option<AppName>> {
    let Some(app) = app else { return Ok(None) };
    Ok(c.store.app(app.clone()).await?.map(|a| a.name))
}

fn info(row: TokenRow, app: Option<AppName>) -> TokenInfo {
    TokenInfo {
        id: row.id,
        name: row.name,
        scopes: row.scopes,
        app,
        user_id: row.user_id,
        created_at: row.created_at,
        expires_at: row.expires_at,
        last_used_at: row.last_used_at,
        revoked_at: row.revoked_at,
    }
}

/// Whether `p` may see (and revoke) token `row`.
fn may_see(p: &Principal, row: &TokenRow) -> bool {
    row.org_id == p.org_id
        && (row.id == p.token_id
            || (p.has(Scope::Admin) && p.app_id.is_none())
            || (p.user_id.is_some() && row.user_id == p.user_id))
}

#[utoipa::path(post, path = "/v1/tokens", tag = "auth", request_body = kiln_api::CreateToken,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    security(("bearer" = ["admin"])),
    responses((status = 201, description = "The token; its secret is shown only here.", body = kiln_api::CreatedToken)))]
pub(crate) async fn create_token(
    State(c): Ctl,
    p: Principal,
    headers: HeaderMap,
    Json(body): Json<CreateToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    if p.user_id.is_none() && !p.has(Scope::Admin) {
        return Err(ApiFailure::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "only a user's token or an admin token may create tokens",
        ));
    }
    let name = body.name.trim();
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(ApiFailure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_token_name",
            format!("a token name has 1 to {MAX_NAME} printable characters"),
        ));
    }
    // The app restriction: the caller's own, or a narrower one.
    let app_id = match (&body.app, &p.app_id) {
        (None, restricted) => restricted.clone(),
        (Some(name), restricted) => {
            let app = c
                .store
                .app_by_name(name.to_string())
                .await?
                .filter(|a| a.org_id == p.org_id && p.allows_app(&a.id))
                .ok_or_else(|| ApiFailure::not_found("app", name.as_str()))?;
            if restricted.as_ref().is_some_and(|r| r != &app.id) {
                return Err(ApiFailure::not_found("app", name.as_str()));
            }
            Some(app.id)
        }
    };
    let app_scoped = app_id.is_some();
    let mut scopes = Vec::new();
    let requested: Vec<String> = match (body.scopes.is_empty(), app_scoped) {
        (false, _) => body.scopes.clone(),
        (true, false) => p.scopes.clone(),
        // A CI token by default: read and deploy, as far as the caller has them.
        (true, true) => [Scope::Read, Scope::Deploy]
            .into_iter()
            .filter(|s| p.has(*s))
            .map(|s| s.as_str().to_owned())
            .collect(),
    };
    for s in &requested {
        let scope = Scope::parse(s).ok_or_else(|| {
            ApiFailure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_scope",
                format!(
                    "unknown scope {s:?}; scopes are {}",
                    Scope::ALL.map(Scope::as_str).join(", ")
                ),
            )
        })?;
        if app_scoped && !APP_SCOPES.contains(&scope) {
            return Err(ApiFailure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_scope",
                format!(
                    "a token restricted to one app may carry only {}",
                    APP_SCOPES.map(Scope::as_str).join(", ")
                ),
            ));
        }
        if !p.has(scope) {
            return Err(ApiFailure::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("this token lacks the `{scope}` scope, so it cannot grant it"),
            ));
        }
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if scopes.is_empty() {
        return Err(ApiFailure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_scope",
            "a token needs at least one scope",
        ));
    }
    let now = c.config.clock.now_millis();
    let expires_at = if body.no_expiry {
        if p.user_id.is_some() {
            return Err(ApiFailure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "expiry_required",
                "tokens of a user always expire; give an expiry of at most 365 days",
            ));
        }
        None
    } else {
        let secs = body.expires_in_secs.unwrap_or(DEFAULT_TTL_SECS);
        if secs == 0 || (p.user_id.is_some() && secs > MAX_USER_TTL_SECS) {
            return Err(ApiFailure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_expiry",
                "a token of a user lives from 1 second to 365 days",
            ));
        }
        let at = now.saturating_add(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX));
        // The new token never outlives the one that made it.
        Some(p.expires_at.map_or(at, |own| own.min(at)))
    };
    let (secret, event) = new_token(NewToken {
        org: &p.org_id,
        name,
        scopes: &scopes,
        expires_at,
        user_id: p.user_id.clone(),
        app_id: app_id.clone(),
    });
    let Event::TokenCreated { token_id, .. } = &event else {
        unreachable!("new_token makes token_created events")
    };
    let token_id = token_id.clone();
    c.store
        .append(Append {
            events: vec![NewEvent::any(event)],
            metadata: metadata(&p, &headers),
            idempotency: None,
        })
        .await?;
    let row = c
        .store
        .token_by_id(token_id.clone())
        .await?
        .ok_or_else(|| ApiFailure::not_found("token", token_id.as_str()))?;
    tracing::info!(token_id = %token_id, actor = %p.actor(), scopes = ?row.scopes, "token created");
    let app = app_name(&c, &app_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: info(row, app),
            secret,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/tokens", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "The caller's tokens (every token of the org for admin); never secrets.", body = Vec<kiln_api::TokenInfo>)))]
pub(crate) async fn list_tokens(State(c): Ctl, p: Principal) -> ApiResult<Json<Vec<TokenInfo>>> {
    let apps: std::collections::BTreeMap<_, _> = c
        .store
        .apps(Some(p.org_id.clone()))
        .await?
        .into_iter()
        .map(|a| (a.id, a.name))
        .collect();
    let rows = c.store.tokens_of_org(p.org_id.clone()).await?;
    Ok(Json(
        rows.into_iter()
            .filter(|r| may_see(&p, r))
            .map(|r| {
                let app = r.app_id.as_ref().and_then(|a| apps.get(a).cloned());
                info(r, app)
            })
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "auth",
    params(("id" = String, Path, description = "Token id")),
    security(("bearer" = ["admin"])),
    responses((status = 200, description = "The revoked token.", body = kiln_api::TokenInfo)))]
pub(crate) async fn revoke_token(
    State(c): Ctl,
    p: Principal,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<TokenInfo>> {
    let token_id: TokenId = id
        .parse()
        .map_err(|_| ApiFailure::not_found("token", &id))?;
    let row = c
        .store
        .token_by_id(token_id.clone())
        .await?
        .filter(|r| r.org_id == p.org_id)
        .ok_or_else(|| ApiFailure::not_found("token", &id))?;
    // Any token may revoke itself (and a user's token the user's others); anything else in the
    // org needs admin. Another org's tokens answered 404 above.
    if !may_see(&p, &row) {
        return Err(ApiFailure::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "revoking another token of the org needs an admin token (not restricted to an app)",
        ));
    }
    if row.revoked_at.is_none() {
        c.store
            .append(Append {
                events: vec![NewEvent::any(Event::TokenRevoked {
                    token_id: token_id.clone(),
                    org_id: row.org_id.clone(),
                })],
                metadata: metadata(&p, &headers),
                idempotency: None,
            })
            .await?;
        tracing::info!(token_id = %token_id, actor = %p.actor(), "token revoked");
    }
    let row = c
        .store
        .token_by_id(token_id)
        .await?
        .ok_or_else(|| ApiFailure::not_found("token", &id))?;
    let app = app_name(&c, &row.app_id).await?;
    Ok(Json(info(row, app)))
}
