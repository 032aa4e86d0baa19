//! Support for ferry's micro-benchmarks (`benches/codecs.rs`): finding and loading the
//! guest RAM corpus that `scripts/capture-guest-ram.sh` writes, cutting its non-zero pages
//! into the batches ferry sends, and the codec ratio of a whole corpus.
//!
//! Run: `scripts/capture-guest-ram.sh --mix realistic,idle`, then
//! `cargo bench -p ferry-bench --bench codecs -- --warm-up-time 1 --measurement-time 3`.

use ferry_memory::{MemoryError, RamFile};
use ferry_wire::{Codec, CodecError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub use ferry_memory::PAGE_SIZE;

/// Pages per batch, as ferry sends them (`ferry-agent`'s `migration::pages::BATCH_PAGES`;
/// the agent is not a dependency of this crate, keep the two in step).
pub const BATCH_PAGES: usize = 256;
/// Bytes of raw pages in a full batch (1 MiB).
pub const BATCH_BYTES: usize = BATCH_PAGES * PAGE_SIZE;

/// Environment variable naming the corpus directory.
pub const CORPUS_ENV: &str = "FERRY_CORPUS_DIR";
/// The corpora the benchmarks look for, as `guest-ram-<name>.bin`.
pub const CORPORA: &[&str] = &["realistic", "idle"];

/// The codecs measured, with the names used in reports.
pub const CODECS: &[(&str, Codec)] = &[
    ("none", Codec::None),
    ("lz4", Codec::Lz4),
    ("zstd:-1", Codec::Zstd { level: -1 }),
    ("zstd:1", Codec::Zstd { level: 1 }),
    ("zstd:3", Codec::Zstd { level: 3 }),
];

/// The workspace root (two levels above this crate's manifest).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors().nth(2).unwrap_or(here).to_path_buf()
}

/// `$FERRY_CORPUS_DIR`, else `<repo>/build/corpus`.
pub fn corpus_dir() -> PathBuf {
    match std::env::var_os(CORPUS_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join("build").join("corpus"),
    }
}

/// `dir/guest-ram-<name>.bin`.
pub fn corpus_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("guest-ram-{name}.bin"))
}

/// Where the benchmarks write their own reports: `$CARGO_TARGET_DIR/ferry-bench`, else
/// `<repo>/target/ferry-bench`.
pub fn report_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join("target"),
    };
    target.join("ferry-bench")
}

/// The zero check ferry runs on every page it reads (one implementation, in ferry-memory).
pub use ferry_memory::is_zero_page;

/// A captured guest RAM file, mapped, with its non-zero pages copied out.
#[derive(Debug)]
pub struct Corpus {
    /// `realistic`, `idle`, ...
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// The file, mapped read-only.
    pub ram: RamFile,
    /// Its non-zero pages, concatenated in page order.
    pub pages: Vec<u8>,
}

impl Corpus {
    /// Maps `path` and copies out its non-zero pages.
    pub fn load(name: &str, path: &Path) -> Result<Corpus, MemoryError> {
        let ram = RamFile::open(path, false)?;
        let nonzero = ram.nonzero_pages()?;
        let mut pages = vec![0u8; nonzero.count() as usize * PAGE_SIZE];
        for (slot, idx) in pages.chunks_exact_mut(PAGE_SIZE).zip(nonzero.iter()) {
            ram.read_page(idx, slot)?;
        }
        Ok(Corpus {
            name: name.to_string(),
            path: path.to_path_buf(),
            ram,
            pages,
        })
    }

    /// Size of the RAM file (the guest's RAM) in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram.len()
    }

    /// Pages in the RAM file.
    pub fn total_pages(&self) -> u64 {
        self.ram.page_count()
    }

    /// Non-zero pages.
    pub fn nonzero_pages(&self) -> u64 {
        (self.pages.len() / PAGE_SIZE) as u64
    }

    /// The non-zero pages cut into full batches of [`BATCH_PAGES`]; the remainder (fewer
    /// than 256 pages) is left out, unless there is no full batch at all.
    pub fn batches(&self) -> Vec<&[u8]> {
        let full: Vec<&[u8]> = self.pages.chunks_exact(BATCH_BYTES).collect();
        if full.is_empty() && !self.pages.is_empty() {
            vec![&self.pages[..]]
        } else {
            full
        }
    }

    /// A copy of the RAM file in `/dev/shm` (else the temp directory) with *every* page
    /// written, zero pages included, so nothing is a hole: the worst case for a
    /// whole-file scan, and what a RAM file looks like after the guest touched all of
    /// its memory. The file is unlinked at once (the mapping keeps it alive), so nothing
    /// is left behind even if the benchmark is killed.
    pub fn dense_copy(&self) -> std::io::Result<RamFile> {
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!(
            "ferry-bench-{}-{}.ram",
            std::process::id(),
            self.name
        ));
        let made = (|| {
            let mut src = std::fs::File::open(&self.path)?;
            let mut dst = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = src.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                dst.write_all(&buf[..n])?;
            }
            dst.flush()?;
            RamFile::open(&path, false).map_err(std::io::Error::other)
        })();
        let _ = std::fs::remove_file(&path);
        made
    }
}

/// What a codec does to a corpus's batches, the way ferry sends them: a batch that does
/// not shrink by at least 3% travels raw (`Codec::compress` returns `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct CodecSummary {
    /// Codec name as in [`CODECS`].
    pub codec: String,
    /// Batches compressed.
    pub batches: usize,
    /// Batches that travel raw (did not shrink enough).
    pub raw_batches: usize,
    /// Raw page bytes.
    pub raw_bytes: u64,
    /// Payload bytes on the wire (compressed or raw).
    pub payload_bytes: u64,
}

impl CodecSummary {
    /// Raw bytes / payload bytes (ferry's `compression_ratio`).
    pub fn ratio(&self) -> f64 {
        if self.payload_bytes == 0 {
            1.0
        } else {
            self.raw_bytes as f64 / self.payload_bytes as f64
        }
    }
}

/// Each batch's compressed block, `None` where the batch travels raw.
pub type Blocks = Vec<Option<Vec<u8>>>;

/// Compresses every batch with `codec`; returns the summary and the blocks.
pub fn compress_all(
    name: &str,
    codec: Codec,
    batches: &[&[u8]],
) -> Result<(CodecSummary, Blocks), CodecError> {
    let mut s = CodecSummary {
        codec: name.to_string(),
        batches: batches.len(),
        raw_batches: 0,
        raw_bytes: 0,
        payload_bytes: 0,
    };
    let mut blocks = Vec::with_capacity(batches.len());
    for b in batches {
        let packed = codec.compress(b)?;
        s.raw_bytes += b.len() as u64;
        match &packed {
            Some(p) => s.payload_bytes += p.len() as u64,
            None => {
                s.raw_batches += 1;
                s.payload_bytes += b.len() as u64;
            }
        }
        blocks.push(packed);
    }
    Ok((s, blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_page(seed: u8) -> Vec<u8> {
        b"ferry moves guest pages over quic "
            .iter()
            .cycle()
            .take(PAGE_SIZE)
            .map(|c| c.wrapping_add(seed % 3))
            .collect()
    }

    #[test]
    fn loads_nonzero_pages_and_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = corpus_file(dir.path(), "t");
        let pages = 2 * BATCH_PAGES + 40;
        let mut img = vec![0u8; pages * PAGE_SIZE];
        let mut want = 0;
        for p in (0..pages).filter(|p| p % 3 != 0) {
            img[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(&text_page(p as u8));
            want += 1;
        }
        std::fs::write(&path, &img).expect("write");
        let c = Corpus::load("t", &path).expect("load");
        assert_eq!(c.total_pages(), pages as u64);
        assert_eq!(c.nonzero_pages(), want);
        assert!(c.pages.chunks_exact(PAGE_SIZE).all(|p| !is_zero_page(p)));
        let batches = c.batches();
        assert_eq!(batches.len(), want as usize / BATCH_PAGES);
        assert!(batches.iter().all(|b| b.len() == BATCH_BYTES));

        let dense = c.dense_copy().expect("dense copy");
        assert_eq!(dense.len(), c.ram_bytes());
        assert_eq!(dense.nonzero_pages().expect("scan").count(), want);
        assert_eq!(
            dense.fingerprint(1).expect("fp"),
            c.ram.fingerprint(2).expect("fp")
        );

        let (none, _) = compress_all("none", Codec::None, &batches).expect("none");
        assert_eq!(none.ratio(), 1.0);
        assert_eq!(none.raw_batches, batches.len());
        let (lz4, blocks) = compress_all("lz4", Codec::Lz4, &batches).expect("lz4");
        assert!(lz4.ratio() > 2.0, "{lz4:?}");
        let mut out = vec![0u8; BATCH_BYTES];
        Codec::Lz4
            .decompress_into(blocks[0].as_ref().expect("compressed"), &mut out)
            .expect("decompress");
        assert_eq!(&out[..], batches[0]);
    }

    #[test]
    fn zero_check() {
        assert!(is_zero_page(&[0u8; PAGE_SIZE]));
        let mut p = [0u8; PAGE_SIZE];
        p[PAGE_SIZE - 1] = 1;
        assert!(!is_zero_page(&p));
    }

    #[test]
    fn corpus_dir_default_is_under_build() {
        assert!(corpus_file(&workspace_root().join("build/corpus"), "idle")
            .ends_with("build/corpus/guest-ram-idle.bin"));
        assert!(workspace_root().join("crates/ferry-bench").is_dir());
    }
}
