//! Per-client-address connection limits.
//!
//! One client must not be able to take every file descriptor of an edge. Connections are counted
//! per IPv4 address and per IPv6 /64 (an IPv6 client usually owns a whole /64, so counting single
//! addresses would let it walk around the limit). IPv4-mapped IPv6 addresses, as seen on a
//! dual-stack socket, count as the IPv4 address they carry.
//!
//! The counts live in a few mutex-protected shards so that accepts on different threads rarely
//! meet on one lock; an entry is removed when its count returns to zero, so the table holds only
//! clients with open connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

const SHARDS: usize = 16;

/// The unit a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(u32),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
}

impl ClientKey {
    fn of(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => ClientKey::V6((u128::from(v6) >> 64) as u64),
        }
    }

    fn shard(self) -> usize {
        let h = match self {
            ClientKey::V4(a) => u64::from(a),
            ClientKey::V6(p) => p ^ (p >> 32),
        };
        (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) as usize % SHARDS
    }
}

/// Counts connections per client and refuses those over the limit.
pub(crate) struct IpLimits {
    max: u32,
    shards: Vec<Mutex<HashMap<ClientKey, u32>>>,
}

/// One counted connection; the count drops with the guard.
pub(crate) struct IpGuard {
    limits: Arc<IpLimits>,
    key: ClientKey,
}

impl IpLimits {
    /// `max` connections per client; 0 means no limit.
    pub(crate) fn new(max: u32) -> Arc<IpLimits> {
        Arc::new(IpLimits {
            max,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    /// Counts a new connection from `ip`, or returns `None` if that client is at the limit.
    /// Without a limit nothing is counted and the guard is free.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Option<IpGuard>> {
        if self.max == 0 {
            return Some(None);
        }
        let key = ClientKey::of(ip);
        let shard = self.shards.get(key.shard())?;
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Some(IpGuard {
            limits: self.clone(),
            key,
        }))
    }

    #[cfg(test)]
    fn count(&self, ip: IpAddr) -> u32 {
        let key = ClientKey::of(ip);
        self.shards[key.shard()]
            .lock()
            .unwrap()
            .get(&key)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        if let Some(shard) = self.limits.shards.get(self.key.shard()) {
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = map.get_mut(&self.key) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    map.remove(&self.key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_per_ipv4_address_and_release() {
        let l = IpLimits::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let g1 = l.acquire(a).unwrap();
        let _g2 = l.acquire(a).unwrap();
        assert!(l.acquire(a).is_none());
        assert!(l.acquire(b).is_some());
        drop(g1);
        assert_eq!(l.count(a), 1);
        assert!(l.acquire(a).is_some());
    }

    #[test]
    fn ipv6_counts_per_slash_64_and_mapped_v4_as_v4() {
        let l = IpLimits::new(1);
        let _g = l.acquire("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(l.acquire("2001:db8:1:2::ffff".parse().unwrap()).is_none());
        assert!(l.acquire("2001:db8:1:3::1".parse().unwrap()).is_some());
        let _v4 = l.acquire("198.51.100.7".parse().unwrap()).unwrap();
        assert!(l.acquire("::ffff:198.51.100.7".parse().unwrap()).is_none());
    }

    #[test]
    fn no_limit_counts_nothing() {
        let l = IpLimits::new(0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let guards: Vec<_> = (0..1000).map(|_| l.acquire(ip).unwrap()).collect();
        assert!(guards.iter().all(Option::is_none));
    }
}
