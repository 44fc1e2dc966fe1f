//! Deterministic OCI images built in memory, and pushing them to a registry.
//!
//! Images are built in Rust rather than with `umoci insert`, which once wrote a truncated layer for a
//! large tree (DESIGN, "Facts about these machines"); every layer is re-read after building to check
//! that it is complete. Headers are fixed (mtime 0, uid/gid 0, GNU format, gzip mtime 0) so the same
//! inputs always give the same digests: tests can compare digests across runs and processes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use flate2::{Compression, GzBuilder};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Media type of the layers this builder writes.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of the image config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of the image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const DEFAULT_DIR_MODE: u32 = 0o755;

#[derive(Clone, Debug)]
enum Entry {
    File {
        path: String,
        contents: Vec<u8>,
        mode: u32,
    },
    Dir {
        path: String,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    Whiteout {
        path: String,
    },
    Opaque {
        dir: String,
    },
}

/// Builds a multi-layer OCI image in memory.
///
/// Paths may be written with or without a leading `/`; they are stored relative (`etc/passwd`), with
/// `..` and whiteout-like names (`.wh.*`) refused. Mistakes are reported by [`ImageBuilder::build`],
/// since the chained methods cannot fail.
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    layers: Vec<Vec<Entry>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    user: Option<String>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn strings(argv: &[&str]) -> Vec<String> {
    argv.iter().map(|s| s.to_string()).collect()
}

impl ImageBuilder {
    /// An image with one empty layer and no config.
    pub fn new() -> Self {
        ImageBuilder {
            layers: vec![Vec::new()],
            entrypoint: None,
            cmd: None,
            env: Vec::new(),
            workdir: None,
            user: None,
        }
    }

    fn push(mut self, entry: Entry) -> Self {
        // `layers` is never empty: `new` starts with one and `new_layer` only adds.
        if let Some(layer) = self.layers.last_mut() {
            layer.push(entry);
        }
        self
    }

    /// A regular file; missing parent directories are added to the layer automatically (with the
    /// mode given to [`ImageBuilder::dir`] for them in this or an earlier layer, else 0755).
    pub fn file(self, path_in_image: &str, contents: Vec<u8>, mode: u32) -> Self {
        self.push(Entry::File {
            path: path_in_image.to_string(),
            contents,
            mode,
        })
    }

    /// A directory with an explicit mode (e.g. 0o1777 for /tmp).
    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.push(Entry::Dir {
            path: path.to_string(),
            mode,
        })
    }

    /// A symbolic link at `path` pointing to `target` (stored verbatim, absolute or relative).
    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.push(Entry::Symlink {
            path: path.to_string(),
            target: target.to_string(),
        })
    }

    /// Starts a new layer: later entries go into it.
    pub fn new_layer(mut self) -> Self {
        self.layers.push(Vec::new());
        self
    }

    /// Deletes `path` (from lower layers) by adding `.wh.<name>` next to it in the current layer.
    pub fn whiteout(self, path: &str) -> Self {
        self.push(Entry::Whiteout {
            path: path.to_string(),
        })
    }

    /// Hides everything lower layers put in `dir` by adding `<dir>/.wh..wh..opq`.
    pub fn opaque_dir(self, dir: &str) -> Self {
        self.push(Entry::Opaque {
            dir: dir.to_string(),
        })
    }

    pub fn entrypoint(mut self, argv: &[&str]) -> Self {
        self.entrypoint = Some(strings(argv));
        self
    }

    pub fn cmd(mut self, argv: &[&str]) -> Self {
        self.cmd = Some(strings(argv));
        self
    }

    /// Sets `key=value` in the config's Env; setting a key again replaces its value in place.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        match self.env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_string(),
            None => self.env.push((key.to_string(), value.to_string())),
        }
        self
    }

    pub fn workdir(mut self, dir: &str) -> Self {
        self.workdir = Some(dir.to_string());
        self
    }

    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
    }

    /// Builds gzip-compressed layers (`application/vnd.oci.image.layer.v1.tar+gzip`), the OCI config
    /// (amd64/linux, `config{Entrypoint,Cmd,Env,WorkingDir,User}`, `rootfs.diff_ids` = sha256 of each
    /// uncompressed tar) and the OCI image manifest (schemaVersion 2). Every layer is decompressed and
    /// re-read before returning, so a truncated or inconsistent layer is an error here, not in a test
    /// three crates away.
    pub fn build(self) -> Result<BuiltImage> {
        let mut dir_modes = HashMap::new();
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, entries) in self.layers.iter().enumerate() {
            let planned =
                plan_layer(entries, &mut dir_modes).with_context(|| format!("layer {i}"))?;
            let tar = write_tar(&planned).with_context(|| format!("writing layer {i}"))?;
            let diff_id = sha256_digest(&tar);
            let blob = gzip(&tar)?;
            verify_layer(&blob, &diff_id, &planned)
                .with_context(|| format!("verifying layer {i}"))?;
            layers.push(Layer {
                digest: sha256_digest(&blob),
                blob,
                diff_id,
                media_type: LAYER_MEDIA_TYPE.to_string(),
            });
        }

        // Structs (not json!) so the key order, and with it the digest, cannot change with
        // serde_json's `preserve_order` feature being unified in by some other crate.
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let config = serde_json::to_vec(&OciConfig {
            architecture: "amd64",
            os: "linux",
            config: ExecConfig {
                entrypoint: self.entrypoint.as_deref(),
                cmd: self.cmd.as_deref(),
                env,
                working_dir: self.workdir.as_deref(),
                user: self.user.as_deref(),
            },
            rootfs: RootFs {
                kind: "layers",
                diff_ids: layers.iter().map(|l| l.diff_id.as_str()).collect(),
            },
        })?;
        let config_digest = sha256_digest(&config);
        let manifest = serde_json::to_vec(&Manifest {
            schema_version: 2,
            media_type: MANIFEST_MEDIA_TYPE,
            config: Descriptor {
                media_type: CONFIG_MEDIA_TYPE,
                digest: &config_digest,
                size: config.len() as u64,
            },
            layers: layers
                .iter()
                .map(|l| Descriptor {
                    media_type: &l.media_type,
                    digest: &l.digest,
                    size: l.blob.len() as u64,
                })
                .collect(),
        })?;
        Ok(BuiltImage {
            manifest_digest: sha256_digest(&manifest),
            manifest,
            config_digest,
            config,
            layers,
        })
    }
}

/// A built image: every blob, ready to push or to write into an OCI layout.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub manifest: Vec<u8>,
    /// `sha256:<hex>`
    pub manifest_digest: String,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub layers: Vec<Layer>,
}

/// One layer blob.
#[derive(Clone, Debug)]
pub struct Layer {
    /// The gzip-compressed tar.
    pub blob: Vec<u8>,
    /// Digest of `blob`.
    pub digest: String,
    /// Digest of the uncompressed tar (what the config's rootfs lists).
    pub diff_id: String,
    pub media_type: String,
}

#[derive(Serialize)]
struct OciConfig<'a> {
    architecture: &'a str,
    os: &'a str,
    config: ExecConfig<'a>,
    rootfs: RootFs<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ExecConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    entrypoint: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmd: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    env: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    working_dir: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    diff_ids: Vec<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<'a> {
    schema_version: u32,
    media_type: &'a str,
    config: Descriptor<'a>,
    layers: Vec<Descriptor<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor<'a> {
    media_type: &'a str,
    digest: &'a str,
    size: u64,
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One tar entry as it will be written (and as verification expects to read it back).
#[derive(Debug)]
struct Planned<'a> {
    /// Relative path; directories end with `/` as GNU tar writes them.
    path: String,
    kind: Kind<'a>,
}

#[derive(Debug)]
enum Kind<'a> {
    Dir { mode: u32 },
    File { contents: &'a [u8], mode: u32 },
    Symlink { target: &'a str },
}

/// Splits a path into its components, dropping empty and `.` ones; refuses `..` (it would escape
/// the rootfs) and `.wh.*` names (they would be read as whiteouts; use the whiteout methods).
fn components(path: &str) -> Result<Vec<&str>> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => bail!("path {path:?} contains `..`"),
            c if c.starts_with(WHITEOUT_PREFIX) => {
                bail!("path {path:?}: `.wh.` names are reserved for whiteouts")
            }
            c if c.contains('\0') => bail!("path {path:?} contains NUL"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Like [`components`], but the path must name something below the root.
fn non_root(path: &str) -> Result<Vec<&str>> {
    let c = components(path)?;
    ensure!(!c.is_empty(), "path {path:?} names the image root");
    Ok(c)
}

fn check_mode(path: &str, mode: u32) -> Result<()> {
    ensure!(
        mode <= 0o7777,
        "{path:?}: mode {mode:#o} has bits beyond 0o7777"
    );
    Ok(())
}

/// Orders a layer's entries into tar entries, adding missing parent directories before their
/// children. `dir_modes` carries explicit directory modes across layers: an upper layer's
/// directory entry replaces the lower one's metadata when layers are applied, so an automatically
/// added `tmp/` must keep the 1777 that a lower layer gave it.
fn plan_layer<'a>(
    entries: &'a [Entry],
    dir_modes: &mut HashMap<String, u32>,
) -> Result<Vec<Planned<'a>>> {
    // Explicit modes first, so that a parent created for an earlier entry already gets its mode.
    for entry in entries {
        if let Entry::Dir { path, mode } = entry {
            check_mode(path, *mode)?;
            dir_modes.insert(non_root(path)?.join("/"), *mode);
        }
    }

    struct Plan<'a, 'm> {
        out: Vec<Planned<'a>>,
        /// Paths (without trailing slash) already in this layer, and whether they are directories.
        seen: HashMap<String, bool>,
        dir_modes: &'m HashMap<String, u32>,
    }
    impl<'a> Plan<'a, '_> {
        fn dirs(&mut self, comps: &[&str]) -> Result<()> {
            for i in 1..=comps.len() {
                let key = comps[..i].join("/");
                match self.seen.get(&key) {
                    Some(true) => {}
                    Some(false) => bail!("{key:?} is used as a directory but is not one"),
                    None => {
                        let mode = self
                            .dir_modes
                            .get(&key)
                            .copied()
                            .unwrap_or(DEFAULT_DIR_MODE);
                        self.out.push(Planned {
                            path: format!("{key}/"),
                            kind: Kind::Dir { mode },
                        });
                        self.seen.insert(key, true);
                    }
                }
            }
            Ok(())
        }

        fn leaf(&mut self, key: String, kind: Kind<'a>) -> Result<()> {
            ensure!(
                !self.seen.contains_key(&key),
                "{key:?} is added twice in one layer"
            );
            self.seen.insert(key.clone(), false);
            self.out.push(Planned { path: key, kind });
            Ok(())
        }
    }

    let mut plan = Plan {
        out: Vec::new(),
        seen: HashMap::new(),
        dir_modes,
    };
    for entry in entries {
        match entry {
            Entry::Dir { path, .. } => plan.dirs(&non_root(path)?)?,
            Entry::File {
                path,
                contents,
                mode,
            } => {
                check_mode(path, *mode)?;
                let c = non_root(path)?;
                plan.dirs(&c[..c.len() - 1])?;
                plan.leaf(
                    c.join("/"),
                    Kind::File {
                        contents,
                        mode: *mode,
                    },
                )?;
            }
            Entry::Symlink { path, target } => {
                let c = non_root(path)?;
                ensure!(
                    !target.is_empty() && !target.contains('\0'),
                    "bad symlink target"
                );
                plan.dirs(&c[..c.len() - 1])?;
                plan.leaf(c.join("/"), Kind::Symlink { target })?;
            }
            Entry::Whiteout { path } => {
                let c = non_root(path)?;
                let (name, parent) = c.split_last().ok_or_else(|| anyhow!("empty path"))?;
                plan.dirs(parent)?;
                let marker = format!("{WHITEOUT_PREFIX}{name}");
                let key = parent
                    .iter()
                    .copied()
                    .chain([marker.as_str()])
                    .collect::<Vec<_>>();
                plan.leaf(
                    key.join("/"),
                    Kind::File {
                        contents: &[],
                        mode: 0o644,
                    },
                )?;
            }
            Entry::Opaque { dir } => {
                // The root may be opaque too: then the marker sits at the top of the layer.
                let c = components(dir)?;
                plan.dirs(&c)?;
                let key = c.iter().copied().chain([OPAQUE_MARKER]).collect::<Vec<_>>();
                plan.leaf(
                    key.join("/"),
                    Kind::File {
                        contents: &[],
                        mode: 0o644,
                    },
                )?;
            }
        }
    }
    Ok(plan.out)
}

fn write_tar(entries: &[Planned<'_>]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        // GNU headers: long names and link targets go into GNU extension records, which every OCI
        // tool reads. Everything that could vary between runs is fixed.
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match entry.kind {
            Kind::Dir { mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(mode);
                h.set_size(0);
                builder.append_data(&mut h, &entry.path, std::io::empty())?;
            }
            Kind::File { contents, mode } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(mode);
                h.set_size(contents.len() as u64);
                builder.append_data(&mut h, &entry.path, contents)?;
            }
            Kind::Symlink { target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                builder.append_link(&mut h, &entry.path, target)?;
            }
        }
    }
    // into_inner writes the two zero blocks that end the archive.
    Ok(builder.into_inner()?)
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    // mtime 0 and OS "unknown" keep the gzip header independent of time and host.
    let mut enc = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::with_capacity(data.len() / 2), Compression::default());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

/// Decompresses the blob, checks it hashes to `diff_id`, and reads the tar back entry by entry.
fn verify_layer(blob: &[u8], diff_id: &str, expected: &[Planned<'_>]) -> Result<()> {
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(blob)
        .read_to_end(&mut tar)
        .context("gunzip")?;
    ensure!(
        sha256_digest(&tar) == diff_id,
        "decompressed layer does not match its diff_id"
    );
    verify_tar(&tar, expected)
}

/// Every expected entry must be there, in order, with its full contents, and nothing else: a
/// truncated archive either fails to parse, comes up short on data, or misses entries.
fn verify_tar(tar: &[u8], expected: &[Planned<'_>]) -> Result<()> {
    ensure!(
        tar.len().is_multiple_of(512),
        "tar length {} is not a multiple of 512",
        tar.len()
    );
    let mut archive = tar::Archive::new(tar);
    let mut count = 0;
    for (i, entry) in archive.entries()?.enumerate() {
        let mut entry = entry.with_context(|| format!("reading entry {i}"))?;
        let want = expected
            .get(i)
            .ok_or_else(|| anyhow!("unexpected extra entry {i}"))?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        ensure!(
            path == want.path,
            "entry {i} is {path:?}, expected {:?}",
            want.path
        );
        let header = entry.header().clone();
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .with_context(|| format!("reading {path:?}"))?;
        let mode = header.mode()?;
        match want.kind {
            Kind::Dir { mode: m } => {
                ensure!(
                    header.entry_type().is_dir() && mode == m,
                    "{path:?}: bad directory entry"
                );
            }
            Kind::File { contents, mode: m } => {
                ensure!(
                    header.entry_type().is_file() && mode == m,
                    "{path:?}: bad file entry"
                );
                ensure!(
                    data == contents,
                    "{path:?}: {} bytes read back, {} written",
                    data.len(),
                    contents.len()
                );
            }
            Kind::Symlink { target } => {
                let link = entry.link_name_bytes().unwrap_or_default();
                ensure!(
                    header.entry_type().is_symlink() && *link == *target.as_bytes(),
                    "{path:?}: bad symlink entry"
                );
            }
        }
        count += 1;
    }
    ensure!(
        count == expected.len(),
        "layer has {count} entries, expected {}",
        expected.len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Pushing

impl BuiltImage {
    /// Pushes blobs (skipping ones the registry already has: `HEAD /v2/<repo>/blobs/<digest>`), then
    /// the manifest under `tag`, with the plain distribution API over HTTP: `POST
    /// /v2/<repo>/blobs/uploads/` then `PUT <location>&digest=...` (monolithic upload), then `PUT
    /// /v2/<repo>/manifests/<tag>` with the OCI manifest media type. Returns the manifest digest,
    /// after checking that the registry's `Docker-Content-Digest` agrees with it.
    ///
    /// `registry` is `host:port` (plain HTTP); a full `http(s)://` base URL is accepted as well.
    pub async fn push(&self, registry: &str, repo: &str, tag: &str) -> Result<String> {
        let base = if registry.contains("://") {
            registry.trim_end_matches('/').to_string()
        } else {
            format!("http://{registry}")
        };
        let base = reqwest::Url::parse(&format!("{base}/"))
            .with_context(|| format!("bad registry {registry:?}"))?;
        // No proxy: a developer's HTTP_PROXY must not capture requests to a loopback registry.
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .build()?;

        let blobs = std::iter::once((&self.config_digest, &self.config))
            .chain(self.layers.iter().map(|l| (&l.digest, &l.blob)));
        for (digest, bytes) in blobs {
            push_blob(&client, &base, repo, digest, bytes)
                .await
                .with_context(|| format!("pushing blob {digest} to {registry}/{repo}"))?;
        }

        let url = base.join(&format!("v2/{repo}/manifests/{tag}"))?;
        let resp = client
            .put(url)
            .header(reqwest::header::CONTENT_TYPE, MANIFEST_MEDIA_TYPE)
            .body(self.manifest.clone())
            .send()
            .await
            .with_context(|| format!("pushing manifest to {registry}/{repo}:{tag}"))?;
        if resp.status() != reqwest::StatusCode::CREATED {
            return Err(failure(resp, "manifest PUT").await);
        }
        check_digest(&resp, &self.manifest_digest)?;
        Ok(self.manifest_digest.clone())
    }
}

async fn push_blob(
    client: &reqwest::Client,
    base: &reqwest::Url,
    repo: &str,
    digest: &str,
    bytes: &[u8],
) -> Result<()> {
    let head = client
        .head(base.join(&format!("v2/{repo}/blobs/{digest}"))?)
        .send()
        .await?;
    match head.status() {
        reqwest::StatusCode::OK => return Ok(()),
        reqwest::StatusCode::NOT_FOUND => {}
        _ => return Err(failure(head, "blob HEAD").await),
    }

    let start = client
        .post(base.join(&format!("v2/{repo}/blobs/uploads/"))?)
        .send()
        .await?;
    if start.status() != reqwest::StatusCode::ACCEPTED {
        return Err(failure(start, "upload POST").await);
    }
    let location = start
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| anyhow!("upload POST answered without a Location"))?;
    // Location may be absolute or relative to the registry, and usually has a query already.
    let mut url = base
        .join(location)
        .with_context(|| format!("bad Location {location:?}"))?;
    url.query_pairs_mut().append_pair("digest", digest);

    let put = client
        .put(url)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await?;
    if put.status() != reqwest::StatusCode::CREATED {
        return Err(failure(put, "upload PUT").await);
    }
    check_digest(&put, digest)
}

fn check_digest(resp: &reqwest::Response, want: &str) -> Result<()> {
    let got = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| anyhow!("registry sent no Docker-Content-Digest"))?;
    ensure!(
        got == want,
        "registry computed digest {got}, expected {want}"
    );
    Ok(())
}

async fn failure(resp: reqwest::Response, what: &str) -> anyhow::Error {
    let status = resp.status();
    let body: String = resp
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(2000)
        .collect();
    anyhow!("{what}: registry answered {status}: {body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths<'p>(planned: &'p [Planned<'_>]) -> Vec<&'p str> {
        planned.iter().map(|p| p.path.as_str()).collect()
    }

    #[test]
    fn parents_are_created_once_and_keep_explicit_modes() {
        let entries = vec![
            Entry::File {
                path: "/tmp/a/x".into(),
                contents: b"x".to_vec(),
                mode: 0o600,
            },
            Entry::Dir {
                path: "tmp".into(),
                mode: 0o1777,
            },
            Entry::Symlink {
                path: "/tmp/a/l".into(),
                target: "x".into(),
            },
        ];
        let mut modes = HashMap::new();
        let planned = plan_layer(&entries, &mut modes).unwrap();
        assert_eq!(paths(&planned), ["tmp/", "tmp/a/", "tmp/a/x", "tmp/a/l"]);
        assert!(matches!(planned[0].kind, Kind::Dir { mode: 0o1777 }));
        assert!(matches!(planned[1].kind, Kind::Dir { mode: 0o755 }));

        // A later layer touching /tmp keeps the sticky mode on the directory entry it adds.
        let upper = vec![Entry::Whiteout {
            path: "/tmp/a".into(),
        }];
        let planned = plan_layer(&upper, &mut modes).unwrap();
        assert_eq!(paths(&planned), ["tmp/", "tmp/.wh.a"]);
        assert!(matches!(planned[0].kind, Kind::Dir { mode: 0o1777 }));
    }

    #[test]
    fn opaque_markers() {
        let entries = vec![
            Entry::Opaque {
                dir: "/var/lib/".into(),
            },
            Entry::Opaque { dir: "/".into() },
        ];
        let planned = plan_layer(&entries, &mut HashMap::new()).unwrap();
        assert_eq!(
            paths(&planned),
            ["var/", "var/lib/", "var/lib/.wh..wh..opq", ".wh..wh..opq"]
        );
    }

    #[test]
    fn bad_paths_are_refused() {
        let err = |e: Entry| {
            plan_layer(&[e], &mut HashMap::new())
                .unwrap_err()
                .to_string()
        };
        assert!(err(Entry::Dir {
            path: "/a/../b".into(),
            mode: 0o755
        })
        .contains(".."));
        assert!(err(Entry::File {
            path: "/".into(),
            contents: vec![],
            mode: 0o644
        })
        .contains("root"));
        assert!(err(Entry::File {
            path: "/a/.wh.b".into(),
            contents: vec![],
            mode: 0o644
        })
        .contains("reserved"));
        assert!(err(Entry::File {
            path: "/a".into(),
            contents: vec![],
            mode: 0o10644
        })
        .contains("mode"));
        let dup = [
            Entry::File {
                path: "/a".into(),
                contents: vec![],
                mode: 0o644,
            },
            Entry::Symlink {
                path: "a".into(),
                target: "b".into(),
            },
        ];
        assert!(plan_layer(&dup, &mut HashMap::new()).is_err());
        let not_dir = [
            Entry::File {
                path: "/a".into(),
                contents: vec![],
                mode: 0o644,
            },
            Entry::File {
                path: "/a/b".into(),
                contents: vec![],
                mode: 0o644,
            },
        ];
        assert!(plan_layer(&not_dir, &mut HashMap::new()).is_err());
        assert!(ImageBuilder::new()
            .file("../x", vec![], 0o644)
            .build()
            .is_err());
    }

    #[test]
    fn verification_catches_truncated_layers() {
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let long = format!("/{}/file", "d".repeat(150)); // exercises GNU long names
        let entries = vec![
            Entry::File {
                path: "/a".into(),
                contents: b"hello".to_vec(),
                mode: 0o644,
            },
            Entry::File {
                path: long,
                contents: big,
                mode: 0o755,
            },
            Entry::Symlink {
                path: "/l".into(),
                target: format!("/{}", "t".repeat(120)),
            },
        ];
        let planned = plan_layer(&entries, &mut HashMap::new()).unwrap();
        let tar = write_tar(&planned).unwrap();
        verify_tar(&tar, &planned).unwrap();
        // Cut anywhere on a block boundary (as a broken writer would) and verification must fail.
        for cut in (0..tar.len() - 1024).step_by(512) {
            assert!(
                verify_tar(&tar[..cut], &planned).is_err(),
                "cut at {cut} not detected"
            );
        }
        // A blob whose content does not match its diff_id is refused too.
        let blob = gzip(&tar).unwrap();
        assert!(verify_layer(&blob, &sha256_digest(b"other"), &planned).is_err());
        assert!(verify_layer(&blob[..blob.len() / 2], &sha256_digest(&tar), &planned).is_err());
    }

    #[test]
    fn config_and_manifest_shape() {
        let img = ImageBuilder::new()
            .file("/bin/app", b"#!".to_vec(), 0o755)
            .new_layer()
            .whiteout("/bin/app")
            .entrypoint(&["/bin/app", "serve"])
            .cmd(&["--x"])
            .env("A", "1")
            .env("B", "2")
            .env("A", "3")
            .workdir("/srv")
            .user("1000:1000")
            .build()
            .unwrap();
        let config: serde_json::Value = serde_json::from_slice(&img.config).unwrap();
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(["/bin/app", "serve"])
        );
        assert_eq!(config["config"]["Cmd"], serde_json::json!(["--x"]));
        assert_eq!(config["config"]["Env"], serde_json::json!(["A=3", "B=2"]));
        assert_eq!(config["config"]["WorkingDir"], "/srv");
        assert_eq!(config["config"]["User"], "1000:1000");
        assert_eq!(config["rootfs"]["type"], "layers");
        let diff_ids: Vec<_> = img.layers.iter().map(|l| l.diff_id.clone()).collect();
        assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!(diff_ids));

        let manifest: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["mediaType"], MANIFEST_MEDIA_TYPE);
        assert_eq!(manifest["config"]["digest"], img.config_digest);
        assert_eq!(manifest["config"]["size"], img.config.len());
        assert_eq!(manifest["layers"][1]["digest"], img.layers[1].digest);
        assert_eq!(manifest["layers"][1]["mediaType"], LAYER_MEDIA_TYPE);
        assert_eq!(img.manifest_digest, sha256_digest(&img.manifest));
        assert_eq!(img.layers[0].digest, sha256_digest(&img.layers[0].blob));
    }
}
