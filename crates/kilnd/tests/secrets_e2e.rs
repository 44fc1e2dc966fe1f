//! Secrets end to end on one machine: a real registry, the real `kilnd dev` (which creates its
//! master key file on first start), the real `kiln` CLI, runc and kiln-init. A deployed instance
//! reads `/.kiln/secrets.json` (mode 0400, owned by the app's user, on a tmpfs, also exported as
//! env), and `kiln secrets set` rolls a new release whose instance reads the new version; an app
//! with `[secrets] reload = "signal"` gets the new file in place and a SIGHUP, without a release.
//! No value appears in the CLI's other output, `kiln logs`, or the daemon's log.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_testkit::dev::{build_binaries, cleanup_instances, Cli, DevProcess};
use kiln_testkit::registry::Registry;

const APP: &str = "secrets-demo";
const FIRST: &str = "LEAKCANARY-e2e-first-51c0";
const SECOND: &str = "LEAKCANARY-e2e-second-9ad2";
const DB: &str = "LEAKCANARY-e2e-db-postgres://app:pw@db/x";

const MANIFEST: &str = r#"app = "secrets-demo"

[[services]]
protocol = "tls"
internal_port = 8443

[[services.checks]]
kind = "tcp"
interval = "2s"

[secrets]
export_env = true

[vm]
memory_mib = 128
"#;

struct Cleanup<'a>(&'a std::path::Path);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        cleanup_instances(self.0);
    }
}

/// `kiln exec` of a busybox command line in the app; returns its stdout.
fn exec(cli: &Cli, script: &str) -> Result<String> {
    exec_in(cli, APP, script)
}

fn exec_in(cli: &Cli, app: &str, script: &str) -> Result<String> {
    cli.ok(&["exec", "-a", app, "--", "/bin/busybox", "sh", "-c", script])
}

/// An app that reloads in place: a shell that says which version it sees on every SIGHUP.
const RELOADER: &str = r#"app = "reloader"
entrypoint = ["/bin/busybox", "sh", "/app/reload.sh"]

[secrets]
reload = "signal"

[vm]
memory_mib = 64
"#;

const RELOAD_SH: &str = r#"trap 'echo "reloaded $(busybox head -c 12 /.kiln/secrets.json)"' HUP
echo started
while true; do busybox sleep 1 & wait $!; done
"#;

const THIRD: &str = "LEAKCANARY-e2e-third-77aa";

/// Waits until release `version` is healthy (a rollout by `kiln secrets set`).
async fn wait_healthy(cli: &Cli, version: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&cli.ok(&["status", "-a", APP, "--json"])?)?;
        let state = status["releases"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["version"] == version))
            .map(|r| r["state"].as_str().unwrap_or_default().to_owned());
        match state.as_deref() {
            Some("healthy") => {
                // The old release's instance stops after the new one is healthy: wait for it, so
                // `kiln exec` reaches the new instance.
                let live = status["instances"]
                    .as_array()
                    .map(|is| is.iter().all(|i| i["release_version"] == version))
                    .unwrap_or(false);
                if live {
                    return Ok(());
                }
            }
            Some("failed") => anyhow::bail!("release v{version} failed: {status}"),
            _ => {}
        }
        ensure!(
            Instant::now() < deadline,
            "release v{version} not healthy: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_reads_its_secrets_file_and_gets_new_versions() -> Result<()> {
    let bins = build_binaries()?;
    let tmp = tempfile::tempdir()?;
    let registry = Registry::start(&tmp.path().join("registry")).await?;
    let hello = kiln_testkit::example::build_hello_tls()?;
    let busybox = std::fs::read("/bin/busybox")
        .context("busybox-static is installed by scripts/install-deps")?;
    let image = kiln_testkit::example::hello_tls_image(&hello, "hello")?
        .file("/bin/busybox", busybox, 0o755)
        .symlink("/bin/sh", "busybox")
        .file("/app/reload.sh", RELOAD_SH.as_bytes().to_vec(), 0o755)
        .user("app")
        .build()?;
    image.push(&registry.host(), APP, "v1").await?;

    let data = tmp.path().join("data");
    let _cleanup = Cleanup(&data);
    let dev = DevProcess::start(&bins, &data)?;
    // First start created the master key file, readable by its owner only.
    let key = data.join("master.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key)?.permissions());
    ensure!(mode & 0o777 == 0o600, "master.key mode {mode:o}");

    let cli = Cli::new(&bins, tmp.path());
    let connect = dev
        .connect
        .clone()
        .context("first start prints the connect command")?;
    let mut full = vec!["context", "add"];
    full.extend(connect.split_whitespace());
    cli.ok(&full)?;
    std::fs::write(tmp.path().join("kiln.toml"), MANIFEST)?;
    cli.ok(&["apps", "create", APP])?;

    // Secrets before the first deploy: recorded, nothing to roll. One from stdin.
    let out = cli.ok(&["secrets", "set", &format!("API_KEY={FIRST}")])?;
    ensure!(out.contains("secrets version 1"), "{out}");
    let mut child = Command::new(&cli.bin)
        .args(["secrets", "set", "DATABASE_URL", "--stdin", "--stage"])
        .current_dir(&cli.dir)
        .env("KILN_CONFIG", &cli.config)
        .env_remove("KILN_API_URL")
        .env_remove("KILN_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("stdin")?,
        format!("{DB}\n").as_bytes(),
    )?;
    let staged = child.wait_with_output()?;
    ensure!(staged.status.success(), "secrets set --stdin: {staged:?}");
    let out = String::from_utf8_lossy(&staged.stdout);
    ensure!(
        out.contains("secrets version 2") && out.contains("Staged"),
        "{out}"
    );

    let out = cli.ok(&[
        "deploy",
        "--image",
        &format!("{}/{APP}:v1", registry.host()),
    ])?;
    ensure!(
        out.contains("v1 is healthy"),
        "deploy output: {out}\n{}",
        dev.log()
    );

    // The file: JSON with version, app and values; 0400, the app's uid/gid, on a tmpfs.
    let file = exec(&cli, "cat /.kiln/secrets.json")?;
    let json: serde_json::Value = serde_json::from_str(&file).context(file.clone())?;
    ensure!(json["version"] == 2 && json["app"] == APP, "{json}");
    ensure!(
        json["secrets"]["API_KEY"] == FIRST && json["secrets"]["DATABASE_URL"] == DB,
        "{json}"
    );
    let meta = exec(&cli, "busybox stat -L -c '%a %u %g' /.kiln/secrets.json; busybox stat -f -c %T /.kiln/secrets; id -u")?;
    ensure!(
        meta.split_whitespace().collect::<Vec<_>>() == ["400", "1000", "1000", "tmpfs", "1000"],
        "{meta}"
    );
    // export_env: the app process has them in its environment.
    let env = exec(&cli, "for p in /proc/[0-9]*; do [ \"$(busybox head -c 14 $p/cmdline 2>/dev/null)\" = /app/hello-tls ] && busybox tr '\\0' '\\n' < $p/environ; done | busybox grep ^API_KEY=")?;
    ensure!(env.trim() == format!("API_KEY={FIRST}"), "{env}");

    // A change rolls a new release (same image) whose instance reads the new version.
    let out = cli.ok(&["secrets", "set", &format!("API_KEY={SECOND}")])?;
    ensure!(
        out.contains("secrets version 3") && out.contains("release v2"),
        "{out}"
    );
    wait_healthy(&cli, 2).await?;
    let json: serde_json::Value = serde_json::from_str(&exec(&cli, "cat /.kiln/secrets.json")?)?;
    ensure!(
        json["version"] == 3 && json["secrets"]["API_KEY"] == SECOND,
        "{json}"
    );

    // reload = "signal": the new version reaches the running instance in place, with a SIGHUP,
    // and no release is created.
    std::fs::write(tmp.path().join("reloader.toml"), RELOADER)?;
    cli.ok(&["apps", "create", "reloader"])?;
    cli.ok(&["secrets", "set", "-a", "reloader", "TOKEN=first"])?;
    let out = cli.ok(&[
        "deploy",
        "-a",
        "reloader",
        "-c",
        "reloader.toml",
        "--image",
        &format!("{}/{APP}:v1", registry.host()),
    ])?;
    ensure!(
        out.contains("v1 is healthy"),
        "deploy output: {out}\n{}",
        dev.log()
    );
    let out = cli.ok(&[
        "secrets",
        "set",
        "-a",
        "reloader",
        &format!("TOKEN={THIRD}"),
    ])?;
    ensure!(
        out.contains("secrets version 2") && out.contains("SIGHUP"),
        "{out}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let json: serde_json::Value =
            serde_json::from_str(&exec_in(&cli, "reloader", "cat /.kiln/secrets.json")?)?;
        let logs = cli.ok(&["logs", "-a", "reloader", "-n", "50"])?;
        if json["version"] == 2 && logs.contains(r#"reloaded {"version":2"#) {
            ensure!(json["secrets"]["TOKEN"] == THIRD, "{json}");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no in-place update: {json}\n{logs}\n{}",
            dev.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status: serde_json::Value =
        serde_json::from_str(&cli.ok(&["status", "-a", "reloader", "--json"])?)?;
    ensure!(
        status["releases"].as_array().map(Vec::len) == Some(1),
        "{status}"
    );

    // list and render show names, versions and digests; --reveal shows values.
    let list = cli.ok(&["secrets", "list"])?;
    ensure!(
        list.contains("API_KEY") && list.contains("DATABASE_URL"),
        "{list}"
    );
    let masked = cli.ok(&["secrets", "render"])?;
    ensure!(masked.contains("********"), "{masked}");
    let revealed = cli.ok(&["secrets", "render", "--reveal"])?;
    ensure!(revealed.contains(SECOND), "{revealed}");
    // Errors and their exit codes.
    let bad = cli.run(&["secrets", "set", "bad-name=x"]);
    ensure!(bad.status.code() == Some(2), "{bad:?}");
    let missing = cli.run(&["secrets", "unset", "NOPE"]);
    ensure!(missing.status.code() == Some(4), "{missing:?}");

    // No value anywhere else: CLI output, the app's logs, the daemon's log.
    let logs = cli.ok(&["logs", "-a", APP, "-n", "500"])?;
    for (what, text) in [
        ("list", &list),
        ("render", &masked),
        ("logs", &logs),
        ("kilnd log", &dev.log()),
    ] {
        ensure!(
            !text.contains("LEAKCANARY"),
            "{what} shows a secret value:\n{text}"
        );
    }
    Ok(())
}
