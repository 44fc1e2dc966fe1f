//! Applying image layers (tar streams, optionally gzipped) onto a directory, with OCI whiteout
//! semantics. Layers are untrusted input: a tenant writes them.
//!
//! How an entry is applied:
//! 1. Its path (from the header, a GNU long name or a PAX `path`) is normalised lexically:
//!    leading `/` dropped, `.` dropped, `..` resolved, and rejected if it would climb above the
//!    root.
//! 2. Every directory on the way to it is checked with `lstat`: a symlink there is an error (we
//!    never write *through* a link, so a layer cannot reach outside the destination), a missing
//!    directory is created. Nothing else writes into the destination while a layer is applied, so
//!    the check cannot be raced.
//! 3. Whatever exists at the path itself is removed (a directory is kept when the entry is a
//!    directory), and the entry is created with `O_CREAT|O_EXCL|O_NOFOLLOW`, so a symlink planted
//!    at the final component is replaced, never followed.
//! 4. Owner, mode (setuid/setgid only as given, and dropped if the owner could not be set) and
//!    mtime are set through the open file. Directories get their mode and mtime after the whole
//!    layer is applied, because creating their children changes their mtime (and a read-only
//!    mode must not get in the way of creating them).
//!
//! Whiteouts hide content of *lower* layers only (OCI image spec): `.wh.<name>` removes `<name>`
//! and `.wh..wh..opq` removes everything in its directory that this layer does not itself
//! contain, wherever in the stream the marker appears.
//!
//! The digest of the whole uncompressed stream, end-of-archive padding included, must equal the
//! layer's `diff_id`; it is checked after the entries are applied, so on any error the
//! destination holds a partial result and the caller must discard it.
//!
//! Memory is bounded: file data is streamed, GNU long names and PAX headers are capped at
//! [`MAX_EXTENSION_BYTES`], and the tar crate is used in raw mode so it never buffers an
//! extension header itself.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, FileTimes, OpenOptions, Permissions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use flate2::read::MultiGzDecoder;

use crate::config::{layer_compression, Compression};
use crate::digest::{is_valid_digest, DigestHasher};
use crate::OciError;

/// Largest GNU long name / long link or PAX extended header accepted.
pub const MAX_EXTENSION_BYTES: u64 = 1024 * 1024;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Names starting with this are whiteout-metadata (e.g. aufs' `.wh..wh.plnk`), never content.
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";

/// Latest mtime applied (9999-12-31); later values are clamped so the conversion cannot fail.
const MAX_MTIME: u64 = 253_402_300_799;

/// Bounds on what one layer may make the unpacker do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Largest single file.
    pub max_entry_bytes: u64,
    /// Largest uncompressed tar stream (headers and padding included).
    pub max_total_bytes: u64,
    /// Most tar headers (extension headers included).
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_entry_bytes: 8 << 30,
            max_total_bytes: 32 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// What applying a layer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar headers read, extension headers included.
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// `.wh.<name>` entries.
    pub whiteouts: u64,
    /// `.wh..wh..opq` entries.
    pub opaque_dirs: u64,
    /// Character and block devices and fifos, which are never created.
    pub skipped_devices: u64,
    /// File content bytes written.
    pub bytes_written: u64,
    /// Size of the uncompressed tar stream.
    pub uncompressed_bytes: u64,
    /// Entries whose owner could not be set (only when not running as root); their setuid and
    /// setgid bits were dropped.
    pub ownership_skipped: u64,
}

/// Applies one layer (gzip or uncompressed tar, per media type) onto `dest` with OCI whiteout
/// semantics (`.wh.<name>` deletes, `.wh..wh..opq` clears the directory's lower content),
/// verifying the sha256 of the uncompressed stream equals `diff_id`. Returns stats.
///
/// Synchronous and potentially long: call it from `spawn_blocking`. On error `dest` is left
/// partially updated.
pub fn apply_layer(
    blob: &Path,
    media_type: &str,
    diff_id: &str,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats, OciError> {
    let compression =
        layer_compression(media_type).ok_or_else(|| OciError::UnsupportedMediaType {
            what: format!("layer {}", blob.display()),
            media_type: media_type.to_owned(),
        })?;
    if !is_valid_digest(diff_id) {
        return Err(OciError::InvalidDigest {
            digest: diff_id.to_owned(),
        });
    }
    match fs::symlink_metadata(dest) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(OciError::DestNotDirectory {
                path: dest.to_owned(),
            })
        }
        Err(source) => {
            return Err(OciError::DestInspect {
                path: dest.to_owned(),
                source,
            })
        }
    }

    let file = File::open(blob).map_err(|source| OciError::LayerOpen {
        path: blob.to_owned(),
        source,
    })?;
    let buffered = BufReader::with_capacity(256 * 1024, file);
    let stream: Box<dyn Read> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(MultiGzDecoder::new(buffered)),
    };
    let over_limit = Rc::new(Cell::new(false));
    let reader = HashingReader {
        inner: stream,
        hasher: DigestHasher::default(),
        limit: limits.max_total_bytes,
        over_limit: over_limit.clone(),
    };
    let mut archive = tar::Archive::new(reader);
    let mut unpacker = Unpacker {
        blob,
        dest,
        limits,
        over_limit,
        stats: UnpackStats::default(),
        pending: Pending::default(),
        current: PathBuf::new(),
        created: HashSet::new(),
        verified_parent: None,
        dirs: Vec::new(),
        buf: vec![0; 128 * 1024],
    };
    let entries = archive
        .entries()
        .map_err(|e| unpacker.read_error(e))?
        .raw(true);
    for entry in entries {
        let entry = entry.map_err(|e| unpacker.read_error(e))?;
        unpacker.entry(entry)?;
    }
    if unpacker.pending.is_set() {
        return Err(OciError::LayerRead {
            path: blob.to_owned(),
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "extension header at the end of the layer describes no entry",
            ),
        });
    }
    unpacker.finish()?;

    // The digest covers the end-of-archive blocks and any padding after them too.
    let mut reader = archive.into_inner();
    io::copy(&mut reader, &mut io::sink()).map_err(|e| unpacker.read_error(e))?;
    let mut stats = unpacker.stats;
    stats.uncompressed_bytes = reader.hasher.len();
    let actual = reader.hasher.finish();
    if actual != diff_id {
        return Err(OciError::DigestMismatch {
            what: format!("uncompressed layer {}", blob.display()),
            expected: diff_id.to_owned(),
            actual,
        });
    }
    tracing::debug!(layer = %blob.display(), ?stats, "applied layer");
    Ok(stats)
}

/// Hashes everything read through it and stops the stream at the size limit.
struct HashingReader<R> {
    inner: R,
    hasher: DigestHasher,
    limit: u64,
    /// Set when the limit stopped the stream, so the resulting I/O error (which surfaces through
    /// the tar crate) can be reported as a limit.
    over_limit: Rc<Cell<bool>>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.hasher.len() + n as u64 > self.limit {
            self.over_limit.set(true);
            return Err(io::Error::other(
                "uncompressed layer exceeds the size limit",
            ));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Fields from GNU long name/link and PAX headers, for the next real entry.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<u64>,
    size: Option<u64>,
}

impl Pending {
    fn is_set(&self) -> bool {
        self.path.is_some()
            || self.link.is_some()
            || self.uid.is_some()
            || self.gid.is_some()
            || self.mtime.is_some()
            || self.size.is_some()
    }
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: u64,
}

struct Unpacker<'a> {
    blob: &'a Path,
    dest: &'a Path,
    limits: &'a UnpackLimits,
    over_limit: Rc<Cell<bool>>,
    stats: UnpackStats,
    pending: Pending,
    /// The current entry's path as written in the layer, for errors.
    current: PathBuf,
    /// Paths (relative to `dest`) this layer has put in place, with all their ancestors. Whiteouts
    /// never remove these: they only hide lower layers.
    created: HashSet<PathBuf>,
    /// The last parent directory checked to be a chain of real directories. Consecutive entries
    /// usually share it; any removal forgets it.
    verified_parent: Option<PathBuf>,
    /// Directories whose mode and mtime are applied at the end, in entry order.
    dirs: Vec<(PathBuf, Meta)>,
    buf: Vec<u8>,
}

impl Unpacker<'_> {
    fn read_error(&self, source: io::Error) -> OciError {
        if self.over_limit.get() {
            OciError::UnpackLimit {
                layer: self.blob.to_owned(),
                limit: "max_total_bytes",
                value: self.limits.max_total_bytes,
            }
        } else {
            OciError::LayerRead {
                path: self.blob.to_owned(),
                source,
            }
        }
    }

    fn reject(&self, reason: impl Into<String>) -> OciError {
        OciError::LayerEntry {
            path: self.current.clone(),
            reason: reason.into(),
        }
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), OciError> {
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(OciError::UnpackLimit {
                layer: self.blob.to_owned(),
                limit: "max_entries",
                value: self.limits.max_entries,
            });
        }
        let kind = entry.header().entry_type();
        if kind.is_gnu_longname() || kind.is_gnu_longlink() {
            let mut data = self.read_extension(&mut entry)?;
            while data.last() == Some(&0) {
                data.pop();
            }
            if kind.is_gnu_longname() {
                self.pending.path = Some(data);
            } else {
                self.pending.link = Some(data);
            }
            return Ok(());
        }
        if kind.is_pax_local_extensions() {
            let data = self.read_extension(&mut entry)?;
            return self.pax(&data);
        }
        if kind.is_pax_global_extensions() {
            // Global defaults (e.g. a comment); nothing Kiln applies. The data is skipped by the
            // tar reader.
            return Ok(());
        }

        let pending = std::mem::take(&mut self.pending);
        let header = entry.header();
        let raw_path = match pending.path {
            Some(path) => path,
            None => header.path_bytes().into_owned(),
        };
        self.current = PathBuf::from(OsStr::from_bytes(&raw_path));
        let Some(rel) = normalize(&self.current) else {
            return Err(self.reject("path climbs above the layer root"));
        };
        if let Some(size) = pending.size {
            if Some(size) != header.entry_size().ok() {
                return Err(self.reject("a PAX size that differs from the header is not supported"));
            }
        }
        let header_field = |field: io::Result<u64>, name: &str| {
            field.map_err(|_| self.reject(format!("invalid {name} field")))
        };
        let uid = match pending.uid {
            Some(uid) => uid,
            None => header_field(header.uid(), "uid")?,
        };
        let gid = match pending.gid {
            Some(gid) => gid,
            None => header_field(header.gid(), "gid")?,
        };
        let mtime = match pending.mtime {
            Some(mtime) => mtime,
            None => header_field(header.mtime(), "mtime")?,
        };
        let mode = header_field(header.mode().map(u64::from), "mode")?;
        let meta = Meta {
            uid: u32::try_from(uid).map_err(|_| self.reject("uid out of range"))?,
            gid: u32::try_from(gid).map_err(|_| self.reject("gid out of range"))?,
            mode: (mode & 0o7777) as u32,
            mtime: mtime.min(MAX_MTIME),
        };
        let link = match pending.link {
            Some(link) => Some(link),
            None => header.link_name_bytes().map(|l| l.into_owned()),
        };
        let is_dir = kind.is_dir() || (kind.is_file() && raw_path.ends_with(b"/"));

        let Some(name) = rel.file_name() else {
            // The layer root itself ("./"): its metadata belongs to whoever owns `dest`.
            if is_dir {
                return Ok(());
            }
            return Err(self.reject("a non-directory entry for the layer root"));
        };
        let name = name.as_bytes();
        let parent = rel.parent().unwrap_or(Path::new(""));
        if name == OPAQUE_MARKER {
            return self.opaque(parent);
        }
        if name.starts_with(WHITEOUT_META_PREFIX) {
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(self.reject("whiteout names nothing"));
            }
            return self.whiteout(&parent.join(OsStr::from_bytes(hidden)));
        }

        if is_dir {
            self.dir(&rel, meta)
        } else if kind.is_file() || kind.is_contiguous() {
            self.file(&mut entry, &rel, meta)
        } else if kind.is_symlink() {
            let target = link.ok_or_else(|| self.reject("symlink without a target"))?;
            self.symlink(&rel, &target, meta)
        } else if kind.is_hard_link() {
            let target = link.ok_or_else(|| self.reject("hard link without a target"))?;
            self.hardlink(&rel, &target)
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            self.stats.skipped_devices += 1;
            Ok(())
        } else if kind.is_gnu_sparse() {
            Err(self.reject("GNU sparse files are not supported"))
        } else {
            Err(self.reject(format!(
                "unsupported entry type {:?}",
                char::from(kind.as_byte())
            )))
        }
    }

    fn read_extension<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<Vec<u8>, OciError> {
        let size = entry.size();
        if size > MAX_EXTENSION_BYTES {
            return Err(OciError::LayerEntry {
                path: PathBuf::from(OsStr::from_bytes(&entry.header().path_bytes())),
                reason: format!(
                    "extension header of {size} bytes exceeds the {MAX_EXTENSION_BYTES}-byte limit"
                ),
            });
        }
        let mut data = Vec::with_capacity(size as usize);
        entry
            .take(MAX_EXTENSION_BYTES)
            .read_to_end(&mut data)
            .map_err(|e| self.read_error(e))?;
        Ok(data)
    }

    fn pax(&mut self, data: &[u8]) -> Result<(), OciError> {
        let bad = |what: &str| OciError::LayerEntry {
            path: PathBuf::from("<PAX header>"),
            reason: format!("invalid PAX {what}"),
        };
        let number = |value: &[u8], what: &str| -> Result<u64, OciError> {
            std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(what))
        };
        for extension in tar::PaxExtensions::new(data) {
            let extension = extension.map_err(|_| bad("record"))?;
            let value = extension.value_bytes();
            match extension.key_bytes() {
                b"path" => self.pending.path = Some(value.to_vec()),
                b"linkpath" => self.pending.link = Some(value.to_vec()),
                b"uid" => self.pending.uid = Some(number(value, "uid")?),
                b"gid" => self.pending.gid = Some(number(value, "gid")?),
                b"size" => self.pending.size = Some(number(value, "size")?),
                b"mtime" => {
                    // Seconds with an optional fraction; before-epoch times become the epoch.
                    let whole = value.split(|&b| b == b'.').next().unwrap_or(b"");
                    let mtime = if whole.starts_with(b"-") {
                        0
                    } else {
                        number(whole, "mtime")?
                    };
                    self.pending.mtime = Some(mtime);
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn dir(&mut self, rel: &Path, meta: Meta) -> Result<(), OciError> {
        self.prepare_parent(rel)?;
        let full = self.dest.join(rel);
        match fs::symlink_metadata(&full) {
            Ok(existing) if existing.is_dir() => {}
            Ok(_) => {
                self.remove(rel)?;
                make_dir(&full)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => make_dir(&full)?,
            Err(source) => return Err(entry_io("inspect", &full, source)),
        }
        self.dirs.push((rel.to_owned(), meta));
        self.mark_created(rel);
        self.stats.dirs += 1;
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: &Path,
        meta: Meta,
    ) -> Result<(), OciError> {
        let size = entry.size();
        if size > self.limits.max_entry_bytes {
            return Err(OciError::EntryTooLarge {
                layer: self.blob.to_owned(),
                path: self.current.clone(),
                size,
                limit: self.limits.max_entry_bytes,
            });
        }
        self.prepare_parent(rel)?;
        self.remove(rel)?;
        let full = self.dest.join(rel);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&full)
            .map_err(|source| entry_io("create", &full, source))?;
        let mut buf = std::mem::take(&mut self.buf);
        let mut written = 0u64;
        let copied = loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(self.read_error(e)),
            };
            if let Err(source) = file.write_all(&buf[..n]) {
                break Err(entry_io("write", &full, source));
            }
            written += n as u64;
        };
        self.buf = buf;
        copied?;
        if written != size {
            return Err(OciError::LayerRead {
                path: self.blob.to_owned(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "layer ends inside a file"),
            });
        }
        self.stats.bytes_written += written;
        self.set_metadata(&file, &full, meta)?;
        self.mark_created(rel);
        self.stats.files += 1;
        Ok(())
    }

    fn symlink(&mut self, rel: &Path, target: &[u8], meta: Meta) -> Result<(), OciError> {
        if target.is_empty() {
            return Err(self.reject("symlink with an empty target"));
        }
        self.prepare_parent(rel)?;
        self.remove(rel)?;
        let full = self.dest.join(rel);
        // The target is stored as given, absolute or not: nothing on the host resolves it, and
        // every write here refuses to pass through a symlink.
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &full)
            .map_err(|source| entry_io("create symlink", &full, source))?;
        // `lchown` on a path whose parents were just checked changes the link itself.
        match std::os::unix::fs::lchown(&full, Some(meta.uid), Some(meta.gid)) {
            Ok(()) => {}
            Err(e) if is_unprivileged(&e) => self.stats.ownership_skipped += 1,
            Err(source) => return Err(entry_io("set the owner of", &full, source)),
        }
        self.mark_created(rel);
        self.stats.symlinks += 1;
        Ok(())
    }

    fn hardlink(&mut self, rel: &Path, target: &[u8]) -> Result<(), OciError> {
        let Some(target) = normalize(Path::new(OsStr::from_bytes(target))) else {
            return Err(self.reject("hard link target climbs above the layer root"));
        };
        if target.as_os_str().is_empty() {
            return Err(self.reject("hard link to the layer root"));
        }
        if target == rel {
            return Err(self.reject("hard link to itself"));
        }
        let target_parent = target.parent().unwrap_or(Path::new(""));
        if !self.check_dirs(target_parent, false)? {
            return Err(self.reject("hard link target does not exist"));
        }
        let full_target = self.dest.join(&target);
        match fs::symlink_metadata(&full_target) {
            Ok(existing) if existing.is_dir() => {
                return Err(self.reject("hard link to a directory"));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.reject("hard link target does not exist"));
            }
            Err(source) => return Err(entry_io("inspect", &full_target, source)),
        }
        self.prepare_parent(rel)?;
        self.remove(rel)?;
        let full = self.dest.join(rel);
        // linkat(2) without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        fs::hard_link(&full_target, &full)
            .map_err(|source| entry_io("create hard link", &full, source))?;
        self.mark_created(rel);
        self.stats.hardlinks += 1;
        Ok(())
    }

    fn whiteout(&mut self, rel: &Path) -> Result<(), OciError> {
        self.stats.whiteouts += 1;
        if self.created.contains(rel) {
            return Ok(());
        }
        let parent = rel.parent().unwrap_or(Path::new(""));
        if !self.check_dirs(parent, false)? {
            return Ok(());
        }
        self.remove(rel)
    }

    fn opaque(&mut self, dir: &Path) -> Result<(), OciError> {
        self.stats.opaque_dirs += 1;
        if !dir.as_os_str().is_empty() {
            self.prepare_parent(dir)?;
            let full = self.dest.join(dir);
            match fs::symlink_metadata(&full) {
                Ok(existing) if existing.is_dir() => {}
                Ok(_) => {
                    self.remove(dir)?;
                    make_dir(&full)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => make_dir(&full)?,
                Err(source) => return Err(entry_io("inspect", &full, source)),
            }
            self.mark_created(dir);
        }
        self.clear_lower(dir)
    }

    /// Removes everything under `dir` that this layer did not put there.
    fn clear_lower(&mut self, dir: &Path) -> Result<(), OciError> {
        let full = self.dest.join(dir);
        let mut names = Vec::new();
        for child in fs::read_dir(&full).map_err(|source| entry_io("list", &full, source))? {
            let child = child.map_err(|source| entry_io("list", &full, source))?;
            names.push(child.file_name());
        }
        for name in names {
            let rel = dir.join(&name);
            if !self.created.contains(&rel) {
                self.remove(&rel)?;
                continue;
            }
            let child = self.dest.join(&rel);
            let is_dir = fs::symlink_metadata(&child)
                .map_err(|source| entry_io("inspect", &child, source))?
                .is_dir();
            if is_dir {
                self.clear_lower(&rel)?;
            }
        }
        Ok(())
    }

    /// Removes whatever is at `rel` without following a symlink there.
    fn remove(&mut self, rel: &Path) -> Result<(), OciError> {
        let full = self.dest.join(rel);
        let existing = match fs::symlink_metadata(&full) {
            Ok(existing) => existing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(entry_io("inspect", &full, source)),
        };
        self.verified_parent = None;
        // `remove_dir_all` does not follow symlinks inside the tree (it works with
        // openat/unlinkat and O_NOFOLLOW).
        let removed = if existing.is_dir() {
            fs::remove_dir_all(&full)
        } else {
            fs::remove_file(&full)
        };
        removed.map_err(|source| entry_io("remove", &full, source))
    }

    /// Makes sure every ancestor of `rel` is a real directory, creating missing ones.
    fn prepare_parent(&mut self, rel: &Path) -> Result<(), OciError> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        if parent.as_os_str().is_empty() || self.verified_parent.as_deref() == Some(parent) {
            return Ok(());
        }
        self.check_dirs(parent, true)?;
        self.verified_parent = Some(parent.to_owned());
        Ok(())
    }

    /// Walks `dir` from the root down with `lstat`. A symlink or non-directory on the way is an
    /// error; a missing directory is created when `create`, else the walk answers `false`.
    fn check_dirs(&mut self, dir: &Path, create: bool) -> Result<bool, OciError> {
        let mut full = self.dest.to_owned();
        let mut rel = PathBuf::new();
        for component in dir.components() {
            full.push(component);
            rel.push(component);
            match fs::symlink_metadata(&full) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(self.reject(format!(
                        "{} is a symlink; refusing to write through it",
                        rel.display()
                    )));
                }
                Ok(_) => {
                    return Err(self.reject(format!("{} is not a directory", rel.display())));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    make_dir(&full)?;
                    self.mark_created(&rel);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(source) => return Err(entry_io("inspect", &full, source)),
            }
        }
        Ok(true)
    }

    fn mark_created(&mut self, rel: &Path) {
        for ancestor in rel.ancestors() {
            // Chains are always inserted whole, so once an ancestor is present all of its
            // ancestors are too.
            if ancestor.as_os_str().is_empty() || !self.created.insert(ancestor.to_owned()) {
                break;
            }
        }
    }

    /// Sets owner, mode and times through an open file or directory.
    fn set_metadata(&mut self, file: &File, path: &Path, meta: Meta) -> Result<(), OciError> {
        let owned = match std::os::unix::fs::fchown(file, Some(meta.uid), Some(meta.gid)) {
            Ok(()) => true,
            Err(e) if is_unprivileged(&e) => {
                self.stats.ownership_skipped += 1;
                false
            }
            Err(source) => return Err(entry_io("set the owner of", path, source)),
        };
        // chown clears setuid/setgid, so the mode comes after it; and a set-id bit is only
        // meaningful for the owner the layer gave.
        let mode = if owned {
            meta.mode
        } else {
            meta.mode & !0o6000
        };
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(|source| entry_io("set the mode of", path, source))?;
        let time = UNIX_EPOCH + Duration::from_secs(meta.mtime);
        file.set_times(FileTimes::new().set_accessed(time).set_modified(time))
            .map_err(|source| entry_io("set the times of", path, source))
    }

    /// Applies directory metadata, last entry for a path winning.
    fn finish(&mut self) -> Result<(), OciError> {
        let dirs = std::mem::take(&mut self.dirs);
        let mut done = HashSet::new();
        for (rel, meta) in dirs.into_iter().rev() {
            if !done.insert(rel.clone()) {
                continue;
            }
            self.current = rel.clone();
            let parent = rel.parent().unwrap_or(Path::new(""));
            if !self.check_dirs(parent, false)? {
                continue;
            }
            let full = self.dest.join(&rel);
            let dir = match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(&full)
            {
                Ok(dir) => dir,
                // Replaced by a non-directory later in the layer, or removed.
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(libc::ENOTDIR)
                        || e.raw_os_error() == Some(libc::ELOOP) =>
                {
                    continue
                }
                Err(source) => return Err(entry_io("open", &full, source)),
            };
            self.set_metadata(&dir, &full, meta)?;
        }
        Ok(())
    }
}

fn entry_io(op: &'static str, path: &Path, source: io::Error) -> OciError {
    OciError::EntryIo {
        op,
        path: path.to_owned(),
        source,
    }
}

fn make_dir(full: &Path) -> Result<(), OciError> {
    DirBuilder::new()
        .mode(0o755)
        .create(full)
        .map_err(|source| entry_io("create directory", full, source))
}

/// Whether a chown failed only because this process may not give files away (not root, or an
/// id outside a user namespace's map).
fn is_unprivileged(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EINVAL)
}

/// Lexical normalisation of an entry path to a path relative to the destination; `None` when it
/// climbs above it. The empty path is the root.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(name) => out.push(name),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests;
