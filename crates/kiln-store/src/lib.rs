//! The event log and its materialized views (locked decision 0005).
//!
//! This crate owns Kiln's durable state: an append-only log of [`kiln_types::event::Event`]s with a
//! global sequence, per-stream versions with optimistic concurrency and idempotency keys, and the
//! view tables the API reads, which are updated in the same transaction as each append
//! (read-your-writes). Watchers follow the log through [`Store::subscribe`].
//!
//! The embedded backend is SQLite (the single-node default). It does not own the meaning of
//! events beyond applying them to views: deciding what to append is the control plane's job.

mod error;
mod sqlite;
mod views;

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use kiln_types::event::{Event, ReleaseState, StreamRef};
use kiln_types::{AppId, HostId, InstanceId, InstanceState, OrgId, UnixMillis};

pub use error::StoreError;
pub use views::{AppRow, HostRow, InstanceRow, ReleaseRow, TokenRow};

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

/// The event log and views. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<sqlite::Sqlite>,
    head: watch::Receiver<u64>,
}

impl Store {
    /// Opens (creating and migrating if needed) the SQLite store at `path`.
    pub async fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
        let path = path.to_owned();
        let (inner, head) = tokio::task::spawn_blocking(move || sqlite::Sqlite::open(&path))
            .await
            .map_err(|_| StoreError::TaskPanicked)??;
        Ok(Store {
            inner: Arc::new(inner),
            head,
        })
    }

    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&sqlite::Sqlite) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|_| StoreError::TaskPanicked)?
    }

    /// Appends events atomically and applies them to the views in the same transaction.
    pub async fn append(&self, append: Append) -> Result<Appended, StoreError> {
        self.run(move |s| s.append(append)).await
    }

    /// Up to `limit` events with sequence greater than `after`, in order. Never skips an event:
    /// SQLite has one writer at a time, so sequences become visible in order.
    pub async fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.run(move |s| s.read_after(after, limit)).await
    }

    /// The sequence of the last committed event (0 for an empty log).
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// A receiver that changes whenever the head advances. Holds only the latest value, so a slow
    /// watcher costs no memory: it reads the events it missed from the log.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }

    pub async fn token_by_hash(&self, hash: String) -> Result<Option<TokenRow>, StoreError> {
        self.run(move |s| s.token_by_hash(&hash)).await
    }

    pub async fn orgs_count(&self) -> Result<u64, StoreError> {
        self.run(|s| s.orgs_count()).await
    }

    pub async fn app_by_name(&self, name: String) -> Result<Option<AppRow>, StoreError> {
        self.run(move |s| s.app_by_name(&name)).await
    }

    pub async fn apps(&self, org: Option<OrgId>) -> Result<Vec<AppRow>, StoreError> {
        self.run(move |s| s.apps(org.as_ref())).await
    }

    pub async fn releases(&self, app: AppId) -> Result<Vec<ReleaseRow>, StoreError> {
        self.run(move |s| s.releases(&app)).await
    }

    pub async fn release(
        &self,
        app: AppId,
        version: u64,
    ) -> Result<Option<ReleaseRow>, StoreError> {
        self.run(move |s| s.release(&app, version)).await
    }

    pub async fn instances_of_app(&self, app: AppId) -> Result<Vec<InstanceRow>, StoreError> {
        self.run(move |s| s.instances(Some(&app), None)).await
    }

    pub async fn instances_on_host(&self, host: HostId) -> Result<Vec<InstanceRow>, StoreError> {
        self.run(move |s| s.instances(None, Some(&host))).await
    }

    pub async fn all_instances(&self) -> Result<Vec<InstanceRow>, StoreError> {
        self.run(move |s| s.instances(None, None)).await
    }

    pub async fn instance(&self, id: InstanceId) -> Result<Option<InstanceRow>, StoreError> {
        self.run(move |s| s.instance(&id)).await
    }

    pub async fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        self.run(|s| s.hosts()).await
    }

    /// Releases in a given state, across apps (the reconciler's work list).
    pub async fn releases_in_state(
        &self,
        state: ReleaseState,
    ) -> Result<Vec<ReleaseRow>, StoreError> {
        self.run(move |s| s.releases_in_state(state)).await
    }

    /// The current version of a stream (0 when it has no events).
    pub async fn stream_version(&self, stream: StreamRef) -> Result<u64, StoreError> {
        self.run(move |s| s.stream_version(&stream)).await
    }
}

/// True when an instance in this state counts against its release's desired count.
pub fn is_live(state: InstanceState) -> bool {
    !state.is_terminal()
}

#[cfg(test)]
mod tests;
