//! Garbage collection of the image cache under a size budget.
//!
//! Every unpacked image directory holds [`META`]: the blobs it was built from and its size on
//! disk (unpacked tree + compressed blobs). Reference counts are not stored: the caller passes the
//! digests its instances use, derived from their state directories, so a crash can never leave a
//! count wrong. An image in use is never evicted, whatever the budget.

use std::collections::HashSet;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// File name of an image's metadata inside its directory.
pub(crate) const META: &str = "meta.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    /// Digests (`sha256:<hex>`) of the manifest, config and layer blobs.
    pub blobs: Vec<String>,
    /// Bytes on disk: unpacked files plus compressed blobs.
    pub bytes: u64,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Collected {
    pub images_removed: usize,
    pub blobs_removed: usize,
    pub bytes_freed: u64,
}

struct Image {
    digest: String,
    dir: std::path::PathBuf,
    meta: Meta,
    last_used: SystemTime,
}

/// Collects `images` (one directory per image digest hex) and `blobs` (`sha256/<hex>`).
pub(crate) fn collect(
    images: &Path,
    blobs: &Path,
    budget_bytes: u64,
    in_use: &HashSet<String>,
) -> std::io::Result<Collected> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(images)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let dir = entry.path();
        let Ok(meta) = std::fs::read(dir.join(META))
            .map_err(|_| ())
            .and_then(|b| serde_json::from_slice::<Meta>(&b).map_err(|_| ()))
        else {
            // Built before metadata existed, or damaged: keep it; it is rebuilt only if removed by hand.
            continue;
        };
        let last_used = std::fs::metadata(dir.join("config.json"))
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        all.push(Image {
            digest: format!("sha256:{name}"),
            dir,
            meta,
            last_used,
        });
    }
    let mut total: u64 = all.iter().map(|i| i.meta.bytes).sum();
    let mut out = Collected::default();
    // Oldest use first.
    all.sort_by_key(|i| i.last_used);
    let mut kept = Vec::new();
    for image in all {
        if total > budget_bytes && !in_use.contains(&image.digest) {
            std::fs::remove_dir_all(&image.dir)?;
            total -= image.meta.bytes;
            out.images_removed += 1;
            out.bytes_freed += image.meta.bytes;
        } else {
            kept.push(image);
        }
    }
    let referenced: HashSet<String> = kept
        .iter()
        .flat_map(|i| {
            i.meta
                .blobs
                .iter()
                .map(|d| d.trim_start_matches("sha256:").to_owned())
        })
        .collect();
    let dir = blobs.join("sha256");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !referenced.contains(&name) {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(entry.path())?;
                out.blobs_removed += 1;
                out.bytes_freed += len;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(images: &Path, blobs: &Path, hex: &str, bytes: u64, layer: &str, age_s: u64) {
        let dir = images.join(hex);
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        let meta = Meta {
            blobs: vec![format!("sha256:{hex}"), format!("sha256:{layer}")],
            bytes,
        };
        std::fs::write(dir.join(META), serde_json::to_vec(&meta).unwrap()).unwrap();
        let t = SystemTime::now() - std::time::Duration::from_secs(age_s);
        std::fs::File::open(dir.join("config.json"))
            .unwrap()
            .set_modified(t)
            .unwrap();
        for b in [hex, layer] {
            std::fs::write(blobs.join("sha256").join(b), vec![0u8; 10]).unwrap();
        }
    }

    #[test]
    fn evicts_least_recently_used_unused_images_until_under_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let (images, blobs) = (tmp.path().join("images"), tmp.path().join("blobs"));
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(blobs.join("sha256")).unwrap();
        image(&images, &blobs, "aa", 100, "l1", 300); // oldest, in use
        image(&images, &blobs, "bb", 100, "l2", 200); // old, unused: evicted
        image(&images, &blobs, "cc", 100, "l1", 100); // shares layer l1
        image(&images, &blobs, "dd", 100, "l4", 0); // newest
        std::fs::write(blobs.join("sha256").join("orphan"), b"x").unwrap();
        let in_use: HashSet<String> = ["sha256:aa".to_owned()].into();

        let out = collect(&images, &blobs, 300, &in_use).unwrap();
        assert_eq!(out.images_removed, 1);
        assert!(!images.join("bb").exists());
        assert!(
            images.join("aa").exists() && images.join("cc").exists() && images.join("dd").exists()
        );
        // bb's own blobs and the orphan go; the shared layer stays.
        assert!(!blobs.join("sha256/bb").exists() && !blobs.join("sha256/l2").exists());
        assert!(!blobs.join("sha256/orphan").exists());
        assert!(blobs.join("sha256/l1").exists());

        // A budget of zero removes everything not in use, never what is.
        let out = collect(&images, &blobs, 0, &in_use).unwrap();
        assert_eq!(out.images_removed, 2);
        assert!(images.join("aa").exists());
        assert!(blobs.join("sha256/l1").exists() && blobs.join("sha256/aa").exists());
        assert!(!blobs.join("sha256/l4").exists());
    }
}
