//! The on-disk codec of hypercore 0.16's oplog: entry leaders, the compact-encoding reader,
//! headers and entries.

/// Size of one header slot.
pub(super) const SLOT_SIZE: u64 = 4096;
/// Where the entries start: after the two header slots.
pub(super) const ENTRIES_START: u64 = 2 * SLOT_SIZE;
pub(super) const LEADER_SIZE: usize = 8;
/// Entry flags: user data, tree nodes, tree upgrade, bitfield update.
pub(super) const USER_DATA: u8 = 1;
pub(super) const NODES: u8 = 2;
pub(super) const UPGRADE: u8 = 4;
pub(super) const BITFIELD: u8 = 8;

/// A validated leader: the length of what follows it and its partial and header bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Leader {
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
pub(super) fn leader(buffer: &[u8]) -> Leader {
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
pub(super) fn push_with_leader(out: &mut Vec<u8>, payload: &[u8], header_bit: bool) {
    let combined = ((payload.len() as u32) << 2) | u32::from(header_bit);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&combined.to_le_bytes());
    hasher.update(payload);
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(&combined.to_le_bytes());
    out.extend_from_slice(payload);
}

/// A compact-encoding reader over one entry or header.
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    pub(super) fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    /// A compact-encoding variable-length unsigned integer.
    pub(super) fn var(&mut self) -> Option<u64> {
        Some(match self.byte()? {
            0xfd => u64::from(u16::from_le_bytes(self.take(2)?.try_into().ok()?)),
            0xfe => u64::from(u32::from_le_bytes(self.take(4)?.try_into().ok()?)),
            0xff => u64::from_le_bytes(self.take(8)?.try_into().ok()?),
            small => u64::from(small),
        })
    }

    pub(super) fn buffer(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.var()?).ok()?;
        self.take(len)
    }

    /// Skips an array of length-prefixed strings.
    pub(super) fn skip_strings(&mut self) -> Option<()> {
        for _ in 0..self.var()? {
            self.buffer()?;
        }
        Some(())
    }
}

pub(super) fn push_var(out: &mut Vec<u8>, value: u64) {
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
pub(super) struct TreeState {
    pub(super) fork: u64,
    pub(super) length: u64,
    pub(super) signature: Vec<u8>,
}

impl TreeState {
    /// An upgrade that leaves the tree as it is (hypercore replays it as a no-op).
    pub(super) fn no_op_upgrade(&self, out: &mut Vec<u8>) {
        push_var(out, self.fork);
        push_var(out, self.length);
        push_var(out, self.length);
        push_var(out, self.signature.len() as u64);
        out.extend_from_slice(&self.signature);
    }
}

/// Decodes the tree of a stored header (hypercore 0.16's layout).
pub(super) fn header_tree(header: &[u8]) -> Option<TreeState> {
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
pub(super) fn header_facts(header: &[u8]) -> Option<HeaderFacts> {
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

/// The parts of one entry, as stored byte ranges.
#[derive(Debug, Default)]
pub(super) struct EntryParts<'a> {
    pub(super) user_data: Option<&'a [u8]>,
    pub(super) nodes: Option<&'a [u8]>,
    pub(super) upgrade: Option<(&'a [u8], TreeState)>,
    pub(super) bitfield: Option<&'a [u8]>,
}

/// Decodes an entry the way hypercore encodes it (flags, then each part its flag announces).
pub(super) fn entry_parts(entry: &[u8]) -> Option<EntryParts<'_>> {
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
