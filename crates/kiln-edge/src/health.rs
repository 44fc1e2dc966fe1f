//! Active TCP health checks from the edge.
//!
//! The control plane routes only to instances their host reports healthy, but a host can see an
//! instance that this edge cannot reach (a broken mesh link, a full conntrack table on the way).
//! So every edge checks every backend of its table itself: each `interval`, a TCP connect with a
//! `timeout`, all backends in parallel. `fall` failures in a row take a backend out of rotation,
//! `rise` successes in a row bring it back (HAProxy's `inter`/`rise`/`fall`, same defaults). The
//! verdict lives on the shared [`Backend`], so it survives route table updates.
//!
//! Passive ejection (a failed connect on the data path, see `balance`) is separate and faster: it
//! acts on the very next connection, while active checks also notice backends nobody is using.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::balance::Backend;
use crate::Edge;

/// Settings of the active checks.
#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    /// Time between two rounds of checks; zero disables active checks.
    pub interval: Duration,
    /// How long a check's connect may take.
    pub timeout: Duration,
    /// Passing checks in a row that bring a down backend back.
    pub rise: u32,
    /// Failing checks in a row that take an up backend out.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

/// Checks the backends of the current table forever.
pub(crate) async fn run(edge: Arc<Edge>) {
    let cfg = edge.config.health;
    if cfg.interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let backends: Vec<Arc<Backend>> = edge.table().backends.values().cloned().collect();
        let mut round = tokio::task::JoinSet::new();
        for b in backends {
            let edge = edge.clone();
            round.spawn(async move {
                let ok = matches!(
                    tokio::time::timeout(cfg.timeout, TcpStream::connect(b.addr)).await,
                    Ok(Ok(_))
                );
                record(&edge, &b, ok, cfg);
            });
        }
        while round.join_next().await.is_some() {}
    }
}

fn record(edge: &Edge, b: &Backend, ok: bool, cfg: HealthConfig) {
    if ok {
        edge.metrics
            .health_checks_passed
            .fetch_add(1, Ordering::Relaxed);
        b.check_fails.store(0, Ordering::Relaxed);
        let passes = b.check_passes.fetch_add(1, Ordering::Relaxed) + 1;
        if !b.is_up() && passes >= cfg.rise && b.set_up(true) {
            tracing::info!(backend = %b.addr, passes, "backend up");
        }
    } else {
        edge.metrics
            .health_checks_failed
            .fetch_add(1, Ordering::Relaxed);
        b.check_passes.store(0, Ordering::Relaxed);
        let fails = b.check_fails.fetch_add(1, Ordering::Relaxed) + 1;
        if b.is_up() && fails >= cfg.fall && b.set_up(false) && edge.log_limiter.allow() {
            tracing::warn!(backend = %b.addr, fails, "backend down");
        }
    }
}
