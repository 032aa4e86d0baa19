//! Faults around the handoff, injected with failpoints into real `ferryd` agents moving a
//! real QEMU guest (TCG) over real QUIC. After each fault the dead parts are restarted
//! and the test itself asks both QEMUs over their observer QMP sockets (not the agents):
//! the guest runs in exactly one QEMU, its own memory check passes there, nothing of it
//! is left on the other host, and the outcome the source reports matches where it runs.
//!
//! Needs `ferryd` built with the `failpoints` feature (`scripts/test.sh` does). The
//! default run takes the named regression cases; `FERRY_LONG=1` runs the whole matrix
//! (every failpoint x every fault) and writes it to `target/fault-matrix.md`.

use ferry_api::v1 as pb;
use ferry_api::v1::ferry_control_client::FerryControlClient;
use ferry_testkit::{
    allocated_bytes, guest_artifacts, workload_cmdline, QemuObserved, TestAgent, TestPki, Tmpfs,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const VM: &str = "fault01";
/// Short deadlines so a silent peer is noticed within seconds (they go into `[migration]`).
const FAST_DEADLINES: &str = "commit_timeout_s = 4\nswitchover_timeout_s = 20\npeer_call_timeout_s = 4\nround_timeout_s = 30\n";

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// kill -9 of the source agent at the point.
    KillSourceAgent,
    /// kill -9 of the target agent at the point.
    KillTargetAgent,
    /// kill -9 of the source QEMU at the point.
    KillSourceQemu,
    /// kill -9 of the target QEMU at the point.
    KillTargetQemu,
    /// The other agent freezes (SIGSTOP: no gRPC, no QUIC — a cut link, from either
    /// side's view) for 12 s at the point.
    FreezePeer,
    /// The agent at the point stops answering for 12 s (it hangs there).
    Silent,
}

const FAULTS: [Fault; 6] = [
    Fault::KillSourceAgent,
    Fault::KillTargetAgent,
    Fault::KillSourceQemu,
    Fault::KillTargetQemu,
    Fault::FreezePeer,
    Fault::Silent,
];

struct Pair {
    _dir: tempfile::TempDir,
    a: TestAgent,
    b: TestAgent,
}

fn ferryd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferryd"))
}

async fn pair(fp_a: Option<&str>, fp_b: Option<&str>) -> Pair {
    pair_with(fp_a, fp_b, "").await
}

/// [`pair`] with more `[migration]` settings for both agents.
async fn pair_with(fp_a: Option<&str>, fp_b: Option<&str>, migration: &str) -> Pair {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), &["a", "b"]).expect("pki");
    let config = format!("{FAST_DEADLINES}{migration}");
    let mut a = TestAgent::start_with_config(&ferryd(), "a", &pki, dir.path(), "tcg", &config)
        .await
        .expect("agent a");
    let mut b = TestAgent::start_with_config(&ferryd(), "b", &pki, dir.path(), "tcg", &config)
        .await
        .expect("agent b");
    // Armed by a restart so that start-up itself runs unarmed code paths only.
    if fp_a.is_some() {
        a.set_failpoints(fp_a);
        a.restart().await.expect("restart a armed");
    }
    if fp_b.is_some() {
        b.set_failpoints(fp_b);
        b.restart().await.expect("restart b armed");
    }
    Pair { _dir: dir, a, b }
}

/// Starts the migration of the guest from a to b; returns its id.
async fn start(p: &Pair, compress: &str, skip_verify: bool) -> String {
    let req = pb::StartMigrationRequest {
        vm: VM.into(),
        target: p.b.grpc_addr(),
        compress: compress.into(),
        skip_verify,
        ..Default::default()
    };
    let mut ca = p.a.client().await.expect("client a");
    ca.start_migration(req)
        .await
        .expect("start migration")
        .into_inner()
        .id
}

async fn boot(agent: &TestAgent) -> pb::VmInfo {
    boot_with(agent, false, false).await
}

/// Boots the guest; with `disk`, it also writes (and later verifies) a 64 MiB qcow2 disk
/// in the agent's own storage root, which travels in a migration (no shared storage);
/// with `prealloc`, its RAM is allocated in full on each host (`memory_prealloc`: only
/// then does the target allocate the RAM file's holes, at `tgt.ram.reserve`).
async fn boot_with(agent: &TestAgent, disk: bool, prealloc: bool) -> pb::VmInfo {
    let g = guest_artifacts().expect("guest artifacts: run scripts/build-guest.sh");
    let mut spec = pb::VmSpec {
        name: VM.into(),
        vcpus: 1,
        memory_mib: 256,
        kernel: g.kernel.display().to_string(),
        initrd: g.initrd.display().to_string(),
        cmdline: workload_cmdline(96, 5.0, "realistic", 11),
        memory_prealloc: prealloc,
        ..Default::default()
    };
    if disk {
        let path = agent.storage_dir().join("fault01.qcow2");
        ferry_disk::image::create(&path, ferry_disk::ImageFormat::Qcow2, 64 << 20, None)
            .expect("qemu-img create");
        spec.cmdline = format!(
            "{} ferry.disk=/dev/vda ferry.disk_mib=16 ferry.disk_wps=100",
            spec.cmdline
        );
        spec.disks = vec![pb::DiskSpec {
            id: "disk0".into(),
            path: path.display().to_string(),
            format: "qcow2".into(),
            read_only: false,
        }];
    }
    agent.define_and_boot(spec).await.expect("boot the guest")
}

/// The guest's own check of every page it wrote, over the console of the QEMU on `agent`.
async fn guest_memory_ok(agent: &TestAgent) -> Result<(), String> {
    let r = agent.guest_check(VM).await.map_err(|e| format!("{e:#}"))?;
    r.ok.then_some(()).ok_or(format!("{r:?}"))
}

/// Asked of both QEMUs: the guest runs on the source, the target has no QEMU for it, and
/// the guest's memory is intact.
async fn assert_runs_on_the_source_only(p: &Pair) {
    assert_eq!(p.a.observe_qemu(VM).await, QemuObserved::Running);
    assert_eq!(p.b.observe_qemu(VM).await, QemuObserved::NoQemu);
    guest_memory_ok(&p.a)
        .await
        .expect("guest memory on the source");
}

/// The target neither defines the VM nor keeps a RAM file of it.
async fn assert_nothing_on_the_target(p: &Pair) {
    assert!(!lists_vm(&p.b).await, "the VM is not defined on the target");
    assert!(
        files_in(p.b.ram_dir()).is_empty(),
        "target RAM dir: {:?}",
        files_in(p.b.ram_dir())
    );
}

async fn client(agent: &TestAgent) -> Option<FerryControlClient<Channel>> {
    tokio::time::timeout(Duration::from_secs(5), agent.client())
        .await
        .ok()?
        .ok()
}

async fn migration(agent: &TestAgent, id: &str) -> Option<pb::MigrationStatus> {
    let mut c = client(agent).await?;
    c.get_migration(pb::MigrationRef { id: id.into() })
        .await
        .ok()
        .map(|r| r.into_inner())
}

fn settled(phase: i32) -> bool {
    use pb::MigrationPhase as P;
    matches!(
        P::try_from(phase),
        Ok(P::Completed | P::Failed | P::Cancelled)
    )
}

async fn wait_settled(
    agent: &TestAgent,
    id: &str,
    timeout: Duration,
) -> Option<pb::MigrationStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(s) = migration(agent, id).await {
            if settled(s.phase) {
                return Some(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

/// Starts a migration of the pair's VM (no compression, verified) and waits for it to
/// settle, which must be FAILED; returns the source's final status.
async fn start_failing(p: &Pair, within: Duration) -> pb::MigrationStatus {
    let id = start(p, "", false).await;
    let end = wait_settled(&p.a, &id, within).await.expect("settled");
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32, "{end:?}");
    end
}

fn kill_pids(pids: &[u32]) {
    for &pid in pids {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
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

async fn lists_vm(agent: &TestAgent) -> bool {
    let Some(mut c) = client(agent).await else {
        return false;
    };
    let vms = c
        .list_vms(pb::ListVmsRequest {})
        .await
        .map(|r| r.into_inner().vms)
        .unwrap_or_default();
    vms.iter()
        .any(|v| v.spec.as_ref().is_some_and(|s| s.name == VM))
}

/// Whether the fault itself may leave the VM crashed (not a handoff failure): it killed
/// the one QEMU running the guest — the source QEMU before its device state was captured
/// whole, or the target QEMU after it resumed the guest.
fn crash_allowed(point: &str, fault: Fault) -> bool {
    const BEFORE_CAPTURE: [&str; 13] = [
        "src.preflight.done",
        "src.prepare.done",
        "src.connect.done",
        "src.disks.ready",
        "src.precopy.round",
        "src.switchover.paused",
        "src.final_round.sent",
        "src.device_state.sent",
        "tgt.copies.made",
        "tgt.prepare.done",
        "tgt.ram.reserve",
        "tgt.qemu.started",
        "tgt.hello.done",
    ];
    match fault {
        Fault::KillSourceQemu => {
            BEFORE_CAPTURE.contains(&point)
                || point == "tgt.final_round.applied"
                || point == "tgt.device_state.loaded"
                // Their trigger is an error in pre-copy, long before any capture.
                || point == "src.rollback.start"
                || point == "tgt.abort.discarded"
        }
        // From `src.commit.sent` on the Commit is on the wire: the target may already have
        // resumed the guest (and owns it) when its QEMU is killed.
        Fault::KillTargetQemu => matches!(
            point,
            "tgt.commit.resumed" | "tgt.commit.owned" | "src.commit.sent" | "src.commit.answered"
        ),
        _ => false,
    }
}

/// Points a plain migration does not pass: what makes the migration reach them, as
/// (agent "a" or "b", failpoint spec) armed beside the fault.
fn trigger_for(point: &str) -> Option<(&'static str, &'static str)> {
    match point {
        // A rollback, and the target's discard: an error injected into pre-copy.
        "src.rollback.start" | "tgt.abort.discarded" => {
            Some(("a", "src.precopy.round=1*return(error)"))
        }
        // Settling: the target's commit path fails, the source asks what happened.
        "src.settle.ask" => Some(("b", "tgt.commit.asked=1*return(error)")),
        _ => None,
    }
}

/// Waits (up to 120 s) until failpoint `point` fires, or the migration ends without
/// passing it.
async fn wait_point(p: &mut Pair, point: &str, id: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let agent = if point.starts_with("src.") {
            &mut p.a
        } else {
            &mut p.b
        };
        if agent
            .wait_failpoint(point, Duration::from_millis(500))
            .await
        {
            return true;
        }
        if p.a.running() {
            if let Some(s) = migration(&p.a, id).await {
                if settled(s.phase) {
                    // One more look: the point may have fired just before the end.
                    let agent = if point.starts_with("src.") {
                        &mut p.a
                    } else {
                        &mut p.b
                    };
                    return agent
                        .wait_failpoint(point, Duration::from_millis(200))
                        .await;
                }
            }
        }
    }
    false
}

/// The result of one cell of the matrix.
struct Cell {
    point: &'static str,
    fault: Fault,
    reached: bool,
    owner: &'static str,
    outcome: String,
    /// The fault killed the only running copy (allowed; see `crash_allowed`).
    crashed: bool,
    verdict: Result<(), String>,
    secs: f64,
}

/// Migrates the guest from a to b with `fault` at failpoint `point`, restarts what died,
/// and checks the invariant.
async fn run_cell(point: &'static str, fault: Fault, skip_verify: bool) -> Cell {
    let t0 = Instant::now();
    let on_source = point.starts_with("src.");
    // Kills of the agent owning the point are exact (the agent kills itself there); every
    // other fault hangs that agent at the point while the test strikes.
    let self_kill = matches!(
        (fault, on_source),
        (Fault::KillSourceAgent, true) | (Fault::KillTargetAgent, false)
    );
    let action = if self_kill { "exit" } else { "hang" };
    let spec = format!("{point}=return({action})");
    let (mut fa, mut fb) = if on_source {
        (Some(spec.clone()), None)
    } else {
        (None, Some(spec.clone()))
    };
    if let Some((who, trig)) = trigger_for(point) {
        let slot = if who == "a" { &mut fa } else { &mut fb };
        *slot = Some(match slot.take() {
            Some(s) => format!("{s};{trig}"),
            None => trig.to_string(),
        });
    }
    let mut p = pair(fa.as_deref(), fb.as_deref()).await;
    let disk = matches!(point, "src.disks.ready" | "tgt.copies.made");
    let _info = boot_with(&p.a, disk, point == "tgt.ram.reserve").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let id = start(&p, "lz4", skip_verify).await;
    let reached = wait_point(&mut p, point, &id).await;
    let mut violations = Vec::new();
    let mut check_never_two = |a: &QemuObserved, b: &QemuObserved, when: &str| {
        if *a == QemuObserved::Running && *b == QemuObserved::Running {
            violations.push(format!("guest running on both hosts {when}"));
        }
    };
    if reached {
        match fault {
            Fault::KillSourceAgent if !self_kill => p.a.kill().expect("kill a"),
            Fault::KillTargetAgent if !self_kill => p.b.kill().expect("kill b"),
            Fault::KillSourceAgent | Fault::KillTargetAgent => {
                // Wait for the self-kill to land.
                let agent = if on_source { &mut p.a } else { &mut p.b };
                agent.wait_exit(Duration::from_secs(10)).await;
            }
            Fault::KillSourceQemu => kill_pids(&p.a.qemu_pids()),
            Fault::KillTargetQemu => kill_pids(&p.b.qemu_pids()),
            Fault::FreezePeer => {
                let peer = if on_source { &p.b } else { &p.a };
                peer.signal(libc::SIGSTOP);
                let owner = if on_source { &p.a } else { &p.b };
                owner.release_failpoint().expect("release");
                tokio::time::sleep(Duration::from_secs(12)).await;
                let peer = if on_source { &p.b } else { &p.a };
                peer.signal(libc::SIGCONT);
            }
            Fault::Silent => tokio::time::sleep(Duration::from_secs(12)).await,
        }
        let (oa, ob) = (p.a.observe_qemu(VM).await, p.b.observe_qemu(VM).await);
        check_never_two(&oa, &ob, "right after the fault");
    }
    // Restart what died (disarmed), release what hangs.
    p.a.set_failpoints(None);
    p.b.set_failpoints(None);
    for agent in [&mut p.a, &mut p.b] {
        if !agent.running() {
            agent.restart().await.expect("restart agent");
        } else {
            agent.release_failpoint().expect("release");
        }
    }
    let end = wait_settled(&p.a, &id, Duration::from_secs(120)).await;
    let (oa, ob) = (p.a.observe_qemu(VM).await, p.b.observe_qemu(VM).await);
    check_never_two(&oa, &ob, "after settling");
    // Give the target a moment to settle its side too (it runs its own recovery).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (on_a, on_b) = (lists_vm(&p.a).await, lists_vm(&p.b).await);
    let owner = match (on_a, on_b) {
        (true, false) => "source",
        (false, true) => "target",
        (true, true) => "both",
        (false, false) => "none",
    };
    let outcome = match &end {
        Some(s) => pb::MigrationPhase::try_from(s.phase)
            .map(|p| {
                p.as_str_name()
                    .trim_start_matches("MIGRATION_PHASE_")
                    .to_string()
            })
            .unwrap_or_default(),
        None => "NOT SETTLED".into(),
    };
    if end.is_none() {
        violations.push(format!(
            "migration not settled within 120 s: {:?}",
            migration(&p.a, &id).await.map(|s| (s.phase, s.message))
        ));
    }
    let (owner_agent, other_agent, owner_q) = match owner {
        "source" => (&p.a, &p.b, &oa),
        "target" => (&p.b, &p.a, &ob),
        other => {
            violations.push(format!("the VM is defined on {other} host(s)"));
            (&p.a, &p.b, &oa)
        }
    };
    if owner == "target" && outcome != "COMPLETED" {
        violations.push(format!(
            "the target owns the VM but the source reports {outcome}"
        ));
    }
    if owner == "source" && outcome == "COMPLETED" {
        violations.push("the source owns the VM but reports COMPLETED".into());
    }
    let mut crashed = false;
    match owner_q {
        QemuObserved::Running => {
            if let Err(e) = guest_memory_ok(owner_agent).await {
                violations.push(format!("guest memory check on the {owner}: {e}"));
            }
        }
        // The fault killed the one QEMU running the guest: the VM crashed (its owner
        // shows it crashed, to be started again); the handoff did not lose it.
        _ if crash_allowed(point, fault) => crashed = true,
        other => violations.push(format!(
            "the {owner}'s QEMU does not run the guest: {other:?}"
        )),
    }
    // Nothing left on the other host.
    let other_q = if owner == "source" { &ob } else { &oa };
    if *other_q != QemuObserved::NoQemu || !other_agent.qemu_pids().is_empty() {
        violations.push(format!(
            "a QEMU is left on the other host: {other_q:?} {:?}",
            other_agent.qemu_pids()
        ));
    }
    if owner == "source" {
        // A disk copy the target made (empty or half mirrored) must be gone.
        let images = files_in(p.b.storage_dir());
        if !images.is_empty() {
            violations.push(format!("disk images left on the target: {images:?}"));
        }
    }
    let ram_left: Vec<String> = files_in(other_agent.ram_dir());
    if !ram_left.is_empty() {
        violations.push(format!(
            "files left in the other host's RAM dir: {ram_left:?}"
        ));
    }
    if other_agent.state_dir().join("run").join(VM).exists() && owner != "none" {
        let left = files_in(&other_agent.state_dir().join("run").join(VM));
        if !left.is_empty() {
            violations.push(format!("run directory left on the other host: {left:?}"));
        }
    }
    let verdict = if violations.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}\n--- a log:\n{}\n--- b log:\n{}",
            violations.join("; "),
            p.a.log_tail(),
            p.b.log_tail()
        ))
    };
    Cell {
        point,
        fault,
        reached,
        owner,
        outcome,
        crashed,
        verdict,
        secs: t0.elapsed().as_secs_f64(),
    }
}

fn assert_cell(c: &Cell) {
    eprintln!(
        "{} x {:?}: reached {}, owner {}, outcome {}, {:.0} s",
        c.point, c.fault, c.reached, c.owner, c.outcome, c.secs
    );
    assert!(c.reached, "failpoint {} never fired", c.point);
    if let Err(e) = &c.verdict {
        panic!("{} x {:?}: {e}", c.point, c.fault);
    }
}

/// Regression (measured on `wan`): with `--no-verify` the source agent was killed right
/// after Commit left; its QEMU resumed the guest while the target committed too. Now
/// Commit leaves only from a fenced source, which cannot resume by itself: whichever way
/// the target decides (the Commit may or may not have left the dying agent's buffers),
/// exactly one QEMU runs the guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_regression_source_killed_after_commit_no_verify() {
    let _s = SERIAL.lock().await;
    let c = run_cell("src.commit.sent", Fault::KillSourceAgent, true).await;
    assert_cell(&c);
}

/// The source agent dies after migrate-continue but before its QEMU is fenced: QEMU
/// resumes the guest by itself, so the target must never commit (no Commit was sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_killed_before_the_fence_keeps_the_guest_on_the_source() {
    let _s = SERIAL.lock().await;
    let c = run_cell("src.device_state.sent", Fault::KillSourceAgent, true).await;
    assert_cell(&c);
    assert_eq!(c.owner, "source");
}

/// Regression: the source agent killed at COMMITTING came back with a paused copy it
/// called FAILED and would resume. Now it settles with the target and removes its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_killed_at_committing_leaves_no_paused_copy() {
    let _s = SERIAL.lock().await;
    let c = run_cell("src.commit.journaled", Fault::KillSourceAgent, false).await;
    assert_cell(&c);
}

/// Regression: the target agent killed after making the empty copy of a travelling
/// disk, before its Prepared record listed it (the QEMU start, about a second), left the
/// copy behind for good. Now the copy's path is journaled before it is made and the copy
/// is linked to a staging name until then: the restart removes it, staging name too (the
/// cell looks at the target's storage directory itself, hidden files included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_killed_after_making_a_disk_copy_leaves_none() {
    let _s = SERIAL.lock().await;
    let c = run_cell("tgt.copies.made", Fault::KillTargetAgent, false).await;
    assert_cell(&c);
    assert_eq!(c.owner, "source");
}

/// The target agent dies after journaling the commit, before resuming: on restart it
/// keeps the guest paused until its source's word; the source, still settling, asks, and
/// the target resumes the guest (the journal says it is its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_killed_after_journaling_the_commit_resumes_on_restart() {
    let _s = SERIAL.lock().await;
    let c = run_cell("tgt.commit.journaled", Fault::KillTargetAgent, false).await;
    assert_cell(&c);
    assert_eq!(c.owner, "target");
}

/// The target stops answering after the Commit arrived: the source asks over gRPC, finds
/// it prepared, aborts it and resumes its fenced guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_target_at_commit_rolls_back() {
    let _s = SERIAL.lock().await;
    let c = run_cell("tgt.commit.asked", Fault::Silent, false).await;
    assert_cell(&c);
    assert_eq!(c.owner, "source");
}

/// A pair whose guest is migrating from a to b, the source held right after its QEMU was
/// fenced (`src.fence.done`, before the Commit); returns the pair and the migration's id.
async fn held_at_the_fence() -> (Pair, String) {
    let mut p = pair(Some("src.fence.done=return(hang)"), None).await;
    boot(&p.a).await;
    let id = start(&p, "lz4", false).await;
    assert!(
        p.a.wait_failpoint("src.fence.done", Duration::from_secs(120))
            .await,
        "fence reached"
    );
    (p, id)
}

/// The fenced source QEMU is killed and the target agent dies before it commits: the
/// source restarts its QEMU from the RAM file and the captured device state, and the
/// guest's memory check passes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_source_qemu_lost_is_restarted_from_the_capture() {
    let _s = SERIAL.lock().await;
    let (mut p, id) = held_at_the_fence().await;
    assert_eq!(
        p.a.observe_qemu(VM).await,
        QemuObserved::Stopped("postmigrate".into()),
        "source QEMU fenced"
    );
    kill_pids(&p.a.qemu_pids());
    p.b.kill().expect("kill b");
    p.b.restart().await.expect("restart b");
    p.a.release_failpoint().expect("release");
    let end = wait_settled(&p.a, &id, Duration::from_secs(120))
        .await
        .expect("settled");
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Failed as i32,
        "rolled back: {end:?}"
    );
    assert_eq!(
        p.a.observe_qemu(VM).await,
        QemuObserved::Running,
        "restarted from the capture and resumed\n{}",
        p.a.log_tail()
    );
    assert_eq!(p.b.observe_qemu(VM).await, QemuObserved::NoQemu);
    guest_memory_ok(&p.a)
        .await
        .expect("guest memory intact after the restart from the capture");
    assert!(
        files_in(p.b.ram_dir()).is_empty(),
        "target RAM dir: {:?}",
        files_in(p.b.ram_dir())
    );
}

/// IN_DOUBT survives a restart: the source agent dies after sending Commit while the
/// target is frozen; restarted, it cannot reach the target, keeps the guest paused and
/// refuses to resume it; once the target thaws, it settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_doubt_survives_restart_and_refuses_resume() {
    let _s = SERIAL.lock().await;
    let mut p = pair(Some("src.commit.sent=return(hang)"), None).await;
    boot(&p.a).await;
    let id = start(&p, "lz4", false).await;
    assert!(
        p.a.wait_failpoint("src.commit.sent", Duration::from_secs(120))
            .await
    );
    p.b.signal(libc::SIGSTOP);
    p.a.kill().expect("kill a");
    p.a.set_failpoints(None);
    p.a.restart().await.expect("restart a");
    let mut ca = p.a.client().await.expect("client a");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut phase = 0;
    while Instant::now() < deadline {
        phase = ca
            .get_migration(pb::MigrationRef { id: id.clone() })
            .await
            .expect("get")
            .into_inner()
            .phase;
        if phase == pb::MigrationPhase::InDoubt as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        phase,
        pb::MigrationPhase::InDoubt as i32,
        "in doubt after the restart\n{}",
        p.a.log_tail()
    );
    assert_ne!(
        p.a.observe_qemu(VM).await,
        QemuObserved::Running,
        "the source guest stays paused while in doubt"
    );
    let err = ca
        .resume_vm(pb::VmRef { name: VM.into() })
        .await
        .expect_err("resume refused while in doubt");
    assert!(err.message().contains("held by migration"), "{err:?}");
    p.b.signal(libc::SIGCONT);
    let end = wait_settled(&p.a, &id, Duration::from_secs(90))
        .await
        .expect("settled once the target answers");
    let (oa, ob) = (p.a.observe_qemu(VM).await, p.b.observe_qemu(VM).await);
    let running = [&oa, &ob]
        .iter()
        .filter(|o| ***o == QemuObserved::Running)
        .count();
    assert_eq!(
        running, 1,
        "one QEMU runs the guest: a {oa:?}, b {ob:?} (outcome {end:?})"
    );
    let owner = if oa == QemuObserved::Running {
        &p.a
    } else {
        &p.b
    };
    assert_eq!(
        end.phase == pb::MigrationPhase::Completed as i32,
        ob == QemuObserved::Running,
        "reported outcome matches where the guest runs"
    );
    guest_memory_ok(owner).await.expect("guest memory");
}

/// Waits (up to 60 s) until the source shows the migration IN_DOUBT.
async fn wait_in_doubt(agent: &TestAgent, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if migration(agent, id)
            .await
            .is_some_and(|s| s.phase == pb::MigrationPhase::InDoubt as i32)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("not in doubt within 60 s\n{}", agent.log_tail());
}

/// The target host dies for good while the source waits for the commit's answer: the
/// source is IN_DOUBT and keeps the guest paused (it cannot know), until the operator says
/// the target is gone (`ResolveMigration`, `ferryctl migrations resolve --target-gone`).
/// Then the guest resumes on the source — asked of both QEMUs — with its memory intact;
/// the verdict is refused without the flag and once the migration has ended; and the
/// target, when its agent comes back with its journal (Commit never reached it), discards
/// its copy instead of running it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_takes_back_a_vm_whose_target_is_gone_for_good() {
    let _s = SERIAL.lock().await;
    let (mut p, id) = held_at_the_fence().await;
    // The target host stops (its agent and its QEMU), before the Commit can reach it.
    p.b.signal(libc::SIGSTOP);
    let b_qemu = p.b.qemu_pids();
    kill_pids(&b_qemu);
    p.a.release_failpoint().expect("release");
    wait_in_doubt(&p.a, &id).await;
    assert_ne!(
        p.a.observe_qemu(VM).await,
        QemuObserved::Running,
        "the source guest stays paused while in doubt"
    );
    p.b.kill().expect("kill b");

    let mut ca = p.a.client().await.expect("client a");
    let resolve = |target_gone| pb::ResolveMigrationRequest {
        id: id.clone(),
        target_gone,
    };
    let err = ca
        .resolve_migration(resolve(false))
        .await
        .expect_err("a verdict that says nothing is refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_ne!(p.a.observe_qemu(VM).await, QemuObserved::Running);

    let end = ca
        .resolve_migration(resolve(true))
        .await
        .expect("verdict taken")
        .into_inner();
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32, "{end:?}");
    assert!(
        end.error.contains("declared the target gone for good"),
        "{}",
        end.error
    );
    assert_eq!(
        p.a.observe_qemu(VM).await,
        QemuObserved::Running,
        "resumed on the source\n{}",
        p.a.log_tail()
    );
    guest_memory_ok(&p.a)
        .await
        .expect("guest memory on the source");
    let err = ca
        .resolve_migration(resolve(true))
        .await
        .expect_err("an ended migration needs no verdict");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // The target's agent comes back with its journal: it never saw the Commit, so it
    // discards what it prepared; the guest runs on the source only.
    p.b.restart().await.expect("restart b");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !files_in(p.b.ram_dir()).is_empty() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_runs_on_the_source_only(&p).await;
    assert_nothing_on_the_target(&p).await;
}

/// The target's agent dies right after journaling the commit (its QEMU alive, the guest
/// paused there, never resumed), the source is left in doubt and the operator declares
/// the target gone: the VM comes back to the source. When the target's agent comes back
/// with its journal, it must not resume its committed copy (before, it did: the guest ran
/// on both hosts); it waits for its source's word, hears that the VM was taken back, and
/// discards the copy. Both QEMUs asked over QMP, throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_back_after_the_operator_took_the_vm_back_discards_its_committed_copy() {
    let _s = SERIAL.lock().await;
    let (mut p, id) = in_doubt_with_the_target_dead_after_committing(None).await;
    assert!(
        matches!(p.b.observe_qemu(VM).await, QemuObserved::Stopped(_)),
        "the committed copy waits paused in the target QEMU"
    );
    assert_ne!(p.a.observe_qemu(VM).await, QemuObserved::Running);

    let mut ca = p.a.client().await.expect("client a");
    let end = ca
        .resolve_migration(pb::ResolveMigrationRequest {
            id: id.clone(),
            target_gone: true,
        })
        .await
        .expect("verdict taken")
        .into_inner();
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32, "{end:?}");
    assert_eq!(
        p.a.observe_qemu(VM).await,
        QemuObserved::Running,
        "taken back on the source\n{}",
        p.a.log_tail()
    );

    // The target's agent comes back with its journal at Committed and its QEMU alive.
    restart_the_target_until_its_copy_is_gone(&mut p).await;
    assert_runs_on_the_source_only(&p).await;
    assert_nothing_on_the_target(&p).await;
}

/// A verdict on a host that was not gone. The target's agent dies right after its guest
/// resumed and `Owned` was journaled (its QEMU runs the guest on), before the source heard;
/// the source is left in doubt and the operator declares the target gone: the source
/// resumes its copy and the VM runs on two hosts — what a wrong verdict does, and no agent
/// can prevent while the hosts cannot talk. Once the target's agent is back, the source's
/// news that it took the VM back must end it: the target pauses its copy and holds it
/// (resume refused, the fence journaled: a restart that finds the guest running pauses it
/// again) until the operator clears the fence. Before, the target refused the news and
/// both guests ran on. Both QEMUs asked over their observer QMP sockets throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_ran_on_a_host_wrongly_declared_gone_is_fenced_when_that_host_hears_of_it() {
    let _s = SERIAL.lock().await;
    let (mut p, id) = in_doubt_with_the_target_dead_at("tgt.commit.owned", None).await;
    assert_eq!(
        p.b.observe_qemu(VM).await,
        QemuObserved::Running,
        "the target's guest runs on without its agent"
    );
    assert_ne!(p.a.observe_qemu(VM).await, QemuObserved::Running);

    // The wrong verdict: the target's agent does not answer, so the source takes the VM
    // back and the guest runs on both hosts until the target hears of it.
    let mut ca = p.a.client().await.expect("client a");
    let end = ca
        .resolve_migration(pb::ResolveMigrationRequest {
            id: id.clone(),
            target_gone: true,
        })
        .await
        .expect("verdict taken")
        .into_inner();
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32, "{end:?}");
    assert_eq!(p.a.observe_qemu(VM).await, QemuObserved::Running);
    assert_eq!(p.b.observe_qemu(VM).await, QemuObserved::Running);

    // The target's agent comes back with its journal (Owned, its QEMU adopted). The source
    // tells it (retried with backoff, at most 30 s apart) that it took the VM back.
    p.b.set_failpoints(None);
    p.b.restart().await.expect("restart b");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let b = p.b.observe_qemu(VM).await;
        assert_eq!(
            p.a.observe_qemu(VM).await,
            QemuObserved::Running,
            "the copy the verdict took back runs on"
        );
        if matches!(b, QemuObserved::Stopped(_)) {
            break;
        }
        assert_eq!(
            b,
            QemuObserved::Running,
            "the target's copy is kept, paused"
        );
        assert!(
            Instant::now() < deadline,
            "the target's copy still runs: the VM runs on two hosts\n{}\n{}",
            p.b.log_tail(),
            p.a.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut cb = p.b.client().await.expect("client b");
    let vm = |name: &str| pb::VmRef { name: name.into() };
    let info = cb.get_vm(vm(VM)).await.expect("get vm b").into_inner();
    assert!(
        info.fenced.contains(&id) && info.state == pb::VmState::Paused as i32,
        "{info:?}"
    );
    let err = cb
        .resume_vm(vm(VM))
        .await
        .expect_err("a fenced copy does not resume");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("clear-fence"), "{err:?}");
    let err = cb
        .start_migration(pb::StartMigrationRequest {
            vm: VM.into(),
            target: p.a.grpc_addr(),
            ..Default::default()
        })
        .await
        .expect_err("a fenced copy does not migrate");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("fenced"), "{err:?}");
    assert!(
        matches!(p.b.observe_qemu(VM).await, QemuObserved::Stopped(_)),
        "still paused after the refused resume and migration"
    );
    guest_memory_ok(&p.a)
        .await
        .expect("guest memory on the source");
    // The source hears the target's answer just after the pause.
    let said = || {
        std::fs::read_to_string(p.a.dir().join("ferryd.log"))
            .unwrap_or_default()
            .contains("was not gone after all: it holds the copy committed there, now fenced")
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !said() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(said(), "the source says what happened\n{}", p.a.log_tail());
    let text = ferry_testkit::scrape_metrics(&p.b.metrics_addr()).expect("scrape b");
    assert_eq!(
        ferry_testkit::metric_sum(&text, "ferry_vms_fenced_total"),
        1.0,
        "counted once on the target"
    );

    // The guest set running behind the agent's back (what an agent that died between
    // journaling the fence and pausing the guest leaves): a restart pauses it again.
    let observer =
        p.b.state_dir()
            .join("run")
            .join(VM)
            .join("qmp-observe.sock");
    ferry_qmp::QmpClient::connect(&observer)
        .await
        .expect("observer QMP of b")
        .cont()
        .await
        .expect("cont on b");
    assert_eq!(p.b.observe_qemu(VM).await, QemuObserved::Running);
    p.b.restart().await.expect("restart b again");
    assert!(
        matches!(p.b.observe_qemu(VM).await, QemuObserved::Stopped(_)),
        "a restart pauses a fenced copy it finds running\n{}",
        p.b.log_tail()
    );

    // The operator settles it: the source's copy goes, the fence is cleared, the target's
    // copy resumes. One copy runs throughout.
    let mut ca = p.a.client().await.expect("client a");
    ca.stop_vm(pb::StopVmRequest {
        name: VM.into(),
        force: true,
    })
    .await
    .expect("stop the source's copy");
    let mut cb = p.b.client().await.expect("client b");
    let info = cb
        .clear_fence(vm(VM))
        .await
        .expect("clear fence")
        .into_inner();
    assert!(info.fenced.is_empty(), "{info:?}");
    cb.resume_vm(vm(VM)).await.expect("resume on b");
    assert_eq!(p.b.observe_qemu(VM).await, QemuObserved::Running);
    assert_ne!(p.a.observe_qemu(VM).await, QemuObserved::Running);
}

/// The source's agent dies right after journaling the operator's verdict, before its
/// guest resumes (the target's agent died after journaling the commit, its QEMU alive
/// and paused). Back with its journal, the source takes the VM back without asking the
/// target again (a question would read to a waiting target as "still settling") and
/// tells it, across its own restart, that it did: the target, back later, discards its
/// committed copy. Both QEMUs asked over QMP, throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_restarted_after_journaling_the_verdict_takes_the_vm_back_and_tells_the_target() {
    let _s = SERIAL.lock().await;
    let (mut p, id) =
        in_doubt_with_the_target_dead_after_committing(Some("src.verdict.journaled=return(exit)"))
            .await;

    let mut ca = p.a.client().await.expect("client a");
    // The source's agent dies within the call: its answer is a broken connection.
    let _ = ca
        .resolve_migration(pb::ResolveMigrationRequest {
            id: id.clone(),
            target_gone: true,
        })
        .await;
    assert!(
        p.a.wait_failpoint("src.verdict.journaled", Duration::from_secs(30))
            .await,
        "the verdict was journaled\n{}",
        p.a.log_tail()
    );
    assert!(
        p.a.wait_exit(Duration::from_secs(10)).await,
        "the source agent died at the failpoint"
    );
    assert!(
        matches!(p.a.observe_qemu(VM).await, QemuObserved::Stopped(_)),
        "the source's guest is still paused: the agent died before resuming it"
    );
    assert!(
        matches!(p.b.observe_qemu(VM).await, QemuObserved::Stopped(_)),
        "the committed copy waits paused in the target QEMU"
    );

    // The source comes back with `taken_back` journaled: it resumes the guest, asking
    // nobody, while the target is still down.
    p.a.set_failpoints(None);
    p.a.restart().await.expect("restart a");
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.a.observe_qemu(VM).await != QemuObserved::Running {
        assert!(
            Instant::now() < deadline,
            "the source did not take the VM back\n{}",
            p.a.log_tail()
        );
        assert_ne!(p.b.observe_qemu(VM).await, QemuObserved::Running);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let end = wait_settled(&p.a, &id, Duration::from_secs(30))
        .await
        .expect("settled on the source");
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Failed as i32,
        "{end:?}\n{}",
        p.a.log_tail()
    );

    // The target comes back: it hears the news the restarted source keeps telling.
    restart_the_target_until_its_copy_is_gone(&mut p).await;
    assert_runs_on_the_source_only(&p).await;
    assert_nothing_on_the_target(&p).await;
    guest_memory_ok(&p.a)
        .await
        .expect("guest memory on the source");
}

/// A migration whose target agent died right after journaling the commit (its QEMU alive,
/// the guest paused there), the source IN_DOUBT; the source armed with `source_failpoints`.
async fn in_doubt_with_the_target_dead_after_committing(
    source_failpoints: Option<&str>,
) -> (Pair, String) {
    in_doubt_with_the_target_dead_at("tgt.commit.journaled", source_failpoints).await
}

/// The source in doubt, the target's agent dead at failpoint `point` of its commit (its
/// QEMU alive).
async fn in_doubt_with_the_target_dead_at(
    point: &str,
    source_failpoints: Option<&str>,
) -> (Pair, String) {
    let armed = format!("{point}=return(exit)");
    let mut p = pair(source_failpoints, Some(&armed)).await;
    boot(&p.a).await;
    let id = start(&p, "lz4", false).await;
    assert!(
        p.b.wait_failpoint(point, Duration::from_secs(180)).await,
        "the target reached {point}\n{}",
        p.a.log_tail()
    );
    wait_in_doubt(&p.a, &id).await;
    assert!(!p.b.running(), "the target agent died at the failpoint");
    (p, id)
}

/// Restarts the target's agent unarmed and waits (up to 120 s) until its QEMU is gone,
/// asking both QEMUs every 250 ms that the guest never runs on both hosts meanwhile.
async fn restart_the_target_until_its_copy_is_gone(p: &mut Pair) {
    p.b.set_failpoints(None);
    p.b.restart().await.expect("restart b");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (a, b) = (p.a.observe_qemu(VM).await, p.b.observe_qemu(VM).await);
        assert!(
            !(a == QemuObserved::Running && b == QemuObserved::Running),
            "the guest runs on both hosts\n{}",
            p.b.log_tail()
        );
        if b == QemuObserved::NoQemu {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the target kept its copy ({b:?})\n{}",
            p.b.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The whole matrix (`FERRY_LONG=1`): every failpoint x every fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix() {
    if std::env::var("FERRY_LONG").ok().as_deref() != Some("1") {
        eprintln!("fault_matrix: long suite only (FERRY_LONG=1)");
        return;
    }
    let _s = SERIAL.lock().await;
    // FERRY_MATRIX_POINTS=a,b,c runs those rows only (re-running a failed row).
    let only: Option<Vec<String>> = std::env::var("FERRY_MATRIX_POINTS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let points: Vec<&'static str> = ferry_agent::failpoint::POINTS
        .iter()
        .copied()
        .filter(|p| only.as_ref().is_none_or(|o| o.iter().any(|x| x == p)))
        .collect();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for point in points {
        for fault in FAULTS {
            let c = run_cell(point, fault, false).await;
            let verdict = match (&c.verdict, c.reached) {
                (Ok(()), true) if c.crashed => {
                    "one owner; the fault killed its only running QEMU (VM crashed there, not lost by the handoff); nothing left over".to_string()
                }
                (Ok(()), true) => "one owner, memory verified, nothing left over".to_string(),
                (Ok(()), false) => {
                    "point not reached in this migration; migration still clean".to_string()
                }
                (Err(e), _) => {
                    failed.push(format!("{point} x {fault:?}: {e}"));
                    format!("FAILED: {}", e.lines().next().unwrap_or_default())
                }
            };
            eprintln!("{point} x {fault:?}: {verdict} ({:.0} s)", c.secs);
            rows.push(format!(
                "| `{}` | {:?} | {} | {} | {} |",
                c.point, c.fault, c.owner, c.outcome, verdict
            ));
        }
    }
    let table = format!("| failpoint | fault | owner after | source reports | verdict |\n|---|---|---|---|---|\n{}\n", rows.join("\n"));
    let out = ferry_testkit::repo_root()
        .map(|r| r.join("target/fault-matrix.md"))
        .unwrap_or_else(|_| PathBuf::from("fault-matrix.md"));
    let _ = std::fs::write(&out, &table);
    eprintln!("{table}\nwritten to {}", out.display());
    assert!(
        failed.is_empty(),
        "{} cells failed:\n{}",
        failed.len(),
        failed.join("\n\n")
    );
}

/// The per-host limit of outgoing migrations, and a migrating VM refusing preflight,
/// stop and undefine, each with a clear message; the migration then completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_limit_and_a_busy_vm_refuse_clearly() {
    let _s = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), &["a", "b"]).expect("pki");
    let extra = format!("{FAST_DEADLINES}max_outgoing = 1\n");
    let mut a = TestAgent::start_with_config(&ferryd(), "a", &pki, dir.path(), "tcg", &extra)
        .await
        .expect("agent a");
    let b = TestAgent::start_with_config(&ferryd(), "b", &pki, dir.path(), "tcg", FAST_DEADLINES)
        .await
        .expect("agent b");
    a.set_failpoints(Some("src.prepare.done=return(hang)"));
    a.restart().await.expect("restart a armed");
    boot(&a).await;
    let mut ca = a.client().await.expect("client a");
    let req = pb::StartMigrationRequest {
        vm: VM.into(),
        target: b.grpc_addr(),
        ..Default::default()
    };
    let id = ca
        .start_migration(req.clone())
        .await
        .expect("start")
        .into_inner()
        .id;
    assert!(
        a.wait_failpoint("src.prepare.done", Duration::from_secs(120))
            .await
    );
    let err = ca
        .start_migration(req)
        .await
        .expect_err("second migration over the limit");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("max_outgoing = 1"), "{err:?}");
    let pre = pb::PreflightRequest {
        vm: VM.into(),
        target: b.grpc_addr(),
        ..Default::default()
    };
    let err = ca
        .preflight(pre)
        .await
        .expect_err("preflight of a migrating VM");
    assert!(err.message().contains("is migrating"), "{err:?}");
    let err = ca
        .stop_vm(pb::StopVmRequest {
            name: VM.into(),
            force: true,
        })
        .await
        .expect_err("stop of a migrating VM");
    assert!(err.message().contains("migrating"), "{err:?}");
    let err = ca
        .undefine_vm(pb::VmRef { name: VM.into() })
        .await
        .expect_err("undefine of a migrating VM");
    assert!(err.message().contains("migrating"), "{err:?}");
    a.release_failpoint().expect("release");
    let end = wait_settled(&a, &id, Duration::from_secs(120))
        .await
        .expect("settled");
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "{end:?}\n{}",
        a.log_tail()
    );
    assert_eq!(b.observe_qemu(VM).await, QemuObserved::Running);
    assert_eq!(a.observe_qemu(VM).await, QemuObserved::NoQemu);
}

/// A rollback leaves a guest the operator had suspended suspended: the source QEMU, asked
/// directly, is paused afterwards, and the VM resumes only when the operator says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_leaves_a_suspended_guest_suspended() {
    let _s = SERIAL.lock().await;
    let p = pair(Some("src.precopy.round=return(error)"), None).await;
    boot(&p.a).await;
    let mut ca = p.a.client().await.expect("client a");
    ca.suspend_vm(pb::VmRef { name: VM.into() })
        .await
        .expect("suspend");
    assert_eq!(
        p.a.observe_qemu(VM).await,
        QemuObserved::Stopped("paused".into())
    );
    let end = start_failing(&p, Duration::from_secs(120)).await;
    assert!(end.message.contains("left suspended"), "{end:?}");
    assert_eq!(
        p.a.observe_qemu(VM).await,
        QemuObserved::Stopped("paused".into()),
        "still suspended after the rollback"
    );
    assert_eq!(p.b.observe_qemu(VM).await, QemuObserved::NoQemu);
    let info = ca
        .get_vm(pb::VmRef { name: VM.into() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.state, pb::VmState::Paused as i32, "{info:?}");
    ca.resume_vm(pb::VmRef { name: VM.into() })
        .await
        .expect("resume by the operator");
    assert_eq!(p.a.observe_qemu(VM).await, QemuObserved::Running);
    guest_memory_ok(&p.a).await.expect("guest memory");
}

/// A write tracker that misses writes (a test double around the real uffd tracker: the
/// `src.tracker.forget` hook drops 64 pages from each pre-copy collection) is caught by
/// the source's audit with `--verify sent`, whose pause-time check alone would not see
/// it (both sides' sums agree on the stale page). The migration fails, and the test asks
/// both QEMUs itself: the guest runs on the source only, its memory intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_catches_a_tracker_that_misses_writes() {
    let _s = SERIAL.lock().await;
    // An audit window as large as the guest: every forgotten page is re-hashed.
    let p = pair_with(
        Some("src.tracker.forget=return(64)"),
        None,
        "audit_pages_per_round = 1048576\n",
    )
    .await;
    boot(&p.a).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let id = start(&p, "lz4", false).await;
    let end = wait_settled(&p.a, &id, Duration::from_secs(180))
        .await
        .expect("settled");
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Failed as i32,
        "a tracker that misses writes must not get to commit: {end:?}\nA log:\n{}",
        p.a.log_tail()
    );
    assert!(
        end.error.contains("write tracker missed guest writes"),
        "{end:?}"
    );
    assert!(
        p.a.log_tail().contains("failpoint src.tracker.forget hit"),
        "the hook fired"
    );
    assert_runs_on_the_source_only(&p).await;
}

/// A target whose RAM directory has no room for the guest is refused before a page moves
/// (preflight; Prepare checks again for a race), saying so; the guest keeps running on
/// the source (both QEMUs asked) with its memory intact, and the target keeps nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_ram_directory_on_the_target_is_refused_before_anything_moves() {
    let _s = SERIAL.lock().await;
    let p = pair(None, None).await;
    let _full = Tmpfs::mount(p.b.ram_dir(), 64);
    boot(&p.a).await;
    let end = start_failing(&p, Duration::from_secs(120)).await;
    assert!(
        end.error.contains("do not fit in the RAM directory") && end.error.contains("MiB free"),
        "{end:?}"
    );
    assert_eq!(end.stats.as_ref().map(|s| s.wire_bytes), Some(0), "{end:?}");
    assert!(
        files_in(p.b.ram_dir()).is_empty(),
        "{:?}",
        files_in(p.b.ram_dir())
    );
    assert_runs_on_the_source_only(&p).await;
}

/// A migration whose target fails during pre-copy (`target_failpoints` armed on B): it
/// ends FAILED, the target keeps no VM, and the guest runs on the source only (both QEMUs
/// asked, its memory checked). Returns the pair and the source's final status.
async fn target_failing_during_precopy(
    target_failpoints: &str,
    prealloc: bool,
) -> (Pair, pb::MigrationStatus) {
    let p = pair(None, Some(target_failpoints)).await;
    boot_with(&p.a, false, prealloc).await;
    let end = start_failing(&p, Duration::from_secs(180)).await;
    assert!(!lists_vm(&p.b).await, "the target keeps no VM");
    assert_runs_on_the_source_only(&p).await;
    (p, end)
}

/// The target QEMU starts while pre-copy runs (Prepare answers before it does); when its
/// start fails (injected at `tgt.qemu.started`, after the spawn: the test double stands
/// for a QEMU that will not take its migration settings), the target ends the migration
/// at once and tells the source why: the guest runs on the source only, asked of both
/// QEMUs, memory intact, and no QEMU process is left on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_qemu_failing_to_start_during_precopy_rolls_back() {
    let _s = SERIAL.lock().await;
    let (p, end) = target_failing_during_precopy("tgt.qemu.started=return(error)", false).await;
    assert!(
        end.error.contains("target QEMU") && end.error.contains("tgt.qemu.started"),
        "{end:?}"
    );
    assert!(
        p.b.qemu_pids().is_empty(),
        "no QEMU left on the target: {:?}",
        p.b.qemu_pids()
    );
}

/// A VM with `memory_prealloc` has its RAM file allocated in full while pre-copy runs;
/// when that fails (injected at `tgt.ram.reserve`: the test double stands for a RAM
/// directory filled by someone else after Prepare's check), the target refuses the device
/// state and the migration rolls back: the guest runs on the source only, asked of both
/// QEMUs, memory intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ram_allocation_failing_during_precopy_rolls_back() {
    let _s = SERIAL.lock().await;
    let (_p, end) = target_failing_during_precopy("tgt.ram.reserve=return(error)", true).await;
    assert!(
        end.error.contains("cannot allocate the guest's RAM"),
        "{end:?}"
    );
}

/// A target whose RAM directory fills up after Prepare admitted the guest (someone else's
/// file written while the target is held at `tgt.hello.done`, before any page moved): the
/// default guest's pages take room as they arrive, meet ENOSPC on the target, and the
/// target ends the migration saying so; it rolls back, the guest runs on the source only
/// (both QEMUs asked, its memory checked), and the target keeps no VM and no RAM file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ram_directory_filling_up_during_precopy_rolls_back() {
    let _s = SERIAL.lock().await;
    let mut p = pair(None, Some("tgt.hello.done=return(hang)")).await;
    // Room for the 256 MiB guest at admission…
    let _tmpfs = Tmpfs::mount(p.b.ram_dir(), 320);
    boot(&p.a).await;
    let id = start(&p, "", false).await;
    assert!(
        p.b.wait_failpoint("tgt.hello.done", Duration::from_secs(60))
            .await,
        "the target reached the hello:\n{}",
        p.b.log_tail()
    );
    // …then 300 MiB of someone else's: 20 MiB left, less than the guest's pages.
    let filler = p.b.ram_dir().join("someone-else");
    std::fs::write(&filler, vec![1u8; 300 << 20]).expect("fill the RAM directory");
    let end = release_into_a_full_directory(&p, &id, p.b.ram_dir()).await;
    assert!(
        end.error.contains("target reported:") && end.error.contains("No space left on device"),
        "the target's reason: {end:?}"
    );
}

/// The end of a test that filled a directory of the target (`someone-else`, the only file
/// allowed to remain there) while the target was held at a failpoint: releases it and
/// checks the migration failed and rolled back — no VM and nothing of ours left in `dir`
/// on the target, the guest running on the source only (both QEMUs asked, its memory
/// checked). Returns the end for the caller's check of the reason.
async fn release_into_a_full_directory(p: &Pair, id: &str, dir: &Path) -> pb::MigrationStatus {
    p.b.release_failpoint().expect("release");
    let end = wait_settled(&p.a, id, Duration::from_secs(120))
        .await
        .expect("settled");
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32, "{end:?}");
    assert!(!lists_vm(&p.b).await, "the target keeps no VM");
    assert_eq!(
        files_in(dir),
        vec!["someone-else".to_string()],
        "nothing of the migration left in {} on the target",
        dir.display()
    );
    assert_runs_on_the_source_only(p).await;
    end
}

/// A target whose storage fills up after Prepare made the disk's empty copy (someone
/// else's file written while the target is held at `tgt.prepare.done`, leaving 64 KiB):
/// the source's mirror meets ENOSPC writing the guest's disk into the copy; the migration
/// fails saying so (QEMU's own error for the job, naming the disk and the target), rolls
/// back, the guest runs on the source only (both QEMUs asked, its memory and disk checked
/// by the guest itself), and the target keeps no VM and no copy: only the other file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_storage_filling_up_during_the_disk_mirror_rolls_back() {
    let _s = SERIAL.lock().await;
    let mut p = pair(None, Some("tgt.prepare.done=return(hang)")).await;
    // Room for the copy at Prepare…
    let _tmpfs = Tmpfs::mount(p.b.storage_dir(), 96);
    boot_with(&p.a, true, false).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let id = start(&p, "", false).await;
    assert!(
        p.b.wait_failpoint("tgt.prepare.done", Duration::from_secs(60))
            .await,
        "the target prepared:\n{}",
        p.b.log_tail()
    );
    assert!(
        files_in(p.b.storage_dir()).contains(&"fault01.qcow2".to_string()),
        "the copy exists: {:?}",
        files_in(p.b.storage_dir())
    );
    // …then someone else's file: 64 KiB left, less than what the guest wrote.
    let free = ferry_agent::preflight::fs_free(p.b.storage_dir());
    let filler = p.b.storage_dir().join("someone-else");
    std::fs::write(&filler, vec![1u8; (free - (64 << 10)) as usize]).expect("fill the storage");
    let end = release_into_a_full_directory(&p, &id, p.b.storage_dir()).await;
    assert!(
        end.error.contains("No space left on device")
            && end.error.contains("disk 'disk0'")
            && end.error.contains(&p.b.grpc_addr()),
        "the mirror's own reason, naming disk and target: {}",
        end.error
    );
}

/// Cancels migration `id` while the target is held at a failpoint: the migration ends
/// CANCELLED on the source; then the target is released.
async fn cancel_while_the_target_is_held(p: &Pair, id: &str) {
    let mut ca = p.a.client().await.expect("client a");
    ca.cancel_migration(pb::MigrationRef { id: id.to_string() })
        .await
        .expect("cancel");
    let end = wait_settled(&p.a, id, Duration::from_secs(30))
        .await
        .expect("settled");
    assert_eq!(end.phase, pb::MigrationPhase::Cancelled as i32, "{end:?}");
    p.b.release_failpoint().expect("release");
}

/// The operator cancels a migration while the target is still preparing it (held at
/// `tgt.copies.made`, the disk's copy made): the source rolls back and tells the target,
/// whose Prepare — which runs on whatever the caller does — discards what it made as soon
/// as it gets past that point. So the same guest migrates at once when asked again.
/// (Before, the target kept the VM's name, RAM file and copy until its watchdog, a
/// minute, and refused the retry.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_cancelled_while_the_target_prepares_can_be_retried_at_once() {
    let _s = SERIAL.lock().await;
    let mut p = pair(None, Some("tgt.copies.made=1*return(hang)")).await;
    boot_with(&p.a, true, false).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let id = start(&p, "", false).await;
    assert!(
        p.b.wait_failpoint("tgt.copies.made", Duration::from_secs(60))
            .await,
        "the target is making the copy:\n{}",
        p.b.log_tail()
    );
    cancel_while_the_target_is_held(&p, &id).await;
    // The target lets go of everything within seconds, not at its watchdog.
    let deadline = Instant::now() + Duration::from_secs(15);
    while (lists_vm(&p.b).await || !files_in(p.b.storage_dir()).is_empty())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!lists_vm(&p.b).await, "the target still holds the VM");
    assert!(
        files_in(p.b.storage_dir()).is_empty(),
        "disk copy left on the target: {:?}",
        files_in(p.b.storage_dir())
    );
    assert_runs_on_the_source_only(&p).await;
    // Asked again, the guest moves.
    let again = start(&p, "", false).await;
    let end = wait_settled(&p.a, &again, Duration::from_secs(120))
        .await
        .expect("settled");
    assert_eq!(end.phase, pb::MigrationPhase::Completed as i32, "{end:?}");
    assert_eq!(p.b.observe_qemu(VM).await, QemuObserved::Running);
    assert_eq!(p.a.observe_qemu(VM).await, QemuObserved::NoQemu);
    guest_memory_ok(&p.b)
        .await
        .expect("guest memory and disk on the target");
}

/// The immutable flag on a file (`chattr +i`): unlink fails with EPERM, root's too. Cleared
/// again on drop, so that a failing test does not leave an undeletable temp directory.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Immutable {
        chattr("+i", path);
        Immutable(path.to_path_buf())
    }
    fn clear(&self) {
        chattr("-i", &self.0);
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

fn chattr(flag: &str, path: &Path) {
    let st = std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .status()
        .expect("run chattr (e2fsprogs)");
    assert!(st.success(), "chattr {flag} {}", path.display());
}

/// The target's `ferry_disk_copies_left_behind` gauge once it reads `want` (its sweep
/// runs every 2 s here), or what it read last after 20 s.
async fn left_behind_gauge(agent: &TestAgent, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = ferry_testkit::scrape_metrics(&agent.metrics_addr()).expect("scrape");
        let v = ferry_testkit::metric_sum(&text, "ferry_disk_copies_left_behind");
        if v == want || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The start of the tests of copies left behind: agents whose target sweeps every 2 s,
/// a migration with a travelling disk cancelled while the target is held after Prepare,
/// its copy made immutable first (a real EPERM from unlink, root's too). Checks the
/// target let go of the VM at once while the copy stands, the guest runs on the source
/// only (both QEMUs asked), and the gauge `ferry_disk_copies_left_behind` reads 1.
/// Returns the pair, the copy's path and its immutable flag.
async fn leave_a_copy_behind() -> (Pair, PathBuf, Immutable) {
    let mut p = pair_with(
        None,
        Some("tgt.hello.done=1*return(hang)"),
        "left_behind_retry_s = 2\n",
    )
    .await;
    boot_with(&p.a, true, false).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let id = start(&p, "", false).await;
    assert!(
        p.b.wait_failpoint("tgt.hello.done", Duration::from_secs(60))
            .await,
        "the target prepared:\n{}",
        p.b.log_tail()
    );
    let copy = p.b.storage_dir().join("fault01.qcow2");
    assert!(copy.exists(), "{:?}", files_in(p.b.storage_dir()));
    let pinned = Immutable::set(&copy);
    cancel_while_the_target_is_held(&p, &id).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while lists_vm(&p.b).await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!lists_vm(&p.b).await, "the target still holds the VM");
    assert_runs_on_the_source_only(&p).await;
    assert!(copy.exists(), "the copy could not be removed");
    assert_eq!(
        left_behind_gauge(&p.b, 1.0).await,
        1.0,
        "the target counts the copy it could not remove"
    );
    (p, copy, pinned)
}

/// A disk copy whose removal fails when its migration is cancelled is not forgotten: the
/// target lists it in its journal (the gauge reads 1, after a restart of the target too),
/// a retry is refused naming the file, and once the file can be removed the target's
/// periodic sweep removes it (with its staging name: nothing left in its storage) and the
/// retry completes — guest memory and disk checked on the target, both QEMUs asked, the
/// copy's staging name gone with the commit. (Before, the copy was logged and
/// forgotten: it stayed until an operator found it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_copy_that_cannot_be_removed_yet_is_removed_when_it_can() {
    let _s = SERIAL.lock().await;
    let (mut p, _copy, pinned) = leave_a_copy_behind().await;
    // While it stands there, a retry is refused, naming it.
    let refused = start_failing(&p, Duration::from_secs(60)).await;
    assert!(
        refused.error.contains("fault01.qcow2") && refused.error.contains("already exists"),
        "{}",
        refused.error
    );
    assert_runs_on_the_source_only(&p).await;
    // The journal keeps it across a restart (whose sweep fails on it again).
    p.b.set_failpoints(None);
    p.b.restart().await.expect("restart b");
    assert_eq!(left_behind_gauge(&p.b, 1.0).await, 1.0, "after the restart");
    // Removable again: the sweep takes it, staging name and all.
    pinned.clear();
    assert_eq!(
        left_behind_gauge(&p.b, 0.0).await,
        0.0,
        "the sweep removed it"
    );
    assert!(
        files_in(p.b.storage_dir()).is_empty(),
        "left in the target's storage: {:?}",
        files_in(p.b.storage_dir())
    );
    let again = start(&p, "", false).await;
    let end = wait_settled(&p.a, &again, Duration::from_secs(120))
        .await
        .expect("settled");
    assert_eq!(end.phase, pb::MigrationPhase::Completed as i32, "{end:?}");
    assert_eq!(p.b.observe_qemu(VM).await, QemuObserved::Running);
    assert_eq!(p.a.observe_qemu(VM).await, QemuObserved::NoQemu);
    guest_memory_ok(&p.b)
        .await
        .expect("guest memory and disk on the target");
    // Committed: the copy is the VM's disk now, its staging name gone.
    assert_eq!(
        files_in(p.b.storage_dir()),
        vec!["fault01.qcow2".to_string()]
    );
}

/// A copy left behind that an operator has since defined a VM on is that VM's disk: the
/// sweep, once it could remove the file, leaves it (and drops only the migration's hidden
/// staging name) and stops counting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_copy_left_behind_that_a_vm_now_uses_is_left_to_it() {
    let _s = SERIAL.lock().await;
    let (p, copy, pinned) = leave_a_copy_behind().await;
    let g = guest_artifacts().expect("guest artifacts");
    let mut cb = p.b.client().await.expect("client b");
    cb.define_vm(pb::DefineVmRequest {
        spec: Some(pb::VmSpec {
            name: "claimer01".into(),
            vcpus: 1,
            memory_mib: 128,
            kernel: g.kernel.display().to_string(),
            initrd: g.initrd.display().to_string(),
            disks: vec![pb::DiskSpec {
                id: "disk0".into(),
                path: copy.display().to_string(),
                format: "qcow2".into(),
                read_only: false,
            }],
            ..Default::default()
        }),
    })
    .await
    .expect("define a VM on the copy");
    pinned.clear();
    assert_eq!(left_behind_gauge(&p.b, 0.0).await, 0.0, "no longer counted");
    assert_eq!(
        files_in(p.b.storage_dir()),
        vec!["fault01.qcow2".to_string()],
        "the VM's disk stays, the staging name goes"
    );
    // Still there a few sweeps later.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(copy.exists(), "the sweep removed a defined VM's disk");
    assert_runs_on_the_source_only(&p).await;
}

/// Admission counts what the guests already on the target may still take: a guest's RAM
/// is allocated as it writes it, so the room its file does not hold yet is promised to
/// it. The target's RAM directory (a tmpfs) gets a running 512 MiB guest of its own and
/// someone else's file leaving room for the 256 MiB guest alone but not beside what that
/// guest may still take: the migration is refused before a page moves, saying so, and
/// both guests run where they were (their QEMUs asked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_counts_what_its_own_guests_may_still_take() {
    let _s = SERIAL.lock().await;
    let p = pair(None, None).await;
    let _tmpfs = Tmpfs::mount(p.b.ram_dir(), 1024);
    let g = guest_artifacts().expect("guest artifacts: run scripts/build-guest.sh");
    let resident =
        p.b.define_and_boot(pb::VmSpec {
            name: "resident01".into(),
            vcpus: 1,
            memory_mib: 512,
            kernel: g.kernel.display().to_string(),
            initrd: g.initrd.display().to_string(),
            cmdline: workload_cmdline(32, 1.0, "realistic", 3),
            ..Default::default()
        })
        .await
        .expect("boot the target's own guest");
    boot(&p.a).await;
    let held = allocated_bytes(&resident.ram_file);
    let promised = (512u64 << 20).saturating_sub(held);
    assert!(
        promised > 64 << 20,
        "a sparse guest: {held} of 512 MiB held"
    );
    // Leave room for the 256 MiB guest and half of what the resident one may still take.
    let free = ferry_agent::preflight::fs_free(p.b.ram_dir());
    let leave = (256u64 << 20) + promised / 2;
    assert!(free > leave, "{free} free");
    let filler = p.b.ram_dir().join("someone-else");
    std::fs::write(&filler, vec![1u8; (free - leave) as usize]).expect("fill");
    let end = start_failing(&p, Duration::from_secs(120)).await;
    // The source's preflight refuses it from the target's facts (`ram_promised_bytes`);
    // the target's own Prepare applies the same rule (unit test in vms.rs).
    assert!(
        end.error
            .contains("do not fit in the RAM directory beside the")
            && end
                .error
                .contains("the guests already there may still take"),
        "{end:?}"
    );
    assert_eq!(end.stats.as_ref().map(|s| s.wire_bytes), Some(0), "{end:?}");
    assert_runs_on_the_source_only(&p).await;
    assert_eq!(
        p.b.observe_qemu("resident01").await,
        QemuObserved::Running,
        "the target's own guest runs on"
    );
    let mut cb = p.b.client().await.expect("client b");
    cb.stop_vm(pb::StopVmRequest {
        name: "resident01".into(),
        force: true,
    })
    .await
    .expect("stop the resident guest");
}
