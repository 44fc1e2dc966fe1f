//! Listening sockets that a successor process can share.
//!
//! Every listener is bound with `SO_REUSEPORT`, so a new edge process can bind the same addresses
//! while the old one still serves: for a moment both accept, then the old one closes its
//! listeners and drains (`Edge::shutdown`). With `net.ipv4.tcp_migrate_req = 1` (Linux ≥ 5.14)
//! the kernel moves connections still queued on a closing listener to the successor's; without
//! it, connections that arrived in the last instant before the close are reset, which is why
//! `kilnd edge` warns when the setting is off.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Accept queue length: bursts of new connections must not overflow it between two accepts.
const BACKLOG: i32 = 4096;

/// Binds `addr` with `SO_REUSEPORT` (and `SO_REUSEADDR`), non-blocking. IPv6 sockets are IPv6
/// only, so `[::]:443` and `0.0.0.0:443` can be bound side by side. `freebind` allows an address
/// that is not (yet) configured on this machine: a dedicated IPv4 that fails over to this edge.
pub(crate) fn bind(addr: SocketAddr, freebind: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if freebind {
        match addr {
            SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
            SocketAddr::V6(_) => socket.set_freebind_v6(true)?,
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Whether the kernel migrates queued connections from a closing `SO_REUSEPORT` listener
/// (`net.ipv4.tcp_migrate_req`); `None` when the setting does not exist.
pub fn migrate_req_enabled() -> Option<bool> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .ok()
        .map(|s| s.trim() == "1")
}
