//! Validated names that end up in DNS labels, hostnames and file names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name {name:?} is longer than {max} characters")]
    TooLong { name: String, max: usize },
    #[error("name {name:?} must start with a lowercase letter")]
    BadStart { name: String },
    #[error("name {name:?} must not end with '-'")]
    BadEnd { name: String },
    #[error("name {name:?} contains {ch:?}; use lowercase letters, digits and '-'")]
    BadChar { name: String, ch: char },
}

/// Checks a DNS-safe label: lowercase letters, digits and hyphens, starting with a letter, at most
/// `max` characters. App names become the first label of `<app>.<domain>`.
pub fn check_dns_label(name: &str, max: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > max {
        return Err(NameError::TooLong {
            name: name.to_owned(),
            max,
        });
    }
    if !name.as_bytes()[0].is_ascii_lowercase() {
        return Err(NameError::BadStart {
            name: name.to_owned(),
        });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::BadChar {
            name: name.to_owned(),
            ch,
        });
    }
    if name.ends_with('-') {
        return Err(NameError::BadEnd {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// An app name: a DNS label of at most 63 characters, unique within the platform (it is the first
/// label of the app's default hostname).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AppName(String);

impl AppName {
    pub const MAX_LEN: usize = 63;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for AppName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        check_dns_label(s, Self::MAX_LEN)?;
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for AppName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        s.parse()
    }
}

impl From<AppName> for String {
    fn from(n: AppName) -> String {
        n.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names() {
        assert!("hello-tls".parse::<AppName>().is_ok());
        assert!("a1".parse::<AppName>().is_ok());
        assert_eq!("".parse::<AppName>(), Err(NameError::Empty));
        assert!(matches!(
            "Hello".parse::<AppName>(),
            Err(NameError::BadStart { .. })
        ));
        assert!(matches!(
            "1abc".parse::<AppName>(),
            Err(NameError::BadStart { .. })
        ));
        assert!(matches!(
            "ab_c".parse::<AppName>(),
            Err(NameError::BadChar { ch: '_', .. })
        ));
        assert!(matches!(
            "abc-".parse::<AppName>(),
            Err(NameError::BadEnd { .. })
        ));
        assert!(matches!(
            "a".repeat(64).parse::<AppName>(),
            Err(NameError::TooLong { .. })
        ));
    }
}
