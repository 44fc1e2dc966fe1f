use std::path::PathBuf;

use kiln_types::InstanceId;

/// A host-agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register the host with the control plane")]
    Register {
        #[source]
        source: Box<kiln_api::ApiError>,
    },
    #[error("cannot open the blob store")]
    BlobStore {
        #[source]
        source: Box<kiln_oci::OciError>,
    },
    #[error("cannot pull image {image}")]
    Pull {
        image: String,
        #[source]
        source: Box<kiln_oci::OciError>,
    },
    #[error("cannot unpack layer {digest} of image {image}")]
    Unpack {
        image: String,
        digest: String,
        #[source]
        source: Box<kiln_oci::OciError>,
    },
    #[error("cannot prepare the root filesystem of image {image} at {path}")]
    Rootfs {
        image: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path} for instance {instance}")]
    InstanceFile {
        instance: InstanceId,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("command `{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the image has no command to run: set an entrypoint or cmd in the image, or `cmd` in kiln.toml")]
    NoCommand,
    #[error("the Firecracker driver cannot run instance {instance}")]
    Firecracker {
        instance: InstanceId,
        #[source]
        source: Box<crate::runtime::firecracker::FirecrackerError>,
    },
    #[error("the Firecracker driver cannot run on this host")]
    FirecrackerHost {
        #[source]
        source: Box<crate::runtime::firecracker::FirecrackerError>,
    },
    #[error("user {user:?} of the image cannot be resolved in its /etc/passwd")]
    UnknownUser { user: String },
    #[error("cannot create volume {volume}")]
    Volume {
        volume: kiln_types::VolumeId,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume} is still attached to instance {holder}")]
    VolumeBusy {
        volume: kiln_types::VolumeId,
        holder: String,
    },
    #[error("mount of volume {volume:?} names no volume id (a spec from a control plane older than WorkloadSpec 1.2)")]
    NoVolumeId { volume: String },
}

impl AgentError {
    /// The control plane could not be reached (worth retrying), as opposed to refusing.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, AgentError::Register { source } if source.is_unreachable())
    }
}
