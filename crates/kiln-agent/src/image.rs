//! The host's image cache: pulled blobs (content-addressed, shared) and one unpacked root
//! filesystem tree per image digest, shared read-only by every instance of that image (each
//! instance writes to its own overlay upper layer).
//!
//! Concurrent requests for the same digest share one pull: the first takes the digest's lock and
//! builds, the others wait on it and then find the finished tree. A tree is built in a temporary
//! directory and renamed into place, so a crash mid-unpack leaves no half tree that looks complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Mutex;

use kiln_oci::{BlobStore, ClientConfig, ImageConfig, RegistryClient};
use kiln_types::ImageRef;

use crate::{AgentConfig, AgentError};

pub(crate) struct ImageCache {
    client: RegistryClient,
    blobs: BlobStore,
    root: PathBuf,
    building: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// An image ready to back instances.
#[derive(Debug, Clone)]
pub(crate) struct PreparedImage {
    /// The read-only tree (overlay lower layer).
    pub rootfs: PathBuf,
    pub config: ImageConfig,
}

impl ImageCache {
    pub(crate) fn new(config: &AgentConfig) -> Result<Self, AgentError> {
        let client = RegistryClient::new(ClientConfig {
            plain_http: config.plain_http_registries.clone(),
            ..Default::default()
        })
        .map_err(|source| AgentError::BlobStore {
            source: Box::new(source),
        })?;
        let blobs = BlobStore::open(&config.data_dir.join("blobs")).map_err(|source| {
            AgentError::BlobStore {
                source: Box::new(source),
            }
        })?;
        Ok(Self {
            client,
            blobs,
            root: config.data_dir.join("images"),
            building: Mutex::new(HashMap::new()),
        })
    }

    fn dir(&self, image: &ImageRef) -> PathBuf {
        self.root.join(image.digest.trim_start_matches("sha256:"))
    }

    async fn load(dir: &Path) -> Option<PreparedImage> {
        let bytes = tokio::fs::read(dir.join("config.json")).await.ok()?;
        let config = serde_json::from_slice(&bytes).ok()?;
        Some(PreparedImage {
            rootfs: dir.join("rootfs"),
            config,
        })
    }

    /// Pulls (if needed) and unpacks (if needed) `image`.
    pub(crate) async fn prepare(&self, image: &ImageRef) -> Result<PreparedImage, AgentError> {
        let dir = self.dir(image);
        if let Some(p) = Self::load(&dir).await {
            return Ok(p);
        }
        let lock = self
            .building
            .lock()
            .await
            .entry(image.digest.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if let Some(p) = Self::load(&dir).await {
            return Ok(p);
        }
        let pulled = self
            .client
            .pull(image, &self.blobs)
            .await
            .map_err(|source| AgentError::Pull {
                image: image.to_string(),
                source: Box::new(source),
            })?;
        tracing::info!(image = %image, fetched = pulled.stats.blobs_fetched, cached = pulled.stats.blobs_cached, bytes = pulled.stats.bytes_fetched, "image pulled");

        let tmp = self.root.join(format!(
            ".tmp-{}",
            kiln_types::InstanceId::generate().suffix()
        ));
        let rootfs_tmp = tmp.join("rootfs");
        let rerr = |source| AgentError::Rootfs {
            image: image.to_string(),
            path: tmp.clone(),
            source,
        };
        tokio::fs::create_dir_all(&rootfs_tmp).await.map_err(rerr)?;
        let blobs = self.blobs.clone();
        let layers = pulled.layers.clone();
        let image_name = image.to_string();
        let unpack_dir = rootfs_tmp.clone();
        tokio::task::spawn_blocking(move || -> Result<(), AgentError> {
            for layer in &layers {
                kiln_oci::apply_layer(
                    &blobs.path(&layer.digest),
                    &layer.media_type,
                    &layer.diff_id,
                    &unpack_dir,
                    &Default::default(),
                )
                .map_err(|source| AgentError::Unpack {
                    image: image_name.clone(),
                    digest: layer.digest.clone(),
                    source: Box::new(source),
                })?;
            }
            Ok(())
        })
        .await
        .map_err(|_| AgentError::Command {
            command: "unpack".into(),
            stderr: "unpack task panicked".into(),
        })??;
        let config_json = serde_json::to_vec(&pulled.config).unwrap_or_default();
        tokio::fs::write(tmp.join("config.json"), config_json)
            .await
            .map_err(rerr)?;
        tokio::fs::rename(&tmp, &dir)
            .await
            .map_err(|source| AgentError::Rootfs {
                image: image.to_string(),
                path: dir.clone(),
                source,
            })?;
        tracing::info!(image = %image, path = %dir.display(), "rootfs unpacked");
        Self::load(&dir).await.ok_or_else(|| AgentError::Rootfs {
            image: image.to_string(),
            path: dir.clone(),
            source: std::io::Error::other("unpacked image has no readable config.json"),
        })
    }
}
