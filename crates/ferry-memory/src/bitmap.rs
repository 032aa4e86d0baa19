//! [`DirtyBitmap`]: one bit per guest page.

use crate::MemoryError;

/// A set of page indices over `0..len_pages`, stored as one bit per page.
///
/// Used both for "pages written since the last collect" and "pages that are not all-zero".
#[derive(Clone, PartialEq, Eq, Default)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    len_pages: u64,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Printing millions of bits helps nobody: show the size, the count and the first pages.
        let first: Vec<u64> = self.iter().take(16).collect();
        f.debug_struct("DirtyBitmap")
            .field("len_pages", &self.len_pages)
            .field("count", &self.count())
            .field("first", &first)
            .finish()
    }
}

fn words_for(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

impl DirtyBitmap {
    /// An empty bitmap covering `pages` pages.
    pub fn new(pages: u64) -> Self {
        DirtyBitmap {
            words: vec![0; words_for(pages)],
            len_pages: pages,
        }
    }

    /// A bitmap of `pages` pages with the given indices set.
    ///
    /// Fails on the first index `>= pages` (a silently dropped dirty page would corrupt a migration).
    pub fn from_indices(
        pages: u64,
        indices: impl IntoIterator<Item = u64>,
    ) -> Result<Self, MemoryError> {
        let mut bm = DirtyBitmap::new(pages);
        for idx in indices {
            bm.try_set(idx)?;
        }
        Ok(bm)
    }

    /// The bitmap's words (page `p` is bit `p % 64` of word `p / 64`), to fill in place:
    /// disjoint sub-slices may be filled by several threads.
    pub(crate) fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Number of pages covered (valid indices are `0..len_pages()`).
    pub fn len_pages(&self) -> u64 {
        self.len_pages
    }

    /// Mark page `idx`. Returns `false` (and changes nothing) if `idx` is out of range;
    /// use [`try_set`](Self::try_set) to get an error instead.
    pub fn set(&mut self, idx: u64) -> bool {
        if idx >= self.len_pages {
            return false;
        }
        self.words[(idx / 64) as usize] |= 1u64 << (idx % 64);
        true
    }

    /// Mark page `idx`, failing if it is out of range.
    pub fn try_set(&mut self, idx: u64) -> Result<(), MemoryError> {
        if self.set(idx) {
            Ok(())
        } else {
            Err(MemoryError::PageOutOfRange {
                idx,
                pages: self.len_pages,
            })
        }
    }

    /// Mark pages `first..first + count`, failing (and changing nothing) if any is out of range.
    pub fn set_range(&mut self, first: u64, count: u64) -> Result<(), MemoryError> {
        let end = first
            .checked_add(count)
            .filter(|&e| e <= self.len_pages)
            .ok_or(MemoryError::PageOutOfRange {
                idx: first,
                pages: self.len_pages,
            })?;
        let mut idx = first;
        while idx < end {
            // Whole words at a time where possible: tracker regions are often long runs.
            let bit = idx % 64;
            let n = (64 - bit).min(end - idx);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[(idx / 64) as usize] |= mask;
            idx += n;
        }
        Ok(())
    }

    /// Clear page `idx` (no-op if out of range).
    pub fn unset(&mut self, idx: u64) {
        if idx < self.len_pages {
            self.words[(idx / 64) as usize] &= !(1u64 << (idx % 64));
        }
    }

    /// Whether page `idx` is marked (`false` if out of range).
    pub fn get(&self, idx: u64) -> bool {
        idx < self.len_pages && self.words[(idx / 64) as usize] & (1u64 << (idx % 64)) != 0
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is marked.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Marked page indices, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &word)| {
            let mut w = word;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(wi as u64 * 64 + bit)
            })
        })
    }

    /// Add every page marked in `other`. If `other` covers more pages, `self` grows to match
    /// (growing keeps every dirty page; truncating would lose some).
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        if other.len_pages > self.len_pages {
            self.len_pages = other.len_pages;
            self.words.resize(words_for(other.len_pages), 0);
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Unmark every page (the size stays).
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// The raw words: bit `i % 64` of word `i / 64` is page `i`. Bits past `len_pages` are 0.
    pub fn as_words(&self) -> &[u64] {
        &self.words
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn basics() {
        let mut bm = DirtyBitmap::new(130);
        assert_eq!(bm.len_pages(), 130);
        assert!(bm.is_empty());
        assert!(bm.set(0));
        assert!(bm.set(63));
        assert!(bm.set(64));
        assert!(bm.set(129));
        assert!(!bm.set(130), "out of range must be refused");
        assert!(bm.try_set(130).is_err());
        assert!(!bm.get(130));
        assert_eq!(bm.count(), 4);
        assert_eq!(bm.iter().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        bm.unset(63);
        assert!(!bm.get(63));
        bm.clear();
        assert_eq!(bm.count(), 0);
        assert_eq!(bm.len_pages(), 130);
    }

    #[test]
    fn set_range_and_union() {
        let mut a = DirtyBitmap::new(300);
        a.set_range(60, 140).unwrap();
        assert_eq!(a.count(), 140);
        assert_eq!(a.iter().next(), Some(60));
        assert_eq!(a.iter().last(), Some(199));
        assert!(a.set_range(290, 11).is_err());
        assert_eq!(a.count(), 140, "a failed set_range changes nothing");

        let b = DirtyBitmap::from_indices(400, [5, 399]).unwrap();
        a.union_with(&b);
        assert_eq!(a.len_pages(), 400);
        assert!(a.get(5) && a.get(399) && a.get(60));
        assert_eq!(a.count(), 142);
        assert!(DirtyBitmap::from_indices(10, [10]).is_err());
    }

    proptest! {
        #[test]
        fn matches_btreeset(pages in 1u64..2000, idx in proptest::collection::vec(0u64..2000, 0..200)) {
            let mut bm = DirtyBitmap::new(pages);
            let mut set = BTreeSet::new();
            for &i in &idx {
                let inside = bm.set(i);
                prop_assert_eq!(inside, i < pages);
                if inside { set.insert(i); }
            }
            prop_assert_eq!(bm.count(), set.len() as u64);
            prop_assert_eq!(bm.iter().collect::<Vec<_>>(), set.iter().copied().collect::<Vec<_>>());
            for i in 0..pages { prop_assert_eq!(bm.get(i), set.contains(&i)); }
        }

        #[test]
        fn union_is_set_union(a in proptest::collection::vec(0u64..500, 0..50),
                              b in proptest::collection::vec(0u64..700, 0..50)) {
            let mut x = DirtyBitmap::from_indices(500, a.clone()).unwrap();
            let y = DirtyBitmap::from_indices(700, b.clone()).unwrap();
            x.union_with(&y);
            let expect: BTreeSet<u64> = a.into_iter().chain(b).collect();
            prop_assert_eq!(x.iter().collect::<BTreeSet<_>>(), expect);
            prop_assert_eq!(x.len_pages(), 700);
        }
    }
}
