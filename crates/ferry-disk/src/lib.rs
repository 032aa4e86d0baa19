//! ferry-disk: the disk-image half of ferry's disk migration.
//!
//! Everything here is synchronous and transport-agnostic: the agent calls it from
//! `spawn_blocking` and moves [`Chunk`]s and small facts (lengths, offsets, digests, token
//! values) over whatever transport it likes.
//!
//! * [`StorageRoots`]: confine every path to the configured storage directories.
//! * [`inspect`], [`backing_chain`], [`create`], [`compare`]: `qemu-img` facts and actions.
//! * [`free_bytes`], [`ensure_space`]: room on the target.
//! * [`SharedStorageToken`]: do both hosts see the same directory (then nothing is copied)?
//! * [`DataExtents`], [`ChunkReader`]: read a sparse image as non-zero chunks.
//! * [`file_blake3`]: the end-to-end digest.
//! * [`PartialImage`]: the resumable, verified receiving side; [`kept`]: the partial
//!   images failed copies kept for a resume, found and expired.
//! * [`staged`]: images made for a live migration's disks, provably its own after a crash.
//!
//! # A cold transfer (guest stopped, or the image not in use)
//!
//! The unit of transfer is the image *file* (a qcow2 file as it is, not its guest view), so
//! qcow2 metadata, snapshots and sparseness travel unchanged. A backing chain is one
//! transfer per file, lowest layer first.
//!
//! 1. **Source** confines the disk path ([`StorageRoots::confine`]), inspects it
//!    ([`inspect_as`] / [`backing_chain`]: format, sizes, backing files present), hashes it
//!    ([`file_blake3`]), and places a [`SharedStorageToken`] beside it.
//! 2. **Target** confines the destination path, answers whether it sees the token
//!    ([`SharedStorageToken::probe`]): if so the storage is shared and the disk stays where
//!    it is. Otherwise it checks room ([`ensure_space`] with the source's allocated size),
//!    opens the sink with [`PartialImage::open_or_resume`] (file length, a transfer id that
//!    changes whenever the source content may have changed) and reports
//!    [`PartialImage::resume_offset`]: 0 for a new transfer, the last checkpoint for an
//!    interrupted one.
//! 3. **Source** streams [`ChunkReader::open`]`(path, resume_offset)`: aligned chunks, holes
//!    and all-zero chunks skipped, and from time to time its [`ChunkReader::scanned_to`].
//! 4. **Target** writes each chunk ([`PartialImage::write_chunk`]) and every N MiB calls
//!    [`PartialImage::checkpoint`] with the source's position (the data is fdatasync'ed
//!    before the sidecar claims it). If the connection drops, step 2 resumes from there.
//! 5. **Target** calls [`PartialImage::finish`] with the source's digest: it hashes what
//!    arrived, and only if it matches renames it into place; a mismatch removes everything.
//!
//! Skipped chunks are never written: the part file is created at full length as one hole,
//! so the received image is as sparse as the source (sparser, where the source held
//! written zeros).

#![warn(missing_docs)]

mod error;
pub mod hash;
pub mod image;
pub mod kept;
pub mod receive;
pub mod roots;
pub mod space;
pub mod sparse;
pub mod staged;
pub mod token;

use std::fs::File;
use std::path::Path;

pub use error::DiskError;
pub use hash::{file_blake3, file_blake3_of, Blake3Digest};
pub use image::{
    backing_chain, backing_chain_as, compare, create, inspect, inspect_as, BackingInfo,
    ImageFormat, ImageInfo,
};
pub use receive::{remove_if_same_file, FileId, PartialImage};
pub use roots::StorageRoots;
pub use space::{ensure_space, existing_ancestor, free_bytes, human_bytes};
pub use sparse::{
    is_zero, Chunk, ChunkReader, ChunkStats, DataExtents, Extent, DEFAULT_CHUNK_SIZE,
};
pub use token::SharedStorageToken;

/// fsync a directory, making creations, renames and removals in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), DiskError> {
    // An empty parent means the current directory (a relative file name).
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DiskError::io("fsync directory", dir, e))
}
