//! ferry's data-plane wire format: the bytes that travel on the QUIC streams between
//! two agents during a migration.
//!
//! This crate knows nothing about sockets, QUIC or QEMU; it turns typed values into bytes
//! and back, and its decoder returns an error — never panics — on any input. The layout is
//! documented in `ARCHITECTURE.md` ("Wire format").
//!
//! * Every stream starts with a [`StreamHeader`] naming its [`StreamKind`].
//! * Control and page streams then carry [`Frame`]s: `u32 length | u8 type | body`.
//! * The device-state stream carries QEMU's own migration bytes, unframed.

mod codec;
mod control;
mod frame;

pub use codec::{Codec, CodecError};
pub use control::ControlMessage;
pub use frame::{
    ChunkSequence, DataChunk, EncodedBatch, Frame, FrameType, PageBatch, PageRun, StreamHeader,
    StreamKind, ZeroPages, FRAME_HEADER_LEN, MAX_BATCH_PAGES, MAX_CHUNK, MAX_FRAME_BODY,
    STREAM_HEADER_LEN,
};

/// Version of the data-plane protocol this build speaks (see [`version_supported`]).
/// 2: page-batch, zero-page and chunk checksums cover page numbers, round and offset;
/// control frames carry a checksum too.
/// 3: the RAM fingerprint both sides compare is a sum of per-page terms (kept up to date as
/// pages are written, read in O(1) in the pause); a version-2 peer's fingerprint differs.
/// The device-state stream carries [`DataChunk`] frames (compressed), not raw bytes.
pub const PROTOCOL_VERSION: u8 = 3;

/// The oldest version this build still serves: version 2 computes another RAM fingerprint
/// (every verified migration would fail), version 1's checksums covered the page bytes only.
pub const OLDEST_SUPPORTED_VERSION: u8 = 3;

/// Guest page size the wire format is written for.
pub const PAGE_SIZE: usize = 4096;

/// Whether a peer speaking `version` can be served: from [`OLDEST_SUPPORTED_VERSION`] to
/// [`PROTOCOL_VERSION`] (the current one and any earlier one that still interoperates:
/// none today).
pub fn version_supported(version: u8) -> bool {
    (OLDEST_SUPPORTED_VERSION..=PROTOCOL_VERSION).contains(&version)
}

/// Everything that can be wrong with bytes received from a peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("bad stream magic {0:02x?} (not a ferry stream)")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {got} (this agent speaks {ours})")]
    UnsupportedVersion { got: u8, ours: u8 },
    #[error("unknown stream kind {0}")]
    UnknownStreamKind(u8),
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("invalid page batch: {0}")]
    InvalidBatch(String),
    #[error("frame checksum mismatch (page numbers, offset or data corrupted): expected {expected:08x}, computed {actual:08x}")]
    ChecksumMismatch { expected: u32, actual: u32 },
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    #[error("control message: {0}")]
    Control(String),
    #[error("{0} trailing bytes after frame body")]
    TrailingBytes(usize),
}
