//! Placement: which host runs an instance. Pure code, no I/O.
//!
//! This crate owns the placement decision over an inventory of hosts: memory is a hard cap
//! (locked decision 0012: instance memory plus per-instance overhead never exceeds a host's
//! allocatable memory), CPU is soft (oversubscribed up to a ratio), and among hosts that fit the
//! least loaded by memory wins, which spreads instances. When nothing fits it says why, counted per
//! constraint. It does not decide *what* should run (the reconciler does) nor talk to hosts.

use std::collections::BTreeMap;
use std::fmt;

use kiln_types::{HostId, MiB, MilliCpu};

/// Memory reserved per instance on top of its own (VMM, agent bookkeeping).
pub const INSTANCE_OVERHEAD: MiB = MiB(16);

/// One host as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCapacity {
    pub id: HostId,
    pub ready: bool,
    pub driver: String,
    pub memory: MiB,
    pub cpu: MilliCpu,
    pub used_memory: MiB,
    pub used_cpu: MilliCpu,
}

/// What one instance needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub memory: MiB,
    pub cpu: MilliCpu,
    /// Drivers the workload can run on; empty = any.
    pub drivers: Vec<String>,
}

/// Scheduler tunables.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// How many times a host's CPUs may be promised (soft limit).
    pub cpu_oversubscription: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            cpu_oversubscription: 4.0,
        }
    }
}

/// Why no host fit, with the number of hosts each constraint excluded.
#[derive(Debug, Clone, PartialEq, Eq, Default, thiserror::Error)]
pub struct NoFit {
    pub by_reason: BTreeMap<&'static str, usize>,
}

impl fmt::Display for NoFit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.by_reason.is_empty() {
            return f.write_str("no hosts are registered");
        }
        f.write_str("no host fits: ")?;
        let parts: Vec<String> = self
            .by_reason
            .iter()
            .map(|(r, n)| format!("{n} host(s) {r}"))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// Picks a host for `req`, or explains why none fits.
pub fn place<'a>(
    hosts: &'a [HostCapacity],
    req: &Request,
    policy: &Policy,
) -> Result<&'a HostCapacity, NoFit> {
    let mut nofit = NoFit::default();
    let mut best: Option<(&HostCapacity, u64)> = None;
    let need_mem = req.memory.0 + INSTANCE_OVERHEAD.0;
    for h in hosts {
        let reason = if !h.ready {
            Some("not ready")
        } else if !req.drivers.is_empty() && !req.drivers.contains(&h.driver) {
            Some("run an incompatible driver")
        } else if h.used_memory.0 + need_mem > h.memory.0 {
            Some("lack memory")
        } else if f64::from(h.used_cpu.0 + req.cpu.0)
            > f64::from(h.cpu.0) * policy.cpu_oversubscription
        {
            Some("lack CPU")
        } else {
            None
        };
        match reason {
            Some(r) => *nofit.by_reason.entry(r).or_default() += 1,
            None => {
                let free = h.memory.0 - h.used_memory.0 - need_mem;
                if best.is_none_or(|(_, f)| free > f) {
                    best = Some((h, free));
                }
            }
        }
    }
    best.map(|(h, _)| h).ok_or(nofit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(mem: u64, used: u64) -> HostCapacity {
        HostCapacity {
            id: HostId::generate(),
            ready: true,
            driver: "runc".into(),
            memory: MiB(mem),
            cpu: MilliCpu(2000),
            used_memory: MiB(used),
            used_cpu: MilliCpu(0),
        }
    }

    fn req(mem: u64) -> Request {
        Request {
            memory: MiB(mem),
            cpu: MilliCpu(1000),
            drivers: vec![],
        }
    }

    #[test]
    fn memory_is_a_hard_cap() {
        let hosts = vec![host(1024, 1024 - 256 - 15)];
        let err = place(&hosts, &req(256), &Policy::default()).unwrap_err();
        assert_eq!(err.by_reason.get("lack memory"), Some(&1));
        let hosts = vec![host(1024, 1024 - 256 - 16)];
        assert!(place(&hosts, &req(256), &Policy::default()).is_ok());
    }

    #[test]
    fn spreads_to_the_host_with_most_free_memory() {
        let hosts = vec![host(4096, 2048), host(4096, 512), host(4096, 1024)];
        assert_eq!(
            place(&hosts, &req(256), &Policy::default()).unwrap().id,
            hosts[1].id
        );
    }

    #[test]
    fn explains_every_excluded_host() {
        let mut down = host(4096, 0);
        down.ready = false;
        let mut qemu = host(4096, 0);
        qemu.driver = "qemu".into();
        let hosts = vec![down, qemu, host(128, 0)];
        let r = Request {
            memory: MiB(256),
            cpu: MilliCpu(1000),
            drivers: vec!["runc".into()],
        };
        let err = place(&hosts, &r, &Policy::default()).unwrap_err();
        assert_eq!(err.to_string(), "no host fits: 1 host(s) lack memory, 1 host(s) not ready, 1 host(s) run an incompatible driver");
        assert_eq!(
            place(&[], &r, &Policy::default()).unwrap_err().to_string(),
            "no hosts are registered"
        );
    }
}
