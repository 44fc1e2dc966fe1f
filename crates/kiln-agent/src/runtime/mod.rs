//! Runtime drivers. `runc` runs today (see `crate::runc`); `firecracker` is the production driver,
//! planned and checked against Firecracker's API specification but not bootable on these hosts.

pub mod firecracker;
pub mod qemu;
