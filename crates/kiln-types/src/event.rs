//! The event catalog: every state change in Kiln is one of these (locked decision 0005).
//!
//! An event names the stream it belongs to ([`Event::stream`]) and carries everything the views
//! need to apply it; views never consult anything but the log. The catalog is documented in
//! docs/specs/state/event-types.md, which a test keeps equal to [`Event::CATALOG`].

use serde::{Deserialize, Serialize};

use crate::dns::Hostname;
use crate::secrets::{SealedSecret, SecretName};
use crate::{
    AppId, AppName, HostId, ImageRef, InstanceId, InstanceState, OrgId, ReleaseId, TokenId, UserId,
    VolumeId,
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
    User,
}

impl StreamType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Org => "org",
            Self::App => "app",
            Self::Host => "host",
            Self::Instance => "instance",
            Self::User => "user",
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// Whether a host takes work (the scheduler places only on `ready` hosts).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Heartbeating and accepting new instances.
    #[default]
    Ready,
    /// An operator asked for the host to be emptied: no new instances; its stateless instances
    /// are replaced elsewhere, each new one healthy before the old one stops.
    Draining,
    /// Missed its heartbeats: its stateless instances are replaced elsewhere.
    Down,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Down => "down",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ready" => Self::Ready,
            "draining" => Self::Draining,
            "down" => Self::Down,
            _ => return None,
        })
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
        /// The user the token acts for (login and user-created tokens); `None` for tokens of
        /// machines (bootstrap admin, hosts, edges, CI tokens made by them).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<UserId>,
        /// Restricts the token to one app (CI deploy tokens): every other app answers 404.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        app_id: Option<AppId>,
    },
    AppCreated {
        app_id: AppId,
        org_id: OrgId,
        name: AppName,
    },
    /// The app is gone: its instances stop, its releases, secrets and addresses are dropped
    /// from the views and its name is free again. The log keeps its history.
    AppDestroyed {
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
        /// The app's secrets version the release runs with (0: none), so a rollback restores
        /// the secrets it ran with. Absent before secrets existed.
        #[serde(default)]
        secrets_version: u64,
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
        /// Stored as `cpu_millis` since schema version 2 (version 1 said `cpu`).
        #[serde(rename = "cpu_millis")]
        cpu: MilliCpu,
        /// Stored as `memory_mib` since schema version 2 (version 1 said `memory`).
        #[serde(rename = "memory_mib")]
        memory: MiB,
        /// The region the host is in; absent (read as `local`) before regions existed.
        #[serde(default = "local_region")]
        region: String,
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
    /// A public port of the edges' shared addresses now belongs to the app (a `tcp` service's
    /// `ports`): every edge routes it, on every shared address, to the app.
    PortAllocated {
        app_id: AppId,
        port: u16,
    },
    PortReleased {
        app_id: AppId,
        port: u16,
    },
    /// A dedicated IPv4 address now belongs to the app (the paid add-on): every port of it routes
    /// to the app and to no one else.
    Ipv4Allocated {
        app_id: AppId,
        address: std::net::Ipv4Addr,
    },
    Ipv4Released {
        app_id: AppId,
        address: std::net::Ipv4Addr,
    },
    /// An app environment claims a custom hostname; it is routed only once verified. `token` is
    /// what the `_kiln-challenge.<hostname>` TXT record must hold (`kiln-verify=<token>`): not a
    /// secret (anyone can read DNS), but unguessable, so only who controls the zone can publish it.
    DomainAdded {
        app_id: AppId,
        env: String,
        hostname: Hostname,
        token: String,
    },
    /// DNS showed the challenge record: the hostname is the app's, platform-wide, and the edges
    /// route it like the app's default hostname.
    DomainVerified {
        app_id: AppId,
        env: String,
        hostname: Hostname,
    },
    /// The claim is withdrawn (verified or not); the edges stop routing the hostname.
    DomainRemoved {
        app_id: AppId,
        env: String,
        hostname: Hostname,
    },
    /// A host changed state: missed heartbeats (`down`), came back (`ready`), or an operator
    /// drained it (`draining`).
    HostStateChanged {
        host_id: HostId,
        state: HostState,
        #[serde(default)]
        reason: Option<String>,
    },
    /// A token stops working: every request with it is refused from this event on.
    TokenRevoked {
        token_id: TokenId,
        org_id: OrgId,
    },
    /// A token was used (recorded at most about once a minute per token, not per request).
    TokenUsed {
        token_id: TokenId,
        org_id: OrgId,
        at: UnixMillis,
    },
    /// A person who can sign in. Emails are unique across the platform (lowercased).
    UserCreated {
        user_id: UserId,
        email: String,
        /// The argon2id hash in PHC string form; the password itself is never stored.
        password_hash: String,
    },
    /// A user becomes a member of an org with a role (or changes role).
    MembershipGranted {
        org_id: OrgId,
        user_id: UserId,
        role: Role,
    },
    MembershipRevoked {
        org_id: OrgId,
        user_id: UserId,
    },
    /// The org's data key for secrets, created on the org's first secret, stored only wrapped
    /// (encrypted) by the master key `master_key_id`.
    DataKeyCreated {
        org_id: OrgId,
        key_id: String,
        master_key_id: String,
        /// Base64 of nonce ‖ wrapped key ‖ tag.
        wrapped: String,
    },
    /// A data key wrapped again by another master key (master key rotation); the data key itself,
    /// and so every secret's ciphertext, is unchanged.
    DataKeyRewrapped {
        org_id: OrgId,
        key_id: String,
        master_key_id: String,
        wrapped: String,
    },
    /// Secrets of an app's environment set (added or replaced): a new secrets version. Values
    /// only as ciphertext. `staged` changes wait for the next deploy.
    SecretsSet {
        app_id: AppId,
        env: String,
        version: u64,
        secrets: Vec<SealedSecret>,
        #[serde(default)]
        staged: bool,
    },
    /// Secrets of an app's environment removed: a new secrets version.
    SecretsUnset {
        app_id: AppId,
        env: String,
        version: u64,
        names: Vec<SecretName>,
        #[serde(default)]
        staged: bool,
    },
    /// An agent fetched an instance's secrets (audit: who received which version; no values).
    SecretsDelivered {
        instance_id: InstanceId,
        app_id: AppId,
        host_id: HostId,
        version: u64,
    },
    /// A mutating API request finished: who asked for what, and how it ended. Recorded for
    /// every outcome, including refusals, so the org's event list is its audit trail.
    AuditRecorded {
        org_id: OrgId,
        /// `token:<id>`.
        actor: String,
        /// `<METHOD> <route>`, e.g. `POST /v1/apps/{app}/releases`.
        action: String,
        /// The request path as sent, e.g. `/v1/apps/web/releases`.
        target: String,
        /// `succeeded` (2xx), `refused` (4xx) or `failed` (5xx).
        outcome: String,
        status: u16,
        /// The problem `code` of a refusal or failure.
        #[serde(default)]
        code: Option<String>,
    },
    /// The platform operator set an org's quotas: each limit given replaces the platform default
    /// for that org; one left out (null) is the default again. Replaces the previous overrides.
    OrgQuotasSet {
        org_id: OrgId,
        quotas: QuotaOverrides,
    },
    /// A local volume now exists for one slot of a process group's mount, on one host (decision
    /// 0011: it never moves). The reconciler appends it with the placement of the first instance
    /// of the slot; the agent creates the file when that instance starts.
    VolumeCreated {
        volume_id: VolumeId,
        app_id: AppId,
        env: String,
        /// The mount's `volume` name in the manifest.
        name: String,
        /// The process group whose instances mount it.
        process: String,
        /// The instance slot (0-based) of the group the volume belongs to: the replacement of an
        /// instance of the slot attaches the same volume.
        slot: u32,
        host_id: HostId,
        size: MiB,
    },
    /// A volume is gone with its data: its app was destroyed. The host's agent deletes the file.
    VolumeDeleted {
        volume_id: VolumeId,
        app_id: AppId,
        host_id: HostId,
    },
}

/// What a member may do in an org; each role maps to a fixed set of token scopes
/// (docs/security/02-authz-and-scopes.md).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Admin,
    Member,
    Viewer,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Owner, Role::Admin, Role::Member, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Member => "member",
            Self::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
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
        "port_allocated",
        "port_released",
        "ipv4_allocated",
        "ipv4_released",
        "domain_added",
        "domain_verified",
        "domain_removed",
        "host_state_changed",
        "token_revoked",
        "token_used",
        "user_created",
        "membership_granted",
        "membership_revoked",
        "data_key_created",
        "data_key_rewrapped",
        "secrets_set",
        "secrets_unset",
        "secrets_delivered",
        "audit_recorded",
        "org_quotas_set",
        "volume_created",
        "volume_deleted",
        "app_destroyed",
    ];

    /// The payload schema version this build writes for an event type (`None` for a type it does
    /// not know). A type's version goes up when its payload changes shape; [`Event::decode`]
    /// upcasts older payloads through [`UPCASTERS`].
    pub fn current_schema_version(type_name: &str) -> Option<u32> {
        if !Self::CATALOG.contains(&type_name) {
            return None;
        }
        Some(
            UPCASTERS
                .iter()
                .filter(|u| u.event_type == type_name)
                .map(|u| u.from_version + 1)
                .max()
                .unwrap_or(1),
        )
    }

    /// The schema version this build writes for this event's payload.
    pub fn schema_version(&self) -> u32 {
        Self::current_schema_version(self.type_name()).unwrap_or(1)
    }

    /// Decodes a stored payload written with `schema_version`, upcasting it step by step to the
    /// current version first. Total: unknown types, versions from the future and malformed payloads
    /// are errors, never panics.
    pub fn decode(
        type_name: &str,
        schema_version: u32,
        payload: serde_json::Value,
    ) -> Result<Self, DecodeError> {
        let current =
            Self::current_schema_version(type_name).ok_or_else(|| DecodeError::UnknownType {
                event_type: type_name.to_owned(),
            })?;
        if schema_version == 0 || schema_version > current {
            return Err(DecodeError::UnsupportedVersion {
                event_type: type_name.to_owned(),
                version: schema_version,
                current,
            });
        }
        let mut payload = payload;
        for version in schema_version..current {
            let step = UPCASTERS
                .iter()
                .find(|u| u.event_type == type_name && u.from_version == version)
                .ok_or_else(|| DecodeError::MissingUpcaster {
                    event_type: type_name.to_owned(),
                    version,
                })?;
            payload = (step.upcast)(payload).map_err(|reason| DecodeError::Upcast {
                event_type: type_name.to_owned(),
                version,
                reason,
            })?;
        }
        Self::from_parts(type_name, payload).map_err(|source| DecodeError::Malformed {
            event_type: type_name.to_owned(),
            version: current,
            source,
        })
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Self::OrgCreated { .. } => "org_created",
            Self::TokenCreated { .. } => "token_created",
            Self::AppCreated { .. } => "app_created",
            Self::AppDestroyed { .. } => "app_destroyed",
            Self::ReleaseCreated { .. } => "release_created",
            Self::ReleaseStateChanged { .. } => "release_state_changed",
            Self::HostRegistered { .. } => "host_registered",
            Self::InstancePlaced { .. } => "instance_placed",
            Self::InstanceStateChanged { .. } => "instance_state_changed",
            Self::InstanceStopRequested { .. } => "instance_stop_requested",
            Self::PortAllocated { .. } => "port_allocated",
            Self::PortReleased { .. } => "port_released",
            Self::Ipv4Allocated { .. } => "ipv4_allocated",
            Self::Ipv4Released { .. } => "ipv4_released",
            Self::DomainAdded { .. } => "domain_added",
            Self::DomainVerified { .. } => "domain_verified",
            Self::DomainRemoved { .. } => "domain_removed",
            Self::HostStateChanged { .. } => "host_state_changed",
            Self::TokenRevoked { .. } => "token_revoked",
            Self::TokenUsed { .. } => "token_used",
            Self::UserCreated { .. } => "user_created",
            Self::MembershipGranted { .. } => "membership_granted",
            Self::MembershipRevoked { .. } => "membership_revoked",
            Self::DataKeyCreated { .. } => "data_key_created",
            Self::DataKeyRewrapped { .. } => "data_key_rewrapped",
            Self::SecretsSet { .. } => "secrets_set",
            Self::SecretsUnset { .. } => "secrets_unset",
            Self::SecretsDelivered { .. } => "secrets_delivered",
            Self::AuditRecorded { .. } => "audit_recorded",
            Self::OrgQuotasSet { .. } => "org_quotas_set",
            Self::VolumeCreated { .. } => "volume_created",
            Self::VolumeDeleted { .. } => "volume_deleted",
        }
    }

    /// The stream the event belongs to.
    pub fn stream(&self) -> StreamRef {
        let (kind, id) = match self {
            Self::OrgCreated { org_id, .. }
            | Self::TokenCreated { org_id, .. }
            | Self::AuditRecorded { org_id, .. }
            | Self::OrgQuotasSet { org_id, .. }
            | Self::DataKeyCreated { org_id, .. }
            | Self::DataKeyRewrapped { org_id, .. }
            | Self::TokenRevoked { org_id, .. }
            | Self::TokenUsed { org_id, .. }
            | Self::MembershipGranted { org_id, .. }
            | Self::MembershipRevoked { org_id, .. } => (StreamType::Org, org_id.to_string()),
            Self::UserCreated { user_id, .. } => (StreamType::User, user_id.to_string()),
            Self::AppCreated { app_id, .. }
            | Self::AppDestroyed { app_id, .. }
            | Self::ReleaseCreated { app_id, .. }
            | Self::ReleaseStateChanged { app_id, .. }
            | Self::PortAllocated { app_id, .. }
            | Self::PortReleased { app_id, .. }
            | Self::Ipv4Allocated { app_id, .. }
            | Self::Ipv4Released { app_id, .. }
            | Self::DomainAdded { app_id, .. }
            | Self::DomainVerified { app_id, .. }
            | Self::DomainRemoved { app_id, .. }
            | Self::SecretsSet { app_id, .. }
            | Self::SecretsUnset { app_id, .. }
            | Self::VolumeCreated { app_id, .. }
            | Self::VolumeDeleted { app_id, .. } => (StreamType::App, app_id.to_string()),
            Self::HostRegistered { host_id, .. } | Self::HostStateChanged { host_id, .. } => {
                (StreamType::Host, host_id.to_string())
            }
            Self::InstancePlaced { spec, .. } => {
                (StreamType::Instance, spec.instance_id.to_string())
            }
            Self::InstanceStateChanged { instance_id, .. }
            | Self::InstanceStopRequested { instance_id, .. }
            | Self::SecretsDelivered { instance_id, .. } => {
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

/// Per-org limits that replace the platform's defaults; `None` keeps the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QuotaOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_addresses: Option<u64>,
}

/// The region of hosts registered before hosts had one (the manifest's default region too).
pub const LOCAL_REGION: &str = "local";

fn local_region() -> String {
    LOCAL_REGION.to_owned()
}

/// One step of payload evolution: turns a payload of `event_type` at `from_version` into the
/// same event at `from_version + 1`. Steps are pure JSON rewrites, so the log is never rewritten:
/// old rows are upcast every time they are read.
pub struct Upcaster {
    pub event_type: &'static str,
    pub from_version: u32,
    pub upcast: fn(serde_json::Value) -> Result<serde_json::Value, String>,
}

/// Every upcasting step, for every event type whose payload has changed shape. Append only: a
/// shipped step is never edited, because logs written by old builds depend on it.
pub const UPCASTERS: &[Upcaster] = &[Upcaster {
    event_type: "host_registered",
    from_version: 1,
    upcast: |v| rename_fields(v, &[("cpu", "cpu_millis"), ("memory", "memory_mib")]),
}];

/// Renames object keys (missing keys are an error: a version-1 payload always had them).
fn rename_fields(
    v: serde_json::Value,
    renames: &[(&str, &str)],
) -> Result<serde_json::Value, String> {
    let serde_json::Value::Object(mut map) = v else {
        return Err("payload is not a JSON object".into());
    };
    for (from, to) in renames {
        let value = map
            .remove(*from)
            .ok_or_else(|| format!("field {from:?} is missing"))?;
        map.insert((*to).to_owned(), value);
    }
    Ok(serde_json::Value::Object(map))
}

/// A stored event could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type {event_type:?}")]
    UnknownType { event_type: String },
    #[error(
        "{event_type} schema version {version} is not supported (this build knows 1 to {current})"
    )]
    UnsupportedVersion {
        event_type: String,
        version: u32,
        current: u32,
    },
    #[error("no upcaster for {event_type} from schema version {version}")]
    MissingUpcaster { event_type: String, version: u32 },
    #[error("cannot upcast {event_type} from schema version {version}: {reason}")]
    Upcast {
        event_type: String,
        version: u32,
        reason: String,
    },
    #[error("{event_type} payload does not match schema version {version}")]
    Malformed {
        event_type: String,
        version: u32,
        #[source]
        source: serde_json::Error,
    },
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
        let volume_id = crate::VolumeId::generate();
        for ev in [
            Event::VolumeCreated {
                volume_id: volume_id.clone(),
                app_id: AppId::generate(),
                env: "production".into(),
                name: "data".into(),
                process: "app".into(),
                slot: 2,
                host_id: HostId::generate(),
                size: MiB(1024),
            },
            Event::VolumeDeleted {
                volume_id,
                app_id: AppId::generate(),
                host_id: HostId::generate(),
            },
        ] {
            let (t, data) = ev.to_parts();
            assert!(Event::CATALOG.contains(&t));
            assert_eq!(ev.stream().kind, StreamType::App);
            assert_eq!(Event::from_parts(t, data).unwrap(), ev);
        }
    }

    #[test]
    fn identity_events_round_trip_and_old_token_payloads_still_decode() {
        let org_id = OrgId::generate();
        let user_id = UserId::generate();
        let token_id = TokenId::generate();
        let events = [
            Event::TokenCreated {
                token_id: token_id.clone(),
                org_id: org_id.clone(),
                name: "ci".into(),
                hash: "ab".repeat(32),
                scopes: vec!["deploy".into()],
                expires_at: Some(1),
                user_id: Some(user_id.clone()),
                app_id: Some(AppId::generate()),
            },
            Event::TokenRevoked {
                token_id: token_id.clone(),
                org_id: org_id.clone(),
            },
            Event::TokenUsed {
                token_id: token_id.clone(),
                org_id: org_id.clone(),
                at: 5,
            },
            Event::UserCreated {
                user_id: user_id.clone(),
                email: "ada@example.com".into(),
                password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
            },
            Event::MembershipGranted {
                org_id: org_id.clone(),
                user_id: user_id.clone(),
                role: Role::Viewer,
            },
            Event::MembershipRevoked {
                org_id: org_id.clone(),
                user_id: user_id.clone(),
            },
        ];
        for ev in events {
            let (t, data) = ev.to_parts();
            assert!(Event::CATALOG.contains(&t));
            assert_eq!(Event::decode(t, 1, data).unwrap(), ev);
        }
        assert_eq!(
            Event::UserCreated {
                user_id: user_id.clone(),
                email: String::new(),
                password_hash: String::new()
            }
            .stream()
            .kind,
            StreamType::User
        );
        // A token_created written before tokens had users and apps.
        let old = serde_json::json!({
            "token_id": token_id, "org_id": org_id, "name": "admin", "hash": "cd",
            "scopes": ["admin"], "expires_at": null,
        });
        let Event::TokenCreated {
            user_id, app_id, ..
        } = Event::decode("token_created", 1, old).unwrap()
        else {
            panic!("not a token_created")
        };
        assert_eq!((user_id, app_id), (None, None));
        assert_eq!(Role::parse("owner"), Some(Role::Owner));
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn host_registered_v1_is_upcast_and_v2_is_written() {
        let host_id = HostId::generate();
        let v1 = serde_json::json!({
            "host_id": host_id, "name": "h1", "index": 3, "driver": "runc",
            "cpu": 2000, "memory": 4096,
        });
        let ev = Event::decode("host_registered", 1, v1.clone()).unwrap();
        let Event::HostRegistered { cpu, memory, .. } = &ev else {
            panic!("decoded {ev:?}")
        };
        assert_eq!((*cpu, *memory), (MilliCpu(2000), MiB(4096)));
        assert_eq!(ev.schema_version(), 2);
        let (_, v2) = ev.to_parts();
        assert_eq!(v2["cpu_millis"], 2000);
        assert_eq!(v2["memory_mib"], 4096);
        assert_eq!(Event::decode("host_registered", 2, v2).unwrap(), ev);
        // A v1 payload read as v2 is malformed, not silently accepted.
        assert!(matches!(
            Event::decode("host_registered", 2, v1),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn decode_is_total() {
        assert!(matches!(
            Event::decode("no_such_event", 1, serde_json::json!({})),
            Err(DecodeError::UnknownType { .. })
        ));
        for bad_version in [0, 3, u32::MAX] {
            assert!(matches!(
                Event::decode("host_registered", bad_version, serde_json::json!({})),
                Err(DecodeError::UnsupportedVersion { .. })
            ));
        }
        assert!(matches!(
            Event::decode("host_registered", 1, serde_json::json!([1, 2])),
            Err(DecodeError::Upcast { .. })
        ));
        assert!(matches!(
            Event::decode("org_created", 1, serde_json::json!("x")),
            Err(DecodeError::Malformed { .. })
        ));
        for t in Event::CATALOG {
            assert!(Event::current_schema_version(t).is_some(), "{t}");
        }
    }
}
