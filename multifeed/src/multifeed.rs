//! The `Multifeed` type: a set of feeds under one root.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hypercore::{generate_signing_key, PartialKeypair, SigningKey, VerifyingKey};
use multifeed_storage::{
    FeedKey, FeedOpener, FeedOrigin, IndexRecovery, RootStorage, SharedCore, StorageFactory,
};

use crate::builder::{Config, MultifeedBuilder};
use crate::feed::{CoreState, Feed, FeedSlot};
use crate::{Error, Event, Events};

/// Many hypercores, by many authors, stored together under one root.
///
/// Cheap to clone: clones share the same feeds. See the [crate docs](crate) for an example.
#[derive(Debug, Clone)]
pub struct Multifeed {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    /// The index writer; `None` once closed. Its lock also serializes feed creation.
    pub(crate) root: async_lock::Mutex<Option<RootStorage>>,
    opener: FeedOpener,
    /// The index's removed and denied keys, for the replication filters (kept in step with
    /// the root's).
    pub(crate) marks: RwLock<multifeed_storage::KeyMarks>,
    pub(crate) factory: Arc<dyn StorageFactory>,
    table: RwLock<FeedTable>,
    events: async_broadcast::Sender<Event>,
    _events_open: async_broadcast::InactiveReceiver<Event>,
    closed: AtomicBool,
    recovery: IndexRecovery,
    pub(crate) config: Config,
    /// Replications running on this multifeed; `close` ends them.
    pub(crate) replications: crate::running::Running,
    /// The number the next replication gets in its peer events.
    pub(crate) next_connection: std::sync::atomic::AtomicU64,
    /// The advisory lock on a disk root; released by `close`.
    lock: std::sync::Mutex<Option<std::fs::File>>,
}

#[derive(Debug, Default)]
pub(crate) struct FeedTable {
    list: Vec<Arc<FeedSlot>>,
    by_key: HashMap<FeedKey, usize>,
    by_name: HashMap<String, usize>,
    /// Feeds learned from peers.
    remote: usize,
}

impl FeedTable {
    /// Takes the feed `key` out of the table (its slot stays with whoever holds it).
    pub(crate) fn remove(&mut self, key: &FeedKey) -> Option<Arc<FeedSlot>> {
        let at = self.by_key.remove(key)?;
        let slot = self.list.remove(at);
        if slot.record.origin == FeedOrigin::Remote {
            self.remote -= 1;
        }
        let list = std::mem::take(&mut self.list);
        *self = Self::default();
        for kept in list {
            self.insert(kept);
        }
        Some(slot)
    }

    fn insert(&mut self, slot: Arc<FeedSlot>) {
        let at = self.list.len();
        if slot.record.origin == FeedOrigin::Remote {
            self.remote += 1;
        }
        self.by_key.insert(slot.record.key, at);
        if let Some(name) = &slot.record.name {
            self.by_name.entry(name.clone()).or_insert(at);
        }
        self.list.push(slot);
    }
}

impl Multifeed {
    /// A builder for a multifeed with options (storage, value encoding, durability, ...).
    pub fn builder() -> MultifeedBuilder {
        MultifeedBuilder::default()
    }

    /// Opens (or creates) a multifeed stored in the directory `path`.
    pub async fn open_disk(path: impl Into<std::path::PathBuf>) -> Result<Self, Error> {
        Self::builder().disk(path).open().await
    }

    /// Creates a multifeed kept in memory.
    pub async fn open_memory() -> Result<Self, Error> {
        Self::builder().memory().open().await
    }

    pub(crate) async fn from_config(
        factory: Arc<dyn StorageFactory>,
        config: Config,
        lock: Option<std::fs::File>,
    ) -> Result<Self, Error> {
        let (root, records, recovery) =
            RootStorage::open(factory.clone(), config.core_options, config.durability).await?;
        let mut table = FeedTable::default();
        for record in records {
            if !table.by_key.contains_key(&record.key) {
                table.insert(Arc::new(FeedSlot::new(record, CoreState::Unopened)));
            }
        }
        let (mut events, receiver) = async_broadcast::broadcast(config.event_capacity.max(1));
        events.set_overflow(true);
        events.set_await_active(false);
        let inner = Inner {
            marks: RwLock::new(root.marks().clone()),
            opener: root.opener(),
            root: async_lock::Mutex::new(Some(root)),
            factory,
            table: RwLock::new(table),
            events,
            _events_open: receiver.deactivate(),
            closed: AtomicBool::new(false),
            recovery,
            config,
            replications: crate::running::Running::default(),
            next_connection: std::sync::atomic::AtomicU64::new(0),
            lock: std::sync::Mutex::new(lock),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The local writable feed called `name`, created on first use.
    ///
    /// The same name always gives the same feed, across restarts and concurrent calls.
    pub async fn writer(&self, name: &str) -> Result<Feed, Error> {
        self.inner.ensure_open()?;
        if let Some(feed) = self.by_name(name) {
            return Ok(feed);
        }
        let mut root = self.inner.root.lock().await;
        if let Some(feed) = self.by_name(name) {
            return Ok(feed);
        }
        let root = root.as_mut().ok_or(Error::Closed)?;
        let signing_key = generate_signing_key();
        self.create(
            root,
            key_pair(signing_key),
            Some(name.to_owned()),
            FeedOrigin::Local,
        )
        .await
    }

    /// The local writable feed called `name`, created from `signing_key` on first use.
    ///
    /// Fails with [`Error::AlreadyExists`] if the name belongs to a feed with another key, or the
    /// key to a feed with another name.
    pub async fn writer_with_keypair(
        &self,
        name: &str,
        signing_key: SigningKey,
    ) -> Result<Feed, Error> {
        self.inner.ensure_open()?;
        let key = signing_key.verifying_key().to_bytes();
        let mut root = self.inner.root.lock().await;
        if let Some(feed) = self.by_name(name) {
            return if feed.key() == &key {
                Ok(feed)
            } else {
                Err(Error::AlreadyExists {
                    what: format!("a writer named `{name}` with another key"),
                })
            };
        }
        if self.by_key(&key).is_some() {
            return Err(Error::AlreadyExists {
                what: format!("feed {}", hex::encode(key)),
            });
        }
        let root = root.as_mut().ok_or(Error::Closed)?;
        self.create(
            root,
            key_pair(signing_key),
            Some(name.to_owned()),
            FeedOrigin::Local,
        )
        .await
    }

    /// A new local writable feed with no name: a different feed on every call.
    pub async fn anonymous_writer(&self) -> Result<Feed, Error> {
        self.inner.ensure_open()?;
        let mut root = self.inner.root.lock().await;
        let root = root.as_mut().ok_or(Error::Closed)?;
        self.create(
            root,
            key_pair(generate_signing_key()),
            None,
            FeedOrigin::Local,
        )
        .await
    }

    /// Adds a read-only feed known by its key (as replication does), or returns the existing one.
    pub async fn add_remote_feed(&self, key: &FeedKey) -> Result<Feed, Error> {
        self.inner.ensure_open()?;
        if let Some(feed) = self.by_key(key) {
            return Ok(feed);
        }
        if self.inner.marks().blocks(key) {
            return Err(Error::Denied { key: *key });
        }
        let public = VerifyingKey::from_bytes(key).map_err(|_| Error::InvalidKey {
            input: hex::encode(key),
            reason: "not a valid ed25519 public key",
        })?;
        let mut root = self.inner.root.lock().await;
        if let Some(feed) = self.by_key(key) {
            return Ok(feed);
        }
        let root = root.as_mut().ok_or(Error::Closed)?;
        let limit = self.inner.config.max_remote_feeds;
        if self.inner.table().remote >= limit {
            return Err(Error::TooManyFeeds { limit });
        }
        let key_pair = PartialKeypair {
            public,
            secret: None,
        };
        self.create(root, key_pair, None, FeedOrigin::Remote).await
    }

    async fn create(
        &self,
        root: &mut RootStorage,
        key_pair: PartialKeypair,
        name: Option<String>,
        origin: FeedOrigin,
    ) -> Result<Feed, Error> {
        let (record, core) = root.create_feed(key_pair, name, origin).await?;
        self.inner.marks_mut().removed.remove(&record.key);
        let core = SharedCore::new(core);
        let slot = Arc::new(FeedSlot::new(record.clone(), CoreState::Open(core)));
        self.inner.table_mut().insert(slot.clone());
        let _ = self.inner.events.try_broadcast(Event::Feed {
            key: record.key,
            name: record.name,
            origin: record.origin,
        });
        Ok(Feed::new(slot, self.inner.clone()))
    }

    /// Every feed, in a stable order: creation or arrival.
    pub fn feeds(&self) -> Vec<Feed> {
        self.inner
            .table()
            .list
            .iter()
            .map(|slot| Feed::new(slot.clone(), self.inner.clone()))
            .collect()
    }

    /// The feed with this key: 32 raw bytes, or 64 hex characters.
    ///
    /// Returns `Ok(None)` if no such feed is here, and [`Error::InvalidKey`] for malformed input.
    pub fn feed(&self, key: impl AsRef<[u8]>) -> Result<Option<Feed>, Error> {
        let key = parse_key(key.as_ref())?;
        Ok(self.by_key(&key))
    }

    /// A stream of events: feeds added, replication progress.
    pub fn events(&self) -> Events {
        Events {
            receiver: self.inner.events.new_receiver(),
        }
    }

    /// What loading the index found damaged (empty after a clean shutdown).
    pub fn index_recovery(&self) -> &IndexRecovery {
        &self.inner.recovery
    }

    /// Flushes every write so far to stable storage (fsync on disk), whatever the durability
    /// option: after it returns, the data survives a power loss.
    pub async fn flush(&self) -> Result<(), Error> {
        self.inner.ensure_open()?;
        {
            let mut root = self.inner.root.lock().await;
            if let Some(root) = root.as_mut() {
                root.sync().await?;
            }
        }
        self.inner.factory.sync_all().await?;
        Ok(())
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Closes every feed and file. Calling it again, or concurrently, is fine.
    ///
    /// Any later use of this multifeed or its feeds fails with [`Error::Closed`].
    pub async fn close(&self) -> Result<(), Error> {
        self.inner.closed.store(true, Ordering::SeqCst);
        // No replication writes once this returns: each is ended and waited for.
        self.inner.replications.end_all().await;
        let root = self.inner.root.lock().await.take();
        let mut result = Ok(());
        if let Some(mut root) = root {
            if self.inner.config.durability == multifeed_storage::Durability::Sync {
                result = root.sync().await.map_err(Error::from);
                if result.is_ok() {
                    result = self.inner.factory.sync_all().await.map_err(Error::from);
                }
            }
        }
        let slots: Vec<Arc<FeedSlot>> = self.inner.table().list.clone();
        for slot in slots {
            let state = std::mem::replace(&mut *slot.core.lock().await, CoreState::Closed);
            // Wakes whoever waits for entries (live streams, wait_for_len): they see Closed.
            if let CoreState::Open(core) = state {
                core.notify_changed();
            }
        }
        self.inner.factory.release();
        self.inner.events.close();
        // Another handle or process may open the root from here on.
        *self
            .inner
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        result
    }

    fn by_name(&self, name: &str) -> Option<Feed> {
        let table = self.inner.table();
        let at = *table.by_name.get(name)?;
        let slot = table.list.get(at)?.clone();
        Some(Feed::new(slot, self.inner.clone()))
    }

    pub(crate) fn by_key(&self, key: &FeedKey) -> Option<Feed> {
        let table = self.inner.table();
        let at = *table.by_key.get(key)?;
        let slot = table.list.get(at)?.clone();
        Some(Feed::new(slot, self.inner.clone()))
    }
}

impl Inner {
    pub(crate) fn ensure_open(&self) -> Result<(), Error> {
        if self.closed.load(Ordering::SeqCst) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// The feed's hypercore, opened on first use.
    pub(crate) async fn core(&self, slot: &FeedSlot) -> Result<SharedCore, Error> {
        self.ensure_open()?;
        let mut state = slot.core.lock().await;
        match &*state {
            CoreState::Open(core) => Ok(core.clone()),
            CoreState::Closed => Err(Error::Closed),
            CoreState::Unopened => {
                // On the heap: opening, resetting and restoring are large futures, and this one
                // is awaited deep inside every replication (debug builds overflowed a stack).
                let core = match Box::pin(self.opener.open_feed(&slot.record)).await {
                    Ok(core) => core,
                    // A replica a crash left unreadable is only a copy: start it again empty
                    // and let replication fetch it anew.
                    Err(
                        err @ (multifeed_storage::StorageError::FeedCorrupt { .. }
                        | multifeed_storage::StorageError::FeedMissing { .. }),
                    ) if slot.record.origin == FeedOrigin::Remote => {
                        let core = Box::pin(self.opener.reset_remote_feed(&slot.record)).await?;
                        self.emit(Event::FeedReset {
                            key: slot.record.key,
                            reason: err.to_string(),
                        });
                        core
                    }
                    // A local feed cannot be fetched anew under a new key: it starts again
                    // under its own, its old files kept, and peers holding it fill it.
                    Err(
                        err @ (multifeed_storage::StorageError::FeedCorrupt { .. }
                        | multifeed_storage::StorageError::FeedMissing { .. }),
                    ) => {
                        let restored =
                            Box::pin(self.opener.restore_local_feed(&slot.record)).await?;
                        let _ = slot.restored_length.set(restored.signed_length);
                        self.emit(Event::FeedRestored {
                            key: slot.record.key,
                            reason: err.to_string(),
                            writable: restored.writable,
                            signed_length: restored.signed_length,
                        });
                        restored.core
                    }
                    Err(err) => return Err(err.into()),
                };
                if slot.record.origin == FeedOrigin::Local {
                    slot.read_only.store(
                        core.key_pair().secret.is_none(),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                if slot.record.origin == FeedOrigin::Local && slot.restored_length.get().is_none() {
                    let restored = Box::pin(self.opener.restored_length(&slot.record)).await?;
                    let _ = slot.restored_length.set(restored);
                }
                let core = SharedCore::new(core);
                *state = CoreState::Open(core.clone());
                Ok(core)
            }
        }
    }

    /// Whether `value`, read as block `index` of the slot's feed, is what the feed's tree
    /// records for it: its leaf node (length and BLAKE2b hash), from the tree store, else the
    /// stored oplog, else the proof of the block's sibling (hypercore's memory).
    ///
    /// Not checked (true): stores that cannot be read beside the hypercore (custom factories),
    /// and a leaf none of the three shows (a last-written block whose sibling is gone too).
    pub(crate) async fn block_matches_tree(
        &self,
        slot: &FeedSlot,
        core: &mut hypercore::Hypercore,
        index: u64,
        value: &[u8],
    ) -> bool {
        if !self.factory.reopens_same_store() {
            return true;
        }
        let mut tree = slot.tree.lock().await;
        if tree.is_none() {
            let path = format!("{}/tree", slot.record.namespace);
            match self.factory.open(&path).await {
                Ok(store) => *tree = Some(store),
                // Not readable now: the block cannot be judged, and is not blamed.
                Err(_) => return true,
            }
        }
        let Some(store) = tree.as_mut() else {
            return true;
        };
        // Leaf `index` is tree node 2 * index: 8 bytes of length (LE), then the 32-byte hash.
        let Some(offset) = index.checked_mul(80) else {
            return false;
        };
        let hash = hypercore_schema::Hash::data(value);
        // Past the end of the tree file, or zeros (hypercore writes nodes out of order, so a
        // leaf not written yet can sit before others): look elsewhere.
        let leaf = read_node(store, 2 * index).await;
        if let Some((length, digest)) = leaf {
            if (length != value.len() as u64 || digest[..] != *hash.as_bytes())
                && leaf_damaged(store, index, value, &hash).await
            {
                // The block is right and its stored leaf is not: write the leaf again, so
                // the block is served and read as what it is (was: dropped as damaged, and
                // found damaged again after every fetch, since its leaf stayed wrong).
                let mut node = (value.len() as u64).to_le_bytes().to_vec();
                node.extend_from_slice(hash.as_bytes());
                return store.write(offset, &node).await.is_ok();
            }
        }
        drop(tree);
        // Not in the tree file yet: hypercore 0.16 keeps the nodes of its latest writes in its
        // oplog until it next writes the tree.
        let leaf = match leaf {
            Some(leaf) => Some(leaf),
            None => match self.oplog_leaf(slot, 2 * index).await {
                Some(leaf) => Some(leaf),
                // Or only in hypercore's memory (after it rewrote its oplog at open): the proof
                // of the block's sibling carries this block's leaf as its first node.
                None => sibling_leaf(core, index).await,
            },
        };
        match leaf {
            Some((length, digest)) => {
                length == value.len() as u64 && digest[..] == *hash.as_bytes()
            }
            // Recorded nowhere we can read: not judged.
            None => true,
        }
    }

    /// The leaf node `flat` as the feed's stored oplog records it, if it does.
    ///
    /// (See also [`sibling_leaf`], for leaves only hypercore's memory holds.)
    async fn oplog_leaf(&self, slot: &FeedSlot, flat: u64) -> Option<(u64, [u8; 32])> {
        let path = format!("{}/oplog", slot.record.namespace);
        let mut store = self.factory.open(&path).await.ok()?;
        let len = store.len().await.ok()?;
        let content = store.read(0, len).await.ok()?;
        multifeed_storage::oplog_tree_nodes(&content)
            .into_iter()
            .rev()
            .find(|(index, _, _)| *index == flat)
            .map(|(_, length, hash)| (length, hash))
    }

    pub(crate) fn marks(&self) -> RwLockReadGuard<'_, multifeed_storage::KeyMarks> {
        // Every write is a single insert or removal.
        self.marks
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn marks_mut(&self) -> std::sync::RwLockWriteGuard<'_, multifeed_storage::KeyMarks> {
        self.marks
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn table(&self) -> RwLockReadGuard<'_, FeedTable> {
        // Every write to the table is a single insert that cannot leave it half-done.
        self.table
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn table_mut(&self) -> RwLockWriteGuard<'_, FeedTable> {
        self.table
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn new_event_receiver(&self) -> async_broadcast::Receiver<Event> {
        self.events.new_receiver()
    }

    /// Flushes to stable storage after a batch, if the durability option asks for it.
    pub(crate) async fn sync_after_batch(&self) -> Result<(), Error> {
        if self.config.durability == multifeed_storage::Durability::Sync {
            self.factory.sync_all().await.map_err(Error::from)?;
        }
        Ok(())
    }

    pub(crate) fn emit(&self, event: Event) {
        let _ = self.events.try_broadcast(event);
    }
}

fn key_pair(signing_key: SigningKey) -> PartialKeypair {
    PartialKeypair {
        public: signing_key.verifying_key(),
        secret: Some(signing_key),
    }
}

/// Parses 32 raw bytes or 64 hex characters into a key.
pub(crate) fn parse_key(input: &[u8]) -> Result<FeedKey, Error> {
    let shown = || {
        let text = String::from_utf8_lossy(input);
        text.chars().take(80).collect::<String>()
    };
    match input.len() {
        32 => Ok(input.try_into().unwrap_or([0; 32])),
        64 => {
            let mut key = [0u8; 32];
            hex::decode_to_slice(input, &mut key).map_err(|_| Error::InvalidKey {
                input: shown(),
                reason: "not hexadecimal",
            })?;
            Ok(key)
        }
        _ => Err(Error::InvalidKey {
            input: shown(),
            reason: "expected 32 bytes or 64 hex characters",
        }),
    }
}

/// The leaf of block `index` as the core itself knows it: the first node of a proof for the
/// block next to it in the tree (whose sibling it is). `None` when that block is not held.
/// Tree node `flat` as the tree file stores it (length, hash); `None` past its end or zeros.
async fn read_node(
    store: &mut multifeed_storage::BoxedStore,
    flat: u64,
) -> Option<(u64, [u8; 32])> {
    let node = store.read(flat.checked_mul(40)?, 40).await.ok()?;
    if node.len() != 40 || node.iter().all(|&byte| byte == 0) {
        return None;
    }
    let length = u64::from_le_bytes(node[..8].try_into().ok()?);
    Some((length, node[8..].try_into().ok()?))
}

/// Whether block `index` (`value`, hashing to `hash`) is proven right by its stored sibling and
/// parent: its stored leaf, which disagrees, is then the damaged part. Random damage cannot
/// make the recomputed parent match; an unreadable sibling or parent proves nothing (false).
async fn leaf_damaged(
    store: &mut multifeed_storage::BoxedStore,
    index: u64,
    value: &[u8],
    hash: &hypercore_schema::Hash,
) -> bool {
    let leaf = 2 * index;
    let (sibling, parent) = if index.is_multiple_of(2) {
        (leaf + 2, leaf + 1)
    } else {
        (leaf - 2, leaf - 1)
    };
    let (Some((sibling_length, sibling_hash)), Some((parent_length, parent_hash))) = (
        read_node(store, sibling).await,
        read_node(store, parent).await,
    ) else {
        return false;
    };
    let ours = hypercore_schema::Node::new(leaf, hash.as_bytes().to_vec(), value.len() as u64);
    let theirs = hypercore_schema::Node::new(sibling, sibling_hash.to_vec(), sibling_length);
    parent_length == value.len() as u64 + sibling_length
        && hypercore_schema::Hash::parent(&ours, &theirs).as_bytes() == parent_hash
}

async fn sibling_leaf(core: &mut hypercore::Hypercore, index: u64) -> Option<(u64, [u8; 32])> {
    use futures::FutureExt;
    let sibling = index ^ 1;
    if sibling >= core.info().length || !core.has(sibling) {
        return None;
    }
    let request = hypercore_schema::RequestBlock {
        index: sibling,
        nodes: 1,
    };
    let proof = std::panic::AssertUnwindSafe(core.create_proof(Some(request), None, None, None))
        .catch_unwind()
        .await
        .ok()?
        .ok()??;
    let node = proof.block?.nodes.into_iter().next()?;
    if node.index != 2 * index || node.hash.len() != 32 {
        return None;
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&node.hash);
    Some((node.length, hash))
}

#[cfg(test)]
mod tests {
    use super::sibling_leaf;

    #[test]
    fn a_sibling_proof_carries_the_leaf_of_the_block() {
        async_std::task::block_on(async {
            let storage = hypercore::Storage::new_memory().await.expect("storage");
            let mut core = hypercore::HypercoreBuilder::new(storage)
                .build()
                .await
                .expect("core");
            let blocks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10 + i as usize]).collect();
            for block in &blocks {
                core.append(block).await.expect("append");
            }
            for (index, block) in blocks.iter().enumerate().take(4) {
                let (length, hash) = sibling_leaf(&mut core, index as u64)
                    .await
                    .unwrap_or_else(|| panic!("a leaf for block {index}"));
                assert_eq!(length, block.len() as u64);
                assert_eq!(&hash[..], hypercore_schema::Hash::data(block).as_bytes());
            }
            // The last block, with no sibling yet, cannot be judged this way.
            assert!(sibling_leaf(&mut core, 4).await.is_none());
        });
    }
}
