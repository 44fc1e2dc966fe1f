//! `kiln.toml`: parsing, defaults, validation, printing and JSON Schema.
//!
//! This crate owns the manifest format users write: its schema (declared once, in `schema.rs`,
//! and rendered as JSON Schema by [`json_schema`]), its defaults ([`defaults`]), its error
//! messages (every problem of a file at once, each with line, column, what was expected and, for
//! a misspelt key or value, a suggestion), the resolved form [`Manifest`] that the control plane
//! stores in releases (and reads back across versions), the printer [`to_toml`] behind
//! `kiln config show --resolved`, and the template behind `kiln init`.
//!
//! It converts its own pieces into the WorkloadSpec pieces they become ([`Service::to_spec`],
//! [`Manifest::mount_specs`]) but never builds a whole [`kiln_types::WorkloadSpec`]: instance ids,
//! addresses and hosts belong to the control plane. It does no I/O.
//!
//! Parsing is total: any input gives a manifest or a list of problems, never a panic (fuzzed in
//! `fuzz/`, property-tested in `tests/`).

mod init;
mod json_schema;
mod model;
mod render;
mod schema;
mod text;
mod validate;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use init::{app_name_from_image, template as init_template, InitOptions, SECTION_MARK};
pub use json_schema::{json_schema, json_schema_text};
pub use model::{
    Deploy, Manifest, MaxUnavailable, Metrics, Mount, Process, Restart, RestartPolicy, Scale,
    Secrets, SecretsReload, Service, Strategy, Vm,
};
pub use render::{to_toml, Style};
pub use text::{format_duration, parse_duration, parse_size_mib, split_command};

/// Memory is allocated in units of this many MiB.
pub const MEMORY_UNIT_MIB: u64 = 64;
/// Largest `vm.memory_mib`.
pub const MAX_MEMORY_MIB: u64 = 256 * 1024;
/// Largest instance count per process group and region accepted in a manifest.
pub const MAX_COUNT: u32 = 1_000;
/// Largest volume (16 TiB), in MiB.
pub const MAX_VOLUME_MIB: u64 = 16 * 1024 * 1024;
/// Longest `stop_timeout` and `deploy.health_timeout` (24 hours).
pub const MAX_DURATION_MS: u64 = 24 * 3_600_000;
/// Manifests larger than this are refused before parsing (a kiln.toml is a few KiB).
pub const MAX_SOURCE_BYTES: usize = 1024 * 1024;

/// Defaults, documented in docs/specs/manifest/manifest-schema.md (a docs test compares).
pub mod defaults {
    use kiln_types::workload::{CheckSpec, Concurrency};

    /// The process group of a manifest without `[processes]`.
    pub const PROCESS: &str = "app";
    pub const PRIMARY_REGION: &str = "local";
    pub const CPUS: u32 = 1;
    pub const MEMORY_MIB: u64 = 256;
    pub const COUNT: u32 = 1;
    pub const SOFT_LIMIT: u32 = Concurrency::DEFAULT_SOFT;
    pub const HARD_LIMIT: u32 = Concurrency::DEFAULT_HARD;
    pub const CHECK_INTERVAL: &str = "10s";
    pub const CHECK_INTERVAL_MS: u64 = CheckSpec::DEFAULT_INTERVAL_MS;
    pub const CHECK_TIMEOUT: &str = "2s";
    pub const CHECK_TIMEOUT_MS: u64 = CheckSpec::DEFAULT_TIMEOUT_MS;
    pub const CHECK_GRACE_PERIOD: &str = "5s";
    pub const CHECK_GRACE_PERIOD_MS: u64 = CheckSpec::DEFAULT_GRACE_PERIOD_MS;
    pub const VOLUME_SIZE: &str = "1gb";
    pub const VOLUME_SIZE_MIB: u64 = 1024;
    pub const MAX_UNAVAILABLE: u32 = 1;
    pub const HEALTH_TIMEOUT: &str = "60s";
    pub const HEALTH_TIMEOUT_MS: u64 = 60_000;
    pub const MAX_RETRIES: u32 = 10;
    pub const STOP_SIGNAL: &str = "SIGTERM";
    pub const STOP_TIMEOUT: &str = "5s";
    pub const STOP_TIMEOUT_MS: u64 = 5_000;
}

/// One problem found in a manifest, with its position (1-based, column in characters) when known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "line {l}, column {c}: {}", self.message),
            (Some(l), None) => write!(f, "line {l}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

/// The manifest could not be accepted; every problem found is listed, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file} is invalid: {}", render_problems(problems))]
pub struct ManifestError {
    pub file: String,
    pub problems: Vec<Problem>,
}

fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ManifestError {
    /// One line per problem, prefixed with `file:line:column:` like a compiler.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for p in &self.problems {
            match (p.line, p.column) {
                (Some(l), Some(c)) => {
                    out.push_str(&format!("{}:{l}:{c}: {}\n", self.file, p.message))
                }
                (Some(l), None) => out.push_str(&format!("{}:{l}: {}\n", self.file, p.message)),
                _ => out.push_str(&format!("{}: {}\n", self.file, p.message)),
            }
        }
        out
    }
}

/// Parses and validates `source` (the text of `file`). Every problem is reported at once.
pub fn parse(file: &str, source: &str) -> Result<Manifest, ManifestError> {
    let fail = |problems| ManifestError {
        file: file.to_owned(),
        problems,
    };
    if source.len() > MAX_SOURCE_BYTES {
        return Err(fail(vec![Problem {
            line: None,
            column: None,
            message: format!(
                "the file is {} bytes; a manifest is at most {MAX_SOURCE_BYTES}",
                source.len()
            ),
        }]));
    }
    let at = |span: Option<std::ops::Range<usize>>, message: String| {
        let (line, column) = match span {
            Some(s) => {
                let (l, c) = text::position(source, s.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        Problem {
            line,
            column,
            message,
        }
    };
    let (root, syntax) = toml::de::DeTable::parse_recoverable(source);
    if !syntax.is_empty() {
        // The tree after a syntax error is a guess; checking it would report problems that are
        // not in the file. Syntax errors alone, all of them.
        let mut problems: Vec<Problem> = syntax
            .iter()
            .map(|e| at(e.span(), format!("invalid TOML: {}", e.message().trim())))
            .collect();
        problems.sort_by_key(|p| (p.line, p.column));
        problems.dedup();
        return Err(fail(problems));
    }
    let mut cx = validate::Cx {
        problems: Vec::new(),
    };
    match validate::manifest(&mut cx, root.get_ref()) {
        Some(m) if cx.problems.is_empty() => Ok(m),
        _ => {
            cx.problems.sort_by_key(|(span, _)| span.start);
            let mut problems: Vec<Problem> = cx
                .problems
                .into_iter()
                .map(|(span, msg)| at(Some(span), msg))
                .collect();
            problems.dedup();
            Err(fail(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_defaults_agree_with_their_numbers() {
        use defaults as d;
        let ms = |s: &str| parse_duration(s).map(|d| d.as_millis() as u64);
        assert_eq!(ms(d::HEALTH_TIMEOUT), Some(d::HEALTH_TIMEOUT_MS));
        assert_eq!(ms(d::STOP_TIMEOUT), Some(d::STOP_TIMEOUT_MS));
        assert_eq!(ms(d::CHECK_INTERVAL), Some(d::CHECK_INTERVAL_MS));
        assert_eq!(ms(d::CHECK_TIMEOUT), Some(d::CHECK_TIMEOUT_MS));
        assert_eq!(ms(d::CHECK_GRACE_PERIOD), Some(d::CHECK_GRACE_PERIOD_MS));
        assert_eq!(parse_size_mib(d::VOLUME_SIZE), Some(d::VOLUME_SIZE_MIB));
        assert_eq!(d::MEMORY_MIB % MEMORY_UNIT_MIB, 0);
    }
}
