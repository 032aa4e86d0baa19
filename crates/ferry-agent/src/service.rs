//! gRPC services: `FerryControl` for clients, `FerryPeer` for other agents.

use crate::access::{caller, require_operator};
use crate::convert::spec_from_pb;
use crate::migration::auto_codec::Compression;
use crate::migration::source::{self, MigrationParams, VerifyMode};
use crate::migration::{is_terminal, now_ms};
use crate::AgentCtx;
use ferry_api::v1 as pb;
use ferry_api::v1::ferry_control_server::FerryControl;
use ferry_api::v1::ferry_peer_server::FerryPeer;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The client-facing API.
pub struct ControlService {
    pub ctx: Arc<AgentCtx>,
}

/// The agent-to-agent API.
pub struct PeerService {
    pub ctx: Arc<AgentCtx>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::MigrationStatus, Status>> + Send>>;

#[tonic::async_trait]
impl FerryControl for ControlService {
    async fn define_vm(
        &self,
        req: Request<pb::DefineVmRequest>,
    ) -> Result<Response<pb::VmInfo>, Status> {
        require_operator(&req, "DefineVm")?;
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is missing"))?;
        let spec = spec_from_pb(&spec)?;
        Ok(Response::new(self.ctx.vms.define(spec).await?))
    }

    async fn undefine_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::VmInfo>, Status> {
        require_operator(&req, "UndefineVm")?;
        Ok(Response::new(
            self.ctx.vms.undefine(&req.into_inner().name).await?,
        ))
    }

    async fn start_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::VmInfo>, Status> {
        require_operator(&req, "StartVm")?;
        Ok(Response::new(
            self.ctx.vms.start(&req.into_inner().name).await?,
        ))
    }

    async fn stop_vm(
        &self,
        req: Request<pb::StopVmRequest>,
    ) -> Result<Response<pb::VmInfo>, Status> {
        require_operator(&req, "StopVm")?;
        let r = req.into_inner();
        Ok(Response::new(self.ctx.vms.stop(&r.name, r.force).await?))
    }

    async fn suspend_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::VmInfo>, Status> {
        require_operator(&req, "SuspendVm")?;
        Ok(Response::new(
            self.ctx.vms.suspend(&req.into_inner().name).await?,
        ))
    }

    async fn resume_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::VmInfo>, Status> {
        require_operator(&req, "ResumeVm")?;
        Ok(Response::new(
            self.ctx.vms.resume(&req.into_inner().name).await?,
        ))
    }

    async fn clear_fence(&self, req: Request<pb::VmRef>) -> Result<Response<pb::VmInfo>, Status> {
        require_operator(&req, "ClearFence")?;
        Ok(Response::new(
            self.ctx.vms.clear_fence(&req.into_inner().name).await?,
        ))
    }

    async fn get_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::VmInfo>, Status> {
        Ok(Response::new(
            self.ctx.vms.get(&req.into_inner().name).await?,
        ))
    }

    async fn list_vms(
        &self,
        _req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        Ok(Response::new(pb::ListVmsResponse {
            vms: self.ctx.vms.list().await,
        }))
    }

    async fn start_migration(
        &self,
        req: Request<pb::StartMigrationRequest>,
    ) -> Result<Response<pb::MigrationStatus>, Status> {
        require_operator(&req, "StartMigration")?;
        let r = req.into_inner();
        let compression: Compression = r
            .compress
            .parse()
            .map_err(|e| Status::invalid_argument(format!("compress: {e}")))?;
        let codec = compression.for_disks();
        if r.target.is_empty() {
            return Err(Status::invalid_argument(
                "target: the target agent's address (host:port) is required",
            ));
        }
        if r.target == self.ctx.cfg.grpc_listen.to_string() {
            return Err(Status::invalid_argument(format!(
                "target {} is this host ({})",
                r.target, self.ctx.cfg.host_name
            )));
        }
        if r.offline {
            // Cold migration: a stopped VM's images and definition (migration/cold.rs).
            return Ok(Response::new(
                crate::migration::cold::start(self.ctx.clone(), r, codec).await?,
            ));
        }
        let d = &self.ctx.cfg.migration;
        let page_streams = if r.page_streams == 0 {
            d.page_streams()
        } else {
            r.page_streams
        };
        if !(1..=16).contains(&page_streams) {
            return Err(Status::invalid_argument("page_streams must be 1..=16"));
        }
        let params = MigrationParams {
            job: crate::migration::job::JobParams {
                id: uuid::Uuid::new_v4().to_string(),
                vm: r.vm.clone(),
                target: r.target.clone(),
                compression,
                codec,
                bandwidth: r.bandwidth_bytes_per_sec,
            },
            downtime_ms: if r.downtime_ms == 0 {
                d.downtime_ms
            } else {
                r.downtime_ms
            },
            max_rounds: if r.max_rounds == 0 {
                d.max_rounds
            } else {
                r.max_rounds
            },
            page_streams,
            verify: if r.skip_verify {
                VerifyMode::None
            } else {
                r.verify.parse().map_err(Status::invalid_argument)?
            },
            force: r.force,
            timeout: (r.timeout_s > 0)
                .then(|| std::time::Duration::from_secs(u64::from(r.timeout_s))),
            on_stall: r.on_stall.parse().map_err(Status::invalid_argument)?,
            leave_paused: r.leave_paused,
            storage: r.storage.parse().map_err(Status::invalid_argument)?,
        };
        let limit = self.ctx.cfg.migration.max_outgoing;
        let Some(slot) = self.ctx.outgoing.slots.try_take(limit) else {
            return Err(Status::resource_exhausted(format!(
                "host {} already runs {limit} outgoing migration(s) (migration.max_outgoing = {limit}): wait for one to end, or raise the limit",
                self.ctx.cfg.host_name
            )));
        };
        // Marks the VM as migrating, or says why it cannot (unknown, stopped, busy).
        let (spec, proc, was_running) = self.ctx.vms.begin_outgoing(&r.vm, &params.job.id).await?;
        let status = pb::MigrationStatus {
            id: params.job.id.clone(),
            vm: r.vm,
            source: self.ctx.cfg.host_name.clone(),
            target: r.target,
            phase: pb::MigrationPhase::Preparing as i32,
            stats: Some(pb::MigrationStats {
                codec: compression.to_string(),
                guest_ram_bytes: spec.memory_mib << 20,
                ..Default::default()
            }),
            started_unix_ms: now_ms(),
            message: "starting".into(),
            ..Default::default()
        };
        let meta = crate::migration::SourceMeta {
            mark: ferry_handoff::SourceMark::BeforeCommit,
            was_running,
            capture: None,
            token: None,
            cold_undefine: None,
            taken_back: false,
        };
        let handle = self.ctx.outgoing.register(status.clone(), meta);
        tokio::spawn(source::run_guarded(
            slot,
            self.ctx.clone(),
            params,
            handle,
            spec,
            proc,
        ));
        Ok(Response::new(status))
    }

    type WatchMigrationStream = WatchStream;

    async fn watch_migration(
        &self,
        req: Request<pb::MigrationRef>,
    ) -> Result<Response<WatchStream>, Status> {
        let id = req.into_inner().id;
        let Some(h) = self.ctx.outgoing.get(&id) else {
            // A finished migration from the journal: one message.
            let s = self
                .ctx
                .outgoing
                .status(&id)
                .ok_or_else(|| unknown_migration(&self.ctx, &id))?;
            return Ok(Response::new(Box::pin(tokio_stream::iter([Ok(s)]))));
        };
        let mut rx = h.status.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let s = rx.borrow_and_update().clone();
                let done = is_terminal(s.phase);
                if tx.send(Ok(s)).await.is_err() || done {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn cancel_migration(
        &self,
        req: Request<pb::MigrationRef>,
    ) -> Result<Response<pb::MigrationStatus>, Status> {
        require_operator(&req, "CancelMigration")?;
        let id = req.into_inner().id;
        let h = self
            .ctx
            .outgoing
            .get(&id)
            .ok_or_else(|| unknown_migration(&self.ctx, &id))?;
        let s = h.snapshot();
        if is_terminal(s.phase) {
            return Err(Status::failed_precondition(format!(
                "migration {id} already ended"
            )));
        }
        // By value, not order: COPYING_DISKS (11) was added after COMMITTING (6).
        if s.phase == pb::MigrationPhase::Committing as i32 {
            return Err(Status::failed_precondition(format!(
                "migration {id} is committing and can no longer be cancelled"
            )));
        }
        if s.phase == pb::MigrationPhase::InDoubt as i32 {
            return Err(Status::failed_precondition(format!(
                "migration {id} is in doubt (whether the target took the VM is not known yet) and cannot be cancelled: it settles when the target answers"
            )));
        }
        h.cancel.cancel();
        Ok(Response::new(h.snapshot()))
    }

    async fn resolve_migration(
        &self,
        req: Request<pb::ResolveMigrationRequest>,
    ) -> Result<Response<pb::MigrationStatus>, Status> {
        let who = require_operator(&req, "ResolveMigration")?;
        let r = req.into_inner();
        let Some(h) = self.ctx.outgoing.get(&r.id) else {
            return Err(match self.ctx.outgoing.status(&r.id) {
                Some(s) if is_terminal(s.phase) => Status::failed_precondition(format!(
                    "migration {} already ended: nothing to resolve",
                    r.id
                )),
                _ => unknown_migration(&self.ctx, &r.id),
            });
        };
        let s = h.snapshot();
        if s.phase != pb::MigrationPhase::InDoubt as i32 {
            let phase = pb::MigrationPhase::try_from(s.phase)
                .map(|p| p.as_str_name())
                .unwrap_or("unknown");
            return Err(Status::failed_precondition(format!(
                "migration {} is {phase}, not in doubt: only a migration whose target cannot say whether it took the VM needs the operator's verdict",
                r.id
            )));
        }
        if !r.target_gone {
            return Err(Status::invalid_argument(
                "say what you know: target_gone (ferryctl migrations resolve --target-gone) declares the target host gone for good, so that the VM comes back here",
            ));
        }
        // A target that answers at all is not gone: its word settles the migration (a
        // target whose journal cannot be read answers IncomingStatus with an error, and
        // HostFacts all the same).
        let target = crate::migration::target_address(&s.target).to_string();
        let alive = source::peer_call_within(
            &self.ctx,
            &target,
            Duration::from_secs(5),
            |mut peer| async move { peer.host_facts(pb::HostFactsRequest {}).await },
        )
        .await;
        match alive {
            Some(Ok(facts)) => {
                return Err(Status::failed_precondition(format!(
                    "the target {} ({target}) answers: it is not gone, and the migration settles by its word (asked again every few seconds); see its log if it keeps failing to say",
                    facts.host_name
                )))
            }
            // Refused by the target itself (not by a lost connection): it is there.
            Some(Err(e)) if !crate::tls::unreached(e.code()) => {
                return Err(Status::failed_precondition(format!(
                    "the target {target} answers (it refused HostFacts: {}): it is not gone",
                    e.message()
                )))
            }
            _ => {}
        }
        tracing::warn!(migration = %r.id, vm = %s.vm, %target, operator = %who.name, "the operator declares the target gone for good");
        h.verdict.declare(&who.name);
        // Not ended within the wait (the last question still out): the status says where
        // it stands; the verdict stays and is acted on.
        let mut rx = h.status.subscribe();
        let _ = tokio::time::timeout(RESOLVE_WAIT, rx.wait_for(|s| is_terminal(s.phase))).await;
        Ok(Response::new(h.snapshot()))
    }

    async fn get_migration(
        &self,
        req: Request<pb::MigrationRef>,
    ) -> Result<Response<pb::MigrationStatus>, Status> {
        let id = req.into_inner().id;
        self.ctx
            .outgoing
            .status(&id)
            .map(Response::new)
            .ok_or_else(|| unknown_migration(&self.ctx, &id))
    }

    async fn list_migrations(
        &self,
        _req: Request<pb::ListMigrationsRequest>,
    ) -> Result<Response<pb::ListMigrationsResponse>, Status> {
        Ok(Response::new(pb::ListMigrationsResponse {
            migrations: self.ctx.outgoing.list(),
        }))
    }

    async fn get_host_facts(
        &self,
        _req: Request<pb::HostFactsRequest>,
    ) -> Result<Response<pb::HostFacts>, Status> {
        Ok(Response::new(crate::preflight::host_facts(&self.ctx).await))
    }

    async fn preflight(
        &self,
        req: Request<pb::PreflightRequest>,
    ) -> Result<Response<pb::PreflightReport>, Status> {
        require_operator(&req, "Preflight")?;
        let r = req.into_inner();
        // `auto` is sampled as zstd-1, the codec it picks on a link-bound path.
        let codec = r
            .compress
            .parse::<Compression>()
            .map_err(|e| Status::invalid_argument(format!("compress: {e}")))?
            .for_disks();
        let (spec, proc) = self.ctx.vms.spec_and_process(&r.vm).await?;
        // Its probes would re-arm and then release the userfaultfd the migration uses.
        if let Some(m) = self.ctx.vms.migration_of(&r.vm).await {
            return Err(Status::failed_precondition(format!(
                "VM '{}' is migrating ({m}): preflight it once the migration has ended",
                r.vm
            )));
        }
        let downtime = if r.downtime_ms == 0 {
            self.ctx.cfg.migration.downtime_ms
        } else {
            r.downtime_ms
        };
        let report = crate::preflight::run(
            &self.ctx,
            &spec,
            proc.as_deref(),
            &r.target,
            codec,
            downtime,
            r.bandwidth_bytes_per_sec,
            crate::preflight::Depth::Measure,
        )
        .await?;
        Ok(Response::new(report))
    }
}

/// How long ResolveMigration waits for the migration to end: the last question to the
/// target (30 s at most) and taking the VM back.
const RESOLVE_WAIT: Duration = Duration::from_secs(60);

fn unknown_migration(ctx: &AgentCtx, id: &str) -> Status {
    Status::not_found(format!("no migration {id} on host {}", ctx.cfg.host_name))
}

#[tonic::async_trait]
impl FerryPeer for PeerService {
    async fn check_storage(
        &self,
        req: Request<pb::CheckStorageRequest>,
    ) -> Result<Response<pb::CheckStorageResponse>, Status> {
        Ok(Response::new(
            self.ctx.incoming.check_storage(&req.into_inner()),
        ))
    }

    async fn prepare(
        &self,
        req: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            self.ctx.incoming.prepare(req.into_inner(), &who).await?,
        ))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let (resume_unix_us, ready_unix_us) = self
            .ctx
            .incoming
            .commit(&r.migration_id, &r.token, r.leave_paused, &who)
            .await?;
        Ok(Response::new(pb::CommitResponse {
            resume_unix_us,
            ready_unix_us,
        }))
    }

    async fn abort(
        &self,
        req: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        Ok(Response::new(
            self.ctx
                .incoming
                .abort(&r.migration_id, &r.token, &r.reason, r.taken_back, &who)
                .await?,
        ))
    }

    async fn host_facts(
        &self,
        _req: Request<pb::HostFactsRequest>,
    ) -> Result<Response<pb::HostFacts>, Status> {
        Ok(Response::new(crate::preflight::host_facts(&self.ctx).await))
    }

    async fn prepare_cold_migration(
        &self,
        req: Request<pb::PrepareColdMigrationRequest>,
    ) -> Result<Response<pb::PrepareColdMigrationResponse>, Status> {
        let who = caller(&req)?;
        // Its own task: a source whose connection drops mid-call must not leave the VM's
        // name reserved here with nothing registered to release it.
        let ctx = self.ctx.clone();
        let req = req.into_inner();
        let r = crate::to_completion("prepare", async move {
            crate::migration::cold::prepare(&ctx, req, &who).await
        })
        .await?;
        Ok(Response::new(r))
    }

    async fn finish_cold_migration(
        &self,
        req: Request<pb::FinishColdMigrationRequest>,
    ) -> Result<Response<pb::FinishColdMigrationResponse>, Status> {
        let who = caller(&req)?;
        // Its own task: a caller that gives up mid-call (a deadline, a dropped connection)
        // must not cut it off between defining the VM here and recording the answer.
        let ctx = self.ctx.clone();
        let req = req.into_inner();
        let r = crate::to_completion("finish", async move {
            crate::migration::cold::finish(&ctx, req, &who).await
        })
        .await?;
        Ok(Response::new(r))
    }

    async fn abort_cold_migration(
        &self,
        req: Request<pb::AbortColdMigrationRequest>,
    ) -> Result<Response<pb::AbortColdMigrationResponse>, Status> {
        let who = caller(&req)?;
        // Its own task, for the same reason as Prepare's: an abort is never half done.
        let ctx = self.ctx.clone();
        let req = req.into_inner();
        let r = crate::to_completion("abort", async move {
            crate::migration::cold::abort(&ctx, req, &who).await
        })
        .await?;
        Ok(Response::new(r))
    }

    async fn incoming_status(
        &self,
        req: Request<pb::IncomingStatusRequest>,
    ) -> Result<Response<pb::IncomingStatusResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let state = self.ctx.incoming.status(&r.id, &r.token, &who).await?;
        Ok(Response::new(pb::IncomingStatusResponse {
            state: state as i32,
        }))
    }
}
