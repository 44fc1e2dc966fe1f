//! Benchmarks of the real binaries, run by `./scripts/bench NAME` through the `kiln-bench` binary.
//! Each prints what it measured and ends with `key=value` lines of its figures.

pub mod api;
pub mod deploy;
pub mod edge;
pub mod scheduler;
pub mod store;
