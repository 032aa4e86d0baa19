//! The QMP client against a real QEMU (`qemu-system-x86_64`, or the binary
//! named by `FERRY_QEMU_BINARY`). No guest is needed: QEMU is started with
//! `-S` and just sits in "prelaunch".

use std::process::Stdio;
use std::time::Duration;

use ferry_qmp::{QmpClient, QmpError};

fn qemu_binary() -> String {
    std::env::var("FERRY_QEMU_BINARY").unwrap_or_else(|_| "qemu-system-x86_64".to_owned())
}

#[tokio::test]
async fn real_qemu_status_capabilities_quit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("qmp.sock");
    let mut child = tokio::process::Command::new(qemu_binary())
        .args([
            "-accel",
            "tcg",
            "-machine",
            "pc-i440fx-7.2",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-S",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn qemu (is qemu-system-x86_64 installed?)");

    let qmp = QmpClient::connect_retry(&sock, Duration::from_secs(30))
        .await
        .expect("connect");
    let v = qmp.version();
    assert!(v.major >= 7, "version {v}");
    if qemu_binary() == "qemu-system-x86_64" {
        // The installed QEMU on the project's machines is 10.x.
        assert_eq!(v.major, 10, "version {v}");
    }

    let st = qmp.query_status().await.expect("query-status");
    assert!(st.status == "prelaunch" || st.status == "paused", "{st:?}");
    assert!(!st.running);

    qmp.migrate_set_capabilities(&[
        ("events", true),
        ("x-ignore-shared", true),
        ("return-path", true),
        ("pause-before-switchover", true),
    ])
    .await
    .expect("migrate-set-capabilities");

    let mig = qmp.query_migrate().await.expect("query-migrate");
    assert!(
        mig.status.is_none() || mig.status.as_deref() == Some("none"),
        "{mig:?}"
    );

    // A real error reply from QEMU.
    let err = qmp
        .execute("no-such-command", None)
        .await
        .expect_err("must fail");
    assert_eq!(err.command_class(), Some("CommandNotFound"), "{err:?}");

    // Several commands in flight at once on one connection.
    let (a, b, c) = tokio::join!(
        qmp.query_status(),
        qmp.query_migrate(),
        qmp.execute("query-name", None)
    );
    a.expect("a");
    b.expect("b");
    c.expect("c");

    let mut events = qmp.subscribe();
    qmp.quit().await.expect("quit");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("qemu exits after quit")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    // SHUTDOWN may or may not be seen before the socket closes; afterwards
    // every wait ends with Disconnected.
    let r = ferry_qmp::wait_for_event(&mut events, Duration::from_secs(10), |e| e.name == "NEVER")
        .await;
    assert!(matches!(r, Err(QmpError::Disconnected)), "{r:?}");
    assert!(qmp.is_closed());
}
