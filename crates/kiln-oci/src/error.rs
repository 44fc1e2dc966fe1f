//! The crate's error type: one variant per operation that can fail, carrying which registry,
//! repository, digest or path it was about. Source errors are chained, never repeated in the
//! message.

use std::io;
use std::path::PathBuf;

use crate::reference::ReferenceError;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    // --- client setup and inputs ---
    #[error("failed to build the registry HTTP client")]
    ClientBuild { source: reqwest::Error },
    #[error("image {image} is not a valid pinned image reference")]
    InvalidImage {
        image: String,
        source: ReferenceError,
    },

    // --- talking to a registry ---
    #[error("failed to fetch manifest {reference}")]
    ManifestFetch {
        reference: String,
        source: reqwest::Error,
    },
    #[error("manifest {reference} does not exist")]
    ManifestNotFound { reference: String },
    #[error("manifest {reference} is larger than the {limit}-byte limit")]
    ManifestTooLarge { reference: String, limit: usize },
    #[error("manifest {reference} is not valid JSON for its media type")]
    ManifestParse {
        reference: String,
        source: serde_json::Error,
    },
    #[error("manifest {reference} is invalid: {reason}")]
    InvalidManifest { reference: String, reason: String },
    #[error("{what} has unsupported media type {media_type:?}")]
    UnsupportedMediaType { what: String, media_type: String },
    #[error("image index {reference} has no linux/amd64 manifest (it has: {platforms:?})")]
    NoPlatform {
        reference: String,
        platforms: Vec<String>,
    },
    #[error("failed to fetch blob {digest} from {registry}/{repository}")]
    BlobFetch {
        registry: String,
        repository: String,
        digest: String,
        source: reqwest::Error,
    },
    #[error("blob {digest} does not exist in {registry}/{repository}")]
    BlobNotFound {
        registry: String,
        repository: String,
        digest: String,
    },
    #[error("image config {digest} is {size} bytes, more than the {limit}-byte limit")]
    ConfigTooLarge {
        digest: String,
        size: u64,
        limit: usize,
    },
    #[error("image config {digest} is not a valid OCI image config")]
    ConfigParse {
        digest: String,
        source: serde_json::Error,
    },
    #[error("{what} has digest {actual}, expected {expected}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what} is {actual} bytes, expected {expected}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "registry {registry} refused access to {repository} \
         (missing or wrong credentials, or the repository does not exist)"
    )]
    Unauthorized {
        registry: String,
        repository: String,
    },
    #[error("registry {registry} answered HTTP {status} to GET {url}")]
    RegistryStatus {
        registry: String,
        url: String,
        status: u16,
    },
    #[error(
        "registry {registry} sent an authentication challenge Kiln cannot answer: {challenge:?}"
    )]
    AuthChallenge { registry: String, challenge: String },
    #[error("failed to fetch a registry token from {realm}")]
    TokenFetch {
        realm: String,
        source: reqwest::Error,
    },
    #[error("token service {realm} answered HTTP {status}")]
    TokenRejected { realm: String, status: u16 },
    #[error("token service {realm} sent an invalid token response")]
    TokenResponse {
        realm: String,
        source: serde_json::Error,
    },
    #[error("token service {realm} sent a response larger than {limit} bytes")]
    TokenTooLarge { realm: String, limit: usize },

    // --- the blob store ---
    #[error("{digest:?} is not a sha256 digest")]
    InvalidDigest { digest: String },
    #[error("failed to open the blob store at {}", path.display())]
    BlobStoreOpen { path: PathBuf, source: io::Error },
    #[error("failed to write blob {}", path.display())]
    BlobWrite { path: PathBuf, source: io::Error },
    #[error("failed to read blob {}", path.display())]
    BlobRead { path: PathBuf, source: io::Error },
    #[error("stored blob {digest} is larger than the {limit}-byte limit for reading it whole")]
    BlobTooLarge { digest: String, limit: usize },

    // --- unpacking layers ---
    #[error("unpack destination {} is not a directory", path.display())]
    DestNotDirectory { path: PathBuf },
    #[error("failed to inspect unpack destination {}", path.display())]
    DestInspect { path: PathBuf, source: io::Error },
    #[error("failed to open layer {}", path.display())]
    LayerOpen { path: PathBuf, source: io::Error },
    #[error("failed to read layer {} as a tar stream", path.display())]
    LayerRead { path: PathBuf, source: io::Error },
    #[error("layer {} exceeds the unpack limit {limit} = {value}", layer.display())]
    UnpackLimit {
        layer: PathBuf,
        limit: &'static str,
        value: u64,
    },
    #[error(
        "layer {} entry {} is {size} bytes, more than the {limit}-byte limit",
        layer.display(),
        path.display()
    )]
    EntryTooLarge {
        layer: PathBuf,
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("layer entry {} rejected: {reason}", path.display())]
    LayerEntry { path: PathBuf, reason: String },
    #[error("failed to {op} {} while unpacking a layer", path.display())]
    EntryIo {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl OciError {
    /// Whether trying the same operation again later can succeed: network failures and the
    /// registry's own overload or server errors. Everything else (missing content, bad content,
    /// refused credentials, local I/O) needs something to change first.
    pub fn is_transient(&self) -> bool {
        match self {
            OciError::ManifestFetch { .. }
            | OciError::BlobFetch { .. }
            | OciError::TokenFetch { .. } => true,
            OciError::RegistryStatus { status, .. } | OciError::TokenRejected { status, .. } => {
                *status == 408 || *status == 429 || *status >= 500
            }
            _ => false,
        }
    }

    /// Whether the registry said the manifest or blob does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            OciError::ManifestNotFound { .. } | OciError::BlobNotFound { .. }
        )
    }
}
