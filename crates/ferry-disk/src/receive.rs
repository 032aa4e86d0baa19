//! The receiving side of a disk transfer: a partial image that survives interruptions.
//!
//! Data goes to `<final>.ferry-part`, sized to the full length up front so that chunks the
//! sender skipped (holes, zeros) stay holes and read back as zeros. A JSON sidecar
//! `<final>.ferry-part.json` records which transfer the part belongs to and `committed`, the
//! offset below which everything received is on disk. A new receiver for the same transfer
//! and length picks up from `committed`; anything else starts over.
//!
//! Durability order: part data is fdatasync'ed before the sidecar claims it, and the sidecar
//! is replaced atomically (write, fsync, rename). A crash can only leave a sidecar that
//! claims less than is on disk, never more.

use std::ffi::{CString, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::hash::{file_blake3_of, Blake3Digest};
use crate::sparse::is_zero;
use crate::{sync_dir, DiskError};

/// Suffix of the part file.
pub const PART_SUFFIX: &str = ".ferry-part";
/// Suffix of the sidecar.
pub const SIDECAR_SUFFIX: &str = ".ferry-part.json";
/// Suffix of a sidecar being replaced (written, synced, then renamed over the sidecar).
pub const SIDECAR_TMP_SUFFIX: &str = ".ferry-part.json.tmp";
/// Granularity of the holes kept inside received chunks: the common filesystem block.
const SPARSE_BLOCK: u64 = 4096;
/// Sidecar format version; any other version is ignored (the transfer starts over).
const SIDECAR_VERSION: u32 = 1;

/// What the sidecar records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Sidecar {
    version: u32,
    transfer_id: String,
    expected_len: u64,
    #[serde(default)]
    source_blake3: Option<Blake3Digest>,
    committed: u64,
}

/// An image being received. Dropping it keeps the part file and sidecar for a later resume;
/// [`PartialImage::finish`] or [`PartialImage::abandon`] end it.
///
/// The part file is `flock`ed while this value lives, so two receivers cannot write it.
#[derive(Debug)]
pub struct PartialImage {
    final_path: PathBuf,
    part_path: PathBuf,
    sidecar_path: PathBuf,
    file: File,
    state: Sidecar,
    /// Lowest offset the next chunk may start at.
    next: u64,
    resumed: bool,
}

impl PartialImage {
    /// Start receiving `expected_len` bytes for `final_path`, or resume an interrupted
    /// transfer with the same `transfer_id` and length.
    ///
    /// `final_path` should have been through [`crate::StorageRoots::confine`]. Fails with
    /// [`DiskError::AlreadyExists`] if it exists (ferry never overwrites an image, which is
    /// also what saves a disk on shared storage that the token probe missed), and with
    /// [`DiskError::Busy`] if another receiver holds the part file.
    pub fn open_or_resume(
        final_path: &Path,
        expected_len: u64,
        transfer_id: &str,
    ) -> Result<Self, DiskError> {
        check_absent(final_path)?;
        let part_path = with_suffix(final_path, PART_SUFFIX);
        let sidecar_path = with_suffix(final_path, SIDECAR_SUFFIX);
        let file = open_locked(&part_path)?;

        let part_len = file
            .metadata()
            .map_err(|e| DiskError::io("stat", &part_path, e))?
            .len();
        let previous = read_sidecar(&sidecar_path)?;
        if let Some(sc) = previous {
            if resumable(&sc, transfer_id, expected_len, part_len) {
                tracing::info!(
                    path = %final_path.display(),
                    transfer_id,
                    committed = sc.committed,
                    "resuming disk transfer"
                );
                // Touched now: the expiry of kept partial images (`crate::kept`) reads a
                // part's age from its times, and a resume that has not written yet (the
                // source not connected) must not look idle.
                file.set_modified(std::time::SystemTime::now())
                    .map_err(|e| DiskError::io("touch part file", &part_path, e))?;
                let next = sc.committed;
                return Ok(PartialImage {
                    final_path: final_path.to_path_buf(),
                    part_path,
                    sidecar_path,
                    file,
                    state: sc,
                    next,
                    resumed: true,
                });
            }
            tracing::info!(
                path = %final_path.display(),
                old_transfer = %sc.transfer_id,
                transfer_id,
                "partial image belongs to another transfer, starting over"
            );
        }

        // Start over. The old sidecar goes first, durably, so a crash in between cannot
        // leave it vouching for content that is being thrown away.
        remove_if_exists(&sidecar_path)?;
        if let Some(dir) = final_path.parent() {
            sync_dir(dir)?;
        }
        // Truncating to zero drops every old block, then the full length is one big hole.
        file.set_len(0)
            .and_then(|()| file.set_len(expected_len))
            .map_err(|e| DiskError::io("size part file", &part_path, e))?;
        let image = PartialImage {
            final_path: final_path.to_path_buf(),
            part_path,
            sidecar_path,
            file,
            state: Sidecar {
                version: SIDECAR_VERSION,
                transfer_id: transfer_id.to_owned(),
                expected_len,
                source_blake3: None,
                committed: 0,
            },
            next: 0,
            resumed: false,
        };
        image.write_sidecar()?;
        if let Some(dir) = image.final_path.parent() {
            sync_dir(dir)?;
        }
        Ok(image)
    }

    /// Where the next transfer must start: everything below is already here.
    pub fn resume_offset(&self) -> u64 {
        self.state.committed
    }

    /// Whether this continued an earlier, interrupted transfer.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The image's final path.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// The part file being written.
    pub fn part_path(&self) -> &Path {
        &self.part_path
    }

    /// The length the image will have.
    pub fn expected_len(&self) -> u64 {
        self.state.expected_len
    }

    /// The transfer this part belongs to.
    pub fn transfer_id(&self) -> &str {
        &self.state.transfer_id
    }

    /// The source's digest recorded by [`Self::set_source_digest`], possibly by an earlier
    /// receiver. A resumed transfer whose source now reports a different digest has a
    /// changed source and must be abandoned.
    pub fn source_digest(&self) -> Option<Blake3Digest> {
        self.state.source_blake3
    }

    /// Record the source's digest in the sidecar (durably), when it is known before the end.
    pub fn set_source_digest(&mut self, digest: Blake3Digest) -> Result<(), DiskError> {
        self.state.source_blake3 = Some(digest);
        self.write_sidecar()
    }

    /// Write `data` at `offset`. Chunks must come in increasing, non-overlapping order, at
    /// or after [`Self::resume_offset`], and inside the expected length. All-zero 4 KiB
    /// blocks inside a chunk are left as holes, so the image stays as sparse as the source.
    pub fn write_chunk(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        if offset < self.next {
            return Err(DiskError::OutOfOrder {
                path: self.part_path.clone(),
                offset,
                next: self.next,
            });
        }
        let len = data.len() as u64;
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= self.state.expected_len)
            .ok_or_else(|| DiskError::OutOfRange {
                path: self.part_path.clone(),
                offset,
                len,
                limit: self.state.expected_len,
            })?;
        // Write only the runs of non-zero blocks: a 1 MiB chunk holding 4 KiB of data
        // should not allocate 1 MiB. The skipped blocks are holes, hence zeros, because a
        // part file only ever holds this transfer's data (a changed source under the same
        // transfer id is caught by the digest).
        let mut run: Option<usize> = None;
        let mut i = 0usize;
        while i < data.len() {
            let abs = offset + i as u64;
            let block_end =
                ((abs - abs % SPARSE_BLOCK + SPARSE_BLOCK - offset) as usize).min(data.len());
            if is_zero(&data[i..block_end]) {
                if let Some(start) = run.take() {
                    self.write_at(&data[start..i], offset + start as u64)?;
                }
            } else if run.is_none() {
                run = Some(i);
            }
            i = block_end;
        }
        if let Some(start) = run {
            self.write_at(&data[start..], offset + start as u64)?;
        }
        self.next = end;
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), DiskError> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| DiskError::io("write", &self.part_path, e))
    }

    /// Declare everything below `offset` received and make it durable: fdatasync the part
    /// file, then atomically rewrite the sidecar. `offset` may lie beyond the last chunk
    /// written (the sender skipped zeros up to there); chunks below it are refused afterwards.
    pub fn checkpoint(&mut self, offset: u64) -> Result<(), DiskError> {
        if offset < self.state.committed {
            return Err(DiskError::OutOfOrder {
                path: self.part_path.clone(),
                offset,
                next: self.state.committed,
            });
        }
        if offset > self.state.expected_len {
            return Err(DiskError::OutOfRange {
                path: self.part_path.clone(),
                offset,
                len: 0,
                limit: self.state.expected_len,
            });
        }
        self.file
            .sync_data()
            .map_err(|e| DiskError::io("fdatasync", &self.part_path, e))?;
        self.state.committed = offset;
        self.write_sidecar()?;
        self.next = self.next.max(offset);
        Ok(())
    }

    /// Verify the received image against the source's digest and move it into place.
    ///
    /// On a mismatch the part file and sidecar are removed and
    /// [`DiskError::DigestMismatch`] returned. On a match the part file is renamed to the
    /// final path (refusing, with [`DiskError::AlreadyExists`], if something appeared
    /// there meanwhile) and the sidecar removed. Other errors leave both files for a retry.
    pub fn finish(self, expected: Blake3Digest) -> Result<PathBuf, DiskError> {
        self.finish_placed(expected).map(|(path, _)| path)
    }

    /// [`Self::finish`], and which file now has the final path, taken from the open file
    /// after the rename ([`remove_if_same_file`] removes it later only while it still does).
    pub fn finish_placed(self, expected: Blake3Digest) -> Result<(PathBuf, FileId), DiskError> {
        self.file
            .sync_all()
            .map_err(|e| DiskError::io("fsync", &self.part_path, e))?;
        let actual = file_blake3_of(&self.file, &self.part_path)?;
        if actual != expected {
            let path = self.final_path.clone();
            if let Err(e) = self.remove_files() {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a partial image that failed verification");
            }
            return Err(DiskError::DigestMismatch {
                path,
                expected,
                actual,
            });
        }
        match rename_noreplace(&self.part_path, &self.final_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(DiskError::AlreadyExists {
                    path: self.final_path.clone(),
                })
            }
            Err(e) => return Err(DiskError::io("rename part file to", &self.final_path, e)),
        }
        // In place and verified from here on: what follows is tidying, not a failure of
        // the image (a stale sidecar is never taken for another transfer's).
        let id = self.file.metadata().map(|m| FileId::of(&m));
        if let Err(e) = remove_if_exists(&self.sidecar_path) {
            tracing::warn!(path = %self.sidecar_path.display(), error = %e, "could not remove the sidecar of a received image");
        }
        if let Some(dir) = self.final_path.parent() {
            if let Err(e) = sync_dir(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "fsync of a received image's directory");
            }
        }
        let id = id.map_err(|e| DiskError::io("stat", &self.final_path, e))?;
        tracing::info!(path = %self.final_path.display(), digest = %actual, "disk image received");
        Ok((self.final_path, id))
    }

    /// Give up: remove the part file and the sidecar.
    pub fn abandon(self) -> Result<(), DiskError> {
        self.remove_files()
    }

    fn remove_files(&self) -> Result<(), DiskError> {
        remove_if_exists(&self.part_path)?;
        remove_if_exists(&self.sidecar_path)?;
        remove_if_exists(&with_suffix(&self.final_path, SIDECAR_TMP_SUFFIX))?;
        if let Some(dir) = self.final_path.parent() {
            sync_dir(dir)?;
        }
        Ok(())
    }

    /// Replace the sidecar atomically. No directory fsync: if the rename is lost in a crash
    /// the previous sidecar remains, which claims less, never more.
    fn write_sidecar(&self) -> Result<(), DiskError> {
        let tmp = with_suffix(&self.final_path, SIDECAR_TMP_SUFFIX);
        let json = serde_json::to_vec_pretty(&self.state).map_err(|e| {
            DiskError::io("encode sidecar", &self.sidecar_path, io::Error::other(e))
        })?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| DiskError::io("create", &tmp, e))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(|e| DiskError::io("write", &tmp, e))?;
        drop(f);
        fs::rename(&tmp, &self.sidecar_path)
            .map_err(|e| DiskError::io("rename sidecar to", &self.sidecar_path, e))
    }
}

/// `path` with `suffix` appended to its file name.
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

fn check_absent(path: &Path) -> Result<(), DiskError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Err(DiskError::AlreadyExists {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DiskError::io("stat", path, e)),
    }
}

/// A file as the kernel knows it: device, inode and the time of its last status change.
/// The inode alone is not enough: a file removed and another created under the same name
/// often gets the freed inode number back; its change time differs (nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    /// Device.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Last status change, nanoseconds since the epoch.
    pub ctime_ns: i128,
}

impl FileId {
    /// The id of the file `m` describes.
    pub fn of(m: &fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

/// Removes `path` if it still names file `id` and nothing else does (no other hard link):
/// a file this host made, which nothing has since replaced or given a second name. Returns
/// whether it did; a path that is gone is `Ok(false)`.
pub fn remove_if_same_file(path: &Path, id: FileId) -> Result<bool, DiskError> {
    let m = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(DiskError::io("stat", path, e)),
    };
    if FileId::of(&m) != id || m.nlink() != 1 || !m.is_file() {
        return Ok(false);
    }
    fs::remove_file(path).map_err(|e| DiskError::io("remove", path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(true)
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<(), DiskError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DiskError::io("remove", path, e)),
        _ => Ok(()),
    }
}

/// The sidecar, or `None` if it is missing or unreadable as ours (then we start over).
/// Whether a sidecar vouches for resuming this transfer: same transfer and length, no
/// more committed than that, and a part file of the full length.
fn resumable(sc: &Sidecar, transfer_id: &str, expected_len: u64, part_len: u64) -> bool {
    sc.transfer_id == transfer_id
        && sc.expected_len == expected_len
        && sc.committed <= expected_len
        && part_len == expected_len
}

/// Where an interrupted transfer resumes, decided from the sidecar's bytes as
/// [`PartialImage::open_or_resume`] decides it: `Some(offset)` (at most `expected_len`)
/// only for a sidecar of this version naming this transfer and length; `None` (start
/// over) for anything else, however malformed. Pure (the fuzz target drives it).
pub fn resume_point(
    sidecar: &[u8],
    transfer_id: &str,
    expected_len: u64,
    part_len: u64,
) -> Option<u64> {
    parse_sidecar(sidecar)
        .filter(|sc| resumable(sc, transfer_id, expected_len, part_len))
        .map(|sc| sc.committed)
}

fn parse_sidecar(bytes: &[u8]) -> Option<Sidecar> {
    serde_json::from_slice::<Sidecar>(bytes)
        .ok()
        .filter(|sc| sc.version == SIDECAR_VERSION)
}

/// Opens (creating it if need be) and locks the part file, and checks that its name still
/// names the file locked: one removed meanwhile (an expired partial image,
/// [`crate::kept::discard_if_idle`], whose remover held the lock) is not written into
/// unlinked; the name is opened again.
fn open_locked(part_path: &Path) -> Result<File, DiskError> {
    for _ in 0..3 {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false) // the content may be resumed
            // Never write through a symlink planted at the part's name.
            .custom_flags(libc::O_NOFOLLOW)
            .open(part_path)
            .map_err(|e| DiskError::io("open part file", part_path, e))?;
        lock(&file, part_path)?;
        let held = file
            .metadata()
            .map_err(|e| DiskError::io("stat", part_path, e))?;
        match fs::symlink_metadata(part_path) {
            Ok(n) if n.dev() == held.dev() && n.ino() == held.ino() => return Ok(file),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(DiskError::io("stat", part_path, e)),
        }
    }
    Err(DiskError::Busy {
        path: part_path.to_path_buf(),
    })
}

/// The transfer a sidecar names, if it can be read as one of this version.
pub(crate) fn read_sidecar_transfer(path: &Path) -> Option<String> {
    parse_sidecar(&fs::read(path).ok()?).map(|sc| sc.transfer_id)
}

fn read_sidecar(path: &Path) -> Result<Option<Sidecar>, DiskError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DiskError::io("read sidecar", path, e)),
    };
    match serde_json::from_slice::<Sidecar>(&bytes) {
        Ok(sc) if sc.version == SIDECAR_VERSION => Ok(Some(sc)),
        Ok(sc) => {
            tracing::warn!(path = %path.display(), version = sc.version, "ignoring sidecar of another version");
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable sidecar");
            Ok(None)
        }
    }
}

/// How long a held lock is retried before the part file is called busy. A process forked
/// by another thread (QEMU, qemu-img) shares our open files until it execs, lock included:
/// a lock released a moment ago can still look held for that instant.
const LOCK_PATIENCE: Duration = Duration::from_millis(500);

/// Take an exclusive `flock` on the part file (released when it is closed); busy when
/// another holder keeps it for [`LOCK_PATIENCE`].
pub(crate) fn lock(file: &File, path: &Path) -> Result<(), DiskError> {
    let give_up = Instant::now() + LOCK_PATIENCE;
    loop {
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Some(libc::EWOULDBLOCK) => {
                return Err(DiskError::Busy {
                    path: path.to_path_buf(),
                })
            }
            _ => return Err(DiskError::io("lock", path, e)),
        }
    }
}

/// `rename` that fails with `AlreadyExists` instead of replacing `to`.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c_from = CString::new(from.as_os_str().as_bytes())?;
    let c_to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; renameat2 reads them and nothing else.
    // Through syscall(2) because not every libc wraps renameat2.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD as libc::c_long,
            c_from.as_ptr(),
            libc::AT_FDCWD as libc::c_long,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE as libc::c_long,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // Filesystems without RENAME_NOREPLACE (some network ones): check, then rename.
        // Racy, but the receiver holds the only writer of the part and the final name is
        // only ever created by a finishing receiver.
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            fs::rename(from, to)
        }
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar_of(final_path: &Path) -> Sidecar {
        let bytes = fs::read(with_suffix(final_path, SIDECAR_SUFFIX)).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn fresh_part_is_sparse_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let fin = dir.path().join("vda.raw");
        let img = PartialImage::open_or_resume(&fin, 64 << 20, "t1").unwrap();
        assert!(!img.resumed());
        assert_eq!(img.resume_offset(), 0);
        assert_eq!(img.expected_len(), 64 << 20);
        assert_eq!(img.transfer_id(), "t1");
        assert_eq!(img.part_path(), dir.path().join("vda.raw.ferry-part"));
        let meta = fs::metadata(img.part_path()).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20);
        let sc = sidecar_of(&fin);
        assert_eq!(sc.transfer_id, "t1");
        assert_eq!(sc.committed, 0);
        assert_eq!(sc.source_blake3, None);
        assert!(!fin.exists());
    }

    /// A received image is removed later only while its path still names that file with
    /// no second name: not once something replaced it, nor while a hard link shares it.
    #[test]
    fn a_finished_image_is_removed_only_while_it_is_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let receive = |name: &str| {
            let fin = dir.path().join(name);
            let mut img = PartialImage::open_or_resume(&fin, 4, "t").unwrap();
            img.write_chunk(0, b"data").unwrap();
            img.checkpoint(4).unwrap();
            let (path, id) = img.finish_placed(Blake3Digest::of_bytes(b"data")).unwrap();
            assert_eq!(path, fin);
            (fin, id)
        };
        let (fin, id) = receive("a.raw");
        assert!(remove_if_same_file(&fin, id).unwrap());
        assert!(!fin.exists());
        assert!(
            !remove_if_same_file(&fin, id).unwrap(),
            "gone: nothing to do"
        );

        // Replaced by another file of the same name: left alone.
        let (fin, id) = receive("b.raw");
        fs::remove_file(&fin).unwrap();
        fs::write(&fin, b"mine").unwrap();
        assert!(!remove_if_same_file(&fin, id).unwrap());
        assert_eq!(fs::read(&fin).unwrap(), b"mine");

        // A second name shares it: left alone.
        let (fin, id) = receive("c.raw");
        let other = dir.path().join("c-link.raw");
        fs::hard_link(&fin, &other).unwrap();
        assert!(!remove_if_same_file(&fin, id).unwrap());
        assert!(fin.exists() && other.exists());
    }

    #[test]
    fn chunk_order_and_range_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let fin = dir.path().join("vda.raw");
        let mut img = PartialImage::open_or_resume(&fin, 10_000, "t").unwrap();
        img.write_chunk(0, &[1; 100]).unwrap();
        img.write_chunk(200, &[2; 100]).unwrap();
        assert!(matches!(
            img.write_chunk(250, &[3; 10]),
            Err(DiskError::OutOfOrder { next: 300, .. })
        ));
        assert!(matches!(
            img.write_chunk(9_990, &[4; 11]),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            img.write_chunk(u64::MAX, &[4; 11]),
            Err(DiskError::OutOfRange { .. })
        ));
        img.write_chunk(9_990, &[4; 10]).unwrap();
        img.checkpoint(10_000).unwrap();
        assert!(matches!(
            img.checkpoint(5_000),
            Err(DiskError::OutOfOrder { .. })
        ));
        assert!(matches!(
            img.checkpoint(10_001),
            Err(DiskError::OutOfRange { .. })
        ));
        assert_eq!(sidecar_of(&fin).committed, 10_000);
        img.abandon().unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn checkpoint_beyond_written_refuses_lower_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let fin = dir.path().join("vda.raw");
        let mut img = PartialImage::open_or_resume(&fin, 1 << 20, "t").unwrap();
        img.write_chunk(0, &[1; 10]).unwrap();
        img.checkpoint(4096).unwrap();
        assert!(matches!(
            img.write_chunk(100, &[1; 10]),
            Err(DiskError::OutOfOrder { next: 4096, .. })
        ));
        img.write_chunk(4096, &[1; 10]).unwrap();
    }

    #[test]
    fn zero_blocks_inside_a_chunk_stay_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let fin = dir.path().join("vda.raw");
        let mut img = PartialImage::open_or_resume(&fin, 8 << 20, "t").unwrap();
        // Unaligned chunk: non-zero bytes at its start, in its middle and at its end.
        let mut chunk = vec![0u8; 1 << 20];
        chunk[0] = 1;
        chunk[300_000] = 2;
        chunk[(1 << 20) - 1] = 3;
        let off = (1 << 20) + 100;
        img.write_chunk(off, &chunk).unwrap();
        img.checkpoint(off + chunk.len() as u64).unwrap();
        let part = fs::read(img.part_path()).unwrap();
        assert_eq!(&part[off as usize..off as usize + chunk.len()], &chunk[..]);
        assert!(part[..off as usize].iter().all(|b| *b == 0));
        let blocks = fs::metadata(img.part_path()).unwrap().blocks();
        assert!(blocks * 512 <= 64 * 1024, "{blocks} blocks allocated");
    }

    #[test]
    fn existing_final_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fin = dir.path().join("vda.raw");
        fs::write(&fin, b"precious").unwrap();
        assert!(matches!(
            PartialImage::open_or_resume(&fin, 8, "t"),
            Err(DiskError::AlreadyExists { .. })
        ));
        assert!(!with_suffix(&fin, PART_SUFFIX).exists());
        // A dangling symlink counts as existing too.
        let link = dir.path().join("link.raw");
        std::os::unix::fs::symlink("nowhere", &link).unwrap();
        assert!(matches!(
            PartialImage::open_or_resume(&link, 8, "t"),
            Err(DiskError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn final_appearing_meanwhile_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let fin = dir.path().join("vda.raw");
        let mut img = PartialImage::open_or_resume(&fin, 4, "t").unwrap();
        img.write_chunk(0, b"data").unwrap();
        fs::write(&fin, b"precious").unwrap();
        let err = img.finish(Blake3Digest::of_bytes(b"data")).unwrap_err();
        assert!(matches!(err, DiskError::AlreadyExists { .. }), "{err}");
        assert_eq!(fs::read(&fin).unwrap(), b"precious");
    }

    #[test]
    fn symlink_at_part_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep me").unwrap();
        let fin = dir.path().join("vda.raw");
        std::os::unix::fs::symlink(&victim, with_suffix(&fin, PART_SUFFIX)).unwrap();
        assert!(PartialImage::open_or_resume(&fin, 4096, "t").is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
    }

    #[test]
    fn second_receiver_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let fin = dir.path().join("vda.raw");
        let img = PartialImage::open_or_resume(&fin, 4096, "t").unwrap();
        let err = PartialImage::open_or_resume(&fin, 4096, "t").unwrap_err();
        assert!(matches!(err, DiskError::Busy { .. }), "{err}");
        drop(img);
        let again = PartialImage::open_or_resume(&fin, 4096, "t").unwrap();
        assert!(again.resumed());
    }

    #[test]
    fn bad_sidecar_or_length_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let fin = dir.path().join("vda.raw");
        let mut img = PartialImage::open_or_resume(&fin, 8192, "t").unwrap();
        img.write_chunk(0, &[9; 4096]).unwrap();
        img.checkpoint(4096).unwrap();
        drop(img);

        // Different expected length: fresh.
        let img = PartialImage::open_or_resume(&fin, 4 * 8192, "t").unwrap();
        assert!(!img.resumed());
        assert_eq!(img.resume_offset(), 0);
        assert_eq!(fs::read(img.part_path()).unwrap(), vec![0u8; 4 * 8192]);
        drop(img);

        // Garbage sidecar: fresh.
        fs::write(with_suffix(&fin, SIDECAR_SUFFIX), b"{not json").unwrap();
        let img = PartialImage::open_or_resume(&fin, 4 * 8192, "t").unwrap();
        assert!(!img.resumed());
        assert_eq!(sidecar_of(&fin).committed, 0);
    }

    #[test]
    fn source_digest_is_kept_across_resume() {
        let dir = tempfile::tempdir().unwrap();
        let fin = dir.path().join("vda.raw");
        let d = Blake3Digest::of_bytes(b"whatever");
        let mut img = PartialImage::open_or_resume(&fin, 4096, "t").unwrap();
        assert_eq!(img.source_digest(), None);
        img.set_source_digest(d).unwrap();
        img.checkpoint(100).unwrap();
        drop(img);
        let img = PartialImage::open_or_resume(&fin, 4096, "t").unwrap();
        assert!(img.resumed());
        assert_eq!(img.resume_offset(), 100);
        assert_eq!(img.source_digest(), Some(d));
    }

    /// A receiver that opened the part just before a remover (the expiry of kept partial
    /// images) unlinked it under its lock writes into the new file under the name, not
    /// into the unlinked one.
    #[test]
    fn a_part_removed_while_its_lock_was_awaited_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("a.qcow2.ferry-part");
        fs::write(&part, b"old").unwrap();
        let remover = File::open(&part).unwrap();
        lock(&remover, &part).unwrap();
        let p = part.clone();
        let receiver = std::thread::spawn(move || open_locked(&p));
        // Until the receiver has opened the old file too (two descriptors of this process
        // name it); it then waits for the lock (patience: 500 ms).
        let opened = || {
            fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l == &part)
                .count()
        };
        let since = Instant::now();
        while opened() < 2 {
            assert!(since.elapsed() < Duration::from_millis(400), "never opened");
            std::thread::sleep(Duration::from_millis(1));
        }
        fs::remove_file(&part).unwrap();
        drop(remover);
        let file = receiver.join().unwrap().unwrap();
        let named = fs::metadata(&part).expect("a new part under the name");
        let held = file.metadata().unwrap();
        assert_eq!((named.dev(), named.ino()), (held.dev(), held.ino()));
        assert_eq!(held.len(), 0, "the new file, not the old one");
    }
}
