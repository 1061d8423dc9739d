//! Replication of a multifeed with a peer over any byte stream.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use futures::{AsyncRead, AsyncWrite};
use multifeed_replicate::{
    FeedHost, HostError, LocalChange, LocalFeed, ReplicateConfig, ReplicationEvent,
};
use multifeed_storage::{FeedKey, SharedCore};

pub use multifeed_replicate::{ReplicateSummary, StopHandle, DEFAULT_ENCRYPTION_KEY};

use crate::{Error, Event, Multifeed};

type KeyFilter = Arc<dyn Fn(&FeedKey) -> bool + Send + Sync>;

/// Options of one replication; see [`Multifeed::replicate`].
#[derive(Clone)]
pub struct ReplicateOptions {
    initiator: bool,
    live: bool,
    encryption_key: Option<[u8; 32]>,
    user_data: Vec<u8>,
    offer: Option<KeyFilter>,
    accept: Option<KeyFilter>,
    stop: StopHandle,
    plain: Option<Vec<FeedKey>>,
    timeouts: Option<(std::time::Duration, std::time::Duration)>,
    live_timeout: Option<std::time::Duration>,
    keepalive_interval: Option<std::time::Duration>,
    max_channels: Option<usize>,
    max_queued_requests: Option<usize>,
    max_new_feeds: Option<usize>,
    max_in_flight: Option<usize>,
    max_syncing_feeds: Option<usize>,
    idle_channel_timeout: Option<Option<std::time::Duration>>,
}

impl fmt::Debug for ReplicateOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicateOptions")
            .field("initiator", &self.initiator)
            .field("live", &self.live)
            .field("encryption_key", &self.encryption_key.map(|_| "<set>"))
            .field("user_data", &self.user_data.len())
            .field("offer", &self.offer.is_some())
            .field("accept", &self.accept.is_some())
            .finish()
    }
}

impl ReplicateOptions {
    /// Options for the side that initiates the connection (`true`) or accepts it (`false`).
    pub fn new(initiator: bool) -> Self {
        Self {
            initiator,
            live: false,
            encryption_key: None,
            user_data: Vec::new(),
            offer: None,
            accept: None,
            stop: StopHandle::default(),
            plain: None,
            timeouts: None,
            live_timeout: None,
            keepalive_interval: None,
            max_channels: None,
            max_queued_requests: None,
            max_new_feeds: None,
            max_in_flight: None,
            max_syncing_feeds: None,
            idle_channel_timeout: None,
        }
    }

    /// How long the handshakes may take (default 10 s), and how long a non-live replication
    /// may make no progress (default 30 s: no block, no new length, no agreed feed, no answer
    /// served) before it fails with a timeout.
    pub fn timeouts(mut self, handshake: std::time::Duration, idle: std::time::Duration) -> Self {
        self.timeouts = Some((handshake, idle));
        self
    }

    /// How long a live peer may send nothing at all before the replication fails with a timeout
    /// (default 30 s). Live multifeed peers send a keep-alive when they have nothing else to
    /// send; plain Hypercore peers have none, so this does not apply to them.
    pub fn live_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.live_timeout = Some(timeout);
        self
    }

    /// How often an idle live replication sends a keep-alive (default 5 s).
    pub fn keepalive_interval(mut self, interval: std::time::Duration) -> Self {
        self.keepalive_interval = Some(interval);
        self
    }

    /// Channels the peer may hold open at once (default 131,072).
    pub fn max_channels(mut self, max: usize) -> Self {
        self.max_channels = Some(max);
        self
    }

    /// Feeds this replication may add to the store (default 100,000). A feed learned from the
    /// peer is added only once a signed root of it verified.
    pub fn max_new_feeds(mut self, max: usize) -> Self {
        self.max_new_feeds = Some(max);
        self
    }

    /// Block requests in flight per feed (default 256).
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = Some(max);
        self
    }

    /// Feeds downloaded at once on this connection (default 256); the others wait their turn.
    /// Non-live, a feed's channel closes once both sides hold it complete.
    pub fn max_syncing_feeds(mut self, max: usize) -> Self {
        self.max_syncing_feeds = Some(max);
        self
    }

    /// Live: how long a feed both sides hold the same stays idle before its channel and its
    /// hypercore are let go (default `None`: they stay open; opt in). Either side reopens the
    /// channel when it has news for the feed, so a live connection's memory follows the feeds
    /// that change. Only the initiator closes, and only towards a peer that reopens on news
    /// (meta protocol 2.1 or later).
    pub fn close_idle_channels_after(mut self, timeout: Option<std::time::Duration>) -> Self {
        self.idle_channel_timeout = Some(timeout);
        self
    }

    /// The peer's requests that may wait while the connection is full (default 65,536).
    pub fn max_queued_requests(mut self, max: usize) -> Self {
        self.max_queued_requests = Some(max);
        self
    }

    /// Talk plain Hypercore 10 to a peer that is not a multifeed (such as a JS `hypercore`):
    /// no feed-list exchange; serve whichever of our feeds the peer opens by key, and download
    /// `keys` (adding them as remote feeds). With no keys, it serves until the peer disconnects.
    pub fn hypercore_peer(mut self, keys: Vec<FeedKey>) -> Self {
        self.plain = Some(keys);
        self
    }

    /// Keep replicating new feeds and appends until stopped (default: stop once in sync).
    pub fn live(mut self, live: bool) -> Self {
        self.live = live;
        self
    }

    /// The shared key both peers must know; overrides the multifeed builder's key.
    pub fn encryption_key(mut self, key: [u8; 32]) -> Self {
        self.encryption_key = Some(key);
        self
    }

    /// Bytes sent to the peer in the handshake.
    pub fn user_data(mut self, user_data: impl Into<Vec<u8>>) -> Self {
        self.user_data = user_data.into();
        self
    }

    /// Offer only the local feeds for which `filter` returns true (default: all).
    pub fn offer(mut self, filter: impl Fn(&FeedKey) -> bool + Send + Sync + 'static) -> Self {
        self.offer = Some(Arc::new(filter));
        self
    }

    /// Accept only the remote feeds for which `filter` returns true (default: all).
    pub fn accept(mut self, filter: impl Fn(&FeedKey) -> bool + Send + Sync + 'static) -> Self {
        self.accept = Some(Arc::new(filter));
        self
    }

    /// A handle that stops this replication (live or not) when called.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }
}

impl Multifeed {
    /// Replicates with a peer over `io` until both sides hold the union of the agreed feeds (or,
    /// when live, until stopped).
    ///
    /// Runs the Noise handshake and encryption of Hypercore 10, then the multifeed exchange and
    /// one channel per feed. Several replications may run at once on one multifeed.
    pub async fn replicate<IO>(
        &self,
        io: IO,
        options: ReplicateOptions,
    ) -> Result<ReplicateSummary, Error>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.run_replication(options, |host, config| {
            multifeed_replicate::replicate(io, host, config)
        })
        .await
    }

    /// Replicates over an already established encrypted connection: one from
    /// [`multifeed_replicate::secure_channel`], or any other `CipherTrait` (a transport with its
    /// own encryption). Otherwise as [`replicate`](Self::replicate).
    pub async fn replicate_cipher(
        &self,
        cipher: Box<dyn multifeed_replicate::CipherTrait>,
        options: ReplicateOptions,
    ) -> Result<ReplicateSummary, Error> {
        self.run_replication(options, |host, config| {
            multifeed_replicate::replicate_cipher(cipher, host, config)
        })
        .await
    }

    async fn run_replication<F, Fut>(
        &self,
        options: ReplicateOptions,
        start: F,
    ) -> Result<ReplicateSummary, Error>
    where
        F: FnOnce(Arc<dyn FeedHost>, ReplicateConfig) -> Fut,
        Fut: std::future::Future<
            Output = Result<ReplicateSummary, multifeed_replicate::ReplicateError>,
        >,
    {
        // Registered before the check, so a `close` from now on either sees it or was seen.
        let (_running, abort) = self.inner.replications.register();
        self.inner.ensure_open()?;
        let connection = self.inner.next_connection.fetch_add(1, Ordering::Relaxed);
        let connected = Arc::new(AtomicBool::new(false));
        let (config, forward) = self.config(options, connection, connected.clone());
        let host: Arc<dyn FeedHost> = Arc::new(Host {
            multi: self.clone(),
        });
        let replication = start(host, config);
        let both = async {
            let (result, ()) = futures::join!(replication, forward);
            result
        };
        // On the heap: the replication's state machine is large (debug builds overflowed the
        // stack of a test thread running several replications).
        let result = match futures::future::Abortable::new(Box::pin(both), abort).await {
            Ok(result) => result.map_err(Error::from),
            // `close` ended it: nothing of it runs any more.
            Err(futures::future::Aborted) => Err(Error::Closed),
        };
        // The cores this replication held are let go: idle ones past the bound close.
        self.inner.trim_open_cores();
        if connected.load(Ordering::Relaxed) {
            self.inner.emit(Event::PeerDisconnected {
                connection,
                error: result.as_ref().err().map(ToString::to_string),
            });
        }
        result
    }

    fn config(
        &self,
        options: ReplicateOptions,
        connection: u64,
        connected: Arc<AtomicBool>,
    ) -> (ReplicateConfig, impl std::future::Future<Output = ()>) {
        let key = options
            .encryption_key
            .or(self.inner.config.encryption_key)
            .unwrap_or_else(|| {
                tracing::warn!(
                    "replicating with the public default key: anyone can read these feeds"
                );
                DEFAULT_ENCRYPTION_KEY
            });
        // Events are dropped when this is full (see `Event::Lagged` for the subscribers' side).
        let (sender, mut receiver) = futures::channel::mpsc::channel(1024);
        let mut config = ReplicateConfig::new(options.initiator)
            .live(options.live)
            .encryption_key(key)
            .user_data(options.user_data)
            .stop(options.stop)
            .events(sender);
        // Denied and removed keys are never offered nor requested, whatever the caller's
        // filters say (checked at each use: a deny during a live replication counts).
        let wrap = |filter: Option<KeyFilter>| -> KeyFilter {
            let inner = self.inner.clone();
            Arc::new(move |key: &FeedKey| {
                !inner.blocks(key) && filter.as_ref().is_none_or(|filter| filter(key))
            })
        };
        config = config
            .offer(wrap(options.offer))
            .accept(wrap(options.accept));
        if let Some((handshake, idle)) = options.timeouts {
            config = config.handshake_timeout(handshake).idle_timeout(idle);
        }
        if let Some(keys) = options.plain {
            config = config.plain_hypercore(keys);
        }
        if let Some(timeout) = options.live_timeout {
            config = config.live_timeout(timeout);
        }
        if let Some(interval) = options.keepalive_interval {
            config = config.keepalive_interval(interval);
        }
        if let Some(max) = options.max_channels {
            config = config.max_channels(max);
        }
        if let Some(max) = options.max_queued_requests {
            config = config.max_queued_requests(max);
        }
        if let Some(max) = options.max_new_feeds {
            config = config.max_new_feeds(max);
        }
        if let Some(max) = options.max_in_flight {
            config = config.max_in_flight(max);
        }
        if let Some(timeout) = options.idle_channel_timeout {
            config = config.close_idle_channels_after(timeout);
        }
        if let Some(max) = options.max_syncing_feeds {
            config = config.max_syncing_feeds(max);
        }
        let inner = self.inner.clone();
        let forward = async move {
            while let Some(event) = receiver.next().await {
                match event {
                    ReplicationEvent::RemoteFeeds(keys) => inner.emit(Event::RemoteFeeds { keys }),
                    ReplicationEvent::FeedUnavailable { key, reason } => {
                        inner.emit(Event::FeedUnavailable { key, reason })
                    }
                    ReplicationEvent::Downloaded { key, range, blocks } => {
                        inner.emit(Event::Downloaded {
                            key,
                            range,
                            blocks,
                            connection,
                        })
                    }
                    ReplicationEvent::RemoteHandshake {
                        user_data,
                        remote_key,
                    } => {
                        connected.store(true, Ordering::Relaxed);
                        inner.emit(Event::PeerConnected {
                            connection,
                            user_data,
                            remote_key,
                        })
                    }
                    ReplicationEvent::Synced => inner.emit(Event::Synced { connection }),
                    ReplicationEvent::Progress {
                        blocks_done,
                        blocks_known,
                    } => inner.emit(Event::Progress {
                        blocks_done,
                        blocks_known,
                    }),
                    _ => {}
                }
            }
        };
        (config, forward)
    }
}

/// The multifeed, as the replication driver sees it.
struct Host {
    multi: Multifeed,
}

#[async_trait]
impl FeedHost for Host {
    async fn local_feeds(&self) -> Result<Vec<LocalFeed>, HostError> {
        // Feeds closed to free memory (most, in a large store) are listed from their slots
        // without opening them and without a `Feed` handle; open ones are asked. The list keeps
        // the store's order (the peer schedules downloads in it).
        self.multi.inner.check_snapshot();
        let mut open = Vec::new();
        let mut feeds: Vec<LocalFeed> = {
            let table = self.multi.inner.table();
            let mut feeds = Vec::with_capacity(table.list.len());
            for slot in &table.list {
                let closed = self.multi.inner.closed_lengths(slot);
                let (length, contiguous_length) = closed.unwrap_or_default();
                if closed.is_none() {
                    // Its lengths are asked for below.
                    let feed = crate::Feed::new(slot.clone(), self.multi.inner.clone());
                    open.push((feeds.len(), feed));
                }
                feeds.push(LocalFeed {
                    key: *slot.key(),
                    length,
                    contiguous_length,
                    discovery_key: Some(slot.discovery_key),
                });
            }
            feeds
        };
        let mut damaged = Vec::new();
        for (place, feed) in open {
            match feed.info().await {
                Ok(info) => {
                    feeds[place].length = info.length;
                    feeds[place].contiguous_length = info.contiguous_length;
                }
                // A damaged feed is not offered; the others still are.
                Err(_) => damaged.push(place),
            }
        }
        if !damaged.is_empty() {
            let mut place = 0;
            feeds.retain(|_| {
                place += 1;
                damaged.binary_search(&(place - 1)).is_err()
            });
        }
        Ok(feeds)
    }

    async fn open_feed(&self, key: &FeedKey) -> Result<Option<SharedCore>, HostError> {
        match self.multi.by_key(key) {
            Some(feed) => Ok(Some(feed.core().await?)),
            None => Ok(None),
        }
    }

    async fn add_remote_feed(&self, key: &FeedKey) -> Result<SharedCore, HostError> {
        let feed = self.multi.add_remote_feed(key).await?;
        Ok(feed.core().await?)
    }

    async fn blocks_stored(&self) -> Result<(), HostError> {
        if self.multi.inner.config.durability == multifeed_storage::Durability::Sync {
            self.multi.flush().await?;
        } else {
            // Replicas' held writes reach the operating system once per batch of blocks.
            self.multi.inner.factory.write_held()?;
        }
        Ok(())
    }

    async fn block_intact(&self, key: &FeedKey, index: u64, value: &[u8]) -> bool {
        match self.multi.by_key(key) {
            Some(feed) => feed.block_intact(index, value).await,
            None => true,
        }
    }

    fn cores_released(&self) {
        self.multi.inner.trim_open_cores();
    }

    fn subscribe_changes(&self) -> BoxStream<'static, LocalChange> {
        let receiver = self.multi.inner.changes.new_receiver();
        futures::stream::unfold(receiver, |mut receiver| async move {
            match receiver.recv().await {
                Ok(key) => Some((LocalChange::Feed(key), receiver)),
                Err(async_broadcast::RecvError::Overflowed(_)) => {
                    Some((LocalChange::Lagged, receiver))
                }
                Err(async_broadcast::RecvError::Closed) => None,
            }
        })
        .boxed()
    }

    fn subscribe_new_feeds(&self) -> BoxStream<'static, FeedKey> {
        let multi = self.multi.clone();
        let receiver = self.multi.inner.new_event_receiver();
        futures::stream::unfold(
            (receiver, multi, Vec::<FeedKey>::new()),
            |(mut receiver, multi, mut pending)| async move {
                loop {
                    if let Some(key) = pending.pop() {
                        return Some((key, (receiver, multi, pending)));
                    }
                    match receiver.recv().await {
                        Ok(Event::Feed { key, .. }) => {
                            return Some((key, (receiver, multi, pending)))
                        }
                        Ok(_) => continue,
                        // Fell behind: offer every feed again; the exchange drops repeats.
                        Err(async_broadcast::RecvError::Overflowed(_)) => {
                            pending = multi.feeds().iter().rev().map(|f| *f.key()).collect();
                        }
                        Err(async_broadcast::RecvError::Closed) => return None,
                    }
                }
            },
        )
        .boxed()
    }
}
