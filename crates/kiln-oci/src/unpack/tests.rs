//! Layers built in memory with the `tar` crate (and by hand where the crate refuses to write the
//! hostile thing), applied to temp directories.

use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use tar::{EntryType, Header};

use super::*;
use crate::config::media_types;
use crate::digest::sha256_digest;

const MTIME: u64 = 1_600_000_000;

fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h
}

/// A layer under construction.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn file(self, path: &str, contents: &[u8], mode: u32) -> Self {
        self.owned_file(path, contents, mode, 0, 0)
    }

    fn owned_file(mut self, path: &str, contents: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = header(EntryType::Regular, mode, contents.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.0.append_data(&mut h, path, contents).unwrap();
        self
    }

    fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = header(EntryType::Directory, mode, 0);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(EntryType::Link, 0o644, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    fn special(mut self, path: &str, kind: EntryType) -> Self {
        let mut h = header(kind, 0o666, 0);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    /// An entry whose name bytes are written as given, bypassing the builder's path checks.
    fn raw(mut self, name: &[u8], kind: EntryType, link: &[u8], contents: &[u8]) -> Self {
        let mut h = header(kind, 0o644, contents.len() as u64);
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
        old.linkname = [0; 100];
        old.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.0.append(&h, contents).unwrap();
        self
    }

    fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.0
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        self
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// A destination directory plus a scratch directory for blobs.
struct Fixture {
    root: tempfile::TempDir,
    dest: PathBuf,
    blobs: PathBuf,
    n: usize,
}

impl Fixture {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("rootfs");
        let blobs = root.path().join("blobs");
        fs::create_dir(&dest).unwrap();
        fs::create_dir(&blobs).unwrap();
        Fixture {
            root,
            dest,
            blobs,
            n: 0,
        }
    }

    fn blob(&mut self, bytes: &[u8]) -> PathBuf {
        self.n += 1;
        let path = self.blobs.join(format!("layer{}", self.n));
        fs::write(&path, bytes).unwrap();
        path
    }

    fn apply_with(&mut self, layer: Layer, limits: &UnpackLimits) -> Result<UnpackStats, OciError> {
        let bytes = layer.bytes();
        let blob = self.blob(&bytes);
        apply_layer(
            &blob,
            media_types::OCI_LAYER_TAR,
            &sha256_digest(&bytes),
            &self.dest,
            limits,
        )
    }

    fn apply(&mut self, layer: Layer) -> Result<UnpackStats, OciError> {
        self.apply_with(layer, &UnpackLimits::default())
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dest.join(rel)
    }

    fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.path(rel)).is_ok()
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap()
    }

    /// A directory next to the destination, standing for "anywhere on the host".
    fn outside(&self) -> PathBuf {
        let outside = self.root.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        outside
    }
}

fn assert_rejected(result: Result<UnpackStats, OciError>) -> String {
    match result {
        Err(e @ OciError::LayerEntry { .. }) => e.to_string(),
        other => panic!("expected a rejected entry, got {other:?}"),
    }
}

#[test]
fn files_dirs_and_metadata() {
    let mut fx = Fixture::new();
    let stats = fx
        .apply(
            Layer::new()
                .dir("etc", 0o755)
                .file("etc/hostname", b"kiln\n", 0o644)
                .file("bin/tool", b"#!/bin/sh\n", 0o4755)
                .dir("ro", 0o555)
                .file("ro/inside", b"x", 0o400),
        )
        .unwrap();
    assert_eq!(fx.read("etc/hostname"), "kiln\n");
    assert_eq!(stats.files, 3);
    assert_eq!(stats.dirs, 2);
    assert_eq!(stats.bytes_written, 16);

    let tool = fs::metadata(fx.path("bin/tool")).unwrap();
    let etc = fs::metadata(fx.path("etc")).unwrap();
    let ro = fs::metadata(fx.path("ro")).unwrap();
    assert_eq!(tool.mtime(), MTIME as i64);
    // The directory's mtime survives its children being written after it.
    assert_eq!(etc.mtime(), MTIME as i64);
    assert_eq!(ro.permissions().mode() & 0o7777, 0o555);
    assert_eq!(fs::read(fx.path("ro/inside")).unwrap(), b"x");
    if is_root() {
        assert_eq!(tool.permissions().mode() & 0o7777, 0o4755);
    } else {
        assert_eq!(tool.permissions().mode() & 0o7777, 0o755);
    }
}

#[test]
fn ownership_is_applied() {
    if !is_root() {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let mut fx = Fixture::new();
    fx.apply(
        Layer::new()
            .owned_file("home/app/data", b"d", 0o2750, 1000, 1001)
            .pax(&[("uid", b"3000000"), ("gid", b"3000001")])
            .file("big-ids", b"", 0o644),
    )
    .unwrap();
    let data = fs::metadata(fx.path("home/app/data")).unwrap();
    assert_eq!((data.uid(), data.gid()), (1000, 1001));
    assert_eq!(data.permissions().mode() & 0o7777, 0o2750);
    let big = fs::metadata(fx.path("big-ids")).unwrap();
    assert_eq!((big.uid(), big.gid()), (3_000_000, 3_000_001));
}

#[test]
fn whiteout_removes_lower_files_and_directories() {
    let mut fx = Fixture::new();
    fx.apply(
        Layer::new()
            .file("a/keep", b"k", 0o644)
            .file("a/gone", b"g", 0o644)
            .file("tree/deep/file", b"t", 0o644),
    )
    .unwrap();
    let stats = fx
        .apply(
            Layer::new()
                .file("a/.wh.gone", b"", 0o644)
                .file(".wh.tree", b"", 0o644)
                .file("a/.wh.never-existed", b"", 0o644),
        )
        .unwrap();
    assert_eq!(stats.whiteouts, 3);
    assert!(fx.exists("a/keep"));
    assert!(!fx.exists("a/gone"));
    assert!(!fx.exists("tree"));
    assert!(
        !fx.exists("a/.wh.gone"),
        "whiteout markers are never extracted"
    );
}

#[test]
fn whiteout_does_not_hide_its_own_layer() {
    let mut fx = Fixture::new();
    fx.apply(Layer::new().file("f", b"lower", 0o644)).unwrap();
    fx.apply(
        Layer::new()
            .file(".wh.f", b"", 0o644) // hides the lower f ...
            .file("f", b"upper", 0o644) // ... and this one replaces it
            .file("g", b"upper", 0o644)
            .file(".wh.g", b"", 0o644), // same layer: no effect
    )
    .unwrap();
    assert_eq!(fx.read("f"), "upper");
    assert_eq!(fx.read("g"), "upper");
}

#[test]
fn opaque_directory_clears_lower_content_in_either_order() {
    for marker_first in [true, false] {
        let mut fx = Fixture::new();
        fx.apply(
            Layer::new()
                .file("d/old", b"o", 0o644)
                .file("d/sub/old", b"o", 0o644)
                .file("other/stays", b"s", 0o644),
        )
        .unwrap();
        let mut layer = Layer::new().dir("d", 0o755);
        if marker_first {
            layer = layer.file("d/.wh..wh..opq", b"", 0o644);
        }
        layer = layer
            .file("d/new", b"n", 0o644)
            .file("d/sub/new", b"n", 0o644);
        if !marker_first {
            layer = layer.file("d/.wh..wh..opq", b"", 0o644);
        }
        let stats = fx.apply(layer).unwrap();
        assert_eq!(stats.opaque_dirs, 1);
        assert!(fx.exists("d/new"), "marker_first={marker_first}");
        assert!(fx.exists("d/sub/new"), "marker_first={marker_first}");
        assert!(!fx.exists("d/old"), "marker_first={marker_first}");
        assert!(!fx.exists("d/sub/old"), "marker_first={marker_first}");
        assert!(fx.exists("other/stays"));
        assert!(!fx.exists("d/.wh..wh..opq"));
    }
}

#[test]
fn entries_replace_each_other_by_type() {
    let mut fx = Fixture::new();
    fx.apply(
        Layer::new()
            .file("was-file", b"f", 0o644)
            .file("was-dir/child", b"c", 0o644)
            .symlink("was-link", "/etc"),
    )
    .unwrap();
    fx.apply(
        Layer::new()
            .dir("was-file", 0o755)
            .file("was-dir", b"now a file", 0o644)
            .dir("was-link", 0o700),
    )
    .unwrap();
    assert!(fs::symlink_metadata(fx.path("was-file")).unwrap().is_dir());
    assert_eq!(fx.read("was-dir"), "now a file");
    assert!(fs::symlink_metadata(fx.path("was-link")).unwrap().is_dir());
}

#[test]
fn symlinks_are_created_as_given() {
    let mut fx = Fixture::new();
    let stats = fx
        .apply(
            Layer::new()
                .file("usr/lib/libc.so", b"elf", 0o755)
                .symlink("lib", "usr/lib")
                .symlink("abs", "/usr/lib/libc.so")
                .symlink("dangling", "../../../../nowhere"),
        )
        .unwrap();
    assert_eq!(stats.symlinks, 3);
    assert_eq!(fs::read_link(fx.path("lib")).unwrap(), Path::new("usr/lib"));
    assert_eq!(
        fs::read_link(fx.path("abs")).unwrap(),
        Path::new("/usr/lib/libc.so")
    );
    assert_eq!(
        fs::read_link(fx.path("dangling")).unwrap(),
        Path::new("../../../../nowhere")
    );
}

#[test]
fn never_writes_through_a_symlink_from_a_lower_layer() {
    let mut fx = Fixture::new();
    let outside = fx.outside();
    fs::write(outside.join("victim"), b"precious").unwrap();
    fx.apply(Layer::new().symlink("evil", outside.to_str().unwrap()))
        .unwrap();

    let reason = assert_rejected(fx.apply(Layer::new().file("evil/pwned", b"x", 0o644)));
    assert!(reason.contains("symlink"), "{reason}");
    assert_rejected(fx.apply(Layer::new().dir("evil/newdir", 0o755)));
    assert_rejected(fx.apply(Layer::new().file("evil/.wh.victim", b"", 0o644)));
    assert_rejected(fx.apply(Layer::new().symlink("evil/link", "/")));

    assert!(!outside.join("pwned").exists());
    assert!(!outside.join("newdir").exists());
    assert!(!outside.join("link").exists());
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"precious");
}

#[test]
fn never_writes_through_a_symlink_from_the_same_layer() {
    let mut fx = Fixture::new();
    let outside = fx.outside();
    assert_rejected(
        fx.apply(
            Layer::new()
                .symlink("escape", "../../../../../../../../")
                .file("escape/tmp/pwned", b"x", 0o644),
        ),
    );
    assert_rejected(
        fx.apply(Layer::new().symlink("out", outside.to_str().unwrap()).file(
            "out/pwned",
            b"x",
            0o644,
        )),
    );
    assert!(!outside.join("pwned").exists());
}

#[test]
fn a_file_entry_replaces_a_symlink_instead_of_following_it() {
    let mut fx = Fixture::new();
    let outside = fx.outside();
    let victim = outside.join("victim");
    fs::write(&victim, b"precious").unwrap();
    fx.apply(
        Layer::new()
            .symlink("etc/passwd", victim.to_str().unwrap())
            .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644),
    )
    .unwrap();
    assert!(fs::symlink_metadata(fx.path("etc/passwd"))
        .unwrap()
        .is_file());
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn dot_dot_traversal_is_rejected_and_absolute_paths_are_made_relative() {
    let mut fx = Fixture::new();
    for name in [
        &b"../escape"[..],
        b"a/../../escape",
        b"/../escape",
        b"./../escape",
    ] {
        let reason =
            assert_rejected(fx.apply(Layer::new().raw(name, EntryType::Regular, b"", b"x")));
        assert!(reason.contains("climbs above"), "{reason}");
    }
    assert!(!fx.root.path().join("escape").exists());

    fx.apply(
        Layer::new()
            .raw(b"/abs/file", EntryType::Regular, b"", b"abs")
            .raw(b"a/../b", EntryType::Regular, b"", b"b")
            .raw(b"./c//d", EntryType::Regular, b"", b"d"),
    )
    .unwrap();
    assert_eq!(fx.read("abs/file"), "abs");
    assert_eq!(fx.read("b"), "b");
    assert_eq!(fx.read("c/d"), "d");
}

#[test]
fn hard_links_stay_inside_and_need_an_existing_target() {
    let mut fx = Fixture::new();
    let stats = fx
        .apply(
            Layer::new()
                .file("bin/busybox", b"elf", 0o755)
                .hardlink("bin/sh", "bin/busybox")
                .hardlink("bin/ls", "/bin/busybox"),
        )
        .unwrap();
    assert_eq!(stats.hardlinks, 2);
    let a = fs::metadata(fx.path("bin/busybox")).unwrap();
    let b = fs::metadata(fx.path("bin/sh")).unwrap();
    let c = fs::metadata(fx.path("bin/ls")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.ino(), c.ino());

    // Targets in a lower layer count as extracted.
    fx.apply(Layer::new().hardlink("bin/cat", "bin/busybox"))
        .unwrap();

    let outside = fx.outside();
    fs::write(outside.join("secret"), b"s").unwrap();
    fx.apply(Layer::new().symlink("out", outside.to_str().unwrap()))
        .unwrap();
    for (target, why) in [
        ("../../outside/secret", "climbs above"),
        ("missing", "does not exist"),
        ("bin", "directory"),
        ("out/secret", "symlink"),
    ] {
        let reason = assert_rejected(fx.apply(Layer::new().raw(
            b"link",
            EntryType::Link,
            target.as_bytes(),
            b"",
        )));
        assert!(reason.contains(why), "{target}: {reason}");
    }
    assert!(!fx.exists("link"));
}

#[test]
fn device_nodes_and_fifos_are_skipped() {
    let mut fx = Fixture::new();
    let stats = fx
        .apply(
            Layer::new()
                .special("dev/null", EntryType::Char)
                .special("dev/sda", EntryType::Block)
                .special("run/fifo", EntryType::Fifo)
                .dir("dev/pts", 0o755),
        )
        .unwrap();
    assert_eq!(stats.skipped_devices, 3);
    assert!(!fx.exists("dev/null"));
    assert!(!fx.exists("dev/sda"));
    assert!(!fx.exists("run/fifo"));
    assert!(fx.exists("dev/pts"));
}

#[test]
fn limits_are_enforced() {
    let mut fx = Fixture::new();
    let small = UnpackLimits {
        max_entry_bytes: 10,
        ..UnpackLimits::default()
    };
    match fx.apply_with(Layer::new().file("big", &[7; 11], 0o644), &small) {
        Err(OciError::EntryTooLarge {
            size: 11,
            limit: 10,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(!fx.exists("big"));
    fx.apply_with(Layer::new().file("ok", &[7; 10], 0o644), &small)
        .unwrap();

    let few = UnpackLimits {
        max_entries: 2,
        ..UnpackLimits::default()
    };
    let three = Layer::new()
        .file("1", b"", 0o644)
        .file("2", b"", 0o644)
        .file("3", b"", 0o644);
    match fx.apply_with(three, &few) {
        Err(OciError::UnpackLimit {
            limit: "max_entries",
            ..
        }) => {}
        other => panic!("{other:?}"),
    }

    let tiny_total = UnpackLimits {
        max_total_bytes: 4096,
        ..UnpackLimits::default()
    };
    match fx.apply_with(Layer::new().file("f", &[1; 8192], 0o644), &tiny_total) {
        Err(OciError::UnpackLimit {
            limit: "max_total_bytes",
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn oversized_extension_headers_are_refused_before_buffering() {
    let mut fx = Fixture::new();
    let mut h = header(EntryType::GNULongName, 0o644, MAX_EXTENSION_BYTES + 1);
    h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    h.set_cksum();
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend(std::iter::repeat_n(
        b'a',
        (MAX_EXTENSION_BYTES + 512) as usize,
    ));
    bytes.extend([0; 1024]);
    let blob = fx.blob(&bytes);
    let err = apply_layer(
        &blob,
        media_types::OCI_LAYER_TAR,
        &sha256_digest(&bytes),
        &fx.dest,
        &UnpackLimits::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("extension header"), "{err}");
}

#[test]
fn long_names_and_pax_paths_are_honoured() {
    let mut fx = Fixture::new();
    let long = format!("{}/file", "d".repeat(150));
    fx.apply(
        Layer::new()
            .file(&long, b"long", 0o644)
            .pax(&[("path", b"pax/named/file")])
            .file("ignored", b"pax", 0o644),
    )
    .unwrap();
    assert_eq!(fx.read(&long), "long");
    assert_eq!(fx.read("pax/named/file"), "pax");
    assert!(!fx.exists("ignored"));
}

#[test]
fn diff_id_mismatch_is_rejected() {
    let mut fx = Fixture::new();
    let bytes = Layer::new().file("f", b"x", 0o644).bytes();
    let blob = fx.blob(&bytes);
    let wrong = sha256_digest(b"something else");
    match apply_layer(
        &blob,
        media_types::OCI_LAYER_TAR,
        &wrong,
        &fx.dest,
        &UnpackLimits::default(),
    ) {
        Err(OciError::DigestMismatch {
            expected, actual, ..
        }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, sha256_digest(&bytes));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn trailing_bytes_after_the_archive_count_towards_the_diff_id() {
    let mut fx = Fixture::new();
    let mut bytes = Layer::new().file("f", b"x", 0o644).bytes();
    bytes.extend([0u8; 10240]);
    let blob = fx.blob(&bytes);
    let stats = apply_layer(
        &blob,
        media_types::OCI_LAYER_TAR,
        &sha256_digest(&bytes),
        &fx.dest,
        &UnpackLimits::default(),
    )
    .unwrap();
    assert_eq!(stats.uncompressed_bytes, bytes.len() as u64);
}

#[test]
fn gzip_layers_are_decompressed_and_zstd_is_refused() {
    let mut fx = Fixture::new();
    let tar = Layer::new().file("hello", b"gz", 0o644).bytes();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let blob = fx.blob(&gz.finish().unwrap());
    let diff_id = sha256_digest(&tar);
    for media_type in [media_types::OCI_LAYER_GZIP, media_types::DOCKER_LAYER_GZIP] {
        apply_layer(
            &blob,
            media_type,
            &diff_id,
            &fx.dest,
            &UnpackLimits::default(),
        )
        .unwrap();
        assert_eq!(fx.read("hello"), "gz");
    }
    // A gzip blob declared as plain tar is not a tar stream.
    assert!(matches!(
        apply_layer(
            &blob,
            media_types::OCI_LAYER_TAR,
            &diff_id,
            &fx.dest,
            &UnpackLimits::default()
        ),
        Err(OciError::LayerRead { .. })
    ));
    assert!(matches!(
        apply_layer(
            &blob,
            media_types::OCI_LAYER_ZSTD,
            &diff_id,
            &fx.dest,
            &UnpackLimits::default()
        ),
        Err(OciError::UnsupportedMediaType { .. })
    ));
}

#[test]
fn truncated_layer_is_an_error() {
    let mut fx = Fixture::new();
    let bytes = Layer::new().file("f", &[1; 4096], 0o644).bytes();
    let cut = &bytes[..1024];
    let blob = fx.blob(cut);
    let err = apply_layer(
        &blob,
        media_types::OCI_LAYER_TAR,
        &sha256_digest(cut),
        &fx.dest,
        &UnpackLimits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, OciError::LayerRead { .. }), "{err:?}");
}

#[test]
fn destination_must_be_a_real_directory() {
    let fx = Fixture::new();
    let link = fx.root.path().join("link");
    std::os::unix::fs::symlink(&fx.dest, &link).unwrap();
    let blob = fx.root.path().join("empty");
    fs::write(&blob, b"").unwrap();
    let err = apply_layer(
        &blob,
        media_types::OCI_LAYER_TAR,
        &sha256_digest(b""),
        &link,
        &UnpackLimits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, OciError::DestNotDirectory { .. }), "{err:?}");
}

#[test]
fn normalize_table() {
    let cases: &[(&str, Option<&str>)] = &[
        ("a/b", Some("a/b")),
        ("/a/b", Some("a/b")),
        ("./a/./b/", Some("a/b")),
        ("a/../b", Some("b")),
        ("a/..", Some("")),
        ("..", None),
        ("a/../../b", None),
        ("/..", None),
    ];
    for (input, expected) in cases {
        assert_eq!(
            normalize(Path::new(input)),
            expected.map(PathBuf::from),
            "{input}"
        );
    }
}
