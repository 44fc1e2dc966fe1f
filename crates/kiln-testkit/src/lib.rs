//! Kiln's test harness.
//!
//! This crate owns the throwaway infrastructure that tests (and the `./scripts/run` demo) need around
//! the real services, so that each test does not grow its own copy:
//! - [`registry`]: a local OCI distribution registry (Debian's `docker-registry`) in a temp dir;
//! - [`image`]: deterministic OCI images built in Rust (tar + gzip + config + manifest), verified
//!   after building, and pushed with the plain distribution API;
//! - [`example`]: the static `examples/hello-tls` binary and an image around it.
//! - [`postgres`]: a throwaway PostgreSQL cluster (`initdb` + `pg_ctl`) in a temp dir;
//! - [`dnsmasq`]: a DNS server on loopback answering given TXT records (custom domains);
//! - [`dev`]: the real binaries (`kilnd dev`, the `kiln` CLI) run as child processes.
//!
//! It is a dev-dependency of other crates only (DESIGN: "kiln-testkit is a dev-dependency only");
//! production code never links it. Because it is test code, it reports errors with `anyhow`.
//! The `kiln-testkit` binary exposes the same helpers to shell scripts.

pub mod bench;
pub mod dev;
pub mod dnsmasq;
pub mod example;
pub mod image;
pub mod postgres;
pub mod registry;

pub use example::{build_hello_tls, build_static, hello_tls_image, StaticBinaries};
pub use image::{BuiltImage, ImageBuilder, Layer};
pub use registry::Registry;
