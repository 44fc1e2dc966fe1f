//! The `examples/hello-tls` sample app as a static binary, and an image around it.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};

use crate::image::ImageBuilder;

/// The only target whose static build works with just the installed toolchain (DESIGN).
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The static binaries that run inside instances, built together in one cargo run.
#[derive(Debug, Clone)]
pub struct StaticBinaries {
    pub hello_tls: PathBuf,
    pub kiln_init: PathBuf,
}

/// Successful builds per process: tests call this from many threads, and one `cargo` run per
/// process is enough (a concurrent second run would only wait for the first one's lock).
static BUILT: Mutex<Option<StaticBinaries>> = Mutex::new(None);

/// The workspace root, found from this crate's manifest dir at compile time (crates/kiln-testkit),
/// so it also works for the `kiln-testkit` binary run outside cargo.
fn workspace_root() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = root
        .canonicalize()
        .with_context(|| format!("resolving {}", root.display()))?;
    ensure!(
        root.join("examples/hello-tls/Cargo.toml").is_file(),
        "no hello-tls in {}",
        root.display()
    );
    Ok(root)
}

/// Builds examples/hello-tls as a static binary (`RUSTFLAGS="-C target-feature=+crt-static" cargo
/// build -p hello-tls --target x86_64-unknown-linux-gnu`, from the workspace root, reusing
/// `CARGO_TARGET_DIR` if set) and returns the binary's path. Idempotent and cheap when up to date:
/// cargo does nothing then, and a second call in the same process does not even run cargo.
pub fn build_hello_tls() -> Result<PathBuf> {
    Ok(build_static()?.hello_tls)
}

/// Builds the static `hello-tls` and `kiln-init` (the same command as `scripts/build-static`) and
/// returns their paths.
pub fn build_static() -> Result<StaticBinaries> {
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(b) = built
        .as_ref()
        .filter(|b| b.hello_tls.is_file() && b.kiln_init.is_file())
    {
        return Ok(b.clone());
    }

    let root = workspace_root()?;
    // Inside `cargo test`, $CARGO is the cargo that runs us; elsewhere, the one on PATH.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&root)
        .args([
            "build",
            "-p",
            "hello-tls",
            "-p",
            "kiln-init",
            "--target",
            TARGET,
        ])
        .args(crate::dev::release().then_some("--release"))
        // The JSON messages name the executable, wherever the target dir is configured to be.
        .arg("--message-format=json-render-diagnostics")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // CARGO_ENCODED_RUSTFLAGS would take precedence over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // CARGO_TARGET_DIR is inherited from the environment as is, so the build shares its cache.
    // Under `cargo test` the environment also holds the variables cargo sets for the test binary
    // (CARGO_MANIFEST_DIR, CARGO_PKG_*...). ring's build script watches CARGO_MANIFEST_DIR, so
    // passing them on would make every switch between a test and a shell rebuild ring and rustls
    // (30 s here). Cargo's own configuration variables (CARGO_HOME, CARGO_BUILD_*...) stay.
    clear_test_env(&mut command);

    let mut child = command
        .spawn()
        .context("running cargo build -p hello-tls")?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let (mut hello, mut init) = (None, None);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let exe = msg["executable"].as_str().map(PathBuf::from);
        match msg["target"]["name"].as_str() {
            Some("hello-tls") => hello = exe.or(hello),
            Some("kiln-init") => init = exe.or(init),
            _ => {}
        }
    }
    let status = child.wait()?;
    ensure!(
        status.success(),
        "cargo build -p hello-tls -p kiln-init --target {TARGET} failed: {status}"
    );
    let (Some(hello_tls), Some(kiln_init)) = (hello, init) else {
        bail!("cargo build -p hello-tls -p kiln-init reported no executable");
    };
    ensure_static(&hello_tls)?;
    ensure_static(&kiln_init)?;
    let b = StaticBinaries {
        hello_tls,
        kiln_init,
    };
    *built = Some(b.clone());
    Ok(b)
}

/// Removes from `command` the variables cargo sets for a test binary (see [`build_static`]).
pub(crate) fn clear_test_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        let set_by_cargo_for_tests = [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
        ]
        .contains(&&*key_str)
            || key_str.starts_with("CARGO_PKG_")
            || key_str.starts_with("CARGO_BIN_EXE_");
        if set_by_cargo_for_tests {
            command.env_remove(&key);
        }
    }
}

/// An ELF without a PT_INTERP program header needs no dynamic loader, so it runs from an image
/// that has no libc: exactly what "static" must mean for a rootfs with a single binary in it.
fn ensure_static(path: &Path) -> Result<()> {
    let mut head = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .take(64 * 1024)
        .read_to_end(&mut head)?;
    check_static_elf(&head).with_context(|| format!("{} is not a static binary", path.display()))
}

fn check_static_elf(head: &[u8]) -> Result<()> {
    const PT_INTERP: u32 = 3;
    ensure!(
        head.len() >= 64 && head[..4] == *b"\x7fELF",
        "not an ELF file"
    );
    ensure!(
        head[4] == 2 && head[5] == 1,
        "not a 64-bit little-endian ELF"
    );
    let u16_at = |o: usize| usize::from(u16::from_le_bytes([head[o], head[o + 1]]));
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&head[0x20..0x28]);
    let phoff = usize::try_from(u64::from_le_bytes(phoff))?;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    ensure!(phentsize >= 4, "bad program header size");
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let Some(p_type) = head.get(at..at + 4) else {
            bail!("program headers beyond the first 64 KiB");
        };
        if u32::from_le_bytes([p_type[0], p_type[1], p_type[2], p_type[3]]) == PT_INTERP {
            bail!("it has an ELF interpreter (dynamically linked)");
        }
    }
    Ok(())
}

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const PASSWD: &str =
    "root:x:0:0:root:/root:/sbin/nologin\napp:x:1000:1000:app:/home/app:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\napp:x:1000:\n";

/// An image with the static hello-tls binary at /app/hello-tls (mode 0755), entrypoint
/// `["/app/hello-tls"]`, env `GREETING=<greeting>` and a standard `PATH`, plus /etc/passwd and
/// /etc/group with root and an `app` user (uid 1000), and /tmp (1777). One layer; callers may add
/// more with [`ImageBuilder::new_layer`].
pub fn hello_tls_image(binary: &Path, greeting: &str) -> Result<ImageBuilder> {
    ensure_static(binary)?;
    let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    Ok(ImageBuilder::new()
        .dir("/app", 0o755)
        .file("/app/hello-tls", bytes, 0o755)
        .dir("/etc", 0o755)
        .file("/etc/passwd", PASSWD.as_bytes().to_vec(), 0o644)
        .file("/etc/group", GROUP.as_bytes().to_vec(), 0o644)
        .dir("/tmp", 0o1777)
        .entrypoint(&["/app/hello-tls"])
        .env("PATH", PATH)
        .env("GREETING", greeting))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_checks() {
        assert!(check_static_elf(b"#!/bin/sh\n").is_err());
        // This test binary is static exactly when it was built with crt-static.
        let me = std::env::current_exe().unwrap();
        let result = ensure_static(&me);
        assert_eq!(
            result.is_ok(),
            cfg!(target_feature = "crt-static"),
            "{result:?}"
        );
        if let Err(e) = result {
            assert!(format!("{e:#}").contains("interpreter"), "{e:#}");
        }
    }

    #[test]
    fn image_layout() {
        let dir = tempfile::tempdir().unwrap();
        // A fake "static" ELF header: 64-bit LE, no program headers.
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x36] = 56; // e_phentsize
        let bin = dir.path().join("hello-tls");
        std::fs::write(&bin, &elf).unwrap();
        let img = hello_tls_image(&bin, "hi").unwrap().build().unwrap();
        let config: serde_json::Value = serde_json::from_slice(&img.config).unwrap();
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(["/app/hello-tls"])
        );
        assert_eq!(
            config["config"]["Env"],
            serde_json::json!([format!("PATH={PATH}"), "GREETING=hi"])
        );
        assert_eq!(img.layers.len(), 1);
    }
}
