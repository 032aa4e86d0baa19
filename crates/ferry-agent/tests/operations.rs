//! The operator's view: metrics while a migration runs, history and VMs across an agent
//! restart. Real ferryd processes, real QEMU guests (TCG).

use ferry_api::v1 as pb;
use ferry_testkit::{
    allocated_bytes, guest_artifacts, workload_cmdline, TestAgent, TestPki, Tmpfs,
};
use std::path::PathBuf;
use std::time::Duration;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ferryd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferryd"))
}

async fn boot_guest(agent: &TestAgent, name: &str) -> pb::VmInfo {
    let g = guest_artifacts().expect("guest artifacts: run scripts/build-guest.sh");
    let spec = pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 384,
        kernel: g.kernel.display().to_string(),
        initrd: g.initrd.display().to_string(),
        cmdline: workload_cmdline(160, 10.0, "realistic", 3),
        ..Default::default()
    };
    agent.define_and_boot(spec).await.expect("boot the guest")
}

fn scrape(addr: &str) -> String {
    ferry_testkit::scrape_metrics(addr).expect("scrape /metrics")
}

use ferry_testkit::metric_sum as metric;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_during_a_migration() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), &["a", "b"]).expect("pki");
    let a = TestAgent::start(&ferryd(), "a", &pki, dir.path(), "tcg")
        .await
        .expect("a");
    let b = TestAgent::start(&ferryd(), "b", &pki, dir.path(), "tcg")
        .await
        .expect("b");
    boot_guest(&a, "m01").await;
    let before = scrape(&a.metrics_addr());
    assert_eq!(metric(&before, "ferry_page_bytes_total"), 0.0);

    let mut ca = a.client().await.expect("client");
    // zstd level 3 on two cores keeps the migration going for a few seconds.
    let m = ca
        .start_migration(pb::StartMigrationRequest {
            vm: "m01".into(),
            target: b.grpc_addr(),
            compress: "zstd:3".into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    let mut seen_during = 0.0;
    let mut active_seen = false;
    loop {
        let text = scrape(&a.metrics_addr());
        let st = ca
            .get_migration(pb::MigrationRef { id: m.id.clone() })
            .await
            .expect("get")
            .into_inner();
        let terminal = ferry_agent::migration::is_terminal(st.phase);
        if !terminal {
            // Scraped before the status said it ended: the migration was running.
            seen_during = f64::max(
                seen_during,
                metric(&text, "ferry_page_bytes_total{codec=\"zstd:3\"}"),
            );
            active_seen |= metric(&text, "ferry_migrations_active") == 1.0;
        } else {
            assert_eq!(st.phase, pb::MigrationPhase::Completed as i32, "{st:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(active_seen, "ferry_migrations_active was 1 while it ran");
    assert!(
        seen_during > 0.0,
        "page bytes counted while the migration ran"
    );
    let after = scrape(&a.metrics_addr());
    let total = metric(&after, "ferry_page_bytes_total{codec=\"zstd:3\"}");
    assert!(
        total >= seen_during && total > (100u64 << 20) as f64,
        "{total} >= {seen_during}"
    );
    assert!(
        metric(&after, "ferry_wire_bytes_total{codec=\"zstd:3\"}") < total,
        "zstd wire bytes below page bytes"
    );
    assert_eq!(
        metric(
            &after,
            "ferry_migrations_total{result=\"completed\",role=\"source\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(metric(&after, "ferry_downtime_seconds_count"), 1.0);
    // The data plane's counters: the datagrams that carried those pages (at least one
    // per 1452 bytes of the wire), and the loss counters exported (loopback loses none
    // or few).
    let datagrams = metric(&after, "ferry_data_plane_datagrams_total");
    let wire = metric(&after, "ferry_wire_bytes_total{codec=\"zstd:3\"}");
    assert!(
        datagrams >= wire / 1452.0,
        "{datagrams} datagrams for {wire} bytes"
    );
    for name in [
        "ferry_data_plane_lost_packets_total",
        "ferry_data_plane_random_loss_events_total",
        "ferry_data_plane_floored_reductions_total",
    ] {
        assert!(
            after.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} exported: {after}"
        );
    }
    assert_eq!(metric(&after, "ferry_migrations_active"), 0.0);
    let target = scrape(&b.metrics_addr());
    assert_eq!(
        metric(
            &target,
            "ferry_migrations_total{result=\"committed\",role=\"target\"}"
        ),
        1.0,
        "{target}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_vms_survive_an_agent_restart() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), &["a"]).expect("pki");
    let mut a = TestAgent::start(&ferryd(), "a", &pki, dir.path(), "tcg")
        .await
        .expect("a");
    let vm = boot_guest(&a, "h01").await;
    let mut ca = a.client().await.expect("client");
    // Nothing listens there: the migration fails (at preflight) and is journaled.
    let m = ca
        .start_migration(pb::StartMigrationRequest {
            vm: "h01".into(),
            target: "127.0.0.1:9".into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    loop {
        let st = ca
            .get_migration(pb::MigrationRef { id: m.id.clone() })
            .await
            .expect("get")
            .into_inner();
        if ferry_agent::migration::is_terminal(st.phase) {
            assert_eq!(st.phase, pb::MigrationPhase::Failed as i32);
            assert!(
                st.error.contains("cannot reach target agent 127.0.0.1:9")
                    && st.error.contains("h01"),
                "{}",
                st.error
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    a.restart().await.expect("restart");
    let mut ca = a.client().await.expect("client");
    let list = ca
        .list_migrations(pb::ListMigrationsRequest {})
        .await
        .expect("list")
        .into_inner()
        .migrations;
    let old = list
        .iter()
        .find(|s| s.id == m.id)
        .expect("the earlier migration is still listed");
    assert_eq!(old.phase, pb::MigrationPhase::Failed as i32);
    assert!(old.error.contains("cannot reach target agent"));
    // The guest kept running through the agent's restart and was adopted again.
    let again = ca
        .get_vm(pb::VmRef { name: "h01".into() })
        .await
        .expect("vm")
        .into_inner();
    assert_eq!(again.state, pb::VmState::Running as i32);
    assert_eq!(again.pid, vm.pid);
    ca.stop_vm(pb::StopVmRequest {
        name: "h01".into(),
        force: true,
    })
    .await
    .expect("stop adopted VM");
}

/// A VM start is admitted as a migration's target is: all of its RAM must fit beside
/// what the guests already on the host may still take (a sparse guest is promised the
/// room its file does not hold yet). On a 600 MiB RAM directory (a tmpfs mounted over
/// it) running a sparse 512 MiB guest, a 128 MiB VM is refused at start with a clear
/// error, stays defined and leaves no RAM file, though the free room alone would hold it;
/// once the first guest stops it starts, preallocated (`memory_prealloc`): its RAM held in
/// full. Needs root (the mount), like the rest of these tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_start_counts_what_the_guests_already_there_may_still_take() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), &["a"]).expect("pki");
    let a = TestAgent::start(&ferryd(), "a", &pki, dir.path(), "tcg")
        .await
        .expect("a");
    let ram_dir = a.ram_dir().to_path_buf();
    let _tmpfs = Tmpfs::mount(&ram_dir, 600);
    let g = guest_artifacts().expect("guest artifacts: run scripts/build-guest.sh");
    let spec = |name: &str, mib: u64, prealloc: bool| pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: mib,
        memory_prealloc: prealloc,
        kernel: g.kernel.display().to_string(),
        initrd: g.initrd.display().to_string(),
        cmdline: workload_cmdline(16, 1.0, "realistic", 5),
        ..Default::default()
    };
    let resident = a
        .define_and_boot(spec("resident01", 512, false))
        .await
        .expect("boot the first guest");
    let held = allocated_bytes(&resident.ram_file);
    let mut ca = a.client().await.expect("client");
    ca.define_vm(pb::DefineVmRequest {
        spec: Some(spec("big01", 128, true)),
    })
    .await
    .expect("define");
    let refused = ca
        .start_vm(pb::VmRef {
            name: "big01".into(),
        })
        .await;
    let left: Vec<_> = std::fs::read_dir(&ram_dir)
        .expect("RAM dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let after_refusal = ca
        .get_vm(pb::VmRef {
            name: "big01".into(),
        })
        .await
        .expect("still defined")
        .into_inner();
    ca.stop_vm(pb::StopVmRequest {
        name: "resident01".into(),
        force: true,
    })
    .await
    .expect("stop the first guest");
    let started = ca
        .start_vm(pb::VmRef {
            name: "big01".into(),
        })
        .await;
    let big_held = started
        .as_ref()
        .ok()
        .map(|vm| allocated_bytes(&vm.get_ref().ram_file));
    let _ = ca
        .stop_vm(pb::StopVmRequest {
            name: "big01".into(),
            force: true,
        })
        .await;
    assert!(
        600 - (held >> 20) > 128,
        "the free room alone would hold the 128 MiB guest ({} MiB held by the first)",
        held >> 20
    );
    let e = refused.expect_err("128 MiB beside what a sparse 512 MiB guest may still take");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("cannot start VM 'big01'")
            && e.message()
                .contains("do not fit in the RAM directory beside the")
            && e.message()
                .contains("the guests already there may still take"),
        "{e:?}"
    );
    assert_eq!(
        left,
        vec!["resident01.ram".to_string()],
        "no RAM file for big01"
    );
    assert_eq!(after_refusal.state, pb::VmState::Defined as i32);
    assert_eq!(after_refusal.pid, 0);
    let started = started.expect("starts once the first guest stopped");
    assert!(started.get_ref().pid != 0, "{started:?}");
    let big_held = big_held.expect("big01's RAM file");
    assert!(big_held >= 128 << 20, "preallocated: {big_held} bytes held");
}
