//! `kiln domains`: custom hostnames of an app. Add one, create the DNS records the answer gives,
//! verify, and the edges route it to the app by SNI (the app serves its own certificate).

use std::path::Path;

use clap::Subcommand;

use kiln_api::domains::{Domain, DomainStatus};
use kiln_api::ApiError;

use crate::cmd::{client, resolve_app, AppArg, CliError};
use crate::{context, exit};

#[derive(Debug, Subcommand)]
pub enum DomainsCmd {
    /// Claim a hostname for the app; prints the DNS records that prove and route it.
    Add {
        #[command(flatten)]
        app: AppArg,
        /// The hostname, e.g. www.example.com, or a wildcard over one label ('*.example.com').
        hostname: String,
        /// The environment (default production).
        #[arg(long)]
        env: Option<String>,
        /// Print JSON instead of instructions.
        #[arg(long)]
        json: bool,
    },
    /// List the app's custom domains and whether each is verified.
    List {
        #[command(flatten)]
        app: AppArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one domain: status and the DNS records to create.
    Show {
        #[command(flatten)]
        app: AppArg,
        hostname: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the challenge record now; once it matches, the hostname is routed to the app.
    Verify {
        #[command(flatten)]
        app: AppArg,
        hostname: String,
    },
    /// Remove a domain: the edges stop routing it at once.
    Remove {
        #[command(flatten)]
        app: AppArg,
        hostname: String,
    },
}

pub async fn domains(cmd: DomainsCmd) -> Result<(), CliError> {
    let manifest = Path::new("kiln.toml");
    match cmd {
        DomainsCmd::Add {
            app,
            hostname,
            env,
            json,
        } => {
            let app = resolve_app(&app, manifest)?;
            let key = format!("domains-{}", kiln_types::ReleaseId::generate().suffix());
            let d = client(&context::current()?)?
                .add_domain(&app, env.as_deref(), &hostname, &key)
                .await?;
            if json {
                print_json(&d);
                return Ok(());
            }
            println!("Added {} to {app} (pending verification).\n", d.hostname);
            instructions(&d, &app);
            Ok(())
        }
        DomainsCmd::List { app, json } => {
            let app = resolve_app(&app, manifest)?;
            let list = client(&context::current()?)?.list_domains(&app).await?;
            if json {
                print_json(&list);
                return Ok(());
            }
            if list.is_empty() {
                println!("(no custom domains; add one with `kiln domains add HOSTNAME -a {app}`)");
                return Ok(());
            }
            let width = list
                .iter()
                .map(|d| d.hostname.as_str().len())
                .max()
                .unwrap_or(8)
                .max(8);
            println!("{:<width$}  {:<9}  ENV", "HOSTNAME", "STATUS");
            for d in &list {
                println!(
                    "{:<width$}  {:<9}  {}",
                    d.hostname.as_str(),
                    d.status.as_str(),
                    d.env
                );
            }
            Ok(())
        }
        DomainsCmd::Show {
            app,
            hostname,
            json,
        } => {
            let app = resolve_app(&app, manifest)?;
            let d = client(&context::current()?)?
                .domain(&app, &hostname)
                .await
                .map_err(|e| not_found_hint(e, &app))?;
            if json {
                print_json(&d);
                return Ok(());
            }
            println!("Hostname: {}", d.hostname);
            println!("App:      {} ({})", d.app, d.env);
            println!("Status:   {}\n", d.status.as_str());
            instructions(&d, &app);
            Ok(())
        }
        DomainsCmd::Verify { app, hostname } => {
            let app = resolve_app(&app, manifest)?;
            let d = client(&context::current()?)?
                .verify_domain(&app, &hostname)
                .await
                .map_err(|e| verify_error(e, &app, &hostname))?;
            println!(
                "Verified {}: the edges route it to {app} by SNI. The app must serve a certificate for it.",
                d.hostname
            );
            Ok(())
        }
        DomainsCmd::Remove { app, hostname } => {
            let app = resolve_app(&app, manifest)?;
            client(&context::current()?)?
                .remove_domain(&app, &hostname)
                .await
                .map_err(|e| not_found_hint(e, &app))?;
            println!("Removed {hostname} from {app}: the edges no longer route it.");
            Ok(())
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn instructions(d: &Domain, app: &str) {
    if d.status == DomainStatus::Pending {
        println!("1. Prove you own it: create this DNS record at your DNS provider");
    } else {
        println!("Ownership record (verified; keep it for re-verification):");
    }
    println!("     {}  TXT  \"{}\"", d.challenge.name, d.challenge.value);
    println!(
        "{}Point traffic at Kiln:",
        if d.status == DomainStatus::Pending {
            "2. "
        } else {
            ""
        }
    );
    println!("     {}  CNAME  {}", d.traffic.name, d.traffic.value);
    println!("   (at a zone apex, where a CNAME cannot be: an ALIAS/ANAME record, or the edges' addresses)");
    if d.status == DomainStatus::Pending {
        println!(
            "3. Then run `kiln domains verify {} -a {app}` (Kiln also re-checks pending domains in the background).",
            d.hostname
        );
    }
    println!(
        "The edge passes TLS through untouched: the app serves the certificate for {}.",
        d.hostname
    );
}

fn not_found_hint(e: ApiError, app: &str) -> CliError {
    let is_404 = matches!(&e, ApiError::Api { status: 404, .. });
    let err = CliError::from(e);
    if is_404 {
        err.hint(format!(
            "see the app's domains with `kiln domains list -a {app}`"
        ))
    } else {
        err
    }
}

fn verify_error(e: ApiError, app: &str, hostname: &str) -> CliError {
    let code = match &e {
        ApiError::Api { problem, .. } => Some(problem.code.clone()),
        _ => None,
    };
    match code.as_deref() {
        Some("domain_not_verified") => {
            let mut err = CliError::from(e);
            err.code = exit::NOT_VERIFIED;
            err.hint(format!(
                "DNS changes can take minutes to propagate; run `kiln domains verify {hostname} -a {app}` again later (`kiln domains show {hostname}` repeats the record)"
            ))
        }
        Some("domain_taken") => CliError::from(e)
            .hint("a hostname is routed to one app only; its current holder must remove it first"),
        _ => not_found_hint(e, app),
    }
}
