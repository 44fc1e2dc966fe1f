//! The resolved manifest: every default applied, every value checked.
//!
//! This is also a stored format: the control plane keeps it as JSON in `release_created` events
//! and the reconciler reads it back for as long as the release exists. So reading is lenient and
//! writing is not: fields added later carry serde defaults, and the shape the walking skeleton
//! stored (top-level `services` and `scale`, no `processes`) is read through [`Stored`] into one
//! process group named `app`. The rules are in docs/engineering/compatibility-and-versioning.md.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use kiln_types::workload::{CheckSpec, Concurrency, CpuKind, MountSpec};
use kiln_types::{AppName, MiB, ServiceProtocol, ServiceSpec};

use crate::defaults;

/// A validated manifest with every default applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Stored")]
pub struct Manifest {
    pub app: AppName,
    pub image: Option<String>,
    pub primary_region: String,
    /// Every region the app runs in, `primary_region` included.
    pub regions: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub vm: Vm,
    /// Process groups, sorted by name; never empty.
    pub processes: Vec<Process>,
    pub mounts: Vec<Mount>,
    pub deploy: Deploy,
    pub secrets: Secrets,
    pub metrics: Option<Metrics>,
    pub restart: Restart,
    pub stop_signal: String,
    pub stop_timeout_ms: u64,
}

impl Manifest {
    /// The process group called `name`.
    pub fn process(&self, name: &str) -> Option<&Process> {
        self.processes.iter().find(|p| p.name == name)
    }

    /// Instances the release wants of process group `p`: its count in every region.
    pub fn desired_count(&self, p: &Process) -> u32 {
        self.regions
            .iter()
            .map(|r| p.scale.count_in(r))
            .fold(0u32, u32::saturating_add)
    }

    /// Instances the release wants in all, over every group and region.
    pub fn total_count(&self) -> u32 {
        self.processes
            .iter()
            .map(|p| self.desired_count(p))
            .fold(0u32, u32::saturating_add)
    }

    /// The mounts of process group `process`, as the WorkloadSpec carries them.
    pub fn mount_specs(&self, process: &str) -> Vec<MountSpec> {
        self.mounts
            .iter()
            .filter(|m| m.processes.iter().any(|p| p == process))
            .map(|m| MountSpec {
                volume: m.volume.clone(),
                path: m.path.clone(),
                initial_size: m.initial_size,
                // Chosen per instance slot by the control plane at placement.
                volume_id: None,
            })
            .collect()
    }
}

/// Size of each instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub cpus: u32,
    #[serde(default)]
    pub cpu_kind: CpuKind,
    pub memory: MiB,
    /// The instance's root filesystem is mounted read-only; volumes, `/tmp` and `/run` stay
    /// writable. Absent in manifests stored before it existed: writable.
    #[serde(default)]
    pub read_only_root: bool,
}

/// One process group: instances of the image running one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// A DNS label; `app` for the single group of a manifest without `[processes]`.
    pub name: String,
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    pub scale: Scale,
    pub services: Vec<Service>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredScale")]
pub struct Scale {
    /// Instances per region (every region `regions` does not name).
    pub count: u32,
    pub min: u32,
    pub max: u32,
    /// Instances in the regions named here, instead of `count`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub regions: BTreeMap<String, u32>,
}

impl Scale {
    pub fn fixed(count: u32) -> Self {
        Self {
            count,
            min: count,
            max: count,
            regions: BTreeMap::new(),
        }
    }

    /// Instances this scale asks for in `region`.
    pub fn count_in(&self, region: &str) -> u32 {
        self.regions.get(region).copied().unwrap_or(self.count)
    }
}

#[derive(Deserialize)]
struct StoredScale {
    count: u32,
    #[serde(default)]
    min: Option<u32>,
    #[serde(default)]
    max: Option<u32>,
    #[serde(default)]
    regions: BTreeMap<String, u32>,
}

impl From<StoredScale> for Scale {
    fn from(s: StoredScale) -> Self {
        Self {
            count: s.count,
            min: s.min.unwrap_or(s.count),
            max: s.max.unwrap_or(s.count),
            regions: s.regions,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub protocol: ServiceProtocol,
    pub internal_port: u16,
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub concurrency: Concurrency,
    /// Never empty once resolved; absent in a stored manifest means the default TCP check.
    #[serde(default = "default_checks")]
    pub checks: Vec<CheckSpec>,
}

fn default_checks() -> Vec<CheckSpec> {
    vec![CheckSpec::default_tcp()]
}

impl Service {
    /// The service as the WorkloadSpec carries it to the agent (and the edge reads it back).
    pub fn to_spec(&self) -> ServiceSpec {
        ServiceSpec {
            protocol: self.protocol,
            internal_port: self.internal_port,
            proxy_protocol: self.proxy_protocol,
            hostnames: self.hostnames.clone(),
            ports: self.ports.clone(),
            concurrency: self.concurrency,
            checks: self.checks.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub volume: String,
    pub path: String,
    pub initial_size: MiB,
    /// The process groups that get the volume (all of them unless the manifest says otherwise).
    pub processes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Replace instances a few at a time (`max_unavailable`), each new one healthy first.
    #[default]
    Rolling,
    /// Start one new instance, then the rest once it is healthy.
    Canary,
    /// Start all new instances; switch when all are healthy; then stop the old ones.
    Bluegreen,
    /// Stop the old instances and start the new ones at once.
    Immediate,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rolling => "rolling",
            Self::Canary => "canary",
            Self::Bluegreen => "bluegreen",
            Self::Immediate => "immediate",
        }
    }
}

/// How many instances a rolling deploy replaces at once (started above the count: none is down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaxUnavailable {
    Count(u32),
    /// 1 to 100 percent of a group's instances, rounded up, at least one.
    Percent(u8),
}

impl MaxUnavailable {
    /// Instances out of `total` replaced at once (at least one).
    pub fn of(self, total: u32) -> u32 {
        match self {
            Self::Count(n) => n.max(1),
            Self::Percent(p) => (u64::from(total) * u64::from(p)).div_ceil(100).max(1) as u32,
        }
    }
}

impl std::default::Default for MaxUnavailable {
    fn default() -> Self {
        Self::Count(defaults::MAX_UNAVAILABLE)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deploy {
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub max_unavailable: MaxUnavailable,
    #[serde(default)]
    pub release_command: Option<Vec<String>>,
    pub health_timeout_ms: u64,
    #[serde(default = "yes")]
    pub auto_rollback: bool,
}

fn yes() -> bool {
    true
}

impl std::default::Default for Deploy {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            max_unavailable: MaxUnavailable::default(),
            release_command: None,
            health_timeout_ms: defaults::HEALTH_TIMEOUT_MS,
            auto_rollback: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Secrets {
    /// Also export secrets as environment variables (they are always in the secrets file).
    pub export_env: bool,
    /// What a secrets change does to running instances.
    #[serde(default)]
    pub reload: SecretsReload,
}

/// What a secrets change does to running instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretsReload {
    /// A new release (same image and manifest, new secrets version) replaces the instances.
    #[default]
    Restart,
    /// The file is replaced in place and the app gets SIGHUP.
    Signal,
}

impl SecretsReload {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Restart => "restart",
            Self::Signal => "signal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub port: u16,
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    #[default]
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::OnFailure => "on-failure",
            Self::Never => "never",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    pub policy: RestartPolicy,
    pub max_retries: u32,
}

impl std::default::Default for Restart {
    fn default() -> Self {
        Self {
            policy: RestartPolicy::default(),
            max_retries: defaults::MAX_RETRIES,
        }
    }
}

/// Every shape of the manifest JSON ever stored, read leniently (see the module doc).
#[derive(Deserialize)]
struct Stored {
    app: AppName,
    #[serde(default)]
    image: Option<String>,
    #[serde(default = "default_region")]
    primary_region: String,
    #[serde(default)]
    regions: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default = "default_vm")]
    vm: Vm,
    #[serde(default)]
    processes: Option<Vec<Process>>,
    /// The skeleton's single group: its services...
    #[serde(default)]
    services: Vec<Service>,
    /// ...and its scale.
    #[serde(default)]
    scale: Option<Scale>,
    #[serde(default)]
    mounts: Vec<Mount>,
    #[serde(default)]
    deploy: Deploy,
    #[serde(default)]
    secrets: Secrets,
    #[serde(default)]
    metrics: Option<Metrics>,
    #[serde(default)]
    restart: Restart,
    #[serde(default = "default_stop_signal")]
    stop_signal: String,
    #[serde(default = "default_stop_timeout")]
    stop_timeout_ms: u64,
}

fn default_region() -> String {
    defaults::PRIMARY_REGION.to_owned()
}
fn default_vm() -> Vm {
    Vm {
        cpus: defaults::CPUS,
        cpu_kind: CpuKind::Shared,
        memory: MiB(defaults::MEMORY_MIB),
        read_only_root: false,
    }
}
fn default_stop_signal() -> String {
    defaults::STOP_SIGNAL.to_owned()
}
fn default_stop_timeout() -> u64 {
    defaults::STOP_TIMEOUT_MS
}

impl From<Stored> for Manifest {
    fn from(s: Stored) -> Self {
        let processes = match s.processes {
            Some(p) if !p.is_empty() => p,
            _ => vec![Process {
                name: defaults::PROCESS.to_owned(),
                entrypoint: None,
                command: None,
                scale: s.scale.unwrap_or(Scale::fixed(defaults::COUNT)),
                services: s.services,
            }],
        };
        let regions = if s.regions.is_empty() {
            vec![s.primary_region.clone()]
        } else {
            s.regions
        };
        Manifest {
            app: s.app,
            image: s.image,
            primary_region: s.primary_region,
            regions,
            env: s.env,
            vm: s.vm,
            processes,
            mounts: s.mounts,
            deploy: s.deploy,
            secrets: s.secrets,
            metrics: s.metrics,
            restart: s.restart,
            stop_signal: s.stop_signal,
            stop_timeout_ms: s.stop_timeout_ms,
        }
    }
}
