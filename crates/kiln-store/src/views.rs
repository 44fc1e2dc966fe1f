//! Materialized views: how each event changes the view tables, and the queries the API runs.
//!
//! [`apply`] is the only writer of view tables and is a function of the event alone, so replaying
//! the log from the start rebuilds every view.

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use kiln_types::event::{Event, ReleaseState};
use kiln_types::{
    AppId, AppName, HostId, ImageRef, InstanceId, InstanceState, MiB, MilliCpu, OrgId, ReleaseId,
    TokenId, UnixMillis, WorkloadSpec,
};

use crate::StoreError;

pub(crate) fn apply(
    tx: &Connection,
    seq: u64,
    now: UnixMillis,
    event: &Event,
) -> rusqlite::Result<()> {
    let _ = seq;
    match event {
        Event::OrgCreated { org_id, name } => {
            tx.execute(
                "INSERT INTO orgs (id, name, created_at) VALUES (?1, ?2, ?3)",
                params![org_id.as_str(), name, now],
            )?;
        }
        Event::TokenCreated {
            token_id,
            org_id,
            name,
            hash,
            scopes,
            expires_at,
        } => {
            tx.execute(
                "INSERT INTO tokens (id, org_id, name, hash, scopes, expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![token_id.as_str(), org_id.as_str(), name, hash, serde_json::to_string(scopes).unwrap_or_default(), expires_at, now],
            )?;
        }
        Event::AppCreated {
            app_id,
            org_id,
            name,
        } => {
            tx.execute(
                "INSERT INTO apps (id, org_id, name, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![app_id.as_str(), org_id.as_str(), name.as_str(), now],
            )?;
        }
        Event::ReleaseCreated {
            app_id,
            release_id,
            version,
            image_input,
            image,
            manifest,
            manifest_source,
        } => {
            tx.execute(
                "INSERT INTO releases (id, app_id, version, image_input, image, manifest, manifest_source, state, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'deploying', ?8, ?8)",
                params![
                    release_id.as_str(),
                    app_id.as_str(),
                    version,
                    image_input,
                    serde_json::to_string(image).unwrap_or_default(),
                    manifest.to_string(),
                    manifest_source,
                    now
                ],
            )?;
            tx.execute(
                "UPDATE apps SET release_count = MAX(release_count, ?2) WHERE id = ?1",
                params![app_id.as_str(), version],
            )?;
        }
        Event::ReleaseStateChanged {
            release_id,
            state,
            reason,
            ..
        } => {
            tx.execute(
                "UPDATE releases SET state = ?2, reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![release_id.as_str(), state.as_str(), reason, now],
            )?;
        }
        Event::HostRegistered {
            host_id,
            name,
            index,
            driver,
            cpu,
            memory,
        } => {
            tx.execute(
                "INSERT INTO hosts (id, name, idx, driver, cpu, memory, registered_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, driver = excluded.driver, cpu = excluded.cpu, memory = excluded.memory",
                params![host_id.as_str(), name, index, driver.as_str(), cpu.0, memory.0, now],
            )?;
        }
        Event::InstancePlaced { host_id, spec } => {
            tx.execute(
                "INSERT INTO instances (id, app_id, release_id, release_version, host_id, spec, state, desired_running, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', 1, ?7, ?7)",
                params![
                    spec.instance_id.as_str(),
                    spec.app_id.as_str(),
                    spec.release_id.as_str(),
                    spec.release_version,
                    host_id.as_str(),
                    serde_json::to_string(spec).unwrap_or_default(),
                    now
                ],
            )?;
        }
        Event::InstanceStateChanged {
            instance_id,
            state,
            reason,
            ..
        } => {
            tx.execute(
                "UPDATE instances SET state = ?2, reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![instance_id.as_str(), state.as_str(), reason, now],
            )?;
        }
        Event::InstanceStopRequested {
            instance_id,
            reason,
            ..
        } => {
            tx.execute(
                "UPDATE instances SET desired_running = 0, reason = CASE WHEN state = 'failed' THEN reason ELSE ?2 END, updated_at = ?3 WHERE id = ?1",
                params![instance_id.as_str(), reason, now],
            )?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRow {
    pub id: TokenId,
    pub org_id: OrgId,
    pub name: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<UnixMillis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRow {
    pub id: AppId,
    pub org_id: OrgId,
    pub name: AppName,
    pub created_at: UnixMillis,
    /// Highest release version created so far.
    pub release_count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRow {
    pub id: ReleaseId,
    pub app_id: AppId,
    pub version: u64,
    pub image_input: String,
    pub image: ImageRef,
    pub manifest: serde_json::Value,
    pub manifest_source: String,
    pub state: ReleaseState,
    pub reason: Option<String>,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRow {
    pub id: HostId,
    pub name: String,
    pub index: u16,
    pub driver: String,
    pub cpu: MilliCpu,
    pub memory: MiB,
    pub registered_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRow {
    pub id: InstanceId,
    pub app_id: AppId,
    pub release_id: ReleaseId,
    pub release_version: u64,
    pub host_id: HostId,
    pub spec: WorkloadSpec,
    pub state: InstanceState,
    pub reason: Option<String>,
    /// False once a stop was requested.
    pub desired_running: bool,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
}

/// Reads a text column holding a typed value (id, name, JSON) and fails the row cleanly if the
/// stored text does not parse, rather than panicking on a corrupted view.
fn parse_col<T, E>(
    r: &Row<'_>,
    idx: usize,
    f: impl FnOnce(&str) -> Result<T, E>,
) -> rusqlite::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let s: String = r.get(idx)?;
    f(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn json_col<T: serde::de::DeserializeOwned>(r: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    parse_col(r, idx, |s| serde_json::from_str(s))
}

fn enum_col<T>(r: &Row<'_>, idx: usize, f: fn(&str) -> Option<T>) -> rusqlite::Result<T> {
    let s: String = r.get(idx)?;
    f(&s).ok_or_else(|| rusqlite::Error::InvalidColumnType(idx, s, rusqlite::types::Type::Text))
}

fn q(query: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { query, source }
}

pub(crate) fn token_by_hash(c: &Connection, hash: &str) -> Result<Option<TokenRow>, StoreError> {
    c.query_row(
        "SELECT id, org_id, name, scopes, expires_at FROM tokens WHERE hash = ?1",
        params![hash],
        |r| {
            Ok(TokenRow {
                id: parse_col(r, 0, str::parse)?,
                org_id: parse_col(r, 1, str::parse)?,
                name: r.get(2)?,
                scopes: json_col(r, 3)?,
                expires_at: r.get(4)?,
            })
        },
    )
    .optional()
    .map_err(q("token_by_hash"))
}

pub(crate) fn orgs_count(c: &Connection) -> Result<u64, StoreError> {
    c.query_row("SELECT COUNT(*) FROM orgs", [], |r| r.get(0))
        .map_err(q("orgs_count"))
}

const APP_COLS: &str = "SELECT id, org_id, name, created_at, release_count FROM apps";

fn app_row(r: &Row<'_>) -> rusqlite::Result<AppRow> {
    Ok(AppRow {
        id: parse_col(r, 0, str::parse)?,
        org_id: parse_col(r, 1, str::parse)?,
        name: parse_col(r, 2, str::parse)?,
        created_at: r.get(3)?,
        release_count: r.get(4)?,
    })
}

pub(crate) fn app_by_name(c: &Connection, name: &str) -> Result<Option<AppRow>, StoreError> {
    c.query_row(
        &format!("{APP_COLS} WHERE name = ?1"),
        params![name],
        app_row,
    )
    .optional()
    .map_err(q("app_by_name"))
}

pub(crate) fn apps(c: &Connection, org: Option<&OrgId>) -> Result<Vec<AppRow>, StoreError> {
    let mut stmt = c
        .prepare(&format!(
            "{APP_COLS} WHERE (?1 IS NULL OR org_id = ?1) ORDER BY name"
        ))
        .map_err(q("apps"))?;
    let rows = stmt
        .query_map(params![org.map(OrgId::as_str)], app_row)
        .map_err(q("apps"))?;
    rows.collect::<Result<_, _>>().map_err(q("apps"))
}

const RELEASE_COLS: &str = "SELECT id, app_id, version, image_input, image, manifest, manifest_source, state, reason, created_at, updated_at FROM releases";

fn release_row(r: &Row<'_>) -> rusqlite::Result<ReleaseRow> {
    Ok(ReleaseRow {
        id: parse_col(r, 0, str::parse)?,
        app_id: parse_col(r, 1, str::parse)?,
        version: r.get(2)?,
        image_input: r.get(3)?,
        image: json_col(r, 4)?,
        manifest: json_col(r, 5)?,
        manifest_source: r.get(6)?,
        state: enum_col(r, 7, ReleaseState::parse)?,
        reason: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
    })
}

pub(crate) fn releases(
    c: &Connection,
    app: Option<&AppId>,
    state: Option<ReleaseState>,
) -> Result<Vec<ReleaseRow>, StoreError> {
    let mut stmt = c
        .prepare(&format!(
            "{RELEASE_COLS} WHERE (?1 IS NULL OR app_id = ?1) AND (?2 IS NULL OR state = ?2) ORDER BY app_id, version"
        ))
        .map_err(q("releases"))?;
    let rows = stmt
        .query_map(
            params![app.map(AppId::as_str), state.map(ReleaseState::as_str)],
            release_row,
        )
        .map_err(q("releases"))?;
    rows.collect::<Result<_, _>>().map_err(q("releases"))
}

pub(crate) fn release(
    c: &Connection,
    app: &AppId,
    version: u64,
) -> Result<Option<ReleaseRow>, StoreError> {
    c.query_row(
        &format!("{RELEASE_COLS} WHERE app_id = ?1 AND version = ?2"),
        params![app.as_str(), version],
        release_row,
    )
    .optional()
    .map_err(q("release"))
}

pub(crate) fn hosts(c: &Connection) -> Result<Vec<HostRow>, StoreError> {
    let mut stmt = c
        .prepare("SELECT id, name, idx, driver, cpu, memory, registered_at FROM hosts ORDER BY idx")
        .map_err(q("hosts"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok(HostRow {
                id: parse_col(r, 0, str::parse)?,
                name: r.get(1)?,
                index: r.get(2)?,
                driver: r.get(3)?,
                cpu: MilliCpu(r.get(4)?),
                memory: MiB(r.get(5)?),
                registered_at: r.get(6)?,
            })
        })
        .map_err(q("hosts"))?;
    rows.collect::<Result<_, _>>().map_err(q("hosts"))
}

pub(crate) fn instances(
    c: &Connection,
    app: Option<&AppId>,
    host: Option<&HostId>,
    id: Option<&InstanceId>,
) -> Result<Vec<InstanceRow>, StoreError> {
    let mut stmt = c
        .prepare(
            "SELECT id, app_id, release_id, release_version, host_id, spec, state, reason, desired_running, created_at, updated_at
             FROM instances WHERE (?1 IS NULL OR app_id = ?1) AND (?2 IS NULL OR host_id = ?2) AND (?3 IS NULL OR id = ?3)
             ORDER BY created_at, id",
        )
        .map_err(q("instances"))?;
    let rows = stmt
        .query_map(
            params![
                app.map(AppId::as_str),
                host.map(HostId::as_str),
                id.map(InstanceId::as_str)
            ],
            |r| {
                Ok(InstanceRow {
                    id: parse_col(r, 0, str::parse)?,
                    app_id: parse_col(r, 1, str::parse)?,
                    release_id: parse_col(r, 2, str::parse)?,
                    release_version: r.get(3)?,
                    host_id: parse_col(r, 4, str::parse)?,
                    spec: json_col(r, 5)?,
                    state: enum_col(r, 6, InstanceState::parse)?,
                    reason: r.get(7)?,
                    desired_running: r.get(8)?,
                    created_at: r.get(9)?,
                    updated_at: r.get(10)?,
                })
            },
        )
        .map_err(q("instances"))?;
    rows.collect::<Result<_, _>>().map_err(q("instances"))
}
