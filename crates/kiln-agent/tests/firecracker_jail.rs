//! The Firecracker driver's host-side preparation, checked on the real filesystem and network
//! stack (as root, in temp dirs and a throwaway namespace): hard links that really are hard
//! links, ownership for the jailed uid/gid, cleanup that leaves nothing, and the namespace with
//! its tap and veth. The jailer and Firecracker themselves never ran: these hosts cannot boot
//! Firecracker.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use kiln_agent::runtime::firecracker::jail::{self, JailError, JailFile};

const UID: u32 = 10_123;
const GID: u32 = 10_456;

fn file(dir: &Path, name: &str, mode: u32) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, name.as_bytes()).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[tokio::test]
async fn the_jail_holds_hard_links_owned_as_firecracker_needs_and_cleanup_removes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("data");
    std::fs::create_dir_all(&store).unwrap();
    let kernel = file(&store, "vmlinux", 0o444);
    let rootfs = file(&store, "root.ext4", 0o644);
    let layer = file(&store, "instance.ext4", 0o644);
    let config = file(&store, "config.img", 0o644);
    let root = tmp.path().join("jailer/firecracker/i-abc/root");
    let files = [
        JailFile {
            source: kernel.clone(),
            name: "vmlinux",
            private: false,
        },
        JailFile {
            source: rootfs.clone(),
            name: "rootfs.ext4",
            private: false,
        },
        JailFile {
            source: layer.clone(),
            name: "instance.ext4",
            private: true,
        },
        JailFile {
            source: config.clone(),
            name: "config.img",
            private: true,
        },
    ];
    // A leftover of an earlier attempt is cleared.
    std::fs::create_dir_all(root.join("stale")).unwrap();
    jail::prepare(&root, &files, UID, GID).await.unwrap();
    assert!(!root.join("stale").exists());
    for f in &files {
        let (src, dst) = (
            std::fs::metadata(&f.source).unwrap(),
            std::fs::metadata(root.join(f.name)).unwrap(),
        );
        assert_eq!(
            (src.dev(), src.ino()),
            (dst.dev(), dst.ino()),
            "{} is a hard link",
            f.name
        );
        assert_eq!(dst.nlink(), 2);
        if f.private {
            assert_eq!((dst.uid(), dst.gid()), (UID, GID), "{}", f.name);
            assert_eq!(dst.mode() & 0o777, 0o600, "{}", f.name);
        } else {
            // Shared inodes are left to their owner (other jails link them too).
            assert_eq!((dst.uid(), dst.gid()), (src.uid(), src.gid()));
            assert_eq!(dst.mode() & 0o004, 0o004);
        }
    }
    jail::write_owned(&root.join("vm.json"), b"{}", UID, GID)
        .await
        .unwrap();
    let vm = std::fs::metadata(root.join("vm.json")).unwrap();
    assert_eq!((vm.uid(), vm.gid(), vm.mode() & 0o777), (UID, GID, 0o600));

    // What the jailer and Firecracker add: device node, sockets, pid file.
    std::fs::create_dir_all(root.join("dev/net")).unwrap();
    std::fs::write(root.join("firecracker.pid"), b"1").unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(root.join("api.sock")).unwrap();
    jail::remove(&root, "i-abc").await;
    assert!(!root.parent().unwrap().exists(), "the jail is gone");
    assert!(
        tmp.path().join("jailer/firecracker").exists(),
        "its parent stays"
    );
    // The instance's own files are untouched (the agent removes its state directory itself).
    for f in [&kernel, &rootfs, &layer, &config] {
        assert_eq!(std::fs::metadata(f).unwrap().nlink(), 1);
    }
}

#[tokio::test]
async fn shared_files_must_be_world_readable_and_on_the_jails_filesystem() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = file(tmp.path(), "vmlinux", 0o600);
    let root = tmp.path().join("jail/root");
    let err = jail::prepare(
        &root,
        &[JailFile {
            source: secret,
            name: "vmlinux",
            private: false,
        }],
        UID,
        GID,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, JailError::NotWorldReadable { .. }), "{err:?}");

    // /dev/shm is a tmpfs here, the temp dir is not: a hard link cannot cross.
    let other = tempfile::tempdir_in("/dev/shm").unwrap();
    let far = file(other.path(), "root.ext4", 0o644);
    let err = jail::prepare(
        &root,
        &[JailFile {
            source: far,
            name: "rootfs.ext4",
            private: false,
        }],
        UID,
        GID,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, JailError::CrossDevice { .. }), "{err}");
    assert!(err.to_string().contains("chroot base"), "{err}");
}

fn ip(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_network_namespace_holds_the_tap_and_routes_to_the_host_and_is_removed() {
    let suffix = format!("{:08x}", std::process::id() ^ 0x5eed);
    let (netns, host_if) = (format!("kiln-fct{suffix}"), format!("kvt{suffix}"));
    let addr: std::net::Ipv6Addr = "fdb5:696c:6e00:7::42".parse().unwrap();
    jail::create_network(&netns, &host_if, addr, UID, GID)
        .await
        .unwrap();
    let tap = ip(&["-n", &netns, "-d", "link", "show", jail::TAP]);
    assert!(tap.contains("tun type tap"), "{tap}");
    assert!(
        tap.contains(&format!("user {UID}")) && tap.contains(&format!("group {GID}")),
        "{tap}"
    );
    let routes = ip(&["-n", &netns, "-6", "route", "show"]);
    assert!(
        routes.contains(&format!("{addr} dev {}", jail::TAP)),
        "{routes}"
    );
    assert!(
        routes.contains(&format!("default via fe80::1 dev {}", jail::NS_VETH)),
        "{routes}"
    );
    let host_routes = ip(&["-6", "route", "show", &format!("{addr}/128")]);
    assert!(
        host_routes.contains(&format!("via fe80::2 dev {host_if}")),
        "{host_routes}"
    );
    let fwd = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns,
            "cat",
            "/proc/sys/net/ipv6/conf/all/forwarding",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1");

    jail::delete_network(&netns, &host_if).await;
    assert!(!ip(&["netns", "list"]).contains(&netns));
    assert!(ip(&["link", "show", &host_if]).is_empty());
    assert!(ip(&["-6", "route", "show", &format!("{addr}/128")]).is_empty());
}

#[tokio::test]
async fn cleanup_removes_the_cgroups_the_jailer_creates() {
    // The jailer creates `<controller root>/kiln-firecracker/<id>` (see `--parent-cgroup`);
    // here the directories are made by hand on the host's v1 hierarchy, as the jailer would.
    let id = format!("kiln-test-{}", std::process::id());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let dirs = jail::cgroup_dirs(&mounts, &id);
    assert!(
        dirs.len() >= 2,
        "memory and cpu v1 controllers are mounted on these hosts: {dirs:?}"
    );
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
        assert!(d.join("tasks").exists(), "{} is a cgroup", d.display());
    }
    // The limits the plan hands the jailer are accepted by the kernel, file by file, in the
    // order of the jailer's argv.
    for (cpu, memory) in [(250u32, 128u64), (1500, 1024)] {
        let spec: kiln_types::WorkloadSpec = serde_json::from_value(serde_json::json!({
            "spec_version": kiln_types::WORKLOAD_SPEC_VERSION,
            "instance_id": kiln_types::InstanceId::generate(),
            "app_id": kiln_types::AppId::generate(),
            "app_name": "demo",
            "release_id": kiln_types::ReleaseId::generate(),
            "release_version": 1,
            "process": "app",
            "image": {"registry": "r", "repository": "x", "digest": format!("sha256:{}", "a".repeat(64))},
            "vm": {"cpu": cpu, "memory": memory},
            "network": {"ipv6": "fdb5:696c:6e00:1::100", "gateway": "fdb5:696c:6e00:1::1"}
        }))
        .unwrap();
        for (file, value) in kiln_agent::runtime::firecracker::plan::cgroup_limits(&spec) {
            let dir = dirs
                .iter()
                .find(|d| d.join(file).exists())
                .unwrap_or_else(|| panic!("no controller has {file}"));
            std::fs::write(dir.join(file), value.to_string())
                .unwrap_or_else(|e| panic!("{file}={value}: {e}"));
            let back: u64 = std::fs::read_to_string(dir.join(file))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_eq!(back, value, "{file}");
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    jail::remove(&tmp.path().join(&id).join("root"), &id).await;
    for d in &dirs {
        assert!(!d.exists(), "{} removed", d.display());
        // The parent is shared by every VM and stays in production; a test leaves none.
        let _ = std::fs::remove_dir(d.parent().unwrap());
    }
}
