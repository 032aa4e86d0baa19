//! One write tracker per VM at a time. Every tracker of a VM works on the one userfaultfd
//! the shim created inside its QEMU: a second one arming would write-protect again pages the
//! first had not collected yet (the first would miss those writes), and its disarm would
//! unregister the first one's range. A migration and `ferryctl preflight`'s dirty-rate
//! sample therefore claim the VM's tracker first.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The VMs whose QEMU has a write tracker attached by this agent.
#[derive(Debug, Default)]
pub struct TrackerClaims(Arc<Mutex<HashSet<String>>>);

/// A VM's tracker, claimed until this is dropped.
#[derive(Debug)]
pub struct TrackerClaim {
    set: Arc<Mutex<HashSet<String>>>,
    vm: String,
}

impl TrackerClaims {
    /// Claims `vm`'s tracker if nobody holds it.
    pub fn try_claim(&self, vm: &str) -> Option<TrackerClaim> {
        let mut set = self.0.lock().ok()?;
        set.insert(vm.to_string()).then(|| TrackerClaim {
            set: self.0.clone(),
            vm: vm.to_string(),
        })
    }

    /// Claims `vm`'s tracker, waiting up to `limit` for its holder (a preflight sample
    /// lasts ~1 s) to let go.
    pub async fn claim(&self, vm: &str, limit: Duration) -> Option<TrackerClaim> {
        let until = Instant::now() + limit;
        loop {
            if let Some(c) = self.try_claim(vm) {
                return Some(c);
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TrackerClaim {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.vm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_claim_per_vm_until_dropped() {
        let claims = TrackerClaims::default();
        let a = claims.try_claim("web1").expect("free");
        assert!(claims.try_claim("web1").is_none(), "held");
        let other = claims.try_claim("db1").expect("another VM is independent");
        assert!(claims
            .claim("web1", Duration::from_millis(60))
            .await
            .is_none());
        // Released while a claimant waits: it gets the tracker.
        let waiter = claims.claim("web1", Duration::from_secs(5));
        let release = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(a);
        };
        let (got, ()) = tokio::join!(waiter, release);
        assert!(got.is_some());
        drop(got);
        drop(other);
        assert!(claims.try_claim("web1").is_some() && claims.try_claim("db1").is_some());
    }
}
