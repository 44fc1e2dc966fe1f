//! The runc driver: an OCI runtime bundle per instance, and the runc commands that run it.
//!
//! Used on hosts without usable KVM. The same root filesystem and the same `kiln-init` (PID 1) as
//! under a VM; the limits of the WorkloadSpec become cgroup limits (memory hard, CPU shares and
//! quota, pids), and the instance's network namespace is the one the agent prepared.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::json;
use tokio::process::Command;

use kiln_types::guest::{INIT_PATH, RUN_DIR};
use kiln_types::WorkloadSpec;

use crate::AgentError;

/// Largest number of processes an instance may have.
const PIDS_LIMIT: i64 = 4096;
const CPU_PERIOD_US: u64 = 100_000;

const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
    // For kiln-init's network setup only: it drops this from the bounding set before the app starts.
    "CAP_NET_ADMIN",
];

/// The runtime spec (config.json) of an instance's bundle. `volumes`: each volume's path inside
/// the instance and its loop mount on the host, bind-mounted read-write (also when the root is
/// read-only, which then gets tmpfs on `/tmp` and `/run`).
pub(crate) fn bundle_config(
    spec: &WorkloadSpec,
    rootfs: &Path,
    init_binary: &Path,
    run_dir: &Path,
    netns: &str,
    volumes: &[(String, PathBuf)],
) -> serde_json::Value {
    let memory = spec.vm.memory.bytes() as i64;
    let shares = (u64::from(spec.vm.cpu.0) * 1024 / 1000).max(2);
    let quota = u64::from(spec.vm.cpu.0) * CPU_PERIOD_US / 1000;
    let mut extra: Vec<serde_json::Value> = Vec::new();
    if spec.read_only_root {
        for dir in ["/tmp", "/run"] {
            extra.push(json!({ "destination": dir, "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=65536k"] }));
        }
    }
    for (path, source) in volumes {
        extra.push(json!({ "destination": path, "type": "bind", "source": source, "options": ["rbind", "rw", "nosuid", "nodev"] }));
    }
    let mut config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": [INIT_PATH],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": { "bounding": CAPS, "effective": CAPS, "permitted": CAPS },
            "noNewPrivileges": false
        },
        "root": { "path": rootfs, "readonly": spec.read_only_root },
        "hostname": spec.instance_id.as_str().replace('_', "-"),
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": INIT_PATH, "type": "bind", "source": init_binary, "options": ["bind", "ro", "nosuid", "nodev"] },
            { "destination": RUN_DIR, "type": "bind", "source": run_dir, "options": ["bind", "rw", "nosuid", "nodev", "noexec"] },
            // The secrets file's tmpfs: never on the instance's (or the host's) disk.
            { "destination": kiln_types::secrets::SECRETS_DIR, "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "noexec", "mode=0700", "size=1024k"] }
        ],
        "linux": {
            "namespaces": [
                { "type": "pid" },
                { "type": "ipc" },
                { "type": "uts" },
                { "type": "mount" },
                { "type": "network", "path": format!("/run/netns/{netns}") }
            ],
            "cgroupsPath": format!("/kiln/{}", spec.instance_id),
            "resources": {
                "memory": { "limit": memory, "swap": memory },
                "cpu": { "shares": shares, "quota": quota as i64, "period": CPU_PERIOD_US },
                "pids": { "limit": PIDS_LIMIT }
            },
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    });
    if let Some(mounts) = config["mounts"].as_array_mut() {
        mounts.extend(extra);
    }
    config
}

/// The runc binary with its state root.
#[derive(Debug, Clone)]
pub(crate) struct Runc {
    pub binary: PathBuf,
    pub root: PathBuf,
}

/// What `runc state` says about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct State {
    pub status: String,
    pub pid: i64,
}

impl Runc {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.root);
        c
    }

    async fn output(&self, args: &[&str]) -> Result<std::process::Output, AgentError> {
        let command = format!("runc {}", args.join(" "));
        self.cmd()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| AgentError::Spawn { command, source })
    }

    /// Starts the container detached; its stdout and stderr go to `log`.
    pub(crate) async fn run(&self, id: &str, bundle: &Path, log: &Path) -> Result<(), AgentError> {
        let command = format!("runc run --detach {id}");
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
        };
        let (out, err) = match (open(), open()) {
            (Ok(o), Ok(e)) => (o, e),
            (Err(source), _) | (_, Err(source)) => {
                return Err(AgentError::Spawn { command, source })
            }
        };
        let status = self
            .cmd()
            .args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg("--pid-file")
            .arg(bundle.join("pid"))
            .arg(id)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // The container must outlive the agent: never tie it to our process group's signals.
            .process_group(0)
            .status()
            .await
            .map_err(|source| AgentError::Spawn {
                command: command.clone(),
                source,
            })?;
        if !status.success() {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = tail
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(AgentError::Command {
                command,
                stderr: tail,
            });
        }
        Ok(())
    }

    /// The container's state, or `None` when runc does not know it.
    pub(crate) async fn state(&self, id: &str) -> Option<State> {
        let out = self.output(&["state", id]).await.ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(State {
            status: v["status"].as_str()?.to_owned(),
            pid: v["pid"].as_i64().unwrap_or(0),
        })
    }

    pub(crate) async fn kill(&self, id: &str, signal: &str) -> Result<(), AgentError> {
        let out = self.output(&["kill", id, signal]).await?;
        if !out.status.success() {
            return Err(AgentError::Command {
                command: format!("runc kill {id} {signal}"),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }

    pub(crate) async fn delete(&self, id: &str) {
        let _ = self.output(&["delete", "--force", id]).await;
    }
}
