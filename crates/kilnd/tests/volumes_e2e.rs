//! Volumes and the read-only root end to end on one machine: a real registry, the real `kilnd
//! dev` (control plane, agent with runc, edge), the real `kiln` CLI, runc and kiln-init.
//!
//! An app with a `[[mounts]]` volume, running as a non-root user, writes into it; a deploy of a
//! changed image replaces its instance stop-first and the new instance reads the same data back
//! from the same volume; the old instance leaves no mount and no loop device behind; after a
//! `kilnd` restart the adopted instance is replaced the same way. An app with
//! `read_only_root = true` cannot write to `/` but can write to its volume and to `/tmp`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_testkit::dev::{build_binaries, cleanup_instances, Cli, DevProcess};
use kiln_testkit::registry::Registry;

const STATEFUL: &str = r#"app = "stateful"

[[services]]
protocol = "tls"
internal_port = 8443

[[services.checks]]
kind = "tcp"
interval = "2s"

[[mounts]]
volume = "data"
path = "/data"
initial_size = "64mb"

[vm]
memory_mib = 64
"#;

const READ_ONLY: &str = r#"app = "readonly"

[[services]]
protocol = "tls"
internal_port = 8443

[[services.checks]]
kind = "tcp"
interval = "2s"

[[mounts]]
volume = "data"
path = "/var/lib/app"
initial_size = "64mb"

[vm]
memory_mib = 64
read_only_root = true
"#;

struct Cleanup<'a>(&'a Path);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        cleanup_instances(self.0);
    }
}

fn sh(cli: &Cli, app: &str, script: &str) -> std::process::Output {
    cli.run(&["exec", "-a", app, "--", "/bin/busybox", "sh", "-c", script])
}

fn sh_ok(cli: &Cli, app: &str, script: &str) -> Result<String> {
    let out = sh(cli, app, script);
    ensure!(
        out.status.success(),
        "`{script}` in {app}: {:?} {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(cli: &Cli, app: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(
        &cli.ok(&["status", "-a", app, "--json"])?,
    )?)
}

/// Waits until only instances of release `version` are left.
async fn only_version(cli: &Cli, app: &str, version: u64) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(cli, app)?;
        let all = st["instances"].as_array().cloned().unwrap_or_default();
        if !all.is_empty() && all.iter().all(|i| i["release_version"] == version) {
            return Ok(st);
        }
        ensure!(Instant::now() < deadline, "old instances left: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Loop devices backed by `file` (`losetup -j`).
fn loop_devices(file: &Path) -> Result<usize> {
    let out = Command::new("losetup").arg("-j").arg(file).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_keeps_its_data_across_deploys_and_a_read_only_root_stays_read_only() -> Result<()>
{
    let bins = build_binaries()?;
    let tmp = tempfile::tempdir()?;
    let registry = Registry::start(&tmp.path().join("registry")).await?;
    let hello = kiln_testkit::example::build_hello_tls()?;
    let busybox = std::fs::read("/bin/busybox")
        .context("busybox-static is installed by scripts/install-deps")?;
    for (tag, greeting) in [("v1", "hello"), ("v2", "howdy")] {
        let image = kiln_testkit::example::hello_tls_image(&hello, greeting)?
            .file("/bin/busybox", busybox.clone(), 0o755)
            .symlink("/bin/sh", "busybox")
            .user("app")
            .build()?;
        image.push(&registry.host(), "stateful", tag).await?;
        image.push(&registry.host(), "readonly", tag).await?;
    }

    let data = tmp.path().join("data");
    let _cleanup = Cleanup(&data);
    let dev = DevProcess::start(&bins, &data)?;
    let cli = Cli::new(&bins, tmp.path());
    let connect = dev
        .connect
        .clone()
        .context("first start prints the connect command")?;
    let mut full = vec!["context", "add"];
    full.extend(connect.split_whitespace());
    cli.ok(&full)?;

    // The stateful app: the app user (not root) owns the volume's root and writes into it.
    std::fs::write(tmp.path().join("kiln.toml"), STATEFUL)?;
    cli.ok(&["apps", "create", "stateful"])?;
    let image = |app: &str, tag: &str| format!("{}/{app}:{tag}", registry.host());
    let out = cli.ok(&["deploy", "--image", &image("stateful", "v1")])?;
    ensure!(
        out.contains("v1 is healthy"),
        "deploy: {out}\n{}",
        dev.log()
    );
    let who = sh_ok(
        &cli,
        "stateful",
        "busybox id -u; echo written-by-v1 > /data/marks && busybox stat -c %u /data",
    )?;
    let mut ids = who.lines();
    let (uid, owner) = (ids.next().unwrap_or(""), ids.next().unwrap_or(""));
    ensure!(
        uid != "0" && uid == owner,
        "app uid {uid}, volume root owner {owner}"
    );
    let v1 = status(&cli, "stateful")?;
    let v1_id = v1["instances"][0]["id"]
        .as_str()
        .context("v1 instance")?
        .to_owned();
    let volumes: Vec<std::path::PathBuf> = std::fs::read_dir(data.join("volumes"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(volumes.len() == 1, "one volume file: {volumes:?}");
    let volume = volumes[0].clone();
    ensure!(loop_devices(&volume)? == 1, "attached once");

    // A changed image: the instance is replaced stop-first and the new one reads the data.
    let out = cli.ok(&["deploy", "--image", &image("stateful", "v2")])?;
    ensure!(
        out.contains("v2 is healthy"),
        "deploy v2: {out}\n{}",
        dev.log()
    );
    only_version(&cli, "stateful", 2).await?;
    let marks = sh_ok(&cli, "stateful", "cat /data/marks; echo $GREETING")?;
    ensure!(
        marks == "written-by-v1\nhowdy\n",
        "the new instance reads the old one's data: {marks:?}"
    );
    // The old instance left nothing: no mount, one loop device (the new instance's).
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(
        !mounts.contains(&v1_id),
        "a mount of {v1_id} left: {mounts}"
    );
    ensure!(!data.join("instances").join(&v1_id).exists(), "state left");
    ensure!(
        loop_devices(&volume)? == 1,
        "one loop device for the volume"
    );

    // A restarted kilnd adopts the instance with its volume, and a later deploy still replaces
    // it stop-first onto the same data (the adopted instance releases the volume on its stop).
    let api_before = dev.api_url.clone();
    dev.stop()?;
    let dev = DevProcess::start(&bins, &data)?;
    let config = std::fs::read_to_string(&cli.config)?;
    std::fs::write(&cli.config, config.replace(&api_before, &dev.api_url))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dev.log().contains("adopted running instance") {
        ensure!(Instant::now() < deadline, "not adopted:\n{}", dev.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = cli.ok(&["deploy", "--image", &image("stateful", "v1")])?;
    ensure!(
        out.contains("v3 is healthy"),
        "deploy v3: {out}\n{}",
        dev.log()
    );
    only_version(&cli, "stateful", 3).await?;
    let marks = sh_ok(&cli, "stateful", "cat /data/marks; echo $GREETING")?;
    ensure!(
        marks == "written-by-v1\nhello\n",
        "after an agent restart and a deploy: {marks:?}"
    );
    ensure!(
        loop_devices(&volume)? == 1,
        "one loop device for the volume"
    );

    // The read-only root: `/` refuses writes, the volume and /tmp take them.
    std::fs::write(tmp.path().join("kiln.toml"), READ_ONLY)?;
    cli.ok(&["apps", "create", "readonly"])?;
    let out = cli.ok(&["deploy", "--image", &image("readonly", "v1")])?;
    ensure!(
        out.contains("v1 is healthy"),
        "deploy readonly: {out}\n{}",
        dev.log()
    );
    let root = sh(&cli, "readonly", "echo x > /probe");
    ensure!(
        !root.status.success()
            && String::from_utf8_lossy(&root.stderr).contains("Read-only file system"),
        "a write to / fails: {:?} {}",
        root.status.code(),
        String::from_utf8_lossy(&root.stderr)
    );
    let ok = sh_ok(
        &cli,
        "readonly",
        "echo kept > /var/lib/app/f && cat /var/lib/app/f && echo t > /tmp/t && cat /tmp/t",
    )?;
    ensure!(ok == "kept\nt\n", "volume and /tmp are writable: {ok:?}");

    // Destroying the app deletes its volume: the file and its loop device go once the instance
    // has stopped.
    cli.ok(&["apps", "destroy", "stateful", "--yes"])?;
    let mut gone = false;
    for _ in 0..300 {
        if !volume.exists() && loop_devices(&volume)? == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    ensure!(gone, "the destroyed app's volume is deleted\n{}", dev.log());

    dev.stop()?;
    Ok(())
}
