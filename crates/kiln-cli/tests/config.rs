//! `kiln init` and `kiln config ...` run as a user runs them: the real binary, in a temp dir.

use std::path::Path;
use std::process::{Command, Output};

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .output()
        .expect("run kiln")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh empty directory for one test, removed when dropped.
struct TempDir(std::path::PathBuf);
impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn tempdir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("kiln-cli-config-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    TempDir(dir)
}

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn init_writes_a_valid_manifest_and_never_overwrites_by_accident() {
    let tmp = tempdir("init");
    let out = kiln(
        tmp.path(),
        &["init", "127.0.0.1:5000/team/hello-tls:v1", "--port", "8443"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let written = std::fs::read_to_string(tmp.path().join("kiln.toml")).unwrap();
    let m = kiln_manifest::parse("kiln.toml", &written).unwrap();
    assert_eq!(m.app.as_str(), "hello-tls");
    assert_eq!(m.processes[0].services[0].internal_port, 8443);
    assert!(
        written.contains("# [[mounts]]"),
        "commented sections are there"
    );

    let again = kiln(tmp.path(), &["init", "x/y:z"]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again.stderr));
    assert!(text(&again.stderr).contains("already exists"));
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("kiln.toml")).unwrap(),
        written
    );

    let forced = kiln(
        tmp.path(),
        &[
            "init",
            "x/db:16",
            "--app",
            "db",
            "--protocol",
            "tcp",
            "--port",
            "5432",
            "--force",
        ],
    );
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    let m = kiln_manifest::parse(
        "kiln.toml",
        &std::fs::read_to_string(tmp.path().join("kiln.toml")).unwrap(),
    )
    .unwrap();
    assert_eq!(m.app.as_str(), "db");
    assert_eq!(m.processes[0].services[0].ports, [5432]);
}

#[test]
fn validate_exits_0_only_for_a_valid_file() {
    let tmp = tempdir("validate");
    std::fs::write(
        tmp.path().join("kiln.toml"),
        "app = \"demo\"\n[[services]]\nprotocol = \"tls\"\ninternal_port = 8443\n",
    )
    .unwrap();
    let ok = kiln(tmp.path(), &["config", "validate"]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("kiln.toml is valid: app demo"));

    std::fs::write(
        tmp.path().join("bad.toml"),
        "app = \"demo\"\n[[services]]\nprotocol = \"tls\"\ninternal_prot = 8443\n[vm]\nmemory_mib = 100\n",
    )
    .unwrap();
    let bad = kiln(tmp.path(), &["config", "validate", "bad.toml"]);
    assert_eq!(bad.status.code(), Some(3));
    let err = text(&bad.stderr);
    assert!(err.contains("bad.toml is invalid (3 problems)"), "{err}");
    assert!(
        err.contains("bad.toml:4:1: unknown key `internal_prot` in `services[0]`; did you mean `internal_port`?"),
        "{err}"
    );
    assert!(err.contains("bad.toml:6:14: `vm.memory_mib`"), "{err}");

    let missing = kiln(tmp.path(), &["config", "validate", "nope.toml"]);
    assert_eq!(missing.status.code(), Some(3));
}

#[test]
fn every_example_validates_with_the_cli() {
    for ex in ["hello-tls", "multi-process", "tcp-database"] {
        let dir = root().join("examples").join(ex);
        let out = kiln(&dir, &["config", "validate"]);
        assert_eq!(out.status.code(), Some(0), "{ex}: {}", text(&out.stderr));
    }
}

#[test]
fn show_resolved_prints_a_manifest_equal_to_the_file() {
    let dir = root().join("examples/multi-process");
    let file = kiln_manifest::parse(
        "kiln.toml",
        &std::fs::read_to_string(dir.join("kiln.toml")).unwrap(),
    )
    .unwrap();
    let out = kiln(&dir, &["config", "show", "--resolved"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("[processes.worker.scale]\ncount = 1\nmin = 1\nmax = 1\n"),
        "{shown}"
    );
    assert_eq!(kiln_manifest::parse("shown.toml", &shown).unwrap(), file);

    let json = kiln(&dir, &["config", "show", "--json"]);
    let m: kiln_manifest::Manifest = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(m, file);

    let raw = kiln(&dir, &["config", "show"]);
    assert_eq!(
        text(&raw.stdout),
        std::fs::read_to_string(dir.join("kiln.toml")).unwrap()
    );
}

#[test]
fn schema_prints_the_committed_json_schema() {
    let tmp = tempdir("schema");
    let out = kiln(tmp.path(), &["config", "schema"]);
    assert!(out.status.success());
    let committed =
        std::fs::read_to_string(root().join("docs/specs/manifest/kiln.schema.json")).unwrap();
    assert_eq!(text(&out.stdout), committed);
    let v: serde_json::Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(v["required"], serde_json::json!(["app"]));
}
