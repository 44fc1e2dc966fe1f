//! Secrets vocabulary shared by the control plane, the agent and kiln-init (decision 0010).
//!
//! Names ([`SecretName`]), the size limits every layer enforces, the sealed form stored in the
//! event log ([`SealedSecret`], ciphertext only), and the file an instance reads
//! ([`SecretsFile`], written at [`SECRETS_PATH`]). See docs/specs/secrets/format.md.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::AppName;

/// Where kiln-init writes the secrets file inside an instance (on a tmpfs).
pub const SECRETS_PATH: &str = "/.kiln/secrets.json";
/// The tmpfs kiln-init mounts to hold [`SECRETS_PATH`] (a directory of its own, so the file never
/// touches the instance's disk).
pub const SECRETS_DIR: &str = "/.kiln/secrets";
/// Longest secret name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Largest value of one secret, in bytes.
pub const MAX_VALUE_LEN: usize = 32 * 1024;
/// Largest secrets file (the JSON rendering of every secret of an environment), in bytes.
pub const MAX_FILE_LEN: usize = 64 * 1024;
/// Most secrets in one environment.
pub const MAX_SECRETS: usize = 256;
/// The environment every app has; the only one until environments exist as a resource.
pub const DEFAULT_ENV: &str = "production";

/// A secret's name: environment-variable rules, `[A-Z_][A-Z0-9_]*`, at most [`MAX_NAME_LEN`].
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SecretName(String);

/// Why a string is not a secret name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretNameError {
    #[error("a secret name cannot be empty")]
    Empty,
    #[error("a secret name has at most {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("a secret name starts with A-Z or _ and has only A-Z, 0-9 and _ (like an environment variable)")]
    BadCharacter,
}

impl SecretName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SecretName {
    type Err = SecretNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        let first = bytes.first().ok_or(SecretNameError::Empty)?;
        if bytes.len() > MAX_NAME_LEN {
            return Err(SecretNameError::TooLong);
        }
        let ok_first = first.is_ascii_uppercase() || *first == b'_';
        let ok_rest = bytes
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_');
        if !ok_first || !ok_rest {
            return Err(SecretNameError::BadCharacter);
        }
        Ok(SecretName(s.to_owned()))
    }
}

impl TryFrom<String> for SecretName {
    type Error = SecretNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SecretName> for String {
    fn from(n: SecretName) -> String {
        n.0
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One secret value as the event log stores it: encrypted with the org's data key `key_id`,
/// bound by the AEAD's associated data to (org, app, env, name, version), so a blob moved to
/// another name, app or version fails to decrypt.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    pub name: SecretName,
    /// The data key (`dk_…`) that encrypted it.
    pub key_id: String,
    /// Base64 of nonce ‖ ciphertext ‖ tag.
    pub ciphertext: String,
    /// A keyed digest of the value (changes when the value does; reveals nothing without the
    /// data key), for `kiln secrets list`.
    pub digest: String,
}

/// The secrets file an instance reads at [`SECRETS_PATH`]. The only place values appear in
/// plaintext outside the control plane's memory.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretsFile {
    /// The environment's secrets version this file holds.
    pub version: u64,
    pub app: AppName,
    pub env: String,
    pub secrets: BTreeMap<String, String>,
}

impl fmt::Debug for SecretsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print values, even in a debug dump.
        f.debug_struct("SecretsFile")
            .field("version", &self.version)
            .field("app", &self.app)
            .field("env", &self.env)
            .field("names", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_env_var_rules() {
        for ok in ["A", "_", "DATABASE_URL", "_X9", "A1_2"] {
            assert_eq!(ok.parse::<SecretName>().unwrap().as_str(), ok);
        }
        for bad in ["", "a", "1A", "A-B", "A B", "É", "A\0"] {
            assert!(bad.parse::<SecretName>().is_err(), "{bad:?}");
        }
        assert_eq!(
            "A".repeat(MAX_NAME_LEN + 1).parse::<SecretName>(),
            Err(SecretNameError::TooLong)
        );
        assert!(serde_json::from_str::<SecretName>("\"lower\"").is_err());
    }

    #[test]
    fn debug_never_shows_values() {
        let f = SecretsFile {
            version: 1,
            app: "demo".parse().unwrap(),
            env: DEFAULT_ENV.into(),
            secrets: [("K".to_string(), "hunter2-value".to_string())].into(),
        };
        assert!(!format!("{f:?}").contains("hunter2"));
    }
}
