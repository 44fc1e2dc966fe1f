//! The OCI (and Docker v2) JSON documents Kiln reads: image manifests, image indexes / manifest
//! lists and image configs, plus the summary of a pulled image handed to the agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::is_valid_digest;

/// Media types Kiln recognises.
pub mod media_types {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";

    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const OCI_NONDISTRIBUTABLE_TAR: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar";
    pub const OCI_NONDISTRIBUTABLE_GZIP: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const DOCKER_FOREIGN_LAYER_GZIP: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

    /// The `Accept` header sent for manifests: every manifest kind Kiln can use.
    pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
        application/vnd.oci.image.index.v1+json, \
        application/vnd.docker.distribution.manifest.v2+json, \
        application/vnd.docker.distribution.manifest.list.v2+json";
}

/// How a layer's tar stream is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

/// The compression of a layer media type, or `None` when Kiln cannot unpack it (zstd, or not a
/// layer at all).
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    use media_types::*;
    match media_type {
        OCI_LAYER_TAR | OCI_NONDISTRIBUTABLE_TAR => Some(Compression::None),
        OCI_LAYER_GZIP
        | OCI_NONDISTRIBUTABLE_GZIP
        | DOCKER_LAYER_GZIP
        | DOCKER_FOREIGN_LAYER_GZIP => Some(Compression::Gzip),
        _ => None,
    }
}

/// A pointer to content: what it is, its digest and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// A single-platform image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageManifest {
    /// Checks what Kiln relies on: schema 2, a container image config, unpackable layers and
    /// canonical digests everywhere. Returns the reason it is unusable.
    pub(crate) fn check(&self) -> Result<(), ManifestProblem> {
        if self.schema_version != 2 {
            return Err(ManifestProblem::Invalid(format!(
                "schemaVersion is {}, expected 2",
                self.schema_version
            )));
        }
        let config_type = self.config.media_type.as_str();
        if config_type != media_types::OCI_CONFIG && config_type != media_types::DOCKER_CONFIG {
            return Err(ManifestProblem::MediaType {
                what: "image config",
                media_type: config_type.to_owned(),
            });
        }
        if !is_valid_digest(&self.config.digest) {
            return Err(ManifestProblem::Invalid(format!(
                "config digest {:?} is not a sha256 digest",
                self.config.digest
            )));
        }
        for layer in &self.layers {
            if layer_compression(&layer.media_type).is_none() {
                return Err(ManifestProblem::MediaType {
                    what: "layer",
                    media_type: layer.media_type.clone(),
                });
            }
            if !is_valid_digest(&layer.digest) {
                return Err(ManifestProblem::Invalid(format!(
                    "layer digest {:?} is not a sha256 digest",
                    layer.digest
                )));
            }
        }
        Ok(())
    }
}

pub(crate) enum ManifestProblem {
    Invalid(String),
    MediaType {
        what: &'static str,
        media_type: String,
    },
}

/// A multi-platform image index (OCI) or manifest list (Docker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// What a manifest document turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ManifestKind {
    Image,
    Index,
}

/// Classifies a manifest by the `mediaType` inside it (which is covered by the digest), falling
/// back to its shape, and only then to the unauthenticated `Content-Type` header.
pub(crate) fn manifest_kind(
    bytes: &[u8],
    content_type: Option<&str>,
) -> Result<ManifestKind, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        manifests: Option<serde::de::IgnoredAny>,
        config: Option<serde::de::IgnoredAny>,
    }
    let by_type = |media_type: &str| match media_type {
        media_types::OCI_MANIFEST | media_types::DOCKER_MANIFEST => Ok(ManifestKind::Image),
        media_types::OCI_INDEX | media_types::DOCKER_MANIFEST_LIST => Ok(ManifestKind::Index),
        other => Err(other.to_owned()),
    };
    // An unparseable body is reported by the typed parse that follows.
    let probe: Option<Probe> = serde_json::from_slice(bytes).ok();
    if let Some(probe) = probe {
        if let Some(media_type) = &probe.media_type {
            return by_type(media_type);
        }
        match (probe.manifests.is_some(), probe.config.is_some()) {
            (true, false) => return Ok(ManifestKind::Index),
            (false, true) => return Ok(ManifestKind::Image),
            _ => {}
        }
    }
    let header = content_type
        .map(|ct| ct.split(';').next().unwrap_or("").trim())
        .unwrap_or("");
    by_type(header)
}

/// The parts of an image's config the runtime uses, from the config's `config` object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// `KEY=value` strings, in image order.
    pub env: Vec<String>,
    /// `None` when unset or empty.
    pub working_dir: Option<String>,
    /// `None` when unset or empty; otherwise `user`, `uid`, `user:group` or `uid:gid`.
    pub user: Option<String>,
    /// Signal that asks the process to stop, e.g. `SIGTERM`; `None` when unset or empty.
    pub stop_signal: Option<String>,
}

/// The image config document, reduced to what Kiln reads.
#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RuntimeConfig>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RuntimeConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    stop_signal: Option<String>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

/// Parses an image config into the runtime settings and the layers' diff IDs.
pub(crate) fn parse_config(
    bytes: &[u8],
) -> Result<(ImageConfig, Vec<String>, String), serde_json::Error> {
    let file: ConfigFile = serde_json::from_slice(bytes)?;
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let config = match file.config {
        Some(c) => ImageConfig {
            entrypoint: c.entrypoint,
            cmd: c.cmd,
            env: c.env.unwrap_or_default(),
            working_dir: non_empty(c.working_dir),
            user: non_empty(c.user),
            stop_signal: non_empty(c.stop_signal),
        },
        None => ImageConfig::default(),
    };
    Ok((config, file.rootfs.diff_ids, file.rootfs.kind))
}

/// One layer of a pulled image, in application order (base first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    /// Digest of the blob as stored (compressed).
    pub digest: String,
    /// Digest of the uncompressed tar stream, from the image config.
    pub diff_id: String,
    pub media_type: String,
    /// Size of the blob as stored.
    pub size: u64,
}

/// Transfer counts of one [`crate::RegistryClient::pull`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullStats {
    /// Blobs (manifest, config, layers) downloaded from the registry.
    pub blobs_fetched: u64,
    /// Blobs found in the store and not downloaded.
    pub blobs_cached: u64,
    /// Bytes downloaded.
    pub bytes_fetched: u64,
}

/// An image whose manifest, config and layers are all in the blob store, verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// Digest of the image manifest.
    pub digest: String,
    pub manifest: ImageManifest,
    pub config: ImageConfig,
    pub layers: Vec<LayerRef>,
    pub stats: PullStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_with_nulls_parses() {
        let json = br#"{"architecture":"amd64","os":"linux",
            "config":{"Entrypoint":null,"Cmd":["/bin/sh"],"Env":null,"WorkingDir":"","User":""},
            "rootfs":{"type":"layers","diff_ids":["sha256:aa"]}}"#;
        let (config, diff_ids, kind) = parse_config(json).unwrap();
        assert_eq!(config.cmd, Some(vec!["/bin/sh".to_owned()]));
        assert_eq!(config.entrypoint, None);
        assert!(config.env.is_empty());
        assert_eq!(config.working_dir, None);
        assert_eq!(config.user, None);
        assert_eq!(diff_ids, vec!["sha256:aa".to_owned()]);
        assert_eq!(kind, "layers");
    }

    #[test]
    fn manifest_kind_prefers_the_body() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert_eq!(
            manifest_kind(index, Some(media_types::OCI_MANIFEST)),
            Ok(ManifestKind::Index)
        );
        let bare = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        assert_eq!(manifest_kind(bare, None), Ok(ManifestKind::Image));
        let schema1 = br#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(manifest_kind(
            schema1,
            Some("application/vnd.docker.distribution.manifest.v1+prettyjws")
        )
        .is_err());
    }
}
