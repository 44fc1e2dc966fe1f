//! The Firecracker driver's documents checked against Firecracker's own API specification
//! (`shared/reference/firecracker-api.yaml`, Swagger 2.0), with a small validator of the subset
//! of JSON Schema that specification uses. Firecracker deserializes its bodies with unknown fields
//! denied, so the validator denies them too.

use std::path::PathBuf;

use serde_json::{json, Value};

use kiln_agent::runtime::firecracker::{self, JailerConfig};
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
        let plan = firecracker::plan(&spec, "tap0", "kiln-x", 3, &jail());
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
    let plan = firecracker::plan(&spec, "tap0", "kiln-x", 7, &jail());
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
        firecracker::plan(&spec, "tap0", "kiln-x", 7, &jail()),
        plan,
        "deterministic"
    );
}

#[test]
fn jailer_argv_carries_identity_namespace_and_limits() {
    let spec = workload(1500, 256);
    let plan = firecracker::plan(&spec, "tap0", "kiln-abc", 3, &jail());
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
            (256 + firecracker::VMM_OVERHEAD_MIB) * 1024 * 1024
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
