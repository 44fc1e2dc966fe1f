//! The WireGuard overlay joining hosts and edges (locked decision 0004).
//!
//! This crate will own peer configuration, key rotation and the embedded userspace WireGuard used
//! where the kernel has no WireGuard module. It owns nothing yet: on one machine (`kilnd dev`) the
//! edge reaches instances directly over the host's veth routes, so no overlay is needed. The
//! address plan it will carry is already fixed in `kiln_types::net`. Status and open questions:
//! docs/specs/networking/overlay-wireguard.md.
