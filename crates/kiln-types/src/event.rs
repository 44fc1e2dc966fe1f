//! The event catalog: every state change in Kiln is one of these (locked decision 0005).
//!
//! An event names the stream it belongs to ([`Event::stream`]) and carries everything the views
//! need to apply it; views never consult anything but the log. The catalog is documented in
//! docs/specs/state/event-types.md, which a test keeps equal to [`Event::CATALOG`].

use serde::{Deserialize, Serialize};

use crate::{
    AppId, AppName, HostId, ImageRef, InstanceId, InstanceState, OrgId, ReleaseId, TokenId,
};
use crate::{MiB, MilliCpu, UnixMillis, WorkloadSpec};

/// The kind of stream an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamType {
    Org,
    App,
    Host,
    Instance,
}

impl StreamType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Org => "org",
            Self::App => "app",
            Self::Host => "host",
            Self::Instance => "instance",
        }
    }
}

/// A stream: one aggregate whose events are totally ordered by their stream version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamRef {
    pub kind: StreamType,
    pub id: String,
}

/// Lifecycle of a release's deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseState {
    /// Instances are being placed and started.
    Deploying,
    /// Every instance of the release passed its health checks; it serves traffic.
    Healthy,
    /// The deploy did not become healthy in time; the previous release keeps serving.
    Failed,
    /// A newer release became healthy and replaced this one.
    Superseded,
}

impl ReleaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deploying => "deploying",
            Self::Healthy => "healthy",
            Self::Failed => "failed",
            Self::Superseded => "superseded",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "deploying" => Self::Deploying,
            "healthy" => Self::Healthy,
            "failed" => Self::Failed,
            "superseded" => Self::Superseded,
            _ => return None,
        })
    }
}

/// Which runtime a host's agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Firecracker,
    Qemu,
    Runc,
}

impl Driver {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firecracker => "firecracker",
            Self::Qemu => "qemu",
            Self::Runc => "runc",
        }
    }
}

/// Every event Kiln records. The serde tag is the event type name stored in the log.
// Events are built and applied one at a time, never stored densely, so variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Event {
    OrgCreated {
        org_id: OrgId,
        name: String,
    },
    TokenCreated {
        token_id: TokenId,
        org_id: OrgId,
        name: String,
        /// SHA-256 of the secret token, hex; the token itself is never stored.
        hash: String,
        scopes: Vec<String>,
        #[serde(default)]
        expires_at: Option<UnixMillis>,
    },
    AppCreated {
        app_id: AppId,
        org_id: OrgId,
        name: AppName,
    },
    ReleaseCreated {
        app_id: AppId,
        release_id: ReleaseId,
        version: u64,
        /// The image reference as the user wrote it.
        image_input: String,
        image: ImageRef,
        /// The manifest with defaults applied, as JSON.
        manifest: serde_json::Value,
        /// The manifest file as uploaded, kept for `kiln releases show`.
        manifest_source: String,
    },
    ReleaseStateChanged {
        app_id: AppId,
        release_id: ReleaseId,
        state: ReleaseState,
        #[serde(default)]
        reason: Option<String>,
    },
    HostRegistered {
        host_id: HostId,
        name: String,
        /// The host's index in the overlay address plan.
        index: u16,
        driver: Driver,
        cpu: MilliCpu,
        memory: MiB,
    },
    InstancePlaced {
        host_id: HostId,
        spec: WorkloadSpec,
    },
    InstanceStateChanged {
        instance_id: InstanceId,
        app_id: AppId,
        state: InstanceState,
        #[serde(default)]
        reason: Option<String>,
    },
    InstanceStopRequested {
        instance_id: InstanceId,
        app_id: AppId,
        reason: String,
    },
}

impl Event {
    /// Every event type name, in catalog order.
    pub const CATALOG: &'static [&'static str] = &[
        "org_created",
        "token_created",
        "app_created",
        "release_created",
        "release_state_changed",
        "host_registered",
        "instance_placed",
        "instance_state_changed",
        "instance_stop_requested",
    ];

    /// The schema version of this build's payloads, per type.
    pub const SCHEMA_VERSION: u32 = 1;

    pub fn type_name(&self) -> &'static str {
        match self {
            Self::OrgCreated { .. } => "org_created",
            Self::TokenCreated { .. } => "token_created",
            Self::AppCreated { .. } => "app_created",
            Self::ReleaseCreated { .. } => "release_created",
            Self::ReleaseStateChanged { .. } => "release_state_changed",
            Self::HostRegistered { .. } => "host_registered",
            Self::InstancePlaced { .. } => "instance_placed",
            Self::InstanceStateChanged { .. } => "instance_state_changed",
            Self::InstanceStopRequested { .. } => "instance_stop_requested",
        }
    }

    /// The stream the event belongs to.
    pub fn stream(&self) -> StreamRef {
        let (kind, id) = match self {
            Self::OrgCreated { org_id, .. } | Self::TokenCreated { org_id, .. } => {
                (StreamType::Org, org_id.to_string())
            }
            Self::AppCreated { app_id, .. }
            | Self::ReleaseCreated { app_id, .. }
            | Self::ReleaseStateChanged { app_id, .. } => (StreamType::App, app_id.to_string()),
            Self::HostRegistered { host_id, .. } => (StreamType::Host, host_id.to_string()),
            Self::InstancePlaced { spec, .. } => {
                (StreamType::Instance, spec.instance_id.to_string())
            }
            Self::InstanceStateChanged { instance_id, .. }
            | Self::InstanceStopRequested { instance_id, .. } => {
                (StreamType::Instance, instance_id.to_string())
            }
        };
        StreamRef { kind, id }
    }

    /// Splits into (type name, payload JSON) for storage.
    pub fn to_parts(&self) -> (&'static str, serde_json::Value) {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        let data = v
            .get_mut("data")
            .map(serde_json::Value::take)
            .unwrap_or_default();
        (self.type_name(), data)
    }

    /// Rebuilds an event from its stored type name and payload.
    pub fn from_parts(type_name: &str, data: serde_json::Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(serde_json::json!({ "type": type_name, "data": data }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip() {
        let ev = Event::AppCreated {
            app_id: AppId::generate(),
            org_id: OrgId::generate(),
            name: "demo".parse().unwrap(),
        };
        let (t, data) = ev.to_parts();
        assert_eq!(t, "app_created");
        assert!(Event::CATALOG.contains(&t));
        assert_eq!(Event::from_parts(t, data).unwrap(), ev);
        assert!(Event::from_parts("no_such_event", serde_json::json!({})).is_err());
        assert!(Event::from_parts("app_created", serde_json::json!({"app_id": 3})).is_err());
    }
}
