//! IPv6 address plan (pure address math; allocation state lives in the control plane's views).
//!
//! Kiln's overlay uses the ULA prefix `fdb5:696c:6e00::/48` (`fd` + a fixed 40-bit global id). Each
//! host gets one /64 (`fdb5:696c:6e00:<host index>::/64`), whose `::1` is the host's own address on
//! its `kiln0` interface. Instances get addresses from `::100` upward inside their host's /64, so an
//! instance address alone tells which host serves it and routes aggregate per host across the mesh.
//! `fd00::/64` is avoided on purpose: these machines already use it on their own interface.

use std::net::Ipv6Addr;

/// The overlay's /48.
pub const OVERLAY_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfdb5, 0x696c, 0x6e00, 0, 0, 0, 0, 0);
pub const OVERLAY_PREFIX_LEN: u8 = 48;
/// Prefix length of one host's subnet.
pub const HOST_PREFIX_LEN: u8 = 64;
/// The first interface id handed to instances; lower ones are reserved for the host.
pub const FIRST_INSTANCE_IID: u64 = 0x100;

/// The /64 of host number `index` (0..=65535).
pub fn host_subnet(index: u16) -> Ipv6Addr {
    let s = OVERLAY_PREFIX.segments();
    Ipv6Addr::new(s[0], s[1], s[2], index, 0, 0, 0, 0)
}

/// The host's own address inside its subnet (`::1`).
pub fn host_address(index: u16) -> Ipv6Addr {
    with_iid(host_subnet(index), 1)
}

/// The `n`th instance address (0-based) of host `index`.
pub fn instance_address(index: u16, n: u64) -> Ipv6Addr {
    with_iid(host_subnet(index), FIRST_INSTANCE_IID.saturating_add(n))
}

/// The instance ordinal of `addr` inside host `index`'s subnet, if it is one.
pub fn instance_ordinal(index: u16, addr: Ipv6Addr) -> Option<u64> {
    let bits = u128::from(addr);
    let subnet = u128::from(host_subnet(index));
    if bits >> 64 != subnet >> 64 {
        return None;
    }
    (bits as u64).checked_sub(FIRST_INSTANCE_IID)
}

fn with_iid(subnet: Ipv6Addr, iid: u64) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(subnet) | u128::from(iid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_plan() {
        assert_eq!(host_subnet(1).to_string(), "fdb5:696c:6e00:1::");
        assert_eq!(host_address(1).to_string(), "fdb5:696c:6e00:1::1");
        assert_eq!(instance_address(1, 0).to_string(), "fdb5:696c:6e00:1::100");
        assert_eq!(instance_address(2, 5).to_string(), "fdb5:696c:6e00:2::105");
        assert_eq!(instance_ordinal(2, instance_address(2, 5)), Some(5));
        assert_eq!(instance_ordinal(1, instance_address(2, 5)), None);
        assert_eq!(instance_ordinal(1, host_address(1)), None);
    }
}
