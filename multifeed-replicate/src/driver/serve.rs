//! Serving: answering the peer's requests with proofs, and holding them (bounded) while the
//! transport is behind.

use hypercore_protocol::schema::{Data, NoData, Request};
use hypercore_protocol::Message;

use super::{DiscoveryKey, Driver, MAX_OUTBOX, MAX_OUTBOX_WEIGHT};
use crate::backlog::OUTGOING_HIGH;
use crate::ReplicateError;

impl Driver {
    /// Whether what waits for the transport is above the high-water mark: requests then wait.
    pub(super) fn outgoing_full(&self) -> bool {
        self.backlog.outgoing() + self.outbox_weight > OUTGOING_HIGH
    }

    /// Sends waiting announcements, then answers waiting requests, while the transport keeps
    /// up.
    pub(super) async fn serve_deferred(&mut self) -> Result<(), ReplicateError> {
        while !self.outgoing_full() {
            let Some(&dk) = self.unannounced.iter().next() else {
                break;
            };
            self.unannounced.remove(&dk);
            self.announce(dk).await?;
        }
        while !self.outgoing_full()
            && self.outbox_len < MAX_OUTBOX
            && self.outbox_weight < MAX_OUTBOX_WEIGHT
        {
            let Some((dk, request)) = self.deferred.pop_front() else {
                break;
            };
            self.serve(dk, request).await?;
        }
        Ok(())
    }

    /// Answers a request with a proof, or NoData.
    pub(super) async fn serve(
        &mut self,
        dk: DiscoveryKey,
        request: Request,
    ) -> Result<(), ReplicateError> {
        let Some(feed) = self.feeds.get(&dk) else {
            return Ok(());
        };
        let Some(channel) = feed.channel.clone() else {
            return Ok(());
        };
        let key = feed.key;
        let mut proof = {
            let mut core = feed.core.lock().await;
            crate::adapter::create_proof(&mut core, &request).await
        };
        // Never serve bytes the feed's own tree contradicts (damaged on disk).
        if let Some(found) = &proof {
            if let Some(block) = &found.block {
                if !self
                    .host
                    .block_intact(&key, block.index, &block.value)
                    .await
                {
                    proof = None;
                }
            }
        }
        let message = match proof {
            Some(proof) => {
                self.backlog.on_progress();
                if proof.upgrade.is_some() {
                    if let Some(feed) = self.feeds.get_mut(&dk) {
                        feed.sync.upgrade_served();
                    }
                }
                if let Some(block) = &proof.block {
                    self.summary.blocks_sent += 1;
                    self.summary.bytes_sent += block.value.len() as u64;
                }
                Message::Data(Data {
                    request: request.id,
                    fork: proof.fork,
                    hash: proof.hash,
                    block: proof.block,
                    seek: proof.seek,
                    upgrade: proof.upgrade,
                })
            }
            // We lack it, or the request makes no sense for this feed: say so, keep going.
            None => Message::NoData(NoData {
                request: request.id,
            }),
        };
        self.queue(dk, &channel, vec![message]);
        Ok(())
    }
}
