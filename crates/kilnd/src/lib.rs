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
    /// Edge proxy: routes from a static file (`--routes`) or from the control plane (`--api`).
    Edge(EdgeArgs),
    /// Control plane alone (API + reconciler), and operations on its store.
    Control(ControlArgs),
    /// Host agent alone: runs this host's instances for a control plane (`--api`).
    Agent(AgentArgs),
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
    /// Registries reached over plain HTTP besides loopback ones (repeat for several).
    #[arg(long = "plain-http-registry")]
    pub plain_http_registries: Vec<String>,
    /// Addresses handed out as dedicated IPv4s (`kiln ips allocate-v4`), as a block like
    /// 127.0.1.0/28 (loopback addresses work on one machine); without it the add-on is off.
    #[arg(long, value_parser = parse_ipv4_pool)]
    pub ipv4_pool: Option<kiln_types::net::Ipv4Pool>,
    /// The DNS resolver custom domains are verified through (`IP` or `IP:PORT`; default: the
    /// first nameserver of /etc/resolv.conf).
    #[arg(long, value_parser = parse_dns_resolver)]
    pub dns_resolver: Option<SocketAddr>,
    #[command(flatten)]
    pub host: HostArgs,
    /// File of master keys for secrets encryption (default: `DATA_DIR/master.key`, created on
    /// first start; `KILN_MASTER_KEY` is used instead when set and this flag is not).
    #[arg(long)]
    pub master_key_file: Option<PathBuf>,
}

/// What one host's agent runs with: `kilnd dev` and `kilnd agent` share these.
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// The static kiln-init binary (default: `kiln-init` beside this executable, or in
    /// `../x86_64-unknown-linux-gnu/<profile>/`).
    #[arg(long)]
    pub init_binary: Option<PathBuf>,
    /// The runc binary.
    #[arg(long, default_value = "runc")]
    pub runc: PathBuf,
    /// Memory offered to instances, in MiB (default: 3/4 of the machine's).
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Size budget of the image cache in MiB; unused images beyond it are evicted.
    #[arg(long, default_value_t = 10_240)]
    pub image_cache_mib: u64,
    /// The region this host is in (a DNS label); apps place instances in their `regions`.
    #[arg(long, default_value = "local", value_parser = parse_region)]
    pub region: String,
    /// Runtime driver of this host: `runc` (containers), `qemu` (microVMs) or `firecracker`
    /// (microVMs under the jailer; needs hardware KVM, so not on PVM-backed hosts).
    #[arg(long, value_enum, default_value_t = DriverArg::Runc)]
    pub driver: DriverArg,
    /// Guest kernel for the `qemu` and `firecracker` drivers (an uncompressed vmlinux;
    /// `./scripts/build-guest-kernel` builds one).
    #[arg(long, required_if_eq_any([("driver", "qemu"), ("driver", "firecracker")]))]
    pub guest_kernel: Option<PathBuf>,
    /// The QEMU binary for the `qemu` driver.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// QEMU accelerator: `kvm` (hardware) or `tcg` (software emulation).
    #[arg(long, value_enum, default_value_t = AccelArg::Kvm)]
    pub qemu_accel: AccelArg,
    /// The Firecracker binary for the `firecracker` driver.
    #[arg(long, default_value = "/usr/local/bin/firecracker")]
    pub firecracker_bin: PathBuf,
    /// The jailer binary (same Firecracker release).
    #[arg(long, default_value = "/usr/local/bin/jailer")]
    pub jailer_bin: PathBuf,
    /// How Firecracker gets its VM configuration: `config-file` (`--config-file`) or `api`
    /// (requests on its API socket).
    #[arg(long, value_enum, default_value_t = DriverBootArg::ConfigFile)]
    pub driver_boot: DriverBootArg,
    /// Where the jailer builds its chroots (default: `DATA_DIR/jailer`; must be on the data
    /// directory's filesystem).
    #[arg(long)]
    pub chroot_base: Option<PathBuf>,
    /// Bases of the unprivileged uids and gids Firecracker runs as (each VM gets its own, in
    /// the 65 536 ids from the base).
    #[arg(long, default_value_t = 10_000)]
    pub jailer_uid: u32,
    #[arg(long, default_value_t = 10_000)]
    pub jailer_gid: u32,
}

/// The host agent alone, joined to a control plane over its API.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Control plane URL.
    #[arg(long)]
    pub api: String,
    /// File holding the host's token (scopes `host`; `kiln tokens create --scope host`).
    #[arg(long)]
    pub token_file: PathBuf,
    /// State directory (images, instances).
    #[arg(long, default_value = "/var/lib/kiln")]
    pub data_dir: PathBuf,
    /// The name the host registers under (default: the machine's hostname); registering a known
    /// name again is the same host.
    #[arg(long)]
    pub name: Option<String>,
    /// Registries reached over plain HTTP besides loopback ones (repeat for several).
    #[arg(long = "plain-http-registry")]
    pub plain_http_registries: Vec<String>,
    #[command(flatten)]
    pub host: HostArgs,
}

/// Where the master key comes from: the file given, else `KILN_MASTER_KEY`, else (for
/// `kilnd dev` only) a file in the data directory, created on first start.
fn master_key_source(
    file: Option<&Path>,
    dev_data_dir: Option<&Path>,
) -> anyhow::Result<Option<kiln_control::secrets::MasterKeySource>> {
    use kiln_control::secrets::{MasterKeySource, MASTER_KEY_ENV};
    if let Some(f) = file {
        return Ok(Some(MasterKeySource::File(f.to_owned())));
    }
    if let Ok(v) = std::env::var(MASTER_KEY_ENV) {
        return Ok(Some(MasterKeySource::Env(v)));
    }
    let Some(dir) = dev_data_dir else {
        return Ok(None);
    };
    let path = dir.join("master.key");
    if kiln_control::secrets::ensure_key_file(&path)? {
        tracing::warn!(path = %path.display(), "created a master key for secrets; back it up apart from the store: without it no secret can be read");
        println!(
            "kilnd dev: created the secrets master key {} (back it up apart from kiln.db)",
            path.display()
        );
    }
    Ok(Some(MasterKeySource::File(path)))
}

/// The Firecracker driver's settings for `--driver firecracker`, checked before anything starts
/// (binaries, kernel, a KVM that boots stock guests), so a host that cannot run it fails at once
/// with the reason.
fn firecracker_config(
    args: &HostArgs,
    data_dir: &Path,
) -> anyhow::Result<Option<kiln_agent::runtime::firecracker::FirecrackerConfig>> {
    use kiln_agent::runtime::firecracker::{check_host, BootMode, FirecrackerConfig};
    let (DriverArg::Firecracker, Some(kernel)) = (args.driver, &args.guest_kernel) else {
        return Ok(None);
    };
    let config = FirecrackerConfig {
        firecracker: args.firecracker_bin.clone(),
        jailer: args.jailer_bin.clone(),
        kernel: kernel.clone(),
        chroot_base: args
            .chroot_base
            .clone()
            .unwrap_or_else(|| data_dir.join("jailer")),
        uid: args.jailer_uid,
        gid: args.jailer_gid,
        boot: match args.driver_boot {
            DriverBootArg::ConfigFile => BootMode::ConfigFile,
            DriverBootArg::Api => BootMode::Api,
        },
    };
    check_host(&config).context(
        "--driver firecracker cannot run on this host (set --firecracker-bin, --jailer-bin and --guest-kernel)",
    )?;
    Ok(Some(config))
}

/// `--driver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverArg {
    Runc,
    Qemu,
    Firecracker,
}

/// `--driver-boot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverBootArg {
    ConfigFile,
    Api,
}

/// `--qemu-accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelArg {
    Kvm,
    Tcg,
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
        Role::Edge(args) => run_edge(args).await,
        Role::Agent(args) => run_agent(args).await,
        Role::Control(args) => run_control(args).await,
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
        anyhow::ensure!(
            is_static_elf(&p),
            "--init-binary {} is not a static executable",
            p.display()
        );
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot locate the kilnd executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let profile = dir.file_name().map(|s| s.to_owned()).unwrap_or_default();
    // The static build first: `target/debug/kiln-init` is the host build, dynamically linked,
    // and cannot run in an image without the host's libc.
    let candidates = [
        dir.join("..")
            .join("x86_64-unknown-linux-gnu")
            .join(&profile)
            .join("kiln-init"),
        dir.join("kiln-init"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file() && is_static_elf(p))
        .cloned()
        .with_context(|| {
            format!(
                "no static kiln-init found (looked at {}); build it with ./scripts/build-static, \
             or pass --init-binary",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// An ELF64 executable with no PT_INTERP program header needs no dynamic loader.
fn is_static_elf(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize)
    };
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
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

/// The agent's settings from the host flags, checked before anything starts (kiln-init found,
/// the driver's binaries and kernel usable).
fn agent_config(
    host: &HostArgs,
    data_dir: &Path,
    host_name: String,
    plain_http_registries: Vec<String>,
) -> anyhow::Result<kiln_agent::AgentConfig> {
    let firecracker = firecracker_config(host, data_dir)?;
    let init_binary = find_init(host.init_binary.clone())?;
    let memory = host
        .memory_mib
        .unwrap_or_else(|| machine_memory_mib() * 3 / 4);
    Ok(kiln_agent::AgentConfig {
        data_dir: data_dir.to_owned(),
        host_name,
        region: host.region.clone(),
        init_binary,
        runc: host.runc.clone(),
        cpu: kiln_types::MilliCpu::from_cpus(
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
        ),
        memory: kiln_types::MiB(memory),
        plain_http_registries,
        health_interval: Duration::from_secs(2),
        image_cache_bytes: host.image_cache_mib.saturating_mul(1024 * 1024),
        qemu: match (host.driver, &host.guest_kernel) {
            (DriverArg::Qemu, Some(kernel)) => Some(kiln_agent::runtime::qemu::QemuConfig {
                binary: host.qemu.clone(),
                kernel: kernel.clone(),
                accel: match host.qemu_accel {
                    AccelArg::Kvm => kiln_agent::runtime::qemu::Accel::Kvm,
                    AccelArg::Tcg => kiln_agent::runtime::qemu::Accel::Tcg,
                },
            }),
            _ => None,
        },
        firecracker,
    })
}

/// `kilnd agent`: registers with the control plane and runs the host's instances until SIGINT
/// or SIGTERM (instances keep running and are adopted at the next start). While the control
/// plane is unreachable it keeps its instances running and retries, reports included.
async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data dir {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    let name = match args.name.clone() {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("cannot read the hostname; pass --name")?
            .trim()
            .to_owned(),
    };
    let config = agent_config(
        &args.host,
        &data_dir,
        name,
        args.plain_http_registries.clone(),
    )?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("cannot read the token file {}", args.token_file.display()))?;
    let client = kiln_api::Client::new(&args.api, token.trim())?;
    // The control plane may start after the agent: registration is retried.
    let mut delay = Duration::from_millis(200);
    let agent = loop {
        match kiln_agent::Agent::start(config.clone(), client.clone()).await {
            Ok(a) => break a,
            Err(e) if e.is_unreachable() => {
                tracing::warn!(api = %args.api, error = %kiln_types::error_chain(&e), "control plane unreachable; retrying registration");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e.into()),
        }
    };
    println!(
        "kilnd agent: registered with {} (data in {})",
        args.api,
        data_dir.display()
    );
    println!("kilnd agent: ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = agent.run() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("agent stopping; instances keep running and are adopted at next start");
    Ok(())
}

/// Starts every role of `kilnd dev` and returns once they serve.
pub async fn start_dev(args: DevArgs) -> anyhow::Result<Dev> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data dir {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    let agent_config = agent_config(
        &args.host,
        &data_dir,
        "dev".into(),
        args.plain_http_registries.clone(),
    )?;
    let store = kiln_store::Store::open_sqlite(&data_dir.join("kiln.db")).await?;
    let master_key = master_key_source(args.master_key_file.as_deref(), Some(&data_dir))?;
    let control = Control::new(
        store,
        ControlConfig {
            app_domain: args.domain.clone(),
            plain_http_registries: args.plain_http_registries.clone(),
            ipv4_pool: args.ipv4_pool,
            master_key,
            dns_resolver: dns_resolver(args.dns_resolver),
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
    tasks.spawn(kiln_control::run_domain_checks(
        control.clone(),
        kiln_control::CheckSchedule::default(),
    ));

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

    let agent = kiln_agent::Agent::start(agent_config, client).await?;
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
        println!("Or create a user (password on stdin) and sign in as them:");
        println!(
            "  kilnd control users create you@example.com --org dev --role admin --data-dir {}",
            data_dir.display()
        );
        println!("  kiln login --url {api_url}");
    }
    println!("kilnd dev: ready (state in {})", data_dir.display());
    Ok(Dev {
        api,
        bootstrap,
        tasks,
    })
}

#[derive(Debug, Clone, clap::Args)]
pub struct EdgeArgs {
    /// Static route table: JSON as served by `GET /v1/routes`, or TOML (`.toml`). Reloaded on
    /// SIGHUP.
    #[arg(long, conflicts_with = "api", required_unless_present = "api")]
    pub routes: Option<PathBuf>,
    /// Control plane URL whose route table to follow.
    #[arg(long, requires = "token_file")]
    pub api: Option<String>,
    /// File holding the edge's token for `--api`.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Addresses where TLS is routed by SNI (repeat for several).
    #[arg(long = "listen", default_values = ["127.0.0.1:8443", "[::1]:8443"])]
    pub listen: Vec<SocketAddr>,
    /// Listening sockets per address (`SO_REUSEPORT`); the kernel spreads connections over them.
    #[arg(long, default_value_t = 1)]
    pub listeners_per_address: usize,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`); none when absent.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Hostname whose route takes TLS connections without SNI (refused when absent).
    #[arg(long)]
    pub default_hostname: Option<String>,
    /// Open connections per client IPv4 address or IPv6 /64 (0: no limit).
    #[arg(long, default_value_t = 1024)]
    pub max_connections_per_ip: u32,
    /// Seconds a client has to send its ClientHello.
    #[arg(long, default_value_t = 10)]
    pub hello_timeout_secs: u64,
    /// Milliseconds a backend has to accept a connection.
    #[arg(long, default_value_t = 3000)]
    pub connect_timeout_ms: u64,
    /// Seconds without a byte in either direction before a connection is closed.
    #[arg(long, default_value_t = 3600)]
    pub idle_timeout_secs: u64,
    /// Milliseconds between active health checks of each backend (0: no active checks).
    #[arg(long, default_value_t = 2000)]
    pub health_interval_ms: u64,
    /// Passing checks in a row that bring a backend back.
    #[arg(long, default_value_t = 2)]
    pub health_rise: u32,
    /// Failing checks in a row that take a backend out.
    #[arg(long, default_value_t = 3)]
    pub health_fall: u32,
    /// Seconds open connections get to finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout_secs: u64,
}

/// Runs `kilnd edge` until SIGTERM or SIGINT, then drains.
///
/// Restart without dropping connections: start the new `kilnd edge` with the same listen
/// addresses (every listener uses `SO_REUSEPORT`, so both processes accept for a moment), wait
/// for its `ready` line, then send SIGTERM to the old one: it stops accepting, lets its open
/// connections finish (up to `--drain-timeout-secs`) and exits.
pub async fn run_edge(args: EdgeArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};

    let config = kiln_edge::EdgeConfig {
        listen: args.listen.clone(),
        listeners_per_address: args.listeners_per_address,
        hello_timeout: Duration::from_secs(args.hello_timeout_secs),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        default_hostname: args.default_hostname.clone(),
        max_connections_per_ip: args.max_connections_per_ip,
        health: kiln_edge::HealthConfig {
            interval: Duration::from_millis(args.health_interval_ms),
            rise: args.health_rise,
            fall: args.health_fall,
            ..Default::default()
        },
        ..Default::default()
    };
    if kiln_edge::listen::migrate_req_enabled() == Some(false) {
        tracing::warn!(
            "net.ipv4.tcp_migrate_req is 0: connections queued on this edge's listeners when it \
             stops are reset instead of moving to its successor; set it to 1 for restarts without \
             loss"
        );
    }
    let edge = kiln_edge::Edge::new(config);
    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(path) = &args.routes {
        let table = kiln_edge::route_file::load(path)?;
        tracing::info!(routes = table.routes.len(), ports = table.ports.len(), file = %path.display(), "route file loaded");
        edge.set_table(table);
    } else if let (Some(api), Some(token_file)) = (&args.api, &args.token_file) {
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("cannot read token file {}", token_file.display()))?;
        let client = kiln_api::Client::new(api, token.trim())?;
        tasks.spawn(edge.clone().follow(client));
    }
    let listeners = edge.bind().await?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let mut metrics_addr = None;
    if let Some(addr) = args.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (metrics)"))?;
        metrics_addr = Some(l.local_addr()?);
        tasks.spawn(edge.clone().serve_metrics(l));
    }
    let serving = tokio::spawn(edge.clone().serve(listeners));

    let mut unique = addrs.clone();
    unique.dedup();
    tracing::info!(listen = ?unique, metrics = ?metrics_addr, "kilnd edge is serving");
    // Machine-readable lines on stdout: scripts and tests parse them.
    println!(
        "kilnd edge: listen {}",
        unique
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(m) = metrics_addr {
        println!("kilnd edge: metrics http://{m}/metrics");
    }
    println!("kilnd edge: ready (pid {})", std::process::id());

    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hangup.recv() => {
                if let Some(path) = &args.routes {
                    match kiln_edge::route_file::load(path) {
                        Ok(table) => {
                            tracing::info!(routes = table.routes.len(), ports = table.ports.len(), "route file reloaded");
                            edge.set_table(table);
                        }
                        Err(e) => tracing::error!(error = %e, "route file not reloaded; keeping the last table"),
                    }
                }
            }
        }
    }
    let active = edge.active_connections();
    tracing::info!(active, "draining: no longer accepting");
    println!("kilnd edge: draining ({active} connections)");
    let left = edge
        .shutdown(Duration::from_secs(args.drain_timeout_secs))
        .await;
    tracing::info!(closed_at_deadline = left, "drained");
    serving.abort();
    tasks.abort_all();
    Ok(())
}

/// `kilnd control users create`: the password comes from stdin so it never appears in a process
/// list or a shell history.
async fn create_user(args: CreateUserArgs) -> anyhow::Result<()> {
    let role = kiln_types::event::Role::parse(&args.role).with_context(|| {
        format!(
            "unknown role {:?}; roles are owner, admin, member, viewer",
            args.role
        )
    })?;
    let mut password = String::new();
    std::io::stdin()
        .read_line(&mut password)
        .context("cannot read the password from standard input")?;
    let password = password.trim_end_matches(['\n', '\r']).to_owned();
    let location = args.store.location();
    if let kiln_store::Location::Sqlite(path) = &location {
        anyhow::ensure!(path.is_file(), "there is no store at {}", path.display());
    }
    let store = kiln_store::Store::open(&location, kiln_store::Options::default())
        .await
        .with_context(|| format!("cannot open the store at {location}"))?;
    let control = Control::new(store, ControlConfig::default())?;
    let (user_id, org_id) = control
        .create_user(kiln_control::NewUser {
            email: args.email.clone(),
            password,
            org: args.org.clone(),
            role,
        })
        .await?;
    println!(
        "user={user_id} email={} org={org_id} role={} (sign in with `kiln login`)",
        args.email.trim().to_ascii_lowercase(),
        role.as_str()
    );
    Ok(())
}

// ---- `kilnd control`: the control plane without agent or edge, and store operations. ----

#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    #[command(subcommand)]
    pub command: ControlCommand,
}

#[derive(Debug, Subcommand)]
pub enum ControlCommand {
    /// Serve the HTTP API and run the reconciler on a store (one replica: the reconciler has no
    /// leader election yet).
    Serve(ServeArgs),
    /// Operations on the materialized views.
    Views {
        #[command(subcommand)]
        command: ViewsCommand,
    },
    /// Write an online backup of a SQLite store (a Postgres store is backed up with pg_dump).
    Backup(BackupArgs),
    /// Manage users (people who sign in with `kiln login`).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Operations on the master keys of secrets encryption.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user with a password read from standard input (first line), and make them a
    /// member of an org; for an existing email, only grant (or change) the role.
    Create(CreateUserArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct CreateUserArgs {
    /// The user's email (their sign-in name).
    pub email: String,
    /// The org (by name) to make them a member of.
    #[arg(long)]
    pub org: String,
    /// owner, admin, member or viewer (see docs/security/02-authz-and-scopes.md).
    #[arg(long, default_value = "member")]
    pub role: String,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new master key file (mode 0600) for `--master-key-file`; refuses to overwrite.
    Generate {
        /// The file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate a new master key, make it current in the key file, and rewrap every data key
    /// with it (secrets are not re-encrypted; running control planes pick the new key up).
    Rotate(RotateArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The master key file to rotate (default: `DATA_DIR/master.key`).
    #[arg(long)]
    pub master_key_file: Option<PathBuf>,
    /// Remove the old keys from the file once no data key uses them.
    #[arg(long)]
    pub drop_old: bool,
}

#[derive(Debug, Subcommand)]
pub enum ViewsCommand {
    /// Replay the log into fresh view tables and compare their checksums with the live views;
    /// exits non-zero when they differ (unless `--replace` repaired them).
    Rebuild(RebuildArgs),
}

/// Which store: the SQLite file of a data directory, or a Postgres database.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// State directory holding the SQLite store (`DIR/kiln.db`).
    #[arg(
        long,
        conflicts_with = "database_url",
        required_unless_present = "database_url"
    )]
    pub data_dir: Option<PathBuf>,
    /// Postgres connection URL (`postgres://user@host:port/db`).
    #[arg(long, env = "KILN_DATABASE_URL")]
    pub database_url: Option<String>,
}

impl StoreArgs {
    pub fn location(&self) -> kiln_store::Location {
        match (&self.database_url, &self.data_dir) {
            (Some(url), _) => kiln_store::Location::Postgres(url.clone()),
            (None, Some(dir)) => kiln_store::Location::Sqlite(dir.join("kiln.db")),
            (None, None) => kiln_store::Location::Sqlite(PathBuf::from("/var/lib/kiln/kiln.db")),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:4280")]
    pub api_listen: SocketAddr,
    /// Apps are served at `<app>.<domain>`.
    #[arg(long, default_value = "kiln.test")]
    pub domain: String,
    /// Registries reached over plain HTTP besides loopback ones (repeat for several).
    #[arg(long = "plain-http-registry")]
    pub plain_http_registries: Vec<String>,
    /// Public IPv4 addresses handed out as dedicated addresses (`kiln ips allocate-v4`), as a
    /// block like 203.0.113.0/28; without it the IPv4 add-on is off.
    #[arg(long, value_parser = parse_ipv4_pool)]
    pub ipv4_pool: Option<kiln_types::net::Ipv4Pool>,
    /// The DNS resolver custom domains are verified through (`IP` or `IP:PORT`; default: the
    /// first nameserver of /etc/resolv.conf).
    #[arg(long, value_parser = parse_dns_resolver)]
    pub dns_resolver: Option<SocketAddr>,
    /// The URL users reach the API at, for the device login's verification link (default:
    /// `http://` + the request's Host header).
    #[arg(long)]
    pub public_url: Option<String>,
    /// File of master keys for secrets encryption (else `KILN_MASTER_KEY`; with neither, the
    /// secrets routes are unavailable).
    #[arg(long)]
    pub master_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// When the views differ, replace the live views by a replay of the log (appends wait).
    #[arg(long)]
    pub replace: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BackupArgs {
    /// State directory holding the SQLite store (`DIR/kiln.db`).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The backup file to write (must not exist).
    #[arg(long)]
    pub out: PathBuf,
}

async fn run_control(args: ControlArgs) -> anyhow::Result<()> {
    match args.command {
        ControlCommand::Serve(args) => {
            let location = args.store.location();
            if let kiln_store::Location::Sqlite(path) = &location {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
                }
            }
            let store = kiln_store::Store::open(&location, kiln_store::Options::default())
                .await
                .with_context(|| format!("cannot open the store at {location}"))?;
            let master_key = master_key_source(args.master_key_file.as_deref(), None)?;
            if master_key.is_none() {
                tracing::warn!(
                    "no master key (--master-key-file or KILN_MASTER_KEY): secrets are unavailable"
                );
            }
            let control = Control::new(
                store,
                ControlConfig {
                    app_domain: args.domain.clone(),
                    plain_http_registries: args.plain_http_registries.clone(),
                    ipv4_pool: args.ipv4_pool,
                    public_url: args.public_url.clone(),
                    master_key,
                    dns_resolver: dns_resolver(args.dns_resolver),
                    ..Default::default()
                },
            )?;
            let bootstrap = control.bootstrap("default").await?;
            let listener = tokio::net::TcpListener::bind(args.api_listen)
                .await
                .with_context(|| format!("cannot listen on {} (API)", args.api_listen))?;
            let api = listener.local_addr()?;
            let mut tasks = tokio::task::JoinSet::new();
            let router = control.router();
            tasks.spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!(error = %e, "API server stopped");
                }
            });
            tasks.spawn(Reconciler::new(control.clone()).run());
            tasks.spawn(kiln_control::run_domain_checks(
                control.clone(),
                kiln_control::CheckSchedule::default(),
            ));
            tracing::info!(api = %api, store = %location, "kilnd control is serving");
            println!("kilnd control: API http://{api} (store {location})");
            if let Some(b) = &bootstrap {
                println!(
                    "kilnd control: first start; created org {} and an admin token (shown only now): {}",
                    b.org_id, b.admin_token
                );
            }
            println!("kilnd control: ready");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = tasks.join_next() => anyhow::bail!("a control-plane task stopped"),
            }
            Ok(())
        }
        ControlCommand::Views {
            command: ViewsCommand::Rebuild(args),
        } => {
            let location = args.store.location();
            if let kiln_store::Location::Sqlite(path) = &location {
                // Opening would create an empty store: a typo in --data-dir must not pass.
                anyhow::ensure!(path.is_file(), "there is no store at {}", path.display());
            }
            let store = kiln_store::Store::open(&location, kiln_store::Options::default())
                .await
                .with_context(|| format!("cannot open the store at {location}"))?;
            let report = store.rebuild_views(args.replace).await?;
            for (live, rebuilt) in report.live.iter().zip(&report.rebuilt) {
                println!(
                    "view={} rows_live={} rows_rebuilt={} live_sha256={} rebuilt_sha256={} equal={}",
                    live.view,
                    live.rows,
                    rebuilt.rows,
                    live.sha256,
                    rebuilt.sha256,
                    live == rebuilt
                );
            }
            println!(
                "head={} events_replayed={} elapsed_ms={} equal={} replaced={}",
                report.head,
                report.events,
                report.elapsed.as_millis(),
                report.is_equal(),
                report.replaced
            );
            anyhow::ensure!(
                report.is_equal() || report.replaced,
                "the live views differ from a replay of the log; rerun with --replace to repair them"
            );
            Ok(())
        }
        ControlCommand::Users {
            command: UsersCommand::Create(args),
        } => create_user(args).await,
        ControlCommand::Keys {
            command: KeysCommand::Generate { out },
        } => {
            anyhow::ensure!(!out.exists(), "{} already exists", out.display());
            kiln_control::secrets::ensure_key_file(&out)?;
            let keys = kiln_control::secrets::MasterKeys::load(
                &kiln_control::secrets::MasterKeySource::File(out.clone()),
            )?;
            println!("key_file={} key={}", out.display(), keys.current().id());
            Ok(())
        }
        ControlCommand::Keys {
            command: KeysCommand::Rotate(args),
        } => {
            let location = args.store.location();
            if let kiln_store::Location::Sqlite(path) = &location {
                anyhow::ensure!(path.is_file(), "there is no store at {}", path.display());
            }
            let key_file = match (&args.master_key_file, &args.store.data_dir) {
                (Some(f), _) => f.clone(),
                (None, Some(dir)) => dir.join("master.key"),
                (None, None) => anyhow::bail!("pass --master-key-file"),
            };
            let store = kiln_store::Store::open(&location, kiln_store::Options::default())
                .await
                .with_context(|| format!("cannot open the store at {location}"))?;
            let report =
                kiln_control::secrets::rotate_master_key(&store, &key_file, args.drop_old).await?;
            println!(
                "new_key={} previous_keys={} data_keys_rewrapped={} key_file={} keys_in_file={}",
                report.new_key_id,
                report.previous_key_ids.join(","),
                report.rewrapped,
                key_file.display(),
                report.file_key_ids.join(",")
            );
            Ok(())
        }
        ControlCommand::Backup(args) => {
            let path = args.data_dir.join("kiln.db");
            anyhow::ensure!(path.is_file(), "there is no store at {}", path.display());
            anyhow::ensure!(!args.out.exists(), "{} already exists", args.out.display());
            let store = kiln_store::Store::open_sqlite(&path).await?;
            store
                .backup(&args.out)
                .await
                .with_context(|| format!("cannot back up {}", path.display()))?;
            println!(
                "backup={} head={} (restore: stop kilnd, remove {p}-wal and {p}-shm, copy the backup to {p})",
                args.out.display(),
                store.head(),
                p = path.display()
            );
            Ok(())
        }
    }
}

fn parse_region(s: &str) -> Result<String, String> {
    kiln_types::name::check_dns_label(s, 63).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// `IP` (port 53) or `IP:PORT` / `[IPv6]:PORT`.
fn parse_dns_resolver(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{s:?} is not an IP address or IP:PORT"))
}

/// The resolver custom domains are verified through: the flag's, else the system's.
fn dns_resolver(flag: Option<SocketAddr>) -> Option<SocketAddr> {
    let resolver = flag.or_else(kiln_control::system_resolver);
    if resolver.is_none() {
        tracing::warn!(
            "no DNS resolver (--dns-resolver, /etc/resolv.conf): custom domains cannot be verified"
        );
    }
    resolver
}

fn parse_ipv4_pool(s: &str) -> Result<kiln_types::net::Ipv4Pool, String> {
    kiln_types::net::Ipv4Pool::parse(s).map_err(|e| e.to_string())
}
