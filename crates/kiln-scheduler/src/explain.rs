//! Why each host was or was not chosen for one request: the debugging view's data.
//!
//! [`Inventory::explain`] checks every host with the same rules as a placement (it is the plain
//! scan the index must agree with) and ranks the hosts that fit by the placement score. Hosts are
//! listed fitting ones first by rank, then rejected ones by constraint (in check order) and host
//! id, so the same inventory and request always print the same text.

use std::fmt;

use kiln_types::{HostId, MiB};

use crate::inventory::Inventory;
use crate::model::{Constraint, Driver, HostState, NoFit, Region, Request, Volumes};

/// The verdict on one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The host fits. `rank` 1 is the host a placement picks.
    Fits {
        rank: usize,
        /// Instances of the request's group already on the host (fewer is better).
        same_group: u32,
        /// Memory left after this instance and its overhead (more is better).
        free_after: MiB,
    },
    /// The first constraint the host fails, with the figures behind it.
    Rejected {
        constraint: Constraint,
        detail: String,
    },
}

/// One host's line in an explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVerdict {
    pub host: HostId,
    pub region: Region,
    pub driver: Driver,
    pub state: HostState,
    /// Allocatable memory not used yet (before this request).
    pub free_memory: MiB,
    pub verdict: Verdict,
}

/// The verdict on every host for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub request: Request,
    /// Fitting hosts by rank, then rejected hosts by constraint and id.
    pub hosts: Vec<HostVerdict>,
    /// The rank-1 host, or why nothing fits.
    pub outcome: Result<HostId, NoFit>,
}

impl Inventory {
    /// Explains where `req` would go and why every other host would not get it. Costs a scan of
    /// every host (a debugging view, not the placement path).
    pub fn explain(&self, req: &Request) -> Explanation {
        let pinned = self.pinned(req);
        let need = req.memory_with_overhead();
        let counts = self.group_counts(&req.group);
        let mut fits = Vec::new();
        let mut rejected = Vec::new();
        let mut nofit = NoFit::default();
        for (slot, e) in self.entries().iter().enumerate() {
            let slot = slot as u32;
            let line = |verdict| HostVerdict {
                host: e.host.id.clone(),
                region: e.host.region.clone(),
                driver: e.host.driver.clone(),
                state: e.host.state,
                free_memory: MiB(e.host.memory.0.saturating_sub(e.used_memory)),
                verdict,
            };
            match self.check(slot, req, pinned) {
                Some(c) => {
                    *nofit.by_constraint.entry(c).or_default() += 1;
                    let detail = detail(c, e, req);
                    rejected.push((
                        c,
                        line(Verdict::Rejected {
                            constraint: c,
                            detail,
                        }),
                    ));
                }
                None => {
                    let score = self.score(slot, counts, need);
                    let placeholder = Verdict::Fits {
                        rank: 0,
                        same_group: score.0,
                        free_after: MiB(score.1 .0),
                    };
                    fits.push((score, line(placeholder)));
                }
            }
        }
        fits.sort_by_key(|f| f.0);
        rejected.sort_by(|a, b| (a.0, &a.1.host).cmp(&(b.0, &b.1.host)));
        let outcome = match fits.first() {
            Some((_, v)) => Ok(v.host.clone()),
            None => Err(nofit),
        };
        let mut hosts = Vec::with_capacity(fits.len() + rejected.len());
        for (i, (_, mut v)) in fits.into_iter().enumerate() {
            if let Verdict::Fits { rank, .. } = &mut v.verdict {
                *rank = i + 1;
            }
            hosts.push(v);
        }
        hosts.extend(rejected.into_iter().map(|(_, v)| v));
        Explanation {
            request: req.clone(),
            hosts,
            outcome,
        }
    }
}

fn detail(c: Constraint, e: &crate::inventory::Entry, req: &Request) -> String {
    let free = e.host.memory.0.saturating_sub(e.used_memory);
    match c {
        Constraint::HostDown => "host is down".into(),
        Constraint::HostDraining => "host is draining".into(),
        Constraint::Region => format!("host is in {}, request wants {}", e.host.region, req.region),
        Constraint::Driver => {
            let want: Vec<&str> = req.drivers.iter().map(|d| d.0.as_str()).collect();
            format!(
                "host runs {}, workload accepts {}",
                e.host.driver,
                want.join(", ")
            )
        }
        Constraint::VolumeLocality => match &req.volumes {
            Volumes::Existing { host } => format!("volume is on {host}"),
            _ => "volume is on another host".into(),
        },
        Constraint::Memory => format!(
            "needs {} MiB with overhead, {free} MiB free",
            req.memory_with_overhead()
        ),
        Constraint::Cpu => format!(
            "needs {}m, {}m of {}m promised",
            req.cpu.0, e.used_cpu, e.cpu_limit
        ),
        Constraint::Disk => format!(
            "needs {} MiB of volume space, {} MiB free",
            req.new_disk(),
            e.host.disk.0.saturating_sub(e.used_disk)
        ),
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.request;
        let drivers = if r.drivers.is_empty() {
            "any".to_owned()
        } else {
            r.drivers
                .iter()
                .map(|d| d.0.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        writeln!(
            f,
            "request: {}/{} region={} drivers={} memory={} cpu={}",
            r.group.app, r.group.process, r.region, drivers, r.memory, r.cpu
        )?;
        match &self.outcome {
            Ok(h) => writeln!(f, "chosen: {h}")?,
            Err(e) => writeln!(f, "chosen: none ({e})")?,
        }
        for h in &self.hosts {
            let verdict = match &h.verdict {
                Verdict::Fits {
                    rank,
                    same_group,
                    free_after,
                } => format!(
                    "rank {rank}: {same_group} of the group here, {} MiB free after",
                    free_after.0
                ),
                Verdict::Rejected { constraint, detail } => {
                    format!("rejected by {constraint}: {detail}")
                }
            };
            writeln!(
                f,
                "{} {} {} {} free={} MiB {verdict}",
                h.host,
                h.region,
                h.driver,
                h.state.as_str(),
                h.free_memory.0
            )?;
        }
        Ok(())
    }
}
