//! Range-based set reconciliation of the offered (key, length) sets, with negentropy.
//!
//! Each side's set holds one item per feed it offers. An item's id is the first 24 bytes of
//! the feed key followed by 8 bytes of SipHash-1-3 of the key and the length, keyed by the
//! connection's [`IdKey`] ([`item_id`]), so a feed held at another length is another item, and
//! an equal feed is the same item on both sides.
//!
//! The replication's initiator drives negentropy's rounds: it sends fingerprints of ranges of
//! ids, the responder answers each range whose fingerprint differs with finer ranges or with
//! its ids, and so on. Equal sets agree in one round trip; d differences cost about
//! O(d log n) bytes. At the end the initiator knows its items the responder lacks (`have`) and
//! the responder's items it lacks (`need`); it offers the first and asks for the second.
//! Everything else is held the same by both and is never sent.
//!
//! Why a keyed hash, not the length itself: negentropy's fingerprint of a range is the *sum* of
//! its ids (mod 2^256) and their count.
//! - With the length in the id as it is, two feeds that each grew by one, one on either side,
//!   summed to the same fingerprint whenever they fell in the same range, and neither was ever
//!   offered. CI found it: 1 re-sync in 12 of 200 feeds missed two of three changes, and every
//!   re-sync after it did too.
//! - With an unkeyed mix, a third party could still plant a feed in one store whose item equals
//!   an honest feed's item in another (same 24-byte prefix, tail solved for), so that the two
//!   stores never swap either; or plant sets whose sums cancel.
//! - Keyed by both sides' handshake nonces, ids are unpredictable before the connection: sums
//!   of different sets collide with odds of about 2^-64 per range, whoever made the keys.
//!   A side of the connection that picks its own items to collide gains nothing: a collision
//!   only hides differences between its set and the other's, which it could hide by not
//!   offering them.
//!
//! SipHash-1-3 costs about 20 ns a feed; a BLAKE2b would cost ten times that, for every feed on
//! every connection. The `siphasher` crate's output is specified and stable across versions,
//! unlike the standard library's hasher.
//!
//! A feed held with gaps must always reach the other side (the peer may fill them), so its item
//! carries, instead of its length, a value no complete feed has and that differs per side.

use negentropy::{Id, Negentropy, NegentropyStorageVector};

use foldhash::HashSet;

use crate::message::{FeedKey, FeedOffer, MAX_MESSAGE_BYTES};
use crate::MetaError;

/// An item id: 24 bytes of the feed key, then 8 bytes of a keyed hash of the key and length.
pub type ItemId = [u8; 32];

/// The most bytes of one reconciliation message (negentropy's frame size limit).
pub const MAX_RECONCILE_BYTES: usize = 48 * 1024;
/// The most negentropy rounds one side takes part in; a peer that needs more is lying (a set of
/// 10^9 items settles in about 8).
pub const MAX_RECONCILE_ROUNDS: u32 = 64;

const _: () = assert!(MAX_RECONCILE_BYTES + 16 < MAX_MESSAGE_BYTES);

/// The key of a connection's item ids: the two handshake nonces XORed.
pub type IdKey = [u8; 16];

/// The id of a feed held complete at `length`: the key's first 24 bytes, then SipHash-1-3,
/// keyed by `id_key`, of the key followed by the length (little-endian), big-endian.
pub fn item_id(id_key: &IdKey, key: &FeedKey, length: u64) -> ItemId {
    let mut input = [0u8; 40];
    input[..32].copy_from_slice(key);
    input[32..].copy_from_slice(&length.to_le_bytes());
    let tail = siphasher::sip::SipHasher13::new_with_key(id_key).hash(&input);
    let mut id = [0u8; 32];
    id[..24].copy_from_slice(&key[..24]);
    id[24..].copy_from_slice(&tail.to_be_bytes());
    id
}

/// The id of a feed held with gaps (contiguous below its length): hashed from a value with the
/// top bit set (no length has it) and one bit for the side, so it matches no item of the peer
/// (but with odds of 2^-64).
pub fn incomplete_item_id(
    id_key: &IdKey,
    key: &FeedKey,
    contiguous: u64,
    initiator: bool,
) -> ItemId {
    let marker = (1u64 << 63) | (u64::from(initiator) << 62) | (contiguous & ((1 << 62) - 1));
    item_id(id_key, key, marker)
}

/// An id's first 8 bytes, big-endian: they order ids as their bytes do, as far as they go.
fn id_head(id: &ItemId) -> u64 {
    let mut head = [0u8; 8];
    head.copy_from_slice(&id[..8]);
    u64::from_be_bytes(head)
}

/// Sorts `order`, whose order must agree with the order of `head`.
///
/// Heads are the first 8 bytes of feed keys, nearly uniform: a large set is first spread into
/// about one bucket per item by the heads' top bits (one counting pass and one scatter), then
/// each bucket is sorted on its own; that is linear where a comparison sort of 100,000 items
/// was a sixth of a re-sync. Keys made to share their top bits only fill one bucket, which is
/// then sorted as the whole set was before.
pub(crate) fn sort_by_head<T: Copy + Default + Ord>(order: &mut Vec<T>, head: impl Fn(&T) -> u64) {
    const MIN_BUCKETED: usize = 1024;
    const MAX_BITS: u32 = 16;
    let n = order.len();
    if n < MIN_BUCKETED {
        order.sort_unstable();
        return;
    }
    let bits = (usize::BITS - 1 - n.leading_zeros()).min(MAX_BITS);
    let shift = 64 - bits;
    let bucket = |item: &T| (head(item) >> shift) as usize;
    // `starts[b]..starts[b + 1]` is bucket b's part of the output.
    let mut starts = vec![0usize; (1 << bits) + 1];
    for item in order.iter() {
        starts[bucket(item) + 1] += 1;
    }
    for b in 1..starts.len() {
        starts[b] += starts[b - 1];
    }
    let mut next = starts.clone();
    let mut out = vec![T::default(); n];
    for item in order.iter() {
        let at = &mut next[bucket(item)];
        out[*at] = *item;
        *at += 1;
    }
    for b in 0..(1 << bits) {
        let part = &mut out[starts[b]..starts[b + 1]];
        if part.len() > 1 {
            part.sort_unstable();
        }
    }
    *order = out;
}

/// One side's part of a reconciliation.
pub(crate) struct Reconciler {
    negentropy: Negentropy<'static, NegentropyStorageVector>,
    /// Our items, in the order they were offered.
    items: Vec<(ItemId, FeedOffer)>,
    /// The places in `items` of our distinct ids, sorted by id (the first place of an id
    /// offered twice).
    sorted: Vec<u32>,
    rounds: u32,
    /// Initiator: ids of ours the peer lacks.
    have: Vec<Id>,
    /// Initiator: ids of the peer's we lack.
    need: Vec<Id>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("items", &self.items.len())
            .field("rounds", &self.rounds)
            .finish_non_exhaustive()
    }
}

fn failed(err: negentropy::Error) -> MetaError {
    MetaError::Reconcile {
        reason: match err {
            negentropy::Error::ParseEndsPrematurely => "the message ends inside a range",
            negentropy::Error::InvalidProtocolVersion
            | negentropy::Error::UnsupportedProtocolVersion
            | negentropy::Error::ProtocolVersionNotFound => "unknown negentropy protocol version",
            negentropy::Error::UnexpectedMode(_) => "unknown range mode",
            negentropy::Error::IdTooBig | negentropy::Error::InvalidIdSize => "malformed bound",
            negentropy::Error::BadRange => "ranges out of order",
            _ => "negentropy refused the message",
        },
    }
}

impl Reconciler {
    /// A side holding `offers`, each with its item id.
    pub(crate) fn new(offers: Vec<(ItemId, FeedOffer)>) -> Result<Self, MetaError> {
        // Ordered with a bucket pass on the ids' first 8 bytes (the feed key's: they almost
        // always differ), see `sort_by_head`. The ids travel with their places, so the set is
        // then built from them in order, not by looking each up in `offers` (a cache miss per
        // item: it was half of building the set).
        let places = u32::try_from(offers.len()).map_err(|_| MetaError::TooManyFeeds {
            limit: u32::MAX as usize,
        })?;
        let mut order: Vec<(ItemId, u32)> = offers
            .iter()
            .zip(0..places)
            .map(|((id, _), place)| (*id, place))
            .collect();
        sort_by_head(&mut order, |item| id_head(&item.0));
        order.dedup_by(|later, first| later.0 == first.0);
        let mut storage = NegentropyStorageVector::with_capacity(order.len());
        for (id, _) in &order {
            storage
                .insert(0, Id::from_byte_array(*id))
                .map_err(failed)?;
        }
        let sorted: Vec<u32> = order.into_iter().map(|(_, place)| place).collect();
        storage.seal().map_err(failed)?;
        let negentropy = Negentropy::owned(storage, MAX_RECONCILE_BYTES as u64).map_err(failed)?;
        Ok(Self {
            negentropy,
            items: offers,
            sorted,
            rounds: 0,
            have: Vec::new(),
            need: Vec::new(),
        })
    }

    /// Initiator: the first message.
    pub(crate) fn initiate(&mut self) -> Result<Vec<u8>, MetaError> {
        self.rounds = 1;
        self.negentropy.initiate().map_err(failed)
    }

    /// Responder: the answer to one of the initiator's messages.
    pub(crate) fn answer(&mut self, query: &[u8]) -> Result<Vec<u8>, MetaError> {
        self.count_round()?;
        self.negentropy.reconcile(query).map_err(failed)
    }

    /// Initiator: takes the responder's answer; the next message, or `None` when the sets are
    /// reconciled.
    pub(crate) fn step(
        &mut self,
        answer: &[u8],
        max_need: usize,
    ) -> Result<Option<Vec<u8>>, MetaError> {
        self.count_round()?;
        let next = self
            .negentropy
            .reconcile_with_ids(answer, &mut self.have, &mut self.need)
            .map_err(failed)?;
        if self.need.len() > max_need {
            return Err(MetaError::TooManyFeeds { limit: max_need });
        }
        Ok(next)
    }

    fn count_round(&mut self) -> Result<(), MetaError> {
        self.rounds += 1;
        if self.rounds > MAX_RECONCILE_ROUNDS {
            return Err(MetaError::Reconcile {
                reason: "more rounds than any honest set needs",
            });
        }
        Ok(())
    }

    /// Initiator, once reconciled: our offers the peer lacks (in the order they were offered),
    /// their ids, and the peer's ids we lack.
    pub(crate) fn outcome(&mut self) -> (Vec<FeedOffer>, HashSet<ItemId>, Vec<ItemId>) {
        let have: HashSet<ItemId> = std::mem::take(&mut self.have)
            .into_iter()
            .map(|id| *id)
            .collect();
        let offers = self.in_offered_order(have.iter());
        let need = std::mem::take(&mut self.need)
            .into_iter()
            .map(|id| *id)
            .collect();
        (offers, have, need)
    }

    fn item(&self, id: &ItemId) -> Option<(usize, FeedOffer)> {
        let at = self
            .sorted
            .binary_search_by(|&place| self.items[place as usize].0.cmp(id))
            .ok()?;
        let place = self.sorted[at] as usize;
        Some((place, self.items[place].1))
    }

    /// Whether this id is one of our items.
    pub(crate) fn holds(&self, id: &ItemId) -> bool {
        self.item(id).is_some()
    }

    /// Our offers with these ids, in the order they were offered (the order the application
    /// listed its feeds in is the order they are scheduled in on the other side).
    pub(crate) fn in_offered_order<'i>(
        &self,
        ids: impl Iterator<Item = &'i ItemId>,
    ) -> Vec<FeedOffer> {
        let mut offers: Vec<(usize, FeedOffer)> = ids.filter_map(|id| self.item(id)).collect();
        offers.sort_by_key(|(place, _)| *place);
        offers.into_iter().map(|(_, offer)| offer).collect()
    }

    /// Every offer of ours whose id is not in `lacking`: the ones both sides hold the same.
    pub(crate) fn common(&self, lacking: &dyn Fn(&ItemId) -> bool) -> Vec<FeedOffer> {
        let mut places: Vec<u32> = self
            .sorted
            .iter()
            .copied()
            .filter(|&place| !lacking(&self.items[place as usize].0))
            .collect();
        places.sort_unstable();
        places
            .into_iter()
            .map(|place| self.items[place as usize].1)
            .collect()
    }
}
