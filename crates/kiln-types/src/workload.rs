//! The WorkloadSpec: what the scheduler hands a host agent for one instance.
//!
//! The contract is versioned (`spec_version`, "MAJOR.MINOR") and its rules are written in
//! docs/specs/workload-spec.md; in short:
//! 1. an agent accepts any spec of its own major version, and rejects another major whole;
//! 2. a minor version only adds fields, each with a default, so an agent one minor version older
//!    ignores them and one newer fills them in (serde defaults; unknown fields are ignored);
//! 3. a field an agent must not ignore (a mount, an HTTP or exec check, a secrets file, a kernel
//!    choice) is named in `requires` by the writer, and is also derived from the spec itself by
//!    agents that know the field ([`WorkloadSpec::required_capabilities`]);
//! 4. before applying anything, an agent checks the version and that it supports every required
//!    capability ([`WorkloadSpec::check_runnable`]); a spec it cannot run whole is rejected with
//!    the reason, never half-applied.
//!
//! Golden files for every version live in `crates/kiln-types/tests/golden/`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv6Addr;

use serde::{Deserialize, Serialize};

use crate::{AppId, AppName, InstanceId, MiB, MilliCpu, ReleaseId, VolumeId};

/// The WorkloadSpec version this build writes.
pub const WORKLOAD_SPEC_VERSION: &str = "1.2";
const SUPPORTED_MAJOR: u32 = 1;

/// Capabilities a spec can require beyond the 1.0 baseline (run an image with env, command, vm
/// size, network, TCP health checks and a stop signal). An agent lists the ones it supports.
pub mod capability {
    /// `mounts` is not empty: local volumes must be attached.
    pub const MOUNTS: &str = "mounts";
    /// `secrets.version` > 0: the secrets file must be written before the app starts.
    pub const SECRETS: &str = "secrets";
    /// `secrets.export_env`: secrets are also exported as environment variables.
    pub const SECRETS_ENV: &str = "secrets.env";
    /// A service has an HTTP health check.
    pub const CHECK_HTTP: &str = "check.http";
    /// A service has an exec health check (a command run inside the instance).
    pub const CHECK_EXEC: &str = "check.exec";
    /// `boot.kernel` names a kernel other than the host's default.
    pub const BOOT_KERNEL: &str = "boot.kernel";
    /// `vm.cpu_kind` is `performance`: dedicated, not oversubscribed, CPU.
    pub const CPU_PERFORMANCE: &str = "cpu.performance";
    /// `read_only_root`: the root filesystem must be mounted read-only (an agent that ignored it
    /// would run the app writable). Since 1.2.
    pub const ROOT_READ_ONLY: &str = "root.read_only";

    /// Every capability this build knows, sorted.
    pub const ALL: &[&str] = &[
        BOOT_KERNEL,
        CHECK_EXEC,
        CHECK_HTTP,
        CPU_PERFORMANCE,
        MOUNTS,
        ROOT_READ_ONLY,
        SECRETS,
        SECRETS_ENV,
    ];
}

/// An image pinned by digest: the reference the user gave, and the manifest digest it resolved to.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// Registry host (with port), e.g. `127.0.0.1:5000` or `registry-1.docker.io`.
    pub registry: String,
    /// Repository path, e.g. `library/nginx`.
    pub repository: String,
    /// `sha256:<hex>` of the image manifest; the agent pulls by this and nothing else.
    pub digest: String,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.registry, self.repository, self.digest)
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceProtocol {
    /// TLS routed by SNI at the edge, never terminated there.
    Tls,
    /// Plain TCP routed by port.
    Tcp,
}

impl ServiceProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Tcp => "tcp",
        }
    }
}

/// How many connections one instance takes through the edge.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Concurrency {
    /// Above this many open connections the edge prefers other instances.
    pub soft_limit: u32,
    /// At this many open connections the edge sends no more to the instance.
    pub hard_limit: u32,
}

impl Concurrency {
    pub const DEFAULT_SOFT: u32 = 200;
    pub const DEFAULT_HARD: u32 = 250;
}

impl Default for Concurrency {
    fn default() -> Self {
        Self {
            soft_limit: Self::DEFAULT_SOFT,
            hard_limit: Self::DEFAULT_HARD,
        }
    }
}

/// What a health check does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connection to the service's internal port succeeds.
    Tcp,
    /// `GET path` on the service's internal port answers 2xx (over TLS when `tls`, without
    /// verifying the certificate: the check runs on the private network).
    Http { path: String, tls: bool },
    /// `command` run inside the instance exits 0.
    Exec { command: Vec<String> },
}

impl CheckKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http { .. } => "http",
            Self::Exec { .. } => "exec",
        }
    }
}

/// One health check of a service. An instance is healthy when every check of every service
/// passes; failures during `grace_period_ms` after start do not count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    #[serde(flatten)]
    pub kind: CheckKind,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub grace_period_ms: u64,
}

impl CheckSpec {
    pub const DEFAULT_INTERVAL_MS: u64 = 10_000;
    pub const DEFAULT_TIMEOUT_MS: u64 = 2_000;
    pub const DEFAULT_GRACE_PERIOD_MS: u64 = 5_000;

    /// The TCP check with default timings: what a 1.0 spec (which had no `checks`) means.
    pub fn default_tcp() -> Self {
        Self {
            kind: CheckKind::Tcp,
            interval_ms: Self::DEFAULT_INTERVAL_MS,
            timeout_ms: Self::DEFAULT_TIMEOUT_MS,
            grace_period_ms: Self::DEFAULT_GRACE_PERIOD_MS,
        }
    }
}

fn default_checks() -> Vec<CheckSpec> {
    vec![CheckSpec::default_tcp()]
}

/// One service of an instance as the agent and the edge need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub protocol: ServiceProtocol,
    /// The port the app listens on inside the instance.
    pub internal_port: u16,
    /// Prepend a PROXY protocol v2 header to every connection the edge opens.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Hostnames routed to this service (SNI), besides the app's default hostname.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Public ports the edge routes to this service (`tcp` services). Since 1.1.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Since 1.1; absent means the defaults.
    #[serde(default)]
    pub concurrency: Concurrency,
    /// Since 1.1; absent (a 1.0 spec) means one TCP check with default timings.
    #[serde(default = "default_checks")]
    pub checks: Vec<CheckSpec>,
}

/// How to stop the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopSpec {
    /// Signal name, e.g. `SIGTERM`.
    pub signal: String,
    /// How long to wait after the signal before killing.
    pub timeout_ms: u64,
}

impl Default for StopSpec {
    fn default() -> Self {
        Self {
            signal: "SIGTERM".into(),
            timeout_ms: 5_000,
        }
    }
}

/// Network identity of the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub ipv6: Ipv6Addr,
    /// The host's address on the overlay, used as the instance's gateway.
    pub gateway: Ipv6Addr,
}

/// Whether the instance's vCPUs may be oversubscribed (decision 0012).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuKind {
    /// Shares host cores with other instances; CPU is oversubscribed.
    #[default]
    Shared,
    /// Dedicated cores, never oversubscribed.
    Performance,
}

impl CpuKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Performance => "performance",
        }
    }
}

/// CPU and memory of one instance. Memory is a hard cap; CPU is oversubscribed unless the kind
/// is `performance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub cpu: MilliCpu,
    pub memory: MiB,
    /// Since 1.1.
    #[serde(default)]
    pub cpu_kind: CpuKind,
}

/// What the instance boots. Since 1.1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSpec {
    /// A kernel from the host's catalog, or `default` for the host's default kernel (VM drivers;
    /// runc has no kernel of its own).
    pub kernel: String,
    /// How the root filesystem is built from the image's layers.
    pub rootfs: RootfsKind,
}

impl BootSpec {
    pub const DEFAULT_KERNEL: &'static str = "default";
}

impl Default for BootSpec {
    fn default() -> Self {
        Self {
            kernel: Self::DEFAULT_KERNEL.into(),
            rootfs: RootfsKind::Auto,
        }
    }
}

/// How the root filesystem is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsKind {
    /// The driver's native form: an ext4 image for VM drivers, an overlay for runc.
    #[default]
    Auto,
    /// An ext4 block device image built from the layers.
    Ext4,
    /// An overlay of the unpacked layers with a private upper directory.
    Overlay,
}

/// A local volume attached to the instance. Since 1.1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// The volume's name within the app's environment.
    pub volume: String,
    /// Absolute path inside the instance.
    pub path: String,
    /// Size to create the volume with when it does not exist yet.
    pub initial_size: MiB,
    /// The volume the control plane chose for this instance's slot (`volume_created`): the agent
    /// attaches exactly this one, creating it on first use. Since 1.2; a spec with mounts but no
    /// volume id (a 1.1 writer) is refused by agents that run mounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<VolumeId>,
}

/// The secrets file delivered to the instance (decision 0010). Since 1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SecretsSpec {
    /// The secrets version of the release; 0 means the app has no secrets.
    pub version: u64,
    /// Also export each secret as an environment variable.
    pub export_env: bool,
}

/// Where the app serves Prometheus metrics. Since 1.1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSpec {
    pub port: u16,
    pub path: String,
}

/// The scheduler-to-agent contract for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    pub spec_version: String,
    /// Capabilities the agent must have to run this spec (see [`capability`]). Since 1.1.
    #[serde(default)]
    pub requires: BTreeSet<String>,
    pub instance_id: InstanceId,
    pub app_id: AppId,
    pub app_name: AppName,
    pub release_id: ReleaseId,
    pub release_version: u64,
    /// Process group name (`app` unless the manifest defines several).
    pub process: String,
    pub image: ImageRef,
    /// Since 1.1.
    #[serde(default)]
    pub boot: BootSpec,
    /// Overrides the image's entrypoint when set.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Overrides the image's cmd when set.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Manifest env, applied over the image's env.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub vm: VmSpec,
    pub network: NetworkSpec,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Since 1.1.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// Since 1.1.
    #[serde(default)]
    pub secrets: SecretsSpec,
    /// Since 1.1.
    #[serde(default)]
    pub metrics: Option<MetricsSpec>,
    #[serde(default)]
    pub stop: StopSpec,
    /// The root filesystem is read-only (volumes, `/tmp` and `/run` stay writable). Since 1.2.
    #[serde(default)]
    pub read_only_root: bool,
}

/// A spec this agent cannot run; nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("workload spec version {0:?} is not of the form MAJOR.MINOR")]
    Malformed(String),
    #[error("workload spec major version {found} is not supported (this agent runs {SUPPORTED_MAJOR}.x)")]
    Unsupported { found: u32 },
    #[error("workload spec {version} requires {missing:?}, which this agent does not support (it supports {supported:?})")]
    MissingCapabilities {
        version: String,
        missing: Vec<String>,
        supported: Vec<String>,
    },
}

impl WorkloadSpec {
    /// Checks that this build can run the spec's version at all.
    pub fn check_version(&self) -> Result<(), SpecError> {
        let (major, minor) = self
            .spec_version
            .split_once('.')
            .ok_or_else(|| SpecError::Malformed(self.spec_version.clone()))?;
        let major: u32 = major
            .parse()
            .map_err(|_| SpecError::Malformed(self.spec_version.clone()))?;
        minor
            .parse::<u32>()
            .map_err(|_| SpecError::Malformed(self.spec_version.clone()))?;
        if major != SUPPORTED_MAJOR {
            return Err(SpecError::Unsupported { found: major });
        }
        Ok(())
    }

    /// The capabilities this spec's content needs, as far as this build knows its fields.
    pub fn required_capabilities(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut add = |c: &str| {
            out.insert(c.to_owned());
        };
        if !self.mounts.is_empty() {
            add(capability::MOUNTS);
        }
        if self.secrets.version > 0 {
            add(capability::SECRETS);
        }
        if self.secrets.export_env {
            add(capability::SECRETS_ENV);
        }
        if self.boot.kernel != BootSpec::DEFAULT_KERNEL {
            add(capability::BOOT_KERNEL);
        }
        if self.vm.cpu_kind == CpuKind::Performance {
            add(capability::CPU_PERFORMANCE);
        }
        if self.read_only_root {
            add(capability::ROOT_READ_ONLY);
        }
        for check in self.services.iter().flat_map(|s| &s.checks) {
            match check.kind {
                CheckKind::Tcp => {}
                CheckKind::Http { .. } => add(capability::CHECK_HTTP),
                CheckKind::Exec { .. } => add(capability::CHECK_EXEC),
            }
        }
        out
    }

    /// Checks, before anything is applied, that an agent supporting `supported` can run this
    /// spec whole: the version is one it speaks, and every capability the spec requires (named
    /// by the writer in `requires`, or implied by fields this build knows) is supported.
    pub fn check_runnable(&self, supported: &[&str]) -> Result<(), SpecError> {
        self.check_version()?;
        let missing: Vec<String> = self
            .requires
            .iter()
            .cloned()
            .chain(self.required_capabilities())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|c| !supported.contains(&c.as_str()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(SpecError::MissingCapabilities {
            version: self.spec_version.clone(),
            missing,
            supported: supported.iter().map(|s| (*s).to_owned()).collect(),
        })
    }
}

/// Lifecycle of an instance as the control plane records it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Placed on a host, not yet reported by its agent.
    Pending,
    /// The agent is pulling, building the rootfs or booting.
    Starting,
    /// Running and passing its health checks.
    Healthy,
    /// Running but failing its health checks.
    Unhealthy,
    /// Asked to stop; the agent is stopping it.
    Stopping,
    /// Stopped on request; nothing of it is left on the host.
    Stopped,
    /// Could not start, or exited on its own.
    Failed,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Starting => "starting",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "starting" => Self::Starting,
            "healthy" => Self::Healthy,
            "unhealthy" => Self::Unhealthy,
            "stopping" => Self::Stopping,
            "stopped" => Self::Stopped,
            "failed" => Self::Failed,
            _ => return None,
        })
    }

    /// The instance is gone and will not come back.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Stopped | Self::Failed)
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(version: &str) -> WorkloadSpec {
        WorkloadSpec {
            spec_version: version.into(),
            requires: BTreeSet::new(),
            instance_id: InstanceId::generate(),
            app_id: AppId::generate(),
            app_name: "demo".parse().unwrap(),
            release_id: ReleaseId::generate(),
            release_version: 1,
            process: "app".into(),
            image: ImageRef {
                registry: "127.0.0.1:5000".into(),
                repository: "demo".into(),
                digest: format!("sha256:{}", "0".repeat(64)),
            },
            boot: BootSpec::default(),
            entrypoint: None,
            command: None,
            env: BTreeMap::new(),
            vm: VmSpec {
                cpu: MilliCpu(1000),
                memory: MiB(256),
                cpu_kind: CpuKind::Shared,
            },
            network: NetworkSpec {
                ipv6: crate::net::instance_address(1, 0),
                gateway: crate::net::host_address(1),
            },
            services: vec![],
            mounts: vec![],
            secrets: SecretsSpec::default(),
            metrics: None,
            stop: StopSpec::default(),
            read_only_root: false,
        }
    }

    #[test]
    fn version_rules() {
        assert!(spec("1.0").check_version().is_ok());
        assert!(spec("1.7").check_version().is_ok());
        assert_eq!(
            spec("2.0").check_version(),
            Err(SpecError::Unsupported { found: 2 })
        );
        assert!(matches!(
            spec("1").check_version(),
            Err(SpecError::Malformed(_))
        ));
        assert!(matches!(
            spec("x.0").check_version(),
            Err(SpecError::Malformed(_))
        ));
        assert!(spec("2.0").check_runnable(capability::ALL).is_err());
    }

    #[test]
    fn newer_minor_fields_are_ignored() {
        let mut v = serde_json::to_value(spec("1.1")).unwrap();
        v["a_field_from_1_2"] = serde_json::json!({"x": 1});
        let back: WorkloadSpec = serde_json::from_value(v).unwrap();
        assert!(back.check_runnable(&[]).is_ok());
    }

    #[test]
    fn capabilities_are_derived_from_content() {
        let mut s = spec("1.1");
        assert!(s.required_capabilities().is_empty());
        s.mounts.push(MountSpec {
            volume: "data".into(),
            path: "/data".into(),
            initial_size: MiB(1024),
            volume_id: None,
        });
        s.services.push(ServiceSpec {
            protocol: ServiceProtocol::Tcp,
            internal_port: 5432,
            proxy_protocol: false,
            hostnames: vec![],
            ports: vec![5432],
            concurrency: Concurrency::default(),
            checks: vec![CheckSpec {
                kind: CheckKind::Exec {
                    command: vec!["pg_isready".into()],
                },
                ..CheckSpec::default_tcp()
            }],
        });
        let req: Vec<String> = s.required_capabilities().into_iter().collect();
        assert_eq!(req, vec!["check.exec", "mounts"]);
        // The agent refuses it whole and says what is missing.
        let err = s.check_runnable(&[capability::MOUNTS]).unwrap_err();
        assert_eq!(
            err,
            SpecError::MissingCapabilities {
                version: "1.1".into(),
                missing: vec!["check.exec".into()],
                supported: vec!["mounts".into()],
            }
        );
        assert!(s
            .check_runnable(&[capability::MOUNTS, capability::CHECK_EXEC])
            .is_ok());
    }

    #[test]
    fn requires_from_a_newer_writer_is_honoured() {
        // A capability this build has never heard of, named by a newer control plane.
        let mut s = spec("1.2");
        s.requires.insert("gpu".into());
        let err = s.check_runnable(capability::ALL).unwrap_err();
        assert!(err.to_string().contains("\"gpu\""), "{err}");
    }

    #[test]
    fn capability_list_is_sorted_and_complete() {
        let mut sorted = capability::ALL.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, capability::ALL);
    }
}
