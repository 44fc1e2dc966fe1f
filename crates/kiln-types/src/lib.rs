//! Kiln's shared vocabulary.
//!
//! This crate owns the types every other Kiln crate speaks: typed identifiers ([`AppId`], [`HostId`],
//! ...), units ([`MiB`], [`MilliCpu`]), validated names ([`AppName`]), the scheduler-to-agent contract
//! ([`WorkloadSpec`]), the event catalog ([`event::Event`]) and the files that cross into an instance
//! ([`guest::RunConfig`]).
//!
//! It deliberately does no I/O and depends on no other Kiln crate, so that the guest init, the
//! scheduler and the wire types can all use it without pulling in a runtime.

pub mod dns;
pub mod event;
pub mod frame;
pub mod guest;
pub mod id;
pub mod name;
pub mod net;
pub mod secrets;
pub mod units;
pub mod workload;

pub use id::{AppId, HostId, InstanceId, OrgId, ReleaseId, TokenId, UserId, VolumeId};
pub use name::{AppName, NameError};
pub use units::{MiB, MilliCpu};
pub use workload::{
    ImageRef, InstanceState, ServiceProtocol, ServiceSpec, StopSpec, WorkloadSpec,
    WORKLOAD_SPEC_VERSION,
};

/// Milliseconds since the Unix epoch; the one timestamp representation on every wire and in the log.
pub type UnixMillis = i64;

/// The current wall-clock time as [`UnixMillis`].
pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Formats an error and its sources as `a: b: c`: the one place a chain is printed, where the
/// error is finally handled (logged once, or shown to a person).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}
