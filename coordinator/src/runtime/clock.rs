//! The runtime's clock: the only place that reads time. The safety core gets `now_ms` passed in.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// Wall-clock unix milliseconds plus an adjustable offset (tests move time forward to expire
/// tokens without waiting).
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    pub fn system() -> Self {
        Clock::default()
    }

    /// A clock `offset_ms` ahead of (or behind) the system clock.
    pub fn offset(offset_ms: i64) -> Self {
        Clock {
            offset_ms: Arc::new(AtomicI64::new(offset_ms)),
        }
    }

    pub fn now_ms(&self) -> u64 {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        (wall + self.offset_ms.load(Ordering::Relaxed)).max(0) as u64
    }

    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}
