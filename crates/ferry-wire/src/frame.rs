//! Stream headers and frames.
//!
//! ```text
//! stream header (8 bytes): "FRRY" | version u8 | kind u8 | index u16 LE
//! frame:                   length u32 LE | type u8 | body[length]
//! page batch body:         round u32 | codec u8 | runs u16 | runs × (first u64, count u32)
//!                          | crc32 u32 (of the raw pages) | payload
//! zero pages body:         round u32 | runs u16 | runs × (first u64, count u32)
//! control body:            postcard(ControlMessage)
//! ```
//! All integers little-endian. Page numbers are indices into the guest RAM file.

use crate::{Codec, ControlMessage, WireError, PAGE_SIZE, PROTOCOL_VERSION};

/// Bytes in a [`StreamHeader`].
pub const STREAM_HEADER_LEN: usize = 8;
/// Bytes before a frame body: length and type.
pub const FRAME_HEADER_LEN: usize = 5;
/// Most pages one batch may carry (4 MiB of guest memory).
pub const MAX_BATCH_PAGES: usize = 1024;
/// Largest frame body accepted: a full raw batch plus its header, with room to spare.
pub const MAX_FRAME_BODY: usize = MAX_BATCH_PAGES * PAGE_SIZE + 64 * 1024;
/// Most runs a batch header may list.
const MAX_RUNS: usize = MAX_BATCH_PAGES;
const MAGIC: [u8; 4] = *b"FRRY";

/// What a QUIC stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Bidirectional: [`ControlMessage`] frames both ways.
    Control = 1,
    /// Unidirectional, source to target: page batch and zero-page frames.
    Pages = 2,
    /// Bidirectional stream, used source to target: QEMU's migration stream (device state)
    /// as [`DataChunk`] frames (offset = position in QEMU's stream).
    DeviceState = 3,
    /// Bidirectional, on a connection of its own: preflight's bandwidth probe. The source
    /// sends bytes and finishes; the target answers with the count (u64) and finishes.
    Probe = 4,
    /// Unidirectional, source to target: one disk image of a cold migration as
    /// [`DataChunk`] frames (offset = byte offset in the image file); `index` names the image.
    DiskImage = 5,
    /// Bidirectional: one NBD connection of a live disk mirror, tunnelled as [`DataChunk`]
    /// frames each way (offset = byte position in that direction's stream).
    NbdTunnel = 6,
}

/// The first bytes of every stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    pub version: u8,
    pub kind: StreamKind,
    /// Which page stream this is (0 for other kinds).
    pub index: u16,
}

impl StreamHeader {
    /// A header for this build's protocol version.
    pub fn new(kind: StreamKind, index: u16) -> Self {
        StreamHeader {
            version: PROTOCOL_VERSION,
            kind,
            index,
        }
    }

    pub fn encode(&self) -> [u8; STREAM_HEADER_LEN] {
        let i = self.index.to_le_bytes();
        [
            MAGIC[0],
            MAGIC[1],
            MAGIC[2],
            MAGIC[3],
            self.version,
            self.kind as u8,
            i[0],
            i[1],
        ]
    }

    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() < STREAM_HEADER_LEN {
            return Err(WireError::Truncated {
                what: "stream header",
                need: STREAM_HEADER_LEN,
                have: b.len(),
            });
        }
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if !crate::version_supported(b[4]) {
            return Err(WireError::UnsupportedVersion {
                got: b[4],
                ours: PROTOCOL_VERSION,
            });
        }
        let kind = match b[5] {
            1 => StreamKind::Control,
            2 => StreamKind::Pages,
            3 => StreamKind::DeviceState,
            4 => StreamKind::Probe,
            5 => StreamKind::DiskImage,
            6 => StreamKind::NbdTunnel,
            k => return Err(WireError::UnknownStreamKind(k)),
        };
        Ok(StreamHeader {
            version: b[4],
            kind,
            index: u16::from_le_bytes([b[6], b[7]]),
        })
    }
}

/// Frame type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameType {
    Control = 1,
    Pages = 2,
    ZeroPages = 3,
    Chunk = 4,
}

impl FrameType {
    fn from_u8(t: u8) -> Result<Self, WireError> {
        match t {
            1 => Ok(FrameType::Control),
            2 => Ok(FrameType::Pages),
            3 => Ok(FrameType::ZeroPages),
            4 => Ok(FrameType::Chunk),
            other => Err(WireError::UnknownFrameType(other)),
        }
    }
}

/// `count` consecutive pages starting at page `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub first: u64,
    pub count: u32,
}

impl PageRun {
    /// Page indices of this run.
    pub fn pages(&self) -> impl Iterator<Item = u64> {
        self.first..self.first + u64::from(self.count)
    }
}

/// Decoded page batch: raw page bytes in run order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBatch {
    pub round: u32,
    /// The codec the payload travelled with.
    pub codec: Codec,
    pub runs: Vec<PageRun>,
    /// `page_count() * PAGE_SIZE` bytes.
    pub data: Vec<u8>,
    /// Payload bytes on the wire (compressed size).
    pub wire_payload: usize,
}

impl PageBatch {
    /// Number of pages in the batch.
    pub fn page_count(&self) -> usize {
        self.runs.iter().map(|r| r.count as usize).sum()
    }

    /// Encodes one batch as a complete frame. `raw` holds the pages of `runs` in order.
    /// The payload is compressed with `codec` unless that does not make it smaller.
    pub fn encode(
        round: u32,
        runs: &[PageRun],
        raw: &[u8],
        codec: Codec,
    ) -> Result<EncodedBatch, WireError> {
        let pages = checked_page_count(runs)?;
        if raw.len() != pages * PAGE_SIZE {
            return Err(WireError::InvalidBatch(format!(
                "{} bytes of page data for {pages} pages",
                raw.len()
            )));
        }
        let crc = batch_crc(round, runs, raw);
        let head = 4 + 1 + 2 + runs.len() * 12 + 4;
        // The payload is compressed straight into the frame (`compress_append` makes its
        // room); the body length and the codec byte are filled in once it is known.
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + head);
        out.extend_from_slice(&[0; 4]);
        out.push(FrameType::Pages as u8);
        out.extend_from_slice(&round.to_le_bytes());
        let codec_at = out.len();
        out.push(Codec::None.id());
        out.extend_from_slice(&(runs.len() as u16).to_le_bytes());
        put_runs(&mut out, runs);
        out.extend_from_slice(&crc.to_le_bytes());
        let payload_at = out.len();
        let used = if codec.compress_append(raw, &mut out)? {
            codec
        } else {
            out.extend_from_slice(raw);
            Codec::None
        };
        out[codec_at] = used.id();
        let body_len = (out.len() - FRAME_HEADER_LEN) as u32;
        out[..4].copy_from_slice(&body_len.to_le_bytes());
        Ok(EncodedBatch {
            payload_len: out.len() - payload_at,
            bytes: out,
            pages,
            codec: used,
        })
    }
}

/// Pages that are all zero on the source: the target writes zeros (no payload travels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZeroPages {
    pub round: u32,
    pub runs: Vec<PageRun>,
}

impl ZeroPages {
    /// Encodes as a complete frame.
    pub fn encode(round: u32, runs: &[PageRun]) -> Result<EncodedBatch, WireError> {
        let pages = checked_page_count(runs)?;
        let body_len = 4 + 2 + runs.len() * 12 + 4;
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body_len);
        out.extend_from_slice(&(body_len as u32).to_le_bytes());
        out.push(FrameType::ZeroPages as u8);
        out.extend_from_slice(&round.to_le_bytes());
        out.extend_from_slice(&(runs.len() as u16).to_le_bytes());
        put_runs(&mut out, runs);
        out.extend_from_slice(&batch_crc(round, runs, &[]).to_le_bytes());
        Ok(EncodedBatch {
            bytes: out,
            pages,
            codec: Codec::None,
            payload_len: 0,
        })
    }
}

/// Bytes of a file or a byte stream at `offset`, compressed when that pays, with a
/// CRC32 of the raw bytes. Carries disk images (cold migration), tunnelled NBD traffic and
/// QEMU's device state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataChunk {
    pub offset: u64,
    /// The codec the payload travelled with.
    pub codec: Codec,
    pub data: Vec<u8>,
    /// Payload bytes on the wire (compressed size).
    pub wire_payload: usize,
}

impl DataChunk {
    /// Encodes `raw` (at most [`MAX_CHUNK`] bytes) at `offset` as a complete frame.
    pub fn encode(offset: u64, raw: &[u8], codec: Codec) -> Result<Vec<u8>, WireError> {
        if raw.is_empty() || raw.len() > MAX_CHUNK {
            return Err(WireError::InvalidBatch(format!(
                "chunk of {} bytes (must be 1..={MAX_CHUNK})",
                raw.len()
            )));
        }
        let crc = chunk_crc(offset, raw);
        let compressed = codec.compress(raw)?;
        let (used, payload): (Codec, &[u8]) = match &compressed {
            Some(c) => (codec, c.as_slice()),
            None => (Codec::None, raw),
        };
        let body_len = 8 + 1 + 4 + 4 + payload.len();
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body_len);
        out.extend_from_slice(&(body_len as u32).to_le_bytes());
        out.push(FrameType::Chunk as u8);
        out.extend_from_slice(&offset.to_le_bytes());
        out.push(used.id());
        out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(payload);
        Ok(out)
    }
}

/// The receiving side of a byte stream carried as [`DataChunk`] frames (the NBD tunnel, the
/// device state):
/// every frame must be a chunk, and chunks must follow each other without gap or overlap.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChunkSequence {
    next: u64,
}

impl ChunkSequence {
    /// Takes the next frame of the stream; returns the bytes it adds.
    pub fn accept(&mut self, frame: Frame) -> Result<Vec<u8>, WireError> {
        let Frame::Chunk(c) = frame else {
            return Err(WireError::InvalidBatch(
                "a byte stream carries data chunks only".into(),
            ));
        };
        if c.offset != self.next {
            return Err(WireError::InvalidBatch(format!(
                "chunk at offset {} where {} was due",
                c.offset, self.next
            )));
        }
        self.next = self
            .next
            .checked_add(c.data.len() as u64)
            .ok_or_else(|| WireError::InvalidBatch("stream offset overflows".into()))?;
        Ok(c.data)
    }

    /// Bytes of the stream accepted so far.
    pub fn position(&self) -> u64 {
        self.next
    }
}

/// Largest [`DataChunk`] payload before compression.
pub const MAX_CHUNK: usize = 1 << 20;

/// A frame ready to send, with what it carries for the statistics.
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    /// The whole frame, header included.
    pub bytes: Vec<u8>,
    pub pages: usize,
    /// The codec actually used (`None` when compression did not pay).
    pub codec: Codec,
    pub payload_len: usize,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Control(ControlMessage),
    Pages(PageBatch),
    ZeroPages(ZeroPages),
    Chunk(DataChunk),
}

impl Frame {
    /// The pre-copy round a page frame belongs to (`None` for control and chunk frames).
    pub fn round(&self) -> Option<u32> {
        match self {
            Frame::Pages(b) => Some(b.round),
            Frame::ZeroPages(z) => Some(z.round),
            Frame::Control(_) | Frame::Chunk(_) => None,
        }
    }

    /// The frame's decoded data buffer (pages or a chunk), to decode the next frame into
    /// with [`Frame::decode_body_reusing`]; empty for other frames.
    pub fn into_data(self) -> Vec<u8> {
        match self {
            Frame::Pages(b) => b.data,
            Frame::Chunk(c) => c.data,
            Frame::Control(_) | Frame::ZeroPages(_) => Vec::new(),
        }
    }

    /// Parses a frame header: the body length (checked against [`MAX_FRAME_BODY`]) and type.
    pub fn parse_header(h: &[u8]) -> Result<(FrameType, usize), WireError> {
        if h.len() < FRAME_HEADER_LEN {
            return Err(WireError::Truncated {
                what: "frame header",
                need: FRAME_HEADER_LEN,
                have: h.len(),
            });
        }
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len > MAX_FRAME_BODY {
            return Err(WireError::FrameTooLarge {
                len,
                max: MAX_FRAME_BODY,
            });
        }
        Ok((FrameType::from_u8(h[4])?, len))
    }

    /// Decodes a frame body of the given type.
    pub fn decode_body(ty: FrameType, body: &[u8]) -> Result<Frame, WireError> {
        Self::decode_body_reusing(ty, body, Vec::new())
    }

    /// [`Frame::decode_body`] with `spare` (a buffer [`Frame::into_data`] gave back) as
    /// the decoded data's buffer: a receiver decoding 1 MiB batches one after another
    /// allocates, zeroes and faults in no fresh buffer per batch.
    pub fn decode_body_reusing(
        ty: FrameType,
        body: &[u8],
        spare: Vec<u8>,
    ) -> Result<Frame, WireError> {
        // Every byte is overwritten: decompressing checks it filled the whole length.
        let sized = |mut buf: Vec<u8>, len: usize| {
            buf.resize(len, 0);
            buf
        };
        let mut r = Reader { buf: body, pos: 0 };
        let frame = match ty {
            FrameType::Control => {
                let crc = r.u32("control checksum")?;
                let msg = r.rest();
                let actual = crc32fast::hash(msg);
                if actual != crc {
                    return Err(WireError::ChecksumMismatch {
                        expected: crc,
                        actual,
                    });
                }
                return Ok(Frame::Control(ControlMessage::from_bytes(msg)?));
            }
            FrameType::ZeroPages => {
                let round = r.u32("zero-pages round")?;
                let runs = r.runs()?;
                checked_page_count(&runs)?;
                let crc = r.u32("zero-pages checksum")?;
                let actual = batch_crc(round, &runs, &[]);
                if actual != crc {
                    return Err(WireError::ChecksumMismatch {
                        expected: crc,
                        actual,
                    });
                }
                Frame::ZeroPages(ZeroPages { round, runs })
            }
            FrameType::Chunk => {
                let offset = r.u64("chunk offset")?;
                let codec = Codec::from_id(r.u8("chunk codec")?)?;
                let raw_len = r.u32("chunk length")? as usize;
                if raw_len == 0 || raw_len > MAX_CHUNK {
                    return Err(WireError::InvalidBatch(format!(
                        "chunk of {raw_len} bytes (must be 1..={MAX_CHUNK})"
                    )));
                }
                let crc = r.u32("chunk checksum")?;
                let payload = r.rest();
                let mut data = sized(spare, raw_len);
                codec.decompress_into(payload, &mut data)?;
                let actual = chunk_crc(offset, &data);
                if actual != crc {
                    return Err(WireError::ChecksumMismatch {
                        expected: crc,
                        actual,
                    });
                }
                return Ok(Frame::Chunk(DataChunk {
                    offset,
                    codec,
                    data,
                    wire_payload: payload.len(),
                }));
            }
            FrameType::Pages => {
                let round = r.u32("batch round")?;
                let codec = Codec::from_id(r.u8("batch codec")?)?;
                let runs = r.runs()?;
                let pages = checked_page_count(&runs)?;
                let crc = r.u32("batch checksum")?;
                let payload = r.rest();
                let mut data = sized(spare, pages * PAGE_SIZE);
                codec.decompress_into(payload, &mut data)?;
                let actual = batch_crc(round, &runs, &data);
                if actual != crc {
                    return Err(WireError::ChecksumMismatch {
                        expected: crc,
                        actual,
                    });
                }
                return Ok(Frame::Pages(PageBatch {
                    round,
                    codec,
                    runs,
                    data,
                    wire_payload: payload.len(),
                }));
            }
        };
        if r.pos != body.len() {
            return Err(WireError::TrailingBytes(body.len() - r.pos));
        }
        Ok(frame)
    }

    /// Decodes one whole frame from the front of `buf`; returns it and the bytes consumed.
    pub fn decode(buf: &[u8]) -> Result<(Frame, usize), WireError> {
        let (ty, len) = Frame::parse_header(buf)?;
        let end = FRAME_HEADER_LEN + len;
        if buf.len() < end {
            return Err(WireError::Truncated {
                what: "frame body",
                need: end,
                have: buf.len(),
            });
        }
        Ok((Frame::decode_body(ty, &buf[FRAME_HEADER_LEN..end])?, end))
    }

    /// Encodes a control message as a complete frame.
    pub fn encode_control(msg: &ControlMessage) -> Result<Vec<u8>, WireError> {
        let body = msg.to_bytes()?;
        if body.len() + 4 > MAX_FRAME_BODY {
            return Err(WireError::FrameTooLarge {
                len: body.len() + 4,
                max: MAX_FRAME_BODY,
            });
        }
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + 4 + body.len());
        out.extend_from_slice(&((body.len() + 4) as u32).to_le_bytes());
        out.push(FrameType::Control as u8);
        // A checksum here too: one flipped bit must not turn another frame into a
        // control message (found by the page_batch_integrity fuzz target).
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }
}

/// CRC32 of a page batch: its round, its page numbers and its raw pages. A flipped bit
/// anywhere, page numbers included, fails the check (a batch written to the wrong pages
/// would otherwise decode cleanly).
fn batch_crc(round: u32, runs: &[PageRun], raw: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&round.to_le_bytes());
    for run in runs {
        h.update(&run.first.to_le_bytes());
        h.update(&run.count.to_le_bytes());
    }
    h.update(raw);
    h.finalize()
}

/// CRC32 of a data chunk: its offset and its raw bytes.
fn chunk_crc(offset: u64, raw: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&offset.to_le_bytes());
    h.update(raw);
    h.finalize()
}

fn put_runs(out: &mut Vec<u8>, runs: &[PageRun]) {
    for run in runs {
        out.extend_from_slice(&run.first.to_le_bytes());
        out.extend_from_slice(&run.count.to_le_bytes());
    }
}

/// Total pages of `runs`, rejecting empty runs, overflow and oversized batches.
fn checked_page_count(runs: &[PageRun]) -> Result<usize, WireError> {
    if runs.len() > MAX_RUNS {
        return Err(WireError::InvalidBatch(format!(
            "{} runs (max {MAX_RUNS})",
            runs.len()
        )));
    }
    let mut total = 0usize;
    for run in runs {
        if run.count == 0 {
            return Err(WireError::InvalidBatch("empty page run".into()));
        }
        if run.first.checked_add(u64::from(run.count)).is_none() {
            return Err(WireError::InvalidBatch(format!(
                "page run at {} overflows",
                run.first
            )));
        }
        total = total.saturating_add(run.count as usize);
    }
    if total == 0 || total > MAX_BATCH_PAGES {
        return Err(WireError::InvalidBatch(format!(
            "{total} pages (must be 1..={MAX_BATCH_PAGES})"
        )));
    }
    Ok(total)
}

/// Bounds-checked little-endian reader.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(WireError::Truncated {
                what,
                need: self.pos.saturating_add(n),
                have: self.buf.len(),
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn runs(&mut self) -> Result<Vec<PageRun>, WireError> {
        let n = self.u16("run count")? as usize;
        if n > MAX_RUNS {
            return Err(WireError::InvalidBatch(format!(
                "{n} runs (max {MAX_RUNS})"
            )));
        }
        let mut runs = Vec::with_capacity(n);
        for _ in 0..n {
            runs.push(PageRun {
                first: self.u64("run start")?,
                count: self.u32("run length")?,
            });
        }
        Ok(runs)
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn data_chunks_round_trip_compressed_and_raw() {
        let text: Vec<u8> = b"ferry moves disks "
            .iter()
            .copied()
            .cycle()
            .take(300_000)
            .collect();
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 1 }] {
            let bytes = DataChunk::encode(7 << 20, &text, codec).expect("encode");
            if codec != Codec::None {
                assert!(
                    bytes.len() < text.len() / 4,
                    "{codec}: {} bytes",
                    bytes.len()
                );
            }
            let (frame, used) = Frame::decode(&bytes).expect("decode");
            assert_eq!(used, bytes.len());
            match frame {
                Frame::Chunk(c) => {
                    assert_eq!(c.offset, 7 << 20);
                    assert_eq!(c.data, text);
                }
                other => panic!("decoded {other:?}"),
            }
        }
    }

    #[test]
    fn a_reused_buffer_holds_exactly_the_next_frame() {
        let run = |first, count| PageRun { first, count };
        let big: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        let small = vec![9u8; PAGE_SIZE];
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 1 }] {
            let body = |bytes: &[u8]| {
                let (ty, len) = Frame::parse_header(bytes).expect("header");
                (ty, bytes[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len].to_vec())
            };
            let (ty, b) = body(
                &PageBatch::encode(1, &[run(0, 4)], &big, codec)
                    .expect("encode")
                    .bytes,
            );
            let spare = Frame::decode_body_reusing(ty, &b, Vec::new())
                .expect("decode")
                .into_data();
            assert_eq!(spare, big, "{codec}");
            // A smaller batch into the larger buffer: its own bytes, not the tail of the last.
            let (ty, b) = body(
                &PageBatch::encode(2, &[run(8, 1)], &small, codec)
                    .expect("encode")
                    .bytes,
            );
            match Frame::decode_body_reusing(ty, &b, spare.clone()).expect("decode") {
                Frame::Pages(p) => assert_eq!(p.data, small, "{codec}"),
                other => panic!("decoded {other:?}"),
            }
            // A corrupt payload never passes for the buffer's old contents.
            let mut bad = b.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0x55;
            assert!(
                Frame::decode_body_reusing(ty, &bad, spare).is_err(),
                "{codec}: corrupt frame decoded"
            );
        }
    }

    #[test]
    fn checksums_cover_page_numbers_round_and_offset() {
        // A page batch whose page number is flipped must not decode (it would write the
        // right bytes to the wrong page).
        let runs = [
            PageRun {
                first: 10,
                count: 2,
            },
            PageRun {
                first: 40,
                count: 1,
            },
        ];
        let raw = vec![7u8; 3 * PAGE_SIZE];
        for codec in [Codec::None, Codec::Lz4] {
            let good = PageBatch::encode(3, &runs, &raw, codec)
                .expect("encode")
                .bytes;
            assert!(Frame::decode(&good).is_ok());
            // Body: round (4) | codec (1) | run count (2) | runs (12 each) | crc | payload.
            let first_run = FRAME_HEADER_LEN + 4 + 1 + 2;
            for (what, at) in [
                ("page number", first_run),
                ("second run", first_run + 12),
                ("round", FRAME_HEADER_LEN),
            ] {
                let mut bad = good.clone();
                bad[at] ^= 1;
                assert!(
                    matches!(Frame::decode(&bad), Err(WireError::ChecksumMismatch { .. })),
                    "{codec}: a flipped {what} must fail the checksum"
                );
            }
            // A flipped count changes the size the payload must decompress to.
            let mut bad = good.clone();
            bad[first_run + 8] ^= 1;
            assert!(Frame::decode(&bad).is_err(), "{codec}: a flipped count");
        }
        let good = ZeroPages::encode(5, &runs).expect("encode").bytes;
        assert!(Frame::decode(&good).is_ok());
        let mut bad = good.clone();
        bad[FRAME_HEADER_LEN + 4 + 2] ^= 4;
        assert!(matches!(
            Frame::decode(&bad),
            Err(WireError::ChecksumMismatch { .. })
        ));
        let good = DataChunk::encode(1 << 20, &[3u8; 4096], Codec::None).expect("encode");
        let mut bad = good.clone();
        bad[FRAME_HEADER_LEN + 2] ^= 1;
        assert!(
            matches!(Frame::decode(&bad), Err(WireError::ChecksumMismatch { .. })),
            "a flipped chunk offset must fail the checksum"
        );
    }

    #[test]
    fn data_chunk_errors() {
        assert!(DataChunk::encode(0, &[], Codec::None).is_err());
        assert!(DataChunk::encode(0, &vec![1u8; MAX_CHUNK + 1], Codec::None).is_err());
        let mut bytes = DataChunk::encode(0, &[9u8; 4096], Codec::None).expect("encode");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            Frame::decode(&bytes),
            Err(WireError::ChecksumMismatch { .. })
        ));
        // A length field that promises more than MAX_CHUNK is refused before allocating.
        let mut bytes = DataChunk::encode(0, &[9u8; 16], Codec::None).expect("encode");
        bytes[FRAME_HEADER_LEN + 9..FRAME_HEADER_LEN + 13].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Frame::decode(&bytes),
            Err(WireError::InvalidBatch(_))
        ));
    }

    use super::*;

    fn sample_pages(n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n * PAGE_SIZE);
        for p in 0..n {
            for i in 0..PAGE_SIZE {
                v.push(if p % 2 == 0 {
                    b"guest memory "[i % 13]
                } else {
                    ((i * 31 + p * 7) % 251) as u8
                });
            }
        }
        v
    }

    #[test]
    fn stream_header_round_trip_and_errors() {
        let h = StreamHeader::new(StreamKind::Pages, 3);
        assert_eq!(StreamHeader::decode(&h.encode()), Ok(h));
        assert!(matches!(
            StreamHeader::decode(b"HTTP/1.1"),
            Err(WireError::BadMagic(_))
        ));
        let mut b = h.encode();
        b[4] = 99;
        assert!(matches!(
            StreamHeader::decode(&b),
            Err(WireError::UnsupportedVersion { got: 99, .. })
        ));
        assert!(matches!(
            StreamHeader::decode(&b[..3]),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn page_batch_round_trip_each_codec() {
        let runs = [
            PageRun {
                first: 10,
                count: 3,
            },
            PageRun {
                first: 100,
                count: 1,
            },
        ];
        let raw = sample_pages(4);
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 3 }] {
            let enc = PageBatch::encode(7, &runs, &raw, codec).unwrap();
            let (frame, used) = Frame::decode(&enc.bytes).unwrap();
            assert_eq!(used, enc.bytes.len());
            match frame {
                Frame::Pages(b) => {
                    assert_eq!(b.round, 7);
                    assert_eq!(b.runs, runs);
                    assert_eq!(b.data, raw);
                    assert_eq!(
                        b.codec.id(),
                        enc.codec.id(),
                        "decoders know the codec, not its level"
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
            if codec != Codec::None {
                assert!(
                    enc.payload_len < raw.len(),
                    "{codec} should shrink the sample"
                );
            }
        }
    }

    #[test]
    fn zero_pages_and_control_round_trip() {
        let runs = [PageRun {
            first: 0,
            count: 1024,
        }];
        let enc = ZeroPages::encode(2, &runs).unwrap();
        assert_eq!(
            Frame::decode(&enc.bytes).unwrap().0,
            Frame::ZeroPages(ZeroPages {
                round: 2,
                runs: runs.to_vec()
            })
        );
        let msg = ControlMessage::RoundEnd {
            round: 4,
            batches_total: 99,
        };
        let bytes = Frame::encode_control(&msg).unwrap();
        assert_eq!(Frame::decode(&bytes).unwrap().0, Frame::Control(msg));
    }

    #[test]
    fn corrupt_payload_is_detected() {
        let runs = [PageRun { first: 0, count: 2 }];
        let raw = sample_pages(2);
        let mut enc = PageBatch::encode(1, &runs, &raw, Codec::None)
            .unwrap()
            .bytes;
        let last = enc.len() - 1;
        enc[last] ^= 0xff;
        assert!(matches!(
            Frame::decode(&enc),
            Err(WireError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn rejects_oversized_and_empty_batches() {
        let too_many = [PageRun {
            first: 0,
            count: (MAX_BATCH_PAGES + 1) as u32,
        }];
        assert!(PageBatch::encode(0, &too_many, &[], Codec::None).is_err());
        assert!(ZeroPages::encode(0, &[PageRun { first: 5, count: 0 }]).is_err());
        assert!(ZeroPages::encode(
            0,
            &[PageRun {
                first: u64::MAX,
                count: 2
            }]
        )
        .is_err());
        let mut huge = vec![0u8; 5];
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[4] = 2;
        assert!(matches!(
            Frame::decode(&huge),
            Err(WireError::FrameTooLarge { .. })
        ));
    }
}
