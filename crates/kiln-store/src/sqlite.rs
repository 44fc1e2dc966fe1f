//! The SQLite backend: one writer connection and one reader connection on a WAL-mode database.
//!
//! Appends run in an IMMEDIATE transaction, which takes SQLite's single write lock up front; so
//! sequence numbers are assigned and committed strictly in order, and a reader can never see
//! sequence N+1 before N. After commit the head watch channel is advanced.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::watch;

use kiln_types::event::{Event, ReleaseState, StreamRef, StreamType};
use kiln_types::{now_millis, AppId, HostId, InstanceId, OrgId};

use crate::views::{self, AppRow, HostRow, InstanceRow, ReleaseRow, TokenRow};
use crate::{Append, Appended, ExpectedVersion, Metadata, RecordedEvent, StoreError};

/// Schema migrations, applied in order; the index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    stream_type TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    stream_version INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    payload TEXT NOT NULL,
    metadata TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    UNIQUE (stream_type, stream_id, stream_version)
);
CREATE TABLE idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE TABLE orgs (id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY, org_id TEXT NOT NULL, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL, expires_at INTEGER, created_at INTEGER NOT NULL
);
CREATE TABLE apps (
    id TEXT PRIMARY KEY, org_id TEXT NOT NULL, name TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL, release_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE releases (
    id TEXT PRIMARY KEY, app_id TEXT NOT NULL, version INTEGER NOT NULL, image_input TEXT NOT NULL,
    image TEXT NOT NULL, manifest TEXT NOT NULL, manifest_source TEXT NOT NULL, state TEXT NOT NULL,
    reason TEXT, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
    UNIQUE (app_id, version)
);
CREATE INDEX releases_state ON releases (state);
CREATE TABLE hosts (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, idx INTEGER NOT NULL UNIQUE, driver TEXT NOT NULL,
    cpu INTEGER NOT NULL, memory INTEGER NOT NULL, registered_at INTEGER NOT NULL
);
CREATE TABLE instances (
    id TEXT PRIMARY KEY, app_id TEXT NOT NULL, release_id TEXT NOT NULL, release_version INTEGER NOT NULL,
    host_id TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,
    desired_running INTEGER NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL
);
CREATE INDEX instances_app ON instances (app_id);
CREATE INDEX instances_host ON instances (host_id);
"#];

pub(crate) struct Sqlite {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    head_tx: watch::Sender<u64>,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL in WAL mode is durable against process crashes; a power loss may lose the last
    // transactions but never corrupts the database.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves the connection usable (SQLite rolls back the open
    // transaction when it is dropped), so poisoning is not fatal here.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sqlite {
    pub(crate) fn open(path: &Path) -> Result<(Sqlite, watch::Receiver<u64>), StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let mut writer = Connection::open(path).map_err(open_err)?;
        configure(&writer).map_err(open_err)?;
        migrate(&mut writer)?;
        let reader = Connection::open(path).map_err(open_err)?;
        configure(&reader).map_err(open_err)?;
        let head: u64 = writer
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))
            .map_err(open_err)?;
        let (head_tx, head_rx) = watch::channel(head);
        Ok((
            Sqlite {
                writer: Mutex::new(writer),
                reader: Mutex::new(reader),
                head_tx,
            },
            head_rx,
        ))
    }

    pub(crate) fn append(&self, append: Append) -> Result<Appended, StoreError> {
        let first_type = append
            .events
            .first()
            .map_or("none", |e| e.event.type_name());
        let aerr = |source| StoreError::Append {
            event_type: first_type,
            source,
        };
        let mut conn = lock(&self.writer);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(aerr)?;

        if let Some(idem) = &append.idempotency {
            let found: Option<(String, u64, u64)> = tx
                .query_row(
                    "SELECT request_hash, first_seq, last_seq FROM idempotency WHERE scope = ?1 AND key = ?2",
                    params![idem.scope, idem.key],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(aerr)?;
            if let Some((hash, first, last)) = found {
                if hash != idem.request_hash {
                    return Err(StoreError::IdempotencyConflict {
                        key: idem.key.clone(),
                    });
                }
                let events = read_range(&tx, first, last)?;
                return Ok(Appended {
                    events,
                    replayed: true,
                });
            }
        }

        let now = now_millis();
        let metadata = serde_json::to_string(&append.metadata).unwrap_or_else(|_| "{}".into());
        let mut recorded = Vec::with_capacity(append.events.len());
        for new in &append.events {
            let stream = new.event.stream();
            let current = stream_version(&tx, &stream).map_err(aerr)?;
            let ok = match new.expected {
                ExpectedVersion::Any => true,
                ExpectedVersion::NoStream => current == 0,
                ExpectedVersion::Exact(v) => current == v,
            };
            if !ok {
                return Err(StoreError::conflict(&stream, new.expected, current));
            }
            let (type_name, payload) = new.event.to_parts();
            let etype = new.event.type_name();
            tx.execute(
                "INSERT INTO events (stream_type, stream_id, stream_version, event_type, schema_version, payload, metadata, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    stream.kind.as_str(),
                    stream.id,
                    current + 1,
                    type_name,
                    Event::SCHEMA_VERSION,
                    payload.to_string(),
                    metadata,
                    now
                ],
            )
            .map_err(|source| StoreError::Append { event_type: etype, source })?;
            let seq = tx.last_insert_rowid() as u64;
            views::apply(&tx, seq, now, &new.event).map_err(|source| StoreError::ApplyView {
                event_type: etype,
                seq,
                source,
            })?;
            recorded.push(RecordedEvent {
                seq,
                stream,
                stream_version: current + 1,
                schema_version: Event::SCHEMA_VERSION,
                event: new.event.clone(),
                metadata: append.metadata.clone(),
                recorded_at: now,
            });
        }
        if let (Some(idem), Some(first), Some(last)) =
            (&append.idempotency, recorded.first(), recorded.last())
        {
            tx.execute(
                "INSERT INTO idempotency (scope, key, request_hash, first_seq, last_seq, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![idem.scope, idem.key, idem.request_hash, first.seq, last.seq, now],
            )
            .map_err(aerr)?;
        }
        tx.commit().map_err(aerr)?;
        if let Some(last) = recorded.last() {
            self.head_tx.send_replace(last.seq);
        }
        Ok(Appended {
            events: recorded,
            replayed: false,
        })
    }

    pub(crate) fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let conn = lock(&self.reader);
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, stream_type, stream_id, stream_version, event_type, schema_version, payload, metadata, recorded_at
                 FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(|source| StoreError::Query { query: "read_after", source })?;
        let rows = stmt
            .query_map(params![after, limit as i64], raw_event)
            .map_err(|source| StoreError::Query {
                query: "read_after",
                source,
            })?;
        let mut out = Vec::new();
        for row in rows {
            let raw = row.map_err(|source| StoreError::Query {
                query: "read_after",
                source,
            })?;
            out.push(decode(raw)?);
        }
        Ok(out)
    }

    pub(crate) fn stream_version(&self, stream: &StreamRef) -> Result<u64, StoreError> {
        let conn = lock(&self.reader);
        stream_version(&conn, stream).map_err(|source| StoreError::Query {
            query: "stream_version",
            source,
        })
    }

    pub(crate) fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>, StoreError> {
        views::token_by_hash(&lock(&self.reader), hash)
    }
    pub(crate) fn orgs_count(&self) -> Result<u64, StoreError> {
        views::orgs_count(&lock(&self.reader))
    }
    pub(crate) fn app_by_name(&self, name: &str) -> Result<Option<AppRow>, StoreError> {
        views::app_by_name(&lock(&self.reader), name)
    }
    pub(crate) fn apps(&self, org: Option<&OrgId>) -> Result<Vec<AppRow>, StoreError> {
        views::apps(&lock(&self.reader), org)
    }
    pub(crate) fn releases(&self, app: &AppId) -> Result<Vec<ReleaseRow>, StoreError> {
        views::releases(&lock(&self.reader), Some(app), None)
    }
    pub(crate) fn releases_in_state(
        &self,
        state: ReleaseState,
    ) -> Result<Vec<ReleaseRow>, StoreError> {
        views::releases(&lock(&self.reader), None, Some(state))
    }
    pub(crate) fn release(
        &self,
        app: &AppId,
        version: u64,
    ) -> Result<Option<ReleaseRow>, StoreError> {
        views::release(&lock(&self.reader), app, version)
    }
    pub(crate) fn instances(
        &self,
        app: Option<&AppId>,
        host: Option<&HostId>,
    ) -> Result<Vec<InstanceRow>, StoreError> {
        views::instances(&lock(&self.reader), app, host, None)
    }
    pub(crate) fn instance(&self, id: &InstanceId) -> Result<Option<InstanceRow>, StoreError> {
        Ok(views::instances(&lock(&self.reader), None, None, Some(id))?
            .into_iter()
            .next())
    }
    pub(crate) fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        views::hosts(&lock(&self.reader))
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|source| StoreError::Migrate { version: 0, source })?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as u32 + 1;
        let err = |source| StoreError::Migrate { version, source };
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(())
}

fn stream_version(conn: &Connection, stream: &StreamRef) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT COALESCE(MAX(stream_version), 0) FROM events WHERE stream_type = ?1 AND stream_id = ?2",
        params![stream.kind.as_str(), stream.id],
        |r| r.get(0),
    )
}

struct RawEvent {
    seq: u64,
    stream_type: String,
    stream_id: String,
    stream_version: u64,
    event_type: String,
    schema_version: u32,
    payload: String,
    metadata: String,
    recorded_at: i64,
}

fn raw_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawEvent> {
    Ok(RawEvent {
        seq: r.get(0)?,
        stream_type: r.get(1)?,
        stream_id: r.get(2)?,
        stream_version: r.get(3)?,
        event_type: r.get(4)?,
        schema_version: r.get(5)?,
        payload: r.get(6)?,
        metadata: r.get(7)?,
        recorded_at: r.get(8)?,
    })
}

fn decode(raw: RawEvent) -> Result<RecordedEvent, StoreError> {
    let derr = |source| StoreError::Decode {
        seq: raw.seq,
        event_type: raw.event_type.clone(),
        schema_version: raw.schema_version,
        source,
    };
    let payload: serde_json::Value = serde_json::from_str(&raw.payload).map_err(derr)?;
    let event = Event::from_parts(&raw.event_type, payload).map_err(derr)?;
    let metadata: Metadata = serde_json::from_str(&raw.metadata).map_err(derr)?;
    let kind = match raw.stream_type.as_str() {
        "org" => StreamType::Org,
        "app" => StreamType::App,
        "host" => StreamType::Host,
        "instance" => StreamType::Instance,
        other => {
            return Err(StoreError::UnknownStream {
                seq: raw.seq,
                stream_type: other.to_owned(),
            })
        }
    };
    Ok(RecordedEvent {
        seq: raw.seq,
        stream: StreamRef {
            kind,
            id: raw.stream_id,
        },
        stream_version: raw.stream_version,
        schema_version: raw.schema_version,
        event,
        metadata,
        recorded_at: raw.recorded_at,
    })
}

fn read_range(conn: &Connection, first: u64, last: u64) -> Result<Vec<RecordedEvent>, StoreError> {
    let mut stmt = conn
        .prepare(
            "SELECT seq, stream_type, stream_id, stream_version, event_type, schema_version, payload, metadata, recorded_at
             FROM events WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq",
        )
        .map_err(|source| StoreError::Query { query: "read_range", source })?;
    let rows = stmt
        .query_map(params![first, last], raw_event)
        .map_err(|source| StoreError::Query {
            query: "read_range",
            source,
        })?;
    let mut out = Vec::new();
    for row in rows {
        out.push(decode(row.map_err(|source| StoreError::Query {
            query: "read_range",
            source,
        })?)?);
    }
    Ok(out)
}
