//! The namespaced root: the index plus one hypercore namespace per feed.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use hypercore::{CacheOptionsBuilder, Hypercore, HypercoreBuilder, PartialKeypair, Storage, Store};
use random_access_storage::RandomAccessError;

use crate::factory::{BoxedStore, StorageFactory};
use crate::index::{Entry, FeedIndex, FeedOrigin, FeedRecord, IndexRecovery, KeyMark};
use crate::oplog;
use crate::{FeedKey, StorageError};

/// Path of the index inside the root.
pub const INDEX_PATH: &str = "index";

/// When stored bytes reach stable storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// Acknowledged writes are in the OS page cache: they survive a killed process, not a power loss.
    #[default]
    Process,
    /// Also fsync at batch boundaries (each append batch, each index record, and on close).
    Sync,
}

/// Hypercore options passed through to every feed.
#[derive(Debug, Clone, Copy, Default)]
pub struct CoreOptions {
    /// Capacity of hypercore's merkle-tree node cache, in nodes; `None` keeps hypercore's default.
    pub node_cache_capacity: Option<u64>,
}

/// The namespace of a feed: `feeds/<first two hex digits>/<hex key>`.
pub fn namespace_for(key: &FeedKey) -> String {
    let hex = hex::encode(key);
    format!("feeds/{}/{}", &hex[..2], hex)
}

/// A multifeed root: the index of feeds and the factory that stores their hypercores.
#[derive(Debug)]
pub struct RootStorage {
    factory: Arc<dyn StorageFactory>,
    index: FeedIndex,
    options: CoreOptions,
    durability: Durability,
    marks: KeyMarks,
}

/// The keys the index marks: removed feeds (tombstones) and denied keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyMarks {
    /// Feeds removed and not allowed since: never added again.
    pub removed: std::collections::HashSet<FeedKey>,
    /// Keys never exchanged with peers until allowed.
    pub denied: std::collections::HashSet<FeedKey>,
}

impl KeyMarks {
    /// Whether `key` is removed or denied.
    pub fn blocks(&self, key: &FeedKey) -> bool {
        // Asked for every feed on every connection: most stores mark no key, and hashing one
        // into an empty set is most of the cost of a re-sync's filter.
        (!self.removed.is_empty() && self.removed.contains(key))
            || (!self.denied.is_empty() && self.denied.contains(key))
    }

    fn apply(&mut self, key: FeedKey, mark: KeyMark) {
        match mark {
            KeyMark::Removed => {
                self.removed.insert(key);
            }
            KeyMark::Denied => {
                self.denied.insert(key);
            }
            KeyMark::Allowed => {
                self.removed.remove(&key);
                self.denied.remove(&key);
            }
        }
    }
}

impl RootStorage {
    /// Opens the root, reading every valid index record, in creation order.
    pub async fn open(
        factory: Arc<dyn StorageFactory>,
        options: CoreOptions,
        durability: Durability,
    ) -> Result<(Self, Vec<FeedRecord>, IndexRecovery), StorageError> {
        let store = factory
            .open(INDEX_PATH)
            .await
            .map_err(|e| StorageError::io(INDEX_PATH, e))?;
        let (index, entries, mut recovery) = FeedIndex::load(store, INDEX_PATH).await?;
        // Entries apply in order: a removal drops the records before it, a record after it
        // (added again once allowed) counts.
        let mut records: Vec<FeedRecord> = Vec::new();
        let mut marks = KeyMarks::default();
        for entry in entries {
            match entry {
                Entry::Feed(record) => {
                    marks.removed.remove(&record.key);
                    records.push(record);
                }
                Entry::Mark(key, mark) => {
                    if mark == KeyMark::Removed {
                        records.retain(|record| record.key != key);
                    }
                    marks.apply(key, mark);
                }
            }
        }
        let mut root = Self {
            factory,
            index,
            options,
            durability,
            marks,
        };
        let restored = root.restore_orphans(&records).await?;
        records.extend(restored.iter().cloned());
        recovery.restored = restored;
        Ok((root, records, recovery))
    }

    /// Lists again every feed folder the index does not name (a damaged or lost index must not
    /// drop feeds, least of all local writers, whose secret key is in their folder). A folder
    /// is listed when its hypercore opens under the key its name says; a replica that holds no
    /// block is left out (nothing of it was verified, or it is a feed never recorded).
    async fn restore_orphans(
        &mut self,
        records: &[FeedRecord],
    ) -> Result<Vec<FeedRecord>, StorageError> {
        let named: std::collections::HashSet<&str> =
            records.iter().map(|r| r.namespace.as_str()).collect();
        let mut restored = Vec::new();
        for namespace in self.factory.feed_namespaces() {
            if named.contains(namespace.as_str()) {
                continue;
            }
            let Some(key) = namespace
                .rsplit('/')
                .next()
                .and_then(|hex| hex::decode(hex).ok())
                .and_then(|bytes| FeedKey::try_from(bytes).ok())
            else {
                continue;
            };
            if self.marks.removed.contains(&key) {
                // Removed, but its files outlived the removal (a kill in between, or a
                // replication still writing then): finish it.
                self.factory.remove_namespace(&namespace).await?;
                continue;
            }
            let mut record = FeedRecord {
                namespace: namespace.clone(),
                key,
                name: None,
                origin: FeedOrigin::Remote,
            };
            let Ok(core) = open_feed(&self.factory, self.options, &record).await else {
                continue;
            };
            let local = core.key_pair().secret.is_some();
            if !local && core.info().length == 0 {
                continue;
            }
            record.origin = if local {
                FeedOrigin::Local
            } else {
                FeedOrigin::Remote
            };
            drop(core);
            self.index.append(&record).await?;
            restored.push(record);
        }
        if !restored.is_empty() && self.durability == Durability::Sync {
            self.index.sync().await?;
        }
        Ok(restored)
    }

    /// The keys the index marks removed or denied.
    pub fn marks(&self) -> &KeyMarks {
        &self.marks
    }

    /// Records `mark` on `key` in the index (crash-safe, as feed records are).
    pub async fn mark(&mut self, key: &FeedKey, mark: KeyMark) -> Result<(), StorageError> {
        self.index.append_mark(key, mark).await?;
        if self.durability == Durability::Sync {
            self.index.sync().await?;
        }
        self.marks.apply(*key, mark);
        Ok(())
    }

    /// Removes a feed: first a tombstone in the index (so a crash after it never brings the
    /// feed back), then its files. Its hypercore must no longer be in use.
    pub async fn remove_feed(&mut self, record: &FeedRecord) -> Result<(), StorageError> {
        self.mark(&record.key, KeyMark::Removed).await?;
        self.factory.remove_namespace(&record.namespace).await
    }

    /// The factory behind this root.
    pub fn factory(&self) -> &Arc<dyn StorageFactory> {
        &self.factory
    }

    /// Creates the hypercore of a new feed and then lists it in the index.
    ///
    /// A local feed needs the secret key in `key_pair`; a remote one only the public key.
    /// If the index write fails, the feed is not listed and the error is returned.
    pub async fn create_feed(
        &mut self,
        key_pair: PartialKeypair,
        name: Option<String>,
        origin: FeedOrigin,
    ) -> Result<(FeedRecord, Hypercore), StorageError> {
        let key = key_pair.public.to_bytes();
        let record = FeedRecord {
            namespace: namespace_for(&key),
            key,
            name,
            origin,
        };
        if let Some(name) = &record.name {
            if name.len() > crate::MAX_NAME_LEN {
                return Err(StorageError::NameTooLong {
                    len: name.len(),
                    limit: crate::MAX_NAME_LEN,
                });
            }
        }
        self.factory.new_feed(&record.namespace);
        let storage = core_storage(&self.factory, &record, false).await?;
        let builder = builder(storage, self.options).key_pair(key_pair);
        let core = build_guarded(builder, &record).await?;
        self.index.append(&record).await?;
        self.marks.removed.remove(&key);
        if self.durability == Durability::Sync {
            self.index.sync().await?;
        }
        Ok((record, core))
    }

    /// Opens the hypercore of a feed the index lists.
    pub async fn open_feed(&self, record: &FeedRecord) -> Result<Hypercore, StorageError> {
        let (factory, options) = (self.factory.clone(), self.options);
        open_feed(&factory, options, record).await
    }

    /// A handle that opens feeds without borrowing the root (index writes need `&mut`).
    pub fn opener(&self) -> FeedOpener {
        FeedOpener {
            factory: self.factory.clone(),
            options: self.options,
        }
    }

    /// Flushes the index to stable storage.
    pub async fn sync(&mut self) -> Result<(), StorageError> {
        self.index.sync().await
    }
}

/// Opens listed feeds; cheap to clone, usable while the root is busy.
#[derive(Debug, Clone)]
pub struct FeedOpener {
    factory: Arc<dyn StorageFactory>,
    options: CoreOptions,
}

impl FeedOpener {
    /// Opens the hypercore of a feed the index lists.
    pub async fn open_feed(&self, record: &FeedRecord) -> Result<Hypercore, StorageError> {
        open_feed(&self.factory, self.options, record).await
    }

    /// Empties the namespace of a feed learned from a peer and starts it again, empty, under the
    /// same key: for a replica whose files a crash left unreadable. Its blocks can be fetched
    /// again from peers. Refused for local feeds, whose secret key would be lost.
    pub async fn reset_remote_feed(&self, record: &FeedRecord) -> Result<Hypercore, StorageError> {
        if record.origin != FeedOrigin::Remote {
            return Err(StorageError::FeedCorrupt {
                key: record.key,
                namespace: record.namespace.clone(),
                reason: "a local feed is never reset".to_owned(),
            });
        }
        for file in ["tree", "data", "bitfield", "oplog"] {
            let path = format!("{}/{}", record.namespace, file);
            let mut store = self
                .factory
                .open(&path)
                .await
                .map_err(|e| StorageError::io(&path, e))?;
            store
                .truncate(0)
                .await
                .map_err(|e| StorageError::io(&path, e))?;
        }
        let public = hypercore::VerifyingKey::from_bytes(&record.key).map_err(|e| {
            StorageError::FeedCorrupt {
                key: record.key,
                namespace: record.namespace.clone(),
                reason: e.to_string(),
            }
        })?;
        let storage = core_storage(&self.factory, record, false).await?;
        let key_pair = PartialKeypair {
            public,
            secret: None,
        };
        build_guarded(builder(storage, self.options).key_pair(key_pair), record).await
    }
}

/// The files of a feed's namespace, in the order hypercore's storage takes them.
const FEED_FILES: [&str; 4] = ["tree", "data", "bitfield", "oplog"];
/// Where a restored local feed keeps the files it was restored from.
const DAMAGED_DIR: &str = "damaged";

/// A local feed started again under its key after its files could not be opened
/// ([`FeedOpener::restore_local_feed`]).
#[derive(Debug)]
pub struct RestoredFeed {
    /// The new, empty hypercore; replication fills it from peers that hold the feed.
    pub core: Hypercore,
    /// Whether its secret key was found (in its oplog header, intact in one of two slots): it
    /// can append again once it holds its old signed length.
    pub writable: bool,
    /// The length the feed had signed before (from the same header), if it could be read:
    /// appends must wait until the feed holds that many entries again, or they would sign a
    /// second history of the same feed.
    pub signed_length: Option<u64>,
}

impl FeedOpener {
    /// Starts again, empty and under the same key, a local feed whose files cannot be opened
    /// (a lost or damaged oplog or tree): its entries can then come back from any peer holding
    /// them, which a feed that fails to open never could.
    ///
    /// Nothing is deleted: the four files are first copied to `<namespace>/damaged/` (once; a
    /// later restore keeps the first copy). The secret key and the signed length are read from
    /// the oplog's header slots, the copy's when the live one has none.
    pub async fn restore_local_feed(
        &self,
        record: &FeedRecord,
    ) -> Result<RestoredFeed, StorageError> {
        let oplog = self.keep_damaged_copy(record).await?;
        let copied = self.restored_header(record).await?;
        let facts = oplog::oplog_header_facts(&oplog)
            .filter(|facts| facts.public == record.key)
            .into_iter()
            .chain(copied)
            .collect::<Vec<_>>();
        let secret = facts
            .iter()
            .filter_map(|facts| facts.secret)
            .map(|bytes| hypercore::SigningKey::from_bytes(&bytes))
            .find(|secret| secret.verifying_key().to_bytes() == record.key);
        let signed_length = facts.iter().map(|facts| facts.length).max();
        for file in FEED_FILES {
            let path = format!("{}/{file}", record.namespace);
            self.open_store(&path)
                .await?
                .truncate(0)
                .await
                .map_err(|e| StorageError::io(&path, e))?;
        }
        let public =
            hypercore::VerifyingKey::from_bytes(&record.key).map_err(|e| corrupt(record, e))?;
        let writable = secret.is_some();
        let storage = core_storage(&self.factory, record, false).await?;
        let key_pair = PartialKeypair { public, secret };
        let core = build_guarded(builder(storage, self.options).key_pair(key_pair), record).await?;
        Ok(RestoredFeed {
            core,
            writable,
            signed_length,
        })
    }

    /// The length a restored local feed had signed before its restore (see
    /// [`restore_local_feed`](Self::restore_local_feed)), or `None` for a feed never restored
    /// (or whose old header is unreadable). Costs one lookup that creates nothing.
    pub async fn restored_length(&self, record: &FeedRecord) -> Result<Option<u64>, StorageError> {
        Ok(self
            .restored_header(record)
            .await?
            .map(|facts| facts.length))
    }

    /// Copies the feed's four files to `<namespace>/damaged/` (once: a later call keeps the
    /// first copy); returns the live oplog's bytes.
    async fn keep_damaged_copy(&self, record: &FeedRecord) -> Result<Vec<u8>, StorageError> {
        let keep_copy = !self
            .factory
            .holds(&format!("{}/{DAMAGED_DIR}/oplog", record.namespace));
        let mut oplog = Vec::new();
        for file in FEED_FILES {
            let path = format!("{}/{file}", record.namespace);
            let mut store = self.open_store(&path).await?;
            let bytes = read_all(&mut store, &path).await?;
            if keep_copy && !bytes.is_empty() {
                let copy_path = format!("{}/{DAMAGED_DIR}/{file}", record.namespace);
                let mut copy = self.open_store(&copy_path).await?;
                copy.truncate(0)
                    .await
                    .map_err(|e| StorageError::io(&copy_path, e))?;
                copy.write(0, &bytes)
                    .await
                    .map_err(|e| StorageError::io(&copy_path, e))?;
                copy.sync_all()
                    .await
                    .map_err(|e| StorageError::io(&copy_path, e))?;
            }
            if file == "oplog" {
                oplog = bytes;
            }
        }
        Ok(oplog)
    }

    /// Before a local feed is opened: if its oplog logs appends after a damaged entry (which
    /// opening cuts, hiding them), keeps a copy of its files in `damaged/` so the length they
    /// record survives the cut; [`restored_length`](Self::restored_length) then reports it.
    /// Returns that length. Reads the oplog once (it holds only the entries since the last
    /// header).
    pub async fn keep_entries_lost_to_damage(
        &self,
        record: &FeedRecord,
    ) -> Result<Option<u64>, StorageError> {
        // A factory whose second open may give another store cannot be read beside hypercore.
        if !self.factory.reopens_same_store() {
            return Ok(None);
        }
        let path = format!("{}/oplog", record.namespace);
        let mut store = self.open_store(&path).await?;
        let content = read_all(&mut store, &path).await?;
        let Some(lost) = oplog::length_lost_to_damage(&content) else {
            return Ok(None);
        };
        self.keep_damaged_copy(record).await?;
        Ok(Some(lost))
    }

    async fn restored_header(
        &self,
        record: &FeedRecord,
    ) -> Result<Option<oplog::HeaderFacts>, StorageError> {
        let path = format!("{}/{DAMAGED_DIR}/oplog", record.namespace);
        if !self.factory.holds(&path) {
            return Ok(None);
        }
        let mut store = self.open_store(&path).await?;
        let bytes = read_all(&mut store, &path).await?;
        let lost = oplog::length_lost_to_damage(&bytes);
        Ok(oplog::oplog_header_facts(&bytes)
            .filter(|facts| facts.public == record.key)
            .map(|mut facts| {
                facts.length = facts.length.max(lost.unwrap_or(0));
                facts
            }))
    }

    async fn open_store(&self, path: &str) -> Result<BoxedStore, StorageError> {
        self.factory
            .open(path)
            .await
            .map_err(|e| StorageError::io(path, e))
    }
}

async fn read_all(store: &mut BoxedStore, path: &str) -> Result<Vec<u8>, StorageError> {
    let len = store.len().await.map_err(|e| StorageError::io(path, e))?;
    if len == 0 {
        return Ok(Vec::new());
    }
    store
        .read(0, len)
        .await
        .map_err(|e| StorageError::io(path, e))
}

fn corrupt(record: &FeedRecord, err: impl std::fmt::Display) -> StorageError {
    StorageError::FeedCorrupt {
        key: record.key,
        namespace: record.namespace.clone(),
        reason: err.to_string(),
    }
}

async fn open_feed(
    factory: &Arc<dyn StorageFactory>,
    options: CoreOptions,
    record: &FeedRecord,
) -> Result<Hypercore, StorageError> {
    let storage = core_storage(factory, record, true).await?;
    let core = build_guarded(builder(storage, options).open(true), record).await?;
    let found = core.key_pair().public.to_bytes();
    if found != record.key {
        return Err(StorageError::FeedKeyMismatch {
            namespace: record.namespace.clone(),
            expected: record.key,
            found,
        });
    }
    Ok(core)
}

fn builder(storage: Storage, options: CoreOptions) -> HypercoreBuilder {
    let builder = HypercoreBuilder::new(storage);
    match options.node_cache_capacity {
        Some(capacity) => {
            builder.node_cache_options(CacheOptionsBuilder::new().max_capacity(capacity))
        }
        None => builder,
    }
}

/// Builds a hypercore, turning its errors and panics on damaged files into typed errors.
async fn build_guarded(
    builder: HypercoreBuilder,
    record: &FeedRecord,
) -> Result<Hypercore, StorageError> {
    match AssertUnwindSafe(builder.build()).catch_unwind().await {
        Ok(Ok(core)) => Ok(core),
        // A failed read or write (out of descriptors, a full disk) says nothing about the
        // files: never report it as corruption (a replica would be reset for it).
        Ok(Err(err @ hypercore::HypercoreError::IO { .. })) => Err(StorageError::Hypercore {
            namespace: record.namespace.clone(),
            source: err,
        }),
        Ok(Err(err)) => Err(StorageError::FeedCorrupt {
            key: record.key,
            namespace: record.namespace.clone(),
            reason: err.to_string(),
        }),
        Err(_) => Err(StorageError::FeedCorrupt {
            key: record.key,
            namespace: record.namespace.clone(),
            reason: "hypercore panicked while reading it".to_owned(),
        }),
    }
}

/// The four stores of a feed's namespace, as a hypercore `Storage`.
async fn core_storage(
    factory: &Arc<dyn StorageFactory>,
    record: &FeedRecord,
    must_exist: bool,
) -> Result<Storage, StorageError> {
    if record.origin == FeedOrigin::Remote {
        factory.replica(&record.namespace);
    }
    let mut stores: [Option<BoxedStore>; 4] = [None, None, None, None];
    for (slot, file) in stores.iter_mut().zip(["tree", "data", "bitfield", "oplog"]) {
        let path = format!("{}/{}", record.namespace, file);
        *slot = Some(
            factory
                .open(&path)
                .await
                .map_err(|e| StorageError::io(&path, e))?,
        );
    }
    // Hypercore 0.16 misreads oplogs and bitfields it wrote itself; see the `oplog` module.
    let oplog_path = format!("{}/oplog", record.namespace);
    if let (Some(bitfield), Some(oplog)) = (stores[2].take(), stores[3].take()) {
        let (bitfield, oplog) = oplog::guard(bitfield, oplog)
            .await
            .map_err(|e| StorageError::io(&oplog_path, e))?;
        stores[2] = Some(Box::new(bitfield));
        stores[3] = Some(Box::new(oplog));
    }
    if must_exist {
        let oplog = stores[3].as_mut().ok_or_else(|| missing(record))?;
        let len = oplog
            .len()
            .await
            .map_err(|e| StorageError::io(&oplog_path, e))?;
        if len == 0 {
            return Err(missing(record));
        }
    }
    let slots = Mutex::new(stores);
    let take = |store: Store| {
        let slot = match store {
            Store::Tree => 0,
            Store::Data => 1,
            Store::Bitfield => 2,
            Store::Oplog => 3,
        };
        let taken = slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())[slot]
            .take();
        async move {
            taken
                .ok_or_else(|| RandomAccessError::from(std::io::Error::other("store opened twice")))
        }
        .boxed()
    };
    Storage::open(take, false)
        .await
        .map_err(|source| StorageError::Hypercore {
            namespace: record.namespace.clone(),
            source,
        })
}

fn missing(record: &FeedRecord) -> StorageError {
    StorageError::FeedMissing {
        key: record.key,
        namespace: record.namespace.clone(),
    }
}
