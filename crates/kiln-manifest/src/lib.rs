//! `kiln.toml`: parsing, defaults and validation.
//!
//! This crate owns the manifest format users write: its schema, its defaults, and its error
//! messages, which name the line and column of every problem. It turns a file into a
//! [`Manifest`] whose every field is resolved (defaults applied). It does not know about releases,
//! hosts or the [`kiln_types::WorkloadSpec`]; the control plane derives those from a manifest.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use kiln_types::{AppName, MiB, ServiceProtocol};

/// Memory is allocated in units of this many MiB.
pub const MEMORY_UNIT_MIB: u64 = 64;
/// Largest instance count per process group accepted in a manifest.
pub const MAX_COUNT: u32 = 1_000;

/// One problem found in a manifest, with its position (1-based) when known.
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

/// The manifest could not be accepted; every problem found is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file} is invalid: {}", render(problems))]
pub struct ManifestError {
    pub file: String,
    pub problems: Vec<Problem>,
}

fn render(problems: &[Problem]) -> String {
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

/// `kiln.toml` as written (raw, with spans for validation messages).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    app: Spanned<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    primary_region: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    vm: Option<RawVm>,
    #[serde(default)]
    scale: Option<RawScale>,
    #[serde(default)]
    deploy: Option<RawDeploy>,
    #[serde(default)]
    stop_signal: Option<Spanned<String>>,
    #[serde(default)]
    stop_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    protocol: ServiceProtocol,
    internal_port: Spanned<i64>,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    hostnames: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    #[serde(default)]
    cpus: Option<Spanned<i64>>,
    #[serde(default)]
    memory_mib: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScale {
    #[serde(default)]
    count: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeploy {
    #[serde(default)]
    health_timeout: Option<Spanned<String>>,
}

/// A validated manifest with every default applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub app: AppName,
    pub image: Option<String>,
    pub primary_region: String,
    pub env: BTreeMap<String, String>,
    pub services: Vec<Service>,
    pub vm: Vm,
    pub scale: Scale,
    pub deploy: Deploy,
    pub stop_signal: String,
    pub stop_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub protocol: ServiceProtocol,
    pub internal_port: u16,
    pub proxy_protocol: bool,
    pub hostnames: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub cpus: u32,
    pub memory: MiB,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scale {
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deploy {
    pub health_timeout_ms: u64,
}

/// Defaults, documented in docs/specs/manifest/manifest-schema.md.
pub mod defaults {
    pub const PRIMARY_REGION: &str = "local";
    pub const CPUS: u32 = 1;
    pub const MEMORY_MIB: u64 = 256;
    pub const COUNT: u32 = 1;
    pub const HEALTH_TIMEOUT_MS: u64 = 60_000;
    pub const STOP_SIGNAL: &str = "SIGTERM";
    pub const STOP_TIMEOUT_MS: u64 = 5_000;
}

const STOP_SIGNALS: &[&str] = &[
    "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL",
];

/// Converts byte offsets to 1-based (line, column).
struct Positions<'a>(&'a str);

impl Positions<'_> {
    fn at(&self, offset: usize) -> (usize, usize) {
        let upto = &self.0[..offset.min(self.0.len())];
        let line = upto.matches('\n').count() + 1;
        let col = upto.rfind('\n').map_or(upto.len(), |i| upto.len() - i - 1) + 1;
        (line, col)
    }
}

struct Collector<'a> {
    pos: Positions<'a>,
    problems: Vec<Problem>,
}

impl Collector<'_> {
    fn at(&mut self, span: std::ops::Range<usize>, message: String) {
        let (l, c) = self.pos.at(span.start);
        self.problems.push(Problem {
            line: Some(l),
            column: Some(c),
            message,
        });
    }
}

/// Parses a duration like `500ms`, `30s`, `5m` or `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1_000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// Parses and validates `source` (the text of `file`). Every problem is reported at once.
pub fn parse(file: &str, source: &str) -> Result<Manifest, ManifestError> {
    let fail = |problems| ManifestError {
        file: file.to_owned(),
        problems,
    };
    let raw: RawManifest = match toml::from_str(source) {
        Ok(r) => r,
        Err(e) => {
            // Syntax and shape errors stop deserialization at the first one: report it precisely.
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = Positions(source).at(span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            let message = e.message().trim().to_owned();
            return Err(fail(vec![Problem {
                line,
                column,
                message,
            }]));
        }
    };
    let mut c = Collector {
        pos: Positions(source),
        problems: Vec::new(),
    };

    let app = match raw.app.get_ref().parse::<AppName>() {
        Ok(a) => Some(a),
        Err(e) => {
            c.at(raw.app.span(), format!("`app`: {e}"));
            None
        }
    };

    let mut services = Vec::new();
    for (i, s) in raw.services.iter().enumerate() {
        let port = *s.internal_port.get_ref();
        if !(1..=65535).contains(&port) {
            c.at(
                s.internal_port.span(),
                format!(
                    "`services[{i}].internal_port` must be a port between 1 and 65535, got {port}"
                ),
            );
            continue;
        }
        for h in &s.hostnames {
            if h.split('.').any(|l| {
                kiln_types::name::check_dns_label(l, 63).is_err()
                    && !l.chars().all(|c| c.is_ascii_digit())
            }) {
                c.problems.push(Problem {
                    line: None,
                    column: None,
                    message: format!("`services[{i}].hostnames`: {h:?} is not a valid DNS name"),
                });
            }
        }
        services.push(Service {
            protocol: s.protocol,
            internal_port: port as u16,
            proxy_protocol: s.proxy_protocol,
            hostnames: s.hostnames.clone(),
        });
    }

    let mut vm = Vm {
        cpus: defaults::CPUS,
        memory: MiB(defaults::MEMORY_MIB),
    };
    if let Some(raw_vm) = &raw.vm {
        if let Some(cpus) = &raw_vm.cpus {
            match u32::try_from(*cpus.get_ref()) {
                Ok(n @ 1..=64) => vm.cpus = n,
                _ => c.at(
                    cpus.span(),
                    format!("`vm.cpus` must be between 1 and 64, got {}", cpus.get_ref()),
                ),
            }
        }
        if let Some(mem) = &raw_vm.memory_mib {
            let m = *mem.get_ref();
            if m < MEMORY_UNIT_MIB as i64 || m % MEMORY_UNIT_MIB as i64 != 0 || m > 256 * 1024 {
                c.at(
                    mem.span(),
                    format!(
                        "`vm.memory_mib` must be a multiple of {MEMORY_UNIT_MIB} between {MEMORY_UNIT_MIB} and 262144, got {m}"
                    ),
                );
            } else {
                vm.memory = MiB(m as u64);
            }
        }
    }

    let mut scale = Scale {
        count: defaults::COUNT,
    };
    if let Some(count) = raw.scale.as_ref().and_then(|s| s.count.as_ref()) {
        match u32::try_from(*count.get_ref()) {
            Ok(n) if n <= MAX_COUNT => scale.count = n,
            _ => c.at(
                count.span(),
                format!(
                    "`scale.count` must be between 0 and {MAX_COUNT}, got {}",
                    count.get_ref()
                ),
            ),
        }
    }

    let mut deploy = Deploy {
        health_timeout_ms: defaults::HEALTH_TIMEOUT_MS,
    };
    if let Some(t) = raw.deploy.as_ref().and_then(|d| d.health_timeout.as_ref()) {
        match parse_duration(t.get_ref()) {
            Some(d) if !d.is_zero() => deploy.health_timeout_ms = d.as_millis() as u64,
            _ => c.at(
                t.span(),
                format!(
                    "`deploy.health_timeout`: {:?} is not a duration like \"30s\" or \"2m\"",
                    t.get_ref()
                ),
            ),
        }
    }

    let mut stop_signal = defaults::STOP_SIGNAL.to_owned();
    if let Some(sig) = &raw.stop_signal {
        if STOP_SIGNALS.contains(&sig.get_ref().as_str()) {
            stop_signal = sig.get_ref().clone();
        } else {
            c.at(
                sig.span(),
                format!(
                    "`stop_signal` must be one of {}, got {:?}",
                    STOP_SIGNALS.join(", "),
                    sig.get_ref()
                ),
            );
        }
    }
    let mut stop_timeout_ms = defaults::STOP_TIMEOUT_MS;
    if let Some(t) = &raw.stop_timeout {
        match parse_duration(t.get_ref()) {
            Some(d) => stop_timeout_ms = d.as_millis() as u64,
            None => c.at(
                t.span(),
                format!(
                    "`stop_timeout`: {:?} is not a duration like \"10s\"",
                    t.get_ref()
                ),
            ),
        }
    }

    for key in raw.env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            c.problems.push(Problem {
                line: None,
                column: None,
                message: format!("`env`: {key:?} is not a valid variable name"),
            });
        }
    }

    match app {
        Some(app) if c.problems.is_empty() => Ok(Manifest {
            app,
            image: raw.image,
            primary_region: raw
                .primary_region
                .unwrap_or_else(|| defaults::PRIMARY_REGION.to_owned()),
            env: raw.env,
            services,
            vm,
            scale,
            deploy,
            stop_signal,
            stop_timeout_ms,
        }),
        _ => Err(fail(c.problems)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
app = "hello-tls"
image = "127.0.0.1:5000/hello-tls:v1"

[env]
GREETING = "hi"

[[services]]
protocol = "tls"
internal_port = 8443
proxy_protocol = true

[vm]
memory_mib = 128
"#;

    #[test]
    fn parses_with_defaults() {
        let m = parse("kiln.toml", GOOD).unwrap();
        assert_eq!(m.app.as_str(), "hello-tls");
        assert_eq!(m.services[0].internal_port, 8443);
        assert!(m.services[0].proxy_protocol);
        assert_eq!(m.vm.memory, MiB(128));
        assert_eq!(m.vm.cpus, defaults::CPUS);
        assert_eq!(m.scale.count, 1);
        assert_eq!(m.stop_signal, "SIGTERM");
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let src = "app = \"x\"\n\n[[services]]\nprotocol = \"tls\"\ninternal_prot = 8443\n";
        let e = parse("kiln.toml", src).unwrap_err();
        assert_eq!(e.problems.len(), 1);
        assert_eq!(e.problems[0].line, Some(5));
        assert!(
            e.problems[0].message.contains("internal_prot"),
            "{}",
            e.problems[0].message
        );
        assert!(e.report().starts_with("kiln.toml:5:1:"), "{}", e.report());
    }

    #[test]
    fn every_value_problem_is_reported_at_once() {
        let src = "app = \"Bad_Name\"\n[[services]]\nprotocol = \"tcp\"\ninternal_port = 70000\n[vm]\nmemory_mib = 100\n";
        let e = parse("kiln.toml", src).unwrap_err();
        let lines: Vec<_> = e.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![Some(1), Some(4), Some(6)], "{}", e.report());
    }

    #[test]
    fn syntax_error_has_position() {
        let e = parse("kiln.toml", "app = \"x\"\nthis is not toml\n").unwrap_err();
        assert_eq!(e.problems[0].line, Some(2));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("2"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1d"), None);
    }
}
