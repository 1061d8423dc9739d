//! The wire messages of the exchange and their compact binary encoding.
//!
//! Every message is one type byte followed by its fields: unsigned LEB128 varints, raw 32-byte
//! keys, and length-prefixed strings. Decoding checks every length against the bytes that remain
//! before allocating, and against the explicit limits below.

use std::collections::HashSet;

use crate::DecodeError;

/// A 32-byte feed public key.
pub type FeedKey = [u8; 32];

/// The longest encoded message, in bytes (one message always fits one protocol frame).
pub const MAX_MESSAGE_BYTES: usize = 60 * 1024;
/// The most keys in one message; longer lists are split into several messages.
pub const MAX_KEYS_PER_MESSAGE: usize = 1024;
/// The longest client name, in bytes.
pub const MAX_CLIENT_LEN: usize = 64;
/// The longest version string, in bytes.
pub const MAX_VERSION_LEN: usize = 64;
/// The longest user data, in bytes.
pub const MAX_USER_DATA_LEN: usize = 8 * 1024;

const HANDSHAKE: u8 = 1;
const MANIFEST: u8 = 2;
const REQUEST_FEEDS: u8 = 3;
const REPLICATE_FEEDS: u8 = 4;
const SYNCED: u8 = 5;
const RECONCILE: u8 = 6;
const NEED: u8 = 7;

/// A feed offered to the peer, with its length when offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeedOffer {
    /// The feed's public key.
    pub key: FeedKey,
    /// Its length when offered.
    pub length: u64,
}

/// A message of the multifeed exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Who we are: client name, protocol version, application data, and a nonce.
    Handshake {
        /// Client name, `MULTIFEED` for this implementation.
        client: String,
        /// Protocol version.
        version: semver::Version,
        /// Opaque application data.
        user_data: Vec<u8>,
        /// 16 random bytes; the two sides' nonces, XORed, key the connection's item ids.
        nonce: [u8; 16],
    },
    /// Feeds we offer; `complete` ends a round of offers.
    Manifest {
        /// The offers.
        feeds: Vec<FeedOffer>,
        /// Whether this is the last manifest of the round.
        complete: bool,
    },
    /// Keys of the peer's offers that we want.
    RequestFeeds {
        /// The keys.
        keys: Vec<FeedKey>,
    },
    /// Keys we will replicate, answering the oldest unanswered `RequestFeeds`.
    ReplicateFeeds {
        /// The keys.
        keys: Vec<FeedKey>,
    },
    /// We hold every feed we requested, up to the offered lengths.
    Synced,
    /// One negentropy round of the reconciliation of the offered sets (protocol 2).
    Reconcile {
        /// negentropy's message, at most [`MAX_RECONCILE_BYTES`](crate::MAX_RECONCILE_BYTES).
        data: Vec<u8>,
    },
    /// Item ids of the responder's set that the initiator lacks: offer these (protocol 2);
    /// `complete` ends the list.
    Need {
        /// The item ids.
        ids: Vec<[u8; 32]>,
        /// Whether this is the last part of the list.
        complete: bool,
    },
}

impl Message {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Handshake { .. } => "HANDSHAKE",
            Self::Manifest { .. } => "MANIFEST",
            Self::RequestFeeds { .. } => "REQUEST_FEEDS",
            Self::ReplicateFeeds { .. } => "REPLICATE_FEEDS",
            Self::Synced => "SYNCED",
            Self::Reconcile { .. } => "RECONCILE",
            Self::Need { .. } => "NEED",
        }
    }

    /// Encodes the message. Messages built within the limits always fit [`MAX_MESSAGE_BYTES`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Self::Handshake {
                client,
                version,
                user_data,
                nonce,
            } => {
                out.push(HANDSHAKE);
                put_bytes(&mut out, client.as_bytes());
                put_bytes(&mut out, version.to_string().as_bytes());
                put_bytes(&mut out, user_data);
                out.extend_from_slice(nonce);
            }
            Self::Manifest { feeds, complete } => {
                out.push(MANIFEST);
                out.push(u8::from(*complete));
                put_varint(&mut out, feeds.len() as u64);
                for offer in feeds {
                    out.extend_from_slice(&offer.key);
                    put_varint(&mut out, offer.length);
                }
            }
            Self::RequestFeeds { keys } | Self::ReplicateFeeds { keys } => {
                out.push(if matches!(self, Self::RequestFeeds { .. }) {
                    REQUEST_FEEDS
                } else {
                    REPLICATE_FEEDS
                });
                put_varint(&mut out, keys.len() as u64);
                for key in keys {
                    out.extend_from_slice(key);
                }
            }
            Self::Synced => out.push(SYNCED),
            Self::Reconcile { data } => {
                out.push(RECONCILE);
                put_bytes(&mut out, data);
            }
            Self::Need { ids, complete } => {
                out.push(NEED);
                out.push(u8::from(*complete));
                put_varint(&mut out, ids.len() as u64);
                for id in ids {
                    out.extend_from_slice(id);
                }
            }
        }
        out
    }

    /// Decodes one message, rejecting anything malformed or over a limit. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::MessageTooLarge {
                len: bytes.len(),
                limit: MAX_MESSAGE_BYTES,
            });
        }
        let (&kind, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
        let mut r = Reader(rest);
        let message = match kind {
            HANDSHAKE => {
                let client = r.string("client", MAX_CLIENT_LEN)?;
                let version = r.string("version", MAX_VERSION_LEN)?;
                let version = semver::Version::parse(&version)
                    .map_err(|_| DecodeError::InvalidVersion(version.clone()))?;
                let user_data = r.bytes("user_data", MAX_USER_DATA_LEN)?.to_vec();
                let mut nonce = [0u8; 16];
                nonce.copy_from_slice(r.take(16, "nonce")?);
                Self::Handshake {
                    client,
                    version,
                    user_data,
                    nonce,
                }
            }
            MANIFEST => {
                let complete = r.flag("complete")?;
                // Each offer takes at least 33 bytes: bound the count by what remains.
                let count = r.count(33)?;
                let mut feeds = Vec::with_capacity(count);
                let mut seen = HashSet::with_capacity(count);
                for _ in 0..count {
                    let key = r.key()?;
                    let length = r.varint("length")?;
                    if !seen.insert(key) {
                        return Err(DecodeError::DuplicateKey);
                    }
                    feeds.push(FeedOffer { key, length });
                }
                Self::Manifest { feeds, complete }
            }
            REQUEST_FEEDS | REPLICATE_FEEDS => {
                let keys = r.distinct_keys()?;
                if kind == REQUEST_FEEDS {
                    Self::RequestFeeds { keys }
                } else {
                    Self::ReplicateFeeds { keys }
                }
            }
            SYNCED => Self::Synced,
            RECONCILE => Self::Reconcile {
                data: r
                    .bytes("data", crate::reconcile::MAX_RECONCILE_BYTES)?
                    .to_vec(),
            },
            NEED => {
                let complete = r.flag("complete")?;
                let ids = r.distinct_keys()?;
                Self::Need { ids, complete }
            }
            other => return Err(DecodeError::UnknownType(other)),
        };
        if !r.0.is_empty() {
            return Err(DecodeError::TrailingBytes(r.0.len()));
        }
        Ok(message)
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated(field));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.take(1, field)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::InvalidFlag(field)),
        }
    }

    fn varint(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1, field)?[0];
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError::VarintOverflow(field));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::VarintOverflow(field))
    }

    fn bytes(&mut self, field: &'static str, limit: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.varint(field)?;
        if len > limit as u64 {
            return Err(DecodeError::FieldTooLong { field, len, limit });
        }
        self.take(len as usize, field)
    }

    fn string(&mut self, field: &'static str, limit: usize) -> Result<String, DecodeError> {
        let bytes = self.bytes(field, limit)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8(field))
    }

    /// A key count, checked against the limit and against the bytes left (`min_each` per key).
    fn count(&mut self, min_each: usize) -> Result<usize, DecodeError> {
        let count = self.varint("count")?;
        if count > MAX_KEYS_PER_MESSAGE as u64 {
            return Err(DecodeError::TooManyKeys {
                count,
                limit: MAX_KEYS_PER_MESSAGE,
            });
        }
        if count as usize * min_each > self.0.len() {
            return Err(DecodeError::Truncated("keys"));
        }
        Ok(count as usize)
    }

    /// A count, then that many 32-byte keys (or ids), none twice.
    fn distinct_keys(&mut self) -> Result<Vec<FeedKey>, DecodeError> {
        let count = self.count(32)?;
        let mut keys = Vec::with_capacity(count);
        let mut seen = HashSet::with_capacity(count);
        for _ in 0..count {
            let key = self.key()?;
            if !seen.insert(key) {
                return Err(DecodeError::DuplicateKey);
            }
            keys.push(key);
        }
        Ok(keys)
    }

    fn key(&mut self) -> Result<FeedKey, DecodeError> {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.take(32, "key")?);
        Ok(key)
    }
}
