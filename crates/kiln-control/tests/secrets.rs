//! Secrets through the real router on 127.0.0.1:0, a real store (SQLite, and Postgres for the raw
//! table check), real master key files: values are encrypted at rest and never leak into logs,
//! events, errors or responses; versions are pinned by releases and rolled out; another org sees
//! nothing; a wrong or missing master key fails with the key id; rotation keeps every secret
//! readable.

use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use kiln_control::secrets::{rotate_master_key, MasterKeySource};
use kiln_control::{Control, ControlConfig, Reconciler, Scope};
use kiln_store::{Append, Metadata, NewEvent, Store};
use kiln_types::event::{Driver, Event};
use kiln_types::{AppId, HostId, ImageRef, MiB, MilliCpu, OrgId, ReleaseId};

const CANARY: &str = "LEAKCANARY";
const VALUE_A: &str = "LEAKCANARY-alpha-7f3e9c";
const VALUE_B: &str = "LEAKCANARY-beta-postgres://u:pw@db:5432/x";
const VALUE_A2: &str = "LEAKCANARY-alpha-rotated-0b1d";

// ---- captured tracing output ----

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of every level this process writes, from the first call on.
fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        captured
    })
}

// ---- harness ----

struct Harness {
    dir: tempfile::TempDir,
    store: Store,
    control: Arc<Control>,
    base: String,
    http: reqwest::Client,
    org: OrgId,
    admin: String,
    /// Every response body seen, with whether it was a call allowed to carry values.
    responses: Mutex<Vec<(String, String, bool)>>,
}

fn key_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    kiln_control::secrets::ensure_key_file(&path).unwrap();
    path
}

async fn serve(control: &Arc<Control>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = control.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

impl Harness {
    async fn sqlite() -> Harness {
        logs();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("kiln.db"))
            .await
            .unwrap();
        Self::with_store(dir, store).await
    }

    async fn with_store(dir: tempfile::TempDir, store: Store) -> Harness {
        let key = key_file(dir.path(), "master.key");
        let control = Control::new(
            store.clone(),
            ControlConfig {
                master_key: Some(MasterKeySource::File(key)),
                ..Default::default()
            },
        )
        .unwrap();
        let boot = control.bootstrap("test").await.unwrap().unwrap();
        let base = serve(&control).await;
        Harness {
            dir,
            store,
            control,
            base,
            http: reqwest::Client::new(),
            org: boot.org_id,
            admin: boot.admin_token,
            responses: Mutex::new(Vec::new()),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, String) {
        self.call_raw(method, path, token, body.map(|b| b.to_string()))
            .await
    }

    async fn call_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<String>,
    ) -> (u16, String) {
        let mut rb = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(token);
        if let Some(b) = body {
            rb = rb.header("content-type", "application/json").body(b);
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let may_carry_values = (path.contains("reveal=true")
            || path.ends_with("/secrets") && path.starts_with("/v1/hosts/"))
            && status == 200;
        self.responses
            .lock()
            .unwrap()
            .push((path.to_owned(), text.clone(), may_carry_values));
        (status, text)
    }

    async fn token(&self, org: &OrgId, scopes: &[Scope]) -> String {
        self.control.create_token(org, "t", scopes).await.unwrap()
    }

    async fn create_app(&self, name: &str) -> AppId {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/v1/apps",
                &self.admin,
                Some(serde_json::json!({ "name": name })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["id"].as_str().unwrap().parse().unwrap()
    }

    async fn set(&self, app: &str, values: &[(&str, &str)], stage: bool) -> serde_json::Value {
        let secrets: serde_json::Map<String, serde_json::Value> = values
            .iter()
            .map(|(n, v)| ((*n).to_owned(), serde_json::Value::from(*v)))
            .collect();
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/apps/{app}/secrets"),
                &self.admin,
                Some(serde_json::json!({ "secrets": secrets, "stage": stage })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        serde_json::from_str(&body).unwrap()
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

    /// Everything the log holds (payloads and metadata), as JSON text.
    async fn log_text(&self) -> String {
        let events = self.store.read_after(0, 100_000).await.unwrap();
        events
            .iter()
            .map(|e| {
                format!(
                    "{} {}\n",
                    serde_json::to_string(&e.event).unwrap(),
                    serde_json::to_string(&e.metadata).unwrap()
                )
            })
            .collect()
    }
}

fn release_event(app: &AppId, version: u64, manifest_src: &str, secrets_version: u64) -> Event {
    let m = kiln_manifest::parse("kiln.toml", manifest_src).unwrap();
    Event::ReleaseCreated {
        app_id: app.clone(),
        release_id: ReleaseId::generate(),
        version,
        image_input: "127.0.0.1:5000/demo:v1".into(),
        image: ImageRef {
            registry: "127.0.0.1:5000".into(),
            repository: "demo".into(),
            digest: format!("sha256:{}", "1".repeat(64)),
        },
        manifest: serde_json::to_value(&m).unwrap(),
        manifest_source: manifest_src.into(),
        secrets_version,
    }
}

const MANIFEST: &str = "app = \"demo\"\n\n[processes.app]\ncommand = \"/app/server\"\n\n[secrets]\nexport_env = true\n";

fn assert_no_canary(what: &str, text: &str) {
    assert!(
        !text.contains(CANARY),
        "{what} contains a secret value:\n{}",
        &text[text.find(CANARY).unwrap().saturating_sub(200)..]
            .chars()
            .take(400)
            .collect::<String>()
    );
}

/// Every file under `dir` (the SQLite database, its WAL), byte for byte.
fn assert_no_canary_on_disk(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()),
            "{} holds a secret value in plaintext",
            path.display()
        );
    }
}

// ---- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_never_leak_and_releases_pin_versions() {
    let h = Harness::sqlite().await;
    let app = h.create_app("demo").await;
    let read = h.token(&h.org, &[Scope::Read]).await;
    let host_token = h.token(&h.org, &[Scope::Host]).await;
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;

    // Before any release: a change is recorded, nothing rolls.
    let out = h.set("demo", &[("DATABASE_URL", VALUE_B)], false).await;
    assert_eq!(
        (out["version"].as_u64(), out["rollout"].as_str()),
        (Some(1), Some("none"))
    );

    // A serving release; the next change rolls it out as a new release with the new version.
    let host = HostId::generate();
    h.append(vec![
        Event::HostRegistered {
            host_id: host.clone(),
            name: "h1".into(),
            index: 1,
            driver: Driver::Runc,
            cpu: MilliCpu(8000),
            memory: MiB(16 * 1024),
            region: "local".into(),
        },
        release_event(&app, 1, MANIFEST, 1),
    ])
    .await;
    let out = h.set("demo", &[("API_KEY", VALUE_A)], false).await;
    assert_eq!(out["version"], 2);
    assert_eq!(out["rollout"], "restart");
    assert_eq!(out["release_version"], 2);
    let rel = h.store.release(app.clone(), 2).await.unwrap().unwrap();
    assert_eq!(rel.secrets_version, 2);
    assert_eq!(rel.image.digest, format!("sha256:{}", "1".repeat(64)));
    // A staged change makes a version and no release.
    let out = h.set("demo", &[("API_KEY", VALUE_A2)], true).await;
    assert_eq!(
        (out["version"].as_u64(), out["rollout"].as_str()),
        (Some(3), Some("none"))
    );
    assert_eq!(h.store.releases(app.clone()).await.unwrap().len(), 2);

    // The reconciler places release 2's instance with its pinned version.
    Reconciler::new(h.control.clone()).pass().await.unwrap();
    let instances = h.store.instances_on_host(host.clone()).await.unwrap();
    let inst = instances
        .iter()
        .find(|i| i.release_version == 2)
        .expect("release 2 placed");
    assert_eq!(inst.spec.secrets.version, 2);
    assert!(inst.spec.secrets.export_env);
    assert!(inst.spec.requires.contains("secrets"));

    // Bad input: errors with stable codes that never quote the values.
    let bad_bodies = [
        (format!(r#"{{"secrets": "{VALUE_A}"}}"#), "invalid_body"),
        (
            format!(r#"{{"secrets": {{"API_KEY": ["{VALUE_A}"]}}}}"#),
            "invalid_body",
        ),
        (
            format!(r#"{{"secrets": {{"bad-name": "{VALUE_A}"}}}}"#),
            "invalid_secret_name",
        ),
        (
            format!(
                r#"{{"secrets": {{"BIG": "{VALUE_A}{}"}}}}"#,
                "x".repeat(40_000)
            ),
            "secret_too_large",
        ),
        (
            format!(r#"{{"secrets": {{}}, "{VALUE_A}": 1}}"#),
            "no_secrets",
        ),
        (
            format!(r#"{{"secrets": {{"A": "{VALUE_A}""#),
            "invalid_body",
        ),
    ];
    for (body, code) in bad_bodies {
        let (status, text) = h
            .call_raw(post.clone(), "/v1/apps/demo/secrets", &h.admin, Some(body))
            .await;
        assert!(status == 422 || status == 413, "{status} {text}");
        assert!(text.contains(code), "{text}");
    }
    let (status, text) = h
        .call(
            post.clone(),
            "/v1/apps/demo/secrets/unset",
            &h.admin,
            Some(serde_json::json!({"names": ["NOPE"]})),
        )
        .await;
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("secret_not_found"));
    // Scopes: a read token lists and renders masked, but cannot set or reveal.
    let (status, _) = h
        .call(
            post.clone(),
            "/v1/apps/demo/secrets",
            &read,
            Some(serde_json::json!({"secrets": {"X": VALUE_A}})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = h
        .call(
            get.clone(),
            "/v1/apps/demo/secrets/render?reveal=true",
            &read,
            None,
        )
        .await;
    assert_eq!(status, 403);

    // List: names, versions, digests. The digest follows the value.
    let (status, text) = h
        .call(get.clone(), "/v1/apps/demo/secrets", &read, None)
        .await;
    assert_eq!(status, 200, "{text}");
    let list: kiln_api::secrets::SecretList = serde_json::from_str(&text).unwrap();
    assert_eq!(list.version, 3);
    assert!(list.staged);
    assert_eq!(list.deployed_version, Some(2));
    let names: Vec<(&str, u64)> = list
        .secrets
        .iter()
        .map(|s| (s.name.as_str(), s.version))
        .collect();
    assert_eq!(names, [("API_KEY", 3), ("DATABASE_URL", 1)]);
    // Render: masked for a read token, the values with `secrets:read`.
    let (_, masked) = h
        .call(get.clone(), "/v1/apps/demo/secrets/render", &read, None)
        .await;
    let masked: kiln_api::secrets::RenderedSecrets = serde_json::from_str(&masked).unwrap();
    assert!(!masked.revealed);
    assert_eq!(masked.file.secrets["API_KEY"], kiln_api::secrets::MASK);
    let (status, revealed) = h
        .call(
            get.clone(),
            "/v1/apps/demo/secrets/render?reveal=true",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let revealed: kiln_api::secrets::RenderedSecrets = serde_json::from_str(&revealed).unwrap();
    assert_eq!(revealed.file.secrets["API_KEY"], VALUE_A2);
    assert_eq!(revealed.file.secrets["DATABASE_URL"], VALUE_B);

    // The agent's fetch: the pinned version 2 (not the staged 3), for its own instances only.
    let path = format!("/v1/hosts/{host}/instances/{}/secrets", inst.id);
    let (status, text) = h.call(get.clone(), &path, &host_token, None).await;
    assert_eq!(status, 200, "{text}");
    let file: kiln_types::secrets::SecretsFile = serde_json::from_str(&text).unwrap();
    assert_eq!(file.version, 2);
    assert_eq!(file.secrets["API_KEY"], VALUE_A);
    assert_eq!(file.app.as_str(), "demo");
    let other_host = format!(
        "/v1/hosts/{}/instances/{}/secrets",
        HostId::generate(),
        inst.id
    );
    assert_eq!(
        h.call(get.clone(), &other_host, &host_token, None).await.0,
        404
    );
    assert_eq!(
        h.call(
            get.clone(),
            &path,
            &h.token(&h.org, &[Scope::Read]).await,
            None
        )
        .await
        .0,
        403
    );
    let delivered = h.store.read_after(0, 100_000).await.unwrap();
    assert!(delivered.iter().any(|e| matches!(&e.event,
        Event::SecretsDelivered { instance_id, version: 2, .. } if *instance_id == inst.id)));

    // Unset makes a version without the name.
    let (status, _) = h
        .call(
            post.clone(),
            "/v1/apps/demo/secrets/unset",
            &h.admin,
            Some(serde_json::json!({"names": ["DATABASE_URL"], "stage": true})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, text) = h
        .call(get.clone(), "/v1/apps/demo/secrets", &read, None)
        .await;
    assert!(!text.contains("DATABASE_URL"));

    // The scan: event payloads and metadata, every log line, every response but the two that
    // exist to carry values, and every byte of the store's files.
    assert_no_canary("the event log", &h.log_text().await);
    let logs = String::from_utf8(logs().0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("secrets set"), "the capture works");
    assert_no_canary("the log output", &logs);
    for (path, body, may_carry) in h.responses.lock().unwrap().iter() {
        if !may_carry {
            assert_no_canary(&format!("the response to {path}"), body);
        }
    }
    assert_no_canary_on_disk(h.dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_orgs_token_cannot_see_even_the_names() {
    let h = Harness::sqlite().await;
    h.create_app("demo").await;
    h.set("demo", &[("DATABASE_URL", VALUE_B)], true).await;
    let other = OrgId::generate();
    h.append(vec![Event::OrgCreated {
        org_id: other.clone(),
        name: "other".into(),
    }])
    .await;
    let intruder = h.token(&other, &[Scope::Admin]).await;
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    for (method, path, body) in [
        (get.clone(), "/v1/apps/demo/secrets", None),
        (get.clone(), "/v1/apps/demo/secrets/render", None),
        (
            get.clone(),
            "/v1/apps/demo/secrets/render?reveal=true",
            None,
        ),
        (
            post.clone(),
            "/v1/apps/demo/secrets",
            Some(serde_json::json!({"secrets": {"X": "y"}})),
        ),
        (
            post.clone(),
            "/v1/apps/demo/secrets/unset",
            Some(serde_json::json!({"names": ["DATABASE_URL"]})),
        ),
    ] {
        let (status, text) = h.call(method, path, &intruder, body).await;
        assert_eq!(status, 404, "{path}: {text}");
        assert!(!text.contains("DATABASE_URL"), "{path}: {text}");
        assert!(text.contains("not_found"));
    }
    // Nothing changed: still one version.
    let (_, text) = h.call(get, "/v1/apps/demo/secrets", &h.admin, None).await;
    let list: kiln_api::secrets::SecretList = serde_json::from_str(&text).unwrap();
    assert_eq!(list.version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_master_key_fails_with_the_key_id() {
    let h = Harness::sqlite().await;
    h.create_app("demo").await;
    h.set("demo", &[("API_KEY", VALUE_A)], true).await;
    let key_id = h.control.master_key_ids()[0].clone();

    // Another key file on the same store: names still list, values fail naming the key.
    let other_key = key_file(h.dir.path(), "other.key");
    let wrong = Control::new(
        h.store.clone(),
        ControlConfig {
            master_key: Some(MasterKeySource::File(other_key)),
            ..Default::default()
        },
    )
    .unwrap();
    let base = serve(&wrong).await;
    let client = reqwest::Client::new();
    let get = |path: &'static str| {
        let client = client.clone();
        let url = format!("{base}{path}");
        let token = h.admin.clone();
        async move {
            let r = client.get(url).bearer_auth(token).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, text) = get("/v1/apps/demo/secrets").await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = get("/v1/apps/demo/secrets/render?reveal=true").await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("master_key_error"), "{text}");
    assert!(text.contains(&key_id), "{text}");
    assert_no_canary("the error", &text);

    // No master key at all: a clear 503.
    let none = Control::new(h.store.clone(), ControlConfig::default()).unwrap();
    let base2 = serve(&none).await;
    let r = client
        .get(format!("{base2}/v1/apps/demo/secrets/render?reveal=true"))
        .bearer_auth(&h.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.text().await.unwrap().contains("secrets_unavailable"));

    // A key file that is missing or malformed stops the control plane at start, naming the file.
    let missing = h.dir.path().join("nope.key");
    let err = Control::new(
        h.store.clone(),
        ControlConfig {
            master_key: Some(MasterKeySource::File(missing.clone())),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(kiln_types::error_chain(&err).contains("nope.key"));
    let junk = h.dir.path().join("junk.key");
    std::fs::File::create(&junk)
        .unwrap()
        .write_all(b"kiln-mk1:not-base64-LEAKCANARY\n")
        .unwrap();
    let err = Control::new(
        h.store.clone(),
        ControlConfig {
            master_key: Some(MasterKeySource::File(junk)),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    let chain = kiln_types::error_chain(&err);
    assert!(
        chain.contains("junk.key") && chain.contains("entry 1"),
        "{chain}"
    );
    assert_no_canary("the key file error", &chain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_rewraps_data_keys_and_keeps_every_secret_readable() {
    let h = Harness::sqlite().await;
    h.create_app("demo").await;
    h.set(
        "demo",
        &[("API_KEY", VALUE_A), ("DATABASE_URL", VALUE_B)],
        true,
    )
    .await;
    // A second org with its own data key.
    let other = OrgId::generate();
    let other_app = AppId::generate();
    h.append(vec![
        Event::OrgCreated {
            org_id: other.clone(),
            name: "other".into(),
        },
        Event::AppCreated {
            app_id: other_app,
            org_id: other.clone(),
            name: "other-app".parse().unwrap(),
        },
    ])
    .await;
    let other_admin = h.token(&other, &[Scope::Admin]).await;
    let (status, _) = h
        .call(
            reqwest::Method::POST,
            "/v1/apps/other-app/secrets",
            &other_admin,
            Some(serde_json::json!({"secrets": {"TOKEN": VALUE_A2}})),
        )
        .await;
    assert_eq!(status, 201);
    let before = h.store.all_data_keys().await.unwrap();
    assert_eq!(before.len(), 2);
    let old_id = h.control.master_key_ids()[0].clone();
    let key_path = h.dir.path().join("master.key");
    let entries_before = h
        .store
        .secrets_at(
            h.store
                .app_by_name("demo".into())
                .await
                .unwrap()
                .unwrap()
                .id,
            "production".into(),
            1,
        )
        .await
        .unwrap();

    let report = rotate_master_key(&h.store, &key_path, false).await.unwrap();
    assert_eq!(report.rewrapped, 2);
    assert_eq!(report.previous_key_ids, vec![old_id.clone()]);
    assert_eq!(
        report.file_key_ids,
        vec![report.new_key_id.clone(), old_id.clone()]
    );
    let after = h.store.all_data_keys().await.unwrap();
    assert!(after.iter().all(|k| k.master_key_id == report.new_key_id));
    // Ciphertexts are untouched: only the data keys were rewrapped.
    let demo = h
        .store
        .app_by_name("demo".into())
        .await
        .unwrap()
        .unwrap()
        .id;
    assert_eq!(
        h.store
            .secrets_at(demo, "production".into(), 1)
            .await
            .unwrap(),
        entries_before
    );

    // The running control plane (old key loaded, data keys cached) and a fresh one that only has
    // the rotated file both read every secret; after --drop-old only the new key remains.
    let report2 = rotate_master_key(&h.store, &key_path, true).await.unwrap();
    assert_eq!(report2.file_key_ids, vec![report2.new_key_id.clone()]);
    let fresh = Control::new(
        h.store.clone(),
        ControlConfig {
            master_key: Some(MasterKeySource::File(key_path.clone())),
            ..Default::default()
        },
    )
    .unwrap();
    for control in [h.control.clone(), fresh] {
        let base = serve(&control).await;
        for (app, token, name, value) in [
            ("demo", &h.admin, "DATABASE_URL", VALUE_B),
            ("other-app", &other_admin, "TOKEN", VALUE_A2),
        ] {
            let r = reqwest::Client::new()
                .get(format!("{base}/v1/apps/{app}/secrets/render?reveal=true"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let out: kiln_api::secrets::RenderedSecrets = r.json().await.unwrap();
            assert_eq!(out.file.secrets[name], value);
        }
    }
    // New secrets after rotation are wrapped under the current key.
    h.set("demo", &[("NEW", "v")], true).await;
    assert_eq!(h.store.all_data_keys().await.unwrap().len(), 2);
    assert_no_canary("the event log", &h.log_text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tables_hold_no_plaintext() {
    let pg = tokio::task::spawn_blocking(kiln_testkit::postgres::PostgresCluster::start)
        .await
        .unwrap()
        .unwrap();
    let url = pg.create_database("kiln").unwrap();
    let store = Store::open_postgres(&url).await.unwrap();
    let h = Harness::with_store(tempfile::tempdir().unwrap(), store).await;
    h.create_app("demo").await;
    h.set(
        "demo",
        &[("API_KEY", VALUE_A), ("DATABASE_URL", VALUE_B)],
        false,
    )
    .await;
    let (_, text) = h
        .call(
            reqwest::Method::GET,
            "/v1/apps/demo/secrets/render?reveal=true",
            &h.admin,
            None,
        )
        .await;
    assert!(text.contains(VALUE_A));
    let tables = pg
        .psql(
            "kiln",
            "SELECT string_agg(table_name, ',') FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .unwrap();
    let tables: Vec<&str> = tables.split(',').collect();
    assert!(
        tables.contains(&"events") && tables.contains(&"secret_entries"),
        "{tables:?}"
    );
    let mut rows = 0;
    for t in tables {
        let dump = pg
            .psql("kiln", &format!("SELECT x::text FROM {t} x"))
            .unwrap();
        rows += dump.lines().count();
        assert_no_canary(&format!("postgres table {t}"), &dump);
    }
    assert!(rows > 5);
    let entries = pg
        .psql("kiln", "SELECT ciphertext FROM secret_entries")
        .unwrap();
    assert_eq!(entries.lines().count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_reload_updates_running_instances_without_a_release() {
    let h = Harness::sqlite().await;
    let app = h.create_app("demo").await;
    let host_token = h.token(&h.org, &[Scope::Host]).await;
    h.set("demo", &[("API_KEY", VALUE_A)], true).await;
    let host = HostId::generate();
    let manifest = format!("{MANIFEST}reload = \"signal\"\n");
    h.append(vec![
        Event::HostRegistered {
            host_id: host.clone(),
            name: "h1".into(),
            index: 1,
            driver: Driver::Runc,
            cpu: MilliCpu(8000),
            memory: MiB(16 * 1024),
            region: "local".into(),
        },
        release_event(&app, 1, &manifest, 1),
    ])
    .await;
    Reconciler::new(h.control.clone()).pass().await.unwrap();
    let inst = h.store.instances_on_host(host.clone()).await.unwrap()[0].clone();
    assert_eq!(inst.spec.secrets.version, 1);

    // A change: no release, the running instance is told to hold the new version.
    let out = h.set("demo", &[("API_KEY", VALUE_A2)], false).await;
    assert_eq!(out["rollout"], "signal");
    assert!(out.get("release_version").is_none());
    assert_eq!(h.store.releases(app.clone()).await.unwrap().len(), 1);
    let get = reqwest::Method::GET;
    let (_, text) = h
        .call(
            get.clone(),
            &format!("/v1/hosts/{host}/assignments"),
            &host_token,
            None,
        )
        .await;
    let assignments: kiln_api::Assignments = serde_json::from_str(&text).unwrap();
    assert_eq!(assignments.assignments[0].secrets_version, 2);
    assert_eq!(assignments.assignments[0].spec.secrets.version, 1);
    let (_, text) = h
        .call(
            get.clone(),
            &format!("/v1/hosts/{host}/instances/{}/secrets", inst.id),
            &host_token,
            None,
        )
        .await;
    let file: kiln_types::secrets::SecretsFile = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (file.version, file.secrets["API_KEY"].as_str()),
        (2, VALUE_A2)
    );
    // A staged change does not reach running instances.
    h.set("demo", &[("API_KEY", VALUE_A)], true).await;
    let (_, text) = h
        .call(
            get,
            &format!("/v1/hosts/{host}/assignments"),
            &host_token,
            None,
        )
        .await;
    let assignments: kiln_api::Assignments = serde_json::from_str(&text).unwrap();
    assert_eq!(assignments.assignments[0].secrets_version, 2);
    assert_no_canary("assignments", &text);
}
