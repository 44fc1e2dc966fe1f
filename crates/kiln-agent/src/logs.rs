//! Log shipping: instance log lines go to the control plane in batches.
//!
//! Lines wait in a bounded queue ([`QUEUE`]); while the control plane is unreachable the batch in
//! hand is retried with backoff and new lines beyond the queue's size are dropped and counted, so
//! an unreachable control plane or a chatty app can never exhaust the agent's memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use kiln_api::{Client, LogRecord};
use kiln_types::HostId;

/// Lines buffered between the instances and the shipper.
pub(crate) const QUEUE: usize = 20_000;
/// Lines per request.
const BATCH: usize = 500;

static DROPPED: AtomicU64 = AtomicU64::new(0);

pub(crate) fn count_dropped(n: u64) {
    DROPPED.fetch_add(n, Ordering::Relaxed);
}

/// Ships lines from `rx` until the channel closes.
pub(crate) async fn ship(client: Client, host: HostId, mut rx: mpsc::Receiver<LogRecord>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        let mut delay = Duration::from_millis(100);
        loop {
            match client.ship_logs(&host, &batch).await {
                Ok(()) => break,
                Err(e) if e.is_unreachable() => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::warn!(lines = batch.len(), error = %crate::error_chain(&e), "log batch rejected; dropping it");
                    count_dropped(batch.len() as u64);
                    break;
                }
            }
        }
        batch.clear();
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(dropped, "log lines dropped (queue full or batch rejected)");
        }
    }
}
