//! Volumes in the control plane (decision 0011: a volume lives on one host), with a real SQLite
//! store and the real reconciler; the agents' reports are appended as the API would:
//! - the first placement of each instance slot creates its volumes (`volume_created`) on the
//!   host it chose, and the WorkloadSpec names them;
//! - a deploy replaces an instance with volumes stop-first: no new instance while the old one
//!   holds the volume, then the replacement gets the same volume on the same host;
//! - an instance whose volume's host is down waits: no new, empty volume elsewhere;
//! - the org's volume quota refuses a release that wants more volumes (409 `quota_exceeded`).

use std::sync::Arc;

use kiln_api::Client;
use kiln_control::{Control, ControlConfig, Reconciler, Scope};
use kiln_store::{Append, InstanceRow, Metadata, NewEvent, Store};
use kiln_types::event::{Driver, Event, HostState, ReleaseState};
use kiln_types::{AppId, HostId, ImageRef, InstanceState, MiB, MilliCpu, OrgId, ReleaseId};

const MANIFEST: &str = r#"app = "db"

[scale]
count = 2

[[mounts]]
volume = "data"
path = "/data"
initial_size = "64mb"
"#;

async fn append(store: &Store, events: Vec<Event>) {
    store
        .append(Append {
            events: events.into_iter().map(NewEvent::any).collect(),
            metadata: Metadata {
                actor: "test".into(),
                ..Default::default()
            },
            idempotency: None,
        })
        .await
        .unwrap();
}

fn release(app_id: &AppId, version: u64, manifest: &str) -> Event {
    let m = kiln_manifest::parse("kiln.toml", manifest).unwrap();
    Event::ReleaseCreated {
        app_id: app_id.clone(),
        release_id: ReleaseId::generate(),
        version,
        image_input: format!("127.0.0.1:5000/db:v{version}"),
        image: ImageRef {
            registry: "127.0.0.1:5000".into(),
            repository: "db".into(),
            digest: format!("sha256:{}", version.to_string().repeat(64)),
        },
        manifest: serde_json::to_value(&m).unwrap(),
        manifest_source: manifest.into(),
        secrets_version: 0,
    }
}

fn host(index: u16) -> (HostId, Event) {
    let id = HostId::generate();
    (
        id.clone(),
        Event::HostRegistered {
            host_id: id,
            name: format!("h{index}"),
            index,
            driver: Driver::Runc,
            cpu: MilliCpu(8000),
            memory: MiB(8192),
            region: "local".into(),
        },
    )
}

fn state(i: &InstanceRow, state: InstanceState) -> Event {
    Event::InstanceStateChanged {
        instance_id: i.id.clone(),
        app_id: i.app_id.clone(),
        state,
        reason: None,
    }
}

fn volume_of(i: &InstanceRow) -> kiln_types::VolumeId {
    i.spec.mounts[0].volume_id.clone().expect("a volume id")
}

#[tokio::test]
async fn volumes_follow_their_slot_and_deploys_replace_stop_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("kiln.db"))
        .await
        .unwrap();
    let control = Control::new(store.clone(), ControlConfig::default()).unwrap();
    let reconciler = Reconciler::new(control);
    let (h1, e1) = host(1);
    let (h2, e2) = host(2);
    let app_id = AppId::generate();
    append(
        &store,
        vec![
            e1,
            e2,
            Event::AppCreated {
                app_id: app_id.clone(),
                org_id: OrgId::generate(),
                name: "db".parse().unwrap(),
            },
            release(&app_id, 1, MANIFEST),
        ],
    )
    .await;

    reconciler.pass().await.unwrap();
    let v1 = store.all_instances().await.unwrap();
    assert_eq!(v1.len(), 2);
    let volumes = store.volumes().await.unwrap();
    assert_eq!(volumes.len(), 2, "{volumes:#?}");
    for i in &v1 {
        let vol = volumes.iter().find(|v| v.id == volume_of(i)).unwrap();
        assert_eq!(
            vol.host_id, i.host_id,
            "a volume is created on its instance's host"
        );
        assert_eq!((vol.name.as_str(), vol.size), ("data", MiB(64)));
        assert_eq!(i.spec.mounts[0].path, "/data");
        assert!(i.spec.requires.contains("mounts"));
    }
    let mut slots: Vec<u32> = volumes.iter().map(|v| v.slot).collect();
    slots.sort();
    assert_eq!(slots, [0, 1]);
    // Spread over both hosts.
    assert!(v1.iter().any(|i| i.host_id == h1) && v1.iter().any(|i| i.host_id == h2));

    append(
        &store,
        v1.iter()
            .map(|i| state(i, InstanceState::Healthy))
            .collect(),
    )
    .await;
    reconciler.pass().await.unwrap();
    let r1 = store.release(app_id.clone(), 1).await.unwrap().unwrap();
    assert_eq!(r1.state, ReleaseState::Healthy);

    // v2 (rolling by default, which would surge): stop-first instead. One old instance stops,
    // and nothing new is placed while it still holds its volume.
    append(&store, vec![release(&app_id, 2, MANIFEST)]).await;
    reconciler.pass().await.unwrap();
    reconciler.pass().await.unwrap();
    let all = store.all_instances().await.unwrap();
    assert_eq!(all.len(), 2, "no instance above the count: {all:#?}");
    let stopping: Vec<&InstanceRow> = all.iter().filter(|i| !i.desired_running).collect();
    assert_eq!(stopping.len(), 1, "{all:#?}");
    let old = stopping[0].clone();

    append(&store, vec![state(&old, InstanceState::Stopped)]).await;
    reconciler.pass().await.unwrap();
    let all = store.all_instances().await.unwrap();
    let new: Vec<&InstanceRow> = all.iter().filter(|i| i.release_version == 2).collect();
    assert_eq!(new.len(), 1, "{all:#?}");
    assert_eq!(
        volume_of(new[0]),
        volume_of(&old),
        "the replacement attaches the same volume"
    );
    assert_eq!(new[0].host_id, old.host_id);
    assert_eq!(store.volumes().await.unwrap().len(), 2, "no new volume");

    // The rest of the deploy, the same way.
    append(&store, vec![state(new[0], InstanceState::Healthy)]).await;
    reconciler.pass().await.unwrap();
    let other = store
        .all_instances()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.release_version == 1 && i.id != old.id)
        .unwrap();
    assert!(!other.desired_running, "the second old instance stops next");
    append(&store, vec![state(&other, InstanceState::Stopped)]).await;
    reconciler.pass().await.unwrap();
    let v2: Vec<InstanceRow> = store
        .all_instances()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.release_version == 2)
        .collect();
    assert_eq!(v2.len(), 2);
    assert_eq!(volume_of(&v2[1]), volume_of(&other));
    append(
        &store,
        v2.iter()
            .map(|i| state(i, InstanceState::Healthy))
            .collect(),
    )
    .await;
    reconciler.pass().await.unwrap();
    let r2 = store.release(app_id.clone(), 2).await.unwrap().unwrap();
    assert_eq!(r2.state, ReleaseState::Healthy, "{:?}", r2.reason);

    // The host of one volume goes down and its instance dies: the replacement waits for the
    // host, it does not get a new, empty volume elsewhere.
    let lost = &v2[0];
    append(
        &store,
        vec![
            Event::HostStateChanged {
                host_id: lost.host_id.clone(),
                state: HostState::Down,
                reason: Some("test".into()),
            },
            state(lost, InstanceState::Failed),
        ],
    )
    .await;
    for _ in 0..3 {
        reconciler.pass().await.unwrap();
    }
    let live: Vec<InstanceRow> = store
        .all_instances()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.desired_running && !i.state.is_terminal())
        .collect();
    assert_eq!(live.len(), 1, "{live:#?}");
    assert_eq!(store.volumes().await.unwrap().len(), 2, "no new volume");

    // The host comes back: the replacement goes there, with the volume.
    append(
        &store,
        vec![Event::HostStateChanged {
            host_id: lost.host_id.clone(),
            state: HostState::Ready,
            reason: None,
        }],
    )
    .await;
    reconciler.pass().await.unwrap();
    let back = store
        .all_instances()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.desired_running && !i.state.is_terminal() && i.id != v2[1].id)
        .expect("a replacement");
    assert_eq!(back.host_id, lost.host_id);
    assert_eq!(volume_of(&back), volume_of(lost));
}

#[tokio::test]
async fn the_volume_quota_refuses_a_release_wanting_more() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("kiln.db"))
        .await
        .unwrap();
    let control: Arc<Control> = Control::new(
        store.clone(),
        ControlConfig {
            quotas: kiln_control::Quotas {
                volumes: 3,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    control.bootstrap("operator").await.unwrap();
    let org = control.first_org().await.unwrap().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = control.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let app_id = AppId::generate();
    append(
        &store,
        vec![
            Event::AppCreated {
                app_id: app_id.clone(),
                org_id: org.clone(),
                name: "db".parse().unwrap(),
            },
            release(&app_id, 1, MANIFEST),
        ],
    )
    .await;
    let r1 = store.release(app_id.clone(), 1).await.unwrap().unwrap();
    append(
        &store,
        vec![Event::ReleaseStateChanged {
            app_id: app_id.clone(),
            release_id: r1.id,
            state: ReleaseState::Healthy,
            reason: None,
        }],
    )
    .await;
    let token = control
        .create_token(&org, "t", &[Scope::Admin])
        .await
        .unwrap();
    let api = Client::new(&format!("http://{addr}"), &token).unwrap();

    // `kiln debug placement` knows the pin: with one instance stopped, the next instance of the
    // group goes to the host of that slot's volume.
    let (h1, e1) = host(1);
    let (h2, e2) = host(2);
    append(&store, vec![e1, e2]).await;
    Reconciler::new(control.clone()).pass().await.unwrap();
    let placed = store.all_instances().await.unwrap();
    assert_eq!(placed.len(), 2);
    let gone = &placed[0];
    append(&store, vec![state(gone, InstanceState::Stopped)]).await;
    let e = api.explain_placement("db", None, None).await.unwrap();
    assert_eq!(e.chosen.as_ref(), Some(&gone.host_id), "{}", e.explanation);
    let other = if gone.host_id == h1 { &h2 } else { &h1 };
    let line = e
        .explanation
        .lines()
        .find(|l| l.contains(other.as_str()))
        .unwrap_or_else(|| panic!("a line for the other host: {}", e.explanation));
    assert!(line.contains("volume is on"), "{line}");

    let scale = |n| kiln_api::ScaleRequest {
        count: Some(n),
        ..Default::default()
    };
    // Two slots with one mount each fit in 3; four do not.
    let err = api.scale("db", &scale(4), "v1").await.unwrap_err();
    assert_eq!(err.code(), Some("quota_exceeded"), "{err}");
    assert!(err.to_string().contains("volumes quota is 3"), "{err}");
    api.scale("db", &scale(3), "v2").await.unwrap();
}
