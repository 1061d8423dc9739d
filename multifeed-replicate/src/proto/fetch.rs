//! Fetching: what we tell the peer we hold, the requests we send for a feed's upgrade and
//! blocks, and what we do with the answers (apply, ask again, or give up on a peer whose
//! answers bring nothing).

use std::time::Instant;

use hypercore_protocol::schema::{Data, Range, Synchronize};
use hypercore_protocol::Message;
use hypercore_schema::RequestUpgrade;

use super::{Applying, Connection, DiscoveryKey, FeedView, Output, MAX_FRUITLESS_ANSWERS};
use crate::adapter::Applied;
use crate::error::PeerViolation;
use crate::proto::sync::{anchor_held, Asked, Download};
use crate::ReplicateError;

impl Connection {
    /// Tells the peer our length and what we hold.
    pub(super) fn announce(&mut self, dk: DiscoveryKey, view: &dyn FeedView) {
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return;
        };
        if !feed.channel_open {
            return;
        }
        let info = feed.checked(view);
        self.note_sync(dk, info);
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return;
        };
        let mut messages = vec![Message::Synchronize(Synchronize {
            fork: info.fork,
            length: info.length,
            remote_length: feed.sync.remote_length(),
            can_upgrade: true,
            uploading: true,
            downloading: true,
        })];
        if info.contiguous_length > 0 {
            messages.push(Message::Range(Range {
                drop: false,
                start: 0,
                length: info.contiguous_length,
            }));
        }
        self.send(dk, messages);
    }

    pub(super) fn on_synchronize(
        &mut self,
        now: Instant,
        dk: DiscoveryKey,
        sync: &Synchronize,
        view: &dyn FeedView,
    ) {
        let plain = self.exchange.is_none();
        let live = self.config.live;
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return;
        };
        if feed.sync.remote_length() != sync.length {
            self.clock.progress(now);
        }
        let first = feed.sync.on_remote_sync(sync.fork, sync.length);
        if feed.sync.target().is_none() && plain && !live {
            // Plain mode: download up to what the peer has.
            feed.sync.set_target(sync.length);
            if self
                .config
                .plain_feeds
                .as_ref()
                .is_some_and(|keys| keys.contains(&feed.key))
            {
                self.summary.feeds_received += 1;
            }
            let contiguous = feed.checked(view).contiguous_length;
            if contiguous < sync.length {
                self.blocks_known += sync.length - contiguous;
                self.incomplete.insert(dk);
            }
        }
        if first {
            self.announce(dk, view);
        }
        self.request_more(dk, view);
    }

    /// Asks the peer for the upgrade and the blocks we lack, keeping many requests in flight.
    pub(super) fn request_more(&mut self, dk: DiscoveryKey, view: &dyn FeedView) {
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return;
        };
        if !feed.channel_open {
            return;
        }
        let mut requests = Vec::new();
        let info = feed.checked(view);
        if let Some((id, block)) =
            feed.sync
                .start_upgrade(info.fork, info.length, info.contiguous_length)
        {
            requests.push(Output::Request {
                dk,
                id,
                fork: info.fork,
                block: block.map(|index| (index, None)),
                upgrade: Some(RequestUpgrade {
                    start: info.length,
                    length: feed.sync.remote_length() - info.length,
                }),
            });
        }
        let blocks = feed
            .sync
            .next_blocks(info.contiguous_length, info.length, |i| view.has(i));
        for (index, id) in blocks {
            let nodes =
                feed.sync
                    .nodes_for(index, id, info.fork, info.contiguous_length, info.length);
            requests.push(Output::Request {
                dk,
                id,
                fork: info.fork,
                block: Some((index, nodes)),
                upgrade: None,
            });
        }
        let done = match feed.sync.download(info.contiguous_length, info.length) {
            Download::Reached => {
                self.incomplete.remove(&dk);
                true
            }
            // The peer lacks blocks we lack: this download is as complete as it can get here.
            Download::PeerExhausted => {
                if self.incomplete.remove(&dk) {
                    self.summary.feeds_incomplete += 1;
                }
                true
            }
            _ => false,
        };
        // A finished download tells the peer what it now holds: the initiator closes the
        // channel once both sides hold the feed complete.
        if done && requests.is_empty() && self.download_done(dk) {
            self.announce(dk, view);
        }
        self.note_sync(dk, info);
        if requests.is_empty() {
            // The download went quiet (live: until news): what it stored is a batch too, and
            // is reported now, not when the next burst starts.
            if self.feeds.get(&dk).is_some_and(|feed| feed.sync.idle()) {
                self.blocks_stored();
            }
            self.close_if_in_sync(dk, view);
            return;
        }
        // A new burst: the blocks of the previous one are a batch the host may make durable.
        self.blocks_stored();
        self.queued.0 += requests.len();
        self.clock.sent();
        self.outputs.extend(requests);
    }

    /// Lets the host make the blocks stored so far durable, and reports them.
    pub(super) fn blocks_stored(&mut self) {
        if std::mem::take(&mut self.unsynced_blocks) {
            self.push(Output::SyncBlocks);
        }
        let mut downloaded: Vec<_> = std::mem::take(&mut self.downloaded).into_values().collect();
        // One order, whatever the map's: the same input gives the same output.
        downloaded.sort_by_key(|entry| entry.0);
        for (key, range, blocks) in downloaded {
            self.emit(crate::ReplicationEvent::Downloaded { key, range, blocks });
        }
    }

    /// A proof from the peer. Data we never asked for is ignored, and so is an answer about
    /// another block than the one asked for; a feed whose answers bring nothing
    /// [`MAX_FRUITLESS_ANSWERS`] times in a row ends the connection
    /// ([`PeerViolation::NoProgress`]). A proof to apply goes out as [`Output::Apply`].
    pub(super) fn on_data(
        &mut self,
        _now: Instant,
        dk: DiscoveryKey,
        data: Data,
        view: &dyn FeedView,
    ) -> Result<(), ReplicateError> {
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return Ok(());
        };
        let Some(asked) = feed.sync.on_data(data.request) else {
            return Ok(());
        };
        let optimistic = feed.sync.take_optimistic(data.request);
        if !answers(asked, &data) {
            if let Asked::Block(index) | Asked::UpgradeAndBlock(index) = asked {
                feed.sync.retry_from(index);
            }
            self.fruitless(dk)?;
            self.request_more(dk, view);
            return Ok(());
        }
        if !crate::adapter::well_formed(&data) {
            return Err(ReplicateError::InvalidProof {
                key: feed.key,
                reason: "a tree node hash is not 32 bytes".to_owned(),
            });
        }
        let block_bytes = data.block.as_ref().map(|b| b.value.len() as u64);
        let proof = data.into_proof();
        let before = feed.checked(view);
        if let (Asked::Block(index), Some(block), true) = (asked, &proof.block, optimistic) {
            let depth = block.nodes.len() as u64;
            if block.index == index
                && before.fork == 0
                && !anchor_held(index, depth, before.contiguous_length, before.length, |i| {
                    view.has(i)
                })
            {
                // The block before it is not here (answered out of order, or not at all): ask
                // again, counting on our contiguous blocks only from now on.
                feed.sync.out_of_order(index);
                self.request_more(dk, view);
                return Ok(());
            }
        }
        let mut applying = Applying {
            dk,
            asked,
            block_bytes,
            had_block: false,
            before,
            probe: feed.probe,
        };
        applying.had_block = applying.asked_block().is_some_and(|index| view.has(index));
        self.push(Output::Apply { applying, proof });
        Ok(())
    }

    /// What applying a proof ([`Output::Apply`]) did; `view` is the feed after it.
    pub(crate) fn handle_applied(
        &mut self,
        now: Instant,
        applying: Applying,
        proof: hypercore_schema::Proof,
        applied: Applied,
        view: &dyn FeedView,
    ) -> Result<(), ReplicateError> {
        let dk = applying.dk;
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return Ok(());
        };
        let asked_block = applying.asked_block();
        let held = asked_block.map(|index| view.has(index));
        let info = feed.checked(view);
        let before = applying.before;
        let stored = !applying.had_block && held == Some(true);
        // Not applied (another fork), or the block asked for is still missing: the answer
        // brought nothing. A block that arrived twice (from two peers) is not the peer's fault.
        let useless = match applied {
            Applied::Verified(changed) => !changed || held == Some(false),
            Applied::Io(source) => {
                return Err(ReplicateError::Hypercore {
                    key: feed.key,
                    source,
                })
            }
            Applied::Invalid(reason) => {
                return Err(ReplicateError::InvalidProof {
                    key: feed.key,
                    reason,
                })
            }
        };
        let progressed = stored || info.length != before.length || info.fork != before.fork;
        if progressed {
            feed.sync.progressed();
            self.push(Output::NotifyChanged(dk));
            self.unsynced_blocks = true;
        }
        if applying.probe && progressed && info.length > 0 && !self.promote(dk, proof) {
            return Ok(());
        }
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return Ok(());
        };
        if progressed || !useless {
            self.clock.progress(now);
        }
        if let Some(index) = asked_block {
            if stored {
                let key = feed.key;
                let entry = self
                    .downloaded
                    .entry(dk)
                    .or_insert((key, index..index + 1, 0));
                entry.1.start = entry.1.start.min(index);
                entry.1.end = entry.1.end.max(index + 1);
                entry.2 += 1;
                self.summary.blocks_received += 1;
                self.summary.bytes_received += applying.block_bytes.unwrap_or(0);
                self.progress_dirty = true;
            } else if index >= info.contiguous_length {
                feed.sync.retry_from(index);
            }
        }
        if useless && !progressed {
            self.fruitless(dk)?;
        }
        // After an upgrade, and once the feed is complete here (the peer then knows both sides
        // hold it all: live, that is `Synced`; non-live, the initiator closes the channel).
        let completed = stored
            && info.contiguous_length == info.length
            && before.contiguous_length < info.length;
        if completed || matches!(applying.asked, Asked::Upgrade | Asked::UpgradeAndBlock(_)) {
            self.announce(dk, view);
        }
        self.request_more(dk, view);
        Ok(())
    }

    /// Counts an answer that brought nothing; too many in a row end the connection.
    fn fruitless(&mut self, dk: DiscoveryKey) -> Result<(), ReplicateError> {
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return Ok(());
        };
        let fruitless = feed.sync.fruitless_answer();
        if fruitless > MAX_FRUITLESS_ANSWERS {
            return Err(ReplicateError::peer(
                crate::Phase::Replication,
                PeerViolation::NoProgress {
                    key: feed.key,
                    answers: fruitless,
                },
            ));
        }
        Ok(())
    }
}

/// Whether a Data message answers what was asked: the block asked for (or none), the upgrade
/// when only an upgrade was asked for, and no upgrade we did not ask for.
fn answers(asked: Asked, data: &Data) -> bool {
    if matches!(asked, Asked::Block(_)) && data.upgrade.is_some() {
        return false;
    }
    match (asked, &data.block) {
        (Asked::Block(index) | Asked::UpgradeAndBlock(index), Some(block)) => block.index == index,
        (Asked::Block(_), None) => false,
        (Asked::UpgradeAndBlock(_), None) => data.upgrade.is_some(),
        (Asked::Upgrade, Some(_)) => false,
        (Asked::Upgrade, None) => data.upgrade.is_some(),
    }
}
