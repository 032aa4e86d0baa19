//! The connection: greeting, command/reply matching, event fan-out.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// How long [`QmpClient::execute`] waits for a reply. Every QMP command ferry sends
/// returns at once (long work such as a migration or a mirror reports through events).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::error::io_context;
use crate::types::{AnnounceParams, DirtyRateInfo, MigrationInfo, QemuVersion, RunStatus};
use crate::{QmpError, QmpEvent};

/// How many unread events a subscriber may fall behind before it loses some.
const EVENT_CAPACITY: usize = 4096;

/// Delay between connection attempts in [`QmpClient::connect_retry`].
const RETRY_INTERVAL: Duration = Duration::from_millis(25);

type Reply = Result<Value, QmpError>;

/// An async QMP connection. Clone it freely: clones share the connection.
///
/// Dropping the last clone closes the socket and stops the background tasks.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("version", &self.inner.version)
            .field("closed", &self.is_closed())
            .finish()
    }
}

struct Inner {
    shared: Arc<Shared>,
    /// Complete, newline-terminated messages for the writer task. A separate
    /// task writes so that a caller cancelled mid-write cannot leave half a
    /// message on the socket.
    writer: mpsc::UnboundedSender<Vec<u8>>,
    next_id: AtomicU64,
    version: QemuVersion,
    reader_task: AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The reader task holds the read half; without this it would keep
        // the socket open after every client handle is gone.
        self.reader_task.abort();
    }
}

/// State shared between client handles and the reader/writer tasks.
struct Shared {
    state: Mutex<State>,
}

struct State {
    pending: HashMap<u64, Pending>,
    /// `None` once the connection closed: dropping the sender is what makes
    /// subscribers see `Closed` (and waits fail with `Disconnected`).
    events: Option<broadcast::Sender<QmpEvent>>,
    closed: bool,
}

struct Pending {
    command: String,
    tx: oneshot::Sender<Reply>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (single inserts/removes), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection closed and fails every pending command.
    fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.events = None;
        for (_, p) in st.pending.drain() {
            let _ = p.tx.send(Err(QmpError::Disconnected));
        }
    }
}

/// Removes a pending entry if the `execute` future is dropped before its
/// reply arrives (e.g. on timeout), so the map does not grow.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct GreetingBody {
    version: GreetingVersion,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct GreetingVersion {
    qemu: QemuVersion,
}

/// Events a connection may carry before QEMU's greeting ([`QmpClient::from_stream`]).
const MAX_EVENTS_BEFORE_GREETING: usize = 16;

/// Whether a line is a QMP event (an object with an `event` member).
fn is_event(line: &str) -> bool {
    serde_json::from_str::<Value>(line.trim())
        .ok()
        .is_some_and(|v| v.get("event").is_some())
}

impl QmpClient {
    /// Connects to a QMP unix socket, reads the greeting and leaves
    /// capabilities negotiation mode (`qmp_capabilities`).
    ///
    /// Note that QEMU serves one client per QMP socket: while another client
    /// is connected this waits for the greeting indefinitely. Use
    /// [`QmpClient::connect_retry`] for a bounded wait.
    pub async fn connect(path: impl AsRef<Path>) -> Result<QmpClient, QmpError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).await.map_err(|e| {
            io_context(
                e,
                format_args!("connecting to QMP socket {}", path.display()),
            )
        })?;
        Self::from_stream(stream).await
    }

    /// Like [`QmpClient::connect`], but retries while the socket does not
    /// exist yet or refuses connections (QEMU still starting). The whole
    /// handshake must finish within `timeout`, else [`QmpError::Timeout`].
    pub async fn connect_retry(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<QmpClient, QmpError> {
        let path = path.as_ref();
        let attempt = async {
            loop {
                match UnixStream::connect(path).await {
                    Ok(stream) => return Self::from_stream(stream).await,
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::NotFound | ErrorKind::ConnectionRefused
                        ) =>
                    {
                        tokio::time::sleep(RETRY_INTERVAL).await;
                    }
                    Err(e) => {
                        return Err(io_context(
                            e,
                            format_args!("connecting to QMP socket {}", path.display()),
                        ))
                    }
                }
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| QmpError::Timeout(format!("QMP socket {}", path.display())))?
    }

    /// Runs the QMP handshake on an already-connected stream.
    pub async fn from_stream(stream: UnixStream) -> Result<QmpClient, QmpError> {
        let (read_half, write_half) = stream.into_split();
        let mut reader = BufReader::new(read_half);

        // QEMU has sent an event before the greeting: once in the benchmark, to a client
        // that connected while the VM started (RESUME as the first line; the event went
        // out, it seems, before QEMU set the new connection to negotiation mode). Events
        // before the greeting are skipped (callers ask for the state once connected);
        // anything else is still an error.
        let mut line = String::new();
        let mut skipped = 0;
        let greeting: Greeting = loop {
            line.clear();
            let n = reader.read_line(&mut line).await.map_err(QmpError::Io)?;
            if n == 0 {
                return Err(QmpError::Disconnected);
            }
            match serde_json::from_str::<Greeting>(line.trim()) {
                Ok(g) => break g,
                Err(_) if skipped < MAX_EVENTS_BEFORE_GREETING && is_event(&line) => {
                    skipped += 1;
                    tracing::debug!(line = %truncate(&line, 200), "QMP event before the greeting, skipped");
                }
                Err(e) => {
                    return Err(QmpError::Protocol(format!(
                        "unexpected QMP greeting ({e}): {}",
                        truncate(&line, 200)
                    )))
                }
            }
        };
        let version = greeting.qmp.version.qemu;

        let (events_tx, _) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                events: Some(events_tx),
                closed: false,
            }),
        });
        let (writer_tx, writer_rx) = mpsc::unbounded_channel();
        tokio::spawn(writer_loop(write_half, writer_rx, shared.clone()));
        let reader_task = tokio::spawn(reader_loop(reader, shared.clone())).abort_handle();

        let client = QmpClient {
            inner: Arc::new(Inner {
                shared,
                writer: writer_tx,
                next_id: AtomicU64::new(1),
                version,
                reader_task,
            }),
        };
        client.execute("qmp_capabilities", None).await?;
        tracing::debug!(%version, "QMP connected");
        Ok(client)
    }

    /// The QEMU version announced in the greeting.
    pub fn version(&self) -> QemuVersion {
        self.inner.version
    }

    /// True once the connection has closed; every command fails from then on.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.lock().closed
    }

    /// Subscribes to QMP events. Only events arriving after this call are
    /// seen, so subscribe *before* issuing the command whose event you wait
    /// for. On a closed connection the receiver reports `Closed` at once.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        match &self.inner.shared.lock().events {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Executes a QMP command and returns its `return` value.
    ///
    /// Safe to call concurrently from many tasks. A QMP error reply becomes
    /// [`QmpError::Command`]; the connection closing before the reply
    /// arrives gives [`QmpError::Disconnected`]. Every command has a deadline,
    /// [`DEFAULT_COMMAND_TIMEOUT`] ([`QmpError::Timeout`] after it): a wedged QEMU
    /// must not hang its agent. [`QmpClient::execute_timeout`] sets another.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, DEFAULT_COMMAND_TIMEOUT)
            .await
    }

    async fn execute_untimed(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = serde_json::Map::new();
        msg.insert("execute".into(), Value::String(command.to_owned()));
        if let Some(args) = arguments {
            if !args.is_null() {
                msg.insert("arguments".into(), args);
            }
        }
        msg.insert("id".into(), Value::from(id));
        let mut bytes = serde_json::to_vec(&msg)
            .map_err(|e| QmpError::Protocol(format!("cannot encode {command}: {e}")))?;
        bytes.push(b'\n');

        let (tx, rx) = oneshot::channel();
        let shared = &*self.inner.shared;
        {
            let mut st = shared.lock();
            if st.closed {
                return Err(QmpError::Disconnected);
            }
            // Registered before sending: the reply may arrive before we await.
            st.pending.insert(
                id,
                Pending {
                    command: command.to_owned(),
                    tx,
                },
            );
        }
        let _guard = PendingGuard { shared, id };
        tracing::trace!(command, id, "QMP execute");
        self.inner
            .writer
            .send(bytes)
            .map_err(|_| QmpError::Disconnected)?;
        rx.await.map_err(|_| QmpError::Disconnected)?
    }

    /// [`QmpClient::execute`] with a deadline ([`QmpError::Timeout`]).
    /// QEMU may still carry the command out after the timeout.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        tokio::time::timeout(timeout, self.execute_untimed(command, arguments))
            .await
            .map_err(|_| QmpError::Timeout(format!("reply to QMP command '{command}'")))?
    }

    /// Executes a command and decodes its `return` value into `T`.
    pub async fn execute_as<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, QmpError> {
        let v = self.execute(command, arguments).await?;
        serde_json::from_value(v)
            .map_err(|e| QmpError::Protocol(format!("cannot decode reply to {command}: {e}")))
    }

    pub(crate) async fn execute_unit(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<(), QmpError> {
        self.execute(command, arguments).await.map(drop)
    }

    /// `query-status`: the run state.
    pub async fn query_status(&self) -> Result<RunStatus, QmpError> {
        self.execute_as("query-status", None).await
    }

    /// `stop`: pauses the vCPUs.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute_unit("stop", None).await
    }

    /// `cont`: resumes the vCPUs (also starts a `-S` guest).
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute_unit("cont", None).await
    }

    /// `quit`: QEMU exits at once. The connection closing before the reply
    /// is read counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute_unit("quit", None).await {
            Err(QmpError::Disconnected) => Ok(()),
            r => r,
        }
    }

    /// `system_powerdown`: sends an ACPI power button press to the guest.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute_unit("system_powerdown", None).await
    }

    /// `migrate-set-capabilities` with `(name, state)` pairs, e.g.
    /// `&[("events", true), ("x-ignore-shared", true)]`.
    pub async fn migrate_set_capabilities(&self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(name, state)| json!({"capability": name, "state": state}))
            .collect();
        self.execute_unit(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .await
    }

    /// `migrate-set-parameters` with a parameters object, e.g.
    /// `json!({"max-bandwidth": 10737418240u64, "downtime-limit": 300})`.
    pub async fn migrate_set_parameters(&self, params: Value) -> Result<(), QmpError> {
        self.execute_unit("migrate-set-parameters", Some(params))
            .await
    }

    /// `migrate` to `uri` (`"unix:PATH"`, `"tcp:HOST:PORT"`, `"exec:CMD"`).
    /// Uses the `uri` argument, which both 7.2 and 10.0 accept.
    pub async fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.execute_unit("migrate", Some(json!({ "uri": uri })))
            .await
    }

    /// `migrate-incoming` on a QEMU started with `-incoming defer`.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        self.execute_unit("migrate-incoming", Some(json!({ "uri": uri })))
            .await
    }

    /// `migrate-continue`, e.g. with state `"pre-switchover"`.
    pub async fn migrate_continue(&self, state: &str) -> Result<(), QmpError> {
        self.execute_unit("migrate-continue", Some(json!({ "state": state })))
            .await
    }

    /// `migrate_cancel`.
    pub async fn migrate_cancel(&self) -> Result<(), QmpError> {
        self.execute_unit("migrate_cancel", None).await
    }

    /// `query-migrate`.
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        self.execute_as("query-migrate", None).await
    }

    /// `announce-self` with QEMU's default timing: gratuitous ARP/RARP from
    /// the guest's NICs so switches learn its new location.
    pub async fn announce_self(&self) -> Result<(), QmpError> {
        self.announce_self_with(AnnounceParams::default()).await
    }

    /// `announce-self` with explicit timing.
    pub async fn announce_self_with(&self, params: AnnounceParams) -> Result<(), QmpError> {
        let args = serde_json::to_value(params)
            .map_err(|e| QmpError::Protocol(format!("cannot encode announce-self: {e}")))?;
        self.execute_unit("announce-self", Some(args)).await
    }

    /// `calc-dirty-rate` over `secs` seconds (page-sampling mode); read the
    /// result with [`QmpClient::query_dirty_rate`] once it is `"measured"`.
    pub async fn calc_dirty_rate(&self, secs: u64) -> Result<(), QmpError> {
        self.execute_unit("calc-dirty-rate", Some(json!({ "calc-time": secs })))
            .await
    }

    /// `query-dirty-rate`.
    pub async fn query_dirty_rate(&self) -> Result<DirtyRateInfo, QmpError> {
        self.execute_as("query-dirty-rate", None).await
    }
}

async fn writer_loop(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(bytes) = rx.recv().await {
        if let Err(e) = w.write_all(&bytes).await {
            tracing::warn!(error = %e, "QMP write failed; closing connection");
            shared.close();
            return;
        }
    }
}

async fn reader_loop(mut reader: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) => break,
            Ok(_) => handle_line(&shared, line.trim()),
            Err(e) => {
                tracing::warn!(error = %e, "QMP read failed; closing connection");
                break;
            }
        }
    }
    tracing::debug!("QMP connection closed");
    shared.close();
}

fn handle_line(shared: &Shared, line: &str) {
    if line.is_empty() {
        return;
    }
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, line = truncate(line, 200), "QMP: undecodable line skipped");
            return;
        }
    };
    if v.get("event").is_some() {
        match QmpEvent::from_json(&v) {
            Some(ev) => {
                tracing::debug!(event = %ev.name, data = %ev.data, "QMP event");
                if let Some(tx) = &shared.lock().events {
                    // No subscribers is fine.
                    let _ = tx.send(ev);
                }
            }
            None => tracing::warn!(line = truncate(line, 200), "QMP: malformed event skipped"),
        }
        return;
    }
    let Some(id) = v.get("id").and_then(Value::as_u64) else {
        // QEMU answers without an id only when it could not parse a request;
        // we only send well-formed JSON, so this should not happen.
        tracing::warn!(
            line = truncate(line, 200),
            "QMP: reply without our id skipped"
        );
        return;
    };
    let Some(pending) = shared.lock().pending.remove(&id) else {
        tracing::debug!(id, "QMP: reply for an abandoned command");
        return;
    };
    let reply = if let Some(ret) = v.get("return") {
        Ok(ret.clone())
    } else if let Some(err) = v.get("error") {
        let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        Err(QmpError::Command {
            command: pending.command,
            class: field("class"),
            desc: field("desc"),
        })
    } else {
        Err(QmpError::Protocol(format!(
            "reply to {} has neither return nor error: {}",
            pending.command,
            truncate(line, 200)
        )))
    };
    let _ = pending.tx.send(reply);
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    //! These tests talk to `FakeQemu`, a test double of QEMU's QMP server on
    //! a unix socket: it sends a scripted greeting and answers commands the
    //! way each test tells it to. It is not QEMU; `tests/real_qemu.rs` checks
    //! the same client against a real QEMU.

    use super::*;
    use crate::{wait_for_event, wait_migration_status};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
    use tokio::net::UnixListener;

    const GREETING_7_2: &str = r#"{"QMP": {"version": {"qemu": {"micro": 19, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}"#;

    /// The server side of one fake QMP connection.
    struct FakeQemu {
        lines: Lines<BufReader<OwnedReadHalf>>,
        w: OwnedWriteHalf,
    }

    impl FakeQemu {
        async fn send(&mut self, v: Value) {
            let mut s = v.to_string();
            s.push_str("\r\n"); // QEMU ends lines with CRLF
            self.w.write_all(s.as_bytes()).await.expect("fake write");
        }

        /// Reads the next command; returns (execute, arguments, id).
        async fn recv(&mut self) -> (String, Value, Value) {
            let line = self
                .lines
                .next_line()
                .await
                .expect("fake read")
                .expect("fake eof");
            let v: Value = serde_json::from_str(&line).expect("client sent bad json");
            (
                v["execute"].as_str().expect("execute").to_owned(),
                v.get("arguments").cloned().unwrap_or(Value::Null),
                v["id"].clone(),
            )
        }

        /// Sends the greeting and answers `qmp_capabilities`.
        async fn handshake(&mut self, greeting: &str) {
            self.w
                .write_all(format!("{greeting}\r\n").as_bytes())
                .await
                .expect("greet");
            let (cmd, _, id) = self.recv().await;
            assert_eq!(cmd, "qmp_capabilities");
            self.send(json!({"return": {}, "id": id})).await;
        }
    }

    /// Binds a socket in a temp dir and returns it plus a task that accepts
    /// one connection and hands it to `script`.
    fn fake_server<F, Fut>(
        script: F,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        tokio::task::JoinHandle<()>,
    )
    where
        F: FnOnce(FakeQemu) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (r, w) = stream.into_split();
            script(FakeQemu {
                lines: BufReader::new(r).lines(),
                w,
            })
            .await;
        });
        (dir, path, task)
    }

    #[tokio::test]
    async fn greeting_and_capabilities() {
        let (_dir, path, server) = fake_server(|mut q| async move {
            q.handshake(GREETING_7_2).await;
            let (cmd, args, id) = q.recv().await;
            assert_eq!(cmd, "query-status");
            assert_eq!(args, Value::Null, "no arguments member when None");
            // A 7.2-style reply, with a field 10.0 dropped.
            q.send(json!({"return": {"status": "prelaunch", "singlestep": false, "running": false}, "id": id})).await;
        });
        let c = QmpClient::connect(&path).await.expect("connect");
        assert_eq!(c.version(), QemuVersion::new(7, 2, 19));
        let st = c.query_status().await.expect("status");
        assert_eq!(
            st,
            RunStatus {
                status: "prelaunch".into(),
                running: false
            }
        );
        server.await.expect("server");
    }

    #[tokio::test]
    async fn an_event_before_the_greeting_is_skipped() {
        // What a QEMU starting its VM sent once: RESUME, then the greeting.
        let (_dir, path, server) = fake_server(|mut q| async move {
            q.send(json!({"timestamp": {"seconds": 1796183813, "microseconds": 810238}, "event": "RESUME"}))
                .await;
            q.handshake(GREETING_7_2).await;
        });
        let c = QmpClient::connect(&path).await.expect("connect");
        assert_eq!(c.version(), QemuVersion::new(7, 2, 19));
        server.await.expect("server");
        // A line that is neither greeting nor event is still refused.
        let (_dir, path, _server) = fake_server(|mut q| async move {
            q.send(json!({"return": {}})).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        match QmpClient::connect(&path).await {
            Err(QmpError::Protocol(msg)) => assert!(msg.contains("greeting"), "{msg}"),
            other => panic!("expected protocol error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn bad_greeting_is_protocol_error() {
        let (_dir, path, _server) = fake_server(|mut q| async move {
            q.w.write_all(b"{\"hello\": 1}\n").await.expect("w");
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        match QmpClient::connect(&path).await {
            Err(QmpError::Protocol(msg)) => assert!(msg.contains("greeting"), "{msg}"),
            other => panic!("expected protocol error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn concurrent_commands_matched_by_id() {
        let (_dir, path, server) = fake_server(|mut q| async move {
            q.handshake(GREETING_7_2).await;
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(q.recv().await);
            }
            // Answer in reverse order, with an event in between.
            got.reverse();
            for (i, (cmd, args, id)) in got.into_iter().enumerate() {
                if i == 1 {
                    q.send(
                        json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}),
                    )
                    .await;
                }
                q.send(json!({"return": {"cmd": cmd, "n": args["n"]}, "id": id}))
                    .await;
            }
        });
        let c = QmpClient::connect(&path).await.expect("connect");
        let mut tasks = Vec::new();
        for n in 0..3 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.execute(&format!("cmd-{n}"), Some(json!({"n": n}))).await
            }));
        }
        for (n, t) in tasks.into_iter().enumerate() {
            let r = t.await.expect("join").expect("execute");
            assert_eq!(r, json!({"cmd": format!("cmd-{n}"), "n": n}));
        }
        server.await.expect("server");
    }

    #[tokio::test]
    async fn error_reply_becomes_command_error() {
        let (_dir, path, server) = fake_server(|mut q| async move {
            q.handshake(GREETING_7_2).await;
            let (cmd, args, id) = q.recv().await;
            assert_eq!(cmd, "migrate-set-capabilities");
            assert_eq!(
                args,
                json!({"capabilities": [{"capability": "events", "state": true},
                                        {"capability": "compress", "state": false}]})
            );
            q.send(json!({"error": {"class": "GenericError", "desc": "Capability 'compress' not found"}, "id": id})).await;
            // The connection stays usable after an error.
            let (_, _, id) = q.recv().await;
            q.send(json!({"return": {}, "id": id})).await;
        });
        let c = QmpClient::connect(&path).await.expect("connect");
        let err = c
            .migrate_set_capabilities(&[("events", true), ("compress", false)])
            .await
            .expect_err("must fail");
        match &err {
            QmpError::Command {
                command,
                class,
                desc,
            } => {
                assert_eq!(command, "migrate-set-capabilities");
                assert_eq!(class, "GenericError");
                assert!(desc.contains("compress"));
            }
            other => panic!("expected command error, got {other:?}"),
        }
        assert_eq!(err.command_class(), Some("GenericError"));
        assert!(err.to_string().contains("Capability 'compress' not found"));
        c.stop().await.expect("stop");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn events_delivered_and_waited_for() {
        let (_dir, path, server) = fake_server(|mut q| async move {
            q.handshake(GREETING_7_2).await;
            let (cmd, args, id) = q.recv().await;
            assert_eq!(cmd, "migrate");
            assert_eq!(args, json!({"uri": "unix:/tmp/x"}));
            q.send(json!({"return": {}, "id": id})).await;
            for status in ["setup", "active"] {
                q.send(json!({"event": "MIGRATION", "data": {"status": status},
                              "timestamp": {"seconds": 1700000000, "microseconds": 5}}))
                    .await;
            }
            q.send(json!({"event": "MIGRATION_PASS", "data": {"pass": 1},
                          "timestamp": {"seconds": 1700000000, "microseconds": 6}}))
                .await;
            q.send(
                json!({"event": "MIGRATION", "data": {"status": "pre-switchover"},
                          "timestamp": {"seconds": 1700000001, "microseconds": 250000}}),
            )
            .await;
            q.send(json!({"event": "RESUME", "timestamp": {"seconds": -1, "microseconds": -1}}))
                .await;
            // Keep the connection open so the timeout below is a timeout.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let c = QmpClient::connect(&path).await.expect("connect");
        let mut rx = c.subscribe();
        let mut rx2 = c.subscribe();
        c.migrate("unix:/tmp/x").await.expect("migrate");

        let ev = wait_migration_status(
            &mut rx,
            Duration::from_secs(5),
            &["pre-switchover", "completed", "failed"],
        )
        .await
        .expect("pre-switchover");
        assert_eq!(ev.migration_status(), Some("pre-switchover"));
        assert_eq!(
            ev.timestamp,
            std::time::UNIX_EPOCH
                + Duration::from_secs(1_700_000_001)
                + Duration::from_micros(250_000)
        );
        let resume = wait_for_event(&mut rx, Duration::from_secs(5), |e| e.name == "RESUME")
            .await
            .expect("resume");
        assert!(
            resume.data.is_object(),
            "missing data becomes an empty object"
        );

        // A second subscriber sees every event too.
        let first = rx2.recv().await.expect("event");
        assert_eq!(first.migration_status(), Some("setup"));

        let err = wait_for_event(&mut rx, Duration::from_millis(100), |e| {
            e.name == "SHUTDOWN"
        })
        .await
        .expect_err("times out");
        assert!(matches!(err, QmpError::Timeout(_)), "{err:?}");
        server.abort();
    }

    #[tokio::test]
    async fn disconnect_fails_pending_commands_and_waits() {
        let (_dir, path, server) = fake_server(|mut q| async move {
            q.handshake(GREETING_7_2).await;
            // Read the two commands, answer neither, hang up.
            q.recv().await;
            q.recv().await;
        });
        let c = QmpClient::connect(&path).await.expect("connect");
        let mut rx = c.subscribe();
        let (a, b) = tokio::join!(
            c.execute("query-migrate", None),
            c.execute("query-status", None)
        );
        assert!(matches!(a, Err(QmpError::Disconnected)), "{a:?}");
        assert!(matches!(b, Err(QmpError::Disconnected)), "{b:?}");
        server.await.expect("server");
        assert!(c.is_closed());
        assert!(matches!(
            c.execute("cont", None).await,
            Err(QmpError::Disconnected)
        ));
        let w = wait_for_event(&mut rx, Duration::from_secs(5), |_| true).await;
        assert!(matches!(w, Err(QmpError::Disconnected)), "{w:?}");
        let mut late = c.subscribe();
        let w = wait_for_event(&mut late, Duration::from_secs(5), |_| true).await;
        assert!(matches!(w, Err(QmpError::Disconnected)), "{w:?}");
        // quit tolerates the connection being gone.
        c.quit().await.expect("quit on closed connection is ok");
    }

    #[tokio::test]
    async fn timeout_abandons_command_and_late_reply_is_ignored() {
        let (_dir, path, server) = fake_server(|mut q| async move {
            q.handshake(GREETING_7_2).await;
            let (_, _, slow_id) = q.recv().await;
            let (_, _, id) = q.recv().await;
            q.send(json!({"return": {"late": true}, "id": slow_id}))
                .await;
            q.send(json!({"return": {"ok": 1}, "id": id})).await;
        });
        let c = QmpClient::connect(&path).await.expect("connect");
        let err = c
            .execute_timeout("query-dirty-rate", None, Duration::from_millis(50))
            .await
            .expect_err("timeout");
        assert!(
            matches!(err, QmpError::Timeout(ref s) if s.contains("query-dirty-rate")),
            "{err:?}"
        );
        assert_eq!(c.execute("x", None).await.expect("x"), json!({"ok": 1}));
        assert!(c.inner.shared.lock().pending.is_empty());
        server.await.expect("server");
    }

    #[tokio::test]
    async fn connect_retry_waits_for_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("late.sock");
        let p2 = path.clone();
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let listener = UnixListener::bind(&p2).expect("bind");
            let (stream, _) = listener.accept().await.expect("accept");
            let (r, w) = stream.into_split();
            let mut q = FakeQemu {
                lines: BufReader::new(r).lines(),
                w,
            };
            q.handshake(GREETING_7_2).await;
            // Announce-self with QEMU's default timing.
            let (cmd, args, id) = q.recv().await;
            assert_eq!(cmd, "announce-self");
            assert_eq!(
                args,
                json!({"initial": 50, "max": 550, "rounds": 5, "step": 100})
            );
            q.send(json!({"return": {}, "id": id})).await;
        });
        let c = QmpClient::connect_retry(&path, Duration::from_secs(10))
            .await
            .expect("connect");
        c.announce_self().await.expect("announce");
        server.await.expect("server");

        let missing = dir.path().join("never.sock");
        let err = QmpClient::connect_retry(&missing, Duration::from_millis(100))
            .await
            .expect_err("timeout");
        assert!(
            matches!(err, QmpError::Timeout(ref s) if s.contains("never.sock")),
            "{err:?}"
        );
    }
}
