//! Reading a (possibly sparse) image file: its data extents, and the non-zero chunks to send.
//!
//! Holes are found with `lseek(SEEK_DATA/SEEK_HOLE)` and never read. Data is read in
//! fixed-size chunks aligned to the chunk size (so a resumed transfer lines up with the
//! first one), and chunks that read as all zeros are not sent: the receiver's file is sparse
//! and already reads zeros there.
//!
//! Everything uses positioned reads (`pread`); the one thing that moves the file offset is
//! `lseek` for extents, so these readers do not share a `File` with code that relies on it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::DiskError;

/// The default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;

/// A byte range of a file that holds data (as opposed to a hole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub len: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The next data extent at or after `pos`, clamped to `len`; `None` if only holes remain.
/// Filesystems that cannot report holes make the whole rest one extent.
fn next_extent(file: &File, pos: u64, len: u64) -> io::Result<Option<Extent>> {
    if pos >= len {
        return Ok(None);
    }
    let fd = file.as_raw_fd();
    let Ok(off) = libc::off_t::try_from(pos) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // No data after `pos`.
            Some(libc::ENXIO) => Ok(None),
            // SEEK_DATA unsupported: treat everything as data.
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(Extent {
                offset: pos,
                len: len - pos,
            })),
            _ => Err(e),
        };
    }
    let data = data as u64;
    if data >= len {
        return Ok(None);
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
    let end = if hole < 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // The file shrank under us: what was there is gone.
            Some(libc::ENXIO) => return Ok(None),
            _ => return Err(e),
        }
    } else {
        (hole as u64).min(len)
    };
    if end <= data {
        return Ok(None);
    }
    Ok(Some(Extent {
        offset: data,
        len: end - data,
    }))
}

/// Iterator over the data extents of a file, in order.
#[derive(Debug)]
pub struct DataExtents {
    file: File,
    path: PathBuf,
    pos: u64,
    len: u64,
    done: bool,
}

impl DataExtents {
    /// The data extents of the file at `path`.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let file = File::open(path).map_err(|e| DiskError::io("open", path, e))?;
        Self::from_file(file, path)
    }

    /// The data extents of an open file (`path` names it in errors). Its length is taken now.
    pub fn from_file(file: File, path: &Path) -> Result<Self, DiskError> {
        let len = file
            .metadata()
            .map_err(|e| DiskError::io("stat", path, e))?
            .len();
        Ok(DataExtents {
            file,
            path: path.to_path_buf(),
            pos: 0,
            len,
            done: false,
        })
    }

    /// The file's length when it was opened.
    pub fn file_len(&self) -> u64 {
        self.len
    }
}

impl Iterator for DataExtents {
    type Item = Result<Extent, DiskError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match next_extent(&self.file, self.pos, self.len) {
            Ok(Some(ext)) => {
                self.pos = ext.end();
                Some(Ok(ext))
            }
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(DiskError::io("seek data in", &self.path, e)))
            }
        }
    }
}

/// A chunk of file content to send: `data.len()` bytes at `offset`, not all zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Offset in the file.
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// What a [`ChunkReader`] did with the range it covered.
///
/// `bytes_sent + bytes_zero + bytes_hole == position - resume_from`, and
/// `bytes_read == bytes_sent + bytes_zero`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkStats {
    /// Bytes read from the file.
    pub bytes_read: u64,
    /// Bytes returned in chunks.
    pub bytes_sent: u64,
    /// Bytes skipped without reading because they are holes.
    pub bytes_hole: u64,
    /// Bytes read but skipped because their chunk was all zeros.
    pub bytes_zero: u64,
    /// Chunks returned.
    pub chunks_sent: u64,
    /// Chunks read and skipped as all zeros.
    pub chunks_zero: u64,
}

/// Reads a file as aligned fixed-size chunks from `resume_from`, skipping holes and
/// all-zero chunks. Yields `Result<Chunk>`; stops at the first error.
#[derive(Debug)]
pub struct ChunkReader {
    file: File,
    path: PathBuf,
    len: u64,
    chunk_size: u64,
    pos: u64,
    resume_from: u64,
    /// The data extent containing or following `pos`, if known.
    extent: Option<Extent>,
    stats: ChunkStats,
    buf: Vec<u8>,
    done: bool,
}

impl ChunkReader {
    /// Read `path` from `resume_from` in [`DEFAULT_CHUNK_SIZE`] chunks.
    pub fn open(path: &Path, resume_from: u64) -> Result<Self, DiskError> {
        Self::with_chunk_size(path, resume_from, DEFAULT_CHUNK_SIZE)
    }

    /// Read `path` from `resume_from` in chunks of `chunk_size` bytes. Chunks are aligned to
    /// multiples of `chunk_size`; an unaligned `resume_from` makes the first one shorter.
    pub fn with_chunk_size(
        path: &Path,
        resume_from: u64,
        chunk_size: usize,
    ) -> Result<Self, DiskError> {
        if chunk_size == 0 {
            return Err(DiskError::InvalidChunkSize);
        }
        let file = File::open(path).map_err(|e| DiskError::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| DiskError::io("stat", path, e))?
            .len();
        if resume_from > len {
            return Err(DiskError::OutOfRange {
                path: path.to_path_buf(),
                offset: resume_from,
                len: 0,
                limit: len,
            });
        }
        Ok(ChunkReader {
            file,
            path: path.to_path_buf(),
            len,
            chunk_size: chunk_size as u64,
            pos: resume_from,
            resume_from,
            extent: None,
            stats: ChunkStats::default(),
            buf: vec![0; chunk_size],
            done: false,
        })
    }

    /// The file's length when it was opened: the length the receiver must expect.
    pub fn file_len(&self) -> u64 {
        self.len
    }

    /// Where the reader started.
    pub fn resume_from(&self) -> u64 {
        self.resume_from
    }

    /// How far the file has been covered: every non-zero byte below this offset has been
    /// returned. After the last chunk it is the file's length. A sender can report it so
    /// the receiver may checkpoint past trailing zeros.
    pub fn scanned_to(&self) -> u64 {
        self.pos
    }

    /// The counters so far.
    pub fn stats(&self) -> ChunkStats {
        self.stats
    }

    /// The next chunk, or `None` at the end.
    fn advance(&mut self) -> Result<Option<Chunk>, DiskError> {
        loop {
            if self.pos >= self.len {
                return Ok(None);
            }
            // Find the data at or after pos, reusing the extent we are in.
            let ext = match self.extent {
                Some(e) if e.end() > self.pos => e,
                _ => match next_extent(&self.file, self.pos, self.len)
                    .map_err(|e| DiskError::io("seek data in", &self.path, e))?
                {
                    Some(e) => {
                        self.extent = Some(e);
                        e
                    }
                    None => {
                        self.stats.bytes_hole += self.len - self.pos;
                        self.pos = self.len;
                        return Ok(None);
                    }
                },
            };
            let data_at = ext.offset.max(self.pos);
            // The chunk window holding data_at, not reaching back before pos.
            let window = data_at - data_at % self.chunk_size;
            let start = window.max(self.pos);
            let end = (window + self.chunk_size).min(self.len);
            self.stats.bytes_hole += start - self.pos;
            let n = (end - start) as usize;
            // A window may span holes after the extent; they read as zeros, which is fine.
            let buf = &mut self.buf[..n];
            self.file
                .read_exact_at(buf, start)
                .map_err(|e| DiskError::io("read", &self.path, e))?;
            self.stats.bytes_read += n as u64;
            self.pos = end;
            if is_zero(buf) {
                self.stats.bytes_zero += n as u64;
                self.stats.chunks_zero += 1;
                continue;
            }
            self.stats.bytes_sent += n as u64;
            self.stats.chunks_sent += 1;
            return Ok(Some(Chunk {
                offset: start,
                data: buf.to_vec(),
            }));
        }
    }
}

impl Iterator for ChunkReader {
    type Item = Result<Chunk, DiskError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.advance() {
            Ok(Some(c)) => Some(Ok(c)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Whether `buf` is all zeros. ORs 16-byte words in blocks of 256 bytes, which the compiler
/// vectorizes, and returns at the first non-zero block.
pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128; align_to only picks the aligned middle.
    let (head, words, tail) = unsafe { buf.align_to::<u128>() };
    if !head.iter().all(|b| *b == 0) || !tail.iter().all(|b| *b == 0) {
        return false;
    }
    words
        .chunks(16)
        .all(|block| block.iter().fold(0u128, |acc, w| acc | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    fn sparse_file(dir: &Path, len: u64, writes: &[(u64, &[u8])]) -> PathBuf {
        let p = dir.join("sparse.raw");
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        for (off, data) in writes {
            f.write_all_at(data, *off).unwrap();
        }
        f.sync_all().unwrap();
        p
    }

    #[test]
    fn zero_check() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        assert!(is_zero(&v[1..]));
        assert!(is_zero(&[]));
        for i in [0, 1, 15, 16, 255, 256, 4000, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            assert!(!is_zero(&v[..=i]), "prefix to {i}");
            v[i] = 0;
        }
    }

    #[test]
    fn extents_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 8192];
        let p = sparse_file(dir.path(), 128 * MIB, &[(0, &a), (64 * MIB, &b)]);
        let extents: Vec<Extent> = DataExtents::open(&p)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!extents.is_empty());
        let covers = |off: u64, len: u64| {
            extents
                .iter()
                .any(|e| e.offset <= off && off + len <= e.end())
        };
        assert!(covers(0, 4096), "{extents:?}");
        assert!(covers(64 * MIB, 8192), "{extents:?}");
        let total: u64 = extents.iter().map(|e| e.len).sum();
        assert!(total < 8 * MIB, "data {total} bytes: {extents:?}");
        for w in extents.windows(2) {
            assert!(w[0].end() <= w[1].offset, "{extents:?}");
        }
        assert!(extents.iter().all(|e| e.end() <= 128 * MIB && e.len > 0));
    }

    #[test]
    fn extents_of_empty_and_dense_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty");
        File::create(&p).unwrap();
        assert_eq!(DataExtents::open(&p).unwrap().count(), 0);
        let hole = sparse_file(dir.path(), 16 * MIB, &[]);
        assert_eq!(DataExtents::open(&hole).unwrap().count(), 0);
        let d = dir.path().join("dense");
        std::fs::write(&d, vec![9u8; 100_000]).unwrap();
        let ext: Vec<Extent> = DataExtents::open(&d)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            ext,
            [Extent {
                offset: 0,
                len: 100_000
            }]
        );
    }

    #[test]
    fn chunk_reader_skips_holes_and_zero_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![0x5au8; 1000];
        let zeros = vec![0u8; 3 * MIB as usize];
        let len = 32 * MIB + 12345; // a short last chunk
        let p = sparse_file(
            dir.path(),
            len,
            &[
                (10, &data),                // chunk 0
                (4 * MIB, &zeros),          // chunks 4..7: written zeros
                (8 * MIB + 5, &data[..1]),  // chunk 8
                (20 * MIB - 1, &data[..2]), // straddles chunks 19 and 20
                (32 * MIB + 100, &data),    // the short last chunk
            ],
        );
        let mut r = ChunkReader::open(&p, 0).unwrap();
        assert_eq!(r.file_len(), len);
        let chunks: Vec<Chunk> = r.by_ref().collect::<Result<_, _>>().unwrap();
        let offsets: Vec<u64> = chunks.iter().map(|c| c.offset).collect();
        assert_eq!(
            offsets,
            [0, 8 * MIB, 19 * MIB, 20 * MIB, 32 * MIB],
            "chunk offsets"
        );
        assert_eq!(chunks[4].data.len(), 12345);
        assert!(chunks[..4].iter().all(|c| c.data.len() == MIB as usize));
        assert_eq!(&chunks[0].data[10..1010], &data[..]);
        assert_eq!(chunks[1].data[5], 0x5a);

        let s = r.stats();
        assert_eq!(r.scanned_to(), len);
        assert_eq!(s.chunks_sent, 5);
        assert_eq!(s.bytes_sent, 4 * MIB + 12345);
        assert!(s.chunks_zero >= 3, "{s:?}");
        assert!(s.bytes_zero >= 3 * MIB, "{s:?}");
        assert!(s.bytes_hole >= 20 * MIB, "{s:?}");
        assert_eq!(s.bytes_read, s.bytes_sent + s.bytes_zero);
        assert_eq!(s.bytes_sent + s.bytes_zero + s.bytes_hole, len);
        assert!(r.next().is_none());
    }

    #[test]
    fn chunk_reader_resumes_and_aligns() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dense.raw");
        std::fs::write(&p, vec![1u8; 10 * 4096]).unwrap();
        // Unaligned resume: the first chunk runs to the next boundary.
        let mut r = ChunkReader::with_chunk_size(&p, 5000, 4096).unwrap();
        let chunks: Vec<Chunk> = r.by_ref().collect::<Result<_, _>>().unwrap();
        assert_eq!(chunks[0].offset, 5000);
        assert_eq!(chunks[0].data.len(), 8192 - 5000);
        assert_eq!(chunks[1].offset, 8192);
        assert_eq!(chunks.len(), 9);
        let s = r.stats();
        assert_eq!(s.bytes_sent + s.bytes_zero + s.bytes_hole, 10 * 4096 - 5000);

        // Resume at the very end: nothing to send.
        let mut r = ChunkReader::with_chunk_size(&p, 10 * 4096, 4096).unwrap();
        assert!(r.next().is_none());
        assert!(matches!(
            ChunkReader::with_chunk_size(&p, 10 * 4096 + 1, 4096),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            ChunkReader::with_chunk_size(&p, 0, 0),
            Err(DiskError::InvalidChunkSize)
        ));
    }

    #[test]
    fn sparse_file_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let p = sparse_file(dir.path(), 128 * MIB, &[(MIB, b"x")]);
        let blocks = std::fs::metadata(&p).unwrap().blocks();
        assert!(blocks * 512 < MIB, "{blocks} blocks");
    }
}
