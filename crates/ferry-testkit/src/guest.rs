//! The test guest: where its kernel and initramfs are, and the kernel command line that
//! configures its workload.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The test guest's boot files, built by `scripts/build-guest.sh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestArtifacts {
    /// `<repo>/build/guest/vmlinuz`.
    pub kernel: PathBuf,
    /// `<repo>/build/guest/initramfs.cpio.gz` (holds `/init` and `/workload`).
    pub initrd: PathBuf,
}

/// Whether `dir/Cargo.toml` is a workspace manifest (has a `[workspace]` table).
fn is_workspace_root(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml"))
        .map(|text| text.lines().any(|l| l.trim() == "[workspace]"))
        .unwrap_or(false)
}

/// The nearest ancestor of `start` (itself included) that is the workspace root.
pub fn find_workspace_root(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| is_workspace_root(d))
        .map(Path::to_path_buf)
}

/// The repository root: the workspace containing `CARGO_MANIFEST_DIR` (set by cargo when
/// running tests, at run time; else this crate's own directory at build time), or else the
/// workspace containing the current directory.
pub fn repo_root() -> Result<PathBuf> {
    let mut starts: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") {
        starts.push(PathBuf::from(dir));
    }
    starts.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    for start in &starts {
        if let Some(root) = find_workspace_root(start) {
            return Ok(root);
        }
    }
    bail!(
        "cannot find the ferry repository root (a directory whose Cargo.toml has [workspace]) above {}",
        starts.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" or ")
    )
}

/// The guest's boot files under `root/build/guest`, or an error telling to build them.
pub fn guest_artifacts_in(root: &Path) -> Result<GuestArtifacts> {
    let dir = root.join("build").join("guest");
    let a = GuestArtifacts {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.cpio.gz"),
    };
    for f in [&a.kernel, &a.initrd] {
        if !f.is_file() {
            bail!(
                "test guest file {} is missing: run scripts/build-guest.sh (from {})",
                f.display(),
                root.display()
            );
        }
    }
    Ok(a)
}

/// The test guest's boot files in this repository (`<repo>/build/guest/{vmlinuz,
/// initramfs.cpio.gz}`), or an error telling to run `scripts/build-guest.sh`.
pub fn guest_artifacts() -> Result<GuestArtifacts> {
    let root = repo_root().context("locating the test guest")?;
    guest_artifacts_in(&root)
}

/// The kernel command line for the test guest's workload: `mem_mib` MiB of memory dirtied
/// at `dirty_mibps` MiB/s, page contents `mix` (`realistic`, `zero`, `text`, `random`)
/// from `seed`.
pub fn workload_cmdline(mem_mib: u64, dirty_mibps: f64, mix: &str, seed: u64) -> String {
    format!(
        "console=ttyS0 panic=-1 quiet ferry.mem_mib={mem_mib} ferry.dirty_mibps={dirty_mibps} ferry.mix={mix} ferry.seed={seed}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline() {
        assert_eq!(
            workload_cmdline(128, 20.0, "realistic", 7),
            "console=ttyS0 panic=-1 quiet ferry.mem_mib=128 ferry.dirty_mibps=20 ferry.mix=realistic ferry.seed=7"
        );
        assert!(workload_cmdline(64, 2.5, "zero", 1).contains(" ferry.dirty_mibps=2.5 "));
    }

    #[test]
    fn finds_this_workspace() {
        let root = repo_root().expect("root");
        assert!(
            root.join("crates").join("ferry-testkit").is_dir(),
            "{}",
            root.display()
        );
        let from_src = find_workspace_root(&root.join("crates/ferry-testkit/src")).expect("found");
        assert_eq!(from_src, root);
    }

    #[test]
    fn missing_artifacts_say_how_to_build() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = guest_artifacts_in(dir.path())
            .expect_err("missing")
            .to_string();
        assert!(
            e.contains("vmlinuz") && e.contains("scripts/build-guest.sh"),
            "{e}"
        );
        std::fs::create_dir_all(dir.path().join("build/guest")).expect("mkdir");
        std::fs::write(dir.path().join("build/guest/vmlinuz"), b"k").expect("write");
        std::fs::write(dir.path().join("build/guest/initramfs.cpio.gz"), b"i").expect("write");
        let a = guest_artifacts_in(dir.path()).expect("present");
        assert!(a.initrd.ends_with("build/guest/initramfs.cpio.gz"));
    }
}
