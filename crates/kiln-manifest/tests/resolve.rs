//! What a valid manifest resolves to: defaults, process groups, the stored JSON (including the
//! shape older releases stored), the examples under examples/, the `kiln init` template and the
//! committed JSON Schema.

use std::path::{Path, PathBuf};

use kiln_manifest::{
    defaults, json_schema_text, parse, to_toml, InitOptions, Manifest, MaxUnavailable, Process,
    RestartPolicy, Scale, Strategy, Style,
};
use kiln_types::workload::{CheckKind, CheckSpec, Concurrency, CpuKind};
use kiln_types::{MiB, ServiceProtocol};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn a_minimal_manifest_gets_every_default() {
    let m = parse("kiln.toml", "app = \"demo\"\n").unwrap();
    assert_eq!(m.app.as_str(), "demo");
    assert_eq!(m.image, None);
    assert_eq!(m.primary_region, defaults::PRIMARY_REGION);
    assert_eq!(m.regions, vec![defaults::PRIMARY_REGION.to_owned()]);
    assert_eq!(m.vm.cpus, defaults::CPUS);
    assert_eq!(m.vm.cpu_kind, CpuKind::Shared);
    assert_eq!(m.vm.memory, MiB(defaults::MEMORY_MIB));
    assert_eq!(
        m.processes,
        vec![Process {
            name: "app".into(),
            entrypoint: None,
            command: None,
            scale: Scale::fixed(defaults::COUNT),
            services: vec![],
        }]
    );
    assert!(m.mounts.is_empty() && m.metrics.is_none() && !m.secrets.export_env);
    assert_eq!(m.deploy.strategy, Strategy::Rolling);
    assert_eq!(m.deploy.max_unavailable, MaxUnavailable::Count(1));
    assert_eq!(m.deploy.health_timeout_ms, defaults::HEALTH_TIMEOUT_MS);
    assert!(m.deploy.auto_rollback && m.deploy.release_command.is_none());
    assert_eq!(m.restart.policy, RestartPolicy::OnFailure);
    assert_eq!(m.restart.max_retries, defaults::MAX_RETRIES);
    assert_eq!(m.stop_signal, defaults::STOP_SIGNAL);
    assert_eq!(m.stop_timeout_ms, defaults::STOP_TIMEOUT_MS);
    assert_eq!(m.total_count(), 1);
}

#[test]
fn a_service_without_checks_gets_the_default_tcp_check() {
    let m = parse(
        "kiln.toml",
        "app = \"x\"\n[[services]]\nprotocol = \"tls\"\ninternal_port = 8443\n[[services.checks]]\nkind = \"http\"\n",
    )
    .unwrap();
    let s = &m.processes[0].services[0];
    assert_eq!(s.concurrency, Concurrency::default());
    assert_eq!(
        s.checks,
        vec![CheckSpec {
            kind: CheckKind::Http {
                path: "/".into(),
                tls: true
            },
            ..CheckSpec::default_tcp()
        }]
    );
    let m = parse(
        "kiln.toml",
        "app = \"x\"\n[[services]]\nprotocol = \"tcp\"\ninternal_port = 5432\n",
    )
    .unwrap();
    assert_eq!(
        m.processes[0].services[0].checks,
        vec![CheckSpec::default_tcp()]
    );
}

#[test]
fn process_groups_inherit_entrypoint_and_scale() {
    let m = parse(
        "kiln.toml",
        r#"app = "x"
entrypoint = ["/bin/tini", "--"]
regions = ["local", "fra"]
[scale]
count = 3
[processes.worker]
command = "run --queue 'a b'"
[processes.web]
command = ["serve"]
[processes.web.scale]
count = 2
[[processes.web.services]]
protocol = "tls"
internal_port = 8443
[[mounts]]
volume = "cache"
path = "/cache/"
"#,
    )
    .unwrap();
    let names: Vec<&str> = m.processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["web", "worker"], "sorted by name");
    let worker = m.process("worker").unwrap();
    assert_eq!(
        worker.command.as_deref().unwrap(),
        ["run", "--queue", "a b"]
    );
    assert_eq!(worker.entrypoint.as_deref().unwrap(), ["/bin/tini", "--"]);
    assert_eq!(
        worker.scale,
        Scale::fixed(3),
        "inherits the top-level [scale]"
    );
    assert_eq!(m.process("web").unwrap().scale, Scale::fixed(2));
    assert!(worker.services.is_empty());
    // Count is per region.
    assert_eq!(m.desired_count(m.process("web").unwrap()), 4);
    assert_eq!(m.total_count(), 10);
    // A mount without `processes` goes to every group; the path loses its trailing slash.
    assert_eq!(m.mounts[0].processes, ["web", "worker"]);
    assert_eq!(m.mount_specs("worker")[0].path, "/cache");
    assert_eq!(m.mount_specs("web")[0].initial_size, MiB(1024));
}

#[test]
fn service_specs_carry_checks_and_limits() {
    let m = parse(
        "kiln.toml",
        "app = \"x\"\n[[services]]\nprotocol = \"tcp\"\ninternal_port = 5432\nports = [15432]\n[services.concurrency]\nhard_limit = 300\n[[services.checks]]\nkind = \"exec\"\ncommand = \"pg_isready -q\"\ngrace_period = \"0s\"\n",
    )
    .unwrap();
    let spec = m.processes[0].services[0].to_spec();
    assert_eq!(spec.protocol, ServiceProtocol::Tcp);
    assert_eq!(spec.ports, [15432]);
    assert_eq!(spec.concurrency.hard_limit, 300);
    assert_eq!(spec.concurrency.soft_limit, defaults::SOFT_LIMIT);
    assert_eq!(
        spec.checks[0].kind,
        CheckKind::Exec {
            command: vec!["pg_isready".into(), "-q".into()]
        }
    );
    assert_eq!(spec.checks[0].grace_period_ms, 0);
}

/// The manifest JSON the walking skeleton stored in `release_created` events (top-level
/// `services` and `scale`, no process groups): still readable, meaning one group `app`.
const SKELETON_JSON: &str = r#"{
  "app": "hello-tls",
  "image": null,
  "primary_region": "local",
  "env": { "PROXY_PROTOCOL": "v2" },
  "services": [
    { "protocol": "tls", "internal_port": 8443, "proxy_protocol": true, "hostnames": [] }
  ],
  "vm": { "cpus": 1, "memory": 128 },
  "scale": { "count": 2 },
  "deploy": { "health_timeout_ms": 60000 },
  "stop_signal": "SIGTERM",
  "stop_timeout_ms": 5000
}"#;

#[test]
fn manifests_stored_by_older_releases_are_still_read() {
    let old: Manifest = serde_json::from_str(SKELETON_JSON).expect("skeleton JSON reads");
    let now = parse(
        "kiln.toml",
        r#"app = "hello-tls"
[env]
PROXY_PROTOCOL = "v2"
[[services]]
protocol = "tls"
internal_port = 8443
proxy_protocol = true
[vm]
memory_mib = 128
[scale]
count = 2
"#,
    )
    .unwrap();
    assert_eq!(
        old, now,
        "the stored form means what the same kiln.toml means today"
    );
    // And the current form round-trips through JSON.
    let json = serde_json::to_value(&now).unwrap();
    assert_eq!(serde_json::from_value::<Manifest>(json).unwrap(), now);
}

fn example_manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
                walk(&p, out);
            } else if p.file_name().is_some_and(|n| n == "kiln.toml") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join("examples"), &mut out);
    out.sort();
    out
}

#[test]
fn every_example_is_valid_and_prints_back_to_itself() {
    let examples = example_manifests();
    assert!(
        examples.len() >= 3 && examples.iter().any(|p| p.ends_with("hello-tls/kiln.toml")),
        "{examples:?}"
    );
    for path in examples {
        let src = std::fs::read_to_string(&path).unwrap();
        let name = path.display().to_string();
        let m = parse(&name, &src).unwrap_or_else(|e| panic!("{}", e.report()));
        for style in [Style::Resolved, Style::Minimal] {
            let printed = to_toml(&m, style);
            let back = parse("printed.toml", &printed)
                .unwrap_or_else(|e| panic!("{name} printed {style:?}:\n{printed}\n{}", e.report()));
            assert_eq!(back, m, "{name} printed {style:?}:\n{printed}");
        }
    }
}

#[test]
fn the_committed_json_schema_is_current() {
    let path = root().join("docs/specs/manifest/kiln.schema.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != json_schema_text() {
        panic!(
            "{} differs from the schema the code declares; regenerate it with \
             `cargo run -q -p kiln-cli --bin kiln -- config schema > docs/specs/manifest/kiln.schema.json`",
            path.display()
        );
    }
}

#[test]
fn the_json_schema_lists_every_key_of_a_full_manifest() {
    // Walk the multi-process example (the TOML) next to the schema: each key must be a property
    // of the schema object at that place.
    let schema: serde_json::Value = serde_json::from_str(&json_schema_text()).unwrap();
    let resolve = |v: &serde_json::Value| -> serde_json::Value {
        let v = v.get("allOf").and_then(|a| a.get(0)).unwrap_or(v);
        match v.get("$ref").and_then(|r| r.as_str()) {
            Some(r) => schema["$defs"][r.trim_start_matches("#/$defs/")].clone(),
            None => v.clone(),
        }
    };
    fn walk(
        t: &toml::Table,
        s: &serde_json::Value,
        path: &str,
        resolve: &dyn Fn(&serde_json::Value) -> serde_json::Value,
        seen: &mut usize,
    ) {
        for (k, v) in t {
            let prop = if s.get("properties").is_some() {
                s["properties"].get(k).cloned()
            } else {
                s.get("additionalProperties").cloned()
            };
            let Some(prop) = prop else {
                panic!("`{path}{k}` is not in the JSON Schema");
            };
            *seen += 1;
            let prop = resolve(&prop);
            match v {
                toml::Value::Table(sub) => walk(sub, &prop, &format!("{path}{k}."), resolve, seen),
                toml::Value::Array(items) => {
                    for item in items {
                        if let toml::Value::Table(sub) = item {
                            walk(
                                sub,
                                &resolve(&prop["items"]),
                                &format!("{path}{k}[]."),
                                resolve,
                                seen,
                            );
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut seen = 0;
    for example in [
        "examples/multi-process/kiln.toml",
        "examples/tcp-database/kiln.toml",
    ] {
        let m = parse("x", &std::fs::read_to_string(root().join(example)).unwrap()).unwrap();
        let full: toml::Table = toml::from_str(&to_toml(&m, Style::Resolved)).unwrap();
        walk(&full, &schema, "", &resolve, &mut seen);
    }
    assert!(seen > 60, "only {seen} keys walked");
}

fn init_options(protocol: ServiceProtocol) -> InitOptions {
    InitOptions {
        app: "my-app".parse().unwrap(),
        image: "registry.example.com/team/my-app:v1".into(),
        protocol,
        internal_port: 8080,
    }
}

#[test]
fn the_init_template_is_a_valid_manifest_of_defaults() {
    for protocol in [ServiceProtocol::Tls, ServiceProtocol::Tcp] {
        let text = kiln_manifest::init_template(&init_options(protocol));
        let m = parse("kiln.toml", &text).unwrap_or_else(|e| panic!("{}\n{text}", e.report()));
        assert_eq!(m.app.as_str(), "my-app");
        assert_eq!(
            m.image.as_deref(),
            Some("registry.example.com/team/my-app:v1")
        );
        let s = &m.processes[0].services[0];
        assert_eq!((s.protocol, s.internal_port), (protocol, 8080));
        if protocol == ServiceProtocol::Tcp {
            assert_eq!(s.ports, [8080]);
        }
        // Apart from what init was told, it is all defaults.
        let mut bare = m.clone();
        bare.image = None;
        bare.processes[0].services.clear();
        assert_eq!(bare, parse("kiln.toml", "app = \"my-app\"\n").unwrap());
    }
}

#[test]
fn each_commented_section_of_the_init_template_is_valid_when_uncommented() {
    let text = kiln_manifest::init_template(&init_options(ServiceProtocol::Tls));
    let lines: Vec<&str> = text.lines().collect();
    let starts: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with(kiln_manifest::SECTION_MARK))
        .map(|(i, _)| i)
        .collect();
    assert!(starts.len() >= 7, "{starts:?}");
    for start in starts {
        let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        let mut i = start + 1;
        while i < out.len() && !out[i].trim().is_empty() {
            out[i] = out[i].strip_prefix("# ").unwrap_or(&out[i]).to_owned();
            i += 1;
        }
        let src = out.join("\n");
        parse("kiln.toml", &src)
            .unwrap_or_else(|e| panic!("section {:?}:\n{}", lines[start], e.report()));
    }
}

#[test]
fn app_names_from_images() {
    let name = |i: &str| kiln_manifest::app_name_from_image(i).map(|a| a.to_string());
    assert_eq!(
        name("127.0.0.1:5000/hello-tls:v1").as_deref(),
        Some("hello-tls")
    );
    assert_eq!(
        name("docker.io/library/My_App@sha256:abc").as_deref(),
        Some("my-app")
    );
    assert_eq!(name("team/2fast:latest").as_deref(), Some("fast"));
    assert_eq!(name("app2").as_deref(), Some("app2"));
    assert_eq!(name("123:v1"), None);
}

#[test]
fn the_schema_doc_has_a_row_with_the_default_for_every_key() {
    let doc =
        std::fs::read_to_string(root().join("docs/specs/manifest/manifest-schema.md")).unwrap();
    let rows: Vec<Vec<String>> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect();
    let schema: serde_json::Value = serde_json::from_str(&json_schema_text()).unwrap();
    let mut visited: Vec<String> = Vec::new();
    let mut problems = Vec::new();
    let mut checked = 0;
    fn def_of(v: &serde_json::Value) -> Option<String> {
        let v = v.get("allOf").and_then(|a| a.get(0)).unwrap_or(v);
        v.get("$ref")?
            .as_str()?
            .strip_prefix("#/$defs/")
            .map(str::to_owned)
    }
    let mut stack: Vec<(String, serde_json::Value)> = vec![(String::new(), schema.clone())];
    while let Some((prefix, obj)) = stack.pop() {
        for (key, prop) in obj["properties"].as_object().unwrap() {
            let path = format!("{prefix}{key}");
            checked += 1;
            let Some(row) = rows.iter().find(|r| r[0] == format!("`{path}`")) else {
                problems.push(format!("no row for `{path}`"));
                continue;
            };
            if let Some(d) = prop.get("default") {
                let shown = match d {
                    serde_json::Value::String(s) => format!("`\"{s}\"`"),
                    other => format!("`{other}`"),
                };
                if !row[2].contains(&shown) {
                    problems.push(format!(
                        "row of `{path}` must show the default {shown}: {row:?}"
                    ));
                }
            }
            let (child, sep) = if let Some(d) = def_of(prop) {
                (Some(d), ".")
            } else if let Some(d) = prop.get("items").and_then(def_of) {
                (Some(d), "[].")
            } else if let Some(d) = prop.get("additionalProperties").and_then(def_of) {
                (Some(d), ".<name>.")
            } else {
                (None, "")
            };
            if let Some(d) = child {
                if !visited.contains(&d) {
                    visited.push(d.clone());
                    stack.push((format!("{path}{sep}"), schema["$defs"][&d].clone()));
                }
            }
        }
    }
    assert!(checked > 50, "{checked}");
    assert!(
        problems.is_empty(),
        "docs/specs/manifest/manifest-schema.md:\n{}",
        problems.join("\n")
    );
}
