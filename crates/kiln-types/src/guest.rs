//! What the agent hands `kiln-init` inside an instance.
//!
//! The agent writes a [`RunConfig`] as JSON to [`RUN_CONFIG_PATH`] inside the instance before boot;
//! kiln-init reads it as PID 1. It is resolved already: the image's entrypoint, cmd, env, workdir and
//! user merged with the manifest's overrides, so init needs no knowledge of OCI or manifests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where kiln-init finds its run configuration inside the instance.
pub const RUN_CONFIG_PATH: &str = "/.kiln/run.json";
/// Where the kiln-init binary is placed inside the instance.
pub const INIT_PATH: &str = "/.kiln/init";
/// Directory shared with the host under runc (a bind mount of the instance's `run/` directory).
pub const RUN_DIR: &str = "/.kiln/run";
/// The guest channel's Unix socket under runc, served by kiln-init, connected to by the agent.
pub const CHANNEL_SOCKET: &str = "/.kiln/run/channel.sock";

/// Everything kiln-init needs to start the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// argv of the app process; argv[0] is resolved against `PATH` in `env` when it has no '/'.
    pub argv: Vec<String>,
    /// Complete environment of the app process.
    pub env: BTreeMap<String, String>,
    /// Working directory ("/" when the image sets none).
    pub workdir: String,
    /// Numeric uid and gid to run as.
    pub uid: u32,
    pub gid: u32,
    /// The instance's hostname.
    pub hostname: String,
    /// Signal name sent to the app on stop (SIGTERM unless the manifest says otherwise).
    pub stop_signal: String,
    /// Milliseconds between the stop signal and SIGKILL.
    pub stop_timeout_ms: u64,
    /// Network configuration kiln-init applies inside the instance before starting the app (the
    /// same under runc and in a VM); `None` leaves the network as the runtime set it up.
    #[serde(default)]
    pub network: Option<GuestNetwork>,
    /// The secrets file kiln-init must write before starting the app; `None`: the app has none.
    #[serde(default)]
    pub secrets: Option<GuestSecrets>,
}

/// The app's secrets as kiln-init handles them: it waits for the agent's `Secrets` frame before
/// starting the app, writes [`crate::secrets::SECRETS_PATH`], and replaces it on later frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSecrets {
    /// The version the release pins (informational: init writes what the agent sends).
    pub version: u64,
    /// Also put every secret in the app's environment.
    #[serde(default)]
    pub export_env: bool,
    /// Signal sent to the app after the file is replaced in place (`SIGHUP`).
    #[serde(default = "default_reload_signal")]
    pub reload_signal: String,
}

fn default_reload_signal() -> String {
    "SIGHUP".into()
}

/// The instance's interface as kiln-init configures it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// Interface name inside the instance (`eth0`).
    pub interface: String,
    /// The instance's overlay address, configured as a /128.
    pub ipv6: std::net::Ipv6Addr,
    /// Next hop of the default route, reached on-link (the host side answers `fe80::1`).
    pub gateway: std::net::Ipv6Addr,
}
