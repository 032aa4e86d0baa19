//! [`RamFile`]: a QEMU guest RAM file (`memory-backend-file,share=on`, usually in /dev/shm)
//! mapped `MAP_SHARED` into the agent.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};
use memmap2::{MmapOptions, MmapRaw};

use crate::{DirtyBitmap, MemoryError, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;
/// Bytes copied out of the mapping per hasher update.
const HASH_CHUNK: usize = 1 << 20;
/// Smallest subtree one thread hashes in `digest_parallel`.
const MIN_PARALLEL_LEAF: u64 = 4 << 20;
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// A guest RAM file mapped `MAP_SHARED`.
///
/// QEMU (or the guest) writes this memory concurrently, so no `&[u8]` into the mapping ever
/// escapes: every accessor copies with raw pointer copies into caller buffers.
///
/// Holes: on tmpfs, *reading* a hole through a shared mapping allocates a page (shmem faults
/// allocate). [`nonzero_pages`](Self::nonzero_pages), [`digest`](Self::digest) and
/// [`digest_parallel`](Self::digest_parallel) therefore skip holes with `SEEK_DATA`/`SEEK_HOLE`
/// and never touch them; the per-page accessors do touch the page they are asked about.
///
/// Truncating the file while it is mapped would make accesses fault with SIGBUS; QEMU never
/// does that to its RAM file.
pub struct RamFile {
    file: File,
    map: MmapRaw,
    path: PathBuf,
    len: u64,
    writable: bool,
}

impl std::fmt::Debug for RamFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamFile")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

// `MmapRaw` is Send + Sync (it is only an address and a length) and `File` is too, so
// `RamFile` is Send + Sync without any `unsafe impl`: concurrent accessors only do raw-pointer
// copies into/out of the shared mapping, which is exactly what another process does to it anyway.

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> MemoryError {
    MemoryError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl RamFile {
    /// Map an existing RAM file. Its size must be a non-zero multiple of [`PAGE_SIZE`].
    pub fn open(path: impl AsRef<Path>, writable: bool) -> Result<Self, MemoryError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| io_err("open", path, e))?;
        let len = file.metadata().map_err(|e| io_err("stat", path, e))?.len();
        Self::map(file, path, len, writable)
    }

    /// Create a new sparse RAM file of `size_bytes` (a non-zero multiple of [`PAGE_SIZE`]) and
    /// map it writable. Fails if the file already exists.
    pub fn create(path: impl AsRef<Path>, size_bytes: u64) -> Result<Self, MemoryError> {
        let path = path.as_ref();
        if size_bytes == 0 || size_bytes % PAGE != 0 {
            return Err(MemoryError::BadSize {
                path: path.to_path_buf(),
                len: size_bytes,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| io_err("create", path, e))?;
        let made = file
            .set_len(size_bytes)
            .map_err(|e| io_err("set_len", path, e))
            .and_then(|()| Self::map(file, path, size_bytes, true));
        if made.is_err() {
            // Do not leave a half-made RAM file behind for the next attempt to trip over.
            let _ = std::fs::remove_file(path);
        }
        made
    }

    /// Allocates every page of the file that is not allocated yet (`fallocate`), so that
    /// no later write or first touch can fail for want of room (ENOSPC, or SIGBUS through
    /// a mapping). Safe to run while pages are being written: it only fills holes. On
    /// tmpfs the allocated pages still read as holes (`SEEK_DATA`), so scans skip them.
    ///
    /// Works in 16 MiB steps: tmpfs holds the file's lock for a whole `fallocate`, and
    /// writes of pages arriving meanwhile (`store_pages`) wait for it (240 ms per GiB here).
    pub fn reserve(&self) -> Result<(), MemoryError> {
        const STEP: u64 = 16 << 20;
        self.check_writable()?;
        let mut off = 0;
        while off < self.len {
            let n = STEP.min(self.len - off);
            // SAFETY: a valid fd; fallocate only allocates blocks of the open file.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    0,
                    off as libc::off_t,
                    n as libc::off_t,
                )
            };
            if r != 0 {
                return Err(io_err(
                    "allocate",
                    &self.path,
                    std::io::Error::last_os_error(),
                ));
            }
            off += n;
        }
        Ok(())
    }

    fn map(file: File, path: &Path, len: u64, writable: bool) -> Result<Self, MemoryError> {
        if len == 0 || len % PAGE != 0 || usize::try_from(len).is_err() {
            return Err(MemoryError::BadSize {
                path: path.to_path_buf(),
                len,
            });
        }
        let mut opts = MmapOptions::new();
        opts.len(len as usize);
        let map = if writable {
            opts.map_raw(&file)
        } else {
            opts.map_raw_read_only(&file)
        }
        .map_err(|e| io_err("mmap", path, e))?;
        Ok(RamFile {
            file,
            map,
            path: path.to_path_buf(),
            len,
            writable,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always `false` (empty RAM files are refused); present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size in pages.
    pub fn page_count(&self) -> u64 {
        self.len / PAGE
    }

    /// The file's path as given to `open`/`create`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the mapping is writable.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Address of the mapping in this process (for attaching a tracker to our own mapping).
    pub fn mapping_addr(&self) -> usize {
        self.map.as_ptr() as usize
    }

    fn check_range(&self, first: u64, count: u64) -> Result<(), MemoryError> {
        let pages = self.page_count();
        match first.checked_add(count) {
            Some(end) if first < pages && end <= pages => Ok(()),
            _ => Err(MemoryError::PageOutOfRange { idx: first, pages }),
        }
    }

    fn check_writable(&self) -> Result<(), MemoryError> {
        if self.writable {
            Ok(())
        } else {
            Err(MemoryError::ReadOnly {
                path: self.path.clone(),
            })
        }
    }

    fn page_ptr(&self, idx: u64) -> *mut u8 {
        // In range by the callers' check_range; idx * PAGE < len <= usize::MAX.
        self.map.as_mut_ptr().wrapping_add((idx * PAGE) as usize)
    }

    /// Copy page `idx` into `buf` (exactly [`PAGE_SIZE`] bytes).
    pub fn read_page(&self, idx: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if buf.len() != PAGE_SIZE {
            return Err(MemoryError::BufferSize {
                expected: PAGE_SIZE,
                got: buf.len(),
            });
        }
        self.read_pages(idx, buf)
    }

    /// Copy `buf.len() / PAGE_SIZE` pages starting at `first_idx` into `buf`, whose length must
    /// be a non-zero multiple of [`PAGE_SIZE`].
    pub fn read_pages(&self, first_idx: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if buf.is_empty() || buf.len() % PAGE_SIZE != 0 {
            return Err(MemoryError::BufferSize {
                expected: buf.len().div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE,
                got: buf.len(),
            });
        }
        self.check_range(first_idx, (buf.len() / PAGE_SIZE) as u64)?;
        // SAFETY: the source range lies inside the live mapping (checked above) and cannot
        // overlap `buf`, which is Rust-owned memory. A plain copy (no reference into the shared
        // memory) is the right tool for memory another process may be writing.
        unsafe {
            std::ptr::copy_nonoverlapping(self.page_ptr(first_idx), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Appends a copy of page `idx` to `out` (one copy, into `out`'s spare capacity).
    pub fn append_page(&self, idx: u64, out: &mut Vec<u8>) -> Result<(), MemoryError> {
        self.check_range(idx, 1)?;
        out.reserve(PAGE_SIZE);
        let len = out.len();
        // SAFETY: the source page lies inside the live mapping (checked above) and cannot
        // overlap `out`'s buffer; `reserve` made room for PAGE_SIZE more bytes, which the
        // copy initialises before `set_len` exposes them.
        unsafe {
            std::ptr::copy_nonoverlapping(self.page_ptr(idx), out.as_mut_ptr().add(len), PAGE_SIZE);
            out.set_len(len + PAGE_SIZE);
        }
        Ok(())
    }

    /// Overwrite page `idx` with `data` (exactly [`PAGE_SIZE`] bytes).
    pub fn write_page(&self, idx: u64, data: &[u8]) -> Result<(), MemoryError> {
        if data.len() != PAGE_SIZE {
            return Err(MemoryError::BufferSize {
                expected: PAGE_SIZE,
                got: data.len(),
            });
        }
        self.write_pages(idx, data)
    }

    /// Overwrite `data.len() / PAGE_SIZE` pages starting at `first_idx`; `data.len()` must be a
    /// non-zero multiple of [`PAGE_SIZE`].
    pub fn write_pages(&self, first_idx: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.check_write(first_idx, data)?;
        self.copy_in(first_idx, data);
        Ok(())
    }

    /// `data` is whole pages, the file writable and the pages inside it.
    fn check_write(&self, first_idx: u64, data: &[u8]) -> Result<(), MemoryError> {
        if data.is_empty() || data.len() % PAGE_SIZE != 0 {
            return Err(MemoryError::BufferSize {
                expected: data.len().div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE,
                got: data.len(),
            });
        }
        self.check_writable()?;
        self.check_range(first_idx, (data.len() / PAGE_SIZE) as u64)
    }

    fn copy_in(&self, first_idx: u64, data: &[u8]) {
        // SAFETY: destination inside the live, writable mapping (checked by the callers);
        // source is a Rust slice that cannot overlap a mapping we never hand out.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.page_ptr(first_idx), data.len())
        };
    }

    /// Like [`write_pages`](Self::write_pages), but through the file (`pwrite`) rather than
    /// through this process's mapping: on tmpfs that fills the page cache without faulting
    /// each page into our page tables (0.2 against 0.45-0.9 CPU-s per GiB measured here).
    /// For a receiver: a write-tracker armed on this mapping does not see these writes.
    /// Where the file system has no `write` (hugetlbfs) it falls back to the mapping.
    pub fn store_pages(&self, first_idx: u64, data: &[u8]) -> Result<(), MemoryError> {
        use std::os::unix::fs::FileExt;
        self.check_write(first_idx, data)?;
        match self.file.write_all_at(data, first_idx * PAGE) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.copy_in(first_idx, data);
                Ok(())
            }
            Err(e) => Err(io_err("write", &self.path, e)),
        }
    }

    /// [`store_pages`](Self::store_pages) of one page of zeros.
    pub fn store_zero_page(&self, idx: u64) -> Result<(), MemoryError> {
        self.store_pages(idx, &ZEROS[..PAGE_SIZE])
    }

    /// Fill page `idx` with zeros.
    pub fn zero_page(&self, idx: u64) -> Result<(), MemoryError> {
        self.check_writable()?;
        self.check_range(idx, 1)?;
        // SAFETY: in-range page of the live writable mapping.
        unsafe { std::ptr::write_bytes(self.page_ptr(idx), 0, PAGE_SIZE) };
        Ok(())
    }

    /// Whether page `idx` is all zeros (compared 64 bytes at a time as u64 words).
    ///
    /// Touches the page: on a tmpfs hole this allocates it. Prefer
    /// [`nonzero_pages`](Self::nonzero_pages) for whole-file scans.
    pub fn is_zero_page(&self, idx: u64) -> Result<bool, MemoryError> {
        self.check_range(idx, 1)?;
        // SAFETY: in-range page of the live mapping; page-aligned, so u64-aligned.
        Ok(unsafe { is_zero_raw(self.page_ptr(idx), PAGE_SIZE) })
    }

    /// Every page that is not all zeros. Holes are skipped without being touched.
    pub fn nonzero_pages(&self) -> Result<DirtyBitmap, MemoryError> {
        self.nonzero_pages_parallel(1)
    }

    /// [`nonzero_pages`](Self::nonzero_pages) on up to `threads` threads, each taking
    /// 64 MiB chunks of the file in turn: the scan reads every allocated zero page whole
    /// (56-75 ms for a 1 GiB guest on a busy host) and sits between Prepare and round 0's
    /// first page once the target prepares faster than it.
    pub fn nonzero_pages_parallel(&self, threads: usize) -> Result<DirtyBitmap, MemoryError> {
        // Whole bitmap words per chunk, so threads fill disjoint words.
        const CHUNK_PAGES: u64 = 16 * 1024;
        let pages = self.page_count();
        let chunks = pages.div_ceil(CHUNK_PAGES);
        let threads = threads.clamp(1, chunks.max(1) as usize);
        let mut bm = DirtyBitmap::new(pages);
        let work: std::sync::Mutex<Vec<(u64, &mut [u64])>> = std::sync::Mutex::new(
            bm.words_mut()
                .chunks_mut((CHUNK_PAGES / 64) as usize)
                .enumerate()
                .map(|(i, w)| (i as u64 * CHUNK_PAGES, w))
                .rev()
                .collect(),
        );
        let worker = || loop {
            let next = work.lock().map(|mut w| w.pop()).unwrap_or(None);
            let Some((first, words)) = next else {
                return;
            };
            let end = (first + CHUNK_PAGES).min(pages);
            self.for_each_segment(first * PAGE, end * PAGE, |start, stop, is_data| {
                if !is_data {
                    return;
                }
                for idx in start / PAGE..stop.div_ceil(PAGE).min(end) {
                    // SAFETY: segments lie inside 0..len, so idx is an in-range page.
                    if !unsafe { is_zero_raw(self.page_ptr(idx), PAGE_SIZE) } {
                        let bit = idx - first;
                        words[(bit / 64) as usize] |= 1u64 << (bit % 64);
                    }
                }
            });
        };
        if threads == 1 {
            worker();
        } else {
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(worker);
                }
            });
        }
        Ok(bm)
    }

    /// BLAKE3 of the whole file content (holes hash as zeros, without being touched).
    pub fn digest(&self) -> Result<blake3::Hash, MemoryError> {
        let mut hasher = blake3::Hasher::new();
        self.hash_range(&mut hasher, 0, self.len);
        Ok(hasher.finalize())
    }

    /// Same value as [`digest`](Self::digest), computed by up to `threads` threads hashing
    /// disjoint BLAKE3 subtrees (via `blake3::hazmat`) and merging them.
    pub fn digest_parallel(&self, threads: usize) -> Result<blake3::Hash, MemoryError> {
        let leaf = (self.len / (threads.max(1) as u64 * 4)).max(MIN_PARALLEL_LEAF);
        self.digest_tree(threads, leaf)
    }

    fn digest_tree(&self, threads: usize, leaf_max: u64) -> Result<blake3::Hash, MemoryError> {
        if threads <= 1 || self.len <= leaf_max {
            return self.digest();
        }
        // Split with left_subtree_len, which always yields valid BLAKE3 subtrees.
        enum Node {
            Leaf(usize),
            Parent(Box<Node>, Box<Node>),
        }
        fn build(start: u64, len: u64, leaf_max: u64, leaves: &mut Vec<(u64, u64)>) -> Node {
            if len <= leaf_max {
                leaves.push((start, len));
                Node::Leaf(leaves.len() - 1)
            } else {
                let left = hazmat::left_subtree_len(len);
                Node::Parent(
                    Box::new(build(start, left, leaf_max, leaves)),
                    Box::new(build(start + left, len - left, leaf_max, leaves)),
                )
            }
        }
        fn cv(node: &Node, cvs: &[ChainingValue]) -> ChainingValue {
            match node {
                Node::Leaf(i) => cvs[*i],
                Node::Parent(l, r) => {
                    hazmat::merge_subtrees_non_root(&cv(l, cvs), &cv(r, cvs), Mode::Hash)
                }
            }
        }
        let mut leaves = Vec::new();
        let root = build(0, self.len, leaf_max, &mut leaves);

        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut cvs: Vec<ChainingValue> = vec![[0; 32]; leaves.len()];
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads.min(leaves.len()))
                .map(|_| {
                    s.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&(start, len)) = leaves.get(i) else {
                                break;
                            };
                            let mut h = blake3::Hasher::new();
                            h.set_input_offset(start);
                            self.hash_range(&mut h, start, start + len);
                            done.push((i, h.finalize_non_root()));
                        }
                        done
                    })
                })
                .collect();
            for w in workers {
                // A worker only panics if blake3 asserts, i.e. a bug in the split above:
                // re-raise it rather than return a wrong digest.
                match w.join() {
                    Ok(done) => done.into_iter().for_each(|(i, c)| cvs[i] = c),
                    Err(p) => std::panic::resume_unwind(p),
                }
            }
        });
        match &root {
            Node::Parent(l, r) => Ok(hazmat::merge_subtrees_root(
                &cv(l, &cvs),
                &cv(r, &cvs),
                Mode::Hash,
            )),
            // len > leaf_max, so the root is always split.
            Node::Leaf(_) => self.digest(),
        }
    }

    /// Feed bytes `start..end` to `hasher`: data copied out in chunks, holes as zeros.
    fn hash_range(&self, hasher: &mut blake3::Hasher, start: u64, end: u64) {
        let mut buf = vec![0u8; HASH_CHUNK];
        self.for_each_segment(start, end, |s, e, is_data| {
            let mut pos = s;
            while pos < e {
                if is_data {
                    let n = ((e - pos) as usize).min(HASH_CHUNK);
                    // SAFETY: pos..pos+n lies inside the mapping (segments are clamped to
                    // 0..len) and buf is Rust-owned with room for n bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.map.as_ptr().add(pos as usize),
                            buf.as_mut_ptr(),
                            n,
                        )
                    };
                    hasher.update(&buf[..n]);
                    pos += n as u64;
                } else {
                    let n = ((e - pos) as usize).min(ZEROS.len());
                    hasher.update(&ZEROS[..n]);
                    pos += n as u64;
                }
            }
        });
    }

    /// Walk `start..end` (page aligned) as alternating hole / data segments found with
    /// `SEEK_DATA`/`SEEK_HOLE`. If the filesystem cannot tell, everything is data.
    /// `lseek` moves the shared file offset, which nothing else here uses.
    fn for_each_segment(&self, start: u64, end: u64, mut f: impl FnMut(u64, u64, bool)) {
        let fd = self.file.as_raw_fd();
        let mut pos = start;
        while pos < end {
            // SAFETY: lseek on an fd we own; no memory is passed.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let enxio = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
                // ENXIO: only a hole up to EOF. Anything else: no hole support, treat as data.
                f(pos, end, !enxio);
                return;
            }
            // Round down to a page: segments must be page aligned for the page-based callers.
            let data = ((data as u64) / PAGE * PAGE).clamp(pos, end);
            if data > pos {
                f(pos, data, false);
            }
            if data >= end {
                return;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64)
                    .div_ceil(PAGE)
                    .saturating_mul(PAGE)
                    .clamp(data + PAGE, end)
            };
            f(data, hole, true);
            pos = hole;
        }
    }
}

/// Whether `len` bytes at `p` are zero. `p` must be 8-byte aligned and `len` a multiple of 64.
///
/// # Safety
/// `p..p+len` must be readable for the duration of the call.
unsafe fn is_zero_raw(p: *const u8, len: usize) -> bool {
    let w = p as *const u64;
    let words = len / 8;
    let mut i = 0;
    while i < words {
        // OR 8 words (one cache line) before branching: cheap and vectorizable.
        let mut acc = 0u64;
        for j in 0..8 {
            acc |= w.add(i + j).read();
        }
        if acc != 0 {
            return false;
        }
        i += 8;
    }
    true
}

/// Pages per unit of work of [`RamFile::fingerprint`] (64 MiB), hashed in parallel.
const FINGERPRINT_CHUNK_PAGES: u64 = 16 * 1024;

/// The fingerprint's view of one page: 0 for an all-zero page (or a hole), else the page's
/// XXH3-128. [`RamFile::fingerprint`] adds up every page's term (its index and sum), so a side
/// that knows its pages' sums (the target, which wrote every page itself) can compute the
/// same fingerprint without reading its RAM again: see [`PageSums`].
pub fn page_sum(page: &[u8]) -> u128 {
    if is_zero_page(page) {
        0
    } else {
        twox_hash::XxHash3_128::oneshot(page)
    }
}

/// One page's term of the fingerprint: 0 for a zero page (sum 0), else the XXH3-128 of the
/// page's index and sum, so the same bytes at another index give another term.
fn page_term(page: u64, sum: u128) -> u128 {
    if sum == 0 {
        return 0;
    }
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&page.to_le_bytes());
    b[8..].copy_from_slice(&sum.to_le_bytes());
    twox_hash::XxHash3_128::oneshot(&b)
}

/// The running total of page terms: two 64-bit lanes, each a sum modulo 2^64. A sum (not
/// a hash chain in page order) so that replacing one page's term costs O(1): the total
/// over every page is kept up to date as pages are written, and the guest's pause reads it
/// instead of passing over a sum per page of RAM (5-6 ms for 4 GiB, measured in a pause
/// of ~50 ms). The lanes are independent, so concurrent writers of different pages add
/// their changes without a lock.
#[derive(Default)]
struct TermTotal {
    lo: std::sync::atomic::AtomicU64,
    hi: std::sync::atomic::AtomicU64,
}

impl TermTotal {
    /// Adds `add` and takes away `sub` (both page terms).
    fn replace(&self, sub: u128, add: u128) {
        use std::sync::atomic::Ordering::Relaxed;
        if sub == add {
            return;
        }
        let (a_lo, a_hi) = (add as u64, (add >> 64) as u64);
        let (s_lo, s_hi) = (sub as u64, (sub >> 64) as u64);
        self.lo.fetch_add(a_lo.wrapping_sub(s_lo), Relaxed);
        self.hi.fetch_add(a_hi.wrapping_sub(s_hi), Relaxed);
    }

    /// The fingerprint of `pages` pages whose terms add up to this total.
    fn fingerprint(&self, pages: u64) -> u128 {
        use std::sync::atomic::Ordering::Relaxed;
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&pages.to_le_bytes());
        b[8..16].copy_from_slice(&self.lo.load(Relaxed).to_le_bytes());
        b[16..].copy_from_slice(&self.hi.load(Relaxed).to_le_bytes());
        twox_hash::XxHash3_128::oneshot(&b)
    }
}

/// Per-page fingerprint sums kept up to date by whoever writes the pages (the migration
/// target; the source for what it sends), with the fingerprint's running total beside
/// them: reading the fingerprint in the guest's pause costs O(1), not a pass over the RAM
/// or over a sum per page. Pages start as zero (a fresh, sparse RAM file). One writer per
/// page at a time (pages of a region travel on one stream, applied in order).
pub struct PageSums {
    lo: Vec<std::sync::atomic::AtomicU64>,
    hi: Vec<std::sync::atomic::AtomicU64>,
    total: TermTotal,
}

impl PageSums {
    /// Sums for `pages` pages, all zero.
    pub fn new(pages: u64) -> Self {
        let n = pages as usize;
        PageSums {
            lo: (0..n)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            hi: (0..n)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            total: TermTotal::default(),
        }
    }

    /// Records the content just written to `page` (ignored beyond the end).
    pub fn set(&self, page: u64, content: &[u8]) {
        self.set_sum(page, page_sum(content));
    }

    /// Records the content of a page known not to be all zero (the caller just checked):
    /// saves the zero check [`PageSums::set`] would repeat.
    pub fn set_nonzero(&self, page: u64, content: &[u8]) {
        self.set_sum(page, twox_hash::XxHash3_128::oneshot(content));
    }

    /// Records that `page` is now all zero.
    pub fn set_zero(&self, page: u64) {
        self.set_sum(page, 0);
    }

    /// Records `sum` (from [`page_sum`]) for `page`. One writer per page at a time: two
    /// writers of one page could tear its two halves and leave the running total wrong
    /// for good (the fingerprints would then differ: a refused commit, never a false one).
    pub fn set_sum(&self, page: u64, sum: u128) {
        use std::sync::atomic::Ordering::Relaxed;
        if let (Some(lo), Some(hi)) = (self.lo.get(page as usize), self.hi.get(page as usize)) {
            let old = u128::from(lo.swap(sum as u64, Relaxed))
                | (u128::from(hi.swap((sum >> 64) as u64, Relaxed)) << 64);
            if old != sum {
                self.total
                    .replace(page_term(page, old), page_term(page, sum));
            }
        }
    }

    /// The sum recorded for `page` (0 beyond the end).
    pub fn get(&self, page: u64) -> u128 {
        use std::sync::atomic::Ordering::Relaxed;
        match (self.lo.get(page as usize), self.hi.get(page as usize)) {
            (Some(lo), Some(hi)) => {
                u128::from(lo.load(Relaxed)) | (u128::from(hi.load(Relaxed)) << 64)
            }
            _ => 0,
        }
    }

    /// Pages in `first..end` whose content in `ram` no longer matches the recorded sum,
    /// leaving out the pages `skip` holds (pages whose new copy is on its way). The
    /// source's audit of its write tracker: a page the tracker calls clean must still read
    /// what was sent. Holes read as zero without being touched.
    pub fn mismatches(
        &self,
        ram: &RamFile,
        first: u64,
        end: u64,
        skip: &crate::DirtyBitmap,
    ) -> Vec<u64> {
        let end = end.min(ram.page_count()).min(self.lo.len() as u64);
        if first >= end {
            return Vec::new();
        }
        let mut now = vec![0u128; (end - first) as usize];
        ram.page_sums(first, end, &mut now);
        (first..end)
            .zip(now)
            .filter(|&(p, sum)| !skip.get(p) && sum != self.get(p))
            .map(|(p, _)| p)
            .collect()
    }

    /// Number of pages covered.
    pub fn len(&self) -> u64 {
        self.lo.len() as u64
    }

    /// Whether no page is covered.
    pub fn is_empty(&self) -> bool {
        self.lo.is_empty()
    }

    /// The fingerprint [`RamFile::fingerprint`] would compute over pages with these
    /// contents, in O(1). Call once every writer is done (their completion must
    /// happen-before).
    pub fn fingerprint(&self) -> u128 {
        self.total.fingerprint(self.len())
    }
}

impl RamFile {
    /// A 128-bit XXH3 fingerprint of the file's *content*: the XXH3-128 of every non-zero
    /// page (0 for zero pages and holes, which are skipped without reading), each bound to
    /// its page index and added up — see [`page_sum`]. With `--verify full` it runs while
    /// the guest is paused: the source scans its whole RAM (this is what catches a write
    /// the tracker missed); the target keeps [`PageSums`] and their total as it writes.
    /// Not cryptographic: it detects accidental differences, not forgeries; the peers are
    /// already authenticated. Independent of `threads`.
    pub fn fingerprint(&self, threads: usize) -> Result<u128, MemoryError> {
        let pages = self.page_count();
        let chunks = pages.div_ceil(FINGERPRINT_CHUNK_PAGES).max(1);
        let next = std::sync::atomic::AtomicU64::new(0);
        let total = TermTotal::default();
        std::thread::scope(|s| {
            for _ in 0..threads.clamp(1, chunks as usize) {
                s.spawn(|| {
                    let mut sums = vec![0u128; FINGERPRINT_CHUNK_PAGES as usize];
                    // This worker's share of the total, added once at the end.
                    let (mut lo, mut hi) = (0u64, 0u64);
                    loop {
                        let c = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if c >= chunks {
                            total.replace(0, u128::from(lo) | (u128::from(hi) << 64));
                            return;
                        }
                        let first = c * FINGERPRINT_CHUNK_PAGES;
                        let end = (first + FINGERPRINT_CHUNK_PAGES).min(pages);
                        let part = &mut sums[..(end - first) as usize];
                        part.fill(0);
                        self.page_sums(first, end, part);
                        for (p, &sum) in (first..end).zip(part.iter()) {
                            let t = page_term(p, sum);
                            lo = lo.wrapping_add(t as u64);
                            hi = hi.wrapping_add((t >> 64) as u64);
                        }
                    }
                });
            }
        });
        Ok(total.fingerprint(pages))
    }

    /// Sums of pages `first..end` into `out` (indexed from `first`); holes stay 0.
    fn page_sums(&self, first: u64, end: u64, out: &mut [u128]) {
        // Copied out in pieces that stay in the core's cache for the hashing that follows.
        const PIECE: usize = 64 * 1024;
        let mut buf = vec![0u8; PIECE];
        self.for_each_segment(first * PAGE, end * PAGE, |s, e, is_data| {
            if !is_data {
                return;
            }
            let mut pos = s;
            while pos < e {
                let n = ((e - pos) as usize).min(PIECE);
                // SAFETY: pos..pos+n lies inside the mapping (segments are clamped to the
                // requested range) and buf is Rust-owned with room for n bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.map.as_ptr().add(pos as usize),
                        buf.as_mut_ptr(),
                        n,
                    )
                };
                for (i, page) in buf[..n].chunks_exact(PAGE_SIZE).enumerate() {
                    let idx = (pos / PAGE - first) as usize + i;
                    if let Some(slot) = out.get_mut(idx) {
                        *slot = page_sum(page);
                    }
                }
                pos += n as u64;
            }
        });
    }
}

/// Whether a buffer (a page, or several) is all zeros. One cache line is OR-ed together
/// before each branch: cheap and vectorisable. The one zero check ferry uses on copies of
/// guest pages (the page sender, the fingerprint, the benchmarks).
pub fn is_zero_page(buf: &[u8]) -> bool {
    let mut lines = buf.chunks_exact(64);
    for line in &mut lines {
        let mut acc = 0u64;
        for w in line.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().unwrap_or([0xff; 8]));
        }
        if acc != 0 {
            return false;
        }
    }
    lines.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn shm_dir() -> tempfile::TempDir {
        // /dev/shm is tmpfs like QEMU's RAM files; fall back to the default temp dir.
        tempfile::Builder::new()
            .prefix("ferry-mem-test")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap()
    }

    fn page_of(b: u8) -> Vec<u8> {
        (0..PAGE_SIZE).map(|i| b.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn create_write_read() {
        let dir = shm_dir();
        let p = dir.path().join("ram");
        let ram = RamFile::create(&p, 16 * PAGE).unwrap();
        assert_eq!(ram.len(), 16 * PAGE);
        assert_eq!(ram.page_count(), 16);
        assert_eq!(ram.path(), p.as_path());
        assert!(
            RamFile::create(&p, 16 * PAGE).is_err(),
            "create must fail if the file exists"
        );

        let data = page_of(7);
        ram.write_page(3, &data).unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        ram.read_page(3, &mut buf).unwrap();
        assert_eq!(buf, data);

        let mut two = vec![0u8; 2 * PAGE_SIZE];
        ram.read_pages(2, &mut two).unwrap();
        assert!(two[..PAGE_SIZE].iter().all(|&b| b == 0));
        assert_eq!(&two[PAGE_SIZE..], &data[..]);

        // Visible through a second, independent mapping (MAP_SHARED).
        let ro = RamFile::open(&p, false).unwrap();
        ro.read_page(3, &mut buf).unwrap();
        assert_eq!(buf, data);
        assert!(matches!(
            ro.write_page(3, &data),
            Err(MemoryError::ReadOnly { .. })
        ));
        assert!(matches!(ro.zero_page(3), Err(MemoryError::ReadOnly { .. })));

        // Appending copies the page after what the buffer already holds.
        let mut out = vec![9u8; 3];
        ram.append_page(3, &mut out).unwrap();
        assert_eq!(out.len(), 3 + PAGE_SIZE);
        assert_eq!(&out[..3], &[9, 9, 9]);
        assert_eq!(&out[3..], &data[..]);
        assert!(matches!(
            ram.append_page(16, &mut out),
            Err(MemoryError::PageOutOfRange { .. })
        ));
        assert_eq!(out.len(), 3 + PAGE_SIZE, "a refused append adds nothing");

        ram.zero_page(3).unwrap();
        assert!(ram.is_zero_page(3).unwrap());

        // Stored through the file: visible in both mappings made before the write.
        let more = page_of(11);
        ram.store_pages(5, &more).unwrap();
        ro.read_page(5, &mut buf).unwrap();
        assert_eq!(buf, more);
        ram.read_page(5, &mut buf).unwrap();
        assert_eq!(buf, more);
        ram.store_zero_page(5).unwrap();
        assert!(ram.is_zero_page(5).unwrap());
        ro.read_page(5, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(matches!(
            ro.store_pages(5, &more),
            Err(MemoryError::ReadOnly { .. })
        ));
        assert!(matches!(
            ram.store_pages(16, &more),
            Err(MemoryError::PageOutOfRange { .. })
        ));
    }

    #[test]
    fn reserve_allocates_holes_and_keeps_written_pages() {
        let dir = shm_dir();
        let p = dir.path().join("ram");
        let ram = RamFile::create(&p, 64 * PAGE).unwrap();
        ram.store_pages(7, &page_of(3)).unwrap();
        ram.reserve().unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        ram.read_page(7, &mut buf).unwrap();
        assert_eq!(buf, page_of(3), "reserving does not touch written pages");
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&p).unwrap().blocks() * 512;
        assert!(blocks >= 64 * PAGE, "{blocks} bytes allocated");
        assert!(matches!(
            RamFile::open(&p, false).unwrap().reserve(),
            Err(MemoryError::ReadOnly { .. })
        ));
    }

    #[test]
    fn zero_detection() {
        let dir = shm_dir();
        let ram = RamFile::create(dir.path().join("ram"), 64 * PAGE).unwrap();
        assert!((0..64).all(|i| ram.is_zero_page(i).unwrap()));
        assert!(ram.nonzero_pages().unwrap().is_empty());
        // One non-zero byte at the very end of a page, one at the start of another.
        let mut p = vec![0u8; PAGE_SIZE];
        p[PAGE_SIZE - 1] = 1;
        ram.write_page(10, &p).unwrap();
        let mut q = vec![0u8; PAGE_SIZE];
        q[0] = 0x80;
        ram.write_page(63, &q).unwrap();
        // A data page that holds only zeros is still a zero page.
        ram.write_page(20, &vec![0u8; PAGE_SIZE]).unwrap();
        assert!(!ram.is_zero_page(10).unwrap());
        assert!(!ram.is_zero_page(63).unwrap());
        assert!(ram.is_zero_page(20).unwrap());
        assert_eq!(
            ram.nonzero_pages().unwrap().iter().collect::<Vec<_>>(),
            vec![10, 63]
        );
    }

    #[test]
    fn scanning_does_not_populate_holes() {
        let dir = shm_dir();
        let p = dir.path().join("ram");
        let ram = RamFile::create(&p, 8192 * PAGE).unwrap(); // 32 MiB, sparse
        ram.write_page(4000, &page_of(1)).unwrap();
        let before = std::fs::metadata(&p).unwrap().blocks();
        assert_eq!(
            ram.nonzero_pages().unwrap().iter().collect::<Vec<_>>(),
            vec![4000]
        );
        let _ = ram.digest().unwrap();
        let _ = ram.digest_parallel(2).unwrap();
        let after = std::fs::metadata(&p).unwrap().blocks();
        assert_eq!(before, after, "scans must not allocate holes");
    }

    #[test]
    fn a_parallel_scan_finds_the_same_pages() {
        let dir = shm_dir();
        let p = dir.path().join("ram");
        // 2.5 chunks of 64 MiB (the last one short), sparse; written pages at the chunks'
        // edges, an explicit zero page, and the very last page.
        let pages = 40_000u64;
        let ram = RamFile::create(&p, pages * PAGE).unwrap();
        let written = [0, 63, 64, 16_383, 16_384, 20_000, 32_767, 32_768, pages - 1];
        for idx in written {
            ram.write_page(idx, &page_of(idx as u8 | 1)).unwrap();
        }
        ram.write_pages(5000, &vec![0u8; PAGE_SIZE]).unwrap();
        let before = std::fs::metadata(&p).unwrap().blocks();
        let one = ram.nonzero_pages().unwrap();
        assert_eq!(one.iter().collect::<Vec<_>>(), written.to_vec());
        for threads in [1, 2, 3, 8] {
            assert_eq!(
                ram.nonzero_pages_parallel(threads).unwrap(),
                one,
                "{threads} threads"
            );
        }
        let after = std::fs::metadata(&p).unwrap().blocks();
        assert_eq!(before, after, "scans must not allocate holes");
    }

    #[test]
    fn page_sums_give_the_same_fingerprint_as_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        let ram = RamFile::create(dir.path().join("r"), 64 * PAGE_SIZE as u64).unwrap();
        let sums = PageSums::new(ram.page_count());
        assert_eq!(sums.fingerprint(), ram.fingerprint(2).unwrap(), "empty");
        let mut page = vec![0u8; PAGE_SIZE];
        for p in [0u64, 3, 17, 63] {
            page.fill(p as u8 + 1);
            ram.write_pages(p, &page).unwrap();
            sums.set(p, &page);
        }
        // An explicit zero page equals a hole.
        ram.write_pages(5, &vec![0u8; PAGE_SIZE]).unwrap();
        sums.set_zero(5);
        assert_eq!(sums.fingerprint(), ram.fingerprint(1).unwrap());
        // A page the sums do not know about makes them differ.
        page.fill(0xee);
        ram.write_pages(40, &page).unwrap();
        assert_ne!(sums.fingerprint(), ram.fingerprint(2).unwrap());
        // The audit names exactly that page, unless it is one whose new copy is pending.
        let none = crate::DirtyBitmap::new(ram.page_count());
        assert_eq!(sums.mismatches(&ram, 0, ram.page_count(), &none), vec![40]);
        assert_eq!(sums.mismatches(&ram, 0, 40, &none), Vec::<u64>::new());
        let mut pending = crate::DirtyBitmap::new(ram.page_count());
        pending.set(40);
        assert!(sums.mismatches(&ram, 0, 64, &pending).is_empty());
        // A page zeroed behind the sums' back is caught too; recorded, it is not.
        ram.zero_page(3).unwrap();
        assert_eq!(sums.mismatches(&ram, 0, 64, &pending), vec![3]);
        sums.set_nonzero(40, &page);
        sums.set_sum(3, 0);
        assert!(
            sums.mismatches(&ram, 0, 1000, &none).is_empty(),
            "end is clamped"
        );
        assert_eq!(sums.fingerprint(), ram.fingerprint(2).unwrap());
    }

    #[test]
    fn page_sums_total_follows_rewrites_from_many_threads() {
        // The running total must end where a fresh scan of the final contents does,
        // whatever each page went through (rewritten, zeroed, rewritten) and from
        // whichever thread (one writer per page, as on the target's streams).
        let dir = shm_dir();
        let pages = 4 * 1024u64;
        let ram = RamFile::create(dir.path().join("r"), pages * PAGE).unwrap();
        let sums = PageSums::new(pages);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (ram, sums) = (&ram, &sums);
                s.spawn(move || {
                    for p in (t..pages).step_by(4) {
                        for pass in 0..3u8 {
                            let page = if (p + u64::from(pass)) % 5 == 0 {
                                vec![0u8; PAGE_SIZE]
                            } else {
                                page_of((p as u8) ^ pass.wrapping_mul(37) | 1)
                            };
                            ram.write_page(p, &page).unwrap();
                            sums.set(p, &page);
                        }
                    }
                });
            }
        });
        assert_eq!(sums.fingerprint(), ram.fingerprint(2).unwrap());
        // Back to all zero: the total is the empty one again.
        for p in 0..pages {
            ram.zero_page(p).unwrap();
            sums.set_zero(p);
        }
        assert_eq!(sums.fingerprint(), PageSums::new(pages).fingerprint());
        assert_eq!(sums.fingerprint(), ram.fingerprint(1).unwrap());
        // The page count is part of it.
        assert_ne!(
            PageSums::new(pages).fingerprint(),
            PageSums::new(pages + 1).fingerprint()
        );
    }

    #[test]
    fn fingerprint_is_content_based() {
        let dir = shm_dir();
        let pages = FINGERPRINT_CHUNK_PAGES + 300;
        let a = RamFile::create(dir.path().join("fa"), pages * PAGE).unwrap();
        let b = RamFile::create(dir.path().join("fb"), pages * PAGE).unwrap();
        for i in [0u64, 1, 150, FINGERPRINT_CHUNK_PAGES + 7, pages - 1] {
            a.write_page(i, &page_of(i as u8 | 1)).unwrap();
            b.write_page(i, &page_of(i as u8 | 1)).unwrap();
        }
        // An explicit zero page where the other file has a hole: same content.
        b.zero_page(77).unwrap();
        let fa = a.fingerprint(1).unwrap();
        assert_eq!(fa, b.fingerprint(1).unwrap());
        assert_eq!(fa, a.fingerprint(3).unwrap(), "independent of thread count");
        // The same bytes at another page index differ.
        let c = RamFile::create(dir.path().join("fc"), pages * PAGE).unwrap();
        for i in [0u64, 1, 150, FINGERPRINT_CHUNK_PAGES + 7] {
            c.write_page(i, &page_of(i as u8 | 1)).unwrap();
        }
        c.write_page(pages - 2, &page_of((pages - 1) as u8 | 1))
            .unwrap();
        assert_ne!(fa, c.fingerprint(2).unwrap());
        // One flipped bit in the second chunk changes it.
        let mut p = page_of((FINGERPRINT_CHUNK_PAGES + 7) as u8 | 1);
        p[4000] ^= 0x10;
        b.write_page(FINGERPRINT_CHUNK_PAGES + 7, &p).unwrap();
        assert_ne!(fa, b.fingerprint(2).unwrap());
    }

    #[test]
    fn digests() {
        let dir = shm_dir();
        let a = RamFile::create(dir.path().join("a"), 300 * PAGE).unwrap();
        let b = RamFile::create(dir.path().join("b"), 300 * PAGE).unwrap();
        for i in [0u64, 1, 150, 299] {
            a.write_page(i, &page_of(i as u8)).unwrap();
            b.write_page(i, &page_of(i as u8)).unwrap();
        }
        // b has an explicit zero page where a has a hole: same content, same digest.
        b.zero_page(77).unwrap();
        let da = a.digest().unwrap();
        assert_eq!(da, b.digest().unwrap());

        // Check against a plain in-memory hash of the same bytes.
        let mut all = vec![0u8; 300 * PAGE_SIZE];
        a.read_pages(0, &mut all).unwrap();
        assert_eq!(da, blake3::hash(&all));

        // Parallel digests equal the serial one, also with forced tiny leaves.
        for threads in [1, 2, 3, 8] {
            assert_eq!(a.digest_parallel(threads).unwrap(), da);
            for leaf in [PAGE, 3 * PAGE, 64 * PAGE] {
                assert_eq!(
                    a.digest_tree(threads, leaf).unwrap(),
                    da,
                    "t={threads} leaf={leaf}"
                );
            }
        }

        // One byte changes the digest.
        let mut p = page_of(150);
        p[1234] ^= 1;
        b.write_page(150, &p).unwrap();
        assert_ne!(b.digest().unwrap(), da);
        assert_ne!(b.digest_tree(4, PAGE).unwrap(), da);
    }

    #[test]
    fn out_of_range_and_bad_buffers_are_errors() {
        let dir = shm_dir();
        let ram = RamFile::create(dir.path().join("ram"), 4 * PAGE).unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        let oor = |r: Result<(), MemoryError>| {
            assert!(
                matches!(r, Err(MemoryError::PageOutOfRange { .. })),
                "{r:?}"
            )
        };
        oor(ram.read_page(4, &mut buf));
        oor(ram.read_page(u64::MAX, &mut buf));
        oor(ram.write_page(4, &buf));
        oor(ram.zero_page(4));
        assert!(matches!(
            ram.is_zero_page(4),
            Err(MemoryError::PageOutOfRange { .. })
        ));
        let mut two = vec![0u8; 2 * PAGE_SIZE];
        oor(ram.read_pages(3, &mut two)); // straddles the end
        oor(ram.read_pages(u64::MAX, &mut two)); // overflow
        let mut short = vec![0u8; 100];
        assert!(matches!(
            ram.read_page(0, &mut short),
            Err(MemoryError::BufferSize { .. })
        ));
        assert!(matches!(
            ram.read_pages(0, &mut []),
            Err(MemoryError::BufferSize { .. })
        ));
        assert!(matches!(
            ram.write_page(0, &short),
            Err(MemoryError::BufferSize { .. })
        ));

        assert!(matches!(
            RamFile::create(dir.path().join("odd"), 100),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(!dir.path().join("odd").exists());
        std::fs::write(dir.path().join("short"), [1u8; 10]).unwrap();
        assert!(matches!(
            RamFile::open(dir.path().join("short"), false),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(matches!(
            RamFile::open(dir.path().join("missing"), false),
            Err(MemoryError::Io { op: "open", .. })
        ));
    }
}
