//! The control plane's wall clock for auth decisions (token expiry, device-code expiry and
//! polling intervals). It is the system clock plus an offset that only tests move, so a test can
//! make a device code or a token expire without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_types::UnixMillis;

/// Cheap to clone; clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// Now, in Unix milliseconds.
    pub fn now_millis(&self) -> UnixMillis {
        kiln_types::now_millis() + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Moves this clock (and every clone) forward by `by`. For tests.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX / 2);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}
