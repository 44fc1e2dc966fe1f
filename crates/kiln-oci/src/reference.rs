//! Image references as users write them (`nginx`, `127.0.0.1:5000/app:v1`, `host/a/b@sha256:...`),
//! parsed with the rules the Docker CLI and the distribution project use.
//!
//! Normalisation:
//! 1. A trailing `@sha256:<64 lowercase hex>` is the digest; no other algorithm is accepted.
//! 2. A `:` after the last `/` starts the tag.
//! 3. The first `/`-separated component is the registry when it looks like a host (contains `.` or
//!    `:`, is `localhost`, is a bracketed IPv6 address or has upper-case letters); otherwise the
//!    registry is Docker Hub.
//! 4. On Docker Hub, single-component names live under `library/`, and `docker.io` /
//!    `index.docker.io` are spelled as the host the API is really served from, [`DOCKER_HUB`].
//! 5. Without a tag and a digest the tag is `latest`.

use std::fmt;
use std::str::FromStr;

use crate::digest::is_valid_digest;

/// The host Docker Hub's distribution API is served from.
pub const DOCKER_HUB: &str = "registry-1.docker.io";

/// Names the Docker CLI accepts for Docker Hub.
const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", DOCKER_HUB];

/// Longest `registry/repository`, as in the distribution reference grammar.
const MAX_NAME_LEN: usize = 255;

/// Longest tag.
const MAX_TAG_LEN: usize = 128;

/// A parsed image reference. At least one of `tag` and `digest` is set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host with optional port, e.g. `127.0.0.1:5000` or [`DOCKER_HUB`].
    pub registry: String,
    /// Repository path inside the registry, e.g. `library/nginx`.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 lowercase hex>`; when present, it is what the reference resolves to.
    pub digest: Option<String>,
}

/// Why a string is not an image reference. Every variant carries the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("image reference {reference:?} is longer than {MAX_NAME_LEN} characters")]
    TooLong { reference: String },
    #[error(
        "image reference {reference:?} has an invalid digest \
         (only sha256 with 64 lowercase hex digits is supported)"
    )]
    InvalidDigest { reference: String },
    #[error("image reference {reference:?} has an invalid tag {tag:?}")]
    InvalidTag { reference: String, tag: String },
    #[error("image reference {reference:?} has an invalid registry host {registry:?}")]
    InvalidRegistry { reference: String, registry: String },
    #[error("image reference {reference:?} has an invalid repository name {repository:?}")]
    InvalidRepository {
        reference: String,
        repository: String,
    },
}

impl Reference {
    /// Parses a reference with Docker's normalisation rules (see the module documentation).
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        // Bound the work before looking at anything: the longest valid reference is a 255-byte
        // name, a 128-byte tag and a 71-byte digest.
        if s.len() > MAX_NAME_LEN + 1 + MAX_TAG_LEN + 1 + 71 {
            return Err(ReferenceError::TooLong {
                reference: s.to_owned(),
            });
        }

        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => {
                if !is_valid_digest(digest) {
                    return Err(ReferenceError::InvalidDigest {
                        reference: s.to_owned(),
                    });
                }
                (rest, Some(digest.to_owned()))
            }
            None => (s, None),
        };

        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                (&rest[..colon], Some(&rest[colon + 1..]))
            }
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            if !is_valid_tag(tag) {
                return Err(ReferenceError::InvalidTag {
                    reference: s.to_owned(),
                    tag: tag.to_owned(),
                });
            }
        }

        let (registry, repository) = match name.split_once('/') {
            Some((first, remainder)) if looks_like_host(first) => (first, remainder.to_owned()),
            _ => (DOCKER_HUB, name.to_owned()),
        };
        if !is_valid_registry(registry) {
            return Err(ReferenceError::InvalidRegistry {
                reference: s.to_owned(),
                registry: registry.to_owned(),
            });
        }
        let registry = if DOCKER_HUB_ALIASES.contains(&registry) {
            DOCKER_HUB
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(ReferenceError::TooLong {
                reference: s.to_owned(),
            });
        }
        if !is_valid_repository(&repository) {
            return Err(ReferenceError::InvalidRepository {
                reference: s.to_owned(),
                repository,
            });
        }

        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_owned()),
        };
        Ok(Reference {
            registry: registry.to_owned(),
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry's manifest endpoint for: the digest when there is one (a digest
    /// pins the content; the tag is then informational), else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The same image pinned by `digest`, as the agent pulls it.
    pub fn pinned(&self, digest: &str) -> kiln_types::ImageRef {
        kiln_types::ImageRef {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            digest: digest.to_owned(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

/// Checks the registry and repository of an [`kiln_types::ImageRef`] built elsewhere, so that
/// they can be put into a URL as they are.
pub(crate) fn validate_image_ref(image: &kiln_types::ImageRef) -> Result<(), ReferenceError> {
    let reference = image.to_string();
    if !is_valid_registry(&image.registry) {
        return Err(ReferenceError::InvalidRegistry {
            reference,
            registry: image.registry.clone(),
        });
    }
    if !is_valid_repository(&image.repository) {
        return Err(ReferenceError::InvalidRepository {
            reference,
            repository: image.repository.clone(),
        });
    }
    if !is_valid_digest(&image.digest) {
        return Err(ReferenceError::InvalidDigest { reference });
    }
    Ok(())
}

/// Docker's heuristic for "the first component is a registry host".
fn looks_like_host(component: &str) -> bool {
    component.contains(['.', ':'])
        || component == "localhost"
        || component.starts_with('[')
        || component.bytes().any(|b| b.is_ascii_uppercase())
}

/// `host[:port]` where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
pub(crate) fn is_valid_registry(registry: &str) -> bool {
    let (host, port) = if let Some(bracketed) = registry.strip_prefix('[') {
        let Some((ip, after)) = bracketed.split_once(']') else {
            return false;
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    if registry.starts_with('[') {
        return true;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `component(/component)*` where a component is lowercase alphanumeric runs joined by `.`, `_`,
/// `__` or any number of `-`.
pub(crate) fn is_valid_repository(repository: &str) -> bool {
    !repository.is_empty()
        && repository.len() <= MAX_NAME_LEN
        && repository.split('/').all(is_valid_path_component)
}

fn is_valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) if alnum(first) && alnum(last) => {}
        _ => return false,
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn is_valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    match tag.as_bytes().split_first() {
        Some((&first, rest)) => {
            tag.len() <= MAX_TAG_LEN
                && word(first)
                && rest.iter().all(|&b| word(b) || b == b'.' || b == b'-')
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// (registry, repository, tag, digest)
    type Parts = (String, String, Option<String>, Option<String>);
    type ErrorCheck = fn(&ReferenceError) -> bool;

    fn parsed(s: &str) -> Parts {
        let r = Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        (r.registry, r.repository, r.tag, r.digest)
    }

    fn tuple(registry: &str, repository: &str, tag: Option<&str>, digest: Option<&str>) -> Parts {
        (
            registry.to_owned(),
            repository.to_owned(),
            tag.map(str::to_owned),
            digest.map(str::to_owned),
        )
    }

    #[test]
    fn good_references() {
        let hub = DOCKER_HUB;
        let with_digest = format!("127.0.0.1:5000/a/b@{D}");
        let tag_and_digest = format!("host.example/a:v2@{D}");
        let cases: Vec<(&str, Parts)> = vec![
            ("nginx", tuple(hub, "library/nginx", Some("latest"), None)),
            (
                "nginx:1.25",
                tuple(hub, "library/nginx", Some("1.25"), None),
            ),
            ("user/app", tuple(hub, "user/app", Some("latest"), None)),
            (
                "docker.io/nginx",
                tuple(hub, "library/nginx", Some("latest"), None),
            ),
            ("index.docker.io/u/a:t", tuple(hub, "u/a", Some("t"), None)),
            (
                "127.0.0.1:5000/hello-tls:v1",
                tuple("127.0.0.1:5000", "hello-tls", Some("v1"), None),
            ),
            (
                "localhost/app",
                tuple("localhost", "app", Some("latest"), None),
            ),
            (
                "localhost:5000/app",
                tuple("localhost:5000", "app", Some("latest"), None),
            ),
            (
                "[::1]:5000/x/y:z",
                tuple("[::1]:5000", "x/y", Some("z"), None),
            ),
            ("[::1]/x", tuple("[::1]", "x", Some("latest"), None)),
            (
                "ghcr.io/o/r/deep/path:a_b.c-d",
                tuple("ghcr.io", "o/r/deep/path", Some("a_b.c-d"), None),
            ),
            ("Host/app", tuple("Host", "app", Some("latest"), None)),
            (
                "a/b__c/d---e/f.g",
                tuple(hub, "a/b__c/d---e/f.g", Some("latest"), None),
            ),
            (&with_digest, tuple("127.0.0.1:5000", "a/b", None, Some(D))),
            (
                &tag_and_digest,
                tuple("host.example", "a", Some("v2"), Some(D)),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(parsed(input), expected, "{input}");
        }
    }

    #[test]
    fn bad_references() {
        let long = format!("h.io/{}", "a".repeat(260));
        let cases: Vec<(String, ErrorCheck)> = vec![
            (String::new(), |e| matches!(e, ReferenceError::Empty)),
            ("Nginx".into(), |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            ("h.io/App".into(), |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            ("h.io/a//b".into(), |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            ("h.io/-a".into(), |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            ("h.io/a.".into(), |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            ("h.io/a..b".into(), |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            ("h.io/a___b".into(), |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            ("h.io/".into(), |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            ("h.io/a:".into(), |e| {
                matches!(e, ReferenceError::InvalidTag { .. })
            }),
            ("h.io/a:-x".into(), |e| {
                matches!(e, ReferenceError::InvalidTag { .. })
            }),
            ("h.io/a:x/y".into(), |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            (format!("a:{}", "t".repeat(129)), |e| {
                matches!(e, ReferenceError::InvalidTag { .. })
            }),
            ("h.io/a@sha256:abc".into(), |e| {
                matches!(e, ReferenceError::InvalidDigest { .. })
            }),
            (
                format!("h.io/a@{}", D.to_uppercase().replace("SHA256", "sha256")),
                |e| matches!(e, ReferenceError::InvalidDigest { .. }),
            ),
            (format!("h.io/a@sha512:{}", "a".repeat(128)), |e| {
                matches!(e, ReferenceError::InvalidDigest { .. })
            }),
            (format!("h.io/a@{D}@{D}"), |e| {
                matches!(e, ReferenceError::InvalidDigest { .. })
            }),
            ("h_o.io/a".into(), |e| {
                matches!(e, ReferenceError::InvalidRegistry { .. })
            }),
            ("h.io:port/a".into(), |e| {
                matches!(e, ReferenceError::InvalidRegistry { .. })
            }),
            ("h.io:123456/a".into(), |e| {
                matches!(e, ReferenceError::InvalidRegistry { .. })
            }),
            ("[zz]:5000/a".into(), |e| {
                matches!(e, ReferenceError::InvalidRegistry { .. })
            }),
            ("-h.io/a".into(), |e| {
                matches!(e, ReferenceError::InvalidRegistry { .. })
            }),
            (long, |e| matches!(e, ReferenceError::TooLong { .. })),
            ("a b".into(), |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
        ];
        for (input, check) in cases {
            match Reference::parse(&input) {
                Ok(r) => panic!("{input:?} parsed as {r:?}"),
                Err(e) => assert!(check(&e), "{input:?}: unexpected error {e:?}"),
            }
        }
    }

    #[test]
    fn display_round_trips() {
        for input in [
            "nginx",
            "127.0.0.1:5000/hello-tls:v1",
            &format!("h.io/a/b@{D}"),
            &format!("h.io/a:t@{D}"),
        ] {
            let r = Reference::parse(input).unwrap();
            assert_eq!(Reference::parse(&r.to_string()).unwrap(), r);
        }
        assert_eq!(
            Reference::parse("nginx").unwrap().to_string(),
            "registry-1.docker.io/library/nginx:latest"
        );
    }

    #[test]
    fn manifest_reference_prefers_digest() {
        let r = Reference::parse(&format!("h.io/a:t@{D}")).unwrap();
        assert_eq!(r.manifest_reference(), D);
        assert_eq!(
            Reference::parse("h.io/a:t").unwrap().manifest_reference(),
            "t"
        );
    }
}
