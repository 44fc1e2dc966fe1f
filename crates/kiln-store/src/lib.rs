//! The event log and its materialized views (locked decisions 0005 and 0006).
//!
//! This crate owns Kiln's durable state: an append-only log of [`kiln_types::event::Event`]s with a
//! global sequence, per-stream versions with optimistic concurrency and idempotency keys, and the
//! view tables the API reads, which are updated in the same transaction as each append
//! (read-your-writes). Watchers follow the log by sequence ([`Store::watch`], [`Store::subscribe`]).
//! Views can be rebuilt from the log and proven equal to the live ones ([`Store::rebuild_views`]).
//!
//! One [`Store`] type, two backends: SQLite (embedded, the single-node default) and Postgres
//! (production). Both commit appends in batches (group commit) through one committer per store;
//! on Postgres, batches from every process are serialized by a transaction-level advisory lock,
//! so sequence numbers commit in order and a reader never sees N+1 before N (see
//! docs/specs/state/event-log.md). It does not own the meaning of events beyond applying them to
//! views: deciding what to append is the control plane's job.

mod checksum;
mod error;
mod log;
mod plan;
mod postgres;
mod sql;
mod sqlite;
mod views;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use kiln_types::event::{Event, ReleaseState, StreamRef};
use kiln_types::{AppId, HostId, InstanceId, InstanceState, OrgId, TokenId, UnixMillis, UserId};

pub use checksum::{RebuildReport, ViewChecksum};
pub use error::{DbError, StoreError};
pub use views::{
    Allocation, AllocationRow, AppRow, DataKeyRow, DomainRow, HostRow, InstanceRow, MembershipRow,
    OrgRow, ReleaseRow, SecretEntryRow, SecretEnvRow, TokenRow, UserRow, VolumeRow,
};

use sql::Val;
use views::Query;

/// What the appender expects the stream's current version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last event must have this version.
    Exact(u64),
}

/// One event to append, with its concurrency expectation.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event: Event,
    pub expected: ExpectedVersion,
}

impl NewEvent {
    pub fn any(event: Event) -> Self {
        Self {
            event,
            expected: ExpectedVersion::Any,
        }
    }
}

/// Who caused an append and why; stored with every event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// `token:<id>`, `host:<id>`, `system:reconciler`, ...
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// An idempotency key, unique per scope; `request_hash` distinguishes a retry of the same request
/// from a different request reusing the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub scope: String,
    pub key: String,
    pub request_hash: String,
}

/// An append of one or more events, atomically.
#[derive(Debug, Clone)]
pub struct Append {
    pub events: Vec<NewEvent>,
    pub metadata: Metadata,
    pub idempotency: Option<Idempotency>,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub seq: u64,
    pub stream: StreamRef,
    pub stream_version: u64,
    /// The payload schema version it was written with (the event itself is upcast to the
    /// current version on read).
    pub schema_version: u32,
    pub event: Event,
    pub metadata: Metadata,
    pub recorded_at: UnixMillis,
}

/// The result of an append: the events as recorded, and whether they were recorded by an earlier
/// call with the same idempotency key (in which case nothing new was written).
#[derive(Debug, Clone)]
pub struct Appended {
    pub events: Vec<RecordedEvent>,
    pub replayed: bool,
}

/// Called inside every append transaction after its events and view changes are written and
/// before it commits, with the sequences written. For fault injection in tests (holding a
/// transaction open); `None` in production.
pub type CommitHook =
    Arc<dyn Fn(Vec<u64>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Where a store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite database file (created if missing).
    Sqlite(PathBuf),
    /// A Postgres connection string (`postgres://user@host:port/db` or `host=... dbname=...`).
    Postgres(String),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            Location::Postgres(url) => write!(f, "postgres:{}", postgres::redact(url)),
        }
    }
}

/// Tuning and test hooks; [`Options::default`] is what production uses.
#[derive(Clone)]
pub struct Options {
    /// Most appends committed in one transaction.
    pub max_batch: usize,
    /// Postgres: how long an operation keeps retrying (with backoff) while the database is
    /// unreachable before it fails with [`StoreError::Unavailable`].
    pub retry_for: Duration,
    /// Postgres: connections used for reads (each is pipelined, so a few suffice).
    pub read_connections: usize,
    /// How long an idempotency key is remembered. An expired key behaves as new: an append
    /// with it is recorded again. Expired keys are deleted in the background, a small batch at
    /// a time ([`Store::prune_idempotency`]).
    pub idempotency_retention: Duration,
    pub commit_hook: Option<CommitHook>,
}

/// The default [`Options::idempotency_retention`]: a day, far longer than any client retries.
pub const IDEMPOTENCY_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// Expired idempotency keys deleted per statement (and per transaction) when pruning.
const PRUNE_BATCH: u64 = 1_000;
/// How often the background task prunes expired idempotency keys.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl Default for Options {
    fn default() -> Self {
        Options {
            max_batch: 512,
            retry_for: Duration::from_secs(30),
            read_connections: 2,
            idempotency_retention: IDEMPOTENCY_RETENTION,
            commit_hook: None,
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("max_batch", &self.max_batch)
            .field("retry_for", &self.retry_for)
            .field("read_connections", &self.read_connections)
            .field("idempotency_retention", &self.idempotency_retention)
            .field("commit_hook", &self.commit_hook.is_some())
            .finish()
    }
}

#[derive(Clone)]
enum Backend {
    Sqlite(Arc<sqlite::Sqlite>),
    Postgres(Arc<postgres::Postgres>),
}

enum WeakBackend {
    Sqlite(std::sync::Weak<sqlite::Sqlite>),
    Postgres(std::sync::Weak<postgres::Postgres>),
}

/// The event log and views. Cheap to clone; the backend's tasks stop when the last clone is
/// dropped.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    head: watch::Receiver<u64>,
    retention: Duration,
}

impl Store {
    /// Opens (creating and migrating if needed) the SQLite store at `path`.
    pub async fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
        Store::open(&Location::Sqlite(path.to_owned()), Options::default()).await
    }

    /// Connects to (and migrates if needed) the Postgres store at `url`.
    pub async fn open_postgres(url: &str) -> Result<Store, StoreError> {
        Store::open(&Location::Postgres(url.to_owned()), Options::default()).await
    }

    /// Opens a store at `location`, running the log and view migrations it needs. Starts the
    /// background task that prunes expired idempotency keys (it stops with the store).
    pub async fn open(location: &Location, options: Options) -> Result<Store, StoreError> {
        let retention = options.idempotency_retention;
        let store = match location {
            Location::Sqlite(path) => {
                let (inner, head) = sqlite::Sqlite::open(path, options).await?;
                Store {
                    backend: Backend::Sqlite(Arc::new(inner)),
                    head,
                    retention,
                }
            }
            Location::Postgres(url) => {
                let (inner, head) = postgres::Postgres::open(url, options).await?;
                Store {
                    backend: Backend::Postgres(Arc::new(inner)),
                    head,
                    retention,
                }
            }
        };
        store.spawn_pruner();
        Ok(store)
    }

    /// Every `PRUNE_EVERY`, prunes expired idempotency keys; holds only a weak reference, so it
    /// ends when the last clone of the store is dropped.
    fn spawn_pruner(&self) {
        let weak = match &self.backend {
            Backend::Sqlite(s) => WeakBackend::Sqlite(Arc::downgrade(s)),
            Backend::Postgres(p) => WeakBackend::Postgres(Arc::downgrade(p)),
        };
        let head = self.head.clone();
        let retention = self.retention;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PRUNE_EVERY).await;
                let backend = match &weak {
                    WeakBackend::Sqlite(w) => w.upgrade().map(Backend::Sqlite),
                    WeakBackend::Postgres(w) => w.upgrade().map(Backend::Postgres),
                };
                let Some(backend) = backend else { return };
                let store = Store {
                    backend,
                    head: head.clone(),
                    retention,
                };
                match store.prune_idempotency().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(keys = n, "expired idempotency keys pruned"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune expired idempotency keys"),
                }
            }
        });
    }

    /// Deletes every idempotency key older than the retention, in batches of `PRUNE_BATCH`
    /// keys, each its own short transaction, so appends are never held up for long. Returns
    /// how many were deleted. The background task calls it every minute.
    pub async fn prune_idempotency(&self) -> Result<u64, StoreError> {
        let retention = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = kiln_types::now_millis().saturating_sub(retention);
        let mut total = 0;
        loop {
            let n = match &self.backend {
                Backend::Sqlite(s) => s.prune_idempotency(cutoff, PRUNE_BATCH).await?,
                Backend::Postgres(p) => p.prune_idempotency(cutoff, PRUNE_BATCH).await?,
            };
            total += n;
            if n < PRUNE_BATCH {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    /// `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Appends events atomically and applies them to the views in the same transaction.
    /// Concurrent appends are committed together (group commit); each keeps its own outcome.
    pub async fn append(&self, append: Append) -> Result<Appended, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.append(append).await,
            Backend::Postgres(p) => p.append(append).await,
        }
    }

    async fn query<T: Send + 'static>(
        &self,
        q: Query,
        params: Vec<Val>,
        map: fn(&dyn sql::Cols) -> Result<T, DbError>,
    ) -> Result<Vec<T>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.query(q, params, map).await,
            Backend::Postgres(p) => p.query(q, params, map).await,
        }
    }

    async fn query_one<T: Send + 'static>(
        &self,
        q: Query,
        params: Vec<Val>,
        map: fn(&dyn sql::Cols) -> Result<T, DbError>,
    ) -> Result<Option<T>, StoreError> {
        Ok(self.query(q, params, map).await?.into_iter().next())
    }

    /// Up to `limit` events with sequence greater than `after`, in order. Never skips an event:
    /// sequences become visible in order on both backends.
    pub async fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let raws = self
            .query(
                log::READ_AFTER,
                vec![after.into(), (limit as u64).into()],
                log::raw_event_row,
            )
            .await?;
        raws.into_iter().map(log::decode).collect()
    }

    /// The sequence of the last committed event this process knows of (0 for an empty log).
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// A receiver that changes whenever the head advances (on Postgres also for appends by other
    /// processes, through LISTEN/NOTIFY). Holds only the latest value, so a slow watcher costs no
    /// memory: it reads the events it missed from the log.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }

    /// A watcher that yields every event after `checkpoint`, in order, in pages of at most `page`
    /// events. Resuming after a restart is `watch(last seq handled)`.
    pub fn watch(&self, checkpoint: u64, page: usize) -> Watcher {
        Watcher {
            store: self.clone(),
            head: self.subscribe(),
            checkpoint,
            page: page.max(1),
        }
    }

    pub async fn token_by_hash(&self, hash: String) -> Result<Option<TokenRow>, StoreError> {
        self.query_one(views::TOKEN_BY_HASH, vec![hash.into()], views::token_row)
            .await
    }

    pub async fn token_by_id(&self, id: TokenId) -> Result<Option<TokenRow>, StoreError> {
        self.query_one(
            views::TOKEN_BY_ID,
            vec![id.as_str().into()],
            views::token_row,
        )
        .await
    }

    /// Every token of an org, revoked and expired ones included, oldest first.
    pub async fn tokens_of_org(&self, org: OrgId) -> Result<Vec<TokenRow>, StoreError> {
        self.query(
            views::TOKENS_OF_ORG,
            vec![org.as_str().into()],
            views::token_row,
        )
        .await
    }

    /// The user with this email (callers lowercase it first, as it is stored).
    pub async fn user_by_email(&self, email: String) -> Result<Option<UserRow>, StoreError> {
        self.query_one(views::USER_BY_EMAIL, vec![email.into()], views::user_row)
            .await
    }

    pub async fn user(&self, id: UserId) -> Result<Option<UserRow>, StoreError> {
        self.query_one(views::USER_BY_ID, vec![id.as_str().into()], views::user_row)
            .await
    }

    /// The orgs a user is a member of, by org name.
    pub async fn memberships_of_user(
        &self,
        user: UserId,
    ) -> Result<Vec<MembershipRow>, StoreError> {
        self.query(
            views::MEMBERSHIPS_OF_USER,
            vec![user.as_str().into()],
            views::membership_row,
        )
        .await
    }

    /// The oldest org with this name (org names are not unique yet).
    pub async fn org_by_name(&self, name: String) -> Result<Option<OrgRow>, StoreError> {
        self.query_one(views::ORG_BY_NAME, vec![name.into()], views::org_row)
            .await
    }

    pub async fn org(&self, id: OrgId) -> Result<Option<OrgRow>, StoreError> {
        self.query_one(views::ORG_BY_ID, vec![id.as_str().into()], views::org_row)
            .await
    }

    pub async fn orgs_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .query_one(views::ORGS_COUNT, vec![], views::count_row)
            .await?
            .unwrap_or(0))
    }

    pub async fn app_by_name(&self, name: String) -> Result<Option<AppRow>, StoreError> {
        self.query_one(views::APP_BY_NAME, vec![name.into()], views::app_row)
            .await
    }

    pub async fn app(&self, id: AppId) -> Result<Option<AppRow>, StoreError> {
        self.query_one(views::APP_BY_ID, vec![id.as_str().into()], views::app_row)
            .await
    }

    pub async fn apps(&self, org: Option<OrgId>) -> Result<Vec<AppRow>, StoreError> {
        match org {
            Some(org) => {
                self.query(
                    views::APPS_OF_ORG,
                    vec![org.as_str().into()],
                    views::app_row,
                )
                .await
            }
            None => self.query(views::APPS_ALL, vec![], views::app_row).await,
        }
    }

    pub async fn releases(&self, app: AppId) -> Result<Vec<ReleaseRow>, StoreError> {
        self.query(
            views::RELEASES_OF_APP,
            vec![app.as_str().into()],
            views::release_row,
        )
        .await
    }

    pub async fn release(
        &self,
        app: AppId,
        version: u64,
    ) -> Result<Option<ReleaseRow>, StoreError> {
        self.query_one(
            views::RELEASE,
            vec![app.as_str().into(), version.into()],
            views::release_row,
        )
        .await
    }

    pub async fn instances_of_app(&self, app: AppId) -> Result<Vec<InstanceRow>, StoreError> {
        self.query(
            views::INSTANCES_OF_APP,
            vec![app.as_str().into()],
            views::instance_row,
        )
        .await
    }

    pub async fn instances_on_host(&self, host: HostId) -> Result<Vec<InstanceRow>, StoreError> {
        self.query(
            views::INSTANCES_ON_HOST,
            vec![host.as_str().into()],
            views::instance_row,
        )
        .await
    }

    pub async fn all_instances(&self) -> Result<Vec<InstanceRow>, StoreError> {
        self.query(views::INSTANCES_ALL, vec![], views::instance_row)
            .await
    }

    pub async fn instance(&self, id: InstanceId) -> Result<Option<InstanceRow>, StoreError> {
        self.query_one(
            views::INSTANCE,
            vec![id.as_str().into()],
            views::instance_row,
        )
        .await
    }

    pub async fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        self.query(views::HOSTS, vec![], views::host_row).await
    }

    /// Every volume not deleted, ordered by app, process group, slot and name.
    pub async fn volumes(&self) -> Result<Vec<VolumeRow>, StoreError> {
        self.query(views::VOLUMES, vec![], views::volume_row).await
    }

    /// The deleted volumes that lived on `host` (its agent removes their files).
    pub async fn deleted_volumes_on_host(
        &self,
        host: &HostId,
    ) -> Result<Vec<VolumeRow>, StoreError> {
        self.query(
            views::VOLUMES_DELETED_ON_HOST,
            vec![host.as_str().into()],
            views::volume_row,
        )
        .await
    }

    /// Every public port and dedicated address of the edges owned by an app.
    pub async fn allocations(&self) -> Result<Vec<AllocationRow>, StoreError> {
        self.query(views::ALLOCATIONS, vec![], views::allocation_row)
            .await
    }

    /// An app's custom domains, verified or not, by hostname.
    pub async fn domains_of_app(&self, app: AppId) -> Result<Vec<DomainRow>, StoreError> {
        self.query(
            views::DOMAINS_OF_APP,
            vec![app.as_str().into()],
            views::domain_row,
        )
        .await
    }

    /// Every claim on a hostname, across apps (at most one of them verified), oldest first.
    pub async fn domains_by_hostname(&self, hostname: &str) -> Result<Vec<DomainRow>, StoreError> {
        self.query(
            views::DOMAINS_BY_HOSTNAME,
            vec![hostname.into()],
            views::domain_row,
        )
        .await
    }

    /// Every verified domain, across apps (what the edges route).
    pub async fn verified_domains(&self) -> Result<Vec<DomainRow>, StoreError> {
        self.query(views::DOMAINS_VERIFIED, vec![], views::domain_row)
            .await
    }

    /// Every domain waiting for verification, across apps (the background re-check's list).
    pub async fn pending_domains(&self) -> Result<Vec<DomainRow>, StoreError> {
        self.query(views::DOMAINS_PENDING, vec![], views::domain_row)
            .await
    }

    /// Releases in a given state, across apps (the reconciler's work list).
    pub async fn releases_in_state(
        &self,
        state: ReleaseState,
    ) -> Result<Vec<ReleaseRow>, StoreError> {
        self.query(
            views::RELEASES_IN_STATE,
            vec![state.as_str().into()],
            views::release_row,
        )
        .await
    }

    /// The data keys of an org (normally one), wrapped.
    pub async fn data_keys_of_org(&self, org: OrgId) -> Result<Vec<DataKeyRow>, StoreError> {
        self.query(
            views::DATA_KEYS_OF_ORG,
            vec![org.as_str().into()],
            views::data_key_row,
        )
        .await
    }

    /// Every data key of every org, wrapped (master key rotation).
    pub async fn all_data_keys(&self) -> Result<Vec<DataKeyRow>, StoreError> {
        self.query(views::DATA_KEYS_ALL, vec![], views::data_key_row)
            .await
    }

    /// An app environment's current secrets version (`None`: it never had secrets).
    pub async fn secret_env(
        &self,
        app: AppId,
        env: String,
    ) -> Result<Option<SecretEnvRow>, StoreError> {
        self.query_one(
            views::SECRET_ENV,
            vec![app.as_str().into(), env.into()],
            views::secret_env_row,
        )
        .await
    }

    /// The secrets of an app environment as of `version` (ciphertext), by name.
    pub async fn secrets_at(
        &self,
        app: AppId,
        env: String,
        version: u64,
    ) -> Result<Vec<SecretEntryRow>, StoreError> {
        self.query(
            views::SECRETS_AT,
            vec![app.as_str().into(), env.into(), version.into()],
            views::secret_entry_row,
        )
        .await
    }

    /// The current version of a stream (0 when it has no events).
    pub async fn stream_version(&self, stream: StreamRef) -> Result<u64, StoreError> {
        Ok(self
            .query_one(
                log::STREAM_VERSION,
                vec![stream.kind.as_str().into(), stream.id.into()],
                views::count_row,
            )
            .await?
            .unwrap_or(0))
    }

    /// Checksums of the live view tables.
    pub async fn view_checksums(&self) -> Result<Vec<ViewChecksum>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.view_checksums().await,
            Backend::Postgres(p) => p.view_checksums().await,
        }
    }

    /// Replays the whole log into fresh view tables and compares their checksums with the live
    /// views, both as of one log head (appends may continue meanwhile). With `replace`, and when
    /// they differ, the live views are then rebuilt in place by replay, in one transaction that
    /// holds the log's write lock (appends wait for it).
    pub async fn rebuild_views(&self, replace: bool) -> Result<RebuildReport, StoreError> {
        let started = std::time::Instant::now();
        let mut report = match &self.backend {
            Backend::Sqlite(s) => s.rebuild_compare().await?,
            Backend::Postgres(p) => p.rebuild_compare().await?,
        };
        if replace && !report.is_equal() {
            match &self.backend {
                Backend::Sqlite(s) => s.replay_live().await?,
                Backend::Postgres(p) => p.replay_live().await?,
            };
            report.replaced = true;
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Writes a consistent copy of a SQLite store to `dest` while it keeps serving (SQLite's
    /// online backup). The copy is itself a store: restoring is opening it. Postgres stores are
    /// backed up with `pg_dump` (see docs/ops/07-backup-restore-runbook.md).
    pub async fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.backup(dest).await,
            Backend::Postgres(_) => Err(StoreError::Unsupported {
                op: "online backup (use pg_dump)",
                backend: "postgres",
            }),
        }
    }
}

/// Follows the log from a checkpoint. Holds no events between calls: a watcher that falls behind
/// costs one `u64` and reads what it missed from the log, a page at a time.
pub struct Watcher {
    store: Store,
    head: watch::Receiver<u64>,
    checkpoint: u64,
    page: usize,
}

impl Watcher {
    /// The sequence of the last event returned (where to resume after a restart).
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    /// Waits until there are events after the checkpoint and returns the next page of them, in
    /// sequence order, advancing the checkpoint.
    pub async fn next(&mut self) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut reread = false;
        loop {
            let events = self.store.read_after(self.checkpoint, self.page).await?;
            if let Some(last) = events.last() {
                self.checkpoint = last.seq;
                return Ok(events);
            }
            let checkpoint = self.checkpoint;
            let waited = if *self.head.borrow_and_update() > checkpoint {
                if !reread {
                    // An append committed between the read and the look at the head.
                    reread = true;
                    continue;
                }
                // The head says there is more but the log shows nothing (it cannot happen
                // while sequences commit in order): wait for news rather than spin.
                self.head.changed().await
            } else {
                self.head.wait_for(|h| *h > checkpoint).await.map(|_| ())
            };
            if waited.is_err() {
                return Err(StoreError::Closed);
            }
        }
    }
}

/// True when an instance in this state counts against its release's desired count.
pub fn is_live(state: InstanceState) -> bool {
    !state.is_terminal()
}

#[doc(hidden)]
pub mod testing {
    //! Helpers for tests of this crate and of its callers: schemas at old versions, raw rows.
    pub use crate::postgres::testing::*;
    pub use crate::sqlite::testing::*;
}
