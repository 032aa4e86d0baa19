//! Messages on the control stream (one bidirectional stream per migration).

use serde::{Deserialize, Serialize};

/// A control-stream message. Encoded with postcard inside a [`crate::Frame::Control`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// First message from the source: who it is and what it will send.
    Hello {
        version: u8,
        migration_id: String,
        /// One-time token the target handed out in Prepare.
        token: String,
        ram_bytes: u64,
        page_size: u32,
        page_streams: u16,
    },
    /// The target accepts the migration.
    HelloOk { version: u8 },
    /// The source finished round `round`; `batches_total` frames (page and zero batches)
    /// have been sent on all page streams since the start of the migration.
    RoundEnd { round: u32, batches_total: u64 },
    /// The target has written every batch of round `round` and of the rounds before it:
    /// `batches_applied` of them (batches of later rounds, already arriving while pre-copy
    /// rounds overlap, are not counted).
    RoundApplied { round: u32, batches_applied: u64 },
    /// The source asks for the fingerprint of the target's RAM file (both sides paused).
    DigestRequest,
    /// XXH3-128 content fingerprint of the target's whole RAM file (see
    /// `ferry_memory::RamFile::fingerprint`), little-endian.
    Digest { xxh3_128: [u8; 16] },
    /// The target QEMU finished loading the device state (or failed to).
    DeviceStateLoaded { ok: bool, error: Option<String> },
    /// Something went wrong on the sender's side; the migration is over.
    Error { message: String },
    /// First frame of a cold migration's disk-image stream: which migration (and its
    /// one-time token), which image, and the offset the data starts at (the target's
    /// resume offset).
    DiskImageBegin {
        migration_id: String,
        token: String,
        index: u32,
        offset: u64,
    },
    /// Last frame of a disk-image stream: the sender scanned the whole file, `length` bytes.
    DiskImageEnd { length: u64 },
    /// Like [`ControlMessage::RoundEnd`] for the last round, sent with the guest paused:
    /// once these batches are written the target may feed the device state (which the
    /// source lets QEMU send at once) to its QEMU, and answer a `DigestRequest`.
    FinalRoundEnd {
        round: u32,
        batches_total: u64,
        verify: bool,
    },
    /// The source's decision point, sent once its QEMU has sent the device state: commit
    /// if your RAM fingerprint equals `digest` (none: not verified) and the device state
    /// loaded. The target journals, takes the VM, resumes it unless `leave_paused` and
    /// answers [`ControlMessage::Committed`], or answers `Error` and does not commit.
    Commit {
        digest: Option<[u8; 16]>,
        leave_paused: bool,
    },
    /// The target owns the VM now (Unix microseconds; `resume_unix_us` 0 if left paused).
    Committed {
        resume_unix_us: i64,
        ready_unix_us: i64,
    },
}

impl ControlMessage {
    /// Encodes to postcard bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, crate::WireError> {
        postcard::to_allocvec(self).map_err(|e| crate::WireError::Control(e.to_string()))
    }

    /// Decodes postcard bytes; any malformed input is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, crate::WireError> {
        let (msg, rest) = postcard::take_from_bytes::<ControlMessage>(bytes)
            .map_err(|e| crate::WireError::Control(e.to_string()))?;
        if !rest.is_empty() {
            return Err(crate::WireError::TrailingBytes(rest.len()));
        }
        Ok(msg)
    }
}
