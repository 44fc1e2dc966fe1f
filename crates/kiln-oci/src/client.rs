//! The OCI distribution (registry) client: resolve a reference to a pinned manifest digest, and
//! pull a pinned image into a [`BlobStore`].
//!
//! Request protocol, per GET:
//! 1. Send the request with whatever authorization is cached for the registry and the
//!    repository's pull scope (nothing the first time: anonymous first).
//! 2. On `401`, read `WWW-Authenticate`:
//!    - `Bearer realm=..,service=..,scope=..`: fetch a token from the realm (with the configured
//!      basic credentials, if any), cache it per (registry, scope) until shortly before it
//!      expires, and retry once with it;
//!    - `Basic`: retry once with the configured credentials.
//! 3. A second `401` (or a `403`) is [`OciError::Unauthorized`]; `404` is a not-found error.
//!
//! Everything fetched is verified against its digest: a manifest fetched by digest must hash to
//! it, a manifest fetched by tag is identified by the hash of its bytes (never by the
//! `Docker-Content-Digest` header), and blobs are hashed while they stream to disk. Manifests,
//! configs and token responses are read into memory only up to a size cap; layers never are.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{StreamExt as _, TryStreamExt as _};
use kiln_types::ImageRef;
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};
use serde::Deserialize;

use crate::auth::{Challenge, Scheme};
use crate::config::{
    manifest_kind, media_types, parse_config, ImageIndex, ImageManifest, LayerRef, ManifestKind,
    ManifestProblem, PullStats, PulledImage,
};
use crate::digest::sha256_digest;
use crate::reference::{validate_image_ref, Reference};
use crate::{BlobStore, OciError};

/// The platform picked from an image index.
const PLATFORM_OS: &str = "linux";
const PLATFORM_ARCH: &str = "amd64";

/// Layers downloaded at once by one pull.
const PARALLEL_LAYER_FETCHES: usize = 3;

/// Cap on a token service response.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// Tokens are treated as expired this long before the token service says they are, so that a
/// token is not sent just as it runs out.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(10);

/// Token lifetime when the service does not say (the token spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// Timeout for requests whose body is small (manifests, tokens). Blob downloads have no overall
/// timeout, only the client's read timeout, because a large layer may legitimately take long.
const SMALL_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How the client reaches registries.
#[derive(Clone)]
pub struct ClientConfig {
    /// Registry hosts (`host` or `host:port`) reached over plain HTTP. Loopback hosts
    /// (127.0.0.0/8, `[::1]`, `localhost`) always are.
    pub plain_http: Vec<String>,
    /// `(registry, user, password)`: basic credentials, used for `Basic` challenges and to obtain
    /// bearer tokens.
    pub credentials: Vec<(String, String, String)>,
    /// Largest manifest (and image config) read into memory.
    pub max_manifest_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            plain_http: Vec::new(),
            credentials: Vec::new(),
            max_manifest_bytes: 4 * 1024 * 1024,
        }
    }
}

impl fmt::Debug for ClientConfig {
    /// Passwords are never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let credentials: Vec<(&str, &str, &str)> = self
            .credentials
            .iter()
            .map(|(registry, user, _)| (registry.as_str(), user.as_str(), "<redacted>"))
            .collect();
        f.debug_struct("ClientConfig")
            .field("plain_http", &self.plain_http)
            .field("credentials", &credentials)
            .field("max_manifest_bytes", &self.max_manifest_bytes)
            .finish()
    }
}

/// Counters over the life of a [`RegistryClient`] (shared by its clones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    pub manifests_fetched: u64,
    pub blobs_fetched: u64,
    pub blob_bytes_fetched: u64,
    pub tokens_fetched: u64,
}

/// A client for OCI distribution registries. Cheap to clone; clones share connections, the token
/// cache and the counters.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// Honours the usual proxy environment variables.
    http: reqwest::Client,
    /// For loopback hosts, which a proxy could not reach (or would reach the wrong one of).
    http_loopback: reqwest::Client,
    config: ClientConfig,
    /// Bearer tokens per (registry, scope).
    tokens: Mutex<HashMap<(String, String), CachedToken>>,
    /// Registries that answered with a `Basic` challenge: later requests send credentials
    /// without waiting to be asked.
    basic_registries: Mutex<HashSet<String>>,
    manifests_fetched: AtomicU64,
    blobs_fetched: AtomicU64,
    blob_bytes_fetched: AtomicU64,
    tokens_fetched: AtomicU64,
}

#[derive(Clone)]
struct CachedToken {
    token: String,
    expires: Instant,
}

/// Authorization to attach to a request.
#[derive(Clone, PartialEq, Eq)]
enum Auth {
    Anonymous,
    Bearer(String),
    Basic,
}

/// What a GET is for, to put context into errors.
enum Target<'a> {
    Manifest {
        reference: &'a str,
    },
    Blob {
        registry: &'a str,
        repository: &'a str,
        digest: &'a str,
    },
}

impl Target<'_> {
    fn transport(&self, source: reqwest::Error) -> OciError {
        match *self {
            Target::Manifest { reference } => OciError::ManifestFetch {
                reference: reference.to_owned(),
                source,
            },
            Target::Blob {
                registry,
                repository,
                digest,
            } => OciError::BlobFetch {
                registry: registry.to_owned(),
                repository: repository.to_owned(),
                digest: digest.to_owned(),
                source,
            },
        }
    }

    fn not_found(&self) -> OciError {
        match *self {
            Target::Manifest { reference } => OciError::ManifestNotFound {
                reference: reference.to_owned(),
            },
            Target::Blob {
                registry,
                repository,
                digest,
            } => OciError::BlobNotFound {
                registry: registry.to_owned(),
                repository: repository.to_owned(),
                digest: digest.to_owned(),
            },
        }
    }
}

/// A manifest as fetched: its bytes and the digest they hash to.
struct FetchedManifest {
    bytes: Vec<u8>,
    digest: String,
    content_type: Option<String>,
}

impl RegistryClient {
    pub fn new(config: ClientConfig) -> Result<Self, OciError> {
        let builder = || {
            reqwest::Client::builder()
                .user_agent(concat!("kiln-oci/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(60))
        };
        let http = builder()
            .build()
            .map_err(|source| OciError::ClientBuild { source })?;
        let http_loopback = builder()
            .no_proxy()
            .build()
            .map_err(|source| OciError::ClientBuild { source })?;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                http,
                http_loopback,
                config,
                tokens: Mutex::new(HashMap::new()),
                basic_registries: Mutex::new(HashSet::new()),
                manifests_fetched: AtomicU64::new(0),
                blobs_fetched: AtomicU64::new(0),
                blob_bytes_fetched: AtomicU64::new(0),
                tokens_fetched: AtomicU64::new(0),
            }),
        })
    }

    pub fn stats(&self) -> ClientStats {
        let i = &self.inner;
        ClientStats {
            manifests_fetched: i.manifests_fetched.load(Ordering::Relaxed),
            blobs_fetched: i.blobs_fetched.load(Ordering::Relaxed),
            blob_bytes_fetched: i.blob_bytes_fetched.load(Ordering::Relaxed),
            tokens_fetched: i.tokens_fetched.load(Ordering::Relaxed),
        }
    }

    /// Resolves a reference to the digest of a single-platform image manifest (for an index,
    /// picks linux/amd64) and verifies it: when the reference carries a digest the fetched bytes
    /// must hash to it.
    pub async fn resolve(&self, reference: &Reference) -> Result<ImageRef, OciError> {
        let shown = reference.to_string();
        let top = self
            .fetch_manifest(
                &reference.registry,
                &reference.repository,
                reference.manifest_reference(),
                &shown,
            )
            .await?;
        if let Some(expected) = &reference.digest {
            if &top.digest != expected {
                return Err(OciError::DigestMismatch {
                    what: format!("manifest {shown}"),
                    expected: expected.clone(),
                    actual: top.digest,
                });
            }
        }
        let kind = classify(&top, &shown)?;
        let digest = match kind {
            ManifestKind::Image => {
                parse_image_manifest(&top.bytes, &shown)?;
                top.digest
            }
            ManifestKind::Index => {
                let index: ImageIndex = serde_json::from_slice(&top.bytes).map_err(|source| {
                    OciError::ManifestParse {
                        reference: shown.clone(),
                        source,
                    }
                })?;
                let chosen = pick_platform(&index, &shown)?;
                let child_shown =
                    format!("{}/{}@{chosen}", reference.registry, reference.repository);
                let child = self
                    .fetch_manifest(
                        &reference.registry,
                        &reference.repository,
                        &chosen,
                        &child_shown,
                    )
                    .await?;
                verify_digest(&child, &chosen, &child_shown)?;
                match classify(&child, &child_shown)? {
                    ManifestKind::Image => parse_image_manifest(&child.bytes, &child_shown)?,
                    ManifestKind::Index => {
                        return Err(OciError::InvalidManifest {
                            reference: child_shown,
                            reason: "an image index entry for linux/amd64 is itself an index"
                                .to_owned(),
                        })
                    }
                };
                chosen
            }
        };
        tracing::debug!(reference = %shown, %digest, "resolved image");
        Ok(reference.pinned(&digest))
    }

    /// Fetches manifest + config + every layer blob of an image pinned by digest into `store`,
    /// verifying every digest (and size) while streaming; blobs already present are not
    /// downloaded again. Returns the parsed image.
    pub async fn pull(&self, image: &ImageRef, store: &BlobStore) -> Result<PulledImage, OciError> {
        validate_image_ref(image).map_err(|source| OciError::InvalidImage {
            image: image.to_string(),
            source,
        })?;
        let shown = image.to_string();
        let max = self.inner.config.max_manifest_bytes;
        let mut stats = PullStats::default();

        let manifest_bytes = if store.contains(&image.digest) {
            stats.blobs_cached += 1;
            store.read_verified(&image.digest, max).await?
        } else {
            let fetched = self
                .fetch_manifest(&image.registry, &image.repository, &image.digest, &shown)
                .await?;
            verify_digest(&fetched, &image.digest, &shown)?;
            if classify(&fetched, &shown)? == ManifestKind::Index {
                return Err(OciError::UnsupportedMediaType {
                    what: format!("manifest {shown} (pull needs a single-platform manifest)"),
                    media_type: media_types::OCI_INDEX.to_owned(),
                });
            }
            store.put_verified(&image.digest, &fetched.bytes).await?;
            stats.blobs_fetched += 1;
            stats.bytes_fetched += fetched.bytes.len() as u64;
            fetched.bytes
        };
        let manifest = parse_image_manifest(&manifest_bytes, &shown)?;

        let config_digest = manifest.config.digest.as_str();
        if manifest.config.size > max as u64 {
            return Err(OciError::ConfigTooLarge {
                digest: config_digest.to_owned(),
                size: manifest.config.size,
                limit: max,
            });
        }
        let config_bytes = if store.contains(config_digest) {
            stats.blobs_cached += 1;
            store.read_verified(config_digest, max).await?
        } else {
            let bytes = self
                .fetch_small_blob(image, config_digest, manifest.config.size)
                .await?;
            store.put_verified(config_digest, &bytes).await?;
            stats.blobs_fetched += 1;
            stats.bytes_fetched += bytes.len() as u64;
            bytes
        };
        let (config, diff_ids, rootfs_type) =
            parse_config(&config_bytes).map_err(|source| OciError::ConfigParse {
                digest: config_digest.to_owned(),
                source,
            })?;
        if rootfs_type != "layers" {
            return Err(OciError::InvalidManifest {
                reference: shown,
                reason: format!(
                    "image config has rootfs type {rootfs_type:?}, expected \"layers\""
                ),
            });
        }
        if diff_ids.len() != manifest.layers.len() {
            return Err(OciError::InvalidManifest {
                reference: shown,
                reason: format!(
                    "manifest has {} layers but the config lists {} diff_ids",
                    manifest.layers.len(),
                    diff_ids.len()
                ),
            });
        }
        if let Some(bad) = diff_ids.iter().find(|d| !crate::is_valid_digest(d)) {
            return Err(OciError::InvalidManifest {
                reference: shown,
                reason: format!("config diff_id {bad:?} is not a sha256 digest"),
            });
        }

        let layers: Vec<LayerRef> = manifest
            .layers
            .iter()
            .zip(&diff_ids)
            .map(|(descriptor, diff_id)| LayerRef {
                digest: descriptor.digest.clone(),
                diff_id: diff_id.clone(),
                media_type: descriptor.media_type.clone(),
                size: descriptor.size,
            })
            .collect();

        // A digest listed twice (e.g. two empty layers) is fetched once.
        let mut seen = HashSet::new();
        let mut missing = Vec::new();
        for layer in &layers {
            if !seen.insert(layer.digest.as_str()) {
                continue;
            }
            if store.contains(&layer.digest) {
                stats.blobs_cached += 1;
            } else {
                missing.push(layer);
            }
        }
        // The futures are built up front: a closure mapping a stream of borrowed layers would make
        // this future's Send-ness depend on a higher-ranked lifetime rustc cannot prove, and
        // callers run pulls inside spawned tasks.
        let fetches: Vec<_> = missing
            .into_iter()
            .map(|layer| self.fetch_blob_to_store(image, &layer.digest, layer.size, store))
            .collect();
        let fetched_sizes: Vec<u64> = futures_util::stream::iter(fetches)
            .buffer_unordered(PARALLEL_LAYER_FETCHES)
            .try_collect()
            .await?;
        stats.blobs_fetched += fetched_sizes.len() as u64;
        stats.bytes_fetched += fetched_sizes.iter().sum::<u64>();

        tracing::info!(
            image = %shown,
            layers = layers.len(),
            blobs_fetched = stats.blobs_fetched,
            blobs_cached = stats.blobs_cached,
            bytes_fetched = stats.bytes_fetched,
            "pulled image"
        );
        Ok(PulledImage {
            digest: image.digest.clone(),
            manifest,
            config,
            layers,
            stats,
        })
    }

    fn base_url(&self, registry: &str) -> String {
        let scheme = if self.is_plain_http(registry) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{registry}")
    }

    fn http_for(&self, host: &str) -> &reqwest::Client {
        if is_loopback_registry(host) {
            &self.inner.http_loopback
        } else {
            &self.inner.http
        }
    }

    fn is_plain_http(&self, registry: &str) -> bool {
        if is_loopback_registry(registry) {
            return true;
        }
        let host = host_of(registry);
        self.inner
            .config
            .plain_http
            .iter()
            .any(|entry| entry == registry || entry == host)
    }

    async fn fetch_manifest(
        &self,
        registry: &str,
        repository: &str,
        tag_or_digest: &str,
        shown: &str,
    ) -> Result<FetchedManifest, OciError> {
        let url = format!(
            "{}/v2/{repository}/manifests/{tag_or_digest}",
            self.base_url(registry)
        );
        let target = Target::Manifest { reference: shown };
        let response = self
            .get(
                registry,
                repository,
                &url,
                Some(media_types::MANIFEST_ACCEPT),
                true,
                &target,
            )
            .await?;
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let limit = self.inner.config.max_manifest_bytes;
        let bytes = read_capped(response, limit).await.map_err(|e| match e {
            CappedReadError::TooLarge => OciError::ManifestTooLarge {
                reference: shown.to_owned(),
                limit,
            },
            CappedReadError::Transport(source) => target.transport(source),
        })?;
        self.inner.manifests_fetched.fetch_add(1, Ordering::Relaxed);
        let digest = sha256_digest(&bytes);
        Ok(FetchedManifest {
            bytes,
            digest,
            content_type,
        })
    }

    /// Fetches a blob known to be small (the config) into memory and verifies it.
    async fn fetch_small_blob(
        &self,
        image: &ImageRef,
        digest: &str,
        size: u64,
    ) -> Result<Vec<u8>, OciError> {
        let target = Target::Blob {
            registry: &image.registry,
            repository: &image.repository,
            digest,
        };
        let url = format!(
            "{}/v2/{}/blobs/{digest}",
            self.base_url(&image.registry),
            image.repository
        );
        let response = self
            .get(
                &image.registry,
                &image.repository,
                &url,
                None,
                true,
                &target,
            )
            .await?;
        // `size` was checked against the cap; one byte more tells a too-long body apart.
        let limit = usize::try_from(size)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        let bytes = read_capped(response, limit).await.map_err(|e| match e {
            CappedReadError::TooLarge => OciError::SizeMismatch {
                what: format!("blob {digest}"),
                expected: size,
                actual: limit as u64,
            },
            CappedReadError::Transport(source) => target.transport(source),
        })?;
        if bytes.len() as u64 != size {
            return Err(OciError::SizeMismatch {
                what: format!("blob {digest}"),
                expected: size,
                actual: bytes.len() as u64,
            });
        }
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(OciError::DigestMismatch {
                what: format!("blob {digest} from {image}"),
                expected: digest.to_owned(),
                actual,
            });
        }
        self.inner.blobs_fetched.fetch_add(1, Ordering::Relaxed);
        self.inner
            .blob_bytes_fetched
            .fetch_add(size, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Streams a blob into the store, hashing as it goes. Returns its size.
    async fn fetch_blob_to_store(
        &self,
        image: &ImageRef,
        digest: &str,
        size: u64,
        store: &BlobStore,
    ) -> Result<u64, OciError> {
        let target = Target::Blob {
            registry: &image.registry,
            repository: &image.repository,
            digest,
        };
        let url = format!(
            "{}/v2/{}/blobs/{digest}",
            self.base_url(&image.registry),
            image.repository
        );
        let mut response = self
            .get(
                &image.registry,
                &image.repository,
                &url,
                None,
                false,
                &target,
            )
            .await?;
        if let Some(length) = content_length(response.headers()) {
            if length != size {
                return Err(OciError::SizeMismatch {
                    what: format!("blob {digest} from {image}"),
                    expected: size,
                    actual: length,
                });
            }
        }
        let mut writer = store.writer(digest, Some(size)).await?;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|source| target.transport(source))?
        {
            writer.write(&chunk).await?;
            self.inner
                .blob_bytes_fetched
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        writer.commit().await?;
        self.inner.blobs_fetched.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(image = %image, %digest, size, "fetched blob");
        Ok(size)
    }

    /// One authenticated GET (see the module documentation). Returns a response with a success
    /// status.
    async fn get(
        &self,
        registry: &str,
        repository: &str,
        url: &str,
        accept: Option<&str>,
        small: bool,
        target: &Target<'_>,
    ) -> Result<Response, OciError> {
        let default_scope = format!("repository:{repository}:pull");
        let mut auth = self.cached_auth(registry, &default_scope);
        let mut retried = false;
        loop {
            let mut request = self.http_for(registry).get(url);
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            if small {
                request = request.timeout(SMALL_REQUEST_TIMEOUT);
            }
            request = self.authorize(request, registry, &auth);
            let response = request.send().await.map_err(|e| target.transport(e))?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            match status {
                StatusCode::UNAUTHORIZED if !retried => {
                    retried = true;
                    let next = self
                        .answer_challenge(registry, &default_scope, response.headers(), &auth)
                        .await?;
                    match next {
                        Some(next) if next != auth => auth = next,
                        _ => {
                            return Err(OciError::Unauthorized {
                                registry: registry.to_owned(),
                                repository: repository.to_owned(),
                            })
                        }
                    }
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(OciError::Unauthorized {
                        registry: registry.to_owned(),
                        repository: repository.to_owned(),
                    })
                }
                StatusCode::NOT_FOUND => return Err(target.not_found()),
                _ => {
                    return Err(OciError::RegistryStatus {
                        registry: registry.to_owned(),
                        url: url.to_owned(),
                        status: status.as_u16(),
                    })
                }
            }
        }
    }

    fn credentials(&self, registry: &str) -> Option<(&str, &str)> {
        self.inner
            .config
            .credentials
            .iter()
            .find(|(r, _, _)| r == registry)
            .map(|(_, user, password)| (user.as_str(), password.as_str()))
    }

    fn authorize(
        &self,
        request: reqwest::RequestBuilder,
        registry: &str,
        auth: &Auth,
    ) -> reqwest::RequestBuilder {
        match auth {
            Auth::Anonymous => request,
            Auth::Bearer(token) => request.bearer_auth(token),
            Auth::Basic => match self.credentials(registry) {
                Some((user, password)) => request.basic_auth(user, Some(password)),
                None => request,
            },
        }
    }

    /// Authorization known to work for this registry and scope, without asking it.
    fn cached_auth(&self, registry: &str, scope: &str) -> Auth {
        if let Some(token) = self.cached_token(registry, scope) {
            return Auth::Bearer(token);
        }
        let basic = self
            .inner
            .basic_registries
            .lock()
            .expect("basic registry set poisoned")
            .contains(registry);
        if basic && self.credentials(registry).is_some() {
            return Auth::Basic;
        }
        Auth::Anonymous
    }

    fn cached_token(&self, registry: &str, scope: &str) -> Option<String> {
        let mut tokens = self.inner.tokens.lock().expect("token cache poisoned");
        let key = (registry.to_owned(), scope.to_owned());
        match tokens.get(&key) {
            Some(t) if t.expires > Instant::now() => Some(t.token.clone()),
            Some(_) => {
                tokens.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Works out how to answer a `401` to a request sent with `sent`. `None` means there is
    /// nothing more to try.
    async fn answer_challenge(
        &self,
        registry: &str,
        default_scope: &str,
        headers: &HeaderMap,
        sent: &Auth,
    ) -> Result<Option<Auth>, OciError> {
        let challenges: Vec<Challenge> = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(Challenge::parse)
            .collect();
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == Scheme::Bearer) {
            let realm = bearer
                .param("realm")
                .ok_or_else(|| OciError::AuthChallenge {
                    registry: registry.to_owned(),
                    challenge: bearer.raw.clone(),
                })?;
            let scope = bearer.param("scope").unwrap_or(default_scope);
            if let Some(token) = self.cached_token(registry, scope) {
                if *sent != Auth::Bearer(token.clone()) {
                    return Ok(Some(Auth::Bearer(token)));
                }
            }
            // Either nothing is cached or the cached token was just refused (revoked, or the
            // registry restarted with a new key): forget it and ask for a new one.
            if let Auth::Bearer(refused) = sent {
                let mut tokens = self.inner.tokens.lock().expect("token cache poisoned");
                tokens.retain(|(r, _), cached| r != registry || cached.token != *refused);
            }
            let token = self
                .fetch_token(registry, realm, bearer.param("service"), scope)
                .await?;
            let mut tokens = self.inner.tokens.lock().expect("token cache poisoned");
            for key_scope in [scope, default_scope] {
                tokens.insert((registry.to_owned(), key_scope.to_owned()), token.clone());
            }
            return Ok(Some(Auth::Bearer(token.token)));
        }
        if challenges.iter().any(|c| c.scheme == Scheme::Basic) {
            if self.credentials(registry).is_none() {
                return Ok(None);
            }
            self.inner
                .basic_registries
                .lock()
                .expect("basic registry set poisoned")
                .insert(registry.to_owned());
            return Ok(Some(Auth::Basic));
        }
        match headers.get(WWW_AUTHENTICATE) {
            Some(raw) => Err(OciError::AuthChallenge {
                registry: registry.to_owned(),
                challenge: String::from_utf8_lossy(raw.as_bytes()).into_owned(),
            }),
            None => Ok(None),
        }
    }

    async fn fetch_token(
        &self,
        registry: &str,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<CachedToken, OciError> {
        let mut query: Vec<(&str, &str)> = vec![("scope", scope)];
        if let Some(service) = service {
            query.push(("service", service));
        }
        let realm_host = reqwest::Url::parse(realm)
            .ok()
            .and_then(|url| url.host_str().map(str::to_owned))
            .unwrap_or_default();
        let mut request = self
            .http_for(&realm_host)
            .get(realm)
            .query(&query)
            .timeout(SMALL_REQUEST_TIMEOUT);
        if let Some((user, password)) = self.credentials(registry) {
            request = request.basic_auth(user, Some(password));
        }
        let transport = |source| OciError::TokenFetch {
            realm: realm.to_owned(),
            source,
        };
        let response = request.send().await.map_err(transport)?;
        if !response.status().is_success() {
            return Err(OciError::TokenRejected {
                realm: realm.to_owned(),
                status: response.status().as_u16(),
            });
        }
        let body = read_capped(response, MAX_TOKEN_RESPONSE_BYTES)
            .await
            .map_err(|e| match e {
                CappedReadError::TooLarge => OciError::TokenTooLarge {
                    realm: realm.to_owned(),
                    limit: MAX_TOKEN_RESPONSE_BYTES,
                },
                CappedReadError::Transport(source) => transport(source),
            })?;

        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|source| OciError::TokenResponse {
                realm: realm.to_owned(),
                source,
            })?;
        let Some(token) = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
        else {
            return Err(OciError::TokenResponse {
                realm: realm.to_owned(),
                source: <serde_json::Error as serde::de::Error>::missing_field("token"),
            });
        };
        // The token spec says a lifetime under 60 s means 60 s.
        let lifetime = parsed
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME)
            .max(DEFAULT_TOKEN_LIFETIME);
        self.inner.tokens_fetched.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(registry, scope, "fetched registry token");
        Ok(CachedToken {
            token,
            expires: Instant::now() + lifetime.saturating_sub(TOKEN_EXPIRY_MARGIN),
        })
    }
}

fn classify(fetched: &FetchedManifest, shown: &str) -> Result<ManifestKind, OciError> {
    manifest_kind(&fetched.bytes, fetched.content_type.as_deref()).map_err(|media_type| {
        OciError::UnsupportedMediaType {
            what: format!("manifest {shown}"),
            media_type,
        }
    })
}

fn verify_digest(fetched: &FetchedManifest, expected: &str, shown: &str) -> Result<(), OciError> {
    if fetched.digest != expected {
        return Err(OciError::DigestMismatch {
            what: format!("manifest {shown}"),
            expected: expected.to_owned(),
            actual: fetched.digest.clone(),
        });
    }
    Ok(())
}

fn parse_image_manifest(bytes: &[u8], shown: &str) -> Result<ImageManifest, OciError> {
    let manifest: ImageManifest =
        serde_json::from_slice(bytes).map_err(|source| OciError::ManifestParse {
            reference: shown.to_owned(),
            source,
        })?;
    manifest.check().map_err(|problem| match problem {
        ManifestProblem::Invalid(reason) => OciError::InvalidManifest {
            reference: shown.to_owned(),
            reason,
        },
        ManifestProblem::MediaType { what, media_type } => OciError::UnsupportedMediaType {
            what: format!("{what} in manifest {shown}"),
            media_type,
        },
    })?;
    Ok(manifest)
}

/// The digest of the linux/amd64 image manifest in an index.
fn pick_platform(index: &ImageIndex, shown: &str) -> Result<String, OciError> {
    let chosen = index.manifests.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == PLATFORM_OS && p.architecture == PLATFORM_ARCH)
    });
    match chosen {
        Some(descriptor) if crate::is_valid_digest(&descriptor.digest) => {
            Ok(descriptor.digest.clone())
        }
        Some(descriptor) => Err(OciError::InvalidManifest {
            reference: shown.to_owned(),
            reason: format!(
                "linux/amd64 entry has digest {:?}, not a sha256 digest",
                descriptor.digest
            ),
        }),
        None => Err(OciError::NoPlatform {
            reference: shown.to_owned(),
            platforms: index
                .manifests
                .iter()
                .map(|d| match &d.platform {
                    Some(p) => p.to_string(),
                    None => "unspecified".to_owned(),
                })
                .collect(),
        }),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

enum CappedReadError {
    TooLarge,
    Transport(reqwest::Error),
}

/// Reads a body into memory, refusing (before or while reading) more than `limit` bytes.
async fn read_capped(mut response: Response, limit: usize) -> Result<Vec<u8>, CappedReadError> {
    if content_length(response.headers()).is_some_and(|len| len > limit as u64) {
        return Err(CappedReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(CappedReadError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(CappedReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The host part of `host[:port]` (brackets kept for IPv6).
fn host_of(registry: &str) -> &str {
    if registry.starts_with('[') {
        return match registry.find(']') {
            Some(end) => &registry[..=end],
            None => registry,
        };
    }
    registry.split(':').next().unwrap_or(registry)
}

/// 127.0.0.0/8, `[::1]` and `localhost` (with any port).
fn is_loopback_registry(registry: &str) -> bool {
    let host = host_of(registry);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_use_plain_http() {
        for r in [
            "127.0.0.1:5000",
            "127.1.2.3",
            "localhost:5000",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(is_loopback_registry(r), "{r}");
        }
        for r in [
            "10.0.0.1:5000",
            "registry-1.docker.io",
            "ghcr.io",
            "[fd00::1]:5000",
        ] {
            assert!(!is_loopback_registry(r), "{r}");
        }
        let client = RegistryClient::new(ClientConfig {
            plain_http: vec!["registry.internal".to_owned(), "10.0.0.1:5000".to_owned()],
            ..ClientConfig::default()
        })
        .unwrap();
        assert!(client.is_plain_http("registry.internal:5000"));
        assert!(client.is_plain_http("10.0.0.1:5000"));
        assert!(!client.is_plain_http("10.0.0.1:6000"));
        assert!(!client.is_plain_http("ghcr.io"));
    }

    #[test]
    fn config_debug_redacts_passwords() {
        let config = ClientConfig {
            credentials: vec![("r".into(), "u".into(), "hunter2".into())],
            ..ClientConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn index_platform_selection() {
        let d = |os: &str, arch: &str, digest: &str| crate::config::Descriptor {
            media_type: media_types::OCI_MANIFEST.to_owned(),
            digest: digest.to_owned(),
            size: 1,
            platform: Some(crate::config::Platform {
                architecture: arch.to_owned(),
                os: os.to_owned(),
                variant: None,
            }),
            annotations: Default::default(),
        };
        let amd = sha256_digest(b"amd64");
        let index = ImageIndex {
            schema_version: 2,
            media_type: None,
            manifests: vec![
                d("linux", "arm64", &sha256_digest(b"arm64")),
                d("linux", "amd64", &amd),
            ],
        };
        assert_eq!(pick_platform(&index, "x").unwrap(), amd);
        let arm_only = ImageIndex {
            manifests: vec![d("linux", "arm64", &amd), d("unknown", "unknown", &amd)],
            ..index
        };
        match pick_platform(&arm_only, "x") {
            Err(OciError::NoPlatform { platforms, .. }) => {
                assert_eq!(platforms, vec!["linux/arm64", "unknown/unknown"])
            }
            other => panic!("{other:?}"),
        }
    }
}
