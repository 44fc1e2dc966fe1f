//! The log's own tables as both backends read them: stored rows and their strict decoding.

use kiln_types::event::{Event, StreamRef, StreamType};
use kiln_types::UnixMillis;

use crate::error::DbError;
use crate::sql::Cols;
use crate::views::Query;
use crate::{Metadata, RecordedEvent, StoreError};

pub(crate) const READ_AFTER: Query = Query {
    name: "read_after",
    sql: "SELECT seq, stream_type, stream_id, stream_version, event_type, schema_version, payload, metadata, recorded_at FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
};
pub(crate) const READ_RANGE: Query = Query {
    name: "read_range",
    sql: "SELECT seq, stream_type, stream_id, stream_version, event_type, schema_version, payload, metadata, recorded_at FROM events WHERE seq >= $1 AND seq <= $2 ORDER BY seq",
};
pub(crate) const STREAM_VERSION: Query = Query {
    name: "stream_version",
    sql: "SELECT COALESCE(MAX(stream_version), 0) FROM events WHERE stream_type = $1 AND stream_id = $2",
};
pub(crate) const IDEMPOTENCY: Query = Query {
    name: "idempotency",
    sql: "SELECT request_hash, first_seq, last_seq FROM idempotency WHERE scope = $1 AND key = $2 AND created_at > $3",
};
pub(crate) const HEAD: Query = Query {
    name: "head",
    sql: "SELECT COALESCE(MAX(seq), 0) FROM events",
};

/// An `events` row as stored, before decoding.
#[derive(Debug, Clone)]
pub(crate) struct RawEvent {
    pub seq: u64,
    pub stream_type: String,
    pub stream_id: String,
    pub stream_version: u64,
    pub event_type: String,
    pub schema_version: i64,
    pub payload: String,
    pub metadata: String,
    pub recorded_at: UnixMillis,
}

pub(crate) fn raw_event_row(r: &dyn Cols) -> Result<RawEvent, DbError> {
    Ok(RawEvent {
        seq: r.uint(0)?,
        stream_type: r.text(1)?,
        stream_id: r.text(2)?,
        stream_version: r.uint(3)?,
        event_type: r.text(4)?,
        schema_version: r.int(5)?,
        payload: r.text(6)?,
        metadata: r.text(7)?,
        recorded_at: r.int(8)?,
    })
}

pub(crate) fn stream_type(s: &str) -> Option<StreamType> {
    Some(match s {
        "org" => StreamType::Org,
        "app" => StreamType::App,
        "host" => StreamType::Host,
        "instance" => StreamType::Instance,
        "user" => StreamType::User,
        _ => return None,
    })
}

/// Decodes a stored event strictly: unknown types, schema versions from the future, malformed
/// payloads or metadata and a stream that does not match the payload are typed errors naming
/// the event's `seq`, never skipped and never a panic. Old schema versions are upcast.
pub(crate) fn decode(raw: RawEvent) -> Result<RecordedEvent, StoreError> {
    let seq = raw.seq;
    let kind = stream_type(&raw.stream_type).ok_or_else(|| StoreError::UnknownStream {
        seq,
        stream_type: raw.stream_type.clone(),
    })?;
    let payload: serde_json::Value =
        serde_json::from_str(&raw.payload).map_err(|e| StoreError::Decode {
            seq,
            source: kiln_types::event::DecodeError::Malformed {
                event_type: raw.event_type.clone(),
                version: u32::try_from(raw.schema_version).unwrap_or(0),
                source: e,
            },
        })?;
    let schema_version = u32::try_from(raw.schema_version).unwrap_or(0);
    let event = Event::decode(&raw.event_type, schema_version, payload)
        .map_err(|source| StoreError::Decode { seq, source })?;
    let metadata: Metadata = serde_json::from_str(&raw.metadata)
        .map_err(|source| StoreError::DecodeMetadata { seq, source })?;
    let stream = StreamRef {
        kind,
        id: raw.stream_id,
    };
    if event.stream() != stream {
        return Err(StoreError::StreamMismatch { seq });
    }
    Ok(RecordedEvent {
        seq,
        stream,
        stream_version: raw.stream_version,
        schema_version,
        event,
        metadata,
        recorded_at: raw.recorded_at,
    })
}

/// The stored form of an event's fields, shared by both backends' inserts.
pub(crate) struct EventRow {
    pub seq: i64,
    pub stream_type: &'static str,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_type: &'static str,
    pub schema_version: i64,
    pub payload: String,
    pub metadata: String,
    pub recorded_at: i64,
}

impl EventRow {
    pub(crate) fn of(e: &RecordedEvent) -> EventRow {
        let (event_type, payload) = e.event.to_parts();
        EventRow {
            seq: e.seq as i64,
            stream_type: e.stream.kind.as_str(),
            stream_id: e.stream.id.clone(),
            stream_version: e.stream_version as i64,
            event_type,
            schema_version: e.schema_version.into(),
            payload: payload.to_string(),
            metadata: serde_json::to_string(&e.metadata).unwrap_or_else(|_| "{}".into()),
            recorded_at: e.recorded_at,
        }
    }
}
