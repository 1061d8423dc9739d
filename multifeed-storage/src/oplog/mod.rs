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

mod codec;
mod guard;
mod plan;
#[cfg(test)]
mod tests;

pub(crate) use codec::HeaderFacts;
pub(crate) use guard::guard;
pub use plan::oplog_tree_nodes;
pub(crate) use plan::{length_lost_to_damage, oplog_header_facts};
