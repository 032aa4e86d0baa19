//! Tracker self-tests: a tracker is only trusted after it reported pages we know were written.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{DirtyTracker, RamFile, SoftDirtyTracker, TrackerError, UffdTracker, PAGE_SIZE};

/// Pages in the self-test mapping.
const SELF_TEST_PAGES: u64 = 64;
/// Pages the self-test writes.
const SELF_TEST_WRITES: [u64; 3] = [3, 17, 40];
/// Reported-but-not-written pages tolerated in the collect after writing.
pub const MAX_EXTRA_PAGES: u64 = 8;
/// Pages tolerated in the collect after writing nothing.
pub const MAX_IDLE_PAGES: u64 = 2;

/// The dirty-page tracking mechanisms ferry knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrackerKind {
    /// userfaultfd async write-protect + PAGEMAP_SCAN ([`UffdTracker`]).
    Uffd,
    /// Soft-dirty PTE bits ([`SoftDirtyTracker`]).
    SoftDirty,
}

impl TrackerKind {
    /// Short name, same as the tracker's [`DirtyTracker::name`].
    pub fn name(self) -> &'static str {
        match self {
            TrackerKind::Uffd => "uffd-wp-async",
            TrackerKind::SoftDirty => "soft-dirty",
        }
    }

    /// Attach a tracker of this kind to the RAM mapping of `pid`. `uffd_fd_in_target` is
    /// only used by [`TrackerKind::Uffd`].
    pub fn attach(
        self,
        pid: i32,
        uffd_fd_in_target: i32,
        ram_path: &Path,
        ram_len: u64,
    ) -> Result<Box<dyn DirtyTracker>, TrackerError> {
        Ok(match self {
            TrackerKind::Uffd => Box::new(UffdTracker::attach(
                pid,
                uffd_fd_in_target,
                ram_path,
                ram_len,
            )?),
            TrackerKind::SoftDirty => Box::new(SoftDirtyTracker::attach(pid, ram_path, ram_len)?),
        })
    }
}

impl std::fmt::Display for TrackerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Check that `tracker` reports what is written: arm, call `write(page)` for each of
/// `pages_to_write`, collect, and require every written page to be reported and at most
/// [`MAX_EXTRA_PAGES`] others; then collect again with no writes and require at most
/// [`MAX_IDLE_PAGES`]. The tracker is disarmed afterwards, pass or fail.
pub fn verify_tracker(
    tracker: &mut dyn DirtyTracker,
    write: &mut dyn FnMut(u64),
    pages_to_write: &[u64],
) -> Result<(), TrackerError> {
    let result = verify_armed(tracker, write, pages_to_write);
    let disarmed = tracker.disarm();
    result.and(disarmed)
}

fn verify_armed(
    tracker: &mut dyn DirtyTracker,
    write: &mut dyn FnMut(u64),
    pages_to_write: &[u64],
) -> Result<(), TrackerError> {
    let name = tracker.name();
    let written: BTreeSet<u64> = pages_to_write.iter().copied().collect();
    tracker.arm()?;
    for &p in &written {
        write(p);
    }
    let got = tracker.collect()?;
    let missing: Vec<u64> = written.iter().copied().filter(|&p| !got.get(p)).collect();
    if !missing.is_empty() {
        return Err(TrackerError::SelfTestFailed {
            tracker: name,
            missing,
        });
    }
    let limit = written.len() as u64 + MAX_EXTRA_PAGES;
    if got.count() > limit {
        return Err(TrackerError::SelfTestNoisy {
            tracker: name,
            phase: format!("after writing {} pages", written.len()),
            reported: got.count(),
            limit,
        });
    }
    let idle = tracker.collect()?;
    if idle.count() > MAX_IDLE_PAGES {
        return Err(TrackerError::SelfTestNoisy {
            tracker: name,
            phase: "after no writes".into(),
            reported: idle.count(),
            limit: MAX_IDLE_PAGES,
        });
    }
    Ok(())
}

/// Removes the self-test RAM file however the test ends.
struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn self_test_path() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!(
        "ferry-selftest-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    // tmpfs like QEMU's RAM, when available.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.join(name)
    } else {
        std::env::temp_dir().join(name)
    }
}

/// Run the self-test of `tracker_kind` inside this process: a 64-page `MAP_SHARED` file
/// mapping (tmpfs, like QEMU's RAM), pages 3, 17 and 40 written, see [`verify_tracker`].
pub fn self_test(tracker_kind: TrackerKind) -> Result<(), TrackerError> {
    let path = self_test_path();
    let ram = RamFile::create(&path, SELF_TEST_PAGES * PAGE_SIZE as u64)?;
    let _cleanup = RemoveOnDrop(path.clone());
    let mut tracker: Box<dyn DirtyTracker> = match tracker_kind {
        TrackerKind::Uffd => Box::new(UffdTracker::attach_self(
            ram.mapping_addr(),
            ram.len() as usize,
            0,
        )?),
        TrackerKind::SoftDirty => Box::new(SoftDirtyTracker::attach(
            std::process::id() as i32,
            &path,
            ram.len(),
        )?),
    };
    let mut write_err = None;
    let mut write = |idx: u64| {
        let page = [0xA5u8 ^ idx as u8; PAGE_SIZE];
        if let Err(e) = ram.write_page(idx, &page) {
            write_err.get_or_insert(e);
        }
    };
    let result = verify_tracker(tracker.as_mut(), &mut write, &SELF_TEST_WRITES);
    drop(tracker); // unregister before the mapping goes away
    if let Some(e) = write_err {
        return Err(e.into());
    }
    result
}

/// The first tracker kind (Uffd, then SoftDirty) that passes [`self_test`] on this machine,
/// or [`TrackerError::NoUsableTracker`] with the reason each one failed.
///
/// This proves the *kernel* mechanism; attaching to QEMU can still fail (e.g. no shim), so
/// callers should be ready to fall back at attach time too.
pub fn choose_tracker() -> Result<TrackerKind, TrackerError> {
    let mut failures = Vec::new();
    for kind in [TrackerKind::Uffd, TrackerKind::SoftDirty] {
        match self_test(kind) {
            Ok(()) => {
                tracing::info!(tracker = kind.name(), "dirty-page tracker self-test passed");
                return Ok(kind);
            }
            Err(e) => {
                tracing::warn!(tracker = kind.name(), error = %e, "dirty-page tracker self-test failed");
                failures.push((kind.name(), e));
            }
        }
    }
    Err(TrackerError::NoUsableTracker { failures })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DirtyBitmap;
    use std::sync::{Arc, Mutex};

    #[test]
    fn uffd_self_test_passes_here() {
        // This machine runs Linux 6.18 as root: WP-async + PAGEMAP_SCAN must work.
        self_test(TrackerKind::Uffd).unwrap();
    }

    #[test]
    fn soft_dirty_self_test_is_honest() {
        match self_test(TrackerKind::SoftDirty) {
            Err(e) => {
                // Expected on kernels built without CONFIG_MEM_SOFT_DIRTY (like this one).
                eprintln!("soft-dirty self-test failed as it should here: {e}");
                match &e {
                    TrackerError::SelfTestFailed { tracker, missing } => {
                        assert_eq!(*tracker, "soft-dirty");
                        assert!(!missing.is_empty());
                        assert!(e.to_string().contains("not reported"), "{e}");
                    }
                    other => assert!(!other.to_string().is_empty()),
                }
            }
            Ok(()) => {
                // A kernel with soft-dirty: make sure it really reports a written page.
                let dir = tempfile::tempdir_in("/dev/shm").unwrap();
                let p = dir.path().join("ram");
                let ram = RamFile::create(&p, 16 * PAGE_SIZE as u64).unwrap();
                let mut t =
                    SoftDirtyTracker::attach(std::process::id() as i32, &p, ram.len()).unwrap();
                t.arm().unwrap();
                ram.write_page(5, &[1u8; PAGE_SIZE]).unwrap();
                assert!(t.collect().unwrap().get(5));
            }
        }
    }

    #[test]
    fn choose_tracker_picks_one_that_passes() {
        let kind = choose_tracker().unwrap();
        eprintln!("chosen tracker: {kind}");
        self_test(kind).unwrap();
    }

    /// Test double: a tracker whose report is produced by a closure from the pages the test
    /// wrote, so we can simulate broken trackers.
    struct FakeTracker {
        written: Arc<Mutex<Vec<u64>>>,
        report: fn(&[u64]) -> Vec<u64>,
        armed: bool,
    }

    impl DirtyTracker for FakeTracker {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn arm(&mut self) -> Result<(), TrackerError> {
            self.armed = true;
            self.written.lock().unwrap().clear();
            Ok(())
        }
        fn collect(&mut self) -> Result<DirtyBitmap, TrackerError> {
            assert!(self.armed);
            let w = std::mem::take(&mut *self.written.lock().unwrap());
            Ok(DirtyBitmap::from_indices(64, (self.report)(&w)).unwrap())
        }
        fn disarm(&mut self) -> Result<(), TrackerError> {
            self.armed = false;
            Ok(())
        }
    }

    fn run_fake(report: fn(&[u64]) -> Vec<u64>) -> Result<(), TrackerError> {
        let written = Arc::new(Mutex::new(Vec::new()));
        let mut t = FakeTracker {
            written: written.clone(),
            report,
            armed: false,
        };
        let mut write = |p: u64| written.lock().unwrap().push(p);
        let r = verify_tracker(&mut t, &mut write, &[3, 17, 40]);
        assert!(!t.armed, "verify_tracker must disarm, pass or fail");
        r
    }

    #[test]
    fn fake_tracker_reporting_nothing_is_rejected() {
        // Test double for a silently broken tracker (like soft-dirty without kernel support).
        match run_fake(|_| Vec::new()) {
            Err(TrackerError::SelfTestFailed {
                tracker: "fake",
                missing,
            }) => {
                assert_eq!(missing, vec![3, 17, 40])
            }
            other => panic!("expected SelfTestFailed, got {other:?}"),
        }
    }

    #[test]
    fn fake_tracker_missing_one_page_is_rejected() {
        match run_fake(|w| w.iter().copied().filter(|&p| p != 17).collect()) {
            Err(TrackerError::SelfTestFailed { missing, .. }) => assert_eq!(missing, vec![17]),
            other => panic!("expected SelfTestFailed, got {other:?}"),
        }
    }

    #[test]
    fn fake_tracker_reporting_everything_is_rejected() {
        // Test double for a tracker that reports every page: "complete" but useless.
        match run_fake(|_| (0..64).collect()) {
            Err(TrackerError::SelfTestNoisy { reported: 64, .. }) => {}
            other => panic!("expected SelfTestNoisy, got {other:?}"),
        }
    }

    #[test]
    fn fake_tracker_that_works_is_accepted() {
        run_fake(|w| w.to_vec()).unwrap();
    }

    #[test]
    fn no_usable_tracker_lists_each_failure() {
        let e = TrackerError::NoUsableTracker {
            failures: vec![
                ("uffd-wp-async", TrackerError::Unsupported("no shim".into())),
                (
                    "soft-dirty",
                    TrackerError::SelfTestFailed {
                        tracker: "soft-dirty",
                        missing: vec![3],
                    },
                ),
            ],
        };
        let s = e.to_string();
        assert!(
            s.contains("[uffd-wp-async: no shim]")
                && s.contains("[soft-dirty: soft-dirty self-test failed"),
            "{s}"
        );
    }
}
