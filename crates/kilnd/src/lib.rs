//! `kilnd`: the Kiln daemon.
//!
//! This crate only wires the roles together: `kilnd dev` runs the control plane, one host agent and
//! one edge in one process on one machine with the embedded SQLite store. The roles themselves live
//! in `kiln-control`, `kiln-agent` and `kiln-edge`, and meet here only through the HTTP API on
//! loopback, exactly as they do across machines.

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use kiln_control::{Control, ControlConfig, Reconciler, Scope};

#[derive(Debug, Parser)]
#[command(name = "kilnd", version, about = "The Kiln daemon")]
pub struct Cli {
    #[command(subcommand)]
    pub role: Role,
}

#[derive(Debug, Subcommand)]
pub enum Role {
    /// Control plane, host agent and edge in one process, with the embedded SQLite store.
    Dev(DevArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// State directory (store, images, instances).
    #[arg(long, default_value = "/var/lib/kiln")]
    pub data_dir: PathBuf,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:4280")]
    pub api_listen: SocketAddr,
    /// Edge listen addresses (repeat for several).
    #[arg(long = "edge-listen", default_values = ["127.0.0.1:8443", "[::1]:8443"])]
    pub edge_listen: Vec<SocketAddr>,
    /// Apps are served at `<app>.<domain>`.
    #[arg(long, default_value = "kiln.test")]
    pub domain: String,
    /// The static kiln-init binary (default: `kiln-init` beside this executable, or in
    /// `../x86_64-unknown-linux-gnu/<profile>/`).
    #[arg(long)]
    pub init_binary: Option<PathBuf>,
    /// The runc binary.
    #[arg(long, default_value = "runc")]
    pub runc: PathBuf,
    /// Registries reached over plain HTTP besides loopback ones (repeat for several).
    #[arg(long = "plain-http-registry")]
    pub plain_http_registries: Vec<String>,
    /// Memory offered to instances, in MiB (default: 3/4 of the machine's).
    #[arg(long)]
    pub memory_mib: Option<u64>,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.role {
        Role::Dev(args) => {
            let dev = start_dev(args).await?;
            tokio::signal::ctrl_c().await.ok();
            tracing::info!("shutting down; instances keep running and are adopted at next start");
            drop(dev);
            Ok(())
        }
    }
}

/// A running `kilnd dev`: the tasks stop when it is dropped (instances keep running).
pub struct Dev {
    pub api: SocketAddr,
    pub bootstrap: Option<kiln_control::Bootstrap>,
    tasks: tokio::task::JoinSet<()>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

fn find_init(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        anyhow::ensure!(p.is_file(), "--init-binary {} does not exist", p.display());
        anyhow::ensure!(is_static_elf(&p), "--init-binary {} is not a static executable", p.display());
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot locate the kilnd executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let profile = dir.file_name().map(|s| s.to_owned()).unwrap_or_default();
    // The static build first: `target/debug/kiln-init` is the host build, dynamically linked,
    // and cannot run in an image without the host's libc.
    let candidates = [
        dir.join("..").join("x86_64-unknown-linux-gnu").join(&profile).join("kiln-init"),
        dir.join("kiln-init"),
    ];
    candidates.iter().find(|p| p.is_file() && is_static_elf(p)).cloned().with_context(|| {
        format!(
            "no static kiln-init found (looked at {}); build it with ./scripts/build-static, \
             or pass --init-binary",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}

/// An ELF64 executable with no PT_INTERP program header needs no dynamic loader.
fn is_static_elf(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(bytes) = std::fs::read(path) else { return false };
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| bytes.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| {
        bytes.get(o..o + 8).map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize)
    };
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..phnum).all(|i| u32_at(phoff + i * phentsize).is_some_and(|t| t != PT_INTERP))
}

fn machine_memory_mib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(4096)
}

/// Reads the host token kept in the data directory, creating it (and its hash in the store) on
/// first start or when the store no longer knows it.
async fn host_token(
    control: &Control,
    org: &kiln_types::OrgId,
    data_dir: &Path,
) -> anyhow::Result<String> {
    let path = data_dir.join("host-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if control.token_is_valid(&t).await? {
            return Ok(t);
        }
    }
    let token = control
        .create_token(org, "dev-host", &[Scope::Host, Scope::Edge])
        .await?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    Ok(token)
}

/// Starts every role of `kilnd dev` and returns once they serve.
pub async fn start_dev(args: DevArgs) -> anyhow::Result<Dev> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data dir {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    let init_binary = find_init(args.init_binary.clone())?;
    let store = kiln_store::Store::open_sqlite(&data_dir.join("kiln.db")).await?;
    let control = Control::new(
        store,
        ControlConfig {
            app_domain: args.domain.clone(),
            plain_http_registries: args.plain_http_registries.clone(),
            ..Default::default()
        },
    )?;
    let bootstrap = control.bootstrap("dev").await?;
    let org = control.first_org().await?.context("store has no org")?;
    let host_token = host_token(&control, &org, &data_dir).await?;

    let mut tasks = tokio::task::JoinSet::new();
    let listener = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("cannot listen on {} (API)", args.api_listen))?;
    let api = listener.local_addr()?;
    let router = control.router();
    tasks.spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "API server stopped");
        }
    });
    tasks.spawn(Reconciler::new(control.clone()).run());

    let api_url = format!("http://{api}");
    let client = kiln_api::Client::new(&api_url, &host_token)?;
    let edge = kiln_edge::Edge::new(kiln_edge::EdgeConfig {
        listen: args.edge_listen.clone(),
        ..Default::default()
    });
    let listeners = edge.bind().await?;
    let edge_addrs: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    tasks.spawn(edge.clone().serve(listeners));
    tasks.spawn(edge.follow(client.clone()));

    let memory = args
        .memory_mib
        .unwrap_or_else(|| machine_memory_mib() * 3 / 4);
    let agent = kiln_agent::Agent::start(
        kiln_agent::AgentConfig {
            data_dir: data_dir.clone(),
            host_name: "dev".into(),
            init_binary,
            runc: args.runc.clone(),
            cpu: kiln_types::MilliCpu::from_cpus(
                std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1),
            ),
            memory: kiln_types::MiB(memory),
            plain_http_registries: args.plain_http_registries.clone(),
            health_interval: Duration::from_secs(2),
        },
        client,
    )
    .await?;
    tasks.spawn(agent.run());

    tracing::info!(api = %api, edge = ?edge_addrs, data_dir = %data_dir.display(), "kilnd dev is serving");
    // Machine-readable lines on stdout: scripts and tests parse them.
    println!("kilnd dev: API {api_url}");
    println!(
        "kilnd dev: edge {}",
        edge_addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(b) = &bootstrap {
        println!(
            "kilnd dev: first start; created org {} and an admin token (shown only now).",
            b.org_id
        );
        println!("Connect the CLI with:");
        println!(
            "  kiln context add dev --api {api_url} --token {}",
            b.admin_token
        );
    }
    println!("kilnd dev: ready (state in {})", data_dir.display());
    Ok(Dev {
        api,
        bootstrap,
        tasks,
    })
}
