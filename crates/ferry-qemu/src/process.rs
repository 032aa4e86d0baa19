//! A supervised QEMU process.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, ErrorKind, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ferry_qmp::{QmpClient, QmpError};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::{qemu_escape, QemuError, QemuLaunch};

/// How long [`QemuProcess::spawn`] waits for QMP to answer.
pub const DEFAULT_QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`QemuProcess::adopt`] waits for QMP to answer.
const ADOPT_QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the process to vanish after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long a QEMU whose QMP failed gets to finish exiting on its own, so we
/// report its exit and stderr rather than a socket error.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How much of the end of QEMU's stderr goes into error messages.
const STDERR_TAIL_BYTES: u64 = 4096;
/// Poll interval for adopted processes when pidfds are unavailable.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How a QEMU process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuExit {
    /// The exit status; `None` for an adopted process (not our child, so the
    /// status cannot be collected).
    pub status: Option<ExitStatus>,
}

impl QemuExit {
    /// True if the process exited with status 0.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

impl fmt::Display for QemuExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "{s}"),
            None => f.write_str("exited, status unknown"),
        }
    }
}

/// A running QEMU and its QMP connection.
///
/// Dropping the handle leaves QEMU running on purpose: a VM must survive
/// its agent restarting (re-attach with [`QemuProcess::adopt`]). A spawned
/// child is still reaped by a background task when it exits, as long as the
/// tokio runtime lives. Use [`QemuProcess::shutdown`] or
/// [`QemuProcess::kill`] to stop it.
#[derive(Debug)]
pub struct QemuProcess {
    pid: u32,
    run_dir: PathBuf,
    qmp: QmpClient,
    /// Pins the process identity for signalling (immune to pid reuse).
    /// `None` only on kernels without pidfd support (< 5.3).
    pidfd: Option<Arc<OwnedFd>>,
    exit_rx: watch::Receiver<Option<QemuExit>>,
    adopted: bool,
}

impl QemuProcess {
    /// Starts QEMU for `launch` and connects to its QMP socket, waiting up
    /// to [`DEFAULT_QMP_TIMEOUT`].
    ///
    /// QEMU's stdout and stderr are appended to `RUN/qemu.stderr`. If QEMU
    /// exits before QMP answers, the error carries the tail of its stderr.
    pub async fn spawn(launch: &QemuLaunch, qemu_binary: &Path) -> Result<QemuProcess, QemuError> {
        Self::spawn_with_timeout(launch, qemu_binary, DEFAULT_QMP_TIMEOUT).await
    }

    /// [`QemuProcess::spawn`] with an explicit QMP connect timeout.
    pub async fn spawn_with_timeout(
        launch: &QemuLaunch,
        qemu_binary: &Path,
        qmp_timeout: Duration,
    ) -> Result<QemuProcess, QemuError> {
        launch.validate()?;
        let run_dir = launch.run_dir.clone();
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| QemuError::io(format!("creating run dir {}", run_dir.display()), e))?;

        // Never clobber the sockets of a QEMU that is still alive.
        if let Some(pid) = read_pidfile(&launch.pidfile()) {
            if check_ours(pid, &run_dir).is_ok() {
                return Err(QemuError::AlreadyRunning { run_dir, pid });
            }
        }
        for stale in [
            launch.qmp_path(),
            launch.observer_qmp_path(),
            launch.console_path(),
            launch.pidfile(),
        ] {
            match std::fs::remove_file(&stale) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(QemuError::io(
                        format!("removing stale {}", stale.display()),
                        e,
                    ))
                }
            }
        }

        let stderr_path = launch.stderr_log();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .map_err(|e| QemuError::io(format!("opening {}", stderr_path.display()), e))?;
        // Appending keeps earlier runs' output; error tails start here.
        let log_start = log
            .metadata()
            .map_err(|e| QemuError::io(format!("reading {}", stderr_path.display()), e))?
            .len();
        let log_out = log
            .try_clone()
            .map_err(|e| QemuError::io(format!("duplicating {}", stderr_path.display()), e))?;

        let mut cmd = tokio::process::Command::new(qemu_binary);
        cmd.args(launch.argv())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_out))
            .stderr(Stdio::from(log))
            // Own process group: a Ctrl-C or group signal aimed at the agent
            // must not take its VMs down with it.
            .process_group(0);
        // Deliberately no kill_on_drop: the VM outlives the agent.
        if let Some(preload) = &launch.preload {
            cmd.env("LD_PRELOAD", preload);
        }
        for (k, v) in &launch.extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| QemuError::io(format!("starting {}", qemu_binary.display()), e))?;
        let pid = child.id().ok_or_else(|| {
            QemuError::io(
                "reading QEMU's pid",
                io::Error::other("child already reaped"),
            )
        })?;
        // The child cannot have been reaped yet (nobody waited), so this pid
        // is still ours.
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => Some(Arc::new(fd)),
            Err(e) => {
                tracing::warn!(pid, error = %e, "pidfd_open failed; signalling by pid");
                None
            }
        };
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            tracing::info!(pid, ?status, "QEMU exited");
            exit_tx.send_replace(Some(QemuExit { status }));
        });
        tracing::info!(pid, vm = %launch.spec.name, run_dir = %run_dir.display(), "QEMU started");

        let qmp_path = launch.qmp_path();
        let mut exited = exit_rx.clone();
        let connected = tokio::select! {
            r = QmpClient::connect_retry(&qmp_path, qmp_timeout) => r.map_err(Some),
            _ = exited.wait_for(Option::is_some) => Err(None),
        };
        let qmp = match connected {
            Ok(qmp) => qmp,
            Err(err) => {
                let stderr_path = &stderr_path;
                return Err(startup_failure(
                    pid,
                    pidfd,
                    exit_rx,
                    qmp_path,
                    err,
                    stderr_path,
                    log_start,
                )
                .await);
            }
        };
        Ok(QemuProcess {
            pid,
            run_dir,
            qmp,
            pidfd,
            exit_rx,
            adopted: false,
        })
    }

    /// Re-attaches to a QEMU started earlier (e.g. by a previous agent run)
    /// with the given `run_dir`.
    ///
    /// Checks that `/proc/PID` exists and that its command line uses
    /// `RUN/qmp.sock` (guarding against pid reuse), then connects QMP.
    /// QEMU serves one QMP client per socket: the previous agent's
    /// connection must be gone, or this times out.
    pub async fn adopt(pid: u32, run_dir: &Path) -> Result<QemuProcess, QemuError> {
        // Without a pidfd (an old kernel) it is signalled by pid.
        let pidfd = pin_ours(pid, run_dir)?.ok().map(Arc::new);

        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(watch_foreign(
            pid,
            run_dir.to_owned(),
            pidfd.clone(),
            exit_tx,
        ));

        let qmp_path = run_dir.join("qmp.sock");
        let qmp = QmpClient::connect_retry(&qmp_path, ADOPT_QMP_TIMEOUT)
            .await
            .map_err(|source| QemuError::QmpConnect {
                pid,
                path: qmp_path.clone(),
                source,
                stderr: read_tail(&run_dir.join("qemu.stderr"), 0),
            })?;
        tracing::info!(pid, run_dir = %run_dir.display(), "QEMU adopted");
        Ok(QemuProcess {
            pid,
            run_dir: run_dir.to_owned(),
            qmp,
            pidfd,
            exit_rx,
            adopted: true,
        })
    }

    /// [`QemuProcess::adopt`] using the pid in `RUN/qemu.pid`.
    pub async fn adopt_run_dir(run_dir: &Path) -> Result<QemuProcess, QemuError> {
        let pidfile = run_dir.join("qemu.pid");
        let text = std::fs::read_to_string(&pidfile)
            .map_err(|e| QemuError::io(format!("reading {}", pidfile.display()), e))?;
        let pid = text.trim().parse().map_err(|_| {
            QemuError::io(
                format!("reading {}", pidfile.display()),
                io::Error::new(
                    ErrorKind::InvalidData,
                    format!("not a pid: {:?}", text.trim()),
                ),
            )
        })?;
        Self::adopt(pid, run_dir).await
    }

    /// SIGKILLs the QEMU that `RUN/qemu.pid` names, without QMP (one that is starting or
    /// hung may not answer it), and waits for it to be gone. For a QEMU no record names:
    /// its agent died between starting it and recording it. Returns its pid, or `None`
    /// when no such QEMU runs (no pidfile, or the pid is not the QEMU of `run_dir`).
    pub async fn kill_stray(run_dir: &Path) -> Result<Option<u32>, QemuError> {
        let Some(pid) = read_pidfile(&run_dir.join("qemu.pid")) else {
            return Ok(None);
        };
        // Killing needs the pidfd: a pid alone could name another process by now.
        let fd = match pin_ours(pid, run_dir) {
            Err(_) => return Ok(None),
            Ok(Ok(fd)) => fd,
            Ok(Err(e)) => return Err(QemuError::io(format!("pidfd_open({pid})"), e)),
        };
        match pidfd_send_sigkill(&fd) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(Some(pid)),
            Err(e) => return Err(QemuError::io(format!("killing QEMU pid {pid}"), e)),
        }
        tracing::info!(pid, run_dir = %run_dir.display(), "SIGKILL sent to a stray QEMU");
        let deadline = tokio::time::Instant::now() + KILL_WAIT;
        while check_ours(pid, run_dir).is_ok() {
            if tokio::time::Instant::now() >= deadline {
                return Err(QemuError::StillRunning {
                    pid,
                    waited: KILL_WAIT,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Ok(Some(pid))
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The QMP connection.
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// The run dir (sockets, pidfile, logs).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// True if this handle came from [`QemuProcess::adopt`].
    pub fn is_adopted(&self) -> bool {
        self.adopted
    }

    /// The exit, if QEMU has already exited; never blocks.
    pub fn try_exited(&self) -> Option<QemuExit> {
        *self.exit_rx.borrow()
    }

    /// Waits until QEMU exits.
    pub async fn wait_exit(&self) -> QemuExit {
        let mut rx = self.exit_rx.clone();
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(v) => *v,
            // The watcher task is gone (runtime shutting down).
            Err(_) => None,
        };
        exit.unwrap_or(QemuExit { status: None })
    }

    async fn wait_exit_timeout(&self, timeout: Duration) -> Option<QemuExit> {
        tokio::time::timeout(timeout, self.wait_exit()).await.ok()
    }

    /// Sends SIGKILL and waits for the process to be gone (reaped, for a
    /// spawned child).
    pub async fn kill(&self) -> Result<QemuExit, QemuError> {
        if let Some(exit) = self.try_exited() {
            return Ok(exit);
        }
        let sent = match &self.pidfd {
            Some(fd) => pidfd_send_sigkill(fd),
            None => {
                // Without a pidfd, re-check identity first: the pid may
                // already belong to someone else.
                if self.adopted && check_ours(self.pid, &self.run_dir).is_err() {
                    Ok(())
                } else {
                    kill_pid(self.pid)
                }
            }
        };
        match sent {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(QemuError::io(format!("killing QEMU pid {}", self.pid), e)),
        }
        tracing::info!(pid = self.pid, "SIGKILL sent to QEMU");
        self.wait_exit_timeout(KILL_WAIT)
            .await
            .ok_or(QemuError::StillRunning {
                pid: self.pid,
                waited: KILL_WAIT,
            })
    }

    /// Asks QEMU to exit (QMP `quit`), and SIGKILLs it if it is still alive
    /// after `timeout`.
    pub async fn shutdown(&self, timeout: Duration) -> Result<QemuExit, QemuError> {
        if let Some(exit) = self.try_exited() {
            return Ok(exit);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        match self.qmp.execute_timeout("quit", None, timeout).await {
            Ok(_) | Err(QmpError::Disconnected) => {}
            Err(e) => tracing::warn!(pid = self.pid, error = %e, "QMP quit failed"),
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Some(exit) = self.wait_exit_timeout(left).await {
            return Ok(exit);
        }
        tracing::warn!(
            pid = self.pid,
            ?timeout,
            "QEMU did not quit in time; killing it"
        );
        self.kill().await
    }
}

/// Builds the error for a spawn whose QMP never became usable, making sure
/// the QEMU is gone afterwards.
async fn startup_failure(
    pid: u32,
    pidfd: Option<Arc<OwnedFd>>,
    mut exit_rx: watch::Receiver<Option<QemuExit>>,
    qmp_path: PathBuf,
    err: Option<QmpError>,
    stderr_path: &Path,
    log_start: u64,
) -> QemuError {
    let exited = tokio::time::timeout(EXIT_GRACE, exit_rx.wait_for(Option::is_some))
        .await
        .ok()
        .and_then(|r| r.ok().and_then(|v| *v));
    if let Some(exit) = exited {
        return QemuError::EarlyExit {
            status: exit.to_string(),
            stderr: read_tail(stderr_path, log_start),
        };
    }
    // Still running but unusable: do not leave it behind.
    let sent = match &pidfd {
        Some(fd) => pidfd_send_sigkill(fd),
        None => kill_pid(pid),
    };
    if let Err(e) = sent {
        tracing::warn!(pid, error = %e, "could not kill QEMU after failed startup");
    }
    let _ = tokio::time::timeout(KILL_WAIT, exit_rx.wait_for(Option::is_some)).await;
    QemuError::QmpConnect {
        pid,
        path: qmp_path,
        source: err.unwrap_or(QmpError::Disconnected),
        stderr: read_tail(stderr_path, log_start),
    }
}

/// Publishes the exit of a process that is not our child.
async fn watch_foreign(
    pid: u32,
    run_dir: PathBuf,
    pidfd: Option<Arc<OwnedFd>>,
    tx: watch::Sender<Option<QemuExit>>,
) {
    if let Some(fd) = pidfd {
        // A pidfd becomes readable when the process exits.
        // SAFETY: the Arc<OwnedFd> moved into the AsyncFd keeps this pidfd
        // open, unchanged, for as long as the AsyncFd lives.
        let registered =
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
        match registered {
            Ok(afd) => {
                if afd.readable().await.is_ok() {
                    tracing::info!(pid, "adopted QEMU exited");
                    tx.send_replace(Some(QemuExit { status: None }));
                    return;
                }
            }
            Err(e) => tracing::warn!(pid, error = %e, "cannot poll pidfd; polling /proc"),
        }
    }
    loop {
        if check_ours(pid, &run_dir).is_err() {
            tracing::info!(pid, "adopted QEMU exited");
            tx.send_replace(Some(QemuExit { status: None }));
            return;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Checks that `pid` is alive and is the QEMU serving `RUN/qmp.sock`.
fn check_ours(pid: u32, run_dir: &Path) -> Result<(), QemuError> {
    let cmdline = match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => c,
        Err(e)
            if matches!(e.kind(), ErrorKind::NotFound) || e.raw_os_error() == Some(libc::ESRCH) =>
        {
            return Err(QemuError::NotRunning { pid })
        }
        Err(e) => return Err(QemuError::io(format!("reading /proc/{pid}/cmdline"), e)),
    };
    // A zombie has an empty command line: it is not running any more.
    if cmdline.is_empty() {
        return Err(QemuError::NotRunning { pid });
    }
    // Match the QMP socket path rather than the bare run dir, so that
    // /run/vm1 does not match a QEMU of /run/vm10.
    let sock = run_dir.join("qmp.sock");
    let raw = sock.to_string_lossy().into_owned();
    let escaped = qemu_escape(&raw);
    let exact = format!("unix:{escaped}");
    let with_opts = format!("unix:{escaped},");
    let ours = cmdline.split(|b| *b == 0).any(|arg| {
        let arg = String::from_utf8_lossy(arg);
        arg == exact || arg.starts_with(&with_opts)
    });
    if ours {
        Ok(())
    } else {
        Err(QemuError::NotOurQemu {
            pid,
            run_dir: run_dir.to_owned(),
        })
    }
}

/// A pidfd for `pid` once it is checked to be the QEMU of `run_dir`, before and after
/// opening it: a pid reused in between fails the second check, and once both pass the pidfd
/// pins the process checked. `Err` when it is not (or no longer) that QEMU; `Ok(Err)` when
/// it is but `pidfd_open` failed (a kernel without it).
fn pin_ours(pid: u32, run_dir: &Path) -> Result<io::Result<OwnedFd>, QemuError> {
    check_ours(pid, run_dir)?;
    let fd = pidfd_open(pid);
    check_ours(pid, run_dir)?;
    Ok(fd)
}

fn read_pidfile(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The last few KiB QEMU wrote to its stderr file since `start`, for error
/// messages. Best effort: returns what it can.
fn read_tail(path: &Path, start: u64) -> String {
    let read = || -> io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        let from = start.max(len.saturating_sub(STDERR_TAIL_BYTES));
        f.seek(SeekFrom::Start(from))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let mut text = String::from_utf8_lossy(&buf).into_owned();
        if from > start {
            // Cut the partial first line.
            if let Some(i) = text.find('\n') {
                text.drain(..=i);
            }
        }
        Ok(text.trim().to_owned())
    };
    match read() {
        Ok(t) if t.is_empty() => "(no output)".to_owned(),
        Ok(t) => t,
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: r is a freshly created fd that nothing else owns (pidfds are
    // close-on-exec by default).
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

fn pidfd_send_sigkill(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: valid pidfd, a signal number, a null siginfo and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn kill_pid(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: kill(2) with a positive pid and a signal number.
    if unsafe { libc::kill(pid, libc::SIGKILL) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_of_stderr_starts_at_offset_and_whole_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("qemu.stderr");
        std::fs::write(&p, "old run\n").expect("write");
        let start = 8;
        let mut text = String::from("old run\n");
        for i in 0..2000 {
            text.push_str(&format!("line {i}\n"));
        }
        std::fs::write(&p, &text).expect("write");
        let tail = read_tail(&p, start);
        assert!(tail.ends_with("line 1999"), "{tail}");
        assert!(tail.starts_with("line "), "whole lines only: {tail:.20}");
        assert!(tail.len() <= STDERR_TAIL_BYTES as usize);

        std::fs::write(&p, "old run\nqemu: bad\n").expect("write");
        assert_eq!(read_tail(&p, start), "qemu: bad");
        assert_eq!(read_tail(&p, 18), "(no output)");
    }

    #[test]
    fn check_ours_rejects_missing_and_foreign() {
        // pid_max is at most 2^22, so this pid cannot exist.
        assert!(matches!(
            check_ours(u32::MAX / 2, Path::new("/run/x")),
            Err(QemuError::NotRunning { .. })
        ));
        // Our own test process is alive but is not a QEMU of /run/x.
        assert!(matches!(
            check_ours(std::process::id(), Path::new("/run/x")),
            Err(QemuError::NotOurQemu { .. })
        ));
    }
}
