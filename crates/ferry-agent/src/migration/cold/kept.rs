//! Partial images kept for a resume expire: a cold copy that failed keeps what it had
//! received so that the next attempt resumes, and an attempt that never comes (the source
//! gone, the operator's mind changed, this host restarted before a cancel reached it)
//! would leave a VM's worth of disk here for good. Every partial image under the storage
//! roots that no incoming migration is receiving and that nothing has touched for
//! `partial_keep_s` is removed ([`ferry_disk::kept`]); a later attempt then copies the
//! image afresh.

use super::ColdRegistry;
use ferry_disk::kept::{discard_if_idle, find_kept, idle_for, Discard, KeptPartial};
use ferry_disk::StorageRoots;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

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
    /// An incoming migration is receiving into it (its streams may be between
    /// connections, its part unlocked): left alone whatever its age.
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

/// One pass over the storage roots (blocking: run it off the async threads).
pub fn expire_kept(storage: &StorageRoots, receiving: &HashSet<PathBuf>, keep: Duration) -> Swept {
    let now = SystemTime::now();
    let mut swept = Swept::default();
    for root in storage.roots() {
        for k in find_kept(root) {
            let gone = match kept_verdict(&k, receiving, now, keep) {
                KeptVerdict::Receiving | KeptVerdict::Young => None,
                // Checked again under the part's lock: a resume may have touched it since.
                KeptVerdict::Expired => match discard_if_idle(&k.final_path, now - keep) {
                    Ok(Discard::Removed { freed }) => Some(freed),
                    Ok(Discard::Gone) => Some(0),
                    Ok(Discard::InUse | Discard::Fresh) => None,
                    Err(e) => {
                        warn!(image = %k.final_path.display(), "a partial image kept for a resume has expired but could not be removed: {e}");
                        None
                    }
                },
            };
            match gone {
                Some(freed) => {
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

/// Runs [`expire_kept`] now and then every `keep / 4` (at least every second, at most
/// every hour), publishing what is kept and what went in `metrics`.
pub fn spawn_expiry(
    storage: Arc<StorageRoots>,
    registry: Arc<ColdRegistry>,
    metrics: Arc<crate::metrics::Metrics>,
    keep: Duration,
) {
    let every = (keep / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    tokio::spawn(async move {
        loop {
            let receiving = registry.receiving_images().await;
            let storage = storage.clone();
            let pass =
                tokio::task::spawn_blocking(move || expire_kept(&storage, &receiving, keep)).await;
            match pass {
                Ok(swept) => {
                    metrics
                        .partial_images_expired
                        .inc_by(swept.removed.len() as u64);
                    metrics
                        .partial_images_kept_bytes
                        .set(swept.kept_bytes as i64);
                }
                Err(e) => warn!("the expiry of kept partial images failed: {e}"),
            }
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
