//! The Kiln host agent.
//!
//! This crate owns everything that happens on one host: registering with the control plane,
//! following the host's assignments, pulling and caching images, building each instance's root
//! filesystem, wiring its network, running it under the host's runtime driver, checking its health
//! and reporting its state. It does not decide what runs where (the control plane does) and does
//! not route traffic from outside (the edge does).
//!
//! The agent is level-triggered like the reconciler: each assignments snapshot is compared with
//! what runs on the host, and the difference is acted on. Instances outlive the agent: a restarted
//! agent finds them by their state directory and adopts them instead of restarting them.

mod error;
mod exec;
mod guest;
mod health;
mod image;
mod instance;
mod logs;
mod netlink;
mod runc;
pub mod runtime;
mod volume;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Mutex};

use kiln_api::{Assignment, Client, InstanceReport, LogRecord, RegisterHost};
use kiln_types::event::Driver;
use kiln_types::{HostId, InstanceId, InstanceState, MiB, MilliCpu};

/// WorkloadSpec capabilities (`kiln_types::workload::capability`) this agent can apply. A spec
/// that requires anything else is reported failed with the reason, before anything is applied.
/// Both drivers this agent runs (runc and qemu) run HTTP and exec checks, write the secrets file
/// (optionally exported as env), attach local volumes and mount the root read-only, besides the
/// 1.0 baseline; not yet kernel choice or performance CPUs.
const SUPPORTED_CAPABILITIES: &[&str] = &[
    kiln_types::workload::capability::CHECK_HTTP,
    kiln_types::workload::capability::CHECK_EXEC,
    kiln_types::workload::capability::MOUNTS,
    kiln_types::workload::capability::ROOT_READ_ONLY,
    kiln_types::workload::capability::SECRETS,
    kiln_types::workload::capability::SECRETS_ENV,
];

/// The Firecracker driver's: no volume drives or read-only root yet (untested there).
const FIRECRACKER_CAPABILITIES: &[&str] = &[
    kiln_types::workload::capability::CHECK_HTTP,
    kiln_types::workload::capability::CHECK_EXEC,
    kiln_types::workload::capability::SECRETS,
    kiln_types::workload::capability::SECRETS_ENV,
];

pub use error::AgentError;

/// Host agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Images, rootfs trees and instance state live here.
    pub data_dir: PathBuf,
    /// Name the host registers under (stable across restarts).
    pub host_name: String,
    /// The region the host registers in.
    pub region: String,
    /// Path of the static `kiln-init` binary placed in every instance.
    pub init_binary: PathBuf,
    /// The `runc` binary.
    pub runc: PathBuf,
    /// Capacity offered to the scheduler.
    pub cpu: MilliCpu,
    pub memory: MiB,
    /// Registries reached over plain HTTP (loopback always is).
    pub plain_http_registries: Vec<String>,
    /// How often running instances are health-checked.
    pub health_interval: Duration,
    /// Size budget of the image cache (unpacked trees + blobs); unused images beyond it are
    /// evicted, least recently used first, whenever an instance is torn down.
    pub image_cache_bytes: u64,
    /// Run instances as QEMU microVMs instead of runc containers.
    pub qemu: Option<runtime::qemu::QemuConfig>,
    /// Run instances as Firecracker microVMs under the jailer (takes precedence over `qemu`).
    pub firecracker: Option<runtime::firecracker::FirecrackerConfig>,
}

/// A running agent.
pub struct Agent {
    pub(crate) config: AgentConfig,
    pub(crate) client: Client,
    pub(crate) host_id: HostId,
    pub(crate) images: image::ImageCache,
    pub(crate) runc: runc::Runc,
    /// The VM driver, when this host runs instances as QEMU microVMs.
    pub(crate) qemu: Option<runtime::qemu::Qemu>,
    /// The production VM driver, when this host runs Firecracker.
    pub(crate) firecracker: Option<runtime::firecracker::Firecracker>,
    pub(crate) instances: Mutex<HashMap<InstanceId, Arc<instance::Instance>>>,
    /// Local volumes and the instance holding each.
    pub(crate) volumes: volume::Volumes,
    /// Log lines from every instance, toward the shipper.
    pub(crate) logs_tx: mpsc::Sender<LogRecord>,
    logs_rx: std::sync::Mutex<Option<mpsc::Receiver<LogRecord>>>,
}

impl Agent {
    /// Registers the host and prepares its state directory and host network.
    pub async fn start(config: AgentConfig, client: Client) -> Result<Arc<Agent>, AgentError> {
        for dir in ["images", "blobs", "instances"] {
            let p = config.data_dir.join(dir);
            tokio::fs::create_dir_all(&p)
                .await
                .map_err(|source| AgentError::StateDir {
                    path: p.clone(),
                    source,
                })?;
        }
        if let Some(fc) = &config.firecracker {
            runtime::firecracker::check_host(fc).map_err(|source| AgentError::FirecrackerHost {
                source: Box::new(source),
            })?;
        }
        let reg = client
            .register_host(&RegisterHost {
                name: config.host_name.clone(),
                driver: if config.firecracker.is_some() {
                    Driver::Firecracker
                } else if config.qemu.is_some() {
                    Driver::Qemu
                } else {
                    Driver::Runc
                },
                cpu: config.cpu,
                memory: config.memory,
                region: Some(config.region.clone()),
            })
            .await
            .map_err(|source| AgentError::Register {
                source: Box::new(source),
            })?;
        netlink::ensure_host_interface(reg.index).await?;
        let images = image::ImageCache::new(&config)?;
        let (logs_tx, logs_rx) = mpsc::channel(logs::QUEUE);
        let volumes = volume::Volumes::new(&config.data_dir);
        tracing::info!(host_id = %reg.host_id, index = reg.index, "agent registered");
        Ok(Arc::new(Agent {
            runc: runc::Runc {
                binary: config.runc.clone(),
                root: config.data_dir.join("runc"),
            },
            qemu: config
                .qemu
                .clone()
                .filter(|_| config.firecracker.is_none())
                .map(runtime::qemu::Qemu::new),
            firecracker: config
                .firecracker
                .clone()
                .map(runtime::firecracker::Firecracker::new),
            config,
            client,
            host_id: reg.host_id,
            images,
            instances: Mutex::new(HashMap::new()),
            volumes,
            logs_tx,
            logs_rx: std::sync::Mutex::new(Some(logs_rx)),
        }))
    }

    pub fn host_id(&self) -> &HostId {
        &self.host_id
    }

    /// Follows the host's assignments forever.
    pub async fn run(self: Arc<Self>) {
        let rx = self
            .logs_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(rx) = rx {
            tokio::spawn(logs::ship(self.client.clone(), self.host_id.clone(), rx));
        }
        tokio::spawn(exec::serve(self.clone()));
        tokio::spawn(heartbeat(self.client.clone(), self.host_id.clone()));
        let mut seq = 0;
        let mut backoff = Duration::from_millis(200);
        loop {
            match self
                .client
                .assignments(&self.host_id, seq, Duration::from_secs(25))
                .await
            {
                Ok(a) => {
                    backoff = Duration::from_millis(200);
                    seq = a.seq;
                    self.apply(a.assignments).await;
                    for v in &a.deleted_volumes {
                        self.volumes.delete(v).await;
                    }
                }
                Err(e) => {
                    // Instances keep running while the control plane is away; retry with backoff.
                    tracing::warn!(error = %error_chain(&e), "cannot fetch assignments; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn apply(self: &Arc<Self>, assignments: Vec<Assignment>) {
        let mut known = self.instances.lock().await;
        for a in assignments {
            let id = a.spec.instance_id.clone();
            let capabilities = if self.firecracker.is_some() {
                FIRECRACKER_CAPABILITIES
            } else {
                SUPPORTED_CAPABILITIES
            };
            let refused = match a.spec.check_runnable(capabilities) {
                Err(e) => Some(e.to_string()),
                // A mount must name its volume (WorkloadSpec 1.2): the agent never guesses one.
                Ok(()) => a
                    .spec
                    .mounts
                    .iter()
                    .find(|m| m.volume_id.is_none())
                    .map(|m| {
                        AgentError::NoVolumeId {
                            volume: m.volume.clone(),
                        }
                        .to_string()
                    }),
            };
            if let Some(reason) = refused {
                // Rejected whole, before anything is applied.
                let report = InstanceReport {
                    state: InstanceState::Failed,
                    reason: Some(reason),
                };
                let _ = self
                    .client
                    .report_instance(&self.host_id, &id, &report)
                    .await;
                continue;
            }
            match known.get(&id) {
                Some(inst) => {
                    if !a.desired_running {
                        inst.request_stop();
                    } else if inst.wants_secrets(a.secrets_version) {
                        // A newer version for an app that reloads in place.
                        let (inst, agent) = (inst.clone(), self.clone());
                        tokio::spawn(async move { inst.deliver_secrets(&agent, true).await });
                    }
                }
                None => {
                    let wants_run = a.desired_running && !a.state.is_terminal();
                    let leftovers = instance::Instance::exists_on_disk(self, &id);
                    if !wants_run && !leftovers && a.state.is_terminal() {
                        continue;
                    }
                    let inst = Arc::new(instance::Instance::new(self, a.spec));
                    known.insert(id.clone(), inst.clone());
                    let agent = self.clone();
                    tokio::spawn(async move {
                        inst.clone().lifecycle(agent.clone(), wants_run).await;
                        agent.instances.lock().await.remove(&inst.id);
                    });
                }
            }
        }
    }

    pub(crate) async fn report(
        &self,
        id: &InstanceId,
        state: InstanceState,
        reason: Option<String>,
    ) {
        let report = InstanceReport { state, reason };
        let mut delay = Duration::from_millis(100);
        // Reports queue here while the control plane is unreachable and are sent when it returns.
        loop {
            match self
                .client
                .report_instance(&self.host_id, id, &report)
                .await
            {
                Ok(()) => return,
                Err(e) if e.is_unreachable() => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::warn!(instance_id = %id, error = %error_chain(&e), "instance report rejected");
                    return;
                }
            }
        }
    }
}

pub(crate) use kiln_types::error_chain;

/// How often the agent tells the control plane it is alive (a host silent for several of these is
/// declared down and its stateless instances are replaced elsewhere).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

async fn heartbeat(client: Client, host: HostId) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match client.heartbeat(&host).await {
            Ok(()) => {
                if failing {
                    tracing::info!("heartbeats reach the control plane again");
                }
                failing = false;
            }
            Err(e) => {
                // Logged once per outage, not every five seconds.
                if !failing {
                    tracing::warn!(error = %error_chain(&e), "cannot send heartbeat; instances keep running");
                }
                failing = true;
            }
        }
    }
}
