//! `kiln ips`: an app's public addresses beyond the shared TLS ones — its dedicated IPv4 (the
//! add-on) and the ports it owns on the shared addresses.

use std::path::Path;

use clap::Subcommand;

use crate::cmd::{client, resolve_app, AppArg, CliError};
use crate::{context, exit};

#[derive(Debug, Subcommand)]
pub enum IpsCmd {
    /// List the app's dedicated IPv4 addresses and shared ports.
    List {
        #[command(flatten)]
        app: AppArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Allocate a dedicated IPv4 address (every port of it is the app's).
    AllocateV4 {
        #[command(flatten)]
        app: AppArg,
    },
    /// Release a dedicated IPv4 address; its routes stop at once.
    Release {
        #[command(flatten)]
        app: AppArg,
        /// The address to release.
        address: String,
    },
}

pub async fn ips(cmd: IpsCmd) -> Result<(), CliError> {
    let manifest = Path::new("kiln.toml");
    match cmd {
        IpsCmd::List { app, json } => {
            let app = resolve_app(&app, manifest)?;
            let ips = client(&context::current()?)?.ips(&app).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ips).unwrap_or_default());
                return Ok(());
            }
            println!("{:<10} ADDRESS", "TYPE");
            for ip in &ips.dedicated_ipv4 {
                println!("{:<10} {ip} (every port)", "v4");
            }
            for port in &ips.shared_ports {
                println!("{:<10} shared addresses, port {port}", "port");
            }
            if ips.dedicated_ipv4.is_empty() && ips.shared_ports.is_empty() {
                println!("(none: the app is reached by SNI on the shared addresses)");
            }
            Ok(())
        }
        IpsCmd::AllocateV4 { app } => {
            let app = resolve_app(&app, manifest)?;
            let key = format!("ips-{}", kiln_types::ReleaseId::generate().suffix());
            let ip = client(&context::current()?)?
                .allocate_ipv4(&app, &key)
                .await?;
            println!(
                "Allocated {} to {app}: TLS services answer on {}:443, tcp services on their ports",
                ip.address, ip.address
            );
            Ok(())
        }
        IpsCmd::Release { app, address } => {
            let app = resolve_app(&app, manifest)?;
            let ip: std::net::Ipv4Addr = address.parse().map_err(|_| {
                CliError::new(exit::USAGE, format!("{address:?} is not an IPv4 address"))
                    .hint("see `kiln ips list` for the app's addresses")
            })?;
            client(&context::current()?)?.release_ip(&app, ip).await?;
            println!("Released {ip} from {app}");
            Ok(())
        }
    }
}
