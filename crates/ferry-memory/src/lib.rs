//! ferry-memory: guest RAM access and dirty-page tracking for live migration.
//!
//! * [`RamFile`]: QEMU's guest RAM file (`memory-backend-file,share=on`), mapped `MAP_SHARED`.
//! * [`DirtyBitmap`]: one bit per guest page.
//! * [`DirtyTracker`]: "which pages did the guest write since last time", implemented by
//!   [`UffdTracker`] (userfaultfd async write-protect + `PAGEMAP_SCAN`, Linux >= 6.7) and
//!   [`SoftDirtyTracker`] (needs CONFIG_MEM_SOFT_DIRTY). Never trust a tracker that has not
//!   passed [`self_test`]: a kernel without soft-dirty accepts the interface and reports nothing.
//! * [`TrackerAudit`]: during pre-copy, re-hash pages the tracker calls clean against
//!   [`PageSums`] of what was sent, so the pause need only cover what was sent.
//! * [`UFFD_SHIM_SO`] / [`install_shim`]: the LD_PRELOAD shim that creates the userfaultfd
//!   inside QEMU, where it has to live.

// `is_multiple_of` needs Rust 1.87; the workspace's rust-version is 1.85.
#![allow(clippy::manual_is_multiple_of)]

mod audit;
mod bitmap;
mod error;
pub mod maps;
mod ram;
mod selftest;
mod shim;
mod softdirty;
pub mod uffd;

pub use audit::TrackerAudit;
pub use bitmap::DirtyBitmap;
pub use error::{MemoryError, TrackerError};
pub use ram::{is_zero_page, page_sum, PageSums, RamFile};
pub use selftest::{
    choose_tracker, self_test, verify_tracker, TrackerKind, MAX_EXTRA_PAGES, MAX_IDLE_PAGES,
};
pub use shim::{install_shim, DEFAULT_SHIM_FD, SHIM_FD_ENV, SHIM_FILE_NAME, UFFD_SHIM_SO};
pub use softdirty::SoftDirtyTracker;
pub use uffd::UffdTracker;

/// Guest page size ferry works in (x86_64 base pages).
pub const PAGE_SIZE: usize = 4096;

/// Reports which guest pages were written.
///
/// Page indices are indices into the RAM *file* (the mapping's file offset is accounted for).
pub trait DirtyTracker: Send {
    /// Short name for logs and errors.
    fn name(&self) -> &'static str;
    /// Start tracking: from now on every write is reported by the next [`collect`](Self::collect).
    fn arm(&mut self) -> Result<(), TrackerError>;
    /// Pages written since `arm` or the previous `collect`; tracking continues (re-armed).
    fn collect(&mut self) -> Result<DirtyBitmap, TrackerError>;
    /// The pages [`collect`](Self::collect) would return now, without re-arming them (the
    /// next `collect` reports them again, with whatever is written meanwhile): a cheap
    /// look for deciding whether another round is needed at all. `None` where the
    /// tracker cannot look without re-arming (the default).
    fn peek(&mut self) -> Result<Option<DirtyBitmap>, TrackerError> {
        Ok(None)
    }
    /// The last collection of a migration, taken while the guest is paused: the same pages
    /// as [`collect`](Self::collect), but nothing is re-armed, and the tracker is left
    /// disarmed (`collect` fails until [`arm`](Self::arm) again). Trackers whose re-arming
    /// costs the guest nothing keep the default, a plain `collect`.
    fn collect_final(&mut self) -> Result<DirtyBitmap, TrackerError> {
        self.collect()
    }
    /// Stop tracking.
    fn disarm(&mut self) -> Result<(), TrackerError>;
}
