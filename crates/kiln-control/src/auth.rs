//! Tokens: opaque secrets with the `kiln_` prefix, stored only as SHA-256 hashes; the scopes they
//! carry; and the [`Principal`] extractor that authenticates every request (unknown, revoked and
//! expired tokens are refused; a token restricted to one app sees no other app).

use std::fmt;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use sha2::{Digest, Sha256};

use kiln_types::event::Event;
use kiln_types::{AppId, OrgId, TokenId, UnixMillis, UserId};

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
    /// Set and unset secrets (`kiln secrets set`/`unset`); listing names needs only `read`.
    SecretsWrite,
    /// See secret values (`kiln secrets render --reveal`).
    SecretsRead,
}

impl Scope {
    /// Every scope, in documentation order (docs/security/02-authz-and-scopes.md).
    pub const ALL: [Scope; 8] = [
        Scope::Admin,
        Scope::Read,
        Scope::Deploy,
        Scope::Exec,
        Scope::Host,
        Scope::Edge,
        Scope::SecretsWrite,
        Scope::SecretsRead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Read => "read",
            Scope::Deploy => "deploy",
            Scope::Exec => "exec",
            Scope::Host => "host",
            Scope::Edge => "edge",
            Scope::SecretsWrite => "secrets:write",
            Scope::SecretsRead => "secrets:read",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
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
    new_token(NewToken {
        org,
        name,
        scopes,
        expires_at,
        user_id: None,
        app_id: None,
    })
}

/// What a new token is.
pub(crate) struct NewToken<'a> {
    pub org: &'a OrgId,
    pub name: &'a str,
    pub scopes: &'a [Scope],
    pub expires_at: Option<UnixMillis>,
    pub user_id: Option<UserId>,
    pub app_id: Option<AppId>,
}

/// A fresh secret and the `token_created` event recording its hash.
pub(crate) fn new_token(t: NewToken<'_>) -> (String, Event) {
    let token = generate_token();
    let event = Event::TokenCreated {
        token_id: TokenId::generate(),
        org_id: t.org.clone(),
        name: t.name.to_owned(),
        hash: hash_token(&token),
        scopes: t.scopes.iter().map(|s| s.as_str().to_owned()).collect(),
        expires_at: t.expires_at,
        user_id: t.user_id,
        app_id: t.app_id,
    };
    (token, event)
}

/// Least time between two `token_used` events of one token from one replica.
pub(crate) const TOUCH_EVERY_MS: i64 = 60_000;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    pub token_id: TokenId,
    pub token_name: String,
    pub org_id: OrgId,
    pub scopes: Vec<String>,
    /// The user the token acts for, if any.
    pub user_id: Option<UserId>,
    /// The one app the token may touch, if it is restricted.
    pub app_id: Option<AppId>,
    pub expires_at: Option<UnixMillis>,
}

impl Principal {
    /// Whether the token has `scope` (or admin, which implies every scope).
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes
            .iter()
            .any(|s| s == scope.as_str() || s == Scope::Admin.as_str())
    }

    /// Whether the token may touch `app` at all (an app-scoped token sees only its app).
    pub fn allows_app(&self, app: &AppId) -> bool {
        self.app_id.as_ref().is_none_or(|a| a == app)
    }

    /// Succeeds when the token has `scope` or admin.
    pub fn require(&self, scope: Scope) -> Result<(), ApiFailure> {
        if self.has(scope) {
            Ok(())
        } else {
            Err(ApiFailure::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("this token lacks the `{scope}` scope"),
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
            .ok_or_else(|| unauthorized("unknown token"))?;
        if row.revoked_at.is_some() {
            return Err(unauthorized("token revoked"));
        }
        let now = control.config.clock.now_millis();
        if row.expires_at.is_some_and(|t| t <= now) {
            return Err(unauthorized("token expired"));
        }
        touch(control, &row, now);
        Ok(Principal {
            token_id: row.id,
            token_name: row.name,
            org_id: row.org_id,
            scopes: row.scopes,
            user_id: row.user_id,
            app_id: row.app_id,
            expires_at: row.expires_at,
        })
    }
}

/// Records the token's use, at most once per [`TOUCH_EVERY_MS`] per token: skipped while the view
/// says it was used recently or this replica appended a `token_used` recently. The append runs in
/// the background; the request does not wait for it.
fn touch(control: &std::sync::Arc<crate::Control>, row: &kiln_store::TokenRow, now: i64) {
    if row.last_used_at.is_some_and(|t| now - t < TOUCH_EVERY_MS) {
        return;
    }
    {
        let mut touches = control
            .token_touches
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if touches
            .get(&row.id)
            .is_some_and(|t| now - *t < TOUCH_EVERY_MS)
        {
            return;
        }
        // Bounded: entries older than the window are useless, drop them when the map grows.
        if touches.len() > 100_000 {
            touches.retain(|_, t| now - *t < TOUCH_EVERY_MS);
        }
        touches.insert(row.id.clone(), now);
    }
    let control = control.clone();
    let event = Event::TokenUsed {
        token_id: row.id.clone(),
        org_id: row.org_id.clone(),
        at: now,
    };
    tokio::spawn(async move {
        let res = control
            .store
            .append(kiln_store::Append {
                events: vec![kiln_store::NewEvent::any(event)],
                metadata: kiln_store::Metadata {
                    actor: "system:auth".into(),
                    ..Default::default()
                },
                idempotency: None,
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(error = %kiln_types::error_chain(&e), "cannot record token use");
        }
    });
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

    #[test]
    fn scopes_round_trip() {
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scope::parse("root"), None);
    }
}
