//! The `Feed` handle: one hypercore of the multifeed.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use multifeed_storage::{FeedKey, FeedOrigin, SharedCore};
use serde::{de::DeserializeOwned, Serialize};

use crate::registry::{FeedSlot, Inner};
use crate::{Error, Value};

/// A feed's lengths, from [`Feed::info`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedInfo {
    /// Entries the feed has (signed), held here or not.
    pub length: u64,
    /// Entries held here from 0 without a gap.
    pub contiguous_length: u64,
    /// Bytes of the entries the feed has.
    pub byte_length: u64,
    /// Hypercore's fork number.
    pub fork: u64,
    /// Whether its hypercore holds the secret key.
    pub writable: bool,
}

/// A handle to one feed of a [`Multifeed`](crate::Multifeed). Cheap to clone.
///
/// Its hypercore is opened on first use, so listing thousands of feeds opens no files.
#[derive(Clone)]
pub struct Feed {
    slot: Arc<FeedSlot>,
    inner: Arc<Inner>,
}

impl fmt::Debug for Feed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Feed")
            .field("key", &hex::encode(self.key()))
            .field("name", &self.name())
            .field("origin", &self.origin())
            .finish()
    }
}

impl Feed {
    pub(crate) fn new(slot: Arc<FeedSlot>, inner: Arc<Inner>) -> Self {
        Self { slot, inner }
    }

    pub(crate) fn slot(&self) -> &Arc<FeedSlot> {
        &self.slot
    }

    /// The feed's public key.
    pub fn key(&self) -> &FeedKey {
        &self.slot.record.key
    }

    /// The feed's public key as 64 hex characters.
    pub fn key_hex(&self) -> String {
        hex::encode(self.key())
    }

    /// The discovery key: a hash of the public key that peers use to find the feed.
    pub fn discovery_key(&self) -> &[u8; 32] {
        &self.slot.discovery_key
    }

    /// The local writer name, if it has one (never sent to peers).
    pub fn name(&self) -> Option<&str> {
        self.slot.record.name.as_deref()
    }

    /// Whether it was created here or learned from a peer.
    pub fn origin(&self) -> FeedOrigin {
        self.slot.record.origin
    }

    /// Whether this multifeed holds the secret key and can append: a local feed, unless it
    /// was restored without its secret key (known once its hypercore was opened, by any read,
    /// sync or [`Event::FeedRestored`](crate::Event::FeedRestored)).
    pub fn is_writable(&self) -> bool {
        self.slot.record.origin == FeedOrigin::Local
            && !self
                .slot
                .read_only
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The number of entries the feed has (some may not be downloaded yet).
    pub async fn len(&self) -> Result<u64, Error> {
        Ok(self.core().await?.lock().await.info().length)
    }

    /// Whether the feed has no entries.
    pub async fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.len().await? == 0)
    }

    /// A stream of the entries in `range` as `(index, bytes)`, in order.
    ///
    /// [`ReadMode::Snapshot`] yields what is held now and ends at the feed's length;
    /// [`ReadMode::Live`] waits for each entry still to come (appended here or downloaded by a
    /// replication) and, with an open range, goes on until the multifeed closes.
    ///
    /// ```
    /// # async_std::task::block_on(async {
    /// use futures::StreamExt;
    /// use multifeed::{Multifeed, ReadMode};
    ///
    /// let multi = Multifeed::open_memory().await?;
    /// let feed = multi.writer("me").await?;
    /// let mut live = feed.read_stream(1.., ReadMode::Live);
    /// feed.append(b"first").await?;
    /// feed.append(b"second").await?;
    /// assert_eq!(live.next().await.transpose()?, Some((1, b"second".to_vec())));
    /// # Ok::<_, multifeed::Error>(()) }).unwrap();
    /// ```
    pub fn read_stream(
        &self,
        range: impl std::ops::RangeBounds<u64>,
        mode: crate::ReadMode,
    ) -> crate::EntryStream {
        crate::stream::entries(self.clone(), range, mode)
    }

    /// [`read_stream`](Self::read_stream), each entry decoded with the multifeed's value
    /// encoding.
    pub fn value_stream(
        &self,
        range: impl std::ops::RangeBounds<u64>,
        mode: crate::ReadMode,
    ) -> crate::ValueStream {
        crate::stream::values(self.clone(), range, mode)
    }

    /// Appends one entry; returns its index.
    pub async fn append(&self, entry: &[u8]) -> Result<u64, Error> {
        let range = self.append_batch([entry]).await?;
        Ok(range.start)
    }

    /// Appends entries atomically; returns the range of their indexes.
    pub async fn append_batch<I, B>(&self, entries: I) -> Result<Range<u64>, Error>
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        if !self.is_writable() {
            return Err(Error::NotWritable { key: *self.key() });
        }
        let batch: Vec<B> = entries.into_iter().collect();
        let core = self.core().await?;
        let mut guard = core.lock().await;
        let start = guard.info().length;
        if guard.key_pair().secret.is_none() {
            return Err(Error::NotWritable { key: *self.key() });
        }
        if let Some(&Some(signed_length)) = self.slot.restored_length.get() {
            if start < signed_length {
                return Err(Error::Restoring {
                    key: *self.key(),
                    length: start,
                    signed_length,
                });
            }
        }
        let outcome = guard
            .append_batch(&batch)
            .await
            .map_err(|e| Error::hypercore(self.key(), e))?;
        drop(guard);
        core.notify_changed();
        self.inner.sync_after_batch().await?;
        if outcome.length > start {
            self.inner.emit(crate::Event::Appended {
                key: *self.key(),
                range: start..outcome.length,
            });
        }
        Ok(start..outcome.length)
    }

    /// Waits until the feed has at least `length` entries (appended here or learned from a
    /// peer); returns its length then, or [`Error::WaitTimedOut`] after `timeout`.
    pub async fn wait_for_len(&self, length: u64, timeout: Duration) -> Result<u64, Error> {
        let core = self.core().await?;
        let wait = async {
            loop {
                let seen = core.version();
                self.inner.ensure_open()?;
                let now = core.lock().await.info().length;
                if now >= length {
                    return Ok(now);
                }
                core.changed(seen).await;
            }
        };
        self.within(timeout, wait, || format!("length {length}"))
            .await?
    }

    /// The entry at `index`, waiting up to `timeout` for it to be appended or downloaded (a
    /// live replication fetches it); [`Error::WaitTimedOut`] if it did not arrive.
    pub async fn get_or_wait(&self, index: u64, timeout: Duration) -> Result<Vec<u8>, Error> {
        let core = self.core().await?;
        let wait = async {
            loop {
                let seen = core.version();
                if let Some(value) = self.get(index).await? {
                    return Ok(value);
                }
                core.changed(seen).await;
            }
        };
        self.within(timeout, wait, || format!("entry {index}"))
            .await?
    }

    async fn within<T>(
        &self,
        timeout: Duration,
        wait: impl std::future::Future<Output = T>,
        what: impl FnOnce() -> String,
    ) -> Result<T, Error> {
        let wait = std::pin::pin!(wait);
        let timer = std::pin::pin!(async_io::Timer::after(timeout));
        match futures::future::select(wait, timer).await {
            futures::future::Either::Left((value, _)) => Ok(value),
            futures::future::Either::Right(_) => Err(Error::WaitTimedOut {
                key: *self.key(),
                waited_for: what(),
                timeout,
            }),
        }
    }

    /// The entry at `index`, or `None` if it is not stored here (yet).
    pub async fn get(&self, index: u64) -> Result<Option<Vec<u8>>, Error> {
        let core = self.core().await?;
        let mut core = core.lock().await;
        let restored_below = match self.slot.restored_length.get() {
            Some(&Some(signed_length)) => index < signed_length,
            _ => false,
        };
        if index >= core.info().length && !restored_below {
            return Ok(None);
        }
        if !core.has(index) {
            // A replica may be sparse; a local writer holds every block it wrote (or signed,
            // before it was restored), so a missing one is damage, never a silent `None`.
            if self.is_writable() {
                return Err(Error::MissingBlock {
                    key: *self.key(),
                    index,
                });
            }
            return Ok(None);
        }
        let value = match core.get(index).await {
            Ok(Some(value)) => value,
            Ok(None) => return Ok(None),
            // A failed read (out of descriptors, a disk error) says nothing about the block.
            Err(err @ hypercore::HypercoreError::IO { .. }) => {
                return Err(Error::hypercore(self.key(), err))
            }
            // The block's bytes are not where its tree says (a truncated or deleted data file).
            Err(_) => return Err(self.drop_damaged(&mut core, index).await),
        };
        if !self
            .inner
            .block_matches_tree(&self.slot, &mut core, index, &value)
            .await
        {
            return Err(self.drop_damaged(&mut core, index).await);
        }
        Ok(Some(value))
    }

    /// Never hand out wrong bytes: a damaged block is dropped, so a sync fetches it again from
    /// a peer that holds it (a local writer's block too). Returns the error to report.
    async fn drop_damaged(&self, core: &mut hypercore::Hypercore, index: u64) -> Error {
        let _ = core.clear(index, index + 1).await;
        self.inner.emit(crate::Event::BlockDamaged {
            key: *self.key(),
            index,
        });
        Error::DamagedBlock {
            key: *self.key(),
            index,
        }
    }

    /// For the replication driver: whether `value`, read as block `index` by the driver, matches
    /// the tree; a damaged block is dropped.
    pub(crate) async fn block_intact(&self, index: u64, value: &[u8]) -> bool {
        let Ok(core) = self.core().await else {
            return true;
        };
        let mut core = core.lock().await;
        if self
            .inner
            .block_matches_tree(&self.slot, &mut core, index, value)
            .await
        {
            return true;
        }
        let _ = self.drop_damaged(&mut core, index).await;
        false
    }

    /// Appends a value through the multifeed's value encoding; returns its index.
    pub async fn append_value(&self, value: impl Into<Value>) -> Result<u64, Error> {
        let bytes = self.inner.config.encoding.encode(&value.into())?;
        self.append(&bytes).await
    }

    pub(crate) fn decode(&self, bytes: Vec<u8>, index: u64) -> Result<Value, Error> {
        self.inner.config.encoding.decode(bytes, self.key(), index)
    }

    /// The entry at `index`, decoded with the multifeed's value encoding.
    pub async fn get_value(&self, index: u64) -> Result<Option<Value>, Error> {
        match self.get(index).await? {
            Some(bytes) => self.decode(bytes, index).map(Some),
            None => Ok(None),
        }
    }

    /// Appends any serde value as JSON (the multifeed's encoding must be JSON).
    pub async fn append_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<u64, Error> {
        self.append_value(Value::json(value)?).await
    }

    /// The entry at `index` deserialized from JSON (the multifeed's encoding must be JSON).
    pub async fn get_json<T: DeserializeOwned>(&self, index: u64) -> Result<Option<T>, Error> {
        match self.get_value(index).await? {
            Some(value) => value.to_json().map(Some),
            None => Ok(None),
        }
    }

    /// The feed's lengths as stored here.
    ///
    /// `contiguous_length` counts the entries held from 0 without a gap, checked entry by entry
    /// (one bitfield lookup each), not taken from hypercore's header, which a damaged bitfield
    /// leaves overclaiming.
    pub async fn info(&self) -> Result<FeedInfo, Error> {
        let core = self.core().await?;
        let core = core.lock().await;
        let info = core.info();
        let (_, contiguous) = crate::registry::held_lengths(&core);
        Ok(FeedInfo {
            length: info.length,
            contiguous_length: contiguous,
            byte_length: info.byte_length,
            fork: info.fork,
            writable: info.writeable,
        })
    }

    /// The secret key this feed is signed with, if it is a writer of ours (to move the writer
    /// to another store with [`Multifeed::writer_with_keypair`](crate::Multifeed::writer_with_keypair)).
    /// Whoever holds it can sign entries as this feed: keep it secret.
    pub async fn signing_key(&self) -> Result<Option<crate::SigningKey>, Error> {
        let core = self.core().await?;
        let core = core.lock().await;
        Ok(core.key_pair().secret.clone())
    }

    /// Whether entry `index` is stored here.
    pub async fn has(&self, index: u64) -> Result<bool, Error> {
        Ok(self.core().await?.lock().await.has(index))
    }

    /// The feed's hypercore, shared with replications. Not public: an append through it would
    /// skip change notices, events and the durability policy.
    pub(crate) async fn core(&self) -> Result<SharedCore, Error> {
        self.inner.core(&self.slot).await
    }
}
