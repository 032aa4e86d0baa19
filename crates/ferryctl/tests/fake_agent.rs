//! ferryctl against a fake agent: a test double of the `FerryControl` gRPC service (not
//! ferryd) behind the same mutual TLS, with canned VMs and scripted migrations. Checks the
//! connection, the request fields, the watch loop and the exit codes.

use clap::Parser;
use ferry_api::v1 as pb;
use ferry_api::v1::ferry_control_server::{FerryControl, FerryControlServer};
use ferryctl::cli::Cli;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tonic::codegen::tokio_stream::{self, Stream};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Fake {
    last_start: Arc<Mutex<Option<pb::StartMigrationRequest>>>,
}

fn vm(name: &str) -> pb::VmInfo {
    pb::VmInfo {
        spec: Some(pb::VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_mib: 64,
            ..Default::default()
        }),
        state: pb::VmState::Running as i32,
        pid: 99,
        ..Default::default()
    }
}

/// Migration `m-<vm>` in `phase`, round `round`.
fn status(id: &str, phase: pb::MigrationPhase, round: u32) -> pb::MigrationStatus {
    let error = match phase {
        pb::MigrationPhase::Failed => "fake-b: prepare: VM web1 already defined on target".into(),
        pb::MigrationPhase::InDoubt => "fake-b: commit: no answer".into(),
        _ => String::new(),
    };
    pb::MigrationStatus {
        id: id.into(),
        vm: id.trim_start_matches("m-").into(),
        source: "fake-a".into(),
        target: "fake-b".into(),
        phase: phase as i32,
        stats: Some(pb::MigrationStats {
            guest_ram_bytes: 64 << 20,
            pages_sent: u64::from(round) * 4000,
            page_bytes: u64::from(round) * 4000 * 4096,
            wire_bytes: u64::from(round) * 2000 * 4096,
            rounds: round,
            compression_ratio: 2.0,
            elapsed_ms: u64::from(round) * 100,
            ram_digest: if phase == pb::MigrationPhase::Completed {
                "feed".into()
            } else {
                String::new()
            },
            ..Default::default()
        }),
        error,
        message: format!("round {round}"),
        ..Default::default()
    }
}

fn final_phase(id: &str) -> pb::MigrationPhase {
    match id {
        "m-fail" => pb::MigrationPhase::Failed,
        "m-doubt" => pb::MigrationPhase::InDoubt,
        "m-cancel" => pb::MigrationPhase::Cancelled,
        "m-vanish" => pb::MigrationPhase::Precopy,
        _ => pb::MigrationPhase::Completed,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::MigrationStatus, Status>> + Send>>;

#[tonic::async_trait]
impl FerryControl for Fake {
    async fn define_vm(
        &self,
        r: Request<pb::DefineVmRequest>,
    ) -> Result<Response<pb::VmInfo>, Status> {
        let spec = r
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("no spec"))?;
        Ok(Response::new(pb::VmInfo {
            spec: Some(spec),
            state: pb::VmState::Defined as i32,
            ..Default::default()
        }))
    }
    async fn undefine_vm(&self, r: Request<pb::VmRef>) -> Result<Response<pb::VmInfo>, Status> {
        Ok(Response::new(vm(&r.into_inner().name)))
    }
    async fn start_vm(&self, r: Request<pb::VmRef>) -> Result<Response<pb::VmInfo>, Status> {
        Ok(Response::new(vm(&r.into_inner().name)))
    }
    async fn stop_vm(&self, r: Request<pb::StopVmRequest>) -> Result<Response<pb::VmInfo>, Status> {
        Ok(Response::new(vm(&r.into_inner().name)))
    }
    async fn suspend_vm(&self, r: Request<pb::VmRef>) -> Result<Response<pb::VmInfo>, Status> {
        Ok(Response::new(vm(&r.into_inner().name)))
    }
    async fn resume_vm(&self, r: Request<pb::VmRef>) -> Result<Response<pb::VmInfo>, Status> {
        Ok(Response::new(vm(&r.into_inner().name)))
    }
    async fn clear_fence(&self, r: Request<pb::VmRef>) -> Result<Response<pb::VmInfo>, Status> {
        Ok(Response::new(vm(&r.into_inner().name)))
    }
    async fn get_vm(&self, r: Request<pb::VmRef>) -> Result<Response<pb::VmInfo>, Status> {
        let name = r.into_inner().name;
        if name == "missing" {
            return Err(Status::not_found("fake-a: VM missing is not defined"));
        }
        Ok(Response::new(vm(&name)))
    }
    async fn list_vms(
        &self,
        _: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        Ok(Response::new(pb::ListVmsResponse {
            vms: vec![vm("web1"), vm("db1")],
        }))
    }
    async fn start_migration(
        &self,
        r: Request<pb::StartMigrationRequest>,
    ) -> Result<Response<pb::MigrationStatus>, Status> {
        let req = r.into_inner();
        let id = format!("m-{}", req.vm);
        *self
            .last_start
            .lock()
            .map_err(|_| Status::internal("poisoned"))? = Some(req);
        Ok(Response::new(status(&id, pb::MigrationPhase::Preparing, 0)))
    }
    type WatchMigrationStream = WatchStream;
    async fn watch_migration(
        &self,
        r: Request<pb::MigrationRef>,
    ) -> Result<Response<WatchStream>, Status> {
        let id = r.into_inner().id;
        let mut items: Vec<Result<pb::MigrationStatus, Status>> = vec![
            Ok(status(&id, pb::MigrationPhase::Preparing, 0)),
            Ok(status(&id, pb::MigrationPhase::Precopy, 1)),
            Ok(status(&id, pb::MigrationPhase::Precopy, 2)),
        ];
        let last = final_phase(&id);
        if last != pb::MigrationPhase::Precopy {
            items.push(Ok(status(&id, last, 3)));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
    async fn cancel_migration(
        &self,
        r: Request<pb::MigrationRef>,
    ) -> Result<Response<pb::MigrationStatus>, Status> {
        Ok(Response::new(status(
            &r.into_inner().id,
            pb::MigrationPhase::Precopy,
            2,
        )))
    }
    async fn resolve_migration(
        &self,
        r: Request<pb::ResolveMigrationRequest>,
    ) -> Result<Response<pb::MigrationStatus>, Status> {
        Ok(Response::new(status(
            &r.into_inner().id,
            pb::MigrationPhase::Failed,
            3,
        )))
    }
    async fn get_migration(
        &self,
        r: Request<pb::MigrationRef>,
    ) -> Result<Response<pb::MigrationStatus>, Status> {
        let id = r.into_inner().id;
        let phase = final_phase(&id);
        Ok(Response::new(status(&id, phase, 3)))
    }
    async fn list_migrations(
        &self,
        _: Request<pb::ListMigrationsRequest>,
    ) -> Result<Response<pb::ListMigrationsResponse>, Status> {
        Ok(Response::new(pb::ListMigrationsResponse {
            migrations: vec![status("m-web1", pb::MigrationPhase::Completed, 3)],
        }))
    }

    async fn preflight(
        &self,
        _: Request<pb::PreflightRequest>,
    ) -> Result<Response<pb::PreflightReport>, Status> {
        Err(Status::unimplemented("the fake agent has no preflight"))
    }
    async fn get_host_facts(
        &self,
        _: Request<pb::HostFactsRequest>,
    ) -> Result<Response<pb::HostFacts>, Status> {
        Err(Status::unimplemented("the fake agent has no host facts"))
    }
}

/// Starts the fake agent with `fake-a`'s certificate; returns its address.
async fn serve(pki: &Path, fake: Fake) -> String {
    let f = ferry_transport::pki::host_files(pki, "fake-a");
    let read = |p: &Path| std::fs::read_to_string(p).expect("read pem");
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&f.cert), read(&f.key)))
        .client_ca_root(Certificate::from_pem(read(&f.ca)));
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = incoming.local_addr().expect("local addr");
    let router = Server::builder()
        .tls_config(tls)
        .expect("tls")
        .add_service(FerryControlServer::new(fake));
    tokio::spawn(router.serve_with_incoming(incoming));
    addr.to_string()
}

struct Setup {
    _dir: tempfile::TempDir,
    pki: std::path::PathBuf,
    addr: String,
    last_start: Arc<Mutex<Option<pb::StartMigrationRequest>>>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    ferry_transport::pki::write_dev_pki(&pki, &[("fake-a".into(), vec![]), ("ops".into(), vec![])])
        .expect("pki");
    let fake = Fake::default();
    let last_start = fake.last_start.clone();
    let addr = serve(&pki, fake).await;
    Setup {
        _dir: dir,
        pki,
        addr,
        last_start,
    }
}

impl Setup {
    async fn run(&self, args: &[&str]) -> anyhow::Result<u8> {
        let pki = self.pki.display().to_string();
        let mut argv = vec![
            "ferryctl",
            "--agent",
            &self.addr,
            "--pki-dir",
            &pki,
            "--identity",
            "ops",
        ];
        argv.extend_from_slice(args);
        ferryctl::app::run(Cli::try_parse_from(argv)?).await
    }
}

#[tokio::test]
async fn vm_commands_over_mutual_tls() {
    let s = setup().await;
    assert_eq!(s.run(&["vm", "list"]).await.expect("list"), 0);
    assert_eq!(
        s.run(&["vm", "list", "--json"]).await.expect("list json"),
        0
    );
    assert_eq!(s.run(&["vm", "show", "web1"]).await.expect("show"), 0);
    assert_eq!(
        s.run(&["vm", "stop", "web1", "--force"])
            .await
            .expect("stop"),
        0
    );
    let e = s
        .run(&["vm", "show", "missing"])
        .await
        .expect_err("not found");
    assert_eq!(
        e.to_string(),
        "show VM missing: fake-a: VM missing is not defined"
    );

    let spec = s.pki.join("web9.toml");
    std::fs::write(&spec, "name = \"web9\"\nmemory_mib = 64\nkernel = \"/k\"\n").expect("spec");
    assert_eq!(
        s.run(&["vm", "define", spec.to_str().expect("utf8")])
            .await
            .expect("define"),
        0
    );
}

#[tokio::test]
async fn migrate_passes_options_and_reports_success() {
    let s = setup().await;
    let code = s
        .run(&[
            "migrate",
            "web1",
            "--to",
            "127.0.0.1:7702",
            "--compress",
            "zstd:3",
            "--streams",
            "2",
            "--no-verify",
        ])
        .await
        .expect("migrate");
    assert_eq!(code, 0);
    let req = s
        .last_start
        .lock()
        .expect("lock")
        .clone()
        .expect("StartMigration called");
    assert_eq!(req.vm, "web1");
    assert_eq!(req.target, "127.0.0.1:7702");
    assert_eq!(req.compress, "zstd:3");
    assert_eq!(
        (req.page_streams, req.downtime_ms, req.max_rounds),
        (2, 0, 0)
    );
    assert!(req.skip_verify);

    assert_eq!(
        s.run(&["migrate", "web1", "--to", "b:1", "--detach"])
            .await
            .expect("detach"),
        0
    );
    assert_eq!(
        s.last_start
            .lock()
            .expect("lock")
            .clone()
            .expect("called")
            .compress,
        ""
    );
    assert_eq!(
        s.run(&["--json", "migrations", "watch", "m-web1"])
            .await
            .expect("json watch"),
        0
    );
}

#[tokio::test]
async fn failed_migrations_exit_non_zero() {
    let s = setup().await;
    assert_eq!(
        s.run(&["migrate", "fail", "--to", "b:1"])
            .await
            .expect("ran"),
        1
    );
    assert_eq!(
        s.run(&["migrations", "watch", "m-cancel"])
            .await
            .expect("ran"),
        3
    );
    assert_eq!(
        s.run(&["migrations", "watch", "m-doubt"])
            .await
            .expect("ran"),
        4
    );
    let e = s
        .run(&["migrations", "watch", "m-vanish"])
        .await
        .expect_err("stream ended early");
    let e = e.to_string();
    assert!(
        e.contains("closed the watch stream before migration m-vanish finished (now PRECOPY)"),
        "{e}"
    );
    assert!(e.contains("ferryctl migrations watch m-vanish"), "{e}");
    assert_eq!(s.run(&["migrations", "list"]).await.expect("list"), 0);
    assert_eq!(
        s.run(&["migrations", "show", "m-fail"])
            .await
            .expect("show"),
        0
    );
    assert_eq!(
        s.run(&["migrations", "cancel", "m-web1"])
            .await
            .expect("cancel"),
        0
    );
}

#[tokio::test]
async fn a_client_from_another_mesh_is_refused() {
    let s = setup().await;
    let other = s.pki.parent().expect("parent").join("other-pki");
    ferry_transport::pki::write_dev_pki(&other, &[("ops".into(), vec![])]).expect("other pki");
    let cli = Cli::try_parse_from([
        "ferryctl",
        "--agent",
        &s.addr,
        "--pki-dir",
        other.to_str().expect("utf8"),
        "--identity",
        "ops",
        "vm",
        "list",
    ])
    .expect("parse");
    let e = ferryctl::app::run(cli).await.expect_err("refused");
    assert!(
        e.to_string().contains("cannot connect to agent at"),
        "{e:#}"
    );
}
