//! Running the real binaries: `kilnd dev` as a child process and the `kiln` CLI against it.
//!
//! Tests drive the platform exactly as a user does: the binaries the workspace builds, a data
//! directory in a temp dir, ports chosen by the kernel (`127.0.0.1:0`), and the lines `kilnd dev`
//! prints on stdout to learn its addresses and the admin token.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The workspace root (two levels above this crate's manifest).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// Cargo's target directory for this workspace.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let p = PathBuf::from(dir);
        return if p.is_absolute() {
            p
        } else {
            workspace_root().join(p)
        };
    }
    workspace_root().join("target")
}

/// True when `KILN_PROFILE=release`: benchmarks build and run release binaries.
pub fn release() -> bool {
    std::env::var("KILN_PROFILE").is_ok_and(|p| p == "release")
}

/// Paths of the binaries a platform test runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub kilnd: PathBuf,
    pub kiln: PathBuf,
    pub kiln_init: PathBuf,
}

/// Builds (when out of date) `kilnd`, `kiln` and the static `kiln-init`, and returns their paths.
pub fn build_binaries() -> Result<Binaries> {
    let root = workspace_root();
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "-q", "-p", "kilnd", "-p", "kiln-cli"])
        .current_dir(&root);
    crate::example::clear_test_env(&mut cmd);
    let status = cmd.status().context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build -p kilnd -p kiln-cli failed");
    }
    let statics = crate::example::build_static()?;
    let t = target_dir();
    let b = Binaries {
        kilnd: t.join("debug/kilnd"),
        kiln: t.join("debug/kiln"),
        kiln_init: statics.kiln_init,
    };
    for p in [&b.kilnd, &b.kiln] {
        if !p.is_file() {
            bail!("{} was not built", p.display());
        }
    }
    Ok(b)
}

/// Builds (when out of date) only the `kiln` CLI and returns its path, for tests that run the
/// control plane in-process.
pub fn build_cli() -> Result<PathBuf> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "-q", "-p", "kiln-cli"])
        .current_dir(workspace_root());
    crate::example::clear_test_env(&mut cmd);
    let status = cmd.status().context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build -p kiln-cli failed");
    }
    let kiln = target_dir().join("debug/kiln");
    if !kiln.is_file() {
        bail!("{} was not built", kiln.display());
    }
    Ok(kiln)
}

/// A `kilnd dev` child process. Dropping it stops the process (not the instances it started:
/// call [`cleanup_instances`] for those).
pub struct DevProcess {
    child: Child,
    pub api_url: String,
    pub edge: Vec<SocketAddr>,
    /// The `kiln context add ...` line printed at first start.
    pub connect: Option<String>,
    pub data_dir: PathBuf,
    stderr_path: PathBuf,
}

impl DevProcess {
    /// Starts `kilnd dev` on `data_dir` with kernel-chosen ports and waits until it is ready.
    pub fn start(bins: &Binaries, data_dir: &Path) -> Result<DevProcess> {
        Self::start_with(
            bins,
            data_dir,
            &[
                "--api-listen",
                "127.0.0.1:0",
                "--edge-listen",
                "127.0.0.1:0",
                "--edge-listen",
                "[::1]:0",
            ],
        )
    }

    /// Starts `kilnd dev` with explicit extra arguments.
    pub fn start_with(bins: &Binaries, data_dir: &Path, extra: &[&str]) -> Result<DevProcess> {
        std::fs::create_dir_all(data_dir)?;
        let stderr_path = data_dir.with_extension("kilnd.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)?;
        let mut child = Command::new(&bins.kilnd)
            .arg("dev")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--init-binary")
            .arg(&bins.kiln_init)
            .args(extra)
            .env(
                "KILN_LOG",
                std::env::var("KILN_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("cannot start kilnd dev")?;
        let stdout = child.stdout.take().context("kilnd stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut api_url, mut edge, mut connect) = (None, Vec::new(), None);
        loop {
            let line = match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    bail!("kilnd dev did not become ready; its log:\n{log}");
                }
            };
            if let Some(u) = line.strip_prefix("kilnd dev: API ") {
                api_url = Some(u.trim().to_owned());
            } else if let Some(e) = line.strip_prefix("kilnd dev: edge ") {
                edge = e
                    .split_whitespace()
                    .filter_map(|a| a.parse().ok())
                    .collect();
            } else if let Some(c) = line.trim().strip_prefix("kiln context add ") {
                connect = Some(c.to_owned());
            } else if line.starts_with("kilnd dev: ready") {
                break;
            }
        }
        Ok(DevProcess {
            child,
            api_url: api_url.context("kilnd dev printed no API address")?,
            edge,
            connect,
            data_dir: data_dir.to_owned(),
            stderr_path,
        })
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Stops the process with SIGTERM and waits for it.
    pub fn stop(mut self) -> Result<()> {
        self.terminate();
        Ok(())
    }

    fn terminate(&mut self) {
        terminate(&mut self.child);
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// One `kilnd` role (`control serve`, `agent`, `edge`) as its own process: started with its
/// arguments, ready once it prints a line starting with `ready`; its stdout lines are kept.
pub struct Daemon {
    child: Child,
    /// Stdout lines printed up to readiness.
    pub lines: Vec<String>,
    log_path: PathBuf,
}

impl Daemon {
    pub fn start(bin: &Path, args: &[&str], ready: &str, log_path: &Path) -> Result<Daemon> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        let mut child = Command::new(bin)
            .args(args)
            .env(
                "KILN_LOG",
                std::env::var("KILN_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {} {}", bin.display(), args.join(" ")))?;
        let stdout = child.stdout.take().context("daemon stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => {
                    let done = l.starts_with(ready);
                    lines.push(l);
                    if done {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let log = std::fs::read_to_string(log_path).unwrap_or_default();
                    bail!(
                        "{} {} did not become ready; its log:\n{log}",
                        bin.display(),
                        args.join(" ")
                    );
                }
            }
        }
        Ok(Daemon {
            child,
            lines,
            log_path: log_path.to_owned(),
        })
    }

    /// The first printed line starting with `prefix`, without the prefix.
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| l.strip_prefix(prefix))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// SIGTERM, up to 5 s to exit, then SIGKILL.
fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The `kiln` CLI with its own context file.
#[derive(Debug, Clone)]
pub struct Cli {
    pub bin: PathBuf,
    pub config: PathBuf,
    pub dir: PathBuf,
}

impl Cli {
    pub fn new(bins: &Binaries, dir: &Path) -> Self {
        Self {
            bin: bins.kiln.clone(),
            config: dir.join("kiln-cli.toml"),
            dir: dir.to_owned(),
        }
    }

    /// Runs `kiln ARGS` in `self.dir` and returns its output (whatever its exit code).
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .current_dir(&self.dir)
            .env("KILN_CONFIG", &self.config)
            .env_remove("KILN_API_URL")
            .env_remove("KILN_TOKEN")
            .stdin(Stdio::null())
            .output()
            .expect("run kiln")
    }

    /// Runs `kiln ARGS` and fails with its output unless it exits 0; returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args);
        if !out.status.success() {
            bail!(
                "`kiln {}` exited with {}\nstdout:\n{}\nstderr:\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Stops and removes every instance a `kilnd dev` data directory has on this host: containers,
/// overlay mounts, network namespaces (which takes their veth pairs with them) and state.
pub fn cleanup_instances(data_dir: &Path) {
    let runc_root = data_dir.join("runc");
    let instances = data_dir.join("instances");
    let Ok(entries) = std::fs::read_dir(&instances) else {
        return;
    };
    for e in entries.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["delete", "--force", &id])
            .output();
        // A QEMU instance: kill its VM (its pid file names it) and remove its tap.
        if let Ok(pid) = std::fs::read_to_string(e.path().join("qemu.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&id) {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
                }
            }
        }
        if let Some(suffix) = id.strip_prefix("ins_") {
            let _ = Command::new("ip")
                .args([
                    "link",
                    "del",
                    &format!("kv{}", &suffix[..suffix.len().min(13)]),
                ])
                .output();
        }
        let rootfs = e.path().join("rootfs");
        let _ = Command::new("umount").arg("-l").arg(&rootfs).output();
        // Volumes loop-mounted for runc: unmount and detach their loop devices before the
        // directory goes (removing it through a mounted volume would empty the volume).
        if let Ok(vols) = std::fs::read_dir(e.path().join("volumes")) {
            for v in vols.flatten() {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg("-d")
                    .arg(v.path())
                    .output();
            }
        }
        if let Some(suffix) = id.strip_prefix("ins_") {
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("kiln-{suffix}")])
                .output();
        }
        let _ = std::fs::remove_dir_all(e.path());
    }
}

/// The guest kernel the VM drivers boot: `./scripts/build-guest-kernel` prints its path, building
/// it first (about 7.5 minutes on 2 cores) unless it is cached outside the clone.
pub fn guest_kernel() -> Result<PathBuf> {
    let out = Command::new(workspace_root().join("scripts/build-guest-kernel"))
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run scripts/build-guest-kernel")?;
    if !out.status.success() {
        bail!("scripts/build-guest-kernel failed");
    }
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !path.is_file() {
        bail!(
            "scripts/build-guest-kernel printed {}, which is not a file",
            path.display()
        );
    }
    Ok(path)
}
