//! Golden files of the WorkloadSpec, one per version (`tests/golden/workload-spec-<v>.json`).
//!
//! They pin the wire format: the current version's file must round-trip byte for byte through
//! this build's types (a changed field shows up here first), every older file must still be read
//! and mean what it meant, and an agent of the previous minor version (its types frozen below)
//! must read what this build writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kiln_types::workload::{
    capability, BootSpec, CheckKind, CheckSpec, Concurrency, CpuKind, RootfsKind, SecretsSpec,
    SpecError,
};
use kiln_types::{WorkloadSpec, WORKLOAD_SPEC_VERSION};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn golden(version: &str) -> String {
    let path = golden_dir().join(format!("workload-spec-{version}.json"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every golden file, by version.
fn all_golden() -> BTreeMap<String, String> {
    std::fs::read_dir(golden_dir())
        .expect("tests/golden")
        .map(|e| e.expect("entry").path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_owned();
            let v = name
                .strip_prefix("workload-spec-")?
                .strip_suffix(".json")?
                .to_owned();
            Some((v, std::fs::read_to_string(&p).ok()?))
        })
        .collect()
}

#[test]
fn the_current_version_has_a_golden_file_that_round_trips_exactly() {
    let text = golden(WORKLOAD_SPEC_VERSION);
    let spec: WorkloadSpec = serde_json::from_str(&text).expect("current golden parses");
    assert_eq!(spec.spec_version, WORKLOAD_SPEC_VERSION);
    let again = serde_json::to_string_pretty(&spec).expect("serialize");
    assert_eq!(
        again.trim_end(),
        text.trim_end(),
        "the WorkloadSpec no longer serializes to tests/golden/workload-spec-{WORKLOAD_SPEC_VERSION}.json: \
         a wire change needs a new minor version (or major, if it is not additive), a new golden \
         file, and docs/specs/workload-spec.md updated"
    );
    // The writer names in `requires` exactly what the content needs.
    assert_eq!(spec.requires, spec.required_capabilities());
}

#[test]
fn every_golden_file_is_read_by_this_build() {
    let files = all_golden();
    assert!(
        files.len() >= 2,
        "expected golden files for 1.0 and 1.1: {:?}",
        files.keys()
    );
    for (version, text) in files {
        let spec: WorkloadSpec = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("golden {version} does not parse: {e}"));
        assert_eq!(spec.spec_version, version);
        assert!(spec.check_version().is_ok(), "{version}");
    }
}

#[test]
fn a_1_0_spec_keeps_its_meaning() {
    let spec: WorkloadSpec = serde_json::from_str(&golden("1.0")).unwrap();
    // 1.0 had no checks: every service was checked by a TCP connect. Absent fields mean exactly
    // that, and nothing that needs a capability.
    assert_eq!(spec.services[0].checks, vec![CheckSpec::default_tcp()]);
    assert_eq!(spec.services[0].concurrency, Concurrency::default());
    assert!(spec.services[0].ports.is_empty());
    assert_eq!(spec.vm.cpu_kind, CpuKind::Shared);
    assert_eq!(spec.boot, BootSpec::default());
    assert_eq!(spec.boot.rootfs, RootfsKind::Auto);
    assert_eq!(spec.secrets, SecretsSpec::default());
    assert!(spec.mounts.is_empty() && spec.metrics.is_none() && spec.requires.is_empty());
    assert!(spec.check_runnable(&[]).is_ok());
}

#[test]
fn a_1_1_spec_needs_its_capabilities() {
    let spec: WorkloadSpec = serde_json::from_str(&golden("1.1")).unwrap();
    let Err(SpecError::MissingCapabilities { missing, .. }) = spec.check_runnable(&[]) else {
        panic!("a spec with mounts, secrets and http/exec checks must not run on a bare agent");
    };
    assert_eq!(missing, ["check.exec", "check.http", "mounts", "secrets"]);
    assert!(spec.check_runnable(capability::ALL).is_ok());
    assert!(matches!(
        spec.services[1].checks[0].kind,
        CheckKind::Exec { .. }
    ));
}

#[test]
fn a_spec_from_one_minor_newer_is_read_and_judged_by_requires() {
    let mut v: serde_json::Value = serde_json::from_str(&golden(WORKLOAD_SPEC_VERSION)).unwrap();
    let (major, minor) = WORKLOAD_SPEC_VERSION.split_once('.').unwrap();
    v["spec_version"] = format!("{major}.{}", minor.parse::<u32>().unwrap() + 1).into();
    v["a_field_from_the_future"] = serde_json::json!({ "anything": [1, 2, 3] });
    v["services"][0]["another_new_field"] = true.into();
    let spec: WorkloadSpec = serde_json::from_value(v.clone()).expect("newer minor is readable");
    assert!(spec.check_runnable(capability::ALL).is_ok());
    // If the newer writer says the new field matters, this agent refuses rather than ignore it.
    v["requires"]
        .as_array_mut()
        .unwrap()
        .push("future.thing".into());
    let spec: WorkloadSpec = serde_json::from_value(v).unwrap();
    let err = spec.check_runnable(capability::ALL).unwrap_err();
    assert!(err.to_string().contains("future.thing"), "{err}");
}

/// The 1.0 types as the walking skeleton's agent had them: an agent one minor version older.
mod v1_0 {
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize)]
    pub struct WorkloadSpec {
        pub spec_version: String,
        pub instance_id: String,
        pub process: String,
        pub image: ImageRef,
        #[serde(default)]
        pub entrypoint: Option<Vec<String>>,
        #[serde(default)]
        pub command: Option<Vec<String>>,
        #[serde(default)]
        pub env: BTreeMap<String, String>,
        pub vm: VmSpec,
        #[serde(default)]
        pub services: Vec<ServiceSpec>,
        pub stop: StopSpec,
    }
    #[derive(Debug, Deserialize)]
    pub struct ImageRef {
        pub digest: String,
    }
    #[derive(Debug, Deserialize)]
    pub struct VmSpec {
        pub cpu: u32,
        pub memory: u64,
    }
    #[derive(Debug, Deserialize)]
    pub struct ServiceSpec {
        pub internal_port: u16,
        #[serde(default)]
        pub hostnames: Vec<String>,
    }
    #[derive(Debug, Deserialize)]
    pub struct StopSpec {
        pub signal: String,
        pub timeout_ms: u64,
    }
}

#[test]
fn an_agent_one_minor_older_reads_what_this_build_writes() {
    let text = golden(WORKLOAD_SPEC_VERSION);
    let old: v1_0::WorkloadSpec = serde_json::from_str(&text).expect("1.0 types read 1.1");
    assert_eq!(old.spec_version, WORKLOAD_SPEC_VERSION);
    assert_eq!(old.vm.cpu, 2000);
    assert_eq!(old.vm.memory, 512);
    assert_eq!(old.services[0].internal_port, 8443);
    assert_eq!(old.services[0].hostnames, ["hello.example.com"]);
    assert_eq!(
        (old.stop.signal.as_str(), old.stop.timeout_ms),
        ("SIGINT", 30_000)
    );
    assert_eq!(
        old.command.as_deref(),
        Some(&["--port".into(), "8443".into()][..])
    );
    assert!(old.entrypoint.is_some() && !old.env.is_empty() && old.process == "web");
    assert!(old.image.digest.starts_with("sha256:") && old.instance_id.starts_with("ins_"));
}

#[test]
fn requires_is_a_sorted_set_on_the_wire() {
    let mut spec: WorkloadSpec = serde_json::from_str(&golden("1.0")).unwrap();
    spec.requires = BTreeSet::from(["mounts".to_owned(), "check.http".to_owned()]);
    let v = serde_json::to_value(&spec).unwrap();
    assert_eq!(v["requires"], serde_json::json!(["check.http", "mounts"]));
}

#[test]
fn a_1_2_spec_names_its_volumes_and_a_1_1_agent_refuses_its_read_only_root() {
    let spec: WorkloadSpec = serde_json::from_str(&golden("1.2")).unwrap();
    assert!(spec.read_only_root);
    assert_eq!(
        spec.mounts[0].volume_id.as_ref().map(|v| v.as_str()),
        Some("vol_4k2m9qv8x1ytd0hzr5nw")
    );
    // What a 1.1 agent knew: every capability but the read-only root. It must refuse the spec
    // rather than run the app with a writable root.
    let v1_1: Vec<&str> = capability::ALL
        .iter()
        .copied()
        .filter(|c| *c != capability::ROOT_READ_ONLY)
        .collect();
    let Err(SpecError::MissingCapabilities { missing, .. }) = spec.check_runnable(&v1_1) else {
        panic!("a read-only root must not be ignored");
    };
    assert_eq!(missing, [capability::ROOT_READ_ONLY]);
    // A 1.1 spec reads as a writable root with no volume ids.
    let old: WorkloadSpec = serde_json::from_str(&golden("1.1")).unwrap();
    assert!(!old.read_only_root && old.mounts[0].volume_id.is_none());
}
