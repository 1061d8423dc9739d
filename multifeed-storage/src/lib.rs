//! Namespaced storage for many hypercores under one root.
//!
//! A root holds an [index](FeedRecord) of its feeds, in creation order, and one namespace per feed
//! (`feeds/<ab>/<hex key>/{tree,data,bitfield,oplog}`) where hypercore keeps its files. The files
//! come from a [`StorageFactory`]: on disk ([`DiskFactory`], with a bounded pool of open file
//! descriptors), in memory ([`MemoryFactory`]), or any `random-access-storage` backend
//! ([`FnFactory`]).
//!
//! The index is an append-only log of checksummed records: a torn or corrupt record is detected
//! and skipped, and never hides the feeds listed before or after it. A feed whose namespace is
//! missing or damaged gives a typed error naming it when opened; the other feeds still open.
//! Writer names are local and never leave the machine; no replication secret is ever stored here.
//!
//! A clean close can leave a [lengths snapshot](LengthsSnapshot) of every feed, trusted at
//! the next open only for feeds whose files are exactly as it saw them.
//!
//! Every feed's `oplog` and `bitfield` stores are guarded against defects of hypercore 0.16's
//! reopen path (pending entries overwritten after a reopen, entries of an older header replayed,
//! replicated entries misdecoded, bitfield pages misplaced beyond 32,768 entries): with the guard,
//! a process killed at any write leaves feeds that reopen with every acknowledged entry, and
//! replicas reopen with exactly the blocks they held. The guard works on any backend.
//!
//! ```
//! # async_std::task::block_on(async {
//! use std::sync::Arc;
//! use multifeed_storage::{CoreOptions, Durability, FeedOrigin, MemoryFactory, RootStorage};
//!
//! let factory = Arc::new(MemoryFactory::new());
//! let (mut root, feeds, _) =
//!     RootStorage::open(factory.clone(), CoreOptions::default(), Durability::default()).await?;
//! assert!(feeds.is_empty());
//!
//! let signing_key = hypercore::generate_signing_key();
//! let key_pair = hypercore::PartialKeypair {
//!     public: signing_key.verifying_key(),
//!     secret: Some(signing_key),
//! };
//! let (record, mut core) = root.create_feed(key_pair, Some("notes".into()), FeedOrigin::Local).await?;
//! core.append(b"hello").await?;
//! drop(core);
//!
//! // Reopen the same root: the feed, its name and its entry are there.
//! let (root, feeds, _) =
//!     RootStorage::open(factory, CoreOptions::default(), Durability::default()).await?;
//! assert_eq!(feeds, vec![record.clone()]);
//! let mut core = root.open_feed(&record).await?;
//! assert_eq!(core.get(0).await?, Some(b"hello".to_vec()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod error;
mod factory;
mod index;
mod lengths;
pub use lengths::{
    write_lengths_snapshot, FileStamp, LengthsSnapshot, SnapshotEntry, SnapshotFeed,
    SnapshotLengths, LENGTHS_PATH,
};
mod oplog;
pub use oplog::oplog_tree_nodes;
mod root;
mod shared;
mod store;

pub use error::StorageError;
pub use factory::{BoxedStore, DiskFactory, FnFactory, MemoryFactory, StorageFactory};
pub use index::{FeedOrigin, FeedRecord, IndexRecovery, KeyMark, MAX_NAME_LEN};
pub use root::{
    namespace_for, CoreOptions, Durability, FeedOpener, KeyMarks, RestoredFeed, RootStorage,
    INDEX_PATH,
};
pub use shared::{ChangeHook, ChangeWatch, SharedCore};
pub use store::{DiskStore, FdPool, MemoryStore};

/// A 32-byte hypercore public key.
pub type FeedKey = [u8; 32];
