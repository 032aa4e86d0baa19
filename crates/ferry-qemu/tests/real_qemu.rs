//! Spawning, adopting and stopping a real QEMU (`qemu-system-x86_64`, or the
//! binary named by `FERRY_QEMU_BINARY`). No guest kernel is needed: the VMs
//! are started as migration targets (`-S -incoming defer`) and just wait.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_qemu::{
    machine_types, qemu_version, DiskFormat, DiskSpec, NicBackend, NicSpec, QemuError, QemuLaunch,
    QemuProcess, VmSpec,
};

fn qemu_binary() -> PathBuf {
    std::env::var_os("FERRY_QEMU_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// A diskful spec (validate() wants a boot source) whose disks are small
/// sparse raw files, and a user-mode NIC.
fn launch_in(dir: &Path, name: &str) -> QemuLaunch {
    let disk = dir.join("disk,0.raw");
    let seed = dir.join("seed.raw");
    for p in [&disk, &seed] {
        let f = std::fs::File::create(p).expect("create disk");
        f.set_len(1 << 20).expect("size disk");
    }
    let mut spec = VmSpec::new(name, 64);
    spec.disks.push(DiskSpec {
        id: "disk0".into(),
        path: disk,
        format: DiskFormat::Raw,
        bus: Default::default(),
        read_only: false,
    });
    spec.disks.push(DiskSpec {
        id: "seed".into(),
        path: seed,
        format: DiskFormat::Raw,
        bus: Default::default(),
        read_only: true,
    });
    spec.nics.push(NicSpec {
        id: "net0".into(),
        mac: Some("52:54:00:12:34:56".into()),
        backend: NicBackend::User,
    });
    // A comma in the run dir and RAM path exercises the `,,` escaping for
    // real.
    let mut l = QemuLaunch::new(spec, "tcg", dir.join("ram,0"), dir.join("run,0"));
    l.incoming = true;
    l.extra_env.push(("FERRY_TEST_MARK".into(), "1".into()));
    l
}

fn proc_alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; its cmdline is empty.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

#[tokio::test]
async fn spawn_qmp_and_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launch = launch_in(dir.path(), "spawn-test");
    let qemu = QemuProcess::spawn(&launch, &qemu_binary())
        .await
        .expect("spawn");
    let pid = qemu.pid();
    assert!(proc_alive(pid));
    assert!(qemu.try_exited().is_none());
    assert!(!qemu.is_adopted());

    let env = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    assert!(
        env.split(|b| *b == 0).any(|kv| kv == b"FERRY_TEST_MARK=1"),
        "extra env applied"
    );

    let st = qemu.qmp().query_status().await.expect("query-status");
    assert_eq!(st.status, "inmigrate", "{st:?}");
    assert!(!st.running);

    // Pidfile, console log and RAM file exist where argv said.
    let pidfile = std::fs::read_to_string(launch.pidfile()).expect("pidfile");
    assert_eq!(pidfile.trim(), pid.to_string());
    assert!(launch.console_path().exists());
    assert!(launch.ram_path.exists());

    // Disks are attached with our node names, the seed disk read-only.
    let blocks = qemu
        .qmp()
        .execute("query-block", None)
        .await
        .expect("query-block");
    let inserted = |node: &str| {
        blocks
            .as_array()
            .expect("array")
            .iter()
            .find_map(|b| b.get("inserted").filter(|i| i["node-name"] == node))
            .cloned()
            .unwrap_or_else(|| panic!("node {node} missing in {blocks}"))
    };
    assert_eq!(inserted("disk0")["ro"], false);
    assert_eq!(inserted("seed")["ro"], true);

    // A second QEMU on the same run dir is refused.
    let err = QemuProcess::spawn(&launch, &qemu_binary())
        .await
        .expect_err("in use");
    assert!(
        matches!(err, QemuError::AlreadyRunning { pid: p, .. } if p == pid),
        "{err}"
    );

    let exit = qemu
        .shutdown(Duration::from_secs(20))
        .await
        .expect("shutdown");
    assert!(exit.success(), "{exit}");
    assert!(!proc_alive(pid), "process gone after shutdown");
    assert_eq!(qemu.try_exited(), Some(exit));
    assert_eq!(qemu.wait_exit().await, exit);
}

#[tokio::test]
async fn spawn_bad_argument_reports_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut launch = launch_in(dir.path(), "bad-machine");
    launch.spec.machine = "no-such-machine-9.9".into();
    let err = QemuProcess::spawn(&launch, &qemu_binary())
        .await
        .expect_err("must fail");
    let msg = err.to_string();
    assert!(matches!(err, QemuError::EarlyExit { .. }), "{msg}");
    assert!(
        msg.contains("no-such-machine-9.9"),
        "stderr text missing: {msg}"
    );
    assert!(msg.contains("machine"), "{msg}");
    eprintln!("spawn error as reported: {msg}");
}

#[tokio::test]
async fn spawn_missing_binary_is_io_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launch = launch_in(dir.path(), "no-binary");
    let err = QemuProcess::spawn(&launch, Path::new("/nonexistent/qemu-system-x86_64"))
        .await
        .expect_err("must fail");
    assert!(matches!(err, QemuError::Io { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/qemu-system-x86_64"),
        "{err}"
    );
}

#[tokio::test]
async fn adopt_after_agent_restart_then_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launch = launch_in(dir.path(), "adopt-test");
    let qemu = QemuProcess::spawn(&launch, &qemu_binary())
        .await
        .expect("spawn");
    let pid = qemu.pid();
    // The "agent restart": drop our handle (and with it the QMP connection).
    drop(qemu);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(proc_alive(pid), "dropping the handle must not stop the VM");

    let wrong = dir.path().join("other-run");
    let err = QemuProcess::adopt(pid, &wrong)
        .await
        .expect_err("wrong run dir");
    assert!(matches!(err, QemuError::NotOurQemu { .. }), "{err}");

    let adopted = QemuProcess::adopt_run_dir(&launch.run_dir)
        .await
        .expect("adopt");
    assert_eq!(adopted.pid(), pid);
    assert!(adopted.is_adopted());
    let st = adopted.qmp().query_status().await.expect("query-status");
    assert_eq!(st.status, "inmigrate");
    assert!(adopted.try_exited().is_none());

    let exit = adopted.kill().await.expect("kill");
    assert_eq!(exit.status, None, "adopted: status unknown");
    // The original spawn's reaper task reaps it; give it a moment.
    for _ in 0..50 {
        if !proc_alive(pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!proc_alive(pid));

    let err = QemuProcess::adopt(pid, &launch.run_dir)
        .await
        .expect_err("gone");
    assert!(matches!(err, QemuError::NotRunning { .. }), "{err}");
}

#[tokio::test]
async fn probe_version_and_machine_types() {
    let v = qemu_version(&qemu_binary()).await.expect("version");
    assert!(v.major >= 7, "{v}");
    let types = machine_types(&qemu_binary()).await.expect("machine types");
    assert!(types.iter().any(|t| t == "pc-i440fx-7.2"), "{types:?}");
    assert!(types.iter().any(|t| t == "pc"), "{types:?}");
    let err = qemu_version(Path::new("/nonexistent/qemu"))
        .await
        .expect_err("missing");
    assert!(matches!(err, QemuError::Io { .. }), "{err}");
}
