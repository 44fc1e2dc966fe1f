//! What placement reasons about: hosts, requests, constraints and the "nothing fits" answer.

use std::collections::BTreeMap;
use std::fmt;

use kiln_types::{AppId, HostId, MiB, MilliCpu};

/// Memory reserved per instance on top of its own (VMM, agent bookkeeping).
pub const INSTANCE_OVERHEAD: MiB = MiB(16);

/// A region name (`ams`, `local`, ...). Hosts carry one; a request names the one it wants.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Region(pub String);

impl Region {
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A runtime driver name as a host reports it (`firecracker`, `qemu`, `runc`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Driver(pub String);

impl Driver {
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether a host takes new work (the event catalog's type, recorded by `host_state_changed`).
/// Only `Ready` hosts receive placements; a draining or down host keeps (in the inventory) what
/// already runs on it until the caller removes it.
pub use kiln_types::event::HostState;

/// One host as the scheduler sees it: what it is and what it can hold. What it already holds is
/// added with [`crate::Inventory::add_instance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub id: HostId,
    pub region: Region,
    pub driver: Driver,
    pub state: HostState,
    /// Memory instances may use, overhead included (the hard cap).
    pub memory: MiB,
    /// CPU the host has; placements may promise up to `cpu × cpu_oversubscription`.
    pub cpu: MilliCpu,
    /// Space for local volumes.
    pub disk: MiB,
}

/// The spread unit: one process group of one app. Placement prefers hosts holding the fewest
/// instances of the request's group (anti-affinity).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Group {
    pub app: AppId,
    pub process: String,
}

/// The volumes an instance mounts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Volumes {
    /// No volume.
    #[default]
    None,
    /// Existing volumes: the instance may only run on the host that holds them (a local volume
    /// lives on one host, ADR 0011).
    Existing { host: HostId },
    /// New volumes of this total size, created on the chosen host.
    New { size: MiB },
}

/// What one instance needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub group: Group,
    pub region: Region,
    /// Drivers the workload can run on; empty = any.
    pub drivers: Vec<Driver>,
    /// The instance's memory, without [`INSTANCE_OVERHEAD`].
    pub memory: MiB,
    pub cpu: MilliCpu,
    pub volumes: Volumes,
}

impl Request {
    /// Memory the instance takes from its host: its own plus the overhead.
    pub fn memory_with_overhead(&self) -> u64 {
        self.memory.0.saturating_add(INSTANCE_OVERHEAD.0)
    }

    /// Disk the instance takes from its host (new volumes only).
    pub fn new_disk(&self) -> u64 {
        match self.volumes {
            Volumes::New { size } => size.0,
            _ => 0,
        }
    }
}

/// Scheduler tunables.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// How many times a host's CPUs may be promised (soft limit). At least 1.0 is sensible;
    /// values below are honoured as given.
    pub cpu_oversubscription: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            cpu_oversubscription: 4.0,
        }
    }
}

/// One constraint that can exclude a host, in the order they are checked: a host is counted
/// under the first one it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Constraint {
    /// The host is down.
    HostDown,
    /// The host is draining.
    HostDraining,
    /// The host is in another region than the request's.
    Region,
    /// The host's driver is not one the workload accepts.
    Driver,
    /// The request's volumes live on another host.
    VolumeLocality,
    /// Memory hard cap: used + instance + overhead would exceed allocatable.
    Memory,
    /// CPU soft cap: promised CPU would exceed CPU × oversubscription.
    Cpu,
    /// Not enough free volume space for the request's new volumes.
    Disk,
}

impl Constraint {
    /// Stable machine name (for JSON and metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HostDown => "host_down",
            Self::HostDraining => "host_draining",
            Self::Region => "region",
            Self::Driver => "driver",
            Self::VolumeLocality => "volume_locality",
            Self::Memory => "memory",
            Self::Cpu => "cpu",
            Self::Disk => "disk",
        }
    }

    /// What `n` hosts rejected by this constraint are, in words.
    fn describe(self, n: usize) -> String {
        let hosts = if n == 1 { "host" } else { "hosts" };
        match self {
            Self::HostDown => format!("{n} {hosts} down"),
            Self::HostDraining => format!("{n} {hosts} draining"),
            Self::Region => format!("{n} {hosts} in another region"),
            Self::Driver => format!("{n} {hosts} with a wrong driver"),
            Self::VolumeLocality => format!("{n} {hosts} without the volume"),
            Self::Memory => format!("{n} {hosts} with insufficient memory"),
            Self::Cpu => format!("{n} {hosts} with insufficient CPU"),
            Self::Disk => format!("{n} {hosts} with insufficient volume space"),
        }
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why no host fit, with the number of hosts each constraint excluded (every host is counted
/// once, under the first constraint it fails).
#[derive(Debug, Clone, PartialEq, Eq, Default, thiserror::Error)]
pub struct NoFit {
    pub by_constraint: BTreeMap<Constraint, usize>,
}

impl NoFit {
    /// Hosts excluded by `c`.
    pub fn count(&self, c: Constraint) -> usize {
        self.by_constraint.get(&c).copied().unwrap_or(0)
    }

    /// Hosts considered in all.
    pub fn hosts(&self) -> usize {
        self.by_constraint.values().sum()
    }
}

impl fmt::Display for NoFit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.by_constraint.is_empty() {
            return f.write_str("no hosts are registered");
        }
        f.write_str("no host fits: ")?;
        let parts: Vec<String> = self
            .by_constraint
            .iter()
            .map(|(c, n)| c.describe(*n))
            .collect();
        f.write_str(&parts.join(", "))
    }
}
