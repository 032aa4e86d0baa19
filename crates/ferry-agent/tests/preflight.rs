//! Preflight checks and stall policies against real agents and guests.

use ferry_api::v1 as pb;
use ferry_api::v1::ferry_control_client::FerryControlClient;
use ferry_testkit::{
    guest_artifacts, parse_pong, workload_cmdline, GuestConsole, TestAgent, TestPki,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ferryd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferryd"))
}

fn spec(name: &str, memory_mib: u64, work_mib: u64, dirty: f64) -> pb::VmSpec {
    let g = guest_artifacts().expect("guest artifacts: run scripts/build-guest.sh");
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib,
        kernel: g.kernel.display().to_string(),
        initrd: g.initrd.display().to_string(),
        cmdline: workload_cmdline(work_mib, dirty, "realistic", 5),
        ..Default::default()
    }
}

async fn boot(agent: &TestAgent, s: pb::VmSpec) -> pb::VmInfo {
    agent.define_and_boot(s).await.expect("boot the guest")
}

fn check<'a>(r: &'a pb::PreflightReport, name: &str) -> &'a pb::PreflightCheck {
    r.checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no '{name}' check in {r:?}"))
}

async fn preflight(
    c: &mut FerryControlClient<Channel>,
    vm: &str,
    target: &str,
    bandwidth: u64,
) -> pb::PreflightReport {
    c.preflight(pb::PreflightRequest {
        vm: vm.into(),
        target: target.into(),
        bandwidth_bytes_per_sec: bandwidth,
        // Uncompressed: the convergence figures below are about the raw link.
        compress: "none".into(),
        ..Default::default()
    })
    .await
    .expect("preflight")
    .into_inner()
}

async fn still_runs_on(agent: &TestAgent, vm: &str, pid: u32) {
    let mut c = agent.client().await.expect("client");
    let info = c
        .get_vm(pb::VmRef { name: vm.into() })
        .await
        .expect("vm")
        .into_inner();
    assert_eq!(
        info.state,
        pb::VmState::Running as i32,
        "{vm} runs on {}",
        agent.name()
    );
    assert_eq!(info.pid, pid);
    let mut con = GuestConsole::connect(Path::new(&info.console_socket), Duration::from_secs(10))
        .await
        .expect("console");
    let w1 = parse_pong(
        &con.command("ping", "FERRY-PONG", Duration::from_secs(30))
            .await
            .expect("pong"),
    )
    .expect("pong");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let w2 = parse_pong(
        &con.command("ping", "FERRY-PONG", Duration::from_secs(30))
            .await
            .expect("pong"),
    )
    .expect("pong");
    assert!(w2 > w1, "guest keeps writing on {}", agent.name());
    let line = con
        .command("check", "FERRY-CHECK", Duration::from_secs(120))
        .await
        .expect("check");
    assert!(line.contains(" ok "), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_checks_block_the_migration_with_specific_messages() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), &["a", "b"]).expect("pki");
    let a = TestAgent::start(&ferryd(), "a", &pki, dir.path(), "tcg")
        .await
        .expect("a");
    // Simulated: host b says it offers only these CPU features — no `nx`, which the
    // guest's qemu64 model uses. (Under TCG nothing is missing for real.)
    let b = TestAgent::start_with_config(
        &ferryd(),
        "b",
        &pki,
        dir.path(),
        "tcg",
        "[preflight]\ncpu_features = [\"fpu\", \"tsc\", \"cx8\", \"apic\", \"sep\", \"cmov\", \"sse\", \"sse2\", \"syscall\", \"lm\"]\n",
    )
    .await
    .expect("b");
    let vm = boot(&a, spec("pf01", 256, 32, 2.0)).await;
    let mut ca = a.client().await.expect("client a");

    let r = preflight(&mut ca, "pf01", &b.grpc_addr(), 0).await;
    assert!(!r.ok && !r.ok_with_force, "{r:?}");
    let cpu = check(&r, "cpu");
    assert_eq!(cpu.status, pb::CheckStatus::Fail as i32);
    assert!(
        cpu.detail
            .starts_with("b lacks CPU features the guest (qemu64) uses: nx"),
        "nx named first: {}",
        cpu.detail
    );
    assert!(!cpu.soft, "a missing CPU feature cannot be forced");
    assert_eq!(check(&r, "vm-name").status, pb::CheckStatus::Pass as i32);
    assert_eq!(
        check(&r, "reachability").status,
        pb::CheckStatus::Pass as i32
    );

    // The migration runs preflight itself and does not start, even with force.
    let m = ca
        .start_migration(pb::StartMigrationRequest {
            vm: "pf01".into(),
            target: b.grpc_addr(),
            force: true,
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
        end.error.contains("failed at preflight") && end.error.contains("nx"),
        "{}",
        end.error
    );
    assert_eq!(
        end.stats.as_ref().map(|s| s.pages_sent),
        Some(0),
        "no page moved"
    );
    let mut cb = b.client().await.expect("client b");
    assert!(
        cb.list_vms(pb::ListVmsRequest {})
            .await
            .expect("list")
            .into_inner()
            .vms
            .is_empty(),
        "nothing prepared on b"
    );
    still_runs_on(&a, "pf01", vm.pid).await;

    // A name clash, a missing bridge, too little memory: defined (not running) VMs.
    cb.define_vm(pb::DefineVmRequest {
        spec: Some(spec("clash", 256, 32, 0.0)),
    })
    .await
    .expect("define on b");
    let mut s = spec("clash", 256, 32, 0.0);
    s.nics.push(pb::NicSpec {
        id: "net0".into(),
        mac: String::new(),
        bridge: "ferrynobr0".into(),
    });
    ca.define_vm(pb::DefineVmRequest { spec: Some(s) })
        .await
        .expect("define clash on a");
    let r = preflight(&mut ca, "clash", &b.grpc_addr(), 0).await;
    let name = check(&r, "vm-name");
    assert_eq!(name.status, pb::CheckStatus::Fail as i32);
    assert_eq!(name.detail, "a VM named 'clash' is already defined on b");
    let br = check(&r, "bridges");
    assert_eq!(br.status, pb::CheckStatus::Fail as i32);
    assert_eq!(br.detail, "bridge(s) ferrynobr0 do not exist on b");

    ca.define_vm(pb::DefineVmRequest {
        spec: Some(spec("huge", 1 << 20, 32, 0.0)),
    })
    .await
    .expect("define huge");
    let r = preflight(&mut ca, "huge", &b.grpc_addr(), 0).await;
    let mem = check(&r, "memory");
    assert_eq!(mem.status, pb::CheckStatus::Fail as i32);
    assert!(
        mem.detail
            .starts_with("b: 1048576 MiB of guest RAM do not fit")
            && mem.detail.contains("MiB available"),
        "{}",
        mem.detail
    );
    assert!(!r.ok);
}

/// The guest writes 48 MiB/s, the data plane is capped at 24 MiB/s: it cannot converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_convergence_is_predicted_and_handled_by_policy() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), &["a", "b"]).expect("pki");
    let a = TestAgent::start(&ferryd(), "a", &pki, dir.path(), "tcg")
        .await
        .expect("a");
    let b = TestAgent::start(&ferryd(), "b", &pki, dir.path(), "tcg")
        .await
        .expect("b");
    let vm = boot(&a, spec("busy", 256, 64, 48.0)).await;
    let mut ca = a.client().await.expect("client a");
    let cap = 24u64 << 20;

    let r = preflight(&mut ca, "busy", &b.grpc_addr(), cap).await;
    let conv = check(&r, "convergence");
    assert_eq!(conv.status, pb::CheckStatus::Fail as i32, "{conv:?}");
    assert!(
        conv.soft && conv.detail.starts_with("will not converge"),
        "{conv:?}"
    );
    let p = r.prediction.expect("prediction");
    assert!(!p.converges);
    assert!(
        p.dirty_pages_per_sec * 4096.0 > 30.0 * 1048576.0,
        "measured dirty rate near 48 MiB/s: {p:?}"
    );
    assert!(r.ok_with_force && !r.ok);

    // A migration does not probe before moving pages: round 0 measures the link and the
    // write rate, and without force the same soft failure stops it there (rolled back);
    // with --on-stall abort (forced) the stall policy stops it cleanly.
    let start = |on_stall: &str, force: bool| pb::StartMigrationRequest {
        vm: "busy".into(),
        target: b.grpc_addr(),
        bandwidth_bytes_per_sec: cap,
        compress: "none".into(),
        on_stall: on_stall.into(),
        force,
        ..Default::default()
    };
    let m = ca
        .start_migration(start("abort", false))
        .await
        .expect("start")
        .into_inner();
    let end = ferry_testkit::watch_to_end(&mut ca, &m.id)
        .await
        .expect("watch migration");
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32, "{end:?}");
    assert!(
        end.error.contains("failed at precopy")
            && end.error.contains("will not converge")
            && end.error.contains("--force"),
        "{}",
        end.error
    );
    // The prediction published is round 0's, from the capped link it measured.
    let p0 = end
        .stats
        .as_ref()
        .and_then(|s| s.prediction)
        .expect("prediction");
    assert!(
        !p0.converges && p0.link_bytes_per_sec > 0.0 && p0.link_bytes_per_sec < 32.0 * 1048576.0,
        "{p0:?}"
    );
    still_runs_on(&a, "busy", vm.pid).await;

    let m = ca
        .start_migration(start("abort", true))
        .await
        .expect("start")
        .into_inner();
    let end = ferry_testkit::watch_to_end(&mut ca, &m.id)
        .await
        .expect("watch migration");
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32, "{end:?}");
    assert!(
        end.error.contains("failed at precopy") && end.error.contains("does not converge"),
        "{}",
        end.error
    );
    still_runs_on(&a, "busy", vm.pid).await;
    let mut cb = b.client().await.expect("client b");
    assert!(cb
        .list_vms(pb::ListVmsRequest {})
        .await
        .expect("list")
        .into_inner()
        .vms
        .is_empty());

    // Throttling the guest's CPU lets it converge.
    let m = ca
        .start_migration(start("throttle", true))
        .await
        .expect("start")
        .into_inner();
    let end = ferry_testkit::watch_to_end(&mut ca, &m.id)
        .await
        .expect("watch migration");
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "{end:?}\n{}",
        a.log_tail()
    );
    let st = end.stats.expect("stats");
    assert!(
        st.policy_applied.contains("throttled guest CPU to"),
        "{st:?}"
    );
    let info = cb
        .get_vm(pb::VmRef {
            name: "busy".into(),
        })
        .await
        .expect("vm on b")
        .into_inner();
    let mut con = GuestConsole::connect(Path::new(&info.console_socket), Duration::from_secs(10))
        .await
        .expect("console");
    let line = con
        .command("check", "FERRY-CHECK", Duration::from_secs(120))
        .await
        .expect("check");
    assert!(line.contains(" ok "), "{line}");
}
