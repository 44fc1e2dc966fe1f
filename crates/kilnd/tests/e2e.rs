//! End to end on one machine: a real registry, the real `kilnd dev` (control plane, agent with
//! runc, edge), the real `kiln` CLI, and curl through the edge.
//!
//! One scenario, in order, because instances of one `kilnd dev` share the host's network plan:
//! deploy, reach it through the edge over IPv4 and IPv6 with the client address read from PROXY
//! v2, deploy a changed image, fail on a broken kiln.toml without touching the running release,
//! refuse an unknown SNI, and keep serving the same instance across a `kilnd` restart.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use kiln_testkit::dev::{build_binaries, cleanup_instances, Cli, DevProcess};
use kiln_testkit::registry::Registry;

const MANIFEST: &str = r#"app = "hello-tls"

[env]
PROXY_PROTOCOL = "v2"

[[services]]
protocol = "tls"
internal_port = 8443
proxy_protocol = true

[[services.checks]]
kind = "tcp"
interval = "2s"

[[services.checks]]
kind = "exec"
command = ["/bin/busybox", "true"]
interval = "2s"

[vm]
memory_mib = 128
"#;

/// `curl` through the edge at `edge` for `host`; returns (exit code, stdout, stderr).
fn curl(edge: std::net::SocketAddr, host: &str) -> (i32, String, String) {
    let ip = match edge.ip() {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "10", "--resolve"])
        .arg(format!("{host}:{}:{ip}", edge.port()))
        .arg(format!("https://{host}:{}/", edge.port()))
        .output()
        .expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_json(cli: &Cli) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&cli.ok(&[
        "status",
        "-a",
        "hello-tls",
        "--json",
    ])?)?)
}

/// Checks the host has no trace of instance `id` left.
fn leaves_nothing_behind(data: &Path, id: &str) -> Result<()> {
    let suffix = id.trim_start_matches("ins_");
    let netns = String::from_utf8(Command::new("ip").args(["netns", "list"]).output()?.stdout)?;
    ensure!(!netns.contains(suffix), "network namespace left: {netns}");
    let links = String::from_utf8(Command::new("ip").args(["-o", "link"]).output()?.stdout)?;
    ensure!(
        !links.contains(&format!("kv{}", &suffix[..13])),
        "veth left: {links}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(!mounts.contains(id), "mount left: {mounts}");
    ensure!(
        !data.join("instances").join(id).exists(),
        "state directory left"
    );
    let runc = Command::new("runc")
        .arg("--root")
        .arg(data.join("runc"))
        .args(["state", id])
        .output()?;
    ensure!(!runc.status.success(), "runc still knows the container");
    for controller in ["memory", "cpu", "pids"] {
        let cg = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join("kiln")
            .join(id);
        ensure!(!cg.exists(), "cgroup left: {}", cg.display());
    }
    Ok(())
}

struct Cleanup<'a>(&'a Path);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        cleanup_instances(self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_serve_redeploy_reject_restart() -> Result<()> {
    let bins = build_binaries()?;
    let tmp = tempfile::tempdir()?;
    let registry = Registry::start(&tmp.path().join("registry")).await?;
    let hello = kiln_testkit::example::build_hello_tls()?;
    // busybox (Debian's static build) gives `kiln exec` something to run inside the image.
    let busybox = std::fs::read("/bin/busybox")
        .context("busybox-static is installed by scripts/install-deps")?;
    let v1 = kiln_testkit::example::hello_tls_image(&hello, "hello")?
        .file("/bin/busybox", busybox, 0o755)
        .symlink("/bin/sh", "busybox")
        .build()?;
    let v1_digest = v1.push(&registry.host(), "hello-tls", "v1").await?;
    let v2 = kiln_testkit::example::hello_tls_image(&hello, "howdy")?
        .file("/bin/busybox", std::fs::read("/bin/busybox")?, 0o755)
        .symlink("/bin/sh", "busybox")
        .build()?;
    let v2_digest = v2.push(&registry.host(), "hello-tls", "v2").await?;

    let data = tmp.path().join("data");
    let _cleanup = Cleanup(&data);
    // A zero image-cache budget: every image no instance uses is evicted at once.
    let dev = DevProcess::start_with(
        &bins,
        &data,
        &[
            "--api-listen",
            "127.0.0.1:0",
            "--edge-listen",
            "127.0.0.1:0",
            "--edge-listen",
            "[::1]:0",
            "--image-cache-mib",
            "0",
            "--ipv4-pool",
            "127.0.1.0/30",
        ],
    )?;
    let cli = Cli::new(&bins, tmp.path());
    let connect = dev
        .connect
        .clone()
        .context("first start prints the connect command")?;
    let args: Vec<&str> = connect.split_whitespace().collect();
    ensure!(
        args.iter().any(|a| a.starts_with("kiln_")),
        "admin token has the kiln_ prefix: {connect}"
    );
    let mut full = vec!["context", "add"];
    full.extend(args);
    cli.ok(&full)?;
    std::fs::write(tmp.path().join("kiln.toml"), MANIFEST)?;

    cli.ok(&["apps", "create", "hello-tls"])?;
    let out = cli.ok(&[
        "deploy",
        "--image",
        &format!("{}/hello-tls:v1", registry.host()),
    ])?;
    ensure!(out.contains("v1 is healthy"), "deploy output: {out}");
    ensure!(out.contains(&v1_digest), "deploy pins the digest: {out}");

    let (v4, v6) = (dev.edge[0], dev.edge[1]);
    let (code, body, err) = curl(v4, "hello-tls.kiln.test");
    ensure!(
        code == 0,
        "curl via IPv4 edge failed ({code}): {err}\n{}",
        dev.log()
    );
    ensure!(
        body.trim() == "hello from hello-tls sni=hello-tls.kiln.test client=127.0.0.1",
        "body: {body}"
    );
    let (code, body, err) = curl(v6, "hello-tls.kiln.test");
    ensure!(code == 0, "curl via IPv6 edge failed: {err}");
    ensure!(
        body.trim() == "hello from hello-tls sni=hello-tls.kiln.test client=::1",
        "body: {body}"
    );

    // The IPv4 add-on: a dedicated address routes every connection to it to the app, whatever
    // the SNI, until it is released.
    let out = cli.ok(&["ips", "allocate-v4", "-a", "hello-tls"])?;
    ensure!(out.contains("127.0.1.0"), "allocated from the pool: {out}");
    let dedicated: std::net::SocketAddr = "127.0.1.0:443".parse()?;
    let mut body = String::new();
    for _ in 0..100 {
        let (code, b, _) = curl(dedicated, "anything.example");
        if code == 0 {
            body = b;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    ensure!(
        body.starts_with("hello from hello-tls sni=anything.example"),
        "dedicated IPv4 serves the app by address: {body:?}\n{}",
        dev.log()
    );
    let listed = cli.ok(&["ips", "list", "-a", "hello-tls"])?;
    ensure!(listed.contains("127.0.1.0"), "{listed}");
    cli.ok(&["ips", "release", "127.0.1.0", "-a", "hello-tls"])?;
    let mut refused = false;
    for _ in 0..100 {
        if curl(dedicated, "anything.example").0 != 0 {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    ensure!(refused, "a released address no longer serves");
    let (code, _, _) = curl(v4, "hello-tls.kiln.test");
    ensure!(code == 0, "the shared address still serves");

    // The app's stdout reaches `kiln logs` through kiln-init, the guest channel, the agent's
    // shipper and the control plane's log store.
    let mut logged = String::new();
    for _ in 0..100 {
        logged = cli.ok(&["logs", "-a", "hello-tls", "-n", "50"])?;
        if logged.contains("client=::1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    ensure!(
        logged.contains("client=127.0.0.1") && logged.contains("client=::1"),
        "logs: {logged}"
    );
    ensure!(
        logged.lines().all(|l| l.contains(" ins_")),
        "every line names its instance: {logged}"
    );

    // `kiln exec` runs a command in the instance: separate stdout and stderr, stdin, exit code.
    let out = cli.run(&[
        "exec",
        "-a",
        "hello-tls",
        "--",
        "/bin/sh",
        "-c",
        "echo out-$KILN_APP_NAME; echo err >&2; exit 7",
    ]);
    ensure!(
        out.status.code() == Some(7),
        "exit code of the remote command: {:?} {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "out-hello-tls\n",
        "stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr) == "err\n",
        "stderr: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = Command::new(&cli.bin)
        .args(["exec", "-a", "hello-tls", "--", "/bin/busybox", "wc", "-c"])
        .current_dir(&cli.dir)
        .env("KILN_CONFIG", &cli.config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, &[b'x'; 100_000])?;
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "100000",
        "stdin reached the command: {:?}",
        out
    );
    let out = cli.run(&["exec", "-t", "-a", "hello-tls", "--", "/bin/busybox", "tty"]);
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("/dev/pts/"),
        "a tty was allocated: {:?}",
        out
    );
    // kiln-init configured the network itself and then dropped CAP_NET_ADMIN (bit 12) for good.
    let out = cli.ok(&[
        "exec",
        "-a",
        "hello-tls",
        "--",
        "/bin/busybox",
        "grep",
        "CapBnd",
        "/proc/self/status",
    ])?;
    let bnd =
        u64::from_str_radix(out.split_whitespace().last().unwrap_or(""), 16).context("CapBnd")?;
    ensure!(
        bnd & (1 << 12) == 0 && bnd & (1 << 6) != 0,
        "CapBnd without NET_ADMIN, with SETGID: {out}"
    );
    let out = cli.run(&["exec", "-a", "hello-tls", "--", "/no/such/command"]);
    ensure!(
        out.status.code() == Some(127),
        "a missing command exits 127: {:?}",
        out
    );

    let v1_instance = status_json(&cli)?["instances"][0]["id"]
        .as_str()
        .context("v1 instance")?
        .to_owned();

    // A changed image serves the new answer.
    let out = cli.ok(&[
        "deploy",
        "--image",
        &format!("{}/hello-tls:v2", registry.host()),
    ])?;
    ensure!(out.contains("v2 is healthy"), "{out}");
    let (code, body, _) = curl(v4, "hello-tls.kiln.test");
    ensure!(
        code == 0 && body.starts_with("howdy from hello-tls"),
        "after v2: {body}"
    );
    let st = status_json(&cli)?;
    let live: Vec<&serde_json::Value> = st["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["desired_running"] == true)
        .collect();
    ensure!(
        live.len() == 1 && live[0]["release_version"] == 2,
        "only v2 runs: {st}"
    );

    // The replaced instance leaves nothing behind: no container, mount, namespace, veth, cgroup or file.
    let mut gone = false;
    for _ in 0..100 {
        let st = status_json(&cli)?;
        if !st["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == v1_instance.as_str())
        {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    ensure!(gone, "v1's instance reached stopped");
    leaves_nothing_behind(&data, &v1_instance)?;
    // v1's image is no longer used by any instance: collected; v2's is kept.
    let images = |d: &str| data.join("images").join(d.trim_start_matches("sha256:"));
    ensure!(!images(&v1_digest).exists(), "unused v1 image collected");
    ensure!(
        images(&v2_digest).join("rootfs").exists(),
        "v2 image in use is kept"
    );
    ensure!(
        !data
            .join("blobs/sha256")
            .join(v1_digest.trim_start_matches("sha256:"))
            .exists(),
        "v1 manifest blob collected"
    );

    // A broken kiln.toml fails with line and problem, and v2 keeps serving.
    std::fs::write(
        tmp.path().join("broken.toml"),
        MANIFEST.replace("internal_port", "internal_prot"),
    )?;
    let out = cli.run(&[
        "deploy",
        "-c",
        "broken.toml",
        "--image",
        &format!("{}/hello-tls:v1", registry.host()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(3),
        "exit code {:?}: {stderr}",
        out.status.code()
    );
    ensure!(
        stderr.contains("broken.toml:8:1") && stderr.contains("internal_prot"),
        "{stderr}"
    );
    let (code, body, _) = curl(v4, "hello-tls.kiln.test");
    ensure!(
        code == 0 && body.starts_with("howdy from"),
        "v2 untouched: {body}"
    );
    ensure!(
        status_json(&cli)?["releases"].as_array().unwrap().len() == 2,
        "no release was created"
    );

    // A release whose health check fails does not replace the serving one, and says why.
    std::fs::write(
        tmp.path().join("failing.toml"),
        MANIFEST.replace(
            r#"["/bin/busybox", "true"]"#,
            r#"["/bin/busybox", "false"]"#,
        ) + "\n[deploy]\nhealth_timeout = \"3s\"\n",
    )?;
    let out = cli.run(&[
        "deploy",
        "-c",
        "failing.toml",
        "--image",
        &format!("{}/hello-tls:v1", registry.host()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(6),
        "a failing check fails the deploy: {:?} {stderr}",
        out.status.code()
    );
    ensure!(
        stderr.contains("exec check")
            && stderr.contains("exited with 1")
            && stderr.contains("v2 keeps serving"),
        "{stderr}"
    );
    let (code, body, _) = curl(v4, "hello-tls.kiln.test");
    ensure!(
        code == 0 && body.starts_with("howdy from"),
        "v2 still serves: {body}"
    );

    // An unknown SNI is refused with a TLS alert.
    let (code, body, err) = curl(v4, "nope.kiln.test");
    ensure!(
        code != 0 && body.is_empty(),
        "unknown SNI must be refused: {code} {body}"
    );
    ensure!(
        err.contains("alert") || err.contains("unrecognized"),
        "curl saw a TLS alert: {err}"
    );

    // Restart: state and the running instance survive; the same instance serves again.
    let before = live[0]["id"].clone();
    let edge_args = [
        "--api-listen",
        "127.0.0.1:0",
        "--edge-listen",
        &v4.to_string(),
        "--edge-listen",
        &v6.to_string(),
    ];
    let api_before = dev.api_url.clone();
    dev.stop()?;
    let dev = DevProcess::start_with(&bins, &data, &edge_args)?;
    ensure!(dev.connect.is_none(), "no new admin token on restart");
    // The context points at the old API port; re-point it with the same token.
    let token = std::fs::read_to_string(&cli.config)?;
    std::fs::write(&cli.config, token.replace(&api_before, &dev.api_url))?;
    let mut served = false;
    for _ in 0..100 {
        let (code, body, _) = curl(v4, "hello-tls.kiln.test");
        if code == 0 && body.starts_with("howdy from") {
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    ensure!(served, "served after restart\n{}", dev.log());
    let st = status_json(&cli)?;
    let live: Vec<&serde_json::Value> = st["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["desired_running"] == true)
        .collect();
    ensure!(
        live.len() == 1 && live[0]["id"] == before && live[0]["state"] == "healthy",
        "same instance adopted: {st}"
    );
    ensure!(
        dev.log().contains("adopted running instance"),
        "{}",
        dev.log()
    );

    // Destroying the app stops its instance, which leaves nothing behind, and its hostname is
    // refused by the edge.
    let out = cli.ok(&["apps", "destroy", "hello-tls", "--yes"])?;
    ensure!(out.contains("Destroyed app hello-tls"), "{out}");
    let id = before.as_str().unwrap_or_default().to_owned();
    let mut clean = Err(anyhow::anyhow!("not checked"));
    for _ in 0..200 {
        clean = leaves_nothing_behind(&data, &id);
        if clean.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    clean?;
    let (code, body, _) = curl(v4, "hello-tls.kiln.test");
    ensure!(
        code != 0 && body.is_empty(),
        "a destroyed app is refused: {code} {body}"
    );
    Ok(())
}
