//! The repair planner: what a stored oplog holds, which of it hypercore would misread, and the
//! entries to show it instead.

use super::codec::*;

/// Runs `[start, end)` of set bits in a stored bitfield, below `limit`.
pub(super) fn bit_runs(bitfield: &[u8], limit: u64) -> Vec<(u64, u64)> {
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
pub(super) struct Scan<'a> {
    pub(super) torn_slots: Vec<u64>,
    pub(super) current: Option<usize>,
    pub(super) entries: Vec<&'a [u8]>,
    pub(super) entries_len: u64,
}

pub(super) fn scan(content: &[u8]) -> Scan<'_> {
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
pub(super) fn view_entries(
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

/// The signed length that entries logged *after a damaged one* record, when it is longer than
/// what the valid entries before the damage reach: acknowledged appends the guard has to cut
/// (their entry is unreadable), which hypercore would otherwise hide by reopening shorter.
///
/// A torn write of the last entry (a kill mid-append) leaves nothing valid after it: `None`,
/// as for an undamaged oplog. A damaged entry is skipped by the length its leader states; a
/// leader damaged so that its length is unknown ends the search.
pub(crate) fn length_lost_to_damage(content: &[u8]) -> Option<u64> {
    let scanned = scan(content);
    let current_bit = scanned.current? == 1;
    let kept = scanned
        .entries
        .iter()
        .filter_map(|entry| Some(entry_parts(entry)?.upgrade?.1.length))
        .max()
        .unwrap_or(0);
    let mut pos = usize::try_from(ENTRIES_START + scanned.entries_len).ok()?;
    let (mut damaged, mut lost) = (false, None::<u64>);
    while let Some(rest) = content.get(pos..).filter(|rest| rest.len() >= LEADER_SIZE) {
        let stated = (u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) >> 2) as usize;
        match leader(rest) {
            Leader::Valid {
                len, header_bit, ..
            } => {
                if damaged && header_bit == current_bit {
                    let entry = &rest[LEADER_SIZE..LEADER_SIZE + len];
                    if let Some((_, tree)) = entry_parts(entry).and_then(|parts| parts.upgrade) {
                        lost = Some(lost.unwrap_or(0).max(tree.length));
                    }
                }
                pos += LEADER_SIZE + len;
            }
            Leader::Damaged => {
                damaged = true;
                pos += LEADER_SIZE + stated;
            }
            Leader::Absent => break,
        }
    }
    lost.filter(|&length| length > kept)
}
