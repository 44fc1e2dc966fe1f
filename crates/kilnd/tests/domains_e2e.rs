//! Custom domains end to end on one machine: a real registry, the real `kilnd dev` (control plane,
//! agent with runc, edge) verifying through a real DNS server (Debian's dnsmasq on 127.0.0.1,
//! given to `kilnd dev --dns-resolver`), the real `kiln` CLI, and curl through the edge by SNI.
//!
//! A domain is refused by the edge while pending, `kiln domains verify` exits 9 while DNS holds the
//! wrong token, then, with the right TXT record, the hostname reaches the app; removed, it is
//! refused again. A wildcard domain serves any one label in front of its base.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_testkit::dev::{build_binaries, cleanup_instances, Cli, DevProcess};
use kiln_testkit::dnsmasq::{free_port, Dnsmasq};
use kiln_testkit::registry::Registry;

const HOST: &str = "custom.example.test";
const CHALLENGE: &str = "_kiln-challenge.custom.example.test";

const MANIFEST: &str = r#"app = "hello-tls"

[[services]]
protocol = "tls"
internal_port = 8443

[[services.checks]]
kind = "tcp"
interval = "2s"

[vm]
memory_mib = 128
"#;

struct Cleanup<'a>(&'a std::path::Path);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        cleanup_instances(self.0);
    }
}

/// `curl` to the edge at `edge` with SNI `host`; (exit code, stdout, stderr).
fn curl(edge: SocketAddr, host: &str) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "10", "--resolve"])
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

/// Polls until `host` is served (`want`) or refused by the edge: the edge follows the route
/// table with a long poll, so a change shows within moments.
async fn wait_routed(edge: SocketAddr, host: &str, want: bool) -> Result<(i32, String, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = curl(edge, host);
        if (r.0 == 0) == want {
            return Ok(r);
        }
        ensure!(
            Instant::now() < deadline,
            "{host}: still {} after 20 s: {r:?}",
            if want { "refused" } else { "served" }
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_domain_reaches_the_app_through_the_edge() -> Result<()> {
    let bins = build_binaries()?;
    let tmp = tempfile::tempdir()?;
    let registry = Registry::start(&tmp.path().join("registry")).await?;
    let hello = kiln_testkit::example::build_hello_tls()?;
    let image = kiln_testkit::example::hello_tls_image(&hello, "hello")?.build()?;
    image.push(&registry.host(), "hello-tls", "v1").await?;

    // The zone, before its owner creates the right record: a stale challenge.
    let dns_addr = free_port()?;
    let dns = Dnsmasq::start_at(dns_addr, &[(CHALLENGE, "kiln-verify=stale")])?;

    let data = tmp.path().join("data");
    let _cleanup = Cleanup(&data);
    let dev = DevProcess::start_with(
        &bins,
        &data,
        &[
            "--api-listen",
            "127.0.0.1:0",
            "--edge-listen",
            "127.0.0.1:0",
            "--dns-resolver",
            &dns_addr.to_string(),
        ],
    )?;
    let cli = Cli::new(&bins, tmp.path());
    let connect = dev
        .connect
        .clone()
        .context("first start prints the connect command")?;
    let mut full = vec!["context", "add"];
    full.extend(connect.split_whitespace());
    cli.ok(&full)?;
    std::fs::write(tmp.path().join("kiln.toml"), MANIFEST)?;
    cli.ok(&["apps", "create", "hello-tls"])?;
    let out = cli.ok(&[
        "deploy",
        "--image",
        &format!("{}/hello-tls:v1", registry.host()),
    ])?;
    ensure!(out.contains("v1 is healthy"), "deploy output: {out}");
    let edge = dev.edge[0];
    let (code, body, err) = curl(edge, "hello-tls.kiln.test");
    ensure!(
        code == 0 && body.starts_with("hello from"),
        "default hostname: {code} {body} {err}"
    );

    // Add: the CLI says which records to create.
    let out = cli.ok(&["domains", "add", HOST])?;
    ensure!(out.contains(CHALLENGE) && out.contains("TXT"), "{out}");
    ensure!(out.contains("CNAME  hello-tls.kiln.test"), "{out}");
    let shown: serde_json::Value =
        serde_json::from_str(&cli.ok(&["domains", "show", HOST, "--json"])?)?;
    ensure!(shown["status"] == "pending", "{shown}");
    let value = shown["challenge"]["value"]
        .as_str()
        .context("challenge value")?
        .to_owned();

    // Pending: the edge refuses the name (TLS alert), though the app is up.
    let (code, body, err) = curl(edge, HOST);
    ensure!(
        code != 0 && body.is_empty(),
        "pending domain served: {code} {body}"
    );
    ensure!(
        err.contains("alert") || err.contains("unrecognized"),
        "{err}"
    );

    // DNS holds a stale token: exit 9, saying what DNS answered.
    let out = cli.run(&["domains", "verify", HOST]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(9),
        "verify with a stale record: {out:?}"
    );
    ensure!(
        stderr.contains("kiln-verify=stale") && stderr.contains("[domain_not_verified]"),
        "{stderr}"
    );
    ensure!(curl(edge, HOST).0 != 0, "refused while unverified");

    // The owner publishes the record; verified, the name reaches the app by its SNI.
    drop(dns);
    let dns = Dnsmasq::start_at(dns_addr, &[(CHALLENGE, &value)])?;
    let out = cli.ok(&["domains", "verify", HOST])?;
    ensure!(out.contains("Verified custom.example.test"), "{out}");
    let (_, body, _) = wait_routed(edge, HOST, true).await?;
    ensure!(
        body.trim() == format!("hello from hello-tls sni={HOST} client=127.0.0.1")
            || body.starts_with(&format!("hello from hello-tls sni={HOST}")),
        "body: {body}\n{}",
        dev.log()
    );
    let list = cli.ok(&["domains", "list"])?;
    ensure!(list.contains(HOST) && list.contains("verified"), "{list}");

    // A wildcard: proven at the base name, it takes any one label in front of it.
    let out = cli.ok(&["domains", "add", "*.wild.example.test", "--json"])?;
    let wild: serde_json::Value = serde_json::from_str(&out)?;
    let wild_value = wild["challenge"]["value"]
        .as_str()
        .context("wildcard challenge")?;
    drop(dns);
    let dns = Dnsmasq::start_at(
        dns_addr,
        &[
            (CHALLENGE, value.as_str()),
            ("_kiln-challenge.wild.example.test", wild_value),
        ],
    )?;
    cli.ok(&["domains", "verify", "*.wild.example.test"])?;
    let (_, body, _) = wait_routed(edge, "any.wild.example.test", true).await?;
    ensure!(
        body.starts_with("hello from hello-tls sni=any.wild.example.test"),
        "{body}"
    );
    ensure!(curl(edge, "a.b.wild.example.test").0 != 0, "one label only");

    // Removed: refused again.
    let out = cli.ok(&["domains", "remove", HOST])?;
    ensure!(out.contains("Removed"), "{out}");
    let (_, _, err) = wait_routed(edge, HOST, false).await?;
    ensure!(
        err.contains("alert") || err.contains("unrecognized"),
        "{err}"
    );
    ensure!(
        curl(edge, "hello-tls.kiln.test").0 == 0,
        "the default hostname still serves"
    );
    let out = cli.run(&["domains", "show", HOST]);
    ensure!(out.status.code() == Some(4), "show after remove: {out:?}");

    drop(dns);
    dev.stop()?;
    Ok(())
}
