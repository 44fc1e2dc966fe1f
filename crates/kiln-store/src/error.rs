use kiln_types::event::{DecodeError, StreamRef};

/// The database error under a [`StoreError`]: whichever backend raised it, or a view row that no
/// longer parses.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error("column {column} holds {value:?}, which does not parse")]
    Column { column: usize, value: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl DbError {
    /// True when the error says the connection to the database is gone or refused (as opposed
    /// to a statement that failed), so that the operation may be retried on a new connection.
    pub fn is_connection(&self) -> bool {
        match self {
            DbError::Postgres(e) => match e.code() {
                // Class 08: connection exception; 57P01-03: admin shutdown, crash shutdown,
                // cannot connect now (the server is starting or stopping).
                Some(c) => c.code().starts_with("08") || c.code().starts_with("57P0"),
                // No SQLSTATE: tokio-postgres' own kinds; only these are about the connection.
                None => {
                    let s = e.to_string();
                    e.is_closed()
                        || [
                            "error connecting",
                            "connection closed",
                            "error communicating",
                            "timeout",
                            "unexpected message",
                        ]
                        .iter()
                        .any(|p| s.starts_with(p))
                }
            },
            _ => false,
        }
    }
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {location}")]
    Open {
        location: String,
        #[source]
        source: DbError,
    },
    #[error("cannot migrate the store's {track} schema to version {version}")]
    Migrate {
        track: &'static str,
        version: u32,
        #[source]
        source: DbError,
    },
    #[error(
        "the store's {track} schema is at version {found}, newer than this build knows ({known})"
    )]
    SchemaTooNew {
        track: &'static str,
        found: u32,
        known: u32,
    },
    #[error("stream {kind}/{id} is at version {actual}, but the append expected {expected}")]
    VersionConflict {
        kind: &'static str,
        id: String,
        expected: String,
        actual: u64,
    },
    #[error("idempotency key {key:?} was already used for a different request")]
    IdempotencyConflict { key: String },
    #[error("append of {event_type} failed")]
    Append {
        event_type: &'static str,
        #[source]
        source: DbError,
    },
    #[error("cannot apply {event_type} (seq {seq}) to the views")]
    ApplyView {
        event_type: &'static str,
        seq: u64,
        #[source]
        source: DbError,
    },
    #[error("event {seq} cannot be decoded")]
    Decode {
        seq: u64,
        #[source]
        source: DecodeError,
    },
    #[error("event {seq} has metadata that does not parse")]
    DecodeMetadata {
        seq: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error("event {seq} belongs to an unknown stream type {stream_type:?}")]
    UnknownStream { seq: u64, stream_type: String },
    #[error("event {seq} does not belong to the stream it is stored under")]
    StreamMismatch { seq: u64 },
    #[error("view query {query} failed")]
    Query {
        query: &'static str,
        #[source]
        source: DbError,
    },
    #[error(
        "the database did not answer for {waited_ms} ms ({attempts} attempts); {op} was not done"
    )]
    Unavailable {
        op: &'static str,
        attempts: u32,
        waited_ms: u64,
        #[source]
        source: DbError,
    },
    #[error("the connection was lost while committing; whether the append was recorded is unknown (retry it with its idempotency key)")]
    CommitUnknown {
        #[source]
        source: DbError,
    },
    #[error("rebuilding the views failed at {step}")]
    Rebuild {
        step: &'static str,
        #[source]
        source: DbError,
    },
    #[error("backup to {path} failed")]
    Backup {
        path: String,
        #[source]
        source: DbError,
    },
    #[error("{op} is not supported by the {backend} backend")]
    Unsupported {
        op: &'static str,
        backend: &'static str,
    },
    #[error("the store has shut down")]
    Closed,
    #[error("the store's worker task panicked")]
    TaskPanicked,
}

impl StoreError {
    pub(crate) fn conflict(
        stream: &StreamRef,
        expected: crate::ExpectedVersion,
        actual: u64,
    ) -> Self {
        StoreError::VersionConflict {
            kind: stream.kind.as_str(),
            id: stream.id.clone(),
            expected: match expected {
                crate::ExpectedVersion::Any => "any".into(),
                crate::ExpectedVersion::NoStream => "no stream".into(),
                crate::ExpectedVersion::Exact(v) => v.to_string(),
            },
            actual,
        }
    }

    /// True when retrying the same operation later may succeed (the database was unreachable, or
    /// the outcome of a commit is unknown and the append carries an idempotency key).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. } | StoreError::CommitUnknown { .. }
        )
    }

    /// Copies an error for every append of a failed batch (the source is flattened to text:
    /// database errors are not `Clone`).
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::VersionConflict {
                kind,
                id,
                expected,
                actual,
            } => StoreError::VersionConflict {
                kind,
                id: id.clone(),
                expected: expected.clone(),
                actual: *actual,
            },
            StoreError::IdempotencyConflict { key } => {
                StoreError::IdempotencyConflict { key: key.clone() }
            }
            StoreError::Unavailable {
                op,
                attempts,
                waited_ms,
                source,
            } => StoreError::Unavailable {
                op,
                attempts: *attempts,
                waited_ms: *waited_ms,
                source: DbError::Io(std::io::Error::other(kiln_types::error_chain(source))),
            },
            StoreError::CommitUnknown { source } => StoreError::CommitUnknown {
                source: DbError::Io(std::io::Error::other(kiln_types::error_chain(source))),
            },
            StoreError::Closed => StoreError::Closed,
            other => StoreError::Append {
                event_type: "batch",
                source: DbError::Io(std::io::Error::other(kiln_types::error_chain(other))),
            },
        }
    }
}
