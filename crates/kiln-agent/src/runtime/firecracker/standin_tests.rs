//! The driver's start, adoption, stop and teardown, run for real against stand-ins for the
//! jailer and Firecracker (`standin/*.py`, as root).
//!
//! The stand-ins follow the published behaviour the driver relies on — the jailer's jail path and
//! `--new-pid-ns` pid file (`docs/jailer.md`), Firecracker's `--config-file`, API socket and
//! `204` answers, its exit when the guest resets after `SendCtrlAltDel` — and nothing of Kiln's.
//! They do not chroot, switch uid, create cgroups or run a VM: Firecracker cannot run on these
//! hosts (PVM-backed `/dev/kvm`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use super::*;

fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn spec() -> WorkloadSpec {
    serde_json::from_value(serde_json::json!({
        "spec_version": kiln_types::WORKLOAD_SPEC_VERSION,
        "instance_id": kiln_types::InstanceId::generate(),
        "app_id": kiln_types::AppId::generate(),
        "app_name": "demo",
        "release_id": kiln_types::ReleaseId::generate(),
        "release_version": 1,
        "process": "app",
        "image": {"registry": "r", "repository": "x", "digest": format!("sha256:{}", "a".repeat(64))},
        "vm": {"cpu": 1000, "memory": 128},
        "network": {"ipv6": "fdb5:696c:6e00:9::42", "gateway": "fdb5:696c:6e00:9::1"},
        "stop": {"signal": "SIGTERM", "timeout_ms": 3000}
    }))
    .expect("a WorkloadSpec")
}

fn run_config() -> RunConfig {
    RunConfig {
        argv: vec!["/app".into()],
        env: Default::default(),
        workdir: "/".into(),
        uid: 0,
        gid: 0,
        hostname: "h".into(),
        stop_signal: "SIGTERM".into(),
        stop_timeout_ms: 3000,
        network: None,
        secrets: None,
        mounts: Vec::new(),
        read_only_root: false,
    }
}

struct Host {
    _tmp: tempfile::TempDir,
    config: FirecrackerConfig,
    root_image: PathBuf,
    data: PathBuf,
}

fn host(boot: BootMode) -> Host {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let jailer = script(&bin, "jailer", include_str!("standin/jailer.py"));
    let firecracker = script(&bin, "firecracker", include_str!("standin/firecracker.py"));
    let kernel = tmp.path().join("vmlinux");
    std::fs::write(&kernel, b"kernel").unwrap();
    let root_image = tmp.path().join("root.ext4");
    std::fs::write(&root_image, vec![0u8; 4096]).unwrap();
    std::fs::set_permissions(&root_image, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = tmp.path().join("data");
    Host {
        config: FirecrackerConfig {
            firecracker,
            jailer,
            kernel,
            chroot_base: tmp.path().join("jailer"),
            uid: 10_000,
            gid: 10_000,
            boot,
        },
        root_image,
        data,
        _tmp: tmp,
    }
}

async fn requests_log(fc: &Firecracker, spec: &WorkloadSpec) -> String {
    tokio::fs::read_to_string(fc.jail_root(spec).join("requests.log"))
        .await
        .unwrap_or_default()
}

#[tokio::test]
async fn api_boot_adoption_clean_stop_and_teardown() {
    let h = host(BootMode::Api);
    let fc = Firecracker::new(h.config.clone());
    let spec = spec();
    let (netns, host_if) = netlink::names(spec.instance_id.suffix());
    let paths = FcPaths {
        dir: h.data.join(spec.instance_id.as_str()),
    };
    tokio::fs::create_dir_all(&paths.dir).await.unwrap();
    fc.start(
        &paths,
        &h.root_image,
        &spec,
        &run_config(),
        &netns,
        &host_if,
    )
    .await
    .unwrap();
    let pid = fc.pid(&spec).await.expect("Firecracker runs");

    // The jailer got the planned argv; Firecracker got the planned requests, in order.
    let (uid, gid) = ids_of(&spec, 10_000, 10_000);
    let jailer = JailerConfig {
        uid,
        gid,
        ..fc.jail.clone()
    };
    let plan = plan::plan(&spec, jail::TAP, &netns, GUEST_CID, &jailer, BootMode::Api);
    let argv = tokio::fs::read_to_string(fc.jail_root(&spec).join("jailer.argv"))
        .await
        .unwrap();
    assert_eq!(
        argv.lines().skip(1).collect::<Vec<_>>(),
        plan.jailer_argv[1..]
    );
    let log = requests_log(&fc, &spec).await;
    let got: Vec<&str> = log.lines().collect();
    assert_eq!(got.len(), plan.requests.len(), "{log}");
    for (line, r) in got.iter().zip(&plan.requests) {
        let (head, body) = line.split_at(line.find(' ').unwrap() + 1);
        let (path, body) = body.split_once(' ').unwrap();
        assert_eq!((head.trim(), path), (r.method, r.path.as_str()));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap(),
            r.body
        );
    }
    // The jail holds the drives as hard links, the private ones owned by the VM's ids.
    let layer = std::fs::metadata(fc.jail_root(&spec).join(plan::DATA_DRIVE)).unwrap();
    assert_eq!(layer.ino(), std::fs::metadata(paths.layer()).unwrap().ino());
    assert_eq!((layer.uid(), layer.gid()), (uid, gid));

    // A restarted agent (a new driver value) adopts the same process.
    let restarted = Firecracker::new(h.config.clone());
    assert_eq!(restarted.pid(&spec).await, Some(pid));

    // Clean stop: SendCtrlAltDel reaches Firecracker, which exits; no kill needed.
    let guest = crate::guest::Guest::new_hybrid_vsock(
        spec.instance_id.clone(),
        spec.app_id.clone(),
        fc.vsock_path(&spec),
        GUEST_CHANNEL_PORT,
    );
    let started = Instant::now();
    restarted.stop(&spec, &guest).await;
    assert!(fc.pid(&spec).await.is_none());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "exited on request"
    );
    assert!(requests_log(&fc, &spec)
        .await
        .ends_with("PUT /actions {\"action_type\":\"SendCtrlAltDel\"}\n"));

    fc.teardown(&spec, &netns, &host_if).await;
    assert!(
        !fc.jail_root(&spec).parent().unwrap().exists(),
        "jail removed"
    );
    let ns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&ns.stdout).contains(&netns));
    assert!(!Path::new(&format!("/sys/class/net/{host_if}")).exists());
}

#[tokio::test]
async fn config_file_boot_and_a_guest_that_ignores_the_stop_is_killed() {
    let h = host(BootMode::ConfigFile);
    let fc = Firecracker::new(h.config.clone());
    let mut spec = spec();
    spec.stop.timeout_ms = 200;
    let (netns, host_if) = netlink::names(spec.instance_id.suffix());
    let paths = FcPaths {
        dir: h.data.join(spec.instance_id.as_str()),
    };
    tokio::fs::create_dir_all(&paths.dir).await.unwrap();
    fc.start(
        &paths,
        &h.root_image,
        &spec,
        &run_config(),
        &netns,
        &host_if,
    )
    .await
    .unwrap();
    assert!(fc.pid(&spec).await.is_some());
    // Firecracker read the same document the plan validates against the spec; no API requests.
    let (uid, gid) = ids_of(&spec, 10_000, 10_000);
    let jailer = JailerConfig {
        uid,
        gid,
        ..fc.jail.clone()
    };
    let plan = plan::plan(
        &spec,
        jail::TAP,
        &netns,
        GUEST_CID,
        &jailer,
        BootMode::ConfigFile,
    );
    let mut log = String::new();
    for _ in 0..100 {
        log = requests_log(&fc, &spec).await;
        if !log.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let doc = log
        .strip_prefix("CONFIG ")
        .expect("the config file was read");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(doc.trim()).unwrap(),
        plan.config
    );
    let vm = std::fs::metadata(fc.jail_root(&spec).join(plan::CONFIG_FILE)).unwrap();
    assert_eq!((vm.uid(), vm.gid(), vm.mode() & 0o777), (uid, gid, 0o600));

    // This "guest" ignores Ctrl-Alt-Del: the VMM is killed after the stop timeout + 3 s.
    tokio::fs::write(fc.jail_root(&spec).join("IGNORE_CAD"), b"")
        .await
        .unwrap();
    let guest = crate::guest::Guest::new_hybrid_vsock(
        spec.instance_id.clone(),
        spec.app_id.clone(),
        fc.vsock_path(&spec),
        GUEST_CHANNEL_PORT,
    );
    let started = Instant::now();
    fc.stop(&spec, &guest).await;
    assert!(fc.pid(&spec).await.is_none());
    assert!(
        started.elapsed() >= Duration::from_millis(3200),
        "waited before killing"
    );
    fc.teardown(&spec, &netns, &host_if).await;
    assert!(!fc.jail_root(&spec).parent().unwrap().exists());
}

#[tokio::test]
async fn a_failing_jailer_is_reported_with_its_output() {
    let h = host(BootMode::ConfigFile);
    let mut config = h.config.clone();
    config.jailer = script(
        h.config.jailer.parent().unwrap(),
        "bad-jailer",
        "#!/bin/sh\necho 'Failed to create cgroup: permission denied' >&2\nexit 3\n",
    );
    let fc = Firecracker::new(config);
    let spec = spec();
    let (netns, host_if) = netlink::names(spec.instance_id.suffix());
    let paths = FcPaths {
        dir: h.data.join(spec.instance_id.as_str()),
    };
    tokio::fs::create_dir_all(&paths.dir).await.unwrap();
    let err = fc
        .start(
            &paths,
            &h.root_image,
            &spec,
            &run_config(),
            &netns,
            &host_if,
        )
        .await
        .unwrap_err();
    let chain = crate::error_chain(&err);
    assert!(chain.contains("exit status: 3"), "{chain}");
    assert!(chain.contains("Failed to create cgroup"), "{chain}");
    fc.teardown(&spec, &netns, &host_if).await;
    assert!(!fc.jail_root(&spec).parent().unwrap().exists());
}
