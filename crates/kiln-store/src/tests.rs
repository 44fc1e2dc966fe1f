use kiln_types::event::Event;
use kiln_types::{AppId, OrgId};

use super::*;

async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("kiln.db"))
        .await
        .unwrap();
    (dir, store)
}

fn meta() -> Metadata {
    Metadata {
        actor: "test".into(),
        ..Default::default()
    }
}

fn app_created(org: &OrgId, name: &str) -> (AppId, Event) {
    let app_id = AppId::generate();
    (
        app_id.clone(),
        Event::AppCreated {
            app_id,
            org_id: org.clone(),
            name: name.parse().unwrap(),
        },
    )
}

#[tokio::test]
async fn append_updates_views_and_head() {
    let (_d, s) = store().await;
    let org = OrgId::generate();
    let mut head = s.subscribe();
    let (app_id, ev) = app_created(&org, "demo");
    let out = s
        .append(Append {
            events: vec![NewEvent {
                event: ev,
                expected: ExpectedVersion::NoStream,
            }],
            metadata: meta(),
            idempotency: None,
        })
        .await
        .unwrap();
    assert_eq!(out.events[0].seq, 1);
    assert_eq!(out.events[0].stream_version, 1);
    head.changed().await.unwrap();
    assert_eq!(*head.borrow(), 1);
    let app = s.app_by_name("demo".into()).await.unwrap().unwrap();
    assert_eq!(app.id, app_id);
    assert_eq!(s.apps(Some(org)).await.unwrap().len(), 1);
    assert_eq!(s.apps(Some(OrgId::generate())).await.unwrap().len(), 0);
}

#[tokio::test]
async fn expected_version_conflict_is_typed_and_writes_nothing() {
    let (_d, s) = store().await;
    let org = OrgId::generate();
    let (_, ev) = app_created(&org, "demo");
    s.append(Append {
        events: vec![NewEvent::any(ev.clone())],
        metadata: meta(),
        idempotency: None,
    })
    .await
    .unwrap();
    let err = s
        .append(Append {
            events: vec![NewEvent {
                event: ev,
                expected: ExpectedVersion::NoStream,
            }],
            metadata: meta(),
            idempotency: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::VersionConflict { actual: 1, .. }),
        "{err:?}"
    );
    assert_eq!(s.head(), 1);
    assert_eq!(s.read_after(0, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn idempotency_key_replays_same_request_and_rejects_different_one() {
    let (_d, s) = store().await;
    let org = OrgId::generate();
    let (_, ev) = app_created(&org, "demo");
    let idem = |hash: &str| {
        Some(Idempotency {
            scope: "org".into(),
            key: "k1".into(),
            request_hash: hash.into(),
        })
    };
    let first = s
        .append(Append {
            events: vec![NewEvent::any(ev.clone())],
            metadata: meta(),
            idempotency: idem("h"),
        })
        .await
        .unwrap();
    assert!(!first.replayed);
    let again = s
        .append(Append {
            events: vec![NewEvent::any(ev.clone())],
            metadata: meta(),
            idempotency: idem("h"),
        })
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.events[0].seq, first.events[0].seq);
    assert_eq!(s.head(), 1);
    let err = s
        .append(Append {
            events: vec![NewEvent::any(ev)],
            metadata: meta(),
            idempotency: idem("other"),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::IdempotencyConflict { .. }));
}

#[tokio::test]
async fn reopen_keeps_log_and_views() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    let org = OrgId::generate();
    {
        let s = Store::open_sqlite(&path).await.unwrap();
        let (_, ev) = app_created(&org, "demo");
        s.append(Append {
            events: vec![NewEvent::any(ev)],
            metadata: meta(),
            idempotency: None,
        })
        .await
        .unwrap();
    }
    let s = Store::open_sqlite(&path).await.unwrap();
    assert_eq!(s.head(), 1);
    assert!(s.app_by_name("demo".into()).await.unwrap().is_some());
    let evs = s.read_after(0, 10).await.unwrap();
    assert_eq!(evs[0].metadata.actor, "test");
}
