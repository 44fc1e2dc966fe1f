//! The command tree and its handlers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use kiln_api::{ApiError, AppStatus, Client, CreateRelease};
use kiln_types::event::ReleaseState;
use kiln_types::AppName;

use crate::context::{self, Context};
use crate::exit;

/// kiln — deploy and run apps on a Kiln platform.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage apps.
    #[command(subcommand)]
    Apps(AppsCmd),
    /// Deploy a new release of an app and wait until it is healthy.
    Deploy(DeployArgs),
    /// Show an app's releases and instances.
    Status(StatusArgs),
    /// Print an app's log lines (stdout and stderr of its instances).
    Logs(LogsArgs),
    /// Run a command in a running instance; exits with the command's exit code.
    Exec(ExecArgs),
    /// Manage an app's secrets (delivered as /.kiln/secrets.json).
    #[command(subcommand)]
    Secrets(crate::secrets_cmd::SecretsCmd),
    /// Write a commented kiln.toml for an image.
    Init(crate::config_cmd::InitArgs),
    /// Work with kiln.toml: validate, show (with defaults), JSON Schema.
    #[command(subcommand)]
    Config(crate::config_cmd::ConfigCmd),
    /// List an app's releases, newest first.
    Releases(crate::ops_cmd::ReleasesArgs),
    /// Deploy an earlier release again (its image and manifest, as one unit).
    Rollback(crate::ops_cmd::RollbackArgs),
    /// Change an app's instance count or VM size (a new release of the serving one).
    #[command(subcommand)]
    Scale(crate::ops_cmd::ScaleCmd),
    /// Debugging views (operator only): `kiln debug placement`.
    #[command(subcommand)]
    Debug(crate::ops_cmd::DebugCmd),
    /// The platform's hosts: list, drain, make ready (operator only).
    #[command(subcommand)]
    Hosts(crate::ops_cmd::HostsCmd),
    /// An app's dedicated IPv4 addresses and shared ports.
    #[command(subcommand)]
    Ips(crate::ips_cmd::IpsCmd),
    /// Your org's quotas and usage; the operator sets other orgs' limits.
    #[command(subcommand)]
    Quotas(crate::ops_cmd::QuotasCmd),
    /// An app's custom domains: add, verify by DNS, list, remove.
    #[command(subcommand)]
    Domains(crate::domains_cmd::DomainsCmd),
    /// Manage the control planes this CLI talks to.
    #[command(subcommand)]
    Context(ContextCmd),
    /// Show who the current token belongs to: user, org, role, scopes, expiry.
    Whoami,
    /// Sign in with your email and password in a browser (device login) and save a context.
    Login(crate::auth_cmd::LoginArgs),
    /// Revoke the current context's token and remove the context.
    Logout(crate::auth_cmd::LogoutArgs),
    /// Create, list and revoke API tokens (CI deploy tokens, scripts).
    #[command(subcommand)]
    Tokens(crate::auth_cmd::TokensCmd),
}

#[derive(Debug, Subcommand)]
pub enum AppsCmd {
    /// Create an app.
    Create { name: String },
    /// List the org's apps.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Destroy an app: its instances stop, its releases, secrets and addresses go, its name is
    /// free again. Cannot be undone.
    Destroy {
        name: String,
        /// Do not ask to type the name again.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

#[derive(Debug, Args)]
pub struct AppArg {
    /// The app (default: `app` of ./kiln.toml).
    #[arg(short = 'a', long = "app", global = true)]
    pub app: Option<String>,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    #[command(flatten)]
    pub app: AppArg,
    /// Image to deploy (tag or digest); overrides `image` in kiln.toml.
    #[arg(short = 'i', long)]
    pub image: Option<String>,
    /// Path of the manifest.
    #[arg(short = 'c', long, default_value = "kiln.toml")]
    pub config: PathBuf,
    /// Return once the release is created, without waiting for health.
    #[arg(long)]
    pub detach: bool,
    /// Give up waiting after this many seconds (the release keeps its own health timeout).
    #[arg(long, default_value_t = 600)]
    pub wait_timeout: u64,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub app: AppArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub app: AppArg,
    /// The instance (default: one of the newest release).
    #[arg(long)]
    pub instance: Option<String>,
    /// Allocate a terminal (interactive shells, editors).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// The command and its arguments (after `--`).
    #[arg(required = true, last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub app: AppArg,
    /// Keep printing new lines as they arrive.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only lines of this instance.
    #[arg(long)]
    pub instance: Option<String>,
    /// How many past lines to print first.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub lines: usize,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ContextCmd {
    /// Add (or replace) a context and make it current.
    Add {
        name: String,
        /// Control-plane URL, e.g. http://127.0.0.1:4280.
        #[arg(long)]
        api: String,
        /// API token (`kiln_...`).
        #[arg(long)]
        token: String,
    },
    /// Make a context current.
    Use { name: String },
    /// List contexts.
    List,
}

/// A failure with its exit code and a hint of what to do next.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
    pub hint: Option<String>,
}

impl CliError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            hint: None,
        }
    }
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl From<ApiError> for CliError {
    fn from(e: ApiError) -> Self {
        match &e {
            ApiError::Api { status, problem } => {
                let detail = problem
                    .detail
                    .clone()
                    .unwrap_or_else(|| problem.title.clone());
                let (code, hint) = match *status {
                    401 => (
                        exit::AUTH,
                        Some("check the token of the current context (`kiln context list`)"),
                    ),
                    403 => (
                        exit::AUTH,
                        Some("this token lacks the scope this command needs"),
                    ),
                    404 => (
                        exit::NOT_FOUND,
                        Some("check the name with `kiln apps list`"),
                    ),
                    422 if problem.code == "invalid_manifest" => (exit::INVALID_CONFIG, None),
                    400..=499 => (exit::REJECTED, None),
                    _ => (exit::FAILURE, None),
                };
                let mut err = CliError::new(code, format!("{detail} [{}]", problem.code));
                if let Some(h) = hint {
                    err = err.hint(h);
                }
                err
            }
            ApiError::Connect { url, .. } => CliError::new(
                exit::UNREACHABLE,
                format!("cannot reach the control plane at {url}"),
            )
            .hint("is `kilnd` running? check `kiln context list`"),
            other => CliError::new(exit::FAILURE, error_chain(other)),
        }
    }
}

use kiln_types::error_chain;

pub(crate) fn client(ctx: &Context) -> Result<Client, CliError> {
    Client::new(&ctx.api, &ctx.token).map_err(CliError::from)
}

/// The app to act on: `--app`, else `app` of ./kiln.toml.
pub(crate) fn resolve_app(arg: &AppArg, manifest_path: &Path) -> Result<String, CliError> {
    if let Some(a) = &arg.app {
        return Ok(a.clone());
    }
    match std::fs::read_to_string(manifest_path) {
        Ok(src) => kiln_manifest::parse(&manifest_path.display().to_string(), &src)
            .map(|m| m.app.to_string())
            .map_err(|e| CliError::new(exit::INVALID_CONFIG, e.report().trim_end().to_owned())),
        Err(_) => Err(
            CliError::new(exit::USAGE, "no app given and no kiln.toml here")
                .hint("pass --app NAME (-a)"),
        ),
    }
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Apps(AppsCmd::Create { name }) => {
            let name: AppName = name
                .parse()
                .map_err(|e| CliError::new(exit::USAGE, format!("invalid app name: {e}")))?;
            let app = client(&context::current()?)?.create_app(&name).await?;
            println!(
                "Created app {} ({}), reachable at {} once deployed",
                app.name, app.id, app.hostname
            );
            Ok(())
        }
        Command::Apps(AppsCmd::Destroy { name, yes }) => {
            if !yes {
                use std::io::{BufRead, IsTerminal, Write};
                if !std::io::stdin().is_terminal() {
                    return Err(CliError::new(
                        exit::USAGE,
                        format!("destroying {name} cannot be undone and needs confirmation"),
                    )
                    .hint(format!("run `kiln apps destroy {name} --yes`")));
                }
                print!("Destroying {name} stops all its instances and cannot be undone. Type its name to confirm: ");
                std::io::stdout().flush().ok();
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line).ok();
                if line.trim() != name {
                    return Err(CliError::new(
                        exit::USAGE,
                        "not confirmed; nothing was destroyed".to_string(),
                    ));
                }
            }
            client(&context::current()?)?
                .destroy_app(&name, &name)
                .await?;
            println!("Destroyed app {name}: its instances are stopping");
            Ok(())
        }
        Command::Apps(AppsCmd::List { json }) => {
            let apps = client(&context::current()?)?.list_apps().await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&apps).unwrap_or_default()
                );
            } else {
                println!("{:<24} {:<8} HOSTNAME", "NAME", "RELEASE");
                for a in apps {
                    let v = if a.latest_version == 0 {
                        "-".into()
                    } else {
                        format!("v{}", a.latest_version)
                    };
                    println!("{:<24} {:<8} {}", a.name, v, a.hostname);
                }
            }
            Ok(())
        }
        Command::Deploy(args) => deploy(args).await,
        Command::Status(args) => {
            let app = resolve_app(&args.app, Path::new("kiln.toml"))?;
            let status = client(&context::current()?)?.status(&app).await?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Command::Init(args) => crate::config_cmd::init(args),
        Command::Config(cmd) => crate::config_cmd::config(cmd),
        Command::Logs(args) => logs(args).await,
        Command::Exec(args) => {
            let code = exec(args).await?;
            if code != 0 {
                // The remote command's status is ours: scripts see it as if it ran locally.
                return Err(CliError {
                    code,
                    message: String::new(),
                    hint: None,
                });
            }
            Ok(())
        }
        Command::Ips(cmd) => crate::ips_cmd::ips(cmd).await,
        Command::Quotas(cmd) => crate::ops_cmd::quotas(cmd).await,
        Command::Domains(cmd) => crate::domains_cmd::domains(cmd).await,
        Command::Releases(args) => crate::ops_cmd::releases(args).await,
        Command::Rollback(args) => crate::ops_cmd::rollback(args).await,
        Command::Hosts(cmd) => crate::ops_cmd::hosts(cmd).await,
        Command::Scale(cmd) => crate::ops_cmd::scale(cmd).await,
        Command::Debug(cmd) => crate::ops_cmd::debug(cmd).await,
        Command::Context(cmd) => context_cmd(cmd).await,
        Command::Secrets(cmd) => crate::secrets_cmd::run(cmd).await,
        Command::Whoami => crate::auth_cmd::whoami().await,
        Command::Login(args) => crate::auth_cmd::login(args).await,
        Command::Logout(args) => crate::auth_cmd::logout(args).await,
        Command::Tokens(cmd) => crate::auth_cmd::tokens(cmd).await,
    }
}

async fn context_cmd(cmd: ContextCmd) -> Result<(), CliError> {
    let mut file = context::load()?;
    match cmd {
        ContextCmd::Add { name, api, token } => {
            let mut ctx = Context {
                api,
                token,
                ..Default::default()
            };
            // Prove the pair works before saving it.
            let me = client(&ctx)?.whoami().await?;
            ctx.org = me.org_name.clone();
            ctx.user = me.user.as_ref().map(|u| u.email.clone());
            file.contexts.insert(name.clone(), ctx);
            file.current = Some(name.clone());
            context::save(&file)?;
            println!(
                "Context {name:?} added and selected (org {}, token {:?}).",
                me.org_id, me.token_name
            );
        }
        ContextCmd::Use { name } => {
            if !file.contexts.contains_key(&name) {
                return Err(
                    CliError::new(exit::NOT_FOUND, format!("no context named {name:?}"))
                        .hint("see `kiln context list`"),
                );
            }
            file.current = Some(name.clone());
            context::save(&file)?;
            println!("Using context {name:?}.");
        }
        ContextCmd::List => {
            for (name, ctx) in &file.contexts {
                let mark = if file.current.as_deref() == Some(name) {
                    "*"
                } else {
                    " "
                };
                println!(
                    "{mark} {name:<20} {:<28} org={} user={}",
                    ctx.api,
                    ctx.org.as_deref().unwrap_or("-"),
                    ctx.user.as_deref().unwrap_or("-")
                );
            }
        }
    }
    Ok(())
}

async fn deploy(args: DeployArgs) -> Result<(), CliError> {
    let path = &args.config;
    let src = std::fs::read_to_string(path).map_err(|e| {
        CliError::new(
            exit::INVALID_CONFIG,
            format!("cannot read {}: {e}", path.display()),
        )
        .hint("run from the app's directory or pass --config PATH")
    })?;
    let file = path.display().to_string();
    // Validate locally first: every problem, with line and column, before anything is sent.
    let manifest = kiln_manifest::parse(&file, &src).map_err(|e| {
        CliError::new(
            exit::INVALID_CONFIG,
            format!(
                "{file} is invalid; nothing was deployed:\n{}",
                e.report().trim_end()
            ),
        )
    })?;
    let app = args
        .app
        .app
        .clone()
        .unwrap_or_else(|| manifest.app.to_string());
    let c = client(&context::current()?)?;
    let key = format!("deploy-{}", kiln_types::ReleaseId::generate().suffix());
    let body = CreateRelease {
        image: args.image.clone(),
        manifest: src,
        manifest_file: Some(file),
    };
    let release = c.create_release(&app, &body, &key).await?;
    println!(
        "==> Release v{} of {app}: {}",
        release.version, release.image
    );
    if args.detach {
        return Ok(());
    }
    wait_for_release(&c, &app, &release, args.wait_timeout).await
}

/// Follows a new release until it is healthy (Ok) or failed (exit code 6), printing progress.
pub(crate) async fn wait_for_release(
    c: &Client,
    app: &str,
    release: &kiln_api::Release,
    wait_timeout: u64,
) -> Result<(), CliError> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(wait_timeout);
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let status = c.status(app).await?;
        for i in status
            .instances
            .iter()
            .filter(|i| i.release_version == release.version)
        {
            let line = match &i.reason {
                Some(r) if i.state.is_terminal() => format!("{} ({r})", i.state),
                _ => i.state.to_string(),
            };
            if seen.get(i.id.as_str()) != Some(&line) {
                println!("    instance {} [{}]: {line}", i.id, i.ipv6);
                seen.insert(i.id.to_string(), line);
            }
        }
        let Some(rel) = status
            .releases
            .iter()
            .find(|r| r.version == release.version)
        else {
            return Err(CliError::new(
                exit::FAILURE,
                format!("release v{} disappeared", release.version),
            ));
        };
        match rel.state {
            ReleaseState::Healthy => {
                println!(
                    "==> v{} is healthy and serving at {} ({:.1}s)",
                    rel.version,
                    status.app.hostname,
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            ReleaseState::Failed | ReleaseState::Superseded => {
                let why = rel
                    .reason
                    .clone()
                    .unwrap_or_else(|| rel.state.as_str().to_owned());
                let serving = status
                    .current
                    .as_ref()
                    .map(|r| format!("v{} keeps serving", r.version))
                    .unwrap_or_else(|| "nothing was serving before".into());
                return Err(CliError::new(
                    exit::DEPLOY_FAILED,
                    format!(
                        "release v{} {}: {why}; {serving}",
                        rel.version,
                        rel.state.as_str()
                    ),
                )
                .hint("see `kiln status` for instance details"));
            }
            ReleaseState::Deploying => {
                // The reconciler's progress (strategy, new instances healthy, old running).
                if let Some(progress) = &rel.reason {
                    if seen.get("") != Some(progress) {
                        println!("    {progress}");
                        seen.insert(String::new(), progress.clone());
                    }
                }
            }
        }
        if Instant::now() > deadline {
            return Err(CliError::new(
                exit::DEPLOY_FAILED,
                format!(
                    "release v{} not healthy after {}s; it keeps deploying",
                    release.version, wait_timeout
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_status(s: &AppStatus) {
    println!("App        {} ({})", s.app.name, s.app.id);
    println!("Hostname   {}", s.app.hostname);
    match &s.current {
        Some(r) => println!("Serving    v{} {}", r.version, r.image),
        None => println!("Serving    nothing yet"),
    }
    println!();
    println!("RELEASES");
    println!("{:<8} {:<11} {:<20} REASON", "VERSION", "STATE", "CREATED");
    for r in s.releases.iter().rev().take(10) {
        println!(
            "v{:<7} {:<11} {:<20} {}",
            r.version,
            r.state.as_str(),
            r.created_at,
            r.reason.as_deref().unwrap_or("")
        );
    }
    println!();
    println!("INSTANCES");
    println!(
        "{:<26} {:<8} {:<10} {:<28} REASON",
        "ID", "RELEASE", "STATE", "ADDRESS"
    );
    for i in &s.instances {
        println!(
            "{:<26} v{:<7} {:<10} {:<28} {}",
            i.id,
            i.release_version,
            i.state,
            i.ipv6,
            i.reason.as_deref().unwrap_or("")
        );
    }
}

async fn logs(args: LogsArgs) -> Result<(), CliError> {
    let app = resolve_app(&args.app, Path::new("kiln.toml"))?;
    let instance = match &args.instance {
        Some(i) => Some(
            i.parse()
                .map_err(|e| CliError::new(exit::USAGE, format!("--instance: {e}")))?,
        ),
        None => None,
    };
    let query = kiln_api::LogsQuery {
        follow: Some(args.follow),
        tail: Some(args.lines),
        instance,
    };
    let mut stream = client(&context::current()?)?.logs(&app, &query).await?;
    while let Some(r) = stream.next().await? {
        if args.json {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
        } else {
            let out = match r.output {
                kiln_types::frame::Output::Stdout => "out",
                kiln_types::frame::Output::Stderr => "err",
            };
            println!(
                "{} {} {out} {}",
                format_ts(r.ts_ms),
                r.instance_id,
                r.message
            );
        }
    }
    Ok(())
}

/// `2026-11-26T01:02:03.456Z` from milliseconds since the epoch (UTC, no time-zone database).
pub(crate) fn format_ts(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

async fn exec(args: ExecArgs) -> Result<i32, CliError> {
    use futures_util::{SinkExt, StreamExt};
    use kiln_types::frame::{ExecStart, Frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;

    let app = resolve_app(&args.app, Path::new("kiln.toml"))?;
    let c = client(&context::current()?)?;
    let mut path = format!("/v1/apps/{app}/exec");
    if let Some(i) = &args.instance {
        path.push_str(&format!("?instance={i}"));
    }
    let ws = c.websocket(&path).await?;
    let (mut tx, mut rx) = ws.split();
    let (rows, cols) = if args.tty {
        crate::term::size().unwrap_or((24, 80))
    } else {
        (0, 0)
    };
    let start = Frame::ExecStart {
        stream: 0,
        start: ExecStart {
            argv: args.command.clone(),
            env: vec![],
            tty: args.tty,
            rows,
            cols,
        },
    };
    tx.send(Message::Binary(start.to_bytes().into()))
        .await
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot start the command: {e}")))?;
    let _raw = if args.tty && crate::term::stdin_is_tty() {
        crate::term::RawMode::enable()
    } else {
        None
    };

    // stdin → Stdin frames; end of input → StdinClose.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Frame>(16);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = in_tx.send(Frame::StdinClose { stream: 0 }).await;
                    return;
                }
                Ok(n) => {
                    if in_tx
                        .send(Frame::Stdin {
                            stream: 0,
                            bytes: buf[..n].to_vec(),
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        tokio::select! {
            Some(frame) = in_rx.recv() => {
                if tx.send(Message::Binary(frame.to_bytes().into())).await.is_err() {
                    break;
                }
            }
            msg = rx.next() => {
                let bytes = match msg {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Err(e)) => return Err(CliError::new(exit::FAILURE, format!("exec session failed: {e}"))),
                    Some(Ok(_)) => continue,
                };
                match Frame::decode(&bytes) {
                    Ok(Some((Frame::Stdout { bytes, .. }, _))) => {
                        let _ = stdout.write_all(&bytes).await;
                        let _ = stdout.flush().await;
                    }
                    Ok(Some((Frame::Stderr { bytes, .. }, _))) => {
                        let _ = stderr.write_all(&bytes).await;
                        let _ = stderr.flush().await;
                    }
                    Ok(Some((Frame::Error { message, .. }, _))) => eprintln!("error: {message}"),
                    Ok(Some((Frame::Exit { status, .. }, _))) => return Ok(status.as_code()),
                    _ => {}
                }
            }
        }
    }
    Err(CliError::new(
        exit::FAILURE,
        "the exec session ended before the command exited",
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_utc_iso8601() {
        assert_eq!(super::format_ts(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::format_ts(1_795_654_923_456),
            "2026-11-26T01:02:03.456Z"
        );
        assert_eq!(
            super::format_ts(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
