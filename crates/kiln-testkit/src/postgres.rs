//! A throwaway PostgreSQL cluster: `initdb` into a temp dir, `pg_ctl start` on 127.0.0.1 at a
//! free port (and a Unix socket in the same dir), stopped and deleted on drop.
//!
//! Postgres refuses to run as root, so when the tests run as root (they do here and in CI) the
//! cluster's files belong to the `postgres` OS user and every server binary runs as that user
//! (`setuid` through `std::os::unix::process::CommandExt`, no PAM or `runuser` in between). The
//! binaries come from Debian's `postgresql-15` (`./scripts/install-deps` installs it). Start-up
//! takes well under a second.

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// How many free ports `start` tries when another process takes the one it picked.
const PORT_ATTEMPTS: usize = 5;

/// How the server is stopped (`pg_ctl -m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, checkpoint, exit.
    Fast,
    /// Kill every server process without a checkpoint, like a crash; recovery replays the WAL.
    Immediate,
}

impl StopMode {
    fn as_str(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// A running throwaway cluster; stopped (immediately) and removed on drop.
#[derive(Debug)]
pub struct PostgresCluster {
    dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
    /// `Some((uid, gid))` of the `postgres` user when running as root.
    run_as: Option<(u32, u32)>,
    settings: Vec<String>,
}

/// The directory with `initdb`, `pg_ctl`, `pg_dump`...: the newest under
/// /usr/lib/postgresql/*/bin, else wherever `pg_ctl` is on PATH.
pub fn bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if dir.join("pg_ctl").is_file() && dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    bail!("no PostgreSQL server binaries found (install postgresql-15: ./scripts/install-deps)")
}

/// uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_user() -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.first() == Some(&"postgres") && f.len() > 3 {
            return Ok((f[2].parse()?, f[3].parse()?));
        }
    }
    bail!("there is no postgres user (install postgresql-15: ./scripts/install-deps)")
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn check(what: &str, out: Output) -> Result<Output> {
    if !out.status.success() {
        bail!(
            "{what} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

impl PostgresCluster {
    /// `initdb` + start with default (durable) settings.
    pub fn start() -> Result<PostgresCluster> {
        Self::start_with(&[])
    }

    /// `initdb` + start with extra `-c name=value` server settings.
    pub fn start_with(settings: &[&str]) -> Result<PostgresCluster> {
        let bin = bin_dir()?;
        let run_as = if is_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("kiln-pg-")
            .tempdir()
            .context("creating the cluster's temp dir")?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .context("handing the cluster dir to the postgres user")?;
        }
        let data = dir.path().join("data");
        let mut cluster = PostgresCluster {
            dir,
            data,
            bin,
            port: 0,
            run_as,
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        cluster.init_data()?;
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    let log = std::fs::read_to_string(cluster.log_path()).unwrap_or_default();
                    if !log.contains("could not bind") && !log.contains("already in use") {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
            .context("starting postgres: no free port")
    }

    /// Fills the data dir: a copy of a cached `initdb` result when there is one (initdb takes
    /// about two seconds here, a copy a tenth of that), else a fresh `initdb` that is then cached
    /// for the next cluster (in the system temp dir, keyed by the server version).
    fn init_data(&self) -> Result<()> {
        let version = std::fs::read_link(&self.bin)
            .unwrap_or_else(|_| self.bin.clone())
            .display()
            .to_string()
            .replace('/', "_");
        let template = std::env::temp_dir().join(format!("kiln-testkit-pg-template{version}"));
        if !template.join("PG_VERSION").is_file() {
            let staging = self.dir.path().join("template");
            check(
                "initdb",
                self.command("initdb")
                    .arg("-D")
                    .arg(&staging)
                    .args([
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--locale=C",
                        "--no-sync",
                    ])
                    .output()
                    .context("running initdb")?,
            )?;
            // Another test may have cached one meanwhile; either copy is fine.
            if std::fs::rename(&staging, &template).is_err() {
                let _ = std::fs::remove_dir_all(&staging);
            }
        }
        check(
            "cp -a (cached initdb)",
            self.command_path(Path::new("/bin/cp"))
                .arg("-a")
                .arg(&template)
                .arg(&self.data)
                .output()
                .context("copying the cached initdb")?,
        )?;
        Ok(())
    }

    fn command(&self, name: &str) -> Command {
        self.command_path(&self.bin.join(name))
    }

    fn command_path(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        // PG* variables would redirect client tools elsewhere.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PG") {
                c.env_remove(k);
            }
        }
        c
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        for s in &self.settings {
            opts.push_str(" -c ");
            opts.push_str(s);
        }
        check(
            "pg_ctl start",
            self.command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.log_path())
                .args(["-o", &opts, "-w", "-t", "60", "start"])
                .output()
                .context("running pg_ctl start")?,
        )?;
        Ok(())
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for database `db` (user `postgres`, trust auth, loopback).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The server log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Path of a client or server binary (`pg_dump`, `psql`...).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    fn client(&self, name: &str) -> Command {
        let mut c = self.command(name);
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ]);
        c
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        check(
            "createdb",
            self.client("createdb")
                .arg(name)
                .output()
                .context("running createdb")?,
        )?;
        Ok(self.url(name))
    }

    /// Runs SQL with psql on `db` and returns its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let out = check(
            "psql",
            self.client("psql")
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    db,
                    "-c",
                    sql,
                ])
                .output()
                .context("running psql")?,
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `pg_dump -Fc` of `db` into `file` (the file is written by the postgres user's process
    /// through stdout, so any path works).
    pub fn dump(&self, db: &str, file: &Path) -> Result<()> {
        let out = check(
            "pg_dump",
            self.client("pg_dump")
                .args(["-Fc", "-d", db])
                .output()
                .context("running pg_dump")?,
        )?;
        std::fs::write(file, out.stdout).with_context(|| format!("writing {}", file.display()))
    }

    /// `pg_restore` of a `-Fc` dump into the (existing, empty) database `db`.
    pub fn restore(&self, file: &Path, db: &str) -> Result<()> {
        let dump =
            std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        check(
            "pg_restore",
            self.client("pg_restore")
                .args(["--no-owner", "--exit-on-error", "-d", db])
                .stdin(dump)
                .output()
                .context("running pg_restore")?,
        )?;
        Ok(())
    }

    /// Stops the server (clients see their connections fail).
    pub fn stop(&self, mode: StopMode) -> Result<()> {
        check(
            "pg_ctl stop",
            self.command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", mode.as_str(), "-w", "-t", "60", "stop"])
                .output()
                .context("running pg_ctl stop")?,
        )?;
        Ok(())
    }

    /// Starts a stopped server again on the same port.
    pub fn start_again(&self) -> Result<()> {
        self.pg_ctl_start()
    }

    /// Stops and starts the server.
    pub fn restart(&self, mode: StopMode) -> Result<()> {
        self.stop(mode)?;
        self.start_again()
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
