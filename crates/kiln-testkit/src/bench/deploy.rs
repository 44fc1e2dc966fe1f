//! `./scripts/bench deploy`: time from `kiln deploy` to the edge serving the new release, with an
//! empty image cache (cold) and with the image cached (warm).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::dev::{build_binaries, cleanup_instances, Binaries, Cli, DevProcess};
use crate::registry::Registry;

fn manifest(greeting: &str) -> String {
    format!(
        "app = \"bench\"\n\n[env]\nPROXY_PROTOCOL = \"v2\"\nGREETING = \"{greeting}\"\n\n[[services]]\nprotocol = \"tls\"\ninternal_port = 8443\nproxy_protocol = true\n\n[vm]\nmemory_mib = 128\n"
    )
}

/// Polls the edge until the answer starts with `greeting`.
async fn wait_serving(edge: std::net::SocketAddr, greeting: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "2", "--resolve"])
            .arg(format!("bench.kiln.test:{}:{}", edge.port(), edge.ip()))
            .arg(format!("https://bench.kiln.test:{}/", edge.port()))
            .output()?;
        if String::from_utf8_lossy(&out.stdout).starts_with(&format!("{greeting} from")) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{greeting} never served");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One timed deploy: from `kiln deploy` to the edge serving the new release.
async fn timed_deploy(
    cli: &Cli,
    dev: &DevProcess,
    image: &str,
    greeting: &str,
) -> Result<Duration> {
    std::fs::write(cli.dir.join("kiln.toml"), manifest(greeting))?;
    let start = Instant::now();
    cli.ok(&["deploy", "--image", image])?;
    wait_serving(dev.edge[0], greeting).await?;
    Ok(start.elapsed())
}

fn connect(cli: &Cli, dev: &DevProcess) -> Result<()> {
    let line = dev
        .connect
        .clone()
        .context("fresh data dir prints the connect command")?;
    let mut args = vec!["context", "add"];
    args.extend(line.split_whitespace());
    cli.ok(&args)?;
    cli.ok(&["apps", "create", "bench"])?;
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub async fn run() -> Result<()> {
    let bins: Binaries = build_binaries()?;
    let tmp = tempfile::tempdir()?;
    let registry = Registry::start(&tmp.path().join("registry")).await?;
    let hello = crate::build_hello_tls()?;
    let image = crate::hello_tls_image(&hello, "hello")?.build()?;
    let digest = image.push(&registry.host(), "bench", "v1").await?;
    let image_ref = format!("{}/bench@{digest}", registry.host());
    let image_mib = image.layers.iter().map(|l| l.blob.len()).sum::<usize>() as f64 / 1048576.0;

    const COLD_RUNS: usize = 3;
    const WARM_RUNS: usize = 5;
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for run in 0..COLD_RUNS {
        let dir = tmp.path().join(format!("run{run}"));
        std::fs::create_dir_all(&dir)?;
        let data = dir.join("data");
        let result = async {
            let dev = DevProcess::start(&bins, &data)?;
            let cli = Cli::new(&bins, &dir);
            connect(&cli, &dev)?;
            cold.push(timed_deploy(&cli, &dev, &image_ref, &format!("cold{run}")).await?);
            if run == 0 {
                for w in 0..WARM_RUNS {
                    warm.push(timed_deploy(&cli, &dev, &image_ref, &format!("warm{w}")).await?);
                }
            }
            anyhow::Ok(())
        }
        .await;
        cleanup_instances(&data);
        result?;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "deploy benchmark: image {image_mib:.1} MiB compressed, driver runc, profile {}",
        if crate::dev::release() {
            "release"
        } else {
            "debug"
        }
    );
    println!(
        "  cold (empty cache: pull + unpack + start + healthy + routed), {COLD_RUNS} runs: {:?} ms",
        cold.iter().map(|d| ms(*d).round()).collect::<Vec<_>>()
    );
    println!(
        "  warm (cached image: new release to serving), {WARM_RUNS} runs: {:?} ms",
        warm.iter().map(|d| ms(*d).round()).collect::<Vec<_>>()
    );
    println!("driver=runc");
    println!("cold_deploy_ms={:.0}", ms(median(cold)));
    println!("warm_deploy_ms={:.0}", ms(median(warm)));
    Ok(())
}
