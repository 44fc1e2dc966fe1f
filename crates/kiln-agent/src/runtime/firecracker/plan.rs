//! The pure part of the driver: everything Firecracker and its jailer receive for one instance,
//! computed from the WorkloadSpec without touching the host, so that tests can check every
//! document against Firecracker's API specification and every jailer flag against its docs.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use kiln_types::WorkloadSpec;

/// The vsock port kiln-init listens on for the guest channel.
pub const GUEST_CHANNEL_PORT: u32 = kiln_types::guest::VSOCK_CHANNEL_PORT;
/// File names inside the jail's root (paths Firecracker resolves inside its chroot).
pub const KERNEL: &str = "vmlinux";
pub const ROOT_DRIVE: &str = "rootfs.ext4";
pub const DATA_DRIVE: &str = "instance.ext4";
pub const CONFIG_DRIVE: &str = "config.img";
pub const VSOCK: &str = "v.sock";
pub const API_SOCKET: &str = "api.sock";
pub const CONFIG_FILE: &str = "vm.json";
/// The ext4 label of the instance's writable drive: kiln-init finds its writable layer by it
/// (`kiln.overlay=` on the kernel command line), not by device order.
pub const LAYER_LABEL: &str = "kiln-layer";
/// Memory the VMM itself may use on top of the guest's (Firecracker publishes ≤ 5 MiB).
pub const VMM_OVERHEAD_MIB: u64 = 16;
/// The cgroup (under each v1 controller's root) that holds one cgroup per microVM.
pub const PARENT_CGROUP: &str = "kiln-firecracker";
const CPU_PERIOD_US: u64 = 100_000;

/// How the driver hands Firecracker its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootMode {
    /// `--config-file vm.json`: Firecracker configures and starts the VM by itself.
    #[default]
    ConfigFile,
    /// The same configuration as requests on the API socket, then `InstanceStart`.
    Api,
}

/// Host-side settings of the jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    pub jailer: PathBuf,
    pub firecracker: PathBuf,
    pub chroot_base: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

impl JailerConfig {
    /// The last path component of the Firecracker binary: the jailer names the jail after it
    /// (and requires it to contain `firecracker`).
    pub fn exec_file_name(&self) -> String {
        self.firecracker
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firecracker".into())
    }

    /// `<chroot_base>/<exec_file_name>/<id>/root`, as the jailer builds it.
    pub fn jail_root(&self, id: &str) -> PathBuf {
        self.chroot_base
            .join(self.exec_file_name())
            .join(id)
            .join("root")
    }
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

/// The kernel command line: serial console, no PCI (MMIO devices), Firecracker's recommended
/// i8042 settings (fast probing; `SendCtrlAltDel` goes through the i8042), the read-only shared
/// root, kiln-init, its writable layer found by label, and "reboot to exit" (Firecracker has no
/// power-off device and exits on the guest's reset).
pub fn boot_args() -> String {
    format!(
        "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd \
         root=/dev/vda ro rootfstype=ext4 init=/.kiln/init kiln.overlay={LAYER_LABEL} kiln.exit=reboot quiet"
    )
}

/// Builds the plan for `spec`, using tap device `tap` inside the instance's namespace `netns`
/// and vsock context id `cid` (unique per host, at least 3).
pub fn plan(
    spec: &WorkloadSpec,
    tap: &str,
    netns: &str,
    cid: u32,
    jail: &JailerConfig,
    boot: BootMode,
) -> Plan {
    let boot_source = json!({ "kernel_image_path": KERNEL, "boot_args": boot_args() });
    let drive = |id: &str, root: bool, ro: bool, path: &str, cache: &str| {
        json!({
            "drive_id": id,
            "is_root_device": root,
            "is_read_only": ro,
            "path_on_host": path,
            "cache_type": cache,
            "io_engine": "Sync"
        })
    };
    // The root device is always /dev/vda; the others follow in this order, but kiln-init finds
    // them by content (label, config-disk magic), not by name.
    let drives = vec![
        drive("rootfs", true, true, ROOT_DRIVE, "Unsafe"),
        drive("instance", false, false, DATA_DRIVE, "Writeback"),
        drive("config", false, false, CONFIG_DRIVE, "Writeback"),
    ];
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
        "boot-source": boot_source,
        "drives": drives,
        "machine-config": machine,
        "network-interfaces": [net],
        "vsock": vsock
    });
    let put = |path: String, body: &Value| ApiRequest {
        method: "PUT",
        path,
        body: body.clone(),
    };
    let mut requests = vec![
        put("/boot-source".into(), &config["boot-source"]),
        put("/machine-config".into(), &config["machine-config"]),
    ];
    for d in config["drives"].as_array().into_iter().flatten() {
        let id = d["drive_id"].as_str().unwrap_or_default();
        requests.push(put(format!("/drives/{id}"), d));
    }
    requests.push(put(
        "/network-interfaces/eth0".into(),
        &config["network-interfaces"][0],
    ));
    requests.push(put("/vsock".into(), &config["vsock"]));
    requests.push(put(
        "/actions".into(),
        &json!({ "action_type": "InstanceStart" }),
    ));
    let id = jail_id(spec);
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
        netns_path(netns).display().to_string(),
        "--cgroup-version".into(),
        "1".into(),
        "--parent-cgroup".into(),
        PARENT_CGROUP.into(),
    ];
    for (k, v) in cgroup_limits(spec) {
        jailer_argv.push("--cgroup".into());
        jailer_argv.push(format!("{k}={v}"));
    }
    // `--new-pid-ns`: the jailer forks Firecracker into its own PID namespace, writes its pid to
    // `<jail root>/<exec file name>.pid` and exits, so the VMM is nobody's child (an agent
    // restart leaves it running) and the pid file is how a restarted agent finds it. No
    // `--daemonize`: the agent makes the jailer a session leader itself and keeps Firecracker's
    // stdout (the guest's serial console) in the instance's log.
    jailer_argv.extend(["--new-pid-ns", "--"].map(String::from));
    if boot == BootMode::ConfigFile {
        jailer_argv.extend(["--config-file", CONFIG_FILE].map(String::from));
    }
    jailer_argv.extend(["--api-sock", API_SOCKET].map(String::from));
    let jail_root = jail.jail_root(&id);
    Plan {
        config,
        requests,
        jailer_argv,
        jail_root,
    }
}

/// The cgroup v1 files the jailer writes for an instance: a memory hard cap (the guest's memory
/// plus the VMM's overhead), CPU shares in proportion to the allowance, and a CFS quota equal to
/// it (so a 0.5-CPU instance gets half a CPU even with two vCPUs).
pub fn cgroup_limits(spec: &WorkloadSpec) -> Vec<(&'static str, u64)> {
    let memory_limit = (spec.vm.memory.0 + VMM_OVERHEAD_MIB) * 1024 * 1024;
    let shares = (u64::from(spec.vm.cpu.0) * 1024 / 1000).max(2);
    let quota = (u64::from(spec.vm.cpu.0) * CPU_PERIOD_US / 1000).max(1000);
    vec![
        ("memory.limit_in_bytes", memory_limit),
        ("cpu.shares", shares),
        ("cpu.cfs_period_us", CPU_PERIOD_US),
        ("cpu.cfs_quota_us", quota),
    ]
}

/// Where `ip netns` keeps the handle of namespace `netns`.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new("/run/netns").join(netns)
}

/// The jailer's id: alphanumeric and hyphens, at most 64 characters.
pub fn jail_id(spec: &WorkloadSpec) -> String {
    spec.instance_id
        .as_str()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect()
}

/// The request that asks the guest to shut down (Firecracker sends Ctrl-Alt-Del to the guest).
pub fn stop_request() -> ApiRequest {
    ApiRequest {
        method: "PUT",
        path: "/actions".into(),
        body: json!({ "action_type": "SendCtrlAltDel" }),
    }
}
