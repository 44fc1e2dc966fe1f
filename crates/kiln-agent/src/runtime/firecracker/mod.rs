//! The Firecracker driver: each instance is a Firecracker microVM started by the jailer.
//!
//! Locked decision 0003 makes Firecracker the production runtime. These machines cannot boot it
//! (their `/dev/kvm` is PVM-backed and no Firecracker binary is installable here): the driver is
//! real code, but it has never booted a VM. Tests check what can be checked without Firecracker:
//! every document and request against Firecracker's API specification (through the real API
//! client talking to a spec-following test server), the hybrid vsock handshake against a peer
//! that follows Firecracker's documented protocol, the jail and its cleanup on the filesystem,
//! the namespace/tap plumbing, and the jailer's command line against its documented flags.
//!
//! Start of one instance, step by step:
//! 1. the shared ext4 root image of the image digest (the QEMU driver's builder: the unpacked
//!    tree plus `/.kiln/init`), read-only for every VM;
//! 2. in the instance's state directory: `instance.ext4` (an empty, sparse ext4 labelled
//!    `kiln-layer`: kiln-init makes it the upper layer of an overlay over the read-only root),
//!    `config.img` (the config disk, `kiln_types::guest::config_disk`), `log`;
//! 3. the network: namespace `kiln-<id>` with tap `tap0` and a veth to the host ([`jail`]);
//! 4. the jail: hard links of the kernel, the root image and the two drives under
//!    `<chroot_base>/<exec file>/<jail id>/root/`, plus `vm.json` in config-file boot;
//! 5. the jailer (`plan::plan`'s argv; own process group; stdout and stderr appended to `log`,
//!    so the guest's serial console lands there) forks Firecracker into a new PID namespace,
//!    writes `firecracker.pid` in the jail and exits; a restarted agent adopts the VM by that
//!    file, checked against `/proc/<pid>/cmdline`;
//! 6. with `--config-file` Firecracker boots at once; with API boot the agent sends the same
//!    configuration as requests on `api.sock`, then `InstanceStart`;
//! 7. the guest channel is the hybrid vsock `v.sock` (`CONNECT 52\n`, [`vsock`]).
//!
//! Stop: the stop request goes to kiln-init over the guest channel (as under QEMU) and
//! `SendCtrlAltDel` on the API socket (for kernels with the i8042 driver; kiln-init turns
//! Ctrl-Alt-Del into SIGINT); the guest ends by rebooting, which ends Firecracker. After the stop
//! timeout (plus 3 s) the VMM is killed. Teardown removes the jail, the cgroups and the network.

pub mod api;
pub mod jail;
pub mod plan;
pub mod vsock;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kiln_types::frame::Frame;
use kiln_types::guest::{config_disk, RunConfig};
use kiln_types::WorkloadSpec;

pub use plan::{
    boot_args, jail_id, plan, stop_request, vcpu_count, ApiRequest, BootMode, JailerConfig, Plan,
    GUEST_CHANNEL_PORT,
};

use crate::guest::Guest;
use crate::netlink;
use crate::runtime::qemu::{Accel, Qemu, QemuConfig};
use crate::AgentError;

/// The vsock context id of every VM: with hybrid vsock the CID never reaches the host kernel
/// (Firecracker proxies to Unix sockets), so it needs no host-wide uniqueness.
pub const GUEST_CID: u32 = 3;
/// How long the jailer may take to set up the jail and fork Firecracker.
const JAILER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long Firecracker may take to create its API socket.
const API_SOCKET_WAIT: Duration = Duration::from_secs(5);
/// Each API call's deadline.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// The smallest writable layer (sparse: unused space costs nothing).
const MIN_LAYER_BYTES: u64 = 1 << 30;

/// Settings of the Firecracker driver.
#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    /// The Firecracker binary (its file name must contain `firecracker`, as the jailer requires).
    pub firecracker: PathBuf,
    /// The jailer binary (same release as Firecracker).
    pub jailer: PathBuf,
    /// The guest kernel (an uncompressed `vmlinux`; `scripts/build-guest-kernel`).
    pub kernel: PathBuf,
    /// Where jails are built; must be on the data directory's filesystem (hard links).
    pub chroot_base: PathBuf,
    /// Base of the unprivileged uid and gid ranges Firecracker runs in: each VM runs as
    /// `base + n` with `n` in `0..ID_RANGE` derived from its instance id ([`ids_of`]), so one
    /// VMM cannot open another's private drives or tap.
    pub uid: u32,
    pub gid: u32,
    pub boot: BootMode,
}

/// How many uids (and gids) above the configured bases the VMs use.
pub const ID_RANGE: u32 = 1 << 16;

/// The uid and gid a VM runs as: the bases plus a number derived from the instance id (stable,
/// so a restarted agent computes the same; two instances share one only by a 1-in-65 536 chance,
/// which weakens their separation but breaks nothing).
pub fn ids_of(spec: &WorkloadSpec, uid_base: u32, gid_base: u32) -> (u32, u32) {
    let digest = kiln_oci::sha256_digest(spec.instance_id.as_str().as_bytes());
    let n = u32::from_str_radix(&digest["sha256:".len()..][..4], 16).unwrap_or(0) % ID_RANGE;
    (uid_base.saturating_add(n), gid_base.saturating_add(n))
}

/// The Firecracker driver cannot run on this host, or failed for one instance.
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    #[error("{what} {path} is missing or not executable")]
    Binary { what: &'static str, path: PathBuf },
    #[error("the Firecracker binary's name {name:?} must contain `firecracker` (the jailer requires it)")]
    ExecName { name: String },
    #[error("the guest kernel {path} cannot be read")]
    Kernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("/dev/kvm cannot be opened: Firecracker needs KVM")]
    NoKvm {
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: Firecracker cannot boot guests here; use `--driver qemu --qemu-accel tcg` or `--driver runc`")]
    NoHardwareVirtualization(&'static str),
    #[error("cannot prepare the jail")]
    Jail(#[source] jail::JailError),
    #[error("cannot run the jailer {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the jailer exited with {status}; its last output: {tail}")]
    Jailer { status: String, tail: String },
    #[error("the jailer did not finish within {}s", JAILER_TIMEOUT.as_secs())]
    JailerTimeout,
    #[error("the jailer left no running Firecracker (pid file {path})")]
    NoVmm { path: PathBuf },
    #[error("the API-socket boot failed")]
    Api(#[source] api::ApiCallError),
}

/// Why this host's KVM cannot boot a stock guest, from what the host shows: a PVM-backed
/// `/dev/kvm` (the `kvm_pvm` module) or a CPU without VMX/SVM. Pure, so it can be tested.
pub fn kvm_unusable(kvm_pvm_loaded: bool, cpuinfo: &str) -> Option<&'static str> {
    if kvm_pvm_loaded {
        return Some("this host's /dev/kvm is PVM-backed (kvm_pvm), which boots only PVM-enabled guest kernels");
    }
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    (!hw).then_some("the CPU shows no hardware virtualization (no vmx or svm flag)")
}

/// Checks the host can run the driver: binaries, kernel, and a KVM that boots stock guests.
pub fn check_host(config: &FirecrackerConfig) -> Result<(), FirecrackerError> {
    use std::os::unix::fs::PermissionsExt;
    for (what, path) in [
        ("the Firecracker binary", &config.firecracker),
        ("the jailer binary", &config.jailer),
    ] {
        let ok = std::fs::metadata(path)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        if !ok {
            return Err(FirecrackerError::Binary {
                what,
                path: path.clone(),
            });
        }
    }
    let name = config
        .firecracker
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains("firecracker") {
        return Err(FirecrackerError::ExecName { name });
    }
    std::fs::File::open(&config.kernel).map_err(|source| FirecrackerError::Kernel {
        path: config.kernel.clone(),
        source,
    })?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|source| FirecrackerError::NoKvm { source })?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    match kvm_unusable(Path::new("/sys/module/kvm_pvm").exists(), &cpuinfo) {
        Some(why) => Err(FirecrackerError::NoHardwareVirtualization(why)),
        None => Ok(()),
    }
}

/// Files of one instance in its state directory.
#[derive(Debug, Clone)]
pub(crate) struct FcPaths {
    pub dir: PathBuf,
}

impl FcPaths {
    pub fn layer(&self) -> PathBuf {
        self.dir.join(plan::DATA_DRIVE)
    }
    pub fn config_disk(&self) -> PathBuf {
        self.dir.join(plan::CONFIG_DRIVE)
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("log")
    }
}

/// The running driver.
pub(crate) struct Firecracker {
    pub config: FirecrackerConfig,
    jail: JailerConfig,
    /// Root images are the QEMU driver's (the same ext4 image boots under both VMMs); only its
    /// builder is used.
    images: Qemu,
    /// The kernel, copied once per agent run beside the jails (hard links cannot cross
    /// filesystems, and the operator's kernel may live anywhere).
    kernel: tokio::sync::OnceCell<PathBuf>,
}

impl Firecracker {
    pub fn new(config: FirecrackerConfig) -> Firecracker {
        let jail = JailerConfig {
            jailer: config.jailer.clone(),
            firecracker: config.firecracker.clone(),
            chroot_base: config.chroot_base.clone(),
            uid: config.uid,
            gid: config.gid,
        };
        let images = Qemu::new(QemuConfig {
            binary: PathBuf::new(),
            kernel: config.kernel.clone(),
            accel: Accel::Kvm,
        });
        Firecracker {
            config,
            jail,
            images,
            kernel: tokio::sync::OnceCell::new(),
        }
    }

    /// `<chroot_base>/kiln-kernels/vmlinux-<size>-<mtime>`: a world-readable copy of the kernel
    /// on the jails' filesystem, made on first use.
    async fn staged_kernel(&self) -> Result<PathBuf, jail::JailError> {
        self.kernel
            .get_or_try_init(|| async {
                use std::os::unix::fs::{MetadataExt, PermissionsExt};
                let src = &self.config.kernel;
                let err = |path: &Path| {
                    let path = path.to_owned();
                    move |source| jail::JailError::Write { path, source }
                };
                let meta = tokio::fs::metadata(src).await.map_err(err(src))?;
                let dir = self.config.chroot_base.join("kiln-kernels");
                tokio::fs::create_dir_all(&dir).await.map_err(err(&dir))?;
                let staged = dir.join(format!("vmlinux-{}-{}", meta.len(), meta.mtime()));
                if tokio::fs::metadata(&staged).await.is_err() {
                    let tmp = staged.with_extension("tmp");
                    tokio::fs::copy(src, &tmp).await.map_err(err(&tmp))?;
                    tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))
                        .await
                        .map_err(err(&tmp))?;
                    tokio::fs::rename(&tmp, &staged)
                        .await
                        .map_err(err(&staged))?;
                }
                Ok(staged)
            })
            .await
            .cloned()
    }

    pub async fn root_image(&self, tree: &Path, init: &Path) -> Result<PathBuf, AgentError> {
        self.images.root_image(tree, init).await
    }

    /// The jail root of an instance.
    pub fn jail_root(&self, spec: &WorkloadSpec) -> PathBuf {
        self.jail.jail_root(&jail_id(spec))
    }

    /// The guest channel of an instance: the VM's hybrid vsock socket in its jail.
    pub fn vsock_path(&self, spec: &WorkloadSpec) -> PathBuf {
        self.jail_root(spec).join(plan::VSOCK)
    }

    fn pid_file(&self, spec: &WorkloadSpec) -> PathBuf {
        self.jail_root(spec)
            .join(format!("{}.pid", self.jail.exec_file_name()))
    }

    fn api(&self, spec: &WorkloadSpec) -> api::ApiClient {
        api::ApiClient::new(self.jail_root(spec).join(plan::API_SOCKET), API_TIMEOUT)
    }

    /// Prepares the drives, network and jail, runs the jailer and (in API boot) configures and
    /// starts the VM.
    pub async fn start(
        &self,
        paths: &FcPaths,
        root_image: &Path,
        spec: &WorkloadSpec,
        run: &RunConfig,
        netns: &str,
        host_if: &str,
    ) -> Result<(), AgentError> {
        let fail = |source| AgentError::Firecracker {
            instance: spec.instance_id.clone(),
            source: Box::new(source),
        };
        let ferr = |p: PathBuf| {
            let instance = spec.instance_id.clone();
            move |source| AgentError::InstanceFile {
                instance,
                path: p,
                source,
            }
        };
        let cfg = paths.config_disk();
        let mut disk = config_disk::encode(run);
        // A whole number of 4 KiB blocks, whatever the VMM's block size.
        disk.resize(disk.len().div_ceil(4096) * 4096, 0);
        tokio::fs::write(&cfg, &disk)
            .await
            .map_err(ferr(cfg.clone()))?;
        let layer = paths.layer();
        let _ = tokio::fs::remove_file(&layer).await;
        let root_len = tokio::fs::metadata(root_image)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        let layer_bytes = root_len.max(MIN_LAYER_BYTES);
        netlink::run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-L",
                plan::LAYER_LABEL,
                &layer.display().to_string(),
                &format!("{}k", layer_bytes >> 10),
            ],
            None,
        )
        .await?;

        let (uid, gid) = ids_of(spec, self.config.uid, self.config.gid);
        jail::create_network(netns, host_if, spec.network.ipv6, uid, gid).await?;

        let (uid, gid) = ids_of(spec, self.config.uid, self.config.gid);
        let jailer = JailerConfig {
            uid,
            gid,
            ..self.jail.clone()
        };
        let plan = plan::plan(spec, jail::TAP, netns, GUEST_CID, &jailer, self.config.boot);
        let kernel = self
            .staged_kernel()
            .await
            .map_err(|e| fail(FirecrackerError::Jail(e)))?;
        let files = [
            jail::JailFile {
                source: kernel,
                name: plan::KERNEL,
                private: false,
            },
            jail::JailFile {
                source: root_image.to_owned(),
                name: plan::ROOT_DRIVE,
                private: false,
            },
            jail::JailFile {
                source: layer,
                name: plan::DATA_DRIVE,
                private: true,
            },
            jail::JailFile {
                source: cfg,
                name: plan::CONFIG_DRIVE,
                private: true,
            },
        ];
        jail::prepare(&plan.jail_root, &files, uid, gid)
            .await
            .map_err(|e| fail(FirecrackerError::Jail(e)))?;
        if self.config.boot == BootMode::ConfigFile {
            let doc = serde_json::to_vec_pretty(&plan.config).unwrap_or_default();
            jail::write_owned(&plan.jail_root.join(plan::CONFIG_FILE), &doc, uid, gid)
                .await
                .map_err(|e| fail(FirecrackerError::Jail(e)))?;
        }

        self.run_jailer(paths, &plan.jailer_argv)
            .await
            .map_err(fail)?;
        if self.pid(spec).await.is_none() {
            return Err(fail(FirecrackerError::NoVmm {
                path: self.pid_file(spec),
            }));
        }
        if self.config.boot == BootMode::Api {
            let client = self.api(spec);
            client
                .wait(API_SOCKET_WAIT)
                .await
                .map_err(|e| fail(FirecrackerError::Api(e)))?;
            for r in &plan.requests {
                client
                    .put(&r.path, &r.body)
                    .await
                    .map_err(|e| fail(FirecrackerError::Api(e)))?;
            }
        }
        Ok(())
    }

    /// Runs the jailer to completion (with `--new-pid-ns` it exits once Firecracker is forked).
    async fn run_jailer(&self, paths: &FcPaths, argv: &[String]) -> Result<(), FirecrackerError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(paths.console())
            .map_err(|source| FirecrackerError::Spawn {
                path: self.config.jailer.clone(),
                source,
            })?;
        let log2 = log.try_clone().map_err(|source| FirecrackerError::Spawn {
            path: self.config.jailer.clone(),
            source,
        })?;
        let (program, args) = argv.split_first().ok_or(FirecrackerError::JailerTimeout)?;
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            // Its own process group: a Ctrl-C at the agent's terminal does not reach the VMs.
            .process_group(0)
            .spawn()
            .map_err(|source| FirecrackerError::Spawn {
                path: self.config.jailer.clone(),
                source,
            })?;
        let status = match tokio::time::timeout(JAILER_TIMEOUT, child.wait()).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(FirecrackerError::Spawn {
                    path: self.config.jailer.clone(),
                    source,
                })
            }
            Err(_) => {
                let _ = child.kill().await;
                return Err(FirecrackerError::JailerTimeout);
            }
        };
        if !status.success() {
            let out = tokio::fs::read_to_string(paths.console())
                .await
                .unwrap_or_default();
            let tail: Vec<&str> = out.lines().rev().take(5).collect();
            return Err(FirecrackerError::Jailer {
                status: status.to_string(),
                tail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            });
        }
        Ok(())
    }

    /// The pid of the instance's Firecracker while it runs, from the jailer's pid file, checked
    /// against the process's command line (`--id=<jail id>`) so a recycled pid is not mistaken
    /// for it.
    pub async fn pid(&self, spec: &WorkloadSpec) -> Option<i32> {
        let pid: i32 = tokio::fs::read_to_string(self.pid_file(spec))
            .await
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.ok()?;
        let stat = tokio::fs::read_to_string(format!("/proc/{pid}/stat"))
            .await
            .unwrap_or_default();
        (is_vmm_of(&cmdline, &jail_id(spec)) && !is_zombie(&stat)).then_some(pid)
    }

    /// Asks the guest to stop (guest channel and Ctrl-Alt-Del), waits for the VMM to exit up to
    /// the stop timeout plus 3 s, then kills it.
    pub async fn stop(&self, spec: &WorkloadSpec, guest: &Guest) {
        if self.pid(spec).await.is_none() {
            return;
        }
        let asked = guest
            .send(Frame::Signal {
                stream: 0,
                signal: libc::SIGTERM,
            })
            .await;
        let stop = stop_request();
        let cad = self.api(spec).put(&stop.path, &stop.body).await;
        if let Err(e) = &cad {
            tracing::debug!(instance_id = %spec.instance_id, error = %crate::error_chain(e), "SendCtrlAltDel not delivered");
        }
        if asked || cad.is_ok() {
            let deadline = tokio::time::Instant::now()
                + Duration::from_millis(spec.stop.timeout_ms)
                + Duration::from_secs(3);
            while tokio::time::Instant::now() < deadline {
                if self.pid(spec).await.is_none() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tracing::warn!(instance_id = %spec.instance_id, "microVM did not exit after its stop request; killing");
        }
        self.kill(spec).await;
    }

    /// Kills the VMM (SIGKILL) and waits for it to be gone.
    pub async fn kill(&self, spec: &WorkloadSpec) {
        if let Some(pid) = self.pid(spec).await {
            Qemu::kill(pid, libc::SIGKILL);
            for _ in 0..100 {
                if self.pid(spec).await.is_none() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Removes everything of the VM outside the instance's state directory: the VMM, the jail,
    /// the cgroups and the network.
    pub async fn teardown(&self, spec: &WorkloadSpec, netns: &str, host_if: &str) {
        self.kill(spec).await;
        jail::remove(&self.jail_root(spec), &jail_id(spec)).await;
        jail::delete_network(netns, host_if).await;
    }

    /// The app's exit status from the exit record kiln-init wrote, if any.
    pub async fn exit_record(paths: &FcPaths) -> Option<serde_json::Value> {
        let bytes = tokio::fs::read(paths.config_disk()).await.ok()?;
        config_disk::decode_exit(&bytes)
    }
}

/// Whether a `/proc/<pid>/cmdline` is the Firecracker the jailer started for `id` (the jailer
/// passes `--id=<id>`; `--id <id>` is accepted too).
pub fn is_vmm_of(cmdline: &[u8], id: &str) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let joined = format!("--id={id}");
    args.contains(&joined.as_bytes())
        || args
            .windows(2)
            .any(|w| w[0] == b"--id" && w[1] == id.as_bytes())
}

/// A zombie (exited, not yet reaped) is not running.
fn is_zombie(stat: &str) -> bool {
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

#[cfg(test)]
mod standin_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_checks_name_the_reason() {
        assert!(kvm_unusable(true, "flags : fpu vmx")
            .unwrap()
            .contains("PVM"));
        assert!(kvm_unusable(false, "flags\t: fpu hypervisor")
            .unwrap()
            .contains("vmx"));
        assert_eq!(kvm_unusable(false, "flags\t: fpu vmx sse"), None);
        assert_eq!(kvm_unusable(false, "flags\t: svm"), None);
    }

    #[test]
    fn each_vm_gets_its_own_stable_ids_in_the_range() {
        let spec = |id: &str| -> WorkloadSpec {
            let mut v: serde_json::Value = serde_json::json!({
                "spec_version": kiln_types::WORKLOAD_SPEC_VERSION,
                "instance_id": kiln_types::InstanceId::generate(),
                "app_id": kiln_types::AppId::generate(),
                "app_name": "demo",
                "release_id": kiln_types::ReleaseId::generate(),
                "release_version": 1,
                "process": "app",
                "image": {"registry": "r", "repository": "x", "digest": format!("sha256:{}", "a".repeat(64))},
                "vm": {"cpu": 1000, "memory": 256},
                "network": {"ipv6": "fdb5:696c:6e00:1::100", "gateway": "fdb5:696c:6e00:1::1"}
            });
            if !id.is_empty() {
                v["instance_id"] = serde_json::json!(id);
            }
            serde_json::from_value(v).unwrap()
        };
        let a = spec("");
        let (u, g) = ids_of(&a, 10_000, 20_000);
        assert_eq!((u, g), ids_of(&a, 10_000, 20_000), "stable");
        assert_eq!(g - 20_000, u - 10_000);
        assert!((10_000..10_000 + ID_RANGE).contains(&u));
        let distinct: std::collections::BTreeSet<u32> = (0..50)
            .map(|_| ids_of(&spec(""), 10_000, 10_000).0)
            .collect();
        assert!(distinct.len() > 45, "ids spread: {}", distinct.len());
    }

    #[test]
    fn the_vmm_is_recognised_by_its_id() {
        let id = "i-abc";
        assert!(is_vmm_of(
            b"./firecracker\0--id=i-abc\0--start-time-us=1\0",
            id
        ));
        assert!(is_vmm_of(b"firecracker\0--id\0i-abc\0", id));
        assert!(!is_vmm_of(b"./firecracker\0--id=i-abcd\0", id));
        assert!(!is_vmm_of(b"sleep\0x\0", id));
        assert!(!is_vmm_of(b"", id));
        assert!(is_zombie("12 (firecracker) Z 1"));
        assert!(!is_zombie("12 (fire) cracker) S 1"));
    }
}
