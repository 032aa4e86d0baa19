//! The phases of a live migration, named alike on the source and the target.

use serde::{Deserialize, Serialize};

/// One phase of a live migration. The source runs them in this order (one function
/// each); the target names its side of each step the same way, and every error carries
/// the phase it happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Checks against the target's host facts, link probe, dirty-rate and codec samples.
    Preflight,
    /// The target creates the RAM file, the disk copies and a paused QEMU.
    Prepare,
    /// QUIC data plane: control stream, hello, page streams.
    Connect,
    /// Disk mirrors (only for disks without shared storage) until READY.
    Disks,
    /// Rounds of written pages while the guest runs.
    Precopy,
    /// Guest paused: last pages, device state, fingerprints.
    Switchover,
    /// The source QEMU completes its outgoing migration: it can no longer run the guest
    /// by itself. Nothing has been promised to the target yet.
    Fence,
    /// `CommitSent` journaled, Commit on the wire: the outcome is the target's.
    Commit,
    /// After a lost answer: asking the target what happened (IN_DOUBT while unreachable).
    Settle,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 9] = [
        Phase::Preflight,
        Phase::Prepare,
        Phase::Connect,
        Phase::Disks,
        Phase::Precopy,
        Phase::Switchover,
        Phase::Fence,
        Phase::Commit,
        Phase::Settle,
    ];

    /// Lower-case name for messages and logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Preflight => "preflight",
            Phase::Prepare => "prepare",
            Phase::Connect => "connect",
            Phase::Disks => "disks",
            Phase::Precopy => "precopy",
            Phase::Switchover => "switchover",
            Phase::Fence => "fence",
            Phase::Commit => "commit",
            Phase::Settle => "settle",
        }
    }

    /// Whether the target may have committed once a failure happens in this phase: from
    /// `Commit` on, the source must ask before it touches its guest.
    pub fn commit_may_have_happened(self) -> bool {
        self >= Phase::Commit
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_commit_and_later_may_have_committed() {
        let may: Vec<_> = Phase::ALL
            .iter()
            .filter(|p| p.commit_may_have_happened())
            .collect();
        assert_eq!(may, [&Phase::Commit, &Phase::Settle]);
        assert!(
            Phase::ALL.windows(2).all(|w| w[0] < w[1]),
            "ALL is in order"
        );
    }
}
