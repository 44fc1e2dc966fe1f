//! The Postgres backend (production, locked decision 0006).
//!
//! Writes: one committer task per store takes the appends queued since its last commit (group
//! commit) and records them in one transaction:
//! 1. Pipelined in one round trip: `BEGIN`; `pg_advisory_xact_lock(APPEND_LOCK)`, which
//!    serializes batches from every process; the transaction id (to learn the outcome of a commit
//!    whose answer is lost); the head `MAX(seq)`; the batch's idempotency keys and stream
//!    versions.
//! 2. In memory, the planner ([`crate::plan`]) decides each append in order and assigns
//!    sequences `head + 1, head + 2, ...`.
//! 3. Pipelined in a second round trip: the events (one `INSERT ... SELECT FROM UNNEST`), the
//!    keys, the view changes, `pg_notify`, `COMMIT`.
//!
//! Because the lock is held until commit and taken before the head is read, sequences commit in
//! order, without gaps: a reader that sees N has already been able to see every M < N, so a
//! watcher tailing `seq > checkpoint` can never skip a late commit. If a view change fails (a
//! unique constraint), the whole transaction is retried in careful mode, one SAVEPOINT per
//! append, and only the failing append is refused.
//!
//! Failures: a lost connection before `COMMIT` was sent retries the batch (with backoff, up to
//! `Options::retry_for`); a lost connection after `COMMIT` was sent asks the server, on a new
//! connection, for `pg_xact_status` of the transaction: committed (answer the appends as
//! planned), aborted (retry), unknown after the retry window ([`StoreError::CommitUnknown`]).
//!
//! Reads use a few pipelined connections and retry on connection loss the same way. A listener
//! connection `LISTEN`s on `kiln_events` (every commit notifies its last sequence) to advance the
//! head for appends made by other processes, and re-reads the head after reconnecting and every
//! few seconds, should a notification be lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls, Row, Statement};

use kiln_types::event::StreamRef;
use kiln_types::now_millis;

use crate::checksum::{RebuildReport, TableHasher, ViewChecksum};
use crate::error::DbError;
use crate::log::{self, EventRow};
use crate::plan::{IdemRecord, Planned, Planner, Undo};
use crate::sql::{Cols, Val};
use crate::views::{self, Query, VIEW_MIGRATIONS, VIEW_TABLES, VIEW_VERSION};
use crate::{Append, Appended, CommitHook, Idempotency, Options, RecordedEvent, StoreError};

/// Transaction-level advisory lock held by every append batch ("kilnlog!").
pub const APPEND_LOCK: i64 = 0x6b69_6c6e_6c6f_6721;
/// Session-level advisory lock held while migrating ("kilnmig!").
const MIGRATE_LOCK: i64 = 0x6b69_6c6e_6d69_6721;
/// The channel every commit notifies with its last sequence.
const CHANNEL: &str = "kiln_events";
/// Most events in one batch (a batch of big appends stops growing here).
const MAX_BATCH_EVENTS: usize = 8_192;
/// Events read per page while replaying.
const REPLAY_PAGE: i64 = 5_000;
/// Longest the committer waits for more appends when the previous batch had several.
const LINGER: Duration = Duration::from_millis(1);
/// How often the listener re-reads the head, should a notification be lost.
const HEAD_POLL: Duration = Duration::from_secs(5);

const LOG_MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    seq BIGINT PRIMARY KEY,
    stream_type TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    stream_version BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    schema_version BIGINT NOT NULL,
    payload TEXT NOT NULL,
    metadata TEXT NOT NULL,
    recorded_at BIGINT NOT NULL,
    UNIQUE (stream_type, stream_id, stream_version)
);
CREATE TABLE idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (scope, key)
);
"#,
    // v2: keys expire (`Options::idempotency_retention`); the pruner finds them by age.
    "CREATE INDEX idempotency_created ON idempotency (created_at);",
];

/// Storage settings of view tables, applied when the store opens (they change how rows are laid
/// out on disk, never what the views hold, so they are not part of the view schema). `instances`
/// rows are wide (a WorkloadSpec each, about 1 KiB) and their state changes often: with full
/// pages every update must move the row to another page and add an entry to each of its
/// indexes; with half-full pages the new version fits beside the old one (a HOT update, no index
/// entries), and the old one is reclaimed on a later visit to the page. The setting applies to
/// pages written from then on.
const VIEW_STORAGE: &[(&str, &str)] = &[("instances", "fillfactor=50")];

const LOCK_SQL: &str = "SELECT pg_advisory_xact_lock($1)";
const XID_SQL: &str = "SELECT pg_current_xact_id()::text";
const XACT_STATUS_SQL: &str = "SELECT pg_xact_status(($1::text)::xid8)";
const NOTIFY_SQL: &str = "SELECT pg_notify('kiln_events', $1)";
// LATERAL with LIMIT keeps the lookup an index probe per key whatever the planner believes
// about the table's size (a young table has no statistics).
const IDEM_LOOKUP_SQL: &str = "SELECT u.scope, u.key, i.request_hash, i.first_seq, i.last_seq FROM UNNEST($1::text[], $2::text[]) AS u(scope, key) JOIN LATERAL (SELECT request_hash, first_seq, last_seq FROM idempotency WHERE scope = u.scope AND key = u.key AND created_at > $3 LIMIT 1) i ON TRUE";
const STREAMS_LOOKUP_SQL: &str = "SELECT u.t, u.i, COALESCE((SELECT MAX(e.stream_version) FROM events e WHERE e.stream_type = u.t AND e.stream_id = u.i), 0) FROM UNNEST($1::text[], $2::text[]) AS u(t, i)";
const INSERT_EVENTS_SQL: &str = "INSERT INTO events (seq, stream_type, stream_id, stream_version, event_type, schema_version, payload, metadata, recorded_at) SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[], $7::text[], $8::text[], $9::bigint[])";
// A key still in the table but expired (not pruned yet) is replaced: it behaves as new.
const INSERT_KEYS_SQL: &str = "INSERT INTO idempotency (scope, key, request_hash, first_seq, last_seq, created_at) SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[]) ON CONFLICT (scope, key) DO UPDATE SET request_hash = excluded.request_hash, first_seq = excluded.first_seq, last_seq = excluded.last_seq, created_at = excluded.created_at";
// The age condition is on the deleted row itself, so a key renewed by an append meanwhile
// (re-checked after its row lock is released) is not deleted.
const PRUNE_KEYS_SQL: &str = "DELETE FROM idempotency WHERE created_at <= $1 AND (scope, key) IN (SELECT scope, key FROM idempotency WHERE created_at <= $1 ORDER BY created_at LIMIT $2)";

/// `postgres://user:secret@host/db` without the secret, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.rsplit_once('@') {
            let user = userinfo.split(':').next().unwrap_or("");
            return format!("{scheme}://{user}@{host}");
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Exponential backoff between retries: 20 ms doubling up to 1 s.
struct Backoff(Duration);
impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(20))
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(1));
    }
}

fn advance(head: &watch::Sender<u64>, seq: u64) {
    head.send_if_modified(|h| {
        let newer = seq > *h;
        if newer {
            *h = seq;
        }
        newer
    });
}

fn refs(params: &[Val]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

/// One connection with its prepared statements. tokio-postgres pipelines concurrent requests on
/// one connection, so a connection is shared, not checked out.
struct Conn {
    client: Client,
    stmts: std::sync::Mutex<HashMap<&'static str, Statement>>,
}

impl Conn {
    async fn connect(config: &tokio_postgres::Config) -> Result<Conn, DbError> {
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection ended");
            }
        });
        Ok(Conn {
            client,
            stmts: Default::default(),
        })
    }

    /// A connection that writes views: every view change is by key, and prepared statements
    /// keep the plan made when a table was young and tiny (no statistics yet, when a sequential
    /// scan looked cheapest), so sequential scans are ruled out.
    async fn connect_writer(config: &tokio_postgres::Config) -> Result<Conn, DbError> {
        let c = Conn::connect(config).await?;
        c.client
            .batch_execute("SET enable_seqscan = off; SET standard_conforming_strings = on")
            .await?;
        Ok(c)
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn stmt(&self, sql: &'static str) -> Result<Statement, DbError> {
        if let Some(s) = self
            .stmts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sql)
        {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.stmts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sql, s.clone());
        Ok(s)
    }

    /// Prepares every statement of `ops` not prepared yet, in one pipelined round trip.
    async fn prepare_all(&self, ops: &[Op]) -> Result<(), DbError> {
        let mut missing: Vec<&'static str> = Vec::new();
        {
            let cache = self.stmts.lock().unwrap_or_else(|e| e.into_inner());
            for op in ops {
                if let Op::Exec(sql, _) | Op::Query(sql, _) = op {
                    if !cache.contains_key(sql) && !missing.contains(sql) {
                        missing.push(sql);
                    }
                }
            }
        }
        for r in join_all(missing.iter().map(|sql| self.stmt(sql))).await {
            r?;
        }
        Ok(())
    }

    /// Sends every op without waiting for answers (one round trip), then collects the answers in
    /// order. After a failed statement the server skips to the end of the transaction, so later
    /// answers are errors too; callers look at the first error.
    async fn pipeline(&self, ops: &[Op]) -> Result<Vec<Result<Vec<Row>, DbError>>, DbError> {
        self.prepare_all(ops).await?;
        let cache = self.stmts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let futures = ops.iter().map(|op| {
            let cache = &cache;
            async move {
                match op {
                    Op::Simple(sql) => self
                        .client
                        .batch_execute(sql)
                        .await
                        .map(|_| Vec::new())
                        .map_err(DbError::from),
                    Op::Script(sql) => self
                        .client
                        .batch_execute(sql)
                        .await
                        .map(|_| Vec::new())
                        .map_err(DbError::from),
                    Op::Exec(sql, params) => {
                        let stmt = cache.get(sql).ok_or(DbError::Column {
                            column: 0,
                            value: format!("unprepared statement {sql}"),
                        })?;
                        self.client
                            .execute(stmt, &refs(params))
                            .await
                            .map(|_| Vec::new())
                            .map_err(DbError::from)
                    }
                    Op::Query(sql, params) => {
                        let stmt = cache.get(sql).ok_or(DbError::Column {
                            column: 0,
                            value: format!("unprepared statement {sql}"),
                        })?;
                        self.client
                            .query(stmt, &refs(params))
                            .await
                            .map_err(DbError::from)
                    }
                }
            }
        });
        Ok(join_all(futures).await)
    }
}

/// One statement of a pipeline.
enum Op {
    /// A statement without parameters (simple protocol): `BEGIN`, `COMMIT`, `SAVEPOINT`...
    Simple(&'static str),
    /// Several statements with inlined literals, in one simple-protocol message.
    Script(String),
    /// A prepared statement whose result rows are not needed.
    Exec(&'static str, Vec<Val>),
    /// A prepared statement whose rows are needed.
    Query(&'static str, Vec<Val>),
}

struct Pending {
    append: Append,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

pub(crate) struct Postgres {
    config: tokio_postgres::Config,
    location: String,
    options: Options,
    commits: mpsc::Sender<Pending>,
    readers: Vec<tokio::sync::Mutex<Option<Arc<Conn>>>>,
    next_reader: AtomicUsize,
    /// Dropped with the store: stops the listener.
    _shutdown: oneshot::Sender<()>,
}

fn parse_config(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| StoreError::Open {
            location: redact(url),
            source: e.into(),
        })
}

/// Connects, retrying with backoff while the server is unreachable, for up to `retry_for`.
async fn connect_retrying(
    config: &tokio_postgres::Config,
    retry_for: Duration,
    op: &'static str,
) -> Result<Conn, StoreError> {
    let started = Instant::now();
    let mut backoff = Backoff::new();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match Conn::connect(config).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_connection() && started.elapsed() < retry_for => {
                tracing::debug!(error = %e, attempts, "postgres unreachable; retrying");
                backoff.wait().await;
            }
            Err(source) => {
                return Err(StoreError::Unavailable {
                    op,
                    attempts,
                    waited_ms: started.elapsed().as_millis() as u64,
                    source,
                })
            }
        }
    }
}

impl Postgres {
    pub(crate) async fn open(
        url: &str,
        options: Options,
    ) -> Result<(Postgres, watch::Receiver<u64>), StoreError> {
        let config = parse_config(url)?;
        let location = redact(url);
        let conn = connect_retrying(&config, options.retry_for, "open")
            .await
            .map_err(|e| StoreError::Open {
                location: location.clone(),
                source: DbError::Io(std::io::Error::other(kiln_types::error_chain(&e))),
            })?;
        migrate(&conn, VIEW_VERSION).await?;
        let head = query_head(&conn).await.map_err(|source| StoreError::Open {
            location: location.clone(),
            source,
        })?;
        drop(conn);
        let (head_tx, head_rx) = watch::channel(head);
        let head_tx = Arc::new(head_tx);
        let (commits, rx) = mpsc::channel(options.max_batch.max(1) * 4);
        tokio::spawn(committer(
            config.clone(),
            rx,
            head_tx.clone(),
            options.clone(),
        ));
        let (shutdown, shutdown_rx) = oneshot::channel();
        tokio::spawn(listener(config.clone(), head_tx, shutdown_rx));
        let readers = (0..options.read_connections.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        Ok((
            Postgres {
                config,
                location,
                options,
                commits,
                readers,
                next_reader: AtomicUsize::new(0),
                _shutdown: shutdown,
            },
            head_rx,
        ))
    }

    pub(crate) async fn append(&self, append: Append) -> Result<Appended, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.commits
            .send(Pending { append, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// A reader connection (connecting if its slot is empty or its connection died).
    async fn reader(&self) -> Result<(usize, Arc<Conn>), DbError> {
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        let mut slot = self.readers[i].lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok((i, c.clone()));
        }
        let c = Arc::new(Conn::connect(&self.config).await?);
        *slot = Some(c.clone());
        Ok((i, c))
    }

    async fn forget_reader(&self, i: usize) {
        *self.readers[i].lock().await = None;
    }

    /// Runs `f` on a reader connection, retrying on connection loss with backoff for up to
    /// `Options::retry_for`.
    async fn with_reader<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: Fn(Arc<Conn>) -> Fut,
        Fut: std::future::Future<Output = Result<T, DbError>>,
    {
        let started = Instant::now();
        let mut backoff = Backoff::new();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (slot, result) = match self.reader().await {
                Ok((i, c)) => (Some(i), f(c).await),
                Err(e) => (None, Err(e)),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if e.is_connection() => {
                    if let Some(i) = slot {
                        self.forget_reader(i).await;
                    }
                    if started.elapsed() >= self.options.retry_for {
                        return Err(StoreError::Unavailable {
                            op,
                            attempts,
                            waited_ms: started.elapsed().as_millis() as u64,
                            source: e,
                        });
                    }
                    backoff.wait().await;
                }
                Err(source) => return Err(StoreError::Query { query: op, source }),
            }
        }
    }

    pub(crate) async fn query<T: Send + 'static>(
        &self,
        q: Query,
        params: Vec<Val>,
        map: fn(&dyn Cols) -> Result<T, DbError>,
    ) -> Result<Vec<T>, StoreError> {
        let params = &params;
        self.with_reader(q.name, |c| async move {
            let stmt = c.stmt(q.sql).await?;
            let rows = c.client.query(&stmt, &refs(params)).await?;
            rows.iter().map(|r| map(r)).collect()
        })
        .await
    }

    /// Deletes up to `batch` idempotency keys recorded at or before `cutoff` (one statement,
    /// its own transaction, outside the append lock); returns how many.
    pub(crate) async fn prune_idempotency(
        &self,
        cutoff: i64,
        batch: u64,
    ) -> Result<u64, StoreError> {
        let params = &[Val::Int(cutoff), Val::from(batch)];
        self.with_reader("prune_idempotency", |c| async move {
            let stmt = c.stmt(PRUNE_KEYS_SQL).await?;
            Ok(c.client.execute(&stmt, &refs(params)).await?)
        })
        .await
    }

    pub(crate) async fn view_checksums(&self) -> Result<Vec<ViewChecksum>, StoreError> {
        self.with_reader("view_checksums", |c| async move { checksums(&c).await })
            .await
    }

    pub(crate) async fn rebuild_compare(&self) -> Result<RebuildReport, StoreError> {
        let step = |step: &'static str| move |source: DbError| StoreError::Rebuild { step, source };
        // One REPEATABLE READ transaction is one snapshot: the head, the live views and the
        // events replayed all reflect the same commit, while appends go on.
        let src = Conn::connect(&self.config).await.map_err(step("connect"))?;
        src.client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| step("begin snapshot")(e.into()))?;
        let head = query_head(&src).await.map_err(step("read head"))?;
        let live = checksums(&src).await.map_err(step("checksum live views"))?;

        // Fresh view tables in a schema of their own; unqualified names resolve there.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let schema = format!("kiln_rebuild_{}_{nanos}", std::process::id());
        let dst = Conn::connect_writer(&self.config)
            .await
            .map_err(step("connect"))?;
        let result = async {
            dst.client
                .batch_execute(&format!(
                    "CREATE SCHEMA {schema}; SET search_path TO {schema}"
                ))
                .await
                .map_err(|e| step("create schema")(e.into()))?;
            for m in VIEW_MIGRATIONS {
                // Scratch tables: no WAL.
                dst.client
                    .batch_execute(&m.sql.replace("CREATE TABLE", "CREATE UNLOGGED TABLE"))
                    .await
                    .map_err(|e| step("create view tables")(e.into()))?;
            }
            dst.client
                .batch_execute("BEGIN")
                .await
                .map_err(|e| step("begin")(e.into()))?;
            let events = replay(&src, &dst, head, true).await?;
            dst.client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| step("commit")(e.into()))?;
            let rebuilt = checksums(&dst)
                .await
                .map_err(step("checksum rebuilt views"))?;
            Ok::<_, StoreError>((events, rebuilt))
        }
        .await;
        let _ = dst.client.batch_execute("ROLLBACK").await;
        if let Err(e) = dst
            .client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await
        {
            tracing::warn!(error = %e, schema, "cannot drop the rebuild schema");
        }
        let _ = src.client.batch_execute("COMMIT").await;
        let (events, rebuilt) = result?;
        Ok(RebuildReport {
            head,
            events,
            live,
            rebuilt,
            replaced: false,
            elapsed: Duration::ZERO,
        })
    }

    pub(crate) async fn replay_live(&self) -> Result<u64, StoreError> {
        let step = |step: &'static str| move |source: DbError| StoreError::Rebuild { step, source };
        let c = Conn::connect_writer(&self.config)
            .await
            .map_err(step("connect"))?;
        c.client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({APPEND_LOCK}); {}",
                truncate_sql()
            ))
            .await
            .map_err(|e| step("empty live views")(e.into()))?;
        let head = query_head(&c).await.map_err(step("read head"))?;
        let n = replay(&c, &c, head, false).await?;
        c.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| step("commit")(e.into()))?;
        tracing::info!(location = %self.location, events = n, "live views rebuilt by replay");
        Ok(n)
    }
}

fn truncate_sql() -> String {
    let names: Vec<&str> = VIEW_TABLES.iter().map(|t| t.name).collect();
    format!("TRUNCATE {};", names.join(", "))
}

async fn query_head(c: &Conn) -> Result<u64, DbError> {
    let row = c.client.query_one(log::HEAD.sql, &[]).await?;
    (&row as &dyn Cols).uint(0)
}

async fn checksums(c: &Conn) -> Result<Vec<ViewChecksum>, DbError> {
    let mut out = Vec::new();
    for t in VIEW_TABLES {
        let mut h = TableHasher::new(t);
        for row in c.client.query(&t.select_all(), &[]).await? {
            h.row(&row)?;
        }
        out.push(h.finish());
    }
    Ok(out)
}

/// Applies every event with `seq <= upto` read from `src` to the view tables of `dst` (which may
/// be the same connection), a page at a time; each page's view changes go in one pipeline.
///
/// With `commit_pages` (scratch tables that no one reads until the end), `dst` commits after
/// every page: one transaction updating the same rows again and again keeps every version of
/// them alive (HOT chains and combo command ids that cannot be pruned before commit), and each
/// update then costs more than the last.
async fn replay(src: &Conn, dst: &Conn, upto: u64, commit_pages: bool) -> Result<u64, StoreError> {
    let mut after = 0u64;
    let mut count = 0u64;
    loop {
        let stmt = src
            .stmt(log::READ_AFTER.sql)
            .await
            .map_err(|source| StoreError::Rebuild {
                step: "read events",
                source,
            })?;
        let params = [Val::from(after), Val::Int(REPLAY_PAGE)];
        let rows =
            src.client
                .query(&stmt, &refs(&params))
                .await
                .map_err(|e| StoreError::Rebuild {
                    step: "read events",
                    source: e.into(),
                })?;
        let Some(last) = rows.last() else { break };
        after = (last as &dyn Cols)
            .uint(0)
            .map_err(|source| StoreError::Rebuild {
                step: "read events",
                source,
            })?;
        let mut script = String::new();
        let mut first_seq = None;
        let mut done = false;
        for row in &rows {
            let raw = log::raw_event_row(row).map_err(|source| StoreError::Rebuild {
                step: "read events",
                source,
            })?;
            if raw.seq > upto {
                done = true;
                break;
            }
            let ev = log::decode(raw)?;
            first_seq.get_or_insert(ev.seq);
            for (sql, params) in views::writes(&ev.event, ev.recorded_at) {
                let stmt = crate::sql::inline_literals(sql, &params).map_err(|source| {
                    StoreError::ApplyView {
                        event_type: ev.event.type_name(),
                        seq: ev.seq,
                        source,
                    }
                })?;
                script.push_str(&stmt);
                script.push_str(";\n");
            }
            count += 1;
        }
        // The whole page in one message (see `inline_literals`).
        if let Err(e) = dst.client.batch_execute(&script).await {
            return Err(StoreError::ApplyView {
                event_type: "page of events starting at",
                seq: first_seq.unwrap_or(0),
                source: e.into(),
            });
        }
        if commit_pages {
            dst.client
                .batch_execute("COMMIT; BEGIN")
                .await
                .map_err(|e| StoreError::Rebuild {
                    step: "commit a page",
                    source: e.into(),
                })?;
        }
        if done {
            break;
        }
    }
    Ok(count)
}

async fn read_versions(c: &Conn) -> Result<HashMap<String, u32>, DbError> {
    let rows = c
        .client
        .query("SELECT track, version FROM kiln_schema", &[])
        .await?;
    let mut out = HashMap::new();
    for r in &rows {
        let v = (r as &dyn Cols).int(1)?;
        out.insert(
            r.try_get::<_, String>(0)?,
            u32::try_from(v).unwrap_or(u32::MAX),
        );
    }
    Ok(out)
}

/// Migrates the log to the latest version and the views to `view_target`, under a session
/// advisory lock so that replicas starting together migrate once.
async fn migrate(c: &Conn, view_target: u32) -> Result<(), StoreError> {
    let err = |track: &'static str, version: u32| {
        move |source: tokio_postgres::Error| StoreError::Migrate {
            track,
            version,
            source: source.into(),
        }
    };
    c.client
        .batch_execute(&format!(
            "SET enable_seqscan = off; SET standard_conforming_strings = on; SELECT pg_advisory_lock({MIGRATE_LOCK}); CREATE TABLE IF NOT EXISTS kiln_schema (track TEXT PRIMARY KEY, version BIGINT NOT NULL)"
        ))
        .await
        .map_err(err("log", 0))?;
    let result = async {
        let versions = read_versions(c)
            .await
            .map_err(|source| StoreError::Migrate {
                track: "log",
                version: 0,
                source,
            })?;
        let log_v = versions.get("log").copied().unwrap_or(0);
        let view_v = versions.get("views").copied().unwrap_or(0);
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
        let view_final = view_target.max(view_v);
        tune_storage(c)
            .await
            .map_err(|source| StoreError::Migrate {
                track: "views",
                version: view_v,
                source,
            })?;
        if log_v == log_known && view_v == view_final {
            return Ok(());
        }
        c.client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({APPEND_LOCK})"
            ))
            .await
            .map_err(err("log", log_v))?;
        for (i, sql) in LOG_MIGRATIONS.iter().enumerate().skip(log_v as usize) {
            c.client
                .batch_execute(sql)
                .await
                .map_err(err("log", i as u32 + 1))?;
        }
        let mut needs_replay = false;
        for (i, m) in VIEW_MIGRATIONS
            .iter()
            .enumerate()
            .take(view_target as usize)
            .skip(view_v as usize)
        {
            c.client
                .batch_execute(m.sql)
                .await
                .map_err(err("views", i as u32 + 1))?;
            needs_replay |= m.replay;
        }
        if needs_replay {
            tracing::info!(
                version = view_final,
                "view schema changed; rebuilding views by replay"
            );
            c.client
                .batch_execute(&truncate_sql())
                .await
                .map_err(err("views", view_final))?;
            let head = query_head(c).await.map_err(|source| StoreError::Migrate {
                track: "views",
                version: view_final,
                source,
            })?;
            replay(c, c, head, false).await?;
        }
        c.client
            .execute(
                "INSERT INTO kiln_schema (track, version) VALUES ('log', $1), ('views', $2)
                 ON CONFLICT (track) DO UPDATE SET version = excluded.version",
                &[&i64::from(log_known), &i64::from(view_final)],
            )
            .await
            .map_err(err("log", log_known))?;
        c.client
            .batch_execute("COMMIT")
            .await
            .map_err(err("log", log_known))?;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = c.client.batch_execute("ROLLBACK").await;
    }
    // After the migrations (the tables exist), still under the migration lock.
    let result = match result {
        Ok(()) => tune_storage(c).await.map_err(|source| StoreError::Migrate {
            track: "views",
            version: VIEW_VERSION,
            source,
        }),
        Err(e) => Err(e),
    };
    let _ = c
        .client
        .batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATE_LOCK})"))
        .await;
    result
}

/// Applies [`VIEW_STORAGE`] to the tables that exist and lack it.
async fn tune_storage(c: &Conn) -> Result<(), DbError> {
    for (table, setting) in VIEW_STORAGE {
        let rows = c
            .client
            .query(
                "SELECT COALESCE(array_to_string(reloptions, ','), '') FROM pg_class WHERE oid = to_regclass($1)",
                &[table],
            )
            .await?;
        let Some(row) = rows.first() else { continue };
        let current: String = row.try_get(0)?;
        if !current.split(',').any(|o| o == *setting) {
            c.client
                .batch_execute(&format!("ALTER TABLE {table} SET ({setting})"))
                .await?;
        }
    }
    Ok(())
}

/// Follows `kiln_events` notifications into the head; stops when the store is dropped.
async fn listener(
    config: tokio_postgres::Config,
    head: Arc<watch::Sender<u64>>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut backoff = Backoff::new();
    loop {
        let session = async {
            let (client, mut connection) = config.connect(NoTls).await?;
            let h = head.clone();
            let (closed_tx, mut closed_rx) = oneshot::channel::<()>();
            tokio::spawn(async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(m) = messages.next().await {
                    match m {
                        Ok(AsyncMessage::Notification(n)) => {
                            if let Ok(seq) = n.payload().parse() {
                                advance(&h, seq);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                drop(closed_tx);
            });
            client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
            loop {
                // Also covers whatever committed while no one was listening.
                let row = client.query_one(log::HEAD.sql, &[]).await?;
                let seq: i64 = row.try_get(0)?;
                advance(&head, seq as u64);
                tokio::select! {
                    _ = &mut closed_rx => return Ok::<(), tokio_postgres::Error>(()),
                    _ = tokio::time::sleep(HEAD_POLL) => {}
                }
            }
        };
        tokio::select! {
            _ = &mut shutdown => return,
            r = session => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "postgres listener lost its connection");
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = backoff.wait() => {}
        }
    }
}

async fn committer(
    config: tokio_postgres::Config,
    mut rx: mpsc::Receiver<Pending>,
    head: Arc<watch::Sender<u64>>,
    options: Options,
) {
    let mut conn: Option<Conn> = None;
    let mut cache = StreamCache::default();
    let mut last_batch = 1;
    while let Some(first) = rx.recv().await {
        let mut events = first.append.events.len();
        let mut batch = vec![first];
        // Group commit: take what is queued; and when the last batch had several appends, their
        // callers are probably about to send their next ones, so wait a moment for as many (a
        // commit costs a WAL flush, a few ms on these disks; the wait is at most LINGER).
        let target = last_batch.min(options.max_batch.max(1));
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < options.max_batch.max(1) && events < MAX_BATCH_EVENTS {
            let next = match rx.try_recv() {
                Ok(p) => Some(p),
                Err(_) if batch.len() < target => tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .ok()
                    .flatten(),
                Err(_) => None,
            };
            match next {
                Some(p) => {
                    events += p.append.events.len();
                    batch.push(p);
                }
                None => break,
            }
        }
        last_batch = batch.len();
        let (appends, replies): (Vec<Append>, Vec<_>) =
            batch.into_iter().map(|p| (p.append, p.reply)).unzip();
        let results = commit_retrying(&config, &mut conn, &mut cache, &appends, &options).await;
        let last = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .filter(|a| !a.replayed)
            .filter_map(|a| a.events.last())
            .map(|e| e.seq)
            .max();
        if let Some(last) = last {
            advance(&head, last);
        }
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

type Results = Vec<Result<Appended, StoreError>>;

/// Why an attempt at committing a batch did not produce results.
enum Attempt {
    /// Nothing was committed and the connection is gone: retry on a new one.
    Retry(DbError),
    /// `COMMIT` was sent but its answer lost: ask the server what became of `xid`.
    Unknown {
        xid: String,
        results: Results,
        source: DbError,
    },
    /// Nothing was committed, for a reason retrying will not fix.
    Fatal(StoreError),
}

fn fail_all(n: usize, e: &StoreError) -> Results {
    (0..n).map(|_| Err(e.duplicate())).collect()
}

async fn commit_retrying(
    config: &tokio_postgres::Config,
    conn: &mut Option<Conn>,
    cache: &mut StreamCache,
    appends: &[Append],
    options: &Options,
) -> Results {
    let started = Instant::now();
    let mut backoff = Backoff::new();
    let mut attempts = 0u32;
    let unavailable = |attempts: u32, source: DbError| StoreError::Unavailable {
        op: "append",
        attempts,
        waited_ms: started.elapsed().as_millis() as u64,
        source,
    };
    loop {
        attempts += 1;
        if conn.as_ref().is_none_or(Conn::is_closed) {
            match Conn::connect_writer(config).await {
                Ok(c) => {
                    // A new connection may be to a database restored meanwhile.
                    cache.clear();
                    *conn = Some(c);
                }
                Err(e) => {
                    if !e.is_connection() || started.elapsed() >= options.retry_for {
                        return fail_all(appends.len(), &unavailable(attempts, e));
                    }
                    tracing::debug!(error = %e, attempts, "postgres unreachable; retrying the batch");
                    backoff.wait().await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_ref() else { continue };
        let hook = options.commit_hook.as_ref();
        let retention = options.idempotency_retention;
        let outcome = match attempt_fast(c, cache, appends, retention, hook).await {
            Err(Attempt::Fatal(StoreError::ApplyView { .. })) => {
                // A view rejected a change; nothing was committed. Redo the batch one append at
                // a time so that only the offending appends fail.
                attempt_careful(c, cache, appends, retention, hook).await
            }
            other => other,
        };
        match outcome {
            Ok(results) => return results,
            Err(Attempt::Fatal(e)) => {
                let _ = c.client.batch_execute("ROLLBACK").await;
                return fail_all(appends.len(), &e);
            }
            Err(Attempt::Retry(e)) => {
                *conn = None;
                if started.elapsed() >= options.retry_for {
                    return fail_all(appends.len(), &unavailable(attempts, e));
                }
                tracing::debug!(error = %e, attempts, "connection lost before commit; retrying the batch");
                backoff.wait().await;
            }
            Err(Attempt::Unknown {
                xid,
                results,
                source,
            }) => {
                *conn = None;
                cache.clear();
                tracing::warn!(error = %source, xid, "connection lost during commit; asking the server for the outcome");
                match xact_status(config, &xid, started, options.retry_for).await {
                    Some(true) => return results,
                    Some(false) => {
                        backoff.wait().await;
                    }
                    None => {
                        return fail_all(appends.len(), &StoreError::CommitUnknown { source });
                    }
                }
            }
        }
    }
}

/// Whether transaction `xid` committed (`Some(true)`), did not and never will (`Some(false)`),
/// or could not be learned before the retry window closed (`None`).
async fn xact_status(
    config: &tokio_postgres::Config,
    xid: &str,
    started: Instant,
    retry_for: Duration,
) -> Option<bool> {
    let mut backoff = Backoff::new();
    loop {
        if let Ok(c) = Conn::connect(config).await {
            match c.client.query_one(XACT_STATUS_SQL, &[&xid]).await {
                Ok(row) => match row
                    .try_get::<_, Option<String>>(0)
                    .ok()
                    .flatten()
                    .as_deref()
                {
                    Some("committed") => return Some(true),
                    Some("aborted") => return Some(false),
                    // Still in progress: the old backend has not noticed its client is gone.
                    _ => {}
                },
                // An id the server has never assigned ("in the future") after a crash restart:
                // the transaction did not survive, so it did not commit.
                Err(e) if e.code().is_some() && e.to_string().contains("future") => {
                    return Some(false)
                }
                Err(_) => {}
            }
        }
        if started.elapsed() >= retry_for {
            return None;
        }
        backoff.wait().await;
    }
}

/// Most stream versions the committer remembers between batches.
const STREAM_CACHE_MAX: usize = 65_536;

/// The committer's memory of stream versions as of its own last commit, so that a batch need
/// not look up the streams it wrote recently. It is only used when the head read under the
/// append lock is the head this committer's last commit left (then no one else has appended
/// since: every append batch takes the lock, and the log only grows); otherwise, on a new
/// connection, and after a commit whose outcome had to be asked for, it is forgotten.
#[derive(Default)]
struct StreamCache {
    head: u64,
    versions: HashMap<StreamRef, u64>,
}

impl StreamCache {
    fn clear(&mut self) {
        self.head = 0;
        self.versions.clear();
    }

    /// After a commit: the streams the batch knew, and the head it left.
    fn learn(&mut self, planner: &Planner) {
        if self.versions.len() > STREAM_CACHE_MAX {
            self.versions.clear();
        }
        for (s, v) in planner.versions() {
            self.versions.insert(s.clone(), v);
        }
        self.head = planner.last_seq();
    }
}

/// What round 1 learned: the planner loaded with the batch's state, and the transaction id.
async fn begin_and_load(
    c: &Conn,
    cache: &mut StreamCache,
    appends: &[Append],
    retention: Duration,
) -> Result<(Planner, String), Attempt> {
    // Keys recorded at or before this are expired.
    let expired =
        now_millis().saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
    let (streams, keys) = Planner::new(0, 0).missing(appends.iter());
    let (cached, streams): (Vec<StreamRef>, Vec<StreamRef>) = streams
        .into_iter()
        .partition(|s| cache.versions.contains_key(s));
    let mut ops = vec![
        Op::Simple("BEGIN"),
        Op::Exec(LOCK_SQL, vec![Val::Int(APPEND_LOCK)]),
        Op::Query(XID_SQL, vec![]),
        Op::Query(log::HEAD.sql, vec![]),
        streams_lookup(&streams),
    ];
    ops.push(Op::Query(
        IDEM_LOOKUP_SQL,
        vec![
            Val::TextArray(keys.iter().map(|k| k.0.clone()).collect()),
            Val::TextArray(keys.iter().map(|k| k.1.clone()).collect()),
            Val::Int(expired),
        ],
    ));
    let results = c.pipeline(&ops).await.map_err(classify_uncommitted)?;
    let mut rows = Vec::with_capacity(results.len());
    for r in results {
        rows.push(r.map_err(classify_uncommitted)?);
    }
    let fatal = |source| {
        Attempt::Fatal(StoreError::Append {
            event_type: "batch",
            source,
        })
    };
    let head = rows[3]
        .first()
        .ok_or_else(no_row)
        .and_then(|r| (r as &dyn Cols).uint(0))
        .map_err(fatal)?;
    let mut known = Vec::new();
    if !cached.is_empty() && head != cache.head {
        // Someone else appended since this committer's last commit.
        cache.clear();
        let more = c
            .pipeline(&[streams_lookup(&cached)])
            .await
            .map_err(classify_uncommitted)?;
        for r in more {
            rows[4].extend(r.map_err(classify_uncommitted)?);
        }
    } else {
        for s in cached {
            let v = cache.versions.get(&s).copied().unwrap_or(0);
            known.push((s, v));
        }
    }
    let load = || -> Result<(Planner, String), DbError> {
        let xid = (rows[2].first().ok_or_else(no_row)? as &dyn Cols).text(0)?;
        let mut planner = Planner::new(head, now_millis());
        for (s, v) in known {
            planner.load_stream(s, v);
        }
        for r in &rows[4] {
            let r = r as &dyn Cols;
            let kind = log::stream_type(&r.text(0)?).ok_or_else(no_row)?;
            planner.load_stream(
                StreamRef {
                    kind,
                    id: r.text(1)?,
                },
                r.uint(2)?,
            );
        }
        for r in &rows[5] {
            let r = r as &dyn Cols;
            planner.load_key(
                r.text(0)?,
                r.text(1)?,
                IdemRecord {
                    request_hash: r.text(2)?,
                    first_seq: r.uint(3)?,
                    last_seq: r.uint(4)?,
                },
            );
        }
        Ok((planner, xid))
    };
    load().map_err(fatal)
}

fn streams_lookup(streams: &[StreamRef]) -> Op {
    Op::Query(
        STREAMS_LOOKUP_SQL,
        vec![
            Val::TextArray(streams.iter().map(|s| s.kind.as_str().to_owned()).collect()),
            Val::TextArray(streams.iter().map(|s| s.id.clone()).collect()),
        ],
    )
}

fn no_row() -> DbError {
    DbError::Column {
        column: 0,
        value: "no row".into(),
    }
}

fn classify_uncommitted(e: DbError) -> Attempt {
    if e.is_connection() {
        Attempt::Retry(e)
    } else {
        Attempt::Fatal(StoreError::Append {
            event_type: "batch",
            source: e,
        })
    }
}

/// The event (type, seq) a statement applies to the views, if any.
type Owner = Option<(&'static str, u64)>;

/// The statements that record `events` and `keys`, and for each statement the event it belongs
/// to (`None` for the bulk inserts).
fn write_ops(
    events: &[&RecordedEvent],
    keys: &[(&Idempotency, u64, u64)],
    now: i64,
    as_script: bool,
) -> (Vec<Op>, Vec<Owner>) {
    let mut ops = Vec::new();
    let mut owners = Vec::new();
    if !events.is_empty() {
        let rows: Vec<EventRow> = events.iter().map(|e| EventRow::of(e)).collect();
        ops.push(Op::Exec(
            INSERT_EVENTS_SQL,
            vec![
                Val::IntArray(rows.iter().map(|r| r.seq).collect()),
                Val::TextArray(rows.iter().map(|r| r.stream_type.to_owned()).collect()),
                Val::TextArray(rows.iter().map(|r| r.stream_id.clone()).collect()),
                Val::IntArray(rows.iter().map(|r| r.stream_version).collect()),
                Val::TextArray(rows.iter().map(|r| r.event_type.to_owned()).collect()),
                Val::IntArray(rows.iter().map(|r| r.schema_version).collect()),
                Val::TextArray(rows.iter().map(|r| r.payload.clone()).collect()),
                Val::TextArray(rows.iter().map(|r| r.metadata.clone()).collect()),
                Val::IntArray(rows.iter().map(|r| r.recorded_at).collect()),
            ],
        ));
        owners.push(None);
    }
    if !keys.is_empty() {
        ops.push(Op::Exec(
            INSERT_KEYS_SQL,
            vec![
                Val::TextArray(keys.iter().map(|k| k.0.scope.clone()).collect()),
                Val::TextArray(keys.iter().map(|k| k.0.key.clone()).collect()),
                Val::TextArray(keys.iter().map(|k| k.0.request_hash.clone()).collect()),
                Val::IntArray(keys.iter().map(|k| k.1 as i64).collect()),
                Val::IntArray(keys.iter().map(|k| k.2 as i64).collect()),
                Val::IntArray(keys.iter().map(|_| now).collect()),
            ],
        ));
        owners.push(None);
    }
    let changes = events.iter().flat_map(|e| {
        views::writes(&e.event, e.recorded_at)
            .into_iter()
            .map(|(sql, params)| Change {
                sql,
                params,
                owner: (e.event.type_name(), e.seq),
            })
    });
    if as_script {
        // The fast path: its failure sends the batch to the careful path, which runs the
        // changes one by one to find the culprit.
        view_ops(changes.collect(), &mut ops, &mut owners);
    } else {
        for c in changes {
            ops.push(Op::Exec(c.sql, c.params));
            owners.push(Some(c.owner));
        }
    }
    (ops, owners)
}

/// One view change and the event it belongs to.
struct Change {
    sql: &'static str,
    params: Vec<Val>,
    owner: (&'static str, u64),
}

/// Changes inlined into one simple-protocol message (see `sql::inline_literals`).
#[derive(Default)]
struct Script {
    sql: String,
    owner: Owner,
}

impl Script {
    fn push(&mut self, c: Change, ops: &mut Vec<Op>, owners: &mut Vec<Owner>) {
        match crate::sql::inline_literals(c.sql, &c.params) {
            Ok(stmt) => {
                self.owner.get_or_insert(c.owner);
                self.sql.push_str(&stmt);
                self.sql.push_str(";\n");
            }
            Err(_) => {
                self.flush(ops, owners);
                ops.push(Op::Exec(c.sql, c.params));
                owners.push(Some(c.owner));
            }
        }
    }

    fn flush(&mut self, ops: &mut Vec<Op>, owners: &mut Vec<Owner>) {
        if !self.sql.is_empty() {
            ops.push(Op::Script(std::mem::take(&mut self.sql)));
            owners.push(self.owner.take());
        }
    }
}

/// The statements that apply `changes` (in log order) to the views, as few as possible. View
/// statements touch one table each, so changes to different tables commute: they are grouped
/// by table, in order within each. A run of two or more changes by the same statement with a
/// set-based form ([`views::BULK`]) becomes one statement over arrays (bound in binary); the
/// others are inlined into scripts. The server then parses and plans a few statements per
/// batch instead of one per event. (Replay keeps applying changes one statement each, so a
/// rebuild checks the set-based forms against the one-row statements.)
fn view_ops(changes: Vec<Change>, ops: &mut Vec<Op>, owners: &mut Vec<Owner>) {
    let mut tables: Vec<(&'static str, Vec<Change>)> = Vec::new();
    for c in changes {
        let table = views::table_of(c.sql);
        match tables.iter_mut().find(|(t, _)| *t == table) {
            Some((_, list)) => list.push(c),
            None => tables.push((table, vec![c])),
        }
    }
    let mut script = Script::default();
    for (_, list) in tables {
        let mut rest = list.into_iter().peekable();
        while let Some(first) = rest.next() {
            let sql = first.sql;
            let mut run = vec![first];
            while let Some(c) = rest.next_if(|c| c.sql == sql) {
                run.push(c);
            }
            let bulk = views::bulk_of(sql).filter(|_| run.len() >= 2);
            let Some(bulk) = bulk else {
                for c in run {
                    script.push(c, ops, owners);
                }
                continue;
            };
            for chunk in bulk_chunks(bulk, run) {
                match bulk_params(&chunk) {
                    Some(params) => {
                        script.flush(ops, owners);
                        ops.push(Op::Exec(bulk.sql, params));
                        owners.push(Some(chunk[0].owner));
                    }
                    None => {
                        for c in chunk {
                            script.push(c, ops, owners);
                        }
                    }
                }
            }
        }
    }
    script.flush(ops, owners);
}

/// Splits a run of changes by one statement into groups that each change a row at most once:
/// with `fold`, only the last change of each row is kept (it overwrites the others); otherwise
/// a new group starts where a row comes again.
fn bulk_chunks(bulk: &views::Bulk, run: Vec<Change>) -> Vec<Vec<Change>> {
    let key = |c: &Change| -> Vec<Val> {
        bulk.key
            .iter()
            .map(|&i| c.params.get(i).cloned().unwrap_or(Val::OptInt(None)))
            .collect()
    };
    if bulk.fold {
        let mut seen = std::collections::HashSet::new();
        let mut kept: Vec<Change> = run
            .into_iter()
            .rev()
            .filter(|c| seen.insert(key(c)))
            .collect();
        kept.reverse();
        return vec![kept];
    }
    let mut chunks = vec![Vec::new()];
    let mut seen = std::collections::HashSet::new();
    for c in run {
        if !seen.insert(key(&c)) {
            seen.clear();
            seen.insert(key(&c));
            chunks.push(Vec::new());
        }
        if let Some(last) = chunks.last_mut() {
            last.push(c);
        }
    }
    chunks
}

/// The parameters of a set-based statement: one array per parameter of the one-row statement.
/// `None` when a parameter is not of one type across the changes (they are then sent one by
/// one).
fn bulk_params(chunk: &[Change]) -> Option<Vec<Val>> {
    let n = chunk.first()?.params.len();
    let mut out = Vec::with_capacity(n);
    for j in 0..n {
        let column = match chunk[0].params.get(j)? {
            Val::Int(_) | Val::OptInt(_) => {
                let mut v = Vec::with_capacity(chunk.len());
                for c in chunk {
                    v.push(match c.params.get(j)? {
                        Val::Int(i) => Some(*i),
                        Val::OptInt(i) => *i,
                        _ => return None,
                    });
                }
                Val::OptIntArray(v)
            }
            Val::Text(_) | Val::OptText(_) => {
                let mut v = Vec::with_capacity(chunk.len());
                for c in chunk {
                    v.push(match c.params.get(j)? {
                        Val::Text(t) => Some(t.clone()),
                        Val::OptText(t) => t.clone(),
                        _ => return None,
                    });
                }
                Val::OptTextArray(v)
            }
            _ => return None,
        };
        out.push(column);
    }
    Some(out)
}

/// The decisions of a whole batch and the statements that carry them out.
struct Plan {
    planned: Vec<Planned>,
    written: Vec<u64>,
}

/// Round 2 of the fast path: every append of the batch in one pipeline, `COMMIT` included.
async fn attempt_fast(
    c: &Conn,
    cache: &mut StreamCache,
    appends: &[Append],
    retention: Duration,
    hook: Option<&CommitHook>,
) -> Result<Results, Attempt> {
    let (mut planner, xid) = begin_and_load(c, cache, appends, retention).await?;
    let now = planner.now();
    let planned: Vec<Planned> = appends.iter().map(|a| planner.plan(a).0).collect();
    let mut events = Vec::new();
    let mut keys = Vec::new();
    for p in &planned {
        if let Planned::Write {
            events: evs,
            idempotency,
        } = p
        {
            events.extend(evs.iter());
            if let (Some(k), Some(first), Some(last)) = (idempotency, evs.first(), evs.last()) {
                keys.push((k, first.seq, last.seq));
            }
        }
    }
    let written: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let (mut ops, owners) = write_ops(&events, &keys, now, true);
    let n_writes = ops.len();
    for p in &planned {
        if let Planned::Replay {
            first_seq,
            last_seq,
        } = p
        {
            ops.push(Op::Query(
                log::READ_RANGE.sql,
                vec![(*first_seq).into(), (*last_seq).into()],
            ));
        }
    }
    if let Some(last) = written.last() {
        ops.push(Op::Exec(NOTIFY_SQL, vec![Val::Text(last.to_string())]));
    }
    let commit_in_pipeline = hook.is_none();
    if commit_in_pipeline {
        ops.push(Op::Simple("COMMIT"));
    }
    let results = c.pipeline(&ops).await.map_err(classify_uncommitted)?;
    let sent_commit = commit_in_pipeline;
    let n_replays = count_replays(&planned);
    let plan = Plan { planned, written };
    // A statement failed: nothing is committed (a pipelined COMMIT of a failed transaction
    // rolls back). A lost connection after COMMIT was sent is the one ambiguous case.
    let mut replay_rows = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(rows) => {
                if i >= n_writes && i < n_writes + n_replays {
                    replay_rows.push(rows);
                }
            }
            Err(e) if e.is_connection() => {
                return Err(if sent_commit {
                    Attempt::Unknown {
                        xid,
                        results: finish(plan, None).unwrap_or_default(),
                        source: e,
                    }
                } else {
                    Attempt::Retry(e)
                });
            }
            Err(source) => {
                if !sent_commit {
                    let _ = c.client.batch_execute("ROLLBACK").await;
                }
                let (event_type, seq) = owners.get(i).copied().flatten().unwrap_or(("batch", 0));
                return Err(Attempt::Fatal(if i < n_writes && owners[i].is_some() {
                    StoreError::ApplyView {
                        event_type,
                        seq,
                        source,
                    }
                } else {
                    StoreError::Append {
                        event_type: "batch",
                        source,
                    }
                }));
            }
        }
    }
    if !sent_commit {
        if let Some(hook) = hook {
            hook(plan.written.clone()).await;
        }
        if let Err(e) = c.client.batch_execute("COMMIT").await {
            let e = DbError::from(e);
            return Err(if e.is_connection() {
                Attempt::Unknown {
                    xid,
                    results: finish(plan, Some(replay_rows)).unwrap_or_default(),
                    source: e,
                }
            } else {
                Attempt::Fatal(StoreError::Append {
                    event_type: "batch",
                    source: e,
                })
            });
        }
    }
    cache.learn(&planner);
    finish(plan, Some(replay_rows)).map_err(Attempt::Fatal)
}

fn count_replays(planned: &[Planned]) -> usize {
    planned
        .iter()
        .filter(|p| matches!(p, Planned::Replay { .. }))
        .count()
}

/// Turns decisions into answers; `replay_rows` holds the rows read for each replay, in order
/// (`None` when the answers were lost with the connection).
fn finish(plan: Plan, replay_rows: Option<Vec<Vec<Row>>>) -> Result<Results, StoreError> {
    let lost = replay_rows.is_none();
    let mut replays = replay_rows.unwrap_or_default().into_iter();
    let mut out = Vec::with_capacity(plan.planned.len());
    for p in plan.planned {
        out.push(match p {
            Planned::Write { events, .. } => Ok(Appended {
                events,
                replayed: false,
            }),
            Planned::Fail(e) => Err(e),
            Planned::Replay { .. } if lost => Err(StoreError::CommitUnknown {
                source: DbError::Io(std::io::Error::other(
                    "the connection was lost before the recorded events were read back",
                )),
            }),
            Planned::Replay { .. } => {
                let rows = replays.next().unwrap_or_default();
                decode_rows(&rows).map(|events| Appended {
                    events,
                    replayed: true,
                })
            }
        });
    }
    Ok(out)
}

fn decode_rows(rows: &[Row]) -> Result<Vec<RecordedEvent>, StoreError> {
    rows.iter()
        .map(|r| {
            let raw = log::raw_event_row(r).map_err(|source| StoreError::Query {
                query: "read_range",
                source,
            })?;
            log::decode(raw)
        })
        .collect()
}

/// The slow path, after a view rejected a change: one SAVEPOINT per append, so that only the
/// appends that fail are refused.
async fn attempt_careful(
    c: &Conn,
    cache: &mut StreamCache,
    appends: &[Append],
    retention: Duration,
    hook: Option<&CommitHook>,
) -> Result<Results, Attempt> {
    let (mut planner, xid) = begin_and_load(c, cache, appends, retention).await?;
    let now = planner.now();
    let mut results = Vec::with_capacity(appends.len());
    let mut written = Vec::new();
    for append in appends {
        let (planned, undo): (Planned, Undo) = planner.plan(append);
        match planned {
            Planned::Fail(e) => results.push(Err(e)),
            Planned::Replay {
                first_seq,
                last_seq,
            } => {
                let r = c
                    .pipeline(&[Op::Query(
                        log::READ_RANGE.sql,
                        vec![first_seq.into(), last_seq.into()],
                    )])
                    .await
                    .map_err(classify_uncommitted)?;
                let rows = r
                    .into_iter()
                    .next()
                    .unwrap_or(Ok(Vec::new()))
                    .map_err(classify_uncommitted)?;
                results.push(decode_rows(&rows).map(|events| Appended {
                    events,
                    replayed: true,
                }));
            }
            Planned::Write {
                events,
                idempotency,
            } => {
                let evs: Vec<&RecordedEvent> = events.iter().collect();
                let keys: Vec<(&Idempotency, u64, u64)> =
                    match (&idempotency, evs.first(), evs.last()) {
                        (Some(k), Some(f), Some(l)) => vec![(k, f.seq, l.seq)],
                        _ => Vec::new(),
                    };
                let (mut ops, owners) = write_ops(&evs, &keys, now, false);
                ops.insert(0, Op::Simple("SAVEPOINT append"));
                let out = c.pipeline(&ops).await.map_err(classify_uncommitted)?;
                let failed = out
                    .into_iter()
                    .enumerate()
                    .find_map(|(i, r)| r.err().map(|e| (i, e)));
                match failed {
                    None => {
                        c.client
                            .batch_execute("RELEASE SAVEPOINT append")
                            .await
                            .map_err(|e| classify_uncommitted(e.into()))?;
                        written.extend(events.iter().map(|e| e.seq));
                        results.push(Ok(Appended {
                            events,
                            replayed: false,
                        }));
                    }
                    Some((_, e)) if e.is_connection() => return Err(Attempt::Retry(e)),
                    Some((i, source)) => {
                        c.client
                            .batch_execute("ROLLBACK TO SAVEPOINT append; RELEASE SAVEPOINT append")
                            .await
                            .map_err(|e| classify_uncommitted(e.into()))?;
                        planner.undo(undo);
                        let owner = i
                            .checked_sub(1)
                            .and_then(|j| owners.get(j).copied().flatten());
                        results.push(Err(match owner {
                            Some((event_type, seq)) => StoreError::ApplyView {
                                event_type,
                                seq,
                                source,
                            },
                            None => StoreError::Append {
                                event_type: append
                                    .events
                                    .first()
                                    .map_or("none", |e| e.event.type_name()),
                                source,
                            },
                        }));
                    }
                }
            }
        }
    }
    if let Some(last) = written.last() {
        c.pipeline(&[Op::Exec(NOTIFY_SQL, vec![Val::Text(last.to_string())])])
            .await
            .map_err(classify_uncommitted)?
            .into_iter()
            .try_for_each(|r| r.map(|_| ()))
            .map_err(classify_uncommitted)?;
    }
    if let Some(hook) = hook {
        hook(written.clone()).await;
    }
    if let Err(e) = c.client.batch_execute("COMMIT").await {
        let e = DbError::from(e);
        return Err(if e.is_connection() {
            Attempt::Unknown {
                xid,
                results,
                source: e,
            }
        } else {
            Attempt::Fatal(StoreError::Append {
                event_type: "batch",
                source: e,
            })
        });
    }
    cache.learn(&planner);
    Ok(results)
}

pub(crate) mod testing {
    use super::*;
    use crate::testing::RawRow;

    /// Creates (or migrates) a Postgres store's schema with only the first `view_version` view
    /// migrations, as an older build would have left it.
    pub async fn postgres_init_at(url: &str, view_version: u32) -> Result<(), StoreError> {
        let config = parse_config(url)?;
        let c = Conn::connect(&config)
            .await
            .map_err(|source| StoreError::Open {
                location: redact(url),
                source,
            })?;
        migrate(&c, view_version).await
    }

    /// Inserts stored event rows as they are, without touching the views.
    pub async fn postgres_insert_raw(url: &str, rows: &[RawRow]) -> Result<(), StoreError> {
        let config = parse_config(url)?;
        let c = Conn::connect(&config)
            .await
            .map_err(|source| StoreError::Open {
                location: redact(url),
                source,
            })?;
        for r in rows {
            c.client
                .execute(
                    "INSERT INTO events (seq, stream_type, stream_id, stream_version, event_type, schema_version, payload, metadata, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[&(r.seq as i64), &r.stream_type, &r.stream_id, &(r.stream_version as i64), &r.event_type, &r.schema_version, &r.payload, &r.metadata, &r.recorded_at],
                )
                .await
                .map_err(|e| StoreError::Append { event_type: "raw", source: e.into() })?;
        }
        Ok(())
    }
}
