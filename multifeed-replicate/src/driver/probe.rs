//! Feeds new to us are fetched into an in-memory probe first: the host records a feed only once
//! a signed root of it verified, so keys offered and never served, empty feeds and forgeries
//! leave nothing behind.

use multifeed_storage::{FeedKey, SharedCore};

use super::{change_stream, DiscoveryKey, Driver, MAX_PROBES};
use crate::adapter::Applied;
use crate::{ReplicateError, ReplicationEvent};

impl Driver {
    /// A probe's first signed root verified: the host records the feed, the proof is applied
    /// to the host's core too, and the feed goes on syncing there. Returns false when this
    /// connection may add no more feeds (the probe is dropped).
    pub(super) async fn promote(
        &mut self,
        dk: DiscoveryKey,
        proof: &hypercore_schema::Proof,
    ) -> Result<bool, ReplicateError> {
        self.probes = self.probes.saturating_sub(1);
        let Some(key) = self.feeds.get(&dk).map(|feed| feed.key) else {
            return Ok(false);
        };
        if self.feeds_added >= self.config.max_new_feeds {
            self.feeds.remove(&dk);
            self.incomplete.remove(&dk);
            self.start_waiting().await?;
            return Ok(false);
        }
        let core = self
            .host
            .add_remote_feed(&key)
            .await
            .map_err(ReplicateError::Host)?;
        self.feeds_added += 1;
        self.emit(ReplicationEvent::FeedAdded(key));
        {
            let mut real = core.lock().await;
            // Another connection may have added it meanwhile: then it has this root already.
            if real.info().length == 0 {
                match crate::adapter::apply_proof(&mut real, proof).await {
                    Applied::Verified(_) => {}
                    Applied::Io(err) => return Err(ReplicateError::hypercore(&key, err)),
                    Applied::Invalid(reason) => {
                        return Err(ReplicateError::InvalidProof { key, reason })
                    }
                }
            }
        }
        core.notify_changed();
        if self.config.live {
            self.changes.push(change_stream(dk, core.clone()));
        }
        if let Some(feed) = self.feeds.get_mut(&dk) {
            feed.core = core;
            feed.probe = false;
            feed.sync.forget_confirmed();
        }
        self.start_waiting().await?;
        Ok(true)
    }

    /// Starts new feeds that waited for a probe slot.
    pub(super) async fn start_waiting(&mut self) -> Result<(), ReplicateError> {
        while self.probes < MAX_PROBES {
            let Some((key, target)) = self.waiting.pop_front() else {
                break;
            };
            self.track_feed(key, target, true).await?;
            self.open_feed_channel(key).await?;
        }
        Ok(())
    }
}

/// An in-memory hypercore for a feed we do not hold yet (4 KiB pages: a probe costs little).
pub(super) async fn probe_core(key: &FeedKey) -> Result<SharedCore, ReplicateError> {
    use futures::FutureExt;
    use hypercore::{HypercoreBuilder, PartialKeypair, Storage, StorageTraits};
    let create = |_| {
        async {
            Ok(
                Box::new(random_access_memory::RandomAccessMemory::new(4096))
                    as Box<dyn StorageTraits + Send>,
            )
        }
        .boxed()
    };
    let storage = Storage::open(create, false)
        .await
        .map_err(|e| ReplicateError::hypercore(key, e))?;
    let public = hypercore::VerifyingKey::from_bytes(key).map_err(|_| {
        ReplicateError::hypercore(
            key,
            hypercore::HypercoreError::InvalidOperation {
                context: "not an ed25519 public key".to_owned(),
            },
        )
    })?;
    let core = HypercoreBuilder::new(storage)
        .key_pair(PartialKeypair {
            public,
            secret: None,
        })
        .build()
        .await
        .map_err(|e| ReplicateError::hypercore(key, e))?;
    Ok(SharedCore::new(core))
}

/// Whether `key` can be a feed's public key: a valid ed25519 point that is not of small order
/// (a signature under a small-order key proves nothing).
pub(super) fn usable_feed_key(key: &FeedKey) -> bool {
    hypercore::VerifyingKey::from_bytes(key).is_ok_and(|key| !key.is_weak())
}
