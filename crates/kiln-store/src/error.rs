use kiln_types::event::StreamRef;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot migrate the store's schema to version {version}")]
    Migrate {
        version: u32,
        #[source]
        source: rusqlite::Error,
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
        source: rusqlite::Error,
    },
    #[error("cannot apply {event_type} (seq {seq}) to the views")]
    ApplyView {
        event_type: &'static str,
        seq: u64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("event {seq} of type {event_type:?} (schema {schema_version}) cannot be decoded")]
    Decode {
        seq: u64,
        event_type: String,
        schema_version: u32,
        #[source]
        source: serde_json::Error,
    },
    #[error("event {seq} belongs to an unknown stream type {stream_type:?}")]
    UnknownStream { seq: u64, stream_type: String },
    #[error("view query {query} failed")]
    Query {
        query: &'static str,
        #[source]
        source: rusqlite::Error,
    },
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
}
