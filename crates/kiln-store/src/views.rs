//! Materialized views: their schema and its migrations, how each event changes them, and the
//! queries the API runs. Everything here is dialect-neutral SQL (see [`crate::sql`]) shared by both
//! backends.
//!
//! [`writes`] is the only source of view changes and is a function of the event and its recorded
//! time alone, so replaying the log from the start rebuilds every view exactly.

use serde::{Deserialize, Serialize};

use kiln_types::dns::Hostname;
use kiln_types::event::{Event, ReleaseState, Role};
use kiln_types::secrets::SecretName;
use kiln_types::{
    AppId, AppName, HostId, ImageRef, InstanceId, InstanceState, MiB, MilliCpu, OrgId, ReleaseId,
    TokenId, UnixMillis, UserId, VolumeId, WorkloadSpec,
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
    // v4: users, their memberships of orgs, and what tokens gained: the user they act for, the
    // one app they are restricted to, revocation and last use. No event filling the new columns
    // existed before, so no replay is needed.
    ViewMigration {
        sql: r#"
CREATE TABLE users (
    id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, password_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE memberships (
    org_id TEXT NOT NULL, user_id TEXT NOT NULL, role TEXT NOT NULL, created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL, PRIMARY KEY (org_id, user_id)
);
CREATE INDEX memberships_user ON memberships (user_id);
ALTER TABLE tokens ADD COLUMN user_id TEXT;
ALTER TABLE tokens ADD COLUMN app_id TEXT;
ALTER TABLE tokens ADD COLUMN revoked_at BIGINT;
ALTER TABLE tokens ADD COLUMN last_used_at BIGINT;
CREATE INDEX tokens_org ON tokens (org_id);
"#,
        replay: false,
    },
    // v5: host state (ready, draining, down) and why; every host was ready before the event
    // existed, which the defaults say.
    ViewMigration {
        sql: "ALTER TABLE hosts ADD COLUMN state TEXT NOT NULL DEFAULT 'ready'; ALTER TABLE hosts ADD COLUMN state_reason TEXT;",
        replay: false,
    },
    // v6: secrets. `data_keys` holds each org's data key, wrapped by a master key. `secret_envs`
    // holds each app environment's current secrets version. `secret_entries` holds every value
    // (ciphertext) with the versions it is valid in, [from_version, to_version): the secrets of
    // any version, current or pinned by an old release, are one range query, and a change never
    // copies the unchanged ones. `releases.secrets_version` pins a release's version.
    ViewMigration {
        sql: r#"
CREATE TABLE data_keys (
    id TEXT PRIMARY KEY, org_id TEXT NOT NULL, master_key_id TEXT NOT NULL, wrapped TEXT NOT NULL,
    created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL
);
CREATE INDEX data_keys_org ON data_keys (org_id);
CREATE TABLE secret_envs (
    app_id TEXT NOT NULL, env TEXT NOT NULL, version BIGINT NOT NULL, staged BIGINT NOT NULL,
    live_version BIGINT NOT NULL, updated_at BIGINT NOT NULL,
    PRIMARY KEY (app_id, env)
);
CREATE TABLE secret_entries (
    app_id TEXT NOT NULL, env TEXT NOT NULL, name TEXT NOT NULL, from_version BIGINT NOT NULL,
    to_version BIGINT, key_id TEXT NOT NULL, ciphertext TEXT NOT NULL, digest TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (app_id, env, name, from_version)
);
ALTER TABLE releases ADD COLUMN secrets_version BIGINT NOT NULL DEFAULT 0;
"#,
        replay: true,
    },
    // v7: the region each host is in. Registrations before regions existed carry none and mean
    // `local`, which the default says, so no replay is needed.
    ViewMigration {
        sql: "ALTER TABLE hosts ADD COLUMN region TEXT NOT NULL DEFAULT 'local';",
        replay: false,
    },
    // v8: per-org quota overrides (JSON of `QuotaOverrides`; NULL: the platform defaults). No
    // event set them before, so no replay is needed.
    ViewMigration {
        sql: "ALTER TABLE orgs ADD COLUMN quotas TEXT;",
        replay: false,
    },
    // v9: local volumes (decision 0011), one row per volume ever created; `deleted_at` is set
    // when its app is destroyed. No event of the kind existed before, so nothing to replay.
    ViewMigration {
        sql: r#"
CREATE TABLE volumes (
    id TEXT PRIMARY KEY, app_id TEXT NOT NULL, env TEXT NOT NULL, name TEXT NOT NULL,
    process TEXT NOT NULL, slot BIGINT NOT NULL, host_id TEXT NOT NULL, size BIGINT NOT NULL,
    created_at BIGINT NOT NULL, deleted_at BIGINT
);
CREATE INDEX volumes_app ON volumes (app_id);
"#,
        replay: false,
    },
    // v10: custom domains: each app environment's claims on hostnames, verified or not. A hostname
    // may be claimed by several apps while unverified (whoever controls its DNS decides which
    // one verifies), but verified by one only: the partial unique index makes the second of two
    // racing verifications fail its append.
    ViewMigration {
        sql: r#"
CREATE TABLE domains (
    app_id TEXT NOT NULL, hostname TEXT NOT NULL, env TEXT NOT NULL, token TEXT NOT NULL,
    created_at BIGINT NOT NULL, verified_at BIGINT,
    PRIMARY KEY (app_id, hostname)
);
CREATE UNIQUE INDEX domains_verified ON domains (hostname) WHERE verified_at IS NOT NULL;
CREATE INDEX domains_hostname ON domains (hostname);
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
        cols: &[
            ("id", Text),
            ("name", Text),
            ("created_at", Int),
            ("quotas", Text),
        ],
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
            ("user_id", Text),
            ("app_id", Text),
            ("revoked_at", Int),
            ("last_used_at", Int),
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
            ("secrets_version", Int),
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
            ("state", Text),
            ("state_reason", Text),
            ("region", Text),
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
    ViewTable {
        name: "users",
        key: "id",
        cols: &[
            ("id", Text),
            ("email", Text),
            ("password_hash", Text),
            ("created_at", Int),
        ],
    },
    ViewTable {
        name: "memberships",
        key: "org_id, user_id",
        cols: &[
            ("org_id", Text),
            ("user_id", Text),
            ("role", Text),
            ("created_at", Int),
            ("updated_at", Int),
        ],
    },
    ViewTable {
        name: "data_keys",
        key: "id",
        cols: &[
            ("id", Text),
            ("org_id", Text),
            ("master_key_id", Text),
            ("wrapped", Text),
            ("created_at", Int),
            ("updated_at", Int),
        ],
    },
    ViewTable {
        name: "secret_envs",
        key: "app_id, env",
        cols: &[
            ("app_id", Text),
            ("env", Text),
            ("version", Int),
            ("staged", Int),
            ("live_version", Int),
            ("updated_at", Int),
        ],
    },
    ViewTable {
        name: "secret_entries",
        key: "app_id, env, name, from_version",
        cols: &[
            ("app_id", Text),
            ("env", Text),
            ("name", Text),
            ("from_version", Int),
            ("to_version", Int),
            ("key_id", Text),
            ("ciphertext", Text),
            ("digest", Text),
            ("created_at", Int),
        ],
    },
    ViewTable {
        name: "volumes",
        key: "id",
        cols: &[
            ("id", Text),
            ("app_id", Text),
            ("env", Text),
            ("name", Text),
            ("process", Text),
            ("slot", Int),
            ("host_id", Text),
            ("size", Int),
            ("created_at", Int),
            ("deleted_at", Int),
        ],
    },
    ViewTable {
        name: "domains",
        key: "app_id, hostname",
        cols: &[
            ("app_id", Text),
            ("hostname", Text),
            ("env", Text),
            ("token", Text),
            ("created_at", Int),
            ("verified_at", Int),
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
/// `app_destroyed`: what the views hold of the app goes; its instances stay (stopped by the
/// reconciler, their rows are the host's history).
pub(crate) const DESTROY_APP: [&str; 6] = [
    "DELETE FROM apps WHERE id = $1",
    "DELETE FROM releases WHERE app_id = $1",
    "DELETE FROM edge_allocations WHERE app_id = $1",
    "DELETE FROM secret_envs WHERE app_id = $1",
    "DELETE FROM secret_entries WHERE app_id = $1",
    "DELETE FROM domains WHERE app_id = $1",
];
pub(crate) const SET_ORG_QUOTAS: &str = "UPDATE orgs SET quotas = $1 WHERE id = $2";
pub(crate) const INSERT_TOKEN: &str = "INSERT INTO tokens (id, org_id, name, hash, scopes, expires_at, created_at, user_id, app_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
pub(crate) const REVOKE_TOKEN: &str =
    "UPDATE tokens SET revoked_at = $3 WHERE id = $1 AND org_id = $2 AND revoked_at IS NULL";
pub(crate) const TOUCH_TOKEN: &str = "UPDATE tokens SET last_used_at = $3 WHERE id = $1 AND org_id = $2 AND (last_used_at IS NULL OR last_used_at < $3)";
pub(crate) const INSERT_USER: &str =
    "INSERT INTO users (id, email, password_hash, created_at) VALUES ($1, $2, $3, $4)";
pub(crate) const UPSERT_MEMBERSHIP: &str = "INSERT INTO memberships (org_id, user_id, role, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) ON CONFLICT (org_id, user_id) DO UPDATE SET role = excluded.role, updated_at = excluded.updated_at";
pub(crate) const DELETE_MEMBERSHIP: &str =
    "DELETE FROM memberships WHERE org_id = $1 AND user_id = $2";
pub(crate) const INSERT_APP: &str =
    "INSERT INTO apps (id, org_id, name, created_at) VALUES ($1, $2, $3, $4)";
pub(crate) const INSERT_RELEASE: &str = "INSERT INTO releases (id, app_id, version, image_input, image, manifest, manifest_source, state, created_at, updated_at, secrets_version) VALUES ($1, $2, $3, $4, $5, $6, $7, 'deploying', $8, $8, $9)";
pub(crate) const RAISE_RELEASE_COUNT: &str = "UPDATE apps SET release_count = CASE WHEN release_count < $2 THEN $2 ELSE release_count END WHERE id = $1";
pub(crate) const SET_RELEASE_STATE: &str =
    "UPDATE releases SET state = $2, reason = $3, updated_at = $4 WHERE id = $1";
pub(crate) const UPDATE_HOST_STATE: &str =
    "UPDATE hosts SET state = $1, state_reason = $2 WHERE id = $3";
pub(crate) const UPSERT_HOST: &str = "INSERT INTO hosts (id, name, idx, driver, cpu, memory, registered_at, last_registered_at, region) VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8) ON CONFLICT (id) DO UPDATE SET name = excluded.name, driver = excluded.driver, cpu = excluded.cpu, memory = excluded.memory, last_registered_at = excluded.last_registered_at, region = excluded.region";
pub(crate) const INSERT_INSTANCE: &str = "INSERT INTO instances (id, app_id, release_id, release_version, host_id, spec, state, desired_running, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', TRUE, $7, $7)";
pub(crate) const SET_INSTANCE_STATE: &str =
    "UPDATE instances SET state = $2, reason = $3, updated_at = $4 WHERE id = $1";
pub(crate) const STOP_INSTANCE: &str = "UPDATE instances SET desired_running = FALSE, reason = CASE WHEN state = 'failed' THEN reason ELSE $2 END, updated_at = $3 WHERE id = $1";

pub(crate) const INSERT_DATA_KEY: &str = "INSERT INTO data_keys (id, org_id, master_key_id, wrapped, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5)";
pub(crate) const REWRAP_DATA_KEY: &str =
    "UPDATE data_keys SET master_key_id = $2, wrapped = $3, updated_at = $4 WHERE id = $1";
pub(crate) const UPSERT_SECRET_ENV: &str = "INSERT INTO secret_envs (app_id, env, version, staged, live_version, updated_at) VALUES ($1, $2, $3, $4, CASE WHEN $4 = 0 THEN $3 ELSE 0 END, $5) ON CONFLICT (app_id, env) DO UPDATE SET version = excluded.version, staged = excluded.staged, live_version = CASE WHEN excluded.staged = 0 THEN excluded.version ELSE secret_envs.live_version END, updated_at = excluded.updated_at";
pub(crate) const END_SECRET_ENTRY: &str = "UPDATE secret_entries SET to_version = $4 WHERE app_id = $1 AND env = $2 AND name = $3 AND to_version IS NULL";
pub(crate) const INSERT_SECRET_ENTRY: &str = "INSERT INTO secret_entries (app_id, env, name, from_version, to_version, key_id, ciphertext, digest, created_at) VALUES ($1, $2, $3, $4, NULL, $5, $6, $7, $8)";

pub(crate) const INSERT_VOLUME: &str = "INSERT INTO volumes (id, app_id, env, name, process, slot, host_id, size, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
pub(crate) const DELETE_VOLUME: &str =
    "UPDATE volumes SET deleted_at = $2 WHERE id = $1 AND deleted_at IS NULL";
pub(crate) const INSERT_ALLOCATION: &str =
    "INSERT INTO edge_allocations (address, port, app_id, allocated_at) VALUES ($1, $2, $3, $4)";
pub(crate) const DELETE_ALLOCATION: &str =
    "DELETE FROM edge_allocations WHERE address = $1 AND port = $2 AND app_id = $3";

pub(crate) const INSERT_DOMAIN: &str =
    "INSERT INTO domains (app_id, hostname, env, token, created_at) VALUES ($1, $2, $3, $4, $5)";
/// The first verification counts: a second `domain_verified` (two replicas re-checking at once)
/// changes nothing.
pub(crate) const VERIFY_DOMAIN: &str = "UPDATE domains SET verified_at = $3 WHERE app_id = $1 AND hostname = $2 AND verified_at IS NULL";
pub(crate) const DELETE_DOMAIN: &str = "DELETE FROM domains WHERE app_id = $1 AND hostname = $2";
/// The set-based form of a view statement, for Postgres: the same change applied to many rows in
/// one statement, each of its parameters `$N` becoming an array `$N` (one element per row, typed
/// by the cast in `sql`). Every view statement reads and writes one table only, so changes to
/// different tables commute; changes to one table keep their order.
pub(crate) struct Bulk {
    /// The one-row statement this replaces.
    pub single: &'static str,
    pub sql: &'static str,
    /// The parameters naming the row the statement changes.
    pub key: &'static [usize],
    /// True when a later change to a row overwrites everything an earlier one set, whatever the
    /// row held (so of several changes to one row in a run, only the last need be sent);
    /// otherwise a run is split where a row comes again, as one statement changes a row once.
    pub fold: bool,
}

/// The statements with a set-based form: those appended often and in numbers (placements,
/// state changes, token use).
pub(crate) const BULK: &[Bulk] = &[
    Bulk {
        single: SET_INSTANCE_STATE,
        sql: "UPDATE instances AS t SET state = u.state, reason = u.reason, updated_at = u.at FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[]) AS u(id, state, reason, at) WHERE t.id = u.id",
        key: &[0],
        fold: true,
    },
    Bulk {
        single: INSERT_INSTANCE,
        sql: "INSERT INTO instances (id, app_id, release_id, release_version, host_id, spec, state, desired_running, created_at, updated_at) SELECT u.id, u.app_id, u.release_id, u.release_version, u.host_id, u.spec, 'pending', TRUE, u.at, u.at FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::bigint[]) AS u(id, app_id, release_id, release_version, host_id, spec, at)",
        key: &[0],
        fold: false,
    },
    Bulk {
        single: STOP_INSTANCE,
        sql: "UPDATE instances AS t SET desired_running = FALSE, reason = CASE WHEN t.state = 'failed' THEN t.reason ELSE u.reason END, updated_at = u.at FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS u(id, reason, at) WHERE t.id = u.id",
        key: &[0],
        fold: false,
    },
    Bulk {
        single: SET_RELEASE_STATE,
        sql: "UPDATE releases AS t SET state = u.state, reason = u.reason, updated_at = u.at FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[]) AS u(id, state, reason, at) WHERE t.id = u.id",
        key: &[0],
        fold: true,
    },
    Bulk {
        single: TOUCH_TOKEN,
        sql: "UPDATE tokens AS t SET last_used_at = u.at FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS u(id, org_id, at) WHERE t.id = u.id AND t.org_id = u.org_id AND (t.last_used_at IS NULL OR t.last_used_at < u.at)",
        key: &[0],
        fold: false,
    },
];

/// The set-based form of `single`, if it has one.
pub(crate) fn bulk_of(single: &str) -> Option<&'static Bulk> {
    BULK.iter()
        .find(|b| std::ptr::eq(b.single, single) || b.single == single)
}

/// The table a view statement changes (`INSERT INTO t`, `UPDATE t`, `DELETE FROM t`).
pub(crate) fn table_of(sql: &str) -> &str {
    let rest = sql
        .strip_prefix("INSERT INTO ")
        .or_else(|| sql.strip_prefix("UPDATE "))
        .or_else(|| sql.strip_prefix("DELETE FROM "))
        .unwrap_or(sql);
    rest.split([' ', '(']).next().unwrap_or(rest)
}

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
            user_id,
            app_id,
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
                Val::OptText(user_id.as_ref().map(|u| u.to_string())),
                Val::OptText(app_id.as_ref().map(|a| a.to_string())),
            ],
        )],
        Event::TokenRevoked { token_id, org_id } => vec![(
            REVOKE_TOKEN,
            vec![token_id.as_str().into(), org_id.as_str().into(), at],
        )],
        // The time the token was used, not the time the event was recorded: both are close, and
        // the event may be recorded a little after the request.
        Event::TokenUsed {
            token_id,
            org_id,
            at: used,
        } => vec![(
            TOUCH_TOKEN,
            vec![
                token_id.as_str().into(),
                org_id.as_str().into(),
                Val::Int(*used),
            ],
        )],
        Event::UserCreated {
            user_id,
            email,
            password_hash,
        } => vec![(
            INSERT_USER,
            vec![
                user_id.as_str().into(),
                email.as_str().into(),
                password_hash.as_str().into(),
                at,
            ],
        )],
        Event::MembershipGranted {
            org_id,
            user_id,
            role,
        } => vec![(
            UPSERT_MEMBERSHIP,
            vec![
                org_id.as_str().into(),
                user_id.as_str().into(),
                role.as_str().into(),
                at,
            ],
        )],
        Event::MembershipRevoked { org_id, user_id } => vec![(
            DELETE_MEMBERSHIP,
            vec![org_id.as_str().into(), user_id.as_str().into()],
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
            secrets_version,
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
                    (*secrets_version).into(),
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
            region,
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
                region.as_str().into(),
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
        Event::HostStateChanged {
            host_id,
            state,
            reason,
        } => vec![(
            UPDATE_HOST_STATE,
            vec![
                state.as_str().into(),
                reason.clone().into(),
                host_id.as_str().into(),
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
        Event::DataKeyCreated {
            org_id,
            key_id,
            master_key_id,
            wrapped,
        } => vec![(
            INSERT_DATA_KEY,
            vec![
                key_id.as_str().into(),
                org_id.as_str().into(),
                master_key_id.as_str().into(),
                wrapped.as_str().into(),
                at,
            ],
        )],
        Event::DataKeyRewrapped {
            key_id,
            master_key_id,
            wrapped,
            ..
        } => vec![(
            REWRAP_DATA_KEY,
            vec![
                key_id.as_str().into(),
                master_key_id.as_str().into(),
                wrapped.as_str().into(),
                at,
            ],
        )],
        Event::SecretsSet {
            app_id,
            env,
            version,
            secrets,
            staged,
        } => {
            let mut w = Vec::with_capacity(1 + 2 * secrets.len());
            for s in secrets {
                w.push((
                    END_SECRET_ENTRY,
                    vec![
                        app_id.as_str().into(),
                        env.as_str().into(),
                        s.name.as_str().into(),
                        (*version).into(),
                    ],
                ));
                w.push((
                    INSERT_SECRET_ENTRY,
                    vec![
                        app_id.as_str().into(),
                        env.as_str().into(),
                        s.name.as_str().into(),
                        (*version).into(),
                        s.key_id.as_str().into(),
                        s.ciphertext.as_str().into(),
                        s.digest.as_str().into(),
                        at.clone(),
                    ],
                ));
            }
            w.push(upsert_secret_env(app_id, env, *version, *staged, at));
            w
        }
        Event::SecretsUnset {
            app_id,
            env,
            version,
            names,
            staged,
        } => {
            let mut w: Vec<Write> = names
                .iter()
                .map(|n| {
                    (
                        END_SECRET_ENTRY,
                        vec![
                            app_id.as_str().into(),
                            env.as_str().into(),
                            n.as_str().into(),
                            (*version).into(),
                        ],
                    )
                })
                .collect();
            w.push(upsert_secret_env(app_id, env, *version, *staged, at));
            w
        }
        Event::DomainAdded {
            app_id,
            env,
            hostname,
            token,
        } => vec![(
            INSERT_DOMAIN,
            vec![
                app_id.as_str().into(),
                hostname.as_str().into(),
                env.as_str().into(),
                token.as_str().into(),
                at,
            ],
        )],
        Event::DomainVerified {
            app_id, hostname, ..
        } => vec![(
            VERIFY_DOMAIN,
            vec![app_id.as_str().into(), hostname.as_str().into(), at],
        )],
        Event::DomainRemoved {
            app_id, hostname, ..
        } => vec![(
            DELETE_DOMAIN,
            vec![app_id.as_str().into(), hostname.as_str().into()],
        )],
        // Audit only: recorded in the log, no view.
        Event::SecretsDelivered { .. } => vec![],
        // The audit trail is read from the log itself.
        Event::AuditRecorded { .. } => vec![],
        Event::AppDestroyed { app_id, .. } => DESTROY_APP
            .iter()
            .map(|sql| (*sql, vec![app_id.as_str().into()]))
            .collect(),
        Event::OrgQuotasSet { org_id, quotas } => vec![(
            SET_ORG_QUOTAS,
            vec![
                if *quotas == Default::default() {
                    None::<String>.into()
                } else {
                    serde_json::to_string(quotas).unwrap_or_default().into()
                },
                org_id.as_str().into(),
            ],
        )],
        Event::VolumeCreated {
            volume_id,
            app_id,
            env,
            name,
            process,
            slot,
            host_id,
            size,
        } => vec![(
            INSERT_VOLUME,
            vec![
                volume_id.as_str().into(),
                app_id.as_str().into(),
                env.as_str().into(),
                name.as_str().into(),
                process.as_str().into(),
                (*slot).into(),
                host_id.as_str().into(),
                size.0.into(),
                at,
            ],
        )],
        Event::VolumeDeleted { volume_id, .. } => {
            vec![(DELETE_VOLUME, vec![volume_id.as_str().into(), at])]
        }
    }
}

fn upsert_secret_env(app: &AppId, env: &str, version: u64, staged: bool, at: Val) -> Write {
    (
        UPSERT_SECRET_ENV,
        vec![
            app.as_str().into(),
            env.into(),
            version.into(),
            Val::Int(i64::from(staged)),
            at,
        ],
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRow {
    pub id: TokenId,
    pub org_id: OrgId,
    pub name: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<UnixMillis>,
    pub created_at: UnixMillis,
    pub user_id: Option<UserId>,
    pub app_id: Option<AppId>,
    pub revoked_at: Option<UnixMillis>,
    pub last_used_at: Option<UnixMillis>,
}

/// A user. `password_hash` is an argon2id PHC string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRow {
    pub id: UserId,
    pub email: String,
    pub password_hash: String,
    pub created_at: UnixMillis,
}

/// A user's membership of an org, with the org's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipRow {
    pub org_id: OrgId,
    pub org_name: String,
    pub user_id: UserId,
    pub role: Role,
    pub created_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgRow {
    pub id: OrgId,
    pub name: String,
    pub created_at: UnixMillis,
    /// Limits the operator set for this org in place of the platform defaults.
    pub quotas: kiln_types::event::QuotaOverrides,
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
    /// The secrets version the release runs with (0: none).
    pub secrets_version: u64,
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
    pub state: kiln_types::event::HostState,
    /// Why the host is in its state (missed heartbeats, who drained it).
    pub state_reason: Option<String>,
    /// The region the host is in.
    pub region: String,
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

/// A local volume: one slot of one mount of one process group, on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRow {
    pub id: VolumeId,
    pub app_id: AppId,
    pub env: String,
    /// The mount's `volume` name.
    pub name: String,
    pub process: String,
    pub slot: u32,
    pub host_id: HostId,
    pub size: MiB,
    pub created_at: UnixMillis,
    /// Set when the app was destroyed (the data is gone).
    pub deleted_at: Option<UnixMillis>,
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

macro_rules! select_tokens {
    ($tail:literal) => {
        concat!(
            "SELECT id, org_id, name, scopes, expires_at, created_at, user_id, app_id, revoked_at, last_used_at FROM tokens ",
            $tail
        )
    };
}
pub(crate) const TOKEN_BY_HASH: Query = Query {
    name: "token_by_hash",
    sql: select_tokens!("WHERE hash = $1"),
};
pub(crate) const TOKEN_BY_ID: Query = Query {
    name: "token_by_id",
    sql: select_tokens!("WHERE id = $1"),
};
pub(crate) const TOKENS_OF_ORG: Query = Query {
    name: "tokens_of_org",
    sql: select_tokens!("WHERE org_id = $1 ORDER BY created_at, id"),
};
pub(crate) const USER_BY_EMAIL: Query = Query {
    name: "user_by_email",
    sql: "SELECT id, email, password_hash, created_at FROM users WHERE email = $1",
};
pub(crate) const USER_BY_ID: Query = Query {
    name: "user_by_id",
    sql: "SELECT id, email, password_hash, created_at FROM users WHERE id = $1",
};
pub(crate) const MEMBERSHIPS_OF_USER: Query = Query {
    name: "memberships_of_user",
    sql: "SELECT m.org_id, o.name, m.user_id, m.role, m.created_at FROM memberships m JOIN orgs o ON o.id = m.org_id WHERE m.user_id = $1 ORDER BY o.name",
};
pub(crate) const ORG_BY_NAME: Query = Query {
    name: "org_by_name",
    sql: "SELECT id, name, created_at, quotas FROM orgs WHERE name = $1 ORDER BY created_at, id",
};
pub(crate) const ORG_BY_ID: Query = Query {
    name: "org_by_id",
    sql: "SELECT id, name, created_at, quotas FROM orgs WHERE id = $1",
};
pub(crate) const ORGS_COUNT: Query = Query {
    name: "orgs_count",
    sql: "SELECT COUNT(*) FROM orgs",
};
pub(crate) const APP_BY_NAME: Query = Query {
    name: "app_by_name",
    sql: "SELECT id, org_id, name, created_at, release_count FROM apps WHERE name = $1",
};
pub(crate) const APP_BY_ID: Query = Query {
    name: "app_by_id",
    sql: "SELECT id, org_id, name, created_at, release_count FROM apps WHERE id = $1",
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
    sql: "SELECT id, app_id, version, image_input, image, manifest, manifest_source, state, reason, created_at, updated_at, secrets_version FROM releases WHERE app_id = $1 ORDER BY version",
};
pub(crate) const RELEASES_IN_STATE: Query = Query {
    name: "releases_in_state",
    sql: "SELECT id, app_id, version, image_input, image, manifest, manifest_source, state, reason, created_at, updated_at, secrets_version FROM releases WHERE state = $1 ORDER BY app_id, version",
};
pub(crate) const RELEASE: Query = Query {
    name: "release",
    sql: "SELECT id, app_id, version, image_input, image, manifest, manifest_source, state, reason, created_at, updated_at, secrets_version FROM releases WHERE app_id = $1 AND version = $2",
};
pub(crate) const HOSTS: Query = Query {
    name: "hosts",
    sql: "SELECT id, name, idx, driver, cpu, memory, registered_at, last_registered_at, state, state_reason, region FROM hosts ORDER BY idx",
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

pub(crate) const VOLUMES: Query = Query {
    name: "volumes",
    sql: "SELECT id, app_id, env, name, process, slot, host_id, size, created_at, deleted_at FROM volumes WHERE deleted_at IS NULL ORDER BY app_id, process, slot, name",
};

pub(crate) const VOLUMES_DELETED_ON_HOST: Query = Query {
    name: "volumes_deleted_on_host",
    sql: "SELECT id, app_id, env, name, process, slot, host_id, size, created_at, deleted_at FROM volumes WHERE host_id = $1 AND deleted_at IS NOT NULL ORDER BY id",
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
    let opt = |i: usize| -> Result<Option<String>, DbError> { r.opt_text(i) };
    let bad = |column: usize, value: String| DbError::Column { column, value };
    Ok(TokenRow {
        id: parsed(r, 0, parse)?,
        org_id: parsed(r, 1, parse)?,
        name: r.text(2)?,
        scopes: parsed(r, 3, from_json)?,
        expires_at: r.opt_int(4)?,
        created_at: r.int(5)?,
        user_id: opt(6)?
            .map(|s| s.parse().map_err(|_| bad(6, s)))
            .transpose()?,
        app_id: opt(7)?
            .map(|s| s.parse().map_err(|_| bad(7, s)))
            .transpose()?,
        revoked_at: r.opt_int(8)?,
        last_used_at: r.opt_int(9)?,
    })
}

pub(crate) fn user_row(r: &dyn Cols) -> Result<UserRow, DbError> {
    Ok(UserRow {
        id: parsed(r, 0, parse)?,
        email: r.text(1)?,
        password_hash: r.text(2)?,
        created_at: r.int(3)?,
    })
}

pub(crate) fn membership_row(r: &dyn Cols) -> Result<MembershipRow, DbError> {
    Ok(MembershipRow {
        org_id: parsed(r, 0, parse)?,
        org_name: r.text(1)?,
        user_id: parsed(r, 2, parse)?,
        role: parsed(r, 3, Role::parse)?,
        created_at: r.int(4)?,
    })
}

pub(crate) fn org_row(r: &dyn Cols) -> Result<OrgRow, DbError> {
    Ok(OrgRow {
        id: parsed(r, 0, parse)?,
        name: r.text(1)?,
        created_at: r.int(2)?,
        quotas: match r.opt_text(3)? {
            Some(json) => serde_json::from_str(&json).map_err(|_| DbError::Column {
                column: 3,
                value: json,
            })?,
            None => Default::default(),
        },
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
        secrets_version: r.uint(11)?,
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
        state: parsed(r, 8, kiln_types::event::HostState::parse)?,
        state_reason: r.opt_text(9)?,
        region: r.text(10)?,
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

pub(crate) fn volume_row(r: &dyn Cols) -> Result<VolumeRow, DbError> {
    let slot = r.uint(5)?;
    Ok(VolumeRow {
        id: parsed(r, 0, parse)?,
        app_id: parsed(r, 1, parse)?,
        env: r.text(2)?,
        name: r.text(3)?,
        process: r.text(4)?,
        slot: u32::try_from(slot).map_err(|_| DbError::Column {
            column: 5,
            value: slot.to_string(),
        })?,
        host_id: parsed(r, 6, parse)?,
        size: MiB(r.uint(7)?),
        created_at: r.int(8)?,
        deleted_at: r.opt_int(9)?,
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

/// An org's data key, as stored: wrapped by the master key `master_key_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataKeyRow {
    pub id: String,
    pub org_id: OrgId,
    pub master_key_id: String,
    pub wrapped: String,
}

/// An app environment's current secrets version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretEnvRow {
    pub version: u64,
    /// Whether the change that made this version was staged (waits for the next deploy).
    pub staged: bool,
    /// The version of the newest change that was not staged (what `reload = "signal"`
    /// instances run with, unless their release pins a newer one).
    pub live_version: u64,
    pub updated_at: UnixMillis,
}

/// One secret as of some version: its ciphertext and the version that set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretEntryRow {
    pub name: SecretName,
    /// The secrets version that set this value.
    pub version: u64,
    pub key_id: String,
    pub ciphertext: String,
    pub digest: String,
    pub created_at: UnixMillis,
}

pub(crate) const DATA_KEYS_OF_ORG: Query = Query {
    name: "data_keys_of_org",
    sql: "SELECT id, org_id, master_key_id, wrapped FROM data_keys WHERE org_id = $1 ORDER BY created_at, id",
};
pub(crate) const DATA_KEYS_ALL: Query = Query {
    name: "data_keys",
    sql: "SELECT id, org_id, master_key_id, wrapped FROM data_keys ORDER BY id",
};
pub(crate) const SECRET_ENV: Query = Query {
    name: "secret_env",
    sql: "SELECT version, staged, updated_at, live_version FROM secret_envs WHERE app_id = $1 AND env = $2",
};
pub(crate) const SECRETS_AT: Query = Query {
    name: "secrets_at",
    sql: "SELECT name, from_version, key_id, ciphertext, digest, created_at FROM secret_entries WHERE app_id = $1 AND env = $2 AND from_version <= $3 AND (to_version IS NULL OR to_version > $3) ORDER BY name",
};

pub(crate) fn data_key_row(r: &dyn Cols) -> Result<DataKeyRow, DbError> {
    Ok(DataKeyRow {
        id: r.text(0)?,
        org_id: parsed(r, 1, parse)?,
        master_key_id: r.text(2)?,
        wrapped: r.text(3)?,
    })
}

pub(crate) fn secret_env_row(r: &dyn Cols) -> Result<SecretEnvRow, DbError> {
    Ok(SecretEnvRow {
        version: r.uint(0)?,
        staged: r.int(1)? != 0,
        updated_at: r.int(2)?,
        live_version: r.uint(3)?,
    })
}

pub(crate) fn secret_entry_row(r: &dyn Cols) -> Result<SecretEntryRow, DbError> {
    Ok(SecretEntryRow {
        name: parsed(r, 0, parse)?,
        version: r.uint(1)?,
        key_id: r.text(2)?,
        ciphertext: r.text(3)?,
        digest: r.text(4)?,
        created_at: r.int(5)?,
    })
}

/// An app environment's claim on a custom hostname.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRow {
    pub app_id: AppId,
    pub hostname: Hostname,
    pub env: String,
    /// What the `_kiln-challenge` TXT record must hold after `kiln-verify=`.
    pub token: String,
    pub created_at: UnixMillis,
    /// `None` until DNS proved the claim; only verified domains are routed.
    pub verified_at: Option<UnixMillis>,
}

macro_rules! select_domains {
    ($tail:literal) => {
        concat!(
            "SELECT app_id, hostname, env, token, created_at, verified_at FROM domains ",
            $tail
        )
    };
}
pub(crate) const DOMAINS_OF_APP: Query = Query {
    name: "domains_of_app",
    sql: select_domains!("WHERE app_id = $1 ORDER BY hostname"),
};
pub(crate) const DOMAINS_BY_HOSTNAME: Query = Query {
    name: "domains_by_hostname",
    sql: select_domains!("WHERE hostname = $1 ORDER BY created_at, app_id"),
};
pub(crate) const DOMAINS_VERIFIED: Query = Query {
    name: "domains_verified",
    sql: select_domains!("WHERE verified_at IS NOT NULL ORDER BY hostname"),
};
pub(crate) const DOMAINS_PENDING: Query = Query {
    name: "domains_pending",
    sql: select_domains!("WHERE verified_at IS NULL ORDER BY created_at, app_id, hostname"),
};

pub(crate) fn domain_row(r: &dyn Cols) -> Result<DomainRow, DbError> {
    Ok(DomainRow {
        app_id: parsed(r, 0, parse)?,
        hostname: parsed(r, 1, parse)?,
        env: r.text(2)?,
        token: r.text(3)?,
        created_at: r.int(4)?,
        verified_at: r.opt_int(5)?,
    })
}
