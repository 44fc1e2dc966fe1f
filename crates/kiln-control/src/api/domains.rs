//! `/v1/apps/{app}/domains`: custom hostnames of an app (rules and verification in
//! `crate::domains`).

use kiln_api::domains::{AddDomain, Domain, DomainPage, DomainsQuery};
use kiln_store::DomainRow;
use kiln_types::dns::Hostname;

use super::*;
use crate::domains::{self as dom, MAX_PER_APP};

/// The app's claim on `hostname` (as typed: normalized first), or 404.
async fn owned_domain(c: &Control, app: &AppRow, hostname: &str) -> ApiResult<DomainRow> {
    let found = match Hostname::normalize(hostname) {
        Ok(h) => c
            .store
            .domains_of_app(app.id.clone())
            .await?
            .into_iter()
            .find(|d| d.hostname == h),
        Err(_) => None,
    };
    found.ok_or_else(|| ApiFailure::not_found("domain", hostname))
}

#[utoipa::path(get, path = "/v1/apps/{app}/domains", tag = "apps",
    params(("app" = String, Path, description = "App name"), PageQuery),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "The app's custom domains, verified or not, by hostname.", body = DomainPage)))]
pub(super) async fn list_domains(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<DomainPage>> {
    p.require(Scope::Read)?;
    let row = owned_app(&c, &p, &app).await?;
    let rows = c.store.domains_of_app(row.id.clone()).await?;
    let (page, next_cursor) = paginate("domains", rows, |d| d.hostname.to_string(), &q)?;
    Ok(Json(DomainPage {
        items: page.iter().map(|d| dom::view(&c, &row, d)).collect(),
        next_cursor,
    }))
}

#[utoipa::path(post, path = "/v1/apps/{app}/domains", tag = "apps", request_body = AddDomain,
    params(("app" = String, Path, description = "App name"), ("env" = Option<String>, Query, description = "Environment (default production)"), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    security(("bearer" = ["deploy"])),
    responses((status = 201, description = "The domain, pending: create its `challenge` TXT record, then verify.", body = Domain)))]
pub(super) async fn add_domain(
    State(c): Ctl,
    p: Principal,
    Path(app): Path<String>,
    Query(q): Query<DomainsQuery>,
    headers: HeaderMap,
    Json(body): Json<AddDomain>,
) -> ApiResult<(StatusCode, Json<Domain>)> {
    p.require(Scope::Deploy)?;
    let row = owned_app(&c, &p, &app).await?;
    let env = crate::secrets::env_of(q.env.as_deref())?;
    let hostname = Hostname::normalize(&body.hostname).map_err(|e| {
        let shown: String = body.hostname.chars().take(80).collect();
        ApiFailure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_hostname",
            format!("hostname {shown:?} {e}"),
        )
    })?;
    let platform = c.config.app_domain.as_str();
    if hostname.is_within(platform) {
        return Err(ApiFailure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "hostname_reserved",
            format!(
                "{hostname} is under the platform's domain {platform}; the app is reachable at {}.{platform} already",
                row.name
            ),
        ));
    }
    let claims = c.store.domains_by_hostname(hostname.as_str()).await?;
    let idempotency = durable_idempotency(
        &headers,
        format!("domains:{}", row.id),
        format!("{env}\n{hostname}").as_bytes(),
    );
    let exists = claims.iter().any(|d| d.app_id == row.id);
    if exists && idempotency.is_none() {
        return Err(domain_exists(&hostname, &app));
    }
    if !exists {
        if claims
            .iter()
            .any(|d| d.verified_at.is_some() && d.app_id != row.id)
        {
            return Err(dom::taken(hostname.as_str()));
        }
        if c.store.domains_of_app(row.id.clone()).await?.len() >= MAX_PER_APP {
            return Err(ApiFailure::new(
                StatusCode::CONFLICT,
                "domain_limit",
                format!("app {app} has {MAX_PER_APP} domains, the most an app may hold; remove one first"),
            ));
        }
    }
    // With the app holding the claim already, the append succeeds only as the store's replay of
    // the first request with this Idempotency-Key (the view refuses a second row).
    let res = c
        .store
        .append(Append {
            events: vec![NewEvent::any(Event::DomainAdded {
                app_id: row.id.clone(),
                env,
                hostname: hostname.clone(),
                token: dom::new_token(),
            })],
            metadata: metadata(&p, &headers),
            idempotency,
        })
        .await;
    let out = match res {
        Ok(out) => out,
        Err(kiln_store::StoreError::ApplyView { .. }) => {
            return Err(domain_exists(&hostname, &app))
        }
        Err(e) => return Err(e.into()),
    };
    let Some(rec) = out.events.first() else {
        return Err(ApiFailure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the store recorded no event",
        ));
    };
    let Event::DomainAdded {
        env,
        hostname,
        token,
        ..
    } = &rec.event
    else {
        return Err(ApiFailure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "Idempotency-Key was already used for a different request",
        ));
    };
    if !out.replayed {
        tracing::info!(app = %app, hostname = %hostname, "domain added");
    }
    let added = DomainRow {
        app_id: row.id.clone(),
        hostname: hostname.clone(),
        env: env.clone(),
        token: token.clone(),
        created_at: rec.recorded_at,
        verified_at: None,
    };
    // A replayed add answers with the domain as it is now (it may have been verified since).
    let current = c
        .store
        .domains_of_app(row.id.clone())
        .await?
        .into_iter()
        .find(|d| d.hostname == added.hostname)
        .unwrap_or(added);
    Ok((StatusCode::CREATED, Json(dom::view(&c, &row, &current))))
}

fn domain_exists(hostname: &Hostname, app: &str) -> ApiFailure {
    ApiFailure::new(
        StatusCode::CONFLICT,
        "domain_exists",
        format!(
            "app {app} has the domain {hostname} already; see it with kiln domains show {hostname}"
        ),
    )
}

#[utoipa::path(get, path = "/v1/apps/{app}/domains/{hostname}", tag = "apps",
    params(("app" = String, Path, description = "App name"), ("hostname" = String, Path, description = "The custom hostname")),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "The domain, with the DNS records to create.", body = Domain)))]
pub(super) async fn get_domain(
    State(c): Ctl,
    p: Principal,
    Path((app, hostname)): Path<(String, String)>,
) -> ApiResult<Json<Domain>> {
    p.require(Scope::Read)?;
    let row = owned_app(&c, &p, &app).await?;
    let d = owned_domain(&c, &row, &hostname).await?;
    Ok(Json(dom::view(&c, &row, &d)))
}

#[utoipa::path(post, path = "/v1/apps/{app}/domains/{hostname}/verify", tag = "apps",
    params(("app" = String, Path, description = "App name"), ("hostname" = String, Path, description = "The custom hostname")),
    security(("bearer" = ["deploy"])),
    responses((status = 200, description = "Verified (now, or before): the edges route the hostname to the app. Not verified: 422 `domain_not_verified` with what DNS answered.", body = Domain)))]
pub(super) async fn verify_domain(
    State(c): Ctl,
    p: Principal,
    Path((app, hostname)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<Domain>> {
    p.require(Scope::Deploy)?;
    let row = owned_app(&c, &p, &app).await?;
    let d = owned_domain(&c, &row, &hostname).await?;
    let d = dom::verify(&c, &d, metadata(&p, &headers)).await?;
    Ok(Json(dom::view(&c, &row, &d)))
}

#[utoipa::path(delete, path = "/v1/apps/{app}/domains/{hostname}", tag = "apps",
    params(("app" = String, Path, description = "App name"), ("hostname" = String, Path, description = "The custom hostname")),
    security(("bearer" = ["deploy"])),
    responses((status = 200, description = "Removed: the edges stop routing the hostname.", body = Object)))]
pub(super) async fn remove_domain(
    State(c): Ctl,
    p: Principal,
    Path((app, hostname)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    p.require(Scope::Deploy)?;
    let row = owned_app(&c, &p, &app).await?;
    let d = owned_domain(&c, &row, &hostname).await?;
    c.store
        .append(Append {
            events: vec![NewEvent::any(Event::DomainRemoved {
                app_id: row.id.clone(),
                env: d.env.clone(),
                hostname: d.hostname.clone(),
            })],
            metadata: metadata(&p, &headers),
            idempotency: None,
        })
        .await?;
    tracing::info!(app = %app, hostname = %d.hostname, "domain removed");
    Ok(Json(serde_json::json!({})))
}
