//! The lengths snapshot: every feed's length and contiguous length as a clean close left them,
//! so the next open can list a large store without opening each feed's hypercore (which costs
//! about 140 µs and several file reads a feed: 14 s for 100,000 feeds on disk).
//!
//! A snapshot is a hint, never the truth: a feed's entry is trusted only when the
//! files its lengths come from (oplog, tree, bitfield) are exactly as they were when the
//! snapshot was taken: same existence, size, inode and change time (`ctime`, which no ordinary
//! write or `touch` can leave as it was). A feed whose files were written, truncated, deleted or
//! replaced since, by this library or anyone else, is opened as before, so damage and loss are
//! found as they were without the snapshot. As git does with its index, a file changed within
//! the same clock tick as the snapshot was written ("racily clean") is not trusted either: a
//! later write in that tick could leave its change time as it was. Checking costs one `stat` a
//! file, spread over the cores: about 0.25 s per store of 30,000 feeds here, against 3.5 s
//! for opening them.
//!
//! The snapshot is consumed by the open that reads it (emptied at once), so it only ever
//! describes the clean close right before; a session that crashes leaves none. Its bytes carry
//! a CRC32: a torn or damaged snapshot is ignored. The multifeed checks it when a replication
//! first lists the feeds, not at open, and at close carries the entries of the feeds it did
//! not open to the next snapshot as they were (checked or not: the next check compares them
//! with the files as they are then), so a close costs a `stat` only for the feeds the session
//! opened.
//!
//! The three stamps of a feed are kept as one 16-byte BLAKE2b digest (the `blake2` crate,
//! RustCrypto's, already built for hypercore): 80 bytes a feed, 8 MB for 100,000.
//!
//! Only backends that can tell what a file looks like ([`StorageFactory::file_stamp`]: the disk
//! factory) use one.

use std::collections::HashMap;

use blake2::digest::{Update, VariableOutput};

use crate::{FeedKey, StorageError, StorageFactory};

/// Where a root keeps its lengths snapshot.
pub const LENGTHS_PATH: &str = "lengths";

/// The files of a feed that its lengths come from, as stamped: the oplog (its header holds
/// the length), the tree (its roots, and its leaves past a damaged header) and the bitfield
/// (the blocks held). Block data is not among them: damage to it never showed at open, and is
/// found where it always was, when a block is read or served and checked against its leaf.
const STAMPED_FILES: [&str; 3] = ["oplog", "tree", "bitfield"];

/// Below this many feeds, stamping runs on the calling thread.
const PARALLEL_FROM: usize = 2_000;

const MAGIC: &[u8; 8] = b"MFLENGT1";
/// Key, length, contiguous length, stamp digest, newest change time.
const ENTRY_LEN: usize = 32 + 8 + 8 + 16 + 16;
const HEADER_LEN: usize = 8 + 8;

/// What a stored file looks like now, as far as a backend can tell without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileStamp {
    /// Whether the file exists (the other fields are zero when not).
    pub exists: bool,
    /// Its size in bytes.
    pub len: u64,
    /// Its identity (inode and device on Unix): a file replaced by another differs.
    pub id: u64,
    /// When its content or metadata last changed, in nanoseconds since the epoch, on the
    /// backend's own clock.
    pub changed: i128,
}

impl FileStamp {
    /// A file that does not exist.
    pub const ABSENT: Self = Self {
        exists: false,
        len: 0,
        id: 0,
        changed: i128::MIN,
    };
}

/// A feed's files, stamped: a digest of their three stamps and the newest change among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FeedStamp {
    digest: [u8; 16],
    newest: i128,
}

/// The stamps of many feeds' files, in order: one `stat` a file, spread over the machine's
/// cores for large stores (a system call each is most of a snapshot's cost: ~3 µs a file here).
fn feed_stamps(factory: &dyn StorageFactory, namespaces: &[&str]) -> Vec<Option<FeedStamp>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(4);
    if namespaces.len() < PARALLEL_FROM || threads < 2 {
        return namespaces
            .iter()
            .map(|namespace| feed_stamp(factory, namespace))
            .collect();
    }
    let chunk = namespaces.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = namespaces
            .chunks(chunk)
            .map(|part| {
                let stamps = scope.spawn(move || {
                    part.iter()
                        .map(|namespace| feed_stamp(factory, namespace))
                        .collect::<Vec<_>>()
                });
                (part.len(), stamps)
            })
            .collect();
        parts
            .into_iter()
            // A panicking stamp (none is known) only loses the shortcut for its part: no
            // stamp for any of its feeds, and the parts after it stay in step.
            .flat_map(|(len, part)| part.join().unwrap_or_else(|_| vec![None; len]))
            .collect()
    })
}

fn feed_stamp(factory: &dyn StorageFactory, namespace: &str) -> Option<FeedStamp> {
    let mut hasher = blake2::Blake2bVar::new(16).ok()?;
    let mut newest = i128::MIN;
    for file in STAMPED_FILES {
        let stamp = factory.file_stamp(&format!("{namespace}/{file}"))?;
        hasher.update(&[u8::from(stamp.exists)]);
        hasher.update(&stamp.len.to_le_bytes());
        hasher.update(&stamp.id.to_le_bytes());
        hasher.update(&stamp.changed.to_le_bytes());
        newest = newest.max(stamp.changed);
    }
    let mut digest = [0u8; 16];
    hasher.finalize_variable(&mut digest).ok()?;
    Some(FeedStamp { digest, newest })
}

/// A feed's lengths, as a snapshot records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotLengths {
    /// The feed's length.
    pub length: u64,
    /// The entries it holds from 0 without a gap.
    pub contiguous_length: u64,
}

fn io(source: random_access_storage::RandomAccessError) -> StorageError {
    StorageError::io(LENGTHS_PATH, source)
}

/// A feed's entry in a lengths snapshot: its lengths and what its files looked like then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// The lengths recorded.
    pub lengths: SnapshotLengths,
    stamp: FeedStamp,
}

/// A feed to record in a lengths snapshot ([`write_lengths_snapshot`]).
#[derive(Debug, Clone, Copy)]
pub enum SnapshotFeed<'a> {
    /// A feed opened in this session: its files are stamped now.
    Fresh {
        /// Its key.
        key: &'a FeedKey,
        /// Its namespace (`feeds/ab/ab12…`).
        namespace: &'a str,
        /// Its lengths as its core last had them.
        lengths: SnapshotLengths,
    },
    /// A feed whose core was not opened in this session: its entry from the snapshot this
    /// session was opened with, kept as it is (checked or not). The next open checks it
    /// against the files as they are then, as any entry.
    Carried {
        /// Its key.
        key: &'a FeedKey,
        /// Its entry.
        entry: SnapshotEntry,
    },
}

/// The lengths snapshot a root was opened with ([`LengthsSnapshot::take`]): its entries, not
/// trusted until [`check`](Self::check)ed against the files.
#[derive(Debug, Default)]
pub struct LengthsSnapshot {
    entries: HashMap<FeedKey, SnapshotEntry>,
    /// When the snapshot was written, on the backend's clock.
    written: i128,
}

impl LengthsSnapshot {
    /// Reads and consumes the root's lengths snapshot (it is emptied at once, whatever it
    /// held). Empty when there is none, it is damaged, or the backend cannot stamp files.
    pub async fn take(factory: &dyn StorageFactory) -> Result<Self, StorageError> {
        let Some(snapshot) = factory.file_stamp(LENGTHS_PATH) else {
            return Ok(Self::default());
        };
        if !snapshot.exists || snapshot.len == 0 {
            return Ok(Self::default());
        }
        let mut store = factory.open(LENGTHS_PATH).await.map_err(io)?;
        let bytes = store.read(0, snapshot.len).await.map_err(io)?;
        // Consumed before anything can change the feeds it describes.
        store.truncate(0).await.map_err(io)?;
        store.sync_all().await.map_err(io)?;
        drop(store);
        let entries = decode(&bytes)
            .unwrap_or_default()
            .into_iter()
            .map(|(key, lengths, stamp)| (key, SnapshotEntry { lengths, stamp }))
            .collect();
        Ok(Self {
            entries,
            written: snapshot.changed,
        })
    }

    /// How many feeds it has entries for.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of `key`, unchecked (to carry it to the next snapshot).
    pub fn entry(&self, key: &FeedKey) -> Option<SnapshotEntry> {
        self.entries.get(key).copied()
    }

    /// The entries of the feeds among `feeds` (key, namespace) whose files are exactly as the
    /// snapshot saw them: one `stat` a file, over several threads for large stores.
    pub fn check<'a>(
        &self,
        factory: &dyn StorageFactory,
        feeds: impl IntoIterator<Item = (&'a FeedKey, &'a str)>,
    ) -> HashMap<FeedKey, SnapshotEntry> {
        // Racily clean entries (changed in the tick the snapshot was written in, or later)
        // are not even looked at.
        let candidates: Vec<(&FeedKey, &str, &SnapshotEntry)> = feeds
            .into_iter()
            .filter_map(|(key, namespace)| Some((key, namespace, self.entries.get(key)?)))
            .filter(|(_, _, entry)| entry.stamp.newest < self.written)
            .collect();
        let namespaces: Vec<&str> = candidates
            .iter()
            .map(|(_, namespace, _)| *namespace)
            .collect();
        candidates
            .iter()
            .zip(feed_stamps(factory, &namespaces))
            .filter(|((_, _, entry), now)| *now == Some(entry.stamp))
            .map(|((key, _, entry), _)| (**key, **entry))
            .collect()
    }
}

/// Writes the lengths snapshot of `feeds`: call it once every write of the feeds has reached
/// the backend and nothing writes them any more (at close). Fresh feeds whose files cannot be
/// stamped are left out; a backend that stamps nothing gets no snapshot. Returns how many feeds
/// it recorded.
pub async fn write_lengths_snapshot<'a>(
    factory: &dyn StorageFactory,
    feeds: impl IntoIterator<Item = SnapshotFeed<'a>>,
) -> Result<usize, StorageError> {
    if factory.file_stamp(LENGTHS_PATH).is_none() {
        return Ok(0);
    }
    let feeds: Vec<SnapshotFeed<'a>> = feeds.into_iter().collect();
    let namespaces: Vec<&str> = feeds
        .iter()
        .filter_map(|feed| match feed {
            SnapshotFeed::Fresh { namespace, .. } => Some(*namespace),
            SnapshotFeed::Carried { .. } => None,
        })
        .collect();
    let mut stamps = feed_stamps(factory, &namespaces).into_iter();
    let entries: Vec<(FeedKey, SnapshotLengths, FeedStamp)> = feeds
        .iter()
        .filter_map(|feed| match feed {
            SnapshotFeed::Fresh { key, lengths, .. } => Some((**key, *lengths, stamps.next()??)),
            SnapshotFeed::Carried { key, entry } => Some((**key, entry.lengths, entry.stamp)),
        })
        .collect();
    let bytes = encode(&entries);
    let mut store = factory.open(LENGTHS_PATH).await.map_err(io)?;
    store.truncate(0).await.map_err(io)?;
    store.write(0, &bytes).await.map_err(io)?;
    Ok(entries.len())
}

fn encode(entries: &[(FeedKey, SnapshotLengths, FeedStamp)]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + entries.len() * ENTRY_LEN + 4);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (key, lengths, stamp) in entries {
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(&lengths.length.to_le_bytes());
        bytes.extend_from_slice(&lengths.contiguous_length.to_le_bytes());
        bytes.extend_from_slice(&stamp.digest);
        bytes.extend_from_slice(&stamp.newest.to_le_bytes());
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// The entries of an encoded snapshot, or `None` when it is not one (empty, torn, damaged).
fn decode(bytes: &[u8]) -> Option<Vec<(FeedKey, SnapshotLengths, FeedStamp)>> {
    let body_len = bytes.len().checked_sub(4)?;
    let (body, crc) = bytes.split_at(body_len);
    if body.len() < HEADER_LEN || &body[..8] != MAGIC || crc32fast::hash(body).to_le_bytes() != crc
    {
        return None;
    }
    let count = u64::from_le_bytes(body[8..16].try_into().ok()?);
    let entries = &body[HEADER_LEN..];
    if entries.len() % ENTRY_LEN != 0 || (entries.len() / ENTRY_LEN) as u64 != count {
        return None;
    }
    let u64_at = |entry: &[u8], at: usize| {
        u64::from_le_bytes(entry[at..at + 8].try_into().expect("8 bytes"))
    };
    Some(
        entries
            .chunks_exact(ENTRY_LEN)
            .map(|entry| {
                let key: FeedKey = entry[..32].try_into().expect("32 bytes");
                let lengths = SnapshotLengths {
                    length: u64_at(entry, 32),
                    contiguous_length: u64_at(entry, 40),
                };
                let digest = entry[48..64].try_into().expect("16 bytes");
                let newest = i128::from_le_bytes(entry[64..80].try_into().expect("16 bytes"));
                (key, lengths, FeedStamp { digest, newest })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8) -> (FeedKey, SnapshotLengths, FeedStamp) {
        (
            [n; 32],
            SnapshotLengths {
                length: u64::from(n) * 10,
                contiguous_length: u64::from(n),
            },
            FeedStamp {
                digest: [n; 16],
                newest: i128::from(n) - 100,
            },
        )
    }

    #[test]
    fn a_snapshot_decodes_to_what_was_encoded() {
        let entries = vec![entry(1), entry(2), entry(3)];
        assert_eq!(decode(&encode(&entries)), Some(entries));
        assert_eq!(decode(&encode(&[])), Some(vec![]));
    }

    #[test]
    fn a_torn_or_damaged_snapshot_is_ignored() {
        let bytes = encode(&[entry(1), entry(2)]);
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), None, "cut at {cut}");
        }
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert_eq!(decode(&damaged), None, "damaged at {at}");
        }
    }

    /// Waits (bounded) until the file system's clock is past `changed`.
    fn wait_for_fs_clock_past(factory: &dyn StorageFactory, dir: &std::path::Path, changed: i128) {
        let started = std::time::Instant::now();
        loop {
            std::fs::write(dir.join("probe"), b"tick").expect("probe");
            let now = factory.file_stamp("probe").expect("stamp").changed;
            if now > changed {
                return;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "the file system's clock did not move within 10 s"
            );
        }
    }

    #[test]
    fn thousands_of_feeds_are_trusted_but_the_one_changed_after_the_snapshot() {
        async_std::task::block_on(async {
            let dir = tempfile::tempdir().expect("dir");
            let factory = crate::DiskFactory::new(dir.path(), 16);
            let n = PARALLEL_FROM + 500;
            let keys: Vec<FeedKey> = (0..n)
                .map(|i| {
                    let mut key = [0u8; 32];
                    key[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    key
                })
                .collect();
            let namespaces: Vec<String> = keys.iter().map(crate::namespace_for).collect();
            let mut newest = i128::MIN;
            for namespace in &namespaces {
                std::fs::create_dir_all(dir.path().join(namespace)).expect("dir");
                for file in ["oplog", "tree", "bitfield"] {
                    std::fs::write(dir.path().join(namespace).join(file), b"bytes").expect("file");
                }
                let stamp = factory
                    .file_stamp(&format!("{namespace}/oplog"))
                    .expect("stamp");
                newest = newest.max(stamp.changed);
            }
            wait_for_fs_clock_past(&factory, dir.path(), newest);
            let lengths = |i: usize| SnapshotLengths {
                length: i as u64,
                contiguous_length: i as u64 / 2,
            };
            let written = write_lengths_snapshot(
                &factory,
                keys.iter()
                    .zip(&namespaces)
                    .enumerate()
                    .map(|(i, (key, namespace))| SnapshotFeed::Fresh {
                        key,
                        namespace,
                        lengths: lengths(i),
                    }),
            )
            .await
            .expect("write");
            assert_eq!(written, n);
            // One bitfield written behind the snapshot's back, with the same size.
            let changed = 1234;
            std::fs::write(
                dir.path().join(&namespaces[changed]).join("bitfield"),
                b"BYTES",
            )
            .expect("write");
            let snapshot = LengthsSnapshot::take(&factory).await.expect("take");
            assert_eq!(snapshot.len(), n);
            let feeds = || {
                keys.iter()
                    .zip(&namespaces)
                    .map(|(key, ns)| (key, ns.as_str()))
            };
            let trusted = snapshot.check(&factory, feeds());
            assert_eq!(trusted.len(), n - 1);
            assert!(!trusted.contains_key(&keys[changed]));
            assert_eq!(
                trusted.get(&keys[7]).map(|entry| entry.lengths),
                Some(lengths(7))
            );
            // Carried as they are to the next snapshot (no stamp taken), they are checked
            // against the files then, as any entry.
            let carried: Vec<SnapshotFeed<'_>> = keys
                .iter()
                .filter_map(|key| {
                    Some(SnapshotFeed::Carried {
                        key,
                        entry: snapshot.entry(key)?,
                    })
                })
                .collect();
            assert_eq!(carried.len(), n);
            write_lengths_snapshot(&factory, carried)
                .await
                .expect("write");
            let snapshot = LengthsSnapshot::take(&factory).await.expect("take");
            let trusted = snapshot.check(&factory, feeds());
            assert_eq!(trusted.len(), n - 1);
            assert!(!trusted.contains_key(&keys[changed]));
            // Consumed: a second take trusts nothing.
            let again = LengthsSnapshot::take(&factory).await.expect("take");
            assert!(again.is_empty());
        });
    }
}
