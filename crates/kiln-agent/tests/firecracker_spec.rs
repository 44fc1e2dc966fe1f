//! The Firecracker driver's documents checked against Firecracker's own API specification
//! (`shared/reference/firecracker-api.yaml`, Swagger 2.0), with a small validator of the subset
//! of JSON Schema that specification uses. Firecracker deserializes its bodies with unknown fields
//! denied, so the validator denies them too.
//!
//! The API-socket tests run the driver's real client against a stand-in server on a Unix socket.
//! The stand-in implements Firecracker's published API, not Kiln's expectations: it accepts only
//! the paths and methods of the specification, validates each body against the operation's
//! schema, and answers as the specification says (`204` on success, `400` with a
//! `{"fault_message"}` body otherwise). No Firecracker ran: these hosts cannot boot it.

use std::path::PathBuf;

use serde_json::{json, Value};

use kiln_agent::runtime::firecracker::{self, BootMode, JailerConfig};
use kiln_types::{AppId, InstanceId, ReleaseId, WorkloadSpec};

fn reference(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.join("../shared/reference").join(name)
}

fn spec_doc() -> Value {
    let path = reference("firecracker-api.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "Firecracker's API spec is expected at {} (shared/ beside the clone): {e}",
            path.display()
        )
    });
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("spec parses as YAML");
    serde_json::to_value(yaml).expect("spec converts to JSON")
}

/// Validates `v` against `schema`, collecting every violation with its JSON path.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/definitions/");
        let target = &doc["definitions"][name];
        assert!(!target.is_null(), "unresolved $ref {r}");
        return validate(doc, target, v, at, errors);
    }
    // Optional fields may be null in Firecracker's own example (serde's Option).
    if v.is_null() {
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str).unwrap_or(
        if schema.get("properties").is_some() {
            "object"
        } else {
            ""
        },
    );
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    };
    if !ok {
        errors.push(format!("{at}: expected {ty}, got {v}"));
        return;
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        let as_str = |x: &Value| {
            x.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| x.to_string())
        };
        if !values.iter().any(|e| as_str(e) == as_str(v)) {
            errors.push(format!("{at}: {v} is not one of {values:?}"));
        }
    }
    if let Some(n) = v.as_f64() {
        if schema
            .get("minimum")
            .and_then(Value::as_f64)
            .is_some_and(|m| n < m)
        {
            errors.push(format!("{at}: {n} is below the minimum"));
        }
        if schema
            .get("maximum")
            .and_then(Value::as_f64)
            .is_some_and(|m| n > m)
        {
            errors.push(format!("{at}: {n} is above the maximum"));
        }
    }
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            for req in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let key = req.as_str().unwrap_or_default();
                if map.get(key).is_none_or(Value::is_null) {
                    errors.push(format!("{at}: missing required `{key}`"));
                }
            }
            for (k, val) in map {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => validate(doc, s, val, &format!("{at}.{k}"), errors),
                    None => errors.push(format!("{at}: unknown field `{k}`")),
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(doc, item_schema, item, &format!("{at}[{i}]"), errors);
                }
            }
        }
        _ => {}
    }
}

fn check(doc: &Value, definition: &str, v: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    validate(
        doc,
        &json!({ "$ref": format!("#/definitions/{definition}") }),
        v,
        definition,
        &mut errors,
    );
    errors
}

/// The body schema of `method path` in the spec, matching templated path segments.
fn body_schema<'a>(doc: &'a Value, method: &str, path: &str) -> &'a Value {
    let paths = doc["paths"].as_object().expect("paths");
    let (_, item) = paths
        .iter()
        .find(|(template, _)| {
            let (t, p): (Vec<_>, Vec<_>) =
                (template.split('/').collect(), path.split('/').collect());
            t.len() == p.len() && t.iter().zip(&p).all(|(a, b)| a == b || a.starts_with('{'))
        })
        .unwrap_or_else(|| panic!("{path} is not an endpoint of Firecracker's API"));
    let op = &item[method.to_lowercase()];
    assert!(
        !op.is_null(),
        "{method} {path} is not an operation of Firecracker's API"
    );
    let params = op["parameters"].as_array().expect("parameters");
    &params
        .iter()
        .find(|p| p["in"] == "body")
        .expect("a body parameter")["schema"]
}

fn workload(cpu: u32, memory: u64) -> WorkloadSpec {
    let mut v = minimal();
    v["vm"] = json!({"cpu": cpu, "memory": memory});
    serde_json::from_value(v).expect("a minimal WorkloadSpec")
}

/// A minimal spec document, so new optional fields get their defaults.
fn minimal() -> Value {
    json!({
        "spec_version": kiln_types::WORKLOAD_SPEC_VERSION,
        "instance_id": InstanceId::generate(),
        "app_id": AppId::generate(),
        "app_name": "demo",
        "release_id": ReleaseId::generate(),
        "release_version": 1,
        "process": "app",
        "image": {"registry": "r", "repository": "x", "digest": format!("sha256:{}", "a".repeat(64))},
        "vm": {"cpu": 1000, "memory": 256},
        "network": {"ipv6": "fdb5:696c:6e00:1::100", "gateway": "fdb5:696c:6e00:1::1"}
    })
}

fn jail() -> JailerConfig {
    JailerConfig {
        jailer: "/usr/local/bin/jailer".into(),
        firecracker: "/usr/local/bin/firecracker".into(),
        chroot_base: "/srv/jailer".into(),
        uid: 10_000,
        gid: 10_000,
    }
}

#[test]
fn the_validator_accepts_firecrackers_example_and_rejects_bad_documents() {
    let doc = spec_doc();
    let text = std::fs::read_to_string(reference("firecracker-vm-config.example.json"))
        .expect("example config");
    let example: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        check(&doc, "FullVmConfiguration", &example),
        Vec::<String>::new()
    );
    let mut bad = example.clone();
    bad["machine-config"]["vcpu_count"] = json!("two");
    bad["machine-config"]["mem_size_mib"] = Value::Null;
    bad["drives"][0]["cache_type"] = json!("Fast");
    bad["boot-source"]["kernel"] = json!("x");
    let errors = check(&doc, "FullVmConfiguration", &bad);
    assert_eq!(errors.len(), 4, "{errors:#?}");
}

#[test]
fn config_file_and_api_requests_follow_firecrackers_spec() {
    let doc = spec_doc();
    for (cpu, mem) in [(250, 128), (1000, 256), (3000, 2048), (64_000, 65_536)] {
        let spec = workload(cpu, mem);
        let plan = firecracker::plan(&spec, "tap0", "kiln-x", 3, &jail(), BootMode::Api);
        assert_eq!(
            check(&doc, "FullVmConfiguration", &plan.config),
            Vec::<String>::new(),
            "config for {cpu}m/{mem}MiB"
        );
        for r in &plan.requests {
            let schema = body_schema(&doc, r.method, &r.path);
            let mut errors = Vec::new();
            validate(
                &doc,
                schema,
                &r.body,
                &format!("{} {}", r.method, r.path),
                &mut errors,
            );
            assert_eq!(errors, Vec::<String>::new());
        }
        let stop = firecracker::stop_request();
        let mut errors = Vec::new();
        validate(
            &doc,
            body_schema(&doc, stop.method, &stop.path),
            &stop.body,
            "stop",
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let vcpus = plan.config["machine-config"]["vcpu_count"]
            .as_u64()
            .unwrap();
        assert!(
            vcpus == 1 || vcpus.is_multiple_of(2),
            "Firecracker takes 1 or an even vCPU count: {vcpus}"
        );
        assert_eq!(plan.config["machine-config"]["mem_size_mib"], json!(mem));
    }
}

#[test]
fn requests_end_with_instance_start_and_mirror_the_config_file() {
    let spec = workload(2000, 512);
    let plan = firecracker::plan(&spec, "tap0", "kiln-x", 7, &jail(), BootMode::Api);
    assert_eq!(
        plan.requests.last().unwrap().body,
        json!({"action_type": "InstanceStart"})
    );
    assert_eq!(plan.requests[0].body, plan.config["boot-source"]);
    assert_eq!(plan.config["vsock"]["guest_cid"], json!(7));
    assert_eq!(
        plan.config["network-interfaces"][0]["host_dev_name"],
        json!("tap0")
    );
    let mac = plan.config["network-interfaces"][0]["guest_mac"]
        .as_str()
        .unwrap();
    assert!(mac.starts_with("02:"), "locally administered MAC: {mac}");
    assert_eq!(
        firecracker::plan(&spec, "tap0", "kiln-x", 7, &jail(), BootMode::Api),
        plan,
        "deterministic"
    );
}

#[test]
fn jailer_argv_carries_identity_namespace_and_limits() {
    let spec = workload(1500, 256);
    let plan = firecracker::plan(&spec, "tap0", "kiln-abc", 3, &jail(), BootMode::ConfigFile);
    let argv = plan.jailer_argv.join(" ");
    let id = firecracker::jail_id(&spec);
    assert!(
        id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
        "{id}"
    );
    for needle in [
        format!("--id {id}"),
        "--uid 10000 --gid 10000".into(),
        "--netns /run/netns/kiln-abc".into(),
        "--cgroup-version 1".into(),
        format!(
            "--cgroup memory.limit_in_bytes={}",
            (256 + firecracker::plan::VMM_OVERHEAD_MIB) * 1024 * 1024
        ),
        "--cgroup cpu.cfs_quota_us=150000".into(),
        "-- --config-file vm.json --api-sock api.sock".into(),
    ] {
        assert!(argv.contains(&needle), "{needle:?} missing from {argv}");
    }
    assert_eq!(
        plan.jail_root,
        PathBuf::from(format!("/srv/jailer/firecracker/{id}/root"))
    );
}

/// The jailer's flags as its documentation lists them (`docs/jailer.md`: "Jailer Usage"), with
/// whether each takes a value.
const JAILER_FLAGS: &[(&str, bool)] = &[
    ("--id", true),
    ("--exec-file", true),
    ("--uid", true),
    ("--gid", true),
    ("--parent-cgroup", true),
    ("--cgroup-version", true),
    ("--cgroup", true),
    ("--chroot-base-dir", true),
    ("--netns", true),
    ("--resource-limit", true),
    ("--daemonize", false),
    ("--new-pid-ns", false),
];

/// Firecracker's own flags the driver passes after `--` (`--api-sock`, `--config-file`); the
/// jailer already passes `--id`, so it must not appear there.
const FIRECRACKER_FLAGS: &[&str] = &["--api-sock", "--config-file"];

#[test]
fn jailer_argv_uses_only_documented_flags_in_both_boot_modes() {
    for boot in [BootMode::ConfigFile, BootMode::Api] {
        let spec = workload(500, 128);
        let plan = firecracker::plan(&spec, "tap0", "kiln-abc", 3, &jail(), boot);
        let argv = &plan.jailer_argv;
        assert_eq!(argv[0], "/usr/local/bin/jailer");
        let split = argv.iter().position(|a| a == "--").expect("a `--`");
        let mut i = 1;
        let mut seen = Vec::new();
        while i < split {
            let flag = argv[i].as_str();
            let (_, takes_value) = JAILER_FLAGS
                .iter()
                .find(|(f, _)| *f == flag)
                .unwrap_or_else(|| panic!("{flag} is not a documented jailer flag"));
            seen.push(flag);
            if *takes_value {
                let value = &argv[i + 1];
                assert!(!value.starts_with("--"), "{flag} has no value");
                if flag == "--cgroup" {
                    let (file, v) = value.split_once('=').expect("<cgroup_file>=<value>");
                    assert!(
                        ["memory.", "cpu."].iter().any(|p| file.starts_with(p)),
                        "{file}"
                    );
                    assert!(v.parse::<u64>().is_ok(), "{value}");
                }
                i += 2;
            } else {
                i += 1;
            }
        }
        for required in ["--id", "--exec-file", "--uid", "--gid"] {
            assert!(seen.contains(&required), "{required} missing");
        }
        // `--daemonize` would make the jailer call setsid(), which fails for the process-group
        // leader the agent makes it; `--new-pid-ns` is what leaves the pid file.
        assert!(!seen.contains(&"--daemonize"));
        assert!(seen.contains(&"--new-pid-ns"));
        let fc_args = &argv[split + 1..];
        let mut j = 0;
        while j < fc_args.len() {
            assert!(
                FIRECRACKER_FLAGS.contains(&fc_args[j].as_str()),
                "{} after `--`",
                fc_args[j]
            );
            j += 2;
        }
        assert_eq!(
            fc_args.iter().any(|a| a == "--config-file"),
            boot == BootMode::ConfigFile
        );
        // Paths after `--` are resolved inside the jail: relative, no escape.
        assert!(fc_args
            .iter()
            .all(|a| !a.starts_with('/') && !a.contains("..")));
        let exec = Path::new(&argv[argv.iter().position(|a| a == "--exec-file").unwrap() + 1]);
        assert!(exec
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains("firecracker"));
    }
}

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use firecracker::api::{ApiCallError, ApiClient};

/// One request as the stand-in server received it, with the violations it found.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    body: Value,
    violations: Vec<String>,
}

/// A stand-in for Firecracker's API server (see the module docs).
struct SpecServer {
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    _dir: tempfile::TempDir,
}

/// The operation of `method path` in the spec, matching templated path segments.
fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> Option<&'a Value> {
    let paths = doc["paths"].as_object()?;
    let (_, item) = paths.iter().find(|(template, _)| {
        let (t, p): (Vec<_>, Vec<_>) = (template.split('/').collect(), path.split('/').collect());
        t.len() == p.len() && t.iter().zip(&p).all(|(a, b)| a == b || a.starts_with('{'))
    })?;
    let op = &item[method.to_lowercase()];
    (!op.is_null()).then_some(op)
}

/// Reads one HTTP/1.1 request (head + Content-Length body) from a client.
async fn read_request(stream: &mut UnixStream) -> Option<(String, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 16 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path, version) = (first.next()?, first.next()?, first.next()?);
    assert_eq!(version, "HTTP/1.1");
    let mut len = 0;
    for l in lines {
        let (k, v) = l.split_once(':')?;
        if k.eq_ignore_ascii_case("content-length") {
            len = v.trim().parse().ok()?;
        }
    }
    let mut body = buf[end + 4..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((method.to_owned(), path.to_owned(), body))
}

impl SpecServer {
    fn start() -> SpecServer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let doc = Arc::new(spec_doc());
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (doc, log) = (doc.clone(), log.clone());
                tokio::spawn(async move {
                    let Some((method, path, body)) = read_request(&mut stream).await else {
                        return;
                    };
                    let mut violations = Vec::new();
                    let parsed: Value = if body.is_empty() {
                        Value::Null
                    } else {
                        serde_json::from_slice(&body).unwrap_or_else(|e| {
                            violations.push(format!("body is not JSON: {e}"));
                            Value::Null
                        })
                    };
                    match operation(&doc, &method, &path) {
                        None => violations.push(format!("{method} {path} is not in the spec")),
                        Some(op) => {
                            let params = op["parameters"].as_array().cloned().unwrap_or_default();
                            if let Some(p) = params.iter().find(|p| p["in"] == "body") {
                                if p["required"] == json!(true) && parsed.is_null() {
                                    violations.push("missing required body".into());
                                }
                                validate(&doc, &p["schema"], &parsed, "body", &mut violations);
                            }
                        }
                    }
                    let response = if violations.is_empty() {
                        "HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\n\r\n".to_owned()
                    } else {
                        let fault =
                            serde_json::to_string(&json!({"fault_message": violations.join("; ")}))
                                .unwrap();
                        format!(
                            "HTTP/1.1 400 Bad Request\r\nServer: Firecracker API\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{fault}",
                            fault.len()
                        )
                    };
                    log.lock().unwrap().push(Seen {
                        method,
                        path,
                        body: parsed,
                        violations,
                    });
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        SpecServer {
            socket,
            seen,
            _dir: dir,
        }
    }
}

#[tokio::test]
async fn the_api_client_boots_and_stops_through_requests_that_follow_the_spec() {
    for (cpu, mem) in [(250, 128), (2000, 1024), (64_000, 65_536)] {
        let server = SpecServer::start();
        let client = ApiClient::new(&server.socket, Duration::from_secs(5));
        client.wait(Duration::from_secs(1)).await.unwrap();
        let spec = workload(cpu, mem);
        let plan = firecracker::plan(&spec, "tap0", "kiln-x", 3, &jail(), BootMode::Api);
        for r in &plan.requests {
            client.put(&r.path, &r.body).await.unwrap();
        }
        let stop = firecracker::stop_request();
        client.put(&stop.path, &stop.body).await.unwrap();
        let seen = server.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), plan.requests.len() + 1);
        for (s, r) in seen.iter().zip(plan.requests.iter().chain([&stop])) {
            assert_eq!(
                (s.method.as_str(), s.path.as_str()),
                (r.method, r.path.as_str())
            );
            assert_eq!(s.body, r.body, "the body on the wire is the planned one");
            assert_eq!(
                s.violations,
                Vec::<String>::new(),
                "{} {}",
                s.method,
                s.path
            );
        }
        assert_eq!(
            seen.last().unwrap().body,
            json!({"action_type": "SendCtrlAltDel"})
        );
        assert_eq!(
            seen[seen.len() - 2].body,
            json!({"action_type": "InstanceStart"})
        );
    }
}

#[tokio::test]
async fn a_fault_from_the_api_carries_firecrackers_message() {
    let server = SpecServer::start();
    let client = ApiClient::new(&server.socket, Duration::from_secs(5));
    let err = client
        .put(
            "/machine-config",
            &json!({"vcpu_count": "two", "mem_size_mib": 128}),
        )
        .await
        .unwrap_err();
    match err {
        ApiCallError::Fault { status, fault, .. } => {
            assert_eq!(status, 400);
            assert!(fault.contains("vcpu_count"), "{fault}");
        }
        other => panic!("expected a fault, got {other:?}"),
    }
    let err = client
        .put("/not-an-endpoint", &json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ApiCallError::Fault { status: 400, .. }),
        "{err:?}"
    );
}

/// A server that answers every request with `answer` (after `delay`), then closes.
fn raw_server(answer: Vec<u8>, delay: Duration) -> (PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let _ = read_request(&mut stream).await;
                tokio::time::sleep(delay).await;
                let _ = stream.write_all(&answer).await;
            });
        }
    });
    (socket, dir)
}

#[tokio::test]
async fn untrusted_answers_are_bounded_and_never_panic() {
    let body = json!({"action_type": "FlushMetrics"});
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"".to_vec(), "Truncated"),
        (b"HTTP/1.1 204 No".to_vec(), "Truncated"),
        (b"garbage\r\n\r\n".to_vec(), "StatusLine"),
        (
            format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(20_000)).into_bytes(),
            "HeadTooLong",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n".to_vec(),
            "BodyTooLong",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec(),
            "Truncated",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            "Chunked",
        ),
        (
            b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\nplain".to_vec(),
            "Fault",
        ),
    ];
    for (answer, want) in cases {
        let (socket, _dir) = raw_server(answer.clone(), Duration::ZERO);
        let client = ApiClient::new(&socket, Duration::from_secs(5));
        let err = client.put("/actions", &body).await.unwrap_err();
        assert!(
            format!("{err:?}").contains(want),
            "{:?} gave {err:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(60)])
        );
    }
    // A 204 is success even when the server keeps the connection open.
    let (socket, _dir) = raw_server(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), Duration::ZERO);
    ApiClient::new(&socket, Duration::from_secs(5))
        .put("/actions", &body)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_silent_api_times_out() {
    let (socket, _dir) = raw_server(Vec::new(), Duration::from_secs(3600));
    let client = ApiClient::new(&socket, Duration::from_millis(300));
    let err = client
        .put("/actions", &json!({"action_type": "FlushMetrics"}))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiCallError::Timeout { .. }), "{err:?}");
    let missing = ApiClient::new("/nonexistent/api.sock", Duration::from_secs(1));
    assert!(matches!(
        missing.wait(Duration::from_millis(300)).await,
        Err(ApiCallError::NoSocket { .. })
    ));
}
