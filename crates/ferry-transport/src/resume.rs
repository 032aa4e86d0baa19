//! Careful resume: a connection to a peer this agent moved data to shortly before starts
//! with a congestion window from what that path carried, instead of slow start's ten
//! packets (after the IETF's "careful resume" draft, draft-ietf-tsvwg-careful-resume).
//!
//! On the testbed's wan (1 Gbit/s, 20 ms) slow start took ~250 ms to open the window to
//! the path's 2.5 MB, in which the link carried a few MB of the ~24 it could have
//! (benches/RESULTS.md). A migration between two agents is rarely the first on that path.
//! What is kept is the path's delivered rate and RTT; a new connection jumps to half of
//! the bandwidth-delay product they give ("jump to half the saved window", as the draft
//! does), paced by quinn over a round trip, and only when the new path looks like the
//! saved one: its handshake RTT within [`RTT_RANGE`] of the saved RTT and the record not
//! older than [`MAX_AGE`]. From there the congestion controller runs as usual: it grows
//! on, or backs off at the first loss the path's queue shows.
//!
//! The decisions are pure ([`resume_window`], [`rtt_matches`]); [`PathMemory`] is the
//! in-memory record per peer address (like the kernel's TCP metrics cache, not persisted:
//! an agent restart starts with slow start again).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A record older than this says nothing about the path now.
pub const MAX_AGE: Duration = Duration::from_secs(600);

/// The new handshake's RTT must lie within this factor of the saved RTT (both ways)...
pub const RTT_RANGE: f64 = 2.0;

/// ...or within this much of it: on a short path (lan, a fraction of a millisecond) the
/// handshake's own crypto and scheduling move the RTT by more than 2x.
pub const RTT_SLACK: Duration = Duration::from_millis(2);

/// The largest window a resumed connection starts with (a 1 Gbit/s path at 130 ms).
pub const MAX_JUMP: u64 = 8 << 20;

/// What one connection to a peer showed about the path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathRecord {
    /// Bytes per second the path delivered (a confirmed bulk transfer's rate).
    pub delivered_bytes_per_sec: f64,
    /// The path's round-trip time as the handshake measured it.
    pub rtt: Duration,
    /// When it was recorded.
    pub at: Instant,
}

/// The window a new connection starts with on a path recorded as `saved`, at `now`;
/// `None` for slow start (nothing saved, or saved too long ago). `floor` is the
/// controller's own initial window: resuming never starts below it.
pub fn resume_window(saved: Option<&PathRecord>, now: Instant, floor: u64) -> Option<u64> {
    let s = saved?;
    if now.saturating_duration_since(s.at) > MAX_AGE {
        return None;
    }
    let bdp = s.delivered_bytes_per_sec * s.rtt.as_secs_f64();
    if !bdp.is_finite() || bdp <= 0.0 {
        return None;
    }
    let jump = ((bdp / 2.0) as u64).min(MAX_JUMP);
    (jump > floor).then_some(jump)
}

/// Whether a new connection's handshake RTT says it runs on the path that was saved:
/// a path that got much shorter or longer (a reroute, another site behind the address)
/// starts with slow start instead.
pub fn rtt_matches(saved: Duration, now: Duration) -> bool {
    let (s, n) = (saved.as_secs_f64(), now.as_secs_f64());
    if s <= 0.0 || n <= 0.0 {
        return false;
    }
    (n - s).abs() <= RTT_SLACK.as_secs_f64() || (n <= s * RTT_RANGE && n >= s / RTT_RANGE)
}

/// The last [`PathRecord`] per peer address.
#[derive(Debug, Default)]
pub struct PathMemory {
    paths: Mutex<HashMap<SocketAddr, PathRecord>>,
}

impl PathMemory {
    /// The record for `peer`, if any.
    pub fn get(&self, peer: SocketAddr) -> Option<PathRecord> {
        self.paths.lock().ok()?.get(&peer).copied()
    }

    /// Replaces the record for `peer`.
    pub fn record(&self, peer: SocketAddr, r: PathRecord) {
        if let Ok(mut m) = self.paths.lock() {
            m.insert(peer, r);
        }
    }

    /// Forgets `peer` (its path did not look like the record).
    pub fn forget(&self, peer: SocketAddr) {
        if let Ok(mut m) = self.paths.lock() {
            m.remove(&peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: u64 = 14_720;

    fn wan(at: Instant) -> PathRecord {
        PathRecord {
            delivered_bytes_per_sec: 100e6,
            rtt: Duration::from_millis(20),
            at,
        }
    }

    #[test]
    fn nothing_saved_means_slow_start() {
        assert_eq!(resume_window(None, Instant::now(), FLOOR), None);
    }

    #[test]
    fn jumps_to_half_the_saved_bandwidth_delay_product() {
        let now = Instant::now();
        // 100 MB/s x 20 ms = 2 MB; half of it.
        assert_eq!(resume_window(Some(&wan(now)), now, FLOOR), Some(1_000_000));
    }

    #[test]
    fn an_old_record_is_not_used() {
        let at = Instant::now();
        let later = at + MAX_AGE + Duration::from_secs(1);
        assert_eq!(resume_window(Some(&wan(at)), later, FLOOR), None);
    }

    #[test]
    fn the_jump_is_capped() {
        let now = Instant::now();
        let fat = PathRecord {
            delivered_bytes_per_sec: 10e9,
            rtt: Duration::from_millis(200),
            at: now,
        };
        assert_eq!(resume_window(Some(&fat), now, FLOOR), Some(MAX_JUMP));
    }

    #[test]
    fn a_path_smaller_than_the_initial_window_keeps_the_initial_window() {
        let now = Instant::now();
        let lan = PathRecord {
            delivered_bytes_per_sec: 1e6,
            rtt: Duration::from_micros(100),
            at: now,
        };
        assert_eq!(resume_window(Some(&lan), now, FLOOR), None);
        let broken = PathRecord {
            delivered_bytes_per_sec: f64::NAN,
            ..lan
        };
        assert_eq!(resume_window(Some(&broken), now, FLOOR), None);
    }

    #[test]
    fn rtt_must_match_within_the_range() {
        let ms = Duration::from_millis;
        assert!(rtt_matches(ms(20), ms(21)));
        assert!(rtt_matches(ms(20), ms(39)));
        assert!(rtt_matches(ms(20), ms(11)));
        assert!(!rtt_matches(ms(20), ms(41)));
        assert!(!rtt_matches(ms(20), ms(9)));
        assert!(!rtt_matches(Duration::ZERO, ms(9)));
        // A short path: jitter beyond 2x but within the slack.
        let us = Duration::from_micros;
        assert!(rtt_matches(us(150), us(900)));
        assert!(!rtt_matches(us(150), ms(5)));
    }

    #[test]
    fn memory_keeps_the_last_record_per_peer() {
        let m = PathMemory::default();
        let a: SocketAddr = "10.0.0.1:7702".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7702".parse().unwrap();
        let now = Instant::now();
        m.record(a, wan(now));
        assert_eq!(m.get(a), Some(wan(now)));
        assert_eq!(m.get(b), None);
        m.forget(a);
        assert_eq!(m.get(a), None);
    }
}
