//! One instance on this host: start, adopt, health, stop, and cleanup.
//!
//! Layout of an instance's state directory `<data>/instances/<id>/`:
//! `config.json` (the runc bundle spec), `spec.json` (the WorkloadSpec it was started from),
//! `upper/` and `work/` (its private overlay layer), `rootfs/` (the overlay mount), `log`, and
//! `volumes/<name>/` (each volume's loop mount, runc). Teardown removes all of it, the mounts
//! and loop devices, the veth pair, the namespace and the cgroup (via runc); never the volumes'
//! files, which outlive instances (`crate::volume`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use kiln_types::guest::RunConfig;
use kiln_types::{InstanceId, InstanceState, WorkloadSpec};

use kiln_types::frame::Frame;

use crate::guest::Guest;
use crate::image::PreparedImage;
use crate::runtime::firecracker::{FcPaths, Firecracker};
use crate::runtime::qemu::{Qemu, VmPaths};
use crate::{error_chain, netlink, Agent, AgentError};

/// Checks run at this pace until the instance first turns healthy, so deploys finish quickly.
const STARTUP_CHECK_INTERVAL: Duration = Duration::from_millis(50);

pub(crate) struct Instance {
    pub id: InstanceId,
    spec: WorkloadSpec,
    dir: PathBuf,
    netns: String,
    host_if: String,
    stop_tx: watch::Sender<bool>,
    /// The guest channel; its task runs from start until teardown.
    pub guest: Arc<Guest>,
    guest_stop: watch::Sender<bool>,
    /// The highest secrets version asked of the control plane for this instance.
    secrets_requested: AtomicU64,
}

/// How long delivery of the first secrets file keeps retrying (kiln-init waits 60 s).
const SECRETS_DELIVERY: Duration = Duration::from_secs(50);

impl Instance {
    pub(crate) fn new(agent: &Agent, spec: WorkloadSpec) -> Self {
        let id = spec.instance_id.clone();
        let (netns, host_if) = netlink::names(id.suffix());
        let dir = dir_of(agent, &id);
        let guest = match &agent.firecracker {
            Some(fc) => Guest::new_hybrid_vsock(
                id.clone(),
                spec.app_id.clone(),
                fc.vsock_path(&spec),
                crate::runtime::firecracker::GUEST_CHANNEL_PORT,
            ),
            None => Guest::new(
                id.clone(),
                spec.app_id.clone(),
                dir.join("run").join("channel.sock"),
            ),
        };
        Self {
            dir,
            id,
            spec,
            netns,
            host_if,
            stop_tx: watch::channel(false).0,
            secrets_requested: AtomicU64::new(0),
            guest,
            guest_stop: watch::channel(false).0,
        }
    }

    /// True (once per version) when `version` is newer than anything requested so far.
    pub(crate) fn wants_secrets(&self, version: u64) -> bool {
        self.spec.secrets.version > 0
            && self.secrets_requested.load(Ordering::Relaxed) > 0
            && self.secrets_requested.fetch_max(version, Ordering::Relaxed) < version
    }

    /// Fetches the instance's secrets file from the control plane (over the host token; only
    /// instances placed on this host are answered) and sends it to kiln-init. Retries while the
    /// control plane or the guest channel is not there yet. Values stay in memory.
    pub(crate) async fn deliver_secrets(&self, agent: &Agent, update: bool) {
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let attempt = async {
                let file = agent
                    .client
                    .instance_secrets(&agent.host_id, &self.id)
                    .await
                    .map_err(|e| error_chain(&e))?;
                let version = file.version;
                let bytes = serde_json::to_vec(&file).unwrap_or_default();
                let frame = kiln_types::frame::Frame::Secrets {
                    version,
                    update,
                    file: kiln_types::frame::Redacted(bytes),
                };
                if self.guest.send_secrets(frame, Duration::from_secs(5)).await {
                    Ok(version)
                } else {
                    Err("the guest channel is not connected".to_owned())
                }
            };
            match attempt.await {
                Ok(version) => {
                    self.secrets_requested.fetch_max(version, Ordering::Relaxed);
                    tracing::info!(instance_id = %self.id, version, update, "secrets delivered to the instance");
                    return;
                }
                Err(reason) if started.elapsed() < SECRETS_DELIVERY => {
                    tracing::debug!(instance_id = %self.id, reason = %reason, "secrets not delivered yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(reason) => {
                    tracing::warn!(instance_id = %self.id, reason = %reason, "secrets not delivered");
                    return;
                }
            }
        }
    }

    pub(crate) fn exists_on_disk(agent: &Agent, id: &InstanceId) -> bool {
        dir_of(agent, id).exists()
    }

    pub(crate) fn request_stop(&self) {
        self.stop_tx.send_replace(true);
    }

    /// Runs the instance from start (or adoption) to teardown.
    pub(crate) async fn lifecycle(self: Arc<Self>, agent: Arc<Agent>, wants_run: bool) {
        let id = self.id.clone();
        if !wants_run {
            self.teardown(&agent).await;
            agent.report(&id, InstanceState::Stopped, None).await;
            return;
        }
        let adopted = self.is_running(&agent).await;
        if adopted {
            // It holds its volumes (mounted since it started).
            for v in self.spec.mounts.iter().filter_map(|m| m.volume_id.as_ref()) {
                let _ = agent.volumes.acquire(v, &id, Duration::ZERO).await;
            }
            tracing::info!(instance_id = %id, "adopted running instance");
        } else {
            agent.report(&id, InstanceState::Starting, None).await;
            let started = std::time::Instant::now();
            if let Err(e) = self.start(&agent).await {
                let reason = error_chain(&e);
                tracing::warn!(instance_id = %id, error = %reason, "instance failed to start");
                self.teardown(&agent).await;
                agent.report(&id, InstanceState::Failed, Some(reason)).await;
                return;
            }
            tracing::info!(instance_id = %id, elapsed_ms = started.elapsed().as_millis() as u64, "instance started");
        }

        tokio::spawn(
            self.guest
                .clone()
                .run(agent.logs_tx.clone(), self.guest_stop.subscribe()),
        );
        if self.spec.secrets.version > 0 {
            if adopted {
                // It got its file when it started; newer versions come through `apply`.
                self.secrets_requested
                    .fetch_max(self.spec.secrets.version, Ordering::Relaxed);
            } else {
                let (inst, agent) = (self.clone(), agent.clone());
                tokio::spawn(async move { inst.deliver_secrets(&agent, false).await });
            }
        }
        let mut stop_rx = self.stop_tx.subscribe();
        let mut last: Option<InstanceState> = None;
        let mut checks = crate::health::Checks::new(&self.spec);
        let mut starting_reason: Option<String> = None;
        loop {
            if *stop_rx.borrow_and_update() {
                break;
            }
            if !self.is_running(&agent).await {
                let reason = self.exit_reason(&agent).await;
                tracing::warn!(instance_id = %id, reason = %reason, "instance exited");
                self.teardown(&agent).await;
                agent.report(&id, InstanceState::Failed, Some(reason)).await;
                return;
            }
            let failure = checks
                .evaluate(&self.spec, &self.guest, last.is_none())
                .await;
            let state = if failure.is_none() {
                InstanceState::Healthy
            } else {
                InstanceState::Unhealthy
            };
            // Before the first healthy check an unhealthy result just means "still starting".
            let report = match (last, state) {
                (None, InstanceState::Unhealthy) => None,
                (prev, s) if prev != Some(s) => Some(s),
                _ => None,
            };
            if let Some(s) = report {
                agent.report(&id, s, failure).await;
                last = Some(s);
            } else if last.is_none() && failure != starting_reason {
                // Still starting: say which check holds it back (reported on change only).
                agent
                    .report(&id, InstanceState::Starting, failure.clone())
                    .await;
                starting_reason = failure;
            }
            // Checks keep their own intervals; liveness is looked at no less often than
            // `health_interval`.
            let pause = if last.is_none() {
                STARTUP_CHECK_INTERVAL
            } else {
                checks
                    .next_due()
                    .clamp(STARTUP_CHECK_INTERVAL, agent.config.health_interval)
            };
            tokio::select! {
                _ = stop_rx.changed() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        agent.report(&id, InstanceState::Stopping, None).await;
        self.stop(&agent).await;
        self.teardown(&agent).await;
        agent.report(&id, InstanceState::Stopped, None).await;
        tracing::info!(instance_id = %id, "instance stopped");
    }

    async fn start(&self, agent: &Agent) -> Result<(), AgentError> {
        let ferr = |path: &Path| {
            let path = path.to_owned();
            let instance = self.id.clone();
            move |source| AgentError::InstanceFile {
                instance,
                path,
                source,
            }
        };
        for sub in ["upper", "work", "rootfs", "run"] {
            let p = self.dir.join(sub);
            tokio::fs::create_dir_all(&p).await.map_err(ferr(&p))?;
        }
        let spec_path = self.dir.join("spec.json");
        tokio::fs::write(
            &spec_path,
            serde_json::to_vec_pretty(&self.spec).unwrap_or_default(),
        )
        .await
        .map_err(ferr(&spec_path))?;
        // After spec.json: from here on the image counts as in use for cache collection.
        let image = agent.images.prepare(&self.spec.image).await?;
        let volumes = self.attach_volumes(agent).await?;

        if let Some(fc) = &agent.firecracker {
            let root = fc
                .root_image(&image.rootfs, &agent.config.init_binary)
                .await?;
            let run = run_config(&self.spec, &image, &image.rootfs, true).await?;
            let paths = FcPaths {
                dir: self.dir.clone(),
            };
            return fc
                .start(&paths, &root, &self.spec, &run, &self.netns, &self.host_if)
                .await;
        }
        if let Some(qemu) = &agent.qemu {
            let root = qemu
                .root_image(&image.rootfs, &agent.config.init_binary)
                .await?;
            let run = run_config(&self.spec, &image, &image.rootfs, true).await?;
            return qemu
                .start(
                    &self.vm_paths(),
                    &root,
                    &self.spec,
                    &run,
                    &self.host_if,
                    &volumes,
                )
                .await;
        }

        let rootfs = self.dir.join("rootfs");
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            image.rootfs.display(),
            self.dir.join("upper").display(),
            self.dir.join("work").display()
        );
        netlink::run(
            "mount",
            &[
                "-t",
                "overlay",
                "overlay",
                "-o",
                &opts,
                &rootfs.display().to_string(),
            ],
            None,
        )
        .await?;

        // Each volume loop-mounted on the host, for runc to bind-mount at its path.
        let mut binds = Vec::with_capacity(volumes.len());
        for (m, file) in self.spec.mounts.iter().zip(&volumes) {
            let point = crate::volume::host_mount_point(&self.dir, m);
            tokio::fs::create_dir_all(&point)
                .await
                .map_err(ferr(&point))?;
            crate::volume::mount_loop(file, &point).await?;
            binds.push((m.path.clone(), point));
        }

        let run = run_config(&self.spec, &image, &rootfs, false).await?;
        let kiln_dir = rootfs.join(".kiln");
        tokio::fs::create_dir_all(&kiln_dir)
            .await
            .map_err(ferr(&kiln_dir))?;
        let run_path = kiln_dir.join("run.json");
        tokio::fs::write(&run_path, serde_json::to_vec(&run).unwrap_or_default())
            .await
            .map_err(ferr(&run_path))?;
        // runc bind-mounts kiln-init here; the mount point must exist.
        let init_point = kiln_dir.join("init");
        tokio::fs::write(&init_point, b"")
            .await
            .map_err(ferr(&init_point))?;

        netlink::create(&self.netns, &self.host_if, self.spec.network.ipv6).await?;

        let bundle = super::runc::bundle_config(
            &self.spec,
            &rootfs,
            &agent.config.init_binary,
            &self.dir.join("run"),
            &self.netns,
            &binds,
        );
        let cfg_path = self.dir.join("config.json");
        tokio::fs::write(
            &cfg_path,
            serde_json::to_vec_pretty(&bundle).unwrap_or_default(),
        )
        .await
        .map_err(ferr(&cfg_path))?;
        agent
            .runc
            .run(self.id.as_str(), &self.dir, &self.dir.join("log"))
            .await
    }

    /// Takes every volume of the spec for this instance (waiting while another instance of this
    /// host still holds one) and creates the ones that do not exist yet; their files, in the
    /// order of `spec.mounts`.
    async fn attach_volumes(&self, agent: &Agent) -> Result<Vec<PathBuf>, AgentError> {
        let mut files = Vec::with_capacity(self.spec.mounts.len());
        // An instance being replaced stops within its stop timeout; allow for the teardown.
        let wait = Duration::from_millis(self.spec.stop.timeout_ms) + Duration::from_secs(30);
        for m in &self.spec.mounts {
            let id = m.volume_id.as_ref().ok_or_else(|| AgentError::NoVolumeId {
                volume: m.volume.clone(),
            })?;
            agent.volumes.acquire(id, &self.id, wait).await?;
            files.push(agent.volumes.ensure(id, m).await?);
        }
        Ok(files)
    }

    fn vm_paths(&self) -> VmPaths {
        VmPaths {
            dir: self.dir.clone(),
        }
    }

    /// Whether the instance's runtime still runs it (container or VM).
    async fn is_running(&self, agent: &Agent) -> bool {
        if let Some(fc) = &agent.firecracker {
            return fc.pid(&self.spec).await.is_some();
        }
        match &agent.qemu {
            Some(qemu) => qemu.pid(&self.vm_paths()).await.is_some(),
            None => {
                matches!(agent.runc.state(self.id.as_str()).await, Some(s) if s.status == "running")
            }
        }
    }

    async fn exit_reason(&self, agent: &Agent) -> String {
        let status = if agent.firecracker.is_some() {
            Firecracker::exit_record(&FcPaths {
                dir: self.dir.clone(),
            })
            .await
        } else if agent.qemu.is_some() {
            Qemu::exit_record(&self.vm_paths()).await
        } else {
            // Under the root, or in the run directory when the root is read-only.
            let read = |p: PathBuf| async move {
                tokio::fs::read(p)
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            };
            match read(self.dir.join("rootfs/.kiln/exit.json")).await {
                Some(v) => Some(v),
                None => read(self.dir.join("run/exit.json")).await,
            }
        };
        let mut reason = match status {
            Some(v) if v["signal"].is_number() => format!("killed by signal {}", v["signal"]),
            Some(v) => format!("exited with code {}", v["code"]),
            None => "exited".to_owned(),
        };
        let log = tokio::fs::read_to_string(self.dir.join("log"))
            .await
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        if !tail.is_empty() {
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            reason.push_str("; last output: ");
            reason.push_str(&tail.join(" | "));
        }
        reason
    }

    async fn stop(&self, agent: &Agent) {
        if let Some(fc) = &agent.firecracker {
            return fc.stop(&self.spec, &self.guest).await;
        }
        if let Some(qemu) = &agent.qemu {
            return self.stop_vm(qemu).await;
        }
        let id = self.id.as_str();
        if agent.runc.kill(id, &self.spec.stop.signal).await.is_err() {
            return;
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.spec.stop.timeout_ms);
        while tokio::time::Instant::now() < deadline {
            match agent.runc.state(id).await {
                Some(s) if s.status == "running" => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                _ => return,
            }
        }
        tracing::warn!(instance_id = %id, "instance ignored its stop signal; killing");
        let _ = agent.runc.kill(id, "SIGKILL").await;
    }

    /// Stops a VM the way runc stops a container: the stop request goes to kiln-init (over the
    /// guest channel, stream 0), which signals the app, waits its stop timeout, records the exit
    /// and powers off; a VM still running after that (or with no channel) is killed.
    async fn stop_vm(&self, qemu: &Qemu) {
        let paths = self.vm_paths();
        if qemu.pid(&paths).await.is_none() {
            return;
        }
        let asked = self
            .guest
            .send(Frame::Signal {
                stream: 0,
                signal: libc::SIGTERM,
            })
            .await;
        if asked {
            // kiln-init's own deadline, plus time to record the exit and power off.
            let deadline = tokio::time::Instant::now()
                + Duration::from_millis(self.spec.stop.timeout_ms)
                + Duration::from_secs(3);
            while tokio::time::Instant::now() < deadline {
                if qemu.pid(&paths).await.is_none() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tracing::warn!(instance_id = %self.id, "VM did not power off after its stop request; killing");
        }
        self.kill_vm(qemu).await;
    }

    async fn kill_vm(&self, qemu: &Qemu) {
        let paths = self.vm_paths();
        if let Some(pid) = qemu.pid(&paths).await {
            Qemu::kill(pid, libc::SIGKILL);
            for _ in 0..100 {
                if qemu.pid(&paths).await.is_none() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Removes everything the instance had on the host. Safe to call on a half-started instance.
    async fn teardown(&self, agent: &Agent) {
        self.guest_stop.send_replace(true);
        match (&agent.firecracker, &agent.qemu) {
            (Some(fc), _) => fc.teardown(&self.spec, &self.netns, &self.host_if).await,
            (None, Some(qemu)) => self.kill_vm(qemu).await,
            (None, None) => agent.runc.delete(self.id.as_str()).await,
        }
        let rootfs = self.dir.join("rootfs");
        if is_mountpoint(&rootfs).await
            && netlink::run("umount", &[&rootfs.display().to_string()], None)
                .await
                .is_err()
        {
            let _ = netlink::run("umount", &["-l", &rootfs.display().to_string()], None).await;
        }
        netlink::delete(&self.netns, &self.host_if).await;
        // Volumes first: removing the directory must never reach into a mounted volume.
        if !crate::volume::unmount_all(&self.dir).await {
            tracing::warn!(instance_id = %self.id, "a volume is still mounted; instance directory kept");
            return;
        }
        agent.volumes.release(&self.id).await;
        if let Err(e) = tokio::fs::remove_dir_all(&self.dir).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(instance_id = %self.id, error = %e, "cannot remove instance directory");
            }
        }
        agent
            .images
            .collect(
                agent.config.image_cache_bytes,
                &agent.config.data_dir.join("instances"),
            )
            .await;
    }
}

fn dir_of(agent: &Agent, id: &InstanceId) -> PathBuf {
    agent.config.data_dir.join("instances").join(id.as_str())
}

async fn is_mountpoint(path: &Path) -> bool {
    let mounts = tokio::fs::read_to_string("/proc/self/mountinfo")
        .await
        .unwrap_or_default();
    let p = path.display().to_string();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

/// Resolves what kiln-init runs: image config merged with the WorkloadSpec (Docker semantics: an
/// overridden entrypoint drops the image's cmd). `vm`: kiln-init mounts the volumes itself, from
/// drives named by serial.
async fn run_config(
    spec: &WorkloadSpec,
    image: &PreparedImage,
    rootfs: &Path,
    vm: bool,
) -> Result<RunConfig, AgentError> {
    let cfg = &image.config;
    let (entrypoint, cmd) = match (&spec.entrypoint, &spec.command) {
        (Some(e), c) => (e.clone(), c.clone().unwrap_or_default()),
        (None, Some(c)) => (cfg.entrypoint.clone().unwrap_or_default(), c.clone()),
        (None, None) => (
            cfg.entrypoint.clone().unwrap_or_default(),
            cfg.cmd.clone().unwrap_or_default(),
        ),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(AgentError::NoCommand);
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    );
    for kv in &cfg.env {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k.to_owned(), v.to_owned());
        }
    }
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.insert("KILN_APP_NAME".into(), spec.app_name.to_string());
    env.insert("KILN_INSTANCE_ID".into(), spec.instance_id.to_string());
    env.insert(
        "KILN_RELEASE_VERSION".into(),
        spec.release_version.to_string(),
    );
    env.insert("KILN_PRIVATE_IP".into(), spec.network.ipv6.to_string());
    let (uid, gid) = resolve_user(cfg.user.as_deref(), rootfs).await?;
    Ok(RunConfig {
        argv,
        env,
        workdir: cfg.working_dir.clone().unwrap_or_else(|| "/".into()),
        uid,
        gid,
        hostname: spec.instance_id.as_str().replace('_', "-"),
        stop_signal: spec.stop.signal.clone(),
        stop_timeout_ms: spec.stop.timeout_ms,
        network: Some(kiln_types::guest::GuestNetwork {
            interface: "eth0".into(),
            ipv6: spec.network.ipv6,
            gateway: crate::netlink::GATEWAY,
        }),
        secrets: (spec.secrets.version > 0).then(|| kiln_types::guest::GuestSecrets {
            version: spec.secrets.version,
            export_env: spec.secrets.export_env,
            reload_signal: "SIGHUP".into(),
        }),
        mounts: spec
            .mounts
            .iter()
            .enumerate()
            .map(|(i, m)| kiln_types::guest::GuestMount {
                path: m.path.clone(),
                serial: vm.then(|| kiln_types::guest::volume_serial(i)),
            })
            .collect(),
        read_only_root: spec.read_only_root,
    })
}

/// `user`, `uid`, `user:group` or `uid:gid`, names looked up in the image's own passwd/group.
async fn resolve_user(user: Option<&str>, rootfs: &Path) -> Result<(u32, u32), AgentError> {
    let Some(user) = user else { return Ok((0, 0)) };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let unknown = || AgentError::UnknownUser {
        user: user.to_owned(),
    };
    let passwd = tokio::fs::read_to_string(rootfs.join("etc/passwd"))
        .await
        .unwrap_or_default();
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(n) => (
            n,
            passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.get(2) == Some(&u))
                .and_then(|f| f.get(3)?.parse().ok())
                .unwrap_or(n),
        ),
        Err(_) => {
            let f: Vec<&str> = passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.first() == Some(&u))
                .ok_or_else(unknown)?;
            (
                f.get(2).and_then(|s| s.parse().ok()).ok_or_else(unknown)?,
                f.get(3).and_then(|s| s.parse().ok()).ok_or_else(unknown)?,
            )
        }
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                let group = tokio::fs::read_to_string(rootfs.join("etc/group"))
                    .await
                    .unwrap_or_default();
                group
                    .lines()
                    .map(|l| l.split(':').collect::<Vec<_>>())
                    .find(|f| f.first() == Some(&g))
                    .and_then(|f| f.get(2)?.parse().ok())
                    .ok_or_else(unknown)?
            }
        },
    };
    Ok((uid, gid))
}
