//! Planning a batch of appends: the expected-version and idempotency rules, applied in memory.
//!
//! Both backends commit appends in batches (group commit): one transaction, holding the log's
//! write lock, records many appends. The planner decides, append by append and in order, what
//! each one writes, as if the appends had run one after another: it starts from the streams'
//! versions and idempotency records as committed, and updates that state as each append is
//! accepted. An append that fails (a version conflict, a key reused for another request, a view
//! that rejects its change) is undone and leaves no trace, so it never fails its batch-mates.

use std::collections::HashMap;

use kiln_types::event::StreamRef;
use kiln_types::UnixMillis;

use crate::{Append, ExpectedVersion, Idempotency, RecordedEvent, StoreError};

/// What the log remembers about an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdemRecord {
    pub request_hash: String,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// The decision for one append.
#[derive(Debug)]
pub(crate) enum Planned {
    /// Record these events (with this key, if any).
    Write {
        events: Vec<RecordedEvent>,
        idempotency: Option<Idempotency>,
    },
    /// The key was used before for the same request: answer with the events it recorded.
    Replay { first_seq: u64, last_seq: u64 },
    /// The append is refused; nothing is written.
    Fail(StoreError),
}

/// How to take back one accepted append (its view change failed).
#[derive(Debug, Default)]
pub(crate) struct Undo {
    versions: Vec<(StreamRef, Option<u64>)>,
    key: Option<(String, String)>,
    next_seq: u64,
}

/// The log's state as the batch sees it.
pub(crate) struct Planner {
    versions: HashMap<StreamRef, u64>,
    keys: HashMap<(String, String), IdemRecord>,
    next_seq: u64,
    now: UnixMillis,
}

impl Planner {
    /// `head` is the last committed sequence; `now` the batch's recorded time.
    pub(crate) fn new(head: u64, now: UnixMillis) -> Planner {
        Planner {
            versions: HashMap::new(),
            keys: HashMap::new(),
            next_seq: head + 1,
            now,
        }
    }

    pub(crate) fn now(&self) -> UnixMillis {
        self.now
    }

    /// The last sequence the batch has assigned so far (the head once it commits).
    pub(crate) fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Every stream the planner knows, with its version as of the appends accepted so far.
    pub(crate) fn versions(&self) -> impl Iterator<Item = (&StreamRef, u64)> {
        self.versions.iter().map(|(s, v)| (s, *v))
    }

    /// The streams and keys of `appends` whose state the planner has not loaded yet.
    pub(crate) fn missing<'a>(
        &self,
        appends: impl IntoIterator<Item = &'a Append>,
    ) -> (Vec<StreamRef>, Vec<(String, String)>) {
        let mut streams = Vec::new();
        let mut keys = Vec::new();
        let mut seen_streams = std::collections::HashSet::new();
        let mut seen_keys = std::collections::HashSet::new();
        for a in appends {
            for e in &a.events {
                let s = e.event.stream();
                if !self.versions.contains_key(&s) && seen_streams.insert(s.clone()) {
                    streams.push(s);
                }
            }
            if let Some(i) = &a.idempotency {
                let k = (i.scope.clone(), i.key.clone());
                if !self.keys.contains_key(&k) && seen_keys.insert(k.clone()) {
                    keys.push(k);
                }
            }
        }
        (streams, keys)
    }

    /// Loads a stream's committed version (0 for a stream without events).
    pub(crate) fn load_stream(&mut self, stream: StreamRef, version: u64) {
        self.versions.entry(stream).or_insert(version);
    }

    /// Loads a key's committed record; keys not loaded are taken as unused.
    pub(crate) fn load_key(&mut self, scope: String, key: String, record: IdemRecord) {
        self.keys.entry((scope, key)).or_insert(record);
    }

    /// Decides one append. For a `Write`, the planner's state already includes it; call
    /// [`Planner::undo`] with the returned value if it cannot be written after all.
    pub(crate) fn plan(&mut self, append: &Append) -> (Planned, Undo) {
        let mut undo = Undo {
            next_seq: self.next_seq,
            ..Default::default()
        };
        if let Some(idem) = &append.idempotency {
            if let Some(rec) = self.keys.get(&(idem.scope.clone(), idem.key.clone())) {
                let planned = if rec.request_hash == idem.request_hash {
                    Planned::Replay {
                        first_seq: rec.first_seq,
                        last_seq: rec.last_seq,
                    }
                } else {
                    Planned::Fail(StoreError::IdempotencyConflict {
                        key: idem.key.clone(),
                    })
                };
                return (planned, undo);
            }
        }
        let mut events = Vec::with_capacity(append.events.len());
        for new in &append.events {
            let stream = new.event.stream();
            let current = self.versions.get(&stream).copied().unwrap_or(0);
            let ok = match new.expected {
                ExpectedVersion::Any => true,
                ExpectedVersion::NoStream => current == 0,
                ExpectedVersion::Exact(v) => current == v,
            };
            if !ok {
                let err = StoreError::conflict(&stream, new.expected, current);
                self.undo(undo);
                return (Planned::Fail(err), Undo::default());
            }
            undo.versions
                .push((stream.clone(), self.versions.get(&stream).copied()));
            self.versions.insert(stream.clone(), current + 1);
            events.push(RecordedEvent {
                seq: self.next_seq,
                stream,
                stream_version: current + 1,
                schema_version: new.event.schema_version(),
                event: new.event.clone(),
                metadata: append.metadata.clone(),
                recorded_at: self.now,
            });
            self.next_seq += 1;
        }
        // An append without events records nothing, not even its key: there is nothing to
        // replay, and a later append with the key may still write.
        if let (Some(idem), Some(first), Some(last)) =
            (&append.idempotency, events.first(), events.last())
        {
            let k = (idem.scope.clone(), idem.key.clone());
            self.keys.insert(
                k.clone(),
                IdemRecord {
                    request_hash: idem.request_hash.clone(),
                    first_seq: first.seq,
                    last_seq: last.seq,
                },
            );
            undo.key = Some(k);
        }
        (
            Planned::Write {
                events,
                idempotency: append.idempotency.clone(),
            },
            undo,
        )
    }

    /// Takes back the last accepted append.
    pub(crate) fn undo(&mut self, undo: Undo) {
        for (stream, before) in undo.versions.into_iter().rev() {
            match before {
                Some(v) => self.versions.insert(stream, v),
                None => self.versions.remove(&stream),
            };
        }
        if let Some(k) = undo.key {
            self.keys.remove(&k);
        }
        self.next_seq = undo.next_seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Metadata, NewEvent};
    use kiln_types::event::Event;
    use kiln_types::OrgId;

    fn org(id: &OrgId) -> Event {
        Event::OrgCreated {
            org_id: id.clone(),
            name: "o".into(),
        }
    }

    fn append(events: Vec<NewEvent>, key: Option<(&str, &str)>) -> Append {
        Append {
            events,
            metadata: Metadata::default(),
            idempotency: key.map(|(k, h)| Idempotency {
                scope: "s".into(),
                key: k.into(),
                request_hash: h.into(),
            }),
        }
    }

    #[test]
    fn failed_append_leaves_no_trace_for_later_ones() {
        let a = OrgId::generate();
        let mut p = Planner::new(10, 0);
        p.load_stream(org(&a).stream(), 0);
        let (first, undo) = p.plan(&append(
            vec![NewEvent {
                event: org(&a),
                expected: ExpectedVersion::NoStream,
            }],
            Some(("k", "h")),
        ));
        let Planned::Write { events, .. } = first else {
            panic!("{first:?}")
        };
        assert_eq!((events[0].seq, events[0].stream_version), (11, 1));
        // Its view change failed: undo, and the next append gets the same seq and version.
        p.undo(undo);
        let (again, _) = p.plan(&append(
            vec![NewEvent {
                event: org(&a),
                expected: ExpectedVersion::NoStream,
            }],
            Some(("k", "other")),
        ));
        let Planned::Write { events, .. } = again else {
            panic!("{again:?}")
        };
        assert_eq!((events[0].seq, events[0].stream_version), (11, 1));
    }

    #[test]
    fn conflict_midway_undoes_earlier_events_of_the_append() {
        let a = OrgId::generate();
        let b = OrgId::generate();
        let mut p = Planner::new(0, 0);
        p.load_stream(org(&a).stream(), 0);
        p.load_stream(org(&b).stream(), 4);
        let (r, _) = p.plan(&append(
            vec![
                NewEvent::any(org(&a)),
                NewEvent {
                    event: org(&b),
                    expected: ExpectedVersion::Exact(3),
                },
            ],
            None,
        ));
        assert!(matches!(
            r,
            Planned::Fail(StoreError::VersionConflict { actual: 4, .. })
        ));
        let (r, _) = p.plan(&append(vec![NewEvent::any(org(&a))], None));
        let Planned::Write { events, .. } = r else {
            panic!("{r:?}")
        };
        assert_eq!((events[0].seq, events[0].stream_version), (1, 1));
    }

    #[test]
    fn key_used_earlier_in_the_batch_replays_or_conflicts() {
        let a = OrgId::generate();
        let mut p = Planner::new(0, 0);
        let (r, _) = p.plan(&append(vec![NewEvent::any(org(&a))], Some(("k", "h"))));
        assert!(matches!(r, Planned::Write { .. }));
        let (r, _) = p.plan(&append(vec![NewEvent::any(org(&a))], Some(("k", "h"))));
        assert!(matches!(
            r,
            Planned::Replay {
                first_seq: 1,
                last_seq: 1
            }
        ));
        let (r, _) = p.plan(&append(vec![NewEvent::any(org(&a))], Some(("k", "x"))));
        assert!(matches!(
            r,
            Planned::Fail(StoreError::IdempotencyConflict { .. })
        ));
    }
}
