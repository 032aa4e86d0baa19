//! Storage roots: the directories the agent may read disk images from and write them to.
//!
//! Every path that arrives from a peer or an operator goes through [`StorageRoots::confine`]
//! before it is opened, so that neither `..` nor a symlink can lead a migration to read or
//! overwrite a file outside the configured directories.
//!
//! This is a check, not a sandbox: a local user who can write inside a root could swap a
//! directory for a symlink between the check and the open. The roots are meant to be owned
//! by the agent.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::DiskError;

/// Symlinks followed by hand (dangling ones) before giving up, as the kernel's `ELOOP` does.
const MAX_SYMLINK_HOPS: u32 = 40;

/// The configured storage root directories, canonicalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRoots {
    roots: Vec<PathBuf>,
}

impl StorageRoots {
    /// Canonicalize each root. Roots must be absolute and exist.
    pub fn new<I, P>(roots: I) -> Result<Self, DiskError>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<Path>,
    {
        let mut out = Vec::new();
        for root in roots {
            let root = root.as_ref();
            if !root.is_absolute() {
                return Err(DiskError::NotAbsolute {
                    path: root.to_path_buf(),
                });
            }
            let canon = fs::canonicalize(root)
                .map_err(|e| DiskError::io("canonicalize storage root", root, e))?;
            if !canon.is_dir() {
                return Err(DiskError::InvalidPath {
                    path: root.to_path_buf(),
                    reason: "storage root is not a directory",
                });
            }
            if !out.contains(&canon) {
                out.push(canon);
            }
        }
        Ok(StorageRoots { roots: out })
    }

    /// No roots: every path is refused.
    pub fn empty() -> Self {
        StorageRoots { roots: Vec::new() }
    }

    /// The canonical roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Resolve `path` and check that it lies under one of the roots.
    ///
    /// The longest existing ancestor is canonicalized (so symlinks in it are followed) and
    /// the components that do not exist yet are appended; those may not be `.` or `..`.
    /// An existing final component that is a symlink is followed, and where it leads must
    /// be inside too. A dangling symlink is followed by hand, because creating a file
    /// through it would create its target. Returns the resolved path, which is the one to
    /// open.
    pub fn confine(&self, path: &Path) -> Result<PathBuf, DiskError> {
        if !path.is_absolute() {
            return Err(DiskError::NotAbsolute {
                path: path.to_path_buf(),
            });
        }
        let resolved = resolve(path, 0)?;
        if self.roots.iter().any(|root| resolved.starts_with(root)) {
            Ok(resolved)
        } else {
            Err(DiskError::OutsideStorageRoots {
                path: path.to_path_buf(),
                resolved,
                roots: self.roots.clone(),
            })
        }
    }

    /// Whether `path` confines successfully.
    pub fn contains(&self, path: &Path) -> bool {
        self.confine(path).is_ok()
    }

    /// Where `path` lies inside the roots: the path relative to the root that holds it.
    ///
    /// Across hosts an image is named by this relative path: each host may mount its
    /// storage somewhere else, and [`StorageRoots::candidates`] maps the name back.
    pub fn relative(&self, path: &Path) -> Result<PathBuf, DiskError> {
        let resolved = self.confine(path)?;
        self.roots
            .iter()
            .filter(|root| resolved.starts_with(root))
            .max_by_key(|root| root.as_os_str().len())
            .and_then(|root| resolved.strip_prefix(root).ok())
            .map(Path::to_path_buf)
            .ok_or_else(|| DiskError::OutsideStorageRoots {
                path: path.to_path_buf(),
                resolved: resolved.clone(),
                roots: self.roots.clone(),
            })
    }

    /// The local paths a peer's relative image name may denote, one per root in order,
    /// each confined. A name that is absolute or climbs out (`..`) is refused.
    pub fn candidates(&self, rel: &Path) -> Result<Vec<PathBuf>, DiskError> {
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(DiskError::InvalidPath {
                path: rel.to_path_buf(),
                reason: "an image name must be a relative path without `.` or `..`",
            });
        }
        let mut out = Vec::new();
        for root in &self.roots {
            let p = self.confine(&root.join(rel))?;
            if p.starts_with(root) {
                out.push(p);
            }
        }
        if out.is_empty() {
            return Err(DiskError::OutsideStorageRoots {
                path: rel.to_path_buf(),
                resolved: rel.to_path_buf(),
                roots: self.roots.clone(),
            });
        }
        Ok(out)
    }
}

/// Resolve an absolute path whose tail may not exist yet.
fn resolve(path: &Path, hops: u32) -> Result<PathBuf, DiskError> {
    if hops > MAX_SYMLINK_HOPS {
        return Err(DiskError::InvalidPath {
            path: path.to_path_buf(),
            reason: "too many levels of symbolic links",
        });
    }
    // `Path::components` silently drops interior `.`; look at the raw text for those.
    reject_cur_dir(path)?;
    let comps: Vec<Component<'_>> = path.components().collect();
    // Longest prefix first, starting with the whole path. comps[0] is the root, which
    // always exists, so this finds one.
    for split in (1..=comps.len()).rev() {
        let prefix: PathBuf = comps[..split].iter().collect();
        let rest = &comps[split..];
        match fs::canonicalize(&prefix) {
            Ok(base) => {
                let mut out = base;
                for c in rest {
                    match c {
                        Component::Normal(name) => out.push(name),
                        _ => {
                            return Err(DiskError::InvalidPath {
                                path: path.to_path_buf(),
                                reason: "`.` or `..` after the part of the path that exists",
                            })
                        }
                    }
                }
                return Ok(out);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The prefix may be a dangling symlink: it exists, its target does not.
                if let Ok(meta) = fs::symlink_metadata(&prefix) {
                    if meta.file_type().is_symlink() {
                        let target = fs::read_link(&prefix)
                            .map_err(|e| DiskError::io("read symlink", &prefix, e))?;
                        let mut next = match prefix.parent() {
                            Some(parent) => parent.join(target),
                            None => target,
                        };
                        for c in rest {
                            next.push(c.as_os_str());
                        }
                        return resolve(&next, hops + 1);
                    }
                }
            }
            Err(e) => return Err(DiskError::io("resolve", &prefix, e)),
        }
    }
    // Unreachable in practice: "/" always canonicalizes.
    Err(DiskError::InvalidPath {
        path: path.to_path_buf(),
        reason: "no part of the path exists",
    })
}

fn reject_cur_dir(path: &Path) -> Result<(), DiskError> {
    use std::os::unix::ffi::OsStrExt;
    let raw: OsString = path.as_os_str().to_owned();
    if raw.as_bytes().split(|b| *b == b'/').any(|c| c == b".") {
        return Err(DiskError::InvalidPath {
            path: path.to_path_buf(),
            reason: "path contains a `.` component",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Fixture {
        _tmp: tempfile::TempDir,
        base: PathBuf,
        root: PathBuf,
        roots: StorageRoots,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        // Canonical base so expected values compare equal even if /tmp is a symlink.
        let base = fs::canonicalize(tmp.path()).unwrap();
        let root = base.join("root");
        fs::create_dir_all(root.join("vm1")).unwrap();
        fs::create_dir_all(base.join("outside")).unwrap();
        fs::write(root.join("vm1/disk.qcow2"), b"x").unwrap();
        fs::write(base.join("outside/secret"), b"s").unwrap();
        let roots = StorageRoots::new([&root]).unwrap();
        Fixture {
            _tmp: tmp,
            base,
            root,
            roots,
        }
    }

    #[test]
    fn inside_is_accepted() {
        let f = fixture();
        let p = f.root.join("vm1/disk.qcow2");
        assert_eq!(f.roots.confine(&p).unwrap(), p);
        assert_eq!(f.roots.confine(&f.root).unwrap(), f.root);
    }

    #[test]
    fn relative_is_refused() {
        let f = fixture();
        assert!(matches!(
            f.roots.confine(Path::new("vm1/disk.qcow2")),
            Err(DiskError::NotAbsolute { .. })
        ));
        assert!(matches!(
            StorageRoots::new(["relative/root"]),
            Err(DiskError::NotAbsolute { .. })
        ));
    }

    #[test]
    fn dotdot_escape_is_refused() {
        let f = fixture();
        // Existing target: canonicalize resolves `..`, and the result is outside.
        let p = f.root.join("vm1/../../outside/secret");
        let err = f.roots.confine(&p).unwrap_err();
        assert!(
            matches!(err, DiskError::OutsideStorageRoots { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("outside the storage roots"), "{msg}");
        assert!(msg.contains(&f.root.display().to_string()), "{msg}");
        // Non-existing target: `..` in the part that does not exist is refused outright.
        let p = f.root.join("vm1/new/../../../outside/new");
        assert!(matches!(
            f.roots.confine(&p),
            Err(DiskError::InvalidPath { .. })
        ));
        // `..` inside the existing part that stays inside is fine.
        let p = f.root.join("vm1/../vm1/disk.qcow2");
        assert_eq!(f.roots.confine(&p).unwrap(), f.root.join("vm1/disk.qcow2"));
    }

    #[test]
    fn dot_component_is_refused() {
        let f = fixture();
        let p = PathBuf::from(format!("{}/vm1/./new.raw", f.root.display()));
        assert!(matches!(
            f.roots.confine(&p),
            Err(DiskError::InvalidPath { .. })
        ));
    }

    #[test]
    fn symlink_pointing_outside_is_refused() {
        let f = fixture();
        let link = f.root.join("vm1/evil.qcow2");
        symlink(f.base.join("outside/secret"), &link).unwrap();
        assert!(matches!(
            f.roots.confine(&link),
            Err(DiskError::OutsideStorageRoots { .. })
        ));
        // A dangling link whose target would be created outside.
        let dangling = f.root.join("vm1/dangling.raw");
        symlink(f.base.join("outside/not-yet"), &dangling).unwrap();
        assert!(matches!(
            f.roots.confine(&dangling),
            Err(DiskError::OutsideStorageRoots { .. })
        ));
        // A directory symlink leading out, with a new file under it.
        let dirlink = f.root.join("escape");
        symlink(f.base.join("outside"), &dirlink).unwrap();
        assert!(matches!(
            f.roots.confine(&dirlink.join("new.raw")),
            Err(DiskError::OutsideStorageRoots { .. })
        ));
    }

    #[test]
    fn symlinked_dir_inside_is_accepted() {
        let f = fixture();
        let link = f.root.join("current");
        symlink("vm1", &link).unwrap();
        assert_eq!(
            f.roots.confine(&link.join("disk.qcow2")).unwrap(),
            f.root.join("vm1/disk.qcow2")
        );
        assert_eq!(
            f.roots.confine(&link.join("new.raw")).unwrap(),
            f.root.join("vm1/new.raw")
        );
        // A dangling link that stays inside resolves to its (future) target.
        let dangling = f.root.join("vm1/next.raw");
        symlink("future.raw", &dangling).unwrap();
        assert_eq!(
            f.roots.confine(&dangling).unwrap(),
            f.root.join("vm1/future.raw")
        );
    }

    #[test]
    fn symlinked_root_is_canonicalized() {
        let f = fixture();
        let alias = f.base.join("alias");
        symlink(&f.root, &alias).unwrap();
        let roots = StorageRoots::new([&alias]).unwrap();
        assert_eq!(roots.roots(), std::slice::from_ref(&f.root));
        assert_eq!(
            roots.confine(&alias.join("vm1/disk.qcow2")).unwrap(),
            f.root.join("vm1/disk.qcow2")
        );
    }

    #[test]
    fn non_existing_file_under_root_is_accepted() {
        let f = fixture();
        let p = f.root.join("vm2/sub/disk.raw");
        assert_eq!(f.roots.confine(&p).unwrap(), p);
        assert!(f.roots.contains(&p));
        assert!(!f.roots.contains(&f.base.join("outside/new.raw")));
    }

    #[test]
    fn symlink_loop_is_an_error() {
        let f = fixture();
        let a = f.root.join("a");
        let b = f.root.join("b");
        symlink(&b, &a).unwrap();
        symlink(&a, &b).unwrap();
        assert!(f.roots.confine(&a).is_err());
    }

    #[test]
    fn relative_names_map_between_roots() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(a.path().join("vm")).unwrap();
        let ra = StorageRoots::new([a.path()]).unwrap();
        let rb = StorageRoots::new([b.path()]).unwrap();
        let rel = ra.relative(&a.path().join("vm/disk0.qcow2")).unwrap();
        assert_eq!(rel, Path::new("vm/disk0.qcow2"));
        let local = rb.candidates(&rel).unwrap();
        assert_eq!(
            local,
            vec![std::fs::canonicalize(b.path())
                .unwrap()
                .join("vm/disk0.qcow2")]
        );
        assert!(rb.candidates(Path::new("../etc/passwd")).is_err());
        assert!(rb.candidates(Path::new("/etc/passwd")).is_err());
        assert!(ra.relative(Path::new("/etc/passwd")).is_err());
        // A symlink inside B's root that leads out is refused, not followed.
        std::os::unix::fs::symlink("/etc", b.path().join("out")).unwrap();
        assert!(rb.candidates(Path::new("out/passwd")).is_err());
    }
}
