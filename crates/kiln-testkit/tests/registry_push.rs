//! End to end: images built by `ImageBuilder` and pushed by `BuiltImage::push` to a real
//! `docker-registry` must be accepted by independent clients (`skopeo`, `umoci`), and unpack to
//! the tree the layers describe, whiteouts included.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kiln_testkit::{build_hello_tls, hello_tls_image, BuiltImage, ImageBuilder, Registry};
use sha2::{Digest, Sha256};

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Two layers: the upper one deletes a file (whiteout), empties a directory (opaque), replaces a
/// file and adds a symlink.
fn two_layer_image() -> ImageBuilder {
    ImageBuilder::new()
        .file("/etc/motd", b"lower\n".to_vec(), 0o644)
        .file("/data/old", b"delete me\n".to_vec(), 0o600)
        .file("/data/keep", b"keep me\n".to_vec(), 0o644)
        .file("/cache/a", b"a\n".to_vec(), 0o644)
        .file("/cache/b", b"b\n".to_vec(), 0o644)
        .dir("/tmp", 0o1777)
        .new_layer()
        .whiteout("/data/old")
        .opaque_dir("/cache")
        .file("/cache/c", b"c\n".to_vec(), 0o644)
        .file("/etc/motd", b"upper\n".to_vec(), 0o644)
        .symlink("/motd", "etc/motd")
        .file("/tmp/in-upper", b"x\n".to_vec(), 0o644)
        .entrypoint(&["/bin/true"])
        .cmd(&["--flag"])
        .env("A", "1")
        .workdir("/data")
        .user("1000:1000")
}

/// skopeo copy into an OCI layout, then umoci unpack; returns the rootfs path.
fn copy_and_unpack(reference: &str, work: &Path, tag: &str) -> std::path::PathBuf {
    let layout = work.join("layout");
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(reference)
        .arg(format!("oci:{}:{tag}", layout.display())));
    let bundle = work.join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&bundle));
    bundle.join("rootfs")
}

#[tokio::test]
async fn pushed_image_is_accepted_by_skopeo_and_umoci() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(&tmp.path().join("registry")).await.unwrap();
    assert_eq!(
        registry.host(),
        format!("127.0.0.1:{}", registry.addr().port())
    );

    let image = two_layer_image().build().unwrap();
    assert_eq!(image.layers.len(), 2);
    let digest = image
        .push(&registry.host(), "kiln/test", "v1")
        .await
        .unwrap();
    assert_eq!(digest, image.manifest_digest);

    let reference = format!("docker://{}/kiln/test:v1", registry.host());
    // The raw manifest skopeo fetches is byte for byte ours.
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(&reference));
    assert_eq!(sha256(&raw.stdout), digest);
    assert_eq!(raw.stdout, image.manifest);
    let inspect = run(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(&reference));
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(inspect["Digest"], digest);
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Os"], "linux");
    let layers: Vec<_> = image.layers.iter().map(|l| l.digest.clone()).collect();
    assert_eq!(inspect["Layers"], serde_json::json!(layers));
    let config = run(Command::new("skopeo")
        .args(["inspect", "--config", "--raw", "--tls-verify=false"])
        .arg(&reference));
    assert_eq!(config.stdout, image.config);

    // A real client copies it (verifying every blob digest on the way) and unpacks it.
    let rootfs = copy_and_unpack(&reference, tmp.path(), "v1");
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap();
    assert_eq!(read("etc/motd"), "upper\n");
    assert_eq!(read("data/keep"), "keep me\n");
    assert!(!rootfs.join("data/old").exists(), "whiteout not applied");
    assert!(!rootfs.join("data/.wh.old").exists());
    assert!(
        !rootfs.join("cache/a").exists() && !rootfs.join("cache/b").exists(),
        "opaque dir"
    );
    assert_eq!(read("cache/c"), "c\n");
    assert_eq!(
        std::fs::read_link(rootfs.join("motd")).unwrap(),
        Path::new("etc/motd")
    );
    assert_eq!(read("motd"), "upper\n");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::metadata(rootfs.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("data/keep"), 0o644);
    // The upper layer's automatically added tmp/ keeps the lower layer's sticky mode.
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(read("tmp/in-upper"), "x\n");
}

#[tokio::test]
async fn pushing_again_reuses_blobs_and_tags_the_same_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(tmp.path()).await.unwrap();
    let image = two_layer_image().build().unwrap();
    let first = image.push(&registry.host(), "again", "one").await.unwrap();
    // All blobs exist now, so only HEADs and the manifest PUT happen.
    let second = image.push(&registry.host(), "again", "two").await.unwrap();
    assert_eq!(first, second);
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/again:two", registry.host())));
    assert_eq!(sha256(&raw.stdout), first);
}

#[test]
fn building_twice_gives_identical_digests() {
    let a = two_layer_image().build().unwrap();
    let b = two_layer_image().build().unwrap();
    let digests = |i: &BuiltImage| {
        let mut d = vec![i.manifest_digest.clone(), i.config_digest.clone()];
        d.extend(
            i.layers
                .iter()
                .flat_map(|l| [l.digest.clone(), l.diff_id.clone()]),
        );
        d
    };
    assert_eq!(digests(&a), digests(&b));
    assert_eq!(a.manifest, b.manifest);
    assert!(a
        .layers
        .iter()
        .zip(&b.layers)
        .all(|(x, y)| x.blob == y.blob));
    // And any change in the inputs changes the digest.
    let c = two_layer_image().env("A", "2").build().unwrap();
    assert_ne!(a.manifest_digest, c.manifest_digest);
    assert_eq!(a.layers[0].digest, c.layers[0].digest);
    let d = two_layer_image()
        .file("/extra", vec![], 0o644)
        .build()
        .unwrap();
    assert_ne!(a.layers[1].digest, d.layers[1].digest);
}

#[tokio::test]
async fn registry_is_killed_on_drop() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(tmp.path()).await.unwrap();
    let addr = registry.addr();
    drop(registry);
    // The port is free again: the process is gone, not just disowned.
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpListener::bind(addr).is_err() {
        assert!(Instant::now() < deadline, "registry still holds {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sample app's image, pulled by skopeo and unpacked by umoci, serves TLS from its rootfs.
#[tokio::test]
async fn hello_tls_image_runs_from_its_unpacked_rootfs() {
    let binary = tokio::task::spawn_blocking(build_hello_tls)
        .await
        .unwrap()
        .unwrap();
    // Cheap when up to date.
    assert_eq!(
        tokio::task::spawn_blocking(build_hello_tls)
            .await
            .unwrap()
            .unwrap(),
        binary
    );
    let image = hello_tls_image(&binary, "howdy").unwrap().build().unwrap();
    assert_eq!(
        image.manifest_digest,
        hello_tls_image(&binary, "howdy")
            .unwrap()
            .build()
            .unwrap()
            .manifest_digest
    );

    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(&tmp.path().join("registry")).await.unwrap();
    let digest = image
        .push(&registry.host(), "hello-tls", "v1")
        .await
        .unwrap();
    let rootfs = copy_and_unpack(
        &format!("docker://{}/hello-tls@{digest}", registry.host()),
        tmp.path(),
        "v1",
    );
    assert!(std::fs::read_to_string(rootfs.join("etc/passwd"))
        .unwrap()
        .contains("app:x:1000:1000"));

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(rootfs.join("app/hello-tls"))
        .env_clear()
        .env("PORT", port.to_string())
        .env("GREETING", "howdy")
        .env("KILN_APP_NAME", "demo")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("https://a.kiln.test:{port}/");
    let resolve = format!("a.kiln.test:{port}:127.0.0.1");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let out = Command::new("curl")
            .args(["-sSk", "--resolve", &resolve, &url])
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(Instant::now() < deadline, "hello-tls never answered");
        std::thread::sleep(Duration::from_millis(50));
    };
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(body, "howdy from demo sni=a.kiln.test client=127.0.0.1\n");
}
