//! A tmpfs mounted over a directory for the life of a test: a RAM directory or storage
//! root with a size of the test's choosing. Needs root, as the tests that use it (and CI)
//! run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a directory; unmounted (lazily) when dropped, also when the test
/// fails.
#[derive(Debug)]
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size_mib` MiB on `dir` (made if missing). Panics when it
    /// cannot: a test without its mount tests nothing.
    pub fn mount(dir: &Path, size_mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("tmpfs directory");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m"),
                "ferry-test",
            ])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount a tmpfs on {} (needs root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Bytes of memory (or disk) a file holds: its allocated blocks — on tmpfs, the guest RAM
/// a RAM file has taken. Panics when the file does not exist: a test asks of a file it
/// expects.
pub fn allocated_bytes(path: impl AsRef<Path>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let path = path.as_ref();
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .blocks()
        * 512
}
