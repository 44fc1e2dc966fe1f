//! Runtime drivers. `runc` runs today (see `crate::runc`); `qemu` boots real microVMs (under TCG
//! here); `firecracker` is the production driver, real code checked against Firecracker's API
//! specification and documented protocols, but never booted on these hosts (PVM-backed KVM).

pub mod firecracker;
pub mod qemu;
