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

/// Where a feed's download stands ([`SyncState::download`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Download {
    /// We do not download this feed here (we only serve it, or live mode).
    NotOurs,
    /// Still fetching.
    Going,
    /// The target length is held contiguously.
    Reached,
    /// Short of the target, and the peer lacks what we lack.
    PeerExhausted,
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
    /// Blocks below the cursor were asked for once since the peer's last news; a block the
    /// peer lacked (NoData) is asked again only after news.
    cursor: u64,
    /// The peer could not give the upgrade we asked for: wait for news before asking again.
    upgrade_refused: bool,
    /// The peer lacked the block we asked for with the upgrade: ask for the upgrade alone.
    bare_upgrade: bool,
    /// We sent the peer an upgrade: its new length (and with it, proofs it could not make
    /// before) comes in its next Synchronize.
    upgrade_served: bool,
    /// Since the scan started: the peer lacked a block we asked for, and answered another
    /// with data. The blocks that came tell us more tree nodes, so a block the peer could not
    /// prove before may be provable now: then the scan runs once more.
    lacked: bool,
    gained: bool,
    max_in_flight: usize,
    /// For a feed we download (non-live): the length to reach.
    target: Option<u64>,
    /// Set once an answer came out of order: node counts assume only our contiguous blocks.
    cautious: bool,
    /// Requests in flight whose node count assumed the block before arrives first.
    optimistic: HashSet<u64>,
    /// Answers in a row that brought no block and no length.
    fruitless: u32,
    /// Blocks below this are confirmed held (see [`confirmed_contiguous`](Self::confirmed_contiguous)).
    verified: u64,
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
            upgrade_refused: false,
            bare_upgrade: false,
            upgrade_served: false,
            lacked: false,
            gained: false,
            max_in_flight: max_in_flight.max(1),
            target: None,
            cautious: false,
            optimistic: HashSet::new(),
            fruitless: 0,
            verified: 0,
        }
    }

    /// Whether nothing is in flight.
    pub(crate) fn idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// The length to download to, for a feed we fetch (non-live).
    pub(crate) fn target(&self) -> Option<u64> {
        self.target
    }

    /// Sets the length to download to.
    pub(crate) fn set_target(&mut self, target: u64) {
        self.target = Some(target);
    }

    /// Where the download of this feed stands.
    pub(crate) fn download(&self, contiguous: u64, local_length: u64) -> Download {
        match self.target {
            None => Download::NotOurs,
            Some(target) if contiguous >= target => Download::Reached,
            Some(_) if self.exhausted(local_length) => Download::PeerExhausted,
            Some(_) => Download::Going,
        }
    }

    /// How many tree nodes to ask for with block `index` (request `id`), or `None` to ask
    /// hypercore. Pipelined blocks count on the block before arriving first (answers come in
    /// order; see [`nodes_to_ask`]) until an answer came out of order.
    pub(crate) fn nodes_for(
        &mut self,
        index: u64,
        id: u64,
        fork: u64,
        contiguous: u64,
        length: u64,
    ) -> Option<u64> {
        let optimistic = !self.cautious
            && fork == 0
            && index > contiguous
            && self.blocks_in_flight.contains(&(index - 1));
        let held_below = if optimistic {
            self.optimistic.insert(id);
            index
        } else {
            contiguous
        };
        nodes_to_ask(index, fork, held_below, length)
    }

    /// Whether request `id` counted on the block before arriving first (forgets it).
    pub(crate) fn take_optimistic(&mut self, id: u64) -> bool {
        self.optimistic.remove(&id)
    }

    /// An answer to an optimistic request came before the block it counted on: ask for block
    /// `index` again, counting on contiguous blocks only from now on.
    pub(crate) fn out_of_order(&mut self, index: u64) {
        self.cautious = true;
        self.retry_from(index);
    }

    /// An answer that brought nothing; returns how many came in a row.
    pub(crate) fn fruitless_answer(&mut self) -> u32 {
        self.fruitless += 1;
        self.fruitless
    }

    /// An answer that brought a block or a length.
    pub(crate) fn progressed(&mut self) {
        self.fruitless = 0;
    }

    /// The contiguous length, confirmed block by block up to what the core `reported`
    /// (hypercore 0.16 reports its header's even when a damaged bitfield lost the blocks).
    /// Blocks confirmed before are not looked up again.
    pub(crate) fn confirmed_contiguous(&mut self, reported: u64, has: impl Fn(u64) -> bool) -> u64 {
        if self.verified > reported {
            // Truncated, or another fork: confirm again from the start.
            self.verified = 0;
        }
        while self.verified < reported && has(self.verified) {
            self.verified += 1;
        }
        self.verified
    }

    /// The core was replaced (a probe promoted): confirm its blocks again.
    pub(crate) fn forget_confirmed(&mut self) {
        self.verified = 0;
    }

    /// The peer's Synchronize; returns whether it is the first one.
    pub(crate) fn on_remote_sync(&mut self, fork: u64, length: u64) -> bool {
        let first = self.remote.is_none();
        self.remote = Some((fork, length));
        self.upgrade_served = false;
        self.on_remote_has();
        first
    }

    /// The peer announced data it has (Range, Bitfield): ask again for what it lacked before.
    pub(crate) fn on_remote_has(&mut self) {
        self.upgrade_refused = false;
        self.bare_upgrade = false;
        self.rescan();
    }

    fn rescan(&mut self) {
        self.cursor = 0;
        self.lacked = false;
        self.gained = false;
    }

    /// Whether this peer can give us nothing more for now: its length is known, nothing is in
    /// flight, every block we lack below both lengths was asked for since its last news (the
    /// ones still missing, it lacks), we are as long as the peer or it refused the upgrade,
    /// and no upgrade we sent it is still to be announced back (it may let the peer serve
    /// blocks it could not prove before).
    ///
    /// A non-live sync ends a feed's download here even short of its target: a writer that
    /// lost its signed tail in a crash, or a sparse replica, cannot give blocks it lacks, and
    /// waiting for them only ended in the idle timeout.
    pub(crate) fn exhausted(&self, local_length: u64) -> bool {
        let Some((_, remote_length)) = self.remote else {
            return false;
        };
        self.in_flight.is_empty()
            && !self.upgrade_served
            && self.cursor >= local_length.min(remote_length)
            && (remote_length <= local_length || self.upgrade_refused)
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
                if fork == local_fork
                    && length > local_length
                    && !self.upgrade_in_flight
                    && !self.upgrade_refused =>
            {
                self.upgrade_in_flight = true;
                let block = (!self.bare_upgrade
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
        if self.in_flight.len() > self.max_in_flight / 2 {
            return Vec::new();
        }
        let end = local_length.min(self.remote_length());
        if self.in_flight.is_empty() && self.cursor >= end && self.lacked && self.gained {
            self.rescan();
        }
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
        if let Asked::Block(_) | Asked::UpgradeAndBlock(_) = asked {
            self.gained = true;
        }
        Some(asked)
    }

    /// We answered the peer with an upgrade of this feed.
    pub(crate) fn upgrade_served(&mut self) {
        self.upgrade_served = true;
    }

    /// A NoData answer: the peer lacks it. A block is asked for again only after the peer's
    /// next news (the cursor has passed it); the others are still asked for.
    pub(crate) fn on_no_data(&mut self, id: u64) {
        self.optimistic.remove(&id);
        if let Some(asked) = self.in_flight.remove(&id) {
            self.settle(asked);
            match asked {
                Asked::Upgrade => self.upgrade_refused = true,
                Asked::UpgradeAndBlock(_) => self.bare_upgrade = true,
                Asked::Block(_) => {}
            }
            if let Asked::Block(_) | Asked::UpgradeAndBlock(_) = asked {
                self.lacked = true;
            }
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

/// How many tree nodes to ask for with block `index`, without a storage walk: the levels from
/// the block's leaf up to the first node we hold. `None` when this cannot be told from the
/// lengths alone (block beyond our tree, or a fork, whose truncation blanks nodes): ask
/// hypercore then.
///
/// We hold a node of our tree (`length` blocks, fork 0) when it covers one of the blocks below
/// `held_below` (a stored block's path up to its root is stored with it), or when it is one of
/// the tree's roots (stored with the upgrade). With `held_below` = our contiguous length, the
/// count is never below the true one, so the proof always ends at a node we hold. A pipelined
/// download passes `index` when block `index - 1` is asked for just before: the answers come
/// in order, so the proof is as short as if the blocks were fetched one by one, and
/// [`anchor_held`] checks the assumption before the proof is applied.
pub(crate) fn nodes_to_ask(index: u64, fork: u64, held_below: u64, length: u64) -> Option<u64> {
    if fork != 0 || index >= length || index < held_below {
        return None;
    }
    // Flat-tree node at `depth` covering blocks [offset << depth, (offset + 1) << depth).
    let (mut depth, mut offset) = (0u32, index);
    loop {
        let first = offset << depth;
        if first < held_below {
            return Some(u64::from(depth));
        }
        // The parent's last block; past our length, this node is one of the tree's roots.
        let parent_end = (u128::from(offset >> 1) + 1) << (depth + 1);
        if parent_end > u128::from(length) || depth >= 62 {
            return Some(u64::from(depth));
        }
        depth += 1;
        offset >>= 1;
    }
}

/// Whether we hold the node a proof for block `index` with `depth` tree nodes ends at (which
/// hypercore requires): a node within our tree that covers one of our first `contiguous`
/// blocks, or block `index - 1` that we hold (`has`), or that is one of the tree's roots.
pub(crate) fn anchor_held(
    index: u64,
    depth: u64,
    contiguous: u64,
    length: u64,
    has: impl Fn(u64) -> bool,
) -> bool {
    if depth >= 62 {
        return false;
    }
    let first = (index >> depth) << depth;
    let end = u128::from(first) + (1u128 << depth);
    let parent_end = (u128::from(index >> (depth + 1)) + 1) << (depth + 1);
    // A node past our length is above the tree's roots: never stored.
    end <= u128::from(length)
        && (first < contiguous
            || parent_end > u128::from(length)
            || (first < index && has(index - 1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::servable;
    use hypercore_protocol::schema::Request;
    use hypercore_schema::{RequestBlock, RequestSeek, RequestUpgrade};
    use rand::{Rng, SeedableRng};

    /// A seeded rng (`MULTIFEED_SEED`, random by default; the seed is printed).
    fn seeded_rng() -> (u64, rand::rngs::StdRng) {
        let seed: u64 = std::env::var("MULTIFEED_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        println!("MULTIFEED_SEED={seed}");
        (seed, rand::rngs::StdRng::seed_from_u64(seed))
    }

    async fn memory_root() -> multifeed_storage::RootStorage {
        let factory = std::sync::Arc::new(multifeed_storage::MemoryFactory::new());
        multifeed_storage::RootStorage::open(
            factory,
            multifeed_storage::CoreOptions::default(),
            multifeed_storage::Durability::Process,
        )
        .await
        .expect("root")
        .0
    }

    /// A new local feed in `root` holding `length` entries, and its public key.
    async fn writer(
        root: &mut multifeed_storage::RootStorage,
        length: u64,
    ) -> (hypercore::Hypercore, hypercore::VerifyingKey) {
        let signing_key = hypercore::generate_signing_key();
        let public = signing_key.verifying_key();
        let key_pair = hypercore::PartialKeypair {
            public,
            secret: Some(signing_key),
        };
        let (_, mut core) = root
            .create_feed(key_pair, None, multifeed_storage::FeedOrigin::Local)
            .await
            .expect("writer");
        let batch: Vec<Vec<u8>> = (0..length).map(|i| i.to_le_bytes().to_vec()).collect();
        core.append_batch(&batch).await.expect("append");
        (core, public)
    }

    fn req(block: Option<(u64, u64)>, upgrade: Option<(u64, u64)>) -> Request {
        Request {
            id: 1,
            fork: 0,
            hash: None,
            block: block.map(|(index, nodes)| RequestBlock { index, nodes }),
            seek: None,
            upgrade: upgrade.map(|(start, length)| RequestUpgrade { start, length }),
            manifest: false,
            priority: 0,
        }
    }

    #[test]
    fn servable_requests_stay_within_the_feed() {
        assert!(servable(&req(Some((9, 3)), None), 10));
        assert!(
            !servable(&req(Some((10, 3)), None), 10),
            "block beyond the length"
        );
        assert!(
            !servable(&req(Some((1, 65)), None), 10),
            "more nodes than tree levels"
        );
        assert!(servable(&req(None, Some((0, 10))), 10));
        assert!(
            !servable(&req(None, Some((4, 7))), 10),
            "upgrade past the length"
        );
        assert!(!servable(&req(None, Some((4, 0))), 10), "empty upgrade");
        assert!(
            !servable(&req(None, Some((u64::MAX, 2))), 10),
            "overflowing upgrade"
        );
        assert!(servable(&req(Some((4, 0)), Some((2, 3))), 10));
        assert!(
            !servable(&req(Some((5, 0)), Some((2, 3))), 10),
            "block after the upgrade"
        );
        assert!(!servable(&req(None, None), 10), "asks for nothing");
        let mut seek = req(Some((1, 0)), None);
        seek.seek = Some(RequestSeek { bytes: 3 });
        assert!(!servable(&seek, 10), "seek is never served");
    }

    /// Random requests, as a hostile peer would send: those `servable` lets through never make
    /// hypercore 0.16 panic (unfiltered, about one in five does).
    #[test]
    fn servable_requests_never_panic_hypercore() {
        use futures::FutureExt;
        let (seed, mut rng) = seeded_rng();
        async_std::task::block_on(async {
            let mut root = memory_root().await;
            let (mut core, _) = writer(&mut root, 100).await;
            let number = |rng: &mut rand::rngs::StdRng| match rng.gen_range(0..4) {
                0 => rng.gen_range(0..8),
                1 => rng.gen_range(0..130),
                2 => rng.gen_range(0..300),
                _ => rng.gen(),
            };
            let (mut served, mut refused) = (0, 0);
            for _ in 0..20_000 {
                let block = rng
                    .gen_bool(0.6)
                    .then(|| (number(&mut rng), number(&mut rng)));
                let upgrade = rng
                    .gen_bool(0.5)
                    .then(|| (number(&mut rng), number(&mut rng)));
                let request = req(block, upgrade);
                if !servable(&request, core.info().length) {
                    refused += 1;
                    continue;
                }
                served += 1;
                let proof = std::panic::AssertUnwindSafe(core.create_proof(
                    request.block.clone(),
                    None,
                    None,
                    request.upgrade.clone(),
                ))
                .catch_unwind()
                .await;
                assert!(
                    proof.is_ok(),
                    "MULTIFEED_SEED={seed}: hypercore panicked on {request:?}"
                );
            }
            assert!(
                served > 1_000 && refused > 1_000,
                "{served} served, {refused} refused"
            );
        });
    }

    /// `nodes_to_ask` and `anchor_held` against hypercore 0.16 itself, for random feed lengths
    /// and download orders (sequential bursts and random blocks, answers sometimes out of
    /// order): a cautious count is never below `missing_nodes`; a proof `anchor_held` accepts
    /// always verifies; a cautious count is always anchored.
    #[test]
    fn nodes_to_ask_is_never_short_and_always_verifies() {
        use hypercore::PartialKeypair;
        use multifeed_storage::FeedOrigin;
        let (seed, mut rng) = seeded_rng();
        async_std::task::block_on(async {
            let mut root = memory_root().await;
            let mut replica_root = memory_root().await;
            let (mut exact_total, mut ours_total, mut skipped) = (0u64, 0u64, 0u64);
            for _ in 0..12 {
                let length: u64 = rng.gen_range(1..600);
                let (mut writer, public) = writer(&mut root, length).await;
                let (_, mut replica) = replica_root
                    .create_feed(
                        PartialKeypair {
                            public,
                            secret: None,
                        },
                        None,
                        FeedOrigin::Remote,
                    )
                    .await
                    .expect("replica");
                let upgrade = RequestUpgrade { start: 0, length };
                let proof = writer
                    .create_proof(None, None, None, Some(upgrade))
                    .await
                    .expect("upgrade proof")
                    .expect("upgrade");
                replica
                    .verify_and_apply_proof(&proof)
                    .await
                    .expect("upgrade");
                // Sequential bursts, then random blocks.
                let mut order: Vec<u64> = Vec::new();
                let sequential = rng.gen_range(0..=length);
                order.extend(0..sequential);
                let mut rest: Vec<u64> = (sequential..length).collect();
                rand::seq::SliceRandom::shuffle(rest.as_mut_slice(), &mut rng);
                order.extend(rest);
                for burst in order.chunks(rng.gen_range(1..40)) {
                    // Pipelined asks count on the block just before being answered first, as
                    // the driver does; cautious ones only on the contiguous blocks.
                    let pipelined = rng.gen_bool(0.5);
                    let info = replica.info();
                    let mut asks = Vec::new();
                    let mut previous = None;
                    for &index in burst {
                        let exact = replica.missing_nodes(index).await.expect("missing");
                        let held_below = if pipelined && previous == index.checked_sub(1) {
                            index
                        } else {
                            info.contiguous_length
                        };
                        previous = Some(index);
                        let ours = nodes_to_ask(index, info.fork, held_below, info.length)
                            .expect("within the tree");
                        if !pipelined {
                            assert!(
                                ours >= exact,
                                "MULTIFEED_SEED={seed}: block {index} of {length}: {ours} < {exact}"
                            );
                        }
                        if index < sequential {
                            exact_total += exact;
                            ours_total += ours;
                        }
                        asks.push((index, ours));
                    }
                    // Answers mostly come in order; sometimes not.
                    if rng.gen_bool(0.2) {
                        rand::seq::SliceRandom::shuffle(asks.as_mut_slice(), &mut rng);
                    }
                    let mut again = Vec::new();
                    for (index, nodes) in asks {
                        let info = replica.info();
                        let held =
                            anchor_held(index, nodes, info.contiguous_length, info.length, |i| {
                                replica.has(i)
                            });
                        assert!(
                            held || pipelined,
                            "MULTIFEED_SEED={seed}: block {index} of {length}: cautious count {nodes} not anchored"
                        );
                        if !held {
                            skipped += 1;
                            again.push(index);
                            continue;
                        }
                        let proof = writer
                            .create_proof(Some(RequestBlock { index, nodes }), None, None, None)
                            .await
                            .expect("proof")
                            .expect("block");
                        replica
                            .verify_and_apply_proof(&proof)
                            .await
                            .unwrap_or_else(|e| {
                                panic!("MULTIFEED_SEED={seed}: block {index} of {length}: {e}")
                            });
                        assert!(replica.has(index));
                    }
                    for index in again {
                        let info = replica.info();
                        let nodes =
                            nodes_to_ask(index, info.fork, info.contiguous_length, info.length)
                                .expect("within the tree");
                        let proof = writer
                            .create_proof(Some(RequestBlock { index, nodes }), None, None, None)
                            .await
                            .expect("proof")
                            .expect("block");
                        replica.verify_and_apply_proof(&proof).await.expect("retry");
                    }
                }
                assert_eq!(replica.info().contiguous_length, length);
            }
            println!(
                "sequential bursts: nodes asked {ours_total}, hypercore's count {exact_total}; \
                 {skipped} answers out of order asked again"
            );
        });
        assert_eq!(nodes_to_ask(5, 1, 0, 10), None, "forks ask hypercore");
        assert_eq!(nodes_to_ask(10, 0, 0, 10), None, "beyond the tree");
        assert_eq!(nodes_to_ask(4, 0, 0, 5), Some(0), "a leaf that is a root");
        assert_eq!(
            nodes_to_ask(0, 0, 0, 1 << 40),
            Some(40),
            "up to the first root"
        );
        assert_eq!(
            nodes_to_ask(11, 0, 10, 1 << 40),
            Some(2),
            "up to a stored block's path"
        );
        assert_eq!(
            nodes_to_ask(u64::MAX - 1, 0, 0, u64::MAX),
            Some(0),
            "the last root"
        );
    }

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
    fn a_block_the_peer_lacks_is_asked_again_only_after_news_and_the_rest_still_are() {
        let mut s = SyncState::new(4);
        s.on_remote_sync(0, 10);
        let blocks = s.next_blocks(0, 10, |_| false);
        assert_eq!(blocks.len(), 4);
        s.on_no_data(blocks[0].1);
        assert!(!s.exhausted(10), "three answers and six blocks to go");
        for (_, id) in &blocks[1..] {
            s.on_data(*id);
        }
        let rest = s.next_blocks(0, 10, |i| (1..4).contains(&i));
        assert_eq!(
            rest.iter().map(|b| b.0).collect::<Vec<_>>(),
            vec![4, 5, 6, 7]
        );
        for (_, id) in &rest {
            s.on_no_data(*id);
        }
        let last = s.next_blocks(0, 10, |i| (1..4).contains(&i));
        assert_eq!(last.iter().map(|b| b.0).collect::<Vec<_>>(), vec![8, 9]);
        for (_, id) in &last {
            s.on_data(*id);
        }
        let held = |i| (1..4).contains(&i) || i >= 8;
        // Blocks came since the scan began: they tell more tree nodes, so the ones the peer
        // could not prove are asked once more.
        let second = s.next_blocks(0, 10, held);
        assert_eq!(
            second.iter().map(|b| b.0).collect::<Vec<_>>(),
            vec![0, 4, 5, 6]
        );
        for (_, id) in &second {
            s.on_no_data(*id);
        }
        let seven = s.next_blocks(0, 10, held);
        assert_eq!(seven.iter().map(|b| b.0).collect::<Vec<_>>(), vec![7]);
        s.on_no_data(seven[0].1);
        assert!(
            s.next_blocks(0, 10, held).is_empty(),
            "nothing came: no third scan"
        );
        assert!(s.exhausted(10), "the peer lacks 0 and 4..8");
        s.on_remote_has();
        assert!(!s.exhausted(10), "news: ask again");
        let again = s.next_blocks(0, 10, held);
        assert_eq!(
            again.iter().map(|b| b.0).collect::<Vec<_>>(),
            vec![0, 4, 5, 6]
        );
    }

    #[test]
    fn pipelined_blocks_count_on_the_block_before_until_an_answer_comes_out_of_order() {
        let mut s = SyncState::new(8);
        s.on_remote_sync(0, 64);
        let blocks = s.next_blocks(0, 64, |_| false);
        // Block 0 anchors on nothing held; block 1 on block 0, asked just before.
        let (first, second) = (blocks[0], blocks[1]);
        assert_eq!(
            s.nodes_for(first.0, first.1, 0, 0, 64),
            nodes_to_ask(0, 0, 0, 64)
        );
        assert_eq!(
            s.nodes_for(second.0, second.1, 0, 0, 64),
            nodes_to_ask(1, 0, 1, 64)
        );
        assert!(s.take_optimistic(second.1), "block 1 counted on block 0");
        assert!(!s.take_optimistic(first.1));
        s.out_of_order(1);
        let third = blocks[2];
        assert_eq!(
            s.nodes_for(third.0, third.1, 0, 0, 64),
            nodes_to_ask(2, 0, 0, 64),
            "cautious: only contiguous blocks count"
        );
        assert!(!s.take_optimistic(third.1));
        // Another fork: hypercore is asked.
        assert_eq!(s.nodes_for(5, 99, 1, 0, 64), None);
    }

    #[test]
    fn the_download_stands_reached_going_or_exhausted_and_fruitless_answers_count_in_a_row() {
        let mut s = SyncState::new(4);
        assert_eq!(s.download(0, 0), Download::NotOurs);
        s.set_target(3);
        assert_eq!(
            s.download(0, 3),
            Download::Going,
            "the peer's length is not known"
        );
        s.on_remote_sync(0, 3);
        let blocks = s.next_blocks(0, 3, |_| false);
        for (_, id) in &blocks {
            s.on_no_data(*id);
        }
        assert!(s.next_blocks(0, 3, |_| false).is_empty());
        assert_eq!(s.download(0, 3), Download::PeerExhausted);
        assert_eq!(s.download(3, 3), Download::Reached);
        assert_eq!((s.fruitless_answer(), s.fruitless_answer()), (1, 2));
        s.progressed();
        assert_eq!(s.fruitless_answer(), 1);
    }

    #[test]
    fn the_contiguous_length_is_confirmed_block_by_block_once() {
        let mut s = SyncState::new(4);
        let looked = std::cell::Cell::new(0);
        let has = |i: u64| {
            looked.set(looked.get() + 1);
            i != 5
        };
        assert_eq!(s.confirmed_contiguous(10, has), 5, "block 5 is not held");
        let before = looked.get();
        assert_eq!(s.confirmed_contiguous(10, has), 5);
        assert_eq!(looked.get(), before + 1, "only block 5 is looked up again");
        assert_eq!(
            s.confirmed_contiguous(3, |_| true),
            3,
            "truncated: confirmed again"
        );
        s.forget_confirmed();
        assert_eq!(s.confirmed_contiguous(2, |i| i == 0), 1);
    }

    /// A feed as the two-peer harness below sees it: a length and the blocks held.
    #[derive(Debug, Clone)]
    struct FakeFeed {
        length: u64,
        held: std::collections::BTreeSet<u64>,
    }

    impl FakeFeed {
        fn contiguous(&self) -> u64 {
            (0..self.length)
                .take_while(|i| self.held.contains(i))
                .count() as u64
        }
    }

    /// One download, stepped deterministically: our `SyncState` asks, a fake peer answers as
    /// hypercore would (a request whose block the peer lacks gets NoData, upgrade included), the
    /// answers arrive in a seeded order (out of order, as JS peers answer), and nothing runs
    /// but this loop: no runtime, storage or clock. Returns once nothing is left to ask for
    /// or in flight.
    fn download(
        ours: &mut FakeFeed,
        theirs: &FakeFeed,
        rng: &mut rand::rngs::StdRng,
        max_in_flight: usize,
    ) {
        let mut s = SyncState::new(max_in_flight);
        s.set_target(theirs.length);
        s.on_remote_sync(0, theirs.length);
        let mut in_flight: Vec<(u64, Asked)> = Vec::new();
        for _ in 0..100_000 {
            let contiguous = ours.contiguous();
            if let Some((id, block)) = s.start_upgrade(0, ours.length, contiguous) {
                in_flight.push((id, block.map_or(Asked::Upgrade, Asked::UpgradeAndBlock)));
            }
            let held = ours.held.clone();
            for (index, id) in s.next_blocks(contiguous, ours.length, |i| held.contains(&i)) {
                assert!(
                    !ours.held.contains(&index),
                    "asked for block {index} we hold"
                );
                assert!(
                    index < ours.length.min(theirs.length),
                    "block {index} past a length"
                );
                in_flight.push((id, Asked::Block(index)));
            }
            if in_flight.is_empty() {
                let settled = s.download(contiguous, ours.length);
                assert!(
                    matches!(settled, Download::Reached | Download::PeerExhausted),
                    "{settled:?} with nothing in flight"
                );
                return;
            }
            // The peer answers one request, any of those in flight.
            let (id, asked) = in_flight.swap_remove(rng.gen_range(0..in_flight.len()));
            let block = match asked {
                Asked::Block(index) | Asked::UpgradeAndBlock(index) => Some(index),
                Asked::Upgrade => None,
            };
            let lacks_block = block.is_some_and(|index| !theirs.held.contains(&index));
            if lacks_block {
                s.on_no_data(id);
                continue;
            }
            assert!(s.on_data(id).is_some(), "an answer to a request in flight");
            if matches!(asked, Asked::Upgrade | Asked::UpgradeAndBlock(_)) {
                ours.length = ours.length.max(theirs.length);
            }
            if let Some(index) = block {
                ours.held.insert(index);
            }
        }
        panic!("the download did not settle in 100,000 steps");
    }

    /// Seeded sweeps of the harness: sparse peers, sparse replicas, shorter and longer ones,
    /// one or many requests in flight. Every block the peer holds below both lengths arrives,
    /// the peer's length is learned, nothing is asked twice while in flight, and the download
    /// always settles (reached, or exhausted: the peer lacks the rest).
    #[test]
    fn two_peers_stepped_deterministically_always_settle_with_every_block_the_peer_holds() {
        for seed in 0..300u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let theirs_len = rng.gen_range(0..200u64);
            let keep = rng.gen_range(0.0..=1.0);
            let theirs = FakeFeed {
                length: theirs_len,
                held: (0..theirs_len).filter(|_| rng.gen_bool(keep)).collect(),
            };
            let ours_len = rng.gen_range(0..=theirs_len);
            let mut ours = FakeFeed {
                length: ours_len,
                held: (0..ours_len).filter(|_| rng.gen_bool(0.3)).collect(),
            };
            let before = ours.held.clone();
            let window = [1, 4, 64][rng.gen_range(0..3)];
            download(&mut ours, &theirs, &mut rng, window);
            let want: std::collections::BTreeSet<u64> =
                theirs.held.union(&before).copied().collect();
            assert_eq!(
                ours.length, theirs.length,
                "seed {seed}: the peer's length is learned"
            );
            assert_eq!(
                ours.held, want,
                "seed {seed}: every block the peer holds, nothing else"
            );
        }
    }

    #[test]
    fn a_refused_upgrade_is_asked_again_only_after_news() {
        let mut s = SyncState::new(4);
        assert!(!s.exhausted(0), "the peer's length is not known yet");
        s.on_remote_sync(0, 5);
        let (id, block) = s.start_upgrade(0, 2, 2).expect("an upgrade");
        assert_eq!(block, Some(2));
        assert!(!s.exhausted(2));
        s.on_no_data(id);
        let (id, block) = s.start_upgrade(0, 2, 2).expect("the upgrade alone");
        assert_eq!(block, None, "the peer lacked block 2");
        assert!(!s.exhausted(2));
        s.on_no_data(id);
        assert_eq!(s.start_upgrade(0, 2, 2), None, "refused");
        assert!(s.next_blocks(2, 2, |_| true).is_empty());
        assert!(s.exhausted(2));
        s.upgrade_served();
        assert!(!s.exhausted(2), "the peer's new length is still to come");
        s.on_remote_sync(0, 5);
        assert!(s.start_upgrade(0, 2, 2).is_some(), "news: ask again");
    }

    #[test]
    fn never_asks_past_either_length_or_on_another_fork() {
        let mut s = SyncState::new(8);
        s.on_remote_sync(1, 5);
        assert_eq!(s.start_upgrade(0, 0, 0), None, "other fork");
        assert!(s.next_blocks(0, 3, |_| false).iter().all(|b| b.0 < 3));
    }
}
