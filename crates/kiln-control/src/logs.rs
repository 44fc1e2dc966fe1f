//! The log store: recent instance log lines per app, and live followers.
//!
//! Agents ship lines in batches (`POST /v1/hosts/{host}/logs`); the store keeps the last
//! [`PER_APP`] lines of each app in memory and fans new lines out to followers through a bounded
//! broadcast channel. A follower that falls more than [`FOLLOW_BUFFER`] lines behind skips ahead
//! (and is told how many lines it missed) instead of holding memory for it. Retention is this
//! in-memory window: lines do not survive a control-plane restart (docs/specs/observability/logging.md).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use kiln_api::LogRecord;
use kiln_types::AppId;

/// Lines kept per app.
pub const PER_APP: usize = 10_000;
/// Lines a follower may lag behind before it skips.
pub const FOLLOW_BUFFER: usize = 4_096;

pub(crate) struct LogStore {
    apps: Mutex<HashMap<AppId, VecDeque<Arc<LogRecord>>>>,
    live: broadcast::Sender<Arc<LogRecord>>,
}

impl LogStore {
    pub fn new() -> Self {
        Self {
            apps: Mutex::new(HashMap::new()),
            live: broadcast::channel(FOLLOW_BUFFER).0,
        }
    }

    pub fn push(&self, records: Vec<LogRecord>) {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        for r in records {
            let r = Arc::new(r);
            let ring = apps.entry(r.app_id.clone()).or_default();
            if ring.len() == PER_APP {
                ring.pop_front();
            }
            ring.push_back(r.clone());
            // No follower is not an error.
            let _ = self.live.send(r);
        }
    }

    /// The last `n` lines of `app` matching `filter`, oldest first, and a receiver of new lines
    /// subscribed before the snapshot was taken (so nothing falls between them).
    pub fn tail(
        &self,
        app: &AppId,
        n: usize,
        filter: impl Fn(&LogRecord) -> bool,
    ) -> (Vec<Arc<LogRecord>>, broadcast::Receiver<Arc<LogRecord>>) {
        let apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.live.subscribe();
        let past = apps
            .get(app)
            .map(|ring| {
                let matching: Vec<_> = ring.iter().filter(|r| filter(r)).cloned().collect();
                let skip = matching.len().saturating_sub(n);
                matching.into_iter().skip(skip).collect()
            })
            .unwrap_or_default();
        (past, rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_types::frame::Output;
    use kiln_types::InstanceId;

    fn rec(app: &AppId, i: usize) -> LogRecord {
        LogRecord {
            instance_id: InstanceId::generate(),
            app_id: app.clone(),
            ts_ms: i as i64,
            output: Output::Stdout,
            message: format!("line {i}"),
        }
    }

    #[test]
    fn keeps_a_bounded_window_per_app_and_tails_it() {
        let store = LogStore::new();
        let (a, b) = (AppId::generate(), AppId::generate());
        store.push((0..PER_APP + 5).map(|i| rec(&a, i)).collect());
        store.push(vec![rec(&b, 0)]);
        let (past, _) = store.tail(&a, 3, |_| true);
        let msgs: Vec<_> = past.iter().map(|r| r.message.as_str()).collect();
        let last = PER_APP + 4;
        assert_eq!(
            msgs,
            vec![
                format!("line {}", last - 2),
                format!("line {}", last - 1),
                format!("line {last}")
            ]
        );
        assert_eq!(store.apps.lock().unwrap()[&a].len(), PER_APP);
        let (past_b, _) = store.tail(&b, 100, |_| true);
        assert_eq!(past_b.len(), 1);
    }

    #[tokio::test]
    async fn followers_see_new_lines() {
        let store = LogStore::new();
        let a = AppId::generate();
        let (_, mut rx) = store.tail(&a, 10, |_| true);
        store.push(vec![rec(&a, 1)]);
        assert_eq!(rx.recv().await.unwrap().message, "line 1");
    }
}
