//! Images made for a migration, made so that a restart can tell them from anyone else's.
//!
//! A target creates empty copies of the disks that travel. If it dies between making one
//! and journaling it, the restart finds a file at the disk's path and cannot know whether
//! it made it (an empty copy to remove) or found it there (someone's disk, never to be
//! touched). So an image is made under a staging name unique to the migration first, then
//! hard-linked to its real path (which fails if anything is there already); the staging
//! name stays until the migration's record lists the copy. While both names exist and
//! are one file, the copy is provably this migration's: [`remove_if_ours`] removes it then,
//! and only then.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::DiskError;
use crate::image::{self, ImageFormat};

/// The staging name of `path` for the migration (or other owner) `tag`: hidden, beside
/// it, on the same filesystem (a hard link cannot cross one).
pub fn staging_path(path: &Path, tag: &str) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".ferry-");
    name.push(tag);
    path.with_file_name(name)
}

/// How [`create_staged`] put the image in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Linked: the staging name proves the image ours until [`release_staging`].
    Linked,
    /// The filesystem has no hard links: renamed into place (without replacing anything),
    /// so no proof is kept: a restart before the caller journaled the image leaves it.
    Renamed,
}

/// Creates an empty image at `path` (which must not exist) through its staging name.
/// A staging file left by an earlier attempt under the same `tag` is replaced.
pub fn create_staged(
    path: &Path,
    format: ImageFormat,
    virtual_size: u64,
    tag: &str,
) -> Result<Placed, DiskError> {
    let staging = staging_path(path, tag);
    let _ = fs::remove_file(&staging);
    if let Err(e) = image::create(&staging, format, virtual_size, None) {
        // qemu-img may leave a partial file behind (ENOSPC, a size refused late).
        let _ = fs::remove_file(&staging);
        return Err(e);
    }
    let placed = match fs::hard_link(&staging, path) {
        Ok(()) => Ok(Placed::Linked),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(DiskError::AlreadyExists {
            path: path.to_path_buf(),
        }),
        // No hard links here (some FUSE and network filesystems): place it anyway.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EPERM | libc::EOPNOTSUPP | libc::EMLINK)
            ) =>
        {
            crate::receive::rename_noreplace(&staging, path)
                .map(|()| Placed::Renamed)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => DiskError::AlreadyExists {
                        path: path.to_path_buf(),
                    },
                    _ => DiskError::io("rename", path, e),
                })
        }
        Err(e) => Err(DiskError::io("link", path, e)),
    };
    if placed.is_err() {
        let _ = fs::remove_file(&staging);
    }
    placed
}

/// Drops the staging name once the caller has journaled the image as its own (the image
/// itself stays). Idempotent.
pub fn release_staging(path: &Path, tag: &str) -> Result<(), DiskError> {
    let staging = staging_path(path, tag);
    match fs::remove_file(&staging) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DiskError::io("remove", &staging, e)),
    }
}

/// What [`remove_if_ours`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The image was the staging file's other name: both removed.
    Removed,
    /// A staging file, but the path is absent or another file: only the staging file
    /// was removed (the crash came before the link, or someone else's file is there).
    NotOurs,
    /// No staging file: nothing proves the path ours, so it was left alone.
    Unproven,
}

/// Removes the image at `path` if, and only if, it is the file staged under `tag`; the
/// staging name goes in every case.
pub fn remove_if_ours(path: &Path, tag: &str) -> Result<Removal, DiskError> {
    let staging = staging_path(path, tag);
    let staged = match fs::symlink_metadata(&staging) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Unproven),
        Err(e) => return Err(DiskError::io("stat", &staging, e)),
    };
    let same = fs::symlink_metadata(path)
        .is_ok_and(|m| m.dev() == staged.dev() && m.ino() == staged.ino());
    if same {
        fs::remove_file(path).map_err(|e| DiskError::io("remove", path, e))?;
    }
    fs::remove_file(&staging).map_err(|e| DiskError::io("remove", &staging, e))?;
    Ok(if same {
        Removal::Removed
    } else {
        Removal::NotOurs
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(path: &Path) {
        fs::write(path, b"someone's disk").unwrap();
    }

    #[test]
    fn staged_image_is_linked_and_removed_only_with_its_staging_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vda.qcow2");
        assert_eq!(
            create_staged(&p, ImageFormat::Qcow2, 1 << 20, "m1").unwrap(),
            Placed::Linked
        );
        let s = staging_path(&p, "m1");
        assert_eq!(
            fs::metadata(&p).unwrap().ino(),
            fs::metadata(&s).unwrap().ino()
        );
        assert_eq!(image::inspect(&p).unwrap().format, ImageFormat::Qcow2);
        // Another migration's tag proves nothing.
        assert_eq!(remove_if_ours(&p, "m2").unwrap(), Removal::Unproven);
        assert!(p.exists());
        assert_eq!(remove_if_ours(&p, "m1").unwrap(), Removal::Removed);
        assert!(!p.exists() && !s.exists());
    }

    #[test]
    fn released_image_is_no_longer_removable_as_staged() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vda.raw");
        create_staged(&p, ImageFormat::Raw, 1 << 20, "m1").unwrap();
        release_staging(&p, "m1").unwrap();
        release_staging(&p, "m1").unwrap();
        assert_eq!(remove_if_ours(&p, "m1").unwrap(), Removal::Unproven);
        assert!(p.exists());
    }

    #[test]
    fn existing_file_is_never_replaced_nor_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vda.raw");
        raw(&p);
        let e = create_staged(&p, ImageFormat::Raw, 1 << 20, "m1").unwrap_err();
        assert!(matches!(e, DiskError::AlreadyExists { .. }), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"someone's disk");
        assert!(!staging_path(&p, "m1").exists());
    }

    #[test]
    fn a_file_that_appeared_after_a_crash_before_the_link_stays() {
        // Crash after the staging image was made, before the link; then someone put a
        // disk at the path before the restart.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vda.qcow2");
        image::create(&staging_path(&p, "m1"), ImageFormat::Qcow2, 1 << 20, None).unwrap();
        raw(&p);
        assert_eq!(remove_if_ours(&p, "m1").unwrap(), Removal::NotOurs);
        assert_eq!(fs::read(&p).unwrap(), b"someone's disk");
        assert!(!staging_path(&p, "m1").exists());
        // And with nothing at the path: only the staging file goes.
        image::create(&staging_path(&p, "m2"), ImageFormat::Qcow2, 1 << 20, None).unwrap();
        assert_eq!(remove_if_ours(&p, "m2").unwrap(), Removal::NotOurs);
    }

    #[test]
    fn staging_name_is_hidden_beside_the_image() {
        assert_eq!(
            staging_path(Path::new("/srv/vm/a.qcow2"), "abc"),
            PathBuf::from("/srv/vm/.a.qcow2.ferry-abc")
        );
    }
}
