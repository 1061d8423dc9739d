//! Removing feeds and denying keys: tombstones and deny marks in the index, which every
//! replication honours (never offered, never requested, never added from a peer).

use std::sync::Arc;

use multifeed_storage::{FeedKey, FeedOrigin, KeyMark};

use crate::registry::{CoreState, FeedSlot};
use crate::{Error, Multifeed};

impl Multifeed {
    /// Removes a feed learned from peers: its files are deleted and a tombstone in the index
    /// keeps it out for good (across restarts, whoever offers it) until [`allow`](Self::allow).
    /// A key never held is tombstoned too. Handles to the feed fail with [`Error::Closed`]
    /// afterwards; a replication already syncing it finishes that sync into nothing kept
    /// (leftover files are deleted at the next open).
    ///
    /// A local writer is refused ([`Error::LocalWriter`]): see
    /// [`remove_writer`](Self::remove_writer).
    pub async fn remove_feed(&self, key: &FeedKey) -> Result<(), Error> {
        self.remove(key, false).await
    }

    /// [`remove_feed`](Self::remove_feed), also for a local writer: its secret key is deleted
    /// with its files (no one can append to that feed again, here or elsewhere, unless the key
    /// was exported), and its name is freed for a new writer.
    pub async fn remove_writer(&self, key: &FeedKey) -> Result<(), Error> {
        self.remove(key, true).await
    }

    async fn remove(&self, key: &FeedKey, writers_too: bool) -> Result<(), Error> {
        self.inner.ensure_open()?;
        let mut root = self.inner.root.lock().await;
        let root = root.as_mut().ok_or(Error::Closed)?;
        let slot: Option<Arc<FeedSlot>> = self.by_key(key).map(|feed| feed.slot().clone());
        if let Some(slot) = &slot {
            if slot.record.origin == FeedOrigin::Local && !writers_too {
                return Err(Error::LocalWriter { key: *key });
            }
        }
        // The tombstone first: from here on no peer brings the feed back, even after a crash.
        self.inner.marks_mut().removed.insert(*key);
        let removed = match &slot {
            Some(slot) => {
                let previous = std::mem::replace(&mut *slot.core.lock().await, CoreState::Closed);
                slot.idle_closed
                    .store(false, std::sync::atomic::Ordering::Release);
                *slot.tree.lock().await = None;
                if let CoreState::Open(core) = previous {
                    core.notify_changed();
                }
                self.inner.table_mut().remove(key);
                root.remove_feed(&slot.record).await
            }
            None => root.mark(key, KeyMark::Removed).await,
        };
        if let Err(err) = removed {
            // The index did not take the tombstone (or the files outlived it): tell the caller;
            // a tombstone written stays in force, and leftover files go at the next open.
            if !root.marks().removed.contains(key) {
                self.inner.marks_mut().removed.remove(key);
            }
            return Err(err.into());
        }
        self.inner.emit(crate::Event::FeedRemoved { key: *key });
        Ok(())
    }

    /// Denies `key`: a feed under it is never offered to peers nor requested from them, and
    /// never added from them, across restarts, until [`allow`](Self::allow). A feed already
    /// stored stays (readable here); remove it with [`remove_feed`](Self::remove_feed). A live
    /// replication that already agreed on the feed goes on syncing it until it ends; every
    /// later offer and request honours the deny.
    pub async fn deny(&self, key: &FeedKey) -> Result<(), Error> {
        self.set_mark(key, KeyMark::Denied).await
    }

    /// Lifts a [`deny`](Self::deny) or a removal's tombstone: peers may offer the key again.
    pub async fn allow(&self, key: &FeedKey) -> Result<(), Error> {
        self.set_mark(key, KeyMark::Allowed).await
    }

    async fn set_mark(&self, key: &FeedKey, mark: KeyMark) -> Result<(), Error> {
        self.inner.ensure_open()?;
        let mut root = self.inner.root.lock().await;
        let root = root.as_mut().ok_or(Error::Closed)?;
        root.mark(key, mark).await?;
        *self.inner.marks_mut() = root.marks().clone();
        Ok(())
    }

    /// Whether `key` is denied or removed (kept out of replication).
    pub fn is_denied(&self, key: &FeedKey) -> bool {
        self.inner.blocks(key)
    }

    /// The denied keys.
    pub fn denied(&self) -> Vec<FeedKey> {
        let mut keys: Vec<FeedKey> = self.inner.marks().denied.iter().copied().collect();
        keys.sort_unstable();
        keys
    }

    /// The keys of removed feeds (their tombstones).
    pub fn removed(&self) -> Vec<FeedKey> {
        let mut keys: Vec<FeedKey> = self.inner.marks().removed.iter().copied().collect();
        keys.sort_unstable();
        keys
    }
}
