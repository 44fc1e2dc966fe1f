//! The store's conformance suite: every test in `conformance!` runs against both backends, SQLite
//! (a temp file) and Postgres (a throwaway cluster started by the test itself). Tests that only
//! make sense with several processes on one database (Postgres) come after.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kiln_store::testing::RawRow;
use kiln_store::{
    Append, CommitHook, ExpectedVersion, Idempotency, Location, Metadata, NewEvent, Options,
    RecordedEvent, Store, StoreError,
};
use kiln_testkit::postgres::{PostgresCluster, StopMode};
use kiln_types::event::{Driver, Event, ReleaseState, Role};
use kiln_types::secrets::SealedSecret;
use kiln_types::{
    AppId, HostId, ImageRef, InstanceId, InstanceState, MiB, MilliCpu, OrgId, ReleaseId, TokenId,
    UserId, WorkloadSpec,
};

/// One backend under test: where its store lives, and a way to run raw SQL on it.
struct Env {
    location: Location,
    pg: Option<Arc<PostgresCluster>>,
    db: String,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn sqlite() -> Env {
        let dir = tempfile::tempdir().unwrap();
        Env {
            location: Location::Sqlite(dir.path().join("kiln.db")),
            pg: None,
            db: String::new(),
            _dir: dir,
        }
    }

    async fn postgres() -> Env {
        let pg = tokio::task::spawn_blocking(PostgresCluster::start)
            .await
            .unwrap()
            .unwrap();
        let url = pg.create_database("kiln").unwrap();
        Env {
            location: Location::Postgres(url),
            pg: Some(Arc::new(pg)),
            db: "kiln".into(),
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    fn is_postgres(&self) -> bool {
        self.pg.is_some()
    }

    async fn open(&self) -> Store {
        self.open_with(Options::default()).await
    }

    async fn open_with(&self, options: Options) -> Store {
        Store::open(&self.location, options).await.unwrap()
    }

    /// Runs SQL outside the store (as an operator, an old build or a corruption would).
    fn exec(&self, sql: &str) {
        match &self.location {
            Location::Sqlite(path) => rusqlite::Connection::open(path)
                .unwrap()
                .execute_batch(sql)
                .unwrap(),
            Location::Postgres(_) => {
                self.pg.as_ref().unwrap().psql(&self.db, sql).unwrap();
            }
        }
    }

    async fn init_at(&self, view_version: u32) {
        match &self.location {
            Location::Sqlite(path) => {
                kiln_store::testing::sqlite_init_at(path, view_version).unwrap()
            }
            Location::Postgres(url) => kiln_store::testing::postgres_init_at(url, view_version)
                .await
                .unwrap(),
        }
    }

    async fn insert_raw(&self, rows: &[RawRow]) {
        match &self.location {
            Location::Sqlite(path) => kiln_store::testing::sqlite_insert_raw(path, rows).unwrap(),
            Location::Postgres(url) => kiln_store::testing::postgres_insert_raw(url, rows)
                .await
                .unwrap(),
        }
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Env::sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Env::postgres().await).await
                }
            )*
        }
    };
}

conformance!(
    append_updates_views_and_head,
    expected_version_conflict_is_typed_and_writes_nothing,
    idempotency_key_replays_same_request_and_rejects_different_one,
    reopen_keeps_log_and_views,
    concurrent_appends_keep_their_own_outcomes,
    watcher_never_misses_a_late_commit,
    watcher_resumes_from_its_checkpoint_after_restart,
    slow_watcher_reads_bounded_pages,
    rebuild_matches_live_views_and_replace_repairs_them,
    view_migration_replays_a_populated_store_and_upcasts_old_events,
    unknown_and_malformed_events_are_typed_errors,
    backup_restores_a_store_that_serves_the_same_views,
    identity_views_follow_users_memberships_and_token_lifecycle,
    secrets_views_answer_any_version_and_follow_rewraps,
    domains_view_keeps_one_verified_claim_per_hostname,
    idempotency_keys_expire_after_the_retention_and_are_pruned,
    idempotency_log_migration_keeps_the_keys_of_a_populated_store,
    batched_view_changes_equal_one_by_one,
);

fn sealed(name: &str, blob: &str) -> SealedSecret {
    SealedSecret {
        name: name.parse().unwrap(),
        key_id: "dk_1".into(),
        ciphertext: blob.into(),
        digest: format!("sha256:{blob}"),
    }
}

fn secrets_set(app: &AppId, version: u64, set: &[(&str, &str)], staged: bool) -> Event {
    Event::SecretsSet {
        app_id: app.clone(),
        env: "production".into(),
        version,
        secrets: set.iter().map(|(n, b)| sealed(n, b)).collect(),
        staged,
    }
}

fn domain(app: &AppId, hostname: &str, token: Option<&str>) -> Event {
    Event::DomainAdded {
        app_id: app.clone(),
        env: "production".into(),
        hostname: hostname.parse().unwrap(),
        token: token.unwrap_or("t").into(),
    }
}

/// Claims on a hostname: any number while unverified, one verified (the view's partial unique
/// index refuses a second verification, whole); removal frees the name, and replay agrees.
async fn domains_view_keeps_one_verified_claim_per_hostname(env: Env) {
    let s = env.open().await;
    let org = OrgId::generate();
    let (a, a_ev) = app_created(&org, "alpha");
    let (b, b_ev) = app_created(&org, "bravo");
    let host = "shop.example.com";
    let verified = |app: &AppId| Event::DomainVerified {
        app_id: app.clone(),
        env: "production".into(),
        hostname: host.parse().unwrap(),
    };
    s.append(append(vec![
        NewEvent::any(org_created("acme")),
        NewEvent::any(a_ev),
        NewEvent::any(b_ev),
        NewEvent::any(domain(&a, host, Some("ta"))),
        NewEvent::any(domain(&b, host, Some("tb"))),
        NewEvent::any(domain(&a, "api.example.com", None)),
    ]))
    .await
    .unwrap();
    // The same app cannot claim a hostname twice.
    assert!(matches!(
        s.append(append(vec![NewEvent::any(domain(&a, host, None))]))
            .await,
        Err(StoreError::ApplyView { .. })
    ));
    assert_eq!(s.domains_by_hostname(host).await.unwrap().len(), 2);
    s.append(append(vec![NewEvent::any(verified(&a))]))
        .await
        .unwrap();
    // B's verification of the hostname A holds fails whole.
    let head = s.head();
    assert!(matches!(
        s.append(append(vec![NewEvent::any(verified(&b))])).await,
        Err(StoreError::ApplyView { .. })
    ));
    assert_eq!(s.head(), head);
    let v = s.verified_domains().await.unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!((&v[0].app_id, v[0].token.as_str()), (&a, "ta"));
    assert!(v[0].verified_at.is_some());
    // A second verification of the same claim keeps the first time.
    let first = v[0].verified_at;
    tokio::time::sleep(Duration::from_millis(5)).await;
    s.append(append(vec![NewEvent::any(verified(&a))]))
        .await
        .unwrap();
    assert_eq!(s.verified_domains().await.unwrap()[0].verified_at, first);
    let mine = s.domains_of_app(a.clone()).await.unwrap();
    let names: Vec<&str> = mine.iter().map(|d| d.hostname.as_str()).collect();
    assert_eq!(names, ["api.example.com", host]);
    assert_eq!(s.pending_domains().await.unwrap().len(), 2);
    // Removed, the hostname is free for B.
    s.append(append(vec![NewEvent::any(Event::DomainRemoved {
        app_id: a.clone(),
        env: "production".into(),
        hostname: host.parse().unwrap(),
    })]))
    .await
    .unwrap();
    s.append(append(vec![NewEvent::any(verified(&b))]))
        .await
        .unwrap();
    let v = s.verified_domains().await.unwrap();
    assert_eq!((v.len(), &v[0].app_id), (1, &b));
    assert!(s.rebuild_views(false).await.unwrap().is_equal());
}

/// Values are valid over [set version, replacing version): any version, current or pinned by an
/// old release, reads back exactly what it held; the env row tracks current and live versions.
async fn secrets_views_answer_any_version_and_follow_rewraps(env: Env) {
    let s = env.open().await;
    let (org, app) = populate(&s).await;
    s.append(append(vec![
        NewEvent::any(Event::DataKeyCreated {
            org_id: org.clone(),
            key_id: "dk_1".into(),
            master_key_id: "mk_old".into(),
            wrapped: "w1".into(),
        }),
        NewEvent::any(secrets_set(&app, 1, &[("A", "a1"), ("B", "b1")], false)),
    ]))
    .await
    .unwrap();
    s.append(append(vec![NewEvent::any(secrets_set(
        &app,
        2,
        &[("A", "a2")],
        true,
    ))]))
    .await
    .unwrap();
    s.append(append(vec![NewEvent::any(Event::SecretsUnset {
        app_id: app.clone(),
        env: "production".into(),
        version: 3,
        names: vec!["B".parse().unwrap()],
        staged: true,
    })]))
    .await
    .unwrap();
    let at = |v: u64| {
        let s = s.clone();
        let app = app.clone();
        async move {
            s.secrets_at(app, "production".into(), v)
                .await
                .unwrap()
                .into_iter()
                .map(|e| (e.name.to_string(), e.version, e.ciphertext))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(at(0).await, vec![]);
    assert_eq!(
        at(1).await,
        vec![("A".into(), 1, "a1".into()), ("B".into(), 1, "b1".into())]
    );
    assert_eq!(
        at(2).await,
        vec![("A".into(), 2, "a2".into()), ("B".into(), 1, "b1".into())]
    );
    assert_eq!(at(3).await, vec![("A".into(), 2, "a2".into())]);
    let env_row = s
        .secret_env(app.clone(), "production".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (env_row.version, env_row.staged, env_row.live_version),
        (3, true, 1)
    );
    assert!(s
        .secret_env(app.clone(), "staging".into())
        .await
        .unwrap()
        .is_none());
    s.append(append(vec![NewEvent::any(Event::DataKeyRewrapped {
        org_id: org.clone(),
        key_id: "dk_1".into(),
        master_key_id: "mk_new".into(),
        wrapped: "w2".into(),
    })]))
    .await
    .unwrap();
    let keys = s.data_keys_of_org(org.clone()).await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(
        (keys[0].master_key_id.as_str(), keys[0].wrapped.as_str()),
        ("mk_new", "w2")
    );
    assert_eq!(s.all_data_keys().await.unwrap(), keys);
    assert!(s
        .data_keys_of_org(OrgId::generate())
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.app(app.clone())
            .await
            .unwrap()
            .map(|a| a.name.to_string()),
        Some("demo".into())
    );
    assert!(s.app(AppId::generate()).await.unwrap().is_none());
    // Replaying the log gives the same secrets views.
    assert!(s.rebuild_views(false).await.unwrap().is_equal());
}

fn meta(actor: &str) -> Metadata {
    Metadata {
        actor: actor.into(),
        request_id: Some("req_1".into()),
        causation_id: Some(7),
        correlation_id: Some("corr".into()),
    }
}

fn append(events: Vec<NewEvent>) -> Append {
    Append {
        events,
        metadata: meta("test"),
        idempotency: None,
    }
}

fn keyed(events: Vec<NewEvent>, key: &str, hash: &str) -> Append {
    Append {
        events,
        metadata: meta("test"),
        idempotency: Some(Idempotency {
            scope: "scope".into(),
            key: key.into(),
            request_hash: hash.into(),
        }),
    }
}

fn org_created(name: &str) -> Event {
    Event::OrgCreated {
        org_id: OrgId::generate(),
        name: name.into(),
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

fn host_registered(host_id: &HostId, index: u16) -> Event {
    Event::HostRegistered {
        host_id: host_id.clone(),
        name: format!("host-{index}"),
        index,
        driver: Driver::Runc,
        cpu: MilliCpu(2000),
        memory: MiB(4096),
        region: "local".into(),
    }
}

fn spec(app: &AppId, release: &ReleaseId) -> WorkloadSpec {
    let mut v: serde_json::Value = serde_json::from_str(include_str!(
        "../../kiln-types/tests/golden/workload-spec-1.0.json"
    ))
    .unwrap();
    v["instance_id"] = InstanceId::generate().to_string().into();
    v["app_id"] = app.to_string().into();
    v["release_id"] = release.to_string().into();
    serde_json::from_value(v).unwrap()
}

/// A small but complete history touching every view: an org with a token, an app with a
/// release, a host registered twice, instances placed, reported and stopped.
async fn populate(s: &Store) -> (OrgId, AppId) {
    let org = OrgId::generate();
    s.append(append(vec![
        NewEvent {
            event: Event::OrgCreated {
                org_id: org.clone(),
                name: "acme".into(),
            },
            expected: ExpectedVersion::NoStream,
        },
        NewEvent::any(Event::TokenCreated {
            token_id: "tok_aaaaaaaaaaaaaaaaaaaa".parse().unwrap(),
            org_id: org.clone(),
            name: "admin".into(),
            hash: "ab".repeat(32),
            scopes: vec!["admin".into()],
            expires_at: None,
            user_id: None,
            app_id: None,
        }),
    ]))
    .await
    .unwrap();
    // A user, member of the org, with a login token that was used and then revoked.
    let user: UserId = "usr_aaaaaaaaaaaaaaaaaaaa".parse().unwrap();
    let login: TokenId = "tok_cccccccccccccccccccc".parse().unwrap();
    s.append(append(vec![
        NewEvent::any(Event::UserCreated {
            user_id: user.clone(),
            email: "ada@example.com".into(),
            password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA".into(),
        }),
        NewEvent::any(Event::MembershipGranted {
            org_id: org.clone(),
            user_id: user.clone(),
            role: Role::Member,
        }),
        NewEvent::any(Event::TokenCreated {
            token_id: login.clone(),
            org_id: org.clone(),
            name: "login".into(),
            hash: "ef".repeat(32),
            scopes: vec!["read".into(), "deploy".into()],
            expires_at: Some(4_000_000_000_000),
            user_id: Some(user.clone()),
            app_id: None,
        }),
        NewEvent::any(Event::TokenUsed {
            token_id: login.clone(),
            org_id: org.clone(),
            at: 1_000,
        }),
        NewEvent::any(Event::TokenRevoked {
            token_id: login.clone(),
            org_id: org.clone(),
        }),
    ]))
    .await
    .unwrap();
    let (app, ev) = app_created(&org, "demo");
    s.append(append(vec![NewEvent::any(ev)])).await.unwrap();
    let release = ReleaseId::generate();
    s.append(append(vec![NewEvent::any(Event::ReleaseCreated {
        app_id: app.clone(),
        release_id: release.clone(),
        version: 1,
        image_input: "demo:latest".into(),
        image: ImageRef {
            registry: "127.0.0.1:5000".into(),
            repository: "demo".into(),
            digest: format!("sha256:{}", "0".repeat(64)),
        },
        manifest: serde_json::json!({"app": "demo"}),
        manifest_source: "app = \"demo\"\n".into(),
        secrets_version: 0,
    })]))
    .await
    .unwrap();
    let host = HostId::generate();
    s.append(append(vec![NewEvent::any(host_registered(&host, 1))]))
        .await
        .unwrap();
    for i in 0..3 {
        let spec = spec(&app, &release);
        let id = spec.instance_id.clone();
        s.append(append(vec![NewEvent::any(Event::InstancePlaced {
            host_id: host.clone(),
            spec,
        })]))
        .await
        .unwrap();
        s.append(append(vec![NewEvent::any(Event::InstanceStateChanged {
            instance_id: id.clone(),
            app_id: app.clone(),
            state: InstanceState::Healthy,
            reason: None,
        })]))
        .await
        .unwrap();
        if i == 0 {
            s.append(append(vec![NewEvent::any(Event::InstanceStopRequested {
                instance_id: id,
                app_id: app.clone(),
                reason: "test".into(),
            })]))
            .await
            .unwrap();
        }
    }
    s.append(append(vec![NewEvent::any(Event::ReleaseStateChanged {
        app_id: app.clone(),
        release_id: release,
        state: ReleaseState::Healthy,
        reason: None,
    })]))
    .await
    .unwrap();
    s.append(append(vec![NewEvent::any(host_registered(&host, 1))]))
        .await
        .unwrap();
    (org, app)
}

/// Reads the whole log.
async fn all_events(s: &Store) -> Vec<RecordedEvent> {
    let mut out = Vec::new();
    loop {
        let after = out.last().map_or(0, |e: &RecordedEvent| e.seq);
        let page = s.read_after(after, 1000).await.unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

fn assert_contiguous(events: &[RecordedEvent]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "sequence has a gap or is out of order");
    }
}

/// Users, memberships and the token lifecycle (created, used, revoked) as the auth code reads them.
async fn identity_views_follow_users_memberships_and_token_lifecycle(env: Env) {
    let s = env.open().await;
    let (org, _) = populate(&s).await;
    let user = s
        .user_by_email("ada@example.com".into())
        .await
        .unwrap()
        .unwrap();
    assert!(user.password_hash.starts_with("$argon2id$"));
    assert_eq!(s.user(user.id.clone()).await.unwrap(), Some(user.clone()));
    assert!(s
        .user_by_email("bob@example.com".into())
        .await
        .unwrap()
        .is_none());
    let m = s.memberships_of_user(user.id.clone()).await.unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].org_name.as_str(), m[0].role), ("acme", Role::Member));
    // A second grant changes the role in place.
    s.append(append(vec![NewEvent::any(Event::MembershipGranted {
        org_id: org.clone(),
        user_id: user.id.clone(),
        role: Role::Viewer,
    })]))
    .await
    .unwrap();
    let m = s.memberships_of_user(user.id.clone()).await.unwrap();
    assert_eq!((m.len(), m[0].role), (1, Role::Viewer));
    // Emails are unique: the view refuses a second user with the same one.
    assert!(s
        .append(append(vec![NewEvent::any(Event::UserCreated {
            user_id: UserId::generate(),
            email: "ada@example.com".into(),
            password_hash: "x".into(),
        })]))
        .await
        .is_err());

    let tokens = s.tokens_of_org(org.clone()).await.unwrap();
    assert_eq!(tokens.len(), 2);
    let login = tokens.iter().find(|t| t.name == "login").unwrap();
    assert_eq!(login.user_id.as_ref(), Some(&user.id));
    assert_eq!(login.last_used_at, Some(1_000));
    assert!(login.revoked_at.is_some());
    let by_hash = s.token_by_hash("ef".repeat(32)).await.unwrap().unwrap();
    assert_eq!(&by_hash, login);
    assert_eq!(
        s.token_by_id(login.id.clone()).await.unwrap().as_ref(),
        Some(login)
    );
    // Last use only moves forward (an old `token_used` recorded late changes nothing).
    s.append(append(vec![NewEvent::any(Event::TokenUsed {
        token_id: login.id.clone(),
        org_id: org.clone(),
        at: 500,
    })]))
    .await
    .unwrap();
    let again = s.token_by_id(login.id.clone()).await.unwrap().unwrap();
    assert_eq!(again.last_used_at, Some(1_000));
    // A token id of another org changes nothing there.
    s.append(append(vec![NewEvent::any(Event::TokenRevoked {
        token_id: "tok_aaaaaaaaaaaaaaaaaaaa".parse().unwrap(),
        org_id: OrgId::generate(),
    })]))
    .await
    .unwrap();
    let admin = s
        .token_by_id("tok_aaaaaaaaaaaaaaaaaaaa".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(admin.revoked_at, None);
    assert_eq!(s.org_by_name("acme".into()).await.unwrap().unwrap().id, org);
    assert_eq!(s.org(org.clone()).await.unwrap().unwrap().name, "acme");
    assert!(s.rebuild_views(false).await.unwrap().is_equal());
}

async fn append_updates_views_and_head(env: Env) {
    let s = env.open().await;
    let org = OrgId::generate();
    let mut head = s.subscribe();
    let (app_id, ev) = app_created(&org, "demo");
    let out = s
        .append(Append {
            events: vec![NewEvent {
                event: ev.clone(),
                expected: ExpectedVersion::NoStream,
            }],
            metadata: meta("token:tok_1"),
            idempotency: None,
        })
        .await
        .unwrap();
    assert!(!out.replayed);
    assert_eq!((out.events[0].seq, out.events[0].stream_version), (1, 1));
    head.changed().await.unwrap();
    assert_eq!(*head.borrow(), 1);
    // Read-your-writes: the view has the app as soon as the append returned.
    let app = s.app_by_name("demo".into()).await.unwrap().unwrap();
    assert_eq!(app.id, app_id);
    assert_eq!(s.app(app_id.clone()).await.unwrap(), Some(app.clone()));
    assert_eq!(s.apps(Some(org)).await.unwrap().len(), 1);
    assert_eq!(s.apps(Some(OrgId::generate())).await.unwrap().len(), 0);
    // The envelope round-trips: stream, version, type, schema version, metadata, time.
    let stored = s.read_after(0, 10).await.unwrap();
    assert_eq!(stored.len(), 1);
    let e = &stored[0];
    assert_eq!(e.event, ev);
    assert_eq!(e.stream, ev.stream());
    assert_eq!(e.metadata, meta("token:tok_1"));
    assert_eq!(e.schema_version, 1);
    assert!(e.recorded_at > 1_700_000_000_000);
    assert_eq!(s.stream_version(ev.stream()).await.unwrap(), 1);
}

async fn expected_version_conflict_is_typed_and_writes_nothing(env: Env) {
    let s = env.open().await;
    let org = OrgId::generate();
    let (_, ev) = app_created(&org, "demo");
    s.append(append(vec![NewEvent::any(ev.clone())]))
        .await
        .unwrap();
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(0),
        ExpectedVersion::Exact(2),
    ] {
        let err = s
            .append(append(vec![NewEvent {
                event: ev.clone(),
                expected,
            }]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::VersionConflict { actual: 1, .. }),
            "{err:?}"
        );
    }
    // A multi-event append whose second event conflicts writes neither.
    let other = org_created("other");
    let err = s
        .append(append(vec![
            NewEvent::any(other.clone()),
            NewEvent {
                event: ev.clone(),
                expected: ExpectedVersion::Exact(5),
            },
        ]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }), "{err:?}");
    assert_eq!(s.head(), 1);
    assert_eq!(s.read_after(0, 10).await.unwrap().len(), 1);
    assert_eq!(s.orgs_count().await.unwrap(), 0);
    // Exact(current) succeeds.
    let ok = s
        .append(append(vec![NewEvent {
            event: Event::ReleaseStateChanged {
                app_id: match &ev {
                    Event::AppCreated { app_id, .. } => app_id.clone(),
                    _ => unreachable!(),
                },
                release_id: ReleaseId::generate(),
                state: ReleaseState::Failed,
                reason: None,
            },
            expected: ExpectedVersion::Exact(1),
        }]))
        .await
        .unwrap();
    assert_eq!((ok.events[0].seq, ok.events[0].stream_version), (2, 2));
}

async fn idempotency_key_replays_same_request_and_rejects_different_one(env: Env) {
    let s = env.open().await;
    let a = org_created("a");
    let b = org_created("b");
    let first = s
        .append(keyed(
            vec![NewEvent::any(a.clone()), NewEvent::any(b.clone())],
            "k1",
            "h",
        ))
        .await
        .unwrap();
    assert!(!first.replayed);
    let again = s
        .append(keyed(
            vec![NewEvent::any(a.clone()), NewEvent::any(b)],
            "k1",
            "h",
        ))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.events, first.events);
    assert_eq!(s.head(), 2);
    let err = s
        .append(keyed(vec![NewEvent::any(a.clone())], "k1", "other"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::IdempotencyConflict { key } if key == "k1"),
        "{err:?}"
    );
    // Keys are per scope: the same key in another scope is a new request.
    let mut other_scope = keyed(vec![NewEvent::any(org_created("c"))], "k1", "other");
    other_scope.idempotency.as_mut().unwrap().scope = "elsewhere".into();
    assert!(!s.append(other_scope).await.unwrap().replayed);
    // A failed append does not burn its key.
    let token = Event::TokenCreated {
        token_id: "tok_bbbbbbbbbbbbbbbbbbbb".parse().unwrap(),
        org_id: match &a {
            Event::OrgCreated { org_id, .. } => org_id.clone(),
            _ => unreachable!(),
        },
        name: "t".into(),
        hash: "cd".repeat(32),
        scopes: vec![],
        expires_at: None,
        user_id: None,
        app_id: None,
    };
    let err = s
        .append(keyed(
            vec![NewEvent {
                event: token.clone(),
                expected: ExpectedVersion::NoStream,
            }],
            "k2",
            "h",
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }));
    let ok = s
        .append(keyed(vec![NewEvent::any(token)], "k2", "h"))
        .await
        .unwrap();
    assert!(!ok.replayed);
    assert_eq!(all_events(&s).await.len(), 4);
}

/// With a retention of zero every key is expired as soon as it is recorded: the same key is a new
/// request again (same or different request hash), and pruning deletes it. With the default
/// retention nothing is pruned and keys replay.
async fn idempotency_keys_expire_after_the_retention_and_are_pruned(env: Env) {
    let s = env
        .open_with(Options {
            idempotency_retention: Duration::ZERO,
            ..Default::default()
        })
        .await;
    let first = s
        .append(keyed(vec![NewEvent::any(org_created("a"))], "k", "h"))
        .await
        .unwrap();
    let again = s
        .append(keyed(vec![NewEvent::any(org_created("a"))], "k", "h"))
        .await
        .unwrap();
    assert!(!again.replayed, "an expired key is a new request");
    assert_ne!(again.events[0].seq, first.events[0].seq);
    let other = s
        .append(keyed(vec![NewEvent::any(org_created("b"))], "k", "other"))
        .await
        .unwrap();
    assert!(!other.replayed, "an expired key never conflicts");
    // One row per key (an expired one is replaced), and pruning deletes it.
    assert_eq!(s.prune_idempotency().await.unwrap(), 1);
    assert_eq!(s.prune_idempotency().await.unwrap(), 0);
    let after = s
        .append(keyed(vec![NewEvent::any(org_created("c"))], "k", "h"))
        .await
        .unwrap();
    assert!(!after.replayed);
    assert_eq!(s.head(), 4);
    drop(s);

    // The default retention (a day): recorded keys stay and replay; nothing is pruned.
    let s = env.open().await;
    assert_eq!(
        Options::default().idempotency_retention,
        Duration::from_secs(86_400)
    );
    let kept = s
        .append(keyed(vec![NewEvent::any(org_created("d"))], "k2", "h"))
        .await
        .unwrap();
    // "k" was recorded just now, by the last append above, so it is live again.
    assert!(
        s.append(keyed(vec![NewEvent::any(org_created("x"))], "k", "h"))
            .await
            .unwrap()
            .replayed
    );
    assert_eq!(s.prune_idempotency().await.unwrap(), 0);
    let replay = s
        .append(keyed(vec![NewEvent::any(org_created("d"))], "k2", "h"))
        .await
        .unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.events, kept.events);
    assert!(matches!(
        s.append(keyed(vec![NewEvent::any(org_created("d"))], "k2", "z"))
            .await
            .unwrap_err(),
        StoreError::IdempotencyConflict { .. }
    ));
    assert_contiguous(&all_events(&s).await);
}

/// Log schema v2 (an index for expiring keys) applied to a store populated at v1: keys recorded
/// before keep replaying, and the views are untouched.
async fn idempotency_log_migration_keeps_the_keys_of_a_populated_store(env: Env) {
    let (first, views) = {
        let s = env.open().await;
        populate(&s).await;
        let first = s
            .append(keyed(vec![NewEvent::any(org_created("a"))], "old", "h"))
            .await
            .unwrap();
        (first, s.view_checksums().await.unwrap())
    };
    // What a build at log schema v1 left: no index on the keys' age.
    env.exec(
        "DROP INDEX idempotency_created; UPDATE kiln_schema SET version = 1 WHERE track = 'log'",
    );
    let s = env.open().await;
    assert_eq!(s.view_checksums().await.unwrap(), views);
    let again = s
        .append(keyed(vec![NewEvent::any(org_created("a"))], "old", "h"))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.events, first.events);
    assert_eq!(s.prune_idempotency().await.unwrap(), 0);
    drop(s);
    // Migrated once: the index exists again (dropping it succeeds).
    env.exec("DROP INDEX idempotency_created");
}

/// Appends whose view changes hit the same rows several times in one batch (Postgres sends runs
/// of them as one set-based statement, folding or splitting them per row): the views end as if
/// every change had run alone, which a rebuild (one statement per change) confirms.
async fn batched_view_changes_equal_one_by_one(env: Env) {
    let s = env.open().await;
    let (org, app) = populate(&s).await;
    let release = s.releases(app.clone()).await.unwrap()[0].id.clone();
    let host = HostId::generate();
    let specs: Vec<WorkloadSpec> = (0..6).map(|_| spec(&app, &release)).collect();
    let ids: Vec<InstanceId> = specs.iter().map(|s| s.instance_id.clone()).collect();
    // Six placements in one append.
    s.append(append(
        specs
            .iter()
            .map(|spec| NewEvent {
                event: Event::InstancePlaced {
                    host_id: host.clone(),
                    spec: spec.clone(),
                },
                expected: ExpectedVersion::NoStream,
            })
            .collect(),
    ))
    .await
    .unwrap();
    let state = |i: usize, state: InstanceState, reason: Option<&str>| {
        NewEvent::any(Event::InstanceStateChanged {
            instance_id: ids[i].clone(),
            app_id: app.clone(),
            state,
            reason: reason.map(str::to_owned),
        })
    };
    let stop = |i: usize, reason: &str| {
        NewEvent::any(Event::InstanceStopRequested {
            instance_id: ids[i].clone(),
            app_id: app.clone(),
            reason: reason.into(),
        })
    };
    let token: TokenId = "tok_aaaaaaaaaaaaaaaaaaaa".parse().unwrap();
    let used = |at| {
        NewEvent::any(Event::TokenUsed {
            token_id: token.clone(),
            org_id: org.clone(),
            at,
        })
    };
    let released = |state: ReleaseState| {
        NewEvent::any(Event::ReleaseStateChanged {
            app_id: app.clone(),
            release_id: release.clone(),
            state,
            reason: None,
        })
    };
    // Several appends at once, so they share a batch; each changes some rows several times.
    let batch = vec![
        append(vec![
            state(0, InstanceState::Starting, None),
            state(1, InstanceState::Starting, None),
            state(0, InstanceState::Healthy, None),
            state(0, InstanceState::Failed, Some("exit 1")),
            stop(0, "scale down"),
            stop(1, "scale down"),
            stop(0, "again"),
        ]),
        append(vec![
            used(5_000),
            used(9_000),
            used(7_000),
            released(ReleaseState::Failed),
            released(ReleaseState::Healthy),
        ]),
        append(vec![
            state(2, InstanceState::Healthy, Some("ok")),
            state(3, InstanceState::Unhealthy, Some("probe")),
            state(2, InstanceState::Unhealthy, None),
            stop(4, "first"),
            stop(4, "second"),
        ]),
    ];
    let outcomes = futures_util::future::join_all(batch.into_iter().map(|a| s.append(a))).await;
    for o in outcomes {
        o.unwrap();
    }
    let rows: BTreeMap<InstanceId, _> = s
        .instances_of_app(app.clone())
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id.clone(), (r.state, r.reason, r.desired_running)))
        .collect();
    let f = |s: &str| Some(s.to_owned());
    assert_eq!(rows[&ids[0]], (InstanceState::Failed, f("exit 1"), false));
    assert_eq!(
        rows[&ids[1]],
        (InstanceState::Starting, f("scale down"), false)
    );
    assert_eq!(rows[&ids[2]], (InstanceState::Unhealthy, None, true));
    assert_eq!(rows[&ids[3]], (InstanceState::Unhealthy, f("probe"), true));
    assert_eq!(rows[&ids[4]], (InstanceState::Pending, f("second"), false));
    assert_eq!(rows[&ids[5]], (InstanceState::Pending, None, true));
    let tok = s.token_by_id(token).await.unwrap().unwrap();
    assert_eq!(tok.last_used_at, Some(9_000));
    let rel = s.release(app.clone(), 1).await.unwrap().unwrap();
    assert_eq!(rel.state, ReleaseState::Healthy);
    let report = s.rebuild_views(false).await.unwrap();
    assert!(report.is_equal(), "{report:?}");
    // No set-based statement failed (which would have sent the batch to the careful path,
    // hiding a wrong statement behind a right answer).
    if let Some(pg) = &env.pg {
        let log = pg.log();
        assert!(!log.contains("ERROR"), "{log}");
    }
}

async fn reopen_keeps_log_and_views(env: Env) {
    let before;
    {
        let s = env.open().await;
        populate(&s).await;
        before = (s.head(), s.view_checksums().await.unwrap());
    }
    let s = env.open().await;
    assert_eq!(s.head(), before.0);
    assert_eq!(s.view_checksums().await.unwrap(), before.1);
    assert!(s.app_by_name("demo".into()).await.unwrap().is_some());
    let next = s
        .append(append(vec![NewEvent::any(org_created("later"))]))
        .await
        .unwrap();
    assert_eq!(next.events[0].seq, before.0 + 1);
}

/// Many appends at once (they share batches): each gets its own outcome, and the log is the same
/// as if they had run one by one.
async fn concurrent_appends_keep_their_own_outcomes(env: Env) {
    let s = env.open().await;
    let org = OrgId::generate();
    let contested = org_created("contested");
    let mut tasks = Vec::new();
    for i in 0..60u32 {
        let s = s.clone();
        let contested = contested.clone();
        let org = org.clone();
        tasks.push(tokio::spawn(async move {
            let a = match i % 4 {
                // Only one NoStream append on the contested stream can win.
                0 => append(vec![NewEvent {
                    event: contested,
                    expected: ExpectedVersion::NoStream,
                }]),
                // Ten pairs of apps with the same name: the view's unique name refuses one of each.
                1 => append(vec![NewEvent::any(
                    app_created(&org, &format!("app-{}", (i / 4) % 10)).1,
                )]),
                // One key shared by many identical requests: one write, the rest replays.
                2 => keyed(vec![NewEvent::any(org_created("once"))], "shared", "h"),
                _ => append(vec![NewEvent::any(org_created(&format!("free-{i}")))]),
            };
            (i, s.append(a).await)
        }));
    }
    let mut outcomes = BTreeMap::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        outcomes.insert(i, r);
    }
    let wins = |k: u32| {
        outcomes
            .iter()
            .filter(|(i, r)| *i % 4 == k && r.is_ok())
            .count()
    };
    assert_eq!(wins(0), 1, "exactly one NoStream append wins");
    for (i, r) in &outcomes {
        if i % 4 == 0 && r.is_err() {
            assert!(
                matches!(r, Err(StoreError::VersionConflict { .. })),
                "{r:?}"
            );
        }
    }
    assert_eq!(wins(1), 10, "one app per name");
    for (i, r) in &outcomes {
        if i % 4 == 1 && r.is_err() {
            assert!(matches!(r, Err(StoreError::ApplyView { .. })), "{r:?}");
        }
    }
    let shared: Vec<_> = outcomes
        .iter()
        .filter(|(i, _)| *i % 4 == 2)
        .map(|(_, r)| r.as_ref().unwrap())
        .collect();
    assert_eq!(shared.iter().filter(|a| !a.replayed).count(), 1);
    let seq = shared[0].events[0].seq;
    assert!(shared.iter().all(|a| a.events[0].seq == seq));
    assert_eq!(wins(3), 15);
    let log = all_events(&s).await;
    assert_contiguous(&log);
    assert_eq!(log.len(), 1 + 10 + 1 + 15);
    // Every acknowledged event is in the log at the sequence it was given.
    for r in outcomes.values().flatten() {
        for e in &r.events {
            assert_eq!(&log[e.seq as usize - 1], e);
        }
    }
    assert_eq!(s.apps(Some(org)).await.unwrap().len(), 10);
    assert!(s.rebuild_views(false).await.unwrap().is_equal());
}

fn jitter_hook() -> CommitHook {
    Arc::new(|seqs: Vec<u64>| {
        // Hold the transaction open for 0-3 ms after its sequences were assigned.
        let x = seqs
            .first()
            .copied()
            .unwrap_or(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Box::pin(async move { tokio::time::sleep(Duration::from_micros(x % 3000)).await })
    })
}

/// Writers hold their transactions open (after their sequences were assigned) for random times
/// while a watcher tails: the watcher must see every sequence, once, in order. On Postgres the
/// writers are separate store handles (as separate processes would be), and the watcher is a
/// fourth one woken by NOTIFY.
async fn watcher_never_misses_a_late_commit(env: Env) {
    let writers: Vec<Store> = if env.is_postgres() {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(
                env.open_with(Options {
                    commit_hook: Some(jitter_hook()),
                    ..Default::default()
                })
                .await,
            );
        }
        v
    } else {
        vec![
            env.open_with(Options {
                commit_hook: Some(jitter_hook()),
                ..Default::default()
            })
            .await,
        ]
    };
    let watcher_store = if env.is_postgres() {
        env.open().await
    } else {
        writers[0].clone()
    };
    const PER_TASK: usize = 40;
    const TASKS_PER_WRITER: usize = 4;
    let total = writers.len() * TASKS_PER_WRITER * PER_TASK;
    let watcher = tokio::spawn(async move {
        let mut w = watcher_store.watch(0, 7);
        let mut seen = Vec::new();
        while seen.len() < total {
            let page = w.next().await.unwrap();
            assert!(page.len() <= 7);
            seen.extend(page);
        }
        seen
    });
    let mut tasks = Vec::new();
    for (wi, s) in writers.iter().enumerate() {
        for t in 0..TASKS_PER_WRITER {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for n in 0..PER_TASK {
                    let out = s
                        .append(keyed(
                            vec![NewEvent::any(org_created(&format!("w{wi}-{t}-{n}")))],
                            &format!("w{wi}-{t}-{n}"),
                            "h",
                        ))
                        .await
                        .unwrap();
                    acked.push(out.events[0].clone());
                }
                acked
            }));
        }
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let seen = tokio::time::timeout(Duration::from_secs(60), watcher)
        .await
        .expect("the watcher saw every event")
        .unwrap();
    assert_contiguous(&seen);
    assert_eq!(seen.len(), total);
    acked.sort_by_key(|e| e.seq);
    assert_eq!(
        acked, seen,
        "the watcher saw exactly the acknowledged events"
    );
}

async fn watcher_resumes_from_its_checkpoint_after_restart(env: Env) {
    let checkpoint;
    {
        let s = env.open().await;
        for i in 0..10 {
            s.append(append(vec![NewEvent::any(org_created(&format!("o{i}")))]))
                .await
                .unwrap();
        }
        let mut w = s.watch(0, 4);
        let first = w.next().await.unwrap();
        assert_eq!(
            first.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        checkpoint = w.checkpoint();
    }
    // "Restart": a new store (process) with the checkpoint the watcher persisted.
    let s = env.open().await;
    let mut w = s.watch(checkpoint, 100);
    let rest = w.next().await.unwrap();
    assert_eq!(rest.first().map(|e| e.seq), Some(5));
    assert_eq!(rest.last().map(|e| e.seq), Some(10));
    // And it keeps following new appends.
    let s2 = s.clone();
    let next = tokio::spawn(async move { w.next().await.unwrap() });
    s2.append(append(vec![NewEvent::any(org_created("new"))]))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [11]);
}

/// A watcher that does not read while thousands of events are appended is not sent them: it
/// reads them later, a bounded page at a time, in order.
async fn slow_watcher_reads_bounded_pages(env: Env) {
    let s = env.open().await;
    let mut w = s.watch(0, 64);
    for chunk in 0..20 {
        let events = (0..100)
            .map(|i| NewEvent::any(org_created(&format!("o{chunk}-{i}"))))
            .collect();
        s.append(append(events)).await.unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 2000 {
        let page = w.next().await.unwrap();
        assert!(!page.is_empty() && page.len() <= 64);
        seen.extend(page);
    }
    assert_contiguous(&seen);
    assert_eq!(w.checkpoint(), 2000);
}

async fn rebuild_matches_live_views_and_replace_repairs_them(env: Env) {
    let s = env.open().await;
    let (org, app) = populate(&s).await;
    // An edge allocation and secrets, so that every view has rows.
    s.append(append(vec![
        NewEvent::any(Event::PortAllocated {
            app_id: app.clone(),
            port: 5432,
        }),
        NewEvent::any(Event::DataKeyCreated {
            org_id: org,
            key_id: "dk_1".into(),
            master_key_id: "mk_1".into(),
            wrapped: "w".into(),
        }),
        NewEvent::any(secrets_set(&app, 1, &[("A", "a1")], false)),
        NewEvent::any(domain(&app, "www.example.com", Some("tok"))),
        NewEvent::any(Event::DomainVerified {
            app_id: app.clone(),
            env: "production".into(),
            hostname: "www.example.com".parse().unwrap(),
        }),
    ]))
    .await
    .unwrap();
    // Volumes: one kept, one deleted (the view keeps its row with `deleted_at`).
    let host = s.hosts().await.unwrap()[0].id.clone();
    let volume = |slot: u32| Event::VolumeCreated {
        volume_id: kiln_types::VolumeId::generate(),
        app_id: app.clone(),
        env: "production".into(),
        name: "data".into(),
        process: "app".into(),
        slot,
        host_id: host.clone(),
        size: MiB(64),
    };
    let (kept, gone) = (volume(0), volume(1));
    let Event::VolumeCreated {
        volume_id: gone_id, ..
    } = &gone
    else {
        unreachable!()
    };
    let deleted = Event::VolumeDeleted {
        volume_id: gone_id.clone(),
        app_id: app.clone(),
        host_id: host.clone(),
    };
    s.append(append(vec![
        NewEvent::any(kept),
        NewEvent::any(gone),
        NewEvent::any(deleted),
    ]))
    .await
    .unwrap();
    let volumes = s.volumes().await.unwrap();
    assert_eq!(
        volumes.len(),
        1,
        "a deleted volume is not listed: {volumes:?}"
    );
    assert_eq!((volumes[0].slot, volumes[0].size), (0, MiB(64)));
    assert_eq!(volumes[0].host_id, host);
    let deleted = s.deleted_volumes_on_host(&host).await.unwrap();
    assert_eq!(deleted.len(), 1);
    assert!(deleted[0].deleted_at.is_some());
    let report = s.rebuild_views(false).await.unwrap();
    assert!(report.is_equal(), "{report:?}");
    assert_eq!(report.events, s.head());
    assert_eq!(report.live.len(), 14);
    assert!(report.live.iter().all(|c| c.rows > 0), "{report:?}");
    // Damage a live view behind the store's back: the rebuild sees it, and replace repairs it.
    env.exec("UPDATE apps SET release_count = 42");
    let report = s.rebuild_views(false).await.unwrap();
    assert!(!report.is_equal());
    let differing: Vec<_> = report
        .live
        .iter()
        .zip(&report.rebuilt)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.view)
        .collect();
    assert_eq!(differing, ["apps"]);
    let report = s.rebuild_views(true).await.unwrap();
    assert!(report.replaced);
    assert_eq!(
        s.app_by_name("demo".into())
            .await
            .unwrap()
            .unwrap()
            .release_count,
        1
    );
    assert!(s.rebuild_views(false).await.unwrap().is_equal());
}

fn raw(
    seq: u64,
    ev: &Event,
    version: u64,
    schema: i64,
    payload: serde_json::Value,
    at: i64,
) -> RawRow {
    let stream = ev.stream();
    RawRow {
        seq,
        stream_type: stream.kind.as_str().into(),
        stream_id: stream.id,
        stream_version: version,
        event_type: ev.type_name().into(),
        schema_version: schema,
        payload: payload.to_string(),
        metadata: r#"{"actor":"old-build"}"#.into(),
        recorded_at: at,
    }
}

/// A store written by an older build: view schema version 1 (no `hosts.last_registered_at`) and
/// `host_registered` events at payload schema version 1 (`cpu`, `memory`). Opening it migrates the
/// views by replaying the log, upcasting the old payloads.
async fn view_migration_replays_a_populated_store_and_upcasts_old_events(env: Env) {
    env.init_at(1).await;
    let org = OrgId::generate();
    let host = HostId::generate();
    let org_ev = Event::OrgCreated {
        org_id: org.clone(),
        name: "acme".into(),
    };
    let (_, app_ev) = app_created(&org, "demo");
    let host_ev = host_registered(&host, 1);
    let v1_host = |cpu: u32| {
        serde_json::json!({
            "host_id": host, "name": "host-1", "index": 1, "driver": "runc",
            "cpu": cpu, "memory": 4096,
        })
    };
    env.insert_raw(&[
        raw(1, &org_ev, 1, 1, org_ev.to_parts().1, 1_000),
        raw(2, &host_ev, 1, 1, v1_host(1000), 2_000),
        raw(3, &app_ev, 1, 1, app_ev.to_parts().1, 3_000),
        raw(4, &host_ev, 2, 1, v1_host(3000), 4_000),
    ])
    .await;
    let s = env.open().await;
    assert_eq!(s.head(), 4);
    let hosts = s.hosts().await.unwrap();
    assert_eq!(hosts.len(), 1);
    assert_eq!(
        hosts[0].cpu,
        MilliCpu(3000),
        "the second registration, upcast"
    );
    assert_eq!(hosts[0].registered_at, 2_000);
    assert_eq!(hosts[0].last_registered_at, 4_000, "filled by replay");
    assert_eq!(s.orgs_count().await.unwrap(), 1);
    assert!(s.app_by_name("demo".into()).await.unwrap().is_some());
    let log = all_events(&s).await;
    assert_eq!(log[1].schema_version, 1);
    assert_eq!(log[1].event, {
        let mut e = host_ev.clone();
        if let Event::HostRegistered { cpu, .. } = &mut e {
            *cpu = MilliCpu(1000);
        }
        e
    });
    // New events are written at the current payload version, and views stay consistent.
    let out = s
        .append(append(vec![NewEvent::any(host_registered(&host, 1))]))
        .await
        .unwrap();
    assert_eq!(out.events[0].schema_version, 2);
    assert_eq!(out.events[0].stream_version, 3);
    assert!(s.rebuild_views(false).await.unwrap().is_equal());
    drop(s);
    // Opening again migrates nothing and changes nothing.
    let s = env.open().await;
    assert_eq!(s.head(), 5);
}

async fn unknown_and_malformed_events_are_typed_errors(env: Env) {
    let s = env.open().await;
    s.append(append(vec![NewEvent::any(org_created("fine"))]))
        .await
        .unwrap();
    let ev = org_created("x");
    let good = ev.to_parts().1;
    let mut bad: Vec<RawRow> = (0..6)
        .map(|i| raw(2 + i, &ev, 1 + i, 1, good.clone(), 1))
        .collect();
    bad[0].event_type = "no_such_event".into();
    bad[1].payload = "{not json".into();
    bad[2].schema_version = 99;
    bad[3].stream_type = "galaxy".into();
    bad[4].metadata = "[]".into();
    bad[5].stream_id = OrgId::generate().to_string();
    env.insert_raw(&bad).await;
    let expect = |after: u64| {
        let s = s.clone();
        async move { s.read_after(after, 1).await.unwrap_err() }
    };
    use kiln_types::event::DecodeError;
    let e = expect(1).await;
    assert!(
        matches!(
            &e,
            StoreError::Decode {
                seq: 2,
                source: DecodeError::UnknownType { .. }
            }
        ),
        "{e:?}"
    );
    let e = expect(2).await;
    assert!(
        matches!(
            &e,
            StoreError::Decode {
                seq: 3,
                source: DecodeError::Malformed { .. }
            }
        ),
        "{e:?}"
    );
    let e = expect(3).await;
    assert!(
        matches!(
            &e,
            StoreError::Decode {
                seq: 4,
                source: DecodeError::UnsupportedVersion { version: 99, .. }
            }
        ),
        "{e:?}"
    );
    let e = expect(4).await;
    assert!(
        matches!(&e, StoreError::UnknownStream { seq: 5, .. }),
        "{e:?}"
    );
    let e = expect(5).await;
    assert!(
        matches!(&e, StoreError::DecodeMetadata { seq: 6, .. }),
        "{e:?}"
    );
    let e = expect(6).await;
    assert!(matches!(&e, StoreError::StreamMismatch { seq: 7 }), "{e:?}");
    // A watcher stops at the bad event with the error rather than skipping it.
    let mut w = s.watch(0, 10);
    assert!(matches!(
        w.next().await,
        Err(StoreError::Decode { seq: 2, .. })
    ));
    // A rebuild refuses to go past it too.
    assert!(s.rebuild_views(false).await.is_err());
}

async fn backup_restores_a_store_that_serves_the_same_views(env: Env) {
    let s = env.open().await;
    let (_, app) = populate(&s).await;
    let checksums = s.view_checksums().await.unwrap();
    let head = s.head();
    let restored_location = match &env.location {
        Location::Sqlite(path) => {
            let backup = path.with_file_name("backup.db");
            // Appends keep going during the online backup.
            let writer = {
                let s = s.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        s.append(append(vec![NewEvent::any(org_created(&format!(
                            "during-{i}"
                        )))]))
                        .await
                        .unwrap();
                    }
                })
            };
            s.backup(&backup).await.unwrap();
            writer.await.unwrap();
            Location::Sqlite(backup)
        }
        Location::Postgres(_) => {
            let pg = env.pg.clone().unwrap();
            let dump = env._dir.path().join("kiln.dump");
            let d = dump.clone();
            let url = tokio::task::spawn_blocking(move || {
                pg.dump("kiln", &d).unwrap();
                let url = pg.create_database("restored").unwrap();
                pg.restore(&d, "restored").unwrap();
                url
            })
            .await
            .unwrap();
            Location::Postgres(url)
        }
    };
    let r = Store::open(&restored_location, Options::default())
        .await
        .unwrap();
    // The copy is a consistent snapshot: its views equal a replay of its own log.
    assert!(r.rebuild_views(false).await.unwrap().is_equal());
    if !env.is_postgres() {
        assert!(r.head() >= head);
    } else {
        assert_eq!(r.head(), head);
        assert_eq!(r.view_checksums().await.unwrap(), checksums);
    }
    let restored_head = r.head();
    assert_eq!(r.instances_of_app(app.clone()).await.unwrap().len(), 3);
    assert_eq!(
        r.instances_of_app(app.clone()).await.unwrap(),
        s.instances_of_app(app).await.unwrap()
    );
    // The restored store carries on from its head.
    let next = r
        .append(append(vec![NewEvent::any(org_created("after-restore"))]))
        .await
        .unwrap();
    assert_eq!(next.events[0].seq, restored_head + 1);
}

// ---- Postgres only: several processes on one database, and the server going away. ----

async fn pg_env() -> Env {
    Env::postgres().await
}

/// A batch holding the append lock with its sequence assigned keeps every later append waiting:
/// no later sequence can commit first, so the watcher cannot skip it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_later_appends_wait_for_an_open_transaction() {
    let env = pg_env().await;
    let entered = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let hook: CommitHook = {
        let entered = entered.clone();
        let release = release.clone();
        Arc::new(move |_| {
            let entered = entered.clone();
            let release = release.clone();
            Box::pin(async move {
                entered.notify_one();
                release.acquire().await.unwrap().forget();
            })
        })
    };
    let a = env
        .open_with(Options {
            commit_hook: Some(hook),
            ..Default::default()
        })
        .await;
    let b = env.open().await;
    let watcher = env.open().await;
    let ta = tokio::spawn({
        let a = a.clone();
        async move {
            a.append(append(vec![NewEvent::any(org_created("a"))]))
                .await
        }
    });
    entered.notified().await;
    let tb = tokio::spawn({
        let b = b.clone();
        async move {
            b.append(append(vec![NewEvent::any(org_created("b"))]))
                .await
        }
    });
    // Wait until B's batch is queued on the advisory lock.
    let pg = env.pg.clone().unwrap();
    let waiting = tokio::task::spawn_blocking(move || {
        for _ in 0..500 {
            let n = pg
                .psql(
                    "kiln",
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                )
                .unwrap();
            if n == "1" {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    })
    .await
    .unwrap();
    assert!(waiting, "the second append waits for the append lock");
    assert!(!tb.is_finished());
    assert!(watcher.read_after(0, 10).await.unwrap().is_empty());
    assert_eq!(watcher.head(), 0);
    release.add_permits(1);
    let ra = ta.await.unwrap().unwrap();
    let rb = tb.await.unwrap().unwrap();
    assert_eq!(ra.events[0].seq, 1);
    assert_eq!(rb.events[0].seq, 2);
    let mut w = watcher.watch(0, 10);
    let mut seen = w.next().await.unwrap();
    if seen.len() < 2 {
        seen.extend(w.next().await.unwrap());
    }
    assert_eq!(seen.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_appends_by_another_process_wake_subscribers() {
    let env = pg_env().await;
    let a = env.open().await;
    let b = env.open().await;
    let mut head = b.subscribe();
    a.append(append(vec![NewEvent::any(org_created("x"))]))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), head.wait_for(|h| *h == 1))
        .await
        .expect("NOTIFY advanced the other store's head well before its poll")
        .unwrap();
}

/// `instances` pages are kept half full (so a state change fits beside the row: a HOT update);
/// the setting is applied at open to a store that lacks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_instances_table_keeps_room_for_updates() {
    let env = pg_env().await;
    let options = || {
        env.pg
            .as_ref()
            .unwrap()
            .psql(
                "kiln",
                "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE relname = 'instances'",
            )
            .unwrap()
    };
    drop(env.open().await);
    assert_eq!(options(), "fillfactor=50");
    env.exec("ALTER TABLE instances RESET (fillfactor)");
    assert_eq!(options(), "");
    drop(env.open().await);
    assert_eq!(options(), "fillfactor=50");
}

/// Two processes appending to one stream in turn: each sees the other's versions (a committer
/// remembers the versions it wrote only while no one else has appended since).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stream_versions_stay_exact_across_processes() {
    let env = pg_env().await;
    let a = env.open().await;
    let b = env.open().await;
    let host = HostId::generate();
    let at = |expected| {
        append(vec![NewEvent {
            event: host_registered(&host, 1),
            expected,
        }])
    };
    let v = |r: kiln_store::Appended| r.events[0].stream_version;
    assert_eq!(v(a.append(at(ExpectedVersion::NoStream)).await.unwrap()), 1);
    assert_eq!(v(b.append(at(ExpectedVersion::Exact(1))).await.unwrap()), 2);
    // `a` last wrote version 1; it must see `b`'s 2.
    assert_eq!(v(a.append(at(ExpectedVersion::Exact(2))).await.unwrap()), 3);
    let err = a.append(at(ExpectedVersion::Exact(2))).await.unwrap_err();
    assert!(
        matches!(err, StoreError::VersionConflict { actual: 3, .. }),
        "{err:?}"
    );
    let err = b.append(at(ExpectedVersion::Exact(2))).await.unwrap_err();
    assert!(
        matches!(err, StoreError::VersionConflict { actual: 3, .. }),
        "{err:?}"
    );
    assert_eq!(v(b.append(at(ExpectedVersion::Exact(3))).await.unwrap()), 4);
    assert_eq!(v(a.append(at(ExpectedVersion::Exact(4))).await.unwrap()), 5);
}

/// Writers with idempotency keys keep appending while the server is killed and restarted; every
/// append ends up in the log exactly once, sequences stay gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load_loses_and_duplicates_nothing() {
    let env = pg_env().await;
    let s = env.open().await;
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 150;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut retried = 0;
            for n in 0..PER_WRITER {
                let key = format!("w{w}-{n}");
                let a = keyed(vec![NewEvent::any(org_created(&key))], &key, "h");
                loop {
                    match s.append(a.clone()).await {
                        Ok(out) => {
                            acked.push((key.clone(), out.events[0].clone()));
                            break;
                        }
                        Err(e) if e.is_retryable() => {
                            retried += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("append {key} failed: {e:?}"),
                    }
                }
            }
            (acked, retried)
        }));
    }
    // Restart once a part of the load is in.
    let mut head = s.subscribe();
    head.wait_for(|h| *h >= 100).await.unwrap();
    let pg = env.pg.clone().unwrap();
    tokio::task::spawn_blocking(move || pg.restart(StopMode::Immediate).unwrap())
        .await
        .unwrap();
    let mut acked = Vec::new();
    for t in tasks {
        let (a, _) = t.await.unwrap();
        acked.extend(a);
    }
    let log = all_events(&s).await;
    assert_contiguous(&log);
    assert_eq!(
        log.len(),
        WRITERS * PER_WRITER,
        "no event lost, none duplicated"
    );
    let names: BTreeSet<String> = log
        .iter()
        .map(|e| match &e.event {
            Event::OrgCreated { name, .. } => name.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(names.len(), WRITERS * PER_WRITER);
    for (_, e) in &acked {
        assert_eq!(
            &log[e.seq as usize - 1],
            e,
            "acknowledged at the sequence it was given"
        );
    }
    // Replaying a key after the restart returns the original events.
    let again = s
        .append(keyed(vec![NewEvent::any(org_created("w0-0"))], "w0-0", "h"))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(
        again.events[0],
        acked.iter().find(|(k, _)| k == "w0-0").unwrap().1
    );
    assert!(s.rebuild_views(false).await.unwrap().is_equal());
}

/// When the server stays away longer than the retry window, appends and reads fail with a clear,
/// retryable error; once it is back, the same append (same key) is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_longer_than_the_retry_window_is_a_clear_error() {
    let env = pg_env().await;
    let s = env
        .open_with(Options {
            retry_for: Duration::from_millis(600),
            ..Default::default()
        })
        .await;
    s.append(append(vec![NewEvent::any(org_created("before"))]))
        .await
        .unwrap();
    let pg = env.pg.clone().unwrap();
    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.stop(StopMode::Fast).unwrap())
        .await
        .unwrap();
    let a = keyed(vec![NewEvent::any(org_created("during"))], "k", "h");
    let err = s.append(a.clone()).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("did not answer") && msg.contains("append was not done"),
        "{msg}"
    );
    let err = s.orgs_count().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    tokio::task::spawn_blocking(move || pg.start_again().unwrap())
        .await
        .unwrap();
    let first = s.append(a.clone()).await.unwrap();
    let again = s.append(a).await.unwrap();
    assert!(!first.replayed && again.replayed);
    assert_eq!(first.events[0].seq, 2);
    assert_eq!(all_events(&s).await.len(), 2);
    assert_eq!(s.orgs_count().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_backends_compute_equal_checksums_for_equal_logs() {
    let sqlite = Env::sqlite().await;
    let pg = pg_env().await;
    let a = sqlite.open().await;
    let b = pg.open().await;
    populate(&a).await;
    // Copy the log verbatim (same ids, same recorded times) into the other backend.
    let rows: Vec<RawRow> = all_events(&a)
        .await
        .into_iter()
        .map(|e| {
            let (t, payload) = e.event.to_parts();
            RawRow {
                seq: e.seq,
                stream_type: e.stream.kind.as_str().into(),
                stream_id: e.stream.id.clone(),
                stream_version: e.stream_version,
                event_type: t.into(),
                schema_version: e.schema_version.into(),
                payload: payload.to_string(),
                metadata: serde_json::to_string(&e.metadata).unwrap(),
                recorded_at: e.recorded_at,
            }
        })
        .collect();
    drop(b);
    pg.insert_raw(&rows).await;
    let b = pg.open().await;
    b.rebuild_views(true).await.unwrap();
    assert_eq!(
        a.view_checksums().await.unwrap(),
        b.view_checksums().await.unwrap()
    );
}
