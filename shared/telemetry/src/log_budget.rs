//! A budget for repeated warnings: one log line per interval, the rest counted.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets a repeated warning through at most once per interval and counts what it held back
/// meanwhile. A failure that can repeat on a hot path (a full datapath map fails every
/// answer's write) then costs a counter, not a blocking write to the log per occurrence; the
/// metrics still count every one. Meant as a `static` beside the warning it guards.
#[derive(Debug)]
pub struct LogBudget {
    interval_ms: u64,
    /// When the next line may go out, in ms since the process's first budget check (0: now).
    next_ms: AtomicU64,
    held_back: AtomicU64,
}

impl LogBudget {
    /// The interval of Warden's hot-path warnings: often enough to see a problem go on, rare
    /// enough to cost nothing.
    pub const INTERVAL: Duration = Duration::from_secs(10);

    pub const fn new(interval: Duration) -> LogBudget {
        LogBudget {
            interval_ms: interval.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last line)` if this occurrence is to be logged.
    pub fn allow(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        let elapsed = START.get_or_init(Instant::now).elapsed();
        self.allow_at(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
    }

    fn allow_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        let granted = now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(self.interval_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if granted {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_a_count_of_the_rest() {
        let budget = LogBudget::new(Duration::from_secs(10));
        assert_eq!(budget.allow_at(5), Some(0), "the first goes out");
        for now in 6..1_000 {
            assert_eq!(budget.allow_at(now), None);
        }
        assert_eq!(budget.allow_at(10_004), None, "not before the interval");
        assert_eq!(budget.allow_at(10_005), Some(995), "held back in between");
        assert_eq!(budget.allow_at(10_006), None);
        assert_eq!(budget.allow_at(60_000), Some(1));
    }

    #[test]
    fn racing_threads_let_one_line_through() {
        let budget = LogBudget::new(Duration::from_secs(10));
        let granted: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| (0..1_000).filter(|_| budget.allow_at(1).is_some()).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(granted, 1);
        assert_eq!(budget.allow_at(20_000), Some(3_999));
    }
}
