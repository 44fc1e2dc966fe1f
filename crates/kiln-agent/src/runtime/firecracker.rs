//! The Firecracker driver's plan: everything it hands Firecracker and its jailer for one instance.
//!
//! Locked decision 0003 makes Firecracker the production runtime. These machines cannot boot it
//! (their `/dev/kvm` is PVM-backed and no Firecracker binary is installable here), so this module is
//! pure: from a WorkloadSpec it produces the `--config-file` document, the equivalent sequence of
//! API-socket requests, and the jailer's command line. Tests validate every document and request
//! body against Firecracker's own API specification (Swagger 2.0), and docs say plainly that the
//! driver was not booted here.
//!
//! Boot walk-through, as planned:
//! 1. the agent prepares a jail under `<chroot_base>/firecracker/<id>/root/` holding the kernel, the
//!    shared read-only root image and the instance's writable drive (hard links, so no copies);
//! 2. it runs `jailer ... -- --config-file vm.json --api-sock api.sock` in the instance's network
//!    namespace, with the uid, gid and cgroup limits below;
//! 3. Firecracker boots kiln-init (`init=/.kiln/init`) from the read-only root drive; the guest
//!    channel is the hybrid vsock at `v.sock` (the agent connects and sends `CONNECT <port>\n`);
//! 4. stopping sends `SendCtrlAltDel`, waits for the stop timeout, then kills the jailed process.

use std::path::PathBuf;

use serde_json::{json, Value};

use kiln_types::WorkloadSpec;

/// The vsock port kiln-init listens on for the guest channel.
pub const GUEST_CHANNEL_PORT: u32 = 52;
/// File names inside the jail's root.
pub const KERNEL: &str = "vmlinux";
pub const ROOT_DRIVE: &str = "rootfs.ext4";
pub const DATA_DRIVE: &str = "instance.ext4";
pub const VSOCK: &str = "v.sock";
pub const API_SOCKET: &str = "api.sock";
pub const CONFIG_FILE: &str = "vm.json";
/// Memory the VMM itself may use on top of the guest's (Firecracker publishes ≤ 5 MiB).
pub const VMM_OVERHEAD_MIB: u64 = 16;
const CPU_PERIOD_US: u64 = 100_000;

/// Host-side settings of the jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    pub jailer: PathBuf,
    pub firecracker: PathBuf,
    pub chroot_base: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

/// One API-socket request.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    pub method: &'static str,
    pub path: String,
    pub body: Value,
}

/// Everything Firecracker and the jailer receive for one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The `--config-file` document (a `FullVmConfiguration`).
    pub config: Value,
    /// The same configuration as API-socket requests, ending with `InstanceStart`.
    pub requests: Vec<ApiRequest>,
    /// argv of the jailer, Firecracker's own arguments after `--`.
    pub jailer_argv: Vec<String>,
    /// Where the jail's root lives on the host.
    pub jail_root: PathBuf,
}

/// vCPUs for a CPU allowance: Firecracker takes 1 or an even count, at most 32.
pub fn vcpu_count(spec: &WorkloadSpec) -> u32 {
    let n = spec.vm.cpu.0.div_ceil(1000).clamp(1, 32);
    if n > 1 && !n.is_multiple_of(2) {
        (n + 1).min(32)
    } else {
        n
    }
}

/// A stable, locally administered unicast MAC derived from the instance id.
pub fn guest_mac(spec: &WorkloadSpec) -> String {
    let b = spec.instance_id.suffix().as_bytes();
    let byte = |i: usize| b.get(i).copied().unwrap_or(0);
    format!(
        "02:fc:{:02x}:{:02x}:{:02x}:{:02x}",
        byte(0),
        byte(1),
        byte(2),
        byte(3)
    )
}

/// The kernel command line: serial console, no PCI (MMIO devices), read-only root, kiln-init.
pub fn boot_args() -> String {
    "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda ro init=/.kiln/init".into()
}

/// Builds the plan for `spec`, using tap device `tap` inside the instance's namespace `netns`
/// and vsock context id `cid` (unique per host, at least 3).
pub fn plan(spec: &WorkloadSpec, tap: &str, netns: &str, cid: u32, jail: &JailerConfig) -> Plan {
    let boot = json!({ "kernel_image_path": KERNEL, "boot_args": boot_args() });
    let root = json!({
        "drive_id": "rootfs",
        "is_root_device": true,
        "is_read_only": true,
        "path_on_host": ROOT_DRIVE,
        "cache_type": "Unsafe",
        "io_engine": "Sync"
    });
    let data = json!({
        "drive_id": "instance",
        "is_root_device": false,
        "is_read_only": false,
        "path_on_host": DATA_DRIVE,
        "cache_type": "Writeback",
        "io_engine": "Sync"
    });
    let machine = json!({
        "vcpu_count": vcpu_count(spec),
        "mem_size_mib": spec.vm.memory.0,
        "smt": false,
        "track_dirty_pages": false,
        "huge_pages": "None"
    });
    let net = json!({ "iface_id": "eth0", "host_dev_name": tap, "guest_mac": guest_mac(spec) });
    let vsock = json!({ "guest_cid": cid.max(3), "uds_path": VSOCK });
    let config = json!({
        "boot-source": boot,
        "drives": [root, data],
        "machine-config": machine,
        "network-interfaces": [net],
        "vsock": vsock
    });
    let requests = vec![
        ApiRequest {
            method: "PUT",
            path: "/boot-source".into(),
            body: config["boot-source"].clone(),
        },
        ApiRequest {
            method: "PUT",
            path: "/drives/rootfs".into(),
            body: config["drives"][0].clone(),
        },
        ApiRequest {
            method: "PUT",
            path: "/drives/instance".into(),
            body: config["drives"][1].clone(),
        },
        ApiRequest {
            method: "PUT",
            path: "/machine-config".into(),
            body: config["machine-config"].clone(),
        },
        ApiRequest {
            method: "PUT",
            path: "/network-interfaces/eth0".into(),
            body: config["network-interfaces"][0].clone(),
        },
        ApiRequest {
            method: "PUT",
            path: "/vsock".into(),
            body: config["vsock"].clone(),
        },
        ApiRequest {
            method: "PUT",
            path: "/actions".into(),
            body: json!({ "action_type": "InstanceStart" }),
        },
    ];
    let id = jail_id(spec);
    let memory_limit = (spec.vm.memory.0 + VMM_OVERHEAD_MIB) * 1024 * 1024;
    let shares = (u64::from(spec.vm.cpu.0) * 1024 / 1000).max(2);
    let quota = u64::from(spec.vm.cpu.0) * CPU_PERIOD_US / 1000;
    let mut jailer_argv: Vec<String> = vec![
        jail.jailer.display().to_string(),
        "--id".into(),
        id.clone(),
        "--exec-file".into(),
        jail.firecracker.display().to_string(),
        "--uid".into(),
        jail.uid.to_string(),
        "--gid".into(),
        jail.gid.to_string(),
        "--chroot-base-dir".into(),
        jail.chroot_base.display().to_string(),
        "--netns".into(),
        format!("/run/netns/{netns}"),
        "--cgroup-version".into(),
        "1".into(),
    ];
    for (k, v) in [
        ("memory.limit_in_bytes", memory_limit.to_string()),
        ("cpu.shares", shares.to_string()),
        ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
        ("cpu.cfs_quota_us", quota.to_string()),
    ] {
        jailer_argv.push("--cgroup".into());
        jailer_argv.push(format!("{k}={v}"));
    }
    jailer_argv.extend(
        [
            "--daemonize",
            "--",
            "--config-file",
            CONFIG_FILE,
            "--api-sock",
            API_SOCKET,
        ]
        .map(String::from),
    );
    let jail_root = jail.chroot_base.join("firecracker").join(&id).join("root");
    Plan {
        config,
        requests,
        jailer_argv,
        jail_root,
    }
}

/// The jailer's id: alphanumeric and hyphens, at most 64 characters.
pub fn jail_id(spec: &WorkloadSpec) -> String {
    spec.instance_id.as_str().replace('_', "-")
}

/// The request that asks the guest to shut down (Firecracker sends Ctrl-Alt-Del to the guest).
pub fn stop_request() -> ApiRequest {
    ApiRequest {
        method: "PUT",
        path: "/actions".into(),
        body: json!({ "action_type": "SendCtrlAltDel" }),
    }
}
