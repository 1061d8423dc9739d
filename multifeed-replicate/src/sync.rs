//! Per-feed sync state, sans IO: what the peer has, what is in flight, what to ask for next.

use std::collections::{HashMap, HashSet};

/// What a request in flight asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Asked {
    /// The tree upgrade to the peer's length.
    Upgrade,
    /// One block.
    Block(u64),
    /// The upgrade together with one block (one round trip for small feeds).
    UpgradeAndBlock(u64),
}

/// The sync state of one feed on one connection.
#[derive(Debug)]
pub(crate) struct SyncState {
    /// The peer's fork and length, once it sent a Synchronize.
    pub(crate) remote: Option<(u64, u64)>,
    in_flight: HashMap<u64, Asked>,
    blocks_in_flight: HashSet<u64>,
    upgrade_in_flight: bool,
    next_id: u64,
    cursor: u64,
    /// The peer said it lacks some block we asked for: wait for news before asking again.
    stalled: bool,
    max_in_flight: usize,
}

impl SyncState {
    pub(crate) fn new(max_in_flight: usize) -> Self {
        Self {
            remote: None,
            in_flight: HashMap::new(),
            blocks_in_flight: HashSet::new(),
            upgrade_in_flight: false,
            next_id: 1,
            cursor: 0,
            stalled: false,
            max_in_flight: max_in_flight.max(1),
        }
    }

    /// The peer's Synchronize; returns whether it is the first one.
    pub(crate) fn on_remote_sync(&mut self, fork: u64, length: u64) -> bool {
        let first = self.remote.is_none();
        self.remote = Some((fork, length));
        self.stalled = false;
        first
    }

    /// The peer announced data it has (Range, Bitfield): ask again for what it lacked before.
    pub(crate) fn on_remote_has(&mut self) {
        self.stalled = false;
    }

    /// The peer's length, if known.
    pub(crate) fn remote_length(&self) -> u64 {
        self.remote.map_or(0, |(_, length)| length)
    }

    /// If the peer is longer on our fork, and no upgrade is in flight: the request id for one,
    /// and the block to fetch with it (the first one we lack, if the peer has it).
    pub(crate) fn start_upgrade(
        &mut self,
        local_fork: u64,
        local_length: u64,
        contiguous: u64,
    ) -> Option<(u64, Option<u64>)> {
        match self.remote {
            Some((fork, length))
                if fork == local_fork && length > local_length && !self.upgrade_in_flight =>
            {
                self.upgrade_in_flight = true;
                let block = (!self.stalled
                    && contiguous < length
                    // Only the block right after our tree: hypercore 0.16 computes the offset of
                    // a block further on from the wrong roots (and may panic).
                    && contiguous == local_length
                    && !self.blocks_in_flight.contains(&contiguous))
                .then_some(contiguous);
                let asked = match block {
                    Some(index) => {
                        self.blocks_in_flight.insert(index);
                        Asked::UpgradeAndBlock(index)
                    }
                    None => Asked::Upgrade,
                };
                Some((self.issue(asked), block))
            }
            _ => None,
        }
    }

    /// Blocks to request now: missing (per `has`), below both lengths, not in flight, up to the
    /// in-flight limit; each gets a request id.
    pub(crate) fn next_blocks(
        &mut self,
        contiguous: u64,
        local_length: u64,
        has: impl Fn(u64) -> bool,
    ) -> Vec<(u64, u64)> {
        // Refill in bursts: wait until half the window is free, so requests share frames.
        if self.stalled || self.in_flight.len() > self.max_in_flight / 2 {
            return Vec::new();
        }
        let end = local_length.min(self.remote_length());
        self.cursor = self.cursor.max(contiguous);
        let mut out = Vec::new();
        let mut index = self.cursor;
        while index < end && self.in_flight.len() < self.max_in_flight {
            if !has(index) && !self.blocks_in_flight.contains(&index) {
                self.blocks_in_flight.insert(index);
                out.push((index, self.issue(Asked::Block(index))));
            }
            index += 1;
        }
        // Everything below `index` is stored or in flight.
        self.cursor = index;
        out
    }

    fn issue(&mut self, asked: Asked) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.in_flight.insert(id, asked);
        id
    }

    /// A Data answer; `None` for an id we never issued (ignored).
    pub(crate) fn on_data(&mut self, id: u64) -> Option<Asked> {
        let asked = self.in_flight.remove(&id)?;
        self.settle(asked);
        Some(asked)
    }

    /// A NoData answer: the peer lacks it; stop asking until it announces more.
    pub(crate) fn on_no_data(&mut self, id: u64) {
        if let Some(asked) = self.in_flight.remove(&id) {
            self.settle(asked);
            if let Asked::Block(index) | Asked::UpgradeAndBlock(index) = asked {
                self.cursor = self.cursor.min(index);
            }
            self.stalled = true;
        }
    }

    /// A proof that failed to apply: the block must be asked for again later.
    pub(crate) fn retry_from(&mut self, index: u64) {
        self.cursor = self.cursor.min(index);
    }

    fn settle(&mut self, asked: Asked) {
        match asked {
            Asked::Upgrade => self.upgrade_in_flight = false,
            Asked::Block(index) => {
                self.blocks_in_flight.remove(&index);
            }
            Asked::UpgradeAndBlock(index) => {
                self.upgrade_in_flight = false;
                self.blocks_in_flight.remove(&index);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_once_then_pipelined_blocks() {
        let mut s = SyncState::new(4);
        assert_eq!(s.start_upgrade(0, 0, 0), None, "no remote yet");
        assert!(s.on_remote_sync(0, 10));
        let (up, block) = s.start_upgrade(0, 0, 0).expect("upgrade");
        assert_eq!(block, Some(0), "the first block rides with the upgrade");
        assert_eq!(s.start_upgrade(0, 0, 0), None, "one upgrade in flight");
        assert_eq!(s.on_data(up), Some(Asked::UpgradeAndBlock(0)));
        let blocks = s.next_blocks(1, 10, |_| false);
        assert_eq!(
            blocks.iter().map(|b| b.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert!(s.next_blocks(1, 10, |_| false).is_empty(), "window full");
        assert_eq!(s.on_data(blocks[1].1), Some(Asked::Block(2)));
        assert!(
            s.next_blocks(1, 10, |_| false).is_empty(),
            "refills only at half the window"
        );
        assert_eq!(s.on_data(blocks[0].1), Some(Asked::Block(1)));
        let more = s.next_blocks(1, 10, |i| i <= 2);
        assert_eq!(more.iter().map(|b| b.0).collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(s.on_data(999), None, "unknown ids are ignored");
    }

    #[test]
    fn no_data_stalls_until_news() {
        let mut s = SyncState::new(8);
        s.on_remote_sync(0, 3);
        let blocks = s.next_blocks(0, 3, |_| false);
        s.on_no_data(blocks[0].1);
        assert!(s.next_blocks(0, 3, |_| false).is_empty(), "stalled");
        s.on_remote_has();
        let again = s.next_blocks(0, 3, |_| false);
        assert_eq!(again.iter().map(|b| b.0).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn never_asks_past_either_length_or_on_another_fork() {
        let mut s = SyncState::new(8);
        s.on_remote_sync(1, 5);
        assert_eq!(s.start_upgrade(0, 0, 0), None, "other fork");
        assert!(s.next_blocks(0, 3, |_| false).iter().all(|b| b.0 < 3));
    }
}
