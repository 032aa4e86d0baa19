//! The test guest's console protocol.
//!
//! The workload in the guest (`guest/workload.c`) talks line by line over the VM's serial
//! console, which QEMU exposes as a unix socket (`VmInfo.console_socket`) and also logs to
//! a file (`VmInfo.console_log`). Lines end with `\r\n`.
//!
//! * Unsolicited: `FERRY-READY pages=<n> mix=<mix> rate=<R>` once, then a heartbeat
//!   `FERRY-HB t=<s> writes=<w>` every second.
//! * Commands and replies: `check` → `FERRY-CHECK ok pages=<n> writes=<w>` or
//!   `FERRY-CHECK fail bad=<k> first=<i>`; `digest` → `FERRY-DIGEST <hex>`; `rate <R>` →
//!   `FERRY-RATE <R>`; `pause` → `FERRY-PAUSED`; `resume` → `FERRY-RESUMED`; `ping` →
//!   `FERRY-PONG writes=<w>`; anything else → `FERRY-ERR unknown command`.
//!
//! QEMU does not replay output to a client that connects late: wait for `FERRY-READY` in
//! the log with [`wait_for_log_line`], then talk over the socket with [`GuestConsole`].

use anyhow::{anyhow, bail, Context, Result};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::time::Instant;

/// Printed by the guest's `/init` when the workload exits: no reply will come after it.
pub const WORKLOAD_EXIT_PREFIX: &str = "FERRY-WORKLOAD-EXIT";
/// The guest's error reply prefix.
pub const ERR_PREFIX: &str = "FERRY-ERR";

/// How many recent lines a [`GuestConsole`] keeps for error messages.
const RECENT_LINES: usize = 12;

/// The reply prefix the workload answers a command with, or `None` for a command it does
/// not know (`rate 5` gives `FERRY-RATE`).
pub fn reply_prefix_for(command: &str) -> Option<&'static str> {
    match command.split_whitespace().next()? {
        "check" => Some("FERRY-CHECK"),
        "digest" => Some("FERRY-DIGEST"),
        "rate" => Some("FERRY-RATE"),
        "pause" => Some("FERRY-PAUSED"),
        "resume" => Some("FERRY-RESUMED"),
        "ping" => Some("FERRY-PONG"),
        _ => None,
    }
}

/// A connection to a guest's serial console socket.
///
/// Reads are buffered: lines that arrive while waiting for one prefix are skipped (the
/// heartbeats, echoes, kernel messages), and bytes after the matching line stay buffered
/// for the next call.
#[derive(Debug)]
pub struct GuestConsole {
    stream: UnixStream,
    path: PathBuf,
    buf: Vec<u8>,
    eof: bool,
    recent: VecDeque<String>,
}

impl GuestConsole {
    /// Connects to the console socket at `path`, retrying until `timeout` (QEMU creates
    /// the socket shortly after it starts).
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<GuestConsole> {
        let path = path.as_ref().to_path_buf();
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(&path).await {
                Ok(stream) => {
                    return Ok(GuestConsole {
                        stream,
                        path,
                        buf: Vec::new(),
                        eof: false,
                        recent: VecDeque::new(),
                    })
                }
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "cannot connect to guest console {} within {timeout:?}: {e}",
                        path.display()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The socket path this console is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last lines received (at most a dozen), oldest first: context for error messages.
    pub fn recent_lines(&self) -> Vec<String> {
        self.recent.iter().cloned().collect()
    }

    /// Sends one line (a command); the line ending is added.
    pub async fn send(&mut self, line: &str) -> Result<()> {
        let mut data = Vec::with_capacity(line.len() + 1);
        data.extend_from_slice(line.as_bytes());
        data.push(b'\n');
        self.stream
            .write_all(&data)
            .await
            .with_context(|| format!("writing to guest console {}", self.path.display()))
    }

    /// Waits for the next line starting with `prefix` and returns it (without the line
    /// ending). Other lines are skipped. Fails on timeout, when the console closes, and
    /// when the guest reports that its workload exited.
    pub async fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self
                .next_line(deadline)
                .await
                .map_err(|e| self.with_context(e, prefix, timeout))?;
            if line.starts_with(prefix) {
                return Ok(line);
            }
            if line.starts_with(WORKLOAD_EXIT_PREFIX) && !prefix.starts_with(WORKLOAD_EXIT_PREFIX) {
                return Err(self.with_context(
                    anyhow!("guest workload exited: {line}"),
                    prefix,
                    timeout,
                ));
            }
        }
    }

    /// Sends `cmd` and waits for the reply line starting with `reply_prefix`.
    ///
    /// Lines already received before the command is sent are discarded first (they cannot
    /// be its reply). A `FERRY-ERR` line while waiting is returned as an error, unless
    /// `reply_prefix` asks for it.
    pub async fn command(
        &mut self,
        cmd: &str,
        reply_prefix: &str,
        timeout: Duration,
    ) -> Result<String> {
        self.discard_pending()?;
        self.send(cmd).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let line = self
                .next_line(deadline)
                .await
                .map_err(|e| self.with_context(e, reply_prefix, timeout))?;
            if line.starts_with(reply_prefix) {
                return Ok(line);
            }
            if line.starts_with(ERR_PREFIX) && !reply_prefix.starts_with(ERR_PREFIX) {
                bail!("guest answered {cmd:?} with {line:?}");
            }
            if line.starts_with(WORKLOAD_EXIT_PREFIX) {
                return Err(self.with_context(
                    anyhow!("guest workload exited: {line}"),
                    reply_prefix,
                    timeout,
                ));
            }
        }
    }

    fn with_context(&self, e: anyhow::Error, prefix: &str, timeout: Duration) -> anyhow::Error {
        let recent = if self.recent.is_empty() {
            "(no lines received)".to_string()
        } else {
            self.recent
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(" | ")
        };
        e.context(format!(
            "waiting up to {timeout:?} for {prefix:?} on guest console {}; last lines: {recent}",
            self.path.display()
        ))
    }

    /// Drops buffered data and whatever the socket has ready right now, without waiting.
    fn discard_pending(&mut self) -> Result<()> {
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.try_read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading the guest console"),
            }
        }
    }

    /// The next complete line, read until `deadline`.
    async fn next_line(&mut self, deadline: Instant) -> Result<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&raw)
                    .trim_end_matches(['\r', '\n'])
                    .trim_start_matches('\r')
                    .to_string();
                if self.recent.len() == RECENT_LINES {
                    self.recent.pop_front();
                }
                self.recent.push_back(line.clone());
                return Ok(line);
            }
            if self.eof {
                bail!("guest console closed");
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, async {
                loop {
                    self.stream.readable().await?;
                    match self.stream.try_read(&mut chunk) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e),
                    }
                }
            })
            .await;
            match read {
                Err(_) => bail!("timed out"),
                Ok(Err(e)) => return Err(e).context("reading the guest console"),
                Ok(Ok(0)) => self.eof = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Polls the console log file at `log_path` until it holds a line starting with `prefix`
/// and returns that line. Fails after `timeout`; a log file that does not exist yet is
/// waited for.
pub async fn wait_for_log_line(
    log_path: impl AsRef<Path>,
    prefix: &str,
    timeout: Duration,
) -> Result<String> {
    let log_path = log_path.as_ref();
    let deadline = Instant::now() + timeout;
    loop {
        let text = match tokio::fs::read(log_path).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading console log {}", log_path.display()))
            }
        };
        // Only complete lines: a line still being written may be cut short.
        let complete = text.rfind('\n').map(|i| &text[..i]).unwrap_or("");
        if let Some(line) = complete
            .split('\n')
            .map(|l| l.trim_matches('\r'))
            .find(|l| l.starts_with(prefix))
        {
            return Ok(line.to_string());
        }
        if Instant::now() >= deadline {
            let tail: Vec<&str> = text
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            bail!(
                "no line starting with {prefix:?} in console log {} within {timeout:?}; log tail:\n{}",
                log_path.display(),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A parsed `FERRY-CHECK` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckResult {
    /// Every page holds what the workload last wrote to it.
    pub ok: bool,
    /// Pages in the workload's region (0 in a `fail` reply).
    pub pages: u64,
    /// Page writes since `FERRY-READY` (0 in a `fail` reply).
    pub writes: u64,
    /// Pages with wrong contents (0 when `ok`).
    pub bad: u64,
    /// Index of the first bad page (`None` when `ok`).
    pub first: Option<u64>,
    /// Disk blocks the workload wrote and verified (`ok` with a disk; else 0).
    pub disk_blocks: u64,
    /// Disk block writes since start (`ok` with a disk; else 0).
    pub disk_writes: u64,
    /// Disk blocks that did not read back as written (`fail` with a disk; else 0).
    pub disk_bad: u64,
}

fn field_u64_or0(line: &str, key: &str) -> Result<u64> {
    if fields(line).any(|(k, _)| k == key) {
        field_u64(line, key)
    } else {
        Ok(0)
    }
}

/// The `key=value` fields of a line after its first word.
fn fields(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split_whitespace().filter_map(|w| w.split_once('='))
}

fn field_u64(line: &str, key: &str) -> Result<u64> {
    let v = fields(line)
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .ok_or_else(|| anyhow!("no {key}= in {line:?}"))?;
    v.parse()
        .map_err(|_| anyhow!("{key}={v:?} is not a number in {line:?}"))
}

/// Parses `FERRY-CHECK ok pages=<n> writes=<w> [disk_blocks=<b> disk_writes=<dw>]` or
/// `FERRY-CHECK fail bad=<k> first=<i> [disk_bad=<d> disk_first=<j>]`.
pub fn parse_check(line: &str) -> Result<CheckResult> {
    let line = line.trim();
    let mut words = line.split_whitespace();
    if words.next() != Some("FERRY-CHECK") {
        bail!("not a FERRY-CHECK line: {line:?}");
    }
    match words.next() {
        Some("ok") => Ok(CheckResult {
            ok: true,
            pages: field_u64(line, "pages")?,
            writes: field_u64(line, "writes")?,
            bad: 0,
            first: None,
            disk_blocks: field_u64_or0(line, "disk_blocks")?,
            disk_writes: field_u64_or0(line, "disk_writes")?,
            disk_bad: 0,
        }),
        Some("fail") => Ok(CheckResult {
            ok: false,
            pages: 0,
            writes: 0,
            bad: field_u64(line, "bad")?,
            first: Some(field_u64(line, "first")?),
            disk_blocks: 0,
            disk_writes: 0,
            disk_bad: field_u64_or0(line, "disk_bad")?,
        }),
        _ => bail!("FERRY-CHECK line is neither ok nor fail: {line:?}"),
    }
}

/// Parses `FERRY-PONG writes=<w>` into the write count.
pub fn parse_pong(line: &str) -> Result<u64> {
    let line = line.trim();
    if line.split_whitespace().next() != Some("FERRY-PONG") {
        bail!("not a FERRY-PONG line: {line:?}");
    }
    field_u64(line, "writes")
}

/// Parses `FERRY-DIGEST <hex>` into the hex digest.
pub fn parse_digest(line: &str) -> Result<String> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("FERRY-DIGEST"), Some(hex), None)
            if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok(hex.to_ascii_lowercase())
        }
        _ => bail!("not a FERRY-DIGEST line: {line:?}"),
    }
}

/// A parsed `FERRY-READY` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Ready {
    /// Pages in the workload's region.
    pub pages: u64,
    /// Content mix (`realistic`, `zero`, `text`, `random`).
    pub mix: String,
    /// Configured dirty rate, MiB/s.
    pub rate: f64,
}

/// Parses `FERRY-READY pages=<n> mix=<mix> rate=<R>`.
pub fn parse_ready(line: &str) -> Result<Ready> {
    let line = line.trim();
    if line.split_whitespace().next() != Some("FERRY-READY") {
        bail!("not a FERRY-READY line: {line:?}");
    }
    let get = |key: &str| {
        fields(line)
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    };
    let mix = get("mix").ok_or_else(|| anyhow!("no mix= in {line:?}"))?;
    let rate = get("rate").ok_or_else(|| anyhow!("no rate= in {line:?}"))?;
    let rate: f64 = rate
        .parse()
        .map_err(|_| anyhow!("rate={rate:?} is not a number in {line:?}"))?;
    Ok(Ready {
        pages: field_u64(line, "pages")?,
        mix,
        rate,
    })
}

/// Parses a heartbeat `FERRY-HB t=<s> writes=<w>` into `(seconds since ready, writes)`.
pub fn parse_heartbeat(line: &str) -> Result<(u64, u64)> {
    let line = line.trim();
    if line.split_whitespace().next() != Some("FERRY-HB") {
        bail!("not a FERRY-HB line: {line:?}");
    }
    Ok((field_u64(line, "t")?, field_u64(line, "writes")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    #[test]
    fn parses_check() {
        assert_eq!(
            parse_check("FERRY-CHECK ok pages=32768 writes=1234\r").expect("ok"),
            CheckResult {
                ok: true,
                pages: 32768,
                writes: 1234,
                bad: 0,
                first: None,
                disk_blocks: 0,
                disk_writes: 0,
                disk_bad: 0,
            }
        );
        let disk = parse_check("FERRY-CHECK ok pages=4 writes=0 disk_blocks=372 disk_writes=397")
            .expect("disk ok");
        assert!(disk.ok && disk.disk_blocks == 372 && disk.disk_writes == 397);
        let disk = parse_check("FERRY-CHECK fail bad=0 first=0 disk_bad=3 disk_first=12")
            .expect("disk fail");
        assert!(!disk.ok && disk.bad == 0 && disk.disk_bad == 3);
        assert_eq!(
            parse_check("FERRY-CHECK fail bad=3 first=17").expect("fail"),
            CheckResult {
                ok: false,
                pages: 0,
                writes: 0,
                bad: 3,
                first: Some(17),
                disk_blocks: 0,
                disk_writes: 0,
                disk_bad: 0,
            }
        );
        for bad in [
            "FERRY-CHECK",
            "FERRY-CHECK maybe",
            "FERRY-CHECK ok pages=x writes=1",
            "FERRY-CHECK ok writes=1",
            "FERRY-PONG writes=1",
        ] {
            assert!(parse_check(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_other_lines() {
        assert_eq!(parse_pong("FERRY-PONG writes=42").expect("pong"), 42);
        assert!(parse_pong("FERRY-PONG").is_err());
        assert!(parse_pong("FERRY-PONGX writes=1").is_err());
        assert_eq!(
            parse_digest("FERRY-DIGEST 00ff00FF00ff00ff").expect("digest"),
            "00ff00ff00ff00ff"
        );
        assert!(parse_digest("FERRY-DIGEST xyz").is_err());
        assert!(parse_digest("FERRY-DIGEST").is_err());
        assert_eq!(
            parse_ready("FERRY-READY pages=32768 mix=realistic rate=20").expect("ready"),
            Ready {
                pages: 32768,
                mix: "realistic".into(),
                rate: 20.0
            }
        );
        assert_eq!(
            parse_ready("FERRY-READY pages=1 mix=zero rate=2.5")
                .expect("ready")
                .rate,
            2.5
        );
        assert!(parse_ready("FERRY-READY pages=1 mix=zero").is_err());
        assert_eq!(
            parse_heartbeat("FERRY-HB t=5 writes=900").expect("hb"),
            (5, 900)
        );
    }

    #[test]
    fn reply_prefixes() {
        assert_eq!(reply_prefix_for("check"), Some("FERRY-CHECK"));
        assert_eq!(reply_prefix_for("rate 5"), Some("FERRY-RATE"));
        assert_eq!(reply_prefix_for(" ping "), Some("FERRY-PONG"));
        assert_eq!(reply_prefix_for("pause"), Some("FERRY-PAUSED"));
        assert_eq!(reply_prefix_for("resume"), Some("FERRY-RESUMED"));
        assert_eq!(reply_prefix_for("digest"), Some("FERRY-DIGEST"));
        assert_eq!(reply_prefix_for("reboot"), None);
        assert_eq!(reply_prefix_for(""), None);
    }

    /// A test double for the guest workload (not the real one, which runs in a VM): a unix
    /// socket server speaking the console protocol, with heartbeats, `\r\n` line endings,
    /// replies split across writes, and a few deliberate quirks per command.
    async fn fake_guest(dir: &Path) -> PathBuf {
        let path = dir.join("console.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd).lines();
            let mut writes = 100u64;
            let _ = wr.write_all(b"FERRY-HB t=1 writes=100\r\n").await;
            while let Ok(Some(cmd)) = lines.next_line().await {
                let cmd = cmd.trim().to_string();
                writes += 10;
                let reply = match cmd.as_str() {
                    "ping" => format!("FERRY-PONG writes={writes}\r\n"),
                    // Heartbeat first, reply split in two writes.
                    "check" => {
                        let _ = wr
                            .write_all(
                                format!("FERRY-HB t=2 writes={writes}\r\nFERRY-CHE").as_bytes(),
                            )
                            .await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        format!("CK ok pages=256 writes={writes}\r\n")
                    }
                    "digest" => "FERRY-DIGEST 0123456789abcdef\r\nFERRY-HB t=3 writes=0\r\n".into(),
                    "silent" => String::new(),
                    "exit" => "FERRY-WORKLOAD-EXIT 1\r\n".into(),
                    "close" => return,
                    _ => "FERRY-ERR unknown command\r\n".into(),
                };
                if wr.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        path
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn console_against_fake_guest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = fake_guest(dir.path()).await;
        let mut c = GuestConsole::connect(&path, T).await.expect("connect");

        let hb = c.expect("FERRY-HB", T).await.expect("heartbeat");
        assert_eq!(parse_heartbeat(&hb).expect("hb"), (1, 100));

        let pong = c.command("ping", "FERRY-PONG", T).await.expect("ping");
        assert_eq!(parse_pong(&pong).expect("pong"), 110);

        let check = c.command("check", "FERRY-CHECK", T).await.expect("check");
        assert_eq!(check, "FERRY-CHECK ok pages=256 writes=120");
        assert!(parse_check(&check).expect("parse").ok);

        // The heartbeat after the digest stays buffered for the next expect.
        let d = c
            .command("digest", "FERRY-DIGEST", T)
            .await
            .expect("digest");
        assert_eq!(parse_digest(&d).expect("hex"), "0123456789abcdef");
        assert_eq!(
            c.expect("FERRY-HB", T).await.expect("buffered hb"),
            "FERRY-HB t=3 writes=0"
        );

        let e = c
            .command("bogus", "FERRY-RATE", T)
            .await
            .expect_err("guest error");
        assert!(e.to_string().contains("FERRY-ERR unknown command"), "{e:#}");
        assert_eq!(
            c.command("bogus", "FERRY-ERR", T).await.expect("asked for"),
            "FERRY-ERR unknown command"
        );

        let e = c
            .command("silent", "FERRY-PONG", Duration::from_millis(200))
            .await
            .expect_err("timeout");
        let msg = format!("{e:#}");
        assert!(
            msg.contains("timed out") && msg.contains("FERRY-PONG") && msg.contains("last lines"),
            "{msg}"
        );

        let e = c
            .command("exit", "FERRY-PONG", T)
            .await
            .expect_err("workload exit");
        assert!(format!("{e:#}").contains("workload exited"), "{e:#}");

        c.send("close").await.expect("send");
        let e = c.expect("FERRY-PONG", T).await.expect_err("closed");
        assert!(format!("{e:#}").contains("console closed"), "{e:#}");
    }

    #[tokio::test]
    async fn connect_waits_for_the_socket_and_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = GuestConsole::connect(dir.path().join("none.sock"), Duration::from_millis(150))
            .await
            .expect_err("none");
        assert!(e.to_string().contains("none.sock"), "{e}");

        let path = dir.path().join("late.sock");
        let p = path.clone();
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let l = UnixListener::bind(&p).expect("bind");
            let (mut s, _) = l.accept().await.expect("accept");
            s.write_all(b"FERRY-PONG writes=1\r\n")
                .await
                .expect("write");
        });
        let mut c = GuestConsole::connect(&path, T)
            .await
            .expect("connects once it exists");
        assert_eq!(
            c.expect("FERRY-PONG", T).await.expect("line"),
            "FERRY-PONG writes=1"
        );
        server.await.expect("server");
    }

    #[tokio::test]
    async fn log_lines_are_polled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("console.log");
        let l = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            std::fs::write(&l, b"SeaBIOS\r\nLinux version 6\r\nFERRY-READY pages=1")
                .expect("write");
            tokio::time::sleep(Duration::from_millis(150)).await;
            std::fs::write(
                &l,
                b"SeaBIOS\r\nLinux version 6\r\nFERRY-READY pages=1024 mix=text rate=5\r\nFERRY-HB",
            )
            .expect("write");
        });
        let line = wait_for_log_line(&log, "FERRY-READY", T)
            .await
            .expect("ready");
        assert_eq!(
            line, "FERRY-READY pages=1024 mix=text rate=5",
            "only a complete line counts"
        );
        let e = wait_for_log_line(&log, "FERRY-NEVER", Duration::from_millis(150))
            .await
            .expect_err("timeout");
        assert!(
            e.to_string().contains("FERRY-READY pages=1024"),
            "error shows the log tail: {e}"
        );
    }
}
