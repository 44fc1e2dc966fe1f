//! Registry authentication against a scripted registry: the testkit's real registry runs without
//! auth, so a tiny HTTP/1.1 server here plays a registry with a bearer token service and one with
//! basic auth.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use kiln_oci::{media_types, sha256_digest, ClientConfig, OciError, Reference, RegistryClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// base64("user:pass")
const GOOD_BASIC: &str = "Basic dXNlcjpwYXNz";

#[derive(Default)]
struct Log {
    /// Query strings of token requests, in order.
    token_queries: Vec<String>,
    /// The `rotating` repository only accepts `rot-<rotation>`; bumping it revokes the token.
    rotation: u32,
}

struct FakeRegistry {
    host: String,
    log: Arc<Mutex<Log>>,
}

fn manifest() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_types::OCI_MANIFEST,
        "config": {
            "mediaType": media_types::OCI_CONFIG,
            "digest": sha256_digest(b"config"),
            "size": 6,
        },
        "layers": [{
            "mediaType": media_types::OCI_LAYER_GZIP,
            "digest": sha256_digest(b"layer"),
            "size": 5,
        }],
    }))
    .unwrap()
}

impl FakeRegistry {
    async fn start() -> Result<FakeRegistry> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let host = listener.local_addr()?.to_string();
        let log = Arc::new(Mutex::new(Log::default()));
        let (h, l) = (host.clone(), log.clone());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(handle(conn, h.clone(), l.clone()));
            }
        });
        Ok(FakeRegistry { host, log })
    }

    fn reference(&self, repo: &str) -> Reference {
        Reference::parse(&format!("{}/{repo}:v1", self.host)).unwrap()
    }

    fn client(&self, with_credentials: bool) -> RegistryClient {
        let credentials = if with_credentials {
            vec![(self.host.clone(), "user".to_owned(), "pass".to_owned())]
        } else {
            Vec::new()
        };
        RegistryClient::new(ClientConfig {
            credentials,
            ..ClientConfig::default()
        })
        .unwrap()
    }

    fn token_queries(&self) -> Vec<String> {
        self.log.lock().unwrap().token_queries.clone()
    }
}

/// Serves one request and closes the connection.
async fn handle(mut conn: TcpStream, host: String, log: Arc<Mutex<Log>>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 64 * 1024 {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request);
    let mut lines = text.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_owned();
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));

    let bearer_challenge = |repo: &str, realm: &str| {
        format!(
            "WWW-Authenticate: Bearer realm=\"http://{host}/{realm}\",\
             service=\"fake-registry\",scope=\"repository:{repo}:pull\"\r\n"
        )
    };
    let manifest_ok = || {
        (
            "200 OK",
            format!("Content-Type: {}\r\n", media_types::OCI_MANIFEST),
            manifest(),
        )
    };
    let unauthorized = |challenge: String| ("401 Unauthorized", challenge, b"{}".to_vec());
    let token = |tok: &str| {
        (
            "200 OK",
            "Content-Type: application/json\r\n".to_owned(),
            format!(r#"{{"token":"{tok}","expires_in":300}}"#).into_bytes(),
        )
    };

    let (status, headers, body) = match path {
        // Public repository behind a token service that hands out anonymous tokens.
        "/token" => {
            log.lock().unwrap().token_queries.push(query.to_owned());
            token("anon-token")
        }
        "/v2/public/app/manifests/v1" if authorization == "Bearer anon-token" => manifest_ok(),
        "/v2/public/app/manifests/v1" => unauthorized(bearer_challenge("public/app", "token")),

        // Private repository: the token service wants basic credentials.
        "/private-token" if authorization == GOOD_BASIC => {
            log.lock().unwrap().token_queries.push(query.to_owned());
            token("private-token")
        }
        "/private-token" => unauthorized(String::new()),
        "/v2/private/app/manifests/v1" if authorization == "Bearer private-token" => manifest_ok(),
        "/v2/private/app/manifests/v1" => {
            unauthorized(bearer_challenge("private/app", "private-token"))
        }

        // Tokens that get revoked.
        "/rotating-token" => {
            let mut log = log.lock().unwrap();
            log.token_queries.push(query.to_owned());
            token(&format!("rot-{}", log.rotation))
        }
        "/v2/rotating/app/manifests/v1"
            if authorization == format!("Bearer rot-{}", log.lock().unwrap().rotation) =>
        {
            manifest_ok()
        }
        "/v2/rotating/app/manifests/v1" => {
            unauthorized(bearer_challenge("rotating/app", "rotating-token"))
        }

        // Basic auth directly on the registry.
        "/v2/basic/app/manifests/v1" if authorization == GOOD_BASIC => manifest_ok(),
        "/v2/basic/app/manifests/v1" => {
            unauthorized("WWW-Authenticate: Basic realm=\"fake-registry\"\r\n".to_owned())
        }

        _ => ("404 Not Found", String::new(), b"{}".to_vec()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(&body).await;
    let _ = conn.shutdown().await;
}

#[tokio::test]
async fn bearer_token_is_fetched_once_and_reused() -> Result<()> {
    let registry = FakeRegistry::start().await?;
    let client = registry.client(false);
    let expected = sha256_digest(&manifest());
    for _ in 0..3 {
        let image = client.resolve(&registry.reference("public/app")).await?;
        assert_eq!(image.digest, expected);
    }
    let queries = registry.token_queries();
    assert_eq!(queries.len(), 1, "{queries:?}");
    assert!(
        queries[0].contains("scope=repository%3Apublic%2Fapp%3Apull"),
        "{}",
        queries[0]
    );
    assert!(
        queries[0].contains("service=fake-registry"),
        "{}",
        queries[0]
    );
    assert_eq!(client.stats().tokens_fetched, 1);
    Ok(())
}

#[tokio::test]
async fn token_service_gets_the_configured_credentials() -> Result<()> {
    let registry = FakeRegistry::start().await?;
    let image = registry
        .client(true)
        .resolve(&registry.reference("private/app"))
        .await?;
    assert_eq!(image.digest, sha256_digest(&manifest()));

    match registry
        .client(false)
        .resolve(&registry.reference("private/app"))
        .await
    {
        Err(OciError::TokenRejected { status: 401, .. }) => {}
        other => panic!("expected the token service to refuse, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn basic_challenge_is_answered_with_credentials() -> Result<()> {
    let registry = FakeRegistry::start().await?;
    let client = registry.client(true);
    for _ in 0..2 {
        let image = client.resolve(&registry.reference("basic/app")).await?;
        assert_eq!(image.digest, sha256_digest(&manifest()));
    }

    match registry
        .client(false)
        .resolve(&registry.reference("basic/app"))
        .await
    {
        Err(OciError::Unauthorized {
            registry: r,
            repository,
        }) => {
            assert_eq!(r, registry.host);
            assert_eq!(repository, "basic/app");
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_refused_cached_token_is_replaced() -> Result<()> {
    let registry = FakeRegistry::start().await?;
    let client = registry.client(false);
    client.resolve(&registry.reference("rotating/app")).await?;
    client.resolve(&registry.reference("rotating/app")).await?;
    assert_eq!(registry.token_queries().len(), 1, "the token is reused");

    registry.log.lock().unwrap().rotation += 1;
    client.resolve(&registry.reference("rotating/app")).await?;
    assert_eq!(
        registry.token_queries().len(),
        2,
        "a fresh token replaced the revoked one"
    );
    Ok(())
}
