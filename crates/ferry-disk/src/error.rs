//! The one error type of this crate.

use std::io;
use std::path::PathBuf;

use crate::hash::Blake3Digest;
use crate::space::human_bytes;

/// Everything that can go wrong with a disk image, each naming the path involved.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An OS call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing ("open", "read", "fsync", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A path that has to be absolute is not.
    #[error("{path} is not an absolute path")]
    NotAbsolute {
        /// The relative path.
        path: PathBuf,
    },
    /// A path that cannot be used as it is written.
    #[error("{path}: {reason}")]
    InvalidPath {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A path that resolves to somewhere outside every configured storage root.
    #[error("{path} resolves to {resolved}, outside the storage roots {}", fmt_roots(.roots))]
    OutsideStorageRoots {
        /// The path as asked for.
        path: PathBuf,
        /// Where it leads once symlinks are resolved.
        resolved: PathBuf,
        /// The canonical storage roots.
        roots: Vec<PathBuf>,
    },
    /// `qemu-img` ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    QemuImg {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr, trimmed.
        stderr: String,
    },
    /// `qemu-img` printed something that is not the JSON we expect.
    #[error("`{command}` printed unexpected output: {source}")]
    QemuImgOutput {
        /// The command line.
        command: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// An image in a format ferry does not migrate.
    #[error("{path}: image format {format:?} is not supported (only qcow2 and raw)")]
    UnsupportedFormat {
        /// The image.
        path: PathBuf,
        /// The format qemu-img reported.
        format: String,
    },
    /// An image ferry cannot migrate as a plain file for another reason.
    #[error("{path}: {reason}")]
    UnsupportedImage {
        /// The image.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The backing file an image names does not exist.
    #[error("{image} names backing file {backing}, which does not exist")]
    MissingBacking {
        /// The image naming the backing file.
        image: PathBuf,
        /// The backing file, resolved the way QEMU resolves it.
        backing: PathBuf,
    },
    /// Not enough free space in a directory.
    #[error(
        "not enough free space in {dir} for {what}: need {}, {} available",
        human_bytes(*.needed),
        human_bytes(*.available)
    )]
    NoSpace {
        /// The directory.
        dir: PathBuf,
        /// What the space was for.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes available to unprivileged users.
        available: u64,
    },
    /// A received image whose content is not what the source sent.
    #[error("{path}: BLAKE3 of the received image is {actual}, the source's is {expected}")]
    DigestMismatch {
        /// The image's final path.
        path: PathBuf,
        /// The source's digest.
        expected: Blake3Digest,
        /// The digest of what arrived.
        actual: Blake3Digest,
    },
    /// A file ferry will not overwrite.
    #[error("{path} already exists")]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Another receiver holds the partial image.
    #[error("{path} is being received by another transfer")]
    Busy {
        /// The part file.
        path: PathBuf,
    },
    /// A chunk or offset beyond the end of the image.
    #[error("{path}: {len} bytes at offset {offset} go beyond the image's {limit} bytes")]
    OutOfRange {
        /// The image.
        path: PathBuf,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The image's length.
        limit: u64,
    },
    /// A chunk or checkpoint at an offset already written or committed.
    #[error("{path}: offset {offset} arrives out of order, expected {next} or later")]
    OutOfOrder {
        /// The image.
        path: PathBuf,
        /// Offset asked for.
        offset: u64,
        /// Lowest acceptable offset.
        next: u64,
    },
    /// A chunk size of zero.
    #[error("chunk size must be at least 1 byte")]
    InvalidChunkSize,
}

fn fmt_roots(roots: &[PathBuf]) -> String {
    if roots.is_empty() {
        return "(none configured)".to_owned();
    }
    let names: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    format!("[{}]", names.join(", "))
}

impl DiskError {
    /// Wrap an `io::Error` with what we were doing and on which path.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        DiskError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
