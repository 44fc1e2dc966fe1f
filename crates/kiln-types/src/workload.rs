//! The WorkloadSpec: what the scheduler hands a host agent for one instance.
//!
//! The contract is versioned (`spec_version`, "MAJOR.MINOR"). An agent accepts any spec of its own
//! major version; fields added in a newer minor version are optional with defaults, so an agent one
//! minor version older ignores them and one newer fills them in. A spec of another major version is
//! rejected whole with a reason (see [`WorkloadSpec::check_version`]), never half-applied. The full
//! rules are in docs/specs/workload-spec.md.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv6Addr;

use serde::{Deserialize, Serialize};

use crate::{AppId, AppName, InstanceId, MiB, MilliCpu, ReleaseId};

/// The WorkloadSpec version this build writes.
pub const WORKLOAD_SPEC_VERSION: &str = "1.0";
const SUPPORTED_MAJOR: u32 = 1;

/// An image pinned by digest: the reference the user gave, and the manifest digest it resolved to.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceProtocol {
    /// TLS routed by SNI at the edge, never terminated there.
    Tls,
    /// Plain TCP routed by port.
    Tcp,
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
    /// Hostnames routed to this service (SNI).
    #[serde(default)]
    pub hostnames: Vec<String>,
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

/// CPU and memory of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub cpu: MilliCpu,
    pub memory: MiB,
}

/// The scheduler-to-agent contract for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    pub spec_version: String,
    pub instance_id: InstanceId,
    pub app_id: AppId,
    pub app_name: AppName,
    pub release_id: ReleaseId,
    pub release_version: u64,
    /// Process group name (`app` unless the manifest defines several).
    pub process: String,
    pub image: ImageRef,
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
    #[serde(default)]
    pub stop: StopSpec,
}

/// A spec this agent cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecVersionError {
    #[error("workload spec version {0:?} is not of the form MAJOR.MINOR")]
    Malformed(String),
    #[error("workload spec major version {found} is not supported (this agent runs {SUPPORTED_MAJOR}.x)")]
    Unsupported { found: u32 },
}

impl WorkloadSpec {
    /// Checks that this build can run the spec at all; called before anything is applied.
    pub fn check_version(&self) -> Result<(), SpecVersionError> {
        let (major, minor) = self
            .spec_version
            .split_once('.')
            .ok_or_else(|| SpecVersionError::Malformed(self.spec_version.clone()))?;
        let major: u32 = major
            .parse()
            .map_err(|_| SpecVersionError::Malformed(self.spec_version.clone()))?;
        minor
            .parse::<u32>()
            .map_err(|_| SpecVersionError::Malformed(self.spec_version.clone()))?;
        if major != SUPPORTED_MAJOR {
            return Err(SpecVersionError::Unsupported { found: major });
        }
        Ok(())
    }
}

/// Lifecycle of an instance as the control plane records it.
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
            entrypoint: None,
            command: None,
            env: BTreeMap::new(),
            vm: VmSpec {
                cpu: MilliCpu(1000),
                memory: MiB(256),
            },
            network: NetworkSpec {
                ipv6: crate::net::instance_address(1, 0),
                gateway: crate::net::host_address(1),
            },
            services: vec![],
            stop: StopSpec::default(),
        }
    }

    #[test]
    fn version_rules() {
        assert!(spec("1.0").check_version().is_ok());
        assert!(spec("1.7").check_version().is_ok());
        assert_eq!(
            spec("2.0").check_version(),
            Err(SpecVersionError::Unsupported { found: 2 })
        );
        assert!(matches!(
            spec("1").check_version(),
            Err(SpecVersionError::Malformed(_))
        ));
        assert!(matches!(
            spec("x.0").check_version(),
            Err(SpecVersionError::Malformed(_))
        ));
    }

    #[test]
    fn newer_minor_fields_are_ignored() {
        let mut v = serde_json::to_value(spec("1.1")).unwrap();
        v["a_field_from_1_1"] = serde_json::json!({"x": 1});
        let back: WorkloadSpec = serde_json::from_value(v).unwrap();
        assert!(back.check_version().is_ok());
    }
}
