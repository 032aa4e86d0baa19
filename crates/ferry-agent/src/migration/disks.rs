//! Disks in a live migration: whether storage is shared (a token file the source writes
//! beside each image and the target looks for at the same path), the target's empty
//! copies exported over NBD, and the tunnel that carries the source QEMU's mirror
//! traffic to them over QUIC, compressed like pages.
//!
//! Source and target run the same QEMU block sequence as `notes/qemu-mechanics.md`:
//! target `nbd-server-start` + `block-export-add`; source `blockdev-add` (NBD client on
//! a unix socket the source agent listens on) + `blockdev-mirror` (sync full); READY,
//! then write-blocking; at `pre-switchover` `block-job-cancel` (a READY mirror completes
//! in sync) + `blockdev-del`. Never cancel after the migration completed: that crashes
//! the source QEMU.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_api::v1 as pb;
use ferry_api::v1::ferry_peer_client::FerryPeerClient;
use ferry_disk::{image, staged, token::SharedStorageToken, ImageFormat, StorageRoots};
use ferry_qemu::{DiskFormat, VmSpec};
use ferry_transport::FrameWriter;
use ferry_wire::{Codec, MAX_CHUNK};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;
use tonic::Status;

/// How the caller wants disks handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageMode {
    /// Shared where the target sees the source's token, copied elsewhere.
    Auto,
    /// Every disk must be shared; refuse otherwise.
    Shared,
    /// Every disk travels; refuse if the target sees the same file (copying onto the
    /// source's own image would destroy it).
    Copy,
}

impl std::str::FromStr for StorageMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "auto" => Ok(StorageMode::Auto),
            "shared" => Ok(StorageMode::Shared),
            "copy" => Ok(StorageMode::Copy),
            other => Err(format!(
                "storage must be auto, shared or copy, not {other:?}"
            )),
        }
    }
}

/// What happens to one disk.
#[derive(Debug, Clone)]
pub struct DiskPlan {
    pub probe: pb::DiskProbe,
    /// Stays put: the target sees the same file.
    pub shared: bool,
}

/// The NBD client node and mirror job name ferry uses for disk `id` in the source QEMU.
pub fn mirror_node(id: &str) -> String {
    format!("ferry-mir-{id}")
}

/// Why a mirror job among `nodes` ended, from the job events seen on `events` (QEMU drops
/// a failed job from `query-block-jobs`; only its `BLOCK_JOB_COMPLETED` keeps the error).
/// Drains what is queued without waiting.
pub fn mirror_failure(
    events: &mut tokio::sync::broadcast::Receiver<ferry_qmp::QmpEvent>,
    nodes: &[String],
) -> Option<String> {
    use tokio::sync::broadcast::error::TryRecvError;
    let mut why = None;
    loop {
        match events.try_recv() {
            Ok(e) if e.name == "BLOCK_JOB_COMPLETED" || e.name == "BLOCK_JOB_CANCELLED" => {
                let device = e.data.get("device").and_then(|d| d.as_str()).unwrap_or("");
                let Some(node) = nodes.iter().find(|n| n.as_str() == device) else {
                    continue;
                };
                let disk = node.strip_prefix("ferry-mir-").unwrap_or(node);
                let error = e.data.get("error").and_then(|d| d.as_str());
                why.get_or_insert(match error {
                    Some(err) => format!("disk '{disk}': {err}"),
                    None => format!("disk '{disk}': the mirror job ended ({})", e.name),
                });
            }
            Ok(_) | Err(TryRecvError::Lagged(_)) => {}
            Err(_) => return why,
        }
    }
}

/// The image format of a spec's disk.
pub fn image_format(f: DiskFormat) -> ImageFormat {
    match f {
        DiskFormat::Qcow2 => ImageFormat::Qcow2,
        DiskFormat::Raw => ImageFormat::Raw,
    }
}

/// Source side: decides, with the target, which disks are shared and which travel.
/// Holds the token files only while the target looks for them.
pub async fn plan(
    storage: &StorageRoots,
    spec: &VmSpec,
    peer: &mut FerryPeerClient<Channel>,
    mode: StorageMode,
) -> Result<Vec<DiskPlan>, String> {
    if spec.disks.is_empty() {
        return Ok(Vec::new());
    }
    let mut probes = Vec::new();
    let mut tokens = Vec::new();
    for d in &spec.disks {
        let path = storage
            .confine(&d.path)
            .map_err(|e| format!("disk '{}': {e}", d.id))?;
        let rel = storage
            .relative(&path)
            .map_err(|e| format!("disk '{}': {e}", d.id))?;
        let fmt = image_format(d.format);
        let p2 = path.clone();
        let info = tokio::task::spawn_blocking(move || image::inspect_as(&p2, fmt))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("disk '{}': {e}", d.id))?;
        let p2 = path.clone();
        let token = tokio::task::spawn_blocking(move || SharedStorageToken::place_beside(&p2))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("disk '{}': shared-storage token: {e}", d.id))?;
        probes.push(pb::DiskProbe {
            id: d.id.clone(),
            path: rel.display().to_string(),
            token: token.value().to_string(),
            format: fmt.as_str().to_string(),
            virtual_size: info.virtual_size,
            allocated_bytes: info.actual_size.max(1 << 20),
        });
        tokens.push(token);
    }
    let verdicts = peer
        .check_storage(pb::CheckStorageRequest {
            vm: spec.name.clone(),
            disks: probes.clone(),
        })
        .await
        .map_err(|s| format!("target storage check: {}", s.message()))?
        .into_inner()
        .disks;
    drop(tokens);
    let mut plans = Vec::new();
    for (probe, d) in probes.into_iter().zip(&spec.disks) {
        let v = verdicts
            .iter()
            .find(|v| v.id == probe.id)
            .ok_or_else(|| format!("target said nothing about disk '{}'", probe.id))?;
        let shared = v.shared;
        match (mode, shared) {
            (StorageMode::Shared, false) => {
                return Err(format!(
                    "disk '{}' ({}) is not on storage the target shares (it did not see the token file): \
                     use --storage auto or copy",
                    probe.id, probe.path
                ))
            }
            (StorageMode::Copy, true) => {
                return Err(format!(
                    "disk '{}' ({}) is on storage the target shares: copying it would overwrite the VM's own image; \
                     use --storage auto or shared",
                    probe.id, probe.path
                ))
            }
            _ => {}
        }
        if !shared {
            if !v.error.is_empty() {
                return Err(format!(
                    "disk '{}' cannot be copied to the target: {}",
                    probe.id, v.error
                ));
            }
            if d.read_only {
                return Err(format!(
                    "disk '{}' is read-only and not on shared storage: live copy handles writable disks only \
                     (use shared storage or an offline migration)",
                    probe.id
                ));
            }
        }
        plans.push(DiskPlan { probe, shared });
    }
    Ok(plans)
}

/// Target side of [`plan`]: for each disk, is the source's token visible at the same
/// path, and if not, could a copy go there.
pub fn check(
    storage: &StorageRoots,
    host: &str,
    req: &pb::CheckStorageRequest,
) -> pb::CheckStorageResponse {
    // Directory a copy would first need room in -> (bytes, the disks going there).
    let mut needed: std::collections::HashMap<PathBuf, (u64, Vec<usize>)> =
        std::collections::HashMap::new();
    let mut out = Vec::new();
    for d in &req.disks {
        let mut v = pb::DiskVerdict {
            id: d.id.clone(),
            shared: false,
            error: String::new(),
        };
        match storage.candidates(Path::new(&d.path)) {
            Err(e) => v.error = format!("on {host}: {e}"),
            Ok(cands) => {
                if cands
                    .iter()
                    .any(|p| SharedStorageToken::probe(p, &d.token).unwrap_or(false))
                {
                    v.shared = true;
                } else if let Some(p) = cands.iter().find(|p| p.exists()) {
                    v.error = format!("an image already exists at {} on {host} (and it is not the source's: no token beside it)", p.display());
                } else {
                    let e = needed
                        .entry(ferry_disk::space::existing_ancestor(&cands[0]))
                        .or_default();
                    e.0 += d.allocated_bytes;
                    e.1.push(out.len());
                }
            }
        }
        out.push(v);
    }
    // Room for every copy going into the same filesystem directory, together; a full
    // one refuses only the disks headed there.
    for (dir, (bytes, disks)) in needed {
        if let Err(e) = ferry_disk::space::ensure_space(&dir, bytes, "the disk copies") {
            for i in disks {
                if let Some(v) = out.get_mut(i) {
                    v.error = format!("on {host}: {e}");
                }
            }
        }
    }
    pb::CheckStorageResponse { disks: out }
}

/// Target side: rewrites the spec's disk paths (the source's) to this host's: a shared
/// disk to where its image already is, a travelling one (`copies`) under the first
/// storage root. Every path is confined to this host's storage roots.
pub fn localize(
    storage: &StorageRoots,
    host: &str,
    mut spec: VmSpec,
    shared: &[pb::DiskProbe],
    copies: &[pb::DiskProbe],
) -> Result<VmSpec, Status> {
    for d in spec.disks.iter_mut() {
        let rel = shared
            .iter()
            .chain(copies)
            .find(|c| c.id == d.id)
            .map(|c| PathBuf::from(&c.path))
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "disk '{}': the source did not name its image",
                    d.id
                ))
            })?;
        let cands = storage
            .candidates(&rel)
            .map_err(|e| Status::permission_denied(format!("disk '{}' on {host}: {e}", d.id)))?;
        let travels = copies.iter().any(|c| c.id == d.id);
        d.path = if travels {
            cands[0].clone()
        } else {
            cands.iter().find(|p| p.exists()).cloned().ok_or_else(|| {
                Status::failed_precondition(format!(
                    "disk '{}': shared image {} not found on {host}",
                    d.id,
                    rel.display()
                ))
            })?
        };
    }
    Ok(spec)
}

/// Target side: where the disks that travel go (`spec` already [`localize`]d), checked
/// before anything is made: inside the storage roots, nothing there yet, room for each.
pub fn plan_copies(
    storage: &StorageRoots,
    host: &str,
    spec: &VmSpec,
    copies: &[pb::DiskProbe],
) -> Result<Vec<PathBuf>, Status> {
    let mut planned = Vec::new();
    for c in copies {
        let disk =
            spec.disks.iter().find(|d| d.id == c.id).ok_or_else(|| {
                Status::invalid_argument(format!("copy of unknown disk '{}'", c.id))
            })?;
        let path = storage
            .confine(&disk.path)
            .map_err(|e| Status::permission_denied(format!("disk '{}' on {host}: {e}", c.id)))?;
        if path.exists() {
            return Err(Status::already_exists(format!(
                "disk '{}': an image already exists at {} on {host}",
                c.id,
                path.display()
            )));
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                Status::internal(format!(
                    "disk '{}' on {host}: creating {}: {e}",
                    c.id,
                    dir.display()
                ))
            })?;
            ferry_disk::space::ensure_space(dir, c.allocated_bytes, &format!("disk '{}'", c.id))
                .map_err(|e| Status::resource_exhausted(format!("on {host}: {e}")))?;
        }
        planned.push(path);
    }
    Ok(planned)
}

/// Target side: creates the empty images [`plan_copies`] planned, each through a staging
/// name of `migration` ([`ferry_disk::staged`]) that stays until [`release_staging`] at
/// commit: until then a restart, or a second try at removing one, can prove them this
/// migration's. Returns what it made, or why it failed with the copies it could not
/// remove again ([`MadeOrLeft`]).
pub fn make_copies(
    host: &str,
    spec: &VmSpec,
    copies: &[pb::DiskProbe],
    planned: &[PathBuf],
    migration: &str,
) -> MadeOrLeft {
    let mut made = Vec::new();
    let result = (|| {
        for (c, path) in copies.iter().zip(planned) {
            let disk = spec.disks.iter().find(|d| d.id == c.id).ok_or_else(|| {
                Status::invalid_argument(format!("copy of unknown disk '{}'", c.id))
            })?;
            let placed =
                staged::create_staged(path, image_format(disk.format), c.virtual_size, migration)
                    .map_err(|e| match e {
                    ferry_disk::DiskError::AlreadyExists { .. } => Status::already_exists(format!(
                        "disk '{}' on {host}: {e} (it appeared meanwhile)",
                        c.id
                    )),
                    e => Status::failed_precondition(format!("disk '{}' on {host}: {e}", c.id)),
                })?;
            if placed == staged::Placed::Renamed {
                tracing::warn!(migration, path = %path.display(), "no hard links on this filesystem: a crash before the migration is journaled would leave this copy behind");
            }
            made.push(path.clone());
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(made),
        Err(e) => Err((e, remove_copies(&made, migration))),
    }
}

/// What [`make_copies`] made, or why it failed and the copies it could not remove again.
pub type MadeOrLeft = Result<Vec<PathBuf>, (Status, Vec<PathBuf>)>;

/// Drops the staging names of `copies` once the migration committed (they are a second
/// name of disks in use from then on).
pub fn release_staging(copies: &[PathBuf], migration: &str) {
    for p in copies {
        if let Err(e) = staged::release_staging(p, migration) {
            tracing::warn!(migration, "{e}");
        }
    }
}

/// Removes the images [`make_copies`] made for `migration`, and their staging names. A
/// copy still linked to its staging name goes with it; one without a staging name (a
/// filesystem without hard links, or a record older than the staging names) is removed by
/// its path, which the caller's record says this migration made. Returns the copies that
/// could not be removed (an I/O error): their staging names stay, so that
/// [`remove_proven_copies`] can still prove them this migration's later.
pub fn remove_copies(paths: &[PathBuf], migration: &str) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for p in paths {
        let gone = match staged::remove_if_ours(p, migration) {
            Ok(staged::Removal::Unproven) => match std::fs::remove_file(p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            },
            Ok(staged::Removal::Removed) => Ok(()),
            Ok(staged::Removal::NotOurs) => {
                if p.exists() {
                    tracing::warn!(migration, path = %p.display(), "another file stands where this migration's disk copy was: left alone");
                }
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = gone {
            // Left behind: say where; the journal keeps it for another try.
            tracing::warn!(migration, path = %p.display(), "disk copy not removed: {e}; tried again later");
            left.push(p.clone());
        }
    }
    left
}

/// Removes those of `paths` that are provably this migration's copies (still linked to
/// their staging name: the file at a path may be someone else's by now) and nothing else:
/// a restart's planned copies, or another try at copies a removal left behind. Returns
/// those whose removal failed (an I/O error: tried again later).
pub fn remove_proven_copies(paths: &[PathBuf], migration: &str) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for p in paths {
        match staged::remove_if_ours(p, migration) {
            Ok(r) => {
                tracing::info!(migration, path = %p.display(), outcome = ?r, "disk copy of a migration that did not commit")
            }
            Err(e) => {
                tracing::warn!(migration, path = %p.display(), "removing a disk copy of a migration that did not commit: {e}; tried again later");
                left.push(p.clone());
            }
        }
    }
    left
}

/// A backing file of an image this host's QEMU will open: it must lie inside the storage
/// roots and be a regular file (no device node). Returns where it resolves.
pub fn confined_backing(storage: &StorageRoots, path: &Path) -> Result<PathBuf, String> {
    let p = storage
        .confine(path)
        .map_err(|e| format!("backing file: {e}"))?;
    if !std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) {
        return Err(format!(
            "backing file {} is not a regular file",
            p.display()
        ));
    }
    Ok(p)
}

/// Bytes the source side of the tunnels sent.
#[derive(Debug, Default)]
pub struct TunnelCounters {
    /// Frame bytes on QUIC (after compression).
    pub wire: AtomicU64,
}

/// Carries one NBD connection between a unix socket and a QUIC bidirectional stream:
/// each direction as [`DataChunk`] frames compressed with `codec` (when that pays).
/// Ends when both directions have ended.
pub async fn tunnel(
    unix: tokio::net::UnixStream,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    codec: Codec,
    out: Arc<TunnelCounters>,
) -> Result<(), String> {
    let (mut ur, mut uw) = unix.into_split();
    let up = async {
        let mut w = FrameWriter::new(send);
        let mut buf = vec![0u8; MAX_CHUNK.min(256 * 1024)];
        let mut pos = 0u64;
        loop {
            let n = ur
                .read(&mut buf)
                .await
                .map_err(|e| format!("NBD socket: {e}"))?;
            if n == 0 {
                break;
            }
            let frame = super::relay::encode_stream_chunk(pos, &buf[..n], codec).await?;
            w.write(&frame)
                .await
                .map_err(|e| format!("tunnel stream: {e}"))?;
            pos += n as u64;
            out.wire.fetch_add(frame.len() as u64, Ordering::Relaxed);
        }
        let _ = w.finish();
        Ok::<(), String>(())
    };
    let down = async {
        super::relay::write_stream_chunks(recv, &mut uw, "tunnel stream", "NBD socket")
            .await
            .map(|_| ())
    };
    // The first failure ends both directions: the unix socket closes with them, so the
    // QEMU on this side sees its NBD peer gone (EOF) instead of waiting forever for
    // replies — with a write-blocking mirror, the guest's own writes would hang too.
    tokio::try_join!(up, down).map(|_| ())
}
