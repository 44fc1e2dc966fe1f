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

pub(crate) mod gc;

pub(crate) struct ImageCache {
    client: RegistryClient,
    blobs: BlobStore,
    root: PathBuf,
    building: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Held shared by pulls and unpacks, exclusively by collection: blobs of a pull in progress
    /// belong to no image yet and must not be collected.
    pulls: tokio::sync::RwLock<()>,
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
            pulls: tokio::sync::RwLock::new(()),
        })
    }

    fn dir(&self, image: &ImageRef) -> PathBuf {
        self.root.join(image.digest.trim_start_matches("sha256:"))
    }

    async fn load(dir: &Path) -> Option<PreparedImage> {
        let bytes = tokio::fs::read(dir.join("config.json")).await.ok()?;
        // The config's mtime is the image's last use, for least-recently-used eviction.
        let _ = std::fs::File::open(dir.join("config.json"))
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        let config = serde_json::from_slice(&bytes).ok()?;
        Some(PreparedImage {
            rootfs: dir.join("rootfs"),
            config,
        })
    }

    /// Pulls (if needed) and unpacks (if needed) `image`.
    ///
    /// Callers record the instance's use of the image (its `spec.json`) before calling, so a
    /// collection that starts later sees it in use.
    pub(crate) async fn prepare(&self, image: &ImageRef) -> Result<PreparedImage, AgentError> {
        let dir = self.dir(image);
        {
            let _shared = self.pulls.read().await;
            if let Some(p) = Self::load(&dir).await {
                return Ok(p);
            }
        }
        let lock = self
            .building
            .lock()
            .await
            .entry(image.digest.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let _pull = self.pulls.read().await;
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
        let unpacked = tokio::task::spawn_blocking(move || -> Result<u64, AgentError> {
            let mut bytes = 0;
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
                })
                .map(|stats| bytes += stats.bytes_written)?;
            }
            Ok(bytes)
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
        // What garbage collection needs: the image's blobs and its size on disk.
        let mut blobs_of = vec![image.digest.clone(), pulled.manifest.config.digest.clone()];
        blobs_of.extend(pulled.layers.iter().map(|l| l.digest.clone()));
        let blob_bytes: u64 = pulled.layers.iter().map(|l| l.size).sum();
        let meta = gc::Meta {
            blobs: blobs_of,
            bytes: unpacked + blob_bytes,
        };
        tokio::fs::write(
            tmp.join(gc::META),
            serde_json::to_vec(&meta).unwrap_or_default(),
        )
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

impl ImageCache {
    /// Evicts unused images, least recently used first, until the cache fits `budget_bytes`,
    /// then removes blobs no remaining image references. Images in use are those named by the
    /// `spec.json` of an instance directory under `instances`: derived from state on disk, so the
    /// counts are right after an agent restart or a crash.
    pub(crate) async fn collect(&self, budget_bytes: u64, instances: &Path) {
        let _exclusive = self.pulls.write().await;
        let in_use = images_in_use(instances).await;
        let root = self.root.clone();
        let blobs = self.blobs.root().to_owned();
        let result =
            tokio::task::spawn_blocking(move || gc::collect(&root, &blobs, budget_bytes, &in_use))
                .await;
        match result {
            Ok(Ok(r)) if r.images_removed > 0 || r.blobs_removed > 0 => {
                tracing::info!(
                    images = r.images_removed,
                    blobs = r.blobs_removed,
                    freed_bytes = r.bytes_freed,
                    "image cache collected"
                );
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "image cache collection failed"),
            _ => {}
        }
    }
}

/// Image digests named by the instances' `spec.json` files.
async fn images_in_use(instances: &Path) -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    let Ok(mut entries) = tokio::fs::read_dir(instances).await else {
        return out;
    };
    while let Ok(Some(e)) = entries.next_entry().await {
        if let Ok(bytes) = tokio::fs::read(e.path().join("spec.json")).await {
            if let Ok(spec) = serde_json::from_slice::<kiln_types::WorkloadSpec>(&bytes) {
                out.insert(spec.image.digest);
            }
        }
    }
    out
}
