//! The QEMU driver: each instance is a `microvm` machine booting the guest kernel with kiln-init
//! as PID 1 — the same guest as Firecracker's, on hosts where Firecracker is not available.
//!
//! Per image digest (and kiln-init build) one ext4 root image is built with `mkfs.ext4 -d` from
//! the unpacked tree plus `/.kiln/init`, and shared read-only; each instance boots from its own
//! qcow2 overlay on it (its writable layer). Per instance, in its state directory:
//! - `root.qcow2`: the writable layer (virtio-blk, `/dev/vda`);
//! - `config.img`: the config disk (virtio-blk): the run configuration, and the exit record
//!   kiln-init writes before powering off (`kiln_types::guest::config_disk`);
//! - `run/channel.sock`: the guest channel, a QEMU socket chardev on a virtio-serial port named
//!   `kiln.channel` — the agent connects to it exactly as to kiln-init's socket under runc;
//! - `log`: the serial console (kernel and kiln-init messages, the app's output);
//! - `qemu.pid`: the daemonized QEMU's pid, so a restarted agent adopts running VMs.
//!
//! Networking is a tap device on the host (named like the runc driver's veth) carrying the same
//! routes: the instance's /128 via the tap, `fe80::1` as the guest's gateway.

use std::path::{Path, PathBuf};

use tokio::sync::Mutex;

use kiln_types::guest::config_disk;
use kiln_types::guest::{RunConfig, VM_CHANNEL_PORT};
use kiln_types::WorkloadSpec;

use crate::netlink;
use crate::AgentError;

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation (slow, works anywhere; the tests here use it).
    Tcg,
}

/// Settings of the QEMU driver.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// `qemu-system-x86_64`.
    pub binary: PathBuf,
    /// The guest kernel (an uncompressed `vmlinux`, the same Firecracker boots).
    pub kernel: PathBuf,
    pub accel: Accel,
}

/// Files of one instance, under its state directory.
#[derive(Debug, Clone)]
pub(crate) struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn overlay(&self) -> PathBuf {
        self.dir.join("root.qcow2")
    }
    pub fn config_disk(&self) -> PathBuf {
        self.dir.join("config.img")
    }
    pub fn channel(&self) -> PathBuf {
        self.dir.join("run").join("channel.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("log")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
}

/// The running driver.
pub(crate) struct Qemu {
    pub config: QemuConfig,
    /// Root images are built one at a time (the build is I/O bound and short).
    building: Mutex<()>,
    /// Short hash of the kiln-init binary, read once per agent process (a new build takes effect
    /// at the agent's next start): it names the root images built with it.
    init_id: tokio::sync::OnceCell<String>,
    /// The host's TSC rate: under TCG the guest cannot calibrate its TSC against the emulated PIT
    /// when the host is busy, and hangs at boot unless told the rate.
    tsc_khz: Option<u64>,
}

impl Qemu {
    pub fn new(config: QemuConfig) -> Qemu {
        let tsc_khz = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("cpu MHz"))
                    .and_then(|l| l.split(':').nth(1))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .map(|mhz| (mhz * 1000.0) as u64);
        Qemu {
            config,
            building: Mutex::new(()),
            init_id: tokio::sync::OnceCell::new(),
            tsc_khz,
        }
    }

    /// The ext4 root image of an unpacked image tree with kiln-init added, built on first use.
    pub async fn root_image(&self, tree: &Path, init: &Path) -> Result<PathBuf, AgentError> {
        let init_id = self
            .init_id
            .get_or_try_init(|| async {
                let bytes = tokio::fs::read(init)
                    .await
                    .map_err(|source| rootfs_err(tree, init, source))?;
                Ok::<_, AgentError>(
                    kiln_oci::sha256_digest(&bytes)["sha256:".len()..][..12].to_owned(),
                )
            })
            .await?;
        let parent = tree.parent().unwrap_or(tree);
        let image = parent.join(format!("root-{init_id}.ext4"));
        let _guard = self.building.lock().await;
        if tokio::fs::metadata(&image).await.is_ok() {
            return Ok(image);
        }
        // Only a build copies the binary in.
        let init_bytes = tokio::fs::read(init)
            .await
            .map_err(|source| rootfs_err(tree, init, source))?;
        // A staging tree with what kiln-init needs, layered over the image's tree by a read-only
        // overlay so that the shared unpacked tree is never modified.
        let staging = parent.join("vm-staging");
        let merged = parent.join("vm-merged");
        let _ = netlink::run("umount", &[&merged.display().to_string()], None).await;
        let _ = tokio::fs::remove_dir_all(&staging).await;
        // Mount points kiln-init needs even when the root ends up read-only.
        for d in [
            "proc",
            "sys",
            "dev",
            "tmp",
            "run",
            ".kiln/run",
            ".kiln/secrets",
        ] {
            let p = staging.join(d);
            tokio::fs::create_dir_all(&p)
                .await
                .map_err(|source| rootfs_err(tree, &p, source))?;
        }
        let staged_init = staging.join(".kiln/init");
        tokio::fs::write(&staged_init, &init_bytes)
            .await
            .map_err(|source| rootfs_err(tree, &staged_init, source))?;
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(&staged_init, std::fs::Permissions::from_mode(0o755))
            .await
            .map_err(|source| rootfs_err(tree, &staged_init, source))?;
        tokio::fs::create_dir_all(&merged)
            .await
            .map_err(|source| rootfs_err(tree, &merged, source))?;
        let opts = format!("ro,lowerdir={}:{}", staging.display(), tree.display());
        netlink::run(
            "mount",
            &[
                "-t",
                "overlay",
                "overlay",
                "-o",
                &opts,
                &merged.display().to_string(),
            ],
            None,
        )
        .await?;
        let size = tree_bytes(tree).await;
        // Room for the instance's own writes (its overlay only stores what changes); sparse, so
        // unused space costs nothing on the host.
        let fs_bytes = (size + size / 2 + (512 << 20)).div_ceil(1 << 20) << 20;
        let tmp = parent.join(format!("root-{init_id}.ext4.tmp"));
        let built = netlink::run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-L",
                "kiln-root",
                "-d",
                &merged.display().to_string(),
                &tmp.display().to_string(),
                &format!("{}k", fs_bytes >> 10),
            ],
            None,
        )
        .await;
        let _ = netlink::run("umount", &[&merged.display().to_string()], None).await;
        let _ = tokio::fs::remove_dir_all(&staging).await;
        let _ = tokio::fs::remove_dir(&merged).await;
        built?;
        tokio::fs::rename(&tmp, &image)
            .await
            .map_err(|source| rootfs_err(tree, &image, source))?;
        Ok(image)
    }

    /// Creates the instance's disks and tap, and boots the VM (QEMU daemonizes; its pid is kept).
    pub async fn start(
        &self,
        paths: &VmPaths,
        root_image: &Path,
        spec: &WorkloadSpec,
        run: &RunConfig,
        tap: &str,
        volumes: &[PathBuf],
    ) -> Result<(), AgentError> {
        let ferr = |p: PathBuf| {
            let instance = spec.instance_id.clone();
            move |source| AgentError::InstanceFile {
                instance,
                path: p,
                source,
            }
        };
        let cfg = paths.config_disk();
        tokio::fs::write(&cfg, config_disk::encode(run))
            .await
            .map_err(ferr(cfg.clone()))?;
        let overlay = paths.overlay();
        let _ = tokio::fs::remove_file(&overlay).await;
        netlink::run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                &root_image.display().to_string(),
                &overlay.display().to_string(),
            ],
            None,
        )
        .await?;
        netlink::create_tap(tap, spec.network.ipv6).await?;
        let argv = self.argv(paths, spec, tap, volumes);
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        netlink::run(&self.config.binary.display().to_string(), &args, None).await
    }

    /// QEMU's command line for an instance (pure, so it can be checked without booting).
    /// `volumes`: the files of `spec.mounts`, in order, each one more virtio-blk drive with the
    /// serial kiln-init looks for (`kiln_types::guest::volume_serial`).
    pub fn argv(
        &self,
        paths: &VmPaths,
        spec: &WorkloadSpec,
        tap: &str,
        volumes: &[PathBuf],
    ) -> Vec<String> {
        let mut cmdline = vec![
            "console=ttyS0",
            "reboot=k",
            "panic=-1",
            "root=/dev/vda",
            "rootfstype=ext4",
            "rw",
            "init=/.kiln/init",
            "quiet",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        let accel = match self.config.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => {
                if let Some(khz) = self.tsc_khz {
                    cmdline.push(format!("tsc_early_khz={khz}"));
                }
                "tcg"
            }
        };
        let cpus = spec.vm.cpu.0.div_ceil(1000).max(1);
        let mac = mac_of(spec.instance_id.suffix());
        let p = |p: PathBuf| p.display().to_string();
        let mut argv: Vec<String> = [
            "-name",
            &format!("kiln-{}", spec.instance_id),
            "-accel",
            accel,
            "-cpu",
            "max",
            "-M",
            "microvm,acpi=on",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-m",
            &spec.vm.memory.0.to_string(),
            "-smp",
            &cpus.to_string(),
            "-kernel",
            &self.config.kernel.display().to_string(),
            "-append",
            &cmdline.join(" "),
            "-serial",
            &format!("file:{}", p(paths.console())),
            "-drive",
            &format!("id=root,file={},format=qcow2,if=none", p(paths.overlay())),
            "-device",
            "virtio-blk-device,drive=root",
            "-drive",
            &format!(
                "id=config,file={},format=raw,if=none",
                p(paths.config_disk())
            ),
            "-device",
            "virtio-blk-device,drive=config",
            "-netdev",
            &format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
            "-device",
            &format!("virtio-net-device,netdev=net0,mac={mac}"),
            "-device",
            "virtio-serial-device",
            "-chardev",
            &format!(
                "socket,id=channel,path={},server=on,wait=off",
                p(paths.channel())
            ),
            "-device",
            &format!("virtserialport,chardev=channel,name={VM_CHANNEL_PORT}"),
            "-pidfile",
            &p(paths.pidfile()),
            "-daemonize",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        for (i, file) in volumes.iter().enumerate() {
            argv.extend([
                "-drive".to_owned(),
                format!(
                    "id=vol{i},file={},format=raw,if=none,discard=unmap",
                    file.display()
                ),
                "-device".to_owned(),
                format!(
                    "virtio-blk-device,drive=vol{i},serial={}",
                    kiln_types::guest::volume_serial(i)
                ),
            ]);
        }
        argv
    }

    /// The pid of the instance's QEMU while it runs (checked against its command line, so a
    /// recycled pid is not mistaken for it).
    pub async fn pid(&self, paths: &VmPaths) -> Option<i32> {
        let pid: i32 = tokio::fs::read_to_string(paths.pidfile())
            .await
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.ok()?;
        let needle = paths.pidfile().display().to_string();
        let ours = cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == needle.as_bytes());
        // A zombie (exited, not yet reaped by its parent) is not running.
        let stat = tokio::fs::read_to_string(format!("/proc/{pid}/stat"))
            .await
            .unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        (ours && !zombie).then_some(pid)
    }

    /// Sends a host signal to the QEMU process (SIGKILL ends the VM at once).
    pub fn kill(pid: i32, signal: i32) {
        // SAFETY: plain syscall on a pid we checked is our QEMU.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// The app's exit status from the exit record kiln-init wrote, if any.
    pub async fn exit_record(paths: &VmPaths) -> Option<serde_json::Value> {
        let bytes = tokio::fs::read(paths.config_disk()).await.ok()?;
        config_disk::decode_exit(&bytes)
    }
}

/// A locally administered unicast MAC derived from the instance id.
fn mac_of(suffix: &str) -> String {
    let digest = kiln_oci::sha256_digest(suffix.as_bytes());
    let hex = &digest["sha256:".len()..];
    format!(
        "02:{}:{}:{}:{}:{}",
        &hex[0..2],
        &hex[2..4],
        &hex[4..6],
        &hex[6..8],
        &hex[8..10]
    )
}

fn rootfs_err(tree: &Path, path: &Path, source: std::io::Error) -> AgentError {
    AgentError::Rootfs {
        image: tree.display().to_string(),
        path: path.to_owned(),
        source,
    }
}

/// Bytes of regular files in a tree plus a block per entry (an estimate of what ext4 needs).
async fn tree_bytes(tree: &Path) -> u64 {
    let tree = tree.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut total = 0u64;
        let mut stack = vec![tree];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(meta) = e.path().symlink_metadata() else {
                    continue;
                };
                total += 4096;
                if meta.is_dir() {
                    stack.push(e.path());
                } else if meta.is_file() {
                    total += meta.len();
                }
            }
        }
        total
    })
    .await
    .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_local_unicast_and_stable() {
        let a = mac_of("abcdefghij");
        assert_eq!(a, mac_of("abcdefghij"));
        assert_ne!(a, mac_of("abcdefghik"));
        assert!(a.starts_with("02:"));
        assert_eq!(a.len(), 17);
    }

    #[test]
    fn each_volume_is_a_drive_with_the_serial_kiln_init_looks_for() {
        let spec: WorkloadSpec = serde_json::from_value(serde_json::json!({
            "spec_version": "1.2",
            "instance_id": kiln_types::InstanceId::generate(),
            "app_id": kiln_types::AppId::generate(),
            "app_name": "demo",
            "release_id": kiln_types::ReleaseId::generate(),
            "release_version": 1,
            "process": "app",
            "image": {"registry": "r", "repository": "x", "digest": format!("sha256:{}", "a".repeat(64))},
            "vm": {"cpu": 1000, "memory": 256},
            "network": {"ipv6": "fdb5:696c:6e00:1::100", "gateway": "fdb5:696c:6e00:1::1"}
        }))
        .unwrap();
        let q = Qemu::new(QemuConfig {
            binary: "qemu-system-x86_64".into(),
            kernel: "/vmlinux".into(),
            accel: Accel::Kvm,
        });
        let paths = VmPaths { dir: "/i".into() };
        let files = [PathBuf::from("/v/a.ext4"), PathBuf::from("/v/b.ext4")];
        let argv = q.argv(&paths, &spec, "tap0", &files).join(" ");
        assert!(
            argv.contains("-drive id=vol1,file=/v/b.ext4,format=raw,if=none"),
            "{argv}"
        );
        assert!(
            argv.contains("virtio-blk-device,drive=vol0,serial=kiln-vol-0"),
            "{argv}"
        );
        assert!(kiln_types::guest::volume_serial(99).len() <= 20);
        assert!(!q
            .argv(&paths, &spec, "tap0", &[])
            .join(" ")
            .contains("vol0"));
    }
}
