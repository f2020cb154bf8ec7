//! Rate limit for log lines about guest misbehaviour: a guest that sends bad requests in a
//! loop must not flood the host's log or slow the reactor down.

use std::time::{Duration, Instant};

/// Log lines per second one queue may emit about bad guest input.
const LOG_LINES_PER_SEC: u32 = 10;

/// Limits how often a queue logs about guest misbehaviour.
#[derive(Debug)]
pub struct LogLimiter {
    window: Instant,
    lines: u32,
    dropped: u64,
}

impl LogLimiter {
    pub fn new() -> Self {
        LogLimiter {
            window: Instant::now(),
            lines: 0,
            dropped: 0,
        }
    }

    /// True when a line may be logged now. At the start of a new one-second window, the
    /// lines suppressed in the previous one are counted in one line naming `who`.
    pub fn allow(&mut self, now: Instant, who: &str) -> bool {
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            if self.dropped > 0 {
                log::warn!(
                    "{who}: {} more messages about bad requests suppressed",
                    self.dropped
                );
            }
            self.window = now;
            self.lines = 0;
            self.dropped = 0;
        }
        if self.lines < LOG_LINES_PER_SEC {
            self.lines += 1;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_log_limiter_over_rate_suppresses_until_next_second() {
        let mut l = LogLimiter::new();
        let t0 = l.window;
        let allowed = (0..3 * LOG_LINES_PER_SEC)
            .filter(|_| l.allow(t0, "q"))
            .count();
        assert_eq!(allowed, LOG_LINES_PER_SEC as usize);
        assert_eq!(l.dropped, u64::from(2 * LOG_LINES_PER_SEC));
        assert!(l.allow(t0 + Duration::from_secs(1), "q"));
        assert_eq!(l.dropped, 0);
    }
}
