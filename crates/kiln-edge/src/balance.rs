//! Backends and the choice of one for a new connection.
//!
//! A [`Backend`] is one instance address as this edge sees it: how many connections it carries
//! now, whether the edge's own health checks consider it up, and whether a recent connect failure
//! has ejected it for a while. Backends are shared by address across routes and route tables
//! (see `Edge::set_routes`), so a new table does not reset their counts or health, and a live
//! connection keeps its backend counted until it ends.
//!
//! # The choice ([`pick`])
//! 1. **Power of two choices, least connections.** Two distinct backends are drawn at random and
//!    the one with fewer connections wins. This spreads load almost as well as a full
//!    least-connections scan but costs O(1) and needs no lock, and it avoids the herd that a strict
//!    "least loaded" choice sends to a new, empty backend from many edges at once.
//! 2. **Soft limit.** A backend at or above its service's soft limit loses against any backend
//!    below it. If the winner of the draw is above the soft limit, every backend is scanned for one
//!    below it; only when none is does a backend above the soft limit take the connection.
//! 3. **Hard limit.** A backend never takes more than the hard limit. The slot is reserved with a
//!    compare-and-swap, so concurrent connections cannot overshoot it. When every candidate is
//!    full, the answer is [`PickError::Full`] and the connection is refused.
//! 4. **Health.** Backends that are down (active checks) or ejected (passive) are skipped. If no
//!    backend of the service is usable at all, they are all tried anyway ("panic mode"): the
//!    control plane still reports them healthy, and a wrong verdict of this edge's checks should
//!    not black-hole a service that may be reachable.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_api::Concurrency;

/// One instance address, with what this edge knows about it.
#[derive(Debug)]
pub(crate) struct Backend {
    pub(crate) addr: SocketAddr,
    /// Connections currently counted against this backend (including ones still connecting).
    active: AtomicU32,
    /// Verdict of the active health checks.
    up: AtomicBool,
    /// Passive ejection: unusable until this time (milliseconds on the edge's clock).
    ejected_until_ms: AtomicU64,
    /// Connect failures in a row; the ejection doubles with each.
    connect_failures: AtomicU32,
    /// Active check results in a row (only the health checker writes these).
    pub(crate) check_passes: AtomicU32,
    pub(crate) check_fails: AtomicU32,
}

impl Backend {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Backend {
            addr,
            active: AtomicU32::new(0),
            // New backends come from the control plane's healthy set: trust it until our own
            // checks say otherwise.
            up: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            connect_failures: AtomicU32::new(0),
            check_passes: AtomicU32::new(0),
            check_fails: AtomicU32::new(0),
        }
    }

    pub(crate) fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub(crate) fn set_up(&self, up: bool) -> bool {
        self.up.swap(up, Ordering::Relaxed) != up
    }

    pub(crate) fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    fn usable(&self, now_ms: u64) -> bool {
        self.is_up() && !self.is_ejected(now_ms)
    }

    /// Records a failed connect: ejects the backend for `base` doubled per failure in a row, at
    /// most `max`.
    pub(crate) fn connect_failed(&self, now_ms: u64, base: Duration, max: Duration) {
        let n = self
            .connect_failures
            .fetch_add(1, Ordering::Relaxed)
            .min(16);
        let eject = base.saturating_mul(1u32 << n).min(max);
        let until = now_ms.saturating_add(u64::try_from(eject.as_millis()).unwrap_or(u64::MAX));
        self.ejected_until_ms.fetch_max(until, Ordering::Relaxed);
    }

    pub(crate) fn connect_succeeded(&self) {
        if self.connect_failures.load(Ordering::Relaxed) != 0 {
            self.connect_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Reserves a connection slot unless the backend is at `hard`.
    fn try_acquire(self: &Arc<Self>, hard: u32) -> Option<BackendGuard> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |a| {
                (a < hard).then_some(a + 1)
            })
            .ok()
            .map(|_| BackendGuard {
                backend: self.clone(),
            })
    }
}

/// A connection counted against a backend; the count drops when the guard does.
#[derive(Debug)]
pub(crate) struct BackendGuard {
    pub(crate) backend: Arc<Backend>,
}

impl Drop for BackendGuard {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why no backend was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PickError {
    /// No backend is left to try (none at all, or all already tried for this connection).
    NoBackend,
    /// Every candidate is at the service's hard limit.
    Full,
}

/// The comparison key of a candidate: below the soft limit first, then fewer connections.
fn key(b: &Arc<Backend>, soft: u32) -> (bool, u32) {
    let a = b.active();
    (a >= soft, a)
}

/// Picks a backend for a new connection and reserves its slot. `tried` are indexes already tried
/// (and failed) for this connection; `now_ms` is the edge's clock.
pub(crate) fn pick(
    backends: &[Arc<Backend>],
    limits: Option<Concurrency>,
    tried: &[usize],
    now_ms: u64,
) -> Result<BackendGuard, PickError> {
    let (soft, hard) = match limits {
        Some(c) => (c.soft_limit.min(c.hard_limit), c.hard_limit),
        None => (u32::MAX, u32::MAX),
    };
    let n = backends.len();
    if n == 0 {
        return Err(PickError::NoBackend);
    }
    let eligible = |i: usize, b: &Arc<Backend>, health: bool| {
        !tried.contains(&i) && (!health || b.usable(now_ms)) && b.active() < hard
    };

    // Step 1: two random choices.
    let i = random_below(n);
    let j = if n > 1 {
        (i + 1 + random_below(n - 1)) % n
    } else {
        i
    };
    let mut winner = None;
    for idx in [i, j] {
        let Some(b) = backends.get(idx) else { continue };
        if !eligible(idx, b, true) {
            continue;
        }
        winner = match winner {
            Some(w) if key(&backends[w], soft) <= key(b, soft) => Some(w),
            _ => Some(idx),
        };
    }
    if let Some(w) = winner {
        let b = &backends[w];
        if b.active() < soft {
            if let Some(g) = b.try_acquire(hard) {
                return Ok(g);
            }
        }
    }

    // Steps 2-4: scan (winner above the soft limit, or neither draw usable), then panic mode.
    for health in [true, false] {
        let mut any_candidate = false;
        // Two passes at most: a slot taken by a concurrent connection between the scan and the
        // reservation sends us round once more.
        for _ in 0..2 {
            let best = backends
                .iter()
                .enumerate()
                .filter(|(i, b)| !tried.contains(i) && (!health || b.usable(now_ms)))
                .inspect(|_| any_candidate = true)
                .filter(|(i, b)| eligible(*i, b, health))
                .min_by_key(|(_, b)| key(b, soft));
            match best {
                Some((_, b)) => {
                    if let Some(g) = b.try_acquire(hard) {
                        return Ok(g);
                    }
                }
                None => break,
            }
        }
        if any_candidate {
            // Usable backends exist but are full: do not fall back to unhealthy ones.
            return Err(PickError::Full);
        }
    }
    Err(PickError::NoBackend)
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    // xorshift must not start at zero.
    u64::from_le_bytes(b) | 1
}

/// A uniform-enough number in `0..n` (n > 0) from a per-thread xorshift64*: balancing needs speed,
/// not unpredictability.
fn random_below(n: usize) -> usize {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        // Multiply-shift maps 64 random bits onto 0..n without a division.
        ((u128::from(r) * n as u128) >> 64) as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<Arc<Backend>> {
        (0..n)
            .map(|i| {
                Arc::new(Backend::new(SocketAddr::from((
                    [127, 0, 0, 1],
                    1000 + i as u16,
                ))))
            })
            .collect()
    }

    #[test]
    fn least_connections_wins_among_two() {
        let b = backends(2);
        let _held: Vec<_> = (0..5)
            .map(|_| b[0].try_acquire(u32::MAX).unwrap())
            .collect();
        for _ in 0..100 {
            let g = pick(&b, None, &[], 0).unwrap();
            assert_eq!(g.backend.addr, b[1].addr);
        }
    }

    #[test]
    fn spreads_evenly_when_connections_stay_open() {
        let b = backends(4);
        let held: Vec<_> = (0..400).map(|_| pick(&b, None, &[], 0).unwrap()).collect();
        for be in &b {
            // P2C least-connections keeps the spread within a few connections.
            assert!((95..=105).contains(&be.active()), "{}", be.active());
        }
        drop(held);
        assert!(b.iter().all(|be| be.active() == 0));
    }

    #[test]
    fn hard_limit_is_never_exceeded_and_then_full() {
        let b = backends(3);
        let limits = Some(Concurrency {
            soft_limit: 1,
            hard_limit: 2,
        });
        let held: Vec<_> = (0..6).map(|_| pick(&b, limits, &[], 0).unwrap()).collect();
        assert!(b.iter().all(|be| be.active() == 2));
        assert_eq!(pick(&b, limits, &[], 0).unwrap_err(), PickError::Full);
        drop(held);
    }

    #[test]
    fn soft_limit_prefers_any_backend_below_it() {
        let b = backends(10);
        let limits = Some(Concurrency {
            soft_limit: 1,
            hard_limit: 100,
        });
        // Nine backends at the soft limit: the tenth must get the next connection every time,
        // even though the random draw rarely includes it.
        let _held: Vec<_> = (0..9)
            .map(|i| b[i].try_acquire(u32::MAX).unwrap())
            .collect();
        let g = pick(&b, limits, &[], 0).unwrap();
        assert_eq!(g.backend.addr, b[9].addr);
    }

    #[test]
    fn down_and_ejected_backends_are_skipped_unless_all_are() {
        let b = backends(3);
        b[0].set_up(false);
        b[1].connect_failed(1_000, Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..50 {
            assert_eq!(pick(&b, None, &[], 1_500).unwrap().backend.addr, b[2].addr);
        }
        // After the ejection expires, backend 1 is back.
        let seen: std::collections::HashSet<_> = (0..200)
            .map(|_| pick(&b, None, &[], 2_001).unwrap().backend.addr)
            .collect();
        assert!(seen.contains(&b[1].addr));
        assert!(!seen.contains(&b[0].addr));
        // All unusable: panic mode still tries them.
        b[1].set_up(false);
        b[2].set_up(false);
        assert!(pick(&b, None, &[], 0).is_ok());
    }

    #[test]
    fn tried_backends_are_not_picked_again() {
        let b = backends(3);
        for _ in 0..50 {
            let g = pick(&b, None, &[0, 2], 0).unwrap();
            assert_eq!(g.backend.addr, b[1].addr);
        }
        assert_eq!(
            pick(&b, None, &[0, 1, 2], 0).unwrap_err(),
            PickError::NoBackend
        );
    }

    #[test]
    fn ejection_doubles_up_to_the_cap() {
        let b = Backend::new("127.0.0.1:1".parse().unwrap());
        let base = Duration::from_millis(100);
        let max = Duration::from_millis(1_000);
        b.connect_failed(0, base, max);
        assert!(b.is_ejected(99) && !b.is_ejected(100));
        b.connect_failed(0, base, max);
        assert!(b.is_ejected(199) && !b.is_ejected(200));
        for _ in 0..10 {
            b.connect_failed(0, base, max);
        }
        assert!(b.is_ejected(999) && !b.is_ejected(1_000));
        b.connect_succeeded();
        b.connect_failed(5_000, base, max);
        assert!(!b.is_ejected(5_100));
    }
}
