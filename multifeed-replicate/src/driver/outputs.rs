//! Carrying out the core's outputs: messages queued for the protocol, channels opened and
//! closed, feeds opened from the host or into probes, proofs served and applied through the
//! adapter, and the facts some outputs ask for handed back to the core.

use std::time::Instant;

use hypercore_protocol::discovery_key;

use super::Driver;
use crate::adapter;
use crate::proto::{OpenFeed, Opened, Output, Purpose};
use crate::ReplicateError;

impl Driver {
    /// Carries out every output of the core, in order, answering those that ask for a fact.
    pub(super) async fn drain(&mut self) -> Result<(), ReplicateError> {
        while let Some(output) = self.conn.poll_output() {
            self.carry_out(output).await?;
        }
        Ok(())
    }

    pub(super) async fn carry_out(&mut self, output: Output) -> Result<(), ReplicateError> {
        let now = Instant::now();
        match output {
            Output::Send { dk, messages } => self.queue(dk, messages),
            Output::Request {
                dk,
                id,
                fork,
                block,
                upgrade,
            } => {
                let block = match block {
                    Some((index, None)) => {
                        let Some(core) = self.cores.get(&dk).cloned() else {
                            return Ok(());
                        };
                        let nodes = adapter::missing_nodes(&core, index).await?;
                        Some((index, Some(nodes)))
                    }
                    block => block,
                };
                self.queue_request(dk, id, fork, block, upgrade);
            }
            Output::OpenChannel(key) => {
                tracing::trace!(feed = %hex::encode(&key[..8]), "open channel");
                // What we queued (the exchange's offers) must reach the peer before the open.
                self.flush_outbox().await?;
                self.commands
                    .open(key)
                    .await
                    .map_err(|e| ReplicateError::io(crate::Phase::Replication, e))?;
            }
            Output::CloseChannel(dk) => {
                self.flush_outbox().await?;
                if let Some(channel) = self.channels.remove(&dk) {
                    let _ = channel.close().await;
                }
            }
            Output::ListLocalFeeds => {
                // What is queued (our HANDSHAKE) leaves while the host lists its feeds.
                self.flush_outbox().await?;
                let feeds = self
                    .host
                    .local_feeds()
                    .await
                    .map_err(ReplicateError::Host)?;
                // The time after listing: the core counts its own host's time apart.
                self.conn
                    .handle_local_feeds(std::time::Instant::now().max(now), feeds)?;
            }
            Output::OpenFeed(request) => self.open_feed(now, request).await?,
            Output::CreateProbe(request) => {
                let dk = discovery_key(&request.key);
                let core = adapter::probe_core(&request.key).await?;
                self.cores.insert(dk, core.clone());
                let core = core.lock().await;
                self.conn
                    .handle_feed_opened(now, request, Opened::Probe(&*core))?;
            }
            Output::DropFeed(dk) => {
                self.cores.remove(&dk);
                // Its change stream ends (and lets go of the core).
                if self.watching.remove(&dk).is_some() {
                    self.released = true;
                }
            }
            Output::Serve { dk, request } => {
                let Some(core) = self.cores.get(&dk).cloned() else {
                    return Ok(());
                };
                let id = request.id;
                let proof = adapter::serve(&core, &*self.host, &request).await;
                self.conn.handle_served(now, dk, id, proof);
            }
            Output::Apply { applying, proof } => {
                let Some(core) = self.cores.get(&applying.dk).cloned() else {
                    return Ok(());
                };
                let mut core = core.lock().await;
                let applied = adapter::apply_proof(&mut core, &proof).await;
                self.conn
                    .handle_applied(now, applying, proof, applied, &*core)?;
            }
            Output::Promote { dk, key, proof } => {
                let core = adapter::promote(&*self.host, &key, &proof).await?;
                if self.live {
                    self.watch(dk, &core);
                }
                self.cores.insert(dk, core);
            }
            Output::Announce(dk) => match self.cores.get(&dk).cloned() {
                Some(core) => {
                    let core = core.lock().await;
                    self.conn.handle_announce(dk, Some(&*core));
                }
                None => self.conn.handle_announce(dk, None),
            },
            Output::NotifyChanged(dk) => {
                if let Some(core) = self.cores.get(&dk) {
                    core.notify_changed();
                }
            }
            Output::SyncBlocks => self
                .host
                .blocks_stored()
                .await
                .map_err(ReplicateError::Host)?,
            Output::Event(event) => self.emit(event),
        }
        Ok(())
    }

    /// Opens a feed for the core: from our own handle if we track it, else from the host.
    async fn open_feed(&mut self, now: Instant, request: OpenFeed) -> Result<(), ReplicateError> {
        let dk = discovery_key(&request.key);
        let track = matches!(request.purpose, Purpose::Track { .. });
        let core = match self.cores.get(&dk).filter(|_| track).cloned() {
            Some(core) => core,
            None => match self.host.open_feed(&request.key).await {
                Ok(Some(core)) => {
                    if track {
                        if self.live {
                            self.watch(dk, &core);
                        }
                        self.cores.insert(dk, core.clone());
                    }
                    core
                }
                Ok(None) => return self.conn.handle_feed_opened(now, request, Opened::Missing),
                Err(err) => {
                    let reason = Opened::Unavailable(err.to_string());
                    return self.conn.handle_feed_opened(now, request, reason);
                }
            },
        };
        let core = core.lock().await;
        self.conn
            .handle_feed_opened(now, request, Opened::Held(&*core))
    }
}
