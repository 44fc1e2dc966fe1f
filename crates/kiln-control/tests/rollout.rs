//! Deploy strategies in the control plane, through the real API and reconciler with a simulated
//! agent (it registers and reports instance states over HTTP as `kiln-agent` does), one manual
//! `pass()` at a time: rolling keeps capacity and replaces `max_unavailable` at a time, canary
//! waits for one healthy instance, blue-green routes to the new set only once all of it is healthy
//! and stops the old set after, immediate replaces at once; a failing new instance rolls back; a
//! reconciler dropped in the middle of a deploy and rebuilt on the same SQLite store resumes it
//! with no duplicate or lost instance; placements are shared fairly between orgs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_api::{Client, InstanceReport, RegisterHost};
use kiln_control::{Control, ControlConfig, Reconciler, Scope};
use kiln_scheduler::fair::Limits;
use kiln_store::{Append, InstanceRow, Metadata, NewEvent, ReleaseRow, Store};
use kiln_types::event::{Driver, Event, ReleaseState};
use kiln_types::{AppId, ImageRef, InstanceState, MiB, MilliCpu, OrgId, ReleaseId};

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    control: Arc<Control>,
    url: String,
    agent: Client,
}

async fn serve(control: &Arc<Control>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = control.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

async fn fixture() -> Fixture {
    fixture_with_memory(MiB(65_536)).await
}

async fn fixture_with_memory(memory: MiB) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("kiln.db"))
        .await
        .unwrap();
    let control = Control::new(store.clone(), ControlConfig::default()).unwrap();
    control.bootstrap("operator").await.unwrap();
    let url = serve(&control).await;
    let org = control.first_org().await.unwrap().unwrap();
    let token = control
        .create_token(&org, "agent", &[Scope::Host, Scope::Edge])
        .await
        .unwrap();
    let agent = Client::new(&url, &token).unwrap();
    agent
        .register_host(&RegisterHost {
            name: "a".into(),
            driver: Driver::Runc,
            cpu: MilliCpu(64_000),
            memory,
            region: None,
        })
        .await
        .unwrap();
    Fixture {
        dir,
        store,
        control,
        url,
        agent,
    }
}

fn manifest(app: &str, count: u32, deploy: &str) -> kiln_manifest::Manifest {
    let src = format!(
        "app = \"{app}\"\n\n[scale]\ncount = {count}\n\n[[services]]\nprotocol = \"tls\"\ninternal_port = 8443\n\n[deploy]\n{deploy}\n"
    );
    kiln_manifest::parse("kiln.toml", &src).unwrap()
}

impl Fixture {
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

    async fn app(&self, org: &OrgId, name: &str) -> AppId {
        let app_id = AppId::generate();
        self.append(vec![Event::AppCreated {
            app_id: app_id.clone(),
            org_id: org.clone(),
            name: name.parse().unwrap(),
        }])
        .await;
        app_id
    }

    async fn release(&self, app_id: &AppId, version: u64, m: &kiln_manifest::Manifest) {
        self.append(vec![Event::ReleaseCreated {
            app_id: app_id.clone(),
            release_id: ReleaseId::generate(),
            version,
            image_input: format!("127.0.0.1:5000/web:v{version}"),
            image: ImageRef {
                registry: "127.0.0.1:5000".into(),
                repository: "web".into(),
                digest: format!("sha256:{}", version.to_string().repeat(64)),
            },
            manifest: serde_json::to_value(m).unwrap(),
            manifest_source: String::new(),
            secrets_version: 0,
        }])
        .await;
    }

    async fn rel(&self, app_id: &AppId, version: u64) -> ReleaseRow {
        self.store
            .release(app_id.clone(), version)
            .await
            .unwrap()
            .unwrap()
    }

    /// Instances of `version` that run or are coming (no stop requested).
    async fn live(&self, app_id: &AppId, version: u64) -> Vec<InstanceRow> {
        self.all(app_id, version)
            .await
            .into_iter()
            .filter(|i| i.desired_running && !i.state.is_terminal())
            .collect()
    }

    /// Every instance of `version` ever placed.
    async fn all(&self, app_id: &AppId, version: u64) -> Vec<InstanceRow> {
        self.store
            .all_instances()
            .await
            .unwrap()
            .into_iter()
            .filter(|i| &i.app_id == app_id && i.spec.release_version == version)
            .collect()
    }

    async fn report(&self, i: &InstanceRow, state: InstanceState, reason: Option<&str>) {
        self.agent
            .report_instance(
                &i.host_id,
                &i.id,
                &InstanceReport {
                    state,
                    reason: reason.map(str::to_owned),
                },
            )
            .await
            .unwrap();
    }

    /// Reports every live, not yet healthy instance of `version` healthy.
    async fn all_healthy(&self, app_id: &AppId, version: u64) {
        for i in self.live(app_id, version).await {
            if i.state != InstanceState::Healthy {
                self.report(&i, InstanceState::Healthy, None).await;
            }
        }
    }

    /// An app serving v1 with `count` healthy instances.
    async fn serving_v1(&self, r: &Reconciler, name: &str, count: u32) -> AppId {
        let org = self.control.first_org().await.unwrap().unwrap();
        let app_id = self.app(&org, name).await;
        self.release(&app_id, 1, &manifest(name, count, "")).await;
        r.pass().await.unwrap();
        self.all_healthy(&app_id, 1).await;
        r.pass().await.unwrap();
        assert_eq!(self.rel(&app_id, 1).await.state, ReleaseState::Healthy);
        assert_eq!(self.live(&app_id, 1).await.len(), count as usize);
        app_id
    }

    /// Runs a pass and checks it appended nothing (the previous one did all there was to do).
    async fn idle_pass(&self, r: &Reconciler) {
        let head = self.store.head();
        r.pass().await.unwrap();
        assert_eq!(self.store.head(), head, "an idle pass appends nothing");
    }

    async fn backends(&self) -> Vec<SocketAddr> {
        let table = self.agent.routes(0, Duration::ZERO).await.unwrap();
        table.routes.into_iter().flat_map(|r| r.backends).collect()
    }
}

fn healthy(list: &[InstanceRow]) -> usize {
    list.iter()
        .filter(|i| i.state == InstanceState::Healthy)
        .count()
}

fn backend(i: &InstanceRow) -> SocketAddr {
    SocketAddr::new(i.spec.network.ipv6.into(), 8443)
}

#[tokio::test]
async fn rolling_replaces_max_unavailable_at_a_time_and_never_drops_capacity() {
    let fx = fixture().await;
    let r = Reconciler::new(fx.control.clone());
    let app = fx.serving_v1(&r, "web", 4).await;
    fx.release(&app, 2, &manifest("web", 4, "max_unavailable = 2"))
        .await;
    let mut rounds = 0;
    while fx.rel(&app, 2).await.state == ReleaseState::Deploying {
        r.pass().await.unwrap();
        let (old, new) = (fx.live(&app, 1).await, fx.live(&app, 2).await);
        assert!(old.len() + new.len() <= 6, "at most count + 2 live");
        assert!(
            healthy(&old) + healthy(&new) >= 4,
            "capacity kept: {} old, {} new healthy",
            healthy(&old),
            healthy(&new)
        );
        assert!(
            new.iter()
                .filter(|i| i.state != InstanceState::Healthy)
                .count()
                <= 2,
            "two replaced at a time"
        );
        if rounds == 0 {
            assert_eq!((old.len(), new.len()), (4, 2), "first two new ones start");
            let reason = fx.rel(&app, 2).await.reason.unwrap();
            assert_eq!(
                reason, "rolling: 0 of 4 new instance(s) healthy, 4 old running",
                "progress is the release's reason"
            );
        }
        fx.all_healthy(&app, 2).await;
        rounds += 1;
        assert!(rounds < 10, "the deploy ends");
    }
    assert_eq!(fx.rel(&app, 2).await.state, ReleaseState::Healthy);
    assert_eq!(fx.rel(&app, 1).await.state, ReleaseState::Superseded);
    assert!(fx.live(&app, 1).await.is_empty());
    assert_eq!(fx.live(&app, 2).await.len(), 4);
    assert_eq!(fx.all(&app, 2).await.len(), 4, "no instance placed twice");
}

#[tokio::test]
async fn canary_starts_one_and_the_rest_once_it_is_healthy() {
    let fx = fixture().await;
    let r = Reconciler::new(fx.control.clone());
    let app = fx.serving_v1(&r, "web", 3).await;
    fx.release(&app, 2, &manifest("web", 3, "strategy = \"canary\""))
        .await;
    r.pass().await.unwrap();
    fx.idle_pass(&r).await;
    let canary = fx.live(&app, 2).await;
    assert_eq!(
        canary.len(),
        1,
        "one canary, nothing more until it is healthy"
    );
    assert_eq!(fx.live(&app, 1).await.len(), 3, "old ones untouched");
    fx.report(&canary[0], InstanceState::Starting, None).await;
    r.pass().await.unwrap();
    assert_eq!(fx.live(&app, 2).await.len(), 1, "starting is not healthy");
    fx.all_healthy(&app, 2).await;
    r.pass().await.unwrap();
    assert_eq!(fx.live(&app, 2).await.len(), 3, "then the rest");
    assert_eq!(fx.live(&app, 1).await.len(), 3);
    fx.all_healthy(&app, 2).await;
    r.pass().await.unwrap();
    assert_eq!(fx.rel(&app, 2).await.state, ReleaseState::Healthy);
    assert!(
        fx.live(&app, 1).await.is_empty(),
        "old ones stop at the end"
    );
}

#[tokio::test]
async fn blue_green_routes_to_the_full_new_set_then_stops_the_old_one() {
    let fx = fixture().await;
    let r = Reconciler::new(fx.control.clone());
    let app = fx.serving_v1(&r, "web", 2).await;
    let blue: Vec<SocketAddr> = fx.live(&app, 1).await.iter().map(backend).collect();
    fx.release(&app, 2, &manifest("web", 2, "strategy = \"bluegreen\""))
        .await;
    r.pass().await.unwrap();
    let green = fx.live(&app, 2).await;
    assert_eq!(green.len(), 2, "the full new set starts at once");
    fx.report(&green[0], InstanceState::Healthy, None).await;
    r.pass().await.unwrap();
    fx.idle_pass(&r).await;
    let mut routed = fx.backends().await;
    routed.sort();
    let mut want = blue.clone();
    want.sort();
    assert_eq!(
        routed, want,
        "half the new set healthy: routes stay on the old set"
    );
    assert_eq!(fx.rel(&app, 2).await.state, ReleaseState::Deploying);

    fx.report(&green[1], InstanceState::Healthy, None).await;
    r.pass().await.unwrap();
    assert_eq!(fx.rel(&app, 2).await.state, ReleaseState::Healthy);
    assert_eq!(fx.rel(&app, 1).await.state, ReleaseState::Superseded);
    let mut routed = fx.backends().await;
    routed.sort();
    let mut want: Vec<SocketAddr> = green.iter().map(backend).collect();
    want.sort();
    assert_eq!(routed, want, "routes switched to the new set whole");
    assert_eq!(
        fx.live(&app, 1).await.len(),
        2,
        "the old set stops after the switch, not with it"
    );
    r.pass().await.unwrap();
    assert!(fx.live(&app, 1).await.is_empty(), "then the old set stops");
}

#[tokio::test]
async fn immediate_stops_the_old_and_starts_the_new_at_once() {
    let fx = fixture().await;
    let r = Reconciler::new(fx.control.clone());
    let app = fx.serving_v1(&r, "web", 3).await;
    fx.release(&app, 2, &manifest("web", 3, "strategy = \"immediate\""))
        .await;
    r.pass().await.unwrap();
    assert!(fx.live(&app, 1).await.is_empty(), "old ones stopped");
    assert_eq!(fx.live(&app, 2).await.len(), 3, "new ones started");
    fx.all_healthy(&app, 2).await;
    r.pass().await.unwrap();
    assert_eq!(fx.rel(&app, 2).await.state, ReleaseState::Healthy);
    assert_eq!(fx.rel(&app, 1).await.state, ReleaseState::Superseded);
}

#[tokio::test]
async fn a_failing_new_instance_rolls_back_to_the_old_count() {
    let fx = fixture().await;
    let r = Reconciler::new(fx.control.clone());
    let app = fx.serving_v1(&r, "web", 3).await;
    fx.release(&app, 2, &manifest("web", 3, "")).await;
    r.pass().await.unwrap();
    fx.all_healthy(&app, 2).await;
    r.pass().await.unwrap();
    r.pass().await.unwrap();
    // One old instance made room for the second new one.
    assert_eq!(fx.live(&app, 1).await.len(), 2);
    let new = fx.live(&app, 2).await;
    assert_eq!(new.len(), 2);
    let bad = new
        .iter()
        .find(|i| i.state != InstanceState::Healthy)
        .unwrap();
    fx.report(bad, InstanceState::Failed, Some("exec check exited with 1"))
        .await;
    r.pass().await.unwrap();
    let v2 = fx.rel(&app, 2).await;
    assert_eq!(v2.state, ReleaseState::Failed);
    let reason = v2.reason.unwrap();
    assert!(
        reason.contains("exec check exited with 1") && reason.ends_with("rolled back to v1"),
        "{reason}"
    );
    assert!(fx.live(&app, 2).await.is_empty(), "new instances stop");
    assert_eq!(fx.live(&app, 1).await.len(), 3, "old count restored");
    assert_eq!(fx.rel(&app, 1).await.state, ReleaseState::Healthy);
    r.pass().await.unwrap();
    assert_eq!(fx.live(&app, 1).await.len(), 3, "and nothing more");
}

#[tokio::test]
async fn a_deploy_past_its_health_timeout_rolls_back() {
    let fx = fixture().await;
    let r = Reconciler::new(fx.control.clone());
    let app = fx.serving_v1(&r, "web", 2).await;
    fx.release(
        &app,
        2,
        &manifest("web", 2, "strategy = \"canary\"\nhealth_timeout = \"1ms\""),
    )
    .await;
    // The deadline is counted from the release's creation.
    tokio::time::sleep(Duration::from_millis(5)).await;
    r.pass().await.unwrap();
    let v2 = fx.rel(&app, 2).await;
    assert_eq!(v2.state, ReleaseState::Failed);
    assert!(
        v2.reason
            .as_deref()
            .unwrap()
            .contains("deploy.health_timeout"),
        "{v2:?}"
    );
    assert_eq!(fx.live(&app, 1).await.len(), 2, "v1 keeps serving");
}

#[tokio::test]
async fn a_reconciler_restarted_mid_deploy_resumes_without_duplicates() {
    let fx = fixture().await;
    let r = Reconciler::new(fx.control.clone());
    let app = fx.serving_v1(&r, "web", 4).await;
    fx.release(&app, 2, &manifest("web", 4, "")).await;
    r.pass().await.unwrap();
    fx.all_healthy(&app, 2).await;
    // One pass stops an old instance, the next starts the second new one.
    r.pass().await.unwrap();
    r.pass().await.unwrap();
    assert_eq!(fx.all(&app, 2).await.len(), 2, "mid-deploy");
    drop(r);

    // A new control plane on the same database.
    let store = Store::open_sqlite(&fx.dir.path().join("kiln.db"))
        .await
        .unwrap();
    let control = Control::new(store, ControlConfig::default()).unwrap();
    let url = serve(&control).await;
    assert_ne!(url, fx.url);
    let store = control.store().clone();
    let r = Reconciler::new(control);
    r.pass().await.unwrap();
    assert_eq!(
        fx.all(&app, 2).await.len(),
        2,
        "the unhealthy new instance is awaited, not placed again"
    );
    let head = store.head();
    r.pass().await.unwrap();
    assert_eq!(
        store.head(),
        head,
        "a pass with nothing new appends nothing"
    );
    let mut rounds = 0;
    while fx.rel(&app, 2).await.state == ReleaseState::Deploying {
        fx.all_healthy(&app, 2).await;
        r.pass().await.unwrap();
        rounds += 1;
        assert!(rounds < 10, "the deploy ends");
    }
    assert_eq!(fx.rel(&app, 2).await.state, ReleaseState::Healthy);
    assert_eq!(fx.all(&app, 2).await.len(), 4, "no duplicate");
    assert_eq!(fx.live(&app, 2).await.len(), 4, "none lost");
    assert!(fx.live(&app, 1).await.is_empty());
}

#[tokio::test]
async fn one_orgs_huge_deploy_does_not_starve_another() {
    let fx = fixture().await;
    let r = Reconciler::with_limits(
        fx.control.clone(),
        Limits {
            per_pass: 4,
            per_org: 100,
        },
    );
    let big_org = fx.control.first_org().await.unwrap().unwrap();
    let small_org = OrgId::generate();
    fx.append(vec![Event::OrgCreated {
        org_id: small_org.clone(),
        name: "small".into(),
    }])
    .await;
    let big = fx.app(&big_org, "big").await;
    let small = fx.app(&small_org, "small").await;
    fx.release(&big, 1, &manifest("big", 40, "")).await;
    fx.release(&small, 1, &manifest("small", 2, "")).await;
    r.pass().await.unwrap();
    assert_eq!(
        fx.all(&small, 1).await.len(),
        2,
        "the small org gets its share"
    );
    assert_eq!(fx.all(&big, 1).await.len(), 2, "four placements per pass");
    r.pass().await.unwrap();
    assert_eq!(
        fx.all(&big, 1).await.len(),
        6,
        "the rest follows pass by pass"
    );
}

#[tokio::test]
async fn immediate_on_a_full_host_waits_for_the_old_instances_to_stop() {
    // Room for two instances (256 MiB each plus overhead), not three.
    let fx = fixture_with_memory(MiB(600)).await;
    let r = Reconciler::new(fx.control.clone());
    let app = fx.serving_v1(&r, "web", 2).await;
    fx.release(&app, 2, &manifest("web", 2, "strategy = \"immediate\""))
        .await;
    r.pass().await.unwrap();
    assert_eq!(
        fx.rel(&app, 2).await.state,
        ReleaseState::Deploying,
        "not failed"
    );
    assert!(fx.live(&app, 1).await.is_empty(), "old ones stopping");
    assert!(fx.live(&app, 2).await.is_empty(), "no room yet");
    for i in fx.all(&app, 1).await {
        fx.report(&i, InstanceState::Stopped, None).await;
    }
    r.pass().await.unwrap();
    assert_eq!(
        fx.live(&app, 2).await.len(),
        2,
        "placed once the room is free"
    );
    fx.all_healthy(&app, 2).await;
    r.pass().await.unwrap();
    assert_eq!(fx.rel(&app, 2).await.state, ReleaseState::Healthy);
}

#[tokio::test]
async fn during_a_canary_the_serving_release_still_replaces_its_failed_instances() {
    let fx = fixture().await;
    let r = Reconciler::new(fx.control.clone());
    let app = fx.serving_v1(&r, "web", 2).await;
    fx.release(&app, 2, &manifest("web", 2, "strategy = \"canary\""))
        .await;
    r.pass().await.unwrap();
    let old = fx.live(&app, 1).await;
    fx.report(&old[0], InstanceState::Failed, Some("exited with code 1"))
        .await;
    r.pass().await.unwrap();
    let now = fx.live(&app, 1).await;
    assert_eq!(now.len(), 2, "replaced: {now:#?}");
    assert!(now.iter().all(|i| i.id != old[0].id));
    assert_eq!(fx.rel(&app, 2).await.state, ReleaseState::Deploying);
    assert_eq!(fx.live(&app, 2).await.len(), 1, "the canary goes on");
}
