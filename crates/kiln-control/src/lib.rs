//! The Kiln control plane.
//!
//! This crate owns the HTTP API under `/v1` (authentication, tenancy, request ids, problem
//! responses, pagination, idempotency, rate limits, the audit trail) and its OpenAPI document
//! generated from the handlers ([`openapi_yaml`]), the decisions that turn requests into events
//! (apps, releases, host registration, instance reports), and the reconciler that drives releases
//! to running instances through the scheduler. State lives in `kiln-store`; placement math in `kiln-scheduler`; image resolution in
//! `kiln-oci`. It never runs workloads or proxies traffic: agents and edges do, talking to this
//! crate only over the API.

mod api;
mod auth;
mod clock;
mod device;
mod dns;
mod domains;
mod error;
mod exec;
mod hosts;
mod ips;
mod logs;
mod quotas;
mod reconciler;
pub mod secrets;
mod secrets_api;
mod tokens_api;
mod users;

use std::sync::Arc;
use std::time::Duration;

use kiln_store::Store;
use kiln_types::OrgId;

pub use api::{openapi_document, openapi_yaml, RateLimit};
pub use auth::{generate_token, hash_token, Scope};
pub use clock::Clock;
pub use dns::{first_nameserver, system_resolver};
pub use domains::{run_checks as run_domain_checks, CheckSchedule};
pub use error::ControlError;
pub use quotas::Quotas;
pub use reconciler::Reconciler;
pub use users::{role_scopes, NewUser};

/// Control-plane settings.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Apps get `<app>.<dev_domain>` as their default hostname.
    pub app_domain: String,
    /// Registry hosts reached over plain HTTP (loopback always is).
    pub plain_http_registries: Vec<String>,
    /// Longest a watch request may wait.
    pub max_watch: Duration,
    /// How often the reconciler re-checks deadlines when nothing happens.
    pub reconcile_tick: Duration,
    /// Public IPv4 addresses handed out as dedicated addresses; `None`: the add-on is off.
    pub ipv4_pool: Option<kiln_types::net::Ipv4Pool>,
    /// A host whose agent is silent this long is declared down (agents beat every 5 s).
    pub host_down_after: Duration,
    /// What one org may hold.
    pub quotas: Quotas,
    /// The clock of auth decisions (expiry, polling); tests move it forward.
    pub clock: Clock,
    /// How long a device code (RFC 8628) may wait for approval.
    pub device_code_ttl: Duration,
    /// The smallest polling interval a device-flow client is told (`interval`, whole seconds).
    pub device_poll_interval: Duration,
    /// Lifetime of the token a device login issues.
    pub login_token_ttl: Duration,
    /// The URL users reach the API at (for `verification_uri`); default: `http://` + the
    /// request's `Host`.
    pub public_url: Option<String>,
    /// Where the master keys of secrets encryption come from; without one, the secrets routes
    /// answer `secrets_unavailable`.
    pub master_key: Option<secrets::MasterKeySource>,
    /// Requests per bearer token.
    pub rate_limit: RateLimit,
    /// The recursive resolver custom domains are verified through; `None`: verification answers
    /// `dns_unavailable`.
    pub dns_resolver: Option<std::net::SocketAddr>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            app_domain: "kiln.test".into(),
            plain_http_registries: Vec::new(),
            max_watch: Duration::from_secs(60),
            reconcile_tick: Duration::from_millis(500),
            ipv4_pool: None,
            host_down_after: Duration::from_secs(20),
            quotas: Quotas::default(),
            clock: Clock::default(),
            device_code_ttl: Duration::from_secs(600),
            device_poll_interval: Duration::from_secs(5),
            login_token_ttl: Duration::from_secs(7 * 24 * 3600),
            public_url: None,
            master_key: None,
            rate_limit: RateLimit::default(),
            dns_resolver: None,
        }
    }
}

/// Shared state of the control-plane service.
pub struct Control {
    pub(crate) store: Store,
    pub(crate) config: ControlConfig,
    pub(crate) registry: kiln_oci::RegistryClient,
    pub(crate) logs: logs::LogStore,
    pub(crate) exec: exec::ExecBroker,
    pub(crate) heartbeats: hosts::Heartbeats,
    pub(crate) device: device::DeviceFlows,
    /// When each token last had a `token_used` event appended by this replica.
    pub(crate) token_touches: std::sync::Mutex<std::collections::HashMap<kiln_types::TokenId, i64>>,
    pub(crate) keyring: Option<Arc<secrets::Keyring>>,
    pub(crate) rate_limiter: api::RateLimiter,
    pub(crate) idempotency: api::IdempotencyCache,
    /// The first org created: it runs the platform, so only its tokens may act as hosts and
    /// edges (their routes see every org's workloads).
    pub(crate) operator: tokio::sync::OnceCell<OrgId>,
}

/// What first start created: the one org and its admin token (shown once, stored only as a hash).
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub org_id: OrgId,
    pub admin_token: String,
}

impl Control {
    pub fn new(store: Store, config: ControlConfig) -> Result<Arc<Control>, ControlError> {
        let registry = kiln_oci::RegistryClient::new(kiln_oci::ClientConfig {
            plain_http: config.plain_http_registries.clone(),
            ..Default::default()
        })
        .map_err(|source| ControlError::RegistryClient { source })?;
        let keyring = match &config.master_key {
            Some(source) => Some(
                secrets::Keyring::open(source.clone())
                    .map_err(|source| ControlError::MasterKey { source })?,
            ),
            None => None,
        };
        Ok(Arc::new(Control {
            keyring,
            store,
            registry,
            logs: logs::LogStore::new(),
            exec: exec::ExecBroker::default(),
            heartbeats: hosts::Heartbeats::default(),
            device: device::DeviceFlows::default(),
            token_touches: Default::default(),
            rate_limiter: api::RateLimiter::new(config.rate_limit),
            idempotency: api::IdempotencyCache::default(),
            operator: tokio::sync::OnceCell::new(),
            config,
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The master key ids the keyring holds (current first); empty without a master key.
    pub fn master_key_ids(&self) -> Vec<String> {
        self.keyring
            .as_ref()
            .map(|k| k.master_ids())
            .unwrap_or_default()
    }

    /// The axum router serving the API.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        api::router(self.clone())
    }

    /// On an empty store, creates the first org and an admin token. Returns `None` when the store
    /// already has an org.
    pub async fn bootstrap(&self, org_name: &str) -> Result<Option<Bootstrap>, ControlError> {
        if self
            .store
            .orgs_count()
            .await
            .map_err(ControlError::store("count orgs"))?
            > 0
        {
            return Ok(None);
        }
        let org_id = OrgId::generate();
        let (admin_token, token_event) =
            auth::new_token_event(&org_id, "admin", &[Scope::Admin], None);
        let events = vec![
            kiln_store::NewEvent {
                event: kiln_types::event::Event::OrgCreated {
                    org_id: org_id.clone(),
                    name: org_name.to_owned(),
                },
                expected: kiln_store::ExpectedVersion::NoStream,
            },
            kiln_store::NewEvent::any(token_event),
        ];
        self.store
            .append(kiln_store::Append {
                events,
                metadata: kiln_store::Metadata {
                    actor: "system:bootstrap".into(),
                    ..Default::default()
                },
                idempotency: None,
            })
            .await
            .map_err(ControlError::store("bootstrap org"))?;
        Ok(Some(Bootstrap {
            org_id,
            admin_token,
        }))
    }

    /// Creates a token for `org` with `scopes`, returning the secret (shown once).
    pub async fn create_token(
        &self,
        org: &OrgId,
        name: &str,
        scopes: &[Scope],
    ) -> Result<String, ControlError> {
        let (token, event) = auth::new_token_event(org, name, scopes, None);
        self.store
            .append(kiln_store::Append {
                events: vec![kiln_store::NewEvent::any(event)],
                metadata: kiln_store::Metadata {
                    actor: "system:bootstrap".into(),
                    ..Default::default()
                },
                idempotency: None,
            })
            .await
            .map_err(ControlError::store("create token"))?;
        Ok(token)
    }

    /// Whether a token (by its secret) is known to the store, not revoked and not expired.
    pub async fn token_is_valid(&self, token: &str) -> Result<bool, ControlError> {
        let now = self.config.clock.now_millis();
        Ok(self
            .store
            .token_by_hash(hash_token(token))
            .await
            .map_err(ControlError::store("look up token"))?
            .is_some_and(|t| t.revoked_at.is_none() && t.expires_at.is_none_or(|e| e > now)))
    }

    /// The org of the single-org bootstrap, for `kilnd dev`.
    pub async fn first_org(&self) -> Result<Option<OrgId>, ControlError> {
        let events = self
            .store
            .read_after(0, 1)
            .await
            .map_err(ControlError::store("read first event"))?;
        Ok(events.into_iter().find_map(|e| match e.event {
            kiln_types::event::Event::OrgCreated { org_id, .. } => Some(org_id),
            _ => None,
        }))
    }
}
