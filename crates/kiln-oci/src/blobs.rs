//! A content-addressed blob store on the local disk.
//!
//! Layout: `<root>/sha256/<hex>` holds verified blobs; `<root>/tmp/` holds writes in progress.
//! A blob is written to a fresh file in `tmp/` while its digest is computed, fsynced, and only
//! renamed into `sha256/` when its bytes hash to the digest it was asked to be stored under (and
//! its size matches when one was expected). Rename is atomic within one filesystem, so a reader
//! sees either no blob or the whole verified blob: an interrupted or corrupt download leaves at
//! most a stray file in `tmp/`, which [`BlobStore::remove_stale_temp_files`] clears.
//!
//! Two writers of the same digest do not coordinate: each writes its own temp file and the second
//! rename replaces identical content.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt;

use crate::digest::{digest_hex, sha256_digest, DigestHasher};
use crate::OciError;

/// Distinguishes temp files written by one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Name used in place of the hex of an invalid digest; no writer ever creates it.
const INVALID_NAME: &str = "invalid-digest";

/// A content-addressed blob store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating if needed) the store rooted at `root`.
    pub fn open(root: &Path) -> Result<Self, OciError> {
        for dir in [root.join("sha256"), root.join("tmp")] {
            std::fs::create_dir_all(&dir).map_err(|source| OciError::BlobStoreOpen {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(BlobStore {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` lives (whether or not it is present). For a digest that is not
    /// `sha256:<64 lowercase hex>` this is a path inside the store that never exists, so a bad
    /// digest can never name a file outside it.
    pub fn path(&self, digest: &str) -> PathBuf {
        let name = digest_hex(digest).unwrap_or(INVALID_NAME);
        self.root.join("sha256").join(name)
    }

    /// Whether a verified blob with `digest` is present.
    pub fn contains(&self, digest: &str) -> bool {
        digest_hex(digest).is_some()
            && std::fs::symlink_metadata(self.path(digest)).is_ok_and(|m| m.is_file())
    }

    /// Stores `bytes` under `digest` if they hash to it; otherwise stores nothing and returns
    /// [`OciError::DigestMismatch`]. Returns the blob's path.
    pub async fn put_verified(&self, digest: &str, bytes: &[u8]) -> Result<PathBuf, OciError> {
        let actual = sha256_digest(bytes);
        if actual != digest {
            return Err(OciError::DigestMismatch {
                what: format!("blob to store as {digest}"),
                expected: digest.to_owned(),
                actual,
            });
        }
        let mut writer = self.writer(digest, Some(bytes.len() as u64)).await?;
        writer.write(bytes).await?;
        writer.commit().await
    }

    /// Starts a streaming write of the blob `digest`, optionally of exactly `expected_size` bytes.
    /// Nothing becomes visible under the digest until [`BlobWriter::commit`] has verified it;
    /// dropping the writer discards what was written.
    pub async fn writer(
        &self,
        digest: &str,
        expected_size: Option<u64>,
    ) -> Result<BlobWriter, OciError> {
        let hex = digest_hex(digest).ok_or_else(|| OciError::InvalidDigest {
            digest: digest.to_owned(),
        })?;
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .root
            .join("tmp")
            .join(format!("{hex}.{}.{n}.partial", std::process::id()));
        // Opened synchronously (one local syscall): `tokio::fs` would run it on the blocking pool,
        // and a pull cancelled while that open is in flight would leave a file no writer owns.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|source| OciError::BlobWrite {
                path: temp.clone(),
                source,
            })?;
        Ok(BlobWriter {
            file: Some(tokio::fs::File::from_std(file)),
            temp,
            dest: self.path(digest),
            digest: digest.to_owned(),
            expected_size,
            hasher: DigestHasher::default(),
        })
    }

    /// Reads a whole blob that is expected to be small (a manifest or a config), re-verifying its
    /// digest so that on-disk corruption is caught rather than parsed.
    pub async fn read_verified(&self, digest: &str, max_bytes: usize) -> Result<Vec<u8>, OciError> {
        if digest_hex(digest).is_none() {
            return Err(OciError::InvalidDigest {
                digest: digest.to_owned(),
            });
        }
        let path = self.path(digest);
        let blob_read = |source| OciError::BlobRead {
            path: path.clone(),
            source,
        };
        let len = tokio::fs::metadata(&path).await.map_err(blob_read)?.len();
        if len > max_bytes as u64 {
            return Err(OciError::BlobTooLarge {
                digest: digest.to_owned(),
                limit: max_bytes,
            });
        }
        let bytes = tokio::fs::read(&path).await.map_err(blob_read)?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(OciError::DigestMismatch {
                what: format!("stored blob {}", path.display()),
                expected: digest.to_owned(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Deletes temp files older than `older_than`, left behind by writers that were killed.
    /// Returns how many were removed. Not to be run with a smaller age than the longest
    /// download in progress could take.
    pub fn remove_stale_temp_files(&self, older_than: Duration) -> Result<usize, OciError> {
        let tmp = self.root.join("tmp");
        let read_err = |source| OciError::BlobRead {
            path: tmp.clone(),
            source,
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in std::fs::read_dir(&tmp).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if meta.is_file() && age >= older_than {
                match std::fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => return Err(OciError::BlobWrite { path, source }),
                }
            }
        }
        Ok(removed)
    }
}

/// A blob being written. See [`BlobStore::writer`].
pub struct BlobWriter {
    /// `None` once committed or failed; the temp file is then gone or renamed.
    file: Option<tokio::fs::File>,
    temp: PathBuf,
    dest: PathBuf,
    digest: String,
    expected_size: Option<u64>,
    hasher: DigestHasher,
}

impl BlobWriter {
    /// Appends `chunk`. Fails early, with [`OciError::SizeMismatch`], once more bytes arrive than
    /// the expected size, so an endless stream cannot fill the disk.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), OciError> {
        let written = self.hasher.len() + chunk.len() as u64;
        if let Some(expected) = self.expected_size {
            if written > expected {
                return Err(OciError::SizeMismatch {
                    what: format!("blob {}", self.digest),
                    expected,
                    actual: written,
                });
            }
        }
        let file = self.file.as_mut().ok_or_else(|| OciError::BlobWrite {
            path: self.temp.clone(),
            source: io::Error::other("blob writer already finished"),
        })?;
        file.write_all(chunk)
            .await
            .map_err(|source| OciError::BlobWrite {
                path: self.temp.clone(),
                source,
            })?;
        self.hasher.update(chunk);
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.hasher.len()
    }

    /// Verifies size and digest, makes the data durable and moves it into place. On any failure
    /// the temp file is removed and nothing is stored.
    pub async fn commit(mut self) -> Result<PathBuf, OciError> {
        let Some(mut file) = self.file.take() else {
            return Err(OciError::BlobWrite {
                path: self.temp.clone(),
                source: io::Error::other("blob writer already finished"),
            });
        };
        let hasher = std::mem::take(&mut self.hasher);
        let written = hasher.len();
        if let Some(expected) = self.expected_size {
            if written != expected {
                return Err(OciError::SizeMismatch {
                    what: format!("blob {}", self.digest),
                    expected,
                    actual: written,
                });
            }
        }
        let actual = hasher.finish();
        if actual != self.digest {
            return Err(OciError::DigestMismatch {
                what: format!("blob {}", self.digest),
                expected: self.digest.clone(),
                actual,
            });
        }
        let temp_write = |source| OciError::BlobWrite {
            path: self.temp.clone(),
            source,
        };
        file.flush().await.map_err(temp_write)?;
        file.sync_all().await.map_err(temp_write)?;
        drop(file);
        tokio::fs::rename(&self.temp, &self.dest)
            .await
            .map_err(|source| OciError::BlobWrite {
                path: self.dest.clone(),
                source,
            })?;
        // The rename is durable only once the directory is synced.
        if let Some(dir) = self.dest.parent() {
            let dir_file =
                tokio::fs::File::open(dir)
                    .await
                    .map_err(|source| OciError::BlobWrite {
                        path: dir.to_owned(),
                        source,
                    })?;
            dir_file
                .sync_all()
                .await
                .map_err(|source| OciError::BlobWrite {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        Ok(self.dest.clone())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // After a successful rename the temp path no longer exists and this is a no-op; on every
        // other path it removes the partial data.
        let _ = std::fs::remove_file(&self.temp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_files(store: &BlobStore) -> usize {
        std::fs::read_dir(store.root().join("tmp")).unwrap().count()
    }

    #[tokio::test]
    async fn verified_blob_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = sha256_digest(b"hello");
        assert!(!store.contains(&digest));
        let path = store.put_verified(&digest, b"hello").await.unwrap();
        assert_eq!(path, store.path(&digest));
        assert!(store.contains(&digest));
        assert_eq!(store.read_verified(&digest, 100).await.unwrap(), b"hello");
        assert_eq!(temp_files(&store), 0);
    }

    #[tokio::test]
    async fn mismatching_bytes_are_never_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = sha256_digest(b"hello");

        let err = store.put_verified(&digest, b"jello").await.unwrap_err();
        assert!(matches!(err, OciError::DigestMismatch { .. }), "{err:?}");

        let mut writer = store.writer(&digest, None).await.unwrap();
        writer.write(b"jello").await.unwrap();
        let err = writer.commit().await.unwrap_err();
        assert!(matches!(err, OciError::DigestMismatch { .. }), "{err:?}");

        assert!(!store.contains(&digest));
        assert!(!store.path(&digest).exists());
        assert_eq!(temp_files(&store), 0);
    }

    #[tokio::test]
    async fn interrupted_write_leaves_no_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = sha256_digest(b"hello world");
        let mut writer = store.writer(&digest, Some(11)).await.unwrap();
        writer.write(b"hello").await.unwrap();
        assert_eq!(temp_files(&store), 1);
        drop(writer); // the download was cut off
        assert!(!store.contains(&digest));
        assert_eq!(temp_files(&store), 0);
    }

    #[tokio::test]
    async fn oversized_stream_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = sha256_digest(b"hello");
        let mut writer = store.writer(&digest, Some(5)).await.unwrap();
        writer.write(b"hel").await.unwrap();
        let err = writer.write(b"lo!").await.unwrap_err();
        assert!(
            matches!(err, OciError::SizeMismatch { actual: 6, .. }),
            "{err:?}"
        );
        drop(writer);

        let mut short = store.writer(&digest, Some(5)).await.unwrap();
        short.write(b"hell").await.unwrap();
        let err = short.commit().await.unwrap_err();
        assert!(
            matches!(err, OciError::SizeMismatch { actual: 4, .. }),
            "{err:?}"
        );
        assert!(!store.contains(&digest));
        assert_eq!(temp_files(&store), 0);
    }

    #[tokio::test]
    async fn invalid_digests_never_name_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let evil = "sha256:../../etc/passwd";
        assert!(store.path(evil).starts_with(dir.path().join("sha256")));
        assert!(!store.contains(evil));
        assert!(matches!(
            store.writer(evil, None).await,
            Err(OciError::InvalidDigest { .. })
        ));
    }

    #[tokio::test]
    async fn corrupted_blob_on_disk_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = sha256_digest(b"hello");
        store.put_verified(&digest, b"hello").await.unwrap();
        std::fs::write(store.path(&digest), b"jello").unwrap();
        let err = store.read_verified(&digest, 100).await.unwrap_err();
        assert!(matches!(err, OciError::DigestMismatch { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn stale_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        std::fs::write(store.root().join("tmp/leftover.partial"), b"x").unwrap();
        assert_eq!(
            store
                .remove_stale_temp_files(Duration::from_secs(3600))
                .unwrap(),
            0
        );
        assert_eq!(store.remove_stale_temp_files(Duration::ZERO).unwrap(), 1);
        assert_eq!(temp_files(&store), 0);
    }
}
