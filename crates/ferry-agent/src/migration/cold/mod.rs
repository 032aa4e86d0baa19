//! Cold (offline) migration: a stopped VM's disk images and its definition move to another
//! host, like `virsh migrate --offline --persistent [--undefinesource]` with the disks
//! copied.
//!
//! **Source** ([`start`]): the VM must be stopped (or is stopped first with `stop_source`)
//! and is marked busy so it cannot be started meanwhile. Every image file of every disk,
//! backing layers included, is confined to the storage roots, inspected, hashed (BLAKE3)
//! and named relative to its root, as live migration names disks: the target maps the name
//! into its own roots (hosts may mount storage at different paths) and, at [`finish`],
//! points each received overlay's backing reference at the new place of the layer below. The target is asked to prepare ([`prepare`]); then each image that is not
//! already there travels on a QUIC unidirectional stream of its own:
//!
//! ```text
//! StreamHeader(DiskImage, index) | Control(DiskImageBegin{id, token, index, offset})
//!   | Chunk(offset, data)* | Control(DiskImageEnd{length}) | FIN
//! ```
//!
//! Holes and all-zero chunks are never sent; chunks are compressed with the requested
//! codec. Once the target has read every stream, [`finish`] defines the VM there
//! (optionally starting it) and the source undefines its copy (`undefine_source`, image
//! files stay) or releases it (stopped, still defined).
//!
//! **Target**: [`prepare`] checks everything before creating anything (VM name free, every
//! path inside its storage roots, no different file at a path, room for what is missing),
//! then opens a resumable [`PartialImage`] per image. Each stream writes its image,
//! checkpoints every 64 MiB or 2 s, and at the end verifies the BLAKE3 end to end before
//! the image takes its final name.
//!
//! **Failure**: the source calls [`abort`]; the target drops the name reservation and its
//! partial images *without* deleting the part files, so the next attempt with unchanged
//! images resumes where this one stopped (the transfer id is derived from the source host,
//! path, length and digest). Only an operator's cancel discards them. The source VM is
//! never changed by a failure.
//!
//! The target's registry of cold migrations is process-wide ([`serve_disk_streams`] is
//! reached from the QUIC accept path, which has no [`AgentCtx`]); one agent runs per
//! process.

mod source;
mod target;

pub use source::start;
pub use target::{abort, finish, prepare, serve_disk_streams, ColdRegistry};

use std::time::Duration;

/// The target makes received data durable after this many bytes…
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// …or after this long, whichever comes first: on a slow link 64 MiB can take minutes,
/// all of which an interruption would otherwise throw away.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);
/// Images sent at the same time (each on its own stream): two keep a 2-core host busy
/// reading and compressing without thrashing the disks.
const STREAMS_AT_ONCE: usize = 2;
/// How often the source publishes progress while copying.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// How long a finished or failed incoming migration is remembered (idempotent Finish,
/// the reason of a failure for the source's Abort).
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);
/// How long Finish waits for the last images to be verified (hashing a large image).
const FINISH_WAIT: Duration = Duration::from_secs(1800);
/// Time a new stream has to say which migration it belongs to.
const STREAM_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
