//! Shared-storage detection.
//!
//! The source places a random token in a hidden file next to a disk; the target looks for
//! the same value at the path it would use. If it is there, both hosts see the same
//! directory and the disk need not be copied.
//!
//! A `true` answer can be trusted (only this source wrote that value). A `false` answer on
//! NFS can be wrong for a while: a client that cached the name as absent may not see the new
//! file until its directory attribute cache expires (`acdirmin`, up to 30 s by default).
//! That errs on the safe side: the disk gets copied, and the receiving side refuses to write
//! over an existing image anyway.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::DiskError;

/// Longest token file we read: the value plus some slack. A bigger file is not ours.
const MAX_TOKEN_FILE: u64 = 256;

/// A token file placed next to a disk. Dropping it deletes the file.
#[derive(Debug)]
pub struct SharedStorageToken {
    path: PathBuf,
    value: String,
    removed: bool,
}

impl SharedStorageToken {
    /// The token file for `disk`: `.<file name>.ferry-token` in the same directory.
    pub fn path_for(disk: &Path) -> Result<PathBuf, DiskError> {
        let name = disk.file_name().ok_or(DiskError::InvalidPath {
            path: disk.to_path_buf(),
            reason: "disk path has no file name",
        })?;
        let mut token_name = std::ffi::OsString::from(".");
        token_name.push(name);
        token_name.push(".ferry-token");
        Ok(disk.with_file_name(token_name))
    }

    /// Write a fresh random 128-bit token (32 hex digits) beside `disk` and make it durable.
    /// The disk itself need not exist; its directory must.
    pub fn place_beside(disk: &Path) -> Result<Self, DiskError> {
        let path = Self::path_for(disk)?;
        let value = random_hex128().map_err(|e| DiskError::io("getrandom for", &path, e))?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            // A symlink planted at the token's name must not redirect the write.
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| DiskError::io("create token file", &path, e))?;
        f.write_all(value.as_bytes())
            .map_err(|e| DiskError::io("write token file", &path, e))?;
        // On NFS, fsync (like close) pushes the data to the server so the peer can read it.
        f.sync_all()
            .map_err(|e| DiskError::io("fsync token file", &path, e))?;
        drop(f);
        if let Some(dir) = path.parent() {
            crate::sync_dir(dir)?;
        }
        Ok(SharedStorageToken {
            path,
            value,
            removed: false,
        })
    }

    /// The token's value, to send to the peer.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The token file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the token file beside `disk` holds exactly `expected`.
    /// A missing file (or directory) is `Ok(false)`.
    pub fn probe(disk: &Path, expected: &str) -> Result<bool, DiskError> {
        let path = Self::path_for(disk)?;
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(DiskError::io("open token file", &path, e)),
        };
        let mut buf = Vec::new();
        f.take(MAX_TOKEN_FILE)
            .read_to_end(&mut buf)
            .map_err(|e| DiskError::io("read token file", &path, e))?;
        Ok(!expected.is_empty() && buf == expected.as_bytes())
    }

    /// Delete the token file now (a missing file is fine).
    pub fn remove(mut self) -> Result<(), DiskError> {
        self.removed = true;
        remove_quietly(&self.path).map_err(|e| DiskError::io("remove token file", &self.path, e))
    }
}

impl Drop for SharedStorageToken {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = remove_quietly(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove token file");
            }
        }
    }
}

fn remove_quietly(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// 16 bytes from the kernel's CSPRNG as 32 lowercase hex digits.
fn random_hex128() -> io::Result<String> {
    let mut buf = [0u8; 16];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(crate::hash::to_hex(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn place_probe_remove() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("vda.qcow2");
        let token = SharedStorageToken::place_beside(&disk).unwrap();
        assert_eq!(token.path(), dir.path().join(".vda.qcow2.ferry-token"));
        assert_eq!(token.value().len(), 32);
        assert!(token.value().chars().all(|c| c.is_ascii_hexdigit()));
        assert!(SharedStorageToken::probe(&disk, token.value()).unwrap());
        assert!(!SharedStorageToken::probe(&disk, "0123456789abcdef0123456789abcdef").unwrap());
        assert!(!SharedStorageToken::probe(&disk, "").unwrap());
        // Another disk in the same directory has no token.
        assert!(!SharedStorageToken::probe(&dir.path().join("vdb.raw"), token.value()).unwrap());

        let other = SharedStorageToken::place_beside(&disk.with_file_name("vdb.raw")).unwrap();
        assert_ne!(other.value(), token.value());

        let path = token.path().to_path_buf();
        let value = token.value().to_owned();
        token.remove().unwrap();
        assert!(!path.exists());
        assert!(!SharedStorageToken::probe(&disk, &value).unwrap());

        let other_path = other.path().to_path_buf();
        drop(other);
        assert!(!other_path.exists());
    }

    #[test]
    fn probe_in_a_different_dir_is_false() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let token = SharedStorageToken::place_beside(&a.path().join("vda.raw")).unwrap();
        assert!(!SharedStorageToken::probe(&b.path().join("vda.raw"), token.value()).unwrap());
        assert!(
            !SharedStorageToken::probe(&b.path().join("missing-dir/vda.raw"), token.value())
                .unwrap()
        );
    }

    #[test]
    fn remove_tolerates_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let token = SharedStorageToken::place_beside(&dir.path().join("vda.raw")).unwrap();
        fs::remove_file(token.path()).unwrap();
        token.remove().unwrap();
    }

    #[test]
    fn place_needs_a_file_name_and_a_directory() {
        assert!(matches!(
            SharedStorageToken::place_beside(Path::new("/")),
            Err(DiskError::InvalidPath { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            SharedStorageToken::place_beside(&dir.path().join("no/such/dir/vda.raw")),
            Err(DiskError::Io { .. })
        ));
    }
}
