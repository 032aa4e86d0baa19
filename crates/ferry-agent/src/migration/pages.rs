//! Moving guest pages: the source's [`PageSender`] (shards pages over several QUIC
//! streams, compresses per batch) and the target's [`apply_page_stream`].
//!
//! A page always travels on the same stream (streams are chosen by 2 MiB region), so a
//! newer copy of a page can never overtake an older one: QUIC keeps order within a stream.

use ferry_memory::{is_zero_page, DirtyBitmap, PageSums, RamFile, PAGE_SIZE};
use ferry_transport::{FrameReader, FrameWriter, TransportError};
use ferry_wire::{Codec, EncodedBatch, Frame, PageBatch, PageRun, ZeroPages};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// Pages per batch: 1 MiB of guest memory compresses well and keeps latency low.
pub const BATCH_PAGES: usize = 256;
/// Pages per shard region (2 MiB): keeps runs contiguous inside a stream.
const REGION_SHIFT: u32 = 9;

/// The codec the page streams use for their next batch: fixed, or changed by `auto`
/// while a round is in flight (the wire carries the codec per batch).
#[derive(Debug)]
pub struct SharedCodec(std::sync::Mutex<Codec>);

impl SharedCodec {
    /// Starts with `c`.
    pub fn new(c: Codec) -> Self {
        SharedCodec(std::sync::Mutex::new(c))
    }

    /// The codec now.
    pub fn get(&self) -> Codec {
        self.0.lock().map(|c| *c).unwrap_or(Codec::None)
    }

    /// From the next batch on, `c`.
    pub fn set(&self, c: Codec) {
        if let Ok(mut g) = self.0.lock() {
            *g = c;
        }
    }
}

/// Counters of what the sender moved.
#[derive(Default, Debug)]
pub struct PageCounters {
    pub pages: AtomicU64,
    pub zero_pages: AtomicU64,
    pub page_bytes: AtomicU64,
    pub payload_bytes: AtomicU64,
    pub wire_bytes: AtomicU64,
    pub batches: AtomicU64,
    /// Nanoseconds the streams spent reading and compressing, and waiting for QUIC to
    /// take their bytes (or for the rate cap): where the bottleneck is, for `auto`.
    pub encode_ns: AtomicU64,
    pub wait_ns: AtomicU64,
    /// CPU nanoseconds the streams spent reading and compressing (their threads' own
    /// time, where `encode_ns` is wall time): what `auto` charges a codec.
    pub encode_cpu_ns: AtomicU64,
    /// Pages left out of their round because the guest wrote them again before their
    /// turn came ([`SkipSet`]): they travel once, in the next round.
    pub skipped_pages: AtomicU64,
}

impl PageCounters {
    /// Pages a round has dealt with: sent, sent as zero, or left to the next round.
    pub fn pages_done(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
            + self.zero_pages.load(Ordering::Relaxed)
            + self.skipped_pages.load(Ordering::Relaxed)
    }
}

/// Pages of the running round the tracker has already seen written again. Sending one
/// now would be wasted: it is in the next round's set, so its shard skips it when its
/// turn comes. Shared between the round's loop (which adds what each mid-round collection
/// of the tracker returns) and the shard senders (which test each page before reading it).
pub struct SkipSet {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl SkipSet {
    pub fn new(pages: u64) -> Self {
        SkipSet {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Forgets every page (a new round starts).
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Adds the pages of `written` (pages beyond this set's size are ignored).
    pub fn add(&self, written: &DirtyBitmap) {
        for p in written.iter().take_while(|&p| p < self.pages) {
            if let Some(w) = self.words.get((p / 64) as usize) {
                w.fetch_or(1 << (p % 64), Ordering::Relaxed);
            }
        }
    }

    pub fn contains(&self, page: u64) -> bool {
        page < self.pages
            && self
                .words
                .get((page / 64) as usize)
                .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
    }
}

/// Errors while moving pages.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("reading guest RAM: {0}")]
    Memory(#[from] ferry_memory::MemoryError),
    #[error("encoding: {0}")]
    Wire(#[from] ferry_wire::WireError),
    #[error("sending pages: {0}")]
    Transport(#[from] TransportError),
    #[error("page worker failed: {0}")]
    Join(String),
    #[error("page {page} is outside the {pages}-page RAM file")]
    OutOfRange { page: u64, pages: u64 },
}

/// Caps the data plane's bytes per second (all page streams together).
pub struct RateLimiter {
    bytes_per_sec: u64,
    /// When the bytes admitted so far are due at the cap.
    next: std::sync::Mutex<std::time::Instant>,
}

/// Credit a quiet sender may build up: a burst of at most this much time at the cap, so
/// a pause between rounds does not turn into a line-rate burst that overflows the
/// bottleneck queue.
const RATE_BURST: std::time::Duration = std::time::Duration::from_millis(5);

impl RateLimiter {
    pub fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            bytes_per_sec: bytes_per_sec.max(1),
            next: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// The cap in bytes per second.
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Waits until `n` more bytes fit under the cap.
    pub async fn acquire(&self, n: usize) {
        let wait = {
            let Ok(mut next) = self.next.lock() else {
                return;
            };
            let now = std::time::Instant::now();
            let earliest = now.checked_sub(RATE_BURST).unwrap_or(now);
            if *next < earliest {
                *next = earliest;
            }
            *next += std::time::Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
            next.checked_duration_since(now)
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

/// Source side: sends rounds of pages.
pub struct PageSender {
    writers: Vec<FrameWriter>,
    ram: Arc<RamFile>,
    codec: Arc<SharedCodec>,
    pub counters: Arc<PageCounters>,
    ever_sent: DirtyBitmap,
    /// Pages sent more than once.
    pub resent: u64,
    limiter: Option<Arc<RateLimiter>>,
    /// Sums of the pages as sent (the source's half of the verification), hashed while
    /// each page is in cache for the compressor.
    sums: Option<Arc<PageSums>>,
    skip: Arc<SkipSet>,
}

impl PageSender {
    pub fn new(writers: Vec<FrameWriter>, ram: Arc<RamFile>, codec: Codec) -> Self {
        let pages = ram.page_count();
        PageSender {
            writers,
            ram,
            codec: Arc::new(SharedCodec::new(codec)),
            counters: Arc::new(PageCounters::default()),
            ever_sent: DirtyBitmap::new(pages),
            resent: 0,
            limiter: None,
            sums: None,
            skip: Arc::new(SkipSet::new(pages)),
        }
    }

    /// The running round's [`SkipSet`]: pages added to it before their shard reaches them
    /// are not sent in this round. Emptied when a round starts. Only for pre-copy rounds:
    /// a page skipped must be in the next round's set.
    pub fn skip_set(&self) -> Arc<SkipSet> {
        self.skip.clone()
    }

    /// The codec cell the streams read before each batch (`auto` changes it mid-round).
    pub fn codec(&self) -> Arc<SharedCodec> {
        self.codec.clone()
    }

    /// Keeps per-page sums of what is sent: see [`PageSender::sums`].
    pub fn with_sums(mut self) -> Self {
        self.sums = Some(Arc::new(PageSums::new(self.ram.page_count())));
        self
    }

    /// The sums of every page as last sent (all zero for pages never sent), when kept.
    pub fn sums(&self) -> Option<&Arc<PageSums>> {
        self.sums.as_ref()
    }

    /// Caps the bytes per second written to the page streams.
    pub fn with_rate_limit(mut self, bytes_per_sec: u64) -> Self {
        self.limiter = (bytes_per_sec > 0).then(|| Arc::new(RateLimiter::new(bytes_per_sec)));
        self
    }

    /// Sends `pages`. With `skip_zero` (round 0: the target file starts all-zero) zero
    /// pages are not sent at all; otherwise they travel as zero-page runs.
    pub async fn send_round(
        &mut self,
        round: u32,
        pages: &DirtyBitmap,
        skip_zero: bool,
    ) -> Result<(), PageError> {
        self.skip.clear();
        let n = self.writers.len().max(1);
        let mut shards: Vec<Vec<u64>> = vec![Vec::new(); n];
        // Pages this round sends for the first time: one it skips was not sent after all.
        let mut first_time = Vec::new();
        for p in pages.iter() {
            if !self.ever_sent.get(p) {
                first_time.push(p);
            }
            if !self.ever_sent.set(p) {
                return Err(PageError::OutOfRange {
                    page: p,
                    pages: self.ram.page_count(),
                });
            }
            shards[((p >> REGION_SHIFT) % n as u64) as usize].push(p);
        }
        let mut tasks = Vec::with_capacity(n);
        for (w, shard) in std::mem::take(&mut self.writers).into_iter().zip(shards) {
            let job = ShardJob {
                ram: self.ram.clone(),
                round,
                codec: self.codec.clone(),
                skip_zero,
                counters: self.counters.clone(),
                limiter: self.limiter.clone(),
                sums: self.sums.clone(),
                skip: self.skip.clone(),
            };
            // On the thread that runs QUIC (encoding goes to its blocking pool).
            tasks.push(ferry_transport::data_plane::spawn(send_shard(
                w, shard, job,
            )));
        }
        let mut first_err = None;
        for t in tasks {
            match t.await {
                Ok(Ok(w)) => self.writers.push(w),
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(e) => first_err = first_err.or(Some(PageError::Join(e.to_string()))),
            }
        }
        for p in first_time {
            if self.skip.contains(p) {
                self.ever_sent.unset(p);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Marks pages as sent before (for the resent counter) without sending them.
    pub fn note_resent(&mut self, pages: &DirtyBitmap) {
        self.resent += pages.iter().filter(|&p| self.ever_sent.get(p)).count() as u64;
    }

    /// Frames sent so far on all streams.
    pub fn batches_total(&self) -> u64 {
        self.counters.batches.load(Ordering::Relaxed)
    }

    /// Finishes every page stream.
    pub fn finish(&mut self) {
        for w in &mut self.writers {
            let _ = w.finish();
        }
    }
}

/// What one shard's sender shares with the others in a round.
#[derive(Clone)]
struct ShardJob {
    ram: Arc<RamFile>,
    round: u32,
    codec: Arc<SharedCodec>,
    skip_zero: bool,
    counters: Arc<PageCounters>,
    limiter: Option<Arc<RateLimiter>>,
    sums: Option<Arc<PageSums>>,
    skip: Arc<SkipSet>,
}

async fn send_shard(
    mut w: FrameWriter,
    shard: Vec<u64>,
    job: ShardJob,
) -> Result<FrameWriter, PageError> {
    let ShardJob {
        ram,
        round,
        codec,
        skip_zero,
        counters,
        limiter,
        sums,
        skip,
    } = job;
    for chunk in shard.chunks(BATCH_PAGES) {
        let given = chunk.len();
        let chunk: Vec<u64> = chunk
            .iter()
            .copied()
            .filter(|&p| !skip.contains(p))
            .collect();
        let skipped = (given - chunk.len()) as u64;
        if skipped > 0 {
            counters.skipped_pages.fetch_add(skipped, Ordering::Relaxed);
        }
        if chunk.is_empty() {
            continue;
        }
        let (ram, sums, codec) = (ram.clone(), sums.clone(), codec.get());
        // Reading and compressing are CPU work: keep them off the async workers.
        let t = std::time::Instant::now();
        let (frames, cpu) = tokio::task::spawn_blocking(move || {
            let cpu = super::auto_codec::thread_cpu();
            let frames = encode_chunk(&ram, round, &chunk, codec, skip_zero, sums.as_deref());
            (frames, super::auto_codec::thread_cpu().saturating_sub(cpu))
        })
        .await
        .map_err(|e| PageError::Join(e.to_string()))?;
        let frames = frames?;
        counters
            .encode_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        counters
            .encode_cpu_ns
            .fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
        for f in frames {
            let t = std::time::Instant::now();
            if let Some(l) = &limiter {
                l.acquire(f.bytes.len()).await;
            }
            let wire_len = f.bytes.len() as u64;
            w.write_owned(f.bytes).await?;
            counters
                .wait_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            counters.batches.fetch_add(1, Ordering::Relaxed);
            counters.wire_bytes.fetch_add(wire_len, Ordering::Relaxed);
            if f.payload_len == 0 {
                // Only zero-page frames carry no payload.
                counters
                    .zero_pages
                    .fetch_add(f.pages as u64, Ordering::Relaxed);
            } else {
                counters.pages.fetch_add(f.pages as u64, Ordering::Relaxed);
                counters
                    .page_bytes
                    .fetch_add((f.pages * PAGE_SIZE) as u64, Ordering::Relaxed);
                counters
                    .payload_bytes
                    .fetch_add(f.payload_len as u64, Ordering::Relaxed);
            }
        }
    }
    Ok(w)
}

fn push_run(runs: &mut Vec<PageRun>, page: u64) {
    if let Some(last) = runs.last_mut() {
        if last.first + u64::from(last.count) == page {
            last.count += 1;
            return;
        }
    }
    runs.push(PageRun {
        first: page,
        count: 1,
    });
}

/// Reads `pages` (sorted, at most BATCH_PAGES) and encodes a data batch and, where
/// needed, a zero-page batch; records each page's sum in `sums` as it is read.
fn encode_chunk(
    ram: &RamFile,
    round: u32,
    pages: &[u64],
    codec: Codec,
    skip_zero: bool,
    sums: Option<&PageSums>,
) -> Result<Vec<EncodedBatch>, PageError> {
    // Each page is copied once, straight onto the batch's buffer; a zero page comes off it
    // again. The buffer is the thread's own, kept across batches: a fresh 1 MiB one per
    // batch cost an allocation and its page faults every time. (A batch that fails drops
    // it; the next one starts a new buffer.)
    let mut data = PAGE_BUFFER.take();
    data.clear();
    data.reserve(pages.len() * PAGE_SIZE);
    let (mut data_runs, mut zero_runs) = (Vec::new(), Vec::new());
    for &p in pages {
        let used = data.len();
        ram.append_page(p, &mut data)?;
        let buf = &data[used..];
        if is_zero_page(buf) {
            data.truncate(used);
            if let Some(s) = sums {
                s.set_zero(p);
            }
            if !skip_zero {
                push_run(&mut zero_runs, p);
            }
        } else {
            if let Some(s) = sums {
                s.set_nonzero(p, buf);
            }
            push_run(&mut data_runs, p);
        }
    }
    let mut out = Vec::with_capacity(2);
    if !data_runs.is_empty() {
        out.push(PageBatch::encode(round, &data_runs, &data, codec)?);
    }
    if !zero_runs.is_empty() {
        out.push(ZeroPages::encode(round, &zero_runs)?);
    }
    PAGE_BUFFER.set(data);
    Ok(out)
}

thread_local! {
    static PAGE_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Target side: how many frames have been written into the RAM file.
#[derive(Default)]
pub struct AppliedCounter {
    pub pages: AtomicU64,
    pub notify: Notify,
    /// Frames applied per round. Pre-copy rounds overlap on the wire (the next round
    /// starts before the last is confirmed), so a round is complete when the frames of
    /// it and every round before it are applied, whatever later rounds brought meanwhile.
    by_round: std::sync::Mutex<std::collections::BTreeMap<u32, u64>>,
}

impl AppliedCounter {
    /// Counts one applied frame of `round` (frames without one count under round 0).
    pub fn add_frame(&self, round: Option<u32>) {
        if let Ok(mut m) = self.by_round.lock() {
            *m.entry(round.unwrap_or(0)).or_insert(0) += 1;
        }
        self.notify.notify_waiters();
    }

    /// Frames applied of rounds up to and including `round`.
    pub fn frames_through(&self, round: u32) -> u64 {
        self.by_round
            .lock()
            .map(|m| m.range(..=round).map(|(_, n)| n).sum())
            .unwrap_or(0)
    }

    /// Waits until at least `n` frames of rounds up to and including `round` have been
    /// applied (`n` is what the source sent up to the end of that round).
    pub async fn wait_through(&self, round: u32, n: u64) {
        loop {
            let notified = self.notify.notified();
            if self.frames_through(round) >= n {
                return;
            }
            notified.await;
        }
    }
}

/// Applies one page stream to the target's RAM file until the source finishes it,
/// keeping `sums` (the fingerprint's per-page view) in step with what it writes.
///
/// Decoding (decompressing) and writing happen off the async runtime, whose threads also
/// drive the QUIC connection, and overlap with reading the next frame: a reader that
/// waited for each write let quinn buffer the stream meanwhile, and past 2048 buffered
/// packets quinn copies them all into one fresh buffer (its `defragment`, 0.19 CPU-s of
/// a wan migration's profile). Frames of one stream are still applied one at a time and
/// in order, and each is counted in `applied` as soon as it is written (the source waits
/// for that count before it sends on: it must not wait for the next frame's arrival).
/// The frame bodies and decoded buffers go with the work and come back, so no 1 MiB
/// buffer is allocated, zeroed and faulted in per batch.
pub async fn apply_page_stream(
    mut reader: FrameReader,
    ram: Arc<RamFile>,
    applied: Arc<AppliedCounter>,
    sums: Arc<PageSums>,
) -> Result<(), PageError> {
    type Applied = (Result<(), PageError>, Vec<u8>, Vec<u8>);
    let (mut body, mut spares) = (Vec::new(), (Vec::new(), Vec::new()));
    let mut in_flight: Option<tokio::task::JoinHandle<Applied>> = None;
    let join = |r: Result<Applied, tokio::task::JoinError>| {
        let (done, b, s) = r.map_err(|e| PageError::Join(e.to_string()))?;
        done.map(|()| (b, s))
    };
    loop {
        let next = {
            let read = reader.next_body(&mut body);
            tokio::pin!(read);
            loop {
                match in_flight.as_mut() {
                    None => break read.await,
                    // A frame that fails to apply ends the stream at once, not when the
                    // next one arrives (the source may be waiting for its count). The read
                    // is never dropped half-done: it goes on in the next turn.
                    Some(h) => tokio::select! {
                        r = &mut read => break r,
                        r = h => {
                            in_flight = None;
                            spares = join(r)?;
                        }
                    },
                }
            }
        };
        // The frame before is written before this one starts (and before an error or the
        // stream's end is reported: what arrived intact is applied).
        if let Some(h) = in_flight.take() {
            spares = join(h.await)?;
        }
        let Some(ty) = next? else {
            return Ok(());
        };
        let (ram, sums, applied) = (ram.clone(), sums.clone(), applied.clone());
        let (b, (next_body, s)) = (std::mem::take(&mut body), std::mem::take(&mut spares));
        body = next_body;
        in_flight = Some(tokio::task::spawn_blocking(move || {
            let frame = match Frame::decode_body_reusing(ty, &b, s) {
                Ok(frame) => frame,
                Err(e) => return (Err(e.into()), b, Vec::new()),
            };
            let done = apply_frame(&ram, &sums, &frame).map(|pages| {
                applied.pages.fetch_add(pages, Ordering::Relaxed);
                applied.add_frame(frame.round());
            });
            (done, b, frame.into_data())
        }));
    }
}

fn apply_frame(ram: &RamFile, sums: &PageSums, frame: &Frame) -> Result<u64, PageError> {
    let limit = ram.page_count();
    let check = |run: &PageRun| {
        let end = run.first + u64::from(run.count);
        if end > limit {
            Err(PageError::OutOfRange {
                page: end - 1,
                pages: limit,
            })
        } else {
            Ok(())
        }
    };
    match frame {
        Frame::Pages(b) => {
            let mut off = 0usize;
            for run in &b.runs {
                check(run)?;
                let len = run.count as usize * PAGE_SIZE;
                let data = &b.data[off..off + len];
                ram.store_pages(run.first, data)?;
                for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
                    sums.set(run.first + i as u64, page);
                }
                off += len;
            }
            Ok(b.page_count() as u64)
        }
        Frame::ZeroPages(z) => {
            let mut n = 0;
            for run in &z.runs {
                check(run)?;
                for p in run.pages() {
                    ram.store_zero_page(p)?;
                    sums.set_zero(p);
                    n += 1;
                }
            }
            Ok(n)
        }
        Frame::Control(_) | Frame::Chunk(_) => Err(PageError::Transport(
            TransportError::UnexpectedFrame("page"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_set_holds_what_was_added_until_cleared() {
        let s = SkipSet::new(200);
        assert!(!(0..200).any(|p| s.contains(p)));
        let mut written = DirtyBitmap::new(200);
        for p in [0, 63, 64, 130, 199] {
            written.set(p);
        }
        s.add(&written);
        let held: Vec<u64> = (0..200).filter(|&p| s.contains(p)).collect();
        assert_eq!(held, vec![0, 63, 64, 130, 199]);
        // Out of range: never held, never a panic (a bitmap larger than the set is cut).
        assert!(!s.contains(200) && !s.contains(u64::MAX));
        let mut bigger = DirtyBitmap::new(300);
        bigger.set(250);
        s.add(&bigger);
        assert!(!s.contains(250));
        s.clear();
        assert!(!(0..200).any(|p| s.contains(p)));
    }

    /// A QUIC connection over loopback with mutual TLS (source side, target side) and a
    /// tmpfs directory for RAM files.
    async fn loopback_pair() -> (quinn::Connection, quinn::Connection, tempfile::TempDir) {
        use ferry_transport::pki::{generate_ca, issue_host_cert, Identity};
        use ferry_transport::{QuicEndpoint, TransportTuning};
        let ca = generate_ca("page stream test").unwrap();
        let id = |host: &str| {
            let pair = issue_host_cert(&ca, host, &[]).unwrap();
            Identity {
                ca_pem: ca.cert_pem.clone(),
                cert_pem: pair.cert_pem,
                key_pem: pair.key_pem,
            }
        };
        let tuning = TransportTuning::default();
        let server = QuicEndpoint::bind("127.0.0.1:0".parse().unwrap(), &id("b"), &tuning).unwrap();
        let addr = server.local_addr().unwrap();
        let client = QuicEndpoint::client(addr, &id("a"), &tuning).unwrap();
        let (accepted, connected) =
            tokio::join!(server.accept(), client.connect(addr, "127.0.0.1"));
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        (connected.unwrap(), accepted.unwrap().unwrap(), dir)
    }

    /// The target's side: applies the connection's first unidirectional stream to `dst`,
    /// on the data plane's thread as `accept_streams` does.
    fn spawn_apply(
        conn: quinn::Connection,
        dst: Arc<RamFile>,
        applied: Arc<AppliedCounter>,
    ) -> tokio::task::JoinHandle<Result<(), PageError>> {
        ferry_transport::data_plane::spawn(async move {
            let recv = conn.accept_uni().await.unwrap();
            let sums = Arc::new(PageSums::new(dst.page_count()));
            apply_page_stream(FrameReader::new(recv), dst, applied, sums).await
        })
    }

    /// Over a real QUIC connection on loopback: every frame of a page stream is counted
    /// as written while the stream stays open — the source waits for that count before
    /// it sends on, so a count that waited for the next frame to arrive would hang it —
    /// and the pages land in the target's RAM file as they were sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_page_stream_counts_each_frame_written_without_waiting_for_the_next() {
        let (conn_s, conn_t, dir) = loopback_pair().await;
        let pages = 3 * BATCH_PAGES as u64;
        let bytes = pages * PAGE_SIZE as u64;
        let fill = |p: u64| [(p % 251) as u8 + 1; PAGE_SIZE];
        let src = Arc::new(RamFile::create(dir.path().join("source"), bytes).unwrap());
        for p in 0..pages {
            src.write_page(p, &fill(p)).unwrap();
        }
        let dst = Arc::new(RamFile::create(dir.path().join("target"), bytes).unwrap());
        let applied = Arc::new(AppliedCounter::default());
        let target = spawn_apply(conn_t, dst.clone(), applied.clone());
        let stream = conn_s.open_uni().await.unwrap();
        let mut sender = PageSender::new(
            vec![FrameWriter::new(stream)],
            src.clone(),
            Codec::Zstd { level: 1 },
        );
        let mut all = DirtyBitmap::new(pages);
        for p in 0..pages {
            all.set(p);
        }
        sender.send_round(0, &all, true).await.unwrap();
        let sent = sender.batches_total();
        assert_eq!(sent, 3, "one frame per batch of {BATCH_PAGES} pages");

        // No frame follows the last one and the stream stays open.
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            applied.wait_through(0, sent),
        )
        .await
        .expect("every frame sent is counted as written while its stream stays open");
        assert_eq!(applied.pages.load(Ordering::Relaxed), pages);
        let mut page = [0u8; PAGE_SIZE];
        for p in 0..pages {
            dst.read_page(p, &mut page).unwrap();
            assert_eq!(page, fill(p), "page {p} on the target");
        }
        sender.finish();
        target.await.unwrap().unwrap();
    }

    /// A corrupt frame ends its page stream with an error at once, while the source
    /// keeps the stream open (it would be waiting for the frame's count), and the intact
    /// frame before it is written. Real QUIC on loopback; the corrupt frame is made here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_frame_ends_its_page_stream_without_waiting_for_the_next() {
        let (conn_s, conn_t, dir) = loopback_pair().await;
        let pages = 2 * BATCH_PAGES as u64;
        let dst =
            Arc::new(RamFile::create(dir.path().join("target"), pages * PAGE_SIZE as u64).unwrap());
        let applied = Arc::new(AppliedCounter::default());
        let target = spawn_apply(conn_t, dst.clone(), applied.clone());
        let mut w = FrameWriter::new(conn_s.open_uni().await.unwrap());
        let data = vec![7u8; PAGE_SIZE];
        let run = |first| [PageRun { first, count: 1 }];
        let good = PageBatch::encode(0, &run(0), &data, Codec::None).unwrap();
        let mut bad = PageBatch::encode(0, &run(1), &data, Codec::None).unwrap();
        let last = bad.bytes.len() - 1;
        bad.bytes[last] ^= 0xff;
        w.write(&good.bytes).await.unwrap();
        w.write(&bad.bytes).await.unwrap();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), target)
            .await
            .expect("the stream ends on the corrupt frame while the source keeps it open")
            .unwrap();
        assert!(ended.is_err(), "a corrupt frame is an error: {ended:?}");
        assert_eq!(applied.frames_through(0), 1, "the intact frame is counted");
        let mut page = [0u8; PAGE_SIZE];
        dst.read_page(0, &mut page).unwrap();
        assert_eq!(page[..], data[..]);
        dst.read_page(1, &mut page).unwrap();
        assert_eq!(
            page, [0u8; PAGE_SIZE],
            "nothing of the corrupt frame is written"
        );
        // Only now may the stream end: the error above came while it was open.
        drop(w);
    }

    #[test]
    fn counters_count_skipped_pages_as_done() {
        let c = PageCounters::default();
        c.pages.store(10, Ordering::Relaxed);
        c.zero_pages.store(3, Ordering::Relaxed);
        c.skipped_pages.store(4, Ordering::Relaxed);
        assert_eq!(c.pages_done(), 17);
    }
}
