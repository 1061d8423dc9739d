//! Options of one replication, the stop handle, events and the summary.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use multifeed_storage::FeedKey;

/// The public default shared key of JS multifeed: anyone can replicate feeds exchanged with it.
pub const DEFAULT_ENCRYPTION_KEY: [u8; 32] = [
    0xbe, 0xe8, 0x0f, 0xf3, 0xa4, 0xee, 0x5e, 0x72, 0x7d, 0xc4, 0x41, 0x97, 0xcb, 0x9d, 0x25, 0xbf,
    0x8f, 0x19, 0xd5, 0x0b, 0x0f, 0x3a, 0xd2, 0x98, 0x4c, 0xfe, 0x5b, 0x7d, 0x14, 0xe7, 0x5d, 0xe7,
];

/// A filter over feed keys.
pub type KeyFilter = Arc<dyn Fn(&FeedKey) -> bool + Send + Sync>;

/// Something a replication reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicationEvent {
    /// The peer's handshake was accepted.
    RemoteHandshake {
        /// Its application data.
        user_data: Vec<u8>,
        /// Its Noise static public key (who it is on this connection).
        remote_key: [u8; 32],
    },
    /// The peer's feeds are known: the ones we download from it. Once the peer's first round
    /// of offers is settled (on both sides, with an empty list when we download nothing), then
    /// for each later batch (live).
    RemoteFeeds(Vec<FeedKey>),
    /// A feed learned from the peer was added to the host.
    FeedAdded(FeedKey),
    /// A feed the host holds could not be opened (damaged or missing); the replication goes on
    /// without it.
    FeedUnavailable {
        /// Its key.
        key: FeedKey,
        /// What the host reported.
        reason: String,
    },
    /// Blocks of a feed stored from the peer since the last such event (one per feed per burst
    /// of answers, never one per block).
    Downloaded {
        /// The feed.
        key: FeedKey,
        /// From the lowest to past the highest index stored (sparse when `blocks` is smaller).
        range: std::ops::Range<u64>,
        /// How many blocks were stored.
        blocks: u64,
    },
    /// Live: both sides now hold the same length of every feed they agreed on, complete
    /// (again each time they catch up with each other after a change).
    Synced,
    /// Blocks received so far of the blocks known to be wanted.
    Progress {
        /// Blocks received.
        blocks_done: u64,
        /// Blocks known to be wanted.
        blocks_known: u64,
    },
}

/// Stops a replication (live or not) cleanly; clones stop the same replication.
#[derive(Debug, Clone, Default)]
pub struct StopHandle {
    inner: Arc<StopInner>,
}

#[derive(Debug, Default)]
struct StopInner {
    stopped: AtomicBool,
    event: event_listener::Event,
}

impl StopHandle {
    /// Asks the replication to stop; it then returns its summary.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        self.inner.event.notify(usize::MAX);
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    pub(crate) async fn stopped(&self) {
        loop {
            let listener = self.inner.event.listen();
            if self.is_stopped() {
                return;
            }
            listener.await;
        }
    }
}

/// What a replication did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicateSummary {
    /// Feeds the peer requested from us.
    pub feeds_sent: usize,
    /// Feeds we requested from the peer.
    pub feeds_received: usize,
    /// Blocks we sent.
    pub blocks_sent: u64,
    /// Blocks we received and verified.
    pub blocks_received: u64,
    /// Bytes of block data sent.
    pub bytes_sent: u64,
    /// Bytes of block data received.
    pub bytes_received: u64,
    /// Feeds the host holds but could not open, left out of this replication.
    pub feeds_unavailable: usize,
    /// Downloads that ended short of the length the peer offered because the peer lacks the
    /// blocks we lack (a writer that lost a signed tail in a crash, a sparse replica). What the
    /// peer held was fetched; another peer may have the rest.
    pub feeds_incomplete: usize,
}

/// Options of one replication.
#[derive(Clone)]
pub struct ReplicateConfig {
    pub(crate) initiator: bool,
    pub(crate) live: bool,
    pub(crate) encryption_key: [u8; 32],
    pub(crate) user_data: Vec<u8>,
    pub(crate) offer: Option<KeyFilter>,
    pub(crate) accept: Option<KeyFilter>,
    pub(crate) events: Option<futures::channel::mpsc::Sender<ReplicationEvent>>,
    pub(crate) stop: StopHandle,
    pub(crate) handshake_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) live_timeout: Duration,
    pub(crate) keepalive_interval: Duration,
    pub(crate) max_in_flight: usize,
    pub(crate) max_channels: usize,
    pub(crate) max_queued_requests: usize,
    pub(crate) max_new_feeds: usize,
    pub(crate) max_syncing_feeds: usize,
    pub(crate) idle_channel_timeout: Option<Duration>,
    pub(crate) plain_feeds: Option<Vec<FeedKey>>,
    pub(crate) protocol_version: Option<multifeed_meta::semver::Version>,
    pub(crate) client: Option<String>,
    /// The meta handshake's nonce (None: a fresh random one); fixed by the simulator, so that
    /// a seed gives the same item ids and the same run.
    pub(crate) nonce: Option<[u8; 16]>,
}

impl fmt::Debug for ReplicateConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicateConfig")
            .field("initiator", &self.initiator)
            .field("live", &self.live)
            .field("max_in_flight", &self.max_in_flight)
            .field("plain_feeds", &self.plain_feeds.as_ref().map(Vec::len))
            .finish_non_exhaustive()
    }
}

impl ReplicateConfig {
    /// Options for the side that initiates (`true`) or accepts (`false`) the connection.
    pub fn new(initiator: bool) -> Self {
        Self {
            initiator,
            live: false,
            encryption_key: DEFAULT_ENCRYPTION_KEY,
            user_data: Vec::new(),
            offer: None,
            accept: None,
            events: None,
            stop: StopHandle::default(),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            live_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(5),
            max_in_flight: 256,
            max_channels: 131_072,
            max_queued_requests: 65_536,
            max_new_feeds: 100_000,
            max_syncing_feeds: 256,
            idle_channel_timeout: None,
            plain_feeds: None,
            protocol_version: None,
            client: None,
            nonce: None,
        }
    }

    /// Keep replicating new feeds and appends until stopped.
    pub fn live(mut self, live: bool) -> Self {
        self.live = live;
        self
    }

    /// The shared key both peers must know.
    pub fn encryption_key(mut self, key: [u8; 32]) -> Self {
        self.encryption_key = key;
        self
    }

    /// Data sent to the peer in the handshake.
    pub fn user_data(mut self, user_data: Vec<u8>) -> Self {
        self.user_data = user_data;
        self
    }

    /// Offer only local feeds for which `filter` is true.
    pub fn offer(mut self, filter: KeyFilter) -> Self {
        self.offer = Some(filter);
        self
    }

    /// Accept only remote feeds for which `filter` is true.
    pub fn accept(mut self, filter: KeyFilter) -> Self {
        self.accept = Some(filter);
        self
    }

    /// Where to report [`ReplicationEvent`]s (events are dropped when it is full).
    pub fn events(mut self, sender: futures::channel::mpsc::Sender<ReplicationEvent>) -> Self {
        self.events = Some(sender);
        self
    }

    /// The handle that stops this replication.
    pub fn stop(mut self, stop: StopHandle) -> Self {
        self.stop = stop;
        self
    }

    /// How long the Noise handshake, root channel and meta handshake may take (default 10 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How long a non-live replication may go without progress (default 30 s): no block, no
    /// new length, no agreed feed, no answer served. Messages that move nothing forward (an
    /// empty extension, a duplicate manifest) do not count.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How long a live multifeed peer may send nothing at all, not even a keep-alive, before
    /// the connection ends with a timeout (default 30 s). Plain Hypercore peers have no
    /// keep-alive on the wire: their liveness is the transport's (TCP keep-alive, or a
    /// [`StopHandle`]).
    pub fn live_timeout(mut self, timeout: Duration) -> Self {
        self.live_timeout = timeout;
        self
    }

    /// How often a live replication that sent nothing else tells the peer it is still here
    /// (default 5 s; keep it well under the peer's [`live_timeout`](Self::live_timeout)).
    pub fn keepalive_interval(mut self, interval: Duration) -> Self {
        self.keepalive_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Channels the peer may hold open at once (default 131,072: one per feed replicating, and
    /// the root). A peer that opens more is disconnected with [`PeerViolation::TooManyChannels`](crate::PeerViolation::TooManyChannels).
    pub fn max_channels(mut self, max: usize) -> Self {
        self.max_channels = max.max(1);
        self
    }

    /// Feeds this replication may add to the host (default 100,000). A feed new to us is added
    /// only once a signed root of it verified (an offered feed that is never served, or that
    /// is empty, adds nothing); feeds past the limit are not kept.
    pub fn max_new_feeds(mut self, max: usize) -> Self {
        self.max_new_feeds = max;
        self
    }

    /// Feeds downloaded at once (default 256): the others wait their turn, and a feed's
    /// channel opens when its turn comes. Non-live, a channel closes once both sides hold the
    /// feed complete. The limit is ours: the peer trusts nothing of it.
    pub fn max_syncing_feeds(mut self, max: usize) -> Self {
        self.max_syncing_feeds = max.max(1);
        self
    }

    /// Live: how long a feed both sides hold the same, complete, stays idle before its channel
    /// closes (default `None`: every live channel stays open; opt in while the hub bench is
    /// checked at scale). Its hypercore is let go
    /// with the channel, so a live connection's memory follows the feeds that change, not the
    /// feeds agreed. When either side has news for the feed (an append, or blocks from another
    /// connection), it opens the channel again. The initiator closes, and only towards a peer
    /// of meta protocol 2.1 or later (an older one would not reopen on news).
    pub fn close_idle_channels_after(mut self, timeout: Option<Duration>) -> Self {
        self.idle_channel_timeout = timeout;
        self
    }

    /// The peer's requests that may wait while the connection is full (default 65,536, about
    /// 100 bytes each). A peer that asks for more and does not read our answers is
    /// disconnected with [`PeerViolation::TooManyRequests`](crate::PeerViolation::TooManyRequests).
    pub fn max_queued_requests(mut self, max: usize) -> Self {
        self.max_queued_requests = max.max(1);
        self
    }

    /// Block requests in flight per feed (default 256).
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max.max(1);
        self
    }

    /// Plain Hypercore mode, for peers that are not multifeeds (such as a JS `hypercore`): no
    /// root channel and no exchange; serve any feed the peer opens, and download `keys`.
    pub fn plain_hypercore(mut self, keys: Vec<FeedKey>) -> Self {
        self.plain_feeds = Some(keys);
        self
    }

    /// Overrides the protocol version sent in the handshake (for tests of version checks).
    #[cfg(feature = "test-util")]
    pub fn protocol_version(mut self, version: multifeed_meta::semver::Version) -> Self {
        self.protocol_version = Some(version);
        self
    }

    /// Overrides the client name sent in the handshake (for tests of client checks).
    #[cfg(feature = "test-util")]
    pub fn client_name(mut self, client: String) -> Self {
        self.client = Some(client);
        self
    }
}
