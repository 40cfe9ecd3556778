//! Rate-limited logging for errors a guest or a peer can trigger at will.
//!
//! Each call site owns a [`RateLimit`]; at most `burst` messages per second pass, and the first
//! message after a quiet spell reports how many were suppressed. A guest cannot flood the log, and
//! the check costs one relaxed atomic load on the fast path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

fn now_secs() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// A per-call-site limit of `burst` messages per second.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    /// Seconds since start (high 40 bits) and messages in that second (low 24 bits).
    state: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A limit of `burst` messages per second.
    pub const fn new(burst: u32) -> Self {
        RateLimit {
            burst,
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a message may be logged now; if so, also how many were suppressed since the last
    /// one that passed.
    pub fn check(&self) -> Option<u64> {
        let now = now_secs() + 1; // 0 means "never logged"
                                  // Relaxed throughout: this only decides whether to print, it orders no other memory.
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (secs, count) = (cur >> 24, cur & 0xff_ffff);
            let next = if secs == now {
                if count >= self.burst as u64 {
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                cur + 1
            } else {
                (now << 24) | 1
            };
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(c) => cur = c,
            }
        }
    }
}

/// Logs at `level` through `log`, at most 10 messages per second from this call site.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new(10);
        $crate::log_limited_by!(&LIMIT, $level, $($arg)+)
    }};
}

/// Logs at `level` through `log` within the budget of the [`RateLimit`] `limit` (one per disk,
/// say, so one busy disk cannot silence another's events).
#[macro_export]
macro_rules! log_limited_by {
    ($limit:expr, $level:expr, $($arg:tt)+) => {{
        let limit: &$crate::ratelimit::RateLimit = $limit;
        if log::log_enabled!($level) {
            if let Some(suppressed) = limit.check() {
                if suppressed > 0 {
                    log::log!($level, "{} (and {} similar messages suppressed)", format_args!($($arg)+), suppressed);
                } else {
                    log::log!($level, $($arg)+);
                }
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_a_burst_and_counts_the_rest() {
        let l = RateLimit::new(3);
        let passed = (0..100).filter(|_| l.check().is_some()).count();
        // All 100 calls may straddle a second boundary, in which case up to 6 pass.
        assert!((3..=6).contains(&passed), "{passed}");
    }
}
