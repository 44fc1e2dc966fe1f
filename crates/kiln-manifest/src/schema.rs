//! The manifest's shape, declared once.
//!
//! Every table and key of `kiln.toml` is listed here with its type, default and meaning. The
//! validator asks this tree which keys exist (so an unknown key is found, and a misspelt one gets a
//! suggestion), what to say a value should have been, and [`crate::json_schema`] renders the same
//! tree as JSON Schema. A key the validator reads but this tree lacks is a bug caught by the tests
//! (they parse a manifest that uses every key).

/// What a key holds.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ty {
    /// Any string (further rules are the validator's).
    Str,
    /// A DNS label: lowercase letters, digits and `-`, starting with a letter.
    Name,
    /// An integer in a range.
    Int {
        min: i64,
        max: i64,
    },
    /// An integer that is a multiple of `step`, in a range.
    IntStep {
        min: i64,
        max: i64,
        step: i64,
    },
    Bool,
    /// `"500ms"`, `"30s"`, `"5m"`, `"1h"`, or a sum like `"1m30s"`.
    Duration,
    /// `"512mb"`, `"1gb"` (binary units).
    Size,
    /// One of these strings.
    Enum(&'static [&'static str]),
    /// A command: an array of strings, or one string split like a shell would.
    Command,
    /// An array of DNS labels.
    Names,
    /// An array of DNS names.
    Hostnames,
    /// An array of ports.
    Ports,
    /// A count (integer ≥ 1) or a percentage (`"25%"`).
    CountOrPercent,
    /// A table of strings keyed by environment variable names.
    EnvMap,
    /// A table of instance counts keyed by region name.
    RegionCounts,
    Table(&'static Table),
    /// An array of tables (`[[name]]`).
    Tables(&'static Table),
    /// A table of tables keyed by a DNS label (`[name.<label>]`).
    NamedTables(&'static Table),
}

/// A documented default.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Default {
    Str(&'static str),
    Int(i64),
    Bool(bool),
    /// Not a constant: described in words (e.g. "`[primary_region]`").
    Derived(&'static str),
}

#[derive(Debug)]
pub(crate) struct Field {
    pub name: &'static str,
    pub ty: Ty,
    pub required: bool,
    pub default: Option<Default>,
    pub doc: &'static str,
}

#[derive(Debug)]
pub(crate) struct Table {
    pub doc: &'static str,
    pub fields: &'static [Field],
}

impl Table {
    pub fn field(&self, name: &str) -> Option<&'static Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

const fn f(name: &'static str, ty: Ty, doc: &'static str) -> Field {
    Field {
        name,
        ty,
        required: false,
        default: None,
        doc,
    }
}

const fn req(name: &'static str, ty: Ty, doc: &'static str) -> Field {
    Field {
        name,
        ty,
        required: true,
        default: None,
        doc,
    }
}

const fn d(name: &'static str, ty: Ty, default: Default, doc: &'static str) -> Field {
    Field {
        name,
        ty,
        required: false,
        default: Some(default),
        doc,
    }
}

pub(crate) const PORT: Ty = Ty::Int { min: 1, max: 65535 };
pub(crate) const PROTOCOLS: &[&str] = &["tls", "tcp"];
pub(crate) const CHECK_KINDS: &[&str] = &["tcp", "http", "exec"];
pub(crate) const CPU_KINDS: &[&str] = &["shared", "performance"];
pub(crate) const SECRETS_RELOADS: &[&str] = &["restart", "signal"];
pub(crate) const STRATEGIES: &[&str] = &["rolling", "canary", "bluegreen", "immediate"];
pub(crate) const RESTART_POLICIES: &[&str] = &["always", "on-failure", "never"];
pub(crate) const STOP_SIGNALS: &[&str] = &[
    "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL",
];

use crate::defaults as df;

pub(crate) static CONCURRENCY: Table = Table {
    doc: "How many connections one instance takes through the edge.",
    fields: &[
        d(
            "soft_limit",
            Ty::Int {
                min: 1,
                max: 1_000_000,
            },
            Default::Int(df::SOFT_LIMIT as i64),
            "Above this many open connections the edge prefers other instances.",
        ),
        d(
            "hard_limit",
            Ty::Int {
                min: 1,
                max: 1_000_000,
            },
            Default::Int(df::HARD_LIMIT as i64),
            "At this many open connections the edge sends no more to the instance; at least soft_limit.",
        ),
    ],
};

pub(crate) static CHECK: Table = Table {
    doc: "A health check. An instance is healthy when every check of every service passes.",
    fields: &[
        d(
            "kind",
            Ty::Enum(CHECK_KINDS),
            Default::Str("tcp"),
            "tcp: a connection to internal_port succeeds; http: GET path answers 2xx; exec: command exits 0 inside the instance.",
        ),
        d(
            "interval",
            Ty::Duration,
            Default::Str(df::CHECK_INTERVAL),
            "Time between two checks; at least 1s.",
        ),
        d(
            "timeout",
            Ty::Duration,
            Default::Str(df::CHECK_TIMEOUT),
            "A check that takes longer fails; at most interval.",
        ),
        d(
            "grace_period",
            Ty::Duration,
            Default::Str(df::CHECK_GRACE_PERIOD),
            "Failures during this time after start do not count.",
        ),
        d(
            "path",
            Ty::Str,
            Default::Str("/"),
            "http only: the path requested; starts with /.",
        ),
        d(
            "tls",
            Ty::Bool,
            Default::Derived("true for a tls service, false for tcp"),
            "http only: speak TLS to the port (the certificate is not verified).",
        ),
        f(
            "command",
            Ty::Command,
            "exec only (required there): the command run inside the instance.",
        ),
    ],
};

pub(crate) static SERVICE: Table = Table {
    doc: "A port the app serves, and how the edge routes to it.",
    fields: &[
        req(
            "protocol",
            Ty::Enum(PROTOCOLS),
            "tls: routed by SNI hostname at the edge, never terminated there; tcp: routed by public port.",
        ),
        req(
            "internal_port",
            PORT,
            "The port the app listens on inside the instance (on IPv6, [::]).",
        ),
        f(
            "ports",
            Ty::Ports,
            "tcp only: public ports the edge routes to this service.",
        ),
        f(
            "hostnames",
            Ty::Hostnames,
            "tls only: DNS names routed to this service besides <app>.<domain>.",
        ),
        d(
            "proxy_protocol",
            Ty::Bool,
            Default::Bool(false),
            "Prepend a PROXY protocol v2 header (the client's address) to each connection.",
        ),
        f(
            "concurrency",
            Ty::Table(&CONCURRENCY),
            "Connection limits per instance.",
        ),
        f(
            "checks",
            Ty::Tables(&CHECK),
            "Health checks; default: one tcp check with default timings.",
        ),
    ],
};

pub(crate) static VM: Table = Table {
    doc: "Size of each instance.",
    fields: &[
        d(
            "cpus",
            Ty::Int { min: 1, max: 64 },
            Default::Int(df::CPUS as i64),
            "Virtual CPUs.",
        ),
        d(
            "cpu_kind",
            Ty::Enum(CPU_KINDS),
            Default::Str("shared"),
            "shared: oversubscribed with other instances; performance: dedicated cores.",
        ),
        d(
            "memory_mib",
            Ty::IntStep {
                min: crate::MEMORY_UNIT_MIB as i64,
                max: crate::MAX_MEMORY_MIB as i64,
                step: crate::MEMORY_UNIT_MIB as i64,
            },
            Default::Int(df::MEMORY_MIB as i64),
            "Memory in MiB, a hard cap; a multiple of 64.",
        ),
        d(
            "read_only_root",
            Ty::Bool,
            Default::Bool(false),
            "Mount the instance's root filesystem read-only; volumes, /tmp and /run stay writable.",
        ),
    ],
};

pub(crate) static SCALE: Table = Table {
    doc: "How many instances run.",
    fields: &[
        d(
            "count",
            Ty::Int {
                min: 0,
                max: crate::MAX_COUNT as i64,
            },
            Default::Int(df::COUNT as i64),
            "Instances per region.",
        ),
        d(
            "min",
            Ty::Int {
                min: 0,
                max: crate::MAX_COUNT as i64,
            },
            Default::Derived("count"),
            "Lower bound for autoscaling; at most count.",
        ),
        d(
            "max",
            Ty::Int {
                min: 0,
                max: crate::MAX_COUNT as i64,
            },
            Default::Derived("count"),
            "Upper bound for autoscaling; at least count.",
        ),
        d(
            "regions",
            Ty::RegionCounts,
            Default::Derived("count in every region"),
            "Instances in the regions named here, instead of count; each a region of the app.",
        ),
    ],
};

pub(crate) static PROCESS: Table = Table {
    doc: "A process group: instances of the same image running their own command.",
    fields: &[
        f(
            "entrypoint",
            Ty::Command,
            "Replaces the image's entrypoint (and drops its cmd); default: the top-level entrypoint.",
        ),
        f("command", Ty::Command, "Replaces the image's cmd."),
        f(
            "scale",
            Ty::Table(&SCALE),
            "Default: the top-level [scale].",
        ),
        f("services", Ty::Tables(&SERVICE), "This group's services."),
    ],
};

pub(crate) static MOUNT: Table = Table {
    doc: "A local volume attached to each instance (one volume per instance).",
    fields: &[
        req("volume", Ty::Name, "The volume's name."),
        req(
            "path",
            Ty::Str,
            "Absolute path inside the instance where the volume is mounted.",
        ),
        d(
            "initial_size",
            Ty::Size,
            Default::Str(df::VOLUME_SIZE),
            "Size of a volume created for this mount; at least 64mb.",
        ),
        d(
            "processes",
            Ty::Names,
            Default::Derived("every process group"),
            "Process groups whose instances get the volume.",
        ),
    ],
};

pub(crate) static DEPLOY: Table = Table {
    doc: "How a new release replaces the running one.",
    fields: &[
        d(
            "strategy",
            Ty::Enum(STRATEGIES),
            Default::Str("rolling"),
            "rolling, canary, bluegreen or immediate.",
        ),
        d(
            "max_unavailable",
            Ty::CountOrPercent,
            Default::Int(df::MAX_UNAVAILABLE as i64),
            "Instances (a count, or a percentage like \"25%\") replaced at once during a rolling deploy: new ones start above the count, and an old one stops only once a new one is healthy.",
        ),
        f(
            "release_command",
            Ty::Command,
            "Run once in a new instance of the release before it is deployed (e.g. migrations); the deploy stops if it fails.",
        ),
        d(
            "health_timeout",
            Ty::Duration,
            Default::Str(df::HEALTH_TIMEOUT),
            "A release not fully healthy this long after its creation fails.",
        ),
        d(
            "auto_rollback",
            Ty::Bool,
            Default::Bool(true),
            "When a deploy fails, the previous release keeps (or goes back to) serving.",
        ),
    ],
};

pub(crate) static SECRETS: Table = Table {
    doc: "How the app's secrets reach it (always as a JSON file).",
    fields: &[
        d(
            "export_env",
            Ty::Bool,
            Default::Bool(false),
            "Also export every secret as an environment variable.",
        ),
        d(
            "reload",
            Ty::Enum(SECRETS_RELOADS),
            Default::Str("restart"),
            "When secrets change: restart rolls the instances (a new release); signal replaces the file in place and sends SIGHUP.",
        ),
    ],
};

pub(crate) static METRICS: Table = Table {
    doc: "Where the app serves Prometheus metrics.",
    fields: &[
        req("port", PORT, "Port inside the instance."),
        d(
            "path",
            Ty::Str,
            Default::Str("/metrics"),
            "HTTP path; starts with /.",
        ),
    ],
};

pub(crate) static RESTART: Table = Table {
    doc: "What happens when an instance exits on its own.",
    fields: &[
        d(
            "policy",
            Ty::Enum(RESTART_POLICIES),
            Default::Str("on-failure"),
            "always or on-failure: replace it; never: leave it failed.",
        ),
        d(
            "max_retries",
            Ty::Int { min: 0, max: 1_000 },
            Default::Int(df::MAX_RETRIES as i64),
            "Replacements per process group of a release before giving up.",
        ),
    ],
};

pub(crate) static MANIFEST: Table = Table {
    doc: "kiln.toml: how Kiln runs an app.",
    fields: &[
        req(
            "app",
            Ty::Name,
            "The app's name; the first label of its hostname.",
        ),
        f(
            "image",
            Ty::Str,
            "OCI image reference (tag or digest); `kiln deploy --image` overrides it.",
        ),
        d(
            "primary_region",
            Ty::Name,
            Default::Str(df::PRIMARY_REGION),
            "The region the app runs in first.",
        ),
        d(
            "regions",
            Ty::Names,
            Default::Derived("[primary_region]"),
            "Every region the app runs in; includes primary_region.",
        ),
        f(
            "entrypoint",
            Ty::Command,
            "Replaces the image's entrypoint (and drops its cmd).",
        ),
        f(
            "command",
            Ty::Command,
            "Replaces the image's cmd (without [processes]).",
        ),
        f(
            "env",
            Ty::EnvMap,
            "Environment variables, applied over the image's. Not for secrets.",
        ),
        f(
            "services",
            Ty::Tables(&SERVICE),
            "The app's services (without [processes]).",
        ),
        f("vm", Ty::Table(&VM), "Size of each instance."),
        f(
            "scale",
            Ty::Table(&SCALE),
            "Instance count (of each process group that sets none).",
        ),
        f(
            "processes",
            Ty::NamedTables(&PROCESS),
            "Several process groups from one image; default: one group named app.",
        ),
        f("mounts", Ty::Tables(&MOUNT), "Local volumes."),
        f(
            "deploy",
            Ty::Table(&DEPLOY),
            "Deploy strategy and health gating.",
        ),
        f("secrets", Ty::Table(&SECRETS), "Secrets delivery."),
        f(
            "metrics",
            Ty::Table(&METRICS),
            "Prometheus metrics endpoint.",
        ),
        f("restart", Ty::Table(&RESTART), "Restart policy."),
        d(
            "stop_signal",
            Ty::Enum(STOP_SIGNALS),
            Default::Str(df::STOP_SIGNAL),
            "Signal sent to stop an instance.",
        ),
        d(
            "stop_timeout",
            Ty::Duration,
            Default::Str(df::STOP_TIMEOUT),
            "Time between the stop signal and SIGKILL.",
        ),
    ],
};

impl Ty {
    /// What a value of this type looks like, for "expected ..." messages.
    pub fn expected(&self) -> String {
        match self {
            Ty::Str => "a string".into(),
            Ty::Name => "a name (lowercase letters, digits and '-', starting with a letter)".into(),
            Ty::Int { min, max } => format!("an integer from {min} to {max}"),
            Ty::IntStep { min, max, step } => {
                format!("a multiple of {step} from {min} to {max}")
            }
            Ty::Bool => "true or false".into(),
            Ty::Duration => "a duration like \"500ms\", \"30s\", \"5m\" or \"1h\"".into(),
            Ty::Size => "a size like \"512mb\" or \"1gb\"".into(),
            Ty::Enum(values) => format!("one of {}", quoted(values)),
            Ty::Command => "a command: an array of strings, or one string".into(),
            Ty::Names => "an array of names".into(),
            Ty::Hostnames => "an array of DNS names".into(),
            Ty::Ports => "an array of ports (1 to 65535)".into(),
            Ty::CountOrPercent => "a count (integer ≥ 1) or a percentage like \"25%\"".into(),
            Ty::EnvMap => "a table of strings".into(),
            Ty::RegionCounts => {
                format!(
                    "a table of instance counts (0 to {}) keyed by region, like {{ ams = 3 }}",
                    crate::MAX_COUNT
                )
            }
            Ty::Table(_) => "a table".into(),
            Ty::Tables(_) => "an array of tables".into(),
            Ty::NamedTables(_) => "a table of named tables".into(),
        }
    }
}

pub(crate) fn quoted(values: &[&str]) -> String {
    values
        .iter()
        .map(|v| format!("{v:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
