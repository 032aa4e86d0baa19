//! `--compress auto`: which codec moves the most guest pages per second on this link,
//! with the CPU this host has left — decided from where the page streams wait.
//!
//! A pre-copy starts with lz4. While a round runs, every [`STEP_EVERY`] the source looks
//! at the last interval ([`Interval`]): how much of the streams' time went to waiting for
//! QUIC to take their bytes (the link, or its congestion window, is the bottleneck) and
//! how much to reading and compressing (the CPU is). [`step`] then moves along the codecs
//! ordered by ratio (none, lz4, zstd-1, zstd-3): **link-bound**, it takes the stronger
//! codec that moves the most pages, `min(link × ratio, cores × speed)` with the link as
//! measured and each codec's ratio and speed from a sample of *this* guest's pages
//! ([`sample`], taken beside round 0, its ratios corrected by what the wire shows:
//! [`rescale`]), if that beats the current one by [`SWITCH_GAIN`]; **CPU-bound**, it steps
//! down to the next cheaper codec — the link had room — down to none where the link
//! outruns every compressor. The first raw moments of a connection say little about the
//! link (measured here: quinn's BBR sends ~10 Mbit/s for the first 300 ms on the 20 ms wan
//! link), so the controller does not try to measure the link up front.
//! Page batches carry their codec, so a switch costs the target nothing.
//!
//! The decisions are pure functions; the CPU meter reads `/proc` at the edge.

use ferry_memory::{DirtyBitmap, MemoryError, RamFile, PAGE_SIZE};
use ferry_wire::{Codec, CodecError};
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
    /// The codec a pre-copy starts with: lz4 for `auto` (cheap, and 1.5x where the link
    /// is the limit), else the fixed one.
    pub fn initial(self) -> Codec {
        match self {
            Compression::Auto => Codec::Lz4,
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

/// How often the controller looks at the streams while a round runs: on the tick of the
/// live status.
pub const STEP_EVERY: Duration = super::progress::PROGRESS_EVERY;

/// A stronger codec must move this much more than the current one to be taken.
pub const SWITCH_GAIN: f64 = 1.05;

/// Share of the streams' time spent waiting for QUIC above which the link is the limit.
pub const LINK_BOUND: f64 = 0.6;

/// Share below which the CPU is the limit (the streams hardly ever wait for the link).
pub const CPU_BOUND: f64 = 0.25;

/// Share of an interval's written bytes still in QUIC's send buffer at its end above
/// which the link is the limit whatever the streams' waits say: a send buffer larger
/// than the path's BDP takes writes at once while the congestion window is still
/// opening (measured on wan: 250 ms into round 0 the streams had not waited, yet the
/// wire had carried 41 Mbit/s of a 1 Gbit/s link).
pub const QUEUED_BOUND: f64 = 0.25;

/// Pages the sample compresses with every candidate (2 MiB; ~50 ms of one core for all,
/// taken from the sender's start on a busy host).
pub const SAMPLE_PAGES: usize = 512;

/// One codec on a sample of this guest's pages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecSample {
    pub codec: Codec,
    /// Guest bytes per compressed byte.
    pub ratio: f64,
    /// Guest bytes one core compresses per second (infinite for `none`).
    pub bytes_per_sec: f64,
}

/// Up to `max` of `pages`, spread over the RAM, read into one buffer.
pub fn read_sample(ram: &RamFile, pages: &DirtyBitmap, max: usize) -> Result<Vec<u8>, MemoryError> {
    let step = (pages.count() / max.max(1) as u64).max(1) as usize;
    let picked: Vec<u64> = pages.iter().step_by(step).take(max).collect();
    let mut data = vec![0u8; picked.len() * PAGE_SIZE];
    for (p, page) in picked.iter().zip(data.chunks_exact_mut(PAGE_SIZE)) {
        ram.read_page(*p, page)?;
    }
    Ok(data)
}

/// `codec` on `data` in 1 MiB batches, as the sender compresses: ratio and one core's
/// speed (infinite for `none` or nothing to compress). A batch that does not shrink counts
/// raw, as it would travel. CPU work: call it off the runtime.
pub fn measure(codec: Codec, data: &[u8]) -> Result<CodecSample, CodecError> {
    if codec == Codec::None || data.is_empty() {
        return Ok(CodecSample {
            codec,
            ratio: 1.0,
            bytes_per_sec: f64::INFINITY,
        });
    }
    // Untimed first: the streams keep a compressor per thread, so the speed that
    // matters is a warm one (a fresh zstd context's set-up took most of a 2 MiB sample).
    if let Some(first) = data.chunks(256 * PAGE_SIZE).next() {
        codec.compress(first)?;
    }
    let start = Instant::now();
    let mut packed = 0usize;
    for batch in data.chunks(256 * PAGE_SIZE) {
        packed += codec.compress(batch)?.map_or(batch.len(), |c| c.len());
    }
    let secs = start.elapsed().as_secs_f64().max(1e-6);
    Ok(CodecSample {
        codec,
        ratio: data.len() as f64 / packed.max(1) as f64,
        bytes_per_sec: data.len() as f64 / secs,
    })
}

/// Every candidate measured on up to [`SAMPLE_PAGES`] of `pages`. Nothing when the RAM
/// cannot be read; a codec that fails to compress gets no speed (never chosen).
pub fn sample(ram: &RamFile, pages: &DirtyBitmap) -> Vec<CodecSample> {
    let Ok(data) = read_sample(ram, pages, SAMPLE_PAGES) else {
        return Vec::new();
    };
    CANDIDATES
        .iter()
        .map(|&codec| {
            measure(codec, &data).unwrap_or(CodecSample {
                codec,
                ratio: 1.0,
                bytes_per_sec: 0.0,
            })
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

/// What the page streams did during the last interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// Share of the streams' time spent waiting for QUIC to take their bytes.
    pub wait_share: f64,
    /// Wire bytes per second QUIC sent.
    pub wire_rate: f64,
    /// Cores free for compressing (idle or ours), from `/proc`.
    pub cores: f64,
    /// Share of the bytes the streams wrote in the interval that QUIC had not sent by
    /// its end (queued in its send buffer); 0 when it sent more than was written.
    pub queued_share: f64,
}

impl Interval {
    /// The link (or its congestion window) was the limit.
    pub fn link_bound(&self) -> bool {
        self.wait_share >= LINK_BOUND || self.queued_share >= QUEUED_BOUND
    }

    /// Compressing was the limit: the streams hardly waited and QUIC kept up.
    pub fn cpu_bound(&self) -> bool {
        self.wait_share <= CPU_BOUND && self.queued_share < QUEUED_BOUND
    }
}

/// What the controller knows of the link across intervals.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkKnowledge {
    /// Highest wire rate of an interval in which the streams waited for the link: what
    /// the link (or its congestion window) carried when pushed. None until one was.
    pub pushed: Option<f64>,
    /// Highest wire rate seen at all: the link carries at least this.
    pub floor: f64,
}

impl LinkKnowledge {
    /// Adds an interval's figures.
    pub fn add(&mut self, iv: &Interval) {
        self.floor = self.floor.max(iv.wire_rate);
        if iv.link_bound() {
            self.pushed = Some(self.pushed.unwrap_or(0.0).max(iv.wire_rate));
        }
    }

    /// The link's rate as far as known: unbounded until it was pushed.
    pub fn estimate(&self) -> f64 {
        match self.pushed {
            Some(p) => p.max(self.floor),
            None => f64::INFINITY,
        }
    }
}

/// The codec for the next interval. Pure. Link-bound: the stronger codec moving the most
/// pages over the link as measured now, if it beats the current by [`SWITCH_GAIN`].
/// CPU-bound: the next cheaper codec, if it would move more over the link as known
/// (`link`), with the cores the current codec shows it has (its page rate / its speed).
pub fn step(samples: &[CodecSample], current: Codec, iv: Interval, link: &LinkKnowledge) -> Codec {
    let Some(pos) = CANDIDATES.iter().position(|&c| c == current) else {
        return current;
    };
    let sample = |c: Codec| samples.iter().find(|s| s.codec == c);
    let Some(cur) = sample(current) else {
        return current;
    };
    if iv.link_bound() {
        let now = throughput(cur, iv.wire_rate, iv.cores);
        let best = CANDIDATES[pos + 1..]
            .iter()
            .filter_map(|&c| sample(c))
            .map(|s| (s.codec, throughput(s, iv.wire_rate, iv.cores)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((c, t)) if t > now * SWITCH_GAIN => c,
            _ => current,
        }
    } else if iv.cpu_bound() && pos > 0 {
        let Some(down) = sample(CANDIDATES[pos - 1]) else {
            return current;
        };
        let cores = if cur.bytes_per_sec.is_finite() {
            (iv.wire_rate * cur.ratio.max(1.0) / cur.bytes_per_sec).max(0.1)
        } else {
            iv.cores
        };
        let l = link.estimate();
        if throughput(down, l, cores) > throughput(cur, l, cores) * SWITCH_GAIN {
            down.codec
        } else {
            current
        }
    } else {
        current
    }
}

/// The samples corrected by an interval that used `current`: its ratio as observed on
/// the wire (the others scaled alike: the same pages compress better or worse for all).
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

    fn link_bound(wire_rate: f64, cores: f64) -> Interval {
        Interval {
            wait_share: 0.9,
            wire_rate,
            cores,
            queued_share: 0.0,
        }
    }

    fn known(pushed: f64) -> LinkKnowledge {
        LinkKnowledge {
            pushed: Some(pushed),
            floor: pushed,
        }
    }

    const UNKNOWN: LinkKnowledge = LinkKnowledge {
        pushed: None,
        floor: 0.0,
    };

    #[test]
    fn a_link_bound_stream_takes_the_stronger_codec_the_cpu_affords() {
        let z1 = Codec::Zstd { level: 1 };
        let z3 = Codec::Zstd { level: 3 };
        // 1 Gbit/s, one core free: zstd-1 moves 1.8 x 125 MB/s = 225 MB/s against lz4's
        // 200; zstd-3 would carry more but its core compresses only 150 MB/s.
        assert_eq!(
            step(&samples(), Codec::Lz4, link_bound(125e6, 1.0), &UNKNOWN),
            z1
        );
        // Two cores free: zstd-3's 1.95x (244 MB/s) is the most.
        assert_eq!(
            step(&samples(), Codec::Lz4, link_bound(125e6, 2.0), &UNKNOWN),
            z3
        );
        // Half a core: nothing stronger than lz4 pays.
        assert_eq!(
            step(&samples(), Codec::Lz4, link_bound(125e6, 0.5), &UNKNOWN),
            Codec::Lz4
        );
        // Raw on a slow link jumps straight to the best.
        assert_eq!(
            step(&samples(), Codec::None, link_bound(25e6, 1.0), &UNKNOWN),
            z3
        );
        // Less than 5% better is not worth a switch.
        let mut s = samples();
        s[3].ratio = 1.82;
        assert_eq!(step(&s, z1, link_bound(25e6, 1.0), &UNKNOWN), z1);
    }

    #[test]
    fn a_cpu_bound_stream_steps_down_only_where_the_link_has_room() {
        // lz4 compresses 600 MB/s a core and is the limit at 100 MB/s on the wire
        // (160 MB/s of pages: a quarter of a core is what it gets).
        let cpu_bound = Interval {
            wait_share: 0.1,
            wire_rate: 100e6,
            cores: 1.0,
            queued_share: 0.0,
        };
        // Link never pushed: it may be fast, try raw.
        assert_eq!(
            step(&samples(), Codec::Lz4, cpu_bound, &UNKNOWN),
            Codec::None
        );
        // A 1.25 GB/s link: raw moves more.
        assert_eq!(
            step(&samples(), Codec::Lz4, cpu_bound, &known(1.25e9)),
            Codec::None
        );
        // A 125 MB/s link: raw would move 125 MB/s of pages, lz4 moves 160: stay.
        assert_eq!(
            step(&samples(), Codec::Lz4, cpu_bound, &known(125e6)),
            Codec::Lz4
        );
        // zstd-3 held back by its core on a 125 MB/s link: zstd-1 moves more.
        let z3_bound = Interval {
            wait_share: 0.1,
            wire_rate: 60e6,
            cores: 1.0,
            queued_share: 0.0,
        };
        assert_eq!(
            step(
                &samples(),
                Codec::Zstd { level: 3 },
                z3_bound,
                &known(125e6)
            ),
            Codec::Zstd { level: 1 }
        );
        assert_eq!(
            step(&samples(), Codec::None, cpu_bound, &UNKNOWN),
            Codec::None
        );
        // The streams did not wait, but QUIC sent only a tenth of what they wrote (its
        // buffer took the rest while the congestion window opened): the link is the
        // limit, not the CPU — no step down to raw, and the link counts as pushed.
        let buffered = Interval {
            wire_rate: 5e6,
            queued_share: 0.9,
            ..cpu_bound
        };
        assert!(buffered.link_bound() && !buffered.cpu_bound());
        assert_ne!(
            step(&samples(), Codec::Lz4, buffered, &UNKNOWN),
            Codec::None
        );
        let mut k = UNKNOWN;
        k.add(&buffered);
        assert_eq!(k.pushed, Some(5e6));
        // In between: stay.
        let mixed = Interval {
            wait_share: 0.4,
            ..cpu_bound
        };
        assert_eq!(step(&samples(), Codec::Lz4, mixed, &UNKNOWN), Codec::Lz4);
        assert_eq!(
            step(&[], Codec::Lz4, link_bound(1e6, 1.0), &UNKNOWN),
            Codec::Lz4,
            "no sample"
        );
    }

    #[test]
    fn the_link_is_known_once_pushed() {
        let mut k = LinkKnowledge::default();
        assert!(k.estimate().is_infinite());
        k.add(&Interval {
            wait_share: 0.1,
            wire_rate: 50e6,
            cores: 1.0,
            queued_share: 0.0,
        });
        assert!(k.estimate().is_infinite(), "not pushed yet");
        k.add(&link_bound(40e6, 1.0));
        assert_eq!(k.estimate(), 50e6, "at least what was seen");
        k.add(&link_bound(120e6, 1.0));
        assert_eq!(k.estimate(), 120e6);
    }

    #[test]
    fn rescaling_follows_the_observed_ratio() {
        // The guest's pages turned out less compressible than sampled: lz4 saw 1.2x.
        let r = rescale(&samples(), Codec::Lz4, 1.2);
        assert!((r[1].ratio - 1.2).abs() < 1e-9);
        assert!((r[2].ratio - 1.35).abs() < 1e-9, "{r:?}");
        assert_eq!(r[0].ratio, 1.0);
        assert_eq!(rescale(&samples(), Codec::None, 1.0), samples());
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
        assert_eq!(Compression::Auto.initial(), Codec::Lz4);
    }
}
