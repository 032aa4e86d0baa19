//! [`SoftDirtyTracker`]: `/proc/PID/clear_refs` + pagemap bit 55 (needs CONFIG_MEM_SOFT_DIRTY).
//!
//! Fallback for kernels without WP-async. Two weaknesses, both inherent to the interface:
//! * A kernel built without CONFIG_MEM_SOFT_DIRTY accepts `echo 4 > clear_refs` silently and
//!   never sets bit 55, so the tracker must pass the self-test before being trusted.
//! * Reading pagemap and clearing are two steps: a write to a page after its entry was read
//!   and before `clear_refs` is lost. Use it only where that window is closed (target
//!   stopped), or accept re-sending a final full round.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{maps, DirtyBitmap, DirtyTracker, TrackerError, PAGE_SIZE};

const NAME: &str = "soft-dirty";
/// pagemap entry bit: PTE is soft-dirty (Documentation/admin-guide/mm/pagemap.rst).
const PM_SOFT_DIRTY: u64 = 1 << 55;
/// pagemap entries read per pread.
const ENTRIES_PER_READ: u64 = 64 * 1024;

/// Dirty-page tracker using the soft-dirty PTE bit.
#[derive(Debug)]
pub struct SoftDirtyTracker {
    pid: i32,
    pagemap: File,
    start: u64,
    len: u64,
    file_offset_pages: u64,
    armed: bool,
}

impl SoftDirtyTracker {
    /// Attach to the mapping of `ram_path` (length `ram_len`) in process `pid`.
    pub fn attach(pid: i32, ram_path: &Path, ram_len: u64) -> Result<Self, TrackerError> {
        let m = maps::find_mapping(pid, ram_path, ram_len)?;
        Self::attach_range(pid, m.start, m.len, m.file_offset_pages())
    }

    /// Attach to an explicit address range of process `pid`.
    pub fn attach_range(
        pid: i32,
        start: u64,
        len: u64,
        file_offset_pages: u64,
    ) -> Result<Self, TrackerError> {
        crate::maps::check_page_range(start, len)?;
        let path = format!("/proc/{pid}/pagemap");
        let pagemap = File::open(&path).map_err(|e| TrackerError::io(format!("open {path}"), e))?;
        Ok(SoftDirtyTracker {
            pid,
            pagemap,
            start,
            len,
            file_offset_pages,
            armed: false,
        })
    }

    fn clear_refs(&self) -> Result<(), TrackerError> {
        let path = format!("/proc/{}/clear_refs", self.pid);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"4"))
            .map_err(|e| TrackerError::io(format!("write 4 to {path}"), e))
    }
}

impl DirtyTracker for SoftDirtyTracker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn arm(&mut self) -> Result<(), TrackerError> {
        self.clear_refs()?;
        self.armed = true;
        Ok(())
    }

    fn collect(&mut self) -> Result<DirtyBitmap, TrackerError> {
        if !self.armed {
            return Err(TrackerError::NotArmed { tracker: NAME });
        }
        let page = PAGE_SIZE as u64;
        let pages = self.len / page;
        let mut bm = DirtyBitmap::new(self.file_offset_pages + pages);
        let mut buf = vec![0u8; (ENTRIES_PER_READ * 8) as usize];
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(ENTRIES_PER_READ);
            let bytes = &mut buf[..(n * 8) as usize];
            // One 8-byte entry per virtual page, indexed by virtual page number.
            let off = (self.start / page + done) * 8;
            self.pagemap.read_exact_at(bytes, off).map_err(|e| {
                TrackerError::io(format!("read /proc/{}/pagemap at {off:#x}", self.pid), e)
            })?;
            for (i, entry) in bytes.chunks_exact(8).enumerate() {
                let mut e = [0u8; 8];
                e.copy_from_slice(entry);
                if u64::from_ne_bytes(e) & PM_SOFT_DIRTY != 0 {
                    bm.try_set(self.file_offset_pages + done + i as u64)?;
                }
            }
            done += n;
        }
        self.clear_refs()?;
        Ok(bm)
    }

    fn disarm(&mut self) -> Result<(), TrackerError> {
        self.armed = false;
        Ok(())
    }
}
