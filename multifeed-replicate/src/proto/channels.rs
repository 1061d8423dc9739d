//! The protocol's events: the Noise handshake, channels opening and closing, and each message
//! routed by its channel's discovery key (the root channel carries the meta exchange).

use std::time::Instant;

use hypercore_protocol::Message;

use super::{
    Connection, DiscoveryKey, FeedView, LocalFeedsFor, Output, EXTENSION, MAX_UNKNOWN_CHANNELS,
};
use crate::error::PeerViolation;
use crate::ReplicateError;

impl Connection {
    /// The Noise handshake completed with the peer whose static key is `remote_key`.
    pub(crate) fn handle_handshake(
        &mut self,
        now: Instant,
        remote_key: [u8; 32],
    ) -> Result<(), ReplicateError> {
        self.remote_key = remote_key;
        self.clock.received(now);
        self.clock.noise_done();
        if self.exchange.is_none() {
            self.clock.exchange_done();
        }
        self.clock.progress(now);
        if self.exchange.is_some() {
            self.open_root();
        } else {
            self.want_local_feeds(LocalFeedsFor::PlainStart);
        }
        for dk in std::mem::take(&mut self.early_opens) {
            self.handle_discovery_key(now, dk)?;
        }
        Ok(())
    }

    /// Asks the protocol to open our root channel, once per connection.
    fn open_root(&mut self) {
        if !std::mem::replace(&mut self.root_asked, true) {
            self.push(Output::OpenChannel(self.config.encryption_key));
        }
    }

    /// The peer opened a channel we have not opened (yet).
    pub(crate) fn handle_discovery_key(
        &mut self,
        now: Instant,
        dk: DiscoveryKey,
    ) -> Result<(), ReplicateError> {
        self.clock.received(now);
        // The protocol can report a peer's open before the handshake itself: our root channel
        // is not asked for yet, so a key mismatch could not show on the peer's side.
        if !self.clock.is_noise_done() {
            if self.early_opens.len() < MAX_UNKNOWN_CHANNELS {
                self.early_opens.push(dk);
            }
            return Ok(());
        }
        if dk == self.root_dk && self.exchange.is_some() {
            // The peer's open of the root often comes after we asked for ours.
            self.open_root();
            return Ok(());
        }
        if self.exchange.is_none() || !self.root_open {
            // Learn the discovery keys of every local feed we may serve first.
            self.want_local_feeds(LocalFeedsFor::PeerOpened(dk));
            return Ok(());
        }
        self.peer_opened(dk)
    }

    /// The peer opened a channel and we know every local feed's discovery key.
    pub(super) fn peer_opened(&mut self, dk: DiscoveryKey) -> Result<(), ReplicateError> {
        if !self.known.contains_key(&dk) && std::mem::take(&mut self.unindexed) {
            let feeds = std::mem::take(&mut self.local_lengths);
            self.index_local_feeds(&feeds);
            self.local_lengths = feeds;
        }
        match self.known.get(&dk).copied() {
            Some(key) => self.track_feed(key, None, false),
            // Before the exchange, an unknown channel means the peer has another key.
            None if self.exchange.is_some() && !self.root_open => Err(ReplicateError::KeyMismatch),
            // A feed we have not agreed to (yet: the peer's open can overtake its
            // REPLICATE_FEEDS, which travels in another queue of the protocol). The protocol
            // keeps the half-open channel until we open ours; a peer may keep only so many.
            None => {
                self.unknown_channels.insert(dk);
                if self.unknown_channels.len() > MAX_UNKNOWN_CHANNELS {
                    return Err(ReplicateError::peer(
                        crate::Phase::Replication,
                        PeerViolation::UnknownChannels {
                            limit: MAX_UNKNOWN_CHANNELS,
                        },
                    ));
                }
                Ok(())
            }
        }
    }

    /// A channel is open both ways; `view` is the feed's, if we track it.
    pub(crate) fn handle_channel(
        &mut self,
        now: Instant,
        dk: DiscoveryKey,
        view: Option<&dyn FeedView>,
    ) -> Result<(), ReplicateError> {
        self.clock.received(now);
        self.clock.progress(now);
        if dk == self.root_dk && self.exchange.is_some() {
            // Reported again (the peer opened it a second time): the exchange is under way,
            // and starting it again would list every local feed again.
            if std::mem::replace(&mut self.root_open, true) {
                return Ok(());
            }
            // Our HANDSHAKE goes out before the host lists its feeds: listing a large store
            // can take longer than the peer's handshake timeout.
            let actions = match self.exchange.as_mut() {
                Some(exchange) => exchange.start(),
                None => Vec::new(),
            };
            self.apply(now, actions)?;
            self.want_local_feeds(LocalFeedsFor::Exchange);
            return Ok(());
        }
        match (self.feeds.get_mut(&dk), view) {
            (Some(feed), Some(view)) => {
                feed.channel_open = true;
                self.announce(dk, view);
            }
            // A channel for a feed we do not track: close it.
            _ => self.push(Output::CloseChannel(dk)),
        }
        Ok(())
    }

    /// The peer closed a channel.
    pub(crate) fn handle_channel_closed(
        &mut self,
        now: Instant,
        dk: DiscoveryKey,
    ) -> Result<(), ReplicateError> {
        self.clock.received(now);
        if dk == self.root_dk && self.exchange.is_some() {
            self.peer_closed_root = true;
            if !self.finished && !self.config.live {
                return Err(ReplicateError::io(
                    crate::Phase::Replication,
                    std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the peer closed the exchange",
                    ),
                ));
            }
            // The peer ended a live replication: close our side of the root too.
            if std::mem::take(&mut self.root_open) {
                self.push(Output::CloseChannel(dk));
            }
            self.done = true;
            return Ok(());
        }
        self.unknown_channels.remove(&dk);
        if let Some(feed) = self.feeds.get_mut(&dk) {
            feed.channel_open = false;
        }
        if self.exchange.is_some() {
            self.feed_closed(dk);
        }
        Ok(())
    }

    /// A message from the peer on channel `dk`; `view` is the feed's, if we track it.
    pub(crate) fn handle_message(
        &mut self,
        now: Instant,
        dk: DiscoveryKey,
        message: Message,
        view: Option<&dyn FeedView>,
    ) -> Result<(), ReplicateError> {
        self.clock.received(now);
        // Once finished, whatever else the peer sent does not matter (and must not turn a
        // completed sync into an error).
        if self.is_done() {
            return Ok(());
        }
        if dk == self.root_dk && self.exchange.is_some() {
            if let Message::Extension(extension) = message {
                if extension.name == EXTENSION {
                    let actions = match self.exchange.as_mut() {
                        Some(exchange) => exchange.handle(&extension.message)?,
                        None => Vec::new(),
                    };
                    self.apply(now, actions)?;
                }
            }
            return Ok(());
        }
        if let Message::Request(request) = message {
            return self.on_request(now, dk, request);
        }
        let Some(view) = view else {
            return Ok(());
        };
        match message {
            Message::Synchronize(sync) => self.on_synchronize(now, dk, &sync, view),
            Message::Range(range) => {
                if let Some(feed) = self.feeds.get_mut(&dk) {
                    if range.start == 0 && !range.drop {
                        feed.remote_contiguous = feed.remote_contiguous.max(range.length);
                    }
                    feed.sync.on_remote_has();
                }
                self.request_more(dk, view);
            }
            Message::Bitfield(_) => {
                if let Some(feed) = self.feeds.get_mut(&dk) {
                    feed.sync.on_remote_has();
                }
                self.request_more(dk, view);
            }
            Message::Data(data) => self.on_data(now, dk, data, view)?,
            Message::NoData(no_data) => {
                if let Some(feed) = self.feeds.get_mut(&dk) {
                    feed.sync.on_no_data(no_data.request);
                }
                self.request_more(dk, view);
            }
            _ => {}
        }
        Ok(())
    }
}
