//! Checks every plaintext frame before `hypercore-protocol` decodes it.
//!
//! `hypercore-protocol` 0.7.2 trusts the peer with two numbers: a channel id in an Open resizes
//! its channel table to `id + 1` (`u64::MAX` panics, 2^40 aborts the process), and the count of
//! every vector (tree nodes, bitfield words) goes to `Vec::with_capacity` before a single element
//! is read (2^62 panics, 2^40 aborts). This module walks a frame exactly as the protocol will
//! decode it, field by field, and refuses it with a [`PeerViolation`] when a count claims more
//! elements than the bytes left can hold, when a channel id jumps past what the peer could have
//! allocated, or when the peer keeps more channels open than [`FrameLimits::max_channels`].
//! Nothing here allocates by a number the peer chose.
//!
//! The same walk weighs frames (see [`weight_of_message`]) so the driver and the transport agree
//! on how many bytes wait in the protocol's unbounded write queue.

use std::collections::HashSet;

use hypercore_protocol::Message;

use crate::error::PeerViolation;

/// Smallest encoding of a tree node: index (1 byte), length (1 byte), 32-byte hash.
const MIN_NODE_BYTES: usize = 34;
/// How far past the most channels it ever had open at once a peer's new channel id may be.
/// Both protomux (JS) and `hypercore-protocol` hand out the lowest free id, so an honest peer's
/// ids never pass that mark.
pub(crate) const CHANNEL_ID_SLACK: u64 = 256;
/// The longest protocol name an Open may carry.
const MAX_PROTOCOL_NAME: usize = 256;
/// Bytes a message is weighed at on top of its payload.
const MESSAGE_OVERHEAD: u64 = 64;

/// What a peer may ask of the protocol's channel table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameLimits {
    /// Channels the peer may hold open at once.
    pub(crate) max_channels: usize,
}

/// What one accepted frame holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FrameFacts {
    /// Messages in the frame.
    pub(crate) messages: usize,
    /// Their weight (see [`weight_of_message`]).
    pub(crate) weight: u64,
}

/// The peer's channels as its frames declare them.
#[derive(Debug)]
pub(crate) struct Inspector {
    limits: FrameLimits,
    open: HashSet<u64>,
    most_open: u64,
}

impl Inspector {
    pub(crate) fn new(limits: FrameLimits) -> Self {
        Self {
            limits,
            open: HashSet::new(),
            most_open: 0,
        }
    }

    /// Checks one frame from the peer (already split per channel).
    pub(crate) fn inbound(&mut self, frame: &[u8]) -> Result<FrameFacts, PeerViolation> {
        let mut facts = FrameFacts::default();
        walk(frame, false, &mut |unit| {
            match unit {
                Unit::Open { channel } => self.on_open(channel)?,
                Unit::Close { channel } => {
                    self.open.remove(&channel);
                }
                Unit::Message { weight } => facts.weight += weight,
            }
            facts.messages += 1;
            Ok(())
        })?;
        Ok(facts)
    }

    fn on_open(&mut self, channel: u64) -> Result<(), PeerViolation> {
        let bound = self.most_open + CHANNEL_ID_SLACK;
        if channel > bound {
            return Err(PeerViolation::ChannelId { id: channel, bound });
        }
        if self.open.insert(channel) {
            if self.open.len() > self.limits.max_channels {
                return Err(PeerViolation::TooManyChannels {
                    limit: self.limits.max_channels,
                });
            }
            self.most_open = self.most_open.max(self.open.len() as u64);
        }
        Ok(())
    }
}

/// The weight of a frame we send (Open and Close weigh nothing: the driver does not count them).
pub(crate) fn outbound_weight(frame: &[u8]) -> u64 {
    let mut weight = 0;
    let _ = walk(frame, true, &mut |unit| {
        if let Unit::Message { weight: w } = unit {
            weight += w;
        }
        Ok(())
    });
    weight
}

/// How much a message costs while it waits to be written: its payload bytes plus a constant.
/// Computed from the fields that survive encoding, so [`outbound_weight`] of the encoded frame
/// gives the same sum.
pub(crate) fn weight_of_message(message: &Message) -> u64 {
    let payload = match message {
        Message::Data(data) => {
            let mut bytes = 0usize;
            if let Some(block) = &data.block {
                bytes += block.value.len() + 40 * block.nodes.len();
            }
            if let Some(hash) = &data.hash {
                bytes += 40 * hash.nodes.len();
            }
            if let Some(seek) = &data.seek {
                bytes += 40 * seek.nodes.len();
            }
            if let Some(upgrade) = &data.upgrade {
                bytes += 40 * (upgrade.nodes.len() + upgrade.additional_nodes.len())
                    + upgrade.signature.len();
            }
            bytes
        }
        Message::Extension(extension) => extension.name.len() + extension.message.len(),
        Message::Open(_) | Message::Close(_) | Message::LocalSignal(_) => return 0,
        _ => 0,
    };
    MESSAGE_OVERHEAD + payload as u64
}

enum Unit {
    Open { channel: u64 },
    Close { channel: u64 },
    Message { weight: u64 },
}

/// Walks the units of a frame as `hypercore-protocol` 0.7.2 decodes them
/// (`Vec<ChannelMessage>::decode`): batches `00 00`, opens `00 01`, closes `00 03`, and single
/// messages `<channel> <type> <body>`, one after another until the frame ends.
/// `switches`: whether a batch may switch channels (our own frames; the peer's are split first).
fn walk(
    frame: &[u8],
    switches: bool,
    visit: &mut dyn FnMut(Unit) -> Result<(), PeerViolation>,
) -> Result<(), PeerViolation> {
    let mut r = Reader::new(frame);
    while !r.is_empty() {
        let rest = r.rest();
        if rest.len() >= 3 && rest[0] == 0 {
            match rest[1] {
                0 => {
                    r.skip(2)?;
                    r.uint()?;
                    while !r.is_empty() {
                        if r.rest()[0] == 0 {
                            if !switches {
                                return Err(malformed("a batch that switches channels"));
                            }
                            r.skip(1)?;
                            r.uint()?;
                            continue;
                        }
                        let len = r.len_prefix()?;
                        let mut body = Reader::new(r.take(len)?);
                        let weight = message(&mut body)?;
                        if !body.is_empty() {
                            return Err(malformed("a batched message longer than its body"));
                        }
                        visit(Unit::Message { weight })?;
                    }
                }
                1 => {
                    r.skip(2)?;
                    if r.rest().len() <= 5 {
                        return Err(malformed("a short Open"));
                    }
                    let channel = r.uint()?;
                    if r.bytes()?.len() > MAX_PROTOCOL_NAME {
                        return Err(malformed("an Open with a long protocol name"));
                    }
                    if r.bytes()?.len() != 32 {
                        return Err(malformed("an Open whose discovery key is not 32 bytes"));
                    }
                    if !r.is_empty() {
                        r.skip(1 + 32)?;
                    }
                    visit(Unit::Open { channel })?;
                }
                3 => {
                    r.skip(2)?;
                    let channel = r.uint()?;
                    visit(Unit::Close { channel })?;
                }
                _ => return Err(malformed("an unknown control message")),
            }
        } else if rest.len() >= 2 {
            r.uint()?;
            let weight = message(&mut r)?;
            visit(Unit::Message { weight })?;
        } else {
            return Err(malformed("a frame too short for a message"));
        }
    }
    Ok(())
}

/// Reads one message (type and body); returns its weight.
fn message(r: &mut Reader<'_>) -> Result<u64, PeerViolation> {
    let typ = r.uint()?;
    let mut payload = 0usize;
    match typ {
        // Synchronize: flags, fork, length, remote length.
        0 => {
            r.skip(1)?;
            r.uints(3)?;
        }
        // Request: flags, id, fork, then optional block, hash, seek, upgrade, priority.
        1 => {
            let flags = r.byte()?;
            r.uints(2)?;
            r.uints(if flags & 1 != 0 { 2 } else { 0 })?;
            r.uints(if flags & 2 != 0 { 2 } else { 0 })?;
            r.uints(if flags & 4 != 0 { 1 } else { 0 })?;
            r.uints(if flags & 8 != 0 { 2 } else { 0 })?;
            r.uints(if flags & 32 != 0 { 1 } else { 0 })?;
        }
        // Cancel, NoData: a request id.
        2 | 4 => r.uints(1)?,
        // Data: flags, request, fork, then optional block, hash, seek, upgrade.
        3 => {
            let flags = r.byte()?;
            r.uints(2)?;
            if flags & 1 != 0 {
                r.uint()?;
                payload += r.bytes()?.len();
                payload += 40 * r.nodes()?;
            }
            if flags & 2 != 0 {
                r.uint()?;
                payload += 40 * r.nodes()?;
            }
            if flags & 4 != 0 {
                r.uint()?;
                payload += 40 * r.nodes()?;
            }
            if flags & 8 != 0 {
                r.uints(2)?;
                payload += 40 * r.nodes()?;
                payload += 40 * r.nodes()?;
                payload += r.bytes()?.len();
            }
        }
        // Want, Unwant: start, length.
        5 | 6 => r.uints(2)?,
        // Bitfield: start, then a vector of u32 words.
        7 => {
            r.uint()?;
            let words = r.len_prefix()?;
            if words > r.rest().len() / 4 {
                return Err(malformed("a bitfield longer than its frame"));
            }
            r.skip(4 * words)?;
        }
        // Range: flags, start, length unless the flags say 1.
        8 => {
            let flags = r.byte()?;
            r.uint()?;
            if flags & 2 == 0 {
                r.uint()?;
            }
        }
        // Extension: name (UTF-8), message.
        9 => {
            let name = r.bytes()?;
            if std::str::from_utf8(name).is_err() {
                return Err(malformed("an extension name that is not UTF-8"));
            }
            payload += name.len();
            payload += r.bytes()?.len();
        }
        _ => return Err(malformed("an unknown message type")),
    }
    Ok(MESSAGE_OVERHEAD + payload as u64)
}

fn malformed(what: &'static str) -> PeerViolation {
    PeerViolation::Malformed { what }
}

/// A cursor over compact-encoded bytes that never reads past the end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn rest(&self) -> &'a [u8] {
        self.buf
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PeerViolation> {
        if n > self.buf.len() {
            return Err(malformed("a field past the end of its frame"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn skip(&mut self, n: usize) -> Result<(), PeerViolation> {
        self.take(n).map(|_| ())
    }

    fn byte(&mut self) -> Result<u8, PeerViolation> {
        Ok(self.take(1)?[0])
    }

    fn uint(&mut self) -> Result<u64, PeerViolation> {
        let width = match self.byte()? {
            small @ 0..=0xfc => return Ok(u64::from(small)),
            0xfd => 2,
            0xfe => 4,
            0xff => 8,
        };
        let mut bytes = [0u8; 8];
        bytes[..width].copy_from_slice(self.take(width)?);
        Ok(u64::from_le_bytes(bytes))
    }

    fn uints(&mut self, n: usize) -> Result<(), PeerViolation> {
        for _ in 0..n {
            self.uint()?;
        }
        Ok(())
    }

    fn len_prefix(&mut self) -> Result<usize, PeerViolation> {
        let len = self.uint()?;
        usize::try_from(len).map_err(|_| malformed("a length that does not fit in memory"))
    }

    fn bytes(&mut self) -> Result<&'a [u8], PeerViolation> {
        let len = self.len_prefix()?;
        self.take(len)
    }

    /// A vector of tree nodes; returns how many.
    fn nodes(&mut self) -> Result<usize, PeerViolation> {
        let count = self.len_prefix()?;
        if count > self.buf.len() / MIN_NODE_BYTES {
            return Err(malformed("a node vector longer than its frame"));
        }
        for _ in 0..count {
            self.uints(2)?;
            self.skip(32)?;
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests;
