//! Placement and rollout planning: pure code, no I/O, no clock, no randomness.
//!
//! This crate owns the decisions the reconciler asks for:
//! - [`Inventory`]: where an instance goes. Memory is a hard cap (locked decision 0012: instance
//!   memory plus [`INSTANCE_OVERHEAD`] never exceeds a host's allocatable memory), CPU is soft
//!   (oversubscribed up to [`Policy::cpu_oversubscription`]), only ready hosts take new work, the
//!   host's driver must be one the workload accepts, the region is the request's, an existing
//!   volume pins the instance to its host and a new one needs volume space. Among hosts that fit,
//!   the fewest instances of the same app process group wins, then the most free memory. When
//!   nothing fits, [`NoFit`] counts the hosts each constraint excluded. [`Inventory::explain`]
//!   gives every host's verdict for the debugging view.
//! - [`rollout`]: the next actions of a deploy under its strategy (rolling, canary, blue-green,
//!   immediate), computed from what is, so a restarted control plane resumes.
//! - [`fair`]: which of a pass's actions go out now, bounded per pass and fair between orgs.
//! - [`reconcile`]: one pass over every app (desired vs actual) into a plan, using the three above.
//!
//! It does not read views, append events, talk to hosts or keep time: the control plane
//! (`kiln-control`) gives it what is and turns its answers into events.

pub mod explain;
pub mod fair;
mod inventory;
mod model;
pub mod reconcile;
pub mod rollout;

pub use explain::{Explanation, HostVerdict, Verdict};
pub use inventory::{Batch, Inventory, Usage};
pub use model::{
    Constraint, Driver, Group, Host, HostState, NoFit, Policy, Region, Request, Volumes,
    INSTANCE_OVERHEAD,
};

#[cfg(test)]
mod tests;
