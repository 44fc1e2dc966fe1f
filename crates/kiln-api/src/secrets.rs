//! Wire types and client calls of the secrets routes (docs/specs/api/http-api.md).
//!
//! Values travel only in three places: the body of a set request, a `render` with `reveal` (a
//! token with the `secrets:read` scope), and an agent's bundle for an instance on its host.
//! Every other shape carries names, versions and digests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use kiln_types::secrets::SecretsFile;
use kiln_types::{HostId, InstanceId, UnixMillis};

use crate::{ApiError, Client};

/// Query of the app-scoped secrets routes.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SecretsQuery {
    /// The environment (default `production`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// `render` only: show values (needs the `secrets:read` scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reveal: Option<bool>,
}

/// `POST /v1/apps/{app}/secrets`: set (add or replace) secrets, making a new version.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct SetSecrets {
    pub secrets: BTreeMap<String, String>,
    /// Record the change without rolling the app; the next deploy picks it up.
    #[serde(default)]
    pub stage: bool,
}

impl std::fmt::Debug for SetSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetSecrets")
            .field("names", &self.secrets.keys().collect::<Vec<_>>())
            .field("stage", &self.stage)
            .finish()
    }
}

/// `POST /v1/apps/{app}/secrets/unset`: remove secrets, making a new version.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UnsetSecrets {
    pub names: Vec<String>,
    #[serde(default)]
    pub stage: bool,
}

/// The outcome of a set or unset.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretsChanged {
    pub env: String,
    /// The new secrets version.
    pub version: u64,
    pub staged: bool,
    /// How running instances get the new version: `none` (staged, or nothing deployed yet),
    /// `restart` (a new release rolls the instances) or `signal` (the file is replaced in place).
    pub rollout: String,
    /// The release created to roll the change out, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_version: Option<u64>,
}

/// A secret as `list` shows it: never its value.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretInfo {
    pub name: String,
    /// The secrets version that last set it.
    pub version: u64,
    /// Keyed digest of the value: changes when the value does.
    pub digest: String,
    pub updated_at: UnixMillis,
}

/// `GET /v1/apps/{app}/secrets`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretList {
    pub env: String,
    /// The current secrets version (0: never had secrets).
    pub version: u64,
    /// Whether the current version was staged and waits for a deploy.
    pub staged: bool,
    /// The version the newest release runs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed_version: Option<u64>,
    pub secrets: Vec<SecretInfo>,
}

/// `GET /v1/apps/{app}/secrets/render`: the file an instance of the next deploy receives,
/// values replaced by `********` unless `revealed`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedSecrets {
    pub revealed: bool,
    pub file: SecretsFile,
}

impl std::fmt::Debug for RenderedSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenderedSecrets")
            .field("revealed", &self.revealed)
            .field("file", &self.file)
            .finish()
    }
}

/// What `render` shows in place of a value.
pub const MASK: &str = "********";

fn query_string(q: &SecretsQuery) -> String {
    let mut parts = Vec::new();
    if let Some(env) = &q.env {
        parts.push(format!("env={env}"));
    }
    if let Some(r) = q.reveal {
        parts.push(format!("reveal={r}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

impl Client {
    pub async fn set_secrets(
        &self,
        app: &str,
        env: Option<&str>,
        body: &SetSecrets,
    ) -> Result<SecretsChanged, ApiError> {
        let q = query_string(&SecretsQuery {
            env: env.map(str::to_owned),
            reveal: None,
        });
        self.post(&format!("/v1/apps/{app}/secrets{q}"), body, None)
            .await
    }

    pub async fn unset_secrets(
        &self,
        app: &str,
        env: Option<&str>,
        body: &UnsetSecrets,
    ) -> Result<SecretsChanged, ApiError> {
        let q = query_string(&SecretsQuery {
            env: env.map(str::to_owned),
            reveal: None,
        });
        self.post(&format!("/v1/apps/{app}/secrets/unset{q}"), body, None)
            .await
    }

    pub async fn list_secrets(&self, app: &str, env: Option<&str>) -> Result<SecretList, ApiError> {
        let q = query_string(&SecretsQuery {
            env: env.map(str::to_owned),
            reveal: None,
        });
        self.get(&format!("/v1/apps/{app}/secrets{q}")).await
    }

    pub async fn render_secrets(
        &self,
        app: &str,
        env: Option<&str>,
        reveal: bool,
    ) -> Result<RenderedSecrets, ApiError> {
        let q = query_string(&SecretsQuery {
            env: env.map(str::to_owned),
            reveal: Some(reveal),
        });
        self.get(&format!("/v1/apps/{app}/secrets/render{q}")).await
    }

    /// The agent's call: the secrets file of an instance placed on `host`.
    pub async fn instance_secrets(
        &self,
        host: &HostId,
        instance: &InstanceId,
    ) -> Result<SecretsFile, ApiError> {
        self.get(&format!("/v1/hosts/{host}/instances/{instance}/secrets"))
            .await
    }
}
