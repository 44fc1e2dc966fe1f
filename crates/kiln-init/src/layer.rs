//! A writable layer over a read-only shared root, for VMs whose root drive is shared by every
//! instance of an image (Firecracker: no qcow2, so no per-instance copy-on-write disk).
//!
//! The driver asks for it on the kernel command line: `kiln.overlay=<label>` names the ext4
//! label of the instance's own writable drive, and `kiln.exit=reboot` says the VM ends by a reset
//! (Firecracker exits on the guest's reboot and has no power-off device). Before anything else,
//! kiln-init:
//! 1. reads `/proc/cmdline` (mounting `/proc` for the moment);
//! 2. mounts a tmpfs at `/.kiln/run` (a directory of the read-only root) as scratch space, with
//!    a devtmpfs in it to reach the block devices;
//! 3. finds the drive whose ext4 superblock carries the label, mounts it, and mounts an overlay
//!    (lower: a bind of the read-only root; upper and work directories on the drive);
//! 4. moves the overlay onto `/` and chroots into it; the VM's usual setup (`crate::vm::boot`)
//!    then runs on the writable root.
//!
//! Without `kiln.overlay=` (QEMU, whose root is a writable qcow2 overlay) nothing changes.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use kiln_types::guest::RUN_DIR;

/// Set when the command line asks the VM to end by a reboot instead of a power-off.
static EXIT_BY_REBOOT: AtomicBool = AtomicBool::new(false);

/// Whether the VM should end by a reboot (see the module docs).
pub(crate) fn exit_by_reboot() -> bool {
    EXIT_BY_REBOOT.load(Ordering::Relaxed)
}

/// The value of `key=` on a kernel command line.
pub(crate) fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The ext4 label in a superblock region (the first 2 KiB of a device), if it is ext2/3/4.
pub(crate) fn ext4_label(head: &[u8]) -> Option<String> {
    const SB: usize = 1024;
    let magic = head.get(SB + 0x38..SB + 0x3a)?;
    if magic != [0x53, 0xef] {
        return None;
    }
    let raw = head.get(SB + 0x78..SB + 0x88)?;
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    Some(String::from_utf8_lossy(&raw[..end]).into_owned())
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f, d) = (c(source), c(target), c(fstype), c(data));
    let fstype_ptr = if fstype.is_empty() {
        std::ptr::null()
    } else {
        f.as_ptr()
    };
    // SAFETY: valid NUL-terminated strings (or null) for the duration of the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), fstype_ptr, flags, d.as_ptr().cast()) };
    if rc != 0 {
        return Err(format!(
            "mount {source} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Reads the command line and, when asked, switches to an overlay root. Runs first in a VM.
pub(crate) fn setup() -> Result<(), String> {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let _ = mount("proc", "/proc", "proc", nosuid_nodev_noexec, "");
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    // SAFETY: plain syscall; the new root gets its own /proc later.
    unsafe { libc::umount2(c("/proc").as_ptr(), libc::MNT_DETACH) };
    if param(&cmdline, "kiln.exit") == Some("reboot") {
        EXIT_BY_REBOOT.store(true, Ordering::Relaxed);
    }
    let Some(label) = param(&cmdline, "kiln.overlay") else {
        return Ok(());
    };
    let scratch = RUN_DIR;
    mount(
        "kiln-scratch",
        scratch,
        "tmpfs",
        libc::MS_NOSUID,
        "mode=0700,size=1m",
    )?;
    let dev = format!("{scratch}/dev");
    mount("devtmpfs", &dev, "devtmpfs", libc::MS_NOSUID, "mode=0700")?;
    let device = find_label(Path::new(&dev), label)?;
    let layer = format!("{scratch}/layer");
    mount(
        &device,
        &layer,
        "ext4",
        libc::MS_NOSUID | libc::MS_NODEV,
        "",
    )?;
    for d in ["upper", "work"] {
        std::fs::create_dir_all(format!("{layer}/{d}")).map_err(|e| format!("{layer}/{d}: {e}"))?;
    }
    // A non-recursive bind: the lower layer is the root drive alone, without the mounts above.
    let lower = format!("{scratch}/lower");
    mount("/", &lower, "", libc::MS_BIND, "")?;
    let root = format!("{scratch}/root");
    mount(
        "overlay",
        &root,
        "overlay",
        0,
        &format!("lowerdir={lower},upperdir={layer}/upper,workdir={layer}/work"),
    )?;
    std::env::set_current_dir(&root).map_err(|e| format!("{root}: {e}"))?;
    mount(".", "/", "", libc::MS_MOVE, "")?;
    // SAFETY: plain syscalls with valid strings.
    if unsafe { libc::chroot(c(".").as_ptr()) } != 0 {
        return Err(format!("chroot: {}", std::io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(|e| format!("/: {e}"))?;
    Ok(())
}

/// The block device (`vd*` under `dev`) whose ext4 label is `label`.
fn find_label(dev: &Path, label: &str) -> Result<String, String> {
    let mut names: Vec<String> = std::fs::read_dir(dev)
        .map_err(|e| format!("{}: {e}", dev.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vd"))
        .collect();
    names.sort();
    for name in &names {
        let path = dev.join(name);
        let mut head = vec![0u8; 2048];
        let ok = File::open(&path).and_then(|mut f| f.read_exact(&mut head));
        if ok.is_ok() && ext4_label(&head).as_deref() == Some(label) {
            return Ok(path.display().to_string());
        }
    }
    Err(format!(
        "no drive labelled {label:?} among {}",
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_parameters_are_found_whole() {
        let line = "console=ttyS0 root=/dev/vda ro kiln.overlay=kiln-layer kiln.exit=reboot\n";
        assert_eq!(param(line, "kiln.overlay"), Some("kiln-layer"));
        assert_eq!(param(line, "kiln.exit"), Some("reboot"));
        assert_eq!(param(line, "root"), Some("/dev/vda"));
        assert_eq!(param(line, "ro"), None);
        assert_eq!(param(line, "kiln"), None);
        assert_eq!(param("", "kiln.overlay"), None);
    }

    #[test]
    fn ext4_labels_are_read_from_the_superblock() {
        let mut sb = vec![0u8; 2048];
        assert_eq!(ext4_label(&sb), None);
        sb[1024 + 0x38] = 0x53;
        sb[1024 + 0x39] = 0xef;
        sb[1024 + 0x78..1024 + 0x78 + 10].copy_from_slice(b"kiln-layer");
        assert_eq!(ext4_label(&sb).as_deref(), Some("kiln-layer"));
        sb[1024 + 0x78..1024 + 0x88].copy_from_slice(&[b'x'; 16]);
        assert_eq!(ext4_label(&sb).as_deref(), Some("xxxxxxxxxxxxxxxx"));
        assert_eq!(ext4_label(&sb[..1100]), None);
        assert_eq!(ext4_label(&[]), None);
    }
}
