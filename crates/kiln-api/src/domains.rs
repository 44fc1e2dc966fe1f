//! Wire types and client calls of the custom-domain routes (`/v1/apps/{app}/domains`,
//! docs/specs/networking/ingress-l4.md#custom-domains-built).
//!
//! A domain is added (the answer says which DNS records to create), verified (the control plane
//! looks the challenge TXT record up), then routed by the edges like the app's default hostname.
//! The edge never terminates TLS: the app serves the certificate for the hostname itself.

use serde::{Deserialize, Serialize};

use kiln_types::dns::Hostname;
use kiln_types::{AppName, UnixMillis};

use crate::{ApiError, Client};

/// Where a domain stands.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainStatus {
    /// Added, not yet proven: not routed.
    Pending,
    /// DNS showed the challenge record: routed to the app.
    Verified,
}

impl DomainStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Verified => "verified",
        }
    }
}

/// A DNS record the domain's owner creates at their DNS provider.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    /// The record's name (owner), e.g. `_kiln-challenge.www.example.com`.
    pub name: String,
    /// `TXT` or `CNAME`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The record's value, e.g. `kiln-verify=...` (a TXT record holds it in quotes).
    pub value: String,
}

/// A custom hostname of an app environment.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Domain {
    pub hostname: Hostname,
    pub app: AppName,
    pub env: String,
    pub status: DomainStatus,
    pub created_at: UnixMillis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<UnixMillis>,
    /// The TXT record that proves ownership (kept after verification: removing it changes
    /// nothing, but a re-verification needs it).
    pub challenge: DnsRecord,
    /// Where traffic goes: a CNAME to the app's default hostname (at a zone apex, where a CNAME
    /// cannot be, an ALIAS/ANAME record or the edges' addresses).
    pub traffic: DnsRecord,
}

/// `GET /v1/apps/{app}/domains`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainPage {
    pub items: Vec<Domain>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `POST /v1/apps/{app}/domains`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddDomain {
    /// A DNS name (lowercased, one trailing dot dropped), or `*.` and a DNS name (a wildcard over
    /// one label); not an IP address, not under the platform's own app domain.
    #[cfg_attr(feature = "openapi", schema(example = "www.example.com"))]
    pub hostname: String,
}

/// Query of the domain routes.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DomainsQuery {
    /// The environment (default `production`); `add` only, the others find the hostname in any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

impl Client {
    /// Every domain of the app (one page holds them all: an app has at most a few hundred).
    pub async fn list_domains(&self, app: &str) -> Result<Vec<Domain>, ApiError> {
        let page: DomainPage = self.get(&format!("/v1/apps/{app}/domains")).await?;
        Ok(page.items)
    }

    pub async fn add_domain(
        &self,
        app: &str,
        env: Option<&str>,
        hostname: &str,
        idempotency_key: &str,
    ) -> Result<Domain, ApiError> {
        let q = env.map(|e| format!("?env={e}")).unwrap_or_default();
        self.post(
            &format!("/v1/apps/{app}/domains{q}"),
            &AddDomain {
                hostname: hostname.to_owned(),
            },
            Some(idempotency_key),
        )
        .await
    }

    pub async fn domain(&self, app: &str, hostname: &str) -> Result<Domain, ApiError> {
        self.get(&format!("/v1/apps/{app}/domains/{hostname}"))
            .await
    }

    /// Asks the control plane to look the challenge record up now.
    pub async fn verify_domain(&self, app: &str, hostname: &str) -> Result<Domain, ApiError> {
        self.post(
            &format!("/v1/apps/{app}/domains/{hostname}/verify"),
            &serde_json::json!({}),
            None,
        )
        .await
    }

    pub async fn remove_domain(&self, app: &str, hostname: &str) -> Result<(), ApiError> {
        let path = format!("/v1/apps/{app}/domains/{hostname}");
        let _: serde_json::Value = self
            .send(&path, self.req(reqwest::Method::DELETE, &path))
            .await?;
        Ok(())
    }
}
