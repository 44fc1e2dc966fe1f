//! Tokens: opaque secrets with the `kiln_` prefix, stored only as SHA-256 hashes.

use std::fmt;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use sha2::{Digest, Sha256};

use kiln_types::event::Event;
use kiln_types::{now_millis, OrgId, TokenId};

use crate::error::ApiFailure;

/// Every token starts with this, so leaked tokens are recognisable by scanners.
pub const TOKEN_PREFIX: &str = "kiln_";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything within the org.
    Admin,
    /// Read apps, releases and status.
    Read,
    /// Create apps and releases.
    Deploy,
    /// Run commands in instances (`kiln exec`).
    Exec,
    /// A host agent: register, watch assignments, report instances.
    Host,
    /// An edge: watch routes.
    Edge,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Read => "read",
            Scope::Deploy => "deploy",
            Scope::Exec => "exec",
            Scope::Host => "host",
            Scope::Edge => "edge",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fresh token secret: the prefix and 32 base32 characters (160 bits).
pub fn generate_token() -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).expect("operating system random source");
    let body: String = raw
        .iter()
        .map(|b| ALPHABET[(b & 31) as usize] as char)
        .collect();
    format!("{TOKEN_PREFIX}{body}")
}

/// The stored form of a token. Tokens carry 160 random bits, so a fast hash is enough: there is
/// nothing to brute-force.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub(crate) fn new_token_event(
    org: &OrgId,
    name: &str,
    scopes: &[Scope],
    expires_at: Option<i64>,
) -> (String, Event) {
    let token = generate_token();
    let event = Event::TokenCreated {
        token_id: TokenId::generate(),
        org_id: org.clone(),
        name: name.to_owned(),
        hash: hash_token(&token),
        scopes: scopes.iter().map(|s| s.as_str().to_owned()).collect(),
        expires_at,
    };
    (token, event)
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    pub token_id: TokenId,
    pub token_name: String,
    pub org_id: OrgId,
    pub scopes: Vec<String>,
}

impl Principal {
    /// Succeeds when the token has `scope` or admin.
    pub fn require(&self, scope: Scope) -> Result<(), ApiFailure> {
        if self
            .scopes
            .iter()
            .any(|s| s == scope.as_str() || s == Scope::Admin.as_str())
        {
            Ok(())
        } else {
            Err(ApiFailure::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("this token lacks the {scope:?} scope"),
            ))
        }
    }

    pub fn actor(&self) -> String {
        format!("token:{}", self.token_id)
    }
}

impl FromRequestParts<std::sync::Arc<crate::Control>> for Principal {
    type Rejection = ApiFailure;

    async fn from_request_parts(
        parts: &mut Parts,
        control: &std::sync::Arc<crate::Control>,
    ) -> Result<Self, ApiFailure> {
        // Already authenticated by a layer (the audit layer of mutating routes).
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(p.clone());
        }
        let unauthorized =
            |detail: &str| ApiFailure::new(StatusCode::UNAUTHORIZED, "unauthorized", detail);
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauthorized("missing `Authorization: Bearer <token>` header"))?;
        let token = header
            .strip_prefix("Bearer ")
            .filter(|t| t.starts_with(TOKEN_PREFIX))
            .ok_or_else(|| unauthorized("expected a `kiln_` bearer token"))?;
        let row = control
            .store
            .token_by_hash(hash_token(token))
            .await?
            .ok_or_else(|| unauthorized("unknown or revoked token"))?;
        if row.expires_at.is_some_and(|t| t <= now_millis()) {
            return Err(unauthorized("token expired"));
        }
        Ok(Principal {
            token_id: row.id,
            token_name: row.name,
            org_id: row.org_id,
            scopes: row.scopes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_prefix_and_hash_differs() {
        let t = generate_token();
        assert!(t.starts_with("kiln_"));
        assert_eq!(t.len(), 5 + 32);
        assert_ne!(generate_token(), t);
        let h = hash_token(&t);
        assert_eq!(h.len(), 64);
        assert!(!h.contains(&t[5..]));
    }
}
