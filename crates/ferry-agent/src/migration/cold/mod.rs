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
//! **Who has the VM** once Finish may have reached the target: the source journals the VM
//! as held by the migration (with the migration, mark `CommitSent`) before it sends
//! Finish; the target journals the VM defined together with the migration's outcome
//! before it answers. A Finish whose answer is lost (the call's deadline, a dead
//! connection, a target that died after defining the VM), or a source restart in between,
//! is settled by asking the target ([`cold_settle`]): defined there, the source completes
//! (undefining its copy if asked); not, it releases the VM; no answer, the VM stays held
//! here (IN_DOUBT) and the source asks again. So an answer never lost makes the VM defined
//! on two hosts when `undefine_source` was asked, nor on none.
//!
//! The target's registry of cold migrations is process-wide ([`serve_disk_streams`] is
//! reached from the QUIC accept path, which has no [`AgentCtx`]); one agent runs per
//! process.

pub mod kept;
mod source;
mod target;

pub use source::{settle_after_restart, start};
pub use target::{abort, finish, prepare, serve_disk_streams, ColdRegistry};

use ferry_api::v1 as pb;
use std::time::Duration;

/// What the source of a cold migration does with the target's answer to Abort, asked
/// once Finish may have reached the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColdSettle {
    /// The VM is defined on the target: complete (undefine here if asked).
    Complete,
    /// The target did not define it and now never will (aborted now or before, or it
    /// knows no such migration: a definition is journaled with the migration's id).
    Release,
    /// No answer, or an error that says nothing about the outcome: keep the VM held and
    /// ask again.
    AskAgain,
}

/// The source's decision from the target's answer (`None`: none in time), and whether
/// the operator has declared the target gone for good (`ResolveMigration`): then a target
/// that is not reached releases the VM here. A target that answers is believed over the
/// operator. Pure.
pub fn cold_settle(
    answer: &Option<Result<pb::AbortColdMigrationResponse, tonic::Status>>,
    target_declared_gone: bool,
) -> ColdSettle {
    match answer {
        Some(Ok(r)) if r.finished => ColdSettle::Complete,
        Some(Ok(_)) => ColdSettle::Release,
        _ if target_declared_gone && !crate::tls::reached(answer) => ColdSettle::Release,
        _ => ColdSettle::AskAgain,
    }
}

/// What the target of a cold migration does when its source says it took the VM back on
/// its operator's verdict (an Abort marked `taken_back`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColdTakenBack {
    /// The VM this migration defined here has not started since: its definition goes
    /// (its images stay: data is never removed on a verdict).
    Undefine,
    /// No VM of that name here (never defined, or removed since): nothing to undo.
    NothingHere,
    /// The VM is busy (a migration of it under way): tell again later.
    Busy,
    /// It has started since (or the name is another VM's now): it stays, and the VM is
    /// defined on two hosts — the operator's to settle.
    Stays,
}

/// A VM of the migration's name on the target, as [`cold_taken_back`] needs it.
#[derive(Debug, Clone, Copy)]
pub struct DefinedHere<'a> {
    /// The cold migration that defined it here and that it has not started since.
    pub arrived_by: Option<&'a str>,
    /// Something is under way with it (a migration, a start).
    pub busy: bool,
}

/// The target's decision on the news that migration `migration`'s VM was taken back by
/// its source, from the VM of that name here, if any. Only a definition this very
/// migration made and that never started goes: a VM that started since has a life of its
/// own here (its disks may have changed). Pure.
pub fn cold_taken_back(here: Option<DefinedHere<'_>>, migration: &str) -> ColdTakenBack {
    match here {
        None => ColdTakenBack::NothingHere,
        Some(h) if h.arrived_by != Some(migration) => ColdTakenBack::Stays,
        Some(h) if h.busy => ColdTakenBack::Busy,
        Some(_) => ColdTakenBack::Undefine,
    }
}

/// The speed at which the source assumes the target reads the images it already has when
/// it hashes them in Prepare (a slow disk's; BLAKE3 itself runs at GB/s).
const PRESENT_HASH_BYTES_PER_S: u64 = 100 << 20;

/// How long the source waits for the target's Prepare: the peer calls' deadline `base`,
/// plus reading `image_bytes` once at [`PRESENT_HASH_BYTES_PER_S`] — the target hashes
/// every image it already has, to skip identical ones, before it answers. Pure.
pub fn prepare_deadline(base: Duration, image_bytes: u64) -> Duration {
    base + Duration::from_secs(image_bytes / PRESENT_HASH_BYTES_PER_S)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(
        existed: bool,
        finished: bool,
    ) -> Option<Result<pb::AbortColdMigrationResponse, tonic::Status>> {
        Some(Ok(pb::AbortColdMigrationResponse {
            existed,
            finished,
            error: String::new(),
        }))
    }

    #[test]
    fn only_the_targets_own_answer_settles_a_cold_finish() {
        assert_eq!(
            cold_settle(&answer(true, true), false),
            ColdSettle::Complete
        );
        // Known and aborted (now or before), or unknown: the target never defined it.
        assert_eq!(
            cold_settle(&answer(true, false), false),
            ColdSettle::Release
        );
        assert_eq!(
            cold_settle(&answer(false, false), false),
            ColdSettle::Release
        );
        // Silence or an error (unreachable, its journal unreadable, a refusal) says
        // nothing about where the VM is.
        assert_eq!(cold_settle(&None, false), ColdSettle::AskAgain);
        assert_eq!(
            cold_settle(&Some(Err(tonic::Status::unavailable("journal"))), false),
            ColdSettle::AskAgain
        );
        assert_eq!(
            cold_settle(&Some(Err(tonic::Status::permission_denied("token"))), false),
            ColdSettle::AskAgain
        );
    }

    #[test]
    fn only_a_definition_the_migration_made_and_never_started_goes_when_taken_back() {
        let here = |arrived_by, busy| Some(DefinedHere { arrived_by, busy });
        assert_eq!(
            cold_taken_back(here(Some("m1"), false), "m1"),
            ColdTakenBack::Undefine
        );
        assert_eq!(cold_taken_back(None, "m1"), ColdTakenBack::NothingHere);
        // Started since (the mark cleared), or another migration's VM of that name.
        assert_eq!(
            cold_taken_back(here(None, false), "m1"),
            ColdTakenBack::Stays
        );
        assert_eq!(
            cold_taken_back(here(Some("m2"), false), "m1"),
            ColdTakenBack::Stays
        );
        assert_eq!(
            cold_taken_back(here(None, true), "m1"),
            ColdTakenBack::Stays
        );
        assert_eq!(
            cold_taken_back(here(Some("m1"), true), "m1"),
            ColdTakenBack::Busy
        );
    }

    #[test]
    fn the_prepare_deadline_covers_reading_the_images_once() {
        let base = Duration::from_secs(60);
        assert_eq!(prepare_deadline(base, 0), base);
        assert_eq!(prepare_deadline(base, 50 << 20), base);
        // 500 GiB at 100 MiB/s: 5120 s more.
        assert_eq!(
            prepare_deadline(base, 500 << 30),
            base + Duration::from_secs(5120)
        );
    }

    #[test]
    fn a_target_declared_gone_releases_the_vm_only_while_it_is_not_reached() {
        assert_eq!(cold_settle(&None, true), ColdSettle::Release);
        for s in [
            tonic::Status::unavailable("connect"),
            tonic::Status::deadline_exceeded("slow"),
        ] {
            assert_eq!(cold_settle(&Some(Err(s)), true), ColdSettle::Release);
        }
        // It answered: believed, whatever the operator said.
        assert_eq!(cold_settle(&answer(true, true), true), ColdSettle::Complete);
        assert_eq!(cold_settle(&answer(true, false), true), ColdSettle::Release);
        assert_eq!(
            cold_settle(&Some(Err(tonic::Status::permission_denied("token"))), true),
            ColdSettle::AskAgain
        );
    }
}
