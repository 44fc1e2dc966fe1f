//! Local volumes (decision 0011: a volume lives on one host).
//!
//! A volume is a sparse file `<data>/volumes/<volume id>.ext4` of the mount's initial size,
//! formatted ext4 the first time an instance needs it. The control plane names the volume in the
//! WorkloadSpec (`mounts[].volume_id`, chosen per instance slot at its first placement), so the
//! replacement of an instance of the same slot on this host attaches the same file, and its data
//! survives redeploys and restarts. The file is never removed by an instance's teardown.
//!
//! Attaching, per driver:
//! - runc: the file is loop-mounted at `<instance dir>/volumes/<name>` and runc bind-mounts that
//!   at the mount's path; teardown unmounts it and detaches the loop device (`umount -d`);
//! - qemu: the file is one more virtio-blk drive (`serial=kiln-vol-<i>`), mounted by kiln-init.
//!
//! One instance at a time: [`Volumes::acquire`] waits while another instance of this agent holds
//! the volume (the control plane already replaces such instances stop-first; this guards the
//! filesystem against a second mount whatever the order of events).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::Mutex;

use kiln_types::workload::MountSpec;
use kiln_types::{InstanceId, VolumeId};

use crate::{netlink, AgentError};

/// The host's volumes and which instance holds each.
pub(crate) struct Volumes {
    dir: PathBuf,
    holders: Mutex<HashMap<VolumeId, InstanceId>>,
    /// Volumes are created one at a time (mkfs is short and I/O bound).
    creating: Mutex<()>,
}

impl Volumes {
    pub fn new(data_dir: &Path) -> Volumes {
        Volumes {
            dir: data_dir.join("volumes"),
            holders: Mutex::new(HashMap::new()),
            creating: Mutex::new(()),
        }
    }

    /// The file of a volume.
    pub fn file(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.ext4"))
    }

    /// The volume's file, created (sparse, ext4) when it does not exist yet.
    pub async fn ensure(&self, id: &VolumeId, mount: &MountSpec) -> Result<PathBuf, AgentError> {
        let file = self.file(id);
        let _guard = self.creating.lock().await;
        if tokio::fs::metadata(&file).await.is_ok() {
            return Ok(file);
        }
        let err = |source| AgentError::Volume {
            volume: id.clone(),
            source,
        };
        tokio::fs::create_dir_all(&self.dir).await.map_err(err)?;
        // Built under a temporary name and renamed: a crash mid-mkfs leaves no half volume that
        // a later start would take for a good one.
        let tmp = self.dir.join(format!("{id}.ext4.tmp"));
        let f = tokio::fs::File::create(&tmp).await.map_err(err)?;
        f.set_len(mount.initial_size.bytes()).await.map_err(err)?;
        drop(f);
        netlink::run(
            "mkfs.ext4",
            &["-F", "-q", "-L", "kiln-volume", &tmp.display().to_string()],
            None,
        )
        .await?;
        tokio::fs::rename(&tmp, &file).await.map_err(err)?;
        tracing::info!(volume_id = %id, size_mib = mount.initial_size.0, "volume created");
        Ok(file)
    }

    /// Marks `id` held by `instance`, waiting up to `wait` for another holder to release it.
    pub async fn acquire(
        &self,
        id: &VolumeId,
        instance: &InstanceId,
        wait: Duration,
    ) -> Result<(), AgentError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            {
                let mut holders = self.holders.lock().await;
                match holders.get(id) {
                    Some(h) if h != instance => {}
                    _ => {
                        holders.insert(id.clone(), instance.clone());
                        return Ok(());
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let holder = self.holders.lock().await.get(id).cloned();
                return Err(AgentError::VolumeBusy {
                    volume: id.clone(),
                    holder: holder.map(|h| h.to_string()).unwrap_or_default(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes a deleted volume's file, unless an instance still holds it (then a later
    /// assignments snapshot, which names it again, removes it). Returns whether it is gone.
    pub async fn delete(&self, id: &VolumeId) -> bool {
        let holders = self.holders.lock().await;
        if holders.contains_key(id) {
            return false;
        }
        match tokio::fs::remove_file(self.file(id)).await {
            Ok(()) => {
                tracing::info!(volume_id = %id, "volume deleted");
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                tracing::warn!(volume_id = %id, error = %e, "cannot delete volume");
                false
            }
        }
    }

    /// Releases every volume `instance` holds (after its mounts are gone).
    pub async fn release(&self, instance: &InstanceId) {
        self.holders.lock().await.retain(|_, h| h != instance);
    }
}

/// Where a runc instance's volume is loop-mounted on the host.
pub(crate) fn host_mount_point(instance_dir: &Path, mount: &MountSpec) -> PathBuf {
    instance_dir.join("volumes").join(&mount.volume)
}

/// Loop-mounts a volume file at `target` (runc).
pub(crate) async fn mount_loop(file: &Path, target: &Path) -> Result<(), AgentError> {
    netlink::run(
        "mount",
        &[
            "-t",
            "ext4",
            "-o",
            "loop,nosuid,nodev",
            &file.display().to_string(),
            &target.display().to_string(),
        ],
        None,
    )
    .await
}

/// Unmounts every volume under `<instance dir>/volumes` and detaches its loop device. Returns
/// false when one could not be unmounted even lazily (the caller must then not remove the
/// directory, which would reach into the volume).
pub(crate) async fn unmount_all(instance_dir: &Path) -> bool {
    let dir = instance_dir.join("volumes");
    let Ok(mut entries) = tokio::fs::read_dir(&dir).await else {
        return true;
    };
    let mountinfo = tokio::fs::read_to_string("/proc/self/mountinfo")
        .await
        .unwrap_or_default();
    let mut ok = true;
    while let Ok(Some(e)) = entries.next_entry().await {
        let p = e.path().display().to_string();
        let mounted = mountinfo
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(p.as_str()));
        if !mounted {
            continue;
        }
        if netlink::run("umount", &["-d", &p], None).await.is_err()
            && netlink::run("umount", &["-l", "-d", &p], None)
                .await
                .is_err()
        {
            tracing::warn!(path = %p, "cannot unmount volume");
            ok = false;
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_types::MiB;

    fn mount(size: u64) -> MountSpec {
        MountSpec {
            volume: "data".into(),
            path: "/data".into(),
            initial_size: MiB(size),
            volume_id: None,
        }
    }

    #[tokio::test]
    async fn a_volume_is_a_sparse_ext4_file_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::new(dir.path());
        let id = VolumeId::generate();
        let file = v.ensure(&id, &mount(64)).await.unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < meta.len() / 2, "sparse");
        // ext4's superblock magic at 1024 + 0x38.
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(&bytes[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef]);
        // A second call keeps the file (and its data) as it is.
        std::fs::write(&file, b"kept").unwrap();
        let again = v.ensure(&id, &mount(64)).await.unwrap();
        assert_eq!(std::fs::read(&again).unwrap(), b"kept");
    }

    #[tokio::test]
    async fn one_instance_holds_a_volume_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::new(dir.path());
        let id = VolumeId::generate();
        let (a, b) = (InstanceId::generate(), InstanceId::generate());
        v.acquire(&id, &a, Duration::ZERO).await.unwrap();
        v.acquire(&id, &a, Duration::ZERO).await.unwrap();
        let err = v
            .acquire(&id, &b, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(a.as_str()), "{err}");
        v.release(&a).await;
        v.acquire(&id, &b, Duration::ZERO).await.unwrap();
    }

    #[tokio::test]
    async fn a_deleted_volume_goes_once_no_instance_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::new(dir.path());
        let id = VolumeId::generate();
        let file = v.ensure(&id, &mount(64)).await.unwrap();
        let holder = InstanceId::generate();
        v.acquire(&id, &holder, Duration::ZERO).await.unwrap();
        assert!(!v.delete(&id).await, "held volumes stay");
        assert!(file.exists());
        v.release(&holder).await;
        assert!(v.delete(&id).await);
        assert!(!file.exists());
        assert!(v.delete(&id).await, "deleting twice is fine");
    }
}
