//! `kiln releases`, `kiln rollback` and `kiln hosts`: looking back at an app's releases, going
//! back to one, and the operator's view of the fleet.

use std::path::Path;

use clap::{Args, Subcommand};

use crate::cmd::{client, resolve_app, wait_for_release, AppArg, CliError};
use crate::context;

#[derive(Debug, Args)]
pub struct ReleasesArgs {
    #[command(flatten)]
    pub app: AppArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub app: AppArg,
    /// The release to restore, like `3` or `v3` (default: the last one that served before the
    /// current one).
    #[arg(value_name = "VERSION", id = "target", value_parser = parse_version)]
    pub version: Option<u64>,
    /// Return once the release is created, without waiting for health.
    #[arg(long)]
    pub detach: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub wait_timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum ScaleCmd {
    /// Set the number of instances per region (of every process group, or of one).
    Count {
        #[command(flatten)]
        app: AppArg,
        /// Instances per region.
        count: u32,
        /// Only this process group.
        #[arg(long)]
        process: Option<String>,
        /// Only this region (one of the app's `regions`); without it, every region.
        #[arg(long)]
        region: Option<String>,
        /// Return once the release is created, without waiting for health.
        #[arg(long)]
        detach: bool,
    },
    /// Set the VM size of every instance.
    Vm {
        #[command(flatten)]
        app: AppArg,
        /// vCPUs per instance.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory per instance, MiB.
        #[arg(long)]
        memory: Option<u64>,
        /// Return once the release is created, without waiting for health.
        #[arg(long)]
        detach: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DebugCmd {
    /// Why each host would or would not get the app's next instance (operator only).
    Placement {
        #[command(flatten)]
        app: AppArg,
        /// The process group (default: the first).
        #[arg(long)]
        process: Option<String>,
        /// The region (default: the app's primary region).
        #[arg(long)]
        region: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostsCmd {
    /// Every host: state, driver, capacity, instances, last heard from.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move the host's stateless instances elsewhere (each new one healthy before the old one
    /// stops) and place nothing new on it.
    Drain {
        /// Host name or id.
        host: String,
    },
    /// Let a drained host take instances again.
    Ready {
        /// Host name or id.
        host: String,
    },
}

pub async fn releases(args: ReleasesArgs) -> Result<(), CliError> {
    let app = resolve_app(&args.app, Path::new("kiln.toml"))?;
    let mut releases = client(&context::current()?)?.releases(&app).await?;
    releases.reverse();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&releases).unwrap_or_default()
        );
        return Ok(());
    }
    println!(
        "{:<8} {:<11} {:<40} REASON",
        "VERSION", "STATE", "IMAGE (AS GIVEN)"
    );
    for r in releases {
        println!(
            "v{:<7} {:<11} {:<40} {}",
            r.version,
            r.state.as_str(),
            r.image_input,
            r.reason.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

pub async fn rollback(args: RollbackArgs) -> Result<(), CliError> {
    let app = resolve_app(&args.app, Path::new("kiln.toml"))?;
    let c = client(&context::current()?)?;
    let key = format!("rollback-{}", kiln_types::ReleaseId::generate().suffix());
    let release = c.rollback(&app, args.version, &key).await?;
    println!(
        "==> Release v{} of {app}: {} ({})",
        release.version, release.image, release.image_input
    );
    if args.detach {
        return Ok(());
    }
    wait_for_release(&c, &app, &release, args.wait_timeout).await
}

pub async fn hosts(cmd: HostsCmd) -> Result<(), CliError> {
    let c = client(&context::current()?)?;
    match cmd {
        HostsCmd::List { json } => {
            let mut hosts = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let page = c.list_hosts(cursor.as_deref()).await?;
                hosts.extend(page.items);
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&hosts).unwrap_or_default()
                );
                return Ok(());
            }
            println!(
                "{:<26} {:<12} {:<8} {:<9} {:<8} {:>6} {:>10} REASON",
                "ID", "NAME", "REGION", "STATE", "DRIVER", "CPUS", "MEMORY"
            );
            for h in hosts {
                println!(
                    "{:<26} {:<12} {:<8} {:<9} {:<8} {:>6.1} {:>6} MiB {}",
                    h.id,
                    h.name,
                    h.region,
                    h.state.as_str(),
                    h.driver,
                    f64::from(h.cpu.0) / 1000.0,
                    h.memory.0,
                    h.state_reason.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
        HostsCmd::Drain { host } => {
            let h = c.drain_host(&host, true).await?;
            println!(
                "Draining {}: its stateless instances move to other hosts; `kiln hosts list` shows progress",
                h.name
            );
            Ok(())
        }
        HostsCmd::Ready { host } => {
            let h = c.drain_host(&host, false).await?;
            println!("{} is ready for new instances", h.name);
            Ok(())
        }
    }
}

fn parse_version(s: &str) -> Result<u64, String> {
    s.trim_start_matches('v')
        .parse()
        .map_err(|_| format!("{s:?} is not a release version (like 3 or v3)"))
}

pub async fn scale(cmd: ScaleCmd) -> Result<(), CliError> {
    let (app, body, detach) = match cmd {
        ScaleCmd::Count {
            app,
            count,
            process,
            region,
            detach,
        } => (
            app,
            kiln_api::ScaleRequest {
                count: Some(count),
                process,
                region,
                ..Default::default()
            },
            detach,
        ),
        ScaleCmd::Vm {
            app,
            cpus,
            memory,
            detach,
        } => {
            if cpus.is_none() && memory.is_none() {
                return Err(
                    CliError::new(crate::exit::USAGE, "nothing to change".to_string())
                        .hint("pass --cpus N and/or --memory MIB"),
                );
            }
            (
                app,
                kiln_api::ScaleRequest {
                    cpus,
                    memory_mib: memory,
                    ..Default::default()
                },
                detach,
            )
        }
    };
    let app = resolve_app(&app, Path::new("kiln.toml"))?;
    let c = client(&context::current()?)?;
    let key = format!("scale-{}", kiln_types::ReleaseId::generate().suffix());
    let release = c.scale(&app, &body, &key).await?;
    println!(
        "==> Release v{} of {app}: {}",
        release.version, release.image_input
    );
    if detach {
        return Ok(());
    }
    wait_for_release(&c, &app, &release, 600).await
}

pub async fn debug(cmd: DebugCmd) -> Result<(), CliError> {
    match cmd {
        DebugCmd::Placement {
            app,
            process,
            region,
            json,
        } => {
            let app = resolve_app(&app, Path::new("kiln.toml"))?;
            let e = client(&context::current()?)?
                .explain_placement(&app, process.as_deref(), region.as_deref())
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&e).unwrap_or_default());
            } else {
                print!("{}", e.explanation);
                if !e.explanation.ends_with('\n') {
                    println!();
                }
            }
            Ok(())
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum QuotasCmd {
    /// Each quota's limit and usage: your org's, or (operator) another org's.
    Show {
        /// The org, by name or id (operator only; default: your own).
        #[arg(long)]
        org: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set an org's limits in place of the platform defaults (operator only); limits not given
    /// keep their current value.
    Set {
        /// The org, by name or id.
        org: String,
        #[arg(long)]
        apps: Option<u64>,
        #[arg(long)]
        instances: Option<u64>,
        /// MiB of instance memory.
        #[arg(long)]
        memory: Option<u64>,
        #[arg(long)]
        volumes: Option<u64>,
        /// Dedicated IPv4 addresses.
        #[arg(long)]
        ipv4: Option<u64>,
    },
    /// Give an org the platform defaults again (operator only).
    Reset {
        /// The org, by name or id.
        org: String,
    },
}

fn print_quotas(q: &kiln_api::OrgQuotas, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(q).unwrap_or_default());
        return;
    }
    println!("Quotas of org {}:", q.org);
    println!("{:<16} {:>12} {:>12}", "QUOTA", "USED", "LIMIT");
    for l in &q.quotas {
        println!(
            "{:<16} {:>12} {:>12}{}",
            l.name,
            l.used.map_or_else(|| "-".to_owned(), |u| u.to_string()),
            l.limit,
            if l.overridden {
                "  (set for this org)"
            } else {
                ""
            }
        );
    }
}

pub async fn quotas(cmd: QuotasCmd) -> Result<(), CliError> {
    let c = client(&context::current()?)?;
    match cmd {
        QuotasCmd::Show { org, json } => {
            let q = match org {
                Some(org) => c.org_quotas(&org).await?,
                None => c.own_quotas().await?,
            };
            print_quotas(&q, json);
        }
        QuotasCmd::Set {
            org,
            apps,
            instances,
            memory,
            volumes,
            ipv4,
        } => {
            if [apps, instances, memory, volumes, ipv4]
                .iter()
                .all(Option::is_none)
            {
                return Err(
                    CliError::new(crate::exit::USAGE, "nothing to set".to_string()).hint(
                        "pass one or more of --apps, --instances, --memory, --volumes, --ipv4",
                    ),
                );
            }
            let mut o = c.org_quotas(&org).await?.overrides;
            o.apps = apps.or(o.apps);
            o.instances = instances.or(o.instances);
            o.memory_mib = memory.or(o.memory_mib);
            o.volumes = volumes.or(o.volumes);
            o.ipv4_addresses = ipv4.or(o.ipv4_addresses);
            print_quotas(&c.set_org_quotas(&org, &o).await?, false);
        }
        QuotasCmd::Reset { org } => {
            print_quotas(&c.set_org_quotas(&org, &Default::default()).await?, false);
        }
    }
    Ok(())
}
