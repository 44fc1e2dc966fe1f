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

/// A pool of public IPv4 addresses the control plane hands out as dedicated addresses (the IPv4
/// add-on, ADR 0007), written `A.B.C.D/N`. Every address of the block is allocatable: these are
/// announced by the edges, not a LAN, so there is no network or broadcast address to skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Pool {
    first: u32,
    len: u32,
}

/// Why an IPv4 pool could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid IPv4 pool {input:?}: {reason} (expected an address block like 203.0.113.0/28)")]
pub struct Ipv4PoolError {
    pub input: String,
    pub reason: &'static str,
}

impl Ipv4Pool {
    /// Largest pool accepted: a /16 (allocation scans it).
    pub const MIN_PREFIX: u8 = 16;

    pub fn parse(s: &str) -> Result<Ipv4Pool, Ipv4PoolError> {
        let err = |reason| Ipv4PoolError {
            input: s.to_owned(),
            reason,
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(|| err("no /prefix"))?;
        let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| err("not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| err("prefix is not a number"))?;
        if !(Self::MIN_PREFIX..=32).contains(&prefix) {
            return Err(err("prefix must be between /16 and /32"));
        }
        let len = 1u32 << (32 - prefix);
        let first = u32::from(addr);
        if first % len != 0 {
            return Err(err("address has bits set beyond the prefix"));
        }
        Ok(Ipv4Pool { first, len })
    }

    /// Every address of the pool, in order.
    pub fn addresses(&self) -> impl Iterator<Item = std::net::Ipv4Addr> {
        (self.first..self.first + self.len).map(std::net::Ipv4Addr::from)
    }

    pub fn contains(&self, ip: std::net::Ipv4Addr) -> bool {
        let n = u32::from(ip);
        n >= self.first && n - self.first < self.len
    }
}

impl std::fmt::Display for Ipv4Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            std::net::Ipv4Addr::from(self.first),
            32 - self.len.trailing_zeros()
        )
    }
}

#[cfg(test)]
mod ipv4_pool_tests {
    use super::*;

    #[test]
    fn pools_parse_and_list_their_addresses() {
        let p = Ipv4Pool::parse("127.0.1.0/30").unwrap();
        assert_eq!(p.to_string(), "127.0.1.0/30");
        let all: Vec<String> = p.addresses().map(|a| a.to_string()).collect();
        assert_eq!(all, ["127.0.1.0", "127.0.1.1", "127.0.1.2", "127.0.1.3"]);
        assert!(p.contains("127.0.1.3".parse().unwrap()));
        assert!(!p.contains("127.0.1.4".parse().unwrap()));
        assert_eq!(
            Ipv4Pool::parse("10.0.0.7/32").unwrap().addresses().count(),
            1
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.1/30",
            "10.0.0.0/8",
            "x/24",
            "10.0.0.0/33",
            "10.0.0.0/x",
        ] {
            let e = Ipv4Pool::parse(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
