//! Tests of the oplog codec, planner and guards.

use super::codec::*;
use super::guard::*;
use super::plan::*;
use random_access_storage::RandomAccess;

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

        let (_, mut guard) = guard(Box::new(crate::MemoryStore::new()), Box::new(store.clone()))
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

#[test]
fn appends_logged_after_a_damaged_entry_are_told_apart_from_a_torn_last_write() {
    let h = with_leader(&header(2), false, false);
    let first = with_leader(&append_entry(3), false, false);
    let mut damaged = with_leader(&append_entry(4), false, false);
    damaged[12] ^= 0x20; // inside the payload: the leader's length still holds
    let after = with_leader(&append_entry(5), false, false);
    // A damaged entry followed by a valid one of the same header: length 5 was signed and is lost.
    let bytes = oplog(&h, None, &[first.clone(), damaged.clone(), after]);
    assert_eq!(length_lost_to_damage(&bytes), Some(5));
    // The same damage as the last entry looks like a write torn by a kill: nothing is claimed.
    let torn = oplog(&h, None, &[first.clone(), damaged]);
    assert_eq!(length_lost_to_damage(&torn), None);
    // An undamaged oplog loses nothing.
    assert_eq!(length_lost_to_damage(&oplog(&h, None, &[first])), None);
}
