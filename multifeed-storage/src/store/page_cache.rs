//! A bounded, shared, write-through cache of file pages for the disk stores.
//!
//! hypercore reads the same tree nodes and bitfield pages over and over; serving them from here
//! saves a `pread` each time. Writes go to the file first (so the durability contract is that of
//! the file) and then update any cached copy; truncation drops pages past the new end.

use std::collections::HashMap;

/// Bytes per cached page.
pub(crate) const PAGE: u64 = 4096;

#[derive(Debug)]
pub(crate) struct PageCache {
    capacity: usize,
    tick: u64,
    pages: HashMap<(u64, u64), (Vec<u8>, u64)>,
}

impl PageCache {
    pub(crate) fn new(capacity_pages: usize) -> Self {
        Self {
            capacity: capacity_pages,
            tick: 0,
            pages: HashMap::new(),
        }
    }

    /// The cached page `page` of file `file`, as stored (shorter than a page at end of file).
    pub(crate) fn get(&mut self, file: u64, page: u64) -> Option<&[u8]> {
        self.tick += 1;
        let tick = self.tick;
        let entry = self.pages.get_mut(&(file, page))?;
        entry.1 = tick;
        Some(&entry.0)
    }

    pub(crate) fn insert(&mut self, file: u64, page: u64, bytes: Vec<u8>) {
        if self.capacity == 0 {
            return;
        }
        if self.pages.len() >= self.capacity && !self.pages.contains_key(&(file, page)) {
            // Evict the least recently used eighth at once, so eviction stays cheap on average.
            let mut ages: Vec<((u64, u64), u64)> = self
                .pages
                .iter()
                .map(|(key, (_, used))| (*key, *used))
                .collect();
            ages.sort_unstable_by_key(|(_, used)| *used);
            for (key, _) in ages.into_iter().take((self.capacity / 8).max(1)) {
                self.pages.remove(&key);
            }
        }
        self.tick += 1;
        self.pages.insert((file, page), (bytes, self.tick));
    }

    /// Applies a write at `offset` to the cached pages it touches.
    pub(crate) fn write(&mut self, file: u64, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        let mut page = offset / PAGE;
        while page * PAGE < end {
            let start = page * PAGE;
            if let Some((bytes, _)) = self.pages.get_mut(&(file, page)) {
                let from = offset.max(start);
                let to = end.min(start + PAGE);
                let (lo, hi) = ((from - start) as usize, (to - start) as usize);
                if bytes.len() < hi {
                    bytes.resize(hi, 0);
                }
                bytes[lo..hi]
                    .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            }
            page += 1;
        }
    }

    /// Caches the pages a write to `file` fills entirely (from the page's start to its end or
    /// the file's end, `file_len` after the write), so recently written data is read back
    /// without a `pread`. Pages cached already are updated by [`write`](Self::write).
    pub(crate) fn fill(&mut self, file: u64, offset: u64, data: &[u8], file_len: u64) {
        if self.capacity == 0 {
            return;
        }
        let end = offset + data.len() as u64;
        let mut page = offset.div_ceil(PAGE);
        while page * PAGE < end {
            let start = page * PAGE;
            let page_end = (start + PAGE).min(file_len);
            if page_end > end || page_end <= start {
                break;
            }
            if !self.pages.contains_key(&(file, page)) {
                let bytes = data[(start - offset) as usize..(page_end - offset) as usize].to_vec();
                self.insert(file, page, bytes);
            }
            page += 1;
        }
    }

    /// Appends bytes `offset..offset + len` of `file` to `out` if every one of them is cached;
    /// otherwise leaves `out` as it was and returns false.
    pub(crate) fn copy_into(
        &mut self,
        file: u64,
        offset: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> bool {
        let end = offset + len;
        let before = out.len();
        let mut at = offset;
        while at < end {
            let page = at / PAGE;
            let start = page * PAGE;
            let to = end.min(start + PAGE);
            let (lo, hi) = ((at - start) as usize, (to - start) as usize);
            match self.pages.get(&(file, page)) {
                Some((bytes, _)) if bytes.len() >= hi => out.extend_from_slice(&bytes[lo..hi]),
                _ => {
                    out.truncate(before);
                    return false;
                }
            }
            at = to;
        }
        true
    }

    /// Forgets cached bytes at and past `length` of `file`.
    pub(crate) fn truncate(&mut self, file: u64, length: u64) {
        let first_gone = length.div_ceil(PAGE);
        self.pages
            .retain(|(f, page), _| *f != file || *page < first_gone);
        if !length.is_multiple_of(PAGE) {
            if let Some((bytes, _)) = self.pages.get_mut(&(file, length / PAGE)) {
                bytes.truncate((length % PAGE) as usize);
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        self.pages.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_update_and_truncation_drops_cached_pages() {
        let mut cache = PageCache::new(8);
        cache.insert(1, 0, vec![0; 4096]);
        cache.insert(1, 1, vec![0; 100]);
        cache.write(1, 4090, &[9; 20]);
        assert_eq!(&cache.get(1, 0).unwrap()[4090..], &[9; 6]);
        assert_eq!(&cache.get(1, 1).unwrap()[..14], &[9; 14]);
        assert_eq!(cache.get(1, 1).unwrap().len(), 100);
        cache.truncate(1, 4095);
        assert!(cache.get(1, 1).is_none());
        assert_eq!(cache.get(1, 0).unwrap().len(), 4095);
    }

    #[test]
    fn writes_fill_the_pages_they_cover() {
        let mut cache = PageCache::new(8);
        // Pages 1 and 2 are covered (page 2 up to the file's end); page 0 only in part.
        cache.fill(1, 100, &[5; 8100], 8200);
        assert!(cache.get(1, 0).is_none());
        assert_eq!(cache.get(1, 1).unwrap(), &[5; 4096][..]);
        assert_eq!(cache.get(1, 2).unwrap(), &[5; 8][..]);
        // A write that stops short of the file's end leaves its last page alone.
        cache.fill(2, 0, &[1; 10], 20);
        assert!(cache.get(2, 0).is_none());
    }

    #[test]
    fn copies_only_fully_cached_ranges() {
        let mut cache = PageCache::new(8);
        cache.insert(1, 0, (0..4096).map(|i| i as u8).collect());
        cache.insert(1, 1, vec![7; 10]);
        let mut out = vec![1];
        assert!(cache.copy_into(1, 4094, 4, &mut out));
        assert_eq!(out, [1, 254, 255, 7, 7]);
        assert!(
            !cache.copy_into(1, 4094, 20, &mut out),
            "past the cached end"
        );
        assert!(!cache.copy_into(1, 8192, 1, &mut out), "an uncached page");
        assert_eq!(out, [1, 254, 255, 7, 7], "unchanged when refused");
    }

    #[test]
    fn stays_within_capacity() {
        let mut cache = PageCache::new(16);
        for page in 0..100 {
            cache.insert(7, page, vec![1]);
        }
        assert!(cache.pages.len() <= 16);
        assert!(cache.get(7, 99).is_some(), "the newest page stays");
    }
}
