//! The guest side of the Firecracker driver's VM layout, booted under QEMU (the only VMM that
//! runs here: these hosts' `/dev/kvm` is PVM-backed, so Firecracker itself cannot boot).
//!
//! The kernel command line is the driver's own (`boot_args()`), and the drives are the ones its
//! plan gives Firecracker, in the same order and with the same read-only flags: the shared root
//! image read-only, the instance's empty writable layer (ext4 labelled `kiln-layer`), the config
//! disk. kiln-init must find the layer by its label, overlay it on the read-only root, run the
//! app on a writable root, write the exit record and end the VM by a reboot (Firecracker exits on
//! the guest's reset; QEMU does with `-no-reboot`). What this does not cover: Firecracker's own
//! devices (its virtio-mmio and vsock emulation), the jailer, and the hybrid vsock channel.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use kiln_agent::runtime::firecracker::{self, plan as fcplan, BootMode, JailerConfig};
use kiln_types::guest::{config_disk, RunConfig};

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn workload() -> kiln_types::WorkloadSpec {
    serde_json::from_value(serde_json::json!({
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
    }))
    .expect("a minimal WorkloadSpec")
}

#[test]
fn the_firecracker_guest_layout_boots_on_a_read_only_root_with_a_writable_layer() -> Result<()> {
    let kernel = kiln_testkit::dev::guest_kernel()?;
    let init = kiln_testkit::example::build_static()?.kiln_init;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();

    let tree = dir.join("tree");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", ".kiln/run"] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
        .context("busybox-static is installed by scripts/install-deps")?;
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh"))?;
    std::fs::copy(&init, tree.join(".kiln/init"))?;
    let mkfs = |label: &str, from: Option<&Path>, out: &Path| -> Result<()> {
        let mut c = Command::new("mkfs.ext4");
        c.args(["-q", "-F", "-L", label]);
        if let Some(t) = from {
            c.arg("-d").arg(t);
        }
        c.arg(out).arg("64M");
        run(&mut c).map(|_| ())
    };
    let root = dir.join(fcplan::ROOT_DRIVE);
    let layer = dir.join(fcplan::DATA_DRIVE);
    let config = dir.join(fcplan::CONFIG_DRIVE);
    mkfs("kiln-root", Some(&tree), &root)?;
    mkfs(fcplan::LAYER_LABEL, None, &layer)?;
    let run_config = RunConfig {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo written > /tmp/proof && cat /tmp/proof && mkdir -p /var/new && exit 7".into(),
        ],
        env: [("PATH".to_owned(), "/bin".to_owned())].into(),
        workdir: "/".into(),
        uid: 0,
        gid: 0,
        hostname: "fc-layout".into(),
        stop_signal: "SIGTERM".into(),
        stop_timeout_ms: 1000,
        network: None,
        secrets: None,
        mounts: Vec::new(),
        read_only_root: false,
    };
    std::fs::write(&config, config_disk::encode(&run_config))?;
    let root_before = std::fs::read(&root)?;

    let spec = workload();
    let jail = JailerConfig {
        jailer: "/usr/local/bin/jailer".into(),
        firecracker: "/usr/local/bin/firecracker".into(),
        chroot_base: dir.join("jailer"),
        uid: 10_000,
        gid: 10_000,
    };
    let plan = firecracker::plan(&spec, "tap0", "ns", 3, &jail, BootMode::ConfigFile);
    let mut append = plan.config["boot-source"]["boot_args"]
        .as_str()
        .context("boot_args")?
        .to_owned();
    // Under TCG the guest cannot calibrate its TSC on a busy host (see the QEMU driver).
    let mhz: f64 = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1)?.trim().parse().ok())
        .context("cpu MHz")?;
    append.push_str(&format!(" tsc_early_khz={}", (mhz * 1000.0) as u64));
    let console = dir.join("console.log");
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-M", "microvm,acpi=on"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args(["-m", "256", "-smp", "1", "-kernel"])
        .arg(&kernel)
        .args(["-append", &append])
        .arg("-serial")
        .arg(format!("file:{}", console.display()));
    // The plan's drives, in its order, with its read-only flags.
    for d in plan.config["drives"].as_array().context("drives")? {
        let id = d["drive_id"].as_str().context("drive_id")?;
        let file = dir.join(d["path_on_host"].as_str().context("path")?);
        let ro = if d["is_read_only"] == true {
            ",readonly=on"
        } else {
            ""
        };
        qemu.arg("-drive")
            .arg(format!(
                "id={id},file={},format=raw,if=none{ro}",
                file.display()
            ))
            .arg("-device")
            .arg(format!("virtio-blk-device,drive={id}"));
    }
    let mut child = qemu
        .spawn()
        .context("qemu-system-x86_64 (scripts/install-deps)")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!(
                "the VM did not end: {}",
                std::fs::read_to_string(&console).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(&console)?;
    ensure!(status.success(), "QEMU exited with {status}: {log}");

    let exit = config_disk::decode_exit(&std::fs::read(&config)?).context(log.clone())?;
    assert_eq!(exit["code"], 7, "the app's own exit status: {log}");
    assert!(log.contains("written"), "the app wrote on its root: {log}");
    assert!(
        std::fs::read(&root)? == root_before,
        "the shared root image is unchanged"
    );
    let proof = run(Command::new("debugfs")
        .arg("-R")
        .arg("cat /upper/tmp/proof")
        .arg(&layer))?;
    assert_eq!(
        proof.trim(),
        "written",
        "the write landed on the instance's layer"
    );
    Ok(())
}
