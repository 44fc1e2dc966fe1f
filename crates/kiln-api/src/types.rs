//! Request and response bodies.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use kiln_types::event::{Driver, ReleaseState, Role};
use kiln_types::{
    AppId, AppName, HostId, ImageRef, InstanceId, InstanceState, MiB, MilliCpu, OrgId, ReleaseId,
    ServiceProtocol, TokenId, UnixMillis, UserId, WorkloadSpec,
};

/// Header carrying the idempotency key of a mutating request.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Header carrying the request id on every response.
pub const REQUEST_ID: &str = "x-request-id";
/// Media type of error bodies (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error body (`application/problem+json`). `code` is stable and documented; `detail` is for
/// people.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type", default = "about_blank")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Extra structured data, e.g. manifest problems with line and column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub errors: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

fn about_blank() -> String {
    "about:blank".into()
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateApp {
    /// A DNS label: unique across the platform (it is the first label of the app's hostname).
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = String, pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", max_length = 63)
    )]
    pub name: AppName,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub id: AppId,
    pub org_id: OrgId,
    pub name: AppName,
    pub hostname: String,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub created_at: UnixMillis,
    pub latest_version: u64,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateRelease {
    /// Image reference (tag or digest); overrides the manifest's `image`.
    #[serde(default)]
    pub image: Option<String>,
    /// The `kiln.toml` source text.
    pub manifest: String,
    /// File name used in error messages.
    #[serde(default)]
    pub manifest_file: Option<String>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub id: ReleaseId,
    pub app_id: AppId,
    pub version: u64,
    pub image_input: String,
    pub image: ImageRef,
    pub state: ReleaseState,
    pub reason: Option<String>,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub created_at: UnixMillis,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub updated_at: UnixMillis,
    /// The secrets version the release runs with (0: none).
    #[serde(default)]
    pub secrets_version: u64,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub id: InstanceId,
    pub release_version: u64,
    pub host_id: HostId,
    pub process: String,
    pub state: InstanceState,
    pub reason: Option<String>,
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Ipv6))]
    pub ipv6: std::net::Ipv6Addr,
    pub desired_running: bool,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub updated_at: UnixMillis,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppStatus {
    pub app: App,
    /// The release currently serving (the latest healthy one), if any.
    pub current: Option<Release>,
    /// Every release, oldest first.
    pub releases: Vec<Release>,
    /// Instances not yet stopped, plus recently failed ones.
    pub instances: Vec<Instance>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterHost {
    /// 1 to 253 visible ASCII characters; registering a known name again updates that host.
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 253, pattern = "^[!-~]+$")
    )]
    pub name: String,
    pub driver: Driver,
    /// Millicpu, 1 to 100,000,000.
    #[cfg_attr(feature = "openapi", schema(value_type = u32, minimum = 1, maximum = 100_000_000))]
    pub cpu: MilliCpu,
    /// MiB, 1 to 2^32.
    #[cfg_attr(feature = "openapi", schema(value_type = u64, minimum = 1, maximum = 4_294_967_296_u64))]
    pub memory: MiB,
    /// The region the host is in (a DNS label); default `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(max_length = 63, pattern = "^[a-z]([a-z0-9-]*[a-z0-9])?$")
    )]
    pub region: Option<String>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRegistration {
    pub host_id: HostId,
    /// Index in the overlay address plan; the host's subnet is derived from it.
    pub index: u16,
}

/// One workload assigned to a host and whether it should run.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The `WorkloadSpec` (docs/specs/workload-spec.md).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub spec: WorkloadSpec,
    pub desired_running: bool,
    pub state: InstanceState,
    /// The secrets version the instance should hold now: `spec.secrets.version`, or newer when
    /// the app replaces its secrets file in place (`[secrets] reload = "signal"`).
    #[serde(default)]
    pub secrets_version: u64,
}

/// Everything assigned to a host, as of log sequence `seq`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignments {
    pub seq: u64,
    pub assignments: Vec<Assignment>,
    /// Volumes of this host that were deleted (their app was destroyed): the agent removes their
    /// files once no instance holds them. Absent from older control planes: nothing to delete.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub deleted_volumes: Vec<kiln_types::VolumeId>,
}

/// An agent's report about one instance.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceReport {
    pub state: InstanceState,
    #[serde(default)]
    pub reason: Option<String>,
}

/// One hostname the edge routes (TLS, by SNI).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub hostname: String,
    pub app: AppName,
    pub proxy_protocol: bool,
    /// Healthy backends (instance address and internal port).
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub backends: Vec<SocketAddr>,
    /// The service's per-instance connection limits; `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
}

/// Connection limits of a service, applied to each of its instances (backends) by each edge.
pub use kiln_types::workload::Concurrency;

/// One address and port the edge listens on for one service (TCP, or TLS without SNI routing):
/// a port allocated on a shared address, or any port of an app's dedicated IPv4.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRoute {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub listen: SocketAddr,
    pub app: AppName,
    pub protocol: ServiceProtocol,
    pub proxy_protocol: bool,
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub backends: Vec<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
}

/// The edge's route table, as of log sequence `seq`. Also the format of `kilnd edge --routes`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRoute>,
}

/// Query of long-polling endpoints: answer as soon as the state is newer than `after`, or after
/// `wait_ms` with the current state.
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WatchQuery {
    #[serde(default)]
    pub after: Option<u64>,
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// One line an instance wrote to stdout or stderr.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub instance_id: InstanceId,
    pub app_id: AppId,
    /// When the guest read the line (ms since the epoch, guest clock).
    pub ts_ms: i64,
    pub output: kiln_types::frame::Output,
    pub message: String,
}

/// Query of `GET /v1/apps/{app}/logs`.
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogsQuery {
    /// Keep the response open and stream new lines.
    #[serde(default)]
    pub follow: Option<bool>,
    /// How many past lines to send first (default 100).
    #[serde(default)]
    pub tail: Option<usize>,
    /// Only this instance.
    #[serde(default)]
    pub instance: Option<InstanceId>,
}

/// Query of `GET /v1/apps/{app}/exec` (a WebSocket upgrade).
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecQuery {
    /// The instance to run in (default: a healthy instance of the current release).
    #[serde(default)]
    pub instance: Option<InstanceId>,
}

/// An exec session the control plane asks a host's agent to serve. The agent answers by opening
/// the WebSocket `GET /v1/hosts/{host}/exec/{session}`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub session: String,
    pub instance_id: InstanceId,
}

/// Information about the caller's token.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    pub org_id: OrgId,
    pub token_name: String,
    pub scopes: Vec<String>,
    #[serde(default)]
    pub token_id: Option<TokenId>,
    #[serde(default)]
    pub org_name: Option<String>,
    /// The user the token acts for (login and user-made tokens).
    #[serde(default)]
    pub user: Option<UserRef>,
    /// The user's role in the org.
    #[serde(default)]
    pub role: Option<Role>,
    /// The one app the token is restricted to.
    #[serde(default)]
    pub app: Option<AppName>,
    #[serde(default)]
    pub expires_at: Option<UnixMillis>,
}

/// Query of every list endpoint: cursor pagination.
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PageQuery {
    /// Most items in the page (1 to 500; default 100).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 500))]
    pub limit: Option<u32>,
    /// Opaque: the `next_cursor` of the previous page. Absent: the first page.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// A page of apps, by name.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppPage {
    pub items: Vec<App>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A page of releases, oldest first.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleasePage {
    pub items: Vec<Release>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A page of instances, by id.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstancePage {
    pub items: Vec<Instance>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A host as the control plane knows it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub id: HostId,
    pub name: String,
    /// Index in the overlay address plan.
    pub index: u16,
    pub driver: String,
    pub cpu: MilliCpu,
    pub memory: MiB,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub registered_at: UnixMillis,
    /// The agent's last start.
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub last_registered_at: UnixMillis,
    /// `ready`, `draining` (`kiln hosts drain`) or `down` (missed heartbeats).
    #[serde(default)]
    pub state: kiln_types::event::HostState,
    /// Why the host is in its state.
    #[serde(default)]
    pub state_reason: Option<String>,
    /// The region the host is in.
    #[serde(default = "local_region")]
    pub region: String,
}

fn local_region() -> String {
    kiln_types::event::LOCAL_REGION.to_owned()
}

/// A page of hosts, by name.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPage {
    pub items: Vec<Host>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// One event of the log, as an org's member sees it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Position in the global log; increasing, with gaps (other orgs' events).
    pub seq: u64,
    /// The event type (docs/specs/state/event-types.md).
    #[serde(rename = "type")]
    pub type_: String,
    /// `org`, `app`, `host` or `instance`, and its id.
    pub stream: String,
    pub stream_id: String,
    /// The payload, as catalogued.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub data: serde_json::Value,
    /// Who caused it: `token:<id>`, `system:reconciler`, ...
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub recorded_at: UnixMillis,
}

/// A page of events, oldest first.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPage {
    pub items: Vec<EventRecord>,
    /// Always present: pass it to read on (or to follow) from where this page ended. A page
    /// may be short, or empty, while later pages still have events.
    pub next_cursor: String,
}

/// Query of `GET /v1/events`.
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventsQuery {
    /// Most events in the page (1 to 500; default 100). Ignored with `follow`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 500))]
    pub limit: Option<u32>,
    /// Opaque: a `next_cursor`. Absent: from the start of the log.
    #[serde(default)]
    pub cursor: Option<String>,
    /// Keep the response open and stream events as JSON lines (`application/x-ndjson`).
    #[serde(default)]
    pub follow: Option<bool>,
}

/// Labels for a `kiln status` table.
pub type Labels = BTreeMap<String, String>;

/// `GET /v1/apps/{app}/ips`: the app's public addresses beyond the shared TLS ones.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppIps {
    /// Dedicated IPv4 addresses (the add-on): every port of each is the app's.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>, format = "ipv4"))]
    pub dedicated_ipv4: Vec<std::net::Ipv4Addr>,
    /// Public ports the app owns on the shared addresses (its `tcp` services' `ports`).
    pub shared_ports: Vec<u16>,
}

/// `POST /v1/apps/{app}/ips`: what to allocate.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocateIp {
    /// `v4`: a dedicated IPv4 address (the only kind: IPv6 is per instance, always).
    pub kind: String,
}

/// The allocated address.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatedIp {
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = "ipv4"))]
    pub address: std::net::Ipv4Addr,
}

/// `POST /v1/apps/{app}/rollback`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    /// The release to restore; default: the newest healthy release before the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = i64, minimum = 1))]
    pub version: Option<u64>,
}

// ---- Auth: tokens and device login (RFC 8628). See docs/specs/api/auth.md. ----

/// A user, as other resources refer to one.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRef {
    pub id: UserId,
    pub email: String,
}

/// `POST /v1/tokens`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateToken {
    pub name: String,
    /// Scope names (`read`, `deploy`, `secrets:write`, ...); each must be one the caller has.
    /// Empty: the caller's own scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Restrict the token to this app (a CI deploy token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppName>,
    /// Lifetime in seconds (default 30 days; user tokens at most 365 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
    /// A token that never expires (only for tokens not bound to a user).
    #[serde(default)]
    pub no_expiry: bool,
}

/// A token as listed: never its secret.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: TokenId,
    pub name: String,
    pub scopes: Vec<String>,
    #[serde(default)]
    pub app: Option<AppName>,
    #[serde(default)]
    pub user_id: Option<UserId>,
    pub created_at: UnixMillis,
    #[serde(default)]
    pub expires_at: Option<UnixMillis>,
    /// Updated at most about once a minute.
    #[serde(default)]
    pub last_used_at: Option<UnixMillis>,
    #[serde(default)]
    pub revoked_at: Option<UnixMillis>,
}

/// The answer to `POST /v1/tokens`: the only time the secret is shown.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    pub token: TokenInfo,
    pub secret: String,
}

/// `grant_type` of the device access token request (RFC 8628 section 3.4).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// `POST /v1/device/code`, form-encoded (RFC 8628 section 3.1).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceCodeRequest {
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Kiln extension: the org (by name) to sign in to, for users of several orgs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
}

/// The device authorization response (RFC 8628 section 3.2).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: String,
    /// Seconds until the codes expire.
    pub expires_in: u64,
    /// Least seconds between polls.
    pub interval: u64,
}

/// `POST /v1/device/token`, form-encoded (RFC 8628 section 3.4).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceTokenRequest {
    pub grant_type: String,
    pub device_code: String,
    pub client_id: String,
}

/// A successful device access token response (RFC 6749 section 5.1).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceAccessToken {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    pub expires_in: u64,
    /// The granted scopes, space-separated.
    pub scope: String,
}

/// An OAuth error response (RFC 6749 section 5.2, codes of RFC 8628 section 3.5):
/// `authorization_pending`, `slow_down`, `access_denied`, `expired_token`, `invalid_grant`,
/// `invalid_request`, `unsupported_grant_type`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OAuthError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
    /// With `slow_down`: the interval to use from now on (Kiln sends it; RFC clients add 5 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<u64>,
}

/// The verification page's form (`POST /v1/device`, form-encoded).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceApproval {
    /// Must equal the page's CSRF cookie.
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub user_code: String,
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub password: String,
    /// The org to sign in to (by name); empty: the one the CLI asked for, else the user's first.
    #[serde(default)]
    pub org: String,
    /// `approve` or `deny`.
    #[serde(default)]
    pub action: String,
}

/// `GET /v1/device` query: a prefilled user code (from `verification_uri_complete`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DevicePageQuery {
    #[serde(default)]
    pub user_code: Option<String>,
}

/// `POST /v1/apps/{app}/scale`: a new release of the serving one with a different instance
/// count or VM size (every field optional; at least one).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleRequest {
    /// Instances per region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = i64, minimum = 0, maximum = 1000))]
    pub count: Option<u32>,
    /// The process group `count` applies to (default: every group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub process: Option<String>,
    /// The one region `count` applies to (default: every region, replacing per-region counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub region: Option<String>,
    /// vCPUs of every instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = i64, minimum = 1, maximum = 64))]
    pub cpus: Option<u32>,
    /// Memory of every instance, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = i64, minimum = 64, maximum = 262144))]
    pub memory_mib: Option<u64>,
}

/// `GET /v1/hosts/placement`: why each host would or would not get the app's next instance.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementExplanation {
    /// The host the scheduler would choose, if any fits.
    pub chosen: Option<HostId>,
    /// Why nothing fits, counted per constraint (when nothing does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_fit: Option<String>,
    /// One line per host: its rank and score, or the constraint that rejected it.
    pub explanation: String,
}

/// `GET /v1/hosts/placement` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementQuery {
    /// Required; checked after authentication so a caller without the scope learns nothing.
    #[serde(default)]
    pub app: String,
    #[serde(default)]
    pub process: Option<String>,
    /// The region to place in (default: the app's primary region).
    #[serde(default)]
    pub region: Option<String>,
}

/// One quota of an org: its limit and what the org uses of it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaLine {
    /// `apps`, `instances`, `memory_mib`, `volumes` or `ipv4_addresses`.
    pub name: String,
    pub limit: u64,
    /// What the org holds now (absent where it is not counted here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    /// The operator set this limit for the org (otherwise it is the platform default).
    pub overridden: bool,
}

/// `GET /v1/quotas`, `GET|PUT /v1/orgs/{org}/quotas`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgQuotas {
    pub org: String,
    pub quotas: Vec<QuotaLine>,
    /// The limits set for this org in place of the defaults.
    pub overrides: kiln_types::event::QuotaOverrides,
}
