//! The replication of one connection as a plain state machine: no I/O, no locks, no awaits, no
//! clock of its own (the style of quinn-proto's `Connection` and str0m's `Rtc`).
//!
//! [`Connection`] decides everything a replication decides: the mode (the multifeed exchange or
//! plain Hypercore feeds), which channels to open, what to ask each feed's peer for and when,
//! which requests to answer or hold back, when a peer breaks a rule, when a timeout passed and
//! when the replication is done. The async driver (`crate::driver`) only carries its inputs in
//! and its outputs out, against `hypercore-protocol`, the hypercores and the [`FeedHost`].
//!
//! [`FeedHost`]: crate::FeedHost

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Instant;

use hypercore_protocol::discovery_key;
use hypercore_protocol::schema::Request;
use hypercore_protocol::Message;
use multifeed_meta::{Exchange, ExchangeConfig};
use multifeed_storage::FeedKey;

use crate::transport::weight_of_message;
use crate::{LocalFeed, ReplicateConfig, ReplicateError, ReplicateSummary, ReplicationEvent};

mod channels;
mod clock;
mod exchange;
mod feeds;
mod fetch;
mod idle;
mod output;
mod schedule;
mod serve;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod sim;
pub(crate) mod sync;
#[cfg(test)]
mod tests;
mod view;

pub(crate) use clock::Clock;
use feeds::FeedSync;
pub(crate) use output::{request, Applying, LocalFeedsFor, OpenFeed, Opened, Output, Purpose};
pub(crate) use view::{FeedInfo, FeedView};

/// A feed's discovery key: what the wire names a channel by.
pub(crate) type DiscoveryKey = [u8; 32];

/// Name of the extension message that carries the meta exchange on the root channel.
pub(crate) const EXTENSION: &str = "multifeed";
/// Name of the root-channel extension a live peer sends when it has sent nothing else for a
/// while (peers that do not know it ignore it, as they ignore any other extension name).
pub(crate) const KEEPALIVE: &str = "multifeed/keepalive";
/// Queued messages after which the driver writes even if more input is waiting.
pub(crate) const MAX_OUTBOX: usize = 512;
/// Queued weight (about bytes) after which the driver writes even if more input is waiting.
pub(crate) const MAX_OUTBOX_WEIGHT: u64 = 4 << 20;
/// Channels the peer may open for feeds we did not agree to (each is closed at once).
pub(crate) const MAX_UNKNOWN_CHANNELS: usize = 1024;
/// Feeds new to us fetched at once into probes, before their first signed root verified.
pub(crate) const MAX_PROBES: usize = 1024;
/// Answers in a row for one feed that bring no block and no length before the peer is dropped.
pub(crate) const MAX_FRUITLESS_ANSWERS: u32 = 64;
/// Weight waiting for the transport above which requests wait instead of being answered.
pub(crate) use crate::backlog::OUTGOING_HIGH;

/// One replication connection, sans IO.
///
/// # Loop contract
///
/// The owner (the driver, or a test) hands the connection **one input** at a time, with the
/// time it happened: a `handle_*` call. It then **drains the outputs**, calling
/// [`poll_output`](Self::poll_output) until it returns `None`, and carries each out in order.
/// Some outputs ask for a fact only the owner can get (a feed opened by the host, a proof
/// applied by hypercore, the local feed list): the owner answers each with its `handle_*`
/// input *before* it takes the next output, so the core continues where it asked. When nothing
/// is left, the owner waits for the next input or for [`poll_timeout`](Self::poll_timeout),
/// and at that deadline calls [`handle_timeout`](Self::handle_timeout).
///
/// An input that returns an error ends the connection with it; [`is_done`](Self::is_done)
/// says when it ended normally ([`summary`](Self::summary) then holds what it did). Inputs
/// that concern one feed take a [`FeedView`] of it (its length and which blocks it holds, read
/// synchronously by the owner), so every decision here is made on plain data.
pub(crate) struct Connection {
    config: ReplicateConfig,
    /// The meta exchange; `None` in plain Hypercore mode.
    exchange: Option<Exchange>,
    root_dk: DiscoveryKey,
    /// Our root channel is open both ways.
    root_open: bool,
    /// We asked the protocol to open our root channel (once: a second open of the same key
    /// makes hypercore-protocol report the channel again, and the exchange would start twice).
    root_asked: bool,
    /// Discovery keys we may open: the root, local feeds, agreed feeds.
    known: foldhash::HashMap<DiscoveryKey, FeedKey>,
    /// The feeds of `local_lengths` we offer are not in `known` yet: indexed only when the
    /// peer opens a channel `known` does not name (a re-sync of equal stores never does, and
    /// so never builds a map of every feed).
    unindexed: bool,
    feeds: HashMap<DiscoveryKey, FeedSync>,
    /// Downloads still short of their target (non-live).
    incomplete: HashSet<DiscoveryKey>,
    summary: ReplicateSummary,
    blocks_known: u64,
    progress_dirty: bool,
    /// The exchange (or the plain download) finished.
    finished: bool,
    /// The replication ended normally for another reason (stopped, the peer ended a live one).
    done: bool,
    /// The peer closed the root channel.
    peer_closed_root: bool,
    /// The peer's requests waiting for the transport to drain (bounded).
    deferred: VecDeque<(DiscoveryKey, Request)>,
    /// Feeds whose new length waits for the transport to drain (at most one entry per feed).
    unannounced: BTreeSet<DiscoveryKey>,
    /// Channels the peer opened for feeds we have not agreed to.
    unknown_channels: HashSet<DiscoveryKey>,
    /// Channels the peer opened before the protocol reported the Noise handshake (handled
    /// right after it, once our root channel is asked for).
    early_opens: Vec<DiscoveryKey>,
    /// Feeds new to us being fetched into probes, not yet verified.
    probes: usize,
    /// New feeds waiting for a probe slot (and their targets).
    waiting: VecDeque<(FeedKey, Option<u64>)>,
    /// Live: feeds we only serve whose channel the peer has not opened yet (the peer opens it
    /// in its own scheduler's turn; `Synced` waits for them).
    unopened_served: HashSet<DiscoveryKey>,
    /// Feeds this connection added to the host.
    feeds_added: usize,
    /// Blocks stored per feed since the last `Downloaded` events: key, index range, count.
    downloaded: HashMap<DiscoveryKey, (FeedKey, std::ops::Range<u64>, u64)>,
    /// The peer's Noise static public key, once the Noise handshake completed.
    remote_key: [u8; 32],
    /// Feeds of ours the host could not open (each reported once).
    unavailable: HashSet<FeedKey>,
    /// Whether `RemoteFeeds` reported the peer's first round (once the exchange settled).
    remote_set_reported: bool,
    /// Feeds of the first round we download, until it is reported.
    first_downloads: Vec<FeedKey>,
    /// Blocks were stored since the host last made them durable.
    unsynced_blocks: bool,
    /// Tracked feeds not in sync (live: `Synced` is reported when none are left).
    feeds_out_of_sync: usize,
    /// `Synced` was reported and nothing changed since.
    synced_reported: bool,
    /// The peer reopens a live feed's channel on news once we closed it idle (meta 2.1).
    peer_reopens: bool,
    /// Live: agreed feeds whose channel closed while both sides held the same, with that
    /// length. A change to one of ours opens its channel again.
    parked: foldhash::HashMap<DiscoveryKey, u64>,
    /// Live initiator: feeds that came in sync, and when their channel may close if they
    /// stay so (in order: every entry has the same delay).
    idle_queue: VecDeque<(Instant, DiscoveryKey)>,
    /// Downloads that hold one of the `max_syncing_feeds` slots.
    syncing: HashSet<DiscoveryKey>,
    /// Downloads waiting for a slot, with their targets.
    queued_downloads: VecDeque<(FeedKey, u64)>,
    /// Our feeds' lengths and contiguous lengths when the exchange started (non-live: what we
    /// ask the peer for), in the host's order.
    local_lengths: Vec<LocalFeed>,
    /// `local_lengths` by key, built the first time the peer offers many feeds at once (a
    /// re-sync's few offers are found by one pass over the list instead).
    local_index: Option<foldhash::HashMap<FeedKey, (u64, u64)>>,
    /// Passes over `local_lengths` made for few offers: bounded (a peer sending many small
    /// offers gets the map, not a pass over every feed per message).
    local_scans: u8,
    /// Waiting announcements and requests are being handed out, one at a time.
    draining: bool,
    /// What waits for the local feed list, in the order it was asked for.
    local_feeds_for: VecDeque<LocalFeedsFor>,
    /// Messages handed out since the owner last wrote, and their weight.
    queued: (usize, u64),
    /// Weight the transport has not written yet, as the owner last reported it.
    transport_backlog: u64,
    clock: Clock,
    outputs: VecDeque<Output>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("plain", &self.exchange.is_none())
            .field("feeds", &self.feeds.len())
            .field("incomplete", &self.incomplete.len())
            .field("finished", &self.finished)
            .field("outputs", &self.outputs.len())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A connection that starts at `now` (the handshake timeout counts from here). The config's
    /// event sender and stop handle are the owner's: the core does not use them.
    pub(crate) fn new(config: ReplicateConfig, now: Instant) -> Self {
        let exchange = config.plain_feeds.is_none().then(|| {
            let mut exchange_config = ExchangeConfig {
                user_data: config.user_data.clone(),
                live: config.live,
                // The replication's initiator drives the reconciliation of the offered sets.
                initiator: config.initiator,
                ..ExchangeConfig::default()
            };
            if let Some(version) = &config.protocol_version {
                exchange_config.version = version.clone();
            }
            if let Some(client) = &config.client {
                exchange_config.client = client.clone();
            }
            if let Some(nonce) = config.nonce {
                exchange_config.nonce = nonce;
            }
            Exchange::new(exchange_config)
        });
        let clock = Clock::new(now, &config);
        Self {
            root_dk: discovery_key(&config.encryption_key),
            exchange,
            root_open: false,
            root_asked: false,
            known: foldhash::HashMap::default(),
            unindexed: false,
            feeds: HashMap::new(),
            incomplete: HashSet::new(),
            summary: ReplicateSummary::default(),
            blocks_known: 0,
            progress_dirty: false,
            finished: false,
            done: false,
            peer_closed_root: false,
            deferred: VecDeque::new(),
            unannounced: BTreeSet::new(),
            unknown_channels: HashSet::new(),
            early_opens: Vec::new(),
            probes: 0,
            waiting: VecDeque::new(),
            unopened_served: HashSet::new(),
            feeds_added: 0,
            downloaded: HashMap::new(),
            remote_key: [0; 32],
            unavailable: HashSet::new(),
            remote_set_reported: false,
            first_downloads: Vec::new(),
            unsynced_blocks: false,
            feeds_out_of_sync: 0,
            synced_reported: false,
            peer_reopens: false,
            parked: foldhash::HashMap::default(),
            idle_queue: VecDeque::new(),
            syncing: HashSet::new(),
            queued_downloads: VecDeque::new(),
            local_lengths: Vec::new(),
            local_index: None,
            local_scans: 0,
            draining: false,
            local_feeds_for: VecDeque::new(),
            queued: (0, 0),
            transport_backlog: 0,
            clock,
            outputs: VecDeque::new(),
            config,
        }
    }

    // ----- outputs -----

    /// The next thing to carry out, in order; `None` when everything was handed out.
    pub(crate) fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// How far the download got, if that changed since the last call (the owner asks once per
    /// round of its loop, not once per block).
    pub(crate) fn poll_progress(&mut self) -> Option<ReplicationEvent> {
        std::mem::take(&mut self.progress_dirty).then(|| ReplicationEvent::Progress {
            blocks_done: self.summary.blocks_received,
            blocks_known: self.blocks_known.max(self.summary.blocks_received),
        })
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let clock = self
            .clock
            .next_deadline(self.exchange.is_some() && self.config.live);
        match (clock, self.idle_queue.front()) {
            (Some(clock), Some(&(idle, _))) => Some(clock.min(idle)),
            (clock, idle) => clock.or(idle.map(|&(at, _)| at)),
        }
    }

    /// Whether the replication ended normally (finished, stopped, or the peer ended it live).
    pub(crate) fn is_done(&self) -> bool {
        self.finished || self.done
    }

    /// What the replication did so far.
    pub(crate) fn summary(&self) -> &ReplicateSummary {
        &self.summary
    }

    /// Whether this is a plain Hypercore replication (no meta exchange, no root channel).
    pub(crate) fn is_plain(&self) -> bool {
        self.exchange.is_none()
    }

    /// Whether the peer closed the root channel.
    pub(crate) fn peer_closed_root(&self) -> bool {
        self.peer_closed_root
    }

    /// The number of live feeds whose channel closed idle.
    #[cfg(test)]
    pub(crate) fn parked_feeds(&self) -> usize {
        self.parked.len()
    }

    /// The number of feeds tracked on this connection (probes included).
    #[cfg(test)]
    pub(crate) fn tracked_feeds(&self) -> usize {
        self.feeds.len()
    }

    fn push(&mut self, output: Output) {
        self.outputs.push_back(output);
    }

    fn emit(&mut self, event: ReplicationEvent) {
        self.push(Output::Event(event));
    }

    /// Hands messages for a channel to the owner.
    fn send(&mut self, dk: DiscoveryKey, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        self.queued.0 += messages.len();
        self.queued.1 += messages.iter().map(weight_of_message).sum::<u64>();
        self.clock.sent();
        self.push(Output::Send { dk, messages });
    }

    /// Whether what waits for the transport is above the high-water mark: requests then wait.
    fn outgoing_full(&self) -> bool {
        self.transport_backlog + self.queued.1 > OUTGOING_HIGH
    }

    /// Whether what was handed out since the last write is enough for one write.
    fn queued_full(&self) -> bool {
        self.queued.0 >= MAX_OUTBOX || self.queued.1 >= MAX_OUTBOX_WEIGHT
    }

    // ----- inputs: the transport -----

    /// The owner wrote everything handed out so far; `backlog` is what the transport has not
    /// written yet.
    pub(crate) fn handle_written(&mut self, backlog: u64) {
        self.queued = (0, 0);
        self.transport_backlog = backlog;
    }

    /// The transport's unwritten weight changed (it drained, or it grew).
    pub(crate) fn handle_transport_backlog(&mut self, backlog: u64) {
        self.transport_backlog = backlog;
    }

    /// Whether requests or announcements wait for the transport to drain.
    pub(crate) fn is_waiting_for_transport(&self) -> bool {
        !self.deferred.is_empty() || !self.unannounced.is_empty()
    }

    /// Whether what waits can go out now: the transport is below the high-water mark (as
    /// last reported with [`handle_transport_backlog`](Self::handle_transport_backlog)).
    pub(crate) fn can_drain(&self) -> bool {
        self.is_waiting_for_transport() && !self.outgoing_full()
    }

    /// A time passed: a timeout that expired ends the connection; a live keep-alive is due.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> Result<(), ReplicateError> {
        let live_exchange = self.exchange.is_some() && self.config.live;
        if let Some(phase) = self.clock.expired(now) {
            return Err(ReplicateError::Timeout { phase });
        }
        if live_exchange && self.clock.keepalive_due(now) {
            self.keepalive();
        }
        self.close_idle_channels(now);
        Ok(())
    }

    /// A live keep-alive tick: tell the peer we are here if we sent nothing else since the last.
    fn keepalive(&mut self) {
        if self.root_open {
            let message = Message::Extension(hypercore_protocol::schema::Extension {
                name: KEEPALIVE.to_owned(),
                message: Vec::new(),
            });
            let root = self.root_dk;
            self.send(root, vec![message]);
        }
    }

    /// The owner was asked to stop: the replication ends normally.
    pub(crate) fn handle_stop(&mut self) {
        self.done = true;
    }

    /// The replication ends: the blocks stored last become durable, their events go out.
    pub(crate) fn handle_end(&mut self) {
        self.blocks_stored();
    }

    /// The connection ended (`err`); `noise_done` says whether the transport completed the
    /// Noise handshake. A live replication or one that finished ends normally.
    pub(crate) fn handle_connection_end(
        &self,
        err: std::io::Error,
        noise_done: bool,
    ) -> Result<ReplicateSummary, ReplicateError> {
        let serving_only = self
            .config
            .plain_feeds
            .as_ref()
            .is_some_and(|keys| keys.is_empty());
        if self.finished || (self.config.live && self.root_open) || (serving_only && noise_done) {
            return Ok(self.summary);
        }
        let phase = if !noise_done {
            crate::Phase::NoiseHandshake
        } else if !self.root_open && self.exchange.is_some() {
            crate::Phase::ExchangeHandshake
        } else {
            crate::Phase::Replication
        };
        Err(ReplicateError::io(phase, err))
    }

    /// Our copy of a feed changed (append, or blocks from another connection): tell the peer.
    /// While the transport is behind, only the latest length matters: announcements wait
    /// (one per feed) with the requests.
    pub(crate) fn handle_local_change(&mut self, dk: DiscoveryKey, view: &dyn FeedView) {
        if self.outgoing_full() {
            self.unannounced.insert(dk);
        } else {
            self.announce(dk, view);
        }
    }

    /// A round of input ended (a run of one channel's messages, or one protocol event): a
    /// non-live download that reached every target finishes here.
    pub(crate) fn check_synced(&mut self, now: Instant) -> Result<(), ReplicateError> {
        self.report_remote_set();
        if self.config.live {
            // Caught up: a non-live peer may finish (a live one never does). Sent once.
            if self.report_synced() {
                let actions = match self.exchange.as_mut() {
                    Some(exchange) => exchange.local_synced(),
                    None => Vec::new(),
                };
                self.apply(now, actions)?;
            }
            return Ok(());
        }
        if self.exchange.is_none() {
            // Plain mode: done once every feed we fetch reached the peer's length.
            let plain = self.config.plain_feeds.as_deref().unwrap_or(&[]);
            let all_known = plain.iter().all(|key| {
                self.feeds
                    .get(&discovery_key(key))
                    .is_some_and(|feed| feed.sync.target().is_some())
            });
            if !plain.is_empty() && all_known && self.incomplete.is_empty() {
                self.finished = true;
            }
            return Ok(());
        }
        let ready =
            self.exchange.as_ref().is_some_and(|e| e.settled()) && self.incomplete.is_empty();
        if ready {
            let actions = match self.exchange.as_mut() {
                Some(exchange) => exchange.local_synced(),
                None => Vec::new(),
            };
            self.apply(now, actions)?;
        }
        Ok(())
    }

    fn want_local_feeds(&mut self, purpose: LocalFeedsFor) {
        self.local_feeds_for.push_back(purpose);
        self.push(Output::ListLocalFeeds);
    }

    /// Records progress now (a block, a length, an agreed feed, an answer we served).
    fn progress(&mut self, now: Instant) {
        self.clock.progress(now);
    }
}
