//! A guard around each feed's `oplog` store that makes hypercore 0.16 crash-safe across reopens.
//!
//! # The hypercore 0.16 defect it works around
//!
//! Hypercore's oplog holds two header slots (bytes `0..4096` and `4096..8192`) and then a log of
//! entries, each an 8-byte leader (CRC-32, 30-bit length, partial and header bits) and the entry.
//! An append writes its entry at `8192 + entries_byte_length`; every few appends hypercore writes
//! the tree, the bitfield and a new header covering everything, then truncates the oplog to 8192.
//!
//! When a feed is opened with entries still pending in its oplog, hypercore 0.16 replays them but
//! sets `entries_byte_length` to 0. The next append therefore writes its entry at 8192, over the
//! first pending entry. If the process dies before the following header flush, the file holds the
//! old header and the new entry, but not the overwritten entry's tree nodes: the feed no longer
//! opens ("Could not load node"), or fails on a checksum when the new entry is shorter than the
//! one it overwrote. A SIGKILL hits that window about once in 20–50 kills of a busy appender.
//!
//! # What the guard does
//!
//! * On open it reads the oplog, finds where the valid entries end, and from the first write
//!   into the entry area on, shifts entry offsets past them: new entries are appended after the
//!   pending ones instead of overwriting them, so a replay after any kill sees them all, in order.
//!   Hypercore's next flush writes a header that covers every replayed entry and truncates the
//!   entry area; the shift ends there.
//! * It cuts entries written before the current header (their header bit differs from the one
//!   hypercore writes after that header). They are left when a process dies between writing a
//!   header and truncating the entries it covers; hypercore 0.16 does not check the bit and
//!   replays them as a truncation to an older length, after which the feed no longer loads.
//! * It repairs what hypercore would refuse to open although nothing acknowledged is in it: bytes
//!   after the last valid entry (a torn entry write), trailing entries marked partial (hypercore
//!   0.16 loops forever on them), and a torn header slot when the other slot is intact (hypercore
//!   then opens from the intact, older header and replays the entries written after it).

use async_trait::async_trait;
use random_access_storage::{RandomAccess, RandomAccessError};

use crate::factory::BoxedStore;

/// Size of one header slot.
const SLOT_SIZE: u64 = 4096;
/// Where the entries start: after the two header slots.
const ENTRIES_START: u64 = 2 * SLOT_SIZE;
const LEADER_SIZE: usize = 8;

/// A validated leader: the length of what follows it and its partial bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leader {
    /// No entry or header here (too short, or a zero or overlong length).
    Absent,
    /// A length that fits but a checksum that does not match: a torn or damaged write.
    Damaged,
    /// A valid entry of `len` bytes after the leader, with its partial and header bits.
    Valid {
        len: usize,
        partial: bool,
        header_bit: bool,
    },
}

/// Validates a leader at the start of `buffer`, as hypercore 0.16's oplog does.
fn leader(buffer: &[u8]) -> Leader {
    if buffer.len() < LEADER_SIZE {
        return Leader::Absent;
    }
    let stored = u32::from_le_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]);
    let combined = u32::from_le_bytes([buffer[4], buffer[5], buffer[6], buffer[7]]);
    let len = (combined >> 2) as usize;
    if len == 0 || buffer.len() - LEADER_SIZE < len {
        return Leader::Absent;
    }
    if crc32fast::hash(&buffer[4..LEADER_SIZE + len]) != stored {
        return Leader::Damaged;
    }
    Leader::Valid {
        len,
        partial: combined & 2 == 2,
        header_bit: combined & 1 == 1,
    }
}

/// What a scan of a stored oplog found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OplogScan {
    /// Header slots (0 or 1) to blank because they are torn while the other one is intact.
    pub(crate) torn_slots: Vec<u64>,
    /// Byte length of the valid, complete entries after the header slots.
    pub(crate) entries_len: u64,
    /// The stored length, when bytes after the valid entries must be cut.
    pub(crate) cut_from: Option<u64>,
}

/// Scans a stored oplog (its whole content).
pub(crate) fn scan(content: &[u8]) -> OplogScan {
    let slot = |index: u64| {
        let start = (index * SLOT_SIZE) as usize;
        let end = (start + SLOT_SIZE as usize).min(content.len());
        content.get(start..end).map_or(Leader::Absent, leader)
    };
    let slots = [slot(0), slot(1)];
    let bit = |l: &Leader| match l {
        Leader::Valid { header_bit, .. } => Some(*header_bit),
        _ => None,
    };
    let mut torn_slots = Vec::new();
    for (index, other) in [(0u64, 1usize), (1, 0)] {
        if slots[index as usize] == Leader::Damaged && bit(&slots[other]).is_some() {
            torn_slots.push(index);
        }
    }
    // The bit hypercore writes on entries after the header it opens from: header writes
    // alternate between the slots, and entries after a header in the second slot carry 1, after
    // one in the first slot 0. Hypercore opens from the first slot when both header bits are
    // equal, from the second when they differ, and from the only valid one otherwise.
    let current_bit = match (bit(&slots[0]), bit(&slots[1])) {
        (Some(first), Some(second)) => first != second,
        (Some(_), None) => false,
        (None, Some(_)) => true,
        // Nothing to open from: leave the file as it is for hypercore to report.
        (None, None) => {
            return OplogScan {
                torn_slots,
                entries_len: 0,
                cut_from: None,
            }
        }
    };

    let mut entries_len = 0u64;
    // Length up to the end of the last entry that is not partial.
    let mut complete_len = 0u64;
    if let Some(mut rest) = content.get(ENTRIES_START as usize..) {
        while let Leader::Valid {
            len,
            partial,
            header_bit,
        } = leader(rest)
        {
            if header_bit != current_bit {
                // Written before the current header, which covers it: hypercore 0.16 would
                // replay it as a truncation to its older length (its open does not check the bit).
                break;
            }
            let size = LEADER_SIZE + len;
            entries_len += size as u64;
            if !partial {
                complete_len = entries_len;
            }
            rest = &rest[size..];
        }
    }
    let stored = content.len() as u64;
    let keep = ENTRIES_START + complete_len;
    OplogScan {
        torn_slots,
        entries_len: complete_len,
        cut_from: (stored > keep && stored > ENTRIES_START).then_some(stored),
    }
}

/// The oplog store of one feed, guarded as described in the module docs.
#[derive(Debug)]
pub(crate) struct OplogGuard {
    inner: BoxedStore,
    /// Length of the entries that were pending when the feed was opened.
    pending: u64,
    /// Whether entry-area offsets are shifted past the pending entries (after the first write).
    shifted: bool,
}

impl OplogGuard {
    /// Reads and repairs the stored oplog; see the module docs.
    pub(crate) async fn open(mut inner: BoxedStore) -> Result<Self, RandomAccessError> {
        let len = inner.len().await?;
        if len == 0 {
            return Ok(Self {
                inner,
                pending: 0,
                shifted: false,
            });
        }
        let content = inner.read(0, len).await?;
        let found = scan(&content);
        for slot in &found.torn_slots {
            inner.write(slot * SLOT_SIZE, &[0u8; LEADER_SIZE]).await?;
        }
        if found.cut_from.is_some() {
            inner.truncate(ENTRIES_START + found.entries_len).await?;
        }
        Ok(Self {
            inner,
            pending: found.entries_len,
            shifted: false,
        })
    }

    /// Physical offset of a logical entry-area offset.
    fn map(&self, offset: u64) -> u64 {
        if offset >= ENTRIES_START && self.shifted {
            offset + self.pending
        } else {
            offset
        }
    }
}

#[async_trait]
impl RandomAccess for OplogGuard {
    async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RandomAccessError> {
        let end = offset.saturating_add(data.len() as u64);
        if end > ENTRIES_START && self.pending > 0 {
            self.shifted = true;
        }
        if offset < ENTRIES_START && end > ENTRIES_START {
            // Never done by hypercore (headers fit their slots), but keep the mapping exact.
            let (head, tail) = data.split_at((ENTRIES_START - offset) as usize);
            self.inner.write(offset, head).await?;
            let at = self.map(ENTRIES_START);
            return self.inner.write(at, tail).await;
        }
        let at = self.map(offset);
        self.inner.write(at, data).await
    }

    async fn read(&mut self, offset: u64, length: u64) -> Result<Vec<u8>, RandomAccessError> {
        let end = offset.saturating_add(length);
        if self.shifted && offset < ENTRIES_START && end > ENTRIES_START {
            let mut head = self.inner.read(offset, ENTRIES_START - offset).await?;
            let tail = self
                .inner
                .read(self.map(ENTRIES_START), end - ENTRIES_START)
                .await?;
            head.extend_from_slice(&tail);
            return Ok(head);
        }
        let at = self.map(offset);
        self.inner.read(at, length).await
    }

    async fn del(&mut self, offset: u64, length: u64) -> Result<(), RandomAccessError> {
        let end = offset.saturating_add(length);
        if self.shifted && offset < ENTRIES_START && end > ENTRIES_START {
            self.inner.del(offset, ENTRIES_START - offset).await?;
            let at = self.map(ENTRIES_START);
            return self.inner.del(at, end - ENTRIES_START).await;
        }
        let at = self.map(offset);
        self.inner.del(at, length).await
    }

    async fn truncate(&mut self, length: u64) -> Result<(), RandomAccessError> {
        if length <= ENTRIES_START {
            // Hypercore truncates to the entry start right after writing a header that covers
            // every entry, pending ones included: nothing is pending any more.
            self.pending = 0;
            self.shifted = false;
            return self.inner.truncate(length).await;
        }
        let at = self.map(length);
        self.inner.truncate(at).await
    }

    async fn len(&mut self) -> Result<u64, RandomAccessError> {
        let len = self.inner.len().await?;
        if self.shifted && len >= ENTRIES_START + self.pending {
            Ok(len - self.pending)
        } else {
            Ok(len)
        }
    }

    async fn is_empty(&mut self) -> Result<bool, RandomAccessError> {
        Ok(self.len().await? == 0)
    }

    async fn sync_all(&mut self) -> Result<(), RandomAccessError> {
        self.inner.sync_all().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(payload: &[u8], partial: bool) -> Vec<u8> {
        entry_with_bit(payload, partial, false)
    }

    fn entry_with_bit(payload: &[u8], partial: bool, header_bit: bool) -> Vec<u8> {
        let combined =
            ((payload.len() as u32) << 2) | if partial { 2 } else { 0 } | u32::from(header_bit);
        let mut hashed = combined.to_le_bytes().to_vec();
        hashed.extend_from_slice(payload);
        let mut out = crc32fast::hash(&hashed).to_le_bytes().to_vec();
        out.extend_from_slice(&hashed);
        out
    }

    fn oplog(header: &[u8], entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![0u8; ENTRIES_START as usize];
        out[..header.len()].copy_from_slice(header);
        for e in entries {
            out.extend_from_slice(e);
        }
        out
    }

    #[test]
    fn scan_counts_valid_entries_and_cuts_garbage() {
        let header = entry(b"header", false);
        let entries = vec![entry(b"one", false), entry(b"two!", false)];
        let mut bytes = oplog(&header, &entries);
        let valid = (entries[0].len() + entries[1].len()) as u64;
        assert_eq!(
            scan(&bytes),
            OplogScan {
                torn_slots: vec![],
                entries_len: valid,
                cut_from: None
            }
        );
        // A torn third entry: its checksum fails, and hypercore would refuse the whole oplog.
        let mut torn = entry(b"three", false);
        torn[10] ^= 0xff;
        bytes.extend_from_slice(&torn);
        let found = scan(&bytes);
        assert_eq!(found.entries_len, valid);
        assert_eq!(found.cut_from, Some(bytes.len() as u64));
    }

    #[test]
    fn scan_drops_trailing_partial_entries() {
        let header = entry(b"header", false);
        let entries = vec![entry(b"one", false), entry(b"two", true)];
        let bytes = oplog(&header, &entries);
        let found = scan(&bytes);
        assert_eq!(found.entries_len, entries[0].len() as u64);
        assert!(found.cut_from.is_some());
    }

    #[test]
    fn scan_blanks_a_torn_slot_only_when_the_other_is_intact() {
        let header = entry(b"header", false);
        let mut bytes = oplog(&header, &[]);
        let mut second = entry(b"newer header", false);
        second[5] ^= 1;
        bytes[SLOT_SIZE as usize..SLOT_SIZE as usize + second.len()].copy_from_slice(&second);
        assert_eq!(scan(&bytes).torn_slots, vec![1]);
        // Both damaged: nothing to open from, so nothing is touched.
        bytes[5] ^= 1;
        assert_eq!(scan(&bytes).torn_slots, Vec::<u64>::new());
    }

    #[test]
    fn scan_cuts_entries_written_before_the_current_header() {
        // Headers in both slots with different bits: hypercore opens from the second slot and
        // writes bit 1 on the entries after it. Entries with bit 0 came before that header.
        let mut bytes = oplog(&entry_with_bit(b"older", false, false), &[]);
        let newer = entry_with_bit(b"newer", false, true);
        bytes[SLOT_SIZE as usize..SLOT_SIZE as usize + newer.len()].copy_from_slice(&newer);
        let stale = entry_with_bit(b"stale", false, false);
        bytes.extend_from_slice(&stale);
        let found = scan(&bytes);
        assert_eq!(found.entries_len, 0);
        assert_eq!(found.cut_from, Some(bytes.len() as u64));

        // Entries written after the current header stay.
        let mut current = bytes[..ENTRIES_START as usize].to_vec();
        let fresh = entry_with_bit(b"fresh", false, true);
        current.extend_from_slice(&fresh);
        current.extend_from_slice(&stale);
        let found = scan(&current);
        assert_eq!(found.entries_len, fresh.len() as u64);
        assert_eq!(found.cut_from, Some(current.len() as u64));
    }

    #[test]
    fn writes_after_reopen_append_after_pending_entries() {
        async_std::task::block_on(async {
            let store = crate::MemoryStore::new();
            let header = entry(b"header", false);
            let pending = vec![entry(b"pending one", false), entry(b"pending two", false)];
            let bytes = oplog(&header, &pending);
            store.replace(bytes.clone());

            let mut guard = OplogGuard::open(Box::new(store.clone())).await.unwrap();
            // Hypercore reads everything at open, then writes its next entry at the entry start.
            let len = guard.len().await.unwrap();
            assert_eq!(guard.read(0, len).await.unwrap(), bytes);
            let next = entry(b"new", false);
            guard.write(ENTRIES_START, &next).await.unwrap();

            let mut expected = bytes.clone();
            expected.extend_from_slice(&next);
            assert_eq!(
                store.snapshot(),
                expected,
                "pending entries kept, new one after"
            );
            assert_eq!(
                scan(&store.snapshot()).entries_len as usize,
                pending[0].len() + pending[1].len() + next.len()
            );
            assert_eq!(
                guard.len().await.unwrap(),
                ENTRIES_START + next.len() as u64
            );

            // The header flush truncates to the entry start: the shift ends.
            guard.write(SLOT_SIZE, &header).await.unwrap();
            guard.truncate(ENTRIES_START).await.unwrap();
            assert_eq!(store.snapshot().len() as u64, ENTRIES_START);
            guard.write(ENTRIES_START, &next).await.unwrap();
            assert_eq!(store.snapshot().len(), ENTRIES_START as usize + next.len());
        });
    }
}
