//! What a watcher is told while a round runs (every [`PROGRESS_EVERY`]): how far the
//! round is, at what rate, and when the migration should end. Pure; the source feeds it
//! its counters.

use ferry_memory::PAGE_SIZE;
use std::time::Duration;

/// How often the status is refreshed while a round runs.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The round in progress, as counted so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundProgress {
    /// Pages the round has to send.
    pub round_pages: u64,
    /// Pages it has sent so far.
    pub done_pages: u64,
    /// Seconds since the round started.
    pub round_secs: f64,
    /// The guest's write rate as last measured (pages per second; 0 unknown).
    pub dirty_pages_per_sec: f64,
    /// The pause expected at the end, ms.
    pub expected_downtime_ms: f64,
}

/// Rounds whose ratio of writes to moved pages reaches this do not shrink fast enough for
/// a forecast (the stall policy decides how they end).
const NO_FORECAST_RATIO: f64 = 0.9;

impl RoundProgress {
    /// Guest bytes per second the round has moved so far; 0 until it moved any.
    pub fn page_rate(&self) -> f64 {
        if self.round_secs <= 0.0 {
            return 0.0;
        }
        self.done_pages as f64 * PAGE_SIZE as f64 / self.round_secs
    }

    /// Time to the migration's end, ms: the rest of this round at its rate, then the
    /// rounds that send what the guest writes meanwhile (a geometric series whose ratio
    /// is write rate over page rate), then the pause. `None` while nothing has moved, or
    /// when the guest writes about as fast as pages move (no end by pre-copy alone).
    pub fn eta_ms(&self) -> Option<u64> {
        let rate = self.page_rate();
        if rate <= 0.0 {
            return None;
        }
        let remaining = self.round_pages.saturating_sub(self.done_pages) as f64 * PAGE_SIZE as f64;
        let rest_of_round = remaining / rate;
        let r = self.dirty_pages_per_sec * PAGE_SIZE as f64 / rate;
        if r >= NO_FORECAST_RATIO {
            return None;
        }
        // The next round carries what is written during the whole of this one.
        let this_round = self.round_secs + rest_of_round;
        let later = this_round * r / (1.0 - r);
        // The series ends with the round that fits in the pause, and that round and the
        // (vanishing) ones after it are sent inside the pause, which is counted once:
        // take their share (at most pause / (1 - r)) off the rounds before it.
        let pause = self.expected_downtime_ms.max(0.0) / 1000.0;
        let before_pause = (later - pause / (1.0 - r)).max(0.0);
        Some(((rest_of_round + before_pause + pause) * 1000.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB_PAGES: u64 = (1 << 20) / PAGE_SIZE as u64;

    fn half_done() -> RoundProgress {
        // 200 MiB round, 100 MiB sent in 1 s: 100 MiB/s.
        RoundProgress {
            round_pages: 200 * MIB_PAGES,
            done_pages: 100 * MIB_PAGES,
            round_secs: 1.0,
            dirty_pages_per_sec: 0.0,
            expected_downtime_ms: 40.0,
        }
    }

    #[test]
    fn rate_and_eta_of_a_round_with_no_writes() {
        let p = half_done();
        assert!((p.page_rate() - 100.0 * (1 << 20) as f64).abs() < 1.0);
        // 1 s more for the round, nothing written, then the pause.
        assert_eq!(p.eta_ms(), Some(1040));
    }

    #[test]
    fn writes_add_the_rounds_that_follow() {
        // 25 MiB/s written against 100 MiB/s moved: r = 1/4; the round lasts 2 s, the
        // rounds after it 2 s x (1/4) / (3/4) = 0.667 s, less the tail sent inside the
        // 40 ms pause (0.04 / (3/4) = 0.053 s): 1 + 0.613 + 0.04 s.
        let p = RoundProgress {
            dirty_pages_per_sec: 25.0 * MIB_PAGES as f64,
            ..half_done()
        };
        let eta = p.eta_ms().expect("a forecast");
        assert!((1652..=1655).contains(&eta), "{eta}");
    }

    #[test]
    fn no_forecast_before_anything_moved_or_without_convergence() {
        let p = RoundProgress {
            done_pages: 0,
            ..half_done()
        };
        assert_eq!(p.page_rate(), 0.0);
        assert_eq!(p.eta_ms(), None);
        let p = RoundProgress {
            dirty_pages_per_sec: 95.0 * MIB_PAGES as f64,
            ..half_done()
        };
        assert_eq!(p.eta_ms(), None);
        let p = RoundProgress {
            round_secs: 0.0,
            ..half_done()
        };
        assert_eq!(p.eta_ms(), None);
    }

    #[test]
    fn a_next_round_that_fits_in_the_pause_is_not_counted_twice() {
        // 4 MiB/s written against 100 MiB/s (r = 0.04): the next round (2 s x 4 MiB/s =
        // 8 MiB, 80 ms at the round's rate) is longer than the 40 ms pause, but its own
        // successor fits. The series, 2 x 0.04 / 0.96 = 83.3 ms, less the tail sent in the
        // pause, 40 / 0.96 = 41.7 ms: 1 s + 41.7 ms + the 40 ms pause.
        let p = RoundProgress {
            dirty_pages_per_sec: 4.0 * MIB_PAGES as f64,
            ..half_done()
        };
        let eta = p.eta_ms().expect("a forecast");
        assert!((1080..=1082).contains(&eta), "{eta}");
        // Writes so slow that the next round fits in the pause: the round, then the pause.
        let p = RoundProgress {
            dirty_pages_per_sec: 0.5 * MIB_PAGES as f64,
            ..half_done()
        };
        assert_eq!(p.eta_ms(), Some(1040));
    }

    #[test]
    fn a_round_sent_whole_leaves_the_later_rounds_and_the_pause() {
        let p = RoundProgress {
            done_pages: 200 * MIB_PAGES,
            round_secs: 2.0,
            dirty_pages_per_sec: 0.0,
            ..half_done()
        };
        assert_eq!(p.eta_ms(), Some(40));
    }
}
