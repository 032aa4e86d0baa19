//! The source's audit of its write tracker during pre-copy.
//!
//! Verification in the pause covers only what was *sent* (per-page sums kept by the
//! sender, compared with the target's): a write the tracker missed would leave a stale
//! page on the target that both sums agree on. The audit catches such misses while the
//! guest still runs: each round it re-hashes a window of pages the tracker calls clean
//! against the sums sent. A page that reads differently is a *suspect*, not yet a miss:
//! the guest may have written it after the last collection, and then the next collection
//! reports it. A suspect the next collection does not report is a write the tracker
//! missed. Windows rotate over the whole RAM, so every page is audited every
//! `pages / budget` rounds.
//!
//! This type holds the bookkeeping only (no I/O): the hashing is
//! [`crate::PageSums::mismatches`].

use crate::DirtyBitmap;

/// Rotating audit windows and the suspects they found.
#[derive(Debug, Clone)]
pub struct TrackerAudit {
    pages: u64,
    budget: u64,
    cursor: u64,
    suspects: Vec<u64>,
    audited: u64,
}

impl TrackerAudit {
    /// An audit of `pages` pages, `budget` pages per round (0: no audit).
    pub fn new(pages: u64, budget: u64) -> Self {
        TrackerAudit {
            pages,
            budget: budget.min(pages),
            cursor: 0,
            suspects: Vec::new(),
            audited: 0,
        }
    }

    /// The window to audit this round, `first..end`, and moves the cursor past it.
    /// `None` when auditing is off.
    pub fn next_window(&mut self) -> Option<(u64, u64)> {
        if self.budget == 0 {
            return None;
        }
        let first = self.cursor;
        let end = (first + self.budget).min(self.pages);
        self.cursor = if end >= self.pages { 0 } else { end };
        self.audited += end - first;
        Some((first, end))
    }

    /// Takes back a window [`next_window`](Self::next_window) gave that was not hashed to
    /// the end: its pages do not count as audited.
    pub fn abandon(&mut self, first: u64, end: u64) {
        self.audited = self.audited.saturating_sub(end.saturating_sub(first));
    }

    /// Adds the pages of a window that did not read as sent.
    pub fn add_suspects(&mut self, pages: impl IntoIterator<Item = u64>) {
        self.suspects.extend(pages);
    }

    /// Settles the suspects against the next collection of written pages: those it
    /// reports were written after the audit read them (fine, their new copy goes next
    /// round); the rest are writes the tracker missed, returned.
    pub fn settle(&mut self, collected: &DirtyBitmap) -> Vec<u64> {
        std::mem::take(&mut self.suspects)
            .into_iter()
            .filter(|&p| !collected.get(p))
            .collect()
    }

    /// Pages audited so far (a page audited twice counts twice).
    pub fn audited(&self) -> u64 {
        self.audited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_rotate_over_all_pages() {
        let mut a = TrackerAudit::new(10, 4);
        assert_eq!(a.next_window(), Some((0, 4)));
        assert_eq!(a.next_window(), Some((4, 8)));
        assert_eq!(a.next_window(), Some((8, 10)));
        assert_eq!(a.next_window(), Some((0, 4)));
        assert_eq!(a.audited(), 14);
        a.abandon(0, 4);
        assert_eq!(a.audited(), 10);
        // A budget larger than the RAM audits all of it each round.
        let mut whole = TrackerAudit::new(10, 100);
        assert_eq!(whole.next_window(), Some((0, 10)));
        assert_eq!(whole.next_window(), Some((0, 10)));
        assert_eq!(TrackerAudit::new(10, 0).next_window(), None);
    }

    #[test]
    fn suspects_the_next_collection_reports_are_not_misses() {
        let mut a = TrackerAudit::new(100, 50);
        a.add_suspects([3, 7, 42]);
        let mut collected = DirtyBitmap::new(100);
        collected.set(7);
        collected.set(42);
        assert_eq!(a.settle(&collected), vec![3]);
        // Settled suspects are gone.
        assert!(a.settle(&DirtyBitmap::new(100)).is_empty());
    }
}
