//! Hosts in the control plane, through the real API and reconciler with two simulated agents
//! (they register, heartbeat and report instance states over HTTP as `kiln-agent` does):
//! a host that stops heartbeating is declared down and its instance is replaced on the other
//! host; heartbeats bring it back; draining a host moves its instance with the replacement
//! healthy before the old one stops; hosts are the operator's only. Also `rollback`: a new
//! release with an older one's image and manifest.

use std::sync::Arc;
use std::time::Duration;

use kiln_api::{Client, InstanceReport, RegisterHost};
use kiln_control::{Control, ControlConfig, Reconciler, Scope};
use kiln_store::{Append, InstanceRow, Metadata, NewEvent, Store};
use kiln_types::event::{Driver, Event, HostState, ReleaseState};
use kiln_types::{AppId, HostId, ImageRef, InstanceState, MiB, MilliCpu, ReleaseId};

const MANIFEST: &str = "app = \"web\"\n\n[scale]\ncount = 1\n\n[[services]]\nprotocol = \"tls\"\ninternal_port = 8443\n";

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    control: Arc<Control>,
    url: String,
}

async fn fixture(down_after: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("kiln.db"))
        .await
        .unwrap();
    let control = Control::new(
        store.clone(),
        ControlConfig {
            host_down_after: down_after,
            ..Default::default()
        },
    )
    .unwrap();
    control.bootstrap("operator").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = control.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Fixture {
        _dir: dir,
        store,
        control,
        url: format!("http://{addr}"),
    }
}

impl Fixture {
    async fn client(&self, scopes: &[Scope]) -> Client {
        let org = self.control.first_org().await.unwrap().unwrap();
        let token = self.control.create_token(&org, "t", scopes).await.unwrap();
        Client::new(&self.url, &token).unwrap()
    }

    async fn append(&self, events: Vec<Event>) {
        self.store
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

    async fn app_with_release(&self, version_digest: char) -> AppId {
        let org = self.control.first_org().await.unwrap().unwrap();
        let app_id = AppId::generate();
        let manifest = kiln_manifest::parse("kiln.toml", MANIFEST).unwrap();
        self.append(vec![
            Event::AppCreated {
                app_id: app_id.clone(),
                org_id: org,
                name: "web".parse().unwrap(),
            },
            release(&app_id, 1, version_digest, &manifest),
        ])
        .await;
        app_id
    }

    /// A second org, "tenant", and a client with its admin token.
    async fn tenant(&self) -> (kiln_types::OrgId, Client) {
        let org = kiln_types::OrgId::generate();
        self.append(vec![Event::OrgCreated {
            org_id: org.clone(),
            name: "tenant".into(),
        }])
        .await;
        let token = self
            .control
            .create_token(&org, "t", &[Scope::Admin])
            .await
            .unwrap();
        (org, Client::new(&self.url, &token).unwrap())
    }

    async fn live(&self) -> Vec<InstanceRow> {
        self.store
            .all_instances()
            .await
            .unwrap()
            .into_iter()
            .filter(|i| i.desired_running && !i.state.is_terminal())
            .collect()
    }
}

fn release(app_id: &AppId, version: u64, digit: char, m: &kiln_manifest::Manifest) -> Event {
    Event::ReleaseCreated {
        app_id: app_id.clone(),
        release_id: ReleaseId::generate(),
        version,
        image_input: format!("127.0.0.1:5000/web:v{version}"),
        image: ImageRef {
            registry: "127.0.0.1:5000".into(),
            repository: "web".into(),
            digest: format!("sha256:{}", digit.to_string().repeat(64)),
        },
        manifest: serde_json::to_value(m).unwrap(),
        manifest_source: MANIFEST.into(),
        secrets_version: 0,
    }
}

async fn register(agent: &Client, name: &str) -> HostId {
    register_in(agent, name, None).await
}

async fn register_in(agent: &Client, name: &str, region: Option<&str>) -> HostId {
    agent
        .register_host(&RegisterHost {
            name: name.into(),
            driver: Driver::Runc,
            cpu: MilliCpu(4000),
            memory: MiB(4096),
            region: region.map(str::to_owned),
        })
        .await
        .unwrap()
        .host_id
}

async fn healthy(agent: &Client, i: &InstanceRow) {
    agent
        .report_instance(
            &i.host_id,
            &i.id,
            &InstanceReport {
                state: InstanceState::Healthy,
                reason: None,
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_silent_host_goes_down_and_a_drained_host_empties_without_downtime() {
    let fx = fixture(Duration::from_millis(1500)).await;
    let agent = fx.client(&[Scope::Host]).await;
    let a = register(&agent, "a").await;
    let b = register(&agent, "b").await;
    agent.heartbeat(&a).await.unwrap();
    agent.heartbeat(&b).await.unwrap();
    fx.app_with_release('1').await;
    let reconciler = Reconciler::new(fx.control.clone());
    reconciler.pass().await.unwrap();
    let live = fx.live().await;
    assert_eq!(live.len(), 1);
    let first = live[0].clone();
    healthy(&agent, &first).await;
    reconciler.pass().await.unwrap();

    // The first instance's host goes silent while the other keeps beating.
    let (silent, beating) = if first.host_id == a { (a, b) } else { (b, a) };
    tokio::time::sleep(Duration::from_millis(1700)).await;
    agent.heartbeat(&beating).await.unwrap();
    reconciler.pass().await.unwrap();
    let hosts = fx.store.hosts().await.unwrap();
    let silent_row = hosts.iter().find(|h| h.id == silent).unwrap();
    assert_eq!(silent_row.state, HostState::Down, "{silent_row:?}");
    assert!(silent_row
        .state_reason
        .as_deref()
        .unwrap()
        .contains("no heartbeat"));
    let lost = fx.store.instance(first.id.clone()).await.unwrap().unwrap();
    assert_eq!(lost.state, InstanceState::Failed);
    assert!(!lost.desired_running);
    assert!(
        lost.reason.as_deref().unwrap().contains("is down"),
        "{lost:?}"
    );
    reconciler.pass().await.unwrap();
    let live = fx.live().await;
    assert_eq!(live.len(), 1, "{live:#?}");
    assert_eq!(live[0].host_id, beating, "replaced on the host that is up");
    let second = live[0].clone();
    healthy(&agent, &second).await;

    // Heartbeats bring the silent host back.
    agent.heartbeat(&silent).await.unwrap();
    let hosts = fx.store.hosts().await.unwrap();
    assert_eq!(
        hosts.iter().find(|h| h.id == silent).unwrap().state,
        HostState::Ready
    );

    // Draining the host of the running instance: a replacement starts on the other host, and
    // the old instance keeps running until the replacement is healthy.
    let admin = fx.client(&[Scope::Admin]).await;
    let drained = admin.drain_host(beating.as_str(), true).await.unwrap();
    assert_eq!(drained.state, HostState::Draining);
    agent.heartbeat(&silent).await.unwrap();
    agent.heartbeat(&beating).await.unwrap();
    reconciler.pass().await.unwrap();
    let live = fx.live().await;
    assert_eq!(live.len(), 2, "old and replacement both live: {live:#?}");
    let third = live.iter().find(|i| i.id != second.id).unwrap().clone();
    assert_eq!(third.host_id, silent);
    reconciler.pass().await.unwrap();
    assert!(
        fx.store
            .instance(second.id.clone())
            .await
            .unwrap()
            .unwrap()
            .desired_running,
        "the old instance stays until its replacement is healthy"
    );
    healthy(&agent, &third).await;
    agent.heartbeat(&silent).await.unwrap();
    agent.heartbeat(&beating).await.unwrap();
    reconciler.pass().await.unwrap();
    let old = fx.store.instance(second.id.clone()).await.unwrap().unwrap();
    assert!(!old.desired_running, "drained instance stopped: {old:?}");
    let listed = admin.list_hosts(None).await.unwrap().items;
    let d = listed.iter().find(|h| h.id == beating).unwrap();
    assert_eq!(d.state, HostState::Draining);
    assert!(
        fx.live().await.iter().all(|i| i.host_id != beating),
        "drained empty"
    );
    // A drained host can be made ready again; a down one only by its heartbeats.
    assert_eq!(
        admin.drain_host("a", false).await.unwrap().state,
        HostState::Ready
    );
}

#[tokio::test]
async fn hosts_are_the_operators_only() {
    let fx = fixture(Duration::from_secs(60)).await;
    let agent = fx.client(&[Scope::Host]).await;
    register(&agent, "a").await;
    let (_, tenant) = fx.tenant().await;
    let err = tenant.list_hosts(None).await.unwrap_err();
    assert_eq!(err.code(), Some("insufficient_scope"), "{err}");
    let err = tenant.drain_host("a", true).await.unwrap_err();
    assert_eq!(err.code(), Some("not_operator"), "{err}");
    let reader = fx.client(&[Scope::Read]).await;
    let err = reader.list_hosts(None).await.unwrap_err();
    assert_eq!(err.code(), Some("insufficient_scope"), "{err}");
    let admin = fx.client(&[Scope::Admin]).await;
    let err = admin.drain_host("nope", true).await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"), "{err}");
}

#[tokio::test]
async fn rollback_restores_an_earlier_release_as_a_new_one() {
    let fx = fixture(Duration::from_secs(60)).await;
    let app_id = fx.app_with_release('1').await;
    let manifest = kiln_manifest::parse("kiln.toml", MANIFEST).unwrap();
    let v1 = fx.store.release(app_id.clone(), 1).await.unwrap().unwrap();
    fx.append(vec![
        Event::ReleaseStateChanged {
            app_id: app_id.clone(),
            release_id: v1.id.clone(),
            state: ReleaseState::Healthy,
            reason: None,
        },
        release(&app_id, 2, '2', &manifest),
    ])
    .await;
    let v2 = fx.store.release(app_id.clone(), 2).await.unwrap().unwrap();
    fx.append(vec![
        Event::ReleaseStateChanged {
            app_id: app_id.clone(),
            release_id: v2.id.clone(),
            state: ReleaseState::Healthy,
            reason: None,
        },
        Event::ReleaseStateChanged {
            app_id: app_id.clone(),
            release_id: v1.id.clone(),
            state: ReleaseState::Superseded,
            reason: Some("replaced by v2".into()),
        },
    ])
    .await;

    let api = fx.client(&[Scope::Deploy, Scope::Read]).await;
    let err = api.rollback("web", Some(2), "k0").await.unwrap_err();
    assert_eq!(err.code(), Some("already_serving"), "{err}");
    let err = api.rollback("web", Some(9), "k1").await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"), "{err}");

    // Default target: the release that served before the current one.
    let v3 = api.rollback("web", None, "k2").await.unwrap();
    assert_eq!(v3.version, 3);
    assert_eq!(v3.image, v1.image, "v1's image, pinned by digest");
    assert_eq!(v3.image_input, "rollback to v1");
    let row = fx.store.release(app_id.clone(), 3).await.unwrap().unwrap();
    assert_eq!(row.manifest, v1.manifest);
    assert_eq!(
        row.state,
        ReleaseState::Deploying,
        "deployed like any release"
    );
    // A retried request with the same key creates nothing new.
    assert_eq!(api.rollback("web", None, "k2").await.unwrap().version, 3);
    assert_eq!(api.releases("web").await.unwrap().len(), 3);
}

#[tokio::test]
async fn scale_makes_a_release_of_the_serving_one() {
    let fx = fixture(Duration::from_secs(60)).await;
    let app_id = fx.app_with_release('1').await;
    let api = fx.client(&[Scope::Deploy, Scope::Read]).await;
    let count = |n| kiln_api::ScaleRequest {
        count: Some(n),
        ..Default::default()
    };
    // Nothing serves yet: nothing to scale.
    let err = api.scale("web", &count(3), "s0").await.unwrap_err();
    assert_eq!(err.code(), Some("no_serving_release"), "{err}");
    let v1 = fx.store.release(app_id.clone(), 1).await.unwrap().unwrap();
    fx.append(vec![Event::ReleaseStateChanged {
        app_id: app_id.clone(),
        release_id: v1.id.clone(),
        state: ReleaseState::Healthy,
        reason: None,
    }])
    .await;

    let v2 = api.scale("web", &count(3), "s1").await.unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.image, v1.image);
    assert_eq!(v2.image_input, "scale of v1: count=3");
    let row = fx.store.release(app_id.clone(), 2).await.unwrap().unwrap();
    let m: kiln_manifest::Manifest = serde_json::from_value(row.manifest).unwrap();
    assert_eq!(m.processes[0].scale.count, 3);
    assert!(row
        .manifest_source
        .starts_with("# kiln scale on v1: count=3\n"));
    let vm = api
        .scale(
            "web",
            &kiln_api::ScaleRequest {
                memory_mib: Some(512),
                cpus: Some(2),
                ..Default::default()
            },
            "s2",
        )
        .await
        .unwrap();
    let row = fx
        .store
        .release(app_id.clone(), vm.version)
        .await
        .unwrap()
        .unwrap();
    let m: kiln_manifest::Manifest = serde_json::from_value(row.manifest).unwrap();
    assert_eq!((m.vm.cpus, m.vm.memory.0), (2, 512));

    for (i, (body, what)) in [
        (kiln_api::ScaleRequest::default(), "nothing to change"),
        (count(5000), "at most 1000"),
        (
            kiln_api::ScaleRequest {
                count: Some(1),
                process: Some("nope".into()),
                ..Default::default()
            },
            "no process group",
        ),
        (
            kiln_api::ScaleRequest {
                memory_mib: Some(1),
                ..Default::default()
            },
            "memory_mib",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let err = api
            .scale("web", &body, &format!("bad{i}"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("invalid_scale"), "{err}");
        assert!(err.to_string().contains(what), "{err}");
    }
}

#[tokio::test]
async fn instances_are_placed_per_region_on_the_hosts_of_that_region() {
    let fx = fixture(Duration::from_secs(60)).await;
    let agent = fx.client(&[Scope::Host]).await;
    let ams = register_in(&agent, "a", Some("ams")).await;
    let syd = register_in(&agent, "s", Some("syd")).await;
    // A region name that is not a DNS label is refused at registration.
    let err = agent
        .register_host(&RegisterHost {
            name: "bad".into(),
            driver: Driver::Runc,
            cpu: MilliCpu(1000),
            memory: MiB(1024),
            region: Some("Not A Region".into()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("invalid_host"), "{err}");
    let hosts = fx.store.hosts().await.unwrap();
    assert_eq!(hosts.iter().find(|h| h.id == ams).unwrap().region, "ams");

    let org = fx.control.first_org().await.unwrap().unwrap();
    let app_id = AppId::generate();
    let manifest = kiln_manifest::parse(
        "kiln.toml",
        "app = \"web\"\nprimary_region = \"ams\"\nregions = [\"ams\", \"syd\"]\n\n[scale]\ncount = 1\nmax = 3\nregions = { ams = 2 }\n",
    )
    .unwrap();
    fx.append(vec![
        Event::AppCreated {
            app_id: app_id.clone(),
            org_id: org,
            name: "web".parse().unwrap(),
        },
        release(&app_id, 1, '1', &manifest),
    ])
    .await;
    let reconciler = Reconciler::new(fx.control.clone());
    reconciler.pass().await.unwrap();
    let on = |live: &[InstanceRow], h: &HostId| live.iter().filter(|i| i.host_id == *h).count();
    let live = fx.live().await;
    assert_eq!((on(&live, &ams), on(&live, &syd)), (2, 1), "{live:#?}");
    for i in &live {
        healthy(&agent, i).await;
    }
    reconciler.pass().await.unwrap();
    assert_eq!(
        fx.store
            .release(app_id.clone(), 1)
            .await
            .unwrap()
            .unwrap()
            .state,
        ReleaseState::Healthy
    );

    // `kiln scale count 3 --region syd`: only syd changes, and the new release keeps ams at 2.
    let api = fx.client(&[Scope::Deploy, Scope::Read]).await;
    let v2 = api
        .scale(
            "web",
            &kiln_api::ScaleRequest {
                count: Some(3),
                region: Some("syd".into()),
                ..Default::default()
            },
            "r1",
        )
        .await
        .unwrap();
    assert_eq!(v2.image_input, "scale of v1: count=3 region=syd");
    let row = fx.store.release(app_id.clone(), 2).await.unwrap().unwrap();
    let m: kiln_manifest::Manifest = serde_json::from_value(row.manifest).unwrap();
    assert_eq!(
        (
            m.processes[0].scale.count_in("ams"),
            m.processes[0].scale.count_in("syd")
        ),
        (2, 3)
    );
    for _ in 0..6 {
        reconciler.pass().await.unwrap();
        for i in fx.live().await {
            if i.state != InstanceState::Healthy {
                healthy(&agent, &i).await;
            }
        }
    }
    let live = fx.live().await;
    assert!(live.iter().all(|i| i.release_id == row.id), "{live:#?}");
    assert_eq!((on(&live, &ams), on(&live, &syd)), (2, 3), "{live:#?}");

    // A region the app does not run in is refused, naming the app's regions.
    let err = api
        .scale(
            "web",
            &kiln_api::ScaleRequest {
                count: Some(1),
                region: Some("fra".into()),
                ..Default::default()
            },
            "r2",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("invalid_scale"), "{err}");
    assert!(err.to_string().contains("ams, syd"), "{err}");

    // The placement explanation for a region without hosts says why nothing fits.
    let admin = fx.client(&[Scope::Admin]).await;
    let e = admin
        .explain_placement("web", None, Some("fra"))
        .await
        .unwrap();
    assert_eq!(e.chosen, None, "{}", e.explanation);
    assert!(e.explanation.contains("region"), "{}", e.explanation);
}

#[tokio::test]
async fn a_destroyed_app_stops_its_instances_and_frees_its_name() {
    let fx = fixture(Duration::from_secs(60)).await;
    let agent = fx.client(&[Scope::Host]).await;
    register(&agent, "a").await;
    let app_id = fx.app_with_release('1').await;
    let reconciler = Reconciler::new(fx.control.clone());
    reconciler.pass().await.unwrap();
    let live = fx.live().await;
    assert_eq!(live.len(), 1);
    healthy(&agent, &live[0]).await;
    reconciler.pass().await.unwrap();
    let edge = fx.client(&[Scope::Edge]).await;
    let routes = edge.routes(0, Duration::ZERO).await.unwrap();
    assert!(
        routes.routes.iter().any(|r| r.app.as_str() == "web"),
        "{routes:?}"
    );

    let admin = fx.client(&[Scope::Admin]).await;
    // Without the name repeated, or with another, nothing happens.
    for confirm in ["", "wbe"] {
        let err = admin.destroy_app("web", confirm).await.unwrap_err();
        assert_eq!(err.code(), Some("confirmation_required"), "{err}");
    }
    // Deploy tokens cannot destroy; another org's admin does not see the app.
    let deployer = fx.client(&[Scope::Deploy]).await;
    let err = deployer.destroy_app("web", "web").await.unwrap_err();
    assert_eq!(err.code(), Some("insufficient_scope"), "{err}");
    let (_, tenant) = fx.tenant().await;
    let err = tenant.destroy_app("web", "web").await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"), "{err}");
    assert_eq!(fx.live().await.len(), 1);

    admin.destroy_app("web", "web").await.unwrap();
    let err = admin.status("web").await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"), "{err}");
    assert!(fx.store.releases(app_id.clone()).await.unwrap().is_empty());
    reconciler.pass().await.unwrap();
    let gone = fx
        .store
        .instance(live[0].id.clone())
        .await
        .unwrap()
        .unwrap();
    assert!(!gone.desired_running, "{gone:?}");
    assert!(fx.live().await.is_empty());
    let routes = edge.routes(0, Duration::ZERO).await.unwrap();
    assert!(
        !routes.routes.iter().any(|r| r.app.as_str() == "web"),
        "{routes:?}"
    );
    // Further passes place nothing for it.
    reconciler.pass().await.unwrap();
    assert!(fx.live().await.is_empty());

    // The name is free: a new app of that name starts empty.
    let again = admin.create_app(&"web".parse().unwrap()).await.unwrap();
    assert_ne!(again.id, app_id);
    assert_eq!(again.latest_version, 0);
    // The destroy is in the org's event list.
    let events = admin.events(None).await.unwrap();
    assert!(
        events.items.iter().any(|e| e.type_ == "app_destroyed"),
        "{events:?}"
    );
}

#[tokio::test]
async fn quotas_refuse_what_an_org_may_not_hold_and_say_which() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("kiln.db"))
        .await
        .unwrap();
    let control = Control::new(
        store.clone(),
        ControlConfig {
            quotas: kiln_control::Quotas {
                apps: 2,
                instances: 3,
                memory_mib: 100_000,
                volumes: 10,
                ipv4_addresses: 1,
            },
            ipv4_pool: Some(kiln_types::net::Ipv4Pool::parse("203.0.113.0/29").unwrap()),
            ..Default::default()
        },
    )
    .unwrap();
    control.bootstrap("operator").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = control.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let fx = Fixture {
        _dir: dir,
        store,
        control,
        url: format!("http://{addr}"),
    };
    // `web` (count 1) counts against the quotas; it serves, so it can be scaled.
    let app_id = fx.app_with_release('1').await;
    let v1 = fx.store.release(app_id.clone(), 1).await.unwrap().unwrap();
    fx.append(vec![Event::ReleaseStateChanged {
        app_id: app_id.clone(),
        release_id: v1.id.clone(),
        state: ReleaseState::Healthy,
        reason: None,
    }])
    .await;
    let api = fx.client(&[Scope::Admin]).await;

    api.create_app(&"second".parse().unwrap()).await.unwrap();
    let err = api.create_app(&"third".parse().unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Some("quota_exceeded"), "{err}");
    assert!(err.to_string().contains("apps quota is 2"), "{err}");

    // Scaling `web` to 3 fits (its own current release is replaced in the count); 4 does not.
    let scale = |n| kiln_api::ScaleRequest {
        count: Some(n),
        ..Default::default()
    };
    let err = api.scale("web", &scale(4), "q1").await.unwrap_err();
    assert_eq!(err.code(), Some("quota_exceeded"), "{err}");
    assert!(err.to_string().contains("instances quota is 3"), "{err}");
    api.scale("web", &scale(3), "q2").await.unwrap();

    api.allocate_ipv4("web", "q3").await.unwrap();
    let err = api.allocate_ipv4("second", "q4").await.unwrap_err();
    assert_eq!(err.code(), Some("quota_exceeded"), "{err}");
    assert!(err.to_string().contains("IPv4"), "{err}");

    // The org sees its limits and usage.
    let own = api.own_quotas().await.unwrap();
    let line = |q: &kiln_api::OrgQuotas, name: &str| {
        q.quotas.iter().find(|l| l.name == name).unwrap().clone()
    };
    assert_eq!(own.org, "operator");
    assert_eq!(
        (line(&own, "instances").used, line(&own, "instances").limit),
        (Some(3), 3)
    );
    assert_eq!(line(&own, "ipv4_addresses").used, Some(1));
    assert!(!line(&own, "apps").overridden);

    // The operator raises one org's limit: what was refused now fits.
    let raised = api
        .set_org_quotas(
            "operator",
            &kiln_types::event::QuotaOverrides {
                instances: Some(4),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(line(&raised, "instances").overridden);
    assert_eq!(line(&raised, "instances").limit, 4);
    api.scale("web", &scale(4), "q5").await.unwrap();

    // A tenant org with a lower apps limit: refused at its own limit, which it can read but not
    // change; a reset gives it the defaults again.
    let (tenant_org, tenant) = fx.tenant().await;
    api.set_org_quotas(
        tenant_org.as_str(),
        &kiln_types::event::QuotaOverrides {
            apps: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    tenant.create_app(&"t1".parse().unwrap()).await.unwrap();
    let err = tenant.create_app(&"t2".parse().unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("apps quota is 1"), "{err}");
    let seen = tenant.own_quotas().await.unwrap();
    assert_eq!(
        (line(&seen, "apps").used, line(&seen, "apps").limit),
        (Some(1), 1)
    );
    assert!(line(&seen, "apps").overridden);
    let err = tenant
        .set_org_quotas("tenant", &Default::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("insufficient_scope"), "{err}");
    let err = tenant.org_quotas("operator").await.unwrap_err();
    assert_eq!(err.code(), Some("insufficient_scope"), "{err}");
    let err = api.org_quotas("nope").await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"), "{err}");
    let err = api
        .set_org_quotas(
            "tenant",
            &kiln_types::event::QuotaOverrides {
                apps: Some(u64::MAX),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("invalid_quota"), "{err}");
    api.set_org_quotas("tenant", &Default::default())
        .await
        .unwrap();
    tenant.create_app(&"t2".parse().unwrap()).await.unwrap();

    // The overrides live in the org's view row: reset clears them, a set keeps them.
    let before = fx
        .store
        .org_by_name("tenant".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(before.quotas, Default::default());
    let op = fx
        .store
        .org_by_name("operator".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(op.quotas.instances, Some(4));
}

#[tokio::test]
async fn placement_is_explained_per_host_to_the_operator_only() {
    let fx = fixture(Duration::from_secs(60)).await;
    let agent = fx.client(&[Scope::Host]).await;
    register(&agent, "a").await;
    register(&agent, "b").await;
    fx.app_with_release('1').await;
    let admin = fx.client(&[Scope::Admin]).await;
    admin.drain_host("a", true).await.unwrap();

    let e = admin.explain_placement("web", None, None).await.unwrap();
    let hosts = fx.store.hosts().await.unwrap();
    let b = hosts.iter().find(|h| h.name == "b").unwrap();
    assert_eq!(e.chosen.as_ref(), Some(&b.id), "{}", e.explanation);
    let a = hosts.iter().find(|h| h.name == "a").unwrap();
    let line_a = e
        .explanation
        .lines()
        .find(|l| l.contains(a.id.as_str()))
        .unwrap_or_else(|| panic!("a line for host a: {}", e.explanation));
    assert!(line_a.contains("draining"), "{line_a}");
    assert!(
        e.explanation
            .lines()
            .any(|l| l.contains(b.id.as_str()) && l.contains("rank 1")),
        "{}",
        e.explanation
    );
    let err = admin
        .explain_placement("web", Some("nope"), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("nothing_to_place"), "{err}");

    // Hosts are the operator's: a tenant's admin token gets nothing.
    let (_, tenant) = fx.tenant().await;
    let err = tenant
        .explain_placement("web", None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("insufficient_scope"), "{err}");
}
