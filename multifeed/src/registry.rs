//! The feed registry: the table of feeds a multifeed holds, each feed's slot (record, lazily
//! opened hypercore, restore state), and the state both `Multifeed` and `Feed` share.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use multifeed_storage::{
    FeedKey, FeedOpener, FeedOrigin, FeedRecord, IndexRecovery, RootStorage, SharedCore,
    StorageFactory,
};

use crate::builder::Config;
use crate::{Error, Event};

/// Whether a feed's hypercore is open.
pub(crate) enum CoreState {
    Unopened,
    Open(SharedCore),
    Closed,
}

impl fmt::Debug for CoreState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unopened => "Unopened",
            Self::Open(_) => "Open",
            Self::Closed => "Closed",
        })
    }
}

/// One feed as the multifeed holds it: its record and, once used, its open hypercore.
///
/// Laid out by hand: listing a large store's feeds reads, of every slot, its key, discovery
/// key, `idle_closed` and `closed_lengths`, and these come first, in the slot's first two
/// cache lines (scattered among the other fields, they were most of a re-sync's listing).
#[derive(Debug)]
#[repr(C, align(64))]
pub(crate) struct FeedSlot {
    /// The feed's key (as in `record`).
    key: FeedKey,
    pub(crate) discovery_key: [u8; 32],
    /// Whether the core is closed to free memory now, or was never opened but its lengths are
    /// known from the lengths snapshot of the last clean close (set and cleared under the
    /// core's lock), so listing feeds reads `closed_lengths` without taking that lock.
    pub(crate) idle_closed: AtomicBool,
    /// The length and contiguous length its core had when it was closed to free memory
    /// (nothing changes a closed core), so the replication's feed list needs no open.
    /// Lock-free: listing a large store reads it for every feed, and a lock per feed was a
    /// third of the listing.
    closed_lengths: ClosedLengths,
    pub(crate) record: FeedRecord,
    pub(crate) core: async_lock::Mutex<CoreState>,
    /// A second handle on the feed's tree store, to check blocks read against their leaves.
    pub(crate) tree: async_lock::Mutex<Option<multifeed_storage::BoxedStore>>,
    /// A restored local feed's old signed length (`Some(None)`: not restored), read when its
    /// core is opened.
    pub(crate) restored_length: std::sync::OnceLock<Option<u64>>,
    /// A local feed whose core has no secret key (restored after its oplog was lost).
    pub(crate) read_only: std::sync::atomic::AtomicBool,
    /// Used since the open-core bound last looked at it (a second chance before closing).
    pub(crate) used: AtomicBool,
    /// Whether its core was opened in this process (with the checks of a first open).
    pub(crate) opened: AtomicBool,
    /// Its entry in the lengths snapshot, checked against its files, while its core was not
    /// opened in this process (carried to the next snapshot at close).
    snapshot_entry: std::sync::Mutex<Option<multifeed_storage::SnapshotEntry>>,
}

impl FeedSlot {
    /// The feed's key.
    pub(crate) fn key(&self) -> &FeedKey {
        &self.key
    }

    pub(crate) fn new(record: FeedRecord, core: CoreState) -> Self {
        // A feed created open (a new writer, a feed just learned) was opened in this process.
        let opened = matches!(core, CoreState::Open(_));
        Self {
            key: record.key,
            discovery_key: hypercore_protocol::discovery_key(&record.key),
            idle_closed: AtomicBool::new(false),
            closed_lengths: ClosedLengths::default(),
            record,
            core: async_lock::Mutex::new(core),
            tree: async_lock::Mutex::new(None),
            restored_length: std::sync::OnceLock::new(),
            read_only: std::sync::atomic::AtomicBool::new(false),
            used: AtomicBool::new(true),
            opened: AtomicBool::new(opened),
            snapshot_entry: std::sync::Mutex::new(None),
        }
    }

    /// Its lengths are known without opening its core: the last clean close's snapshot has
    /// them, and its files are as that close left them. Only for a core never opened in this
    /// process (checked under the core's lock: a core opening now has changed nothing yet).
    fn trust_snapshot(&self, entry: multifeed_storage::SnapshotEntry) {
        let Some(state) = self.core.try_lock() else {
            return;
        };
        if !matches!(*state, CoreState::Unopened) || self.opened.load(Ordering::Acquire) {
            return;
        }
        self.closed_lengths
            .set(entry.lengths.length, entry.lengths.contiguous_length);
        *self
            .snapshot_entry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(entry);
        self.idle_closed.store(true, Ordering::Release);
    }

    /// Its checked snapshot entry, while its core was never opened in this process.
    pub(crate) fn snapshot_entry(&self) -> Option<multifeed_storage::SnapshotEntry> {
        if self.opened.load(Ordering::Acquire) {
            return None;
        }
        *self
            .snapshot_entry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The length and contiguous length a closed core had, written (under the core's lock) before
/// `idle_closed` is set and read after it is seen set. A reader racing a later close may see
/// that close's lengths, which are as true; the contiguous length is read first and never
/// reported above the length.
#[derive(Debug, Default)]
struct ClosedLengths {
    length: AtomicU64,
    contiguous: AtomicU64,
}

impl ClosedLengths {
    fn set(&self, length: u64, contiguous: u64) {
        self.length.store(length, Ordering::Relaxed);
        self.contiguous.store(contiguous, Ordering::Release);
    }

    fn get(&self) -> (u64, u64) {
        let contiguous = self.contiguous.load(Ordering::Acquire);
        let length = self.length.load(Ordering::Relaxed);
        (length, contiguous.min(length))
    }
}

/// A core's length and the entries it holds from 0 without a gap, counted by its bitfield
/// (hypercore 0.16's own contiguous length can claim blocks a lost bitfield no longer has).
pub(crate) fn held_lengths(core: &hypercore::Hypercore) -> (u64, u64) {
    let length = core.info().length;
    let mut contiguous = 0;
    while contiguous < length && core.has(contiguous) {
        contiguous += 1;
    }
    (length, contiguous)
}

/// What [`close_idle`] did.
enum Closing {
    Closed,
    /// In use: it stays open.
    Busy,
    /// Not open any more (closed or removed meanwhile).
    Gone,
}

/// Closes the slot's core if nobody but the multifeed holds it (without waiting for a lock:
/// a held lock means it is in use).
fn close_idle(slot: &FeedSlot) -> Closing {
    let Some(mut state) = slot.core.try_lock() else {
        return Closing::Busy;
    };
    let lengths = match &*state {
        CoreState::Open(core) if core.handles() == 1 => match core.try_lock() {
            Some(locked) => held_lengths(&locked),
            None => return Closing::Busy,
        },
        CoreState::Open(_) => return Closing::Busy,
        _ => return Closing::Gone,
    };
    slot.closed_lengths.set(lengths.0, lengths.1);
    *state = CoreState::Unopened;
    slot.idle_closed.store(true, Ordering::Release);
    Closing::Closed
}

/// The cores open now, oldest first, for the bound on open cores (`max_open_feeds`).
#[derive(Debug, Default)]
pub(crate) struct OpenCores {
    queue: std::collections::VecDeque<Arc<FeedSlot>>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    /// The index writer; `None` once closed. Its lock also serializes feed creation.
    pub(crate) root: async_lock::Mutex<Option<RootStorage>>,
    pub(crate) opener: FeedOpener,
    /// The index's removed and denied keys, for the replication filters (kept in step with
    /// the root's).
    pub(crate) marks: RwLock<multifeed_storage::KeyMarks>,
    /// Whether any key may be marked: set before the first write to `marks`, so the filters
    /// asked for every feed on every connection take no lock in a store that marks no key.
    pub(crate) marked: AtomicBool,
    /// The lengths snapshot this multifeed was opened with, until a replication first lists
    /// the feeds and checks it ([`Inner::check_snapshot`]).
    pub(crate) snapshot: std::sync::Mutex<Option<multifeed_storage::LengthsSnapshot>>,
    pub(crate) factory: Arc<dyn StorageFactory>,
    pub(crate) table: RwLock<FeedTable>,
    pub(crate) events: async_broadcast::Sender<Event>,
    pub(crate) _events_open: async_broadcast::InactiveReceiver<Event>,
    /// The key of every feed that changes (each core's change hook sends it): what live
    /// replications watch for news of the feeds whose channels they closed idle. A slow
    /// receiver loses the oldest and hears that it lagged.
    pub(crate) changes: async_broadcast::Sender<FeedKey>,
    pub(crate) _changes_open: async_broadcast::InactiveReceiver<FeedKey>,
    pub(crate) closed: AtomicBool,
    pub(crate) recovery: IndexRecovery,
    pub(crate) config: Config,
    /// Replications running on this multifeed; `close` ends them.
    pub(crate) replications: crate::running::Running,
    /// The number the next replication gets in its peer events.
    pub(crate) next_connection: std::sync::atomic::AtomicU64,
    /// The cores open now (see [`Inner::opened`]).
    pub(crate) open_cores: std::sync::Mutex<OpenCores>,
    /// The advisory lock on a disk root; released by `close`.
    pub(crate) lock: std::sync::Mutex<Option<std::fs::File>>,
}

#[derive(Debug, Default)]
pub(crate) struct FeedTable {
    pub(crate) list: Vec<Arc<FeedSlot>>,
    pub(crate) by_key: HashMap<FeedKey, usize>,
    pub(crate) by_name: HashMap<String, usize>,
    /// Feeds learned from peers.
    pub(crate) remote: usize,
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

    pub(crate) fn insert(&mut self, slot: Arc<FeedSlot>) {
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

impl Inner {
    pub(crate) fn ensure_open(&self) -> Result<(), Error> {
        if self.closed.load(Ordering::SeqCst) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// A core was opened (or created open): it counts against the bound on open cores, and
    /// idle ones are closed until the bound holds again. A core is idle when nobody holds it
    /// but the multifeed (no connection syncs it, no stream waits on it, no call uses it) and
    /// it was not used since the bound last looked (a second chance, CLOCK-style). Closing
    /// one drops the hypercore: everything it acknowledged is in its files already (as after
    /// a crash, which the oplog recovers), and its next use opens it again.
    pub(crate) fn opened(&self, slot: Arc<FeedSlot>) {
        let mut open = self
            .open_cores
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        open.queue.push_back(slot);
        self.trim(&mut open);
    }

    /// Closes idle cores until the bound on open cores holds again (after a replication
    /// let go of the cores it held, say).
    pub(crate) fn trim_open_cores(&self) {
        let mut open = self
            .open_cores
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.trim(&mut open);
    }

    fn trim(&self, open: &mut OpenCores) {
        // A factory that would hand a closed core fresh, empty stores on its next open (a
        // closure making a new store per call) keeps every core open: closing one would lose
        // the feed.
        if !self.factory.reopens_same_store() {
            open.queue.clear();
            return;
        }
        let max = self.config.max_open_feeds;
        // Each slot is looked at most twice per call: bounded work, even when all are busy.
        let mut budget = 2 * open.queue.len();
        while open.queue.len() > max && budget > 0 {
            budget -= 1;
            let Some(slot) = open.queue.pop_front() else {
                break;
            };
            if slot.used.swap(false, Ordering::Relaxed) {
                open.queue.push_back(slot);
                continue;
            }
            match close_idle(&slot) {
                Closing::Closed | Closing::Gone => {}
                Closing::Busy => open.queue.push_back(slot),
            }
        }
    }

    /// Checks the lengths snapshot against the feeds' files, once (the first listing): the
    /// feeds whose files are as the last clean close left them are then listed without
    /// opening their cores.
    pub(crate) fn check_snapshot(&self) {
        let Some(snapshot) = self
            .snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
        else {
            return;
        };
        let slots: Vec<Arc<FeedSlot>> = self.table().list.clone();
        let trusted = snapshot.check(
            &*self.factory,
            slots
                .iter()
                .map(|slot| (&slot.record.key, slot.record.namespace.as_str())),
        );
        for slot in &slots {
            if let Some(entry) = trusted.get(&slot.record.key) {
                slot.trust_snapshot(*entry);
            }
        }
    }

    /// The lengths snapshot, if no listing checked it (at close: its entries are carried).
    pub(crate) fn take_unchecked_snapshot(&self) -> Option<multifeed_storage::LengthsSnapshot> {
        self.snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// The feed's length and contiguous length without opening its core when it was closed
    /// to free memory; `None` when only its core can tell.
    pub(crate) fn closed_lengths(&self, slot: &FeedSlot) -> Option<(u64, u64)> {
        // A core that opens after this look had these lengths when it opened: nothing changes
        // a closed core.
        if !slot.idle_closed.load(Ordering::Acquire) {
            return None;
        }
        Some(slot.closed_lengths.get())
    }

    /// The feed's hypercore, opened on first use.
    pub(crate) async fn core(&self, slot: &Arc<FeedSlot>) -> Result<SharedCore, Error> {
        self.ensure_open()?;
        slot.used.store(true, Ordering::Relaxed);
        let mut state = slot.core.lock().await;
        match &*state {
            CoreState::Open(core) => Ok(core.clone()),
            CoreState::Closed => Err(Error::Closed),
            CoreState::Unopened => {
                // Checked at its first open in this process; a core closed to free memory opens
                // again without the checks.
                let first_open = !slot.opened.load(Ordering::Acquire);
                if slot.record.origin == FeedOrigin::Local && first_open {
                    // Appends logged after a damaged oplog entry are cut when the feed opens:
                    // their length is kept first, so they count as missing, not as never
                    // written (and no append signs over them before a peer brings them back).
                    Box::pin(self.opener.keep_entries_lost_to_damage(&slot.record)).await?;
                }
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
                    let written = self.tree_leaves(slot).await;
                    let length = core.info().length;
                    // Leaves in the tree file past the length the feed opened with: its newest
                    // header was damaged and hypercore fell back to the older slot. Those
                    // entries were acknowledged; they count as missing until a peer brings them.
                    let known = match (restored, written.filter(|&leaves| leaves > length)) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, b) => a.or(b),
                    };
                    let _ = slot.restored_length.set(known);
                }
                let core = SharedCore::with_change_hook(core, self.change_hook(*slot.key()));
                *state = CoreState::Open(core.clone());
                slot.idle_closed.store(false, Ordering::Release);
                slot.opened.store(true, Ordering::Release);
                drop(state);
                self.opened(slot.clone());
                Ok(core)
            }
        }
    }

    /// How many leaves a feed's tree file holds nodes for (the highest node stored is always
    /// the last leaf's: a parent sits between its children), or `None` if it cannot be read
    /// beside the hypercore.
    async fn tree_leaves(&self, slot: &FeedSlot) -> Option<u64> {
        let mut tree = self.tree_store(slot).await?;
        let store = tree.as_mut()?;
        let nodes = store.len().await.ok()? / 40;
        let last = nodes.checked_sub(1)?;
        let node = store.read(last * 40, 40).await.ok()?;
        if node.iter().all(|&byte| byte == 0) || last % 2 == 1 {
            return None;
        }
        Some(last / 2 + 1)
    }

    /// The slot's second handle on its tree store, opened on first use; `None` when the
    /// factory cannot give one beside hypercore's, or the open fails.
    async fn tree_store<'a>(
        &self,
        slot: &'a FeedSlot,
    ) -> Option<async_lock::MutexGuard<'a, Option<multifeed_storage::BoxedStore>>> {
        if !self.factory.reopens_same_store() {
            return None;
        }
        let mut tree = slot.tree.lock().await;
        if tree.is_none() {
            let path = format!("{}/tree", slot.record.namespace);
            *tree = Some(self.factory.open(&path).await.ok()?);
        }
        Some(tree)
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
        // Not readable beside hypercore: the block cannot be judged, and is not blamed.
        let Some(mut tree) = self.tree_store(slot).await else {
            return true;
        };
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

    pub(crate) fn marks_mut(&self) -> RwLockWriteGuard<'_, multifeed_storage::KeyMarks> {
        self.marked.store(true, Ordering::SeqCst);
        self.marks
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `key` is removed or denied.
    pub(crate) fn blocks(&self, key: &FeedKey) -> bool {
        self.marked.load(Ordering::SeqCst) && self.marks().blocks(key)
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

    /// What a feed's core calls on every change: its key goes to the change watchers.
    pub(crate) fn change_hook(&self, key: FeedKey) -> multifeed_storage::ChangeHook {
        let changes = self.changes.clone();
        Arc::new(move || {
            // Full: the oldest goes and slow watchers hear `Overflowed`; none: nobody watches.
            let _ = changes.try_broadcast(key);
        })
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

/// The leaf of block `index` as the core itself knows it: the first node of a proof for the
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

    /// Adding feeds marks no key: a store that never removed or denied one keeps its
    /// replication filters lock-free (they once took the marks lock for every feed on every
    /// connection, because each feed added wrote the marks).
    #[test]
    fn adding_feeds_leaves_the_marks_untouched_until_a_key_is_marked() {
        use std::sync::atomic::Ordering;
        async_std::task::block_on(async {
            let source = crate::Multifeed::open_memory().await.expect("source");
            let writer = *source.writer("a").await.expect("writer").key();
            let other = *source.writer("b").await.expect("writer").key();
            let multi = crate::Multifeed::open_memory().await.expect("store");
            multi.writer("local").await.expect("writer");
            multi.add_remote_feed(&writer).await.expect("add");
            assert!(!multi.inner.marked.load(Ordering::SeqCst));
            assert!(!multi.inner.blocks(&writer));

            multi.remove_feed(&writer).await.expect("remove");
            assert!(multi.inner.marked.load(Ordering::SeqCst));
            assert!(multi.inner.blocks(&writer));
            assert!(!multi.inner.blocks(&other));
            // A feed added after a removal is not blocked; the removed one stays blocked.
            multi.add_remote_feed(&other).await.expect("add");
            assert!(!multi.inner.blocks(&other));
            assert!(multi.inner.blocks(&writer));
        });
    }
}
