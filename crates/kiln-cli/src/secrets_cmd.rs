//! `kiln secrets`: set, list, unset and render an app's secrets (docs/cli/05-secrets.md).
//!
//! Values are read from the command line, a file or standard input and sent to the control plane
//! once; nothing here prints a value except `render --reveal`.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use kiln_api::secrets::{SecretsChanged, SetSecrets, UnsetSecrets};
use kiln_types::secrets::SecretName;

use crate::cmd::{client, resolve_app, AppArg, CliError};
use crate::{context, exit};

#[derive(Debug, Subcommand)]
pub enum SecretsCmd {
    /// Set secrets (NAME=VALUE ...): a new secrets version; rolls the app unless --stage.
    Set(SetArgs),
    /// List secret names with the version that set them and a digest (never values).
    List(ListArgs),
    /// Remove secrets: a new secrets version; rolls the app unless --stage.
    Unset(UnsetArgs),
    /// Show the secrets file an instance of the next deploy receives (values masked).
    Render(RenderArgs),
}

#[derive(Debug, Args)]
pub struct EnvArg {
    /// The app's environment.
    #[arg(long = "env", default_value = kiln_types::secrets::DEFAULT_ENV)]
    pub env: String,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    #[command(flatten)]
    pub app: AppArg,
    #[command(flatten)]
    pub env: EnvArg,
    /// NAME=VALUE pairs; with --stdin, a single NAME takes all of standard input as its value.
    pub pairs: Vec<String>,
    /// Read NAME=VALUE lines from standard input (or one value, see above).
    #[arg(long)]
    pub stdin: bool,
    /// Read NAME=VALUE lines from a file (`#` comments and blank lines skipped).
    #[arg(long, value_name = "PATH")]
    pub from_file: Option<PathBuf>,
    /// Record the change for the next deploy without rolling the app now.
    #[arg(long)]
    pub stage: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub app: AppArg,
    #[command(flatten)]
    pub env: EnvArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UnsetArgs {
    #[command(flatten)]
    pub app: AppArg,
    #[command(flatten)]
    pub env: EnvArg,
    /// Names to remove.
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Record the change for the next deploy without rolling the app now.
    #[arg(long)]
    pub stage: bool,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub app: AppArg,
    #[command(flatten)]
    pub env: EnvArg,
    /// Show values (the token needs the `secrets:read` scope).
    #[arg(long)]
    pub reveal: bool,
}

fn usage(msg: impl Into<String>) -> CliError {
    CliError::new(exit::USAGE, msg)
}

fn name(raw: &str) -> Result<SecretName, CliError> {
    raw.parse()
        .map_err(|e| usage(format!("invalid secret name {raw:?}: {e}")))
}

/// Parses `NAME=VALUE` lines. Errors name the line, never its value.
fn parse_lines(text: &str, origin: &str) -> Result<Vec<(SecretName, String)>, CliError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (n, v) = trimmed.split_once('=').ok_or_else(|| {
            CliError::new(
                exit::INVALID_CONFIG,
                format!("{origin} line {}: expected NAME=VALUE", i + 1),
            )
        })?;
        let n = n.trim().parse::<SecretName>().map_err(|e| {
            CliError::new(
                exit::INVALID_CONFIG,
                format!("{origin} line {}: {e}", i + 1),
            )
        })?;
        out.push((n, v.to_owned()));
    }
    Ok(out)
}

fn collect(args: &SetArgs) -> Result<BTreeMap<String, String>, CliError> {
    let mut values: Vec<(SecretName, String)> = Vec::new();
    let mut bare: Vec<&str> = Vec::new();
    for p in &args.pairs {
        match p.split_once('=') {
            Some((n, v)) => values.push((name(n)?, v.to_owned())),
            None => bare.push(p),
        }
    }
    if let Some(path) = &args.from_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CliError::new(
                exit::INVALID_CONFIG,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        values.extend(parse_lines(&text, &path.display().to_string())?);
    }
    if args.stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| CliError::new(exit::FAILURE, format!("cannot read stdin: {e}")))?;
        match bare.as_slice() {
            [one] => {
                // The whole input is one value (a PEM key, a JSON document); a single trailing
                // newline, as `echo` or an editor adds, is not part of it.
                let value = text.strip_suffix('\n').unwrap_or(&text).to_owned();
                values.push((name(one)?, value));
                bare.clear();
            }
            [] => values.extend(parse_lines(&text, "stdin")?),
            _ => {
                return Err(usage(
                    "with --stdin, give one bare NAME or only NAME=VALUE pairs",
                ))
            }
        }
    }
    if let Some(b) = bare.first() {
        return Err(usage(format!("{b:?} has no value"))
            .hint("write NAME=VALUE, or `NAME --stdin` to read the value from standard input"));
    }
    if values.is_empty() {
        return Err(usage("no secrets given")
            .hint("kiln secrets set NAME=VALUE ..., or --from-file PATH, or --stdin"));
    }
    Ok(values
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect())
}

fn report(app: &str, verb: &str, names: &[String], out: &SecretsChanged) {
    println!(
        "{verb} {} on {app} ({}): secrets version {}",
        names.join(", "),
        out.env,
        out.version
    );
    match (out.rollout.as_str(), out.release_version) {
        ("restart", Some(v)) => println!(
            "Rolling out as release v{v} (same image and manifest); follow with `kiln status -a {app}`."
        ),
        ("signal", _) => println!(
            "Running instances get the new file in place and SIGHUP ([secrets] reload = \"signal\")."
        ),
        _ if out.staged => println!("Staged: the next `kiln deploy` uses it."),
        _ => println!("No release is running; the next `kiln deploy` uses it."),
    }
}

/// Hints for the secrets routes' own problem codes.
fn hinted(e: kiln_api::ApiError) -> CliError {
    let mut err = CliError::from(e);
    if err.message.ends_with("[secret_not_found]") {
        err = err.hint("see the names with `kiln secrets list`");
    } else if err.message.ends_with("[secrets_unavailable]")
        || err.message.ends_with("[master_key_error]")
    {
        err = err.hint(
            "the control plane's operator must configure its master key (see `kilnd control keys`)",
        );
    } else if err.code == exit::AUTH && err.message.contains("secrets:") {
        err = err.hint(
            "use a token with the secrets:write (set, unset) or secrets:read (--reveal) scope",
        );
    }
    err
}

pub async fn run(cmd: SecretsCmd) -> Result<(), CliError> {
    let manifest = Path::new("kiln.toml");
    match cmd {
        SecretsCmd::Set(args) => {
            let app = resolve_app(&args.app, manifest)?;
            let secrets = collect(&args)?;
            let names: Vec<String> = secrets.keys().cloned().collect();
            let out = client(&context::current()?)?
                .set_secrets(
                    &app,
                    Some(&args.env.env),
                    &SetSecrets {
                        secrets,
                        stage: args.stage,
                    },
                )
                .await
                .map_err(hinted)?;
            report(&app, "Set", &names, &out);
            Ok(())
        }
        SecretsCmd::Unset(args) => {
            let app = resolve_app(&args.app, manifest)?;
            for n in &args.names {
                name(n)?;
            }
            let out = client(&context::current()?)?
                .unset_secrets(
                    &app,
                    Some(&args.env.env),
                    &UnsetSecrets {
                        names: args.names.clone(),
                        stage: args.stage,
                    },
                )
                .await
                .map_err(hinted)?;
            report(&app, "Unset", &args.names, &out);
            Ok(())
        }
        SecretsCmd::List(args) => {
            let app = resolve_app(&args.app, manifest)?;
            let list = client(&context::current()?)?
                .list_secrets(&app, Some(&args.env.env))
                .await
                .map_err(hinted)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
                return Ok(());
            }
            let deployed = list
                .deployed_version
                .map_or("-".to_owned(), |v| v.to_string());
            println!(
                "{app} ({}): secrets version {}{}, newest release has version {deployed}",
                list.env,
                list.version,
                if list.staged { " (staged)" } else { "" }
            );
            println!("{:<32} {:<8} DIGEST", "NAME", "VERSION");
            for s in list.secrets {
                println!("{:<32} {:<8} {}", s.name, s.version, s.digest);
            }
            Ok(())
        }
        SecretsCmd::Render(args) => {
            let app = resolve_app(&args.app, manifest)?;
            let out = client(&context::current()?)?
                .render_secrets(&app, Some(&args.env.env), args.reveal)
                .await
                .map_err(hinted)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&out.file).unwrap_or_default()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_skip_comments_and_keep_values_verbatim() {
        let got = parse_lines("# c\n\nA=1\nB= x=y \n", "f").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].1, " x=y ");
        let err = parse_lines("A=1\nnot a pair with secret-ish\n", "f").unwrap_err();
        assert!(err.message.contains("line 2"));
        assert!(!err.message.contains("secret-ish"));
        assert!(parse_lines("lower=1", "f").is_err());
    }
}
