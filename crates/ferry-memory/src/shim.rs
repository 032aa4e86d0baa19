//! The LD_PRELOAD shim that creates a userfaultfd inside QEMU (source: shim/uffd_shim.c).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The compiled shim (`libferry_uffd_shim.so`), built by build.rs for the target.
pub const UFFD_SHIM_SO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libferry_uffd_shim.so"));
/// File name [`install_shim`] writes. The shim recognises itself in LD_PRELOAD by this name.
pub const SHIM_FILE_NAME: &str = "libferry_uffd_shim.so";
/// Environment variable telling the shim which fd number to park the userfaultfd at.
pub const SHIM_FD_ENV: &str = "FERRY_UFFD_FD";
/// The fd number used when [`SHIM_FD_ENV`] is unset.
pub const DEFAULT_SHIM_FD: i32 = 1023;

/// Write the shim to `dir/libferry_uffd_shim.so` (mode 0755) and return its path.
///
/// The file is written under a temporary name and renamed into place, so a QEMU being started
/// concurrently never maps a half-written library.
pub fn install_shim(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join(SHIM_FILE_NAME);
    let tmp = dir.join(format!(".{SHIM_FILE_NAME}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o755)
            .open(&tmp)?;
        f.write_all(UFFD_SHIM_SO)?;
        // mode() is filtered by the umask; set it exactly.
        f.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| path)
}
