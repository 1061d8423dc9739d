//! Live: the channels of idle feeds close, and open again on news.
//!
//! Once a feed has been in sync (both sides hold the same length, complete) and quiet for
//! [`close_idle_channels_after`](crate::ReplicateConfig::close_idle_channels_after), the
//! initiator closes its channel and both sides let its hypercore go: a live connection's open
//! channels and cores follow the feeds that change, not every feed agreed. The feed is
//! *parked*: still agreed, its discovery key still known. Whichever side then has news for it
//! (an append, or blocks another connection stored, heard through
//! [`FeedHost::subscribe_changes`](crate::FeedHost::subscribe_changes)) opens the channel
//! again, and the other side answers the open as for any agreed feed.
//!
//! Only the initiator closes (hypercore-protocol 0.7.2 closes by local channel id: two closes
//! crossing each other can close a channel opened meanwhile), and only towards a peer of meta
//! protocol 2.1 or later, which reopens on news. A 2.0 peer keeps every channel open.
//!
//! Races are settled by one rule: a side that gets the peer's close of a feed it does not see
//! in sync (its own news was on the way, or the close crossed a reopen) opens it again.

use std::time::Instant;

use hypercore_protocol::discovery_key;

use super::{Connection, DiscoveryKey, LocalFeedsFor, Output};
use crate::LocalChange;

impl Connection {
    /// Whether this side closes the channels of idle feeds.
    fn closes_idle_channels(&self) -> bool {
        self.config.live
            && self.config.initiator
            && self.exchange.is_some()
            && self.peer_reopens
            && self.config.idle_channel_timeout.is_some()
    }

    /// A tracked feed came in sync now: its channel may close once it stayed so.
    pub(super) fn came_in_sync(&mut self, dk: DiscoveryKey) {
        let now = self.clock.latest();
        if let Some(feed) = self.feeds.get_mut(&dk) {
            feed.in_sync_since = Some(now);
        }
        if let (true, Some(after)) = (
            self.closes_idle_channels(),
            self.config.idle_channel_timeout,
        ) {
            self.idle_queue.push_back((now + after, dk));
        }
    }

    /// Closes the channels of feeds that stayed in sync and quiet until `now`.
    pub(super) fn close_idle_channels(&mut self, now: Instant) {
        let Some(after) = self.config.idle_channel_timeout else {
            return;
        };
        while let Some(&(at, dk)) = self.idle_queue.front() {
            if at > now {
                break;
            }
            self.idle_queue.pop_front();
            if !self.deferred.is_empty() {
                // The peer's requests wait for the transport: nothing closes until they left.
                if self.feeds.contains_key(&dk) {
                    self.idle_queue.push_back((now + after, dk));
                }
                continue;
            }
            self.close_idle(dk, now, after);
        }
    }

    fn close_idle(&mut self, dk: DiscoveryKey, now: Instant, after: std::time::Duration) {
        let Some(feed) = self.feeds.get(&dk) else {
            return;
        };
        let quiet = feed.in_sync && feed.in_sync_since.is_some_and(|since| since + after <= now);
        if !quiet
            || !feed.channel_open
            || !feed.sync.idle()
            || feed.probe
            || self.syncing.contains(&dk)
            || self.unannounced.contains(&dk)
        {
            return;
        }
        let length = feed.sync.remote_length();
        self.forget_feed(dk);
        self.parked.insert(dk, length);
        self.push(Output::CloseChannel(dk));
        self.push(Output::DropFeed(dk));
    }

    /// Live: the peer closed the channel of a tracked feed (idle, as it saw it). In sync, the
    /// feed is parked; otherwise this side has news the peer did not see, or the close crossed
    /// a reopen: it opens the channel again.
    pub(super) fn live_feed_closed(&mut self, dk: DiscoveryKey) {
        let Some(feed) = self.feeds.get(&dk) else {
            return;
        };
        let (key, in_sync, length) = (feed.key, feed.in_sync, feed.sync.remote_length());
        self.forget_feed(dk);
        self.push(Output::DropFeed(dk));
        if in_sync || !self.peer_reopens {
            self.parked.insert(dk, length);
        } else {
            let _ = self.track_feed(key, None, false);
        }
    }

    /// A change to the host's feeds (live, from
    /// [`FeedHost::subscribe_changes`](crate::FeedHost::subscribe_changes)): a parked feed
    /// with news opens its channel again. Tracked feeds hear of their changes through their
    /// own cores ([`handle_local_change`](Self::handle_local_change)).
    pub(crate) fn handle_host_change(&mut self, change: LocalChange) {
        if self.parked.is_empty() {
            // Nothing parked: a change missed concerns a tracked feed, which its core tells.
            return;
        }
        match change {
            LocalChange::Feed(key) => {
                let dk = discovery_key(&key);
                if self.parked.contains_key(&dk) {
                    self.reopen(dk, key);
                }
            }
            LocalChange::Lagged => {
                if !self
                    .local_feeds_for
                    .iter()
                    .any(|purpose| matches!(purpose, LocalFeedsFor::Recheck))
                {
                    self.want_local_feeds(LocalFeedsFor::Recheck);
                }
            }
        }
    }

    /// Changes may have been missed: every parked feed that is not as it was parked opens
    /// its channel again.
    pub(super) fn recheck_parked(&mut self, feeds: &[crate::LocalFeed]) {
        for feed in feeds {
            let dk = feed
                .discovery_key
                .unwrap_or_else(|| discovery_key(&feed.key));
            let Some(&length) = self.parked.get(&dk) else {
                continue;
            };
            if feed.length != length || feed.contiguous_length < feed.length {
                self.reopen(dk, feed.key);
            }
        }
    }

    /// Opens the channel of a parked feed again (unless it is no longer ours to replicate).
    fn reopen(&mut self, dk: DiscoveryKey, key: multifeed_storage::FeedKey) {
        self.parked.remove(&dk);
        if self.offers(&key) || self.accepts(&key) {
            let _ = self.track_feed(key, None, false);
        }
    }
}
