//! `kilnd dev --driver firecracker` refuses to start, with the reason and what to set, when the
//! host cannot run the driver. (Booting under Firecracker is impossible on these hosts — their
//! `/dev/kvm` is PVM-backed — so these are the driver's only end-to-end checks here.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn kilnd(data: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .args(["dev", "--data-dir"])
        .arg(data)
        .args([
            "--api-listen",
            "127.0.0.1:0",
            "--edge-listen",
            "127.0.0.1:0",
            "--driver",
            "firecracker",
        ])
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn executable(dir: &Path, name: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, b"#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.display().to_string()
}

#[test]
fn the_firecracker_driver_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let kernel = tmp.path().join("vmlinux");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let kernel = kernel.display().to_string();

    let (ok, err) = kilnd(&data, &[]);
    assert!(!ok);
    assert!(err.contains("--guest-kernel"), "{err}");

    let (ok, err) = kilnd(
        &data,
        &[
            "--guest-kernel",
            &kernel,
            "--firecracker-bin",
            "/nonexistent/firecracker",
        ],
    );
    assert!(!ok);
    assert!(err.contains("--firecracker-bin"), "{err}");
    assert!(
        err.contains("/nonexistent/firecracker is missing or not executable"),
        "{err}"
    );

    let fc = executable(tmp.path(), "firecracker");
    let (ok, err) = kilnd(
        &data,
        &[
            "--guest-kernel",
            &kernel,
            "--firecracker-bin",
            &fc,
            "--jailer-bin",
            "/nonexistent/jailer",
        ],
    );
    assert!(!ok);
    assert!(err.contains("jailer binary /nonexistent/jailer"), "{err}");

    let jailer = executable(tmp.path(), "jailer");
    let wrong = executable(tmp.path(), "vmm");
    let (ok, err) = kilnd(
        &data,
        &[
            "--guest-kernel",
            &kernel,
            "--firecracker-bin",
            &wrong,
            "--jailer-bin",
            &jailer,
        ],
    );
    assert!(!ok);
    assert!(err.contains("must contain `firecracker`"), "{err}");

    let (ok, err) = kilnd(
        &data,
        &[
            "--guest-kernel",
            "/nonexistent/vmlinux",
            "--firecracker-bin",
            &fc,
            "--jailer-bin",
            &jailer,
        ],
    );
    assert!(!ok);
    assert!(err.contains("guest kernel /nonexistent/vmlinux"), "{err}");
}
