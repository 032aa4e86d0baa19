//! [`UffdTracker`]: userfaultfd asynchronous write-protect + `PAGEMAP_SCAN` (Linux >= 6.7).
//!
//! How it works: the RAM range is registered for write-protect faults on a userfaultfd that
//! belongs to the target's mm, with `UFFD_FEATURE_WP_ASYNC` so the *kernel* resolves each
//! write fault itself (clears the protection, marks the PTE written) instead of waking a
//! handler. `PAGEMAP_SCAN` on `/proc/PID/pagemap` then lists the written ranges and
//! re-protects them in the same page-table walk, so no write can slip between "read" and
//! "re-arm".
//!
//! Only writes through the *target's* page tables are seen: a write to the same file through
//! another process's mapping (e.g. the agent's own) is invisible to this tracker.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::{maps, DirtyBitmap, DirtyTracker, TrackerError, PAGE_SIZE};

/// Kernel ABI for userfaultfd and PAGEMAP_SCAN, transcribed from the UAPI headers (the
/// build host's /usr/include may predate them: PAGEMAP_SCAN and WP_ASYNC are 6.7+).
pub mod sys {
    /// `UFFD_API` (linux/userfaultfd.h).
    pub const UFFD_API: u64 = 0xAA;
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (linux/userfaultfd.h, 5.19+): WP on shmem/hugetlbfs.
    pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    /// `UFFD_FEATURE_WP_UNPOPULATED` (linux/userfaultfd.h, 6.4+): protect never-touched pages too.
    pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
    /// `UFFD_FEATURE_WP_ASYNC` (linux/userfaultfd.h, 6.7+): kernel resolves WP faults itself.
    pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
    /// `UFFDIO_REGISTER_MODE_WP` (linux/userfaultfd.h).
    pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
    /// `_UFFDIO_REGISTER` bit in `uffdio_api.ioctls`.
    pub const _UFFDIO_REGISTER: u64 = 0x00;

    /// `struct uffdio_api` (linux/userfaultfd.h).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioApi {
        /// Must be `UFFD_API`.
        pub api: u64,
        /// In: requested features. Out: supported features.
        pub features: u64,
        /// Out: bitmask of supported ioctls.
        pub ioctls: u64,
    }

    /// `struct uffdio_range` (linux/userfaultfd.h).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioRange {
        /// Start address (page aligned).
        pub start: u64,
        /// Length in bytes (page multiple).
        pub len: u64,
    }

    /// `struct uffdio_register` (linux/userfaultfd.h).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioRegister {
        /// Range to register.
        pub range: UffdioRange,
        /// `UFFDIO_REGISTER_MODE_*`.
        pub mode: u64,
        /// Out: ioctls usable on the range.
        pub ioctls: u64,
    }

    // _IOC encoding (asm-generic/ioctl.h): dir << 30 | size << 16 | type << 8 | nr.
    const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
    }
    const IOC_WRITE: u64 = 1;
    const IOC_READ: u64 = 2;

    /// `UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api)` (linux/userfaultfd.h).
    pub const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x3F, size_of::<UffdioApi>());
    /// `UFFDIO_REGISTER = _IOWR(0xAA, 0x00, struct uffdio_register)` (linux/userfaultfd.h).
    pub const UFFDIO_REGISTER: u64 = ioc(
        IOC_READ | IOC_WRITE,
        0xAA,
        0x00,
        size_of::<UffdioRegister>(),
    );
    /// `UFFDIO_UNREGISTER = _IOR(0xAA, 0x01, struct uffdio_range)` (linux/userfaultfd.h).
    pub const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0xAA, 0x01, size_of::<UffdioRange>());

    /// `PAGE_IS_WPALLOWED` (linux/fs.h): the page's VMA is registered for uffd-wp-async.
    pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
    /// `PAGE_IS_WRITTEN` (linux/fs.h): written since last write-protected.
    pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
    /// `PM_SCAN_WP_MATCHING` (linux/fs.h): write-protect the matched pages.
    pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
    /// `PM_SCAN_CHECK_WPASYNC` (linux/fs.h): fail (EPERM) on pages not registered WP-async.
    pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

    /// `struct page_region` (linux/fs.h): one output range of PAGEMAP_SCAN.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct PageRegion {
        /// Start address.
        pub start: u64,
        /// End address (exclusive).
        pub end: u64,
        /// `PAGE_IS_*` categories of the range (masked by `return_mask`).
        pub categories: u64,
    }

    /// `struct pm_scan_arg` (linux/fs.h).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct PmScanArg {
        /// `sizeof(struct pm_scan_arg)`.
        pub size: u64,
        /// `PM_SCAN_*` flags.
        pub flags: u64,
        /// Start address of the scan.
        pub start: u64,
        /// End address of the scan (exclusive).
        pub end: u64,
        /// Out: where the walk stopped (== `end` unless the output vector filled).
        pub walk_end: u64,
        /// Output `page_region` array address (in the caller's memory).
        pub vec: u64,
        /// Capacity of `vec` in regions.
        pub vec_len: u64,
        /// Stop after this many pages (0 = no limit).
        pub max_pages: u64,
        /// Categories to invert before matching.
        pub category_inverted: u64,
        /// All of these categories must be set.
        pub category_mask: u64,
        /// At least one of these must be set.
        pub category_anyof_mask: u64,
        /// Categories reported in `page_region.categories`.
        pub return_mask: u64,
    }

    /// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)` (linux/fs.h).
    pub const PAGEMAP_SCAN: u64 = ioc(
        IOC_READ | IOC_WRITE,
        b'f' as u64,
        16,
        size_of::<PmScanArg>(),
    );
}

use sys::*;

const NAME: &str = "uffd-wp-async";
/// Output regions per PAGEMAP_SCAN call; the scan resumes from `walk_end` when it fills.
const SCAN_VEC_LEN: usize = 1024;

/// Dirty-page tracker using userfaultfd async write-protect and `PAGEMAP_SCAN`.
///
/// The userfaultfd must have been created *inside* the target (see the LD_PRELOAD shim,
/// [`crate::UFFD_SHIM_SO`]): it belongs to the mm of its creator.
#[derive(Debug)]
pub struct UffdTracker {
    uffd: OwnedFd,
    pagemap: File,
    /// For messages only.
    who: String,
    start: u64,
    len: u64,
    file_offset_pages: u64,
    registered: bool,
    armed: bool,
    regions: Vec<PageRegion>,
}

fn ioctl<T>(fd: &impl AsRawFd, req: u64, arg: &mut T) -> std::io::Result<libc::c_int> {
    loop {
        // SAFETY: `arg` is a live, exclusively borrowed repr(C) struct of the size encoded in
        // `req` (asserted in the tests), so the kernel reads/writes only memory we own.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::c_ulong, arg as *mut T) };
        if r >= 0 {
            return Ok(r);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl UffdTracker {
    /// Attach to process `pid`, whose userfaultfd is open as fd `uffd_fd_in_target` (the
    /// shim puts it at [`crate::DEFAULT_SHIM_FD`]), and register the mapping of `ram_path`
    /// of length `ram_len`. Needs root or CAP_SYS_PTRACE over the target.
    pub fn attach(
        pid: i32,
        uffd_fd_in_target: i32,
        ram_path: &Path,
        ram_len: u64,
    ) -> Result<Self, TrackerError> {
        let mapping = maps::find_mapping(pid, ram_path, ram_len)?;

        // Refuse to ioctl a random file: the fd number must really hold a userfaultfd.
        let link_path = format!("/proc/{pid}/fd/{uffd_fd_in_target}");
        let target = std::fs::read_link(&link_path).map_err(|e| {
            TrackerError::io(
                format!("no fd {uffd_fd_in_target} in pid {pid} (was QEMU started with the uffd shim?): readlink {link_path}"),
                e,
            )
        })?;
        if target.as_os_str() != "anon_inode:[userfaultfd]" {
            return Err(TrackerError::Unsupported(format!(
                "fd {uffd_fd_in_target} of pid {pid} is {}, not a userfaultfd",
                target.display()
            )));
        }

        // SAFETY: plain syscalls with integer arguments; results checked below.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd < 0 {
            return Err(TrackerError::last_os(format!("pidfd_open({pid})")));
        }
        // SAFETY: pidfd_open returned a fresh fd that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        // SAFETY: as above.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_pidfd_getfd,
                pidfd.as_raw_fd(),
                uffd_fd_in_target,
                0,
            )
        };
        if fd < 0 {
            return Err(TrackerError::last_os(format!(
                "pidfd_getfd(fd {uffd_fd_in_target} of pid {pid})"
            )));
        }
        // SAFETY: pidfd_getfd returned a fresh fd (O_CLOEXEC) that nothing else owns.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };

        let who = format!("uffd taken from pid {pid}");
        let pagemap_path = format!("/proc/{pid}/pagemap");
        let pagemap = File::open(&pagemap_path)
            .map_err(|e| TrackerError::io(format!("open {pagemap_path}"), e))?;
        Self::setup(
            uffd,
            pagemap,
            who,
            mapping.start,
            mapping.len,
            mapping.file_offset_pages(),
        )
    }

    /// Track a range of *this* process (`addr`, `len` page aligned; `file_offset_pages` is the
    /// file page mapped at `addr`), with a userfaultfd created here. Used by the self-test.
    pub fn attach_self(
        addr: usize,
        len: usize,
        file_offset_pages: u64,
    ) -> Result<Self, TrackerError> {
        // SAFETY: plain syscall with integer flags.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(TrackerError::last_os(
                "userfaultfd(O_CLOEXEC|O_NONBLOCK) in this process",
            ));
        }
        // SAFETY: fresh fd from the kernel, owned by nobody else.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|e| TrackerError::io("open /proc/self/pagemap", e))?;
        Self::setup(
            uffd,
            pagemap,
            "uffd of this process".into(),
            addr as u64,
            len as u64,
            file_offset_pages,
        )
    }

    fn setup(
        uffd: OwnedFd,
        pagemap: File,
        who: String,
        start: u64,
        len: u64,
        file_offset_pages: u64,
    ) -> Result<Self, TrackerError> {
        crate::maps::check_page_range(start, len)?;
        let want =
            UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: want,
            ioctls: 0,
        };
        let mut api_note = "";
        match ioctl(&uffd, UFFDIO_API, &mut api) {
            Ok(_) => {
                if api.ioctls & (1 << _UFFDIO_REGISTER) == 0 {
                    return Err(TrackerError::Unsupported(format!(
                        "UFFDIO_API on {who}: UFFDIO_REGISTER not offered (ioctls {:#x})",
                        api.ioctls
                    )));
                }
            }
            // A userfaultfd accepts UFFDIO_API once. A previous attach (e.g. an aborted
            // migration) has already done it; carry on, and let the CHECK_WPASYNC scan in
            // arm() prove the features really are WP-async.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                api_note = " (UFFDIO_API had been refused with EINVAL: either the kernel lacks \
                            WP_ASYNC/WP_UNPOPULATED (Linux < 6.7) or another tool set this uffd up)";
                tracing::info!(%who, "UFFDIO_API refused (EINVAL): assuming an earlier attach negotiated it");
            }
            Err(e) => return Err(TrackerError::io(format!("UFFDIO_API on {who}"), e)),
        }
        let mut t = UffdTracker {
            uffd,
            pagemap,
            who,
            start,
            len,
            file_offset_pages,
            registered: false,
            armed: false,
            regions: vec![PageRegion::default(); SCAN_VEC_LEN],
        };
        t.register().map_err(|e| match e {
            TrackerError::Os { step, source } => TrackerError::Os {
                step: format!("{step}{api_note}"),
                source,
            },
            other => other,
        })?;
        Ok(t)
    }

    fn register(&mut self) -> Result<(), TrackerError> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: self.start,
                len: self.len,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(&self.uffd, UFFDIO_REGISTER, &mut reg).map_err(|e| {
            TrackerError::io(
                format!(
                    "UFFDIO_REGISTER(MODE_WP) of {:#x}+{:#x} on {}",
                    self.start, self.len, self.who
                ),
                e,
            )
        })?;
        self.registered = true;
        Ok(())
    }

    /// The pages written since they were last protected (armed trackers only),
    /// re-protecting them with `protect`.
    fn written(&mut self, protect: bool) -> Result<DirtyBitmap, TrackerError> {
        if !self.armed {
            return Err(TrackerError::NotArmed { tracker: NAME });
        }
        let mut bm = DirtyBitmap::new(self.file_offset_pages + self.len / PAGE_SIZE as u64);
        self.scan(Some(&mut bm), protect)?;
        Ok(bm)
    }

    /// Address range tracked in the target (start, length in bytes).
    pub fn range(&self) -> (u64, u64) {
        (self.start, self.len)
    }

    /// One PAGEMAP_SCAN pass over the range. With `out = Some`, only written pages match and
    /// they are recorded; with `None` every page matches and nothing is recorded (arming).
    /// With `protect`, what matches is write-protected in the same walk.
    fn scan(
        &mut self,
        mut out: Option<&mut DirtyBitmap>,
        protect: bool,
    ) -> Result<(), TrackerError> {
        let end = self.start + self.len;
        let page = PAGE_SIZE as u64;
        let mask = if out.is_some() { PAGE_IS_WRITTEN } else { 0 };
        let flags = if protect {
            PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
        } else {
            PM_SCAN_CHECK_WPASYNC
        };
        let mut pos = self.start;
        while pos < end {
            let mut arg = PmScanArg {
                size: size_of::<PmScanArg>() as u64,
                flags,
                start: pos,
                end,
                vec: if out.is_some() {
                    self.regions.as_mut_ptr() as u64
                } else {
                    0
                },
                vec_len: if out.is_some() {
                    self.regions.len() as u64
                } else {
                    0
                },
                category_mask: mask,
                return_mask: mask,
                ..Default::default()
            };
            let n = ioctl(&self.pagemap, PAGEMAP_SCAN, &mut arg).map_err(|e| {
                let hint = if e.raw_os_error() == Some(libc::EPERM) {
                    " (range not registered for async write-protect)"
                } else {
                    ""
                };
                TrackerError::io(
                    format!("PAGEMAP_SCAN of {pos:#x}..{end:#x} for {}{hint}", self.who),
                    e,
                )
            })? as usize;
            if let Some(bm) = out.as_deref_mut() {
                for r in self.regions.iter().take(n.min(self.regions.len())) {
                    let s = r.start.clamp(self.start, end);
                    let e = r.end.clamp(self.start, end);
                    if e > s {
                        let first = (s - self.start) / page + self.file_offset_pages;
                        bm.set_range(first, (e - s).div_ceil(page))?;
                    }
                }
            }
            if arg.walk_end >= end {
                break;
            }
            if arg.walk_end <= pos {
                return Err(TrackerError::Unsupported(format!(
                    "PAGEMAP_SCAN for {} made no progress at {pos:#x} (walk_end {:#x})",
                    self.who, arg.walk_end
                )));
            }
            pos = arg.walk_end;
        }
        Ok(())
    }
}

impl DirtyTracker for UffdTracker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn arm(&mut self) -> Result<(), TrackerError> {
        if !self.registered {
            self.register()?;
        }
        self.scan(None, true)?;
        self.armed = true;
        Ok(())
    }

    fn collect(&mut self) -> Result<DirtyBitmap, TrackerError> {
        self.written(true)
    }

    /// A read-only scan (see [`collect_final`](Self::collect_final) for what that saves).
    fn peek(&mut self) -> Result<Option<DirtyBitmap>, TrackerError> {
        self.written(false).map(Some)
    }

    /// Reads the written bits without write-protecting anything. Re-protecting changes the
    /// page table of every 2 MiB region written and flushes the TLB of every core running
    /// the target, once per region: measured here (`cargo bench -p ferry-bench --bench
    /// tracker`) 8 ms for 500 scattered pages while another thread of the process runs,
    /// against 0.3 ms for the scan alone. Inside the pause nothing needs protecting.
    fn collect_final(&mut self) -> Result<DirtyBitmap, TrackerError> {
        let bm = self.written(false)?;
        self.armed = false;
        Ok(bm)
    }

    fn disarm(&mut self) -> Result<(), TrackerError> {
        self.armed = false;
        if !self.registered {
            return Ok(());
        }
        let mut range = UffdioRange {
            start: self.start,
            len: self.len,
        };
        ioctl(&self.uffd, UFFDIO_UNREGISTER, &mut range).map_err(|e| {
            TrackerError::io(
                format!(
                    "UFFDIO_UNREGISTER of {:#x}+{:#x} on {}",
                    self.start, self.len, self.who
                ),
                e,
            )
        })?;
        self.registered = false;
        Ok(())
    }
}

impl Drop for UffdTracker {
    fn drop(&mut self) {
        // Leave the target as we found it: registered WP ranges keep costing it a fault per
        // first write. Fails harmlessly if the target has exited.
        if let Err(e) = self.disarm() {
            tracing::debug!(error = %e, "unregister on drop failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sys::*;

    #[test]
    fn abi_sizes_and_ioctl_numbers() {
        assert_eq!(size_of::<UffdioApi>(), 24);
        assert_eq!(size_of::<UffdioRange>(), 16);
        assert_eq!(size_of::<UffdioRegister>(), 32);
        assert_eq!(size_of::<PageRegion>(), 24);
        assert_eq!(size_of::<PmScanArg>(), 96);
        // Values as computed by the C macros (checked against a 6.x kernel's headers).
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }
}

#[cfg(test)]
mod behaviour_tests {
    use super::*;
    use crate::RamFile;

    fn ram(pages: u64) -> (tempfile::TempDir, RamFile) {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let ram = RamFile::create(dir.path().join("ram"), pages * PAGE_SIZE as u64).unwrap();
        (dir, ram)
    }

    #[test]
    fn collect_before_arm_is_an_error() {
        let (_d, ram) = ram(8);
        let mut t = UffdTracker::attach_self(ram.mapping_addr(), ram.len() as usize, 0).unwrap();
        assert!(matches!(t.collect(), Err(TrackerError::NotArmed { .. })));
    }

    #[test]
    fn many_regions_loop_over_walk_end_and_offset_is_applied() {
        // Every other page written: 3000 separate regions > SCAN_VEC_LEN (1024), so the scan
        // must resume from walk_end. A file offset of 100 pages shifts the reported indices.
        let (_d, ram) = ram(8192);
        let mut t = UffdTracker::attach_self(ram.mapping_addr(), ram.len() as usize, 100).unwrap();
        t.arm().unwrap();
        let page = [7u8; PAGE_SIZE];
        let written: Vec<u64> = (0..3000).map(|i| i * 2 + 1).collect();
        for &p in &written {
            ram.write_page(p, &page).unwrap();
        }
        let got = t.collect().unwrap();
        assert_eq!(got.len_pages(), 100 + 8192);
        assert_eq!(
            got.iter().collect::<Vec<_>>(),
            written.iter().map(|p| p + 100).collect::<Vec<_>>()
        );
        assert_eq!(t.collect().unwrap().count(), 0);
        // disarm, then arm again re-registers.
        t.disarm().unwrap();
        t.arm().unwrap();
        ram.write_page(0, &page).unwrap();
        assert_eq!(t.collect().unwrap().iter().collect::<Vec<_>>(), vec![100]);
    }

    #[test]
    fn the_final_collection_reports_the_same_pages_and_leaves_the_tracker_disarmed() {
        let (_d, ram) = ram(2048);
        let mut t = UffdTracker::attach_self(ram.mapping_addr(), ram.len() as usize, 0).unwrap();
        t.arm().unwrap();
        let page = [9u8; PAGE_SIZE];
        for p in [3u64, 700, 701, 2047] {
            ram.write_page(p, &page).unwrap();
        }
        assert_eq!(
            t.collect().unwrap().iter().collect::<Vec<_>>(),
            vec![3, 700, 701, 2047]
        );
        for p in [5u64, 700, 1500] {
            ram.write_page(p, &page).unwrap();
        }
        assert_eq!(
            t.collect_final().unwrap().iter().collect::<Vec<_>>(),
            vec![5, 700, 1500]
        );
        // Nothing was re-protected: the same pages still read as written to a plain scan,
        // and the tracker refuses to collect until armed again.
        let mut still = DirtyBitmap::new(2048);
        t.scan(Some(&mut still), false).unwrap();
        assert_eq!(still.iter().collect::<Vec<_>>(), vec![5, 700, 1500]);
        assert!(matches!(t.collect(), Err(TrackerError::NotArmed { .. })));
        assert!(matches!(t.peek(), Err(TrackerError::NotArmed { .. })));
        t.arm().unwrap();
        assert_eq!(t.collect().unwrap().count(), 0);
    }

    #[test]
    fn a_peek_reports_without_rearming_and_the_next_collect_reports_it_again() {
        let (_d, ram) = ram(2048);
        let mut t = UffdTracker::attach_self(ram.mapping_addr(), ram.len() as usize, 0).unwrap();
        t.arm().unwrap();
        let page = [4u8; PAGE_SIZE];
        for p in [1u64, 600] {
            ram.write_page(p, &page).unwrap();
        }
        let peeked = t.peek().unwrap().unwrap();
        assert_eq!(peeked.iter().collect::<Vec<_>>(), vec![1, 600]);
        // Written after the look (600 again, 900 new): the collection has both and the
        // earlier ones; then nothing is left.
        for p in [600u64, 900] {
            ram.write_page(p, &page).unwrap();
        }
        assert_eq!(
            t.collect().unwrap().iter().collect::<Vec<_>>(),
            vec![1, 600, 900]
        );
        assert_eq!(t.peek().unwrap().unwrap().count(), 0);
        assert_eq!(t.collect().unwrap().count(), 0);
    }

    #[test]
    fn unregistered_range_is_refused_by_check_wpasync() {
        let (_d, ram) = ram(8);
        let mut t = UffdTracker::attach_self(ram.mapping_addr(), ram.len() as usize, 0).unwrap();
        t.arm().unwrap();
        // Unregister behind the tracker's back: the next scan must fail loudly, not report 0.
        let mut range = UffdioRange {
            start: t.start,
            len: t.len,
        };
        ioctl(&t.uffd, UFFDIO_UNREGISTER, &mut range).unwrap();
        let e = t.collect().unwrap_err();
        eprintln!("{e}");
        assert!(e.to_string().contains("PAGEMAP_SCAN"), "{e}");
    }
}
