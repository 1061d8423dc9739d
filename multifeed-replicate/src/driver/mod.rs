//! The connection driver: one task polls the protocol and routes messages to the meta exchange
//! and to each feed's sync state.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use futures::select_biased;
use futures::stream::{BoxStream, SelectAll, StreamExt};
use futures::FutureExt;
use hypercore_protocol::schema::{Range, Request, Synchronize};
use hypercore_protocol::{discovery_key, Channel, CommandTx, Event, Message, Protocol};
use multifeed_meta::{Action, Exchange, ExchangeConfig, FeedOffer};
use multifeed_storage::{FeedKey, SharedCore};

use crate::backlog::Backlog;
use crate::close::CloseSignal;
use crate::error::PeerViolation;
use crate::sync::SyncState;
use crate::transport::{weight_of_message, FrameLimits, Guard};
use crate::{FeedHost, ReplicateConfig, ReplicateError, ReplicateSummary, ReplicationEvent};

mod fetch;
mod probe;
mod serve;
mod watchdog;

use probe::{probe_core, usable_feed_key};

/// Name of the extension message that carries the meta exchange on the root channel.
pub(crate) const EXTENSION: &str = "multifeed";
/// Name of the root-channel extension a live peer sends when it has sent nothing else for a
/// while (peers that do not know it ignore it, as they ignore any other extension name).
pub(crate) const KEEPALIVE: &str = "multifeed/keepalive";
const TICK: Duration = Duration::from_millis(250);
/// Queued messages after which the driver writes even if more input is waiting.
const MAX_OUTBOX: usize = 512;
/// Queued weight (about bytes) after which the driver writes even if more input is waiting.
const MAX_OUTBOX_WEIGHT: u64 = 4 << 20;
/// Channels the peer may open for feeds we did not agree to (each is closed at once).
pub(crate) const MAX_UNKNOWN_CHANNELS: usize = 1024;
/// Feeds new to us fetched at once into probes, before their first signed root verified.
pub(crate) const MAX_PROBES: usize = 1024;
/// Answers in a row for one feed that bring no block and no length before the peer is dropped.
pub(crate) const MAX_FRUITLESS_ANSWERS: u32 = 64;
const LINGER: Duration = Duration::from_secs(5);
const BARRIER: &str = "multifeed-close-barrier";

type DiscoveryKey = [u8; 32];

/// Runs one replication over an encrypted connection until it finishes, stops or fails.
///
/// Three futures share the task: the driver, the pump and the watchdog (see [`watchdog`]).
pub(crate) async fn run(
    cipher: Box<dyn hypercore_handshake::CipherTrait>,
    close: Option<CloseSignal>,
    host: Arc<dyn FeedHost>,
    config: ReplicateConfig,
) -> Result<ReplicateSummary, ReplicateError> {
    let backlog = Arc::new(Backlog::default());
    let limits = FrameLimits {
        max_channels: config.max_channels,
    };
    let protocol = Protocol::new(Box::new(Guard::new(cipher, limits, backlog.clone())));
    let commands = protocol.commands();
    let (events_tx, events_rx) = mpsc::unbounded::<io::Result<Event>>();
    let pump = watchdog::pump(protocol, events_tx, backlog.clone());
    let watchdog = watchdog::watch(backlog.clone(), watchdog::Timeouts::of(&config));
    let driver = Driver::new(host, config, commands, close, backlog);
    // All live on the heap: the driver's state machine is large.
    let logic = Box::pin(driver.run(events_rx));
    let ended = Box::pin(futures::future::select(Box::pin(pump), Box::pin(watchdog)));
    match futures::future::select(logic, ended).await {
        futures::future::Either::Left((result, _)) => result,
        futures::future::Either::Right((either, _)) => Err(either.factor_first().0),
    }
}

/// One feed replicating on this connection.
struct FeedState {
    key: FeedKey,
    core: SharedCore,
    channel: Option<Channel>,
    /// Whether we asked the protocol to open its channel.
    opened: bool,
    /// Every per-feed decision: what the peer has, what is in flight, the target, pipelining.
    sync: SyncState,
    /// `core` is a probe in memory: the host does not have the feed yet.
    probe: bool,
}

enum Next {
    Continue,
    Done,
}

/// What one item from the protocol's event queue means for the run.
enum Step {
    Next(Next),
    /// The run ends with this.
    End(Result<ReplicateSummary, ReplicateError>),
}

struct Driver {
    host: Arc<dyn FeedHost>,
    config: ReplicateConfig,
    commands: CommandTx,
    close: Option<CloseSignal>,
    exchange: Option<Exchange>,
    root_dk: DiscoveryKey,
    root: Option<Channel>,
    /// Discovery keys we may open: the root, local feeds, agreed feeds.
    known: HashMap<DiscoveryKey, FeedKey>,
    feeds: HashMap<DiscoveryKey, FeedState>,
    /// Downloads still short of their target (non-live).
    incomplete: HashSet<DiscoveryKey>,
    /// Each channel's incoming messages, all those already there at once: handling one feed's
    /// run together keeps its files, lock and answers together (polling channels in turn for
    /// one message each interleaved every feed's blocks).
    inbound: SelectAll<BoxStream<'static, (DiscoveryKey, Vec<Message>)>>,
    changes: SelectAll<BoxStream<'static, DiscoveryKey>>,
    summary: ReplicateSummary,
    blocks_known: u64,
    progress_dirty: bool,
    finished: bool,
    /// The peer closed the root channel.
    peer_closed_root: bool,
    backlog: Arc<Backlog>,
    /// The peer's requests waiting for the transport to drain (bounded).
    deferred: VecDeque<(DiscoveryKey, Request)>,
    /// Feeds whose new length waits for the transport to drain (at most one entry per feed).
    unannounced: HashSet<DiscoveryKey>,
    /// Channels the peer opened for feeds we have not agreed to.
    unknown_channels: HashSet<DiscoveryKey>,
    /// Whether we sent anything since the last keep-alive tick.
    sent_since_tick: bool,
    /// Feeds new to us being fetched into probes, not yet verified.
    probes: usize,
    /// New feeds waiting for a probe slot (and their targets).
    waiting: VecDeque<(FeedKey, Option<u64>)>,
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
    /// Messages queued for the peer, in order; consecutive ones for one channel share a batch.
    outbox: Vec<(DiscoveryKey, Channel, Vec<Message>)>,
    outbox_len: usize,
    outbox_weight: u64,
}

impl Driver {
    fn new(
        host: Arc<dyn FeedHost>,
        config: ReplicateConfig,
        commands: CommandTx,
        close: Option<CloseSignal>,
        backlog: Arc<Backlog>,
    ) -> Self {
        let exchange = config.plain_feeds.is_none().then(|| {
            let mut exchange_config = ExchangeConfig {
                user_data: config.user_data.clone(),
                live: config.live,
                ..ExchangeConfig::default()
            };
            if let Some(version) = &config.protocol_version {
                exchange_config.version = version.clone();
            }
            if let Some(client) = &config.client {
                exchange_config.client = client.clone();
            }
            Exchange::new(exchange_config)
        });
        let root_dk = discovery_key(&config.encryption_key);
        Self {
            host,
            commands,
            close,
            exchange,
            root_dk,
            root: None,
            known: HashMap::new(),
            feeds: HashMap::new(),
            incomplete: HashSet::new(),
            inbound: SelectAll::new(),
            changes: SelectAll::new(),
            summary: ReplicateSummary::default(),
            blocks_known: 0,
            progress_dirty: false,
            finished: false,
            peer_closed_root: false,
            backlog,
            deferred: VecDeque::new(),
            unannounced: HashSet::new(),
            unknown_channels: HashSet::new(),
            sent_since_tick: false,
            probes: 0,
            waiting: VecDeque::new(),
            feeds_added: 0,
            remote_set_reported: false,
            unavailable: HashSet::new(),
            remote_key: [0; 32],
            downloaded: HashMap::new(),
            first_downloads: Vec::new(),
            unsynced_blocks: false,
            outbox: Vec::new(),
            outbox_len: 0,
            outbox_weight: 0,
            config,
        }
    }

    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<io::Result<Event>>,
    ) -> Result<ReplicateSummary, ReplicateError> {
        let mut new_feeds = if self.config.live && self.exchange.is_some() {
            self.host.subscribe_new_feeds().fuse()
        } else {
            futures::stream::pending().boxed().fuse()
        };
        // Plain peers have no keep-alive; non-live replications end by themselves or by the
        // idle timeout.
        let mut keepalive = if self.config.live && self.exchange.is_some() {
            StreamExt::map(
                async_io::Timer::interval(self.config.keepalive_interval),
                |_| (),
            )
            .boxed()
            .fuse()
        } else {
            futures::stream::pending().boxed().fuse()
        };
        let stop = self.config.stop.clone();
        let stopped = futures::FutureExt::fuse(stop.stopped());
        futures::pin_mut!(stopped);
        let backlog = self.backlog.clone();
        loop {
            self.emit_progress();
            if self.finished {
                break;
            }
            // Handle every message that is already here before writing: the answers and new
            // requests then leave together, in one frame per run of a channel's messages.
            if self.outbox_len >= MAX_OUTBOX || self.outbox_weight >= MAX_OUTBOX_WEIGHT {
                self.flush_outbox().await?;
                continue;
            }
            if let Some(Some((dk, messages))) = self.inbound.next().now_or_never() {
                if let Next::Done = self.on_messages(dk, messages).await? {
                    break;
                }
                self.check_synced().await?;
                continue;
            }
            if let Some(item) = events.next().now_or_never() {
                match self.on_protocol_item(item, &mut events).await {
                    Step::Next(Next::Continue) => {
                        self.check_synced().await?;
                        continue;
                    }
                    Step::Next(Next::Done) => break,
                    Step::End(result) => return result,
                }
            }
            // Every message the protocol decoded was taken: it may read more. (Only here, and
            // always before waiting: a reader held back while the driver waits would stall
            // both.)
            self.backlog.input_taken();
            let waiting = !self.deferred.is_empty() || !self.unannounced.is_empty();
            if waiting && !self.outgoing_full() {
                self.serve_deferred().await?;
                continue;
            }
            self.flush_outbox().await?;
            let drained = async {
                if !waiting {
                    futures::future::pending::<()>().await;
                }
                backlog.outgoing_drained().await;
            };
            let step = select_biased! {
                (dk, messages) = self.inbound.select_next_some() => {
                    self.on_messages(dk, messages).await?
                }
                // On the heap: handling an event is the deepest, largest part of the run, and
                // debug builds overflowed a 2 MiB test thread's stack with it inline.
                item = events.next() => match Box::pin(self.on_protocol_item(item, &mut events)).await {
                    Step::Next(next) => next,
                    Step::End(result) => return result,
                },
                changed = self.changes.select_next_some() => self.on_local_change(changed).await?,
                key = new_feeds.select_next_some() => self.on_new_local_feed(key).await?,
                () = stopped => Next::Done,
                () = drained.fuse() => {
                    self.serve_deferred().await?;
                    Next::Continue
                }
                _ = keepalive.next() => self.keepalive(),
            };
            if let Next::Done = step {
                break;
            }
            self.check_synced().await?;
        }
        self.flush_outbox().await?;
        self.blocks_stored().await?;
        self.close_gracefully(&mut events, true).await;
        Ok(self.summary)
    }

    /// Handles one item of the protocol's event queue (`None`: the queue ended).
    async fn on_protocol_item(
        &mut self,
        item: Option<io::Result<Event>>,
        events: &mut mpsc::UnboundedReceiver<io::Result<Event>>,
    ) -> Step {
        match item {
            Some(Ok(event)) => match self.on_event(event).await {
                Ok(next) => Step::Next(next),
                Err(err) => {
                    // Let the peer see our channel opens before we go, so it can tell why
                    // (a key mismatch shows on both sides).
                    self.close_gracefully(events, false).await;
                    Step::End(Err(err))
                }
            },
            Some(Err(err)) => Step::End(self.on_connection_end(err)),
            None => Step::End(self.on_connection_end(io::ErrorKind::UnexpectedEof.into())),
        }
    }

    /// A live keep-alive tick: tell the peer we are here if we sent nothing else since the last.
    fn keepalive(&mut self) -> Next {
        if !std::mem::take(&mut self.sent_since_tick) {
            if let Some(root) = self.root.clone() {
                let message = Message::Extension(hypercore_protocol::schema::Extension {
                    name: KEEPALIVE.to_owned(),
                    message: Vec::new(),
                });
                self.queue(self.root_dk, &root, vec![message]);
            }
        }
        Next::Continue
    }

    /// Ends the connection without losing what we queued last.
    ///
    /// Local signals sent through the command queue and the root channel come back as events
    /// only after everything queued before them was handed to the transport: a barrier. After a
    /// normal end we then close the root channel and wait (bounded) for the peer to close it too,
    /// so neither side drops the connection while the other still reads.
    async fn close_gracefully(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<io::Result<Event>>,
        normal: bool,
    ) {
        if self.flush_outbox().await.is_err() {
            return;
        }
        let mut barriers = 0;
        if self
            .commands
            .signal_local(BARRIER, Vec::new())
            .await
            .is_ok()
        {
            barriers += 1;
        }
        if let Some(root) = &self.root {
            if root
                .signal_local_protocol(BARRIER, Vec::new())
                .await
                .is_ok()
            {
                barriers += 1;
            }
        }
        let mut root_closed_by_peer = self.peer_closed_root;
        let mut linger = futures::FutureExt::fuse(async_io::Timer::after(LINGER));
        loop {
            if barriers == 0 {
                if !normal {
                    return;
                }
                if let Some(root) = self.root.take() {
                    if root.close().await.is_err() {
                        return;
                    }
                    if let Some(close) = &self.close {
                        close.close();
                    }
                }
                if root_closed_by_peer || self.exchange.is_none() {
                    return;
                }
            }
            select_biased! {
                event = events.next() => match event {
                    Some(Ok(Event::LocalSignal((name, _)))) if name == BARRIER => barriers -= 1,
                    Some(Ok(Event::Close(dk))) if dk == self.root_dk => {
                        root_closed_by_peer = true;
                        if barriers == 0 {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                },
                // What the peer sends while we close no longer matters; taking it keeps the
                // transport reading, so the peer's close reaches us.
                _ = self.inbound.select_next_some() => self.backlog.input_taken(),
                _ = linger => return,
            }
        }
    }

    fn on_connection_end(&self, err: io::Error) -> Result<ReplicateSummary, ReplicateError> {
        let serving_only = self
            .config
            .plain_feeds
            .as_ref()
            .is_some_and(|keys| keys.is_empty());
        if self.finished
            || (self.config.live && self.root.is_some())
            || (serving_only && self.backlog.is_noise_done())
        {
            return Ok(self.summary);
        }
        let phase = if !self.backlog.is_noise_done() {
            crate::Phase::NoiseHandshake
        } else if self.root.is_none() && self.exchange.is_some() {
            crate::Phase::ExchangeHandshake
        } else {
            crate::Phase::Replication
        };
        Err(ReplicateError::io(phase, err))
    }

    fn emit(&mut self, event: ReplicationEvent) -> bool {
        match &mut self.config.events {
            Some(sender) => sender.try_send(event).is_ok(),
            None => true,
        }
    }

    fn emit_progress(&mut self) {
        if self.progress_dirty {
            let event = ReplicationEvent::Progress {
                blocks_done: self.summary.blocks_received,
                blocks_known: self.blocks_known.max(self.summary.blocks_received),
            };
            self.progress_dirty = !self.emit(event);
        }
    }

    async fn on_event(&mut self, event: Event) -> Result<Next, ReplicateError> {
        match event {
            Event::Handshake(remote_key) => {
                self.remote_key = remote_key;
                self.backlog.noise_done();
                if self.exchange.is_none() {
                    self.backlog.exchange_done();
                }
                self.backlog.on_progress();
                if self.exchange.is_some() {
                    let key = self.config.encryption_key;
                    self.open_channel(key).await?;
                } else {
                    let keys = self.config.plain_feeds.clone().unwrap_or_default();
                    self.index_local_feeds().await?;
                    for key in keys {
                        self.track_feed(key, None, true).await?;
                        self.open_feed_channel(key).await?;
                    }
                }
            }
            Event::DiscoveryKey(dk) => {
                if dk == self.root_dk && self.exchange.is_some() {
                    let key = self.config.encryption_key;
                    self.open_channel(key).await?;
                } else {
                    if self.exchange.is_none() || self.root.is_none() {
                        self.index_local_feeds().await?;
                    }
                    match self.known.get(&dk).copied() {
                        Some(key) => {
                            self.track_feed(key, None, false).await?;
                            self.open_feed_channel(key).await?;
                        }
                        // Before the exchange, an unknown channel means the peer has another key.
                        None if self.exchange.is_some() && self.root.is_none() => {
                            return Err(ReplicateError::KeyMismatch)
                        }
                        // A feed we have not agreed to (yet: the peer's open can overtake its
                        // REPLICATE_FEEDS, which travels in another queue of the protocol). The
                        // protocol keeps the half-open channel until we open ours; a peer may
                        // keep only so many of those.
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
                        }
                    }
                }
            }
            Event::Channel(mut channel) => {
                let dk = *channel.discovery_key();
                if let Some(receiver) = channel.take_receiver() {
                    self.inbound.push(
                        receiver
                            .ready_chunks(MAX_OUTBOX)
                            .map(move |m| (dk, m))
                            .boxed(),
                    );
                }
                self.backlog.on_progress();
                if dk == self.root_dk && self.exchange.is_some() {
                    self.root = Some(channel);
                    self.start_exchange().await?;
                } else {
                    self.attach_channel(dk, channel).await?;
                }
            }
            Event::Close(dk) => {
                if dk == self.root_dk && self.exchange.is_some() {
                    self.peer_closed_root = true;
                    if !self.finished && !self.config.live {
                        return Err(ReplicateError::io(
                            crate::Phase::Replication,
                            io::Error::new(
                                io::ErrorKind::ConnectionAborted,
                                "the peer closed the exchange",
                            ),
                        ));
                    }
                    // The peer ended a live replication: close our side of the root too.
                    if let Some(root) = self.root.take() {
                        let _ = root.close().await;
                    }
                    return Ok(Next::Done);
                }
                self.unknown_channels.remove(&dk);
                if let Some(feed) = self.feeds.get_mut(&dk) {
                    feed.channel = None;
                }
            }
            _ => {}
        }
        Ok(Next::Continue)
    }

    async fn open_channel(&mut self, key: FeedKey) -> Result<(), ReplicateError> {
        // What we queued (the exchange's offers) must reach the peer before the open does.
        self.flush_outbox().await?;
        self.commands
            .open(key)
            .await
            .map_err(|e| ReplicateError::io(crate::Phase::Replication, e))
    }

    /// Opens the channel of a tracked feed, once.
    async fn open_feed_channel(&mut self, key: FeedKey) -> Result<(), ReplicateError> {
        let dk = discovery_key(&key);
        match self.feeds.get_mut(&dk) {
            Some(feed) if !feed.opened => feed.opened = true,
            _ => return Ok(()),
        }
        self.open_channel(key).await
    }

    /// Learns the discovery keys of every local feed we may serve.
    async fn index_local_feeds(&mut self) -> Result<(), ReplicateError> {
        let feeds = self
            .host
            .local_feeds()
            .await
            .map_err(ReplicateError::Host)?;
        for feed in feeds {
            if self.offers(&feed.key) {
                self.known.insert(discovery_key(&feed.key), feed.key);
            }
        }
        Ok(())
    }

    fn offers(&self, key: &FeedKey) -> bool {
        self.config.offer.as_ref().is_none_or(|offer| offer(key))
    }

    fn accepts(&self, key: &FeedKey) -> bool {
        self.config.accept.as_ref().is_none_or(|accept| accept(key))
    }

    async fn start_exchange(&mut self) -> Result<(), ReplicateError> {
        let Some(exchange) = self.exchange.as_mut() else {
            return Ok(());
        };
        let mut actions = exchange.start();
        let feeds = self
            .host
            .local_feeds()
            .await
            .map_err(ReplicateError::Host)?;
        let offers: Vec<FeedOffer> = feeds
            .into_iter()
            .filter(|feed| {
                self.config
                    .offer
                    .as_ref()
                    .is_none_or(|offer| offer(&feed.key))
            })
            .map(|feed| FeedOffer {
                key: feed.key,
                length: feed.length,
            })
            .collect();
        for offer in &offers {
            self.known.insert(discovery_key(&offer.key), offer.key);
        }
        if let Some(exchange) = self.exchange.as_mut() {
            actions.extend(exchange.offer(offers));
        }
        self.apply(actions).await
    }

    async fn apply(&mut self, actions: Vec<Action>) -> Result<(), ReplicateError> {
        if actions
            .iter()
            .any(|action| !matches!(action, Action::Send(_)))
        {
            self.backlog.on_progress();
        }
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send(message) => self.send_meta(message.encode()).await?,
                Action::RemoteHandshake { user_data, .. } => {
                    self.backlog.exchange_done();
                    let remote_key = self.remote_key;
                    self.emit(ReplicationEvent::RemoteHandshake {
                        user_data,
                        remote_key,
                    });
                }
                Action::RemoteOffered(offers) => {
                    // Keys that are not ed25519 public keys, or are of small order (anyone can
                    // sign for those), can never be trusted: ignore them.
                    let wanted: Vec<FeedKey> = offers
                        .iter()
                        .map(|offer| offer.key)
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
                        // Only a download creates a feed; one we offered must still be here.
                        self.track_feed(key, target, target.is_some()).await?;
                        self.open_feed_channel(key).await?;
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

    async fn send_meta(&mut self, bytes: Vec<u8>) -> Result<(), ReplicateError> {
        let Some(root) = self.root.clone() else {
            return Ok(());
        };
        let message = Message::Extension(hypercore_protocol::schema::Extension {
            name: EXTENSION.to_owned(),
            message: bytes,
        });
        self.queue(self.root_dk, &root, vec![message]);
        Ok(())
    }

    /// Queues messages for the peer; [`flush_outbox`](Self::flush_outbox) sends them.
    fn queue(&mut self, dk: DiscoveryKey, channel: &Channel, messages: Vec<Message>) {
        if messages.is_empty() || channel.closed() {
            return;
        }
        self.outbox_len += messages.len();
        self.outbox_weight += messages.iter().map(weight_of_message).sum::<u64>();
        match self.outbox.last_mut() {
            Some((last, _, queued)) if *last == dk => queued.extend(messages),
            _ => self.outbox.push((dk, channel.clone(), messages)),
        }
    }

    /// Hands every queued message to the protocol, in order: one batch (one frame) per run of
    /// messages for the same channel.
    /// The protocol's queue holds what it was handed until the transport takes it: the weight
    /// is counted in the [`Backlog`] once the batch is handed over.
    async fn flush_outbox(&mut self) -> Result<(), ReplicateError> {
        self.outbox_len = 0;
        self.outbox_weight = 0;
        for (_, channel, messages) in std::mem::take(&mut self.outbox) {
            if channel.closed() {
                continue;
            }
            let weight = messages.iter().map(weight_of_message).sum::<u64>();
            channel
                .send_batch(&messages)
                .await
                .map_err(|e| ReplicateError::io(crate::Phase::Replication, e))?;
            self.backlog.add_outgoing(weight);
            self.sent_since_tick = true;
        }
        Ok(())
    }

    /// Starts tracking a feed on this connection (creating it in the host if `create`).
    async fn track_feed(
        &mut self,
        key: FeedKey,
        target: Option<u64>,
        create: bool,
    ) -> Result<(), ReplicateError> {
        let dk = discovery_key(&key);
        self.known.insert(dk, key);
        self.unknown_channels.remove(&dk);
        if let Some(feed) = self.feeds.get_mut(&dk) {
            if let Some(target) = target {
                feed.sync.set_target(target);
            }
        } else {
            if self.unavailable.contains(&key) {
                return Ok(());
            }
            let opened = match self.host.open_feed(&key).await {
                Ok(opened) => opened,
                // One unreadable feed of ours does not stop the others: it is reported and
                // left out of this replication.
                Err(err) => {
                    self.feed_unavailable(key, &err);
                    return Ok(());
                }
            };
            let core = match opened {
                Some(core) => (core, false),
                // A feed new to us is fetched into a probe in memory first: the host records
                // it only once a signed root of it verified (see `promote`).
                None if create && self.probes >= MAX_PROBES => {
                    if !self.waiting.iter().any(|(k, _)| *k == key) {
                        self.waiting.push_back((key, target));
                    }
                    if target.is_some_and(|t| t > 0) && !self.config.live {
                        self.incomplete.insert(dk);
                    }
                    return Ok(());
                }
                None if create => {
                    self.probes += 1;
                    (probe_core(&key).await?, true)
                }
                None => return Ok(()),
            };
            let (core, probe) = core;
            if self.config.live && !probe {
                self.changes.push(change_stream(dk, core.clone()));
            }
            self.feeds.insert(
                dk,
                FeedState {
                    key,
                    core,
                    channel: None,
                    opened: false,
                    sync: {
                        let mut sync = SyncState::new(self.config.max_in_flight);
                        if let Some(target) = target {
                            sync.set_target(target);
                        }
                        sync
                    },
                    probe,
                },
            );
        }
        if let Some(target) = target {
            let contiguous = self
                .feed_info(&dk)
                .await
                .map_or(0, |info| info.contiguous_length);
            if contiguous < target && !self.config.live && self.incomplete.insert(dk) {
                self.blocks_known += target - contiguous;
            }
        }
        Ok(())
    }

    async fn feed_info(&mut self, dk: &DiscoveryKey) -> Option<hypercore::Info> {
        let feed = self.feeds.get_mut(dk)?;
        let core = feed.core.lock().await;
        Some(fetch::checked_info(&core, &mut feed.sync))
    }

    async fn attach_channel(
        &mut self,
        dk: DiscoveryKey,
        channel: Channel,
    ) -> Result<(), ReplicateError> {
        let Some(feed) = self.feeds.get_mut(&dk) else {
            // A channel for a feed we do not track: close it.
            self.flush_outbox().await?;
            let _ = channel.close().await;
            return Ok(());
        };
        feed.channel = Some(channel);
        self.announce(dk).await
    }

    /// Tells the peer our length and what we hold.
    pub(super) async fn announce(&mut self, dk: DiscoveryKey) -> Result<(), ReplicateError> {
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return Ok(());
        };
        let Some(channel) = feed.channel.clone() else {
            return Ok(());
        };
        let info = {
            let core = feed.core.lock().await;
            fetch::checked_info(&core, &mut feed.sync)
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
        self.queue(dk, &channel, messages);
        Ok(())
    }

    /// Handles a channel's messages in order, until one ends the replication.
    async fn on_messages(
        &mut self,
        dk: DiscoveryKey,
        messages: Vec<Message>,
    ) -> Result<Next, ReplicateError> {
        for message in messages {
            // Once finished, whatever else the peer sent does not matter (and must not turn a
            // completed sync into an error).
            if self.finished {
                return Ok(Next::Continue);
            }
            if let Next::Done = self.on_message(dk, message).await? {
                return Ok(Next::Done);
            }
        }
        Ok(Next::Continue)
    }

    async fn on_message(
        &mut self,
        dk: DiscoveryKey,
        message: Message,
    ) -> Result<Next, ReplicateError> {
        if dk == self.root_dk && self.exchange.is_some() {
            if let Message::Extension(extension) = message {
                if extension.name == EXTENSION {
                    let actions = match self.exchange.as_mut() {
                        Some(exchange) => exchange.handle(&extension.message)?,
                        None => Vec::new(),
                    };
                    self.apply(actions).await?;
                }
            }
            return Ok(Next::Continue);
        }
        match message {
            Message::Synchronize(sync) => {
                let Some(feed) = self.feeds.get_mut(&dk) else {
                    return Ok(Next::Continue);
                };
                if feed.sync.remote_length() != sync.length {
                    self.backlog.on_progress();
                }
                let first = feed.sync.on_remote_sync(sync.fork, sync.length);
                if feed.sync.target().is_none() && self.exchange.is_none() && !self.config.live {
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
                    let contiguous = {
                        let core = feed.core.lock().await;
                        fetch::checked_info(&core, &mut feed.sync).contiguous_length
                    };
                    if contiguous < sync.length {
                        self.blocks_known += sync.length - contiguous;
                        self.incomplete.insert(dk);
                    }
                }
                if first {
                    self.announce(dk).await?;
                }
                self.request_more(dk).await?;
            }
            Message::Range(_) | Message::Bitfield(_) => {
                if let Some(feed) = self.feeds.get_mut(&dk) {
                    feed.sync.on_remote_has();
                }
                self.request_more(dk).await?;
            }
            Message::Request(request) => {
                // While the transport is behind, requests wait (bounded) instead of growing
                // the protocol's write queue.
                if self.deferred.is_empty() && !self.outgoing_full() {
                    self.serve(dk, request).await?;
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
            }
            Message::Data(data) => self.on_data(dk, data).await?,
            Message::NoData(no_data) => {
                if let Some(feed) = self.feeds.get_mut(&dk) {
                    feed.sync.on_no_data(no_data.request);
                }
                self.request_more(dk).await?;
            }
            _ => {}
        }
        Ok(Next::Continue)
    }

    /// Lets the host make the blocks stored so far durable.
    async fn blocks_stored(&mut self) -> Result<(), ReplicateError> {
        if std::mem::take(&mut self.unsynced_blocks) {
            self.host
                .blocks_stored()
                .await
                .map_err(ReplicateError::Host)?;
        }
        for (_, (key, range, blocks)) in std::mem::take(&mut self.downloaded) {
            self.emit(ReplicationEvent::Downloaded { key, range, blocks });
        }
        Ok(())
    }

    /// Our copy of a feed changed (append, or blocks from another connection): tell the peer.
    /// While the transport is behind, only the latest length matters: announcements wait
    /// (one per feed) with the requests.
    async fn on_local_change(&mut self, dk: DiscoveryKey) -> Result<Next, ReplicateError> {
        if self.outgoing_full() {
            self.unannounced.insert(dk);
        } else {
            self.announce(dk).await?;
        }
        Ok(Next::Continue)
    }

    /// A feed was added to the host after we started (live): offer it.
    async fn on_new_local_feed(&mut self, key: FeedKey) -> Result<Next, ReplicateError> {
        let Some(exchange) = self.exchange.as_ref() else {
            return Ok(Next::Continue);
        };
        // Feeds learned from this very peer are not offered back to it.
        if exchange.is_agreed(&key) || exchange.remote_length(&key).is_some() || !self.offers(&key)
        {
            return Ok(Next::Continue);
        }
        let core = match self.host.open_feed(&key).await {
            Ok(Some(core)) => core,
            Ok(None) => return Ok(Next::Continue),
            Err(err) => {
                self.feed_unavailable(key, &err);
                return Ok(Next::Continue);
            }
        };
        let length = core.lock().await.info().length;
        self.known.insert(discovery_key(&key), key);
        let actions = match self.exchange.as_mut() {
            Some(exchange) => exchange.offer(vec![FeedOffer { key, length }]),
            None => Vec::new(),
        };
        self.apply(actions).await?;
        Ok(Next::Continue)
    }

    /// Reports a feed of ours the host cannot open; the replication goes on without it.
    fn feed_unavailable(&mut self, key: FeedKey, err: &crate::HostError) {
        if !self.unavailable.insert(key) {
            return;
        }
        self.summary.feeds_unavailable += 1;
        self.incomplete.remove(&discovery_key(&key));
        self.emit(ReplicationEvent::FeedUnavailable {
            key,
            reason: err.to_string(),
        });
    }

    /// Once the peer's first round of offers is settled, reports it (`RemoteFeeds` with the
    /// feeds we download, none included): on both sides, also when a side gets nothing.
    fn report_remote_set(&mut self) {
        if self.remote_set_reported || !self.exchange.as_ref().is_some_and(|e| e.settled()) {
            return;
        }
        self.remote_set_reported = true;
        let keys = std::mem::take(&mut self.first_downloads);
        self.emit(ReplicationEvent::RemoteFeeds(keys));
    }

    /// Non-live: once every wanted feed reached its target, report SYNCED.
    async fn check_synced(&mut self) -> Result<(), ReplicateError> {
        self.report_remote_set();
        if self.config.live {
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
            self.apply(actions).await?;
        }
        Ok(())
    }
}

/// Yields `dk` whenever the core reports a change.
fn change_stream(dk: DiscoveryKey, core: SharedCore) -> BoxStream<'static, DiscoveryKey> {
    let seen = core.version();
    futures::stream::unfold((core, seen), move |(core, seen)| async move {
        let now = core.changed(seen).await;
        Some((dk, (core, now)))
    })
    .boxed()
}
