//! Free space on the target's filesystem, checked before a transfer starts.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::DiskError;

/// Bytes available to unprivileged users in the filesystem holding `dir`
/// (`statvfs`: `f_bavail * f_frsize`; the agent should not eat root's reserve either).
pub fn free_bytes(dir: &Path) -> Result<u64, DiskError> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| DiskError::InvalidPath {
        path: dir.to_path_buf(),
        reason: "path contains a NUL byte",
    })?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(DiskError::io(
            "statvfs",
            dir,
            std::io::Error::last_os_error(),
        ));
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Fail with [`DiskError::NoSpace`] unless `dir`'s filesystem has `needed` bytes free.
///
/// `what` names the use in the message ("disk vda", ...). For a sparse image, `needed` is
/// its allocated size, not its virtual size.
pub fn ensure_space(dir: &Path, needed: u64, what: &str) -> Result<(), DiskError> {
    let available = free_bytes(dir)?;
    if available < needed {
        return Err(DiskError::NoSpace {
            dir: dir.to_path_buf(),
            what: what.to_owned(),
            needed,
            available,
        });
    }
    Ok(())
}

/// The closest existing directory at or above `path`'s parent: where free space for a
/// file about to be created at `path` (and any missing directories) is measured.
pub fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .skip(1)
        .find(|a| a.is_dir())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// A byte count for people: `512 B`, `1.5 KiB`, `2.0 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    #[test]
    fn existing_ancestor_skips_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        assert_eq!(
            existing_ancestor(&dir.path().join("a/b/c/d.img")),
            dir.path().join("a/b")
        );
        assert_eq!(
            existing_ancestor(&dir.path().join("a/b/img")),
            dir.path().join("a/b")
        );
    }

    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(2 << 30), "2.0 GiB");
        assert_eq!(human_bytes(1288490189), "1.2 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn free_space_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        ensure_space(dir.path(), 1, "a byte").unwrap();
        assert!(matches!(
            free_bytes(&dir.path().join("missing")),
            Err(DiskError::Io { .. })
        ));
    }

    #[test]
    fn absurd_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = ensure_space(dir.path(), u64::MAX, "disk vda").unwrap_err();
        let DiskError::NoSpace {
            needed, available, ..
        } = &err
        else {
            panic!("expected NoSpace, got {err}");
        };
        assert_eq!(*needed, u64::MAX);
        let msg = err.to_string();
        let want = format!(
            "not enough free space in {} for disk vda: need 16.0 EiB, {} available",
            dir.path().display(),
            human_bytes(*available)
        );
        assert_eq!(msg, want);
    }
}
