//! The roles as separate processes, as on a fleet: `kilnd control serve`, `kilnd agent` and
//! `kilnd edge --api`, with a host token made by the operator's CLI. Then the control plane
//! crashes: the instance keeps serving through the edge (last route table), an instance that dies
//! meanwhile is reported once the control plane is back, and the reconciler replaces it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_testkit::dev::{build_binaries, cleanup_instances, Cli, Daemon};
use kiln_testkit::registry::Registry;

const MANIFEST: &str = r#"app = "split"

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
memory_mib = 128
"#;

fn curl(edge: &str, host: &str) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "5", "--resolve"])
        .arg(format!(
            "{host}:{}:127.0.0.1",
            edge.rsplit(':').next().unwrap_or("0")
        ))
        .arg(format!(
            "https://{host}:{}/",
            edge.rsplit(':').next().unwrap_or("0")
        ))
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn status(cli: &Cli) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(
        &cli.ok(&["status", "-a", "split", "--json"])?,
    )?)
}

fn live(st: &serde_json::Value) -> Vec<serde_json::Value> {
    st["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i["desired_running"] == true)
        .collect()
}

struct Cleanup<'a>(&'a Path);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        cleanup_instances(self.0);
    }
}

async fn wait_for<F: FnMut() -> Result<bool>>(what: &str, mut f: F) -> Result<()> {
    for _ in 0..600 {
        if f()? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("timed out waiting for {what}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_edge_ride_out_a_control_plane_crash() -> Result<()> {
    let bins = build_binaries()?;
    let tmp = tempfile::tempdir()?;
    let registry = Registry::start(&tmp.path().join("registry")).await?;
    let hello = kiln_testkit::example::build_hello_tls()?;
    let image = kiln_testkit::example::hello_tls_image(&hello, "hello")?.build()?;
    image.push(&registry.host(), "split", "v1").await?;

    let control_dir = tmp.path().join("control");
    let kilnd = bins.kilnd.clone();
    let control_args = |listen: &str| {
        vec![
            "control".to_owned(),
            "serve".into(),
            "--data-dir".into(),
            control_dir.display().to_string(),
            "--api-listen".into(),
            listen.to_owned(),
        ]
    };
    let start_control = |listen: &str| -> Result<Daemon> {
        let args = control_args(listen);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start(
            &kilnd,
            &args,
            "kilnd control: ready",
            &tmp.path().join("control.log"),
        )
    };
    let control = start_control("127.0.0.1:0")?;
    let api_line = control
        .line("kilnd control: API ")
        .context("the API address")?
        .to_owned();
    let api = api_line
        .split_whitespace()
        .next()
        .context("API url")?
        .to_owned();
    let admin = control
        .lines
        .iter()
        .find_map(|l| l.rsplit(": ").next().filter(|t| t.starts_with("kiln_")))
        .context("first start prints the admin token")?
        .to_owned();

    let cli = Cli::new(&bins, tmp.path());
    cli.ok(&["context", "add", "fleet", "--api", &api, "--token", &admin])?;
    let made: serde_json::Value = serde_json::from_str(&cli.ok(&[
        "tokens", "create", "--name", "host-a", "--scope", "host", "--scope", "edge", "--json",
    ])?)?;
    let token_file = tmp.path().join("host-token");
    std::fs::write(
        &token_file,
        made["secret"].as_str().context("the token's secret")?,
    )?;
    let token_file = token_file.display().to_string();

    let agent_dir = tmp.path().join("agent");
    let _cleanup = Cleanup(&agent_dir);
    let agent = Daemon::start(
        &bins.kilnd,
        &[
            "agent",
            "--api",
            &api,
            "--token-file",
            &token_file,
            "--data-dir",
            &agent_dir.display().to_string(),
            "--name",
            "host-a",
            "--init-binary",
            &bins.kiln_init.display().to_string(),
        ],
        "kilnd agent: ready",
        &tmp.path().join("agent.log"),
    )?;
    let edge = Daemon::start(
        &bins.kilnd,
        &[
            "edge",
            "--api",
            &api,
            "--token-file",
            &token_file,
            "--listen",
            "127.0.0.1:0",
        ],
        "kilnd edge: ready",
        &tmp.path().join("edge.log"),
    )?;
    let edge_addr = edge
        .line("kilnd edge: listen ")
        .context("edge address")?
        .to_owned();

    let hosts: serde_json::Value = serde_json::from_str(&cli.ok(&["hosts", "list", "--json"])?)?;
    ensure!(hosts[0]["name"] == "host-a", "{hosts}");

    std::fs::write(tmp.path().join("kiln.toml"), MANIFEST)?;
    cli.ok(&["apps", "create", "split"])?;
    let out = cli.ok(&[
        "deploy",
        "--image",
        &format!("{}/split:v1", registry.host()),
    ])?;
    ensure!(out.contains("v1 is healthy"), "{out}\n{}", agent.log());
    let host = "split.kiln.test";
    let mut body = String::new();
    wait_for("the edge routes the app", || {
        let (code, b) = curl(&edge_addr, host);
        body = b;
        Ok(code == 0)
    })
    .await?;
    ensure!(body.starts_with("hello from split"), "{body}");
    let first = live(&status(&cli)?)[0]["id"]
        .as_str()
        .context("instance id")?
        .to_owned();

    // The control plane crashes. The app keeps serving through the edge's last table.
    control.kill();
    let (code, body) = curl(&edge_addr, host);
    ensure!(
        code == 0 && body.starts_with("hello from split"),
        "{code} {body}"
    );

    // The instance dies while the control plane is away: the agent cannot report it yet.
    let runc = Command::new("runc")
        .arg("--root")
        .arg(agent_dir.join("runc"))
        .args(["kill", &first, "KILL"])
        .status()?;
    ensure!(runc.success(), "runc kill");
    wait_for("the agent to see the instance exit", || {
        Ok(agent
            .log()
            .lines()
            .any(|l| l.contains("instance exited") && l.contains(&first)))
    })
    .await?;

    // Back on the same address: the queued report arrives, the reconciler replaces the instance.
    let port = api.rsplit(':').next().context("port")?.to_owned();
    let _control = start_control(&format!("127.0.0.1:{port}"))?;
    wait_for("a replacement to serve", || {
        let st = status(&cli)?;
        let insts = st["instances"].as_array().cloned().unwrap_or_default();
        let old_failed = insts
            .iter()
            .any(|i| i["id"] == first.as_str() && i["state"] == "failed");
        let new_healthy = live(&st)
            .iter()
            .any(|i| i["id"] != first.as_str() && i["state"] == "healthy");
        Ok(old_failed && new_healthy)
    })
    .await
    .with_context(|| format!("agent log:\n{}", agent.log()))?;
    wait_for("the edge to route the replacement", || {
        let (code, body) = curl(&edge_addr, host);
        Ok(code == 0 && body.starts_with("hello from split"))
    })
    .await?;
    Ok(())
}
