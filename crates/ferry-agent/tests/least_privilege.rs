//! Least privilege in the mesh, against real ferryd processes: roles from certificates,
//! tokens and the preparing agent on every later peer call, the deny list reloaded on
//! SIGHUP, confinement of boot files and arriving images, admission of a Prepare, and
//! data-plane handshakes that cannot stall a migration.
//!
//! Hostile peers are played by the test itself with real mesh certificates: a stock gRPC
//! client (tonic, as grpcio would be) and a QUIC client speaking ferry's wire format.

use ferry_api::v1 as pb;
use ferry_api::v1::ferry_peer_client::FerryPeerClient;
use ferry_testkit::{guest_artifacts, workload_cmdline, QemuObserved, TestAgent, TestPki};
use ferry_transport::pki::Identity;
use ferry_transport::{PeerIdentity, Role};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ferryd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferryd"))
}

fn small_spec(name: &str, memory_mib: u64) -> pb::VmSpec {
    let g = guest_artifacts().expect("guest artifacts: run scripts/build-guest.sh");
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib,
        kernel: g.kernel.display().to_string(),
        initrd: g.initrd.display().to_string(),
        cmdline: workload_cmdline(16, 1.0, "realistic", 3),
        ..Default::default()
    }
}

/// A test against agent B alone: B, the PKI with `hosts`' certificates, the directory,
/// and the lock that keeps these tests apart (fields drop in this order: B stops first).
struct AgentB {
    b: TestAgent,
    pki: TestPki,
    dir: tempfile::TempDir,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

async fn agent_b(hosts: &[&str]) -> AgentB {
    let serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), hosts).expect("pki");
    let b = TestAgent::start(&ferryd(), "b", &pki, dir.path(), "tcg")
        .await
        .expect("agent b");
    AgentB {
        b,
        pki,
        dir,
        _serial: serial,
    }
}

async fn peer(addr: &str, id: &Identity) -> FerryPeerClient<Channel> {
    FerryPeerClient::new(
        ferry_agent::tls::connect(addr, id)
            .await
            .expect("peer channel"),
    )
}

fn prepare_req(id: &str, spec: pb::VmSpec, claimed_source: &str) -> pb::PrepareRequest {
    pb::PrepareRequest {
        migration_id: id.into(),
        spec: Some(spec),
        source_host: claimed_source.into(),
        protocol_version: u32::from(ferry_wire::PROTOCOL_VERSION),
        ..Default::default()
    }
}

fn denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>, needle: &str) {
    let e = r.expect_err("must be refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains(needle),
        "{needle:?} not in: {}",
        e.message()
    );
}

/// `peer` aborts migration `mid` with its token: accepted, and the migration existed.
async fn aborts(peer: &mut FerryPeerClient<Channel>, mid: &str, token: &str, reason: &str) {
    let r = peer
        .abort(pb::AbortRequest {
            migration_id: mid.into(),
            reason: reason.into(),
            token: token.into(),
            taken_back: false,
        })
        .await
        .expect("the preparing agent aborts")
        .into_inner();
    assert!(r.existed, "{mid} existed");
}

fn serial_of(id: &Identity) -> String {
    id.peer_identity().expect("identity").serial
}

/// 1) Roles: operators and readers cannot use the peer API, agents cannot use the control
/// API, readers only look; later calls of a migration come only from the agent that
/// prepared it, with its token; `source_host` is the caller's certificate; a denied serial
/// is refused after SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_tokens_and_the_deny_list() {
    let t = agent_b(&["a", "b", "c"]).await;
    let (pki, b) = (&t.pki, &t.b);
    let operator = pki.operator().expect("operator");
    let reader = pki.issue(Role::Reader, "grafana").expect("reader");
    let (a_id, c_id) = (pki.identity("a").expect("a"), pki.identity("c").expect("c"));

    // The operator certificate on every peer method: refused, naming the role it lacks.
    let mut op_peer = peer(&b.grpc_addr(), &operator).await;
    let need = "needs role agent and the caller is operator operator";
    let mid = uuid::Uuid::new_v4().to_string();
    denied(
        op_peer
            .prepare(prepare_req(&mid, small_spec("x", 64), ""))
            .await,
        need,
    );
    denied(
        op_peer
            .check_storage(pb::CheckStorageRequest::default())
            .await,
        need,
    );
    denied(
        op_peer
            .commit(pb::CommitRequest {
                migration_id: mid.clone(),
                ..Default::default()
            })
            .await,
        need,
    );
    denied(
        op_peer
            .abort(pb::AbortRequest {
                migration_id: mid.clone(),
                ..Default::default()
            })
            .await,
        need,
    );
    denied(
        op_peer
            .incoming_status(pb::IncomingStatusRequest {
                id: mid.clone(),
                token: String::new(),
            })
            .await,
        need,
    );
    denied(op_peer.host_facts(pb::HostFactsRequest {}).await, need);
    denied(
        op_peer
            .prepare_cold_migration(pb::PrepareColdMigrationRequest::default())
            .await,
        need,
    );
    denied(
        op_peer
            .finish_cold_migration(pb::FinishColdMigrationRequest::default())
            .await,
        need,
    );
    denied(
        op_peer
            .abort_cold_migration(pb::AbortColdMigrationRequest::default())
            .await,
        need,
    );
    // No QEMU was started, no RAM file made by any of that.
    assert!(b.qemu_pids().is_empty());
    assert!(std::fs::read_dir(b.ram_dir())
        .expect("ram dir")
        .next()
        .is_none());

    // Agents cannot drive the control API; readers can look but not act.
    let mut as_agent = ferry_testkit::connect_control(&b.grpc_addr(), &a_id)
        .await
        .expect("connect");
    denied(
        as_agent.list_vms(pb::ListVmsRequest {}).await,
        "needs role operator or reader and the caller is agent a",
    );
    let mut as_reader = ferry_testkit::connect_control(&b.grpc_addr(), &reader)
        .await
        .expect("connect");
    as_reader
        .list_vms(pb::ListVmsRequest {})
        .await
        .expect("a reader lists VMs");
    denied(
        as_reader
            .define_vm(pb::DefineVmRequest {
                spec: Some(small_spec("r", 64)),
            })
            .await,
        "DefineVm needs role operator and the caller is reader grafana",
    );
    denied(
        as_reader
            .start_migration(pb::StartMigrationRequest {
                vm: "r".into(),
                target: b.grpc_addr(),
                ..Default::default()
            })
            .await,
        "StartMigration needs role operator",
    );

    // Prepare names its source by certificate: a claim that differs is refused.
    let mut a_peer = peer(&b.grpc_addr(), &a_id).await;
    let mid = uuid::Uuid::new_v4().to_string();
    denied(
        a_peer
            .prepare(prepare_req(&mid, small_spec("m1", 64), "c"))
            .await,
        "claims source_host \"c\" but the caller's certificate is agent a",
    );
    // A real Prepare from A (a paused QEMU waits on B for A's data plane).
    let prep = a_peer
        .prepare(prepare_req(&mid, small_spec("m1", 64), "a"))
        .await
        .expect("A prepares")
        .into_inner();
    assert!(!prep.token.is_empty());

    // Agent C holds a mesh certificate, and even the token: still not its migration.
    let mut c_peer = peer(&b.grpc_addr(), &c_id).await;
    let not_c = "prepared by agent a, not by agent c";
    denied(
        c_peer
            .commit(pb::CommitRequest {
                migration_id: mid.clone(),
                token: prep.token.clone(),
                leave_paused: false,
            })
            .await,
        not_c,
    );
    denied(
        c_peer
            .abort(pb::AbortRequest {
                migration_id: mid.clone(),
                reason: "hostile".into(),
                token: prep.token.clone(),
                taken_back: false,
            })
            .await,
        not_c,
    );
    denied(
        c_peer
            .incoming_status(pb::IncomingStatusRequest {
                id: mid.clone(),
                token: prep.token.clone(),
            })
            .await,
        not_c,
    );
    // A without the token: refused too.
    denied(
        a_peer
            .abort(pb::AbortRequest {
                migration_id: mid.clone(),
                reason: "no token".into(),
                token: String::new(),
                taken_back: false,
            })
            .await,
        "wrong token",
    );
    // C's attempts changed nothing: B still holds the prepared migration (its QEMU).
    let st = a_peer
        .incoming_status(pb::IncomingStatusRequest {
            id: mid.clone(),
            token: prep.token.clone(),
        })
        .await
        .expect("A asks")
        .into_inner();
    assert_eq!(st.state, pb::IncomingState::Prepared as i32);
    // The incoming QEMU starts in the background, after Prepare answered.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = b.observe_qemu("m1").await;
    while !matches!(seen, QemuObserved::Stopped(_)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen = b.observe_qemu("m1").await;
    }
    assert!(
        matches!(seen, QemuObserved::Stopped(_)),
        "B's incoming QEMU waits, paused: {seen:?}"
    );
    // A, with its token, aborts it: everything goes.
    aborts(&mut a_peer, &mid, &prep.token, "test done").await;
    assert_eq!(b.observe_qemu("m1").await, QemuObserved::NoQemu);

    // The deny list: C's serial, added to B's config, takes effect on SIGHUP.
    c_peer
        .host_facts(pb::HostFactsRequest {})
        .await
        .expect("C is served before");
    let cfg = std::fs::read_to_string(b.config_path()).expect("config");
    let key_line = cfg
        .lines()
        .find(|l| l.starts_with("key = "))
        .expect("[tls] key line")
        .to_string();
    let serial = serial_of(&c_id);
    let cfg = cfg.replace(
        &key_line,
        &format!("{key_line}\ndeny_serials = [\"{}\"]", serial.to_uppercase()),
    );
    std::fs::write(b.config_path(), cfg).expect("write config");
    b.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match peer(&b.grpc_addr(), &c_id)
            .await
            .host_facts(pb::HostFactsRequest {})
            .await
        {
            Err(e) if e.code() == Code::PermissionDenied => break e,
            _ if Instant::now() > deadline => panic!("C still served 10 s after SIGHUP"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert!(
        refused.message().contains("deny list"),
        "{}",
        refused.message()
    );
    a_peer
        .host_facts(pb::HostFactsRequest {})
        .await
        .expect("A is still served");
}

/// 2) Boot files outside `boot_roots` are refused at DefineVm and in a peer's Prepare.
/// 3) A Prepare for more memory than the target can hold is refused at Prepare, and the
///    target's own guest keeps running (asked over QMP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confinement_and_admission() {
    let t = agent_b(&["a", "b"]).await;
    let (pki, b) = (&t.pki, &t.b);
    let mut spec = small_spec("shadow", 64);
    spec.kernel = "/etc/shadow".into();
    let e = b
        .client()
        .await
        .expect("client")
        .define_vm(pb::DefineVmRequest {
            spec: Some(spec.clone()),
        })
        .await
        .expect_err("kernel outside the boot roots");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("kernel /etc/shadow") && e.message().contains("boot_roots"),
        "{}",
        e.message()
    );
    let mut a_peer = peer(&b.grpc_addr(), &pki.identity("a").expect("a")).await;
    let e = a_peer
        .prepare(prepare_req(&uuid::Uuid::new_v4().to_string(), spec, "a"))
        .await
        .expect_err("a peer's spec is confined the same way");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("kernel /etc/shadow"),
        "{}",
        e.message()
    );
    let mut initrd = small_spec("initrd", 64);
    initrd.initrd = "/etc/passwd".into();
    let e = a_peer
        .prepare(prepare_req(&uuid::Uuid::new_v4().to_string(), initrd, "a"))
        .await
        .expect_err("initrd outside");
    assert!(
        e.message().contains("initrd /etc/passwd"),
        "{}",
        e.message()
    );
    assert!(
        b.qemu_pids().is_empty(),
        "nothing started for refused specs"
    );

    // Shared disks are opened in place: not another VM's disk, and not an image whose
    // backing file lies outside the roots.
    let keeper_img = b.storage_dir().join("keeper.qcow2");
    ferry_disk::image::create(&keeper_img, ferry_disk::ImageFormat::Qcow2, 64 << 20, None)
        .expect("keeper image");
    let mut keeper = small_spec("keeper", 64);
    keeper.disks = vec![pb::DiskSpec {
        id: "vda".into(),
        path: keeper_img.display().to_string(),
        format: "qcow2".into(),
        read_only: false,
    }];
    b.client()
        .await
        .expect("client")
        .define_vm(pb::DefineVmRequest {
            spec: Some(keeper.clone()),
        })
        .await
        .expect("define keeper on B");
    let shared = |file: &str| {
        let mut s = small_spec("taker", 64);
        s.disks = vec![pb::DiskSpec {
            id: "vda".into(),
            path: format!("/elsewhere/{file}"),
            format: "qcow2".into(),
            read_only: false,
        }];
        let mut r = prepare_req(&uuid::Uuid::new_v4().to_string(), s, "a");
        r.shared_disks = vec![pb::DiskProbe {
            id: "vda".into(),
            path: file.into(),
            format: "qcow2".into(),
            ..Default::default()
        }];
        r
    };
    let e = a_peer
        .prepare(shared("keeper.qcow2"))
        .await
        .expect_err("another VM's disk");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("is VM 'keeper''s disk"),
        "{}",
        e.message()
    );
    qcow2_with_raw_backing_name(&b.storage_dir().join("sneaky.qcow2"), "/etc/shadow");
    let e = a_peer
        .prepare(shared("sneaky.qcow2"))
        .await
        .expect_err("backing outside the roots");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("shared disk 'vda'") && e.message().contains("/etc/shadow"),
        "{}",
        e.message()
    );
    assert!(
        b.qemu_pids().is_empty(),
        "nothing started for refused shared disks"
    );

    // B runs a guest of its own.
    let own = b
        .define_and_boot(small_spec("own", 128))
        .await
        .expect("B's own guest");
    assert_eq!(b.observe_qemu("own").await, QemuObserved::Running);
    // 512 GiB on a host with far less: refused at Prepare, before any file or QEMU.
    let mid = uuid::Uuid::new_v4().to_string();
    let e = a_peer
        .prepare(prepare_req(&mid, small_spec("huge", 512 * 1024), "a"))
        .await
        .expect_err("more memory than B has");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("'huge'") && e.message().contains("do not fit"),
        "{}",
        e.message()
    );
    assert_eq!(
        b.qemu_pids().len(),
        1,
        "only B's own QEMU: {:?}",
        b.qemu_pids()
    );
    assert!(!b.ram_dir().join("huge.ram").exists());
    // B's own guest was not touched: its QEMU runs and its memory check passes.
    assert_eq!(b.observe_qemu("own").await, QemuObserved::Running);
    let check = b.guest_check("own").await.expect("guest check");
    assert!(check.ok, "{check:?}");
    let _ = own;
}

/// A hostile cold source: prepares an incoming cold migration on `target` as agent `a`
/// and streams `image` (declared with no backing layer) over the data plane, then asks
/// to finish. Returns Finish's answer.
async fn hostile_cold_copy(
    target: &TestAgent,
    pki: &TestPki,
    vm: &str,
    image: &Path,
) -> Result<pb::FinishColdMigrationResponse, tonic::Status> {
    let id = pki.identity("a").expect("a");
    let mut p = peer(&target.grpc_addr(), &id).await;
    let bytes = std::fs::read(image).expect("image");
    let digest = ferry_disk::Blake3Digest::of_bytes(&bytes);
    let name = image
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    let mut spec = small_spec(vm, 64);
    spec.disks = vec![pb::DiskSpec {
        id: "vda".into(),
        path: format!("/nowhere/{name}"),
        format: "qcow2".into(),
        read_only: false,
    }];
    let mid = uuid::Uuid::new_v4().to_string();
    let prep = p
        .prepare_cold_migration(pb::PrepareColdMigrationRequest {
            migration_id: mid.clone(),
            spec: Some(spec),
            source_host: "a".into(),
            protocol_version: u32::from(ferry_wire::PROTOCOL_VERSION),
            images: vec![pb::ColdImage {
                path: name.clone(),
                length: bytes.len() as u64,
                blake3: digest.to_hex(),
                format: "qcow2".into(),
                allocated_bytes: bytes.len() as u64,
                transfer_id: format!("hostile-{mid}"),
                disk_id: "vda".into(),
                backing: String::new(),
            }],
        })
        .await?
        .into_inner();
    let quic_addr: std::net::SocketAddr = prep.quic_addr.parse().expect("quic addr");
    let ep = ferry_transport::QuicEndpoint::client(quic_addr, &id, &Default::default())
        .expect("client endpoint");
    let conn = ep.connect(quic_addr, "127.0.0.1").await.expect("connect");
    let mut send = conn.open_uni().await.expect("stream");
    ferry_transport::write_stream_header(
        &mut send,
        ferry_wire::StreamHeader::new(ferry_wire::StreamKind::DiskImage, 0),
    )
    .await
    .expect("header");
    let begin = ferry_wire::ControlMessage::DiskImageBegin {
        migration_id: mid.clone(),
        token: prep.token.clone(),
        index: 0,
        offset: 0,
    };
    send.write_all(&ferry_wire::Frame::encode_control(&begin).expect("begin"))
        .await
        .expect("send");
    for (i, chunk) in bytes.chunks(1 << 20).enumerate() {
        let frame = ferry_wire::DataChunk::encode((i << 20) as u64, chunk, ferry_wire::Codec::None)
            .expect("chunk");
        send.write_all(&frame).await.expect("send");
    }
    let end = ferry_wire::ControlMessage::DiskImageEnd {
        length: bytes.len() as u64,
    };
    send.write_all(&ferry_wire::Frame::encode_control(&end).expect("end"))
        .await
        .expect("send");
    send.finish().expect("finish");
    let _ = send.stopped().await;
    let r = p
        .finish_cold_migration(pb::FinishColdMigrationRequest {
            migration_id: mid,
            token: prep.token,
            start: true,
        })
        .await
        .map(tonic::Response::into_inner);
    conn.close(0u32.into(), b"done");
    r
}

fn qcow2_with_raw_backing_name(path: &Path, backing: &str) {
    let out = Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing,
        ])
        .arg(path)
        .arg("64M")
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 2) A cold image whose backing file points outside the storage roots, or is a `json:`
/// spec, is refused on arrival and removed; the VM is not defined and nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_cold_images_are_refused_on_arrival() {
    let t = agent_b(&["a", "b"]).await;
    let (dir, pki, b) = (&t.dir, &t.pki, &t.b);
    let cases = [
        (
            "outside.qcow2",
            "/etc/shadow".to_string(),
            "did not declare",
        ),
        (
            "json.qcow2",
            r#"json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}"#
                .to_string(),
            "not a plain file",
        ),
    ];
    for (i, (file, backing, why)) in cases.iter().enumerate() {
        let image = dir.path().join(file);
        qcow2_with_raw_backing_name(&image, backing);
        let vm = format!("evil{i}");
        let e = hostile_cold_copy(b, pki, &vm, &image)
            .await
            .expect_err("refused on arrival");
        eprintln!("{file}: {}", e.message());
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains(why), "{why:?} not in {}", e.message());
        assert!(
            !b.storage_dir().join(file).exists(),
            "the refused image is removed"
        );
        let left: Vec<_> = std::fs::read_dir(b.storage_dir())
            .expect("storage")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "nothing left in B's storage: {left:?}");
        let e = b
            .client()
            .await
            .expect("client")
            .get_vm(pb::VmRef { name: vm.clone() })
            .await
            .expect_err("not defined");
        assert_eq!(e.code(), Code::NotFound);
        assert!(b.qemu_pids().is_empty());
    }
}

/// A UDP relay from a loopback address of its own that forwards a QUIC client's
/// packets to `server` and drops every answer: the server sees a handshake that never
/// completes (half-open).
async fn black_hole(from: std::net::IpAddr, server: std::net::SocketAddr) -> std::net::SocketAddr {
    let sock = tokio::net::UdpSocket::bind((from, 0)).await.expect("relay");
    let addr = sock.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, src)) = sock.recv_from(&mut buf).await {
            if src != server {
                let _ = sock.send_to(&buf[..n], server).await;
            }
        }
    });
    addr
}

/// 4) 64 half-open QUIC handshakes from another address do not stall a migration
/// started beside them: it completes (the guest's own check passes on the target). The
/// time it takes with and without them is printed for benches/RESULTS.md; the test
/// asserts no timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_handshakes_do_not_stall_a_migration() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), &["a", "b"]).expect("pki");
    let a = TestAgent::start(&ferryd(), "a", &pki, dir.path(), "tcg")
        .await
        .expect("agent a");
    let b = TestAgent::start(&ferryd(), "b", &pki, dir.path(), "tcg")
        .await
        .expect("agent b");
    let migrate = |vm: &'static str, to: &TestAgent| {
        let (target, ac) = (to.grpc_addr(), a.client());
        async move {
            let mut c = ac.await.expect("client");
            let t0 = Instant::now();
            let id = c
                .start_migration(pb::StartMigrationRequest {
                    vm: vm.into(),
                    target,
                    ..Default::default()
                })
                .await
                .expect("start")
                .into_inner()
                .id;
            let end = ferry_testkit::watch_to_end(&mut c, &id)
                .await
                .expect("watch");
            (end, t0.elapsed())
        }
    };
    a.define_and_boot(small_spec("calm", 128))
        .await
        .expect("boot");
    let (end, quiet) = migrate("calm", &b).await;
    assert_eq!(end.phase, pb::MigrationPhase::Completed as i32, "{end:?}");

    // 64 half-open handshakes to B's data plane from 127.0.0.2.
    let server: std::net::SocketAddr = b.quic_addr().parse().expect("quic addr");
    let attacker: std::net::IpAddr = "127.0.0.2".parse().expect("ip");
    let id = pki.identity("a").expect("a");
    let mut pending = Vec::new();
    for _ in 0..64 {
        let relay = black_hole(attacker, server).await;
        let ep = ferry_transport::QuicEndpoint::client(relay, &id, &Default::default())
            .expect("client endpoint");
        pending.push(tokio::spawn(async move {
            let r = ep.connect(relay, "127.0.0.1").await;
            (ep, r.is_ok())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.define_and_boot(small_spec("beside", 128))
        .await
        .expect("boot");
    let (end, flooded) = migrate("beside", &b).await;
    assert_eq!(
        end.phase,
        pb::MigrationPhase::Completed as i32,
        "{end:?}\nB log:\n{}",
        b.log_tail()
    );
    let check = b.guest_check("beside").await.expect("guest check on B");
    assert!(check.ok, "{check:?}");
    eprintln!(
        "half-open flood: migration took {:.2} s beside 64 half-open handshakes, {:.2} s without",
        flooded.as_secs_f64(),
        quiet.as_secs_f64()
    );
    // None of the black-holed handshakes completed, and B noticed them.
    for p in pending {
        p.abort();
    }
    let log = std::fs::read_to_string(b.log_path()).expect("b log");
    assert!(
        log.contains("127.0.0.2") && log.contains("data-plane handshake"),
        "B saw the half-open handshakes"
    );
}

#[test]
fn peer_identity_of_test_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(dir.path(), &["a"]).expect("pki");
    let a: PeerIdentity = pki.identity("a").expect("a").peer_identity().expect("id");
    assert_eq!((a.role, a.name.as_str()), (Role::Agent, "a"));
    let op = pki.operator().expect("op").peer_identity().expect("id");
    assert_eq!(op.role, Role::Operator);
}

/// Sends the data plane's Hello for `mid` to `quic_addr` as agent `id`, the way a source
/// does while its Prepare runs; returns the control channel (and its connection) to read
/// the answer from.
async fn hello(
    quic_addr: &str,
    id: &Identity,
    mid: &str,
    token: &str,
    ram_bytes: u64,
) -> (
    ferry_transport::QuicEndpoint,
    quinn::Connection,
    ferry_transport::ControlChannel,
) {
    let addr: std::net::SocketAddr = quic_addr.parse().expect("quic addr");
    let ep = ferry_transport::QuicEndpoint::client(addr, id, &Default::default())
        .expect("client endpoint");
    let conn = ep.connect(addr, "127.0.0.1").await.expect("connect");
    let (mut send, recv) = conn.open_bi().await.expect("control stream");
    ferry_transport::write_stream_header(
        &mut send,
        ferry_wire::StreamHeader::new(ferry_wire::StreamKind::Control, 0),
    )
    .await
    .expect("header");
    let mut ctl = ferry_transport::ControlChannel::new(send, recv);
    ctl.send(&ferry_wire::ControlMessage::Hello {
        version: ferry_wire::PROTOCOL_VERSION,
        migration_id: mid.into(),
        token: token.into(),
        ram_bytes,
        page_size: 4096,
        page_streams: 1,
    })
    .await
    .expect("hello");
    (ep, conn, ctl)
}

/// 5) A source opens the data plane while its Prepare runs: a Hello that comes before the
/// Prepare waits for it and is then answered; one from another agent is still refused
/// once the migration is prepared (waiting lends it nothing); one for a migration never
/// prepared is refused within `HELLO_WAITS_FOR_PREPARE` (plus slack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_before_its_prepare_waits_for_it() {
    let t = agent_b(&["a", "b", "c"]).await;
    let (pki, b) = (&t.pki, &t.b);
    let (a_id, c_id) = (pki.identity("a").expect("a"), pki.identity("c").expect("c"));
    let mid = uuid::Uuid::new_v4().to_string();
    let token = "0123456789abcdef0123456789abcdef";
    let ram = 64u64 << 20;
    let (_ea, _ca, mut from_a) = hello(&b.quic_addr(), &a_id, &mid, token, ram).await;
    let (_ec, _cc, mut from_c) = hello(&b.quic_addr(), &c_id, &mid, token, ram).await;
    // Not prepared yet: no answer, either way.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), from_a.recv())
            .await
            .is_err(),
        "B answered a Hello before the migration was prepared"
    );
    let mut a_peer = peer(&b.grpc_addr(), &a_id).await;
    let mut req = prepare_req(&mid, small_spec("early", 64), "a");
    req.token = token.into();
    let prep = a_peer.prepare(req).await.expect("A prepares").into_inner();
    assert_eq!(prep.token, token);
    let answer = tokio::time::timeout(Duration::from_secs(10), from_a.recv())
        .await
        .expect("A's Hello answered once prepared")
        .expect("control stream");
    assert!(
        matches!(answer, ferry_wire::ControlMessage::HelloOk { .. }),
        "{answer:?}"
    );
    // C waited as long, with the token: refused (the connection closes with the reason).
    let refused = tokio::time::timeout(Duration::from_secs(10), from_c.recv())
        .await
        .expect("C's Hello answered once prepared");
    let why = format!("{:?}", refused.expect_err("C is refused"));
    assert!(why.contains("prepared by agent a, not by agent c"), "{why}");

    // A Hello for a migration nobody prepares: refused in bounded time.
    let t0 = Instant::now();
    let (_eu, _cu, mut unknown) = hello(&b.quic_addr(), &a_id, "never-prepared", token, ram).await;
    let refused = tokio::time::timeout(Duration::from_secs(15), unknown.recv())
        .await
        .expect("refused within 15 s");
    let why = format!("{:?}", refused.expect_err("refused"));
    assert!(why.contains("unknown migration never-prepared"), "{why}");
    assert!(t0.elapsed() >= ferry_agent::migration::target::HELLO_WAITS_FOR_PREPARE);

    // B's side, asked directly: the migration A prepared waits for A alone; A aborts it.
    aborts(&mut a_peer, &mid, token, "test done").await;
    assert_eq!(b.observe_qemu("early").await, QemuObserved::NoQemu);
}

/// The incoming QEMU starts after Prepare has answered. An Abort that comes at once (the
/// QEMU still starting) or later leaves nothing on B: no QEMU process (its command lines
/// read from /proc), no VM, no RAM file; and the name is free for the next Prepare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_while_the_incoming_qemu_starts_leaves_nothing() {
    let t = agent_b(&["a", "b"]).await;
    let (pki, b) = (&t.pki, &t.b);
    let mut a_peer = peer(&b.grpc_addr(), &pki.identity("a").expect("a")).await;
    for wait_ms in [0u64, 0, 10, 30, 60, 500] {
        let mid = uuid::Uuid::new_v4().to_string();
        let prep = a_peer
            .prepare(prepare_req(&mid, small_spec("quick", 64), "a"))
            .await
            .expect("A prepares")
            .into_inner();
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        aborts(&mut a_peer, &mid, &prep.token, "changed my mind").await;
        // Abort answers once the discard is done: nothing to wait for.
        assert!(
            b.qemu_pids().is_empty(),
            "after {wait_ms} ms: QEMU left on B: {:?}",
            b.qemu_pids()
        );
        assert_eq!(b.observe_qemu("quick").await, QemuObserved::NoQemu);
        assert!(
            !b.ram_dir().join("quick.ram").exists(),
            "after {wait_ms} ms"
        );
        let st = a_peer
            .incoming_status(pb::IncomingStatusRequest {
                id: mid.clone(),
                token: prep.token.clone(),
            })
            .await
            .expect("status")
            .into_inner();
        assert_eq!(
            st.state,
            pb::IncomingState::Aborted as i32,
            "after {wait_ms} ms"
        );
    }
}
