//! Fetching: the requests we send for a feed's upgrade and blocks, and what we do with the
//! answers (verify, store, ask again, or give up on a peer whose answers bring nothing).

use hypercore_protocol::schema::{Data, Request};
use hypercore_protocol::Message;
use hypercore_schema::{RequestBlock, RequestUpgrade};

use super::{DiscoveryKey, Driver, MAX_FRUITLESS_ANSWERS};
use crate::adapter::Applied;
use crate::error::PeerViolation;
use crate::sync::{Asked, Download, SyncState};
use crate::ReplicateError;

impl Driver {
    /// Asks the peer for the upgrade and the blocks we lack, keeping many requests in flight.
    pub(super) async fn request_more(&mut self, dk: DiscoveryKey) -> Result<(), ReplicateError> {
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return Ok(());
        };
        let Some(channel) = feed.channel.clone() else {
            return Ok(());
        };
        let mut messages = Vec::new();
        let download = {
            let mut core = feed.core.lock().await;
            let info = checked_info(&core, &mut feed.sync);
            if let Some((id, block)) =
                feed.sync
                    .start_upgrade(info.fork, info.length, info.contiguous_length)
            {
                let block = match block {
                    Some(index) => Some(RequestBlock {
                        index,
                        nodes: core
                            .missing_nodes(index)
                            .await
                            .map_err(|e| ReplicateError::hypercore(&feed.key, e))?,
                    }),
                    None => None,
                };
                let upgrade = RequestUpgrade {
                    start: info.length,
                    length: feed.sync.remote_length() - info.length,
                };
                messages.push(Message::Request(request(
                    id,
                    info.fork,
                    block,
                    Some(upgrade),
                )));
            }
            let blocks = feed
                .sync
                .next_blocks(info.contiguous_length, info.length, |i| core.has(i));
            for (index, id) in blocks {
                let nodes = match feed.sync.nodes_for(
                    index,
                    id,
                    info.fork,
                    info.contiguous_length,
                    info.length,
                ) {
                    Some(nodes) => nodes,
                    None => core
                        .missing_nodes(index)
                        .await
                        .map_err(|e| ReplicateError::hypercore(&feed.key, e))?,
                };
                messages.push(Message::Request(request(
                    id,
                    info.fork,
                    Some(RequestBlock { index, nodes }),
                    None,
                )));
            }
            feed.sync.download(info.contiguous_length, info.length)
        };
        match download {
            Download::Reached => {
                self.incomplete.remove(&dk);
            }
            // The peer lacks blocks we lack: this download is as complete as it can get here.
            Download::PeerExhausted if self.incomplete.remove(&dk) => {
                self.summary.feeds_incomplete += 1;
            }
            _ => {}
        }
        if messages.is_empty() {
            return Ok(());
        }
        // A new burst: the blocks of the previous one are a batch the host may make durable.
        self.blocks_stored().await?;
        self.queue(dk, &channel, messages);
        Ok(())
    }

    /// Verifies and stores a proof from the peer; a proof that fails verification ends the
    /// connection. Data we never asked for is ignored, and so is an answer about another block
    /// than the one asked for; a feed whose answers bring nothing [`MAX_FRUITLESS_ANSWERS`]
    /// times in a row ends the connection ([`PeerViolation::NoProgress`]).
    pub(super) async fn on_data(
        &mut self,
        dk: DiscoveryKey,
        data: Data,
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
            return self.request_more(dk).await;
        }
        if !crate::adapter::well_formed(&data) {
            return Err(ReplicateError::InvalidProof {
                key: feed.key,
                reason: "a tree node hash is not 32 bytes".to_owned(),
            });
        }
        let block_bytes = data.block.as_ref().map(|b| b.value.len() as u64);
        let proof = data.into_proof();
        let probe_proof = feed.probe.then(|| proof.clone());
        let asked_block = match asked {
            Asked::Block(index) | Asked::UpgradeAndBlock(index) => Some(index),
            Asked::Upgrade => None,
        };
        let (applied, before, info, stored) = {
            let mut core = feed.core.lock().await;
            let before = checked_info(&core, &mut feed.sync);
            if let (Asked::Block(index), Some(block), true) = (asked, &proof.block, optimistic) {
                let depth = block.nodes.len() as u64;
                if block.index == index
                    && before.fork == 0
                    && !crate::sync::anchor_held(
                        index,
                        depth,
                        before.contiguous_length,
                        before.length,
                        |i| core.has(i),
                    )
                {
                    // The block before it is not here (answered out of order, or not at all):
                    // ask again, counting on our contiguous blocks only from now on.
                    drop(core);
                    feed.sync.out_of_order(index);
                    return self.request_more(dk).await;
                }
            }
            let had_block = asked_block.is_some_and(|index| core.has(index));
            let applied = crate::adapter::apply_proof(&mut core, &proof).await;
            let held = asked_block.map(|index| core.has(index));
            let after = checked_info(&core, &mut feed.sync);
            (applied, before, after, (had_block, held))
        };
        let (had_block, held) = stored;
        let stored = !had_block && held == Some(true);
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
            feed.core.notify_changed();
            self.unsynced_blocks = true;
        }
        if let (Some(proof), true) = (probe_proof, progressed && info.length > 0) {
            if !self.promote(dk, &proof).await? {
                return Ok(());
            }
        }
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return Ok(());
        };
        if progressed || !useless {
            self.backlog.on_progress();
        }
        if let Some(index) = asked_block {
            if stored {
                let entry = self
                    .downloaded
                    .entry(dk)
                    .or_insert((feed.key, index..index + 1, 0));
                entry.1.start = entry.1.start.min(index);
                entry.1.end = entry.1.end.max(index + 1);
                entry.2 += 1;
                self.summary.blocks_received += 1;
                self.summary.bytes_received += block_bytes.unwrap_or(0);
                self.progress_dirty = true;
            } else if !info_has(&info, index) {
                feed.sync.retry_from(index);
            }
        }
        if useless && !progressed {
            self.fruitless(dk)?;
        }
        if matches!(asked, Asked::Upgrade | Asked::UpgradeAndBlock(_)) {
            self.announce(dk).await?;
        }
        self.request_more(dk).await
    }

    /// Counts an answer that brought nothing; too many in a row end the connection.
    pub(super) fn fruitless(&mut self, dk: DiscoveryKey) -> Result<(), ReplicateError> {
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

/// The core's info, with a contiguous length that counts only blocks the core holds.
///
/// hypercore 0.16 reports the contiguous length of its header even when its bitfield lost the
/// blocks (a damaged or deleted bitfield file): a sync then took the feed for complete and
/// fetched nothing. The feed's sync state remembers how far blocks were confirmed, so each
/// call checks only blocks not confirmed yet (one lookup per block over a connection).
pub(super) fn checked_info(core: &hypercore::Hypercore, sync: &mut SyncState) -> hypercore::Info {
    let mut info = core.info();
    info.contiguous_length = sync.confirmed_contiguous(info.contiguous_length, |i| core.has(i));
    info
}

/// Whether a block below the contiguous length (so certainly held) is `index`.
fn info_has(info: &hypercore::Info, index: u64) -> bool {
    index < info.contiguous_length
}

fn request(
    id: u64,
    fork: u64,
    block: Option<RequestBlock>,
    upgrade: Option<RequestUpgrade>,
) -> Request {
    Request {
        id,
        fork,
        hash: None,
        block,
        seek: None,
        upgrade,
        manifest: false,
        priority: 0,
    }
}
