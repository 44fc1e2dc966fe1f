//! Typed identifiers.
//!
//! Every id is a prefix naming its kind followed by 20 lowercase base32 characters (100 random bits),
//! e.g. `app_3kq5...`. The prefix makes ids recognisable in logs and lets parsing reject an id of the
//! wrong kind at the boundary instead of deep inside a query.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
const RANDOM_LEN: usize = 20;

/// An id string did not have the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {kind} id {value:?}: expected `{prefix}_` followed by {RANDOM_LEN} base32 characters"
)]
pub struct IdError {
    pub kind: &'static str,
    pub prefix: &'static str,
    pub value: String,
}

fn random_suffix() -> String {
    let mut raw = [0u8; RANDOM_LEN];
    // getrandom only fails when the OS has no entropy source at all; nothing sensible can continue.
    getrandom::fill(&mut raw).expect("operating system random source");
    raw.iter()
        .map(|b| ALPHABET[(b & 31) as usize] as char)
        .collect()
}

fn valid_suffix(s: &str) -> bool {
    s.len() == RANDOM_LEN && s.bytes().all(|b| ALPHABET.contains(&b))
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A fresh random id.
            pub fn generate() -> Self {
                Self(format!("{}_{}", $prefix, random_suffix()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The random part, without the prefix; unique enough for short host-side names.
            pub fn suffix(&self) -> &str {
                &self.0[$prefix.len() + 1..]
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                match s.strip_prefix(concat!($prefix, "_")) {
                    Some(rest) if valid_suffix(rest) => Ok(Self(s.to_owned())),
                    _ => Err(IdError { kind: $kind, prefix: $prefix, value: s.to_owned() }),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

typed_id!(/// An organisation: the tenant boundary.
    OrgId, "org", "org");
typed_id!(/// An application inside an org.
    AppId, "app", "app");
typed_id!(/// One immutable release of an app (image digest + manifest + secrets version).
    ReleaseId, "rel", "release");
typed_id!(/// One instance (one microVM, or one sandbox under runc) of a release.
    InstanceId, "ins", "instance");
typed_id!(/// A host running the agent.
    HostId, "host", "host");
typed_id!(/// An API token (the id, never the secret).
    TokenId, "tok", "token");
typed_id!(/// A person who signs in (email and password) and is a member of orgs.
    UserId, "usr", "user");
typed_id!(/// A local volume: one slot of one mount of one process group, on one host (decision 0011).
    VolumeId, "vol", "volume");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_round_trip_and_reject_other_kinds() {
        let id = AppId::generate();
        assert!(id.as_str().starts_with("app_"));
        assert_eq!(id.as_str().parse::<AppId>().unwrap(), id);
        assert!(id.as_str().parse::<HostId>().is_err());
        assert!("app_short".parse::<AppId>().is_err());
        assert!("app_ABCDEFGHJKMNPQRSTVWX".parse::<AppId>().is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<AppId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<AppId>("\"rel_00000000000000000000\"").is_err());
    }

    #[test]
    fn two_ids_differ() {
        assert_ne!(InstanceId::generate(), InstanceId::generate());
    }
}
