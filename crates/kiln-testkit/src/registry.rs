//! A throwaway OCI distribution registry: Debian's `docker-registry` (CNCF distribution 2.8) with
//! filesystem storage, on loopback, over plain HTTP.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The binary Debian's `docker-registry` package installs.
const REGISTRY_BIN: &str = "docker-registry";
/// Start-up takes about 0.1 s here; allow for a loaded CI machine.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often `start` retries when the free port it picked was taken before the registry bound it.
const PORT_ATTEMPTS: usize = 8;
/// Response header carrying this instance's nonce, set through the registry's `http.headers`.
const NONCE_HEADER: &str = "x-kiln-testkit-instance";

/// A running registry. The process is killed (and reaped) on drop, unless detached.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
}

/// Why one launch attempt failed: only a lost port race is worth another port.
enum LaunchError {
    AddrInUse(anyhow::Error),
    Other(anyhow::Error),
}

impl Registry {
    /// Starts Debian's `docker-registry` (CNCF distribution) on 127.0.0.1 at a free port with
    /// filesystem storage in `dir` (created if missing); waits until `GET /v2/` answers 200. Killed on
    /// drop (unless [`Registry::into_detached`]).
    ///
    /// The config (`kiln-testkit-registry.yml`) and the registry's log (`kiln-testkit-registry.log`)
    /// are written into `dir` next to the storage tree (`dir/docker/registry/v2`).
    pub async fn start(dir: &Path) -> Result<Registry> {
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            // Binding port 0 and releasing it leaves a window in which another process can take the
            // port; the launch notices (bind failure, or a foreign server answering) and we retry.
            let addr = {
                let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                    .context("finding a free port on 127.0.0.1")?;
                probe.local_addr()?
            };
            match launch(dir, addr).await {
                Ok(registry) => return Ok(registry),
                Err(LaunchError::AddrInUse(e)) => last = Some(e),
                Err(LaunchError::Other(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no attempt made"))).context(format!(
            "starting {REGISTRY_BIN}: no free port after {PORT_ATTEMPTS} tries"
        ))
    }

    /// Like [`Registry::start`] at a fixed address (used by scripts, e.g. 127.0.0.1:5000).
    pub async fn start_at(dir: &Path, addr: SocketAddr) -> Result<Registry> {
        launch(dir, addr)
            .await
            .map_err(|(LaunchError::AddrInUse(e) | LaunchError::Other(e))| e)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// "127.0.0.1:PORT", the form image references and [`crate::BuiltImage::push`] take.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The storage directory given to `start`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the registry process has exited (`Some(status)`) or is still running (`None`).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("registry is detached"),
        }
    }

    /// Leaves the registry running after this value is gone; returns its process id so that the
    /// caller can stop it later.
    pub fn into_detached(mut self) -> u32 {
        // A std Child that is dropped neither kills nor waits, which is exactly "detached".
        self.child.take().map(|c| c.id()).unwrap_or(0)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL is fine: the registry is throwaway, and waiting reaps the zombie.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A value unique to this launch, so that a server already listening on the port cannot be
/// mistaken for ours. Not a secret, just unique: pid, time and std's per-process random hash keys.
fn nonce() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}{:08x}", h.finish(), std::process::id())
}

fn config_yaml(root: &Path, addr: SocketAddr, nonce: &str) -> Result<String> {
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("registry dir {root:?} is not UTF-8"))?;
    // JSON strings are valid YAML double-quoted scalars, so this quotes any path safely.
    let q = |s: &str| serde_json::to_string(s).expect("a string always serializes");
    Ok(format!(
        "# Written by kiln-testkit; regenerated on every start.
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: {nonce}
  headers:
    X-Kiln-Testkit-Instance: [{nonce}]
",
        root = q(root),
        addr = q(&addr.to_string()),
        nonce = q(nonce),
    ))
}

async fn launch(dir: &Path, addr: SocketAddr) -> Result<Registry, LaunchError> {
    let other = LaunchError::Other;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating {}", dir.display()))
        .map_err(other)?;
    let root = dir
        .canonicalize()
        .context("resolving registry dir")
        .map_err(other)?;
    let nonce = nonce();
    let config_path = root.join("kiln-testkit-registry.yml");
    let log_path = root.join("kiln-testkit-registry.log");
    let config = config_yaml(&root, addr, &nonce).map_err(other)?;
    std::fs::write(&config_path, config)
        .context("writing registry config")
        .map_err(other)?;
    let log = std::fs::File::create(&log_path)
        .context("creating registry log")
        .map_err(other)?;
    let log2 = log
        .try_clone()
        .context("cloning log handle")
        .map_err(other)?;

    let mut command = Command::new(REGISTRY_BIN);
    command
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // REGISTRY_* variables override the config file; a stray one must not change the test setup.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("REGISTRY_") {
            command.env_remove(key);
        }
    }
    let child = command
        .spawn()
        .with_context(|| {
            format!(
                "running {REGISTRY_BIN} (apt-get install --no-install-recommends docker-registry)"
            )
        })
        .map_err(other)?;
    // From here on the Registry owns the child, so every early return kills it.
    let mut registry = Registry {
        child: Some(child),
        addr,
        dir: root,
    };

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .context("building HTTP client")
        .map_err(other)?;
    let url = format!("http://{addr}/v2/");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = registry.try_wait().map_err(other)? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail = log.lines().rev().take(10).collect::<Vec<_>>();
            let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
            let err = anyhow!("{REGISTRY_BIN} on {addr} exited with {status}:\n{tail}");
            return Err(if log.contains("address already in use") {
                LaunchError::AddrInUse(err)
            } else {
                LaunchError::Other(err)
            });
        }
        if let Ok(resp) = client.get(&url).send().await {
            let ours = resp
                .headers()
                .get(NONCE_HEADER)
                .and_then(|v| v.to_str().ok())
                == Some(nonce.as_str());
            if !ours {
                // Someone else serves this port; ours will fail to bind (dropping kills it).
                return Err(LaunchError::AddrInUse(anyhow!(
                    "{addr} is served by another process"
                )));
            }
            if resp.status() == reqwest::StatusCode::OK {
                return Ok(registry);
            }
        }
        if Instant::now() > deadline {
            return Err(LaunchError::Other(anyhow!(
                "{REGISTRY_BIN} on {addr} not ready after {READY_TIMEOUT:?}; see {}",
                log_path.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
