//! Page compression codecs. A batch is compressed as one block; a block that does not
//! shrink travels raw (about 30% of real guest pages are incompressible).

use std::fmt;
use std::str::FromStr;

/// How a page batch's payload is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Codec {
    /// Raw page bytes.
    None,
    /// LZ4 block format (lz4_flex), fast, ~1.5x on mixed guest RAM.
    Lz4,
    /// Zstandard at the given level: 1..=19 (~1.8x at level 1 on guest RAM), or one of
    /// zstd's fast levels -1..=-5 (`--fast=N`: -1 gives ~1.75x at ~1.35x level 1's speed).
    Zstd { level: i32 },
}

/// Codec failures: bad names from users, bad blocks from peers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("unknown codec '{0}': expected none, lz4, zstd or zstd:LEVEL (1 to 19, or -1 to -5)")]
    UnknownName(String),
    #[error("zstd level {0} out of range: 1 to 19, or -1 to -5 (zstd's fast levels)")]
    BadLevel(i32),
    #[error("unknown codec id {0}")]
    UnknownId(u8),
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("decompressed {got} bytes, frame announced {expected}")]
    LengthMismatch { expected: usize, got: usize },
    #[error("compression failed: {0}")]
    Compress(String),
}

impl Codec {
    /// Default zstd level: level 1 moves the most pages per second per core.
    pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

    /// The zstd levels ferry accepts (0, zstd's "default", is refused: say 3). The fast
    /// levels trade ratio for speed (benches/RESULTS.md, ninth session: on the test guest's
    /// RAM, -1 gives 1.75x at 462 MB/s against level 1's 1.80x at 342 MB/s, one core).
    pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = -5..=19;

    /// The codec id byte used in page batch headers.
    pub fn id(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Zstd { .. } => 2,
        }
    }

    /// Codec from a header id byte (the level is not needed to decode zstd).
    pub fn from_id(id: u8) -> Result<Codec, CodecError> {
        match id {
            0 => Ok(Codec::None),
            1 => Ok(Codec::Lz4),
            2 => Ok(Codec::Zstd {
                level: Self::DEFAULT_ZSTD_LEVEL,
            }),
            other => Err(CodecError::UnknownId(other)),
        }
    }

    /// Compresses `raw`. Returns `None` when the result would not be smaller, in which
    /// case the caller sends the bytes raw.
    pub fn compress(self, raw: &[u8]) -> Result<Option<Vec<u8>>, CodecError> {
        let mut out = Vec::new();
        Ok(self.compress_append(raw, &mut out)?.then_some(out))
    }

    /// Appends `raw` compressed to `out` and returns true, or leaves `out` as it was and
    /// returns false when that would not save 3% (the caller then sends `raw` as it is).
    /// The sender compresses straight into the frame it sends: a separate buffer per 1 MiB
    /// batch cost an allocation, its page faults and a copy of the result.
    pub fn compress_append(self, raw: &[u8], out: &mut Vec<u8>) -> Result<bool, CodecError> {
        let start = out.len();
        let written = match self {
            Codec::None => return Ok(false),
            Codec::Lz4 => {
                out.resize(
                    start + lz4_flex::block::get_maximum_output_size(raw.len()),
                    0,
                );
                match lz4_flex::block::compress_into(raw, &mut out[start..]) {
                    Ok(n) => {
                        out.truncate(start + n);
                        n
                    }
                    Err(e) => {
                        out.truncate(start);
                        return Err(CodecError::Compress(e.to_string()));
                    }
                }
            }
            Codec::Zstd { level } => zstd_compress_append(raw, level, out)?,
        };
        // Keep a margin: a block that saves under 3% is not worth the decode time.
        if written + raw.len() / 32 >= raw.len() {
            out.truncate(start);
            Ok(false)
        } else {
            Ok(true)
        }
    }

    /// Decompresses `data` into exactly `out.len()` bytes.
    pub fn decompress_into(self, data: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        match self {
            Codec::None => {
                if data.len() != out.len() {
                    return Err(CodecError::LengthMismatch {
                        expected: out.len(),
                        got: data.len(),
                    });
                }
                out.copy_from_slice(data);
            }
            Codec::Lz4 => {
                let n = lz4_flex::block::decompress_into(data, out)
                    .map_err(|e| CodecError::Decompress(e.to_string()))?;
                if n != out.len() {
                    return Err(CodecError::LengthMismatch {
                        expected: out.len(),
                        got: n,
                    });
                }
            }
            Codec::Zstd { .. } => {
                let n = zstd_decompress(data, out)?;
                if n != out.len() {
                    return Err(CodecError::LengthMismatch {
                        expected: out.len(),
                        got: n,
                    });
                }
            }
        }
        Ok(())
    }
}

thread_local! {
    // One zstd context per thread, kept across batches: a context made per call costs its
    // allocation and table set-up on every 1 MiB batch.
    static ZSTD_CCTX: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD_DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// The room after a Vec's first `start` bytes, as zstd's output buffer: zstd writes the
/// compressed block there and the Vec grows by what it wrote.
struct VecTail<'a> {
    vec: &'a mut Vec<u8>,
    start: usize,
}

// SAFETY: `as_slice` covers only initialised bytes (those written past `start`), `capacity`
// and `as_mut_ptr` describe the Vec's own allocation past `start`, and `filled_until`
// exposes exactly the bytes zstd reports written.
unsafe impl zstd::zstd_safe::WriteBuf for VecTail<'_> {
    fn as_slice(&self) -> &[u8] {
        &self.vec[self.start..]
    }
    fn capacity(&self) -> usize {
        self.vec.capacity() - self.start
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: `start` is at most the Vec's length, inside its allocation.
        unsafe { self.vec.as_mut_ptr().add(self.start) }
    }
    unsafe fn filled_until(&mut self, n: usize) {
        // SAFETY: the caller (zstd) initialised `n` bytes from `as_mut_ptr`.
        unsafe { self.vec.set_len(self.start + n) }
    }
}

/// Compresses `raw` at the end of `out` (room for zstd's bound reserved first); returns
/// the bytes written.
fn zstd_compress_append(raw: &[u8], level: i32, out: &mut Vec<u8>) -> Result<usize, CodecError> {
    let err = |e: std::io::Error| CodecError::Compress(e.to_string());
    let start = out.len();
    out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
    ZSTD_CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ctx = match &mut *slot {
            Some((l, ctx)) if *l == level => ctx,
            _ => {
                &mut slot
                    .insert((level, zstd::bulk::Compressor::new(level).map_err(err)?))
                    .1
            }
        };
        ctx.compress_to_buffer(raw, &mut VecTail { vec: out, start })
            .map_err(err)
    })
}

fn zstd_decompress(data: &[u8], out: &mut [u8]) -> Result<usize, CodecError> {
    let err = |e: std::io::Error| CodecError::Decompress(e.to_string());
    ZSTD_DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ctx = match &mut *slot {
            Some(ctx) => ctx,
            None => slot.insert(zstd::bulk::Decompressor::new().map_err(err)?),
        };
        ctx.decompress_to_buffer(data, out).map_err(err)
    })
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::None => write!(f, "none"),
            Codec::Lz4 => write!(f, "lz4"),
            Codec::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

impl FromStr for Codec {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Codec, CodecError> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "none" | "raw" => Ok(Codec::None),
            "lz4" => Ok(Codec::Lz4),
            "zstd" => Ok(Codec::Zstd {
                level: Self::DEFAULT_ZSTD_LEVEL,
            }),
            other => {
                let level = other
                    .strip_prefix("zstd:")
                    .and_then(|l| l.parse::<i32>().ok())
                    .ok_or_else(|| CodecError::UnknownName(s.clone()))?;
                if !Self::ZSTD_LEVELS.contains(&level) || level == 0 {
                    return Err(CodecError::BadLevel(level));
                }
                Ok(Codec::Zstd { level })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names() {
        assert_eq!("none".parse::<Codec>(), Ok(Codec::None));
        assert_eq!("LZ4".parse::<Codec>(), Ok(Codec::Lz4));
        assert_eq!("zstd".parse::<Codec>(), Ok(Codec::Zstd { level: 1 }));
        assert_eq!("zstd:3".parse::<Codec>(), Ok(Codec::Zstd { level: 3 }));
        assert_eq!("zstd:0".parse::<Codec>(), Err(CodecError::BadLevel(0)));
        assert_eq!("zstd:-1".parse::<Codec>(), Ok(Codec::Zstd { level: -1 }));
        assert_eq!("zstd:-6".parse::<Codec>(), Err(CodecError::BadLevel(-6)));
        assert_eq!("zstd:20".parse::<Codec>(), Err(CodecError::BadLevel(20)));
        assert!(matches!(
            "gzip".parse::<Codec>(),
            Err(CodecError::UnknownName(_))
        ));
        assert!(matches!(
            "zstd:x".parse::<Codec>(),
            Err(CodecError::UnknownName(_))
        ));
    }

    #[test]
    fn display_round_trips() {
        for c in [
            Codec::None,
            Codec::Lz4,
            Codec::Zstd { level: 7 },
            Codec::Zstd { level: -2 },
        ] {
            assert_eq!(c.to_string().parse::<Codec>(), Ok(c));
        }
    }

    #[test]
    fn zstd_context_follows_the_level() {
        // The per-thread context is kept across calls and re-made when the level changes.
        let text: Vec<u8> = (0..65536u32)
            .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
            .collect();
        for level in [1, 3, 1, 19, 19] {
            let c = Codec::Zstd { level };
            let packed = c.compress(&text).unwrap().expect("compresses");
            let mut out = vec![0u8; text.len()];
            c.decompress_into(&packed, &mut out).unwrap();
            assert_eq!(out, text, "level {level}");
        }
        let one = Codec::Zstd { level: 1 }.compress(&text).unwrap().unwrap();
        let again = Codec::Zstd { level: 1 }.compress(&text).unwrap().unwrap();
        assert_eq!(one, again, "a reused context gives the same block");
    }

    /// `n` pseudo-random bytes (xorshift from `seed`): what no codec shrinks.
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn compress_round_trip_and_incompressible() {
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog "
            .iter()
            .cycle()
            .take(8192)
            .copied()
            .collect();
        for c in [
            Codec::Lz4,
            Codec::Zstd { level: 1 },
            Codec::Zstd { level: -1 },
        ] {
            let packed = c.compress(&text).unwrap().expect("text compresses");
            assert!(packed.len() < text.len() / 4);
            let mut out = vec![0u8; text.len()];
            c.decompress_into(&packed, &mut out).unwrap();
            assert_eq!(out, text);
        }
        // Pseudo-random bytes do not shrink: the codec says so.
        let noise = noise(8192, 0x9e3779b97f4a7c15);
        assert_eq!(Codec::Lz4.compress(&noise).unwrap(), None);
        assert_eq!(Codec::Zstd { level: 1 }.compress(&noise).unwrap(), None);
    }

    #[test]
    fn compress_append_keeps_what_was_there() {
        let text: Vec<u8> = b"pages of a guest, pages of a guest "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        let noise = noise(65536, 0x2545f4914f6cdd1d);
        for c in [
            Codec::Lz4,
            Codec::Zstd { level: -1 },
            Codec::Zstd { level: 3 },
        ] {
            let head = b"frame head".to_vec();
            // Compressible: appended after the head, decodes to the input.
            let mut out = head.clone();
            assert!(c.compress_append(&text, &mut out).unwrap(), "{c}");
            assert_eq!(&out[..head.len()], &head[..]);
            let packed = &out[head.len()..];
            assert!(packed.len() < text.len() / 4, "{c}: {}", packed.len());
            assert_eq!(Some(packed.to_vec()), c.compress(&text).unwrap(), "{c}");
            let mut back = vec![0u8; text.len()];
            c.decompress_into(packed, &mut back).unwrap();
            assert_eq!(back, text, "{c}");
            // Incompressible: false, and the head is all that is there.
            let mut out = head.clone();
            assert!(!c.compress_append(&noise, &mut out).unwrap(), "{c}");
            assert_eq!(out, head, "{c}");
        }
        let mut out = b"x".to_vec();
        assert!(!Codec::None.compress_append(&text, &mut out).unwrap());
        assert_eq!(out, b"x");
    }
}
