//! `--compress auto`: which codec moves the most guest pages per second on this link,
//! with the CPU this host has left.
//!
//! Round 0 starts raw: for its first [`DECIDE_AFTER`] the sender is never CPU-bound, so
//! what leaves on the wire is what the link carries (the link probe preflight used to
//! run, without delaying a page). Meanwhile a blocking task compresses a sample of the
//! guest's pages with every candidate ([`sample`]): ratio and one core's speed on *this*
//! guest's memory. Then [`choose`] picks the codec with the highest page throughput,
//! `min(link × ratio, cores × speed)`, preferring the cheaper codec when two are within
//! [`CHEAPER_WITHIN`]: none where the link outruns the compressor, zstd where the link
//! is the bottleneck. After each round the choice is revisited with what the round
//! measured ([`rescale`]: the current codec's real ratio; the link rate when the round
//! was link-bound). The wire format carries the codec per batch, so switching costs
//! nothing on the target.
//!
//! The decisions are pure functions; the CPU meter reads `/proc` at the edge.

use ferry_memory::{DirtyBitmap, RamFile, PAGE_SIZE};
use ferry_wire::Codec;
use std::time::{Duration, Instant};

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Pick per migration, adapt per round (the default).
    Auto,
    /// Always this codec.
    Fixed(Codec),
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "auto" => Ok(Compression::Auto),
            other => other
                .parse::<Codec>()
                .map(Compression::Fixed)
                .map_err(|e| e.to_string()),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Auto => f.write_str("auto"),
            Compression::Fixed(c) => write!(f, "{c}"),
        }
    }
}

impl Compression {
    /// The codec a stream starts with: raw for `auto` (round 0's first moments measure
    /// the link), else the fixed one.
    pub fn initial(self) -> Codec {
        match self {
            Compression::Auto => Codec::None,
            Compression::Fixed(c) => c,
        }
    }

    /// The codec for data that moves without a per-round choice (disk images, the NBD
    /// tunnel): zstd level 1 for `auto` — disk copies between hosts are link-bound.
    pub fn for_disks(self) -> Codec {
        match self {
            Compression::Auto => Codec::Zstd {
                level: Codec::DEFAULT_ZSTD_LEVEL,
            },
            Compression::Fixed(c) => c,
        }
    }
}

/// The codecs `auto` chooses from, cheapest first.
pub const CANDIDATES: [Codec; 4] = [
    Codec::None,
    Codec::Lz4,
    Codec::Zstd { level: 1 },
    Codec::Zstd { level: 3 },
];

/// How long round 0 runs raw before the first choice.
pub const DECIDE_AFTER: Duration = Duration::from_millis(400);

/// A codec within this fraction of the best throughput and cheaper in CPU wins.
pub const CHEAPER_WITHIN: f64 = 0.05;

/// Pages the sample compresses with every candidate (8 MiB; ~60 ms of one core for all).
pub const SAMPLE_PAGES: usize = 2048;

/// One codec on a sample of this guest's pages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecSample {
    pub codec: Codec,
    /// Guest bytes per compressed byte.
    pub ratio: f64,
    /// Guest bytes one core compresses per second (infinite for `none`).
    pub bytes_per_sec: f64,
}

/// Compresses up to [`SAMPLE_PAGES`] of `pages` (spread over the RAM) with every
/// candidate, in 1 MiB batches as the sender does. CPU work: call it off the runtime.
pub fn sample(ram: &RamFile, pages: &DirtyBitmap) -> Vec<CodecSample> {
    let count = pages.count().max(1);
    let step = (count / SAMPLE_PAGES as u64).max(1) as usize;
    let picked: Vec<u64> = pages.iter().step_by(step).take(SAMPLE_PAGES).collect();
    let mut data = vec![0u8; picked.len() * PAGE_SIZE];
    for (i, p) in picked.iter().enumerate() {
        if ram
            .read_page(*p, &mut data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
            .is_err()
        {
            return Vec::new();
        }
    }
    CANDIDATES
        .iter()
        .map(|&codec| {
            if codec == Codec::None || data.is_empty() {
                return CodecSample {
                    codec,
                    ratio: 1.0,
                    bytes_per_sec: f64::INFINITY,
                };
            }
            let start = Instant::now();
            let mut packed = 0usize;
            for batch in data.chunks(256 * PAGE_SIZE) {
                packed += match codec.compress(batch) {
                    Ok(Some(c)) => c.len(),
                    _ => batch.len(),
                };
            }
            let secs = start.elapsed().as_secs_f64().max(1e-6);
            CodecSample {
                codec,
                ratio: data.len() as f64 / packed.max(1) as f64,
                bytes_per_sec: data.len() as f64 / secs,
            }
        })
        .collect()
}

/// Guest bytes per second codec `s` moves over a link of `link` wire bytes per second
/// with `cores` cores for compressing.
pub fn throughput(s: &CodecSample, link: f64, cores: f64) -> f64 {
    let by_link = link * s.ratio.max(1.0);
    let by_cpu = s.bytes_per_sec * cores.max(0.1);
    by_link.min(by_cpu)
}

/// The codec with the highest page throughput; among those within [`CHEAPER_WITHIN`] of
/// it, the cheapest in CPU. `fallback` when nothing was sampled.
pub fn choose(samples: &[CodecSample], link: f64, cores: f64, fallback: Codec) -> Codec {
    let best = samples
        .iter()
        .map(|s| throughput(s, link, cores))
        .fold(0.0f64, f64::max);
    if best <= 0.0 {
        return fallback;
    }
    samples
        .iter()
        .filter(|s| throughput(s, link, cores) >= best * (1.0 - CHEAPER_WITHIN))
        .max_by(|a, b| a.bytes_per_sec.total_cmp(&b.bytes_per_sec))
        .map(|s| s.codec)
        .unwrap_or(fallback)
}

/// The samples corrected by a round that used `current`: its ratio as observed on the
/// wire (the others scaled alike: the same pages compress better or worse for all).
pub fn rescale(samples: &[CodecSample], current: Codec, observed_ratio: f64) -> Vec<CodecSample> {
    let Some(cur) = samples.iter().find(|s| s.codec == current) else {
        return samples.to_vec();
    };
    if current == Codec::None || observed_ratio <= 0.0 || cur.ratio <= 0.0 {
        return samples.to_vec();
    }
    let k = observed_ratio / cur.ratio;
    samples
        .iter()
        .map(|s| CodecSample {
            ratio: if s.codec == Codec::None {
                1.0
            } else {
                (s.ratio * k).max(1.0)
            },
            ..*s
        })
        .collect()
}

/// Whether `current` was limited by the link rather than the CPU, by the model.
pub fn link_bound(samples: &[CodecSample], current: Codec, link: f64, cores: f64) -> bool {
    samples
        .iter()
        .find(|s| s.codec == current)
        .is_some_and(|s| link * s.ratio.max(1.0) <= s.bytes_per_sec * cores.max(0.1))
}

/// Highest rate over any window of at least `window` in a series of
/// `(seconds, cumulative bytes)` points: the link's rate once past its ramp.
pub fn peak_rate(points: &[(f64, u64)], window: f64) -> f64 {
    let mut best = 0.0f64;
    for (i, &(t1, b1)) in points.iter().enumerate() {
        // The latest point at least `window` before this one.
        if let Some(&(t0, b0)) = points[..i].iter().rev().find(|(t0, _)| t1 - t0 >= window) {
            best = best.max(b1.saturating_sub(b0) as f64 / (t1 - t0));
        }
    }
    if best == 0.0 {
        if let (Some(&(t0, b0)), Some(&(t1, b1))) = (points.first(), points.last()) {
            if t1 > t0 {
                best = b1.saturating_sub(b0) as f64 / (t1 - t0);
            }
        }
    }
    best
}

/// Cores this process can use for compressing, from `/proc/stat` and `/proc/self/stat`
/// between [`CpuMeter::start`] and [`CpuMeter::cores`]: the idle time plus our own.
pub struct CpuMeter {
    at: Instant,
    idle: u64,
    own: u64,
}

impl CpuMeter {
    /// Starts measuring.
    pub fn start() -> Self {
        CpuMeter {
            at: Instant::now(),
            idle: idle_ticks().unwrap_or(0),
            own: own_ticks().unwrap_or(0),
        }
    }

    /// Cores idle or ours since the start, at least half a core, at most `limit`
    /// (the page streams). `limit` when `/proc` cannot tell.
    pub fn cores(&self, limit: f64) -> f64 {
        let (Some(idle), Some(own)) = (idle_ticks(), own_ticks()) else {
            return limit;
        };
        let secs = self.at.elapsed().as_secs_f64();
        if secs < 0.05 {
            return limit;
        }
        let ticks = (idle.saturating_sub(self.idle) + own.saturating_sub(self.own)) as f64;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        (ticks / hz / secs).clamp(0.5, limit.max(0.5))
    }
}

/// Idle and iowait ticks of all CPUs.
fn idle_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    Some(f.get(3)? + f.get(4).copied().unwrap_or(0))
}

/// This process's user + system ticks.
fn own_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Figures of the order measured here on the realistic guest mix (one core).
    fn samples() -> Vec<CodecSample> {
        vec![
            CodecSample {
                codec: Codec::None,
                ratio: 1.0,
                bytes_per_sec: f64::INFINITY,
            },
            CodecSample {
                codec: Codec::Lz4,
                ratio: 1.6,
                bytes_per_sec: 600e6,
            },
            CodecSample {
                codec: Codec::Zstd { level: 1 },
                ratio: 1.8,
                bytes_per_sec: 330e6,
            },
            CodecSample {
                codec: Codec::Zstd { level: 3 },
                ratio: 1.95,
                bytes_per_sec: 150e6,
            },
        ]
    }

    #[test]
    fn a_link_faster_than_the_compressor_goes_raw() {
        // 10 Gbit/s, one core free: lz4 moves 600 MB/s, raw 1.25 GB/s.
        assert_eq!(choose(&samples(), 1.25e9, 1.0, Codec::Lz4), Codec::None);
    }

    #[test]
    fn a_slow_link_gets_the_stronger_codec_the_cpu_affords() {
        // 1 Gbit/s, one core free: zstd-1 moves 1.8 x 125 MB/s = 225 MB/s; zstd-3 would
        // carry more but its core compresses only 150 MB/s.
        assert_eq!(
            choose(&samples(), 125e6, 1.0, Codec::None),
            Codec::Zstd { level: 1 }
        );
        // Two cores free: zstd-3's 1.95x (244 MB/s) is more than 5% ahead.
        assert_eq!(
            choose(&samples(), 125e6, 2.0, Codec::None),
            Codec::Zstd { level: 3 }
        );
        // 200 Mbit/s: zstd-3's 1.95x beats zstd-1 by more than 5%, and 150 MB/s of one
        // core is plenty for 25 MB/s of link.
        assert_eq!(
            choose(&samples(), 25e6, 1.0, Codec::None),
            Codec::Zstd { level: 3 }
        );
        // 1 Gbit/s but only half a core to spare: zstd-1 would move 165 MB/s, lz4 200.
        assert_eq!(choose(&samples(), 125e6, 0.5, Codec::None), Codec::Lz4);
    }

    #[test]
    fn near_ties_go_to_the_cheaper_codec() {
        let mut s = samples();
        s[3].ratio = 1.82; // zstd-3 barely better than zstd-1
        assert_eq!(choose(&s, 25e6, 1.0, Codec::None), Codec::Zstd { level: 1 });
        assert_eq!(choose(&[], 25e6, 1.0, Codec::Lz4), Codec::Lz4, "no sample");
    }

    #[test]
    fn rescaling_follows_the_observed_ratio() {
        // The guest's pages turned out less compressible than sampled: lz4 saw 1.2x.
        let r = rescale(&samples(), Codec::Lz4, 1.2);
        assert!((r[1].ratio - 1.2).abs() < 1e-9);
        assert!((r[2].ratio - 1.35).abs() < 1e-9, "{r:?}");
        assert_eq!(r[0].ratio, 1.0);
        assert_eq!(rescale(&samples(), Codec::None, 1.0), samples());
        assert!(link_bound(&samples(), Codec::Lz4, 125e6, 1.0));
        assert!(!link_bound(
            &samples(),
            Codec::Zstd { level: 3 },
            125e6,
            1.0
        ));
    }

    #[test]
    fn peak_rate_skips_the_ramp() {
        // 10 MB/s for the first 0.2 s, then 100 MB/s.
        let pts: Vec<(f64, u64)> = (0..=8)
            .map(|i| {
                let t = i as f64 * 0.05;
                let b = if t <= 0.2 {
                    t * 10e6
                } else {
                    2e6 + (t - 0.2) * 100e6
                };
                (t, b as u64)
            })
            .collect();
        let r = peak_rate(&pts, 0.1);
        assert!((r - 100e6).abs() < 1e6, "{r}");
        assert_eq!(peak_rate(&[(0.0, 0), (0.05, 1000)], 0.1), 20000.0);
    }

    #[test]
    fn names_parse() {
        assert_eq!("".parse::<Compression>(), Ok(Compression::Auto));
        assert_eq!("auto".parse::<Compression>(), Ok(Compression::Auto));
        assert_eq!(
            "zstd:3".parse::<Compression>(),
            Ok(Compression::Fixed(Codec::Zstd { level: 3 }))
        );
        assert!("brotli".parse::<Compression>().is_err());
        assert_eq!(Compression::Auto.to_string(), "auto");
        assert_eq!(Compression::Auto.initial(), Codec::None);
    }
}
