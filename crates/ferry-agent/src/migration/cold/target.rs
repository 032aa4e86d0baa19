//! The target side of a cold migration: prepare, receive the image streams, finish
//! (define the VM), abort.

use super::*;
use crate::vms::VmManager;
use crate::AgentCtx;
use ferry_api::v1 as pb;
use ferry_disk::{Blake3Digest, DiskError, ImageFormat, PartialImage, StorageRoots};
use ferry_qemu::VmSpec;
use ferry_transport::PeerIdentity;
use ferry_transport::{read_stream_header, FrameReader};
use ferry_wire::{ControlMessage, Frame, StreamKind};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{info, warn};

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
    /// The file this migration received and renamed into place (not one already present):
    /// an operator's cancel removes it while its path still names it alone.
    placed: std::sync::Mutex<Option<ferry_disk::FileId>>,
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
    /// The agent's state directory (failpoints' release file).
    state_dir: PathBuf,
    /// Where the images it placed are journaled ([`ColdIncoming::journal_placed`]).
    journal: Arc<crate::journal::Journal>,
    /// Serialises the rewrites of that record (streams place images concurrently); `None`
    /// where nothing expires (`partial_keep_s = 0`): nothing is journaled either.
    placed_journal: Option<std::sync::Mutex<()>>,
}

/// This agent's incoming cold migrations (owned by the `IncomingRegistry`), and the
/// image paths of Prepares not registered yet (they may adopt what is already there).
#[derive(Default)]
pub struct ColdRegistry(
    std::sync::Mutex<HashMap<String, Arc<ColdIncoming>>>,
    std::sync::Mutex<HashMap<String, Vec<PathBuf>>>,
);

/// A Prepare's claim on the image paths it plans (see [`ColdRegistry::claimed_images`]),
/// dropped when the Prepare returns (by then the migration is registered, or nothing).
struct PrepareClaim<'a>(&'a ColdRegistry, String);

impl<'a> PrepareClaim<'a> {
    fn new(registry: &'a ColdRegistry, id: &str, paths: Vec<PathBuf>) -> Self {
        if let Ok(mut c) = registry.1.lock() {
            c.insert(id.to_string(), paths);
        }
        PrepareClaim(registry, id.to_string())
    }
}

impl Drop for PrepareClaim<'_> {
    fn drop(&mut self) {
        if let Ok(mut c) = self.0 .1.lock() {
            c.remove(&self.1);
        }
    }
}

impl ColdRegistry {
    fn lookup(&self, id: &str) -> Option<Arc<ColdIncoming>> {
        self.0.lock().ok()?.get(id).cloned()
    }

    /// The final paths of every image an incoming migration of this host names —
    /// receiving it, having adopted it as already here, or finished or failed not long ago
    /// — and those of Prepares still planning: none of them may expire
    /// ([`super::kept`]).
    pub fn claimed_images(&self) -> std::collections::HashSet<PathBuf> {
        let mut paths = std::collections::HashSet::new();
        if let Ok(m) = self.0.lock() {
            for inc in m.values() {
                paths.extend(inc.images.iter().map(|i| i.path.clone()));
            }
        }
        if let Ok(c) = self.1.lock() {
            paths.extend(c.values().flatten().cloned());
        }
        paths
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

    /// Journals the images this migration has placed and not removed (backing layers
    /// left out: see [`crate::journal::ColdPlacedRecord`]), so that a copy that never
    /// finishes leaves nothing behind for good ([`super::kept`]). Nothing placed: the
    /// record goes.
    fn journal_placed(&self) {
        let Some(Ok(_one_at_a_time)) = self.placed_journal.as_ref().map(|m| m.lock()) else {
            return;
        };
        let placed = self
            .images
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.images.iter().any(|o| o.backing == Some(*i)))
            .filter_map(|(_, img)| {
                let id = img.placed.lock().ok().and_then(|p| *p)?;
                Some((img.path.clone(), id))
            })
            .collect();
        let rec = crate::journal::ColdPlacedRecord {
            id: self.id.clone(),
            vm: self.spec.name.clone(),
            source: self.source_host.clone(),
            placed,
            updated_ms: 0,
        };
        if let Err(e) = self.journal.put_cold_placed(&rec) {
            warn!(migration = %self.id, "journal: the images this migration placed: {e}");
        }
    }

    /// Takes the ids of the files this migration placed afresh (same device and inode,
    /// a new change time after `qemu-img rebase -u`) and journals them.
    fn refresh_placed(&self) {
        for img in &self.images {
            let Ok(mut placed) = img.placed.lock() else {
                continue;
            };
            let Some(id) = *placed else { continue };
            if let Ok(m) = std::fs::symlink_metadata(&img.path) {
                let now = ferry_disk::FileId::of(&m);
                if (now.dev, now.ino) == (id.dev, id.ino) {
                    *placed = Some(now);
                }
            }
        }
        self.journal_placed();
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
                        self.remove_placed().await;
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
        // What it placed is kept for a resume from now: its age starts again.
        self.journal_placed();
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
        if discard {
            self.remove_placed().await;
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

    /// Removes the images this migration received whole and renamed into place (a cancel
    /// after some finished): each only while its path still names that very file alone
    /// and no other VM of this host has it as a disk. Images that were here before stay,
    /// and so do backing layers: another VM's overlay may have been made on one meanwhile
    /// (adopted by a later migration), and no VM's disk names a layer below it.
    async fn remove_placed(&self) {
        // Read once, and only if something is to go (one `qemu-img info` per layer).
        let mut layers = self.vms.layers();
        for (i, img) in self.images.iter().enumerate() {
            if self.images.iter().any(|o| o.backing == Some(i)) {
                continue;
            }
            let Some(id) = img.placed.lock().ok().and_then(|p| *p) else {
                continue;
            };
            match layers.holds(&img.path).await {
                Ok(true) => {
                    warn!(migration = %self.id, image = %img.path.display(), "an image this cancelled migration received is a layer below a VM's disk now: left to it");
                    continue;
                }
                Err(e) => {
                    // Kept: a cancel asked again tries again.
                    warn!(migration = %self.id, image = %img.path.display(), "cancelled, the image it had received is kept: a VM's backing chain could not be read: {e}");
                    continue;
                }
                Ok(false) => {}
            }
            match self
                .vms
                .remove_unless_a_disk(&img.path, id, Some(&self.id))
                .await
            {
                Ok(crate::vms::Removal::Removed) => {
                    info!(migration = %self.id, image = %img.path.display(), "cancelled: the image it had received is removed")
                }
                Ok(crate::vms::Removal::ADisk) => {
                    warn!(migration = %self.id, image = %img.path.display(), "an image this cancelled migration received is a VM's disk now: left to it");
                    continue;
                }
                Ok(crate::vms::Removal::NotThatFile) => {
                    info!(migration = %self.id, image = %img.path.display(), "cancelled: the image it had received is gone, or was replaced or linked since; left as it is")
                }
                Err(e) => {
                    // Kept: a cancel asked again tries again.
                    warn!(migration = %self.id, image = %img.path.display(), "cancelled, removing the image it had received: {e}");
                    continue;
                }
            }
            if let Ok(mut p) = img.placed.lock() {
                p.take();
            }
        }
        self.journal_placed();
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
                    // Only hang here (storage that stops answering; an abort still ends it).
                    tokio::select! {
                        _ = crate::failpoint::hit("cold.tgt.chunk.written", &self.state_dir) => {}
                        _ = self.cancel.cancelled() => break Err("the migration was aborted".into()),
                    }
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
                    let finish = move || p.finish_placed(digest).map(|(_, id)| id);
                    match tokio::task::spawn_blocking(finish).await {
                        Ok(Ok(id)) => {
                            if let Ok(mut placed) = img.placed.lock() {
                                *placed = Some(id);
                            }
                            self.journal_placed();
                            break Ok(());
                        }
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
    caller: &PeerIdentity,
) -> Result<pb::PrepareColdMigrationResponse, Status> {
    let host = ctx.cfg.host_name.clone();
    // The source is who its certificate says, whatever the request claims.
    crate::access::claimed_source(&req.source_host, caller, &host, "PrepareColdMigration")?;
    let mut req = req;
    req.source_host = caller.name.clone();
    let spec = crate::migration::check_prepare(
        &host,
        req.protocol_version,
        &req.migration_id,
        req.spec.as_ref(),
    )?;
    let registry = ctx.incoming.cold();
    let journaled = ctx
        .journal
        .migration(&req.migration_id)
        .map_err(|e| Status::unavailable(format!("host {host}: journal: {e}")))?;
    if registry.lookup(&req.migration_id).is_some() || journaled.is_some() {
        return Err(Status::already_exists(format!(
            "cold migration {} is already known on {host}",
            req.migration_id
        )));
    }
    let wanted = parse_images(&ctx.storage, &host, &req.images, &spec)?;
    let _claim = PrepareClaim::new(
        &registry,
        &req.migration_id,
        wanted.iter().map(|w| w.resolved.clone()).collect(),
    );
    // The VM is defined here with this host's paths for its disks.
    let mut spec = spec;
    for d in spec.disks.iter_mut() {
        if let Some(w) = wanted.iter().find(|w| w.disk_id.as_deref() == Some(&d.id)) {
            d.path = w.resolved.clone();
        }
    }
    ctx.vms.check_spec_paths(&spec)?;
    ctx.vms.check_disks_unclaimed(&spec).await?;

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

    // Cold copies in progress count against the same limit as live ones (finished and
    // failed ones linger as tombstones, their cancel token fired).
    let receiving = registry
        .0
        .lock()
        .map(|m| m.values().filter(|i| !i.cancel.is_cancelled()).count())
        .unwrap_or(0);
    let limit = ctx.cfg.migration.max_incoming;
    if receiving >= limit {
        return Err(Status::resource_exhausted(format!(
            "host {host} already receives {receiving} cold migration(s) (migration.max_incoming = {limit}): try again when one has ended"
        )));
    }
    // A cold copy arrives stopped: its RAM is admitted when it starts.
    ctx.vms
        .reserve_incoming(&spec, &req.migration_id, false)
        .await?;
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
        state_dir: ctx.cfg.state_dir.clone(),
        images,
        state: tokio::sync::Mutex::new(TargetState::Receiving),
        cancel: CancellationToken::new(),
        version,
        last_activity: std::sync::Mutex::new(Instant::now()),
        busy: AtomicUsize::new(0),
        vms: ctx.vms.clone(),
        metrics: ctx.metrics.clone(),
        registry: registry.clone(),
        journal: ctx.journal.clone(),
        placed_journal: (ctx.cfg.migration.partial_keep_s > 0).then(|| std::sync::Mutex::new(())),
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
        if crate::migration::disks::image_format(d.format) != top.format {
            return Err(Status::invalid_argument(format!(
                "disk '{}' of VM '{}' is {} but its image was sent as {}",
                d.id,
                spec.name,
                crate::migration::disks::image_format(d.format),
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
                // A file with other names is not adopted: it may be a live migration's
                // copy that its staging name still claims (removed if that never commits).
                if meta.nlink() > 1 {
                    return Err(Status::already_exists(format!(
                        "image {} already exists on host {host} with {} names (hard links): ferry does not adopt a file it cannot be sure is unshared (remove it there, or rename the image)",
                        resolved.display(),
                        meta.nlink()
                    )));
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
            placed: std::sync::Mutex::new(None),
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
    peer: PeerIdentity,
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
        let (registry, peer) = (registry.clone(), peer.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_image_stream(&registry, recv, &peer).await {
                warn!(%remote, "disk-image stream: {e}");
            }
        });
    }
}

async fn serve_image_stream(
    registry: &ColdRegistry,
    mut recv: quinn::RecvStream,
    peer: &PeerIdentity,
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
        Some(inc) if inc.source_host != peer.name => {
            reader.stop();
            return Err(format!(
                "cold migration {migration_id} was prepared by agent {}, not by agent {}",
                inc.source_host, peer.name
            ));
        }
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
    caller: &PeerIdentity,
) -> Result<pb::FinishColdMigrationResponse, Status> {
    let host = &ctx.cfg.host_name;
    let Some(inc) = ctx.incoming.cold().lookup(&req.migration_id) else {
        // Forgotten since (a restart, or long ago): the journal says if it was defined here.
        if let Some(rec) = journaled_as_defined(ctx, &req.migration_id, &req.token, caller)? {
            return Ok(pb::FinishColdMigrationResponse {
                vm: ctx.vms.get(&rec.vm).await.ok(),
                start_error: String::new(),
            });
        }
        return Err(Status::not_found(format!(
            "no cold migration {} on host {host}: it was aborted or never prepared",
            req.migration_id
        )));
    };
    crate::access::same_peer(&inc.source_host, caller, host, &inc.id)?;
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
    // copy of its backing layer before QEMU (or the define's checks) opens it. Then every
    // received image is checked as QEMU would open it (format pinned): a backing file the
    // source did not declare, outside the roots, not a regular file, or a `json:`/protocol
    // name refuses the migration, and the received images are removed.
    let (inc2, storage) = (inc.clone(), ctx.storage.clone());
    let checked = tokio::task::spawn_blocking(move || {
        point_backing_references(&inc2.images)?;
        check_arrived(&inc2.images, &storage)
    })
    .await
    .map_err(|e| Status::internal(format!("checking images: {e}")))?;
    // The rebase rewrote received overlays' headers (a new change time): the files placed
    // are still these, and must still be recognised as the copy's.
    inc.refresh_placed();
    if let Err(why) = checked {
        drop(st);
        for img in inc.images.iter().filter(|i| i.received) {
            let _ = std::fs::remove_file(&img.path);
        }
        let reason = format!(
            "host {host} refuses the images of VM '{}': {why}",
            inc.spec.name
        );
        let _ = inc.abort(&reason, true, true).await;
        return Err(Status::permission_denied(reason));
    }
    // The outcome is journaled with the VM: a source that loses this call's answer (or
    // restarts) asks, and learns the VM is here even after this agent restarts.
    let mut outcome = crate::journal::MigrationRecord::new(
        &inc.id,
        crate::journal::Role::Target,
        &inc.spec.name,
        &inc.source_host,
        "owned",
    );
    outcome.receiver = Some(ferry_handoff::Receiver::Owned);
    outcome.token = Some(inc.token.clone());
    outcome.keep_until_ms = crate::migration::now_ms() + crate::journal::COLD_OUTCOME_KEPT_MS;
    let defined = ctx
        .vms
        .commit_offline(&inc.spec.name, &inc.id, outcome)
        .await?;
    // Its VM's disks now: nothing for the expiry of unused placed images to look at. (A
    // crash before this line leaves the record; the expiry finds the images in use.)
    if let Err(e) = ctx.journal.remove_cold_placed(&inc.id) {
        warn!(migration = %inc.id, "journal: {e}");
    }
    // Only exit/hang here: the VM is defined; nothing may turn that into an error.
    let _ = crate::failpoint::hit("cold.tgt.finish.committed", &ctx.cfg.state_dir).await;
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

/// Every received image as QEMU will open it: format pinned, and its backing reference
/// (after [`point_backing_references`]) exactly the declared layer below, a regular file
/// inside the storage roots.
fn check_arrived(images: &[TargetImage], storage: &StorageRoots) -> Result<(), String> {
    for img in images.iter().filter(|i| i.received) {
        let what = |why: String| format!("image {}: {why}", img.path.display());
        let reference = ferry_disk::image::backing_reference(&img.path, img.format)
            .map_err(|e| what(e.to_string()))?;
        let below = img.backing.and_then(|b| images.get(b));
        match (reference, below) {
            (None, None) => {}
            (Some(r), None) => {
                return Err(what(format!(
                    "it names backing file {:?}, which the source did not declare",
                    r.name
                )))
            }
            (None, Some(b)) => {
                return Err(what(format!(
                    "it does not reference its declared backing layer {}",
                    b.path.display()
                )))
            }
            (Some(r), Some(b)) => {
                let to = ferry_disk::image::resolve_reference(&img.path, &r.name);
                let resolved =
                    crate::migration::disks::confined_backing(storage, &to).map_err(what)?;
                if resolved != b.path {
                    return Err(what(format!(
                        "its backing file {} is not the declared layer {}",
                        resolved.display(),
                        b.path.display()
                    )));
                }
                if r.format != Some(b.format) {
                    return Err(what(format!(
                        "its backing format is {:?}, not the declared {}",
                        r.format, b.format
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Target: gives up on a cold migration at the source's request. Partial images stay for
/// a resume unless `discard`. Refused (reported as `finished`) once the VM is defined here.
pub async fn abort(
    ctx: &Arc<AgentCtx>,
    req: pb::AbortColdMigrationRequest,
    caller: &PeerIdentity,
) -> Result<pb::AbortColdMigrationResponse, Status> {
    if req.taken_back {
        return taken_back(ctx, req, caller).await;
    }
    let Some(inc) = ctx.incoming.cold().lookup(&req.migration_id) else {
        // Forgotten since: if the journal says the VM was defined here, it is too late.
        let finished = journaled_as_defined(ctx, &req.migration_id, &req.token, caller)?.is_some();
        return Ok(pb::AbortColdMigrationResponse {
            existed: finished,
            finished,
            ..Default::default()
        });
    };
    crate::access::same_peer(&inc.source_host, caller, &ctx.cfg.host_name, &inc.id)?;
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

/// The source took the VM back on its operator's verdict (this host, declared gone for
/// good, did not answer): a migration still receiving is aborted (its images discarded);
/// a definition it made here goes if the VM has not started since
/// ([`super::cold_taken_back`]; the images stay) — else FAILED_PRECONDITION (the VM is
/// defined on two hosts, logged as an error), or UNAVAILABLE while the VM is busy.
async fn taken_back(
    ctx: &Arc<AgentCtx>,
    req: pb::AbortColdMigrationRequest,
    caller: &PeerIdentity,
) -> Result<pb::AbortColdMigrationResponse, Status> {
    let host = &ctx.cfg.host_name;
    let id = &req.migration_id;
    let _ = crate::failpoint::hit("cold.tgt.taken_back.heard", &ctx.cfg.state_dir).await;
    let inc = ctx.incoming.cold().lookup(id);
    if let Some(inc) = &inc {
        crate::access::same_peer(&inc.source_host, caller, host, &inc.id)?;
        if inc.token != req.token {
            return Err(Status::permission_denied("wrong migration token"));
        }
        let reason = "the source took the VM back on its operator's verdict";
        if !matches!(inc.abort(reason, false, true).await, Aborted::Finished) {
            return Ok(pb::AbortColdMigrationResponse {
                existed: true,
                ..Default::default()
            });
        }
    }
    let Some(mut rec) = journaled_as_defined(ctx, id, &req.token, caller)? else {
        if let Some(vm) = ctx.vms.arrived_by(id).await {
            // Its record pruned (kept 30 days): the caller cannot be checked against it,
            // so nothing is removed — but the source must not take this for "nothing here".
            let msg = format!(
                "VM '{vm}' on host {host} was defined by migration {id}, whose record here is gone (pruned): it stays, and it is defined on two hosts; remove one"
            );
            tracing::error!(migration = %id, "{msg}");
            return Err(Status::failed_precondition(msg));
        }
        // Aborted here, never known, or taken back already.
        return Ok(pb::AbortColdMigrationResponse {
            existed: inc.is_some(),
            ..Default::default()
        });
    };
    let vm = rec.vm.clone();
    rec.receiver = Some(ferry_handoff::Receiver::Aborted);
    rec.state = "taken back by the source".into();
    match ctx.vms.undo_cold_arrival(&vm, id, rec).await? {
        ColdTakenBack::Undefine => {
            if let Some(inc) = &inc {
                // A repeated Finish must not answer that the VM is here.
                *inc.state.lock().await = TargetState::Failed {
                    reason: "the source took the VM back on its operator's verdict".into(),
                    by_target: false,
                };
            }
            warn!(migration = %id, %vm, "the source took VM '{vm}' back on its operator's verdict: its definition here, never started, is removed (its image files stay)");
        }
        ColdTakenBack::NothingHere => {
            info!(migration = %id, %vm, "the source took VM '{vm}' back; no VM of that name is left here");
            return Ok(pb::AbortColdMigrationResponse::default());
        }
        ColdTakenBack::Busy => {
            return Err(Status::unavailable(format!(
                "VM '{vm}' on host {host} is busy (a migration of it under way): tell again"
            )))
        }
        ColdTakenBack::Stays => {
            let msg = format!(
                "VM '{vm}' on host {host} has started since migration {id} defined it (or the name is another VM's now): it stays, and it is defined on two hosts; remove one"
            );
            tracing::error!(migration = %id, "{msg}");
            return Err(Status::failed_precondition(msg));
        }
    }
    Ok(pb::AbortColdMigrationResponse {
        existed: true,
        ..Default::default()
    })
}

/// The record of cold migration `id` if this host's journal says it defined its VM here
/// (the record [`finish`] writes with the VM), for a caller that is the migration's source
/// and holds its token. A journal that cannot be read is an error: the answer must not
/// say "unknown here" when it may be "defined here".
fn journaled_as_defined(
    ctx: &Arc<AgentCtx>,
    id: &str,
    token: &str,
    caller: &PeerIdentity,
) -> Result<Option<crate::journal::MigrationRecord>, Status> {
    let host = &ctx.cfg.host_name;
    let rec = ctx
        .journal
        .migration(id)
        .map_err(|e| Status::unavailable(format!("host {host}: journal: {e}")))?;
    let Some(rec) = rec.filter(|r| {
        r.role == crate::journal::Role::Target && r.receiver == Some(ferry_handoff::Receiver::Owned)
    }) else {
        return Ok(None);
    };
    crate::access::same_peer(&rec.peer, caller, host, id)?;
    if rec.token.as_deref() != Some(token) {
        return Err(Status::permission_denied("wrong migration token"));
    }
    Ok(Some(rec))
}

#[cfg(test)]
mod tests {
    use super::*;

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
