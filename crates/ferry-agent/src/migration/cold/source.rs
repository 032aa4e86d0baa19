//! The source side of a cold migration: one function per [`ColdPhase`].

use super::*;
use crate::convert::spec_to_pb;
use crate::migration::job::{fail, status_msg, ColdPhase, JobError, JobParams};
use crate::migration::pages::RateLimiter;
use crate::migration::{now_ms, OutgoingHandle};
use crate::vms::state_name;
use crate::AgentCtx;
use ferry_api::v1 as pb;
use ferry_api::v1::ferry_peer_client::FerryPeerClient;
use ferry_disk::{Blake3Digest, ChunkReader, ImageFormat, StorageRoots};
use ferry_qemu::VmSpec;
use ferry_transport::write_stream_header;
use ferry_wire::{
    Codec, ControlMessage, DataChunk, Frame, StreamHeader, StreamKind, PROTOCOL_VERSION,
};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::Channel;
use tonic::Status;
use tracing::{error, warn};

/// What the operator asked for.
#[derive(Debug, Clone)]
struct ColdParams {
    /// What live and cold migrations share: id, VM, target, codec, bandwidth cap.
    job: JobParams,
    start_on_target: bool,
    undefine_source: bool,
    stop_source: bool,
}

/// A failed cold migration: the [`ColdPhase`] it failed in and why.
type ColdError = JobError<ColdPhase>;

type Res<T> = Result<T, ColdError>;

/// One image file the source sends.
#[derive(Debug, Clone)]
struct SourceImage {
    /// Its name across hosts: the path relative to the storage root that holds it (hosts
    /// may mount their storage at different paths; live migration names disks the same way).
    name: PathBuf,
    /// Where this host reads it (after storage-root confinement).
    local: PathBuf,
    format: ImageFormat,
    length: u64,
    allocated: u64,
    digest: Blake3Digest,
    transfer_id: String,
    /// The disk whose top layer this is (`None` for a backing layer).
    disk_id: Option<String>,
    /// The name of the layer below, if any.
    backing: Option<PathBuf>,
}

/// Starts a cold migration of `r.vm` to `r.target` (the caller checked the target
/// address). Refuses at once a VM that is unknown, busy, or running without
/// `stop_source`; everything else is reported through the migration's status.
pub async fn start(
    ctx: Arc<AgentCtx>,
    r: pb::StartMigrationRequest,
    codec: Codec,
) -> Result<pb::MigrationStatus, Status> {
    let p = ColdParams {
        job: JobParams {
            id: uuid::Uuid::new_v4().to_string(),
            vm: r.vm.clone(),
            target: r.target.clone(),
            compression: super::super::auto_codec::Compression::Fixed(codec),
            codec,
            bandwidth: r.bandwidth_bytes_per_sec,
        },
        start_on_target: r.start_on_target,
        undefine_source: r.undefine_source,
        stop_source: r.stop_source,
    };
    let info = ctx.vms.get(&p.job.vm).await?;
    let running = info.pid != 0;
    if running && !p.stop_source {
        return Err(Status::failed_precondition(format!(
            "VM '{}' is {} on host {}: stop it or pass --stop-source",
            p.job.vm,
            state_name(info.state()),
            ctx.cfg.host_name
        )));
    }
    // A stopped VM is marked busy now, so the answer already says if it cannot be.
    let spec = if running {
        None
    } else {
        Some(ctx.vms.begin_offline(&p.job.vm, &p.job.id).await?)
    };
    let disks = info.spec.as_ref().map(|s| s.disks.len()).unwrap_or(0);
    let status = pb::MigrationStatus {
        id: p.job.id.clone(),
        vm: p.job.vm.clone(),
        source: ctx.cfg.host_name.clone(),
        target: p.job.target.clone(),
        phase: pb::MigrationPhase::Preparing as i32,
        stats: Some(pb::MigrationStats {
            codec: codec.to_string(),
            storage: if disks == 0 {
                "none".into()
            } else {
                "copied".into()
            },
            ..Default::default()
        }),
        started_unix_ms: now_ms(),
        message: "starting cold migration".into(),
        ..Default::default()
    };
    // Until Finish may be sent a restart marks it failed (the VM free here, the target
    // never defines it); from then on (mark CommitSent, VM held) it settles with the target.
    let meta = crate::migration::SourceMeta {
        mark: ferry_handoff::SourceMark::BeforeCommit,
        was_running: false,
        capture: None,
        token: None,
        cold_undefine: Some(p.undefine_source),
        taken_back: false,
    };
    let h = ctx.outgoing.register(status.clone(), meta);
    let job = p.job.clone();
    let (ctx2, h2) = (ctx.clone(), h.clone());
    let task = run(ctx, p, h, spec);
    // Should the task panic (a bug), the VM is still freed and the status ended.
    tokio::spawn(async move {
        crate::migration::job::run_guarded(&job.id.clone(), task, |panic| async move {
            if h2.meta().mark == ferry_handoff::SourceMark::CommitSent {
                // Finish may have reached the target: only its answer says where the VM is.
                let why = format!("internal error (a bug: {panic})");
                return settle_and_end(ctx2, h2, job.vm, job.target, why).await;
            }
            let op = ctx2.vms.end_offline(&job.vm, &job.id, false).await;
            let reason = format!(
                "internal error in the cold migration of VM '{}' from {} (a bug: {panic})",
                job.vm, ctx2.cfg.host_name
            );
            let message = format!("VM '{}' stays defined on {}", job.vm, ctx2.cfg.host_name);
            ctx2.outgoing.end_unsuccessful(
                &h2,
                &ctx2.metrics,
                &reason,
                false,
                0,
                message,
                op.into_iter().collect(),
            );
        })
        .await
    });
    Ok(status)
}

async fn run(ctx: Arc<AgentCtx>, p: ColdParams, h: Arc<OutgoingHandle>, spec: Option<VmSpec>) {
    ctx.metrics.active.inc();
    let mut job = Job {
        ctx: ctx.clone(),
        h: h.clone(),
        at: ColdPhase::Inspect,
        started: Instant::now(),
        peer: None,
        token: String::new(),
        conn: None,
        progress: Arc::new(Progress::default()),
        copy_started: None,
        images: Vec::new(),
        target_label: p.job.target.clone(),
        p,
    };
    let copied = tokio::select! {
        r = job.drive(spec) => r,
        _ = h.cancel.cancelled() => Err(JobError::cancelled(ColdPhase::Inspect)),
    }
    // A cancel is charged to the phase that was running.
    .map_err(|e| ColdError { phase: job.at, ..e });
    // Defining the VM on the target is outside the cancel's reach: once Finish may be on
    // the wire, only the target's answer ends the migration.
    let result = match copied {
        Ok(mut peer) => job.define(&mut peer).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(resp) => job.completed(resp).await,
        Err(e) => job.failed(e).await,
    }
}

/// Counters of the copy, shared by the image streams.
#[derive(Default, Debug)]
struct Progress {
    /// Image bytes covered: resumed, already present, scanned (sent or skipped).
    done: AtomicU64,
    /// Frame bytes written to QUIC.
    wire: AtomicU64,
    /// Holes and all-zero chunks not sent.
    skipped: AtomicU64,
    /// Already on the target (interrupted attempt, or an identical file).
    resumed: AtomicU64,
    /// Raw bytes of the chunks sent.
    raw_sent: AtomicU64,
}

struct Job {
    ctx: Arc<AgentCtx>,
    p: ColdParams,
    h: Arc<OutgoingHandle>,
    /// The phase running (or last run).
    at: ColdPhase,
    started: Instant,
    peer: Option<FerryPeerClient<Channel>>,
    token: String,
    conn: Option<quinn::Connection>,
    progress: Arc<Progress>,
    copy_started: Option<Instant>,
    images: Vec<SourceImage>,
    /// "host (address)" of the target once it answered, else its address.
    target_label: String,
}

impl Job {
    fn host(&self) -> &str {
        &self.ctx.cfg.host_name
    }

    /// Copies the counters into the published status.
    fn publish(&self) {
        let pr = &self.progress;
        let wire = pr.wire.load(Ordering::Relaxed);
        let raw = pr.raw_sent.load(Ordering::Relaxed);
        let copy_secs = self
            .copy_started
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        let elapsed = self.started.elapsed().as_millis() as u64;
        self.h.update(|s| {
            let st = s.stats.get_or_insert_with(Default::default);
            st.disk_bytes_done = pr.done.load(Ordering::Relaxed);
            st.disk_wire_bytes = wire;
            st.disk_bytes_skipped = pr.skipped.load(Ordering::Relaxed);
            st.disk_bytes_resumed = pr.resumed.load(Ordering::Relaxed);
            st.wire_bytes = wire;
            st.elapsed_ms = elapsed;
            if copy_secs > 0.0 {
                st.throughput_bytes_per_sec = wire as f64 / copy_secs;
            }
            if wire > 0 && raw > 0 {
                st.compression_ratio = raw as f64 / wire as f64;
            }
        });
    }

    /// Enters `phase`: recorded (errors are charged to it) and published.
    fn enter(&mut self, phase: ColdPhase, shown: pb::MigrationPhase, message: impl Into<String>) {
        self.at = phase;
        self.show(shown, message);
    }

    /// Publishes progress within the phase.
    fn show(&self, shown: pb::MigrationPhase, message: impl Into<String>) {
        self.ctx.outgoing.set_phase(&self.h, shown, message.into());
    }

    /// The phases up to the images being on the target, in order (cancellable); returns
    /// the target's client for [`Job::define`].
    async fn drive(&mut self, spec: Option<VmSpec>) -> Res<FerryPeerClient<Channel>> {
        let spec = self.inspect(spec).await?;
        let (peer, prep, plans) = self.prepare(&spec).await?;
        let todo: Vec<usize> = (0..plans.len())
            .filter(|&i| !plans[i].already_present)
            .collect();
        if !todo.is_empty() {
            let conn = self.connect(&prep.quic_addr).await?;
            self.copy(conn, &plans, &todo).await?;
        }
        Ok(peer)
    }

    /// [`ColdPhase::Inspect`]: stops the VM if asked to, then confines, inspects and
    /// hashes every image. Nothing is sent if any is wrong.
    async fn inspect(&mut self, spec: Option<VmSpec>) -> Res<VmSpec> {
        let at = ColdPhase::Inspect;
        let spec = match spec {
            Some(s) => s,
            None => {
                self.enter(
                    at,
                    pb::MigrationPhase::Preparing,
                    format!(
                        "stopping VM '{}' (ACPI power-down, then quit)",
                        self.p.job.vm
                    ),
                );
                let stopped = self.ctx.vms.stop(&self.p.job.vm, false).await;
                // Stopped meanwhile by someone else is as good; anything else is reported.
                match self
                    .ctx
                    .vms
                    .begin_offline(&self.p.job.vm, &self.p.job.id)
                    .await
                {
                    Ok(spec) => spec,
                    Err(s) => {
                        return Err(fail(at, "stop source VM")(
                            stopped
                                .err()
                                .map(|e| e.message().to_string())
                                .unwrap_or_else(|| s.message().to_string()),
                        ))
                    }
                }
            }
        };
        self.enter(
            at,
            pb::MigrationPhase::Preparing,
            format!(
                "inspecting and hashing the images of {} disk(s)",
                spec.disks.len()
            ),
        );
        let (storage, spec2) = (self.ctx.storage.clone(), spec.clone());
        let host = self.host().to_string();
        self.images = tokio::task::spawn_blocking(move || collect_images(&storage, &host, &spec2))
            .await
            .map_err(fail(at, ""))?
            .map_err(fail(at, ""))?;
        let total: u64 = self.images.iter().map(|i| i.length).sum();
        self.h.update(|s| {
            s.stats
                .get_or_insert_with(Default::default)
                .disk_bytes_total = total
        });
        Ok(spec)
    }

    /// [`ColdPhase::Prepare`]: the target checks everything, reserves the name and says
    /// per image what it already has.
    async fn prepare(
        &mut self,
        spec: &VmSpec,
    ) -> Res<(
        FerryPeerClient<Channel>,
        pb::PrepareColdMigrationResponse,
        Vec<pb::ColdImagePlan>,
    )> {
        let at = ColdPhase::Prepare;
        self.enter(
            at,
            pb::MigrationPhase::Preparing,
            format!(
                "asking {} to prepare {} image file(s)",
                self.p.job.target,
                self.images.len()
            ),
        );
        let chan = self
            .ctx
            .peers
            .get(&self.p.job.target, &self.ctx.identity)
            .await
            .map_err(|e| {
                JobError::new(
                    at,
                    format!("cannot reach target agent {}: {e}", self.p.job.target),
                )
            })?;
        let peer = FerryPeerClient::new(chan);
        let req = pb::PrepareColdMigrationRequest {
            migration_id: self.p.job.id.clone(),
            spec: Some(spec_to_pb(spec)),
            source_host: self.host().to_string(),
            protocol_version: u32::from(PROTOCOL_VERSION),
            images: self
                .images
                .iter()
                .map(|i| pb::ColdImage {
                    path: i.name.display().to_string(),
                    length: i.length,
                    blake3: i.digest.to_hex(),
                    format: i.format.to_string(),
                    allocated_bytes: i.allocated,
                    transfer_id: i.transfer_id.clone(),
                    disk_id: i.disk_id.clone().unwrap_or_default(),
                    backing: i
                        .backing
                        .as_ref()
                        .map(|b| b.display().to_string())
                        .unwrap_or_default(),
                })
                .collect(),
        };
        // The target hashes the images it already has before it answers: a channel whose
        // deadline covers that (a large image takes minutes), not the peer calls' usual one.
        let base = Duration::from_secs(self.ctx.cfg.migration.peer_call_timeout_s.max(1));
        let image_bytes: u64 = self.images.iter().map(|i| i.length).sum();
        let deadline = prepare_deadline(base, image_bytes);
        let mut long = self.long_channel(deadline, "Prepare", &peer).await;
        let prep = long
            .prepare_cold_migration(req)
            .await
            .map_err(|s| {
                self.ctx.peers.forget_if_unreached(&self.p.job.target, &s);
                let why = if matches!(s.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled) {
                    format!(
                        "no answer to Prepare within {} s (the target hashes the images it already has; for {} that allows reading at 100 MiB/s)",
                        deadline.as_secs(),
                        ferry_disk::human_bytes(image_bytes)
                    )
                } else {
                    format!("refused: {}", status_msg(&s))
                };
                JobError::new(at, format!("target {} {why}", self.p.job.target))
            })?
            .into_inner();
        self.peer = Some(peer.clone());
        self.token = prep.token.clone();
        self.target_label = format!("{} ({})", prep.target_host, self.p.job.target);
        let label = self.target_label.clone();
        self.h.update(|s| s.target = label);
        let plans = check_plans(&self.images, &prep.images).map_err(fail(at, ""))?;
        let pr = &self.progress;
        for (img, plan) in self.images.iter().zip(&plans) {
            let have = if plan.already_present {
                img.length
            } else {
                plan.resume_offset
            };
            pr.resumed.fetch_add(have, Ordering::Relaxed);
            pr.done.fetch_add(have, Ordering::Relaxed);
        }
        self.publish();
        Ok((peer, prep, plans))
    }

    /// [`ColdPhase::Connect`]: the QUIC data plane to the target.
    async fn connect(&mut self, quic_addr: &str) -> Res<quinn::Connection> {
        let at = ColdPhase::Connect;
        self.enter(
            at,
            pb::MigrationPhase::Connecting,
            format!("connecting data plane to {quic_addr}"),
        );
        let quic_addr: SocketAddr = quic_addr.parse().map_err(fail(at, "address"))?;
        let conn = self
            .ctx
            .quic
            .connect_ip(quic_addr)
            .await
            .map_err(fail(at, ""))?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// [`ColdPhase::Copy`]: one stream per image still missing on the target (`todo`).
    async fn copy(
        &mut self,
        conn: quinn::Connection,
        plans: &[pb::ColdImagePlan],
        todo: &[usize],
    ) -> Res<()> {
        let total: u64 = self.images.iter().map(|i| i.length).sum();
        let resumed = self.progress.resumed.load(Ordering::Relaxed);
        self.enter(
            ColdPhase::Copy,
            pb::MigrationPhase::CopyingDisks,
            format!(
                "copying {} image file(s), {} in all{}",
                todo.len(),
                ferry_disk::human_bytes(total),
                if resumed > 0 {
                    format!(
                        " ({} already on the target)",
                        ferry_disk::human_bytes(resumed)
                    )
                } else {
                    String::new()
                }
            ),
        );
        self.copy_started = Some(Instant::now());
        let limiter =
            (self.p.job.bandwidth > 0).then(|| Arc::new(RateLimiter::new(self.p.job.bandwidth)));
        let streams = StreamParams {
            conn,
            id: self.p.job.id.clone(),
            token: self.token.clone(),
            codec: self.p.job.codec,
            limiter,
            progress: self.progress.clone(),
        };
        let jobs: Vec<(usize, PathBuf, u64, u64)> = todo
            .iter()
            .map(|&i| {
                (
                    i,
                    self.images[i].local.clone(),
                    plans[i].resume_offset,
                    self.images[i].length,
                )
            })
            .collect();
        let copy = send_images(streams, jobs);
        tokio::pin!(copy);
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        // A target that stays connected (QUIC keeps the link alive) but takes nothing
        // would hold the copy for ever: no image byte for this long fails it.
        let stall = Duration::from_secs(self.ctx.cfg.migration.cold_stall_timeout_s.max(1));
        let mut moved = (self.progress.done.load(Ordering::Relaxed), Instant::now());
        let result = loop {
            tokio::select! {
                r = &mut copy => break r,
                _ = tick.tick() => {
                    self.publish();
                    let done = self.progress.done.load(Ordering::Relaxed);
                    if done != moved.0 {
                        moved = (done, Instant::now());
                    } else if moved.1.elapsed() >= stall {
                        break Err(JobError::new(
                            ColdPhase::Copy,
                            format!(
                                "no image data taken for {} s: the target is connected but does not read (its storage not answering?)",
                                stall.as_secs()
                            ),
                        ));
                    }
                }
            }
        };
        self.publish();
        result?;
        if let Some(c) = self.conn.take() {
            c.close(0u32.into(), b"images sent");
        }
        let codec = self.p.job.codec.to_string();
        self.ctx
            .metrics
            .wire_bytes
            .with_label_values(&[&codec])
            .inc_by(self.progress.wire.load(Ordering::Relaxed));
        Ok(())
    }

    /// [`ColdPhase::Define`]: the target verifies and defines (optionally starts) the VM.
    /// Not cancellable. The VM is journaled as held by this migration first (mark
    /// `CommitSent`): from here on only the target's answer — to Finish, or to the
    /// questions of [`settle_with_target`] when that answer is lost — releases it.
    async fn define(
        &mut self,
        peer: &mut FerryPeerClient<Channel>,
    ) -> Res<pb::FinishColdMigrationResponse> {
        let at = ColdPhase::Define;
        self.enter(
            at,
            pb::MigrationPhase::Committing,
            format!("defining VM '{}' on {}", self.p.job.vm, self.target_label),
        );
        // A cancel accepted before the phase said Committing still counts: nothing is
        // held or sent yet.
        if self.h.cancel.is_cancelled() {
            return Err(JobError::cancelled(at));
        }
        let hold = self
            .ctx
            .vms
            .offline_hold_record(&self.p.job.vm, &self.p.job.id)
            .await
            .map_err(|s| JobError::new(at, s.message().to_string()))?;
        let token = self.token.clone();
        self.h.set_meta(|m| {
            m.mark = ferry_handoff::SourceMark::CommitSent;
            m.token = Some(token);
        });
        if let Err(e) = self
            .ctx
            .outgoing
            .persist_with(&self.h, vec![crate::journal::Op::PutVm(hold)])
        {
            // Nothing sent: the target cannot define it.
            self.h
                .set_meta(|m| m.mark = ferry_handoff::SourceMark::BeforeCommit);
            return Err(JobError::new(
                at,
                format!("journal on {}: {e}", self.host()),
            ));
        }
        // Only exit/hang here: from now on nothing may end this but the target's answer.
        let _ = crate::failpoint::hit("cold.src.finish.journaled", &self.ctx.cfg.state_dir).await;
        let req = self.finish_request();
        // The target may still be verifying the last image (BLAKE3 of a large file): a
        // channel whose deadline covers that, not the peer calls' usual minute.
        let wait = FINISH_WAIT + Duration::from_secs(30);
        let mut finish = self.long_channel(wait, "Finish", peer).await;
        let lost = match tokio::time::timeout(wait, finish.finish_cold_migration(req)).await {
            Ok(Ok(resp)) => return Ok(resp.into_inner()),
            Ok(Err(s)) => status_msg(&s),
            Err(_) => format!("no answer within {} s", FINISH_WAIT.as_secs()),
        };
        warn!(migration = %self.p.job.id, "Finish on {}: {lost}; asking the target whether it defined the VM", self.target_label);
        let defined = settle_with_target(
            &self.ctx,
            &self.h,
            &self.p.job.target,
            &self.target_label,
            &lost,
        )
        .await;
        if defined {
            Ok(self.finish_answer_again(peer).await)
        } else {
            Err(JobError::new(
                at,
                format!(
                    "target {}: {lost}{}",
                    self.target_label,
                    declared_gone_note(&self.h)
                ),
            ))
        }
    }

    /// A channel to the target of its own whose calls may take `deadline` (`call` waits
    /// for the target's hashing), or `usual` (the cached channel, a minute) if none can
    /// be made.
    async fn long_channel(
        &self,
        deadline: Duration,
        call: &str,
        usual: &FerryPeerClient<Channel>,
    ) -> FerryPeerClient<Channel> {
        match crate::tls::connect_with_deadline(&self.p.job.target, &self.ctx.identity, deadline)
            .await
        {
            Ok(chan) => FerryPeerClient::new(chan),
            Err(e) => {
                warn!(migration = %self.p.job.id, "a channel for {call}'s long deadline: {e}; asking over the usual one");
                usual.clone()
            }
        }
    }

    /// This migration's Finish request.
    fn finish_request(&self) -> pb::FinishColdMigrationRequest {
        pb::FinishColdMigrationRequest {
            migration_id: self.p.job.id.clone(),
            token: self.token.clone(),
            start: self.p.start_on_target,
        }
    }

    /// Finish's answer, asked again of a target known to have defined the VM (it repeats
    /// it, from its journal after a restart); without it, an empty answer: the status then
    /// says only that the VM is defined there.
    async fn finish_answer_again(
        &self,
        peer: &mut FerryPeerClient<Channel>,
    ) -> pb::FinishColdMigrationResponse {
        let again = tokio::time::timeout(
            Duration::from_secs(30),
            peer.finish_cold_migration(self.finish_request()),
        )
        .await;
        match again {
            Ok(Ok(r)) => r.into_inner(),
            _ => pb::FinishColdMigrationResponse::default(),
        }
    }

    /// The VM is defined on the target: undefine or release it here.
    async fn completed(&mut self, resp: pb::FinishColdMigrationResponse) {
        if let Some(c) = self.conn.take() {
            c.close(0u32.into(), b"finished");
        }
        // Journaled with the outcome below, in one transaction.
        let op = self
            .ctx
            .vms
            .end_offline(&self.p.job.vm, &self.p.job.id, self.p.undefine_source)
            .await;
        let there = match resp.vm.as_ref().map(|v| v.state()) {
            Some(pb::VmState::Running) => "running",
            _ => "defined (stopped)",
        };
        let files: Vec<String> = self
            .images
            .iter()
            .map(|i| i.local.display().to_string())
            .collect();
        let here = if self.p.undefine_source {
            if files.is_empty() {
                format!("its definition was removed from {}", self.host())
            } else {
                format!(
                    "its definition was removed from {}; its image files stay there: {}",
                    self.host(),
                    files.join(", ")
                )
            }
        } else {
            format!(
                "{} keeps its definition (stopped) and image files",
                self.host()
            )
        };
        let msg = format!(
            "VM '{}' is now {there} on {}; {here}",
            self.p.job.vm, self.target_label
        );
        let elapsed = self.started.elapsed().as_millis() as u64;
        self.publish();
        self.h.update(|s| {
            if !resp.start_error.is_empty() {
                s.error = format!(
                    "VM '{}' was defined on {} but starting it there failed: {}",
                    self.p.job.vm, self.target_label, resp.start_error
                );
            } else if self.p.start_on_target && there != "running" {
                // Settled after a lost answer: the target had defined it, not said it ran.
                s.error = format!(
                    "VM '{}' was defined on {}, which does not say it started it: start it there",
                    self.p.job.vm, self.target_label
                );
            }
            s.stats.get_or_insert_with(Default::default).elapsed_ms = elapsed;
        });
        self.ctx.metrics.duration.observe(elapsed as f64 / 1000.0);
        self.ctx
            .outgoing
            .end_completed(&self.h, &self.ctx.metrics, msg, op.into_iter().collect());
    }

    /// Aborts on the target (keeping partial images for a resume unless cancelled) and
    /// frees the VM here, unchanged.
    async fn failed(&mut self, e: ColdError) {
        let mut reason = format!(
            "cold migration of VM '{}' from {} to {} {e}",
            self.p.job.vm,
            self.host(),
            self.target_label,
        );
        // The operator's verdict took the VM back (journaled): final. The target hears
        // it from `tell_target_taken_back`; a plain Abort's "finished" from a target back
        // in the meantime must not turn it into a completion (and the news would then
        // remove the target's copy too: the VM defined nowhere).
        let taken_back = self.h.meta().taken_back;
        // Abort first, then close: the target then sees the streams end as part of the
        // abort rather than as a failure of its own.
        if let Some(mut peer) = self.peer.take().filter(|_| !taken_back) {
            let req = pb::AbortColdMigrationRequest {
                migration_id: self.p.job.id.clone(),
                token: self.token.clone(),
                reason: reason.clone(),
                discard: e.cancelled,
                taken_back: false,
            };
            match tokio::time::timeout(Duration::from_secs(15), peer.abort_cold_migration(req))
                .await
            {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    if r.finished {
                        // The Finish call did get through: the VM is defined there, so it
                        // completes (the answer's details are the target's to give).
                        let resp = self.finish_answer_again(&mut peer).await;
                        return self.completed(resp).await;
                    } else if !r.error.is_empty() && !reason.contains(&r.error) {
                        reason.push_str(&format!(
                            " (target {} says: {})",
                            self.target_label, r.error
                        ));
                    }
                }
                Ok(Err(s)) => {
                    warn!(migration = %self.p.job.id, "abort on target: {}", status_msg(&s))
                }
                Err(_) => {
                    warn!(migration = %self.p.job.id, "abort on target: no answer within 15 s")
                }
            }
        }
        if let Some(c) = self.conn.take() {
            c.close(1u32.into(), b"aborted");
        }
        warn!(migration = %self.p.job.id, "{reason}");
        let op = self
            .ctx
            .vms
            .end_offline(&self.p.job.vm, &self.p.job.id, false)
            .await;
        let elapsed = self.started.elapsed().as_millis() as u64;
        self.publish();
        let kept = if e.cancelled || taken_back {
            ""
        } else {
            "; what reached the target is kept there for a resume"
        };
        let message = format!(
            "VM '{}' stays on {} (stopped, images unchanged){kept}",
            self.p.job.vm,
            self.host()
        );
        self.ctx.outgoing.end_unsuccessful(
            &self.h,
            &self.ctx.metrics,
            &reason,
            e.cancelled,
            elapsed,
            message,
            op.into_iter().collect(),
        );
    }
}

/// Asks the target of cold migration `h` whether it defined the VM, once Finish may
/// have reached it: an Abort, which the target carries out if it did not (and then never
/// will) and refuses, answering `finished`, if it did. Asks until it has an answer
/// ([`cold_settle`]): meanwhile the migration is IN_DOUBT and the VM stays held here
/// (journaled). Returns whether the VM is defined on the target.
async fn settle_with_target(
    ctx: &Arc<AgentCtx>,
    h: &Arc<OutgoingHandle>,
    target: &str,
    label: &str,
    why: &str,
) -> bool {
    let id = h.id.clone();
    let token = h.meta().token.unwrap_or_default();
    let vm = h.snapshot().vm;
    if h.meta().taken_back {
        // The operator's verdict released the VM before this agent restarted: not asked
        // again, only told (as the live source does).
        h.verdict
            .declare("an operator, before this agent restarted");
        crate::migration::source::verdict_took_back(ctx, h, target, token, true);
        return false;
    }
    let mut wait = Duration::from_millis(500);
    let mut shown = false;
    // The declaration a target's answer spent (0: none).
    let mut verdict_spent = 0;
    loop {
        let req = pb::AbortColdMigrationRequest {
            migration_id: id.clone(),
            token: token.clone(),
            reason: format!("the source lost Finish's answer ({why})"),
            discard: false,
            taken_back: false,
        };
        // The operator's verdict counts for the first question after it (see
        // `OperatorVerdict`).
        let declaration = h.verdict.declaration();
        let verdict = declaration != verdict_spent;
        let answer = crate::migration::source::peer_call_within(
            ctx,
            target,
            Duration::from_secs(15),
            |mut peer| async move { peer.abort_cold_migration(req).await },
        )
        .await;
        let reached = crate::tls::reached(&answer);
        if verdict && reached {
            verdict_spent = declaration;
            warn!(migration = %id, "{label} answered after the operator declared it gone: its word settles the migration");
        }
        match cold_settle(&answer, verdict) {
            ColdSettle::Complete => return true,
            ColdSettle::Release if verdict && !reached => {
                // Journaled before the VM is free here: a target back later with the VM
                // defined is told to remove it, also after a restart of this agent.
                h.set_meta(|m| m.taken_back = true);
                match ctx.outgoing.persist_with(h, vec![]) {
                    Ok(()) => {
                        let _ =
                            crate::failpoint::hit("cold.src.verdict.journaled", &ctx.cfg.state_dir)
                                .await;
                        warn!(migration = %id, "the operator declared {label} gone for good and it does not answer: VM '{vm}' is released here");
                        crate::migration::source::verdict_took_back(ctx, h, target, token, true);
                        return false;
                    }
                    Err(e) => {
                        h.set_meta(|m| m.taken_back = false);
                        error!(migration = %id, "journal: {e}: the operator's verdict cannot be recorded; VM '{vm}' stays held here, in doubt");
                    }
                }
            }
            ColdSettle::Release => return false,
            ColdSettle::AskAgain => {}
        }
        if !shown {
            let said = match &answer {
                Some(Err(s)) => status_msg(s),
                _ => "no answer".to_string(),
            };
            ctx.outgoing.set_phase(
                h,
                pb::MigrationPhase::InDoubt,
                format!(
                    "{label} may have defined VM '{vm}' ({why}) and does not say ({said}): the VM stays held on {} until it does; asking again",
                    ctx.cfg.host_name
                ),
            );
            shown = true;
        }
        // The operator's verdict is acted on at once, after one more question.
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = h.verdict.wait(), if !h.verdict.declared() => {}
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// Settles a cold migration whose Finish may have reached the target (after a restart of
/// this agent, or a bug in its task) and ends it: completed (the definition removed here
/// if asked) when the target has the VM, failed with the VM free here otherwise.
async fn settle_and_end(
    ctx: Arc<AgentCtx>,
    h: Arc<OutgoingHandle>,
    vm: String,
    target: String,
    why: String,
) {
    let label = h.snapshot().target;
    let defined = settle_with_target(&ctx, &h, &target, &label, &why).await;
    let undefine = h.meta().cold_undefine.unwrap_or(false);
    let elapsed = (now_ms() - h.snapshot().started_unix_ms).max(0) as u64;
    if defined {
        let op = ctx.vms.end_offline(&vm, &h.id, undefine).await;
        let here = if undefine {
            format!("its definition was removed from {}", ctx.cfg.host_name)
        } else {
            format!("{} keeps its definition (stopped)", ctx.cfg.host_name)
        };
        h.update(|s| s.stats.get_or_insert_with(Default::default).elapsed_ms = elapsed);
        ctx.outgoing.end_completed(
            &h,
            &ctx.metrics,
            format!("VM '{vm}' is defined on {label} ({why}, settled with the target); {here}"),
            op.into_iter().collect(),
        );
    } else {
        let op = ctx.vms.end_offline(&vm, &h.id, false).await;
        let reason = format!(
            "cold migration of VM '{vm}' from {} to {label}: {why}; {}",
            ctx.cfg.host_name,
            h.verdict
                .settled_note()
                .unwrap_or_else(|| "the target did not define it".to_string())
        );
        ctx.outgoing.end_unsuccessful(
            &h,
            &ctx.metrics,
            &reason,
            false,
            elapsed,
            format!(
                "VM '{vm}' stays on {} (stopped, images unchanged)",
                ctx.cfg.host_name
            ),
            op.into_iter().collect(),
        );
    }
}

/// What the failure says when the operator's verdict released the VM.
fn declared_gone_note(h: &OutgoingHandle) -> String {
    match h.verdict.settled_note() {
        Some(note) => format!("; {note}: the VM was released here"),
        None => String::new(),
    }
}

/// After a restart of this agent: a cold migration journaled with mark `CommitSent` (the
/// VM held here) is settled with its target in the background ([`settle_and_end`]).
pub fn settle_after_restart(
    ctx: Arc<AgentCtx>,
    h: Arc<OutgoingHandle>,
    vm: String,
    target: String,
    why: String,
) {
    ctx.metrics.active.inc();
    tokio::spawn(settle_and_end(ctx, h, vm, target, why));
}

/// Every image file of `spec`'s disks, lowest backing layer first, each once, named
/// relative to the storage roots.
fn collect_images(
    storage: &StorageRoots,
    host: &str,
    spec: &VmSpec,
) -> Result<Vec<SourceImage>, String> {
    let mut out: Vec<SourceImage> = Vec::new();
    for d in &spec.disks {
        let what = |e: &dyn std::fmt::Display| {
            format!("disk '{}' of VM '{}' on host {host}: {e}", d.id, spec.name)
        };
        let top = storage.confine(&d.path).map_err(|e| what(&e))?;
        let format = crate::migration::disks::image_format(d.format);
        let chain = ferry_disk::backing_chain_as(&top, format).map_err(|e| what(&e))?;
        // Each layer's local path and name, top first.
        let mut layers = Vec::with_capacity(chain.len());
        for (depth, layer) in chain.iter().enumerate() {
            // A backing file outside the roots is as off-limits as a disk outside them.
            let local = if depth == 0 {
                top.clone()
            } else {
                storage
                    .confine(&layer.path)
                    .map_err(|e| what(&format!("backing file: {e}")))?
            };
            let name = storage
                .relative(&local)
                .map_err(|e| what(&format!("backing file: {e}")))?;
            layers.push((local, name, layer.format));
        }
        for depth in (0..layers.len()).rev() {
            let (local, name, format) = layers[depth].clone();
            let backing = layers.get(depth + 1).map(|l| l.1.clone());
            if let Some(seen) = out.iter_mut().find(|i| i.name == name) {
                if depth == 0 {
                    // Two disks on one image file: QEMU's locks would refuse it anyway.
                    return Err(what(&format!(
                        "image {} is also used by another disk (as {})",
                        local.display(),
                        seen.disk_id.as_deref().unwrap_or("a backing layer")
                    )));
                }
                continue; // a base image shared by two disks travels once
            }
            let meta = std::fs::metadata(&local)
                .map_err(|e| what(&format!("stat {}: {e}", local.display())))?;
            if !meta.is_file() {
                return Err(what(&format!("{} is not a regular file", local.display())));
            }
            let digest = ferry_disk::file_blake3(&local).map_err(|e| what(&e))?;
            let transfer_id = transfer_id(host, &name, meta.len(), &digest);
            out.push(SourceImage {
                name,
                local,
                format,
                length: meta.len(),
                allocated: meta.blocks().saturating_mul(512),
                digest,
                transfer_id,
                disk_id: (depth == 0).then(|| d.id.clone()),
                backing,
            });
        }
    }
    Ok(out)
}

/// The resume key of an image: the same only for the same file content sent by the same
/// host to the same path, so an interrupted transfer of an unchanged image resumes and
/// a changed one starts over.
fn transfer_id(host: &str, path: &Path, length: u64, digest: &Blake3Digest) -> String {
    let mut b = Vec::new();
    for part in [host.as_bytes(), path.as_os_str().as_encoded_bytes()] {
        b.extend_from_slice(&(part.len() as u64).to_le_bytes());
        b.extend_from_slice(part);
    }
    b.extend_from_slice(&length.to_le_bytes());
    b.extend_from_slice(digest.as_bytes());
    Blake3Digest::of_bytes(&b).to_hex()
}

/// Checks the target's answer against what was asked.
fn check_plans(
    images: &[SourceImage],
    plans: &[pb::ColdImagePlan],
) -> Result<Vec<pb::ColdImagePlan>, String> {
    if plans.len() != images.len() {
        return Err(format!(
            "target answered for {} images, {} were asked for",
            plans.len(),
            images.len()
        ));
    }
    for (i, p) in images.iter().zip(plans) {
        if Path::new(&p.path) != i.name || p.resume_offset > i.length {
            return Err(format!(
                "target's plan for {} does not match the image ({p:?})",
                i.name.display()
            ));
        }
    }
    Ok(plans.to_vec())
}

/// What every image stream of one migration shares.
#[derive(Clone)]
struct StreamParams {
    conn: quinn::Connection,
    id: String,
    token: String,
    codec: Codec,
    limiter: Option<Arc<RateLimiter>>,
    progress: Arc<Progress>,
}

/// Sends the images `(index, local path, resume offset, length)`, a few at a time; the
/// first failure stops the others.
async fn send_images(sp: StreamParams, jobs: Vec<(usize, PathBuf, u64, u64)>) -> Res<()> {
    let permits = Arc::new(Semaphore::new(STREAMS_AT_ONCE));
    let mut set = tokio::task::JoinSet::new();
    for (index, local, offset, length) in jobs {
        let (sp, permits) = (sp.clone(), permits.clone());
        set.spawn(async move {
            let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
            send_image(&sp, index, &local, offset, length)
                .await
                .map_err(|e| format!("{}: {e}", local.display()))
        });
    }
    while let Some(r) = set.join_next().await {
        let r = r
            .map_err(fail(ColdPhase::Copy, ""))
            .and_then(|r| r.map_err(fail(ColdPhase::Copy, "")));
        if r.is_err() {
            set.abort_all();
            return r;
        }
    }
    Ok(())
}

/// One step of the reader thread: a frame to send (or the end), and where it got to.
struct Piece {
    frame: Option<Vec<u8>>,
    raw: u64,
    /// The reader's position: every non-zero byte below it was sent.
    scanned: u64,
    /// Holes and zero chunks skipped so far.
    skipped: u64,
}

/// Reads `path` from `offset` on a blocking thread, sending encoded chunk frames; the
/// last piece (no frame) carries the final position.
fn read_chunks(path: &Path, offset: u64, codec: Codec, tx: mpsc::Sender<Result<Piece, String>>) {
    let mut reader = match ChunkReader::open(path, offset) {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.blocking_send(Err(e.to_string()));
            return;
        }
    };
    loop {
        let piece = match reader.next() {
            Some(Ok(c)) => match DataChunk::encode(c.offset, &c.data, codec) {
                Ok(frame) => {
                    let st = reader.stats();
                    Ok(Piece {
                        frame: Some(frame),
                        raw: c.data.len() as u64,
                        scanned: reader.scanned_to(),
                        skipped: st.bytes_hole + st.bytes_zero,
                    })
                }
                Err(e) => Err(format!("encoding a chunk: {e}")),
            },
            Some(Err(e)) => Err(e.to_string()),
            None => {
                let st = reader.stats();
                Ok(Piece {
                    frame: None,
                    raw: 0,
                    scanned: reader.scanned_to(),
                    skipped: st.bytes_hole + st.bytes_zero,
                })
            }
        };
        let last = !matches!(piece, Ok(Piece { frame: Some(_), .. }));
        // A closed channel means the stream failed: stop reading.
        if tx.blocking_send(piece).is_err() || last {
            return;
        }
    }
}

/// Sends one image on a stream of its own and waits until the target has read all of it.
async fn send_image(
    sp: &StreamParams,
    index: usize,
    local: &Path,
    offset: u64,
    length: u64,
) -> Result<(), String> {
    let index16 = u16::try_from(index).map_err(|_| "more than 65535 images".to_string())?;
    let werr = |e: quinn::WriteError| match e {
        quinn::WriteError::Stopped(code) => format!("the target stopped the stream (code {code})"),
        e => format!("sending: {e}"),
    };
    let mut send = sp
        .conn
        .open_uni()
        .await
        .map_err(|e| format!("opening a stream: {e}"))?;
    write_stream_header(&mut send, StreamHeader::new(StreamKind::DiskImage, index16))
        .await
        .map_err(|e| e.to_string())?;
    let begin = ControlMessage::DiskImageBegin {
        migration_id: sp.id.clone(),
        token: sp.token.clone(),
        index: u32::from(index16),
        offset,
    };
    let begin = Frame::encode_control(&begin).map_err(|e| e.to_string())?;
    send.write_all(&begin).await.map_err(werr)?;

    let (tx, mut rx) = mpsc::channel(4);
    let (path, codec) = (local.to_path_buf(), sp.codec);
    let reader = tokio::task::spawn_blocking(move || read_chunks(&path, offset, codec, tx));
    let pr = &sp.progress;
    let (mut scanned, mut skipped, mut end) = (offset, 0u64, None);
    while let Some(piece) = rx.recv().await {
        let piece = piece?;
        match &piece.frame {
            Some(frame) => {
                if let Some(l) = &sp.limiter {
                    l.acquire(frame.len()).await;
                }
                send.write_all(frame).await.map_err(werr)?;
                pr.wire.fetch_add(frame.len() as u64, Ordering::Relaxed);
                pr.raw_sent.fetch_add(piece.raw, Ordering::Relaxed);
            }
            None => end = Some(piece.scanned),
        }
        pr.done
            .fetch_add(piece.scanned.saturating_sub(scanned), Ordering::Relaxed);
        pr.skipped
            .fetch_add(piece.skipped.saturating_sub(skipped), Ordering::Relaxed);
        scanned = piece.scanned;
        skipped = piece.skipped;
    }
    let _ = reader.await;
    let scanned_len = end.ok_or_else(|| "the image reader stopped early".to_string())?;
    if scanned_len != length {
        return Err(format!(
            "the file changed size during the copy ({length} -> {scanned_len} bytes)"
        ));
    }
    let end = Frame::encode_control(&ControlMessage::DiskImageEnd { length })
        .map_err(|e| e.to_string())?;
    send.write_all(&end).await.map_err(werr)?;
    pr.wire
        .fetch_add((begin.len() + end.len()) as u64, Ordering::Relaxed);
    send.finish().map_err(|e| e.to_string())?;
    // Done when the target has read the whole stream (or gave up on it).
    match send.stopped().await {
        Ok(None) => Ok(()),
        Ok(Some(code)) => Err(format!("the target stopped the stream (code {code})")),
        Err(e) => Err(format!("waiting for the target to read the image: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_id_depends_on_every_input() {
        let d = Blake3Digest::of_bytes(b"image");
        let base = transfer_id("a", Path::new("/img/x.qcow2"), 10, &d);
        assert_eq!(base.len(), 64);
        assert_eq!(base, transfer_id("a", Path::new("/img/x.qcow2"), 10, &d));
        assert_ne!(base, transfer_id("b", Path::new("/img/x.qcow2"), 10, &d));
        assert_ne!(base, transfer_id("a", Path::new("/img/y.qcow2"), 10, &d));
        assert_ne!(base, transfer_id("a", Path::new("/img/x.qcow2"), 11, &d));
        assert_ne!(
            base,
            transfer_id(
                "a",
                Path::new("/img/x.qcow2"),
                10,
                &Blake3Digest::of_bytes(b"other")
            )
        );
        // Length-prefixed fields: moving bytes between host and path changes the id.
        assert_ne!(
            transfer_id("ab", Path::new("/c"), 1, &d),
            transfer_id("a", Path::new("b/c"), 1, &d)
        );
    }
}
