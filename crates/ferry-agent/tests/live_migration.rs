//! End-to-end live migration between two real ferryd processes on this machine, with
//! real QEMU guests (TCG) running ferry's workload, over real QUIC.
//!
//! Tests in this file share the machine's two cores: they run one at a time (a global
//! lock), and each builds its own pair of agents, certificates and directories.

use ferry_api::v1 as pb;
use ferry_api::v1::ferry_control_client::FerryControlClient;
use ferry_api::v1::ferry_peer_client::FerryPeerClient;
use ferry_testkit::{
    allocated_bytes, guest_artifacts, parse_check, workload_cmdline, GuestConsole, TestAgent,
    TestPki,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const VM_MIB: u64 = 384;
const WORKLOAD_MIB: u64 = 160;

struct Pair {
    _dir: tempfile::TempDir,
    pki: TestPki,
    a: TestAgent,
    b: TestAgent,
}

fn ferryd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferryd"))
}

async fn pair() -> Pair {
    pair_with_config("").await
}

/// Two agents with `migration` appended to their configs' `[migration]` table.
async fn pair_with_config(migration: &str) -> Pair {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), &["a", "b", "rogue-free-client"]).expect("pki");
    let a = TestAgent::start_with_config(&ferryd(), "a", &pki, dir.path(), "tcg", migration)
        .await
        .expect("agent a");
    let b = TestAgent::start_with_config(&ferryd(), "b", &pki, dir.path(), "tcg", migration)
        .await
        .expect("agent b");
    Pair {
        _dir: dir,
        pki,
        a,
        b,
    }
}

fn guest_spec(name: &str, dirty_mibps: f64) -> pb::VmSpec {
    let g = guest_artifacts().expect("guest artifacts: run scripts/build-guest.sh");
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: VM_MIB,
        kernel: g.kernel.display().to_string(),
        initrd: g.initrd.display().to_string(),
        cmdline: workload_cmdline(WORKLOAD_MIB, dirty_mibps, "realistic", 7),
        ..Default::default()
    }
}

/// Defines and starts a guest on `agent` and waits for its workload to be ready.
async fn boot_guest(agent: &TestAgent, name: &str, dirty_mibps: f64) -> pb::VmInfo {
    agent
        .define_and_boot(guest_spec(name, dirty_mibps))
        .await
        .expect("boot the guest")
}

async fn console(info: &pb::VmInfo) -> GuestConsole {
    GuestConsole::connect(Path::new(&info.console_socket), Duration::from_secs(10))
        .await
        .expect("console")
}

/// Asks the guest workload to verify every page it wrote.
async fn guest_check(info: &pb::VmInfo) {
    let mut con = console(info).await;
    let line = con
        .command("check", "FERRY-CHECK", Duration::from_secs(120))
        .await
        .expect("check reply");
    let r = parse_check(&line).expect("parse check");
    assert!(r.ok, "guest memory check failed: {line}");
}

/// The workload's write counter (grows while the guest runs).
async fn guest_writes(info: &pb::VmInfo) -> u64 {
    let mut con = console(info).await;
    let line = con
        .command("ping", "FERRY-PONG", Duration::from_secs(30))
        .await
        .expect("pong");
    ferry_testkit::parse_pong(&line).expect("parse pong")
}

async fn wait_phase(c: &mut FerryControlClient<Channel>, id: &str, phase: pb::MigrationPhase) {
    for _ in 0..600 {
        let s = c
            .get_migration(pb::MigrationRef { id: id.into() })
            .await
            .expect("get")
            .into_inner();
        if s.phase == phase as i32 {
            return;
        }
        assert!(
            !ferry_agent::migration::is_terminal(s.phase)
                && s.phase != pb::MigrationPhase::Committing as i32,
            "migration went past {phase:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("migration never reached {phase:?}");
}

fn pid_alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The target holds nothing of the VM: no QEMU, no RAM file, no record.
async fn assert_target_clean(b: &mut TestAgent, vm: &str, migration_id: &str, pki: &TestPki) {
    let mut cb = b.client().await.expect("client b");
    let vms = cb
        .list_vms(pb::ListVmsRequest {})
        .await
        .expect("list")
        .into_inner()
        .vms;
    assert!(
        vms.iter()
            .all(|v| v.spec.as_ref().map(|s| s.name.as_str()) != Some(vm)),
        "target still lists {vm}: {vms:?}"
    );
    assert!(
        files_in(b.ram_dir()).is_empty(),
        "target RAM dir not empty: {:?}",
        files_in(b.ram_dir())
    );
    assert!(
        b.qemu_pids().is_empty(),
        "a QEMU still runs for the target: {:?}",
        b.qemu_pids()
    );
    // Later peer calls need the token from Prepare: an agent without it learns nothing.
    let chan = ferry_agent::tls::connect(&b.grpc_addr(), &pki.identity("a").expect("identity"))
        .await
        .expect("peer channel");
    let e = FerryPeerClient::new(chan)
        .incoming_status(pb::IncomingStatusRequest {
            id: migration_id.into(),
            token: "not-the-token".into(),
        })
        .await
        .expect_err("a wrong token is refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Only the settled tombstone stays (history, pruned by `journal_history`): read it
    // from the target's journal itself, with the agent stopped (redb is single-process).
    b.kill().expect("stop b");
    let journal = ferry_agent::journal::Journal::open(&b.state_dir().join("ferry.redb"))
        .expect("open b's journal");
    let rec = journal
        .migration(migration_id)
        .expect("read b's journal")
        .expect("the migration's tombstone");
    assert_eq!(
        rec.receiver,
        Some(ferry_handoff::Receiver::Aborted),
        "the target should know the migration as aborted: {rec:?}"
    );
    assert_eq!(rec.peer, "a", "named by the source's certificate");
}

async fn migrate_with_codec(codec: &str, verify: &str) {
    migrate_with_config(codec, verify, "").await;
}

async fn migrate_with_config(codec: &str, verify: &str, migration: &str) -> Pair {
    migrate(codec, verify, migration, false).await
}

/// Checks a VM's RAM file against its `memory_prealloc`: all of it allocated, or (the
/// default) well under it — this guest writes about half its RAM.
fn assert_ram_allocation(ram_file: &str, prealloc: bool, host: &str) {
    let (held, full) = (allocated_bytes(ram_file), VM_MIB << 20);
    eprintln!("{host}: RAM file holds {} of {} MiB", held >> 20, VM_MIB);
    if prealloc {
        assert!(
            held >= full,
            "{host}: preallocated RAM held in full ({held} of {full})"
        );
    } else {
        assert!(
            held < full / 10 * 9,
            "{host}: RAM allocated as written, not in full ({held} of {full})"
        );
    }
}

/// One live migration of a guest writing 20 MiB/s, checked end to end (see the asserts);
/// `prealloc`: the guest's RAM is allocated in full on both hosts (`memory_prealloc`).
async fn migrate(codec: &str, verify: &str, migration: &str, prealloc: bool) -> Pair {
    let _serial = SERIAL.lock().await;
    let p = pair_with_config(migration).await;
    let mut spec = guest_spec("web01", 20.0);
    spec.memory_prealloc = prealloc;
    let src = p.a.define_and_boot(spec).await.expect("boot the guest");
    assert_ram_allocation(&src.ram_file, prealloc, "source");
    // Let the workload dirty memory for a while before moving it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes_before = guest_writes(&src).await;
    let mut ca = p.a.client().await.expect("client a");
    let started = ca
        .start_migration(pb::StartMigrationRequest {
            vm: "web01".into(),
            target: p.b.grpc_addr(),
            compress: codec.into(),
            verify: verify.into(),
            ..Default::default()
        })
        .await
        .expect("start migration")
        .into_inner();
    let end = ferry_testkit::watch_to_end(&mut ca, &started.id)
        .await
        .expect("watch migration");
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "migration failed: {end:?}\nA log:\n{}\nB log:\n{}",
        p.a.log_tail(),
        p.b.log_tail()
    );
    let stats = end.stats.expect("stats");
    eprintln!("{codec}: {stats:?}");
    // Both agents digested their RAM files with both guests paused and found them equal.
    assert_eq!(
        stats.ram_digest.len(),
        32,
        "RAM fingerprints compared: {stats:?}"
    );
    assert!(
        stats.rounds >= 2,
        "pre-copy rounds plus the final round: {stats:?}"
    );
    assert!(
        stats.pages_sent > (WORKLOAD_MIB << 20) / 4096 / 2,
        "pages sent: {stats:?}"
    );
    assert!(
        stats.device_state_bytes > 0,
        "device state relayed: {stats:?}"
    );
    assert_eq!(stats.tracker, "uffd-wp-async");
    assert_eq!(stats.verify, verify);
    if verify == "sent" {
        // The default budget (128 MiB a round) re-hashed at least one window.
        assert!(stats.audited_pages > 0, "tracker audited: {stats:?}");
    }
    if codec == "auto" {
        // The agent names what it picked from the link, the free CPU and the sample.
        let picked = stats
            .codec
            .strip_prefix("auto: ")
            .expect("auto names its pick");
        assert!(
            ["none", "lz4", "zstd:1", "zstd:3"].contains(&picked),
            "{stats:?}"
        );
    } else if codec != "none" {
        assert!(
            stats.compression_ratio > 1.2,
            "{codec} should compress guest RAM: {stats:?}"
        );
        assert!(
            stats.wire_bytes < stats.page_bytes,
            "{codec}: wire bytes below page bytes: {stats:?}"
        );
    }

    // The VM left A entirely…
    let gone = ca
        .get_vm(pb::VmRef {
            name: "web01".into(),
        })
        .await
        .expect_err("VM must be gone from A");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert!(!pid_alive(src.pid), "source QEMU still alive");
    assert!(
        !Path::new(&src.ram_file).exists(),
        "source RAM file left behind"
    );
    // …and runs on B, with every page it wrote intact.
    let mut cb = p.b.client().await.expect("client b");
    let dst = cb
        .get_vm(pb::VmRef {
            name: "web01".into(),
        })
        .await
        .expect("VM on B")
        .into_inner();
    assert_eq!(dst.state, pb::VmState::Running as i32);
    assert!(pid_alive(dst.pid));
    // The target holds what arrived (or all of it, preallocated), not more.
    assert_ram_allocation(&dst.ram_file, prealloc, "target");
    guest_check(&dst).await;
    let w1 = guest_writes(&dst).await;
    assert!(
        w1 > writes_before,
        "workload kept its counter across the move ({w1} > {writes_before})"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let w2 = guest_writes(&dst).await;
    assert!(w2 > w1, "guest keeps running on B ({w2} > {w1})");
    cb.stop_vm(pb::StopVmRequest {
        name: "web01".into(),
        force: true,
    })
    .await
    .expect("stop on B");
    p
}

/// `tight_tail_window = false` (every round keeps a send margin ahead of the congestion
/// window; the default is a window of the congestion window alone from round 2 on): the
/// same end-to-end checks as every codec's migration, and the source's log says the
/// window was never fitted tight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_with_a_send_margin_in_every_round() {
    let p = migrate_with_config("lz4", "sent", "tight_tail_window = false\n").await;
    let log = std::fs::read_to_string(p.a.log_path()).expect("source log");
    assert!(
        !log.contains("tight_tail_window: from round 2 on"),
        "the source kept its margin:\n{}",
        p.a.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_raw() {
    // The full scan of the source's RAM in the pause (`--verify full`).
    migrate_with_codec("none", "full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_lz4() {
    migrate_with_codec("lz4", "sent").await;
}

/// `auto`, of a guest whose RAM is preallocated (`memory_prealloc`): allocated in full
/// when it starts and on the target before it resumes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_auto_of_a_preallocated_guest() {
    migrate("auto", "sent", "", true).await;
}

/// With the default configuration, which also fits the send window to the congestion
/// window alone from round 2 on a path round 0 found lossless (`tight_tail_window =
/// "lossless"`; loopback loses nothing): the source's log says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_zstd() {
    let p = migrate_with_config("zstd", "sent", "").await;
    let log = std::fs::read_to_string(p.a.log_path()).expect("source log");
    assert!(
        log.contains("tight_tail_window: from round 2 on"),
        "the source fitted the window tight by default:\n{}",
        p.a.log_tail()
    );
}

/// zstd at level 19 compresses a few MB/s: round 0 takes long enough to act during it.
fn slow_migration(vm: &str, target: String) -> pb::StartMigrationRequest {
    // Preflight rightly predicts this cannot converge (zstd-19 is slower than the guest
    // writes): force past that soft check, the test is about what happens mid-copy.
    pb::StartMigrationRequest {
        vm: vm.into(),
        target,
        compress: "zstd:19".into(),
        force: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_precopy_keeps_guest_on_source() {
    let _serial = SERIAL.lock().await;
    let mut p = pair().await;
    let src = boot_guest(&p.a, "db01", 20.0).await;
    let mut ca = p.a.client().await.expect("client a");
    let m = ca
        .start_migration(slow_migration("db01", p.b.grpc_addr()))
        .await
        .expect("start")
        .into_inner();
    wait_phase(&mut ca, &m.id, pb::MigrationPhase::Precopy).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ca.cancel_migration(pb::MigrationRef { id: m.id.clone() })
        .await
        .expect("cancel");
    let end = ferry_testkit::watch_to_end(&mut ca, &m.id)
        .await
        .expect("watch migration");
    assert_eq!(end.phase, pb::MigrationPhase::Cancelled as i32, "{end:?}");
    assert!(end.error.contains("cancelled"), "{}", end.error);
    // A cancelled migration's data plane is counted too: its datagrams (at least one per
    // 1452 bytes of what its pages put on the wire, as far as that was counted before
    // the cancel).
    let metrics = ferry_testkit::scrape_metrics(&p.a.metrics_addr()).expect("scrape a");
    let datagrams = ferry_testkit::metric_sum(&metrics, "ferry_data_plane_datagrams_total");
    let wire = ferry_testkit::metric_sum(&metrics, "ferry_wire_bytes_total");
    assert!(
        datagrams > 0.0 && datagrams >= wire / 1452.0,
        "{datagrams} datagrams for {wire} wire bytes of a cancelled migration"
    );

    let vm = ca
        .get_vm(pb::VmRef {
            name: "db01".into(),
        })
        .await
        .expect("VM on A")
        .into_inner();
    assert_eq!(vm.state, pb::VmState::Running as i32);
    assert_eq!(vm.pid, src.pid, "same QEMU process keeps running");
    let w1 = guest_writes(&vm).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(guest_writes(&vm).await > w1, "guest runs on A");
    guest_check(&vm).await;
    assert_target_clean(&mut p.b, "db01", &m.id, &p.pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_killed_mid_precopy_keeps_guest_on_source() {
    let _serial = SERIAL.lock().await;
    let mut p = pair().await;
    let src = boot_guest(&p.a, "app01", 20.0).await;
    let mut ca = p.a.client().await.expect("client a");
    let m = ca
        .start_migration(slow_migration("app01", p.b.grpc_addr()))
        .await
        .expect("start")
        .into_inner();
    wait_phase(&mut ca, &m.id, pb::MigrationPhase::Precopy).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.b.kill().expect("kill b");
    let end = ferry_testkit::watch_to_end(&mut ca, &m.id)
        .await
        .expect("watch migration");
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32, "{end:?}");
    assert!(
        end.error.contains("app01") && end.error.contains("failed at"),
        "error names the VM and the step: {}",
        end.error
    );

    let vm = ca
        .get_vm(pb::VmRef {
            name: "app01".into(),
        })
        .await
        .expect("VM on A")
        .into_inner();
    assert_eq!(vm.state, pb::VmState::Running as i32);
    assert_eq!(vm.pid, src.pid);
    let w1 = guest_writes(&vm).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(guest_writes(&vm).await > w1, "guest runs on A");
    guest_check(&vm).await;

    // The restarted target removes the half-made VM its predecessor left.
    p.b.restart().await.expect("restart b");
    assert_target_clean(&mut p.b, "app01", &m.id, &p.pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let _serial = SERIAL.lock().await;
    let p = pair().await;
    let mut ca = p.a.client().await.expect("client a");

    // Unknown VM.
    let e = ca
        .start_migration(pb::StartMigrationRequest {
            vm: "nope".into(),
            target: p.b.grpc_addr(),
            ..Default::default()
        })
        .await
        .expect_err("unknown VM");
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("nope"), "{}", e.message());

    // Bad codec.
    let src = boot_guest(&p.a, "web02", 5.0).await;
    let e = ca
        .start_migration(pb::StartMigrationRequest {
            vm: "web02".into(),
            target: p.b.grpc_addr(),
            compress: "gzip".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad codec");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("gzip"), "{}", e.message());

    // Another address of this very agent as the target: its facts name this host.
    let own = p.a.grpc_addr().replace("127.0.0.1", "localhost");
    let m = ca
        .start_migration(pb::StartMigrationRequest {
            vm: "web02".into(),
            target: own.clone(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    let end = ferry_testkit::watch_to_end(&mut ca, &m.id)
        .await
        .expect("watch migration");
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32);
    assert!(
        end.error
            .contains(&format!("target {own} is this host (a)")),
        "{}",
        end.error
    );

    // Name already defined on the target: refused at prepare, guest stays on A.
    let mut cb = p.b.client().await.expect("client b");
    cb.define_vm(pb::DefineVmRequest {
        spec: Some(guest_spec("web02", 0.0)),
    })
    .await
    .expect("define clash on B");
    let m = ca
        .start_migration(pb::StartMigrationRequest {
            vm: "web02".into(),
            target: p.b.grpc_addr(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    let end = ferry_testkit::watch_to_end(&mut ca, &m.id)
        .await
        .expect("watch migration");
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32);
    // Preflight finds the clash before the target is asked to prepare anything.
    assert!(
        end.error.contains("failed at preflight")
            && end.error.contains("'web02' is already defined on b"),
        "{}",
        end.error
    );
    let vm = ca
        .get_vm(pb::VmRef {
            name: "web02".into(),
        })
        .await
        .expect("VM on A")
        .into_inner();
    assert_eq!(vm.state, pb::VmState::Running as i32);
    assert_eq!(vm.pid, src.pid);
    // B's own definition is untouched.
    let own = cb
        .get_vm(pb::VmRef {
            name: "web02".into(),
        })
        .await
        .expect("B's VM")
        .into_inner();
    assert_eq!(own.state, pb::VmState::Defined as i32);

    // Malformed spec.
    let e = ca
        .define_vm(pb::DefineVmRequest {
            spec: Some(pb::VmSpec {
                name: "../evil".into(),
                memory_mib: 64,
                ..Default::default()
            }),
        })
        .await
        .expect_err("bad name");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // A client whose certificate comes from another CA is refused by the gRPC server.
    let rogue_dir = p._dir.path().join("rogue");
    let rogue = TestPki::new(&rogue_dir, &["a"]).expect("rogue pki");
    let mut id = rogue.identity("a").expect("rogue identity");
    id.ca_pem = p.pki.identity("a").expect("identity").ca_pem; // trusts the real server, but is not trusted by it
    let refused = async {
        let mut c = ferry_testkit::connect_control(&p.a.grpc_addr(), &id).await?;
        c.list_vms(pb::ListVmsRequest {})
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    assert!(
        refused.is_err(),
        "a certificate from another CA must be refused"
    );
}

/// Issue 12: the status a watcher gets moves while round 0 runs (it used to sit at 0
/// until the round ended): several updates before round 0 is over, with bytes, elapsed
/// time and the round's own progress growing, and an ETA; every finished round lands in
/// the history, the final one last. The link is capped so round 0 lasts a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_moves_within_round_0() {
    let _serial = SERIAL.lock().await;
    let p = pair().await;
    let src = boot_guest(&p.a, "web02", 5.0).await;
    let mut ca = p.a.client().await.expect("client a");
    let m = ca
        .start_migration(pb::StartMigrationRequest {
            vm: "web02".into(),
            target: p.b.grpc_addr(),
            compress: "none".into(),
            // ~170 MiB of written guest pages at 40 MB/s: round 0 takes ~4 s.
            bandwidth_bytes_per_sec: 40_000_000,
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    let mut stream = ca
        .watch_migration(pb::MigrationRef { id: m.id.clone() })
        .await
        .expect("watch")
        .into_inner();
    // (wire bytes, elapsed ms, round pages done, eta ms) of each update seen in round 0.
    let mut in_round0: Vec<(u64, u64, u64, u64)> = Vec::new();
    let mut end = None;
    while let Some(s) = tokio::time::timeout(Duration::from_secs(120), stream.message())
        .await
        .expect("an update within 120 s")
        .expect("watch stream")
    {
        let st = s.stats.clone().unwrap_or_default();
        if s.phase == pb::MigrationPhase::Precopy as i32 && st.rounds == 0 && st.round_pages > 0 {
            in_round0.push((st.wire_bytes, st.elapsed_ms, st.round_pages_done, st.eta_ms));
        }
        if ferry_agent::migration::is_terminal(s.phase) {
            end = Some(s);
            break;
        }
    }
    let end = end.expect("the stream reached a final phase");
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "{end:?}\nA log:\n{}",
        p.a.log_tail()
    );
    // Distinct snapshots with bytes moving: several before round 0 ended.
    in_round0.dedup();
    let moving: Vec<_> = in_round0.iter().filter(|u| u.0 > 0).collect();
    eprintln!("round 0 updates (wire, elapsed ms, pages done, eta ms): {moving:?}");
    assert!(
        moving.len() >= 4,
        "updates within round 0 with bytes on the wire: {in_round0:?}"
    );
    for w in moving.windows(2) {
        assert!(
            w[1].0 >= w[0].0 && w[1].1 >= w[0].1 && w[1].2 >= w[0].2,
            "{moving:?}"
        );
    }
    let (first, last) = (moving[0], moving[moving.len() - 1]);
    assert!(
        last.0 > first.0,
        "wire bytes grew within round 0: {moving:?}"
    );
    assert!(
        last.1 > first.1,
        "elapsed time grew within round 0: {moving:?}"
    );
    assert!(last.2 > first.2, "the round's pages done grew: {moving:?}");
    assert!(
        moving.iter().any(|u| u.3 > 0),
        "an ETA was given during round 0: {moving:?}"
    );
    // The history: one record per round, the final round last and flagged.
    let st = end.stats.expect("stats");
    let h = &st.round_history;
    assert!(h.len() >= 2, "rounds recorded: {h:?}");
    assert_eq!(h[0].round, 0);
    assert!(
        h[0].pages > 0 && h[0].wire_bytes > 0 && h[0].duration_ms > 0,
        "{h:?}"
    );
    assert!(h.last().is_some_and(|r| r.r#final), "{h:?}");
    assert_eq!(h.iter().filter(|r| r.r#final).count(), 1, "{h:?}");
    // The VM moved: asked of B's agent and of the processes, not of the status.
    assert!(!pid_alive(src.pid), "source QEMU gone");
    let mut cb = p.b.client().await.expect("client b");
    let dst = cb
        .get_vm(pb::VmRef {
            name: "web02".into(),
        })
        .await
        .expect("VM on B")
        .into_inner();
    assert_eq!(dst.state, pb::VmState::Running as i32);
    guest_check(&dst).await;
}
