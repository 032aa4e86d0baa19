//! Partial images kept for a resume expire: a cold copy that failed keeps what it had
//! received so that the next attempt resumes, and an attempt that never comes (the source
//! gone, the operator's mind changed, this host restarted before a cancel reached it)
//! would leave a VM's worth of disk here for good. Every partial image under the storage
//! roots that no incoming migration (nor a Prepare) names and that nothing has touched for
//! `partial_keep_s` is removed ([`ferry_disk::kept`]); a later attempt then copies the
//! image afresh.
//!
//! The same holds for the images such a copy received whole and renamed into place
//! (journaled as each arrives: [`crate::journal::ColdPlacedRecord`]): once the record has
//! not changed for `partial_keep_s` (placed, or the copy given up), each image that no VM
//! of this host has as a disk or as a layer below one, and that no incoming migration
//! names (a later attempt adopts what is already there), is removed while its path still
//! names the file the copy placed, with no second name.

use super::ColdRegistry;
use crate::journal::Journal;
use crate::vms::VmManager;
use ferry_disk::kept::{discard_if_idle, find_kept, idle_for, Discard, KeptPartial};
use ferry_disk::StorageRoots;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{debug, info, warn};

/// What one pass found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Partial images removed, and the bytes that freed.
    pub removed: Vec<(PathBuf, u64)>,
    /// Partial images still kept (younger than the keep, in use, or not removable).
    pub kept: usize,
    /// The bytes those take on disk.
    pub kept_bytes: u64,
}

/// What to do with one partial image found on disk. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeptVerdict {
    /// An incoming migration (or a Prepare) names it — its streams may be between
    /// connections, its part unlocked: left alone whatever its age.
    Receiving,
    /// Touched within the keep: a resume may still come.
    Young,
    /// Idle for the keep: removed, if no receiver holds it by then.
    Expired,
}

/// Decides for one partial image. Pure.
pub fn kept_verdict(
    k: &KeptPartial,
    receiving: &HashSet<PathBuf>,
    now: SystemTime,
    keep: Duration,
) -> KeptVerdict {
    if receiving.contains(&k.final_path) {
        KeptVerdict::Receiving
    } else if idle_for(k.touched, now, keep) {
        KeptVerdict::Expired
    } else {
        KeptVerdict::Young
    }
}

/// One pass over the storage roots (blocking: run it off the async threads). `disks` are
/// the VMs' disk paths: a disk named like a part file is a disk, never a part. A path
/// whose removal failed is warned about once (in `warned`), then logged at debug.
pub fn expire_kept(
    storage: &StorageRoots,
    receiving: &HashSet<PathBuf>,
    disks: &HashSet<PathBuf>,
    keep: Duration,
    warned: &mut HashSet<PathBuf>,
) -> Swept {
    let now = SystemTime::now();
    let mut swept = Swept::default();
    // Roots may nest: each partial image once.
    let mut seen = HashSet::new();
    for root in storage.roots() {
        for k in find_kept(root) {
            if !seen.insert(k.final_path.clone()) {
                continue;
            }
            let a_disk = ferry_disk::kept::PARTIAL_SUFFIXES.iter().any(|suffix| {
                let mut f = k.final_path.as_os_str().to_owned();
                f.push(suffix);
                disks.contains(&PathBuf::from(f))
            });
            let verdict = if a_disk {
                KeptVerdict::Receiving
            } else {
                kept_verdict(&k, receiving, now, keep)
            };
            let gone = match verdict {
                KeptVerdict::Receiving | KeptVerdict::Young => None,
                // Checked again under the part's lock: a resume may have touched it since.
                KeptVerdict::Expired => {
                    let idle_since = now.checked_sub(keep).unwrap_or(SystemTime::UNIX_EPOCH);
                    match discard_if_idle(&k.final_path, idle_since) {
                        Ok(Discard::Removed { freed }) => Some(freed),
                        // Nothing removed by this pass: nothing to count.
                        Ok(Discard::Gone) => continue,
                        Ok(Discard::InUse | Discard::Fresh) => None,
                        Err(e) => {
                            if warned.insert(k.final_path.clone()) {
                                warn!(image = %k.final_path.display(), "a partial image kept for a resume has expired but could not be removed (said once): {e}");
                            } else {
                                debug!(image = %k.final_path.display(), "expired partial image not removed: {e}");
                            }
                            None
                        }
                    }
                }
            };
            match gone {
                Some(freed) => {
                    warned.remove(&k.final_path);
                    let idle = now.duration_since(k.touched).unwrap_or_default();
                    info!(
                        image = %k.final_path.display(),
                        transfer = k.transfer_id.as_deref().unwrap_or("unknown"),
                        idle_s = idle.as_secs(),
                        freed_bytes = freed,
                        "removed a partial image kept for a resume: no attempt resumed it within partial_keep_s"
                    );
                    swept.removed.push((k.final_path, freed));
                }
                None => {
                    swept.kept += 1;
                    swept.kept_bytes += k.allocated;
                }
            }
        }
    }
    swept
}

/// What to do with one image a cold copy placed and never defined a VM on. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacedVerdict {
    /// A VM of this host has it as a disk (defined on it since, or the migration's own
    /// VM after a crash inside Finish; not the migration's reservation while it
    /// receives): its now; the record forgets it.
    AVmsDisk,
    /// An incoming migration (or a Prepare still planning) names it — receiving it, or
    /// adopted as already here: kept.
    Receiving,
    /// Placed (or the record last changed) within the keep: kept.
    Young,
    /// Removed, if its path still names the file the copy placed.
    Expired,
}

/// Decides for one placed image. Pure.
pub fn placed_verdict(vms_disk: bool, receiving: bool, idle: bool) -> PlacedVerdict {
    // Named by a migration first: a later attempt adopts what is already here and is not
    // its VM yet (cancelled, it leaves the image to this record). `vms_disk` counts VMs
    // only, not names reserved for incoming migrations.
    if receiving {
        PlacedVerdict::Receiving
    } else if vms_disk {
        PlacedVerdict::AVmsDisk
    } else if idle {
        PlacedVerdict::Expired
    } else {
        PlacedVerdict::Young
    }
}

/// One pass over the journaled images of cold copies that never finished; returns how
/// many were removed. An image goes only when, besides [`placed_verdict`], it is no layer
/// below any VM's disk (backing chains read with `qemu-img`; a chain that cannot be read
/// keeps everything this pass), no migration or Prepare names it when it goes, and no VM
/// is defined on it meanwhile ([`VmManager::remove_unless_a_disk`]).
pub async fn expire_placed(
    journal: &Journal,
    vms: &VmManager,
    registry: &ColdRegistry,
    keep: Duration,
    warned: &mut HashSet<PathBuf>,
) -> usize {
    let records = match journal.cold_placed() {
        Ok(r) => r,
        Err(e) => {
            warn!("journal: the images cold copies placed: {e}");
            return 0;
        }
    };
    let now = crate::migration::now_ms();
    let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    // Read only when some image has expired (one `qemu-img info` per layer).
    let mut layers = vms.layers();
    let mut unreadable = None;
    let claimed = registry.claimed_images();
    let mut removed = 0;
    for rec in records {
        let idle = now.saturating_sub(rec.updated_ms) >= keep_ms;
        let mut left = Vec::new();
        for (path, id) in &rec.placed {
            let vms_disk = vms.vm_using(path).await.is_some();
            let mut verdict = placed_verdict(vms_disk, claimed.contains(path), idle);
            if verdict == PlacedVerdict::Expired {
                match layers.holds(path).await {
                    // A layer under some VM's disk now: that VM's.
                    Ok(true) => verdict = PlacedVerdict::AVmsDisk,
                    Ok(false) => {}
                    Err(e) => {
                        verdict = PlacedVerdict::Young;
                        unreadable = Some(e);
                    }
                }
            }
            match verdict {
                PlacedVerdict::AVmsDisk => {
                    info!(migration = %rec.id, image = %path.display(), "an image a cold copy that never finished had received is a VM's disk (or a layer below one) now: left to it");
                }
                PlacedVerdict::Receiving | PlacedVerdict::Young => left.push((path.clone(), *id)),
                PlacedVerdict::Expired => {
                    // Asked again right before it goes: a Prepare may have begun since.
                    if registry.claimed_images().contains(path) {
                        left.push((path.clone(), *id));
                        continue;
                    }
                    match vms.remove_unless_a_disk(path, *id, None).await {
                        Ok(crate::vms::Removal::Removed) => {
                            removed += 1;
                            warned.remove(path);
                            info!(migration = %rec.id, vm = %rec.vm, source = %rec.source, image = %path.display(), "removed an image a cold copy that never finished had received: no VM here has used it within partial_keep_s");
                        }
                        Ok(crate::vms::Removal::ADisk) => left.push((path.clone(), *id)),
                        Ok(crate::vms::Removal::NotThatFile) => {
                            info!(migration = %rec.id, image = %path.display(), "an image a cold copy that never finished had received is gone, replaced or linked since: left as it is");
                        }
                        Err(e) => {
                            if warned.insert(path.clone()) {
                                warn!(migration = %rec.id, image = %path.display(), "an image a cold copy that never finished had received could not be removed (said once): {e}");
                            } else {
                                debug!(migration = %rec.id, image = %path.display(), "expired image not removed: {e}");
                            }
                            left.push((path.clone(), *id));
                        }
                    }
                }
            }
        }
        if left != rec.placed {
            let rec = crate::journal::ColdPlacedRecord {
                placed: left,
                ..rec
            };
            if let Err(e) = journal.put_cold_placed(&rec) {
                warn!(migration = %rec.id, "journal: {e}");
            }
        }
    }
    if let Some(e) = unreadable {
        debug!("placed images kept this pass: a VM's backing chain could not be read: {e}");
    }
    removed
}

/// Runs [`expire_placed`] and [`expire_kept`] now and then every `keep / 4` (at least
/// every second, at most every hour), publishing what is kept and what went in `metrics`.
pub fn spawn_expiry(
    storage: Arc<StorageRoots>,
    registry: Arc<ColdRegistry>,
    journal: Arc<Journal>,
    vms: Arc<VmManager>,
    metrics: Arc<crate::metrics::Metrics>,
    keep: Duration,
) {
    let every = (keep / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    tokio::spawn(async move {
        let mut warned = HashSet::new();
        loop {
            let placed = expire_placed(&journal, &vms, &registry, keep, &mut warned).await;
            metrics.placed_images_expired.inc_by(placed as u64);
            let receiving = registry.claimed_images();
            let disks = vms.disk_paths().await;
            let (storage, mut w) = (storage.clone(), std::mem::take(&mut warned));
            let pass = tokio::task::spawn_blocking(move || {
                let swept = expire_kept(&storage, &receiving, &disks, keep, &mut w);
                (swept, w)
            })
            .await;
            match pass {
                Ok((swept, w)) => {
                    warned = w;
                    metrics
                        .partial_images_expired
                        .inc_by(swept.removed.len() as u64);
                    metrics
                        .partial_images_kept_bytes
                        .set(swept.kept_bytes as i64);
                }
                Err(e) => warn!("the expiry of kept partial images failed: {e}"),
            }
            metrics.expiry_passes.inc();
            tokio::time::sleep(every).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(path: &str, touched: SystemTime) -> KeptPartial {
        KeptPartial {
            final_path: path.into(),
            allocated: 4096,
            touched,
            transfer_id: None,
        }
    }

    /// A file made `age` ago.
    fn old_file(path: &std::path::Path, age: Duration) {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(8192).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn a_vm_disk_named_like_a_part_stays_and_nested_roots_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("inner");
        std::fs::create_dir(&inner).unwrap();
        let storage = StorageRoots::new([dir.path(), inner.as_path()]).unwrap();
        let root = storage.roots()[0].clone();
        let disk = root.join("inner/odd.ferry-part");
        let part = root.join("inner/img.qcow2.ferry-part");
        let day = Duration::from_secs(86_400);
        old_file(&disk, 2 * day);
        old_file(&part, 2 * day);
        let disks: HashSet<PathBuf> = [disk.clone()].into();
        let mut warned = HashSet::new();
        let swept = expire_kept(&storage, &HashSet::new(), &disks, day, &mut warned);
        assert!(disk.exists(), "a VM's disk");
        assert!(!part.exists());
        assert_eq!(swept.removed.len(), 1, "{swept:?}");
        assert_eq!(swept.kept, 1, "the disk, once: {swept:?}");
        // Not a VM's disk any more: an old part like any other.
        let swept = expire_kept(&storage, &HashSet::new(), &HashSet::new(), day, &mut warned);
        assert!(!disk.exists());
        assert_eq!(swept.removed.len(), 1, "{swept:?}");
    }

    #[test]
    fn a_placed_image_expires_only_idle_unused_and_not_received() {
        use PlacedVerdict::*;
        assert_eq!(placed_verdict(true, true, true), Receiving);
        assert_eq!(placed_verdict(true, false, false), AVmsDisk);
        assert_eq!(placed_verdict(true, false, true), AVmsDisk);
        assert_eq!(placed_verdict(false, true, true), Receiving);
        assert_eq!(placed_verdict(false, false, false), Young);
        assert_eq!(placed_verdict(false, false, true), Expired);
    }

    #[test]
    fn only_an_idle_image_no_migration_is_receiving_expires() {
        let keep = Duration::from_secs(86_400);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10 * 86_400);
        let old = now - keep - Duration::from_secs(1);
        let none = HashSet::new();
        assert_eq!(
            kept_verdict(&kept("/r/a", old), &none, now, keep),
            KeptVerdict::Expired
        );
        assert_eq!(
            kept_verdict(&kept("/r/a", now - keep / 2), &none, now, keep),
            KeptVerdict::Young
        );
        let receiving: HashSet<PathBuf> = [PathBuf::from("/r/a")].into();
        assert_eq!(
            kept_verdict(&kept("/r/a", old), &receiving, now, keep),
            KeptVerdict::Receiving
        );
        assert_eq!(
            kept_verdict(&kept("/r/b", old), &receiving, now, keep),
            KeptVerdict::Expired
        );
        // A clock stepped back: not idle.
        assert_eq!(
            kept_verdict(&kept("/r/a", now + keep), &none, now, keep),
            KeptVerdict::Young
        );
    }
}
