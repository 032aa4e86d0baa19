//! Cold (offline) migration between real ferryd processes: real qcow2 images written with
//! qemu-io, the copy over QUIC, and a real QEMU boot on the target.
//!
//! A disk image is named relative to the storage roots and lands at that name under the
//! target's root. To have hosts with one root path on one machine, every agent runs in a
//! mount namespace of its own (`unshare -m`) in which the storage-root path shows that
//! host's private directory; the test reads each host's images in its private directory
//! (one host, `other`, has its root at another path). Needs root (mounts), like the rest
//! of the suite.
//!
//! The tests share the machine's two cores: they run one at a time (a global lock).

use ferry_api::v1 as pb;
use ferry_testkit::{guest_artifacts, workload_cmdline, QemuObserved, TestAgent, TestPki, Tmpfs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: u64 = 1 << 20;

fn ferryd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferryd"))
}

/// Agents of one test: their PKI and scratch directory.
struct Mesh {
    dir: tempfile::TempDir,
    pki: TestPki,
}

impl Mesh {
    fn new() -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki =
            TestPki::new(&dir.path().join("pki"), &["a", "b", "small", "other"]).expect("pki");
        Mesh { dir, pki }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The storage root every host sees at the same path.
    fn root(&self) -> PathBuf {
        self.path("images")
    }

    /// Host `name`'s private image directory (what `root` shows inside its namespace).
    fn private(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}-images"))
    }

    /// Starts agent `name` in a mount namespace where `root` is its private directory.
    async fn host(&self, name: &str, root: &Path) -> TestAgent {
        self.host_with(name, root, "").await
    }

    /// [`Mesh::host`] with `failpoints` armed (by a restart, so that start-up itself runs
    /// unarmed).
    async fn armed_host(&self, name: &str, failpoints: &str) -> TestAgent {
        let mut h = self.host(name, &self.root()).await;
        h.set_failpoints(Some(failpoints));
        h.restart().await.expect("restart armed");
        h
    }

    /// [`Mesh::host`] with more `[migration]` settings.
    async fn host_with(&self, name: &str, root: &Path, migration: &str) -> TestAgent {
        let private = self.private(name);
        std::fs::create_dir_all(&private).expect("private dir");
        std::fs::create_dir_all(root).expect("root dir");
        let script = self.path(&format!("{name}-ferryd.sh"));
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n# {name}: its own mount namespace, where {root} is {private}\n\
                 exec unshare -m --propagation private /bin/sh -c 'mount --bind \"$0\" \"$1\" && shift && exec \"$@\"' {private} {root} {ferryd} \"$@\"\n",
                root = root.display(),
                private = private.display(),
                ferryd = ferryd().display()
            ),
        )
        .expect("wrapper script");
        run(Command::new("chmod").arg("+x").arg(&script));
        TestAgent::start_with_storage(
            &script,
            name,
            &self.pki,
            self.dir.path(),
            "tcg",
            migration,
            Some(root),
        )
        .await
        .expect("agent")
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img_create(path: &Path, fmt: &str, size: &str, backing: Option<&str>) {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", fmt]);
    if let Some(b) = backing {
        c.args(["-b", b, "-F", "qcow2"]);
    }
    run(c.arg(path).arg(size));
}

/// Writes `(pattern file, offset, length)` into the guest view of an image.
fn qemu_io_write(path: &Path, fmt: &str, writes: &[(&Path, u64, u64)]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for (pat, off, len) in writes {
        c.arg("-c")
            .arg(format!("write -q -s {} {off} {len}", pat.display()));
    }
    run(c.arg(path));
}

/// Log-like text: words from a small vocabulary, numbers, line breaks (compresses ~4x).
fn text_pattern(path: &Path, len: usize) {
    const WORDS: [&str; 32] = [
        "ferry", "migrates", "virtual", "machines", "between", "hosts", "the", "disk", "image",
        "travels", "over", "quic", "with", "zstd", "and", "blake3", "checks", "every", "byte",
        "on", "both", "sides", "while", "guest", "stays", "stopped", "log", "entry", "error",
        "warning", "info", "debug",
    ];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut s = String::with_capacity(len + 64);
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(WORDS[(x % 32) as usize]);
        if x.is_multiple_of(13) {
            s.push_str(&format!(" {}", (x >> 20) % 100_000));
        }
        s.push(if x.is_multiple_of(11) { '\n' } else { ' ' });
    }
    s.truncate(len);
    std::fs::write(path, s).expect("text pattern");
}

fn random_pattern(path: &Path, len: u64) {
    let mut f = std::fs::File::create(path).expect("random pattern");
    let mut r = std::fs::File::open("/dev/urandom").expect("urandom");
    std::io::copy(&mut std::io::Read::take(&mut r, len), &mut f).expect("random bytes");
}

fn spec(name: &str, disks: &[(&str, &Path, &str)]) -> pb::VmSpec {
    let g = guest_artifacts().expect("guest artifacts: run scripts/build-guest.sh");
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 128,
        kernel: g.kernel.display().to_string(),
        initrd: g.initrd.display().to_string(),
        cmdline: workload_cmdline(16, 0.0, "realistic", 3),
        disks: disks
            .iter()
            .map(|(id, path, format)| pb::DiskSpec {
                id: (*id).into(),
                path: path.display().to_string(),
                format: (*format).into(),
                read_only: false,
            })
            .collect(),
        ..Default::default()
    }
}

async fn define(agent: &TestAgent, s: pb::VmSpec) {
    agent
        .client()
        .await
        .expect("client")
        .define_vm(pb::DefineVmRequest { spec: Some(s) })
        .await
        .expect("define");
}

fn offline(vm: &str, target: &TestAgent) -> pb::StartMigrationRequest {
    pb::StartMigrationRequest {
        vm: vm.into(),
        target: target.grpc_addr(),
        offline: true,
        ..Default::default()
    }
}

async fn migrate(source: &TestAgent, req: pb::StartMigrationRequest) -> pb::MigrationStatus {
    let mut c = source.client().await.expect("client");
    let started = c
        .start_migration(req)
        .await
        .expect("start migration")
        .into_inner();
    ferry_testkit::watch_to_end(&mut c, &started.id)
        .await
        .expect("watch migration")
}

async fn vm_state(agent: &TestAgent, vm: &str) -> Option<pb::VmState> {
    let mut c = agent.client().await.expect("client");
    c.get_vm(pb::VmRef { name: vm.into() })
        .await
        .ok()
        .map(|r| r.into_inner().state())
}

fn digest(path: &Path) -> String {
    ferry_disk::file_blake3(path).expect("blake3").to_hex()
}

/// Every file under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            }
            out.push(p.strip_prefix(base).unwrap_or(&p).display().to_string());
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn stats(s: &pb::MigrationStatus) -> pb::MigrationStats {
    s.stats.clone().expect("stats")
}

fn logs(a: &TestAgent, b: &TestAgent) -> String {
    format!(
        "\n--- {} log:\n{}\n--- {} log:\n{}",
        a.name(),
        a.log_tail(),
        b.name(),
        b.log_tail()
    )
}

/// a) A 2 GiB qcow2 holding ~200 MiB (150 MiB of text, 50 MiB random) moves with zstd and
/// boots on the target; a second VM moves with --undefine-source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_migration_compresses_and_boots_on_target() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let a = m.host("a", &m.root()).await;
    let b = m.host("b", &m.root()).await;

    let text = m.path("text.pat");
    let random = m.path("random.pat");
    text_pattern(&text, 8 << 20);
    random_pattern(&random, 50 * MIB);
    let img_a = m.private("a").join("web.qcow2");
    qemu_img_create(&img_a, "qcow2", "2G", None);
    let mut writes: Vec<(&Path, u64, u64)> = (0..10)
        .map(|k| (text.as_path(), k * 190 * MIB, 15 * MIB))
        .collect();
    writes.push((random.as_path(), 1950 * MIB, 50 * MIB));
    qemu_io_write(&img_a, "qcow2", &writes);
    let data = 200 * MIB;
    let before = digest(&img_a);
    define(
        &a,
        spec("web", &[("vda", &m.root().join("web.qcow2"), "qcow2")]),
    )
    .await;

    let t0 = Instant::now();
    let end = migrate(
        &a,
        pb::StartMigrationRequest {
            compress: "zstd:3".into(),
            start_on_target: true,
            ..offline("web", &b)
        },
    )
    .await;
    let took = t0.elapsed();
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "migration failed: {end:?}{}",
        logs(&a, &b)
    );
    let st = stats(&end);
    eprintln!(
        "a) {} MiB of data in a {} MiB qcow2 file: {} MiB on the wire ({:.2}x of the data), {} MiB skipped, {:?}",
        data >> 20,
        st.disk_bytes_total >> 20,
        st.disk_wire_bytes >> 20,
        st.disk_wire_bytes as f64 / data as f64,
        st.disk_bytes_skipped >> 20,
        took
    );
    assert_eq!(st.storage, "copied");
    assert_eq!(st.codec, "zstd:3");
    assert!(
        st.disk_bytes_total >= data,
        "the qcow2 file holds the data: {st:?}"
    );
    assert_eq!(st.disk_bytes_done, st.disk_bytes_total, "{st:?}");
    assert_eq!(st.disk_bytes_resumed, 0, "{st:?}");
    assert!(
        (st.disk_wire_bytes as f64) < 0.6 * data as f64,
        "zstd should shrink the text: {st:?}"
    );
    assert!(
        st.disk_wire_bytes > 50 * MIB,
        "random data does not compress: {st:?}"
    );
    assert!(end.message.contains("running on"), "{}", end.message);

    let img_b = m.private("b").join("web.qcow2");
    assert!(
        ferry_disk::image::compare(&img_a, &img_b).expect("qemu-img compare"),
        "images differ"
    );
    assert_eq!(digest(&img_b), before, "the file arrived byte for byte");
    assert_eq!(digest(&img_a), before, "the source image is unchanged");
    assert!(
        tree(&m.private("b"))
            .iter()
            .all(|f| !f.contains("ferry-part")),
        "no part file left: {:?}",
        tree(&m.private("b"))
    );

    // It runs on B, and boots from B's copy of the image.
    let mut cb = b.client().await.expect("client b");
    let info = cb
        .get_vm(pb::VmRef { name: "web".into() })
        .await
        .expect("VM on B")
        .into_inner();
    assert_eq!(info.state(), pb::VmState::Running);
    ferry_testkit::wait_for_log_line(
        Path::new(&info.console_log),
        "FERRY-READY",
        Duration::from_secs(180),
    )
    .await
    .expect("guest boots on B");
    // A keeps its definition, stopped (no --undefine-source).
    assert_eq!(vm_state(&a, "web").await, Some(pb::VmState::Defined));
    // `migrations list` on A shows it.
    let listed = a
        .client()
        .await
        .expect("client")
        .list_migrations(pb::ListMigrationsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(listed
        .migrations
        .iter()
        .any(|s| s.id == end.id && s.phase == pb::MigrationPhase::Completed as i32));
    cb.stop_vm(pb::StopVmRequest {
        name: "web".into(),
        force: true,
    })
    .await
    .expect("stop on B");

    // --undefine-source, no start: a small raw disk.
    let raw_a = m.private("a").join("db.raw");
    qemu_img_create(&raw_a, "raw", "64M", None);
    qemu_io_write(&raw_a, "raw", &[(text.as_path(), 4 * MIB, 3 * MIB)]);
    define(&a, spec("db", &[("vda", &m.root().join("db.raw"), "raw")])).await;
    let end = migrate(
        &a,
        pb::StartMigrationRequest {
            undefine_source: true,
            ..offline("db", &b)
        },
    )
    .await;
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "migration failed: {end:?}{}",
        logs(&a, &b)
    );
    let st = stats(&end);
    assert!(
        st.disk_bytes_skipped >= 60 * MIB,
        "holes of the raw image are not sent: {st:?}"
    );
    assert!(st.disk_wire_bytes < 4 * MIB, "{st:?}");
    assert_eq!(vm_state(&a, "db").await, None, "undefined on A");
    assert_eq!(
        vm_state(&b, "db").await,
        Some(pb::VmState::Defined),
        "defined, stopped, on B"
    );
    assert!(raw_a.exists(), "the source's image file stays");
    assert!(end.message.contains("image files stay"), "{}", end.message);
    assert!(ferry_disk::image::compare(&raw_a, &m.private("b").join("db.raw")).expect("compare"));
}

/// b) The source agent dies mid-copy; the next attempt resumes from the target's
/// checkpoint instead of starting over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_cold_migration_resumes() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let mut a = m.host("a", &m.root()).await;
    let b = m.host("b", &m.root()).await;
    let random = m.path("random.pat");
    random_pattern(&random, 96 * MIB);
    let img_a = m.private("a").join("big.qcow2");
    qemu_img_create(&img_a, "qcow2", "1G", None);
    qemu_io_write(&img_a, "qcow2", &[(random.as_path(), 100 * MIB, 96 * MIB)]);
    let before = digest(&img_a);
    define(
        &a,
        spec("big", &[("vda", &m.root().join("big.qcow2"), "qcow2")]),
    )
    .await;

    // 8 MiB/s: the copy takes ~12 s.
    let mut ca = a.client().await.expect("client a");
    let first = ca
        .start_migration(pb::StartMigrationRequest {
            bandwidth_bytes_per_sec: 8 * MIB,
            ..offline("big", &b)
        })
        .await
        .expect("start")
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(60);
    let at_kill = loop {
        let s = ca
            .get_migration(pb::MigrationRef {
                id: first.id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        let st = stats(&s);
        assert!(
            s.phase != pb::MigrationPhase::Completed as i32
                && s.phase != pb::MigrationPhase::Failed as i32,
            "ended too early: {s:?}"
        );
        if st.disk_bytes_total > 0 && st.disk_bytes_done * 100 > st.disk_bytes_total * 45 {
            assert_eq!(s.phase, pb::MigrationPhase::CopyingDisks as i32);
            break st;
        }
        assert!(Instant::now() < deadline, "copy never got to 45%: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    a.kill().expect("kill source agent");
    a.restart().await.expect("restart source agent");
    let total = at_kill.disk_bytes_total;

    // After the restart the first attempt is history, failed; the VM is free again.
    let mut ca = a.client().await.expect("client a");
    let old = ca
        .get_migration(pb::MigrationRef {
            id: first.id.clone(),
        })
        .await
        .expect("old migration")
        .into_inner();
    assert_eq!(old.phase, pb::MigrationPhase::Failed as i32, "{old:?}");
    assert_eq!(vm_state(&a, "big").await, Some(pb::VmState::Defined));
    assert_eq!(
        vm_state(&b, "big").await,
        Some(pb::VmState::Incoming),
        "B still holds the stale reservation"
    );

    let t0 = Instant::now();
    let end = migrate(&a, offline("big", &b)).await;
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "second attempt failed: {end:?}{}",
        logs(&a, &b)
    );
    let st = stats(&end);
    eprintln!(
        "b) killed at {} of {} MiB ({} MiB on the wire); second attempt: {} MiB resumed, {} MiB on the wire, {:?}",
        at_kill.disk_bytes_done >> 20,
        total >> 20,
        at_kill.disk_wire_bytes >> 20,
        st.disk_bytes_resumed >> 20,
        st.disk_wire_bytes >> 20,
        t0.elapsed()
    );
    assert_eq!(st.disk_bytes_total, total);
    assert!(
        st.disk_bytes_resumed * 100 > total * 30,
        "resumed {} of {total}: {st:?}",
        st.disk_bytes_resumed
    );
    assert!(
        st.disk_wire_bytes + st.disk_bytes_resumed <= total + 2 * MIB,
        "only the rest travelled: {st:?}"
    );
    assert!(
        st.disk_wire_bytes * 100 < total * 70,
        "well under a full copy: {st:?}"
    );
    let img_b = m.private("b").join("big.qcow2");
    assert_eq!(
        digest(&img_b),
        before,
        "resumed image is byte for byte the source's"
    );
    assert!(ferry_disk::image::compare(&img_a, &img_b).expect("compare"));
    assert_eq!(vm_state(&b, "big").await, Some(pb::VmState::Defined));
    assert_eq!(vm_state(&a, "big").await, Some(pb::VmState::Defined));
    assert!(
        tree(&m.private("b"))
            .iter()
            .all(|f| !f.contains("ferry-part")),
        "{:?}",
        tree(&m.private("b"))
    );
}

/// c) What the target refuses leaves nothing there and nothing changed on the source; a
/// two-layer backing chain arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_migration_refusals_and_backing_chain() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let a = m.host("a", &m.root()).await;
    let b = m.host("b", &m.root()).await;
    // A target whose storage is a 32 MiB tmpfs, and one whose storage root is elsewhere.
    let tmpfs = Tmpfs::mount(&m.private("small"), 32);
    let small = m.host("small", &m.root()).await;
    let other_root = m.path("other-root");
    let other = m.host("other", &other_root).await;
    let random = m.path("random.pat");
    random_pattern(&random, 64 * MIB);

    // A disk outside A's storage roots is refused when the VM is defined.
    let outside = m.path("elsewhere/x.qcow2");
    let e = a
        .client()
        .await
        .expect("client")
        .define_vm(pb::DefineVmRequest {
            spec: Some(spec("stray", &[("vda", &outside, "qcow2")])),
        })
        .await
        .expect_err("outside the roots");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("outside the storage roots"),
        "{}",
        e.message()
    );

    let img = m.private("a").join("fat.qcow2");
    qemu_img_create(&img, "qcow2", "1G", None);
    qemu_io_write(&img, "qcow2", &[(random.as_path(), 0, 64 * MIB)]);
    let before = digest(&img);
    define(
        &a,
        spec("fat", &[("vda", &m.root().join("fat.qcow2"), "qcow2")]),
    )
    .await;

    // Not enough room on the target.
    let end = migrate(&a, offline("fat", &small)).await;
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32, "{end:?}");
    eprintln!("c) no space: {}", end.error);
    assert!(
        end.error.contains("not enough free space") && end.error.contains("need"),
        "{}",
        end.error
    );
    assert!(
        end.error.contains("'fat'") && end.error.contains("small"),
        "names VM and host: {}",
        end.error
    );
    assert!(
        tree(&m.private("small")).is_empty(),
        "nothing on the target: {:?}",
        tree(&m.private("small"))
    );
    assert_eq!(vm_state(&small, "fat").await, None);

    // A host whose storage root is mounted elsewhere: images are named relative to the
    // roots, so the chain lands under that host's root, and the overlay's absolute
    // backing reference (A's path, which means nothing there) is pointed at the base's
    // new place before the VM is defined and started.
    let abs_base = m.private("a").join("abs-base.qcow2");
    qemu_img_create(&abs_base, "qcow2", "64M", None);
    qemu_io_write(&abs_base, "qcow2", &[(random.as_path(), 0, 2 * MIB)]);
    let abs_top = m.private("a").join("abs-top.qcow2");
    qemu_img_create(&abs_top, "qcow2", "64M", Some("abs-base.qcow2"));
    qemu_io_write(&abs_top, "qcow2", &[(random.as_path(), MIB, MIB)]);
    // As A sees it: the base by its absolute path under the shared root.
    let a_name = m.root().join("abs-base.qcow2");
    run(Command::new("qemu-img")
        .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&a_name)
        .arg(&abs_top));
    let (top_before, base_before) = (digest(&abs_top), digest(&abs_base));
    define(
        &a,
        spec(
            "absref",
            &[("vda", &m.root().join("abs-top.qcow2"), "qcow2")],
        ),
    )
    .await;
    let end = migrate(
        &a,
        pb::StartMigrationRequest {
            start_on_target: true,
            ..offline("absref", &other)
        },
    )
    .await;
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "{end:?}{}",
        logs(&a, &other)
    );
    assert!(end.error.is_empty(), "started there: {}", end.error);
    assert_eq!(vm_state(&other, "absref").await, Some(pb::VmState::Running));
    let there = other
        .client()
        .await
        .expect("client")
        .get_vm(pb::VmRef {
            name: "absref".into(),
        })
        .await
        .expect("VM on other")
        .into_inner();
    assert_eq!(
        there.spec.expect("spec").disks[0].path,
        other_root.join("abs-top.qcow2").display().to_string(),
        "defined with the target's own path"
    );
    let (o_top, o_base) = (
        m.private("other").join("abs-top.qcow2"),
        m.private("other").join("abs-base.qcow2"),
    );
    assert_eq!(
        digest(&o_base),
        base_before,
        "the base arrived byte for byte"
    );
    let info = ferry_disk::image::inspect(&o_top).expect("the overlay opens with its chain");
    let below = info.backing.expect("still an overlay");
    assert_eq!(
        below.filename, "abs-base.qcow2",
        "rebased to the base beside it"
    );
    assert_eq!(below.path, std::fs::canonicalize(&o_base).expect("canon"));
    other
        .client()
        .await
        .expect("client")
        .stop_vm(pb::StopVmRequest {
            name: "absref".into(),
            force: true,
        })
        .await
        .expect("stop on other");
    // Same guest-visible content as the chain on A (A's overlay read through A's base).
    run(Command::new("qemu-img")
        .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&abs_base)
        .arg(&abs_top));
    assert!(
        ferry_disk::image::compare(&abs_top, &o_top).expect("compare"),
        "the chain on the target shows what the chain on A showed"
    );
    run(Command::new("qemu-img")
        .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&a_name)
        .arg(&abs_top));
    assert_eq!(
        digest(&abs_top),
        top_before,
        "the source's overlay is unchanged"
    );
    assert_eq!(vm_state(&a, "absref").await, Some(pb::VmState::Defined));
    // Neither refusal touched the source.
    assert_eq!(vm_state(&a, "fat").await, Some(pb::VmState::Defined));
    assert_eq!(digest(&img), before);

    // An overlay whose backing file is gone: refused on the source, naming the file.
    let gone_base = m.private("a").join("gone-base.qcow2");
    qemu_img_create(&gone_base, "qcow2", "256M", None);
    let orphan = m.private("a").join("orphan.qcow2");
    qemu_img_create(&orphan, "qcow2", "256M", Some("gone-base.qcow2"));
    std::fs::remove_file(&gone_base).expect("delete the base");
    define(
        &a,
        spec(
            "orphan",
            &[("vda", &m.root().join("orphan.qcow2"), "qcow2")],
        ),
    )
    .await;
    let b_before = tree(&m.private("b"));
    let end = migrate(&a, offline("orphan", &b)).await;
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32, "{end:?}");
    eprintln!("c) missing backing: {}", end.error);
    assert!(
        end.error.contains("gone-base.qcow2") && end.error.contains("does not exist"),
        "{}",
        end.error
    );
    assert!(
        end.error.contains("orphan.qcow2"),
        "names the image: {}",
        end.error
    );
    assert_eq!(tree(&m.private("b")), b_before, "nothing sent");
    assert_eq!(vm_state(&b, "orphan").await, None);
    assert_eq!(vm_state(&a, "orphan").await, Some(pb::VmState::Defined));

    // A two-layer chain arrives intact: both files, same paths, same bytes.
    let base = m.private("a").join("chain-base.qcow2");
    qemu_img_create(&base, "qcow2", "256M", None);
    qemu_io_write(&base, "qcow2", &[(random.as_path(), 0, 8 * MIB)]);
    let top = m.private("a").join("chain-top.qcow2");
    qemu_img_create(&top, "qcow2", "256M", Some("chain-base.qcow2"));
    qemu_io_write(&top, "qcow2", &[(random.as_path(), 4 * MIB, 2 * MIB)]);
    define(
        &a,
        spec(
            "chain",
            &[("vda", &m.root().join("chain-top.qcow2"), "qcow2")],
        ),
    )
    .await;
    let end = migrate(&a, offline("chain", &b)).await;
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "{end:?}{}",
        logs(&a, &b)
    );
    let st = stats(&end);
    let files =
        std::fs::metadata(&base).expect("base").len() + std::fs::metadata(&top).expect("top").len();
    assert_eq!(st.disk_bytes_total, files, "both layers travel: {st:?}");
    for layer in ["chain-base.qcow2", "chain-top.qcow2"] {
        let (la, lb) = (m.private("a").join(layer), m.private("b").join(layer));
        assert_eq!(digest(&la), digest(&lb), "{layer} arrived byte for byte");
        assert!(
            ferry_disk::image::compare(&la, &lb).expect("compare"),
            "{layer} differs"
        );
    }
    assert_eq!(vm_state(&b, "chain").await, Some(pb::VmState::Defined));

    // The name is taken on B now: a second attempt is refused, nothing changes.
    let b_before = tree(&m.private("b"));
    let end = migrate(&a, offline("chain", &b)).await;
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32, "{end:?}");
    assert!(
        end.error.contains("already defined on target host b"),
        "{}",
        end.error
    );
    assert_eq!(tree(&m.private("b")), b_before);

    // Another overlay on the same base: the identical base already on B is not sent again.
    let top2 = m.private("a").join("chain-top2.qcow2");
    qemu_img_create(&top2, "qcow2", "256M", Some("chain-base.qcow2"));
    qemu_io_write(&top2, "qcow2", &[(random.as_path(), 9 * MIB, MIB)]);
    define(
        &a,
        spec(
            "chain2",
            &[("vda", &m.root().join("chain-top2.qcow2"), "qcow2")],
        ),
    )
    .await;
    let end = migrate(&a, offline("chain2", &b)).await;
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "{end:?}{}",
        logs(&a, &b)
    );
    let st = stats(&end);
    let base_len = std::fs::metadata(&base).expect("base").len();
    assert_eq!(
        st.disk_bytes_resumed, base_len,
        "the base counts as already there: {st:?}"
    );
    assert!(
        st.disk_wire_bytes < 3 * MIB,
        "only the new overlay travelled: {st:?}"
    );
    assert_eq!(
        digest(&top2),
        digest(&m.private("b").join("chain-top2.qcow2"))
    );

    // A different file at the same path on B is never overwritten.
    let clash_a = m.private("a").join("clash.raw");
    qemu_img_create(&clash_a, "raw", "4M", None);
    qemu_io_write(&clash_a, "raw", &[(random.as_path(), 0, MIB)]);
    let clash_b = m.private("b").join("clash.raw");
    qemu_img_create(&clash_b, "raw", "4M", None);
    let clash_b_before = digest(&clash_b);
    define(
        &a,
        spec("clash", &[("vda", &m.root().join("clash.raw"), "raw")]),
    )
    .await;
    let b_before = tree(&m.private("b"));
    let end = migrate(&a, offline("clash", &b)).await;
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32, "{end:?}");
    eprintln!("c) clash: {}", end.error);
    assert!(
        end.error
            .contains("clash.raw already exists on host b with different content"),
        "{}",
        end.error
    );
    assert_eq!(digest(&clash_b), clash_b_before, "B's file untouched");
    assert_eq!(tree(&m.private("b")), b_before);
    assert_eq!(vm_state(&b, "clash").await, None);

    drop(small);
    drop(tmpfs);
}

/// d) A running VM is refused unless --stop-source; a VM being copied cannot be started;
/// an operator's cancel leaves nothing on the target, not even partial images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_vm_is_refused_without_stop_source() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let a = m.host("a", &m.root()).await;
    let b = m.host("b", &m.root()).await;
    let img = m.private("a").join("live.qcow2");
    qemu_img_create(&img, "qcow2", "64M", None);
    define(
        &a,
        spec("live", &[("vda", &m.root().join("live.qcow2"), "qcow2")]),
    )
    .await;
    let mut ca = a.client().await.expect("client");
    ca.start_vm(pb::VmRef {
        name: "live".into(),
    })
    .await
    .expect("start");
    let e = ca
        .start_migration(offline("live", &b))
        .await
        .expect_err("running VM refused");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("'live' is running") && e.message().contains("--stop-source"),
        "{}",
        e.message()
    );
    assert_eq!(
        vm_state(&a, "live").await,
        Some(pb::VmState::Running),
        "untouched"
    );
    assert_eq!(vm_state(&b, "live").await, None);

    // Stopped, it may go; while it is copied (slowly) nobody can start or undefine it.
    ca.stop_vm(pb::StopVmRequest {
        name: "live".into(),
        force: true,
    })
    .await
    .expect("stop");
    let random = m.path("random.pat");
    random_pattern(&random, 8 * MIB);
    qemu_io_write(&img, "qcow2", &[(random.as_path(), 0, 8 * MIB)]);
    let before = digest(&img);
    let b_before = tree(&m.private("b"));
    let mig = ca
        .start_migration(pb::StartMigrationRequest {
            bandwidth_bytes_per_sec: MIB,
            ..offline("live", &b)
        })
        .await
        .expect("start")
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = ca
            .get_migration(pb::MigrationRef { id: mig.id.clone() })
            .await
            .expect("get")
            .into_inner();
        if s.phase == pb::MigrationPhase::CopyingDisks as i32 && stats(&s).disk_bytes_done > MIB {
            break;
        }
        assert!(
            Instant::now() < deadline && s.phase != pb::MigrationPhase::Committing as i32,
            "{s:?}{}",
            logs(&a, &b)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = ca
        .start_vm(pb::VmRef {
            name: "live".into(),
        })
        .await
        .expect_err("busy VM cannot start");
    assert!(e.message().contains("migrating"), "{}", e.message());
    ca.undefine_vm(pb::VmRef {
        name: "live".into(),
    })
    .await
    .expect_err("busy VM cannot be undefined");
    ca.cancel_migration(pb::MigrationRef { id: mig.id.clone() })
        .await
        .expect("cancel");
    let end = ferry_testkit::watch_to_end(&mut ca, &mig.id)
        .await
        .expect("watch migration");
    assert_eq!(end.phase, pb::MigrationPhase::Cancelled as i32, "{end:?}");
    assert_eq!(vm_state(&a, "live").await, Some(pb::VmState::Defined));
    assert_eq!(digest(&img), before);
    assert_eq!(vm_state(&b, "live").await, None);
    assert_eq!(
        tree(&m.private("b")),
        b_before,
        "cancelled: the partial image is discarded too"
    );
    // Released: it starts again here.
    ca.start_vm(pb::VmRef {
        name: "live".into(),
    })
    .await
    .expect("start after cancel");
    ca.stop_vm(pb::StopVmRequest {
        name: "live".into(),
        force: true,
    })
    .await
    .expect("stop");
}

/// An operator cancels a cold migration after one of its images arrived whole (renamed
/// into place on the target) while another is still copied: the target removes both —
/// before, the finished one stayed there, taking space, named like the VM's disk. An
/// image the target had before the migration stays. The target's storage stops taking
/// the second image (`cold.tgt.chunk.written=return(hang)`), so the cancel reaches a
/// target still receiving, whose own reservation names the images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_cold_migration_leaves_no_finished_image_behind() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let a = m.host("a", &m.root()).await;
    let b = m
        .armed_host("b", "cold.tgt.chunk.written=return(hang)")
        .await;
    // vda: all zeros (no chunk to write: whole at once); vdb: 8 MiB of random data, whose
    // first chunk hangs on b; vdc: already on the target, identical (adopted).
    let small = m.private("a").join("two-small.raw");
    std::fs::File::create(&small)
        .and_then(|f| f.set_len(MIB))
        .expect("sparse raw image");
    let big = m.private("a").join("two-big.qcow2");
    qemu_img_create(&big, "qcow2", "64M", None);
    let random = m.path("random.pat");
    random_pattern(&random, 8 * MIB);
    qemu_io_write(&big, "qcow2", &[(random.as_path(), 0, 8 * MIB)]);
    let there = m.private("a").join("two-there.qcow2");
    qemu_img_create(&there, "qcow2", "1M", None);
    std::fs::copy(&there, m.private("b").join("two-there.qcow2")).expect("copy to b");
    define(
        &a,
        spec(
            "two",
            &[
                ("vda", &m.root().join("two-small.raw"), "raw"),
                ("vdb", &m.root().join("two-big.qcow2"), "qcow2"),
                ("vdc", &m.root().join("two-there.qcow2"), "qcow2"),
            ],
        ),
    )
    .await;
    let b_before = tree(&m.private("b"));
    let mut ca = a.client().await.expect("client");
    let mig = ca
        .start_migration(pb::StartMigrationRequest {
            bandwidth_bytes_per_sec: MIB,
            ..offline("two", &b)
        })
        .await
        .expect("start")
        .into_inner();
    let arrived = m.private("b").join("two-small.raw");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !arrived.exists() {
        let s = ca
            .get_migration(pb::MigrationRef { id: mig.id.clone() })
            .await
            .expect("get")
            .into_inner();
        assert!(
            Instant::now() < deadline
                && !is_final(&s)
                && s.phase != pb::MigrationPhase::Committing as i32,
            "the small image did not arrive while the big one was copied: {s:?}{}",
            logs(&a, &b)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ca.cancel_migration(pb::MigrationRef { id: mig.id.clone() })
        .await
        .expect("cancel");
    let end = ferry_testkit::watch_to_end(&mut ca, &mig.id)
        .await
        .expect("watch migration");
    assert_eq!(end.phase, pb::MigrationPhase::Cancelled as i32, "{end:?}");
    assert_eq!(vm_state(&b, "two").await, None);
    assert_eq!(vm_state(&a, "two").await, Some(pb::VmState::Defined));
    assert_eq!(
        tree(&m.private("b")),
        b_before,
        "cancelled: the finished image goes too, the one already there stays{}",
        logs(&a, &b)
    );
}

/// A 256 MiB qcow2 `<name>.qcow2` in `host`'s storage holding 48 MiB of random data
/// (`random` made first if missing); its digest.
fn random_image(m: &Mesh, host: &str, name: &str) -> (PathBuf, String) {
    let random = m.path("random.pat");
    if !random.exists() {
        random_pattern(&random, 48 * MIB);
    }
    let img = m.private(host).join(format!("{name}.qcow2"));
    qemu_img_create(&img, "qcow2", "256M", None);
    qemu_io_write(&img, "qcow2", &[(random.as_path(), 0, 48 * MIB)]);
    let d = digest(&img);
    (img, d)
}

/// Starts a cold copy of `vm` from `a` to `b` at 8 MiB/s (~6 s for 48 MiB); its id.
async fn start_slow_copy(a: &TestAgent, b: &TestAgent, vm: &str) -> String {
    a.client()
        .await
        .expect("client a")
        .start_migration(pb::StartMigrationRequest {
            bandwidth_bytes_per_sec: 8 * MIB,
            ..offline(vm, b)
        })
        .await
        .expect("start")
        .into_inner()
        .id
}

/// Waits until cold copy `id` from `a` to `b` has moved more than `percent` of its
/// bytes; fails if it ends first or is still short by `deadline`.
async fn copied_past(a: &TestAgent, b: &TestAgent, id: &str, percent: u64, deadline: Instant) {
    let mut ca = a.client().await.expect("client a");
    loop {
        let s = ca
            .get_migration(pb::MigrationRef { id: id.into() })
            .await
            .expect("get")
            .into_inner();
        assert!(!is_final(&s), "ended too early: {s:?}{}", logs(a, b));
        let st = stats(&s);
        if st.disk_bytes_done * 100 > st.disk_bytes_total * percent {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the copy never got to {percent}%: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Passes of `agent`'s expiry of what cold copies left.
fn expiry_passes(agent: &TestAgent) -> f64 {
    let text = ferry_testkit::scrape_metrics(&agent.metrics_addr()).expect("scrape");
    ferry_testkit::metric_sum(&text, "ferry_kept_images_expiry_passes_total")
}

/// The target restarts in the middle of a cold copy: the restarted agent has forgotten
/// the migration, and the source's attempt failed with it, so nothing would ever ask for
/// what the copy left there — the partial image kept for a resume, and a small image
/// already received whole and renamed into place. Both expire once untouched (the part)
/// or unused by any VM (the placed image, journaled) for `partial_keep_s` (1 s here), and
/// a new attempt copies the images afresh. Before that, the target's storage stops
/// answering after the first chunk (`cold.tgt.chunk.written` hangs) for two of the
/// expiry's passes that begin once both are older than the keep
/// (`ferry_kept_images_expiry_passes_total`): both stay because they are being received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_copy_no_attempt_resumes_left_expires_and_what_is_being_received_stays() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let a = m.host("a", &m.root()).await;
    let mut b = m.host_with("b", &m.root(), "partial_keep_s = 1\n").await;
    b.set_failpoints(Some("cold.tgt.chunk.written=return(hang)"));
    b.restart().await.expect("restart armed");
    let (_, before) = random_image(&m, "a", "kept");
    // All zeros: no chunk to write, so it arrives whole while the other hangs.
    let zeros = m.private("a").join("kept-zeros.raw");
    std::fs::File::create(&zeros)
        .and_then(|f| f.set_len(MIB))
        .expect("sparse raw image");
    define(
        &a,
        spec(
            "kept",
            &[
                ("vda", &m.root().join("kept.qcow2"), "qcow2"),
                ("vdb", &m.root().join("kept-zeros.raw"), "raw"),
            ],
        ),
    )
    .await;
    let part = m.private("b").join("kept.qcow2.ferry-part");
    let placed = m.private("b").join("kept-zeros.raw");

    let first = start_slow_copy(&a, &b, "kept").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !b
        .log_tail()
        .contains("failpoint cold.tgt.chunk.written hit")
    {
        assert!(
            Instant::now() < deadline,
            "no chunk written on b{}",
            logs(&a, &b)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once the part, its sidecar and the placed image's record are older than the keep,
    // two more of the expiry's passes (the second began after that) leave both alone.
    let sidecar = m.private("b").join("kept.qcow2.ferry-part.json");
    let idle = |f: &Path| {
        std::fs::metadata(f)
            .and_then(|md| md.modified())
            .map(|t| t.elapsed().unwrap_or_default())
            .unwrap_or_else(|e| {
                panic!(
                    "{} was removed while being received: {e}: {:?}{}",
                    f.display(),
                    tree(&m.private("b")),
                    logs(&a, &b)
                )
            })
    };
    let passes = || expiry_passes(&b);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let p0 = passes();
    assert!(
        idle(&part) > Duration::from_secs(1) && idle(&sidecar) > Duration::from_secs(1),
        "touched within the keep: its age alone would keep it"
    );
    while passes() < p0 + 2.0 {
        assert!(Instant::now() < deadline, "the expiry stopped passing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(idle(&part) > Duration::from_secs(1));
    assert!(
        placed.exists(),
        "the image received whole while the copy went on was removed: {:?}{}",
        tree(&m.private("b")),
        logs(&a, &b)
    );
    b.release_failpoint().expect("release");
    copied_past(&a, &b, &first, 35, deadline).await;

    b.set_failpoints(None);
    b.kill().expect("kill target agent");
    b.restart().await.expect("restart target agent");
    let end = status_until(&a, &first, Duration::from_secs(60), is_final).await;
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Failed as i32,
        "{end:?}{}",
        logs(&a, &b)
    );
    // Gone from b's storage, and counted (after the pass that removed them).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = ferry_testkit::scrape_metrics(&b.metrics_addr()).expect("scrape b");
        let parts = ferry_testkit::metric_sum(&text, "ferry_partial_images_expired_total");
        let whole = ferry_testkit::metric_sum(&text, "ferry_placed_images_expired_total");
        let left = tree(&m.private("b"));
        if parts >= 1.0 && whole >= 1.0 && left.is_empty() {
            assert_eq!((parts, whole), (1.0, 1.0), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "what the copy left was kept: {left:?}, expired {parts} partial, {whole} placed{}",
            logs(&a, &b)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(b.log_path()).expect("b's log");
    assert!(
        log.contains("removed a partial image kept for a resume")
            && log.contains("removed an image a cold copy that never finished had received"),
        "{}",
        b.log_tail()
    );

    // Nothing left to resume: the next attempt copies the whole image, byte for byte.
    let again = migrate(&a, offline("kept", &b)).await;
    assert_eq!(
        again.phase,
        pb::MigrationPhase::Completed as i32,
        "{again:?}{}",
        logs(&a, &b)
    );
    assert_eq!(stats(&again).disk_bytes_resumed, 0, "{again:?}");
    assert_eq!(digest(&m.private("b").join("kept.qcow2")), before);
    assert_eq!(digest(&placed), digest(&zeros));
    assert_eq!(vm_state(&b, "kept").await, Some(pb::VmState::Defined));
}

/// An image a cold copy had placed, on which this host's operator made an overlay and
/// defined a VM while the copy went on, is a layer below that VM's disk: when the copy
/// (ended by the target's restart) expires, it stays (the copy's partial image goes, so
/// the expiry ran, and two more passes follow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_a_vm_now_rests_on_does_not_expire() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let a = m.host("a", &m.root()).await;
    let mut b = m.host_with("b", &m.root(), "partial_keep_s = 1\n").await;
    random_image(&m, "a", "base");
    qemu_img_create(
        &m.private("a").join("base-small.qcow2"),
        "qcow2",
        "1M",
        None,
    );
    define(
        &a,
        spec(
            "base",
            &[
                ("vda", &m.root().join("base.qcow2"), "qcow2"),
                ("vdb", &m.root().join("base-small.qcow2"), "qcow2"),
            ],
        ),
    )
    .await;
    let placed = m.private("b").join("base-small.qcow2");
    let first = start_slow_copy(&a, &b, "base").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !placed.exists() || !m.private("b").join("base.qcow2.ferry-part").exists() {
        assert!(Instant::now() < deadline, "nothing arrived{}", logs(&a, &b));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // b's operator: an overlay on the image that arrived, and a VM on the overlay.
    qemu_img_create(
        &m.private("b").join("mine.qcow2"),
        "qcow2",
        "1M",
        Some("base-small.qcow2"),
    );
    define(
        &b,
        spec("mine", &[("vda", &m.root().join("mine.qcow2"), "qcow2")]),
    )
    .await;
    b.kill().expect("kill target agent");
    b.restart().await.expect("restart target agent");
    let end = status_until(&a, &first, Duration::from_secs(60), is_final).await;
    assert_eq!(end.phase, pb::MigrationPhase::Failed as i32, "{end:?}");

    let deadline = Instant::now() + Duration::from_secs(30);
    while m.private("b").join("base.qcow2.ferry-part").exists() {
        assert!(
            Instant::now() < deadline,
            "the partial image was kept{}",
            logs(&a, &b)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let passes = || expiry_passes(&b);
    let p0 = passes();
    while passes() < p0 + 2.0 {
        assert!(Instant::now() < deadline, "the expiry stopped passing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        placed.exists(),
        "the layer below VM 'mine''s disk was removed{}",
        logs(&a, &b)
    );
    let text = ferry_testkit::scrape_metrics(&b.metrics_addr()).expect("scrape b");
    assert_eq!(
        ferry_testkit::metric_sum(&text, "ferry_placed_images_expired_total"),
        0.0
    );
}

/// The target's storage fills up in the middle of a cold copy (someone else's file takes
/// the room Prepare had found): the copy fails within the bounded wait, naming the
/// target's "No space left on device"; the VM stays defined on the source, its image
/// unchanged, and nothing is defined on the target. Once room is made, the next attempt
/// resumes from the target's last checkpoint and the image arrives byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_whose_storage_fills_during_a_cold_copy_fails_it_clearly_and_a_retry_resumes() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    // b's storage: a tmpfs of its own, mounted before b's agent binds it in.
    let fs = Tmpfs::mount(&m.private("b"), 80);
    let a = m.host("a", &m.root()).await;
    let b = m.host("b", &m.root()).await;
    let (img_a, before) = random_image(&m, "a", "full");
    define(
        &a,
        spec("full", &[("vda", &m.root().join("full.qcow2"), "qcow2")]),
    )
    .await;

    let first = start_slow_copy(&a, &b, "full").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Past the first checkpoint (every 2 s): something to resume from.
    copied_past(&a, &b, &first, 50, deadline).await;
    // Someone else takes every byte left (the sidecar's next checkpoint fails too: the
    // resume starts from the last one that did not).
    let filler = fs.path().join("someone-else.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0x5au8; MIB as usize];
        while f.write_all(&block).is_ok() {}
    }
    let end = status_until(&a, &first, Duration::from_secs(120), is_final).await;
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Failed as i32,
        "{end:?}{}",
        logs(&a, &b)
    );
    assert!(
        end.error.contains("No space left on device"),
        "the error names the target's full storage: {}{}",
        end.error,
        logs(&a, &b)
    );
    assert_eq!(vm_state(&a, "full").await, Some(pb::VmState::Defined));
    assert_eq!(digest(&img_a), before, "the source's image is unchanged");
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm_state(&b, "full").await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the target still holds VM 'full'{}",
            logs(&a, &b)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !m.private("b").join("full.qcow2").exists(),
        "no image took the final name"
    );

    std::fs::remove_file(&filler).expect("make room");
    let again = migrate(&a, offline("full", &b)).await;
    assert_eq!(
        again.phase,
        pb::MigrationPhase::Completed as i32,
        "{again:?}{}",
        logs(&a, &b)
    );
    assert!(
        stats(&again).disk_bytes_resumed > 0,
        "resumed from the last checkpoint: {again:?}"
    );
    assert_eq!(digest(&m.private("b").join("full.qcow2")), before);
    assert_eq!(vm_state(&b, "full").await, Some(pb::VmState::Defined));
    drop(b);
    drop(a);
    drop(fs);
}

/// A small VM on `a` (one qcow2 with 4 MiB of data) for the ownership tests.
async fn small_vm(m: &Mesh, a: &TestAgent, name: &str) -> String {
    let random = m.path(&format!("{name}.pat"));
    random_pattern(&random, 4 * MIB);
    let img = m.private("a").join(format!("{name}.qcow2"));
    qemu_img_create(&img, "qcow2", "64M", None);
    qemu_io_write(&img, "qcow2", &[(random.as_path(), 0, 4 * MIB)]);
    define(
        a,
        spec(
            name,
            &[("vda", &m.root().join(format!("{name}.qcow2")), "qcow2")],
        ),
    )
    .await;
    digest(&img)
}

/// Starts a cold migration of `vm` to `b` that undefines the source; returns its id.
async fn start_moving(a: &TestAgent, b: &TestAgent, vm: &str) -> String {
    a.client()
        .await
        .expect("client a")
        .start_migration(pb::StartMigrationRequest {
            undefine_source: true,
            ..offline(vm, b)
        })
        .await
        .expect("start")
        .into_inner()
        .id
}

/// The migration's status on `a` once `done` says so, or the last one after `within`.
async fn status_until(
    a: &TestAgent,
    id: &str,
    within: Duration,
    done: impl Fn(&pb::MigrationStatus) -> bool,
) -> pb::MigrationStatus {
    let deadline = Instant::now() + within;
    loop {
        let s = match a.client().await {
            Ok(mut c) => c
                .get_migration(pb::MigrationRef { id: id.into() })
                .await
                .ok()
                .map(|r| r.into_inner()),
            Err(_) => None,
        };
        if let Some(s) = s {
            if done(&s) || Instant::now() > deadline {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no status of {id} from {}",
            a.name()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The source agent is killed while the target defines the VM (held at
/// `cold.tgt.finish.committed`, after journaling it): Finish's answer goes nowhere. The
/// restarted source knows Finish may have got through (it journaled the VM as held
/// first), asks the target, learns the VM is defined there and completes, removing its own
/// definition as asked: the VM is defined on one host, the target's image byte for byte
/// the source's. (Before, a restart marked the migration failed and freed the VM on the
/// source: defined on both, startable on both.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_killed_while_the_target_defines_the_vm_settles_on_restart() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let mut a = m.host("a", &m.root()).await;
    let mut b = m
        .armed_host("b", "cold.tgt.finish.committed=1*return(hang)")
        .await;
    let before = small_vm(&m, &a, "moved").await;
    let id = start_moving(&a, &b, "moved").await;
    assert!(
        b.wait_failpoint("cold.tgt.finish.committed", Duration::from_secs(60))
            .await,
        "the target defined the VM:{}",
        logs(&a, &b)
    );
    a.kill().expect("kill the source agent");
    b.release_failpoint().expect("release");
    assert_eq!(vm_state(&b, "moved").await, Some(pb::VmState::Defined));
    a.restart().await.expect("restart the source agent");
    moved_to_b(&m, &a, &b, &id, &before).await;
}

/// Hosts a and b, and a cold move of a new small VM `vm` from a to b whose target agent
/// exits right after defining it (`cold.tgt.finish.committed`): returned once the source
/// shows it IN_DOUBT, with the migration's id and the image's digest.
async fn in_doubt_after_the_target_defined(
    m: &Mesh,
    vm: &str,
) -> (TestAgent, TestAgent, String, String) {
    in_doubt_after_the_target_defined_armed(m, vm, None).await
}

/// [`in_doubt_after_the_target_defined`] with the source armed with `source_failpoints`.
async fn in_doubt_after_the_target_defined_armed(
    m: &Mesh,
    vm: &str,
    source_failpoints: Option<&str>,
) -> (TestAgent, TestAgent, String, String) {
    let a = match source_failpoints {
        Some(fp) => m.armed_host("a", fp).await,
        None => m.host("a", &m.root()).await,
    };
    let b = m
        .armed_host("b", "cold.tgt.finish.committed=1*return(exit)")
        .await;
    let before = small_vm(m, &a, vm).await;
    let id = start_moving(&a, &b, vm).await;
    let doubt = status_until(&a, &id, Duration::from_secs(90), |s| {
        s.phase == pb::MigrationPhase::InDoubt as i32 || is_final(s)
    })
    .await;
    assert_eq!(
        doubt.phase,
        pb::MigrationPhase::InDoubt as i32,
        "{doubt:?}{}",
        logs(&a, &b)
    );
    (a, b, id, before)
}

/// The target defines the VM and dies before answering (`cold.tgt.finish.committed`,
/// SIGKILL): the source cannot know where the VM is, so it keeps it held — IN_DOUBT, not
/// startable, not cancellable — and asks until the target is back; the restarted target's
/// journal says the VM is defined there, and the source completes, removing its own
/// definition. (Before, the failed Finish was answered with an Abort that found nobody,
/// and the source freed the VM: defined on both hosts.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_finish_answer_keeps_the_vm_held_until_the_target_says() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let (a, mut b, id, before) = in_doubt_after_the_target_defined(&m, "moved").await;
    assert_eq!(vm_state(&a, "moved").await, Some(pb::VmState::Migrating));
    let mut ca = a.client().await.expect("client a");
    let start = ca
        .start_vm(pb::VmRef {
            name: "moved".into(),
        })
        .await;
    assert!(start.is_err(), "a held VM must not start: {start:?}");
    let cancel = ca
        .cancel_migration(pb::MigrationRef { id: id.clone() })
        .await;
    assert!(
        cancel
            .as_ref()
            .is_err_and(|s| s.message().contains("in doubt")),
        "{cancel:?}"
    );
    b.set_failpoints(None);
    b.restart().await.expect("restart the target agent");
    moved_to_b(&m, &a, &b, &id, &before).await;
}

/// As above, but the target never comes back: the VM stays held on the source until the
/// operator says the target is gone for good (`ResolveMigration`); then it is free there
/// again — defined, startable, and started it runs (asked of its QEMU).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_frees_a_cold_vm_whose_target_is_gone_for_good() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let (a, b, id, _) = in_doubt_after_the_target_defined(&m, "stranded").await;
    let end = declare_the_target_gone(&a, &b, &id, "stranded").await;
    assert!(
        end.error.contains("declared the target gone for good"),
        "{}",
        end.error
    );
    let mut ca = a.client().await.expect("client a");
    ca.start_vm(pb::VmRef {
        name: "stranded".into(),
    })
    .await
    .expect("free again: it starts");
    assert_eq!(a.observe_qemu("stranded").await, QemuObserved::Running);
}

/// The operator's verdict on `a`'s migration `id` (the target gone for good): it ends
/// FAILED with `vm` defined (stopped) on `a` again. Returns the migration's end.
async fn declare_the_target_gone(
    a: &TestAgent,
    b: &TestAgent,
    id: &str,
    vm: &str,
) -> pb::MigrationStatus {
    let mut ca = a.client().await.expect("client a");
    let end = ca
        .resolve_migration(pb::ResolveMigrationRequest {
            id: id.to_string(),
            target_gone: true,
        })
        .await
        .expect("verdict taken")
        .into_inner();
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Failed as i32,
        "{end:?}{}",
        logs(a, b)
    );
    assert_eq!(vm_state(a, vm).await, Some(pb::VmState::Defined));
    end
}

/// As above, but the target was not gone for good: its agent comes back with the VM
/// defined (journaled, never started). The source, which journaled the verdict's decision,
/// tells it that the VM was taken back, and the target removes the definition it made:
/// defined on the source only (asked of both agents), it starts there, and no QEMU runs on
/// the target. Before, the target kept the definition: the VM was defined on two hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_target_back_after_the_verdict_removes_the_definition_it_never_started() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let (a, mut b, id, _) = in_doubt_after_the_target_defined(&m, "returned").await;
    declare_the_target_gone(&a, &b, &id, "returned").await;
    let mut ca = a.client().await.expect("client a");

    b.set_failpoints(None);
    b.restart().await.expect("restart the target agent");
    wait_undefined(&a, &b, "returned").await;
    assert_eq!(vm_state(&a, "returned").await, Some(pb::VmState::Defined));
    ca.start_vm(pb::VmRef {
        name: "returned".into(),
    })
    .await
    .expect("the source's VM starts");
    assert_eq!(a.observe_qemu("returned").await, QemuObserved::Running);
    assert_eq!(b.observe_qemu("returned").await, QemuObserved::NoQemu);
}

/// As above, but the target's operator starts the VM there before the source's news is
/// acted on (held at `cold.tgt.taken_back.heard` meanwhile): the VM has a life of its own
/// there now, so the target refuses the news and keeps it running (asked over QMP), and
/// the source logs it as an error — defined on two hosts, the operator's to settle — and
/// fences its own stopped copy: a start there is refused until the operator clears it
/// (before, the source's copy started beside the target's on a mere `vm start`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_target_that_started_the_vm_before_the_news_keeps_it_and_the_source_holds_its_copy()
{
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let (a, mut b, id, _) = in_doubt_after_the_target_defined(&m, "started").await;
    declare_the_target_gone(&a, &b, &id, "started").await;

    b.set_failpoints(Some("cold.tgt.taken_back.heard=return(hang)"));
    b.restart().await.expect("restart the target agent");
    assert!(
        b.wait_failpoint("cold.tgt.taken_back.heard", Duration::from_secs(90))
            .await,
        "the news reached the target{}",
        logs(&a, &b)
    );
    let mut cb = b.client().await.expect("client b");
    cb.start_vm(pb::VmRef {
        name: "started".into(),
    })
    .await
    .expect("the target's operator starts the VM defined there");
    b.release_failpoint().expect("release");
    let refused = "answered that the VM lives there too";
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(a.log_path())
        .unwrap_or_default()
        .contains(refused)
    {
        assert!(
            Instant::now() < deadline,
            "the source did not log the refusal{}",
            logs(&a, &b)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(b.observe_qemu("started").await, QemuObserved::Running);
    assert_eq!(vm_state(&b, "started").await, Some(pb::VmState::Running));
    assert_eq!(a.observe_qemu("started").await, QemuObserved::NoQemu);
    assert_eq!(vm_state(&a, "started").await, Some(pb::VmState::Defined));
    // The source's copy, freed by the verdict, must not start beside the target's: held
    // (fenced) until the operator settles it.
    let vm = || pb::VmRef {
        name: "started".into(),
    };
    let mut ca = a.client().await.expect("client a");
    let info = ca.get_vm(vm()).await.expect("get vm a").into_inner();
    assert!(
        info.fenced.contains(&id) && info.fenced.contains("had started the VM already"),
        "{info:?}{}",
        logs(&a, &b)
    );
    let err = ca
        .start_vm(vm())
        .await
        .expect_err("the source's copy does not start beside the target's");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("clear-fence"), "{err:?}");
    assert_eq!(a.observe_qemu("started").await, QemuObserved::NoQemu);
    // The operator settles it: the target's copy stops, the source's fence is cleared
    // and its copy starts. One copy runs.
    cb.stop_vm(pb::StopVmRequest {
        name: "started".into(),
        force: true,
    })
    .await
    .expect("stop the target's copy");
    ca.clear_fence(vm()).await.expect("clear the fence");
    ca.start_vm(vm()).await.expect("the source's copy starts");
    assert_eq!(a.observe_qemu("started").await, QemuObserved::Running);
    assert_eq!(b.observe_qemu("started").await, QemuObserved::NoQemu);
}

/// The source's agent dies right after journaling the operator's verdict
/// (`cold.src.verdict.journaled`), before the VM is free there. Back with its journal, it
/// releases the VM without asking the target again and tells it, across its own restart,
/// that it took the VM back: the target, back later, removes the definition it made.
/// Defined on the source only (asked of both agents); it starts there, no QEMU on the
/// target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_source_restarted_after_journaling_the_verdict_releases_the_vm_and_tells_the_target()
{
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let (mut a, mut b, id, _) = in_doubt_after_the_target_defined_armed(
        &m,
        "twice",
        Some("cold.src.verdict.journaled=return(exit)"),
    )
    .await;
    let mut ca = a.client().await.expect("client a");
    // The source's agent dies within the call: its answer is a broken connection.
    let _ = ca
        .resolve_migration(pb::ResolveMigrationRequest {
            id: id.clone(),
            target_gone: true,
        })
        .await;
    assert!(
        a.wait_failpoint("cold.src.verdict.journaled", Duration::from_secs(30))
            .await,
        "the verdict was journaled{}",
        logs(&a, &b)
    );
    assert!(
        a.wait_exit(Duration::from_secs(10)).await,
        "the source agent died at the failpoint"
    );

    restart_the_source_until_it_fails(&mut a, &b, &id).await;
    assert_eq!(vm_state(&a, "twice").await, Some(pb::VmState::Defined));

    b.set_failpoints(None);
    b.restart().await.expect("restart the target agent");
    wait_undefined(&a, &b, "twice").await;
    assert_eq!(vm_state(&a, "twice").await, Some(pb::VmState::Defined));
    let mut ca = a.client().await.expect("client a");
    ca.start_vm(pb::VmRef {
        name: "twice".into(),
    })
    .await
    .expect("the source's VM starts");
    assert_eq!(a.observe_qemu("twice").await, QemuObserved::Running);
    assert_eq!(b.observe_qemu("twice").await, QemuObserved::NoQemu);
}

/// Restarts the source agent unarmed and waits (up to 60 s) for migration `id` to end
/// FAILED there.
async fn restart_the_source_until_it_fails(a: &mut TestAgent, b: &TestAgent, id: &str) {
    a.set_failpoints(None);
    a.restart().await.expect("restart the source agent");
    let end = status_until(a, id, Duration::from_secs(60), is_final).await;
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Failed as i32,
        "{end:?}{}",
        logs(a, b)
    );
}

/// Waits (up to 90 s) until `b` answers that it has no VM `vm`: NotFound, not merely an
/// error.
async fn wait_undefined(a: &TestAgent, b: &TestAgent, vm: &str) {
    let mut cb = b.client().await.expect("client b");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = cb.get_vm(pb::VmRef { name: vm.into() }).await;
        match got {
            Err(e) if e.code() == tonic::Code::NotFound => return,
            Err(e) => panic!("the target's answer: {e:?}{}", logs(a, b)),
            Ok(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "the target kept the definition: defined on two hosts{}",
            logs(a, b)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The source agent is killed after journaling the VM held and before sending Finish
/// (`cold.src.finish.journaled`): the target never defined it. The restarted source asks,
/// the target aborts its side (all images there, nothing defined), and the source frees
/// the VM: defined on the source only, and free to start or migrate again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_killed_before_sending_finish_keeps_the_vm() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let mut a = m
        .armed_host("a", "cold.src.finish.journaled=1*return(exit)")
        .await;
    let b = m.host("b", &m.root()).await;
    small_vm(&m, &a, "kept").await;
    let id = start_moving(&a, &b, "kept").await;
    assert!(
        a.wait_failpoint("cold.src.finish.journaled", Duration::from_secs(60))
            .await,
        "the source journaled its hold:{}",
        logs(&a, &b)
    );
    restart_the_source_until_it_fails(&mut a, &b, &id).await;
    assert_eq!(vm_state(&a, "kept").await, Some(pb::VmState::Defined));
    assert_eq!(
        vm_state(&b, "kept").await,
        None,
        "the target defined nothing"
    );
    // Free again: it moves when asked.
    let again = migrate(&a, offline("kept", &b)).await;
    assert_eq!(
        again.phase,
        pb::MigrationPhase::Completed as i32,
        "{again:?}{}",
        logs(&a, &b)
    );
    assert_eq!(vm_state(&b, "kept").await, Some(pb::VmState::Defined));
}

/// A target that stays connected but stops taking an image's data (held at
/// `cold.tgt.chunk.written` after the first chunk: storage that does not answer; QUIC
/// keeps the connection alive) fails the copy in bounded time (`cold_stall_timeout_s`, 3 s
/// here) with an error saying so; the VM stays defined on the source only, free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_stops_taking_the_images_fails_the_copy_in_bounded_time() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let a = m
        .host_with("a", &m.root(), "cold_stall_timeout_s = 3\n")
        .await;
    let b = m
        .armed_host("b", "cold.tgt.chunk.written=1*return(hang)")
        .await;
    // Incompressible and larger than what QUIC's windows let the source send ahead.
    let random = m.path("stall.pat");
    random_pattern(&random, 96 * MIB);
    let img = m.private("a").join("stall.qcow2");
    qemu_img_create(&img, "qcow2", "256M", None);
    qemu_io_write(&img, "qcow2", &[(random.as_path(), 0, 96 * MIB)]);
    define(
        &a,
        spec("stall", &[("vda", &m.root().join("stall.qcow2"), "qcow2")]),
    )
    .await;
    let end = migrate(&a, offline("stall", &b)).await;
    b.release_failpoint().expect("release");
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Failed as i32,
        "{end:?}{}",
        logs(&a, &b)
    );
    assert!(
        end.error.contains("no image data taken for 3 s"),
        "{}",
        end.error
    );
    assert_eq!(vm_state(&a, "stall").await, Some(pb::VmState::Defined));
    assert_eq!(
        vm_state(&b, "stall").await,
        None,
        "the target let go of the name"
    );
}

/// The end of a move of VM `moved` that settled after a fault: COMPLETED on `a`, the VM
/// defined on `b` only (the source's definition gone), `b`'s image byte for byte `before`.
async fn moved_to_b(m: &Mesh, a: &TestAgent, b: &TestAgent, id: &str, before: &str) {
    let end = status_until(a, id, Duration::from_secs(60), is_final).await;
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "{end:?}{}",
        logs(a, b)
    );
    assert_eq!(
        vm_state(a, "moved").await,
        None,
        "the source's definition is gone"
    );
    assert_eq!(vm_state(b, "moved").await, Some(pb::VmState::Defined));
    assert_eq!(digest(&m.private("b").join("moved.qcow2")), before);
}

fn is_final(s: &pb::MigrationStatus) -> bool {
    [
        pb::MigrationPhase::Completed,
        pb::MigrationPhase::Failed,
        pb::MigrationPhase::Cancelled,
    ]
    .iter()
    .any(|p| s.phase == *p as i32)
}

/// The target hashes every image it already has before it answers Prepare (an identical
/// one is skipped): for a large image that outlasts a peer call's deadline, and the
/// migration failed though nothing was wrong (before, a fixed minute: too long to hash
/// here, so the test shortens the peer deadline to 1 s, which B's hash of 6 GiB outlasts —
/// reproduced failing with the deadline's size term left out). The Prepare's deadline
/// covers reading the images once; the image already on B is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_that_hashes_a_large_image_already_there_is_waited_for() {
    let _serial = SERIAL.lock().await;
    let m = Mesh::new();
    let a = m
        .host_with("a", &m.root(), "peer_call_timeout_s = 1\n")
        .await;
    let b = m.host("b", &m.root()).await;
    // Sparse and all zeros on both hosts: identical, and 6 GiB to read and hash.
    for host in ["a", "b"] {
        qemu_img_create(&m.private(host).join("big.raw"), "raw", "6G", None);
    }
    define(
        &a,
        spec("big", &[("vda", &m.root().join("big.raw"), "raw")]),
    )
    .await;
    let end = migrate(&a, offline("big", &b)).await;
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "{end:?}{}",
        logs(&a, &b)
    );
    let st = stats(&end);
    assert_eq!(st.disk_bytes_resumed, 6 << 30, "already there: {st:?}");
    assert!(st.disk_wire_bytes < MIB, "nothing travelled: {st:?}");
    assert_eq!(vm_state(&b, "big").await, Some(pb::VmState::Defined));
}
