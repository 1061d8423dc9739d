//! The root index: an append-only log of checksummed records, one per feed, in creation order.
//!
//! Record layout (all integers little-endian):
//!
//! ```text
//! magic  u16   0x4D46 ("MF")
//! len    u32   payload length (at most MAX_RECORD_LEN)
//! crc    u32   CRC-32 of the payload
//! payload:
//!   version u8   1
//!   origin  u8   0 = local writer, 1 = learned from a remote
//!   key     [u8; 32]
//!   ns_len  u16, namespace bytes (UTF-8)
//!   has_name u8 (0/1), then name_len u16 and name bytes (UTF-8)
//! or, for a mark on a key (removal, deny, allow):
//!   version u8   2
//!   mark    u8   0 = removed (a tombstone), 1 = denied, 2 = allowed again
//!   key     [u8; 32]
//! ```
//!
//! Records apply in order: a mark after a feed's record overrides it, a record after a mark
//! (the feed added again once allowed) overrides the mark. Readers of version 1 only skip
//! marks as damaged records.
//!
//! A torn or corrupt record is detected by its length or checksum; loading skips it and resumes at
//! the next valid record, so damage hides nothing after it. The next append first cuts off a
//! damaged tail, so the last good state always survives.

use random_access_storage::RandomAccessError;

use crate::factory::BoxedStore;
use crate::{FeedKey, StorageError};

const MAGIC: [u8; 2] = [0x4D, 0x46];
const HEADER_LEN: usize = 10;
const RECORD_VERSION: u8 = 1;
const MARK_VERSION: u8 = 2;
/// The longest record payload accepted.
const MAX_RECORD_LEN: usize = 4 * 1024;
/// The longest writer name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// Where a feed came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FeedOrigin {
    /// Created here: we hold its secret key and can append.
    Local,
    /// Learned from a remote peer: read-only here.
    Remote,
}

/// One feed as the index lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedRecord {
    /// The feed's public key.
    pub key: FeedKey,
    /// Its namespace (directory) inside the root.
    pub namespace: String,
    /// The local writer name, if it has one. Names never leave this machine.
    pub name: Option<String>,
    /// Whether it was created here or learned from a peer.
    pub origin: FeedOrigin,
}

/// A mark the index records on a key, for [`RootStorage::mark`](crate::RootStorage::mark).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyMark {
    /// The feed was removed: its record no longer counts, and it is never added again until
    /// allowed.
    Removed,
    /// Never exchanged with peers (nor added from them) until allowed.
    Denied,
    /// Lifts an earlier `Removed` or `Denied`.
    Allowed,
}

/// One record of the index, in the order written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    Feed(FeedRecord),
    Mark(FeedKey, KeyMark),
}

/// What loading the index found besides the records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexRecovery {
    /// Byte ranges `(start, end)` that held no valid record and were skipped.
    pub damaged: Vec<(u64, u64)>,
    /// Feeds whose folder the index no longer named, listed again (their writer names are
    /// lost; a local writer, whose secret key was found, stays writable).
    pub restored: Vec<FeedRecord>,
}

impl IndexRecovery {
    /// Whether the index was read without finding any damage.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.restored.is_empty()
    }
}

/// The index file, open for appends.
#[derive(Debug)]
pub(crate) struct FeedIndex {
    store: BoxedStore,
    path: String,
    /// End of the last valid record: where the next record goes.
    end: u64,
    /// Whether bytes after `end` must be cut off before the next append.
    dirty_tail: bool,
}

impl FeedIndex {
    /// Reads every valid record of the index store.
    pub(crate) async fn load(
        mut store: BoxedStore,
        path: &str,
    ) -> Result<(Self, Vec<Entry>, IndexRecovery), StorageError> {
        let len = store.len().await.map_err(|e| StorageError::io(path, e))?;
        let bytes = if len == 0 {
            Vec::new()
        } else {
            store
                .read(0, len)
                .await
                .map_err(|e| StorageError::io(path, e))?
        };
        let (records, recovery, end) = parse(&bytes);
        let index = Self {
            store,
            path: path.to_owned(),
            end,
            dirty_tail: end < len,
        };
        Ok((index, records, recovery))
    }

    /// Appends one record; it is durable against a killed process once this returns.
    pub(crate) async fn append(&mut self, record: &FeedRecord) -> Result<(), StorageError> {
        let bytes = encode(record)?;
        self.write_record(bytes).await
    }

    /// Appends a mark on `key`, as durable as [`append`](Self::append).
    pub(crate) async fn append_mark(
        &mut self,
        key: &FeedKey,
        mark: KeyMark,
    ) -> Result<(), StorageError> {
        let mut payload = vec![
            MARK_VERSION,
            match mark {
                KeyMark::Removed => 0,
                KeyMark::Denied => 1,
                KeyMark::Allowed => 2,
            },
        ];
        payload.extend_from_slice(key);
        self.write_record(frame(&payload)).await
    }

    async fn write_record(&mut self, bytes: Vec<u8>) -> Result<(), StorageError> {
        if self.dirty_tail {
            self.store
                .truncate(self.end)
                .await
                .map_err(|e| StorageError::io(&self.path, e))?;
            self.dirty_tail = false;
        }
        match self.store.write(self.end, &bytes).await {
            Ok(()) => {
                self.end += bytes.len() as u64;
                Ok(())
            }
            Err(err) => {
                // Part of the record may be on disk: cut it off before the next append.
                self.dirty_tail = true;
                Err(StorageError::io(&self.path, err))
            }
        }
    }

    /// Flushes the index to stable storage.
    pub(crate) async fn sync(&mut self) -> Result<(), StorageError> {
        self.store
            .sync_all()
            .await
            .map_err(|e: RandomAccessError| StorageError::io(&self.path, e))
    }
}

fn encode(record: &FeedRecord) -> Result<Vec<u8>, StorageError> {
    let name_len = record.name.as_ref().map_or(0, String::len);
    if name_len > MAX_NAME_LEN {
        return Err(StorageError::NameTooLong {
            len: name_len,
            limit: MAX_NAME_LEN,
        });
    }
    let ns = record.namespace.as_bytes();
    let mut payload = Vec::with_capacity(40 + ns.len() + name_len);
    payload.push(RECORD_VERSION);
    payload.push(match record.origin {
        FeedOrigin::Local => 0,
        FeedOrigin::Remote => 1,
    });
    payload.extend_from_slice(&record.key);
    push_str(&mut payload, ns);
    match &record.name {
        Some(name) => {
            payload.push(1);
            push_str(&mut payload, name.as_bytes());
        }
        None => payload.push(0),
    }
    Ok(frame(&payload))
}

/// A payload with its header (magic, length, checksum).
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn push_str(out: &mut Vec<u8>, bytes: &[u8]) {
    // Callers bound every string well below u16::MAX.
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Parses all valid records; returns them, the damaged ranges, and the end of the last valid one.
fn parse(bytes: &[u8]) -> (Vec<Entry>, IndexRecovery, u64) {
    let mut records = Vec::new();
    let mut recovery = IndexRecovery::default();
    let mut pos = 0usize;
    let mut end = 0usize;
    let mut damage_start: Option<usize> = None;
    while pos < bytes.len() {
        match parse_record(&bytes[pos..]) {
            Some((record, used)) => {
                if let Some(start) = damage_start.take() {
                    recovery.damaged.push((start as u64, pos as u64));
                }
                records.push(record);
                pos += used;
                end = pos;
            }
            None => {
                damage_start.get_or_insert(pos);
                pos += 1;
            }
        }
    }
    if let Some(start) = damage_start {
        recovery.damaged.push((start as u64, bytes.len() as u64));
    }
    (records, recovery, end as u64)
}

fn parse_record(bytes: &[u8]) -> Option<(Entry, usize)> {
    let header = bytes.get(..HEADER_LEN)?;
    if header[..2] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[2..6].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[6..10].try_into().ok()?);
    if len > MAX_RECORD_LEN {
        return None;
    }
    let payload = bytes.get(HEADER_LEN..HEADER_LEN + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let record = decode_payload(payload)?;
    Some((record, HEADER_LEN + len))
}

fn decode_payload(payload: &[u8]) -> Option<Entry> {
    let mut reader = Reader(payload);
    match reader.u8()? {
        RECORD_VERSION => {}
        MARK_VERSION => {
            let mark = match reader.u8()? {
                0 => KeyMark::Removed,
                1 => KeyMark::Denied,
                2 => KeyMark::Allowed,
                _ => return None,
            };
            let key: FeedKey = reader.take(32)?.try_into().ok()?;
            return reader.0.is_empty().then_some(Entry::Mark(key, mark));
        }
        _ => return None,
    }
    let origin = match reader.u8()? {
        0 => FeedOrigin::Local,
        1 => FeedOrigin::Remote,
        _ => return None,
    };
    let key: FeedKey = reader.take(32)?.try_into().ok()?;
    let namespace = reader.string()?;
    let name = match reader.u8()? {
        0 => None,
        1 => Some(reader.string()?),
        _ => return None,
    };
    if !reader.0.is_empty() {
        return None;
    }
    Some(Entry::Feed(FeedRecord {
        key,
        namespace,
        name,
        origin,
    }))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn string(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u8, name: Option<&str>) -> FeedRecord {
        FeedRecord {
            key: [i; 32],
            namespace: format!("feeds/{i:02x}"),
            name: name.map(str::to_owned),
            origin: if i.is_multiple_of(2) {
                FeedOrigin::Local
            } else {
                FeedOrigin::Remote
            },
        }
    }

    fn log(records: &[FeedRecord]) -> Vec<u8> {
        records.iter().flat_map(|r| encode(r).unwrap()).collect()
    }

    fn feeds(entries: Vec<Entry>) -> Vec<FeedRecord> {
        entries
            .into_iter()
            .filter_map(|entry| match entry {
                Entry::Feed(record) => Some(record),
                Entry::Mark(..) => None,
            })
            .collect()
    }

    #[test]
    fn marks_round_trip_between_records() {
        let mark = |key: u8, mark| {
            let mut payload = vec![MARK_VERSION, mark];
            payload.extend_from_slice(&[key; 32]);
            frame(&payload)
        };
        let mut bytes = log(&[record(0, Some("a"))]);
        bytes.extend(mark(0, 0));
        bytes.extend(mark(1, 1));
        bytes.extend(log(&[record(2, None)]));
        bytes.extend(mark(1, 2));
        let (entries, recovery, _) = parse(&bytes);
        assert!(recovery.is_clean());
        assert_eq!(
            entries,
            vec![
                Entry::Feed(record(0, Some("a"))),
                Entry::Mark([0; 32], KeyMark::Removed),
                Entry::Mark([1; 32], KeyMark::Denied),
                Entry::Feed(record(2, None)),
                Entry::Mark([1; 32], KeyMark::Allowed),
            ]
        );
        let mut unknown = bytes.clone();
        unknown.extend(mark(3, 9));
        assert!(!parse(&unknown).1.is_clean(), "an unknown mark is damage");
    }

    #[test]
    fn round_trips_records_in_order() {
        let records = vec![
            record(0, Some("a")),
            record(1, None),
            record(2, Some("ünï")),
        ];
        let (parsed, recovery, end) = parse(&log(&records));
        let parsed = feeds(parsed);
        assert_eq!(parsed, records);
        assert!(recovery.is_clean());
        assert_eq!(end as usize, log(&records).len());
    }

    #[test]
    fn every_truncation_and_flip_of_the_last_record_keeps_the_earlier_ones() {
        let records = vec![
            record(0, Some("first")),
            record(1, None),
            record(2, Some("last")),
        ];
        let full = log(&records);
        let last_start = log(&records[..2]).len();
        for cut in last_start..full.len() {
            let (parsed, _, end) = parse(&full[..cut]);
            let parsed = feeds(parsed);
            assert_eq!(parsed, records[..2], "truncated at {cut}");
            assert_eq!(end as usize, last_start);
        }
        for at in last_start..full.len() {
            for bit in [0x01u8, 0x80] {
                let mut bytes = full.clone();
                bytes[at] ^= bit;
                let (parsed, recovery, _) = parse(&bytes);
                assert_eq!(feeds(parsed), records[..2], "flipped bit {bit:#x} at {at}");
                assert!(!recovery.is_clean());
            }
        }
    }

    #[test]
    fn damage_in_the_middle_hides_nothing_after_it() {
        let records = vec![
            record(0, Some("a")),
            record(1, Some("b")),
            record(2, Some("c")),
        ];
        let mut bytes = log(&records);
        let second = encode(&records[0]).unwrap().len();
        bytes[second + 12] ^= 0xff;
        let (parsed, recovery, _) = parse(&bytes);
        assert_eq!(feeds(parsed), vec![records[0].clone(), records[2].clone()]);
        assert_eq!(recovery.damaged.len(), 1);
    }

    #[test]
    fn rejects_overlong_names() {
        let mut r = record(0, None);
        r.name = Some("x".repeat(MAX_NAME_LEN + 1));
        assert!(matches!(encode(&r), Err(StorageError::NameTooLong { .. })));
    }
}
