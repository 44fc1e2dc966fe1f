//! Volumes and the read-only root, before the app starts (docs/specs/runtime/volume-mounts.md).
//!
//! In a VM, for each mount of the run configuration kiln-init:
//! 1. finds the virtio-blk disk whose serial (`/sys/block/vd*/serial`) is the mount's;
//! 2. creates the mount point and mounts the disk there (ext4, `nosuid,nodev`);
//! 3. gives the volume's root to the app's user when the app does not run as root;
//!
//! then, for a read-only root, mounts tmpfs on `/tmp`, `/run` and the secrets directory and
//! remounts `/` read-only (and never back). Under runc the runtime has done all of that: kiln-init
//! only checks each path is a mounted directory and hands its root to the app's user.

use std::ffi::CString;
use std::path::Path;

use kiln_types::guest::{GuestMount, RunConfig};

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> bool {
    let (source, target, fstype, data) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    rc == 0
}

/// Whether `path` is a mount point: its device differs from its parent's.
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    std::fs::metadata(parent).is_ok_and(|p| p.dev() != meta.dev()) || path == Path::new("/")
}

/// The block device whose virtio serial is `serial`.
fn disk_with_serial(serial: &str) -> Option<String> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        let s = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
        if s.trim_end_matches(['\n', '\0']) == serial {
            return Some(format!("/dev/{name}"));
        }
    }
    None
}

fn give_to_app(m: &GuestMount, config: &RunConfig) -> Result<(), String> {
    if config.uid == 0 && config.gid == 0 {
        return Ok(());
    }
    std::os::unix::fs::chown(&m.path, Some(config.uid), Some(config.gid))
        .map_err(|e| format!("cannot give volume {} to the app's user: {e}", m.path))
}

/// Mounts (VM) or checks (runc) every volume, then makes the root read-only where asked (VM).
pub(crate) fn prepare(config: &RunConfig, vm: bool) -> Result<(), String> {
    for m in &config.mounts {
        match (&m.serial, vm) {
            (Some(serial), true) => {
                let dev = disk_with_serial(serial)
                    .ok_or_else(|| format!("no disk with serial {serial} for volume {}", m.path))?;
                std::fs::create_dir_all(&m.path)
                    .map_err(|e| format!("cannot create mount point {}: {e}", m.path))?;
                if !mount(&dev, &m.path, "ext4", libc::MS_NOSUID | libc::MS_NODEV, "") {
                    return Err(format!(
                        "cannot mount {dev} at {}: {}",
                        m.path,
                        std::io::Error::last_os_error()
                    ));
                }
            }
            _ => {
                let p = Path::new(&m.path);
                if !p.is_dir() || !is_mount_point(p) {
                    return Err(format!("volume {} is not mounted", m.path));
                }
            }
        }
        give_to_app(m, config)?;
    }
    if vm && config.read_only_root {
        let flags = libc::MS_NOSUID | libc::MS_NODEV;
        for dir in ["/tmp", "/run"] {
            if !mount("tmpfs", dir, "tmpfs", flags, "mode=1777,size=64m") {
                return Err(format!("cannot mount tmpfs at {dir}"));
            }
        }
        let secrets = kiln_types::secrets::SECRETS_DIR;
        if !mount(
            "tmpfs",
            secrets,
            "tmpfs",
            flags | libc::MS_NOEXEC,
            "mode=0700,size=1m",
        ) {
            return Err(format!("cannot mount tmpfs at {secrets}"));
        }
        // The filesystem read-only; failing that (a file still open for writing), the mount.
        if !mount("", "/", "", libc::MS_REMOUNT | libc::MS_RDONLY, "")
            && !mount(
                "",
                "/",
                "",
                libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_BIND,
                "",
            )
        {
            return Err(format!(
                "cannot remount / read-only: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}
