//! Cold (offline) migration: a stopped VM's disk images and its definition move to another
//! host, like `virsh migrate --offline --persistent [--undefinesource]` with the disks
//! copied.
//!
//! **Source** ([`start`]): the VM must be stopped (or is stopped first with `stop_source`)
//! and is marked busy so it cannot be started meanwhile. Every image file of every disk,
//! backing layers included, is confined to the storage roots, inspected, hashed (BLAKE3)
//! and named relative to its root, as live migration names disks: the target maps the name
//! into its own roots (hosts may mount storage at different paths) and, at [`finish`],
//! points each received overlay's backing reference at the new place of the layer below. The target is asked to prepare ([`prepare`]); then each image that is not
//! already there travels on a QUIC unidirectional stream of its own:
//!
//! ```text
//! StreamHeader(DiskImage, index) | Control(DiskImageBegin{id, token, index, offset})
//!   | Chunk(offset, data)* | Control(DiskImageEnd{length}) | FIN
//! ```
//!
//! Holes and all-zero chunks are never sent; chunks are compressed with the requested
//! codec. Once the target has read every stream, [`finish`] defines the VM there
//! (optionally starting it) and the source undefines its copy (`undefine_source`, image
//! files stay) or releases it (stopped, still defined).
//!
//! **Target**: [`prepare`] checks everything before creating anything (VM name free, every
//! path inside its storage roots, no different file at a path, room for what is missing),
//! then opens a resumable [`PartialImage`] per image. Each stream writes its image,
//! checkpoints every 64 MiB or 2 s, and at the end verifies the BLAKE3 end to end before
//! the image takes its final name.
//!
//! **Failure**: the source calls [`abort`]; the target drops the name reservation and its
//! partial images *without* deleting the part files, so the next attempt with unchanged
//! images resumes where this one stopped (the transfer id is derived from the source host,
//! path, length and digest). Only an operator's cancel discards them. The source VM is
//! never changed by a failure.
//!
//! The target's registry of cold migrations is process-wide ([`serve_disk_streams`] is
//! reached from the QUIC accept path, which has no [`AgentCtx`]); one agent runs per
//! process.

use super::pages::RateLimiter;
use super::{now_ms, OutgoingHandle};
use crate::convert::{spec_from_pb, spec_to_pb};
use crate::vms::{state_name, VmManager};
use crate::AgentCtx;
use ferry_api::v1 as pb;
use ferry_api::v1::ferry_peer_client::FerryPeerClient;
use ferry_disk::{Blake3Digest, ChunkReader, DiskError, ImageFormat, PartialImage, StorageRoots};
use ferry_qemu::VmSpec;
use ferry_transport::{read_stream_header, write_stream_header, FrameReader};
use ferry_wire::{
    Codec, ControlMessage, DataChunk, Frame, StreamHeader, StreamKind, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Status;
use tracing::{error, info, warn};

/// The target makes received data durable after this many bytes…
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// …or after this long, whichever comes first: on a slow link 64 MiB can take minutes,
/// all of which an interruption would otherwise throw away.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);
/// Images sent at the same time (each on its own stream): two keep a 2-core host busy
/// reading and compressing without thrashing the disks.
const STREAMS_AT_ONCE: usize = 2;
/// How often the source publishes progress while copying.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// How long a finished or failed incoming migration is remembered (idempotent Finish,
/// the reason of a failure for the source's Abort).
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);
/// How long Finish waits for the last images to be verified (hashing a large image).
const FINISH_WAIT: Duration = Duration::from_secs(1800);
/// Time a new stream has to say which migration it belongs to.
const STREAM_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

// ======================================================================== source side

/// What the operator asked for.
#[derive(Debug, Clone)]
struct ColdParams {
    id: String,
    vm: String,
    target: String,
    codec: Codec,
    bandwidth: u64,
    start_on_target: bool,
    undefine_source: bool,
    stop_source: bool,
}

/// A failure of the source side, with the step it happened in.
#[derive(Debug)]
struct ColdError {
    step: &'static str,
    message: String,
    cancelled: bool,
}

type Res<T> = Result<T, ColdError>;

fn fail<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> ColdError {
    move |e| ColdError {
        step,
        message: e.to_string(),
        cancelled: false,
    }
}

fn status_msg(s: &Status) -> String {
    format!("{} ({:?})", s.message(), s.code())
}

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
        id: uuid::Uuid::new_v4().to_string(),
        vm: r.vm.clone(),
        target: r.target.clone(),
        codec,
        bandwidth: r.bandwidth_bytes_per_sec,
        start_on_target: r.start_on_target,
        undefine_source: r.undefine_source,
        stop_source: r.stop_source,
    };
    let info = ctx.vms.get(&p.vm).await?;
    let running = info.pid != 0;
    if running && !p.stop_source {
        return Err(Status::failed_precondition(format!(
            "VM '{}' is {} on host {}: stop it or pass --stop-source",
            p.vm,
            state_name(info.state()),
            ctx.cfg.host_name
        )));
    }
    // A stopped VM is marked busy now, so the answer already says if it cannot be.
    let spec = if running {
        None
    } else {
        Some(ctx.vms.begin_offline(&p.vm, &p.id).await?)
    };
    let disks = info.spec.as_ref().map(|s| s.disks.len()).unwrap_or(0);
    let status = pb::MigrationStatus {
        id: p.id.clone(),
        vm: p.vm.clone(),
        source: ctx.cfg.host_name.clone(),
        target: p.target.clone(),
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
    // A cold migration has no handoff to settle: a restart marks it failed.
    let meta = super::SourceMeta {
        mark: ferry_handoff::SourceMark::BeforeCommit,
        was_running: false,
        capture: None,
    };
    let handle = ctx.outgoing.register(status.clone(), meta);
    tokio::spawn(run_guarded(ctx, p, handle, spec));
    Ok(status)
}

/// Runs the migration; should it panic (a bug), still frees the VM and ends the status.
async fn run_guarded(
    ctx: Arc<AgentCtx>,
    p: ColdParams,
    h: Arc<OutgoingHandle>,
    spec: Option<VmSpec>,
) {
    let (ctx2, p2, h2) = (ctx.clone(), p.clone(), h.clone());
    let Err(panic) = tokio::spawn(run(ctx, p, h, spec)).await else {
        return;
    };
    error!(migration = %p2.id, "cold migration task panicked: {panic}");
    let _ = ctx2.vms.end_offline(&p2.vm, &p2.id, false).await;
    ctx2.metrics.active.dec();
    h2.update(|s| {
        s.phase = pb::MigrationPhase::Failed as i32;
        s.error = format!(
            "internal error in the cold migration of VM '{}' from {} (a bug: {panic}); the VM stays defined there",
            p2.vm, ctx2.cfg.host_name
        );
        s.finished_unix_ms = now_ms();
    });
    ctx2.outgoing.persist(&h2);
}

async fn run(ctx: Arc<AgentCtx>, p: ColdParams, h: Arc<OutgoingHandle>, spec: Option<VmSpec>) {
    ctx.metrics.active.inc();
    let mut job = Job {
        ctx: ctx.clone(),
        h: h.clone(),
        started: Instant::now(),
        peer: None,
        token: String::new(),
        conn: None,
        progress: Arc::new(Progress::default()),
        copy_started: None,
        images: Vec::new(),
        target_label: p.target.clone(),
        p,
    };
    let result = tokio::select! {
        r = job.drive(spec) => r,
        _ = h.cancel.cancelled() => Err(ColdError { step: "cancel", message: "cancelled by request".into(), cancelled: true }),
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

    fn phase(&self, phase: pb::MigrationPhase, message: impl Into<String>) {
        self.ctx.outgoing.set_phase(&self.h, phase, message.into());
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

    /// Everything up to the target defining the VM.
    async fn drive(&mut self, spec: Option<VmSpec>) -> Res<pb::FinishColdMigrationResponse> {
        let spec = match spec {
            Some(s) => s,
            None => {
                self.phase(
                    pb::MigrationPhase::Preparing,
                    format!("stopping VM '{}' (ACPI power-down, then quit)", self.p.vm),
                );
                let stopped = self.ctx.vms.stop(&self.p.vm, false).await;
                // Stopped meanwhile by someone else is as good; anything else is reported.
                match self.ctx.vms.begin_offline(&self.p.vm, &self.p.id).await {
                    Ok(spec) => spec,
                    Err(s) => {
                        return Err(fail("stop source VM")(
                            stopped
                                .err()
                                .map(|e| e.message().to_string())
                                .unwrap_or_else(|| s.message().to_string()),
                        ))
                    }
                }
            }
        };

        // 1. Images: confined, inspected, hashed. Nothing is sent if any is wrong.
        self.phase(
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
            .map_err(fail("inspect images"))?
            .map_err(fail("inspect images"))?;
        let total: u64 = self.images.iter().map(|i| i.length).sum();
        self.h.update(|s| {
            s.stats
                .get_or_insert_with(Default::default)
                .disk_bytes_total = total
        });

        // 2. The target checks everything and reserves the name.
        self.phase(
            pb::MigrationPhase::Preparing,
            format!(
                "asking {} to prepare {} image file(s)",
                self.p.target,
                self.images.len()
            ),
        );
        let chan = crate::tls::connect(&self.p.target, &self.ctx.identity)
            .await
            .map_err(|e| {
                fail("prepare")(format!("cannot reach target agent {}: {e}", self.p.target))
            })?;
        let mut peer = FerryPeerClient::new(chan);
        let req = pb::PrepareColdMigrationRequest {
            migration_id: self.p.id.clone(),
            spec: Some(spec_to_pb(&spec)),
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
        let prep = peer
            .prepare_cold_migration(req)
            .await
            .map_err(|s| {
                fail("prepare")(format!(
                    "target {} refused: {}",
                    self.p.target,
                    status_msg(&s)
                ))
            })?
            .into_inner();
        self.peer = Some(peer.clone());
        self.token = prep.token.clone();
        self.target_label = format!("{} ({})", prep.target_host, self.p.target);
        let label = self.target_label.clone();
        self.h.update(|s| s.target = label);
        let plans = check_plans(&self.images, &prep.images).map_err(fail("prepare"))?;

        // 3. Data: one stream per image still missing on the target.
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
        let todo: Vec<usize> = (0..plans.len())
            .filter(|&i| !plans[i].already_present)
            .collect();
        if !todo.is_empty() {
            self.phase(
                pb::MigrationPhase::Connecting,
                format!("connecting data plane to {}", prep.quic_addr),
            );
            let quic_addr: SocketAddr = prep.quic_addr.parse().map_err(fail("connect"))?;
            let conn = self
                .ctx
                .quic
                .connect(quic_addr, &quic_addr.ip().to_string())
                .await
                .map_err(fail("connect"))?;
            self.conn = Some(conn.clone());
            let resumed = pr.resumed.load(Ordering::Relaxed);
            self.phase(
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
                (self.p.bandwidth > 0).then(|| Arc::new(RateLimiter::new(self.p.bandwidth)));
            let streams = StreamParams {
                conn,
                id: self.p.id.clone(),
                token: self.token.clone(),
                codec: self.p.codec,
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
            let result = loop {
                tokio::select! {
                    r = &mut copy => break r,
                    _ = tick.tick() => self.publish(),
                }
            };
            self.publish();
            result?;
            if let Some(c) = self.conn.take() {
                c.close(0u32.into(), b"images sent");
            }
            let codec = self.p.codec.to_string();
            self.ctx
                .metrics
                .wire_bytes
                .with_label_values(&[&codec])
                .inc_by(self.progress.wire.load(Ordering::Relaxed));
        }

        // 4. The target verifies and defines the VM. Not cancellable from here on.
        self.phase(
            pb::MigrationPhase::Committing,
            format!("defining VM '{}' on {}", self.p.vm, self.target_label),
        );
        let req = pb::FinishColdMigrationRequest {
            migration_id: self.p.id.clone(),
            token: self.token.clone(),
            start: self.p.start_on_target,
        };
        let resp = tokio::time::timeout(
            FINISH_WAIT + Duration::from_secs(30),
            peer.finish_cold_migration(req),
        )
        .await
        .map_err(|_| {
            fail("finish")(format!(
                "no answer from target within {} s",
                FINISH_WAIT.as_secs()
            ))
        })?
        .map_err(|s| fail("finish")(status_msg(&s)))?
        .into_inner();
        Ok(resp)
    }

    /// The VM is defined on the target: undefine or release it here.
    async fn completed(&mut self, resp: pb::FinishColdMigrationResponse) {
        if let Some(c) = self.conn.take() {
            c.close(0u32.into(), b"finished");
        }
        if let Err(e) = self
            .ctx
            .vms
            .end_offline(&self.p.vm, &self.p.id, self.p.undefine_source)
            .await
        {
            warn!(migration = %self.p.id, "releasing VM '{}' after the migration: {}", self.p.vm, e.message());
        }
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
            self.p.vm, self.target_label
        );
        let elapsed = self.started.elapsed().as_millis() as u64;
        self.publish();
        self.h.update(|s| {
            s.finished_unix_ms = now_ms();
            if !resp.start_error.is_empty() {
                s.error = format!(
                    "VM '{}' was defined on {} but starting it there failed: {}",
                    self.p.vm, self.target_label, resp.start_error
                );
            }
            s.stats.get_or_insert_with(Default::default).elapsed_ms = elapsed;
        });
        let m = &self.ctx.metrics;
        m.migrations
            .with_label_values(&["source", "completed"])
            .inc();
        m.active.dec();
        m.duration.observe(elapsed as f64 / 1000.0);
        self.phase(pb::MigrationPhase::Completed, msg);
    }

    /// Aborts on the target (keeping partial images for a resume unless cancelled) and
    /// frees the VM here, unchanged.
    async fn failed(&mut self, e: ColdError) {
        let mut reason = format!(
            "cold migration of VM '{}' from {} to {} failed at {}: {}",
            self.p.vm,
            self.host(),
            self.target_label,
            e.step,
            e.message
        );
        // Abort first, then close: the target then sees the streams end as part of the
        // abort rather than as a failure of its own.
        if let Some(mut peer) = self.peer.take() {
            let req = pb::AbortColdMigrationRequest {
                migration_id: self.p.id.clone(),
                token: self.token.clone(),
                reason: reason.clone(),
                discard: e.cancelled,
            };
            match tokio::time::timeout(Duration::from_secs(15), peer.abort_cold_migration(req))
                .await
            {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    if r.finished {
                        // The Finish call did get through: the VM is defined there.
                        let req = pb::FinishColdMigrationRequest {
                            migration_id: self.p.id.clone(),
                            token: self.token.clone(),
                            start: self.p.start_on_target,
                        };
                        if let Ok(Ok(resp)) = tokio::time::timeout(
                            Duration::from_secs(30),
                            peer.finish_cold_migration(req),
                        )
                        .await
                        {
                            return self.completed(resp.into_inner()).await;
                        }
                        reason.push_str("; the target reports the migration finished, so the VM is defined there too");
                    } else if !r.error.is_empty() && !reason.contains(&r.error) {
                        reason.push_str(&format!(
                            " (target {} says: {})",
                            self.target_label, r.error
                        ));
                    }
                }
                Ok(Err(s)) => warn!(migration = %self.p.id, "abort on target: {}", status_msg(&s)),
                Err(_) => warn!(migration = %self.p.id, "abort on target: no answer within 15 s"),
            }
        }
        if let Some(c) = self.conn.take() {
            c.close(1u32.into(), b"aborted");
        }
        warn!(migration = %self.p.id, "{reason}");
        let _ = self
            .ctx
            .vms
            .end_offline(&self.p.vm, &self.p.id, false)
            .await;
        let elapsed = self.started.elapsed().as_millis() as u64;
        self.publish();
        let kept = if e.cancelled {
            ""
        } else {
            "; what reached the target is kept there for a resume"
        };
        let message = format!(
            "VM '{}' stays on {} (stopped, images unchanged){kept}",
            self.p.vm,
            self.host()
        );
        self.ctx.outgoing.end_unsuccessful(
            &self.h,
            &self.ctx.metrics,
            &reason,
            e.cancelled,
            elapsed,
            message,
            vec![],
        );
    }
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
        let format = super::disks::image_format(d.format);
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
            .map_err(fail("copy images"))
            .and_then(|r| r.map_err(fail("copy images")));
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

// ======================================================================== target side

/// The state of an incoming cold migration.
#[derive(Debug, Clone)]
enum TargetState {
    Receiving,
    /// The VM is defined here; the answer Finish gave (repeated to a retried call).
    Finished(Box<pb::FinishColdMigrationResponse>),
    /// Given up; `by_target` when this host failed it itself (bad data, lost source).
    Failed {
        reason: String,
        by_target: bool,
    },
}

/// One image being received.
struct TargetImage {
    /// The final path on this host (confined).
    path: PathBuf,
    length: u64,
    digest: Blake3Digest,
    transfer_id: String,
    resume_offset: u64,
    /// The partial image; `None` while a stream works on it, once finished, or when the
    /// file was already present.
    slot: tokio::sync::Mutex<Option<PartialImage>>,
    done: AtomicBool,
    format: ImageFormat,
    /// The layer below (an index into the migration's images), if any.
    backing: Option<usize>,
    /// Received in this migration (not already present): its backing reference is ours
    /// to point at this host's copy of the layer below.
    received: bool,
}

/// An incoming cold migration on the target.
struct ColdIncoming {
    id: String,
    token: String,
    spec: VmSpec,
    source_host: String,
    images: Vec<TargetImage>,
    state: tokio::sync::Mutex<TargetState>,
    /// Stops the streams and the watchdog.
    cancel: CancellationToken,
    /// Bumped whenever an image completes or the state changes (wakes Finish).
    version: watch::Sender<u64>,
    last_activity: std::sync::Mutex<Instant>,
    /// Streams and Finish calls in progress (the watchdog leaves a busy migration alone).
    busy: AtomicUsize,
    vms: Arc<VmManager>,
    metrics: Arc<crate::metrics::Metrics>,
    /// The registry holding this migration (it removes itself from it later).
    registry: Arc<ColdRegistry>,
}

/// This agent's incoming cold migrations (owned by the `IncomingRegistry`).
#[derive(Default)]
pub struct ColdRegistry(std::sync::Mutex<HashMap<String, Arc<ColdIncoming>>>);

impl ColdRegistry {
    fn lookup(&self, id: &str) -> Option<Arc<ColdIncoming>> {
        self.0.lock().ok()?.get(id).cloned()
    }
}

/// Counts a stream or call as busy while it lives.
struct Busy<'a>(&'a ColdIncoming);

impl<'a> Busy<'a> {
    fn new(inc: &'a ColdIncoming) -> Self {
        inc.busy.fetch_add(1, Ordering::AcqRel);
        inc.touch();
        Busy(inc)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// How an abort went.
enum Aborted {
    Now,
    /// It had failed before; the reason is the target's own if `by_target`.
    Before {
        reason: String,
        by_target: bool,
    },
    /// Too late: the VM is defined here.
    Finished,
}

impl ColdIncoming {
    fn touch(&self) {
        if let Ok(mut t) = self.last_activity.lock() {
            *t = Instant::now();
        }
    }

    fn idle_for(&self) -> Duration {
        self.last_activity
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Gives up: stops the streams, drops the name reservation and the partial images —
    /// keeping their files for a resume unless `discard`.
    async fn abort(self: &Arc<Self>, reason: &str, by_target: bool, discard: bool) -> Aborted {
        {
            let mut st = self.state.lock().await;
            match &*st {
                TargetState::Finished(_) => return Aborted::Finished,
                TargetState::Failed { reason, by_target } => {
                    let before = Aborted::Before {
                        reason: reason.clone(),
                        by_target: *by_target,
                    };
                    drop(st);
                    if discard {
                        // It failed first (e.g. the cancelled source's streams ended before
                        // its Abort came), which kept the partial images: remove them now.
                        self.discard_kept().await;
                    }
                    return before;
                }
                TargetState::Receiving => {
                    *st = TargetState::Failed {
                        reason: reason.to_string(),
                        by_target,
                    }
                }
            }
        }
        warn!(migration = %self.id, vm = %self.spec.name, "aborting incoming cold migration: {reason}");
        self.cancel.cancel();
        for img in &self.images {
            // Waits for a stream still holding the image to notice the cancel; the slot
            // stays locked until the image is closed, so a late discard finds it closed.
            let mut slot = img.slot.lock().await;
            if let Some(part) = slot.take() {
                if discard {
                    let path = img.path.clone();
                    match tokio::task::spawn_blocking(move || part.abandon()).await {
                        Ok(Err(e)) => {
                            warn!(migration = %self.id, "removing partial image {}: {e}", path.display())
                        }
                        Err(e) => {
                            warn!(migration = %self.id, "removing partial image {}: {e}", path.display())
                        }
                        Ok(Ok(())) => {}
                    }
                } else {
                    // Closed: the part file and its sidecar stay for a resume.
                    drop(part);
                }
            }
            drop(slot);
        }
        if let Err(e) = self.vms.drop_incoming(&self.spec.name, &self.id).await {
            warn!(migration = %self.id, "dropping the reservation of VM '{}': {}", self.spec.name, e.message());
        }
        self.metrics
            .migrations
            .with_label_values(&["target", "aborted"])
            .inc();
        self.bump();
        forget_later(self.clone());
        Aborted::Now
    }

    /// Removes the partial images an earlier abort kept. Reopening takes the part file's
    /// lock, so one a newer attempt is receiving into is left alone (`Busy`).
    async fn discard_kept(&self) {
        for img in self
            .images
            .iter()
            .filter(|i| !i.done.load(Ordering::Acquire))
        {
            let mut slot = img.slot.lock().await;
            let open = slot.take();
            let (path, length, tid) = (img.path.clone(), img.length, img.transfer_id.clone());
            let r = tokio::task::spawn_blocking(move || match open {
                Some(part) => part.abandon(),
                None => PartialImage::open_or_resume(&path, length, &tid)
                    .and_then(PartialImage::abandon),
            })
            .await;
            drop(slot);
            if let Ok(Err(e)) = r {
                info!(migration = %self.id, "partial image of {} not discarded: {e}", img.path.display());
            }
        }
    }

    /// Receives one image from `reader`, starting at `offset`.
    async fn receive(
        self: &Arc<Self>,
        index: usize,
        offset: u64,
        mut reader: FrameReader,
    ) -> Result<(), String> {
        let img = &self.images[index];
        let name = img.path.display().to_string();
        let mut slot = img
            .slot
            .try_lock()
            .map_err(|_| format!("image {name} already has a stream"))?;
        if self.cancel.is_cancelled() {
            return Err(format!("migration {} is over", self.id));
        }
        let mut part = slot.take();
        if part.is_none() {
            return Err(format!(
                "image {name} is complete or already present: nothing to receive"
            ));
        }
        if offset != img.resume_offset {
            *slot = part;
            return Err(format!(
                "image {name}: data starts at {offset}, expected {}",
                img.resume_offset
            ));
        }
        let _busy = Busy::new(self);
        let mut written_to = offset;
        let mut since_checkpoint = 0u64;
        let mut last_checkpoint = Instant::now();
        let result: Result<(), String> = loop {
            let frame = tokio::select! {
                f = reader.next() => f,
                _ = self.cancel.cancelled() => break Err("the migration was aborted".into()),
            };
            match frame {
                Ok(Some(Frame::Chunk(c))) => {
                    let (at, n) = (c.offset, c.data.len() as u64);
                    let data = c.data;
                    if let Err(e) = with_part(&mut part, move |p| p.write_chunk(at, &data)).await {
                        break Err(e);
                    }
                    written_to = at + n;
                    since_checkpoint += n;
                    self.touch();
                    if since_checkpoint >= CHECKPOINT_BYTES
                        || last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
                    {
                        if let Err(e) =
                            with_part(&mut part, move |p| p.checkpoint(written_to)).await
                        {
                            break Err(e);
                        }
                        since_checkpoint = 0;
                        last_checkpoint = Instant::now();
                    }
                }
                Ok(Some(Frame::Control(ControlMessage::DiskImageEnd { length }))) => {
                    if length != img.length {
                        break Err(format!(
                            "the source scanned {length} bytes, {} were announced",
                            img.length
                        ));
                    }
                    // Read the FIN too, so the source's wait for the whole stream to be
                    // read ends cleanly instead of with a STOP.
                    match tokio::time::timeout(STREAM_HELLO_TIMEOUT, reader.next()).await {
                        Ok(Ok(None)) => {}
                        Ok(Ok(Some(_))) => break Err("data after the end of the image".into()),
                        Ok(Err(e)) => break Err(format!("source connection: {e}")),
                        Err(_) => break Err("the stream did not end after the image".into()),
                    }
                    if let Err(e) = with_part(&mut part, move |p| p.checkpoint(length)).await {
                        break Err(e);
                    }
                    // Verified end to end: a mismatch removes the part file.
                    let Some(p) = part.take() else {
                        break Err("image closed".into());
                    };
                    let digest = img.digest;
                    match tokio::task::spawn_blocking(move || p.finish(digest)).await {
                        Ok(Ok(_)) => break Ok(()),
                        Ok(Err(e)) => break Err(e.to_string()),
                        Err(e) => break Err(format!("verifying: {e}")),
                    }
                }
                Ok(Some(other)) => {
                    break Err(format!(
                        "unexpected frame {:?} on a disk-image stream",
                        frame_kind(&other)
                    ))
                }
                Ok(None) => break Err("the stream ended before the image did".into()),
                Err(e) => break Err(format!("source connection: {e}")),
            }
        };
        match result {
            Ok(()) => {
                img.done.store(true, Ordering::Release);
                info!(migration = %self.id, image = %name, "image received and verified");
                drop(slot);
                self.bump();
                Ok(())
            }
            Err(e) => {
                reader.stop();
                // Chunks arrive in order, so everything below `written_to` is here:
                // claim it, so a resume does not send it again.
                if part.is_some() && written_to > offset {
                    let _ = with_part(&mut part, move |p| p.checkpoint(written_to)).await;
                }
                *slot = part;
                drop(slot);
                Err(format!("image {name}: {e}"))
            }
        }
    }
}

/// Runs `f` on the partial image on a blocking thread (it does file I/O and fsync).
async fn with_part<T: Send + 'static>(
    part: &mut Option<PartialImage>,
    f: impl FnOnce(&mut PartialImage) -> Result<T, DiskError> + Send + 'static,
) -> Result<T, String> {
    let mut p = part.take().ok_or_else(|| "image closed".to_string())?;
    let (p, r) = tokio::task::spawn_blocking(move || {
        let r = f(&mut p);
        (p, r)
    })
    .await
    .map_err(|e| format!("image writer: {e}"))?;
    *part = Some(p);
    r.map_err(|e| e.to_string())
}

fn frame_kind(f: &Frame) -> &'static str {
    match f {
        Frame::Control(_) => "control",
        Frame::Pages(_) => "pages",
        Frame::ZeroPages(_) => "zero pages",
        Frame::Chunk(_) => "chunk",
    }
}

/// Removes a finished or failed migration from the registry after a while.
fn forget_later(inc: Arc<ColdIncoming>) {
    tokio::spawn(async move {
        tokio::time::sleep(TOMBSTONE_TTL).await;
        if let Ok(mut m) = inc.registry.0.lock() {
            if m.get(&inc.id).is_some_and(|x| Arc::ptr_eq(x, &inc)) {
                m.remove(&inc.id);
            }
        }
    });
}

/// A requested image, parsed.
struct Wanted {
    /// The source's name for it (relative to the storage roots).
    name: PathBuf,
    /// Where it goes on this host.
    resolved: PathBuf,
    format: ImageFormat,
    disk_id: Option<String>,
    backing: Option<usize>,
    length: u64,
    digest: Blake3Digest,
    allocated: u64,
    transfer_id: String,
}

/// A requested image after the checks: where it goes, and whether it is already there.
struct Planned {
    wanted: Wanted,
    present: bool,
}

/// Target: checks a cold migration (nothing is created unless every check passes),
/// reserves the VM name and opens (or resumes) a partial image per missing file.
pub async fn prepare(
    ctx: &Arc<AgentCtx>,
    req: pb::PrepareColdMigrationRequest,
) -> Result<pb::PrepareColdMigrationResponse, Status> {
    let host = ctx.cfg.host_name.clone();
    if !ferry_wire::version_supported(req.protocol_version.min(255) as u8) {
        return Err(Status::failed_precondition(format!(
            "protocol version {} not supported by host {host} (speaks {PROTOCOL_VERSION})",
            req.protocol_version
        )));
    }
    if uuid::Uuid::parse_str(&req.migration_id).is_err() {
        return Err(Status::invalid_argument("migration_id must be a UUID"));
    }
    let spec = spec_from_pb(
        req.spec
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("spec is missing"))?,
    )?;
    let registry = ctx.incoming.cold();
    if registry.lookup(&req.migration_id).is_some() {
        return Err(Status::already_exists(format!(
            "cold migration {} is already known on {host}",
            req.migration_id
        )));
    }
    let wanted = parse_images(&ctx.storage, &host, &req.images, &spec)?;
    // The VM is defined here with this host's paths for its disks.
    let mut spec = spec;
    for d in spec.disks.iter_mut() {
        if let Some(w) = wanted.iter().find(|w| w.disk_id.as_deref() == Some(&d.id)) {
            d.path = w.resolved.clone();
        }
    }

    // A new attempt from the same source replaces one it abandoned (its agent restarted
    // mid-copy, say): the reservation goes, the partial images stay and are resumed.
    let stale: Vec<Arc<ColdIncoming>> = registry
        .0
        .lock()
        .map(|m| {
            m.values()
                .filter(|i| i.spec.name == spec.name && i.source_host == req.source_host)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for old in stale {
        let _ = old
            .abort(
                &format!(
                    "superseded by migration {} from the same source",
                    req.migration_id
                ),
                false,
                false,
            )
            .await;
    }

    ctx.vms.reserve_incoming(&spec, &req.migration_id).await?;
    let opened = async {
        let (host2, vm) = (host.clone(), spec.name.clone());
        let planned = tokio::task::spawn_blocking(move || plan_images(&host2, &vm, wanted))
            .await
            .map_err(|e| Status::internal(format!("checking images: {e}")))??;
        tokio::task::spawn_blocking(move || open_images(planned))
            .await
            .map_err(|e| Status::internal(format!("opening images: {e}")))?
    }
    .await;
    let images = match opened {
        Ok(images) => images,
        Err(e) => {
            let _ = ctx.vms.drop_incoming(&spec.name, &req.migration_id).await;
            return Err(e);
        }
    };
    let (version, _) = watch::channel(0);
    let inc = Arc::new(ColdIncoming {
        id: req.migration_id.clone(),
        token: uuid::Uuid::new_v4().simple().to_string(),
        spec: spec.clone(),
        source_host: req.source_host.clone(),
        images,
        state: tokio::sync::Mutex::new(TargetState::Receiving),
        cancel: CancellationToken::new(),
        version,
        last_activity: std::sync::Mutex::new(Instant::now()),
        busy: AtomicUsize::new(0),
        vms: ctx.vms.clone(),
        metrics: ctx.metrics.clone(),
        registry: registry.clone(),
    });
    if let Ok(mut m) = registry.0.lock() {
        m.insert(inc.id.clone(), inc.clone());
    }
    spawn_watchdog(
        inc.clone(),
        Duration::from_secs(ctx.cfg.migration.prepare_timeout_s.max(1)),
    );
    let plans: Vec<pb::ColdImagePlan> = inc
        .images
        .iter()
        .zip(&req.images)
        .map(|(i, r)| pb::ColdImagePlan {
            path: r.path.clone(),
            resume_offset: i.resume_offset,
            already_present: i.done.load(Ordering::Acquire),
        })
        .collect();
    let resumed: u64 = inc
        .images
        .iter()
        .map(|i| {
            if i.done.load(Ordering::Acquire) {
                i.length
            } else {
                i.resume_offset
            }
        })
        .sum();
    info!(migration = %inc.id, vm = %spec.name, source = %req.source_host, images = plans.len(), resumed, "prepared incoming cold migration");
    Ok(pb::PrepareColdMigrationResponse {
        quic_addr: ctx.cfg.quic_listen.to_string(),
        token: inc.token.clone(),
        target_host: host,
        images: plans,
    })
}

/// Parses the request's images and maps each name into this host's storage roots (an
/// existing file of that name if there is one, else under the first root); the VM's disks
/// must all be among them.
fn parse_images(
    storage: &StorageRoots,
    host: &str,
    images: &[pb::ColdImage],
    spec: &VmSpec,
) -> Result<Vec<Wanted>, Status> {
    if storage.roots().is_empty() && !images.is_empty() {
        return Err(Status::failed_precondition(format!(
            "host {host} has no storage_roots configured, so it cannot receive the images of VM '{}'",
            spec.name
        )));
    }
    let mut out: Vec<Wanted> = Vec::with_capacity(images.len());
    for i in images {
        let bad = |why: String| Status::invalid_argument(format!("image {:?}: {why}", i.path));
        let name = PathBuf::from(&i.path);
        if out.iter().any(|w| w.name == name) {
            return Err(bad("listed twice".into()));
        }
        let candidates = storage.candidates(&name).map_err(|e| {
            Status::failed_precondition(format!(
                "host {host} refuses image {} of VM '{}': {e}",
                name.display(),
                spec.name
            ))
        })?;
        let resolved = candidates
            .iter()
            .find(|p| std::fs::symlink_metadata(p).is_ok())
            .unwrap_or(&candidates[0])
            .clone();
        let format: ImageFormat = i.format.parse().map_err(bad)?;
        if i.transfer_id.is_empty() || i.transfer_id.len() > 128 {
            return Err(bad("transfer_id must be 1 to 128 characters".into()));
        }
        let digest: Blake3Digest = i.blake3.parse().map_err(bad)?;
        // Lowest layer first: a backing layer is always listed before its overlay.
        let backing = if i.backing.is_empty() {
            None
        } else {
            let b = Path::new(&i.backing);
            Some(out.iter().position(|w| w.name == b).ok_or_else(|| {
                bad(format!(
                    "backing layer {:?} is not listed before it",
                    i.backing
                ))
            })?)
        };
        let disk_id = (!i.disk_id.is_empty()).then(|| i.disk_id.clone());
        if let Some(id) = &disk_id {
            if out.iter().any(|w| w.disk_id.as_ref() == Some(id)) {
                return Err(bad(format!("disk '{id}' has two top layers")));
            }
        }
        out.push(Wanted {
            name,
            resolved,
            format,
            disk_id,
            backing,
            length: i.length,
            digest,
            allocated: i.allocated_bytes,
            transfer_id: i.transfer_id.clone(),
        });
    }
    for d in &spec.disks {
        let top = out
            .iter()
            .find(|w| w.disk_id.as_deref() == Some(&d.id))
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "disk '{}' ({}) of VM '{}' is not among the images sent",
                    d.id,
                    d.path.display(),
                    spec.name
                ))
            })?;
        if super::disks::image_format(d.format) != top.format {
            return Err(Status::invalid_argument(format!(
                "disk '{}' of VM '{}' is {} but its image was sent as {}",
                d.id,
                spec.name,
                super::disks::image_format(d.format),
                top.format
            )));
        }
    }
    Ok(out)
}

/// The checks of [`prepare`], none of which writes anything: files already there
/// (identical: skipped; different: refused), free space for what is missing.
fn plan_images(host: &str, vm: &str, wanted: Vec<Wanted>) -> Result<Vec<Planned>, Status> {
    // Bytes still to be allocated, per filesystem (device id, a directory on it).
    let mut need: Vec<(u64, PathBuf, u64)> = Vec::new();
    let mut out = Vec::with_capacity(wanted.len());
    for w in wanted {
        let resolved = w.resolved.clone();
        let present = match std::fs::symlink_metadata(&resolved) {
            Ok(meta) => {
                let clash = || {
                    Status::already_exists(format!(
                        "image {} already exists on host {host} with different content: ferry does not overwrite it (remove it there, or rename the image)",
                        resolved.display()
                    ))
                };
                if !meta.is_file() || meta.len() != w.length {
                    return Err(clash());
                }
                let digest = ferry_disk::file_blake3(&resolved)
                    .map_err(|e| Status::internal(format!("host {host}: {e}")))?;
                if digest != w.digest {
                    return Err(clash());
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let part = append_suffix(&resolved, ferry_disk::receive::PART_SUFFIX);
                // A part file of an earlier attempt already holds (some of) the blocks.
                let have = std::fs::symlink_metadata(&part)
                    .map(|m| m.blocks().saturating_mul(512))
                    .unwrap_or(0);
                let dir = ferry_disk::space::existing_ancestor(&resolved);
                let dev = std::fs::metadata(&dir).map(|m| m.dev()).map_err(|e| {
                    Status::internal(format!("host {host}: stat {}: {e}", dir.display()))
                })?;
                let bytes = w.allocated.saturating_sub(have);
                match need.iter_mut().find(|(d, _, _)| *d == dev) {
                    Some(n) => n.2 += bytes,
                    None => need.push((dev, dir, bytes)),
                }
                false
            }
            Err(e) => {
                return Err(Status::internal(format!(
                    "host {host}: stat {}: {e}",
                    resolved.display()
                )))
            }
        };
        out.push(Planned { wanted: w, present });
    }
    for (_, dir, bytes) in &need {
        ferry_disk::ensure_space(dir, *bytes, &format!("the images of VM '{vm}'")).map_err(
            |e| Status::resource_exhausted(format!("host {host} refuses VM '{vm}': {e}")),
        )?;
    }
    Ok(out)
}

/// Opens a partial image for every missing file. On failure, undoes what it did: new part
/// files and directories go, resumed part files stay.
fn open_images(planned: Vec<Planned>) -> Result<Vec<TargetImage>, Status> {
    let mut made_dirs: Vec<PathBuf> = Vec::new();
    let mut out: Vec<TargetImage> = Vec::with_capacity(planned.len());
    let undo = |out: Vec<TargetImage>, made_dirs: &[PathBuf]| {
        for img in out {
            if let Some(p) = img.slot.into_inner() {
                if !p.resumed() {
                    let _ = p.abandon();
                }
            }
        }
        for d in made_dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    };
    for p in planned {
        let w = &p.wanted;
        let slot = if p.present {
            None
        } else {
            if let Err(e) = create_parents(&w.resolved, &mut made_dirs) {
                undo(out, &made_dirs);
                return Err(Status::internal(format!(
                    "creating the directory of {}: {e}",
                    w.resolved.display()
                )));
            }
            match PartialImage::open_or_resume(&w.resolved, w.length, &w.transfer_id) {
                Ok(img) => Some(img),
                Err(e) => {
                    undo(out, &made_dirs);
                    return Err(match e {
                        DiskError::Busy { .. } => Status::aborted(e.to_string()),
                        DiskError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
                        e => Status::internal(e.to_string()),
                    });
                }
            }
        };
        let resume_offset = slot.as_ref().map(|s| s.resume_offset()).unwrap_or(w.length);
        out.push(TargetImage {
            path: w.resolved.clone(),
            length: w.length,
            digest: w.digest,
            transfer_id: w.transfer_id.clone(),
            resume_offset,
            slot: tokio::sync::Mutex::new(slot),
            done: AtomicBool::new(p.present),
            format: w.format,
            backing: w.backing,
            received: !p.present,
        });
    }
    Ok(out)
}

/// `path` with `suffix` appended to its file name.
fn append_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Creates the missing parent directories of `path`, noting each one made.
fn create_parents(path: &Path, made: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    let mut missing: Vec<&Path> = parent.ancestors().take_while(|a| !a.exists()).collect();
    missing.reverse();
    for d in missing {
        std::fs::create_dir(d)?;
        made.push(d.to_path_buf());
    }
    Ok(())
}

/// A migration whose source went quiet (never connected, or never called Finish) gives
/// up by itself, keeping its partial images.
fn spawn_watchdog(inc: Arc<ColdIncoming>, idle: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = inc.cancel.cancelled() => return,
            }
            if inc.busy.load(Ordering::Acquire) == 0 && inc.idle_for() > idle {
                let why = format!(
                    "no word from the source {} for {} s",
                    inc.source_host,
                    idle.as_secs()
                );
                let _ = inc.abort(&why, true, false).await;
                return;
            }
        }
    });
}

/// Target: serves a QUIC connection whose first stream is the unidirectional `first`
/// (a cold migration's disk images): every stream is one image, authenticated by its
/// first frame.
pub async fn serve_disk_streams(
    registry: Arc<ColdRegistry>,
    conn: quinn::Connection,
    first: quinn::RecvStream,
) {
    let remote = conn.remote_address();
    let mut next = Some(first);
    loop {
        let recv = match next.take() {
            Some(r) => r,
            None => match conn.accept_uni().await {
                Ok(r) => r,
                // The source closes the connection once it has sent everything.
                Err(_) => return,
            },
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_image_stream(&registry, recv).await {
                warn!(%remote, "disk-image stream: {e}");
            }
        });
    }
}

async fn serve_image_stream(
    registry: &ColdRegistry,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    let header = tokio::time::timeout(STREAM_HELLO_TIMEOUT, read_stream_header(&mut recv))
        .await
        .map_err(|_| "no stream header within 10 s".to_string())?
        .map_err(|e| format!("stream header: {e}"))?;
    let mut reader = FrameReader::new(recv);
    if header.kind != StreamKind::DiskImage {
        reader.stop();
        return Err(format!(
            "unexpected {:?} stream on a disk-image connection",
            header.kind
        ));
    }
    let begin = tokio::time::timeout(STREAM_HELLO_TIMEOUT, reader.next()).await;
    let Ok(Ok(Some(Frame::Control(ControlMessage::DiskImageBegin {
        migration_id,
        token,
        index,
        offset,
    })))) = begin
    else {
        reader.stop();
        return Err("the stream did not start with DiskImageBegin".into());
    };
    let inc = match registry.lookup(&migration_id) {
        Some(inc) if inc.token == token => inc,
        Some(_) => {
            reader.stop();
            return Err(format!("wrong token for cold migration {migration_id}"));
        }
        None => {
            reader.stop();
            return Err(format!("unknown cold migration {migration_id}"));
        }
    };
    let index = index as usize;
    if index != usize::from(header.index) || index >= inc.images.len() {
        reader.stop();
        return Err(format!("migration {migration_id}: no image {index}"));
    }
    if let Err(e) = inc.receive(index, offset, reader).await {
        // The source learns the reason from its Abort call.
        let _ = inc.abort(&e, true, false).await;
        return Err(format!("migration {migration_id}: {e}"));
    }
    Ok(())
}

/// Target: defines the VM once every image is here and verified; starts it if asked.
/// Repeating the call after success returns the same answer.
pub async fn finish(
    ctx: &Arc<AgentCtx>,
    req: pb::FinishColdMigrationRequest,
) -> Result<pb::FinishColdMigrationResponse, Status> {
    let host = &ctx.cfg.host_name;
    let inc = ctx
        .incoming
        .cold()
        .lookup(&req.migration_id)
        .ok_or_else(|| {
            Status::not_found(format!(
                "no cold migration {} on host {host}: it was aborted or never prepared",
                req.migration_id
            ))
        })?;
    if inc.token != req.token {
        return Err(Status::permission_denied("wrong migration token"));
    }
    let _busy = Busy::new(&inc);
    let gave_up = |reason: &str| {
        Status::aborted(format!(
            "host {host} gave up on migration {}: {reason}",
            inc.id
        ))
    };
    let mut changes = inc.version.subscribe();
    let deadline = tokio::time::Instant::now() + FINISH_WAIT;
    loop {
        match &*inc.state.lock().await {
            TargetState::Finished(r) => return Ok((**r).clone()),
            TargetState::Failed { reason, .. } => return Err(gave_up(reason)),
            TargetState::Receiving => {}
        }
        if inc.images.iter().all(|i| i.done.load(Ordering::Acquire)) {
            break;
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            let missing: Vec<String> = inc
                .images
                .iter()
                .filter(|i| !i.done.load(Ordering::Acquire))
                .map(|i| i.path.display().to_string())
                .collect();
            return Err(Status::deadline_exceeded(format!(
                "host {host}: images not complete after {} s: {}",
                FINISH_WAIT.as_secs(),
                missing.join(", ")
            )));
        }
    }
    // The state lock keeps an Abort out while the VM becomes ours.
    let mut st = inc.state.lock().await;
    match &*st {
        TargetState::Finished(r) => return Ok((**r).clone()),
        TargetState::Failed { reason, .. } => return Err(gave_up(reason)),
        TargetState::Receiving => {}
    }
    // The chain moved between storage roots: each received overlay must name this host's
    // copy of its backing layer before QEMU (or the define's checks) opens it.
    let inc2 = inc.clone();
    tokio::task::spawn_blocking(move || point_backing_references(&inc2.images))
        .await
        .map_err(|e| Status::internal(format!("rebasing images: {e}")))?
        .map_err(|e| Status::internal(format!("host {host}: {e}")))?;
    let defined = ctx.vms.commit_offline(&inc.spec.name, &inc.id).await?;
    let resp = if req.start {
        match ctx.vms.start(&inc.spec.name).await {
            Ok(vm) => pb::FinishColdMigrationResponse {
                vm: Some(vm),
                start_error: String::new(),
            },
            Err(e) => pb::FinishColdMigrationResponse {
                vm: Some(defined),
                start_error: e.message().to_string(),
            },
        }
    } else {
        pb::FinishColdMigrationResponse {
            vm: Some(defined),
            start_error: String::new(),
        }
    };
    *st = TargetState::Finished(Box::new(resp.clone()));
    drop(st);
    inc.cancel.cancel();
    inc.bump();
    forget_later(inc.clone());
    ctx.metrics
        .migrations
        .with_label_values(&["target", "committed"])
        .inc();
    info!(migration = %inc.id, vm = %inc.spec.name, source = %inc.source_host, started = req.start, "cold migration finished: VM defined here");
    Ok(resp)
}

/// Points the backing reference of every received overlay at this host's copy of the
/// layer below (`qemu-img rebase -u`, header only); images that were already here are
/// left as they are.
fn point_backing_references(images: &[TargetImage]) -> Result<(), String> {
    for img in images.iter().filter(|i| i.received) {
        let Some(below) = img.backing.and_then(|b| images.get(b)) else {
            continue;
        };
        let changed =
            ferry_disk::image::point_backing_at(&img.path, img.format, &below.path, below.format)
                .map_err(|e| format!("pointing {} at its backing file: {e}", img.path.display()))?;
        if changed {
            info!(image = %img.path.display(), backing = %below.path.display(), "backing reference rebased");
        }
    }
    Ok(())
}

/// Target: gives up on a cold migration at the source's request. Partial images stay for
/// a resume unless `discard`. Refused (reported as `finished`) once the VM is defined here.
pub async fn abort(
    ctx: &Arc<AgentCtx>,
    req: pb::AbortColdMigrationRequest,
) -> Result<pb::AbortColdMigrationResponse, Status> {
    let Some(inc) = ctx.incoming.cold().lookup(&req.migration_id) else {
        return Ok(pb::AbortColdMigrationResponse {
            existed: false,
            ..Default::default()
        });
    };
    if inc.token != req.token {
        return Err(Status::permission_denied("wrong migration token"));
    }
    let reason = if req.reason.is_empty() {
        "aborted by the source".to_string()
    } else {
        req.reason.clone()
    };
    let resp = match inc.abort(&reason, false, req.discard).await {
        Aborted::Now => pb::AbortColdMigrationResponse {
            existed: true,
            ..Default::default()
        },
        Aborted::Before { reason, by_target } => pb::AbortColdMigrationResponse {
            existed: true,
            finished: false,
            error: if by_target { reason } else { String::new() },
        },
        Aborted::Finished => pb::AbortColdMigrationResponse {
            existed: true,
            finished: true,
            error: String::new(),
        },
    };
    info!(migration = %inc.id, host = %ctx.cfg.host_name, finished = resp.finished, "abort of cold migration requested: {reason}");
    Ok(resp)
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

    #[test]
    fn parents_are_created_and_listed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("a/b/img.qcow2");
        let mut made = Vec::new();
        create_parents(&target, &mut made).expect("create");
        assert_eq!(made, vec![dir.path().join("a"), dir.path().join("a/b")]);
        assert_eq!(
            ferry_disk::space::existing_ancestor(&dir.path().join("a/b/c/d.img")),
            dir.path().join("a/b")
        );
        assert_eq!(
            append_suffix(&target, ".ferry-part"),
            dir.path().join("a/b/img.qcow2.ferry-part")
        );
    }
}
