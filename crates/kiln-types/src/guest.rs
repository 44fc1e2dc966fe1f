//! What the agent hands `kiln-init` inside an instance.
//!
//! The agent writes a [`RunConfig`] as JSON to [`RUN_CONFIG_PATH`] inside the instance before boot;
//! kiln-init reads it as PID 1. It is resolved already: the image's entrypoint, cmd, env, workdir and
//! user merged with the manifest's overrides, so init needs no knowledge of OCI or manifests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where kiln-init finds its run configuration inside the instance.
pub const RUN_CONFIG_PATH: &str = "/.kiln/run.json";
/// Where the kiln-init binary is placed inside the instance.
pub const INIT_PATH: &str = "/.kiln/init";
/// Directory shared with the host under runc (a bind mount of the instance's `run/` directory).
pub const RUN_DIR: &str = "/.kiln/run";
/// The guest channel's Unix socket under runc, served by kiln-init, connected to by the agent.
pub const CHANNEL_SOCKET: &str = "/.kiln/run/channel.sock";

/// Everything kiln-init needs to start the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// argv of the app process; argv[0] is resolved against `PATH` in `env` when it has no '/'.
    pub argv: Vec<String>,
    /// Complete environment of the app process.
    pub env: BTreeMap<String, String>,
    /// Working directory ("/" when the image sets none).
    pub workdir: String,
    /// Numeric uid and gid to run as.
    pub uid: u32,
    pub gid: u32,
    /// The instance's hostname.
    pub hostname: String,
    /// Signal name sent to the app on stop (SIGTERM unless the manifest says otherwise).
    pub stop_signal: String,
    /// Milliseconds between the stop signal and SIGKILL.
    pub stop_timeout_ms: u64,
    /// Network configuration kiln-init applies inside the instance before starting the app (the
    /// same under runc and in a VM); `None` leaves the network as the runtime set it up.
    #[serde(default)]
    pub network: Option<GuestNetwork>,
    /// The secrets file kiln-init must write before starting the app; `None`: the app has none.
    #[serde(default)]
    pub secrets: Option<GuestSecrets>,
    /// Volumes the app needs at their paths before it starts (docs/specs/runtime/volume-mounts.md).
    #[serde(default)]
    pub mounts: Vec<GuestMount>,
    /// The root filesystem is read-only: in a VM kiln-init mounts tmpfs on `/tmp`, `/run` and the
    /// secrets directory, then remounts `/` read-only before the app starts (runc makes the root
    /// read-only itself).
    #[serde(default)]
    pub read_only_root: bool,
}

/// One volume as kiln-init sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMount {
    /// Absolute path inside the instance.
    pub path: String,
    /// In a VM: the serial of the virtio-blk drive holding the volume (an ext4 filesystem),
    /// which kiln-init finds through `/sys/block/vd*/serial` and mounts at `path`. `None`
    /// (runc): the runtime already bind-mounted it there; kiln-init only checks it is.
    #[serde(default)]
    pub serial: Option<String>,
}

/// The virtio-blk serial of a VM's `index`-th volume (at most 20 bytes, the virtio limit).
pub fn volume_serial(index: usize) -> String {
    format!("kiln-vol-{index}")
}

/// The app's secrets as kiln-init handles them: it waits for the agent's `Secrets` frame before
/// starting the app, writes [`crate::secrets::SECRETS_PATH`], and replaces it on later frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSecrets {
    /// The version the release pins (informational: init writes what the agent sends).
    pub version: u64,
    /// Also put every secret in the app's environment.
    #[serde(default)]
    pub export_env: bool,
    /// Signal sent to the app after the file is replaced in place (`SIGHUP`).
    #[serde(default = "default_reload_signal")]
    pub reload_signal: String,
}

fn default_reload_signal() -> String {
    "SIGHUP".into()
}

/// The instance's interface as kiln-init configures it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// Interface name inside the instance (`eth0`).
    pub interface: String,
    /// The instance's overlay address, configured as a /128.
    pub ipv6: std::net::Ipv6Addr,
    /// Next hop of the default route, reached on-link (the host side answers `fe80::1`).
    pub gateway: std::net::Ipv6Addr,
}

/// Name of the virtio-serial port that carries the guest channel in a VM (QEMU); kiln-init finds
/// its device through `/sys/class/virtio-ports/*/name`.
pub const VM_CHANNEL_PORT: &str = "kiln.channel";

/// The AF_VSOCK port kiln-init listens on for the guest channel in a VM with a vsock device and
/// no virtio-serial port (Firecracker): the agent reaches it through Firecracker's hybrid vsock
/// (`CONNECT 52\n` on the VM's Unix socket).
pub const VSOCK_CHANNEL_PORT: u32 = 52;

/// The config disk: how a VM's kiln-init gets its [`RunConfig`] and how the host learns the app's
/// exit status after the VM is gone.
///
/// A VM has no shared directory with the host, so the agent attaches a small raw block device:
/// bytes `[0, SECTOR)` are the exit record kiln-init writes before powering off (zeros until
/// then); bytes from `SECTOR` hold [`CONFIG_MAGIC`], a little-endian `u32` length and the run
/// configuration as JSON. The magic identifies the disk whatever name the kernel gives it. Both
/// decoders are total: any bytes give a value or an error, never a panic.
pub mod config_disk {
    use super::RunConfig;

    /// Size of the exit record area; the config starts here.
    pub const SECTOR: usize = 4096;
    /// Marks a Kiln config disk.
    pub const CONFIG_MAGIC: &[u8; 8] = b"KILNRUN1";
    /// Marks a written exit record.
    pub const EXIT_MAGIC: &[u8; 8] = b"KILNEXIT";
    /// Largest run configuration accepted (env included).
    pub const MAX_CONFIG: usize = 1024 * 1024;

    /// Why a config disk could not be read.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum ConfigDiskError {
        #[error(
            "not a Kiln config disk (no {} at byte {SECTOR})",
            String::from_utf8_lossy(CONFIG_MAGIC)
        )]
        NoMagic,
        #[error("run configuration of {len} bytes is larger than the {MAX_CONFIG} allowed or than the disk")]
        BadLength { len: usize },
        #[error("run configuration is not valid JSON: {reason}")]
        Json { reason: String },
    }

    /// The whole disk image for `config`, padded to a multiple of 512 bytes.
    pub fn encode(config: &RunConfig) -> Vec<u8> {
        let json = serde_json::to_vec(config).unwrap_or_default();
        let mut out = vec![0u8; SECTOR];
        out.extend_from_slice(CONFIG_MAGIC);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    /// Reads the run configuration from the start of a disk (at least `SECTOR + 12` bytes, more
    /// as the length field says).
    pub fn decode(disk: &[u8]) -> Result<RunConfig, ConfigDiskError> {
        let header = disk
            .get(SECTOR..SECTOR + 12)
            .ok_or(ConfigDiskError::NoMagic)?;
        if &header[..8] != CONFIG_MAGIC {
            return Err(ConfigDiskError::NoMagic);
        }
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        if len > MAX_CONFIG {
            return Err(ConfigDiskError::BadLength { len });
        }
        let json = disk
            .get(SECTOR + 12..SECTOR + 12 + len)
            .ok_or(ConfigDiskError::BadLength { len })?;
        serde_json::from_slice(json).map_err(|e| ConfigDiskError::Json {
            reason: e.to_string(),
        })
    }

    /// Bytes of the exit record for an app that ended with `code` or was killed by `signal`.
    pub fn encode_exit(code: Option<i32>, signal: Option<i32>) -> [u8; 512] {
        let mut out = [0u8; 512];
        out[..8].copy_from_slice(EXIT_MAGIC);
        let json = serde_json::json!({ "code": code, "signal": signal }).to_string();
        let n = json.len().min(512 - 8);
        out[8..8 + n].copy_from_slice(&json.as_bytes()[..n]);
        out
    }

    /// The exit record's JSON (`{"code":…,"signal":…}`), if kiln-init wrote one.
    pub fn decode_exit(disk: &[u8]) -> Option<serde_json::Value> {
        let record = disk.get(..512)?;
        if &record[..8] != EXIT_MAGIC {
            return None;
        }
        let body = &record[8..];
        let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
        serde_json::from_slice(&body[..end]).ok()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn config() -> RunConfig {
            RunConfig {
                argv: vec!["/bin/app".into(), "--port=8080".into()],
                env: [("A".to_owned(), "b".to_owned())].into(),
                workdir: "/".into(),
                uid: 1000,
                gid: 1000,
                hostname: "i-1".into(),
                stop_signal: "SIGTERM".into(),
                stop_timeout_ms: 5000,
                network: None,
                secrets: None,
                mounts: vec![crate::guest::GuestMount {
                    path: "/data".into(),
                    serial: Some(crate::guest::volume_serial(0)),
                }],
                read_only_root: true,
            }
        }

        #[test]
        fn round_trips_and_is_sector_aligned() {
            let disk = encode(&config());
            assert_eq!(disk.len() % 512, 0);
            assert_eq!(decode(&disk).unwrap(), config());
            assert_eq!(
                decode_exit(&disk),
                None,
                "no exit record before the app ran"
            );
        }

        #[test]
        fn exit_record_round_trips() {
            let mut disk = encode(&config());
            disk[..512].copy_from_slice(&encode_exit(Some(3), None));
            assert_eq!(decode_exit(&disk).unwrap()["code"], 3);
            assert_eq!(
                decode(&disk).unwrap(),
                config(),
                "the record leaves the config intact"
            );
        }

        #[test]
        fn bad_disks_are_errors_not_panics() {
            assert_eq!(decode(&[]), Err(ConfigDiskError::NoMagic));
            let mut disk = encode(&config());
            let cut = disk.len() - 600;
            assert!(decode(&disk[..SECTOR + 20]).is_err());
            disk[SECTOR + 8..SECTOR + 12].copy_from_slice(&u32::MAX.to_le_bytes());
            assert!(matches!(
                decode(&disk),
                Err(ConfigDiskError::BadLength { .. })
            ));
            disk[SECTOR + 8..SECTOR + 12].copy_from_slice(&3u32.to_le_bytes());
            assert!(matches!(decode(&disk), Err(ConfigDiskError::Json { .. })));
            assert!(decode(&disk[..cut.min(SECTOR + 12)]).is_err());
            // Every truncation of a valid disk is an error or the config, never a panic.
            let good = encode(&config());
            for n in 0..good.len() {
                let _ = decode(&good[..n]);
                let _ = decode_exit(&good[..n]);
            }
        }
    }
}
