//! The multifeed meta exchange on the root channel: our offers, the peer's, the feeds agreed,
//! and the end of a non-live replication.

use std::time::Instant;

use hypercore_protocol::discovery_key;
use hypercore_protocol::Message;
use multifeed_meta::{Action, FeedOffer};
use multifeed_storage::FeedKey;

use super::{Connection, OpenFeed, Opened, Output, Purpose, EXTENSION};
use crate::{LocalFeed, ReplicateError, ReplicationEvent};

/// Passes over our feed list for few offers before the map of it is built.
const MAX_LOCAL_SCANS: u8 = 4;

impl Connection {
    /// The local feeds are listed (our HANDSHAKE left when the root channel opened): our
    /// offers.
    pub(super) fn start_exchange(
        &mut self,
        now: Instant,
        feeds: Vec<LocalFeed>,
    ) -> Result<(), ReplicateError> {
        if self.exchange.is_none() {
            return Ok(());
        }
        let mut offers: Vec<FeedOffer> = Vec::with_capacity(feeds.len());
        // A feed held with gaps is always offered (the peer may fill them), even where the
        // reconciliation finds the lengths equal.
        let mut incomplete: Vec<(FeedKey, u64)> = Vec::new();
        for feed in &feeds {
            if !self.offers(&feed.key) {
                continue;
            }
            offers.push(FeedOffer {
                key: feed.key,
                length: feed.length,
            });
            if feed.contiguous_length < feed.length {
                incomplete.push((feed.key, feed.contiguous_length));
            }
        }
        // The peer may open any feed we offer: they are indexed by discovery key when it
        // opens one we have not (the host's discovery keys save a keyed BLAKE2b per feed).
        self.unindexed = true;
        self.local_lengths = feeds;
        self.local_index = None;
        self.local_scans = 0;
        let actions = match self.exchange.as_mut() {
            Some(exchange) => {
                exchange.mark_incomplete(incomplete);
                exchange.offer(offers)
            }
            None => Vec::new(),
        };
        self.apply(now, actions)
    }

    /// Carries out what the exchange decided.
    pub(super) fn apply(
        &mut self,
        now: Instant,
        actions: Vec<Action>,
    ) -> Result<(), ReplicateError> {
        if actions
            .iter()
            .any(|action| !matches!(action, Action::Send(_)))
        {
            self.progress(now);
        }
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send(message) => self.send_meta(message.encode()),
                Action::RemoteHandshake { user_data, version } => {
                    self.peer_reopens = version >= multifeed_meta::REOPENS_IDLE_CHANNELS;
                    self.clock.exchange_done();
                    let remote_key = self.remote_key;
                    self.emit(ReplicationEvent::RemoteHandshake {
                        user_data,
                        remote_key,
                    });
                }
                Action::RemoteOffered(offers) => {
                    // Keys that are not ed25519 public keys, or are of small order (anyone can
                    // sign for those), can never be trusted: ignore them.
                    let lacking = self.lacking(&offers);
                    let wanted: Vec<FeedKey> = offers
                        .iter()
                        .zip(lacking)
                        .filter(|(_, lacks)| *lacks)
                        .map(|(offer, _)| offer.key)
                        .filter(usable_feed_key)
                        .filter(|key| self.accepts(key))
                        .collect();
                    if let Some(exchange) = self.exchange.as_mut() {
                        queue.extend(exchange.request(wanted));
                    }
                }
                Action::Replicate(keys) => {
                    let mut downloads = Vec::new();
                    for key in keys {
                        let target = self
                            .exchange
                            .as_ref()
                            .and_then(|e| e.wanted().get(&key).copied());
                        if target.is_some() {
                            downloads.push(key);
                            self.summary.feeds_received += 1;
                        } else {
                            self.summary.feeds_sent += 1;
                        }
                        match target {
                            // Only a download creates a feed, in its turn.
                            Some(target) => self.schedule_download(key, target)?,
                            // One we only serve opens when the peer opens it, in the turn its
                            // own scheduler gives it (opening all of ours at once would pass
                            // the peer's bound, and could overtake our REPLICATE_FEEDS past
                            // its limit of unknown channels). Live, `Synced` waits for it.
                            None => self.serve_when_opened(key)?,
                        }
                    }
                    if self.remote_set_reported {
                        if !downloads.is_empty() {
                            self.emit(ReplicationEvent::RemoteFeeds(downloads));
                        }
                    } else {
                        self.first_downloads.extend(downloads);
                    }
                }
                Action::Finished => self.finished = true,
                _ => {}
            }
            self.report_remote_set();
        }
        Ok(())
    }

    /// Whether a feed the peer offers at `length` can bring us anything. Live, every feed is
    /// agreed (its later entries come over it); non-live, a feed we hold complete and as long
    /// costs the peer nothing, not even a channel.
    ///
    /// One answer per offer, in order.
    pub(super) fn lacking(&mut self, offers: &[FeedOffer]) -> Vec<bool> {
        if self.config.live {
            return vec![true; offers.len()];
        }
        let lacks = |ours: Option<&(u64, u64)>, length: u64| match ours {
            Some(&(ours, contiguous)) => ours < length || contiguous < ours,
            None => true,
        };
        // Few offers against many feeds (a re-sync): one pass over our list finds them all,
        // cheaper than a map of every feed. Many (a first replication), or offers in many
        // small messages: the map, kept.
        if self.local_index.is_none()
            && self.local_scans < MAX_LOCAL_SCANS
            && offers.len().saturating_mul(32) < self.local_lengths.len()
        {
            self.local_scans += 1;
            let mut ours: foldhash::HashMap<FeedKey, Option<(u64, u64)>> =
                offers.iter().map(|offer| (offer.key, None)).collect();
            for feed in &self.local_lengths {
                if let Some(slot) = ours.get_mut(&feed.key) {
                    *slot = Some((feed.length, feed.contiguous_length));
                }
            }
            return offers
                .iter()
                .map(|offer| lacks(ours.get(&offer.key).and_then(Option::as_ref), offer.length))
                .collect();
        }
        let index = self.local_index.get_or_insert_with(|| {
            self.local_lengths
                .iter()
                .map(|feed| (feed.key, (feed.length, feed.contiguous_length)))
                .collect()
        });
        offers
            .iter()
            .map(|offer| lacks(index.get(&offer.key), offer.length))
            .collect()
    }

    fn send_meta(&mut self, bytes: Vec<u8>) {
        if !self.root_open {
            return;
        }
        let message = Message::Extension(hypercore_protocol::schema::Extension {
            name: EXTENSION.to_owned(),
            message: bytes,
        });
        let root = self.root_dk;
        self.send(root, vec![message]);
    }

    /// A feed was added to the host after we started (live): offer it once it is open.
    pub(crate) fn handle_new_local_feed(&mut self, key: FeedKey) {
        let Some(exchange) = self.exchange.as_ref() else {
            return;
        };
        // Feeds learned from this very peer are not offered back to it.
        if exchange.is_agreed(&key) || exchange.remote_length(&key).is_some() || !self.offers(&key)
        {
            return;
        }
        self.push(Output::OpenFeed(OpenFeed {
            key,
            purpose: Purpose::Offer,
        }));
    }

    /// A feed to offer was opened.
    pub(super) fn offer_opened(
        &mut self,
        now: Instant,
        key: FeedKey,
        opened: Opened<'_>,
    ) -> Result<(), ReplicateError> {
        let length = match opened {
            Opened::Held(view) | Opened::Probe(view) => view.info().length,
            Opened::Missing => return Ok(()),
            Opened::Unavailable(reason) => {
                self.feed_unavailable(key, reason);
                return Ok(());
            }
        };
        self.known.insert(discovery_key(&key), key);
        let actions = match self.exchange.as_mut() {
            Some(exchange) => exchange.offer(vec![FeedOffer { key, length }]),
            None => Vec::new(),
        };
        self.apply(now, actions)
    }

    /// Once the peer's first round of offers is settled, reports it (`RemoteFeeds` with the
    /// feeds we download, none included): on both sides, also when a side gets nothing.
    pub(super) fn report_remote_set(&mut self) {
        if self.remote_set_reported || !self.exchange.as_ref().is_some_and(|e| e.settled()) {
            return;
        }
        self.remote_set_reported = true;
        let keys = std::mem::take(&mut self.first_downloads);
        self.emit(ReplicationEvent::RemoteFeeds(keys));
    }
}

/// Whether `key` can be a feed's public key: a valid ed25519 point that is not of small order
/// (a signature under a small-order key proves nothing).
pub(crate) fn usable_feed_key(key: &FeedKey) -> bool {
    hypercore::VerifyingKey::from_bytes(key).is_ok_and(|key| !key.is_weak())
}
