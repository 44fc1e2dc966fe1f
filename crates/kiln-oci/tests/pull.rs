//! Resolve, pull and unpack against a real registry (Debian's `docker-registry`, started by
//! kiln-testkit in a temp dir).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use kiln_oci::{
    apply_layer, media_types, BlobStore, ClientConfig, OciError, Reference, RegistryClient,
    UnpackLimits,
};
use kiln_testkit::image::{BuiltImage, ImageBuilder};
use kiln_testkit::registry::Registry;

const REPO: &str = "kiln/test-app";

/// A registry with a two-layer image pushed as `kiln/test-app:v1`.
struct Fixture {
    dir: tempfile::TempDir,
    registry: Registry,
    image: BuiltImage,
    client: RegistryClient,
}

impl Fixture {
    async fn start() -> Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let registry = Registry::start(&dir.path().join("registry")).await?;
        let image = ImageBuilder::new()
            .file("etc/greeting", b"hello\n".to_vec(), 0o644)
            .file("app/old.txt", b"old\n".to_vec(), 0o644)
            .file("app/keep.txt", b"keep\n".to_vec(), 0o600)
            .file("data/lower", b"lower\n".to_vec(), 0o644)
            .symlink("bin/app", "/app/run")
            .new_layer()
            .whiteout("app/old.txt")
            .opaque_dir("data")
            .file("data/upper", b"upper\n".to_vec(), 0o644)
            .file("app/run", b"#!/bin/sh\necho hi\n".to_vec(), 0o755)
            .entrypoint(&["/app/run"])
            .cmd(&["--serve"])
            .env("PORT", "8080")
            .workdir("/app")
            .user("1000:1000")
            .build()?;
        let pushed = image.push(&registry.host(), REPO, "v1").await?;
        assert_eq!(pushed, image.manifest_digest);
        let client = RegistryClient::new(ClientConfig::default())?;
        Ok(Fixture {
            dir,
            registry,
            image,
            client,
        })
    }

    fn reference(&self, suffix: &str) -> Reference {
        Reference::parse(&format!("{}/{REPO}{suffix}", self.registry.host())).unwrap()
    }

    /// The file the registry stores a blob's bytes in.
    fn stored_blob(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.registry
            .dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

fn mtimes(store: &BlobStore, digests: &[&str]) -> Vec<SystemTime> {
    digests
        .iter()
        .map(|d| {
            std::fs::metadata(store.path(d))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect()
}

async fn unpack(store: &BlobStore, pulled: &kiln_oci::PulledImage, rootfs: &Path) -> Result<()> {
    std::fs::create_dir_all(rootfs)?;
    for layer in &pulled.layers {
        let blob = store.path(&layer.digest);
        let (media_type, diff_id) = (layer.media_type.clone(), layer.diff_id.clone());
        let dest = rootfs.to_owned();
        tokio::task::spawn_blocking(move || {
            apply_layer(
                &blob,
                &media_type,
                &diff_id,
                &dest,
                &UnpackLimits::default(),
            )
        })
        .await?
        .with_context(|| format!("applying layer {}", layer.digest))?;
    }
    Ok(())
}

#[tokio::test]
async fn resolve_pull_unpack_and_pull_again_from_cache() -> Result<()> {
    let fx = Fixture::start().await?;

    let by_tag = fx.client.resolve(&fx.reference(":v1")).await?;
    assert_eq!(by_tag.digest, fx.image.manifest_digest);
    assert_eq!(by_tag.registry, fx.registry.host());
    assert_eq!(by_tag.repository, REPO);
    let by_digest = fx
        .client
        .resolve(&fx.reference(&format!("@{}", fx.image.manifest_digest)))
        .await?;
    assert_eq!(by_digest, by_tag);

    let store = BlobStore::open(&fx.dir.path().join("blobs"))?;
    let pulled = fx.client.pull(&by_tag, &store).await?;
    assert_eq!(pulled.digest, fx.image.manifest_digest);
    assert_eq!(pulled.layers.len(), 2);
    for (pulled, built) in pulled.layers.iter().zip(&fx.image.layers) {
        assert_eq!(pulled.digest, built.digest);
        assert_eq!(pulled.diff_id, built.diff_id);
        assert_eq!(pulled.media_type, media_types::OCI_LAYER_GZIP);
        assert_eq!(pulled.size, built.blob.len() as u64);
    }
    assert_eq!(pulled.config.entrypoint, Some(vec!["/app/run".to_owned()]));
    assert_eq!(pulled.config.cmd, Some(vec!["--serve".to_owned()]));
    assert_eq!(pulled.config.env, vec!["PORT=8080".to_owned()]);
    assert_eq!(pulled.config.working_dir.as_deref(), Some("/app"));
    assert_eq!(pulled.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(
        pulled.stats.blobs_fetched, 4,
        "manifest, config, two layers"
    );
    assert_eq!(pulled.stats.blobs_cached, 0);

    let mut digests = vec![
        fx.image.manifest_digest.as_str(),
        fx.image.config_digest.as_str(),
    ];
    digests.extend(fx.image.layers.iter().map(|l| l.digest.as_str()));
    for digest in &digests {
        assert!(store.contains(digest), "{digest}");
    }

    let rootfs = fx.dir.path().join("rootfs");
    unpack(&store, &pulled, &rootfs).await?;
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap();
    assert_eq!(read("etc/greeting"), "hello\n");
    assert_eq!(read("app/keep.txt"), "keep\n");
    assert_eq!(read("app/run"), "#!/bin/sh\necho hi\n");
    assert_eq!(read("data/upper"), "upper\n");
    assert!(!rootfs.join("app/old.txt").exists(), "whited out");
    assert!(
        !rootfs.join("data/lower").exists(),
        "hidden by the opaque dir"
    );
    assert_eq!(
        std::fs::read_link(rootfs.join("bin/app"))?,
        Path::new("/app/run")
    );

    // Everything is cached: the second pull asks the registry for nothing.
    let before = mtimes(&store, &digests);
    let counters = fx.client.stats();
    let again = fx.client.pull(&by_tag, &store).await?;
    assert_eq!(again.stats.blobs_fetched, 0);
    assert_eq!(again.stats.bytes_fetched, 0);
    assert_eq!(again.stats.blobs_cached, 4);
    assert_eq!(fx.client.stats(), counters);
    assert_eq!(mtimes(&store, &digests), before);
    assert_eq!(again.layers, pulled.layers);
    Ok(())
}

#[tokio::test]
async fn manifest_bytes_that_do_not_match_the_digest_are_rejected() -> Result<()> {
    let fx = Fixture::start().await?;
    // The registry's storage is tampered with: same digest, different bytes.
    let stored = fx.stored_blob(&fx.image.manifest_digest);
    let mut bytes = std::fs::read(&stored)?;
    bytes.push(b'\n');
    std::fs::write(&stored, &bytes)?;

    let pinned = fx.reference(&format!("@{}", fx.image.manifest_digest));
    match fx.client.resolve(&pinned).await {
        Err(OciError::DigestMismatch {
            expected, actual, ..
        }) => {
            assert_eq!(expected, fx.image.manifest_digest);
            assert_eq!(actual, kiln_oci::sha256_digest(&bytes));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }

    let store = BlobStore::open(&fx.dir.path().join("blobs"))?;
    let image = pinned.pinned(&fx.image.manifest_digest);
    let err = fx.client.pull(&image, &store).await.unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err:?}");
    assert!(!store.contains(&fx.image.manifest_digest));
    Ok(())
}

#[tokio::test]
async fn a_corrupt_layer_is_never_stored() -> Result<()> {
    let fx = Fixture::start().await?;
    let layer = &fx.image.layers[1];
    let stored = fx.stored_blob(&layer.digest);
    let mut bytes = std::fs::read(&stored)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff; // same size, different content
    std::fs::write(&stored, &bytes)?;

    let store = BlobStore::open(&fx.dir.path().join("blobs"))?;
    let image = fx.client.resolve(&fx.reference(":v1")).await?;
    match fx.client.pull(&image, &store).await {
        Err(OciError::DigestMismatch { expected, .. }) => assert_eq!(expected, layer.digest),
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(!store.contains(&layer.digest));
    assert_eq!(std::fs::read_dir(store.root().join("tmp"))?.count(), 0);
    Ok(())
}

#[tokio::test]
async fn missing_tags_and_repositories_are_not_found() -> Result<()> {
    let fx = Fixture::start().await?;
    for reference in [
        fx.reference(":no-such-tag"),
        Reference::parse(&format!("{}/kiln/nothing-here:v1", fx.registry.host()))?,
    ] {
        let err = fx.client.resolve(&reference).await.unwrap_err();
        assert!(err.is_not_found(), "{reference}: {err:?}");
        assert!(!err.is_transient());
        assert!(
            err.to_string().contains(&reference.to_string()),
            "the message names the reference: {err}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn an_index_resolves_to_its_linux_amd64_manifest() -> Result<()> {
    let fx = Fixture::start().await?;
    let descriptor = |arch: &str| {
        serde_json::json!({
            "mediaType": media_types::OCI_MANIFEST,
            "digest": fx.image.manifest_digest,
            "size": fx.image.manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
        })
    };
    let push_index = |tag: &'static str, manifests: Vec<serde_json::Value>| {
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_types::OCI_INDEX,
            "manifests": manifests,
        }))
        .unwrap();
        let url = format!("http://{}/v2/{REPO}/manifests/{tag}", fx.registry.host());
        async move {
            let response = reqwest::Client::new()
                .put(url)
                .header("content-type", media_types::OCI_INDEX)
                .body(body)
                .send()
                .await?;
            anyhow::ensure!(response.status().is_success(), "{}", response.status());
            anyhow::Ok(())
        }
    };
    push_index("multi", vec![descriptor("arm64"), descriptor("amd64")]).await?;
    push_index("arm-only", vec![descriptor("arm64")]).await?;

    let resolved = fx.client.resolve(&fx.reference(":multi")).await?;
    assert_eq!(resolved.digest, fx.image.manifest_digest);

    match fx.client.resolve(&fx.reference(":arm-only")).await {
        Err(OciError::NoPlatform { platforms, .. }) => assert_eq!(platforms, vec!["linux/arm64"]),
        other => panic!("expected NoPlatform, got {other:?}"),
    }
    Ok(())
}
