//! `kiln init` and `kiln config ...`: writing, checking and showing kiln.toml, all local (no
//! control plane involved).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};

use kiln_manifest::{InitOptions, Manifest, Style};
use kiln_types::{AppName, ServiceProtocol};

use crate::cmd::CliError;
use crate::exit;

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Check a kiln.toml; exit 0 only when it is valid.
    Validate {
        #[arg(default_value = "kiln.toml")]
        path: PathBuf,
    },
    /// Print a kiln.toml: as written, or with every default applied (--resolved).
    Show {
        #[arg(default_value = "kiln.toml")]
        path: PathBuf,
        /// Print every key with its value, defaults included.
        #[arg(long)]
        resolved: bool,
        /// Print the resolved manifest as JSON (the form stored in releases).
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON Schema of kiln.toml (also in docs/specs/manifest/kiln.schema.json).
    Schema,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Protocol {
    Tls,
    Tcp,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The image to run (tag or digest), e.g. registry.example.com/app:v1.
    pub image: String,
    /// The app's name (default: from the image's repository name).
    #[arg(short = 'a', long = "app")]
    pub app: Option<String>,
    /// The port the app listens on inside the instance.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// tls: routed by SNI hostname; tcp: routed by public port.
    #[arg(long, value_enum, default_value_t = Protocol::Tls)]
    pub protocol: Protocol,
    /// Where to write the manifest.
    #[arg(short = 'c', long, default_value = "kiln.toml")]
    pub config: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    pub force: bool,
}

fn read(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|e| {
        CliError::new(
            exit::INVALID_CONFIG,
            format!("cannot read {}: {e}", path.display()),
        )
        .hint("run from the app's directory, pass the path, or create one with `kiln init IMAGE`")
    })
}

fn load(path: &Path) -> Result<(String, Manifest), CliError> {
    let src = read(path)?;
    let file = path.display().to_string();
    match kiln_manifest::parse(&file, &src) {
        Ok(m) => Ok((src, m)),
        Err(e) => {
            let n = e.problems.len();
            Err(CliError::new(
                exit::INVALID_CONFIG,
                format!(
                    "{file} is invalid ({n} problem{}):\n{}",
                    if n == 1 { "" } else { "s" },
                    e.report().trim_end()
                ),
            ))
        }
    }
}

pub fn config(cmd: ConfigCmd) -> Result<(), CliError> {
    match cmd {
        ConfigCmd::Validate { path } => {
            let (_, m) = load(&path)?;
            let groups: Vec<String> = m
                .processes
                .iter()
                .map(|p| format!("{} ×{}", p.name, m.desired_count(p)))
                .collect();
            println!(
                "{} is valid: app {}, {}",
                path.display(),
                m.app,
                groups.join(", ")
            );
            Ok(())
        }
        ConfigCmd::Show {
            path,
            resolved,
            json,
        } => {
            let (src, m) = load(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m).unwrap_or_default());
            } else if resolved {
                print!("{}", kiln_manifest::to_toml(&m, Style::Resolved));
            } else {
                print!("{src}");
            }
            Ok(())
        }
        ConfigCmd::Schema => {
            print!("{}", kiln_manifest::json_schema_text());
            Ok(())
        }
    }
}

pub fn init(args: InitArgs) -> Result<(), CliError> {
    let app: AppName = match &args.app {
        Some(a) => a
            .parse()
            .map_err(|e| CliError::new(exit::USAGE, format!("invalid app name: {e}")))?,
        None => kiln_manifest::app_name_from_image(&args.image).ok_or_else(|| {
            CliError::new(
                exit::USAGE,
                format!("cannot make an app name from the image {:?}", args.image),
            )
            .hint("pass --app NAME")
        })?,
    };
    if args.image.trim().is_empty() || args.image.chars().any(char::is_whitespace) {
        return Err(CliError::new(
            exit::USAGE,
            format!("invalid image reference {:?}", args.image),
        ));
    }
    if args.port == 0 {
        return Err(CliError::new(exit::USAGE, "--port must be from 1 to 65535"));
    }
    if args.config.exists() && !args.force {
        return Err(CliError::new(
            exit::USAGE,
            format!(
                "{} already exists; nothing was written",
                args.config.display()
            ),
        )
        .hint("pass --force to overwrite it, or --config PATH to write elsewhere"));
    }
    let text = kiln_manifest::init_template(&InitOptions {
        app: app.clone(),
        image: args.image.clone(),
        protocol: match args.protocol {
            Protocol::Tls => ServiceProtocol::Tls,
            Protocol::Tcp => ServiceProtocol::Tcp,
        },
        internal_port: args.port,
    });
    // The template is tested to be valid; checking again costs nothing and guards the file.
    if let Err(e) = kiln_manifest::parse(&args.config.display().to_string(), &text) {
        return Err(CliError::new(
            exit::FAILURE,
            format!("the generated manifest is invalid (a bug):\n{}", e.report()),
        ));
    }
    std::fs::write(&args.config, text).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot write {}: {e}", args.config.display()),
        )
    })?;
    println!(
        "Wrote {} for app {app} ({}). Next: `kiln config validate`, then `kiln deploy`.",
        args.config.display(),
        args.image
    );
    Ok(())
}
