//! Live migration of a guest that writes to its qcow2 disk, between two real ferryd
//! processes with real QEMU guests (TCG): without shared storage (the disk is mirrored
//! over NBD tunnelled through QUIC) and with it (both agents use one directory, like two
//! hosts mounting one NFS export).
//!
//! The guest workload writes random 4 KiB blocks to /dev/vda at a steady rate and keeps
//! a table of what it wrote in guest RAM; its `check` reads every one back past the page
//! cache, so a check on the target proves no acknowledged write was lost.

use ferry_api::v1 as pb;
use ferry_api::v1::ferry_control_client::FerryControlClient;
use ferry_disk::ImageFormat;
use ferry_testkit::{
    guest_artifacts, parse_check, workload_cmdline, GuestConsole, TestAgent, TestPki,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const VM_MIB: u64 = 256;
const WORKLOAD_MIB: u64 = 64;
const DISK_MIB: u64 = 128;

fn ferryd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferryd"))
}

fn guest_spec(name: &str, disk: &Path) -> pb::VmSpec {
    let g = guest_artifacts().expect("guest artifacts: run scripts/build-guest.sh");
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: VM_MIB,
        kernel: g.kernel.display().to_string(),
        initrd: g.initrd.display().to_string(),
        // 150 block writes/s (600 KiB/s) over the first 32 MiB, RAM dirtied at 5 MiB/s.
        cmdline: format!(
            "{} ferry.disk=/dev/vda ferry.disk_mib=32 ferry.disk_wps=150",
            workload_cmdline(WORKLOAD_MIB, 5.0, "realistic", 11)
        ),
        disks: vec![pb::DiskSpec {
            id: "disk0".into(),
            path: disk.display().to_string(),
            format: "qcow2".into(),
            read_only: false,
        }],
        ..Default::default()
    }
}

async fn boot(agent: &TestAgent, name: &str, disk: &Path) -> pb::VmInfo {
    agent
        .define_and_boot(guest_spec(name, disk))
        .await
        .expect("boot the guest")
}

async fn check(info: &pb::VmInfo) -> ferry_testkit::CheckResult {
    let mut con = GuestConsole::connect(Path::new(&info.console_socket), Duration::from_secs(10))
        .await
        .expect("console");
    let line = con
        .command("check", "FERRY-CHECK", Duration::from_secs(120))
        .await
        .expect("check reply");
    let r = parse_check(&line).expect("parse check");
    assert!(r.ok, "guest check failed: {line}");
    r
}

/// The preflight's storage check for `vm` against `target`.
async fn storage_check(
    c: &mut FerryControlClient<Channel>,
    vm: &str,
    target: String,
) -> pb::PreflightCheck {
    let report = c
        .preflight(pb::PreflightRequest {
            vm: vm.into(),
            target,
            ..Default::default()
        })
        .await
        .expect("preflight")
        .into_inner();
    report
        .checks
        .into_iter()
        .find(|c| c.name == "storage")
        .expect("a storage check")
}

async fn migrate(
    c: &mut FerryControlClient<Channel>,
    req: pb::StartMigrationRequest,
) -> pb::MigrationStatus {
    let id = c
        .start_migration(req)
        .await
        .expect("start migration")
        .into_inner()
        .id;
    ferry_testkit::watch_to_end(c, &id)
        .await
        .expect("watch migration")
}

fn new_image(path: &Path) {
    ferry_disk::image::create(path, ImageFormat::Qcow2, DISK_MIB << 20, None)
        .expect("qemu-img create");
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_mirrored_without_shared_storage_loses_no_write() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), &["a", "b"]).expect("pki");
    let a = TestAgent::start(&ferryd(), "a", &pki, dir.path(), "tcg")
        .await
        .expect("agent a");
    let b = TestAgent::start(&ferryd(), "b", &pki, dir.path(), "tcg")
        .await
        .expect("agent b");
    let disk_a = a.storage_dir().join("vm/disk0.qcow2");
    std::fs::create_dir_all(disk_a.parent().expect("parent")).expect("mkdir");
    new_image(&disk_a);
    let src = boot(&a, "db01", &disk_a).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = check(&src).await;
    assert!(
        before.disk_blocks > 100,
        "the guest should have written its disk by now: {before:?}"
    );
    let mut ca = a.client().await.expect("client a");
    let sc = storage_check(&mut ca, "db01", b.grpc_addr()).await;
    assert!(
        sc.status == pb::CheckStatus::Pass as i32 && sc.detail.contains("disk0: copied"),
        "{sc:?}"
    );

    // Asking for shared storage where there is none is refused before anything moves.
    let refused = migrate(
        &mut ca,
        pb::StartMigrationRequest {
            vm: "db01".into(),
            target: b.grpc_addr(),
            storage: "shared".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        refused.phase,
        pb::MigrationPhase::Failed as i32,
        "{refused:?}"
    );
    assert!(
        refused.error.contains("not on storage the target shares"),
        "{}",
        refused.error
    );
    assert!(
        files_under(b.storage_dir()).is_empty(),
        "B's storage must stay empty: {:?}",
        files_under(b.storage_dir())
    );

    // Detected as not shared: the disk is mirrored while the guest keeps writing. The
    // target is left paused so its image can be compared with the source's as of the
    // switchover.
    let end = migrate(
        &mut ca,
        pb::StartMigrationRequest {
            vm: "db01".into(),
            target: b.grpc_addr(),
            compress: "lz4".into(),
            leave_paused: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "migration failed: {end:?}\nA log:\n{}\nB log:\n{}",
        a.log_tail(),
        b.log_tail()
    );
    let st = end.stats.expect("stats");
    eprintln!(
        "disk mirror: storage {} disk {} of {} bytes, {} on the wire; downtime {} ms",
        st.storage, st.disk_bytes_done, st.disk_bytes_total, st.disk_wire_bytes, st.downtime_ms
    );
    assert_eq!(st.storage, "copied");
    assert!(
        st.disk_bytes_total > 0 && st.disk_bytes_done >= st.disk_bytes_total,
        "{st:?}"
    );
    assert!(
        st.disk_wire_bytes > 0,
        "disk bytes must have crossed the data plane: {st:?}"
    );

    // The VM is defined on B with B's own path for the image, and both images are equal.
    let mut cb = b.client().await.expect("client b");
    let on_b = cb
        .get_vm(pb::VmRef {
            name: "db01".into(),
        })
        .await
        .expect("VM on B")
        .into_inner();
    let disk_b = PathBuf::from(&on_b.spec.as_ref().expect("spec").disks[0].path);
    assert!(
        disk_b.starts_with(std::fs::canonicalize(b.storage_dir()).expect("canon")),
        "B's image {} must be under B's root",
        disk_b.display()
    );
    assert!(
        ca.get_vm(pb::VmRef {
            name: "db01".into()
        })
        .await
        .is_err(),
        "A must have forgotten the VM"
    );
    assert!(a.qemu_pids().is_empty(), "source QEMU must be gone");
    assert!(
        ferry_disk::image::compare(&disk_a, &disk_b).expect("qemu-img compare"),
        "images differ after the mirror"
    );

    // The guest on B verifies every block it ever wrote (before and during the migration).
    cb.resume_vm(pb::VmRef {
        name: "db01".into(),
    })
    .await
    .expect("resume on B");
    let after = check(&on_b).await;
    assert!(
        after.disk_blocks >= before.disk_blocks,
        "{after:?} vs {before:?}"
    );
    cb.stop_vm(pb::StopVmRequest {
        name: "db01".into(),
        force: true,
    })
    .await
    .expect("stop");

    // And back, cold: B's image is named relative to B's root, so it lands under A's
    // (a different path). A still has its own, older image of that name: never
    // overwritten, the refusal says where it is.
    let back = |storage_clash: bool| pb::StartMigrationRequest {
        vm: "db01".into(),
        target: a.grpc_addr(),
        offline: true,
        start_on_target: !storage_clash,
        ..Default::default()
    };
    let refused = migrate(&mut cb, back(true)).await;
    assert_eq!(
        refused.phase,
        pb::MigrationPhase::Failed as i32,
        "{refused:?}"
    );
    assert!(
        refused
            .error
            .contains("already exists on host a with different content")
            && refused.error.contains("disk0.qcow2"),
        "{}",
        refused.error
    );
    std::fs::remove_file(&disk_a).expect("the operator removes A's stale image");
    let home = migrate(&mut cb, back(false)).await;
    assert_eq!(
        home.phase,
        pb::MigrationPhase::Completed as i32,
        "cold migration back failed: {home:?}\nA log:\n{}\nB log:\n{}",
        a.log_tail(),
        b.log_tail()
    );
    assert!(home.error.is_empty(), "started on A: {}", home.error);
    let on_a = ca
        .get_vm(pb::VmRef {
            name: "db01".into(),
        })
        .await
        .expect("VM back on A")
        .into_inner();
    assert_eq!(on_a.state(), pb::VmState::Running);
    assert_eq!(
        on_a.spec.expect("spec").disks[0].path,
        std::fs::canonicalize(&disk_a)
            .expect("the image is back on A")
            .display()
            .to_string(),
        "defined with A's path"
    );
    ca.stop_vm(pb::StopVmRequest {
        name: "db01".into(),
        force: true,
    })
    .await
    .expect("stop on A");
    assert!(
        ferry_disk::image::compare(&disk_a, &disk_b).expect("qemu-img compare"),
        "the image came back as B had it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_storage_is_detected_and_no_disk_bytes_move() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), &["a", "b"]).expect("pki");
    // One directory for both agents: what two hosts mounting one NFS export see.
    let shared = dir.path().join("nfs");
    std::fs::create_dir_all(&shared).expect("mkdir");
    let a =
        TestAgent::start_with_storage(&ferryd(), "a", &pki, dir.path(), "tcg", "", Some(&shared))
            .await
            .expect("agent a");
    let b =
        TestAgent::start_with_storage(&ferryd(), "b", &pki, dir.path(), "tcg", "", Some(&shared))
            .await
            .expect("agent b");
    let disk = shared.join("db02.qcow2");
    new_image(&disk);
    let src = boot(&a, "db02", &disk).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = check(&src).await;
    let mut ca = a.client().await.expect("client a");
    let sc = storage_check(&mut ca, "db02", b.grpc_addr()).await;
    assert!(
        sc.status == pb::CheckStatus::Pass as i32 && sc.detail.contains("disk0: shared storage"),
        "{sc:?}"
    );

    // Copying onto the image the target already sees would destroy it: refused.
    let refused = migrate(
        &mut ca,
        pb::StartMigrationRequest {
            vm: "db02".into(),
            target: b.grpc_addr(),
            storage: "copy".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        refused.phase,
        pb::MigrationPhase::Failed as i32,
        "{refused:?}"
    );
    assert!(refused.error.contains("overwrite"), "{}", refused.error);
    check(&src).await;

    let end = migrate(
        &mut ca,
        pb::StartMigrationRequest {
            vm: "db02".into(),
            target: b.grpc_addr(),
            compress: "zstd".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "migration failed: {end:?}\nA log:\n{}\nB log:\n{}",
        a.log_tail(),
        b.log_tail()
    );
    let st = end.stats.expect("stats");
    assert_eq!(st.storage, "shared");
    assert_eq!(
        st.disk_bytes_total, 0,
        "no disk bytes may move on shared storage: {st:?}"
    );
    assert_eq!(st.disk_wire_bytes, 0);
    // No token file is left beside the image.
    let left: Vec<_> = files_under(&shared)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("ferry-token"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    let mut cb = b.client().await.expect("client b");
    let on_b = cb
        .get_vm(pb::VmRef {
            name: "db02".into(),
        })
        .await
        .expect("VM on B")
        .into_inner();
    assert_eq!(
        PathBuf::from(&on_b.spec.as_ref().expect("spec").disks[0].path),
        std::fs::canonicalize(&disk).expect("canon")
    );
    let after = check(&on_b).await;
    assert!(
        after.disk_blocks >= before.disk_blocks && after.disk_writes > before.disk_writes,
        "{after:?} vs {before:?}"
    );
    cb.stop_vm(pb::StopVmRequest {
        name: "db02".into(),
        force: true,
    })
    .await
    .expect("stop");
}
