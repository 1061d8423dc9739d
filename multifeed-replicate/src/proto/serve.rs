//! Serving: which of the peer's requests to answer now, which wait (bounded) while the
//! transport is behind, and the answer to each.

use std::time::Instant;

use hypercore_protocol::schema::{Data, NoData, Request};
use hypercore_protocol::Message;
use hypercore_schema::Proof;

use super::{Connection, DiscoveryKey, FeedView, Output};
use crate::error::PeerViolation;
use crate::ReplicateError;

impl Connection {
    /// A request from the peer: answered now, or held while the transport is behind (instead
    /// of growing the protocol's write queue). Too many held ends the connection.
    pub(super) fn on_request(
        &mut self,
        _now: Instant,
        dk: DiscoveryKey,
        request: Request,
    ) -> Result<(), ReplicateError> {
        if self.deferred.is_empty() && !self.outgoing_full() {
            self.serve(dk, request);
        } else if self.deferred.len() >= self.config.max_queued_requests {
            return Err(ReplicateError::peer(
                crate::Phase::Replication,
                PeerViolation::TooManyRequests {
                    limit: self.config.max_queued_requests,
                },
            ));
        } else {
            self.deferred.push_back((dk, request));
        }
        Ok(())
    }

    /// Asks the owner to answer a request; false if its channel is gone.
    fn serve(&mut self, dk: DiscoveryKey, request: Request) -> bool {
        let open = self.feeds.get(&dk).is_some_and(|feed| feed.channel_open);
        if open {
            self.push(Output::Serve { dk, request });
        }
        open
    }

    /// The transport drained to `backlog`: waiting announcements go out, then waiting
    /// requests, one at a time while it keeps up (each answer counts before the next).
    pub(crate) fn handle_drained(&mut self, backlog: u64) {
        self.transport_backlog = backlog;
        self.draining = true;
        self.drain_next();
    }

    /// Hands out the next waiting announcement or request, if the transport keeps up.
    fn drain_next(&mut self) {
        while self.draining {
            if self.outgoing_full() {
                break;
            }
            if let Some(&dk) = self.unannounced.iter().next() {
                self.unannounced.remove(&dk);
                self.push(Output::Announce(dk));
                return;
            }
            if self.queued_full() {
                break;
            }
            let Some((dk, request)) = self.deferred.pop_front() else {
                break;
            };
            if self.serve(dk, request) {
                return;
            }
        }
        self.draining = false;
    }

    /// The view of a feed whose announcement waited ([`Output::Announce`]); `None` if the
    /// feed is gone.
    pub(crate) fn handle_announce(&mut self, dk: DiscoveryKey, view: Option<&dyn FeedView>) {
        if let Some(view) = view {
            self.announce(dk, view);
        }
        self.drain_next();
    }

    /// The proof answering a request ([`Output::Serve`]), or `None` when we cannot answer it.
    pub(crate) fn handle_served(
        &mut self,
        now: Instant,
        dk: DiscoveryKey,
        request: u64,
        proof: Option<Proof>,
    ) {
        let message = match proof {
            Some(proof) => {
                self.clock.progress(now);
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
                    request,
                    fork: proof.fork,
                    hash: proof.hash,
                    block: proof.block,
                    seek: proof.seek,
                    upgrade: proof.upgrade,
                })
            }
            // We lack it, or the request makes no sense for this feed: say so, keep going.
            None => Message::NoData(NoData { request }),
        };
        self.send(dk, vec![message]);
        if self.draining {
            self.drain_next();
        }
    }
}
