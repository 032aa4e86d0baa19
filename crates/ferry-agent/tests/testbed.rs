//! A live migration across the testbed's emulated WAN (project issue 4): `testbed/up.sh`
//! makes two hosts, network namespaces `<prefix>-h1` and `<prefix>-h2` joined by
//! ferry-linkem at 1 Gbit/s and 20 ms RTT (profile `wan`), with a ferryd in each; a small
//! guest boots on h1 and moves to h2 with lz4. `testbed/down.sh` always runs at the end,
//! also when an assertion fails.
//!
//! The 10.77.0.0/24 addresses exist only inside the namespaces, so the test talks gRPC from
//! a thread that joined h1's network namespace (`setns`), with a runtime of its own. Files
//! and the guests' unix console sockets are shared by every namespace.
//!
//! Needs root (namespaces, TUN devices), the test guest (`scripts/build-guest.sh`) and the
//! `ferryctl` and `ferry-linkem` binaries next to `ferryd` (`scripts/test.sh` builds the
//! whole workspace before testing). The namespace prefix is `ft<pid>`, so it never meets
//! a developer's own testbed (default prefix `ferry`).

use ferry_api::v1 as pb;
use ferry_api::v1::ferry_control_client::FerryControlClient;
use ferry_testkit::{
    connect_control, guest_artifacts, parse_check, parse_pong, repo_root, wait_for_log_line,
    workload_cmdline, GuestConsole,
};
use ferry_transport::pki::{host_files, Identity};
use std::collections::HashMap;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const VM: &str = "tb01";
const VM_MIB: u64 = 192;
const WORKLOAD_MIB: u64 = 48;
const MIB: f64 = (1u64 << 20) as f64;

/// A testbed brought up by `testbed/up.sh`; dropping it runs `testbed/down.sh`.
struct Testbed {
    root: PathBuf,
    prefix: String,
    /// `None` once kept for inspection (after a failure) or torn down.
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    env: HashMap<String, String>,
    down_done: bool,
}

fn binaries() -> (PathBuf, PathBuf, PathBuf) {
    let ferryd = PathBuf::from(env!("CARGO_BIN_EXE_ferryd"));
    let bin_dir = ferryd
        .parent()
        .expect("ferryd has a directory")
        .to_path_buf();
    let ferryctl = bin_dir.join("ferryctl");
    let linkem = bin_dir.join("ferry-linkem");
    for b in [&ferryctl, &linkem] {
        assert!(
            b.is_file(),
            "{} is missing: the testbed test needs ferryctl and ferry-linkem next to ferryd. Build the \
             workspace first (`cargo build --workspace --all-targets`, as scripts/test.sh does) or \
             `cargo build -p ferryctl -p ferry-linkem`",
            b.display()
        );
    }
    (ferryd, ferryctl, linkem)
}

/// Parses `testbed.env` (`KEY=value` or `KEY="value"` lines, `#` comments).
fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

fn output_text(o: &Output) -> String {
    format!(
        "exit {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tail(path: &Path, lines: usize) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Testbed {
    /// Runs `testbed/up.sh --hosts 2 --profile wan` with ferryd in both hosts (blocking).
    fn up() -> Testbed {
        Self::up_with(2, "wan", &[])
    }

    /// `testbed/up.sh --hosts N --profile P` with ferryd in every host and `env` for
    /// up.sh (e.g. `FERRY_TB_QEMU_H3`), blocking.
    fn up_with(hosts: u32, profile: &str, env: &[(&str, String)]) -> Testbed {
        let root = repo_root().expect("repository root");
        let (ferryd, ferryctl, linkem) = binaries();
        let prefix = format!("ft{}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("ferry-tb-")
            .tempdir()
            .expect("tempdir");
        let dir_path = dir.path().to_path_buf();
        // The guard exists before up.sh runs: whatever happens next, down.sh runs.
        let mut tb = Testbed {
            root,
            prefix,
            dir: Some(dir),
            dir_path,
            env: HashMap::new(),
            down_done: false,
        };
        let out = Command::new("bash")
            .arg(tb.root.join("testbed/up.sh"))
            .args(["--hosts", &hosts.to_string(), "--profile", profile])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .arg("--ferryd")
            .arg(&ferryd)
            .arg("--ferryctl")
            .arg(&ferryctl)
            .arg("--linkem")
            .arg(&linkem)
            .arg("--dir")
            .arg(&tb.dir_path)
            .env("FERRY_TB_PREFIX", &tb.prefix)
            .current_dir(&tb.root)
            .output()
            .expect("running testbed/up.sh");
        assert!(
            out.status.success(),
            "testbed/up.sh failed (is this root?): {}",
            output_text(&out)
        );
        let env_file = tb.dir_path.join("testbed.env");
        let text = std::fs::read_to_string(&env_file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", env_file.display()));
        tb.env = parse_env(&text);
        assert_eq!(
            tb.var("FERRY_TB_PREFIX"),
            tb.prefix,
            "testbed.env names another prefix"
        );
        tb
    }

    fn var(&self, key: &str) -> String {
        self.env
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("testbed.env has no {key}: {:?}", self.env))
    }

    fn ferryd_log(&self, host: u32) -> PathBuf {
        self.dir_path.join(format!("h{host}/ferryd.log"))
    }

    /// `testbed/down.sh --dir DIR` (blocking); once.
    fn down(&mut self) -> Option<Output> {
        if self.down_done {
            return None;
        }
        self.down_done = true;
        let out = Command::new("bash")
            .arg(self.root.join("testbed/down.sh"))
            .arg("--dir")
            .arg(&self.dir_path)
            .env("FERRY_TB_PREFIX", &self.prefix)
            .current_dir(&self.root)
            .output();
        match out {
            Ok(o) => Some(o),
            Err(e) => {
                eprintln!("testbed: cannot run testbed/down.sh: {e}");
                None
            }
        }
    }

    /// What is left of this testbed: namespaces, RAM directory, processes naming it.
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        if let Ok(o) = Command::new("ip").args(["netns", "list"]).output() {
            for l in String::from_utf8_lossy(&o.stdout).lines() {
                if l.starts_with(&format!("{}-h", self.prefix)) {
                    left.push(format!("namespace {l}"));
                }
            }
        }
        let ram_root = format!("/dev/shm/{}-tb", self.prefix);
        if Path::new(&ram_root).exists() {
            left.push(ram_root.clone());
        }
        let dir = self.dir_path.display().to_string();
        let linkem_host = format!("--host {}-h", self.prefix);
        let me = std::process::id().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
                continue;
            }
            let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(&dir) || cmd.contains(&ram_root) || cmd.contains(&linkem_host) {
                left.push(format!("process {pid}: {}", cmd.trim()));
            }
        }
        left
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if failing {
            let hosts: u32 = self
                .env
                .get("FERRY_TB_HOSTS")
                .and_then(|h| h.parse().ok())
                .unwrap_or(2);
            for h in 1..=hosts {
                eprintln!(
                    "--- {} (tail)\n{}",
                    self.ferryd_log(h).display(),
                    tail(&self.ferryd_log(h), 30)
                );
            }
        }
        if let Some(o) = self.down() {
            if !o.status.success() {
                eprintln!("testbed: testbed/down.sh failed: {}", output_text(&o));
            }
        }
        if failing {
            // Keep configs and logs of a failed run.
            if let Some(d) = self.dir.take() {
                eprintln!("testbed: logs kept in {}", d.keep().display());
            }
        }
    }
}

/// Runs `f`'s future on a new thread inside network namespace `netns`, on a runtime of
/// its own: every socket it opens lives in that namespace.
fn in_netns<F, Fut, T>(netns: &str, f: F) -> std::thread::JoinHandle<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let path = format!("/var/run/netns/{netns}");
    std::thread::Builder::new()
        .name(format!("in-{netns}"))
        .spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: setns on an fd we own; it only changes this thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(f())
        })
        .expect("spawning the namespace thread")
}

/// What the scenario needs from testbed.env.
struct Setup {
    h1_grpc: String,
    h2_grpc: String,
    h1_netns: String,
    h2_netns: String,
    pki_dir: PathBuf,
    linkem_pid: i32,
    linkem_stats: PathBuf,
    h1_log: PathBuf,
    h2_log: PathBuf,
}

struct Outcome {
    stats: pb::MigrationStats,
    link_bytes: u64,
}

/// Bytes ferry-linkem forwarded from `from` to `to` and its uptime, from its stats file.
fn link_counters(path: &Path, from: &str, to: &str) -> Option<(u64, f64)> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let uptime = v.get("uptime_s")?.as_f64()?;
    let link = v
        .get("links")?
        .as_array()?
        .iter()
        .find(|l| l["from"] == from && l["to"] == to)?;
    Some((link.get("forwarded_bytes")?.as_u64()?, uptime))
}

/// Fresh counters: SIGUSR1 makes ferry-linkem rewrite its stats file.
async fn link_bytes_now(s: &Setup) -> u64 {
    let before = link_counters(&s.linkem_stats, &s.h1_netns, &s.h2_netns)
        .map(|c| c.1)
        .unwrap_or(-1.0);
    // SAFETY: sending a signal to the testbed's ferry-linkem process.
    unsafe { libc::kill(s.linkem_pid, libc::SIGUSR1) };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some((bytes, uptime)) = link_counters(&s.linkem_stats, &s.h1_netns, &s.h2_netns) {
            if uptime > before {
                return bytes;
            }
        }
        assert!(
            Instant::now() < deadline,
            "ferry-linkem did not rewrite {}",
            s.linkem_stats.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn watch_to_end(c: &mut FerryControlClient<Channel>, id: &str) -> pb::MigrationStatus {
    let mut stream = c
        .watch_migration(pb::MigrationRef { id: id.into() })
        .await
        .expect("watch")
        .into_inner();
    let mut last = None;
    while let Some(s) = stream.next().await {
        last = Some(s.expect("status"));
    }
    last.expect("at least one status")
}

async fn console(info: &pb::VmInfo) -> GuestConsole {
    GuestConsole::connect(Path::new(&info.console_socket), Duration::from_secs(10))
        .await
        .expect("guest console")
}

async fn guest_writes(info: &pb::VmInfo) -> u64 {
    let line = console(info)
        .await
        .command("ping", "FERRY-PONG", Duration::from_secs(30))
        .await
        .expect("pong");
    parse_pong(&line).expect("parse pong")
}

fn pid_alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// Runs inside h1's network namespace.
async fn scenario(s: Setup) -> Outcome {
    let files = host_files(&s.pki_dir, "operator");
    let id = Identity::load(&files.ca, &files.cert, &files.key)
        .expect("operator identity written by up.sh");
    let mut c1 = connect_control(&s.h1_grpc, &id)
        .await
        .expect("connect to h1's ferryd");

    let g = guest_artifacts().expect("guest artifacts: run scripts/build-guest.sh");
    let spec = pb::VmSpec {
        name: VM.into(),
        vcpus: 1,
        memory_mib: VM_MIB,
        kernel: g.kernel.display().to_string(),
        initrd: g.initrd.display().to_string(),
        cmdline: workload_cmdline(WORKLOAD_MIB, 5.0, "realistic", 1),
        ..Default::default()
    };
    c1.define_vm(pb::DefineVmRequest { spec: Some(spec) })
        .await
        .expect("define on h1");
    let src = c1
        .start_vm(pb::VmRef { name: VM.into() })
        .await
        .expect("start on h1")
        .into_inner();
    wait_for_log_line(
        Path::new(&src.console_log),
        "FERRY-READY",
        Duration::from_secs(120),
    )
    .await
    .expect("guest workload ready on h1");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes_before = guest_writes(&src).await;
    let link_before = link_bytes_now(&s).await;

    let m = c1
        .start_migration(pb::StartMigrationRequest {
            vm: VM.into(),
            target: s.h2_grpc.clone(),
            compress: "lz4".into(),
            // Preflight's convergence estimate can be pessimistic on a shaped link.
            force: true,
            ..Default::default()
        })
        .await
        .expect("start migration")
        .into_inner();
    let end = tokio::time::timeout(Duration::from_secs(60), watch_to_end(&mut c1, &m.id))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "migration {} did not end within 60 s\nh1:\n{}",
                m.id,
                tail(&s.h1_log, 30)
            )
        });
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "migration failed: {end:?}\nh1 log:\n{}\nh2 log:\n{}",
        tail(&s.h1_log, 30),
        tail(&s.h2_log, 30)
    );
    let stats = end.stats.clone().expect("stats");

    // The VM left h1…
    let gone = c1
        .get_vm(pb::VmRef { name: VM.into() })
        .await
        .expect_err("VM must be gone from h1");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert!(!pid_alive(src.pid), "source QEMU still alive");
    // …and runs on h2 (asked across the emulated link), every page it wrote intact.
    let mut c2 = connect_control(&s.h2_grpc, &id)
        .await
        .expect("connect to h2's ferryd");
    let dst = c2
        .get_vm(pb::VmRef { name: VM.into() })
        .await
        .expect("VM on h2")
        .into_inner();
    assert_eq!(dst.state, pb::VmState::Running as i32, "{dst:?}");
    assert!(pid_alive(dst.pid), "target QEMU not running");
    let line = console(&dst)
        .await
        .command("check", "FERRY-CHECK", Duration::from_secs(60))
        .await
        .expect("check reply");
    let check = parse_check(&line).expect("parse check");
    assert!(check.ok, "guest memory check failed on h2: {line}");
    let writes_after = guest_writes(&dst).await;
    assert!(
        writes_after > writes_before,
        "guest keeps running on h2 ({writes_after} > {writes_before})"
    );

    let link_bytes = link_bytes_now(&s).await.saturating_sub(link_before);
    c2.stop_vm(pb::StopVmRequest {
        name: VM.into(),
        force: true,
    })
    .await
    .expect("stop on h2");
    Outcome { stats, link_bytes }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_across_emulated_wan() {
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    let mut tb = match tokio::task::spawn_blocking(Testbed::up).await {
        Ok(tb) => tb,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let up_s = t0.elapsed().as_secs_f64();
    let setup = Setup {
        h1_grpc: tb.var("FERRY_TB_H1_GRPC"),
        h2_grpc: tb.var("FERRY_TB_H2_GRPC"),
        h1_netns: tb.var("FERRY_TB_H1_NETNS"),
        h2_netns: tb.var("FERRY_TB_H2_NETNS"),
        pki_dir: PathBuf::from(tb.var("FERRY_TB_PKI_DIR")),
        linkem_pid: tb.var("FERRY_TB_LINKEM_PID").parse().expect("linkem pid"),
        linkem_stats: PathBuf::from(tb.var("FERRY_TB_LINKEM_STATS")),
        h1_log: tb.ferryd_log(1),
        h2_log: tb.ferryd_log(2),
    };
    assert!(setup.h1_netns.starts_with(&tb.prefix), "{}", setup.h1_netns);
    let h1_netns = setup.h1_netns.clone();
    let handle = in_netns(&h1_netns, move || scenario(setup));
    let outcome = match tokio::task::spawn_blocking(move || handle.join())
        .await
        .expect("join")
    {
        Ok(o) => o,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    let st = &outcome.stats;
    eprintln!(
        "testbed wan (1 Gbit/s, 20 ms RTT) lz4, {VM_MIB} MiB VM, {WORKLOAD_MIB} MiB workload at 5 MiB/s: \
         total {} ms, downtime {} ms, rounds {}, pages {:.1} MiB, wire {:.1} MiB (ratio {:.2}), \
         device state {:.2} MiB, link h1->h2 {:.1} MiB",
        st.elapsed_ms,
        st.downtime_ms,
        st.rounds,
        st.page_bytes as f64 / MIB,
        st.wire_bytes as f64 / MIB,
        st.compression_ratio,
        st.device_state_bytes as f64 / MIB,
        outcome.link_bytes as f64 / MIB,
    );

    // Plausible numbers: the workload's non-zero pages (70% of 48 MiB) at least were sent,
    // lz4 shrank them (but not beyond belief), and everything ferry counts as sent crossed
    // the emulated link, no faster than its 1 Gbit/s.
    assert_eq!(st.codec, "lz4", "{st:?}");
    assert_eq!(st.ram_digest.len(), 32, "RAM fingerprints compared: {st:?}");
    assert!(st.device_state_bytes > 0, "{st:?}");
    assert!(
        st.page_bytes >= (WORKLOAD_MIB << 20) / 2,
        "pages sent: {st:?}"
    );
    assert!(st.page_bytes <= (VM_MIB << 20) * 3, "pages sent: {st:?}");
    assert!(
        st.compression_ratio > 1.2,
        "lz4 on the realistic mix: {st:?}"
    );
    assert!(st.wire_bytes < st.page_bytes, "compressed: {st:?}");
    assert!(
        st.wire_bytes >= st.page_bytes / 4,
        "lz4 does not shrink this mix 4x: {st:?}"
    );
    assert!(
        outcome.link_bytes >= st.wire_bytes,
        "only {} bytes crossed h1->h2, ferry counted {} wire bytes",
        outcome.link_bytes,
        st.wire_bytes
    );
    let gbit_s = st.wire_bytes as f64 * 8.0 / (st.elapsed_ms.max(1) as f64 / 1000.0) / 1e9;
    assert!(
        gbit_s <= 1.05,
        "{gbit_s:.2} Gbit/s average over a 1 Gbit/s link: {st:?}"
    );
    assert!(
        st.elapsed_ms > 0 && st.downtime_ms > 0 && st.downtime_ms < st.elapsed_ms,
        "{st:?}"
    );

    let t_down = Instant::now();
    let down = tokio::task::spawn_blocking(move || {
        let out = tb.down().expect("down.sh ran");
        (tb, out)
    })
    .await
    .expect("join");
    let (tb, out) = down;
    assert!(
        out.status.success(),
        "testbed/down.sh failed: {}",
        output_text(&out)
    );
    let left = tb.leftovers();
    assert!(left.is_empty(), "testbed/down.sh left: {left:?}");
    eprintln!(
        "testbed: up {up_s:.1} s, down {:.1} s, test {:.1} s in all",
        t_down.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// Drives one guest's move to `to` the way an orchestrator would: a refusal because a host
/// is at its migration limit (RESOURCE_EXHAUSTED on the source, or the target's Prepare
/// refused) is retried after a pause; anything else must complete. Returns the refusals.
async fn move_guest(mut c: FerryControlClient<Channel>, vm: &'static str, to: String) -> u32 {
    let mut refusals = 0;
    for _ in 0..240 {
        let req = pb::StartMigrationRequest {
            vm: vm.into(),
            target: to.clone(),
            compress: "lz4".into(),
            force: true,
            ..Default::default()
        };
        let id = match c.start_migration(req).await {
            Ok(r) => r.into_inner().id,
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                refusals += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => panic!("starting the migration of {vm}: {e:?}"),
        };
        let end = watch_to_end(&mut c, &id).await;
        if end.phase == pb::MigrationPhase::Completed as i32 {
            return refusals;
        }
        assert!(
            end.error.contains("max_incoming"),
            "migration of {vm} to {to} failed: {end:?}"
        );
        refusals += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{vm} never got a migration slot");
}

/// Runs inside h1's network namespace: 4 guests on 3 hosts (h3 runs QEMU 7.2), all moved
/// at once under a limit of one outgoing and one incoming migration per host.
async fn four_guests_three_hosts(grpc: [String; 3], pki_dir: PathBuf) -> (u32, String) {
    let files = host_files(&pki_dir, "operator");
    let id = Identity::load(&files.ca, &files.cert, &files.key).expect("operator identity");
    let mut cs = Vec::new();
    for a in &grpc {
        cs.push(connect_control(a, &id).await.expect("connect"));
    }
    // h3 really runs 7.2: its agent's host facts, asked as a peer (h1's identity).
    let h1 = host_files(&pki_dir, "h1");
    let h1_id = Identity::load(&h1.ca, &h1.cert, &h1.key).expect("h1 identity");
    let chan = ferry_agent::tls::connect(&grpc[2], &h1_id)
        .await
        .expect("peer channel to h3");
    let facts = ferry_api::v1::ferry_peer_client::FerryPeerClient::new(chan)
        .host_facts(pb::HostFactsRequest {})
        .await
        .expect("host facts")
        .into_inner();
    let g = guest_artifacts().expect("guest artifacts: run scripts/build-guest.sh");
    let guests: [(&'static str, usize, usize); 4] =
        [("g1", 0, 1), ("g2", 0, 2), ("g3", 1, 2), ("g4", 2, 0)];
    let mut consoles = Vec::new();
    for (i, (vm, from, _)) in guests.iter().enumerate() {
        let spec = pb::VmSpec {
            name: (*vm).into(),
            vcpus: 1,
            memory_mib: 160,
            kernel: g.kernel.display().to_string(),
            initrd: g.initrd.display().to_string(),
            cmdline: workload_cmdline(32, 2.0, "realistic", 20 + i as u64),
            ..Default::default()
        };
        let c = &mut cs[*from];
        c.define_vm(pb::DefineVmRequest { spec: Some(spec) })
            .await
            .expect("define");
        let info = c
            .start_vm(pb::VmRef { name: (*vm).into() })
            .await
            .expect("start")
            .into_inner();
        consoles.push(info.console_log);
    }
    for log in &consoles {
        wait_for_log_line(Path::new(log), "FERRY-READY", Duration::from_secs(180))
            .await
            .expect("guest ready");
    }
    let mut set = tokio::task::JoinSet::new();
    for (vm, from, to) in guests {
        set.spawn(move_guest(cs[from].clone(), vm, grpc[to].clone()));
    }
    let mut refusals = 0;
    while let Some(r) = set.join_next().await {
        refusals += r.expect("mover");
    }
    for (vm, from, to) in guests {
        let mut c = cs[to].clone();
        let info = c
            .get_vm(pb::VmRef { name: vm.into() })
            .await
            .unwrap_or_else(|e| panic!("{vm} on h{}: {e:?}", to + 1))
            .into_inner();
        assert_eq!(info.state, pb::VmState::Running as i32, "{vm}: {info:?}");
        let line = console(&info)
            .await
            .command("check", "FERRY-CHECK", Duration::from_secs(120))
            .await
            .expect("check");
        assert!(
            parse_check(&line).expect("parse").ok,
            "{vm} memory check on h{}: {line}",
            to + 1
        );
        let gone = cs[from]
            .get_vm(pb::VmRef { name: vm.into() })
            .await
            .expect_err("gone from the source");
        assert_eq!(
            gone.code(),
            tonic::Code::NotFound,
            "{vm} still on h{}",
            from + 1
        );
    }
    (refusals, facts.qemu_version)
}

/// Four guests move among three testbed hosts at once, with the per-host limit in force
/// (one outgoing, one incoming); h3 runs Debian bookworm's QEMU 7.2 while h1 and h2 run
/// 10.0, so moves 10.0 -> 7.2 and 7.2 -> 10.0 are part of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_guests_among_three_hosts_one_on_qemu_72() {
    let _serial = SERIAL.lock().await;
    let root = repo_root().expect("repository root");
    let out = Command::new("bash")
        .arg(root.join("scripts/install-qemu72.sh"))
        .output()
        .expect("install-qemu72.sh");
    assert!(
        out.status.success(),
        "scripts/install-qemu72.sh: {}",
        output_text(&out)
    );
    let qemu72 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let env = [
        ("FERRY_TB_QEMU_H3", qemu72),
        (
            "FERRY_TB_MIGRATION_EXTRA",
            "max_outgoing = 1\nmax_incoming = 1".to_string(),
        ),
    ];
    let t0 = Instant::now();
    let mut tb = match tokio::task::spawn_blocking(move || Testbed::up_with(3, "lan", &env)).await {
        Ok(tb) => tb,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let grpc = [
        tb.var("FERRY_TB_H1_GRPC"),
        tb.var("FERRY_TB_H2_GRPC"),
        tb.var("FERRY_TB_H3_GRPC"),
    ];
    let pki_dir = PathBuf::from(tb.var("FERRY_TB_PKI_DIR"));
    let netns = tb.var("FERRY_TB_H1_NETNS");
    let handle = in_netns(&netns, move || four_guests_three_hosts(grpc, pki_dir));
    let (refusals, h3_qemu) = match tokio::task::spawn_blocking(move || handle.join())
        .await
        .expect("join")
    {
        Ok(o) => o,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    eprintln!("3 hosts, 4 guests moved at once in {:.0} s; {refusals} refusals at the limit; h3 runs QEMU {h3_qemu}", t0.elapsed().as_secs_f64());
    assert!(
        h3_qemu.starts_with("7.2"),
        "h3 runs QEMU {h3_qemu}, not 7.2"
    );
    assert!(
        refusals >= 1,
        "two guests leave h1 at once under max_outgoing = 1: at least one refusal"
    );
    let out = tokio::task::spawn_blocking(move || tb.down())
        .await
        .expect("join")
        .expect("down.sh ran");
    assert!(
        out.status.success(),
        "testbed/down.sh failed: {}",
        output_text(&out)
    );
}

#[test]
fn parses_testbed_env() {
    let env = parse_env("# comment\nFERRY_TB_PREFIX=ft1\nFERRY_TB_NETNS=\"ft1-h1 ft1-h2\"\n\nFERRY_TB_H1_GRPC=10.77.0.1:7701\n");
    assert_eq!(env["FERRY_TB_PREFIX"], "ft1");
    assert_eq!(env["FERRY_TB_NETNS"], "ft1-h1 ft1-h2");
    assert_eq!(env["FERRY_TB_H1_GRPC"], "10.77.0.1:7701");
}

/// `ferryctl bench` on the testbed's wan link (`FERRY_LONG=1`): a guest on h1 moves to h2
/// and back once per codec, each move verified by the agents; the command's JSON must
/// hold every move, and the guest must end on h1 with its memory intact (asked of both
/// agents and of the guest, not of the benchmark's report). The table is kept in
/// `target/ferryctl-bench-wan.md` for benches/RESULTS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferryctl_bench_on_the_testbed() {
    if std::env::var("FERRY_LONG").ok().as_deref() != Some("1") {
        eprintln!("ferryctl_bench_on_the_testbed: long suite only (FERRY_LONG=1)");
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut tb = match tokio::task::spawn_blocking(Testbed::up).await {
        Ok(tb) => tb,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let (h1, h2) = (tb.var("FERRY_TB_H1_GRPC"), tb.var("FERRY_TB_H2_GRPC"));
    let pki_dir = PathBuf::from(tb.var("FERRY_TB_PKI_DIR"));
    let netns = tb.var("FERRY_TB_H1_NETNS");
    let vm = "bench01";
    // Boot the guest on h1 (gRPC from inside h1's namespace).
    let (h1b, pki_b) = (h1.clone(), pki_dir.clone());
    let boot = in_netns(&netns, move || async move {
        let files = host_files(&pki_b, "operator");
        let id = Identity::load(&files.ca, &files.cert, &files.key).expect("operator");
        let mut c1 = connect_control(&h1b, &id).await.expect("h1");
        let g = guest_artifacts().expect("guest artifacts");
        c1.define_vm(pb::DefineVmRequest {
            spec: Some(pb::VmSpec {
                name: vm.into(),
                vcpus: 1,
                memory_mib: 512,
                kernel: g.kernel.display().to_string(),
                initrd: g.initrd.display().to_string(),
                cmdline: workload_cmdline(256, 20.0, "realistic", 3),
                ..Default::default()
            }),
        })
        .await
        .expect("define on h1");
        let info = c1
            .start_vm(pb::VmRef { name: vm.into() })
            .await
            .expect("start on h1")
            .into_inner();
        wait_for_log_line(
            Path::new(&info.console_log),
            "FERRY-READY",
            Duration::from_secs(120),
        )
        .await
        .expect("guest ready");
    });
    tokio::task::spawn_blocking(move || boot.join())
        .await
        .expect("join")
        .unwrap_or_else(|p| std::panic::resume_unwind(p));

    let out_dir = tb.dir_path.join("bench");
    let (_, ferryctl, _) = binaries();
    let out = Command::new("ip")
        .args(["netns", "exec", &netns])
        .arg(&ferryctl)
        .args(["--agent", &h1, "--pki-dir"])
        .arg(&pki_dir)
        .args(["--identity", "operator", "bench", vm, "--to", &h2])
        .args([
            "--codecs",
            "none,lz4,zstd:1,zstd:3,auto",
            "--repeat",
            "1",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .expect("run ferryctl bench");
    assert!(
        out.status.success(),
        "ferryctl bench: {}",
        output_text(&out)
    );
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{table}");
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join(format!("bench-{vm}.json"))).expect("bench JSON"),
    )
    .expect("JSON");
    let moves = doc["moves"].as_array().expect("moves");
    assert_eq!(moves.len(), 10, "5 codecs x there and back: {doc}");
    for m in moves {
        assert_eq!(m["verify"], "sent", "{m}");
        assert_eq!(m["ram_digest"].as_str().map(str::len), Some(32), "{m}");
        assert!(m["wire_bytes"].as_u64().unwrap_or(0) > 0, "{m}");
        assert!(m["cpu_source_s"].as_f64().unwrap_or(0.0) > 0.0, "{m}");
    }
    assert_eq!(doc["summary"].as_array().map(Vec::len), Some(5));
    let svg = std::fs::read_to_string(out_dir.join(format!("bench-{vm}.svg"))).expect("plot");
    assert!(svg.starts_with("<svg"), "{svg}");
    let root = repo_root().expect("root");
    let _ = std::fs::write(
        root.join("target/ferryctl-bench-wan.md"),
        format!("{table}\n"),
    );
    let _ = std::fs::copy(
        out_dir.join(format!("bench-{vm}.svg")),
        root.join("target/ferryctl-bench-wan.svg"),
    );

    // Where the guest runs, asked of both agents and of the guest itself.
    let check = in_netns(&netns, move || async move {
        let files = host_files(&pki_dir, "operator");
        let id = Identity::load(&files.ca, &files.cert, &files.key).expect("operator");
        let mut c1 = connect_control(&h1, &id).await.expect("h1");
        let mut c2 = connect_control(&h2, &id).await.expect("h2");
        let on_h1 = c1
            .get_vm(pb::VmRef { name: vm.into() })
            .await
            .expect("back on h1")
            .into_inner();
        assert_eq!(on_h1.state, pb::VmState::Running as i32);
        assert!(pid_alive(on_h1.pid));
        let on_h2 = c2.get_vm(pb::VmRef { name: vm.into() }).await;
        assert_eq!(on_h2.expect_err("not on h2").code(), tonic::Code::NotFound);
        let line = console(&on_h1)
            .await
            .command("check", "FERRY-CHECK", Duration::from_secs(120))
            .await
            .expect("check reply");
        assert!(parse_check(&line).expect("parse").ok, "{line}");
        c1.stop_vm(pb::StopVmRequest {
            name: vm.into(),
            force: true,
        })
        .await
        .expect("stop on h1");
    });
    tokio::task::spawn_blocking(move || check.join())
        .await
        .expect("join")
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    let out = tokio::task::spawn_blocking(move || tb.down())
        .await
        .expect("join")
        .expect("down.sh ran");
    assert!(
        out.status.success(),
        "testbed/down.sh: {}",
        output_text(&out)
    );
}
