//! Users, their passwords and their roles in orgs.
//!
//! Passwords are hashed with argon2id (RFC 9106) at the `argon2` crate's defaults (19 MiB, 2
//! passes, 1 lane: OWASP's first recommended setting) and stored as PHC strings in the
//! `user_created` event; the password itself never reaches the log, a view or a log line. A role
//! is a fixed set of token scopes ([`role_scopes`]): a login token gets exactly its role's scopes.

use argon2::password_hash::{PasswordHash, SaltString};
use argon2::{Argon2, PasswordHasher, PasswordVerifier};

use kiln_store::{Append, Metadata, NewEvent};
use kiln_types::event::{Event, Role};
use kiln_types::{OrgId, UserId};

use crate::auth::Scope;
use crate::error::ControlError;
use crate::Control;

/// Longest password accepted (argon2 takes any length; this bounds the work per attempt).
pub(crate) const MAX_PASSWORD: usize = 1024;
/// Shortest password accepted when creating a user.
pub(crate) const MIN_PASSWORD: usize = 10;

/// The scopes a member with `role` gets on a login token.
pub fn role_scopes(role: Role) -> &'static [Scope] {
    match role {
        // Owners and admins differ only in managing members, which no API offers yet.
        Role::Owner | Role::Admin => &[Scope::Admin],
        Role::Member => &[Scope::Read, Scope::Deploy, Scope::Exec, Scope::SecretsWrite],
        Role::Viewer => &[Scope::Read],
    }
}

/// Hashes a password with a fresh random salt; the result is a PHC string (`$argon2id$...`).
pub(crate) fn hash_password(password: &str) -> String {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).expect("operating system random source");
    let salt = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt length");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .expect("argon2 with default parameters accepts any password")
}

/// Whether `password` matches the stored PHC string. A malformed stored hash never matches.
pub(crate) fn verify_password(password: &str, phc: &str) -> bool {
    if password.len() > MAX_PASSWORD {
        return false;
    }
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// A PHC string no password matches, hashed once, so that signing in as an unknown email costs
/// the same argon2 work as a wrong password (no timing oracle for which emails exist).
pub(crate) fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("not the password of anyone"))
}

/// Emails are compared lowercased and trimmed; a plausible shape is all that is checked.
pub(crate) fn normalize_email(email: &str) -> Option<String> {
    let e = email.trim().to_ascii_lowercase();
    let (local, domain) = e.split_once('@')?;
    let ok = !local.is_empty()
        && !domain.is_empty()
        && e.len() <= 254
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    ok.then_some(e)
}

/// What `kilnd control users create` asks for.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: String,
    pub password: String,
    /// The org's name.
    pub org: String,
    pub role: Role,
}

impl Control {
    /// Creates a user (or, when the email exists, checks nothing about the password and only
    /// grants the membership) and makes them a member of `org` with `role`.
    pub async fn create_user(&self, new: NewUser) -> Result<(UserId, OrgId), ControlError> {
        let email = normalize_email(&new.email).ok_or_else(|| ControlError::InvalidUser {
            reason: format!("{:?} is not an email address", new.email),
        })?;
        let org = self
            .store
            .org_by_name(new.org.clone())
            .await
            .map_err(ControlError::store("find org"))?
            .ok_or_else(|| ControlError::InvalidUser {
                reason: format!("there is no org named {:?}", new.org),
            })?;
        let existing = self
            .store
            .user_by_email(email.clone())
            .await
            .map_err(ControlError::store("find user"))?;
        let mut events = Vec::new();
        let user_id = match existing {
            Some(u) => u.id,
            None => {
                if new.password.chars().count() < MIN_PASSWORD || new.password.len() > MAX_PASSWORD
                {
                    return Err(ControlError::InvalidUser {
                        reason: format!(
                            "a password needs {MIN_PASSWORD} to {MAX_PASSWORD} characters"
                        ),
                    });
                }
                let user_id = UserId::generate();
                let password = new.password.clone();
                let password_hash = tokio::task::spawn_blocking(move || hash_password(&password))
                    .await
                    .map_err(|_| ControlError::InvalidUser {
                        reason: "password hashing failed".into(),
                    })?;
                events.push(NewEvent::any(Event::UserCreated {
                    user_id: user_id.clone(),
                    email: email.clone(),
                    password_hash,
                }));
                user_id
            }
        };
        events.push(NewEvent::any(Event::MembershipGranted {
            org_id: org.id.clone(),
            user_id: user_id.clone(),
            role: new.role,
        }));
        self.store
            .append(Append {
                events,
                metadata: Metadata {
                    actor: "system:operator".into(),
                    ..Default::default()
                },
                idempotency: None,
            })
            .await
            .map_err(ControlError::store("create user"))?;
        tracing::info!(user_id = %user_id, org_id = %org.id, role = new.role.as_str(), "user created or granted a role");
        Ok((user_id, org.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_salted_argon2id_and_verify_only_the_password() {
        let a = hash_password("correct horse battery");
        let b = hash_password("correct horse battery");
        assert!(a.starts_with("$argon2id$v=19$"), "{a}");
        assert_ne!(a, b, "fresh salt each time");
        assert!(!a.contains("correct horse"));
        assert!(verify_password("correct horse battery", &a));
        assert!(!verify_password("correct horse batterY", &a));
        assert!(!verify_password("x", "not a phc string"));
        assert!(!verify_password(&"x".repeat(MAX_PASSWORD + 1), &a));
        assert!(!verify_password("anything", dummy_hash()));
    }

    #[test]
    fn emails_are_normalized() {
        assert_eq!(
            normalize_email("  Ada@Example.COM ").as_deref(),
            Some("ada@example.com")
        );
        for bad in ["", "ada", "@x", "a@", "a b@c"] {
            assert!(normalize_email(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn every_role_maps_to_scopes() {
        for r in Role::ALL {
            assert!(!role_scopes(r).is_empty());
        }
        assert!(!role_scopes(Role::Viewer).contains(&Scope::Deploy));
    }
}
