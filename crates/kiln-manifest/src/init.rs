//! The commented `kiln.toml` that `kiln init` writes.
//!
//! It is a working manifest for one service (every active line is a default or the caller's
//! choice) followed by the optional sections, commented out, each with a line on what it does.
//! Uncommenting any one section (removing `# ` before its lines) keeps the file valid: a test does
//! exactly that for each section.

use kiln_types::{AppName, ServiceProtocol};

use crate::{defaults, text};

/// What `kiln init` asks for.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub app: AppName,
    pub image: String,
    pub protocol: ServiceProtocol,
    pub internal_port: u16,
}

/// Marks the start of an optional section in the template (a test uncomments each one).
pub const SECTION_MARK: &str = "# --- ";

/// The template for `o`.
pub fn template(o: &InitOptions) -> String {
    let image = toml::Value::String(o.image.clone()).to_string();
    let routing = match o.protocol {
        ServiceProtocol::Tls => {
            "# tls: the edge routes by SNI to <app>.<domain> and `hostnames`, and never decrypts.\n\
             # hostnames = [\"www.example.com\"]"
        }
        ServiceProtocol::Tcp => {
            "# tcp: the edge routes the public `ports` to this service.\n\
             ports = [{port}]"
        }
    }
    .replace("{port}", &o.internal_port.to_string());
    format!(
        r#"# kiln.toml — how Kiln runs this app. Reference: docs/specs/manifest/manifest-schema.md
# Check it with `kiln config validate`; see every default with `kiln config show --resolved`.

# The app's name: lowercase letters, digits and '-'; the first label of its hostname.
app = "{app}"
# The OCI image (tag or digest). `kiln deploy --image` overrides it.
image = {image}

{mark}how instances are stopped
# stop_signal = "{signal}"
# stop_timeout = "{stop}"

# Variables applied over the image's environment. Not for secrets: they are stored in the
# release and shown by `kiln config show`.
[env]
# LOG_LEVEL = "info"

# Size of each instance. Memory is a hard cap, in MiB, a multiple of {unit}.
[vm]
cpus = {cpus}
memory_mib = {memory}
# cpu_kind = "shared"       # or "performance": dedicated cores

# Instances per region.
[scale]
count = {count}

[[services]]
protocol = "{protocol}"
# The port the app listens on inside the instance, on [::] (IPv6).
internal_port = {port}
{routing}
# Prepend a PROXY protocol v2 header so the app sees the client's address.
proxy_protocol = false

{mark}health checks (default: one tcp check on internal_port)
# [[services.checks]]
# kind = "http"             # tcp | http | exec
# path = "/healthz"
# interval = "{interval}"
# timeout = "{timeout}"
# grace_period = "{grace}"

{mark}connection limits per instance
# [services.concurrency]
# soft_limit = {soft}
# hard_limit = {hard}

{mark}deploys
# [deploy]
# strategy = "rolling"      # rolling | canary | bluegreen | immediate
# max_unavailable = 1       # or a percentage: "25%"
# health_timeout = "{health}"
# auto_rollback = true
# release_command = "/app/migrate"

{mark}a local volume per instance
# [[mounts]]
# volume = "data"
# path = "/data"
# initial_size = "{volume}"

{mark}secrets (always a JSON file in the instance; optionally also env variables)
# [secrets]
# export_env = false
# reload = "restart"        # or "signal": replace the file in place and send SIGHUP

{mark}Prometheus metrics served by the app
# [metrics]
# port = 9091
# path = "/metrics"

{mark}what happens when an instance exits on its own
# [restart]
# policy = "on-failure"     # always | on-failure | never
# max_retries = {retries}

"#,
        app = o.app,
        unit = crate::MEMORY_UNIT_MIB,
        cpus = defaults::CPUS,
        memory = defaults::MEMORY_MIB,
        count = defaults::COUNT,
        protocol = o.protocol.as_str(),
        port = o.internal_port,
        mark = SECTION_MARK,
        interval = defaults::CHECK_INTERVAL,
        timeout = defaults::CHECK_TIMEOUT,
        grace = defaults::CHECK_GRACE_PERIOD,
        soft = defaults::SOFT_LIMIT,
        hard = defaults::HARD_LIMIT,
        health = defaults::HEALTH_TIMEOUT,
        volume = defaults::VOLUME_SIZE,
        retries = defaults::MAX_RETRIES,
        signal = defaults::STOP_SIGNAL,
        stop = text::format_duration(defaults::STOP_TIMEOUT_MS),
    )
}

/// An app name guessed from an image reference: its last path component without tag or digest,
/// made DNS-safe (`registry:5000/team/My_App:v1` → `my-app`).
pub fn app_name_from_image(image: &str) -> Option<AppName> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let repo = last.split(':').next().unwrap_or(last);
    let mut name: String = repo
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while name.contains("--") {
        name = name.replace("--", "-");
    }
    let name = name.trim_start_matches(|c: char| c == '-' || c.is_ascii_digit());
    let name: String = name.chars().take(AppName::MAX_LEN).collect();
    name.trim_end_matches('-').parse().ok()
}
