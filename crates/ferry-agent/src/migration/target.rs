//! The target side of a live migration: Prepare, the data plane of one migration,
//! Commit and Abort.
//!
//! A prepared migration owns a sparse RAM file and a paused QEMU (`-S -incoming defer`),
//! started while round 0 travels ([`IncomingQemu`]).
//! It is resumed only after COMMITTED is journaled; anything else (Abort, the source
//! vanishing, a bad frame, a timeout) removes the QEMU, the RAM file and every record.

use super::pages::{apply_page_stream, AppliedCounter};
use super::relay::relay_to_qemu;
use super::source::spawn_control_reader;
use crate::config::AgentConfig;
use crate::journal::{Journal, MigrationRecord, Op, Role};
use crate::vms::{prepare_dirs, remove_vm_files, FencedGuest, VmManager};
use ferry_api::v1 as pb;
use ferry_handoff::OnTakenBack;
use ferry_handoff::{decide_commit, Effect, Receiver, ReceiverEvent};
use ferry_memory::{PageSums, RamFile, PAGE_SIZE};
use ferry_qemu::{QemuProcess, VmSpec};
use ferry_transport::PeerIdentity;
use ferry_transport::{read_stream_header, ControlChannel, FrameReader};
use ferry_wire::{ControlMessage, Frame, StreamKind, PROTOCOL_VERSION};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch, Mutex};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{error, info, warn};

/// An incoming migration's ownership state ([`Receiver`], journaled before its effects)
/// and what the data plane has seen.
#[derive(Debug, Clone, Copy, PartialEq)]
struct State {
    recv: Receiver,
    /// The source's data plane connected (a second connection is refused).
    connected: bool,
    /// RESUME time (0: left paused) and when the VM became ours, Unix microseconds.
    resume_us: i64,
    ready_us: i64,
}

impl State {
    fn prepared() -> State {
        State {
            recv: Receiver::Prepared,
            connected: false,
            resume_us: 0,
            ready_us: 0,
        }
    }
}

/// The gRPC view of a receiver state.
fn incoming_state(r: Receiver) -> pb::IncomingState {
    match r {
        Receiver::Prepared => pb::IncomingState::Prepared,
        Receiver::Committed { .. } => pb::IncomingState::Settling,
        Receiver::Owned => pb::IncomingState::Committed,
        Receiver::Aborted => pb::IncomingState::Aborted,
    }
}

/// One prepared incoming migration.
pub struct Incoming {
    id: String,
    token: String,
    /// The agent that prepared it (its certificate's name): only it may connect,
    /// commit, abort or ask.
    peer: String,
    spec: VmSpec,
    /// The guest RAM file, mapped. Released once the migration ends (committed or
    /// aborted): kept, the mapping of a later-deleted file would pin its memory.
    ram: std::sync::Mutex<Option<Arc<RamFile>>>,
    /// The paused target QEMU, started while round 0 runs (see [`IncomingQemu`]).
    qemu: IncomingQemu,
    state: Mutex<State>,
    applied: Arc<AppliedCounter>,
    /// Set once the target QEMU finished (or failed) loading the device state.
    loaded: watch::Receiver<Option<Result<(), String>>>,
    cancel: CancellationToken,
    incoming_sock: PathBuf,
    /// Empty images made for disks that travel (removed if this does not commit).
    copies: Vec<PathBuf>,
    /// NBD server socket of the target QEMU and its exports, when disks travel.
    nbd: Option<(PathBuf, Vec<String>)>,
    /// Set once the final round's pages are written: the device state may load then.
    final_applied: watch::Sender<bool>,
    /// The fingerprint's per-page sums of everything written here.
    sums: Arc<PageSums>,
    /// Set once the whole RAM file is allocated (or could not be): the device state, the
    /// first thing to make QEMU touch guest RAM, waits for it.
    reserved: watch::Receiver<Option<Result<(), String>>>,
    /// This host's incoming slot, given back when the migration leaves the registry.
    slot: std::sync::Mutex<Option<super::SlotGuard>>,
}

impl Incoming {
    fn ram(&self) -> Option<Arc<RamFile>> {
        self.ram.lock().ok().and_then(|r| r.clone())
    }

    fn release_ram(&self) {
        if let Ok(mut r) = self.ram.lock() {
            r.take();
        }
    }
}

/// How long anything that needs the target QEMU waits for it to start: beyond QEMU's own
/// QMP connect limit (30 s), so a start that never connected has ended by then.
const QEMU_START_WAIT: Duration = Duration::from_secs(45);

/// The target QEMU of an incoming migration. QEMU is first needed for the device state at
/// the switchover, so Prepare answers before it runs and it starts while round 0 travels
/// (starting it was ~55 of Prepare's ~85 ms on wan); when disks travel it starts before
/// Prepare answers (the source's mirror needs its NBD exports). A QEMU that fails to start
/// ends the migration as soon as it fails: the source hears why on the control stream.
struct IncomingQemu {
    started: watch::Receiver<Option<Result<Arc<QemuProcess>, String>>>,
    /// The process as soon as it exists, before its QMP setup: a discard kills it at once.
    spawned: watch::Receiver<Option<Arc<QemuProcess>>>,
    /// Set when the migration is discarded: read once QEMU exists and when the start ends
    /// (either kills it); a discard kills a QEMU already published itself.
    discarded: Arc<AtomicBool>,
}

/// Given to a background start: publishes its QEMU the moment it exists.
struct SpawnHook {
    spawned: watch::Sender<Option<Arc<QemuProcess>>>,
    discarded: Arc<AtomicBool>,
}

impl SpawnHook {
    /// Publishes `proc`; false when the migration was discarded (the caller kills it).
    /// Published before the flag is read, and a discard sets the flag before it looks:
    /// one of the two always sees the other.
    fn spawned(&self, proc: &Arc<QemuProcess>) -> bool {
        self.spawned.send_replace(Some(proc.clone()));
        !self.discarded.load(AtomicOrdering::SeqCst)
    }
}

impl IncomingQemu {
    /// A QEMU already started.
    fn running(proc: Arc<QemuProcess>) -> Self {
        IncomingQemu {
            started: watch::channel(Some(Ok(proc.clone()))).1,
            spawned: watch::channel(Some(proc)).1,
            discarded: Arc::default(),
        }
    }

    /// Runs `start` in the background; its QEMU is killed if the migration is discarded
    /// before the start ends.
    fn start<F, Fut>(start: F) -> Self
    where
        F: FnOnce(SpawnHook) -> Fut,
        Fut: std::future::Future<Output = Result<Arc<QemuProcess>, String>> + Send + 'static,
    {
        let (tx, rx) = watch::channel(None);
        let (spawned_tx, spawned) = watch::channel(None);
        let discarded: Arc<AtomicBool> = Arc::default();
        let gone = discarded.clone();
        let fut = start(SpawnHook {
            spawned: spawned_tx,
            discarded: discarded.clone(),
        });
        tokio::spawn(async move {
            let r = match fut.await {
                Ok(p) if gone.load(AtomicOrdering::SeqCst) => {
                    let _ = p.kill().await;
                    Err("the migration was discarded while its QEMU started".to_string())
                }
                r => r,
            };
            let _ = tx.send(Some(r));
        });
        IncomingQemu {
            started: rx,
            spawned,
            discarded,
        }
    }

    /// The QEMU once started, or why it did not (bounded by [`QEMU_START_WAIT`]).
    async fn get(&self) -> Result<Arc<QemuProcess>, String> {
        let mut rx = self.started.clone();
        let waited = tokio::time::timeout(QEMU_START_WAIT, rx.wait_for(Option::is_some))
            .await
            .map(|r| r.map(|v| v.clone()));
        match waited {
            Ok(Ok(v)) => v.unwrap_or_else(|| Err("no target QEMU".to_string())),
            Ok(Err(_)) => Err("the target QEMU's start was lost".to_string()),
            Err(_) => Err(format!(
                "the target QEMU did not start within {} s",
                QEMU_START_WAIT.as_secs()
            )),
        }
    }

    /// Why the start failed, if it has.
    fn start_error(&self) -> Option<String> {
        match &*self.started.borrow() {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }

    /// Resolves with the start's error; never, once QEMU runs.
    async fn failure(&self) -> String {
        match self.get().await {
            Err(e) => e,
            Ok(_) => std::future::pending().await,
        }
    }

    /// For the discard: the QEMU to kill. One already spawned is returned at once (its
    /// setup then fails on QMP); before that, the start ends by killing what it spawns.
    async fn settle(&self) -> Option<Arc<QemuProcess>> {
        self.discarded.store(true, AtomicOrdering::SeqCst);
        if let Some(p) = self.spawned.borrow().clone() {
            return Some(p);
        }
        self.get().await.ok()
    }
}

/// How long a source's Hello waits for the Prepare of its migration to finish here (the
/// source sends it while Prepare runs, to save the data plane's opening round trips).
pub const HELLO_WAITS_FOR_PREPARE: Duration = Duration::from_secs(10);

/// A Prepare under way (see [`IncomingRegistry`]'s `pending`).
struct PendingPrepare {
    token: String,
    peer: String,
    abort_asked: bool,
}

/// Takes a Prepare out of `pending` however it ends.
struct PendingGuard<'a> {
    reg: &'a IncomingRegistry,
    id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.reg.pending.lock() {
            p.remove(&self.id);
        }
    }
}

/// Incoming migrations of this host.
pub struct IncomingRegistry {
    cfg: Arc<AgentConfig>,
    vms: Arc<VmManager>,
    journal: Arc<Journal>,
    qemu_version: String,
    metrics: Arc<crate::metrics::Metrics>,
    storage: Arc<ferry_disk::StorageRoots>,
    map: std::sync::Mutex<HashMap<String, Arc<Incoming>>>,
    /// Woken when a migration joins `map`: a source's Hello may arrive while its Prepare
    /// still runs here (the source opens the data plane meanwhile).
    prepared: tokio::sync::Notify,
    /// Prepares under way (not in `map` yet), with whether their source asked to abort
    /// meanwhile: such a Prepare discards what it made as soon as it can. Looked at and
    /// changed only with `map` locked too (lock `map` first), so that an abort finds a
    /// migration in one or the other.
    pending: std::sync::Mutex<HashMap<String, PendingPrepare>>,
    /// Slots of incoming live migrations (`max_incoming`).
    slots: Arc<super::Slots>,
    /// Incoming cold (offline) migrations: `migration/cold.rs`.
    cold: Arc<super::cold::ColdRegistry>,
    /// Migrations committed here before a restart and never resumed, waiting for their
    /// source's word ([`ferry_handoff::TargetAction::AwaitSource`]): where to tell it.
    awaiting: std::sync::Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<Heard>>>,
}

/// What a restarted target waiting for its source heard, and (for an Abort) where to say
/// how it was settled.
pub struct Heard {
    word: ferry_handoff::SourceWord,
    settled: tokio::sync::oneshot::Sender<Result<(), String>>,
}

impl IncomingRegistry {
    pub fn new(
        cfg: Arc<AgentConfig>,
        vms: Arc<VmManager>,
        journal: Arc<Journal>,
        qemu_version: String,
        metrics: Arc<crate::metrics::Metrics>,
        storage: Arc<ferry_disk::StorageRoots>,
    ) -> Arc<Self> {
        Arc::new(IncomingRegistry {
            cfg,
            vms,
            journal,
            qemu_version,
            metrics,
            storage,
            map: std::sync::Mutex::new(HashMap::new()),
            prepared: tokio::sync::Notify::new(),
            pending: std::sync::Mutex::default(),
            slots: Arc::default(),
            cold: Arc::default(),
            awaiting: std::sync::Mutex::default(),
        })
    }

    /// This agent's incoming cold migrations.
    pub fn cold(&self) -> Arc<super::cold::ColdRegistry> {
        self.cold.clone()
    }

    /// Shared-storage detection and room for disk copies (peer `CheckStorage`).
    pub fn check_storage(&self, req: &pb::CheckStorageRequest) -> pb::CheckStorageResponse {
        super::disks::check(&self.storage, self.host(), req)
    }

    fn get(&self, id: &str) -> Option<Arc<Incoming>> {
        self.map.lock().ok()?.get(id).cloned()
    }

    /// The migration `id`, waiting up to `wait` for a Prepare still running to add it.
    async fn get_prepared(&self, id: &str, wait: Duration) -> Option<Arc<Incoming>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let added = self.prepared.notified();
            if let Some(inc) = self.get(id) {
                return Some(inc);
            }
            tokio::time::timeout_at(deadline, added).await.ok()?;
        }
    }

    fn host(&self) -> &str {
        &self.cfg.host_name
    }

    /// Prepare: an empty RAM file and a paused QEMU waiting for this migration.
    ///
    /// Runs as a task of its own: a source that vanishes mid-call (its connection drops,
    /// and the RPC's future with it) must not cut it short halfway — a reserved name, a
    /// RAM file or disk copies nobody would remove. Finished, an unclaimed migration is
    /// the watchdog's (or an abort's) to discard.
    pub async fn prepare(
        self: &Arc<Self>,
        req: pb::PrepareRequest,
        caller: &PeerIdentity,
    ) -> Result<pb::PrepareResponse, Status> {
        let (me, caller) = (self.clone(), caller.clone());
        crate::to_completion(
            "prepare",
            async move { me.prepare_whole(req, &caller).await },
        )
        .await
    }

    async fn prepare_whole(
        self: &Arc<Self>,
        req: pb::PrepareRequest,
        caller: &PeerIdentity,
    ) -> Result<pb::PrepareResponse, Status> {
        // The source is who its certificate says, whatever the request claims.
        crate::access::claimed_source(&req.source_host, caller, self.host(), "Prepare")?;
        let spec = super::check_prepare(
            self.host(),
            req.protocol_version,
            &req.migration_id,
            req.spec.as_ref(),
        )?;
        let limit = self.cfg.migration.max_incoming;
        let Some(slot) = self.slots.try_take(limit) else {
            return Err(Status::resource_exhausted(format!(
                "host {} already receives {limit} migration(s) (migration.max_incoming = {limit}): try again when one has ended",
                self.host()
            )));
        };
        if self.get(&req.migration_id).is_some() {
            return Err(Status::already_exists(format!(
                "migration {} is already prepared on {}",
                req.migration_id,
                self.host()
            )));
        }
        // An id is used once: a record of it (a tombstone listing copies left behind, say)
        // must not be overwritten, nor its staging names taken over.
        match self.journal.migration(&req.migration_id) {
            Ok(None) => {}
            Ok(Some(r)) => {
                return Err(Status::already_exists(format!(
                    "migration {} is known on {} already (state {}): a migration id is used once",
                    req.migration_id,
                    self.host(),
                    r.state
                )))
            }
            Err(e) => return Err(Status::unavailable(format!("journal: {e}"))),
        }
        // Disk paths in the spec are the source's: map them to this host's storage.
        let spec = super::disks::localize(
            &self.storage,
            self.host(),
            spec,
            &req.shared_disks,
            &req.copy_disks,
        )?;
        let token = if req.token.is_empty() {
            uuid::Uuid::new_v4().simple().to_string()
        } else if (16..=128).contains(&req.token.len())
            && req.token.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            req.token.clone()
        } else {
            return Err(Status::invalid_argument(
                "token must be 16 to 128 letters and digits",
            ));
        };
        // From here until it joins `map`, an abort finds it here.
        let _pending = self.pending_prepare(&req.migration_id, &token, caller)?;
        self.vms.check_spec_paths(&spec)?;
        self.vms.check_disks_unclaimed(&spec).await?;
        self.check_shared_chains(&spec, &req.shared_disks).await?;
        // Admission (memory for the RAM file) and the name, under one lock.
        self.vms
            .reserve_incoming(&spec, &req.migration_id, true)
            .await?;
        let created = self
            .create(
                &req.migration_id,
                &spec,
                &req.copy_disks,
                &caller.name,
                &token,
            )
            .await;
        let journaled = match created {
            Ok(inc) => {
                if let Ok(mut sl) = inc.slot.lock() {
                    *sl = Some(slot);
                }
                let put = self.journal.put_migration(&{
                    let mut r = MigrationRecord::new(
                        &inc.id,
                        Role::Target,
                        &spec.name,
                        &caller.name,
                        "prepared",
                    );
                    r.token = Some(inc.token.clone());
                    r.receiver = Some(Receiver::Prepared);
                    r.copies = inc.copies.clone();
                    r
                });
                match put {
                    // The copies keep their staging names until the commit: whatever
                    // removes them before then proves them this migration's first.
                    Ok(()) => Ok(inc),
                    Err(e) => {
                        // Nothing promised yet: what `create` made goes too.
                        if let Some(p) = inc.qemu.settle().await {
                            let _ = p.kill().await;
                        }
                        inc.release_ram();
                        let left = super::disks::remove_copies(&inc.copies, &inc.id);
                        self.forget_intent(&inc.id, left);
                        Err(Status::internal(format!("journal: {e}")))
                    }
                }
            }
            Err(e) => Err(e),
        };
        let inc = match journaled {
            Ok(inc) => inc,
            Err(e) => {
                let _ = self.vms.drop_incoming(&spec.name, &req.migration_id).await;
                remove_vm_files(&self.cfg, &spec.name);
                return Err(e);
            }
        };
        let abort_asked = match self.map.lock() {
            Ok(mut m) => {
                m.insert(inc.id.clone(), inc.clone());
                self.pending
                    .lock()
                    .ok()
                    .and_then(|mut p| p.remove(&inc.id))
                    .is_some_and(|p| p.abort_asked)
            }
            Err(_) => false,
        };
        if abort_asked {
            // Its source gave up while this host prepared (and asked to abort): nothing
            // will connect, so discard now rather than at the watchdog.
            match self
                .abort_internal(&inc, "the source asked to abort while this host prepared")
                .await
            {
                Ok(()) => return Err(self.aborted_while_preparing(&inc.id)),
                // The watchdog retries the discard.
                Err(e) => warn!(migration = %inc.id, "abort during Prepare: {}", e.message()),
            }
        }
        self.prepared.notify_waiters();
        self.spawn_watchdog(inc.clone());
        self.fail_point("tgt.prepare.done").await?;
        info!(migration = %inc.id, vm = %spec.name, source = %caller.name, "prepared incoming migration");
        Ok(pb::PrepareResponse {
            quic_addr: self.cfg.quic_listen.to_string(),
            token: inc.token.clone(),
            qemu_version: self.qemu_version.clone(),
            target_host: self.host().to_string(),
        })
    }

    async fn create(
        &self,
        id: &str,
        spec: &VmSpec,
        copy_disks: &[pb::DiskProbe],
        peer: &str,
        token: &str,
    ) -> Result<Arc<Incoming>, Status> {
        let host = self.host().to_string();
        let err = |what: &str, e: &dyn std::fmt::Display| {
            Status::internal(format!(
                "preparing VM '{}' on {host}: {what}: {e}",
                spec.name
            ))
        };
        let launch = self.vms.launch_for(spec, true);
        prepare_dirs(&launch).map_err(|e| err("run directory", &e))?;
        let _ = std::fs::remove_file(&launch.ram_path);
        // Admission checked the RAM directory's room for all of the guest's RAM. The pages
        // are allocated as they arrive; a VM with `memory_prealloc` has the rest allocated
        // too (fallocate) while the pre-copy runs: ~240 ms per GiB here, which Prepare used
        // to add to every migration.
        let (path, bytes) = (launch.ram_path.clone(), spec.memory_mib << 20);
        let ram = tokio::task::spawn_blocking(move || RamFile::create(&path, bytes))
            .await
            .map_err(|e| err("RAM file", &e))?
            .map_err(|e| {
                Status::resource_exhausted(format!(
                    "cannot allocate the {} MiB RAM file on {host}: {e}",
                    spec.memory_mib
                ))
            })?;
        let ram = Arc::new(ram);
        let ram_pages = ram.page_count();
        // The fingerprint's per-page sums: a large allocation, off the runtime too.
        let sums = tokio::task::spawn_blocking(move || PageSums::new(ram_pages))
            .await
            .map_err(|e| err("page sums", &e))?;
        // Disks that travel: empty images of the same format and size, made before QEMU
        // opens them. Shared disks are opened in place (inactive until the switchover).
        let copies = self
            .make_copies(id, spec, copy_disks, peer, token, &host)
            .await?;
        let incoming_sock = incoming_socket(&launch);
        let (loaded_tx, loaded) = watch::channel(None);
        let start = TargetQemuStart {
            vms: self.vms.clone(),
            cfg: self.cfg.clone(),
            launch,
            name: spec.name.clone(),
            migration: id.to_string(),
            copy_disks: copy_disks.to_vec(),
            loaded: loaded_tx,
        };
        let (qemu, nbd) = if copy_disks.is_empty() {
            let qemu = IncomingQemu::start(move |hook| async move {
                start.run(Some(hook)).await.map(|(p, _)| p)
            });
            (qemu, None)
        } else {
            // The source's mirror starts before the switchover: the NBD exports it
            // writes to exist before Prepare answers.
            match start.run(None).await {
                Ok((p, nbd)) => (IncomingQemu::running(p), nbd),
                Err(e) => {
                    let left = super::disks::remove_copies(&copies, id);
                    self.forget_intent(id, left);
                    return Err(Status::internal(format!(
                        "preparing VM '{}' on {host}: {e}",
                        spec.name
                    )));
                }
            }
        };
        Ok(Arc::new(Incoming {
            reserved: self.reserve_in_background(ram.clone(), spec.memory_prealloc),
            id: id.to_string(),
            token: token.to_string(),
            peer: peer.to_string(),
            spec: spec.clone(),
            ram: std::sync::Mutex::new(Some(ram)),
            qemu,
            state: Mutex::new(State::prepared()),
            applied: Arc::new(AppliedCounter::default()),
            loaded,
            cancel: CancellationToken::new(),
            incoming_sock,
            copies,
            nbd,
            final_applied: watch::channel(false).0,
            sums: Arc::new(sums),
            slot: std::sync::Mutex::new(None),
        }))
    }

    /// The disk copies of an incoming migration, made so that no crash leaves one behind:
    /// where they go is journaled first (a "preparing" record), each is made under a
    /// staging name and linked into place, and the staging names stay until the Prepared
    /// record lists the copies. A restart in between removes the copies still linked to
    /// their staging names, and nothing else.
    async fn make_copies(
        &self,
        id: &str,
        spec: &VmSpec,
        copy_disks: &[pb::DiskProbe],
        peer: &str,
        token: &str,
        host: &str,
    ) -> Result<Vec<PathBuf>, Status> {
        if copy_disks.is_empty() {
            return Ok(Vec::new());
        }
        let planned = super::disks::plan_copies(&self.storage, host, spec, copy_disks)?;
        let mut r = MigrationRecord::new(id, Role::Target, &spec.name, peer, "preparing");
        r.token = Some(token.to_string());
        r.receiver = Some(Receiver::Prepared);
        r.staged_copies = planned.clone();
        self.journal
            .put_migration(&r)
            .map_err(|e| Status::internal(format!("journal: {e}")))?;
        let made = {
            let (host, spec, copy_disks, id, plan) = (
                host.to_string(),
                spec.clone(),
                copy_disks.to_vec(),
                id.to_string(),
                planned.clone(),
            );
            tokio::task::spawn_blocking(move || {
                super::disks::make_copies(&host, &spec, &copy_disks, &plan, &id)
            })
            .await
            // The task died: any of the planned copies may be there (the sweep removes
            // only those provably this migration's).
            .map_err(|e| (Status::internal(format!("disk copies: {e}")), planned))
            .and_then(|r| r)
        };
        let made = match made {
            Ok(m) => m,
            Err((e, left)) => {
                self.forget_intent(id, left);
                return Err(e);
            }
        };
        let failed = self.fail_point("tgt.copies.made").await.err();
        let aborted = self
            .pending
            .lock()
            .is_ok_and(|p| p.get(id).is_some_and(|p| p.abort_asked));
        if failed.is_some() || aborted {
            let left = super::disks::remove_copies(&made, id);
            self.forget_intent(id, left);
            return Err(failed.unwrap_or_else(|| self.aborted_while_preparing(id)));
        }
        Ok(made)
    }

    /// What a Prepare its source asked to abort meanwhile answers (to nobody waiting).
    fn aborted_while_preparing(&self, id: &str) -> Status {
        Status::aborted(format!(
            "migration {id} was aborted by its source while {} prepared it",
            self.host()
        ))
    }

    /// Drops the "preparing" record of a Prepare that failed before it promised anything
    /// (what it made is removed already), or, where a copy could not be removed (`left`),
    /// turns it into a tombstone listing those for another try. Left in place if the
    /// journal fails: a restart settles it then.
    fn forget_intent(&self, id: &str, left: Vec<PathBuf>) {
        let done = if left.is_empty() {
            self.journal.remove_migration(id).map(|_| ())
        } else {
            match self.journal.migration(id) {
                Ok(Some(mut r)) => {
                    self.metrics.disk_copies_left_behind.add(left.len() as i64);
                    r.receiver = Some(Receiver::Aborted);
                    r.state = "aborted".into();
                    r.left_behind = left;
                    self.journal.put_migration(&r)
                }
                Ok(None) => {
                    warn!(migration = %id, copies = ?left, "disk copies left behind, and no record of the migration to list them in: remove them by hand");
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        if let Err(e) = done {
            warn!(migration = %id, "journal: {e}");
        }
    }

    /// Shared disks are opened in place by the incoming QEMU: each image's backing
    /// chain, read with the declared format (never probed), must stay inside this host's
    /// storage roots (no `json:`, protocol or device-node backing files).
    async fn check_shared_chains(
        &self,
        spec: &VmSpec,
        shared: &[pb::DiskProbe],
    ) -> Result<(), Status> {
        let disks: Vec<_> = spec
            .disks
            .iter()
            .filter(|d| shared.iter().any(|s| s.id == d.id))
            .map(|d| {
                (
                    d.id.clone(),
                    d.path.clone(),
                    super::disks::image_format(d.format),
                )
            })
            .collect();
        let (storage, host, vm) = (
            self.storage.clone(),
            self.host().to_string(),
            spec.name.clone(),
        );
        tokio::task::spawn_blocking(move || {
            for (id, path, format) in disks {
                let refuse = |why: String| {
                    Status::permission_denied(format!(
                        "host {host} refuses shared disk '{id}' of VM '{vm}': {why}"
                    ))
                };
                let chain = ferry_disk::backing_chain_as(&path, format)
                    .map_err(|e| refuse(e.to_string()))?;
                for layer in chain.iter().skip(1) {
                    super::disks::confined_backing(&storage, &layer.path).map_err(refuse)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| Status::internal(format!("checking shared disks: {e}")))?
    }

    /// A prepared migration whose source never connects removes itself.
    fn spawn_watchdog(self: &Arc<Self>, inc: Arc<Incoming>) {
        let me = Arc::downgrade(self);
        let wait = Duration::from_secs(self.cfg.migration.prepare_timeout_s);
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = inc.cancel.cancelled() => return,
            }
            if *inc.state.lock().await == State::prepared() {
                if let Some(me) = me.upgrade() {
                    let _ = me.abort_internal(&inc, "the source never connected").await;
                }
            }
        });
    }

    /// Commit: the [`Receiver`] step for the source's Commit, carried out. Returns (RESUME
    /// time or 0 when left paused, ready time) in Unix microseconds once the VM is ours
    /// for good (`Owned`); an error when the commit is refused or the VM was handed back.
    pub async fn commit(
        self: &Arc<Self>,
        id: &str,
        token: &str,
        leave_paused: bool,
        caller: &PeerIdentity,
    ) -> Result<(i64, i64), Status> {
        let Some(inc) = self.get(id) else {
            // Settled earlier (the registry entry is released then): answer from the journal.
            return match self.status(id, token, caller).await? {
                pb::IncomingState::Committed => Ok((0, 0)),
                _ => Err(Status::not_found(format!(
                    "no incoming migration {id} on {}: it was aborted or never prepared",
                    self.host()
                ))),
            };
        };
        self.authorize(&inc.id, &inc.token, &inc.peer, token, caller)?;
        // No fingerprint over gRPC: the device state having loaded is the verdict.
        let loaded = inc.loaded.borrow().clone();
        let verdict = decide_commit(loaded.as_ref(), None, None).unwrap_or_else(|| {
            Err(match inc.qemu.start_error() {
                Some(e) => format!("the target QEMU did not start: {e}"),
                None => "target QEMU has not loaded the device state".to_string(),
            })
        });
        // Its own task, like Abort's: a caller whose connection drops must not leave the
        // commit half carried out (journaled Committed, the guest never resumed).
        let me = self.clone();
        crate::to_completion("commit", async move {
            me.commit_decided(&inc, verdict, leave_paused).await
        })
        .await
    }

    /// A commit's verdict ([`decide_commit`]) through the state machine, carried out.
    async fn commit_decided(
        &self,
        inc: &Incoming,
        verdict: Result<(), String>,
        leave_paused: bool,
    ) -> Result<(i64, i64), Status> {
        self.fail_point("tgt.commit.asked").await?;
        let mut st = inc.state.lock().await;
        let (_, effects) = st.recv.step(ReceiverEvent::CommitAsked {
            verdict,
            leave_paused,
        });
        self.carry_out(inc, &mut st, effects).await
    }

    /// Carries out a receiver step's effects in order, feeding the outcome of `Resume`
    /// back into the state machine. The caller holds the state lock throughout, so a
    /// commit and an abort never interleave.
    async fn carry_out(
        &self,
        inc: &Incoming,
        st: &mut State,
        effects: Vec<Effect>,
    ) -> Result<(i64, i64), Status> {
        let mut queue: std::collections::VecDeque<Effect> = effects.into();
        let mut refusal: Option<String> = None;
        let mut owned = false;
        // Copies the Discard effect could not remove, for the tombstone that follows it.
        let mut left_behind: Vec<PathBuf> = Vec::new();
        // When each effect started (the commit's share of the guest's pause, logged).
        let t0 = std::time::Instant::now();
        let mut started: Vec<(String, Duration)> = Vec::new();
        while let Some(e) = queue.pop_front() {
            started.push((format!("{e:?}"), t0.elapsed()));
            match e {
                Effect::JournalCommitted { leave_paused } => {
                    // The mirror is over (the source cancelled it at pre-switchover): close
                    // the exports so nothing but the guest writes these disks from now on.
                    self.close_exports(inc).await;
                    let mut rec = self.record(inc, "committed");
                    rec.receiver = Some(Receiver::Committed { leave_paused });
                    let vm = self.vms.incoming_record(&inc.spec.name).await?;
                    // One transaction: the migration's outcome and the VM it makes ours.
                    self.journal
                        .apply(&[Op::PutMigration(rec), Op::PutVm(vm)])
                        .map_err(|e| {
                            Status::internal(format!("journal (nothing committed): {e}"))
                        })?;
                    st.recv = Receiver::Committed { leave_paused };
                    st.ready_us = unix_us(SystemTime::now());
                    // Journaled: from here on nothing may turn this into a refusal.
                    if let Err(e) = self.vms.commit_incoming(&inc.spec.name, leave_paused).await {
                        warn!(migration = %inc.id, "committed VM record: {}", e.message());
                    }
                    inc.cancel.cancel();
                    // Only exit/hang here: an injected error must not cut the sequence short.
                    let _ = self.fail_point("tgt.commit.journaled").await;
                }
                Effect::Resume => {
                    let r = self.resume(inc).await;
                    let ev = match r {
                        Ok(resume_us) => {
                            st.resume_us = resume_us;
                            ReceiverEvent::Resumed
                        }
                        Err(e) => {
                            warn!(migration = %inc.id, vm = %inc.spec.name, "committed, but resuming failed: {e}; handing the VM back");
                            ReceiverEvent::ResumeFailed
                        }
                    };
                    // Only exit/hang here: an injected error must not cut the sequence short.
                    let _ = self.fail_point("tgt.commit.resumed").await;
                    let (_, more) = st.recv.step(ev);
                    queue.extend(more);
                }
                Effect::JournalOwned => {
                    let mut rec = self.record(inc, "owned");
                    rec.receiver = Some(Receiver::Owned);
                    rec.keep_until_ms = super::now_ms() + crate::journal::OWNED_KEPT_MS;
                    self.journal
                        .put_migration(&rec)
                        .map_err(|e| Status::internal(format!("journal: {e}")))?;
                    st.recv = Receiver::Owned;
                    // The copies are this host's disks now: their staging names go (a
                    // second name for a disk in use).
                    super::disks::release_staging(&inc.copies, &inc.id);
                    // Only exit/hang here: an injected error must not cut the sequence short.
                    let _ = self.fail_point("tgt.commit.owned").await;
                }
                Effect::ReplyOwned => owned = true,
                Effect::Discard => {
                    inc.cancel.cancel();
                    inc.release_ram();
                    let proc = inc.qemu.settle().await;
                    left_behind = self
                        .discard(&inc.spec.name, &inc.id, proc.as_ref(), &inc.copies)
                        .await;
                    // Only exit/hang here: an injected error must not cut the sequence short.
                    let _ = self.fail_point("tgt.abort.discarded").await;
                }
                Effect::JournalAborted => {
                    let mut rec = self.record(inc, "aborted");
                    rec.receiver = Some(Receiver::Aborted);
                    rec.left_behind = std::mem::take(&mut left_behind);
                    let left = rec.left_behind.len() as i64;
                    self.journal
                        .apply(&[Op::PutMigration(rec), Op::RemoveVm(inc.spec.name.clone())])
                        .map_err(|e| Status::internal(format!("journal: {e}")))?;
                    st.recv = Receiver::Aborted;
                    self.metrics.disk_copies_left_behind.add(left);
                    self.metrics
                        .migrations
                        .with_label_values(&["target", "aborted"])
                        .inc();
                }
                Effect::Refuse(why) => refusal = Some(why),
            }
        }
        info!(migration = %inc.id, took = ?t0.elapsed(), "handoff effects carried out (each from): {started:?}");
        if matches!(st.recv, Receiver::Owned | Receiver::Aborted) {
            // Nothing outlives its migration: the registry entry (RAM mapping, per-page
            // sums, QEMU handle) goes; IncomingStatus answers from the journal.
            inc.release_ram();
            if let Ok(mut m) = self.map.lock() {
                m.remove(&inc.id);
            }
            if let Ok(mut sl) = inc.slot.lock() {
                sl.take();
            }
            let _ = self
                .journal
                .prune_migrations(self.cfg.migration.journal_history);
        }
        if let Some(why) = refusal {
            return Err(Status::failed_precondition(format!(
                "migration {} on {}: {why}",
                inc.id,
                self.host()
            )));
        }
        if owned {
            self.metrics
                .migrations
                .with_label_values(&["target", "committed"])
                .inc();
            info!(migration = %inc.id, vm = %inc.spec.name, paused = st.resume_us == 0, "committed; the VM is owned here");
        }
        Ok((st.resume_us, st.ready_us))
    }

    /// `cont` and wait for RESUME (bounded), then `announce-self`.
    async fn resume(&self, inc: &Incoming) -> Result<i64, String> {
        let proc = inc.qemu.get().await?;
        let qmp = proc.qmp();
        let mut events = qmp.subscribe();
        qmp.cont()
            .await
            .map_err(|e| format!("resuming VM '{}' on {}: {e}", inc.spec.name, self.host()))?;
        let resume =
            ferry_qmp::wait_for_event(&mut events, Duration::from_secs(10), |e| e.name == "RESUME")
                .await
                .map(|e| e.timestamp)
                .map_err(|e| format!("no RESUME from the target QEMU: {e}"))?;
        if let Err(e) = qmp.announce_self().await {
            warn!(migration = %inc.id, "announce-self: {e}");
        }
        Ok(unix_us(resume))
    }

    async fn close_exports(&self, inc: &Incoming) {
        if let Some((_, exports)) = &inc.nbd {
            // Disks travel: QEMU started before Prepare answered.
            let Ok(proc) = inc.qemu.get().await else {
                return;
            };
            let qmp = proc.qmp();
            for e in exports {
                if let Err(err) = qmp.block_export_del(e).await {
                    warn!(migration = %inc.id, "block-export-del {e}: {err}");
                }
            }
            if let Err(err) = qmp.nbd_server_stop().await {
                warn!(migration = %inc.id, "nbd-server-stop: {err}");
            }
        }
    }

    /// The `Discard` effect's I/O, live and on restart: kill the QEMU, forget the VM,
    /// remove its RAM file, run directory and the disk copies made for it (idempotent).
    /// Returns the copies whose removal failed (for the tombstone: tried again later).
    async fn discard(
        &self,
        vm: &str,
        id: &str,
        proc: Option<&Arc<QemuProcess>>,
        copies: &[PathBuf],
    ) -> Vec<PathBuf> {
        if let Some(p) = proc {
            let _ = p.kill().await;
        }
        self.vms.forget(vm, id).await;
        remove_vm_files(&self.cfg, vm);
        let (all, id) = (copies.to_vec(), id.to_string());
        tokio::task::spawn_blocking(move || super::disks::remove_copies(&all, &id))
            .await
            // The task died: list them all (the sweep removes only provable ones).
            .unwrap_or_else(|_| copies.to_vec())
    }

    fn record(&self, inc: &Incoming, state: &str) -> MigrationRecord {
        let mut r = MigrationRecord::new(&inc.id, Role::Target, &inc.spec.name, &inc.peer, state);
        r.token = Some(inc.token.clone());
        r.copies = inc.copies.clone();
        r
    }

    /// Allocates the rest of the RAM file off the runtime when the VM asks for its memory
    /// preallocated; the channel says how it went (at once, when it does not: its pages are
    /// allocated as they arrive, and by the guest as it writes).
    fn reserve_in_background(
        &self,
        ram: Arc<RamFile>,
        prealloc: bool,
    ) -> watch::Receiver<Option<Result<(), String>>> {
        if !prealloc {
            return watch::channel(Some(Ok(()))).1;
        }
        let (tx, rx) = watch::channel(None);
        let state_dir = self.cfg.state_dir.clone();
        tokio::spawn(async move {
            let r = match crate::failpoint::hit("tgt.ram.reserve", &state_dir).await {
                Err(e) => Err(e),
                Ok(()) => match tokio::task::spawn_blocking(move || ram.reserve()).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
            };
            let _ = tx.send(Some(r));
        });
        rx
    }

    async fn fail_point(&self, name: &'static str) -> Result<(), Status> {
        crate::failpoint::hit(name, &self.cfg.state_dir)
            .await
            .map_err(Status::internal)
    }

    /// Abort (asked by the source that prepared it): discard everything; refused once
    /// committed. `taken_back`: the source took the VM back on its operator's verdict —
    /// a copy committed before a restart and waiting for its source is discarded too, and
    /// one owned here (its guest ran here: the VM ran on both hosts) is fenced.
    pub async fn abort(
        self: &Arc<Self>,
        id: &str,
        token: &str,
        reason: &str,
        taken_back: bool,
        caller: &PeerIdentity,
    ) -> Result<pb::AbortResponse, Status> {
        let existed = |existed| pb::AbortResponse {
            existed,
            fenced: false,
        };
        let found = {
            let m = self
                .map
                .lock()
                .map_err(|_| Status::internal("incoming registry lock"))?;
            match m.get(id) {
                Some(inc) => Some(inc.clone()),
                None => {
                    // A Prepare still under way: it discards itself when done.
                    let mut p = self
                        .pending
                        .lock()
                        .map_err(|_| Status::internal("incoming registry lock"))?;
                    if let Some(pre) = p.get_mut(id) {
                        self.authorize(id, &pre.token, &pre.peer, token, caller)?;
                        pre.abort_asked = true;
                        return Ok(existed(true));
                    }
                    None
                }
            }
        };
        match found {
            Some(inc) => {
                self.authorize(&inc.id, &inc.token, &inc.peer, token, caller)?;
                if taken_back && inc.state.lock().await.recv.owns() {
                    // Its commit under way here (the state lock waited for it): once it
                    // settles, the registry forgets the migration and the news told again
                    // meets what the journal says (a copy owned here is fenced).
                    return Err(Status::unavailable(format!(
                        "migration {id}: committed on {} and settling; tell again",
                        self.host()
                    )));
                }
                // Its own task: a caller that gives up (its RPC deadline) does not cut the
                // discard short halfway, under the state lock, with nothing to retry it.
                let (me, reason) = (self.clone(), reason.to_string());
                crate::to_completion(
                    "abort",
                    async move { me.abort_internal(&inc, &reason).await },
                )
                .await
                .map(|_| existed(true))
            }
            None if taken_back => self.taken_back(id, token, caller).await,
            None => Ok(existed(false)),
        }
    }

    /// The source's news that its operator's verdict took the VM back, for a migration
    /// only the journal knows: a copy waiting for its source's word is discarded
    /// (`existed`); one owned here is fenced (`fenced`: its guest paused and held for the
    /// operator, [`VmManager::fence`]) — the verdict said the VM lives on the source, and
    /// it runs there; a VM gone from here since is refused (FAILED_PRECONDITION: it may
    /// run elsewhere too); nothing here, neither.
    async fn taken_back(
        self: &Arc<Self>,
        id: &str,
        token: &str,
        caller: &PeerIdentity,
    ) -> Result<pb::AbortResponse, Status> {
        let answer = |existed, fenced| pb::AbortResponse { existed, fenced };
        let journal_err =
            |e| Status::unavailable(format!("host {} cannot read its journal: {e}", self.host()));
        let Some(r) = self
            .journal
            .migration(id)
            .map_err(journal_err)?
            .filter(|r| r.role == Role::Target)
        else {
            return Ok(answer(false, false));
        };
        self.authorize_record(&r, token, caller)?;
        if let Some(settled) = self.hear(id, ferry_handoff::SourceWord::TookBack) {
            // Stopped waiting meanwhile (its source asked first): the journal says.
            if let Ok(done) = settled.await {
                warn!(migration = %id, vm = %r.vm, "the source took the VM back on its operator's verdict: the copy committed here before a restart is discarded");
                return done.map(|()| answer(true, false)).map_err(Status::internal);
            }
        }
        let now = self.journal.migration(id).map_err(journal_err)?;
        match ferry_handoff::on_taken_back(now.and_then(|now| now.receiver)) {
            // Committed and no longer waiting (its source's question came first, or
            // settling failed): the source tells again, and by then the journal says which.
            OnTakenBack::Discard => Err(Status::unavailable(format!(
                "migration {id}: committed on {} and settling; tell again",
                self.host()
            ))),
            OnTakenBack::Fence => {
                let fence = crate::journal::Fence {
                    migration: id.to_string(),
                    runs_on: r.peer.clone(),
                    at_ms: super::now_ms(),
                    why: crate::journal::FenceWhy::TakenBack,
                };
                // To completion: a caller that gives up (its deadline) must not leave the
                // guest neither paused nor killed, or the VMs' lock held by a dropped call.
                let vms = self.vms.clone();
                let vm = r.vm.clone();
                match crate::to_completion("fence", async move { vms.fence(&vm, fence).await })
                    .await?
                {
                    None => {
                        error!(migration = %id, vm = %r.vm, "the source took the VM back on its operator's verdict, but the VM ran here after the commit and has left this host since: it may run on two hosts");
                        Err(Status::failed_precondition(format!(
                            "migration {id}: VM '{}' ran on {} after the commit and is no longer here (moved on or removed): the source's verdict found a host that was not gone; find where else it runs and stop one",
                            r.vm,
                            self.host()
                        )))
                    }
                    Some(done) => {
                        if done.new {
                            self.metrics.vms_fenced.inc();
                        }
                        let what = match done.guest {
                            FencedGuest::Paused => "its guest ran here after the commit, so the VM ran on two hosts; the guest is paused now",
                            FencedGuest::Killed => "its guest ran here after the commit, so the VM ran on two hosts; its QEMU did not answer the pause and was killed",
                            FencedGuest::NotRunning => "the copy committed here does not run (paused or stopped)",
                        };
                        error!(migration = %id, vm = %r.vm, source = %r.peer, "the source took the VM back on its operator's verdict (this host was not gone): {what}; the copy is fenced, held until the operator clears it (`ferryctl vm clear-fence`)");
                        Ok(answer(false, true))
                    }
                }
            }
            OnTakenBack::Nothing => Ok(answer(false, false)),
        }
    }

    /// Registers a Prepare under way (refused if one of the same id already is).
    fn pending_prepare(
        &self,
        id: &str,
        token: &str,
        caller: &PeerIdentity,
    ) -> Result<PendingGuard<'_>, Status> {
        let mut p = self
            .pending
            .lock()
            .map_err(|_| Status::internal("incoming registry lock"))?;
        if p.contains_key(id) {
            return Err(Status::already_exists(format!(
                "migration {id} is already being prepared on {}",
                self.host()
            )));
        }
        p.insert(
            id.to_string(),
            PendingPrepare {
                token: token.to_string(),
                peer: caller.name.clone(),
                abort_asked: false,
            },
        );
        Ok(PendingGuard {
            reg: self,
            id: id.to_string(),
        })
    }

    /// [`Self::authorize`] against a migration only the journal knows.
    fn authorize_record(
        &self,
        r: &MigrationRecord,
        given: &str,
        caller: &PeerIdentity,
    ) -> Result<(), Status> {
        let token = r.token.as_deref().unwrap_or_default();
        self.authorize(&r.id, token, &r.peer, given, caller)
    }

    /// A later call of a migration: the token from its Prepare, from the agent that
    /// prepared it.
    fn authorize(
        &self,
        id: &str,
        token: &str,
        peer: &str,
        given: &str,
        caller: &PeerIdentity,
    ) -> Result<(), Status> {
        crate::access::same_peer(peer, caller, self.host(), id)?;
        if token != given {
            return Err(Status::permission_denied(format!(
                "host {}: wrong token for migration {id}",
                self.host()
            )));
        }
        Ok(())
    }

    async fn abort_internal(&self, inc: &Incoming, reason: &str) -> Result<(), Status> {
        self.settle_event(inc, ReceiverEvent::AbortAsked, reason)
            .await
    }

    /// The data plane ended before a commit.
    async fn lost_source(&self, inc: &Incoming, reason: &str) -> Result<(), Status> {
        self.settle_event(inc, ReceiverEvent::SourceLost, reason)
            .await
    }

    async fn settle_event(
        &self,
        inc: &Incoming,
        ev: ReceiverEvent,
        reason: &str,
    ) -> Result<(), Status> {
        let mut st = inc.state.lock().await;
        if st.recv == Receiver::Prepared {
            warn!(migration = %inc.id, vm = %inc.spec.name, "aborting incoming migration: {reason}");
        }
        let (_, effects) = st.recv.step(ev);
        self.carry_out(inc, &mut st, effects).await.map(|_| ())
    }

    /// Where a migration stands here, for the agent that prepared it (with its token).
    /// Fails closed: a journal that cannot be read is an error (the source then stays in
    /// doubt), never "unknown".
    pub async fn status(
        &self,
        id: &str,
        token: &str,
        caller: &PeerIdentity,
    ) -> Result<pb::IncomingState, Status> {
        if let Some(inc) = self.get(id) {
            self.authorize(&inc.id, &inc.token, &inc.peer, token, caller)?;
            return Ok(incoming_state(inc.state.lock().await.recv));
        }
        match self.journal.migration(id) {
            Ok(Some(r)) if r.role == Role::Target => {
                self.authorize_record(&r, token, caller)?;
                if matches!(r.receiver, Some(Receiver::Committed { .. })) {
                    // A source still asking has not taken the VM back: a copy waiting for
                    // its word resumes (and says Owned at the next question).
                    let _ = self.hear(id, ferry_handoff::SourceWord::StillAsking);
                }
                Ok(match r.receiver {
                    // A Prepare still making its disk copies (or one a crash cut short):
                    // nothing was promised, nothing can commit it.
                    _ if r.state == "preparing" => pb::IncomingState::Unknown,
                    Some(recv) => incoming_state(recv),
                    None if r.state == "committed" => pb::IncomingState::Committed,
                    None => pb::IncomingState::Aborted,
                })
            }
            Ok(_) => Ok(pb::IncomingState::Unknown),
            Err(e) => Err(Status::unavailable(format!(
                "host {} cannot read its journal: {e}",
                self.host()
            ))),
        }
    }

    /// After a restart: settles every journaled incoming migration that was not, per
    /// [`ferry_handoff::target_recovery`] (runs after [`VmManager::recover`]).
    pub async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        use ferry_handoff::{target_recovery, TargetAction};
        for r in self.journal.migrations()? {
            if r.role != Role::Target {
                continue;
            }
            if r.settled() {
                if r.receiver == Some(Receiver::Owned) {
                    // A crash between journaling Owned and dropping the copies' staging
                    // names (or an error then) kept a second name of a disk in use.
                    super::disks::release_staging(&r.copies, &r.id);
                }
                continue;
            }
            let recv = r.receiver.unwrap_or(if r.state == "committed" {
                Receiver::Owned
            } else {
                Receiver::Prepared
            });
            // Never committed: the name may since belong to another VM of this host (the
            // VM manager's recovery removed this migration's incoming VM already). That
            // VM is not this migration's to kill or forget.
            if recv == Receiver::Prepared
                && self.vms.get(&r.vm).await.is_ok()
                && self.vms.migration_of(&r.vm).await.as_deref() != Some(r.id.as_str())
            {
                // Its disk copies too may be that VM's disks now: only those still linked
                // to their staging name are provably this migration's.
                warn!(migration = %r.id, vm = %r.vm, copies = ?r.copies, "settling an incoming migration after restart: the name is another VM's now; its VM, files and listed disk copies are left alone");
                let mut rec = r.clone();
                rec.left_behind = super::disks::remove_proven_copies(&r.staged_copies, &r.id);
                // Prepared copies: their staging names go (only this migration's hidden
                // names; the files stay).
                super::disks::release_staging(&r.copies, &r.id);
                rec.receiver = Some(Receiver::Aborted);
                rec.state = "aborted".into();
                self.journal.put_migration(&rec)?;
                continue;
            }
            let (proc, alive) = self.qemu_of(&r.vm).await;
            let action = target_recovery(recv, alive);
            info!(migration = %r.id, vm = %r.vm, ?recv, ?alive, ?action, "settling incoming migration after restart");
            match action {
                TargetAction::AwaitSource { leave_paused } => {
                    self.await_source(r, leave_paused).await
                }
                a => self.settle_restarted(&r, proc, a).await?,
            }
        }
        self.remove_left_behind().await;
        Ok(())
    }

    /// VM `vm`'s QEMU here, if it runs, and that as the restart decisions take it.
    async fn qemu_of(&self, vm: &str) -> (Option<Arc<QemuProcess>>, ferry_handoff::TargetQemu) {
        let proc = self
            .vms
            .spec_and_process(vm)
            .await
            .ok()
            .and_then(|(_, p)| p);
        let alive = if proc.is_some() {
            ferry_handoff::TargetQemu::Alive
        } else {
            ferry_handoff::TargetQemu::Gone
        };
        (proc, alive)
    }

    /// Carries out a restart's decision on journaled migration `r` (not `AwaitSource`).
    async fn settle_restarted(
        &self,
        r: &MigrationRecord,
        proc: Option<Arc<QemuProcess>>,
        action: ferry_handoff::TargetAction,
    ) -> anyhow::Result<()> {
        use ferry_handoff::TargetAction;
        let mut rec = r.clone();
        let mut action = action;
        if let (TargetAction::ResumeAndOwn, Some(p)) = (action, &proc) {
            if let Err(e) = p.qmp().cont().await {
                // As in the live commit (`ResumeFailed`): the source still holds its copy
                // (fenced, or its capture), so the VM is handed back, not left nowhere.
                warn!(migration = %r.id, vm = %r.vm, "committed, but resuming after the restart failed: {e}; handing the VM back");
                action = TargetAction::Discard;
            }
        }
        match action {
            TargetAction::Discard => {
                let mut left = self.discard(&r.vm, &r.id, proc.as_ref(), &r.copies).await;
                // A Prepare that died making its copies: only what it provably made.
                for p in super::disks::remove_proven_copies(&r.staged_copies, &r.id) {
                    if !left.contains(&p) {
                        left.push(p);
                    }
                }
                rec.left_behind = left;
                rec.receiver = Some(Receiver::Aborted);
                rec.state = "aborted".into();
                self.journal
                    .apply(&[Op::PutMigration(rec), Op::RemoveVm(r.vm.clone())])?;
            }
            TargetAction::ResumeAndOwn | TargetAction::Own => {
                // Resumed above (unless left paused as asked).
                let resume = action == TargetAction::ResumeAndOwn;
                if resume {
                    self.vms.mark_running(&r.vm).await;
                }
                self.vms.release_hold(&r.vm, &r.id, resume).await;
                rec.receiver = Some(Receiver::Owned);
                rec.state = "owned".into();
                rec.keep_until_ms = super::now_ms() + crate::journal::OWNED_KEPT_MS;
                self.journal.put_migration(&rec)?;
                super::disks::release_staging(&r.copies, &r.id);
            }
            TargetAction::AwaitSource { .. } | TargetAction::Keep => {}
        }
        Ok(())
    }

    /// A VM committed here before a restart and never resumed: held paused (nothing may
    /// resume it meanwhile) until its source's word, or `committed_await_source_s`; then
    /// settled per [`ferry_handoff::target_after_waiting`], in the background. The source,
    /// if it took the VM back on its operator's verdict, says so with an Abort marked
    /// "taken back"; if it is still settling, it asks `IncomingStatus` within seconds.
    async fn await_source(self: &Arc<Self>, r: MigrationRecord, leave_paused: bool) {
        use ferry_handoff::{target_after_waiting, SourceWord};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Heard>();
        if let Ok(mut a) = self.awaiting.lock() {
            a.insert(r.id.clone(), tx);
        }
        self.vms.hold(&r.vm, &r.id).await;
        let wait = Duration::from_secs(self.cfg.migration.committed_await_source_s);
        warn!(migration = %r.id, vm = %r.vm, "committed here before a restart and never resumed: the guest stays paused until {} says where the VM is (at most {} s)", r.peer, wait.as_secs());
        let me = self.clone();
        tokio::spawn(async move {
            let heard = tokio::time::timeout(wait, rx.recv()).await.ok().flatten();
            // Later words find no one waiting and are answered from the journal.
            if let Ok(mut a) = me.awaiting.lock() {
                a.remove(&r.id);
            }
            let (word, settled) = match heard {
                Some(h) => (h.word, Some(h.settled)),
                None => (SourceWord::Silent, None),
            };
            let (proc, alive) = me.qemu_of(&r.vm).await;
            let action = target_after_waiting(word, leave_paused, alive);
            info!(migration = %r.id, vm = %r.vm, ?word, ?alive, ?action, "the source's word on a VM committed here before a restart");
            let (me2, r2) = (me.clone(), r.clone());
            let result =
                match tokio::spawn(async move { me2.settle_restarted(&r2, proc, action).await })
                    .await
                {
                    Ok(r) => r,
                    Err(e) => Err(anyhow::anyhow!("the settling task died: {e}")),
                };
            if let Err(e) = &result {
                // The VM stays paused here, not held: the operator can see and act.
                me.vms.release_hold(&r.vm, &r.id, false).await;
                error!(migration = %r.id, vm = %r.vm, "settling after the source's word: {e:#}");
            }
            if let Some(s) = settled {
                let _ = s.send(result.map_err(|e| format!("{e:#}")));
            }
        });
    }

    /// Tells a migration waiting for its source's word (if it is) what it heard; returns
    /// where the settlement will be said for `TookBack`, `None` if none is waiting.
    fn hear(
        &self,
        id: &str,
        word: ferry_handoff::SourceWord,
    ) -> Option<tokio::sync::oneshot::Receiver<Result<(), String>>> {
        let tx = self.awaiting.lock().ok()?.get(id).cloned()?;
        let (settled, rx) = tokio::sync::oneshot::channel();
        tx.send(Heard { word, settled }).ok()?;
        Some(rx)
    }

    /// Another try at the disk copies that migrations which did not commit left behind
    /// (a removal that failed): each goes only while it is still linked to its staging
    /// name and no VM of this host names it as its disk (an operator may have defined one
    /// on it meanwhile: then it is that VM's, and only the staging name goes); what fails
    /// again stays listed. Runs at start-up and every `left_behind_retry_s`. Returns how
    /// many copies are still left.
    pub async fn remove_left_behind(&self) -> usize {
        let records = match self.journal.migrations() {
            Ok(r) => r,
            Err(e) => {
                warn!("journal: {e}");
                return 0;
            }
        };
        let mut still = 0;
        for mut r in records {
            if r.role != Role::Target || !r.settled() || r.left_behind.is_empty() {
                continue;
            }
            let mut paths = Vec::new();
            for p in &r.left_behind {
                match self.vms.disk_owner(p).await {
                    Some(vm) => {
                        warn!(migration = %r.id, path = %p.display(), %vm, "a disk copy left behind is VM '{vm}''s disk now: left to it");
                        super::disks::release_staging(std::slice::from_ref(p), &r.id);
                    }
                    None => paths.push(p.clone()),
                }
            }
            let (tried, id) = (paths.clone(), r.id.clone());
            let left = tokio::task::spawn_blocking(move || {
                super::disks::remove_proven_copies(&tried, &id)
            })
            .await
            .unwrap_or(paths);
            still += left.len();
            if left != r.left_behind {
                r.left_behind = left;
                if let Err(e) = self.journal.put_migration(&r) {
                    warn!(migration = %r.id, "journal: {e}");
                }
            }
        }
        self.metrics.disk_copies_left_behind.set(still as i64);
        still
    }

    /// Serves one QUIC connection from a source agent: a migration's data plane, or a
    /// preflight bandwidth probe.
    /// `peer` is the agent the connection's certificate names (checked by the caller).
    pub async fn handle_connection(self: Arc<Self>, conn: quinn::Connection, peer: PeerIdentity) {
        let remote = conn.remote_address();
        let accepted = tokio::select! {
            bi = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()) => bi,
            // A cold migration's connection carries only unidirectional DiskImage streams.
            Ok(uni) = conn.accept_uni() => return super::cold::serve_disk_streams(self.cold.clone(), conn, uni, peer).await,
        };
        let refuse = |e: String| {
            warn!(%remote, "refused data-plane connection: {e}");
            conn.close(2u32.into(), e.as_bytes());
        };
        let (send, mut recv) = match accepted {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => return refuse(e.to_string()),
            Err(_) => return refuse("no stream within 10 s".into()),
        };
        // Streams are dropped after the close, never before (see the control stream below).
        let header = match read_stream_header(&mut recv).await {
            Ok(h) => h,
            Err(e) => return refuse(e.to_string()),
        };
        if header.kind == StreamKind::Probe {
            if let Err(e) = serve_probe(send, recv).await {
                warn!(%remote, "bandwidth probe: {e}");
            }
            return;
        }
        // The control stream lives until the connection is closed: dropped first, it would
        // finish, and a source reading the FIN before the close would hear "closed" instead
        // of the refusal's reason.
        let mut ctl = ControlChannel::new(send, recv);
        // The Hello may wait for its Prepare: not beyond the connection's life.
        let handshake = tokio::select! {
            h = self.handshake(header, &mut ctl, &peer) => h,
            e = conn.closed() => Err(format!("connection closed before the handshake: {e}")),
        };
        let inc = match handshake {
            Ok(inc) => inc,
            Err(e) => {
                refuse(e);
                drop(ctl);
                return;
            }
        };
        let reason = self.serve(&conn, &inc, ctl).await;
        let recv = inc.state.lock().await.recv;
        if recv == Receiver::Prepared {
            let _ = self.lost_source(&inc, &reason).await;
            conn.close(3u32.into(), reason.as_bytes());
        }
    }

    async fn handshake(
        &self,
        header: ferry_wire::StreamHeader,
        ctl: &mut ControlChannel,
        peer: &PeerIdentity,
    ) -> Result<Arc<Incoming>, String> {
        if header.kind != StreamKind::Control {
            return Err(format!(
                "first stream is {:?}, expected control",
                header.kind
            ));
        }
        let hello = tokio::time::timeout(Duration::from_secs(10), ctl.recv())
            .await
            .map_err(|_| "no hello".to_string())?
            .map_err(|e| e.to_string())?;
        let ControlMessage::Hello {
            version,
            migration_id,
            token,
            ram_bytes,
            page_size,
            ..
        } = hello
        else {
            return Err("first message is not hello".into());
        };
        let inc = self
            .get_prepared(&migration_id, HELLO_WAITS_FOR_PREPARE)
            .await
            .ok_or_else(|| {
                format!(
                    "unknown migration {migration_id} (not prepared here within {} s)",
                    HELLO_WAITS_FOR_PREPARE.as_secs()
                )
            })?;
        if peer.name != inc.peer {
            return Err(format!(
                "migration {migration_id} was prepared by agent {}, not by agent {}",
                inc.peer, peer.name
            ));
        }
        if token != inc.token {
            return Err("wrong migration token".into());
        }
        if !ferry_wire::version_supported(version) {
            return Err(format!("protocol version {version} not supported"));
        }
        let ram_len = inc
            .ram()
            .map(|r| r.len())
            .ok_or("the migration has ended")?;
        if ram_bytes != ram_len || page_size as usize != PAGE_SIZE {
            return Err(format!("RAM size {ram_bytes} / page size {page_size} do not match the prepared VM ({ram_len} bytes)"));
        }
        {
            let mut st = inc.state.lock().await;
            if *st != State::prepared() {
                return Err("migration already connected or finished".into());
            }
            st.connected = true;
        }
        crate::failpoint::hit("tgt.hello.done", &self.cfg.state_dir).await?;
        ctl.send(&ControlMessage::HelloOk {
            version: PROTOCOL_VERSION,
        })
        .await
        .map_err(|e| e.to_string())?;
        Ok(inc)
    }

    /// Runs the data plane until the connection ends; returns why it ended.
    async fn serve(
        &self,
        conn: &quinn::Connection,
        inc: &Arc<Incoming>,
        ctl: ControlChannel,
    ) -> String {
        let (mut w, r) = ctl.split();
        let mut rx = spawn_control_reader(r);
        let (err_tx, mut err_rx) = mpsc::channel::<String>(8);
        let acceptor = tokio::spawn(accept_streams(conn.clone(), inc.clone(), err_tx));
        let mut loaded = inc.loaded.clone();
        let (digest_tx, mut digest_rx) = mpsc::channel::<Result<u128, String>>(1);
        let mut seen = SwitchoverSeen::default();
        let reason = loop {
            let loaded_now = loaded.borrow().clone();
            if let Some((v, leave_paused)) = seen.verdict(loaded_now.as_ref()) {
                info!(migration = %inc.id, "switchover here (ms after the final round was announced): {}", seen.timeline);
                let reply = match self.commit_decided(inc, v, leave_paused).await {
                    Ok((resume_unix_us, ready_unix_us)) => ControlMessage::Committed {
                        resume_unix_us,
                        ready_unix_us,
                    },
                    Err(s) => ControlMessage::Error {
                        message: s.message().to_string(),
                    },
                };
                let committed = matches!(reply, ControlMessage::Committed { .. });
                if let Err(e) = send(&mut w, &reply).await {
                    break e;
                }
                if committed {
                    // Let the answer reach the source: it closes the connection.
                    let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
                    break "committed".into();
                }
            }
            tokio::select! {
                Some(d) = digest_rx.recv() => {
                    if seen.digest_wanted {
                        match &d {
                            Ok(f) => {
                                if let Err(e) = send(&mut w, &ControlMessage::Digest { xxh3_128: f.to_le_bytes() }).await {
                                    break e;
                                }
                            }
                            Err(e) => break format!("fingerprint of the RAM file: {e}"),
                        }
                    }
                    seen.digest = Some(d);
                    seen.timeline.mark(Step::Fingerprint);
                }

                msg = rx.recv() => match msg.map(|r| r.map(|a| a.msg)) {
                    Some(Ok(m @ (ControlMessage::RoundEnd { .. } | ControlMessage::FinalRoundEnd { .. }))) => {
                        if matches!(m, ControlMessage::FinalRoundEnd { .. }) {
                            seen.timeline.mark(Step::FinalAnnounced);
                        }
                        let (round, batches_total, last, verify) = match m {
                            ControlMessage::RoundEnd { round, batches_total } => (round, batches_total, false, false),
                            ControlMessage::FinalRoundEnd { round, batches_total, verify } => (round, batches_total, true, verify),
                            _ => (0, 0, false, false),
                        };
                        tokio::select! {
                            _ = inc.applied.wait_through(round, batches_total) => {}
                            e = err_rx.recv() => break e.unwrap_or_else(|| "page streams ended".into()),
                            _ = tokio::time::sleep(Duration::from_secs(120)) => break "timed out waiting for page batches".into(),
                        }
                        let batches_applied = inc.applied.frames_through(round);
                        if last {
                            // Every page is in place: the held device state may reach QEMU,
                            // and our fingerprint can be taken while it loads.
                            if let Err(e) = crate::failpoint::hit("tgt.final_round.applied", &self.cfg.state_dir).await {
                                break e;
                            }
                            inc.final_applied.send_replace(true);
                            seen.timeline.mark(Step::PagesWritten);
                            if verify {
                                spawn_fingerprint(inc, digest_tx.clone());
                            }
                        }
                        if let Err(e) = send(&mut w, &ControlMessage::RoundApplied { round, batches_applied }).await {
                            break e;
                        }
                    }
                    Some(Ok(ControlMessage::DigestRequest)) => {
                        seen.digest_wanted = true;
                        match &seen.digest {
                            Some(Ok(f)) => {
                                if let Err(e) = send(&mut w, &ControlMessage::Digest { xxh3_128: f.to_le_bytes() }).await {
                                    break e;
                                }
                            }
                            Some(Err(e)) => break format!("fingerprint of the RAM file: {e}"),
                            None => spawn_fingerprint(inc, digest_tx.clone()),
                        }
                    }
                    Some(Ok(ControlMessage::Commit { digest, leave_paused })) => {
                        seen.timeline.mark(Step::CommitAsked);
                        seen.commit = Some((digest.map(u128::from_le_bytes), leave_paused));
                    }
                    Some(Ok(ControlMessage::Error { message })) => break format!("source reported: {message}"),
                    Some(Ok(other)) => break format!("unexpected control message {other:?}"),
                    Some(Err(e)) => break format!("source connection lost: {e}"),
                    None => break "control stream ended".into(),
                },
                e = err_rx.recv() => break e.unwrap_or_else(|| "stream acceptor ended".into()),
                e = inc.qemu.failure() => break format!("the target QEMU on {}: {e}", self.host()),
                r = loaded.changed(), if !seen.loaded_reported => {
                    if r.is_err() {
                        seen.loaded_reported = true;
                        continue;
                    }
                    let v = loaded.borrow().clone();
                    if let Some(v) = v {
                        seen.loaded_reported = true;
                        seen.timeline.mark(Step::DeviceStateLoaded);
                        if let Err(e) = crate::failpoint::hit("tgt.device_state.loaded", &self.cfg.state_dir).await {
                            break e;
                        }
                        let msg = ControlMessage::DeviceStateLoaded { ok: v.is_ok(), error: v.err() };
                        if let Err(e) = send(&mut w, &msg).await {
                            break e;
                        }
                    }
                }
                _ = inc.cancel.cancelled() => break "finished".into(),
            }
        };
        acceptor.abort();
        if reason != "finished" {
            // The source hears why, instead of only a closed connection.
            let msg = ControlMessage::Error {
                message: reason.clone(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                if send(&mut w, &msg).await.is_ok() {
                    w.finish_and_flush(Duration::from_secs(1)).await;
                }
            })
            .await;
        }
        reason
    }
}

/// What the target's data plane has seen of the switchover, beside the ownership state
/// ([`Receiver`]) it decides with.
#[derive(Debug, Default)]
struct SwitchoverSeen {
    /// The device state's load result went to the source.
    loaded_reported: bool,
    /// Our RAM fingerprint, once the final round is in.
    digest: Option<Result<u128, String>>,
    /// The source asked for the fingerprint explicitly (`DigestRequest`) rather than
    /// sending its own with the Commit.
    digest_wanted: bool,
    /// The source's Commit (its fingerprint, leave paused), waiting for the device state
    /// and our fingerprint.
    commit: Option<(Option<u128>, bool)>,
    timeline: Timeline,
}

impl SwitchoverSeen {
    /// Once a Commit is pending and everything [`decide_commit`] needs is in: the verdict
    /// and whether to leave the guest paused (the pending Commit is taken).
    fn verdict(
        &mut self,
        loaded: Option<&Result<(), String>>,
    ) -> Option<(Result<(), String>, bool)> {
        let (theirs, leave_paused) = self.commit?;
        let v = decide_commit(loaded, theirs, self.digest.as_ref())?;
        self.commit = None;
        self.timeline.mark(Step::Deciding);
        Some((v, leave_paused))
    }
}

/// A switchover step as the target sees it.
#[derive(Debug, Clone, Copy)]
enum Step {
    FinalAnnounced,
    PagesWritten,
    Fingerprint,
    DeviceStateLoaded,
    CommitAsked,
    Deciding,
}

/// When each switchover step was seen here, for the log.
#[derive(Debug, Default)]
struct Timeline([Option<std::time::Instant>; 6]);

impl Timeline {
    fn mark(&mut self, step: Step) {
        self.0[step as usize] = Some(std::time::Instant::now());
    }
}

impl std::fmt::Display for Timeline {
    /// Milliseconds after the final round was announced, per step.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = [
            "pages written",
            "fingerprint",
            "device state loaded",
            "commit asked",
            "deciding",
        ];
        let t0 = self.0[Step::FinalAnnounced as usize];
        for (i, name) in names.iter().enumerate() {
            let ms = match (t0, self.0[i + 1]) {
                (Some(t0), Some(t)) => format!("{:.1}", t.duration_since(t0).as_secs_f64() * 1e3),
                _ => "-".into(),
            };
            write!(f, "{}{name} {ms}", if i > 0 { ", " } else { "" })?;
        }
        Ok(())
    }
}

/// The target's RAM fingerprint, from the per-page sums kept while writing (every page
/// here was written by this agent; the paused QEMU writes none), on the blocking pool.
fn spawn_fingerprint(inc: &Incoming, tx: mpsc::Sender<Result<u128, String>>) {
    let sums = inc.sums.clone();
    tokio::task::spawn_blocking(move || {
        let _ = tx.try_send(Ok(sums.fingerprint()));
    });
}

/// Counts the probe bytes until the source finishes, reporting the running count (u64)
/// every 100 ms and once more at the end, so the source can measure the steady rate
/// after the congestion controller's start-up.
async fn serve_probe(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let start = std::time::Instant::now();
    let mut last_report = start;
    // Each report: bytes received so far and when (µs on this side's clock), so the
    // source's rate estimate does not depend on when the reports reach it.
    let report = |total: u64| {
        let mut r = [0u8; 16];
        r[..8].copy_from_slice(&total.to_le_bytes());
        r[8..].copy_from_slice(&(start.elapsed().as_micros() as u64).to_le_bytes());
        r
    };
    // A probe is bounded: never read more than 1 GiB.
    while total < 1 << 30 {
        match recv.read(&mut buf).await.map_err(|e| e.to_string())? {
            Some(n) => total += n as u64,
            None => break,
        }
        if last_report.elapsed() >= Duration::from_millis(50) {
            last_report = std::time::Instant::now();
            send.write_all(&report(total))
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    send.write_all(&report(total))
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    // Let the answer leave before the connection is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
    Ok(())
}

async fn send(w: &mut ferry_transport::FrameWriter, msg: &ControlMessage) -> Result<(), String> {
    let bytes = Frame::encode_control(msg).map_err(|e| e.to_string())?;
    w.write(&bytes)
        .await
        .map_err(|e| format!("control stream: {e}"))
}

/// Accepts the page streams and the device-state stream of one migration.
async fn accept_streams(conn: quinn::Connection, inc: Arc<Incoming>, err_tx: mpsc::Sender<String>) {
    loop {
        tokio::select! {
            s = conn.accept_uni() => match s {
                Ok(mut recv) => {
                    let (inc, err_tx) = (inc.clone(), err_tx.clone());
                    // On the thread that runs QUIC: the reader is woken without a switch.
                    ferry_transport::data_plane::spawn(async move {
                        let r = match read_stream_header(&mut recv).await {
                            Ok(h) if h.kind == StreamKind::Pages => {
                                match inc.ram() {
                                    Some(ram) => apply_page_stream(FrameReader::new(recv), ram, inc.applied.clone(), inc.sums.clone()).await.map_err(|e| format!("page stream {}: {e}", h.index)),
                                    None => Err("page stream after the migration ended".to_string()),
                                }
                            }
                            Ok(h) => Err(format!("unexpected {:?} stream", h.kind)),
                            Err(e) => Err(format!("page stream header: {e}")),
                        };
                        if let Err(e) = r {
                            let _ = err_tx.send(e).await;
                        }
                    });
                }
                Err(e) => {
                    let _ = err_tx.send(format!("source connection: {e}")).await;
                    return;
                }
            },
            s = conn.accept_bi() => match s {
                Ok((send, mut recv)) => {
                    let (inc, err_tx) = (inc.clone(), err_tx.clone());
                    tokio::spawn(async move {
                        match read_stream_header(&mut recv).await {
                            Ok(h) if h.kind == StreamKind::DeviceState => {}
                            Ok(h) if h.kind == StreamKind::NbdTunnel => {
                                let Some((sock, _)) = inc.nbd.clone() else {
                                    let _ = err_tx.send("NBD tunnel opened but no disk travels".to_string()).await;
                                    return;
                                };
                                match tokio::net::UnixStream::connect(&sock).await {
                                    Ok(unix) => {
                                        // Replies are small: not worth compressing.
                                        let counters = Arc::new(super::disks::TunnelCounters::default());
                                        if let Err(e) = super::disks::tunnel(unix, send, recv, ferry_wire::Codec::None, counters).await {
                                            warn!(migration = %inc.id, "NBD tunnel: {e}");
                                        }
                                    }
                                    Err(e) => {
                                        let _ = err_tx.send(format!("cannot connect to the target QEMU's NBD server at {}: {e}", sock.display())).await;
                                    }
                                }
                                return;
                            }
                            Ok(h) => {
                                let _ = err_tx.send(format!("unexpected {:?} stream", h.kind)).await;
                                return;
                            }
                            Err(e) => {
                                let _ = err_tx.send(format!("device-state header: {e}")).await;
                                return;
                            }
                        }
                        // The source lets QEMU send the device state while the final pages
                        // are still on their way: hold it until they are all written
                        // (loading devices reads guest RAM).
                        let mut fin = inc.final_applied.subscribe();
                        let held = matches!(tokio::time::timeout(Duration::from_secs(300), fin.wait_for(|done| *done)).await, Ok(Ok(_)));
                        if !held {
                            let _ = err_tx.send("the final round never completed".to_string()).await;
                            return;
                        }
                        // Loading devices is QEMU's first touch of guest RAM: every page must
                        // have its memory by then (a hole on a full tmpfs would be a SIGBUS).
                        let mut reserved = inc.reserved.clone();
                        let outcome = match tokio::time::timeout(Duration::from_secs(300), reserved.wait_for(|r| r.is_some())).await {
                            Ok(Ok(r)) => r.clone().unwrap_or(Ok(())),
                            _ => Err("the RAM file's allocation never finished".to_string()),
                        };
                        if let Err(e) = outcome {
                            let _ = err_tx.send(format!("cannot allocate the guest's RAM on this host: {e}")).await;
                            return;
                        }
                        // QEMU listens once migrate-incoming ran (it starts during pre-copy).
                        if let Err(e) = inc.qemu.get().await {
                            let _ = err_tx.send(format!("the target QEMU: {e}")).await;
                            return;
                        }
                        let mut unix = None;
                        for _ in 0..50 {
                            match tokio::net::UnixStream::connect(&inc.incoming_sock).await {
                                Ok(u) => {
                                    unix = Some(u);
                                    break;
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                            }
                        }
                        let Some(unix) = unix else {
                            let _ = err_tx.send(format!("cannot connect to target QEMU at {}", inc.incoming_sock.display())).await;
                            return;
                        };
                        // The stream stays open (not reset) until the state is relayed.
                        let _send = send;
                        // A corrupt or cut stream ends the serve loop with its cause (the
                        // source hears it); QEMU sees its socket close and fails its load.
                        if let Err(e) = relay_to_qemu(unix, recv).await {
                            warn!(migration = %inc.id, "device-state relay: {e}");
                            let _ = err_tx.send(format!("device-state relay: {e}")).await;
                        }
                    });
                }
                Err(e) => {
                    let _ = err_tx.send(format!("source connection: {e}")).await;
                    return;
                }
            },
        }
    }
}

/// Where the target QEMU listens for the device state (`migrate-incoming`).
fn incoming_socket(launch: &ferry_qemu::QemuLaunch) -> PathBuf {
    launch.run_dir.join("incoming.sock")
}

/// What starting an incoming migration's QEMU needs.
struct TargetQemuStart {
    vms: Arc<VmManager>,
    cfg: Arc<AgentConfig>,
    launch: ferry_qemu::QemuLaunch,
    name: String,
    migration: String,
    copy_disks: Vec<pb::DiskProbe>,
    /// Hears when QEMU has loaded the device state (or failed to).
    loaded: watch::Sender<Option<Result<(), String>>>,
}

impl TargetQemuStart {
    /// Starts the paused target QEMU (`-S -incoming defer`), records it with the VM, opens
    /// the NBD exports of the disks that travel and sets it listening for the device state
    /// on `RUN/incoming.sock`. A QEMU that started is killed if a later step fails; `hook`
    /// publishes it the moment it exists (a background start).
    async fn run(
        self,
        hook: Option<SpawnHook>,
    ) -> Result<(Arc<QemuProcess>, Option<(PathBuf, Vec<String>)>), String> {
        let TargetQemuStart {
            vms,
            cfg,
            launch,
            name,
            migration,
            copy_disks,
            loaded,
        } = self;
        let proc = QemuProcess::spawn(&launch, &cfg.qemu_binary)
            .await
            .map(Arc::new)
            .map_err(|e| format!("starting QEMU: {e}"))?;
        let setup = async {
            if hook.as_ref().is_some_and(|h| !h.spawned(&proc)) {
                return Err("the migration was discarded while its QEMU started".to_string());
            }
            // Between the spawn and its record: a crash here leaves a QEMU that only the run
            // directory's pidfile names (restart recovery kills it by that).
            crate::failpoint::hit("tgt.qemu.started", &cfg.state_dir).await?;
            vms.attach_incoming(&name, &migration, proc.clone())
                .await
                .map_err(|s| format!("recording QEMU: {}", s.message()))?;
            let qmp = proc.qmp();
            let nbd = if copy_disks.is_empty() {
                None
            } else {
                let sock = launch.run_dir.join("nbd.sock");
                let _ = std::fs::remove_file(&sock);
                qmp.nbd_server_start_unix(&sock.display().to_string())
                    .await
                    .map_err(|e| format!("nbd-server-start: {e}"))?;
                let mut exports = Vec::new();
                for d in &copy_disks {
                    let export = format!("ferry-exp-{}", d.id);
                    qmp.block_export_add_nbd(&export, &d.id, &d.id, true)
                        .await
                        .map_err(|e| format!("block-export-add: {e}"))?;
                    exports.push(export);
                }
                Some((sock, exports))
            };
            let mut events = qmp.subscribe();
            // No return path: the source QEMU completes (is fenced) as soon as its agent has
            // the device state. Late block activation: a shared image stays inactive here
            // until `cont`, so a rollback never finds it open for writing on both hosts.
            qmp.migrate_set_capabilities(&[
                ("x-ignore-shared", true),
                ("events", true),
                ("late-block-activate", true),
            ])
            .await
            .map_err(|e| format!("capabilities: {e}"))?;
            let sock = incoming_socket(&launch);
            let _ = std::fs::remove_file(&sock);
            qmp.migrate_incoming(&format!("unix:{}", sock.display()))
                .await
                .map_err(|e| format!("migrate-incoming: {e}"))?;
            tokio::spawn(async move {
                let r = ferry_qmp::wait_migration_status(
                    &mut events,
                    Duration::from_secs(24 * 3600),
                    &["completed", "failed"],
                )
                .await;
                let v = match r {
                    Ok(ev) if ev.migration_status() == Some("completed") => Ok(()),
                    Ok(ev) => Err(format!(
                        "target QEMU migration {}",
                        ev.migration_status().unwrap_or("?")
                    )),
                    Err(e) => Err(e.to_string()),
                };
                let _ = loaded.send(Some(v));
            });
            Ok::<_, String>(nbd)
        };
        match setup.await {
            Ok(nbd) => {
                info!(vm = %name, pid = proc.pid(), "target QEMU listening for the device state");
                Ok((proc, nbd))
            }
            Err(e) => {
                let _ = proc.kill().await;
                Err(e)
            }
        }
    }
}

fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_waits_for_the_device_state_and_both_fingerprints() {
        let mut seen = SwitchoverSeen::default();
        let loaded = Ok(());
        // No Commit yet: nothing to decide, whatever else is in.
        assert!(seen.verdict(Some(&loaded)).is_none());
        seen.commit = Some((Some(7), true));
        // Commit with the source's fingerprint: ours is still being computed.
        assert!(seen.verdict(Some(&loaded)).is_none());
        seen.digest = Some(Ok(7));
        // And the device state is not loaded yet.
        assert!(seen.verdict(None).is_none());
        let (v, leave_paused) = seen.verdict(Some(&loaded)).expect("decided");
        assert_eq!(v, Ok(()));
        assert!(leave_paused);
        assert!(seen.commit.is_none(), "the pending Commit is taken");
        assert!(seen.verdict(Some(&loaded)).is_none(), "decided once");
        // Fingerprints that differ: refused.
        seen.commit = Some((Some(8), false));
        let (v, _) = seen.verdict(Some(&loaded)).expect("decided");
        assert!(v.is_err(), "{v:?}");
    }

    #[test]
    fn the_timeline_reports_every_step_from_the_final_round() {
        let mut t = Timeline::default();
        assert_eq!(
            t.to_string(),
            "pages written -, fingerprint -, device state loaded -, commit asked -, deciding -"
        );
        t.mark(Step::FinalAnnounced);
        t.mark(Step::PagesWritten);
        let s = t.to_string();
        assert!(s.starts_with("pages written 0."), "{s}");
        assert!(s.ends_with("deciding -"), "{s}");
    }
}
