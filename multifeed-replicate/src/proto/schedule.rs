//! The feed scheduler: at most `max_syncing_feeds` downloads at once per connection, the others
//! queued; a download's channel opens when its turn comes, and (non-live) closes once both
//! sides hold the feed complete, so a connection's open channels and tracked feeds follow its
//! working set, not the size of the stores. The limit is ours: the peer trusts nothing of it.

use hypercore_protocol::discovery_key;
use multifeed_storage::FeedKey;

use super::{Connection, DiscoveryKey, FeedView, Output};
use crate::ReplicateError;

impl Connection {
    /// Downloads `key` up to `target` now, or queues it until a slot frees.
    pub(super) fn schedule_download(
        &mut self,
        key: FeedKey,
        target: u64,
    ) -> Result<(), ReplicateError> {
        let dk = discovery_key(&key);
        if self.syncing.contains(&dk) || self.feeds.contains_key(&dk) {
            // Tracked already (the peer opened it first): it takes a slot as it is.
            self.syncing.insert(dk);
            return self.track_feed(key, Some(target), true);
        }
        if self.syncing.len() >= self.config.max_syncing_feeds {
            self.known.insert(dk, key);
            self.queued_downloads.push_back((key, target));
            if target > 0 && !self.config.live {
                self.incomplete.insert(dk);
            }
            return Ok(());
        }
        self.syncing.insert(dk);
        self.track_feed(key, Some(target), true)
    }

    /// A feed we only serve: known, so that the peer's open of it is answered (at once if the
    /// peer opened it already). Live, `Synced` waits until the peer opened it.
    pub(super) fn serve_when_opened(&mut self, key: FeedKey) -> Result<(), ReplicateError> {
        let dk = discovery_key(&key);
        self.known.insert(dk, key);
        if self.unknown_channels.remove(&dk) || self.feeds.contains_key(&dk) {
            return self.track_feed(key, None, false);
        }
        if self.config.live {
            self.unopened_served.insert(dk);
        }
        Ok(())
    }

    /// A download reached what it can get here: its slot goes to the next in line. Returns
    /// whether it held a slot (once per download).
    pub(super) fn download_done(&mut self, dk: DiscoveryKey) -> bool {
        if !self.syncing.remove(&dk) {
            return false;
        }
        while self.syncing.len() < self.config.max_syncing_feeds {
            let Some((key, target)) = self.queued_downloads.pop_front() else {
                break;
            };
            let _ = self.schedule_download(key, target);
        }
        true
    }

    /// Non-live multifeed: once both sides hold the feed complete and nothing is in flight, its
    /// channel closes and the connection forgets it.
    ///
    /// Only the initiator closes; the other side forgets the feed when the close arrives.
    /// (`hypercore-protocol` 0.7.2 closes a channel by its local id when our Close message
    /// leaves: if both sides closed at once, the peer's close freed the id first, and a channel
    /// opened meanwhile got it, our own Close closed that new channel. Seen as 2 feeds of
    /// 1,000 cut off before their first block.)
    pub(super) fn close_if_in_sync(&mut self, dk: DiscoveryKey, view: &dyn FeedView) {
        if self.config.live
            || !self.config.initiator
            || self.exchange.is_none()
            || self.syncing.contains(&dk)
        {
            return;
        }
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return;
        };
        let info = feed.checked(view);
        let in_sync = feed.channel_open
            && feed.sync.idle()
            && !feed.probe
            && info.contiguous_length == info.length
            && feed.sync.remote_length() == info.length
            && feed.remote_contiguous >= info.length;
        if in_sync {
            self.forget_feed(dk);
            self.push(Output::CloseChannel(dk));
            self.push(Output::DropFeed(dk));
        }
    }

    /// The peer closed the channel of a feed: a download it cut short ends here (counted as
    /// incomplete, never waited for), and the connection forgets the feed.
    pub(super) fn feed_closed(&mut self, dk: DiscoveryKey) {
        if self.syncing.contains(&dk) {
            if self.incomplete.remove(&dk) {
                self.summary.feeds_incomplete += 1;
            }
            let _ = self.download_done(dk);
        }
        if !self.config.live {
            if self.forget_feed(dk) {
                self.push(Output::DropFeed(dk));
            }
            return;
        }
        self.live_feed_closed(dk);
    }

    /// Stops tracking a feed; false if it was not tracked.
    pub(super) fn forget_feed(&mut self, dk: DiscoveryKey) -> bool {
        match self.feeds.remove(&dk) {
            Some(feed) => {
                if !feed.in_sync {
                    self.feeds_out_of_sync = self.feeds_out_of_sync.saturating_sub(1);
                }
                true
            }
            None => false,
        }
    }

    /// Records whether both sides hold the same length of a feed, complete.
    pub(super) fn note_sync(&mut self, dk: DiscoveryKey, info: crate::proto::FeedInfo) {
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return;
        };
        let in_sync = feed.sync.remote.is_some()
            && feed.sync.idle()
            && info.contiguous_length == info.length
            && feed.sync.remote_length() == info.length
            && feed.remote_contiguous >= info.length;
        if in_sync != feed.in_sync {
            feed.in_sync = in_sync;
            if in_sync {
                self.feeds_out_of_sync = self.feeds_out_of_sync.saturating_sub(1);
                self.came_in_sync(dk);
            } else {
                feed.in_sync_since = None;
                self.feeds_out_of_sync += 1;
                self.synced_reported = false;
            }
        }
    }

    /// Live: reports `Synced` when the exchange settled and every agreed feed is in sync;
    /// returns whether it did.
    pub(super) fn report_synced(&mut self) -> bool {
        let settled = self.exchange.as_ref().is_some_and(|e| e.settled());
        if settled
            && !self.synced_reported
            && self.feeds_out_of_sync == 0
            && self.queued_downloads.is_empty()
            && self.waiting.is_empty()
            && self.unopened_served.is_empty()
        {
            self.synced_reported = true;
            self.emit(crate::ReplicationEvent::Synced);
            return true;
        }
        false
    }
}
