//! Typed errors for guest RAM access and dirty-page tracking.

use std::io;
use std::path::PathBuf;

/// Errors from [`crate::RamFile`] and [`crate::DirtyBitmap`].
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// An OS call on the RAM file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing ("open", "mmap", "set_len", ...).
        op: &'static str,
        /// The RAM file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A page index beyond the end of the RAM file (or bitmap).
    #[error("page {idx} out of range ({pages} pages)")]
    PageOutOfRange {
        /// The offending index (first page of the range for multi-page calls).
        idx: u64,
        /// How many pages the object has.
        pages: u64,
    },
    /// A caller buffer whose length is not what the call needs.
    #[error("buffer of {got} bytes, expected {expected}")]
    BufferSize {
        /// Required length in bytes.
        expected: usize,
        /// Length the caller passed.
        got: usize,
    },
    /// The RAM file's size is zero or not a whole number of pages.
    #[error("{path}: size {len} is not a non-zero multiple of the {page} byte page size", page = crate::PAGE_SIZE)]
    BadSize {
        /// The RAM file.
        path: PathBuf,
        /// Its size in bytes.
        len: u64,
    },
    /// A write on a RAM file opened read-only.
    #[error("{path} is mapped read-only")]
    ReadOnly {
        /// The RAM file.
        path: PathBuf,
    },
}

/// Errors from dirty-page trackers, their attach step and their self-test.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// A system call failed; `step` says which one and on what, e.g.
    /// "UFFDIO_API on uffd taken from pid 1234".
    #[error("{step}: {source}")]
    Os {
        /// Human readable description of the failing step.
        step: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The RAM file is not mapped (exactly once, with the expected length) in the target.
    #[error("no unique mapping of {path} with length {len} in pid {pid}: {detail}")]
    MappingNotFound {
        /// Target process.
        pid: i32,
        /// The RAM file we looked for.
        path: PathBuf,
        /// Expected mapping length in bytes.
        len: u64,
        /// What was found instead.
        detail: String,
    },
    /// The kernel or the target lacks something the tracker needs.
    #[error("{0}")]
    Unsupported(String),
    /// `collect` was called on a tracker that is not armed.
    #[error("{tracker}: collect() called while not armed")]
    NotArmed {
        /// Tracker name.
        tracker: &'static str,
    },
    /// The self-test wrote pages the tracker did not report: the tracker is not usable.
    #[error("{tracker} self-test failed: written pages not reported: {missing:?}")]
    SelfTestFailed {
        /// Tracker name.
        tracker: &'static str,
        /// Pages that were written but not reported.
        missing: Vec<u64>,
    },
    /// The tracker reported far more pages than were written: useless (or broken) tracking.
    #[error(
        "{tracker} self-test failed: {phase}: reported {reported} pages, at most {limit} allowed"
    )]
    SelfTestNoisy {
        /// Tracker name.
        tracker: &'static str,
        /// Which check ("after writing N pages", "after no writes").
        phase: String,
        /// How many pages were reported.
        reported: u64,
        /// The largest acceptable count.
        limit: u64,
    },
    /// No tracker passed its self-test; one entry per tracker tried.
    #[error("no usable dirty-page tracker: {}", fmt_failures(.failures))]
    NoUsableTracker {
        /// (tracker name, why it failed), in the order tried.
        failures: Vec<(&'static str, TrackerError)>,
    },
    /// An error from the RAM file layer (used by the self-test).
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

fn fmt_failures(failures: &[(&'static str, TrackerError)]) -> String {
    failures
        .iter()
        .map(|(name, e)| format!("[{name}: {e}]"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl TrackerError {
    /// Wrap the current `errno` with a step description.
    pub(crate) fn last_os(step: impl Into<String>) -> Self {
        TrackerError::Os {
            step: step.into(),
            source: io::Error::last_os_error(),
        }
    }

    /// Wrap an `io::Error` with a step description.
    pub(crate) fn io(step: impl Into<String>, source: io::Error) -> Self {
        TrackerError::Os {
            step: step.into(),
            source,
        }
    }
}
