//! Cubic (RFC 9438) whose loss reduction never goes below the path's measured
//! bandwidth-delay product.
//!
//! Derived from quinn-proto 0.11.19's `congestion/cubic.rs` (MIT or Apache-2.0), with two
//! changes:
//!
//! - **The reduction's floor** ([`loss_window`]): a congestion event takes the window to
//!   β·cwnd as cubic does, but not below the bytes the path delivered per round trip lately
//!   ([`DeliveryRate`] × minimum RTT) — TCP Westwood+'s rule, for paths that also lose
//!   packets no queue caused. Traced on the testbed's `far` (200 Mbit/s, 50 ms, 0.1% random
//!   loss; benches/RESULTS.md, sixteenth session): a random loss arriving while the queue
//!   still drained a slow start's overshoot read as congestion, three reductions in a row took
//!   the window to 997 kB on a 1.25 MB path, and cubic's regrowth (K ≈ 9 s at that window)
//!   held the link at 143-172 Mbit/s for the first ten seconds of round 0.
//! - **K from the window after the reduction** (RFC 9438 §4.2, `K = cbrt((W_max −
//!   cwnd_epoch)/C)`, and `W_est` starting at `cwnd_epoch`, §4.3), which a floored
//!   reduction needs: quinn computes K as if every reduction were β.
//!
//! Persistent congestion collapses the window as before: the floor is for loss, not for a
//! path that stopped answering.

use quinn::congestion::Controller;
use quinn_proto::RttEstimator;
use std::any::Any;
use std::time::{Duration, Instant};

/// Multiplicative decrease (RFC 9438 §4.6).
pub const BETA: f64 = 0.7;

/// Cubic's growth constant, in packets per second cubed (RFC 9438 §5).
const C: f64 = 0.4;

/// Delivery-rate samples the floor takes the most of: about this many round trips.
pub const RATE_SAMPLES: usize = 8;

/// A delivery-rate sample spans at least this long (short paths, timer noise).
pub const MIN_RATE_PERIOD: Duration = Duration::from_millis(5);

/// The window after a congestion event: `beta`·`window`, but not below the path's
/// measured bandwidth-delay product `bdp` (nor above the window it had), nor below
/// `min_window`.
pub fn loss_window(window: u64, beta: f64, bdp: u64, min_window: u64) -> u64 {
    ((window as f64 * beta) as u64)
        .max(bdp.min(window))
        .max(min_window)
}

/// The bytes a path delivered per second lately: acknowledged bytes over periods of about
/// one round trip, the most of the last [`RATE_SAMPLES`] periods (one period of delayed or
/// bunched ACKs shifts bytes into the next; the maximum of several is the path's rate
/// while it was full, the way BBR and Westwood+ estimate it).
#[derive(Debug, Clone, Copy, Default)]
pub struct DeliveryRate {
    period_start: Option<Instant>,
    bytes: u64,
    samples: [f64; RATE_SAMPLES],
    next: usize,
}

impl DeliveryRate {
    /// `bytes` acknowledged at `now`; a period closes once `period` (at least
    /// [`MIN_RATE_PERIOD`]) has passed since it began.
    pub fn on_ack(&mut self, now: Instant, bytes: u64, period: Duration) {
        let Some(start) = self.period_start else {
            self.period_start = Some(now);
            self.bytes = bytes;
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= period.max(MIN_RATE_PERIOD) {
            self.samples[self.next] = self.bytes as f64 / elapsed.as_secs_f64();
            self.next = (self.next + 1) % RATE_SAMPLES;
            self.period_start = Some(now);
            self.bytes = bytes;
        } else {
            self.bytes += bytes;
        }
    }

    /// Bytes per second: the most of the recent periods (0 before one has closed).
    pub fn max(&self) -> f64 {
        self.samples.iter().copied().fold(0.0, f64::max)
    }

    /// The bandwidth-delay product over `min_rtt`, in bytes.
    pub fn bdp(&self, min_rtt: Duration) -> u64 {
        (self.max() * min_rtt.as_secs_f64()) as u64
    }
}

/// Cubic's state between congestion events (windows in bytes).
#[derive(Debug, Clone, Copy, Default)]
struct Epoch {
    /// Seconds from the epoch's start until the window is back at `w_max`.
    k: f64,
    /// The window before the last reduction (after fast convergence).
    w_max: f64,
    /// The window the epoch started at.
    cwnd_epoch: f64,
    /// Growth not yet given to the window (it grows one packet at a time).
    cwnd_inc: u64,
}

impl Epoch {
    /// `K = cbrt((W_max − cwnd_epoch) / C)`, in seconds (RFC 9438, eq. 2).
    fn compute_k(&self, mtu: u64) -> f64 {
        let gap = ((self.w_max - self.cwnd_epoch) / mtu as f64).max(0.0);
        (gap / C).cbrt()
    }

    /// `W_cubic(t) = C·(t − K)³ + W_max` (eq. 1), in bytes.
    fn w_cubic(&self, t: Duration, mtu: u64) -> f64 {
        (C * (t.as_secs_f64() - self.k).powi(3) + self.w_max / mtu as f64) * mtu as f64
    }

    /// `W_est(t)`: Reno's growth from the epoch's window (eq. 4, `α = 3(1−β)/(1+β)`).
    fn w_est(&self, t: Duration, rtt: Duration, mtu: u64) -> f64 {
        let alpha = 3.0 * (1.0 - BETA) / (1.0 + BETA);
        self.cwnd_epoch + alpha * t.as_secs_f64() / rtt.as_secs_f64().max(1e-6) * mtu as f64
    }
}

/// RFC 9438 cubic with a loss reduction floored at the measured BDP (module docs).
#[derive(Debug, Clone)]
pub struct FlooredCubic {
    window: u64,
    ssthresh: u64,
    initial_window: u64,
    /// When the current congestion epoch began (a loss, or the end of slow start).
    recovery_start: Option<Instant>,
    epoch: Epoch,
    mtu: u64,
    rate: DeliveryRate,
    /// The path's minimum RTT as last seen.
    min_rtt: Duration,
    /// Reductions the floor held above β·cwnd, for the log.
    floored: u64,
    /// Whether reductions stop at the measured BDP (off only in the tests, to show what
    /// the floor is for).
    floor: bool,
}

impl FlooredCubic {
    /// A controller starting with `initial_window` bytes.
    pub fn new(initial_window: u64, mtu: u16) -> Self {
        FlooredCubic {
            window: initial_window,
            ssthresh: u64::MAX,
            initial_window,
            recovery_start: None,
            epoch: Epoch::default(),
            mtu: u64::from(mtu),
            rate: DeliveryRate::default(),
            min_rtt: Duration::ZERO,
            floored: 0,
            floor: true,
        }
    }

    fn minimum_window(&self) -> u64 {
        2 * self.mtu
    }

    /// Reductions go to β·cwnd whatever the path delivered (quinn's cubic; for tests).
    #[cfg(test)]
    pub(crate) fn disable_floor(&mut self) {
        self.floor = false;
    }

    /// Congestion events whose reduction the measured BDP held above β·cwnd.
    pub fn floored_reductions(&self) -> u64 {
        self.floored
    }

    /// The path's bandwidth-delay product as this controller measured it (bytes).
    pub fn measured_bdp(&self) -> u64 {
        self.rate.bdp(self.min_rtt)
    }

    /// [`Controller::on_ack`] with the smoothed and the minimum RTT.
    pub fn ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        srtt: Duration,
        min_rtt: Duration,
    ) {
        // Every acknowledged byte counts for the delivery rate, whatever limited the
        // sender: an app-limited period only lowers its own sample.
        self.min_rtt = min_rtt;
        self.rate.on_ack(now, bytes, srtt);
        if app_limited || self.recovery_start.is_some_and(|t| sent <= t) {
            return;
        }
        if self.window < self.ssthresh {
            self.window += bytes;
            return;
        }
        let start = match self.recovery_start {
            Some(t) => t,
            None => {
                // Congestion avoidance without a congestion event (ssthresh given).
                self.recovery_start = Some(now);
                self.epoch.w_max = self.window as f64;
                self.epoch.cwnd_epoch = self.window as f64;
                self.epoch.k = 0.0;
                now
            }
        };
        let t = now.saturating_duration_since(start);
        let w_cubic = self.epoch.w_cubic(t + srtt, self.mtu);
        let w_est = self.epoch.w_est(t, srtt, self.mtu);
        let mut target = self.window;
        if w_cubic < w_est {
            // Reno-friendly region.
            target = target.max(w_est as u64);
        } else if (target as f64) < w_cubic {
            let inc = (w_cubic - target as f64) / target as f64 * self.mtu as f64;
            target = target.saturating_add(inc as u64);
        }
        self.epoch.cwnd_inc += target - self.window;
        // At most one packet per ACK (RFC 9002 §7.3.3).
        if self.epoch.cwnd_inc >= self.mtu {
            self.window += self.mtu;
            self.epoch.cwnd_inc = 0;
        }
    }
}

impl Controller for FlooredCubic {
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.ack(now, sent, bytes, app_limited, rtt.get(), rtt.min());
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if self.recovery_start.is_some_and(|t| sent <= t) {
            return;
        }
        self.recovery_start = Some(now);
        let window = self.window as f64;
        if is_persistent_congestion {
            // RFC 9438 §4.8: a path that stopped answering starts over, no floor; what
            // it delivered before says nothing about the path it comes back as.
            self.recovery_start = None;
            self.ssthresh = ((window * BETA) as u64).max(self.minimum_window());
            self.epoch = Epoch {
                w_max: self.ssthresh as f64,
                ..Epoch::default()
            };
            self.window = self.minimum_window();
            self.rate = DeliveryRate::default();
            return;
        }
        // Fast convergence (RFC 9438 §4.7).
        self.epoch.w_max = if window < self.epoch.w_max {
            window * (1.0 + BETA) / 2.0
        } else {
            window
        };
        // An ECN mark (no bytes lost) always means a queue: no floor for it.
        let bdp = if self.floor && lost_bytes > 0 {
            self.measured_bdp()
        } else {
            0
        };
        let reduced = loss_window(self.window, BETA, bdp, self.minimum_window());
        if reduced > ((window * BETA) as u64).max(self.minimum_window()) {
            self.floored += 1;
        }
        self.ssthresh = reduced;
        self.window = reduced;
        self.epoch.cwnd_epoch = reduced as f64;
        // A floored window can stand above a W_max fast convergence lowered: the curve
        // then starts from the window (K = 0), as Linux's cubic does, not below it.
        self.epoch.w_max = self.epoch.w_max.max(self.epoch.cwnd_epoch);
        self.epoch.k = self.epoch.compute_k(self.mtu);
        self.epoch.cwnd_inc = (self.epoch.cwnd_inc as f64 * BETA) as u64;
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.window = self.window.max(self.minimum_window());
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn metrics(&self) -> quinn::congestion::ControllerMetrics {
        let mut m = quinn::congestion::ControllerMetrics::default();
        m.congestion_window = self.window;
        m.ssthresh = Some(self.ssthresh);
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial_window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_reduction_stops_at_the_measured_bdp() {
        // far as traced: a 1425 kB window on a 1250 kB path. Cubic alone: 997 kB.
        assert_eq!(loss_window(1_425_000, BETA, 1_250_000, 2400), 1_250_000);
        // Well above the path (a queue overflowing): the usual β.
        assert_eq!(loss_window(4_000_000, BETA, 1_250_000, 2400), 2_800_000);
        // Never above the window it had (a rate estimate higher than the window).
        assert_eq!(loss_window(1_000_000, BETA, 1_250_000, 2400), 1_000_000);
        // Nothing measured yet: cubic's β, and never below two packets.
        assert_eq!(loss_window(1_000_000, BETA, 0, 2400), 700_000);
        assert_eq!(loss_window(2000, BETA, 0, 2400), 2400);
    }

    #[test]
    fn the_delivery_rate_is_the_most_of_the_recent_periods() {
        let t0 = Instant::now();
        let mut r = DeliveryRate::default();
        assert_eq!(r.max(), 0.0);
        // 25 MB/s in 1250-byte packets every 50 µs, periods of 50 ms, for 0.5 s.
        let mut t = t0;
        for _ in 0..10_000 {
            r.on_ack(t, 1250, 50 * MS);
            t += Duration::from_micros(50);
        }
        let rate = r.max();
        assert!((rate - 25e6).abs() / 25e6 < 0.01, "{rate}");
        assert_eq!(r.bdp(50 * MS), (rate * 0.05) as u64);
        // Then a slower stretch (the sender out of data): the rate while full is kept
        // for a few periods...
        for _ in 0..8 {
            r.on_ack(t, 1250, 50 * MS);
            t += 25 * MS;
        }
        let slow = r.samples.iter().filter(|&&x| x < 1e6).count();
        assert!(slow >= 3, "slow periods closed: {slow}");
        assert!((r.max() - 25e6).abs() / 25e6 < 0.01);
        // ...and forgotten after RATE_SAMPLES of them.
        for _ in 0..(2 * RATE_SAMPLES + 2) {
            r.on_ack(t, 1250, 50 * MS);
            t += 60 * MS;
        }
        assert!(r.max() < 1e6, "{}", r.max());
    }

    #[test]
    fn a_floored_reduction_regrows_sooner() {
        // RFC 9438's K from the window after the reduction: a reduction the floor kept
        // small leaves a short way back to W_max.
        let mtu = 1200;
        let full = Epoch {
            w_max: 1_425_000.0,
            cwnd_epoch: 1_425_000.0 * BETA,
            ..Default::default()
        };
        let floored = Epoch {
            cwnd_epoch: 1_250_000.0,
            ..full
        };
        let (k_full, k_floored) = (full.compute_k(mtu), floored.compute_k(mtu));
        assert!((k_full - 9.6).abs() < 0.2, "{k_full}");
        assert!((k_floored - 7.1).abs() < 0.2, "{k_floored}");
        // W_cubic starts at the epoch's window and passes through W_max at K.
        let floored = Epoch {
            k: k_floored,
            ..floored
        };
        let at_0 = floored.w_cubic(Duration::ZERO, mtu);
        assert!((at_0 - 1_250_000.0).abs() < 1.0, "{at_0}");
        let at_k = floored.w_cubic(Duration::from_secs_f64(k_floored), mtu);
        assert!((at_k - 1_425_000.0).abs() < 1.0);
    }

    /// 200 ms of ACKs at 25 MB/s with a 50 ms minimum RTT: a measured BDP of ~1.25 MB.
    fn path_delivered_25_mb_per_s_at_50_ms(c: &mut FlooredCubic, t0: Instant) {
        for i in 0..200u32 {
            c.rate.on_ack(t0 + i * MS, 25_000, 50 * MS);
        }
        c.min_rtt = 50 * MS;
    }

    #[test]
    fn a_floored_window_above_a_converged_w_max_grows_from_where_it_is() {
        // Fast convergence: a loss at 1.30 MB after one at 1.425 MB sets W_max to
        // 0.85 x 1.30 = 1.105 MB; the floor holds the window at the path's 1.25 MB.
        let t0 = Instant::now();
        let mut c = FlooredCubic::new(1_425_000, 1200);
        c.on_congestion_event(t0 + MS, t0, false, 1200);
        path_delivered_25_mb_per_s_at_50_ms(&mut c, t0);
        c.window = 1_300_000;
        c.on_congestion_event(t0 + 300 * MS, t0 + 250 * MS, false, 1200);
        let w = c.window();
        assert!((1_240_000..=1_260_000).contains(&w), "{w}");
        // The curve starts at the window, not at a W_max below it (which would leave
        // only Reno's slow term growing the window for seconds).
        assert_eq!(c.epoch.k, 0.0);
        let at_0 = c.epoch.w_cubic(Duration::ZERO, c.mtu);
        assert!((at_0 - w as f64).abs() < 1.0, "{at_0} vs {w}");
        let after_1s = c.epoch.w_cubic(Duration::from_secs(1), c.mtu);
        assert!(after_1s > w as f64, "{after_1s}");
    }

    #[test]
    fn an_ecn_mark_is_not_floored() {
        let t0 = Instant::now();
        let mut c = FlooredCubic::new(1_425_000, 1200);
        path_delivered_25_mb_per_s_at_50_ms(&mut c, t0);
        // A congestion event with nothing lost: a mark.
        c.on_congestion_event(t0 + 300 * MS, t0 + 250 * MS, false, 0);
        assert_eq!(c.window(), (1_425_000.0 * BETA) as u64);
        assert_eq!(c.floored_reductions(), 0);
    }

    #[test]
    fn congestion_events_reduce_and_persistent_congestion_collapses() {
        let t0 = Instant::now();
        let mut c = FlooredCubic::new(4_000_000, 1200);
        // No rate measured: β.
        c.on_congestion_event(t0 + MS, t0, false, 1200);
        assert_eq!(c.window(), 2_800_000);
        assert_eq!(c.floored_reductions(), 0);
        // A loss of a packet sent before the reduction: same recovery period.
        c.on_congestion_event(t0 + 2 * MS, t0, false, 1200);
        assert_eq!(c.window(), 2_800_000);
        // With a measured 25 MB/s over 50 ms, a later reduction stops at 1.25 MB.
        path_delivered_25_mb_per_s_at_50_ms(&mut c, t0);
        c.window = 1_425_000;
        c.on_congestion_event(t0 + 300 * MS, t0 + 250 * MS, false, 1200);
        let bdp = c.measured_bdp();
        assert!((1_240_000..=1_260_000).contains(&bdp), "{bdp}");
        assert_eq!(c.window(), bdp);
        assert_eq!(c.floored_reductions(), 1);
        // Persistent congestion: two packets, whatever the path delivered; it is not a
        // floored reduction, ssthresh is β of the window before it, and the old path's
        // rate is forgotten (the next loss reduces by β again).
        c.on_congestion_event(t0 + 900 * MS, t0 + 800 * MS, true, 1200);
        assert_eq!(c.window(), 2400);
        assert_eq!(c.floored_reductions(), 1);
        assert_eq!(c.ssthresh, (bdp as f64 * BETA) as u64);
        assert_eq!(c.measured_bdp(), 0);
    }
}
