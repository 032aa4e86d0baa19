//! The error type of this crate.

use std::path::PathBuf;
use std::time::Duration;

use ferry_qmp::QmpError;

use crate::SpecError;

/// Failures building, starting, probing or supervising QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The VM spec or launch settings are invalid.
    #[error("invalid VM configuration: {0}")]
    Spec(#[from] SpecError),

    /// A filesystem or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "creating run dir /run/ferry/vm1".
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// QEMU exited before its QMP socket answered (usually a bad argument
    /// or a missing file); `stderr` is the tail of what it printed.
    #[error("QEMU exited during startup ({status}): {stderr}")]
    EarlyExit {
        /// The exit status as text.
        status: String,
        /// The last lines QEMU wrote to stderr.
        stderr: String,
    },

    /// QEMU kept running but its QMP socket could not be used.
    #[error("QEMU (pid {pid}) QMP socket {}: {source}; QEMU stderr: {stderr}", path.display())]
    QmpConnect {
        /// The QEMU process id.
        pid: u32,
        /// The QMP socket path.
        path: PathBuf,
        /// Why connecting failed.
        #[source]
        source: QmpError,
        /// The last lines QEMU wrote to stderr (empty for adopted processes).
        stderr: String,
    },

    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),

    /// A run dir already has a live QEMU.
    #[error("run dir {} is in use by running QEMU pid {pid}", run_dir.display())]
    AlreadyRunning {
        /// The run dir.
        run_dir: PathBuf,
        /// The live QEMU's pid.
        pid: u32,
    },

    /// Adoption failed: no such live process.
    #[error("process {pid} is not running")]
    NotRunning {
        /// The process id.
        pid: u32,
    },

    /// Adoption failed: the process is not the QEMU of this run dir (pid
    /// reused, or a different VM).
    #[error("process {pid} is not a QEMU using run dir {}", run_dir.display())]
    NotOurQemu {
        /// The process id.
        pid: u32,
        /// The run dir it should have used.
        run_dir: PathBuf,
    },

    /// The process did not exit in time, even after SIGKILL.
    #[error("QEMU pid {pid} still running after {waited:?}")]
    StillRunning {
        /// The process id.
        pid: u32,
        /// How long we waited.
        waited: Duration,
    },

    /// A probe command (`--version`, `-machine help`) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    ProbeFailed {
        /// The command line run.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },

    /// A probe command's output could not be understood.
    #[error("cannot parse output of `{command}`: {output:?}")]
    ProbeParse {
        /// The command line run.
        command: String,
        /// The (start of the) output.
        output: String,
    },
}

impl QemuError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        QemuError::Io {
            context: context.into(),
            source,
        }
    }
}
