//! Start-up: directories, journal, tracker self-test, recovery, QUIC and gRPC servers.

use crate::access::Need;
use crate::config::AgentConfig;
use crate::journal::Journal;
use crate::migration::target::IncomingRegistry;
use crate::migration::Outgoing;
use crate::service::{ControlService, PeerService};
use crate::vms::VmManager;
use crate::AgentCtx;
use anyhow::Context;
use ferry_api::v1::ferry_control_server::FerryControlServer;
use ferry_api::v1::ferry_peer_server::FerryPeerServer;
use ferry_transport::{QuicEndpoint, TransportTuning};
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// Builds the agent's context: everything but the servers.
pub async fn build(cfg: AgentConfig) -> anyhow::Result<Arc<AgentCtx>> {
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating state dir {}", cfg.state_dir.display()))?;
    std::fs::create_dir_all(&cfg.ram_dir)
        .with_context(|| format!("creating RAM dir {}", cfg.ram_dir.display()))?;
    let identity = crate::tls::load_identity(&cfg.tls)?;
    let journal = Arc::new(Journal::open(&cfg.journal_path()).context("opening journal")?);

    // Never trust silence: a tracker is used only if it reports pages we wrote.
    let tracker = match tokio::task::spawn_blocking(ferry_memory::choose_tracker).await? {
        Ok(k) => {
            info!(
                tracker = k.name(),
                "dirty-page tracker passed its self-test"
            );
            Ok(k)
        }
        Err(e) => {
            warn!("no dirty-page tracker passed its self-test: {e}; live migration is unavailable on this host");
            Err(e.to_string())
        }
    };
    let shim = ferry_memory::install_shim(&cfg.state_dir).context("installing the uffd shim")?;
    let qemu_version = ferry_qemu::qemu_version(&cfg.qemu_binary)
        .await
        .with_context(|| format!("probing QEMU at {}", cfg.qemu_binary.display()))?
        .to_string();
    info!(qemu = %qemu_version, accel = %cfg.accel, "QEMU found");
    let machine_types = ferry_qemu::machine_types(&cfg.qemu_binary)
        .await
        .context("listing QEMU machine types")?;

    for root in &cfg.storage_roots {
        std::fs::create_dir_all(root)
            .with_context(|| format!("creating storage root {}", root.display()))?;
    }
    let storage =
        Arc::new(ferry_disk::StorageRoots::new(&cfg.storage_roots).context("storage_roots")?);
    let vms = VmManager::new(cfg.clone(), journal.clone(), Some(shim), storage.clone());
    vms.recover()
        .await
        .context("recovering VMs from the journal")?;
    let metrics = crate::metrics::Metrics::new().context("metrics registry")?;
    let incoming = IncomingRegistry::new(
        cfg.clone(),
        vms.clone(),
        journal.clone(),
        qemu_version.clone(),
        metrics.clone(),
        storage.clone(),
    );
    incoming
        .recover()
        .await
        .context("settling incoming migrations from the journal")?;
    if cfg.migration.left_behind_retry_s > 0 {
        let (incoming, every) = (
            incoming.clone(),
            Duration::from_secs(cfg.migration.left_behind_retry_s),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                incoming.remove_left_behind().await;
            }
        });
    }
    if cfg.migration.partial_keep_s > 0 {
        crate::migration::cold::kept::spawn_expiry(
            storage.clone(),
            incoming.cold(),
            journal.clone(),
            vms.clone(),
            metrics.clone(),
            Duration::from_secs(cfg.migration.partial_keep_s),
        );
    }
    let congestion: ferry_transport::Congestion = cfg
        .migration
        .congestion
        .parse()
        .map_err(|e: String| anyhow::anyhow!("migration.congestion: {e}"))?;
    let tuning = TransportTuning {
        idle_timeout: Duration::from_secs(cfg.migration.idle_timeout_s.max(1)),
        congestion,
        ack_every: cfg.migration.ack_every,
        ..Default::default()
    };
    let quic =
        QuicEndpoint::bind(cfg.quic_listen, &identity, &tuning).context("binding QUIC endpoint")?;
    let outgoing = Outgoing::new(journal.clone());
    let access = crate::access::Access::new(&cfg.host_name, &cfg.tls.deny_serials);
    if let Err(e) = identity.peer_identity() {
        warn!("this agent's own certificate: {e}; peers will refuse it");
    }
    let ctx = Arc::new(AgentCtx {
        access,
        cfg,
        identity,
        journal,
        vms,
        outgoing,
        incoming,
        quic,
        tracker,
        qemu_version,
        machine_types,
        metrics,
        storage,
        device_save: Default::default(),
        commit_tail: Default::default(),
        paths: Default::default(),
        codecs: Default::default(),
        trackers: Default::default(),
        peers: Default::default(),
    });
    recover_outgoing(&ctx).await;
    Ok(ctx)
}

/// Source-side migrations not settled when the agent stopped (in flight, or IN_DOUBT):
/// the VM stays held (no resume, start or migrate) while each is settled with its target
/// per `ferry_handoff::source_recovery`, in the background.
async fn recover_outgoing(ctx: &Arc<AgentCtx>) {
    let held: std::collections::HashMap<String, String> = ctx
        .journal
        .vms()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| v.held_by.map(|m| (m, v.spec.name)))
        .collect();
    // Taken back on an operator's verdict, the target not told yet: tell it.
    let records = ctx.journal.migrations().unwrap_or_else(|e| {
        error!("journal: {e}: migrations not read at start-up");
        Vec::new()
    });
    for rec in records {
        if rec.role == crate::journal::Role::Source && rec.settled() && rec.taken_back {
            if let Some(status) = ctx.outgoing.status(&rec.id) {
                let target = crate::migration::target_address(&status.target).to_string();
                let token = rec.token.clone().unwrap_or_default();
                let cold = rec.cold_undefine.is_some();
                crate::migration::source::tell_target_taken_back(
                    ctx.clone(),
                    rec.id,
                    target,
                    token,
                    cold,
                );
            }
        }
    }
    for (rec, status) in ctx.outgoing.unsettled() {
        let mark = rec.mark.unwrap_or(
            if status.phase >= ferry_api::v1::MigrationPhase::Committing as i32 {
                ferry_handoff::SourceMark::CommitSent
            } else {
                ferry_handoff::SourceMark::BeforeCommit
            },
        );
        let meta = crate::migration::SourceMeta {
            mark,
            was_running: rec.was_running,
            capture: rec.capture.clone(),
            token: rec.token.clone(),
            cold_undefine: rec.cold_undefine,
            taken_back: rec.taken_back,
        };
        let why = format!(
            "agent on {} restarted during the migration",
            ctx.cfg.host_name
        );
        let h = ctx.outgoing.register(status.clone(), meta);
        let target = crate::migration::target_address(&status.target).to_string();
        if rec.cold_undefine.is_some() && held.get(&rec.id) == Some(&rec.vm) {
            // A cold migration whose Finish may have reached the target (its VM journaled
            // as held): the target's answer says where the VM is.
            warn!(migration = %rec.id, vm = %rec.vm, "settling a cold migration left unsettled by a restart");
            ctx.vms.hold(&rec.vm, &rec.id).await;
            crate::migration::cold::settle_after_restart(
                ctx.clone(),
                h,
                rec.vm.clone(),
                target,
                why,
            );
            continue;
        }
        if held.get(&rec.id) != Some(&rec.vm) {
            // Not a live handoff holding its VM (a cold copy, or a record from before):
            // nothing to settle with a target.
            warn!(migration = %rec.id, vm = %rec.vm, "migration was in progress when the agent stopped; marking it failed");
            h.set_meta(|m| m.mark = ferry_handoff::SourceMark::Settled);
            h.update(|s| {
                s.phase = ferry_api::v1::MigrationPhase::Failed as i32;
                s.error = why.clone();
            });
            ctx.outgoing.persist(&h);
            ctx.outgoing.release(&rec.id);
            continue;
        }
        warn!(migration = %rec.id, vm = %rec.vm, ?mark, "settling an outgoing migration left unsettled by a restart");
        ctx.vms.hold(&rec.vm, &rec.id).await;
        ctx.metrics.active.inc();
        let proc = ctx
            .vms
            .spec_and_process(&rec.vm)
            .await
            .ok()
            .and_then(|(_, p)| p);
        // It holds one of the host's outgoing slots until settled, whatever the limit.
        let slot = ctx.outgoing.slots.take();
        let (ctx2, vm) = (ctx.clone(), rec.vm.clone());
        tokio::spawn(async move {
            crate::migration::source::settle_and_end(ctx2, h, vm, target, proc, why).await;
            drop(slot);
        });
    }
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let ctx = build(cfg).await?;
    serve(ctx, shutdown_signal()).await
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Serves gRPC and QUIC until `shutdown` completes.
pub async fn serve(
    ctx: Arc<AgentCtx>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Data plane: each connection is one incoming migration (or a probe). Handshakes run
    // concurrently, each with a deadline and within per-address limits, so half-open
    // connections from anyone on the network cannot stall the others.
    let quic = ctx.quic.clone();
    let (incoming, access) = (ctx.incoming.clone(), ctx.access.clone());
    let handshake_deadline = Duration::from_secs(ctx.cfg.migration.idle_timeout_s.clamp(1, 10));
    let limits = Arc::new(crate::admission::ConnectionLimits::default());
    tokio::spawn(async move {
        while let Some(attempt) = quic.accept_incoming().await {
            let remote = attempt.remote_address();
            let Some(slot) = limits.handshake(remote.ip()) else {
                warn!(%remote, "data-plane handshake refused: too many in flight from this address");
                attempt.refuse();
                continue;
            };
            let (incoming, access, limits) = (incoming.clone(), access.clone(), limits.clone());
            tokio::spawn(async move {
                let conn = match tokio::time::timeout(handshake_deadline, attempt).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => return warn!(%remote, "data-plane handshake failed: {e}"),
                    Err(_) => {
                        return warn!(%remote, "data-plane handshake not done within {handshake_deadline:?}: dropped")
                    }
                };
                drop(slot);
                let peer = match access.check_connection(&conn) {
                    Ok(p) => p,
                    Err(s) => {
                        warn!(%remote, "data-plane connection refused: {}", s.message());
                        conn.close(4u32.into(), s.message().as_bytes());
                        return;
                    }
                };
                let Some(_open) = limits.connection(&peer.name) else {
                    warn!(%remote, peer = %peer.name, "data-plane connection refused: too many open from this agent");
                    conn.close(5u32.into(), b"too many connections from this agent");
                    return;
                };
                incoming.handle_connection(conn, peer).await;
            });
        }
    });

    // Configuration reload: the deny list takes effect on SIGHUP.
    if let Some(path) = ctx.cfg.source.clone() {
        let access = ctx.access.clone();
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        match AgentConfig::load(&path) {
                            Ok(cfg) => {
                                let n = access.set_denied(&cfg.tls.deny_serials);
                                info!(config = %path.display(), denied = n, "configuration reloaded (SIGHUP): deny list in force");
                            }
                            Err(e) => error!("SIGHUP: keeping the current deny list: {e:#}"),
                        }
                    }
                });
            }
            Err(e) => warn!("no SIGHUP handler (deny list reload): {e}"),
        }
    }

    if let Some(addr) = ctx.cfg.metrics_listen {
        let m = ctx.metrics.clone();
        let listener_check = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics endpoint {addr}"))?;
        drop(listener_check);
        tokio::spawn(async move {
            if let Err(e) = m.serve(addr).await {
                error!("metrics endpoint {addr}: {e}");
            }
        });
        info!(%addr, "metrics at http://{addr}/metrics");
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<FerryControlServer<ControlService>>()
        .await;
    health_reporter
        .set_serving::<FerryPeerServer<PeerService>>()
        .await;
    // Both reflection versions: grpcurl speaks v1, many client libraries still v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ferry_api::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .context("building reflection service")?;
    let reflection_alpha = reflection_builder()
        .build_v1alpha()
        .context("building reflection service (v1alpha)")?;

    let addr = ctx.cfg.grpc_listen;
    info!(host = %ctx.cfg.host_name, grpc = %addr, quic = %ctx.cfg.quic_listen, "ferryd serving");
    let result = tonic::transport::Server::builder()
        .tls_config(crate::tls::server_tls(&ctx.identity))
        .context("gRPC TLS")?
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(FerryControlServer::with_interceptor(
            ControlService { ctx: ctx.clone() },
            crate::access::interceptor(ctx.access.clone(), Need::Read, "the control API"),
        ))
        .add_service(FerryPeerServer::with_interceptor(
            PeerService { ctx: ctx.clone() },
            crate::access::interceptor(ctx.access.clone(), Need::Agent, "the peer API"),
        ))
        .serve_with_shutdown(addr, shutdown)
        .await;
    ctx.quic.close();
    if let Err(e) = &result {
        error!("gRPC server: {e}");
    }
    result.with_context(|| format!("serving gRPC on {addr}"))
}
