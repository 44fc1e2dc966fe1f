//! Host networking for instances, through iproute2 (and [`run`], the agent's one way to run a
//! host command).
//!
//! Each instance gets its own network namespace joined to the host by a veth pair:
//! - host side `kv<id>`: link-local `fe80::1` and a /128 route to the instance's address;
//! - instance side `eth0`: the instance's overlay address (/128) and a default route via `fe80::1`,
//!   configured by kiln-init from `run.json` (as inside a VM), not by the agent.
//!
//! The host's own overlay address (`::1` of its /64) sits on a `kiln0` dummy interface (or `lo`) so that
//! connections from the host (the edge, health checks) to instances pick it as source address.
//! Addresses are added with `nodad`: they are unique by construction (IPAM), and duplicate address
//! detection would delay every start by a second or more.

use std::net::Ipv6Addr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::AgentError;

pub(crate) const HOST_INTERFACE: &str = "kiln0";
/// The host side's link-local address on every instance link: the instances' default gateway.
pub(crate) const GATEWAY: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Runs `ip ARGS`, feeding `batch` on stdin (for `ip -batch -`).
async fn ip(args: &[&str], batch: Option<&str>) -> Result<(), AgentError> {
    run("ip", args, batch).await
}

/// Runs a host command to completion; a non-zero exit is an error carrying its stderr.
pub(crate) async fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<(), AgentError> {
    let command = format!("{program} {}", args.join(" "));
    let spawn_err = |source| AgentError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await.map_err(spawn_err)?;
    }
    let out = child.wait_with_output().await.map_err(spawn_err)?;
    if !out.status.success() {
        return Err(AgentError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Puts the host's overlay address on `kiln0` (a dummy interface), or on `lo` where the kernel has
/// no dummy driver. Idempotent.
pub(crate) async fn ensure_host_interface(index: u16) -> Result<(), AgentError> {
    let addr = format!("{}/128", kiln_types::net::host_address(index));
    let mut dev = HOST_INTERFACE;
    if ip(&["link", "show", HOST_INTERFACE], None).await.is_err()
        && ip(&["link", "add", HOST_INTERFACE, "type", "dummy"], None)
            .await
            .is_err()
    {
        dev = "lo";
    }
    ip(&["link", "set", dev, "up"], None).await?;
    ip(&["-6", "addr", "replace", &addr, "dev", dev, "nodad"], None).await
}

/// Names of an instance's namespace and host-side interface (at most 15 characters).
pub(crate) fn names(suffix: &str) -> (String, String) {
    (
        format!("kiln-{suffix}"),
        format!("kv{}", &suffix[..suffix.len().min(13)]),
    )
}

/// Creates the namespace and veth pair of an instance with address `addr`.
pub(crate) async fn create(netns: &str, host_if: &str, addr: Ipv6Addr) -> Result<(), AgentError> {
    // A previous attempt may have left pieces behind; start clean.
    delete(netns, host_if).await;
    ip(&["netns", "add", netns], None).await?;
    let host_side = format!(
        "link add {host_if} type veth peer name eth0 netns {netns}\n\
         link set {host_if} up\n\
         addr add fe80::1/64 dev {host_if} nodad\n\
         route replace {addr}/128 dev {host_if}\n"
    );
    ip(&["-batch", "-"], Some(&host_side)).await?;
    // The instance side (lo and eth0 up, the address, the default route) is configured by
    // kiln-init from run.json, exactly as it will be inside a VM.
    Ok(())
}

/// Creates the tap device of a VM instance with address `addr`: the same host side as a veth
/// (gateway `fe80::1`, a /128 route), the guest side being the VM's virtio-net interface.
pub(crate) async fn create_tap(tap: &str, addr: Ipv6Addr) -> Result<(), AgentError> {
    let _ = ip(&["link", "del", tap], None).await;
    let host_side = format!(
        "tuntap add dev {tap} mode tap\n\
         link set {tap} up\n\
         addr add fe80::1/64 dev {tap} nodad\n\
         route replace {addr}/128 dev {tap}\n"
    );
    ip(&["-batch", "-"], Some(&host_side)).await
}

/// Removes an instance's veth pair and namespace; missing pieces are not an error.
pub(crate) async fn delete(netns: &str, host_if: &str) {
    let _ = ip(&["link", "del", host_if], None).await;
    let _ = ip(&["netns", "del", netns], None).await;
}
