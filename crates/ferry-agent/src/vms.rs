//! The VMs this host owns: definitions, their supervised QEMU processes, and the
//! states they move through (including the two sides of a migration).

use crate::config::AgentConfig;
use crate::convert::spec_to_pb;
use crate::journal::{Fence, Journal, Op, VmRecord};
use ferry_api::v1 as pb;
use ferry_qemu::{QemuLaunch, QemuProcess, VmSpec};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tonic::Status;
use tracing::{error, info, warn};

/// One VM known to this host.
pub struct VmEntry {
    pub spec: VmSpec,
    pub state: pb::VmState,
    pub process: Option<Arc<QemuProcess>>,
    /// Migration this VM takes part in right now (either side).
    pub migration: Option<String>,
    /// QMP `cont` to RESUME of the last [`VmManager::resume`] (microseconds).
    pub resume_latency_us: u64,
    /// A start is under way without the registry's lock (its RAM being allocated, its
    /// QEMU spawning): admitted, its RAM counted as promised, and nothing else may change
    /// the VM until it ends. Not journaled: a restart finds no QEMU, or adopts it.
    pub starting: bool,
    /// A cold migration's copy on its way here (state `Incoming`): it arrives stopped.
    pub arriving_cold: bool,
    /// The cold migration that defined it here, until it first starts
    /// ([`VmRecord::arrived_by`]).
    pub arrived_by: Option<String>,
    /// Fenced ([`VmRecord::fenced`]): paused and held until the operator clears it.
    pub fenced: Option<Fence>,
}

/// What [`VmManager::remove_unless_a_disk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Removed.
    Removed,
    /// A VM (or a reserved name) has it as a disk: left.
    ADisk,
    /// Gone, replaced or given a second name since: not the file meant, left.
    NotThatFile,
}

/// The layers below this host's VMs' disks, read once when first asked
/// ([`VmManager::layers`]).
pub struct VmLayers<'a> {
    vms: &'a VmManager,
    read: Option<Result<std::collections::HashSet<std::path::PathBuf>, String>>,
}

impl VmLayers<'_> {
    /// Whether `path` is a layer below some VM's disk; an error when a chain could not
    /// be read (then nothing can be said to be no VM's layer).
    pub async fn holds(&mut self, path: &std::path::Path) -> Result<bool, String> {
        if self.read.is_none() {
            self.read = Some(self.vms.backing_layers().await);
        }
        let canonical = std::fs::canonicalize(path).unwrap_or(path.to_path_buf());
        match self.read.as_ref() {
            Some(Ok(below)) => Ok(below.contains(&canonical)),
            Some(Err(e)) => Err(e.clone()),
            None => Ok(false),
        }
    }
}

/// Registry and supervisor of this host's VMs.
pub struct VmManager {
    cfg: Arc<AgentConfig>,
    journal: Arc<Journal>,
    /// LD_PRELOAD shim that gives every QEMU a userfaultfd the agent can take.
    shim: Option<PathBuf>,
    storage: Arc<ferry_disk::StorageRoots>,
    /// Where direct-boot kernels and initrds may be read from (`boot_roots` that exist).
    boot: ferry_disk::StorageRoots,
    vms: tokio::sync::Mutex<HashMap<String, VmEntry>>,
}

fn journal_err(e: crate::journal::JournalError) -> Status {
    Status::internal(format!("journal: {e}"))
}

impl VmManager {
    pub fn new(
        cfg: Arc<AgentConfig>,
        journal: Arc<Journal>,
        shim: Option<PathBuf>,
        storage: Arc<ferry_disk::StorageRoots>,
    ) -> Arc<Self> {
        let existing: Vec<&PathBuf> = cfg.boot_roots.iter().filter(|r| r.is_dir()).collect();
        let boot = ferry_disk::StorageRoots::new(existing).unwrap_or_else(|e| {
            tracing::warn!("boot_roots: {e}; no direct-boot kernel will be accepted");
            ferry_disk::StorageRoots::empty()
        });
        Arc::new(VmManager {
            cfg,
            journal,
            shim,
            storage,
            boot,
            vms: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Refuses a spec naming a file this host must not hand to QEMU: disk images outside
    /// its storage roots, a kernel or initrd outside its boot roots. Run on every spec
    /// defined here and on every spec arriving with a migration.
    pub fn check_spec_paths(&self, spec: &VmSpec) -> Result<(), Status> {
        for (what, path) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
            let Some(path) = path else { continue };
            self.boot.confine(path).map_err(|_| {
                Status::permission_denied(format!(
                    "{what} {} of VM '{}' is outside host {}'s boot_roots {:?}: QEMU would read it with the agent's privileges",
                    path.display(),
                    spec.name,
                    self.cfg.host_name,
                    self.boot.roots()
                ))
            })?;
        }
        self.check_disk_paths(spec)
    }

    /// Refuses a spec arriving with a migration whose disk image another VM of this host
    /// already uses: a peer must not be able to take over a local VM's disk by naming
    /// it (on shared storage, say).
    pub async fn check_disks_unclaimed(&self, spec: &VmSpec) -> Result<(), Status> {
        let vms = self.vms.lock().await;
        for d in &spec.disks {
            let Ok(mine) = self.storage.confine(&d.path) else {
                continue;
            };
            for (name, e) in vms.iter().filter(|(n, _)| **n != spec.name) {
                for other in &e.spec.disks {
                    if self.storage.confine(&other.path).ok().as_ref() == Some(&mine) {
                        return Err(Status::failed_precondition(format!(
                            "disk '{}' of VM '{}': image {} is VM '{name}''s disk '{}' on host {}",
                            d.id,
                            spec.name,
                            mine.display(),
                            other.id,
                            self.cfg.host_name
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The VM of this host (defined, running or arriving) whose disk image is at `path`,
    /// if any (paths compared after confinement to the storage roots).
    pub async fn disk_owner(&self, path: &std::path::Path) -> Option<String> {
        let vms = self.vms.lock().await;
        vms.iter()
            .find(|(_, e)| self.has_disk(e, path))
            .map(|(n, _)| n.clone())
    }

    /// Whether VM entry `e` has a disk image at `path` (compared after confinement).
    fn has_disk(&self, e: &VmEntry, path: &std::path::Path) -> bool {
        e.spec
            .disks
            .iter()
            .any(|d| self.storage.confine(&d.path).ok().as_deref() == Some(path))
    }

    /// Every disk image path of this host's VMs (defined, running or arriving), confined
    /// to the storage roots.
    pub async fn disk_paths(&self) -> std::collections::HashSet<std::path::PathBuf> {
        let vms = self.vms.lock().await;
        vms.values()
            .flat_map(|e| e.spec.disks.iter())
            .filter_map(|d| self.storage.confine(&d.path).ok())
            .collect()
    }

    /// The VM of this host (defined, running or stopped; not a name reserved for an
    /// incoming migration) with a disk image at `path`.
    pub async fn vm_using(&self, path: &std::path::Path) -> Option<String> {
        let vms = self.vms.lock().await;
        vms.iter()
            .filter(|(_, e)| e.state != pb::VmState::Incoming)
            .find(|(_, e)| self.has_disk(e, path))
            .map(|(n, _)| n.clone())
    }

    /// Every layer below the disks of this host's VMs (reservations included), as
    /// `qemu-img` resolves their backing chains (canonical paths). An error when a chain
    /// cannot be read: then nothing can be said to be no VM's layer.
    pub async fn backing_layers(
        &self,
    ) -> Result<std::collections::HashSet<std::path::PathBuf>, String> {
        let disks: Vec<(std::path::PathBuf, ferry_disk::ImageFormat)> = {
            let vms = self.vms.lock().await;
            vms.values()
                .flat_map(|e| e.spec.disks.iter())
                .filter_map(|d| {
                    let top = self.storage.confine(&d.path).ok()?;
                    Some((top, crate::migration::disks::image_format(d.format)))
                })
                .collect()
        };
        tokio::task::spawn_blocking(move || {
            let mut layers = std::collections::HashSet::new();
            for (top, format) in disks {
                if !top.exists() {
                    continue;
                }
                let chain = ferry_disk::backing_chain_as(&top, format)
                    .map_err(|e| format!("{}: {e}", top.display()))?;
                layers.extend(chain.into_iter().skip(1).map(|l| l.path));
            }
            Ok(layers)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// The layers below this host's VMs' disks, read ([`Self::backing_layers`]) the first
    /// time [`VmLayers::holds`] is asked, then kept for the caller's pass.
    pub fn layers(&self) -> VmLayers<'_> {
        VmLayers {
            vms: self,
            read: None,
        }
    }

    /// Removes `path` if no VM of this host (nor a name reserved for an incoming
    /// migration other than `besides`) has it as a disk and it still names file `id`
    /// alone, holding the VMs' lock meanwhile so that none can be defined on it in between.
    pub async fn remove_unless_a_disk(
        &self,
        path: &std::path::Path,
        id: ferry_disk::FileId,
        besides: Option<&str>,
    ) -> Result<Removal, String> {
        let vms = self.vms.lock().await;
        let named = vms
            .values()
            .filter(|e| besides.is_none() || e.migration.as_deref() != besides)
            .any(|e| self.has_disk(e, path));
        if named {
            return Ok(Removal::ADisk);
        }
        let p = path.to_path_buf();
        let removed = tokio::task::spawn_blocking(move || ferry_disk::remove_if_same_file(&p, id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        drop(vms);
        Ok(if removed {
            Removal::Removed
        } else {
            Removal::NotThatFile
        })
    }

    /// Refuses a spec whose disk images lie outside this host's storage roots.
    pub fn check_disk_paths(&self, spec: &VmSpec) -> Result<(), Status> {
        for d in &spec.disks {
            if self.storage.roots().is_empty() {
                return Err(Status::invalid_argument(format!(
                    "disk '{}' of VM '{}': host {} has no storage_roots configured, so it keeps no disk images",
                    d.id, spec.name, self.cfg.host_name
                )));
            }
            self.storage.confine(&d.path).map_err(|e| {
                Status::invalid_argument(format!(
                    "disk '{}' of VM '{}' on host {}: {e}",
                    d.id, spec.name, self.cfg.host_name
                ))
            })?;
        }
        Ok(())
    }

    /// The QEMU launch of `spec` on this host.
    pub fn launch_for(&self, spec: &VmSpec, incoming: bool) -> QemuLaunch {
        let mut l = QemuLaunch::new(
            spec.clone(),
            self.cfg.accel.clone(),
            self.cfg.ram_path(&spec.name),
            self.cfg.run_dir(&spec.name),
        );
        l.incoming = incoming;
        l.preload = self.shim.clone();
        l.trace = self.cfg.qemu_trace.clone();
        l
    }

    fn info(&self, e: &VmEntry) -> pb::VmInfo {
        let l = self.launch_for(&e.spec, false);
        pb::VmInfo {
            spec: Some(spec_to_pb(&e.spec)),
            state: e.state as i32,
            pid: e.process.as_ref().map(|p| p.pid()).unwrap_or(0),
            qmp_socket: l.qmp_path().display().to_string(),
            console_socket: l.console_path().display().to_string(),
            console_log: l.console_log().display().to_string(),
            ram_file: l.ram_path.display().to_string(),
            resume_latency_us: e.resume_latency_us,
            fenced: e.fenced.as_ref().map(|f| f.to_string()).unwrap_or_default(),
        }
    }

    fn persist(&self, e: &VmEntry) -> Result<(), Status> {
        self.journal.put_vm(&record_of(e)).map_err(journal_err)
    }

    /// Defines a new VM. A name already in use is refused.
    pub async fn define(&self, spec: VmSpec) -> Result<pb::VmInfo, Status> {
        spec.validate()
            .map_err(|e| Status::invalid_argument(format!("VM spec: {e}")))?;
        self.check_spec_paths(&spec)?;
        let mut vms = self.vms.lock().await;
        if vms.contains_key(&spec.name) {
            return Err(Status::already_exists(format!(
                "VM '{}' is already defined on host {}",
                spec.name, self.cfg.host_name
            )));
        }
        let e = VmEntry {
            spec,
            state: pb::VmState::Defined,
            process: None,
            migration: None,
            resume_latency_us: 0,
            starting: false,
            arriving_cold: false,
            arrived_by: None,
            fenced: None,
        };
        self.persist(&e)?;
        let info = self.info(&e);
        vms.insert(e.spec.name.clone(), e);
        Ok(info)
    }

    /// Removes a stopped VM's definition.
    pub async fn undefine(&self, name: &str) -> Result<pb::VmInfo, Status> {
        let mut vms = self.vms.lock().await;
        let e = vms.get(name).ok_or_else(|| self.unknown(name))?;
        not_starting(e)?;
        if let Some(m) = &e.migration {
            return Err(Status::failed_precondition(format!(
                "VM '{name}' is migrating ({m}): wait for the migration or cancel it"
            )));
        }
        if !matches!(e.state, pb::VmState::Defined | pb::VmState::Crashed) {
            return Err(Status::failed_precondition(format!(
                "VM '{name}' is {}: stop it before undefining",
                state_name(e.state)
            )));
        }
        let info = self.info(e);
        self.journal.remove_vm(name).map_err(journal_err)?;
        vms.remove(name);
        Ok(info)
    }

    fn unknown(&self, name: &str) -> Status {
        Status::not_found(format!(
            "no VM named '{name}' on host {}",
            self.cfg.host_name
        ))
    }

    /// Starts a defined VM's QEMU: admitted under the registry's lock, then its RAM
    /// allocated (`memory_prealloc`) and its QEMU spawned without it (a whole-file
    /// allocation takes ~240 ms per GiB, and an incoming migration's commit must not wait
    /// behind it), on a task of its own so that a caller that goes away leaves neither a
    /// half-started VM nor its RAM file.
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<pb::VmInfo, Status> {
        let (spec, launch) = {
            let mut vms = self.vms.lock().await;
            let e = vms.get(name).ok_or_else(|| self.unknown(name))?;
            not_starting(e)?;
            not_fenced(e, &self.cfg.host_name, "start")?;
            if let Some(m) = &e.migration {
                // A VM being copied away (cold migration) must not change under the copy.
                return Err(Status::failed_precondition(format!(
                    "VM '{name}' is migrating ({m}): wait for the migration or cancel it"
                )));
            }
            if !matches!(e.state, pb::VmState::Defined | pb::VmState::Crashed) {
                return Err(Status::failed_precondition(format!(
                    "VM '{name}' is already {}",
                    state_name(e.state)
                )));
            }
            let spec = e.spec.clone();
            // The admission a migration's target applies: room for all of this guest's
            // RAM beside what the guests already here may still take.
            self.admit_ram(&vms, &spec).map_err(|why| {
                Status::resource_exhausted(format!(
                    "host {} cannot start VM '{name}': {why}",
                    self.cfg.host_name
                ))
            })?;
            if e.arrived_by.is_some() {
                // Journaled before QEMU spawns: from here the VM has a life of its own on
                // this host, which a verdict elsewhere must not undefine.
                let mut rec = record_of(e);
                rec.arrived_by = None;
                self.journal.put_vm(&rec).map_err(journal_err)?;
                if let Some(e) = vms.get_mut(name) {
                    e.arrived_by = None;
                }
            }
            let launch = self.launch_for(&spec, false);
            prepare_dirs(&launch).map_err(|err| Status::internal(format!("VM '{name}': {err}")))?;
            // A RAM file left by a crash would be reused by QEMU: start from a clean one.
            let _ = std::fs::remove_file(&launch.ram_path);
            if let Some(e) = vms.get_mut(name) {
                e.starting = true;
            }
            (spec, launch)
        };
        let me = self.clone();
        let name = name.to_string();
        crate::to_completion("starting the VM", async move {
            me.finish_start(&name, spec, launch).await
        })
        .await
    }

    /// The rest of [`Self::start`], the VM marked `starting`: RAM, QEMU, then the record.
    async fn finish_start(
        self: &Arc<Self>,
        name: &str,
        spec: VmSpec,
        launch: QemuLaunch,
    ) -> Result<pb::VmInfo, Status> {
        let spawned = async {
            if spec.memory_prealloc {
                preallocate_ram(&launch.ram_path, spec.memory_mib << 20)
                    .await
                    .map_err(|err| {
                        Status::resource_exhausted(format!(
                            "VM '{name}' on host {}: cannot allocate its {} MiB of RAM: {err}",
                            self.cfg.host_name, spec.memory_mib
                        ))
                    })?;
            }
            QemuProcess::spawn(&launch, &self.cfg.qemu_binary)
                .await
                .map_err(|err| {
                    Status::internal(format!(
                        "starting VM '{name}' on host {}: {err}",
                        self.cfg.host_name
                    ))
                })
        }
        .await;
        let mut vms = self.vms.lock().await;
        // Nothing removes a starting VM (undefine and migrations refuse it).
        let Some(e) = vms.get_mut(name) else {
            return Err(self.unknown(name));
        };
        e.starting = false;
        let proc = match spawned {
            Ok(p) => Arc::new(p),
            Err(s) => {
                // A preallocated file holds the guest's whole RAM: not left behind.
                let _ = std::fs::remove_file(&launch.ram_path);
                return Err(s);
            }
        };
        e.process = Some(proc.clone());
        e.state = pb::VmState::Running;
        self.persist(e)?;
        let info = self.info(e);
        drop(vms);
        self.supervise(name.to_string(), proc);
        info!(vm = name, "started");
        Ok(info)
    }

    /// Watches a QEMU process: an exit nobody asked for marks the VM crashed.
    pub fn supervise(self: &Arc<Self>, name: String, proc: Arc<QemuProcess>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let exit = proc.wait_exit().await;
            let Some(me) = me.upgrade() else { return };
            let mut vms = me.vms.lock().await;
            if let Some(e) = vms.get_mut(&name) {
                let same = e.process.as_ref().is_some_and(|p| p.pid() == proc.pid());
                if same {
                    warn!(vm = %name, ?exit, "QEMU exited unexpectedly");
                    e.process = None;
                    e.state = pb::VmState::Crashed;
                    let _ = me.persist(e);
                }
            }
        });
    }

    /// Stops a VM: ACPI power-down with a grace period, or at once with `force`.
    pub async fn stop(&self, name: &str, force: bool) -> Result<pb::VmInfo, Status> {
        let proc = {
            let mut vms = self.vms.lock().await;
            let e = vms.get_mut(name).ok_or_else(|| self.unknown(name))?;
            if e.migration.is_some() {
                return Err(Status::failed_precondition(format!(
                    "VM '{name}' is migrating: cancel the migration first"
                )));
            }
            let Some(p) = e.process.take() else {
                return Err(Status::failed_precondition(format!(
                    "VM '{name}' is not running"
                )));
            };
            e.state = pb::VmState::Defined;
            self.persist(e)?;
            p
        };
        if !force {
            let _ = proc.qmp().system_powerdown().await;
            if tokio::time::timeout(Duration::from_secs(20), proc.wait_exit())
                .await
                .is_err()
            {
                warn!(vm = name, "guest ignored power-down; quitting QEMU");
            }
        }
        proc.shutdown(Duration::from_secs(5))
            .await
            .map_err(|e| Status::internal(format!("stopping VM '{name}': {e}")))?;
        let _ = std::fs::remove_file(self.cfg.ram_path(name));
        self.get(name).await
    }

    /// Pauses a running guest's vCPUs (QMP `stop`); its QEMU keeps running.
    pub async fn suspend(&self, name: &str) -> Result<pb::VmInfo, Status> {
        let mut vms = self.vms.lock().await;
        let e = vms.get_mut(name).ok_or_else(|| self.unknown(name))?;
        let proc = match (&e.process, e.state) {
            (Some(p), pb::VmState::Running) if e.migration.is_none() => p.clone(),
            _ => {
                return Err(Status::failed_precondition(format!(
                    "VM '{name}' is {}: only a running VM can be suspended",
                    state_name(e.state)
                )))
            }
        };
        proc.qmp()
            .stop()
            .await
            .map_err(|err| Status::internal(format!("suspending VM '{name}': {err}")))?;
        e.state = pb::VmState::Paused;
        Ok(self.info(e))
    }

    /// Resumes a paused guest (QMP `cont`), noting how long QEMU took to report RESUME.
    pub async fn resume(&self, name: &str) -> Result<pb::VmInfo, Status> {
        let mut vms = self.vms.lock().await;
        let e = vms.get_mut(name).ok_or_else(|| self.unknown(name))?;
        if let Some(m) = &e.migration {
            return Err(Status::failed_precondition(format!(
                "VM '{name}' is held by migration {m} (its outcome is being settled with the target): resuming it here could run it on two hosts"
            )));
        }
        not_fenced(e, &self.cfg.host_name, "resume")?;
        let proc = match (&e.process, e.state) {
            (Some(p), pb::VmState::Paused) => p.clone(),
            _ => {
                return Err(Status::failed_precondition(format!(
                    "VM '{name}' is {}: only a paused VM can be resumed",
                    state_name(e.state)
                )))
            }
        };
        let qmp = proc.qmp();
        let mut events = qmp.subscribe();
        let asked = std::time::SystemTime::now();
        qmp.cont()
            .await
            .map_err(|err| Status::internal(format!("resuming VM '{name}': {err}")))?;
        let resumed = ferry_qmp::wait_for_event(&mut events, Duration::from_secs(10), |ev| {
            ev.name == "RESUME"
        })
        .await
        .map(|ev| ev.timestamp)
        .unwrap_or_else(|_| std::time::SystemTime::now());
        e.resume_latency_us = resumed
            .duration_since(asked)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        e.state = pb::VmState::Running;
        Ok(self.info(e))
    }

    /// Fences the copy of a VM that ran here after migration `fence.migration`'s commit,
    /// its source having taken the VM back on its operator's verdict: the fence is journaled
    /// first (a restart pauses a guest it finds running), then a guest that has a QEMU is
    /// paused (QMP `stop`, also when this agent believes it paused already: a `cont` behind
    /// its back would go unseen; a QEMU that does not answer within [`FENCE_PAUSE_WAIT`] is
    /// killed: the VM's other copy runs). Start, resume and migrate are refused until
    /// [`Self::clear_fence`]; stop and undefine stay the operator's. UNAVAILABLE while a
    /// start or a migration of the VM is under way here (the source tells again); `None`
    /// when no VM of that name is here. The caller runs it to completion (a caller that
    /// gives up must not leave a QEMU neither paused nor killed).
    pub async fn fence(&self, name: &str, fence: Fence) -> Result<Option<FenceDone>, Status> {
        let mut vms = self.vms.lock().await;
        let Some(e) = vms.get_mut(name) else {
            return Ok(None);
        };
        let step = fence_step(e.state, e.starting, e.migration.is_some());
        if step == FenceStep::NotNow {
            return Err(Status::unavailable(format!(
                "VM '{name}' on host {} is {}: fence it later",
                self.cfg.host_name,
                if e.starting { "starting" } else { "migrating" }
            )));
        }
        // The same news told again keeps the first fence's time.
        let new = e.fenced.as_ref().map(|f| &f.migration) != Some(&fence.migration);
        if new {
            self.journal_fence(e, Some(fence))?;
        }
        let proc = match (step, &e.process) {
            (FenceStep::Pause, Some(p)) => p.clone(),
            _ => {
                return Ok(Some(FenceDone {
                    new,
                    guest: FencedGuest::NotRunning,
                }))
            }
        };
        let ran = e.state == pb::VmState::Running;
        let guest = match proc
            .qmp()
            .execute_timeout("stop", None, FENCE_PAUSE_WAIT)
            .await
        {
            Ok(_) => {
                e.state = pb::VmState::Paused;
                if ran {
                    FencedGuest::Paused
                } else {
                    FencedGuest::NotRunning
                }
            }
            Err(err) => {
                error!(vm = %name, "fencing: pausing the guest failed ({err}); killing its QEMU");
                let _ = proc.kill().await;
                e.process = None;
                e.state = pb::VmState::Crashed;
                FencedGuest::Killed
            }
        };
        Ok(Some(FenceDone { new, guest }))
    }

    /// Fences a copy that does not run here (no QEMU, nothing under way with it) and
    /// returns true; leaves anything else as it is (false): a guest that runs is never
    /// stopped this way. The cold source's hold when its target started the VM before it
    /// heard that the verdict took the VM back ([`crate::journal::FenceWhy::StartedThere`]).
    pub async fn fence_if_stopped(&self, name: &str, fence: Fence) -> Result<bool, Status> {
        let mut vms = self.vms.lock().await;
        let Some(e) = vms.get_mut(name) else {
            return Ok(false);
        };
        if fence_step(e.state, e.starting, e.migration.is_some()) != FenceStep::Hold {
            return Ok(false);
        }
        if e.fenced.as_ref().map(|f| &f.migration) != Some(&fence.migration) {
            self.journal_fence(e, Some(fence))?;
        }
        Ok(true)
    }

    /// Sets (or, `None`, lifts) a VM's fence: journaled first, then in memory.
    fn journal_fence(&self, e: &mut VmEntry, fence: Option<Fence>) -> Result<(), Status> {
        let mut rec = record_of(e);
        rec.fenced = fence.clone();
        self.journal.put_vm(&rec).map_err(journal_err)?;
        e.fenced = fence;
        Ok(())
    }

    /// Lifts a fence ([`Self::fence`]): the operator has settled which copy lives. The
    /// guest stays as it is (paused) until resumed.
    pub async fn clear_fence(&self, name: &str) -> Result<pb::VmInfo, Status> {
        let mut vms = self.vms.lock().await;
        let e = vms.get_mut(name).ok_or_else(|| self.unknown(name))?;
        let Some(f) = e.fenced.clone() else {
            return Err(Status::failed_precondition(format!(
                "VM '{name}' on host {} is not fenced",
                self.cfg.host_name
            )));
        };
        self.journal_fence(e, None)?;
        warn!(vm = %name, migration = %f.migration, "fence cleared by the operator");
        Ok(self.info(e))
    }

    /// The migration a VM takes part in right now, if any.
    pub async fn migration_of(&self, name: &str) -> Option<String> {
        self.vms
            .lock()
            .await
            .get(name)
            .and_then(|e| e.migration.clone())
    }

    /// A VM's spec and, if it runs, its QEMU.
    pub async fn spec_and_process(
        &self,
        name: &str,
    ) -> Result<(VmSpec, Option<Arc<QemuProcess>>), Status> {
        let vms = self.vms.lock().await;
        let e = vms.get(name).ok_or_else(|| self.unknown(name))?;
        Ok((e.spec.clone(), e.process.clone()))
    }

    pub async fn get(&self, name: &str) -> Result<pb::VmInfo, Status> {
        let vms = self.vms.lock().await;
        vms.get(name)
            .map(|e| self.info(e))
            .ok_or_else(|| self.unknown(name))
    }

    pub async fn list(&self) -> Vec<pb::VmInfo> {
        let vms = self.vms.lock().await;
        let mut v: Vec<_> = vms.values().map(|e| self.info(e)).collect();
        v.sort_by(|a, b| {
            a.spec
                .as_ref()
                .map(|s| &s.name)
                .cmp(&b.spec.as_ref().map(|s| &s.name))
        });
        v
    }

    /// Guest RAM the VMs with a QEMU here, or arriving, may still take: each one's size
    /// less what its RAM file holds ([`crate::preflight::ram_promised`]).
    pub async fn ram_promised(&self) -> u64 {
        let vms = self.vms.lock().await;
        self.promised_in(&vms)
    }

    /// Whether this host can hold all of `spec`'s RAM beside what the guests in `vms`
    /// (the caller holds the lock) may still take ([`crate::preflight::memory_admission`]);
    /// why not, if it cannot.
    fn admit_ram(&self, vms: &HashMap<String, VmEntry>, spec: &VmSpec) -> Result<(), String> {
        crate::preflight::memory_admission(
            spec.memory_mib << 20,
            crate::preflight::mem_available(),
            crate::preflight::fs_free(&self.cfg.ram_dir),
            self.cfg.migration.memory_reserve_mib << 20,
            self.promised_in(vms),
        )
    }

    /// [`Self::ram_promised`] of the VMs in `vms` (the caller holds the lock).
    fn promised_in(&self, vms: &HashMap<String, VmEntry>) -> u64 {
        crate::preflight::ram_promised(
            vms.values()
                .filter(|e| {
                    e.starting
                        || matches!(
                            e.state,
                            pb::VmState::Running
                                | pb::VmState::Paused
                                | pb::VmState::Migrating
                                | pb::VmState::Incoming
                        ) && !is_cold_arrival(e)
                })
                .map(|e| {
                    let path = self.cfg.ram_path(&e.spec.name);
                    (e.spec.memory_mib << 20, allocated_bytes(&path))
                }),
        )
    }

    /// Marks a running (or suspended) VM as the source of `migration`, journaled, and
    /// hands out its spec, its process and whether the guest was running.
    pub async fn begin_outgoing(
        &self,
        name: &str,
        migration: &str,
    ) -> Result<(VmSpec, Arc<QemuProcess>, bool), Status> {
        let mut vms = self.vms.lock().await;
        let e = vms.get_mut(name).ok_or_else(|| self.unknown(name))?;
        if let Some(m) = &e.migration {
            return Err(Status::failed_precondition(format!(
                "VM '{name}' is already migrating ({m})"
            )));
        }
        not_fenced(e, &self.cfg.host_name, "migrate")?;
        let proc = match (&e.process, e.state) {
            (Some(p), pb::VmState::Running | pb::VmState::Paused) => p.clone(),
            _ => {
                return Err(Status::failed_precondition(format!(
                    "VM '{name}' is {} on host {}: live migration needs a running VM",
                    state_name(e.state),
                    self.cfg.host_name
                )))
            }
        };
        let was_running = e.state == pb::VmState::Running;
        e.migration = Some(migration.to_string());
        e.state = pb::VmState::Migrating;
        self.persist(e)?;
        Ok((e.spec.clone(), proc, was_running))
    }

    /// The VM's journal record while held by `migration` (for the source's `CommitSent`
    /// transaction).
    pub async fn held_record(&self, name: &str) -> Result<VmRecord, Status> {
        let vms = self.vms.lock().await;
        let e = vms.get(name).ok_or_else(|| self.unknown(name))?;
        Ok(record_of(e))
    }

    /// After a restart: holds a VM for an unsettled outgoing migration (nothing may
    /// resume, start, stop or migrate it until settled).
    pub async fn hold(&self, name: &str, migration: &str) {
        if let Some(e) = self.vms.lock().await.get_mut(name) {
            e.migration = Some(migration.to_string());
            e.state = pb::VmState::Migrating;
        }
    }

    /// Ends the source side. Committed: the VM now lives on the target, so this host
    /// forgets it (its QEMU is torn down by the caller). Otherwise it runs here again.
    /// `running`: whether the guest runs here again (else it stays paused, or crashed when
    /// its QEMU is gone). The caller journals the VM record (committed: removed).
    pub async fn end_outgoing(
        &self,
        name: &str,
        committed: bool,
        running: bool,
    ) -> Result<Option<VmRecord>, Status> {
        let mut vms = self.vms.lock().await;
        if committed {
            vms.remove(name);
            return Ok(None);
        }
        let Some(e) = vms.get_mut(name) else {
            return Ok(None);
        };
        e.migration = None;
        e.state = match (&e.process, running) {
            (Some(_), true) => pb::VmState::Running,
            (Some(_), false) => pb::VmState::Paused,
            (None, _) => pb::VmState::Crashed,
        };
        Ok(Some(record_of(e)))
    }

    /// A new QEMU for a VM whose source QEMU died after it was fenced: started with
    /// `-incoming`, fed the device state captured beside the RAM file (the RAM file is
    /// the guest's memory as it was: `x-ignore-shared`), resumed if `then_cont`.
    pub async fn restart_from_capture(
        self: &Arc<Self>,
        name: &str,
        capture: &std::path::Path,
        then_cont: bool,
    ) -> Result<Arc<QemuProcess>, Status> {
        let spec = self.spec_and_process(name).await?.0;
        let err = |what: &str, e: &dyn std::fmt::Display| {
            Status::internal(format!(
                "restarting VM '{name}' from its captured state on {}: {what}: {e}",
                self.cfg.host_name
            ))
        };
        let launch = self.launch_for(&spec, true);
        // The RAM file stays: it holds the guest's memory.
        prepare_dirs(&launch).map_err(|e| err("run directory", &e))?;
        let proc = Arc::new(
            QemuProcess::spawn(&launch, &self.cfg.qemu_binary)
                .await
                .map_err(|e| err("starting QEMU", &e))?,
        );
        let qmp = proc.qmp();
        let mut events = qmp.subscribe();
        let load = async {
            qmp.migrate_set_capabilities(&[("x-ignore-shared", true), ("events", true)])
                .await
                .map_err(|e| err("capabilities", &e))?;
            let sock = launch.run_dir.join("restore.sock");
            let _ = std::fs::remove_file(&sock);
            qmp.migrate_incoming(&format!("unix:{}", sock.display()))
                .await
                .map_err(|e| err("migrate-incoming", &e))?;
            let mut unix = tokio::net::UnixStream::connect(&sock)
                .await
                .map_err(|e| err("connecting", &e))?;
            let mut file = tokio::fs::File::open(capture)
                .await
                .map_err(|e| err("opening the capture", &e))?;
            tokio::io::copy(&mut file, &mut unix)
                .await
                .map_err(|e| err("feeding the capture", &e))?;
            tokio::io::AsyncWriteExt::shutdown(&mut unix)
                .await
                .map_err(|e| err("feeding the capture", &e))?;
            let ev = ferry_qmp::wait_migration_status(
                &mut events,
                Duration::from_secs(60),
                &["completed", "failed"],
            )
            .await
            .map_err(|e| err("loading", &e))?;
            if ev.migration_status() != Some("completed") {
                return Err(err("loading", &"the captured device state did not load"));
            }
            if then_cont {
                qmp.cont().await.map_err(|e| err("cont", &e))?;
            }
            Ok(())
        };
        if let Err(e) = load.await {
            let _ = proc.kill().await;
            return Err(e);
        }
        {
            let mut vms = self.vms.lock().await;
            if let Some(e) = vms.get_mut(name) {
                e.process = Some(proc.clone());
                e.state = if then_cont {
                    pb::VmState::Running
                } else {
                    pb::VmState::Paused
                };
                e.migration = None;
                self.persist(e)?;
            }
        }
        self.supervise(name.to_string(), proc.clone());
        info!(vm = name, "restarted from the captured device state");
        Ok(proc)
    }

    /// Reserves `spec.name` for an incoming migration; refuses a name already defined here.
    ///
    /// With `admit_ram` (a live migration, whose guest will run here) the guest's RAM is
    /// admitted first, under the same lock as the name: two Prepares arriving together
    /// cannot both count the same free room ([`Self::admit_ram`]).
    pub async fn reserve_incoming(
        &self,
        spec: &VmSpec,
        migration: &str,
        admit_ram: bool,
    ) -> Result<(), Status> {
        let mut vms = self.vms.lock().await;
        if vms.contains_key(&spec.name) {
            return Err(Status::already_exists(format!("VM name '{}' is already defined on target host {}: undefine it there or rename the VM", spec.name, self.cfg.host_name)));
        }
        if admit_ram {
            self.admit_ram(&vms, spec).map_err(|why| {
                Status::resource_exhausted(format!(
                    "host {} refuses VM '{}': {why}",
                    self.cfg.host_name, spec.name
                ))
            })?;
        }
        let e = VmEntry {
            spec: spec.clone(),
            state: pb::VmState::Incoming,
            process: None,
            migration: Some(migration.into()),
            resume_latency_us: 0,
            starting: false,
            arriving_cold: !admit_ram,
            arrived_by: None,
            fenced: None,
        };
        self.persist(&e)?;
        vms.insert(spec.name.clone(), e);
        Ok(())
    }

    /// Records the incoming QEMU process (paused, waiting for state) of migration
    /// `migration`: refused once that migration no longer holds the name (discarded
    /// while its QEMU started, the name perhaps reserved again by another).
    pub async fn attach_incoming(
        &self,
        name: &str,
        migration: &str,
        proc: Arc<QemuProcess>,
    ) -> Result<(), Status> {
        let mut vms = self.vms.lock().await;
        let e = vms
            .get_mut(name)
            .filter(|e| e.migration.as_deref() == Some(migration))
            .ok_or_else(|| {
                Status::aborted(format!(
                    "VM '{name}' is no longer reserved for migration {migration}"
                ))
            })?;
        e.process = Some(proc);
        self.persist(e)
    }

    /// The incoming migration committed: the VM is owned here now, running or (`paused`)
    /// left paused for the operator.
    /// The caller has journaled [`Self::incoming_record`] already (with the migration).
    pub async fn commit_incoming(self: &Arc<Self>, name: &str, paused: bool) -> Result<(), Status> {
        let proc = {
            let mut vms = self.vms.lock().await;
            let e = vms.get_mut(name).ok_or_else(|| self.unknown(name))?;
            e.state = if paused {
                pb::VmState::Paused
            } else {
                pb::VmState::Running
            };
            e.migration = None;
            e.process.clone()
        };
        if let Some(p) = proc {
            self.supervise(name.to_string(), p);
        }
        Ok(())
    }

    /// The VM record an incoming migration's commit journals: owned here, not incoming.
    pub async fn incoming_record(&self, name: &str) -> Result<VmRecord, Status> {
        let vms = self.vms.lock().await;
        let e = vms.get(name).ok_or_else(|| self.unknown(name))?;
        Ok(VmRecord {
            spec: e.spec.clone(),
            pid: e.process.as_ref().map(|p| p.pid()),
            incoming_migration: None,
            held_by: None,
            arrived_by: None,
            fenced: None,
        })
    }

    /// Forgets a VM that migration `migration` brought here and then discarded, whatever
    /// its state (in memory only: the caller journals the removal).
    pub async fn forget(&self, name: &str, migration: &str) {
        let mut vms = self.vms.lock().await;
        let ours = vms.get(name).is_some_and(|e| {
            e.migration.as_deref() == Some(migration) || e.state != pb::VmState::Incoming
        });
        if ours {
            vms.remove(name);
        }
    }

    /// Lets go of a VM [`Self::hold`] held for `migration` (in memory: the journal never
    /// knew of the hold): it runs, or stays paused.
    pub async fn release_hold(&self, name: &str, migration: &str, running: bool) {
        if let Some(e) = self.vms.lock().await.get_mut(name) {
            if e.migration.as_deref() == Some(migration) {
                e.migration = None;
                e.state = if running {
                    pb::VmState::Running
                } else {
                    pb::VmState::Paused
                };
            }
        }
    }

    /// Marks an adopted VM running (after its agent resumed it).
    pub async fn mark_running(&self, name: &str) {
        if let Some(e) = self.vms.lock().await.get_mut(name) {
            e.state = pb::VmState::Running;
        }
    }

    /// Forgets an uncommitted incoming VM (its QEMU and files are removed by the caller).
    pub async fn drop_incoming(&self, name: &str, migration: &str) -> Result<(), Status> {
        let mut vms = self.vms.lock().await;
        let ours = vms.get(name).is_some_and(|e| {
            e.state == pb::VmState::Incoming && e.migration.as_deref() == Some(migration)
        });
        if ours {
            vms.remove(name);
            self.journal.remove_vm(name).map_err(journal_err)?;
        }
        Ok(())
    }

    /// After a restart: re-adopt QEMUs still running, remove half-made incoming VMs.
    pub async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        for rec in self.journal.vms()? {
            let name = rec.spec.name.clone();
            let run_dir = self.cfg.run_dir(&name);
            let mut adopted = match rec.pid {
                Some(pid) => QemuProcess::adopt(pid, &run_dir).await.ok().map(Arc::new),
                None => None,
            };
            if rec.incoming_migration.is_some() {
                // Never committed here: the source still owns the VM. Remove every trace,
                // including a QEMU started for it but not yet recorded (the agent died
                // in between) or one that does not answer QMP: the run directory's
                // pidfile names it.
                if let Some(p) = adopted {
                    let _ = p.kill().await;
                }
                match QemuProcess::kill_stray(&run_dir).await {
                    Ok(Some(pid)) => {
                        info!(vm = %name, pid, "killed the unrecorded QEMU of an uncommitted incoming VM")
                    }
                    Ok(None) => {}
                    Err(e) => warn!(vm = %name, "uncommitted incoming VM: {e}"),
                }
                remove_vm_files(&self.cfg, &name);
                self.journal.remove_vm(&name)?;
                info!(vm = %name, "removed uncommitted incoming VM after restart");
                continue;
            }
            let state = match &adopted {
                // A guest left suspended stays suspended across an agent restart.
                Some(p) => match p.qmp().query_status().await {
                    Ok(st) if !st.running => pb::VmState::Paused,
                    _ => pb::VmState::Running,
                },
                None => pb::VmState::Defined,
            };
            if rec.fenced.is_some() && adopted.is_none() {
                // A fenced copy's QEMU that cannot be adopted (QMP not answering) would run
                // untracked beside the VM's other copy: killed, as a fence's failed pause.
                match QemuProcess::kill_stray(&run_dir).await {
                    Ok(Some(pid)) => {
                        error!(vm = %name, pid, "killed the QEMU of a fenced copy that could not be adopted")
                    }
                    Ok(None) => {}
                    Err(e) => warn!(vm = %name, "fenced copy: {e}"),
                }
            }
            // A fenced copy found running (the agent died between journaling the fence and
            // pausing the guest): paused now, before anything else may see it run.
            let state = match (&rec.fenced, &adopted, state) {
                (Some(f), Some(p), pb::VmState::Running) => {
                    match p
                        .qmp()
                        .execute_timeout("stop", None, FENCE_PAUSE_WAIT)
                        .await
                    {
                        Ok(_) => {
                            warn!(vm = %name, "{f}: its guest was running here; paused");
                            pb::VmState::Paused
                        }
                        Err(e) => {
                            // A QEMU that cannot be paused must not run beside the VM's
                            // other copy: its guest is lost here, the other copy runs.
                            error!(vm = %name, "{f}: pausing its running guest failed ({e}); killing its QEMU");
                            let _ = p.kill().await;
                            adopted = None;
                            pb::VmState::Crashed
                        }
                    }
                }
                _ => state,
            };
            // Held by an unsettled outgoing migration: the source recovery settles it.
            let (state, migration) = match &rec.held_by {
                Some(m) => (pb::VmState::Migrating, Some(m.clone())),
                None => (state, None),
            };
            let e = VmEntry {
                spec: rec.spec,
                state,
                process: adopted.clone(),
                migration,
                resume_latency_us: 0,
                starting: false,
                arriving_cold: false,
                // A QEMU adopted has started: the mark would have been cleared before.
                arrived_by: rec.arrived_by.filter(|_| adopted.is_none()),
                fenced: rec.fenced,
            };
            self.persist(&e)?;
            self.vms.lock().await.insert(name.clone(), e);
            if let Some(p) = adopted {
                info!(vm = %name, pid = p.pid(), "re-adopted running QEMU");
                self.supervise(name, p);
            }
        }
        Ok(())
    }

    // ---- cold (offline) migration, see migration/cold.rs ----

    /// Marks a stopped VM as the source of cold migration `migration` and returns its
    /// spec. While marked it cannot be started, undefined or migrated again. Not journaled
    /// here: an agent restart frees it, until [`Self::offline_hold_record`] is journaled
    /// before the target is asked to define it.
    pub async fn begin_offline(&self, name: &str, migration: &str) -> Result<VmSpec, Status> {
        let mut vms = self.vms.lock().await;
        let e = vms.get_mut(name).ok_or_else(|| self.unknown(name))?;
        not_starting(e)?;
        if let Some(m) = &e.migration {
            return Err(Status::failed_precondition(format!(
                "VM '{name}' is already migrating ({m})"
            )));
        }
        not_fenced(e, &self.cfg.host_name, "migrate")?;
        if e.process.is_some() || !matches!(e.state, pb::VmState::Defined | pb::VmState::Crashed) {
            return Err(Status::failed_precondition(format!(
                "VM '{name}' is {} on host {}: stop it or pass --stop-source",
                state_name(e.state),
                self.cfg.host_name
            )));
        }
        e.migration = Some(migration.to_string());
        e.state = pb::VmState::Migrating;
        Ok(e.spec.clone())
    }

    /// The journal record of a VM that cold migration `migration` holds (`held_by`): the
    /// source journals it with its migration record before it asks the target to define
    /// the VM, so that a restart keeps the VM held until it knows where the VM is.
    pub async fn offline_hold_record(
        &self,
        name: &str,
        migration: &str,
    ) -> Result<VmRecord, Status> {
        let vms = self.vms.lock().await;
        let e = vms.get(name).ok_or_else(|| self.unknown(name))?;
        if e.state != pb::VmState::Migrating || e.migration.as_deref() != Some(migration) {
            return Err(Status::failed_precondition(format!(
                "VM '{name}' on host {} is not held by migration {migration}",
                self.cfg.host_name
            )));
        }
        Ok(record_of(e))
    }

    /// Ends the source side of cold migration `migration` in memory: with `undefine` the
    /// definition goes (the VM now lives on the target; its image files stay here),
    /// otherwise the VM is stopped and free here again. Returns the journal change that
    /// records it, for the caller to write with the migration's outcome (one
    /// transaction); `None` for a VM not marked by `migration` (left alone).
    pub async fn end_offline(&self, name: &str, migration: &str, undefine: bool) -> Option<Op> {
        let mut vms = self.vms.lock().await;
        if vms
            .get(name)
            .is_none_or(|e| e.migration.as_deref() != Some(migration))
        {
            return None;
        }
        if undefine {
            vms.remove(name);
            Some(Op::RemoveVm(name.to_string()))
        } else {
            let e = vms.get_mut(name)?;
            e.migration = None;
            e.state = pb::VmState::Defined;
            Some(Op::PutVm(record_of(e)))
        }
    }

    /// Target side of a cold migration: the name reserved by [`Self::reserve_incoming`] for
    /// `migration` becomes a VM defined (stopped) here. Journaled first, together with
    /// `outcome` (the migration's record: a source asking after a lost answer or a restart
    /// learns from it that the VM is here); only then does the VM change in memory, so a
    /// journal that fails leaves the reservation as it was, which an abort removes.
    pub async fn commit_offline(
        &self,
        name: &str,
        migration: &str,
        outcome: crate::journal::MigrationRecord,
    ) -> Result<pb::VmInfo, Status> {
        let mut vms = self.vms.lock().await;
        let e = vms.get_mut(name).ok_or_else(|| self.unknown(name))?;
        if e.state != pb::VmState::Incoming || e.migration.as_deref() != Some(migration) {
            return Err(Status::failed_precondition(format!(
                "VM '{name}' on host {} is not reserved for migration {migration}",
                self.cfg.host_name
            )));
        }
        let rec = VmRecord {
            spec: e.spec.clone(),
            pid: None,
            incoming_migration: None,
            held_by: None,
            arrived_by: Some(migration.to_string()),
            fenced: None,
        };
        self.journal
            .apply(&[Op::PutVm(rec), Op::PutMigration(outcome)])
            .map_err(journal_err)?;
        e.state = pb::VmState::Defined;
        e.migration = None;
        e.arrived_by = Some(migration.to_string());
        Ok(self.info(e))
    }
}

impl VmManager {
    /// The VM that cold migration `migration` defined here and that has not started
    /// since, if there is one ([`VmRecord::arrived_by`]).
    pub async fn arrived_by(&self, migration: &str) -> Option<String> {
        let vms = self.vms.lock().await;
        vms.iter()
            .find(|(_, e)| e.arrived_by.as_deref() == Some(migration))
            .map(|(name, _)| name.clone())
    }

    /// Target side of a cold migration whose source took the VM back on its operator's
    /// verdict: removes the definition `migration` made here if the VM has not started
    /// since ([`crate::migration::cold::cold_taken_back`]), journaled with `outcome` (the
    /// migration's record, no longer saying the VM is here) in one transaction. The
    /// outcome is journaled too when no VM of that name is left. Returns the decision.
    pub async fn undo_cold_arrival(
        &self,
        name: &str,
        migration: &str,
        outcome: crate::journal::MigrationRecord,
    ) -> Result<crate::migration::cold::ColdTakenBack, Status> {
        use crate::migration::cold::{cold_taken_back, ColdTakenBack, DefinedHere};
        let mut vms = self.vms.lock().await;
        // A name reserved by an incoming migration is no VM defined here: whatever this
        // migration defined under it is gone already.
        let here = vms
            .get(name)
            .filter(|e| e.state != pb::VmState::Incoming)
            .map(|e| DefinedHere {
                arrived_by: e.arrived_by.as_deref(),
                busy: e.starting || e.migration.is_some() || e.state != pb::VmState::Defined,
            });
        let decision = cold_taken_back(here, migration);
        let ops = match decision {
            ColdTakenBack::Undefine => {
                vec![Op::RemoveVm(name.to_string()), Op::PutMigration(outcome)]
            }
            ColdTakenBack::NothingHere => vec![Op::PutMigration(outcome)],
            ColdTakenBack::Busy | ColdTakenBack::Stays => return Ok(decision),
        };
        self.journal.apply(&ops).map_err(journal_err)?;
        if decision == ColdTakenBack::Undefine {
            vms.remove(name);
        }
        Ok(decision)
    }
}

/// The journal record of a VM as it stands.
fn record_of(e: &VmEntry) -> VmRecord {
    VmRecord {
        spec: e.spec.clone(),
        pid: e.process.as_ref().map(|p| p.pid()),
        incoming_migration: (e.state == pb::VmState::Incoming)
            .then(|| e.migration.clone())
            .flatten(),
        held_by: (e.state == pb::VmState::Migrating)
            .then(|| e.migration.clone())
            .flatten(),
        arrived_by: e.arrived_by.clone(),
        fenced: e.fenced.clone(),
    }
}

/// Creates a VM's run directory and RAM directory.
pub fn prepare_dirs(l: &QemuLaunch) -> std::io::Result<()> {
    std::fs::create_dir_all(&l.run_dir)?;
    if let Some(parent) = l.ram_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Sockets of a previous run would make QEMU fail to bind.
    for p in [l.qmp_path(), l.observer_qmp_path(), l.console_path()] {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// A VM's RAM file made with every page allocated (`memory_prealloc`), before its QEMU
/// opens it: `fallocate` rather than QEMU's `prealloc=on`, which writes every page and
/// leaves them all for the migration's scan to read as data. A half-made file is removed.
pub async fn preallocate_ram(path: &Path, bytes: u64) -> Result<(), String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let ram = ferry_memory::RamFile::create(&path, bytes).map_err(|e| e.to_string())?;
        ram.reserve().map_err(|e| {
            let _ = std::fs::remove_file(&path);
            e.to_string()
        })
    })
    .await
    .map_err(|e| e.to_string())?
}

/// What fencing does to a VM as it stands here ([`VmManager::fence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceStep {
    /// Journal the fence, then pause the guest (its QEMU runs: the guest runs, or this
    /// agent believes it paused).
    Pause,
    /// Journal the fence: no QEMU here (stopped, crashed).
    Hold,
    /// A start or a migration of the VM is under way here: ask again later.
    NotNow,
}

/// How long a fence waits for QEMU to pause its guest before it kills the QEMU.
pub const FENCE_PAUSE_WAIT: Duration = Duration::from_secs(5);

/// [`FenceStep`] for a VM in `state`, `starting`, taking part in a migration or not (pure).
pub fn fence_step(state: pb::VmState, starting: bool, migrating: bool) -> FenceStep {
    use pb::VmState as S;
    if starting || migrating {
        return FenceStep::NotNow;
    }
    match state {
        S::Running | S::Paused => FenceStep::Pause,
        S::Defined | S::Crashed => FenceStep::Hold,
        S::Migrating | S::Incoming | S::Unspecified => FenceStep::NotNow,
    }
}

/// What [`VmManager::fence`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceDone {
    /// The fence is new (not this migration's news told again).
    pub new: bool,
    /// What became of the guest.
    pub guest: FencedGuest,
}

/// The guest of a fenced copy ([`FenceDone`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencedGuest {
    /// It ran; paused now.
    Paused,
    /// It ran or may have, and its QEMU did not answer the pause: killed.
    Killed,
    /// It did not run here (paused already, or no QEMU): held from now on.
    NotRunning,
}

/// Refuses to run, or move, a fenced copy ([`VmManager::fence`]).
fn not_fenced(e: &VmEntry, host: &str, what: &str) -> Result<(), Status> {
    match &e.fenced {
        Some(f) => Err(Status::failed_precondition(format!(
            "VM '{}' on host {host} is {f}: it cannot {what} here while the copy on {} may run; settle which copy lives, then `ferryctl vm clear-fence {}`",
            e.spec.name, f.runs_on, e.spec.name
        ))),
        None => Ok(()),
    }
}

/// Refuses a change to a VM whose start is under way.
fn not_starting(e: &VmEntry) -> Result<(), Status> {
    if e.starting {
        return Err(Status::failed_precondition(format!(
            "VM '{}' is starting: wait for it",
            e.spec.name
        )));
    }
    Ok(())
}

/// A cold copy on its way here: it arrives stopped, so its RAM is admitted (and
/// promised) only when it starts.
fn is_cold_arrival(e: &VmEntry) -> bool {
    e.state == pb::VmState::Incoming && e.arriving_cold
}

/// Bytes of host memory a file holds (its allocated blocks; 0 when it does not exist).
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks().saturating_mul(512))
        .unwrap_or(0)
}

/// Removes a VM's RAM file and run directory.
pub fn remove_vm_files(cfg: &AgentConfig, name: &str) {
    let _ = std::fs::remove_file(cfg.ram_path(name));
    let _ = std::fs::remove_dir_all(cfg.run_dir(name));
}

/// Lower-case state name for messages.
pub fn state_name(s: pb::VmState) -> &'static str {
    match s {
        pb::VmState::Unspecified => "unknown",
        pb::VmState::Defined => "stopped",
        pb::VmState::Running => "running",
        pb::VmState::Paused => "paused",
        pb::VmState::Migrating => "migrating",
        pb::VmState::Incoming => "an incoming migration target",
        pb::VmState::Crashed => "crashed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_pauses_any_guest_with_a_qemu_holds_one_without_and_waits_for_a_busy_one() {
        use pb::VmState as S;
        // Paused as this agent believes, paused again: a `cont` behind its back is unseen.
        for s in [S::Running, S::Paused] {
            assert_eq!(fence_step(s, false, false), FenceStep::Pause, "{s:?}");
        }
        for s in [S::Defined, S::Crashed] {
            assert_eq!(fence_step(s, false, false), FenceStep::Hold, "{s:?}");
        }
        // A start or a migration under way (either side) is asked again later: pausing
        // under it would race what it does to the QEMU.
        assert_eq!(fence_step(S::Defined, true, false), FenceStep::NotNow);
        assert_eq!(fence_step(S::Running, false, true), FenceStep::NotNow);
        for s in [S::Migrating, S::Incoming, S::Unspecified] {
            assert_eq!(fence_step(s, false, false), FenceStep::NotNow, "{s:?}");
        }
    }

    #[test]
    fn a_fenced_copy_refuses_to_run_or_move_and_says_where_the_vm_runs() {
        let spec: VmSpec = serde_json::from_value(
            serde_json::json!({"name": "web01", "memory_mib": 256, "kernel": "/k"}),
        )
        .unwrap();
        let mut e = VmEntry {
            spec,
            state: pb::VmState::Paused,
            process: None,
            migration: None,
            resume_latency_us: 0,
            starting: false,
            arriving_cold: false,
            arrived_by: None,
            fenced: None,
        };
        assert!(not_fenced(&e, "h2", "resume").is_ok());
        e.fenced = Some(Fence {
            migration: "m1".into(),
            runs_on: "h1".into(),
            at_ms: 1,
            why: crate::journal::FenceWhy::TakenBack,
        });
        let err = not_fenced(&e, "h2", "resume").unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        for part in ["web01", "h2", "m1", "h1", "clear-fence"] {
            assert!(err.message().contains(part), "{part}: {}", err.message());
        }
        // Journaled with the VM, and a record from before fences reads as unfenced.
        assert_eq!(record_of(&e).fenced, e.fenced);
        let mut old = serde_json::to_value(record_of(&e)).unwrap();
        old.as_object_mut().unwrap().remove("fenced");
        let old: VmRecord = serde_json::from_value(old).unwrap();
        assert_eq!(old.fenced, None);
        // A fence from before its reason was recorded is the live target's.
        let mut f = serde_json::to_value(e.fenced.clone().unwrap()).unwrap();
        f.as_object_mut().unwrap().remove("why");
        let f: Fence = serde_json::from_value(f).unwrap();
        assert_eq!(f.why, crate::journal::FenceWhy::TakenBack);
        // The cold source's hold says the target started the VM.
        e.fenced = Some(Fence {
            why: crate::journal::FenceWhy::StartedThere,
            ..f
        });
        let err = not_fenced(&e, "h2", "start").unwrap_err();
        assert!(
            err.message()
                .contains("its target h1 had started the VM already"),
            "{}",
            err.message()
        );
    }

    /// Two incoming live migrations admitted one after the other (the manager's lock,
    /// held from the admission to the name's entry, makes two racing Prepares do just
    /// that): the first arrival's whole RAM counts as promised
    /// before its RAM file exists, so the second is refused where the free room alone
    /// would hold it. A 1536 MiB tmpfs RAM directory, 1 GiB guests. A cold copy (it
    /// arrives stopped) is not admitted for RAM.
    #[tokio::test]
    async fn an_arriving_guest_is_promised_its_ram_before_its_file_exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (state, ram) = (dir.path().join("state"), dir.path().join("ram"));
        std::fs::create_dir_all(&state).expect("state dir");
        let _tmpfs = ferry_testkit::Tmpfs::mount(&ram, 1536);
        let cfg: AgentConfig = toml::from_str(&format!(
            "host_name='t'\ngrpc_listen='127.0.0.1:1'\nquic_listen='127.0.0.1:2'\n\
             state_dir='{}'\nram_dir='{}'\n[tls]\nca='c'\ncert='c'\nkey='k'\n\
             [migration]\nmemory_reserve_mib = 0\n",
            state.display(),
            ram.display()
        ))
        .expect("config");
        let journal = Arc::new(Journal::open(&state.join("j.redb")).expect("journal"));
        let vms = VmManager::new(
            Arc::new(cfg),
            journal,
            None,
            Arc::new(ferry_disk::StorageRoots::empty()),
        );
        vms.reserve_incoming(&VmSpec::new("a", 1024), "m1", true)
            .await
            .expect("the first 1 GiB guest fits");
        assert_eq!(vms.ram_promised().await, 1 << 30);
        let e = vms
            .reserve_incoming(&VmSpec::new("b", 1024), "m2", true)
            .await
            .expect_err("the second does not, beside the first");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message()
                .contains("beside the 1024 MiB the guests already there may still take"),
            "{e:?}"
        );
        vms.reserve_incoming(&VmSpec::new("c", 1024), "m3", false)
            .await
            .expect("a cold copy arrives stopped");
        assert_eq!(vms.ram_promised().await, 1 << 30, "nothing promised to it");
    }
}
