//! Materialized views: their schema and its migrations, how each event changes them, and the
//! queries the API runs. Everything here is dialect-neutral SQL (see [`crate::sql`]) shared by both
//! backends.
//!
//! [`writes`] is the only source of view changes and is a function of the event and its recorded
//! time alone, so replaying the log from the start rebuilds every view exactly.

use serde::{Deserialize, Serialize};

use kiln_types::event::{Event, ReleaseState};
use kiln_types::{
    AppId, AppName, HostId, ImageRef, InstanceId, InstanceState, MiB, MilliCpu, OrgId, ReleaseId,
    TokenId, UnixMillis, WorkloadSpec,
};

use crate::error::DbError;
use crate::sql::{parsed, Cols, Val};

/// One step of the view schema. Views are derived data, so a step may change anything about
/// them; a step whose change cannot be expressed as a cheap in-place SQL edit sets `replay`, and
/// the migration then empties every view and replays the whole log into it (in the same
/// transaction as the DDL).
pub(crate) struct ViewMigration {
    pub sql: &'static str,
    pub replay: bool,
}

/// The view schema, in order; the index + 1 is the view schema version. Append only.
pub(crate) const VIEW_MIGRATIONS: &[ViewMigration] = &[
    ViewMigration {
        sql: r#"
CREATE TABLE orgs (id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY, org_id TEXT NOT NULL, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL, expires_at BIGINT, created_at BIGINT NOT NULL
);
CREATE TABLE apps (
    id TEXT PRIMARY KEY, org_id TEXT NOT NULL, name TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL, release_count BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE releases (
    id TEXT PRIMARY KEY, app_id TEXT NOT NULL, version BIGINT NOT NULL, image_input TEXT NOT NULL,
    image TEXT NOT NULL, manifest TEXT NOT NULL, manifest_source TEXT NOT NULL, state TEXT NOT NULL,
    reason TEXT, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL,
    UNIQUE (app_id, version)
);
CREATE INDEX releases_state ON releases (state);
CREATE TABLE hosts (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, idx BIGINT NOT NULL UNIQUE, driver TEXT NOT NULL,
    cpu BIGINT NOT NULL, memory BIGINT NOT NULL, registered_at BIGINT NOT NULL
);
CREATE TABLE instances (
    id TEXT PRIMARY KEY, app_id TEXT NOT NULL, release_id TEXT NOT NULL,
    release_version BIGINT NOT NULL, host_id TEXT NOT NULL, spec TEXT NOT NULL,
    state TEXT NOT NULL, reason TEXT, desired_running BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL
);
CREATE INDEX instances_app ON instances (app_id);
CREATE INDEX instances_host ON instances (host_id);
"#,
        replay: false,
    },
    // v2: when each host's agent last registered (an agent registers at every start). Only the
    // log knows the past registrations, so the column is filled by replay.
    ViewMigration {
        sql: "ALTER TABLE hosts ADD COLUMN last_registered_at BIGINT NOT NULL DEFAULT 0;",
        replay: true,
    },
    // v3: public addresses and ports of the edges owned by apps. `address` is `*` for a port of
    // the shared addresses; `port` is 0 for a whole dedicated address. The primary key settles two
    // apps claiming the same port at once: the second append fails.
    ViewMigration {
        sql: r#"
CREATE TABLE edge_allocations (
    address TEXT NOT NULL, port BIGINT NOT NULL, app_id TEXT NOT NULL, allocated_at BIGINT NOT NULL,
    PRIMARY KEY (address, port)
);
"#,
        replay: true,
    },
];

/// The current view schema version.
pub(crate) const VIEW_VERSION: u32 = VIEW_MIGRATIONS.len() as u32;

/// How a column is rendered for checksums: the same value gives the same bytes on both backends
/// (SQLite has no boolean type and stores 0/1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Text,
    Int,
    Bool,
}

/// A view table as the checksum and the replay see it.
pub(crate) struct ViewTable {
    pub name: &'static str,
    pub key: &'static str,
    pub cols: &'static [(&'static str, Kind)],
}

use Kind::{Bool, Int, Text};

/// Every view table at the current schema version, in a fixed order.
pub(crate) const VIEW_TABLES: &[ViewTable] = &[
    ViewTable {
        name: "orgs",
        key: "id",
        cols: &[("id", Text), ("name", Text), ("created_at", Int)],
    },
    ViewTable {
        name: "tokens",
        key: "id",
        cols: &[
            ("id", Text),
            ("org_id", Text),
            ("name", Text),
            ("hash", Text),
            ("scopes", Text),
            ("expires_at", Int),
            ("created_at", Int),
        ],
    },
    ViewTable {
        name: "apps",
        key: "id",
        cols: &[
            ("id", Text),
            ("org_id", Text),
            ("name", Text),
            ("created_at", Int),
            ("release_count", Int),
        ],
    },
    ViewTable {
        name: "releases",
        key: "id",
        cols: &[
            ("id", Text),
            ("app_id", Text),
            ("version", Int),
            ("image_input", Text),
            ("image", Text),
            ("manifest", Text),
            ("manifest_source", Text),
            ("state", Text),
            ("reason", Text),
            ("created_at", Int),
            ("updated_at", Int),
        ],
    },
    ViewTable {
        name: "hosts",
        key: "id",
        cols: &[
            ("id", Text),
            ("name", Text),
            ("idx", Int),
            ("driver", Text),
            ("cpu", Int),
            ("memory", Int),
            ("registered_at", Int),
            ("last_registered_at", Int),
        ],
    },
    ViewTable {
        name: "instances",
        key: "id",
        cols: &[
            ("id", Text),
            ("app_id", Text),
            ("release_id", Text),
            ("release_version", Int),
            ("host_id", Text),
            ("spec", Text),
            ("state", Text),
            ("reason", Text),
            ("desired_running", Bool),
            ("created_at", Int),
            ("updated_at", Int),
        ],
    },
    ViewTable {
        name: "edge_allocations",
        key: "address, port",
        cols: &[
            ("address", Text),
            ("port", Int),
            ("app_id", Text),
            ("allocated_at", Int),
        ],
    },
];

/// `edge_allocations.address` of a port of the shared addresses.
pub(crate) const SHARED_ADDRESS: &str = "*";

impl ViewTable {
    pub(crate) fn select_all(&self) -> String {
        let cols: Vec<&str> = self.cols.iter().map(|(c, _)| *c).collect();
        format!(
            "SELECT {} FROM {} ORDER BY {}",
            cols.join(", "),
            self.name,
            self.key
        )
    }
}

/// One change to a view table.
pub(crate) type Write = (&'static str, Vec<Val>);

pub(crate) const INSERT_ORG: &str = "INSERT INTO orgs (id, name, created_at) VALUES ($1, $2, $3)";
pub(crate) const INSERT_TOKEN: &str = "INSERT INTO tokens (id, org_id, name, hash, scopes, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)";
pub(crate) const INSERT_APP: &str =
    "INSERT INTO apps (id, org_id, name, created_at) VALUES ($1, $2, $3, $4)";
pub(crate) const INSERT_RELEASE: &str = "INSERT INTO releases (id, app_id, version, image_input, image, manifest, manifest_source, state, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'deploying', $8, $8)";
pub(crate) const RAISE_RELEASE_COUNT: &str = "UPDATE apps SET release_count = CASE WHEN release_count < $2 THEN $2 ELSE release_count END WHERE id = $1";
pub(crate) const SET_RELEASE_STATE: &str =
    "UPDATE releases SET state = $2, reason = $3, updated_at = $4 WHERE id = $1";
pub(crate) const UPSERT_HOST: &str = "INSERT INTO hosts (id, name, idx, driver, cpu, memory, registered_at, last_registered_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7) ON CONFLICT (id) DO UPDATE SET name = excluded.name, driver = excluded.driver, cpu = excluded.cpu, memory = excluded.memory, last_registered_at = excluded.last_registered_at";
pub(crate) const INSERT_INSTANCE: &str = "INSERT INTO instances (id, app_id, release_id, release_version, host_id, spec, state, desired_running, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', TRUE, $7, $7)";
pub(crate) const SET_INSTANCE_STATE: &str =
    "UPDATE instances SET state = $2, reason = $3, updated_at = $4 WHERE id = $1";
pub(crate) const STOP_INSTANCE: &str = "UPDATE instances SET desired_running = FALSE, reason = CASE WHEN state = 'failed' THEN reason ELSE $2 END, updated_at = $3 WHERE id = $1";

pub(crate) const INSERT_ALLOCATION: &str =
    "INSERT INTO edge_allocations (address, port, app_id, allocated_at) VALUES ($1, $2, $3, $4)";
pub(crate) const DELETE_ALLOCATION: &str =
    "DELETE FROM edge_allocations WHERE address = $1 AND port = $2 AND app_id = $3";

fn json(v: &impl Serialize) -> Val {
    Val::Text(serde_json::to_string(v).unwrap_or_default())
}

/// The view changes of one event recorded at `at`.
pub(crate) fn writes(event: &Event, at: UnixMillis) -> Vec<Write> {
    let at = Val::Int(at);
    match event {
        Event::OrgCreated { org_id, name } => vec![(
            INSERT_ORG,
            vec![org_id.as_str().into(), name.as_str().into(), at],
        )],
        Event::TokenCreated {
            token_id,
            org_id,
            name,
            hash,
            scopes,
            expires_at,
        } => vec![(
            INSERT_TOKEN,
            vec![
                token_id.as_str().into(),
                org_id.as_str().into(),
                name.as_str().into(),
                hash.as_str().into(),
                json(scopes),
                Val::OptInt(*expires_at),
                at,
            ],
        )],
        Event::AppCreated {
            app_id,
            org_id,
            name,
        } => vec![(
            INSERT_APP,
            vec![
                app_id.as_str().into(),
                org_id.as_str().into(),
                name.as_str().into(),
                at,
            ],
        )],
        Event::ReleaseCreated {
            app_id,
            release_id,
            version,
            image_input,
            image,
            manifest,
            manifest_source,
        } => vec![
            (
                INSERT_RELEASE,
                vec![
                    release_id.as_str().into(),
                    app_id.as_str().into(),
                    (*version).into(),
                    image_input.as_str().into(),
                    json(image),
                    Val::Text(manifest.to_string()),
                    manifest_source.as_str().into(),
                    at,
                ],
            ),
            (
                RAISE_RELEASE_COUNT,
                vec![app_id.as_str().into(), (*version).into()],
            ),
        ],
        Event::ReleaseStateChanged {
            release_id,
            state,
            reason,
            ..
        } => vec![(
            SET_RELEASE_STATE,
            vec![
                release_id.as_str().into(),
                state.as_str().into(),
                reason.clone().into(),
                at,
            ],
        )],
        Event::HostRegistered {
            host_id,
            name,
            index,
            driver,
            cpu,
            memory,
        } => vec![(
            UPSERT_HOST,
            vec![
                host_id.as_str().into(),
                name.as_str().into(),
                (*index).into(),
                driver.as_str().into(),
                cpu.0.into(),
                memory.0.into(),
                at,
            ],
        )],
        Event::InstancePlaced { host_id, spec } => vec![(
            INSERT_INSTANCE,
            vec![
                spec.instance_id.as_str().into(),
                spec.app_id.as_str().into(),
                spec.release_id.as_str().into(),
                spec.release_version.into(),
                host_id.as_str().into(),
                json(spec),
                at,
            ],
        )],
        Event::InstanceStateChanged {
            instance_id,
            state,
            reason,
            ..
        } => vec![(
            SET_INSTANCE_STATE,
            vec![
                instance_id.as_str().into(),
                state.as_str().into(),
                reason.clone().into(),
                at,
            ],
        )],
        Event::InstanceStopRequested {
            instance_id,
            reason,
            ..
        } => vec![(
            STOP_INSTANCE,
            vec![instance_id.as_str().into(), reason.as_str().into(), at],
        )],
        Event::PortAllocated { app_id, port } => vec![(
            INSERT_ALLOCATION,
            vec![
                SHARED_ADDRESS.into(),
                (*port).into(),
                app_id.as_str().into(),
                at,
            ],
        )],
        Event::PortReleased { app_id, port } => vec![(
            DELETE_ALLOCATION,
            vec![
                SHARED_ADDRESS.into(),
                (*port).into(),
                app_id.as_str().into(),
            ],
        )],
        Event::Ipv4Allocated { app_id, address } => vec![(
            INSERT_ALLOCATION,
            vec![
                address.to_string().into(),
                0u16.into(),
                app_id.as_str().into(),
                at,
            ],
        )],
        Event::Ipv4Released { app_id, address } => vec![(
            DELETE_ALLOCATION,
            vec![
                address.to_string().into(),
                0u16.into(),
                app_id.as_str().into(),
            ],
        )],
        // The audit trail is read from the log itself.
        Event::AuditRecorded { .. } => vec![],
    }
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
    /// First registration.
    pub registered_at: UnixMillis,
    /// Latest registration (the agent's last start).
    pub last_registered_at: UnixMillis,
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

/// A public port or address of the edges owned by an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Allocation {
    /// A port of every shared address.
    SharedPort(u16),
    /// A whole dedicated IPv4 address.
    DedicatedIpv4(std::net::Ipv4Addr),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationRow {
    pub allocation: Allocation,
    pub app_id: AppId,
    pub allocated_at: UnixMillis,
}

/// A read query: its name (for errors) and its SQL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Query {
    pub name: &'static str,
    pub sql: &'static str,
}

pub(crate) const TOKEN_BY_HASH: Query = Query {
    name: "token_by_hash",
    sql: "SELECT id, org_id, name, scopes, expires_at FROM tokens WHERE hash = $1",
};
pub(crate) const ORGS_COUNT: Query = Query {
    name: "orgs_count",
    sql: "SELECT COUNT(*) FROM orgs",
};
pub(crate) const APP_BY_NAME: Query = Query {
    name: "app_by_name",
    sql: "SELECT id, org_id, name, created_at, release_count FROM apps WHERE name = $1",
};
pub(crate) const APPS_ALL: Query = Query {
    name: "apps",
    sql: "SELECT id, org_id, name, created_at, release_count FROM apps ORDER BY name",
};
pub(crate) const APPS_OF_ORG: Query = Query {
    name: "apps",
    sql: "SELECT id, org_id, name, created_at, release_count FROM apps WHERE org_id = $1 ORDER BY name",
};
pub(crate) const RELEASES_OF_APP: Query = Query {
    name: "releases",
    sql: "SELECT id, app_id, version, image_input, image, manifest, manifest_source, state, reason, created_at, updated_at FROM releases WHERE app_id = $1 ORDER BY version",
};
pub(crate) const RELEASES_IN_STATE: Query = Query {
    name: "releases_in_state",
    sql: "SELECT id, app_id, version, image_input, image, manifest, manifest_source, state, reason, created_at, updated_at FROM releases WHERE state = $1 ORDER BY app_id, version",
};
pub(crate) const RELEASE: Query = Query {
    name: "release",
    sql: "SELECT id, app_id, version, image_input, image, manifest, manifest_source, state, reason, created_at, updated_at FROM releases WHERE app_id = $1 AND version = $2",
};
pub(crate) const HOSTS: Query = Query {
    name: "hosts",
    sql: "SELECT id, name, idx, driver, cpu, memory, registered_at, last_registered_at FROM hosts ORDER BY idx",
};
pub(crate) const INSTANCES_ALL: Query = Query {
    name: "instances",
    sql: "SELECT id, app_id, release_id, release_version, host_id, spec, state, reason, desired_running, created_at, updated_at FROM instances ORDER BY created_at, id",
};
pub(crate) const INSTANCES_OF_APP: Query = Query {
    name: "instances_of_app",
    sql: "SELECT id, app_id, release_id, release_version, host_id, spec, state, reason, desired_running, created_at, updated_at FROM instances WHERE app_id = $1 ORDER BY created_at, id",
};
pub(crate) const INSTANCES_ON_HOST: Query = Query {
    name: "instances_on_host",
    sql: "SELECT id, app_id, release_id, release_version, host_id, spec, state, reason, desired_running, created_at, updated_at FROM instances WHERE host_id = $1 ORDER BY created_at, id",
};
pub(crate) const INSTANCE: Query = Query {
    name: "instance",
    sql: "SELECT id, app_id, release_id, release_version, host_id, spec, state, reason, desired_running, created_at, updated_at FROM instances WHERE id = $1",
};

pub(crate) const ALLOCATIONS: Query = Query {
    name: "edge_allocations",
    sql: "SELECT address, port, app_id, allocated_at FROM edge_allocations ORDER BY address, port",
};

fn parse<T: std::str::FromStr>(s: &str) -> Option<T> {
    s.parse().ok()
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_str(s).ok()
}

pub(crate) fn token_row(r: &dyn Cols) -> Result<TokenRow, DbError> {
    Ok(TokenRow {
        id: parsed(r, 0, parse)?,
        org_id: parsed(r, 1, parse)?,
        name: r.text(2)?,
        scopes: parsed(r, 3, from_json)?,
        expires_at: r.opt_int(4)?,
    })
}

pub(crate) fn count_row(r: &dyn Cols) -> Result<u64, DbError> {
    r.uint(0)
}

pub(crate) fn app_row(r: &dyn Cols) -> Result<AppRow, DbError> {
    Ok(AppRow {
        id: parsed(r, 0, parse)?,
        org_id: parsed(r, 1, parse)?,
        name: parsed(r, 2, parse)?,
        created_at: r.int(3)?,
        release_count: r.uint(4)?,
    })
}

pub(crate) fn release_row(r: &dyn Cols) -> Result<ReleaseRow, DbError> {
    Ok(ReleaseRow {
        id: parsed(r, 0, parse)?,
        app_id: parsed(r, 1, parse)?,
        version: r.uint(2)?,
        image_input: r.text(3)?,
        image: parsed(r, 4, from_json)?,
        manifest: parsed(r, 5, from_json)?,
        manifest_source: r.text(6)?,
        state: parsed(r, 7, ReleaseState::parse)?,
        reason: r.opt_text(8)?,
        created_at: r.int(9)?,
        updated_at: r.int(10)?,
    })
}

pub(crate) fn host_row(r: &dyn Cols) -> Result<HostRow, DbError> {
    let index = r.int(2)?;
    let cpu = r.int(4)?;
    Ok(HostRow {
        id: parsed(r, 0, parse)?,
        name: r.text(1)?,
        index: u16::try_from(index).map_err(|_| DbError::Column {
            column: 2,
            value: index.to_string(),
        })?,
        driver: r.text(3)?,
        cpu: MilliCpu(u32::try_from(cpu).map_err(|_| DbError::Column {
            column: 4,
            value: cpu.to_string(),
        })?),
        memory: MiB(r.uint(5)?),
        registered_at: r.int(6)?,
        last_registered_at: r.int(7)?,
    })
}

pub(crate) fn instance_row(r: &dyn Cols) -> Result<InstanceRow, DbError> {
    Ok(InstanceRow {
        id: parsed(r, 0, parse)?,
        app_id: parsed(r, 1, parse)?,
        release_id: parsed(r, 2, parse)?,
        release_version: r.uint(3)?,
        host_id: parsed(r, 4, parse)?,
        spec: parsed(r, 5, from_json)?,
        state: parsed(r, 6, InstanceState::parse)?,
        reason: r.opt_text(7)?,
        desired_running: r.boolean(8)?,
        created_at: r.int(9)?,
        updated_at: r.int(10)?,
    })
}

pub(crate) fn allocation_row(r: &dyn Cols) -> Result<AllocationRow, DbError> {
    let address = r.text(0)?;
    let port = r.int(1)?;
    let bad = |column: usize, value: String| DbError::Column { column, value };
    let allocation = if address == SHARED_ADDRESS {
        Allocation::SharedPort(u16::try_from(port).map_err(|_| bad(1, port.to_string()))?)
    } else {
        Allocation::DedicatedIpv4(address.parse().map_err(|_| bad(0, address.clone()))?)
    };
    Ok(AllocationRow {
        allocation,
        app_id: parsed(r, 2, parse)?,
        allocated_at: r.int(3)?,
    })
}
