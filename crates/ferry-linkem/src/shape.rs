//! The shaping logic of one direction of a link, on a clock given by the caller (nanoseconds
//! from any origin), so that tests run it on a fake clock.
//!
//! Model (the same as a router with a FIFO in front of a slower link, followed by a long
//! fibre):
//!
//! ```text
//!  arrival ──loss──▶ [ FIFO, limit Q bytes, drop-tail ] ──rate R──▶ [ propagation delay D ] ──▶ delivery
//! ```
//!
//! * **Rate.** A token bucket of rate R whose depth is one packet: the transmitter is busy
//!   until `next_free`; a packet of `b` bytes arriving at `t` starts at `max(t, next_free)`
//!   and finishes `8·b/R` later. (A deeper bucket would let bursts leave faster than R, which
//!   a real bottleneck does not do.)
//! * **Queue.** The bytes waiting at `t` are the transmitter's backlog `(next_free − t)·R/8`.
//!   A packet that would take it above Q is dropped (drop-tail).
//! * **Delay.** The packet is released at `finish + D`. Release times of one link only grow,
//!   so the delay line is a FIFO (`VecDeque`), not a heap.
//! * **Loss** is decided before the queue by [`LossGen`], per segment (see there).

use std::collections::VecDeque;

/// A small, fast PRNG (xorshift64*), seeded explicitly so tests are repeatable.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 1 } else { z })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in (0, 1].
    pub fn unit_open0(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// Independent (Bernoulli) loss per segment with probability `p`.
///
/// A TSO/USO super-packet carries `n` segments that a real wire would carry as `n`
/// packets, so loss is decided per segment: the generator draws the gap to the next lost
/// segment from the geometric distribution and counts segments down, which costs O(1) per
/// packet whatever `n` is. [`LossGen::lost_segments`] says which segments of the next packet
/// are lost; the caller splits a super-packet only when one of its segments is.
#[derive(Clone, Debug)]
pub struct LossGen {
    p: f64,
    ln_q: f64,
    /// Segments that pass before the next lost one.
    gap: u64,
    rng: Rng,
}

impl LossGen {
    pub fn new(p: f64, seed: u64) -> LossGen {
        let mut g = LossGen {
            p,
            ln_q: (1.0 - p).ln(),
            gap: 0,
            rng: Rng::new(seed),
        };
        g.gap = g.draw_gap();
        g
    }

    fn draw_gap(&mut self) -> u64 {
        if self.p <= 0.0 {
            return u64::MAX;
        }
        if self.p >= 1.0 {
            return 0;
        }
        // Number of successes before the first failure: floor(ln U / ln(1-p)).
        let g = (self.rng.unit_open0().ln() / self.ln_q).floor();
        if g >= u64::MAX as f64 {
            u64::MAX
        } else {
            g as u64
        }
    }

    /// Whether the generator ever loses anything.
    pub fn is_lossless(&self) -> bool {
        self.p <= 0.0
    }

    /// Decides the fate of a packet of `segments` segments: `None` if all pass, otherwise
    /// the indices (ascending) of the lost ones. Allocates only when something is lost.
    pub fn lost_segments(&mut self, segments: u32) -> Option<Vec<u32>> {
        let n = segments.max(1) as u64;
        if self.gap >= n {
            if self.gap != u64::MAX {
                self.gap -= n;
            }
            return None;
        }
        let mut lost = Vec::new();
        let mut i = self.gap; // index of the lost segment within this packet
        loop {
            lost.push(i as u32);
            let next = self.draw_gap();
            // The next lost segment is `next` segments after this one.
            match i.checked_add(1).and_then(|v| v.checked_add(next)) {
                Some(j) if j < n => i = j,
                Some(j) => {
                    self.gap = j - n;
                    break;
                }
                None => {
                    self.gap = u64::MAX;
                    break;
                }
            }
        }
        Some(lost)
    }
}

/// Why a packet did not enter the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The FIFO holds a bandwidth-delay product already (drop-tail).
    QueueFull,
}

/// One direction of a link: pacer, FIFO limit, delay line. Holds the packets (`P`) between
/// admission and release.
#[derive(Debug)]
pub struct Link<P> {
    rate_bps: Option<u64>,
    delay_ns: u64,
    queue_limit: u64,
    /// When the transmitter has finished sending everything admitted so far.
    next_free_ns: u64,
    /// The delay line: (release time, packet), release times non-decreasing.
    line: VecDeque<(u64, P)>,
}

impl<P> Link<P> {
    pub fn new(rate_bps: Option<u64>, one_way_delay_ns: u64, queue_limit: u64) -> Link<P> {
        Link {
            rate_bps,
            delay_ns: one_way_delay_ns,
            queue_limit,
            next_free_ns: 0,
            line: VecDeque::new(),
        }
    }

    /// From a profile's spec.
    pub fn from_spec(spec: &crate::profile::LinkSpec) -> Link<P> {
        Link::new(spec.rate_bps, spec.one_way_delay_ns(), spec.queue_limit())
    }

    /// Time to put `bytes` on the wire at the link's rate.
    pub fn tx_time_ns(&self, bytes: u64) -> u64 {
        match self.rate_bps {
            None => 0,
            Some(r) => ((bytes as u128 * 8 * 1_000_000_000).div_ceil(r as u128)) as u64,
        }
    }

    /// Bytes waiting for the transmitter at `now` (including the one being sent).
    pub fn backlog_bytes(&self, now_ns: u64) -> u64 {
        match self.rate_bps {
            None => 0,
            Some(r) => {
                let busy = self.next_free_ns.saturating_sub(now_ns) as u128;
                (busy * r as u128 / 8 / 1_000_000_000) as u64
            }
        }
    }

    /// Offers a packet of `wire_bytes` at `now`: on success it is in the delay line and the
    /// result is its release time.
    pub fn offer(&mut self, now_ns: u64, wire_bytes: u64, pkt: P) -> Result<u64, (Refused, P)> {
        let release = match self.rate_bps {
            None => now_ns + self.delay_ns,
            Some(_) => {
                if self.backlog_bytes(now_ns) + wire_bytes > self.queue_limit {
                    return Err((Refused::QueueFull, pkt));
                }
                let start = self.next_free_ns.max(now_ns);
                let finish = start + self.tx_time_ns(wire_bytes);
                self.next_free_ns = finish;
                finish + self.delay_ns
            }
        };
        // Keep the line FIFO even if a caller's clock stepped back.
        let release = match self.line.back() {
            Some(&(last, _)) if last > release => last,
            _ => release,
        };
        self.line.push_back((release, pkt));
        Ok(release)
    }

    /// Release time of the oldest packet in the delay line.
    pub fn next_release(&self) -> Option<u64> {
        self.line.front().map(|(t, _)| *t)
    }

    /// Takes the oldest packet if it is due at `now`.
    pub fn pop_due(&mut self, now_ns: u64) -> Option<P> {
        match self.line.front() {
            Some(&(t, _)) if t <= now_ns => self.line.pop_front().map(|(_, p)| p),
            _ => None,
        }
    }

    /// Packets in the link (queued or in flight).
    pub fn len(&self) -> usize {
        self.line.len()
    }

    pub fn is_empty(&self) -> bool {
        self.line.is_empty()
    }

    /// Empties the link (shutdown).
    pub fn drain(&mut self) -> impl Iterator<Item = P> + '_ {
        self.line.drain(..).map(|(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::LinkSpec;

    const MS: u64 = 1_000_000;

    #[test]
    fn token_bucket_paces_at_the_rate() {
        // 10 Mbit/s: 1250 bytes take exactly 1 ms. No delay.
        let mut l: Link<u32> = Link::new(Some(10_000_000), 0, 1 << 30);
        let releases: Vec<u64> = (0..5).map(|i| l.offer(0, 1250, i).unwrap()).collect();
        assert_eq!(releases, vec![MS, 2 * MS, 3 * MS, 4 * MS, 5 * MS]);
        // An idle link does not bank tokens: after a pause, a packet still takes 1 ms.
        assert_eq!(l.offer(100 * MS, 1250, 9).unwrap(), 101 * MS);
    }

    #[test]
    fn throughput_over_a_long_run_matches_the_rate() {
        // Offer 2x the rate for one simulated second: 1 Gbit/s link, 64 KiB super-packets.
        let mut l: Link<()> = Link::from_spec(&LinkSpec::profile("wan").unwrap());
        let (mut sent, mut delivered_bytes, mut last_release) = (0u64, 0u64, 0u64);
        let mut t = 0;
        while t < 1_000 * MS {
            if let Ok(r) = l.offer(t, 65536, ()) {
                sent += 1;
                last_release = r;
                if r <= 1_000 * MS + 10 * MS {
                    delivered_bytes += 65536;
                }
            }
            t += 262_144; // 65536 B every 262 us = 2 Gbit/s offered
        }
        let rate = delivered_bytes as f64 * 8.0 / 1.0;
        assert!(
            (rate - 1e9).abs() / 1e9 < 0.01,
            "delivered {rate} bit/s, sent {sent}, last {last_release}"
        );
    }

    #[test]
    fn queue_is_one_bdp_then_drop_tail() {
        // 1 Gbit/s, 20 ms RTT: BDP 2.5 MB. A burst of 100 x 64 KiB (6.5 MB) at t=0.
        let spec = LinkSpec::profile("wan").unwrap();
        let mut l: Link<u32> = Link::from_spec(&spec);
        let mut accepted = 0u64;
        let mut dropped = 0;
        for i in 0..100 {
            match l.offer(0, 65536, i) {
                Ok(_) => accepted += 1,
                Err((Refused::QueueFull, p)) => {
                    assert_eq!(p, i, "the refused packet is handed back");
                    dropped += 1
                }
            }
        }
        assert_eq!(accepted, 2_500_000 / 65536, "accepted {accepted}");
        assert_eq!(accepted + dropped, 100);
        assert!(l.backlog_bytes(0) <= spec.queue_limit());
        // Drop-tail: once the transmitter has drained half, packets fit again.
        let half = l.tx_time_ns(accepted * 65536 / 2);
        assert!(l.offer(half, 65536, 1000).is_ok());
        // The queue drains completely after its transmission time.
        let empty_at = l.tx_time_ns((accepted + 1) * 65536) + 1;
        assert_eq!(l.backlog_bytes(empty_at), 0);
    }

    #[test]
    fn delay_is_added_and_order_kept() {
        // No rate limit, 10 ms one way.
        let mut l: Link<u32> = Link::new(None, 10 * MS, u64::MAX);
        assert_eq!(l.offer(0, 100, 1).unwrap(), 10 * MS);
        assert_eq!(l.offer(MS, 60000, 2).unwrap(), 11 * MS);
        assert_eq!(l.offer(MS, 40, 3).unwrap(), 11 * MS);
        assert_eq!(l.next_release(), Some(10 * MS));
        assert_eq!(l.pop_due(10 * MS - 1), None, "not due yet");
        assert_eq!(l.pop_due(10 * MS), Some(1));
        assert_eq!(l.pop_due(10 * MS + 5), None);
        assert_eq!(l.pop_due(20 * MS), Some(2));
        assert_eq!(l.pop_due(20 * MS), Some(3));
        assert!(l.is_empty());
    }

    #[test]
    fn release_is_serialisation_plus_delay() {
        // 200 Mbit/s, 50 ms RTT: 1500 bytes take 60 us, then 25 ms.
        let mut l: Link<u32> = Link::from_spec(&LinkSpec::profile("far").unwrap());
        assert_eq!(l.offer(0, 1500, 0).unwrap(), 60_000 + 25 * MS);
        assert_eq!(l.offer(0, 1500, 1).unwrap(), 120_000 + 25 * MS);
        // A small packet behind a big one waits for it (FIFO, no reordering).
        assert_eq!(l.offer(1000, 40, 2).unwrap(), 120_000 + 1600 + 25 * MS);
        let mut out = vec![];
        while let Some(p) = l.pop_due(u64::MAX) {
            out.push(p);
        }
        assert_eq!(out, vec![0, 1, 2]);
    }

    #[test]
    fn release_times_never_go_back() {
        let mut l: Link<u32> = Link::new(None, 5 * MS, u64::MAX);
        l.offer(10 * MS, 1, 0).unwrap();
        // A clock that steps back must not reorder packets.
        assert_eq!(l.offer(9 * MS, 1, 1).unwrap(), 15 * MS);
    }

    #[test]
    fn loss_rate_is_the_probability() {
        for &p in &[0.001, 0.01, 0.2] {
            let mut g = LossGen::new(p, 42);
            let n = 2_000_000u64;
            let mut lost = 0u64;
            for _ in 0..n {
                if g.lost_segments(1).is_some() {
                    lost += 1;
                }
            }
            let rate = lost as f64 / n as f64;
            // 5 standard deviations.
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((rate - p).abs() < 5.0 * sd, "p {p}: measured {rate}");
        }
    }

    #[test]
    fn loss_counts_segments_of_super_packets() {
        // 44-segment super-packets at p = 0.01: per-segment loss stays 1%, and the lost
        // indices are inside the packet, ascending, distinct.
        let mut g = LossGen::new(0.01, 7);
        let (mut segs, mut lost, mut hit_packets) = (0u64, 0u64, 0u64);
        for _ in 0..50_000 {
            if let Some(v) = g.lost_segments(44) {
                hit_packets += 1;
                assert!(!v.is_empty());
                assert!(v.windows(2).all(|w| w[0] < w[1]), "{v:?}");
                assert!(*v.last().unwrap() < 44);
                lost += v.len() as u64;
            }
            segs += 44;
        }
        let rate = lost as f64 / segs as f64;
        assert!((rate - 0.01).abs() < 0.0007, "segment loss {rate}");
        // P(packet hit) = 1 - 0.99^44 = 35.7%
        let hit = hit_packets as f64 / 50_000.0;
        assert!((hit - 0.357).abs() < 0.015, "packet hit rate {hit}");
    }

    #[test]
    fn no_loss_and_total_loss() {
        let mut g = LossGen::new(0.0, 1);
        assert!(g.is_lossless());
        assert!((0..100_000).all(|_| g.lost_segments(44).is_none()));
        let mut g = LossGen::new(1.0, 1);
        assert_eq!(g.lost_segments(3), Some(vec![0, 1, 2]));
        assert_eq!(g.lost_segments(1), Some(vec![0]));
    }

    #[test]
    fn same_seed_same_losses() {
        let mut a = LossGen::new(0.05, 99);
        let mut b = LossGen::new(0.05, 99);
        for _ in 0..10_000 {
            assert_eq!(a.lost_segments(3), b.lost_segments(3));
        }
    }
}
