//! Guards around each feed's `oplog` and `bitfield` stores that make hypercore 0.16 reopen feeds
//! correctly, after a clean close or a kill at any point.
//!
//! # The hypercore 0.16 defects they work around
//!
//! Hypercore's oplog holds two header slots (bytes `0..4096` and `4096..8192`) and then a log of
//! entries, each an 8-byte leader (CRC-32, 30-bit length, partial and header bits) and the entry.
//! An append or a verified proof writes an entry at `8192 + entries_byte_length`; every few of
//! them hypercore writes the bitfield, the tree and a new header covering everything, then
//! truncates the oplog to 8192. At open it replays the entries left after the header. In 0.16:
//!
//! 1. After a replay it sets `entries_byte_length` to 0, so the next entry overwrites the first
//!    pending one. A kill before the next header loses that entry's tree nodes: the feed no longer
//!    loads ("Could not load node"), or returns another entry's bytes.
//! 2. It does not check an entry's header bit, so entries left by a kill between a header write
//!    and the truncation that follows are replayed as a truncation to an older length.
//! 3. Its entry decoder reads the tree upgrade and the bitfield update only when the entry has
//!    tree nodes, and then always: any entry but an append's (nodes, upgrade and bitfield
//!    together), such as a replicated block, decodes as garbage. A replica then fails to open
//!    and is downloaded again, or opens with a wrong length and later panics.
//! 4. Its bitfield reader places page `k` at byte `1024 k` instead of `4096 k`: a feed with more
//!    than 32,768 entries panics at open, and one with more than 8,192 gains phantom bits.
//!
//! # What the guards do
//!
//! At open the oplog guard reads the oplog and the bitfield, and shows hypercore an oplog it reads
//! correctly, with the same meaning as the stored one:
//! * the valid entries written after the current header (torn bytes, trailing partial entries and
//!   entries of an older header are cut from the file), each re-encoded with nodes, upgrade and
//!   bitfield update all present: a missing upgrade is the tree as it stands at that entry (a
//!   no-op), a missing bitfield update is an empty one;
//! * before them, one entry per run of set bits in the stored bitfield (up to the header's
//!   length), while the bitfield guard shows hypercore an empty bitfield file. Hypercore rebuilds
//!   its bitfield from those runs and writes the pages back in their correct place.
//!
//! From the first write into the entry area on, entry offsets are shifted past the stored
//! entries, so new entries follow them instead of overwriting them (a replay after any kill sees
//! them all, in order). Hypercore's next flush writes a header covering everything and truncates
//! the entry area; the shift ends there. If the header cannot be decoded the files are shown as
//! stored, and hypercore reports what it finds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use random_access_storage::{RandomAccess, RandomAccessError};

use crate::factory::BoxedStore;

/// Size of one header slot.
const SLOT_SIZE: u64 = 4096;
/// Where the entries start: after the two header slots.
const ENTRIES_START: u64 = 2 * SLOT_SIZE;
const LEADER_SIZE: usize = 8;
/// Entry flags: user data, tree nodes, tree upgrade, bitfield update.
const USER_DATA: u8 = 1;
const NODES: u8 = 2;
const UPGRADE: u8 = 4;
const BITFIELD: u8 = 8;

/// A validated leader: the length of what follows it and its partial and header bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leader {
    /// No entry or header here (too short, or a zero or overlong length).
    Absent,
    /// A length that fits but a checksum that does not match: a torn or damaged write.
    Damaged,
    /// A valid entry of `len` bytes after the leader.
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

/// Appends `payload` with its leader (not partial) to `out`.
fn push_with_leader(out: &mut Vec<u8>, payload: &[u8], header_bit: bool) {
    let combined = ((payload.len() as u32) << 2) | u32::from(header_bit);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&combined.to_le_bytes());
    hasher.update(payload);
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(&combined.to_le_bytes());
    out.extend_from_slice(payload);
}

/// A compact-encoding reader over one entry or header.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    /// A compact-encoding variable-length unsigned integer.
    fn var(&mut self) -> Option<u64> {
        Some(match self.byte()? {
            0xfd => u64::from(u16::from_le_bytes(self.take(2)?.try_into().ok()?)),
            0xfe => u64::from(u32::from_le_bytes(self.take(4)?.try_into().ok()?)),
            0xff => u64::from_le_bytes(self.take(8)?.try_into().ok()?),
            small => u64::from(small),
        })
    }

    fn buffer(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.var()?).ok()?;
        self.take(len)
    }

    /// Skips an array of length-prefixed strings.
    fn skip_strings(&mut self) -> Option<()> {
        for _ in 0..self.var()? {
            self.buffer()?;
        }
        Some(())
    }
}

fn push_var(out: &mut Vec<u8>, value: u64) {
    if value < 0xfd {
        out.push(value as u8);
    } else if value <= 0xffff {
        out.push(0xfd);
        out.extend_from_slice(&(value as u16).to_le_bytes());
    } else if value <= 0xffff_ffff {
        out.push(0xfe);
        out.extend_from_slice(&(value as u32).to_le_bytes());
    } else {
        out.push(0xff);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// The signed tree as a header or an upgrade leaves it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TreeState {
    fork: u64,
    length: u64,
    signature: Vec<u8>,
}

impl TreeState {
    /// An upgrade that leaves the tree as it is (hypercore replays it as a no-op).
    fn no_op_upgrade(&self, out: &mut Vec<u8>) {
        push_var(out, self.fork);
        push_var(out, self.length);
        push_var(out, self.length);
        push_var(out, self.signature.len() as u64);
        out.extend_from_slice(&self.signature);
    }
}

/// Decodes the tree of a stored header (hypercore 0.16's layout).
fn header_tree(header: &[u8]) -> Option<TreeState> {
    let mut r = Reader::new(header);
    r.take(2)?; // version, flags
    r.take(32)?; // key
    r.take(3 + 1 + 32 + 32)?; // manifest: version, hash, type, one ed25519 signer
    let public = r.buffer()?;
    if public.len() != 32 {
        return None;
    }
    r.buffer()?; // secret key, or nothing
    r.skip_strings()?; // user data
    let fork = r.var()?;
    let length = r.var()?;
    r.buffer()?; // root hash
    let signature = r.buffer()?.to_vec();
    Some(TreeState {
        fork,
        length,
        signature,
    })
}

/// What a stored oplog header says about its feed: its key pair and its signed length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderFacts {
    pub(crate) public: [u8; 32],
    /// The ed25519 secret key (the first half of the 64 bytes hypercore stores), if any.
    pub(crate) secret: Option<[u8; 32]>,
    pub(crate) length: u64,
}

/// Decodes one header (hypercore 0.16's layout) into its facts.
fn header_facts(header: &[u8]) -> Option<HeaderFacts> {
    let mut r = Reader::new(header);
    r.take(2)?; // version, flags
    r.take(32)?; // key
    r.take(3 + 1 + 32 + 32)?; // manifest: version, hash, type, one ed25519 signer
    let public: [u8; 32] = r.buffer()?.try_into().ok()?;
    let secret = match r.buffer()? {
        [] | [0] => None,
        full if full.len() == 64 => Some(full[..32].try_into().ok()?),
        _ => return None,
    };
    let tree = header_tree(header)?;
    Some(HeaderFacts {
        public,
        secret,
        length: tree.length,
    })
}

/// The facts of the header hypercore would open from, else of the other slot, if either is
/// intact: a feed's key pair survives damage to the rest of its files, and to one slot. The
/// length counts the upgrades of the entries logged after the current header too (the last
/// appends before hypercore next writes a header).
pub(crate) fn oplog_header_facts(content: &[u8]) -> Option<HeaderFacts> {
    let scanned = scan(content);
    let current = scanned.current.unwrap_or(0);
    let mut facts = [current, 1 - current].into_iter().find_map(|slot| {
        let start = slot * SLOT_SIZE as usize;
        let bytes = content.get(start..(start + SLOT_SIZE as usize).min(content.len()))?;
        match leader(bytes) {
            Leader::Valid { len, .. } => header_facts(&bytes[LEADER_SIZE..LEADER_SIZE + len]),
            _ => None,
        }
    })?;
    let logged = scanned
        .entries
        .iter()
        .filter_map(|entry| Some(entry_parts(entry)?.upgrade?.1.length))
        .max();
    facts.length = facts.length.max(logged.unwrap_or(0));
    Some(facts)
}

/// The parts of one entry, as stored byte ranges.
#[derive(Debug, Default)]
struct EntryParts<'a> {
    user_data: Option<&'a [u8]>,
    nodes: Option<&'a [u8]>,
    upgrade: Option<(&'a [u8], TreeState)>,
    bitfield: Option<&'a [u8]>,
}

/// Decodes an entry the way hypercore encodes it (flags, then each part its flag announces).
fn entry_parts(entry: &[u8]) -> Option<EntryParts<'_>> {
    let mut r = Reader::new(entry);
    let flags = r.byte()?;
    if flags & !(USER_DATA | NODES | UPGRADE | BITFIELD) != 0 {
        return None;
    }
    let mut parts = EntryParts::default();
    if flags & USER_DATA != 0 {
        let start = r.pos;
        r.skip_strings()?;
        parts.user_data = Some(&entry[start..r.pos]);
    }
    if flags & NODES != 0 {
        let start = r.pos;
        for _ in 0..r.var()? {
            r.var()?; // index
            r.var()?; // length
            r.take(32)?; // hash
        }
        parts.nodes = Some(&entry[start..r.pos]);
    }
    if flags & UPGRADE != 0 {
        let start = r.pos;
        let fork = r.var()?;
        r.var()?; // ancestors
        let length = r.var()?;
        let signature = r.buffer()?.to_vec();
        let state = TreeState {
            fork,
            length,
            signature,
        };
        parts.upgrade = Some((&entry[start..r.pos], state));
    }
    if flags & BITFIELD != 0 {
        let start = r.pos;
        r.byte()?;
        r.var()?;
        r.var()?;
        parts.bitfield = Some(&entry[start..r.pos]);
    }
    (r.pos == entry.len()).then_some(parts)
}

/// Runs `[start, end)` of set bits in a stored bitfield, below `limit`.
fn bit_runs(bitfield: &[u8], limit: u64) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut open: Option<u64> = None;
    let bits = (bitfield.len() as u64 * 8).min(limit);
    let mut index = 0u64;
    while index < bits {
        let byte = bitfield[(index / 8) as usize];
        // Whole bytes of zeros or ones at a time.
        if index.is_multiple_of(8) && index + 8 <= bits && (byte == 0 || byte == 0xff) {
            match (byte, open) {
                (0, Some(start)) => {
                    runs.push((start, index));
                    open = None;
                }
                (0xff, None) => open = Some(index),
                _ => {}
            }
            index += 8;
            continue;
        }
        let set = byte & (1 << (index % 8)) != 0;
        match (set, open) {
            (false, Some(start)) => {
                runs.push((start, index));
                open = None;
            }
            (true, None) => open = Some(index),
            _ => {}
        }
        index += 1;
    }
    if let Some(start) = open {
        runs.push((start, bits));
    }
    runs
}

/// What the scan of a stored oplog decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OplogPlan {
    /// Header slots (0 or 1) to blank because they are torn while the other one is intact.
    pub(crate) torn_slots: Vec<u64>,
    /// Byte length of the stored entries that stay (valid, of the current header, complete).
    pub(crate) entries_len: u64,
    /// Whether the stored length exceeds what stays, so the file must be cut.
    pub(crate) cut: bool,
    /// The entries to show hypercore instead of the stored ones, when it could be built; the
    /// bitfield is then shown empty, its runs being part of these entries.
    pub(crate) view: Option<Vec<u8>>,
}

/// The stored oplog as hypercore will open it: torn header slots, the slot it opens from, and
/// the valid, complete entries of that header (with their stored byte length).
struct Scan<'a> {
    torn_slots: Vec<u64>,
    current: Option<usize>,
    entries: Vec<&'a [u8]>,
    entries_len: u64,
}

fn scan(content: &[u8]) -> Scan<'_> {
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
    // The slot hypercore opens from, and the bit it writes on the entries after it: header
    // writes alternate between the slots, and entries after a header in the second slot carry 1,
    // after one in the first slot 0. Hypercore opens from the first slot when both header bits
    // are equal, from the second when they differ, and from the only valid one otherwise.
    let current = match (bit(&slots[0]), bit(&slots[1])) {
        (Some(first), Some(second)) => usize::from(first != second),
        (Some(_), None) => 0,
        (None, Some(_)) => 1,
        // Nothing to open from: leave the file as it is for hypercore to report.
        (None, None) => {
            return Scan {
                torn_slots,
                current: None,
                entries: Vec::new(),
                entries_len: 0,
            }
        }
    };
    let current_bit = current == 1;

    // The valid, complete entries of the current header.
    let mut entries: Vec<&[u8]> = Vec::new();
    let mut entries_len = 0u64;
    let mut complete = (0usize, 0u64);
    if let Some(mut rest) = content.get(ENTRIES_START as usize..) {
        while let Leader::Valid {
            len,
            partial,
            header_bit,
        } = leader(rest)
        {
            if header_bit != current_bit {
                break;
            }
            entries.push(&rest[LEADER_SIZE..LEADER_SIZE + len]);
            entries_len += (LEADER_SIZE + len) as u64;
            if !partial {
                complete = (entries.len(), entries_len);
            }
            rest = &rest[LEADER_SIZE + len..];
        }
    }
    entries.truncate(complete.0);
    Scan {
        torn_slots,
        current: Some(current),
        entries,
        entries_len: complete.1,
    }
}

/// Plans the repair and the view of a stored oplog, given the stored bitfield.
pub(crate) fn plan(content: &[u8], bitfield: &[u8]) -> OplogPlan {
    let Scan {
        torn_slots,
        current,
        entries,
        entries_len,
    } = scan(content);
    let Some(current) = current else {
        return OplogPlan {
            torn_slots,
            entries_len: 0,
            cut: false,
            view: None,
        };
    };
    let current_bit = current == 1;
    let stored = content.len() as u64;
    let cut = stored > ENTRIES_START + entries_len && stored > ENTRIES_START;

    let start = current as u64 * SLOT_SIZE;
    let view = content
        .get(start as usize..)
        .and_then(|slot| match leader(slot) {
            Leader::Valid { len, .. } => header_tree(&slot[LEADER_SIZE..LEADER_SIZE + len]),
            _ => None,
        })
        .map(|tree| view_entries(tree, &entries, bitfield, current_bit));
    OplogPlan {
        torn_slots,
        entries_len,
        cut,
        view,
    }
}

/// The tree nodes the stored oplog records (flat index, length, hash): hypercore keeps the
/// nodes of its latest writes there until it next writes its tree file.
pub fn oplog_tree_nodes(content: &[u8]) -> Vec<(u64, u64, [u8; 32])> {
    let mut out = Vec::new();
    for entry in scan(content).entries {
        let Some(nodes) = entry_parts(entry).and_then(|parts| parts.nodes) else {
            continue;
        };
        let mut r = Reader::new(nodes);
        let Some(count) = r.var() else {
            continue;
        };
        for _ in 0..count {
            let (Some(index), Some(length), Some(hash)) = (r.var(), r.var(), r.take(32)) else {
                break;
            };
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(hash);
            out.push((index, length, bytes));
        }
    }
    out
}

/// The entries shown to hypercore: the bitfield's runs, then every stored entry re-encoded with
/// all its parts (see the module docs).
fn view_entries(
    mut tree: TreeState,
    entries: &[&[u8]],
    bitfield: &[u8],
    header_bit: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut payload = Vec::new();
    if !tree.signature.is_empty() {
        for (start, end) in bit_runs(bitfield, tree.length) {
            payload.clear();
            payload.push(NODES | UPGRADE | BITFIELD);
            push_var(&mut payload, 0);
            tree.no_op_upgrade(&mut payload);
            payload.push(0);
            push_var(&mut payload, start);
            push_var(&mut payload, end - start);
            push_with_leader(&mut out, &payload, header_bit);
        }
    }
    for entry in entries {
        let Some(parts) = entry_parts(entry) else {
            // Not an entry hypercore 0.16 writes: keep what comes before it.
            break;
        };
        if let Some((_, state)) = &parts.upgrade {
            tree = state.clone();
        } else if tree.signature.is_empty() {
            // No signed tree to stand for the missing upgrade: stop here, as if the process
            // had died before this entry.
            break;
        }
        payload.clear();
        let user = if parts.user_data.is_some() {
            USER_DATA
        } else {
            0
        };
        payload.push(user | NODES | UPGRADE | BITFIELD);
        if let Some(user_data) = parts.user_data {
            payload.extend_from_slice(user_data);
        }
        match parts.nodes {
            Some(nodes) => payload.extend_from_slice(nodes),
            None => push_var(&mut payload, 0),
        }
        match &parts.upgrade {
            Some((raw, _)) => payload.extend_from_slice(raw),
            None => tree.no_op_upgrade(&mut payload),
        }
        match parts.bitfield {
            Some(raw) => payload.extend_from_slice(raw),
            None => payload.extend_from_slice(&[0, 0, 0]),
        }
        push_with_leader(&mut out, &payload, header_bit);
    }
    out
}

/// Guards a feed's `bitfield` and `oplog` stores; see the module docs.
pub(crate) async fn guard(
    bitfield: BoxedStore,
    mut oplog: BoxedStore,
) -> Result<(BitfieldGuard, OplogGuard), RandomAccessError> {
    let len = oplog.len().await?;
    if len == 0 {
        let bitfield = BitfieldGuard {
            inner: bitfield,
            hidden: Arc::new(AtomicBool::new(false)),
        };
        return Ok((bitfield, OplogGuard::plain(oplog)));
    }
    let content = oplog.read(0, len).await?;
    let mut bitfield = bitfield;
    let bitfield_len = bitfield.len().await?;
    let bits = if bitfield_len == 0 {
        Vec::new()
    } else {
        bitfield.read(0, bitfield_len).await?
    };
    let found = plan(&content, &bits);
    for slot in &found.torn_slots {
        oplog.write(slot * SLOT_SIZE, &[0u8; LEADER_SIZE]).await?;
    }
    if found.cut {
        oplog.truncate(ENTRIES_START + found.entries_len).await?;
    }
    let hidden = Arc::new(AtomicBool::new(found.view.is_some()));
    let bitfield = BitfieldGuard {
        inner: bitfield,
        hidden: hidden.clone(),
    };
    let oplog = OplogGuard {
        inner: oplog,
        pending: found.entries_len,
        view: found.view,
        shifted: false,
    };
    Ok((bitfield, oplog))
}

/// The bitfield store of one feed: shown empty to hypercore's open when the oplog guard carries
/// its bits in entries, stored bytes otherwise and after the first write.
#[derive(Debug)]
pub(crate) struct BitfieldGuard {
    inner: BoxedStore,
    hidden: Arc<AtomicBool>,
}

impl BitfieldGuard {
    fn hidden(&self) -> bool {
        self.hidden.load(Ordering::Relaxed)
    }

    fn reveal(&self) {
        self.hidden.store(false, Ordering::Relaxed);
    }
}

#[async_trait]
impl RandomAccess for BitfieldGuard {
    async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RandomAccessError> {
        self.reveal();
        self.inner.write(offset, data).await
    }

    async fn read(&mut self, offset: u64, length: u64) -> Result<Vec<u8>, RandomAccessError> {
        if self.hidden() {
            return if offset == 0 && length == 0 {
                Ok(Vec::new())
            } else {
                Err(RandomAccessError::OutOfBounds {
                    offset,
                    end: offset.checked_add(length),
                    length: 0,
                })
            };
        }
        self.inner.read(offset, length).await
    }

    async fn del(&mut self, offset: u64, length: u64) -> Result<(), RandomAccessError> {
        self.reveal();
        self.inner.del(offset, length).await
    }

    async fn truncate(&mut self, length: u64) -> Result<(), RandomAccessError> {
        self.reveal();
        self.inner.truncate(length).await
    }

    async fn len(&mut self) -> Result<u64, RandomAccessError> {
        if self.hidden() {
            return Ok(0);
        }
        self.inner.len().await
    }

    async fn is_empty(&mut self) -> Result<bool, RandomAccessError> {
        Ok(self.len().await? == 0)
    }

    async fn sync_all(&mut self) -> Result<(), RandomAccessError> {
        self.inner.sync_all().await
    }
}

/// The oplog store of one feed, guarded as described in the module docs.
#[derive(Debug)]
pub(crate) struct OplogGuard {
    inner: BoxedStore,
    /// Length of the stored entries that were pending when the feed was opened.
    pending: u64,
    /// The entries shown to hypercore's open instead of the stored ones.
    view: Option<Vec<u8>>,
    /// Whether entry-area offsets are shifted past the pending entries (after the first write).
    shifted: bool,
}

impl OplogGuard {
    fn plain(inner: BoxedStore) -> Self {
        Self {
            inner,
            pending: 0,
            view: None,
            shifted: false,
        }
    }

    /// Physical offset of a logical entry-area offset.
    fn map(&self, offset: u64) -> u64 {
        if offset >= ENTRIES_START && self.shifted {
            offset + self.pending
        } else {
            offset
        }
    }

    /// The first write into the entry area ends the view and starts the shift.
    fn enter_entries(&mut self) {
        self.view = None;
        if self.pending > 0 {
            self.shifted = true;
        }
    }
}

#[async_trait]
impl RandomAccess for OplogGuard {
    async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RandomAccessError> {
        let end = offset.saturating_add(data.len() as u64);
        if end > ENTRIES_START {
            self.enter_entries();
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
        if let Some(view) = &self.view {
            if end > ENTRIES_START {
                let view_end = ENTRIES_START + view.len() as u64;
                if end > view_end {
                    return Err(RandomAccessError::OutOfBounds {
                        offset,
                        end: Some(end),
                        length: view_end,
                    });
                }
                let mut out = if offset < ENTRIES_START {
                    self.inner.read(offset, ENTRIES_START - offset).await?
                } else {
                    Vec::new()
                };
                let from = (offset.max(ENTRIES_START) - ENTRIES_START) as usize;
                out.extend_from_slice(&view[from..(end - ENTRIES_START) as usize]);
                return Ok(out);
            }
            return self.inner.read(offset, length).await;
        }
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
        if end > ENTRIES_START {
            self.enter_entries();
        }
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
            self.view = None;
            return self.inner.truncate(length).await;
        }
        self.enter_entries();
        let at = self.map(length);
        self.inner.truncate(at).await
    }

    async fn len(&mut self) -> Result<u64, RandomAccessError> {
        if let Some(view) = &self.view {
            let stored = self.inner.len().await?;
            return Ok(if stored >= ENTRIES_START {
                ENTRIES_START + view.len() as u64
            } else {
                stored
            });
        }
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

    fn with_leader(payload: &[u8], partial: bool, header_bit: bool) -> Vec<u8> {
        let combined =
            ((payload.len() as u32) << 2) | if partial { 2 } else { 0 } | u32::from(header_bit);
        let mut hashed = combined.to_le_bytes().to_vec();
        hashed.extend_from_slice(payload);
        let mut out = crc32fast::hash(&hashed).to_le_bytes().to_vec();
        out.extend_from_slice(&hashed);
        out
    }

    /// A header as hypercore 0.16 encodes it, with a tree of `length` entries.
    fn header(length: u64) -> Vec<u8> {
        let mut h = vec![1, 6];
        h.extend_from_slice(&[7; 32]); // key
        h.extend_from_slice(&[0, 0, 1, 0]); // manifest version, hash, type, signer type
        h.extend_from_slice(&[1; 64]); // signer namespace and public key
        push_var(&mut h, 32);
        h.extend_from_slice(&[7; 32]);
        push_var(&mut h, 0); // no secret key
        push_var(&mut h, 0); // no user data
        push_var(&mut h, 3); // fork
        push_var(&mut h, length);
        push_var(&mut h, 32);
        h.extend_from_slice(&[9; 32]); // root hash
        push_var(&mut h, 64);
        h.extend_from_slice(&[5; 64]); // signature
        push_var(&mut h, 0); // reorg hints
        push_var(&mut h, length); // contiguous length
        h
    }

    /// An oplog with `first` in slot 0, `second` (if any) in slot 1, then `entries`.
    fn oplog(first: &[u8], second: Option<&[u8]>, entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![0u8; ENTRIES_START as usize];
        out[..first.len()].copy_from_slice(first);
        if let Some(second) = second {
            out[SLOT_SIZE as usize..SLOT_SIZE as usize + second.len()].copy_from_slice(second);
        }
        for e in entries {
            out.extend_from_slice(e);
        }
        out
    }

    /// An append's entry: one node, an upgrade to `length`, a bitfield update.
    fn append_entry(length: u64) -> Vec<u8> {
        let mut e = vec![NODES | UPGRADE | BITFIELD];
        push_var(&mut e, 1);
        push_var(&mut e, 2 * (length - 1));
        push_var(&mut e, 10);
        e.extend_from_slice(&[4; 32]);
        push_var(&mut e, 3);
        push_var(&mut e, length - 1);
        push_var(&mut e, length);
        push_var(&mut e, 64);
        e.extend_from_slice(&[6; 64]);
        e.extend_from_slice(&[0]);
        push_var(&mut e, length - 1);
        push_var(&mut e, 1);
        e
    }

    /// A replicated block's entry: one node and a bitfield update, no upgrade.
    fn block_entry(index: u64) -> Vec<u8> {
        let mut e = vec![NODES | BITFIELD];
        push_var(&mut e, 1);
        push_var(&mut e, 2 * index);
        push_var(&mut e, 10);
        e.extend_from_slice(&[4; 32]);
        e.extend_from_slice(&[0]);
        push_var(&mut e, index);
        push_var(&mut e, 1);
        e
    }

    /// The entries of a view, decoded.
    fn view_parts(view: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut rest = view;
        while let Leader::Valid { len, .. } = leader(rest) {
            out.push(rest[LEADER_SIZE..LEADER_SIZE + len].to_vec());
            rest = &rest[LEADER_SIZE + len..];
        }
        assert!(rest.is_empty(), "the view is made of valid entries only");
        out
    }

    #[test]
    fn varints_round_trip() {
        for value in [
            0,
            1,
            0xfc,
            0xfd,
            0xffff,
            0x1_0000,
            0xffff_ffff,
            1 << 40,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            push_var(&mut out, value);
            let mut r = Reader::new(&out);
            assert_eq!(r.var(), Some(value));
            assert_eq!(r.pos, out.len());
        }
    }

    #[test]
    fn header_tree_is_decoded() {
        let tree = header_tree(&header(42)).expect("decodes");
        assert_eq!((tree.fork, tree.length), (3, 42));
        assert_eq!(tree.signature, vec![5; 64]);
        assert_eq!(
            header_tree(&header(42)[..100]),
            None,
            "a cut header is refused"
        );
    }

    #[test]
    fn bit_runs_find_every_run_below_the_limit() {
        let mut bits = vec![0u8; 4096 * 2];
        let mut set = |i: usize| bits[i / 8] |= 1 << (i % 8);
        for i in (0..20)
            .chain(30..31)
            .chain(32_760..32_800)
            .chain(40_000..40_008)
        {
            set(i);
        }
        assert_eq!(
            bit_runs(&bits, u64::MAX),
            vec![(0, 20), (30, 31), (32_760, 32_800), (40_000, 40_008)]
        );
        assert_eq!(
            bit_runs(&bits, 32_770),
            vec![(0, 20), (30, 31), (32_760, 32_770)]
        );
        assert_eq!(bit_runs(&[0xff; 4], 32), vec![(0, 32)]);
        assert_eq!(bit_runs(&[], 10), vec![]);
    }

    #[test]
    fn plan_keeps_valid_entries_and_cuts_torn_bytes() {
        let h = with_leader(&header(2), false, false);
        let entries = vec![
            with_leader(&append_entry(3), false, false),
            with_leader(&append_entry(4), false, false),
        ];
        let mut bytes = oplog(&h, None, &entries);
        let valid = (entries[0].len() + entries[1].len()) as u64;
        let found = plan(&bytes, &[]);
        assert_eq!((found.entries_len, found.cut), (valid, false));
        // Appends' entries are shown as stored.
        let shown = view_parts(found.view.as_deref().expect("a view"));
        assert_eq!(shown, vec![append_entry(3), append_entry(4)]);

        // A torn third entry: its checksum fails, and hypercore would refuse the whole oplog.
        let mut torn = with_leader(&append_entry(5), false, false);
        torn[10] ^= 0xff;
        bytes.extend_from_slice(&torn);
        let found = plan(&bytes, &[]);
        assert_eq!((found.entries_len, found.cut), (valid, true));
    }

    #[test]
    fn plan_drops_trailing_partial_entries() {
        let h = with_leader(&header(2), false, false);
        let entries = vec![
            with_leader(&append_entry(3), false, false),
            with_leader(&append_entry(4), true, false),
        ];
        let found = plan(&oplog(&h, None, &entries), &[]);
        assert_eq!(found.entries_len, entries[0].len() as u64);
        assert!(found.cut);
    }

    #[test]
    fn plan_blanks_a_torn_slot_only_when_the_other_is_intact() {
        let h = with_leader(&header(2), false, false);
        let mut newer = with_leader(&header(3), false, true);
        newer[5] ^= 1;
        let mut bytes = oplog(&h, Some(&newer), &[]);
        assert_eq!(plan(&bytes, &[]).torn_slots, vec![1]);
        // Both damaged: nothing to open from, so nothing is touched.
        bytes[5] ^= 1;
        let found = plan(&bytes, &[]);
        assert_eq!(found.torn_slots, Vec::<u64>::new());
        assert_eq!(found.view, None);
    }

    #[test]
    fn plan_cuts_entries_written_before_the_current_header() {
        // Headers in both slots with different bits: hypercore opens from the second slot and
        // writes bit 1 on the entries after it. Entries with bit 0 came before that header.
        let older = with_leader(&header(2), false, false);
        let newer = with_leader(&header(3), false, true);
        let stale = with_leader(&append_entry(3), false, false);
        let bytes = oplog(&older, Some(&newer), std::slice::from_ref(&stale));
        let found = plan(&bytes, &[]);
        assert_eq!((found.entries_len, found.cut), (0, true));
        assert_eq!(found.view, Some(Vec::new()));

        let fresh = with_leader(&append_entry(4), false, true);
        let found = plan(&oplog(&older, Some(&newer), &[fresh.clone(), stale]), &[]);
        assert_eq!((found.entries_len, found.cut), (fresh.len() as u64, true));
    }

    #[test]
    fn the_view_completes_replicated_entries_and_carries_the_bitfield() {
        let h = with_leader(&header(40), false, false);
        let entries = vec![
            with_leader(&block_entry(7), false, false),
            with_leader(&append_entry(41), false, false),
            with_leader(&block_entry(8), false, false),
        ];
        let mut bits = vec![0u8; 8];
        bits[0] = 0b0000_0111; // blocks 0, 1, 2
        bits[6] = 0xff; // blocks 48..56: beyond the header's length, left to the entries
        let found = plan(&oplog(&h, None, &entries), &bits);
        let shown = view_parts(found.view.as_deref().expect("a view"));
        assert_eq!(shown.len(), 4, "one run, then the three entries");
        for entry in &shown {
            let parts = entry_parts(entry).expect("a view entry decodes");
            assert_eq!(entry[0], NODES | UPGRADE | BITFIELD, "every part present");
            assert!(parts.nodes.is_some() && parts.bitfield.is_some());
        }
        // The run: no nodes, the header's tree, bits 0..3.
        let run = entry_parts(&shown[0]).expect("run");
        assert_eq!(run.nodes, Some(&[0u8][..]));
        assert_eq!(run.upgrade.as_ref().map(|(_, t)| t.length), Some(40));
        assert_eq!(run.bitfield, Some(&[0u8, 0, 3][..]));
        // A block before any upgrade stands on the header's tree, one after it on the upgrade's.
        let first = entry_parts(&shown[1]).expect("block");
        assert_eq!(first.upgrade.as_ref().map(|(_, t)| t.length), Some(40));
        assert_eq!(shown[2], append_entry(41));
        let last = entry_parts(&shown[3]).expect("block");
        let (_, tree) = last.upgrade.expect("an upgrade");
        assert_eq!((tree.length, tree.signature), (41, vec![6; 64]));
    }

    #[test]
    fn writes_after_reopen_append_after_pending_entries() {
        async_std::task::block_on(async {
            let store = crate::MemoryStore::new();
            let h = with_leader(&header(2), false, false);
            let pending = vec![
                with_leader(&append_entry(3), false, false),
                with_leader(&append_entry(4), false, false),
            ];
            let bytes = oplog(&h, None, &pending);
            store.replace(bytes.clone());

            let (_, mut guard) =
                guard(Box::new(crate::MemoryStore::new()), Box::new(store.clone()))
                    .await
                    .expect("guard");
            // Hypercore reads everything at open, then writes its next entry at the entry start.
            let len = guard.len().await.unwrap();
            assert_eq!(guard.read(0, len).await.unwrap(), bytes);
            let next = with_leader(&append_entry(5), false, false);
            guard.write(ENTRIES_START, &next).await.unwrap();

            let mut expected = bytes.clone();
            expected.extend_from_slice(&next);
            assert_eq!(
                store.snapshot(),
                expected,
                "pending entries kept, new one after"
            );
            assert_eq!(
                guard.len().await.unwrap(),
                ENTRIES_START + next.len() as u64
            );

            // The header flush truncates to the entry start: the shift ends.
            guard.write(SLOT_SIZE, &h).await.unwrap();
            guard.truncate(ENTRIES_START).await.unwrap();
            assert_eq!(store.snapshot().len() as u64, ENTRIES_START);
            guard.write(ENTRIES_START, &next).await.unwrap();
            assert_eq!(store.snapshot().len(), ENTRIES_START as usize + next.len());
        });
    }
}
