//! The host side of one jailed microVM: its chroot, its cgroups and its network.
//!
//! - Chroot `<chroot_base>/<exec file name>/<jail id>/root/`: hard links of the kernel and the
//!   shared read-only root image (world-readable, never chowned: many jails share the inode) and
//!   of the instance's own drives (writable layer and config disk, chowned to the jailer's
//!   uid/gid, mode 0600), plus `vm.json` in config-file boot. The jailer adds the Firecracker
//!   binary, `/dev/kvm`, `/dev/net/tun`, the pid file and Firecracker the sockets; cleanup removes
//!   the whole `<jail id>` directory.
//! - cgroups (v1): the jailer creates `<controller root>/kiln-firecracker/<jail id>` for each
//!   controller it writes a limit to; cleanup removes those directories once the VMM is gone.
//! - Network: the jailer joins the instance's namespace `kiln-<id>`, which holds the tap `tap0`
//!   Firecracker opens and a veth `veth0` to the host, with IPv6 forwarding between them:
//!   host `kv<id>` (`fe80::1`, route `<addr>/128 via fe80::2`) ⇄ namespace `veth0` (`fe80::2`,
//!   default via `fe80::1`) ⇄ `tap0` (`fe80::1`, route `<addr>/128`) ⇄ the guest's `eth0`
//!   (`<addr>/128`, default via `fe80::1`, configured by kiln-init). The guest sees the same
//!   gateway as under runc and QEMU.

use std::net::Ipv6Addr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::netlink;
use crate::AgentError;

use super::plan::PARENT_CGROUP;

/// The tap device inside each instance's namespace.
pub const TAP: &str = "tap0";
/// The namespace side of the instance's veth pair.
pub const NS_VETH: &str = "veth0";

/// Preparing or removing a jail failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot create the jail directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot hard-link {from} into the jail as {to}")]
    Link {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{from} is on another filesystem than the jail {to}: put the jailer's chroot base on the data directory's filesystem (hard links cannot cross filesystems)")]
    CrossDevice { from: PathBuf, to: PathBuf },
    #[error("{path} is not readable by the jailed uid: shared files must be world-readable")]
    NotWorldReadable { path: PathBuf },
    #[error("cannot set owner or mode of {path}")]
    Ownership {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One file placed in the jail.
#[derive(Debug, Clone)]
pub struct JailFile {
    /// The host file (hard-linked, never copied).
    pub source: PathBuf,
    /// Its name inside the jail's root.
    pub name: &'static str,
    /// Per-instance and writable: chowned to the jailer's uid/gid with mode 0600. Otherwise
    /// shared and read-only: left as it is, and required to be world-readable.
    pub private: bool,
}

/// Builds the jail's root with hard links of `files` (removing any earlier jail of that id).
pub async fn prepare(root: &Path, files: &[JailFile], uid: u32, gid: u32) -> Result<(), JailError> {
    if let Some(jail) = root.parent() {
        let _ = tokio::fs::remove_dir_all(jail).await;
    }
    tokio::fs::create_dir_all(root)
        .await
        .map_err(|source| JailError::CreateDir {
            path: root.to_owned(),
            source,
        })?;
    for f in files {
        let to = root.join(f.name);
        match tokio::fs::hard_link(&f.source, &to).await {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                return Err(JailError::CrossDevice {
                    from: f.source.clone(),
                    to,
                })
            }
            Err(source) => {
                return Err(JailError::Link {
                    from: f.source.clone(),
                    to,
                    source,
                })
            }
        }
        let own = |source| JailError::Ownership {
            path: to.clone(),
            source,
        };
        if f.private {
            std::os::unix::fs::chown(&to, Some(uid), Some(gid)).map_err(own)?;
            tokio::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                .await
                .map_err(own)?;
        } else {
            let meta = tokio::fs::metadata(&to).await.map_err(own)?;
            if meta.mode() & 0o004 == 0 {
                return Err(JailError::NotWorldReadable {
                    path: f.source.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Writes a file Firecracker reads inside the jail (`vm.json`), owned by the jailed uid.
pub async fn write_owned(path: &Path, bytes: &[u8], uid: u32, gid: u32) -> Result<(), JailError> {
    let err = |source| JailError::Write {
        path: path.to_owned(),
        source,
    };
    tokio::fs::write(path, bytes).await.map_err(err)?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(err)?;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .await
        .map_err(err)
}

/// Removes the jail (`<jail id>` directory, with the jailer's device nodes and Firecracker's
/// sockets) and the VM's cgroups. Missing pieces are not an error; call once the VMM is gone.
pub async fn remove(root: &Path, jail_id: &str) {
    if let Some(jail) = root.parent() {
        if let Err(e) = tokio::fs::remove_dir_all(jail).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %jail.display(), error = %e, "cannot remove the jail");
            }
        }
    }
    let mounts = tokio::fs::read_to_string("/proc/self/mounts")
        .await
        .unwrap_or_default();
    for dir in cgroup_dirs(&mounts, jail_id) {
        // A killed VMM can stay in its cgroup a moment, until its reaper collects it.
        for attempt in 0..20 {
            match tokio::fs::remove_dir(&dir).await {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 19 => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => {
                    tracing::warn!(path = %dir.display(), error = %e, "cannot remove the VM's cgroup");
                    break;
                }
            }
        }
    }
}

/// The cgroup v1 directories the jailer creates for `jail_id` (one per mount of the controllers
/// Kiln writes limits to: memory and cpu), from the text of `/proc/self/mounts`.
pub fn cgroup_dirs(mounts: &str, jail_id: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (Some(target), Some(fstype), Some(opts)) = (f.get(1), f.get(2), f.get(3)) else {
            continue;
        };
        if *fstype != "cgroup" {
            continue;
        }
        if opts.split(',').any(|o| o == "memory" || o == "cpu") {
            let dir = Path::new(target).join(PARENT_CGROUP).join(jail_id);
            if !out.contains(&dir) {
                out.push(dir);
            }
        }
    }
    out
}

/// Creates the instance's namespace, veth pair and tap (owned by the jailed uid/gid), with the
/// routes above. A previous attempt's pieces are removed first.
pub async fn create_network(
    netns: &str,
    host_if: &str,
    addr: Ipv6Addr,
    uid: u32,
    gid: u32,
) -> Result<(), AgentError> {
    netlink::delete(netns, host_if).await;
    netlink::run("ip", &["netns", "add", netns], None).await?;
    let host = format!(
        "link add {host_if} type veth peer name {NS_VETH} netns {netns}\n\
         link set {host_if} up\n\
         addr add fe80::1/64 dev {host_if} nodad\n\
         route replace {addr}/128 via fe80::2 dev {host_if}\n"
    );
    netlink::run("ip", &["-batch", "-"], Some(&host)).await?;
    let inside = format!(
        "link set lo up\n\
         link set {NS_VETH} up\n\
         addr add fe80::2/64 dev {NS_VETH} nodad\n\
         tuntap add dev {TAP} mode tap user {uid} group {gid}\n\
         link set {TAP} up\n\
         addr add fe80::1/64 dev {TAP} nodad\n\
         route replace {addr}/128 dev {TAP}\n\
         route replace default via fe80::1 dev {NS_VETH}\n"
    );
    netlink::run("ip", &["-n", netns, "-batch", "-"], Some(&inside)).await?;
    netlink::run(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.forwarding=1",
        ],
        None,
    )
    .await
}

/// Removes the namespace (and the tap in it) and the veth pair.
pub async fn delete_network(netns: &str, host_if: &str) {
    netlink::delete(netns, host_if).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_dirs_follow_the_v1_controller_mounts() {
        let mounts = "\
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0
proc /proc proc rw 0 0
garbage";
        assert_eq!(
            cgroup_dirs(mounts, "i-1"),
            vec![
                PathBuf::from("/sys/fs/cgroup/memory/kiln-firecracker/i-1"),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/kiln-firecracker/i-1"),
            ]
        );
        assert!(cgroup_dirs("", "x").is_empty());
    }
}
