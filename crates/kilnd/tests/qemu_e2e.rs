//! End to end with the QEMU driver: `kilnd dev --driver qemu` boots each instance as a real
//! microVM (QEMU `microvm`, software emulation here) from an ext4 root built from the OCI image,
//! with kiln-init as PID 1 reading its run configuration from the config disk, a tap device for
//! its network and the guest channel over virtio-serial. The app is reached through the edge with
//! its client address from PROXY v2; logs and exec go through the guest channel; a redeploy stops
//! the VM through kiln-init and leaves no process, tap or file behind. The app has a volume (one
//! more virtio-blk drive, mounted by kiln-init at its path) and a read-only root: the redeployed
//! VM reads what the first one wrote to the volume.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_testkit::dev::{build_binaries, cleanup_instances, guest_kernel, Cli, DevProcess};
use kiln_testkit::registry::Registry;

const MANIFEST: &str = r#"app = "hello-vm"

[env]
PROXY_PROTOCOL = "v2"

[[services]]
protocol = "tls"
internal_port = 8443
proxy_protocol = true

[[services.checks]]
kind = "tcp"
interval = "2s"

[vm]
memory_mib = 256
read_only_root = true

[[mounts]]
volume = "data"
path = "/data"
initial_size = "64mb"

[deploy]
health_timeout = "180s"
"#;

fn curl(edge: std::net::SocketAddr, host: &str) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "20", "--resolve"])
        .arg(format!("{host}:{}:{}", edge.port(), edge.ip()))
        .arg(format!("https://{host}:{}/", edge.port()))
        .output()
        .expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn instance_ids(cli: &Cli) -> Result<Vec<(String, u64)>> {
    let st: serde_json::Value =
        serde_json::from_str(&cli.ok(&["status", "-a", "hello-vm", "--json"])?)?;
    Ok(st["instances"]
        .as_array()
        .context("instances")?
        .iter()
        .filter(|i| i["desired_running"] == true)
        .map(|i| {
            (
                i["id"].as_str().unwrap_or_default().to_owned(),
                i["release_version"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

fn qemu_processes_for(id: &str) -> Result<usize> {
    let out = Command::new("pgrep").args(["-f", id]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

fn leaves_nothing_behind(data: &Path, id: &str) -> Result<()> {
    let suffix = id.trim_start_matches("ins_");
    ensure!(qemu_processes_for(id)? == 0, "QEMU of {id} still runs");
    let links = String::from_utf8(Command::new("ip").args(["-o", "link"]).output()?.stdout)?;
    ensure!(
        !links.contains(&format!("kv{}", &suffix[..13])),
        "tap left: {links}"
    );
    ensure!(
        !data.join("instances").join(id).exists(),
        "state directory left"
    );
    Ok(())
}

struct Cleanup<'a>(&'a Path);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        cleanup_instances(self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_microvm_serves_through_the_edge() -> Result<()> {
    let kernel = guest_kernel()?;
    let bins = build_binaries()?;
    let tmp = tempfile::tempdir()?;
    let registry = Registry::start(&tmp.path().join("registry")).await?;
    let hello = kiln_testkit::example::build_hello_tls()?;
    let busybox = std::fs::read("/bin/busybox")
        .context("busybox-static is installed by scripts/install-deps")?;
    let v1 = kiln_testkit::example::hello_tls_image(&hello, "hello")?
        .file("/bin/busybox", busybox.clone(), 0o755)
        .symlink("/bin/sh", "busybox")
        .build()?;
    v1.push(&registry.host(), "hello-vm", "v1").await?;
    let v2 = kiln_testkit::example::hello_tls_image(&hello, "howdy")?
        .file("/bin/busybox", busybox, 0o755)
        .symlink("/bin/sh", "busybox")
        .build()?;
    v2.push(&registry.host(), "hello-vm", "v2").await?;

    let data = tmp.path().join("data");
    let _cleanup = Cleanup(&data);
    let kernel_arg = kernel.display().to_string();
    let dev = DevProcess::start_with(
        &bins,
        &data,
        &[
            "--api-listen",
            "127.0.0.1:0",
            "--edge-listen",
            "127.0.0.1:0",
            "--driver",
            "qemu",
            "--qemu-accel",
            "tcg",
            "--guest-kernel",
            &kernel_arg,
        ],
    )?;
    let cli = Cli::new(&bins, tmp.path());
    let connect = dev.connect.clone().context("connect command")?;
    let mut full = vec!["context", "add"];
    full.extend(connect.split_whitespace());
    cli.ok(&full)?;
    std::fs::write(tmp.path().join("kiln.toml"), MANIFEST)?;
    cli.ok(&["apps", "create", "hello-vm"])?;

    let started = std::time::Instant::now();
    let out = cli.run(&[
        "deploy",
        "--image",
        &format!("{}/hello-vm:v1", registry.host()),
    ]);
    ensure!(
        out.status.success(),
        "deploy with the qemu driver: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dev.log()
    );
    eprintln!(
        "qemu (tcg) cold deploy to healthy: {} ms",
        started.elapsed().as_millis()
    );
    let ids = instance_ids(&cli)?;
    ensure!(ids.len() == 1, "one instance: {ids:?}");
    let v1_id = ids[0].0.clone();
    ensure!(
        qemu_processes_for(&v1_id)? == 1,
        "the instance is a QEMU process"
    );

    let edge = dev.edge[0];
    let (code, body, err) = curl(edge, "hello-vm.kiln.test");
    ensure!(code == 0, "curl through the edge: {err}\n{}", dev.log());
    ensure!(
        body.trim() == "hello from hello-vm sni=hello-vm.kiln.test client=127.0.0.1",
        "body: {body}"
    );

    // It really is a VM: its kernel was started with kiln-init as init, and it is the guest
    // kernel, not the host's.
    let cmdline = cli.ok(&[
        "exec",
        "-a",
        "hello-vm",
        "--",
        "/bin/busybox",
        "cat",
        "/proc/cmdline",
    ])?;
    ensure!(
        cmdline.contains("init=/.kiln/init") && cmdline.contains("root=/dev/vda"),
        "guest kernel command line: {cmdline}"
    );
    let hostname = cli.ok(&["exec", "-a", "hello-vm", "--", "/bin/busybox", "hostname"])?;
    ensure!(
        hostname.trim() == v1_id.replace('_', "-"),
        "hostname set by kiln-init: {hostname}"
    );
    let out = cli.run(&[
        "exec",
        "-a",
        "hello-vm",
        "--",
        "/bin/sh",
        "-c",
        "echo out; echo err >&2; exit 5",
    ]);
    ensure!(
        out.status.code() == Some(5)
            && String::from_utf8_lossy(&out.stdout) == "out\n"
            && String::from_utf8_lossy(&out.stderr) == "err\n",
        "exec over virtio-serial: {out:?}"
    );
    let out = cli.run(&["exec", "-t", "-a", "hello-vm", "--", "/bin/busybox", "tty"]);
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("/dev/pts/"),
        "a tty inside the VM: {out:?}"
    );

    // The volume is a virtio-blk disk kiln-init mounted at /data; the root is read-only.
    let sh = |script: &str| cli.run(&["exec", "-a", "hello-vm", "--", "/bin/sh", "-c", script]);
    let out = sh("busybox grep ' /data ' /proc/mounts && echo kept-by-v1 > /data/f");
    let mounts = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success() && mounts.starts_with("/dev/vd") && mounts.contains(" ext4 "),
        "the volume is mounted in the guest: {mounts} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sh("echo x > /probe");
    ensure!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "the guest's root is read-only: {out:?}"
    );

    // The app's output reaches `kiln logs` over the guest channel.
    let mut logged = String::new();
    for _ in 0..100 {
        logged = cli.ok(&["logs", "-a", "hello-vm", "-n", "50"])?;
        if logged.contains("client=127.0.0.1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(logged.contains("client=127.0.0.1"), "logs: {logged}");

    // A new release replaces the VM: the old one is stopped through kiln-init and leaves nothing.
    let out = cli.run(&[
        "deploy",
        "--image",
        &format!("{}/hello-vm:v2", registry.host()),
    ]);
    ensure!(
        out.status.success(),
        "second deploy: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dev.log()
    );
    let (code, body, _) = curl(edge, "hello-vm.kiln.test");
    ensure!(
        code == 0 && body.starts_with("howdy from"),
        "v2 serves: {body}"
    );
    let mut gone = false;
    for _ in 0..300 {
        if !data.join("instances").join(&v1_id).exists() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(gone, "v1's VM was torn down\n{}", dev.log());
    let kept = cli.ok(&[
        "exec",
        "-a",
        "hello-vm",
        "--",
        "/bin/busybox",
        "cat",
        "/data/f",
    ])?;
    ensure!(
        kept == "kept-by-v1\n",
        "v2's VM reads v1's volume: {kept:?}"
    );
    leaves_nothing_behind(&data, &v1_id)?;
    ensure!(
        dev.log().contains("instance stopped")
            && !dev
                .log()
                .contains("did not power off after its stop request"),
        "v1 stopped through kiln-init, not killed:\n{}",
        dev.log()
    );

    // A restarted kilnd adopts the running VM (found by its pid file) instead of booting another.
    let v2_id = instance_ids(&cli)?
        .into_iter()
        .find(|(_, v)| *v == 2)
        .context("v2 instance")?
        .0;
    let pidfile = data.join("instances").join(&v2_id).join("qemu.pid");
    let pid_before = std::fs::read_to_string(&pidfile)?;
    let api_before = dev.api_url.clone();
    dev.stop()?;
    let edge_arg = edge.to_string();
    let dev = DevProcess::start_with(
        &bins,
        &data,
        &[
            "--api-listen",
            "127.0.0.1:0",
            "--edge-listen",
            &edge_arg,
            "--driver",
            "qemu",
            "--qemu-accel",
            "tcg",
            "--guest-kernel",
            &kernel_arg,
        ],
    )?;
    let config = std::fs::read_to_string(&cli.config)?;
    std::fs::write(&cli.config, config.replace(&api_before, &dev.api_url))?;
    let mut served = false;
    for _ in 0..100 {
        let (code, body, _) = curl(edge, "hello-vm.kiln.test");
        if code == 0 && body.starts_with("howdy from") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(served, "served after restart\n{}", dev.log());
    ensure!(
        dev.log().contains("adopted running instance"),
        "adopted:\n{}",
        dev.log()
    );
    ensure!(
        std::fs::read_to_string(&pidfile)? == pid_before,
        "the same QEMU process serves"
    );
    // Exec reaches the adopted VM: the agent reconnected to its channel.
    let out = cli.ok(&[
        "exec",
        "-a",
        "hello-vm",
        "--",
        "/bin/busybox",
        "echo",
        "still-here",
    ])?;
    ensure!(out.trim() == "still-here", "exec after restart: {out}");
    Ok(())
}
