//! `WWW-Authenticate` challenges (RFC 7235) as registries send them: `Bearer realm=..,service=..,
//! scope=..` for a token service, `Basic realm=..` for direct credentials.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Bearer,
    Basic,
}

/// One `WWW-Authenticate` challenge: `Scheme key="value", key=token, ...`.
#[derive(Debug)]
pub(crate) struct Challenge {
    pub(crate) scheme: Scheme,
    params: Vec<(String, String)>,
    pub(crate) raw: String,
}

impl Challenge {
    pub(crate) fn parse(raw: &str) -> Option<Challenge> {
        let raw_trimmed = raw.trim();
        let (scheme, rest) = match raw_trimmed.split_once(char::is_whitespace) {
            Some((scheme, rest)) => (scheme, rest),
            None => (raw_trimmed, ""),
        };
        let scheme = if scheme.eq_ignore_ascii_case("bearer") {
            Scheme::Bearer
        } else if scheme.eq_ignore_ascii_case("basic") {
            Scheme::Basic
        } else {
            return None;
        };
        let mut params = Vec::new();
        let mut chars = rest.chars().peekable();
        loop {
            while chars.next_if(|c| c.is_whitespace() || *c == ',').is_some() {}
            let mut key = String::new();
            while let Some(c) = chars.next_if(|c| *c != '=' && *c != ',' && !c.is_whitespace()) {
                key.push(c);
            }
            if key.is_empty() {
                break;
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            if chars.next_if_eq(&'=').is_none() {
                // A bare token (e.g. token68); not used by registries.
                continue;
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            let mut value = String::new();
            if chars.next_if_eq(&'"').is_some() {
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(escaped) = chars.next() {
                                value.push(escaped);
                            }
                        }
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(c) = chars.next_if(|c| *c != ',' && !c.is_whitespace()) {
                    value.push(c);
                }
            }
            params.push((key.to_ascii_lowercase(), value));
        }
        Some(Challenge {
            scheme,
            params,
            raw: raw.to_owned(),
        })
    }

    pub(crate) fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, Scheme::Bearer);
        assert_eq!(c.param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c.param("service"), Some("registry.docker.io"));
        assert_eq!(c.param("scope"), Some("repository:library/nginx:pull,push"));
    }

    #[test]
    fn parses_basic_and_odd_spacing() {
        let c = Challenge::parse(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, Scheme::Basic);
        assert_eq!(c.param("realm"), Some("Registry Realm"));
        let c = Challenge::parse(r#"bearer  Realm = "a\"b" , service=svc"#).unwrap();
        assert_eq!(c.param("realm"), Some("a\"b"));
        assert_eq!(c.param("service"), Some("svc"));
        assert!(Challenge::parse("Negotiate abc").is_none());
        assert!(Challenge::parse("Basic").is_some());
    }
}
