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

/// Figures of one image's runs.
struct Figures {
    image_mib: f64,
    cold: Vec<Duration>,
    warm: Vec<Duration>,
    idle_kib: u64,
}

/// Working set of an instance's cgroup (usage minus inactive page cache), as `docker stats` counts.
fn working_set_kib(data: &std::path::Path) -> Result<u64> {
    let id = std::fs::read_dir(data.join("instances"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("a running instance")?;
    let cg = std::path::Path::new("/sys/fs/cgroup/memory/kiln").join(&id);
    let usage: u64 = std::fs::read_to_string(cg.join("memory.usage_in_bytes"))?
        .trim()
        .parse()?;
    let stat = std::fs::read_to_string(cg.join("memory.stat"))?;
    let inactive: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("total_inactive_file "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(usage.saturating_sub(inactive) / 1024)
}

/// Resident memory of the instance's QEMU process (the whole VM: guest RAM it touched + VMM).
fn qemu_rss_kib(data: &std::path::Path) -> Result<u64> {
    let dir = std::fs::read_dir(data.join("instances"))?
        .flatten()
        .next()
        .context("a running instance")?
        .path();
    let pid = std::fs::read_to_string(dir.join("qemu.pid"))?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS of the QEMU process")
}

/// Which driver a run uses: `None` for runc, or the guest kernel for qemu (TCG).
type Driver<'a> = Option<&'a std::path::Path>;

async fn measure(
    bins: &Binaries,
    root: &std::path::Path,
    name: &str,
    image_ref: &str,
    image_mib: f64,
    driver: Driver<'_>,
) -> Result<Figures> {
    const COLD_RUNS: usize = 3;
    const WARM_RUNS: usize = 5;
    let mut f = Figures {
        image_mib,
        cold: Vec::new(),
        warm: Vec::new(),
        idle_kib: 0,
    };
    for run in 0..COLD_RUNS {
        let dir = root.join(format!("{name}-run{run}"));
        std::fs::create_dir_all(&dir)?;
        let data = dir.join("data");
        let result = async {
            let dev = match driver {
                None => DevProcess::start(bins, &data)?,
                Some(kernel) => DevProcess::start_with(
                    bins,
                    &data,
                    &[
                        "--driver",
                        "qemu",
                        "--qemu-accel",
                        "tcg",
                        "--guest-kernel",
                        &kernel.display().to_string(),
                    ],
                )?,
            };
            let cli = Cli::new(bins, &dir);
            connect(&cli, &dev)?;
            f.cold
                .push(timed_deploy(&cli, &dev, image_ref, &format!("cold{run}")).await?);
            if run == 0 {
                for w in 0..WARM_RUNS {
                    f.warm
                        .push(timed_deploy(&cli, &dev, image_ref, &format!("warm{w}")).await?);
                }
                // Let the last deploy's old instance stop and the new one settle, then measure it idle.
                tokio::time::sleep(Duration::from_secs(3)).await;
                f.idle_kib = match driver {
                    None => working_set_kib(&data)?,
                    Some(_) => qemu_rss_kib(&data)?,
                };
            }
            anyhow::Ok(())
        }
        .await;
        cleanup_instances(&data);
        result?;
    }
    Ok(f)
}

pub async fn run() -> Result<()> {
    let bins: Binaries = build_binaries()?;
    let tmp = tempfile::tempdir()?;
    let registry = Registry::start(&tmp.path().join("registry")).await?;
    let hello = crate::build_hello_tls()?;
    let mib = |img: &crate::BuiltImage| {
        img.layers.iter().map(|l| l.blob.len()).sum::<usize>() as f64 / 1048576.0
    };

    let small = crate::hello_tls_image(&hello, "hello")?.build()?;
    let small_ref = format!(
        "{}/bench@{}",
        registry.host(),
        small.push(&registry.host(), "bench", "small").await?
    );
    // About 100 MB of incompressible data in a second layer: what a real app image pulls.
    let mut filler = vec![0u8; 100 * 1024 * 1024];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for chunk in filler.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let large = crate::hello_tls_image(&hello, "hello")?
        .new_layer()
        .file("/data/filler", filler, 0o644)
        .build()?;
    let large_ref = format!(
        "{}/bench@{}",
        registry.host(),
        large.push(&registry.host(), "bench", "large").await?
    );

    let small_f = measure(&bins, tmp.path(), "small", &small_ref, mib(&small), None).await?;
    let large_f = measure(&bins, tmp.path(), "large", &large_ref, mib(&large), None).await?;
    let kernel = crate::dev::guest_kernel()?;
    let vm_f = measure(
        &bins,
        tmp.path(),
        "large-qemu",
        &large_ref,
        mib(&large),
        Some(&kernel),
    )
    .await?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let runs = |v: &[Duration]| v.iter().map(|d| ms(*d).round()).collect::<Vec<_>>();
    println!(
        "deploy benchmark: driver runc, profile {}; cold = empty cache: pull + unpack + start + healthy + routed; warm = cached image, new release to serving",
        if crate::dev::release() { "release" } else { "debug" }
    );
    for (name, f) in [("small", &small_f), ("large", &large_f)] {
        println!(
            "  {name} image {:.1} MiB compressed: cold {:?} ms, warm {:?} ms, idle instance working set {} KiB",
            f.image_mib,
            runs(&f.cold),
            runs(&f.warm),
            f.idle_kib
        );
    }
    println!(
        "  qemu driver (TCG software emulation, no KVM here), large image: cold {:?} ms, warm {:?} ms, idle QEMU process RSS {} KiB",
        runs(&vm_f.cold),
        runs(&vm_f.warm),
        vm_f.idle_kib
    );
    println!("cold_deploy_ms={:.0}", ms(median(small_f.cold.clone())));
    println!("warm_deploy_ms={:.0}", ms(median(small_f.warm.clone())));
    println!(
        "driver=runc image_mib={:.0} cold_deploy_ms={:.0} warm_deploy_ms={:.0} idle_instance_kib={}",
        large_f.image_mib,
        ms(median(large_f.cold)),
        ms(median(large_f.warm)),
        large_f.idle_kib
    );
    println!(
        "driver=qemu accel=tcg image_mib={:.0} cold_deploy_ms={:.0} warm_deploy_ms={:.0} idle_instance_kib={}",
        vm_f.image_mib,
        ms(median(vm_f.cold)),
        ms(median(vm_f.warm)),
        vm_f.idle_kib
    );
    Ok(())
}
