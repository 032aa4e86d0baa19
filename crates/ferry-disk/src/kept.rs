//! Partial images kept for a resume: found, and removed once nothing has touched them for
//! long enough.
//!
//! A cold copy that fails (a source gone, a target restarted, a dropped link) keeps its
//! part file and sidecar so that the next attempt resumes where it stopped
//! ([`crate::PartialImage`]). An attempt that never comes leaves them forever: a VM's
//! worth of disk on a host that may be short of it. [`find_kept`] lists them under a
//! storage root; [`discard_if_idle`] removes one that no receiver holds and that has not
//! changed since a given time. A receiver writing it holds its `flock`; a resume that
//! opens it during the removal finds its name gone and starts a new part
//! (`PartialImage::open_or_resume` checks that the name still names what it locked).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::receive::{lock, read_sidecar_transfer, remove_if_exists, with_suffix};
use crate::receive::{PART_SUFFIX, SIDECAR_SUFFIX, SIDECAR_TMP_SUFFIX};
use crate::{sync_dir, DiskError};

/// The suffixes of a partial image's files (part, sidecar, sidecar being replaced),
/// longest first.
pub const PARTIAL_SUFFIXES: [&str; 3] = [SIDECAR_TMP_SUFFIX, SIDECAR_SUFFIX, PART_SUFFIX];

/// How deep under a storage root part files are looked for (images sit in per-VM
/// directories, rarely deeper than a few levels).
pub const SEARCH_DEPTH: usize = 8;

/// A partial image on disk: the part file of `final_path`, its sidecar, or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptPartial {
    /// The image's final name (the part file is this plus `.ferry-part`).
    pub final_path: PathBuf,
    /// Bytes its files take on disk (the part is sparse: its allocated blocks, not its
    /// length).
    pub allocated: u64,
    /// When its part file or sidecar last changed: a receiver checkpoints at least every
    /// few seconds while data flows.
    pub touched: SystemTime,
    /// The transfer it belongs to, when its sidecar can be read.
    pub transfer_id: Option<String>,
}

/// Whether a partial image last touched at `touched` has been idle for `keep` by `now`.
/// A time in the future (a clock stepped back) is not idle. Pure.
pub fn idle_for(touched: SystemTime, now: SystemTime, keep: Duration) -> bool {
    now.duration_since(touched).is_ok_and(|idle| idle >= keep)
}

/// The final name a file belongs to, if it is one of a partial image's files.
fn final_of(name: &Path) -> Option<PathBuf> {
    let s = name.to_str()?;
    PARTIAL_SUFFIXES
        .iter()
        .find_map(|suffix| s.strip_suffix(suffix))
        .filter(|stem| !stem.is_empty() && !stem.ends_with('/'))
        .map(PathBuf::from)
}

/// The partial images under `root` (at most [`SEARCH_DEPTH`] levels down, symlinks not
/// followed), sorted by final name. Entries that cannot be read are skipped (logged).
pub fn find_kept(root: &Path) -> Vec<KeptPartial> {
    let mut found: BTreeMap<PathBuf, KeptPartial> = BTreeMap::new();
    let walk = walkdir::WalkDir::new(root)
        .follow_links(false)
        .max_depth(SEARCH_DEPTH);
    for entry in walk {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(root = %root.display(), error = %e, "skipped while looking for partial images");
                continue;
            }
        };
        if !entry.file_type().is_file() {
            continue;
        }
        let Some(final_path) = final_of(entry.path()) else {
            continue;
        };
        let Ok(m) = entry.metadata() else {
            continue;
        };
        let touched = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let k = found
            .entry(final_path.clone())
            .or_insert_with(|| KeptPartial {
                final_path,
                allocated: 0,
                touched: SystemTime::UNIX_EPOCH,
                transfer_id: None,
            });
        k.allocated += m.blocks() * 512;
        k.touched = k.touched.max(touched);
        if entry
            .path()
            .to_str()
            .is_some_and(|s| s.ends_with(SIDECAR_SUFFIX))
        {
            k.transfer_id = read_sidecar_transfer(entry.path());
        }
    }
    found.into_values().collect()
}

/// What [`discard_if_idle`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// Removed; its files had taken `freed` bytes.
    Removed {
        /// Bytes its files had taken on disk.
        freed: u64,
    },
    /// A receiver holds it (or its name was replaced meanwhile): left alone.
    InUse,
    /// Changed since `idle_since`: left alone.
    Fresh,
    /// Nothing there any more.
    Gone,
}

/// Removes the partial image of `final_path` (part file, sidecar, a sidecar being
/// replaced) if no receiver holds it and none of its files changed after `idle_since`.
/// Every removal happens under the part's lock, so a receiver cannot take it meanwhile
/// (a sidecar left without its part: the lock of an empty part made for the purpose and
/// removed with it). The part is opened for writing: on NFS, `flock` is emulated with a
/// byte-range lock, which needs it — and is seen by other clients only where the mount
/// does not keep locks local (`local_lock=none`, the default).
pub fn discard_if_idle(final_path: &Path, idle_since: SystemTime) -> Result<Discard, DiskError> {
    let part_path = with_suffix(final_path, PART_SUFFIX);
    let sidecars = [
        with_suffix(final_path, SIDECAR_TMP_SUFFIX),
        with_suffix(final_path, SIDECAR_SUFFIX),
    ];
    let open = |create: bool| {
        let mut o = OpenOptions::new();
        o.read(true)
            .write(true)
            // A symlink planted at the part's name is not followed (nor removed: not ours).
            .custom_flags(libc::O_NOFOLLOW);
        if create {
            o.create_new(true);
        }
        o.open(&part_path)
    };
    let (file, made) = match open(false) {
        Ok(f) => (f, false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match open(true) {
            Ok(f) => (f, true),
            // A receiver made it meanwhile.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(Discard::InUse),
            Err(e) => return Err(DiskError::io("create part file", &part_path, e)),
        },
        Err(e) => return Err(DiskError::io("open part file", &part_path, e)),
    };
    match lock(&file, &part_path) {
        Ok(()) => {}
        Err(DiskError::Busy { .. }) => return Ok(Discard::InUse),
        Err(e) => return Err(e),
    }
    let held = file
        .metadata()
        .map_err(|e| DiskError::io("stat", &part_path, e))?;
    let named = fs::symlink_metadata(&part_path).ok();
    if named.is_none_or(|n| n.dev() != held.dev() || n.ino() != held.ino()) {
        // Replaced (or removed) between the open and the lock: someone else's now.
        return Ok(Discard::InUse);
    }
    // Everything below runs under the lock. The empty part made for it goes in any case
    // (a receiver that opened it meanwhile finds its name gone and makes its own).
    let result = (|| {
        let mut freed = 0;
        if !made {
            if held.modified().map(|t| t > idle_since).unwrap_or(true) {
                return Ok(Discard::Fresh);
            }
            freed += held.blocks() * 512;
        }
        let mut any = !made;
        for s in &sidecars {
            match fs::symlink_metadata(s) {
                Ok(m) => {
                    if m.modified().map(|t| t > idle_since).unwrap_or(true) {
                        return Ok(Discard::Fresh);
                    }
                    freed += m.blocks() * 512;
                    any = true;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(DiskError::io("stat", s, e)),
            }
        }
        if !any {
            return Ok(Discard::Gone);
        }
        // The sidecars first, as a receiver starting over does: a crash in between leaves
        // a part no sidecar vouches for, which the next attempt starts over on (or the
        // next pass removes).
        for s in &sidecars {
            remove_if_exists(s)?;
        }
        Ok(Discard::Removed { freed })
    })();
    if made || matches!(result, Ok(Discard::Removed { .. })) {
        remove_if_exists(&part_path)?;
        if let Some(dir) = final_path.parent() {
            sync_dir(dir)?;
        }
    }
    drop(file);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PartialImage;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn idle_only_after_keep_and_never_from_the_future() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert!(!idle_for(t, t, HOUR));
        assert!(!idle_for(t, t + HOUR - Duration::from_secs(1), HOUR));
        assert!(idle_for(t, t + HOUR, HOUR));
        assert!(!idle_for(t + HOUR, t, HOUR), "a clock stepped back");
        assert!(idle_for(t, t, Duration::ZERO));
    }

    #[test]
    fn file_names_map_to_their_image() {
        let f = |s: &str| final_of(Path::new(s));
        assert_eq!(f("/r/vm/a.qcow2.ferry-part"), Some("/r/vm/a.qcow2".into()));
        assert_eq!(
            f("/r/vm/a.qcow2.ferry-part.json"),
            Some("/r/vm/a.qcow2".into())
        );
        assert_eq!(
            f("/r/vm/a.qcow2.ferry-part.json.tmp"),
            Some("/r/vm/a.qcow2".into())
        );
        assert_eq!(f("/r/vm/a.qcow2"), None);
        assert_eq!(f("/r/vm/.ferry-part"), None);
        assert_eq!(f("/r/vm/a.ferry-part.bak"), None);
    }

    fn part(dir: &Path, name: &str, len: u64) -> PathBuf {
        let fin = dir.join(name);
        let mut p = PartialImage::open_or_resume(&fin, len, "t-1").unwrap();
        p.write_chunk(0, &[7u8; 8192]).unwrap();
        p.checkpoint(8192).unwrap();
        drop(p);
        fin
    }

    #[test]
    fn kept_partials_are_found_with_their_transfer_and_size() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("vm1/deep")).unwrap();
        let a = part(&dir.path().join("vm1"), "a.qcow2", 1 << 20);
        let b = part(&dir.path().join("vm1/deep"), "b.raw", 1 << 20);
        fs::write(dir.path().join("vm1/c.qcow2"), b"an image").unwrap();
        let found = find_kept(dir.path());
        assert_eq!(
            found
                .iter()
                .map(|k| k.final_path.clone())
                .collect::<Vec<_>>(),
            vec![a, b]
        );
        for k in &found {
            assert_eq!(k.transfer_id.as_deref(), Some("t-1"));
            // 8 KiB written into a 1 MiB hole, plus the sidecar: not the length.
            assert!(k.allocated >= 8192 && k.allocated < 1 << 20, "{k:?}");
        }
    }

    #[test]
    fn an_idle_part_goes_a_fresh_one_stays_and_a_held_one_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let fin = part(dir.path(), "a.qcow2", 1 << 20);
        let before_it = SystemTime::now() - HOUR;
        assert_eq!(discard_if_idle(&fin, before_it).unwrap(), Discard::Fresh);
        assert!(with_suffix(&fin, PART_SUFFIX).exists());

        let held = PartialImage::open_or_resume(&fin, 1 << 20, "t-1").unwrap();
        let after_it = SystemTime::now() + HOUR;
        assert_eq!(discard_if_idle(&fin, after_it).unwrap(), Discard::InUse);
        drop(held);

        match discard_if_idle(&fin, after_it).unwrap() {
            Discard::Removed { freed } => assert!(freed >= 8192, "{freed}"),
            other => panic!("{other:?}"),
        }
        assert!(!with_suffix(&fin, PART_SUFFIX).exists());
        assert!(!with_suffix(&fin, SIDECAR_SUFFIX).exists());
        assert!(find_kept(dir.path()).is_empty());
        assert_eq!(discard_if_idle(&fin, after_it).unwrap(), Discard::Gone);
    }

    #[test]
    fn a_sidecar_without_its_part_goes_and_a_planted_symlink_stays() {
        let dir = tempfile::tempdir().unwrap();
        let fin = dir.path().join("a.qcow2");
        fs::write(with_suffix(&fin, SIDECAR_SUFFIX), b"{}").unwrap();
        let later = SystemTime::now() + HOUR;
        assert!(matches!(
            discard_if_idle(&fin, later).unwrap(),
            Discard::Removed { .. }
        ));
        assert!(!with_suffix(&fin, SIDECAR_SUFFIX).exists());
        assert!(
            !with_suffix(&fin, PART_SUFFIX).exists(),
            "the part made for its lock goes too"
        );
        assert_eq!(discard_if_idle(&fin, later).unwrap(), Discard::Gone);
        assert!(!with_suffix(&fin, PART_SUFFIX).exists());

        let victim = dir.path().join("victim");
        fs::write(&victim, b"not ferry's").unwrap();
        std::os::unix::fs::symlink(&victim, with_suffix(&fin, PART_SUFFIX)).unwrap();
        assert!(discard_if_idle(&fin, later).is_err());
        assert!(victim.exists());
        assert!(find_kept(dir.path()).is_empty(), "a symlink is not a part");
    }

    #[test]
    fn a_resume_after_a_removal_starts_a_new_part_under_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let fin = part(dir.path(), "a.qcow2", 1 << 20);
        let later = SystemTime::now() + HOUR;
        assert!(matches!(
            discard_if_idle(&fin, later).unwrap(),
            Discard::Removed { .. }
        ));
        let p = PartialImage::open_or_resume(&fin, 1 << 20, "t-1").unwrap();
        assert_eq!(p.resume_offset(), 0);
        assert!(!p.resumed());
        assert!(with_suffix(&fin, PART_SUFFIX).exists());
    }
}
