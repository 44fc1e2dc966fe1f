//! `/v1/apps/{app}/ips`: the IPv4 add-on (ADR 0007). A dedicated IPv4 address comes from the
//! control plane's pool (`--ipv4-pool`), one per app, and every port of it is the app's; the
//! allocation is an `ipv4_allocated` event on the app's stream and the edges route it from the
//! allocations view (see `api::routes`). Releasing appends `ipv4_released`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;

use kiln_api::{AllocateIp, AllocatedIp, AppIps};
use kiln_store::{Allocation, Append, NewEvent};
use kiln_types::event::Event;

use crate::api::{metadata, owned_app};
use crate::auth::{Principal, Scope};
use crate::error::ApiFailure;
use crate::Control;

type ApiResult<T> = Result<T, ApiFailure>;

#[utoipa::path(get, path = "/v1/apps/{app}/ips", tag = "apps",
    params(("app" = String, Path, description = "App name")),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "The app's dedicated IPv4 addresses and shared ports.", body = kiln_api::AppIps)))]
pub(crate) async fn list(
    State(c): State<Arc<Control>>,
    p: Principal,
    Path(app): Path<String>,
) -> ApiResult<Json<AppIps>> {
    p.require(Scope::Read)?;
    let row = owned_app(&c, &p, &app).await?;
    let mut ips = AppIps {
        dedicated_ipv4: Vec::new(),
        shared_ports: Vec::new(),
    };
    for a in c.store.allocations().await? {
        if a.app_id != row.id {
            continue;
        }
        match a.allocation {
            Allocation::DedicatedIpv4(ip) => ips.dedicated_ipv4.push(ip),
            Allocation::SharedPort(port) => ips.shared_ports.push(port),
        }
    }
    ips.dedicated_ipv4.sort();
    ips.shared_ports.sort();
    Ok(Json(ips))
}

#[utoipa::path(post, path = "/v1/apps/{app}/ips", tag = "apps", request_body = kiln_api::AllocateIp,
    params(("app" = String, Path, description = "App name"), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    security(("bearer" = ["deploy"])),
    responses((status = 201, description = "The allocated dedicated IPv4.", body = kiln_api::AllocatedIp)))]
pub(crate) async fn allocate(
    State(c): State<Arc<Control>>,
    p: Principal,
    Path(app): Path<String>,
    headers: HeaderMap,
    Json(body): Json<AllocateIp>,
) -> ApiResult<(StatusCode, Json<AllocatedIp>)> {
    p.require(Scope::Deploy)?;
    let row = owned_app(&c, &p, &app).await?;
    if body.kind != "v4" {
        return Err(ApiFailure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_ip_kind",
            format!(
                "cannot allocate an address of kind {:?}: only \"v4\" (a dedicated IPv4) is allocated; every instance has its IPv6 already",
                body.kind
            ),
        ));
    }
    let Some(pool) = c.config.ipv4_pool else {
        return Err(ApiFailure::new(
            StatusCode::CONFLICT,
            "ipv4_unavailable",
            "this control plane has no IPv4 pool to allocate from (start it with --ipv4-pool)",
        ));
    };
    let idempotency =
        crate::api::durable_idempotency(&headers, format!("ips:{}", row.id), body.kind.as_bytes());
    // Two allocations racing for one address are settled by the allocations view's primary key
    // (address, port): the loser's append fails whole and it tries the next free address.
    for _ in 0..8 {
        let allocations = c.store.allocations().await?;
        let existing = allocations.iter().find_map(|a| match a.allocation {
            Allocation::DedicatedIpv4(ip) if a.app_id == row.id => Some(ip),
            _ => None,
        });
        let address = match existing {
            Some(ip) => ip,
            None => {
                crate::quotas::check_ipv4(&c, &p.org_id).await?;
                let taken: std::collections::BTreeSet<_> = allocations
                    .iter()
                    .filter_map(|a| match a.allocation {
                        Allocation::DedicatedIpv4(ip) => Some(ip),
                        _ => None,
                    })
                    .collect();
                pool.addresses()
                    .find(|ip| !taken.contains(ip))
                    .ok_or_else(|| {
                        ApiFailure::new(
                            StatusCode::CONFLICT,
                            "ipv4_pool_exhausted",
                            format!("every address of the IPv4 pool {pool} is allocated"),
                        )
                    })?
            }
        };
        let exists = || {
            ApiFailure::new(
                StatusCode::CONFLICT,
                "ipv4_exists",
                format!(
                    "app {app} already has the dedicated IPv4 {address}; an app has at most one"
                ),
            )
        };
        if existing.is_some() && idempotency.is_none() {
            return Err(exists());
        }
        // When the app has its address already, the append below can only succeed as the
        // store's replay of an earlier request with the same idempotency key (the view refuses a
        // second row for the address): that answers a retried request the same way again.
        let res = c
            .store
            .append(Append {
                events: vec![NewEvent::any(Event::Ipv4Allocated {
                    app_id: row.id.clone(),
                    address,
                })],
                metadata: metadata(&p, &headers),
                idempotency: idempotency.clone(),
            })
            .await;
        match res {
            Ok(out) => {
                let address = match out.events.first().map(|e| &e.event) {
                    Some(Event::Ipv4Allocated { address, .. }) => *address,
                    _ => address,
                };
                if !out.replayed {
                    tracing::info!(app = %app, address = %address, "dedicated IPv4 allocated");
                }
                return Ok((StatusCode::CREATED, Json(AllocatedIp { address })));
            }
            Err(kiln_store::StoreError::ApplyView { .. }) if existing.is_some() => {
                return Err(exists())
            }
            Err(kiln_store::StoreError::ApplyView { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiFailure::new(
        StatusCode::CONFLICT,
        "conflict",
        "too many concurrent IPv4 allocations; retry",
    ))
}

#[utoipa::path(delete, path = "/v1/apps/{app}/ips/{address}", tag = "apps",
    params(("app" = String, Path, description = "App name"), ("address" = String, Path, description = "The IPv4 address")),
    security(("bearer" = ["deploy"])),
    responses((status = 200, description = "Released.", body = Object)))]
pub(crate) async fn release(
    State(c): State<Arc<Control>>,
    p: Principal,
    Path((app, address)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    p.require(Scope::Deploy)?;
    let row = owned_app(&c, &p, &app).await?;
    let Ok(ip) = address.parse::<std::net::Ipv4Addr>() else {
        return Err(ApiFailure::not_found("address", &address));
    };
    let has = c
        .store
        .allocations()
        .await?
        .into_iter()
        .any(|a| a.app_id == row.id && a.allocation == Allocation::DedicatedIpv4(ip));
    if !has {
        return Err(ApiFailure::not_found("address", &address));
    }
    c.store
        .append(Append {
            events: vec![NewEvent::any(Event::Ipv4Released {
                app_id: row.id.clone(),
                address: ip,
            })],
            metadata: metadata(&p, &headers),
            idempotency: None,
        })
        .await?;
    tracing::info!(app = %app, address = %ip, "dedicated IPv4 released");
    Ok(Json(serde_json::json!({})))
}
