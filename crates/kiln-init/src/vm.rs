//! kiln-init as the first process of a VM (QEMU today, Firecracker in production).
//!
//! Under runc the runtime mounts `/proc`, `/dev` and friends, places `run.json` in the rootfs and
//! bind-mounts the channel's directory. In a VM kiln-init is started by the kernel on a bare root
//! filesystem, so it does that work itself:
//! 0. when the kernel command line asks (Firecracker), switch to an overlay root: the shared
//!    read-only root plus the instance's writable drive ([`crate::layer`]); let Ctrl-Alt-Del
//!    arrive as SIGINT;
//! 1. mount `/proc`, `/sys`, `/dev` (devtmpfs), `/dev/pts`, `/dev/shm` and a tmpfs at `/.kiln/run`;
//! 2. find the config disk (a virtio-blk device starting with the config-disk magic, see
//!    `kiln_types::guest::config_disk`) and read the run configuration from it;
//! 3. set the hostname;
//! 4. open the virtio-serial port named [`VM_CHANNEL_PORT`] for the guest channel (without one,
//!    listen on AF_VSOCK port 52: [`crate::vsock`]);
//! 5. when the app has ended, write the exit record to the config disk, sync, and power off (or
//!    reboot, when the command line says `kiln.exit=reboot`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use kiln_types::guest::config_disk;
use kiln_types::guest::{RunConfig, RUN_DIR, VM_CHANNEL_PORT};

use crate::log;

/// True when this process is a VM's init: PID 1 with no run configuration placed by a runtime.
pub(crate) fn is_vm() -> bool {
    std::process::id() == 1 && !Path::new(kiln_types::guest::RUN_CONFIG_PATH).exists()
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let (source, target_c, fstype, data) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // The kernel may have mounted devtmpfs already (CONFIG_DEVTMPFS_MOUNT).
        if e.raw_os_error() != Some(libc::EBUSY) {
            log(&format!("cannot mount {target}: {e}"));
        }
    }
}

/// The VM's early setup; returns the run configuration and the config disk's path.
pub(crate) fn boot() -> Result<(RunConfig, PathBuf), String> {
    // A shared read-only root gets its writable layer first (Firecracker; see `crate::layer`).
    crate::layer::setup()?;
    // Ctrl-Alt-Del (Firecracker's `SendCtrlAltDel`) becomes SIGINT to this process, a stop
    // request, instead of an immediate reset.
    // SAFETY: plain syscall.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nosuid_nodev_noexec, "");
    mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, "");
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    );
    mount(
        "shm",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    mount(
        "kiln-run",
        RUN_DIR,
        "tmpfs",
        nosuid_nodev_noexec,
        "mode=0755,size=16m",
    );
    // /dev/ptmx must lead to this devpts instance for PTY exec sessions.
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");

    let (config, disk) = find_config()?;
    let name = config.hostname.as_bytes();
    // SAFETY: the pointer and length describe a valid buffer.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        log("cannot set the hostname");
    }
    Ok((config, disk))
}

/// Looks at every virtio block device for the config disk's magic.
fn find_config() -> Result<(RunConfig, PathBuf), String> {
    let mut seen = Vec::new();
    let entries = std::fs::read_dir("/sys/block").map_err(|e| format!("/sys/block: {e}"))?;
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vd"))
        .collect();
    names.sort();
    for name in names {
        let path = PathBuf::from(format!("/dev/{name}"));
        let Ok(mut f) = File::open(&path) else {
            continue;
        };
        let mut head = vec![0u8; config_disk::SECTOR + 12];
        if f.read_exact(&mut head).is_err() {
            continue;
        }
        if &head[config_disk::SECTOR..config_disk::SECTOR + 8] != config_disk::CONFIG_MAGIC {
            seen.push(name);
            continue;
        }
        let len = u32::from_le_bytes([
            head[config_disk::SECTOR + 8],
            head[config_disk::SECTOR + 9],
            head[config_disk::SECTOR + 10],
            head[config_disk::SECTOR + 11],
        ]) as usize;
        let mut disk = head;
        disk.resize(
            config_disk::SECTOR + 12 + len.min(config_disk::MAX_CONFIG),
            0,
        );
        f.read_exact(&mut disk[config_disk::SECTOR + 12..])
            .map_err(|e| format!("{}: {e}", path.display()))?;
        return config_disk::decode(&disk)
            .map(|c| (c, path.clone()))
            .map_err(|e| format!("{}: {e}", path.display()));
    }
    Err(format!(
        "no config disk among the block devices ({})",
        seen.join(", ")
    ))
}

/// The device of the virtio-serial port carrying the guest channel.
pub(crate) fn channel_port() -> Result<PathBuf, String> {
    let dir = "/sys/class/virtio-ports";
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{dir}: {e}"))?;
    for e in entries.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == VM_CHANNEL_PORT {
            return Ok(Path::new("/dev").join(e.file_name()));
        }
    }
    Err(format!("no virtio-serial port named {VM_CHANNEL_PORT}"))
}

/// Records how the app ended where the host reads it after the VM is gone, then powers off.
pub(crate) fn shutdown(disk: &Path, code: Option<i32>, signal: Option<i32>) -> ! {
    let record = config_disk::encode_exit(code, signal);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&record)?;
            f.sync_all()
        });
    if let Err(e) = written {
        log(&format!("cannot write the exit record: {e}"));
    }
    // SAFETY: plain syscalls; reboot only returns on failure.
    unsafe {
        libc::sync();
        // Firecracker has no power-off device: it exits on the guest's reset.
        libc::reboot(if crate::layer::exit_by_reboot() {
            libc::RB_AUTOBOOT
        } else {
            libc::RB_POWER_OFF
        });
    }
    log("power off failed");
    // PID 1 must not exit; the kernel would panic (which, with panic=-1, also ends the VM).
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// The virtio-serial port as a channel connection. The port is one byte stream that stays open
/// across host connections: reads return 0 while no host is connected, and writes would block
/// until one is, so the descriptor is non-blocking and writes give up after a second without
/// progress (the frame is then dropped like on a broken socket).
pub(crate) struct Port(std::sync::Arc<File>);

impl Port {
    pub fn open(path: &Path) -> std::io::Result<Port> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        Ok(Port(std::sync::Arc::new(f)))
    }

    pub fn try_clone(&self) -> Port {
        Port(self.0.clone())
    }

    fn poll(&self, events: libc::c_short, timeout_ms: i32) -> libc::c_short {
        let mut p = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if n <= 0 {
            0
        } else {
            p.revents
        }
    }

    /// Blocks until a host is connected to the port.
    pub fn wait_for_host(&self) {
        loop {
            let r = self.poll(libc::POLLIN, 200);
            if r != 0 && r & libc::POLLHUP == 0 {
                return;
            }
            if r & libc::POLLHUP != 0 {
                // Disconnected ports report POLLHUP at once; do not spin.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

use std::os::unix::fs::OpenOptionsExt;

impl Read for Port {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match (&*self.0).read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let r = self.poll(libc::POLLIN, 1000);
                    if r & libc::POLLHUP != 0 && r & libc::POLLIN == 0 {
                        return Ok(0);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

impl Write for Port {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match (&*self.0).write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let r = self.poll(libc::POLLOUT, 1000);
                    if r & libc::POLLOUT == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::BrokenPipe,
                            "host not reading the channel",
                        ));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
