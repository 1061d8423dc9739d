//! The feeds a connection tracks: opening them (from the host, or into a probe for a feed new
//! to us), the probe slots, and what the host could not open.
//!
//! Feeds new to us are fetched into an in-memory probe first: the host records a feed only once
//! a signed root of it verified, so keys offered and never served, empty feeds and forgeries
//! leave nothing behind.

use hypercore_protocol::discovery_key;
use multifeed_storage::FeedKey;

use super::{
    Connection, DiscoveryKey, FeedInfo, FeedView, LocalFeedsFor, OpenFeed, Opened, Output, Purpose,
    MAX_PROBES,
};
use crate::proto::sync::SyncState;
use crate::{LocalFeed, ReplicateError, ReplicationEvent};

/// One feed replicating on this connection.
#[derive(Debug)]
pub(super) struct FeedSync {
    pub(super) key: FeedKey,
    /// Whether we asked for its channel to be opened.
    pub(super) opened: bool,
    /// Its channel is open both ways.
    pub(super) channel_open: bool,
    /// Every per-feed decision: what the peer has, what is in flight, the target, pipelining.
    pub(super) sync: SyncState,
    /// The feed is a probe in memory: the host does not have it yet.
    pub(super) probe: bool,
    /// The blocks from 0 the peer says it holds (its Range announcements).
    pub(super) remote_contiguous: u64,
    /// Both sides hold the same length of it, complete (as last seen).
    pub(super) in_sync: bool,
    /// Since when it is in sync (live: its channel closes once it stayed so long enough).
    pub(super) in_sync_since: Option<std::time::Instant>,
}

impl FeedSync {
    /// The view's info, with a contiguous length that counts only blocks the feed holds.
    ///
    /// hypercore 0.16 reports the contiguous length of its header even when its bitfield lost
    /// the blocks (a damaged or deleted bitfield file): a sync then took the feed for complete
    /// and fetched nothing. The sync state remembers how far blocks were confirmed, so each
    /// call checks only blocks not confirmed yet (one lookup per block over a connection).
    pub(super) fn checked(&mut self, view: &dyn FeedView) -> FeedInfo {
        let mut info = view.info();
        info.contiguous_length = self
            .sync
            .confirmed_contiguous(info.contiguous_length, |i| view.has(i));
        info
    }
}

impl Connection {
    /// The local feed list the core asked for ([`Output::ListLocalFeeds`]).
    pub(crate) fn handle_local_feeds(
        &mut self,
        now: std::time::Instant,
        feeds: Vec<LocalFeed>,
    ) -> Result<(), ReplicateError> {
        let Some(purpose) = self.local_feeds_for.pop_front() else {
            return Ok(());
        };
        match purpose {
            LocalFeedsFor::Exchange => {
                self.clock.host_ready(now);
                self.start_exchange(now, feeds)
            }
            LocalFeedsFor::PlainStart => {
                self.index_local_feeds(&feeds);
                for key in self.config.plain_feeds.clone().unwrap_or_default() {
                    self.track_feed(key, None, true)?;
                }
                Ok(())
            }
            LocalFeedsFor::PeerOpened(dk) => {
                self.index_local_feeds(&feeds);
                self.peer_opened(dk)
            }
            LocalFeedsFor::Recheck => {
                self.recheck_parked(&feeds);
                Ok(())
            }
        }
    }

    /// Learns the discovery keys of every local feed we may serve (the host's, where it keeps
    /// them: a keyed BLAKE2b saved per feed).
    pub(super) fn index_local_feeds(&mut self, feeds: &[LocalFeed]) {
        self.known.reserve(feeds.len());
        for feed in feeds {
            if self.offers(&feed.key) {
                let dk = feed
                    .discovery_key
                    .unwrap_or_else(|| discovery_key(&feed.key));
                self.known.insert(dk, feed.key);
            }
        }
    }

    pub(super) fn offers(&self, key: &FeedKey) -> bool {
        self.config.offer.as_ref().is_none_or(|offer| offer(key))
    }

    pub(super) fn accepts(&self, key: &FeedKey) -> bool {
        self.config.accept.as_ref().is_none_or(|accept| accept(key))
    }

    /// Starts tracking a feed on this connection and opens its channel (creating the feed in a
    /// probe if `create` and the host lacks it). A feed tracked already gets its new target.
    pub(super) fn track_feed(
        &mut self,
        key: FeedKey,
        target: Option<u64>,
        create: bool,
    ) -> Result<(), ReplicateError> {
        let dk = discovery_key(&key);
        self.known.insert(dk, key);
        self.unknown_channels.remove(&dk);
        self.unopened_served.remove(&dk);
        self.parked.remove(&dk);
        if !self.feeds.contains_key(&dk) && self.unavailable.contains(&key) {
            return Ok(());
        }
        self.push(Output::OpenFeed(OpenFeed {
            key,
            purpose: Purpose::Track { target, create },
        }));
        Ok(())
    }

    /// What opening a feed found ([`Output::OpenFeed`], [`Output::CreateProbe`]).
    pub(crate) fn handle_feed_opened(
        &mut self,
        now: std::time::Instant,
        request: OpenFeed,
        opened: Opened<'_>,
    ) -> Result<(), ReplicateError> {
        let key = request.key;
        let dk = discovery_key(&key);
        let (target, create) = match request.purpose {
            Purpose::Offer => return self.offer_opened(now, key, opened),
            Purpose::Track { target, create } => (target, create),
        };
        let view = match opened {
            Opened::Held(view) => {
                if !self.feeds.contains_key(&dk) {
                    self.insert_feed(dk, key, target, false);
                }
                view
            }
            Opened::Probe(view) => {
                self.insert_feed(dk, key, target, true);
                view
            }
            // One unreadable feed of ours does not stop the others: it is reported and left
            // out of this replication.
            Opened::Unavailable(reason) => {
                self.feed_unavailable(key, reason);
                return Ok(());
            }
            // A feed new to us waits for a probe slot, or gets one.
            Opened::Missing if create && self.probes >= MAX_PROBES => {
                if !self.waiting.iter().any(|(k, _)| *k == key) {
                    self.waiting.push_back((key, target));
                }
                if target.is_some_and(|t| t > 0) && !self.config.live {
                    self.incomplete.insert(dk);
                }
                return Ok(());
            }
            Opened::Missing if create => {
                self.probes += 1;
                self.push(Output::CreateProbe(request));
                return Ok(());
            }
            Opened::Missing => return Ok(()),
        };
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return Ok(());
        };
        if let Some(target) = target {
            feed.sync.set_target(target);
            let contiguous = feed.checked(view).contiguous_length;
            if contiguous < target && !self.config.live && self.incomplete.insert(dk) {
                self.blocks_known += target - contiguous;
            }
        }
        // Opens the channel of a tracked feed, once.
        if !std::mem::replace(&mut feed.opened, true) {
            self.push(Output::OpenChannel(key));
        }
        Ok(())
    }

    fn insert_feed(&mut self, dk: DiscoveryKey, key: FeedKey, target: Option<u64>, probe: bool) {
        if self.feeds.get(&dk).is_none_or(|feed| feed.in_sync) {
            self.feeds_out_of_sync += 1;
            // Live: a feed (re)opened on news is out of sync until both hold it again, and
            // `Synced` is reported again then.
            self.synced_reported = false;
        }
        let mut sync = SyncState::new(self.config.max_in_flight);
        if let Some(target) = target {
            sync.set_target(target);
        }
        self.feeds.insert(
            dk,
            FeedSync {
                key,
                opened: false,
                channel_open: false,
                sync,
                probe,
                remote_contiguous: 0,
                in_sync: false,
                in_sync_since: None,
            },
        );
    }

    /// Reports a feed of ours the host cannot open; the replication goes on without it.
    pub(super) fn feed_unavailable(&mut self, key: FeedKey, reason: String) {
        if !self.unavailable.insert(key) {
            return;
        }
        self.summary.feeds_unavailable += 1;
        self.incomplete.remove(&discovery_key(&key));
        self.emit(ReplicationEvent::FeedUnavailable { key, reason });
    }

    /// A probe's first signed root verified: the host records the feed (the owner carries out
    /// [`Output::Promote`]) and it goes on syncing there. Returns false when this connection
    /// may add no more feeds: the probe is dropped.
    pub(super) fn promote(&mut self, dk: DiscoveryKey, proof: hypercore_schema::Proof) -> bool {
        self.probes = self.probes.saturating_sub(1);
        let Some(key) = self.feeds.get(&dk).map(|feed| feed.key) else {
            return false;
        };
        if self.feeds_added >= self.config.max_new_feeds {
            self.forget_feed(dk);
            self.incomplete.remove(&dk);
            self.push(Output::DropFeed(dk));
            self.start_waiting();
            return false;
        }
        self.feeds_added += 1;
        self.push(Output::Promote { dk, key, proof });
        self.emit(ReplicationEvent::FeedAdded(key));
        if let Some(feed) = self.feeds.get_mut(&dk) {
            feed.probe = false;
            feed.sync.forget_confirmed();
        }
        self.start_waiting();
        true
    }

    /// Starts new feeds that waited for a probe slot.
    fn start_waiting(&mut self) {
        // Each start that finds the feed missing takes a slot when its answer comes back; count
        // them here so that no more start than there are slots.
        let mut starting = 0;
        while self.probes + starting < MAX_PROBES {
            let Some((key, target)) = self.waiting.pop_front() else {
                break;
            };
            starting += 1;
            let _ = self.track_feed(key, target, true);
        }
    }
}
