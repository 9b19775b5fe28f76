//! The runtime's clock: the only place that reads time. The safety core gets `now_ms` passed in.
//!
//! Tests move time without waiting: `TOLLGATE_CLOCK_OFFSET_MS` sets a fixed offset at start, and
//! `TOLLGATE_CLOCK_OFFSET_FILE` names a file whose integer content (milliseconds, may be negative)
//! is added on every reading, so a test can expire a token while the coordinator runs. Both
//! exist only in debug builds (what `cargo test` runs): a release `tollgate serve` ignores them
//! and says so, so no file on disk can move a production coordinator's token expiry.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
    offset_file: Option<Arc<PathBuf>>,
}

impl Clock {
    pub fn system() -> Self {
        Clock::default()
    }

    /// A clock `offset_ms` ahead of (or behind) the system clock.
    pub fn offset(offset_ms: i64) -> Self {
        Clock {
            offset_ms: Arc::new(AtomicI64::new(offset_ms)),
            offset_file: None,
        }
    }

    /// The system clock, adjusted by the test variables described in the module docs (debug
    /// builds only).
    #[cfg(not(debug_assertions))]
    pub fn from_env() -> Self {
        for var in ["TOLLGATE_CLOCK_OFFSET_MS", "TOLLGATE_CLOCK_OFFSET_FILE"] {
            if std::env::var_os(var).is_some() {
                tracing::warn!(
                    var,
                    "ignored: clock offsets are a test hook of debug builds"
                );
            }
        }
        Clock::system()
    }

    /// The system clock, adjusted by the test variables described in the module docs (debug
    /// builds only).
    #[cfg(debug_assertions)]
    pub fn from_env() -> Self {
        let fixed = std::env::var("TOLLGATE_CLOCK_OFFSET_MS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let file =
            std::env::var_os("TOLLGATE_CLOCK_OFFSET_FILE").map(|p| Arc::new(PathBuf::from(p)));
        Clock {
            offset_ms: Arc::new(AtomicI64::new(fixed)),
            offset_file: file,
        }
    }

    fn file_offset(&self) -> i64 {
        self.offset_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p.as_path()).ok())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn now_ms(&self) -> u64 {
        // The one wall-clock read of the coordinator (coordinator/clippy.toml bans the rest).
        #[allow(clippy::disallowed_methods)]
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        (wall + self.offset_ms.load(Ordering::Relaxed) + self.file_offset()).max(0) as u64
    }

    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_move_the_clock() {
        let base = Clock::system().now_ms();
        let c = Clock::offset(3_600_000);
        assert!(c.now_ms() >= base + 3_600_000);
        c.advance(-3_600_000);
        assert!(c.now_ms() < base + 60_000);
    }
}
