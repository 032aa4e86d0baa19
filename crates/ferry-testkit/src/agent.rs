//! Real `ferryd` processes for integration tests: a throw-away PKI, a config file with free
//! ports, start/kill/restart, and cleanup that leaves no process or RAM file behind.

use anyhow::{anyhow, bail, Context, Result};
use ferry_api::v1::ferry_control_client::FerryControlClient;
use ferry_api::v1::ListVmsRequest;
use ferry_transport::pki::{
    host_files, write_dev_certs, write_dev_pki, HostFiles, Identity, DEFAULT_VALID_DAYS,
};
use ferry_transport::Role;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How long [`TestAgent::start`] and [`TestAgent::restart`] wait for gRPC to answer.
pub const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The operator certificate every [`TestPki`] holds (what the tests' control clients use).
pub const TEST_OPERATOR: &str = "operator";

/// A development PKI in a directory: one CA, an agent certificate per host name and an
/// operator certificate ([`TEST_OPERATOR`]).
#[derive(Debug, Clone)]
pub struct TestPki {
    dir: PathBuf,
}

impl TestPki {
    /// Writes `ca.pem`, `ca.key` and `<host>.pem`/`<host>.key` for each host into `dir`
    /// (created if needed; an existing CA there is reused).
    pub fn new(dir: &Path, hosts: &[&str]) -> Result<TestPki> {
        let list: Vec<(String, Vec<String>)> =
            hosts.iter().map(|h| (h.to_string(), Vec::new())).collect();
        write_dev_pki(dir, &list)
            .map_err(|e| anyhow!("writing test PKI in {}: {e}", dir.display()))?;
        write_dev_certs(
            dir,
            Role::Operator,
            &[(TEST_OPERATOR.to_string(), Vec::new())],
            DEFAULT_VALID_DAYS,
        )
        .map_err(|e| anyhow!("writing the test operator certificate: {e}"))?;
        Ok(TestPki {
            dir: dir.to_path_buf(),
        })
    }

    /// The PKI directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Paths of a host's CA, certificate and key files.
    pub fn files(&self, name: &str) -> HostFiles {
        host_files(&self.dir, name)
    }

    /// Issues another certificate in `role` (e.g. a reader, or a second operator).
    pub fn issue(&self, role: Role, name: &str) -> Result<Identity> {
        write_dev_certs(
            &self.dir,
            role,
            &[(name.to_string(), Vec::new())],
            DEFAULT_VALID_DAYS,
        )
        .map_err(|e| anyhow!("issuing {role} {name}: {e}"))?;
        self.identity(name)
    }

    /// The operator identity the tests' control clients use.
    pub fn operator(&self) -> Result<Identity> {
        self.identity(TEST_OPERATOR)
    }

    /// A host's loaded identity (usable as TLS server and client identity).
    pub fn identity(&self, name: &str) -> Result<Identity> {
        let f = self.files(name);
        Identity::load(&f.ca, &f.cert, &f.key)
            .map_err(|e| anyhow!("loading test identity {name}: {e}"))
    }
}

/// Opens a mutual-TLS gRPC control client to the agent at `addr` (`host:port`) with
/// identity `id`, the way `ferryctl` and the agents connect.
pub async fn connect_control(addr: &str, id: &Identity) -> Result<FerryControlClient<Channel>> {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_matches(['[', ']']);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&id.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &id.cert_pem,
            &id.key_pem,
        ))
        .domain_name(host.to_string());
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .with_context(|| format!("agent address {addr:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .context("TLS configuration")?
        .connect()
        .await
        .with_context(|| format!("connecting to agent at {addr}"))?;
    Ok(FerryControlClient::new(channel))
}

/// A port on 127.0.0.1 for an agent's listener that was free a moment ago, taken from
/// below the kernel's ephemeral range: a port there is never handed to an outgoing
/// connection (another agent's, a QEMU's), which could take a port bound and released
/// inside the range before ferryd binds it (an agent that failed to start with "address
/// in use"). `udp`: free for both protocols.
fn free_port(udp: bool) -> Result<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let (low, high) = listener_port_range();
    let span = u32::from(high - low) + 1;
    // Test processes that overlap start at different places.
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Ok(port) = u16::try_from(u32::from(low) + start.wrapping_add(n) % span) else {
            continue;
        };
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if tcp && (!udp || std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()) {
            return Ok(port);
        }
    }
    bail!("no free port in {low}-{high}")
}

/// Ports for listeners: 10000 up to the start of the ephemeral range
/// (`ip_local_port_range`, 32768 by default).
fn listener_port_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low > 11000 {
        (10000, ephemeral_low - 1)
    } else {
        // An unusual range: above its end instead.
        (61000, 65000)
    }
}

fn free_port_tcp() -> Result<u16> {
    free_port(false)
}

fn free_port_udp() -> Result<u16> {
    free_port(true)
}

/// A TOML basic string: quoted, with backslashes and quotes escaped.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("path {} is not UTF-8", p.display()))
}

/// A unique `/dev/shm/ferry-test-<pid>-<n>-<nanos>` directory name for one agent's RAM.
/// Where the tests' direct-boot kernels live: the built test guest's directory.
fn boot_root() -> PathBuf {
    crate::repo_root()
        .map(|r| r.join("build").join("guest"))
        .unwrap_or_else(|_| PathBuf::from("/var/lib/ferry/boot"))
}

fn unique_shm_root() -> PathBuf {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    PathBuf::from(format!(
        "/dev/shm/ferry-test-{}-{n}-{nanos}",
        std::process::id()
    ))
}

/// A `ferryd` process run for a test, with its own config, state directory, RAM directory
/// and log. Dropping it kills the agent and every QEMU it started and removes its RAM
/// directory, so a failed test leaves nothing running.
#[derive(Debug)]
pub struct TestAgent {
    name: String,
    ferryd_bin: PathBuf,
    dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    state_dir: PathBuf,
    shm_root: PathBuf,
    ram_dir: PathBuf,
    storage_dir: PathBuf,
    grpc_addr: String,
    quic_addr: String,
    metrics_addr: String,
    identity: Identity,
    /// The operator identity its control clients use.
    operator: Identity,
    child: Option<Child>,
    /// `FAILPOINTS` for the next start (see ferry-agent's `failpoint.rs`).
    failpoints: Option<String>,
}

impl TestAgent {
    /// Writes `base_dir/NAME/ferryd.toml` (free loopback ports, RAM in
    /// `/dev/shm/ferry-test-<unique>/NAME`, state in `base_dir/NAME/state`, accelerator
    /// `accel`, TLS from `pki`'s files for `name`), starts `ferryd_bin --config FILE` with
    /// output appended to `base_dir/NAME/ferryd.log`, and waits until it answers `ListVms`.
    pub async fn start(
        ferryd_bin: &Path,
        name: &str,
        pki: &TestPki,
        base_dir: &Path,
        accel: &str,
    ) -> Result<TestAgent> {
        Self::start_with_config(ferryd_bin, name, pki, base_dir, accel, "").await
    }

    /// Like [`TestAgent::start`], with `extra_toml` appended to the config (new tables
    /// only, e.g. `[preflight]`).
    pub async fn start_with_config(
        ferryd_bin: &Path,
        name: &str,
        pki: &TestPki,
        base_dir: &Path,
        accel: &str,
        extra_toml: &str,
    ) -> Result<TestAgent> {
        Self::start_with_storage(ferryd_bin, name, pki, base_dir, accel, extra_toml, None).await
    }

    /// Like [`TestAgent::start_with_config`], with the agent's storage root (disk images)
    /// at `storage_root` instead of its own `images/` directory: two agents given the same
    /// directory share storage, like hosts mounting one NFS export.
    pub async fn start_with_storage(
        ferryd_bin: &Path,
        name: &str,
        pki: &TestPki,
        base_dir: &Path,
        accel: &str,
        extra_toml: &str,
        storage_root: Option<&Path>,
    ) -> Result<TestAgent> {
        let dir = base_dir.join(name);
        let state_dir = dir.join("state");
        let shm_root = unique_shm_root();
        let ram_dir = shm_root.join(name);
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        std::fs::create_dir_all(&ram_dir)
            .with_context(|| format!("creating {}", ram_dir.display()))?;
        let storage_dir = match storage_root {
            Some(p) => p.to_path_buf(),
            None => dir.join("images"),
        };
        std::fs::create_dir_all(&storage_dir)
            .with_context(|| format!("creating {}", storage_dir.display()))?;
        let grpc_addr = format!("127.0.0.1:{}", free_port_tcp()?);
        let quic_addr = format!("127.0.0.1:{}", free_port_udp()?);
        let metrics_addr = format!("127.0.0.1:{}", free_port_tcp()?);
        let tls = pki.files(name);
        let config = format!(
            "host_name = {}\n\
             grpc_listen = {}\n\
             quic_listen = {}\n\
             metrics_listen = {}\n\
             ram_dir = {}\n\
             state_dir = {}\n\
             accel = {}\n\
             storage_roots = [{}]\n\
             boot_roots = [{}]\n\
             qemu_binary = \"qemu-system-x86_64\"\n\
             \n\
             [tls]\n\
             ca = {}\n\
             cert = {}\n\
             key = {}\n\
             \n\
             [migration]\n\
             page_streams = 4\n\
             downtime_ms = 30\n\
             max_rounds = 30\n\
             prepare_timeout_s = 60\n\
             idle_timeout_s = 5\n",
            toml_str(name),
            toml_str(&grpc_addr),
            toml_str(&quic_addr),
            toml_str(&metrics_addr),
            toml_str(path_str(&ram_dir)?),
            toml_str(path_str(&state_dir)?),
            toml_str(accel),
            toml_str(path_str(&storage_dir)?),
            toml_str(path_str(&boot_root())?),
            toml_str(path_str(&tls.ca)?),
            toml_str(path_str(&tls.cert)?),
            toml_str(path_str(&tls.key)?),
        );
        let config = format!("{config}\n{extra_toml}\n");
        let config_path = dir.join("ferryd.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut agent = TestAgent {
            name: name.to_string(),
            ferryd_bin: ferryd_bin.to_path_buf(),
            log_path: dir.join("ferryd.log"),
            dir,
            config_path,
            state_dir,
            shm_root,
            ram_dir,
            storage_dir,
            grpc_addr,
            quic_addr,
            metrics_addr,
            identity: pki.identity(name)?,
            operator: pki.operator()?,
            child: None,
            failpoints: None,
        };
        // On failure `agent` is dropped here, which cleans up.
        agent.spawn_and_wait().await?;
        Ok(agent)
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let mut cmd = Command::new(&self.ferryd_bin);
        match &self.failpoints {
            Some(fp) => cmd.env("FAILPOINTS", fp),
            None => cmd.env_remove("FAILPOINTS"),
        };
        // A release file left from a previous hang would release the next one at once.
        let _ = std::fs::remove_file(self.state_dir.join("FAILPOINT-RELEASE"));
        let child = cmd
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {}", self.ferryd_bin.display()))?;
        self.child = Some(child);
        self.wait_ready(AGENT_START_TIMEOUT).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("checking the ferryd process")? {
                    self.child = None;
                    bail!(
                        "ferryd {} exited during start-up ({status}); log tail:\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
            }
            let attempt = async {
                let mut client = self.client().await?;
                client
                    .list_vms(ListVmsRequest {})
                    .await
                    .map_err(|s| anyhow!("ListVms: {}", s.message()))?;
                anyhow::Ok(())
            };
            let last_err = match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => "ListVms timed out".to_string(),
            };
            if Instant::now() >= deadline {
                bail!("ferryd {} did not answer gRPC at {} within {timeout:?} (last error: {last_err}); log tail:\n{}", self.name, self.grpc_addr, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The agent's host name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The agent's Prometheus endpoint, `host:port` (serves `GET /metrics`).
    pub fn metrics_addr(&self) -> String {
        self.metrics_addr.clone()
    }

    /// gRPC address, `127.0.0.1:PORT` (what `StartMigrationRequest.target` wants).
    pub fn grpc_addr(&self) -> String {
        self.grpc_addr.clone()
    }

    /// QUIC data-plane address, `127.0.0.1:PORT`.
    pub fn quic_addr(&self) -> String {
        self.quic_addr.clone()
    }

    /// The agent's TLS identity (also valid as a client identity).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// A control-API client connected as the PKI's operator.
    pub async fn client(&self) -> Result<FerryControlClient<Channel>> {
        connect_control(&self.grpc_addr, &self.operator).await
    }

    /// The process id of the running `ferryd`, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills `ferryd` with SIGKILL (a crash: its QEMUs keep running) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // An agent that already exited makes kill fail; reaping below still works.
            let _ = child.kill();
            child
                .wait()
                .with_context(|| format!("reaping ferryd {}", self.name))?;
        }
        Ok(())
    }

    /// Starts `ferryd` again with the same config (kills it first if it runs) and waits
    /// until it answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn_and_wait().await
    }

    /// Arms `FAILPOINTS` (e.g. `src.commit.sent=return(exit)`) from the next (re)start
    /// on; `None` disarms. Needs a `ferryd` built with the `failpoints` feature.
    pub fn set_failpoints(&mut self, spec: Option<&str>) {
        self.failpoints = spec.map(str::to_string);
    }

    /// Releases a failpoint that hangs (`return(hang)`).
    pub fn release_failpoint(&self) -> Result<()> {
        std::fs::write(self.state_dir.join("FAILPOINT-RELEASE"), b"")
            .with_context(|| format!("releasing the failpoint of {}", self.name))
    }

    /// Waits until the log says failpoint `name` fired, or the agent exited (an `exit`
    /// failpoint kills it). Returns whether it fired.
    pub async fn wait_failpoint(&mut self, name: &str, timeout: Duration) -> bool {
        let needle = format!("failpoint {name} hit");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let log = std::fs::read(&self.log_path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            if log.contains(&needle) {
                return true;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return log.contains(&needle);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Waits up to `timeout` for the agent process to exit (a failpoint's self-kill);
    /// returns whether it did.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.running() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        !self.running()
    }

    /// Defines `spec`, starts it and waits (up to 120 s) for its workload's `FERRY-READY`.
    /// A failed start says why, with the agent's log.
    pub async fn define_and_boot(
        &self,
        spec: ferry_api::v1::VmSpec,
    ) -> Result<ferry_api::v1::VmInfo> {
        let name = spec.name.clone();
        let mut c = self.client().await?;
        c.define_vm(ferry_api::v1::DefineVmRequest { spec: Some(spec) })
            .await
            .map_err(|s| anyhow!("define VM {name}: {}", s.message()))?;
        let info = c
            .start_vm(ferry_api::v1::VmRef { name: name.clone() })
            .await
            .map_err(|s| {
                anyhow!(
                    "start VM {name}: {}\nagent log:\n{}",
                    s.message(),
                    self.log_tail()
                )
            })?
            .into_inner();
        crate::wait_for_log_line(
            Path::new(&info.console_log),
            "FERRY-READY",
            Duration::from_secs(120),
        )
        .await
        .with_context(|| format!("workload of VM {name} ready"))?;
        Ok(info)
    }

    /// The guest's own check of every page (and disk block) it wrote, asked over the
    /// console of `vm`'s QEMU on this agent's host (not through the agent).
    pub async fn guest_check(&self, vm: &str) -> Result<crate::CheckResult> {
        let sock = self.state_dir.join("run").join(vm).join("console.sock");
        let mut con = crate::GuestConsole::connect(&sock, Duration::from_secs(10)).await?;
        let line = con
            .command("check", "FERRY-CHECK", Duration::from_secs(120))
            .await?;
        crate::parse_check(&line)
    }

    /// What the QEMU of `vm` on this agent's host says about itself, asked on its
    /// observer QMP socket (`qmp-observe.sock`, which the agent never holds): the test's
    /// own look at the QEMU, not the agent's report.
    pub async fn observe_qemu(&self, vm: &str) -> QemuObserved {
        let sock = self.state_dir.join("run").join(vm).join("qmp-observe.sock");
        if !sock.exists() {
            return QemuObserved::NoQemu;
        }
        let ask = async {
            let qmp = ferry_qmp::QmpClient::connect(&sock).await.ok()?;
            qmp.query_status().await.ok()
        };
        match tokio::time::timeout(Duration::from_secs(5), ask).await {
            Ok(Some(st)) if st.running => QemuObserved::Running,
            Ok(Some(st)) => QemuObserved::Stopped(st.status),
            // A socket nobody listens on: the QEMU is gone.
            _ => QemuObserved::NoQemu,
        }
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP` to freeze it: a peer that stops answering,
    /// network and all; `libc::SIGCONT` to thaw it) to the running `ferryd`.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid().and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Whether the `ferryd` process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last 60 lines of `ferryd.log`.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Path of `ferryd.log`.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Path of the agent's `ferryd.toml`.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The agent's RAM directory (`/dev/shm/ferry-test-<unique>/NAME`).
    pub fn ram_dir(&self) -> &Path {
        &self.ram_dir
    }

    /// The agent's storage root (where its disk images may live).
    pub fn storage_dir(&self) -> &Path {
        &self.storage_dir
    }

    /// The agent's state directory (`base_dir/NAME/state`).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The agent's directory (`base_dir/NAME`: config, log, state).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Process ids of QEMUs (or any process) whose command line mentions this agent's
    /// state or RAM directory: the VMs it started.
    pub fn qemu_pids(&self) -> Vec<u32> {
        let needles: Vec<String> = [&self.state_dir, &self.ram_dir]
            .iter()
            .map(|p| format!("{}/", p.display()))
            .collect();
        let me = std::process::id();
        let agent = self.pid();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != me && Some(pid) != agent)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|raw| {
                        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
                        needles.iter().any(|n| cmdline.contains(n.as_str()))
                    })
                    .unwrap_or(false)
            })
            .collect()
    }

    /// SIGKILLs the agent and its QEMUs, waits (briefly) for them to die and removes the
    /// RAM directory. Called by `Drop`; safe to call twice.
    pub fn cleanup(&mut self) {
        let _ = self.kill();
        let pids = self.qemu_pids();
        for &pid in &pids {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && pids.iter().any(|&pid| process_alive(pid)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&self.shm_root);
    }
}

/// A QEMU as it answers on its observer QMP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuObserved {
    /// vCPUs running: the guest runs here.
    Running,
    /// Alive, guest not running; QEMU's run state (`paused`, `postmigrate`, `inmigrate`...).
    Stopped(String),
    /// No QEMU answers for this VM here.
    NoQemu,
}

/// Whether `pid` exists and is not a zombie (a killed QEMU whose parent agent is gone stays
/// a zombie until init reaps it).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Follows a migration's `WatchMigration` stream to its end and returns the last status.
pub async fn watch_to_end(
    c: &mut FerryControlClient<Channel>,
    id: &str,
) -> Result<ferry_api::v1::MigrationStatus> {
    let mut stream = c
        .watch_migration(ferry_api::v1::MigrationRef { id: id.into() })
        .await
        .with_context(|| format!("watching migration {id}"))?
        .into_inner();
    let mut last = None;
    while let Some(s) = stream
        .message()
        .await
        .with_context(|| format!("status of migration {id}"))?
    {
        last = Some(s);
    }
    last.ok_or_else(|| anyhow!("migration {id}: the watch ended without a status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str("a"), "\"a\"");
        assert_eq!(toml_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn pki_files_and_identities() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = TestPki::new(dir.path(), &["a", "b"]).expect("pki");
        assert!(pki.files("b").key.ends_with("b.key"));
        pki.identity("a").expect("a");
        assert!(pki.identity("c").is_err());
    }

    #[test]
    fn process_states() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }

    /// Drop kills the agent process and every process whose command line names the state
    /// directory. Test doubles: `sh` blocked in its `read` builtin (no child process to
    /// orphan) stands in for ferryd and for a QEMU.
    #[test]
    fn drop_kills_agent_and_its_qemus() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = TestPki::new(&dir.path().join("pki"), &["a"]).expect("pki");
        let state_dir = dir.path().join("a/state");
        let shm_root = unique_shm_root();
        let ram_dir = shm_root.join("a");
        std::fs::create_dir_all(&ram_dir).expect("ram dir");
        std::fs::write(ram_dir.join("vm.ram"), b"x").expect("ram file");
        let idle = |extra: &[&str]| {
            Command::new("sh")
                .args(["-c", "read x"])
                .args(extra)
                .stdin(Stdio::piped())
                .spawn()
                .expect("spawn")
        };
        let fake_agent = idle(&[]);
        let agent_pid = fake_agent.id();
        // `sh -c CMD NAME`: NAME becomes $0 and shows in /proc/PID/cmdline, like QEMU's
        // `-qmp unix:STATE/run/vm/qmp.sock`.
        let marker = format!("{}/run/vm/qmp.sock", state_dir.display());
        let mut fake_qemu = idle(&[&marker]);
        let qemu_pid = fake_qemu.id();
        let agent = TestAgent {
            name: "a".into(),
            ferryd_bin: "/bin/false".into(),
            dir: dir.path().join("a"),
            config_path: dir.path().join("a/ferryd.toml"),
            log_path: dir.path().join("a/ferryd.log"),
            state_dir,
            shm_root: shm_root.clone(),
            ram_dir,
            storage_dir: dir.path().join("a/images"),
            grpc_addr: "127.0.0.1:1".into(),
            quic_addr: "127.0.0.1:1".into(),
            metrics_addr: "127.0.0.1:1".into(),
            identity: pki.identity("a").expect("identity"),
            operator: pki.operator().expect("operator"),
            child: Some(fake_agent),
            failpoints: None,
        };
        // A just-spawned process can take a moment to show its new command line under
        // load (seen once on a busy CI run): look again for up to 2 s.
        let mut found = agent.qemu_pids();
        for _ in 0..100 {
            if found == vec![qemu_pid] {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            found = agent.qemu_pids();
        }
        assert_eq!(found, vec![qemu_pid]);
        drop(agent);
        // The fake QEMU is our child: reap it to see how it ended.
        let status = fake_qemu.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!process_alive(agent_pid), "fake agent killed and reaped");
        assert!(!shm_root.exists(), "RAM directory removed");
    }

    /// Against a real ferryd: `FERRYD=target/debug/ferryd cargo test -p ferry-testkit -- --ignored`.
    #[tokio::test]
    #[ignore = "needs a built ferryd: set FERRYD=path/to/ferryd"]
    async fn real_ferryd_start_kill_restart() {
        let Some(bin) = std::env::var_os("FERRYD") else {
            panic!("set FERRYD to the ferryd binary")
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = TestPki::new(&dir.path().join("pki"), &["a"]).expect("pki");
        let mut a = TestAgent::start(Path::new(&bin), "a", &pki, dir.path(), "tcg")
            .await
            .expect("start");
        let vms = a
            .client()
            .await
            .expect("client")
            .list_vms(ListVmsRequest {})
            .await
            .expect("list");
        assert!(vms.into_inner().vms.is_empty());
        a.kill().expect("kill");
        assert!(a.client().await.is_err(), "killed agent still answers");
        a.restart().await.expect("restart");
        a.client().await.expect("client after restart");
        let ram = a.ram_dir().to_path_buf();
        drop(a);
        assert!(!ram.exists());
    }

    /// A failed start (the "agent" exits at once) reports the log and cleans up after itself.
    #[tokio::test]
    async fn failed_start_reports_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = TestPki::new(&dir.path().join("pki"), &["a"]).expect("pki");
        let e = TestAgent::start(Path::new("/bin/false"), "a", &pki, dir.path(), "tcg")
            .await
            .expect_err("fails");
        assert!(e.to_string().contains("exited during start-up"), "{e:#}");
        let cfg =
            std::fs::read_to_string(dir.path().join("a/ferryd.toml")).expect("config written");
        assert!(
            cfg.contains("host_name = \"a\"")
                && cfg.contains("accel = \"tcg\"")
                && cfg.contains("[migration]"),
            "{cfg}"
        );
        let ram_dir = cfg
            .lines()
            .find_map(|l| l.strip_prefix("ram_dir = "))
            .expect("ram_dir")
            .trim_matches('"')
            .to_string();
        assert!(
            ram_dir.starts_with("/dev/shm/ferry-test-") && ram_dir.ends_with("/a"),
            "{ram_dir}"
        );
        assert!(!Path::new(&ram_dir).exists(), "RAM directory removed");
    }
}
