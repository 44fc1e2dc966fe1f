//! The context file: named control planes with their tokens, and which one is current.
//!
//! Location: `$KILN_CONFIG`, else `$XDG_CONFIG_HOME/kiln/config.toml`, else
//! `~/.config/kiln/config.toml`. Written with mode 0600 because it holds tokens.
//! `KILN_API_URL` with `KILN_TOKEN` override the file entirely (for CI).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cmd::CliError;
use crate::exit;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ContextFile {
    #[serde(default)]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Context {
    pub api: String,
    pub token: String,
    /// The org the token belongs to (by name), for `kiln context list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    /// The user the token acts for (their email), when it came from `kiln login`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

pub fn path() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_CONFIG") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("kiln").join("config.toml")
}

pub fn load() -> Result<ContextFile, CliError> {
    let p = path();
    match std::fs::read_to_string(&p) {
        Ok(s) => toml::from_str(&s).map_err(|e| {
            CliError::new(
                exit::INVALID_CONFIG,
                format!("context file {} is invalid: {}", p.display(), e.message()),
            )
            .hint("fix or remove the file, then run `kiln context add`")
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ContextFile::default()),
        Err(e) => Err(CliError::new(
            exit::INVALID_CONFIG,
            format!("cannot read context file {}: {e}", p.display()),
        )),
    }
}

pub fn save(file: &ContextFile) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = path();
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("cannot create {}: {e}", dir.display()),
            )
        })?;
    }
    let body = toml::to_string_pretty(file)
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot encode context file: {e}")))?;
    let tmp = p.with_extension("toml.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(body.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)
    };
    write().map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot write context file {}: {e}", p.display()),
        )
    })
}

/// The control plane and token to use.
pub fn current() -> Result<Context, CliError> {
    if let (Ok(api), Ok(token)) = (std::env::var("KILN_API_URL"), std::env::var("KILN_TOKEN")) {
        return Ok(Context {
            api,
            token,
            ..Default::default()
        });
    }
    let file = load()?;
    let name = file.current.clone().ok_or_else(|| {
        CliError::new(exit::AUTH, "no control plane configured")
            .hint("run `kiln login --url URL`, or the `kiln context add ...` command that `kilnd dev` printed at first start")
    })?;
    file.contexts.get(&name).cloned().ok_or_else(|| {
        CliError::new(
            exit::INVALID_CONFIG,
            format!(
                "current context {name:?} is not defined in {}",
                path().display()
            ),
        )
        .hint("run `kiln context list` and `kiln context use NAME`")
    })
}
