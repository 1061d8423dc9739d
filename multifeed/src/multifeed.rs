//! The `Multifeed` type: a set of feeds under one root.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use hypercore::{generate_signing_key, PartialKeypair, SigningKey, VerifyingKey};
use multifeed_storage::{
    FeedKey, FeedOrigin, IndexRecovery, RootStorage, SharedCore, SnapshotFeed, StorageFactory,
};

use crate::builder::{Config, MultifeedBuilder};
use crate::feed::Feed;
use crate::registry::{CoreState, FeedSlot, FeedTable, Inner};
use crate::{Error, Event, Events};

/// Many hypercores, by many authors, stored together under one root.
///
/// Cheap to clone: clones share the same feeds. See the [crate docs](crate) for an example.
#[derive(Debug, Clone)]
pub struct Multifeed {
    pub(crate) inner: Arc<Inner>,
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
        // The lengths the last clean close recorded: checked against the files when a
        // replication first lists the feeds (an open that only appends pays nothing for it).
        // A snapshot that cannot be read is only a lost shortcut (and one that cannot be
        // emptied is still checked against the files at the next open).
        let snapshot = multifeed_storage::LengthsSnapshot::take(&*factory)
            .await
            .unwrap_or_default();
        let (mut events, receiver) = async_broadcast::broadcast(config.event_capacity.max(1));
        events.set_overflow(true);
        events.set_await_active(false);
        let (mut changes, changes_receiver) =
            async_broadcast::broadcast(config.event_capacity.max(1024));
        changes.set_overflow(true);
        changes.set_await_active(false);
        let marks = root.marks().clone();
        let inner = Inner {
            marked: AtomicBool::new(!marks.removed.is_empty() || !marks.denied.is_empty()),
            marks: RwLock::new(marks),
            snapshot: std::sync::Mutex::new((!snapshot.is_empty()).then_some(snapshot)),
            opener: root.opener(),
            root: async_lock::Mutex::new(Some(root)),
            factory,
            table: RwLock::new(table),
            events,
            _events_open: receiver.deactivate(),
            changes,
            _changes_open: changes_receiver.deactivate(),
            closed: AtomicBool::new(false),
            recovery,
            config,
            replications: crate::running::Running::default(),
            open_cores: std::sync::Mutex::default(),
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
        if self.inner.blocks(key) {
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
        // A feed added again is no longer removed. (Only then the marks are written: a write
        // would mark the store as one whose replication filters must look.)
        if self.inner.marked.load(std::sync::atomic::Ordering::SeqCst)
            && self.inner.marks().removed.contains(&record.key)
        {
            self.inner.marks_mut().removed.remove(&record.key);
        }
        let core = SharedCore::with_change_hook(core, self.inner.change_hook(record.key));
        let slot = Arc::new(FeedSlot::new(record.clone(), CoreState::Open(core)));
        self.inner.table_mut().insert(slot.clone());
        self.inner.opened(slot.clone());
        let _ = self.inner.events.try_broadcast(Event::Feed {
            key: record.key,
            name: record.name,
            origin: record.origin,
        });
        Ok(Feed::new(slot, self.inner.clone()))
    }

    /// How many feeds have their hypercore open now (at most about
    /// [`max_open_feeds`](crate::MultifeedBuilder::max_open_feeds), plus those in use).
    pub fn open_feeds(&self) -> usize {
        self.inner
            .table()
            .list
            .iter()
            .filter(|slot| {
                slot.core
                    .try_lock()
                    .is_none_or(|state| matches!(*state, CoreState::Open(_)))
            })
            .count()
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
    /// On disk it also records every feed's lengths (the lengths snapshot), so the next open
    /// lists the store to a peer without opening each feed's hypercore: an equal re-sync after
    /// a restart then costs what changed, not how many feeds there are. A feed whose files are
    /// not exactly as this close left them (written, truncated, deleted or replaced since) is
    /// opened and checked as before; see `multifeed_storage::LengthsSnapshot`. Only feeds
    /// opened in this session are looked at again: the others keep their entries.
    ///
    /// Any later use of this multifeed or its feeds fails with [`Error::Closed`].
    pub async fn close(&self) -> Result<(), Error> {
        self.inner.closed.store(true, Ordering::SeqCst);
        // No replication writes once this returns: each is ended and waited for.
        self.inner.replications.end_all().await;
        let root = self.inner.root.lock().await.take();
        let mut result = Ok(());
        let took_root = root.is_some();
        if let Some(mut root) = root {
            if self.inner.config.durability == multifeed_storage::Durability::Sync {
                result = root.sync().await.map_err(Error::from);
                if result.is_ok() {
                    result = self.inner.factory.sync_all().await.map_err(Error::from);
                }
            }
        }
        let slots: Vec<Arc<FeedSlot>> = self.inner.table().list.clone();
        // Never checked: the snapshot this session opened with, carried on for the feeds it
        // did not open.
        let unchecked = self.inner.take_unchecked_snapshot();
        let mut lengths = Vec::with_capacity(slots.len());
        for slot in slots {
            let mut state = slot.core.lock().await;
            let known = match &*state {
                CoreState::Open(core) => Some(Recorded::Fresh(crate::registry::held_lengths(
                    &*core.lock().await,
                ))),
                CoreState::Unopened => match self.inner.closed_lengths(&slot) {
                    Some(lengths) if slot.opened.load(std::sync::atomic::Ordering::Acquire) => {
                        Some(Recorded::Fresh(lengths))
                    }
                    _ => slot
                        .snapshot_entry()
                        .or_else(|| unchecked.as_ref()?.entry(&slot.record.key))
                        .map(Recorded::Carried),
                },
                CoreState::Closed => None,
            };
            let state = std::mem::replace(&mut *state, CoreState::Closed);
            slot.idle_closed
                .store(false, std::sync::atomic::Ordering::Release);
            // Wakes whoever waits for entries (live streams, wait_for_len): they see Closed.
            if let CoreState::Open(core) = state {
                core.notify_changed();
            }
            if let Some(known) = known {
                lengths.push((slot.clone(), known));
            }
        }
        self.inner.factory.release();
        // Once every write is with the backend: the next open lists these feeds without
        // opening them, if their files are still as they are now. Only the call that closed
        // the root writes it (a second, concurrent call saw the cores closed already).
        if took_root && result.is_ok() {
            let feeds = lengths.iter().map(|(slot, known)| match known {
                Recorded::Fresh((length, contiguous_length)) => SnapshotFeed::Fresh {
                    key: &slot.record.key,
                    namespace: slot.record.namespace.as_str(),
                    lengths: multifeed_storage::SnapshotLengths {
                        length: *length,
                        contiguous_length: *contiguous_length,
                    },
                },
                Recorded::Carried(entry) => SnapshotFeed::Carried {
                    key: &slot.record.key,
                    entry: *entry,
                },
            });
            // A snapshot that could not be written (a full disk) is only a lost shortcut: the
            // feeds' data is all stored, and a torn snapshot fails its checksum at the next open.
            let _ = multifeed_storage::write_lengths_snapshot(&*self.inner.factory, feeds).await;
            self.inner.factory.release();
        }
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

/// How a feed goes into the lengths snapshot at close.
enum Recorded {
    /// Lengths of a core opened in this session: its files are stamped now.
    Fresh((u64, u64)),
    /// Not opened in this session: its entry from the last snapshot, as it was.
    Carried(multifeed_storage::SnapshotEntry),
}
