//! The SQLite backend: one writer thread that owns the write connection and commits appends in
//! batches, and a few reader connections, on a WAL-mode database.
//!
//! A batch runs in one IMMEDIATE transaction, which takes SQLite's single write lock up front;
//! so sequence numbers are assigned and committed strictly in order, and a reader can never see
//! sequence N+1 before N. Each append of a batch runs under its own SAVEPOINT, so one whose
//! view change fails is rolled back alone. After commit the head watch channel is advanced.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio::sync::{oneshot, watch};

use kiln_types::now_millis;

use crate::checksum::{RebuildReport, TableHasher, ViewChecksum};
use crate::error::DbError;
use crate::log::{self, EventRow, RawEvent};
use crate::plan::{IdemRecord, Planned, Planner};
use crate::sql::{sqlite_sql, Cols, Val};
use crate::views::{self, Query, VIEW_MIGRATIONS, VIEW_TABLES, VIEW_VERSION};
use crate::{Append, Appended, CommitHook, Options, StoreError};

/// The log's schema, in order; the index + 1 is the log schema version. Append only; old rows
/// must stay readable.
const LOG_MIGRATIONS: &[&str] = &[
    r#"
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
"#,
    // v2: keys expire (`Options::idempotency_retention`); the pruner finds them by age.
    "CREATE INDEX idempotency_created ON idempotency (created_at);",
];

/// Events read per page while replaying.
const REPLAY_PAGE: i64 = 5_000;
/// Reader connections.
const READERS: usize = 2;
/// Longest the writer waits for more appends when the previous batch had several.
const LINGER: std::time::Duration = std::time::Duration::from_micros(300);

enum Cmd {
    Append(Append, oneshot::Sender<Result<Appended, StoreError>>),
    ReplayLive(oneshot::Sender<Result<u64, StoreError>>),
    /// Delete up to `batch` idempotency keys recorded at or before `cutoff`.
    Prune {
        cutoff: i64,
        batch: u64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
}

pub(crate) struct Sqlite {
    path: PathBuf,
    cmd: Mutex<mpsc::Sender<Cmd>>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL in WAL mode is durable against process crashes; a power loss may lose the last
    // transactions but never corrupts the database.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Savepoint journals in memory, not in temp files.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Every view statement and log query stays prepared (the default cache holds 16).
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves the connection usable (SQLite rolls back the open
    // transaction when it is dropped), so poisoning is not fatal here.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| StoreError::TaskPanicked)?
}

impl Sqlite {
    pub(crate) async fn open(
        path: &Path,
        options: Options,
    ) -> Result<(Sqlite, watch::Receiver<u64>), StoreError> {
        let path = path.to_owned();
        let rt = tokio::runtime::Handle::current();
        blocking(move || {
            let open_err = |source: rusqlite::Error| StoreError::Open {
                location: path.display().to_string(),
                source: source.into(),
            };
            let mut writer = Connection::open(&path).map_err(open_err)?;
            configure(&writer).map_err(open_err)?;
            migrate(&mut writer, VIEW_VERSION)?;
            let head = head(&writer).map_err(open_err)?;
            let mut readers = Vec::new();
            for _ in 0..READERS {
                let reader = Connection::open(&path).map_err(open_err)?;
                configure(&reader).map_err(open_err)?;
                readers.push(Mutex::new(reader));
            }
            let (head_tx, head_rx) = watch::channel(head);
            let (cmd_tx, cmd_rx) = mpsc::channel();
            let max_batch = options.max_batch.max(1);
            let hook = options.commit_hook.clone();
            let retention = options.idempotency_retention;
            std::thread::Builder::new()
                .name("kiln-store-writer".into())
                .spawn(move || writer_loop(writer, cmd_rx, head_tx, max_batch, retention, hook, rt))
                .map_err(|e| StoreError::Open {
                    location: path.display().to_string(),
                    source: e.into(),
                })?;
            Ok((
                Sqlite {
                    path,
                    cmd: Mutex::new(cmd_tx),
                    readers,
                    next_reader: AtomicUsize::new(0),
                },
                head_rx,
            ))
        })
        .await
    }

    pub(crate) async fn append(&self, append: Append) -> Result<Appended, StoreError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.cmd)
            .send(Cmd::Append(append, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on a free reader connection (or waits for one).
    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        for r in &self.readers {
            if let Ok(conn) = r.try_lock() {
                return f(&conn);
            }
        }
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        f(&lock(&self.readers[i]))
    }

    pub(crate) async fn query<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        q: Query,
        params: Vec<Val>,
        map: fn(&dyn Cols) -> Result<T, DbError>,
    ) -> Result<Vec<T>, StoreError> {
        let me = self.clone();
        blocking(move || {
            me.with_reader(|c| run_query(c, q, &params, map))
                .map_err(|source| StoreError::Query {
                    query: q.name,
                    source,
                })
        })
        .await
    }

    fn open_snapshot_reader(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| rebuild_err("open reader", e))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| rebuild_err("open reader", e))?;
        Ok(conn)
    }

    pub(crate) async fn view_checksums(
        self: &std::sync::Arc<Self>,
    ) -> Result<Vec<ViewChecksum>, StoreError> {
        let me = self.clone();
        blocking(move || {
            me.with_reader(checksums)
                .map_err(|source| StoreError::Query {
                    query: "view_checksums",
                    source,
                })
        })
        .await
    }

    pub(crate) async fn rebuild_compare(
        self: &std::sync::Arc<Self>,
    ) -> Result<RebuildReport, StoreError> {
        let me = self.clone();
        blocking(move || {
            // One read transaction is one snapshot: the head, the live views and the events
            // replayed all reflect the same commit.
            let src = me.open_snapshot_reader()?;
            src.execute_batch("BEGIN")
                .map_err(|e| rebuild_err("begin snapshot", e))?;
            let head = head(&src).map_err(|e| rebuild_err("read head", e))?;
            let live = checksums(&src).map_err(|source| StoreError::Rebuild {
                step: "checksum live views",
                source,
            })?;
            let target = rebuild_path(&me.path);
            let _cleanup = RemoveOnDrop(target.clone());
            let mut dst = Connection::open(&target).map_err(|e| rebuild_err("create target", e))?;
            // The target is scratch: no journal, no syncs.
            dst.execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")
                .map_err(|e| rebuild_err("create target", e))?;
            let tx = dst
                .transaction()
                .map_err(|e| rebuild_err("create target", e))?;
            for m in VIEW_MIGRATIONS {
                tx.execute_batch(m.sql)
                    .map_err(|e| rebuild_err("create view tables", e))?;
            }
            let events = replay(&src, &tx, head)?;
            tx.commit().map_err(|e| rebuild_err("commit target", e))?;
            let rebuilt = checksums(&dst).map_err(|source| StoreError::Rebuild {
                step: "checksum rebuilt views",
                source,
            })?;
            Ok(RebuildReport {
                head,
                events,
                live,
                rebuilt,
                replaced: false,
                elapsed: std::time::Duration::ZERO,
            })
        })
        .await
    }

    /// Deletes up to `batch` expired idempotency keys, in the writer thread between batches of
    /// appends; returns how many.
    pub(crate) async fn prune_idempotency(
        &self,
        cutoff: i64,
        batch: u64,
    ) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        lock(&self.cmd)
            .send(Cmd::Prune {
                cutoff,
                batch,
                reply,
            })
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub(crate) async fn replay_live(&self) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.cmd)
            .send(Cmd::ReplayLive(tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub(crate) async fn backup(self: &std::sync::Arc<Self>, dest: &Path) -> Result<(), StoreError> {
        let me = self.clone();
        let dest = dest.to_owned();
        blocking(move || {
            let err = |e: rusqlite::Error| StoreError::Backup {
                path: dest.display().to_string(),
                source: e.into(),
            };
            let src = me.open_snapshot_reader()?;
            let mut dst = Connection::open(&dest).map_err(err)?;
            let backup = rusqlite::backup::Backup::new(&src, &mut dst).map_err(err)?;
            // All pages in one step (-1): the copy is made under one read transaction, so it is
            // a consistent snapshot, and writers (WAL) are not blocked meanwhile.
            loop {
                match backup.step(-1).map_err(err)? {
                    rusqlite::backup::StepResult::Done => break,
                    // Busy or locked by a checkpoint: try again shortly.
                    _ => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
            drop(backup);
            dst.pragma_update(None, "journal_mode", "WAL")
                .map_err(err)?;
            Ok(())
        })
        .await
    }
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn rebuild_path(db: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut name = db.file_name().unwrap_or_default().to_owned();
    name.push(format!(".rebuild-{}-{nanos}", std::process::id()));
    db.with_file_name(name)
}

fn rebuild_err(step: &'static str, e: rusqlite::Error) -> StoreError {
    StoreError::Rebuild {
        step,
        source: e.into(),
    }
}

fn run_query<T>(
    c: &Connection,
    q: Query,
    params: &[Val],
    map: fn(&dyn Cols) -> Result<T, DbError>,
) -> Result<Vec<T>, DbError> {
    let mut stmt = c.prepare_cached(&sqlite_sql(q.sql))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(map(row)?);
    }
    Ok(out)
}

fn head(c: &Connection) -> rusqlite::Result<u64> {
    c.query_row(log::HEAD.sql, [], |r| r.get(0))
}

fn checksums(c: &Connection) -> Result<Vec<ViewChecksum>, DbError> {
    let mut out = Vec::new();
    for t in VIEW_TABLES {
        let mut h = TableHasher::new(t);
        let mut stmt = c.prepare(&t.select_all())?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            h.row(row)?;
        }
        out.push(h.finish());
    }
    Ok(out)
}

/// Applies every event with `seq <= upto` from `src` to the view tables reachable from `dst`,
/// a page at a time (memory stays bounded by the page size). `src` and `dst` may be the same
/// connection. Returns the number of events replayed.
fn replay(src: &Connection, dst: &Connection, upto: u64) -> Result<u64, StoreError> {
    let mut after = 0u64;
    let mut count = 0u64;
    loop {
        let raws = run_query(
            src,
            log::READ_AFTER,
            &[after.into(), Val::Int(REPLAY_PAGE)],
            log::raw_event_row,
        )
        .map_err(|source| StoreError::Rebuild {
            step: "read events",
            source,
        })?;
        let Some(last) = raws.last() else { break };
        after = last.seq;
        for raw in raws {
            if raw.seq > upto {
                return Ok(count);
            }
            let ev = log::decode(raw)?;
            apply(dst, &ev.event, ev.recorded_at).map_err(|source| StoreError::ApplyView {
                event_type: ev.event.type_name(),
                seq: ev.seq,
                source,
            })?;
            count += 1;
        }
    }
    Ok(count)
}

fn apply(
    c: &Connection,
    event: &kiln_types::event::Event,
    at: kiln_types::UnixMillis,
) -> Result<(), DbError> {
    for (sql, params) in views::writes(event, at) {
        c.prepare_cached(&sqlite_sql(sql))?
            .execute(rusqlite::params_from_iter(params.iter()))?;
    }
    Ok(())
}

fn truncate_views(c: &Connection) -> rusqlite::Result<()> {
    for t in VIEW_TABLES {
        c.execute(&format!("DELETE FROM {}", t.name), [])?;
    }
    Ok(())
}

/// Migrates the log to the latest version and the views to `view_target`.
pub(crate) fn migrate(conn: &mut Connection, view_target: u32) -> Result<(), StoreError> {
    let err = |track, version| {
        move |source: rusqlite::Error| StoreError::Migrate {
            track,
            version,
            source: source.into(),
        }
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(err("log", 0))?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS kiln_schema (track TEXT PRIMARY KEY, version BIGINT NOT NULL)",
    )
    .map_err(err("log", 0))?;
    let version_of =
        |tx: &rusqlite::Transaction<'_>, track: &str| -> rusqlite::Result<Option<u32>> {
            tx.query_row(
                "SELECT version FROM kiln_schema WHERE track = ?1",
                [track],
                |r| r.get(0),
            )
            .optional()
        };
    let mut log_v = version_of(&tx, "log").map_err(err("log", 0))?;
    let mut view_v = version_of(&tx, "views").map_err(err("views", 0))?;
    if log_v.is_none() {
        // Stores made before the schema table existed counted one migration, which created
        // both the log and the first views, in `user_version`.
        let legacy: u32 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err("log", 0))?;
        if legacy >= 1 {
            log_v = Some(1);
            view_v = Some(1);
        }
    }
    let log_v = log_v.unwrap_or(0);
    let view_v = view_v.unwrap_or(0);
    let log_known = LOG_MIGRATIONS.len() as u32;
    if log_v > log_known {
        return Err(StoreError::SchemaTooNew {
            track: "log",
            found: log_v,
            known: log_known,
        });
    }
    if view_v > VIEW_VERSION {
        return Err(StoreError::SchemaTooNew {
            track: "views",
            found: view_v,
            known: VIEW_VERSION,
        });
    }
    for (i, sql) in LOG_MIGRATIONS.iter().enumerate().skip(log_v as usize) {
        tx.execute_batch(sql).map_err(err("log", i as u32 + 1))?;
    }
    let mut needs_replay = false;
    for (i, m) in VIEW_MIGRATIONS
        .iter()
        .enumerate()
        .take(view_target as usize)
        .skip(view_v as usize)
    {
        tx.execute_batch(m.sql)
            .map_err(err("views", i as u32 + 1))?;
        needs_replay |= m.replay;
    }
    let view_final = view_target.max(view_v);
    if needs_replay {
        tracing::info!(
            version = view_final,
            "view schema changed; rebuilding views by replay"
        );
        truncate_views(&tx).map_err(err("views", view_final))?;
        let upto = head(&tx).map_err(err("views", view_final))?;
        replay(&tx, &tx, upto)?;
    }
    tx.execute(
        "INSERT INTO kiln_schema (track, version) VALUES ('log', ?1), ('views', ?2)
         ON CONFLICT (track) DO UPDATE SET version = excluded.version",
        params![log_known, view_final],
    )
    .map_err(err("log", log_known))?;
    tx.pragma_update(None, "user_version", log_known)
        .map_err(err("log", log_known))?;
    tx.commit().map_err(err("log", log_known))?;
    Ok(())
}

fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Cmd>,
    head_tx: watch::Sender<u64>,
    max_batch: usize,
    retention: std::time::Duration,
    hook: Option<CommitHook>,
    rt: tokio::runtime::Handle,
) {
    let mut deferred: Option<Cmd> = None;
    let mut last_batch = 1;
    loop {
        let cmd = match deferred.take() {
            Some(c) => c,
            None => match rx.recv() {
                Ok(c) => c,
                // Every sender is gone: the store was dropped.
                Err(_) => return,
            },
        };
        match cmd {
            Cmd::Append(a, reply) => {
                let mut batch = vec![(a, reply)];
                // Group commit: take what is queued, and when the last batch had several
                // appends, wait a moment for their callers' next ones (at most LINGER).
                let target = last_batch.min(max_batch);
                let deadline = std::time::Instant::now() + LINGER;
                while batch.len() < max_batch {
                    let next = match rx.try_recv() {
                        Ok(c) => Some(c),
                        Err(_) if batch.len() < target => rx
                            .recv_timeout(
                                deadline.saturating_duration_since(std::time::Instant::now()),
                            )
                            .ok(),
                        Err(_) => None,
                    };
                    match next {
                        Some(Cmd::Append(a, r)) => batch.push((a, r)),
                        Some(other) => {
                            deferred = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                last_batch = batch.len();
                let (appends, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let results = commit_batch(&mut conn, &appends, retention, hook.as_ref(), &rt);
                let last = results
                    .iter()
                    .filter_map(|r| r.as_ref().ok())
                    .filter(|a| !a.replayed)
                    .filter_map(|a| a.events.last())
                    .map(|e| e.seq)
                    .max();
                if let Some(last) = last {
                    head_tx.send_if_modified(|h| {
                        let newer = last > *h;
                        if newer {
                            *h = last;
                        }
                        newer
                    });
                }
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Cmd::ReplayLive(reply) => {
                let _ = reply.send(replay_live(&mut conn));
            }
            Cmd::Prune {
                cutoff,
                batch,
                reply,
            } => {
                let _ = reply.send(prune(&conn, cutoff, batch));
            }
        }
    }
}

fn prune(conn: &Connection, cutoff: i64, batch: u64) -> Result<u64, StoreError> {
    conn.prepare_cached(
        "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency WHERE created_at <= ?1 ORDER BY created_at LIMIT ?2)",
    )
    .and_then(|mut s| s.execute(params![cutoff, batch as i64]))
    .map(|n| n as u64)
    .map_err(|source| StoreError::Query {
        query: "prune_idempotency",
        source: source.into(),
    })
}

fn replay_live(conn: &mut Connection) -> Result<u64, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| rebuild_err("begin", e))?;
    truncate_views(&tx).map_err(|e| rebuild_err("empty live views", e))?;
    let upto = head(&tx).map_err(|e| rebuild_err("read head", e))?;
    let n = replay(&tx, &tx, upto)?;
    tx.commit().map_err(|e| rebuild_err("commit", e))?;
    Ok(n)
}

/// Commits a batch; one result per append, in order.
fn commit_batch(
    conn: &mut Connection,
    appends: &[Append],
    retention: std::time::Duration,
    hook: Option<&CommitHook>,
    rt: &tokio::runtime::Handle,
) -> Vec<Result<Appended, StoreError>> {
    let fail_all = |e: StoreError| appends.iter().map(|_| Err(e.duplicate())).collect();
    let first_type = appends
        .first()
        .and_then(|a| a.events.first())
        .map_or("none", |e| e.event.type_name());
    let aerr = |source: rusqlite::Error| StoreError::Append {
        event_type: first_type,
        source: source.into(),
    };
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return fail_all(aerr(e)),
    };
    let head = match head(&tx) {
        Ok(h) => h,
        Err(e) => return fail_all(aerr(e)),
    };
    let mut planner = Planner::new(head, now_millis());
    // Keys recorded at or before this are expired.
    let expired = planner
        .now()
        .saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
    let mut results = Vec::with_capacity(appends.len());
    let mut written = Vec::new();
    for append in appends {
        results.push(commit_one(&tx, &mut planner, append, expired, &mut written));
    }
    if let Some(hook) = hook {
        rt.block_on(hook(written.clone()));
    }
    if let Err(e) = tx.commit() {
        let e = aerr(e);
        return results
            .into_iter()
            .map(|r| r.and_then(|_| Err(e.duplicate())))
            .collect();
    }
    results
}

fn commit_one(
    tx: &Connection,
    planner: &mut Planner,
    append: &Append,
    expired: i64,
    written: &mut Vec<u64>,
) -> Result<Appended, StoreError> {
    let event_type = append
        .events
        .first()
        .map_or("none", |e| e.event.type_name());
    let aerr = |source: DbError| StoreError::Append { event_type, source };
    let (streams, keys) = planner.missing([append]);
    for s in streams {
        let v = run_query(
            tx,
            log::STREAM_VERSION,
            &[s.kind.as_str().into(), s.id.clone().into()],
            views::count_row,
        )
        .map_err(aerr)?;
        planner.load_stream(s, v.first().copied().unwrap_or(0));
    }
    for (scope, key) in keys {
        let found = run_query(
            tx,
            log::IDEMPOTENCY,
            &[scope.clone().into(), key.clone().into(), Val::Int(expired)],
            |r| {
                Ok(IdemRecord {
                    request_hash: r.text(0)?,
                    first_seq: r.uint(1)?,
                    last_seq: r.uint(2)?,
                })
            },
        )
        .map_err(aerr)?;
        if let Some(rec) = found.into_iter().next() {
            planner.load_key(scope, key, rec);
        }
    }
    let (planned, undo) = planner.plan(append);
    match planned {
        Planned::Fail(e) => Err(e),
        Planned::Replay {
            first_seq,
            last_seq,
        } => {
            let raws = run_query(
                tx,
                log::READ_RANGE,
                &[first_seq.into(), last_seq.into()],
                log::raw_event_row,
            )
            .map_err(aerr)?;
            let events = raws
                .into_iter()
                .map(log::decode)
                .collect::<Result<_, _>>()?;
            Ok(Appended {
                events,
                replayed: true,
            })
        }
        Planned::Write {
            events,
            idempotency,
        } => {
            tx.execute_batch("SAVEPOINT append")
                .map_err(|e| aerr(e.into()))?;
            match write(tx, &events, idempotency.as_ref(), planner.now()) {
                Ok(()) => {
                    tx.execute_batch("RELEASE append")
                        .map_err(|e| aerr(e.into()))?;
                    written.extend(events.iter().map(|e| e.seq));
                    Ok(Appended {
                        events,
                        replayed: false,
                    })
                }
                Err(e) => {
                    let _ = tx.execute_batch("ROLLBACK TO append; RELEASE append");
                    planner.undo(undo);
                    Err(e)
                }
            }
        }
    }
}

fn write(
    tx: &Connection,
    events: &[crate::RecordedEvent],
    idem: Option<&crate::Idempotency>,
    now: kiln_types::UnixMillis,
) -> Result<(), StoreError> {
    for e in events {
        let event_type = e.event.type_name();
        let row = EventRow::of(e);
        tx.prepare_cached(
            "INSERT INTO events (seq, stream_type, stream_id, stream_version, event_type, schema_version, payload, metadata, recorded_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .and_then(|mut s| {
            s.execute(params![
                row.seq,
                row.stream_type,
                row.stream_id,
                row.stream_version,
                row.event_type,
                row.schema_version,
                row.payload,
                row.metadata,
                row.recorded_at
            ])
        })
        .map_err(|source| StoreError::Append {
            event_type,
            source: source.into(),
        })?;
        apply(tx, &e.event, e.recorded_at).map_err(|source| StoreError::ApplyView {
            event_type,
            seq: e.seq,
            source,
        })?;
    }
    if let (Some(idem), Some(first), Some(last)) = (idem, events.first(), events.last()) {
        tx.prepare_cached(
            // A key still in the table but expired (not pruned yet) is replaced: it behaves as
            // new.
            "INSERT INTO idempotency (scope, key, request_hash, first_seq, last_seq, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (scope, key) DO UPDATE SET request_hash = excluded.request_hash, first_seq = excluded.first_seq, last_seq = excluded.last_seq, created_at = excluded.created_at",
        )
        .and_then(|mut s| {
            s.execute(params![
                idem.scope,
                idem.key,
                idem.request_hash,
                first.seq as i64,
                last.seq as i64,
                now
            ])
        })
        .map_err(|source| StoreError::Append {
            event_type: first.event.type_name(),
            source: source.into(),
        })?;
    }
    Ok(())
}

pub(crate) mod testing {
    use super::*;

    /// Creates (or migrates) a SQLite store's schema with only the first `view_version` view
    /// migrations, as an older build would have left it.
    pub fn sqlite_init_at(path: &Path, view_version: u32) -> Result<(), StoreError> {
        let mut conn = Connection::open(path).map_err(|e| StoreError::Open {
            location: path.display().to_string(),
            source: e.into(),
        })?;
        migrate(&mut conn, view_version)
    }

    /// Inserts stored event rows as they are, without touching the views (as an older build,
    /// or a corruption, would have left them).
    pub fn sqlite_insert_raw(path: &Path, rows: &[RawRow]) -> Result<(), StoreError> {
        let conn = Connection::open(path).map_err(|e| StoreError::Open {
            location: path.display().to_string(),
            source: e.into(),
        })?;
        for r in rows {
            conn.execute(
                "INSERT INTO events (seq, stream_type, stream_id, stream_version, event_type, schema_version, payload, metadata, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![r.seq as i64, r.stream_type, r.stream_id, r.stream_version as i64, r.event_type, r.schema_version, r.payload, r.metadata, r.recorded_at],
            )
            .map_err(|e| StoreError::Append { event_type: "raw", source: e.into() })?;
        }
        Ok(())
    }

    /// An `events` row, for [`sqlite_insert_raw`] and `postgres_insert_raw`.
    #[derive(Debug, Clone)]
    pub struct RawRow {
        pub seq: u64,
        pub stream_type: String,
        pub stream_id: String,
        pub stream_version: u64,
        pub event_type: String,
        pub schema_version: i64,
        pub payload: String,
        pub metadata: String,
        pub recorded_at: i64,
    }

    impl From<RawEvent> for RawRow {
        fn from(r: RawEvent) -> Self {
            RawRow {
                seq: r.seq,
                stream_type: r.stream_type,
                stream_id: r.stream_id,
                stream_version: r.stream_version,
                event_type: r.event_type,
                schema_version: r.schema_version,
                payload: r.payload,
                metadata: r.metadata,
                recorded_at: r.recorded_at,
            }
        }
    }
}
